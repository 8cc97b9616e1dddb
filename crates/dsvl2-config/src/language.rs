//! `language_config`: the DeepseekV2 language model.
//!
//! Defaults are those of the official `DeepseekV2Config.__init__` (configuration_deepseek.py), so a
//! config that omits a key means what it means to the reference.

use std::path::Path;

use serde::Deserialize;

use crate::ConfigError;

/// How routed experts are chosen (`topk_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TopkMethod {
    /// Plain top-k over the scores. The official default spells it `gready`; both spellings work.
    #[serde(rename = "greedy", alias = "gready")]
    Greedy,
    /// Group score = max score of the group; the best `topk_group` groups stay.
    #[serde(rename = "group_limited_greedy")]
    GroupLimitedGreedy,
    /// Scores plus `e_score_correction_bias` choose; group score = sum of its top-2 choice scores.
    #[serde(rename = "noaux_tc")]
    NoauxTc,
}

/// How router logits become scores (`scoring_func`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ScoringFunc {
    #[serde(rename = "softmax")]
    Softmax,
    #[serde(rename = "sigmoid")]
    Sigmoid,
}

/// `rope_scaling`, resolved with the reference's defaults per type.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// YaRN, as `DeepseekV2YarnRotaryEmbedding` (MLA path only).
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: f64,
        mscale_all_dim: f64,
    },
}

/// Mixture-of-experts settings; present when the config has routed experts.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub n_routed_experts: usize,
    /// Shared experts form one MLP of width `moe_intermediate_size * n_shared_experts` (0 = none).
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    /// Expert groups for the group-limited methods (1 when the config gives none).
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
}

/// The language model's resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct LanguageConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub attention_bias: bool,
    /// Multi-head latent attention (small/base) instead of plain multi-head attention (tiny).
    pub use_mla: bool,
    pub kv_lora_rank: usize,
    pub q_lora_rank: Option<usize>,
    pub qk_rope_head_dim: usize,
    pub qk_nope_head_dim: usize,
    pub v_head_dim: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub tie_word_embeddings: bool,
    pub moe: Option<MoeConfig>,
}

impl LanguageConfig {
    /// Whether decoder layer `layer` uses the MoE block (otherwise the dense MLP), by the
    /// reference's rule: routed experts exist, `layer >= first_k_dense_replace` and
    /// `layer % moe_layer_freq == 0`.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        match &self.moe {
            Some(moe) => layer >= moe.first_k_dense_replace && layer.is_multiple_of(moe.moe_layer_freq),
            None => false,
        }
    }

    /// Head dimension of the plain multi-head attention path.
    pub fn mha_head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// `language_config` exactly as written, with the official defaults for absent keys.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub(crate) struct RawLanguageConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    moe_intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    n_shared_experts: Option<usize>,
    n_routed_experts: Option<usize>,
    ep_size: usize,
    routed_scaling_factor: f64,
    kv_lora_rank: Option<usize>,
    q_lora_rank: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    topk_method: TopkMethod,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_layer_freq: usize,
    first_k_dense_replace: usize,
    norm_topk_prob: bool,
    scoring_func: ScoringFunc,
    hidden_act: String,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    pretraining_tp: usize,
    tie_word_embeddings: bool,
    rope_theta: f64,
    rope_scaling: Option<serde_json::Map<String, serde_json::Value>>,
    attention_bias: bool,
    use_mla: bool,
}

