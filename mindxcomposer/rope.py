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
