//! `data:` URIs (RFC 2397) and bare base64 strings.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

use crate::error::{shorten_reference, MediaError};

const CONFIG: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, CONFIG);
const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, CONFIG);

/// Parses `data:[<media type>][;param=value]*[;base64],<data>` into the media type (lowercased,
/// parameters dropped; `text/plain` when absent, as RFC 2397 says) and the decoded bytes.
///
/// The `data:` prefix and the `base64` marker are case-insensitive. A base64 payload may be
/// percent-encoded (as some clients URL-encode `+`, `/` and `=`), may contain ASCII whitespace
/// (line breaks), may use the URL-safe alphabet (`-`, `_`) and may omit padding. Without `;base64`
/// the payload is percent-decoded. The media type is returned as declared and is not checked
/// against the content: callers that want an image sniff the bytes (as `fetch_image` does).
pub fn parse_data_uri(uri: &str) -> Result<(String, Vec<u8>), MediaError> {
    let bad = |reason: &str| MediaError::BadDataUri {
        reference: shorten_reference(uri),
        reason: reason.to_string(),
    };
    let rest = match uri.get(..5) {
        Some(prefix) if prefix.eq_ignore_ascii_case("data:") => &uri[5..],
        _ => return Err(bad("it does not start with 'data:'")),
    };
    let comma = rest
        .find(',')
        .ok_or_else(|| bad("no ',' separates the header from the data"))?;
    let (header, payload) = (&rest[..comma], &rest[comma + 1..]);
    let mut params = header.split(';');
    let media_type = params.next().unwrap_or("").trim().to_ascii_lowercase();
    let mut is_base64 = false;
    for param in params {
        let param = param.trim();
        if param.eq_ignore_ascii_case("base64") {
            is_base64 = true;
        } else if !param.contains('=') {
            return Err(bad(&format!(
                "unexpected parameter '{param}' in the header (expected ';base64' or key=value)"
            )));
        }
    }
    let media_type = if media_type.is_empty() {
        "text/plain".to_string()
    } else {
        media_type
    };
    if !valid_media_type(&media_type) {
        return Err(bad(&format!("'{media_type}' is not a media type (type/subtype)")));
    }
    let bytes = if is_base64 {
        decode_base64(payload).map_err(|e| bad(&e))?
    } else {
        percent_encoding::percent_decode_str(payload).collect()
    };
    Ok((media_type, bytes))
}

fn valid_media_type(s: &str) -> bool {
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    matches!(s.split_once('/'), Some((ty, sub)) if token(ty) && token(sub))
}

/// Decodes a base64 payload leniently (see [`parse_data_uri`]); the error names the problem.
pub(crate) fn decode_base64(payload: &str) -> Result<Vec<u8>, String> {
    let decoded;
    let mut text = payload;
    if text.contains('%') {
        decoded = percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .map_err(|_| "the percent-encoded base64 data is not UTF-8".to_string())?;
        text = &decoded;
    }
    let compact: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if compact.is_empty() {
        return Err("the base64 data is empty".into());
    }
    let engine = if compact.iter().any(|b| matches!(b, b'-' | b'_')) {
        &URL_SAFE
    } else {
        &STANDARD
    };
    engine.decode(&compact).map_err(|e| format!("invalid base64: {e}"))
}

/// Whether `s` could be a bare base64 payload: only base64 characters (either alphabet, padding,
/// whitespace) and no `.` (which every file name with an extension has).
pub(crate) fn looks_like_base64(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=-_".contains(&b) || b.is_ascii_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_base64_and_percent_forms() {
        let (mime, bytes) = parse_data_uri("data:image/png;base64,iVBORw0KGgo=").unwrap();
        assert_eq!(mime, "image/png");
        assert_eq!(bytes, b"\x89PNG\r\n\x1a\n");
        // Case-insensitive, parameters, line breaks, missing padding.
        let (mime, bytes) = parse_data_uri("DATA:Image/PNG;name=x.png;BASE64,iVBORw0K\r\nGgo").unwrap();
        assert_eq!(mime, "image/png");
        assert_eq!(bytes, b"\x89PNG\r\n\x1a\n");
        // Percent-encoded base64 and the URL-safe alphabet.
        assert_eq!(
            parse_data_uri("data:image/jpeg;base64,%2F9j%2F").unwrap().1,
            b"\xff\xd8\xff"
        );
        assert_eq!(
            parse_data_uri("data:image/jpeg;base64,_9j_").unwrap().1,
            b"\xff\xd8\xff"
        );
        // Percent-encoded (no base64) and the default media type.
        let (mime, bytes) = parse_data_uri("data:,GIF89a%01%00").unwrap();
        assert_eq!(mime, "text/plain");
        assert_eq!(bytes, b"GIF89a\x01\x00");
    }

    #[test]
    fn rejects_malformed_uris() {
        for (uri, fragment) in [
            ("image/png;base64,AAAA", "does not start with 'data:'"),
            ("data:image/png;base64", "no ','"),
            ("data:image/png;base64,****", "invalid base64"),
            ("data:image/png;base64,", "empty"),
            ("data:image/png;base64,iVBORw0KGgo=x", "invalid base64"),
            ("data:png;base64,AAAA", "not a media type"),
            ("data:image/png;bas64,AAAA", "unexpected parameter"),
        ] {
            let err = parse_data_uri(uri).unwrap_err();
            assert!(matches!(err, MediaError::BadDataUri { .. }), "{uri}: {err:?}");
            assert!(err.to_string().contains(fragment), "{uri}: {err}");
            assert!(err.is_client_error());
        }
    }
}
