"""Held-out model goldens for dsvl2, produced by the official DeepSeek-VL2 code.

Writes tests/fixtures/heldout/{models,cases,images}/ (tests/fixtures/heldout/README.md is
written by hand). Same file formats as tests/fixtures (see tests/fixtures/README.md),
except that the vision features are stored per model (`vision-<variant>.safetensors`) because the
held-out models have different vision towers.

This script contains no code of the reference: it imports the official package
(github.com/deepseek-ai/DeepSeek-VL2, commit ef9f91e) from an external checkout, builds small
random-weight models through its classes, saves them with its `save_pretrained`, loads them
back with `AutoModelForCausalLM.from_pretrained`, and runs the reference's processor, vision
tower, projector, `prepare_inputs_embeds`, language model and `generate` on CPU in float32.

Requirements (as used for the committed files): Python 3.11, torch 2.0.1 (CPU is enough),
transformers 4.38.2, tokenizers 0.15.2, timm 0.9.16, Pillow 11.0.0, numpy 1.26.4, safetensors,
attrdict, einops, sentencepiece; plus an importable `xformers.ops.memory_efficient_attention`
(xformers is GPU-only: provide a module with a plain-PyTorch function of the same semantics,
inputs [B, N, H, D], output softmax(q k^T / sqrt(D)) v in the same layout, no mask) on PYTHONPATH.

    PYTHONPATH=/path/to/xformers-stub:/path/to/DeepSeek-VL2 \
        python tools/heldout/make_heldout.py            # (re)generates everything
    ... make_heldout.py --check-public                  # sanity: reproduces public fixture cases

`--ref DIR` (or $DSVL2_REF) may be given instead of putting the checkout on PYTHONPATH.
"""

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shutil
import struct
import sys
import time

import numpy as np
import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
OUT = os.path.join(FIXTURES, "heldout")
IMAGES_DIR = "images"  # relative to OUT
REFERENCE_COMMIT = "ef9f91e2b6426536b83294c11742c27be66361b1"

MAX_NEW_TOKENS = 16
MIN_MARGIN = 2e-3  # accepted language-model seeds give greedy margins >= this ...
MIN_ROUTER_GAP = 1.2e-5  # ... and router expert / group gaps >= this
THREADS = 2

CANDIDATES = [[384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384],
              [768, 768], [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768],
              [384, 2688], [2688, 384], [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456],
              [3456, 384], [1152, 1152]]

# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def language_config(**over):
    base = {
        "model_type": "deepseek_v2",
        "architectures": ["DeepseekV2ForCausalLM"],
        "vocab_size": 3008,
        "hidden_size": None,
        "intermediate_size": None,
        "moe_intermediate_size": None,
        "num_hidden_layers": None,
        "num_attention_heads": None,
        "num_key_value_heads": None,
        "n_shared_experts": None,
        "n_routed_experts": None,
        "ep_size": 1,
        "routed_scaling_factor": 1.0,
        "kv_lora_rank": None,
        "q_lora_rank": None,
        "qk_rope_head_dim": 0,
        "v_head_dim": 0,
        "qk_nope_head_dim": 0,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": None,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-06,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_mla": True,
        "lm_head": True,
        "rm_head": False,
    }
    for k, v in over.items():
        assert k in base, k
        base[k] = v
    return base


def model_config(vision, projector, language, torch_dtype):
    return {
        "architectures": ["DeepseekVLV2ForCausalLM"],
        "model_type": "deepseek_vl_v2",
        "candidate_resolutions": CANDIDATES,
        "global_view_pos": "head",
        "tile_tag": "2D",
        "vision_config": {
            "model_type": "vision",
            "model_name": "siglip_so400m_patch14_384",
            "image_size": 384,
            "patch_size": 14,
            "width": vision["width"],
            "layers": vision["layers"],
            "heads": vision["heads"],
            "mlp_ratio": vision["mlp_ratio"],
            "global_pool": "map",
            "ignore_head": True,
            "class_token": False,
            "num_classes": 0,
            "use_checkpoint": False,
        },
        "projector_config": {
            "model_type": "mlp_projector",
            "projector_type": "downsample_mlp_gelu",
            "input_dim": vision["width"],
            "n_embed": language["hidden_size"],
            "depth": projector["depth"],
            "mlp_ratio": projector["mlp_ratio"],
            "downsample_ratio": 2,
        },
        "language_config": language,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.38.2",
    }


