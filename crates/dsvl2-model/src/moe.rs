//! Feed-forward blocks: the dense SiLU-gated MLP, and DeepSeekMoE (shared experts plus routed
//! experts chosen per token by a router).

use candle_core::{DType, Tensor};
use dsvl2_config::{LanguageConfig, MoeConfig, ScoringFunc, TopkMethod};
use dsvl2_kernels::{Format, PackedMatrix};
use rayon::prelude::*;

use crate::linear::{f32_rows, forward_many, Linear};
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
        let d = self.gate.in_dim();
        let rows = x.elem_count() / d;
        let y = forward_mlps(&[self], &[&f32_rows(x)?])
            .pop()
            .expect("one MLP, one output");
        Tensor::from_vec(y, (rows, self.down.out_dim()), x.device())
    }

    /// Bytes of the three projections' weights.
    pub fn weight_bytes(&self) -> u64 {
        self.gate.weight_bytes() + self.up.weight_bytes() + self.down.weight_bytes()
    }
}

/// `mlps[i]` applied to `inputs[i]` (row-major `[rows_i, hidden]`), all in two parallel
/// dispatches: every gate and up projection at once, then every down projection.
fn forward_mlps(mlps: &[&Mlp], inputs: &[&[f32]]) -> Vec<Vec<f32>> {
    let (layers, xs): (Vec<&Linear>, Vec<&[f32]>) = mlps
        .iter()
        .zip(inputs)
        .flat_map(|(m, &x)| [(&m.gate, x), (&m.up, x)])
        .unzip();
    let gate_up = forward_many(&layers, &xs);
    let total: usize = gate_up.iter().step_by(2).map(Vec::len).sum();
    let hidden: Vec<Vec<f32>> = gate_up
        .par_chunks_exact(2)
        .with_min_len(items_per_task(total, 1))
        .map(|pair| silu_mul(&pair[0], &pair[1]))
        .collect();
    let downs: Vec<&Linear> = mlps.iter().map(|m| &m.down).collect();
    let hidden: Vec<&[f32]> = hidden.iter().map(Vec::as_slice).collect();
    forward_many(&downs, &hidden)
}

/// Values from which the feed-forward blocks' element-wise work (`silu(gate) * up`, gathering each
/// expert's rows, summing the experts' outputs) runs on all threads: a prompt has millions (tiny's
/// first layer: 1039 x 6848), which took ~0.3 s per image request on one thread while the other waited
/// (perf); a decoded token's few thousand are not worth a fork/join.
const PARALLEL_VALUES: usize = 64 * 1024;

/// The `with_min_len` for a parallel pass over `values` values split into items: `parallel` items
/// per task from [`PARALLEL_VALUES`] on, else all in one chunk, run on the calling thread.
fn items_per_task(values: usize, parallel: usize) -> usize {
    if values >= PARALLEL_VALUES {
        parallel.max(1)
    } else {
        usize::MAX
    }
}

/// `silu(gate) * up`, element by element (vectorised, in parallel for long rows).
fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; gate.len()];
    dsvl2_kernels::silu_mul(gate, up, &mut out);
    out
}

/// The experts chosen for one token and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

/// The MoE gate (`mlp.gate`): scores every expert, picks `top_k` by the configured method.
pub struct Router {
    /// `[experts, hidden]` in f32 (the reference scores in f32). A packed matrix for the kernels'
    /// GEMV rather than a candle tensor: decoding tiny, candle's matmul took ~64 µs per layer for
    /// these 64 dot products (0.70 ms per token), the GEMV ~23 µs.
    weight: PackedMatrix,
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
        let values: Vec<f32> = w
            .get(&format!("{p}.weight"), &[e, hidden])?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let weight = PackedMatrix::from_f32(Format::F32, e, hidden, &values)
            .map_err(|err| ModelError::Input(format!("cannot store the [{e}, {hidden}] router weight {p}: {err}")))?;
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
        let (tokens, experts) = (x.dim(0)?, self.weight.rows());
        let mut logits = vec![0f32; tokens * experts];
        self.weight.matmul(&f32_rows(x)?, tokens, &mut logits);
        Ok(logits.chunks_exact(experts).map(|row| self.route_one(row)).collect())
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

