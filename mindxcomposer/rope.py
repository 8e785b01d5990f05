"""Rotary position embedding angles, computed on the host exactly as upstream computes them.

Upstream caches cos/sin tables in fp32: inv_freq = 1 / base ** (arange(0, d, 2) / d), angles = t * inv_freq
with t an fp32 arange. Dynamic NTK rescales `base` from the total sequence length once it exceeds
max_position_embeddings. Upstream keeps that rescaled table across calls (so a short prompt after a long
one is rotated differently than on a fresh model); here the table is a pure function of the current
total length, which is what a freshly loaded upstream model computes.

Everything is fp32 like upstream: computing the angles in float64 was measured to miss the logits
tolerance by 10x. cos/sin of the fp32 angles are taken in float64 and rounded once, i.e. correctly
rounded fp32, which torch's ≤1-ulp kernels agree with.
"""
import numpy as np


def inv_freq(head_dim: int, base: float) -> np.ndarray:
    exps = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    # torch computes python_float ** fp32_tensor in fp32; pow correctly rounded, then an fp32 reciprocal.
    powed = (np.float64(np.float32(base)) ** exps.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / powed


def rope_base(config, seq_len: int) -> float:
    """The RoPE base used for a forward whose keys span `seq_len` positions."""
    base = float(config.rope_theta)
    scaling = config.rope_scaling
    if scaling and scaling["type"] == "dynamic" and seq_len > config.max_position_embeddings:
        factor = float(scaling["factor"])
        d = config.head_dim
        base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (d / (d - 2))
    return base


def rope_cos_sin(config, positions: np.ndarray, seq_len: int):
    """cos, sin float32 [..., head_dim] for integer `positions` [...], total key length `seq_len`."""
    freqs = inv_freq(config.head_dim, rope_base(config, seq_len))
    t = np.asarray(positions).astype(np.float32)
    scaling = config.rope_scaling
    if scaling and scaling["type"] == "linear":
        t = t / np.float32(scaling["factor"])
    angles = t[..., None] * freqs  # fp32 products, as torch's einsum
    angles = np.concatenate([angles, angles], axis=-1).astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def packed_rope(config, positions: np.ndarray, seq_lens):
    """cos, sin float32 [B, n, 1, G+2, D] for the packed q/k/v heads of a kv group (G query heads, then
    the key, then the value): the rotation on the G query slots and the key slot, the identity (cos 1,
    sin 0) on the value slot; `rotate_half`'s sign is folded into sin, so that
    `x * cos + swap_halves(x) * sin` is upstream's `apply_rotary_pos_emb` exactly. Row r is rotated for
    a total key length `seq_lens[r]` (the dynamic-NTK base depends on it)."""
    positions = np.asarray(positions)
    b, n = positions.shape
    g, d = config.num_attention_heads // config.num_key_value_heads, config.head_dim
    cos = np.ones((b, n, 1, g + 2, d), np.float32)
    sin = np.zeros((b, n, 1, g + 2, d), np.float32)
    for r in range(b):
        c, s = rope_cos_sin(config, positions[r], seq_len=int(seq_lens[r]))
        s[..., :d // 2] = -s[..., :d // 2]
        cos[r, :, 0, :g + 1] = c[:, None]
        sin[r, :, 0, :g + 1] = s[:, None]
    return cos, sin
