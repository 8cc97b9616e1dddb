//! Large-`m` products (prefill, vision tower): compute-bound, so the work goes to the `gemm` crate's
//! blocked f32 kernels. F32 weights are used in place; other formats are dequantized (in parallel,
//! SIMD) into f32 panels of a few thousand rows that are multiplied one after the other. The panel
//! buffer is kept per calling thread so repeated calls do not page-fault fresh memory.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::isa::Isa;
use crate::PackedMatrix;

/// Most f32 values per dequantized panel (32 MiB): every vision-tower weight (at most 4304x1152) fits
/// in one, so its activations are packed once per product rather than once per panel; small enough
/// to keep around per thread.
const PANEL_VALUES: usize = 8 << 20;

thread_local! {
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// Whether [`gemm_strided`] goes to OpenBLAS: the build has it, `DSVL2_GEMM` is not `gemm` (which
/// keeps the `gemm` crate, to compare the two in one build), and OpenBLAS's kernels suit the CPU
/// (see [`crate::blas`]). Only in builds with OpenBLAS.
#[cfg(dsvl2_openblas)]
pub(crate) fn use_blas() -> bool {
    static USE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USE.get_or_init(|| std::env::var("DSVL2_GEMM").map_or(true, |v| v != "gemm") && crate::blas::kernels_suit_cpu())
}

/// A matrix operand of [`gemm_strided`]: element `(row, col)` is at `ptr + row · row_stride + col · col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<T> {
    pub ptr: T,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// `dst[m, n] = scale · lhs[m, k] · rhs[k, n]` with arbitrary strides: through OpenBLAS when the
/// build has it and the strides suit BLAS (see [`crate::blas`]), otherwise the `gemm` crate.
///
/// # Safety
/// Every element the shapes and strides address must be valid (for writing, in `dst`), and no other
/// thread may write what this call reads or writes.
pub(crate) unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    #[cfg(dsvl2_openblas)]
    if use_blas() {
        let threads = match parallelism {
            gemm::Parallelism::Rayon(n) => n.max(1),
            _ => 1,
        };
        if crate::blas::sgemm((m, n, k), dst, lhs, rhs, scale, threads) {
            return;
        }
    }
    gemm_crate_strided((m, n, k), dst, lhs, rhs, scale, parallelism)
}

/// [`gemm_strided`] through the `gemm` crate, whatever the build has.
///
/// # Safety
/// As [`gemm_strided`].
pub(crate) unsafe fn gemm_crate_strided(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    let s = |x: usize| x as isize;
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        s(dst.col_stride),
        s(dst.row_stride),
        false,
        lhs.ptr,
        s(lhs.col_stride),
        s(lhs.row_stride),
        rhs.ptr,
        s(rhs.col_stride),
        s(rhs.row_stride),
        0.0,
        scale,
        false,
        false,
        false,
        parallelism,
    )
}

/// `y[:, col0 .. col0 + n] = x[m, k] · wᵀ` where `w` is `n x k` row-major and `y` has row stride `ldy`.
///
/// # Safety
/// `x` holds `m * k`, `w` holds `n * k` values and `y` holds `m * ldy` values with `col0 + n <= ldy`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    col0: usize,
    ldy: usize,
    parallelism: gemm::Parallelism,
) {
    debug_assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * ldy && col0 + n <= ldy);
    gemm_strided(
        (m, n, k),
        Strided {
            ptr: y.as_mut_ptr().add(col0),
            row_stride: ldy,
            col_stride: 1,
        },
        Strided {
            ptr: x.as_ptr(),
            row_stride: k,
            col_stride: 1,
        },
        // rhs(kk, j) = w[j * k + kk].
        Strided {
            ptr: w.as_ptr(),
            row_stride: 1,
            col_stride: k,
        },
        1.0,
        parallelism,
    )
}

pub(crate) fn gemm(isa: Isa, w: &PackedMatrix, x: &[f32], m: usize, y: &mut [f32]) {
    gemm_threads(isa, w, x, m, y, true)
}

/// [`gemm`] on the calling thread only (`parallel = false`): for many independent products at once
/// (a MoE layer's experts in a prompt, ~100 rows each), which keep the threads busier one product
/// per thread than each product split over all threads.
pub(crate) fn gemm_threads(isa: Isa, w: &PackedMatrix, x: &[f32], m: usize, y: &mut [f32], parallel: bool) {
    let parallelism = if parallel {
        parallelism()
    } else {
        gemm::Parallelism::None
    };
    let (rows, cols) = (w.rows(), w.cols());
    if m == 0 || rows == 0 {
        return;
    }
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    if let Some(wf) = w.f32_view() {
        // SAFETY: the caller checked x.len() == m * cols and y.len() == m * rows.
        unsafe { gemm_f32(m, rows, cols, x, wf, y, 0, rows, parallelism) };
        return;
    }
    // Equal panels: a last one of a few rows would run at a fraction of the speed.
    // Panels and dequantization chunks cover whole row groups (q8_0_r16: 16 rows).
    let group = w.format().row_group();
    let max_rows = (PANEL_VALUES / cols).clamp(64, rows.max(64));
    let panel_rows = rows.div_ceil(rows.div_ceil(max_rows)).next_multiple_of(group).min(rows);
    let mut run = |panel: &mut Vec<f32>| {
        panel.resize(panel_rows * cols, 0.0);
        for r0 in (0..rows).step_by(panel_rows) {
            let n = panel_rows.min(rows - r0);
            let buf = &mut panel[..n * cols];
            if parallel {
                // Dequantize in chunks of rows, in parallel.
                let chunk_rows = n
                    .div_ceil(rayon::current_num_threads() * 4)
                    .max(16)
                    .next_multiple_of(group);
                buf.par_chunks_mut(chunk_rows * cols).enumerate().for_each(|(c, out)| {
                    let start = r0 + c * chunk_rows;
                    w.dequantize_rows_isa(isa, start, out.len() / cols, out);
                });
            } else {
                w.dequantize_rows_isa(isa, r0, n, buf);
            }
            // SAFETY: sizes as above; the panel covers output columns r0 .. r0 + n.
            unsafe { gemm_f32(m, n, cols, x, buf, y, r0, rows, parallelism) };
        }
    };
    // A nested call on the same thread (rayon work stealing while this thread waits inside gemm) finds
    // the buffer borrowed and uses a temporary one instead.
    PANEL.with(|p| match p.try_borrow_mut() {
        Ok(mut panel) => run(&mut panel),
        Err(_) => run(&mut Vec::new()),
    });
}