    /// `x`: `[tokens, hidden]`. Tokens are grouped by expert, so each chosen expert runs once per
    /// call on all its tokens, and all experts (with the shared ones) run in the same parallel
    /// dispatches. Each token's routed outputs are summed in expert-index order (the reference sums
    /// in top-k order: the same value up to float rounding), then the shared experts are added.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (tokens, d) = x.dims2()?;
        let routing = self.router.route(x)?;
        let xs = f32_rows(x)?;
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.experts.len()];
        for (token, r) in routing.iter().enumerate() {
            for (&e, &w) in r.experts.iter().zip(&r.weights) {
                assigned[e].push((token, w));
            }
        }
        let active: Vec<usize> = (0..self.experts.len()).filter(|&e| !assigned[e].is_empty()).collect();
        // A prompt's gathers and sums run on all threads (experts, then tokens, split across them); a
        // decoding step's few rows in one chunk, on this thread.
        let gathered: Vec<Vec<f32>> = active
            .par_iter()
            .with_min_len(items_per_task(tokens * d, 1))
            .map(|&e| {
                assigned[e]
                    .iter()
                    .flat_map(|&(t, _)| &xs[t * d..(t + 1) * d])
                    .copied()
                    .collect()
            })
            .collect();
        let mut mlps: Vec<&Mlp> = active.iter().map(|&e| &self.experts[e]).collect();
        let mut inputs: Vec<&[f32]> = gathered.iter().map(Vec::as_slice).collect();
        if let Some(shared) = &self.shared {
            mlps.push(shared);
            inputs.push(&xs);
        }
        let outputs = forward_mlps(&mlps, &inputs);
        // Each token's rows of the experts' outputs (output, row, weight), in expert order: every sum
        // is taken in that order, then the shared experts' row is added.
        let mut contributions: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); tokens];
        for (a, &e) in active.iter().enumerate() {
            for (row, &(t, w)) in assigned[e].iter().enumerate() {
                contributions[t].push((a, row, w));
            }
        }
        let shared_out = self
            .shared
            .as_ref()
            .map(|_| outputs.last().expect("the shared experts ran last"));
        let mut y = vec![0f32; tokens * d];
        y.par_chunks_mut(d.max(1))
            .enumerate()
            .with_min_len(items_per_task(tokens * d, PARALLEL_VALUES / 4 / d.max(1)))
            .for_each(|(t, y)| {
                for &(a, row, w) in &contributions[t] {
                    let out = &outputs[a][row * d..(row + 1) * d];
                    y.iter_mut().zip(out).for_each(|(y, v)| *y += v * w);
                }
                if let Some(shared) = shared_out {
                    y.iter_mut().zip(&shared[t * d..(t + 1) * d]).for_each(|(y, s)| *y += s);
                }
            });
        Tensor::from_vec(y, (tokens, d), x.device())
    }

    /// Weight bytes one token reads: the router, the shared experts and `k` routed experts.
    pub fn bytes_per_token(&self) -> u64 {
        let k = self.router.cfg.num_experts_per_tok as u64;
        let expert = self.experts.first().map_or(0, Mlp::weight_bytes);
        self.router.weight.storage_bytes() as u64 + self.shared.as_ref().map_or(0, Mlp::weight_bytes) + k * expert
    }

    /// Bytes of all weights held.
    pub fn weight_bytes(&self) -> u64 {
        self.router.weight.storage_bytes() as u64
            + self.shared.as_ref().map_or(0, Mlp::weight_bytes)
            + self.experts.iter().map(Mlp::weight_bytes).sum::<u64>()
    }
}

/// A decoder layer's feed-forward block.
pub enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

impl FeedForward {
    /// Weight bytes one decoded token reads.
    pub fn bytes_per_token(&self) -> u64 {
        match self {
            FeedForward::Dense(m) => m.weight_bytes(),
            FeedForward::Moe(m) => m.bytes_per_token(),
        }
    }

    pub fn weight_bytes(&self) -> u64 {
        match self {
            FeedForward::Dense(m) => m.weight_bytes(),
            FeedForward::Moe(m) => m.weight_bytes(),
        }
    }

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

    /// A prompt's long rows go through the parallel path; every value must be the one the serial
    /// path (a decoded token's) gives.
    #[test]
    fn silu_mul_is_the_same_in_parallel() {
        let n = 3 * PARALLEL_VALUES + 7;
        let gate: Vec<f32> = (0..n).map(|i| ((i * 37 % 1001) as f32 - 500.0) / 50.0).collect();
        let up: Vec<f32> = (0..n).map(|i| ((i * 91 % 997) as f32 - 498.0) / 100.0).collect();
        let parallel = silu_mul(&gate, &up);
        for (i, chunk) in gate.chunks(1000).enumerate() {
            let serial = silu_mul(chunk, &up[i * 1000..][..chunk.len()]);
            assert_eq!(
                &parallel[i * 1000..i * 1000 + chunk.len()],
                &serial[..],
                "values {i}000.."
            );
        }
        let exact = gate[1] / (1.0 + (-gate[1]).exp()) * up[1];
        assert!((parallel[1] - exact).abs() <= 4.0 * f32::EPSILON * exact.abs());
    }
}
