//! The text tokenizer and the special-token ids the processor needs, resolved by their strings
//! (never hard-coded: DeepSeek-VL2's real ids differ from the fixture tokenizer's).

use std::path::{Path, PathBuf};

use dsvl2_config::TokenizerSource;
use tokenizers::Tokenizer;

use crate::ProcessorError;

/// A loaded `tokenizer.json` plus the ids of bos, eos and the image token.
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
    pub bos_id: u32,
    pub eos_id: u32,
    pub image_token_id: u32,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and looks up the special tokens by string.
    pub fn load(path: &Path, bos: &str, eos: &str, image_token: &str) -> Result<Self, ProcessorError> {
        if !path.is_file() {
            return Err(ProcessorError::Tokenizer {
                path: path.to_path_buf(),
                message: "file not found".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(path).map_err(|e| ProcessorError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::new(tokenizer, path, bos, eos, image_token)
    }

    /// Loads `tokenizer.json` from a file or from the text a GGUF embeds; errors name the file
    /// (and the metadata key).
    pub fn from_source(
        source: &TokenizerSource,
        bos: &str,
        eos: &str,
        image_token: &str,
    ) -> Result<Self, ProcessorError> {
        match source {
            TokenizerSource::File(path) => Self::load(path, bos, eos, image_token),
            TokenizerSource::Embedded { container, key, json } => {
                let label = PathBuf::from(format!("{} (metadata `{key}`)", container.display()));
                let tokenizer = Tokenizer::from_bytes(json.as_bytes()).map_err(|e| ProcessorError::Tokenizer {
                    path: label.clone(),
                    message: e.to_string(),
                })?;
                Self::new(tokenizer, &label, bos, eos, image_token)
            }
        }
    }

    /// Wraps an already loaded tokenizer; `path` only labels errors.
    pub fn new(
        tokenizer: Tokenizer,
        path: &Path,
        bos: &str,
        eos: &str,
        image_token: &str,
    ) -> Result<Self, ProcessorError> {
        let id = |what: &str, token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| ProcessorError::MissingSpecialToken {
                    what: what.to_string(),
                    token: token.to_string(),
                    path: path.to_path_buf(),
                })
        };
        let bos_id = id("bos", bos)?;
        let eos_id = id("eos", eos)?;
        let image_token_id = id("image", image_token)?;
        Ok(TextTokenizer {
            bos_id,
            eos_id,
            image_token_id,
            path: path.to_path_buf(),
            tokenizer,
        })
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `tokenizer.encode(text, add_special_tokens=False)`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ProcessorError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ProcessorError::Tokenize {
                action: "encode",
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// `tokenizer.decode(ids, skip_special_tokens=skip_special)` (no clean-up of spaces).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, ProcessorError> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| ProcessorError::Tokenize {
                action: "decode",
                message: e.to_string(),
            })
    }
}
