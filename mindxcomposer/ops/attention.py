"""Scaled dot-product attention: one portable path, and Ascend's fused kernel behind one switch.

The portable path (BatchMatMul + fp32 softmax) runs on CPU, GPU and Ascend and is what every test uses.
`flash_attention_score` exists only on Ascend; it is chosen only when the device target is Ascend and
the caller did not ask for the portable path.
"""
import mindspore as ms
from mindspore import ops

_bmm_t = ops.BatchMatMul(transpose_b=True)
_bmm = ops.BatchMatMul()


def fused_attention_available() -> bool:
    return ms.get_context("device_target") == "Ascend"


def portable_attention(q, k, v, mask, scale_divisor):
    """q [B,H,L,D], k/v [B,KV,S,D] with H a multiple of KV (grouped-query), mask additive [B,1,L,S] or
    None. Returns [B,H,L,D].

    The query heads of a group are stacked against their shared key head instead of repeating the
    keys, which would copy the whole KV cache at every decode step. Scores are divided by
    sqrt(head_dim) as upstream does, and the softmax runs in fp32 whatever the compute dtype."""
    b, h, n, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    scores = _bmm_t(q.reshape(b, kv, g * n, d), k) / scale_divisor
    scores = scores.reshape(b, kv, g, n, s)
    if mask is not None:
        scores = scores + mask.expand_dims(1)
    probs = ops.softmax(scores.astype(ms.float32), axis=-1).astype(q.dtype)
    out = _bmm(probs.reshape(b, kv, g * n, s), v)
    return out.reshape(b, h, n, d)


def _fused_attention(q, k, v, mask, scale_divisor):
    from mindspore.ops import flash_attention_score  # Ascend only

    # The fused kernel takes a boolean "masked out" tensor instead of an additive one.
    keep_out = None if mask is None else (mask < 0).astype(ms.uint8)
    # Grouped k/v heads are native to the kernel: k and v keep their KV heads.
    return flash_attention_score(q, k, v, head_num=q.shape[1], attn_mask=keep_out,
                                 scalar_value=1.0 / float(scale_divisor), input_layout="BNSD")


def attention(q, k, v, mask, scale_divisor, use_fused=False):
    """The single dispatch point. `use_fused` is decided once, at model build time, from the device."""
    if use_fused:
        return _fused_attention(q, k, v, mask, scale_divisor)
    return portable_attention(q, k, v, mask, scale_divisor)
