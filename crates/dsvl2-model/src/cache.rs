//! Per-sequence attention caches. MHA keeps keys and values; MLA keeps only the compressed latent
//! and the shared rotary key (kv_lora_rank + rope dims per token and layer), which is what makes
//! MLA's cache several times smaller.

use std::sync::Arc;

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

    /// The first `len` rows (at most what it holds), `None` when that is none.
    pub fn rows(&self, len: usize) -> candle_core::Result<Option<Tensor>> {
        match &self.buffer {
            Some(b) if len.min(self.len) > 0 => Ok(Some(b.narrow(0, 0, len.min(self.len))?)),
            _ => Ok(None),
        }
    }

    /// Drops the room to grow (the buffer doubles as it grows: a 1039-position prompt prefilled in
    /// chunks held 2048 positions). For a cache that is frozen and kept; on a failed copy the buffer
    /// simply stays as it is.
    fn compact(&mut self) {
        if let Some(b) = &self.buffer {
            if b.dims()[0] > self.len {
                if let Ok(exact) = b.narrow(0, 0, self.len).and_then(|t| t.copy()) {
                    self.buffer = Some(exact);
                }
            }
        }
    }

    /// Bytes of the buffer (what it holds and the room to grow).
    fn bytes(&self) -> usize {
        self.buffer
            .as_ref()
            .map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes())
    }

    /// Bytes of one position (one row along dimension 0); 0 before the first append.
    fn bytes_per_position(&self) -> usize {
        self.buffer
            .as_ref()
            .map_or(0, |b| b.elem_count() / b.dims()[0].max(1) * b.dtype().size_in_bytes())
    }

    /// An empty tensor of the same dtype.
    fn empty_like(&self) -> Self {
        GrowingTensor::new(self.dtype)
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

    /// The first `len` positions (at most what it holds), `None` when that is none.
    pub fn rows(&self, len: usize) -> candle_core::Result<Option<HeadRowsView>> {
        Ok(match self {
            HeadCache::Float(t) => t.rows(len)?.map(HeadRowsView::Float),
            HeadCache::I8 { values, scales } => match (values.rows(len)?, scales.rows(len)?) {
                (Some(values), Some(scales)) => Some(HeadRowsView::I8 { values, scales }),
                _ => None,
            },
        })
    }

    /// The tensors it is made of.
    fn tensors(&self) -> Vec<&GrowingTensor> {
        match self {
            HeadCache::Float(t) => vec![t],
            HeadCache::I8 { values, scales } => vec![values, scales],
        }
    }

    fn tensors_mut(&mut self) -> Vec<&mut GrowingTensor> {
        match self {
            HeadCache::Float(t) => vec![t],
            HeadCache::I8 { values, scales } => vec![values, scales],
        }
    }

    fn empty_like(&self) -> Self {
        match self {
            HeadCache::Float(t) => HeadCache::Float(t.empty_like()),
            HeadCache::I8 { values, scales } => HeadCache::I8 {
                values: values.empty_like(),
                scales: scales.empty_like(),
            },
        }
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

impl LayerCache {
    /// The tensors it is made of.
    fn tensors(&self) -> Vec<&GrowingTensor> {
        match self {
            LayerCache::Mha { keys, values } => keys.tensors().into_iter().chain(values.tensors()).collect(),
            LayerCache::Mla { latent, rope_key } => vec![latent, rope_key],
        }
    }

    fn tensors_mut(&mut self) -> Vec<&mut GrowingTensor> {
        match self {
            LayerCache::Mha { keys, values } => keys.tensors_mut().into_iter().chain(values.tensors_mut()).collect(),
            LayerCache::Mla { latent, rope_key } => vec![latent, rope_key],
        }
    }

    fn bytes(&self) -> usize {
        self.tensors().into_iter().map(GrowingTensor::bytes).sum()
    }

    /// An empty cache of the same kind and format.
    fn empty_like(&self) -> Self {
        match self {
            LayerCache::Mha { keys, values } => LayerCache::Mha {
                keys: keys.empty_like(),
                values: values.empty_like(),
            },
            LayerCache::Mla { latent, rope_key } => LayerCache::Mla {
                latent: latent.empty_like(),
                rope_key: rope_key.empty_like(),
            },
        }
    }
}

/// The first `len` positions of one layer's cache, shared by the sequences that continue after
/// them (see [`SharedPrefix`]).
#[derive(Clone, Copy)]
pub struct SharedRows<'a> {
    pub cache: &'a LayerCache,
    pub len: usize,
}

/// A frozen cache that any number of sequences continue from ([`Self::branch`]): its positions are
/// held once and read by all of them. Several answers to one prompt (or one prefilled prompt
/// answered again) then neither copy nor, when they decode in one batch, re-read the prompt's keys
/// and values per sequence (see `dsvl2_kernels::decode_attention_shared`).
#[derive(Debug, Clone)]
pub struct SharedPrefix {
    cache: Arc<SequenceCache>,
    /// How many of `cache`'s positions are shared (a prefix may be cut short, see
    /// [`SequenceCache::truncate`]).
    len: usize,
}

impl SharedPrefix {
    /// Number of shared positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the frozen cache and by the prefixes it continues from, if any (a prefix that
    /// other caches share too is counted in each).
    pub fn bytes(&self) -> usize {
        let inner = self.cache.prefix.as_ref().map_or(0, SharedPrefix::bytes);
        inner + self.cache.layers.iter().map(LayerCache::bytes).sum::<usize>()
    }

    /// A new sequence that continues after these positions: it holds only what comes after.
    pub fn branch(&self) -> SequenceCache {
        SequenceCache {
            prefix: Some(self.clone()),
            layers: self.cache.layers.iter().map(LayerCache::empty_like).collect(),
            len: self.len,
        }
    }

    /// Layer `layer`'s shared positions, in order: the pieces of this prefix's own prefixes, then
    /// its own, cut to [`Self::len`] positions in all.
    fn pieces<'a>(&'a self, layer: usize, out: &mut Vec<SharedRows<'a>>) {
        let start = out.len();
        if let Some(inner) = &self.cache.prefix {
            inner.pieces(layer, out);
        }
        out.push(SharedRows {
            cache: &self.cache.layers[layer],
            len: self.cache.len - self.cache.prefix_len(),
        });
        let mut left = self.len;
        for piece in &mut out[start..] {
            piece.len = piece.len.min(left);
            left -= piece.len;
        }
        out.retain(|p| p.len > 0);
    }
}

