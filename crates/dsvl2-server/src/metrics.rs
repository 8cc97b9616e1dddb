//! `GET /metrics`: Prometheus text format.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use dsvl2_engine::Completion;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::AppState;

/// The server's metrics, in their own registry.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    generations: IntCounterVec,
    queue_depth: IntGauge,
    running: IntGauge,
    prompt_cache_hits: IntGauge,
    prompt_cache_positions: IntGauge,
    prompt_tokens: IntCounter,
    generated_tokens: IntCounter,
    time_to_first_token: Histogram,
    time_per_output_token: Histogram,
    queue_time: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("dsvl2_http_requests_total", "HTTP requests by route and status"),
            &["endpoint", "status"],
        )
        .unwrap();
        let generations = IntCounterVec::new(
            Opts::new("dsvl2_generations_total", "Generations by API and outcome"),
            &["api", "outcome"],
        )
        .unwrap();
        let queue_depth = IntGauge::new("dsvl2_queue_depth", "Requests waiting for an engine slot").unwrap();
        let running = IntGauge::new("dsvl2_running_sequences", "Sequences the engine is running").unwrap();
        // The engine counts these; they are read at each scrape (gauges that only grow).
        let prompt_cache_hits = IntGauge::new(
            "dsvl2_prompt_cache_hits",
            "Requests since start that began from a kept prompt or conversation",
        )
        .unwrap();
        let prompt_cache_positions = IntGauge::new(
            "dsvl2_prompt_cache_reused_positions",
            "Prompt positions since start taken from kept prompts instead of prefilled",
        )
        .unwrap();
        let prompt_tokens =
            IntCounter::new("dsvl2_prompt_tokens_total", "Prompt tokens (image tokens included)").unwrap();
        let generated_tokens = IntCounter::new("dsvl2_generated_tokens_total", "Generated tokens").unwrap();
        let time_to_first_token = Histogram::with_opts(
            HistogramOpts::new(
                "dsvl2_time_to_first_token_seconds",
                "Seconds from submission to the first generated token",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
        )
        .unwrap();
        let time_per_output_token = Histogram::with_opts(
            HistogramOpts::new(
                "dsvl2_time_per_output_token_seconds",
                "Mean seconds per generated token after the first, per request",
            )
            .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
        )
        .unwrap();
        let queue_time = Histogram::with_opts(
            HistogramOpts::new("dsvl2_queue_seconds", "Seconds from submission to admission")
                .buckets(vec![0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0]),
        )
        .unwrap();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(generations.clone()),
            Box::new(queue_depth.clone()),
            Box::new(running.clone()),
            Box::new(prompt_cache_hits.clone()),
            Box::new(prompt_cache_positions.clone()),
            Box::new(prompt_tokens.clone()),
            Box::new(generated_tokens.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(time_per_output_token.clone()),
            Box::new(queue_time.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            generations,
            queue_depth,
            running,
            prompt_cache_hits,
            prompt_cache_positions,
            prompt_tokens,
            generated_tokens,
            time_to_first_token,
            time_per_output_token,
            queue_time,
        }
    }

    pub fn count_request(&self, endpoint: &str, status: u16) {
        self.requests.with_label_values(&[endpoint, &status.to_string()]).inc();
    }

    /// `outcome`: succeeded, failed, canceled, refused.
    pub fn count_generation(&self, api: &str, outcome: &str) {
        self.generations.with_label_values(&[api, outcome]).inc();
    }

    pub fn record_completion(&self, completion: &Completion) {
        self.prompt_tokens.inc_by(completion.prompt_tokens as u64);
        let generated = completion.tokens.len();
        self.generated_tokens.inc_by(generated as u64);
        if generated > 0 {
            self.time_to_first_token.observe(completion.first_token_seconds);
        }
        if generated > 1 {
            self.time_per_output_token
                .observe(completion.decode_seconds / (generated - 1) as f64);
        }
        self.queue_time.observe(completion.queue_seconds);
    }

    /// The text exposition, with the engine gauges read now.
    pub fn render(&self, state: &AppState) -> String {
        if let Some(loaded) = state.loaded() {
            let stats = loaded.engine.stats();
            self.queue_depth.set(stats.queued.load(Ordering::Relaxed) as i64);
            self.running.set(stats.running.load(Ordering::Relaxed) as i64);
            self.prompt_cache_hits
                .set(stats.prompt_cache_hits.load(Ordering::Relaxed) as i64);
            self.prompt_cache_positions
                .set(stats.prompt_cache_positions.load(Ordering::Relaxed) as i64);
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding does not fail");
        String::from_utf8(out).unwrap_or_default()
    }
}

pub async fn handler(State(state): State<AppState>) -> Response {
    let text = state.0.metrics.render(&state);
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}
