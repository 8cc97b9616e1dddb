//! The "deepseek" conversation template and the prompt token ids (the text half of the
//! reference's `format_messages` / `format_messages_v2`), reference quirks included:
//!
//! * `sft_format` is only reported: system prompt + `"\n\n"`, then `role: content` with separators
//!   alternating by *position* (`"\n\n"`, then the eos string), an empty message as `role:`, the
//!   whole stripped. Roles are copied as written.
//! * `input_ids` are built per message: bos; a user message becomes
//!   `"<|User|>: " + content + "\n\n<|Assistant|>:"` (its `<image>` tags expanded); an assistant
//!   message its content plus eos; a leading `system` message its bare content. The `system_prompt`
//!   argument never reaches the ids. The trailing eos (of the final, normally empty, assistant
//!   message) is removed.

use crate::conversation::{Message, Role};
use crate::tokenize::TextTokenizer;
use crate::ProcessorError;

const USER: &str = "<|User|>";
const ASSISTANT: &str = "<|Assistant|>";
const SEP: &str = "\n\n";
/// The template's second separator (fixed by the template, not read from the tokenizer).
const SEP2: &str = "<｜end▁of▁sentence｜>";

/// Python's `str.strip()`: Rust's whitespace plus the ASCII separators U+001C..U+001F.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// The reference's `sft_format` string for `messages` with `system_prompt`.
pub fn sft_format(messages: &[Message], system_prompt: &str) -> String {
    let mut out = String::new();
    if !system_prompt.is_empty() {
        out.push_str(system_prompt);
        out.push_str(SEP);
    }
    for (i, m) in messages.iter().enumerate() {
        let content = py_strip(&m.content);
        out.push_str(&m.role_name);
        if content.is_empty() {
            out.push(':');
        } else {
            out.push_str(": ");
            out.push_str(content);
            out.push_str(if i % 2 == 0 { SEP } else { SEP2 });
        }
    }
    py_strip(&out).to_string()
}

/// The text the reference tokenizes for a user message (template with an empty assistant turn).
fn user_turn(content: &str) -> String {
    let content = py_strip(content);
    if content.is_empty() {
        format!("{USER}:{ASSISTANT}:")
    } else {
        format!("{USER}: {content}{SEP}{ASSISTANT}:")
    }
}

/// Number of `image_token` tags in the user messages, counted in the templated text as the
/// reference does (so a tag-like image token inside the template text is counted too).
pub fn count_image_tags(messages: &[Message], image_token: &str) -> usize {
    messages
        .iter()
        .filter(|m| m.role == Role::User)
        .map(|m| user_turn(&m.content).matches(image_token).count())
        .sum()
}

/// Checks what the reference asserts: a system message only first, image tags only in user
/// messages, as many images as tags, at least one message.
pub fn validate(messages: &[Message], image_token: &str, n_images: usize) -> Result<(), ProcessorError> {
    if messages.is_empty() {
        return Err(ProcessorError::InvalidMessage {
            index: 0,
            reason: "the conversation has no messages".into(),
        });
    }
    for (index, m) in messages.iter().enumerate() {
        if m.role == Role::System && index != 0 {
            return Err(ProcessorError::InvalidMessage {
                index,
                reason: "a system message is only allowed first".into(),
            });
        }
        if m.role != Role::User && m.content.contains(image_token) {
            return Err(ProcessorError::InvalidMessage {
                index,
                reason: format!(
                    "`{image_token}` tags are only allowed in user messages (this one is {})",
                    m.role_name
                ),
            });
        }
    }
    let tags = count_image_tags(messages, image_token);
    if tags != n_images {
        return Err(ProcessorError::ImageCountMismatch {
            tag: image_token.to_string(),
            tags,
            images: n_images,
        });
    }
    Ok(())
}

/// Token ids and image mask of a prompt.
pub struct PromptTokens {
    pub ids: Vec<u32>,
    pub image_mask: Vec<bool>,
    pub num_image_tokens: Vec<usize>,
}

/// Number of image placeholder tokens of one image with `tw x th` local tiles and `n` tokens per
/// tile side: global `n` rows of `n + 1` (newline), one view separator, then `th*n` local rows of
/// `tw*n + 1`.
pub fn image_token_count(n: usize, tw: usize, th: usize) -> usize {
    n * (n + 1) + 1 + (th * n) * (tw * n + 1)
}

