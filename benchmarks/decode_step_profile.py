"""Where one decode step of a release-size model spends its time: the whole step against compiled graphs that run
only one kind of its work, over the model's own weights.

    python benchmarks/decode_step_profile.py /work/rs/int4 [--steps 12] [--repeat 7] [--only-linears]

Loads the model (GRAPH_MODE, the CPU kernels, exact products, base mode), prefills a 32-token text prompt in a
`ModelSession` (batch 1) and times, each as the median of `--repeat` calls after one warm-up:

- `session.step`: what `quantized_release.py` times (numpy inputs, the compiled step, logits to numpy);
- the compiled step graph alone (its inputs prepared once);
- graphs of one kind of the step's work, 32 times (once per layer, each on its layer's weights, chained so that
  the calls run in order as in the step):
  the five base linears of every layer (`base_product`; between them only a slice and a SwiGLU, as few other
  launches as the shapes allow), the two RMSNorms, RoPE + split (`rope_split`), the two cache writes
  (`index_add`) with attention over the cache, SwiGLU, the residual adds; and the head (final RMSNorm + bf16
  output linear) and the embedding row;
- a graph of 200 chained adds on [1, 4096] (the cost of a launch in a compiled graph);
- the base linears' graph again, alternating with the same kernels called directly on the same weights (ctypes,
  no graph): what the graph adds to them.

The read bandwidth is probed in the same process (`release_scale.read_bandwidth_gbs`). "rest" is the step graph
minus the parts listed. A benchmark, not a test: run it alone on the machine (exclusive lock).
"""
import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (REPO, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)


def timed(fn, args, repeat):
    """Median seconds of fn(*args) (outputs synchronised by reading one element), after one warm-up call."""
    def once():
        t = time.perf_counter()
        out = fn(*args)
        (out[0] if isinstance(out, tuple) else out).asnumpy()
        return time.perf_counter() - t

    once()
    return float(np.median([once() for _ in range(repeat)]))


