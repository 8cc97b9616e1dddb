//! Images: decoding to RGB the way Pillow's `Image.open(f).convert("RGB")` does, and Pillow's
//! bicubic resampler.

mod decode;
mod gif;
pub mod resample;

pub use decode::{decode_image, load_image, DecodeOptions, PILLOW_MAX_PIXELS};

use crate::ProcessorError;

/// An 8-bit RGB image, row-major, 3 bytes per pixel, no padding.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}x{})", self.width, self.height)
    }
}

impl RgbImage {
    /// An image filled with one colour.
    pub fn filled(width: u32, height: u32, color: [u8; 3]) -> Self {
        let n = width as usize * height as usize;
        let mut data = Vec::with_capacity(n * 3);
        for _ in 0..n {
            data.extend_from_slice(&color);
        }
        RgbImage { width, height, data }
    }

    /// Wraps a buffer of `width * height * 3` bytes.
    pub fn from_raw(width: u32, height: u32, data: Vec<u8>) -> Result<Self, ProcessorError> {
        let expected = width as usize * height as usize * 3;
        if data.len() != expected {
            return Err(ProcessorError::BadBuffer {
                width,
                height,
                expected,
                got: data.len(),
            });
        }
        Ok(RgbImage { width, height, data })
    }

    /// `(width, height)`, Pillow's `size` order.
    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    fn row_stride(&self) -> usize {
        self.width as usize * 3
    }

    /// Copies `src` with its top-left corner at `(x, y)`, clipped to this image (Pillow `paste`).
    pub fn paste(&mut self, src: &RgbImage, x: i64, y: i64) {
        let x0 = x.max(0);
        let y0 = y.max(0);
        let x1 = (x + src.width as i64).min(self.width as i64);
        let y1 = (y + src.height as i64).min(self.height as i64);
        if x0 >= x1 || y0 >= y1 {
            return;
        }
        let n = (x1 - x0) as usize * 3;
        for row in y0..y1 {
            let dst = row as usize * self.row_stride() + x0 as usize * 3;
            let s = (row - y) as usize * src.row_stride() + (x0 - x) as usize * 3;
            self.data[dst..dst + n].copy_from_slice(&src.data[s..s + n]);
        }
    }

    /// The `w x h` region at `(x, y)`; parts outside the image are black, as in Pillow's `crop`.
    pub fn crop(&self, x: i64, y: i64, w: u32, h: u32) -> RgbImage {
        let mut out = RgbImage::filled(w, h, [0, 0, 0]);
        out.paste(self, -x, -y);
        out
    }
}
