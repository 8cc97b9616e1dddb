//! Errors of model resolution and Hub downloads: each names the repo, the file and the cause.

use std::path::PathBuf;

/// What went wrong resolving a model spec or downloading from the Hub.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The spec is neither an existing folder nor `owner/name[@revision]`.
    #[error(
        "`{spec}` is not a directory and not a Hub repo id ({reason}); pass a model folder or \
         `owner/name` (optionally `owner/name@revision`), e.g. deepseek-ai/deepseek-vl2-tiny"
    )]
    InvalidSpec { spec: String, reason: String },

    /// The spec names an existing file, not a folder.
    #[error("{path} is a file, not a model folder")]
    NotADirectory { path: PathBuf },

    /// Offline mode (or `--offline`) and the cache lacks a file the model needs.
    #[error(
        "offline mode (HF_HUB_OFFLINE): {file} of {repo} (revision {revision}) is not in the Hugging Face cache \
         {cache_dir}; run `dsvl2 download {spec}` with network access first, or unset HF_HUB_OFFLINE"
    )]
    NotCached {
        /// `owner/name[@revision]`.
        spec: String,
        repo: String,
        revision: String,
        file: String,
        cache_dir: PathBuf,
    },

    /// The Hub has no such repo (or it is private and no valid token was sent).
    #[error("repo {repo} not found at {endpoint}{hint}")]
    RepoNotFound {
        repo: String,
        endpoint: String,
        hint: String,
    },

    /// The repo exists but not this branch, tag or commit.
    #[error("revision {revision} not found in repo {repo} at {endpoint}")]
    RevisionNotFound {
        repo: String,
        revision: String,
        endpoint: String,
    },

    /// A file the model needs is absent from the repo.
    #[error("{file} not found in repo {repo} (revision {revision}) at {endpoint}")]
    FileNotFound {
        repo: String,
        revision: String,
        file: String,
        endpoint: String,
    },

    /// 401/403: the repo is private or gated, or the token was refused.
    #[error("{what} of {repo}: HTTP {status} from {endpoint}{detail}; {hint}")]
    Unauthorized {
        repo: String,
        what: String,
        status: u16,
        endpoint: String,
        detail: String,
        hint: String,
    },

    /// Any other HTTP error status.
    #[error("{what} of {repo}: HTTP {status} from {endpoint}{detail}")]
    Http {
        repo: String,
        what: String,
        status: u16,
        endpoint: String,
        detail: String,
    },

    /// The endpoint could not be reached (connection refused, DNS, TLS, timeout).
    #[error(
        "cannot reach the Hub at {endpoint} for {what} of {repo}: {cause} (set HF_ENDPOINT for a mirror, or \
         HF_HUB_OFFLINE=1 to use only the cache)"
    )]
    Network {
        repo: String,
        what: String,
        endpoint: String,
        cause: String,
    },

    /// The transfer of a file stopped before its end: nothing enters the snapshot.
    #[error(
        "download of {file} from {repo} was interrupted after {received} of {expected} bytes: {cause}; the partial \
         data stays outside the snapshot (in {blobs_dir}) and the next download resumes it"
    )]
    Interrupted {
        repo: String,
        file: String,
        received: u64,
        expected: u64,
        cause: String,
        blobs_dir: PathBuf,
    },

    /// The server's answer is not what a Hugging Face Hub sends.
    #[error("{what} of {repo}: unexpected answer from {endpoint}: {problem} (is HF_ENDPOINT a Hugging Face Hub?)")]
    Protocol {
        repo: String,
        what: String,
        endpoint: String,
        problem: String,
    },

    /// The repo is reachable but does not hold a DeepSeek-VL2 model in the official layout.
    #[error("repo {repo} (revision {revision}) is not a model in the official layout: {reason}")]
    NotAModel {
        repo: String,
        revision: String,
        reason: String,
    },

    /// Another process holds the download lock of the same file.
    #[error("{file} of {repo} is being downloaded by another process (lock {lock}); try again when it is done")]
    Locked { repo: String, file: String, lock: PathBuf },

    /// A leftover partial download is longer than the file: delete it.
    #[error(
        "{file} of {repo}: a partial download in {blobs_dir} is larger than the file; delete the `*.part` files there"
    )]
    CorruptPartial {
        repo: String,
        file: String,
        blobs_dir: PathBuf,
    },

    /// Reading or writing the cache failed.
    #[error("cache at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl HubError {
    /// Whether trying the same file again may help (the transfer broke off midway).
    pub fn is_retryable(&self) -> bool {
        matches!(self, HubError::Interrupted { .. })
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HubError::Io {
            path: path.into(),
            source,
        }
    }
}
