//! Attention kernels: [`decode_attention`] (one query row per head over a sequence's cache, split
//! over positions) and [`prefill_attention`] (many query rows, e.g. the vision tower or a prompt).
//!
//! Decoding:
//! Decoding reads the whole cache once per layer and token: at a 1000-token context, tiny's f32 keys
//! and values are 10 MB per layer. Splitting the work by head (one pass per head over every position)
//! read each position's row in 512-byte pieces 10 times over, and ran at a quarter of the memory
//! bandwidth. Here each task takes a range of positions and goes through them once, row by row,
//! for all heads; it keeps a running softmax per head (maximum, sum of exponentials, weighted sum of
//! values), and the tasks' partial results are merged at the end (as in flash-decoding).
//!
//! The cache layout is general enough for both attention kinds: per position, `kv_heads` keys of
//! `key_dim` values at `key_stride`, and `kv_heads` values of `value_dim` at `value_stride` (MHA:
//! separate key and value tensors; MLA: one row `[latent | rope key]` read as a single shared head,
//! whose first `rank` values are also the values).

use rayon::prelude::*;

use crate::gemm::{gemm_strided, Strided};
use crate::isa::Isa;
use crate::OutPtr;

/// Shape of a [`decode_attention`] call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Query heads; head `h` reads key/value head `h / (heads / kv_heads)`.
    pub heads: usize,
    pub kv_heads: usize,
    /// Values per query and key head.
    pub key_dim: usize,
    /// Values per value head (the output has `heads · value_dim` values).
    pub value_dim: usize,
    /// Floats from one position's keys to the next position's (at least `kv_heads · key_dim`).
    pub key_stride: usize,
    /// Floats from one position's values to the next position's (at least `kv_heads · value_dim`).
    pub value_stride: usize,
    /// Scores are `(q · k) · scale` before the softmax.
    pub scale: f32,
}

/// Softmax state of one task (a range of positions), per head.
pub(crate) struct Partial {
    pub(crate) max: Vec<f32>,
    pub(crate) sum: Vec<f32>,
    /// `[heads, value_dim]`: `Σ_j exp(score_j - max) · v_j`.
    pub(crate) acc: Vec<f32>,
}

/// `out[h] = Σ_j softmax_j((q_h · k_j) · scale) · v_j` over the `len` cached positions, for every query
/// head `h`: `q` is `[heads, key_dim]`, `out` `[heads, value_dim]`. Positions are split across the
/// rayon pool.
///
/// # Panics
/// If a slice is shorter than `shape` and `len` require, or `heads` is not a multiple of `kv_heads`.
pub fn decode_attention<T: CacheValue>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    len: usize,
    shape: &AttentionShape,
    out: &mut [f32],
) {
    decode_attention_isa(Isa::detect(), q, keys, values, None, len, shape, out)
}

/// [`decode_attention`] over an 8-bit cache (half the bytes of f16 to stream per decoded token):
/// each position's row of one key head is stored as `key_dim` i8 values and one f32 scale, so key
/// value `d` of head `g` at position `j` is `keys[j * key_stride + g * key_dim + d] as f32 ·
/// key_scales[j * kv_heads + g]`; values likewise.
///
/// # Panics
/// As [`decode_attention`], and if a scale slice holds fewer than `len · kv_heads` values.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_i8(
    q: &[f32],
    keys: &[i8],
    key_scales: &[f32],
    values: &[i8],
    value_scales: &[f32],
    len: usize,
    shape: &AttentionShape,
    out: &mut [f32],
) {
    let scales = RowScales {
        keys: key_scales,
        values: value_scales,
    };
    decode_attention_isa(Isa::detect(), q, keys, values, Some(scales), len, shape, out)
}

/// Rounds `x`'s rows of `row_len` values to i8 with one f32 scale per row (the row's largest
/// magnitude maps to 127): `x[r * row_len + d] ≈ out[r * row_len + d] as f32 · scales[r]`, off by at
/// most half a scale. Rows of an 8-bit cache are one position's values of one head
/// (see [`decode_attention_i8`]).
///
/// # Panics
/// If `row_len` is zero or the lengths disagree.
pub fn quantize_i8_rows(x: &[f32], row_len: usize, out: &mut [i8], scales: &mut [f32]) {
    assert!(
        row_len > 0 && x.len().is_multiple_of(row_len),
        "rows of {row_len} values"
    );
    assert_eq!(out.len(), x.len(), "one i8 per value");
    assert_eq!(scales.len(), x.len() / row_len, "one scale per row");
    for ((row, q), scale) in x.chunks_exact(row_len).zip(out.chunks_exact_mut(row_len)).zip(scales) {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        *scale = max / 127.0;
        let inverse = if max > 0.0 { 127.0 / max } else { 0.0 };
        q.iter_mut()
            .zip(row)
            .for_each(|(q, v)| *q = round_small(v * inverse) as i8);
    }
}

/// `x` rounded to the nearest integer (ties to even), for `|x| < 2^22`: adding and taking away
/// `1.5 · 2^23` leaves only the integer part, rounded by the default rounding mode. Plain adds that
/// vectorise; `f32::round` is a call to libm's `roundf` per value on baseline x86-64.
#[inline(always)]
fn round_small(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (x + SHIFT) - SHIFT
}

/// The per-position, per-head scales of an 8-bit cache (see [`decode_attention_i8`]).
#[derive(Debug, Clone, Copy)]
pub struct RowScales<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_attention_isa<T: CacheValue>(
    isa: Isa,
    q: &[f32],
    keys: &[T],
    values: &[T],
    scales: Option<RowScales>,
    len: usize,
    s: &AttentionShape,
    out: &mut [f32],
) {
    let mut one = [DecodeAttention {
        q,
        keys,
        values,
        scales,
        len,
        out,
    }];
    decode_attention_batch_isa(isa, &mut one, s)
}

/// One sequence of a [`decode_attention_batch`]: its query row per head, its cache and its output
/// (as the arguments of [`decode_attention`], or of [`decode_attention_i8`] with `scales`).
pub struct DecodeAttention<'a, T> {
    pub q: &'a [f32],
    pub keys: &'a [T],
    pub values: &'a [T],
    /// An i8 cache's key and value scales, one per position and key/value head.
    pub scales: Option<RowScales<'a>>,
    pub len: usize,
    pub out: &'a mut [f32],
}

