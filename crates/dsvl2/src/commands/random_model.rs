//! `dsvl2 random-model`: writes a full-size checkpoint in the official Hugging Face layout of
//! deepseek-ai/deepseek-vl2{-tiny,-small,} with random bf16 weights, so speed can be measured
//! without downloading the real weights (timing does not depend on weight values).
//!
//! The tensor list comes from one function, [`checkpoint_tensors`], derived from the parsed
//! `config.json` exactly as the loader (dsvl2-model) asks for tensors, so any config works and the
//! written folder loads with no missing, extra or misshaped tensors.
//!
//! Values are deterministic from `--seed`: every tensor is cut into fixed-size chunks, each chunk
//! has its own generator seeded from (seed, tensor index, chunk index), so the parallel (rayon)
//! generation gives the same bytes whatever the thread count. Tensors are generated one at a time
//! and handed to a writer thread, so peak memory stays around two of the largest tensors.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::{bail, Context};
use dsvl2_config::files::{
    CONFIG_FILE, PROCESSOR_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
    WEIGHTS_INDEX_FILE,
};
use dsvl2_config::{ModelConfig, ProcessorConfig, TopkMethod};
use rayon::prelude::*;
use serde_json::{json, Value};

/// Shards are cut at about this many bytes (the official checkpoints use ~4 GB shards).
pub const DEFAULT_SHARD_BYTES: u64 = 4_000_000_000;

/// Standard deviation of the random matrices, embeddings and vectors (the reference's
/// `initializer_range`).
const STD: f32 = 0.02;

/// Elements per independently seeded chunk (determinism does not depend on the thread count).
const CHUNK: usize = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// deepseek-ai/deepseek-vl2-tiny: 3.37 B parameters, MHA, 64 routed experts.
    Tiny,
    /// deepseek-ai/deepseek-vl2-small: 16.1 B parameters, MLA, 64 routed experts.
    Small,
    /// deepseek-ai/deepseek-vl2: 27.5 B parameters, MLA, 72 routed experts, sigmoid router.
    Base,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("shape").required(true).args(["preset", "config"])))]
pub struct RandomModelArgs {
    /// Official model whose config.json to write. Exclusive with --config.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,

    /// Use this config.json (official layout) instead of a preset; it is copied unchanged.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Folder with the tokenizer to copy: tokenizer.json (required), tokenizer_config.json and
    /// special_tokens_map.json (copied when present).
    #[arg(long, value_name = "DIR")]
    pub tokenizer: PathBuf,

    /// Output folder (created). Must not exist or be empty, unless --force.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Seed of the random weights: the same seed and config give the same files. Default: 0.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,

    /// Write into a non-empty --out, replacing config, tokenizer and weight files there.
    #[arg(long)]
    pub force: bool,

    /// Largest shard size in bytes (a single larger tensor gets a shard of its own).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_SHARD_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub shard_size: u64,
}

/// How a tensor is filled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Approximately normal (Irwin-Hall of 4 uniforms), mean 0, this standard deviation.
    Normal(f32),
    /// Every element this value (norm weights 1, biases 0).
    Const(f32),
}

/// Which part of the model a tensor belongs to (for parameter accounting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Vision,
    Projector,
    /// `image_newline`, `view_seperator`.
    Layout,
    Embedding,
    /// Attention, norms, dense MLPs, shared experts and routers of the decoder layers.
    Decoder,
    /// One routed expert's weights: used by `num_experts_per_tok` of `n_routed_experts` per token.
    RoutedExpert,
    LmHead,
}

/// One checkpoint tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    pub part: Part,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Collects tensor specs in load order.
struct Specs(Vec<TensorSpec>);

impl Specs {
    fn tensor(&mut self, name: String, shape: &[usize], init: Init, part: Part) {
        self.0.push(TensorSpec {
            name,
            shape: shape.to_vec(),
            init,
            part,
        });
    }

    /// `{prefix}.weight` `[out, in]` (random), `{prefix}.bias` `[out]` (zeros) when `bias`.
    fn linear(&mut self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool, part: Part) {
        self.tensor(format!("{prefix}.weight"), &[out_dim, in_dim], Init::Normal(STD), part);
        if bias {
            self.tensor(format!("{prefix}.bias"), &[out_dim], Init::Const(0.0), part);
        }
    }

    /// LayerNorm: weight ones, bias zeros.
    fn layer_norm(&mut self, prefix: &str, dim: usize, part: Part) {
        self.tensor(format!("{prefix}.weight"), &[dim], Init::Const(1.0), part);
        self.tensor(format!("{prefix}.bias"), &[dim], Init::Const(0.0), part);
    }

