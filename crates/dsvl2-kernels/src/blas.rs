//! Large f32 products through OpenBLAS's `cblas_sgemm`, when the build found the library (the
//! `openblas` feature, on by default; see `build.rs`).
//!
//! Why: on the vision tower's and prefill's shapes, OpenBLAS's hand-tuned kernels ran 10-30% faster
//! than the `gemm` crate's on a 2-core Zen 3 (AVX2), every time, in one process, interleaved: e.g.
//! 3645x1152 · 1152x4304 at 151-166 against 122-143 GFLOP/s (see the crate README). At `m` ≈ 100
//! (a MoE expert's rows in a prompt) the two were equal.
//!
//! OpenBLAS runs single-threaded here: our rayon pool splits the product (by output rows or
//! columns, whichever is larger) and each task makes one call. OpenBLAS's own thread pool would
//! compete with rayon's threads for the same cores, and its workers spin after each call.
//!
//! OpenBLAS chooses its kernels when the library loads, from the CPU models it knows. A release older
//! than the CPU falls back to SSE3 ("Prescott") kernels: Debian 12's 0.3.21 on an Emerald Rapids
//! (Intel family 6 model 207) ran the vision tower's products at 41-65 GFLOP/s, against 270-295 with
//! `OPENBLAS_CORETYPE=SkylakeX` and 200-300 on the `gemm` crate (tiny q8_0, 5 tiles: vision 54.8 s
//! against 15.4 s and 21.1 s). So the kernels OpenBLAS chose are checked against the CPU: the `dsvl2`
//! binary restarts itself with `OPENBLAS_CORETYPE` set when they are older ([`coretype_fix`]), and
//! otherwise the products stay on the `gemm` crate ([`kernels_suit_cpu`]).

use std::ffi::{c_char, c_int, CStr};
use std::sync::{Once, OnceLock};

use rayon::prelude::*;

use crate::gemm::Strided;

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn cblas_sgemm(
        order: c_int,
        trans_a: c_int,
        trans_b: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        a: *const f32,
        lda: c_int,
        b: *const f32,
        ldb: c_int,
        beta: f32,
        c: *mut f32,
        ldc: c_int,
    );
    fn openblas_set_num_threads(n: c_int);
    fn openblas_get_corename() -> *const c_char;
}

/// The vector instructions a set of OpenBLAS kernels (or a CPU) uses for single-precision GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    /// SSE or AVX without FMA.
    Older,
    Avx2Fma,
    Avx512,
}

/// The tier of OpenBLAS's x86-64 kernel sets, by the names `openblas_get_corename()` gives (any case:
/// builds for one target report it in capitals). `None` for a name not listed here, e.g. one added
/// by a release newer than this code: those are trusted, since a release that knows a newer kernel
/// set also knows newer CPUs.
fn kernel_tier(corename: &str) -> Option<Tier> {
    Some(match corename.to_ascii_lowercase().as_str() {
        "skylakex" | "cooperlake" | "sapphirerapids" => Tier::Avx512,
        "haswell" | "zen" => Tier::Avx2Fma,
        "katmai" | "coppermine" | "northwood" | "prescott" | "banias" | "atom" | "core2" | "penryn" | "dunnington"
        | "nehalem" | "sandybridge" | "athlon" | "opteron" | "opteron(sse3)" | "barcelona" | "bobcat" | "bulldozer"
        | "piledriver" | "steamroller" | "excavator" | "nano" | "generic" => Tier::Older,
        _ => return None,
    })
}

/// Whether the kernels OpenBLAS chose use older instructions than this CPU has.
fn kernels_older_than_cpu() -> bool {
    kernel_tier(corename()).is_some_and(|kernels| kernels < cpu_tier())
}

/// This CPU's tier, with the AVX-512 subsets OpenBLAS's SkylakeX kernels use.
fn cpu_tier() -> Tier {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512cd")
        {
            return Tier::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Tier::Avx2Fma;
        }
    }
    Tier::Older
}

/// The kernel set OpenBLAS chose: "Haswell", "SkylakeX", "Prescott", ...
pub(crate) fn corename() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        // SAFETY: OpenBLAS returns a pointer to a static NUL-terminated string (or null).
        let name = unsafe { openblas_get_corename() };
        if name.is_null() {
            return String::new();
        }
        // SAFETY: as above.
        unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
    })
}

/// The `OPENBLAS_CORETYPE` that gives OpenBLAS kernels as new as this CPU, when the ones it chose are
/// older and the user has not chosen: `"SkylakeX"` (AVX-512) or `"Haswell"` (AVX2 + FMA).
pub(crate) fn coretype_fix() -> Option<&'static str> {
    if std::env::var_os("OPENBLAS_CORETYPE").is_some() || !kernels_older_than_cpu() {
        return None;
    }
    match cpu_tier() {
        Tier::Avx512 => Some("SkylakeX"),
        Tier::Avx2Fma => Some("Haswell"),
        Tier::Older => None,
    }
}

/// Whether OpenBLAS should run the large products: its kernels are as new as the CPU, or the user
/// chose them with `OPENBLAS_CORETYPE`. Otherwise the `gemm` crate's are faster (see the module doc).
pub(crate) fn kernels_suit_cpu() -> bool {
    let Some(fix) = coretype_fix() else {
        return true;
    };
    tracing::warn!(
        "OpenBLAS chose its {:?} kernels, older than this CPU; large products run on the `gemm` crate \
         (set OPENBLAS_CORETYPE={fix} for OpenBLAS's own, faster, ones)",
        corename(),
    );
    false
}

