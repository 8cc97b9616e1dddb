//! Every error path names what is wrong: files, numbers, roles, tokens.

mod common;

use std::path::Path;

use common::*;
use dsvl2_processor::{decode_image, Conversation, DecodeOptions, Message, Processor, ProcessorError, RgbImage};

fn tmp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dsvl2-processor-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn tag_and_image_counts_must_agree() {
    let p = fixture_processor();
    let img = RgbImage::filled(10, 10, [1, 2, 3]);
    let conv = Conversation::single_turn("<image> and <image>", vec![]);
    let err = p.prepare(&conv, std::slice::from_ref(&img), "").unwrap_err();
    assert!(matches!(
        err,
        ProcessorError::ImageCountMismatch { tags: 2, images: 1, .. }
    ));
    let msg = err.to_string();
    assert!(
        msg.contains("2 `<image>` tag(s)") && msg.contains("1 image(s)"),
        "{msg}"
    );
    let err = p
        .prepare(&Conversation::single_turn("no tag", vec![]), &[img], "")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("0 `<image>` tag(s)") && err.contains("1 image(s)"),
        "{err}"
    );
}

#[test]
fn missing_unreadable_truncated_and_non_image_files_are_named() {
    let p = fixture_processor();
    let err = p
        .load_image(Path::new("/definitely/not/here.png"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/definitely/not/here.png"), "{err}");

    let text = tmp_file("notes.png", b"this is text, not a picture");
    let err = p.load_image(&text).unwrap_err();
    assert!(matches!(err, ProcessorError::NotAnImage { .. }));
    assert!(err.to_string().contains("notes.png"), "{err}");

    let full = std::fs::read(fixtures().join("images/small_photo.png")).unwrap();
    let cut = tmp_file("cut.png", &full[..full.len() / 2]);
    let err = p.load_image(&cut).unwrap_err();
    assert!(matches!(err, ProcessorError::ImageDecode { .. }), "{err:?}");
    assert!(err.to_string().contains("cut.png"), "{err}");

    let jpeg = std::fs::read(fixtures().join("images/teaser.jpg")).unwrap();
    let err = decode_image(&jpeg[..200], "cut.jpg", &DecodeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("cut.jpg"), "{err}");

    let gif = std::fs::read(fixtures().join("heldout-processor/images/trns_180x90.gif")).unwrap();
    let err = decode_image(&gif[..40], "cut.gif", &DecodeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("cut.gif"), "{err}");

    // The conversation loader names the failing image file too.
    let conv = Conversation::single_turn("<image>", vec![text.clone()]);
    let err = p.prepare_with_files(&conv, "").unwrap_err().to_string();
    assert!(err.contains("notes.png"), "{err}");
}

#[test]
fn pixel_limit_is_checked_before_decoding() {
    let bytes = std::fs::read(fixtures().join("images/wide_street.png")).unwrap(); // 900x300
    let small = DecodeOptions {
        max_pixels: 900 * 300 - 1,
    };
    let err = decode_image(&bytes, "wide.png", &small).unwrap_err();
    assert!(
        matches!(
            err,
            ProcessorError::ImageTooLarge {
                pixels: 270_000,
                limit: 269_999,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("270000 pixels") && err.to_string().contains("269999"),
        "{err}"
    );
    assert!(decode_image(&bytes, "wide.png", &DecodeOptions { max_pixels: 900 * 300 }).is_ok());

    // A PNG header claiming 20000x20000 with almost no pixel data: refused from the header alone
    // (decoding would fail or need 1.2 GB).
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(20000u32.to_be_bytes());
    ihdr.extend(20000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    let idat = b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01"; // a (far too short) zlib stream
    png.extend(((idat.len() - 4) as u32).to_be_bytes());
    png.extend(idat);
    png.extend(crc32(idat).to_be_bytes());
    let err = decode_image(&png, "bomb.png", &DecodeOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            ProcessorError::ImageTooLarge {
                pixels: 400_000_000,
                limit: 178_956_970,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn empty_images_are_refused() {
    // A GIF whose logical screen is 0x0.
    let gif = b"GIF89a\x00\x00\x00\x00\x00\x00\x00;";
    let err = decode_image(gif, "empty.gif", &DecodeOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            ProcessorError::EmptyImage { .. } | ProcessorError::ImageDecode { .. }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("empty.gif"), "{err}");
}

#[test]
fn empty_buffers_are_refused_by_prepare() {
    let p = fixture_processor();
    let img = RgbImage::from_raw(0, 7, Vec::new()).unwrap();
    let err = p
        .prepare(&Conversation::single_turn("<image>", vec![]), &[img], "")
        .unwrap_err();
    assert!(
        err.to_string().contains("image 0") && err.to_string().contains("0x7"),
        "{err}"
    );
}

#[test]
fn unknown_role_is_named() {
    let path = tmp_file("conv.json", br#"[{"role": "Narrator", "content": "hi"}]"#);
    let err = Conversation::from_file(&path).unwrap_err();
    assert!(err.to_string().contains("\"Narrator\""), "{err}");
}

#[test]
fn misplaced_system_message_and_assistant_image_tags_are_refused() {
    let p = fixture_processor();
    let conv = Conversation {
        messages: vec![
            Message::user("x", vec![]),
            Message::new(dsvl2_processor::Role::System, "s", vec![]),
        ],
    };
    assert!(p.prepare(&conv, &[], "").unwrap_err().to_string().contains("message 1"));
    let conv = Conversation {
        messages: vec![Message::user("x", vec![]), Message::assistant("<image>")],
    };
    assert!(p.prepare(&conv, &[], "").is_err());
}

#[test]
fn tokenizer_problems_are_named() {
    let cfg_path = fixtures().join("models/tiny-like/processor_config.json");
    let cfg = dsvl2_config::ProcessorConfig::from_file(&cfg_path).unwrap();
    let err = Processor::new(cfg.clone(), Path::new("/nope/tokenizer.json"), BOS, EOS)
        .err()
        .unwrap();
    assert!(err.to_string().contains("/nope/tokenizer.json"), "{err}");

    let garbage = tmp_file("tokenizer.json", b"{not json");
    let err = Processor::new(cfg.clone(), &garbage, BOS, EOS).err().unwrap();
    assert!(
        matches!(err, ProcessorError::Tokenizer { .. }) && err.to_string().contains("tokenizer.json"),
        "{err}"
    );

    // The real DeepSeek tokenizer has no `<image>` token.
    let ds = fixtures().join("tokenizer-deepseek/tokenizer.json");
    let err = Processor::new(cfg.clone(), &ds, BOS, EOS).err().unwrap();
    assert!(matches!(err, ProcessorError::MissingSpecialToken { .. }));
    assert!(err.to_string().contains("\"<image>\""), "{err}");
    let err = Processor::new(cfg, &fixtures().join("models/tiny-like/tokenizer.json"), "<s>", EOS)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("\"<s>\"") && err.to_string().contains("bos"),
        "{err}"
    );
}

#[test]
fn vl2_like_tokenizer_resolves_ids_by_string() {
    // DeepSeek-VL2's real ids (128815...) come from the strings, not from constants.
    let cfg =
        dsvl2_config::ProcessorConfig::from_file(&fixtures().join("models/tiny-like/processor_config.json")).unwrap();
    let p = Processor::new(cfg, &fixtures().join("tokenizer-vl2like/tokenizer.json"), BOS, EOS).unwrap();
    assert_eq!((p.bos_id(), p.eos_id(), p.image_token_id()), (0, 1, 128815));
    let out = p
        .prepare(
            &Conversation::single_turn("<image>hi", vec![]),
            &[RgbImage::filled(5, 5, [9, 9, 9])],
            "",
        )
        .unwrap();
    assert_eq!(out.images_seq_mask.iter().filter(|&&m| m).count(), 421);
    assert!(out.input_ids.contains(&128815));
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
