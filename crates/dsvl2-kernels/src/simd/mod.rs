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
