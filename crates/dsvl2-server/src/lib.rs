//! The dsvl2 HTTP server: Replicate's Cog prediction API and OpenAI's chat-completions API over one
//! [`dsvl2_engine::Engine`].
//!
//! Routes (see [`router`]):
//! * Cog: `GET /`, `GET /health-check`, `GET /openapi.json`, `POST /predictions`,
//!   `PUT /predictions/{id}`, `GET /predictions/{id}`, `POST /predictions/{id}/cancel`;
//! * OpenAI: `POST /v1/chat/completions`, `GET /v1/models`;
//! * operations: `GET /metrics` (Prometheus text).
//!
//! The server listens before the model is loaded: until [`AppState::set_ready`] the health check
//! says `STARTING` and generation endpoints answer 503. Images are fetched with `dsvl2-media`
//! (SSRF-checked URLs, data URIs, allowed local paths); decoding and preprocessing run on the
//! blocking pool. Every response carries an `x-request-id` (the client's, or a new one), which
//! also tags the request's log lines. A panicking handler becomes that request's 500 JSON error.

mod cog;
mod error;
mod inputs;
mod metrics;
mod openai;
mod util;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use dsvl2_engine::Engine;
use dsvl2_media::MediaPolicy;
use dsvl2_processor::Processor;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

pub use metrics::Metrics;

/// Server settings (the `dsvl2 serve` flags).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The model id reported by `/v1/models` and in responses.
    pub model_name: String,
    /// What image references may be fetched.
    pub media: MediaPolicy,
    /// Largest request body in bytes (larger: 413).
    pub body_limit: usize,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model_name: "deepseek-ai/deepseek-vl2-tiny".into(),
            media: MediaPolicy::default(),
            body_limit: 32 << 20,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// A loaded model: the engine that runs it and the processor that prepares its inputs.
pub struct Loaded {
    pub engine: Arc<Engine>,
    pub processor: Arc<Processor>,
}

enum ModelState {
    Starting,
    Ready(Arc<Loaded>),
    Failed(String),
}

pub(crate) struct Inner {
    pub options: ServerOptions,
    model: RwLock<ModelState>,
    pub metrics: Metrics,
    pub predictions: Mutex<HashMap<String, Arc<cog::Prediction>>>,
    pub http: reqwest::Client,
    /// When the server started (the health check's `setup.started_at`).
    pub started_at: String,
}

/// Shared server state; cheap to clone.
#[derive(Clone)]
pub struct AppState(pub(crate) Arc<Inner>);

impl AppState {
    /// A server without a model yet (health check `STARTING`).
    pub fn new(options: ServerOptions) -> AppState {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .expect("the webhook HTTP client can be built");
        AppState(Arc::new(Inner {
            options,
            model: RwLock::new(ModelState::Starting),
            metrics: Metrics::new(),
            predictions: Mutex::new(HashMap::new()),
            http,
            started_at: util::now_iso(),
        }))
    }

    /// The model is loaded: generation endpoints open.
    pub fn set_ready(&self, engine: Engine, processor: Arc<Processor>) {
        let loaded = Arc::new(Loaded {
            engine: Arc::new(engine),
            processor,
        });
        *self.0.model.write().unwrap_or_else(|e| e.into_inner()) = ModelState::Ready(loaded);
    }

    /// Loading failed: the health check says `SETUP_FAILED` with this message.
    pub fn set_failed(&self, message: String) {
        *self.0.model.write().unwrap_or_else(|e| e.into_inner()) = ModelState::Failed(message);
    }

    /// The loaded model, once ready.
    pub fn loaded(&self) -> Option<Arc<Loaded>> {
        match &*self.0.model.read().unwrap_or_else(|e| e.into_inner()) {
            ModelState::Ready(loaded) => Some(loaded.clone()),
            _ => None,
        }
    }

    pub(crate) fn setup_error(&self) -> Option<String> {
        match &*self.0.model.read().unwrap_or_else(|e| e.into_inner()) {
            ModelState::Failed(message) => Some(message.clone()),
            _ => None,
        }
    }

    pub fn options(&self) -> &ServerOptions {
        &self.0.options
    }

    /// Stops the engine (if loaded), waiting at most `bound` for the sequences it is running.
    pub async fn shutdown_engine(&self, bound: Duration) {
        if let Some(loaded) = self.loaded() {
            let engine = loaded.engine.clone();
            let stopping = tokio::task::spawn_blocking(move || engine.shutdown());
            if tokio::time::timeout(bound, stopping).await.is_err() {
                tracing::warn!("the engine did not stop within {bound:?}; leaving it");
            }
        }
    }
}

/// The application: every route, the body limit, panic catching, request ids and metrics.
pub fn router(state: AppState) -> Router {
    let body_limit = state.0.options.body_limit;
    Router::new()
        .route("/", get(cog::root))
        .route("/health-check", get(cog::health))
        .route("/openapi.json", get(cog::openapi))
        .route("/predictions", post(cog::create))
        .route("/predictions/{id}", get(cog::get_prediction).put(cog::put))
        .route("/predictions/{id}/cancel", post(cog::cancel))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/models", get(openai::models))
        .route("/metrics", get(metrics::handler))
        .fallback(not_found)
        .layer(CatchPanicLayer::custom(error::panic_response))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), request_context))
        .with_state(state)
}

async fn not_found(request: Request) -> Response {
    let message = format!("no route for {} {}", request.method(), request.uri().path());
    error::ApiError::new(StatusCode::NOT_FOUND, message)
        .with_kind("not_found_error")
        .into_response()
}

/// Request id, log span and request metrics around every request.
async fn request_context(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(util::new_id);
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let span = tracing::info_span!("request", id = %id, method = %request.method(), path = %request.uri().path());
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    state.0.metrics.count_request(&endpoint, status.as_u16());
    span.in_scope(|| {
        tracing::info!(
            status = status.as_u16(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "response"
        )
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// Serves `state` on `listener` until `shutdown` resolves; then stops accepting connections,
/// lets requests in flight finish for at most [`ServerOptions::shutdown_grace`], and stops the
/// engine.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.0.options.shutdown_grace;
    let app = router(state.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    tokio::pin!(shutdown);
    tokio::select! {
        result = &mut server => {
            state.shutdown_engine(grace).await;
            return result.unwrap_or_else(|e| Err(std::io::Error::other(e)));
        }
        _ = &mut shutdown => {}
    }
    tracing::info!("shutting down: no new connections; requests in flight get {grace:?} to finish");
    let _ = stop_tx.send(());
    let result = match tokio::time::timeout(grace, &mut server).await {
        Ok(joined) => joined.unwrap_or_else(|e| Err(std::io::Error::other(e))),
        Err(_) => {
            tracing::warn!("requests still in flight after {grace:?}: closing them");
            server.abort();
            Ok(())
        }
    };
    state.shutdown_engine(grace).await;
    tracing::info!("stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_handler_is_that_requests_500_json() {
        let app: Router = Router::new()
            .route("/boom", get(|| async { panic!("boom") as &str }))
            .layer(CatchPanicLayer::custom(error::panic_response));
        let response = app
            .oneshot(Request::builder().uri("/boom").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains("boom"), "{body}");
        assert!(body["detail"].is_string());
    }
}
