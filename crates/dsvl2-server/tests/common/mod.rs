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
    let dir = ModelDir::open(fixtures().join("models/tiny-like")).unwrap();
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
