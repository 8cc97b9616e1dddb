//! A Hugging Face Hub stand-in on 127.0.0.1 for tests (feature `mock-hub`): std only, one thread
//! per connection, `Connection: close` on every response.
//!
//! It serves what hf-hub 0.4's blocking client asks for:
//! * `GET /api/models/{owner}/{name}/revision/{rev}`: `{"id", "sha", "siblings": [{"rfilename"}]}`;
//!   404 with `X-Error-Code: RepoNotFound` / `RevisionNotFound`.
//! * `GET|HEAD /{owner}/{name}/resolve/{rev}/{file}`: headers `x-repo-commit`, `etag` (quoted),
//!   and for `*.safetensors` (LFS files on the real Hub) `x-linked-etag`, `x-linked-size` and a
//!   302 to an absolute `/cdn/...` URL like the Hub's CDN redirect; 404 `EntryNotFound`.
//! * `Range: bytes=a-b` / `bytes=a-` answered with 206, `Content-Range: bytes a-b/size` and
//!   `Content-Length`; hf-hub learns the size from `Range: bytes=0-0` and resumes with `bytes=N-`.
//! * Optional bearer token (401 without it), and faults that cut a file's body short.
//!
//! `rev` may be `main` or the repo's commit hash.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One served repo.
#[derive(Clone, Debug)]
pub struct MockRepo {
    pub sha: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl MockRepo {
    /// Every file of a folder (not recursive); the commit hash derives from the repo id.
    pub fn from_dir(repo_id: &str, dir: &Path) -> std::io::Result<Self> {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                files.insert(
                    entry.file_name().to_string_lossy().into_owned(),
                    std::fs::read(entry.path())?,
                );
            }
        }
        Ok(MockRepo {
            sha: fake_hash(repo_id.as_bytes(), 40),
            files,
        })
    }
}

/// How to break the transfer of one file.
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    /// Bytes of the requested range sent before the connection is closed.
    pub send: usize,
    /// Announce the full `Content-Length` (the client sees a short body) or send no length
    /// (the client sees a normal end of a `Connection: close` body).
    pub with_length: bool,
    /// How many transfers to break; then the file is served normally.
    pub times: usize,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, MockRepo>,
    faults: HashMap<String, Fault>,
    token: Option<String>,
    hide_siblings: bool,
    requests: Vec<String>,
}

