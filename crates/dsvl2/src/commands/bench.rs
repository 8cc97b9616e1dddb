//! `dsvl2 bench`: one request through the whole pipeline (load, preprocess, vision, prefill,
//! greedy decode of exactly N tokens, EOS ignored), then batched decoding from the same prefilled
//! prompt (copies that decode the same tokens, then copies that sample their own), then the
//! machine's limits (memory bandwidth, FMA peak) measured in the same process, and
//! how close each stage comes to its limit.
//!
//! Order: load, preprocess, vision and prefill; the bandwidth probe (1 GiB buffer); the batch-1
//! decode; the bandwidth probe again; the batches; peak RSS; the FMA probe. The bandwidth is
//! measured right beside the decode it is compared with because the memory bandwidth of the VMs
//! this runs on changes for seconds at a time (a 2-vCPU Zen 4 switched between ~35 and ~55 GB/s
//! every few seconds, pass after pass of the same probe), so a probe at the end can catch another
//! state than the decode saw; `mem_bandwidth_gbps` is the mean of the two. The probes' buffer is kept
//! out of the reported peak RSS by resetting the kernel's peak mark around them (Linux
//! `clear_refs`); where that is not possible, the probe runs once, after the peak is read, and the
//! decode is compared with that. Nothing else runs between a probe and a timed stage, and the
//! probe's time is not counted in `process_to_last_token_s`.
//!
//! Analytic work (documented in `--help` of the fields below and in [`Work`]):
//! * `vision_gflops` = tiles x (patch embed `2*T*(3*p*p)*W` + layers x (`2*T*(W*3W + W*W +
//!   2*W*M)` linears + `2*2*T*T*W` attention scores and mixing) + projector `2*Tp*sum(in*out)`),
//!   with T = (image_size/patch)^2 tokens per tile (729), W the width, M the MLP width, Tp the
//!   merged tokens per tile (196).
//! * `prefill_gflops` = 2 x activated non-embedding language parameters x prompt tokens (routed
//!   experts counted `num_experts_per_tok` times, shared experts, dense MLPs, attention and routers
//!   fully) + causal attention `layers x 2*heads*(qk_dim + v_dim) x n(n+1)/2` + the LM head once
//!   (`2*vocab*hidden`, last position only).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use dsvl2_config::ModelConfig;
use dsvl2_model::sampling::argmax;
use dsvl2_model::{
    check_context, DeepseekVl2, GgufWeights, Sampler, SamplingParams, SequenceCache, SharedPrefix, Tensor,
};
use dsvl2_processor::Conversation;
use rayon::prelude::*;
use serde::Serialize;

use super::random_model::{checkpoint_tensors, Part};
use crate::probe;
use crate::runner::{load_model, open_model, peak_rss_bytes, reset_peak_rss, LoadArgs, DEFAULT_MODEL};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Model: a folder in the official layout or a Hub repo id (see `generate --help`).
    #[arg(long, value_name = "DIR|REPO", default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Image of the request, repeatable, in `<image>` tag order. Default: none (text only).
    #[arg(long = "image", value_name = "PATH")]
    pub images: Vec<PathBuf>,

    /// User prompt; one `<image>` tag per --image.
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,

    /// Tokens to decode, exactly (greedy; the end-of-sentence token does not stop it). At least 2:
    /// the first token comes from the prefill, the rest are timed decode steps.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u64).range(2..))]
    pub max_new_tokens: u64,

    /// Batch sizes to measure decoding at, comma-separated: B > 1 decodes B copies of the
    /// prefilled request together (one batched step per token). Batch 1 is always measured.
    #[arg(long, value_name = "B,...", value_delimiter = ',', default_value = "1", value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: Vec<u64>,

    #[command(flatten)]
    pub load: LoadArgs,

    /// Print one JSON object instead of a table. Default: off.
    #[arg(long)]
    pub json: bool,
}