    /// RMSNorm: weight ones.
    fn rms_norm(&mut self, prefix: &str, dim: usize, part: Part) {
        self.tensor(format!("{prefix}.weight"), &[dim], Init::Const(1.0), part);
    }

    /// SwiGLU MLP (`gate_proj`, `up_proj`, `down_proj`, no biases).
    fn mlp(&mut self, prefix: &str, hidden: usize, inter: usize, part: Part) {
        self.linear(&format!("{prefix}.gate_proj"), hidden, inter, false, part);
        self.linear(&format!("{prefix}.up_proj"), hidden, inter, false, part);
        self.linear(&format!("{prefix}.down_proj"), inter, hidden, false, part);
    }
}

/// Every tensor the loader reads for `cfg`, with its official name and shape, in load order.
/// (The optional, unused SigLIP pooling head `vision.attn_pool.*` is not written.)
pub fn checkpoint_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let mut s = Specs(Vec::new());
    let normal = Init::Normal(STD);

    // Vision tower (timm VisionTransformer, SigLIP).
    let v = &cfg.vision;
    let (w, p, g, hid) = (v.width, v.patch_size, v.grid_size(), v.mlp_hidden());
    let vis = Part::Vision;
    s.tensor("vision.patch_embed.proj.weight".into(), &[w, 3, p, p], normal, vis);
    s.tensor("vision.patch_embed.proj.bias".into(), &[w], Init::Const(0.0), vis);
    s.tensor("vision.pos_embed".into(), &[1, g * g, w], normal, vis);
    for b in 0..v.layers {
        let b = format!("vision.blocks.{b}");
        s.layer_norm(&format!("{b}.norm1"), w, vis);
        s.linear(&format!("{b}.attn.qkv"), w, 3 * w, true, vis);
        s.linear(&format!("{b}.attn.proj"), w, w, true, vis);
        s.layer_norm(&format!("{b}.norm2"), w, vis);
        s.linear(&format!("{b}.mlp.fc1"), w, hid, true, vis);
        s.linear(&format!("{b}.mlp.fc2"), hid, w, true, vis);
    }
    s.layer_norm("vision.norm", w, vis);

    // Projector: Linear, GELU, Linear, ... (Linears at even indices, at least two).
    let pc = &cfg.projector;
    let r = pc.downsample_ratio;
    let p_hidden = pc.n_embed * pc.mlp_ratio;
    let n_linears = pc.depth.max(2);
    for i in 0..n_linears {
        let in_dim = if i == 0 { pc.input_dim * r * r } else { p_hidden };
        let out_dim = if i + 1 == n_linears { pc.n_embed } else { p_hidden };
        let name = format!("projector.layers.{}", 2 * i);
        s.linear(&name, in_dim, out_dim, true, Part::Projector);
    }

    let l = &cfg.language;
    let d = l.hidden_size;
    s.tensor("image_newline".into(), &[d], normal, Part::Layout);
    // [sic]: the official parameter name.
    s.tensor("view_seperator".into(), &[d], normal, Part::Layout);

    // Language model (DeepseekV2).
    s.tensor(
        "language.model.embed_tokens.weight".into(),
        &[l.vocab_size, d],
        normal,
        Part::Embedding,
    );
    let dec = Part::Decoder;
    let bias = l.attention_bias;
    for i in 0..l.num_hidden_layers {
        let lp = format!("language.model.layers.{i}");
        s.rms_norm(&format!("{lp}.input_layernorm"), d, dec);
        let a = format!("{lp}.self_attn");
        if l.use_mla {
            let h = l.num_attention_heads;
            let (nope, rope, vd, rank) = (l.qk_nope_head_dim, l.qk_rope_head_dim, l.v_head_dim, l.kv_lora_rank);
            let q_dim = h * (nope + rope);
            match l.q_lora_rank {
                None => s.linear(&format!("{a}.q_proj"), d, q_dim, false, dec),
                Some(qr) => {
                    s.linear(&format!("{a}.q_a_proj"), d, qr, bias, dec);
                    s.rms_norm(&format!("{a}.q_a_layernorm"), qr, dec);
                    s.linear(&format!("{a}.q_b_proj"), qr, q_dim, false, dec);
                }
            }
            s.linear(&format!("{a}.kv_a_proj_with_mqa"), d, rank + rope, bias, dec);
            s.rms_norm(&format!("{a}.kv_a_layernorm"), rank, dec);
            s.linear(&format!("{a}.kv_b_proj"), rank, h * (nope + vd), false, dec);
            s.linear(&format!("{a}.o_proj"), h * vd, d, bias, dec);
        } else {
            let (h, kv, hd) = (l.num_attention_heads, l.num_key_value_heads, l.mha_head_dim());
            s.linear(&format!("{a}.q_proj"), d, h * hd, bias, dec);
            s.linear(&format!("{a}.k_proj"), d, kv * hd, bias, dec);
            s.linear(&format!("{a}.v_proj"), d, kv * hd, bias, dec);
            s.linear(&format!("{a}.o_proj"), h * hd, d, bias, dec);
        }
        s.rms_norm(&format!("{lp}.post_attention_layernorm"), d, dec);
        match &l.moe {
            Some(moe) if l.is_moe_layer(i) => {
                let inter = moe.moe_intermediate_size;
                for e in 0..moe.n_routed_experts {
                    s.mlp(&format!("{lp}.mlp.experts.{e}"), d, inter, Part::RoutedExpert);
                }
                if moe.n_shared_experts > 0 {
                    s.mlp(
                        &format!("{lp}.mlp.shared_experts"),
                        d,
                        inter * moe.n_shared_experts,
                        dec,
                    );
                }
                // Small router weights: nearly uniform scores, experts chosen roughly uniformly.
                s.tensor(format!("{lp}.mlp.gate.weight"), &[moe.n_routed_experts, d], normal, dec);
                if moe.topk_method == TopkMethod::NoauxTc {
                    let name = format!("{lp}.mlp.gate.e_score_correction_bias");
                    s.tensor(name, &[moe.n_routed_experts], Init::Const(0.0), dec);
                }
            }
            _ => s.mlp(&format!("{lp}.mlp"), d, l.intermediate_size, dec),
        }
    }
    s.rms_norm("language.model.norm", d, dec);
    if !l.tie_word_embeddings {
        s.tensor(
            "language.lm_head.weight".into(),
            &[l.vocab_size, d],
            normal,
            Part::LmHead,
        );
    }
    s.0
}

