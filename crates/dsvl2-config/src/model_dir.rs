//! A model folder in the official Hugging Face layout, or one GGUF file holding the same files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::gguf::{self, GgufFile, GgufTensorInfo};
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
    /// One GGUF file (see [`crate::gguf`]); the tensors' data lies in it at absolute offsets.
    Gguf {
        path: PathBuf,
        /// Every tensor, in file order: official name, ggml type id, PyTorch-order shape,
        /// absolute byte offset from the start of the file, byte length.
        tensors: Vec<GgufTensorInfo>,
    },
}

impl WeightFiles {
    /// Every file holding weights.
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            WeightFiles::Single(p) => vec![p.clone()],
            WeightFiles::Sharded { shards, .. } => shards.clone(),
            WeightFiles::Gguf { path, .. } => vec![path.clone()],
        }
    }
}

/// Where the text of `tokenizer.json` comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSource {
    /// A `tokenizer.json` file.
    File(PathBuf),
    /// Embedded in a file (a GGUF) under a metadata key.
    Embedded {
        /// The file holding it.
        container: PathBuf,
        /// The metadata key (`tokenizer.huggingface.json`).
        key: String,
        /// The `tokenizer.json` text, verbatim.
        json: Arc<str>,
    },
}

/// The tokenizer files; special-token strings come from `tokenizer_config.json` or
/// `special_tokens_map.json` when present.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerFiles {
    /// The folder's `tokenizer.json`, or the GGUF file that embeds it (see `source`).
    pub tokenizer_json: PathBuf,
    /// Where to load the tokenizer from: the file above, or the text embedded in a GGUF.
    pub source: TokenizerSource,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
}

