"""Builds and wraps the CPU kernels of `csrc/` as MindSpore `ops.Custom(func_type="aot")` primitives.

- `bf16_kernels.cc`: decode-sized products (a few rows) and embedding lookups that read bf16 weights in
  place: read-bound, one pass over each weight row serves every activation row.
- `gemm_kernels.cc`: compute-bound products (prefill chunks, the ViT, attention, training), a blocked
  GEMM with fp32 (`exact`) or bf16-input (`bf16`) arithmetic; bf16 weights are widened while packed, int8 /
  int4 weights (`mindxcomposer.quantization`) dequantized while packed.
- `quant_kernels.cc`: decode-sized products with int8 / int4 weights, read in place.

One shared library is compiled from the package's own sources with the machine's g++ the first time it
is needed (a few seconds), with `-march=native` and OpenMP, into a cache directory keyed by the sources,
the compiler flags and the CPU's feature flags: built once per machine and CPU kind, never downloaded.
`-march=native` is the CPU dispatch: the same source gives AVX-512 + AVX512-BF16, AVX-512, AVX2 or
portable code for the CPU it is built on (`isa()` says which). `python -m mindxcomposer.ops.cpu_kernels`
builds it ahead of time and prints where it is and what it was built for.

Where oneDNN 3 is installed in the environment (the `onednn-cpu-gomp` and `onednn-devel-cpu-gomp` wheels,
dependencies of the package on x86-64 Linux), the library links it and sends bf16 products of more than a
few rows to its matmul, which uses AMX or AVX512-BF16 as the CPU has them (`onednn()` says whether;
`MXC_ONEDNN=0` turns it off). If it cannot be linked, the library is built without it.

Where it cannot be built (no g++), `available()` is False and the portable path (cast the weight to the
compute dtype, then MindSpore's MatMul) serves instead; `MXC_PORTABLE_KERNELS=1` forces that path.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from types import SimpleNamespace

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SOURCES = [os.path.join(_CSRC, name) for name in ("bf16_kernels.cc", "gemm_kernels.cc", "quant_kernels.cc")]
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++14"]
# The library MindSpore uses is built for this CPU ("native"). The others build the same sources for the
# older kinds of CPU (AVX2 + FMA; plain x86-64), so that their code paths are tested on any machine.
ARCH_FLAGS = {"native": "-march=native", "avx2": "-march=haswell", "portable": "-march=x86-64"}
_lock = threading.Lock()
_state = {"path": None, "error": None, "ops": None, "entry_points": None}

ISA_NAMES = {0: "portable C++", 1: "AVX-512", 2: "AVX-512 + AVX512-BF16", 3: "AVX2 + FMA"}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def cache_dir() -> str:
    base = os.environ.get("MXC_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mindxcomposer")
    return os.path.join(base, "kernels")


def onednn_install():
    """(include directory, library file) of oneDNN 3 installed in this environment, or None. Its wheels put
    `include/oneapi/dnnl/` and `lib/libdnnl.so.3` under the environment's data prefix."""
    import site

    for prefix in dict.fromkeys([sysconfig.get_path("data"), sys.prefix, sys.base_prefix, site.USER_BASE]):
        if not prefix:
            continue
        include, lib = os.path.join(prefix, "include"), os.path.join(prefix, "lib", "libdnnl.so.3")
        if os.path.isfile(os.path.join(include, "oneapi", "dnnl", "dnnl.h")) and os.path.isfile(lib):
            return include, lib
    return None


def _flags(arch: str, with_onednn: bool = True):
    """Compiler flags for `arch`. Only the library MindSpore uses ("native") links oneDNN; the variants
    for older CPUs exist to test this package's own code paths."""
    flags = _FLAGS + [ARCH_FLAGS[arch]]
    if arch == "native" and os.environ.get("MXC_KERNEL_PROFILE") == "1":
        flags.append("-DMXC_KERNEL_PROFILE")  # a profiling build (`kernel_profile`), cached apart by its flags
    found = onednn_install() if arch == "native" and with_onednn else None
    if found is not None:
        include, lib = found
        flags += ["-DMXC_WITH_ONEDNN", f"-I{include}", lib, f"-Wl,-rpath,{os.path.dirname(lib)}"]
    return flags


