//! `dsvl2 download`: fetch a model from the Hugging Face Hub into the cache ahead of use.

use std::path::PathBuf;

use anyhow::Context;
use dsvl2_hub::{HubOptions, HubRepo};

/// Arguments of `dsvl2 download`; the environment variables are those of Python's huggingface_hub.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Always asks the Hub which commit the revision is at, then downloads only the files that snapshot lacks \
(interrupted files resume). Files: config.json, processor_config.json, tokenizer.json, tokenizer_config.json \
and special_tokens_map.json when present, and model.safetensors or model.safetensors.index.json with its shards.

Environment:
  HF_HOME                       cache root [default: ~/.cache/huggingface]; models go under its hub/ folder
  HF_HUB_CACHE                  the hub folder itself [default: $HF_HOME/hub]
  HF_ENDPOINT                   Hub base URL [default: https://huggingface.co]
  HF_TOKEN                      access token for private or gated repos [default: the file $HF_HOME/token]
  HF_HUB_OFFLINE=1              no network: only check the cache and print the snapshot folder
  HF_HUB_DISABLE_PROGRESS_BARS=1  no progress bars (they are drawn only when stderr is a terminal)")]
pub struct DownloadArgs {
    /// Hub repo id, `owner/name` or `owner/name@revision` (e.g. deepseek-ai/deepseek-vl2-tiny).
    pub repo: String,

    /// Branch, tag or commit hash to fetch; overrides an `@revision` in REPO [default: main]
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,

    /// Hub base URL [default: $HF_ENDPOINT, else https://huggingface.co]
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,

    /// Hub cache folder holding models--owner--name/ [default: $HF_HUB_CACHE, else $HF_HOME/hub, else
    /// ~/.cache/huggingface/hub]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Retries per file after its transfer breaks off; each resumes where the last one stopped
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub retries: usize,
}

/// Always asks the Hub for the revision's current commit (unless HF_HUB_OFFLINE), downloads the
/// files that snapshot lacks, and prints the snapshot folder on stdout.
pub fn run(args: DownloadArgs) -> anyhow::Result<()> {
    let mut repo = HubRepo::parse(&args.repo)?;
    if let Some(revision) = &args.revision {
        repo = HubRepo::new(&repo.id, revision)?;
    }
    let mut options = HubOptions::from_env().with_max_retries(args.retries);
    if let Some(endpoint) = args.endpoint {
        options = options.with_endpoint(endpoint);
    }
    if let Some(cache_dir) = args.cache_dir {
        options.cache_dir = cache_dir;
    }
    let snapshot = dsvl2_hub::download_model(&repo, &options).with_context(|| format!("cannot download {repo}"))?;
    eprintln!(
        "{repo}: commit {}, {} files, {} downloaded ({:.1} MB){}",
        snapshot.commit,
        snapshot.files.len(),
        snapshot.downloaded.len(),
        snapshot.downloaded_bytes as f64 / 1e6,
        if options.offline { " (offline: cache only)" } else { "" }
    );
    println!("{}", snapshot.path.display());
    Ok(())
}
