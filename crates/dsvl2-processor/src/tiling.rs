//! Image -> views -> tiles -> normalised pixels (the image half of the reference's
//! `tokenize_with_images`).
//!
//! Per image: a global view (`ImageOps.pad` to one tile) and a local view (`ImageOps.pad` to the
//! best candidate resolution, cut into tiles row-major). With cropping off the local view is a
//! single tile. Sizes and offsets follow Pillow 11.0.0's `contain`/`pad` exactly, including
//! Python's half-to-even `round`.

use crate::image::resample::resize_bicubic;
use crate::image::RgbImage;

/// The reference's `select_best_resolution`: among `candidates` (`[width, height]`, in order),
/// the one that keeps the most of the image's pixels after an aspect-preserving fit, then the one
/// that wastes the least; the first candidate wins ties. `None` only when `candidates` is empty.
pub fn select_best_resolution(width: u32, height: u32, candidates: &[[u32; 2]]) -> Option<[u32; 2]> {
    let (w0, h0) = (width as f64, height as f64);
    let original = width as u64 * height as u64;
    let mut best: Option<([u32; 2], u64, u64)> = None;
    for &[w, h] in candidates {
        let scale = (w as f64 / w0).min(h as f64 / h0);
        // Python `int()` truncates toward zero; the values are non-negative.
        let dw = (w0 * scale) as u64;
        let dh = (h0 * scale) as u64;
        let effective = (dw * dh).min(original);
        // Python ints: may go negative for a candidate smaller than what it keeps (impossible
        // here since effective <= w*h), so use signed arithmetic to be safe.
        let wasted = (w as i128 * h as i128 - effective as i128).max(0) as u64;
        let better = match best {
            None => true,
            Some((_, best_eff, best_waste)) => effective > best_eff || (effective == best_eff && wasted < best_waste),
        };
        if better {
            best = Some(([w, h], effective, wasted));
        }
    }
    best.map(|(wh, _, _)| wh)
}