def library_path(arch: str = "native") -> str:
    digest = hashlib.sha256()
    for src in _SOURCES:
        with open(src, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(_flags(arch)).encode() + _cpu_flags().encode())
    return os.path.join(cache_dir(), f"mxc_cpu_{arch}_{digest.hexdigest()[:16]}.so")


def build(force: bool = False, arch: str = "native") -> str:
    """Compile the library for `arch` (`ARCH_FLAGS`) if it is not cached; returns its path. Raises
    RuntimeError if it cannot."""
    path = library_path(arch)
    if os.path.isfile(path) and not force:
        return path
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found to build the CPU kernels")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *_SOURCES, "-o", tmp, *_flags(arch)], capture_output=True, text=True)
        if proc.returncode != 0 and onednn_install() is not None and arch == "native":
            # An installed oneDNN that does not build or link (another major version): build without it.
            proc = subprocess.run([cxx, *_SOURCES, "-o", tmp, *_flags(arch, with_onednn=False)],
                                  capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the CPU kernels failed:\n{proc.stderr[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)  # atomic: a concurrent process sees no half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def available() -> bool:
    """True when the kernels are usable here: a CPU device target and a library built (or buildable)."""
    import mindspore as ms

    if os.environ.get("MXC_PORTABLE_KERNELS") == "1" or ms.get_context("device_target") != "CPU":
        return False
    with _lock:
        if _state["path"] is None and _state["error"] is None:
            try:
                _state["path"] = build()
            except (RuntimeError, OSError) as e:
                _state["error"] = str(e)
        return _state["path"] is not None


def isa(arch: str = "native") -> str:
    """What the library for `arch` was built for on this machine (`ISA_NAMES`), or why there is none."""
    if arch == "native" and not available():
        return "none: " + (_state["error"] or "portable path forced or not a CPU target")
    return ISA_NAMES.get(ctypes.CDLL(build(arch=arch)).MxcGemmIsa(), "unknown")


def onednn(enable=None) -> bool:
    """Whether bf16 products of more than a few rows go to oneDNN in this process (False where the
    library was built without it). `enable` True / False switches it, for tests and benchmarks that
    compare the two paths."""
    if not available():
        return False
    return ctypes.CDLL(_state["path"]).MxcOnednn(-1 if enable is None else int(bool(enable))) == 1


def product_flops(reset: bool = False) -> int:
    """Floating-point operations (2 m n k a product) of the compute-bound products (`gemm_kernels.cc`: the GEMM and
    attention's products; not the decode-sized kernels) this process has run since the last reset, or 0 when the
    kernels are not `available()`. `reset` sets the count to 0 after reading it. A benchmark divides it by the
    machine's GEMM rate: how long its products alone would take."""
    if not available():
        return 0
    fn = ctypes.CDLL(_state["path"]).MxcGemmFlops
    fn.restype, fn.argtypes = ctypes.c_int64, [ctypes.c_int]
    return int(fn(int(bool(reset))))


def kernel_profile(path=None, reset: bool = False) -> bool:
    """In a profiling build (MXC_KERNEL_PROFILE=1 in the environment before the library is first built in the
    process): writes each kernel entry point's time, calls and products' FLOPs since the last reset to `path`
    (tab-separated: ms, calls, flops, kernel and its first three operands' shapes), then clears them when `reset`.
    Returns False where there is no such build (nothing written)."""
    if not available():
        return False
    fn = ctypes.CDLL(_state["path"]).MxcKernelProfile
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_char_p, ctypes.c_int]
    return fn(None if path is None else os.fsencode(path), int(bool(reset))) == 0


def _custom(lib, symbol, out_shape, bprop=None, out_dtype=None):
    import mindspore as ms
    from mindspore import ops

    return ops.Custom(f"{lib}:{symbol}", out_shape=out_shape, out_dtype=out_dtype or (lambda *a: ms.float32),
                      func_type="aot", bprop=bprop)


def _gemm_ops(lib, suffix):
    """The GEMM primitives of one arithmetic (`suffix` "" = exact, "Bf16" = bf16 products), with their
    gradients written with the same primitives (a product's gradients are products of the same kind).
    `attention(q, k, v, mask, divisor)` is softmax(q k^T / divisor + mask) v in one kernel (`csrc`)."""
    import mindspore as ms
    from mindspore import ops

    nn_ = _custom(lib, "MxcLinearNN" + suffix, lambda dy, w: list(dy[:-1]) + [w[1]])
    tn = _custom(lib, "MxcLinearTN" + suffix, lambda dy, x: [dy[-1], x[-1]])
    btn = _custom(lib, "MxcBatchTN" + suffix, lambda a, b: list(a[:-2]) + [a[-1], b[-1]])

    def linear_bprop(x, w, out, dout):
        return nn_(dout, w), tn(dout, x).astype(w.dtype)

    def bnt_bprop(a, b, out, dout):  # out = a b^T: da = dout b, db = dout^T a
        return bnn(dout, b), btn(dout, a)

    def bnn_bprop(a, b, out, dout):  # out = a b: da = dout b^T, db = a^T dout
        return bnt(dout, b), btn(a, dout)

    def attention_bprop(q, k, v, mask, div, out, dout):
        dq, dk, dv = attention_grad(q, k, v, mask, div, dout)
        return dq, dk, dv, ops.zeros_like(mask), ops.zeros_like(div)

    def attention_nomask_bprop(q, k, v, div, out, dout):
        dq, dk, dv = attention_grad_nomask(q, k, v, div, dout)
        return dq, dk, dv, ops.zeros_like(div)

    def linear_add_bprop(x, w, c, out, dout):
        return linear_bprop(x, w, out, dout) + (dout,)

    def linear_bias_bprop(x, w, b, out, dout):
        return linear_bprop(x, w, out, dout) + (dout.sum(0).astype(b.dtype),)

    def linear_bias_residual_bprop(x, w, b, r, out, dout):
        return linear_bias_bprop(x, w, b, out, dout) + (dout,)

    def linear_bias_gelu_bprop(x, w, b, out, dout):
        # d/dz z sigmoid(a z) = s + a z s (1 - s), s = sigmoid(a z), z the pre-activation (recomputed)
        z = linear_bias(x, w, b)
        s = ops.sigmoid(1.702 * z)
        return linear_bias_bprop(x, w, b, out, dout * (s + 1.702 * z * s * (1 - s)))

    def attention_tokens_bprop(q, k, v, div, out, dout):
        dq, dk, dv = attention_tokens_grad(q, k, v, div, dout)
        return dq, dk, dv, ops.zeros_like(div)

    def head_cross_entropy_bprop(h, w, labels, weight, out, dout):
        # out[1] is d sum(loss) / dh, computed with the loss: row i of dh scales by d total / d loss[i]. The head, the
        # labels and the weights are not differentiated (a frozen head: `weight_products.head_cross_entropy` takes
        # another path for a trained one). Their placeholders are one float each: a zeros_like of the head would
        # fill a tensor of its size on every PyNative call (and CPU has no bf16 ZerosLike).
        return (out[1] * dout[0].expand_dims(-1), ops.zeros((1,), ms.float32), ops.zeros_like(labels),
                ops.zeros_like(weight))

    # Outputs: loss [R], dh [R, K] and the kernel's [R, V] logits workspace (from the memory pool: see `csrc`).
    head_cross_entropy = _custom(lib, "MxcHeadCrossEntropy" + suffix,
                                 lambda h, w, l, wt: ([h[0]], list(h), [h[0], w[0]]), head_cross_entropy_bprop,
                                 out_dtype=lambda *a: (ms.float32,) * 3)
    linear = _custom(lib, "MxcLinearNT" + suffix, lambda x, w: list(x[:-1]) + [w[0]], linear_bprop)
    linear_add = _custom(lib, "MxcLinearNTAdd" + suffix, lambda x, w, c: list(c), linear_add_bprop)
    bnt = _custom(lib, "MxcBatchNT" + suffix, lambda a, b: list(a[:-1]) + [b[-2]], bnt_bprop)
    bnn = _custom(lib, "MxcBatchNN" + suffix, lambda a, b: list(a[:-1]) + [b[-1]], bnn_bprop)
    # The attention gradient (dq, dk, dv) is one kernel: it recomputes the weights by blocks of query rows and keeps
    # none of them (`csrc`); written with MindSpore ops, a compiled graph held every block's weights at once.
    three = (lambda *a: (ms.float32,) * 3)

    def qkv_shapes(q, k, v, *rest):
        return list(q), list(k), list(v)

    attention_grad = _custom(lib, "MxcAttentionGrad" + suffix, qkv_shapes, out_dtype=three)  # + mask
    attention_grad_nomask = _custom(lib, "MxcAttentionGrad" + suffix, qkv_shapes, out_dtype=three)
    attention_tokens_grad = _custom(lib, "MxcAttentionTokensGrad" + suffix, qkv_shapes, out_dtype=three)
    attention = _custom(lib, "MxcAttention" + suffix, lambda q, k, v, m, d: list(q), attention_bprop)
    attention_nomask = _custom(lib, "MxcAttention" + suffix, lambda q, k, v, d: list(q), attention_nomask_bprop)
    attention_tokens = _custom(lib, "MxcAttentionTokens" + suffix, lambda q, k, v, d: list(q), attention_tokens_bprop)
    linear_bias = _custom(lib, "MxcLinearNTBias" + suffix, lambda x, w, b: list(x[:-1]) + [w[0]], linear_bias_bprop)
    linear_bias_residual = _custom(lib, "MxcLinearNTBiasResidual" + suffix, lambda x, w, b, r: list(x[:-1]) + [w[0]],
                                   linear_bias_residual_bprop)
    linear_bias_gelu = _custom(lib, "MxcLinearNTBiasQuickGelu" + suffix, lambda x, w, b: list(x[:-1]) + [w[0]],
                               linear_bias_gelu_bprop)
    # Quantized weights (`mindxcomposer.quantization`), dequantized while packed: x, q, scales[, zeros, group size].
    # They are a frozen base (LoRA over a quantized model): the gradient is the input's alone, dx = dy W with W
    # dequantized tile by tile while the same GEMM packs it (x passes its shape: K); the stored parts get zeros.
    nn_int8 = _custom(lib, "MxcLinearNNQuant" + suffix, lambda dy, x, q, s: list(dy[:-1]) + [x[-1]])
    nn_int4 = _custom(lib, "MxcLinearNNQuant" + suffix, lambda dy, x, q, s, z, g: list(dy[:-1]) + [x[-1]])

    def linear_int8_bprop(x, q, s, out, dout):
        return nn_int8(dout, x, q, s), ops.zeros_like(q), ops.zeros_like(s)

    def linear_int4_bprop(x, q, s, z, g, out, dout):
        return (nn_int4(dout, x, q, s, z, g), ops.zeros_like(q), ops.zeros_like(s), ops.zeros_like(z),
                ops.zeros_like(g))

    linear_int8 = _custom(lib, "MxcLinearNTQuant" + suffix, lambda x, q, s: list(x[:-1]) + [q[0]], linear_int8_bprop)
    linear_int4 = _custom(lib, "MxcLinearNTQuant" + suffix, lambda x, q, s, z, g: list(x[:-1]) + [q[0]],
                          linear_int4_bprop)
    return SimpleNamespace(linear=linear, linear_add=linear_add, linear_bias=linear_bias,
                           linear_bias_residual=linear_bias_residual, linear_bias_quick_gelu=linear_bias_gelu,
                           batch_nt=bnt, batch_nn=bnn, attention=attention, attention_nomask=attention_nomask,
                           attention_tokens=attention_tokens, linear_bprop=linear_bprop, linear_int8=linear_int8,
                           linear_int4=linear_int4, linear_int8_bprop=linear_int8_bprop,
                           linear_int4_bprop=linear_int4_bprop, head_cross_entropy=head_cross_entropy)


def custom_ops():
    """The kernels as `ops.Custom` primitives, or None when not `available()`:
    `decode_linear`, `embedding` (bf16 weights, few rows) and `gemm[mode]` for mode "exact" / "bf16"
    with `linear` (x [..., K] x W [N, K]^T), `batch_nt` (a [..., M, K] b [..., N, K]^T) and
    `batch_nn` (a [..., M, K] b [..., K, N]), `linear_add` (c + x W^T), `linear_bias` (x W^T + b),
    `linear_bias_residual` (r + x W^T + b) and `linear_bias_quick_gelu`, `attention` / `attention_nomask` ([B, H, S, D]) / `attention_tokens`
    ([B, S, H, D], no mask), `head_cross_entropy` (h, W, labels, weights -> weighted losses [R] and their gradient
    in h [R, K]);
    `swiglu` (silu(g) * u), `rms_norm` (x [..., H], w [H], eps [1]), `layer_norm` (x, w, b [H], eps [1]),
    `rope_split` (packed q/k/v, cos, sin -> q, k, v heads-first; see `weight_products.rope_split`); all
    differentiable."""
    if not available():
        return None
    with _lock:
        if _state["ops"] is None:
            import mindspore as ms

            from mindspore import ops

            lib = _state["path"]
            gemm = {"exact": _gemm_ops(lib, ""), "bf16": _gemm_ops(lib, "Bf16")}

            # dg = dy u s (1 + g (1 - s)), du = dy g s (s the sigmoid of g): one kernel pass.
            swiglu_grad = _custom(lib, "MxcSwiGLUGrad", lambda g, u, d: (list(g), list(g)),
                                  out_dtype=lambda *a: (ms.float32, ms.float32))

            def swiglu_bprop(g, u, out, dout):
                return swiglu_grad(g, u, dout)

            # y = w (x r), r = (mean(x^2) + eps)^-1/2: dx = r w dy - x r^3 mean(w dy x), dw = sum(dy x r), one kernel.
            rms_norm_grad = _custom(lib, "MxcRmsNormGrad", lambda x, w, e, d: (list(x), list(w)),
                                    out_dtype=lambda *a: (ms.float32, ms.float32))

            def rms_norm_bprop(x, w, eps, out, dout):
                dx, dw = rms_norm_grad(x, w, eps, dout)
                return dx, dw.astype(w.dtype), ops.zeros_like(eps)

            layer_norm_grad = _custom(lib, "MxcLayerNormGrad", lambda x, w, b, e, d: (list(x), list(w), list(b)),
                                      out_dtype=lambda *a: (ms.float32,) * 3)

            def layer_norm_bprop(x, w, b, eps, out, dout):
                dx, dw, db = layer_norm_grad(x, w, b, eps, dout)
                return dx, dw.astype(w.dtype), db.astype(b.dtype), ops.zeros_like(eps)

            def rope_split_bprop(qkv, cos, sin, out, dout):
                # y = x cos + P(x) sin with P the swap of the halves of the last axis, a permutation that is its
                # own inverse: dx = dy cos + P^T(dy sin) = dy cos + P(dy sin). dy is the three heads-first
                # gradients put back in qkv's layout [B, N, KV, G + 2, D]. cos and sin are inputs, not trained.
                dq, dk, dv = dout
                b, n, kv, slots, d = qkv.shape
                half = d // 2
                dy = ops.concat([dq.reshape(b, kv, slots - 2, n, d).transpose(0, 3, 1, 2, 4),
                                 dk.transpose(0, 2, 1, 3).expand_dims(3), dv.transpose(0, 2, 1, 3).expand_dims(3)], 3)
                t = dy * sin
                dx = dy * cos + ops.concat([t[..., half:], t[..., :half]], -1)
                return dx, ops.zeros_like(cos), ops.zeros_like(sin)

            def rope_split_shapes(x, c, s):
                return [x[0], x[2] * (x[3] - 2), x[1], x[4]], [x[0], x[2], x[1], x[4]], [x[0], x[2], x[1], x[4]]

            def hash_dropout_bprop(x, seed, salt, row_base, p, keep_prob, out, dout):
                # y = x keep / (1 - p): dx is dy through the same mask, drawn again (no mask is kept)
                return (hash_dropout(dout, seed, salt, row_base, p, keep_prob), ops.zeros_like(seed),
                        ops.zeros_like(salt), ops.zeros_like(row_base), ops.zeros_like(p), ops.zeros_like(keep_prob))
            hash_dropout = _custom(lib, "MxcHashDropout", lambda x, *rest: list(x), hash_dropout_bprop)

            _state["ops"] = SimpleNamespace(
                swiglu=_custom(lib, "MxcSwiGLU", lambda g, u: list(g), swiglu_bprop),
                hash_dropout=hash_dropout,
                rms_norm=_custom(lib, "MxcRmsNorm", lambda x, w, e: list(x), rms_norm_bprop),
                layer_norm=_custom(lib, "MxcLayerNorm", lambda x, w, b, e: list(x), layer_norm_bprop),
                rope_split=_custom(lib, "MxcRopeSplit", rope_split_shapes, rope_split_bprop,
                                   out_dtype=lambda *a: (ms.float32,) * 3),
                # Short training samples reach it too: its gradient is the exact GEMM's.
                decode_linear=_custom(lib, "MxcLinearBf16", lambda x, w: list(x[:-1]) + [w[0]],
                                      gemm["exact"].linear_bprop),
                embedding=_custom(lib, "MxcEmbeddingBf16", lambda i, t: list(i) + [t[1]],
                                  out_dtype=lambda i, t: ms.float32),
                # Quantized weights, decode-sized rows (x, q, scales[, zeros, group size int32 [1]]); short training
                # samples reach them too: their gradient is the exact GEMM's.
                decode_int8=_custom(lib, "MxcLinearInt8", lambda x, q, s: list(x[:-1]) + [q[0]],
                                    gemm["exact"].linear_int8_bprop),
                decode_int4=_custom(lib, "MxcLinearInt4", lambda x, q, s, z, g: list(x[:-1]) + [q[0]],
                                    gemm["exact"].linear_int4_bprop),
                gemm=gemm,
            )
        return _state["ops"]


def _gemm_numpy(entry, a, w, bf16_products, arch, inner_axis):
    """`entry` (an `entry_points` GEMM: a, w, w is bf16 bits, out, M, w's rows, w's columns, bf16 products) on
    numpy arrays, through the library for `arch`; a's columns match w's axis `inner_axis`, the output has w's
    other axis."""
    import numpy as np

    fn = getattr(entry_points(ctypes.CDLL(build(arch=arch))), entry)
    a = np.ascontiguousarray(a, dtype=np.float32)
    w = np.ascontiguousarray(w)
    if w.dtype not in (np.float32, np.uint16) or a.ndim != 2 or w.ndim != 2 or a.shape[1] != w.shape[inner_axis]:
        names = ("dy [M, N]", "w [N, K]") if inner_axis == 0 else ("a [M, K]", "w [N, K]")
        raise ValueError(f"{entry} takes {names[0]} float32 and {names[1]} float32 or uint16 (bf16 bits), "
                         f"got {a.shape} {a.dtype} and {w.shape} {w.dtype}")
    out = np.empty((a.shape[0], w.shape[1 - inner_axis]), np.float32)
    fn(a.ctypes.data, w.ctypes.data, int(w.dtype == np.uint16), out.ctypes.data, a.shape[0], w.shape[0], w.shape[1],
       int(bf16_products))
    return out


def gemm_nt(a, w, bf16_products=False, arch="native"):
    """numpy: a [M, K] fp32 times w [N, K]^T (fp32, or bf16 bits as uint16) -> [M, N] fp32, through the
    library for `arch` directly (no MindSpore graph): for benchmarks and tests of the kernels themselves."""
    return _gemm_numpy("gemm_nt", a, w, bf16_products, arch, 1)


def gemm_nn(dy, w, bf16_products=False, arch="native"):
    """numpy: dy [M, N] fp32 times w [N, K] (fp32, or bf16 bits as uint16) -> [M, K] fp32 (a linear's input
    gradient), through the library for `arch` directly, as `gemm_nt`."""
    return _gemm_numpy("gemm_nn", dy, w, bf16_products, arch, 0)


class AotCall:
    """One call of a kernel by MindSpore's AOT convention (params, ndims, shapes, dtype names: inputs then
    outputs) on numpy arrays, without MindSpore, kept ready to be repeated (benchmarks, tests); the arrays are
    kept alive. uint16 arrays are bf16 bits (named "bfloat16", as MindSpore names that dtype)."""

    def __init__(self, fn, arrays):
        self.fn, self.arrays = fn, arrays
        n = len(arrays)
        self.params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
        self.ndims = (ctypes.c_int * n)(*[a.ndim for a in arrays])
        self.shape_arrays = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
        self.shapes = (ctypes.POINTER(ctypes.c_int64) * n)(
            *[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in self.shape_arrays])
        self.dtypes = (ctypes.c_char_p * n)(
            *[b"bfloat16" if a.dtype.name == "uint16" else a.dtype.name.encode() for a in arrays])

    def __call__(self):
        rc = self.fn(len(self.arrays), self.params, self.ndims, self.shapes, self.dtypes, None, None)
        if rc != 0:
            raise RuntimeError(f"kernel returned {rc}")


def entry_points(lib):
    """The library's plain-C entry points with their signatures set (one home for them): `gemm_nt`
    (MxcGemmNT: a, w, w is bf16 bits, c, m, n, k, bf16 products), `gemm_nn` (MxcGemmNN: dy, w, w is bf16 bits,
    dx, m, n, k, bf16 products), `gemm_nt_quant` (MxcGemmNTQuant: a, q, scales, zeros, bits, c, m, n, k, group,
    bf16 products), and fine-tuning's optimizer: `adamw_step` (MxcAdamWStep: p, m, v, g in place, n, then the
    update's fp32 scalars as `finetune.optim._adamw_update` takes them) and `sum_squares` (MxcSumSquares: x, n ->
    the sum of squares in double)."""
    from types import SimpleNamespace

    gemm_nt = lib.MxcGemmNT
    gemm_nt.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    gemm_nn = lib.MxcGemmNN
    gemm_nn.argtypes = gemm_nt.argtypes
    gemm_nt_quant = lib.MxcGemmNTQuant
    gemm_nt_quant.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 4
                              + [ctypes.c_int])
    adamw_step = lib.MxcAdamWStep
    adamw_step.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_float] * 7
    adamw_step.restype = None
    sum_squares = lib.MxcSumSquares
    sum_squares.argtypes, sum_squares.restype = [ctypes.c_void_p, ctypes.c_int64], ctypes.c_double
    return SimpleNamespace(gemm_nt=gemm_nt, gemm_nn=gemm_nn, gemm_nt_quant=gemm_nt_quant, adamw_step=adamw_step,
                           sum_squares=sum_squares)