/// config.json of an official model, in the released key layout.
pub fn preset_config(preset: Preset) -> Value {
    // Keys every released language_config shares.
    let mut language = json!({
        "model_type": "deepseek_v2",
        "architectures": ["DeepseekV2ForCausalLM"],
        "vocab_size": 129280,
        "max_position_embeddings": 4096,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_group": 1,
        "topk_group": 1,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "lm_head": true,
        "rm_head": false,
        "torch_dtype": "bfloat16",
    });
    let specific = match preset {
        Preset::Tiny => json!({
            "hidden_size": 1280,
            "intermediate_size": 6848,
            "moe_intermediate_size": 896,
            "num_hidden_layers": 12,
            "num_attention_heads": 10,
            "num_key_value_heads": 10,
            "n_routed_experts": 64,
            "topk_method": "greedy",
            "use_mla": false,
            "kv_lora_rank": null,
            "q_lora_rank": null,
            "qk_nope_head_dim": 0,
            "qk_rope_head_dim": 0,
            "v_head_dim": 0,
        }),
        Preset::Small => json!({
            "hidden_size": 2048,
            "intermediate_size": 10944,
            "moe_intermediate_size": 1408,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "n_routed_experts": 64,
            "topk_method": "greedy",
            "use_mla": true,
            "kv_lora_rank": 512,
            "q_lora_rank": null,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
        }),
        Preset::Base => json!({
            "hidden_size": 2560,
            "intermediate_size": 12288,
            "moe_intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "n_routed_experts": 72,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": true,
            "routed_scaling_factor": 2.0,
            "use_mla": true,
            "kv_lora_rank": 512,
            "q_lora_rank": null,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
        }),
    };
    let map = language.as_object_mut().expect("object");
    for (k, v) in specific.as_object().expect("object") {
        map.insert(k.clone(), v.clone());
    }
    let hidden = map["hidden_size"].clone();
    json!({
        "architectures": ["DeepseekVLV2ForCausalLM"],
        "model_type": "deepseek_vl_v2",
        "candidate_resolutions": dsvl2_config::OFFICIAL_CANDIDATE_RESOLUTIONS,
        "global_view_pos": "head",
        "tile_tag": "2D",
        "vision_config": {
            "model_type": "vision",
            "model_name": "siglip_so400m_patch14_384",
            "image_size": 384,
            "patch_size": 14,
            "width": 1152,
            "layers": 27,
            "heads": 16,
            "mlp_ratio": 3.7362,
            "global_pool": "map",
            "ignore_head": true,
            "class_token": false,
            "num_classes": 0,
            "use_checkpoint": false,
            "weight_init": "skip",
            "deterministic": false,
        },
        "projector_config": {
            "model_type": "mlp_projector",
            "projector_type": "downsample_mlp_gelu",
            "input_dim": 1152,
            "n_embed": hidden,
            "depth": 2,
            "mlp_ratio": 1,
            "downsample_ratio": 2,
            "token_pooling": false,
        },
        "language_config": language,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.2",
    })
}

