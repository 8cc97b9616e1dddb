#!/usr/bin/env python3
"""Time the OFFICIAL DeepSeek-VL2 PyTorch implementation on CPU, float32.

Stages (each timed with time.perf_counter; medians over --runs):
  import_s   torch + transformers + deepseek_vl2 imports (measured from the first line of this script)
  load_s     script start -> processor + model loaded (includes import_s); model_load_s excludes imports
  preprocess PIL load + DeepseekVLV2Processor(...) call
  vision     model.prepare_inputs_embeds (SigLIP tower + projector + 2D layout/scatter)
  prefill    one model.forward(inputs_embeds, attention_mask, use_cache=True) -> first token (argmax)
  decode     N-1 cached forwards on the argmax token (exactly N new tokens in total, EOS ignored);
             decode_tokens_per_s = (N-1)/decode_s, the same convention as `dsvl2 generate --json`
  request_s  preprocess + vision + prefill + decode
Prints ONE JSON object on stdout (progress notes on stderr).

The official code is used unmodified. Its SigLIP attention imports xformers'
memory_efficient_attention (GPU-only); when xformers cannot be imported, a plain-PyTorch
module with the same semantics (softmax(q k^T / sqrt(head_dim)) v, no mask, [B, M, H, K]
layout) is registered under the name `xformers.ops` -- the same substitution that was used to
produce the golden fixtures (tests/fixtures/README.md).
"""
import time

T0 = time.perf_counter()  # as early as possible: everything below counts towards load_s

import argparse
import json
import os
import resource
import statistics
import sys
import types