/// [`decode_attention`] for several sequences of the same shape (a decoding batch) in one parallel
/// dispatch: the tasks are (sequence, range of positions) pairs, so the caches stream back to back
/// without a fork/join per sequence. Each output is bit for bit what [`decode_attention`] (or
/// [`decode_attention_i8`]) gives for that sequence alone: the same tasks, merged in the same order.
///
/// # Panics
/// As [`decode_attention`] and [`decode_attention_i8`], for any sequence.
pub fn decode_attention_batch<T: CacheValue>(calls: &mut [DecodeAttention<T>], shape: &AttentionShape) {
    decode_attention_batch_isa(Isa::detect(), calls, shape)
}

pub(crate) fn decode_attention_batch_isa<T: CacheValue>(
    isa: Isa,
    calls: &mut [DecodeAttention<T>],
    s: &AttentionShape,
) {
    let caches: Vec<CacheRows<T>> = calls
        .iter()
        .map(|c| CacheRows {
            keys: c.keys,
            values: c.values,
            scales: c.scales,
            len: c.len,
        })
        .collect();
    let pieces: Vec<[usize; 1]> = (0..calls.len()).map(|i| [i]).collect();
    let mut queries: Vec<DecodeQuery> = calls
        .iter_mut()
        .zip(&pieces)
        .map(|(c, pieces)| DecodeQuery {
            q: c.q,
            caches: pieces,
            out: &mut *c.out,
        })
        .collect();
    decode_attention_shared_isa(isa, &caches, &mut queries, s)
}

/// Cached positions that one or more queries of a [`decode_attention_shared`] call read: keys,
/// values and (i8 caches) scales laid out as [`decode_attention`]'s and [`decode_attention_i8`]'s.
#[derive(Clone, Copy)]
pub struct CacheRows<'a, T> {
    pub keys: &'a [T],
    pub values: &'a [T],
    pub scales: Option<RowScales<'a>>,
    pub len: usize,
}

/// One query row per head of a [`decode_attention_shared`] call, the caches it attends over (indexes
/// into the call's caches, in position order: e.g. a prefix shared with other sequences, then the
/// sequence's own positions) and its output.
pub struct DecodeQuery<'a> {
    pub q: &'a [f32],
    pub caches: &'a [usize],
    pub out: &'a mut [f32],
}

/// Decode attention for sequences whose caches may share pieces (several answers to one prompt
/// share that prompt's positions): each query attends over the concatenation of its caches. A
/// piece that several queries read streams from memory once per call: its tasks (ranges of
/// positions) run every reader's query over the range while the range is in the core's L2.
///
/// Each output is bit for bit what the same query gives in a call of its own (a cache's ranges
/// depend on its length only, and the partial results merge in the query's order of caches), with
/// one exception: on AMX-INT8, a range of an i8 cache of 128-value heads that two or more queries
/// read goes through the tile kernel (`simd::amx_attention`), whose 16-bit rounding of queries and
/// weights differs from the one-query kernel's (by at most ~1e-3 of the largest output, tested).
///
/// # Panics
/// As [`decode_attention`] and [`decode_attention_i8`], for any cache or query, and if a query
/// names a cache that does not exist.
pub fn decode_attention_shared<T: CacheValue>(
    caches: &[CacheRows<T>],
    queries: &mut [DecodeQuery],
    shape: &AttentionShape,
) {
    decode_attention_shared_isa(Isa::detect(), caches, queries, shape)
}

pub(crate) fn decode_attention_shared_isa<T: CacheValue>(
    isa: Isa,
    caches: &[CacheRows<T>],
    queries: &mut [DecodeQuery],
    s: &AttentionShape,
) {
    assert!(
        s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads),
        "{} query heads cannot share {} key/value heads",
        s.heads,
        s.kv_heads
    );
    assert!(s.key_stride >= s.kv_heads * s.key_dim && s.value_stride >= s.kv_heads * s.value_dim);
    caches.iter().for_each(|c| check_cache(c, s));
    // readers[c]: the queries that attend over cache c, in query order.
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); caches.len()];
    for (i, query) in queries.iter().enumerate() {
        assert_eq!(query.q.len(), s.heads * s.key_dim, "one query row per head");
        assert_eq!(query.out.len(), s.heads * s.value_dim, "one output row per head");
        for &c in query.caches {
            assert!(c < caches.len(), "query {i} reads cache {c} of {}", caches.len());
            readers[c].push(i);
        }
    }
    // Enough tasks per cache to balance the threads, each reading at least ~64 KiB of cache, in
    // whole blocks of 64 positions (the AMX kernel's, whose last block is otherwise mostly padding).
    let row_bytes = std::mem::size_of::<T>() * (s.kv_heads * (s.key_dim + s.value_dim));
    let min_rows = (64 * 1024 / row_bytes.max(1)).max(1);
    let threads = rayon::current_num_threads().max(1);
    // (cache, positions); first_task[c]: where cache c's tasks start.
    let mut tasks = Vec::new();
    let mut first_task = Vec::with_capacity(caches.len() + 1);
    for (c, cache) in caches.iter().enumerate() {
        first_task.push(tasks.len());
        if readers[c].is_empty() {
            continue;
        }
        let chunk = cache.len.div_ceil(4 * threads).max(min_rows).next_multiple_of(64);
        tasks.extend((0..cache.len.div_ceil(chunk)).map(|k| (c, k * chunk..((k + 1) * chunk).min(cache.len))));
    }
    first_task.push(tasks.len());
    // One partial result per reader of the task's cache, in `readers` order.
    let partials: Vec<std::sync::OnceLock<Vec<Partial>>> = tasks.iter().map(|_| std::sync::OnceLock::new()).collect();
    crate::for_each_task(tasks.len(), |t| {
        let (c, positions) = &tasks[t];
        let cache = &caches[*c];
        let readers = &readers[*c];
        let qs: Vec<&[f32]> = readers.iter().map(|&i| queries[i].q).collect();
        let results = match isa.attend_positions_many(&qs, cache, positions.clone(), s) {
            Some(partials) => partials,
            None => readers
                .iter()
                .map(|&i| {
                    let q = queries[i].q;
                    isa.attend_positions(q, cache.keys, cache.values, cache.scales, positions.clone(), s)
                })
                .collect(),
        };
        let _ = partials[t].set(results);
    });
    let partials: Vec<Vec<Partial>> = partials
        .into_iter()
        .map(|p| p.into_inner().expect("every task ran"))
        .collect();
    for (i, query) in queries.iter_mut().enumerate() {
        let mine: Vec<&Partial> = query
            .caches
            .iter()
            .flat_map(|&c| {
                let reader = readers[c].iter().position(|&r| r == i).expect("a reader of its caches");
                partials[first_task[c]..first_task[c + 1]]
                    .iter()
                    .map(move |p| &p[reader])
            })
            .collect();
        if mine.is_empty() {
            query.out.fill(0.0);
        } else {
            merge(&mine, s, query.out);
        }
    }
}

