//! Replicate's Cog HTTP contract (cog `docs/http.md`) for the hosted DeepSeek-VL2 predictor: one
//! image, a prompt and the hosted sampling inputs in; the answer text out.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dsvl2_engine::{Event, GenerateRequest, SubmitError};
use dsvl2_model::sampling::DEFAULT_TOP_K;
use dsvl2_model::SamplingParams;
use dsvl2_processor::Conversation;
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tracing::Instrument;

use crate::error::ApiError;
use crate::inputs::{self, ImageRef};
use crate::{util, AppState, Loaded};

const FIELDS: [&str; 6] = [
    "image",
    "prompt",
    "top_p",
    "temperature",
    "max_length_tokens",
    "repetition_penalty",
];
const WEBHOOK_EVENTS: [&str; 4] = ["start", "output", "logs", "completed"];
/// Terminal predictions kept for `PUT`/`GET` by id (the oldest are forgotten first).
const KEEP_FINISHED: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Processing,
    Succeeded,
    Failed,
    Canceled,
}

impl Status {
    fn terminal(self) -> bool {
        self != Status::Processing
    }

    fn name(self) -> &'static str {
        match self {
            Status::Processing => "processing",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Canceled => "canceled",
        }
    }
}

/// A prediction's public state, plus the means to cancel it.
pub struct Prediction {
    id: String,
    webhook: Option<String>,
    webhook_events: Vec<String>,
    created: Instant,
    state: Mutex<PredictionState>,
}

struct PredictionState {
    input: Value,
    output: Option<String>,
    status: Status,
    error: Option<String>,
    created_at: String,
    started_at: String,
    completed_at: Option<String>,
    predict_time: Option<f64>,
    cancel: Option<oneshot::Sender<()>>,
}

impl Prediction {
    fn new(
        id: String,
        input: Value,
        webhook: Option<String>,
        webhook_events: Vec<String>,
    ) -> (Arc<Self>, oneshot::Receiver<()>) {
        let (cancel, cancelled) = oneshot::channel();
        let now = util::now_iso();
        let prediction = Prediction {
            id,
            webhook,
            webhook_events,
            created: Instant::now(),
            state: Mutex::new(PredictionState {
                input,
                output: None,
                status: Status::Processing,
                error: None,
                created_at: now.clone(),
                started_at: now,
                completed_at: None,
                predict_time: None,
                cancel: Some(cancel),
            }),
        };
        (Arc::new(prediction), cancelled)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PredictionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status(&self) -> Status {
        self.lock().status
    }

    /// The `PredictionResponse` JSON.
    pub fn json(&self) -> Value {
        let s = self.lock();
        let metrics = match s.predict_time {
            Some(t) => json!({ "predict_time": t }),
            None => json!({}),
        };
        json!({
            "id": self.id,
            "input": s.input,
            "output": s.output,
            "status": s.status,
            "error": s.error,
            "logs": "",
            "metrics": metrics,
            "created_at": s.created_at,
            "started_at": s.started_at,
            "completed_at": s.completed_at,
            "webhook": self.webhook,
            "webhook_events_filter": self.webhook_events,
            "urls": {
                "get": format!("/predictions/{}", self.id),
                "cancel": format!("/predictions/{}/cancel", self.id),
            },
        })
    }

    fn append_output(&self, delta: &str) {
        self.lock().output.get_or_insert_with(String::new).push_str(delta);
    }

    fn finish(&self, status: Status, output: Option<String>, error: Option<String>, started: Instant) {
        let mut s = self.lock();
        if s.status.terminal() {
            return;
        }
        s.status = status;
        if output.is_some() {
            s.output = output;
        }
        s.error = error;
        s.completed_at = Some(util::now_iso());
        s.predict_time = Some(started.elapsed().as_secs_f64().max(1e-9));
        s.cancel = None;
    }

    fn take_cancel(&self) -> Option<oneshot::Sender<()>> {
        self.lock().cancel.take()
    }

    /// A task that POSTs the prediction to its webhook, one event at a time and in order.
    fn webhook_sender(&self, state: &AppState) -> Option<mpsc::UnboundedSender<(String, Value)>> {
        let url = self.webhook.clone()?;
        let events = self.webhook_events.clone();
        let client = state.0.http.clone();
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, Value)>();
        tokio::spawn(
            async move {
                while let Some((event, body)) = rx.recv().await {
                    if !events.contains(&event) {
                        continue;
                    }
                    let sent = client
                        .post(&url)
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(body.to_string())
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().is_success() => {}
                        Ok(r) => tracing::warn!(event, status = r.status().as_u16(), "webhook refused"),
                        Err(e) => tracing::warn!(event, error = %e, "webhook failed"),
                    }
                }
            }
            .in_current_span(),
        );
        Some(tx)
    }
}

