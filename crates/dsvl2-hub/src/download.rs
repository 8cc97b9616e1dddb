//! Fetching a model's files from the Hub with hf-hub (blocking ureq client) into the cache.
//!
//! Steps: one `GET /api/models/{repo}/revision/{revision}` pins the commit and lists the repo's
//! files; then each needed file is downloaded at that commit (so all land in one snapshot folder),
//! skipping files the snapshot already holds. hf-hub streams each file into `blobs/<etag>.part`,
//! renames it to `blobs/<etag>` and links `snapshots/<commit>/<file>` to it; we then check the
//! size against the one the Hub announced, so a body cut short without an error (a server that
//! closes a `Connection: close` response early) never stays in the snapshot.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo};

use crate::cache::{shard_names, RepoCache, OPTIONAL_FILES, REQUIRED_FILES, SINGLE_WEIGHTS_FILE, WEIGHTS_INDEX_FILE};
use crate::progress::{FileProgress, Tracker};
use crate::{HubError, HubOptions, HubRepo, Snapshot};

/// What a request was for, to name it in errors.
struct Ctx<'a> {
    repo: &'a HubRepo,
    endpoint: &'a str,
    token_set: bool,
    /// `None` for the repo-info request.
    file: Option<&'a str>,
}

impl Ctx<'_> {
    fn what(&self) -> String {
        match self.file {
            Some(file) => file.to_string(),
            None => format!("revision {}", self.repo.revision),
        }
    }
}

pub(crate) fn fetch(repo: &HubRepo, options: &HubOptions) -> Result<Snapshot, HubError> {
    let cache = RepoCache::new(&options.cache_dir, repo);
    let api = ApiBuilder::from_cache(Cache::new(options.cache_dir.clone()))
        .with_endpoint(options.endpoint.clone())
        .with_token(options.token.clone())
        .with_progress(false)
        .with_retries(0)
        .with_user_agent("dsvl2", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| HubError::Network {
            repo: repo.id.clone(),
            what: "client setup".into(),
            endpoint: options.endpoint.clone(),
            cause: e.to_string(),
        })?;
    let ctx = Ctx {
        repo,
        endpoint: &options.endpoint,
        token_set: options.token.is_some(),
        file: None,
    };
    let (commit, siblings) = repo_info(&api, &ctx)?;
    let mut fetcher = Fetcher {
        api: &api,
        repo,
        options,
        cache: &cache,
        commit: commit.clone(),
        siblings,
        snapshot: cache.snapshot(&commit),
        files: Vec::new(),
        downloaded: Vec::new(),
        downloaded_bytes: 0,
    };
    fetcher.check_layout()?;
    for file in REQUIRED_FILES {
        fetcher.fetch(file, true)?;
    }
    for file in OPTIONAL_FILES {
        fetcher.fetch(file, false)?;
    }
    if fetcher.fetch(WEIGHTS_INDEX_FILE, false)? {
        let bytes = std::fs::read(fetcher.snapshot.join(WEIGHTS_INDEX_FILE))
            .map_err(|e| HubError::io(fetcher.snapshot.join(WEIGHTS_INDEX_FILE), e))?;
        let shards = shard_names(&bytes).map_err(|reason| fetcher.not_a_model(reason))?;
        for shard in &shards {
            fetcher.fetch(shard, true)?;
        }
    } else {
        fetcher.fetch(SINGLE_WEIGHTS_FILE, true)?;
    }

    // The branch or tag now points at this commit (a commit-hash revision needs no ref).
    if !repo.revision_is_commit() {
        hf_hub::Cache::new(options.cache_dir.clone())
            .repo(Repo::with_revision(
                repo.id.clone(),
                hf_hub::RepoType::Model,
                repo.revision.clone(),
            ))
            .create_ref(&commit)
            .map_err(|e| HubError::io(cache.ref_path(&repo.revision), e))?;
    }
    // hf-hub writes `refs/<commit>` because we download by commit; huggingface_hub never does.
    let stray = cache.ref_path(&commit);
    if std::fs::read_to_string(&stray).is_ok_and(|c| c.trim() == commit) {
        let _ = std::fs::remove_file(stray);
    }

    Ok(Snapshot {
        path: fetcher.snapshot,
        repo_id: repo.id.clone(),
        revision: repo.revision.clone(),
        commit,
        files: fetcher.files,
        downloaded: fetcher.downloaded,
        downloaded_bytes: fetcher.downloaded_bytes,
    })
}

