//! `config.json`: the vision-language composition (`DeepseekVLV2Config`).

use std::path::Path;

use serde::Deserialize;

use crate::language::{LanguageConfig, RawLanguageConfig};
use crate::ConfigError;

/// The SigLIP vision tower (`vision_config`, official `VisionEncoderConfig` defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub model_name: String,
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_ratio: f64,
    pub global_pool: String,
    pub ignore_head: bool,
    pub class_token: bool,
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            model_name: "siglip_large_patch16_384".into(),
            image_size: 384,
            patch_size: 16,
            width: 1024,
            layers: 24,
            heads: 16,
            mlp_ratio: 4.0,
            global_pool: "map".into(),
            ignore_head: true,
            class_token: false,
        }
    }
}

impl VisionConfig {
    /// Patches per side (`image_size // patch_size`; the last pixels of a tile are never seen).
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Hidden width of the MLP: `int(width * mlp_ratio)`, as timm computes it.
    pub fn mlp_hidden(&self) -> usize {
        (self.width as f64 * self.mlp_ratio) as usize
    }

    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ProjectorType {
    /// 2x2 (in general `downsample_ratio`^2) token merge, then Linear-GELU-...-Linear.
    #[serde(rename = "downsample_mlp_gelu")]
    DownsampleMlpGelu,
    #[serde(rename = "mlp_gelu")]
    MlpGelu,
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "identity")]
    Identity,
}

/// The vision-to-language projector (`projector_config`, official `MlpProjectorConfig` defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ProjectorConfig {
    pub projector_type: ProjectorType,
    pub input_dim: usize,
    pub n_embed: usize,
    pub depth: usize,
    pub mlp_ratio: usize,
    pub downsample_ratio: usize,
    pub token_pooling: bool,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        ProjectorConfig {
            projector_type: ProjectorType::DownsampleMlpGelu,
            input_dim: 1152,
            n_embed: 2048,
            depth: 2,
            mlp_ratio: 1,
            downsample_ratio: 2,
            token_pooling: false,
        }
    }
}

/// How image tokens are laid out (`tile_tag`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TileTag {
    /// Rows of tokens each ended by `image_newline`, a `view_seperator` between views.
    #[serde(rename = "2D")]
    TwoD,
}

/// Where the global view goes relative to the local tiles (`global_view_pos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum GlobalViewPos {
    #[serde(rename = "head")]
    Head,
    #[serde(rename = "tail")]
    Tail,
}

/// The whole `config.json`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vision: VisionConfig,
    pub projector: ProjectorConfig,
    pub language: LanguageConfig,
    pub tile_tag: TileTag,
    pub global_view_pos: GlobalViewPos,
    /// `[width, height]` pairs the local view may be resized to, in file order.
    pub candidate_resolutions: Vec<[u32; 2]>,
    /// Storage dtype the checkpoint declares (`bfloat16` for the official ones), if any.
    pub torch_dtype: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawModelConfig {
    model_type: Option<String>,
    #[serde(default)]
    vision_config: VisionConfig,
    #[serde(default)]
    projector_config: ProjectorConfig,
    #[serde(default)]
    language_config: RawLanguageConfig,
    // The reference's own default is the string "tile_tag", which it then rejects.
    tile_tag: Option<TileTag>,
    #[serde(default = "default_global_view_pos")]
    global_view_pos: GlobalViewPos,
    #[serde(default = "default_candidate_resolutions")]
    candidate_resolutions: Vec<[u32; 2]>,
    torch_dtype: Option<String>,
}

fn default_global_view_pos() -> GlobalViewPos {
    GlobalViewPos::Head
}

