//! Image references to image bytes, safely: what the HTTP server does with the `image` of a Cog
//! prediction or the `image_url` of an OpenAI chat message.
//!
//! [`fetch_image`] accepts, after trimming surrounding whitespace:
//! * `http://` and `https://` URLs (rustls with the webpki roots, HTTP/1.1, no proxy, no
//!   `Accept-Encoding`, so the size cap counts the bytes actually sent);
//! * `data:` URIs, base64 or percent-encoded ([`parse_data_uri`]);
//! * a bare base64 string (what some OpenAI-style clients and Ollama send): accepted when the
//!   whole reference is base64 text whose decoded bytes start with an image signature; a
//!   reference of 64 or more base64 characters without a `.` that does not decode to an image is
//!   reported as bad base64 / not an image rather than as a local path;
//! * local paths (plain or `file://`), only when [`MediaPolicy::allowed_local_dir`] is set, and
//!   then only inside that directory (see below).
//!
//! Every other scheme is refused ([`MediaError::UnsupportedScheme`]). Whatever the source, the
//! bytes must start with a JPEG, PNG, GIF, WebP, BMP or TIFF signature ([`sniff_image`]); the
//! Content-Type and the data URI media type are not trusted.
//!
//! # What is refused, and where
//!
//! Unless [`MediaPolicy::allow_private_urls`] is set, only public internet addresses are
//! connected to ([`non_public_reason`] lists the refused ranges: loopback, private, CGNAT,
//! link-local incl. 169.254.169.254, multicast, broadcast, unspecified, documentation, reserved,
//! and for IPv6 also unique-local, link-local, site-local, and IPv4-mapped / NAT64 / 6to4 forms
//! judged by the IPv4 address inside, IPv4-compatible and IPv4-translated forms). The check is
//! made before any connection, on each hop of a redirect chain:
//! * a literal IP host (in any spelling the URL standard accepts: `127.1`, `2130706433`,
//!   `[::ffff:127.0.0.1]`, ...) is checked as parsed;
//! * a host name is resolved by reqwest through a resolver of ours that drops the refused
//!   addresses and hands reqwest only the checked ones, so the connection goes to a checked address
//!   (a rebinding DNS server gets no second lookup to answer differently). If all addresses are
//!   refused the fetch fails with [`MediaError::RefusedAddress`] naming the first one;
//! * redirects are not followed by reqwest: each `Location` is checked (scheme http/https only,
//!   address as above, resolved anew) and at most [`MediaPolicy::max_redirects`] are followed;
//! * proxies from the environment are ignored (a proxy would connect on our behalf).
//!
//! The size cap ([`MediaPolicy::max_bytes`]) refuses a larger Content-Length before reading the
//! body and counts the body as it arrives, stopping at the first chunk over the cap. The timeout
//! ([`MediaPolicy::timeout`]) covers the whole fetch: DNS, connects, TLS, every redirect hop and
//! the body. Non-image bodies are refused as soon as their first bytes arrive.
//!
//! Local paths: any `..` component is refused; a relative path is taken relative to the allowed
//! directory, an absolute one must lie under it; the path is canonicalised (symlinks resolved) and
//! must still lie under the canonical directory; on Linux the opened file's real path is checked
//! again; only regular files are read.
//!
//! Errors name the problem and the reference (shortened, URL passwords redacted) and tell client
//! errors from upstream failures ([`MediaError::is_client_error`], [`MediaError::http_status`]).
//!
//! The functions need a tokio runtime with the IO and time drivers enabled.

mod addr;
mod data_uri;
mod error;
mod http;
mod local;
mod sniff;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

pub use addr::non_public_reason;
pub use data_uri::parse_data_uri;
pub use error::{shorten_reference, MediaError};
pub use sniff::{sniff_image, ImageFormat};

/// What [`fetch_image`] may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaPolicy {
    /// Connect to any address, private and loopback ones included (for trusted deployments and
    /// tests). Default `false`: only public internet addresses.
    pub allow_private_urls: bool,
    /// Directory local paths (plain or `file://`) may be read from. Default `None`: local paths are
    /// refused.
    pub allowed_local_dir: Option<PathBuf>,
    /// Largest image accepted, in bytes (decoded bytes for data URIs). Default 20 MiB.
    pub max_bytes: u64,
    /// Limit for the whole fetch: DNS, connects, every redirect hop and the body. Default 20 s.
    pub timeout: Duration,
    /// Most redirects followed. Default 5.
    pub max_redirects: u8,
}

