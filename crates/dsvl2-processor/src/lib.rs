//! DeepSeek-VL2 input pipeline: a conversation and its images become exactly the token ids, image
//! masks, tile grids and pixels that the official PyTorch `DeepseekVLV2Processor` produces
//! (Pillow 11 decoding and bicubic resampling, the "deepseek" template and its quirks).
//!
//! Modules, one job each:
//! * [`image`]: decode files to RGB like `PIL.Image.open(f).convert("RGB")`; Pillow's resampler;
//! * [`tiling`]: best resolution, `ImageOps.pad`, tiles, normalisation;
//! * [`conversation`]: the official conversation JSON;
//! * [`prompt`]: the template text and the prompt ids;
//! * [`tokenize`]: the tokenizer and its special-token ids;
//! * [`TextStream`]: incremental detokenization for streaming;
//! * [`grounding`]: `<|ref|>`/`<|det|>` boxes of an answer as data; [`mod@annotate`]: drawing them.

pub mod annotate;
pub mod conversation;
mod detokenize;
mod error;
pub mod grounding;
pub mod image;
pub mod prompt;
pub mod tiling;
pub mod tokenize;

use std::path::Path;

use dsvl2_config::{ModelDir, ProcessorConfig};

pub use annotate::{annotate, save_png};
pub use conversation::{Conversation, Message, Role};
pub use detokenize::{AnswerText, StopStrings, TextStream};
pub use error::ProcessorError;
pub use grounding::{parse_grounding, reference_accepts, GroundedBox, Grounding};
pub use image::{decode_image, load_image, DecodeOptions, RgbImage, PILLOW_MAX_PIXELS};
pub use tiling::{select_best_resolution, ImageTiles};
pub use tokenize::TextTokenizer;

/// Everything the model needs for one request (the reference processor's output, unbatched).
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedInput {
    /// The template text (reported only; the ids are built per message).
    pub sft_format: String,
    pub input_ids: Vec<u32>,
    /// True on the image placeholder positions.
    pub images_seq_mask: Vec<bool>,
    /// `[num_width_tiles, num_height_tiles]` per image; empty for a text-only prompt (the reference
    /// reports `[[0, 0]]` there).
    pub images_spatial_crop: Vec<[usize; 2]>,
    /// Placeholder tokens per image.
    pub num_image_tokens: Vec<usize>,
    /// `[n_tiles, 3, tile_size, tile_size]`: per image the global view, then the local tiles row-major.
    pub pixel_values: Vec<f32>,
    pub n_tiles: usize,
    pub tile_size: usize,
}

impl PreparedInput {
    /// Shape of `pixel_values`.
    pub fn pixel_shape(&self) -> [usize; 4] {
        [self.n_tiles, 3, self.tile_size, self.tile_size]
    }
}

/// The processor: tokenizer, processor config and image decoding options.
pub struct Processor {
    tokenizer: TextTokenizer,
    config: ProcessorConfig,
    decode_options: DecodeOptions,
}

impl Processor {
    /// Loads the tokenizer of a model folder (or the one a GGUF embeds); bos/eos come from its tokenizer config, the image
    /// token from `processor_config.json`.
    pub fn from_model_dir(dir: &ModelDir) -> Result<Self, ProcessorError> {
        let files = &dir.tokenizer;
        let bos = files
            .bos_token
            .as_deref()
            .ok_or_else(|| ProcessorError::UnnamedSpecialToken { what: "bos".into() })?;
        let eos = files
            .eos_token
            .as_deref()
            .ok_or_else(|| ProcessorError::UnnamedSpecialToken { what: "eos".into() })?;
        let tokenizer = TextTokenizer::from_source(&files.source, bos, eos, &dir.processor.image_token)?;
        Ok(Processor {
            tokenizer,
            config: dir.processor.clone(),
            decode_options: DecodeOptions::default(),
        })
    }

    /// Builds a processor from its parts (`tokenizer_json` is a `tokenizer.json` file).
    pub fn new(config: ProcessorConfig, tokenizer_json: &Path, bos: &str, eos: &str) -> Result<Self, ProcessorError> {
        let tokenizer = TextTokenizer::load(tokenizer_json, bos, eos, &config.image_token)?;
        Ok(Processor {
            tokenizer,
            config,
            decode_options: DecodeOptions::default(),
        })
    }

