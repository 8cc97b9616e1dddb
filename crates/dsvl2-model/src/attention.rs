//! Causal self-attention over per-sequence caches: plain multi-head attention (tiny; it is
//! transformers 4.38's LlamaAttention) and multi-head latent attention (small, base).
//!
//! One call takes rows of one or more sequences (a prefill chunk of one sequence, or one decode
//! token of each of B sequences): the projections run on all rows at once (weights are read once),
//! then each sequence's rows attend over that sequence's own cache ([`Segment`]).

use candle_core::{DType, Tensor, D};
use dsvl2_config::LanguageConfig;

use crate::cache::{CacheFormat, GrowingTensor, HeadCache, HeadRowsView, LayerCache, SharedRows};
use crate::linear::{f32_rows, forward_many, with_cpu_slices, with_f32_slice, Linear};
use crate::norm::RmsNorm;
use crate::rope::{yarn_mscale, RopeLayout, RotaryEmbedding};
use crate::{ModelError, Weights};
use dsvl2_config::RopeScaling;
use dsvl2_kernels::{
    decode_attention_shared, prefill_attention, AttentionShape, CacheRows, DecodeQuery, HeadRows, PrefillShape,
    RowScales,
};

/// What every layer's attention needs for one forward call.
pub struct AttentionInput<'a> {
    /// `[rows, hidden]`, already normalised: the segments' rows, one after the other.
    pub x: &'a Tensor,
    /// cos/sin for the position of each row of `x` (`[rows, rope_dim/2]`).
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
}

/// Consecutive rows of one sequence in an [`AttentionInput`], and that sequence's cache.
pub struct Segment<'a> {
    /// Number of rows (tokens) of this sequence.
    pub rows: usize,
    /// Additive causal mask `[rows, past+rows]`, or `None` when `rows == 1`.
    pub mask: Option<&'a Tensor>,
    /// The sequence's first positions when it continues from a shared prefix (in order; empty
    /// otherwise). Read only: new positions go to `cache`.
    pub shared: Vec<SharedRows<'a>>,
    /// The positions after `shared`.
    pub cache: &'a mut LayerCache,
}

pub enum Attention {
    Mha(Mha),
    Mla(Mla),
}

impl Attention {
    pub fn load(w: &Weights, prefix: &str, cfg: &LanguageConfig) -> Result<Self, ModelError> {
        Ok(if cfg.use_mla {
            Attention::Mla(Mla::load(w, prefix, cfg)?)
        } else {
            Attention::Mha(Mha::load(w, prefix, cfg)?)
        })
    }

    /// The rotary embedding this attention kind uses.
    pub fn rotary(cfg: &LanguageConfig) -> RotaryEmbedding {
        if cfg.use_mla {
            RotaryEmbedding::new(
                cfg.qk_rope_head_dim,
                cfg.rope_theta,
                cfg.rope_scaling.as_ref(),
                RopeLayout::Interleaved,
            )
        } else {
            RotaryEmbedding::new(
                cfg.mha_head_dim(),
                cfg.rope_theta,
                cfg.rope_scaling.as_ref(),
                RopeLayout::HalfSplit,
            )
        }
    }

    /// An empty cache. MHA holds its keys and values in `format` (f32, or f16 / i8 to halve /
    /// quarter what decoding streams; the decode kernel reads each in place). MLA always holds f32:
    /// its cache is already small (rank + rope values per token), and candle's matmuls over it would
    /// convert a smaller cache to f32 in full for every token and layer, costing more than the bytes
    /// saved.
    pub fn new_cache(&self, format: CacheFormat) -> LayerCache {
        match self {
            Attention::Mha(_) => LayerCache::Mha {
                keys: HeadCache::new(format),
                values: HeadCache::new(format),
            },
            Attention::Mla(_) => LayerCache::Mla {
                latent: GrowingTensor::new(DType::F32),
                rope_key: GrowingTensor::new(DType::F32),
            },
        }
    }