/// The validated `input` of a prediction.
#[derive(Debug, Clone)]
pub struct CogInput {
    pub image: String,
    pub prompt: String,
    pub top_p: f64,
    pub temperature: f64,
    pub max_length_tokens: u64,
    pub repetition_penalty: f64,
}

impl CogInput {
    /// Temperature 0: greedy without repetition penalty, as the hosted predictor. Otherwise the
    /// inputs plus transformers' default top_k 50. (top_p 0 keeps only the most likely token, as
    /// transformers' top-p warper does.)
    pub fn sampling(&self) -> SamplingParams {
        if self.temperature == 0.0 {
            return SamplingParams::greedy();
        }
        SamplingParams {
            temperature: self.temperature as f32,
            top_p: if self.top_p == 0.0 {
                f64::MIN_POSITIVE
            } else {
                self.top_p
            },
            top_k: DEFAULT_TOP_K,
            repetition_penalty: self.repetition_penalty as f32,
            seed: util::random_u64(),
        }
    }
}

fn detail(loc: &[&str], msg: impl Into<String>, kind: &str) -> Value {
    json!({"loc": loc, "msg": msg.into(), "type": kind})
}

fn field_error(field: &str, msg: impl Into<String>, kind: &str) -> Value {
    detail(&["body", "input", field], msg, kind)
}

fn number(obj: &Map<String, Value>, field: &str, default: f64, min: f64, max: f64, errors: &mut Vec<Value>) -> f64 {
    match obj.get(field) {
        None | Some(Value::Null) => default,
        Some(Value::Number(n)) => {
            let v = n.as_f64().unwrap_or(f64::NAN);
            if !(v >= min && v <= max) {
                errors.push(field_error(
                    field,
                    format!("ensure this value is between {min} and {max}, got {n}"),
                    "value_error",
                ));
            }
            v
        }
        Some(_) => {
            errors.push(field_error(field, "value is not a valid number", "type_error"));
            default
        }
    }
}

/// Checks `input` against the `Input` schema: every problem, FastAPI's shape.
pub fn parse_input(input: &Value) -> Result<CogInput, Vec<Value>> {
    let Some(obj) = input.as_object() else {
        return Err(vec![detail(
            &["body", "input"],
            "input must be a JSON object",
            "type_error",
        )]);
    };
    let mut errors = Vec::new();
    for key in obj.keys().filter(|k| !FIELDS.contains(&k.as_str())) {
        errors.push(field_error(
            key,
            format!("extra fields not permitted (the inputs are {})", FIELDS.join(", ")),
            "value_error",
        ));
    }
    let image = match obj.get("image") {
        None | Some(Value::Null) => {
            errors.push(field_error("image", "field required", "value_error"));
            String::new()
        }
        Some(Value::String(s)) if s.trim().is_empty() => {
            errors.push(field_error("image", "the image URI is empty", "value_error"));
            String::new()
        }
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            errors.push(field_error(
                "image",
                "str type expected (a URL or a data: URI)",
                "type_error",
            ));
            String::new()
        }
    };
    let prompt = match obj.get("prompt") {
        None | Some(Value::Null) => "Describe this image.".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            errors.push(field_error("prompt", "str type expected", "type_error"));
            String::new()
        }
    };
    let top_p = number(obj, "top_p", 0.9, 0.0, 1.0, &mut errors);
    let temperature = number(obj, "temperature", 0.1, 0.0, 1.0, &mut errors);
    let repetition_penalty = number(obj, "repetition_penalty", 1.1, 0.0, 2.0, &mut errors);
    if repetition_penalty == 0.0 {
        errors.push(field_error(
            "repetition_penalty",
            "repetition_penalty 0 would divide the scores by zero: use a value > 0 (1 disables it)",
            "value_error",
        ));
    }
    let max_length_tokens = match obj.get("max_length_tokens") {
        None | Some(Value::Null) => 2048,
        Some(Value::Number(n)) => {
            let integral = n
                .as_u64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64));
            match integral {
                Some(v) if v <= 4096 => v,
                Some(_) => {
                    errors.push(field_error(
                        "max_length_tokens",
                        format!("ensure this value is between 0 and 4096, got {n}"),
                        "value_error",
                    ));
                    0
                }
                None => {
                    errors.push(field_error(
                        "max_length_tokens",
                        format!("value is not a valid integer between 0 and 4096, got {n}"),
                        "type_error",
                    ));
                    0
                }
            }
        }
        Some(_) => {
            errors.push(field_error(
                "max_length_tokens",
                "value is not a valid integer",
                "type_error",
            ));
            0
        }
    };
    if errors.is_empty() {
        Ok(CogInput {
            image,
            prompt,
            top_p,
            temperature,
            max_length_tokens,
            repetition_penalty,
        })
    } else {
        Err(errors)
    }
}

