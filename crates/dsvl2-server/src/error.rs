//! Errors as JSON. OpenAI routes answer `{"error": {"message", "type", "param", "code"}}`; Cog
//! routes answer `{"detail": "..."}` (422: `{"detail": [{"loc", "msg", "type"}]}`, as FastAPI).

use std::any::Any;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dsvl2_engine::SubmitError;
use dsvl2_media::MediaError;
use dsvl2_processor::ProcessorError;
use serde_json::{json, Value};

/// An error for the client, in OpenAI's shape when turned into a response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn with_kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }

    pub fn starting() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading; retry shortly",
        )
        .with_code("model_loading")
    }

    pub fn openai_body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }

    /// Cog's (FastAPI's) shape.
    pub fn cog_response(&self) -> Response {
        (self.status, Json(json!({"detail": self.message}))).into_response()
    }

    /// A body that cannot be read (too large: 413; a broken stream: 400).
    pub fn from_body_rejection(rejection: axum::extract::rejection::BytesRejection) -> Self {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than the server's limit".to_string()
        } else {
            format!("cannot read the request body: {}", rejection.body_text())
        };
        ApiError::new(status, message).with_code(if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "bad_body"
        })
    }

    pub fn from_media(err: &MediaError, param: &str) -> Self {
        let status = StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
        // A refused or unfetchable image is the request's problem: OpenAI says 400 for those.
        let status = if err.is_client_error() {
            StatusCode::BAD_REQUEST
        } else {
            status
        };
        ApiError::new(status, err.to_string())
            .with_param(param)
            .with_code("invalid_image")
    }

    pub fn from_processor(err: &ProcessorError) -> Self {
        let code = match err {
            ProcessorError::ImageCountMismatch { .. } => "image_count_mismatch",
            ProcessorError::NotAnImage { .. }
            | ProcessorError::ImageDecode { .. }
            | ProcessorError::ImageTooLarge { .. }
            | ProcessorError::EmptyImage { .. } => "invalid_image",
            _ => "invalid_request",
        };
        ApiError::bad_request(err.to_string()).with_code(code)
    }

    /// `busy_status`: 429 for OpenAI, 409 for Cog.
    pub fn from_submit(err: &SubmitError, busy_status: StatusCode) -> Self {
        match err {
            SubmitError::QueueFull { .. } => ApiError::new(busy_status, err.to_string()).with_code("server_busy"),
            SubmitError::ContextOverflow(_) => {
                ApiError::bad_request(err.to_string()).with_code("context_length_exceeded")
            }
            SubmitError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, err.to_string()).with_code("shutting_down")
            }
            SubmitError::Invalid(_) => ApiError::bad_request(err.to_string()),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.openai_body())).into_response()
    }
}

/// A handler panicked: that request gets a 500 in both APIs' shapes (`error` and `detail`).
pub fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    tracing::error!(panic = %what, "a request handler panicked");
    let message = format!("internal error: {what}");
    let mut body = ApiError::internal(message.clone()).openai_body();
    body["detail"] = Value::String(message);
    (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
}