/// Everything `bench` reports (one JSON object).
#[derive(Serialize, Debug)]
pub struct Report {
    pub model: String,
    /// Weight storage (`--dtype`).
    pub dtype: String,
    /// How the attention cache holds keys and values (`--kv-cache`; MLA caches are always f32).
    pub kv_cache: String,
    /// Where the linear layers' weights are read from while decoding: `mapped` (a GGUF file's
    /// pages, `--mmap`), `copied` (a GGUF file's weights copied at load into 2 MiB pages, the
    /// default here) or `converted` (safetensors, converted at load into the process's memory).
    pub weights_memory: String,
    /// Threads of the compute pool (RAYON_NUM_THREADS or the cores available).
    pub threads: usize,
    pub cpu_features: String,
    /// What runs the large f32 products: "openblas (<its kernel set> kernels)" or "gemm" (see
    /// `dsvl2_kernels::gemm_backend`).
    pub gemm_backend: String,
    pub load_s: f64,
    /// Prompt template, tokenizing, image decoding and tiling.
    pub preprocess_s: f64,
    /// Vision tower, projector and image-token layout (`embed_inputs`).
    pub vision_s: f64,
    pub vision_tiles: usize,
    pub vision_gflops: f64,
    pub prefill_tokens: usize,
    pub prefill_s: f64,
    pub prefill_gflops: f64,
    /// Generated tokens per sequence (the first from the prefill).
    pub decode_tokens: usize,
    /// Batch-1 decode time of the `decode_tokens - 1` steps.
    pub decode_s: f64,
    /// Aggregate tokens/s over the batch, keyed by batch size: B copies of the request decoding the
    /// same tokens, so every step's tokens choose the same experts (the most a batch can share).
    pub decode_tokens_per_s: serde_json::Map<String, serde_json::Value>,
    /// The same for B copies that sample with the hosted defaults, each with its own seed (see
    /// `decode_batch`), so that, like different requests, each sequence picks its own experts: an
    /// MoE step then reads the union of the sequences' experts (keyed by batch size, B > 1).
    pub decode_distinct_tokens_per_s: serde_json::Map<String, serde_json::Value>,
    /// Weight bytes one batch-1 decode step reads (all but the routed experts not chosen).
    pub decode_bytes_per_token: u64,
    /// Attention-cache bytes a batch-1 decode step reads, averaged over the timed steps (every
    /// position so far, in every layer: it grows with the prompt).
    pub decode_cache_bytes_per_token: u64,
    pub peak_rss_bytes: Option<u64>,
    /// Bytes of the weights held in memory (after conversion to `dtype`).
    pub weight_bytes: u64,
    /// Parameters in the checkpoint; activated per token in the language model (non-embedding).
    pub total_params: u64,
    pub activated_language_params: u64,
    /// The mean of `mem_bandwidth_probes_gbps`.
    pub mem_bandwidth_gbps: f64,
    /// The bandwidth probes, each the best of 5 passes over 1 GiB: right before and right after the
    /// batch-1 decode, or one after all timings where the peak RSS could not be kept apart from
    /// the probe's buffer (see the module docs).
    pub mem_bandwidth_probes_gbps: Vec<f64>,
    pub fma_peak_gflops: f64,
    /// Instructions of the FMA probe (`avx2+fma` or `scalar`).
    pub fma_peak_isa: String,
    /// decode_bytes_per_token x tokens/s (batch 1) / bandwidth: the weights alone.
    pub decode_roofline_ratio: f64,
    /// (decode_bytes_per_token + decode_cache_bytes_per_token) x tokens/s (batch 1) / bandwidth:
    /// everything a step must read from memory.
    pub decode_memory_ratio: f64,
    /// (vision_gflops / vision_s) / fma_peak_gflops.
    pub vision_peak_ratio: f64,
    /// (prefill_gflops / prefill_s) / fma_peak_gflops.
    pub prefill_peak_ratio: f64,
    /// One request once loaded: preprocess + vision + prefill + batch-1 decode.
    pub request_s: f64,
    /// From process start to the last batch-1 token.
    pub process_to_last_token_s: f64,
    /// The greedy batch-1 tokens (not meaningful for random weights; for reproducibility).
    pub output_tokens: Vec<u32>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let clock = ProcessClock::start();
    let batches: BTreeSet<usize> = args.batch.iter().map(|&b| b as usize).chain([1]).collect();
    let n = args.max_new_tokens as usize;