/// processor_config.json matching a model config (tile size, patch size and merge ratio from it).
pub fn processor_config(cfg: &ModelConfig) -> Value {
    json!({
        "add_special_token": false,
        "candidate_resolutions": cfg.candidate_resolutions,
        "downsample_ratio": cfg.projector.downsample_ratio,
        "ignore_id": -100,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_token": "<image>",
        "mask_prompt": false,
        "normalize": true,
        "pad_token": "<｜▁pad▁｜>",
        "patch_size": cfg.vision.patch_size,
        "processor_class": "DeepseekVLV2Processor",
        "sft_format": "deepseek",
    })
}

pub fn run(args: RandomModelArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    // Everything is checked before anything is written.
    let config_text = match (&args.preset, &args.config) {
        (Some(preset), None) => serde_json::to_string_pretty(&preset_config(*preset))? + "\n",
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read --config {}", path.display()))?
        }
        _ => bail!("give exactly one of --preset and --config"),
    };
    let config_name = args.config.clone().unwrap_or_else(|| PathBuf::from(CONFIG_FILE));
    let config = ModelConfig::from_json(&config_text, &config_name).context("invalid model config")?;
    let processor_text = serde_json::to_string_pretty(&processor_config(&config))? + "\n";
    ProcessorConfig::from_json(&processor_text, Path::new(PROCESSOR_CONFIG_FILE))
        .context("the derived processor config is invalid")?;

    let tokenizer_json = args.tokenizer.join(TOKENIZER_FILE);
    if !tokenizer_json.is_file() {
        bail!(
            "--tokenizer {}: no {TOKENIZER_FILE} there (a folder with tokenizer.json, and optionally \
             tokenizer_config.json and special_tokens_map.json, is needed)",
            args.tokenizer.display()
        );
    }
    check_tokenizer(&tokenizer_json, &config)?;
    prepare_out_dir(&args.out, args.force)?;

    std::fs::write(args.out.join(CONFIG_FILE), &config_text)?;
    std::fs::write(args.out.join(PROCESSOR_CONFIG_FILE), &processor_text)?;
    for file in [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE] {
        let from = args.tokenizer.join(file);
        if from.is_file() {
            std::fs::copy(&from, args.out.join(file))
                .with_context(|| format!("cannot copy {} into {}", from.display(), args.out.display()))?;
        }
    }

    let specs = checkpoint_tensors(&config);
    let written = write_checkpoint(&args.out, &specs, args.seed, args.shard_size)?;
    let params: usize = specs.iter().map(TensorSpec::numel).sum();
    println!(
        "wrote {}: {} tensors, {:.3} B parameters, {:.2} GB bf16 in {} shard(s), seed {}, {:.1} s",
        args.out.display(),
        specs.len(),
        params as f64 / 1e9,
        written as f64 / 1e9,
        shard_plan(&specs, args.shard_size).len(),
        args.seed,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Warns (the folder still gets written) when the tokenizer cannot work with this config: ids
/// beyond the embedding table, or no image token.
fn check_tokenizer(path: &Path, config: &ModelConfig) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let tok: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let mut max_id = 0u64;
    let mut has_image = false;
    if let Some(vocab) = tok["model"]["vocab"].as_object() {
        max_id = vocab.values().filter_map(Value::as_u64).max().unwrap_or(0);
        has_image |= vocab.contains_key("<image>");
    }
    for added in tok["added_tokens"].as_array().into_iter().flatten() {
        max_id = max_id.max(added["id"].as_u64().unwrap_or(0));
        has_image |= added["content"] == "<image>";
    }
    let vocab = config.language.vocab_size as u64;
    if max_id >= vocab {
        eprintln!(
            "warning: {} has ids up to {max_id}, but the model's vocab_size is {vocab}: prompts using those ids \
             will fail",
            path.display()
        );
    }
    if !has_image {
        eprintln!(
            "warning: {} has no `<image>` token: the processor will refuse it (tests/fixtures/tokenizer-vl2like \
             is a 129 280-id tokenizer with DeepSeek-VL2's special tokens)",
            path.display()
        );
    }
    Ok(())
}

