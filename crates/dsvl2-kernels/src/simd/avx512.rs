//! AVX-512 (F, BW, VL, VNNI) GEMV kernels for q8_0 and q4_k weights against 8-bit activations. Every
//! function here is `unsafe`: it must only run after `is_x86_feature_detected!` confirmed the features
//! (see `crate::isa`).
//!
//! Each step handles two blocks of 32 in one 512-bit register and `R` weight rows at once, so the
//! activation loads and their preparation are shared by `R` rows and `R · G` independent chains hide
//! the latencies. The integer dot products are exact (`vpdpbusd`, i32 without saturation); only the
//! order of the f32 accumulation differs from the scalar code.
//!
//! - q8_0: `vpdpbusd` multiplies unsigned by signed bytes. The weight is made unsigned as `w + 128`
//!   (`xor 0x80`) and the accumulator starts at `-128 · Σx` (computed once per activation pair and
//!   shared by the `R` rows), so the result is `Σ w·x` exactly.
//! - q4_k: the nibbles are unsigned already. 64 bytes of `qs` hold sub-blocks (0, 2) in the low nibbles
//!   and (1, 3) in the high ones, so the activations are rearranged to match (`vshufi64x2`, shared by
//!   the rows). The high nibbles are used in place (`q & 0xF0`, 16 times their value; the exact factor
//!   1/16 goes into their scales), which saves a shift.
//!
//! The per-block f32 scale (weight scale × activation scale) is formed 8 blocks at a time and spread
//! over the two halves of a register with `vpermps`.

// Tiles index their register arrays by row and group, and the entry points take the whole product.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use std::arch::x86_64::*;

use super::prefetch;
use super::x86::{f16_pair_at, q4k_scales_mins, q8_0_scales8};
use crate::format::{Format, Q4K_BYTES, Q8_0R16_GROUP_BYTES, Q8_0_BYTES, QK8_0, QK_K, R16};
use crate::quant::QuantizedActs;

/// Lanes 0–7 take element `a`, lanes 8–15 element `b` (for `vpermps`).
#[inline]
#[target_feature(enable = "avx512f")]
fn spread(a: i32, b: i32) -> __m512i {
    _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
}

/// q8_0 / q4_k product of `nrows` consecutive weight rows (`w`) with all `m` quantized activation rows:
/// `y[i * y_stride + k]` for `i < m`, `k < nrows`.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI must be available; `w` must hold `nrows` rows of
/// `acts.cols` values in `format`, `acts` at least `m` rows, and `y` must be valid for the writes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn gemv_quantized(
    format: Format,
    w: &[u8],
    nrows: usize,
    acts: &QuantizedActs,
    m: usize,
    y: *mut f32,
    y_stride: usize,
) {
    let row_bytes = format.bytes_for(1, acts.cols);
    debug_assert!(w.len() >= nrows * row_bytes && m * acts.cols <= acts.q.len());
    let nblocks = acts.cols / format.block_len();
    let mut i = 0;
    while i < m {
        let g = (m - i).min(4);
        let mut k = 0;
        while k < nrows {
            let wr = w.as_ptr().add(k * row_bytes);
            let out = y.add(i * y_stride + k);
            macro_rules! tile {
                ($r:literal, $g:literal) => {{
                    match format {
                        Format::Q8_0 => store::<$r, $g>(
                            q8_0_tile::<$r, $g>(wr, row_bytes, nblocks, acts, i),
                            out,
                            y_stride,
                        ),
                        _ => store::<$r, $g>(q4k_tile::<$r, $g>(wr, row_bytes, nblocks, acts, i), out, y_stride),
                    }
                    $r
                }};
            }
            let left = nrows - k;
            // Weight rows per tile: R · G accumulators plus R · G scale registers must fit in 32.
            k += match (g, format, left >= 4, left >= 2) {
                (1, _, true, _) => tile!(4, 1),
                (2, Format::Q8_0, true, _) => tile!(4, 2),
                (2, _, _, true) => tile!(2, 2),
                (3, Format::Q8_0, _, true) => tile!(2, 3),
                (4, Format::Q8_0, _, true) => tile!(2, 4),
                (1, ..) => tile!(1, 1),
                (2, ..) => tile!(1, 2),
                (3, ..) => tile!(1, 3),
                _ => tile!(1, 4),
            };
        }
        i += g;
    }
}

