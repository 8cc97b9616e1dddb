//! AVX2 + FMA + F16C kernels (Haswell / Zen and later). Every function here is `unsafe` because it
//! must only run after `is_x86_feature_detected!` confirmed the features (see `crate::isa`).
//!
//! Dequantization rounds exactly like the scalar code (separate mul and sub, no FMA contraction), so
//! SIMD and scalar dequantization are bit-identical.

use std::arch::x86_64::*;

use crate::format::{Format, QK8_0, QK_K, Q4K_BYTES, Q8_0_BYTES};
use crate::quant::scale_min_k4;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_bits_to_f32(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([*p, *p.add(1)]))
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
                _mm256_storeu_ps(d.add(k), _mm256_cvtph_ps(_mm_loadu_si128(s.add(2 * k) as *const __m128i)));
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
            for b in 0..n / QK8_0 {
                let blk = s.add(b * Q8_0_BYTES);
                let scale = _mm256_set1_ps(f16_at(blk));
                let out = d.add(b * QK8_0);
                for j in 0..4 {
                    let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(2 + 8 * j) as *const __m128i));
                    _mm256_storeu_ps(out.add(8 * j), _mm256_mul_ps(_mm256_cvtepi32_ps(q), scale));
                }
            }
        }
        Format::Q4K => {
            for b in 0..n / QK_K {
                decode_q4k_block(s.add(b * Q4K_BYTES), d.add(b * QK_K));
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_q4k_block(blk: *const u8, out: *mut f32) {
    let d = f16_at(blk);
    let dmin = f16_at(blk.add(2));
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
