//! Run-time choice between the SIMD kernels and the portable fallback.

use std::sync::OnceLock;

use crate::format::{Format, R16};
use crate::quant::{deinterleave_r16, QuantizedActs};
use crate::scalar;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C, confirmed at run time.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The AVX2 set plus AVX-512 F/BW/VL/VNNI, confirmed at run time: the q8_0 / q4_k GEMV kernels use
    /// 512-bit `vpdpbusd`; everything else runs the AVX2 kernels.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// The AVX-512 set plus AMX-INT8 with the OS's leave to use it: the q8_0_r16 products of 8 or more
    /// activation rows (prompts, the vision tower, decoding batches of 8) run on the tile multiplier
    /// (`simd::amx`); everything else as [`Isa::Avx512`].
    #[cfg(target_arch = "x86_64")]
    Amx,
}

impl Isa {
    /// The best instruction set this CPU supports, detected once. The environment variable
    /// `DSVL2_KERNELS=scalar|avx2|avx512|amx` caps it (to measure or rule out a kernel set on a bigger CPU;
    /// a set the CPU lacks is never chosen, and an unknown value is ignored with a warning).
    pub(crate) fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let available = Isa::available();
            let cap = std::env::var("DSVL2_KERNELS").ok();
            let chosen = cap
                .as_deref()
                .and_then(|name| {
                    let found = available.iter().position(|isa| isa.short_name() == name);
                    if found.is_none() {
                        let names: Vec<&str> = available.iter().map(|isa| isa.short_name()).collect();
                        tracing::warn!("DSVL2_KERNELS={name:?} ignored: this CPU offers {}", names.join(", "));
                    }
                    found
                })
                .map_or(available.len() - 1, |i| i);
            available[chosen]
        })
    }

    /// The value of `DSVL2_KERNELS` that selects this set.
    fn short_name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => "amx",
        }
    }

    /// Every instruction set this CPU supports, from the portable fallback up to the best (tests run
    /// each of them).
    pub(crate) fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            v.push(Isa::Avx2);
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                v.push(Isa::Avx512);
                if crate::simd::amx::available() {
                    v.push(Isa::Amx);
                }
            }
        }
        v
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2+fma+f16c",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512vnni+avx2+fma+f16c",
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => "amx-int8+avx512vnni+avx2+fma+f16c",
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
            Isa::Avx2 | Isa::Avx512 | Isa::Amx => unsafe { crate::simd::x86::decode(format, src, dst) },
        }
    }

    /// Rows `first..first + n` of one q8_0_r16 group as plain q8_0 rows (see
    /// [`crate::quant::deinterleave_r16`]); whole groups by SIMD where the CPU has AVX2.
    pub(crate) fn deinterleave_r16(self, group: &[u8], cols: usize, first: usize, n: usize, plain: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if self != Isa::Scalar && first == 0 && n == R16 {
            let nb = cols / crate::format::QK8_0;
            assert!(
                group.len() >= nb * crate::format::Q8_0R16_GROUP_BYTES
                    && plain.len() >= R16 * nb * crate::format::Q8_0_BYTES
            );
            // SAFETY: AVX2 detected (both SIMD sets have it); sizes checked above.
            return unsafe { crate::simd::x86::deinterleave_r16_group(group.as_ptr(), nb, plain.as_mut_ptr()) };
        }
        deinterleave_r16(group, cols, first, n, plain)
    }

    /// `out[i] = w · x[i*stride .. i*stride + w.len()]` for `i < out.len()`.
    #[inline]
    pub(crate) fn dot_multi(self, w: &[f32], x: &[f32], stride: usize, out: &mut [f32]) {
        match self {
            Isa::Scalar => scalar::dot_multi(w, x, stride, out),
            // SAFETY: features detected; dot_multi checks the length of x itself.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 | Isa::Amx => unsafe { crate::simd::x86::dot_multi(w, x, stride, out) },
        }
    }

    /// q8_0 / q8_0_r16 / q4_k product of `nrows` consecutive weight rows (`w`, their bytes; whole
    /// groups for q8_0_r16) with all `m` quantized activation rows: writes `y[i * y_stride + k]` for
    /// `i < m`, `k < nrows`.
    ///
    /// # Safety
    /// `y` must be valid for those writes, and no other thread may access these elements meanwhile.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemv_quantized(
        self,
        format: Format,
        w: &[u8],
        nrows: usize,
        acts: &QuantizedActs,
        m: usize,
        y: *mut f32,
        y_stride: usize,
    ) {
        let row_bytes = format.bytes_for(1, acts.cols);
        assert!(
            format.is_block_quantized()
                && nrows.is_multiple_of(format.row_group())
                && w.len() >= nrows * row_bytes
                && m * acts.cols <= acts.q.len(),
            "gemv_quantized: bad arguments"
        );
        if format == Format::Q8_0R16 {
            // SAFETY: features detected; sizes checked above, y by the caller.
            #[cfg(target_arch = "x86_64")]
            match self {
                Isa::Amx if m >= crate::simd::amx::MIN_ROWS => {
                    return crate::simd::amx::gemv_q8_0_r16(w, nrows, acts, m, y, y_stride)
                }
                Isa::Avx512 | Isa::Amx => return crate::simd::avx512::gemv_q8_0_r16(w, nrows, acts, m, y, y_stride),
                Isa::Avx2 => return crate::simd::x86::gemv_q8_0_r16(w, nrows, acts, m, y, y_stride),
                Isa::Scalar => {}
            }
            // The portable fallback: each group back to plain q8_0 rows (an L1-resident copy), then
            // the scalar q8_0 kernel.
            let group_bytes = R16 * row_bytes;
            let mut plain = vec![0u8; group_bytes];
            for (g, group) in w[..nrows * row_bytes].chunks_exact(group_bytes).enumerate() {
                deinterleave_r16(group, acts.cols, 0, R16, &mut plain);
                self.gemv_quantized(Format::Q8_0, &plain, R16, acts, m, y.add(g * R16), y_stride);
            }
            return;
        }
        match self {
            Isa::Scalar => {
                let mut out = vec![0f32; m];
                for k in 0..nrows {
                    let row = &w[k * row_bytes..(k + 1) * row_bytes];
                    match format {
                        Format::Q8_0 => scalar::dot_q8_0(row, acts, 0, &mut out),
                        _ => scalar::dot_q4k(row, acts, 0, &mut out),
                    }
                    for (i, &v) in out.iter().enumerate() {
                        *y.add(i * y_stride + k) = v;
                    }
                }
            }
            // SAFETY: features detected; sizes checked above, y by the caller.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => crate::simd::x86::gemv_quantized(format, w, nrows, acts, m, y, y_stride),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Amx => crate::simd::avx512::gemv_quantized(format, w, nrows, acts, m, y, y_stride),
        }
    }
}
