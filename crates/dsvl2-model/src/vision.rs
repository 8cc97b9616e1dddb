//! The SigLIP vision tower, timm-style (`vision.*`): patch embedding, learned position embedding,
//! pre-norm transformer blocks with a fused qkv projection, final LayerNorm. The attention-pool
//! head exists in the checkpoints but DeepSeek-VL2 never runs it (`ignore_head`).

use candle_core::Tensor;
use dsvl2_config::VisionConfig;

use dsvl2_kernels::{prefill_attention, Format, HeadRows, PrefillShape};

use crate::linear::{with_f32_slice, zeros, Activation, Linear};
use crate::norm::LayerNorm;
use crate::{ModelError, Weights};

/// timm's SigLIP uses LayerNorm(eps=1e-6) everywhere.
const LN_EPS: f64 = 1e-6;

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct VisionTower {
    patch_embed: Linear,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    patch: usize,
    grid: usize,
    heads: usize,
}

impl VisionTower {
    pub fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self, ModelError> {
        let (width, p, grid) = (cfg.width, cfg.patch_size, cfg.grid_size());
        // The conv kernel [W, 3, p, p] is a Linear over flattened (channel, y, x) patches.
        let conv = w.get("vision.patch_embed.proj.weight", &[width, 3, p, p])?;
        // Small (0.7 M weights) and run once per tile: kept in f32 whatever `--dtype` says.
        let patch_embed = Linear::from_tensor(
            &conv.reshape((width, 3 * p * p))?,
            Some(&w.get("vision.patch_embed.proj.bias", &[width])?),
            Format::F32,
        )?;
        let pos_embed = w.get("vision.pos_embed", &[1, grid * grid, width])?.squeeze(0)?;
        let hidden = cfg.mlp_hidden();
        let blocks = (0..cfg.layers)
            .map(|i| {
                let b = format!("vision.blocks.{i}");
                Ok(Block {
                    norm1: LayerNorm::load(w, &format!("{b}.norm1"), width, LN_EPS)?,
                    qkv: Linear::load(w, &format!("{b}.attn.qkv"), width, 3 * width, true)?,
                    proj: Linear::load(w, &format!("{b}.attn.proj"), width, width, true)?,
                    norm2: LayerNorm::load(w, &format!("{b}.norm2"), width, LN_EPS)?,
                    fc1: Linear::load(w, &format!("{b}.mlp.fc1"), width, hidden, true)?,
                    fc2: Linear::load(w, &format!("{b}.mlp.fc2"), hidden, width, true)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let norm = LayerNorm::load(w, "vision.norm", width, LN_EPS)?;
        w.skip_prefix("vision.attn_pool.");
        Ok(VisionTower {
            patch_embed,
            pos_embed,
            blocks,
            norm,
            patch: p,
            grid,
            heads: cfg.heads,
        })
    }

    /// Bytes of all weights held.
    pub fn weight_bytes(&self) -> u64 {
        let linears: u64 = self
            .blocks
            .iter()
            .flat_map(|b| [&b.qkv, &b.proj, &b.fc1, &b.fc2])
            .map(Linear::weight_bytes)
            .sum();
        linears + self.patch_embed.weight_bytes() + 4 * self.pos_embed.elem_count() as u64
    }

    /// Tokens per tile (`grid * grid`, 729 for 384/14).
    pub fn tokens_per_tile(&self) -> usize {
        self.grid * self.grid
    }

    /// `pixels`: `[n_tiles, 3, S, S]` -> features `[n_tiles, grid*grid, width]`.
    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let n = pixels.dim(0)?;
        let (p, g) = (self.patch, self.grid);
        // Pixels past grid*patch (the last 6 rows/columns of a 384 tile) are never seen.
        let x = pixels.narrow(2, 0, g * p)?.narrow(3, 0, g * p)?;
        let patches = x
            .reshape((n, 3, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((n, g * g, 3 * p * p))?;
        let mut x = self.patch_embed.forward(&patches)?.broadcast_add(&self.pos_embed)?;
        for block in &self.blocks {
            x = (&x + self.attention(block, &block.norm1.forward(&x)?)?)?;
            let h = block
                .fc1
                .forward_then(&block.norm2.forward(&x)?, Activation::GeluTanh)?;
            x = (&x + block.fc2.forward(&h)?)?;
        }
        self.norm.forward(&x)
    }

    /// Unmasked multi-head self-attention of each tile's tokens. The qkv and output projections
    /// run over all tiles at once; the attention runs one tile at a time (heads in parallel, read in
    /// place from the fused qkv output), so at most one `T x T` score matrix per thread exists.
    fn attention(&self, block: &Block, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, t, width) = x.dims3()?;
        let hd = width / self.heads;
        let qkv = block.qkv.forward(x)?; // [n, t, 3 * width]: q, k, v of each token, heads inside
        let mut out = zeros(n * t * width);
        let shape = PrefillShape {
            heads: self.heads,
            kv_heads: self.heads,
            head_dim: hd,
            queries: t,
            keys: t,
            scale: (hd as f32).powf(-0.5),
            causal: false,
        };
        with_f32_slice(&qkv, |qkv| {
            for (tile, out) in out.chunks_exact_mut(t * width).enumerate() {
                let tokens = &qkv[tile * t * 3 * width..(tile + 1) * t * 3 * width];
                let rows = |offset: usize| HeadRows {
                    data: &tokens[offset..],
                    row_stride: 3 * width,
                };
                prefill_attention(rows(0), rows(width), rows(2 * width), &shape, out, width);
            }
        })?;
        block.proj.forward(&Tensor::from_vec(out, (n, t, width), x.device())?)
    }
}