impl Default for MediaPolicy {
    fn default() -> Self {
        MediaPolicy {
            allow_private_urls: false,
            allowed_local_dir: None,
            max_bytes: 20 << 20,
            timeout: Duration::from_secs(20),
            max_redirects: 5,
        }
    }
}

/// The bytes of the image `reference` names (an http(s) URL, a data URI, a bare base64 string or,
/// when the policy allows, a local path), checked to be an image by its signature. See the crate
/// documentation for what is refused.
pub async fn fetch_image(reference: &str, policy: &MediaPolicy) -> Result<Vec<u8>, MediaError> {
    fetch_image_with(reference, policy, &[]).await
}

/// [`fetch_image`] letting the exact socket addresses in `exempt` through the address check (tests
/// only: a loopback server starts a redirect chain whose other hops are checked as usual).
pub(crate) async fn fetch_image_with(
    reference: &str,
    policy: &MediaPolicy,
    exempt: &[SocketAddr],
) -> Result<Vec<u8>, MediaError> {
    let reference = reference.trim();
    let short = shorten_reference(reference);
    let work = async {
        let bytes = match classify(reference, &short)? {
            Source::Bytes(bytes) => bytes,
            Source::Http(url) => http::fetch_http(url, reference, policy, exempt).await?,
            Source::Local(path) => {
                let Some(dir) = policy.allowed_local_dir.clone() else {
                    return Err(MediaError::LocalPathNotAllowed {
                        reference: short.clone(),
                    });
                };
                let (reference, max_bytes) = (short.clone(), policy.max_bytes);
                tokio::task::spawn_blocking(move || local::read_local(&reference, &path, &dir, max_bytes))
                    .await
                    .map_err(|e| MediaError::Io {
                        reference: short.clone(),
                        source: std::io::Error::other(e),
                    })??
            }
        };
        if bytes.len() as u64 > policy.max_bytes {
            return Err(MediaError::TooLarge {
                reference: short.clone(),
                size: Some(bytes.len() as u64),
                limit: policy.max_bytes,
            });
        }
        if sniff_image(&bytes).is_none() {
            return Err(MediaError::NotAnImage {
                reference: short.clone(),
                detail: sniff::describe_non_image(&bytes),
            });
        }
        Ok(bytes)
    };
    match tokio::time::timeout(policy.timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(MediaError::Timeout {
            reference: short,
            timeout: policy.timeout,
        }),
    }
}

enum Source {
    /// Already decoded (data URI, bare base64).
    Bytes(Vec<u8>),
    Http(Url),
    Local(PathBuf),
}

/// Smallest bare base64 reference reported as bad base64 (rather than taken as a local path) when
/// it does not decode to an image.
const MIN_BARE_BASE64: usize = 64;

fn classify(reference: &str, short: &str) -> Result<Source, MediaError> {
    if reference.is_empty() {
        return Err(MediaError::BadUrl {
            reference: short.into(),
            reason: "the image reference is empty".into(),
        });
    }
    if reference.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("data:")) {
        return Ok(Source::Bytes(parse_data_uri(reference)?.1));
    }
    match Url::parse(reference) {
        Ok(url) => {
            return match url.scheme() {
                "http" | "https" => Ok(Source::Http(url)),
                "file" => url.to_file_path().map(Source::Local).map_err(|()| MediaError::BadUrl {
                    reference: short.into(),
                    reason: "a file: URL must be file:///absolute/path (no host)".into(),
                }),
                scheme => Err(MediaError::UnsupportedScheme {
                    reference: short.into(),
                    scheme: scheme.into(),
                }),
            };
        }
        Err(url::ParseError::RelativeUrlWithoutBase) => {}
        Err(e) if reference.contains("://") => {
            return Err(MediaError::BadUrl {
                reference: short.into(),
                reason: e.to_string(),
            });
        }
        Err(_) => {}
    }
    if data_uri::looks_like_base64(reference) {
        match data_uri::decode_base64(reference) {
            Ok(bytes) if sniff_image(&bytes).is_some() => return Ok(Source::Bytes(bytes)),
            Ok(bytes) if reference.len() >= MIN_BARE_BASE64 => {
                return Err(MediaError::NotAnImage {
                    reference: short.into(),
                    detail: format!("decoded as bare base64: {}", sniff::describe_non_image(&bytes)),
                })
            }
            Err(reason) if reference.len() >= MIN_BARE_BASE64 => {
                return Err(MediaError::BadDataUri {
                    reference: short.into(),
                    reason: format!("bare base64: {reason}"),
                })
            }
            _ => {}
        }
    }
    Ok(Source::Local(PathBuf::from(reference)))
}

#[cfg(test)]
mod redirect_recheck_tests;