def direct_linears(d, math_, base_parts):
    """The step's base linears, layer by layer, as direct calls of the decode kernels (AOT calling convention,
    `cpu_kernels.AotCall`) on the model's own weight memory."""
    import ctypes

    import mindspore as ms

    from mindxcomposer.ops import cpu_kernels
    from quant_decode_kernels import _kernel

    lib = ctypes.CDLL(cpu_kernels.build())
    fmt = {8: "int8", 4: "int4"}.get(math_.quant_bits, "bf16")
    fn = _kernel(lib, fmt)
    calls = []
    for w in d.layer_weights:
        for o in math_.offsets:
            arrays = []
            for p in w[o:o + base_parts]:
                a = p.asnumpy()
                if a.ctypes.data != p.data_ptr():
                    raise RuntimeError("asnumpy() copied a weight: the direct calls would not read the model's memory")
                arrays.append(a.view(np.uint16) if p.dtype == ms.bfloat16 else a)
            if fmt == "int4":
                arrays.append(np.array([math_.group_size], np.int32))
            k = arrays[0].shape[1] * (2 if fmt == "int4" else 1)
            x = np.random.default_rng(0).standard_normal((1, k)).astype(np.float32)
            calls.append(cpu_kernels.AotCall(fn, [x] + arrays + [np.empty((1, arrays[0].shape[0]), np.float32)]))
    return calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--only-linears", action="store_true",
                    help="the step graph and the base linears (graph, then alternating with direct calls) alone")
    args = ap.parse_args(argv)

    import mindspore as ms
    from mindspore import Tensor, nn, ops

    from mindxcomposer import InternLMXComposer2ForCausalLM
    from mindxcomposer.ops import cpu_kernels, kernels_enabled
    from mindxcomposer.ops.attention import attention
    from mindxcomposer.ops.weight_products import embedding, rms_norm, rope_split, swiglu
    from mindxcomposer.rope import packed_rope
    from mindxcomposer.session import ModelSession
    from release_scale import read_bandwidth_gbs

    ms.set_context(mode=ms.GRAPH_MODE)
    t = time.perf_counter()
    model = InternLMXComposer2ForCausalLM.from_pretrained(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t:.0f} s; kernels {kernels_enabled()} ({cpu_kernels.isa()}), "
          f"quantization {model.config.quantization}, runtime threads {ms.get_context('runtime_num_threads')}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(default)')}", flush=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(100, model.config.vocab_size - 100, size=(1, 32))
    session = ModelSession(model, 1, 32 + args.steps + 8)
    logits = session.prefill(model.embed_tokens(ids).astype(np.float32), np.zeros((1, 32), bool))
    tokens = [int(logits[0].argmax())]
    step_times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        logits = session.step(np.array([tokens[-1]]))
        step_times.append(time.perf_counter() - t)
        tokens.append(int(logits[0].argmax()))
    session_ms = float(np.median(step_times[2:])) * 1e3

    d = session.decoder
    math_ = d.math
    cfg = model.config
    kv, g, hd, hid = math_.num_kv_heads, math_.groups, math_.head_dim, math_.hidden_size
    slot = session.next_slot
    real_len = session.slot_mask.sum(1) + 1
    cos, sin = packed_rope(cfg, (real_len - 1)[:, None], real_len)
    mask_np = np.where(np.arange(session.cache_len)[None] < real_len[:, None], 0, np.finfo(np.float32).min)
    step_in = (Tensor(np.array([[tokens[-1]]], np.int32)), Tensor(cos), Tensor(sin),
               Tensor(mask_np.astype(np.float32)[:, None, None]), Tensor(np.array([slot], np.int32)))
    nl = d.num_layers
    weights = d.layer_weights
    base_parts = math_.base_parts
    norm_at = math_.num_base - 2

    class Probe(nn.Cell):
        """Graphs of one kind of the step's work, over the step's own weights (held as the decoder holds them)."""

        def linears(self, x):
            for i in range(nl):
                w = weights[i]
                qkv = math_.base_product(x, w, math_.offsets[0])
                o = math_.base_product(qkv[:, :hid], w, math_.offsets[1])
                gate = swiglu(math_.base_product(o, w, math_.offsets[2]), math_.base_product(o, w, math_.offsets[3]))
                x = math_.base_product(gate, w, math_.offsets[4])
            return x

        def norms(self, x):
            for i in range(nl):
                x = rms_norm(rms_norm(x, weights[i][norm_at], math_.eps), weights[i][norm_at + 1], math_.eps)
            return x

        def ropes(self, qkv, c, s):
            q = k = v = qkv
            for _ in range(nl):  # chained through one small add (distinct inputs: no call is merged with another)
                q, k, v = rope_split(qkv, c, s, math_.swap_halves)
                qkv = qkv + v.reshape(1, 1, kv, 1, hd)
            return q, k, v

        def attn(self, q, k, v, mask, slot_):
            out = q
            for i in range(nl):
                kc = ops.index_add(d.k_cache[i], slot_, k, 2)
                vc = ops.index_add(d.v_cache[i], slot_, v, 2)
                out = attention(out, kc, vc, mask, math_.scale_divisor, False, math_.products)
            return out

        def swiglus(self, a, b):
            for _ in range(nl):
                a = swiglu(a, b)
            return a

        def residuals(self, x, y):
            for _ in range(2 * nl):
                x = x + y
            return x

        def head(self, x):
            return d.head(x, d.norm_weight, d.head_weight)[1]

        def embed(self, i):
            return embedding(i, d.tok_embeddings, d.compute_dtype)

        def adds(self, x):
            for _ in range(200):
                x = x + x
            return x

    probe = Probe()
    f32 = lambda *shape: Tensor(rng.standard_normal(shape).astype(np.float32) * 0.01)  # noqa: E731
    x = f32(1, 1, hid)
    # The attention probe adds zeros to the caches' next slot: the prefilled cache is left as it was.
    zeros_kv = Tensor(np.zeros((1, kv, 1, hd), np.float32))
    parts = [
        ("step graph (d.step)", ms.jit(d.step), step_in),
        ("base linears x 5 (+ slice, SwiGLU)", ms.jit(probe.linears), (x.reshape(1, hid),)),
        ("RMSNorm x 2", ms.jit(probe.norms), (x,)),
        ("RoPE + split (+ 1 add)", ms.jit(probe.ropes), (f32(1, 1, kv, g + 2, hd), Tensor(cos), Tensor(sin))),
        ("cache writes x 2 + attention", ms.jit(probe.attn),
         (f32(1, kv * g, 1, hd), zeros_kv, zeros_kv, step_in[3], step_in[4])),
        ("SwiGLU", ms.jit(probe.swiglus), (f32(1, 1, cfg.intermediate_size), f32(1, 1, cfg.intermediate_size))),
        ("residual adds x 2", ms.jit(probe.residuals), (x, x)),
        ("head (RMSNorm + bf16 linear)", ms.jit(probe.head), (x.reshape(1, hid),)),
        ("embedding row", ms.jit(probe.embed), (step_in[0],)),
        ("200 adds [1, 4096] (launches)", ms.jit(probe.adds), (x,)),
    ]
    if args.only_linears:
        parts = parts[:2]
    res = {}
    for name, fn, a in parts:
        res[name] = timed(fn, a, args.repeat) * 1e3
        print(f"  {name}: {res[name]:.2f} ms", flush=True)
    # The same kernels on the same weights called directly (ctypes, no graph), alternating with the graph of
    # them, so that a difference is the graph's and not the machine's state at another moment.
    direct = direct_linears(d, math_, base_parts)
    graph_lin, direct_lin = [], []
    linears_graph = parts[1][1]
    for _ in range(args.repeat):
        graph_lin.append(timed(linears_graph, parts[1][2], 1))
        t = time.perf_counter()
        for call in direct:
            call()
        direct_lin.append(time.perf_counter() - t)
    res["linears graph (alternating)"] = float(np.median(graph_lin)) * 1e3
    res["linears direct (alternating)"] = float(np.median(direct_lin)) * 1e3
    bw = max(read_bandwidth_gbs().values())
    step = res["step graph (d.step)"]
    listed = sum(v for k, v in res.items() if k not in ("step graph (d.step)", "200 adds [1, 4096] (launches)"))
    # (with --only-linears "rest" is everything but the linears)

    print(f"\nread bandwidth probe: {bw:.1f} GB/s; model {args.model}\n")
    print("| part | per step | ms | % of step graph |")
    print("|---|---|---|---|")
    print(f"| session.step (as quantized_release.py times it) | 1 | {session_ms:.1f} | "
          f"{100 * session_ms / step:.0f}% |")
    print(f"| step graph alone | 1 | {step:.1f} | 100% |")
    for name, _, _ in (parts[1:2] if args.only_linears else parts[1:-1]):
        per = "1" if name.startswith(("head", "embedding")) else str(nl)
        print(f"| {name} | {per} | {res[name]:.1f} | {100 * res[name] / step:.0f}% |")
    listed -= res["linears graph (alternating)"] + res["linears direct (alternating)"]
    print(f"| rest (step graph - parts above) | | {step - listed:.1f} | {100 * (step - listed) / step:.0f}% |")
    print(f"| base linears graph, alternating with: | {nl} | {res['linears graph (alternating)']:.1f} | |")
    print(f"| the same kernels called directly (no graph) | {nl} | {res['linears direct (alternating)']:.1f} | |")
    if not args.only_linears:
        print(f"| 200 adds [1, 4096] (launch cost) | | {res['200 adds [1, 4096] (launches)']:.1f} | |")


if __name__ == "__main__":
    main()
