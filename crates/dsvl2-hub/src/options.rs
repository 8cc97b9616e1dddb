//! Where the cache is, which endpoint, which token: from the same environment variables as
//! `huggingface_hub` (Python), or set explicitly.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How to reach the Hub and where the cache lives.
#[derive(Clone)]
pub struct HubOptions {
    /// The hub cache folder, holding `models--owner--name/{blobs,refs,snapshots}`.
    /// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
    /// `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// Base URL of the Hub, without a trailing slash. `$HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: String,
    /// Bearer token: `$HF_TOKEN`, else the token file (`$HF_TOKEN_PATH`, else `$HF_HOME/token`,
    /// written by `huggingface-cli login`).
    pub token: Option<String>,
    /// Use only the cache, never the network: `$HF_HUB_OFFLINE` set to 1/true/yes/on.
    pub offline: bool,
    /// Draw a progress bar per file on stderr. From the environment: when stderr is a terminal
    /// and `$HF_HUB_DISABLE_PROGRESS_BARS` is not set.
    pub progress: bool,
    /// How many times one file is tried again after its transfer broke off (each try resumes
    /// where the last one stopped). Default 3.
    pub max_retries: usize,
}

impl std::fmt::Debug for HubOptions {
    // Never print the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("cache_dir", &self.cache_dir)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .field("progress", &self.progress)
            .field("max_retries", &self.max_retries)
            .finish()
    }
}

impl HubOptions {
    /// Options with an explicit cache folder, the public endpoint, no token, online, no progress bars.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        HubOptions {
            cache_dir: cache_dir.into(),
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token: None,
            offline: false,
            progress: false,
            max_retries: 3,
        }
    }

    /// Options from the process environment (`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN`,
    /// `HF_TOKEN_PATH`, `HF_HUB_OFFLINE`, `HF_HUB_DISABLE_PROGRESS_BARS`, `XDG_CACHE_HOME`).
    pub fn from_env() -> Self {
        let mut options = Self::from_vars(|name| std::env::var(name).ok(), dirs::home_dir());
        options.progress &= std::io::stderr().is_terminal();
        options
    }

    /// [`HubOptions::from_env`] over any variable lookup (empty values count as unset), with the
    /// home folder given; `progress` is only the variable's verdict, not the terminal check.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>, home: Option<PathBuf>) -> Self {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache_root = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.unwrap_or_default().join(".cache"));
            cache_root.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .map(|t| t.trim().to_string())
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                read_token_file(&path)
            });
        HubOptions {
            cache_dir,
            endpoint,
            token,
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v)),
            progress: !var("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| truthy(&v)),
            max_retries: 3,
        }
    }

    /// Sets the endpoint (a trailing `/` is dropped).
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into().trim_end_matches('/').to_string();
        self
    }

    /// Sets the token.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Sets offline mode.
    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// Sets the retry count.
    pub fn with_max_retries(mut self, max_retries: usize) -> Self {
        self.max_retries = max_retries;
        self
    }
}

/// `huggingface_hub`'s reading of boolean variables.
fn truthy(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

fn read_token_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_string())
}
