//! Local files, only inside `MediaPolicy::allowed_local_dir`.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::error::MediaError;

/// Reads `path` if it lies inside `dir` (blocking; run it off the async executor).
///
/// * any `..` component is refused outright, even one that would stay inside;
/// * a relative path is taken relative to `dir`; an absolute path must lie under `dir` as written
///   (checked before touching the file system, so errors do not reveal which files exist
///   elsewhere);
/// * the path is canonicalised (symlinks resolved) and must still lie under the canonical `dir`;
/// * on Linux the opened file's real path (`/proc/self/fd/N`) is checked again, so a symlink
///   swapped in between the check and the open is caught;
/// * it must be a regular file of at most `max_bytes` bytes.
pub(crate) fn read_local(reference: &str, path: &Path, dir: &Path, max_bytes: u64) -> Result<Vec<u8>, MediaError> {
    let refused = |reason: &str| MediaError::LocalPathRefused {
        reference: reference.to_string(),
        reason: reason.into(),
    };
    let io = |source: std::io::Error| MediaError::Io {
        reference: reference.to_string(),
        source,
    };

    if path.as_os_str().is_empty() {
        return Err(refused("the path is empty"));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(refused("'..' is not allowed in local paths"));
    }
    let canonical_dir = dir.canonicalize().map_err(|e| MediaError::Io {
        reference: reference.to_string(),
        source: std::io::Error::new(
            e.kind(),
            format!("the allowed directory {} is not usable: {e}", dir.display()),
        ),
    })?;
    let full: PathBuf = if path.is_absolute() {
        if !path.starts_with(&canonical_dir) && !path.starts_with(dir) {
            return Err(refused("it is outside the allowed directory"));
        }
        path.to_path_buf()
    } else {
        canonical_dir.join(path)
    };
    let canonical = full.canonicalize().map_err(io)?;
    if !canonical.starts_with(&canonical_dir) {
        return Err(refused("it resolves (through a symlink) outside the allowed directory"));
    }
    // Checked before opening too: opening a FIFO would block.
    if !std::fs::metadata(&canonical).map_err(io)?.is_file() {
        return Err(refused("it is not a regular file"));
    }
    let file = File::open(&canonical).map_err(io)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if let Ok(real) = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
            if !real.starts_with(&canonical_dir) {
                return Err(refused("it resolves (through a symlink) outside the allowed directory"));
            }
        }
    }
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(refused("it is not a regular file"));
    }
    if meta.len() > max_bytes {
        return Err(MediaError::TooLarge {
            reference: reference.to_string(),
            size: Some(meta.len()),
            limit: max_bytes,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > max_bytes {
        return Err(MediaError::TooLarge {
            reference: reference.to_string(),
            size: None,
            limit: max_bytes,
        });
    }
    Ok(bytes)
}
