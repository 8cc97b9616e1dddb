//! Conversations in the official JSON format:
//! `[{"role": "<|User|>", "content": "<image>\n...", "images": ["a.png"]}, {"role": "<|Assistant|>", "content": ""}]`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ProcessorError;

/// Who speaks. The reference accepts two spellings for user and assistant (the template's
/// `<|User|>` / `<|Assistant|>` and plain `user` / `assistant`) and `system` for a leading
/// system message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
    System,
}

impl Role {
    /// The template's spelling, used when a message is built in code.
    pub fn template_name(self) -> &'static str {
        match self {
            Role::User => "<|User|>",
            Role::Assistant => "<|Assistant|>",
            Role::System => "system",
        }
    }

    /// Parses a role as the reference does (`deepseekapi-sys` is its other system spelling).
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "<|User|>" | "user" => Some(Role::User),
            "<|Assistant|>" | "assistant" => Some(Role::Assistant),
            "system" | "deepseekapi-sys" => Some(Role::System),
            _ => None,
        }
    }
}

/// One message. `role_name` is the role as written: the reference copies it verbatim into
/// `sft_format` (so `user` and `<|User|>` give different `sft_format` text, same `input_ids`).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub role_name: String,
    pub content: String,
    /// Images of this message, in order (resolved paths when loaded from a file).
    pub images: Vec<PathBuf>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>, images: Vec<PathBuf>) -> Self {
        Message {
            role,
            role_name: role.template_name().to_string(),
            content: content.into(),
            images,
        }
    }

    pub fn user(content: impl Into<String>, images: Vec<PathBuf>) -> Self {
        Message::new(Role::User, content, images)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new(Role::Assistant, content, Vec::new())
    }
}

/// A list of messages; the images they name are used in message order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    content: String,
    #[serde(default)]
    images: Vec<String>,
}

impl Conversation {
    /// One user turn with its images, then the empty assistant turn the model answers in.
    pub fn single_turn(prompt: impl Into<String>, images: Vec<PathBuf>) -> Self {
        Conversation {
            messages: vec![Message::user(prompt, images), Message::assistant("")],
        }
    }

    /// Parses the official JSON format; relative image paths are taken relative to `base_dir`.
    pub fn from_json(text: &str, base_dir: &Path, source: &Path) -> Result<Self, ProcessorError> {
        let bad = |message: String| ProcessorError::ConversationFile {
            path: source.to_path_buf(),
            message,
        };
        let raw: Vec<RawMessage> = serde_json::from_str(text).map_err(|e| {
            bad(format!(
                "{e} (expected a list of {{\"role\", \"content\", \"images\"}} objects)"
            ))
        })?;
        let mut messages = Vec::with_capacity(raw.len());
        for (index, m) in raw.into_iter().enumerate() {
            let role = Role::parse(&m.role).ok_or_else(|| ProcessorError::UnknownRole {
                index,
                role: m.role.clone(),
            })?;
            let images = m.images.iter().map(|p| base_dir.join(p)).collect();
            messages.push(Message {
                role,
                role_name: m.role,
                content: m.content,
                images,
            });
        }
        Ok(Conversation { messages })
    }

    /// Reads a conversation file; image paths are relative to the file's folder.
    pub fn from_file(path: &Path) -> Result<Self, ProcessorError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProcessorError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_json(&text, base, path)
    }

    /// Every image path, in conversation order.
    pub fn image_paths(&self) -> Vec<&Path> {
        self.messages
            .iter()
            .flat_map(|m| m.images.iter().map(PathBuf::as_path))
            .collect()
    }

    /// A user turn with more images than `image_token` tags gets the missing tags at its start,
    /// one per line, as the official web demo does, so no image is silently lost. Returns one
    /// note per changed message, for the user. (More tags than images stays an error.)
    pub fn insert_missing_image_tags(&mut self, image_token: &str) -> Vec<String> {
        let mut notes = Vec::new();
        for (index, m) in self.messages.iter_mut().enumerate() {
            let tags = m.content.matches(image_token).count();
            if m.role != Role::User || m.images.len() <= tags {
                continue;
            }
            let missing = m.images.len() - tags;
            let added = vec![image_token; missing].join("\n");
            m.content = format!("{added}\n{}", m.content);
            notes.push(format!(
                "message {index} has {} image(s) but {tags} `{image_token}` tag(s): added {missing} tag(s) at its start",
                m.images.len()
            ));
        }
        notes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_image_tags_are_added_at_the_start_of_their_turn() {
        let mut c = Conversation::single_turn(
            "What is in <image>?",
            vec!["a.png".into(), "b.png".into(), "c.png".into()],
        );
        let notes = c.insert_missing_image_tags("<image>");
        assert_eq!(c.messages[0].content, "<image>\n<image>\nWhat is in <image>?");
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].contains("3 image(s) but 1 `<image>` tag(s): added 2"),
            "{}",
            notes[0]
        );
        // Nothing to add: unchanged, no note.
        let mut c = Conversation::single_turn("<image> and <image>", vec!["a.png".into()]);
        assert!(c.insert_missing_image_tags("<image>").is_empty());
        assert_eq!(c.messages[0].content, "<image> and <image>");
    }

    #[test]
    fn parses_official_format_relative_to_the_file() {
        let text = r#"[{"role": "<|User|>", "content": "<image>\nhi", "images": ["images/a.png"]},
                       {"role": "assistant", "content": ""}]"#;
        let c = Conversation::from_json(text, Path::new("/data"), Path::new("/data/c.json")).unwrap();
        assert_eq!(c.messages.len(), 2);
        assert_eq!(c.messages[0].role, Role::User);
        assert_eq!(c.messages[1].role_name, "assistant");
        assert_eq!(c.image_paths(), vec![Path::new("/data/images/a.png")]);
    }

    #[test]
    fn unknown_role_is_named() {
        let text = r#"[{"role": "narrator", "content": "x"}]"#;
        let err = Conversation::from_json(text, Path::new("."), Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("\"narrator\""), "{err}");
        assert!(err.to_string().contains("message 0"), "{err}");
    }

    #[test]
    fn malformed_json_names_the_file() {
        let err = Conversation::from_json("{", Path::new("."), Path::new("conv.json")).unwrap_err();
        assert!(err.to_string().contains("conv.json"), "{err}");
    }
}
