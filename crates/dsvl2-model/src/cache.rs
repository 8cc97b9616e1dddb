//! Per-sequence attention caches. MHA keeps keys and values; MLA keeps only the compressed latent
//! and the shared rotary key (kv_lora_rank + rope dims per token and layer), which is what makes
//! MLA's cache several times smaller.

use candle_core::{DType, Tensor};

/// A tensor that grows along dimension 0, with amortised doubling instead of a copy per token.
/// Not `Clone`: copies must not share the buffer that `append` writes into (see [`Self::fork`]).
#[derive(Debug)]
pub struct GrowingTensor {
    buffer: Option<Tensor>,
    len: usize,
    /// What the values are stored as (appended values are converted).
    dtype: DType,
}

impl GrowingTensor {
    pub fn new(dtype: DType) -> Self {
        GrowingTensor {
            buffer: None,
            len: 0,
            dtype,
        }
    }

    /// Appends `x` (`[n, ...]`, converted to this tensor's dtype) and returns everything so far
    /// (`[len, ...]`, contiguous, in this tensor's dtype).
    pub fn append(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(self.dtype)?;
        let n = x.dim(0)?;
        let needed = self.len + n;
        let capacity = self.buffer.as_ref().map_or(0, |b| b.dims()[0]);
        if needed > capacity {
            let mut dims = x.dims().to_vec();
            dims[0] = needed.max(2 * capacity).max(16);
            let grown = Tensor::zeros(dims, self.dtype, x.device())?;
            if let Some(old) = &self.buffer {
                grown.slice_set(&old.narrow(0, 0, self.len)?.contiguous()?, 0, 0)?;
            }
            self.buffer = Some(grown);
        }
        let buffer = self.buffer.as_ref().expect("buffer allocated above");
        buffer.slice_set(&x.contiguous()?, 0, self.len)?;
        self.len = needed;
        buffer.narrow(0, 0, self.len)
    }

    /// An independent copy (a plain `clone` shares the buffer, which `append` writes into).
    pub fn fork(&self) -> candle_core::Result<Self> {
        let buffer = match &self.buffer {
            Some(b) => Some(b.copy()?),
            None => None,
        };
        Ok(GrowingTensor {
            buffer,
            len: self.len,
            dtype: self.dtype,
        })
    }

    /// Keeps the first `len` rows (the buffer is reused).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// One decoder layer's cache.
#[derive(Debug)]
pub enum LayerCache {
    /// Rotated keys and values, `[len, kv_heads, head_dim]` each.
    Mha { keys: GrowingTensor, values: GrowingTensor },
    /// Normalised latent `[len, kv_lora_rank]` and rotated shared key `[len, rope_dim]`.
    Mla {
        latent: GrowingTensor,
        rope_key: GrowingTensor,
    },
}

/// Everything one sequence needs to continue decoding.
#[derive(Debug)]
pub struct SequenceCache {
    pub(crate) layers: Vec<LayerCache>,
    /// Tokens already processed (the position of the next token).
    pub(crate) len: usize,
}

impl SequenceCache {
    pub(crate) fn new(layers: Vec<LayerCache>) -> Self {
        SequenceCache { layers, len: 0 }
    }

    /// Number of tokens processed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// An independent copy: both can go on decoding without affecting each other (e.g. several
    /// answers to one prefilled prompt).
    pub fn fork(&self) -> candle_core::Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                Ok(match layer {
                    LayerCache::Mha { keys, values } => LayerCache::Mha {
                        keys: keys.fork()?,
                        values: values.fork()?,
                    },
                    LayerCache::Mla { latent, rope_key } => LayerCache::Mla {
                        latent: latent.fork()?,
                        rope_key: rope_key.fork()?,
                    },
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(SequenceCache { layers, len: self.len })
    }

    /// Forgets everything after the first `len` tokens (e.g. to re-run a turn).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for layer in &mut self.layers {
            match layer {
                LayerCache::Mha { keys, values } => {
                    keys.truncate(len);
                    values.truncate(len);
                }
                LayerCache::Mla { latent, rope_key } => {
                    latent.truncate(len);
                    rope_key.truncate(len);
                }
            }
        }
    }
}