fn validation_error(details: Vec<Value>) -> Response {
    (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "detail": details }))).into_response()
}

fn detail_response(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"detail": message.into()}))).into_response()
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, needle: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains(needle))
}

pub async fn root() -> Json<Value> {
    Json(json!({"docs_url": null, "openapi_url": "/openapi.json"}))
}

pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let started_at = state.0.started_at.clone();
    let (status, setup) = match (state.loaded(), state.setup_error()) {
        (Some(loaded), _) => {
            let status = if loaded.engine.is_busy() { "BUSY" } else { "READY" };
            (status, json!({"status": "succeeded", "started_at": started_at}))
        }
        (None, Some(error)) => (
            "SETUP_FAILED",
            json!({"status": "failed", "started_at": started_at, "logs": error}),
        ),
        (None, None) => ("STARTING", json!({"status": "starting", "started_at": started_at})),
    };
    let concurrency = state.loaded().map(|l| {
        let stats = l.engine.stats();
        json!({
            "max": l.engine.config().max_running,
            "current": stats.running.load(Ordering::Relaxed),
            "queued": stats.queued.load(Ordering::Relaxed),
        })
    });
    Json(json!({"status": status, "setup": setup, "concurrency": concurrency}))
}

fn lookup(state: &AppState, id: &str) -> Option<Arc<Prediction>> {
    state
        .0
        .predictions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(id)
        .cloned()
}

fn register(state: &AppState, prediction: Arc<Prediction>) {
    let mut map = state.0.predictions.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= KEEP_FINISHED {
        let mut finished: Vec<(Instant, String)> = map
            .values()
            .filter(|p| p.status().terminal())
            .map(|p| (p.created, p.id.clone()))
            .collect();
        finished.sort();
        for (_, id) in finished.into_iter().take(map.len() + 1 - KEEP_FINISHED) {
            map.remove(&id);
        }
    }
    map.insert(prediction.id.clone(), prediction);
}

fn current_state(prediction: &Prediction) -> Response {
    let status = if prediction.status().terminal() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    (status, Json(prediction.json())).into_response()
}

pub async fn get_prediction(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match lookup(&state, &id) {
        Some(p) => current_state(&p),
        None => detail_response(StatusCode::NOT_FOUND, format!("prediction {id} not found")),
    }
}

pub async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(prediction) = lookup(&state, &id) else {
        return detail_response(StatusCode::NOT_FOUND, format!("prediction {id} not found"));
    };
    if let Some(cancel) = prediction.take_cancel() {
        let _ = cancel.send(());
    }
    (StatusCode::OK, Json(prediction.json())).into_response()
}

pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    start(state, headers, body, None).await
}

/// `PUT /predictions/{id}`: idempotent; an id already known answers its current state.
pub async fn put(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    start(state, headers, body, Some(id)).await
}

