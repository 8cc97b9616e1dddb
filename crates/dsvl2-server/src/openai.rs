//! OpenAI's chat-completions API (`POST /v1/chat/completions`, `GET /v1/models`).
//!
//! Absent sampling fields take the hosted DeepSeek-VL2 predictor's defaults: temperature 0.1,
//! top_p 0.9, top_k 50, repetition_penalty 1.1 (with temperature 0 and no explicit
//! repetition_penalty, greedy decoding without penalty, as the hosted predictor). `max_tokens`
//! (or `max_completion_tokens`) absent: 2048 clamped to the context left after the prompt.

use std::convert::Infallible;
use std::path::PathBuf;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dsvl2_engine::{Completion, Event, GenerateRequest};
use dsvl2_model::sampling::DEFAULT_TOP_K;
use dsvl2_model::{FinishReason, SamplingParams};
use dsvl2_processor::{Conversation, Message, Role};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tracing::Instrument;

use crate::error::ApiError;
use crate::inputs::{self, ImageRef};
use crate::{util, AppState};

/// Request fields this server implements.
const SUPPORTED: [&str; 13] = [
    "messages",
    "model",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "repetition_penalty",
    "top_k",
    "n",
];
/// Accepted and ignored.
const IGNORED: [&str; 1] = ["user"];
/// OpenAI fields this server does not implement: refused unless null (or their neutral value).
const UNSUPPORTED: [&str; 18] = [
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "logprobs",
    "top_logprobs",
    "response_format",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "store",
    "metadata",
];

fn is_neutral(key: &str, value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(false) => matches!(key, "logprobs" | "store" | "parallel_tool_calls"),
        Value::Number(n) => {
            matches!(key, "frequency_penalty" | "presence_penalty" | "top_logprobs") && n.as_f64() == Some(0.0)
        }
        _ => false,
    }
}

fn opt_number(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(ApiError::bad_request(format!("`{key}` must be a number, got {other}")).with_param(key)),
    }
}

fn opt_integer(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64()),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64().map(|v| v as i64)),
        Some(other) => Err(ApiError::bad_request(format!("`{key}` must be an integer, got {other}")).with_param(key)),
    }
}

/// A parsed chat request.
struct ChatRequest {
    conversation: Conversation,
    images: Vec<ImageRef>,
    sampling: SamplingParams,
    max_tokens: Option<usize>,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    /// Answers asked for; answer `i` samples with `sampling.seed + i`.
    n: usize,
}

/// Most answers one request may ask for (`n`): each is a sequence of the engine's batch.
const MAX_CHOICES: usize = 16;

