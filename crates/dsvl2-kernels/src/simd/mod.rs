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

/// Instantiates decode attention's explicit kernels for one instruction set, reading cache rows of
/// f32, f16 or i8 in place (f16 widened in registers by `$widen`, i8 by `$load_i8`, so no f32 copy of
/// each row is made): `dot_*` give `Σ a·b` (the scores; four accumulators, then one horizontal `$sum`),
/// and `axpy4_*` do `acc += Σ_k p_k·v_k` over four rows (the values; each head's
/// accumulator row is loaded and stored once per four positions). Written with intrinsics: LLVM
/// vectorised the generic loops with stack spills and scalar adds (AVX-512) or 2-lane loads (AVX2),
/// per `perf annotate`. The other arguments name the intrinsics for vectors of `$lanes` f32.
#[cfg(target_arch = "x86_64")]
macro_rules! attention_kernels {
    (
        features: $features:literal, lanes: $lanes:literal, zero: $zero:ident, splat: $splat:ident,
        load: $load:ident, store: $store:ident, add: $add:ident, mul: $mul:ident, fmadd: $fmadd:ident,
        sum: $sum:ident, widen_f16: $widen:ident, f16_bits: $bits:ty, load_bits: $load_bits:ident,
        load_i8: $load_i8:ident
    ) => {
        $crate::simd::attention_kernels!(@dot dot_f32, f32, $features, $lanes, $zero, $load, $add, $fmadd, $sum,
            |p| $load(p));
        $crate::simd::attention_kernels!(@dot dot_f16, half::f16, $features, $lanes, $zero, $load, $add, $fmadd,
            $sum, |p| $widen($load_bits(p as *const $bits)));
        $crate::simd::attention_kernels!(@axpy4 axpy4_f32, f32, $features, $lanes, $splat, $load, $store, $add,
            $mul, $fmadd, |p| $load(p));
        $crate::simd::attention_kernels!(@axpy4 axpy4_f16, half::f16, $features, $lanes, $splat, $load, $store,
            $add, $mul, $fmadd, |p| $widen($load_bits(p as *const $bits)));
        $crate::simd::attention_kernels!(@dot dot_i8, i8, $features, $lanes, $zero, $load, $add, $fmadd, $sum,
            |p| $load_i8(p));
        $crate::simd::attention_kernels!(@axpy4 axpy4_i8, i8, $features, $lanes, $splat, $load, $store, $add,
            $mul, $fmadd, |p| $load_i8(p));
        $crate::simd::attention_kernels!(@dot2 dot2_f16, half::f16, $features, $lanes, $zero, $load, $add, $fmadd,
            $sum, |p| $widen($load_bits(p as *const $bits)));
        $crate::simd::attention_kernels!(@axpy4x2 axpy4x2_f16, half::f16, $features, $lanes, $splat, $load, $store,
            $add, $mul, $fmadd, |p| $widen($load_bits(p as *const $bits)));
        $crate::simd::attention_kernels!(@dot2 dot2_i8, i8, $features, $lanes, $zero, $load, $add, $fmadd, $sum,
            |p| $load_i8(p));
        $crate::simd::attention_kernels!(@axpy4x2 axpy4x2_i8, i8, $features, $lanes, $splat, $load, $store, $add,
            $mul, $fmadd, |p| $load_i8(p));
    };
    (@dot2 $name:ident, $t:ty, $features:literal, $lanes:literal, $zero:ident, $load:ident, $add:ident,
        $fmadd:ident, $sum:ident, |$p:ident| $row:expr) => {
        /// `[Σ a[0]·b, Σ a[1]·b]`: two queries against one row, read and widened once. Each sum is
        /// bit for bit the one-query kernel's (the same operations on the same values, in order).
        ///
        /// # Safety
        /// This module's features must be available.
        #[inline]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(a: [&[f32]; 2], b: &[$t]) -> [f32; 2] {
            let n = a[0].len().min(a[1].len()).min(b.len());
            let (mut acc0, mut acc1) = ([$zero(); 4], [$zero(); 4]);
            let mut i = 0;
            while i + 4 * $lanes <= n {
                for k in 0..4 {
                    let $p = b.as_ptr().add(i + $lanes * k);
                    let row = $row;
                    acc0[k] = $fmadd($load(a[0].as_ptr().add(i + $lanes * k)), row, acc0[k]);
                    acc1[k] = $fmadd($load(a[1].as_ptr().add(i + $lanes * k)), row, acc1[k]);
                }
                i += 4 * $lanes;
            }
            while i + $lanes <= n {
                let $p = b.as_ptr().add(i);
                let row = $row;
                acc0[0] = $fmadd($load(a[0].as_ptr().add(i)), row, acc0[0]);
                acc1[0] = $fmadd($load(a[1].as_ptr().add(i)), row, acc1[0]);
                i += $lanes;
            }
            let mut sums = [
                $sum($add($add(acc0[0], acc0[1]), $add(acc0[2], acc0[3]))),
                $sum($add($add(acc1[0], acc1[1]), $add(acc1[2], acc1[3]))),
            ];
            for j in i..n {
                let v = crate::CacheValue::to_f32(b[j]);
                sums[0] += a[0][j] * v;
                sums[1] += a[1][j] * v;
            }
            sums
        }
    };
    (@axpy4x2 $name:ident, $t:ty, $features:literal, $lanes:literal, $splat:ident, $load:ident, $store:ident,
        $add:ident, $mul:ident, $fmadd:ident, |$p:ident| $row:expr) => {
        /// `acc[r] += Σ_k p[r][k]·v[k]` for two queries `r` over the same four rows, read and widened
        /// once. Each result is bit for bit the one-query kernel's.
        ///
        /// # Safety
        /// This module's features must be available.
        #[inline]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(acc: [&mut [f32]; 2], p: [[f32; 4]; 2], v: [&[$t]; 4]) {
            let n = acc[0].len().min(acc[1].len()).min(v[0].len()).min(v[1].len()).min(v[2].len()).min(v[3].len());
            let [acc0, acc1] = acc;
            let w0 = [$splat(p[0][0]), $splat(p[0][1]), $splat(p[0][2]), $splat(p[0][3])];
            let w1 = [$splat(p[1][0]), $splat(p[1][1]), $splat(p[1][2]), $splat(p[1][3])];
            let mut i = 0;
            while i + $lanes <= n {
                let $p = v[0].as_ptr().add(i);
                let x0 = $row;
                let $p = v[1].as_ptr().add(i);
                let x1 = $row;
                let $p = v[2].as_ptr().add(i);
                let x2 = $row;
                let $p = v[3].as_ptr().add(i);
                let x3 = $row;
                let sum = $add($fmadd(w0[0], x0, $mul(w0[1], x1)), $fmadd(w0[2], x2, $mul(w0[3], x3)));
                let out = acc0.as_mut_ptr().add(i);
                $store(out, $add($load(out), sum));
                let sum = $add($fmadd(w1[0], x0, $mul(w1[1], x1)), $fmadd(w1[2], x2, $mul(w1[3], x3)));
                let out = acc1.as_mut_ptr().add(i);
                $store(out, $add($load(out), sum));
                i += $lanes;
            }
            for d in i..n {
                let [x0, x1, x2, x3] = [v[0][d], v[1][d], v[2][d], v[3][d]].map(crate::CacheValue::to_f32);
                acc0[d] += (p[0][0] * x0 + p[0][1] * x1) + (p[0][2] * x2 + p[0][3] * x3);
                acc1[d] += (p[1][0] * x0 + p[1][1] * x1) + (p[1][2] * x2 + p[1][3] * x3);
            }
        }
    };
    (@dot $name:ident, $t:ty, $features:literal, $lanes:literal, $zero:ident, $load:ident, $add:ident,
        $fmadd:ident, $sum:ident, |$p:ident| $row:expr) => {
        /// `Σ a·b` (see `attention_kernels!`).
        ///
        /// # Safety
        /// This module's features must be available.
        #[inline]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(a: &[f32], b: &[$t]) -> f32 {
            let n = a.len().min(b.len());
            let mut acc = [$zero(); 4];
            let mut i = 0;
            while i + 4 * $lanes <= n {
                for (k, acc) in acc.iter_mut().enumerate() {
                    let $p = b.as_ptr().add(i + $lanes * k);
                    *acc = $fmadd($load(a.as_ptr().add(i + $lanes * k)), $row, *acc);
                }
                i += 4 * $lanes;
            }
            while i + $lanes <= n {
                let $p = b.as_ptr().add(i);
                acc[0] = $fmadd($load(a.as_ptr().add(i)), $row, acc[0]);
                i += $lanes;
            }
            let mut sum = $sum($add($add(acc[0], acc[1]), $add(acc[2], acc[3])));
            for j in i..n {
                sum += a[j] * crate::CacheValue::to_f32(b[j]);
            }
            sum
        }
    };
    (@axpy4 $name:ident, $t:ty, $features:literal, $lanes:literal, $splat:ident, $load:ident, $store:ident,
        $add:ident, $mul:ident, $fmadd:ident, |$p:ident| $row:expr) => {
        /// `acc += Σ_k p[k]·v[k]` (see `attention_kernels!`).
        ///
        /// # Safety
        /// This module's features must be available.
        #[inline]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(acc: &mut [f32], p: [f32; 4], v: [&[$t]; 4]) {
            let n = acc.len().min(v[0].len()).min(v[1].len()).min(v[2].len()).min(v[3].len());
            let (p0, p1, p2, p3) = ($splat(p[0]), $splat(p[1]), $splat(p[2]), $splat(p[3]));
            let mut i = 0;
            while i + $lanes <= n {
                let $p = v[0].as_ptr().add(i);
                let x0 = $row;
                let $p = v[1].as_ptr().add(i);
                let x1 = $row;
                let $p = v[2].as_ptr().add(i);
                let x2 = $row;
                let $p = v[3].as_ptr().add(i);
                let x3 = $row;
                let sum = $add($fmadd(p0, x0, $mul(p1, x1)), $fmadd(p2, x2, $mul(p3, x3)));
                let out = acc.as_mut_ptr().add(i);
                $store(out, $add($load(out), sum));
                i += $lanes;
            }
            for d in i..n {
                let [x0, x1, x2, x3] = [v[0][d], v[1][d], v[2][d], v[3][d]].map(crate::CacheValue::to_f32);
                acc[d] += (p[0] * x0 + p[1] * x1) + (p[2] * x2 + p[3] * x3);
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use attention_kernels;