/// The checks of one [`CacheRows`] against `s`.
fn check_cache<T>(c: &CacheRows<T>, s: &AttentionShape) {
    let len = c.len;
    if len == 0 {
        return;
    }
    assert!(
        c.keys.len() >= (len - 1) * s.key_stride + s.kv_heads * s.key_dim,
        "keys shorter than {len} positions"
    );
    assert!(
        c.values.len() >= (len - 1) * s.value_stride + s.kv_heads * s.value_dim,
        "values shorter than {len} positions"
    );
    if let Some(scales) = c.scales {
        assert!(
            scales.keys.len() >= len * s.kv_heads && scales.values.len() >= len * s.kv_heads,
            "fewer than {len} positions of scales"
        );
    }
}

/// The exact softmax over all positions from the tasks' partial ones.
fn merge(partials: &[&Partial], s: &AttentionShape, out: &mut [f32]) {
    for h in 0..s.heads {
        let max = partials.iter().map(|p| p.max[h]).fold(f32::NEG_INFINITY, f32::max);
        let out = &mut out[h * s.value_dim..(h + 1) * s.value_dim];
        out.fill(0.0);
        let mut sum = 0f32;
        for p in partials {
            let w = (p.max[h] - max).exp();
            sum += w * p.sum[h];
            let acc = &p.acc[h * s.value_dim..(h + 1) * s.value_dim];
            out.iter_mut().zip(acc).for_each(|(o, a)| *o += w * a);
        }
        out.iter_mut().for_each(|o| *o /= sum);
    }
}

/// A value type a cache can hold: f32, f16 (half the bytes to stream per decoded token), or i8
/// (with a scale per position and head, see [`decode_attention_i8`]).
pub trait CacheValue: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;

    /// The values as i8, when that is what they are (the kernels for 8-bit caches).
    fn as_i8(values: &[Self]) -> Option<&[i8]> {
        let _ = values;
        None
    }

    /// `src` as f32: borrowed when it already is, otherwise converted into `buf[..src.len()]`.
    ///
    /// # Safety
    /// With `f16c`, the CPU must have the F16C conversion instructions (and AVX2).
    #[doc(hidden)]
    unsafe fn widen<'a>(src: &'a [Self], buf: &'a mut [f32], f16c: bool) -> &'a [f32];

    /// `dst[i] = src[i]` as f32 with the explicit AVX2 (`L` = 8) or AVX-512 (`L` = 16) kernel.
    ///
    /// # Safety
    /// The instruction set of `L` must be available (AVX2, FMA and F16C; AVX-512 F for 16).
    #[doc(hidden)]
    #[cfg(target_arch = "x86_64")]
    unsafe fn simd_widen<const L: usize>(src: &[Self], dst: &mut [f32]);

    /// The scores of one query against a block of `L` rows at `stride` (`simd::attention_kernels!`'s
    /// `dot_block_*`), into `out[..L]`.
    ///
    /// # Safety
    /// As [`Self::simd_widen`].
    #[doc(hidden)]
    #[cfg(target_arch = "x86_64")]
    unsafe fn simd_dot_block<const L: usize>(q: &[f32], rows: &[Self], stride: usize, out: &mut [f32]);

    /// `acc += Σ_p w[p]·rows[p]` over `w.len()` rows at `stride` (`simd::attention_kernels!`'s
    /// `axpy_block_*`).
    ///
    /// # Safety
    /// As [`Self::simd_widen`].
    #[doc(hidden)]
    #[cfg(target_arch = "x86_64")]
    unsafe fn simd_axpy_block<const L: usize>(acc: &mut [f32], w: &[f32], rows: &[Self], stride: usize);
}

