//! Pillow's bicubic resize (`Image.resize(size, Image.BICUBIC)`, `libImaging/Resample.c`),
//! reproduced bit for bit so that tiles equal the reference's.
//!
//! The algorithm: separable convolution, horizontal pass first, then vertical; only the passes
//! whose dimension changes run. Each output sample has a window of input samples whose weights
//! come from the cubic kernel (a = -0.5, support 2, stretched by the down-scaling factor), are
//! normalised to sum 1 in f64, then turned into signed fixed-point numbers with 22 fractional
//! bits (rounded half away from zero). Sums start at one half (`1 << 21`), are shifted right by
//! 22 and clamped to 0..=255 after each pass.

use super::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;
const CUBIC_A: f64 = -0.5;
const CUBIC_SUPPORT: f64 = 2.0;

fn bicubic(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * CUBIC_A
    } else {
        0.0
    }
}

/// Fixed-point weights of one pass: for output index `i`, input samples `start[i]..start[i]+len[i]`
/// with weights `weights[i * ksize..][..len[i]]`.
struct Coefficients {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
}

fn precompute(in_size: usize, out_size: usize) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = CUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's `(int)` truncates toward zero; the clamps make the sign question moot.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..xx * ksize + ksize];
        for x in 0..n {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let scaled = w * (1u32 << PRECISION_BITS) as f64;
            row[x] = if w < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        start.push(xmin);
        len.push(n);
    }
    Coefficients {
        ksize,
        start,
        len,
        weights,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

fn resample_horizontal(img: &RgbImage, out_w: usize) -> RgbImage {
    let c = precompute(img.width as usize, out_w);
    let (in_stride, h) = (img.width as usize * 3, img.height as usize);
    let mut data = vec![0u8; out_w * 3 * h];
    for y in 0..h {
        let src = &img.data[y * in_stride..(y + 1) * in_stride];
        let dst = &mut data[y * out_w * 3..(y + 1) * out_w * 3];
        for xx in 0..out_w {
            let k = &c.weights[xx * c.ksize..xx * c.ksize + c.len[xx]];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &w) in k.iter().enumerate() {
                let p = (c.start[xx] + x) * 3;
                ss[0] += src[p] as i32 * w;
                ss[1] += src[p + 1] as i32 * w;
                ss[2] += src[p + 2] as i32 * w;
            }
            dst[xx * 3] = clip8(ss[0]);
            dst[xx * 3 + 1] = clip8(ss[1]);
            dst[xx * 3 + 2] = clip8(ss[2]);
        }
    }
    RgbImage {
        width: out_w as u32,
        height: img.height,
        data,
    }
}

fn resample_vertical(img: &RgbImage, out_h: usize) -> RgbImage {
    let c = precompute(img.height as usize, out_h);
    let stride = img.width as usize * 3;
    let mut data = vec![0u8; stride * out_h];
    // Integer sums are order-independent, so accumulate whole rows for cache-friendliness.
    let mut acc = vec![0i32; stride];
    for yy in 0..out_h {
        acc.fill(1i32 << (PRECISION_BITS - 1));
        let k = &c.weights[yy * c.ksize..yy * c.ksize + c.len[yy]];
        for (y, &w) in k.iter().enumerate() {
            let row = &img.data[(c.start[yy] + y) * stride..(c.start[yy] + y + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * w;
            }
        }
        for (d, &a) in data[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    RgbImage {
        width: img.width,
        height: out_h as u32,
        data,
    }
}

/// Bicubic resize to `out_w x out_h` (both at least 1), bit-identical to Pillow 11.
/// Returns a copy when the size does not change, as Pillow does.
pub fn resize_bicubic(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let (out_w, out_h) = (out_w.max(1), out_h.max(1));
    let mut current = std::borrow::Cow::Borrowed(img);
    if out_w != img.width {
        current = std::borrow::Cow::Owned(resample_horizontal(&current, out_w as usize));
    }
    if out_h != img.height {
        current = std::borrow::Cow::Owned(resample_vertical(&current, out_h as usize));
    }
    current.into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(10, 3), (3, 10), (384, 384 * 2), (3000, 384), (7, 1)] {
            let c = precompute(i, o);
            for xx in 0..o {
                let s: i64 = c.weights[xx * c.ksize..xx * c.ksize + c.len[xx]]
                    .iter()
                    .map(|&w| w as i64)
                    .sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= c.len[xx] as i64,
                    "{i}->{o} at {xx}: {s}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::filled(37, 11, [200, 3, 127]);
        let out = resize_bicubic(&img, 384, 5);
        assert!(out.data.chunks_exact(3).all(|p| p == [200, 3, 127]));
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = RgbImage::from_raw(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!(resize_bicubic(&img, 2, 1), img);
    }
}