def host_entry_points():
    """`entry_points` of the library MindSpore uses, for numpy arrays in host memory (fine-tuning's optimizer), or
    None when the kernels are not `available()` (then not on CPU, or not built)."""
    if not available():
        return None
    with _lock:
        if _state["entry_points"] is None:
            _state["entry_points"] = entry_points(ctypes.CDLL(_state["path"]))
        return _state["entry_points"]


def decode_bf16(x, w_bits, arch="native"):
    """numpy: x [M, K] fp32 times a bf16 weight w [N, K] (its bits, uint16) -> [M, N] fp32, through the decode
    kernel (`csrc/bf16_kernels.cc`) of the library for `arch` directly."""
    import numpy as np

    lib = ctypes.CDLL(build(arch=arch))
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(w_bits, dtype=np.uint16)
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    AotCall(lib.MxcLinearBf16, [x, w, out])()
    return out


def _quant_arrays(parts, bits):
    """The contiguous (qweight, scales, zero points) a quantized kernel call takes; int8 has no zero points,
    so a one-byte placeholder stands for the pointer."""
    import numpy as np

    q = np.ascontiguousarray(parts["qweight"])
    scales = np.ascontiguousarray(parts["scales"], dtype=np.float32)
    zeros = np.ascontiguousarray(parts["qzeros"]) if bits == 4 else np.zeros(1, np.uint8)
    return q, scales, zeros


