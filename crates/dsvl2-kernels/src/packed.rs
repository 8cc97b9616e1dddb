//! [`PackedMatrix`]: a weight matrix in one of the storage formats, with 64-byte aligned storage.

use rayon::prelude::*;

use crate::format::{Format, R16};
use crate::isa::Isa;
use crate::{gemm, gemv, quant, KernelError};

/// One cache line; the storage is a vector of these so that it starts 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

#[derive(Clone)]
struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBytes {
    fn zeroed(len: usize) -> Self {
        AlignedBytes {
            lines: vec![Line([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    /// A copy of `bytes`, made in one parallel pass (zeroing first and then copying would write
    /// every byte twice, which showed as a fifth of a GGUF load's time).
    fn copy_of(bytes: &[u8]) -> Self {
        let lines = bytes
            .par_chunks(64)
            .map(|chunk| {
                let mut line = Line([0; 64]);
                line.0[..chunk.len()].copy_from_slice(chunk);
                line
            })
            .collect();
        AlignedBytes {
            lines,
            len: bytes.len(),
        }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `lines` owns at least `len` initialised bytes and `Line` has no padding.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const u8, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u8, self.len) }
    }
}

/// Bytes that outlive every matrix made from them, e.g. a memory-mapped GGUF file.
pub type SharedBytes = std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Where a matrix's bytes are.
#[derive(Clone)]
enum Storage {
    /// Our own copy (converted or quantized at load).
    Owned(AlignedBytes),
    /// `len` bytes at `start` of a shared buffer, used in place.
    Shared {
        source: SharedBytes,
        start: usize,
        len: usize,
    },
}

impl Storage {
    fn as_slice(&self) -> &[u8] {
        match self {
            Storage::Owned(bytes) => bytes.as_slice(),
            Storage::Shared { source, start, len } => &(**source).as_ref()[*start..*start + *len],
        }
    }
}

/// A `rows x cols` weight matrix (rows = output features, cols = input features) stored row-major in
/// `format`'s ggml layout.
#[derive(Clone)]
pub struct PackedMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    data: Storage,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl PackedMatrix {
    fn check_shape(format: Format, rows: usize, cols: usize) -> Result<(), KernelError> {
        if !format.supports_cols(cols) {
            return Err(KernelError::UnsupportedCols {
                format,
                cols,
                block_len: format.block_len(),
            });
        }
        if !format.supports_rows(rows) {
            return Err(KernelError::UnsupportedRows {
                format,
                rows,
                group: format.row_group(),
            });
        }
        Ok(())
    }

    /// Quantizes/converts a row-major f32 matrix `[rows, cols]`, in parallel over rows.
    pub fn from_f32(format: Format, rows: usize, cols: usize, data: &[f32]) -> Result<Self, KernelError> {
        Self::check_shape(format, rows, cols)?;
        if data.len() != rows * cols {
            return Err(KernelError::DataLength {
                rows,
                cols,
                expected: rows * cols,
                got: data.len(),
            });
        }
        Self::from_rows(format, rows, cols, |first_row, out| {
            let start = first_row * cols;
            out.copy_from_slice(&data[start..start + out.len()]);
        })
    }

    /// Quantizes/converts a `[rows, cols]` matrix whose f32 rows `fill(first_row, out)` writes into
    /// `out` (whole rows, from `first_row` on), a few tens of KiB at a time and in parallel. Unlike
    /// [`Self::from_f32`] nothing of the matrix exists as f32 at once, so converting a bf16
    /// checkpoint's 662 MB f32 lm_head costs its 662 MB, not twice that, at the peak of a load.
    pub fn from_rows(
        format: Format,
        rows: usize,
        cols: usize,
        fill: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Result<Self, KernelError> {
        Self::check_shape(format, rows, cols)?;
        let mut out = AlignedBytes::zeroed(format.bytes_for(rows, cols));
        // Whole row groups (q8_0_r16 interleaves 16 rows; other formats have groups of one row).
        let group = format.row_group();
        let group_bytes = format.bytes_for(group, cols);
        // Several rows per task: a q4_k row of a few thousand values takes only tens of microseconds.
        // (No rows or no columns: nothing to convert.)
        if let Some(per_task) = (64 * 1024usize).checked_div(group_bytes) {
            let groups_per_task = per_task.max(1);
            let task_bytes = group_bytes * groups_per_task;
            out.as_mut_slice()
                .par_chunks_mut(task_bytes)
                .enumerate()
                .for_each_init(Vec::new, |values, (task, dst)| {
                    let task_rows = dst.len() / group_bytes * group;
                    values.resize(task_rows * cols, 0.0);
                    fill(task * groups_per_task * group, values);
                    for (d, s) in dst.chunks_exact_mut(group_bytes).zip(values.chunks_exact(group * cols)) {
                        match format {
                            Format::Q8_0R16 => quant::quantize_group_r16(s, cols, d),
                            _ => quant::quantize_row(format, s, d),
                        }
                    }
                });
        }
        Ok(PackedMatrix {
            format,
            rows,
            cols,
            data: Storage::Owned(out),
        })
    }

    fn check_byte_len(format: Format, rows: usize, cols: usize, got: usize) -> Result<(), KernelError> {
        Self::check_shape(format, rows, cols)?;
        let expected = format.bytes_for(rows, cols);
        if got != expected {
            return Err(KernelError::ByteLength {
                format,
                rows,
                cols,
                expected,
                got,
            });
        }
        Ok(())
    }

    /// Wraps bytes already in `format`'s layout (e.g. a GGUF tensor); copies them into aligned storage.
    pub fn from_bytes(format: Format, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, KernelError> {
        Self::check_byte_len(format, rows, cols, bytes.len())?;
        Ok(PackedMatrix {
            format,
            rows,
            cols,
            data: Storage::Owned(AlignedBytes::copy_of(bytes)),
        })
    }

    /// Uses `source[start..]`, already in `format`'s layout, in place: no copy (a memory-mapped GGUF
    /// file's tensors are the weights). f32 bytes that are not 4-byte aligned are copied instead, so
    /// that they can be read as `f32` directly.
    pub fn from_shared(
        format: Format,
        rows: usize,
        cols: usize,
        source: SharedBytes,
        start: usize,
    ) -> Result<Self, KernelError> {
        let len = format.bytes_for(rows, cols);
        let available = (*source).as_ref().len().saturating_sub(start);
        Self::check_byte_len(format, rows, cols, len.min(available))?;
        let bytes = &(*source).as_ref()[start..start + len];
        if format == Format::F32 && !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>()) {
            return Self::from_bytes(format, rows, cols, bytes);
        }
        Ok(PackedMatrix {
            format,
            rows,
            cols,
            data: Storage::Shared { source, start, len },
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The raw bytes in `format`'s layout (what a GGUF writer stores).
    pub fn as_bytes(&self) -> &[u8] {
        self.data.as_slice()
    }

    pub fn storage_bytes(&self) -> usize {
        self.as_bytes().len()
    }

    /// Bytes of one row (for q8_0_r16, a sixteenth of a group).
    pub(crate) fn row_bytes(&self) -> usize {
        self.format.bytes_for(1, self.cols)
    }

    /// The bytes of rows `[start, start + n)`; for q8_0_r16 whole groups only.
    pub(crate) fn row_range_bytes(&self, start: usize, n: usize) -> &[u8] {
        let group = self.format.row_group();
        assert!(
            start.is_multiple_of(group) && n.is_multiple_of(group),
            "rows {start}..{} split a group of {group}",
            start + n
        );
        let rb = self.row_bytes();
        &self.as_bytes()[start * rb..(start + n) * rb]
    }

    /// The weights as f32 values without conversion, when they are stored as f32 in native byte order
    /// (owned storage is 64-byte aligned, and `from_shared` copies misaligned f32 bytes, so the cast is
    /// always aligned).
    pub(crate) fn f32_view(&self) -> Option<&[f32]> {
        if self.format == Format::F32 && cfg!(target_endian = "little") {
            let b = self.as_bytes();
            // SAFETY: aligned (see above), length is a multiple of 4, every bit pattern is an f32.
            Some(unsafe { std::slice::from_raw_parts(b.as_ptr() as *const f32, b.len() / 4) })
        } else {
            None
        }
    }

    /// Writes rows `[start, start + n)` as f32 into `out` (`n * cols` values).
    pub fn dequantize_rows(&self, start: usize, n: usize, out: &mut [f32]) {
        self.dequantize_rows_isa(Isa::detect(), start, n, out)
    }

    pub(crate) fn dequantize_rows_isa(&self, isa: Isa, start: usize, n: usize, out: &mut [f32]) {
        assert!(
            start + n <= self.rows,
            "dequantize_rows: rows {start}..{} of a {}-row matrix",
            start + n,
            self.rows
        );
        assert_eq!(
            out.len(),
            n * self.cols,
            "dequantize_rows: output length must be n * cols"
        );
        if self.format != Format::Q8_0R16 {
            isa.decode(self.format, self.row_range_bytes(start, n), out);
            return;
        }
        // Interleaved groups: each group's rows back to plain q8_0 rows (4-byte pieces moved back), then
        // the q8_0 decoder, so the values are bit-identical to q8_0's.
        // Rows ending in a partial block are decoded whole, then cut to `cols`.
        let (cols, padded) = (self.cols, Format::Q8_0R16.padded_cols(self.cols));
        let group_bytes = Format::Q8_0R16.bytes_for(R16, cols);
        let mut plain = vec![0u8; group_bytes];
        let mut whole_rows = vec![0f32; if padded > cols { R16 * padded } else { 0 }];
        let mut done = 0;
        while done < n {
            let row = start + done;
            let (g, first) = (row / R16, row % R16);
            let count = (R16 - first).min(n - done);
            let group = &self.as_bytes()[g * group_bytes..][..group_bytes];
            isa.deinterleave_r16(group, padded, first, count, &mut plain);
            let out = &mut out[done * cols..(done + count) * cols];
            let plain = &plain[..count * self.row_bytes()];
            if padded == cols {
                isa.decode(Format::Q8_0, plain, out);
            } else {
                let whole_rows = &mut whole_rows[..count * padded];
                isa.decode(Format::Q8_0, plain, whole_rows);
                for (out, row) in out.chunks_exact_mut(cols).zip(whole_rows.chunks_exact(padded)) {
                    out.copy_from_slice(&row[..cols]);
                }
            }
            done += count;
        }
    }

    /// `y[m, rows] = x[m, cols] · Wᵀ` (row-major, contiguous). Uses the GEMV kernels for small `m`
    /// (decode) and dequantized panels + `gemm` for large `m` (prefill); multi-threaded on rayon's global
    /// pool.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.matmul_isa(Isa::detect(), x, m, y)
    }

    pub(crate) fn matmul_isa(&self, isa: Isa, x: &[f32], m: usize, y: &mut [f32]) {
        self.check_matmul_args(x, m, y);
        if m <= gemv::max_m(isa, self.format) {
            gemv::gemv(isa, self, x, m, y)
        } else {
            gemm::gemm(isa, self, x, m, y)
        }
    }

    pub(crate) fn check_matmul_args(&self, x: &[f32], m: usize, y: &[f32]) {
        assert_eq!(
            x.len(),
            m * self.cols,
            "matmul: x has {} values, expected m * cols = {m} * {}",
            x.len(),
            self.cols
        );
        assert_eq!(
            y.len(),
            m * self.rows,
            "matmul: y has {} values, expected m * rows = {m} * {}",
            y.len(),
            self.rows
        );
    }

    /// Forces the GEMV kernels whatever `m` is (benchmarks and tests).
    #[doc(hidden)]
    pub fn matmul_gemv(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.check_matmul_args(x, m, y);
        gemv::gemv(Isa::detect(), self, x, m, y)
    }

    /// Forces the dequantize + gemm path whatever `m` is (benchmarks and tests).
    #[doc(hidden)]
    pub fn matmul_gemm(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.check_matmul_args(x, m, y);
        gemm::gemm(Isa::detect(), self, x, m, y)
    }
}
