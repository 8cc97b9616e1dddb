//! AVX2 + FMA + F16C kernels (Haswell / Zen and later). Every function here is `unsafe` because it
//! must only run after `is_x86_feature_detected!` confirmed the features (see `crate::isa`).
//!
//! Dequantization rounds exactly like the scalar code (separate mul and sub, no FMA contraction), so
//! SIMD and scalar dequantization are bit-identical.

use std::arch::x86_64::*;

use super::prefetch;
use crate::format::{Format, Q4K_BYTES, Q8_0R16_GROUP_BYTES, Q8_0_BYTES, QK8_0, QK_K, R16};
use crate::quant::{scale_min_k4, QuantizedActs};

/// Converts the two little-endian f16 values at `p` (q4_k's `d` and `dmin`). Both lanes are used, so
/// the compiler keeps the zero-extending 32-bit load; a 16-bit load compiles to `vpinsrw`, which merges
/// into the previous register value and chains every block's conversion to the last one.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16_pair_at(p: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_loadu_si32(p));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32()
}

/// Dequantizes whole rows: `src` holds `dst.len()` elements in `format`'s layout.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `src` must hold at least `format.bytes_for(1, dst.len())` bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn decode(format: Format, src: &[u8], dst: &mut [f32]) {
    debug_assert!(src.len() >= format.bytes_for(1, dst.len()));
    let n = dst.len();
    let s = src.as_ptr();
    let d = dst.as_mut_ptr();
    match format {
        Format::F32 => std::ptr::copy_nonoverlapping(s, d as *mut u8, 4 * n),
        Format::F16 => {
            let mut k = 0;
            while k + 8 <= n {
                _mm256_storeu_ps(
                    d.add(k),
                    _mm256_cvtph_ps(_mm_loadu_si128(s.add(2 * k) as *const __m128i)),
                );
                k += 8;
            }
            while k < n {
                *d.add(k) = f16_at(s.add(2 * k));
                k += 1;
            }
        }
        Format::Bf16 => {
            let mut k = 0;
            while k + 8 <= n {
                // bf16 is the upper half of an f32: widen to 32 bits and shift into place.
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(s.add(2 * k) as *const __m128i));
                _mm256_storeu_ps(d.add(k), _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h)));
                k += 8;
            }
            while k < n {
                *d.add(k) = f32::from_bits((u16::from_le_bytes([*s.add(2 * k), *s.add(2 * k + 1)]) as u32) << 16);
                k += 1;
            }
        }
        Format::Q8_0 => {
            // Scales are converted eight blocks at a time: converting them one by one compiles to a
            // `vpinsrw` chain that serialises all blocks of the row.
            let nb = n / QK8_0;
            let mut b = 0;
            while b < nb {
                let g = (nb - b).min(8);
                let mut bits = [0u16; 8];
                for (j, v) in bits.iter_mut().enumerate().take(g) {
                    *v = std::ptr::read_unaligned(s.add((b + j) * Q8_0_BYTES) as *const u16);
                }
                let mut scales = [0f32; 8];
                _mm256_storeu_ps(
                    scales.as_mut_ptr(),
                    _mm256_cvtph_ps(_mm_loadu_si128(bits.as_ptr() as *const __m128i)),
                );
                for (j, &scale) in scales.iter().enumerate().take(g) {
                    let blk = s.add((b + j) * Q8_0_BYTES + 2);
                    let out = d.add((b + j) * QK8_0);
                    let scale = _mm256_set1_ps(scale);
                    for k in 0..4 {
                        let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(8 * k) as *const __m128i));
                        _mm256_storeu_ps(out.add(8 * k), _mm256_mul_ps(_mm256_cvtepi32_ps(q), scale));
                    }
                }
                b += g;
            }
        }
        Format::Q4K => {
            for b in 0..n / QK_K {
                decode_q4k_block(s.add(b * Q4K_BYTES), d.add(b * QK_K));
            }
        }
        Format::Q8_0R16 => unreachable!("q8_0_r16 is decoded group by group (PackedMatrix::dequantize_rows)"),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_q4k_block(blk: *const u8, out: *mut f32) {
    let (d, dmin) = f16_pair_at(blk);
    let scales = std::slice::from_raw_parts(blk.add(4), 12);
    let qs = blk.add(16);
    let low4 = _mm256_set1_epi32(0xF);
    for c in 0..4 {
        // 32 bytes of qs hold sub-block 2c in the low nibbles and sub-block 2c+1 in the high nibbles.
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let d1 = _mm256_set1_ps(d * sc1 as f32);
        let m1 = _mm256_set1_ps(dmin * m1 as f32);
        let d2 = _mm256_set1_ps(d * sc2 as f32);
        let m2 = _mm256_set1_ps(dmin * m2 as f32);
        let out = out.add(64 * c);
        for p in 0..4 {
            let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.add(32 * c + 8 * p) as *const __m128i));
            let lo = _mm256_cvtepi32_ps(_mm256_and_si256(q, low4));
            let hi = _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(q));
            _mm256_storeu_ps(out.add(8 * p), _mm256_sub_ps(_mm256_mul_ps(d1, lo), m1));
            _mm256_storeu_ps(out.add(32 + 8 * p), _mm256_sub_ps(_mm256_mul_ps(d2, hi), m2));
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// `G` activation rows against one weight row with `U` accumulators per activation row: the weight
/// vector is loaded once and reused for all `G` rows, and `G * U` independent FMA chains hide the FMA
/// latency (G * U + 2 <= 16 registers).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_group<const G: usize, const U: usize>(w: &[f32], x: *const f32, stride: usize, out: &mut [f32]) {
    let n = w.len();
    let wp = w.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); U]; G];
    let mut k = 0;
    while k + 8 * U <= n {
        for u in 0..U {
            let wv = _mm256_loadu_ps(wp.add(k + 8 * u));
            for (g, a) in acc.iter_mut().enumerate() {
                a[u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(g * stride + k + 8 * u)), a[u]);
            }
        }
        k += 8 * U;
    }
    while k + 8 <= n {
        let wv = _mm256_loadu_ps(wp.add(k));
        for (g, a) in acc.iter_mut().enumerate() {
            a[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(g * stride + k)), a[0]);
        }
        k += 8;
    }
    for (g, a) in acc.iter().enumerate() {
        let mut v = a[0];
        for au in &a[1..] {
            v = _mm256_add_ps(v, *au);
        }
        let mut s = hsum(v);
        for kk in k..n {
            s += *wp.add(kk) * *x.add(g * stride + kk);
        }
        out[g] = s;
    }
}

