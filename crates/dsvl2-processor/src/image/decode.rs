//! Decoding image files to RGB exactly like Pillow 11's `Image.open(f).convert("RGB")`.
//!
//! What Pillow does, and what this module therefore does:
//! * the format is sniffed from the content, never from the file name;
//! * alpha is dropped, not composited: the colour stored under a transparent pixel is kept;
//! * palettes are looked up and their transparency (PNG `tRNS`, GIF transparent index) is ignored;
//! * grey (L, LA) is replicated to the three channels;
//! * 16-bit colour (RGB/RGBA/LA) keeps the high byte, while 16-bit grey opens as `I;16` and
//!   `convert("RGB")` clamps the value to 255 (checked against Pillow 11.0.0);
//! * images above `DecompressionBombError`'s threshold are refused, from the header alone.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageFormat, ImageReader, Limits};

use super::RgbImage;
use crate::ProcessorError;

/// Pillow's `DecompressionBombError` threshold: `2 * Image.MAX_IMAGE_PIXELS` (2 * 89_478_485).
/// Pillow refuses images with strictly more pixels than this.
pub const PILLOW_MAX_PIXELS: u64 = 2 * 89_478_485;

/// Knobs of the decoder.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Largest accepted `width * height`; checked before the pixel data are decoded.
    pub max_pixels: u64,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_pixels: PILLOW_MAX_PIXELS,
        }
    }
}

/// Reads and decodes an image file; errors name the file.
pub fn load_image(path: &Path, options: &DecodeOptions) -> Result<RgbImage, ProcessorError> {
    let bytes = std::fs::read(path).map_err(|source| ProcessorError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_image(&bytes, &path.display().to_string(), options)
}

/// Decodes an image held in memory; `name` only labels error messages.
pub fn decode_image(bytes: &[u8], name: &str, options: &DecodeOptions) -> Result<RgbImage, ProcessorError> {
    let format = image::guess_format(bytes).map_err(|_| ProcessorError::NotAnImage { name: name.to_string() })?;
    let decode_err = |err: &dyn std::fmt::Display| ProcessorError::ImageDecode {
        name: name.to_string(),
        format: format!("{format:?}").to_uppercase(),
        message: err.to_string(),
    };
    if format == ImageFormat::Gif {
        return super::gif::decode_first_frame(bytes, name, options);
    }
    let reader = || ImageReader::with_format(Cursor::new(bytes), format);
    let (width, height) = reader().into_dimensions().map_err(|e| decode_err(&e))?;
    check_size(name, width, height, options)?;
    let mut reader = reader();
    // Our own pixel limit was applied above; the `image` crate's default allocation cap
    // (512 MiB) would otherwise refuse images that Pillow accepts.
    reader.limits(Limits::no_limits());
    let decoded = reader.decode().map_err(|e| decode_err(&e))?;
    Ok(to_rgb_like_pillow(decoded))
}

/// Refuses empty images and images above the pixel limit.
pub(crate) fn check_size(name: &str, width: u32, height: u32, options: &DecodeOptions) -> Result<(), ProcessorError> {
    let pixels = width as u64 * height as u64;
    if pixels == 0 {
        return Err(ProcessorError::EmptyImage {
            name: name.to_string(),
            width,
            height,
        });
    }
    if pixels > options.max_pixels {
        return Err(ProcessorError::ImageTooLarge {
            name: name.to_string(),
            width: width as u64,
            height: height as u64,
            pixels,
            limit: options.max_pixels,
        });
    }
    Ok(())
}

/// `convert("RGB")` of what Pillow would have opened (see the module docs for the rules).
fn to_rgb_like_pillow(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width(), img.height());
    let data: Vec<u8> = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => b.into_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma8(b) => b.into_raw().into_iter().flat_map(|v| [v; 3]).collect(),
        DynamicImage::ImageLumaA8(b) => b.into_raw().chunks_exact(2).flat_map(|p| [p[0]; 3]).collect(),
        // `I;16` -> RGB clamps (values above 255 become 255), it does not rescale.
        DynamicImage::ImageLuma16(b) => b.into_raw().into_iter().flat_map(|v| [v.min(255) as u8; 3]).collect(),
        // 16-bit LA opens as RGBA with the high byte of each sample.
        DynamicImage::ImageLumaA16(b) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| [(p[0] >> 8) as u8; 3])
            .collect(),
        DynamicImage::ImageRgb16(b) => b.into_raw().into_iter().map(|v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        // Float images (rare TIFFs): scale [0, 1] to [0, 255]; Pillow has no RGB float mode.
        other => other.to_rgb8().into_raw(),
    };
    RgbImage { width, height, data }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, Rgb};

    fn png_bytes(img: DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn sixteen_bit_grey_clamps_and_sixteen_bit_colour_keeps_the_high_byte() {
        // Checked against Pillow 11.0.0: I;16 -> RGB clamps; RGB;16 keeps the high byte.
        let grey = ImageBuffer::<Luma<u16>, _>::from_raw(4, 1, vec![0, 255, 256, 65535]).unwrap();
        let out = decode_image(
            &png_bytes(DynamicImage::ImageLuma16(grey)),
            "g16",
            &DecodeOptions::default(),
        )
        .unwrap();
        assert_eq!(out.data, [0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255, 255]);
        let rgb = ImageBuffer::<Rgb<u16>, _>::from_raw(1, 1, vec![0x01ff, 0x80ff, 0xff00]).unwrap();
        let out = decode_image(
            &png_bytes(DynamicImage::ImageRgb16(rgb)),
            "rgb16",
            &DecodeOptions::default(),
        )
        .unwrap();
        assert_eq!(out.data, [1, 128, 255]);
    }

    #[test]
    fn alpha_is_dropped_not_composited() {
        let rgba = image::RgbaImage::from_raw(2, 1, vec![10, 20, 30, 0, 40, 50, 60, 128]).unwrap();
        let out = decode_image(
            &png_bytes(DynamicImage::ImageRgba8(rgba)),
            "rgba",
            &DecodeOptions::default(),
        )
        .unwrap();
        assert_eq!(out.data, [10, 20, 30, 40, 50, 60]);
    }
}
