//! Model folders: the three fixture variants, the official defaults, and errors naming file and key.

use std::path::{Path, PathBuf};

use dsvl2_config::{ModelConfig, ModelDir, ProcessorConfig, ScoringFunc, TopkMethod, WeightFiles};

fn fixture_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

#[test]
fn fixture_variants_parse_with_their_paths() {
    let tiny = ModelDir::open(fixture_model("tiny-like")).unwrap();
    let l = &tiny.config.language;
    assert!(!l.use_mla);
    assert_eq!((l.hidden_size, l.num_hidden_layers, l.mha_head_dim()), (64, 3, 16));
    let moe = l.moe.as_ref().unwrap();
    assert_eq!(
        (moe.topk_method, moe.scoring_func, moe.num_experts_per_tok),
        (TopkMethod::Greedy, ScoringFunc::Softmax, 2)
    );
    assert!(!l.is_moe_layer(0) && l.is_moe_layer(1) && l.is_moe_layer(2));
    assert!(matches!(tiny.weights, WeightFiles::Single(_)));
    assert_eq!(tiny.config.vision.mlp_hidden(), 179);
    assert_eq!(tiny.config.candidate_resolutions.len(), 23);
    assert_eq!(tiny.tokenizer.bos_token.as_deref(), Some("<｜begin▁of▁sentence｜>"));
    assert_eq!(tiny.tokenizer.eos_token.as_deref(), Some("<｜end▁of▁sentence｜>"));

    let small = ModelDir::open(fixture_model("small-like")).unwrap();
    let l = &small.config.language;
    assert!(l.use_mla);
    assert_eq!(
        (
            l.kv_lora_rank,
            l.q_lora_rank,
            l.qk_rope_head_dim,
            l.qk_nope_head_dim,
            l.v_head_dim
        ),
        (32, None, 8, 16, 16)
    );
    match &small.weights {
        WeightFiles::Sharded { shards, weight_map, .. } => {
            assert_eq!(shards.len(), 2);
            assert!(weight_map.contains_key("language.lm_head.weight"));
        }
        other => panic!("expected shards, got {other:?}"),
    }

    let base = ModelDir::open(fixture_model("base-like")).unwrap();
    let moe = base.config.language.moe.as_ref().unwrap();
    assert_eq!(
        (moe.topk_method, moe.scoring_func),
        (TopkMethod::NoauxTc, ScoringFunc::Sigmoid)
    );
    assert!(moe.norm_topk_prob);
    assert_eq!(moe.routed_scaling_factor, 2.0);
    assert_eq!(base.config.torch_dtype.as_deref(), Some("bfloat16"));

    let p = &tiny.processor;
    assert_eq!(
        (p.image_size(), p.tokens_per_side(), p.pad_color()),
        (384, 14, [127, 127, 127])
    );
}

#[test]
fn absent_keys_take_the_official_defaults() {
    let cfg = ModelConfig::from_json(r#"{"tile_tag": "2D", "vision_config": {"width": 1152}, "language_config": {"n_routed_experts": 64, "num_experts_per_tok": 6}, "projector_config": {"n_embed": 4096}}"#, Path::new("config.json")).unwrap();
    let l = &cfg.language;
    // configuration_deepseek.py DeepseekV2Config.__init__
    assert_eq!(
        (l.vocab_size, l.hidden_size, l.intermediate_size, l.num_hidden_layers),
        (102400, 4096, 11008, 30)
    );
    assert_eq!(
        (l.num_attention_heads, l.num_key_value_heads, l.max_position_embeddings),
        (32, 32, 2048)
    );
    assert_eq!(
        (
            l.kv_lora_rank,
            l.q_lora_rank,
            l.qk_rope_head_dim,
            l.v_head_dim,
            l.qk_nope_head_dim
        ),
        (512, Some(1536), 64, 128, 128)
    );
    assert!(l.use_mla);
    assert_eq!(
        (l.bos_token_id, l.eos_token_id, l.rms_norm_eps, l.rope_theta),
        (Some(100000), Some(100001), 1e-6, 10000.0)
    );
    let moe = l.moe.as_ref().unwrap();
    assert_eq!(
        (
            moe.moe_intermediate_size,
            moe.n_shared_experts,
            moe.first_k_dense_replace,
            moe.moe_layer_freq
        ),
        (1407, 0, 0, 1)
    );
    assert_eq!(
        (
            moe.topk_method,
            moe.scoring_func,
            moe.norm_topk_prob,
            moe.routed_scaling_factor
        ),
        (TopkMethod::Greedy, ScoringFunc::Softmax, false, 1.0)
    );
    // VisionEncoderConfig / MlpProjectorConfig defaults.
    assert_eq!(
        (
            cfg.vision.layers,
            cfg.vision.heads,
            cfg.vision.patch_size,
            cfg.vision.image_size
        ),
        (24, 16, 16, 384)
    );
    assert_eq!(
        (
            cfg.projector.input_dim,
            cfg.projector.depth,
            cfg.projector.downsample_ratio
        ),
        (1152, 2, 2)
    );
    assert_eq!(cfg.candidate_resolutions, vec![[384, 384]]);
}

#[test]
fn errors_name_the_file_and_key() {
    let path = Path::new("/models/x/config.json");
    let err = ModelConfig::from_json(r#"{"tile_tag": "2D", "language_config": {"hidden_size": "big"}}"#, path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/models/x/config.json") && err.contains("language_config.hidden_size"),
        "{err}"
    );

    let err = ModelConfig::from_json(r#"{"tile_tag": "1D"}"#, path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tile_tag"), "{err}");

    let err = ModelConfig::from_json(r#"{"tile_tag": "2D", "vision_config": {"width": 1152}, "language_config": {"hidden_act": "gelu"}, "projector_config": {"n_embed": 4096}}"#, path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`language_config.hidden_act` = gelu is not supported"),
        "{err}"
    );

    let err = ModelConfig::from_json(r#"{"tile_tag": "2D", "vision_config": {"width": 1152}, "projector_config": {"n_embed": 4096}, "language_config": {"use_mla": true, "kv_lora_rank": null}}"#, path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("language_config.kv_lora_rank"), "{err}");

    let err = ProcessorConfig::from_json(
        r#"{"candidate_resolutions": [[384, 384], [384, 700]], "patch_size": 14, "downsample_ratio": 2}"#,
        Path::new("processor_config.json"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("candidate_resolutions[1]") && err.contains("[384, 700]"),
        "{err}"
    );
}

#[test]
fn missing_and_malformed_files_are_named() {
    let dir = copy_dir(&fixture_model("small-like"));
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(err.ends_with("missing tokenizer.json"), "{err}");

    let dir = copy_dir(&fixture_model("small-like"));
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("model-00002-of-00002.safetensors (named by model.safetensors.index.json"),
        "{err}"
    );

    let dir = copy_dir(&fixture_model("tiny-like"));
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("missing weights (model.safetensors or model.safetensors.index.json)"),
        "{err}"
    );

    let dir = copy_dir(&fixture_model("tiny-like"));
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let err = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("config.json: invalid JSON"), "{err}");

    let err = ModelDir::open("/nonexistent/model").unwrap_err().to_string();
    assert!(err.contains("/nonexistent/model"), "{err}");
}
