"""What RoPE and the split of the packed q/k/v into heads-first tensors cost in a prefill chunk, GRAPH_MODE.

    python benchmarks/rope_split_cost.py [--rows 448]

A benchmark, not a test: it prints a table. The same operations as `DecoderMath.layer` at release width
(8 KV groups of 4 query heads, head width 128) on one chunk of `--rows` rows: `qkv * cos +
swap_halves(qkv) * sin`, then q, k, v transposed to [B, heads, rows, D]; and, for scale, the attention
output's transpose plus the residual add. Best of 5.
"""
import argparse
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=448)
    args = ap.parse_args(argv)

    import mindspore as ms
    from mindspore import Tensor, nn, ops

    ms.set_context(mode=ms.GRAPH_MODE)
    b, n, kv, g, d = 1, args.rows, 8, 4, 128
    half = d // 2

    class RopeSplit(nn.Cell):
        def __init__(self):
            super().__init__()
            self.swap = Tensor(np.concatenate([np.arange(half, d), np.arange(half)]).astype(np.int32))

        def construct(self, qkv, cos, sin):
            qkv = qkv.reshape(b, n, kv, g + 2, d)
            qkv = qkv * cos + ops.gather(qkv, self.swap, qkv.ndim - 1) * sin
            q = qkv[:, :, :, :g].transpose(0, 2, 3, 1, 4).reshape(b, kv * g, n, d)
            k = qkv[:, :, :, g].transpose(0, 2, 1, 3)
            v = qkv[:, :, :, g + 1].transpose(0, 2, 1, 3)
            return q, k, v

    class OutResidual(nn.Cell):
        def construct(self, out, x):
            return x + out.transpose(0, 2, 1, 3).reshape(b, n, kv * g * d)

    rng = np.random.default_rng(0)

    def t(*shape):
        return Tensor(rng.standard_normal(shape, dtype=np.float32))

    cases = (("RoPE + q/k/v split", RopeSplit(), (t(b, n, kv * (g + 2) * d), t(b, n, 1, g + 2, d), t(b, n, 1, g + 2, d))),
             ("attention output transpose + residual", OutResidual(), (t(b, kv * g, n, d), t(b, n, kv * g * d))))
    print(f"one prefill chunk of {n} rows, release width, GRAPH_MODE\n\n| operations | ms |\n|---|---|")
    for name, cell, inputs in cases:
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