fn default_candidate_resolutions() -> Vec<[u32; 2]> {
    vec![[384, 384]]
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let raw: RawModelConfig = crate::read_json(path)?;
        Self::resolve(raw, path)
    }

    /// Parses `config.json` text (`path` is only used in error messages).
    pub fn from_json(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawModelConfig = crate::parse_json(path, text)?;
        Self::resolve(raw, path)
    }

    fn resolve(raw: RawModelConfig, path: &Path) -> Result<Self, ConfigError> {
        let unsupported = |k: &str, v: &dyn std::fmt::Display, why: &str| ConfigError::unsupported(path, k, v, why);
        if let Some(t) = &raw.model_type {
            if t != "deepseek_vl_v2" {
                return Err(unsupported(
                    "model_type",
                    &format!("{t:?}"),
                    "expected \"deepseek_vl_v2\"",
                ));
            }
        }
        let tile_tag = raw.tile_tag.ok_or_else(|| {
            unsupported(
                "tile_tag",
                &"absent",
                "the reference requires \"2D\" (\"1D\" has no released checkpoint)",
            )
        })?;
        if raw.global_view_pos != GlobalViewPos::Head {
            return Err(unsupported(
                "global_view_pos",
                &"\"tail\"",
                "only \"head\" (every released checkpoint) is implemented",
            ));
        }
        let v = &raw.vision_config;
        if v.patch_size == 0 || v.image_size < v.patch_size {
            return Err(unsupported(
                "vision_config.patch_size",
                &v.patch_size,
                "must be between 1 and image_size",
            ));
        }
        if v.heads == 0 || !v.width.is_multiple_of(v.heads) {
            return Err(unsupported(
                "vision_config.heads",
                &v.heads,
                "must divide vision_config.width",
            ));
        }
        if v.class_token {
            return Err(unsupported(
                "vision_config.class_token",
                &true,
                "DeepSeek-VL2 towers have no class token",
            ));
        }
        if !v.ignore_head {
            return Err(unsupported(
                "vision_config.ignore_head",
                &false,
                "the pooling head is not used by DeepSeek-VL2",
            ));
        }
        let p = &raw.projector_config;
        if p.projector_type != ProjectorType::DownsampleMlpGelu {
            return Err(unsupported(
                "projector_config.projector_type",
                &format!("{:?}", p.projector_type),
                "only \"downsample_mlp_gelu\" (every released checkpoint) is implemented",
            ));
        }
        if p.token_pooling {
            return Err(unsupported("projector_config.token_pooling", &true, "not implemented"));
        }
        if p.depth == 0 || p.downsample_ratio == 0 || p.mlp_ratio == 0 {
            return Err(unsupported(
                "projector_config.depth",
                &p.depth,
                "depth, mlp_ratio and downsample_ratio must be at least 1",
            ));
        }
        if p.input_dim != v.width {
            return Err(unsupported(
                "projector_config.input_dim",
                &p.input_dim,
                &format!("must equal vision_config.width ({})", v.width),
            ));
        }
        let language = raw.language_config.resolve(path)?;
        if p.n_embed != language.hidden_size {
            return Err(unsupported(
                "projector_config.n_embed",
                &p.n_embed,
                &format!("must equal language_config.hidden_size ({})", language.hidden_size),
            ));
        }
        validate_resolutions(&raw.candidate_resolutions, path, "candidate_resolutions")?;
        Ok(ModelConfig {
            vision: raw.vision_config,
            projector: raw.projector_config,
            language,
            tile_tag,
            global_view_pos: raw.global_view_pos,
            candidate_resolutions: raw.candidate_resolutions,
            torch_dtype: raw.torch_dtype,
        })
    }
}

/// Resolutions must exist, be positive and (as tiles are cut from them) multiples of the first
/// one's width, the processor's tile size.
pub(crate) fn validate_resolutions(res: &[[u32; 2]], path: &Path, key: &str) -> Result<(), ConfigError> {
    let Some(first) = res.first() else {
        return Err(ConfigError::unsupported(
            path,
            key,
            "[]",
            "needs at least one [width, height]",
        ));
    };
    let tile = first[0];
    for (i, r) in res.iter().enumerate() {
        if tile == 0 || r[0] % tile != 0 || r[1] % tile != 0 || r[0] == 0 || r[1] == 0 {
            return Err(ConfigError::unsupported(
                path,
                &format!("{key}[{i}]"),
                format!("{r:?}"),
                format!("each side must be a positive multiple of the tile size {tile}"),
            ));
        }
    }
    Ok(())
}
