//! A scripted HTTP/1.1 server on loopback for the fetch tests (also used by the crate's unit tests).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A valid 1x1 RGBA PNG.
pub const PNG: &[u8] = &[
    0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1F, 0x15, 0xC4, 0x89, 0x00, 0x00, 0x00, 0x0A, 0x49,
    0x44, 0x41, 0x54, 0x78, 0x9C, 0x63, 0x00, 0x01, 0x00, 0x00, 0x05, 0x00, 0x01, 0x0D, 0x0A, 0x2D, 0xB4, 0x00, 0x00,
    0x00, 0x00, 0x49, 0x45, 0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82,
];

/// One step of a scripted answer.
pub enum Step {
    Write(Vec<u8>),
    Sleep(Duration),
}

/// Answers a request for `path` (the request target) with these steps; the connection is closed
/// after the last one.
pub type Handler = Arc<dyn Fn(&str) -> Vec<Step> + Send + Sync>;

pub struct TestServer {
    pub addr: SocketAddr,
    /// TCP connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// Request targets received, in order.
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl TestServer {
    pub async fn start(handler: impl Fn(&str) -> Vec<Step> + Send + Sync + 'static) -> TestServer {
        Self::start_on("127.0.0.1:0".parse().unwrap(), handler)
            .await
            .expect("bind 127.0.0.1")
    }

    /// On another loopback address (e.g. `[::1]:0`); `None` when it cannot be bound.
    pub async fn start_on(
        addr: SocketAddr,
        handler: impl Fn(&str) -> Vec<Step> + Send + Sync + 'static,
    ) -> Option<TestServer> {
        assert!(addr.ip().is_loopback(), "test servers listen on loopback only");
        let listener = TcpListener::bind(addr).await.ok()?;
        let addr = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(handler);
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (conns, reqs) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let (handler, reqs) = (handler.clone(), reqs.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&head).lines().next().unwrap_or("").to_string();
                    let target = line.split(' ').nth(1).unwrap_or("").to_string();
                    reqs.lock().unwrap().push(target.clone());
                    for step in handler(&target) {
                        match step {
                            Step::Write(bytes) => {
                                if stream.write_all(&bytes).await.is_err() {
                                    return;
                                }
                            }
                            Step::Sleep(d) => tokio::time::sleep(d).await,
                        }
                    }
                    let _ = stream.shutdown().await;
                });
            }
        });
        Some(TestServer {
            addr,
            connections,
            requests,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// A complete response with Content-Length.
pub fn response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<Step> {
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    vec![Step::Write(bytes)]
}

pub fn png_response() -> Vec<Step> {
    response(200, &[("Content-Type", "image/png")], PNG)
}

pub fn redirect(status: u16, location: &str) -> Vec<Step> {
    response(status, &[("Location", location)], b"")
}
