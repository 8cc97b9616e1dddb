//! The `downsample_mlp_gelu` projector: each 2x2 block of vision tokens (the 27x27 grid zero-padded
//! to 28x28 at the bottom and right) is concatenated channel-major, as `F.unfold` orders it, then
//! Linear -> GELU(erf) -> ... -> Linear maps it to the language model's width.

use candle_core::Tensor;
use dsvl2_config::ProjectorConfig;

use crate::linear::Linear;
use crate::{ModelError, Weights};

pub struct Projector {
    layers: Vec<Linear>,
    ratio: usize,
}

impl Projector {
    pub fn load(w: &Weights, cfg: &ProjectorConfig) -> Result<Self, ModelError> {
        let ratio = cfg.downsample_ratio;
        let hidden = cfg.n_embed * cfg.mlp_ratio;
        // The reference always builds at least two Linears: in -> hidden, (hidden -> hidden)*, hidden -> out.
        let n_linears = cfg.depth.max(2);
        let layers = (0..n_linears)
            .map(|i| {
                let in_dim = if i == 0 { cfg.input_dim * ratio * ratio } else { hidden };
                let out_dim = if i + 1 == n_linears { cfg.n_embed } else { hidden };
                // nn.Sequential indices: Linear, GELU, Linear, GELU, ... -> Linears at 0, 2, 4, ...
                Linear::load(w, &format!("projector.layers.{}", 2 * i), in_dim, out_dim, true)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Projector { layers, ratio })
    }

    /// Bytes of all weights held.
    pub fn weight_bytes(&self) -> u64 {
        self.layers.iter().map(Linear::weight_bytes).sum()
    }

    /// `features`: `[n, g*g, W]` -> `[n, ceil(g/r)^2, n_embed]`.
    pub fn forward(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        let (n, hw, c) = features.dims3()?;
        let g = (hw as f64).sqrt() as usize;
        if g * g != hw {
            candle_core::bail!("projector input has {hw} tokens per tile, not a square grid");
        }
        let r = self.ratio;
        let pad = (r - g % r) % r;
        let mut x = features.reshape((n, g, g, c))?;
        if pad > 0 {
            x = x.pad_with_zeros(1, 0, pad)?.pad_with_zeros(2, 0, pad)?;
        }
        let s = (g + pad) / r;
        // [n, by, ky, bx, kx, c] -> [n, by, bx, c, ky, kx]: feature index = c*r*r + ky*r + kx.
        let mut x = x
            .reshape((n, s, r, s, r, c))?
            .permute((0, 1, 3, 5, 2, 4))?
            .reshape((n, s * s, c * r * r))?;
        for (i, layer) in self.layers.iter().enumerate() {
            if i > 0 {
                x = x.gelu_erf()?;
            }
            x = layer.forward(&x)?;
        }
        Ok(x)
    }
}
