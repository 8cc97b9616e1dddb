//! A model folder in the official Hugging Face layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{ConfigError, ModelConfig, ProcessorConfig};

pub const CONFIG_FILE: &str = "config.json";
pub const PROCESSOR_CONFIG_FILE: &str = "processor_config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const SPECIAL_TOKENS_MAP_FILE: &str = "special_tokens_map.json";
pub const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Where the weights are.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightFiles {
    /// One `model.safetensors`.
    Single(PathBuf),
    /// Shards named by `model.safetensors.index.json`.
    Sharded {
        index: PathBuf,
        /// Distinct shard files, sorted.
        shards: Vec<PathBuf>,
        /// Tensor name -> shard file, as the index says.
        weight_map: BTreeMap<String, PathBuf>,
    },
}

impl WeightFiles {
    /// Every file holding weights.
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            WeightFiles::Single(p) => vec![p.clone()],
            WeightFiles::Sharded { shards, .. } => shards.clone(),
        }
    }
}

/// The tokenizer files; special-token strings come from `tokenizer_config.json` or
/// `special_tokens_map.json` when present.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerFiles {
    pub tokenizer_json: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
}

/// A resolved model folder: parsed configs plus the paths of the other files.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub root: PathBuf,
    pub config: ModelConfig,
    pub processor: ProcessorConfig,
    pub tokenizer: TokenizerFiles,
    pub weights: WeightFiles,
}

#[derive(Deserialize)]
struct WeightIndex {
    weight_map: BTreeMap<String, String>,
}

/// A special token in `tokenizer_config.json` is either a string or an `AddedToken` object.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Text(String),
    Added { content: String },
}

impl TokenSpec {
    fn content(self) -> String {
        match self {
            TokenSpec::Text(s) => s,
            TokenSpec::Added { content } => content,
        }
    }
}

#[derive(Deserialize, Default)]
struct SpecialTokens {
    bos_token: Option<TokenSpec>,
    eos_token: Option<TokenSpec>,
    pad_token: Option<TokenSpec>,
}

impl ModelDir {
    /// Opens a model folder: parses both configs, finds the tokenizer and the weights.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(ConfigError::MissingFile {
                dir: root,
                what: "model folder (not a directory)".into(),
            });
        }
        let config = ModelConfig::from_file(&require(&root, CONFIG_FILE)?)?;
        let processor = ProcessorConfig::from_file(&require(&root, PROCESSOR_CONFIG_FILE)?)?;
        let tokenizer = Self::find_tokenizer(&root)?;
        let weights = Self::find_weights(&root)?;
        Ok(ModelDir {
            root,
            config,
            processor,
            tokenizer,
            weights,
        })
    }

    fn find_tokenizer(root: &Path) -> Result<TokenizerFiles, ConfigError> {
        let tokenizer_json = require(root, TOKENIZER_FILE)?;
        let mut specials = SpecialTokens::default();
        // tokenizer_config.json wins over special_tokens_map.json, as in transformers.
        for file in [SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE] {
            let path = root.join(file);
            if path.is_file() {
                let found: SpecialTokens = crate::read_json(&path)?;
                specials.bos_token = found.bos_token.or(specials.bos_token);
                specials.eos_token = found.eos_token.or(specials.eos_token);
                specials.pad_token = found.pad_token.or(specials.pad_token);
            }
        }
        Ok(TokenizerFiles {
            tokenizer_json,
            bos_token: specials.bos_token.map(TokenSpec::content),
            eos_token: specials.eos_token.map(TokenSpec::content),
            pad_token: specials.pad_token.map(TokenSpec::content),
        })
    }

    fn find_weights(root: &Path) -> Result<WeightFiles, ConfigError> {
        let index = root.join(WEIGHTS_INDEX_FILE);
        if index.is_file() {
            let parsed: WeightIndex = crate::read_json(&index)?;
            let mut weight_map = BTreeMap::new();
            let mut shards = Vec::new();
            for (name, file) in parsed.weight_map {
                // Shards live beside the index; refuse paths that would leave the folder.
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(ConfigError::unsupported(
                        &index,
                        &format!("weight_map.{name}"),
                        format!("{file:?}"),
                        "shard names must be plain file names",
                    ));
                }
                let path = root.join(&file);
                if !shards.contains(&path) {
                    if !path.is_file() {
                        return Err(ConfigError::MissingFile {
                            dir: root.to_path_buf(),
                            what: format!("{file} (named by {WEIGHTS_INDEX_FILE} for `{name}`)"),
                        });
                    }
                    shards.push(path.clone());
                }
                weight_map.insert(name, path);
            }
            shards.sort();
            if shards.is_empty() {
                return Err(ConfigError::unsupported(&index, "weight_map", "{}", "names no tensors"));
            }
            return Ok(WeightFiles::Sharded {
                index,
                shards,
                weight_map,
            });
        }
        let single = root.join(SINGLE_WEIGHTS_FILE);
        if single.is_file() {
            return Ok(WeightFiles::Single(single));
        }
        Err(ConfigError::MissingFile {
            dir: root.to_path_buf(),
            what: format!("weights ({SINGLE_WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE})"),
        })
    }
}

fn require(root: &Path, file: &str) -> Result<PathBuf, ConfigError> {
    let path = root.join(file);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ConfigError::MissingFile {
            dir: root.to_path_buf(),
            what: file.to_string(),
        })
    }
}
