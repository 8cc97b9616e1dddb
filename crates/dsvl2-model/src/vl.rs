//! The composition (`DeepseekVLV2ForCausalLM`): vision tower -> projector -> 2D image-token layout,
//! scattered into the token embeddings, then the language model.

use candle_core::{DType, Device, Tensor};
use dsvl2_config::{ModelConfig, ModelDir};

use dsvl2_kernels::Format;

use crate::language::LanguageModel;
use crate::projector::Projector;
use crate::vision::VisionTower;
use crate::{CacheFormat, GgufWeights, ModelError, SequenceCache, Weights};

/// Per-stage outputs of one prefill, for parity tests and debugging.
#[derive(Debug, Default)]
pub struct LayerTrace {
    /// `[n_tiles, grid*grid, width]`.
    pub vision_features: Option<Tensor>,
    /// `[n_tiles, tokens_per_tile, hidden]`.
    pub projector_out: Option<Tensor>,
    /// `[len, hidden]`.
    pub inputs_embeds: Option<Tensor>,
    /// Input of each decoder layer at the last position, then the final-norm output.
    pub hidden_last: Vec<Tensor>,
}

pub struct DeepseekVl2 {
    vision: VisionTower,
    projector: Projector,
    image_newline: Tensor,
    view_separator: Tensor,
    language: LanguageModel,
    config: ModelConfig,
    device: Device,
}

/// How to load a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Storage of the linear layers' weights (`--dtype`); each layer gets the best format its
    /// shape allows (see [`crate::storage_format`]). Activations are always f32.
    pub weight_format: Format,
    /// Where a GGUF file's quantized weights are read from while running (see [`GgufWeights`]).
    pub gguf_weights: GgufWeights,
    /// How caches hold MHA keys and values (`--kv-cache`); `None`: f32 with f32 weights, f16
    /// otherwise (see [`LanguageModel::cache_format`]).
    pub kv_cache: Option<CacheFormat>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            weight_format: Format::F32,
            gguf_weights: GgufWeights::Mapped,
            kv_cache: None,
        }
    }
}

/// The image-related inputs of one request, as the processor makes them.
pub struct ImageInputs<'a> {
    /// `[n_tiles, 3, S, S]`, each image's global view followed by its local tiles.
    pub pixel_values: &'a Tensor,
    /// `[tiles_wide, tiles_high]` per image.
    pub spatial_crop: &'a [[usize; 2]],
}

impl DeepseekVl2 {
    /// Loads a model folder's weights on `device`, computing in `dtype`.
    pub fn load(dir: &ModelDir, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        Self::load_with_progress(dir, device, dtype, None::<fn(u64, u64)>)
    }

    /// [`Self::load`], reporting (bytes loaded, total bytes) after each tensor.
    pub fn load_with_progress(
        dir: &ModelDir,
        device: &Device,
        dtype: DType,
        progress: Option<impl Fn(u64, u64) + 'static>,
    ) -> Result<Self, ModelError> {
        Self::load_from(Weights::open(&dir.weights, device, dtype)?, dir, progress)
    }

    /// Loads with f32 activations and the weight storage of `options`, reporting (bytes loaded,
    /// total bytes) after each tensor.
    pub fn load_with_options(
        dir: &ModelDir,
        device: &Device,
        options: &LoadOptions,
        progress: Option<impl Fn(u64, u64) + 'static>,
    ) -> Result<Self, ModelError> {
        let weights = Weights::open_with(&dir.weights, device, DType::F32, options.gguf_weights)?
            .with_format(options.weight_format);
        let mut model = Self::load_from(weights, dir, progress)?;
        if let Some(format) = options.kv_cache {
            model.language.set_cache_format(format);
        }
        Ok(model)
    }

    fn load_from(
        mut weights: Weights,
        dir: &ModelDir,
        progress: Option<impl Fn(u64, u64) + 'static>,
    ) -> Result<Self, ModelError> {
        if let Some(progress) = progress {
            weights = weights.with_progress(progress);
        }
        let model = Self::from_weights(&weights, &dir.config)?;
        weights.finish()?;
        Ok(model)
    }

