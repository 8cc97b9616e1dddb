//! The files of a DeepSeek-VL2 model folder, as the official Hugging Face repositories lay them out.
//!
//! * [`ModelConfig`]: `config.json` (vision tower, projector, language model, image layout), with the
//!   official defaults for absent keys resolved once, so model code never sees an `Option` it has to
//!   guess about.
//! * [`ProcessorConfig`]: `processor_config.json` (tiling resolutions, normalisation, special strings).
//! * [`ModelDir`]: finds the config files, the tokenizer and the weight files (one
//!   `model.safetensors` or the shards named by `model.safetensors.index.json`), or reads all of
//!   them from one GGUF file.
//! * [`gguf`]: the GGUF container: a header reader and a streaming writer.
//!
//! Every error names the file and, where there is one, the key.

mod error;
pub mod gguf;
mod language;
mod model_dir;
mod processor;
mod vl;

pub use error::ConfigError;
pub use gguf::{GgufFile, GgufTensorInfo, GgufValue, GgufWriter};
pub use language::{LanguageConfig, MoeConfig, RopeScaling, ScoringFunc, TopkMethod};
pub use model_dir::{ModelDir, TokenizerFiles, TokenizerSource, WeightFiles};

/// The file names of the official layout.
pub mod files {
    pub use crate::model_dir::{
        CONFIG_FILE, PROCESSOR_CONFIG_FILE, SINGLE_WEIGHTS_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE,
        TOKENIZER_FILE, WEIGHTS_INDEX_FILE,
    };
}
pub use processor::{ProcessorConfig, OFFICIAL_CANDIDATE_RESOLUTIONS};
pub use vl::{GlobalViewPos, ModelConfig, ProjectorConfig, ProjectorType, TileTag, VisionConfig};

use std::path::Path;

/// Reads a JSON file into `T`; errors name the file and the failing key path.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_json(path, &text)
}

/// Parses JSON text read from `path` (used for error messages only).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|err| ConfigError::Json {
        path: path.to_path_buf(),
        key: err.path().to_string(),
        message: err.into_inner().to_string(),
    })
}
