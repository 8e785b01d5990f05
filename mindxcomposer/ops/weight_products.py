"""Products: the single dispatch point between storage dtypes, compute dtypes and kernels.

Weights are kept in the checkpoint's dtype (bf16 for the release) and activations are in the model's
compute dtype (fp32 on CPU, where MindSpore has no bf16 MatMul; bf16 on Ascend, as upstream runs).
Every product with a stored weight (`linear`) and attention's two products (`batch_nt`, `batch_nn`)
come through here. A product has one of two arithmetics (`PRODUCT_MODES`), a property of the model
(`InternLMXComposer2ForCausalLM.products`):

- `exact` (the default): fp32 products and sums, so a bf16-stored model computes exactly what an
  fp32-stored copy of the same values computes;
- `bf16`: both inputs are rounded to bf16 and products accumulate in fp32 into an fp32 output, as
  upstream's bf16 inference rounds them (on CPU: AVX512-BF16 where the CPU has it). Everything that is
  not a product (norms, softmax, RoPE, residuals, activations) stays fp32.

The paths, chosen per call from static shapes and dtypes:

- CPU with the kernels of `cpu_kernels` (built from the package's own sources):
  - at most `KERNEL_MAX_ROWS` rows (decode steps; read-bound): a bf16 weight goes through the decode
    kernel, which reads its bits in place; an fp32 weight through MindSpore's MatMul. Both exact, in
    either mode: a decode step's time is the weight read, not the arithmetic;
  - more rows (prefill chunks, the ViT, the projector, attention, training): the blocked GEMM of
    `csrc/gemm_kernels.cc` in the model's arithmetic. bf16 weights are widened while the GEMM packs
    them: no fp32 copy of a weight exists and no separate cast pass runs. Its gradients are the same
    GEMM's products (the primitives are differentiable).
- elsewhere (Ascend, GPU, or no kernels here): MindSpore's MatMul / BatchMatMul in the compute dtype,
  after a cast of the weight when it is stored in another dtype (exact for bf16 -> fp32). In the bf16
  arithmetic with fp32 activations, both inputs are first rounded to bf16 (a cast there and back), so
  this path computes the same products as the kernels, only slower.
"""
import contextlib

import mindspore as ms
from mindspore import ops

from . import cpu_kernels

EXACT, BF16 = "exact", "bf16"
PRODUCT_MODES = (EXACT, BF16)
KERNEL_MAX_ROWS = 16  # above this a product is compute-bound: the GEMM kernel; at or below, read-bound

_matmul_t = ops.MatMul(transpose_b=True)
_bmm_t = ops.BatchMatMul(transpose_b=True)
_bmm = ops.BatchMatMul()

# The CPU kernels (`cpu_kernels.custom_ops()`) once enabled; read when a graph is traced.
_kernels = None


def enable_kernels() -> bool:
    """Turn the CPU kernels on if they can be built here (see `cpu_kernels.available`)."""
    global _kernels
    if _kernels is None:
        _kernels = cpu_kernels.custom_ops()
    return _kernels is not None


def kernels_enabled() -> bool:
    return _kernels is not None


def kernels():
    """The CPU kernels' primitives (`cpu_kernels.custom_ops()`) when enabled, else None."""
    return _kernels


@contextlib.contextmanager
def kernels_disabled():
    """Within it, every op takes the portable path (graphs traced meanwhile keep it): for tests and benchmarks
    that put the kernels against the path they replace."""
    global _kernels
    before, _kernels = _kernels, None
    try:
        yield
    finally:
        _kernels = before


def cast_like(p, x):
    """A parameter (norm weight, bias, embedding row...) in the dtype of the activations x."""
    return p if p.dtype == x.dtype else p.astype(x.dtype)


def _gemm_ready(x, w):
    return _kernels is not None and x.dtype == ms.float32 and w.dtype in (ms.float32, ms.bfloat16)


def _rounded(t, products):
    """The portable path's bf16 products: an fp32 operand rounded to bf16 (and back)."""
    if products == BF16 and t.dtype == ms.float32:
        return t.astype(ms.bfloat16).astype(ms.float32)
    return t


