//! Kernel throughput, side by side with candle. Run with
//! `cargo run -p dsvl2-kernels --release --example kernel_bench [-- quick] [gemv|hot|gemm|attention|decode [paired]|vision-attention|stream]`
//! (`gemv`: only the GEMV tables, `hot`: only the single-thread hot GEMV table, `gemm`: only the GEMM
//! table, `attention`: only decode attention over f16 and i8 caches, and 1, 2 or 8 queries over one
//! i8 cache in one call, `decode`: the weight products of one decoded token of tiny, as the model
//! dispatches them (with `paired`, also tokens each right after a streaming read, split by that
//! read's speed, for VMs whose bandwidth changes level; see `paired_rounds`), `vision-attention`:
//! the vision tower's attention over one tile, `stream`: summing 1 GiB in 4 KiB and in 2 MiB pages,
//! split as the kernels split their work).
//!
//! GEMV numbers are "cold": the benchmark cycles through copies of the matrix totalling more than
//! `COLD_BYTES`, so every call streams its weights from DRAM rather than from the (possibly huge)
//! last-level cache. All figures are medians of several repeats.

use std::hint::black_box;
use std::time::Instant;

use candle_core::{Device, Tensor};
use dsvl2_kernels::{
    cpu_features, decode_attention, decode_attention_i8, decode_attention_shared, matmul_many, prefill_attention,
    quantize_i8_rows, AttentionShape, CacheRows, CacheValue, DecodeQuery, Format, HeadRows, MatmulJob, PackedMatrix,
    PrefillShape, RowScales,
};
use rayon::prelude::*;

const COLD_BYTES: usize = 1 << 30;

/// Every storage format, q8_0's interleaved layout after q8_0.
fn formats() -> Vec<Format> {
    let mut all = Format::all().to_vec();
    all.insert(4, Format::Q8_0R16);
    all
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32 - 0.5)
        .collect()
}