async fn start(
    state: AppState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    path_id: Option<String>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return ApiError::from_body_rejection(rejection).cog_response(),
    };
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return validation_error(vec![detail(
                &["body"],
                format!("invalid JSON: {e}"),
                "value_error.jsondecode",
            )])
        }
    };
    let Some(obj) = request.as_object() else {
        return validation_error(vec![detail(&["body"], "the body must be a JSON object", "type_error")]);
    };
    let body_id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => return validation_error(vec![detail(&["body", "id"], "str type expected", "type_error")]),
    };
    let id = match (path_id, body_id) {
        (Some(a), Some(b)) if a != b => {
            return validation_error(vec![detail(
                &["body", "id"],
                format!("the body's id {b:?} differs from the path's {a:?}"),
                "value_error",
            )])
        }
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => util::new_id(),
    };
    if let Some(existing) = lookup(&state, &id) {
        return current_state(&existing);
    }
    let webhook = match obj.get("webhook") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.starts_with("http://") || s.starts_with("https://") => Some(s.clone()),
        Some(_) => {
            return validation_error(vec![detail(
                &["body", "webhook"],
                "an http(s) URL expected",
                "value_error",
            )])
        }
    };
    let webhook_events = match obj.get("webhook_events_filter") {
        None | Some(Value::Null) => WEBHOOK_EVENTS.iter().map(|s| s.to_string()).collect(),
        Some(Value::Array(items))
            if items
                .iter()
                .all(|i| i.as_str().is_some_and(|s| WEBHOOK_EVENTS.contains(&s))) =>
        {
            items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect()
        }
        Some(_) => {
            return validation_error(vec![detail(
                &["body", "webhook_events_filter"],
                format!("a list of events among {}", WEBHOOK_EVENTS.join(", ")),
                "value_error",
            )])
        }
    };
    let input_value = obj.get("input").cloned().unwrap_or_else(|| json!({}));
    let input = match parse_input(&input_value) {
        Ok(input) => input,
        Err(details) => return validation_error(details),
    };
    let Some(loaded) = state.loaded() else {
        return ApiError::starting().cog_response();
    };
    let image_token = loaded.processor.config().image_token.clone();
    let tags = input.prompt.matches(image_token.as_str()).count();
    if tags > 1 {
        return validation_error(vec![field_error(
            "prompt",
            format!("the prompt has {tags} `{image_token}` tags but a prediction has 1 image"),
            "value_error",
        )]);
    }
    let stats = loaded.engine.stats();
    if stats.queued.load(Ordering::Relaxed) >= loaded.engine.config().max_queue {
        state.0.metrics.count_generation("cog", "refused");
        return detail_response(StatusCode::CONFLICT, "Already running a prediction: the queue is full");
    }

    let (prediction, cancelled) = Prediction::new(id.clone(), input_value, webhook, webhook_events);
    register(&state, prediction.clone());
    let respond_async = header_has(&headers, header::HeaderName::from_static("prefer"), "respond-async");
    let stream = header_has(&headers, header::ACCEPT, "text/event-stream");
    tracing::info!(prediction = %id, respond_async, stream, "prediction");

    if stream {
        let (tx, rx) = mpsc::channel::<SseEvent>(64);
        tokio::spawn(run(state, loaded, prediction, input, cancelled, Some(tx)).in_current_span());
        let events = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
        return Sse::new(events).keep_alive(KeepAlive::default()).into_response();
    }
    let task = tokio::spawn(run(state.clone(), loaded, prediction.clone(), input, cancelled, None).in_current_span());
    if respond_async {
        return (StatusCode::ACCEPTED, Json(prediction.json())).into_response();
    }
    match task.await {
        Ok(Outcome::Refused(err)) => {
            state
                .0
                .predictions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            err.cog_response()
        }
        Ok(Outcome::Finished) => (StatusCode::OK, Json(prediction.json())).into_response(),
        Err(e) => ApiError::internal(format!("the prediction task failed: {e}")).cog_response(),
    }
}

enum Outcome {
    Finished,
    /// The engine refused the request (queue full): a sync prediction answers 409.
    Refused(ApiError),
}

