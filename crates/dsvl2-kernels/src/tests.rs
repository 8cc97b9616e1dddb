//! Unit tests. Oracles: candle's ggml ports (dequantization, q8_0 quantization), `half` (f16/bf16) and
//! an f64 reference product on the dequantized weights.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ8_0, GgmlType};
use half::{bf16, f16};

use crate::attention::{decode_attention_isa, prefill_attention_isa};
use crate::isa::Isa;
use crate::quant::QuantizedActs;
use crate::{
    gemm, gemv, matmul_many, AttentionShape, Format, HeadRows, KernelError, MatmulJob, PackedMatrix, PrefillShape,
};

/// Deterministic pseudo-random data (xorshift64*), roughly Gaussian (sum of 4 uniforms), with a few
/// outliers and some all-zero / constant blocks so the quantizers' edge cases are exercised.
fn test_data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut v: Vec<f32> = (0..n)
        .map(|_| (uniform() + uniform() + uniform() + uniform() - 2.0) * 1.7)
        .collect();
    for (i, x) in v.iter_mut().enumerate() {
        if i % 997 == 13 {
            *x *= 40.0; // outlier
        }
    }
    if n >= 2048 {
        v[256..512].fill(0.0); // an all-zero q4_k super-block
        v[512..544].fill(0.25); // a constant q8_0 block / q4_k sub-block
    }
    v
}

/// The scalar fallback and every SIMD kernel set this CPU supports (AVX2 and, where present, AVX-512).
fn isas() -> Vec<Isa> {
    Isa::available()
}

fn candle_blocks<T: GgmlType>(bytes: &[u8]) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    assert_eq!(bytes.len() % size, 0);
    let mut blocks = vec![T::zeros(); bytes.len() / size];
    // SAFETY: candle's blocks are repr(C) plain data of exactly ggml's layout (size asserted by candle).
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr() as *mut u8, bytes.len()) };
    blocks
}

fn candle_bytes<T: GgmlType>(blocks: &[T]) -> Vec<u8> {
    let len = std::mem::size_of_val(blocks);
    // SAFETY: as above; reading the blocks as bytes.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, len) }.to_vec()
}

fn dequantize_all(w: &PackedMatrix, isa: Isa) -> Vec<f32> {
    let mut out = vec![f32::NAN; w.rows() * w.cols()];
    w.dequantize_rows_isa(isa, 0, w.rows(), &mut out);
    out
}

#[test]
fn format_metadata() {
    let expect = [
        (Format::F32, "f32", 1, 4, 0),
        (Format::F16, "f16", 1, 2, 1),
        (Format::Bf16, "bf16", 1, 2, 30),
        (Format::Q8_0, "q8_0", 32, 34, 8),
        (Format::Q4K, "q4_k", 256, 144, 12),
    ];
    for (f, name, bl, bb, ty) in expect {
        assert_eq!(
            (f.to_string().as_str(), f.block_len(), f.block_bytes(), f.ggml_type()),
            (name, bl, bb, ty)
        );
        assert_eq!(Format::from_ggml_type(ty), Some(f));
        assert_eq!(name.parse::<Format>().unwrap(), f);
        assert_eq!(name.to_uppercase().parse::<Format>().unwrap(), f);
        assert!(f.supports_cols(bl * 3) && (bl == 1 || !f.supports_cols(bl * 3 + 1)));
        assert_eq!(f.bytes_for(5, bl * 4), 5 * 4 * bb);
    }
    assert_eq!(Format::from_ggml_type(2), None);
    let err = "q4_0".parse::<Format>().unwrap_err().to_string();
    assert!(
        err.contains("q4_0") && err.contains("f32, f16, bf16, q8_0, q4_k"),
        "{err}"
    );
}

#[test]
fn candle_block_layouts_match() {
    assert_eq!(std::mem::size_of::<BlockQ8_0>(), Format::Q8_0.block_bytes());
    assert_eq!(std::mem::size_of::<BlockQ4K>(), Format::Q4K.block_bytes());
}

#[test]
fn f16_bf16_match_half() {
    let (rows, cols) = (7, 333);
    let data = test_data(rows * cols, 1);
    let data: Vec<f32> = data
        .iter()
        .enumerate()
        .map(|(i, &x)| if i % 50 == 0 { x * 1e6 } else { x })
        .collect();
    for isa in isas() {
        let h = dequantize_all(&PackedMatrix::from_f32(Format::F16, rows, cols, &data).unwrap(), isa);
        let b = dequantize_all(&PackedMatrix::from_f32(Format::Bf16, rows, cols, &data).unwrap(), isa);
        for i in 0..data.len() {
            assert_eq!(
                h[i].to_bits(),
                f16::from_f32(data[i]).to_f32().to_bits(),
                "f16 {isa:?} at {i}"
            );
            assert_eq!(
                b[i].to_bits(),
                bf16::from_f32(data[i]).to_f32().to_bits(),
                "bf16 {isa:?} at {i}"
            );
        }
        let f = dequantize_all(&PackedMatrix::from_f32(Format::F32, rows, cols, &data).unwrap(), isa);
        assert_eq!(f, data);
    }
}

#[test]
fn q8_0_matches_candle_bit_for_bit() {
    let (rows, cols) = (9, 2048);
    let data = test_data(rows * cols, 2);
    let w = PackedMatrix::from_f32(Format::Q8_0, rows, cols, &data).unwrap();
    let mut blocks = vec![BlockQ8_0::zeros(); rows * cols / 32];
    BlockQ8_0::from_float(&data, &mut blocks);
    assert!(
        w.as_bytes() == candle_bytes(&blocks).as_slice(),
        "q8_0 bytes differ from candle's quantizer"
    );
    let mut expect = vec![0f32; rows * cols];
    BlockQ8_0::to_float(&blocks, &mut expect);
    for isa in isas() {
        let got = dequantize_all(&w, isa);
        assert!(
            got.iter().zip(&expect).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{isa:?}"
        );
    }
}

#[test]
fn q4k_dequantizes_like_candle_and_quantizes_at_least_as_well() {
    let (rows, cols) = (6, 2048);
    let data = test_data(rows * cols, 3);
    let w = PackedMatrix::from_f32(Format::Q4K, rows, cols, &data).unwrap();
    // Dequantization: candle's port of ggml's dequantize_row_q4_K on our bytes, bit for bit.
    let mut expect = vec![0f32; rows * cols];
    BlockQ4K::to_float(&candle_blocks::<BlockQ4K>(w.as_bytes()), &mut expect);
    for isa in isas() {
        let got = dequantize_all(&w, isa);
        assert!(
            got.iter().zip(&expect).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{isa:?}"
        );
    }
    // Quantization: ours is ggml's current make_qkx2_quants search; candle 0.11 still ships the older
    // make_qkx1_quants, so the bytes differ but our reconstruction error must not be worse.
    let mut blocks = vec![BlockQ4K::zeros(); rows * cols / 256];
    BlockQ4K::from_float(&data, &mut blocks);
    let mut theirs = vec![0f32; rows * cols];
    BlockQ4K::to_float(&blocks, &mut theirs);
    let sq = |r: &[f32]| r.iter().zip(&data).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
    let (ours, cand) = (sq(&expect), sq(&theirs));
    let signal = data.iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
    eprintln!(
        "q4_k relative squared error: ours {:e}, candle {:e}",
        ours / signal,
        cand / signal
    );
    assert!(ours <= cand, "q4_k error {ours} worse than candle's {cand}");
    // Measured 6.9e-3 (candle's qkx1: 8.1e-3); the data's 40x outliers dominate both.
    assert!(ours / signal < 8e-3, "q4_k relative squared error {}", ours / signal);
    // The all-zero super-block must come back as zeros.
    assert!(expect[256..512].iter().all(|&v| v == 0.0));
}

/// Max over outputs of |y - ref| / Σ|w·x| (the scale at which f32 rounding errors live; plain relative
/// error is meaningless for outputs that cancel to ~0). `ref` is the f64 product of the dequantized
/// weights with `x`.
fn max_rel_err(w: &PackedMatrix, x: &[f32], m: usize, y: &[f32]) -> f64 {
    max_rel_err_vs(w, x, None, m, y)
}

