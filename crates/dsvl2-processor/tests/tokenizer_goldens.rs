//! `tests/fixtures/tokenizer_cases.json`: ids and decodes of 46 strings for the real DeepSeek
//! tokenizer and the fixture tokenizer, against HF `tokenizers`/`transformers` output.

mod common;

use common::*;
use dsvl2_processor::TextTokenizer;

fn check(key: &str, tokenizer_dir: &str, image_token: Option<&str>) {
    let all = read_json(&fixtures().join("tokenizer_cases.json"));
    let spec = &all[key];
    let bos = spec["bos"][0].as_str().unwrap();
    let eos = spec["eos"][0].as_str().unwrap();
    // The DeepSeek tokenizer has no `<image>`: use the pad token as a stand-in special token.
    let image = image_token.unwrap_or(spec["pad"][0].as_str().unwrap());
    let tok = TextTokenizer::load(&fixtures().join(tokenizer_dir).join("tokenizer.json"), bos, eos, image).unwrap();
    assert_eq!(tok.bos_id as u64, spec["bos"][1].as_u64().unwrap());
    assert_eq!(tok.eos_id as u64, spec["eos"][1].as_u64().unwrap());
    assert_eq!(
        tok.inner().get_vocab_size(true) as u64,
        spec["len"].as_u64().unwrap(),
        "{key}: len"
    );
    let cases = spec["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 46);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = as_usize_vec(&c["ids"]).into_iter().map(|x| x as u32).collect();
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids, want, "{key}: ids of {text:?}");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            c["decoded"].as_str().unwrap(),
            "{key}: decode {text:?}"
        );
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            c["decoded_skip_special"].as_str().unwrap(),
            "{key}: decode skip {text:?}"
        );
    }
    println!("{key}: {} cases equal", cases.len());
}

#[test]
fn deepseek_tokenizer_matches_hf() {
    check("deepseek", "tokenizer-deepseek", None);
}

#[test]
fn fixture_tokenizer_matches_hf() {
    check("fixture", "models/tiny-like", Some("<image>"));
}
