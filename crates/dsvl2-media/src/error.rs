use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

/// Why an image reference could not be turned into image bytes.
///
/// Every message names the problem and the reference (shortened by [`shorten_reference`]: at most
/// about 100 characters, control characters replaced, URL passwords redacted). Use
/// [`MediaError::is_client_error`] or [`MediaError::http_status`] to pick a response status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// Not a parseable URL, no host, or an empty reference.
    #[error("invalid image URL {reference}: {reason}")]
    BadUrl { reference: String, reason: String },

    /// A scheme other than `http`, `https`, `data` (and `file` when local paths are allowed), also
    /// when a redirect points to it.
    #[error("unsupported scheme '{scheme}' in image reference {reference}: send an http(s) URL or a data: URI")]
    UnsupportedScheme { reference: String, scheme: String },

    /// The host is, or resolves only to, an address that is not on the public internet.
    #[error("refused to fetch {reference}: {}", describe_refusal(.host, .addr, .reason))]
    RefusedAddress {
        reference: String,
        host: String,
        addr: IpAddr,
        reason: String,
    },

    /// The host name could not be resolved (or resolved to no address).
    #[error("could not resolve host '{host}' of {reference}: {message}")]
    Dns {
        reference: String,
        host: String,
        message: String,
    },

    /// Connection refused or reset, TLS failure, malformed HTTP response.
    #[error("could not fetch {reference}: {message}")]
    Network { reference: String, message: String },

    /// The whole fetch (DNS, connects, redirects and body) took longer than the policy allows.
    #[error("timed out after {} fetching {reference}", fmt_duration(*.timeout))]
    Timeout { reference: String, timeout: Duration },

    /// More bytes than `MediaPolicy::max_bytes`; `size` is known when announced (Content-Length,
    /// file size, data URI length), `None` when the limit was hit while streaming.
    #[error("image {reference} is too large: {} exceeds the limit of {limit} bytes", fmt_size(*.size))]
    TooLarge {
        reference: String,
        size: Option<u64>,
        limit: u64,
    },

    /// The server answered with a non-success, non-redirect status.
    #[error("fetching {reference} failed: HTTP status {status}")]
    HttpStatus { reference: String, status: u16 },

    /// The redirect chain is longer than `MediaPolicy::max_redirects`.
    #[error("too many redirects fetching {reference} (the limit is {limit})")]
    TooManyRedirects { reference: String, limit: u8 },

    /// A redirect without a usable `Location`.
    #[error("bad redirect from {reference}: {reason}")]
    BadRedirect { reference: String, reason: String },

    /// The bytes are not JPEG, PNG, GIF, WebP, BMP or TIFF (judged by magic bytes only).
    #[error("{reference} is not a supported image (JPEG, PNG, GIF, WebP, BMP, TIFF): {detail}")]
    NotAnImage { reference: String, detail: String },

    /// A malformed `data:` URI (or bare base64 string).
    #[error("invalid data URI {reference}: {reason}")]
    BadDataUri { reference: String, reason: String },

    /// A local path while `MediaPolicy::allowed_local_dir` is `None`.
    #[error("local file paths are not allowed: {reference} (send an http(s) URL or a data: URI)")]
    LocalPathNotAllowed { reference: String },

    /// A local path outside the allowed directory (`..`, absolute path elsewhere, symlink escape)
    /// or not a regular file.
    #[error("local path {reference} refused: {reason}")]
    LocalPathRefused { reference: String, reason: String },

    /// Reading a local file failed (including: it does not exist).
    #[error("could not read {reference}: {source}")]
    Io {
        reference: String,
        #[source]
        source: std::io::Error,
    },
}

impl MediaError {
    /// True when the request is at fault (answer 400/422), false for failures of the remote
    /// server, the network or this machine (answer 502/504/500).
    ///
    /// Client errors: bad URL/scheme/data URI, refused address, too large, too many redirects,
    /// not an image, local path not allowed/refused, a missing local file, and HTTP 4xx from the
    /// remote server (the URL names nothing fetchable). Upstream failures: DNS, network, timeout,
    /// HTTP 5xx (and other non-4xx statuses), bad redirects, local I/O errors.
    pub fn is_client_error(&self) -> bool {
        match self {
            MediaError::BadUrl { .. }
            | MediaError::UnsupportedScheme { .. }
            | MediaError::RefusedAddress { .. }
            | MediaError::TooLarge { .. }
            | MediaError::TooManyRedirects { .. }
            | MediaError::NotAnImage { .. }
            | MediaError::BadDataUri { .. }
            | MediaError::LocalPathNotAllowed { .. }
            | MediaError::LocalPathRefused { .. } => true,
            MediaError::HttpStatus { status, .. } => (400..500).contains(status),
            MediaError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            MediaError::Dns { .. }
            | MediaError::Network { .. }
            | MediaError::Timeout { .. }
            | MediaError::BadRedirect { .. } => false,
        }
    }

    /// A suggested HTTP status for the server's answer: 400 for malformed references (bad URL,
    /// scheme or data URI), 422 for other client errors, 504 for timeouts, 500 for local I/O
    /// failures and 502 for other upstream failures.
    pub fn http_status(&self) -> u16 {
        match self {
            MediaError::BadUrl { .. } | MediaError::UnsupportedScheme { .. } | MediaError::BadDataUri { .. } => 400,
            MediaError::Timeout { .. } => 504,
            MediaError::Io { .. } if !self.is_client_error() => 500,
            _ if self.is_client_error() => 422,
            _ => 502,
        }
    }