    let options = args.load.options(GgufWeights::InMemory);
    let loaded = load_model(open_model(&args.model)?, &options)?;
    let weights_memory = match (&loaded.dir.weights, options.gguf_weights) {
        (dsvl2_config::WeightFiles::Gguf { .. }, GgufWeights::Mapped) => "mapped",
        (dsvl2_config::WeightFiles::Gguf { .. }, GgufWeights::InMemory) => "copied",
        _ => "converted",
    };
    let model = &loaded.model;
    let config = model.config().clone();

    let started = Instant::now();
    let image_token = loaded.processor.config().image_token.clone();
    let mut conversation = Conversation::single_turn(args.prompt.clone(), args.images.clone());
    for note in conversation.insert_missing_image_tags(&image_token) {
        eprintln!("note: {note}");
    }
    let images = loaded.processor.load_images(&conversation)?;
    let prepared = loaded
        .processor
        .prepare(&conversation, &images, "")
        .context("cannot prepare the request")?;
    let preprocess_s = started.elapsed().as_secs_f64();
    let prompt_len = prepared.input_ids.len();
    check_context(
        prompt_len,
        &prepared.num_image_tokens,
        n,
        config.language.max_position_embeddings,
    )?;

    let started = Instant::now();
    let embeds = dsvl2_engine::embed_prepared(model, &prepared)?;
    let vision_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut cache = model.new_cache();
    let logits = model.forward_embeds(&embeds, &mut cache, None)?;
    let first = argmax(&logits.to_vec1::<f32>()?);
    let prefill_s = started.elapsed().as_secs_f64();
    // The batches continue from this copy of the prompt's cache, held once (see `decode_batch`).
    let prefilled = cache.fork()?.share();

    // Batch 1: the request as `generate` runs it, greedy, N tokens, with the memory bandwidth
    // measured right before and right after it (see the module docs).
    let mut peak_rss = PeakRss::default();
    let probe_started = Instant::now();
    let bandwidth_before = peak_rss.excluding(probe::mem_bandwidth_gbps);
    let probe_s = probe_started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut tokens = vec![first];
    while tokens.len() < n {
        let logits = model.step(*tokens.last().expect("non-empty"), &mut cache)?;
        tokens.push(argmax(&logits.to_vec1::<f32>()?));
    }
    let decode_s = started.elapsed().as_secs_f64();
    let process_to_last_token_s = clock.seconds() - probe_s;
    let bandwidth_after = peak_rss.excluding(probe::mem_bandwidth_gbps);
    // The timed steps attended to prompt + 1 ..= cache.len() positions.
    let mean_positions = (prompt_len + 1 + cache.len()) as f64 / 2.0;
    let decode_cache_bytes_per_token = (cache.bytes_per_position() as f64 * mean_positions).round() as u64;
    drop(cache);

    let mut decode_tokens_per_s = serde_json::Map::new();
    let mut decode_distinct_tokens_per_s = serde_json::Map::new();
    let batch1 = (n - 1) as f64 / decode_s.max(1e-9);
    for &b in &batches {
        if b == 1 {
            decode_tokens_per_s.insert(b.to_string(), batch1.into());
            continue;
        }
        let same = decode_batch(model, &prefilled, first, b, None, n)?;
        decode_tokens_per_s.insert(b.to_string(), same.into());
        let distinct = decode_batch(model, &prefilled, first, b, Some(&prepared.input_ids), n)?;
        decode_distinct_tokens_per_s.insert(b.to_string(), distinct.into());
    }
    drop(prefilled);
    let peak_rss = peak_rss.peak();

    let mem_bandwidth_probes_gbps = match (bandwidth_before, bandwidth_after) {
        (Some(before), Some(after)) => vec![before, after],
        _ => vec![probe::mem_bandwidth_gbps()],
    };
    let mem_bandwidth_gbps = mem_bandwidth_probes_gbps.iter().sum::<f64>() / mem_bandwidth_probes_gbps.len() as f64;
    let fma_peak_gflops = probe::fma_peak_gflops();

