"""The decode kernels alone (`csrc/quant_kernels.cc` int8 / int4, `csrc/bf16_kernels.cc` bf16) at the release's
shapes, against the read bandwidth measured in the same process.

    python benchmarks/quant_decode_kernels.py [--rows 1,2,4,16] [--arch native] [--layers 4] [--repeat 5]
        [--gemm-rows 32,512]

Per layer the release's five base linears (wqkv [6144, 4096], wo [4096, 4096], w1 / w3 [14336, 4096],
w2 [4096, 14336]) are stored in each format; `--layers` copies of them (int4: 109 MB a layer, more than the
L3 cache in all) are run through in order, as a decode step does, so every weight comes from memory. Per
format, shape and number of activation rows: best time over `--repeat` passes, the GB/s of the stored bytes
(packed weights, scales, zero points) and the fraction of the read bandwidth (`release_scale.read_bandwidth_gbs`,
best of its probes) that is. The kernels are called through ctypes with MindSpore's AOT calling convention
(`cpu_kernels.AotCall`: no graph, no allocation per call). A benchmark, not a test: run it alone on the machine.

`--gemm-rows`: the same five shapes through the GEMM that serves more rows than the decode kernels (prefill,
training), which dequantizes (int8, int4) or widens (bf16) the weight tile by tile while packing it; per format
and number of rows, ms and GFLOP/s of the layer, next to the fp32 GEMM over an fp32 weight (the twin) and numpy's
fp32 product in the same run. At few rows the packing is the cost (each weight is unpacked once per call).
"""
import argparse
import ctypes
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (REPO, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from mindxcomposer.ops import cpu_kernels  # noqa: E402

HIDDEN, INTER, QKV = 4096, 14336, 6144
SHAPES = {"wqkv": (QKV, HIDDEN), "wo": (HIDDEN, HIDDEN), "w1": (INTER, HIDDEN), "w3": (INTER, HIDDEN),
          "w2": (HIDDEN, INTER)}
GROUP = 128


def _weights(fmt, n, k, rng):
    """The stored parts of a weight [n, k] (random bits: the kernels' time does not depend on the values)."""
    if fmt == "bf16":
        return [rng.integers(0x3c00, 0x3d00, size=(n, k), dtype=np.uint16)]
    if fmt == "int8":
        return [rng.integers(-127, 128, size=(n, k), dtype=np.int8), rng.random(n, dtype=np.float32) / 64]
    g = (k + GROUP - 1) // GROUP
    return [rng.integers(0, 256, size=(n, (k + 1) // 2), dtype=np.uint8), rng.random((n, g), dtype=np.float32) / 64,
            rng.integers(0, 16, size=(n, g), dtype=np.uint8), np.array([GROUP], np.int32)]


def _kernel(lib, fmt):
    name = {"bf16": "MxcLinearBf16", "int8": "MxcLinearInt8", "int4": "MxcLinearInt4"}[fmt]
    fn = getattr(lib, name)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p]
    return fn


def measure(lib, fmt, rows, layers, repeat, rng):
    """{shape name: (best seconds per call, stored bytes)} for `rows` activation rows, and the whole layer."""
    fn = _kernel(lib, fmt)
    calls = {name: [] for name in SHAPES}
    for _ in range(layers):
        for name, (n, k) in SHAPES.items():
            if fmt == "bf16":
                parts = _weights(fmt, n, k, rng)
                x = rng.standard_normal((rows, k), dtype=np.float32)
                arrays = [x, parts[0].view(np.uint16), np.empty((rows, n), np.float32)]
            else:
                parts = _weights(fmt, n, k, rng)
                x = rng.standard_normal((rows, k), dtype=np.float32)
                arrays = [x, *parts, np.empty((rows, n), np.float32)]
            calls[name].append((cpu_kernels.AotCall(fn, arrays), sum(a.nbytes for a in parts)))
    best = {name: float("inf") for name in SHAPES}
    for _ in range(repeat):
        for i in range(layers):  # layer by layer, as a decode step: nothing is in a cache when read
            for name in SHAPES:
                call = calls[name][i][0]
                t = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - t)
    return {name: (best[name], calls[name][0][1]) for name in SHAPES}


def measure_gemm(lib, fmt, rows, repeat, rng):
    """Seconds (best of `repeat`) of the layer's five products with `rows` activation rows through the GEMM."""
    gemm = cpu_kernels.entry_points(lib)
    total = 0.0
    for n, k in SHAPES.values():
        x = rng.standard_normal((rows, k), dtype=np.float32)
        y = np.empty((rows, n), np.float32)
        if fmt in ("bf16", "fp32"):
            w = _weights("bf16", n, k, rng)[0] if fmt == "bf16" else rng.standard_normal((n, k), dtype=np.float32)

            def call(x=x, w=w, y=y, n=n, k=k):
                gemm.gemm_nt(x.ctypes.data, w.ctypes.data, int(w.dtype == np.uint16), y.ctypes.data, rows, n, k, 0)
        else:
            parts = _weights(fmt, n, k, rng)
            q, scales = parts[0], parts[1]
            zeros = parts[2] if fmt == "int4" else np.zeros(1, np.uint8)

            def call(x=x, q=q, scales=scales, zeros=zeros, y=y, n=n, k=k):
                rc = gemm.gemm_nt_quant(x.ctypes.data, q.ctypes.data, scales.ctypes.data, zeros.ctypes.data,
                                        int(fmt[3:]), y.ctypes.data, rows, n, k, GROUP if fmt == "int4" else -1, 0)
                if rc != 0:
                    raise RuntimeError(f"kernel returned {rc}")
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t)
        total += best
    return total