/// A [`CacheValue`]'s explicit kernels (`attention_kernels!` in `simd/mod.rs`): AVX-512 for 16
/// lanes, AVX2 for 8.
macro_rules! simd_kernels {
    ($t:ty, $widen:ident, $dot:ident, $axpy:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn simd_widen<const L: usize>(src: &[$t], dst: &mut [f32]) {
            if L == 16 {
                crate::simd::avx512::$widen(src, dst)
            } else {
                crate::simd::x86::$widen(src, dst)
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn simd_dot_block<const L: usize>(q: &[f32], rows: &[$t], stride: usize, out: &mut [f32]) {
            if L == 16 {
                crate::simd::avx512::$dot(q, rows, stride, out)
            } else {
                crate::simd::x86::$dot(q, rows, stride, out)
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn simd_axpy_block<const L: usize>(acc: &mut [f32], w: &[f32], rows: &[$t], stride: usize) {
            if L == 16 {
                crate::simd::avx512::$axpy(acc, w, rows, stride)
            } else {
                crate::simd::x86::$axpy(acc, w, rows, stride)
            }
        }
    };
}

impl CacheValue for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    unsafe fn widen<'a>(src: &'a [f32], _: &'a mut [f32], _: bool) -> &'a [f32] {
        src
    }

    simd_kernels!(f32, widen_f32, dot_block_f32, axpy_block_f32);
}

impl CacheValue for half::f16 {
    /// Exact, with integer and float operations only, so that loops over it vectorise (the `half`
    /// crate's conversion is a call per value unless F16C is enabled for the whole build).
    #[inline(always)]
    fn to_f32(self) -> f32 {
        let bits = self.to_bits() as u32;
        let magnitude = bits & 0x7FFF;
        // Exponent and mantissa moved into place, then rescaled by 2^112: exact for normal and
        // subnormal values alike.
        let finite = f32::from_bits(magnitude << 13) * f32::from_bits(0x7780_0000);
        let value = if magnitude >= 0x7C00 {
            f32::from_bits(0x7F80_0000 | (magnitude & 0x3FF) << 13) // infinity or NaN
        } else {
            finite
        };
        f32::from_bits(value.to_bits() | (bits & 0x8000) << 16)
    }

    /// With F16C, one `vcvtph2ps` per 8 values: the integer route above costs about ten
    /// instructions per 8, and made the attention over an f16 cache compute-bound on AVX2 CPUs
    /// (15-18% of decode time at a 1040-token context on a Zen 3).
    #[inline(always)]
    unsafe fn widen<'a>(src: &'a [half::f16], buf: &'a mut [f32], f16c: bool) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        #[cfg(target_arch = "x86_64")]
        if f16c {
            let bytes = std::slice::from_raw_parts(src.as_ptr() as *const u8, 2 * src.len());
            crate::simd::x86::decode(crate::Format::F16, bytes, buf);
            return buf;
        }
        let _ = f16c;
        buf.iter_mut().zip(src).for_each(|(d, v)| *d = v.to_f32());
        buf
    }

    simd_kernels!(half::f16, widen_f16, dot_block_f16, axpy_block_f16);
}

impl CacheValue for i8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }

    fn as_i8(values: &[i8]) -> Option<&[i8]> {
        Some(values)
    }

    #[inline(always)]
    unsafe fn widen<'a>(src: &'a [i8], buf: &'a mut [f32], _: bool) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        buf.iter_mut().zip(src).for_each(|(d, &v)| *d = v as f32);
        buf
    }

    simd_kernels!(i8, widen_i8, dot_block_i8, axpy_block_i8);
}

/// Dot product with four vectors of `L` partial sums: one vector's chain of dependent adds (about
/// 3 cycles each) made a 128-wide dot latency-bound. The four accumulators are separate arrays
/// updated by plain lane loops: as one `[[f32; L]; 4]` indexed in nested loops, LLVM kept them on the
/// stack and compiled the updates to scalar adds (perf), which made decode attention compute-bound.
#[inline(always)]
fn dot<const L: usize>(a: &[f32], b: &[f32]) -> f32 {
    let (mut acc0, mut acc1, mut acc2, mut acc3) = ([0f32; L], [0f32; L], [0f32; L], [0f32; L]);
    let (ac, at) = a.as_chunks::<L>();
    let (bc, bt) = b.as_chunks::<L>();
    let n = ac.len().min(bc.len());
    let (ac, bc) = (&ac[..n], &bc[..n]);
    let quads = n / 4;
    for q in 0..quads {
        let (x, y) = (&ac[4 * q..4 * q + 4], &bc[4 * q..4 * q + 4]);
        for l in 0..L {
            acc0[l] += x[0][l] * y[0][l];
            acc1[l] += x[1][l] * y[1][l];
            acc2[l] += x[2][l] * y[2][l];
            acc3[l] += x[3][l] * y[3][l];
        }
    }
    for (x, y) in ac[4 * quads..].iter().zip(&bc[4 * quads..]) {
        for l in 0..L {
            acc0[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in at.iter().zip(bt) {
        tail += x * y;
    }
    for l in 0..L {
        acc0[l] = (acc0[l] + acc1[l]) + (acc2[l] + acc3[l]);
    }
    sum_lanes::<L>(acc0) + tail
}

/// The sum of `L` (a power of two) lanes as a tree, halves added pairwise: that compiles to a few
/// vector shuffles and adds. Summed left to right, it was a chain of `L` dependent scalar adds on
/// values spilled to the stack, and the largest cost of decode attention (perf).
#[inline(always)]
fn sum_lanes<const L: usize>(mut v: [f32; L]) -> f32 {
    let mut width = L;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            v[l] += v[l + width];
        }
    }
    v[0]
}

/// One task's positions, every head. Generic over the vector width `L` so that the same code is
/// compiled for each instruction set (see [`Isa::attend_positions`]). With `f16c` (the AVX2 and
/// AVX-512 sets), explicit kernels read the rows in place: [`attend_positions_shared`] for this one
/// query; otherwise each f16 or i8 row is widened once into a buffer for all heads.
///
/// # Safety
/// With `f16c`, the instruction set of `L` must be available (see [`CacheValue::simd_widen`]).
#[inline(always)]
pub(crate) unsafe fn attend_positions<const L: usize, T: CacheValue, const FMA: bool>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    scales: Option<RowScales>,
    positions: std::ops::Range<usize>,
    s: &AttentionShape,
    f16c: bool,
) -> Partial {
    #[cfg(target_arch = "x86_64")]
    if f16c {
        let mut one = attend_positions_shared::<L, T>(&[q], keys, values, scales, positions, s);
        return one.pop().expect("one partial per query");
    }
    let (n, group) = (positions.len(), s.heads / s.kv_heads);
    let (key_width, value_width) = (s.kv_heads * s.key_dim, s.kv_heads * s.value_dim);
    let mut buf = vec![0f32; key_width.max(value_width)];
    // An 8-bit cache's scales (of key/value head `h / group` at position `j`) are applied to the
    // scores rather than in the row kernels: the keys' to the dot products, the values' to the rows'
    // weights (after the softmax's sums). Without scales, 1.0 (exact).
    let (key_scales, value_scales) = (scales.map(|sc| sc.keys), scales.map(|sc| sc.values));
    // scores[h * n + i]: head h, position positions.start + i.
    let mut scores = vec![0f32; s.heads * n];
    let keys_ahead = rows_ahead::<T>(key_width);
    for (i, j) in positions.clone().enumerate() {
        prefetch_row(keys, (j + keys_ahead) * s.key_stride, key_width);
        let row = T::widen(&keys[j * s.key_stride..][..key_width], &mut buf, f16c);
        for h in 0..s.heads {
            let k = &row[(h / group) * s.key_dim..(h / group + 1) * s.key_dim];
            let dot = dot::<L>(&q[h * s.key_dim..(h + 1) * s.key_dim], k);
            scores[h * n + i] = dot * s.scale * row_scale(key_scales, j, h / group, s.kv_heads);
        }
    }
    let mut max = vec![f32::NEG_INFINITY; s.heads];
    let mut sum = vec![0f32; s.heads];
    for h in 0..s.heads {
        (max[h], sum[h]) = crate::math::exp_shifted_in_place::<FMA>(&mut scores[h * n..(h + 1) * n]);
    }
    // Values four positions at a time: each head's accumulator row is loaded and stored once per
    // four rows instead of once per row (that traffic was most of this loop's work).
    let mut acc = vec![0f32; s.heads * s.value_dim];
    // Widening buffers for four rows.
    let mut bufs = [
        buf,
        vec![0f32; value_width],
        vec![0f32; value_width],
        vec![0f32; value_width],
    ];
    let start = positions.start;
    let mut i = 0;
    while i + 4 <= n {
        let j = start + i;
        let [b0, b1, b2, b3] = &mut bufs;
        let rows = [
            value_row(values, j, s, b0, f16c),
            value_row(values, j + 1, s, b1, f16c),
            value_row(values, j + 2, s, b2, f16c),
            value_row(values, j + 3, s, b3, f16c),
        ];
        for h in 0..s.heads {
            let offset = (h / group) * s.value_dim;
            // Plain indexing, no closures: in an earlier AVX-512 build of this loop, `array::map`
            // and `from_fn` closures here were left as calls (perf).
            let (v0, v1) = (&rows[0][offset..][..s.value_dim], &rows[1][offset..][..s.value_dim]);
            let (v2, v3) = (&rows[2][offset..][..s.value_dim], &rows[3][offset..][..s.value_dim]);
            let [p0, p1, p2, p3] = row_weights(
                &scores[h * n + i..h * n + i + 4],
                value_scales,
                j,
                h / group,
                s.kv_heads,
            );
            let acc = &mut acc[h * s.value_dim..(h + 1) * s.value_dim];
            for d in 0..s.value_dim {
                acc[d] += (p0 * v0[d] + p1 * v1[d]) + (p2 * v2[d] + p3 * v3[d]);
            }
        }
        i += 4;
    }
    for i in i..n {
        let row = value_row(values, start + i, s, &mut bufs[0], f16c);
        for h in 0..s.heads {
            let v = &row[(h / group) * s.value_dim..(h / group + 1) * s.value_dim];
            let p = scores[h * n + i] * row_scale(value_scales, start + i, h / group, s.kv_heads);
            let acc = &mut acc[h * s.value_dim..(h + 1) * s.value_dim];
            acc.iter_mut().zip(v).for_each(|(a, v)| *a += p * v);
        }
    }
    Partial { max, sum, acc }
}