/// Products with an inner or output dimension below this stay on the `gemm` crate.
const SMALL_DIM: usize = 128;

/// Below this many output rows (or columns) per task, a product is not split further.
const MIN_SPLIT: usize = 64;

/// A row-major BLAS operand: transposed or not, and its leading dimension. `None` when neither
/// stride is 1 (BLAS cannot address it), or a size does not fit a C int.
fn operand<T>(s: &Strided<T>, rows: usize, cols: usize) -> Option<(c_int, c_int)> {
    let fits = |x: usize| c_int::try_from(x).ok();
    if s.col_stride == 1 && (rows <= 1 || s.row_stride >= cols.max(1)) {
        Some((NO_TRANS, fits(s.row_stride.max(cols).max(1))?))
    } else if s.row_stride == 1 && (cols <= 1 || s.col_stride >= rows.max(1)) {
        Some((TRANS, fits(s.col_stride.max(rows).max(1))?))
    } else {
        None
    }
}

/// `dst[m, n] = scale · lhs[m, k] · rhs[k, n]` through OpenBLAS, split over `threads` rayon tasks.
/// Returns `false` (having done nothing) when the strides are not BLAS-shaped.
///
/// # Safety
/// As [`crate::gemm::gemm_strided`].
pub(crate) unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    scale: f32,
    threads: usize,
) -> bool {
    static SINGLE_THREADED: Once = Once::new();
    let fits = |x: usize| c_int::try_from(x).is_ok();
    let (Some((ta, lda)), Some((tb, ldb)), Some((_, ldc))) = (
        operand(&lhs, m, k),
        operand(&rhs, k, n),
        operand(&dst, m, n).filter(|&(t, _)| t == NO_TRANS),
    ) else {
        return false;
    };
    // Attention's products (k or n = head_dim, 72 in SigLIP): OpenBLAS ran 729x72x729 at 69-94
    // GFLOP/s, and the vision tower's attention took 4.0-4.6 s with it against 3.9-4.1 s without.
    if !(fits(m) && fits(n) && fits(k)) || k < SMALL_DIM || n < SMALL_DIM {
        return false;
    }
    SINGLE_THREADED.call_once(|| openblas_set_num_threads(1));
    let call = Call {
        dst,
        lhs,
        rhs,
        trans: (ta, tb),
        leading: (lda, ldb, ldc),
        k,
        scale,
    };
    let split_rows = m >= n;
    let len = if split_rows { m } else { n };
    let tasks = threads.min(len / MIN_SPLIT).max(1);
    if tasks == 1 {
        call.run((0, m), (0, n));
        return true;
    }
    let chunk = len.div_ceil(tasks);
    (0..tasks).into_par_iter().for_each(|t| {
        let start = t * chunk;
        let part = (start, chunk.min(len - start));
        // SAFETY: the tasks write disjoint rows (or columns) of `dst`.
        unsafe {
            if split_rows {
                call.run(part, (0, n))
            } else {
                call.run((0, m), part)
            }
        }
    });
    true
}

/// One product, callable on a block of its output from any thread.
struct Call {
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    trans: (c_int, c_int),
    leading: (c_int, c_int, c_int),
    k: usize,
    scale: f32,
}

// SAFETY: the pointers are only dereferenced by `run`, whose callers give each thread its own part
// of `dst` (see `sgemm`'s contract).
unsafe impl Sync for Call {}

impl Call {
    /// Output rows `r0 .. r0 + rows`, columns `c0 .. c0 + cols`.
    ///
    /// # Safety
    /// No other thread may write that block at the same time.
    unsafe fn run(&self, (r0, rows): (usize, usize), (c0, cols): (usize, usize)) {
        let (lda, ldb, ldc) = self.leading;
        cblas_sgemm(
            ROW_MAJOR,
            self.trans.0,
            self.trans.1,
            rows as c_int,
            cols as c_int,
            self.k as c_int,
            self.scale,
            self.lhs.ptr.add(r0 * self.lhs.row_stride),
            lda,
            self.rhs.ptr.add(c0 * self.rhs.col_stride),
            ldb,
            0.0,
            self.dst.ptr.add(r0 * self.dst.row_stride + c0 * self.dst.col_stride),
            ldc,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_sets_are_ranked_by_their_instructions() {
        assert_eq!(kernel_tier("Prescott"), Some(Tier::Older));
        assert_eq!(kernel_tier("Sandybridge"), Some(Tier::Older));
        assert_eq!(kernel_tier("Haswell"), Some(Tier::Avx2Fma));
        assert_eq!(kernel_tier("ZEN"), Some(Tier::Avx2Fma));
        assert_eq!(kernel_tier("SkylakeX"), Some(Tier::Avx512));
        assert_eq!(kernel_tier("SomeFutureCore"), None);
        assert!(Tier::Older < Tier::Avx2Fma && Tier::Avx2Fma < Tier::Avx512);
    }

    /// The library this test links reports a name, and a suggested coretype is one of OpenBLAS's.
    #[test]
    fn coretype_fix_names_a_kernel_set_newer_than_the_chosen_one() {
        assert!(!corename().is_empty());
        if let Some(fix) = coretype_fix() {
            assert!(kernel_tier(fix) > kernel_tier(corename()));
            assert!(kernel_tier(fix) <= Some(cpu_tier()));
        }
    }
}