/// Median wall time of `reps` calls (after one warm-up call).
fn median_secs(reps: usize, mut f: impl FnMut(usize)) -> f64 {
    f(usize::MAX);
    let mut t: Vec<f64> = (0..reps)
        .map(|i| {
            let s = Instant::now();
            f(i);
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// A `rows x cols` matrix: a 2048-row quantized tile repeated (the values do not affect speed).
fn matrix(format: Format, rows: usize, cols: usize) -> PackedMatrix {
    let tile_rows = rows.min(2048);
    let tile = PackedMatrix::from_f32(format, tile_rows, cols, &data(tile_rows * cols, 7)).unwrap();
    let mut bytes = Vec::with_capacity(format.bytes_for(rows, cols));
    while bytes.len() < format.bytes_for(rows, cols) {
        let need = format.bytes_for(rows, cols) - bytes.len();
        bytes.extend_from_slice(&tile.as_bytes()[..need.min(tile.storage_bytes())]);
    }
    PackedMatrix::from_bytes(format, rows, cols, &bytes).unwrap()
}

/// Enough copies of `w` to exceed `COLD_BYTES` in total.
fn cold_copies(w: PackedMatrix) -> Vec<PackedMatrix> {
    let n = COLD_BYTES.div_ceil(w.storage_bytes()).max(2);
    let mut v: Vec<PackedMatrix> = (1..n).map(|_| w.clone()).collect();
    v.push(w);
    v
}

/// Read bandwidth of the machine: sums a 1 GiB array of integers (vectorised, so memory-bound) on all
/// rayon threads.
fn memory_bandwidth() -> f64 {
    let a: Vec<u32> = (0..COLD_BYTES / 4).map(|i| i as u32).collect();
    let t = median_secs(5, |_| stream_read(&a));
    COLD_BYTES as f64 / t / 1e9
}

/// One pass of all threads summing `buffer`, for [`memory_bandwidth`] and [`paired_rounds`].
fn stream_read(buffer: &[u32]) {
    black_box(
        buffer
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u32, |s, &v| s.wrapping_add(v)))
            .reduce(|| 0, u32::wrapping_add),
    );
}

/// CPU time of the calling thread in ns (Linux `CLOCK_THREAD_CPUTIME_ID`), for timings that ignore the
/// time the thread was not running.
#[cfg(target_os = "linux")]
fn thread_cpu_ns() -> Option<u64> {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: libc's clock_gettime writes one timespec (two 64-bit fields on 64-bit Linux).
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0 && cfg!(target_pointer_width = "64")).then(|| ts.sec as u64 * 1_000_000_000 + ts.nsec as u64)
}
#[cfg(not(target_os = "linux"))]
fn thread_cpu_ns() -> Option<u64> {
    None
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Peak f32 FMA throughput with 256-bit FMAs on all rayon threads (what gemm's AVX2 kernels can reach).
#[cfg(target_arch = "x86_64")]
fn fma_peak() -> Option<f64> {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run(iters: usize) -> f32 {
        let mut acc = [_mm256_set1_ps(0.0); 12];
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for v in acc {
            s = _mm256_add_ps(s, v);
        }
        _mm_cvtss_f32(_mm256_castps256_ps128(s))
    }
    if !is_x86_feature_detected!("fma") {
        return None;
    }
    let threads = rayon::current_num_threads();
    let iters = 20_000_000;
    let t = median_secs(3, |_| {
        black_box((0..threads).into_par_iter().map(|_| unsafe { run(iters) }).sum::<f32>());
    });
    Some((threads * iters * 12 * 8 * 2) as f64 / t / 1e9)
}
#[cfg(not(target_arch = "x86_64"))]
fn fma_peak() -> Option<f64> {
    None
}

fn candle_matmul_secs(rows: usize, cols: usize, m: usize, cold: bool, reps: usize) -> f64 {
    let copies = if cold {
        (COLD_BYTES / (rows * cols * 4)).max(2)
    } else {
        1
    };
    let ws: Vec<Tensor> = (0..copies)
        .map(|i| Tensor::from_vec(data(rows * cols, i as u32), (rows, cols), &Device::Cpu).unwrap())
        .collect();
    let x = Tensor::from_vec(data(m * cols, 3), (m, cols), &Device::Cpu).unwrap();
    median_secs(reps, |i| {
        black_box(x.matmul(&ws[i % copies].t().unwrap()).unwrap());
    })
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let gemv_only = std::env::args().any(|a| a == "gemv");
    let hot_only = std::env::args().any(|a| a == "hot");
    let gemm_only = std::env::args().any(|a| a == "gemm");
    let reps = if quick { 5 } else { 15 };
    if std::env::args().any(|a| a == "attention") {
        attention_table(reps);
        return;
    }
    if std::env::args().any(|a| a == "decode") {
        decode_stream_table(reps);
        return;
    }
    if std::env::args().any(|a| a == "vision-attention") {
        vision_attention(reps);
        return;
    }
    if std::env::args().any(|a| a == "stream") {
        stream_table();
        return;
    }
    println!(
        "dsvl2-kernels bench: kernels {}, {} rayon threads",
        cpu_features(),
        rayon::current_num_threads()
    );
    println!("load average at start: {}", load_average());
    let bw = memory_bandwidth();
    println!("memory read bandwidth (1 GiB sum, all threads): {bw:.1} GB/s");
    let peak = fma_peak();
    if let Some(p) = peak {
        println!("f32 FMA peak (256-bit, all threads): {p:.0} GFLOP/s");
    }

    println!("\n== GEMV, cold weights (weight bytes / time) ==");
    println!(
        "{:<22} {:>6} {:>10} {:>10} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "shape", "format", "m=1 GB/s", "of mem bw", "m=1 µs", "m=2 GB/s", "m=4 GB/s", "m=8 GB/s", "m=8 µs"
    );
    let shapes: &[(&str, usize, usize)] = if hot_only || gemm_only {
        &[]
    } else {
        &[("1280->6848", 6848, 1280), ("lm_head 1280->129280", 129280, 1280)]
    };
    for &(name, rows, cols) in shapes {
        for format in formats() {
            let ws = cold_copies(matrix(format, rows, cols));
            let bytes = ws[0].storage_bytes() as f64;
            let mut res = Vec::new();
            for m in [1, 2, 4, 8] {
                let x = data(m * cols, 1);
                let mut y = vec![0f32; m * rows];
                let t = median_secs(reps.max(ws.len()), |i| ws[i % ws.len()].matmul(&x, m, &mut y));
                res.push((bytes / t / 1e9, t * 1e6));
            }
            println!(
                "{:<22} {:>6} {:>10.1} {:>10.2} {:>9.0} {:>10.1} {:>10.1} {:>10.1} {:>10.0}",
                name,
                format.to_string(),
                res[0].0,
                res[0].0 / bw,
                res[0].1,
                res[1].0,
                res[2].0,
                res[3].0,
                res[3].1
            );
        }
        if gemv_only {
            continue;
        }
        for m in [1, 8] {
            let t = candle_matmul_secs(rows, cols, m, true, reps);
            println!(
                "{:<22} {:>6} candle Tensor::matmul f32 m={m}: {:.1} GB/s, {:.0} µs",
                name,
                "f32",
                (rows * cols * 4) as f64 / t / 1e9,
                t * 1e6
            );
        }
    }

    if gemm_only {
        gemm_table(peak, reps);
        println!("\nload average at end: {}", load_average());
        return;
    }

    // Compute ceiling of the GEMV kernels: one thread, an L2-resident 896x1280 matrix. Timed in CPU time
    // of that thread (where available), best of 20 batches of 20 calls, so
    // that other load on the machine matters little.
    println!("\n== GEMV, hot, 1 thread, 1280->896 (weight GB/s per core of CPU time, best of 20x20) ==");
    println!("{:<8} {:>8} {:>8} {:>8} {:>8}", "format", "m=1", "m=2", "m=4", "m=8");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    for format in formats() {
        let w = matrix(format, 896, 1280);
        print!("{:<8}", format.to_string());
        for m in [1, 2, 4, 8] {
            let x = data(m * 1280, 1);
            let mut y = vec![0f32; m * 896];
            let best = pool.install(|| {
                (0..20)
                    .map(|_| {
                        let (s, c) = (Instant::now(), thread_cpu_ns());
                        for _ in 0..20 {
                            w.matmul(&x, m, &mut y);
                        }
                        match (c, thread_cpu_ns()) {
                            (Some(a), Some(b)) => (b - a) as f64 * 1e-9 / 20.0,
                            _ => s.elapsed().as_secs_f64() / 20.0,
                        }
                    })
                    .fold(f64::INFINITY, f64::min)
            });
            print!(" {:>8.1}", w.storage_bytes() as f64 / best / 1e9);
        }
        println!();
    }
    if gemv_only || hot_only {
        println!("\nload average at end: {}", load_average());
        return;
    }

    println!("\n== MoE decode: matmul_many over 6 / 16 q8_0 experts (gate+up 1280->896 and down 896->1280), m=1 ==");
    for n_exp in [6, 16] {
        let up: Vec<PackedMatrix> = (0..n_exp).map(|_| matrix(Format::Q8_0, 896, 1280)).collect();
        let down: Vec<PackedMatrix> = (0..n_exp).map(|_| matrix(Format::Q8_0, 1280, 896)).collect();
        let x = data(1280, 1);
        let h = data(896, 2);
        let mut ya: Vec<Vec<f32>> = (0..n_exp).map(|_| vec![0f32; 896]).collect();
        let mut yb: Vec<Vec<f32>> = (0..n_exp).map(|_| vec![0f32; 1280]).collect();
        let t_many = median_secs(reps * 4, |_| {
            let mut jobs: Vec<MatmulJob> = up
                .iter()
                .zip(ya.iter_mut())
                .map(|(weight, y)| MatmulJob { weight, x: &x, m: 1, y })
                .collect();
            jobs.extend(
                down.iter()
                    .zip(yb.iter_mut())
                    .map(|(weight, y)| MatmulJob { weight, x: &h, m: 1, y }),
            );
            matmul_many(&mut jobs);
        });
        let t_seq = median_secs(reps * 4, |_| {
            for (w, y) in up.iter().zip(ya.iter_mut()) {
                w.matmul(&x, 1, y);
            }
            for (w, y) in down.iter().zip(yb.iter_mut()) {
                w.matmul(&h, 1, y);
            }
        });
        let bytes = (up[0].storage_bytes() * 2 * n_exp) as f64;
        println!(
            "{n_exp:>2} experts: matmul_many {:.0} µs ({:.1} GB/s, L3-resident), separate matmul calls {:.0} µs",
            t_many * 1e6,
            bytes / t_many / 1e9,
            t_seq * 1e6
        );
    }

    println!("\n== GEMV vs gemm crossover, 1280->6848 (hot), µs; matmul switches at m = 8 (f32), 16 (f16, bf16), 32 (q8_0, q4_k) ==");
    print!("{:<8}", "format");
    let ms = [1, 4, 8, 16, 24, 32, 48, 64];
    for m in ms {
        print!(" {:>13}", format!("m={m} gemv/gemm"));
    }
    println!();
    for format in formats() {
        let w = matrix(format, 6848, 1280);
        print!("{:<8}", format.to_string());
        for m in ms {
            let x = data(m * 1280, 1);
            let mut y = vec![0f32; m * 6848];
            let a = median_secs(reps, |_| w.matmul_gemv(&x, m, &mut y));
            let b = median_secs(reps, |_| w.matmul_gemm(&x, m, &mut y));
            print!(" {:>13}", format!("{:.0}/{:.0}", a * 1e6, b * 1e6));
        }
        println!();
    }

    gemm_table(peak, reps);
    println!("\nload average at end: {}", load_average());
}

/// GFLOP/s of the large-`m` products (vision tower, prefill) in every format, beside candle.
fn gemm_table(peak: Option<f64>, reps: usize) {
    println!("\n== GEMM (GFLOP/s; `of peak` relative to the FMA peak above) ==");
    print!("{:<22}", "shape m,in->out");
    for format in formats() {
        print!(" {:>8}", format.to_string());
    }
    println!(" {:>8}", "candle");
    for (m, cols, rows) in [
        (3645, 1152, 4304),
        (3645, 4304, 1152),
        (3645, 1152, 3456),
        (729, 1152, 3456),
        (512, 1280, 6848),
        (256, 1280, 6848),
        (100, 1280, 896),
        (100, 896, 1280),
    ] {
        let flops = 2.0 * (m * rows * cols) as f64;
        let x = data(m * cols, 1);
        let mut y = vec![0f32; m * rows];
        let r = if m > 1000 { reps.min(5) } else { reps };
        print!("{:<22}", format!("{m},{cols}->{rows}"));
        for format in formats() {
            if !format.supports_cols(cols) {
                print!(" {:>8}", "-");
                continue;
            }
            let w = matrix(format, rows, cols);
            let t = median_secs(r, |_| w.matmul(&x, m, &mut y));
            print!(" {:>8.1}", flops / t / 1e9);
        }
        let t = candle_matmul_secs(rows, cols, m, false, r);
        print!(" {:>8.1}", flops / t / 1e9);
        if let Some(p) = peak {
            let w = matrix(Format::F32, rows, cols);
            let t = median_secs(r, |_| w.matmul(&x, m, &mut y));
            print!("   (f32 = {:.2} of peak)", flops / t / 1e9 / p);
        }
        println!();
    }
}

/// Decode attention (one query per head over a sequence's f16 cache) at tiny's shape (10 heads of
/// 128, MHA): cold (cycling through copies of the cache totalling more than `COLD_BYTES`, as 12 layers
/// times 8 sequences do) and hot (one cache, L2/L3-resident), in cache GB/s.
fn attention_table(reps: usize) {
    let shape = AttentionShape {
        heads: 10,
        kv_heads: 10,
        key_dim: 128,
        value_dim: 128,
        key_stride: 1280,
        value_stride: 1280,
        scale: 1.0 / (128f32).sqrt(),
    };
    println!("\n== decode attention, 10 heads x 128 (cache GB/s, median of {reps} rounds) ==");
    println!(
        "{:>5} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "cache", "len", "cold µs", "cold GB/s", "hot µs", "hot GB/s"
    );
    let q = data(1280, 3);
    let mut out = vec![0f32; 1280];
    for len in [256usize, 1039, 4096] {
        let rows = data(len * 1280, 5);
        // f16: keys and values of 2 bytes; i8: 1 byte and one f32 scale per position and head.
        let f16: Vec<half::f16> = rows.iter().copied().map(half::f16::from_f32).collect();
        let (mut i8s, mut scales) = (vec![0i8; rows.len()], vec![0f32; len * 10]);
        quantize_i8_rows(&rows, 128, &mut i8s, &mut scales);
        let f16_bytes = 2 * 2 * f16.len();
        let i8_bytes = 2 * (i8s.len() + 4 * scales.len());
        // Keys and values in separate buffers (the same values), as in a cache.
        let f16_call = |c: &[Vec<half::f16>; 2], out: &mut [f32]| decode_attention(&q, &c[0], &c[1], len, &shape, out);
        let i8_call = |c: &[(Vec<i8>, Vec<f32>); 2], out: &mut [f32]| {
            decode_attention_i8(&q, &c[0].0, &c[0].1, &c[1].0, &c[1].1, len, &shape, out)
        };
        attention_row(
            "f16",
            len,
            f16_bytes,
            reps,
            &[f16.clone(), f16.clone()],
            f16_call,
            &mut out,
        );
        let i8_cache = (i8s, scales);
        attention_row(
            "i8",
            len,
            i8_bytes,
            reps,
            &[i8_cache.clone(), i8_cache.clone()],
            i8_call,
            &mut out,
        );
        if len == 1039 {
            let f16_piece = CacheRows {
                keys: &f16[..],
                values: &f16[..],
                scales: None,
                len,
            };
            shared_attention_rows("f16", &shape, f16_piece, reps);
            let i8_piece = CacheRows {
                keys: &i8_cache.0[..],
                values: &i8_cache.0[..],
                scales: Some(RowScales {
                    keys: &i8_cache.1,
                    values: &i8_cache.1,
                }),
                len,
            };
            shared_attention_rows("i8", &shape, i8_piece, reps);
        }
    }
}

/// Several queries over one cache in one `decode_attention_shared` call (a batch's answers to one
/// prompt), hot: µs per call and per query, against one query alone.
fn shared_attention_rows<T: CacheValue>(name: &str, shape: &AttentionShape, piece: CacheRows<T>, reps: usize) {
    let (len, piece) = (piece.len, [piece]);
    println!("  shared {name} cache of {len}, hot: readers, µs per call, µs per reader");
    for readers in [1usize, 2, 8] {
        let qs: Vec<Vec<f32>> = (0..readers).map(|r| data(1280, 11 + r as u32)).collect();
        let mut outs = vec![vec![0f32; 1280]; readers];
        let t = median_secs(reps, |_| {
            dsvl2_kernels::on_worker(|| {
                for _ in 0..20 {
                    let mut queries: Vec<DecodeQuery> = qs
                        .iter()
                        .zip(outs.iter_mut())
                        .map(|(q, out)| DecodeQuery { q, caches: &[0], out })
                        .collect();
                    decode_attention_shared(&piece, &mut queries, shape);
                }
            })
        }) / 20.0;
        println!("  {readers:>7} {:>12.1} {:>14.1}", t * 1e6, t * 1e6 / readers as f64);
    }
}

/// One row of [`attention_table`]: `call` on copies of `cache` (keys and values) totalling more than
/// `COLD_BYTES` (cold) and on one copy (hot).
fn attention_row<C: Clone + Sync>(
    name: &str,
    len: usize,
    bytes: usize,
    reps: usize,
    cache: &C,
    call: impl Fn(&C, &mut [f32]) + Sync,
    out: &mut [f32],
) {
    let copies = COLD_BYTES.div_ceil(bytes).max(2);
    let caches: Vec<C> = (0..copies).map(|_| cache.clone()).collect();
    let mut next = 0;
    // On a worker of the pool, as the model calls attention (see `on_worker`).
    let cold = median_secs(reps, |_| {
        dsvl2_kernels::on_worker(|| {
            // One round visits every copy once; the figure is per call.
            for _ in 0..copies {
                next = (next + 1) % copies;
                call(&caches[next], out);
            }
        })
    }) / copies as f64;
    let hot = median_secs(reps, |_| {
        dsvl2_kernels::on_worker(|| {
            for _ in 0..50 {
                call(&caches[0], out);
            }
        })
    }) / 50.0;
    println!(
        "{name:>5} {len:>8} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
        cold * 1e6,
        bytes as f64 / cold / 1e9,
        hot * 1e6,
        bytes as f64 / hot / 1e9
    );
}

/// The linear layers deepseek-vl2-tiny reads for one decoded token, in q8_0_r16 and dispatched as the
/// model does (q, k, v together; o alone; the 6 routed experts' and the shared experts' gate and up
/// projections together, then their down projections; the LM head), each layer with its own weights,
/// so that every call streams from memory. No attention, norms or routing: the figure is the weight
/// stream alone, to compare with the whole model's decode rate (`dsvl2 bench`).
fn decode_stream_table(reps: usize) {
    let bw = memory_bandwidth();
    let f = Format::Q8_0R16;
    let m = |rows, cols| matrix(f, rows, cols);
    struct Layer {
        qkv: [PackedMatrix; 3],
        o: PackedMatrix,
        /// gate and up of each expert, then down of each.
        up: Vec<PackedMatrix>,
        down: Vec<PackedMatrix>,
    }
    let layers: Vec<Layer> = (0..12)
        .map(|i| {
            let (up, down) = if i == 0 {
                (vec![m(6848, 1280), m(6848, 1280)], vec![m(1280, 6848)])
            } else {
                let mut up: Vec<PackedMatrix> = (0..12).map(|_| m(896, 1280)).collect();
                up.extend([m(1792, 1280), m(1792, 1280)]);
                let mut down: Vec<PackedMatrix> = (0..6).map(|_| m(1280, 896)).collect();
                down.push(m(1280, 1792));
                (up, down)
            };
            Layer {
                qkv: [m(1280, 1280), m(1280, 1280), m(1280, 1280)],
                o: m(1280, 1280),
                up,
                down,
            }
        })
        .collect();
    let lm_head = m(129280, 1280);
    let bytes: usize = lm_head.storage_bytes()
        + layers
            .iter()
            .flat_map(|l| l.qkv.iter().chain([&l.o]).chain(&l.up).chain(&l.down))
            .map(PackedMatrix::storage_bytes)
            .sum::<usize>();
    println!(
        "\n== tiny's decode weight stream, q8_0_r16, {:.1} MB per token (median of {reps} tokens; memory bandwidth {bw:.1} GB/s) ==",
        bytes as f64 / 1e6
    );
    println!("{:>6} {:>12} {:>10} {:>10}", "batch", "ms/token", "GB/s", "of mem bw");
    for batch in [1usize, 8] {
        let x = data(batch * 6848, 1);
        let run = |_| {
            dsvl2_kernels::on_worker(|| {
                let mut y = vec![0f32; batch * 129280];
                for l in &layers {
                    let mut outs: Vec<Vec<f32>> = (0..3).map(|_| vec![0f32; batch * 1280]).collect();
                    let mut jobs: Vec<MatmulJob> = l
                        .qkv
                        .iter()
                        .zip(outs.iter_mut())
                        .map(|(w, y)| MatmulJob {
                            weight: w,
                            x: &x[..batch * 1280],
                            m: batch,
                            y,
                        })
                        .collect();
                    matmul_many(&mut jobs);
                    l.o.matmul(&x[..batch * 1280], batch, &mut y[..batch * 1280]);
                    for (ws, cols) in [(&l.up, 1280), (&l.down, 0)] {
                        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; batch * w.rows()]).collect();
                        let mut jobs: Vec<MatmulJob> = ws
                            .iter()
                            .zip(outs.iter_mut())
                            .map(|(w, y)| {
                                let cols = if cols == 0 { w.cols() } else { cols };
                                MatmulJob {
                                    weight: w,
                                    x: &x[..batch * cols],
                                    m: batch,
                                    y,
                                }
                            })
                            .collect();
                        matmul_many(&mut jobs);
                    }
                }
                lm_head.matmul(&x[..batch * 1280], batch, &mut y);
                black_box(&y);
            })
        };
        let t = median_secs(reps.max(9), run);
        println!(
            "{batch:>6} {:>12.2} {:>10.1} {:>10.2}",
            t * 1e3,
            bytes as f64 / t / 1e9,
            bytes as f64 / t / 1e9 / bw
        );
        if std::env::args().any(|a| a == "paired") {
            paired_rounds(bytes, 8 * reps, || run(0));
        }
    }
}

