//! The one weight-bearing layer type. Storage (f32, f16, bf16, q8_0, q4_k) is chosen at load time
//! (see [`crate::storage`]); the model code only calls [`Linear::forward`], which runs our
//! multi-threaded kernels (`dsvl2-kernels`): GEMV for a few rows (decode), dequantized-panel GEMM
//! for many (prefill, vision). candle's own CPU matmul reads a GEMV on one thread and widens bf16
//! weights on every call, which is why the weights live outside candle tensors.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use dsvl2_kernels::{Format, MatmulJob, PackedMatrix};

use crate::storage::linear_format;
use crate::{ModelError, Weights};

/// `y = x W^T + b` with `W` stored `[out, in]` as in PyTorch checkpoints.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Arc<PackedMatrix>,
    bias: Option<Vec<f32>>,
}

impl Linear {
    /// Loads `{prefix}.weight` `[out, in]` and, if `bias`, `{prefix}.bias` `[out]`.
    pub fn load(w: &Weights, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self, ModelError> {
        let weight = w.get_matrix(&format!("{prefix}.weight"), out_dim, in_dim)?;
        let bias = if bias {
            Some(
                w.get(&format!("{prefix}.bias"), &[out_dim])?
                    .to_dtype(DType::F32)?
                    .to_vec1()?,
            )
        } else {
            None
        };
        Ok(Linear {
            weight: Arc::new(weight),
            bias,
        })
    }

    /// A layer from a dense weight `[out, in]` (e.g. a reshaped conv kernel or a tied embedding),
    /// stored in the best format its width allows for `format`.
    pub fn from_tensor(weight: &Tensor, bias: Option<&Tensor>, format: Format) -> Result<Self, ModelError> {
        let (rows, cols) = weight.dims2()?;
        let values: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let weight = PackedMatrix::from_f32(linear_format(format, cols), rows, cols, &values)
            .map_err(|e| ModelError::Input(format!("cannot store a [{rows}, {cols}] weight: {e}")))?;
        let bias = match bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1()?),
            None => None,
        };
        Ok(Linear {
            weight: Arc::new(weight),
            bias,
        })
    }

    pub fn out_dim(&self) -> usize {
        self.weight.rows()
    }

    pub fn in_dim(&self) -> usize {
        self.weight.cols()
    }

    pub fn format(&self) -> Format {
        self.weight.format()
    }

    /// Bytes of weight (and bias) storage: what one pass over this layer reads.
    pub fn weight_bytes(&self) -> u64 {
        (self.weight.storage_bytes() + self.bias.as_ref().map_or(0, |b| 4 * b.len())) as u64
    }

    /// `x`: `[..., in]` -> `[..., out]` (f32).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_then(x, Activation::None)
    }

    /// [`Self::forward`] followed by `activation`.
    pub fn forward_then(&self, x: &Tensor, activation: Activation) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let in_dim = self.in_dim();
        if dims.last() != Some(&in_dim) {
            candle_core::bail!("linear layer with {in_dim} inputs applied to a tensor of shape {dims:?}");
        }
        let rows = x.elem_count() / in_dim;
        let mut y = zeros(rows * self.out_dim());
        with_f32_slice(x, |input| self.weight.matmul(input, rows, &mut y))?;
        dsvl2_kernels::bias_activation(&mut y, self.bias.as_deref(), activation == Activation::GeluTanh);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("x has at least one dimension") = self.out_dim();
        Tensor::from_vec(y, out_dims, x.device())
    }

    fn add_bias(&self, y: &mut [f32]) {
        dsvl2_kernels::bias_activation(y, self.bias.as_deref(), false);
    }
}

/// An element-wise function fused into a linear layer's output (applied in parallel, vectorised,
/// while the output is still ours: candle's element-wise ops run on one thread, and the vision
/// MLP's GELU over 5 tiles is 15.7 M values per layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    /// GELU, tanh approximation (SigLIP's MLP); see [`dsvl2_kernels::bias_activation`].
    GeluTanh,
}

