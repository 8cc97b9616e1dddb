//! Weight storage formats and CPU matmul kernels for dsvl2's linear layers.
//!
//! * [`Format`]: f32, f16, bf16, q8_0 and q4_k, in ggml's byte layouts (GGUF-compatible).
//! * [`PackedMatrix`]: a `[rows = out features, cols = in features]` weight in one format, with
//!   [`PackedMatrix::matmul`] computing `y = x · Wᵀ`: GEMV kernels for decoding (weights streamed once
//!   for all activation rows), dequantized panels + `gemm` for prefill.
//! * [`matmul_many`]: several small products in one parallel dispatch (MoE experts).
//! * [`on_worker`] and [`for_each_task`]: how a model call and its kernels use rayon's threads
//!   without waking them for every kernel (`pool.rs`).
//! * [`decode_attention`]: one query row per head over a sequence's cache (f32, f16, or i8 with
//!   [`decode_attention_i8`]), split over positions; [`prefill_attention`]: many query rows (the vision tower, prompts), heads in parallel.
//!
//! Kernels are chosen at run time: AVX-512 (F/BW/VL/VNNI), with AMX-INT8 for the interleaved q8_0
//! products of 8 or more rows, or AVX2 + FMA + F16C on x86-64 when available (and the AVX-512 matmul
//! kernels of `gemm` for large products), portable scalar code otherwise. See [`cpu_features`].

mod attention;
#[cfg(dsvl2_openblas)]
mod blas;
mod format;
mod gemm;
mod gemv;
mod isa;
mod math;
mod packed;
mod pool;
mod quant;
mod scalar;
mod simd;
#[cfg(test)]
mod tests;

pub use attention::{
    decode_attention, decode_attention_batch, decode_attention_i8, decode_attention_shared, prefill_attention,
    quantize_i8_rows, AttentionShape, CacheRows, CacheValue, DecodeAttention, DecodeQuery, HeadRows, PrefillShape,
    RowScales,
};
pub use format::Format;
pub use gemv::{matmul_many, MatmulJob};
pub use packed::{PackedMatrix, SharedBytes};
pub use pool::{for_each_task, on_worker};

/// A raw output pointer shared by parallel tasks that each write a disjoint set of its elements (GEMV
/// row chunks, attention heads); every use says which elements are its own.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(*mut f32);
// SAFETY: tasks only write through it to elements no other task touches (see each use).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        OutPtr(out.as_mut_ptr())
    }

    /// The element `offset` (a method, so that closures capture the whole `OutPtr`, which is `Sync`,
    /// and not its raw-pointer field).
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Errors from building a [`PackedMatrix`] or parsing a [`Format`].
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("format {format} stores rows in blocks of {block_len} values, but the matrix has {cols} columns")]
    UnsupportedCols {
        format: Format,
        cols: usize,
        block_len: usize,
    },
    #[error("format {format} stores rows in groups of {group}, but the matrix has {rows} rows")]
    UnsupportedRows { format: Format, rows: usize, group: usize },
    #[error("a {rows}x{cols} {format} matrix takes {expected} bytes, got {got}")]
    ByteLength {
        format: Format,
        rows: usize,
        cols: usize,
        expected: usize,
        got: usize,
    },
    #[error("a {rows}x{cols} matrix has {expected} values, got {got}")]
    DataLength {
        rows: usize,
        cols: usize,
        expected: usize,
        got: usize,
    },
    #[error("unknown weight format {name:?} (valid: {valid})")]
    UnknownFormat { name: String, valid: String },
}

/// `y += bias` on every row of `y` (`bias.len()` values wide), then, with `gelu_tanh`, GELU's tanh
/// approximation (as PyTorch's `gelu(approximate="tanh")`, within a few `f32::EPSILON`); in
/// parallel and vectorised.
///
/// # Panics
/// If `y.len()` is not a multiple of `bias.len()`.
pub fn bias_activation(y: &mut [f32], bias: Option<&[f32]>, gelu_tanh: bool) {
    use rayon::prelude::*;
    let width = bias.map_or(1, <[f32]>::len).max(1);
    assert!(
        y.len().is_multiple_of(width),
        "{} values are not rows of {width}",
        y.len()
    );
    if bias.is_none() && !gelu_tanh {
        return;
    }
    let isa = isa::Isa::detect();
    // Whole rows of about 64 K values per task.
    let rows = (65536 / width).max(1);
    y.par_chunks_mut(rows * width)
        .for_each(|chunk| isa.bias_activation(chunk, bias, gelu_tanh));
}

/// `out[i] = silu(gate[i]) · up[i]` (`silu(x) = x / (1 + e^(-x))`, the gated MLPs' activation),
/// vectorised, within a few `f32::EPSILON` of the exact values; in parallel from 64 K values on.
/// Decoding a batch of 8 with tiny, libm's `expf` (a call per value) on one thread while the other
/// waited was ~2% of a step (perf).
///
/// # Panics
/// If the three slices differ in length.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    use rayon::prelude::*;
    assert!(
        gate.len() == up.len() && up.len() == out.len(),
        "silu_mul: {} gate, {} up and {} output values",
        gate.len(),
        up.len(),
        out.len()
    );
    const CHUNK: usize = 65536;
    let isa = isa::Isa::detect();
    if out.len() <= CHUNK {
        return isa.silu_mul(gate, up, out);
    }
    out.par_chunks_mut(CHUNK / 4)
        .zip(gate.par_chunks(CHUNK / 4))
        .zip(up.par_chunks(CHUNK / 4))
        .for_each(|((out, gate), up)| isa.silu_mul(gate, up, out));
}

/// What runs the large f32 products (vision tower, prefill): `"openblas (SkylakeX kernels)"` (the
/// kernel set OpenBLAS chose) when the build found OpenBLAS (feature `openblas`, default), its kernels
/// suit the CPU and `DSVL2_GEMM=gemm` does not ask for the `gemm` crate; otherwise `"gemm"`.
pub fn gemm_backend() -> String {
    #[cfg(dsvl2_openblas)]
    if gemm::use_blas() {
        return format!("openblas ({} kernels)", blas::corename());
    }
    "gemm".into()
}

/// The `OPENBLAS_CORETYPE` a program should restart itself with, set in its environment, so that
/// OpenBLAS (which picks its kernels when it loads) runs kernels as new as this CPU: `Some` only
/// when the build links OpenBLAS, the variable is unset, and the kernels OpenBLAS chose are older
/// than the CPU (an OpenBLAS release that predates the CPU model). Without the restart, the large
/// products use the `gemm` crate.
pub fn openblas_coretype_fix() -> Option<&'static str> {
    #[cfg(dsvl2_openblas)]
    return blas::coretype_fix();
    #[cfg(not(dsvl2_openblas))]
    None
}

/// The kernel set in use on this CPU: `"amx-int8+avx512vnni+avx2+fma+f16c"`, `"avx512vnni+avx2+fma+f16c"`,
/// `"avx2+fma+f16c"` or `"scalar"`.
pub fn cpu_features() -> &'static str {
    isa::Isa::detect().name()
}
