//! First frame of a GIF, as Pillow 11 opens it: the logical screen, filled with the transparent
//! index (or index 0), the frame's indices pasted at its offset, then the palette looked up with
//! transparency ignored. The `image` crate would turn transparent pixels into black instead.

use gif::{ColorOutput, DecodeOptions as GifOptions};

use super::decode::check_size;
use super::{DecodeOptions, RgbImage};
use crate::ProcessorError;

pub(super) fn decode_first_frame(
    bytes: &[u8],
    name: &str,
    options: &DecodeOptions,
) -> Result<RgbImage, ProcessorError> {
    let err = |e: &dyn std::fmt::Display| ProcessorError::ImageDecode {
        name: name.to_string(),
        format: "GIF".into(),
        message: e.to_string(),
    };
    let mut opts = GifOptions::new();
    opts.set_color_output(ColorOutput::Indexed);
    let mut decoder = opts.read_info(bytes).map_err(|e| err(&e))?;
    let (width, height) = (decoder.width() as u32, decoder.height() as u32);
    check_size(name, width, height, options)?;
    let global = decoder.global_palette().map(<[u8]>::to_vec);
    let frame = decoder
        .read_next_frame()
        .map_err(|e| err(&e))?
        .ok_or_else(|| err(&"no image frame in the file"))?;
    let palette = frame.palette.clone().or(global);
    let fill = frame.transparent.unwrap_or(0);
    let (w, h) = (width as usize, height as usize);
    let mut indices = vec![fill; w * h];
    let (fw, fh) = (frame.width as usize, frame.height as usize);
    let (left, top) = (frame.left as usize, frame.top as usize);
    for y in 0..fh.min(h.saturating_sub(top)) {
        let n = fw.min(w.saturating_sub(left));
        let src = &frame.buffer[y * fw..y * fw + n];
        let dst = (top + y) * w + left;
        indices[dst..dst + n].copy_from_slice(src);
    }
    // Without a palette Pillow opens the frame as grey ("L"): the index is the grey level.
    let lookup = |i: u8| -> [u8; 3] {
        match &palette {
            Some(p) => {
                let k = i as usize * 3;
                if k + 2 < p.len() {
                    [p[k], p[k + 1], p[k + 2]]
                } else {
                    [0, 0, 0]
                }
            }
            None => [i; 3],
        }
    };
    let data = indices.into_iter().flat_map(lookup).collect();
    Ok(RgbImage { width, height, data })
}
