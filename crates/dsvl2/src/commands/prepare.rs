//! `dsvl2 prepare`: show what the processor makes of a request (prompt tokens, image masks, tile
//! grids, pixels), for checking against the reference processor.

use std::path::PathBuf;

use anyhow::Context;
use dsvl2_processor::{PreparedInput, Processor};

use super::request::RequestArgs;

#[derive(clap::Args)]
pub struct PrepareArgs {
    #[command(flatten)]
    pub request: RequestArgs,

    /// Print one JSON object instead of a human summary. Default: off.
    #[arg(long)]
    pub json: bool,

    /// Write the pixel tensor [n_tiles, 3, S, S] (f32) to this safetensors file as `pixel_values`.
    /// Default: not written.
    #[arg(long, value_name = "FILE")]
    pub save_pixels: Option<PathBuf>,
}

pub fn run(args: PrepareArgs) -> anyhow::Result<()> {
    let model = args.request.open_model()?;
    let processor = Processor::from_model_dir(&model).context("cannot build the processor")?;
    let conversation = args.request.conversation(&processor.config().image_token)?;
    let prepared = processor
        .prepare_with_files(&conversation, &args.request.system)
        .context("cannot prepare the request")?;
    if let Some(path) = &args.save_pixels {
        save_pixels(path, &prepared).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&json_report(&prepared))?);
    } else {
        print_summary(&processor, &prepared)?;
    }
    Ok(())
}

/// The reference's field names; a text-only request reports the dummy grid `[[0, 0]]` as it does.
fn json_report(p: &PreparedInput) -> serde_json::Value {
    let crops: Vec<[usize; 2]> = if p.images_spatial_crop.is_empty() {
        vec![[0, 0]]
    } else {
        p.images_spatial_crop.clone()
    };
    serde_json::json!({
        "sft_format": p.sft_format,
        "input_ids": p.input_ids,
        "images_seq_mask": p.images_seq_mask.iter().map(|&m| m as u8).collect::<Vec<_>>(),
        "images_spatial_crop": crops,
        "num_image_tokens": p.num_image_tokens,
        "n_tiles": p.n_tiles,
        "pixel_shape": p.pixel_shape(),
        "seq_len": p.input_ids.len(),
    })
}

fn print_summary(processor: &Processor, p: &PreparedInput) -> anyhow::Result<()> {
    println!("sft_format:\n{}\n", p.sft_format);
    let image_tokens = p.images_seq_mask.iter().filter(|&&m| m).count();
    println!(
        "tokens: {} ({} image placeholders, {} text)",
        p.input_ids.len(),
        image_tokens,
        p.input_ids.len() - image_tokens
    );
    for (k, ([tw, th], n)) in p.images_spatial_crop.iter().zip(&p.num_image_tokens).enumerate() {
        println!("image {k}: {tw}x{th} local tiles (+1 global view), {n} tokens");
    }
    println!("pixels: {:?} f32", p.pixel_shape());
    // The text part, image blocks collapsed, to eyeball the tokenization.
    let text_ids: Vec<u32> = p
        .input_ids
        .iter()
        .zip(&p.images_seq_mask)
        .filter(|(_, &m)| !m)
        .map(|(&id, _)| id)
        .collect();
    println!("text tokens decoded: {:?}", processor.decode(&text_ids, false)?);
    Ok(())
}

fn save_pixels(path: &std::path::Path, p: &PreparedInput) -> anyhow::Result<()> {
    let bytes: Vec<u8> = p.pixel_values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, p.pixel_shape().to_vec(), &bytes)?;
    safetensors::serialize_to_file([("pixel_values", view)], None, path)?;
    Ok(())
}
