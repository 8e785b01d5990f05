"""What RoPE and the split of the packed q/k/v into heads-first tensors cost in a prefill chunk, GRAPH_MODE.

    python benchmarks/rope_split_cost.py [--rows 448]

A benchmark, not a test: it prints a table. `DecoderMath.layer`'s RoPE and split (`weight_products.rope_split`)
at release width (8 KV groups of 4 query heads, head width 128) on one chunk of `--rows` rows, both ways it
runs: the portable path (`qkv * cos + swap_halves(qkv) * sin`, then q, k, v transposed to [B, heads, rows, D])
and, where the CPU kernels build, their one-pass kernel (the same bits); and, for scale, the attention
output's transpose plus the residual add. Best of 5.
"""
import argparse
import contextlib
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=448)
    args = ap.parse_args(argv)

    import mindspore as ms
    from mindspore import Tensor, nn

    from mindxcomposer.ops import weight_products as wp

    ms.set_context(mode=ms.GRAPH_MODE)
    b, n, kv, g, d = 1, args.rows, 8, 4, 128
    half = d // 2

    class RopeSplit(nn.Cell):
        def __init__(self):
            super().__init__()
            self.swap = Tensor(np.concatenate([np.arange(half, d), np.arange(half)]).astype(np.int32))

        def construct(self, qkv, cos, sin):
            return wp.rope_split(qkv.reshape(b, n, kv, g + 2, d), cos, sin, self.swap)

    class OutResidual(nn.Cell):
        def construct(self, out, x):
            return x + out.transpose(0, 2, 1, 3).reshape(b, n, kv * g * d)

    rng = np.random.default_rng(0)

    def t(*shape):
        return Tensor(rng.standard_normal(shape, dtype=np.float32))

    rope_inputs = (t(b, n, kv * (g + 2) * d), t(b, n, 1, g + 2, d), t(b, n, 1, g + 2, d))
    cases = [("RoPE + q/k/v split, portable path (Mul, Gather, Mul, Add, 3 transposes)", False, RopeSplit(),
              rope_inputs)]
    if wp.enable_kernels():
        cases.append(("RoPE + q/k/v split, one kernel (`rope_split`)", True, RopeSplit(), rope_inputs))
    cases.append(("attention output transpose + residual", False, OutResidual(),
                  (t(b, kv * g, n, d), t(b, n, kv * g * d))))
    print(f"one prefill chunk of {n} rows, release width, GRAPH_MODE\n\n| operations | ms |\n|---|---|")
    for name, with_kernels, cell, inputs in cases:
        # the kernels are looked up when the cell's graph is traced, i.e. on this first call
        with contextlib.nullcontext() if with_kernels else wp.kernels_disabled():
            cell(*inputs)  # compiles
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            out = cell(*inputs)
            (out[0] if isinstance(out, tuple) else out).asnumpy()
            best = min(best, time.perf_counter() - start)
        print(f"| {name} | {1e3 * best:.1f} |")


if __name__ == "__main__":
    main()
