//! Architecture-specific kernels, selected at run time by [`crate::isa::Isa`].

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
pub(crate) mod amx_attention;
#[cfg(target_arch = "x86_64")]
pub(crate) mod amx_bf16;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

/// Asks for the cache lines covering `[p, p + len)` to be loaded ahead of use (`prefetcht0`).
///
/// The GEMV kernels read every weight once, from memory. Each task streams several rows at once, and
/// the hardware prefetcher alone left the q8_0 kernel at about half the memory bandwidth: on the
/// 129280x1280 LM head, prefetching the next tile's rows took it from 12.2 to 22.6 GB/s (see the
/// crate README). A prefetch never faults, so addresses past the matrix are harmless; `wrapping_add`
/// keeps forming them defined behaviour.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch(p: *const u8, len: usize) {
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T0 }>(p, len)
}

/// [`prefetch`] into L2 only (`prefetcht1`): the line does not take one of L1's few fill buffers
/// while it comes from memory, so more lines are in flight at once. For the q8_0_r16 GEMV tiles
/// (see [`R16_PREFETCH_AHEAD`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_l2(p: *const u8, len: usize) {
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T1 }>(p, len)
}

/// One `prefetch` with `HINT` per cache line of `[p, p + len)`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_lines<const HINT: i32>(p: *const u8, len: usize) {
    let mut offset = 0;
    while offset < len {
        // SAFETY: prefetching is a hint; it reads nothing architecturally and cannot fault.
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(p.wrapping_add(offset) as *const i8) };
        offset += 64;
    }
}

#[cfg(target_arch = "x86_64")]
/// How far ahead of its reads a q8_0_r16 GEMV tile prefetches into L2: 16 block columns, ~8.5 KiB
/// (two 4 KiB pages: a software prefetch also walks the page tables, which the hardware prefetchers
/// stop at). A group's rows are contiguous, so this runs on into the next group. Tiny's decode
/// weight stream (`kernel_bench -- decode`, three interleaved rounds, Sapphire Rapids 2 vCPU), ms per
/// token against `prefetcht0` 4 block columns ahead: batch 1 24.5-24.8 -> 23.6-24.1, batch 8
/// 38.4-39.9 -> 34.8-35.3 (8 block columns ahead), and 16, 32 or 64 the same as 8 there; no prefetch
/// at all 25.8-26.6 and 50-55, `prefetchnta` worse still. In the whole model reading a mapped GGUF
/// file (4 KiB pages), 16 beat 8: `dsvl2 bench` batch 1, short prompt, 35.8-36.8 -> 37.1-38.2 tok/s
/// (five interleaved pairs, each faster), after the 1039-token image prompt 34.6/35.1 -> 35.8/36.8
/// (two pairs); from 2 MiB pages (`--no-mmap`) 43.5-43.8 -> 44.0-44.6. The AVX2 kernels
/// (`DSVL2_KERNELS=avx2`) measured the same there with `prefetcht0` or `prefetcht1` (two interleaved
/// rounds), but they have their own distance, [`R16_PREFETCH_AHEAD_AVX2`]. AMD's CPUs want a shorter
/// one, see [`r16_prefetch_ahead_avx512`].
pub(crate) const R16_PREFETCH_AHEAD: usize = 16 * crate::format::Q8_0R16_GROUP_BYTES;

/// How far ahead of its reads the AVX-512 q8_0_r16 GEMV tile prefetches into L2 for `m` activation
/// rows: [`R16_PREFETCH_AHEAD`] (tuned on Sapphire Rapids) on Intel's CPUs and for `m` ≥ 4, but 5
/// block columns (~2.7 KiB) for decoding one to three rows (two and three not measured) on AMD's, as
/// the AVX2 tile on Zen 3 ([`R16_PREFETCH_AHEAD_AVX2`]). Zen 4 (EPYC, 2 vCPU), whose bandwidth
/// switches between ~35 and ~55 GB/s for seconds at a time: tiny's decode weight stream at batch 1 in
/// 4 KiB pages (`kernel_bench -- decode`, each token right after one pass of a 1 GiB streaming read,
/// ~200 tokens per distance over five interleaved rounds), mean GB/s of weights beside a slow / fast
/// read: 16 columns
/// ahead 30.5 / 37.0 (48 the same), 8 columns 32.2 / 41.2, 6 columns 32.9 / 45.6, 4 columns 33.4 /
/// 44.8 (32.9 / 44.8 in a second set), 2 or 3 columns ~32.4 / 43.5; `prefetcht0` 4 columns ahead
/// 26-28 / 30-33, no prefetch 27.0 / 31.7. In `dsvl2 bench` (q8_0 GGUF in 2 MiB pages, 1039-token image
/// prompt, f16 cache, three interleaved rounds): batch 1 42.8-46.4 -> 47.4 tokens/s in the slow state
/// and 67-72 in the fast one (which the old distance did not turn into speed); 5 columns for batch 8
/// as well cost 15-20% there (200-209 against 238-251 tokens/s), so batches keep 16.
#[cfg(target_arch = "x86_64")]
pub(crate) fn r16_prefetch_ahead_avx512(m: usize) -> usize {
    static AMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if m < 4 && *AMD.get_or_init(is_amd) {
        5 * crate::format::Q8_0R16_GROUP_BYTES
    } else {
        R16_PREFETCH_AHEAD
    }
}