    /// Bytes of all weights held (all of them are read for every token).
    pub fn weight_bytes(&self) -> u64 {
        match self {
            Attention::Mha(a) => [&a.q, &a.k, &a.v, &a.o].iter().map(|l| l.weight_bytes()).sum(),
            Attention::Mla(a) => {
                let q = match &a.q {
                    QueryProjection::Plain(l) => l.weight_bytes(),
                    QueryProjection::LowRank { a, b, .. } => a.weight_bytes() + b.weight_bytes(),
                };
                let absorbed =
                    (a.w_uk.elem_count() + a.w_uv_t.elem_count()) as u64 * a.w_uk.dtype().size_in_bytes() as u64;
                q + a.kv_a.weight_bytes() + a.o.weight_bytes() + absorbed
            }
        }
    }

    /// Attention output `[rows, hidden]` for `input`, whose rows are `segments` in order; each
    /// segment's keys/values are appended to its cache.
    pub fn forward(
        &self,
        input: &AttentionInput,
        rope: &RotaryEmbedding,
        segments: &mut [Segment],
    ) -> candle_core::Result<Tensor> {
        let rows: usize = segments.iter().map(|s| s.rows).sum();
        if segments.is_empty() || rows != input.x.dim(0)? {
            candle_core::bail!(
                "attention: {} segment(s) with {rows} rows for {} input rows",
                segments.len(),
                input.x.dim(0)?
            );
        }
        match self {
            Attention::Mha(a) => a.forward(input, rope, segments),
            Attention::Mla(a) => a.forward(input, rope, segments),
        }
    }
}

/// Runs `attend(segment, first_row)` for each segment and concatenates the outputs along `dim`.
fn per_segment(
    segments: &mut [Segment],
    dim: usize,
    mut attend: impl FnMut(&mut Segment, usize) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let mut outs = Vec::with_capacity(segments.len());
    let mut start = 0;
    for segment in segments.iter_mut() {
        outs.push(attend(segment, start)?);
        start += segment.rows;
    }
    Tensor::cat(&outs, dim)
}

/// Softmax of `scores + mask` over the last dimension (in f32, as the reference upcasts).
fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores.clone(),
    };
    candle_nn::ops::softmax_last_dim(&scores)
}