/// Creates `out`, or checks that it is empty; with `force`, removes the files this command writes.
fn prepare_out_dir(out: &Path, force: bool) -> anyhow::Result<()> {
    if out.exists() {
        if !out.is_dir() {
            bail!("--out {} exists and is not a folder", out.display());
        }
        let entries: Vec<PathBuf> = std::fs::read_dir(out)
            .with_context(|| format!("cannot read {}", out.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        if !entries.is_empty() {
            if !force {
                bail!(
                    "--out {} is not empty; pass --force to write into it anyway",
                    out.display()
                );
            }
            for path in entries {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let ours = name == WEIGHTS_INDEX_FILE
                    || (name.starts_with("model") && name.ends_with(".safetensors"))
                    || [
                        CONFIG_FILE,
                        PROCESSOR_CONFIG_FILE,
                        TOKENIZER_FILE,
                        TOKENIZER_CONFIG_FILE,
                        SPECIAL_TOKENS_MAP_FILE,
                    ]
                    .contains(&name);
                if ours && path.is_file() {
                    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
                }
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))
}

/// Tensor indices per shard: in order, a new shard when the next tensor would pass `limit` bytes.
fn shard_plan(specs: &[TensorSpec], limit: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, spec) in specs.iter().enumerate() {
        let bytes = 2 * spec.numel() as u64;
        match shards.last_mut() {
            Some(shard) if size + bytes <= limit => {
                shard.push(i);
                size += bytes;
            }
            _ => {
                shards.push(vec![i]);
                size = bytes;
            }
        }
    }
    shards
}

fn shard_name(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
}

/// The safetensors header (8-byte length, JSON padded with spaces to a multiple of 8).
fn safetensors_header(specs: &[&TensorSpec]) -> Vec<u8> {
    let mut text = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0usize;
    for spec in specs {
        let bytes = 2 * spec.numel();
        let shape: Vec<String> = spec.shape.iter().map(|s| s.to_string()).collect();
        text.push_str(&format!(
            r#",{}:{{"dtype":"BF16","shape":[{}],"data_offsets":[{},{}]}}"#,
            serde_json::to_string(&spec.name).expect("string"),
            shape.join(","),
            offset,
            offset + bytes
        ));
        offset += bytes;
    }
    text.push('}');
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(' ');
    }
    let mut header = (text.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(text.as_bytes());
    header
}

enum Chunk {
    Open(PathBuf, Vec<u8>),
    Data(Vec<u8>),
}

/// Writes the shards and the index; returns the weight bytes written.
fn write_checkpoint(out: &Path, specs: &[TensorSpec], seed: u64, shard_limit: u64) -> anyhow::Result<u64> {
    let plan = shard_plan(specs, shard_limit);
    let total: u64 = specs.iter().map(|s| 2 * s.numel() as u64).sum();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "writing random weights {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed} (eta {eta})",
            )
            .expect("valid template"),
        );
        bar
    });

    // The writer thread writes while the next tensor is generated; at most two buffers wait.
    let (tx, rx) = sync_channel::<Chunk>(2);
    let writer_bar = bar.clone();
    let writer = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut file: Option<(PathBuf, File)> = None;
        for chunk in rx {
            match chunk {
                Chunk::Open(path, header) => {
                    let mut f = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
                    f.write_all(&header)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    file = Some((path, f));
                }
                Chunk::Data(bytes) => {
                    let (path, f) = file.as_mut().expect("a shard is open");
                    f.write_all(&bytes)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    if let Some(bar) = &writer_bar {
                        bar.inc(bytes.len() as u64);
                    }
                }
            }
        }
        Ok(())
    });

    let mut weight_map = serde_json::Map::new();
    let mut send_failed = false;
    'shards: for (s, indices) in plan.iter().enumerate() {
        let name = shard_name(s, plan.len());
        let shard_specs: Vec<&TensorSpec> = indices.iter().map(|&i| &specs[i]).collect();
        if tx
            .send(Chunk::Open(out.join(&name), safetensors_header(&shard_specs)))
            .is_err()
        {
            send_failed = true;
            break;
        }
        for &i in indices {
            weight_map.insert(specs[i].name.clone(), Value::String(name.clone()));
            if tx.send(Chunk::Data(generate_bf16(&specs[i], seed, i as u64))).is_err() {
                send_failed = true;
                break 'shards;
            }
        }
    }
    drop(tx);
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
    written?;
    if send_failed {
        bail!("the writer thread stopped early");
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let index = json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    });
    std::fs::write(
        out.join(WEIGHTS_INDEX_FILE),
        serde_json::to_string_pretty(&index)? + "\n",
    )?;
    Ok(total)
}

