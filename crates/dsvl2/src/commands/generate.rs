//! `dsvl2 generate`: answer one request, streaming the text to stdout (or one JSON object).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use dsvl2_model::{FinishReason, GgufWeights, SamplingParams};
use dsvl2_processor::grounding::parse_grounding;
use dsvl2_processor::{annotate, save_png};
use serde::Serialize;

use super::request::RequestArgs;
use crate::runner::{answer, clock_seed, load_model, peak_rss_bytes, Limits, LoadArgs, Timings};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub request: RequestArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    #[command(flatten)]
    pub load: LoadArgs,

    /// Print one JSON object at the end (prompt_tokens, output_tokens, text, finish_reason,
    /// num_image_tokens, seed, timings) instead of streaming text. Default: off.
    #[arg(long)]
    pub json: bool,

    /// Print a timing summary on stderr at the end (load, preprocessing, vision, prefill and
    /// decode speed, peak memory). Default: off.
    #[arg(long, short)]
    pub verbose: bool,

    /// Write the last image with the answer's grounding boxes (`<|ref|>label<|/ref|><|det|>[[x1,y1,
    /// x2,y2]]<|/det|>`) and labels drawn, as PNG. Default: not written.
    #[arg(long, value_name = "OUT.png")]
    pub annotate: Option<PathBuf>,
}

/// Sampling and stopping flags, with the hosted model's defaults (shared with `chat`).
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
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

    /// Stop when the answer contains this text (not included in the answer); repeatable.
    /// Default: none (generation stops at the end-of-sentence token or the token limit).
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub fn params(&self) -> anyhow::Result<SamplingParams> {
        let params = SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed.unwrap_or_else(clock_seed),
        };
        params
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid sampling parameter: {e}"))?;
        Ok(params)
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_new_tokens: self.max_new_tokens.map(|n| n as usize),
            stop: self.stop.clone(),
        }
    }
}

#[derive(Serialize)]
struct Report {
    prompt_tokens: Vec<u32>,
    output_tokens: Vec<u32>,
    text: String,
    finish_reason: FinishReason,
    num_image_tokens: Vec<usize>,
    seed: u64,
    /// Grounding boxes of the answer, in the pixels of the last image.
    boxes: Vec<BoxReport>,
    /// What was malformed in the answer's grounding tags (reported, not fatal).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    grounding_problems: Vec<String>,
    timings: ReportTimings,
}

#[derive(Serialize)]
struct BoxReport {
    label: String,
    /// `[x1, y1, x2, y2]` in pixels of the last image (not clamped, as the reference).
    #[serde(rename = "box")]
    box_px: [i64; 4],
    /// The coordinates as the model wrote them (0-999).
    box_normalized: [f64; 4],
    color: [u8; 3],
}

#[derive(Serialize)]
struct ReportTimings {
    load_s: f64,
    preprocess_s: f64,
    #[serde(flatten)]
    answer: Timings,
    peak_rss_bytes: Option<u64>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let sampling = args.sampling.params()?;
    let loaded = load_model(args.request.open_model()?, &args.load.options(GgufWeights::Mapped))?;

    let started = Instant::now();
    let conversation = args.request.conversation(&loaded.processor.config().image_token)?;
    let images = loaded.processor.load_images(&conversation)?;
    if args.annotate.is_some() && images.is_empty() {
        anyhow::bail!("--annotate needs an image to draw on, and the request has none");
    }
    let prepared = loaded
        .processor
        .prepare(&conversation, &images, &args.request.system)
        .context("cannot prepare the request")?;
    let preprocess_s = started.elapsed().as_secs_f64();

    let mut cache = loaded.model.new_cache();
    let mut stdout = std::io::stdout().lock();
    let result = answer(
        &loaded,
        &prepared,
        &mut cache,
        &sampling,
        &args.sampling.limits(),
        |piece| {
            if args.json {
                return Ok(());
            }
            stdout.write_all(piece.as_bytes())?;
            stdout.flush()
        },
    );
    let answer = result?;
    let timings = ReportTimings {
        load_s: loaded.load_seconds,
        preprocess_s,
        answer: answer.timings,
        peak_rss_bytes: peak_rss_bytes(),
    };
    if args.verbose {
        print_timings(&timings, answer.tokens.len());
    }
    // Boxes refer to the last image, as in the official demo.
    let grounding = images
        .last()
        .map(|image| parse_grounding(&answer.text, image.width, image.height))
        .unwrap_or_default();
    if let (Some(path), Some(image)) = (&args.annotate, images.last()) {
        save_png(&annotate(image, &grounding.boxes), path)?;
        if grounding.boxes.is_empty() {
            eprintln!(
                "note: the answer has no grounding boxes; {} is the plain image",
                path.display()
            );
        }
    }
    if args.json {
        let report = Report {
            prompt_tokens: prepared.input_ids,
            output_tokens: answer.tokens,
            text: answer.text,
            finish_reason: answer.finish_reason,
            num_image_tokens: prepared.num_image_tokens,
            seed: sampling.seed,
            boxes: grounding
                .boxes
                .iter()
                .map(|b| BoxReport {
                    label: b.label.clone(),
                    box_px: b.box_px,
                    box_normalized: b.box_norm,
                    color: b.color,
                })
                .collect(),
            grounding_problems: grounding.problems,
            timings,
        };
        writeln!(stdout, "{}", serde_json::to_string(&report)?)?;
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}

fn print_timings(t: &ReportTimings, generated: usize) {
    let a = &t.answer;
    eprintln!("load            {:8.3} s", t.load_s);
    eprintln!("preprocess      {:8.3} s", t.preprocess_s);
    eprintln!("vision          {:8.3} s", a.vision_s);
    eprintln!(
        "prefill         {:8.3} s  {} tokens, {:.1} tokens/s",
        a.prefill_s, a.prefill_tokens, a.prefill_tokens_per_s
    );
    eprintln!(
        "decode          {:8.3} s  {generated} tokens, {:.2} tokens/s",
        a.decode_s, a.decode_tokens_per_s
    );
    if let Some(bytes) = t.peak_rss_bytes {
        eprintln!("peak memory     {:8.1} MiB", bytes as f64 / (1024.0 * 1024.0));
    }
}
