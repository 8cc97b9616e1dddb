//! Image formats by magic bytes (the Content-Type and data URI media type are not trusted).

/// The image formats dsvl2 decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    Gif,
    WebP,
    Bmp,
    Tiff,
}

impl ImageFormat {
    pub fn mime(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Png => "image/png",
            ImageFormat::Gif => "image/gif",
            ImageFormat::WebP => "image/webp",
            ImageFormat::Bmp => "image/bmp",
            ImageFormat::Tiff => "image/tiff",
        }
    }
}

/// Bytes [`sniff_image`] needs to decide (fewer only when the whole content is shorter).
pub(crate) const SNIFF_LEN: usize = 18;

/// The format whose signature `bytes` starts with, if any.
///
/// JPEG `FF D8 FF`; PNG `89 'PNG' 0D 0A 1A 0A`; GIF `GIF87a`/`GIF89a`; WebP `RIFF....WEBP`;
/// BMP `BM` with a known DIB header size (12, 16, 40, 52, 56, 64, 108 or 124) at offset 14;
/// TIFF `II*\0` / `MM\0*`.
pub fn sniff_image(bytes: &[u8]) -> Option<ImageFormat> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(ImageFormat::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(ImageFormat::Png)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some(ImageFormat::Gif)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(ImageFormat::WebP)
    } else if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        Some(ImageFormat::Tiff)
    } else if bytes.len() >= 18 && bytes.starts_with(b"BM") {
        let dib = u32::from_le_bytes([bytes[14], bytes[15], bytes[16], bytes[17]]);
        matches!(dib, 12 | 16 | 40 | 52 | 56 | 64 | 108 | 124).then_some(ImageFormat::Bmp)
    } else {
        None
    }
}

/// A short description of what non-image content looks like, for error messages.
pub(crate) fn describe_non_image(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "the content is empty".into();
    }
    let head = &bytes[..bytes.len().min(8)];
    let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
    let trimmed = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map_or(&[][..], |i| &bytes[i..]);
    let kind = if trimmed.starts_with(b"<") {
        " (looks like HTML/XML; SVG is not supported)"
    } else if trimmed.starts_with(b"{") || trimmed.starts_with(b"[") {
        " (looks like JSON)"
    } else if bytes.len() < SNIFF_LEN && bytes.starts_with(b"BM") {
        " (too short)"
    } else {
        ""
    };
    format!("unrecognised signature {}{kind}", hex.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_signatures() {
        assert_eq!(sniff_image(b"\xFF\xD8\xFF\xE0\0\x10JFIF"), Some(ImageFormat::Jpeg));
        assert_eq!(sniff_image(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), Some(ImageFormat::Png));
        assert_eq!(sniff_image(b"GIF89a\x01\0\x01\0"), Some(ImageFormat::Gif));
        assert_eq!(sniff_image(b"RIFF\x24\0\0\0WEBPVP8 "), Some(ImageFormat::WebP));
        assert_eq!(sniff_image(b"RIFF\x24\0\0\0WAVEfmt "), None);
        assert_eq!(sniff_image(b"II*\0\x08\0\0\0"), Some(ImageFormat::Tiff));
        assert_eq!(sniff_image(b"MM\0*\0\0\0\x08"), Some(ImageFormat::Tiff));
        let mut bmp = b"BM\x46\0\0\0\0\0\0\0\x36\0\0\0".to_vec();
        bmp.extend_from_slice(&40u32.to_le_bytes());
        assert_eq!(sniff_image(&bmp), Some(ImageFormat::Bmp));
        assert_eq!(sniff_image(b"BMW is a car brand"), None);
        assert_eq!(sniff_image(b"<!DOCTYPE html>"), None);
        assert_eq!(sniff_image(b""), None);
        assert!(describe_non_image(b"  <html>").contains("HTML"));
        assert!(describe_non_image(b"").contains("empty"));
    }
}
