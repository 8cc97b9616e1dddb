//! Shared helpers of the integration tests: the vendored fixtures and a processor over the
//! fixture tokenizer.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use dsvl2_processor::{Conversation, Processor, RgbImage};
use sha2::{Digest, Sha256};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";

/// The processor of the fixture models (all three share tokenizer and processor config). Built
/// from the two files directly so that these tests do not depend on `config.json` parsing.
pub fn fixture_processor() -> Processor {
    let dir = fixtures().join("models/tiny-like");
    let config =
        dsvl2_config::ProcessorConfig::from_file(&dir.join("processor_config.json")).expect("processor config");
    Processor::new(config, &dir.join("tokenizer.json"), BOS, EOS).expect("fixture processor")
}

/// A conversation given inline (as in `input.json`), image paths relative to `base`.
pub fn conversation_from_value(value: &serde_json::Value, base: &Path) -> Conversation {
    Conversation::from_json(&value.to_string(), base, Path::new("input.json")).expect("conversation")
}

/// The tile as u8 `[3, H, W]` bytes (the layout `sha256_chw_u8` hashes).
pub fn chw_bytes(tile: &RgbImage) -> Vec<u8> {
    (0..3).flat_map(|c| tile.data[c..].iter().step_by(3).copied()).collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn max_abs_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

pub fn as_usize_vec(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("int") as usize)
        .collect()
}
