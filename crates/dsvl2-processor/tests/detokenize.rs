//! Streaming detokenization: pieces are emitted as soon as they are final, never half a
//! character, and they add up to the full decode.

mod common;

use common::{fixture_processor, fixtures, read_json, BOS, EOS};
use dsvl2_processor::{Processor, TextStream};

/// The VL2-like tokenizer: the real DeepSeek byte-level BPE (129 280 ids), which splits CJK and
/// emoji over several tokens.
fn vl2like_processor() -> Processor {
    let config =
        dsvl2_config::ProcessorConfig::from_file(&fixtures().join("models/tiny-like/processor_config.json")).unwrap();
    Processor::new(config, &fixtures().join("tokenizer-vl2like/tokenizer.json"), BOS, EOS).unwrap()
}

/// Streams `ids` one by one; returns the pieces (the last one from `finish`).
fn stream(processor: &Processor, ids: &[u32]) -> Vec<String> {
    let mut s = TextStream::new(processor);
    let mut pieces: Vec<String> = ids.iter().map(|&id| s.push(id).unwrap()).collect();
    pieces.push(s.finish().unwrap());
    pieces
}

#[test]
fn pieces_add_up_to_the_full_decode_and_never_split_a_character() {
    let cases = read_json(&fixtures().join("tokenizer_cases.json"));
    let mut held_back = 0;
    for (name, processor) in [("deepseek", vl2like_processor()), ("fixture", fixture_processor())] {
        for case in cases[name]["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let ids = processor.encode(text).unwrap();
            let full = processor.decode(&ids, false).unwrap();
            let pieces = stream(&processor, &ids);
            assert_eq!(pieces.concat(), full, "{name}: {text:?}");
            for piece in &pieces {
                assert!(
                    !piece.contains('\u{FFFD}') || full.contains('\u{FFFD}'),
                    "{name}: {text:?}: piece {piece:?} holds a broken character"
                );
            }
            held_back += pieces[..ids.len()].iter().filter(|p| p.is_empty()).count();
        }
    }
    // Multi-byte characters split across tokens really occur in these cases (CJK, emoji).
    assert!(held_back > 10, "only {held_back} tokens were held back");
}

#[test]
fn a_character_split_over_tokens_is_emitted_whole() {
    let processor = vl2like_processor();
    for text in ["猫🐈‍⬛ は かわいい", "👩🏽‍💻 writes 漢字"] {
        let ids = processor.encode(text).unwrap();
        let pieces = stream(&processor, &ids);
        assert_eq!(pieces.concat(), text);
        // Each non-empty piece is whole characters only: decoding token by token would not be.
        let naive: Vec<String> = ids.iter().map(|&id| processor.decode(&[id], false).unwrap()).collect();
        assert!(
            naive.iter().any(|p| p.contains('\u{FFFD}')),
            "{text:?} is not split by this tokenizer"
        );
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    }
}

#[test]
fn an_unfinished_character_at_the_end_shows_as_the_replacement_character() {
    let processor = vl2like_processor();
    let ids = processor.encode("🐈").unwrap();
    assert!(ids.len() > 1, "the emoji should take several byte-level tokens");
    let pieces = stream(&processor, &ids[..ids.len() - 1]);
    assert_eq!(pieces.concat(), processor.decode(&ids[..ids.len() - 1], false).unwrap());
    assert!(pieces.last().unwrap().contains('\u{FFFD}'));
}