impl Default for RawLanguageConfig {
    fn default() -> Self {
        // configuration_deepseek.py, DeepseekV2Config.__init__ defaults.
        RawLanguageConfig {
            vocab_size: 102400,
            hidden_size: 4096,
            intermediate_size: 11008,
            moe_intermediate_size: 1407,
            num_hidden_layers: 30,
            num_attention_heads: 32,
            num_key_value_heads: Some(32),
            n_shared_experts: None,
            n_routed_experts: None,
            ep_size: 1,
            routed_scaling_factor: 1.0,
            kv_lora_rank: Some(512),
            q_lora_rank: Some(1536),
            qk_rope_head_dim: Some(64),
            v_head_dim: Some(128),
            qk_nope_head_dim: Some(128),
            topk_method: TopkMethod::Greedy,
            n_group: None,
            topk_group: None,
            num_experts_per_tok: None,
            moe_layer_freq: 1,
            first_k_dense_replace: 0,
            norm_topk_prob: false,
            scoring_func: ScoringFunc::Softmax,
            hidden_act: "silu".to_string(),
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            bos_token_id: Some(100000),
            eos_token_id: Some(100001),
            pretraining_tp: 1,
            tie_word_embeddings: false,
            rope_theta: 10000.0,
            rope_scaling: None,
            attention_bias: false,
            use_mla: true,
        }
    }
}

impl RawLanguageConfig {
    /// Resolves defaults and refuses what the reference would not run (or we do not support).
    pub(crate) fn resolve(self, path: &Path) -> Result<LanguageConfig, ConfigError> {
        let key = |k: &str| format!("language_config.{k}");
        let unsupported =
            |k: &str, v: &dyn std::fmt::Display, why: &str| ConfigError::unsupported(path, &key(k), v, why);
        if self.hidden_act != "silu" {
            return Err(unsupported(
                "hidden_act",
                &self.hidden_act,
                "only \"silu\" is implemented",
            ));
        }
        if self.pretraining_tp != 1 {
            return Err(unsupported(
                "pretraining_tp",
                &self.pretraining_tp,
                "only 1 is implemented",
            ));
        }
        if self.ep_size != 1 {
            return Err(unsupported(
                "ep_size",
                &self.ep_size,
                "expert parallelism is not implemented",
            ));
        }
        for (k, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("moe_layer_freq", self.moe_layer_freq),
        ] {
            if v == 0 {
                return Err(unsupported(k, &v, "must be at least 1"));
            }
        }
        let num_key_value_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if !self.use_mla {
            if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
                return Err(unsupported(
                    "num_attention_heads",
                    &self.num_attention_heads,
                    "must divide hidden_size for multi-head attention",
                ));
            }
            if num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(num_key_value_heads) {
                return Err(unsupported(
                    "num_key_value_heads",
                    &num_key_value_heads,
                    "must divide num_attention_heads",
                ));
            }
            if !(self.hidden_size / self.num_attention_heads).is_multiple_of(2) {
                return Err(unsupported(
                    "hidden_size",
                    &self.hidden_size,
                    "head_dim must be even for rotary embeddings",
                ));
            }
        }
        // MLA dimensions: required with use_mla (the tiny config writes them as null).
        let mla_dim = |k: &str, v: Option<usize>| -> Result<usize, ConfigError> {
            match (self.use_mla, v) {
                (true, Some(v)) if v > 0 => Ok(v),
                (true, _) => Err(unsupported(k, &format!("{v:?}"), "required (> 0) when use_mla is true")),
                (false, v) => Ok(v.unwrap_or(0)),
            }
        };
        let kv_lora_rank = mla_dim("kv_lora_rank", self.kv_lora_rank)?;
        let qk_rope_head_dim = mla_dim("qk_rope_head_dim", self.qk_rope_head_dim)?;
        let qk_nope_head_dim = mla_dim("qk_nope_head_dim", self.qk_nope_head_dim)?;
        let v_head_dim = mla_dim("v_head_dim", self.v_head_dim)?;
        if self.use_mla && qk_rope_head_dim % 2 != 0 {
            return Err(unsupported("qk_rope_head_dim", &qk_rope_head_dim, "must be even"));
        }
        let rope_scaling = match self.rope_scaling {
            None => None,
            Some(map) => Some(parse_rope_scaling(&map, self.use_mla, path)?),
        };
        let moe = match self.n_routed_experts {
            None | Some(0) => None,
            Some(n_routed_experts) => {
                let top_k = self.num_experts_per_tok.ok_or_else(|| {
                    unsupported("num_experts_per_tok", &"null", "required when n_routed_experts is set")
                })?;
                if top_k == 0 || top_k > n_routed_experts {
                    return Err(unsupported(
                        "num_experts_per_tok",
                        &top_k,
                        &format!("must be between 1 and n_routed_experts ({n_routed_experts})"),
                    ));
                }
                let n_group = self.n_group.unwrap_or(1).max(1);
                let topk_group = self.topk_group.unwrap_or(n_group);
                if self.topk_method != TopkMethod::Greedy {
                    if n_routed_experts % n_group != 0 {
                        return Err(unsupported("n_group", &n_group, "must divide n_routed_experts"));
                    }
                    if topk_group == 0 || topk_group > n_group {
                        return Err(unsupported("topk_group", &topk_group, "must be between 1 and n_group"));
                    }
                    if topk_group * (n_routed_experts / n_group) < top_k {
                        return Err(unsupported(
                            "topk_group",
                            &topk_group,
                            "the kept groups hold fewer experts than num_experts_per_tok",
                        ));
                    }
                }
                if self.topk_method == TopkMethod::NoauxTc && n_routed_experts / n_group < 2 {
                    return Err(unsupported(
                        "n_group",
                        &n_group,
                        "noaux_tc needs at least 2 experts per group",
                    ));
                }
                Some(MoeConfig {
                    n_routed_experts,
                    n_shared_experts: self.n_shared_experts.unwrap_or(0),
                    num_experts_per_tok: top_k,
                    moe_intermediate_size: self.moe_intermediate_size,
                    topk_method: self.topk_method,
                    scoring_func: self.scoring_func,
                    n_group,
                    topk_group,
                    norm_topk_prob: self.norm_topk_prob,
                    routed_scaling_factor: self.routed_scaling_factor,
                    first_k_dense_replace: self.first_k_dense_replace,
                    moe_layer_freq: self.moe_layer_freq,
                })
            }
        };
        Ok(LanguageConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling,
            attention_bias: self.attention_bias,
            use_mla: self.use_mla,
            kv_lora_rank,
            q_lora_rank: self.q_lora_rank.filter(|_| self.use_mla),
            qk_rope_head_dim,
            qk_nope_head_dim,
            v_head_dim,
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id,
            tie_word_embeddings: self.tie_word_embeddings,
            moe,
        })
    }
}

