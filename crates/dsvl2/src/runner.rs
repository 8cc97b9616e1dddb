//! What `generate` and `chat` share: loading a model with a progress bar, and answering one
//! prepared prompt (vision, prefill over what the cache lacks, decoding with stop strings,
//! streaming text to a sink).

use std::io::IsTerminal;
use std::time::Instant;

use anyhow::Context;
use dsvl2_config::ModelDir;
use dsvl2_model::{
    check_context, generate, DeepseekVl2, Device, FinishReason, GgufWeights, LoadOptions, Sampler, SamplingParams,
    SequenceCache,
};
use dsvl2_processor::{AnswerText, PreparedInput, Processor};
use serde::Serialize;

/// The model used when `--model` is not given.
pub const DEFAULT_MODEL: &str = "deepseek-ai/deepseek-vl2-tiny";

/// Opens a model given as a local folder, a GGUF file or a Hub repo id (downloaded into the Hugging Face cache
/// if it is not there yet; a cached model starts without network).
pub fn open_model(spec: &str) -> anyhow::Result<ModelDir> {
    // A `.gguf` file holds a whole model (`dsvl2 quantize`); the Hub resolver takes folders and repo ids.
    if spec.to_ascii_lowercase().ends_with(".gguf") && !std::path::Path::new(spec).is_dir() {
        return ModelDir::open_gguf(spec.as_ref()).with_context(|| format!("cannot open model file {spec}"));
    }
    let path = dsvl2_hub::resolve_model(spec, &dsvl2_hub::HubOptions::from_env())
        .with_context(|| format!("cannot get model {spec}"))?;
    ModelDir::open(&path).with_context(|| format!("cannot open model folder {}", path.display()))
}

/// The hosted model's default answer budget (`max_length_tokens`).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 2048;

pub struct LoadedModel {
    pub dir: ModelDir,
    pub processor: Processor,
    pub model: DeepseekVl2,
    pub load_seconds: f64,
}

/// How to hold the weights in memory (shared by every command that loads a model).
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Storage of the linear layers' weights: f32 (exactly the reference's numbers), f16, bf16,
    /// q8_0 (about 4x smaller than f32, ~2x faster decoding) or q4_k (smallest). Each layer gets the
    /// best format its shape allows; norms, routers and embeddings stay float. Converted in
    /// parallel at load; a GGUF file (`dsvl2 quantize`) keeps the formats it was written with.
    #[arg(long, value_name = "FORMAT", default_value = "f32")]
    pub dtype: dsvl2_model::Format,

    /// With a GGUF file: copy its quantized weights at load into memory backed by 2 MiB pages
    /// instead of reading them in place from a memory map of the file. Decoding reads every active
    /// weight once per token and runs faster from there (tiny q8_0: ~30% at batch 1, ~15% at
    /// batch 8), for a slower load (fresh memory) and no sharing of the file's pages between
    /// processes. Default for `serve`, `chat` and `bench`, which load once and decode for long.
    #[arg(long, overrides_with = "mmap")]
    pub no_mmap: bool,

    /// With a GGUF file: use its quantized weights in place from a memory map of the file (loads in
    /// the time of reading the file; processes using it share its pages). Default for `generate`,
    /// which answers once.
    #[arg(long, overrides_with = "no_mmap")]
    pub mmap: bool,

    /// How the attention cache holds keys and values: f32, f16 or i8 (one scale per position and
    /// head; half of f16's bytes, which decoding reads for every token: faster at long contexts and
    /// in batches, at a small cost in accuracy). Only tiny's attention has such a cache (small and
    /// base keep their compact latent cache in f32). Default: f32 with f32 weights, f16 otherwise.
    #[arg(long, value_name = "FORMAT")]
    pub kv_cache: Option<dsvl2_model::CacheFormat>,
}

impl LoadArgs {
    /// The options asked for; a GGUF file's weights are held as `default` unless `--mmap` or
    /// `--no-mmap` says otherwise (the last of them given wins).
    pub fn options(&self, default: GgufWeights) -> LoadOptions {
        LoadOptions {
            weight_format: self.dtype,
            gguf_weights: match (self.mmap, self.no_mmap) {
                (true, _) => GgufWeights::Mapped,
                (_, true) => GgufWeights::InMemory,
                _ => default,
            },
            kv_cache: self.kv_cache,
        }
    }
}

/// Opens the folder and loads tokenizer and weights; a progress bar on stderr when it is a terminal.
pub fn load_model(dir: ModelDir, options: &LoadOptions) -> anyhow::Result<LoadedModel> {
    let started = Instant::now();
    let processor = Processor::from_model_dir(&dir).context("cannot load the tokenizer")?;
    let progress = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("loading weights {bar:30} {bytes}/{total_bytes} {elapsed}")
                .expect("valid template"),
        );
        bar
    });
    let report = progress.clone().map(|bar| {
        move |done: u64, total: u64| {
            bar.set_length(total);
            bar.set_position(done);
        }
    });
    let model = DeepseekVl2::load_with_options(&dir, &Device::Cpu, options, report)
        .with_context(|| format!("cannot load the weights of {}", dir.root.display()))?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    if dir.config.language.use_mla && options.kv_cache.is_some_and(|f| f != dsvl2_model::CacheFormat::F32) {
        tracing::warn!("--kv-cache applies to tiny's attention only: this model's latent cache stays f32");
    }
    Ok(LoadedModel {
        dir,
        processor,
        model,
        load_seconds: started.elapsed().as_secs_f64(),
    })
}