#[inline(always)]
unsafe fn store<const R: usize, const G: usize>(v: [[f32; G]; R], out: *mut f32, y_stride: usize) {
    for (r, row) in v.iter().enumerate() {
        for (g, &x) in row.iter().enumerate() {
            *out.add(g * y_stride + r) = x;
        }
    }
}

/// `R` q8_0 weight rows (row stride `row_bytes`, `nb` blocks) against activation rows
/// `first..first + G`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0_tile<const R: usize, const G: usize>(
    w: *const u8,
    row_bytes: usize,
    nb: usize,
    acts: &QuantizedActs,
    first: usize,
) -> [[f32; G]; R] {
    let bias = _mm512_set1_epi8(-128);
    let zero = _mm512_setzero_si512();
    let idx = [spread(0, 1), spread(2, 3), spread(4, 5), spread(6, 7)];
    let xq: [*const i8; G] = std::array::from_fn(|g| acts.q.as_ptr().add((first + g) * acts.cols));
    let xd: [*const f32; G] = std::array::from_fn(|g| acts.d.as_ptr().add((first + g) * acts.stride));
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    let mut b = 0;
    while b < nb {
        let n8 = (nb - b).min(8);
        // Per-block scales dw · dx for 8 blocks (lanes beyond n8 are 0: `acts.d` is zero-padded).
        let mut s8 = [[_mm512_setzero_ps(); G]; R];
        for r in 0..R {
            // The same blocks of the next tile's rows (see `prefetch`).
            prefetch(w.wrapping_add((r + R) * row_bytes + b * Q8_0_BYTES), 8 * Q8_0_BYTES);
            let dw = q8_0_scales8(w.add(r * row_bytes + b * Q8_0_BYTES), n8);
            for g in 0..G {
                s8[r][g] = _mm512_zextps256_ps512(_mm256_mul_ps(dw, _mm256_loadu_ps(xd[g].add(b))));
            }
        }
        macro_rules! pair {
            ($p:expr, $two:expr) => {{
                let blk = b + 2 * $p;
                let mut xv = [zero; G];
                let mut corr = [zero; G];
                for g in 0..G {
                    let x = xq[g].add(blk * QK8_0);
                    xv[g] = if $two {
                        _mm512_loadu_si512(x as *const __m512i)
                    } else {
                        _mm512_zextsi256_si512(_mm256_loadu_si256(x as *const __m256i))
                    };
                    corr[g] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, xv[g]));
                }
                for r in 0..R {
                    let wp = w.add(r * row_bytes + blk * Q8_0_BYTES + 2);
                    let lo = _mm512_zextsi256_si512(_mm256_loadu_si256(wp as *const __m256i));
                    let wv = if $two {
                        _mm512_inserti64x4::<1>(lo, _mm256_loadu_si256(wp.add(Q8_0_BYTES) as *const __m256i))
                    } else {
                        lo
                    };
                    let wu = _mm512_xor_si512(wv, bias);
                    for g in 0..G {
                        let dp = _mm512_dpbusd_epi32(corr[g], wu, xv[g]);
                        let sv = _mm512_permutexvar_ps(idx[$p], s8[r][g]);
                        acc[r][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), sv, acc[r][g]);
                    }
                }
            }};
        }
        if n8 == 8 {
            pair!(0, true);
            pair!(1, true);
            pair!(2, true);
            pair!(3, true);
        } else {
            for p in 0..n8 / 2 {
                pair!(p, true);
            }
            if n8 % 2 == 1 {
                pair!(n8 / 2, false);
            }
        }
        b += n8;
    }
    std::array::from_fn(|r| std::array::from_fn(|g| _mm512_reduce_add_ps(acc[r][g])))
}

