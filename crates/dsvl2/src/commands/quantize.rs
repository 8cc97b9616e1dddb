//! `dsvl2 quantize`: writes a model as ONE GGUF v3 file (the llama.cpp / ggml container) with its
//! linear weights in the requested format: the configs and tokenizer files as metadata (verbatim
//! JSON texts), every checkpoint tensor under its official name, each stored in the format
//! [`dsvl2_model::storage_format`] picks (the same rule the loader applies to `--dtype`), so
//! `--model FILE.gguf` loads exactly what `--model DIR --dtype FORMAT` would have made, without
//! converting anything at load time.
//!
//! Tensors are converted one at a time and handed to a writer thread, so memory stays around two
//! tensors; the file is written as `FILE.gguf.partial` and renamed when complete, so an
//! interrupted run never leaves a truncated `.gguf` behind.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::{bail, Context};
use dsvl2_config::files::{
    CONFIG_FILE, PROCESSOR_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
};
use dsvl2_config::gguf::{self, file_type, keys, GgufFile, GgufWriter};
use dsvl2_config::{ModelDir, TokenizerSource, WeightFiles};
use dsvl2_model::{storage_format, DType, Device, Format, PackedMatrix, Weights};

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// Model to convert: a folder in the official Hugging Face layout, a Hub repo id
    /// (`owner/name[@revision]`), or a GGUF file.
    #[arg(long, value_name = "DIR|REPO|FILE")]
    pub model: String,

    /// Storage of the linear layers' weights: q4_k (smallest), q8_0, f16, bf16 or f32. Each layer
    /// gets the best format its shape allows (q4_k needs rows of 256 values, q8_0 of 32); norms,
    /// routers and embeddings stay float, as when loading with `--dtype`.
    #[arg(long, value_name = "FORMAT")]
    pub dtype: Format,

    /// The GGUF file to write (must end in `.gguf`). Refused if it exists, unless --force.
    #[arg(long, value_name = "FILE.gguf")]
    pub out: PathBuf,

    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,

    /// `general.name` of the file. Default: the model folder's or repo's name.
    #[arg(long, value_name = "TEXT")]
    pub name: Option<String>,
}

/// llama.cpp's `general.file_type` for a requested format.
fn file_type_of(format: Format) -> u32 {
    match format {
        Format::F32 => file_type::ALL_F32,
        Format::F16 => file_type::MOSTLY_F16,
        Format::Bf16 => file_type::MOSTLY_BF16,
        Format::Q8_0 | Format::Q8_0R16 => file_type::MOSTLY_Q8_0,
        Format::Q4K => file_type::MOSTLY_Q4_K_S,
    }
}

/// `deepseek-ai/deepseek-vl2-tiny@main` -> `deepseek-vl2-tiny`; `models/tiny-like/` -> `tiny-like`.
fn default_name(spec: &str) -> String {
    let path = if Path::new(spec).exists() {
        spec
    } else {
        spec.split('@').next().unwrap_or(spec)
    };
    let trimmed = path.trim_end_matches(['/', '\\']);
    let name = Path::new(trimmed)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| trimmed.to_string());
    name.strip_suffix(".gguf").map(str::to_string).unwrap_or(name)
}

