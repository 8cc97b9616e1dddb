//! `dsvl2 chat`: a turn that reuses the KV cache answers exactly as a fresh `generate` of the same
//! conversation does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Runs `dsvl2 ARGS` with `input` on stdin; returns (stdout, stderr).
fn run(args: &[&str], input: &str) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsvl2"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert!(out.status.success(), "dsvl2 {args:?} failed: {stderr}");
    (stdout, stderr)
}

// Greedy, one line per answer (a newline stops generation), short answers.
const DECODING: [&str; 8] = [
    "--temperature",
    "0",
    "--stop",
    "\n",
    "--max-new-tokens",
    "12",
    "--repetition-penalty",
    "1.1",
];

#[test]
fn second_turn_with_cached_prefix_equals_a_fresh_generation() {
    let model = fixtures().join("models/small-like");
    let image = fixtures().join("images/small_photo.png");
    let mut args = vec!["chat", "--model", model.to_str().unwrap()];
    args.extend(DECODING);
    let input = format!("/image {}\nWhat is this?\nAnd the colour?\n/exit\n", image.display());
    let (stdout, stderr) = run(&args, &input);
    let answers: Vec<&str> = stdout.lines().collect();
    assert_eq!(answers.len(), 2, "two answers expected: {stdout:?}, stderr {stderr}");

    // The same conversation, from scratch.
    let conversation = json!([
        {"role": "<|User|>", "content": "<image>\nWhat is this?", "images": [image]},
        {"role": "<|Assistant|>", "content": answers[0]},
        {"role": "<|User|>", "content": "And the colour?"},
        {"role": "<|Assistant|>", "content": ""},
    ]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("conversation.json");
    std::fs::write(&file, conversation.to_string()).unwrap();
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--conversation",
        file.to_str().unwrap(),
        "--json",
    ];
    args.extend(DECODING);
    let (stdout, _) = run(&args, "");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["text"].as_str().unwrap(), answers[1]);
}

#[test]
fn reset_forgets_and_bad_commands_do_not_end_the_session() {
    let model = fixtures().join("models/tiny-like");
    let mut args = vec!["chat", "--model", model.to_str().unwrap()];
    args.extend(DECODING);
    let (stdout, stderr) = run(&args, "hello\n/reset\n/image /nonexistent.png\n/bogus\nhello\n");
    let answers: Vec<&str> = stdout.lines().collect();
    assert_eq!(answers.len(), 2, "{stdout:?} {stderr}");
    assert_eq!(
        answers[0], answers[1],
        "after /reset the same message gets the same greedy answer"
    );
    assert!(stderr.contains("/nonexistent.png"), "{stderr}");
    assert!(stderr.contains("unknown command /bogus"), "{stderr}");
}