fn parse_request(body: &[u8], image_token: &str) -> Result<ChatRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")).with_code("invalid_json"))?;
    let Some(obj) = value.as_object() else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    let unsupported: Vec<&str> = obj
        .iter()
        .filter(|(k, v)| UNSUPPORTED.contains(&k.as_str()) && !is_neutral(k, v))
        .map(|(k, _)| k.as_str())
        .collect();
    if let Some(first) = unsupported.first() {
        return Err(ApiError::bad_request(format!(
            "unsupported parameter(s): {} (this server does plain chat completions)",
            unsupported.join(", ")
        ))
        .with_param(*first)
        .with_code("unsupported_parameter"));
    }
    let unknown: Vec<&str> = obj
        .keys()
        .map(String::as_str)
        .filter(|k| !SUPPORTED.contains(k) && !IGNORED.contains(k) && !UNSUPPORTED.contains(k))
        .collect();
    if let Some(first) = unknown.first() {
        return Err(
            ApiError::bad_request(format!("unknown parameter(s): {}", unknown.join(", ")))
                .with_param(*first)
                .with_code("unknown_parameter"),
        );
    }
    let n = match opt_integer(obj, "n")? {
        None => 1,
        Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(
                ApiError::bad_request(format!("`n` must be between 1 and {MAX_CHOICES}, got {n}")).with_param("n"),
            )
        }
    };
    match obj.get("model") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(_) => return Err(ApiError::bad_request("`model` must be a string").with_param("model")),
    }

    let (conversation, images) = parse_messages(obj.get("messages"), image_token)?;

    let temperature = opt_number(obj, "temperature")?;
    let repetition_penalty = opt_number(obj, "repetition_penalty")?;
    let defaults = SamplingParams::default();
    let top_p = opt_number(obj, "top_p")?.unwrap_or(defaults.top_p);
    let top_k = match opt_integer(obj, "top_k")? {
        None => DEFAULT_TOP_K,
        Some(-1) => 0,
        Some(k) if k >= 0 => k as usize,
        Some(k) => {
            return Err(
                ApiError::bad_request(format!("top_k must be >= 0 (0 or -1 disables), got {k}")).with_param("top_k"),
            )
        }
    };
    let temperature = temperature.unwrap_or(f64::from(defaults.temperature));
    let repetition_penalty = match repetition_penalty {
        Some(r) => r,
        // Greedy without penalty, as the hosted predictor does at temperature 0.
        None if temperature == 0.0 => 1.0,
        None => f64::from(defaults.repetition_penalty),
    };
    let seed = match opt_integer(obj, "seed")? {
        Some(s) => s as u64,
        None => util::random_u64(),
    };
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_p: if top_p == 0.0 { f64::MIN_POSITIVE } else { top_p },
        top_k,
        repetition_penalty: repetition_penalty as f32,
        seed,
    };
    sampling.validate().map_err(|e| {
        let param = e.split_whitespace().next().unwrap_or("").to_string();
        ApiError::bad_request(e).with_param(param)
    })?;

    let max_tokens = match (
        opt_integer(obj, "max_completion_tokens")?,
        opt_integer(obj, "max_tokens")?,
    ) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    let max_tokens = match max_tokens {
        Some((key, n)) if n < 1 => {
            return Err(ApiError::bad_request(format!("`{key}` must be at least 1, got {n}")).with_param(key))
        }
        Some((_, n)) => Some(n as usize),
        None => None,
    };
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect()
        }
        Some(_) => return Err(ApiError::bad_request("`stop` must be a string or a list of strings").with_param("stop")),
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("stop strings must not be empty").with_param("stop"));
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad_request("`stream` must be a boolean").with_param("stream")),
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(ChatRequest {
        conversation,
        images,
        sampling,
        max_tokens,
        stop,
        stream,
        include_usage,
        n,
    })
}