/// `run` (one token's weight stream, `bytes` of weights) right after one streaming read of
/// `COLD_BYTES` each, `rounds` times, with the rounds split by the read's speed. On a VM whose memory
/// bandwidth switches between levels for seconds at a time (a 2-vCPU Zen 4 went between ~35 and ~55
/// GB/s), a median over all rounds mixes the levels, and a bandwidth figure from another moment can
/// belong to the other level; each round's read shows the level its token ran in. Rounds whose read is
/// above the midpoint of the slowest and fastest reads count as fast (only when the fastest is 20%
/// above the slowest; otherwise all are one level).
fn paired_rounds(bytes: usize, rounds: usize, mut run: impl FnMut()) {
    let buffer: Vec<u32> = (0..COLD_BYTES / 4).map(|i| i as u32).collect();
    run();
    let pairs: Vec<(f64, f64)> = (0..rounds)
        .map(|_| {
            let started = Instant::now();
            stream_read(&buffer);
            let read = COLD_BYTES as f64 / started.elapsed().as_secs_f64() / 1e9;
            let started = Instant::now();
            run();
            (read, bytes as f64 / started.elapsed().as_secs_f64() / 1e9)
        })
        .collect();
    let (lo, hi) = pairs.iter().fold((f64::INFINITY, 0f64), |(lo, hi), &(read, _)| {
        (lo.min(read), hi.max(read))
    });
    let split = if hi > 1.2 * lo { (lo + hi) / 2.0 } else { f64::INFINITY };
    for (name, fast) in [("slow", false), ("fast", true)] {
        let level: Vec<&(f64, f64)> = pairs.iter().filter(|(read, _)| (*read > split) == fast).collect();
        if level.is_empty() {
            continue;
        }
        let mean = |f: fn(&(f64, f64)) -> f64| level.iter().map(|p| f(p)).sum::<f64>() / level.len() as f64;
        let (read, weights) = (mean(|p| p.0), mean(|p| p.1));
        println!(
            "  {name:>4} reads: {:>3} rounds, read {read:>5.1} GB/s, weights {weights:>5.1} GB/s ({:.2} of the read)",
            level.len(),
            weights / read
        );
    }
}

