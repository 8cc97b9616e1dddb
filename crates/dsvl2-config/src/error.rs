use std::path::PathBuf;

/// A model folder that cannot be used, with the file (and key) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: invalid JSON at `{key}`: {message}", path.display())]
    Json {
        path: PathBuf,
        /// Dotted path of the offending key (`language_config.topk_method`), `.` for the root.
        key: String,
        message: String,
    },

    #[error("{}: `{key}` = {value} is not supported: {reason}", path.display())]
    Unsupported {
        path: PathBuf,
        key: String,
        value: String,
        reason: String,
    },

    #[error("{}: missing {what}", dir.display())]
    MissingFile { dir: PathBuf, what: String },

    /// A GGUF file that cannot be read: bad magic, unsupported version, truncated, a tensor past
    /// the end of the file, an unsupported ggml type.
    #[error("{}: {message}", path.display())]
    Gguf { path: PathBuf, message: String },
}

impl ConfigError {
    pub(crate) fn unsupported(
        path: &std::path::Path,
        key: &str,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError::Unsupported {
            path: path.to_path_buf(),
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}