    /// Replaces the image decoding options (pixel limit).
    pub fn with_decode_options(mut self, options: DecodeOptions) -> Self {
        self.decode_options = options;
        self
    }

    pub fn config(&self) -> &ProcessorConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        self.tokenizer.inner()
    }

    pub fn bos_id(&self) -> u32 {
        self.tokenizer.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.tokenizer.eos_id
    }

    pub fn image_token_id(&self) -> u32 {
        self.tokenizer.image_token_id
    }

    /// Tile side in pixels (`candidate_resolutions[0][0]`).
    pub fn tile_size(&self) -> usize {
        self.config.image_size() as usize
    }

    /// `tokenizer.decode(ids, skip_special_tokens=skip_special)`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, ProcessorError> {
        self.tokenizer.decode(ids, skip_special)
    }

    /// `tokenizer.encode(text, add_special_tokens=False)`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ProcessorError> {
        self.tokenizer.encode(text)
    }

    /// Loads one image the way the reference's `load_pil_images` does.
    pub fn load_image(&self, path: &Path) -> Result<RgbImage, ProcessorError> {
        load_image(path, &self.decode_options)
    }

    /// Loads every image the conversation names, in order.
    pub fn load_images(&self, conversation: &Conversation) -> Result<Vec<RgbImage>, ProcessorError> {
        conversation
            .image_paths()
            .into_iter()
            .map(|p| self.load_image(p))
            .collect()
    }

    /// Loads the conversation's images, then [`Processor::prepare`]s.
    pub fn prepare_with_files(
        &self,
        conversation: &Conversation,
        system_prompt: &str,
    ) -> Result<PreparedInput, ProcessorError> {
        let images = self.load_images(conversation)?;
        self.prepare(conversation, &images, system_prompt)
    }

    /// The 8-bit views of each image. Cropping (several local tiles) is on only when there are at
    /// most two images in the whole request, as in the reference.
    pub fn tile_images(&self, images: &[RgbImage]) -> Vec<ImageTiles> {
        let cropping = images.len() <= 2;
        let color = self.config.pad_color();
        images
            .iter()
            .map(|img| {
                tiling::tile_image(
                    img,
                    self.config.image_size(),
                    &self.config.candidate_resolutions,
                    cropping,
                    color,
                )
            })
            .collect()
    }

    /// Turns a conversation and its images (in tag order) into model inputs. A conversation that
    /// does not end with an assistant message gets the empty assistant turn appended (the
    /// reference would fail its final-eos assertion instead).
    pub fn prepare(
        &self,
        conversation: &Conversation,
        images: &[RgbImage],
        system_prompt: &str,
    ) -> Result<PreparedInput, ProcessorError> {
        let mut messages = conversation.messages.clone();
        if messages.last().is_some_and(|m| m.role != Role::Assistant) {
            messages.push(Message::assistant(""));
        }
        let image_token = &self.config.image_token;
        prompt::validate(&messages, image_token, images.len())?;
        if let Some((k, img)) = images.iter().enumerate().find(|(_, i)| i.width == 0 || i.height == 0) {
            return Err(ProcessorError::EmptyImage {
                name: format!("image {k}"),
                width: img.width,
                height: img.height,
            });
        }

        let tiled = self.tile_images(images);
        let grids: Vec<[usize; 2]> = tiled.iter().map(|t| [t.tiles_w, t.tiles_h]).collect();
        let tokens = prompt::build_ids(
            &self.tokenizer,
            &messages,
            image_token,
            &grids,
            self.config.tokens_per_side(),
        )?;

        let tile_size = self.tile_size();
        let n_tiles = tiled.iter().map(|t| t.tiles.len()).sum();
        let mut pixel_values = Vec::with_capacity(n_tiles * 3 * tile_size * tile_size);
        for tile in tiled.iter().flat_map(|t| &t.tiles) {
            tiling::normalize_into(
                tile,
                self.config.image_mean,
                self.config.image_std,
                self.config.normalize,
                &mut pixel_values,
            );
        }
        Ok(PreparedInput {
            sft_format: prompt::sft_format(&messages, system_prompt),
            input_ids: tokens.ids,
            images_seq_mask: tokens.image_mask,
            images_spatial_crop: grids,
            num_image_tokens: tokens.num_image_tokens,
            pixel_values,
            n_tiles,
            tile_size,
        })
    }
}
