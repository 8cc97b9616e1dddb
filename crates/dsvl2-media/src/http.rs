//! http(s) fetches with the address check after DNS, on every redirect hop.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{ACCEPT, LOCATION};
use reqwest::StatusCode;
use url::{Host, Url};

use crate::addr::non_public_reason;
use crate::error::{shorten_reference, MediaError};
use crate::sniff::{describe_non_image, sniff_image, SNIFF_LEN};
use crate::MediaPolicy;

/// Which addresses may be connected to.
#[derive(Debug)]
pub(crate) struct Gate {
    allow_private: bool,
    /// Exact socket addresses let through although not public (only tests set this: it lets a
    /// loopback server start a redirect chain whose later hops are checked normally).
    exempt: Vec<SocketAddr>,
}

impl Gate {
    /// Why connecting to `ip` (on `port`, when known) is refused, or `None`.
    fn refusal(&self, ip: IpAddr, port: Option<u16>) -> Option<String> {
        if self.allow_private || port.is_some_and(|p| self.exempt.contains(&SocketAddr::new(ip, p))) {
            return None;
        }
        non_public_reason(ip)
    }
}

/// What the resolver found wrong, read back by the fetch loop (reqwest wraps resolver errors).
#[derive(Debug)]
enum ResolveFailure {
    Refused { host: String, addr: IpAddr, reason: String },
    Dns { host: String, message: String },
}

impl ResolveFailure {
    fn into_error(self, reference: String) -> MediaError {
        match self {
            ResolveFailure::Refused { host, addr, reason } => MediaError::RefusedAddress {
                reference,
                host,
                addr,
                reason,
            },
            ResolveFailure::Dns { host, message } => MediaError::Dns {
                reference,
                host,
                message,
            },
        }
    }
}

/// reqwest's resolver for every host name: resolves with the system resolver, drops every
/// address the gate refuses and hands reqwest only the checked ones, so the connection goes to an
/// address that was checked (no second lookup a rebinding DNS server could answer differently).
struct CheckingResolver {
    gate: Arc<Gate>,
    failure: Arc<Mutex<Option<ResolveFailure>>>,
}

impl Resolve for CheckingResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let gate = self.gate.clone();
        let failure = self.failure.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            match resolve_checked(&gate, &host).await {
                Ok(addrs) => Ok(Box::new(addrs.into_iter()) as Addrs),
                Err(f) => {
                    let message = match &f {
                        ResolveFailure::Refused { host, addr, reason } => {
                            format!("{host} resolves to {addr}: {reason}")
                        }
                        ResolveFailure::Dns { host, message } => format!("{host}: {message}"),
                    };
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
                    Err(message.into())
                }
            }
        })
    }
}

async fn resolve_checked(gate: &Gate, host: &str) -> Result<Vec<SocketAddr>, ResolveFailure> {
    let dns = |message: String| ResolveFailure::Dns {
        host: host.to_string(),
        message,
    };
    let found: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, 0)],
        Err(_) => tokio::net::lookup_host((host, 0))
            .await
            .map_err(|e| dns(e.to_string()))?
            .collect(),
    };
    if found.is_empty() {
        return Err(dns("no addresses found".into()));
    }
    let mut first_refused = None;
    let allowed: Vec<SocketAddr> = found
        .into_iter()
        .filter(|a| match gate.refusal(a.ip(), None) {
            None => true,
            Some(reason) => {
                first_refused.get_or_insert((a.ip(), reason));
                false
            }
        })
        .collect();
    match first_refused {
        Some((addr, reason)) if allowed.is_empty() => Err(ResolveFailure::Refused {
            host: host.to_string(),
            addr,
            reason,
        }),
        _ => Ok(allowed),
    }
}

/// Refuses a hop before any connection: wrong scheme, no host, or a literal IP the gate refuses
/// (reqwest does not consult the resolver for IP literals).
fn check_hop(url: &Url, gate: &Gate, reference: &str) -> Result<(), MediaError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(MediaError::UnsupportedScheme {
            reference: reference.to_string(),
            scheme: url.scheme().into(),
        });
    }
    let port = url.port_or_known_default();
    let ip = match url.host() {
        None => {
            return Err(MediaError::BadUrl {
                reference: reference.into(),
                reason: "the URL has no host".into(),
            })
        }
        Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(Host::Domain(d)) => match d.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) if d.is_empty() => {
                return Err(MediaError::BadUrl {
                    reference: reference.into(),
                    reason: "the URL has an empty host".into(),
                })
            }
            Err(_) => return Ok(()),
        },
    };
    match gate.refusal(ip, port) {
        None => Ok(()),
        Some(reason) => Err(MediaError::RefusedAddress {
            reference: reference.into(),
            host: url.host_str().unwrap_or_default().into(),
            addr: ip,
            reason,
        }),
    }
}

