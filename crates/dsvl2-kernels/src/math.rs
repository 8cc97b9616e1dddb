//! Element-wise math the compiler can vectorise: libm's `expf` is a call per value, and softmax over the
//! vision tower's attention scores (1.15 G values for a 5-tile image) spent ~8% of the vision time in it.

/// `e^x` within a relative error of 2 `f32::EPSILON` (tested) for `x` in [-87.3, 88.3] (Cephes' `expf`: `x = n·ln2 + r`, a degree-6 polynomial
/// for `e^r` on |r| ≤ ln2/2, then `2^n` through the exponent bits). Below that range the result is the
/// smallest normal float instead of a denormal or zero, above it `e^88.3` instead of infinity, which is
/// irrelevant where it is used (softmax after subtracting the maximum, so `x ≤ 0`). NaN stays NaN.
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let n = mul_add::<FMA>(x, LOG2E, 0.5).floor();
    let r = mul_add::<FMA>(n, -LN2_LO, mul_add::<FMA>(n, -LN2_HI, x));
    let mut p = 1.987_569_1e-4f32;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1] {
        p = mul_add::<FMA>(p, r, c);
    }
    let er = mul_add::<FMA>(p * r, r, r) + 1.0;
    // 2^n through the exponent bits. n + 127 is an integer in [1, 255]; adding 2^23 puts it in the
    // low mantissa bits, so integer operations alone extract it. (`n as i32` is a saturating
    // conversion that LLVM scalarised lane by lane, with NaN checks: most of softmax's time, perf.)
    let biased = (n + (127.0 + 8_388_608.0)).to_bits().wrapping_sub(0x4B00_0000);
    er * f32::from_bits(biased << 23)
}

/// `a · b + c`, rounded once with `FMA` (callers compiled for an instruction set that has fused
/// multiply-adds), else a multiply and an add. Rust never fuses `a * b + c` by itself, and
/// `f32::mul_add` without the instruction is a libm call per value.
#[inline(always)]
fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Lanes of the partial maxima and sums in [`exp_shifted_in_place`]: a float reduction into one variable
/// is sequential (the compiler may not reorder the additions), so it would keep the loop scalar.
const LANES: usize = 16;

/// `x ← exp(x - max(x))`, returning `(max(x), Σ exp(x - max))`: a softmax without the division,
/// which the caller applies to something smaller (attention divides its `head_dim` outputs instead
/// of the `keys` probabilities, or merges partial softmaxes by their maxima).
#[inline(always)]
pub(crate) fn exp_shifted_in_place<const FMA: bool>(x: &mut [f32]) -> (f32, f32) {
    let (chunks, tail) = x.as_chunks::<LANES>();
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    for c in chunks {
        for l in 0..LANES {
            // Not `f32::max`, whose NaN rule costs a compare and a blend per vector; this is one
            // `maxps`, and a NaN score is skipped here as `f32::max` would.
            lane_max[l] = if c[l] > lane_max[l] { c[l] } else { lane_max[l] };
        }
    }
    let max = lane_max.iter().chain(tail).copied().fold(f32::NEG_INFINITY, f32::max);
    let (chunks, tail) = x.as_chunks_mut::<LANES>();
    let mut lane_sum = [0f32; LANES];
    for c in chunks {
        for l in 0..LANES {
            c[l] = exp::<FMA>(c[l] - max);
            lane_sum[l] += c[l];
        }
    }
    let mut sum: f32 = lane_sum.iter().sum();
    for v in tail {
        *v = exp::<FMA>(*v - max);
        sum += *v;
    }
    (max, sum)
}

/// `√(2/π)`, in the tanh approximation of GELU.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// `y += bias` on every row (`bias.len()` wide), then GELU's tanh approximation if `gelu_tanh`:
/// `0.5 x (1 + tanh(u))` with `u = √(2/π) (x + 0.044715 x³)`, computed as the identical
/// `x / (1 + e^(-2u))`, with the vectorised [`exp`]. libm's `tanhf` took 13% of the vision tower's
/// time, and its `expf` (a call per value) still made the GELU of 15.7 M values per layer cost about
/// as much as the bias and one more pass.
#[inline(always)]
pub(crate) fn bias_activation<const FMA: bool>(y: &mut [f32], bias: Option<&[f32]>, gelu_tanh: bool) {
    if let Some(bias) = bias {
        for row in y.chunks_exact_mut(bias.len()) {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
    }
    if gelu_tanh {
        for v in y.iter_mut() {
            let x = *v;
            let u = SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x);
            // exp clamps its argument, so a large |u| gives x or (minus) zero, never NaN.
            *v = x / (1.0 + exp::<FMA>(-2.0 * u));
        }
    }
}

/// `out = silu(gate) · up = gate / (1 + e^(-gate)) · up`, element by element, with the vectorised
/// [`exp`] (its clamping gives `gate` or (minus) zero at the extremes, as the exact function).
#[inline(always)]
pub(crate) fn silu_mul<const FMA: bool>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp::<FMA>(-g)) * u;
    }
}

impl crate::isa::Isa {
    /// [`silu_mul`] compiled for this instruction set.
    pub(crate) fn silu_mul(self, gate: &[f32], up: &[f32], out: &mut [f32]) {
        use crate::isa::Isa;
        match self {
            Isa::Scalar => silu_mul::<false>(gate, up, out),
            // SAFETY: these variants are only constructed after their features were detected.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { crate::simd::x86::silu_mul(gate, up, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Amx => unsafe { crate::simd::avx512::silu_mul(gate, up, out) },
        }
    }

