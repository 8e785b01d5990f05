"""Products with stored weights: the single dispatch point between storage and compute dtypes.

Weights are kept in the checkpoint's dtype (bf16 for the release) and the arithmetic runs in the
model's compute dtype (fp32 on CPU, where MindSpore has no bf16 MatMul or Gather kernel; bf16 on
Ascend, as upstream runs). Three paths, chosen per call from static shapes and dtypes:

- same dtype: MindSpore's MatMul / Gather, as before (fp32 checkpoints, and bf16 on Ascend);
- bf16 weight, fp32 activations, at most `KERNEL_MAX_ROWS` rows (decode steps): the CPU kernels of
  `bf16_kernels.py`, which read the bf16 bits directly; no fp32 copy of the weight is ever made;
- otherwise (prefill chunks, the ViT, or no kernel): cast the weight to the compute dtype, then
  MatMul. bf16 -> fp32 is exact, so this equals an fp32-stored model bit for bit; the cast is a
  transient the size of one weight, and its cost is small next to a product over hundreds of rows.
"""
import mindspore as ms
from mindspore import ops

from . import bf16_kernels

_matmul_t = ops.MatMul(transpose_b=True)
KERNEL_MAX_ROWS = 16  # above this a product is compute-bound: the cast + oneDNN GEMM is faster

# (linear, embedding) Custom primitives when enabled; read when a graph is traced.
_kernels = None


def enable_kernels() -> bool:
    """Turn the bf16 CPU kernels on if they can be built here (see `bf16_kernels.available`)."""
    global _kernels
    if _kernels is None:
        _kernels = bf16_kernels.custom_ops()
    return _kernels is not None


def kernels_enabled() -> bool:
    return _kernels is not None


def cast_like(p, x):
    """A parameter (norm weight, bias, embedding row...) in the dtype of the activations x."""
    return p if p.dtype == x.dtype else p.astype(x.dtype)


def linear(x, w):
    """x [..., K] in the compute dtype, w [N, K] in the storage dtype -> x w^T [..., N] in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if w.dtype == x.dtype:
        y = _matmul_t(x2, w)
    elif _kernels is not None and w.dtype == ms.bfloat16 and x.dtype == ms.float32 and x2.shape[0] <= KERNEL_MAX_ROWS:
        y = _kernels[0](x2, w)
    else:
        y = _matmul_t(x2, w.astype(x.dtype))
    return y.reshape(lead + (w.shape[0],))


def embedding(ids, table, dtype):
    """Rows of `table` [V, H] at int32 `ids` [...], in `dtype` -> [..., H]."""
    if table.dtype == dtype:
        return ops.gather(table, ids, 0)
    if _kernels is not None and table.dtype == ms.bfloat16 and dtype == ms.float32:
        return _kernels[1](ids, table)
    return ops.gather(table.astype(dtype), ids, 0)
