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


BNSD, BSND = "BNSD", "BSND"  # heads before rows (the decoder, its cache) or rows before heads (the ViT)


def _heads_first(t):
    return t.transpose(0, 2, 1, 3)


def portable_attention(q, k, v, mask, scale_divisor, products=EXACT, layout=BNSD):
    """q [B,H,L,D], k/v [B,KV,S,D] with H a multiple of KV (grouped-query), mask additive [B,1,L,S] or
    None. Returns [B,H,L,D]. With `layout` BSND, q / k / v and the result are [B,L,H,D] / [B,S,KV,D]
    (the projections' own layout: the CPU kernel reads it with strides, no transposes).

    The query heads of a group are stacked against their shared key head instead of repeating the
    keys, which would copy the whole KV cache at every decode step. Scores are divided by
    `scale_divisor` (sqrt(head_dim) as upstream; 1 where the query is scaled before, as CLIP does), and
    the softmax runs in fp32 whatever the compute dtype."""
    cpu = kernels()
    if layout == BSND:
        if (cpu is not None and q.dtype == ms.float32 and mask is None and q.shape[2] == k.shape[2]
                and q.shape[1] > KERNEL_MAX_ROWS):
            return cpu.gemm[products].attention_tokens(q, k, v, ops.full((1,), scale_divisor, dtype=ms.float32))
        out = portable_attention(_heads_first(q), _heads_first(k), _heads_first(v), mask, scale_divisor, products)
        return _heads_first(out)
    b, h, n, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    if cpu is not None and q.dtype == ms.float32:
        # On CPU: one kernel (products, scale, mask, softmax) that skips the keys no row of a block sees and never
        # holds [heads, n, S] scores; the same arithmetic up to rounding. Decode-sized rows too: a decode step
        # then reads the cache only up to its last visible slot, in one launch instead of six, with exact
        # products (as `batch_nt` / `batch_nn` keep decode-sized rows).
        mode = products if g * n > KERNEL_MAX_ROWS else EXACT
        div = ops.full((1,), scale_divisor, dtype=ms.float32)
        qs = q.reshape(b, kv, g * n, d)
        if mask is None:
            out = cpu.gemm[mode].attention_nomask(qs, k, v, div)
        else:
            out = cpu.gemm[mode].attention(qs, k, v, mask.astype(ms.float32), div)
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


def _fused_attention(q, k, v, mask, scale_divisor, layout):
    from mindspore.ops import flash_attention_score  # Ascend only

    # The fused kernel takes a boolean "masked out" tensor instead of an additive one.
    keep_out = None if mask is None else (mask < 0).astype(ms.uint8)
    # Grouped k/v heads are native to the kernel: k and v keep their KV heads.
    return flash_attention_score(q, k, v, head_num=q.shape[1 if layout == BNSD else 2], attn_mask=keep_out,
                                 scalar_value=1.0 / float(scale_divisor), input_layout=layout)


def attention(q, k, v, mask, scale_divisor, use_fused=False, products=EXACT, layout=BNSD):
    """The single dispatch point. `use_fused` is decided once, at model build time, from the device;
    `products` is the model's arithmetic (`weight_products.PRODUCT_MODES`); `layout` BNSD ([B, H, S, D])
    or BSND ([B, S, H, D])."""
    if use_fused:
        return _fused_attention(q, k, v, mask, scale_divisor, layout)
    return portable_attention(q, k, v, mask, scale_divisor, products, layout)
