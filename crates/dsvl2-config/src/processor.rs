//! `processor_config.json` (`DeepseekVLV2Processor` arguments).

use std::path::Path;

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ProcessorConfig {
    /// `[width, height]` pairs; the first pair's width is the tile size (`image_size`).
    pub candidate_resolutions: Vec<[u32; 2]>,
    pub patch_size: u32,
    pub downsample_ratio: u32,
    #[serde(default = "half3")]
    pub image_mean: [f64; 3],
    #[serde(default = "half3")]
    pub image_std: [f64; 3],
    #[serde(default = "yes")]
    pub normalize: bool,
    #[serde(default = "image_token")]
    pub image_token: String,
    #[serde(default = "pad_token")]
    pub pad_token: String,
    #[serde(default)]
    pub add_special_token: bool,
    #[serde(default = "sft_format")]
    pub sft_format: String,
    #[serde(default = "yes")]
    pub mask_prompt: bool,
    #[serde(default = "ignore_id")]
    pub ignore_id: i64,
}

fn half3() -> [f64; 3] {
    [0.5; 3]
}
fn yes() -> bool {
    true
}
fn image_token() -> String {
    "<image>".into()
}
fn pad_token() -> String {
    "<｜▁pad▁｜>".into()
}
fn sft_format() -> String {
    "deepseek".into()
}
fn ignore_id() -> i64 {
    -100
}

impl ProcessorConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let cfg: ProcessorConfig = crate::read_json(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: ProcessorConfig = crate::parse_json(path, text)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        crate::vl::validate_resolutions(&self.candidate_resolutions, path, "candidate_resolutions")?;
        if self.patch_size == 0 || self.patch_size > self.image_size() {
            return Err(ConfigError::unsupported(
                path,
                "patch_size",
                self.patch_size,
                "must be between 1 and the tile size",
            ));
        }
        if self.downsample_ratio == 0 {
            return Err(ConfigError::unsupported(
                path,
                "downsample_ratio",
                0,
                "must be at least 1",
            ));
        }
        if self.sft_format != "deepseek" {
            return Err(ConfigError::unsupported(
                path,
                "sft_format",
                format!("{:?}", self.sft_format),
                "only the \"deepseek\" conversation template is implemented",
            ));
        }
        if self.normalize && self.image_std.contains(&0.0) {
            return Err(ConfigError::unsupported(
                path,
                "image_std",
                format!("{:?}", self.image_std),
                "must be non-zero",
            ));
        }
        Ok(())
    }

    /// Tile side in pixels: the reference takes `candidate_resolutions[0][0]`.
    pub fn image_size(&self) -> u32 {
        self.candidate_resolutions[0][0]
    }

    /// Tokens per side of one tile after the projector merges `downsample_ratio`^2 patches:
    /// `ceil((image_size // patch_size) / downsample_ratio)` (14 for 384/14/2).
    pub fn tokens_per_side(&self) -> usize {
        let patches = self.image_size() / self.patch_size;
        patches.div_ceil(self.downsample_ratio) as usize
    }

    /// Padding colour of the views: `int(mean * 255)` per channel in Python floats (127 for 0.5).
    pub fn pad_color(&self) -> [u8; 3] {
        self.image_mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8)
    }
}

/// The official `candidate_resolutions`: every `[w, h]` multiple of 384 with at most 9 tiles, in
/// the order of the released config.json files.
pub const OFFICIAL_CANDIDATE_RESOLUTIONS: [[u32; 2]; 23] = [
    [384, 384],
    [384, 768],
    [768, 384],
    [384, 1152],
    [1152, 384],
    [384, 1536],
    [1536, 384],
    [768, 768],
    [384, 1920],
    [1920, 384],
    [384, 2304],
    [2304, 384],
    [768, 1152],
    [1152, 768],
    [384, 2688],
    [2688, 384],
    [384, 3072],
    [3072, 384],
    [768, 1536],
    [1536, 768],
    [384, 3456],
    [3456, 384],
    [1152, 1152],
];
