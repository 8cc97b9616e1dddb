//! A shared test server: the tiny-like fixture model behind real HTTP on 127.0.0.1, plus a
//! loopback file server for image URLs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use axum::extract::Path as UrlPath;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use dsvl2_config::ModelDir;
use dsvl2_engine::{Engine, EngineConfig};
use dsvl2_media::MediaPolicy;
use dsvl2_model::{DType, DeepseekVl2, Device};
use dsvl2_processor::Processor;
use dsvl2_server::{AppState, ServerOptions};
use serde_json::Value;

pub const PROMPT: &str = "Describe each stage of this <image> in detail.";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub struct TestServer {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// Serves `tests/fixtures/images/NAME` at `{images}/NAME`.
    pub images: String,
}

pub fn load_engine(config: EngineConfig) -> (Engine, Arc<Processor>) {
    load_engine_of("tiny-like", config)
}

/// The fixture model `tests/fixtures/models/{variant}` behind an engine with `config`.
pub fn load_engine_of(variant: &str, config: EngineConfig) -> (Engine, Arc<Processor>) {
    let dir = ModelDir::open(fixtures().join("models").join(variant)).unwrap();
    let processor = Arc::new(Processor::from_model_dir(&dir).unwrap());
    let model = DeepseekVl2::load(&dir, &Device::Cpu, DType::F32).unwrap();
    (Engine::start(model, processor.clone(), config), processor)
}

pub fn options() -> ServerOptions {
    ServerOptions {
        model_name: "tiny-like".into(),
        media: MediaPolicy {
            allow_private_urls: true,
            ..MediaPolicy::default()
        },
        ..ServerOptions::default()
    }
}

/// The server all tests share (started once, on its own runtime thread).
pub fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let files = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let base = format!("http://{}", listener.local_addr().unwrap());
                let images = format!("http://{}/images", files.local_addr().unwrap());
                let state = AppState::new(options());
                let (engine, processor) = load_engine(EngineConfig::default());
                state.set_ready(engine, processor);
                let file_server = Router::new().route(
                    "/images/{name}",
                    get(|UrlPath(name): UrlPath<String>| async move {
                        match std::fs::read(fixtures().join("images").join(&name)) {
                            Ok(bytes) => Ok(bytes),
                            Err(_) => Err(StatusCode::NOT_FOUND),
                        }
                    }),
                );
                tokio::spawn(async move { axum::serve(files, file_server).await.unwrap() });
                tx.send(TestServer { base, images }).unwrap();
                dsvl2_server::serve(listener, state, std::future::pending())
                    .await
                    .unwrap();
            });
        });
        rx.recv().unwrap()
    })
}

/// A server of its own, on the caller's runtime: a fixture model, its engine limits and options.
pub struct OwnServer {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub state: AppState,
    /// Send (or drop) to start a graceful shutdown.
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Starts a ready server with the fixture model `variant` and `config` on a free port.
pub async fn start_server(variant: &str, config: EngineConfig, options: ServerOptions) -> OwnServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = AppState::new(options);
    let variant = variant.to_string();
    let (engine, processor) = tokio::task::spawn_blocking(move || load_engine_of(&variant, config))
        .await
        .unwrap();
    state.set_ready(engine, processor);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(dsvl2_server::serve(listener, state.clone(), async {
        let _ = stopped.await;
    }));
    OwnServer {
        base,
        state,
        stop,
        task,
    }
}

/// The whole `/metrics` page.
pub async fn metrics_text(base: &str) -> String {
    client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A sample's value in `/metrics`: `name` is the metric with its labels as rendered (sorted by
/// label name), e.g. `dsvl2_generations_total{api="openai",outcome="canceled"}`. A sample not
/// rendered (a labelled counter never incremented) reads 0.
pub async fn metric(base: &str, name: &str) -> f64 {
    metrics_text(base)
        .await
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Polls `metric(name)` every 20 ms until `ok(value)` or `bound` passes; the last value and
/// whether it got there.
pub async fn wait_for_metric(
    base: &str,
    name: &str,
    bound: std::time::Duration,
    ok: impl Fn(f64) -> bool,
) -> (f64, bool) {
    let deadline = std::time::Instant::now() + bound;
    loop {
        let value = metric(base, name).await;
        if ok(value) {
            return (value, true);
        }
        if std::time::Instant::now() >= deadline {
            return (value, false);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub fn data_uri(image: &str) -> String {
    let bytes = std::fs::read(fixtures().join("images").join(image)).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The reference's greedy answer (24 tokens, no penalty) for [`PROMPT`] with wide_street.png.
pub fn reference_greedy_text() -> String {
    let text = std::fs::read_to_string(fixtures().join("cases/single_wide/tiny-like.json")).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    golden["generated_text"].as_str().unwrap().to_string()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// (status, JSON body)
pub async fn post_json(url: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, json)
}

pub async fn get_json(url: &str) -> (u16, Value) {
    let response = client().get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (status, serde_json::from_str(&response.text().await.unwrap()).unwrap())
}

/// Server-sent events of a finished response: (event name, data).
pub fn parse_sse(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut event = String::from("message");
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim_start().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            (!data.is_empty()).then(|| (event, data.join("\n")))
        })
        .collect()
}