async fn run(
    state: AppState,
    loaded: Arc<Loaded>,
    prediction: Arc<Prediction>,
    input: CogInput,
    mut cancelled: oneshot::Receiver<()>,
    sse: Option<mpsc::Sender<SseEvent>>,
) -> Outcome {
    let started = Instant::now();
    let webhook = prediction.webhook_sender(&state);
    let notify = |event: &str, body: Value| {
        if let Some(tx) = &webhook {
            let _ = tx.send((event.to_string(), body));
        }
    };
    notify("start", prediction.json());
    if let Some(tx) = &sse {
        let _ = tx
            .send(SseEvent::default().event("start").data(prediction.json().to_string()))
            .await;
    }
    let finish = |status: Status, output: Option<String>, error: Option<String>| {
        prediction.finish(status, output, error, started);
        state.0.metrics.count_generation("cog", status.name());
        prediction.json()
    };

    let image_token = loaded.processor.config().image_token.clone();
    let mut conversation = Conversation::single_turn(input.prompt.clone(), vec![PathBuf::from("image")]);
    conversation.insert_missing_image_tags(&image_token);
    let images = vec![ImageRef {
        reference: input.image.clone(),
        param: "image".into(),
    }];
    let prepared = tokio::select! {
        prepared = inputs::prepare(loaded.processor.clone(), &state.0.options.media, conversation, images) => prepared,
        _ = &mut cancelled => Err(ApiError::bad_request("canceled").with_code("canceled")),
    };
    let mut outcome = Outcome::Finished;
    let final_state = match prepared {
        Err(e) if e.code.as_deref() == Some("canceled") => finish(Status::Canceled, None, None),
        Err(e) => finish(Status::Failed, None, Some(e.message)),
        Ok(prepared) => {
            let max_new_tokens = inputs::clamped_budget(
                Some(input.max_length_tokens.max(1) as usize),
                prepared.input_ids.len(),
                loaded.engine.context(),
            );
            let request = GenerateRequest {
                prepared,
                sampling: input.sampling(),
                max_new_tokens,
                stop: Vec::new(),
            };
            match loaded.engine.submit(request) {
                Err(e) => {
                    if matches!(e, SubmitError::QueueFull { .. }) {
                        outcome = Outcome::Refused(ApiError::from_submit(&e, StatusCode::CONFLICT));
                    }
                    finish(Status::Failed, None, Some(e.to_string()))
                }
                Ok(mut events) => loop {
                    tokio::select! {
                        biased;
                        _ = &mut cancelled => break finish(Status::Canceled, None, None),
                        event = events.recv() => match event {
                            Some(Event::Delta(delta)) => {
                                prediction.append_output(&delta);
                                if let Some(tx) = &sse {
                                    let chunk = Value::String(delta).to_string();
                                    if tx.send(SseEvent::default().event("output").data(chunk)).await.is_err() {
                                        // The client went away: stop generating.
                                        break finish(Status::Canceled, None, None);
                                    }
                                }
                            }
                            Some(Event::Done(completion)) => {
                                state.0.metrics.record_completion(&completion);
                                break finish(Status::Succeeded, Some(completion.text), None);
                            }
                            Some(Event::Failed(message)) => break finish(Status::Failed, None, Some(message)),
                            None => break finish(Status::Failed, None, Some("the engine stopped".into())),
                        }
                    }
                },
            }
        }
    };
    notify("completed", final_state.clone());
    if let Some(tx) = &sse {
        let _ = tx
            .send(SseEvent::default().event("completed").data(final_state.to_string()))
            .await;
    }
    outcome
}

/// `GET /openapi.json`: the hosted predictor's schema.
pub async fn openapi() -> Json<Value> {
    Json(openapi_schema())
}

