//! Small-`m` products (decoding): each weight row is dotted with all `m` activation rows while it is in
//! L1, so the weights stream from memory once per call whatever `m` is. f16/bf16 rows are first
//! converted into an L1-resident f32 buffer; q8_0/q4_k rows are used as they are by integer kernels
//! against activations quantized once per call. Output rows are split across rayon tasks in chunks.

use rayon::prelude::*;

use crate::format::Format;
use crate::isa::Isa;
use crate::quant::QuantizedActs;
use crate::{OutPtr, PackedMatrix};

/// Largest `m` handled by the GEMV kernels; above it dequantized panels + gemm are faster. Measured
/// with `examples/kernel_bench.rs` on 6848x1280 (README): f32 GEMV wins up to m = 8, f16/bf16 (whose
/// GEMV converts each weight row once) up to 16, and the integer q8_0/q4_k kernels up to 32. The
/// q8_0_r16 kernels win at every m where 8-bit products are cheap: tiny's 1110-token prefill (q8_0
/// GGUF, Emerald Rapids 2 vCPU, AVX-512 VNNI, OpenBLAS sgemm for the panels) took 3.65-4.24 s with
/// them up to m = 256 and 2.84-2.98 s with them for every m (two interleaved runs each; 4.0 s at
/// m ≤ 32). With AVX2 alone see [`AVX2_R16_MAX_M`].
pub(crate) fn max_m(isa: Isa, format: Format) -> usize {
    match format {
        Format::F32 => 8,
        Format::F16 | Format::Bf16 => 16,
        Format::Q8_0R16 if avx2_beside_openblas(isa) => AVX2_R16_MAX_M,
        // The interleaved tiles (8 activation rows per pass over an L1/L2-resident group of 16 weight
        // rows, integer products) outrun dequantized panels + f32 sgemm at prompt sizes too.
        Format::Q8_0R16 => usize::MAX,
        Format::Q8_0 | Format::Q4K => 32,
    }
}

/// Largest `m` for the q8_0_r16 tiles when the CPU has AVX2 but no AVX-512 VNNI and OpenBLAS does
/// the f32 products: there an 8-bit product costs `sign`, `maddubs` and `madd` per 32 values, and on a
/// Zen 3 all three share the two vector multiply pipes (a register-only loop of `vpsignb` alone ran
/// 2 per cycle, as `vpmaddwd` alone; with both 0.77 cycles per pair), so the tiles do at most ~21
/// products per cycle against sgemm's 16 FMA lanes, and reach ~15 hot. In the model (tiny q8_0 GGUF,
/// 640x480 = 5 tiles, 2-vCPU Zen 3, `dsvl2 bench`, five interleaved pairs, 2026-12-03) the vision tower
/// (m = 3645) took 25.7-28.0 s on the tiles and 21.8-26.1 s on dequantized panels + OpenBLAS (each
/// pair faster, by 5-19%), while the prompt (m ≤ 1039) was faster on the tiles (7.4-8.4 s against
/// 9.9-10.4 s with panels from m = 513, two pairs). Between the two (e.g. 2 image tiles, m = 1458)
/// was not measured: the tiles keep it.
const AVX2_R16_MAX_M: usize = 2048;

/// Whether `isa` is the AVX2 set (no AVX-512 VNNI) and large f32 products go to OpenBLAS.
fn avx2_beside_openblas(isa: Isa) -> bool {
    #[cfg(all(target_arch = "x86_64", dsvl2_openblas))]
    return isa == Isa::Avx2 && crate::gemm::use_blas();
    #[cfg(not(all(target_arch = "x86_64", dsvl2_openblas)))]
    {
        let _ = isa;
        false
    }
}

