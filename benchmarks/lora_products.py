"""The narrow products of fine-tuning's LoRA (rank 64) and Partial LoRA (rank 256) through the CPU GEMM library.

Per linear and block of rows, training runs six products whose one side is the rank: the forward's x A^T and
mid B^T, the input gradient's dy B and dmid A, and the weight gradients dB = dy^T mid and dA = dmid^T x. They
multiply each packed element only r times, so packing matters as much as the micro-kernel. Prints, per shape,
milliseconds (best of 9, twice, interleaved) and GFLOP/s of this checkout's library and, with `--compare LIB`, of
another build of it (for example the library a worktree of an earlier commit built), measured alternately in the
same process.

    python benchmarks/lora_products.py [--compare ~/.cache/mindxcomposer/kernels/mxc_cpu_native_<hash>.so]
"""
import argparse
import ctypes
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.prefill_profile import best_of  # noqa: E402

# (rows per block, K, N, rank): the release's w1 / w3 and w2 at 128 rows, LoRA and Partial LoRA; mid size's w1.
SHAPES = ((128, 4096, 14336, 64), (128, 4096, 14336, 256), (128, 14336, 4096, 64), (640, 512, 1408, 64))


def products(lib, rows, k, n, r, rng):
    """[(name, callable, flop)] of the six products on random fp32 operands, through library `lib`."""
    from mindxcomposer.ops import cpu_kernels

    ep = cpu_kernels.entry_points(lib)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    a = rng.standard_normal((r, k), dtype=np.float32)
    mid = rng.standard_normal((rows, r), dtype=np.float32)
    b = rng.standard_normal((n, r), dtype=np.float32)
    dy = rng.standard_normal((rows, n), dtype=np.float32)

    def nt(lhs, w):  # lhs w^T
        out = np.empty((lhs.shape[0], w.shape[0]), np.float32)
        return lambda: ep.gemm_nt(lhs.ctypes.data, w.ctypes.data, 0, out.ctypes.data, lhs.shape[0], w.shape[0],
                                  w.shape[1], 0)

    def nn(lhs, w):  # lhs w
        out = np.empty((lhs.shape[0], w.shape[1]), np.float32)
        return lambda: ep.gemm_nn(lhs.ctypes.data, w.ctypes.data, 0, out.ctypes.data, lhs.shape[0], w.shape[0],
                                  w.shape[1], 0)

    def tn(lhs, rhs):  # lhs^T rhs (MindSpore's AOT convention, as the weight gradient is called)
        return cpu_kernels.AotCall(lib.MxcLinearTN, [lhs, rhs, np.empty((lhs.shape[1], rhs.shape[1]), np.float32)])

    return [("x A^T", nt(x, a), 2 * rows * r * k), ("mid B^T", nt(mid, b), 2 * rows * r * n),
            ("dy B", nn(dy, b), 2 * rows * r * n), ("dmid A", nn(mid, a), 2 * rows * r * k),
            ("dB = dy^T mid", tn(dy, mid), 2 * rows * r * n), ("dA = dmid^T x", tn(mid, x), 2 * rows * r * k)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare", help="another build of the library (.so) to time alongside this checkout's")
    args = ap.parse_args(argv)
    from mindxcomposer.ops import cpu_kernels

    libs = [ctypes.CDLL(cpu_kernels.build())] + ([ctypes.CDLL(args.compare)] if args.compare else [])
    names = ["this checkout"] + (["--compare"] if args.compare else [])
    print(f"command: python benchmarks/lora_products.py" + (f" --compare {args.compare}" if args.compare else ""))
    print(f"CPU kernels: {cpu_kernels.isa()}; fp32 operands, exact products, the library's threads\n")
    print("| rows x K -> N, rank | product | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"{n} GFLOP/s" for n in names) + " |")
    print("|---|---|" + "---|" * (2 * len(libs)))
    for rows, k, n, r in SHAPES:
        sets = [products(lib, rows, k, n, r, np.random.default_rng(0)) for lib in libs]
        for j, (name, _, flop) in enumerate(sets[0]):
            times = [float("inf")] * len(libs)
            for _ in range(2):  # interleaved: both builds see the machine in the same state
                for i, s in enumerate(sets):
                    times[i] = min(times[i], best_of(s[j][1], 9))
            print(f"| {rows} x {k} -> {n}, r {r} | {name} | " + " | ".join(f"{t * 1e3:.2f}" for t in times) + " | "
                  + " | ".join(f"{flop / t / 1e9:.0f}" for t in times) + " |", flush=True)


if __name__ == "__main__":
    main()