/// Whether the CPU is AMD's (or Hygon's, the same cores), by the vendor string of `cpuid` leaf 0.
#[cfg(target_arch = "x86_64")]
fn is_amd() -> bool {
    let leaf0 = std::arch::x86_64::__cpuid(0);
    let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    vendor == b"AuthenticAMD" || vendor == b"HygonGenuine"
}

/// How far ahead of its reads the AVX2 q8_0_r16 GEMV tile prefetches (`prefetcht0`): 5 block
/// columns, ~2.7 KiB. The CPUs that run this tile are mostly AMD's without AVX-512 (Zen 2/3), and a
/// Zen 3 wants a much shorter distance than the Sapphire Rapids [`R16_PREFETCH_AHEAD`] was tuned on.
/// Zen 3 (EPYC, 2 vCPU), tiny's decode weight stream (`kernel_bench -- decode`, median ms per token
/// at batch 1 over five interleaved rounds): no prefetch 22.0, `prefetcht1` 16 columns ahead (the
/// AVX-512 tiles' distance) 21.6 and 22.8 (two sets of rounds), 8 columns 21.5, `prefetcht1` 4 or 5
/// columns 20.3/20.7, `prefetcht0` 3 columns 24.2, 4 columns 19.5, 5 columns 19.0 and 20.2; batch 8
/// the same throughout (40-44). In the whole model (`dsvl2 bench`, q8_0 GGUF, 1039-token image
/// prompt, three interleaved pairs against `prefetcht1` 16 columns ahead): batch 1 34.8-38.9 ->
/// 37.1-40.5 tokens/s, each pair faster; vision, prompt and batch 8 within the noise.
#[cfg(target_arch = "x86_64")]
pub(crate) const R16_PREFETCH_AHEAD_AVX2: usize = 5 * crate::format::Q8_0R16_GROUP_BYTES;

/// The loops around the q8_0_r16 GEMV tiles: for each group of 16 weight rows in `w` (`nrows` rows of
/// `acts.cols` values), `tile(group, first, out)` takes activation rows from `first` on (as many as
/// it likes of the `m - first` left, returning how many), writing 16 outputs per activation row at
/// `out + i · y_stride`.
///
/// # Safety
/// `w` must hold the `nrows / 16` groups and `y` must be valid for `m` rows of `y_stride` values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn for_each_r16_tile(
    w: &[u8],
    nrows: usize,
    acts: &crate::quant::QuantizedActs,
    m: usize,
    y: *mut f32,
    y_stride: usize,
    mut tile: impl FnMut(*const u8, usize, *mut f32) -> usize,
) {
    use crate::format::{Q8_0R16_GROUP_BYTES, QK8_0, R16};
    let group_bytes = acts.cols / QK8_0 * Q8_0R16_GROUP_BYTES;
    debug_assert!(nrows.is_multiple_of(R16) && w.len() >= nrows / R16 * group_bytes);
    for g in 0..nrows / R16 {
        let group = w.as_ptr().add(g * group_bytes);
        let mut first = 0;
        while first < m {
            first += tile(group, first, y.add(first * y_stride + g * R16));
        }
    }
}

