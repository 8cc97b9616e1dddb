//! The flags that say what to ask: model folder, prompt and images, or a conversation file.
//! Shared by `prepare` and `generate` so both read a request the same way.

use std::path::PathBuf;

use anyhow::Context;
use dsvl2_config::ModelDir;
use dsvl2_processor::Conversation;

#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "conversation"])))]
pub struct RequestArgs {
    /// Model folder in the official Hugging Face layout (config.json, processor_config.json,
    /// tokenizer files, safetensors weights). Required.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,

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
        ModelDir::open(&self.model).with_context(|| format!("cannot open model folder {}", self.model.display()))
    }

    pub fn conversation(&self) -> anyhow::Result<Conversation> {
        match (&self.prompt, &self.conversation) {
            (Some(prompt), _) => Ok(Conversation::single_turn(prompt.clone(), self.images.clone())),
            (None, Some(file)) => {
                Conversation::from_file(file).with_context(|| format!("cannot read conversation {}", file.display()))
            }
            (None, None) => anyhow::bail!("give --prompt or --conversation"),
        }
    }
}
