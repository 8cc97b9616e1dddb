//! The Cog contract over real HTTP.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn greedy_input(max: u64) -> Value {
    json!({
        "image": data_uri("wide_street.png"),
        "prompt": PROMPT,
        "temperature": 0,
        "max_length_tokens": max,
    })
}

#[tokio::test]
async fn sync_greedy_prediction_gives_the_reference_text() {
    let s = server();
    let (status, body) = post_json(
        &format!("{}/predictions", s.base),
        &json!({"input": greedy_input(24)}),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "succeeded", "{body}");
    assert_eq!(body["error"], Value::Null);
    assert_eq!(body["output"].as_str().unwrap(), reference_greedy_text());
    assert!(body["metrics"]["predict_time"].as_f64().unwrap() > 0.0, "{body}");
    for key in ["id", "created_at", "started_at", "completed_at"] {
        assert!(body[key].is_string(), "{key}: {body}");
    }
    assert_eq!(body["logs"], "");
}

#[tokio::test]
async fn image_urls_are_fetched_and_defaults_apply() {
    let s = server();
    let input = json!({"image": format!("{}/wide_street.png", s.images), "max_length_tokens": 4});
    let (status, body) = post_json(&format!("{}/predictions", s.base), &json!({"input": input}), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "succeeded", "{body}");
    assert!(!body["output"].as_str().unwrap().is_empty());
    // An unfetchable image is a failed prediction, with the reason.
    let input = json!({"image": format!("{}/missing.png", s.images)});
    let (status, body) = post_json(&format!("{}/predictions", s.base), &json!({"input": input}), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "failed");
    assert!(body["error"].as_str().unwrap().contains("404"), "{body}");
}

#[tokio::test]
async fn bad_inputs_get_422_with_fastapi_details() {
    let s = server();
    let url = format!("{}/predictions", s.base);
    let cases = [
        (json!({"input": {"image": "x", "top_p": 3}}), "top_p"),
        (json!({"input": {"image": "x", "temperature": "hot"}}), "temperature"),
        (
            json!({"input": {"image": "x", "max_length_tokens": 1.5}}),
            "max_length_tokens",
        ),
        (
            json!({"input": {"image": "x", "max_length_tokens": 5000}}),
            "max_length_tokens",
        ),
        (
            json!({"input": {"image": "x", "repetition_penalty": 0}}),
            "repetition_penalty",
        ),
        (json!({"input": {"image": "x", "seed": 1}}), "seed"),
        (json!({"input": {"prompt": "hi"}}), "image"),
        (json!({"input": {"image": 7}}), "image"),
        (
            json!({"input": {"image": "x", "prompt": "<image> and <image>"}}),
            "prompt",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = post_json(&url, &body, &[]).await;
        assert_eq!(status, 422, "{body} -> {answer}");
        let detail = answer["detail"].as_array().unwrap_or_else(|| panic!("{answer}"));
        assert!(
            detail.iter().any(|d| d["loc"] == json!(["body", "input", field])
                && d["msg"].is_string()
                && d["type"].as_str().unwrap().ends_with("_error")),
            "{body} -> {answer}"
        );
    }
    // Malformed JSON: 422 JSON too, never a panic or plain text.
    let response = client().post(&url).body("{not json").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 422);
    let answer: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(answer["detail"][0]["loc"], json!(["body"]));
}

async fn wait_terminal(base: &str, id: &str) -> Value {
    for _ in 0..600 {
        let (status, body) = get_json(&format!("{base}/predictions/{id}")).await;
        assert!(status == 200 || status == 202, "{body}");
        if body["status"] != "processing" {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("prediction {id} did not finish");
}

#[tokio::test]
async fn async_prediction_with_webhook_then_cancel() {
    let s = server();
    // A webhook receiver.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", hook.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(serde_json::from_str(&body).unwrap());
                "ok"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(hook, app).await.unwrap() });

    let async_header = [("prefer", "respond-async")];
    let request = json!({"input": greedy_input(6), "webhook": hook_url, "webhook_events_filter": ["completed"]});
    let (status, body) = post_json(&format!("{}/predictions", s.base), &request, &async_header).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "processing");
    let id = body["id"].as_str().unwrap().to_string();
    let done = wait_terminal(&s.base, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let hooked = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hooked["id"], id.as_str());
    assert_eq!(hooked["status"], "succeeded");
    assert_eq!(hooked["output"], done["output"]);

    // A long one, cancelled while it runs (the budget is clamped to the context left).
    let (status, body) = post_json(
        &format!("{}/predictions", s.base),
        &json!({"id": "long-one", "input": greedy_input(4096)}),
        &async_header,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = post_json(&format!("{}/predictions/long-one/cancel", s.base), &json!({}), &[]).await;
    assert_eq!(status, 200);
    let done = wait_terminal(&s.base, "long-one").await;
    assert_eq!(done["status"], "canceled", "{done}");
    assert!(done["completed_at"].is_string());

    let (status, body) = post_json(&format!("{}/predictions/nope/cancel", s.base), &json!({}), &[]).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["detail"].is_string());
}

