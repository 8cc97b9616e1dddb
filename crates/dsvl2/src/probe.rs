//! Machine limits, measured: memory read bandwidth and FMA peak throughput, on all cores. They are
//! the denominators of `dsvl2 bench`'s roofline ratios (decode is bound by reading the weights,
//! vision and prefill by multiply-adds).

use std::hint::black_box;
use std::sync::OnceLock;
use std::time::Instant;

static MAIN_STARTED: OnceLock<Instant> = OnceLock::new();

/// Notes the time `main` began (the fallback start of [`seconds_since_process_start`]'s users).
pub fn mark_main_started() {
    MAIN_STARTED.get_or_init(Instant::now);
}

/// When `main` began (or, if [`mark_main_started`] was not called, the first call of this).
pub fn main_started() -> Instant {
    *MAIN_STARTED.get_or_init(Instant::now)
}

/// Worker threads: one per core the process may use.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The SIMD features that matter to the kernels, as detected at run time (space-separated).
pub fn cpu_features() -> String {
    #[allow(unused_mut)]
    let mut found: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! check {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) {
                    found.push($f);
                }
            )*};
        }
        check!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16",
            "avxvnni"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! check {
            ($($f:tt),*) => {$(
                if std::arch::is_aarch64_feature_detected!($f) {
                    found.push($f);
                }
            )*};
        }
        check!("neon", "fp16", "dotprod", "i8mm", "bf16", "sve");
    }
    found.join(" ")
}

/// Memory read bandwidth in GB/s (1e9 bytes/s): every core streams its share of a 1 GiB buffer
/// (far larger than any cache), best of 5 passes.
pub fn mem_bandwidth_gbps() -> f64 {
    mem_bandwidth_with(1 << 30, 5)
}

/// [`mem_bandwidth_gbps`] over `bytes` (rounded down to whole 64-byte lines), best of `passes`.
pub fn mem_bandwidth_with(bytes: usize, passes: usize) -> f64 {
    let threads = threads();
    let words = (bytes / 64).max(threads) * 8;
    let mut buffer = SystemBuffer::new(words);
    let data = buffer.words();
    let per = words.div_ceil(threads).next_multiple_of(8);
    // Touch every page from the thread that will read it, so the pages exist (and are local).
    std::thread::scope(|s| {
        for (t, part) in data.chunks_mut(per).enumerate() {
            s.spawn(move || {
                for (i, x) in part.iter_mut().enumerate() {
                    *x = (i as u64) ^ (t as u64);
                }
            });
        }
    });
    let mut best = f64::INFINITY;
    for _ in 0..passes.max(1) {
        let started = Instant::now();
        let total = std::thread::scope(|s| {
            let handles: Vec<_> = data.chunks(per).map(|part| s.spawn(move || sum_words(part))).collect();
            handles
                .into_iter()
                .fold(0u64, |acc, h| acc.wrapping_add(h.join().expect("reader")))
        });
        black_box(total);
        best = best.min(started.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best / 1e9
}

/// Zeroed u64s from the system allocator rather than the global one (mimalloc), so that the memory
/// goes back to the operating system when dropped (glibc maps an allocation this large on its own,
/// and unmaps it when freed): `dsvl2 bench` runs the probe between timed stages and resets the
/// peak-RSS mark after it, which only leaves the probe out if its pages are gone by then.
struct SystemBuffer {
    ptr: *mut u64,
    layout: std::alloc::Layout,
}

impl SystemBuffer {
    fn new(words: usize) -> Self {
        use std::alloc::GlobalAlloc;
        let layout = std::alloc::Layout::array::<u64>(words.max(1)).expect("a buffer that fits the address space");
        // SAFETY: the layout's size is non-zero; the memory is freed in `drop` with the same layout.
        let ptr = unsafe { std::alloc::System.alloc_zeroed(layout) } as *mut u64;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        SystemBuffer { ptr, layout }
    }

    fn words(&mut self) -> &mut [u64] {
        // SAFETY: `ptr` holds `layout.size()` zeroed (initialised) bytes, aligned for u64, owned by
        // `self` and borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size() / 8) }
    }
}

impl Drop for SystemBuffer {
    fn drop(&mut self) {
        use std::alloc::GlobalAlloc;
        // SAFETY: allocated by `System` with this layout in `new`, and freed once.
        unsafe { std::alloc::System.dealloc(self.ptr as *mut u8, self.layout) }
    }
}

/// Wrapping sum of `words`, with independent accumulators so the loads, not the adds, limit it.
fn sum_words(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected at run time.
        return unsafe { sum_words_avx2(words) };
    }
    sum_words_scalar(words)
}

fn sum_words_scalar(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = words.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] = acc[k].wrapping_add(c[k]);
        }
    }
    tail.iter()
        .fold(acc.iter().fold(0, |a, &b| a.wrapping_add(b)), |a, &b| a.wrapping_add(b))
}

