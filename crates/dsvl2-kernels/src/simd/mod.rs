//! Architecture-specific kernels, selected at run time by [`crate::isa::Isa`].

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
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let mut offset = 0;
    while offset < len {
        // SAFETY: prefetching is a hint; it reads nothing architecturally and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(offset) as *const i8) };
        offset += 64;
    }
}

/// Instantiates the generic (auto-vectorised) kernels of [`crate::attention`] for one instruction set:
/// the same source, compiled with `$features` enabled and `$lanes` f32 lanes per vector. Callers must
/// only call them once the features were detected (see [`crate::isa::Isa`]).
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
            positions: std::ops::Range<usize>,
            s: &crate::AttentionShape,
        ) -> crate::attention::Partial {
            crate::attention::attend_positions::<$lanes, T>(q, keys, values, positions, s, true)
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
            crate::attention::softmax_rows(scores, cols, causal_past, sums)
        }

        /// [`crate::math::bias_activation`] compiled for this module's instruction set.
        ///
        /// # Safety
        /// This module's features must be available.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn bias_activation(y: &mut [f32], bias: Option<&[f32]>, gelu_tanh: bool) {
            crate::math::bias_activation(y, bias, gelu_tanh)
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use generic_kernels;
