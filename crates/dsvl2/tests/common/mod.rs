//! What the CLI tests share: the vendored fixtures and running the built `dsvl2` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A path under `tests/fixtures`, as a command-line argument.
pub fn fixture(rel: &str) -> String {
    fixtures().join(rel).to_string_lossy().into_owned()
}

/// A fixture model folder (`tiny-like`, `small-like`, `base-like`).
pub fn model(variant: &str) -> String {
    fixtures().join("models").join(variant).to_string_lossy().into_owned()
}

pub fn dsvl2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsvl2"))
        .args(args)
        .output()
        .expect("dsvl2 runs")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed: {}", stderr(out));
}

/// A clear error: exit code 2, a message containing `needle`, no panic.
pub fn assert_clear_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "should fail cleanly, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}