/// `R` q4_k weight rows (row stride `row_bytes`, `nsb` super-blocks) against activation rows
/// `first..first + G`. The min term is `-(dmin·m_j) · Σx_j` with the quantized block sums, as in the
/// scalar code.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k_tile<const R: usize, const G: usize>(
    w: *const u8,
    row_bytes: usize,
    nsb: usize,
    acts: &QuantizedActs,
    first: usize,
) -> [[f32; G]; R] {
    let low4 = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    // For the 64 qs bytes of half h: low nibbles are sub-blocks (4h, 4h+2), high ones (4h+1, 4h+3).
    let idx = [[spread(0, 2), spread(1, 3)], [spread(4, 6), spread(5, 7)]];
    let xq: [*const i8; G] = std::array::from_fn(|g| acts.q.as_ptr().add((first + g) * acts.cols));
    let xd: [*const f32; G] = std::array::from_fn(|g| acts.d.as_ptr().add((first + g) * acts.stride));
    let xs: [*const f32; G] = std::array::from_fn(|g| acts.sum.as_ptr().add((first + g) * acts.stride));
    // Two accumulators per output (low / high nibbles): shorter FMA chains.
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    let mut acc2 = [[_mm512_setzero_ps(); G]; R];
    for sb in 0..nsb {
        let mut s8 = [[_mm512_setzero_ps(); G]; R];
        let mut s8hi = [[_mm512_setzero_ps(); G]; R];
        for r in 0..R {
            prefetch(w.wrapping_add((r + R) * row_bytes + sb * Q4K_BYTES), Q4K_BYTES);
            let blk = w.add(r * row_bytes + sb * Q4K_BYTES);
            let (d, dmin) = f16_pair_at(blk);
            let (sc, mn) = q4k_scales_mins(blk.add(4));
            let dsc = _mm256_mul_ps(
                _mm256_set1_ps(d),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(sc as i64))),
            );
            let dmn = _mm256_mul_ps(
                _mm256_set1_ps(dmin),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mn as i64))),
            );
            for g in 0..G {
                let s = _mm256_mul_ps(dsc, _mm256_loadu_ps(xd[g].add(8 * sb)));
                s8[r][g] = _mm512_zextps256_ps512(s);
                s8hi[r][g] = _mm512_zextps256_ps512(_mm256_mul_ps(s, _mm256_set1_ps(1.0 / 16.0)));
                let mins = _mm256_mul_ps(dmn, _mm256_loadu_ps(xs[g].add(8 * sb)));
                acc[r][g] = _mm512_sub_ps(acc[r][g], _mm512_zextps256_ps512(mins));
            }
        }
        for h in 0..2 {
            let mut xlo = [zero; G];
            let mut xhi = [zero; G];
            for g in 0..G {
                let x = xq[g].add(sb * QK_K + 128 * h);
                let xa = _mm512_loadu_si512(x as *const __m512i);
                let xb = _mm512_loadu_si512(x.add(64) as *const __m512i);
                xlo[g] = _mm512_shuffle_i64x2::<0x44>(xa, xb);
                xhi[g] = _mm512_shuffle_i64x2::<0xEE>(xa, xb);
            }
            for r in 0..R {
                let q = _mm512_loadu_si512(w.add(r * row_bytes + sb * Q4K_BYTES + 16 + 64 * h) as *const __m512i);
                let lo = _mm512_and_si512(q, low4);
                // The high nibbles in place, i.e. 16 times their value (no shift; the 16 is in `s8hi`).
                let hi = _mm512_andnot_si512(low4, q);
                for g in 0..G {
                    let p0 = _mm512_dpbusd_epi32(zero, lo, xlo[g]);
                    let p1 = _mm512_dpbusd_epi32(zero, hi, xhi[g]);
                    let s0 = _mm512_permutexvar_ps(idx[h][0], s8[r][g]);
                    let s1 = _mm512_permutexvar_ps(idx[h][1], s8hi[r][g]);
                    acc[r][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), s0, acc[r][g]);
                    acc2[r][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), s1, acc2[r][g]);
                }
            }
        }
    }
    std::array::from_fn(|r| std::array::from_fn(|g| _mm512_reduce_add_ps(_mm512_add_ps(acc[r][g], acc2[r][g]))))
}