MODELS = {
    # MHA (transformers LlamaAttention) with grouped KV heads, dense/MoE interleaving, no shared
    # experts, top-1 greedy softmax routing.
    "heldout-mha-gqa": dict(
        vision=dict(width=32, layers=1, heads=2, mlp_ratio=2.5),
        projector=dict(depth=2, mlp_ratio=1),
        language=language_config(
            hidden_size=48, intermediate_size=112, moe_intermediate_size=24, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, n_shared_experts=None, n_routed_experts=6,
            num_experts_per_tok=1, first_k_dense_replace=2, moe_layer_freq=2, use_mla=False,
            topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0),
        torch_dtype="float32", shards=1, vision_seed=101, language_seed=1000,
        note="use_mla false (LlamaAttention, head_dim 12) with 4 query heads and 2 KV heads; "
             "first_k_dense_replace 2 + moe_layer_freq 2: layers 0,1,3 dense, 2,4 MoE; "
             "n_shared_experts null; greedy softmax top-1; F32, 1 file",
    ),
    # MLA with a low-rank query (q_lora_rank), YaRN RoPE, group-limited greedy softmax routing,
    # a 3-layer projector with mlp_ratio 2.
    "heldout-mla-qlora-yarn": dict(
        vision=dict(width=64, layers=2, heads=4, mlp_ratio=3.0),
        projector=dict(depth=3, mlp_ratio=2),
        language=language_config(
            hidden_size=72, intermediate_size=144, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=3, num_key_value_heads=3, n_shared_experts=1, n_routed_experts=8,
            num_experts_per_tok=2, first_k_dense_replace=1, moe_layer_freq=1, use_mla=True,
            q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
            topk_method="group_limited_greedy", scoring_func="softmax", n_group=4, topk_group=2,
            norm_topk_prob=False, routed_scaling_factor=1.5, max_position_embeddings=2048,
            rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 512,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
        torch_dtype="float32", shards=2, vision_seed=202, language_seed=2000,
        note="use_mla true with q_lora_rank 24 (q_a_proj, q_a_layernorm, q_b_proj); rope_scaling yarn "
             "(factor 4, original 512, mscale = mscale_all_dim = 0.707), max_position_embeddings 2048; "
             "group_limited_greedy softmax, 8 experts in 4 groups, topk_group 2, top-2, "
             "norm_topk_prob false, routed_scaling_factor 1.5; projector depth 3, mlp_ratio 2; F32, 2 shards",
    ),
    # MLA with noaux_tc sigmoid routing over 4 groups, bf16 checkpoint.
    "heldout-mla-noaux-groups": dict(
        vision=dict(width=32, layers=3, heads=4, mlp_ratio=3.5),
        projector=dict(depth=2, mlp_ratio=1),
        language=language_config(
            hidden_size=80, intermediate_size=160, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=16,
            num_experts_per_tok=4, first_k_dense_replace=1, moe_layer_freq=1, use_mla=True,
            q_lora_rank=None, kv_lora_rank=48, qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=12,
            topk_method="noaux_tc", scoring_func="sigmoid", n_group=4, topk_group=2,
            norm_topk_prob=True, routed_scaling_factor=2.5),
        torch_dtype="bfloat16", shards=2, vision_seed=303, language_seed=3000,
        note="use_mla true, kv_lora_rank 48, qk_rope_head_dim 16; noaux_tc sigmoid, 16 experts in 4 "
             "groups, topk_group 2, top-4, norm_topk_prob true, routed_scaling_factor 2.5, non-zero "
             "e_score_correction_bias; BF16 weights, 2 shards",
    ),
}


def init_weights(model, vision_seed, language_seed):
    """Deterministic random weights, same scales as the public fixture models."""
    gv = torch.Generator().manual_seed(vision_seed)
    gl = torch.Generator().manual_seed(language_seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            g = gl if name.startswith("language.") else gv
            n = torch.randn(p.shape, generator=g, dtype=torch.float32)
            last = name.rsplit(".", 1)[-1]
            if name in ("image_newline", "view_seperator"):
                v = n
            elif name == "vision.pos_embed":
                v = 0.3 * n
            elif name.endswith("attn_pool.latent"):
                v = 0.02 * n
            elif name.endswith("embed_tokens.weight"):
                v = n
            elif name.endswith("lm_head.weight"):
                v = 0.5 * n
            elif name.endswith("e_score_correction_bias"):
                v = 0.03 * n
            elif name.endswith("mlp.gate.weight"):
                v = n * (2.0 / math.sqrt(p.shape[1]))
            elif ("norm" in name.rsplit(".", 2)[-2] or "layernorm" in name) and last == "weight":
                v = 1.0 + 0.1 * n
            elif last == "bias":
                v = 0.05 * n
            elif p.dim() >= 2:
                v = n / math.sqrt(p[0].numel())
            else:
                raise ValueError(f"no init rule for {name} {tuple(p.shape)}")
            p.copy_(v)


def write_model(name, spec, seed, out_dir, tok_src):
    from deepseek_vl2.models import DeepseekVLV2ForCausalLM
    from deepseek_vl2.models.modeling_deepseek_vl_v2 import DeepseekVLV2Config

    cfg = model_config(spec["vision"], spec["projector"], spec["language"], spec["torch_dtype"])
    config = DeepseekVLV2Config(**copy.deepcopy(cfg))
    torch.manual_seed(0)
    model = DeepseekVLV2ForCausalLM(config).eval()
    init_weights(model, spec["vision_seed"], seed)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["torch_dtype"]]
    to_save = model.to(dtype)
    total = sum(p.numel() * p.element_size() for p in to_save.state_dict().values())
    shard = total + 1 if spec["shards"] == 1 else total // spec["shards"] + 1
    while True:  # smallest shard size (in steps of 5%) that gives the wanted number of files
        to_save.save_pretrained(out_dir, safe_serialization=True, max_shard_size=shard)
        if len([f for f in os.listdir(out_dir) if f.endswith(".safetensors")]) <= spec["shards"]:
            break
        shutil.rmtree(out_dir)
        os.makedirs(out_dir)
        shard = int(shard * 1.05)
    # The folder is laid out like the official repositories (and the public fixture models):
    # a hand-written config.json, no generation_config.json.
    for f in ("generation_config.json",):
        if os.path.exists(os.path.join(out_dir, f)):
            os.remove(os.path.join(out_dir, f))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for f in ("processor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tok_src, f), os.path.join(out_dir, f))
    n_files = len([f for f in os.listdir(out_dir) if f.endswith(".safetensors")])
    assert n_files == spec["shards"], (name, n_files)


def load_model(model_dir):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, torch_dtype=torch.float32, output_loading_info=True)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[k], (model_dir, k, info[k])
    return model.eval()


def load_processor(model_dir):
    from deepseek_vl2.models import DeepseekVLV2Processor

    proc = DeepseekVLV2Processor.from_pretrained(model_dir)
    assert len(proc.tokenizer) == 3008, len(proc.tokenizer)
    return proc


# --------------------------------------------------------------------------------------------
# Images and cases
# --------------------------------------------------------------------------------------------


def make_images(img_dir):
    """Synthetic, deterministic images (gradients, shapes, a little noise)."""
    from PIL import Image, ImageDraw

    if os.path.exists(img_dir):
        shutil.rmtree(img_dir)  # this folder holds only this script's images
    os.makedirs(img_dir)
    out = {}

    def base(w, h, seed, c0, c1):
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        t = (x / max(w - 1, 1) * 0.35 + y / max(h - 1, 1) * 0.65)[..., None]
        img = np.array(c0, np.float64) * (1 - t) + np.array(c1, np.float64) * t
        img += 18 * np.sin(x / 23.0 + y / 41.0 + rng.uniform(0, 6.28))[..., None]
        return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")

    # 1. tall narrow banner (unusual aspect ratio 1:5.5)
    im = base(200, 1100, 11, (250, 230, 140), (40, 70, 160))
    d = ImageDraw.Draw(im)
    for i, col in enumerate([(200, 30, 30), (30, 150, 60), (240, 240, 240), (20, 20, 20), (120, 40, 160)]):
        y0 = 50 + i * 210
        if i % 2 == 0:
            d.ellipse((35, y0, 165, y0 + 130), fill=col, outline=(0, 0, 0), width=4)
        else:
            d.rectangle((25, y0 + 20, 175, y0 + 120), fill=col)
        d.line((0, y0 + 170, 199, y0 + 155), fill=(255, 255, 255), width=3)
    out["tall"] = "banner_200x1100.png"
    im.save(os.path.join(img_dir, out["tall"]), optimize=True)

    # 2. first image of the two-image conversation: landscape, 1x1 tiles
    im = base(330, 210, 22, (30, 60, 140), (150, 210, 250))
    d = ImageDraw.Draw(im)
    d.ellipse((125, 65, 205, 145), fill=(220, 40, 40), outline=(255, 255, 255), width=4)
    d.polygon([(20, 190), (60, 30), (100, 190)], fill=(250, 200, 40))
    d.rectangle((235, 40, 310, 170), outline=(20, 20, 20), width=6)
    out["shapes"] = "shapes_330x210.png"
    im.save(os.path.join(img_dir, out["shapes"]), optimize=True)

    # 3. second image of the two-image conversation: small, 1x1 tiles, stored as grayscale+alpha
    g = base(150, 190, 33, (60, 60, 60), (230, 230, 230)).convert("L")
    d = ImageDraw.Draw(g)
    d.ellipse((30, 50, 120, 140), fill=250)
    d.rectangle((10, 10, 60, 30), fill=15)
    alpha = Image.fromarray(np.tile(np.linspace(255, 64, 150).astype(np.uint8), (190, 1)), "L")
    la = Image.merge("LA", (g, alpha))
    out["small_la"] = "moon_la_150x190.png"
    la.save(os.path.join(img_dir, out["small_la"]), optimize=True)
    return out


def cases(images):
    im = lambda k: f"{IMAGES_DIR}/{images[k]}"  # noqa: E731
    return {
        "tall_banner": dict(
            note="one tall 200x1100 image (aspect 1:5.5) at the END of the user message -> 1x3 local "
                 "tiles (a vertical grid of 42 rows of 14 tokens + newline); no system prompt",
            conversation=[
                {"role": "<|User|>", "content": "Read the coloured shapes on this narrow banner from top to "
                                                "bottom and name each one.\n<image>",
                 "images": [im("tall")]},
                {"role": "<|Assistant|>", "content": ""},
            ],
            system_prompt="",
        ),
        "two_images_history": dict(
            note="system prompt + two user turns with one image each and an assistant answer in between "
                 "(the second image follows the first answer's eos); cropping on (2 images): 1x1 (landscape, "
                 "330x210) and 1x1 (portrait 150x190, a grayscale+alpha (LA) PNG). The system prompt is in sft_format only",
            conversation=[
                {"role": "<|User|>", "content": "<image>\nHow many shapes are in this picture, and which one "
                                                "is in the middle?", "images": [im("shapes")]},
                {"role": "<|Assistant|>", "content": "Three shapes; a red circle is in the middle."},
                {"role": "<|User|>", "content": "Now look at this one: <image> Is it brighter or darker "
                                                "than the first picture?", "images": [im("small_la")]},
                {"role": "<|Assistant|>", "content": ""},
            ],
            system_prompt="You are a careful visual assistant. Keep every answer under twenty words.",
        ),
        "text_multi_turn": dict(
            note="text only, three user turns with two assistant answers in the history, non-ASCII text "
                 "and a system prompt (in sft_format only); images_spatial_crop [[0,0]]",
            conversation=[
                {"role": "<|User|>", "content": "List three prime numbers greater than 100."},
                {"role": "<|Assistant|>", "content": "101, 103 and 107."},
                {"role": "<|User|>", "content": "Add them together, step by step."},
                {"role": "<|Assistant|>", "content": "101 + 103 = 204; 204 + 107 = 311."},
                {"role": "<|User|>", "content": "  Translate the result into words — en français, s'il "
                                                "vous plaît: 三百一十一?  "},
                {"role": "<|Assistant|>", "content": ""},
            ],
            system_prompt="你是一个乐于助人的助手。Answer in one line.",
        ),
    }


# --------------------------------------------------------------------------------------------
# Running the reference
# --------------------------------------------------------------------------------------------


def sha_u8(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def process(proc, conversation, system_prompt, base_dir):
    from PIL import Image
    from deepseek_vl2.utils.io import load_pil_images

    abs_conv = []
    for m in conversation:
        m = dict(m)
        if "images" in m:
            m["images"] = [os.path.join(base_dir, p) for p in m["images"]]
        abs_conv.append(m)
    pil = load_pil_images(abs_conv)
    one = proc.process_one(conversations=abs_conv, images=pil, system_prompt=system_prompt)
    batch = proc(conversations=abs_conv, images=pil, force_batchify=True, system_prompt=system_prompt)
    assert torch.equal(one.input_ids, batch.input_ids[0])
    assert torch.equal(one.images, batch.images[0])
    info = []
    for m in conversation:
        for p in m.get("images", []):
            src = Image.open(os.path.join(base_dir, p))
            info.append({"file": p, "source_mode": src.mode, "source_format": src.format,
                         "size_wh": list(src.size), "rgb_size_wh": list(src.convert("RGB").size)})
    return batch, one, info


def tiles_u8(images):
    """Float tiles -> u8, checking (u8/255 - 0.5)/0.5 in float32 reproduces them exactly."""
    x = images.to(torch.float32)
    u8 = torch.round((x * 0.5 + 0.5) * 255.0).clamp(0, 255).to(torch.uint8)
    back = (u8.to(torch.float32) / 255.0 - 0.5) / 0.5
    assert torch.equal(back, x), "tile floats are not (u8/255-0.5)/0.5"
    return u8


class GateProbe:
    """Records router inputs; computes the gap between the last chosen and first rejected choice."""

    def __init__(self, model):
        self.gates = []
        self.active = False
        self.expert_gap = math.inf
        self.group_gap = math.inf
        self.handles = []
        for mod in model.modules():
            if type(mod).__name__ == "MoEGate":
                self.handles.append(mod.register_forward_hook(self.hook))

    def hook(self, mod, inp, out):
        if not self.active:
            return
        x = inp[0]
        h = x.shape[-1]
        logits = torch.nn.functional.linear(x.reshape(-1, h).float(), mod.weight.float())
        scores = logits.softmax(-1) if mod.scoring_func == "softmax" else logits.sigmoid()
        n, e = scores.shape
        k = mod.top_k
        if mod.topk_method == "greedy":
            choice = scores
        else:
            base = scores if mod.topk_method == "group_limited_greedy" else scores + mod.e_score_correction_bias.float()
            grouped = base.view(n, mod.n_group, -1)
            if mod.topk_method == "group_limited_greedy":
                gs = grouped.max(-1).values
            else:
                gs = grouped.topk(2, dim=-1).values.sum(-1)
            if mod.topk_group < mod.n_group:
                gsort = gs.sort(-1, descending=True).values
                gap = float((gsort[:, mod.topk_group - 1] - gsort[:, mod.topk_group]).min())
                self.group_gap = min(self.group_gap, gap)
            keep = torch.zeros_like(gs, dtype=torch.bool)
            keep.scatter_(1, gs.topk(mod.topk_group, dim=-1).indices, True)
            choice = base.masked_fill(~keep.repeat_interleave(e // mod.n_group, dim=1), 0.0)
        s = choice.sort(-1, descending=True)
        self.expert_gap = min(self.expert_gap, float((s.values[:, k - 1] - s.values[:, k]).min()))
        # consistency with what the reference chose
        ours = s.indices[:, :k].sort(-1).values
        theirs = out[0].reshape(n, k).sort(-1).values
        assert torch.equal(ours, theirs), "router probe disagrees with the reference's choice"

    def remove(self):
        for hd in self.handles:
            hd.remove()


def forward_case(model, batch, n_steps, tokens=None, dtype=torch.float32, probe=None):
    """Prefill + cached greedy decode (or teacher-forced with `tokens`) through the reference."""
    images = batch.images.to(dtype)
    crop = batch.images_spatial_crop
    res = {}
    with torch.no_grad():
        has_images = bool(crop.sum() > 0)
        if has_images:
            n_tiles = int(sum(1 + w * h for w, h in crop[0].tolist() if w > 0 and h > 0))
            feats = model.vision(images[0, :n_tiles])
            res["vision_features"] = feats
            res["projector_out"] = model.projector(feats)
        embeds = model.prepare_inputs_embeds(
            input_ids=batch.input_ids, images=images, images_seq_mask=batch.images_seq_mask,
            images_spatial_crop=crop)
        res["inputs_embeds"] = embeds[0]
        mask = batch.attention_mask
        if probe is not None:
            probe.active = True
        out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, output_hidden_states=True,
                    return_dict=True)
        res["prefill_hidden_last"] = torch.stack([hs[0, -1] for hs in out.hidden_states])
        logits = [out.logits[0, -1]]
        past = out.past_key_values
        gen = [int(torch.argmax(logits[0].float()))]
        emb = model.language.get_input_embeddings()
        for i in range(1, n_steps):
            tok = tokens[i - 1] if tokens is not None else gen[-1]
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            out = model(inputs_embeds=emb(torch.tensor([[tok]])), attention_mask=mask, past_key_values=past,
                        use_cache=True, return_dict=True)
            past = out.past_key_values
            logits.append(out.logits[0, -1])
            gen.append(int(torch.argmax(logits[-1].float())))
        if probe is not None:
            probe.active = False
        res["step_logits"] = torch.stack(logits)
        res["prefill_last_logits"] = logits[0]
    return res, gen


def official_generate(model, proc, batch, n_steps):
    tok = proc.tokenizer
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(
            input_ids=batch.input_ids, images=batch.images, images_seq_mask=batch.images_seq_mask,
            images_spatial_crop=batch.images_spatial_crop)
        out = model.generate(
            inputs_embeds=embeds, input_ids=batch.input_ids, images=batch.images,
            images_seq_mask=batch.images_seq_mask, images_spatial_crop=batch.images_spatial_crop,
            attention_mask=batch.attention_mask, pad_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, max_new_tokens=n_steps, do_sample=False, use_cache=True)
    ids = out[0].tolist()
    if len(ids) > n_steps or ids[: batch.input_ids.shape[1]] == batch.input_ids[0].tolist():
        ids = ids[batch.input_ids.shape[1]:]
    return ids


def noise(ours, ref):
    out = {}
    for k in ("inputs_embeds", "step_logits", "prefill_hidden_last", "vision_features", "projector_out"):
        if k not in ours:
            continue
        a = ours[k].double()
        b = ref[k].double()
        d = float((a - b).abs().max())
        m = float(b.abs().max())
        out[k] = {"max_abs": d, "max_rel_to_absmax": d / m, "ref_absmax": m}
    return out


def rope_info(model):
    attn = model.language.model.layers[0].self_attn
    rot = attn.rotary_emb
    inv = rot.inv_freq.float()
    info = {"class": type(rot).__name__, "dim": int(rot.dim), "inv_freq": [float(v) for v in inv],
            "inv_freq_f32_hex": ["0x%08x" % struct.unpack("<I", struct.pack("<f", float(v)))[0] for v in inv]}
    if hasattr(attn, "softmax_scale"):
        info["softmax_scale"] = float(attn.softmax_scale)
    else:
        info["softmax_scale"] = 1.0 / math.sqrt(attn.head_dim)
    if type(rot).__name__ == "DeepseekV2YarnRotaryEmbedding":
        from deepseek_vl2.models.modeling_deepseek import yarn_get_mscale

        info["yarn"] = {
            "factor": rot.scaling_factor, "original_max_position_embeddings": rot.original_max_position_embeddings,
            "beta_fast": rot.beta_fast, "beta_slow": rot.beta_slow, "mscale": rot.mscale,
            "mscale_all_dim": rot.mscale_all_dim,
            "cos_sin_scale": float(yarn_get_mscale(rot.scaling_factor, rot.mscale)
                                   / yarn_get_mscale(rot.scaling_factor, rot.mscale_all_dim)),
        }
    return info


def run_variant(model, proc, batch, n_steps, full=True):
    """Everything for one case and model; `full` adds the float64 / 1-thread noise and generate()."""
    t0 = time.time()
    probe = GateProbe(model)
    try:
        res, gen = forward_case(model, batch, n_steps, probe=probe)
    finally:
        probe.remove()
    sl = res["step_logits"]
    top2 = sl.topk(2, dim=-1).values
    margins = [float(v) for v in (top2[:, 0] - top2[:, 1])]
    assert gen == [int(v) for v in sl.argmax(-1)]
    stats = {
        "generated_ids": gen,
        "greedy_margins": margins,
        "min_greedy_margin": min(margins),
        "min_router_expert_gap": None if probe.expert_gap == math.inf else probe.expert_gap,
        "min_router_group_gap": None if probe.group_gap == math.inf else probe.group_gap,
    }
    if not full:
        return res, stats
    # float64 (keeps the reference's explicit float32 casts), teacher-forced with the f32 tokens
    # (the default dtype must be float64 too: transformers builds the causal mask with torch.full)
    m64 = copy.deepcopy(model).double()
    torch.set_default_dtype(torch.float64)
    try:
        r64, _ = forward_case(m64, batch, n_steps, tokens=gen, dtype=torch.float64)
    finally:
        torch.set_default_dtype(torch.float32)
    del m64
    torch.set_num_threads(1)
    try:
        r1, _ = forward_case(model, batch, n_steps, tokens=gen)
    finally:
        torch.set_num_threads(THREADS)
    stats["noise_vs_float64"] = noise(res, r64)
    stats["noise_vs_1_thread"] = noise(res, r1)
    stats["official_generate_ids"] = official_generate(model, proc, batch, n_steps)
    stats["seconds"] = round(time.time() - t0, 2)
    return res, stats


def ok(stats):
    gaps = [g for g in (stats["min_router_expert_gap"], stats["min_router_group_gap"]) if g is not None]
    return stats["min_greedy_margin"] >= MIN_MARGIN and all(g >= MIN_ROUTER_GAP for g in gaps)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def save_tensors(path, tensors):
    from safetensors.torch import save_file

    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}, path)


def dump_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=True)
        f.write("\n")