    let work = Work::new(&config);
    let vision_gflops = work.vision_flops(prepared.n_tiles) / 1e9;
    let prefill_gflops = work.prefill_flops(prompt_len) / 1e9;
    let decode_bytes_per_token = model.decode_bytes_per_token();
    let report = Report {
        model: loaded.dir.root.display().to_string(),
        dtype: stored_dtype(&loaded.dir, args.load.dtype),
        kv_cache: model.language().cache_format().to_string(),
        weights_memory: weights_memory.into(),
        threads: rayon::current_num_threads(),
        cpu_features: probe::cpu_features(),
        gemm_backend: dsvl2_model::gemm_backend(),
        load_s: loaded.load_seconds,
        preprocess_s,
        vision_s,
        vision_tiles: prepared.n_tiles,
        vision_gflops,
        prefill_tokens: prompt_len,
        prefill_s,
        prefill_gflops,
        decode_tokens: n,
        decode_s,
        decode_tokens_per_s,
        decode_distinct_tokens_per_s,
        decode_bytes_per_token,
        decode_cache_bytes_per_token,
        peak_rss_bytes: peak_rss,
        weight_bytes: model.weight_bytes(),
        total_params: work.total_params,
        activated_language_params: work.activated_params,
        mem_bandwidth_gbps,
        mem_bandwidth_probes_gbps,
        fma_peak_gflops,
        fma_peak_isa: probe::fma_isa().to_string(),
        decode_roofline_ratio: decode_bytes_per_token as f64 * batch1 / (mem_bandwidth_gbps * 1e9),
        decode_memory_ratio: (decode_bytes_per_token + decode_cache_bytes_per_token) as f64 * batch1
            / (mem_bandwidth_gbps * 1e9),
        vision_peak_ratio: ratio(vision_gflops, vision_s, fma_peak_gflops),
        prefill_peak_ratio: ratio(prefill_gflops, prefill_s, fma_peak_gflops),
        request_s: preprocess_s + vision_s + prefill_s + decode_s,
        process_to_last_token_s,
        output_tokens: tokens,
    };
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string(&report)?)?;
    } else {
        write!(stdout, "{}", table(&report))?;
    }
    Ok(())
}

/// The process's peak RSS over the model's work, with the memory of probes run between its stages
/// left out (see [`Self::excluding`]).
#[derive(Default)]
struct PeakRss {
    /// The highest peak noted before a reset of the kernel's mark.
    noted: Option<u64>,
}

impl PeakRss {
    /// Runs `probe` so that its memory does not count: notes the peak so far, resets the kernel's
    /// peak mark, runs the probe (which frees its memory before returning) and resets the mark again.
    /// Returns `None`, without running the probe, where the mark cannot be reset.
    fn excluding<T>(&mut self, probe: impl FnOnce() -> T) -> Option<T> {
        let so_far = peak_rss_bytes();
        if !reset_peak_rss() {
            return None;
        }
        self.noted = self.noted.max(so_far);
        let out = probe();
        reset_peak_rss();
        Some(out)
    }

    /// The peak over everything but the probes.
    fn peak(&self) -> Option<u64> {
        self.noted.max(peak_rss_bytes())
    }
}

/// Achieved GFLOP/s over the peak; 0 when the stage did no work.
fn ratio(gflops: f64, seconds: f64, peak: f64) -> f64 {
    if gflops <= 0.0 || seconds <= 0.0 || peak <= 0.0 {
        return 0.0;
    }
    gflops / seconds / peak
}

