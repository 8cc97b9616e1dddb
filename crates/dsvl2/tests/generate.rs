//! `dsvl2 generate` end to end: files in, the reference's greedy tokens out; bad requests get a
//! clear error and exit code 2, never a panic.

mod common;

use common::{dsvl2, fixture, fixtures, model};
use serde_json::Value;

fn expected_ids(case: &str, variant: &str) -> Vec<u64> {
    let text = std::fs::read_to_string(fixtures().join("cases").join(case).join(format!("{variant}.json"))).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    ids_of(&v["generated_ids"])
}

/// The generated ids of a `--json` report.
fn output_ids(report: &Value) -> Vec<u64> {
    ids_of(&report["output_tokens"])
}

fn ids_of(list: &Value) -> Vec<u64> {
    list.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn run_json(args: &[&str]) -> Value {
    let out = dsvl2(args);
    assert!(
        out.status.success(),
        "dsvl2 {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn greedy_json_matches_reference_for_every_variant() {
    for variant in ["tiny-like", "small-like", "base-like"] {
        let report = run_json(&[
            "generate",
            "--model",
            &model(variant),
            "--prompt",
            "Describe each stage of this <image> in detail.",
            "--image",
            &fixture("images/wide_street.png"),
            "--max-new-tokens",
            "24",
            "--temperature",
            "0",
            "--repetition-penalty",
            "1",
            "--json",
        ]);
        let ids = output_ids(&report);
        assert_eq!(
            ids,
            expected_ids("single_wide", variant),
            "{variant}: greedy tokens differ from the reference"
        );
        assert_eq!(report["finish_reason"], "length");
        assert_eq!(report["prompt_tokens"].as_array().unwrap().len(), 831);
        assert!(report["timings"]["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(!report["text"].as_str().unwrap().is_empty());
    }
}

#[test]
fn conversation_file_matches_reference() {
    // The case's conversation, with image paths made absolute (a file's relative paths would be
    // resolved against the temporary folder).
    let input: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases/multi_turn_system/input.json")).unwrap())
            .unwrap();
    let mut conversation = input["conversation"].clone();
    for message in conversation.as_array_mut().unwrap() {
        if let Some(images) = message.get_mut("images") {
            for image in images.as_array_mut().unwrap() {
                *image = Value::String(fixture(image.as_str().unwrap()));
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("conversation.json");
    std::fs::write(&file, conversation.to_string()).unwrap();
    let report = run_json(&[
        "generate",
        "--model",
        &model("small-like"),
        "--conversation",
        file.to_str().unwrap(),
        "--system",
        input["system_prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "24",
        "--temperature",
        "0",
        "--repetition-penalty",
        "1",
        "--json",
    ]);
    let ids = output_ids(&report);
    assert_eq!(ids, expected_ids("multi_turn_system", "small-like"));
}

#[test]
fn streamed_text_equals_json_text() {
    let args = [
        "generate",
        "--model",
        &model("tiny-like"),
        "--prompt",
        "hello there",
        "--max-new-tokens",
        "12",
        "--seed",
        "7",
        "--temperature",
        "1",
    ];
    let streamed = dsvl2(&args);
    assert!(
        streamed.status.success(),
        "{}",
        String::from_utf8_lossy(&streamed.stderr)
    );
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let report = run_json(&json_args);
    let text = String::from_utf8(streamed.stdout).unwrap();
    assert_eq!(text.trim_end_matches('\n'), report["text"].as_str().unwrap());
}

fn expect_error(args: &[&str], needle: &str) {
    let out = dsvl2(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?} should fail cleanly, stderr: {stderr}"
    );
    assert!(stderr.contains(needle), "{args:?}: stderr lacks {needle:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_requests_fail_with_clear_errors() {
    let tiny = model("tiny-like");
    expect_error(
        &[
            "generate",
            "--model",
            &tiny,
            "--prompt",
            "hi",
            "--max-new-tokens",
            "5000",
        ],
        "plus 5000 new tokens, but the model's context is 4096 tokens",
    );
    expect_error(
        &[
            "generate",
            "--model",
            &tiny,
            "--prompt",
            "<image> and <image>",
            "--image",
            &fixture("images/wide_street.png"),
        ],
        "2 `<image>` tag(s) but 1 image(s)",
    );
    expect_error(
        &["generate", "--model", &tiny, "--prompt", "hi <image>"],
        "1 `<image>` tag(s) but 0 image(s)",
    );
    expect_error(
        &[
            "generate",
            "--model",
            &tiny,
            "--prompt",
            "<image>",
            "--image",
            "/nonexistent/cat.png",
        ],
        "/nonexistent/cat.png",
    );
    expect_error(
        &[
            "generate",
            "--model",
            &tiny,
            "--prompt",
            "<image>",
            "--image",
            &fixture("README.md"),
        ],
        "not an image",
    );
    expect_error(
        &["generate", "--model", "/nonexistent/model", "--prompt", "hi"],
        "/nonexistent/model",
    );
    expect_error(
        &["generate", "--model", &tiny, "--prompt", "hi", "--top-p", "0"],
        "top_p must be in (0, 1], got 0",
    );
    expect_error(
        &["generate", "--model", &tiny, "--prompt", "hi", "--temperature=-1"],
        "temperature must be >= 0",
    );
}

#[test]
fn seeded_sampling_is_reproducible_across_processes() {
    let args = [
        "generate",
        "--model",
        &model("tiny-like"),
        "--prompt",
        "hello there",
        "--max-new-tokens",
        "16",
        "--temperature",
        "1.0",
        "--seed",
        "1234",
        "--json",
    ];
    let a = run_json(&args);
    let b = run_json(&args);
    assert_eq!(a["output_tokens"], b["output_tokens"]);
    assert_eq!(a["seed"], 1234);
}

#[test]
fn images_without_tags_get_tags_and_a_note() {
    let image = fixture("images/wide_street.png");
    let args = [
        "generate",
        "--model",
        &model("tiny-like"),
        "--prompt",
        "Describe it.",
        "--image",
        &image,
        "--max-new-tokens",
        "2",
        "--json",
    ];
    let out = dsvl2(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 image(s) but 0 `<image>` tag(s): added 1 tag(s)"),
        "{stderr}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["num_image_tokens"], serde_json::json!([813]));
}

#[test]
fn annotate_writes_the_last_image_and_json_has_boxes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("annotated.png");
    let report = run_json(&[
        "generate",
        "--model",
        &model("tiny-like"),
        "--prompt",
        "<image> <|ref|>the giraffe<|/ref|>",
        "--image",
        &fixture("images/giraffe_tall.png"),
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--annotate",
        out.to_str().unwrap(),
        "--json",
    ]);
    // The random fixture model writes no boxes; the field is there and the image is written.
    assert!(report["boxes"].as_array().unwrap().is_empty());
    let written = image::open(&out).unwrap();
    let original = image::open(fixtures().join("images/giraffe_tall.png")).unwrap();
    assert_eq!(
        (written.width(), written.height()),
        (original.width(), original.height())
    );

    expect_error(
        &[
            "generate",
            "--model",
            &model("tiny-like"),
            "--prompt",
            "hi",
            "--annotate",
            out.to_str().unwrap(),
        ],
        "--annotate needs an image",
    );
}