    pub fn from_weights(w: &Weights, config: &ModelConfig) -> Result<Self, ModelError> {
        let d = config.language.hidden_size;
        Ok(DeepseekVl2 {
            vision: VisionTower::load(w, &config.vision)?,
            projector: Projector::load(w, &config.projector)?,
            image_newline: w.get("image_newline", &[d])?,
            // [sic]: the official parameter name.
            view_separator: w.get("view_seperator", &[d])?,
            language: LanguageModel::load(w, &config.language)?,
            config: config.clone(),
            device: w.device().clone(),
        })
    }

    /// Bytes of all weights held in memory, after conversion to their storage formats.
    pub fn weight_bytes(&self) -> u64 {
        let separators = (self.image_newline.elem_count() + self.view_separator.elem_count()) * 4;
        self.vision.weight_bytes() + self.projector.weight_bytes() + self.language.weight_bytes() + separators as u64
    }

    /// Weight bytes one decode step of one sequence reads (see
    /// [`LanguageModel::decode_bytes_per_token`]): the decode roofline's numerator.
    pub fn decode_bytes_per_token(&self) -> u64 {
        self.language.decode_bytes_per_token()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn language(&self) -> &LanguageModel {
        &self.language
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache, holding MHA keys and values in [`LanguageModel::cache_format`].
    pub fn new_cache(&self) -> SequenceCache {
        self.language.new_cache()
    }

    /// Makes later [`Self::new_cache`] calls hold MHA keys and values in `format`.
    pub fn set_cache_format(&mut self, format: CacheFormat) {
        self.language.set_cache_format(format);
    }

    /// Image tokens one image with `tw x th` local tiles occupies (must match the processor).
    pub fn image_token_count(&self, tw: usize, th: usize) -> usize {
        let s = self.tokens_per_side();
        s * (s + 1) + 1 + (th * s) * (tw * s + 1)
    }

    fn tokens_per_side(&self) -> usize {
        self.config
            .vision
            .grid_size()
            .div_ceil(self.config.projector.downsample_ratio)
    }

    /// The language model's input `[len, hidden]`: token embeddings, with the image embeddings
    /// written over the positions where `images_seq_mask` is true (in order).
    pub fn embed_inputs(
        &self,
        input_ids: &[u32],
        images_seq_mask: &[bool],
        images: Option<ImageInputs>,
        trace: Option<&mut LayerTrace>,
    ) -> Result<Tensor, ModelError> {
        if input_ids.len() != images_seq_mask.len() {
            return Err(ModelError::Input(format!(
                "{} input ids but {} image-mask entries",
                input_ids.len(),
                images_seq_mask.len()
            )));
        }
        let text = self.language.embed(input_ids)?;
        let slots = images_seq_mask.iter().filter(|m| **m).count();
        let images = match images {
            Some(i) if !i.spatial_crop.is_empty() => i,
            _ if slots == 0 => return Ok(text),
            _ => {
                return Err(ModelError::Input(format!(
                    "{slots} image-token positions but no images"
                )))
            }
        };
        let image_embeds = self.embed_images(&images, trace)?;
        let rows = image_embeds.dim(0)?;
        if rows != slots {
            return Err(ModelError::Input(format!(
                "the images give {rows} embeddings but the prompt has {slots} image-token positions"
            )));
        }
        // One gather from [text rows; image rows]: position i takes its own text row, or the next
        // image row if it is an image position.
        let mut next_image = input_ids.len() as u32;
        let index: Vec<u32> = images_seq_mask
            .iter()
            .enumerate()
            .map(|(i, &is_image)| {
                if is_image {
                    next_image += 1;
                    next_image - 1
                } else {
                    i as u32
                }
            })
            .collect();
        let table = Tensor::cat(&[&text, &image_embeds.to_dtype(text.dtype())?], 0)?;
        let index = Tensor::from_vec(index, input_ids.len(), &self.device)?;
        Ok(table.index_select(&index, 0)?)
    }

    /// Vision tower and projector over all tiles at once, then each image's 2D layout:
    /// global rows + newline, separator, local mosaic rows + newline. `[image tokens, hidden]`.
    fn embed_images(&self, images: &ImageInputs, trace: Option<&mut LayerTrace>) -> Result<Tensor, ModelError> {
        let pixels = images.pixel_values;
        let n_tiles: usize = images.spatial_crop.iter().map(|[w, h]| 1 + w * h).sum();
        let size = self.config.vision.image_size;
        if pixels.dims() != [n_tiles, 3, size, size] {
            return Err(ModelError::Input(format!(
                "pixel tensor has shape {:?}; the tile grids need [{n_tiles}, 3, {size}, {size}]",
                pixels.dims()
            )));
        }
        let features = self.vision.forward(&pixels.to_dtype(self.language_dtype())?)?;
        let projected = self.projector.forward(&features)?;
        if let Some(t) = trace {
            t.vision_features = Some(features.clone());
            t.projector_out = Some(projected.clone());
        }
        let s = self.tokens_per_side();
        let d = projected.dim(2)?;
        let newline = |rows: usize| self.image_newline.reshape((1, 1, d))?.expand((rows, 1, d));
        let mut parts = Vec::new();
        let mut tile = 0;
        for &[tw, th] in images.spatial_crop {
            let global = projected.get(tile)?.reshape((s, s, d))?;
            parts.push(Tensor::cat(&[&global, &newline(s)?], 1)?.reshape((s * (s + 1), d))?);
            parts.push(self.view_separator.reshape((1, d))?);
            let locals = projected
                .narrow(0, tile + 1, tw * th)?
                .reshape((th, tw, s, s, d))?
                .permute((0, 2, 1, 3, 4))? // [th, s, tw, s, d]: one mosaic
                .reshape((th * s, tw * s, d))?;
            parts.push(Tensor::cat(&[&locals, &newline(th * s)?], 1)?.reshape((th * s * (tw * s + 1), d))?);
            tile += 1 + tw * th;
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn language_dtype(&self) -> DType {
        self.image_newline.dtype()
    }

    /// Runs `embeds` after what `cache` holds; returns the logits `[vocab]` of the last position.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        cache: &mut SequenceCache,
        trace: Option<&mut LayerTrace>,
    ) -> Result<Tensor, ModelError> {
        dsvl2_kernels::on_worker(|| {
            let hidden = match trace {
                Some(t) => {
                    t.inputs_embeds = Some(embeds.clone());
                    self.language.forward(embeds, cache, Some(&mut t.hidden_last))?
                }
                None => self.language.forward(embeds, cache, None)?,
            };
            self.language.logits(&hidden)
        })
    }

    /// One decode step: feeds `token` and returns the next logits `[vocab]`.
    pub fn step(&self, token: u32, cache: &mut SequenceCache) -> Result<Tensor, ModelError> {
        let embeds = self.language.embed(&[token])?;
        self.forward_embeds(&embeds, cache, None)
    }

    /// One decode step for B sequences at once: feeds `tokens[b]` to the sequence `caches[b]`
    /// (at its own position, `caches[b].len()`) and returns the next logits `[B, vocab]`, row b
    /// for sequence b. Weights are read once for the whole batch; row b equals what [`Self::step`]
    /// gives for that sequence alone, up to float summation order. Sequences may join or leave
    /// between calls: a batch is just the caches passed. An empty batch is an error.
    pub fn step_batch(&self, tokens: &[u32], caches: &mut [&mut SequenceCache]) -> Result<Tensor, ModelError> {
        if tokens.len() != caches.len() {
            return Err(ModelError::Input(format!(
                "decode batch: {} token(s) for {} sequence cache(s)",
                tokens.len(),
                caches.len()
            )));
        }
        if tokens.is_empty() {
            return Err(ModelError::Input("empty decode batch: no sequences".into()));
        }
        let embeds = self.language.embed(tokens)?;
        dsvl2_kernels::on_worker(|| {
            let hidden = self.language.decode_batch(&embeds, caches)?;
            self.language.logits_batch(&hidden)
        })
    }
}
