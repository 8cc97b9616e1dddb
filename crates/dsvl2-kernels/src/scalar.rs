//! Portable kernels: the fallback on CPUs without AVX2/FMA/F16C and on other architectures, and the
//! reference the SIMD kernels are tested against. Dequantization performs exactly the float operations
//! ggml's `dequantize_row_*` do, so results are bit-identical to ggml/candle.

use half::{bf16, f16};

use crate::format::{Format, Q4K_BYTES, Q8_0_BYTES, QK8_0, QK_K};
use crate::quant::{scale_min_k4, QuantizedActs};

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes whole rows: `src` holds `dst.len()` elements in `format`'s layout.
pub(crate) fn decode(format: Format, src: &[u8], dst: &mut [f32]) {
    match format {
        Format::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        Format::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        Format::Bf16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        Format::Q8_0 => {
            for (y, b) in dst.chunks_exact_mut(QK8_0).zip(src.chunks_exact(Q8_0_BYTES)) {
                let d = f16_at(b, 0);
                for (y, &q) in y.iter_mut().zip(&b[2..]) {
                    *y = (q as i8) as f32 * d;
                }
            }
        }
        Format::Q4K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(Q4K_BYTES)) {
                decode_q4k_block(b, y);
            }
        }
        Format::Q8_0R16 => unreachable!("q8_0_r16 is decoded group by group (PackedMatrix::dequantize_rows)"),
    }
}

/// ggml `dequantize_row_q4_K` for one super-block.
fn decode_q4k_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..];
    for c in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * c..32 * c + 32];
        let y = &mut y[64 * c..64 * c + 64];
        for i in 0..32 {
            y[i] = d1 * (q[i] & 0xF) as f32 - m1;
            y[32 + i] = d2 * (q[i] >> 4) as f32 - m2;
        }
    }
}

/// `out[i] = w · x[i*stride .. i*stride + w.len()]` for `i < out.len()`.
pub(crate) fn dot_multi(w: &[f32], x: &[f32], stride: usize, out: &mut [f32]) {
    let n = w.len();
    for (i, o) in out.iter_mut().enumerate() {
        let xi = &x[i * stride..i * stride + n];
        // Eight independent partial sums: lets the compiler vectorise and halves the rounding error growth.
        let mut acc = [0f32; 8];
        let (wc, wt) = w.as_chunks::<8>();
        let (xc, xt) = xi.as_chunks::<8>();
        for (a, b) in wc.iter().zip(xc) {
            for l in 0..8 {
                acc[l] += a[l] * b[l];
            }
        }
        let mut s = acc.iter().sum::<f32>();
        for (a, b) in wt.iter().zip(xt) {
            s += a * b;
        }
        *o = s;
    }
}

/// q8_0 weight row against quantized activation rows `first..first + out.len()`: per block
/// `dw * dx * Σ qw·qx`, the same integer algorithm as the SIMD kernel.
pub(crate) fn dot_q8_0(w: &[u8], acts: &QuantizedActs, first: usize, out: &mut [f32]) {
    let cols = acts.cols;
    for (g, o) in out.iter_mut().enumerate() {
        let i = first + g;
        let xq = &acts.q[i * cols..(i + 1) * cols];
        let xd = &acts.d[i * acts.stride..];
        let mut s = 0f32;
        for (b, blk) in w.chunks_exact(Q8_0_BYTES).enumerate() {
            let isum: i32 = blk[2..]
                .iter()
                .zip(&xq[b * QK8_0..])
                .map(|(&a, &c)| (a as i8) as i32 * c as i32)
                .sum();
            s += f16_at(blk, 0) * xd[b] * isum as f32;
        }
        *o = s;
    }
}

/// q4_k weight row against quantized activation rows: per sub-block j of 32,
/// `d·sc_j · dx_j · Σ q·qx − dmin·m_j · Σx_j`.
pub(crate) fn dot_q4k(w: &[u8], acts: &QuantizedActs, first: usize, out: &mut [f32]) {
    let cols = acts.cols;
    for (g, o) in out.iter_mut().enumerate() {
        let i = first + g;
        let xq = &acts.q[i * cols..(i + 1) * cols];
        let xd = &acts.d[i * acts.stride..];
        let xs = &acts.sum[i * acts.stride..];
        let mut s = 0f32;
        for (sb, blk) in w.chunks_exact(Q4K_BYTES).enumerate() {
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, &blk[4..16]);
                let qs = &blk[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
                let x = &xq[sb * QK_K + 32 * j..];
                let shift = 4 * (j % 2);
                let isum: i32 = qs
                    .iter()
                    .zip(x)
                    .map(|(&q, &v)| ((q >> shift) & 0xF) as i32 * v as i32)
                    .sum();
                let b = sb * 8 + j;
                s += d * sc as f32 * xd[b] * isum as f32 - dmin * m as f32 * xs[b];
            }
        }
        *o = s;
    }
}
