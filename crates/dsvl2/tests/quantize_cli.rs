//! `dsvl2 quantize` end to end: a fixture model written as one GGUF answers exactly like its
//! folder (f32), a q8_0 GGUF answers like the folder loaded with `--dtype q8_0`, and damaged or
//! misnamed files are clear errors with exit code 2, never a panic.

mod common;

use std::path::Path;
use std::process::Output;

use common::{assert_clear_error, assert_ok, dsvl2, fixture, fixtures, model};
use serde_json::Value;

fn quantize(model: &str, dtype: &str, out: &Path) -> Output {
    dsvl2(&[
        "quantize",
        "--model",
        model,
        "--dtype",
        dtype,
        "--out",
        out.to_str().unwrap(),
    ])
}

/// The greedy answer (ids and text) to the image prompt.
fn greedy(model: &str, extra: &[&str]) -> (Vec<u64>, String) {
    let image = fixture("images/wide_street.png");
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "Describe each stage of this <image> in detail.",
        "--image",
        &image,
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        "--repetition-penalty",
        "1",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = dsvl2(&args);
    assert_ok(&out, &format!("generate {args:?}"));
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let ids = report["output_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    (ids, report["text"].as_str().unwrap().to_string())
}

fn reference_ids(variant: &str) -> Vec<u64> {
    let path = fixtures().join("cases/single_wide").join(format!("{variant}.json"));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn f32_gguf_answers_exactly_like_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    for variant in ["tiny-like", "small-like"] {
        let gguf = dir.path().join(format!("{variant}.gguf"));
        let out = quantize(&model(variant), "f32", &gguf);
        assert_ok(&out, "quantize");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), gguf.to_str().unwrap());
        assert!(!dir.path().join(format!("{variant}.gguf.partial")).exists());

        let from_folder = greedy(&model(variant), &[]);
        let from_gguf = greedy(gguf.to_str().unwrap(), &[]);
        assert_eq!(from_gguf, from_folder, "{variant}: the GGUF answers differently");
        assert_eq!(from_gguf.0[..], reference_ids(variant)[..8], "{variant}");
    }
}

#[test]
fn q8_0_gguf_answers_like_the_folder_loaded_as_q8_0() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny-q8.gguf");
    assert_ok(&quantize(&model("tiny-like"), "q8_0", &gguf), "quantize q8_0");
    let safetensors = fixtures().join("models/tiny-like/model.safetensors");
    assert!(std::fs::metadata(&gguf).unwrap().len() < std::fs::metadata(safetensors).unwrap().len() * 2 / 3);
    // The language model's and the projector's linear weights in the interleaved layout (the vision
    // tower's are f16 here: 48 columns are no whole q8_0 block).
    let file = dsvl2_config::gguf::GgufFile::open(&gguf).unwrap();
    let type_of = |name: &str| file.tensors.iter().find(|t| t.name == name).unwrap().ggml_type;
    use dsvl2_config::gguf::ggml_type::DSVL2_Q8_0_R16;
    assert_eq!(
        type_of("language.model.layers.1.mlp.experts.0.up_proj.weight"),
        DSVL2_Q8_0_R16
    );
    assert_eq!(type_of("language.lm_head.weight"), DSVL2_Q8_0_R16);
    assert_eq!(type_of("projector.layers.0.weight"), DSVL2_Q8_0_R16);
    let from_gguf = greedy(gguf.to_str().unwrap(), &[]);
    assert_eq!(from_gguf.0.len(), 8);
    let from_folder = greedy(&model("tiny-like"), &["--dtype", "q8_0"]);
    assert_eq!(from_gguf, from_folder, "GGUF q8_0 vs folder --dtype q8_0");
    // The same weights copied into memory at load instead of used from the file's map.
    let copied = greedy(gguf.to_str().unwrap(), &["--no-mmap"]);
    assert_eq!(copied, from_gguf, "GGUF q8_0 with --no-mmap");
    // `bench` measures as `serve` runs: a GGUF's weights copied into memory unless `--mmap`.
    for (extra, held) in [(None, "copied"), (Some("--mmap"), "mapped")] {
        let image = fixture("images/small_photo.png");
        let mut args = vec!["bench", "--model", gguf.to_str().unwrap(), "--image", &image];
        args.extend(["--prompt", "<image>\nDescribe.", "--max-new-tokens", "2", "--json"]);
        args.extend(extra);
        let out = dsvl2(&args);
        assert_ok(&out, &format!("bench {args:?}"));
        let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
        assert_eq!(report["weights_memory"], held, "bench {extra:?}");
    }

    // A GGUF converts again (here to f16), its embedded files carried over.
    let again = dir.path().join("tiny-f16.gguf");
    assert_ok(&quantize(gguf.to_str().unwrap(), "f16", &again), "quantize a GGUF");
    let (ids, _) = greedy(again.to_str().unwrap(), &[]);
    assert_eq!(ids.len(), 8);
}

#[test]
fn output_file_rules() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("m.gguf");
    assert_ok(&quantize(&model("tiny-like"), "f16", &gguf), "quantize");
    let first = std::fs::metadata(&gguf).unwrap().len();

    assert_clear_error(&quantize(&model("tiny-like"), "f32", &gguf), "exists; pass --force");
    assert_eq!(
        std::fs::metadata(&gguf).unwrap().len(),
        first,
        "refused run left the file alone"
    );
    let forced = dsvl2(&[
        "quantize",
        "--model",
        &model("tiny-like"),
        "--dtype",
        "f32",
        "--out",
        gguf.to_str().unwrap(),
        "--force",
    ]);
    assert_ok(&forced, "quantize --force");
    assert!(std::fs::metadata(&gguf).unwrap().len() > first, "f32 replaced f16");

    assert_clear_error(
        &quantize(&model("tiny-like"), "f32", &dir.path().join("m.safetensors")),
        "must end in .gguf",
    );
    assert_clear_error(&quantize(&model("tiny-like"), "q5", &gguf), "q4_k");
    assert_clear_error(
        &quantize("/nonexistent/model.gguf", "f32", &dir.path().join("x.gguf")),
        "/nonexistent/model.gguf",
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, vec!["m.gguf".to_string()]);
}

#[test]
fn damaged_gguf_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("good.gguf");
    assert_ok(&quantize(&model("tiny-like"), "f32", &gguf), "quantize");
    let bytes = std::fs::read(&gguf).unwrap();

    let generate = |path: &Path| {
        dsvl2(&[
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ])
    };

    // Cut in the tensor data: the header reads, a tensor runs past the end.
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = generate(&truncated);
    assert_clear_error(&out, "truncated.gguf");
    assert_clear_error(&out, "past the end");

    // Cut inside the metadata.
    let header_cut = dir.path().join("header.gguf");
    std::fs::write(&header_cut, &bytes[..200]).unwrap();
    assert_clear_error(&generate(&header_cut), "truncated");

    let mut bad = bytes.clone();
    bad[..4].copy_from_slice(b"GGML");
    let bad_magic = dir.path().join("magic.gguf");
    std::fs::write(&bad_magic, &bad).unwrap();
    assert_clear_error(&generate(&bad_magic), "not a GGUF file");

    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert_clear_error(&generate(&empty), "not a GGUF file");

    assert_clear_error(&generate(&dir.path().join("absent.gguf")), "absent.gguf");
}
