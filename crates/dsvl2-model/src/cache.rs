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

/// How an MHA cache holds its keys and values (`--kv-cache`). MLA caches are always f32 (see
/// `Attention::new_cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheFormat {
    /// The reference's numbers.
    F32,
    /// Half the bytes: decoding reads the whole cache for every token.
    F16,
    /// A quarter of f32's bytes: i8 values with one f32 scale per position and head (the row's
    /// largest magnitude maps to 127), i.e. 132 bytes per 128-value head row against f16's 256.
    I8,
}

impl CacheFormat {
    pub const ALL: [CacheFormat; 3] = [CacheFormat::F32, CacheFormat::F16, CacheFormat::I8];

    pub fn name(self) -> &'static str {
        match self {
            CacheFormat::F32 => "f32",
            CacheFormat::F16 => "f16",
            CacheFormat::I8 => "i8",
        }
    }
}

impl std::fmt::Display for CacheFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CacheFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        CacheFormat::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown cache format '{s}' (expected one of: f32, f16, i8)"))
    }
}

/// Keys or values of one MHA layer, `[len, kv_heads, head_dim]`.
#[derive(Debug)]
pub enum HeadCache {
    /// f32 or f16 values.
    Float(GrowingTensor),
    /// i8 values (stored as their u8 bit patterns, candle has no i8) and one f32 scale per position
    /// and head, `[len, kv_heads]`.
    I8 {
        values: GrowingTensor,
        scales: GrowingTensor,
    },
}

/// What a [`HeadCache`] holds after an append: every position so far, `[len, kv_heads, head_dim]`.
pub enum HeadRowsView {
    Float(Tensor),
    /// u8 bit patterns of i8 values `[len, kv_heads, head_dim]` and scales `[len, kv_heads]`.
    I8 {
        values: Tensor,
        scales: Tensor,
    },
}

impl HeadCache {
    pub fn new(format: CacheFormat) -> Self {
        match format {
            CacheFormat::F32 => HeadCache::Float(GrowingTensor::new(DType::F32)),
            CacheFormat::F16 => HeadCache::Float(GrowingTensor::new(DType::F16)),
            CacheFormat::I8 => HeadCache::I8 {
                values: GrowingTensor::new(DType::U8),
                scales: GrowingTensor::new(DType::F32),
            },
        }
    }

    /// Appends `x` (`[n, kv_heads, head_dim]`, rounded to this cache's format) and returns every
    /// position so far.
    pub fn append(&mut self, x: &Tensor) -> candle_core::Result<HeadRowsView> {
        match self {
            HeadCache::Float(t) => Ok(HeadRowsView::Float(t.append(x)?)),
            HeadCache::I8 { values, scales } => {
                let (n, kv, dim) = x.dims3()?;
                let device = x.device().clone();
                let x = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let (mut q, mut s) = (vec![0i8; x.len()], vec![0f32; n * kv]);
                dsvl2_kernels::quantize_i8_rows(&x, dim, &mut q, &mut s);
                let bits: Vec<u8> = q.into_iter().map(|v| v as u8).collect();
                let values = values.append(&Tensor::from_vec(bits, (n, kv, dim), &device)?)?;
                let scales = scales.append(&Tensor::from_vec(s, (n, kv), &device)?)?;
                Ok(HeadRowsView::I8 { values, scales })
            }
        }
    }

    pub fn fork(&self) -> candle_core::Result<Self> {
        Ok(match self {
            HeadCache::Float(t) => HeadCache::Float(t.fork()?),
            HeadCache::I8 { values, scales } => HeadCache::I8 {
                values: values.fork()?,
                scales: scales.fork()?,
            },
        })
    }

    pub fn truncate(&mut self, len: usize) {
        match self {
            HeadCache::Float(t) => t.truncate(len),
            HeadCache::I8 { values, scales } => {
                values.truncate(len);
                scales.truncate(len);
            }
        }
    }
}

impl HeadRowsView {
    /// Every position as f32 `[len, kv_heads, head_dim]` (the i8 values times their scales).
    pub fn to_f32(&self) -> candle_core::Result<Tensor> {
        match self {
            HeadRowsView::Float(t) => t.to_dtype(DType::F32),
            HeadRowsView::I8 { values, scales } => {
                let (len, kv, dim) = values.dims3()?;
                let bits = values.flatten_all()?.to_vec1::<u8>()?;
                let scales = scales.flatten_all()?.to_vec1::<f32>()?;
                let x: Vec<f32> = bits
                    .chunks_exact(dim)
                    .zip(&scales)
                    .flat_map(|(row, &s)| row.iter().map(move |&b| b as i8 as f32 * s))
                    .collect();
                Tensor::from_vec(x, (len, kv, dim), values.device())
            }
        }
    }

    pub fn len(&self) -> candle_core::Result<usize> {
        match self {
            HeadRowsView::Float(t) => t.dim(0),
            HeadRowsView::I8 { values, .. } => values.dim(0),
        }
    }
}

/// One decoder layer's cache.
#[derive(Debug)]
pub enum LayerCache {
    /// Rotated keys and values, `[len, kv_heads, head_dim]` each.
    Mha { keys: HeadCache, values: HeadCache },
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
