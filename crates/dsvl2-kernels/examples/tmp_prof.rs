use dsvl2_kernels::{Format, PackedMatrix};
fn main() {
    let f: Format = std::env::args().nth(1).unwrap().parse().unwrap();
    let m: usize = std::env::args().nth(2).unwrap().parse().unwrap();
    let (rows, cols) = (6848, 1280);
    let d: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w = PackedMatrix::from_f32(f, rows, cols, &d).unwrap();
    let x = vec![0.5f32; m * cols];
    let mut y = vec![0f32; m * rows];
    let t = std::time::Instant::now();
    let n: usize = std::env::args().nth(3).map(|s| s.parse().unwrap()).unwrap_or(300);
    let gemm = std::env::var("PATH_GEMM").is_ok();
    for _ in 0..n {
        if gemm {
            w.matmul_gemm(&x, m, &mut y)
        } else {
            w.matmul_gemv(&x, m, &mut y)
        }
    }
    let s = t.elapsed().as_secs_f64() / n.max(1) as f64;
    println!(
        "{f} m={m}: {:.0} us, {:.1} GB/s, {:.2} ns/elem/thread",
        s * 1e6,
        w.storage_bytes() as f64 / s / 1e9,
        s * 1e9 * 2.0 / (rows * cols) as f64
    );
}
