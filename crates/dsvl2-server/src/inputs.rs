//! What both APIs share: fetching and decoding images, preparing the prompt off the async
//! runtime, and the answer budget.

use std::sync::Arc;

use dsvl2_media::{fetch_image, shorten_reference, MediaPolicy};
use dsvl2_processor::{decode_image, Conversation, DecodeOptions, PreparedInput, Processor};

use crate::error::ApiError;

/// One image reference and the request field it came from (for error messages).
pub struct ImageRef {
    pub reference: String,
    pub param: String,
}

/// Fetches the images (concurrently), then decodes them and prepares the conversation on the
/// blocking pool.
pub async fn prepare(
    processor: Arc<Processor>,
    policy: &MediaPolicy,
    conversation: Conversation,
    images: Vec<ImageRef>,
) -> Result<PreparedInput, ApiError> {
    let fetches = images.iter().map(|image| async move {
        fetch_image(&image.reference, policy)
            .await
            .map(|bytes| (shorten_reference(&image.reference), bytes))
            .map_err(|e| ApiError::from_media(&e, &image.param))
    });
    let fetched = futures_util::future::try_join_all(fetches).await?;
    tokio::task::spawn_blocking(move || {
        let options = DecodeOptions::default();
        let images = fetched
            .iter()
            .map(|(name, bytes)| decode_image(bytes, name, &options))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError::from_processor(&e))?;
        processor
            .prepare(&conversation, &images, "")
            .map_err(|e| ApiError::from_processor(&e))
    })
    .await
    .map_err(|e| ApiError::internal(format!("image preprocessing failed: {e}")))?
}

/// The hosted model's default answer budget.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 2048;

/// The answer budget: `requested` (or the default) clamped to what the context leaves after the
/// prompt, at least 1 (a prompt that fills the context is then refused by the engine with the
/// token counts).
pub fn clamped_budget(requested: Option<usize>, prompt_len: usize, context: usize) -> usize {
    let left = context.saturating_sub(prompt_len).max(1);
    requested.unwrap_or(DEFAULT_MAX_NEW_TOKENS).clamp(1, left)
}
