//! The DeepSeek-VL2 model on candle: SigLIP vision tower, projector, the 2D image-token layout,
//! and the DeepseekV2 (DeepSeekMoE) language model with MHA (tiny) or MLA (small, base).
//!
//! Everything is checked against the official implementation's golden outputs in
//! `tests/fixtures` (see its README for the reference's pipeline and quirks).

mod attention;
mod cache;
mod error;
mod generate;
mod language;
mod linear;
mod moe;
mod norm;
mod projector;
mod rope;
pub mod sampling;
mod storage;
mod vision;
mod vl;
mod weights;

pub use cache::{CacheFormat, SequenceCache, SharedPrefix};
pub use dsvl2_kernels::{gemm_backend, openblas_coretype_fix};
pub use error::ModelError;
pub use generate::{check_context, generate, FinishReason, Generation};
pub use language::LanguageModel;
pub use linear::Linear;
pub use projector::Projector;
pub use sampling::{Sampler, SamplingParams};
pub use storage::{is_linear_weight, storage_format};
pub use vision::VisionTower;
pub use vl::{DeepseekVl2, ImageInputs, LayerTrace, LoadOptions};
pub use weights::{GgufWeights, Weights};

pub use candle_core::{DType, Device, Tensor};
pub use dsvl2_kernels::{Format, PackedMatrix};