def linear(x, w, products=EXACT):
    """x [..., K] in the compute dtype, w [N, K] in the storage dtype -> x w^T [..., N] in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if _gemm_ready(x, w) and x2.shape[0] > KERNEL_MAX_ROWS:
        y = _kernels.gemm[products].linear(x2, w)
    elif _gemm_ready(x, w) and w.dtype == ms.bfloat16:
        y = _kernels.decode_linear(x2, w)  # decode-sized: exact in either arithmetic
    else:
        mode = products if x2.shape[0] > KERNEL_MAX_ROWS else EXACT  # decode-sized: exact, as above
        y = _matmul_t(_rounded(x2, mode), _rounded(w if w.dtype == x.dtype else w.astype(x.dtype), mode))
    return y.reshape(lead + (w.shape[0],))


def linear_add(x, w, c, products=EXACT):
    """c + x w^T (c [..., N] in x's dtype): a product added onto another result, in one pass on CPU (the
    kernel starts its sums from c's values: with K <= 256 exactly c + linear(x, w))."""
    x2 = x.reshape(-1, x.shape[-1])
    if _gemm_ready(x, w) and x2.shape[0] > KERNEL_MAX_ROWS and c.dtype == x.dtype:
        return _kernels.gemm[products].linear_add(x2, w, c.reshape(-1, w.shape[0])).reshape(c.shape)
    return c + linear(x, w, products)


QUICK_GELU = "quick_gelu"  # CLIP's MLP activation, the one `linear_bias` can apply


def quick_gelu(x):
    """CLIP's activation: x sigmoid(1.702 x)."""
    return x * ops.sigmoid(1.702 * x)


def linear_bias(x, w, b, products=EXACT, act=None, residual=None):
    """act(x w^T + b), plus `residual` [..., N] when given (then without activation), b [N] a stored bias
    and `act` None or `QUICK_GELU`: on CPU the bias, the activation and the residual are applied in one
    pass over the product's output (the ViT's layers)."""
    if act is not None and residual is not None:
        raise ValueError("linear_bias applies an activation or adds a residual, not both")
    x2 = x.reshape(-1, x.shape[-1])
    shape = x.shape[:-1] + (w.shape[0],)
    if (_gemm_ready(x, w) and x2.shape[0] > KERNEL_MAX_ROWS and b.dtype in (ms.float32, ms.bfloat16)
            and (residual is None or residual.dtype == ms.float32)):
        gemm = _kernels.gemm[products]
        if residual is not None:
            return gemm.linear_bias_residual(x2, w, b, residual.reshape(-1, w.shape[0])).reshape(shape)
        return (gemm.linear_bias_quick_gelu if act == QUICK_GELU else gemm.linear_bias)(x2, w, b).reshape(shape)
    y = linear(x, w, products) + cast_like(b, x)
    if act == QUICK_GELU:
        y = quick_gelu(y)
    return y if residual is None else residual + y


def swiglu(g, u):
    """silu(g) * u, SwiGLU's elementwise part: one pass on CPU (it is not a product: no arithmetic mode)."""
    if _kernels is not None and g.dtype == ms.float32 and u.dtype == ms.float32:
        return _kernels.swiglu(g, u)
    return ops.silu(g) * u


def hash_dropout(x, p, seed, salt, row_base):
    """Dropout whose mask is a pure function of (seed, salt, element position): recomputing a block
    in its gradient cell draws the same mask as its forward did (a stateful RNG would not).
    The mask comes from the classic sin-hash, fractional part of sin(a r + b c + s) * 43758.5453, where r is the
    element's row in the micro-batch's [B * n] rows: x [B, m, cols] holds rows row_base[b] + 0..m-1 of sample b
    (row_base float32 [B, 1]), so a block of rows draws the mask the whole sequence draws there. On CPU one kernel
    pass (the same operations; libm's sin, see `csrc`), elsewhere ten element-wise kernels."""
    if _kernels is not None and x.dtype == ms.float32:
        return _kernels.hash_dropout(x, seed, ops.full((1,), salt, dtype=ms.float32), row_base,
                                     ops.full((1,), p, dtype=ms.float32), ops.full((1,), 1.0 - p, dtype=ms.float32))
    cols = x.shape[-1]
    rows = x.size // cols
    m = rows // row_base.shape[0]
    r = (row_base + ops.arange(m).astype(ms.float32).reshape(1, m)).reshape(rows, 1)
    c = ops.arange(cols).astype(ms.float32).reshape(1, cols)
    u = ops.sin(r * 12.9898 + c * 78.233 + (seed + salt)) * 43758.5453
    u = u - ops.floor(u)
    keep = (u >= p).astype(x.dtype).reshape(x.shape)
    return x * keep / (1.0 - p)


def rms_norm(x, weight, eps):
    """InternLM2's RMSNorm: statistics in fp32, the scale applied after casting back (upstream's order); one
    kernel on CPU for fp32 activations (it is not a product: no arithmetic mode)."""
    if _kernels is not None and x.dtype == ms.float32 and weight.dtype in (ms.float32, ms.bfloat16):
        return _kernels.rms_norm(x, weight, ops.full((1,), eps, dtype=ms.float32))
    dtype = x.dtype
    h = x.astype(ms.float32)
    variance = h.pow(2).mean(-1, keep_dims=True)
    h = h * ops.rsqrt(variance + eps)
    return cast_like(weight, x) * h.astype(dtype)


def layer_norm(x, weight, bias, eps, portable):
    """LayerNorm over the last axis (the ViT's): one kernel on CPU for fp32 activations (weight and bias read in
    their stored dtype, fp32 or bf16); elsewhere `portable`, the caller's `ops.LayerNorm` primitive of this `eps`,
    on the weight and bias cast to x's dtype. Not a product: no arithmetic mode."""
    if (_kernels is not None and x.dtype == ms.float32 and weight.dtype in (ms.float32, ms.bfloat16)
            and bias.dtype in (ms.float32, ms.bfloat16)):
        return _kernels.layer_norm(x, weight, bias, ops.full((1,), eps, dtype=ms.float32))
    return portable(x, cast_like(weight, x), cast_like(bias, x))[0]


def rope_split(qkv, cos, sin, swap_halves):
    """RoPE on the packed q/k/v of a decoder layer and their split into heads-first tensors (not a product: no
    arithmetic mode). qkv [B, N, KV, G + 2, D] (per kv group G query heads, the key, the value), cos / sin
    [B, N, 1, G + 2, D] (`rope.packed_rope`), `swap_halves` the int32 [D] permutation that swaps the halves of
    the last axis -> q [B, KV G, N, D], k [B, KV, N, D], v [B, KV, N, D], every slot x cos + swap_halves(x) sin.
    On CPU with fp32 activations one kernel pass writes q, k and v directly, its products and sum rounded one by
    one as the portable path's kernels round them (bit for bit the same values); elsewhere Mul, Gather, Mul,
    Add and three transposes."""
    b, n, kv, slots, d = qkv.shape
    if _kernels is not None and qkv.dtype == ms.float32 and cos.dtype == ms.float32 and sin.dtype == ms.float32:
        return _kernels.rope_split(qkv, cos, sin)
    g = slots - 2
    qkv = qkv * cos + ops.gather(qkv, swap_halves, qkv.ndim - 1) * sin
    if n == 1:  # the transposes below only move a length-1 axis
        return qkv[:, :, :, :g].reshape(b, kv * g, 1, d), qkv[:, :, :, g].reshape(b, kv, 1, d), \
            qkv[:, :, :, g + 1].reshape(b, kv, 1, d)
    return (qkv[:, :, :, :g].transpose(0, 2, 3, 1, 4).reshape(b, kv * g, n, d), qkv[:, :, :, g].transpose(0, 2, 1, 3),
            qkv[:, :, :, g + 1].transpose(0, 2, 1, 3))


def head_cross_entropy(h, w, labels, weight, products=EXACT, head_grad=False):
    """Fine-tuning's loss per position: weight * CrossEntropy(h w^T, labels), h [..., K] the normed hidden rows in
    the compute dtype, w [V, K] the output head, labels int32 [...] and weight float32 [...] (0 on positions without
    a target, whose label is then not read) -> float32 [...]. On CPU with the kernels and a frozen head (`head_grad`
    False) one kernel computes the logits, the loss and its gradient in h together and keeps the [rows, V] logits
    to itself (`csrc`: no softmax, gather and their gradients as separate passes over them); it is differentiable
    in h only. Elsewhere, or for a trained head: the head's product, log-softmax and gather, differentiable in
    h and w."""
    if not head_grad and _gemm_ready(h, w):
        h2 = h.reshape(-1, h.shape[-1])
        if h2.shape[0] > KERNEL_MAX_ROWS:
            loss = _kernels.gemm[products].head_cross_entropy(h2, w, labels.reshape(-1), weight.reshape(-1))[0]
            return loss.reshape(labels.shape)
    logp = ops.log_softmax(linear(h, w, products).astype(ms.float32), -1)
    return -ops.gather_elements(logp, logp.ndim - 1, labels.expand_dims(-1)).squeeze(-1) * weight


def _batch_product(a, b, products, transpose_b):
    """Both operands activations, batched: a b^T or a b; decode-sized rows stay exact (as `linear`)."""
    portable = _bmm_t if transpose_b else _bmm
    if a.shape[-2] <= KERNEL_MAX_ROWS:
        return portable(a, b)
    if _gemm_ready(a, b) and b.dtype == a.dtype:
        gemm = _kernels.gemm[products]
        return gemm.batch_nt(a, b) if transpose_b else gemm.batch_nn(a, b)
    return portable(_rounded(a, products), _rounded(b, products))


def batch_nt(a, b, products=EXACT):
    """a [..., M, K] b [..., N, K]^T -> [..., M, N] (attention's scores), both activations."""
    return _batch_product(a, b, products, True)


def batch_nn(a, b, products=EXACT):
    """a [..., M, K] b [..., K, N] -> [..., M, N] (attention's weighted values), both activations."""
    return _batch_product(a, b, products, False)


def embedding(ids, table, dtype):
    """Rows of `table` [V, H] at int32 `ids` [...], in `dtype` -> [..., H]."""
    if table.dtype == dtype:
        return ops.gather(table, ids, 0)
    if _kernels is not None and table.dtype == ms.bfloat16 and dtype == ms.float32:
        return _kernels.embedding(ids, table)
    return ops.gather(table.astype(dtype), ids, 0)


# ---- quantized weights (`mindxcomposer.quantization`: int8 per output channel, int4 group-wise) -------------
def dequantize_int8(q, scales):
    """q int8 [N, K], scales fp32 [N] -> fp32 [N, K]: q * scale, as `quantization.dequantize`."""
    return q.astype(ms.float32) * scales.reshape(-1, 1)


def dequantize_int4(q, scales, zeros, in_features, group_size):
    """q uint8 [N, ceil(K / 2)] (even k in the low nibble), scales fp32 / zeros uint8 [N, G] -> fp32 [N, K]:
    (q - zero) * scale, as `quantization.dequantize`. The nibbles are split in fp32 (exact: values < 256)."""
    n, groups = scales.shape
    b = q.astype(ms.float32)
    hi = ops.floor(b / 16.0)
    v = ops.stack([b - hi * 16.0, hi], -1).reshape(n, -1)
    if v.shape[1] != in_features:
        v = v[:, :in_features]
    pad = groups * group_size - in_features
    if pad:
        v = ops.concat([v, ops.zeros((n, pad), ms.float32)], 1)
    w = (v.reshape(n, groups, group_size) - zeros.astype(ms.float32).reshape(n, groups, 1)) * scales.reshape(
        n, groups, 1)
    w = w.reshape(n, groups * group_size)
    return w[:, :in_features] if pad else w


def _dequantized_product(x, w, products):
    """The portable path of a quantized product: x times an fp32 weight dequantized in the graph. A quantized
    weight is a frozen base (LoRA over it): the gradient flows to x alone (dx = dy W), none into the stored
    integers, scales and zero points."""
    w = ops.stop_gradient(w)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    mode = products if x2.shape[0] > KERNEL_MAX_ROWS else EXACT  # decode-sized: exact, as `linear`
    y = _matmul_t(_rounded(x2, mode), _rounded(w if w.dtype == x.dtype else w.astype(x.dtype), mode))
    return y.reshape(lead + (w.shape[0],))


def _quant_kernel_ready(x):
    return _kernels is not None and x.dtype == ms.float32


def linear_int8(x, q, scales, products=EXACT):
    """x [..., K] times an int8 weight (q int8 [N, K], scales fp32 [N]) -> [..., N] in x's dtype. CPU kernels:
    decode-sized rows read q in place; more rows go through the GEMM, which dequantizes while it packs.
    Differentiable in x only (a frozen base): dx = dy W, on the CPU the GEMM's NN product dequantizing W while it
    packs (`cpu_kernels`), as the dequantized fp32 twin's gradient packs its fp32 W."""
    if _quant_kernel_ready(x):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= KERNEL_MAX_ROWS:
            y = _kernels.decode_int8(x2, q, scales)
        else:
            y = _kernels.gemm[products].linear_int8(x2, q, scales)
        return y.reshape(x.shape[:-1] + (q.shape[0],))
    return _dequantized_product(x, dequantize_int8(q, scales), products)


def linear_int4(x, q, scales, zeros, group_size, products=EXACT):
    """x [..., K] times an int4 weight (`dequantize_int4`) -> [..., N] in x's dtype; paths as `linear_int8`."""
    if _quant_kernel_ready(x):
        x2 = x.reshape(-1, x.shape[-1])
        gs = ms.Tensor([group_size], ms.int32)
        if x2.shape[0] <= KERNEL_MAX_ROWS:
            y = _kernels.decode_int4(x2, q, scales, zeros, gs)
        else:
            y = _kernels.gemm[products].linear_int4(x2, q, scales, zeros, gs)
        return y.reshape(x.shape[:-1] + (q.shape[0],))
    return _dequantized_product(x, dequantize_int4(q, scales, zeros, x.shape[-1], group_size), products)