pub struct Mha {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Mha {
    fn load(w: &Weights, p: &str, cfg: &LanguageConfig) -> Result<Self, ModelError> {
        let (d, hd) = (cfg.hidden_size, cfg.mha_head_dim());
        let (h, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        Ok(Mha {
            q: Linear::load(w, &format!("{p}.q_proj"), d, h * hd, bias)?,
            k: Linear::load(w, &format!("{p}.k_proj"), d, kv * hd, bias)?,
            v: Linear::load(w, &format!("{p}.v_proj"), d, kv * hd, bias)?,
            o: Linear::load(w, &format!("{p}.o_proj"), h * hd, d, bias)?,
            heads: h,
            kv_heads: kv,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        input: &AttentionInput,
        rope: &RotaryEmbedding,
        segments: &mut [Segment],
    ) -> candle_core::Result<Tensor> {
        let t = input.x.dim(0)?;
        let (h, kv, hd) = (self.heads, self.kv_heads, self.head_dim);
        // q, k and v in one dispatch, sharing one conversion of x (decoding: 3 small products).
        let x = f32_rows(input.x)?;
        let [q, k, v]: [Vec<f32>; 3] = forward_many(&[&self.q, &self.k, &self.v], &[&x, &x, &x])
            .try_into()
            .expect("three products");
        let device = input.x.device();
        // [t, heads*hd] -> [1, heads, t, hd] for the rotary kernel.
        let heads_first = |y: Tensor, n: usize| y.reshape((t, n, hd))?.transpose(0, 1)?.unsqueeze(0);
        let q = rope.apply(
            &heads_first(Tensor::from_vec(q, (t, h * hd), device)?, h)?,
            input.cos,
            input.sin,
        )?;
        let k = rope.apply(
            &heads_first(Tensor::from_vec(k, (t, kv * hd), device)?, kv)?,
            input.cos,
            input.sin,
        )?;
        let q = q.squeeze(0)?; // [h, t, hd]
        let k = k.squeeze(0)?.transpose(0, 1)?; // [t, kv, hd]
        let v = Tensor::from_vec(v, (t, kv, hd), device)?;
        if segments.iter().all(|s| s.rows == 1) {
            let out = self.attend_batch(&q, &k, &v, segments)?;
            return self.o.forward(&out);
        }
        let out = per_segment(segments, 0, |segment, start| {
            let n = segment.rows;
            let q = q.narrow(1, start, n)?.contiguous()?;
            self.attend(&q, &k.narrow(0, start, n)?, &v.narrow(0, start, n)?, segment)
        })?;
        self.o.forward(&out)
    }

    /// One sequence's `n` rows: `q` `[h, n, hd]`, rotated `k` and `v` `[n, kv, hd]`. Appends k
    /// and v to the segment's cache and returns the attention output `[n, h*hd]` (before `o_proj`).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, segment: &mut Segment) -> candle_core::Result<Tensor> {
        let (h, kv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let t = q.dim(1)?;
        let causal = segment.mask.is_some();
        let LayerCache::Mha { keys, values } = &mut *segment.cache else {
            candle_core::bail!("attention kind and cache kind differ");
        };
        // Cache layout [len, kv_heads, hd]: appending is a contiguous copy. A prompt chunk reads the
        // cache as f32 (what it holds, widened once per chunk and layer), after a shared prefix's
        // positions if there are any (joined into one copy: only a prompt continued after a prefix
        // pays for it).
        let own = (keys.append(k)?.to_f32()?, values.append(v)?.to_f32()?);
        let (k_all, v_all) = if segment.shared.is_empty() {
            own
        } else {
            let (mut ks, mut vs) = (Vec::new(), Vec::new());
            for shared in &segment.shared {
                let LayerCache::Mha { keys, values } = shared.cache else {
                    candle_core::bail!("attention kind and cache kind differ");
                };
                let (Some(k), Some(v)) = (keys.rows(shared.len)?, values.rows(shared.len)?) else {
                    candle_core::bail!("a shared prefix holds fewer than {} positions", shared.len);
                };
                ks.push(k.to_f32()?);
                vs.push(v.to_f32()?);
            }
            ks.push(own.0);
            vs.push(own.1);
            (Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)
        };
        // Several rows: attention over the cache, read in place by the kernels' attention, heads in
        // parallel (the rows of a prompt chunk are causal: the segment's mask is always that one).
        let shape = PrefillShape {
            heads: h,
            kv_heads: kv,
            head_dim: hd,
            queries: t,
            keys: k_all.dim(0)?,
            scale: 1.0 / (hd as f32).sqrt(),
            causal,
        };
        let q = f32_rows(&q.transpose(0, 1)?)?; // [t, h, hd]
        let mut out = vec![0f32; t * h * hd];
        with_f32_slice(&k_all, |keys| {
            with_f32_slice(&v_all, |values| {
                let rows = |data| HeadRows {
                    data,
                    row_stride: kv * hd,
                };
                let queries = HeadRows {
                    data: &q,
                    row_stride: h * hd,
                };
                prefill_attention(queries, rows(keys), rows(values), &shape, &mut out, h * hd)
            })
        })??;
        Tensor::from_vec(out, (t, h * hd), k_all.device())
    }
}

impl Mha {
    /// A decoding batch, one row per sequence: `q` `[h, t, hd]`, rotated `k` and `v` `[t, kv, hd]`.
    /// Appends each row to its sequence's cache, then attends over all the caches in one parallel
    /// dispatch per cache format (`decode_attention_shared`). A prefix that several sequences share
    /// is one piece of that call, read once for all of them. Returns `[t, h*hd]`.
    fn attend_batch(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        segments: &mut [Segment],
    ) -> candle_core::Result<Tensor> {
        let (h, hd, t) = (self.heads, self.head_dim, segments.len());
        // Every sequence's pieces, in position order: its shared prefix's (one piece per distinct
        // prefix of the batch), then its own positions.
        let mut pieces: Vec<CachePiece> = Vec::new();
        // (prefix layer, positions) -> its piece.
        let mut shared_pieces: Vec<((*const LayerCache, usize), usize)> = Vec::new();
        let mut reads: Vec<Vec<usize>> = Vec::with_capacity(t);
        for (i, segment) in segments.iter_mut().enumerate() {
            let mut mine = Vec::new();
            for shared in &segment.shared {
                let id = (shared.cache as *const LayerCache, shared.len);
                let index = match shared_pieces.iter().find(|(known, _)| *known == id) {
                    Some(&(_, index)) => index,
                    None => {
                        let LayerCache::Mha { keys, values } = shared.cache else {
                            candle_core::bail!("attention kind and cache kind differ");
                        };
                        let (Some(keys), Some(values)) = (keys.rows(shared.len)?, values.rows(shared.len)?) else {
                            candle_core::bail!("a shared prefix holds fewer than {} positions", shared.len);
                        };
                        pieces.push(CachePiece { keys, values });
                        shared_pieces.push((id, pieces.len() - 1));
                        pieces.len() - 1
                    }
                };
                mine.push(index);
            }
            let LayerCache::Mha { keys, values } = &mut *segment.cache else {
                candle_core::bail!("attention kind and cache kind differ");
            };
            let keys = keys.append(&k.narrow(0, i, 1)?)?;
            let values = values.append(&v.narrow(0, i, 1)?)?;
            pieces.push(CachePiece { keys, values });
            mine.push(pieces.len() - 1);
            reads.push(mine);
        }
        let queries = f32_rows(&q.transpose(0, 1)?)?; // [t, h, hd]
        let shape = self.decode_shape();
        let (q_width, out_width) = (h * hd, h * hd);
        let mut out = vec![0f32; t * out_width];
        let mut outs: Vec<Option<&mut [f32]>> = out.chunks_exact_mut(out_width).map(Some).collect();
        // Caches made in different formats can share a batch: one call per format.
        for format in CacheFormat::ALL {
            let members: Vec<usize> = (0..t)
                .filter(|&i| pieces[*reads[i].last().expect("own piece")].format() == format)
                .collect();
            if members.is_empty() {
                continue;
            }
            // The pieces these sequences read, renumbered for the call.
            let mut used: Vec<usize> = Vec::new();
            let local: Vec<Vec<usize>> = members
                .iter()
                .map(|&i| {
                    reads[i]
                        .iter()
                        .map(|&p| match used.iter().position(|&u| u == p) {
                            Some(l) => l,
                            None => {
                                used.push(p);
                                used.len() - 1
                            }
                        })
                        .collect()
                })
                .collect();
            let group: Vec<&CachePiece> = used.iter().map(|&p| &pieces[p]).collect();
            if let Some(p) = group.iter().find(|p| p.format() != format) {
                candle_core::bail!("a shared prefix is cached as {} after {format} positions", p.format());
            }
            let mut calls: Vec<DecodeQuery> = members
                .iter()
                .zip(&local)
                .map(|(&i, caches)| DecodeQuery {
                    q: &queries[i * q_width..(i + 1) * q_width],
                    caches,
                    out: outs[i].take().expect("each sequence has one format"),
                })
                .collect();
            run_decode_attention(&group, &mut calls, &shape)?;
        }
        Tensor::from_vec(out, (t, h * hd), q.device())
    }

    /// The shape of this layer's decode attention over its cache.
    fn decode_shape(&self) -> AttentionShape {
        let (h, kv, hd) = (self.heads, self.kv_heads, self.head_dim);
        AttentionShape {
            heads: h,
            kv_heads: kv,
            key_dim: hd,
            value_dim: hd,
            key_stride: kv * hd,
            value_stride: kv * hd,
            scale: 1.0 / (hd as f32).sqrt(),
        }
    }
}

/// Keys and values of consecutive positions of one sequence's (or a shared prefix's) MHA cache.
struct CachePiece {
    keys: HeadRowsView,
    values: HeadRowsView,
}

impl CachePiece {
    fn format(&self) -> CacheFormat {
        match &self.keys {
            HeadRowsView::Float(t) if t.dtype() == DType::F16 => CacheFormat::F16,
            HeadRowsView::Float(_) => CacheFormat::F32,
            HeadRowsView::I8 { .. } => CacheFormat::I8,
        }
    }
}

/// `decode_attention_shared` over `pieces`, which all hold the same format.
fn run_decode_attention(
    pieces: &[&CachePiece],
    queries: &mut [DecodeQuery],
    shape: &AttentionShape,
) -> candle_core::Result<()> {
    let lens = pieces
        .iter()
        .map(|p| p.keys.len())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let floats: Option<Vec<&Tensor>> = pieces
        .iter()
        .flat_map(|p| [&p.keys, &p.values])
        .map(|view| match view {
            HeadRowsView::Float(t) => Some(t),
            HeadRowsView::I8 { .. } => None,
        })
        .collect();
    fn float_rows<'a, T>(slices: &[&'a [T]], lens: &[usize]) -> Vec<CacheRows<'a, T>> {
        slices
            .chunks_exact(2)
            .zip(lens)
            .map(|(kv, &len)| CacheRows {
                keys: kv[0],
                values: kv[1],
                scales: None,
                len,
            })
            .collect()
    }
    match floats {
        Some(tensors) if tensors[0].dtype() == DType::F16 => with_cpu_slices::<half::f16, _>(&tensors, |slices| {
            decode_attention_shared(&float_rows(slices, &lens), queries, shape)
        }),
        Some(tensors) => with_cpu_slices::<f32, _>(&tensors, |slices| {
            decode_attention_shared(&float_rows(slices, &lens), queries, shape)
        }),
        None => {
            let mut bits = Vec::with_capacity(2 * pieces.len());
            let mut scales = Vec::with_capacity(2 * pieces.len());
            for p in pieces {
                let (HeadRowsView::I8 { values: k8, scales: ks }, HeadRowsView::I8 { values: v8, scales: vs }) =
                    (&p.keys, &p.values)
                else {
                    candle_core::bail!("keys and values are cached in different formats");
                };
                bits.extend([k8, v8]);
                scales.extend([ks, vs]);
            }
            with_cpu_slices::<u8, _>(&bits, |bits| {
                with_cpu_slices::<f32, _>(&scales, |scales| {
                    let caches: Vec<CacheRows<i8>> = bits
                        .chunks_exact(2)
                        .zip(scales.chunks_exact(2))
                        .zip(&lens)
                        .map(|((kv, s), &len)| CacheRows {
                            keys: bits_as_i8(kv[0]),
                            values: bits_as_i8(kv[1]),
                            scales: Some(RowScales {
                                keys: s[0],
                                values: s[1],
                            }),
                            len,
                        })
                        .collect();
                    decode_attention_shared(&caches, queries, shape)
                })
            })?
        }
    }
}

/// An i8 cache's u8 bit patterns as the i8 values they are.
fn bits_as_i8(bits: &[u8]) -> &[i8] {
    // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern is valid in both.
    unsafe { std::slice::from_raw_parts(bits.as_ptr() as *const i8, bits.len()) }
}

enum QueryProjection {
    Plain(Linear),
    /// `q_lora_rank` set: down-projection, RMSNorm, up-projection.
    LowRank {
        a: Linear,
        norm: RmsNorm,
        b: Linear,
    },
}

pub struct Mla {
    q: QueryProjection,
    kv_a: Linear,
    kv_a_norm: RmsNorm,
    /// `kv_b_proj` split per head: keys' no-rope part `[heads, nope, rank]`, values `[heads, v, rank]`.
    w_uk: Tensor,
    w_uv_t: Tensor,
    o: Linear,
    heads: usize,
    nope: usize,
    rope_dim: usize,
    v_dim: usize,
    rank: usize,
    softmax_scale: f64,
}

impl Mla {
    fn load(w: &Weights, p: &str, cfg: &LanguageConfig) -> Result<Self, ModelError> {
        let d = cfg.hidden_size;
        let h = cfg.num_attention_heads;
        let (nope, rope_dim, v_dim, rank) = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        );
        let q_dim = h * (nope + rope_dim);
        let bias = cfg.attention_bias;
        let q = match cfg.q_lora_rank {
            None => QueryProjection::Plain(Linear::load(w, &format!("{p}.q_proj"), d, q_dim, false)?),
            Some(r) => QueryProjection::LowRank {
                a: Linear::load(w, &format!("{p}.q_a_proj"), d, r, bias)?,
                norm: RmsNorm::load(w, &format!("{p}.q_a_layernorm"), r, cfg.rms_norm_eps)?,
                b: Linear::load(w, &format!("{p}.q_b_proj"), r, q_dim, false)?,
            },
        };
        let kv_b = w
            .get(&format!("{p}.kv_b_proj.weight"), &[h * (nope + v_dim), rank])?
            .reshape((h, nope + v_dim, rank))?;
        let w_uk = kv_b.narrow(1, 0, nope)?.contiguous()?;
        let w_uv_t = kv_b.narrow(1, nope, v_dim)?.transpose(1, 2)?.contiguous()?;
        let mut softmax_scale = ((nope + rope_dim) as f64).powf(-0.5);
        if let Some(RopeScaling::Yarn {
            factor, mscale_all_dim, ..
        }) = &cfg.rope_scaling
        {
            if *mscale_all_dim != 0.0 {
                let m = yarn_mscale(*factor, *mscale_all_dim);
                softmax_scale *= m * m;
            }
        }
        Ok(Mla {
            q,
            kv_a: Linear::load(w, &format!("{p}.kv_a_proj_with_mqa"), d, rank + rope_dim, bias)?,
            kv_a_norm: RmsNorm::load(w, &format!("{p}.kv_a_layernorm"), rank, cfg.rms_norm_eps)?,
            w_uk,
            w_uv_t,
            o: Linear::load(w, &format!("{p}.o_proj"), h * v_dim, d, bias)?,
            heads: h,
            nope,
            rope_dim,
            v_dim,
            rank,
            softmax_scale,
        })
    }

