"""Where a release-width prefill spends its time, per product mode, against the machine's GEMM rates.

    python benchmarks/prefill_profile.py [--layers 2] [--tokens 858] [--image-tokens 800]
        [--modes exact,bf16] [--new-tokens 8] [--vit] [--json out.json]

A benchmark, not a test: it prints a table. A decoder at the release's width (hidden 4096, 32 heads,
8 KV heads, intermediate 14336, Partial LoRA rank 256, vocabulary 92544) with `--layers` layers of
seeded random bf16 weights (the release's storage), GRAPH_MODE, prefills one prompt of `--tokens` rows
whose first `--image-tokens` rows are image tokens, through `ModelSession.prefill` (the path `chat` takes).
Per mode it reports:

- prefill: seconds per layer, tokens/s scaled to the release's 32 layers, and the achieved GFLOP/s of
  the decoder products (base linears, Partial LoRA, attention's two products over the cache);
- products alone: the same products at the same shapes through the same kernels called directly (the
  linears on numpy arrays, attention's fused kernel chunk by chunk with each chunk's mask), best of 3,
  so that prefill time (best of 2) minus products time is what the layer spends on everything else
  (norms, RoPE, masks, cache writes, residuals, transposes, host work and graph launches): the "other"
  share;
- the machine's rates in the same run: the one product `[512 x 4096] x [4096 x 14336]` through our
  kernel, numpy (BLAS) fp32 and, if torch is installed, torch fp32 and bf16 (`linear`);
- our kernel's rate per arithmetic at the prefill's other shapes (`--gemm-shapes`, M x K x N), with the
  bf16 products through oneDNN and through the own GEMM where oneDNN is in use. `--modes ""` prints the
  rates alone;
- with `--vit`, one release ViT layer per mode against its products alone (linears and attention).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def best_of(fn, reps=3):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def reference_rates(m=512, k=4096, n=14336):
    """GFLOP/s of one prefill-shaped product by numpy fp32 and torch fp32 / bf16 (when installed)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    flop = 2.0 * m * k * n
    out = {"numpy_fp32": flop / best_of(lambda: x @ w.T) / 1e9}
    try:
        import torch
    except ImportError:
        return out
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    with torch.no_grad():
        out["torch_fp32"] = flop / best_of(lambda: torch.nn.functional.linear(xt, wt)) / 1e9
        xb, wb = xt.bfloat16(), wt.bfloat16()
        out["torch_bf16"] = flop / best_of(lambda: torch.nn.functional.linear(xb, wb)) / 1e9
    return out


def kernel_rates(m=512, k=4096, n=14336):
    """GFLOP/s of our kernel on the same product with a bf16 weight, per mode (no MindSpore graph); where
    bf16 products go to oneDNN, also the own GEMM's bf16 rate ("bf16_own")."""
    from mindxcomposer.ops import cpu_kernels
    from mindxcomposer.weights import fp32_to_bf16

    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = fp32_to_bf16(rng.standard_normal((n, k), dtype=np.float32))
    flop = 2.0 * m * k * n
    rates = {mode: flop / best_of(lambda: cpu_kernels.gemm_nt(x, w, mode == "bf16")) / 1e9
             for mode in ("exact", "bf16")}
    if cpu_kernels.onednn():
        cpu_kernels.onednn(False)
        try:
            rates["bf16_own"] = flop / best_of(lambda: cpu_kernels.gemm_nt(x, w, True)) / 1e9
        finally:
            cpu_kernels.onednn(True)
    return rates


def release_width_config(layers):
    from mindxcomposer.configuration import CLIPVisionConfig, InternLMXComposer2Config

    return InternLMXComposer2Config(num_hidden_layers=layers, vision_config=CLIPVisionConfig(num_hidden_layers=1),
                                    projector_hidden_size=4096)