/// The error and its causes on one line, without the URL (which may hold credentials).
fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

/// Fetches `start`, following up to `policy.max_redirects` redirects by hand; each hop is checked
/// by [`check_hop`] and its host name resolved anew through [`CheckingResolver`]. No overall
/// timeout here: the caller wraps the whole fetch.
pub(crate) async fn fetch_http(
    start: Url,
    original: &str,
    policy: &MediaPolicy,
    exempt: &[SocketAddr],
) -> Result<Vec<u8>, MediaError> {
    let gate = Arc::new(Gate {
        allow_private: policy.allow_private_urls,
        exempt: exempt.to_vec(),
    });
    let failure = Arc::new(Mutex::new(None));
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // A proxy would resolve and connect on our behalf, past the address check.
        .no_proxy()
        .dns_resolver(Arc::new(CheckingResolver {
            gate: gate.clone(),
            failure: failure.clone(),
        }))
        .user_agent(concat!("dsvl2-media/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| MediaError::Network {
            reference: shorten_reference(original),
            message: error_chain(e),
        })?;

    let mut url = start;
    let mut redirects: u8 = 0;
    loop {
        let reference = shorten_reference(url.as_str());
        check_hop(&url, &gate, &reference)?;
        *failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let sent = client.get(url.clone()).header(ACCEPT, "image/*,*/*;q=0.8").send().await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                if let Some(f) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return Err(f.into_error(reference));
                }
                return Err(MediaError::Network {
                    reference,
                    message: error_chain(e),
                });
            }
        };
        let status = response.status();
        if matches!(
            status,
            StatusCode::MOVED_PERMANENTLY
                | StatusCode::FOUND
                | StatusCode::SEE_OTHER
                | StatusCode::TEMPORARY_REDIRECT
                | StatusCode::PERMANENT_REDIRECT
        ) {
            let bad = |reason: String| MediaError::BadRedirect {
                reference: reference.clone(),
                reason,
            };
            let location = response
                .headers()
                .get(LOCATION)
                .ok_or_else(|| bad(format!("HTTP {} without a Location header", status.as_u16())))?;
            let location = location
                .to_str()
                .map_err(|_| bad("the Location header is not ASCII".into()))?;
            let next = url
                .join(location)
                .map_err(|e| bad(format!("invalid Location '{location}': {e}")))?;
            if redirects >= policy.max_redirects {
                return Err(MediaError::TooManyRedirects {
                    reference: shorten_reference(original),
                    limit: policy.max_redirects,
                });
            }
            redirects += 1;
            url = next;
            continue;
        }
        if !status.is_success() {
            return Err(MediaError::HttpStatus {
                reference,
                status: status.as_u16(),
            });
        }
        return read_body(response, reference, policy.max_bytes).await;
    }
}

/// The body, refused as soon as Content-Length or the bytes received exceed `max_bytes`, or the
/// first bytes are no image signature.
async fn read_body(mut response: reqwest::Response, reference: String, max_bytes: u64) -> Result<Vec<u8>, MediaError> {
    let announced = response.content_length();
    if let Some(len) = announced {
        if len > max_bytes {
            return Err(MediaError::TooLarge {
                reference,
                size: Some(len),
                limit: max_bytes,
            });
        }
    }
    let mut body = Vec::with_capacity(announced.unwrap_or(0).min(max_bytes).min(64 << 20) as usize);
    let mut sniffed = false;
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                return Err(MediaError::Network {
                    reference,
                    message: error_chain(e),
                })
            }
        };
        if body.len() as u64 + chunk.len() as u64 > max_bytes {
            return Err(MediaError::TooLarge {
                reference,
                size: None,
                limit: max_bytes,
            });
        }
        body.extend_from_slice(&chunk);
        if !sniffed && body.len() >= SNIFF_LEN {
            if sniff_image(&body).is_none() {
                return Err(MediaError::NotAnImage {
                    reference,
                    detail: describe_non_image(&body),
                });
            }
            sniffed = true;
        }
    }
    Ok(body)
}