/// As [`max_rel_err`], but when `xq` is given the reference is what the integer GEMV kernels compute
/// exactly: the weights times the *quantized* activations `xq`. Kernel bugs then show up at the f32
/// rounding level. The scale of the error stays Σ|w·x|.
fn max_rel_err_vs(w: &PackedMatrix, x: &[f32], xq: Option<&[f32]>, m: usize, y: &[f32]) -> f64 {
    let wd = dequantize_all(w, Isa::Scalar);
    let (rows, cols) = (w.rows(), w.cols());
    let mut worst = 0f64;
    for i in 0..m {
        for r in 0..rows {
            let (mut dot, mut mag) = (0f64, 0f64);
            for k in 0..cols {
                let (wk, xk) = (wd[r * cols + k] as f64, x[i * cols + k] as f64);
                dot += wk * xq.map_or(xk, |xq| xq[i * cols + k] as f64);
                mag += (wk * xk).abs();
            }
            let e = (y[i * rows + r] as f64 - dot).abs() / mag.max(1e-30);
            worst = worst.max(e);
        }
    }
    worst
}

/// The activations the integer GEMV kernels actually use, dequantized (`d · q` per block of 32).
fn quantized_activations(x: &[f32], m: usize, cols: usize) -> Vec<f32> {
    let acts = QuantizedActs::new(x, m, cols);
    (0..m * cols)
        .map(|k| acts.q[k] as f32 * acts.d[(k / cols) * acts.stride + (k % cols) / 32])
        .collect()
}

/// Σ_k |w[r,k] · x[i,k]| for every output `[i, r]`.
fn magnitudes(w: &PackedMatrix, x: &[f32], m: usize) -> Vec<f64> {
    let wd = dequantize_all(w, Isa::Scalar);
    let (rows, cols) = (w.rows(), w.cols());
    let mut out = vec![0f64; m * rows];
    for i in 0..m {
        for r in 0..rows {
            out[i * rows + r] = (0..cols)
                .map(|k| (wd[r * cols + k] as f64 * x[i * cols + k] as f64).abs())
                .sum();
        }
    }
    out
}

/// Tolerance of [`max_rel_err`] for the f32 rounding of the kernels. Measured worst cases over
/// `matmul_matches_f64_reference` (both ISAs): 9.1e-7 for the f32-activation kernels (GEMV and gemm),
/// 3.0e-6 for the integer q8_0/q4_k kernels against their quantized-activation reference (q4_k's min
/// term cancels part of the main term, so intermediate sums exceed Σ|w·x|). ~3x margin.
const TOL_F32: f64 = 1e-5;

/// Whether `matmul` with `isa` quantizes the activations for this format and m (the integer GEMV
/// kernels of q8_0, q4_k and q8_0_r16).
fn quantizes_activations(isa: Isa, format: Format, m: usize) -> bool {
    matches!(format, Format::Q8_0 | Format::Q4K | Format::Q8_0R16) && m <= gemv::max_m(isa, format)
}

#[test]
fn matmul_matches_f64_reference() {
    // The reference uses the dequantized weights, so the weight quantization error is excluded on
    // purpose, and for the integer GEMV kernels the quantized activations (their error is measured
    // separately in `activation_quantization_error`): what remains is f32 rounding.
    let (mut worst, mut worst_q) = (0f64, 0f64);
    for format in Format::all() {
        let cols = match format {
            Format::Q4K => 512,
            Format::Q8_0 => 160,
            _ => 77, // not a multiple of 8: exercises the SIMD tails
        };
        for rows in [37, 300] {
            let w = PackedMatrix::from_f32(format, rows, cols, &test_data(rows * cols, 10 + rows as u64)).unwrap();
            for m in [1, 2, 3, 5, 8, 17, 300] {
                let x = test_data(m * cols, 100 + m as u64);
                let xq = quantized_activations(&x, m, cols);
                for isa in isas() {
                    let xq = quantizes_activations(isa, format, m).then_some(&xq[..]);
                    let mut y = vec![f32::NAN; m * rows];
                    w.matmul_isa(isa, &x, m, &mut y);
                    let e = max_rel_err_vs(&w, &x, xq, m, &y);
                    assert!(e < TOL_F32, "{format} {rows}x{cols} m={m} {isa:?}: rel err {e:e}");
                    if xq.is_some() {
                        worst_q = worst_q.max(e);
                    } else {
                        worst = worst.max(e);
                    }
                }
            }
        }
    }
    eprintln!("matmul worst relative error: {worst:e} (q8_0/q4_k GEMV vs quantized-activation reference: {worst_q:e})");
}

/// Error of the integer GEMV kernels against the f32 activations (the price of quantizing them to
/// 8-bit blocks of 32), 64x1280 weights, m = 4. Measured max |y - ref| / Σ|w·x|: Gaussian activations
/// 1.1e-3 (q8_0 and q4_k); with 40x outliers (one in ~31 blocks) 3.6e-3, an outlier coarsening the 31
/// values that share its block. Bounds: measured x ~2.
#[test]
fn activation_quantization_error() {
    let (rows, cols, m) = (64, 1280, 4);
    let gaussian: Vec<f32> = test_data(m * cols, 70).iter().map(|v| v.clamp(-4.0, 4.0)).collect();
    let with_outliers = test_data(m * cols, 70);
    for format in [Format::Q8_0, Format::Q4K] {
        let w = PackedMatrix::from_f32(format, rows, cols, &test_data(rows * cols, 71)).unwrap();
        for (x, bound, what) in [(&gaussian, 2.5e-3, "gaussian"), (&with_outliers, 8e-3, "outliers")] {
            let mut y = vec![0f32; m * rows];
            w.matmul(x, m, &mut y);
            let e = max_rel_err(&w, x, m, &y);
            eprintln!("{format} activation quantization error ({what}): {e:e}");
            assert!(e < bound, "{format} {what}: {e:e}");
        }
    }
}

/// Many activation rows are quantized on all threads (a prompt); each row must come out exactly as
/// when it is quantized alone (a decoded token, on the calling thread).
#[test]
fn quantized_activations_do_not_depend_on_the_row_count() {
    let (m, cols) = (300, 1280);
    let x = test_data(m * cols, 72);
    let all = QuantizedActs::new(&x, m, cols);
    let stride = all.stride;
    for (i, row) in x.chunks_exact(cols).enumerate() {
        let one = QuantizedActs::new(row, 1, cols);
        assert_eq!(&all.q[i * cols..(i + 1) * cols], &one.q[..], "row {i} values");
        assert_eq!(&all.d[i * stride..(i + 1) * stride], &one.d[..], "row {i} scales");
        assert_eq!(&all.sum[i * stride..(i + 1) * stride], &one.sum[..], "row {i} sums");
        assert_eq!(
            &all.bias_sum[i * stride..(i + 1) * stride],
            &one.bias_sum[..],
            "row {i} bias sums"
        );
    }
    assert!(QuantizedActs::new(&[], 0, 1280).q.is_empty());
    assert!(QuantizedActs::new(&[], 5, 0).q.is_empty());
}

