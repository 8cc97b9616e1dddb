//! The SigLIP vision tower, timm-style (`vision.*`): patch embedding, learned position embedding,
//! pre-norm transformer blocks with a fused qkv projection, final LayerNorm. The attention-pool
//! head exists in the checkpoints but DeepSeek-VL2 never runs it (`ignore_head`).

use candle_core::Tensor;
use dsvl2_config::VisionConfig;

use dsvl2_kernels::Format;

use crate::linear::{Activation, Linear};
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
    width: usize,
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
            width,
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
    /// run over all tiles at once; the scores are made one tile at a time, so at most
    /// `heads x T x T` of them (34 MB at 729 tokens) exist at once, whatever the image count.
    fn attention(&self, block: &Block, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, t, _) = x.dims3()?;
        let hd = self.width / self.heads;
        let qkv = block.qkv.forward(x)?.reshape((n, t, 3, self.heads, hd))?;
        let tiles = (0..n)
            .map(|tile| {
                let qkv = qkv.get(tile)?.permute((1, 2, 0, 3))?; // [3, heads, t, hd]
                let q = (qkv.get(0)?.contiguous()? * (hd as f64).powf(-0.5))?;
                let k = qkv.get(1)?.contiguous()?;
                let v = qkv.get(2)?.contiguous()?;
                let probs = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
                probs.matmul(&v)?.transpose(0, 1)?.reshape((t, self.width))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        block.proj.forward(&Tensor::stack(&tiles, 0)?)
    }
}