/// Readers of a block of f16 or i8 rows from which [`attend_positions_shared`] widens it once into
/// an f32 copy for all of them, rather than each reading it in place. Widening is most of the work
/// for one reader (it alone bounds an f16 block on Zen 4, one `vcvtph2ps` per two cycles), and
/// reading the copy costs about as much as widening in registers again, so it pays from about 3
/// readers on (per-position cycles at tiny's shape, Zen 4: in place 17.5 scores, 17.6 values;
/// widening 17.9 per row, then 10.5 scores, 12.2 values per reader).
const WIDEN_FOR_READERS: usize = 4;

/// How many blocks ahead of its reads [`attend_positions_shared`] prefetches, each head's rows as it
/// starts on that head. Issued a whole block of rows at once (640 lines of an f16 block at tiny's
/// shape), the prefetches stalled the core on its full miss queue: half the kernel's time.
const BLOCKS_AHEAD: usize = 2;

/// [`attend_positions`] with the explicit kernels (`f16c`), for one query or several over the same
/// positions (the readers of a cache piece they share, see [`decode_attention_shared`]). The
/// positions go in blocks of `L`, one key or value head at a time, through kernels that keep a
/// block's `L` scores or a head's output in registers (`simd::attention_kernels!`); with
/// [`WIDEN_FOR_READERS`] or more queries, each block is widened to f32 once for all of them. Each
/// query's result is bit for bit what it gets alone: its arithmetic does not depend on the others.
///
/// Against the kernels this replaced (one position at a time, a horizontal sum per score, readers
/// in pairs), `kernel_bench -- quick attention` at tiny's shape (10 heads x 128, 1039 positions,
/// 2-vCPU Zen 4, one run each): f16 cache hot 105 -> 89 µs, cold 200 -> 203-213 µs; one call of 8
/// readers of a shared f16 cache 557 -> 470 µs, i8 530 -> 478 µs. In `dsvl2 bench` (tiny q8_0,
/// 1039-token prompt, three interleaved rounds, bandwidth probes ~36 GB/s): batch 8 237-248 ->
/// 258-259 tokens/s, batch 1 unchanged (46.7-47.5 vs 45.9-47.7).
///
/// # Safety
/// The instruction set of `L` must be available, with F16C (see [`CacheValue::simd_widen`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn attend_positions_shared<const L: usize, T: CacheValue>(
    queries: &[&[f32]],
    keys: &[T],
    values: &[T],
    scales: Option<RowScales>,
    positions: std::ops::Range<usize>,
    s: &AttentionShape,
) -> Vec<Partial> {
    let (n, group) = (positions.len(), s.heads / s.kv_heads);
    let (key_scales, value_scales) = (scales.map(|sc| sc.keys), scales.map(|sc| sc.values));
    let widen = queries.len() >= WIDEN_FOR_READERS && std::mem::size_of::<T>() < 4;
    // A block of one head's rows widened to f32 (and the last block of keys when it is short of L
    // rows, whose missing rows keep what they held: their scores are dropped). Cache-line aligned.
    let mut block = vec![0f32; L * s.key_dim.max(s.value_dim) + 16];
    let aligned = block.as_ptr().align_offset(64).min(16);
    let block = &mut block[aligned..];
    // scores[r][h * n + i]: query r, head h, position positions.start + i.
    let mut scores = vec![vec![0f32; s.heads * n]; queries.len()];
    let mut dots = [0f32; L];
    for i0 in (0..n).step_by(L) {
        let (j0, rows) = (positions.start + i0, L.min(n - i0));
        for g in 0..s.kv_heads {
            let widened = widen || rows < L;
            let in_place = head_block::<L, T>(
                keys,
                j0..j0 + rows,
                s.key_stride,
                g,
                s.key_dim,
                widened.then_some(&mut *block),
            );
            for h in g * group..(g + 1) * group {
                for (q, scores) in queries.iter().zip(&mut scores) {
                    let q = &q[h * s.key_dim..][..s.key_dim];
                    if widened {
                        f32::simd_dot_block::<L>(q, block, s.key_dim, &mut dots);
                    } else {
                        T::simd_dot_block::<L>(q, in_place, s.key_stride, &mut dots);
                    }
                    for (p, &dot) in dots[..rows].iter().enumerate() {
                        // As `attend_positions` rounds it: (dot · scale) · the row's scale.
                        let row_scale = row_scale(key_scales, j0 + p, g, s.kv_heads);
                        scores[h * n + i0 + p] = dot * s.scale * row_scale;
                    }
                }
            }
        }
    }
    // A plain loop: a closure would not inherit the caller's target features (`exp`'s fused
    // multiply-adds would become libm calls).
    let mut partials = Vec::with_capacity(queries.len());
    for scores in &mut scores {
        let (mut max, mut sum) = (vec![f32::NEG_INFINITY; s.heads], vec![0f32; s.heads]);
        for h in 0..s.heads {
            (max[h], sum[h]) = crate::math::exp_shifted_in_place::<true>(&mut scores[h * n..(h + 1) * n]);
        }
        let acc = vec![0f32; s.heads * s.value_dim];
        partials.push(Partial { max, sum, acc });
    }
    let mut weights = [0f32; L];
    for i0 in (0..n).step_by(L) {
        let (j0, rows) = (positions.start + i0, L.min(n - i0));
        for g in 0..s.kv_heads {
            let in_place = head_block::<L, T>(
                values,
                j0..j0 + rows,
                s.value_stride,
                g,
                s.value_dim,
                widen.then_some(&mut *block),
            );
            for h in g * group..(g + 1) * group {
                for (scores, partial) in scores.iter().zip(&mut partials) {
                    // The softmax's weights times the rows' scales (8-bit caches).
                    for (p, w) in weights[..rows].iter_mut().enumerate() {
                        *w = scores[h * n + i0 + p] * row_scale(value_scales, j0 + p, g, s.kv_heads);
                    }
                    let acc = &mut partial.acc[h * s.value_dim..][..s.value_dim];
                    if widen {
                        f32::simd_axpy_block::<L>(acc, &weights[..rows], block, s.value_dim);
                    } else {
                        T::simd_axpy_block::<L>(acc, &weights[..rows], in_place, s.value_stride);
                    }
                }
            }
        }
    }
    partials
}