/// q8_0_r16 product of `nrows` weight rows (whole groups of 16, `w` their bytes) with all `m` quantized
/// activation rows: `y[i * y_stride + k]` for `i < m`, `k < nrows`.
///
/// Each 64-byte chunk of a group holds 4 quants of each of 16 rows, so one `vpdpbusd` against the 4
/// matching activation bytes (broadcast) advances all 16 rows' block dot products, one row per lane;
/// the block's 16 weight scales are one `vcvtph2ps`. Per block and activation row that leaves one
/// convert and one FMA for 16 rows (the plain layout needs them per row, plus a permute). The weight
/// is made unsigned as `w + 128` (`xor 0x80`, shared by the activation rows) and the sum starts at
/// `-128 · Σx` (`QuantizedActs::bias_sum`), so the integer dot products are exact. Up to 8 activation
/// rows share each weight load. With fewer than 4 activation rows, two accumulator chains per row (even
/// and odd chunks) halve the `vpdpbusd` latency chain; with 4 or more the rows' chains already overlap,
/// and one chain each leaves registers for 8 rows without spilling.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI must be available; `w` must hold `nrows` rows of
/// `acts.cols` values, `acts` at least `m` rows, and `y` must be valid for the writes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn gemv_q8_0_r16(
    w: &[u8],
    nrows: usize,
    acts: &QuantizedActs,
    m: usize,
    y: *mut f32,
    y_stride: usize,
) {
    let nb = acts.cols / QK8_0;
    let ahead = super::r16_prefetch_ahead_avx512(m);
    super::for_each_r16_tile(w, nrows, acts, m, y, y_stride, |group, i, out| match m - i {
        1 => r16_tile::<1>(group, nb, acts, i, out, y_stride, ahead),
        2 => r16_tile::<2>(group, nb, acts, i, out, y_stride, ahead),
        3 => r16_tile::<3>(group, nb, acts, i, out, y_stride, ahead),
        4..=7 => r16_tile::<4>(group, nb, acts, i, out, y_stride, ahead),
        _ => r16_tile::<8>(group, nb, acts, i, out, y_stride, ahead),
    });
}

/// One group of 16 q8_0_r16 rows (`nb` block columns from `w`) against activation rows
/// `first..first + G`; writes 16 outputs per activation row at `y + g · y_stride`, prefetching `ahead`
/// bytes ahead of its reads (see [`super::r16_prefetch_ahead_avx512`]). Returns `G`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn r16_tile<const G: usize>(
    w: *const u8,
    nb: usize,
    acts: &QuantizedActs,
    first: usize,
    y: *mut f32,
    y_stride: usize,
    ahead: usize,
) -> usize {
    let bias = _mm512_set1_epi8(-128);
    let xq: [*const u8; G] = std::array::from_fn(|g| acts.q.as_ptr().add((first + g) * acts.cols) as *const u8);
    let xd: [*const f32; G] = std::array::from_fn(|g| acts.d.as_ptr().add((first + g) * acts.stride));
    let xb: [*const i32; G] = std::array::from_fn(|g| acts.bias_sum.as_ptr().add((first + g) * acts.stride));
    let mut acc = [_mm512_setzero_ps(); G];
    for b in 0..nb {
        let blk = w.add(b * Q8_0R16_GROUP_BYTES);
        super::prefetch_l2(blk.wrapping_add(ahead), Q8_0R16_GROUP_BYTES);
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
        let mut even: [__m512i; G] = std::array::from_fn(|g| _mm512_set1_epi32(*xb[g].add(b)));
        let mut odd = [_mm512_setzero_si512(); G];
        for c in 0..QK8_0 / 4 {
            let wu = _mm512_xor_si512(_mm512_loadu_si512(blk.add(2 * R16 + 64 * c) as *const __m512i), bias);
            for g in 0..G {
                let x = _mm512_set1_epi32((xq[g].add(b * QK8_0 + 4 * c) as *const i32).read_unaligned());
                if G >= 4 || c % 2 == 0 {
                    even[g] = _mm512_dpbusd_epi32(even[g], wu, x);
                } else {
                    odd[g] = _mm512_dpbusd_epi32(odd[g], wu, x);
                }
            }
        }
        for g in 0..G {
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*xd[g].add(b)));
            let dot = _mm512_cvtepi32_ps(if G >= 4 {
                even[g]
            } else {
                _mm512_add_epi32(even[g], odd[g])
            });
            acc[g] = _mm512_fmadd_ps(dot, scale, acc[g]);
        }
    }
    for (g, acc) in acc.into_iter().enumerate() {
        _mm512_storeu_ps(y.add(g * y_stride), acc);
    }
    G
}

