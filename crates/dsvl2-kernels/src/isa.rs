//! Run-time choice between the SIMD kernels and the portable fallback.

use std::sync::OnceLock;

use crate::format::Format;
use crate::quant::QuantizedActs;
use crate::scalar;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C, confirmed at run time.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    /// The best instruction set this CPU supports, detected once.
    pub(crate) fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                return Isa::Avx2;
            }
            Isa::Scalar
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2+fma+f16c",
        }
    }

    /// Dequantizes `dst.len()` elements (whole blocks) from `src` (at least their byte size).
    #[inline]
    pub(crate) fn decode(self, format: Format, src: &[u8], dst: &mut [f32]) {
        let need = format.bytes_for(1, dst.len());
        assert!(
            format.supports_cols(dst.len()) && src.len() >= need,
            "decode: {} bytes for {} {format} values",
            src.len(),
            dst.len()
        );
        match self {
            Isa::Scalar => scalar::decode(format, &src[..need], dst),
            // SAFETY: Avx2 is only constructed after the features were detected; sizes checked above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { crate::simd::x86::decode(format, src, dst) },
        }
    }

    /// `out[i] = w · x[i*stride .. i*stride + w.len()]` for `i < out.len()`.
    #[inline]
    pub(crate) fn dot_multi(self, w: &[f32], x: &[f32], stride: usize, out: &mut [f32]) {
        match self {
            Isa::Scalar => scalar::dot_multi(w, x, stride, out),
            // SAFETY: features detected; dot_multi checks the length of x itself.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { crate::simd::x86::dot_multi(w, x, stride, out) },
        }
    }

    /// q8_0 / q4_k weight row (its bytes) against quantized activation rows `first..first + out.len()`.
    #[inline]
    pub(crate) fn dot_quantized(self, format: Format, w: &[u8], acts: &QuantizedActs, first: usize, out: &mut [f32]) {
        match (self, format) {
            (Isa::Scalar, Format::Q8_0) => scalar::dot_q8_0(w, acts, first, out),
            (Isa::Scalar, Format::Q4K) => scalar::dot_q4k(w, acts, first, out),
            (Isa::Scalar, _) => unreachable!("dot_quantized: {format} is not an integer format"),
            // SAFETY: features detected; the kernel checks the row and activation sizes.
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, _) => unsafe { crate::simd::x86::dot_quantized(format, w, acts, first, out) },
        }
    }
}