/// Rows per task: enough tasks for load balancing (a thread done with its share of the tasks takes
/// the others' last ones), but each task streams at least ~32 KiB of weights so the per-task overhead
/// (~1 µs) stays small. Whole row groups (q8_0_r16: 16 rows).
fn rows_per_task(w: &PackedMatrix) -> usize {
    let (rows, row_bytes, group) = (w.rows(), w.row_bytes(), w.format().row_group());
    let threads = rayon::current_num_threads().max(1);
    let balance = rows.div_ceil(threads * 4);
    let min_rows = (32 * 1024 / row_bytes.max(1)).max(1);
    let chunk = balance.clamp(min_rows, 256.max(min_rows)).min(rows).max(1);
    chunk.next_multiple_of(group)
}

/// The activations in the form the kernels of `format` read: f32 for float formats, 8-bit blocks for
/// q8_0 / q4_k, whose integer kernels (`maddubs`) do several times less work per weight than
/// converting each weight to f32 (see README for the measured speed and error).
enum Acts<'a> {
    F32(&'a [f32]),
    Quantized(QuantizedActs),
}

impl<'a> Acts<'a> {
    fn new(format: Format, x: &'a [f32], m: usize, cols: usize) -> Self {
        match format {
            Format::Q8_0 | Format::Q8_0R16 | Format::Q4K => Acts::Quantized(QuantizedActs::new(x, m, cols)),
            Format::F32 | Format::F16 | Format::Bf16 => Acts::F32(x),
        }
    }
}

/// Computes `y[i, r]` for all `i < m` and `r` in `rows` (`y` has row stride `w.rows()`).
///
/// # Safety
/// `y` must point at an `m x w.rows()` buffer, and no other thread may touch these elements meanwhile.
unsafe fn gemv_rows(isa: Isa, w: &PackedMatrix, acts: &Acts, m: usize, rows: std::ops::Range<usize>, y: OutPtr) {
    if let Acts::Quantized(q) = acts {
        let bytes = w.row_range_bytes(rows.start, rows.len());
        isa.gemv_quantized(w.format(), bytes, rows.len(), q, m, y.at(rows.start), w.rows());
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let (Isa::Avx512 | Isa::Amx, Acts::F32(x)) = (isa, acts) {
        // SAFETY: AVX-512 detected; the sizes were checked by the caller (x: m · cols values, y above).
        let bytes = w.row_range_bytes(rows.start, rows.len());
        let (rs, cols) = (rows.start, w.cols());
        crate::simd::avx512::gemv_float(w.format(), bytes, rows.len(), cols, x, m, y.at(rs), w.rows());
        return;
    }
    let cols = w.cols();
    let f32_weights = w.f32_view();
    let needs_buf = matches!(acts, Acts::F32(_)) && f32_weights.is_none();
    let mut buf = vec![0f32; if needs_buf { cols } else { 0 }];
    let mut out = vec![0f32; m];
    for r in rows {
        match acts {
            Acts::Quantized(_) => unreachable!(),
            Acts::F32(x) => {
                // Weight row as f32: in place for f32 weights, else dequantized into the (L1-resident) buffer.
                let wrow: &[f32] = match f32_weights {
                    Some(all) => &all[r * cols..(r + 1) * cols],
                    None => {
                        isa.decode(w.format(), w.row_range_bytes(r, 1), &mut buf);
                        &buf
                    }
                };
                isa.dot_multi(wrow, x, cols, &mut out);
            }
        }
        for (i, &v) in out.iter().enumerate() {
            *y.at(i * w.rows() + r) = v;
        }
    }
}

pub(crate) fn gemv(isa: Isa, w: &PackedMatrix, x: &[f32], m: usize, y: &mut [f32]) {
    if m == 0 || w.rows() == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if uses_amx_bf16(isa, w, m) {
        return amx_bf16_products(&[(w, x, m, OutPtr::new(y))]);
    }
    let acts = Acts::new(w.format(), x, m, w.cols());
    let chunk = rows_per_task(w);
    let out = OutPtr::new(y);
    crate::for_each_task(w.rows().div_ceil(chunk), |c| {
        let r0 = c * chunk;
        // SAFETY: y has m * rows elements (checked by the caller); tasks own disjoint row ranges.
        unsafe { gemv_rows(isa, w, &acts, m, r0..(r0 + chunk).min(w.rows()), out) }
    });
}

/// Whether `w` times `m` activation rows goes to the AMX-BF16 kernel (`simd::amx_bf16`): q8_0_r16
/// weights, enough rows, and a CPU that has it.
#[cfg(target_arch = "x86_64")]
pub(crate) fn uses_amx_bf16(isa: Isa, w: &PackedMatrix, m: usize) -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    isa == Isa::Amx
        && w.format() == Format::Q8_0R16
        && m >= crate::simd::amx_bf16::MIN_ROWS
        && *AVAILABLE.get_or_init(crate::simd::amx_bf16::available)
}