/// Instantiates the generic (auto-vectorised) kernels of [`crate::attention`] for one instruction set:
/// the same source, compiled with `$features` enabled and `$lanes` f32 lanes per vector. Every such set
/// has FMA, so their `exp` polynomials use fused multiply-adds. Callers must only call them once the
/// features were detected (see [`crate::isa::Isa`]).
#[cfg(target_arch = "x86_64")]
macro_rules! generic_kernels {
    ($features:literal, $lanes:literal) => {
        /// [`crate::attention::attend_positions`] compiled for this module's instruction set, which
        /// includes F16C.
        ///
        /// # Safety
        /// This module's features must be available.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn attend_positions<T: crate::CacheValue>(
            q: &[f32],
            keys: &[T],
            values: &[T],
            scales: Option<crate::attention::RowScales>,
            positions: std::ops::Range<usize>,
            s: &crate::AttentionShape,
        ) -> crate::attention::Partial {
            crate::attention::attend_positions::<$lanes, T, true>(q, keys, values, scales, positions, s, true)
        }

        /// [`crate::attention::attend_positions_shared`] compiled for this module's instruction set.
        ///
        /// # Safety
        /// This module's features must be available.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn attend_positions_shared<T: crate::CacheValue>(
            queries: &[&[f32]],
            keys: &[T],
            values: &[T],
            scales: Option<crate::attention::RowScales>,
            positions: std::ops::Range<usize>,
            s: &crate::AttentionShape,
        ) -> Vec<crate::attention::Partial> {
            crate::attention::attend_positions_shared::<$lanes, T>(queries, keys, values, scales, positions, s)
        }

        /// [`crate::attention::softmax_rows`] compiled for this module's instruction set.
        ///
        /// # Safety
        /// This module's features must be available.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn softmax_rows(
            scores: &mut [f32],
            cols: usize,
            causal_past: Option<usize>,
            sums: &mut [f32],
        ) {
            crate::attention::softmax_rows::<true>(scores, cols, causal_past, sums)
        }

        /// [`crate::quant::quantize_act_row`] compiled for this module's instruction set.
        ///
        /// # Safety
        /// This module's features must be available.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn quantize_act_row(
            x: &[f32],
            q: &mut [i8],
            d: &mut [f32],
            sum: &mut [f32],
            bias_sum: &mut [i32],
        ) {
            crate::quant::quantize_act_row(x, q, d, sum, bias_sum)
        }

        /// [`crate::math::bias_activation`] compiled for this module's instruction set.
        ///
        /// # Safety
        /// This module's features must be available.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn bias_activation(y: &mut [f32], bias: Option<&[f32]>, gelu_tanh: bool) {
            crate::math::bias_activation::<true>(y, bias, gelu_tanh)
        }

        /// [`crate::math::silu_mul`] compiled for this module's instruction set.
        ///
        /// # Safety
        /// This module's features must be available.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
            crate::math::silu_mul::<true>(gate, up, out)
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use generic_kernels;