/// The activation quantizer compiled for each kernel set gives the portable build's bytes (every step
/// is exact or correctly rounded), including rounding ties, zero blocks and a partial last block.
#[test]
fn quantized_activations_are_the_same_on_every_kernel_set() {
    let (m, cols) = (5, 300);
    let mut x = test_data(m * cols, 73);
    x[..32].fill(0.0);
    x[40] = 127.0; // scale 1: the block's other values land on ties
    for (i, v) in x[32..64].iter_mut().enumerate() {
        if i != 8 {
            *v = i as f32 - 15.5;
        }
    }
    let want = QuantizedActs::new_isa(Isa::Scalar, &x, m, cols);
    for isa in isas() {
        let got = QuantizedActs::new_isa(isa, &x, m, cols);
        assert_eq!((got.cols, got.stride), (want.cols, want.stride));
        assert_eq!(got.q, want.q, "{isa:?}");
        assert_eq!(got.bias_sum, want.bias_sum, "{isa:?}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.d), bits(&want.d), "{isa:?}");
        assert_eq!(bits(&got.sum), bits(&want.sum), "{isa:?}");
    }
}

/// Every large-product backend the build has (the `gemm` crate, and OpenBLAS when linked) against
/// f64, with plain and transposed operands, a strided output, and products split by rows, by
/// columns, or not at all. The shapes pass OpenBLAS's size gate (k, n ≥ 128). Measured worst: 3.2e-7
/// (both backends, Zen 3), against `TOL_F32`.
#[test]
fn gemm_backends_match_f64_reference() {
    use crate::gemm::{gemm_crate_strided, Strided};
    for (m, n, k) in [(200, 130, 140), (130, 300, 129), (70, 140, 150)] {
        for (lhs_t, rhs_t) in [(false, false), (false, true), (true, false), (true, true)] {
            let (a, b) = (test_data(m * k, 30), test_data(k * n, 31));
            // lhs(i, p) and rhs(p, j), stored row-major or transposed.
            let lhs = if lhs_t { (1, m) } else { (k, 1) };
            let rhs = if rhs_t { (1, k) } else { (n, 1) };
            let at = |i: usize, p: usize| a[i * lhs.0 + p * lhs.1] as f64;
            let bt = |p: usize, j: usize| b[p * rhs.0 + j * rhs.1] as f64;
            let ldc = n + 3;
            let run = |backend: &dyn Fn(Strided<*mut f32>, Strided<*const f32>, Strided<*const f32>)| {
                let mut c = vec![f32::NAN; m * ldc];
                let (lhs, rhs) = (
                    Strided {
                        ptr: a.as_ptr(),
                        row_stride: lhs.0,
                        col_stride: lhs.1,
                    },
                    Strided {
                        ptr: b.as_ptr(),
                        row_stride: rhs.0,
                        col_stride: rhs.1,
                    },
                );
                let dst = Strided {
                    ptr: c.as_mut_ptr(),
                    row_stride: ldc,
                    col_stride: 1,
                };
                backend(dst, lhs, rhs);
                c
            };
            let check = |name: &str, c: &[f32]| {
                let mut worst = 0f64;
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|p| 0.5 * at(i, p) * bt(p, j)).sum();
                        let size: f64 = (0..k).map(|p| (at(i, p) * bt(p, j)).abs()).sum();
                        worst = worst.max((c[i * ldc + j] as f64 - want).abs() / size);
                    }
                }
                eprintln!("{name} {m}x{n}x{k} {lhs_t}/{rhs_t}: rel err {worst:e}");
                assert!(worst < TOL_F32, "{name} {m}x{n}x{k} {lhs_t}/{rhs_t}: rel err {worst:e}");
            };
            let parallel = ::gemm::Parallelism::Rayon(2);
            // SAFETY: the operands hold every element the shapes and strides address.
            let c = run(&|c, a, b| unsafe { gemm_crate_strided((m, n, k), c, a, b, 0.5, parallel) });
            check("gemm crate", &c);
            #[cfg(dsvl2_openblas)]
            {
                // SAFETY: as above.
                let c = run(&|c, a, b| assert!(unsafe { crate::blas::sgemm((m, n, k), c, a, b, 0.5, 2) }));
                check("openblas", &c);
            }
        }
    }
}

#[test]
fn gemv_and_gemm_paths_agree_for_every_m() {
    for format in Format::all() {
        let (rows, cols) = (70, 512);
        let w = PackedMatrix::from_f32(format, rows, cols, &test_data(rows * cols, 20)).unwrap();
        for m in [1, 4, 9, 33] {
            let x = test_data(m * cols, 21);
            let mut a = vec![0f32; m * rows];
            let mut b = vec![0f32; m * rows];
            gemv::gemv(Isa::detect(), &w, &x, m, &mut a);
            gemm::gemm(Isa::detect(), &w, &x, m, &mut b);
            let xq = quantizes_activations(Isa::detect(), format, 1).then(|| quantized_activations(&x, m, cols));
            let (ea, eb) = (max_rel_err_vs(&w, &x, xq.as_deref(), m, &a), max_rel_err(&w, &x, m, &b));
            assert!(ea < TOL_F32 && eb < TOL_F32, "{format} m={m}: gemv {ea:e}, gemm {eb:e}");
        }
    }
}

#[test]
fn simd_and_scalar_agree() {
    for isa in isas().into_iter().filter(|&i| i != Isa::Scalar) {
        simd_and_scalar_agree_for(isa);
    }
}

fn simd_and_scalar_agree_for(simd_isa: Isa) {
    for format in Format::all() {
        let (rows, cols) = (45, 768);
        let w = PackedMatrix::from_f32(format, rows, cols, &test_data(rows * cols, 30)).unwrap();
        let simd = dequantize_all(&w, simd_isa);
        let scalar = dequantize_all(&w, Isa::Scalar);
        assert!(
            simd.iter().zip(&scalar).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{format} dequantization"
        );
        for m in [1, 3, 8, 20] {
            let x = test_data(m * cols, 31);
            let mut a = vec![0f32; m * rows];
            let mut b = vec![0f32; m * rows];
            w.matmul_isa(simd_isa, &x, m, &mut a);
            w.matmul_isa(Isa::Scalar, &x, m, &mut b);
            // Both are f32 sums in different orders: compare on the scale of Σ|w·x| (see max_rel_err).
            let mag = magnitudes(&w, &x, m);
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (p - q).abs() as f64 <= 4e-6 * mag[i],
                    "{format} m={m} at {i}: {p} vs {q}"
                );
            }
        }
    }
}

