//! The one error type of the input pipeline. Every message names the thing at fault (file, role,
//! token, numbers) so that a user can fix the request without reading the code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// The `<image>` tags of the user messages and the supplied images do not pair up.
    #[error("the conversation has {tags} `{tag}` tag(s) but {images} image(s) were given; each tag takes one image, in order")]
    ImageCountMismatch { tag: String, tags: usize, images: usize },

    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The bytes are not in any supported image format (sniffed from the content, not the name).
    #[error("{name}: not an image in a supported format (JPEG, PNG, WebP, GIF, BMP or TIFF)")]
    NotAnImage { name: String },

    /// Recognised format, but the data are corrupt, truncated or use an unsupported feature.
    #[error("{name}: cannot decode {format} image: {message}")]
    ImageDecode {
        name: String,
        format: String,
        message: String,
    },

    /// Same threshold as Pillow's `DecompressionBombError`; checked from the header, before decoding.
    #[error("{name}: image is too large: {width}x{height} = {pixels} pixels, the limit is {limit} pixels")]
    ImageTooLarge {
        name: String,
        width: u64,
        height: u64,
        pixels: u64,
        limit: u64,
    },

    #[error("{name}: image is empty ({width}x{height}, 0 pixels)")]
    EmptyImage { name: String, width: u32, height: u32 },

    #[error("message {index}: unknown role {role:?} (expected \"<|User|>\", \"<|Assistant|>\", \"user\", \"assistant\" or \"system\")")]
    UnknownRole { index: usize, role: String },

    /// A structurally valid conversation that the reference processor refuses.
    #[error("message {index}: {reason}")]
    InvalidMessage { index: usize, reason: String },

    #[error("{}: invalid conversation file: {message}", path.display())]
    ConversationFile { path: PathBuf, message: String },

    #[error("cannot load tokenizer {}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },

    /// A special token the processor needs (bos, eos, image) is not a token of the tokenizer.
    #[error("special token {token:?} ({what}) is not in the tokenizer {}", path.display())]
    MissingSpecialToken { what: String, token: String, path: PathBuf },

    /// The model folder does not say which string a special token is.
    #[error("the model folder does not name the {what} token (tokenizer_config.json / special_tokens_map.json)")]
    UnnamedSpecialToken { what: String },

    #[error("tokenizer failed to {action}: {message}")]
    Tokenize { action: &'static str, message: String },

    #[error("cannot write image {}: {message}", path.display())]
    ImageEncode { path: PathBuf, message: String },

    #[error("invalid image buffer: {width}x{height} RGB needs {expected} bytes, got {got}")]
    BadBuffer {
        width: u32,
        height: u32,
        expected: usize,
        got: usize,
    },
}
