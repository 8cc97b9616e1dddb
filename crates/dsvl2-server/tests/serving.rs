//! Serving behaviour over real HTTP, each test on a server of its own: batching of concurrent
//! requests, a client that goes away, and a full queue.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dsvl2_engine::EngineConfig;
use serde_json::{json, Value};

const RUNNING: &str = "dsvl2_running_sequences";
const QUEUED: &str = "dsvl2_queue_depth";

/// A text-only greedy chat request.
fn text_request(prompt: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// (content, completion tokens, finish reason) of a successful non-streamed answer.
fn answer(status: u16, body: &Value) -> (String, u64, String) {
    assert_eq!(status, 200, "{body}");
    (
        body["choices"][0]["message"]["content"].as_str().unwrap().to_string(),
        body["usage"]["completion_tokens"].as_u64().unwrap(),
        body["choices"][0]["finish_reason"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_are_batched_and_answer_as_alone() {
    const TOKENS: usize = 32;
    let config = EngineConfig {
        max_running: 8,
        ..EngineConfig::default()
    };
    let s = start_server("small-like", config, options()).await;
    let url = format!("{}/v1/chat/completions", s.base);
    let subjects = [
        "a lighthouse",
        "the moon",
        "a red bicycle",
        "an old library",
        "mountain rivers",
        "a busy market",
        "winter trains",
        "a chess game",
    ];
    let requests: Vec<Value> = subjects
        .iter()
        .map(|s| text_request(&format!("Write a long story about {s}."), TOKENS, false))
        .collect();
    // Warm up (first-use costs are not what is measured).
    answer_of(&url, &requests[0]).await;

    let started = Instant::now();
    let mut sequential = Vec::new();
    for request in &requests {
        sequential.push(answer_of(&url, request).await);
    }
    let sequential_wall = started.elapsed();

    // While the concurrent requests run, record the most sequences the engine ran at once.
    let base = s.base.clone();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        let mut most = 0f64;
        loop {
            most = most.max(metric(&base, RUNNING).await);
            if done_rx.try_recv().is_ok() {
                return most;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let started = Instant::now();
    let tasks: Vec<_> = requests
        .iter()
        .cloned()
        .map(|request| {
            let url = url.clone();
            tokio::spawn(async move { answer_of(&url, &request).await })
        })
        .collect();
    let mut concurrent = Vec::new();
    for task in tasks {
        concurrent.push(task.await.unwrap());
    }
    let concurrent_wall = started.elapsed();
    done_tx.send(()).unwrap();
    let most_running = watcher.await.unwrap();

    for (i, (alone, together)) in sequential.iter().zip(&concurrent).enumerate() {
        assert_eq!(alone, together, "prompt {i}: batched answer differs from the one alone");
        assert_eq!(alone.1, TOKENS as u64, "prompt {i} stopped early: {alone:?}");
    }
    let distinct: std::collections::HashSet<_> = sequential.iter().map(|a| &a.0).collect();
    assert!(distinct.len() > 1, "all prompts gave the same answer: {sequential:?}");
    let ratio = concurrent_wall.as_secs_f64() / sequential_wall.as_secs_f64();
    println!(
        "8 x {TOKENS} tokens: sequential {:.3} s, concurrent {:.3} s, ratio {ratio:.3}; most running at once: {most_running}",
        sequential_wall.as_secs_f64(),
        concurrent_wall.as_secs_f64(),
    );
    assert!(most_running > 1.0, "the engine never ran two sequences at once");
    assert!(
        concurrent_wall < sequential_wall,
        "concurrent {concurrent_wall:?} is not faster than sequential {sequential_wall:?}"
    );
}

async fn answer_of(url: &str, request: &Value) -> (String, u64, String) {
    let (status, body) = post_json(url, request, &[]).await;
    answer(status, &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_sequence() {
    const TOKENS: usize = 3000;
    let s = start_server("tiny-like", EngineConfig::default(), options()).await;
    let url = format!("{}/v1/chat/completions", s.base);
    let mut response = client()
        .post(&url)
        .header("content-type", "application/json")
        .body(text_request("Tell me everything about the sea.", TOKENS, true).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // Read a few content deltas, timing them.
    let mut deltas = 0;
    let mut first_delta: Option<Instant> = None;
    let mut text = String::new();
    while deltas < 6 {
        let chunk = response.chunk().await.unwrap().expect("the stream ended early");
        text.push_str(&String::from_utf8_lossy(&chunk));
        let now = parse_sse(&text)
            .iter()
            .filter(|(_, d)| d.contains("\"content\"") && !d.contains("\"role\""))
            .count();
        if now > 0 && first_delta.is_none() {
            first_delta = Some(Instant::now());
        }
        deltas = now;
    }
    let per_delta = first_delta.unwrap().elapsed() / (deltas as u32 - 1);
    assert_eq!(metric(&s.base, RUNNING).await, 1.0);

    drop(response);
    let dropped = Instant::now();
    let (running, freed) = wait_for_metric(&s.base, RUNNING, Duration::from_secs(10), |v| v == 0.0).await;
    let took = dropped.elapsed();
    // At most one delta per token: the whole answer would take at least this long.
    let whole = per_delta * (TOKENS - deltas) as u32;
    println!("freed after {took:?}; ~{per_delta:?} per delta, so the rest would take >= {whole:?}");
    assert!(freed, "still {running} running sequences 10 s after the client left");
    assert!(
        took * 4 < whole,
        "freed after {took:?}: no sooner than the answer could have finished ({whole:?})"
    );
    assert_eq!(
        metric(&s.base, r#"dsvl2_generations_total{api="openai",outcome="canceled"}"#).await,
        1.0
    );
    assert_eq!(
        metric(&s.base, r#"dsvl2_generations_total{api="openai",outcome="succeeded"}"#).await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_gets_cog_409_and_openai_429() {
    let config = EngineConfig {
        max_queue: 1,
        max_running: 1,
        ..EngineConfig::default()
    };
    let s = start_server("tiny-like", config, options()).await;
    let url = format!("{}/v1/chat/completions", s.base);
    let long = |prompt: &str| text_request(prompt, 3000, false);
    let running = {
        let (url, request) = (url.clone(), long("Tell me everything about the sea."));
        tokio::spawn(async move { post_json(&url, &request, &[]).await })
    };
    let (_, ok) = wait_for_metric(&s.base, RUNNING, Duration::from_secs(10), |v| v == 1.0).await;
    assert!(ok, "the first request never ran");
    let waiting = {
        let (url, request) = (url.clone(), long("Tell me everything about the sky."));
        tokio::spawn(async move { post_json(&url, &request, &[]).await })
    };
    let (_, ok) = wait_for_metric(&s.base, QUEUED, Duration::from_secs(10), |v| v == 1.0).await;
    assert!(ok, "the second request never queued");

    let (status, body) = post_json(&url, &long("And the land?"), &[]).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "server_busy", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("busy") && message.contains("waiting"), "{message}");

    let cog = json!({"input": {"image": data_uri("wide_street.png"), "prompt": PROMPT, "max_length_tokens": 24}});
    let (status, body) = post_json(&format!("{}/predictions", s.base), &cog, &[]).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("queue is full"), "{body}");
    // The refused ones are counted, and did not disturb the two admitted.
    assert_eq!(
        metric(&s.base, r#"dsvl2_generations_total{api="openai",outcome="refused"}"#).await,
        1.0
    );
    assert_eq!(
        metric(&s.base, r#"dsvl2_generations_total{api="cog",outcome="refused"}"#).await,
        1.0
    );
    assert_eq!(metric(&s.base, RUNNING).await, 1.0);
    assert_eq!(metric(&s.base, QUEUED).await, 1.0);

    // Giving up on both frees the engine.
    running.abort();
    waiting.abort();
    let (_, ok) = wait_for_metric(&s.base, RUNNING, Duration::from_secs(10), |v| v == 0.0).await;
    assert!(ok, "aborted requests still running");
    let (_, ok) = wait_for_metric(&s.base, QUEUED, Duration::from_secs(10), |v| v == 0.0).await;
    assert!(ok, "aborted request still queued");
}
