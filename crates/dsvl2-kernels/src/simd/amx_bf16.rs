//! q8_0_r16 products of many activation rows (the vision tower, prompts) on AMX-BF16.
//!
//! Why: the AMX-INT8 kernel (`simd::amx`) multiplies one block of 32 values per tile product, because
//! every q8_0 block has its own scale: each 16 x 16 result goes through memory and 16 vector FMAs,
//! several times the tile product's own time (perf: it was half of the vision tower's time, at ~1.05
//! of the f32 FMA peak, far from the tile unit's). Here each task first widens its rows' weights to
//! bf16 (scale applied) in the tiles' layout, once per product; the activations are rounded to bf16
//! once per product; then `tdpbf16ps` accumulates whole rows in f32 tiles, with no step per block.
//!
//! Layout of a task's bf16 panel, per group of 16 weight rows and per 32 columns `kk`: the `B` tile
//! of `tdpbf16ps`, 16 rows of 64 bytes, row `p` holding for each weight row `n` the pair of values
//! (column `32kk + 2p`, `32kk + 2p + 1`). A q8_0_r16 chunk (4 quants of each of the 16 rows) gives two
//! such tile rows.
//!
//! Rounding: a q8_0 weight (i8 times an f16 scale) and an f32 activation are rounded to bf16 (8
//! significant bits, relative error <= 2^-8), the products summed in f32. The AMX-INT8 kernel's 8-bit
//! activations err by up to 1/254 of their block's largest value, more relative to the smaller ones.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

use crate::format::{Q8_0R16_GROUP_BYTES, QK8_0, R16};

/// Fewest activation rows a product takes through this kernel. Converting a weight into the panel
/// costs about what ~100 activation rows' tile products do, which the AMX-INT8 kernel does not pay:
/// `kernel_bench gemm` (Emerald Rapids, 2 vCPU, two rounds, noisy) 1280 -> 896 at 64 rows: 600-654
/// GFLOP/s here, 1010-1062 there; at 3645 x 1152 -> 4304 (the vision tower's fc1) 1630-1688 against
/// 703-776. In a prompt (tiny, 1039 tokens: routed experts get ~100 rows each) a threshold of 64, 128
/// or 256 measured the same (prefill 1.66-1.70 s, two rounds).
pub(crate) const MIN_ROWS: usize = 128;

/// Activation rows per step: two `A` tiles.
const ROWS: usize = 32;

/// Whether this CPU and OS run AMX-BF16 (besides AMX-INT8, whose check covers the tile state).
pub(crate) fn available() -> bool {
    let leaf7 = __cpuid_count(7, 0);
    leaf7.edx & (1 << 22) != 0 && super::amx::available()
}

/// Tiles 0-3 hold 16 x 16 f32 sums, 4-5 activation rows, 6-7 weight pairs: all 16 rows of 64 bytes.
///
/// # Safety
/// AMX must be [`available`].
unsafe fn load_config() {
    super::amx::configure_tiles(&[(16, 64); 8]);
}

/// `f32` lanes rounded to bf16 (to nearest, ties to even), in the low 16 bits of each lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn bf16_bits(x: __m512) -> __m512i {
    let bits = _mm512_castps_si512(x);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    _mm512_srli_epi32::<16>(rounded)
}

/// `src` rounded to bf16 into `dst` (activation rows for [`gemm_q8_0_r16`], whose padding rows past
/// `m` the caller leaves zero).
///
/// # Safety
/// AVX-512 F/BW must be available.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn round_to_bf16(src: &[f32], dst: &mut [u16]) {
    let (chunks, tail) = src.as_chunks::<16>();
    let (out, out_tail) = dst.as_chunks_mut::<16>();
    for (d, s) in out.iter_mut().zip(chunks) {
        let v = bf16_bits(_mm512_loadu_ps(s.as_ptr()));
        _mm256_storeu_si256(d.as_mut_ptr() as *mut __m256i, _mm512_cvtepi32_epi16(v));
    }
    for (d, &s) in out_tail.iter_mut().zip(tail) {
        *d = half::bf16::from_f32(s).to_bits();
    }
}

/// Rows of activations [`gemm_q8_0_r16`] takes at once: `m` rounded up to them.
pub(crate) fn padded_rows(m: usize) -> usize {
    m.next_multiple_of(ROWS)
}

