//! Feed-forward blocks: the dense SiLU-gated MLP, and DeepSeekMoE (shared experts plus routed
//! experts chosen per token by a router).

use candle_core::{DType, Tensor};
use dsvl2_config::{LanguageConfig, MoeConfig, ScoringFunc, TopkMethod};

use crate::linear::Linear;
use crate::{ModelError, Weights};

/// `down(silu(gate(x)) * up(x))`.
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    pub fn load(w: &Weights, p: &str, hidden: usize, intermediate: usize) -> Result<Self, ModelError> {
        Ok(Mlp {
            gate: Linear::load(w, &format!("{p}.gate_proj"), hidden, intermediate, false)?,
            up: Linear::load(w, &format!("{p}.up_proj"), hidden, intermediate, false)?,
            down: Linear::load(w, &format!("{p}.down_proj"), intermediate, hidden, false)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let g = self.gate.forward(x)?.silu()?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}

/// The experts chosen for one token and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

/// The MoE gate (`mlp.gate`): scores every expert, picks `top_k` by the configured method.
pub struct Router {
    weight: Tensor,
    correction_bias: Option<Vec<f32>>,
    cfg: MoeConfig,
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

impl Router {
    pub fn load(w: &Weights, p: &str, hidden: usize, cfg: &MoeConfig) -> Result<Self, ModelError> {
        let e = cfg.n_routed_experts;
        let weight = w.get(&format!("{p}.weight"), &[e, hidden])?.to_dtype(DType::F32)?;
        let correction_bias = if cfg.topk_method == TopkMethod::NoauxTc {
            Some(
                w.get(&format!("{p}.e_score_correction_bias"), &[e])?
                    .to_dtype(DType::F32)?
                    .to_vec1()?,
            )
        } else {
            None
        };
        Ok(Router {
            weight,
            correction_bias,
            cfg: cfg.clone(),
        })
    }

    /// Routing of every row of `x` (`[tokens, hidden]`), computed in f32 as the reference does.
    pub fn route(&self, x: &Tensor) -> candle_core::Result<Vec<Routing>> {
        let logits = x.to_dtype(DType::F32)?.matmul(&self.weight.t()?)?;
        let logits: Vec<Vec<f32>> = logits.to_vec2()?;
        Ok(logits.iter().map(|row| self.route_one(row)).collect())
    }

    /// One token: `logits` has one entry per routed expert.
    pub fn route_one(&self, logits: &[f32]) -> Routing {
        let cfg = &self.cfg;
        let scores: Vec<f32> = match cfg.scoring_func {
            ScoringFunc::Softmax => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                exps.iter().map(|e| e / sum).collect()
            }
            ScoringFunc::Sigmoid => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
        };
        let k = cfg.num_experts_per_tok;
        let experts = match cfg.topk_method {
            TopkMethod::Greedy => top_k_indices(&scores, k),
            TopkMethod::GroupLimitedGreedy => {
                let masked = self.mask_groups(&scores, |group| group.iter().copied().fold(f32::NEG_INFINITY, f32::max));
                top_k_indices(&masked, k)
            }
            TopkMethod::NoauxTc => {
                let bias = self.correction_bias.as_ref().expect("noaux_tc routers load their bias");
                let choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
                let masked = self.mask_groups(&choice, |group| {
                    let best = top_k_indices(group, 2);
                    group[best[0]] + group[best[1]]
                });
                top_k_indices(&masked, k)
            }
        };
        // noaux_tc chooses with the bias but weighs with the plain scores, like the others.
        let mut weights: Vec<f32> = experts.iter().map(|&e| scores[e]).collect();
        let scale = cfg.routed_scaling_factor as f32;
        if k > 1 && cfg.norm_topk_prob {
            let denominator = weights.iter().sum::<f32>() + 1e-20;
            weights.iter_mut().for_each(|w| *w = *w / denominator * scale);
        } else {
            weights.iter_mut().for_each(|w| *w *= scale);
        }
        Routing { experts, weights }
    }

    /// Keeps the experts of the best `topk_group` groups (by `group_score`); the others' values
    /// become 0.0 (the reference masks with 0, not -inf).
    fn mask_groups(&self, values: &[f32], group_score: impl Fn(&[f32]) -> f32) -> Vec<f32> {
        let per_group = values.len() / self.cfg.n_group;
        let group_scores: Vec<f32> = values.chunks(per_group).map(&group_score).collect();
        let kept = top_k_indices(&group_scores, self.cfg.topk_group);
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| if kept.contains(&(i / per_group)) { v } else { 0.0 })
            .collect()
    }
}

/// Shared experts plus routed experts.
pub struct Moe {
    router: Router,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
}

impl Moe {
    pub fn load(w: &Weights, p: &str, cfg: &LanguageConfig, moe: &MoeConfig) -> Result<Self, ModelError> {
        let d = cfg.hidden_size;
        let experts = (0..moe.n_routed_experts)
            .map(|i| Mlp::load(w, &format!("{p}.experts.{i}"), d, moe.moe_intermediate_size))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = if moe.n_shared_experts > 0 {
            Some(Mlp::load(
                w,
                &format!("{p}.shared_experts"),
                d,
                moe.moe_intermediate_size * moe.n_shared_experts,
            )?)
        } else {
            None
        };
        Ok(Moe {
            router: Router::load(w, &format!("{p}.gate"), d, moe)?,
            experts,
            shared,
        })
    }

    /// `x`: `[tokens, hidden]`. Tokens are grouped by expert so each expert runs once per call.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let routing = self.router.route(x)?;
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); self.experts.len()];
        let mut row_weights: Vec<Vec<f32>> = vec![Vec::new(); self.experts.len()];
        for (token, r) in routing.iter().enumerate() {
            for (&e, &w) in r.experts.iter().zip(&r.weights) {
                rows[e].push(token as u32);
                row_weights[e].push(w);
            }
        }
        let mut y = x.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            if rows[e].is_empty() {
                continue;
            }
            let n = rows[e].len();
            let index = Tensor::from_slice(&rows[e], n, x.device())?;
            let weights = Tensor::from_slice(&row_weights[e], (n, 1), x.device())?.to_dtype(x.dtype())?;
            let out = expert.forward(&x.index_select(&index, 0)?)?.broadcast_mul(&weights)?;
            y = y.index_add(&index, &out, 0)?;
        }
        if let Some(shared) = &self.shared {
            y = (y + shared.forward(x)?)?;
        }
        Ok(y)
    }
}

/// A decoder layer's feed-forward block.
pub enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

impl FeedForward {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            FeedForward::Dense(m) => m.forward(x),
            FeedForward::Moe(m) => m.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_prefers_larger_then_lower_index() {
        assert_eq!(top_k_indices(&[0.1, 0.5, 0.5, 0.2], 2), vec![1, 2]);
        assert_eq!(top_k_indices(&[3.0, -1.0, 2.0], 1), vec![0]);
    }
}
