//! Starting, limits and shutdown, on servers of their own.

mod common;

use std::time::Duration;

use common::*;
use dsvl2_engine::EngineConfig;
use dsvl2_server::{AppState, ServerOptions};
use serde_json::{json, Value};

async fn start(
    state: AppState,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(dsvl2_server::serve(listener, state, async {
        let _ = stopped.await;
    }));
    (base, stop, task)
}

#[tokio::test]
async fn starting_then_ready_and_graceful_shutdown() {
    let state = AppState::new(ServerOptions {
        shutdown_grace: Duration::from_secs(20),
        ..options()
    });
    let (base, stop, task) = start(state.clone()).await;
    let (_, health) = get_json(&format!("{base}/health-check")).await;
    assert_eq!(health["status"], "STARTING");
    let (status, body) = post_json(
        &format!("{base}/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "model_loading");
    let (status, body) = post_json(&format!("{base}/predictions"), &json!({"input": {"image": "x"}}), &[]).await;
    assert_eq!(status, 503, "{body}");

    let (engine, processor) = load_engine(EngineConfig::default());
    state.set_ready(engine, processor);
    let (_, health) = get_json(&format!("{base}/health-check")).await;
    assert_eq!(health["status"], "READY");

    // A request in flight when the signal comes still gets its answer.
    let request = json!({"input": {"image": data_uri("wide_street.png"), "prompt": PROMPT, "temperature": 0, "max_length_tokens": 24}});
    let url = format!("{base}/predictions");
    let in_flight = tokio::spawn(async move { post_json(&url, &request, &[]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["status"], "succeeded", "{body}");
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // No longer accepting.
    assert!(client().get(format!("{base}/health-check")).send().await.is_err());
}

#[tokio::test]
async fn oversized_bodies_and_unknown_routes_get_json_errors() {
    let state = AppState::new(ServerOptions {
        body_limit: 1024,
        ..options()
    });
    let (base, _stop, _task) = start(state).await;
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(4096)}]});
    let (status, body) = post_json(&format!("{base}/v1/chat/completions"), &big, &[]).await;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("larger"));
    let (status, body) = post_json(&format!("{base}/predictions"), &big, &[]).await;
    assert_eq!(status, 413, "{body}");
    assert!(body["detail"].is_string());
    let response = client().get(format!("{base}/nowhere")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 404);
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("/nowhere"));
    // The client's request id is echoed.
    let response = client()
        .get(format!("{base}/health-check"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "abc-123");
}