/// The bf16 panel (see the module docs) of the `groups` groups of 16 q8_0_r16 rows in `w`, `k`
/// columns each, into `out` (`groups · 16 · k` values).
///
/// # Safety
/// AVX-512 F/BW and F16C must be available; `w` must hold the groups.
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn pack_panel(w: &[u8], groups: usize, k: usize, out: &mut [u16]) {
    let blocks = k / QK8_0;
    debug_assert!(w.len() >= groups * blocks * Q8_0R16_GROUP_BYTES && out.len() >= groups * R16 * k);
    let mut dst = out.as_mut_ptr() as *mut __m512i;
    for g in 0..groups {
        for b in 0..blocks {
            let blk = w.as_ptr().add((g * blocks + b) * Q8_0R16_GROUP_BYTES);
            let scales = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
            for c in 0..QK8_0 / 4 {
                // Lane n: row n's quants 4c..4c + 4.
                let quads = _mm512_loadu_si512(blk.add(2 * R16 + 64 * c) as *const __m512i);
                let value = |byte: u32| {
                    let shifted = _mm512_sllv_epi32(quads, _mm512_set1_epi32(24 - 8 * byte as i32));
                    bf16_bits(_mm512_mul_ps(
                        _mm512_cvtepi32_ps(_mm512_srai_epi32::<24>(shifted)),
                        scales,
                    ))
                };
                let pair = |lo: __m512i, hi: __m512i| _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
                _mm512_storeu_si512(dst, pair(value(0), value(1)));
                _mm512_storeu_si512(dst.add(1), pair(value(2), value(3)));
                dst = dst.add(2);
            }
        }
    }
}

thread_local! {
    /// A task's bf16 panel, kept per thread so repeated products do not page-fault fresh memory.
    static PANEL: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// `y[i · y_stride + r]` for the `m` activation rows (`acts`: rounded by [`round_to_bf16`], `k` per
/// row, zero rows up to [`padded_rows`]) and the `nrows` weight rows of `w` (q8_0_r16 groups of `k`
/// columns).
///
/// # Safety
/// AMX-BF16 must be [`available`] and AVX-512 F/BW and F16C detected; `w` must hold the `nrows / 16`
/// groups, `acts` the padded rows, and `y` must be valid for `m` rows of `y_stride` values.
#[target_feature(enable = "avx512f,avx512bw,f16c")]
pub(crate) unsafe fn gemm_q8_0_r16(
    w: &[u8],
    nrows: usize,
    k: usize,
    acts: &[u16],
    m: usize,
    y: *mut f32,
    y_stride: usize,
) {
    let groups = nrows / R16;
    debug_assert!(nrows.is_multiple_of(R16) && acts.len() >= m.next_multiple_of(ROWS) * k);
    PANEL.with_borrow_mut(|panel| {
        panel.resize(groups * R16 * k, 0);
        pack_panel(w, groups, k, panel);
        load_config();
        let group_len = R16 * k;
        let mut sums = [0f32; ROWS * 2 * R16];
        for i in (0..m).step_by(ROWS) {
            let a = acts.as_ptr().add(i * k);
            let mut g = 0;
            while g < groups {
                let pair = g + 1 < groups;
                let b0 = panel.as_ptr().add(g * group_len);
                let b1 = if pair {
                    panel.as_ptr().add((g + 1) * group_len)
                } else {
                    b0
                };
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for kk in (0..k).step_by(32) {
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa} * 1]",
                        "tileloadd tmm5, [{a1} + {sa} * 1]",
                        "tileloadd tmm6, [{b0} + {sb} * 1]",
                        "tileloadd tmm7, [{b1} + {sb} * 1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a.add(kk),
                        a1 = in(reg) a.add(16 * k + kk),
                        sa = in(reg) 2 * k,
                        b0 = in(reg) b0.add(kk * R16),
                        b1 = in(reg) b1.add(kk * R16),
                        sb = in(reg) 64usize,
                        options(nostack, readonly),
                    );
                }
                // Sums of rows i..i + 32 (tiles 0/2: group g, 1/3: group g + 1), 32 columns per row.
                asm!(
                    "tilestored [{s} + {ss} * 1], tmm0",
                    "tilestored [{s1} + {ss} * 1], tmm1",
                    "tilestored [{s2} + {ss} * 1], tmm2",
                    "tilestored [{s3} + {ss} * 1], tmm3",
                    s = in(reg) sums.as_mut_ptr(),
                    s1 = in(reg) sums.as_mut_ptr().add(R16),
                    s2 = in(reg) sums.as_mut_ptr().add(16 * 2 * R16),
                    s3 = in(reg) sums.as_mut_ptr().add(16 * 2 * R16 + R16),
                    ss = in(reg) 2 * R16 * 4,
                    options(nostack),
                );
                let cols = if pair { 2 * R16 } else { R16 };
                for r in 0..ROWS.min(m - i) {
                    let dst = y.add((i + r) * y_stride + g * R16);
                    std::ptr::copy_nonoverlapping(sums.as_ptr().add(r * 2 * R16), dst, cols);
                }
                g += 2;
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    });
}