/// The JSON files a GGUF embeds, as (metadata key, text): config, processor config and tokenizer
/// (required), tokenizer config and special tokens map (when the model has them).
fn embedded_texts(dir: &ModelDir) -> anyhow::Result<Vec<(&'static str, String)>> {
    let required = [
        (keys::CONFIG_JSON, CONFIG_FILE),
        (keys::PROCESSOR_CONFIG_JSON, PROCESSOR_CONFIG_FILE),
        (keys::TOKENIZER_JSON, TOKENIZER_FILE),
    ];
    let optional = [
        (keys::TOKENIZER_CONFIG_JSON, TOKENIZER_CONFIG_FILE),
        (keys::SPECIAL_TOKENS_MAP_JSON, SPECIAL_TOKENS_MAP_FILE),
    ];
    let mut texts = Vec::new();
    if let WeightFiles::Gguf { path, .. } = &dir.weights {
        // A GGUF source: carry its embedded texts over.
        let source = GgufFile::open(path)?;
        for (key, file) in required.iter().chain(&optional) {
            match source.get_str(key) {
                Some(text) => texts.push((*key, text.to_string())),
                None if required.iter().any(|(k, _)| k == key) => {
                    bail!("{}: missing metadata `{key}` (the model's {file})", path.display())
                }
                None => {}
            }
        }
        return Ok(texts);
    }
    let read = |path: &Path| std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()));
    let tokenizer = match &dir.tokenizer.source {
        TokenizerSource::File(path) => read(path)?,
        TokenizerSource::Embedded { json, .. } => json.to_string(),
    };
    texts.push((keys::CONFIG_JSON, read(&dir.root.join(CONFIG_FILE))?));
    texts.push((
        keys::PROCESSOR_CONFIG_JSON,
        read(&dir.root.join(PROCESSOR_CONFIG_FILE))?,
    ));
    texts.push((keys::TOKENIZER_JSON, tokenizer));
    for (key, file) in optional {
        let path = dir.root.join(file);
        if path.is_file() {
            texts.push((key, read(&path)?));
        }
    }
    Ok(texts)
}

/// `FILE.gguf` -> `FILE.gguf.partial`.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

fn check_out(out: &Path, force: bool) -> anyhow::Result<()> {
    if !out.to_string_lossy().to_ascii_lowercase().ends_with(".gguf") {
        bail!(
            "--out {} must end in .gguf (that is how --model recognises a GGUF file)",
            out.display()
        );
    }
    if out.is_dir() {
        bail!("--out {} is a directory", out.display());
    }
    if out.exists() && !force {
        bail!("--out {} exists; pass --force to replace it", out.display());
    }
    Ok(())
}

/// One tensor of the output: its name, stored format and shape.
struct Planned {
    name: String,
    format: Format,
    shape: Vec<usize>,
}

pub fn run(args: QuantizeArgs) -> anyhow::Result<()> {
    check_out(&args.out, args.force)?;
    let started = Instant::now();
    let dir = crate::runner::open_model(&args.model)?;
    let weights = Weights::open(&dir.weights, &Device::Cpu, DType::F32)
        .with_context(|| format!("cannot open the weights of {}", dir.root.display()))?;
    let texts = embedded_texts(&dir)?;

    let mut plan = GgufWriter::new();
    plan.add_metadata(keys::ARCHITECTURE, gguf::ARCHITECTURE)?;
    plan.add_metadata(
        keys::NAME,
        args.name.clone().unwrap_or_else(|| default_name(&args.model)),
    )?;
    plan.add_metadata(keys::FILE_TYPE, file_type_of(args.dtype))?;
    if matches!(args.dtype, Format::Q8_0 | Format::Q4K) {
        plan.add_metadata(keys::QUANTIZATION_VERSION, 2u32)?;
    }
    for (key, text) in texts {
        plan.add_metadata(key, text)?;
    }

    let mut planned = Vec::new();
    for name in weights.tensor_names() {
        let shape = weights.shape(name).expect("a listed tensor has a shape").to_vec();
        let format = storage_format(name, &shape, args.dtype);
        plan.add_tensor(name, format.ggml_type(), &shape)
            .with_context(|| format!("cannot store tensor `{name}` {shape:?} as {format}"))?;
        planned.push(Planned {
            name: name.to_string(),
            format,
            shape,
        });
    }
    let total_bytes = plan.file_size();

    let partial = partial_path(&args.out);
    let written = write_file(&partial, plan, &planned, &weights, total_bytes);
    let file = written.and_then(|()| {
        // Read the header back: what we wrote must be a GGUF that opens.
        GgufFile::open(&partial).with_context(|| format!("the written {} does not read back", partial.display()))
    });
    let file = match file {
        Ok(file) => file,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    if file.tensors.len() != planned.len() || file.file_size != total_bytes {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "internal error: wrote {} tensors in {} bytes, planned {} in {total_bytes}",
            file.tensors.len(),
            file.file_size,
            planned.len()
        );
    }
    std::fs::rename(&partial, &args.out)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), args.out.display()))?;

    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &planned {
        *counts.entry(p.format.name()).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(f, n)| format!("{n} {f}")).collect();
    eprintln!(
        "wrote {}: {} tensors ({}), {:.1} MB (from {:.1} MB) in {:.1} s",
        args.out.display(),
        planned.len(),
        counts.join(", "),
        total_bytes as f64 / 1e6,
        weights.stored_bytes() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    println!("{}", args.out.display());
    Ok(())
}