/// `out[i] = w · x[i*stride .. i*stride + w.len()]` for `i < out.len()`.
///
/// # Safety
/// AVX2 and FMA must be available; `x` must hold `(out.len() - 1) * stride + w.len()` elements.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_multi(w: &[f32], x: &[f32], stride: usize, out: &mut [f32]) {
    let m = out.len();
    assert!(m == 0 || x.len() >= (m - 1) * stride + w.len());
    let mut i = 0;
    while i < m {
        let xp = x.as_ptr().add(i * stride);
        let o = &mut out[i..];
        match m - i {
            1 => dot_group::<1, 4>(w, xp, stride, o),
            2 => dot_group::<2, 2>(w, xp, stride, o),
            3 => dot_group::<3, 2>(w, xp, stride, o),
            _ => dot_group::<4, 2>(w, xp, stride, o),
        }
        i += 4;
    }
}

/// q8_0 row against `G` quantized activation rows, per block: `Σ_b scale_b · Σ_{32} qw·qx` with `maddubs` (u8 × i8 pairs
/// into i16) and `madd` (pairs into i32). Two accumulators per row (even/odd blocks) keep two FMA
/// chains in flight when G is small.
///
/// `maddubs` needs one unsigned operand, so the weight's sign is moved onto the activation
/// (|w| · sign(x, w)); |w| ≤ 128 and |x| ≤ 127 cannot saturate the i16 pair sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_group<const G: usize>(w: *const u8, nb: usize, acts: &QuantizedActs, first: usize) -> [f32; G] {
    let ones = _mm256_set1_epi16(1);
    // Two accumulator sets, for even and odd blocks; indexed statically so they stay in registers.
    let mut acc0 = [_mm256_setzero_ps(); G];
    let mut acc1 = [_mm256_setzero_ps(); G];
    let xq: [*const i8; G] = std::array::from_fn(|g| acts.q.as_ptr().add((first + g) * acts.cols));
    let xd: [*const f32; G] = std::array::from_fn(|g| acts.d.as_ptr().add((first + g) * acts.stride));
    let mut b = 0;
    while b < nb {
        // Eight blocks' scales at once (see `decode`), multiplied by the activation blocks' scales
        // (`acts.d` rows are padded to a multiple of 8, so the 8-wide load stays in bounds).
        let n8 = (nb - b).min(8);
        // The same blocks of the next row (see `prefetch`).
        prefetch(w.wrapping_add((nb + b) * Q8_0_BYTES), 8 * Q8_0_BYTES);
        let dw = q8_0_scales8(w.add(b * Q8_0_BYTES), n8);
        let mut scales = [[0f32; 8]; G];
        for g in 0..G {
            _mm256_storeu_ps(scales[g].as_mut_ptr(), _mm256_mul_ps(dw, _mm256_loadu_ps(xd[g].add(b))));
        }
        macro_rules! block {
            ($j:expr, $acc:ident) => {{
                let blk = b + $j;
                let wv = _mm256_loadu_si256(w.add(blk * Q8_0_BYTES + 2) as *const __m256i);
                let aw = _mm256_sign_epi8(wv, wv);
                for g in 0..G {
                    let xv = _mm256_loadu_si256(xq[g].add(blk * QK8_0) as *const __m256i);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)), ones);
                    $acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scales[g][$j]), $acc[g]);
                }
            }};
        }
        let mut j = 0;
        while j + 2 <= n8 {
            block!(j, acc0);
            block!(j + 1, acc1);
            j += 2;
        }
        if j < n8 {
            block!(j, acc0);
        }
        b += n8;
    }
    std::array::from_fn(|g| hsum(_mm256_add_ps(acc0[g], acc1[g])))
}

