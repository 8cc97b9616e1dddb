//! `dsvl2 random-model` and `dsvl2 bench` end to end on the fixture configs: the random checkpoint
//! loads (no missing, extra or misshaped tensor) and answers; the bench prints one JSON object
//! with every field. Benchmarks are not tests: nothing here asserts a speed.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use common::{assert_clear_error, assert_ok, dsvl2, fixture, fixtures, stderr};
use serde_json::Value;

/// Writes a random checkpoint for a fixture config into `out`.
fn random_model(variant: &str, out: &Path, extra: &[&str]) -> Output {
    let config = fixture(&format!("models/{variant}/config.json"));
    let tokenizer = fixture("models/tiny-like");
    let out = out.to_string_lossy().into_owned();
    let mut args = vec![
        "random-model",
        "--config",
        &config,
        "--tokenizer",
        &tokenizer,
        "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    dsvl2(&args)
}

/// Shard file -> (tensor name -> byte length), from the safetensors headers.
fn shard_contents(dir: &Path, files: &[String]) -> BTreeMap<String, BTreeMap<String, usize>> {
    files
        .iter()
        .map(|file| {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let tensors = st
                .tensors()
                .into_iter()
                .map(|(name, view)| {
                    assert_eq!(view.dtype(), safetensors::Dtype::BF16, "{name}");
                    (name, view.data().len())
                })
                .collect();
            (file.clone(), tensors)
        })
        .collect()
}

#[test]
fn random_checkpoint_of_fixture_configs_loads_and_answers() {
    let tmp = tempfile::tempdir().unwrap();
    for variant in ["tiny-like", "small-like", "base-like"] {
        let out = tmp.path().join(variant);
        // A small shard limit, so the fixture-sized model is split like the real ones.
        let written = random_model(variant, &out, &["--seed", "7", "--shard-size", "300000"]);
        assert_ok(&written, "random-model");

        // The index agrees with the shards: same names, same files, total_size = data bytes.
        let index: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();
        let weight_map = index["weight_map"].as_object().unwrap();
        let mut files: Vec<String> = weight_map.values().map(|f| f.as_str().unwrap().to_string()).collect();
        files.sort();
        files.dedup();
        assert!(files.len() >= 2, "{variant}: expected several shards, got {files:?}");
        let n = files.len();
        for (i, file) in files.iter().enumerate() {
            assert_eq!(file, &format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        }
        let shards = shard_contents(&out, &files);
        let mut stored = 0;
        let mut count = 0;
        for (file, tensors) in &shards {
            for (name, len) in tensors {
                assert_eq!(weight_map[name].as_str(), Some(file.as_str()), "{name}");
                stored += len;
                count += 1;
            }
        }
        assert_eq!(count, weight_map.len());
        assert_eq!(index["metadata"]["total_size"].as_u64(), Some(stored as u64));

        // The files a model folder needs.
        for file in [
            "config.json",
            "processor_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            assert!(out.join(file).is_file(), "{variant}: no {file}");
        }

        // The loader refuses missing, extra and misshaped tensors: this load is the real check.
        let dir = dsvl2_config::ModelDir::open(&out).unwrap();
        let reference = dsvl2_config::ModelDir::open(fixtures().join("models").join(variant)).unwrap();
        assert_eq!(dir.config, reference.config);
        assert_eq!(
            dir.processor.candidate_resolutions,
            reference.processor.candidate_resolutions
        );
        assert_eq!(dir.processor.patch_size, reference.processor.patch_size);
        assert_eq!(dir.processor.downsample_ratio, reference.processor.downsample_ratio);
        dsvl2_model::DeepseekVl2::load(&dir, &dsvl2_model::Device::Cpu, dsvl2_model::DType::F32)
            .unwrap_or_else(|e| panic!("{variant}: the random checkpoint does not load: {e}"));

        // And the whole pipeline runs on it.
        let model = out.to_string_lossy().into_owned();
        let image = fixture("images/small_photo.png");
        let answer = dsvl2(&[
            "generate",
            "--model",
            &model,
            "--prompt",
            "<image>\nDescribe.",
            "--image",
            &image,
            "--temperature",
            "0",
            "--max-new-tokens",
            "3",
            "--json",
        ]);
        assert_ok(&answer, "generate on the random checkpoint");
        let report: Value = serde_json::from_slice(&answer.stdout).unwrap();
        let tokens = report["output_tokens"].as_array().unwrap();
        assert!(!tokens.is_empty() && tokens.len() <= 3, "{report}");
    }
}

#[test]
fn random_checkpoint_is_deterministic_from_the_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let shard = "model-00001-of-00001.safetensors";
    let read = |name: &str| std::fs::read(tmp.path().join(name).join(shard)).unwrap();
    for (name, seed) in [("a", "3"), ("b", "3"), ("c", "4")] {
        assert_ok(
            &random_model("tiny-like", &tmp.path().join(name), &["--seed", seed]),
            "random-model",
        );
    }
    assert_eq!(read("a"), read("b"));
    assert_ne!(read("a"), read("c"));
}

#[test]
fn random_model_bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let config = fixture("models/tiny-like/config.json");
    let out = tmp.path().join("out").to_string_lossy().into_owned();

    // A tokenizer folder without tokenizer.json.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let no_tokenizer = dsvl2(&[
        "random-model",
        "--config",
        &config,
        "--tokenizer",
        &empty.to_string_lossy(),
        "--out",
        &out,
    ]);
    assert_clear_error(&no_tokenizer, "tokenizer.json");
    assert!(!Path::new(&out).exists(), "nothing is written on error");

    // An unknown preset.
    let tokenizer = fixture("models/tiny-like");
    let unknown = dsvl2(&[
        "random-model",
        "--preset",
        "huge",
        "--tokenizer",
        &tokenizer,
        "--out",
        &out,
    ]);
    assert_clear_error(&unknown, "huge");
    assert!(stderr(&unknown).contains("tiny"), "the valid presets are listed");

    // Neither --preset nor --config, or both.
    assert_clear_error(
        &dsvl2(&["random-model", "--tokenizer", &tokenizer, "--out", &out]),
        "--preset",
    );
    assert_clear_error(
        &dsvl2(&[
            "random-model",
            "--preset",
            "tiny",
            "--config",
            &config,
            "--tokenizer",
            &tokenizer,
            "--out",
            &out,
        ]),
        "--config",
    );

    // A config our parser refuses.
    let bad_config = tmp.path().join("bad.json");
    std::fs::write(&bad_config, r#"{"model_type": "llama"}"#).unwrap();
    assert_clear_error(
        &dsvl2(&[
            "random-model",
            "--config",
            &bad_config.to_string_lossy(),
            "--tokenizer",
            &tokenizer,
            "--out",
            &out,
        ]),
        "model_type",
    );

    // A non-empty --out is refused without --force, and replaced with it.
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("notes.txt"), "keep me").unwrap();
    assert_clear_error(&random_model("tiny-like", &full, &[]), "--force");
    assert_ok(&random_model("tiny-like", &full, &["--force"]), "random-model --force");
    assert_eq!(std::fs::read_to_string(full.join("notes.txt")).unwrap(), "keep me");
    dsvl2_config::ModelDir::open(&full).unwrap();

    // --out is a file.
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    assert_clear_error(&random_model("tiny-like", &file, &[]), "not a folder");
}