/// Instantiates decode attention's explicit kernels for one instruction set. They work on blocks of
/// `$lanes` positions of one key or value head, cache rows of f32, f16 or i8 read in place (f16
/// widened in registers by `$widen`, i8 by `$load_i8`), or from an f32 copy (`widen_*`) when enough
/// readers share the block to repay it:
/// - `dot_block_*` give the `$lanes` scores of one query: one chain of fused multiply-adds per
///   position, then `$reduce_half` and `$combine` sum the accumulators' lanes as a transposing tree
///   (about 3 shuffles or adds per position) instead of one horizontal sum per position (8 on
///   AVX-512);
/// - `axpy_block_*` add a block's weighted values to a head's output, 8 vectors of it held in
///   registers over the block's positions (one load and store per block, not per position).
///
/// A position's arithmetic is the same in every variant (widening is exact), so a query's result
/// does not depend on the other queries of a call.
/// Written with intrinsics: LLVM vectorised generic loops with stack spills and scalar adds
/// (AVX-512) or 2-lane loads (AVX2), per `perf annotate`. The other arguments name the intrinsics for
/// vectors of `$lanes` f32.
#[cfg(target_arch = "x86_64")]
macro_rules! attention_kernels {
    (
        features: $features:literal, lanes: $lanes:literal, zero: $zero:ident, splat: $splat:ident,
        load: $load:ident, store: $store:ident, fmadd: $fmadd:ident, reduce_half: $reduce_half:ident,
        combine: $combine:ident, widen_f16: $widen:ident, f16_bits: $bits:ty, load_bits: $load_bits:ident, load_i8: $load_i8:ident
    ) => {
        $crate::simd::attention_kernels!(@kernels $features, $lanes, $zero, $splat, $load, $store, $fmadd, $reduce_half, $combine,
            widen_f32, dot_block_f32, axpy_block_f32, f32, |p| $load(p));
        $crate::simd::attention_kernels!(@kernels $features, $lanes, $zero, $splat, $load, $store, $fmadd, $reduce_half, $combine,
            widen_f16, dot_block_f16, axpy_block_f16, half::f16, |p| $widen($load_bits(p as *const $bits)));
        $crate::simd::attention_kernels!(@kernels $features, $lanes, $zero, $splat, $load, $store, $fmadd, $reduce_half, $combine,
            widen_i8, dot_block_i8, axpy_block_i8, i8, |p| $load_i8(p));
    };
    (@kernels $features:literal, $lanes:literal, $zero:ident, $splat:ident, $load:ident, $store:ident,
        $fmadd:ident, $reduce_half:ident, $combine:ident, $widen:ident, $dot:ident, $axpy:ident, $t:ty, |$p:ident| $row:expr) => {
        /// `dst[i] = src[i]` as f32, for the first `min(len)` values.
        ///
        /// # Safety
        /// This module's features must be available.
        #[inline]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $widen(src: &[$t], dst: &mut [f32]) {
            let n = src.len().min(dst.len());
            let mut i = 0;
            while i + $lanes <= n {
                let $p = src.as_ptr().add(i);
                $store(dst.as_mut_ptr().add(i), $row);
                i += $lanes;
            }
            for i in i..n {
                dst[i] = crate::CacheValue::to_f32(src[i]);
            }
        }

        /// `out[p] = Σ_d q[d]·rows[p·stride + d]` for the block's `$lanes` rows (`out[..$lanes]`).
        ///
        /// # Safety
        /// This module's features must be available.
        ///
        /// # Panics
        /// If `rows` holds fewer than `$lanes` rows of `q.len()` values at `stride`, or `out` fewer
        /// than `$lanes` values.
        #[inline]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $dot(q: &[f32], rows: &[$t], stride: usize, out: &mut [f32]) {
            let dim = q.len();
            assert!(stride >= dim && rows.len() >= ($lanes - 1) * stride + dim && out.len() >= $lanes);
            let vectors = dim / $lanes;
            // Half a block at a time: with a whole block's accumulators live, LLVM widened all its
            // rows first and spilled half the accumulators to the stack (perf annotate).
            // (A loop, not `array::from_fn`: a closure would not inherit this function's features.)
            let mut halves = [$zero(); 2];
            for (half, sums) in halves.iter_mut().enumerate() {
                let mut acc = [$zero(); $lanes / 2];
                for c in 0..vectors {
                    let q = $load(q.as_ptr().add(c * $lanes));
                    let row = rows.as_ptr().add(half * ($lanes / 2) * stride + c * $lanes);
                    for (p, acc) in acc.iter_mut().enumerate() {
                        let $p = row.add(p * stride);
                        *acc = $fmadd(q, $row, *acc);
                    }
                }
                *sums = $reduce_half(acc);
            }
            $store(out.as_mut_ptr(), $combine(halves));
            for (p, out) in out[..$lanes].iter_mut().enumerate() {
                let row = &rows[p * stride..][..dim];
                for d in vectors * $lanes..dim {
                    *out += q[d] * crate::CacheValue::to_f32(row[d]);
                }
            }
        }

        /// `acc[d] += Σ_p w[p]·rows[p·stride + d]` over the block's first `w.len()` rows.
        ///
        /// # Safety
        /// This module's features must be available.
        ///
        /// # Panics
        /// If `rows` holds fewer than `w.len()` rows of `acc.len()` values at `stride`.
        #[inline]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $axpy(acc: &mut [f32], w: &[f32], rows: &[$t], stride: usize) {
            let dim = acc.len();
            assert!(stride >= dim && (w.is_empty() || rows.len() >= (w.len() - 1) * stride + dim));
            let vectors = dim / $lanes;
            let (out, rows) = (acc.as_mut_ptr(), rows.as_ptr());
            let mut c = 0;
            while c + 8 <= vectors {
                let mut a = [$zero(); 8];
                for (k, a) in a.iter_mut().enumerate() {
                    *a = $load(out.add((c + k) * $lanes));
                }
                for (p, &wp) in w.iter().enumerate() {
                    let (wp, row) = ($splat(wp), rows.add(p * stride + c * $lanes));
                    for (k, a) in a.iter_mut().enumerate() {
                        let $p = row.add(k * $lanes);
                        *a = $fmadd($row, wp, *a);
                    }
                }
                for (k, a) in a.iter().enumerate() {
                    $store(out.add((c + k) * $lanes), *a);
                }
                c += 8;
            }
            for c in c..vectors {
                let mut a = $load(out.add(c * $lanes));
                for (p, &wp) in w.iter().enumerate() {
                    let $p = rows.add(p * stride + c * $lanes);
                    a = $fmadd($row, $splat(wp), a);
                }
                $store(out.add(c * $lanes), a);
            }
            for d in vectors * $lanes..dim {
                for (p, &wp) in w.iter().enumerate() {
                    *out.add(d) += wp * crate::CacheValue::to_f32(*rows.add(p * stride + d));
                }
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use attention_kernels;