    /// The (shortened) reference the error is about.
    pub fn reference(&self) -> &str {
        match self {
            MediaError::BadUrl { reference, .. }
            | MediaError::UnsupportedScheme { reference, .. }
            | MediaError::RefusedAddress { reference, .. }
            | MediaError::Dns { reference, .. }
            | MediaError::Network { reference, .. }
            | MediaError::Timeout { reference, .. }
            | MediaError::TooLarge { reference, .. }
            | MediaError::HttpStatus { reference, .. }
            | MediaError::TooManyRedirects { reference, .. }
            | MediaError::BadRedirect { reference, .. }
            | MediaError::NotAnImage { reference, .. }
            | MediaError::BadDataUri { reference, .. }
            | MediaError::LocalPathNotAllowed { reference }
            | MediaError::LocalPathRefused { reference, .. }
            | MediaError::Io { reference, .. } => reference,
        }
    }
}

fn describe_refusal(host: &str, addr: &IpAddr, reason: &str) -> String {
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if literal.parse::<IpAddr>().ok() == Some(*addr) {
        format!("address {addr} is {reason}; only public internet addresses are allowed")
    } else {
        format!("host '{host}' resolves to {addr}, which is {reason}; only public internet addresses are allowed")
    }
}

fn fmt_size(size: Option<u64>) -> String {
    match size {
        Some(n) => format!("{n} bytes"),
        None => "the body".to_string(),
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Longest reference kept whole in error messages (in characters).
const MAX_REFERENCE_CHARS: usize = 100;

/// The reference as error messages show it: URL passwords replaced by `***`, control characters
/// by `\u{FFFD}`, and anything longer than 100 characters cut to its first 80 plus a note of the
/// full length (a data URI or bare base64 payload can be megabytes).
pub fn shorten_reference(reference: &str) -> String {
    let redacted;
    let mut s = reference;
    if s.len() >= 8 && (s[..7].eq_ignore_ascii_case("http://") || s[..8].eq_ignore_ascii_case("https://")) {
        if let Ok(mut url) = url::Url::parse(s) {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
                redacted = url.to_string();
                s = &redacted;
            }
        }
    }
    let total = s.chars().count();
    let mut out = String::with_capacity(s.len().min(MAX_REFERENCE_CHARS + 32));
    let keep = if total > MAX_REFERENCE_CHARS { 80 } else { total };
    for c in s.chars().take(keep) {
        out.push(if c.is_control() { '\u{FFFD}' } else { c });
    }
    if keep < total {
        let _ = write!(out, "… ({} characters in all)", total);
    }
    if out.is_empty() {
        out.push_str("''");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortens_long_references() {
        let long = format!("data:image/png;base64,{}", "A".repeat(5000));
        let s = shorten_reference(&long);
        assert!(s.starts_with("data:image/png;base64,AAAA"));
        assert!(s.ends_with("(5022 characters in all)"), "{s}");
        assert!(s.chars().count() < 120);
        assert_eq!(
            shorten_reference("http://example.com/a.png"),
            "http://example.com/a.png"
        );
    }

    #[test]
    fn redacts_passwords_and_control_characters() {
        let s = shorten_reference("https://user:secret@example.com/a.png");
        assert!(!s.contains("secret"), "{s}");
        assert!(s.contains("user:***@example.com"), "{s}");
        assert_eq!(shorten_reference("a\nb"), "a\u{FFFD}b");
    }

    #[test]
    fn client_vs_upstream() {
        let r = || "x".to_string();
        assert!(MediaError::HttpStatus {
            reference: r(),
            status: 404
        }
        .is_client_error());
        assert!(!MediaError::HttpStatus {
            reference: r(),
            status: 503
        }
        .is_client_error());
        assert_eq!(
            MediaError::HttpStatus {
                reference: r(),
                status: 503
            }
            .http_status(),
            502
        );
        assert_eq!(
            MediaError::Timeout {
                reference: r(),
                timeout: Duration::from_secs(1)
            }
            .http_status(),
            504
        );
        assert_eq!(
            MediaError::BadDataUri {
                reference: r(),
                reason: r()
            }
            .http_status(),
            400
        );
        assert_eq!(
            MediaError::NotAnImage {
                reference: r(),
                detail: r()
            }
            .http_status(),
            422
        );
        let refused = MediaError::RefusedAddress {
            reference: "http://localhost/".into(),
            host: "localhost".into(),
            addr: "127.0.0.1".parse().unwrap(),
            reason: "loopback".into(),
        };
        assert!(refused.is_client_error());
        assert_eq!(
            refused.to_string(),
            "refused to fetch http://localhost/: host 'localhost' resolves to 127.0.0.1, which is loopback; \
             only public internet addresses are allowed"
        );
        let io = MediaError::Io {
            reference: r(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(io.http_status(), 422);
        let io = MediaError::Io {
            reference: r(),
            source: std::io::Error::from(std::io::ErrorKind::Other),
        };
        assert_eq!(io.http_status(), 500);
    }
}