/// Head `g`'s rows (`dim` values each, `stride` apart) of a block of [`attend_positions_shared`]:
/// prefetches the rows [`BLOCKS_AHEAD`] blocks on, widens the block's rows into `widened` (`dim`
/// apart) when given, and returns the cache from the block's first row of that head on.
///
/// # Safety
/// As [`CacheValue::simd_widen`] for `L`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn head_block<'a, const L: usize, T: CacheValue>(
    cache: &'a [T],
    block: std::ops::Range<usize>,
    stride: usize,
    g: usize,
    dim: usize,
    widened: Option<&mut [f32]>,
) -> &'a [T] {
    for j in block.clone() {
        prefetch_row(cache, (j + BLOCKS_AHEAD * L) * stride + g * dim, dim);
    }
    let in_place = &cache[block.start * stride + g * dim..];
    if let Some(widened) = widened {
        for p in 0..block.len() {
            T::simd_widen::<L>(&in_place[p * stride..][..dim], &mut widened[p * dim..][..dim]);
        }
    }
    in_place
}

/// The scale of key/value head `g` at position `j` in an 8-bit cache's `scales`; 1.0 (exact) without.
#[inline(always)]
fn row_scale(scales: Option<&[f32]>, j: usize, g: usize, kv_heads: usize) -> f32 {
    scales.map_or(1.0, |scales| scales[j * kv_heads + g])
}

/// The weights of value rows `j..j + 4` (head `g`): the softmax's `p`, times the rows' scales.
#[inline(always)]
fn row_weights(p: &[f32], scales: Option<&[f32]>, j: usize, g: usize, kv_heads: usize) -> [f32; 4] {
    [
        p[0] * row_scale(scales, j, g, kv_heads),
        p[1] * row_scale(scales, j + 1, g, kv_heads),
        p[2] * row_scale(scales, j + 2, g, kv_heads),
        p[3] * row_scale(scales, j + 3, g, kv_heads),
    ]
}

/// The values of position `j` as f32 (widened into `buf` if need be), with the row [`rows_ahead`]
/// positions ahead prefetched.
///
/// # Safety
/// As [`CacheValue::widen`] for `f16c`.
#[inline(always)]
unsafe fn value_row<'a, T: CacheValue>(
    values: &'a [T],
    j: usize,
    s: &AttentionShape,
    buf: &'a mut [f32],
    f16c: bool,
) -> &'a [f32] {
    let width = s.kv_heads * s.value_dim;
    prefetch_row(values, (j + rows_ahead::<T>(width)) * s.value_stride, width);
    T::widen(&values[j * s.value_stride..][..width], buf, f16c)
}