/// Decodes `batch` copies of the prefilled request together for `n - 1` steps from `first`; returns
/// aggregate tokens/s over the steps after the first batched one (steady state; with a single step,
/// that step).
///
/// Without `sample_after` the copies decode greedily, so they all read the same tokens and choose
/// the same experts. With it (the prompt's ids), copy `i` samples with the hosted defaults and seed
/// `i`, as `serve` would run `batch` requests, and the copies' routes part as far as their tokens
/// do. Measured on tiny with random weights, experts run per MoE layer and step at batch 8: the
/// greedy copies 6; sampled copies after a short text prompt 17-30 (of 64), after the 5-tile image
/// prompt only 6-10, as the random model keeps choosing the same few tokens there.
fn decode_batch(
    model: &DeepseekVl2,
    prefilled: &SharedPrefix,
    first: u32,
    batch: usize,
    sample_after: Option<&[u32]>,
    n: usize,
) -> anyhow::Result<f64> {
    let mut caches: Vec<SequenceCache> = (0..batch).map(|_| prefilled.branch()).collect();
    let mut samplers: Vec<(Sampler, Vec<u32>)> = match sample_after {
        Some(prompt) => (0..batch)
            .map(|i| {
                let params = SamplingParams {
                    seed: i as u64,
                    ..SamplingParams::default()
                };
                (Sampler::new(params), [prompt, &[first]].concat())
            })
            .collect(),
        None => Vec::new(),
    };
    let mut tokens = vec![first; batch];
    let steps = n - 1;
    let mut timed_from = Instant::now();
    let mut timed_steps = 0;
    for step in 0..steps {
        if step == 1 {
            timed_from = Instant::now();
        }
        let mut refs: Vec<&mut SequenceCache> = caches.iter_mut().collect();
        let logits = model.step_batch(&tokens, &mut refs)?;
        tokens = if samplers.is_empty() {
            argmax_rows(&logits)?
        } else {
            // In parallel, as the engine's scheduler samples a batch.
            samplers
                .par_iter_mut()
                .zip(logits.to_vec2::<f32>()?)
                .map(|((sampler, seen), row)| {
                    let token = sampler.next(row, seen);
                    seen.push(token);
                    token
                })
                .collect()
        };
        if step >= 1 || steps == 1 {
            timed_steps += 1;
        }
    }
    Ok((timed_steps * batch) as f64 / timed_from.elapsed().as_secs_f64().max(1e-9))
}

/// Each row's greedy token, rows in parallel (as the engine's scheduler samples a batch).
fn argmax_rows(logits: &Tensor) -> anyhow::Result<Vec<u32>> {
    Ok(logits.to_vec2::<f32>()?.par_iter().map(|row| argmax(row)).collect())
}

/// Analytic work of the stages, from the config (see the module docs for the formulas).
pub struct Work {
    config: ModelConfig,
    /// Every checkpoint parameter (without the unused SigLIP pooling head).
    pub total_params: u64,
    /// Language parameters one token uses, without the embedding table and the LM head.
    pub activated_params: u64,
}

impl Work {
    pub fn new(config: &ModelConfig) -> Self {
        let specs = checkpoint_tensors(config);
        let sum = |part: Part| -> u64 { specs.iter().filter(|s| s.part == part).map(|s| s.numel() as u64).sum() };
        let routed = match &config.language.moe {
            Some(moe) => sum(Part::RoutedExpert) * moe.num_experts_per_tok as u64 / moe.n_routed_experts as u64,
            None => 0,
        };
        Work {
            config: config.clone(),
            total_params: specs.iter().map(|s| s.numel() as u64).sum(),
            activated_params: sum(Part::Decoder) + routed,
        }
    }

    /// Vision tower and projector over `tiles` tiles.
    pub fn vision_flops(&self, tiles: usize) -> f64 {
        let v = &self.config.vision;
        let (t, w, m, p) = (
            (v.grid_size() * v.grid_size()) as f64,
            v.width as f64,
            v.mlp_hidden() as f64,
            v.patch_size as f64,
        );
        let patch_embed = 2.0 * t * (3.0 * p * p) * w;
        let per_layer = 2.0 * t * (w * 3.0 * w + w * w + 2.0 * w * m) + 2.0 * 2.0 * t * t * w;
        let pc = &self.config.projector;
        let merged = v.grid_size().div_ceil(pc.downsample_ratio);
        let hidden = (pc.n_embed * pc.mlp_ratio) as f64;
        let n_linears = pc.depth.max(2);
        let projector_macs: f64 = (0..n_linears)
            .map(|i| {
                let r = pc.downsample_ratio;
                let i_dim = if i == 0 { (pc.input_dim * r * r) as f64 } else { hidden };
                let o_dim = if i + 1 == n_linears { pc.n_embed as f64 } else { hidden };
                i_dim * o_dim
            })
            .sum();
        let projector = 2.0 * (merged * merged) as f64 * projector_macs;
        tiles as f64 * (patch_embed + v.layers as f64 * per_layer + projector)
    }

