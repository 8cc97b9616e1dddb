//! The OpenAI chat-completions contract over real HTTP, and the official Python client.

mod common;

use common::*;
use serde_json::{json, Value};

/// The chunks of a streamed chat completion (200, ending with `[DONE]`, which is not returned).
async fn post_streamed(url: &str, request: &Value) -> Vec<Value> {
    let response = client().post(url).body(request.to_string()).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let events = parse_sse(&response.text().await.unwrap());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect()
}

fn greedy_request(stream: bool) -> Value {
    json!({
        "model": "tiny-like",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": PROMPT},
            {"type": "image_url", "image_url": {"url": data_uri("wide_street.png")}},
        ]}],
        "temperature": 0,
        "max_tokens": 24,
        "stream": stream,
    })
}

#[tokio::test]
async fn streamed_deltas_add_up_to_the_answer() {
    let s = server();
    let url = format!("{}/v1/chat/completions", s.base);
    let (status, body) = post_json(&url, &greedy_request(false), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "tiny-like");
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "length");
    let text = choice["message"]["content"].as_str().unwrap();
    // Temperature 0 without an explicit penalty: the reference's greedy answer.
    assert_eq!(text, reference_greedy_text());
    // The same prompt as the fixture: 831 tokens, image placeholders included.
    assert_eq!(body["usage"]["prompt_tokens"], 831);
    assert_eq!(body["usage"]["completion_tokens"], 24);
    assert_eq!(body["usage"]["total_tokens"], 855);

    let mut streamed_request = greedy_request(true);
    streamed_request["stream_options"] = json!({"include_usage": true});
    let chunks = post_streamed(&url, &streamed_request).await;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("length")]);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 24);
}

/// `n` answers to one prompt: answer `i` samples with `seed + i`, so answer 0 is the single answer
/// with `seed`; streamed, each answer's chunks carry its index and add up to its text; usage counts
/// the prompt once and every answer's tokens.
#[tokio::test]
async fn n_answers_sample_with_consecutive_seeds() {
    let s = server();
    let url = format!("{}/v1/chat/completions", s.base);
    let sampled = |n: usize, seed: u64, stream: bool| {
        let mut r = greedy_request(stream);
        r["temperature"] = json!(1.0);
        r["max_tokens"] = json!(8);
        r["seed"] = json!(seed);
        r["n"] = json!(n);
        r
    };
    let (status, three) = post_json(&url, &sampled(3, 5, false), &[]).await;
    assert_eq!(status, 200, "{three}");
    let texts: Vec<&str> = three["choices"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i);
            c["message"]["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(texts.len(), 3);
    assert_eq!(three["usage"]["prompt_tokens"], 831);
    assert_eq!(three["usage"]["completion_tokens"], 24);
    // One prefill for the three: the other two started from the kept prompt.
    let metrics = metrics_text(&s.base).await;
    let gauge = |name: &str| -> u64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} ")));
        line.and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    assert!(gauge("dsvl2_prompt_cache_hits") >= 2, "{metrics}");
    assert!(gauge("dsvl2_prompt_cache_reused_positions") >= 2 * 831, "{metrics}");
    for (i, text) in texts.iter().enumerate() {
        let (status, one) = post_json(&url, &sampled(1, 5 + i as u64, false), &[]).await;
        assert_eq!(status, 200, "{one}");
        assert_eq!(one["choices"][0]["message"]["content"], *text, "answer {i}");
    }

    let mut streamed = [String::new(), String::new()];
    let mut finished = [0, 0];
    for chunk in post_streamed(&url, &sampled(2, 5, true)).await {
        let choice = &chunk["choices"][0];
        let index = choice["index"].as_u64().unwrap() as usize;
        if let Some(text) = choice["delta"]["content"].as_str() {
            streamed[index].push_str(text);
        }
        if choice["finish_reason"].is_string() {
            finished[index] += 1;
        }
    }
    assert_eq!(finished, [1, 1]);
    assert_eq!(streamed, [texts[0], texts[1]]);
}

#[tokio::test]
async fn stop_strings_and_models() {
    let s = server();
    let mut request = greedy_request(false);
    request["stop"] = json!(["thcurrent"]);
    let (status, body) = post_json(&format!("{}/v1/chat/completions", s.base), &request, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["choices"][0]["message"]["content"], "_name tuple ");
    let (status, models) = get_json(&format!("{}/v1/models", s.base)).await;
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny-like");
}

fn assert_error_shape(body: &Value) {
    let e = &body["error"];
    assert!(e["message"].is_string(), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{body}");
}

#[tokio::test]
async fn unsupported_requests_get_400_naming_the_problem() {
    let s = server();
    let url = format!("{}/v1/chat/completions", s.base);
    let text = |t: &str| json!([{"role": "user", "content": t}]);
    let image = json!({"type": "image_url", "image_url": {"url": data_uri("small_photo.png")}});
    let cases = [
        (json!({"messages": text("hi"), "n": 0}), "n"),
        (json!({"messages": text("hi"), "n": 17}), "n"),
        (
            json!({"messages": text("hi"), "tools": [{"type": "function"}]}),
            "tools",
        ),
        (json!({"messages": text("hi"), "logprobs": true}), "logprobs"),
        (
            json!({"messages": text("hi"), "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (json!({"messages": text("hi"), "mystery": 1}), "mystery"),
        (json!({"messages": text("hi"), "temperature": -1}), "temperature"),
        (json!({"messages": text("hi"), "max_tokens": 0}), "max_tokens"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "system", "content": [image]}, {"role": "user", "content": "hi"}]}),
            "messages[0].content[0]",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "<image> vs <image>"}, image]}]}),
            "messages[0].content",
        ),
    ];
    for (request, param) in cases {
        let (status, body) = post_json(&url, &request, &[]).await;
        assert_eq!(status, 400, "{request} -> {body}");
        assert_error_shape(&body);
        assert_eq!(body["error"]["param"], param, "{body}");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(param.split('[').next().unwrap()));
    }
    // More tags than images: both counts.
    let (_, body) = post_json(
        &url,
        &json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "<image> vs <image>"}, image]}]}),
        &[],
    )
    .await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("2 `<image>` tag(s) but 1 image(s)"), "{message}");
    // Malformed JSON and a refused image source.
    let response = client().post(&url).body("[1,").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert_error_shape(&serde_json::from_str(&response.text().await.unwrap()).unwrap());
    let request = json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]});
    let (status, body) = post_json(&url, &request, &[]).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_image");
    // Too long for the context.
    let mut request = greedy_request(false);
    request["max_tokens"] = json!(4000);
    let (status, body) = post_json(&url, &request, &[]).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
}

/// The official `openai` Python package against the server: a base64 image and a streamed
/// request. Skipped locally when the package is missing; a failure under CI.
#[tokio::test]
async fn official_python_client() {
    let has_openai = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but the `openai` Python package is not importable (python3 -m pip install openai)");
        }
        eprintln!("skipped: the `openai` Python package is not installed (python3 -m pip install openai)");
        return;
    }
    let s = server();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let image = fixtures().join("images/wide_street.png");
    let base = format!("{}/v1", s.base);
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .arg(base)
            .arg(image)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "python client failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("openai client OK"), "{stdout}\n{stderr}");
}