def build_model(config, mode, seed=0):
    """The decoder, head and embeddings filled with seeded random bf16 weights (the ViT stays lazy)."""
    import mindspore as ms
    from mindspore import Tensor

    from mindxcomposer import InternLMXComposer2ForCausalLM
    from mindxcomposer.modeling_xcomposer2 import _BF16_NP
    from mindxcomposer.weights import fp32_to_bf16

    model = InternLMXComposer2ForCausalLM(config, ms.bfloat16, compute_dtype="bf16" if mode == "bf16" else None)
    rng = np.random.default_rng(seed)
    for p in model.get_parameters():
        if not p.name.startswith(("model.", "output.")) or "lora_" in p.name:
            continue
        shape = tuple(p.shape)
        if p.name.endswith("norm.weight"):
            arr = 1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            arr = rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / np.sqrt(shape[-1]))
        p.set_data(Tensor.from_numpy(fp32_to_bf16(arr).view(_BF16_NP)))
    return model


def decoder_flops(config, n, cache_len, plora=True):
    """FLOPs of one layer's products on n prompt rows: base linears, Partial LoRA (on every row, as the
    graph computes it), attention's two products over the whole static cache (masked slots included)."""
    c = config
    h, inter, r = c.hidden_size, c.intermediate_size, c.plora_rank
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    shapes = [(h, qkv), (h, h), (h, inter), (h, inter), (inter, h)]  # (in, out)
    base = sum(2 * n * i * o for i, o in shapes)
    lora = sum(2 * n * (i * r + r * o) for i, o in shapes) if plora else 0
    attn = 2 * 2 * n * cache_len * c.head_dim * c.num_attention_heads
    return {"base": base, "plora": lora, "attention": attn}


def products_alone(config, mode, n, cache_len, chunks=1):
    """Seconds of one layer's products over `chunks` prefill chunks of n rows through the kernels themselves:
    the base and Partial-LoRA linears by `cpu_kernels.gemm_nt` on numpy arrays (bf16 weights of the layer's
    shapes; no MindSpore graph or launch), attention by the fused kernel, chunk by chunk, with the causal mask
    of that chunk over the static cache (it computes only over the keys a chunk can see). Best of 3 each:
    the floor a prefill layer cannot go below; what the layer spends above it is the "other" work."""
    import mindspore as ms
    from mindspore import Tensor

    from mindxcomposer.ops import cpu_kernels
    from mindxcomposer.ops.attention import attention
    from mindxcomposer.weights import fp32_to_bf16

    c = config
    bf16 = mode == "bf16"
    h, inter, r = c.hidden_size, c.intermediate_size, c.plora_rank
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    rng = np.random.default_rng(1)

    def weight(rows, cols):
        return fp32_to_bf16(rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(cols ** -0.5))

    x = rng.standard_normal((n, h), dtype=np.float32)
    xi = rng.standard_normal((n, inter), dtype=np.float32)
    out = {}
    for name, (k, o) in (("attention.wqkv", (h, qkv)), ("attention.wo", (h, h)), ("feed_forward.w1", (h, inter)),
                         ("feed_forward.w3", (h, inter)), ("feed_forward.w2", (inter, h))):
        inp, w, a, b = (xi if k == inter else x), weight(o, k), weight(r, k), weight(o, r)
        out[name] = chunks * best_of(lambda: cpu_kernels.gemm_nt(inp, w, bf16))
        out[name + " plora"] = chunks * best_of(lambda: cpu_kernels.gemm_nt(cpu_kernels.gemm_nt(inp, a, bf16), b, bf16))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        q = Tensor(rng.standard_normal((1, c.num_attention_heads, n, c.head_dim), dtype=np.float32))
        kv = [Tensor(rng.standard_normal((1, c.num_key_value_heads, cache_len, c.head_dim), dtype=np.float32))
              for _ in range(2)]
        total = 0.0
        for ci in range(chunks):
            rows = np.arange(ci * n, (ci + 1) * n)
            visible = np.arange(cache_len)[None, :] <= rows[:, None]
            mask = Tensor(np.where(visible, np.float32(0), np.finfo(np.float32).min).astype(np.float32)[None, None])
            total += best_of(lambda: attention(q, kv[0], kv[1], mask, c.head_dim ** 0.5, products=mode).asnumpy())
        out["attention (fused)"] = total
        return out
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