/// Values from which [`zeros`] writes its zeros on all threads (a batch of 8's logits, 1 M values
/// for tiny, were a one-thread `memset` of 4 MB in every step).
const PARALLEL_ZEROS: usize = 1 << 18;

/// `n` zeros: an output buffer for the kernels. `vec![0f32; n]` lets the allocator clear reused
/// memory with one `memset` on the calling thread; the vision tower's outputs are tens of megabytes
/// per layer (fc1: 5 tiles x 729 tokens x 4304 values, 63 MB), so there all threads write them.
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    if n < PARALLEL_ZEROS {
        return vec![0f32; n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(0f32, n));
    v
}

/// Runs `f` on the values of `x` as a row-major f32 slice, borrowing the tensor's own storage
/// when it is already contiguous f32 (vision activations are tens of megabytes).
pub(crate) fn with_f32_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    with_cpu_slice::<f32, R>(&x.to_dtype(DType::F32)?, f)
}

/// Runs `f` on the values of `x` (of dtype `T`) as a row-major slice, borrowing the tensor's own
/// storage when it is contiguous.
pub(crate) fn with_cpu_slice<T: candle_core::WithDType, R>(
    x: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<R> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let start = layout.start_offset();
            Ok(f(&cpu.as_slice::<T>()?[start..start + x.elem_count()]))
        }
        _ => candle_core::bail!("dsvl2's kernels run on the CPU"),
    }
}

/// [`with_cpu_slice`] for several tensors at once, borrowed together: each must be a contiguous
/// CPU tensor of dtype `T` (no copies are made).
pub(crate) fn with_cpu_slices<T: candle_core::WithDType, R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> R,
) -> candle_core::Result<R> {
    if let Some(t) = tensors.iter().find(|t| !t.is_contiguous()) {
        candle_core::bail!("with_cpu_slices: a {:?} tensor is not contiguous", t.dims());
    }
    let guards: Vec<_> = tensors
        .iter()
        .map(|t| (t.storage_and_layout(), t.elem_count()))
        .collect();
    let slices = guards
        .iter()
        .map(|((storage, layout), n)| match &**storage {
            candle_core::Storage::Cpu(cpu) => Ok(&cpu.as_slice::<T>()?[layout.start_offset()..][..*n]),
            _ => candle_core::bail!("dsvl2's kernels run on the CPU"),
        })
        .collect::<candle_core::Result<Vec<&[T]>>>()?;
    Ok(f(&slices))
}

/// The values of `x` as row-major f32 (a copy).
pub(crate) fn f32_rows(x: &Tensor) -> candle_core::Result<Vec<f32>> {
    with_f32_slice(x, <[f32]>::to_vec)
}

/// Several layers applied to their own inputs in ONE parallel dispatch: `outputs[i] =
/// layers[i](inputs[i])`, where `inputs[i]` is `[rows_i, in_i]` row-major. Used where many small
/// products are independent (the experts of a MoE layer), so both cores stay busy without one
/// thread fork/join per product.
pub(crate) fn forward_many(layers: &[&Linear], inputs: &[&[f32]]) -> Vec<Vec<f32>> {
    assert_eq!(layers.len(), inputs.len(), "one input per layer");
    let mut outputs: Vec<Vec<f32>> = layers
        .iter()
        .zip(inputs)
        .map(|(l, x)| vec![0f32; x.len() / l.in_dim() * l.out_dim()])
        .collect();
    let mut jobs: Vec<MatmulJob> = layers
        .iter()
        .zip(inputs)
        .zip(outputs.iter_mut())
        .map(|((l, x), y)| MatmulJob {
            weight: &l.weight,
            x,
            m: x.len() / l.in_dim(),
            y,
        })
        .collect();
    dsvl2_kernels::matmul_many(&mut jobs);
    for (layer, y) in layers.iter().zip(outputs.iter_mut()) {
        layer.add_bias(y);
    }
    outputs
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, x)
    }
}
