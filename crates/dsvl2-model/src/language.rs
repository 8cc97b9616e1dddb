//! The DeepseekV2 language model (`language.*`): token embedding, decoder layers
//! (`h += attn(norm(h)); h += ffn(norm(h))`), final RMSNorm and the LM head.

use candle_core::{DType, Device, Tensor};
use dsvl2_config::LanguageConfig;

use crate::attention::{Attention, AttentionInput};
use crate::cache::SequenceCache;
use crate::linear::Linear;
use crate::moe::{FeedForward, Mlp, Moe};
use crate::norm::RmsNorm;
use crate::rope::RotaryEmbedding;
use crate::{ModelError, Weights};

struct DecoderLayer {
    input_norm: RmsNorm,
    attention: Attention,
    post_attention_norm: RmsNorm,
    ffn: FeedForward,
}

pub struct LanguageModel {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    cfg: LanguageConfig,
    device: Device,
}

/// Prompts are prefilled this many tokens at a time, bounding the attention-score memory.
pub const PREFILL_CHUNK: usize = 512;

impl LanguageModel {
    pub fn load(w: &Weights, cfg: &LanguageConfig) -> Result<Self, ModelError> {
        let d = cfg.hidden_size;
        let embed_tokens = w.get("language.model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("language.model.layers.{i}");
                let ffn = match &cfg.moe {
                    Some(moe) if cfg.is_moe_layer(i) => FeedForward::Moe(Moe::load(w, &format!("{p}.mlp"), cfg, moe)?),
                    _ => FeedForward::Dense(Mlp::load(w, &format!("{p}.mlp"), d, cfg.intermediate_size)?),
                };
                Ok(DecoderLayer {
                    input_norm: RmsNorm::load(w, &format!("{p}.input_layernorm"), d, cfg.rms_norm_eps)?,
                    attention: Attention::load(w, &format!("{p}.self_attn"), cfg)?,
                    post_attention_norm: RmsNorm::load(
                        w,
                        &format!("{p}.post_attention_layernorm"),
                        d,
                        cfg.rms_norm_eps,
                    )?,
                    ffn,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let norm = RmsNorm::load(w, "language.model.norm", d, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("language.lm_head.weight") {
            Linear::from_weight(embed_tokens.clone(), None)
        } else {
            Linear::load(w, "language.lm_head", d, cfg.vocab_size, false)?
        };
        Ok(LanguageModel {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Attention::rotary(cfg),
            cfg: cfg.clone(),
            device: w.device().clone(),
        })
    }

    pub fn config(&self) -> &LanguageConfig {
        &self.cfg
    }

    pub fn rotary(&self) -> &RotaryEmbedding {
        &self.rope
    }

    pub fn new_cache(&self) -> SequenceCache {
        SequenceCache::new(self.layers.iter().map(|l| l.attention.new_cache()).collect())
    }

    /// Token embeddings `[len, hidden]`; ids past the vocabulary are an error, not a panic.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor, ModelError> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary ({} ids)",
                self.cfg.vocab_size
            )));
        }
        let index = Tensor::from_slice(ids, ids.len(), &self.device)?;
        Ok(self.embed_tokens.index_select(&index, 0)?)
    }

    /// Runs `embeds` (`[len, hidden]`) through the decoder after what `cache` holds, in chunks of
    /// [`PREFILL_CHUNK`], and returns the final-norm hidden state of the LAST position `[hidden]`.
    /// With `trace`, also records each layer's input at the last position, then the final output
    /// (the reference's `output_hidden_states` at that position).
    pub fn forward(
        &self,
        embeds: &Tensor,
        cache: &mut SequenceCache,
        mut trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor, ModelError> {
        let len = embeds.dim(0)?;
        if len == 0 {
            return Err(ModelError::Input("nothing to run: zero tokens".into()));
        }
        let end = cache.len + len;
        if end > self.cfg.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "position {end} is past the model's context of {} tokens",
                self.cfg.max_position_embeddings
            )));
        }
        let mut last = None;
        let mut start = 0;
        while start < len {
            let n = PREFILL_CHUNK.min(len - start);
            let is_last_chunk = start + n == len;
            let chunk = embeds.narrow(0, start, n)?;
            let t = if is_last_chunk { trace.as_deref_mut() } else { None };
            last = Some(self.forward_chunk(&chunk, cache, t)?);
            start += n;
        }
        Ok(last.expect("at least one chunk ran"))
    }

    fn forward_chunk(
        &self,
        x: &Tensor,
        cache: &mut SequenceCache,
        mut trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor, ModelError> {
        let n = x.dim(0)?;
        let past = cache.len;
        let (cos, sin) = self.rope.tables(past, n, &self.device)?;
        let mask = if n > 1 {
            Some(causal_mask(n, past, &self.device)?)
        } else {
            None
        };
        let mut h = x.to_dtype(DType::F32)?;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            if let Some(t) = trace.as_deref_mut() {
                t.push(h.get(n - 1)?);
            }
            let input = AttentionInput {
                x: &layer.input_norm.forward(&h)?,
                cos: &cos,
                sin: &sin,
                mask: mask.as_ref(),
            };
            h = (&h + layer.attention.forward(&input, &self.rope, layer_cache)?)?;
            h = (&h + layer.ffn.forward(&layer.post_attention_norm.forward(&h)?)?)?;
        }
        cache.len += n;
        let out = self.norm.forward(&h.get(n - 1)?.unsqueeze(0)?)?.squeeze(0)?;
        if let Some(t) = trace {
            t.push(out.clone());
        }
        Ok(out)
    }

    /// LM-head logits `[vocab]` for a final hidden state `[hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self
            .lm_head
            .forward(&hidden.unsqueeze(0)?)?
            .squeeze(0)?
            .to_dtype(DType::F32)?)
    }
}

/// `[n, past+n]` additive mask: query i (at position past+i) sees keys 0..=past+i.
fn causal_mask(n: usize, past: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = past + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (n, total), device)
}