/// The f16 scales of `n ≤ 8` consecutive q8_0 blocks at `w` as f32 (zero beyond `n`). They are packed
/// in general-purpose registers: storing them to a stack array and loading that as one vector stalls
/// on store forwarding.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q8_0_scales8(w: *const u8, n: usize) -> __m256 {
    let bits = |j: usize| -> u64 {
        if j < n {
            std::ptr::read_unaligned(w.add(j * Q8_0_BYTES) as *const u16) as u64
        } else {
            0
        }
    };
    let lo = bits(0) | bits(1) << 16 | bits(2) << 32 | bits(3) << 48;
    let hi = bits(4) | bits(5) << 16 | bits(6) << 32 | bits(7) << 48;
    _mm256_cvtph_ps(_mm_set_epi64x(hi as i64, lo as i64))
}

/// ggml's q4_k scale unpacking: the 12 packed bytes → (8 six-bit scales, 8 six-bit mins) as bytes.
#[inline]
pub(crate) unsafe fn q4k_scales_mins(p: *const u8) -> (u64, u64) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let u0 = std::ptr::read_unaligned(p as *const u32);
    let u1 = std::ptr::read_unaligned(p.add(4) as *const u32);
    let u2 = std::ptr::read_unaligned(p.add(8) as *const u32);
    let scales_lo = u0 & KMASK1;
    let scales_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let mins_lo = u1 & KMASK1;
    let mins_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    (
        scales_lo as u64 | (scales_hi as u64) << 32,
        mins_lo as u64 | (mins_hi as u64) << 32,
    )
}