/// Products through the AMX-BF16 kernel, `(weight, activations, rows, output)` each, in one parallel
/// dispatch: the activations rounded to bf16 once per distinct input (in parallel), then tasks of a
/// few row groups of one product, each widening its weights into a bf16 panel and multiplying it with
/// all of that product's activation rows.
#[cfg(target_arch = "x86_64")]
fn amx_bf16_products(products: &[(&PackedMatrix, &[f32], usize, OutPtr)]) {
    use crate::simd::amx_bf16;
    // Rows of whole blocks: a partial last block (SigLIP's fc2: 4304 inputs) is stored zero-padded,
    // and the activations' padding columns are zero too.
    let padded = |w: &PackedMatrix| w.cols().next_multiple_of(crate::format::QK8_0);
    // Products reading the same activations (a layer's gate and up projections) share one rounding:
    // `which[p]` is product p's entry in `inputs`, each the key and the first product with it.
    let mut inputs: Vec<((*const f32, usize, usize), usize)> = Vec::new();
    let which: Vec<usize> = products
        .iter()
        .enumerate()
        .map(|(p, &(w, x, m, _))| {
            let key = (x.as_ptr(), m, w.cols());
            inputs.iter().position(|(k, _)| *k == key).unwrap_or_else(|| {
                inputs.push((key, p));
                inputs.len() - 1
            })
        })
        .collect();
    let mut rounded: Vec<Vec<u16>> = Vec::with_capacity(inputs.len());
    for &(_, p) in &inputs {
        let (w, x, m, _) = products[p];
        let (k, padded_k) = (w.cols(), padded(w));
        let mut buffer = vec![0u16; amx_bf16::padded_rows(m) * padded_k];
        let rows_per_chunk = (64 * 1024 / k).max(1);
        buffer[..m * padded_k]
            .par_chunks_mut(rows_per_chunk * padded_k)
            .zip(x[..m * k].par_chunks(rows_per_chunk * k))
            .for_each(|(dst, src)| {
                for (dst, src) in dst.chunks_exact_mut(padded_k).zip(src.chunks_exact(k)) {
                    // SAFETY: uses_amx_bf16 checked the CPU (AMX-BF16 implies AVX-512 F/BW here).
                    unsafe { amx_bf16::round_to_bf16(src, &mut dst[..k]) }
                }
            });
        rounded.push(buffer);
    }
    // Panels of at most ~512 KiB of bf16 (L2-resident while every activation row passes), in whole
    // pairs of row groups.
    let mut tasks = Vec::new();
    for (p, &(w, ..)) in products.iter().enumerate() {
        let chunk = ((256 * 1024 / padded(w)).max(32) / 32 * 32).min(w.rows().next_multiple_of(32));
        tasks.extend(
            (0..w.rows())
                .step_by(chunk)
                .map(|r0| (p, r0..(r0 + chunk).min(w.rows()))),
        );
    }
    crate::for_each_task(tasks.len(), |t| {
        let (p, rows) = &tasks[t];
        let (w, _, m, y) = products[*p];
        let bytes = w.row_range_bytes(rows.start, rows.len());
        let acts = &rounded[which[*p]];
        // SAFETY: as above; each y holds m * rows values (checked by the callers); tasks own disjoint
        // rows of one product, and products have distinct outputs.
        unsafe { amx_bf16::gemm_q8_0_r16(bytes, rows.len(), padded(w), acts, m, y.at(rows.start), w.rows()) }
    });
}

