"""Scaled dot-product attention: one portable path, and Ascend's fused kernel behind one switch.

The portable path (two products + fp32 softmax) runs on CPU, GPU and Ascend and is what every test uses;
its products go through `weight_products` (the CPU GEMM kernels for prompt-sized rows, in the model's
arithmetic). `flash_attention_score` exists only on Ascend; it is chosen only when the device target is
Ascend and the caller did not ask for the portable path.
"""
import mindspore as ms
from mindspore import ops

from .weight_products import EXACT, KERNEL_MAX_ROWS, batch_nn, batch_nt, kernels


def fused_attention_available() -> bool:
    return ms.get_context("device_target") == "Ascend"


def portable_attention(q, k, v, mask, scale_divisor, products=EXACT):
    """q [B,H,L,D], k/v [B,KV,S,D] with H a multiple of KV (grouped-query), mask additive [B,1,L,S] or
    None. Returns [B,H,L,D].

    The query heads of a group are stacked against their shared key head instead of repeating the
    keys, which would copy the whole KV cache at every decode step. Scores are divided by
    `scale_divisor` (sqrt(head_dim) as upstream; 1 where the query is scaled before, as CLIP does), and
    the softmax runs in fp32 whatever the compute dtype."""
    b, h, n, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    cpu = kernels()
    if cpu is not None and q.dtype == ms.float32 and g * n > KERNEL_MAX_ROWS:
        # Prompt-sized rows on CPU: one kernel (products, scale, mask, softmax) that skips the keys no row of
        # a block sees and never holds [heads, n, S] scores; the same arithmetic up to rounding.
        div = ops.full((1,), scale_divisor, dtype=ms.float32)
        qs = q.reshape(b, kv, g * n, d)
        if mask is None:
            out = cpu.gemm[products].attention_nomask(qs, k, v, div)
        else:
            out = cpu.gemm[products].attention(qs, k, v, mask.astype(ms.float32), div)
        return out.reshape(b, h, n, d)
    scores = batch_nt(q.reshape(b, kv, g * n, d), k, products)
    if scale_divisor != 1:
        scores = scores / scale_divisor
    scores = scores.reshape(b, kv, g, n, s)
    if mask is not None:
        scores = scores + mask.expand_dims(1)
    probs = ops.softmax(scores.astype(ms.float32), axis=-1).astype(q.dtype)
    out = batch_nn(probs.reshape(b, kv, g * n, s), v, products)
    return out.reshape(b, h, n, d)


def _fused_attention(q, k, v, mask, scale_divisor):
    from mindspore.ops import flash_attention_score  # Ascend only

    # The fused kernel takes a boolean "masked out" tensor instead of an additive one.
    keep_out = None if mask is None else (mask < 0).astype(ms.uint8)
    # Grouped k/v heads are native to the kernel: k and v keep their KV heads.
    return flash_attention_score(q, k, v, head_num=q.shape[1], attn_mask=keep_out,
                                 scalar_value=1.0 / float(scale_divisor), input_layout="BNSD")


def attention(q, k, v, mask, scale_divisor, use_fused=False, products=EXACT):
    """The single dispatch point. `use_fused` is decided once, at model build time, from the device;
    `products` is the model's arithmetic (`weight_products.PRODUCT_MODES`)."""
    if use_fused:
        return _fused_attention(q, k, v, mask, scale_divisor)
    return portable_attention(q, k, v, mask, scale_divisor, products)