/// q4_k row against `G` quantized activation rows. Nibbles are already unsigned, so `maddubs` takes
/// them directly. The min term uses the exact activation block sums: `- (dmin·m_j) · Σx_j`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_group<const G: usize>(w: *const u8, nsb: usize, acts: &QuantizedActs, first: usize) -> [f32; G] {
    let ones = _mm256_set1_epi16(1);
    let low4 = _mm256_set1_epi8(0x0F);
    let mut acc = [[_mm256_setzero_ps(); 2]; G];
    let xq: [*const i8; G] = std::array::from_fn(|g| acts.q.as_ptr().add((first + g) * acts.cols));
    let xd: [*const f32; G] = std::array::from_fn(|g| acts.d.as_ptr().add((first + g) * acts.stride));
    let xs: [*const f32; G] = std::array::from_fn(|g| acts.sum.as_ptr().add((first + g) * acts.stride));
    for sb in 0..nsb {
        prefetch(w.wrapping_add((nsb + sb) * Q4K_BYTES), Q4K_BYTES);
        let blk = w.add(sb * Q4K_BYTES);
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
        let mut scales = [[0f32; 8]; G];
        for g in 0..G {
            _mm256_storeu_ps(
                scales[g].as_mut_ptr(),
                _mm256_mul_ps(dsc, _mm256_loadu_ps(xd[g].add(8 * sb))),
            );
            acc[g][1] = _mm256_fnmadd_ps(dmn, _mm256_loadu_ps(xs[g].add(8 * sb)), acc[g][1]);
        }
        for c in 0..4 {
            let q = _mm256_loadu_si256(blk.add(16 + 32 * c) as *const __m256i);
            let lo = _mm256_and_si256(q, low4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
            for g in 0..G {
                let x = xq[g].add(sb * QK_K + 64 * c);
                let x0 = _mm256_loadu_si256(x as *const __m256i);
                let x1 = _mm256_loadu_si256(x.add(32) as *const __m256i);
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), ones);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), ones);
                acc[g][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(scales[g][2 * c]), acc[g][0]);
                acc[g][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(scales[g][2 * c + 1]), acc[g][1]);
            }
        }
    }
    std::array::from_fn(|g| hsum(_mm256_add_ps(acc[g][0], acc[g][1])))
}

/// One whole group of 16 q8_0_r16 rows (`nb` block columns at `group`) as plain q8_0 rows at `plain`:
/// what [`crate::quant::deinterleave_r16`] does, with the 4-byte pieces moved by an 8x8 transpose of
/// 32-bit lanes per 8 rows and block (16 loads, 48 shuffles, 16 stores) instead of one by one.
///
/// # Safety
/// AVX2 must be available; `group` must hold `nb` block columns (`nb · 544` bytes) and `plain` must
/// have room for 16 rows of `nb` q8_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn deinterleave_r16_group(group: *const u8, nb: usize, plain: *mut u8) {
    for b in 0..nb {
        let blk = group.add(b * Q8_0R16_GROUP_BYTES);
        for half in 0..2 {
            // i[c]: quants 4c..4c+4 of rows 8·half .. 8·half + 8, one row per 32-bit lane.
            let i: [__m256i; 8] =
                std::array::from_fn(|c| _mm256_loadu_si256(blk.add(2 * R16 + 64 * c + 32 * half) as *const __m256i));
            let t: [__m256i; 8] = std::array::from_fn(|k| {
                let (a, b) = (i[2 * (k / 2)], i[2 * (k / 2) + 1]);
                if k % 2 == 0 {
                    _mm256_unpacklo_epi32(a, b)
                } else {
                    _mm256_unpackhi_epi32(a, b)
                }
            });
            // u[k]: lanes k of chunks 0-3 (low half: rows 0-3 of this half; high: rows 4-7), then of 4-7.
            let u = [
                _mm256_unpacklo_epi64(t[0], t[2]),
                _mm256_unpackhi_epi64(t[0], t[2]),
                _mm256_unpacklo_epi64(t[1], t[3]),
                _mm256_unpackhi_epi64(t[1], t[3]),
                _mm256_unpacklo_epi64(t[4], t[6]),
                _mm256_unpackhi_epi64(t[4], t[6]),
                _mm256_unpacklo_epi64(t[5], t[7]),
                _mm256_unpackhi_epi64(t[5], t[7]),
            ];
            for r in 0..8 {
                let (lo, hi) = (u[r % 4], u[r % 4 + 4]);
                let row = if r < 4 {
                    _mm256_permute2x128_si256::<0x20>(lo, hi)
                } else {
                    _mm256_permute2x128_si256::<0x31>(lo, hi)
                };
                let out = plain.add(((8 * half + r) * nb + b) * Q8_0_BYTES);
                std::ptr::copy_nonoverlapping(blk.add(2 * (8 * half + r)), out, 2);
                _mm256_storeu_si256(out.add(2) as *mut __m256i, row);
            }
        }
    }
}