/// Messages to a conversation and its image references. In a user message, image parts become
/// `<image>` tags where they stand, unless the text already places tags itself: then missing tags
/// go to the start of the message (as the official web demo) and extra tags are an error.
fn parse_messages(messages: Option<&Value>, image_token: &str) -> Result<(Conversation, Vec<ImageRef>), ApiError> {
    let bad = |msg: String, param: String| ApiError::bad_request(msg).with_param(param);
    let Some(Value::Array(messages)) = messages else {
        return Err(bad("`messages` must be a non-empty list".into(), "messages".into()));
    };
    if messages.is_empty() {
        return Err(bad("`messages` must be a non-empty list".into(), "messages".into()));
    }
    let mut out = Vec::with_capacity(messages.len());
    let mut images = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Some(m) = m.as_object() else {
            return Err(bad(format!("{at} must be an object"), at));
        };
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system") | Some("developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(other) => {
                return Err(bad(
                    format!("{at}.role {other:?} is not supported (system, user, assistant)"),
                    format!("{at}.role"),
                ))
            }
            None => return Err(bad(format!("{at}.role is missing"), format!("{at}.role"))),
        };
        // (text pieces, image refs) in order.
        let mut texts: Vec<String> = Vec::new();
        let mut order: Vec<Option<usize>> = Vec::new(); // None: text piece, Some(k): image k of this message
        let mut mine: Vec<String> = Vec::new();
        match m.get("content") {
            Some(Value::String(s)) => {
                texts.push(s.clone());
                order.push(None);
            }
            None | Some(Value::Null) if role == Role::Assistant => {}
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    let pat = format!("{at}.content[{j}]");
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let Some(text) = part.get("text").and_then(Value::as_str) else {
                                return Err(bad(format!("{pat}.text must be a string"), pat));
                            };
                            texts.push(text.to_string());
                            order.push(None);
                        }
                        Some("image_url") => {
                            let url = match part.get("image_url") {
                                Some(Value::String(u)) => Some(u.clone()),
                                Some(Value::Object(o)) => o.get("url").and_then(Value::as_str).map(str::to_owned),
                                _ => None,
                            };
                            let Some(url) = url else {
                                return Err(bad(format!("{pat}.image_url.url must be a string"), pat));
                            };
                            if role != Role::User {
                                return Err(bad(
                                    format!(
                                        "images are only allowed in user messages ({at} is a {} message)",
                                        m.get("role").and_then(Value::as_str).unwrap_or("")
                                    ),
                                    pat,
                                ));
                            }
                            order.push(Some(mine.len()));
                            mine.push(url);
                            images.push(ImageRef {
                                reference: mine.last().cloned().unwrap_or_default(),
                                param: format!("{pat}.image_url.url"),
                            });
                        }
                        other => {
                            return Err(bad(
                                format!("{pat}: content part type {other:?} is not supported (text, image_url)"),
                                pat,
                            ))
                        }
                    }
                }
            }
            _ => {
                return Err(bad(
                    format!("{at}.content must be a string or a list of parts"),
                    format!("{at}.content"),
                ))
            }
        }
        let tags: usize = texts.iter().map(|t| t.matches(image_token).count()).sum();
        let content = if role != Role::User || mine.is_empty() || tags > 0 {
            if tags > mine.len() && role == Role::User {
                return Err(bad(
                    format!("{at} has {tags} `{image_token}` tag(s) but {} image(s)", mine.len()),
                    format!("{at}.content"),
                )
                .with_code("image_count_mismatch"));
            }
            let text = texts.join("\n");
            let missing = mine.len() - tags.min(mine.len());
            if missing > 0 {
                format!("{}\n{text}", vec![image_token; missing].join("\n"))
            } else {
                text
            }
        } else {
            let mut pieces = texts.into_iter();
            order
                .iter()
                .map(|o| match o {
                    None => pieces.next().unwrap_or_default(),
                    Some(_) => image_token.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let paths = (0..mine.len()).map(|k| PathBuf::from(format!("image {k}"))).collect();
        out.push(Message::new(role, content, paths));
    }
    if out.last().map(|m| m.role) != Some(Role::User) {
        return Err(bad("the last message must be a user message".into(), "messages".into()));
    }
    Ok((Conversation { messages: out }, images))
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// Token counts of a request's answers: the prompt once, the answers' tokens summed.
fn usage(answers: &[Completion]) -> Value {
    let prompt = answers.first().map_or(0, |c| c.prompt_tokens);
    let completion: usize = answers.iter().map(|c| c.tokens.len()).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

pub async fn chat(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    match chat_inner(state, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(state: AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body.map_err(ApiError::from_body_rejection)?;
    let loaded = state.loaded();
    let image_token = loaded
        .as_ref()
        .map(|l| l.processor.config().image_token.clone())
        .unwrap_or_else(|| "<image>".into());
    let request = parse_request(&body, &image_token)?;
    let Some(loaded) = loaded else {
        return Err(ApiError::starting());
    };
    let prepared = inputs::prepare(
        loaded.processor.clone(),
        &state.0.options.media,
        request.conversation,
        request.images,
    )
    .await?;
    let max_new_tokens = match request.max_tokens {
        Some(n) => n,
        None => inputs::clamped_budget(None, prepared.input_ids.len(), loaded.engine.context()),
    };
    let generate = GenerateRequest {
        prepared,
        sampling: request.sampling,
        max_new_tokens,
        stop: request.stop,
    };
    // One engine request per answer; they share the prompt's prefill (the engine's prompt cache)
    // and decode in one batch. A refusal drops the ones already queued, which cancels them.
    let mut answers = Vec::with_capacity(request.n);
    for i in 0..request.n {
        let mut one = generate.clone();
        one.sampling.seed = generate.sampling.seed.wrapping_add(i as u64);
        answers.push(loaded.engine.submit(one).map_err(|e| {
            state.0.metrics.count_generation("openai", "refused");
            let err = ApiError::from_submit(&e, StatusCode::TOO_MANY_REQUESTS);
            if err.code.as_deref() == Some("context_length_exceeded") {
                err.with_param("max_tokens")
            } else {
                err
            }
        })?);
    }
    let id = format!("chatcmpl-{}", util::new_id());
    let created = util::unix_seconds();
    let model = state.0.options.model_name.clone();

    if !request.stream {
        let mut completions = Vec::with_capacity(answers.len());
        for mut events in answers {
            completions.push(completion(&state, &mut events).await?);
        }
        let choices: Vec<Value> = completions
            .iter()
            .enumerate()
            .map(|(index, c)| {
                json!({
                    "index": index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": null,
                    "finish_reason": finish_reason(c.finish_reason),
                })
            })
            .collect();
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage(&completions),
        });
        return Ok(Json(body).into_response());
    }

    // The answers' events, tagged with their index, in the order they come.
    let (merged_tx, mut merged) = mpsc::unbounded_channel::<(usize, Event)>();
    for (index, mut events) in answers.into_iter().enumerate() {
        let merged_tx = merged_tx.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if merged_tx.send((index, event)).is_err() {
                    return; // client gone: dropping `events` cancels the answer
                }
            }
        });
    }
    drop(merged_tx);
    let (tx, rx) = mpsc::channel::<SseEvent>(64);
    let chunk = move |index: usize, delta: Value, finish: Option<&str>| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    };
    let (include_usage, n) = (request.include_usage, request.n);
    let metrics_state = state.clone();
    tokio::spawn(
        async move {
            let send = |v: Value| SseEvent::default().data(v.to_string());
            for index in 0..n {
                let first = chunk(index, json!({"role": "assistant", "content": ""}), None);
                if tx.send(send(first)).await.is_err() {
                    return;
                }
            }
            let mut completions = Vec::with_capacity(n);
            while let Some((index, event)) = merged.recv().await {
                match event {
                    Event::Delta(text) => {
                        if tx
                            .send(send(chunk(index, json!({"content": text}), None)))
                            .await
                            .is_err()
                        {
                            // Client gone: dropping `merged` ends the forwarders and cancels the answers.
                            metrics_state.0.metrics.count_generation("openai", "canceled");
                            return;
                        }
                    }
                    Event::Done(c) => {
                        metrics_state.0.metrics.record_completion(&c);
                        metrics_state.0.metrics.count_generation("openai", "succeeded");
                        let finish = chunk(index, json!({}), Some(finish_reason(c.finish_reason)));
                        let _ = tx.send(send(finish)).await;
                        completions.push(c);
                    }
                    Event::Failed(message) => {
                        metrics_state.0.metrics.count_generation("openai", "failed");
                        let err = ApiError::internal(format!("generation failed: {message}"));
                        let _ = tx.send(send(err.openai_body())).await;
                        break;
                    }
                }
            }
            if include_usage && completions.len() == n {
                let mut last = chunk(0, json!({}), None);
                last["choices"] = json!([]);
                last["usage"] = usage(&completions);
                let _ = tx.send(send(last)).await;
            }
            let _ = tx.send(SseEvent::default().data("[DONE]")).await;
        }
        .in_current_span(),
    );
    let stream = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// Waits for one answer's completion (its deltas are not needed).
async fn completion(
    state: &AppState,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Result<Completion, ApiError> {
    while let Some(event) = events.recv().await {
        match event {
            Event::Delta(_) => {}
            Event::Done(c) => {
                state.0.metrics.record_completion(&c);
                state.0.metrics.count_generation("openai", "succeeded");
                return Ok(c);
            }
            Event::Failed(message) => {
                state.0.metrics.count_generation("openai", "failed");
                return Err(ApiError::internal(format!("generation failed: {message}")));
            }
        }
    }
    state.0.metrics.count_generation("openai", "failed");
    Err(ApiError::internal("the engine stopped before the answer was complete"))
}

pub async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.0.options.model_name,
            "object": "model",
            "created": util::unix_seconds(),
            "owned_by": "dsvl2",
        }],
    }))
}