/// The GEMV kernels on shapes that exercise every tile: row counts that leave 1–3 rows after the 4- and
/// 2-row tiles, every `m` up to 9 (activation groups of 1–4), q8_0 rows whose block count is not a
/// multiple of 8 or even of 2, and f16/bf16 rows that end in a partial vector.
#[test]
fn gemv_tiles_match_scalar() {
    for isa in isas().into_iter().filter(|&i| i != Isa::Scalar) {
        let shapes = [
            (Format::Q8_0, 416),
            (Format::Q8_0, 96),
            (Format::Q8_0, 32),
            (Format::Q4K, 512),
            (Format::F16, 100),
            (Format::F16, 48),
            (Format::Bf16, 7),
            (Format::Bf16, 64),
            (Format::F32, 100),
        ];
        for (format, cols) in shapes {
            for rows in [1, 2, 3, 5, 7, 11] {
                let w = PackedMatrix::from_f32(format, rows, cols, &test_data(rows * cols, 40)).unwrap();
                for m in 1..=9 {
                    let x = test_data(m * cols, 41 + m as u64);
                    let mut a = vec![f32::NAN; m * rows];
                    let mut b = vec![f32::NAN; m * rows];
                    gemv::gemv(isa, &w, &x, m, &mut a);
                    gemv::gemv(Isa::Scalar, &w, &x, m, &mut b);
                    let mag = magnitudes(&w, &x, m);
                    for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                        assert!(
                            (p - q).abs() as f64 <= 4e-6 * mag[i],
                            "{isa:?} {format} {rows}x{cols} m={m} at {i}: {p} vs {q}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_many_equals_separate_calls() {
    let weights: Vec<PackedMatrix> = (0..6)
        .map(|j| {
            let (rows, cols) = if j % 2 == 0 { (96, 128) } else { (128, 96) };
            let format = [Format::Q8_0, Format::F16, Format::F32][j % 3];
            PackedMatrix::from_f32(format, rows, cols, &test_data(rows * cols, 40 + j as u64)).unwrap()
        })
        .collect();
    let ms = [1, 2, 1, 8, 3, 40]; // the last one takes the gemm path
    let xs: Vec<Vec<f32>> = weights
        .iter()
        .zip(ms)
        .map(|(w, m)| test_data(m * w.cols(), 50 + m as u64))
        .collect();
    let mut ys: Vec<Vec<f32>> = weights
        .iter()
        .zip(ms)
        .map(|(w, m)| vec![f32::NAN; m * w.rows()])
        .collect();
    let mut jobs: Vec<MatmulJob> = weights
        .iter()
        .zip(&xs)
        .zip(ms)
        .zip(ys.iter_mut())
        .map(|(((weight, x), m), y)| MatmulJob { weight, x, m, y })
        .collect();
    matmul_many(&mut jobs);
    for ((w, x), (m, y)) in weights.iter().zip(&xs).zip(ms.iter().zip(&ys)) {
        let mut expect = vec![0f32; m * w.rows()];
        w.matmul(x, *m, &mut expect);
        assert!(expect.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

#[test]
fn matmul_many_with_shared_activations() {
    // MoE decoding: every expert's projection reads the same token activations.
    let (rows, cols) = (40, 256);
    let weights: Vec<PackedMatrix> = [Format::Q8_0, Format::Q4K, Format::Q8_0, Format::Bf16]
        .iter()
        .enumerate()
        .map(|(j, &f)| PackedMatrix::from_f32(f, rows, cols, &test_data(rows * cols, 80 + j as u64)).unwrap())
        .collect();
    let x = test_data(2 * cols, 81);
    let mut ys = vec![vec![0f32; 2 * rows]; weights.len()];
    let mut jobs: Vec<MatmulJob> = weights
        .iter()
        .zip(ys.iter_mut())
        .map(|(weight, y)| MatmulJob { weight, x: &x, m: 2, y })
        .collect();
    matmul_many(&mut jobs);
    for (w, y) in weights.iter().zip(&ys) {
        let mut expect = vec![0f32; 2 * rows];
        w.matmul(&x, 2, &mut expect);
        assert_eq!(&expect, y, "{}", w.format());
    }
}

#[test]
fn bad_inputs_are_errors() {
    let e = PackedMatrix::from_f32(Format::Q4K, 2, 300, &vec![0.0; 600]).unwrap_err();
    assert!(matches!(e, KernelError::UnsupportedCols { .. }));
    assert!(
        e.to_string().contains("q4_k") && e.to_string().contains("256") && e.to_string().contains("300"),
        "{e}"
    );
    let e = PackedMatrix::from_f32(Format::F16, 2, 3, &[0.0; 5]).unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::DataLength {
                expected: 6,
                got: 5,
                ..
            }
        ),
        "{e}"
    );
    let e = PackedMatrix::from_bytes(Format::Q8_0, 2, 64, &[0u8; 135]).unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::ByteLength {
                expected: 136,
                got: 135,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("136") && e.to_string().contains("135"), "{e}");
    assert!(PackedMatrix::from_bytes(Format::Q8_0, 2, 40, &[0u8; 0]).is_err());
}

#[test]
fn from_bytes_round_trips() {
    let data = test_data(4 * 256, 60);
    let w = PackedMatrix::from_f32(Format::Q4K, 4, 256, &data).unwrap();
    let v = PackedMatrix::from_bytes(Format::Q4K, 4, 256, w.as_bytes()).unwrap();
    assert_eq!(v.as_bytes(), w.as_bytes());
    assert_eq!(
        (v.rows(), v.cols(), v.format(), v.storage_bytes()),
        (4, 256, Format::Q4K, 4 * 144)
    );
    assert_eq!(v.as_bytes().as_ptr() as usize % 64, 0);
    let mut part = vec![0f32; 2 * 256];
    v.dequantize_rows(1, 2, &mut part);
    assert_eq!(part, dequantize_all(&w, Isa::Scalar)[256..768]);
}

/// A matrix converted in many parallel tasks (the last one short) is byte for byte its row groups
/// converted one at a time: `from_rows` hands each task the right rows.
#[test]
fn conversion_in_tasks_matches_group_by_group() {
    let (rows, cols) = (208, 1024);
    let data = test_data(rows * cols, 61);
    for format in [
        Format::F32,
        Format::F16,
        Format::Bf16,
        Format::Q8_0,
        Format::Q8_0R16,
        Format::Q4K,
    ] {
        let whole = PackedMatrix::from_f32(format, rows, cols, &data).unwrap();
        let group = format.row_group();
        let by_group: Vec<u8> = data
            .chunks(group * cols)
            .flat_map(|g| {
                PackedMatrix::from_f32(format, group, cols, g)
                    .unwrap()
                    .as_bytes()
                    .to_vec()
            })
            .collect();
        assert_eq!(whole.as_bytes(), &by_group[..], "{format:?}");
        let filled = PackedMatrix::from_rows(format, rows, cols, |first_row, out| {
            assert_eq!(out.len() % (group * cols), 0, "{format:?}: whole row groups");
            out.copy_from_slice(&data[first_row * cols..][..out.len()]);
        })
        .unwrap();
        assert_eq!(filled.as_bytes(), whole.as_bytes(), "{format:?}");
    }
}

#[test]
#[should_panic(expected = "matmul: y has")]
fn matmul_checks_lengths() {
    let w = PackedMatrix::from_f32(Format::F32, 3, 4, &[0.0; 12]).unwrap();
    w.matmul(&[0.0; 8], 2, &mut [0.0; 5]);
}

#[test]
fn empty_shapes() {
    let w = PackedMatrix::from_f32(Format::Q8_0, 0, 64, &[]).unwrap();
    w.matmul(&[0.0; 64], 1, &mut []);
    let w = PackedMatrix::from_f32(Format::F32, 3, 8, &[1.0; 24]).unwrap();
    w.matmul(&[], 0, &mut []);
    assert!(!crate::cpu_features().is_empty());
}

/// f64 softmax attention of one query per head, the oracle for `decode_attention`.
fn attention_reference(q: &[f32], keys: &[f32], values: &[f32], len: usize, s: &AttentionShape) -> Vec<f64> {
    let group = s.heads / s.kv_heads;
    let mut out = vec![0f64; s.heads * s.value_dim];
    for h in 0..s.heads {
        let g = h / group;
        let scores: Vec<f64> = (0..len)
            .map(|j| {
                let k = &keys[j * s.key_stride + g * s.key_dim..][..s.key_dim];
                let qh = &q[h * s.key_dim..(h + 1) * s.key_dim];
                qh.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * s.scale as f64
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = scores.iter().map(|x| (x - max).exp()).sum();
        for (j, x) in scores.iter().enumerate() {
            let p = (x - max).exp() / sum;
            let v = &values[j * s.value_stride + g * s.value_dim..][..s.value_dim];
            for (o, &v) in out[h * s.value_dim..(h + 1) * s.value_dim].iter_mut().zip(v) {
                *o += p * v as f64;
            }
        }
    }
    out
}

#[test]
fn decode_attention_matches_f64_reference() {
    // (heads, kv_heads, key_dim, value_dim): MHA, grouped queries, and MLA's shared latent head whose
    // values are the first `value_dim` floats of each key row.
    let mha = |heads, kv, dim| AttentionShape {
        heads,
        kv_heads: kv,
        key_dim: dim,
        value_dim: dim,
        key_stride: kv * dim,
        value_stride: kv * dim,
        scale: 1.0 / (dim as f32).sqrt(),
    };
    let mla = AttentionShape {
        heads: 4,
        kv_heads: 1,
        key_dim: 40,
        value_dim: 32,
        key_stride: 40,
        value_stride: 40,
        scale: 0.15,
    };
    for isa in isas() {
        for (shape, shared) in [(mha(4, 4, 24), false), (mha(6, 2, 19), false), (mla, true)] {
            for len in [1, 2, 7, 100, 1500] {
                let q = test_data(shape.heads * shape.key_dim, len as u64);
                let keys = test_data(len * shape.key_stride, 7 + len as u64);
                let values = if shared {
                    keys.clone()
                } else {
                    test_data(len * shape.value_stride, 11 + len as u64)
                };
                let mut out = vec![f32::NAN; shape.heads * shape.value_dim];
                decode_attention_isa(isa, &q, &keys, &values, None, len, &shape, &mut out);
                let want = attention_reference(&q, &keys, &values, len, &shape);
                let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
                for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    // Tolerance 1e-5: decode_attention: measured worst 3.0e-7 of the largest output, every
                    // kernel set; the margin covers other CPUs' summation orders.
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * scale,
                        "{isa:?} {shape:?} len {len} [{i}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn decode_attention_rejects_short_caches() {
    let shape = AttentionShape {
        heads: 2,
        kv_heads: 2,
        key_dim: 8,
        value_dim: 8,
        key_stride: 16,
        value_stride: 16,
        scale: 1.0,
    };
    let (q, mut out) = (vec![0f32; 16], vec![0f32; 16]);
    let short = vec![0f32; 16 * 3 - 1];
    let result = std::panic::catch_unwind(move || {
        crate::decode_attention(&q, &short, &short, 3, &shape, &mut out);
    });
    assert!(result.is_err(), "a cache of fewer than 3 positions must be refused");
}

#[test]
fn prefill_attention_matches_f64_reference() {
    // (heads, kv_heads, head_dim, queries, keys, causal)
    let cases = [
        (4, 4, 24, 30, 30, false),   // the vision tower: every token sees every token
        (6, 2, 19, 17, 17, true),    // a causal prompt, grouped queries
        (3, 3, 16, 5, 40, true),     // a causal chunk after 35 cached positions
        (2, 1, 8, 1, 9, true),       // one row
        (2, 2, 16, 300, 300, false), // several query blocks
        (2, 1, 16, 260, 290, true),  // several causal blocks after 30 cached positions
    ];
    for isa in isas() {
        for (heads, kv_heads, hd, nq, nk, causal) in cases {
            // q, k and v interleaved per position like a fused qkv projection, plus 3 unused values.
            let stride = (heads + 2 * kv_heads) * hd + 3;
            let (q_width, kv_width) = (heads * hd, kv_heads * hd);
            let data = test_data(nk.max(nq) * stride, (heads * nq + nk) as u64);
            let rows = |offset: usize| HeadRows {
                data: &data[offset..],
                row_stride: stride,
            };
            let shape = PrefillShape {
                heads,
                kv_heads,
                head_dim: hd,
                queries: nq,
                keys: nk,
                scale: 0.3,
                causal,
            };
            let out_stride = q_width + 5;
            let mut out = vec![f32::NAN; nq * out_stride];
            let (q, k, v) = (rows(0), rows(q_width), rows(q_width + kv_width));
            prefill_attention_isa(isa, q, k, v, &shape, &mut out, out_stride);
            let one = AttentionShape {
                heads,
                kv_heads,
                key_dim: hd,
                value_dim: hd,
                key_stride: stride,
                value_stride: stride,
                scale: 0.3,
            };
            for i in 0..nq {
                let visible = if causal { nk - nq + i + 1 } else { nk };
                let want = attention_reference(&q.data[i * stride..][..q_width], k.data, v.data, visible, &one);
                let got = &out[i * out_stride..][..q_width];
                let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
                for (j, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    // Tolerance 1e-5: prefill_attention: measured worst 4.5e-7 of the largest output, every
                    // kernel set; the margin covers other CPUs' summation orders.
                    assert!(
                        (g as f64 - w).abs() <= 1e-5 * scale,
                        "{isa:?} {shape:?} query {i} [{j}]: {g} vs {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn shared_bytes_are_used_in_place_and_checked() {
    let (rows, cols) = (5, 64);
    let x = test_data(2 * cols, 3);
    for format in [Format::F32, Format::Q8_0] {
        let owned = PackedMatrix::from_f32(format, rows, cols, &test_data(rows * cols, 9)).unwrap();
        // At offset 1 (f32 misaligned: copied) and 4 (in place), after one leading byte or four.
        for offset in [1usize, 4] {
            let mut buffer = vec![0u8; offset];
            buffer.extend_from_slice(owned.as_bytes());
            let source: crate::SharedBytes = std::sync::Arc::new(buffer);
            let shared = PackedMatrix::from_shared(format, rows, cols, source.clone(), offset).unwrap();
            assert_eq!(shared.as_bytes(), owned.as_bytes());
            let (mut a, mut b) = (vec![0f32; 2 * rows], vec![0f32; 2 * rows]);
            owned.matmul(&x, 2, &mut a);
            shared.matmul(&x, 2, &mut b);
            assert_eq!(a, b, "{format} at offset {offset}");
            let short = PackedMatrix::from_shared(format, rows + 1, cols, source, offset);
            assert!(
                matches!(short, Err(KernelError::ByteLength { .. })),
                "{format}: a short source"
            );
        }
    }
}

#[test]
fn f16_cache_values_widen_exactly() {
    use crate::CacheValue;
    for bits in 0..=u16::MAX {
        let h = f16::from_bits(bits);
        let (got, want) = (h.to_f32_const(), CacheValue::to_f32(h));
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{bits:#06x}: {want} vs half's {got}"
        );
    }
}

/// Head layouts for the cache-format tests, with grouped queries: widths 128 (tiny's heads: the
/// four-accumulator loop of the explicit SIMD dot products), 24 (single vectors and, with 16 lanes,
/// a scalar tail) and 19 (tails only).
fn cache_test_shapes() -> impl Iterator<Item = AttentionShape> {
    [(4, 2, 24), (4, 4, 128), (3, 1, 19)]
        .into_iter()
        .map(|(heads, kv_heads, dim)| AttentionShape {
            heads,
            kv_heads,
            key_dim: dim,
            value_dim: dim,
            key_stride: kv_heads * dim,
            value_stride: kv_heads * dim,
            scale: 0.2,
        })
}

/// Every output within `1e-5` of the largest reference output (at least 1). Measured worst: f16
/// caches 4.1e-8 (their values are exact in f16 and in the reference), i8 caches 1.8e-6 (the kernel
/// applies the scales to the scores, the reference to the values); the margin covers other CPUs'
/// summation orders.
fn assert_matches_reference(out: &[f32], want: &[f64], what: &str) {
    let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
    for (i, (&g, &w)) in out.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= 1e-5 * scale, "{what} [{i}]: {g} vs {w}");
    }
}

#[test]
fn decode_attention_reads_f16_caches() {
    for shape in cache_test_shapes() {
        let len = 300;
        let q = test_data(shape.heads * shape.key_dim, 1);
        let round = |v: Vec<f32>| -> (Vec<f16>, Vec<f32>) {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let back = h.iter().map(|x| x.to_f32()).collect();
            (h, back)
        };
        let (keys16, keys) = round(test_data(len * shape.key_stride, 2));
        let (values16, values) = round(test_data(len * shape.value_stride, 3));
        let want = attention_reference(&q, &keys, &values, len, &shape);
        for isa in isas() {
            let mut out = vec![f32::NAN; shape.heads * shape.value_dim];
            decode_attention_isa(isa, &q, &keys16, &values16, None, len, &shape, &mut out);
            assert_matches_reference(&out, &want, &format!("{isa:?} {shape:?}"));
        }
    }
}

/// The f32 caches `floats` as f16 caches, and as i8 caches with their per-head scales.
#[allow(clippy::type_complexity)]
fn f16_and_i8_caches(floats: &[Vec<f32>], head_dim: usize) -> (Vec<Vec<f16>>, Vec<(Vec<i8>, Vec<f32>)>) {
    let halves = floats
        .iter()
        .map(|v| v.iter().map(|&x| f16::from_f32(x)).collect())
        .collect();
    let bytes = floats
        .iter()
        .map(|v| {
            let (mut q, mut s) = (vec![0i8; v.len()], vec![0f32; v.len() / head_dim]);
            crate::quantize_i8_rows(v, head_dim, &mut q, &mut s);
            (q, s)
        })
        .collect();
    (halves, bytes)
}

/// A batch's outputs are each sequence's alone, bit for bit, for every cache kind and an empty cache.
#[test]
fn decode_attention_batch_matches_single_sequences() {
    let shape = cache_test_shapes().nth(1).expect("the 128-wide layout");
    let lens = [0usize, 1, 37, 700];
    let row = shape.kv_heads * shape.key_dim;
    let queries: Vec<Vec<f32>> = (0..lens.len())
        .map(|i| test_data(shape.heads * shape.key_dim, 90 + i as u64))
        .collect();
    let floats: Vec<Vec<f32>> = lens.iter().map(|&l| test_data(l.max(1) * row, 95 + l as u64)).collect();
    let (halves, bytes) = f16_and_i8_caches(&floats, shape.key_dim);
    for isa in isas() {
        fn run<T: crate::CacheValue>(
            isa: Isa,
            shape: &AttentionShape,
            queries: &[Vec<f32>],
            caches: &[&[T]],
            scales: &[Option<crate::RowScales>],
            lens: &[usize],
        ) {
            let width = shape.heads * shape.value_dim;
            let mut batched = vec![f32::NAN; lens.len() * width];
            let mut calls: Vec<crate::DecodeAttention<T>> = batched
                .chunks_exact_mut(width)
                .enumerate()
                .map(|(i, out)| crate::DecodeAttention {
                    q: &queries[i],
                    keys: caches[i],
                    values: caches[i],
                    scales: scales[i],
                    len: lens[i],
                    out,
                })
                .collect();
            crate::attention::decode_attention_batch_isa(isa, &mut calls, shape);
            for (i, got) in batched.chunks_exact(width).enumerate() {
                let mut alone = vec![f32::NAN; width];
                decode_attention_isa(
                    isa,
                    &queries[i],
                    caches[i],
                    caches[i],
                    scales[i],
                    lens[i],
                    shape,
                    &mut alone,
                );
                assert!(
                    got.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?} sequence {i} (len {})",
                    lens[i]
                );
            }
        }
        let none = vec![None; lens.len()];
        let f32s: Vec<&[f32]> = floats.iter().map(Vec::as_slice).collect();
        run(isa, &shape, &queries, &f32s, &none, &lens);
        let f16s: Vec<&[f16]> = halves.iter().map(Vec::as_slice).collect();
        run(isa, &shape, &queries, &f16s, &none, &lens);
        let i8s: Vec<&[i8]> = bytes.iter().map(|(q, _)| q.as_slice()).collect();
        let i8_scales: Vec<Option<crate::RowScales>> = bytes
            .iter()
            .map(|(_, s)| Some(crate::RowScales { keys: s, values: s }))
            .collect();
        run(isa, &shape, &queries, &i8s, &i8_scales, &lens);
    }
}

/// Queries over a shared prefix and their own positions: each output is the attention over the
/// concatenated positions, and bit for bit what the query gives in a call of its own.
#[test]
fn decode_attention_shared_reads_pieces_in_order() {
    let shape = cache_test_shapes().nth(1).expect("the 128-wide layout");
    let row = shape.kv_heads * shape.key_dim;
    // Cache 0 is the shared prefix; 1..=3 are three sequences' own positions (one empty).
    let lens = [500usize, 0, 3, 40];
    let caches: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| test_data(l.max(1) * row, 40 + i as u64))
        .collect();
    let rows: Vec<crate::CacheRows<f32>> = caches
        .iter()
        .zip(lens)
        .map(|(c, len)| crate::CacheRows {
            keys: c,
            values: c,
            scales: None,
            len,
        })
        .collect();
    // Three sequences after the prefix, and one that reads only its own positions.
    let pieces: [&[usize]; 4] = [&[0, 1], &[0, 2], &[0, 3], &[3]];
    let queries: Vec<Vec<f32>> = (0..pieces.len())
        .map(|i| test_data(shape.heads * shape.key_dim, 60 + i as u64))
        .collect();
    let width = shape.heads * shape.value_dim;
    for isa in isas() {
        let mut outs = vec![f32::NAN; pieces.len() * width];
        let mut calls: Vec<crate::DecodeQuery> = outs
            .chunks_exact_mut(width)
            .enumerate()
            .map(|(i, out)| crate::DecodeQuery {
                q: &queries[i],
                caches: pieces[i],
                out,
            })
            .collect();
        crate::attention::decode_attention_shared_isa(isa, &rows, &mut calls, &shape);
        for (i, got) in outs.chunks_exact(width).enumerate() {
            let joined: Vec<f32> = pieces[i]
                .iter()
                .flat_map(|&c| caches[c][..lens[c] * row].iter().copied())
                .collect();
            let len = joined.len() / row;
            let want = attention_reference(&queries[i], &joined, &joined, len, &shape);
            assert_matches_reference(got, &want, &format!("{isa:?} query {i}"));
            let mut alone = vec![f32::NAN; width];
            let mut call = [crate::DecodeQuery {
                q: &queries[i],
                caches: pieces[i],
                out: &mut alone,
            }];
            crate::attention::decode_attention_shared_isa(isa, &rows, &mut call, &shape);
            assert!(
                got.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?} query {i} alone"
            );
        }
    }
}

/// Queries sharing an f16 or i8 cache piece go together through each block of its rows
/// (`attend_positions_shared`; from 4 readers on the block is widened once for all): each output is
/// still bit for bit the query's own call, for 1-5 readers (rows read in place and widened),
/// position counts with and without a short last block, and every test head layout. (On AMX-INT8,
/// shared i8 pieces of 128-value heads take the tile kernel instead:
/// `amx_attention_matches_the_dequantized_cache`.)
#[test]
fn decode_attention_shared_readers_match_single_queries() {
    fn run<T: crate::CacheValue>(
        isa: Isa,
        shape: &AttentionShape,
        caches: &[Vec<T>],
        scales: &[Option<crate::RowScales>],
        lens: &[usize],
    ) {
        let rows: Vec<crate::CacheRows<T>> = (0..caches.len())
            .map(|c| crate::CacheRows {
                keys: &caches[c],
                values: &caches[c],
                scales: scales[c],
                len: lens[c],
            })
            .collect();
        let width = shape.heads * shape.value_dim;
        for readers in 1..=5 {
            // Every query reads the shared piece 0, then a piece of its own (1 or 2).
            let pieces: Vec<[usize; 2]> = (0..readers).map(|i| [0, 1 + i % 2]).collect();
            let queries: Vec<Vec<f32>> = (0..readers)
                .map(|i| test_data(shape.heads * shape.key_dim, 70 + i as u64))
                .collect();
            let mut outs = vec![f32::NAN; readers * width];
            let mut calls: Vec<crate::DecodeQuery> = outs
                .chunks_exact_mut(width)
                .enumerate()
                .map(|(i, out)| crate::DecodeQuery {
                    q: &queries[i],
                    caches: &pieces[i],
                    out,
                })
                .collect();
            crate::attention::decode_attention_shared_isa(isa, &rows, &mut calls, shape);
            for (i, got) in outs.chunks_exact(width).enumerate() {
                let mut alone = vec![f32::NAN; width];
                let mut call = [crate::DecodeQuery {
                    q: &queries[i],
                    caches: &pieces[i],
                    out: &mut alone,
                }];
                crate::attention::decode_attention_shared_isa(isa, &rows, &mut call, shape);
                assert!(
                    got.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?} {readers} readers, query {i}"
                );
            }
        }
    }
    for shape in cache_test_shapes() {
        let row = shape.kv_heads * shape.key_dim;
        for lens in [[300usize, 5, 0], [263, 2, 9]] {
            let floats: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(c, &l)| test_data(l.max(1) * row, 50 + c as u64))
                .collect();
            let (halves, bytes) = f16_and_i8_caches(&floats, shape.key_dim);
            let i8s: Vec<Vec<i8>> = bytes.iter().map(|(q, _)| q.clone()).collect();
            let i8_scales: Vec<Option<crate::RowScales>> = bytes
                .iter()
                .map(|(_, s)| Some(crate::RowScales { keys: s, values: s }))
                .collect();
            for isa in isas() {
                run(isa, &shape, &halves, &[None; 3], &lens);
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Amx && crate::simd::amx_attention::supports(&shape) {
                    continue;
                }
                run(isa, &shape, &i8s, &i8_scales, &lens);
            }
        }
    }
}

/// Several queries over one i8 cache take the AMX-INT8 kernel (`simd::amx_attention`) where the
/// CPU has it: its outputs against the f64 attention over the dequantized cache, for positions that
/// fill tiles exactly and not, key/value groups of 1 and 4 heads (4 per group: more queries than
/// one tile's 16 columns, so they are split), one query per run as the baseline.
#[test]
fn amx_attention_matches_the_dequantized_cache() {
    if !isas().contains(&Isa::Amx) {
        eprintln!("no AMX on this CPU: nothing to compare");
        return;
    }
    let shapes = [(10, 10), (8, 2)].map(|(heads, kv_heads)| AttentionShape {
        heads,
        kv_heads,
        key_dim: 128,
        value_dim: 128,
        key_stride: kv_heads * 128,
        value_stride: kv_heads * 128,
        scale: 1.0 / (128f32).sqrt(),
    });
    let mut worst = [0f64; 2];
    for shape in shapes {
        for len in [1usize, 15, 16, 17, 64, 65, 300, 1039] {
            let row = shape.kv_heads * 128;
            let quantize = |seed: u64| {
                let mut x = test_data(len * row, seed);
                // Magnitudes that differ by position and head, so a scale read for the wrong one shows.
                for (r, v) in x.chunks_exact_mut(128).enumerate() {
                    v.iter_mut().for_each(|v| *v *= 0.25 + (r % 7) as f32);
                }
                let (mut q8, mut scales) = (vec![0i8; x.len()], vec![0f32; len * shape.kv_heads]);
                crate::quantize_i8_rows(&x, 128, &mut q8, &mut scales);
                let back: Vec<f32> = q8
                    .chunks_exact(128)
                    .zip(&scales)
                    .flat_map(|(q, &s)| q.iter().map(move |&v| v as f32 * s))
                    .collect();
                (q8, scales, back)
            };
            let (keys, key_scales, keys_f32) = quantize(7);
            let (values, value_scales, values_f32) = quantize(8);
            let cache = [crate::CacheRows {
                keys: &keys[..],
                values: &values[..],
                scales: Some(crate::RowScales {
                    keys: &key_scales,
                    values: &value_scales,
                }),
                len,
            }];
            let readers = 9;
            let queries: Vec<Vec<f32>> = (0..readers)
                .map(|i| test_data(shape.heads * 128, 70 + i as u64))
                .collect();
            let width = shape.heads * 128;
            for (k, isa) in [Isa::Avx512, Isa::Amx].into_iter().enumerate() {
                let mut outs = vec![f32::NAN; readers * width];
                let mut calls: Vec<crate::DecodeQuery> = outs
                    .chunks_exact_mut(width)
                    .enumerate()
                    .map(|(i, out)| crate::DecodeQuery {
                        q: &queries[i],
                        caches: &[0],
                        out,
                    })
                    .collect();
                crate::attention::decode_attention_shared_isa(isa, &cache, &mut calls, &shape);
                for (i, got) in outs.chunks_exact(width).enumerate() {
                    let want = attention_reference(&queries[i], &keys_f32, &values_f32, len, &shape);
                    let scale = want.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
                    let err = got
                        .iter()
                        .zip(&want)
                        .map(|(&g, &w)| (g as f64 - w).abs())
                        .fold(0.0, f64::max)
                        / scale;
                    worst[k] = worst[k].max(err);
                    assert!(
                        err <= 2e-3,
                        "{isa:?} {shape:?} len {len} query {i}: {err:.2e} of the largest output"
                    );
                }
            }
        }
    }
    eprintln!(
        "largest error over the largest output: one query at a time {:.2e}, AMX {:.2e}",
        worst[0], worst[1]
    );
}

#[test]
fn i8_rows_round_to_nearest() {
    let x = [1.0, -0.5, 0.25, -1.0, 0.0, 0.0, 0.0, 0.0, 3.0, -6.0, 1e-3, 6.0];
    let (mut q, mut scales) = ([0i8; 12], [0f32; 3]);
    crate::quantize_i8_rows(&x, 4, &mut q, &mut scales);
    // -0.5 · 127 = -63.5 is a tie (to even: -64); 0.25 · 127 = 31.75; an all-zero row has scale 0.
    assert_eq!(q, [127, -64, 32, -127, 0, 0, 0, 0, 64, -127, 0, 127]);
    assert_eq!(scales, [1.0 / 127.0, 0.0, 6.0 / 127.0]);
}

#[test]
fn decode_attention_reads_i8_caches() {
    for shape in cache_test_shapes() {
        let (kv_heads, dim, len) = (shape.kv_heads, shape.key_dim, 300);
        let q = test_data(shape.heads * shape.key_dim, 1);
        // Rows with magnitudes that differ by position and head, so a scale read for the wrong
        // position or head shows.
        let quantize = |seed: u64| -> (Vec<i8>, Vec<f32>, Vec<f32>) {
            let mut x = test_data(len * kv_heads * dim, seed);
            for (r, row) in x.chunks_exact_mut(dim).enumerate() {
                row.iter_mut().for_each(|v| *v *= 0.25 + (r % 7) as f32);
            }
            let (mut q8, mut scales) = (vec![0i8; x.len()], vec![0f32; len * kv_heads]);
            crate::quantize_i8_rows(&x, dim, &mut q8, &mut scales);
            for (r, (row, q8)) in x.chunks_exact(dim).zip(q8.chunks_exact(dim)).enumerate() {
                for (v, &q) in row.iter().zip(q8) {
                    assert!(
                        (v - q as f32 * scales[r]).abs() <= 0.5001 * scales[r],
                        "rounding of row {r}"
                    );
                }
            }
            let back = q8
                .iter()
                .enumerate()
                .map(|(i, &v)| v as f32 * scales[i / dim])
                .collect();
            (q8, scales, back)
        };
        let (keys8, key_scales, keys) = quantize(2);
        let (values8, value_scales, values) = quantize(3);
        // Against the dequantized cache, so only f32 rounding remains.
        let want = attention_reference(&q, &keys, &values, len, &shape);
        let scales = crate::attention::RowScales {
            keys: &key_scales,
            values: &value_scales,
        };
        for isa in isas() {
            let mut out = vec![f32::NAN; shape.heads * shape.value_dim];
            decode_attention_isa(isa, &q, &keys8, &values8, Some(scales), len, &shape, &mut out);
            assert_matches_reference(&out, &want, &format!("{isa:?} {shape:?}"));
        }
    }
}

/// q8_0_r16 holds exactly q8_0's bytes, reordered: the same matrix dequantizes bit for bit alike, also
/// for row ranges that start and end inside a group, and the GGUF bytes round-trip.
#[test]
fn q8_0_r16_dequantizes_as_q8_0() {
    let (rows, cols) = (48, 96);
    let data = test_data(rows * cols, 80);
    let plain = PackedMatrix::from_f32(Format::Q8_0, rows, cols, &data).unwrap();
    let r16 = PackedMatrix::from_f32(Format::Q8_0R16, rows, cols, &data).unwrap();
    assert_eq!(r16.storage_bytes(), plain.storage_bytes());
    assert_ne!(r16.as_bytes(), plain.as_bytes(), "the layout differs");
    for isa in isas() {
        assert!(dequantize_all(&r16, isa)
            .iter()
            .zip(dequantize_all(&plain, isa))
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        for (start, n) in [(5, 20), (16, 16), (0, 1), (47, 1), (3, 45)] {
            let (mut a, mut b) = (vec![0f32; n * cols], vec![0f32; n * cols]);
            r16.dequantize_rows_isa(isa, start, n, &mut a);
            plain.dequantize_rows_isa(isa, start, n, &mut b);
            assert_eq!(a, b, "{isa:?} rows {start}..{}", start + n);
        }
    }
    let again = PackedMatrix::from_bytes(Format::Q8_0R16, rows, cols, r16.as_bytes()).unwrap();
    assert_eq!(dequantize_all(&again, Isa::Scalar), dequantize_all(&plain, Isa::Scalar));
    // Rows must fill whole groups of 16.
    let e = PackedMatrix::from_f32(Format::Q8_0R16, 40, cols, &data[..40 * cols]).unwrap_err();
    assert!(e.to_string().contains("groups of 16"), "{e}");
    assert!(PackedMatrix::from_bytes(Format::Q8_0R16, 8, cols, &plain.as_bytes()[..8 * 102]).is_err());
}

/// The q8_0_r16 kernels (AVX-512, AVX2, and the scalar q8_0 kernel after de-interleaving) compute what
/// the q8_0 kernels compute for the same weights: the same exact integer block dot products, summed in
/// another order, so they agree to f32 rounding. q8_0_r16 stays on these kernels at every m, so above
/// q8_0's GEMV limit (32 rows) the q8_0 side is computed 32 rows at a time (each activation row is
/// quantized on its own, so that changes nothing).
/// Measured worst |difference| / Σ|w·x| over all of them: 3.5e-7 (2026-12-02, every kernel set of an
/// Emerald Rapids); the bound, as in `simd_and_scalar_agree`, is ~10x that.
#[test]
fn q8_0_r16_matmul_matches_q8_0() {
    for (rows, cols) in [(32, 1280), (96, 160), (16, 32)] {
        let data = test_data(rows * cols, 81);
        let plain = PackedMatrix::from_f32(Format::Q8_0, rows, cols, &data).unwrap();
        let r16 = PackedMatrix::from_f32(Format::Q8_0R16, rows, cols, &data).unwrap();
        for m in [1, 2, 3, 4, 5, 7, 8, 9, 13, 17, 32, 33, 100] {
            let x = test_data(m * cols, 82 + m as u64);
            let mag = magnitudes(&plain, &x, m);
            for isa in isas() {
                #[cfg(target_arch = "x86_64")]
                if crate::gemv::uses_amx_bf16(isa, &r16, m) {
                    continue; // bf16 products: `amx_bf16_matches_the_dequantized_product`
                }
                let (mut a, mut b) = (vec![f32::NAN; m * rows], vec![f32::NAN; m * rows]);
                r16.matmul_isa(isa, &x, m, &mut a);
                for (x, b) in x.chunks(32 * cols).zip(b.chunks_mut(32 * rows)) {
                    plain.matmul_isa(isa, x, x.len() / cols, b);
                }
                for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (p - q).abs() as f64 <= 4e-6 * mag[i],
                        "{rows}x{cols} m={m} {isa:?} at {i}: {p} vs {q}"
                    );
                }
            }
        }
    }
}

/// q8_0_r16 at the AVX2 tiles' limit and just above it, where (AVX2 beside OpenBLAS) the product
/// goes to dequantized panels + sgemm with the f32 activations instead: each against the f64 product
/// of the dequantized weights with the activations that path uses. Elsewhere both sides are the tiles.
#[test]
fn q8_0_r16_matmul_on_both_sides_of_the_avx2_tile_limit() {
    let (rows, cols) = (32, 96);
    let w = PackedMatrix::from_f32(Format::Q8_0R16, rows, cols, &test_data(rows * cols, 85)).unwrap();
    for m in [2048, 2049] {
        let x = test_data(m * cols, 86);
        let xq = quantized_activations(&x, m, cols);
        for isa in isas() {
            #[cfg(target_arch = "x86_64")]
            if crate::gemv::uses_amx_bf16(isa, &w, m) {
                continue; // bf16 products: `amx_bf16_matches_the_dequantized_product`
            }
            let quantized = quantizes_activations(isa, Format::Q8_0R16, m);
            let mut y = vec![f32::NAN; m * rows];
            w.matmul_isa(isa, &x, m, &mut y);
            let e = max_rel_err_vs(&w, &x, quantized.then_some(&xq[..]), m, &y);
            assert!(
                e < TOL_F32,
                "m={m} {isa:?} (8-bit activations: {quantized}): rel err {e:e}"
            );
        }
    }
}

/// MoE decoding runs q8_0_r16 experts through `matmul_many` (row chunks of whole groups, shared
/// activation quantization) beside plain q8_0 ones. Measured worst difference 9.9e-8 of Σ|w·x|.
#[test]
fn matmul_many_with_q8_0_r16() {
    let (rows, cols) = (160, 256);
    let data = test_data(rows * cols, 83);
    let plain = PackedMatrix::from_f32(Format::Q8_0, rows, cols, &data).unwrap();
    let r16 = PackedMatrix::from_f32(Format::Q8_0R16, rows, cols, &data).unwrap();
    for m in [1, 6] {
        let x = test_data(m * cols, 84);
        let (mut a, mut b) = (vec![0f32; m * rows], vec![0f32; m * rows]);
        let mut jobs = vec![
            MatmulJob {
                weight: &r16,
                x: &x,
                m,
                y: &mut a,
            },
            MatmulJob {
                weight: &plain,
                x: &x,
                m,
                y: &mut b,
            },
        ];
        matmul_many(&mut jobs);
        let mag = magnitudes(&plain, &x, m);
        assert!(a
            .iter()
            .zip(&b)
            .zip(&mag)
            .all(|((p, q), s)| (p - q).abs() as f64 <= 4e-6 * s));
    }
}

/// The SIMD group-to-rows copy gives the scalar one's bytes: the plain q8_0 rows the group was made from.
#[test]
fn q8_0_r16_groups_back_to_rows_on_every_kernel_set() {
    for cols in [32, 96, 1280] {
        let data = test_data(16 * cols, 85);
        let plain = PackedMatrix::from_f32(Format::Q8_0, 16, cols, &data).unwrap();
        let r16 = PackedMatrix::from_f32(Format::Q8_0R16, 16, cols, &data).unwrap();
        for isa in isas() {
            let mut rows = vec![0u8; plain.storage_bytes()];
            isa.deinterleave_r16(r16.as_bytes(), cols, 0, 16, &mut rows);
            assert_eq!(rows, plain.as_bytes(), "{isa:?} cols={cols}");
        }
    }
}

/// The AMX tiles compute the same exact integer block dot products as the AVX-512 ones and scale and
/// sum them in the same order, so their results are identical, for full 16-row tiles and the partial
/// ones after them alike.
#[cfg(target_arch = "x86_64")]
#[test]
fn amx_matches_avx512_exactly() {
    let isas = isas();
    if !isas.contains(&Isa::Amx) {
        eprintln!("no AMX here: nothing to compare");
        return;
    }
    let (rows, cols) = (48, 320);
    let r16 = PackedMatrix::from_f32(Format::Q8_0R16, rows, cols, &test_data(rows * cols, 91)).unwrap();
    // From MIN_ROWS (128) on, q8_0_r16 goes to the AMX-BF16 kernel (see the next test).
    for m in [8, 9, 15, 16, 17, 24, 33, 100] {
        let x = test_data(m * cols, 92 + m as u64);
        let (mut amx, mut avx512) = (vec![f32::NAN; m * rows], vec![f32::NAN; m * rows]);
        r16.matmul_isa(Isa::Amx, &x, m, &mut amx);
        r16.matmul_isa(Isa::Avx512, &x, m, &mut avx512);
        assert_eq!(amx, avx512, "m = {m}");
    }
}

/// The AMX-BF16 kernel (q8_0_r16 with 128 or more activation rows) against the dequantized weights
/// times the activations in f64: weights and activations are rounded to bf16 (relative error <= 2^-8
/// each), so every output is within 2 · 2^-8 (7.8e-3) of Σ|w·x|, which a sum dominated by one product
/// of two outliers nearly reaches. Measured worst |difference| / Σ|w·x|: 5.4e-3 (such a product);
/// the bound is 8e-3. Shapes: pairs of row groups and an odd one, a partial last block (4304
/// inputs, as SigLIP's fc2), activation rows that end in a partial step of 32.
#[cfg(target_arch = "x86_64")]
#[test]
fn amx_bf16_matches_the_dequantized_product() {
    if !crate::simd::amx_bf16::available() {
        eprintln!("no AMX-BF16 here: nothing to check");
        return;
    }
    let mut worst = 0f64;
    for (rows, cols) in [(48, 320), (32, 4304), (16, 64), (96, 1152)] {
        let r16 = PackedMatrix::from_f32(Format::Q8_0R16, rows, cols, &test_data(rows * cols, 95)).unwrap();
        let mut w = vec![0f32; rows * cols];
        r16.dequantize_rows_isa(Isa::Scalar, 0, rows, &mut w);
        for m in [128, 129, 160, 200] {
            let x = test_data(m * cols, 96 + m as u64);
            let mut y = vec![f32::NAN; m * rows];
            r16.matmul_isa(Isa::Amx, &x, m, &mut y);
            for i in 0..m {
                for r in 0..rows {
                    let (xs, ws) = (&x[i * cols..(i + 1) * cols], &w[r * cols..(r + 1) * cols]);
                    let want: f64 = xs.iter().zip(ws).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let mag: f64 = xs.iter().zip(ws).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                    let err = (y[i * rows + r] as f64 - want).abs() / mag.max(1e-30);
                    worst = worst.max(err);
                    assert!(
                        err <= 8e-3,
                        "{rows}x{cols} m={m} [{i}, {r}]: {} vs {want}",
                        y[i * rows + r]
                    );
                }
            }
        }
    }
    eprintln!("AMX-BF16 worst relative error: {worst:.2e}");
    // A prompt's experts: `matmul_many` sends them to the same kernel in one dispatch (two products
    // sharing their input, one with its own), bit for bit what each gives alone.
    let (rows, cols, m) = (64, 256, 150);
    let w: Vec<PackedMatrix> = (0..3)
        .map(|i| PackedMatrix::from_f32(Format::Q8_0R16, rows, cols, &test_data(rows * cols, 97 + i)).unwrap())
        .collect();
    let (x, x2) = (test_data(m * cols, 100), test_data(m * cols, 101));
    let mut outs = vec![vec![f32::NAN; m * rows]; 3];
    let mut jobs: Vec<crate::MatmulJob> = outs
        .iter_mut()
        .enumerate()
        .map(|(i, y)| crate::MatmulJob {
            weight: &w[i],
            x: if i == 2 { &x2 } else { &x },
            m,
            y,
        })
        .collect();
    crate::gemv::matmul_many_isa(Isa::Amx, &mut jobs);
    for (i, out) in outs.iter().enumerate() {
        let mut alone = vec![f32::NAN; m * rows];
        w[i].matmul_isa(Isa::Amx, if i == 2 { &x2 } else { &x }, m, &mut alone);
        assert_eq!(out, &alone, "product {i}");
    }
}

/// q8_0_r16 rows that end in a partial block (SigLIP's fc2: 4304 inputs) are stored and multiplied
/// as if padded with zero columns: bit for bit what the explicitly padded matrix gives, on every
/// kernel set, and their dequantized values are the padded matrix's first `cols`.
#[test]
fn q8_0_r16_rows_with_a_partial_block_act_as_zero_padded() {
    let (rows, cols, padded) = (32, 80, 96);
    let data = test_data(rows * cols, 93);
    let mut wide = vec![0f32; rows * padded];
    for (w, d) in wide.chunks_exact_mut(padded).zip(data.chunks_exact(cols)) {
        w[..cols].copy_from_slice(d);
    }
    let ragged = PackedMatrix::from_f32(Format::Q8_0R16, rows, cols, &data).unwrap();
    let full = PackedMatrix::from_f32(Format::Q8_0R16, rows, padded, &wide).unwrap();
    assert_eq!(
        ragged.as_bytes(),
        full.as_bytes(),
        "the same bytes as the zero-padded matrix"
    );
    assert!(PackedMatrix::from_bytes(Format::Q8_0R16, rows, cols, full.as_bytes()).is_ok());
    assert!(
        PackedMatrix::from_f32(Format::Q8_0, rows, cols, &data).is_err(),
        "plain q8_0 needs whole blocks"
    );
    for isa in isas() {
        let (mut a, mut b) = (vec![0f32; rows * cols], vec![0f32; rows * padded]);
        ragged.dequantize_rows_isa(isa, 0, rows, &mut a);
        full.dequantize_rows_isa(isa, 0, rows, &mut b);
        for (a, b) in a.chunks_exact(cols).zip(b.chunks_exact(padded)) {
            assert_eq!(a, &b[..cols], "{isa:?}");
        }
        for m in [1, 3, 8, 17] {
            let x = test_data(m * cols, 94 + m as u64);
            let mut x_wide = vec![0f32; m * padded];
            for (w, d) in x_wide.chunks_exact_mut(padded).zip(x.chunks_exact(cols)) {
                w[..cols].copy_from_slice(d);
            }
            let (mut y, mut y_wide) = (vec![f32::NAN; m * rows], vec![f32::NAN; m * rows]);
            ragged.matmul_isa(isa, &x, m, &mut y);
            full.matmul_isa(isa, &x_wide, m, &mut y_wide);
            assert_eq!(y, y_wide, "{isa:?} m = {m}");
        }
    }
}