/// The commit a revision points to, and the repo's file names (when the Hub lists them).
fn repo_info(api: &Api, ctx: &Ctx) -> Result<(String, Option<HashSet<String>>), HubError> {
    let request = api.repo(hub_repo(ctx.repo, &ctx.repo.revision)).info_request();
    let response = request.call().map_err(|e| request_error(e, ctx))?;
    let text = response.into_string().map_err(|e| HubError::Network {
        repo: ctx.repo.id.clone(),
        what: ctx.what(),
        endpoint: ctx.endpoint.to_string(),
        cause: format!("reading the repo info: {e}"),
    })?;
    let protocol = |problem: String| HubError::Protocol {
        repo: ctx.repo.id.clone(),
        what: ctx.what(),
        endpoint: ctx.endpoint.to_string(),
        problem,
    };
    let info: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| protocol(format!("repo info is not JSON: {e}")))?;
    let commit = info
        .get("sha")
        .and_then(|s| s.as_str())
        .filter(|s| crate::spec::is_commit_hash(s))
        .ok_or_else(|| protocol("repo info has no commit `sha`".into()))?
        .to_string();
    let siblings = info.get("siblings").and_then(|s| s.as_array()).map(|list| {
        list.iter()
            .filter_map(|s| s.get("rfilename").and_then(|f| f.as_str()).map(str::to_string))
            .collect()
    });
    Ok((commit, siblings))
}

fn hub_repo(repo: &HubRepo, revision: &str) -> Repo {
    Repo::with_revision(repo.id.clone(), hf_hub::RepoType::Model, revision.to_string())
}

struct Fetcher<'a> {
    api: &'a Api,
    repo: &'a HubRepo,
    options: &'a HubOptions,
    cache: &'a RepoCache,
    commit: String,
    siblings: Option<HashSet<String>>,
    snapshot: PathBuf,
    files: Vec<String>,
    downloaded: Vec<String>,
    downloaded_bytes: u64,
}

