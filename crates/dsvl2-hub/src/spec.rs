//! `--model` specs: a local folder, or a Hub repo id `owner/name[@revision]`.

use std::path::PathBuf;

use crate::HubError;

/// The branch used when a spec names none.
pub const DEFAULT_REVISION: &str = "main";

/// A model repo on the Hub at one revision (branch, tag or commit hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRepo {
    /// `owner/name`.
    pub id: String,
    /// Branch, tag or 40-hex commit; `main` by default.
    pub revision: String,
}

/// What a `--model` value names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// An existing local folder, used as is.
    Local(PathBuf),
    /// A Hub repo.
    Hub(HubRepo),
}

impl ModelSpec {
    /// An existing directory wins; an existing file is refused; anything else must be a repo id.
    pub fn parse(spec: &str) -> Result<Self, HubError> {
        let path = PathBuf::from(spec);
        if path.is_dir() {
            return Ok(ModelSpec::Local(path));
        }
        if path.exists() {
            return Err(HubError::NotADirectory { path });
        }
        HubRepo::parse(spec).map(ModelSpec::Hub)
    }
}

impl HubRepo {
    /// A repo at `revision`, both checked like [`HubRepo::parse`].
    pub fn new(id: &str, revision: &str) -> Result<Self, HubError> {
        let invalid = |reason: String| HubError::InvalidSpec {
            spec: format!("{id}@{revision}"),
            reason,
        };
        check_repo_id(id).map_err(|r| HubError::InvalidSpec {
            spec: id.to_string(),
            reason: r,
        })?;
        check_revision(revision).map_err(invalid)?;
        Ok(HubRepo {
            id: id.to_string(),
            revision: revision.to_string(),
        })
    }

    /// Parses `owner/name` or `owner/name@revision`.
    pub fn parse(spec: &str) -> Result<Self, HubError> {
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, rev),
            None => (spec, DEFAULT_REVISION),
        };
        let invalid = |reason: String| HubError::InvalidSpec {
            spec: spec.to_string(),
            reason,
        };
        check_repo_id(id).map_err(invalid)?;
        check_revision(revision).map_err(invalid)?;
        Ok(HubRepo {
            id: id.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The repo's folder in the hub cache: `models--owner--name`.
    pub fn cache_folder_name(&self) -> String {
        hf_hub::Repo::model(self.id.clone()).folder_name()
    }

    /// Whether the revision is a full commit hash (then the cache needs no ref to find it).
    pub fn revision_is_commit(&self) -> bool {
        is_commit_hash(&self.revision)
    }
}

impl std::fmt::Display for HubRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.revision == DEFAULT_REVISION {
            write!(f, "{}", self.id)
        } else {
            write!(f, "{}@{}", self.id, self.revision)
        }
    }
}

/// 40 lowercase hex digits.
pub(crate) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The Hub's rules (huggingface_hub `validate_repo_id`), with the owner required.
fn check_repo_id(id: &str) -> Result<(), String> {
    let Some((owner, name)) = id.split_once('/') else {
        return Err("expected `owner/name`".into());
    };
    if name.contains('/') {
        return Err("a repo id has exactly one `/`".into());
    }
    if id.len() > 96 {
        return Err("a repo id has at most 96 characters".into());
    }
    for part in [owner, name] {
        if part.is_empty() {
            return Err("owner and name must not be empty".into());
        }
        if let Some(c) = part
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(format!(
                "{c:?} is not allowed in a repo id (letters, digits, `-`, `_`, `.`)"
            ));
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return Err("owner and name must not start or end with `-` or `.`".into());
        }
    }
    if id.contains("--") || id.contains("..") {
        return Err("`--` and `..` are not allowed in a repo id".into());
    }
    Ok(())
}

/// Revisions become paths under `refs/`: refuse anything that could leave that folder.
fn check_revision(revision: &str) -> Result<(), String> {
    if revision.is_empty() {
        return Err("empty revision after `@`".into());
    }
    if revision
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
    {
        return Err(format!("invalid revision {revision:?}"));
    }
    if revision
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!("invalid revision {revision:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_and_revisions() {
        let r = HubRepo::parse("deepseek-ai/deepseek-vl2-tiny").unwrap();
        assert_eq!(
            (r.id.as_str(), r.revision.as_str()),
            ("deepseek-ai/deepseek-vl2-tiny", "main")
        );
        let r = HubRepo::parse("a/b@refs/pr/1").unwrap();
        assert_eq!(r.revision, "refs/pr/1");
        assert_eq!(r.to_string(), "a/b@refs/pr/1");
        assert_eq!(r.cache_folder_name(), "models--a--b");
        assert!(
            HubRepo::parse(&format!("a/b@{}", "0123456789abcdef0123456789abcdef01234567"))
                .unwrap()
                .revision_is_commit()
        );
    }

    #[test]
    fn refuses_bad_specs() {
        for bad in [
            "not a repo",
            "gpt2",
            "a/b/c",
            "/a",
            "a/",
            "a--x/b",
            "a/b@",
            "a/b@../../x",
            "-a/b",
            "a/b c",
        ] {
            let err = HubRepo::parse(bad).unwrap_err();
            assert!(matches!(err, HubError::InvalidSpec { .. }), "{bad}: {err}");
            assert!(
                err.to_string().contains("not a directory and not a Hub repo id"),
                "{err}"
            );
        }
    }
}