/// splitmix64: a fast, well-mixed generator, seeded per chunk.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// f32 to bf16 bits, round to nearest even (finite inputs).
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// The tensor's little-endian bf16 bytes, generated in parallel.
fn generate_bf16(spec: &TensorSpec, seed: u64, tensor: u64) -> Vec<u8> {
    let n = spec.numel();
    let mut bytes = vec![0u8; 2 * n];
    match spec.init {
        Init::Const(c) => {
            let b = bf16_bits(c).to_le_bytes();
            bytes.par_chunks_mut(2 * CHUNK).for_each(|chunk| {
                for pair in chunk.chunks_exact_mut(2) {
                    pair.copy_from_slice(&b);
                }
            });
        }
        Init::Normal(std) => {
            // Irwin-Hall: the sum of 4 uniform 16-bit integers has mean 4 * 32767.5 and variance
            // 4 * (65536^2 - 1) / 12; scaled to the requested std it is close to normal (|x| < 3.47 std).
            let mean = 4.0 * 32767.5f32;
            let scale = std / (4.0f32 * (65536.0f32 * 65536.0 - 1.0) / 12.0).sqrt();
            let base = SplitMix(seed ^ 0x5DEE_CE66_D1CE_5EED).next() ^ SplitMix(tensor).next().rotate_left(17);
            bytes.par_chunks_mut(2 * CHUNK).enumerate().for_each(|(c, chunk)| {
                let mut rng = SplitMix(base ^ SplitMix(c as u64 ^ 0xA5A5_A5A5).next());
                for pair in chunk.chunks_exact_mut(2) {
                    let r = rng.next();
                    let sum = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
                    let x = (sum as f32 - mean) * scale;
                    pair.copy_from_slice(&bf16_bits(x).to_le_bytes());
                }
            });
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_have_the_official_sizes() {
        // Total parameters (without the unused SigLIP pooling head, ~15 M) of the released models.
        for (preset, billions) in [(Preset::Tiny, 3.37), (Preset::Small, 16.1), (Preset::Base, 27.5)] {
            let text = serde_json::to_string(&preset_config(preset)).unwrap();
            let cfg = ModelConfig::from_json(&text, Path::new("config.json")).unwrap();
            let params: usize = checkpoint_tensors(&cfg).iter().map(TensorSpec::numel).sum();
            let b = params as f64 / 1e9;
            assert!((b - billions).abs() / billions < 0.02, "{preset:?}: {b} B parameters");
            ProcessorConfig::from_json(
                &serde_json::to_string(&processor_config(&cfg)).unwrap(),
                Path::new("processor_config.json"),
            )
            .unwrap();
        }
    }

    #[test]
    fn random_values_are_deterministic_and_sane() {
        let spec = TensorSpec {
            name: "x".into(),
            shape: vec![3, 100_000],
            init: Init::Normal(0.02),
            part: Part::Decoder,
        };
        let a = generate_bf16(&spec, 7, 3);
        assert_eq!(a, generate_bf16(&spec, 7, 3));
        assert_ne!(a, generate_bf16(&spec, 8, 3));
        assert_ne!(a, generate_bf16(&spec, 7, 4));
        let values: Vec<f32> = a
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect();
        let n = values.len() as f64;
        let mean = values.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (values.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((std - 0.02).abs() < 1e-3, "std {std}");
        assert_eq!(bf16_bits(1.0), 0x3F80);
        assert_eq!(bf16_bits(0.0), 0);
    }

    #[test]
    fn shards_respect_the_limit() {
        let spec = |n: usize| TensorSpec {
            name: format!("t{n}"),
            shape: vec![n],
            init: Init::Const(0.0),
            part: Part::Decoder,
        };
        let specs = vec![spec(10), spec(10), spec(30), spec(5)];
        assert_eq!(shard_plan(&specs, 40), vec![vec![0, 1], vec![2], vec![3]]);
        assert_eq!(shard_plan(&specs, 1000), vec![vec![0, 1, 2, 3]]);
    }
}