impl Fetcher<'_> {
    fn not_a_model(&self, reason: String) -> HubError {
        HubError::NotAModel {
            repo: self.repo.id.clone(),
            revision: self.repo.revision.clone(),
            reason,
        }
    }

    /// With a file list, refuse repos lacking a needed file before downloading anything.
    fn check_layout(&self) -> Result<(), HubError> {
        let Some(siblings) = &self.siblings else {
            return Ok(());
        };
        let mut missing: Vec<&str> = REQUIRED_FILES.into_iter().filter(|f| !siblings.contains(*f)).collect();
        if !siblings.contains(WEIGHTS_INDEX_FILE) && !siblings.contains(SINGLE_WEIGHTS_FILE) {
            missing.push("model.safetensors (or model.safetensors.index.json with its shards)");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(self.not_a_model(format!("the repo has no {}", missing.join(", "))))
        }
    }

    /// Makes `file` present in the snapshot. Returns `false` for an optional file the repo lacks
    /// (then a `.no_exist` marker records that, as huggingface_hub does).
    fn fetch(&mut self, file: &str, required: bool) -> Result<bool, HubError> {
        let listed = self.siblings.as_ref().is_none_or(|s| s.contains(file));
        if !listed {
            if required {
                return Err(self.not_a_model(format!("the repo has no {file}")));
            }
            self.mark_absent(file);
            return Ok(false);
        }
        let dest = self.snapshot.join(file);
        if dest.is_file() {
            self.files.push(file.to_string());
            return Ok(true);
        }
        let mut attempt = 0;
        loop {
            match self.download(file, &dest) {
                Ok(size) => {
                    self.files.push(file.to_string());
                    self.downloaded.push(file.to_string());
                    self.downloaded_bytes += size;
                    return Ok(true);
                }
                Err(HubError::FileNotFound { .. }) if !required => {
                    self.mark_absent(file);
                    return Ok(false);
                }
                Err(err) if err.is_retryable() && attempt < self.options.max_retries => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(250 * attempt as u64));
                }
                Err(err) => return Err(err),
            }
        }
    }

    fn mark_absent(&self, file: &str) {
        let marker = self.cache.no_exist(&self.commit, file);
        if let Some(parent) = marker.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::File::create(marker);
    }

    /// One transfer attempt (resuming a `.part` left by an earlier one). Returns the file size.
    fn download(&self, file: &str, dest: &Path) -> Result<u64, HubError> {
        let ctx = Ctx {
            repo: self.repo,
            endpoint: &self.options.endpoint,
            token_set: self.options.token.is_some(),
            file: Some(file),
        };
        // Long names keep their end, where shard numbers are.
        let label = match file.char_indices().rev().nth(35) {
            Some((at, _)) => format!("..{}", &file[at..]),
            None => file.to_string(),
        };
        let mut progress = FileProgress::new(label, self.options.progress);
        let result = self
            .api
            .repo(hub_repo(self.repo, &self.commit))
            .download_with_progress(file, Tracker(&mut progress));
        let path = match result {
            Ok(path) => path,
            Err(err) => return Err(self.api_error(err, &ctx, &progress)),
        };
        let size = std::fs::metadata(&path).map_err(|e| HubError::io(&path, e))?.len();
        if let Some(expected) = progress.expected {
            if size != expected {
                self.quarantine(&path, size, expected);
                return Err(HubError::Interrupted {
                    repo: self.repo.id.clone(),
                    file: file.to_string(),
                    received: size,
                    expected,
                    cause: "the connection closed before the end of the file".into(),
                    blobs_dir: self.cache.blobs(),
                });
            }
        }
        if path != dest {
            // The server put the file under another commit (`x-repo-commit`): link it here too.
            self.link_into_snapshot(&path, dest)?;
        }
        Ok(size)
    }

    /// Takes a short file back out of the snapshot; its bytes become the `.part` the next try resumes.
    fn quarantine(&self, pointer: &Path, size: u64, expected: u64) {
        let blob = std::fs::canonicalize(pointer).ok();
        let _ = std::fs::remove_file(pointer);
        if let Some(blob) = blob.filter(|b| b.starts_with(self.cache.blobs().canonicalize().unwrap_or_default())) {
            let mut part = blob.clone();
            part.set_extension("part");
            if size < expected && !part.exists() {
                if std::fs::rename(&blob, &part).is_err() {
                    let _ = std::fs::remove_file(&blob);
                }
            } else {
                let _ = std::fs::remove_file(&blob);
            }
        }
    }

    fn link_into_snapshot(&self, path: &Path, dest: &Path) -> Result<(), HubError> {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| HubError::io(parent, e))?;
        }
        #[cfg(unix)]
        if let Ok(target) = std::fs::read_link(path) {
            // Same depth under `snapshots/`, so the relative target works unchanged.
            if std::os::unix::fs::symlink(&target, dest).is_ok() && dest.is_file() {
                return Ok(());
            }
            let _ = std::fs::remove_file(dest);
        }
        std::fs::copy(path, dest).map(|_| ()).map_err(|e| HubError::io(dest, e))
    }

    fn api_error(&self, err: ApiError, ctx: &Ctx, progress: &FileProgress) -> HubError {
        let file = ctx.file.unwrap_or_default().to_string();
        match err {
            ApiError::RequestError(e) => request_error(*e, ctx),
            ApiError::TooManyRetries(inner) => self.api_error(*inner, ctx, progress),
            ApiError::IoError(e) if progress.expected.is_some() && is_transfer_error(&e) => HubError::Interrupted {
                repo: ctx.repo.id.clone(),
                file,
                received: progress.received,
                expected: progress.expected.unwrap_or_default(),
                cause: e.to_string(),
                blobs_dir: self.cache.blobs(),
            },
            ApiError::IoError(e) => HubError::io(self.cache.root.clone(), e),
            ApiError::MissingHeader(h) => protocol(ctx, format!("no `{h}` header")),
            ApiError::InvalidHeader(h) => protocol(ctx, format!("invalid `{h}` header")),
            ApiError::ParseIntError(e) => protocol(ctx, format!("invalid file size in `Content-Range`: {e}")),
            ApiError::LockAcquisition(lock) => HubError::Locked {
                repo: ctx.repo.id.clone(),
                file,
                lock,
            },
            ApiError::InvalidResume => HubError::CorruptPartial {
                repo: ctx.repo.id.clone(),
                file,
                blobs_dir: self.cache.blobs(),
            },
            // Variants behind hf-hub features another crate may enable (native-tls).
            #[allow(unreachable_patterns)]
            other => protocol(ctx, other.to_string()),
        }
    }
}