/// q8_0_r16 product of `nrows` weight rows (whole groups of 16) with all `m` quantized activation rows:
/// `y[i * y_stride + k]` for `i < m`, `k < nrows`. As the AVX-512 kernel (`simd::avx512`), with two
/// 256-bit halves of 8 rows per 64-byte chunk and `maddubs` in place of `vpdpbusd`: the weight's sign
/// moves onto the broadcast activation bytes (`sign`), `|w| · ±x` pairs are summed to i16 (at most
/// 2 · 127 · 127, no saturation) and then to one i32 per row (`madd` by ones).
///
/// # Safety
/// AVX2, FMA and F16C must be available; `w` must hold `nrows` rows of `acts.cols` values, `acts` at
/// least `m` rows, and `y` must be valid for the writes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemv_q8_0_r16(
    w: &[u8],
    nrows: usize,
    acts: &QuantizedActs,
    m: usize,
    y: *mut f32,
    y_stride: usize,
) {
    let nb = acts.cols / QK8_0;
    super::for_each_r16_tile(w, nrows, acts, m, y, y_stride, |group, i, out| match m - i {
        1 => r16_tile::<1>(group, nb, acts, i, out, y_stride),
        2 | 3 => r16_tile::<2>(group, nb, acts, i, out, y_stride),
        4..=7 => r16_tile::<4>(group, nb, acts, i, out, y_stride),
        _ => r16_tile::<8>(group, nb, acts, i, out, y_stride),
    });
}

/// One group of 16 q8_0_r16 rows against activation rows `first..first + G` (see
/// [`gemv_q8_0_r16`]). Returns `G`.
///
/// Each block is taken in its two 8-row halves, one after the other, so that a half's `G` integer
/// sums are all the registers the inner loop keeps (up to 8 activation rows in one pass over the
/// weights); the float sums are folded in once per half-block and may live in memory.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // registers indexed by activation row and 8-row half
unsafe fn r16_tile<const G: usize>(
    w: *const u8,
    nb: usize,
    acts: &QuantizedActs,
    first: usize,
    y: *mut f32,
    y_stride: usize,
) -> usize {
    let ones = _mm256_set1_epi16(1);
    let xq = acts.q.as_ptr().add(first * acts.cols);
    let xd = acts.d.as_ptr().add(first * acts.stride);
    let mut acc = [[_mm256_setzero_ps(); 2]; G];
    for b in 0..nb {
        let blk = w.add(b * Q8_0R16_GROUP_BYTES);
        prefetch(blk.wrapping_add(super::R16_PREFETCH_AHEAD_AVX2), Q8_0R16_GROUP_BYTES);
        for h in 0..2 {
            let mut dot = [_mm256_setzero_si256(); G];
            for c in 0..QK8_0 / 4 {
                let wv = _mm256_loadu_si256(blk.add(2 * R16 + 64 * c + 32 * h) as *const __m256i);
                let magnitude = _mm256_sign_epi8(wv, wv);
                for g in 0..G {
                    let x =
                        _mm256_set1_epi32((xq.add(g * acts.cols + b * QK8_0 + 4 * c) as *const i32).read_unaligned());
                    let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, wv));
                    dot[g] = _mm256_add_epi32(dot[g], _mm256_madd_epi16(pairs, ones));
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h) as *const __m128i));
            for g in 0..G {
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*xd.add(g * acts.stride + b)));
                acc[g][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[g]), scale, acc[g][h]);
            }
        }
    }
    for (g, acc) in acc.iter().enumerate() {
        _mm256_storeu_ps(y.add(g * y_stride), acc[0]);
        _mm256_storeu_ps(y.add(g * y_stride + 8), acc[1]);
    }
    G
}