    /// Attention in the absorbed form (the reference's own): queries are mapped into the latent
    /// space, so keys and values are never expanded per head.
    fn forward(
        &self,
        input: &AttentionInput,
        rope: &RotaryEmbedding,
        segments: &mut [Segment],
    ) -> candle_core::Result<Tensor> {
        let x = input.x;
        let t = x.dim(0)?;
        let (h, nope, rd) = (self.heads, self.nope, self.rope_dim);
        let q = match &self.q {
            QueryProjection::Plain(l) => l.forward(x)?,
            QueryProjection::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
        };
        let q = q.reshape((t, h, nope + rd))?.transpose(0, 1)?; // [h, t, nope+rope]
        let q_nope = q.narrow(D::Minus1, 0, nope)?.contiguous()?;
        let q_rope = rope.apply(&q.narrow(D::Minus1, nope, rd)?.unsqueeze(0)?, input.cos, input.sin)?;
        let q_rope = q_rope.squeeze(0)?; // [h, t, rope]

        let kv = self.kv_a.forward(x)?;
        let c = self.kv_a_norm.forward(&kv.narrow(1, 0, self.rank)?)?;
        let k_rope = rope.apply(
            &kv.narrow(1, self.rank, rd)?.reshape((1, 1, t, rd))?,
            input.cos,
            input.sin,
        )?;
        let k_rope = k_rope.reshape((t, rd))?;
        let q_latent = q_nope.matmul(&self.w_uk)?; // [h, t, rank]

        let out_latent = per_segment(segments, 1, |segment, start| {
            let n = segment.rows;
            self.attend(
                &q_rope.narrow(1, start, n)?,
                &q_latent.narrow(1, start, n)?,
                &c.narrow(0, start, n)?,
                &k_rope.narrow(0, start, n)?,
                segment,
            )
        })?; // [h, t, rank]
        let out = out_latent.matmul(&self.w_uv_t)?; // [h, t, v]
        self.o.forward(&out.transpose(0, 1)?.reshape((t, h * self.v_dim))?)
    }

