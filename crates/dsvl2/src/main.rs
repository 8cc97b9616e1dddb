//! `dsvl2`: run DeepSeek-VL2 vision-language models.

mod commands;
mod probe;
mod runner;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "dsvl2", version, about = "Run DeepSeek-VL2 vision-language models on CPU", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what the processor makes of a request: prompt tokens, image masks, tile grids, pixels.
    Prepare(commands::prepare::PrepareArgs),
    /// Answer a prompt about images: streams the text to stdout, or prints one JSON object.
    Generate(commands::generate::GenerateArgs),
    /// Fetch a model from the Hugging Face Hub into the cache ahead of use; prints the snapshot folder.
    Download(commands::download::DownloadArgs),
    /// Interactive multi-turn chat on stdin/stdout; the KV cache is kept between turns.
    Chat(commands::chat::ChatArgs),
    /// HTTP server: Replicate Cog predictions and OpenAI chat completions, with metrics.
    Serve(commands::serve::ServeArgs),
    /// Write a full-size checkpoint of an official model (or any config.json) with random weights,
    /// for speed measurements without the real weights.
    RandomModel(commands::random_model::RandomModelArgs),
    /// Time one request stage by stage (and batched decoding), against the machine's measured
    /// memory bandwidth and FMA peak; prints a table or one JSON object.
    Bench(commands::bench::BenchArgs),
    /// Write a model as one GGUF file (configs, tokenizer and weights) with its linear weights in
    /// q4_k, q8_0, f16, bf16 or f32; `--model FILE.gguf` then loads it anywhere a folder works.
    Quantize(commands::quantize::QuantizeArgs),
}

/// OpenBLAS picks its kernels when the library loads, before `main`, and a release older than the CPU
/// picks SSE3 ones: Debian 12's OpenBLAS on an Emerald Rapids ran the vision tower 3.6x slower than
/// with its AVX-512 kernels (see `dsvl2-kernels/src/blas.rs`). Its documented switch is the
/// `OPENBLAS_CORETYPE` environment variable, read at load, so the process replaces itself with the
/// same command and that variable set (once: the new process sees it set). The start time that
/// `bench` reports from is the process's, which `exec` keeps, so the restart is counted.
#[cfg(unix)]
fn restart_for_newer_openblas_kernels() {
    use std::os::unix::process::CommandExt;
    let Some(coretype) = dsvl2_model::openblas_coretype_fix() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    let err = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe)
            .arg0(arg0)
            .args(args)
            .env("OPENBLAS_CORETYPE", coretype)
            .exec(),
        Err(e) => e,
    };
    // Only reached when the restart failed; the large products then run on the `gemm` crate.
    eprintln!("warning: could not restart with OPENBLAS_CORETYPE={coretype} ({err}); continuing without it");
}

#[cfg(not(unix))]
fn restart_for_newer_openblas_kernels() {}

/// `mi_option_purge_delay` in mimalloc.h (v3), which the bindings do not name: the entry just before
/// `mi_option_use_numa_nodes`, as the assertion below checks.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const _: () = assert!(libmimalloc_sys::mi_option_use_numa_nodes == MI_OPTION_PURGE_DELAY + 1);

/// Keeps freed memory mapped for 10 s instead of mimalloc's default 1 s before returning it to the
/// OS. A vision layer takes about a second and frees tens of megabytes of activations that the next
/// layer allocates again; returned pages come back through page faults that zero them. Measured on
/// tiny, 5 tiles, q8_0: vision 26.1 s with the default delay, 22.4 s without purging; peak RSS
/// +0.2 GB. Memory is still returned once the process has been idle for the delay.
fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option; valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) };
}

fn main() {
    probe::mark_main_started();
    restart_for_newer_openblas_kernels();
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Prepare(args) => commands::prepare::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Download(args) => commands::download::run(args),
        Command::Chat(args) => commands::chat::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::RandomModel(args) => commands::random_model::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Quantize(args) => commands::quantize::run(args),
    };
    if let Err(err) = result {
        // A closed pipe (`dsvl2 generate ... | head`) is the reader's choice, not a failure.
        if runner::is_broken_pipe(&err) {
            return;
        }
        // `{:#}` prints the whole cause chain on one line: "cannot open x: no such file".
        eprintln!("error: {err:#}");
        std::process::exit(2);
    }
}