def profile_mode(args, mode):
    import mindspore as ms

    from mindxcomposer.session import PREFILL_CHUNK, ModelSession, round_up

    ms.set_context(mode=ms.GRAPH_MODE)
    config = release_width_config(args.layers)
    model = build_model(config, mode)
    n = args.tokens
    session = ModelSession(model, 1, n + args.new_tokens)
    rng = np.random.default_rng(2)
    embeds = rng.standard_normal((1, n, config.hidden_size), dtype=np.float32)
    im_mask = np.zeros((1, n), np.float32)
    im_mask[:, :args.image_tokens] = 1
    session.prefill(embeds, im_mask)  # compiles
    seconds = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        logits = session.prefill(embeds, im_mask)
        seconds = min(seconds, time.perf_counter() - t)
    assert np.isfinite(logits).all()
    flops = decoder_flops(config, n, session.cache_len)
    chunks = -(-n // PREFILL_CHUNK)  # as ModelSession.prefill splits the prompt
    chunk = round_up(-(-n // chunks), session.prefill_bucket)
    prods = products_alone(config, mode, chunk, session.cache_len, chunks)
    per_layer = seconds / args.layers  # the head runs once, on the last row only: negligible
    product_s = sum(prods.values())
    return {"mode": mode, "prefill_s": seconds, "per_layer_s": per_layer, "cache_len": session.cache_len,
            "tokens_per_s_32_layers": n / (per_layer * 32), "decoder_gflops": sum(flops.values()) / per_layer / 1e9,
            "flops_per_layer": flops, "products_alone_s": prods, "products_alone_total_s": product_s,
            "other_share": max(0.0, per_layer - product_s) / per_layer}


def profile_vit_layer(mode, crops=1):
    """One release ViT layer (CLIP-L/14 at 560 px: 1601 tokens a crop, hidden 1024, 16 heads, MLP 4096) on
    seeded random bf16 weights in GRAPH_MODE (`CLIPLayerMath`, the call the tower makes 24 times a crop),
    against its products alone: the six linears through our kernel and the fused attention."""
    import mindspore as ms
    from mindspore import Tensor

    from mindxcomposer.configuration import CLIPVisionConfig
    from mindxcomposer.modeling_clip import LAYER_WEIGHTS, CLIPLayerMath
    from mindxcomposer.modeling_xcomposer2 import _BF16_NP
    from mindxcomposer.ops import cpu_kernels
    from mindxcomposer.ops import weight_products as wp
    from mindxcomposer.ops.attention import BSND, attention
    from mindxcomposer.weights import fp32_to_bf16

    ms.set_context(mode=ms.GRAPH_MODE)
    wp.enable_kernels()
    cfg = CLIPVisionConfig()
    h, inter, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    n = (cfg.image_size // cfg.patch_size) ** 2 + 1
    rng = np.random.default_rng(0)
    shapes = {"mlp.fc1.weight": (inter, h), "mlp.fc1.bias": (inter,), "mlp.fc2.weight": (h, inter)}
    weights = []
    for name in LAYER_WEIGHTS:
        shape = shapes.get(name, (h, h) if name.endswith("proj.weight") else (h,))
        arr = rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / np.sqrt(shape[-1]) if len(shape) == 2 else 0.1)
        if name.startswith("layer_norm") and name.endswith("weight"):
            arr += 1
        weights.append(Tensor(fp32_to_bf16(arr).view(_BF16_NP)))
    x = Tensor(rng.standard_normal((crops, n, h), dtype=np.float32))
    math = CLIPLayerMath(cfg, mode)
    layer_s = best_of(lambda: math(x, *weights).asnumpy())
    bf16 = mode == "bf16"
    rows = crops * n
    xa = rng.standard_normal((rows, h), dtype=np.float32)
    xb = rng.standard_normal((rows, inter), dtype=np.float32)
    w_hh = fp32_to_bf16(rng.standard_normal((h, h), dtype=np.float32))
    w_up = fp32_to_bf16(rng.standard_normal((inter, h), dtype=np.float32))
    w_down = fp32_to_bf16(rng.standard_normal((h, inter), dtype=np.float32))
    linears_s = (4 * best_of(lambda: cpu_kernels.gemm_nt(xa, w_hh, bf16)) + best_of(lambda: cpu_kernels.gemm_nt(xa, w_up, bf16))
                 + best_of(lambda: cpu_kernels.gemm_nt(xb, w_down, bf16)))
    q = Tensor(rng.standard_normal((crops, n, heads, h // heads), dtype=np.float32))
    attention_s = best_of(lambda: attention(q, q, q, None, 8.0, products=mode, layout=BSND).asnumpy())
    flop = 2.0 * rows * (4 * h * h + 2 * h * inter) + 4.0 * crops * n * n * h
    return {"mode": mode, "tokens": rows, "layer_s": layer_s, "linears_alone_s": linears_s,
            "attention_alone_s": attention_s, "gflops": flop / layer_s / 1e9,
            "other_share": max(0.0, layer_s - linears_s - attention_s) / layer_s}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=858)
    ap.add_argument("--image-tokens", type=int, default=800)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--modes", default="exact,bf16")
    ap.add_argument("--gemm-shapes", default="512x4096x14336,64x4096x14336,512x14336x4096,512x4096x256",
                    help="comma-separated M x K x N products to rate our kernel on")
    ap.add_argument("--vit", action="store_true", help="also profile one release ViT layer per mode")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from mindxcomposer.ops import cpu_kernels

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.gemm_shapes.split(",") if s]
    results = {"isa": cpu_kernels.isa(), "onednn": cpu_kernels.onednn(), "reference_gflops": reference_rates(),
               "kernel_gflops": kernel_rates(), "shape_gflops": {"x".join(map(str, sh)): kernel_rates(*sh) for sh in shapes},
               "modes": [profile_mode(args, m) for m in args.modes.split(",") if m]}
    if args.vit:
        results["vit"] = [profile_vit_layer(m) for m in args.modes.split(",") if m]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    ref = results["reference_gflops"]
    print(f"kernels: {results['isa']}")
    print("one product [512 x 4096] x [4096 x 14336], GFLOP/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in {**{f'ours_{m}': v for m, v in results['kernel_gflops'].items()},
                                                  **ref}.items()))
    print("\nour kernel, GFLOP/s (M x K x N; bf16 through " + ("oneDNN, bf16_own: the own GEMM)" if results["onednn"]
                                                             else "the own GEMM)") + "\n")
    cols = sorted({k for r in results["shape_gflops"].values() for k in r}, key=["exact", "bf16", "bf16_own"].index)
    print("| product | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for shape, r in results["shape_gflops"].items():
        print(f"| {shape} | " + " | ".join(f"{r[c]:.0f}" for c in cols) + " |")
    if results.get("vit"):
        print("\none release ViT layer (1601 tokens: one 560-px crop), GRAPH_MODE\n")
        print("| mode | layer ms | GFLOP/s | linears alone ms | attention alone ms | other share |")
        print("|---|---|---|---|---|---|")
        for r in results["vit"]:
            print(f"| {r['mode']} | {1e3 * r['layer_s']:.1f} | {r['gflops']:.0f} | {1e3 * r['linears_alone_s']:.1f} | "
                  f"{1e3 * r['attention_alone_s']:.1f} | {100 * r['other_share']:.0f}% |")
    if not results["modes"]:
        return
    print(f"\nprefill of {args.tokens} tokens ({args.image_tokens} image), release width, {args.layers} layers, "
          f"GRAPH_MODE\n")
    print("| mode | s / layer | tokens/s (32 layers) | decoder GFLOP/s | products alone s | other share |")
    print("|---|---|---|---|---|---|")
    for r in results["modes"]:
        print(f"| {r['mode']} | {r['per_layer_s']:.3f} | {r['tokens_per_s_32_layers']:.1f} | {r['decoder_gflops']:.0f} | "
              f"{r['products_alone_total_s']:.3f} | {100 * r['other_share']:.0f}% |")
    for r in results["modes"]:
        print(f"\n{r['mode']}: products alone, s: " + ", ".join(f"{k} {v:.3f}" for k, v in r["products_alone_s"].items()))


if __name__ == "__main__":
    main()