    /// One sequence's `n` rows: rotated `q_rope` `[h, n, rope]`, `q_latent` `[h, n, rank]`, latent
    /// `c` `[n, rank]` and rotated `k_rope` `[n, rope]`. Appends c and k_rope to the segment's cache
    /// and returns the attention output in latent space `[h, n, rank]`.
    fn attend(
        &self,
        q_rope: &Tensor,
        q_latent: &Tensor,
        c: &Tensor,
        k_rope: &Tensor,
        segment: &mut Segment,
    ) -> candle_core::Result<Tensor> {
        let (h, t) = (self.heads, q_rope.dim(1)?);
        let LayerCache::Mla { latent, rope_key } = &mut *segment.cache else {
            candle_core::bail!("attention kind and cache kind differ");
        };
        // The positions in order: a shared prefix's pieces, then this sequence's own. Scores are
        // computed per piece and joined (small: heads x rows x positions), so a shared prefix is
        // read in place, never copied.
        let mut pieces = Vec::with_capacity(segment.shared.len() + 1);
        for shared in &segment.shared {
            let LayerCache::Mla { latent, rope_key } = shared.cache else {
                candle_core::bail!("attention kind and cache kind differ");
            };
            let (Some(c), Some(k)) = (latent.rows(shared.len)?, rope_key.rows(shared.len)?) else {
                candle_core::bail!("a shared prefix holds fewer than {} positions", shared.len);
            };
            pieces.push((c, k));
        }
        // [s, rank] and [s, rope], f32 (see `Attention::new_cache`).
        pieces.push((latent.append(c)?, rope_key.append(k_rope)?));
        if segment.mask.is_some() {
            return self.attend_prompt(q_rope, q_latent, &pieces);
        }
        let q_rope = q_rope.reshape((h * t, self.rope_dim))?;
        let q_latent = q_latent.reshape((h * t, self.rank))?;
        let scores = pieces
            .iter()
            .map(|(c, k)| q_rope.matmul(&k.t()?)? + q_latent.matmul(&c.t()?)?)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let scores = if scores.len() == 1 {
            scores.into_iter().next().expect("one piece")
        } else {
            Tensor::cat(&scores, 1)?
        };
        let s = scores.dim(1)?;
        let probs = masked_softmax(&(scores * self.softmax_scale)?.reshape((h, t, s))?, segment.mask)?;
        let probs = probs.reshape((h * t, s))?;
        let mut out: Option<Tensor> = None;
        let mut start = 0;
        for (c, _) in &pieces {
            let n = c.dim(0)?;
            let part = probs.narrow(1, start, n)?.matmul(c)?;
            out = Some(match out {
                None => part,
                Some(sum) => (sum + part)?,
            });
            start += n;
        }
        out.expect("at least the own piece").reshape((h, t, self.rank))
    }

