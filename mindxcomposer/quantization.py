"""Weight-only quantization of the decoder's base linears (`wqkv`, `wo`, `w1`, `w2`, `w3`).

Everything else (Partial LoRA, task LoRAs, ViT, projector, embeddings, norms, output head) keeps the
checkpoint's dtype. Two schemes, recorded in config.json as a Hugging Face style `quantization_config`:

- `int8`: symmetric per output channel. `qweight` int8 [N, K], `scales` fp32 [N];
  W[n, k] = qweight[n, k] * scales[n], qweight in [-127, 127], scale = max |W[n, :]| / 127.
- `int4`: group-wise asymmetric over the inputs, as AWQ quantizes (round to nearest, scale and zero point per
  group of `group_size` consecutive inputs of one output channel). `qweight` uint8 [N, ceil(K / 2)]: input k
  of row n is the low nibble of byte k // 2 when k is even, the high nibble when odd; `scales` fp32 [N, G],
  `qzeros` uint8 [N, G] (one zero point 0..15 per byte), G = ceil(K / group_size) (the last group may be
  shorter); W[n, k] = (q[n, k] - qzeros[n, g]) * scales[n, g], g = k // group_size.

The layout is output-channel major (row n of a weight is contiguous along k, as the bf16 weights are): a
decode step streams each row once, and the GEMM's packing reads it as it reads a bf16 weight. lmdeploy's AWQ
layout ([K, N / 8] int32 with an interleaved nibble order) is read by the converter and repacked into this one
(`awq.py`).

The dequantized value is one fp32 multiply of two exact small integers' difference by the scale, on every path
(numpy here, MindSpore ops in the portable product, the CPU kernels): a quantized model computes what the same
model with `dequantize`d weights stored in fp32 computes.
"""
from typing import Dict, Optional, Tuple

import numpy as np

SCHEMES = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 128
QUANT_METHOD = "mindxcomposer"
LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
PARTS = {8: ("qweight", "scales"), 4: ("qweight", "scales", "qzeros")}
# safetensors dtype codes of the parts
PART_DTYPES = {8: {"qweight": "I8", "scales": "F32"}, 4: {"qweight": "U8", "scales": "F32", "qzeros": "U8"}}
INT4_MAX = 15
INT8_MAX = 127


class QuantizationConfigError(ValueError):
    """A `quantization_config` this package cannot serve."""


def make_config(scheme: str, group_size: Optional[int] = None) -> dict:
    """The `quantization_config` entry of config.json for `scheme` ('int8' or 'int4')."""
    if scheme not in SCHEMES:
        raise QuantizationConfigError(f"quantize must be one of {sorted(SCHEMES)}, got {scheme!r}")
    bits = SCHEMES[scheme]
    if bits == 8:
        if group_size not in (None, -1):
            raise QuantizationConfigError("int8 is per output channel: --group-size applies to int4 only")
        group_size = -1
    else:
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
            raise QuantizationConfigError(f"group size must be an even integer >= 2, got {group_size!r}")
    return {"quant_method": QUANT_METHOD, "scheme": scheme, "bits": bits, "group_size": group_size,
            "sym": bits == 8, "zero_point": bits == 4, "modules_to_quantize": list(LINEARS),
            "weight_layout": "out_in"}