def numpy_layer_seconds(rows, repeat, rng):
    total = 0.0
    for n, k in SHAPES.values():
        x, w = rng.standard_normal((rows, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            x @ w.T
            best = min(best, time.perf_counter() - t)
        total += best
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,16")
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--arch", default="native", choices=sorted(cpu_kernels.ARCH_FLAGS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--gemm-rows", default="", help="e.g. 32,512: also time the GEMM path at these rows")
    args = ap.parse_args(argv)
    from release_scale import read_bandwidth_gbs

    lib = ctypes.CDLL(cpu_kernels.build(arch=args.arch))
    print(f"kernels: {cpu_kernels.isa(args.arch) if args.arch != 'native' else ''} {args.arch}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(default)')}, cores {os.cpu_count()}")
    probe = read_bandwidth_gbs()
    bw = max(probe.values())
    print("read bandwidth probe (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in probe.items()))
    rng = np.random.default_rng(0)
    print("\n| format | rows | " + " | ".join(f"{s} {SHAPES[s][0]}x{SHAPES[s][1]} ms (GB/s)" for s in SHAPES)
          + " | layer ms | layer GB/s | % of read bandwidth |")
    print("|---|---|" + "---|" * (len(SHAPES) + 3))
    for fmt in args.formats.split(","):
        for rows in [int(r) for r in args.rows.split(",")]:
            res = measure(lib, fmt, rows, args.layers, args.repeat, rng)
            total_t = sum(t for t, _ in res.values())
            total_b = sum(b for _, b in res.values())
            cells = " | ".join(f"{t * 1e3:.3f} ({b / t / 1e9:.1f})" for t, b in res.values())
            print(f"| {fmt} | {rows} | {cells} | {total_t * 1e3:.2f} | {total_b / total_t / 1e9:.1f} | "
                  f"{100 * total_b / total_t / 1e9 / bw:.0f}% |", flush=True)


    if args.gemm_rows:
        flop_per_row = 2 * sum(n * k for n, k in SHAPES.values())
        print("\n| rows | " + " | ".join(f"{f} GEMM ms (GFLOP/s)" for f in ["fp32", *args.formats.split(",")])
              + " | numpy fp32 ms (GFLOP/s) |")
        print("|---|" + "---|" * (len(args.formats.split(",")) + 2))
        for rows in [int(r) for r in args.gemm_rows.split(",")]:
            cells = []
            for fmt in ["fp32", *args.formats.split(",")]:
                t = measure_gemm(lib, fmt, rows, max(2, args.repeat // 2), rng)
                cells.append(f"{t * 1e3:.1f} ({flop_per_row * rows / t / 1e9:.0f})")
            t = numpy_layer_seconds(rows, max(2, args.repeat // 2), rng)
            cells.append(f"{t * 1e3:.1f} ({flop_per_row * rows / t / 1e9:.0f})")
            print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