fn protocol(ctx: &Ctx, problem: String) -> HubError {
    HubError::Protocol {
        repo: ctx.repo.id.clone(),
        what: ctx.what(),
        endpoint: ctx.endpoint.to_string(),
        problem,
    }
}

/// Errors of reading a response body (as opposed to writing the cache).
fn is_transfer_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | TimedOut | InvalidData | Interrupted
    ) || e
        .get_ref()
        .is_some_and(|inner| inner.is::<ureq::Error>() || inner.is::<ureq::Transport>())
}

/// Maps a ureq failure (HTTP status or transport) to a [`HubError`] naming the repo and file.
fn request_error(err: ureq::Error, ctx: &Ctx) -> HubError {
    let repo = ctx.repo.id.clone();
    let endpoint = ctx.endpoint.to_string();
    match err {
        ureq::Error::Status(status, response) => {
            let code = response.header("x-error-code").map(str::to_string);
            let message = response.header("x-error-message").map(str::to_string);
            let detail = message.as_ref().map(|m| format!(" ({m})")).unwrap_or_default();
            let no_token_hint = if ctx.token_set {
                String::new()
            } else {
                " (or it is private: set HF_TOKEN)".to_string()
            };
            match (status, code.as_deref()) {
                (_, Some("RepoNotFound")) => HubError::RepoNotFound {
                    repo,
                    endpoint,
                    hint: no_token_hint,
                },
                (_, Some("RevisionNotFound")) => HubError::RevisionNotFound {
                    repo,
                    revision: ctx.repo.revision.clone(),
                    endpoint,
                },
                (_, Some("EntryNotFound")) => HubError::FileNotFound {
                    repo,
                    revision: ctx.repo.revision.clone(),
                    file: ctx.what(),
                    endpoint,
                },
                (401 | 403, code) => {
                    let hint = if code == Some("GatedRepo") || status == 403 {
                        "the repo is gated or private: accept its terms on the Hub page and set HF_TOKEN to a token \
                         with access"
                    } else if ctx.token_set {
                        "the token (HF_TOKEN or the token file) was refused or has no access to this repo"
                    } else {
                        "the repo is private or gated: set HF_TOKEN (or run `huggingface-cli login`)"
                    };
                    HubError::Unauthorized {
                        repo,
                        what: ctx.what(),
                        status,
                        endpoint,
                        detail,
                        hint: hint.to_string(),
                    }
                }
                (404, _) if ctx.file.is_none() => HubError::RepoNotFound {
                    repo,
                    endpoint,
                    hint: no_token_hint,
                },
                (404, _) => HubError::FileNotFound {
                    repo,
                    revision: ctx.repo.revision.clone(),
                    file: ctx.what(),
                    endpoint,
                },
                _ => HubError::Http {
                    repo,
                    what: ctx.what(),
                    status,
                    endpoint,
                    detail,
                },
            }
        }
        ureq::Error::Transport(transport) => match transport.kind() {
            ureq::ErrorKind::BadStatus | ureq::ErrorKind::BadHeader => HubError::Protocol {
                repo,
                what: ctx.what(),
                endpoint,
                problem: transport.to_string(),
            },
            _ => HubError::Network {
                repo,
                what: ctx.what(),
                endpoint,
                cause: transport.to_string(),
            },
        },
    }
}
