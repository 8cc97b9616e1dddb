//! Reference behaviours of the prompt side that the public cases do not show.

mod common;

use common::*;
use dsvl2_processor::{Conversation, Message, Role};

#[test]
fn plain_role_spellings_give_the_same_ids_but_their_own_sft_format() {
    let p = fixture_processor();
    let template = Conversation {
        messages: vec![Message::user("hello", vec![]), Message::assistant("")],
    };
    let plain = Conversation::from_json(
        r#"[{"role":"user","content":"hello"},{"role":"assistant","content":""}]"#,
        ".".as_ref(),
        "c.json".as_ref(),
    )
    .unwrap();
    let a = p.prepare(&template, &[], "").unwrap();
    let b = p.prepare(&plain, &[], "").unwrap();
    assert_eq!(a.input_ids, b.input_ids);
    assert_eq!(b.sft_format, "user: hello\n\nassistant:");
}

#[test]
fn system_message_text_follows_bos_and_system_prompt_never_reaches_the_ids() {
    let p = fixture_processor();
    let conv = Conversation {
        messages: vec![
            Message::new(Role::System, " Be kind. ", vec![]),
            Message::user("hi", vec![]),
            Message::assistant(""),
        ],
    };
    let out = p.prepare(&conv, &[], "ignored for ids").unwrap();
    let mut want = vec![p.bos_id()];
    want.extend(p.encode("Be kind.").unwrap());
    want.extend(p.encode("<|User|>: hi\n\n<|Assistant|>:").unwrap());
    assert_eq!(out.input_ids, want);
    // Separators alternate by position, so the user message (index 1) is closed by the eos string.
    assert_eq!(
        out.sft_format,
        "ignored for ids\n\nsystem: Be kind.\n\n<|User|>: hi<｜end▁of▁sentence｜><|Assistant|>:"
    );
}

#[test]
fn history_answer_follows_the_assistant_tag_without_space_and_ends_with_eos() {
    let p = fixture_processor();
    let conv = Conversation {
        messages: vec![
            Message::user("a", vec![]),
            Message::assistant(" b "),
            Message::user("c", vec![]),
            Message::assistant(""),
        ],
    };
    let out = p.prepare(&conv, &[], "").unwrap();
    let mut want = vec![p.bos_id()];
    want.extend(p.encode("<|User|>: a\n\n<|Assistant|>:").unwrap());
    want.extend(p.encode("b").unwrap());
    want.push(p.eos_id());
    want.extend(p.encode("<|User|>: c\n\n<|Assistant|>:").unwrap());
    assert_eq!(out.input_ids, want);
}

#[test]
fn a_conversation_ending_with_a_user_turn_gets_the_empty_assistant_turn() {
    let p = fixture_processor();
    let open = Conversation {
        messages: vec![Message::user("q", vec![])],
    };
    let closed = Conversation::single_turn("q", vec![]);
    assert_eq!(p.prepare(&open, &[], "").unwrap(), p.prepare(&closed, &[], "").unwrap());
}

#[test]
fn text_only_has_no_tiles_and_no_grid() {
    let p = fixture_processor();
    let out = p
        .prepare(&Conversation::single_turn("just text", vec![]), &[], "")
        .unwrap();
    assert!(out.images_spatial_crop.is_empty() && out.num_image_tokens.is_empty() && out.pixel_values.is_empty());
    assert_eq!(out.pixel_shape(), [0, 3, 384, 384]);
    assert_eq!(p.decode(&out.input_ids, true).unwrap(), ": just text\n\n:");
}

#[test]
fn from_model_dir_reads_the_special_tokens_of_the_folder() {
    let dir = dsvl2_config::ModelDir::open(fixtures().join("models/small-like")).expect("fixture model folder");
    let p = dsvl2_processor::Processor::from_model_dir(&dir).unwrap();
    assert_eq!(
        (p.bos_id(), p.eos_id(), p.image_token_id(), p.tile_size()),
        (0, 1, 3000, 384)
    );
}