/// q8_0 / q4_k product of `nrows` consecutive weight rows (`w`) with all `m` quantized activation rows:
/// `y[i * y_stride + k]` for `i < m`, `k < nrows`. One call per task, so the per-row work is only the
/// kernel itself.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `w` must hold `nrows` rows of `acts.cols` values in `format`,
/// `acts` at least `m` rows, and `y` must be valid for the writes.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
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
    for k in 0..nrows {
        let wr = w.as_ptr().add(k * row_bytes);
        let mut i = 0;
        while i < m {
            macro_rules! run {
                ($g:literal) => {{
                    let r = match format {
                        Format::Q8_0 => q8_0_group::<$g>(wr, nblocks, acts, i),
                        _ => q4k_group::<$g>(wr, nblocks, acts, i),
                    };
                    for (g, v) in r.into_iter().enumerate() {
                        *y.add((i + g) * y_stride + k) = v;
                    }
                    $g
                }};
            }
            i += match m - i {
                1 => run!(1),
                2 => run!(2),
                3 => run!(3),
                _ => run!(4),
            };
        }
    }
}

// The attention kernels' generic code, compiled with this module's features.
super::generic_kernels!("avx2,fma,f16c", 8);

super::attention_kernels! {
    features: "avx2,fma,f16c", lanes: 8, zero: _mm256_setzero_ps, splat: _mm256_set1_ps,
    load: _mm256_loadu_ps, store: _mm256_storeu_ps, fmadd: _mm256_fmadd_ps, reduce_half: reduce_half,
    combine: combine,
    widen_f16: _mm256_cvtph_ps, f16_bits: __m128i, load_bits: _mm_loadu_si128, load_i8: load_i8_ps
}

/// The lane sums of 4 vectors, as the first two steps of a transposing tree: half `k` of the result
/// holds vector `k`'s two partial sums (lanes 0-1) and vector `k + 2`'s (lanes 2-3). [`combine`]
/// finishes two such halves of a block. Every sum adds its lanes in the same order, `i + 4`, then
/// `i + 2`, `i + 1` apart.
///
/// # Safety
/// AVX2 must be available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn reduce_half(v: [__m256; 4]) -> __m256 {
    // 128-bit halves: vector `2k`'s 4 sums of lanes `i, i + 4` in lanes 0-3, `2k + 1`'s in 4-7.
    let s = [0, 1].map(|k| {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        )
    });
    _mm256_add_ps(
        _mm256_shuffle_ps::<0x44>(s[0], s[1]),
        _mm256_shuffle_ps::<0xEE>(s[0], s[1]),
    )
}

/// The lane sums of a block's 8 vectors from its two [`reduce_half`]s, vector `p`'s in lane `p`.
///
/// # Safety
/// AVX2 must be available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn combine(x: [__m256; 2]) -> __m256 {
    // Half `k` holds the sums of vectors `k, k + 2, k + 4, k + 6`: transposed back.
    let z = _mm256_add_ps(
        _mm256_shuffle_ps::<0x88>(x[0], x[1]),
        _mm256_shuffle_ps::<0xDD>(x[0], x[1]),
    );
    _mm256_permutevar8x32_ps(z, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// 8 signed bytes from `p` as f32 lanes (an i8 cache row's values).
///
/// # Safety
/// AVX2 must be available and `p` valid for 8 bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_i8_ps(p: *const i8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
}
