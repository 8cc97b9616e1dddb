//! A tokenizer embedded in a GGUF (`TokenizerSource::Embedded`) behaves like its file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dsvl2_config::{ModelDir, TokenizerSource};
use dsvl2_processor::Processor;

fn fixture_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn embedded(dir: &ModelDir, json: &str) -> ModelDir {
    let mut dir = dir.clone();
    dir.tokenizer.source = TokenizerSource::Embedded {
        container: PathBuf::from("/m/model.gguf"),
        key: "tokenizer.huggingface.json".into(),
        json: Arc::from(json),
    };
    dir
}

#[test]
fn embedded_tokenizer_matches_the_file() {
    let folder = ModelDir::open(fixture_model("small-like")).unwrap();
    let json = std::fs::read_to_string(fixture_model("small-like").join("tokenizer.json")).unwrap();
    let from_file = Processor::from_model_dir(&folder).unwrap();
    let from_text = Processor::from_model_dir(&embedded(&folder, &json)).unwrap();
    assert_eq!(
        (from_text.bos_id(), from_text.eos_id(), from_text.image_token_id()),
        (from_file.bos_id(), from_file.eos_id(), from_file.image_token_id())
    );
    let text = "Describe <image> and <|ref|>the cat<|/ref|> please.";
    assert_eq!(from_text.encode(text).unwrap(), from_file.encode(text).unwrap());
}

#[test]
fn a_broken_embedded_tokenizer_names_the_gguf_and_key() {
    let folder = ModelDir::open(fixture_model("small-like")).unwrap();
    let err = Processor::from_model_dir(&embedded(&folder, "{ nope"))
        .err()
        .expect("broken tokenizer is refused")
        .to_string();
    assert!(
        err.contains("/m/model.gguf (metadata `tokenizer.huggingface.json`)"),
        "{err}"
    );
}