#[tokio::test]
async fn put_is_idempotent() {
    let s = server();
    let url = format!("{}/predictions/put-once", s.base);
    let response = client()
        .put(&url)
        .header("content-type", "application/json")
        .body(json!({"input": greedy_input(5)}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let first: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(first["status"], "succeeded", "{first}");
    assert_eq!(first["id"], "put-once");
    // Same id again (even with other input): the same prediction, not a second run.
    let response = client()
        .put(&url)
        .body(json!({"input": greedy_input(9)}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let second: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(second, first);
}

#[tokio::test]
async fn event_stream_sends_start_output_completed() {
    let s = server();
    let response = client()
        .post(format!("{}/predictions", s.base))
        .header("accept", "text/event-stream")
        .body(json!({"input": greedy_input(24)}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = parse_sse(&response.text().await.unwrap());
    assert_eq!(events.first().unwrap().0, "start", "{events:?}");
    assert_eq!(events.last().unwrap().0, "completed", "{events:?}");
    let outputs: Vec<&(String, String)> = events.iter().filter(|(e, _)| e == "output").collect();
    assert!(!outputs.is_empty());
    assert_eq!(outputs.len() + 2, events.len(), "{events:?}");
    let streamed: String = outputs
        .iter()
        .map(|(_, d)| serde_json::from_str::<String>(d).unwrap())
        .collect();
    let completed: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(completed["status"], "succeeded");
    assert_eq!(completed["output"].as_str().unwrap(), streamed);
    assert_eq!(streamed, reference_greedy_text());
}

#[tokio::test]
async fn discovery_health_and_openapi() {
    let s = server();
    let (status, root) = get_json(&format!("{}/", s.base)).await;
    assert_eq!(status, 200);
    assert_eq!(root["openapi_url"], "/openapi.json");
    let (status, health) = get_json(&format!("{}/health-check", s.base)).await;
    assert_eq!(status, 200);
    assert!(health["status"] == "READY" || health["status"] == "BUSY", "{health}");

    let (_, api) = get_json(&format!("{}/openapi.json", s.base)).await;
    let input = &api["components"]["schemas"]["Input"]["properties"];
    let expected = [
        ("image", json!(null), "string", 0),
        ("prompt", json!("Describe this image."), "string", 1),
        ("top_p", json!(0.9), "number", 2),
        ("temperature", json!(0.1), "number", 3),
        ("max_length_tokens", json!(2048), "integer", 4),
        ("repetition_penalty", json!(1.1), "number", 5),
    ];
    assert_eq!(input.as_object().unwrap().len(), expected.len());
    for (name, default, kind, order) in expected {
        let p = &input[name];
        assert_eq!(p["type"], kind, "{name}");
        assert_eq!(p["x-order"], order, "{name}");
        assert!(p["description"].is_string(), "{name}");
        if !default.is_null() {
            assert_eq!(p["default"], default, "{name}");
        }
    }
    assert_eq!(input["image"]["format"], "uri");
    assert_eq!(input["image"]["description"], "Input image");
    assert_eq!(input["max_length_tokens"]["maximum"], 4096);
    assert_eq!(input["repetition_penalty"]["maximum"], 2);
    assert_eq!(api["components"]["schemas"]["Output"]["type"], "string");
    assert!(api["components"]["schemas"]["PredictionRequest"].is_object());
    assert!(api["components"]["schemas"]["PredictionResponse"].is_object());
}

#[tokio::test]
async fn metrics_are_exposed() {
    let s = server();
    let (status, _) = post_json(
        &format!("{}/predictions", s.base),
        &json!({"input": greedy_input(3)}),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let text = metrics_text(&s.base).await;
    for name in [
        "dsvl2_http_requests_total{endpoint=\"/predictions\",status=\"200\"}",
        "dsvl2_queue_depth",
        "dsvl2_running_sequences",
        "dsvl2_prompt_tokens_total",
        "dsvl2_generated_tokens_total",
        "dsvl2_time_to_first_token_seconds_bucket",
        "dsvl2_time_per_output_token_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
}