/// One product of a [`matmul_many`] batch: `y[m, weight.rows()] = x[m, weight.cols()] · weightᵀ`.
pub struct MatmulJob<'a> {
    pub weight: &'a PackedMatrix,
    pub x: &'a [f32],
    pub m: usize,
    pub y: &'a mut [f32],
}

/// Runs several independent products in one parallel dispatch (MoE decoding: all selected experts'
/// projections at once). The tasks are (job, row chunk) pairs, so many small matrices keep every core
/// busy without a fork/join per job. Jobs whose `m` is above the GEMV range run afterwards: each on one
/// thread, jobs in parallel, when there are enough of them; otherwise one after the other, each split
/// over the threads.
pub fn matmul_many(jobs: &mut [MatmulJob<'_>]) {
    matmul_many_isa(Isa::detect(), jobs)
}

pub(crate) fn matmul_many_isa(isa: Isa, jobs: &mut [MatmulJob<'_>]) {
    struct Task<'a> {
        w: &'a PackedMatrix,
        acts: usize,
        m: usize,
        rows: std::ops::Range<usize>,
        y: OutPtr,
    }
    let mut tasks = Vec::new();
    let mut acts = Vec::new();
    let mut act_keys = Vec::new();
    #[cfg(target_arch = "x86_64")]
    let mut amx_bf16 = Vec::new();
    for job in jobs.iter_mut() {
        job.weight.check_matmul_args(job.x, job.m, job.y);
        let w = job.weight;
        if job.m == 0 || w.rows() == 0 || job.m > max_m(isa, w.format()) {
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if uses_amx_bf16(isa, w, job.m) {
            amx_bf16.push((w, job.x, job.m, OutPtr::new(job.y)));
            continue;
        }
        let chunk = rows_per_task(w);
        let y = OutPtr::new(job.y);
        // Jobs reading the same activations (an MoE layer's gate/up projections of all experts) share
        // one conversion of them.
        let quantized = w.format().is_block_quantized();
        let key = (job.x.as_ptr(), job.x.len(), job.m, quantized);
        let a = match act_keys.iter().position(|k| *k == key) {
            Some(a) => a,
            None => {
                act_keys.push(key);
                acts.push(Acts::new(w.format(), job.x, job.m, w.cols()));
                acts.len() - 1
            }
        };
        for r0 in (0..w.rows()).step_by(chunk) {
            tasks.push(Task {
                w,
                acts: a,
                m: job.m,
                rows: r0..(r0 + chunk).min(w.rows()),
                y,
            });
        }
    }
    #[cfg(target_arch = "x86_64")]
    if !amx_bf16.is_empty() {
        amx_bf16_products(&amx_bf16);
    }
    crate::for_each_task(tasks.len(), |i| {
        let t = &tasks[i];
        // SAFETY: each job's y was checked to hold m * rows values, jobs hold distinct &mut buffers and
        // the chunks of one job are disjoint.
        unsafe { gemv_rows(isa, t.w, &acts[t.acts], t.m, t.rows.clone(), t.y) }
    });
    let mut large: Vec<&mut MatmulJob> = jobs
        .iter_mut()
        .filter(|j| j.m > max_m(isa, j.weight.format()))
        .collect();
    if large.len() >= 2 * rayon::current_num_threads() {
        // Many products (a MoE layer's experts in a prompt): one per thread at a time, largest first so
        // the shared experts' big product does not finish last.
        large.sort_by_key(|j| std::cmp::Reverse(j.m * j.weight.rows() * j.weight.cols()));
        large
            .into_par_iter()
            .with_max_len(1)
            .for_each(|job| crate::gemm::gemm_threads(isa, job.weight, job.x, job.m, job.y, false));
    } else {
        for job in large {
            job.weight.matmul_isa(isa, job.x, job.m, job.y);
        }
    }
}
