//! The DeepseekV2 language model (`language.*`): token embedding, decoder layers
//! (`h += attn(norm(h)); h += ffn(norm(h))`), final RMSNorm and the LM head.

use candle_core::{DType, Device, Tensor};
use dsvl2_config::LanguageConfig;
use dsvl2_kernels::Format;

use crate::attention::{Attention, AttentionInput, Segment};
use crate::cache::{CacheFormat, SequenceCache};
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
    /// What [`Self::new_cache`] makes.
    cache_format: CacheFormat,
}

/// Consecutive rows of one sequence in a decoder input, with its cache and causal mask.
struct SeqRows<'a> {
    cache: &'a mut SequenceCache,
    rows: usize,
    /// `[rows, past+rows]`, or `None` for one row.
    mask: Option<&'a Tensor>,
}

/// Prompts are prefilled this many tokens at a time, bounding the attention-score memory (at most
/// heads x 1024 x context floats). Large chunks matter for MoE layers: each routed expert sees
/// only ~k/n_experts of a chunk's tokens (~100 of 1024 for tiny), and matmuls on fewer rows run
/// further below the FMA peak.
pub const PREFILL_CHUNK: usize = 1024;

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
            Linear::from_tensor(&embed_tokens, None, w.format())?
        } else {
            Linear::load(w, "language.lm_head", d, cfg.vocab_size, false)?
        };
        let cache_format = if lm_head.format() == Format::F32 {
            CacheFormat::F32
        } else {
            CacheFormat::F16
        };
        Ok(LanguageModel {
            cache_format,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Attention::rotary(cfg),
            cfg: cfg.clone(),
            device: w.device().clone(),
        })
    }

    /// Bytes of all weights held (the embedding table included).
    pub fn weight_bytes(&self) -> u64 {
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| l.attention.weight_bytes() + l.ffn.weight_bytes())
            .sum();
        layers + self.lm_head.weight_bytes() + tensor_bytes(&self.embed_tokens)
    }

    /// Weight bytes one decode step of one sequence reads: every layer's attention, dense MLP,
    /// shared experts and `num_experts_per_tok` routed experts, and the LM head (norms and the
    /// one embedding row are negligible and left out).
    pub fn decode_bytes_per_token(&self) -> u64 {
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| l.attention.weight_bytes() + l.ffn.bytes_per_token())
            .sum();
        layers + self.lm_head.weight_bytes()
    }

    pub fn config(&self) -> &LanguageConfig {
        &self.cfg
    }

    pub fn rotary(&self) -> &RotaryEmbedding {
        &self.rope
    }

    /// An empty cache whose MHA keys and values are held in [`Self::cache_format`] (MLA caches stay
    /// f32, see [`Attention::new_cache`]).
    pub fn new_cache(&self) -> SequenceCache {
        SequenceCache::new(
            self.layers
                .iter()
                .map(|l| l.attention.new_cache(self.cache_format))
                .collect(),
        )
    }

    /// How new caches hold MHA keys and values. By default f32 when the weights are f32 (the
    /// reference's numbers), otherwise f16: decoding reads the whole cache for every token (at a
    /// 1000-token context, 128 MB of f32 keys and values in tiny against 613 MB of q8_0 weights),
    /// and with compact weights the cache's own rounding is of the same order as theirs.
    pub fn cache_format(&self) -> CacheFormat {
        self.cache_format
    }

    /// Makes later [`Self::new_cache`] calls hold MHA keys and values in `format`.
    pub fn set_cache_format(&mut self, format: CacheFormat) {
        self.cache_format = format;
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
        let seq = SeqRows {
            cache: &mut *cache,
            rows: n,
            mask: mask.as_ref(),
        };
        let h = self.run_layers(x, &cos, &sin, &mut [seq], trace.as_deref_mut())?;
        cache.len += n;
        let out = self.norm.forward(&h.get(n - 1)?.unsqueeze(0)?)?.squeeze(0)?;
        if let Some(t) = trace {
            t.push(out.clone());
        }
        Ok(out)
    }

    /// One decode step for B sequences at once: row b of `embeds` (`[B, hidden]`) is the next
    /// token of the sequence `caches[b]`, at position `caches[b].len()`. Returns the final-norm
    /// hidden states `[B, hidden]`. The linear layers, norms and MoE experts run once on the whole
    /// batch (each weight is read once per step); attention reads each sequence's own cache (all of
    /// them in one parallel dispatch).
    /// Row b equals what [`Self::forward`] gives for that sequence alone, up to float summation
    /// order in the batched matmuls.
    pub fn decode_batch(&self, embeds: &Tensor, caches: &mut [&mut SequenceCache]) -> Result<Tensor, ModelError> {
        let b = caches.len();
        if b == 0 {
            return Err(ModelError::Input("empty decode batch: no sequences".into()));
        }
        if embeds.dims() != [b, self.cfg.hidden_size] {
            return Err(ModelError::Input(format!(
                "decode batch of {b} sequence(s) needs embeddings [{b}, {}], got {:?}",
                self.cfg.hidden_size,
                embeds.dims()
            )));
        }
        for (i, cache) in caches.iter().enumerate() {
            if cache.len >= self.cfg.max_position_embeddings {
                return Err(ModelError::Input(format!(
                    "sequence {i} of the batch: position {} is past the model's context of {} tokens",
                    cache.len + 1,
                    self.cfg.max_position_embeddings
                )));
            }
        }
        let (cos, sin) = self.rope.tables_at(caches.iter().map(|c| c.len), &self.device)?;
        let mut seqs: Vec<SeqRows> = caches
            .iter_mut()
            .map(|c| SeqRows {
                cache: c,
                rows: 1,
                mask: None,
            })
            .collect();
        let h = self.run_layers(embeds, &cos, &sin, &mut seqs, None)?;
        for seq in seqs {
            seq.cache.len += 1;
        }
        Ok(self.norm.forward(&h)?)
    }

    /// The decoder layers over `x` (`[rows, hidden]`): the rows of the sequences in `seqs`, one
    /// after the other, with cos/sin per row. Appends to the caches' layers but leaves their
    /// `len` to the caller. Returns the last layer's output (before the final norm).
    fn run_layers(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        seqs: &mut [SeqRows],
        mut trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor, ModelError> {
        let rows = x.dim(0)?;
        let mut h = x.to_dtype(DType::F32)?;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(t) = trace.as_deref_mut() {
                t.push(h.get(rows - 1)?);
            }
            let input = AttentionInput {
                x: &layer.input_norm.forward(&h)?,
                cos,
                sin,
            };
            let mut segments: Vec<Segment> = seqs
                .iter_mut()
                .map(|seq| {
                    let (shared, cache) = seq.cache.layer_mut(i);
                    Segment {
                        rows: seq.rows,
                        mask: seq.mask,
                        shared,
                        cache,
                    }
                })
                .collect();
            h = (&h + layer.attention.forward(&input, &self.rope, &mut segments)?)?;
            h = (&h + layer.ffn.forward(&layer.post_attention_norm.forward(&h)?)?)?;
        }
        Ok(h)
    }

    /// LM-head logits `[vocab]` for a final hidden state `[hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.logits_batch(&hidden.unsqueeze(0)?)?.squeeze(0)?)
    }

    /// LM-head logits `[B, vocab]` (f32) for final hidden states `[B, hidden]`, in one matmul.
    pub fn logits_batch(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// `[n, past+n]` additive mask: query i (at position past+i) sees keys 0..=past+i.
fn causal_mask(n: usize, past: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = past + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (n, total), device)
}
