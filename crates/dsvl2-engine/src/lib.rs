//! The serving engine: one loaded model, many requests.
//!
//! A dedicated thread owns the model. Requests wait in a bounded queue; the scheduler admits up to
//! `max_running` of them, prefills each prompt in chunks (one chunk per iteration, so a long prompt
//! does not stall the others), and runs ONE batched decode step for all sequences that are
//! decoding. Each sequence streams its text through its own channel; when the receiver is dropped
//! (client gone, cancel) the sequence and its cache are freed within one step.
//!
//! Batching does not change results: every sequence has its own cache, positions and sampler, and
//! only the weight matmuls are shared (see dsvl2-model's batched-decode test). Sequences that start
//! from one kept prompt (see `prompt_cache`) share its positions, which their batched attention
//! reads once; with an i8 cache on an AMX CPU that attention rounds queries and weights to 16 bits
//! (see dsvl2-kernels' `decode_attention_shared`), so there an answer can differ within that
//! rounding from the one it gets decoding alone.

mod prompt_cache;
mod scheduler;
mod sequence;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use dsvl2_model::{check_context, DeepseekVl2, FinishReason, ImageInputs, ModelError, SamplingParams, Tensor};
use dsvl2_processor::{PreparedInput, Processor};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Scheduling limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests that may wait for a slot; more are refused (`SubmitError::QueueFull`).
    pub max_queue: usize,
    /// Sequences decoded together.
    pub max_running: usize,
    /// Prompt tokens prefilled per scheduler iteration for one sequence.
    pub prefill_chunk: usize,
    /// Bytes of recently prefilled prompts' and finished conversations' caches kept for requests
    /// that start the same way (a repeated prompt skips the vision tower and the prefill, a chat's
    /// next turn prefills only what is new); 0 keeps none.
    pub prompt_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_queue: 32,
            max_running: 8,
            prefill_chunk: 256,
            prompt_cache_bytes: 256 << 20,
        }
    }
}

/// One generation request, already prepared by the processor.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prepared: PreparedInput,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Stop strings (not part of the answer).
    pub stop: Vec<String>,
}

/// What a request's channel carries, in order: deltas, then exactly one `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New final text (never half a character).
    Delta(String),
    Done(Completion),
    Failed(String),
}

/// The outcome of a finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The answer, without EOS and stop string.
    pub text: String,
    /// Generated ids (with the final EOS when the model wrote one).
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Prompt length, image placeholder tokens included.
    pub prompt_tokens: usize,
    /// Seconds from submission to admission.
    pub queue_seconds: f64,
    /// Seconds from submission to the first generated token.
    pub first_token_seconds: f64,
    /// Seconds from the first to the last generated token.
    pub decode_seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {capacity} requests are already waiting")]
    QueueFull { capacity: usize },
    #[error(transparent)]
    ContextOverflow(ModelError),
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Live counters, for health checks and metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    /// Requests that started from a kept prompt or conversation (see
    /// [`EngineConfig::prompt_cache_bytes`]).
    pub prompt_cache_hits: AtomicUsize,
    /// Prompt positions those requests did not prefill.
    pub prompt_cache_positions: AtomicUsize,
}

/// The language model's input `[len, hidden]` for a prepared request: token embeddings with the
/// image embeddings (vision tower over all tiles, projector, 2D layout) at the image positions.
pub fn embed_prepared(model: &DeepseekVl2, prepared: &PreparedInput) -> Result<Tensor, ModelError> {
    embed_prepared_from(model, prepared, 0)
}