/// Builds the ids. `grids[k]` is `[tw, th]` of the k-th image (in conversation order);
/// `validate` must have passed.
pub fn build_ids(
    tok: &TextTokenizer,
    messages: &[Message],
    image_token: &str,
    grids: &[[usize; 2]],
    tokens_per_side: usize,
) -> Result<PromptTokens, ProcessorError> {
    let mut p = PromptTokens {
        ids: vec![tok.bos_id],
        image_mask: vec![false],
        num_image_tokens: Vec::new(),
    };
    let mut next_image = 0;
    let push_text = |p: &mut PromptTokens, text: &str| -> Result<(), ProcessorError> {
        let ids = tok.encode(text)?;
        p.image_mask.extend(std::iter::repeat_n(false, ids.len()));
        p.ids.extend(ids);
        Ok(())
    };
    for m in messages {
        match m.role {
            Role::User => {
                let text = user_turn(&m.content);
                let mut pieces = text.split(image_token);
                if let Some(first) = pieces.next() {
                    push_text(&mut p, first)?;
                }
                for piece in pieces {
                    let [tw, th] = *grids
                        .get(next_image)
                        .ok_or_else(|| ProcessorError::ImageCountMismatch {
                            tag: image_token.to_string(),
                            tags: count_image_tags(messages, image_token),
                            images: grids.len(),
                        })?;
                    next_image += 1;
                    let n = image_token_count(tokens_per_side, tw, th);
                    p.ids.extend(std::iter::repeat_n(tok.image_token_id, n));
                    p.image_mask.extend(std::iter::repeat_n(true, n));
                    p.num_image_tokens.push(n);
                    push_text(&mut p, piece)?;
                }
            }
            Role::Assistant => {
                push_text(&mut p, py_strip(&m.content))?;
                p.ids.push(tok.eos_id);
                p.image_mask.push(false);
            }
            Role::System => push_text(&mut p, py_strip(&m.content))?,
        }
    }
    // Inference mode: drop the eos that closes the final assistant message.
    if p.ids.len() > 1 && p.ids.last() == Some(&tok.eos_id) && messages.last().map(|m| m.role) == Some(Role::Assistant)
    {
        p.ids.pop();
        p.image_mask.pop();
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_matches_python() {
        assert_eq!(py_strip("\u{1c}\u{3000} a b\u{a0}\u{85}\n"), "a b");
        assert_eq!(py_strip("\u{200b}x"), "\u{200b}x"); // zero-width space is not whitespace
    }

    #[test]
    fn sft_format_alternates_by_position() {
        let msgs = vec![
            Message::user(" hi ", vec![]),
            Message::assistant("yo"),
            Message::new(Role::User, "q", vec![]),
            Message::assistant(""),
        ];
        assert_eq!(
            sft_format(&msgs, "SYS"),
            "SYS\n\n<|User|>: hi\n\n<|Assistant|>: yo<｜end▁of▁sentence｜><|User|>: q\n\n<|Assistant|>:"
        );
        assert_eq!(
            sft_format(&[Message::user("", vec![]), Message::assistant("")], ""),
            "<|User|>:<|Assistant|>:"
        );
    }

    #[test]
    fn image_count_mismatch_names_both_numbers() {
        let msgs = vec![Message::user("<image><image> x", vec![]), Message::assistant("")];
        let err = validate(&msgs, "<image>", 3).unwrap_err().to_string();
        assert!(
            err.contains("2 `<image>` tag(s)") && err.contains("3 image(s)"),
            "{err}"
        );
    }

    #[test]
    fn system_only_first_and_no_tags_outside_user() {
        let msgs = vec![Message::user("x", vec![]), Message::new(Role::System, "s", vec![])];
        assert!(validate(&msgs, "<image>", 0)
            .unwrap_err()
            .to_string()
            .contains("message 1"));
        let msgs = vec![Message::user("x", vec![]), Message::assistant("<image>")];
        assert!(validate(&msgs, "<image>", 0)
            .unwrap_err()
            .to_string()
            .contains("only allowed in user"));
        assert!(validate(&[], "<image>", 0).is_err());
    }

    #[test]
    fn token_count_formula() {
        assert_eq!(image_token_count(14, 1, 1), 421);
        assert_eq!(image_token_count(14, 2, 2), 1023);
        assert_eq!(image_token_count(14, 3, 1), 14 * 15 + 1 + 14 * 43);
    }
}