/// The running server; stops when dropped.
pub struct MockHub {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MockHub {
    /// Starts serving on a free loopback port.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || {
                        let _ = handle(stream, &state, addr);
                    });
                }
            })
        };
        MockHub {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, for `HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn add_repo(&self, repo_id: &str, repo: MockRepo) {
        self.state.lock().unwrap().repos.insert(repo_id.to_string(), repo);
    }

    /// Serves a folder's files under `repo_id`; returns its commit hash.
    pub fn add_repo_dir(&self, repo_id: &str, dir: &Path) -> String {
        let repo = MockRepo::from_dir(repo_id, dir).expect("read fixture folder");
        let sha = repo.sha.clone();
        self.add_repo(repo_id, repo);
        sha
    }

    /// Requires `Authorization: Bearer <token>` on every request.
    pub fn require_token(&self, token: &str) {
        self.state.lock().unwrap().token = Some(token.to_string());
    }

    /// Leaves `siblings` out of repo info (as some mirrors do): clients must try files and take 404s.
    pub fn hide_siblings(&self) {
        self.state.lock().unwrap().hide_siblings = true;
    }

    /// Breaks the next `fault.times` transfers of `file` (any repo).
    pub fn set_fault(&self, file: &str, fault: Fault) {
        self.state.lock().unwrap().faults.insert(file.to_string(), fault);
    }

    /// Every request so far, as `METHOD path [range]`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Stops accepting connections; later connections are refused.
    pub fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr);
            let _ = thread.join();
        }
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A deterministic hex string of `len` digits (FNV-1a, stretched).
pub fn fake_hash(data: &[u8], len: usize) -> String {
    let mut out = String::new();
    let mut seed: u64 = 0xcbf29ce484222325;
    while out.len() < len {
        let mut h = seed;
        for &b in data {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        out.push_str(&format!("{h:016x}"));
        seed = h ^ 0x9e3779b97f4a7c15;
    }
    out.truncate(len);
    out
}

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

fn read_request(stream: &TcpStream) -> std::io::Result<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    if length > 0 {
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
    }
    Ok(Request { method, path, headers })
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send no `Content-Length` (the body ends when the connection closes).
    no_length: bool,
    /// Send only this many body bytes, then close.
    cut_at: Option<usize>,
}

impl Response {
    fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            no_length: false,
            cut_at: None,
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        let mut r = Response::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", message)
            .header("Content-Type", "application/json");
        r.body = format!("{{\"error\":\"{message}\"}}").into_bytes();
        r
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Error",
    }
}

fn handle(mut stream: TcpStream, state: &Mutex<State>, addr: SocketAddr) -> std::io::Result<()> {
    let request = read_request(&stream)?;
    let response = route(&request, state, addr);
    let head_only = request.method == "HEAD";
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nConnection: close\r\n",
        response.status,
        reason(response.status)
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !response.no_length {
        head.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if !head_only {
        let send = response.cut_at.unwrap_or(response.body.len()).min(response.body.len());
        stream.write_all(&response.body[..send])?;
    }
    stream.flush()?;
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

fn route(request: &Request, state: &Mutex<State>, addr: SocketAddr) -> Response {
    let mut state = state.lock().unwrap();
    let range = request.headers.get("range").cloned();
    state.requests.push(match &range {
        Some(r) => format!("{} {} {r}", request.method, request.path),
        None => format!("{} {}", request.method, request.path),
    });
    if !matches!(request.method.as_str(), "GET" | "HEAD") {
        return Response::error(405, "MethodNotAllowed", "only GET and HEAD");
    }
    if let Some(token) = &state.token {
        if request.headers.get("authorization") != Some(&format!("Bearer {token}")) {
            return Response::error(401, "Unauthorized", "Invalid credentials in Authorization header");
        }
    }
    let path = request.path.split('?').next().unwrap_or_default().to_string();
    let segments: Vec<String> = path.trim_start_matches('/').split('/').map(percent_decode).collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    match segs.as_slice() {
        ["api", "models", owner, name, "revision", rev] => {
            let id = format!("{owner}/{name}");
            let Some(repo) = state.repos.get(&id) else {
                return Response::error(404, "RepoNotFound", "Repository not found");
            };
            if *rev != "main" && *rev != repo.sha {
                return Response::error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}"));
            }
            let siblings: Vec<String> = repo
                .files
                .keys()
                .map(|f| format!("{{\"rfilename\":\"{f}\"}}"))
                .collect();
            let siblings = if state.hide_siblings {
                String::new()
            } else {
                format!(",\"siblings\":[{}]", siblings.join(","))
            };
            let mut r = Response::new(200).header("Content-Type", "application/json");
            r.body = format!("{{\"id\":\"{id}\",\"sha\":\"{}\"{siblings}}}", repo.sha).into_bytes();
            r
        }
        [owner, name, "resolve", rev, file @ ..] if !file.is_empty() => {
            let id = format!("{owner}/{name}");
            let file = file.join("/");
            let Some(repo) = state.repos.get(&id) else {
                return Response::error(404, "RepoNotFound", "Repository not found");
            };
            if *rev != "main" && *rev != repo.sha {
                return Response::error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}"));
            }
            let Some(content) = repo.files.get(&file) else {
                return Response::error(404, "EntryNotFound", &format!("Entry not found: {file}"));
            };
            let sha = repo.sha.clone();
            let etag = format!("\"{}\"", fake_hash(content, 40));
            if file.ends_with(".safetensors") {
                // LFS file: metadata here, bytes from the "CDN".
                let linked = fake_hash(content, 64);
                return Response::new(302)
                    .header("x-repo-commit", sha)
                    .header("etag", etag)
                    .header("x-linked-etag", format!("\"{linked}\""))
                    .header("x-linked-size", content.len().to_string())
                    .header("Location", format!("http://{addr}/cdn/{id}/{}/{file}", repo.sha));
            }
            let content = content.clone();
            serve_bytes(&mut state, &file, &content, range.as_deref())
                .header("x-repo-commit", sha)
                .header("etag", etag)
        }
        ["cdn", owner, name, sha, file @ ..] if !file.is_empty() => {
            let id = format!("{owner}/{name}");
            let file = file.join("/");
            let content = state
                .repos
                .get(&id)
                .filter(|r| r.sha == *sha)
                .and_then(|r| r.files.get(&file))
                .cloned();
            match content {
                Some(content) => serve_bytes(&mut state, &file, &content, range.as_deref()),
                None => Response::error(404, "EntryNotFound", "no such blob"),
            }
        }
        _ => Response::error(404, "NotFound", "no such route"),
    }
}

/// Serves `content` honouring `Range`, applying a pending fault to real transfers (not the
/// one-byte size probe).
fn serve_bytes(state: &mut State, file: &str, content: &[u8], range: Option<&str>) -> Response {
    let size = content.len();
    let (start, end) = match range.and_then(parse_range) {
        Some((start, end)) => (start, end.unwrap_or(size.saturating_sub(1)).min(size.saturating_sub(1))),
        None => (0, size.saturating_sub(1)),
    };
    if range.is_some() && start >= size && size > 0 {
        return Response::new(416).header("Content-Range", format!("bytes */{size}"));
    }
    let body = if size == 0 {
        Vec::new()
    } else {
        content[start..=end].to_vec()
    };
    let mut r = if range.is_some() {
        Response::new(206).header("Content-Range", format!("bytes {start}-{end}/{size}"))
    } else {
        Response::new(200)
    };
    r = r.header("Accept-Ranges", "bytes");
    let probe = start == 0 && end == 0;
    if !probe {
        if let Some(fault) = state.faults.get_mut(file).filter(|f| f.times > 0) {
            fault.times -= 1;
            r.cut_at = Some(fault.send);
            r.no_length = !fault.with_length;
        }
    }
    r.body = body;
    r
}

fn parse_range(value: &str) -> Option<(usize, Option<usize>)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start = a.trim().parse().ok()?;
    let end = if b.trim().is_empty() {
        None
    } else {
        Some(b.trim().parse().ok()?)
    };
    Some((start, end))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