/// Four 256-bit accumulators, 128 bytes (two cache lines) per iteration.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(words: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let chunks = words.chunks_exact(16);
    let tail = chunks.remainder();
    let mut a = [_mm256_setzero_si256(); 4];
    for c in chunks {
        let p = c.as_ptr() as *const __m256i;
        // SAFETY: `c` has 16 u64 = four 32-byte vectors; unaligned loads.
        unsafe {
            a[0] = _mm256_add_epi64(a[0], _mm256_loadu_si256(p));
            a[1] = _mm256_add_epi64(a[1], _mm256_loadu_si256(p.add(1)));
            a[2] = _mm256_add_epi64(a[2], _mm256_loadu_si256(p.add(2)));
            a[3] = _mm256_add_epi64(a[3], _mm256_loadu_si256(p.add(3)));
        }
    }
    let v = _mm256_add_epi64(_mm256_add_epi64(a[0], a[1]), _mm256_add_epi64(a[2], a[3]));
    let mut lanes = [0u64; 4];
    // SAFETY: `lanes` is 32 bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, v) };
    lanes.iter().chain(tail).fold(0u64, |acc, &x| acc.wrapping_add(x))
}

/// Peak f32 multiply-add throughput in GFLOP/s (an FMA counts 2 flops per lane): every core runs a
/// register-only FMA loop for about 0.2 s, best of 7. Many short runs, because on a shared VM a core
/// can be taken away for a second at a time: with best of 3 runs of 0.3 s, two of six benches in one
/// sitting (2-vCPU Emerald Rapids, 2026-12-02) measured half the peak (~174 instead of ~340 GFLOP/s)
/// and so reported the vision tower above 1.0 of it.
pub fn fma_peak_gflops() -> f64 {
    fma_peak_with(0.2, 7)
}

/// [`fma_peak_gflops`] with each run lasting about `seconds`, best of `runs`.
pub fn fma_peak_with(seconds: f64, runs: usize) -> f64 {
    let threads = threads();
    let kernel = FmaKernel::detect();
    // Calibrate on one core: iterations per second.
    let mut iters = 1u64 << 14;
    let rate = loop {
        let started = Instant::now();
        black_box(kernel.run(iters));
        let t = started.elapsed().as_secs_f64();
        if t > 0.02 || iters > 1 << 40 {
            break iters as f64 / t;
        }
        iters *= 4;
    };
    let iters = ((rate * seconds) as u64).max(1);
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(move || kernel.run(iters))).collect();
            for h in handles {
                black_box(h.join().expect("fma worker"));
            }
        });
        best = best.min(started.elapsed().as_secs_f64());
    }
    (threads as u64 * iters * kernel.flops_per_iter()) as f64 / best / 1e9
}

/// The instructions [`fma_peak_gflops`] measures with: the widest f32 FMA the CPU has, which is
/// also what the matmul kernels use (gemm dispatches to AVX-512 at run time where present):
/// `avx512f`, `avx2+fma` or `scalar`.
pub fn fma_isa() -> &'static str {
    match FmaKernel::detect() {
        #[cfg(target_arch = "x86_64")]
        FmaKernel::Avx512 => "avx512f",
        #[cfg(target_arch = "x86_64")]
        FmaKernel::Avx2Fma => "avx2+fma",
        FmaKernel::Scalar => "scalar",
    }
}

#[derive(Clone, Copy)]
enum FmaKernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    Scalar,
}

/// Independent accumulators: enough to cover FMA latency x ports (4 x 2 on Zen 3, 4 x 2 on
/// Skylake), so the loop runs at the issue rate.
const ACCUMULATORS: usize = 12;