/// How much to generate and when to stop.
pub struct Limits {
    /// `None`: the default budget, clamped to the context left (with a note).
    pub max_new_tokens: Option<usize>,
    pub stop: Vec<String>,
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct Timings {
    /// Vision tower, projector and embedding layout.
    pub vision_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

pub struct Answer {
    /// Generated ids (with the final EOS when the model wrote one).
    pub tokens: Vec<u32>,
    /// The answer text, without EOS and without a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

/// The answer budget: explicit (must fit, checked by the caller's `check_context`) or the default
/// clamped to what the context leaves.
fn budget(limits: &Limits, prompt_len: usize, context: usize) -> usize {
    match limits.max_new_tokens {
        Some(n) => n,
        None => {
            let left = context.saturating_sub(prompt_len).max(1);
            if left < DEFAULT_MAX_NEW_TOKENS {
                eprintln!(
                    "note: generating at most {left} tokens, what the {context}-token context leaves after the \
                     {prompt_len}-token prompt"
                );
            }
            DEFAULT_MAX_NEW_TOKENS.min(left)
        }
    }
}

/// Answers `prepared`, continuing `cache` (whose first `cached` tokens must equal the prompt's
/// first tokens: only the rest is prefilled). Each piece of final text goes to `sink` as soon as
/// it is known; a sink error stops generation and is returned.
pub fn answer(
    loaded: &LoadedModel,
    prepared: &PreparedInput,
    cache: &mut SequenceCache,
    sampling: &SamplingParams,
    limits: &Limits,
    mut sink: impl FnMut(&str) -> std::io::Result<()>,
) -> anyhow::Result<Answer> {
    let model = &loaded.model;
    let context = loaded.dir.config.language.max_position_embeddings;
    let prompt_len = prepared.input_ids.len();
    let max_new_tokens = budget(limits, prompt_len, context);
    check_context(prompt_len, &prepared.num_image_tokens, max_new_tokens, context)?;

    let started = Instant::now();
    let cached = cache.len().min(prompt_len.saturating_sub(1));
    cache.truncate(cached);
    let embeds = dsvl2_engine::embed_prepared(model, prepared)?;
    let new_embeds = embeds.narrow(0, cached, prompt_len - cached)?;
    let vision_s = started.elapsed().as_secs_f64();

    let mut text = AnswerText::new(&loaded.processor, &limits.stop);
    let mut failure: Option<anyhow::Error> = None;
    let mut sampler = Sampler::new(sampling.clone());
    let generation = generate(
        model,
        cache,
        &new_embeds,
        &prepared.input_ids,
        &mut sampler,
        Some(loaded.processor.eos_id()),
        max_new_tokens,
        |token| {
            let shown = text.push(token).map_err(anyhow::Error::from).and_then(|delta| {
                if !delta.is_empty() {
                    sink(&delta)?;
                }
                Ok(())
            });
            match shown {
                Ok(()) => !text.stopped(),
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        },
    )?;
    if let Some(e) = failure {
        return Err(e);
    }
    let tail = text.finish()?;
    if !tail.is_empty() {
        sink(&tail)?;
    }
    let finish_reason = if text.stopped() {
        FinishReason::Stop
    } else {
        generation.finish_reason
    };
    let decoded = generation.tokens.len();
    let timings = Timings {
        vision_s,
        prefill_s: generation.prefill_seconds,
        decode_s: generation.decode_seconds,
        prefill_tokens: prompt_len - cached,
        prefill_tokens_per_s: (prompt_len - cached) as f64 / generation.prefill_seconds.max(1e-9),
        // The first token comes from the prefill; decode steps produce the rest.
        decode_tokens_per_s: decoded.saturating_sub(1) as f64 / generation.decode_seconds.max(1e-9),
    };
    Ok(Answer {
        tokens: generation.tokens,
        text: text.into_text(),
        finish_reason,
        timings,
    })
}

/// Peak resident memory of this process (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets the kernel's peak-RSS mark (`VmHWM`) to the current RSS (Linux `clear_refs`); false where
/// that is not possible (other systems, or a /proc that refuses it).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A seed from the clock, for runs that do not ask for reproducibility.
pub fn clock_seed() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}

/// Whether an error is (caused by) writing to a closed pipe, e.g. `dsvl2 generate ... | head`.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        load: LoadArgs,
    }

    fn weights(args: &[&str], default: GgufWeights) -> GgufWeights {
        let cli = Cli::try_parse_from(std::iter::once("dsvl2").chain(args.iter().copied())).unwrap();
        cli.load.options(default).gguf_weights
    }

    #[test]
    fn mmap_flags_override_the_commands_default_and_the_last_given_wins() {
        use GgufWeights::{InMemory, Mapped};
        assert_eq!(weights(&[], InMemory), InMemory);
        assert_eq!(weights(&[], Mapped), Mapped);
        assert_eq!(weights(&["--mmap"], InMemory), Mapped);
        assert_eq!(weights(&["--no-mmap"], Mapped), InMemory);
        assert_eq!(weights(&["--mmap", "--no-mmap"], Mapped), InMemory);
        assert_eq!(weights(&["--no-mmap", "--mmap"], InMemory), Mapped);
    }
}