pub fn openapi_schema() -> Value {
    let input = json!({
        "title": "Input",
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {"title": "Image", "type": "string", "format": "uri", "description": "Input image", "x-order": 0},
            "prompt": {"title": "Prompt", "type": "string", "default": "Describe this image.",
                       "description": "Input prompt", "x-order": 1},
            "top_p": {"title": "Top P", "type": "number", "default": 0.9, "minimum": 0, "maximum": 1,
                      "description": "Top-p (nucleus) sampling: keep the most likely tokens whose probabilities add up to top_p", "x-order": 2},
            "temperature": {"title": "Temperature", "type": "number", "default": 0.1, "minimum": 0, "maximum": 1,
                            "description": "Sampling temperature; 0 is greedy decoding (without repetition penalty)", "x-order": 3},
            "max_length_tokens": {"title": "Max Length Tokens", "type": "integer", "default": 2048, "minimum": 0, "maximum": 4096,
                                  "description": "Most tokens to generate (clamped to the context left after the prompt; 0 means 1)", "x-order": 4},
            "repetition_penalty": {"title": "Repetition Penalty", "type": "number", "default": 1.1, "minimum": 0, "maximum": 2,
                                   "description": "Repetition penalty over the prompt and the answer (1 disables it; must be > 0)", "x-order": 5}
        }
    });
    json!({
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {
            "/": {"get": {"summary": "Root", "operationId": "root__get",
                "responses": {"200": {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}}}},
            "/health-check": {"get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get",
                "responses": {"200": {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}}}},
            "/predictions": {"post": {
                "summary": "Predict", "operationId": "predict_predictions_post",
                "parameters": [{"in": "header", "name": "prefer", "required": false, "schema": {"title": "Prefer", "type": "string"}}],
                "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}},
                "responses": {
                    "200": {"description": "Successful Response", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}}},
                    "422": {"description": "Validation Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}
                }}},
            "/predictions/{prediction_id}": {"put": {
                "summary": "Predict Idempotent", "operationId": "predict_idempotent_predictions__prediction_id__put",
                "parameters": [
                    {"in": "path", "name": "prediction_id", "required": true, "schema": {"title": "Prediction ID", "type": "string"}},
                    {"in": "header", "name": "prefer", "required": false, "schema": {"title": "Prefer", "type": "string"}}
                ],
                "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}, "required": true},
                "responses": {
                    "200": {"description": "Successful Response", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}}},
                    "422": {"description": "Validation Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}
                }}},
            "/predictions/{prediction_id}/cancel": {"post": {
                "summary": "Cancel", "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [{"in": "path", "name": "prediction_id", "required": true, "schema": {"title": "Prediction ID", "type": "string"}}],
                "responses": {"200": {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}}}}
        },
        "components": {"schemas": {
            "Input": input,
            "Output": {"title": "Output", "type": "string"},
            "Status": {"title": "Status", "description": "An enumeration.", "enum": ["starting", "processing", "succeeded", "canceled", "failed"], "type": "string"},
            "WebhookEvent": {"title": "WebhookEvent", "description": "An enumeration.", "enum": ["start", "output", "logs", "completed"], "type": "string"},
            "PredictionRequest": {"title": "PredictionRequest", "type": "object", "properties": {
                "input": {"$ref": "#/components/schemas/Input"},
                "id": {"title": "Id", "type": "string"},
                "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
                "output_file_prefix": {"title": "Output File Prefix", "type": "string"},
                "webhook": {"title": "Webhook", "maxLength": 65536, "minLength": 1, "format": "uri", "type": "string"},
                "webhook_events_filter": {"type": "array", "items": {"$ref": "#/components/schemas/WebhookEvent"},
                                          "default": ["start", "output", "logs", "completed"]}
            }},
            "PredictionResponse": {"title": "PredictionResponse", "type": "object", "properties": {
                "input": {"$ref": "#/components/schemas/Input"},
                "output": {"$ref": "#/components/schemas/Output"},
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
                "started_at": {"title": "Started At", "type": "string", "format": "date-time"},
                "completed_at": {"title": "Completed At", "type": "string", "format": "date-time"},
                "logs": {"title": "Logs", "type": "string", "default": ""},
                "error": {"title": "Error", "type": "string"},
                "status": {"$ref": "#/components/schemas/Status"},
                "metrics": {"title": "Metrics", "type": "object"}
            }},
            "ValidationError": {"title": "ValidationError", "required": ["loc", "msg", "type"], "type": "object", "properties": {
                "loc": {"title": "Location", "type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"}
            }},
            "HTTPValidationError": {"title": "HTTPValidationError", "type": "object", "properties": {
                "detail": {"title": "Detail", "type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}
            }}
        }}
    })
}