def _python_startup_s():
    """Seconds from process creation (kernel start time) to T0; 10 ms resolution."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 (starttime), counted after "pid (comm)"
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        hz = os.sysconf("SC_CLK_TCK")
        now_since_boot = uptime - (time.perf_counter() - T0)
        return max(0.0, now_since_boot - start_ticks / hz)
    except Exception:
        return None


PY_STARTUP_S = _python_startup_s()

# The official code prints notes (added tokens, attrdict patch, ...) to stdout: send every print
# to stderr so that stdout carries only the final JSON object.
_REAL_STDOUT = sys.stdout
sys.stdout = sys.stderr

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--model", required=True, help="model folder in the official HF layout")
ap.add_argument("--image", required=True, help="image file (one <image> tag in --prompt)")
ap.add_argument("--prompt", default="<image>\nDescribe each stage of this image in detail.")
ap.add_argument("--max-new-tokens", type=int, default=32)
ap.add_argument("--runs", type=int, default=3)
ap.add_argument("--threads", type=int, default=0, help="torch threads (default: os.cpu_count())")
ap.add_argument("--official-src", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "DeepSeek-VL2"),
                help="folder of the official repository (put on sys.path)")
args = ap.parse_args()
if args.max_new_tokens < 1 or args.runs < 1:
    ap.error("--max-new-tokens and --runs must be >= 1")


def note(msg):
    print(f"[time_official {time.perf_counter() - T0:8.2f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- imports
t_imp = time.perf_counter()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

XFORMERS = "real"
try:
    import xformers.ops  # noqa: F401
except Exception:
    XFORMERS = "plain-pytorch shim (F.scaled_dot_product_attention)"

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, **_):
        # xformers layout: [B, M, H, K] in and out; default scale 1/sqrt(K); no mask here.
        assert attn_bias is None and p == 0.0, "shim only covers the inference path of siglip_vit.py"
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, M, K]
        if scale is not None:
            q = q * (scale * q.shape[-1] ** 0.5)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2)

    _xf = types.ModuleType("xformers")
    _xf_ops = types.ModuleType("xformers.ops")
    _xf_ops.memory_efficient_attention = memory_efficient_attention
    _xf.ops = _xf_ops
    sys.modules["xformers"] = _xf
    sys.modules["xformers.ops"] = _xf_ops

if args.official_src and os.path.isdir(args.official_src) and args.official_src not in sys.path:
    sys.path.insert(0, args.official_src)
import transformers  # noqa: E402
import PIL  # noqa: E402
import PIL.Image  # noqa: E402
from deepseek_vl2.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor  # noqa: E402
from deepseek_vl2.utils.io import load_pil_images  # noqa: E402

import_s = time.perf_counter() - t_imp

threads = args.threads or os.cpu_count()
torch.set_num_threads(threads)
torch.set_grad_enabled(False)

# ---------------------------------------------------------------- load
note(f"imports {import_s:.2f}s; loading {args.model} (float32, {threads} threads)")
t_load = time.perf_counter()
processor = DeepseekVLV2Processor.from_pretrained(args.model)
tokenizer = processor.tokenizer
model = DeepseekVLV2ForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
model = model.eval()
t_loaded = time.perf_counter()
model_load_s = t_loaded - t_load
load_s = t_loaded - T0
note(f"loaded in {model_load_s:.2f}s (attn_implementation={model.config._attn_implementation})")

conversation = [
    {"role": "<|User|>", "content": args.prompt, "images": [args.image]},
    {"role": "<|Assistant|>", "content": ""},
]
N = args.max_new_tokens


def one_run():
    r = {}
    # -- preprocess: image file -> ids, mask, tiles
    t = time.perf_counter()
    pil_images = load_pil_images(conversation)
    inputs = processor(conversations=conversation, images=pil_images, force_batchify=True, system_prompt="")
    inputs = inputs.to("cpu", dtype=torch.float32)
    r["preprocess_s"] = time.perf_counter() - t

    # -- vision: tower + projector + layout into the embedding sequence
    t = time.perf_counter()
    inputs_embeds = model.prepare_inputs_embeds(
        input_ids=inputs.input_ids,
        images=inputs.images,
        images_seq_mask=inputs.images_seq_mask,
        images_spatial_crop=inputs.images_spatial_crop,
    )
    r["vision_s"] = time.perf_counter() - t

    # -- prefill: one forward over the whole prompt, KV cache on
    attention_mask = inputs.attention_mask.long()
    t = time.perf_counter()
    out = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=True, return_dict=True)
    next_tok = out.logits[:, -1, :].argmax(dim=-1)
    r["prefill_s"] = time.perf_counter() - t
    past = out.past_key_values
    tokens = [int(next_tok[0])]

    # -- decode: N-1 cached steps on the argmax token (EOS ignored)
    t = time.perf_counter()
    for _ in range(N - 1):
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((1, 1))], dim=1)
        emb = model.language.get_input_embeddings()(next_tok[:, None])
        out = model(inputs_embeds=emb, attention_mask=attention_mask, past_key_values=past,
                    use_cache=True, return_dict=True)
        past = out.past_key_values
        next_tok = out.logits[:, -1, :].argmax(dim=-1)
        tokens.append(int(next_tok[0]))
    r["decode_s"] = time.perf_counter() - t
    r["t_last_token"] = time.perf_counter()
    r["request_s"] = r["preprocess_s"] + r["vision_s"] + r["prefill_s"] + r["decode_s"]
    r["tokens"] = tokens
    r["prompt_tokens"] = int(inputs.input_ids.shape[1])
    r["prompt_token_ids"] = inputs.input_ids[0].tolist()
    r["n_tiles"] = int(inputs.images.shape[1]) if inputs.images is not None else 0
    r["images_spatial_crop"] = inputs.images_spatial_crop[0].tolist()
    r["image_tokens"] = int(inputs.images_seq_mask.sum())
    return r


runs = []
for i in range(args.runs):
    r = one_run()
    runs.append(r)
    note(f"run {i + 1}/{args.runs}: pre {r['preprocess_s']:.3f}s vision {r['vision_s']:.3f}s "
         f"prefill {r['prefill_s']:.3f}s decode {r['decode_s']:.3f}s tokens {r['tokens']}")

first = runs[0]
med = lambda k: statistics.median(x[k] for x in runs)  # noqa: E731
decode_s = med("decode_s")
prefill_s = med("prefill_s")
report = {
    "impl": "official DeepSeek-VL2 PyTorch (github.com/deepseek-ai/DeepSeek-VL2), float32, CPU",
    "model": os.path.abspath(args.model),
    "image": os.path.abspath(args.image),
    "prompt": args.prompt,
    "max_new_tokens": N,
    "runs": args.runs,
    "threads": threads,
    "cpu_count": os.cpu_count(),
    "python_startup_s": PY_STARTUP_S,
    "import_s": import_s,
    "model_load_s": model_load_s,
    "load_s": load_s,
    "process_start_to_loaded_s": (PY_STARTUP_S or 0.0) + load_s,
    "preprocess_s": med("preprocess_s"),
    "vision_s": med("vision_s"),
    "prefill_s": prefill_s,
    "decode_s": decode_s,
    "request_s": med("request_s"),
    "prompt_tokens": first["prompt_tokens"],
    "n_tiles": first["n_tiles"],
    "images_spatial_crop": first["images_spatial_crop"],
    "image_tokens": first["image_tokens"],
    "prefill_tokens_per_s": first["prompt_tokens"] / max(prefill_s, 1e-9),
    "decode_tokens_per_s": (N - 1) / decode_s if N > 1 else None,
    "process_to_last_token_s": (PY_STARTUP_S or 0.0) + (first["t_last_token"] - T0),
    "script_start_to_last_token_s": first["t_last_token"] - T0,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "output_tokens": first["tokens"],
    "prompt_token_ids": first["prompt_token_ids"],
    "output_tokens_same_every_run": all(r["tokens"] == first["tokens"] for r in runs),
    "text": tokenizer.decode(first["tokens"], skip_special_tokens=False),
    "per_run": [{k: v for k, v in r.items() if k.endswith("_s")} for r in runs],
    "attn_implementation": model.config._attn_implementation,
    "xformers": XFORMERS,
    "versions": {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "Pillow": PIL.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
    },
}
print(json.dumps(report), file=_REAL_STDOUT, flush=True)
