//! The decoding loop over a prepared prompt.

use std::time::Instant;

use candle_core::Tensor;

use crate::sampling::Sampler;
use crate::vl::DeepseekVl2;
use crate::ModelError;
use crate::SequenceCache;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model wrote its end-of-sentence token, or the caller stopped it (stop string).
    Stop,
    /// `max_new_tokens` were generated.
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, including the final EOS when the model wrote one.
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Refuses a request whose prompt plus new tokens cannot fit the context, before any work.
pub fn check_context(
    prompt_tokens: usize,
    image_tokens: &[usize],
    max_new_tokens: usize,
    context: usize,
) -> Result<(), ModelError> {
    if prompt_tokens + max_new_tokens <= context {
        return Ok(());
    }
    let per_image = if image_tokens.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = image_tokens.iter().map(|n| n.to_string()).collect();
        format!(": {} per image", list.join(" + "))
    };
    Err(ModelError::ContextOverflow {
        prompt_tokens,
        image_tokens: image_tokens.iter().sum(),
        per_image,
        max_new_tokens,
        context,
    })
}

/// Generates after the tokens `cache` already holds: `new_embeds` (`[len, hidden]`, from
/// [`DeepseekVl2::embed_inputs`]) are the prompt positions not yet in the cache, `prompt_ids` the
/// whole prompt (the repetition penalty sees all of it). `on_token` sees each new id as it is
/// chosen; returning `false` stops early. On return the cache holds the prompt and every
/// generated token except the last (which was never fed back).
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &DeepseekVl2,
    cache: &mut SequenceCache,
    new_embeds: &Tensor,
    prompt_ids: &[u32],
    sampler: &mut Sampler,
    eos: Option<u32>,
    max_new_tokens: usize,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation, ModelError> {
    let started = Instant::now();
    let mut logits = model.forward_embeds(new_embeds, cache, None)?;
    let prefill_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut seen = prompt_ids.to_vec();
    let mut tokens = Vec::new();
    let mut finish_reason = FinishReason::Length;
    while tokens.len() < max_new_tokens {
        let next = sampler.next(logits.to_vec1()?, &seen);
        tokens.push(next);
        seen.push(next);
        let keep_going = on_token(next);
        if Some(next) == eos {
            finish_reason = FinishReason::Stop;
            break;
        }
        if !keep_going {
            finish_reason = FinishReason::Stop;
            break;
        }
        if tokens.len() == max_new_tokens {
            break;
        }
        logits = model.step(next, cache)?;
    }
    Ok(Generation {
        tokens,
        finish_reason,
        prefill_seconds,
        decode_seconds: started.elapsed().as_secs_f64(),
    })
}
