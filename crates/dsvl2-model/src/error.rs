use std::path::PathBuf;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] dsvl2_config::ConfigError),

    #[error("{}: {message}", path.display())]
    Weights { path: PathBuf, message: String },

    #[error("missing tensor `{name}` in the checkpoint")]
    MissingTensor { name: String },

    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("the checkpoint has {count} tensor(s) this model does not use: {names}")]
    UnexpectedTensors { count: usize, names: String },

    /// The request does not fit the model's context window.
    #[error(
        "the prompt needs {prompt_tokens} tokens ({image_tokens} of them for images{per_image}) \
         plus {max_new_tokens} new tokens, but the model's context is {context} tokens"
    )]
    ContextOverflow {
        prompt_tokens: usize,
        image_tokens: usize,
        /// ": 421 + 213" style breakdown, empty without images.
        per_image: String,
        max_new_tokens: usize,
        context: usize,
    },

    #[error("invalid input: {0}")]
    Input(String),

    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}