/// Runs `bench --json` on the tiny-like fixture and checks every field.
fn bench_report(extra: &[&str]) -> Value {
    let model = fixture("models/tiny-like");
    let image = fixture("images/small_photo.png");
    let mut args = vec![
        "bench",
        "--model",
        &model,
        "--image",
        &image,
        "--prompt",
        "<image>\nDescribe.",
        "--max-new-tokens",
        "4",
        "--batch",
        "1,2",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = dsvl2(&args);
    assert_ok(&out, "bench");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.trim().lines().count(), 1, "one JSON object: {text}");
    serde_json::from_str(&text).unwrap()
}

fn positive(report: &Value, key: &str) -> f64 {
    let v = report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {report}"));
    assert!(v.is_finite() && v > 0.0, "`{key}` = {v}");
    v
}

fn check_bench_report(report: &Value, dtype: &str, kv_cache: &str) {
    assert!(report["model"].as_str().unwrap().contains("tiny-like"));
    assert_eq!(report["dtype"], dtype);
    assert_eq!(report["kv_cache"], kv_cache);
    assert_eq!(
        report["weights_memory"], "converted",
        "a folder's weights are converted at load"
    );
    assert!(report["cpu_features"].is_string());
    for key in [
        "threads",
        "load_s",
        "preprocess_s",
        "vision_s",
        "vision_tiles",
        "vision_gflops",
        "prefill_tokens",
        "prefill_s",
        "prefill_gflops",
        "decode_s",
        "decode_bytes_per_token",
        "peak_rss_bytes",
        "weight_bytes",
        "total_params",
        "activated_language_params",
        "mem_bandwidth_gbps",
        "fma_peak_gflops",
        "decode_roofline_ratio",
        "decode_cache_bytes_per_token",
        "decode_memory_ratio",
        "vision_peak_ratio",
        "prefill_peak_ratio",
        "request_s",
        "process_to_last_token_s",
    ] {
        positive(report, key);
    }
    // The bandwidth is probed right before and right after the batch-1 decode where the peak RSS can
    // be kept apart from the probe (Linux), otherwise once at the end; the reported figure is
    // their mean.
    let probes: Vec<f64> = report["mem_bandwidth_probes_gbps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_f64().unwrap())
        .collect();
    let expected = if cfg!(target_os = "linux") { 2 } else { 1 };
    assert_eq!(probes.len(), expected, "{probes:?}");
    assert!(probes.iter().all(|g| g.is_finite() && *g > 0.0), "{probes:?}");
    let mean = probes.iter().sum::<f64>() / probes.len() as f64;
    assert!((positive(report, "mem_bandwidth_gbps") - mean).abs() < 1e-9);
    // The probes' 1 GiB buffer is left out of the peak memory (the fixture model needs far less).
    let peak = positive(report, "peak_rss_bytes");
    assert!(
        peak < (1u64 << 30) as f64,
        "peak RSS {peak} includes the bandwidth probe"
    );
    // small_photo (225x154) -> global view + 1x1 local tile.
    assert_eq!(report["vision_tiles"], 2);
    assert_eq!(report["decode_tokens"], 4);
    assert_eq!(
        report["output_tokens"].as_array().unwrap().len(),
        4,
        "EOS does not stop the bench"
    );
    let rates = report["decode_tokens_per_s"].as_object().unwrap();
    assert_eq!(rates.keys().collect::<Vec<_>>(), ["1", "2"]);
    let distinct = report["decode_distinct_tokens_per_s"].as_object().unwrap();
    assert_eq!(
        distinct.keys().collect::<Vec<_>>(),
        ["2"],
        "batch 1 has no distinct variant"
    );
    for rate in rates.values().chain(distinct.values()) {
        assert!(
            rate.as_f64().unwrap().is_finite() && rate.as_f64().unwrap() > 0.0,
            "{rates:?} {distinct:?}"
        );
    }
    // The stage times add up to the request; the process ran at least that long.
    let stages: f64 = ["preprocess_s", "vision_s", "prefill_s", "decode_s"]
        .iter()
        .map(|k| positive(report, k))
        .sum();
    assert!((positive(report, "request_s") - stages).abs() < 1e-6);
    assert!(positive(report, "process_to_last_token_s") >= stages);
    assert!(positive(report, "decode_bytes_per_token") <= positive(report, "weight_bytes"));
    // tiny-like: 3 layers of keys and values, 4 heads of 16 values each; i8 rows carry an f32 scale
    // per head. A timed step attends to the prompt, the tokens before it and its own.
    let per_position = 3.0
        * 2.0
        * match kv_cache {
            "f32" => 4.0 * 64.0,
            "f16" => 2.0 * 64.0,
            "i8" => 64.0 + 4.0 * 4.0,
            other => panic!("unexpected cache format {other}"),
        };
    let prompt = positive(report, "prefill_tokens");
    let mean_positions = (prompt + 1.0 + prompt + positive(report, "decode_tokens") - 1.0) / 2.0;
    assert_eq!(
        positive(report, "decode_cache_bytes_per_token"),
        (per_position * mean_positions).round()
    );
    let ratio = |key: &str| positive(report, key) / positive(report, "decode_bytes_per_token");
    assert!(
        (positive(report, "decode_memory_ratio") / positive(report, "decode_roofline_ratio")
            - (1.0 + ratio("decode_cache_bytes_per_token")))
        .abs()
            < 1e-9
    );
}

#[test]
fn bench_reports_every_field_on_the_fixture_model() {
    check_bench_report(&bench_report(&[]), "f32", "f32");
}

#[test]
fn bench_reports_every_field_with_f16_weights() {
    let report = bench_report(&["--dtype", "f16"]);
    check_bench_report(&report, "f16", "f16");
}

#[test]
fn bench_runs_with_an_i8_cache() {
    let report = bench_report(&["--kv-cache", "i8"]);
    check_bench_report(&report, "f32", "i8");
}

#[test]
fn bench_bad_input_is_a_clear_error() {
    let model = fixture("models/tiny-like");
    let base = ["bench", "--model", &model, "--prompt", "Hi"];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        dsvl2(&args)
    };
    assert_clear_error(&with(&["--max-new-tokens", "1"]), "max-new-tokens");
    assert_clear_error(&with(&["--batch", "0"]), "batch");
    assert_clear_error(&with(&["--dtype", "f64"]), "f64");
    assert_clear_error(&with(&["--kv-cache", "i4"]), "i4");
    assert_clear_error(&with(&["--image", "/nonexistent/x.png"]), "x.png");
    assert_clear_error(&with(&["--max-new-tokens", "5000"]), "context");
}
