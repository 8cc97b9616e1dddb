//! The flags that say what to ask: model folder, prompt and images, or a conversation file.
//! Shared by `prepare` and `generate` so both read a request the same way.

use std::path::PathBuf;

use anyhow::Context;
use dsvl2_config::ModelDir;
use dsvl2_processor::Conversation;

#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "conversation"])))]
pub struct RequestArgs {
    /// Model: a folder in the official Hugging Face layout (config.json, processor_config.json,
    /// tokenizer files, safetensors weights), or a Hub repo id (`owner/name[@revision]`), downloaded
    /// into the Hugging Face cache on first use (HF_HOME, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE).
    #[arg(long, value_name = "DIR|REPO", default_value = crate::runner::DEFAULT_MODEL)]
    pub model: String,

    /// User prompt; becomes one user turn plus the empty assistant turn. Put one `<image>` tag per
    /// --image where the image goes. Exclusive with --conversation.
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,

    /// Image for --prompt, repeatable, in tag order. Default: none.
    #[arg(long = "image", value_name = "PATH", requires = "prompt")]
    pub images: Vec<PathBuf>,

    /// Conversation file in the official JSON format (list of {"role", "content", "images"});
    /// image paths are relative to the file's folder. Exclusive with --prompt.
    #[arg(long, value_name = "FILE", conflicts_with = "prompt")]
    pub conversation: Option<PathBuf>,

    /// System prompt (the reference shows it in sft_format but does not tokenize it). Default: empty.
    #[arg(long, value_name = "TEXT", default_value = "", hide_default_value = true)]
    pub system: String,
}

impl RequestArgs {
    pub fn open_model(&self) -> anyhow::Result<ModelDir> {
        crate::runner::open_model(&self.model)
    }

    /// The conversation to answer. A turn with more images than `image_token` tags gets the
    /// missing tags at its start (said on stderr), so no image is silently dropped.
    pub fn conversation(&self, image_token: &str) -> anyhow::Result<Conversation> {
        let mut conversation = match (&self.prompt, &self.conversation) {
            (Some(prompt), _) => Conversation::single_turn(prompt.clone(), self.images.clone()),
            (None, Some(file)) => {
                Conversation::from_file(file).with_context(|| format!("cannot read conversation {}", file.display()))?
            }
            (None, None) => anyhow::bail!("give --prompt or --conversation"),
        };
        for note in conversation.insert_missing_image_tags(image_token) {
            eprintln!("note: {note}");
        }
        Ok(conversation)
    }
}
