"""The upstream (PyTorch) side of `benchmarks/release_scale.py`: one stage of the upstream IXC2.5 code on a
checkpoint in the hub's layout, in its own process, answering with one JSON line.

Runs under the upstream venv (torch 2.14.1, torchvision 0.29.1, transformers 4.33.2: made by
`tools/reference/setup_upstream_env.sh`), never under MindSpore's:

    /work/venv-ref/bin/python benchmarks/upstream_release_worker.py --upstream /work/upstream/base \\
        --checkpoint CKPT_DIR --stage vit --image photo.jpg --hd-num 24 --out emb.npy [--threads T]

    /work/venv-ref/bin/python benchmarks/upstream_release_worker.py --upstream /work/upstream/base \\
        --checkpoint CKPT_DIR --stage decode --dtype bf16 --prompt prompt.npz --new-tokens 32 [--threads T]

CKPT_DIR holds config.json, vision_config.json (the CLIP config) and the weights by upstream name:
`pytorch_model-0000i-of-0000n.bin` + `pytorch_model.bin.index.json`, or one `pytorch_model.bin`. The shards
are opened with `torch.load(mmap=True)`: a tensor costs memory only once it is read.

The reply is the one stdout line starting with `@@bench ` (libraries print freely around it), as in
`benchmarks/decode_benchmark.py`; errors go to stderr with a non-zero exit code.

--stage vit: upstream fp32 eager, as `model.encode_img(path, hd_num)` runs it (upstream's `Image.open`,
  `Image_transform`, `vis_processor`, then `img2emb`: the CLIP tower, the HD merge with `plora_glb_GN` /
  `plora_sub_GN`, `vision_proj`). Only those modules are built (the LLM is not), from the checkpoint's
  tensors widened to fp32. Saves the embeddings [T, hidden] float32 to --out. Reply: seconds with and
  without the image transform, image tokens T, crops (tiles + the global view), peak RSS, threads.
  Checked first as for decode (below): the vision weights and all crops' eager attention must fit.
--stage decode: the whole upstream model (LLM, ViT, projector, PLoRA; the task LoRAs `lora_web/sft/dpo`,
  which the upstream OmniLive code lacks, are dropped) in --dtype (bf16: the release's dtype, as
  `from_pretrained(torch_dtype=torch.bfloat16)` builds it; fp32 for checks). PROMPT.npz holds
  `inputs_embeds` [1, L, hidden] float32 and `im_mask` [1, L] bool. Before anything is allocated, the bytes
  needed (weights read + KV cache + the eager prefill's largest activations) are compared with
  MemAvailable: if they do not fit with 1.5 GB to spare, the reply is {"fits": false, "needed_gb",
  "available_gb", ...} and the exit code 0. Otherwise the prompt is prefilled as transformers' `generate`
  calls the model (inputs_embeds, all-ones attention mask, position ids, use_cache=True, im_mask, logits
  of every position), then --new-tokens greedy steps feed one id at a time with past_key_values and the
  prompt's im_mask. Reply: prefill seconds, median decode ms/token (first step excluded), `ids` (ids[0]
  from the prefill, ids[i] from step i: new_tokens + 1 ids), peak RSS, torch threads.
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (REPO, os.path.join(REPO, "tools", "reference")):
    if p not in sys.path:
        sys.path.insert(0, p)

MARK = "@@bench "  # as benchmarks/decode_benchmark.py: the reply is the stdout line carrying this prefix
SPARE_BYTES = int(1.5 * 2 ** 30)
# Which tensors each stage reads; everything else in the checkpoint is never touched (mmap).
VISION_PREFIXES = ("vit.", "vision_proj.", "plora_glb_GN", "plora_sub_GN")
TASK_LORA_MARKS = (".lora_web_", ".lora_sft_", ".lora_dpo_")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def _reply(obj):
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mem_available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


# ------------------------------------------------------------------------------------------- checkpoint
def shard_files(ckpt_dir):
    index = os.path.join(ckpt_dir, "pytorch_model.bin.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map")
        names = sorted(set(weight_map.values()))
        return [os.path.join(ckpt_dir, n) for n in names]
    single = os.path.join(ckpt_dir, "pytorch_model.bin")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{ckpt_dir}: no pytorch_model.bin.index.json or pytorch_model.bin "
                            f"(the hub layout of the release)")


def open_checkpoint(ckpt_dir):
    """{upstream name: tensor} over every shard, memory-mapped: nothing is read until used."""
    import torch

    state = {}
    for path in shard_files(ckpt_dir):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: named by the index but absent")
        part = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        dup = set(part) & set(state)
        if dup:
            raise ValueError(f"{path}: keys also in another shard: {sorted(dup)[:5]}")
        state.update(part)
    return state


class _Shapes:
    """The two calls `mindxcomposer.weights.sizes_from_weights` makes of a checkpoint."""

    def __init__(self, state):
        self.state = state

    def __contains__(self, name):
        return name in self.state

    def shape(self, name):
        return tuple(self.state[name].shape)


def checkpoint_config(ckpt_dir, state, task_loras):
    """Our config object for the checkpoint (what `upstream.py` sizes the upstream modules from): config.json,
    vision_config.json, and the sizes config.json does not carry, read off the weight shapes."""
    from mindxcomposer.configuration import InternLMXComposer2Config
    from mindxcomposer.weights import sizes_from_weights

    config = InternLMXComposer2Config.from_pretrained(ckpt_dir)
    for k, v in sizes_from_weights(_Shapes(state)).items():
        setattr(config, k, v)
    if not task_loras:
        config.task_lora_ranks = {}
    return config


# ------------------------------------------------------------------------------------- model building
@contextlib.contextmanager
def _empty_modules(up, dtype, with_llm=True):
    """Construct modules without allocating or initialising their parameters (meta device) in `dtype`, as
    `from_pretrained(torch_dtype=dtype)` sets the default dtype; the modules whose *buffers* are computed
    at construction and never loaded (CLIP's position ids; the RoPE caches unless `with_llm` is False,
    the LLM being dropped unbuilt then) are still built on the CPU."""
    import torch
    from transformers.models.clip import modeling_clip

    classes = [modeling_clip.CLIPVisionEmbeddings] + [
        c for c in vars(up.modeling_internlm2).values()
        if with_llm and isinstance(c, type) and c.__name__.endswith("RotaryEmbedding")]
    originals = {c: c.__dict__["__init__"] for c in classes if "__init__" in c.__dict__}

    def on_cpu(init):
        def wrapped(self, *a, **kw):
            with torch.device("cpu"):
                init(self, *a, **kw)
        return wrapped

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    for c, init in originals.items():
        c.__init__ = on_cpu(init)
    try:
        with torch.device("meta"):
            yield
    finally:
        for c, init in originals.items():
            c.__init__ = init
        torch.set_default_dtype(previous)


def _load_assign(module, state):
    """Load by assignment (the checkpoint's tensors become the parameters: no copy) and make sure no
    parameter or buffer is left unloaded."""
    result = module.load_state_dict(state, strict=False, assign=True)
    missing = result.missing_keys
    if missing or result.unexpected_keys:
        raise RuntimeError(f"the checkpoint does not fit the upstream model: missing {missing[:10]}, "
                           f"unexpected {result.unexpected_keys[:10]}")
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"left unloaded: {left[:10]}")


def _upstream_shell(up, config, dtype, with_llm=True):
    """Upstream's InternLMXComposer2ForCausalLM for `config`, its parameters not allocated yet."""
    import torch
    from torch import nn
    import upstream as U

    with U._sized_for(up, config), _empty_modules(up, dtype, with_llm):
        model = up.modeling_xcomposer2.InternLMXComposer2ForCausalLM(U.upstream_config(up, config))
        merged = config.vision_merged_size  # upstream hard-codes 4096 (4 x the release's ViT width)
        model.plora_glb_GN = nn.Parameter(torch.zeros([1, 1, merged]))
        model.plora_sub_GN = nn.Parameter(torch.zeros([1, 1, 1, merged]))
    del model.video_mem_proj  # OmniLive-only: plain IXC2.5 has no such module (as upstream.load_upstream)
    return model


def build_vision(up, config, state):
    """Upstream's model with only what `encode_img` uses (CLIP tower, `vision_proj`, `plora_glb_GN`,
    `plora_sub_GN`, `vis_processor`) loaded, in fp32 from the checkpoint's tensors (bf16 -> fp32 is exact).
    The LLM and the output head are removed unallocated: the 7.7B are never built."""
    import torch

    model = _upstream_shell(up, config, torch.float32, with_llm=False)
    del model.model, model.output  # also makes `model.device` (its first parameter's) the CPU
    wanted = {k: v.float() for k, v in state.items() if k.startswith(VISION_PREFIXES)}
    _load_assign(model, wanted)
    return model.eval()


def build_causal_lm(up, config, state, dtype):
    """The whole upstream InternLMXComposer2ForCausalLM in `dtype`, its parameters being the checkpoint's
    memory-mapped tensors (cast only when `dtype` differs from the checkpoint's), eval mode, eager attention.
    The task LoRAs are left out (the OmniLive code has no place for them)."""
    model = _upstream_shell(up, config, dtype)
    wanted = {k: (v if v.dtype == dtype else v.to(dtype)) for k, v in state.items()
              if not any(m in k for m in TASK_LORA_MARKS)}
    _load_assign(model, wanted)
    return model.eval()


# ------------------------------------------------------------------------------------------ estimates
def current_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def decode_bytes_needed(config, state, prompt_len, new_tokens, dtype):
    """Bytes the decode stage will hold at its peak, by part:
    - weights: the tensors read (task LoRAs excluded) in `dtype`; when `dtype` is not the checkpoint's, the
      memory-mapped source pages are read too and stay resident beside the cast copies while loading;
    - kv_cache: keys and values of every layer for the prompt and the new tokens;
    - activations: the largest transient of the eager prefill: one layer's attention scores [heads, L, L]
      (the product in `dtype` alive while the fp32 softmax is made, or while it is scaled) plus the
      [L, L] causal mask, or the logits of every position (in `dtype`, then `.float()`), or the MLP's
      [L, intermediate] products; plus the hidden states;
    - runtime: this process's resident memory now (interpreter, torch, transformers, the prompt)."""
    import torch

    d = torch.finfo(dtype).bits // 8
    wanted = [v for k, v in state.items() if not any(m in k for m in TASK_LORA_MARKS)]
    weights = sum(v.numel() * d + (v.numel() * v.element_size() if v.dtype != dtype else 0) for v in wanted)
    h, nh, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    layers, inter, vocab = config.num_hidden_layers, config.intermediate_size, config.vocab_size
    L, head_dim = prompt_len, config.hidden_size // config.num_attention_heads
    kv_cache = 2 * layers * (prompt_len + new_tokens + 1) * kv * head_dim * d
    scores = nh * L * L * (d + max(d, 4)) + L * L * (d + 4)
    logits = L * vocab * (d + (4 if d != 4 else 0))
    mlp = 3 * L * inter * d + L * (nh + 2 * kv) * head_dim * d
    activations = max(scores, logits, mlp) + 4 * L * h * max(d, 4)
    runtime = current_rss_bytes()
    return dict(weights=weights, kv_cache=kv_cache, activations=activations, runtime=runtime,
                total=weights + kv_cache + activations + runtime)


def vit_bytes_needed(config, state, crops):
    """Bytes the vit stage will hold at its peak, by part: the vision tensors in fp32 plus their mapped
    bf16 source; every layer's hidden states (upstream asks for output_hidden_states) and the larger of
    CLIP's eager attention for all crops in one batch (the [crops * heads, N, N] scores and their softmax
    alive together, q/k/v/out) and its MLP; this process's resident memory now."""
    v = config.vision_config
    wanted = [t for k, t in state.items() if k.startswith(VISION_PREFIXES)]
    weights = sum(t.numel() * (4 + t.element_size()) for t in wanted)
    n = (v.image_size // v.patch_size) ** 2 + 1
    scores = 2 * crops * v.num_attention_heads * n * n * 4
    hidden = (v.num_hidden_layers + 1) * crops * n * v.hidden_size * 4
    # the attention phase (scores, q/k/v/out) or the MLP phase (fc1's output and quick_gelu's 3 temporaries)
    activations = hidden + max(scores + 4 * crops * n * v.hidden_size * 4, 4 * crops * n * v.intermediate_size * 4)
    runtime = current_rss_bytes()
    return dict(weights=weights, activations=activations, runtime=runtime,
                total=weights + activations + runtime)


def _fit_report(need):
    avail = mem_available_bytes()
    return dict(fits=need["total"] + SPARE_BYTES <= avail, needed_gb=need["total"] / 1e9,
                needed_parts_gb={k: v / 1e9 for k, v in need.items() if k != "total"},
                available_gb=avail / 1e9, spare_gb=SPARE_BYTES / 1e9)


# ---------------------------------------------------------------------------------------------- stages
def stage_vit(args, up, state):
    import numpy as np
    import torch

    from PIL import Image

    config = checkpoint_config(args.checkpoint, state, task_loras=False)
    # The crop count, for the memory check, from upstream's own transform (encode_img repeats it, timed).
    with Image.open(args.image) as img:
        w, h = up.ixc_utils.Image_transform(img, hd_num=args.hd_num).size
    crops = (w // 560) * (h // 560) + 1
    fit = _fit_report(vit_bytes_needed(config, state, crops))
    common = dict(stage="vit", hd_num=args.hd_num, crops=crops, dtype="float32", threads=torch.get_num_threads(),
                  **fit)
    if not fit["fits"]:
        return dict(common, peak_rss_mb=_peak_rss_mb())
    t = time.perf_counter()
    vision = build_vision(up, config, state)
    del state  # unmaps the shards: only the widened vision tensors stay
    build_s = time.perf_counter() - t

    seen = {}
    upstream_img2emb = vision.img2emb

    def timed_img2emb(image):  # the model part of encode_img, timed apart from the image transform
        seen["crops"] = (image.shape[2] // 560) * (image.shape[3] // 560) + 1
        t0 = time.perf_counter()
        out = upstream_img2emb(image)
        seen["img2emb_s"] = time.perf_counter() - t0
        return out

    vision.img2emb = timed_img2emb
    t = time.perf_counter()
    with torch.no_grad():
        emb = vision.encode_img(args.image, args.hd_num)
    total_s = time.perf_counter() - t
    if emb is None:  # upstream prints "Unknow input format" and returns None
        raise ValueError(f"{args.image}: not an image upstream's encode_img accepts")
    emb = emb[0].numpy().astype(np.float32)
    np.save(args.out, emb)
    if seen["crops"] != crops:
        raise RuntimeError(f"encode_img ran {seen['crops']} crops, the transform alone gave {crops}")
    return dict(common, seconds=seen["img2emb_s"], seconds_with_transform=total_s,
                transform_seconds=total_s - seen["img2emb_s"], tokens=int(emb.shape[0]),
                hidden=int(emb.shape[1]), build_s=build_s, out=os.path.abspath(args.out),
                peak_rss_mb=_peak_rss_mb())


def stage_decode(args, up, state):
    import numpy as np
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    with np.load(args.prompt) as z:
        embeds, im_mask = z["inputs_embeds"], z["im_mask"]
    config = checkpoint_config(args.checkpoint, state, task_loras=False)
    if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != config.hidden_size:
        raise ValueError(f"{args.prompt}: inputs_embeds must be [1, L, {config.hidden_size}], got {embeds.shape}")
    if im_mask.shape != embeds.shape[:2]:
        raise ValueError(f"{args.prompt}: im_mask must be {embeds.shape[:2]}, got {im_mask.shape}")
    n = embeds.shape[1]
    fit = _fit_report(decode_bytes_needed(config, state, n, args.new_tokens, dtype))
    common = dict(stage="decode", dtype=args.dtype, prompt_tokens=int(n), threads=torch.get_num_threads(), **fit)
    if not fit["fits"]:
        return dict(common, peak_rss_mb=_peak_rss_mb())

    t = time.perf_counter()
    model = build_causal_lm(up, config, state, dtype)
    del state  # bf16: the model's parameters keep their shards mapped; the task LoRAs are never read
    build_s = time.perf_counter() - t
    mask = torch.from_numpy(im_mask.astype(bool))
    ids, steps = [], []
    with torch.no_grad():
        # generate()'s first call for upstream chat: the whole prompt as embeddings, every position's logits
        t = time.perf_counter()
        out = model(inputs_embeds=torch.from_numpy(embeds).to(dtype),
                    attention_mask=torch.ones(1, n, dtype=torch.long), position_ids=torch.arange(n)[None],
                    use_cache=True, im_mask=mask, infer_mode="base")
        prefill_s = time.perf_counter() - t
        past, length = out.past_key_values, n
        ids.append(int(out.logits[0, -1].argmax()))
        del out
        for _ in range(args.new_tokens):
            # a later generate() step: one id, the cache, the prompt's im_mask (ids never take PLoRA)
            length += 1
            t = time.perf_counter()
            out = model(input_ids=torch.tensor([[ids[-1]]]), attention_mask=torch.ones(1, length, dtype=torch.long),
                        position_ids=torch.tensor([[length - 1]]), past_key_values=past, use_cache=True,
                        im_mask=mask, infer_mode="base")
            steps.append(time.perf_counter() - t)  # the model call only, as decode_benchmark.py times it
            past = out.past_key_values
            ids.append(int(out.logits[0, -1].argmax()))
    warm = steps[1:] or steps
    return dict(common, build_s=build_s, prefill_s=prefill_s,
                decode_ms=1e3 * statistics.median(warm) if warm else None,
                first_step_ms=1e3 * steps[0] if steps else None, step_ms=[1e3 * s for s in steps], ids=ids,
                new_tokens=args.new_tokens, peak_rss_mb=_peak_rss_mb())


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="folder of the upstream IXC2.5 code")
    ap.add_argument("--checkpoint", required=True, help="hub-layout checkpoint folder")
    ap.add_argument("--stage", required=True, choices=("vit", "decode"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--image", help="vit: image file")
    ap.add_argument("--hd-num", type=int, default=24, help="vit: HD crop budget (upstream chat's default 24)")
    ap.add_argument("--out", help="vit: .npy for the embeddings [T, hidden] float32")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="decode: model dtype")
    ap.add_argument("--prompt", help="decode: .npz with inputs_embeds [1, L, hidden] and im_mask [1, L]")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode: greedy steps after the prefill")
    args = ap.parse_args(argv)
    need = {"vit": ("image", "out"), "decode": ("prompt",)}[args.stage]
    missing = [f"--{a.replace('_', '-')}" for a in need if getattr(args, a) is None]
    if missing:
        ap.error(f"--stage {args.stage} needs {' '.join(missing)}")
    for path in [args.upstream, args.checkpoint]:
        if not os.path.isdir(path):
            ap.error(f"{path}: no such folder")
    try:  # the checkpoint's files, before torch is even imported
        missing = [f for f in ["config.json"] + shard_files(args.checkpoint) if not os.path.isfile(
            os.path.join(args.checkpoint, f))]
    except (FileNotFoundError, ValueError, AttributeError) as e:
        ap.error(str(e))
    if missing:
        ap.error(f"{args.checkpoint}: missing {missing}")
    for path in [args.image, args.prompt]:
        if path is not None and not os.path.isfile(path):
            ap.error(f"{path}: no such file")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be at least 1")
    if args.hd_num < 1 or args.new_tokens < 0:
        ap.error("--hd-num must be at least 1 and --new-tokens at least 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch
    import transformers
    import upstream as U

    if args.threads:
        torch.set_num_threads(args.threads)
    up = U.import_upstream(args.upstream)
    stage = {"vit": stage_vit, "decode": stage_decode}[args.stage]
    # No name here holds the mapped checkpoint: the stage's `del state` unmaps what it did not keep.
    out = stage(args, up, open_checkpoint(args.checkpoint))
    out["versions"] = dict(torch=torch.__version__, transformers=transformers.__version__)
    _reply(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
