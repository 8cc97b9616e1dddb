//! A broken checkpoint or config is refused with an error that names the tensor or key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dsvl2_config::ModelDir;
use dsvl2_model::{check_context, DType, DeepseekVl2, Device, ModelError};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn tiny_like() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-like")
}

/// A copy of the tiny-like folder whose weights are `edit`ed (name -> (dtype, shape, bytes)).
fn edited_copy(edit: impl FnOnce(&mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny_like()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let bytes = std::fs::read(tiny_like().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let out = dir.path().join("model.safetensors");
    std::fs::remove_file(&out).unwrap();
    safetensors::serialize_to_file(views, None, &out).unwrap();
    dir
}

fn load(dir: &Path) -> Result<DeepseekVl2, ModelError> {
    let model_dir = ModelDir::open(dir)?;
    DeepseekVl2::load(&model_dir, &Device::Cpu, DType::F32)
}

fn load_error(dir: &Path) -> String {
    match load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = edited_copy(|t| {
        t.remove("language.model.layers.1.mlp.experts.3.up_proj.weight");
    });
    let msg = load_error(dir.path());
    assert!(
        msg.contains("missing tensor `language.model.layers.1.mlp.experts.3.up_proj.weight`"),
        "{msg}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = edited_copy(|t| {
        t.insert(
            "language.model.layers.9.extra.weight".into(),
            (Dtype::F32, vec![2], vec![0; 8]),
        );
    });
    let msg = load_error(dir.path());
    assert!(
        msg.contains("1 tensor(s) this model does not use: language.model.layers.9.extra.weight"),
        "{msg}"
    );
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let dir = edited_copy(|t| {
        let (_, shape, data) = t.get_mut("vision.blocks.0.attn.qkv.bias").unwrap();
        *shape = vec![shape[0] - 1];
        data.truncate(data.len() - 4);
    });
    let msg = load_error(dir.path());
    assert!(
        msg.contains("`vision.blocks.0.attn.qkv.bias` has shape [143], expected [144]"),
        "{msg}"
    );
}

#[test]
fn integer_tensor_is_refused() {
    let dir = edited_copy(|t| {
        let (dtype, _, _) = t.get_mut("image_newline").unwrap();
        *dtype = Dtype::I32;
    });
    let msg = load_error(dir.path());
    assert!(msg.contains("`image_newline` has dtype I32"), "{msg}");
}

#[test]
fn corrupt_weights_file_is_named() {
    let dir = edited_copy(|_| {});
    std::fs::write(dir.path().join("model.safetensors"), b"not safetensors at all").unwrap();
    let msg = load_error(dir.path());
    assert!(msg.contains("model.safetensors: not a valid safetensors file"), "{msg}");
}

#[test]
fn unsupported_config_value_is_named() {
    let dir = edited_copy(|_| {});
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"greedy\"", "\"random_pick\"")).unwrap();
    let msg = load_error(dir.path());
    assert!(msg.contains("language_config.topk_method"), "{msg}");
    assert!(msg.contains("random_pick"), "{msg}");
}

#[test]
fn context_overflow_reports_the_numbers() {
    let err = check_context(3900, &[813, 421], 300, 4096).unwrap_err().to_string();
    assert_eq!(
        err,
        "the prompt needs 3900 tokens (1234 of them for images: 813 + 421 per image) plus 300 new tokens, \
         but the model's context is 4096 tokens"
    );
    assert!(check_context(3796, &[], 300, 4096).is_ok());
}
