//! Conversion of f32 rows into the storage formats. These are the ggml reference quantizers
//! (`quantize_row_q8_0_ref`, `quantize_row_q4_K_ref` with `make_qkx2_quants`), ported line by line so
//! the bytes match what llama.cpp's `quantize` produces without an importance matrix. They run once at
//! load time, so they are plain scalar code; `PackedMatrix::from_f32` parallelises them over rows.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::format::{Format, Q4K_BYTES, Q8_0R16_GROUP_BYTES, Q8_0_BYTES, QK8_0, QK_K, R16};

/// Quantizes one row (`src.len()` a multiple of the block length) into `dst` (its exact byte size).
pub(crate) fn quantize_row(format: Format, src: &[f32], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), format.bytes_for(1, src.len()));
    match format {
        Format::F32 => {
            for (d, &x) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
        Format::F16 => {
            for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&f16::from_f32(x).to_le_bytes());
            }
        }
        // half's conversion rounds to nearest even and keeps NaNs quiet, as torch's `.to(torch.bfloat16)` does.
        Format::Bf16 => {
            for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
            }
        }
        Format::Q8_0 => {
            for (d, x) in dst.chunks_exact_mut(Q8_0_BYTES).zip(src.chunks_exact(QK8_0)) {
                quantize_block_q8_0(x, d);
            }
        }
        Format::Q4K => {
            for (d, x) in dst.chunks_exact_mut(Q4K_BYTES).zip(src.chunks_exact(QK_K)) {
                quantize_block_q4k(x, d);
            }
        }
        Format::Q8_0R16 => unreachable!("q8_0_r16 is quantized 16 rows at a time (quantize_group_r16)"),
    }
}

/// Quantizes 16 rows (`src`: `16 · cols` values) into one interleaved group of [`Format::Q8_0R16`]
/// (`dst`: its exact byte size): q8_0 per row (a partial last block padded with zeros), then
/// [`interleave_r16`].
pub(crate) fn quantize_group_r16(src: &[f32], cols: usize, dst: &mut [u8]) {
    let padded = Format::Q8_0R16.padded_cols(cols);
    let row_bytes = Format::Q8_0.bytes_for(1, padded);
    let mut plain = vec![0u8; R16 * row_bytes];
    let mut row = vec![0f32; padded];
    for (d, s) in plain.chunks_exact_mut(row_bytes).zip(src.chunks_exact(cols)) {
        row[..cols].copy_from_slice(s);
        quantize_row(Format::Q8_0, &row, d);
    }
    interleave_r16(&plain, padded, dst);
}

/// Where quant byte `k` (0..32) of block column `b`, row `r` (0..16) of an interleaved group lies,
/// relative to the group's start; its f16 scale lies at `b · 544 + 2r`.
#[inline]
pub(crate) fn r16_quant_offset(b: usize, r: usize, k: usize) -> usize {
    b * Q8_0R16_GROUP_BYTES + 2 * R16 + 64 * (k / 4) + 4 * r + k % 4
}

/// 16 plain q8_0 rows of `cols` values (`plain`; whole blocks) in [`Format::Q8_0R16`]'s group layout
/// (`group`).
pub(crate) fn interleave_r16(plain: &[u8], cols: usize, group: &mut [u8]) {
    let nb = cols / QK8_0;
    for r in 0..R16 {
        for b in 0..nb {
            let blk = &plain[(r * nb + b) * Q8_0_BYTES..][..Q8_0_BYTES];
            group[b * Q8_0R16_GROUP_BYTES + 2 * r..][..2].copy_from_slice(&blk[..2]);
            for c in 0..QK8_0 / 4 {
                group[r16_quant_offset(b, r, 4 * c)..][..4].copy_from_slice(&blk[2 + 4 * c..][..4]);
            }
        }
    }
}

/// The inverse of [`interleave_r16`]: rows `first..first + n` of one group as plain q8_0 rows.
pub(crate) fn deinterleave_r16(group: &[u8], cols: usize, first: usize, n: usize, plain: &mut [u8]) {
    let nb = cols / QK8_0;
    for (i, r) in (first..first + n).enumerate() {
        for b in 0..nb {
            let blk = &mut plain[(i * nb + b) * Q8_0_BYTES..][..Q8_0_BYTES];
            blk[..2].copy_from_slice(&group[b * Q8_0R16_GROUP_BYTES + 2 * r..][..2]);
            for c in 0..QK8_0 / 4 {
                blk[2 + 4 * c..][..4].copy_from_slice(&group[r16_quant_offset(b, r, 4 * c)..][..4]);
            }
        }
    }
}

