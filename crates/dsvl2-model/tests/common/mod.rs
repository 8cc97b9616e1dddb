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