/// Everything one sequence needs to continue decoding.
#[derive(Debug)]
pub struct SequenceCache {
    /// Positions `0..prefix.len()`, held by a frozen cache this sequence shares with others.
    prefix: Option<SharedPrefix>,
    /// This sequence's own positions, from the prefix's end on.
    pub(crate) layers: Vec<LayerCache>,
    /// Tokens already processed (the position of the next token).
    pub(crate) len: usize,
}

impl SequenceCache {
    pub(crate) fn new(layers: Vec<LayerCache>) -> Self {
        SequenceCache {
            prefix: None,
            layers,
            len: 0,
        }
    }

    /// Freezes this cache so that sequences can continue from it ([`SharedPrefix::branch`]). Its
    /// buffers are cut to what they hold (one copy; a frozen cache never grows).
    pub fn share(mut self) -> SharedPrefix {
        self.layers
            .iter_mut()
            .flat_map(LayerCache::tensors_mut)
            .for_each(GrowingTensor::compact);
        let len = self.len;
        SharedPrefix {
            cache: Arc::new(self),
            len,
        }
    }

    /// Positions held by a shared prefix rather than by this cache's own layers.
    fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, SharedPrefix::len)
    }

    /// Layer `layer`'s shared positions (in order, empty without a prefix) and its own cache, which
    /// holds the positions after them.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> (Vec<SharedRows<'_>>, &mut LayerCache) {
        let mut shared = Vec::new();
        if let Some(prefix) = &self.prefix {
            prefix.pieces(layer, &mut shared);
        }
        (shared, &mut self.layers[layer])
    }

    /// Number of tokens processed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes one position takes in this cache's own layers, all layers together (what a decoding
    /// step reads per position it attends to); 0 before anything was appended.
    pub fn bytes_per_position(&self) -> usize {
        self.layers
            .iter()
            .flat_map(LayerCache::tensors)
            .map(GrowingTensor::bytes_per_position)
            .sum()
    }

    /// An independent copy: both can go on decoding without affecting each other. A shared prefix
    /// stays shared; to answer one prompt several times without copying it, see [`Self::share`].
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
        Ok(SequenceCache {
            prefix: self.prefix.clone(),
            layers,
            len: self.len,
        })
    }

    /// Forgets everything after the first `len` tokens (e.g. to re-run a turn).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        if let Some(prefix) = &mut self.prefix {
            prefix.len = prefix.len.min(self.len);
        }
        let own = self.len - self.prefix_len();
        for layer in &mut self.layers {
            match layer {
                LayerCache::Mha { keys, values } => {
                    keys.truncate(own);
                    values.truncate(own);
                }
                LayerCache::Mla { latent, rope_key } => {
                    latent.truncate(own);
                    rope_key.truncate(own);
                }
            }
        }
    }
}
