//! `dsvl2`: run DeepSeek-VL2 vision-language models.

mod commands;
mod runner;

use clap::{Parser, Subcommand};

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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Prepare(args) => commands::prepare::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Download(args) => commands::download::run(args),
        Command::Chat(args) => commands::chat::run(args),
        Command::Serve(args) => commands::serve::run(args),
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