fn parse_rope_scaling(
    map: &serde_json::Map<String, serde_json::Value>,
    use_mla: bool,
    path: &Path,
) -> Result<RopeScaling, ConfigError> {
    let key = |k: &str| format!("language_config.rope_scaling.{k}");
    let number = |k: &str, default: Option<f64>| -> Result<f64, ConfigError> {
        match map.get(k) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| ConfigError::unsupported(path, &key(k), v, "must be a number")),
            None => default.ok_or_else(|| ConfigError::unsupported(path, &key(k), "absent", "required")),
        }
    };
    let kind = map
        .get("type")
        .or_else(|| map.get("rope_type"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let factor = number("factor", None)?;
    match kind {
        "linear" => Ok(RopeScaling::Linear { factor }),
        // transformers 4.38's LlamaAttention (the non-MLA path) knows only linear and dynamic.
        "yarn" if use_mla => Ok(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: number("original_max_position_embeddings", Some(4096.0))? as usize,
            beta_fast: number("beta_fast", Some(32.0))?,
            beta_slow: number("beta_slow", Some(1.0))?,
            mscale: number("mscale", Some(1.0))?,
            mscale_all_dim: number("mscale_all_dim", Some(0.0))?,
        }),
        other => Err(ConfigError::unsupported(
            path,
            &key("type"),
            format!("{other:?}"),
            if use_mla {
                "supported: \"linear\", \"yarn\""
            } else {
                "supported without MLA: \"linear\""
            },
        )),
    }
}