/// How many rows of `width` values ahead of its reads a pass over the cache prefetches: at least
/// 8 KiB (two 4 KiB pages, which the hardware prefetchers stop at) and two rows.
#[inline(always)]
fn rows_ahead<T>(width: usize) -> usize {
    (8192 / (width * std::mem::size_of::<T>()).max(1)).max(2)
}

/// Asks for `len` values of `cache` from `start` on to be loaded into L2 (see
/// [`crate::simd::prefetch_l2`]); past the end of the cache it does nothing. Into L2 rather than L1:
/// the lines do not hold L1's few fill buffers while they come from memory, so more are in flight.
/// Decode attention at tiny's shape (10 heads x 128, 1039 positions, `kernel_bench -- attention`,
/// 2-vCPU Zen 4, cold cache, per layer), against `prefetcht0` two key rows and four value rows
/// ahead: f16 cache 268-285 -> 190-235 µs, i8 173-189 -> 111-134 µs, and at 4096 positions f16
/// 981 -> 802 µs, i8 602 -> 386 µs; the distance (2 to 16 rows) made no clear difference, and
/// prefetching every second or fourth line only was slower. In `dsvl2 bench` after the 1039-token
/// image prompt (tiny q8_0 GGUF, three interleaved rounds where both bandwidth probes read ~35 GB/s)
/// the gain is within the noise: f16 cache 45.8-46.4 -> 46.4-47.8 tokens/s, i8 48.2-50.3 ->
/// 47.5-50.7.
#[inline(always)]
fn prefetch_row<T>(cache: &[T], start: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if start < cache.len() {
        crate::simd::prefetch_l2(cache[start..].as_ptr() as *const u8, std::mem::size_of::<T>() * len);
    }
}

impl Isa {
    /// Every query of `queries` over `positions` of `cache` at once, when this instruction set has a
    /// kernel for that: AMX-INT8 for an i8 cache of 128-value heads and enough queries (see
    /// `simd::amx_attention`), else the explicit kernels for two or more queries over an f16 or i8
    /// cache, in blocks read once for all of them ([`attend_positions_shared`]); `None` otherwise,
    /// and the queries run one at a time.
    fn attend_positions_many<T: CacheValue>(
        self,
        queries: &[&[f32]],
        cache: &CacheRows<T>,
        positions: std::ops::Range<usize>,
        s: &AttentionShape,
    ) -> Option<Vec<Partial>> {
        #[cfg(target_arch = "x86_64")]
        if self == Isa::Amx && queries.len() >= crate::simd::amx_attention::MIN_READERS {
            use crate::simd::amx_attention;
            if let (Some(keys), Some(values), Some(scales)) =
                (T::as_i8(cache.keys), T::as_i8(cache.values), cache.scales)
            {
                if amx_attention::supports(s) {
                    // SAFETY: `Isa::Amx` is only detected with AMX-INT8 and AVX-512 F/BW/VL; the caller
                    // checked the cache against `s` and `positions` lie within its length.
                    return Some(unsafe {
                        amx_attention::attend_positions_many(queries, keys, values, scales, positions, s)
                    });
                }
            }
        }
        // Otherwise, with explicit kernels, the queries go through each block of f16 or i8 rows
        // together.
        #[cfg(target_arch = "x86_64")]
        if queries.len() >= 2 && std::mem::size_of::<T>() < 4 {
            let (keys, values, scales) = (cache.keys, cache.values, cache.scales);
            // SAFETY: these variants are only constructed after their features were detected; the
            // caller checked the cache against `s`, and `positions` lie within its length.
            match self {
                Isa::Avx2 => {
                    return Some(unsafe {
                        crate::simd::x86::attend_positions_shared(queries, keys, values, scales, positions, s)
                    })
                }
                Isa::Avx512 | Isa::Amx => {
                    return Some(unsafe {
                        crate::simd::avx512::attend_positions_shared(queries, keys, values, scales, positions, s)
                    })
                }
                Isa::Scalar => {}
            }
        }
        let _ = (queries, cache, positions, s);
        None
    }

    /// [`attend_positions`] compiled for this instruction set (vector width and features).
    fn attend_positions<T: CacheValue>(
        self,
        q: &[f32],
        keys: &[T],
        values: &[T],
        scales: Option<RowScales>,
        positions: std::ops::Range<usize>,
        s: &AttentionShape,
    ) -> Partial {
        match self {
            // SAFETY: no F16C asked for.
            Isa::Scalar => unsafe { attend_positions::<8, T, false>(q, keys, values, scales, positions, s, false) },
            // SAFETY: these variants are only constructed after their features were detected.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { crate::simd::x86::attend_positions(q, keys, values, scales, positions, s) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Amx => unsafe {
                crate::simd::avx512::attend_positions(q, keys, values, scales, positions, s)
            },
        }
    }
}

/// One operand of [`prefill_attention`]: the value `d` of head `h` at position `i` is
/// `data[i * row_stride + h * head_dim + d]` (e.g. a `[positions, heads, head_dim]` tensor, or one
/// third of a fused `[positions, 3, heads, head_dim]` qkv projection).
#[derive(Debug, Clone, Copy)]
pub struct HeadRows<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
}

/// Shape of a [`prefill_attention`] call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefillShape {
    /// Query heads; head `h` reads key/value head `h / (heads / kv_heads)`.
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub queries: usize,
    pub keys: usize,
    /// Scores are `(q · k) · scale` before the softmax.
    pub scale: f32,
    /// Query `i` sees keys `0 ..= keys - queries + i` (the queries are the last positions); otherwise
    /// every query sees every key.
    pub causal: bool,
}

fn check_rows(name: &str, rows: &HeadRows, positions: usize, width: usize) {
    assert!(
        rows.row_stride >= width && (positions == 0 || rows.data.len() >= (positions - 1) * rows.row_stride + width),
        "{name}: {} values with row stride {} cannot hold {positions} rows of {width}",
        rows.data.len(),
        rows.row_stride
    );
}

/// Query rows per [`prefill_attention`] task. The task's score block (`QUERY_BLOCK x keys`: 373 KB
/// for a 729-token vision tile) stays in a core's L2 between the two products and the softmax; a
/// whole head's 729x729 scores (2.1 MB) went through L3 and memory three times.
const QUERY_BLOCK: usize = 128;