impl FmaKernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return FmaKernel::Avx512;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return FmaKernel::Avx2Fma;
        }
        FmaKernel::Scalar
    }

    /// Flops of one loop iteration: ACCUMULATORS FMAs, 2 flops per lane.
    fn flops_per_iter(self) -> u64 {
        match self {
            #[cfg(target_arch = "x86_64")]
            FmaKernel::Avx512 => (ACCUMULATORS * 16 * 2) as u64,
            #[cfg(target_arch = "x86_64")]
            FmaKernel::Avx2Fma => (ACCUMULATORS * 8 * 2) as u64,
            FmaKernel::Scalar => (ACCUMULATORS * 2) as u64,
        }
    }

    fn run(self, iters: u64) -> f32 {
        match self {
            // SAFETY: AVX-512F was detected at run time.
            #[cfg(target_arch = "x86_64")]
            FmaKernel::Avx512 => unsafe { fma_loop_avx512(iters) },
            // SAFETY: AVX2 and FMA were detected at run time.
            #[cfg(target_arch = "x86_64")]
            FmaKernel::Avx2Fma => unsafe { fma_loop_avx2(iters) },
            FmaKernel::Scalar => fma_loop_scalar(iters),
        }
    }
}

/// `acc = acc * a + b` converges to b / (1 - a) = 1: no overflow, no denormals.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(black_box(0.999_99));
    let b = _mm256_set1_ps(black_box(0.000_01));
    let mut acc = [_mm256_setzero_ps(); ACCUMULATORS];
    for (i, x) in acc.iter_mut().enumerate() {
        *x = _mm256_set1_ps(i as f32 * 0.01);
    }
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut sum = _mm256_setzero_ps();
    for x in acc {
        sum = _mm256_add_ps(sum, x);
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` is 32 bytes.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    lanes.iter().sum()
}

/// [`fma_loop_avx2`] on 512-bit registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(black_box(0.999_99));
    let b = _mm512_set1_ps(black_box(0.000_01));
    let mut acc = [_mm512_setzero_ps(); ACCUMULATORS];
    for (i, x) in acc.iter_mut().enumerate() {
        *x = _mm512_set1_ps(i as f32 * 0.01);
    }
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    let mut sum = _mm512_setzero_ps();
    for x in acc {
        sum = _mm512_add_ps(sum, x);
    }
    _mm512_reduce_add_ps(sum)
}

fn fma_loop_scalar(iters: u64) -> f32 {
    let a = black_box(0.999_99f32);
    let b = black_box(0.000_01f32);
    let mut acc = [0f32; ACCUMULATORS];
    for (i, x) in acc.iter_mut().enumerate() {
        *x = i as f32 * 0.01;
    }
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = *x * a + b;
        }
    }
    acc.iter().sum()
}

/// Seconds since this process started: from `/proc/self/stat` (start time in clock ticks since
/// boot) and `/proc/uptime` on Linux; `None` elsewhere or if they cannot be read.
pub fn seconds_since_process_start() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields restart after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 22 (starttime) is the 20th field after the command name.
    let start_ticks: f64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // USER_HZ is 100 on every Linux ABI Rust supports (sysconf(_SC_CLK_TCK)).
    let elapsed = uptime - start_ticks / 100.0;
    (elapsed >= 0.0).then_some(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_is_plausible() {
        // 64 MiB: beyond L2 of most machines, quick in a test; any positive finite number will do.
        let gbps = mem_bandwidth_with(64 << 20, 2);
        assert!(gbps.is_finite() && gbps > 0.1 && gbps < 10_000.0, "{gbps} GB/s");
    }

    #[test]
    fn fma_peak_is_plausible() {
        let gflops = fma_peak_with(0.05, 1);
        assert!(
            gflops.is_finite() && gflops > 0.1 && gflops < 100_000.0,
            "{gflops} GFLOP/s"
        );
    }

    #[test]
    fn sums_agree() {
        let words: Vec<u64> = (0..1003u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
        let expected = words.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        assert_eq!(sum_words(&words), expected);
        assert_eq!(sum_words_scalar(&words), expected);
    }

    #[test]
    fn process_age_is_known_on_linux() {
        if cfg!(target_os = "linux") {
            let age = seconds_since_process_start().expect("readable /proc");
            assert!((0.0..3600.0).contains(&age), "{age}");
        }
    }

    #[test]
    fn features_are_listed() {
        let f = cpu_features();
        #[cfg(target_arch = "x86_64")]
        assert!(f.contains("sse4.2") || f.is_empty(), "{f}");
        let _ = f;
    }
}