    /// A prompt chunk's causal attention (its `t` rows are the last of the pieces' positions) on the
    /// kernels' blocked attention: MLA in latent form is one key/value head shared by all heads, whose
    /// key rows are `[latent | rope key]` and whose values are the latents, i.e. the first `rank`
    /// values of the same rows. So the rows serve as both, and each head's output keeps its first
    /// `rank` columns (the other `rope` are the softmax applied to the rope keys, dropped). Scores
    /// live one block of queries at a time: the whole `[h·t, s]` score matrix and its softmax
    /// temporaries (~70 MB each for small's 16 heads at 1039 positions) are never formed. Returns
    /// `[h, t, rank]`.
    fn attend_prompt(
        &self,
        q_rope: &Tensor,
        q_latent: &Tensor,
        pieces: &[(Tensor, Tensor)],
    ) -> candle_core::Result<Tensor> {
        let (h, t, rank) = (self.heads, q_rope.dim(1)?, self.rank);
        let width = rank + self.rope_dim;
        let (latents, rope_keys): (Vec<&Tensor>, Vec<&Tensor>) = pieces.iter().map(|(c, k)| (c, k)).unzip();
        let keys = Tensor::cat(&[Tensor::cat(&latents, 0)?, Tensor::cat(&rope_keys, 0)?], 1)?; // [s, width]
        let queries = f32_rows(&Tensor::cat(&[q_latent, q_rope], 2)?.transpose(0, 1)?)?; // [t, h, width]
        let shape = PrefillShape {
            heads: h,
            kv_heads: 1,
            head_dim: width,
            queries: t,
            keys: keys.dim(0)?,
            scale: self.softmax_scale as f32,
            causal: true,
        };
        let mut out = vec![0f32; t * h * width];
        with_f32_slice(&keys, |keys| {
            let rows = HeadRows {
                data: keys,
                row_stride: width,
            };
            let queries = HeadRows {
                data: &queries,
                row_stride: h * width,
            };
            prefill_attention(queries, rows, rows, &shape, &mut out, h * width)
        })?;
        Tensor::from_vec(out, (t, h, width), q_rope.device())?
            .narrow(2, 0, rank)?
            .transpose(0, 1)?
            .contiguous()
    }
}