def quant_linear(x, parts, bits, group_size=-1, arch="native", gemm=False, bf16_products=False):
    """numpy: x [M, K] fp32 times a quantized weight (`quantization` parts) -> [M, N] fp32, through the library
    for `arch` directly: the decode kernel, or with `gemm` the blocked GEMM that dequantizes while packing."""
    import numpy as np

    lib = ctypes.CDLL(build(arch=arch))
    x = np.ascontiguousarray(x, dtype=np.float32)
    q, scales, zeros = _quant_arrays(parts, bits)
    m, k = x.shape
    out = np.empty((m, q.shape[0]), np.float32)
    if gemm:
        rc = entry_points(lib).gemm_nt_quant(x.ctypes.data, q.ctypes.data, scales.ctypes.data, zeros.ctypes.data,
                                             bits, out.ctypes.data, m, q.shape[0], k, group_size, int(bf16_products))
    else:
        fn = lib.MxcQuantLinear
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 4
        rc = fn(x.ctypes.data, q.ctypes.data, scales.ctypes.data, zeros.ctypes.data, bits, out.ctypes.data, m,
                q.shape[0], k, group_size)
    if rc != 0:
        raise ValueError(f"quantized product rejected its shapes: x {x.shape}, qweight {q.shape}, "
                         f"scales {scales.shape}, group size {group_size}")
    return out