/// f32 / f16 / bf16 product of `nrows` consecutive weight rows (`w`, `cols` values each) with `m` f32
/// activation rows `x` (row stride `cols`): `y[i * y_stride + k]` for `i < m`, `k < nrows`. f16 / bf16
/// weights are widened in registers (`vcvtph2ps`, or a 16-bit shift for bf16) and used at once by
/// `R · G` FMA chains, with no f32 copy of the row.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F/BW/VL must be available; `w` must hold `nrows · cols` values, `x`
/// `m · cols`, and `y` must be valid for the writes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn gemv_float(
    format: Format,
    w: &[u8],
    nrows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    y: *mut f32,
    y_stride: usize,
) {
    let esize = format.bytes_for(1, 1);
    debug_assert!(w.len() >= esize * nrows * cols && x.len() >= m * cols);
    let mut i = 0;
    while i < m {
        let g = (m - i).min(4);
        let xp = x.as_ptr().add(i * cols);
        let mut k = 0;
        while k < nrows {
            let wr = w.as_ptr().add(esize * k * cols);
            let out = y.add(i * y_stride + k);
            macro_rules! tile {
                ($r:literal, $g:literal) => {{
                    let v = match format {
                        Format::F32 => float_tile::<$r, $g, F32>(wr, cols, xp),
                        Format::F16 => float_tile::<$r, $g, F16>(wr, cols, xp),
                        Format::Bf16 => float_tile::<$r, $g, BF16>(wr, cols, xp),
                        _ => unreachable!("gemv_float: {format}"),
                    };
                    store::<$r, $g>(v, out, y_stride);
                    $r
                }};
            }
            let left = nrows - k;
            k += match (g, left >= 4, left >= 2) {
                (1, true, _) => tile!(4, 1),
                (2, true, _) => tile!(4, 2),
                (3, _, true) => tile!(2, 3),
                (4, _, true) => tile!(2, 4),
                (1, ..) => tile!(1, 1),
                (2, ..) => tile!(1, 2),
                (3, ..) => tile!(1, 3),
                _ => tile!(1, 4),
            };
        }
        i += g;
    }
}

const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;