/// A resolved model folder (or GGUF file): parsed configs plus the paths of the other files.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The model folder, or the GGUF file.
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
    /// Opens a model folder: parses both configs, finds the tokenizer and the weights. A file is
    /// opened as a GGUF (see [`ModelDir::open_gguf`]).
    pub fn open(root: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let root = root.as_ref().to_path_buf();
        if root.is_file() {
            return Self::open_gguf(&root);
        }
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

    /// Opens a GGUF written by `dsvl2 quantize`: the configs and the tokenizer files come from
    /// its metadata (the JSON texts, verbatim, parsed as in a folder; errors name the GGUF and
    /// the metadata key), the weights are its tensors. `root` is the GGUF file.
    pub fn open_gguf(path: &Path) -> Result<Self, ConfigError> {
        let file = GgufFile::open(path)?;
        match file.get(gguf::keys::ARCHITECTURE) {
            Some(v) if v.as_str() == Some(gguf::ARCHITECTURE) => {}
            Some(v) => {
                return Err(ConfigError::unsupported(
                    path,
                    gguf::keys::ARCHITECTURE,
                    format!("{v:?}"),
                    format!(
                        "dsvl2 reads `{}` GGUF files, as `dsvl2 quantize` writes them",
                        gguf::ARCHITECTURE
                    ),
                ))
            }
            None => {
                return Err(ConfigError::MissingFile {
                    dir: path.to_path_buf(),
                    what: format!("metadata `{}` (not a dsvl2 GGUF?)", gguf::keys::ARCHITECTURE),
                })
            }
        }
        let config_text = gguf_text(&file, gguf::keys::CONFIG_JSON, CONFIG_FILE)?
            .ok_or_else(|| gguf_missing(path, gguf::keys::CONFIG_JSON, CONFIG_FILE))?;
        let config = ModelConfig::from_json(config_text, &gguf_label(path, gguf::keys::CONFIG_JSON))?;
        let processor_text = gguf_text(&file, gguf::keys::PROCESSOR_CONFIG_JSON, PROCESSOR_CONFIG_FILE)?
            .ok_or_else(|| gguf_missing(path, gguf::keys::PROCESSOR_CONFIG_JSON, PROCESSOR_CONFIG_FILE))?;
        let processor =
            ProcessorConfig::from_json(processor_text, &gguf_label(path, gguf::keys::PROCESSOR_CONFIG_JSON))?;
        let tokenizer_text = gguf_text(&file, gguf::keys::TOKENIZER_JSON, TOKENIZER_FILE)?
            .ok_or_else(|| gguf_missing(path, gguf::keys::TOKENIZER_JSON, TOKENIZER_FILE))?;
        let mut special_sources = Vec::new();
        for (key, name) in [
            (gguf::keys::SPECIAL_TOKENS_MAP_JSON, SPECIAL_TOKENS_MAP_FILE),
            (gguf::keys::TOKENIZER_CONFIG_JSON, TOKENIZER_CONFIG_FILE),
        ] {
            if let Some(text) = gguf_text(&file, key, name)? {
                special_sources.push((gguf_label(path, key), text.to_string()));
            }
        }
        let specials = merge_special_tokens(special_sources)?;
        let tokenizer = TokenizerFiles {
            tokenizer_json: path.to_path_buf(),
            source: TokenizerSource::Embedded {
                container: path.to_path_buf(),
                key: gguf::keys::TOKENIZER_JSON.to_string(),
                json: Arc::from(tokenizer_text),
            },
            bos_token: specials.bos_token.map(TokenSpec::content),
            eos_token: specials.eos_token.map(TokenSpec::content),
            pad_token: specials.pad_token.map(TokenSpec::content),
        };
        if file.tensors.is_empty() {
            return Err(ConfigError::MissingFile {
                dir: path.to_path_buf(),
                what: "weights (the GGUF holds no tensors)".into(),
            });
        }
        Ok(ModelDir {
            root: path.to_path_buf(),
            config,
            processor,
            tokenizer,
            weights: WeightFiles::Gguf {
                path: path.to_path_buf(),
                tensors: file.tensors,
            },
        })
    }

    fn find_tokenizer(root: &Path) -> Result<TokenizerFiles, ConfigError> {
        let tokenizer_json = require(root, TOKENIZER_FILE)?;
        let mut sources = Vec::new();
        // tokenizer_config.json wins over special_tokens_map.json, as in transformers.
        for file in [SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE] {
            let path = root.join(file);
            if path.is_file() {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
                    path: path.clone(),
                    source,
                })?;
                sources.push((path, text));
            }
        }
        let specials = merge_special_tokens(sources)?;
        Ok(TokenizerFiles {
            source: TokenizerSource::File(tokenizer_json.clone()),
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

/// Special tokens from JSON texts (path, text) in increasing priority.
fn merge_special_tokens(sources: Vec<(PathBuf, String)>) -> Result<SpecialTokens, ConfigError> {
    let mut specials = SpecialTokens::default();
    for (path, text) in sources {
        let found: SpecialTokens = crate::parse_json(&path, &text)?;
        specials.bos_token = found.bos_token.or(specials.bos_token);
        specials.eos_token = found.eos_token.or(specials.eos_token);
        specials.pad_token = found.pad_token.or(specials.pad_token);
    }
    Ok(specials)
}

/// How errors name a JSON text embedded in a GGUF: `model.gguf (metadata `dsvl2.config_json`)`.
fn gguf_label(path: &Path, key: &str) -> PathBuf {
    PathBuf::from(format!("{} (metadata `{key}`)", path.display()))
}

/// The string value of `key` (the text of `file_name`), `None` when absent.
fn gguf_text<'a>(file: &'a GgufFile, key: &str, file_name: &str) -> Result<Option<&'a str>, ConfigError> {
    match file.get(key) {
        None => Ok(None),
        Some(value) => value.as_str().map(Some).ok_or_else(|| ConfigError::Gguf {
            path: file.path.clone(),
            message: format!(
                "metadata `{key}` should be the text of {file_name}, but is a value of GGUF type {}",
                value.type_id()
            ),
        }),
    }
}

fn gguf_missing(path: &Path, key: &str, file_name: &str) -> ConfigError {
    ConfigError::MissingFile {
        dir: path.to_path_buf(),
        what: format!("metadata `{key}` (the model's {file_name})"),
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