/// ggml `quantize_row_q8_0_ref`: d = amax / 127, q = round(x / d) (half away from zero, like C `roundf`).
fn quantize_block_q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (q, &v) in out[2..].iter_mut().zip(x) {
        *q = ((v * id).round() as i8) as u8;
    }
}

/// ggml's `nearest_int`: the float-add magic number trick, i.e. round half to even (and no libm call).
#[inline]
fn nearest_int(v: f32) -> i32 {
    debug_assert!(v.abs() <= 4194303.0);
    let val = v + 12582912.0;
    (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` from the packed 12 bytes.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// ggml `make_qkx2_quants` with `use_mad = false`: searches scale/min of an asymmetric `nmax`-level
/// quantization of `x` minimising the weighted squared error. Returns (scale, -min).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = li as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = li as u8;
            let w = weights[i];
            let lf = li as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml `quantize_row_q4_K_ref` for one super-block of 256.
fn quantize_block_q4k(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut mins = [0f32; QK_K / 32];
    let mut scales = [0f32; QK_K / 32];
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = xs.iter().fold(0.0, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        (scales[j], mins[j]) =
            make_qkx2_quants(15, xs, &weights, &mut l[32 * j..32 * j + 32], &mut laux, -1.0, 0.1, 20);
        max_scale = max_scale.max(scales[j]);
        max_min = max_min.max(mins[j]);
    }

    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..QK_K / 32 {
        // ggml stores nearest_int into a uint8_t before clamping; the values are non-negative and < 256.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..QK_K / 32 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dd = d.to_f32() * sc as f32;
        // As in ggml, a zero scale keeps the levels make_qkx2_quants chose (they dequantize to -dmin*m).
        if dd == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dd).clamp(0, 15) as u8;
        }
    }

    out[0..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_le_bytes());
    out[4..16].copy_from_slice(&packed);
    let qs = &mut out[16..];
    for (c, j) in (0..QK_K).step_by(64).enumerate() {
        for i in 0..32 {
            qs[32 * c + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

/// Activation rows quantized for the integer GEMV kernels of q8_0 / q4_k weights: per block of 32
/// values an f32 scale `d = amax / 127`, the 8-bit values `q = round(x / d)`, and the block's sum
/// `d · Σq` for q4_k's `-dmin·m·Σx` term. That sum is deliberately the *quantized* one: then the
/// activation error enters only as `Σ w·(x̂ - x)`, as for q8_0; with the exact Σx it would be weighted
/// by `w + dmin·m` instead (measured 5x larger error).
/// Scales keep f32 precision (ggml rounds them to f16) and cover 32 values (ggml's q8_K covers 256), so
/// one outlier only coarsens its own block.
pub(crate) struct QuantizedActs {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub sum: Vec<f32>,
    /// `-128 · Σq` per block (the interleaved q8_0 kernel's start value: it adds 128 to each weight to
    /// make it unsigned for `vpdpbusd`, see `simd::avx512`).
    pub bias_sum: Vec<i32>,
    pub cols: usize,
    /// Row stride of `d` and `sum`: blocks per row rounded up to 8, so kernels may load 8 scales at once.
    pub stride: usize,
}

/// Activation values from which [`QuantizedActs::new`] splits its rows across threads: below, the
/// fork/join costs more than it saves (decoding: one row). A prompt's 1039 x 1280 rows took ~0.2 s per
/// image request on one thread while the other waited (perf).
const PARALLEL_QUANTIZE_VALUES: usize = 64 * 1024;

impl QuantizedActs {
    /// `m` rows of `cols` values from `x`. Rows that end in a partial block (only for q8_0_r16
    /// weights, whose rows are padded the same way) are stored padded with zeros: `self.cols` is then
    /// `cols` rounded up to whole blocks.
    pub(crate) fn new(x: &[f32], m: usize, cols: usize) -> Self {
        Self::new_isa(crate::isa::Isa::detect(), x, m, cols)
    }

    /// [`Self::new`] with the quantizer compiled for `isa`.
    pub(crate) fn new_isa(isa: crate::isa::Isa, x: &[f32], m: usize, cols: usize) -> Self {
        assert!(x.len() == m * cols);
        let padded = cols.next_multiple_of(QK8_0);
        let nb = padded / QK8_0;
        let stride = nb.next_multiple_of(8);
        let mut acts = QuantizedActs {
            q: vec![0; m * padded],
            d: vec![0.0; m * stride],
            sum: vec![0.0; m * stride],
            bias_sum: vec![0; m * stride],
            cols: padded,
            stride,
        };
        if cols == 0 {
            return acts;
        }
        // Below the threshold, one chunk: on this thread, no fork/join.
        let rows_per_task = if m * cols >= PARALLEL_QUANTIZE_VALUES {
            (PARALLEL_QUANTIZE_VALUES / 4 / cols).max(1)
        } else {
            usize::MAX
        };
        (
            x.par_chunks(cols),
            acts.q.par_chunks_mut(padded),
            acts.d.par_chunks_mut(stride),
            acts.sum.par_chunks_mut(stride),
            acts.bias_sum.par_chunks_mut(stride),
        )
            .into_par_iter()
            .with_min_len(rows_per_task)
            .for_each(|(x, q, d, sum, bias_sum)| isa.quantize_act_row(x, q, d, sum, bias_sum));
        acts
    }
}

/// One row of [`QuantizedActs`]: `x` into its values `q` (whole 32-value blocks: a partial last block
/// of `x` is quantized as if padded with zeros) and its per-block `d`, `sum` and `bias_sum`.
/// Generic code that the SIMD modules compile with their features (`generic_kernels!`): built for
/// baseline x86-64 it was scalar, 5.6% of the vision tower's CPU time with the products on AMX.
/// Every step is exact or correctly rounded, so each build gives the same bytes.
#[inline(always)]
pub(crate) fn quantize_act_row(x: &[f32], q: &mut [i8], d: &mut [f32], sum: &mut [f32], bias_sum: &mut [i32]) {
    let blocks = x.chunks(QK8_0).zip(q.chunks_exact_mut(QK8_0));
    for (b, (xs, qs)) in blocks.enumerate() {
        let qsum = if let Ok(xs) = <&[f32; QK8_0]>::try_from(xs) {
            quantize_act_block(xs, qs, &mut d[b])
        } else {
            let mut padded = [0f32; QK8_0];
            padded[..xs.len()].copy_from_slice(xs);
            quantize_act_block(&padded, qs, &mut d[b])
        };
        sum[b] = d[b] * qsum as f32;
        bias_sum[b] = -128 * qsum;
    }
}

/// One block of [`quantize_act_row`]: its values into `q`, its scale into `d`; returns `Σq`.
#[inline(always)]
fn quantize_act_block(xs: &[f32; QK8_0], q: &mut [i8], d: &mut f32) -> i32 {
    // `f32::max`'s result (any order gives it: max is exact, NaNs are skipped either way), as 16
    // lanes of compare-and-select, then a tree: a sequential fold compiled to 32 dependent `maxss`.
    let max = |a: f32, b: f32| if b > a { b } else { a };
    let mut lanes = [0f32; 16];
    for half in xs.chunks_exact(16) {
        for (m, v) in lanes.iter_mut().zip(half) {
            *m = max(*m, v.abs());
        }
    }
    let mut width = 16;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            lanes[l] = max(lanes[l], lanes[l + width]);
        }
    }
    let amax = lanes[0];
    let scale = amax / 127.0;
    let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    let mut qsum = 0i32;
    for (q, &v) in q.iter_mut().zip(xs) {
        *q = nearest_int(v * inverse) as i8;
        qsum += *q as i32;
    }
    *d = scale;
    qsum
}

impl crate::isa::Isa {
    /// [`quantize_act_row`] compiled for this instruction set.
    fn quantize_act_row(self, x: &[f32], q: &mut [i8], d: &mut [f32], sum: &mut [f32], bias_sum: &mut [i32]) {
        use crate::isa::Isa;
        match self {
            Isa::Scalar => quantize_act_row(x, q, d, sum, bias_sum),
            // SAFETY: these variants are only constructed after their features were detected.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { crate::simd::x86::quantize_act_row(x, q, d, sum, bias_sum) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Amx => unsafe { crate::simd::avx512::quantize_act_row(x, q, d, sum, bias_sum) },
        }
    }
}
