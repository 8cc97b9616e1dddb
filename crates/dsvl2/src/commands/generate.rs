//! `dsvl2 generate`: answer one request, streaming the text to stdout (or one JSON object).

use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use dsvl2_model::{
    check_context, generate, DType, DeepseekVl2, Device, FinishReason, ImageInputs, Sampler, SamplingParams, Tensor,
};
use dsvl2_processor::{Processor, TextStream};
use serde::Serialize;

use super::request::RequestArgs;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub request: RequestArgs,

    /// Most tokens to generate. Default: 2048, clamped to the context left after the prompt (with a
    /// note on stderr); an explicit value that does not fit is an error.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_new_tokens: Option<u64>,

    /// Sampling temperature (>= 0); 0 = greedy (argmax after the repetition penalty).
    #[arg(long, value_name = "T", default_value_t = 0.1)]
    pub temperature: f32,

    /// Nucleus sampling: keep the most likely tokens whose probability adds up to P (0 < P <= 1;
    /// 1 disables).
    #[arg(long, value_name = "P", default_value_t = 0.9)]
    pub top_p: f64,

    /// Keep only the K most likely tokens (0 disables). 50 is transformers' default, which the
    /// hosted model uses.
    #[arg(long, value_name = "K", default_value_t = dsvl2_model::sampling::DEFAULT_TOP_K)]
    pub top_k: usize,

    /// Penalise every token already in the prompt or the answer (> 0; 1 disables).
    #[arg(long, value_name = "R", default_value_t = 1.1)]
    pub repetition_penalty: f32,

    /// Random seed: the same seed and input give the same output. Default: a random seed, printed
    /// in the --json report.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Print one JSON object at the end (prompt_tokens, output_tokens, text, finish_reason,
    /// timings) instead of streaming text. Default: off.
    #[arg(long)]
    pub json: bool,
}

/// The default answer budget (the hosted model's `max_length_tokens`).
const DEFAULT_MAX_NEW_TOKENS: usize = 2048;

#[derive(Serialize)]
struct Timings {
    load_s: f64,
    preprocess_s: f64,
    /// Vision tower, projector and embedding layout.
    vision_s: f64,
    prefill_s: f64,
    decode_s: f64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
}

#[derive(Serialize)]
struct Report {
    prompt_tokens: Vec<u32>,
    output_tokens: Vec<u32>,
    text: String,
    finish_reason: FinishReason,
    num_image_tokens: Vec<usize>,
    seed: u64,
    timings: Timings,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed.unwrap_or_else(rand_seed),
    };
    sampling
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid sampling parameter: {e}"))?;
    let started = Instant::now();
    let dir = args.request.open_model()?;
    let processor = Processor::from_model_dir(&dir).context("cannot load the tokenizer")?;
    let device = Device::Cpu;
    let model = DeepseekVl2::load(&dir, &device, DType::F32)
        .with_context(|| format!("cannot load the weights of {}", dir.root.display()))?;
    let load_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let conversation = args.request.conversation()?;
    let prepared = processor
        .prepare_with_files(&conversation, &args.request.system)
        .context("cannot prepare the request")?;
    let preprocess_s = started.elapsed().as_secs_f64();

    let context = dir.config.language.max_position_embeddings;
    let prompt_len = prepared.input_ids.len();
    let max_new_tokens = match args.max_new_tokens {
        Some(n) => n as usize,
        None => {
            let left = context.saturating_sub(prompt_len).max(1);
            if left < DEFAULT_MAX_NEW_TOKENS {
                eprintln!("note: generating at most {left} tokens, what the {context}-token context leaves after the {prompt_len}-token prompt");
            }
            DEFAULT_MAX_NEW_TOKENS.min(left)
        }
    };
    check_context(prompt_len, &prepared.num_image_tokens, max_new_tokens, context)?;

    let started = Instant::now();
    let pixels = if prepared.n_tiles > 0 {
        let [n, c, h, w] = prepared.pixel_shape();
        Some(Tensor::from_slice(&prepared.pixel_values, (n, c, h, w), &device)?)
    } else {
        None
    };
    let images = pixels.as_ref().map(|p| ImageInputs {
        pixel_values: p,
        spatial_crop: &prepared.images_spatial_crop,
    });
    let embeds = model.embed_inputs(&prepared.input_ids, &prepared.images_seq_mask, images, None)?;
    let vision_s = started.elapsed().as_secs_f64();

    let eos = processor.eos_id();
    let mut stream = TextStream::new(&processor);
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let mut sampler = Sampler::new(sampling.clone());
    let generation = generate(
        &model,
        &embeds,
        &prepared.input_ids,
        &mut sampler,
        Some(eos),
        max_new_tokens,
        |token| {
            if args.json || token == eos {
                return true;
            }
            let piece = stream.push(token).map_err(anyhow::Error::from);
            match piece.and_then(|piece| Ok(stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush())?)) {
                Ok(()) => true,
                Err(e) => {
                    // A closed pipe (`| head`) ends generation quietly; other errors are reported.
                    write_error = Some(e);
                    false
                }
            }
        },
    )?;
    if let Some(e) = write_error {
        if !is_broken_pipe(&e) {
            return Err(e);
        }
        return Ok(());
    }
    let answer: Vec<u32> = generation.tokens.iter().copied().filter(|&t| t != eos).collect();
    let text = processor.decode(&answer, false)?;
    let decoded = generation.tokens.len();
    let timings = Timings {
        load_s,
        preprocess_s,
        vision_s,
        prefill_s: generation.prefill_seconds,
        decode_s: generation.decode_seconds,
        prefill_tokens_per_s: prompt_len as f64 / generation.prefill_seconds.max(1e-9),
        // The first token comes from the prefill; decode steps produce the rest.
        decode_tokens_per_s: decoded.saturating_sub(1) as f64 / generation.decode_seconds.max(1e-9),
    };
    if args.json {
        let report = Report {
            prompt_tokens: prepared.input_ids,
            output_tokens: generation.tokens,
            text,
            finish_reason: generation.finish_reason,
            num_image_tokens: prepared.num_image_tokens,
            seed: sampling.seed,
            timings,
        };
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let rest = stream.finish()?;
        let _ = stdout.write_all(rest.as_bytes());
        let _ = writeln!(stdout);
    }
    Ok(())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// A seed from the clock, for runs that do not ask for reproducibility.
fn rand_seed() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}