def versions():
    import PIL
    import safetensors
    import timm
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "timm": timm.__version__, "pillow": PIL.__version__,
            "numpy": np.__version__, "safetensors": safetensors.__version__, "reference_commit": REFERENCE_COMMIT}


def generate_all(out_root, only_models=None):
    from PIL import Image

    tok_src = os.path.join(FIXTURES, "models", "tiny-like")
    images = make_images(os.path.join(out_root, IMAGES_DIR))
    case_specs = cases(images)
    models_root = os.path.join(out_root, "models")
    cases_root = os.path.join(out_root, "cases")
    os.makedirs(cases_root, exist_ok=True)
    index_path = os.path.join(cases_root, "index.json")
    fresh = not only_models or not os.path.exists(index_path)
    index = {"model_cases": {}} if fresh else json.load(open(index_path))
    index.setdefault("model_cases", {})

    proc = load_processor(tok_src)
    batches = {}
    for case, spec in case_specs.items():
        cdir = os.path.join(cases_root, case)
        if fresh and os.path.exists(cdir):
            shutil.rmtree(cdir)
        os.makedirs(cdir, exist_ok=True)
        batch, one, info = process(proc, spec["conversation"], spec["system_prompt"], out_root)
        batches[case] = batch
        ids = batch.input_ids[0].tolist()
        crop = batch.images_spatial_crop[0].tolist()
        pj = {
            "sft_format": batch.sft_format[0],
            "input_ids": ids,
            "seq_len": len(ids),
            "images_seq_mask": [int(v) for v in batch.images_seq_mask[0].tolist()],
            "images_spatial_crop": crop,
            "num_image_tokens": list(one.num_image_tokens),
            "n_tiles": int(batch.images.shape[1]),
            "images_shape": list(batch.images.shape[1:]),
            "cropping": len(info) <= 2,
            "images": info,
        }
        assert batch.attention_mask.all()
        tdir = os.path.join(cdir, "tiles")
        if os.path.exists(tdir):
            shutil.rmtree(tdir)
        if info:
            u8 = tiles_u8(batch.images[0])
            os.makedirs(tdir)
            tiles = []
            for i, t in enumerate(u8):
                png = f"tiles/tile_{i:02d}.png"
                Image.fromarray(t.permute(1, 2, 0).numpy(), "RGB").save(os.path.join(cdir, png), optimize=True)
                back = np.asarray(Image.open(os.path.join(cdir, png)).convert("RGB")).transpose(2, 0, 1)
                assert np.array_equal(back, t.numpy())
                tiles.append({"png": png, "sha256_chw_u8": sha_u8(t.numpy())})
            pj["tiles"] = tiles
        dump_json(os.path.join(cdir, "processor.json"), pj)
        inp = {"id": case, "note": spec["note"], "conversation": spec["conversation"],
               "system_prompt": spec["system_prompt"], "variants": list(MODELS),
               "max_new_tokens": MAX_NEW_TOKENS, "decoding": "greedy, no early stop at eos"}
        dump_json(os.path.join(cdir, "input.json"), inp)
        print(f"{case}: seq_len {len(ids)}, crop {crop}, tiles {pj['n_tiles']}", flush=True)

    chosen = {}
    for name, spec in MODELS.items():
        if only_models and name not in only_models:
            continue
        mdir = os.path.join(models_root, name)
        seed = spec["language_seed"]
        while True:
            write_model(name, spec, seed, mdir, tok_src)
            model = load_model(mdir)
            worst = []
            good = True
            for case, batch in batches.items():
                _, st = run_variant(model, proc, batch, MAX_NEW_TOKENS, full=False)
                worst.append((case, st["min_greedy_margin"], st["min_router_expert_gap"], st["min_router_group_gap"]))
                if not ok(st):
                    good = False
                    break
            print(f"{name}: language seed {seed}: {'ok' if good else 'rejected'} {worst}", flush=True)
            if good:
                break
            seed += 1
        chosen[name] = seed
        rope = rope_info(model)
        for case, batch in batches.items():
            cdir = os.path.join(cases_root, case)
            res, st = run_variant(model, proc, batch, MAX_NEW_TOKENS, full=True)
            assert ok(st)
            gen = st["generated_ids"]
            eos = proc.tokenizer.eos_token_id
            eos_index = gen.index(eos) if eos in gen else None
            off = st["official_generate_ids"]
            upto = (eos_index + 1) if eos_index is not None else len(gen)
            assert off == gen[:upto], (name, case, off, gen)
            if "vision_features" in res:
                save_tensors(os.path.join(cdir, f"vision-{name}.safetensors"),
                             {"vision_features": res["vision_features"], "projector_out": res["projector_out"]})
            save_tensors(os.path.join(cdir, f"{name}.safetensors"),
                         {k: res[k] for k in ("inputs_embeds", "prefill_last_logits", "step_logits",
                                              "prefill_hidden_last")})
            assert torch.equal(res["step_logits"][0], res["prefill_last_logits"])
            vj = {
                "variant": name,
                "seq_len": int(batch.input_ids.shape[1]),
                "generated_ids": gen,
                "generated_text": proc.tokenizer.decode(gen, skip_special_tokens=False),
                "generated_text_skip_special": proc.tokenizer.decode(gen, skip_special_tokens=True),
                "eos_index": eos_index,
                "official_generate_ids": off,
                "greedy_margins": st["greedy_margins"],
                "min_greedy_margin": st["min_greedy_margin"],
                "min_router_expert_gap": st["min_router_expert_gap"],
                "min_router_group_gap": st["min_router_group_gap"],
                "noise_vs_float64": st["noise_vs_float64"],
                "noise_vs_1_thread": st["noise_vs_1_thread"],
                "rope": rope,
                "seconds": st["seconds"],
            }
            dump_json(os.path.join(cdir, f"{name}.json"), vj)
            entry = index["model_cases"].setdefault(case, {"variants": {}})
            entry["variants"][name] = {
                "min_greedy_margin": st["min_greedy_margin"],
                "min_router_expert_gap": st["min_router_expert_gap"],
                "min_router_group_gap": st["min_router_group_gap"],
                "eos_index": eos_index,
                "max_step_logit_diff_f64": st["noise_vs_float64"]["step_logits"]["max_abs"],
            }
            print(f"  {name} {case}: margin {st['min_greedy_margin']:.3g} expert gap {st['min_router_expert_gap']} "
                  f"group gap {st['min_router_group_gap']} f64 {vj['noise_vs_float64']['step_logits']['max_abs']:.2e} "
                  f"gen {gen}", flush=True)
        del model
    index["versions"] = versions()
    index.setdefault("models", {})
    for name, seed in chosen.items():
        spec = MODELS[name]
        index["models"][name] = {"vision_seed": spec["vision_seed"], "language_seed": seed,
                                 "torch_dtype": spec["torch_dtype"], "shards": spec["shards"], "note": spec["note"]}
    index["max_new_tokens"] = MAX_NEW_TOKENS
    index["acceptance"] = {"min_greedy_margin": MIN_MARGIN, "min_router_gap": MIN_ROUTER_GAP}
    dump_json(index_path, index)
    for sub in ("models", "cases", IMAGES_DIR):  # safetensors writes 0600 files
        for d, _, files in os.walk(os.path.join(out_root, sub)):
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)


