//! `dsvl2 serve` as a process: SIGTERM lets the request in flight finish, refuses new connections
//! and exits 0.

#![cfg(unix)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Kills the server if the test fails half-way.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request on its own connection: (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn running_sequences(addr: SocketAddr) -> f64 {
    let (_, text) = http(addr, "GET", "/metrics", None).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("dsvl2_running_sequences "))
        .expect("dsvl2_running_sequences in /metrics")
        .trim()
        .parse()
        .unwrap()
}

fn wait_until(bound: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ok()
}

#[test]
fn sigterm_drains_the_request_in_flight_then_exits_0() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-like");
    let child = Command::new(env!("CARGO_BIN_EXE_dsvl2"))
        .args(["serve", "--port", "0", "--shutdown-timeout", "60", "--model"])
        .arg(&model)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dsvl2 starts");
    let mut server = Server(child);
    let pid = server.0.id();

    // The log says `listening on http://ADDR (...)`; keep draining it (and keep it for failures).
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let (addr_tx, addr_rx) = mpsc::channel::<SocketAddr>();
    {
        let stderr = server.0.stderr.take().unwrap();
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, rest)) = line.split_once("listening on http://") {
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    let _ = addr_tx.send(addr.parse().unwrap_or_else(|e| panic!("{addr:?}: {e}")));
                }
                log.lock().unwrap().push(line);
            }
        });
    }
    let logged = || log.lock().unwrap().join("\n");
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("no `listening on` line:\n{}", logged()));
    let ready = wait_until(
        Duration::from_secs(30),
        || matches!(http(addr, "GET", "/health-check", None), Ok((200, body)) if body.contains("READY")),
    );
    assert!(ready, "never READY:\n{}", logged());

    // A request long enough to be in flight when the signal comes.
    const TOKENS: u64 = 1000;
    let answered = Arc::new(AtomicBool::new(false));
    let in_flight = {
        let answered = answered.clone();
        let request = json!({
            "messages": [{"role": "user", "content": "Tell me everything about the sea."}],
            "temperature": 0,
            "max_tokens": TOKENS,
        });
        std::thread::spawn(move || {
            let response = http(addr, "POST", "/v1/chat/completions", Some(&request));
            answered.store(true, Ordering::SeqCst);
            response
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), || running_sequences(addr) == 1.0),
        "the request never ran"
    );

    let signalled = Instant::now();
    let kill = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(kill.success());

    // New connections are refused while the request in flight still runs.
    let refused = wait_until(Duration::from_secs(5), || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
    });
    assert!(refused, "still accepting connections 5 s after SIGTERM");
    let refused_while_draining = !answered.load(Ordering::SeqCst);

    let (status, body) = in_flight
        .join()
        .unwrap()
        .expect("the request in flight gets its answer");
    assert_eq!(status, 200, "{body}\n{}", logged());
    let body: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let tokens = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(tokens > 0, "{body}");
    if body["choices"][0]["finish_reason"] == "length" {
        assert_eq!(tokens, TOKENS);
    }
    assert!(
        refused_while_draining,
        "the request in flight ({tokens} tokens) had already finished when connections were refused"
    );

    let exited = wait_until(Duration::from_secs(30), || server.0.try_wait().unwrap().is_some());
    assert!(exited, "still running 30 s after SIGTERM:\n{}", logged());
    let status = server.0.wait().unwrap();
    println!(
        "answered {tokens} tokens after SIGTERM; exited {status} {:?} after the signal",
        signalled.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{}", logged());
    assert!(logged().contains("SIGTERM received"), "{}", logged());
}
