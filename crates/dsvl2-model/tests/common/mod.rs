//! Helpers shared by the model's integration tests: the vendored fixtures and their tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dsvl2_config::ModelDir;
use dsvl2_model::sampling::argmax as argmax_of;
use dsvl2_model::{DType, DeepseekVl2, Device, Tensor};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A model folder under `root/models/`, loaded in f32 on the CPU.
pub fn load_model(root: &Path, variant: &str) -> DeepseekVl2 {
    let dir = ModelDir::open(root.join("models").join(variant)).expect("fixture model folder opens");
    DeepseekVl2::load(&dir, &Device::Cpu, DType::F32).expect("fixture model loads")
}

/// [`load_model`] with the linear weights stored in `format`.
pub fn load_model_as(root: &Path, variant: &str, format: dsvl2_model::Format) -> DeepseekVl2 {
    load_model_with(root, variant, format, None)
}

/// [`load_model`] with the linear weights stored in `format` and caches holding MHA keys and values
/// in `kv_cache` (`None`: the default for `format`).
pub fn load_model_with(
    root: &Path,
    variant: &str,
    format: dsvl2_model::Format,
    kv_cache: Option<dsvl2_model::CacheFormat>,
) -> DeepseekVl2 {
    let dir = ModelDir::open(root.join("models").join(variant)).expect("fixture model folder opens");
    let options = dsvl2_model::LoadOptions {
        weight_format: format,
        kv_cache,
        ..Default::default()
    };
    DeepseekVl2::load_with_options(&dir, &Device::Cpu, &options, None::<fn(u64, u64)>).expect("fixture model loads")
}

pub fn argmax(logits: &Tensor) -> u32 {
    argmax_of(&logits.to_vec1::<f32>().unwrap())
}

/// Pixel tensor of a case from its lossless tile PNGs: `(u8/255 - 0.5)/0.5` in f32, which the
/// fixtures README says equals the reference's floats exactly.
pub fn tile_pixels(case_dir: &Path, processor: &Value) -> Tensor {
    let tiles = processor["tiles"].as_array().expect("tiles");
    let mut data = Vec::new();
    let mut size = 0;
    for t in tiles {
        let path = case_dir.join(t["png"].as_str().unwrap());
        let img = image::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .to_rgb8();
        let (w, h) = img.dimensions();
        size = w as usize;
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let v = img.get_pixel(x, y)[c] as f32 / 255.0;
                    data.push((v - 0.5) / 0.5);
                }
            }
        }
    }
    Tensor::from_vec(data, (tiles.len(), 3, size, size), &Device::Cpu).unwrap()
}

/// The processor outputs of a fixture case (`processor.json` and its tiles).
pub struct CaseInputs {
    pub ids: Vec<u32>,
    pub mask: Vec<bool>,
    /// `[tw, th]` per image; empty for text-only cases (the reference writes `[[0, 0]]`).
    pub crop: Vec<[usize; 2]>,
    pub pixels: Option<Tensor>,
}

impl CaseInputs {
    pub fn load(case_dir: &Path) -> Self {
        let processor = read_json(&case_dir.join("processor.json"));
        let ids: Vec<u32> = serde_json::from_value(processor["input_ids"].clone()).unwrap();
        let mask: Vec<bool> = processor["images_seq_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().or(v.as_bool().map(u64::from)).unwrap() != 0)
            .collect();
        let crop: Vec<[usize; 2]> = serde_json::from_value(processor["images_spatial_crop"].clone()).unwrap();
        let crop: Vec<[usize; 2]> = crop.into_iter().filter(|c| c[0] > 0 && c[1] > 0).collect();
        let pixels = (!crop.is_empty()).then(|| tile_pixels(case_dir, &processor));
        CaseInputs {
            ids,
            mask,
            crop,
            pixels,
        }
    }

    pub fn images(&self) -> Option<dsvl2_model::ImageInputs<'_>> {
        self.pixels.as_ref().map(|p| dsvl2_model::ImageInputs {
            pixel_values: p,
            spatial_crop: &self.crop,
        })
    }
}