def check_public():
    """Reproduces public fixture cases with this script's pipeline (should be bit-identical)."""
    from safetensors.torch import load_file

    for variant, case in (("tiny-like", "text_only"), ("small-like", "single_small"), ("base-like", "multi_turn_system")):
        mdir = os.path.join(FIXTURES, "models", variant)
        cdir = os.path.join(FIXTURES, "cases", case)
        model = load_model(mdir)
        proc = load_processor(mdir)
        spec = json.load(open(os.path.join(cdir, "input.json")))
        batch, _, _ = process(proc, spec["conversation"], spec["system_prompt"], FIXTURES)
        pj = json.load(open(os.path.join(cdir, "processor.json")))
        assert batch.input_ids[0].tolist() == pj["input_ids"]
        res, st = run_variant(model, proc, batch, spec["max_new_tokens"], full=False)
        gold = load_file(os.path.join(cdir, f"{variant}.safetensors"))
        vj = json.load(open(os.path.join(cdir, f"{variant}.json")))
        msg = [f"{variant}/{case}: ids equal {st['generated_ids'] == vj['generated_ids']}"]
        for k, v in gold.items():
            msg.append(f"{k} maxdiff {float((res[k] - v).abs().max()):.3g}")
        if "vision_features" in res:
            vis = load_file(os.path.join(cdir, "vision.safetensors"))
            for k, v in vis.items():
                msg.append(f"{k} maxdiff {float((res[k] - v).abs().max()):.3g}")
        msg.append(f"margin {st['min_greedy_margin']:.6g} vs {vj['min_greedy_margin']:.6g}, expert gap "
                   f"{st['min_router_expert_gap']} vs {vj['min_router_expert_gap']}")
        print(", ".join(msg), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default=os.environ.get("DSVL2_REF"), help="DeepSeek-VL2 checkout (adds it to sys.path)")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--check-public", action="store_true")
    ap.add_argument("--models", nargs="*", help="only these models (default: all)")
    args = ap.parse_args()
    if args.ref:
        sys.path.insert(0, os.path.abspath(args.ref))
    torch.set_num_threads(THREADS)
    import deepseek_vl2.models  # noqa: F401  (registers the model classes with transformers)
    from xformers.ops import memory_efficient_attention  # noqa: F401  (must be importable)

    if args.check_public:
        check_public()
    else:
        generate_all(args.out, args.models)


if __name__ == "__main__":
    main()
