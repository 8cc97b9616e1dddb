//! Looking up a model in the Hugging Face cache without any network.
//!
//! Layout (shared with `huggingface_hub`): `<cache_dir>/models--owner--name/` holds
//! `refs/<branch>` (a file with the commit hash), `snapshots/<commit>/<file>` (symlinks into
//! `blobs/`), `blobs/<etag>` (content; `<etag>.part` while downloading) and
//! `.no_exist/<commit>/<file>` (markers for files known to be absent from the repo).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::spec::is_commit_hash;
use crate::HubRepo;

// The names `dsvl2_config::ModelDir::open` looks for.
pub use dsvl2_config::files::{
    CONFIG_FILE, PROCESSOR_CONFIG_FILE, SINGLE_WEIGHTS_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE, WEIGHTS_INDEX_FILE,
};

/// Files every model needs.
pub const REQUIRED_FILES: [&str; 3] = [CONFIG_FILE, PROCESSOR_CONFIG_FILE, TOKENIZER_FILE];
/// Files fetched when the repo has them.
pub const OPTIONAL_FILES: [&str; 2] = [TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE];

/// The cache folders of one repo.
pub(crate) struct RepoCache {
    pub root: PathBuf,
}

impl RepoCache {
    pub fn new(cache_dir: &Path, repo: &HubRepo) -> Self {
        RepoCache {
            root: cache_dir.join(repo.cache_folder_name()),
        }
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }

    pub fn ref_path(&self, revision: &str) -> PathBuf {
        self.root.join("refs").join(revision)
    }

    pub fn no_exist(&self, commit: &str, file: &str) -> PathBuf {
        self.root.join(".no_exist").join(commit).join(file)
    }

    /// The commit a revision points to in the cache: itself when it is a hash, else `refs/<revision>`.
    pub fn commit_for(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.ref_path(revision)).ok()?;
        let commit = text.trim();
        (!commit.is_empty() && !commit.contains(['/', '\\'])).then(|| commit.to_string())
    }

    /// Checks that a snapshot holds everything a model needs. Optional files must be present or
    /// known absent (`.no_exist`), unless `lenient_optional`. Returns the files present, or the
    /// first missing one.
    pub fn check_snapshot(&self, commit: &str, lenient_optional: bool) -> Result<Vec<String>, String> {
        let dir = self.snapshot(commit);
        let mut present = Vec::new();
        for file in REQUIRED_FILES {
            if !dir.join(file).is_file() {
                return Err(file.to_string());
            }
            present.push(file.to_string());
        }
        for file in OPTIONAL_FILES {
            if dir.join(file).is_file() {
                present.push(file.to_string());
            } else if !lenient_optional && !self.no_exist(commit, file).exists() {
                return Err(file.to_string());
            }
        }
        let index = dir.join(WEIGHTS_INDEX_FILE);
        if index.is_file() {
            let shards = std::fs::read(&index)
                .ok()
                .and_then(|bytes| shard_names(&bytes).ok())
                .ok_or_else(|| WEIGHTS_INDEX_FILE.to_string())?;
            present.push(WEIGHTS_INDEX_FILE.to_string());
            for shard in shards {
                if !dir.join(&shard).is_file() {
                    return Err(shard);
                }
                present.push(shard);
            }
        } else if dir.join(SINGLE_WEIGHTS_FILE).is_file() {
            present.push(SINGLE_WEIGHTS_FILE.to_string());
        } else if self.no_exist(commit, WEIGHTS_INDEX_FILE).exists() {
            return Err(SINGLE_WEIGHTS_FILE.to_string());
        } else {
            return Err(WEIGHTS_INDEX_FILE.to_string());
        }
        Ok(present)
    }
}

/// The distinct shard files named by a `model.safetensors.index.json`, in first-seen order;
/// names must be plain file names (no folders), as `ModelDir::open` requires.
pub(crate) fn shard_names(index_json: &[u8]) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_slice(index_json).map_err(|e| format!("invalid {WEIGHTS_INDEX_FILE}: {e}"))?;
    let mut shards: Vec<String> = Vec::new();
    for (tensor, file) in index.weight_map {
        if file.is_empty() || file.contains(['/', '\\']) || file == "." || file == ".." {
            return Err(format!(
                "{WEIGHTS_INDEX_FILE} names {file:?} for `{tensor}`: not a plain file name"
            ));
        }
        if !shards.contains(&file) {
            shards.push(file);
        }
    }
    if shards.is_empty() {
        return Err(format!("{WEIGHTS_INDEX_FILE} names no shard"));
    }
    shards.sort();
    Ok(shards)
}