/// The vision tower's attention over one tile as `Vision::attention` runs it: 729 tokens, 16 heads of
/// 72 (SigLIP so400m), read in place from the fused qkv rows, against the f32 FMA peak.
fn vision_attention(reps: usize) {
    let (tokens, heads, hd) = (729, 16, 72);
    let width = heads * hd;
    let qkv = data(tokens * 3 * width, 7);
    let mut out = vec![0f32; tokens * width];
    let shape = PrefillShape {
        heads,
        kv_heads: heads,
        head_dim: hd,
        queries: tokens,
        keys: tokens,
        scale: (hd as f32).powf(-0.5),
        causal: false,
    };
    let rows = |offset: usize| HeadRows {
        data: &qkv[offset..],
        row_stride: 3 * width,
    };
    let t = median_secs(reps, |_| {
        prefill_attention(rows(0), rows(width), rows(2 * width), &shape, &mut out, width);
    });
    let flops = (4 * tokens * tokens * width) as f64;
    let peak = fma_peak();
    println!(
        "vision attention, one tile ({tokens} tokens, {heads} heads x {hd}): {:.2} ms, {:.1} GFLOP/s{}",
        t * 1e3,
        flops / t / 1e9,
        peak.map_or(String::new(), |p| format!(
            " ({:.2} of the 256-bit FMA peak {p:.0})",
            flops / t / 1e9 / p
        ))
    );
}