    /// [`bias_activation`] compiled for this instruction set.
    pub(crate) fn bias_activation(self, y: &mut [f32], bias: Option<&[f32]>, gelu_tanh: bool) {
        use crate::isa::Isa;
        match self {
            Isa::Scalar => bias_activation::<false>(y, bias, gelu_tanh),
            // SAFETY: these variants are only constructed after their features were detected.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { crate::simd::x86::bias_activation(y, bias, gelu_tanh) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Amx => unsafe { crate::simd::avx512::bias_activation(y, bias, gelu_tanh) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both forms: with fused multiply-adds (the SIMD instruction sets) and without (the scalar one).
    #[test]
    fn exp_is_within_two_epsilon_of_f64() {
        check_exp(exp::<false>);
        check_exp(exp::<true>);
    }

    /// Against f64 over the range where it matters, and at the extremes (no NaN, the limits).
    #[test]
    fn silu_mul_is_within_a_few_epsilon_of_f64() {
        let gate: Vec<f32> = (-2000..=2000)
            .map(|i| i as f32 * 0.01)
            .chain([-1e4, -100.0, 100.0, 1e4])
            .collect();
        let up: Vec<f32> = (0..gate.len()).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        for silu_mul in [silu_mul::<false>, silu_mul::<true>] {
            let mut out = vec![0f32; gate.len()];
            silu_mul(&gate, &up, &mut out);
            for ((&g, &u), &o) in gate.iter().zip(&up).zip(&out) {
                let want = g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64;
                // Relative, or absolute where the exact value is all but zero (gate -1e4: ~1e-4339).
                let difference = (o as f64 - want).abs();
                let close = difference <= 4.0 * f32::EPSILON as f64 * want.abs() || difference < 1e-30;
                assert!(close, "silu({g}) * {u} = {o}, want {want}");
            }
        }
    }

    /// The public entry splits long inputs across threads: the same values as one pass.
    #[test]
    fn silu_mul_in_parallel_equals_one_pass() {
        let n = 200_003;
        let gate: Vec<f32> = (0..n).map(|i| (i % 2001) as f32 * 0.01 - 10.0).collect();
        let up: Vec<f32> = (0..n).map(|i| (i % 13) as f32 - 6.0).collect();
        let (mut parallel, mut serial) = (vec![0f32; n], vec![0f32; n]);
        crate::silu_mul(&gate, &up, &mut parallel);
        crate::isa::Isa::detect().silu_mul(&gate, &up, &mut serial);
        assert_eq!(parallel, serial);
    }

    fn check_exp(exp: fn(f32) -> f32) {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x <= 88.3 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.000_731;
        }
        eprintln!("exp: worst relative error {worst:e}");
        // Measured: 8.0e-8 (0.67 epsilon) without FMA, 8.3e-8 (0.70 epsilon) with, on this x86-64 machine.
        assert!(worst <= 2.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
    }

    #[test]
    fn bias_and_gelu_match_f64_tanh_formula() {
        use crate::isa::Isa;
        let width = 37;
        let bias: Vec<f32> = (0..width).map(|i| i as f32 * 0.01 - 0.2).collect();
        let input: Vec<f32> = (0..width * 50)
            .map(|i| ((i * 37) % 1000) as f32 * 0.03 - 15.0)
            .collect();
        for isa in Isa::available() {
            let mut y = input.clone();
            isa.bias_activation(&mut y, Some(&bias), true);
            let mut worst = 0f64;
            for (i, (&got, &x)) in y.iter().zip(&input).enumerate() {
                let x = (x + bias[i % width]) as f64;
                let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                let want = 0.5 * x * (1.0 + u.tanh());
                worst = worst.max((got as f64 - want).abs() / x.abs().max(1.0));
            }
            assert!(worst < 1e-6, "{isa:?}: worst error {worst:e}");
            let mut only_bias = input.clone();
            isa.bias_activation(&mut only_bias, Some(&bias), false);
            assert!(only_bias
                .iter()
                .zip(&input)
                .enumerate()
                .all(|(i, (g, x))| *g == x + bias[i % width]));
        }
    }

    #[test]
    fn exp_shifted_is_an_unnormalised_softmax() {
        // 37 values: two full lane chunks and a tail.
        let input: Vec<f32> = (0..37)
            .map(|i| ((i * 7) % 11) as f32 - 5.0 - if i == 20 { 50.0 } else { 0.0 })
            .collect();
        let want: Vec<f64> = {
            let e: Vec<f64> = input.iter().map(|&v| (v as f64 - 5.0).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        for exp_shifted in [exp_shifted_in_place::<false>, exp_shifted_in_place::<true>] {
            let mut x = input.clone();
            let (max, sum) = exp_shifted(&mut x);
            assert_eq!(max, 5.0);
            x.iter_mut().for_each(|v| *v /= sum);
            for (g, w) in x.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-7, "{g} vs {w}");
            }
        }
        // A NaN score is skipped by the maximum.
        let mut x = vec![1.0f32; 20];
        x[3] = f32::NAN;
        assert_eq!(exp_shifted_in_place::<true>(&mut x).0, 1.0);
    }
}