    /// Prefill of `tokens` positions from an empty cache, logits for the last one.
    pub fn prefill_flops(&self, tokens: usize) -> f64 {
        let l = &self.config.language;
        let n = tokens as f64;
        let (qk, v) = if l.use_mla {
            (l.qk_nope_head_dim + l.qk_rope_head_dim, l.v_head_dim)
        } else {
            (l.mha_head_dim(), l.mha_head_dim())
        };
        let attention =
            l.num_hidden_layers as f64 * 2.0 * l.num_attention_heads as f64 * (qk + v) as f64 * n * (n + 1.0) / 2.0;
        let lm_head = 2.0 * (l.vocab_size * l.hidden_size) as f64;
        2.0 * self.activated_params as f64 * n + attention + lm_head
    }
}

/// The readable report: one aligned row per value.
fn table(r: &Report) -> String {
    let mut rows: Vec<(String, String)> = vec![
        ("model".into(), r.model.clone()),
        ("dtype".into(), r.dtype.clone()),
        ("kv cache".into(), r.kv_cache.clone()),
        ("weights memory".into(), r.weights_memory.clone()),
        ("threads".into(), r.threads.to_string()),
        ("cpu features".into(), r.cpu_features.clone()),
        ("gemm backend".into(), r.gemm_backend.clone()),
        ("load".into(), format!("{:.3} s", r.load_s)),
        ("preprocess".into(), format!("{:.3} s", r.preprocess_s)),
        (
            "vision".into(),
            format!(
                "{:.3} s  {} tiles, {:.1} GFLOP, {:.1} GFLOP/s ({:.0}% of peak)",
                r.vision_s,
                r.vision_tiles,
                r.vision_gflops,
                r.vision_gflops / r.vision_s.max(1e-9),
                100.0 * r.vision_peak_ratio
            ),
        ),
        (
            "prefill".into(),
            format!(
                "{:.3} s  {} tokens, {:.1} GFLOP, {:.1} GFLOP/s ({:.0}% of peak)",
                r.prefill_s,
                r.prefill_tokens,
                r.prefill_gflops,
                r.prefill_gflops / r.prefill_s.max(1e-9),
                100.0 * r.prefill_peak_ratio
            ),
        ),
        (
            "decode (batch 1)".into(),
            format!(
                "{:.3} s  {} tokens, {:.1} MB/token of weights ({:.0}% of bandwidth), + {:.1} MB of cache ({:.0}%)",
                r.decode_s,
                r.decode_tokens,
                r.decode_bytes_per_token as f64 / 1e6,
                100.0 * r.decode_roofline_ratio,
                r.decode_cache_bytes_per_token as f64 / 1e6,
                100.0 * r.decode_memory_ratio
            ),
        ),
    ];
    for (b, rate) in &r.decode_tokens_per_s {
        rows.push((
            format!("decode batch {b}"),
            format!("{:.2} tokens/s", rate.as_f64().unwrap_or(f64::NAN)),
        ));
        if let Some(distinct) = r.decode_distinct_tokens_per_s.get(b) {
            rows.push((
                format!("decode batch {b}, distinct"),
                format!("{:.2} tokens/s", distinct.as_f64().unwrap_or(f64::NAN)),
            ));
        }
    }
    rows.extend([
        ("request".into(), format!("{:.3} s", r.request_s)),
        (
            "process to last token".into(),
            format!("{:.3} s", r.process_to_last_token_s),
        ),
        (
            "weights".into(),
            format!(
                "{:.2} GB in memory, {:.3} B parameters ({:.3} B activated per token)",
                r.weight_bytes as f64 / 1e9,
                r.total_params as f64 / 1e9,
                r.activated_language_params as f64 / 1e9
            ),
        ),
        (
            "peak memory".into(),
            r.peak_rss_bytes
                .map_or("unknown".into(), |b| format!("{:.2} GB", b as f64 / 1e9)),
        ),
        (
            "memory bandwidth".into(),
            format!(
                "{:.1} GB/s  (probes: {})",
                r.mem_bandwidth_gbps,
                r.mem_bandwidth_probes_gbps
                    .iter()
                    .map(|g| format!("{g:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        (
            "FMA peak".into(),
            format!("{:.1} GFLOP/s ({})", r.fma_peak_gflops, r.fma_peak_isa),
        ),
    ]);
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{k:<width$}  {v}\n")).collect()
}

/// Seconds since the process started: /proc (Linux), else since `main` began.
struct ProcessClock {
    /// Process age when `at` was taken.
    offset: f64,
    at: Instant,
}

impl ProcessClock {
    fn start() -> Self {
        let at = Instant::now();
        let offset = probe::seconds_since_process_start()
            .unwrap_or_else(|| at.saturating_duration_since(probe::main_started()).as_secs_f64());
        ProcessClock { offset, at }
    }

    fn seconds(&self) -> f64 {
        self.offset + self.at.elapsed().as_secs_f64()
    }
}

/// The weight format the report names: `--dtype` for a model folder; for a GGUF (whose formats were
/// fixed when it was written) the format holding most of its bytes, e.g. `q8_0 (gguf)`.
fn stored_dtype(dir: &dsvl2_config::ModelDir, requested: dsvl2_model::Format) -> String {
    let dsvl2_config::WeightFiles::Gguf { tensors, .. } = &dir.weights else {
        return requested.to_string();
    };
    let mut bytes_by_type = std::collections::BTreeMap::<u32, u64>::new();
    for t in tensors {
        *bytes_by_type.entry(t.ggml_type).or_default() += t.nbytes;
    }
    let dominant = bytes_by_type
        .into_iter()
        .max_by_key(|&(_, bytes)| bytes)
        .map(|(t, _)| t);
    match dominant.and_then(dsvl2_model::Format::from_ggml_type) {
        Some(format) => format!("{format} (gguf)"),
        None => "gguf".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixture_config(variant: &str) -> ModelConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(variant)
            .join("config.json");
        ModelConfig::from_file(&path).unwrap()
    }

    #[test]
    fn vision_flops_follow_the_formula() {
        let cfg = fixture_config("tiny-like");
        let work = Work::new(&cfg);
        // width 48, 2 layers, MLP 179, 729 tokens, 14x14 patches; projector 192 -> 64 -> 64 on 196 tokens.
        let (t, w, m) = (729.0, 48.0, 179.0);
        let per_tile = 2.0 * t * 588.0 * w
            + 2.0 * (2.0 * t * (w * 3.0 * w + w * w + 2.0 * w * m) + 4.0 * t * t * w)
            + 2.0 * 196.0 * (192.0 * 64.0 + 64.0 * 64.0);
        assert!((work.vision_flops(3) - 3.0 * per_tile).abs() < 1.0);
    }

    #[test]
    fn activated_parameters_count_chosen_experts_only() {
        let cfg = fixture_config("tiny-like");
        let work = Work::new(&cfg);
        // hidden 64, 3 layers (layer 0 dense 160), MoE: 8 experts of 32, top 2, 2 shared; MHA 4x16.
        let d = 64;
        let attention = 4 * d * d;
        let norms = 2 * d;
        let dense = 3 * d * 160;
        let moe = 2 * 3 * d * 32 + 3 * d * 64 + 8 * d;
        let expected = 3 * (attention + norms) + dense + 2 * moe + d;
        assert_eq!(work.activated_params, expected as u64);
        let flops = work.prefill_flops(10);
        let attn = 3.0 * 2.0 * 4.0 * 32.0 * 55.0;
        assert!((flops - (2.0 * expected as f64 * 10.0 + attn + 2.0 * 3008.0 * 64.0)).abs() < 1.0);
    }
}
