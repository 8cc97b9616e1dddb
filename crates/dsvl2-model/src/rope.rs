//! Rotary position embeddings, computed the way the reference computes them: `inv_freq` and the
//! angles `pos * inv_freq` in float32, cos/sin in float32 (scaled by YaRN's mscale when set).

use candle_core::{Device, Tensor};
use dsvl2_config::RopeScaling;

/// Which pairs of a head's rotary dims are rotated together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// `(x_i, x_{i+d/2})`: transformers' LlamaAttention (`rotate_half`), the MHA path.
    HalfSplit,
    /// `(x_{2i}, x_{2i+1})`: the MLA path permutes the rope dims to `[evens, odds]` before
    /// `rotate_half`. Scores only use dot products of equally-rotated q and k, so rotating the
    /// pairs in place is the same computation.
    Interleaved,
}

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    /// Positions are divided by this (linear scaling; 1 otherwise).
    position_scale: f32,
    /// YaRN multiplies cos and sin by this.
    mscale: f32,
    layout: RopeLayout,
}

/// YaRN's attention-temperature factor (`yarn_get_mscale`).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// `1 / base^(2i/dim)` with float32 arithmetic, as `torch.arange(0, dim, 2).float() / dim`.
fn base_inv_freq(dim: usize, base: f64, extra_scale: f32) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / dim as f32;
            1.0f32 / (extra_scale * (base as f32).powf(exponent))
        })
        .collect()
}

impl RotaryEmbedding {
    pub fn new(dim: usize, base: f64, scaling: Option<&RopeScaling>, layout: RopeLayout) -> Self {
        match scaling {
            None => RotaryEmbedding {
                inv_freq: base_inv_freq(dim, base, 1.0),
                position_scale: 1.0,
                mscale: 1.0,
                layout,
            },
            Some(RopeScaling::Linear { factor }) => RotaryEmbedding {
                inv_freq: base_inv_freq(dim, base, 1.0),
                position_scale: *factor as f32,
                mscale: 1.0,
                layout,
            },
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
            }) => {
                let extra = base_inv_freq(dim, base, 1.0);
                let inter = base_inv_freq(dim, base, *factor as f32);
                let correction_dim = |rotations: f64| {
                    dim as f64
                        * (*original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                let low = correction_dim(*beta_fast).floor().max(0.0);
                let high = correction_dim(*beta_slow).ceil().min(dim as f64 - 1.0);
                let (low, high) = (low as f32, if low == high { high as f32 + 0.001 } else { high as f32 });
                let inv_freq = (0..dim / 2)
                    .map(|i| {
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extra_mask = 1.0 - ramp;
                        inter[i] * (1.0 - extra_mask) + extra[i] * extra_mask
                    })
                    .collect();
                let m = yarn_mscale(*factor, *mscale) / yarn_mscale(*factor, *mscale_all_dim);
                RotaryEmbedding {
                    inv_freq,
                    position_scale: 1.0,
                    mscale: m as f32,
                    layout,
                }
            }
        }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// cos and sin tables `[len, dim/2]` for positions `start..start+len`.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        self.tables_at(start..start + len, device)
    }

    /// cos and sin tables with one row per position, in the order given (e.g. the next position
    /// of each sequence in a decode batch).
    pub fn tables_at(
        &self,
        positions: impl ExactSizeIterator<Item = usize>,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (len, half) = (positions.len(), self.inv_freq.len());
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in positions {
            let t = pos as f32 / self.position_scale;
            for f in &self.inv_freq {
                let angle = t * f;
                cos.push(angle.cos() * self.mscale);
                sin.push(angle.sin() * self.mscale);
            }
        }
        Ok((
            Tensor::from_vec(cos, (len, half), device)?,
            Tensor::from_vec(sin, (len, half), device)?,
        ))
    }

    /// Rotates `x`: `[batch, heads, len, dim]` with tables from [`Self::tables`].
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        match self.layout {
            RopeLayout::HalfSplit => candle_nn::rotary_emb::rope(&x, cos, sin),
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin),
        }
    }
}
