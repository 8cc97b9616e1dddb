//! Attention of one query row per head over a sequence's cache (decoding), split over positions.
//!
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

use crate::isa::Isa;

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
    max: Vec<f32>,
    sum: Vec<f32>,
    /// `[heads, value_dim]`: `Σ_j exp(score_j - max) · v_j`.
    acc: Vec<f32>,
}

/// `out[h] = Σ_j softmax_j((q_h · k_j) · scale) · v_j` over the `len` cached positions, for every query
/// head `h`: `q` is `[heads, key_dim]`, `out` `[heads, value_dim]`. Positions are split across the
/// rayon pool.
///
/// # Panics
/// If a slice is shorter than `shape` and `len` require, or `heads` is not a multiple of `kv_heads`.
pub fn decode_attention(q: &[f32], keys: &[f32], values: &[f32], len: usize, shape: &AttentionShape, out: &mut [f32]) {
    decode_attention_isa(Isa::detect(), q, keys, values, len, shape, out)
}

pub(crate) fn decode_attention_isa(
    isa: Isa,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    len: usize,
    s: &AttentionShape,
    out: &mut [f32],
) {
    assert!(
        s.kv_heads > 0 && s.heads % s.kv_heads == 0,
        "{} query heads cannot share {} key/value heads",
        s.heads,
        s.kv_heads
    );
    assert!(s.key_stride >= s.kv_heads * s.key_dim && s.value_stride >= s.kv_heads * s.value_dim);
    assert_eq!(q.len(), s.heads * s.key_dim, "one query row per head");
    assert_eq!(out.len(), s.heads * s.value_dim, "one output row per head");
    if len == 0 {
        out.fill(0.0);
        return;
    }
    assert!(
        keys.len() >= (len - 1) * s.key_stride + s.kv_heads * s.key_dim,
        "keys shorter than {len} positions"
    );
    assert!(
        values.len() >= (len - 1) * s.value_stride + s.kv_heads * s.value_dim,
        "values shorter than {len} positions"
    );
    // Enough tasks to balance the threads, each reading at least ~64 KiB of cache.
    let row_bytes = 4 * (s.kv_heads * (s.key_dim + s.value_dim));
    let min_rows = (64 * 1024 / row_bytes.max(1)).max(1);
    let chunk = len.div_ceil(4 * rayon::current_num_threads().max(1)).max(min_rows);
    let partials: Vec<Partial> = (0..len.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let positions = c * chunk..((c + 1) * chunk).min(len);
            isa.attend_positions(q, keys, values, positions, s)
        })
        .collect();
    merge(&partials, s, out);
}

/// The exact softmax over all positions from the tasks' partial ones.
fn merge(partials: &[Partial], s: &AttentionShape, out: &mut [f32]) {
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

/// Dot product with `L` independent partial sums (the compiler turns them into one vector register).
#[inline(always)]
fn dot<const L: usize>(a: &[f32], b: &[f32]) -> f32 {
    let (ac, at) = a.as_chunks::<L>();
    let (bc, bt) = b.as_chunks::<L>();
    let mut acc = [0f32; L];
    for (x, y) in ac.iter().zip(bc) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + at.iter().zip(bt).map(|(x, y)| x * y).sum::<f32>()
}

/// One task's positions, every head. Generic over the vector width `L` so that the same code is
/// compiled for each instruction set (see [`Isa::attend_positions`]).
#[inline(always)]
pub(crate) fn attend_positions<const L: usize>(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    positions: std::ops::Range<usize>,
    s: &AttentionShape,
) -> Partial {
    let (n, group) = (positions.len(), s.heads / s.kv_heads);
    // scores[h * n + i]: head h, position positions.start + i.
    let mut scores = vec![0f32; s.heads * n];
    for (i, j) in positions.clone().enumerate() {
        let row = &keys[j * s.key_stride..];
        for h in 0..s.heads {
            let k = &row[(h / group) * s.key_dim..(h / group + 1) * s.key_dim];
            scores[h * n + i] = dot::<L>(&q[h * s.key_dim..(h + 1) * s.key_dim], k) * s.scale;
        }
    }
    let mut max = vec![f32::NEG_INFINITY; s.heads];
    let mut sum = vec![0f32; s.heads];
    for h in 0..s.heads {
        let head = &mut scores[h * n..(h + 1) * n];
        max[h] = head.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        head.iter_mut().for_each(|x| *x = (*x - max[h]).exp());
        sum[h] = head.iter().sum();
    }
    let mut acc = vec![0f32; s.heads * s.value_dim];
    for (i, j) in positions.enumerate() {
        let row = &values[j * s.value_stride..];
        for h in 0..s.heads {
            let v = &row[(h / group) * s.value_dim..(h / group + 1) * s.value_dim];
            let p = scores[h * n + i];
            let acc = &mut acc[h * s.value_dim..(h + 1) * s.value_dim];
            acc.iter_mut().zip(v).for_each(|(a, v)| *a += p * v);
        }
    }
    Partial { max, sum, acc }
}

impl Isa {
    /// [`attend_positions`] compiled for this instruction set (vector width and features).
    fn attend_positions(
        self,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        positions: std::ops::Range<usize>,
        s: &AttentionShape,
    ) -> Partial {
        match self {
            Isa::Scalar => attend_positions::<8>(q, keys, values, positions, s),
            // SAFETY: these variants are only constructed after their features were detected.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { crate::simd::x86::attend_positions(q, keys, values, positions, s) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { crate::simd::avx512::attend_positions(q, keys, values, positions, s) },
        }
    }
}
