//! Models by name: turns a `--model` value into a local folder that `dsvl2_config::ModelDir::open`
//! reads, downloading from the Hugging Face Hub into the standard Hugging Face cache when needed.
//!
//! * A spec naming an existing directory is used as is ([`ModelSpec::Local`]).
//! * Otherwise it must be a Hub repo id, `owner/name` or `owner/name@revision` (branch, tag or
//!   commit hash; default `main`).
//!
//! For a repo, the files a DeepSeek-VL2 model needs are `config.json`, `processor_config.json`,
//! `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` when the repo has them,
//! and the weights: `model.safetensors.index.json` plus every shard it names, or
//! `model.safetensors`. They go to `<cache>/models--owner--name/snapshots/<commit>/` (the layout
//! of `huggingface_hub`, shared with Python tools), and that folder is the answer.
//!
//! Network policy:
//! * [`resolve_model`] / [`resolve_repo`] look in the cache first: when the revision is a commit
//!   hash, or a branch/tag whose `refs/<revision>` the cache holds, and that snapshot has every
//!   needed file, it is used without any network access (a branch that moved on the Hub is not
//!   noticed: run `dsvl2 download` to update). Otherwise the files are downloaded.
//! * [`download_model`] always asks the Hub which commit the revision is at, then downloads what
//!   that snapshot lacks (files already there are not downloaded again).
//! * With `offline` (`HF_HUB_OFFLINE=1`) both use only the cache and fail naming the first missing
//!   file; optional tokenizer files may then be absent.
//!
//! Downloads go through hf-hub's blocking client: each file streams into `blobs/<etag>.part` and
//! only a complete file (its size checked against the Hub's) is linked into the snapshot, so an
//! interrupted download never leaves a file the next run would take as complete; the next run
//! resumes the `.part`. `refs/<revision>` is written only once its snapshot is complete, so a failed
//! update leaves the previous complete snapshot in use. Options come from the same environment variables as `huggingface_hub`
//! ([`HubOptions::from_env`]).
//!
//! Limitation: hf-hub sets no read timeout, so a server that stalls mid-file (without closing the
//! connection) blocks until the operating system gives up on the connection.

mod cache;
mod download;
mod error;
#[cfg(feature = "mock-hub")]
pub mod mock;
mod options;
mod progress;
mod spec;

use std::path::PathBuf;

pub use cache::{OPTIONAL_FILES, REQUIRED_FILES};
pub use error::HubError;
pub use options::{HubOptions, DEFAULT_ENDPOINT};
pub use spec::{HubRepo, ModelSpec, DEFAULT_REVISION};

use cache::RepoCache;

/// A model snapshot in the cache.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// `<cache>/models--owner--name/snapshots/<commit>`: a model folder.
    pub path: PathBuf,
    pub repo_id: String,
    /// The revision asked for.
    pub revision: String,
    /// The commit it resolved to.
    pub commit: String,
    /// Every model file in the snapshot.
    pub files: Vec<String>,
    /// The files this call downloaded (empty when all came from the cache).
    pub downloaded: Vec<String>,
    /// Their total size.
    pub downloaded_bytes: u64,
}

/// Resolves a `--model` value to a model folder: an existing directory as is, else a Hub repo id
/// (cache first, downloading what is missing). See the crate docs for the network policy.
pub fn resolve_model(spec: &str, options: &HubOptions) -> Result<PathBuf, HubError> {
    match ModelSpec::parse(spec)? {
        ModelSpec::Local(path) => Ok(path),
        ModelSpec::Hub(repo) => resolve_repo(&repo, options).map(|s| s.path),
    }
}

/// A repo's snapshot from the cache when complete (no network), else downloaded.
pub fn resolve_repo(repo: &HubRepo, options: &HubOptions) -> Result<Snapshot, HubError> {
    match cached_snapshot(repo, options) {
        Ok(snapshot) => Ok(snapshot),
        Err(missing) if options.offline => Err(not_cached(repo, options, missing)),
        Err(_) => download::fetch(repo, options),
    }
}

/// Asks the Hub for the revision's current commit and downloads whatever that snapshot lacks.
/// In offline mode, only checks the cache.
pub fn download_model(repo: &HubRepo, options: &HubOptions) -> Result<Snapshot, HubError> {
    if options.offline {
        return cached_snapshot(repo, options).map_err(|missing| not_cached(repo, options, missing));
    }
    download::fetch(repo, options)
}

/// The complete cached snapshot of a repo, or the first file it lacks. Optional files must be
/// present or recorded as absent, except in offline mode.
fn cached_snapshot(repo: &HubRepo, options: &HubOptions) -> Result<Snapshot, String> {
    let cache = RepoCache::new(&options.cache_dir, repo);
    let commit = cache
        .commit_for(&repo.revision)
        .ok_or_else(|| cache::CONFIG_FILE.to_string())?;
    let files = cache.check_snapshot(&commit, options.offline)?;
    Ok(Snapshot {
        path: cache.snapshot(&commit),
        repo_id: repo.id.clone(),
        revision: repo.revision.clone(),
        commit,
        files,
        downloaded: Vec::new(),
        downloaded_bytes: 0,
    })
}

fn not_cached(repo: &HubRepo, options: &HubOptions, file: String) -> HubError {
    HubError::NotCached {
        spec: repo.to_string(),
        repo: repo.id.clone(),
        revision: repo.revision.clone(),
        file,
        cache_dir: options.cache_dir.clone(),
    }
}