/// [`embed_prepared`] for positions `from..` only: the vision tower runs only for the images there.
/// `from` must not fall inside an image's positions.
pub(crate) fn embed_prepared_from(
    model: &DeepseekVl2,
    prepared: &PreparedInput,
    from: usize,
) -> Result<Tensor, ModelError> {
    if from == 0 {
        return embed_all(model, prepared);
    }
    // The images whose positions come before `from`, and their tiles.
    let before = prepared.images_seq_mask[..from].iter().filter(|&&m| m).count();
    let (mut images, mut seen) = (0, 0);
    while images < prepared.num_image_tokens.len() && seen < before {
        seen += prepared.num_image_tokens[images];
        images += 1;
    }
    if seen != before {
        return Err(ModelError::Input(format!("position {from} is inside an image")));
    }
    let tiles: usize = prepared.images_spatial_crop[..images]
        .iter()
        .map(|[w, h]| 1 + w * h)
        .sum();
    let tile_values = 3 * prepared.tile_size * prepared.tile_size;
    let rest = PreparedInput {
        sft_format: String::new(),
        input_ids: prepared.input_ids[from..].to_vec(),
        images_seq_mask: prepared.images_seq_mask[from..].to_vec(),
        images_spatial_crop: prepared.images_spatial_crop[images..].to_vec(),
        num_image_tokens: prepared.num_image_tokens[images..].to_vec(),
        pixel_values: prepared.pixel_values[tiles * tile_values..].to_vec(),
        n_tiles: prepared.n_tiles - tiles,
        tile_size: prepared.tile_size,
    };
    embed_all(model, &rest)
}

fn embed_all(model: &DeepseekVl2, prepared: &PreparedInput) -> Result<Tensor, ModelError> {
    let pixels = if prepared.n_tiles > 0 {
        let [n, c, h, w] = prepared.pixel_shape();
        Some(Tensor::from_slice(
            &prepared.pixel_values,
            (n, c, h, w),
            model.device(),
        )?)
    } else {
        None
    };
    let images = pixels.as_ref().map(|p| ImageInputs {
        pixel_values: p,
        spatial_crop: &prepared.images_spatial_crop,
    });
    model.embed_inputs(&prepared.input_ids, &prepared.images_seq_mask, images, None)
}

pub(crate) struct Job {
    pub request: GenerateRequest,
    pub prompt: prompt_cache::PromptTokens,
    pub events: UnboundedSender<Event>,
    pub submitted: Instant,
}

pub struct Engine {
    jobs: Mutex<Option<SyncSender<Job>>>,
    stats: Arc<EngineStats>,
    config: EngineConfig,
    context: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the scheduler thread, which owns the model from now on.
    pub fn start(model: DeepseekVl2, processor: Arc<Processor>, config: EngineConfig) -> Engine {
        let (jobs, queue) = sync_channel(config.max_queue.max(1));
        let stats = Arc::new(EngineStats::default());
        let context = model.config().language.max_position_embeddings;
        let thread = {
            let stats = stats.clone();
            let config = config.clone();
            std::thread::Builder::new()
                .name("dsvl2-engine".into())
                .spawn(move || scheduler::run(&model, &processor, &config, queue, &stats))
                .expect("the engine thread can be started")
        };
        Engine {
            jobs: Mutex::new(Some(jobs)),
            stats,
            config,
            context,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The model's context window in tokens.
    pub fn context(&self) -> usize {
        self.context
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Whether every slot is taken and requests are waiting.
    pub fn is_busy(&self) -> bool {
        self.stats.running.load(Ordering::Relaxed) >= self.config.max_running
            || self.stats.queued.load(Ordering::Relaxed) > 0
    }

    /// Queues a request. Refuses it at once if it cannot fit the context or the queue is full.
    pub fn submit(&self, request: GenerateRequest) -> Result<UnboundedReceiver<Event>, SubmitError> {
        if request.max_new_tokens == 0 {
            return Err(SubmitError::Invalid("max_new_tokens must be at least 1".into()));
        }
        if request.prepared.input_ids.is_empty() {
            return Err(SubmitError::Invalid("the prompt has no tokens".into()));
        }
        check_context(
            request.prepared.input_ids.len(),
            &request.prepared.num_image_tokens,
            request.max_new_tokens,
            self.context,
        )
        .map_err(SubmitError::ContextOverflow)?;
        let (events, receiver) = unbounded_channel();
        let job = Job {
            prompt: prompt_cache::PromptTokens::of(&request.prepared),
            request,
            events,
            submitted: Instant::now(),
        };
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(jobs) = jobs.as_ref() else {
            return Err(SubmitError::ShuttingDown);
        };
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        match jobs.try_send(job) {
            Ok(()) => Ok(receiver),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull {
                        capacity: self.config.max_queue,
                    },
                    TrySendError::Disconnected(_) => SubmitError::ShuttingDown,
                })
            }
        }
    }

    /// Stops admitting; requests already queued or running finish. Returns when the scheduler
    /// thread has ended.
    pub fn shutdown(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