/// 16 weights (element `c` of the row at `p`) as f32; lanes beyond `mask` are 0.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn load16<const KIND: u8>(p: *const u8, c: usize, mask: __mmask16) -> __m512 {
    if KIND == F32 {
        let p = (p as *const f32).add(c);
        return if mask == 0xFFFF {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(mask, p)
        };
    }
    let p = (p as *const u16).add(c);
    let h = if mask == 0xFFFF {
        _mm256_loadu_si256(p as *const __m256i)
    } else {
        _mm256_maskz_loadu_epi16(mask, p as *const i16)
    };
    if KIND == BF16 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    } else {
        _mm512_cvtph_ps(h)
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn float_tile<const R: usize, const G: usize, const KIND: u8>(
    w: *const u8,
    cols: usize,
    x: *const f32,
) -> [[f32; G]; R] {
    let row_bytes = if KIND == F32 { 4 * cols } else { 2 * cols };
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    let mut c = 0;
    while c + 16 <= cols {
        let xv: [__m512; G] = std::array::from_fn(|g| _mm512_loadu_ps(x.add(g * cols + c)));
        let esize = row_bytes / cols;
        let ahead = (c * esize).is_multiple_of(64);
        for r in 0..R {
            if ahead {
                prefetch(w.wrapping_add((r + R) * row_bytes + c * esize), 64);
            }
            let wv = load16::<KIND>(w.add(r * row_bytes), c, 0xFFFF);
            for g in 0..G {
                acc[r][g] = _mm512_fmadd_ps(wv, xv[g], acc[r][g]);
            }
        }
        c += 16;
    }
    if c < cols {
        let mask: __mmask16 = ((1u32 << (cols - c)) - 1) as u16;
        let xv: [__m512; G] = std::array::from_fn(|g| _mm512_maskz_loadu_ps(mask, x.add(g * cols + c)));
        for r in 0..R {
            let wv = load16::<KIND>(w.add(r * row_bytes), c, mask);
            for g in 0..G {
                acc[r][g] = _mm512_fmadd_ps(wv, xv[g], acc[r][g]);
            }
        }
    }
    std::array::from_fn(|r| std::array::from_fn(|g| _mm512_reduce_add_ps(acc[r][g])))
}

// The attention kernels' generic code, compiled with this module's features.
super::generic_kernels!("avx512f,avx2,fma,f16c", 16);

super::attention_kernels! {
    features: "avx512f,avx2,fma,f16c", lanes: 16, zero: _mm512_setzero_ps, splat: _mm512_set1_ps,
    load: _mm512_loadu_ps, store: _mm512_storeu_ps, fmadd: _mm512_fmadd_ps, reduce_half: reduce_half,
    combine: combine,
    widen_f16: _mm512_cvtph_ps, f16_bits: __m256i, load_bits: _mm256_loadu_si256, load_i8: load_i8_ps
}

/// The lane sums of 8 vectors, as the first three steps of a transposing tree: quarter `k` of the
/// result holds vector `k`'s two partial sums (lanes 0-1) and vector `k + 4`'s (lanes 2-3).
/// [`combine`] finishes two such halves of a block. Every sum adds its lanes in the same order,
/// `i + 8`, then `i + 4`, `i + 2`, `i + 1` apart.
///
/// # Safety
/// AVX-512 F must be available.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn reduce_half(v: [__m512; 8]) -> __m512 {
    // 256-bit halves: vector `2k`'s 8 sums of lanes `i, i + 8` in lanes 0-7, `2k + 1`'s in 8-15.
    let s = [0, 1, 2, 3].map(|k| {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b))
    });
    // 128-bit quarters: quarter `k` of `u[m]` holds vector `4m + k`'s 4 sums.
    let u = [0, 1].map(|m| {
        let (a, b) = (s[2 * m], s[2 * m + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b))
    });
    _mm512_add_ps(
        _mm512_shuffle_ps::<0x44>(u[0], u[1]),
        _mm512_shuffle_ps::<0xEE>(u[0], u[1]),
    )
}

/// The lane sums of a block's 16 vectors from its two [`reduce_half`]s, vector `p`'s in lane `p`.
///
/// # Safety
/// AVX-512 F must be available.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn combine(x: [__m512; 2]) -> __m512 {
    // Quarter `k` holds the sums of vectors `k, k + 4, k + 8, k + 12`: transposed back.
    let z = _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(x[0], x[1]),
        _mm512_shuffle_ps::<0xDD>(x[0], x[1]),
    );
    _mm512_permutexvar_ps(
        _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),
        z,
    )
}

/// 16 signed bytes from `p` as f32 lanes (an i8 cache row's values).
///
/// # Safety
/// AVX-512 F must be available and `p` valid for 16 bytes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_i8_ps(p: *const i8) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
}