def parse_config(qc) -> Optional[Tuple[int, int]]:
    """(bits, group_size) of a config's `quantization_config` (None: not quantized); a clear error otherwise.
    group_size is -1 for int8 (per output channel)."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise QuantizationConfigError(f"quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        hint = (" (lmdeploy's AWQ output: convert it first with `mxc-convert SRC DST`)" if method == "awq" else "")
        raise QuantizationConfigError(f"quantization_config.quant_method {method!r} is not {QUANT_METHOD!r}{hint}")
    bits, gs = qc.get("bits"), qc.get("group_size")
    if bits == 8 and gs == -1:
        return 8, -1
    if bits == 4 and isinstance(gs, int) and gs >= 2 and gs % 2 == 0:
        return 4, gs
    raise QuantizationConfigError(f"quantization_config bits={bits!r} group_size={gs!r}: expected bits 8 with "
                                  f"group_size -1, or bits 4 with an even group_size")


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def part_shapes(out_features: int, in_features: int, bits: int, group_size: int) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the stored parts of one quantized [out, in] weight."""
    if bits == 8:
        return {"qweight": (out_features, in_features), "scales": (out_features,)}
    g = num_groups(in_features, group_size)
    return {"qweight": (out_features, (in_features + 1) // 2), "scales": (out_features, g),
            "qzeros": (out_features, g)}


def is_part_name(name: str) -> bool:
    return name.endswith((".qweight", ".scales", ".qzeros"))


# ----------------------------------------------------------------------------------------------
# numpy: quantize, pack, dequantize


def quantize_int8(w: np.ndarray) -> Dict[str, np.ndarray]:
    """Symmetric per output channel, round half to even (numpy and torch's `round`)."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    scales = (np.maximum(amax, np.float32(1e-8)) / np.float32(INT8_MAX)).astype(np.float32)
    q = np.clip(np.round(w / scales[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return {"qweight": q, "scales": scales}


def _groups(w: np.ndarray, group_size: int) -> np.ndarray:
    """[N, K] -> [N, G, group_size], the last group padded by repeating its first value (padding takes no part
    in min / max and is cut off again)."""
    n, k = w.shape
    g = num_groups(k, group_size)
    pad = g * group_size - k
    if pad:
        w = np.concatenate([w, np.repeat(w[:, (g - 1) * group_size:(g - 1) * group_size + 1], pad, 1)], 1)
    return w.reshape(n, g, group_size)


def quantize_int4(w: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE) -> Dict[str, np.ndarray]:
    """AWQ's asymmetric round-to-nearest (`pseudo_quantize_tensor` with zero_point=True) per group of inputs:
    scale = max(max - min, 1e-5) / 15, zero = clamp(-round(min / scale), 0, 15),
    q = clamp(round(w / scale) + zero, 0, 15)."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    gw = _groups(w, group_size)
    wmax, wmin = gw.max(axis=2), gw.min(axis=2)
    scales = (np.maximum(wmax - wmin, np.float32(1e-5)) / np.float32(INT4_MAX)).astype(np.float32)
    zeros = np.clip(-np.round(wmin / scales), 0, INT4_MAX).astype(np.float32)
    q = np.clip(np.round(gw / scales[:, :, None]) + zeros[:, :, None], 0, INT4_MAX).astype(np.uint8)
    q = q.reshape(n, -1)[:, :k]
    return {"qweight": pack_int4(q), "scales": scales, "qzeros": zeros.astype(np.uint8)}


def pack_int4(q: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 [N, K] -> [N, ceil(K / 2)]: even k in the low nibble, odd k in the high one."""
    n, k = q.shape
    if k % 2:
        q = np.concatenate([q, np.zeros((n, 1), np.uint8)], 1)
    q = q.astype(np.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, in_features: int) -> np.ndarray:
    """Inverse of `pack_int4`: [N, ceil(K / 2)] -> uint8 [N, K]."""
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out[:, :in_features]


def quantize(w: np.ndarray, bits: int, group_size: int) -> Dict[str, np.ndarray]:
    return quantize_int8(w) if bits == 8 else quantize_int4(w, group_size)


def dequantize(parts: Dict[str, np.ndarray], bits: int, group_size: int, in_features: int) -> np.ndarray:
    """The fp32 weight [N, K] the parts stand for (what every product path computes with)."""
    if bits == 8:
        return parts["qweight"].astype(np.float32) * parts["scales"].astype(np.float32)[:, None]
    q = unpack_int4(parts["qweight"], in_features).astype(np.float32)
    g = np.arange(in_features) // group_size
    z = parts["qzeros"].astype(np.float32)[:, g]
    s = parts["scales"].astype(np.float32)[:, g]
    return (q - z) * s