/// Converts the tensors in order on this thread while a writer thread streams them to `path`.
fn write_file(
    path: &Path,
    plan: GgufWriter,
    planned: &[Planned],
    weights: &Weights,
    total_bytes: u64,
) -> anyhow::Result<()> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut data = plan
        .begin(BufWriter::with_capacity(1 << 20, file))
        .with_context(|| format!("cannot write {}", path.display()))?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(total_bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "quantizing {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed} (eta {eta}) {msg}",
            )
            .expect("valid template"),
        );
        bar.set_position(data.next_tensor().map_or(total_bytes, |t| t.offset));
        bar
    });

    // At most two converted tensors wait for the writer.
    let (tx, rx) = sync_channel::<(String, PackedMatrix)>(2);
    let writer_bar = bar.clone();
    let writer_path = path.to_path_buf();
    let writer = std::thread::spawn(move || -> anyhow::Result<()> {
        let io_context = || format!("cannot write {}", writer_path.display());
        for (name, matrix) in rx {
            data.write_tensor(&name, matrix.as_bytes()).with_context(io_context)?;
            if let Some(bar) = &writer_bar {
                bar.set_position(data.next_tensor().map_or(total_bytes, |t| t.offset));
            }
        }
        let out = data.finish().with_context(io_context)?;
        let file = out.into_inner().map_err(|e| e.into_error()).with_context(io_context)?;
        file.sync_all().with_context(io_context)?;
        Ok(())
    });

    let mut converted = Ok(());
    for p in planned {
        if let Some(bar) = &bar {
            bar.set_message(p.name.clone());
        }
        let matrix = weights
            .get_f32(&p.name)
            .map_err(anyhow::Error::from)
            .and_then(|values| {
                let cols = p.shape.last().copied().unwrap_or(1);
                let rows = p.shape.iter().rev().skip(1).product();
                PackedMatrix::from_f32(p.format, rows, cols, &values).map_err(anyhow::Error::from)
            })
            .with_context(|| format!("cannot convert tensor `{}` {:?} to {}", p.name, p.shape, p.format));
        match matrix {
            Ok(matrix) => {
                if tx.send((p.name.clone(), matrix)).is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Err(e) => {
                converted = Err(e);
                break;
            }
        }
    }
    drop(tx);
    let wrote = writer.join().unwrap_or_else(|_| bail!("the writer thread panicked"));
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    converted?;
    wrote
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(default_name("deepseek-ai/deepseek-vl2-tiny"), "deepseek-vl2-tiny");
        assert_eq!(
            default_name("deepseek-ai/deepseek-vl2-small@refs/pr/1"),
            "deepseek-vl2-small"
        );
        assert_eq!(default_name("/nonexistent/models/tiny-like/"), "tiny-like");
        assert_eq!(default_name("/nonexistent/tiny-q8.gguf"), "tiny-q8");
        assert_eq!(
            partial_path(Path::new("/a/b/m.gguf")),
            PathBuf::from("/a/b/m.gguf.partial")
        );
        assert_eq!(partial_path(Path::new("m.gguf")), PathBuf::from("m.gguf.partial"));
    }
}