/// Python's `round()` for the non-negative sizes used here: half to even.
fn py_round(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// The size Pillow 11.0.0's `ImageOps.contain(image, (w, h))` resizes to. Each side is at least 1:
/// the reference fails on very thin images (a side rounds to 0); we keep one pixel instead.
pub fn contain_size(width: u32, height: u32, target_w: u32, target_h: u32) -> (u32, u32) {
    let im_ratio = width as f64 / height as f64;
    let dest_ratio = target_w as f64 / target_h as f64;
    let (mut w, mut h) = (target_w as i64, target_h as i64);
    if im_ratio != dest_ratio {
        if im_ratio > dest_ratio {
            h = py_round(height as f64 / width as f64 * target_w as f64);
        } else {
            w = py_round(width as f64 / height as f64 * target_h as f64);
        }
    }
    (w.max(1) as u32, h.max(1) as u32)
}

/// `ImageOps.pad(image, (w, h), method=BICUBIC, color)` of Pillow 11.0.0.
pub fn pad(img: &RgbImage, target_w: u32, target_h: u32, color: [u8; 3]) -> RgbImage {
    let (new_w, new_h) = contain_size(img.width, img.height, target_w, target_h);
    let resized = resize_bicubic(img, new_w, new_h);
    if (new_w, new_h) == (target_w, target_h) {
        return resized;
    }
    let mut out = RgbImage::filled(target_w, target_h, color);
    if new_w != target_w {
        let x = py_round((target_w as i64 - new_w as i64) as f64 * 0.5);
        out.paste(&resized, x, 0);
    } else {
        let y = py_round((target_h as i64 - new_h as i64) as f64 * 0.5);
        out.paste(&resized, 0, y);
    }
    out
}

/// The views of one image, as 8-bit tiles.
#[derive(Debug, Clone)]
pub struct ImageTiles {
    /// Local tiles across (`num_width_tiles`).
    pub tiles_w: usize,
    /// Local tiles down (`num_height_tiles`).
    pub tiles_h: usize,
    /// Global view first, then the local tiles row by row; each `tile_size x tile_size`.
    pub tiles: Vec<RgbImage>,
}

/// Global view plus local tiles of one image. `candidates` is only used when `cropping` is on;
/// otherwise the local view is one `tile_size` tile.
pub fn tile_image(
    img: &RgbImage,
    tile_size: u32,
    candidates: &[[u32; 2]],
    cropping: bool,
    color: [u8; 3],
) -> ImageTiles {
    let [best_w, best_h] = if cropping {
        select_best_resolution(img.width, img.height, candidates).unwrap_or([tile_size, tile_size])
    } else {
        [tile_size, tile_size]
    };
    let mut tiles = vec![pad(img, tile_size, tile_size, color)];
    let local = pad(img, best_w, best_h, color);
    let step = tile_size as usize;
    for y in (0..best_h as usize).step_by(step) {
        for x in (0..best_w as usize).step_by(step) {
            tiles.push(local.crop(x as i64, y as i64, tile_size, tile_size));
        }
    }
    ImageTiles {
        tiles_w: (best_w / tile_size) as usize,
        tiles_h: (best_h / tile_size) as usize,
        tiles,
    }
}

/// torchvision `ToTensor` + `Normalize`: CHW, `u8 / 255` in f32, then `(x - mean) / std` with the
/// mean and std rounded to f32 first. Appends to `out`.
pub fn normalize_into(tile: &RgbImage, mean: [f64; 3], std: [f64; 3], normalize: bool, out: &mut Vec<f32>) {
    let n = tile.width as usize * tile.height as usize;
    out.reserve(3 * n);
    for c in 0..3 {
        let (m, s) = (mean[c] as f32, std[c] as f32);
        out.extend(tile.data[c..].iter().step_by(3).take(n).map(|&v| {
            let x = v as f32 / 255.0;
            if normalize {
                (x - m) / s
            } else {
                x
            }
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFICIAL: [[u32; 2]; 23] = dsvl2_config::OFFICIAL_CANDIDATE_RESOLUTIONS;

    #[test]
    fn best_resolution_examples_from_the_fixtures() {
        assert_eq!(select_best_resolution(900, 300, &OFFICIAL), Some([1152, 384]));
        assert_eq!(select_best_resolution(225, 154, &OFFICIAL), Some([384, 384]));
        assert_eq!(select_best_resolution(383, 385, &OFFICIAL), Some([384, 768]));
        assert_eq!(select_best_resolution(3000, 200, &OFFICIAL), Some([3072, 384]));
        assert_eq!(select_best_resolution(1, 1, &OFFICIAL), Some([384, 384]));
        assert_eq!(select_best_resolution(420, 400, &OFFICIAL), Some([768, 768]));
        assert_eq!(select_best_resolution(10, 10, &[]), None);
    }

    /// Pixels of a `w0 x h0` image that survive fitting into candidate `c` (capped at the original).
    fn kept(w0: u32, h0: u32, c: [u32; 2]) -> u64 {
        let s = (c[0] as f64 / w0 as f64).min(c[1] as f64 / h0 as f64);
        ((w0 as f64 * s) as u64 * (h0 as f64 * s) as u64).min(w0 as u64 * h0 as u64)
    }

    #[test]
    fn best_resolution_properties() {
        let mut seed = 12345u64;
        let mut next = |m: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % m + 1
        };
        for _ in 0..3000 {
            let (w, h) = (next(5000) as u32, next(5000) as u32);
            let best = select_best_resolution(w, h, &OFFICIAL).unwrap();
            let pos = OFFICIAL.iter().position(|c| *c == best).expect("a candidate");
            let best_kept = kept(w, h, best);
            for (i, c) in OFFICIAL.iter().enumerate() {
                let k = kept(w, h, *c);
                // Nothing keeps more; among equals nothing wastes less; earlier equals lose only on waste.
                assert!(k <= best_kept, "{w}x{h}: {c:?} keeps {k} > {best:?} {best_kept}");
                if k == best_kept {
                    let (wc, wb) = (c[0] * c[1], best[0] * best[1]);
                    assert!(
                        wc > wb || (wc == wb && i >= pos),
                        "{w}x{h}: {c:?} ties {best:?} with less waste"
                    );
                }
            }
        }
        // An image that fits a tile keeps all its pixels there, and the first candidate wins.
        assert_eq!(select_best_resolution(384, 384, &OFFICIAL), Some([384, 384]));
        assert_eq!(select_best_resolution(1152, 1152, &OFFICIAL), Some([1152, 1152]));
    }

    #[test]
    fn contain_uses_half_to_even_and_at_least_one_pixel() {
        // 384 * 2 / 3000 = 0.256 -> Python rounds to 0 (Pillow then fails); we keep 1.
        assert_eq!(contain_size(3000, 2, 384, 384), (384, 1));
        assert_eq!(contain_size(1, 2000, 384, 384), (1, 384));
        assert_eq!(contain_size(4000, 1, 3072, 384), (3072, 1));
        // 2.5 -> 2 (half to even): 5 wide, 768 tall into 384x384 -> width 5/768*384 = 2.5.
        assert_eq!(contain_size(5, 768, 384, 384), (2, 384));
        assert_eq!(contain_size(7, 768, 384, 384), (4, 384)); // 3.5 -> 4
        assert_eq!(contain_size(900, 300, 1152, 384), (1152, 384));
    }

    #[test]
    fn thin_images_tile_without_panicking() {
        for (w, h) in [(3000, 2), (4000, 1), (1, 2000), (2, 3000), (1, 1)] {
            let img = RgbImage::filled(w, h, [10, 20, 30]);
            let t = tile_image(&img, 384, &OFFICIAL, true, [127; 3]);
            assert_eq!(t.tiles.len(), 1 + t.tiles_w * t.tiles_h);
            assert!(t.tiles.iter().all(|x| x.width == 384 && x.height == 384));
            // The image survives as at least one row/column of its colour.
            assert!(t.tiles[0].data.chunks_exact(3).any(|p| p == [10, 20, 30]));
        }
    }

    #[test]
    fn normalisation_matches_torchvision_formula() {
        let tile = RgbImage::from_raw(1, 1, vec![0, 127, 255]).unwrap();
        let mut out = Vec::new();
        normalize_into(&tile, [0.5; 3], [0.5; 3], true, &mut out);
        assert_eq!(out, vec![-1.0, (127.0f32 / 255.0 - 0.5) / 0.5, 1.0]);
    }
}