/// Softmax attention of `queries` rows against `keys` rows, per head: `out` (`[queries, heads,
/// head_dim]`, row stride `out_stride`) gets `softmax((q_h · k_gᵀ) · scale) · v_g`. Tasks of one head
/// and [`QUERY_BLOCK`] queries run in parallel; each multiplies through `gemm` (reading the operands
/// in place, whatever their strides) and takes the softmax of its score block with a vectorised
/// `exp`. Causal blocks only compute the keys their queries can see.
///
/// # Panics
/// If an operand is too short for the shape, or `heads` is not a multiple of `kv_heads`.
pub fn prefill_attention(
    q: HeadRows,
    k: HeadRows,
    v: HeadRows,
    shape: &PrefillShape,
    out: &mut [f32],
    out_stride: usize,
) {
    prefill_attention_isa(Isa::detect(), q, k, v, shape, out, out_stride)
}

pub(crate) fn prefill_attention_isa(
    isa: Isa,
    q: HeadRows,
    k: HeadRows,
    v: HeadRows,
    s: &PrefillShape,
    out: &mut [f32],
    out_stride: usize,
) {
    assert!(
        s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads),
        "{} query heads cannot share {} key/value heads",
        s.heads,
        s.kv_heads
    );
    assert!(
        !s.causal || s.queries <= s.keys,
        "causal attention needs the queries among the keys"
    );
    let hd = s.head_dim;
    check_rows("queries", &q, s.queries, s.heads * hd);
    check_rows("keys", &k, s.keys, s.kv_heads * hd);
    check_rows("values", &v, s.keys, s.kv_heads * hd);
    check_rows(
        "output",
        &HeadRows {
            data: out,
            row_stride: out_stride,
        },
        s.queries,
        s.heads * hd,
    );
    if s.queries == 0 || hd == 0 {
        return;
    }
    if s.keys == 0 {
        for row in out.chunks_mut(out_stride).take(s.queries) {
            row[..s.heads * hd].fill(0.0);
        }
        return;
    }
    let group = s.heads / s.kv_heads;
    let out = OutPtr::new(out);
    let (nq, nk) = (s.queries, s.keys);
    let blocks = nq.div_ceil(QUERY_BLOCK);
    (0..s.heads * blocks).into_par_iter().for_each(|task| {
        let (h, b) = (task / blocks, task % blocks);
        let g = h / group;
        let q0 = b * QUERY_BLOCK;
        let rows = QUERY_BLOCK.min(nq - q0);
        // Causal: the block's last query sees keys up to its own position, and no further.
        let past = s.causal.then(|| nk - nq + q0);
        let keys = past.map_or(nk, |p| p + rows);
        let mut scores = vec![0f32; rows * keys];
        // SAFETY: the operands were checked above to hold every element these strides address; the
        // score block is this task's own, and the output rows q0 .. q0 + rows of columns
        // h·hd .. (h+1)·hd are this task's.
        unsafe {
            gemm_strided(
                (rows, keys, hd),
                Strided {
                    ptr: scores.as_mut_ptr(),
                    row_stride: keys,
                    col_stride: 1,
                },
                Strided {
                    ptr: q.data.as_ptr().add(q0 * q.row_stride + h * hd),
                    row_stride: q.row_stride,
                    col_stride: 1,
                },
                // rhs(d, j) = k_g[j][d]: the transposed keys, read in place.
                Strided {
                    ptr: k.data.as_ptr().add(g * hd),
                    row_stride: 1,
                    col_stride: k.row_stride,
                },
                s.scale,
                gemm::Parallelism::None,
            );
        }
        let mut sums = vec![0f32; rows];
        isa.softmax_rows(&mut scores, keys, past, &mut sums);
        // SAFETY: as above.
        unsafe {
            gemm_strided(
                (rows, hd, keys),
                Strided {
                    ptr: out.at(q0 * out_stride + h * hd),
                    row_stride: out_stride,
                    col_stride: 1,
                },
                Strided {
                    ptr: scores.as_ptr(),
                    row_stride: keys,
                    col_stride: 1,
                },
                Strided {
                    ptr: v.data.as_ptr().add(g * hd),
                    row_stride: v.row_stride,
                    col_stride: 1,
                },
                1.0,
                gemm::Parallelism::None,
            );
            // The softmax's division, on head_dim outputs per row instead of `keys` probabilities.
            for (i, sum) in sums.iter().enumerate() {
                let row = std::slice::from_raw_parts_mut(out.at((q0 + i) * out_stride + h * hd), hd);
                row.iter_mut().for_each(|x| *x /= sum);
            }
        }
    });
}

/// Unnormalised softmax of each row of `scores` (`cols` wide): `exp(x - row max)`, with the row sums
/// in `sums`. With `causal_past = Some(p)`, row `i` keeps only its first `p + i + 1` values and the
/// rest become 0.
#[inline(always)]
pub(crate) fn softmax_rows<const FMA: bool>(
    scores: &mut [f32],
    cols: usize,
    causal_past: Option<usize>,
    sums: &mut [f32],
) {
    for ((i, row), sum) in scores.chunks_exact_mut(cols).enumerate().zip(sums) {
        let visible = causal_past.map_or(cols, |p| (p + i + 1).min(cols));
        let (seen, hidden) = row.split_at_mut(visible);
        *sum = crate::math::exp_shifted_in_place::<FMA>(seen).1;
        hidden.fill(0.0);
    }
}

impl Isa {
    /// [`softmax_rows`] compiled for this instruction set.
    fn softmax_rows(self, scores: &mut [f32], cols: usize, causal_past: Option<usize>, sums: &mut [f32]) {
        match self {
            Isa::Scalar => softmax_rows::<false>(scores, cols, causal_past, sums),
            // SAFETY: these variants are only constructed after their features were detected.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { crate::simd::x86::softmax_rows(scores, cols, causal_past, sums) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Amx => unsafe { crate::simd::avx512::softmax_rows(scores, cols, causal_past, sums) },
        }
    }
}