/// Memory read bandwidth by page size and by how the work is split: 1 GiB of u64 summed with AVX2
/// loads (as `dsvl2 bench`'s probe), as one half per thread, and as `for_each_task` and rayon's
/// `for_each` split it into tasks of a few sizes, from 4 KiB pages and from memory advised for
/// 2 MiB pages (Linux transparent huge pages). Best of 5 passes.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn stream_table() {
    const BYTES: usize = 1 << 30;
    let words = BYTES / 8;
    println!("\n== streaming sum of 1 GiB, GB/s (best of 5) ==");
    println!("{:<8} {:>8} {:>14} {:>8}", "pages", "split", "for_each_task", "rayon");
    for huge in [false, true] {
        let layout = std::alloc::Layout::from_size_align(BYTES, 2 << 20).expect("valid layout");
        // SAFETY: a non-zero size; freed below with the same layout. Not `alloc_zeroed`: with this
        // alignment it writes every page, which then stay 4 KiB pages whatever the advice.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null(), "cannot allocate 1 GiB");
        // Asked for either way: with transparent huge pages set to `always`, unadvised memory would
        // get 2 MiB pages too.
        let advice = if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: the range is this allocation; madvise only changes how it is backed.
        let advised = unsafe { libc::madvise(ptr as *mut libc::c_void, BYTES, advice) };
        assert_eq!(advised, 0, "madvise({advice}) failed");
        // Written once before it is read (the first touch decides the page size).
        // SAFETY: `ptr` holds BYTES bytes aligned for u64, owned here until dealloc; `write` does not
        // read the uninitialised values.
        let uninit = unsafe { std::slice::from_raw_parts_mut(ptr as *mut std::mem::MaybeUninit<u64>, words) };
        uninit.par_chunks_mut(1 << 16).enumerate().for_each(|(c, part)| {
            part.iter_mut().enumerate().for_each(|(i, x)| {
                x.write((c ^ i) as u64);
            })
        });
        // SAFETY: every value was written just above.
        let data: &[u64] = unsafe { std::slice::from_raw_parts(ptr as *const u64, words) };
        let pages = if huge { "2 MiB" } else { "4 KiB" };
        let gbs = |secs: f64| BYTES as f64 / secs / 1e9;
        let best = |f: &dyn Fn() -> u64| {
            (0..5)
                .map(|_| {
                    let started = Instant::now();
                    black_box(f());
                    started.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let halves = best(&|| {
            std::thread::scope(|s| {
                let parts: Vec<_> = data
                    .chunks(words.div_ceil(rayon::current_num_threads()))
                    .map(|part| s.spawn(move || sum_words(part)))
                    .collect();
                parts
                    .into_iter()
                    .map(|h| h.join().expect("reader"))
                    .fold(0, u64::wrapping_add)
            })
        });
        println!("{pages:<8} {:>8} {:>14.1} {:>8}", "halves", gbs(halves), "");
        for kib in [32usize, 152, 1024] {
            let chunk = kib * 1024 / 8;
            let tasks = words.div_ceil(chunk);
            let sums: Vec<std::sync::atomic::AtomicU64> = (0..tasks).map(|_| Default::default()).collect();
            let task = |t: usize| {
                let part = &data[t * chunk..((t + 1) * chunk).min(words)];
                sums[t].store(sum_words(part), std::sync::atomic::Ordering::Relaxed);
            };
            let claimed = best(&|| {
                dsvl2_kernels::on_worker(|| dsvl2_kernels::for_each_task(tasks, task));
                0
            });
            let split = best(&|| {
                dsvl2_kernels::on_worker(|| (0..tasks).into_par_iter().for_each(task));
                0
            });
            let name = format!("{kib} KiB");
            println!("{pages:<8} {name:>8} {:>14.1} {:>8.1}", gbs(claimed), gbs(split));
        }
        // SAFETY: allocated above with this layout; `data` is not used past this point.
        unsafe { std::alloc::dealloc(ptr, layout) };
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn stream_table() {
    println!("the stream table needs x86-64 Linux (AVX2 loads, madvise)");
}

/// Wrapping sum of `words` with four 256-bit accumulators (AVX2 when available).
#[cfg(target_arch = "x86_64")]
fn sum_words(words: &[u64]) -> u64 {
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(words: &[u64]) -> u64 {
        use std::arch::x86_64::*;
        let mut acc = [_mm256_setzero_si256(); 4];
        let chunks = words.chunks_exact(16);
        let tail = chunks.remainder();
        for c in chunks {
            let p = c.as_ptr() as *const __m256i;
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: `c` holds 16 u64, four 32-byte vectors; unaligned loads.
                *acc = _mm256_add_epi64(*acc, unsafe { _mm256_loadu_si256(p.add(k)) });
            }
        }
        let mut lanes = [0u64; 16];
        for (k, acc) in acc.iter().enumerate() {
            // SAFETY: `lanes` has room for four 4-lane vectors.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().add(4 * k) as *mut __m256i, *acc) };
        }
        lanes.iter().chain(tail).fold(0u64, |s, &x| s.wrapping_add(x))
    }
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected at run time.
        return unsafe { avx2(words) };
    }
    words.iter().fold(0u64, |s, &x| s.wrapping_add(x))
}