def quant_input_grad(dy, parts, bits, in_features, group_size=-1, arch="native", bf16_products=False):
    """numpy: dy [M, N] fp32 times a quantized weight W [N, K] (`quantization` parts) -> dy W [M, K] fp32, the
    input gradient of `quant_linear`, through the library for `arch` directly (the GEMM's NN product, W
    dequantized while packed)."""
    import numpy as np

    lib = ctypes.CDLL(build(arch=arch))
    dy = np.ascontiguousarray(dy, dtype=np.float32)
    q, scales, zeros = _quant_arrays(parts, bits)
    m, n = dy.shape
    if q.shape[0] != n or q.shape[1] != (in_features if bits == 8 else (in_features + 1) // 2):
        raise ValueError(f"dy {dy.shape} and K {in_features} do not fit qweight {q.shape}")
    out = np.empty((m, in_features), np.float32)
    fn = lib.MxcGemmNNQuant
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_int]
    if fn(dy.ctypes.data, q.ctypes.data, scales.ctypes.data, zeros.ctypes.data, bits, out.ctypes.data, m, n,
          in_features, group_size, int(bf16_products)) != 0:
        raise ValueError(f"quantized input gradient rejected its shapes: dy {dy.shape}, qweight {q.shape}, "
                         f"group size {group_size}")
    return out


def main(argv=None):
    """`python -m mindxcomposer.ops [--force]`: builds the library for this CPU and says what it uses."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        print(build(force="--force" in argv))
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    print(isa())
    print("oneDNN bf16 products:", "on" if onednn() else ("off" if onednn_install() else "not installed"))
    return 0
