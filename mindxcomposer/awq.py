"""lmdeploy's AWQ 4-bit checkpoint layout (`internlm/internlm-xcomposer2d5-7b-4bit`) read into ours (`quantization`).

lmdeploy's `auto_awq` (lite/apis/auto_awq.py, `WeightOnlyQLinear.from_linear` with awq_layout=True) replaces each
quantized `nn.Linear` W [out, in] by:

- `qweight` int32 [in, out / 8]: bits 4i .. 4i + 3 of column c hold the integer of output 8c + AWQ_ORDER[i]
  (the nibble order AWQ's CUDA kernels expect), for input k = the row;
- `qzeros` int32 [in / group, out / 8]: the zero points, packed the same way;
- `scales` [in / group, out] in the model's dtype (fp16);

and W[o, k] = (q[k, o] - zero[k // group, o]) * scale[k // group, o] (`pseudo_quantize_tensor`, asymmetric,
round to nearest). `config.json` gets `quantization_config = {"quant_method": "awq", "version": "gemm",
"bits": 4, "group_size": G, "zero_point": true}`. Modules whose name contains 'lora' (the Partial LoRA) are left
in 16 bits; so are the embeddings, the output head and the vision tower (not decoder layers).

Read into our int4 layout: unpacked, transposed to [out, in] and packed two per byte; zero points one per byte;
scales widened to fp32 (exact). Ambiguities resolved from lmdeploy's own code (`tools/reference/make_awq_fixtures.py`
runs its writer and its reader and `tests/test_awq.py` checks ours against both): bits inside an int32 are
counted from the least significant end with `AWQ_ORDER` (lmdeploy's reader: shifts (0, 16, 4, 20, 8, 24, 12, 28)
for outputs 0..7, the same map); zero points are the same 4-bit integers (no +1 offset, unlike GPTQ's); the rows
of `wqkv` keep the checkpoint's interleaved order (per kv head: its query heads, then k, then v), which packing
does not change. Our products use the exact fp32 value (q - zero) * scale; lmdeploy's PyTorch engine rounds it
to fp16 first (`dequantize_gemm`).
"""
from typing import Dict, Tuple

import numpy as np

from .quantization import pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a packed int32 holds column 8c + AWQ_ORDER[i]
PARTS = ("qweight", "qzeros", "scales")


class AwqLayoutError(ValueError):
    """A `quantization_config` of quant_method 'awq' that this reader does not cover."""


def check_config(qc: dict) -> int:
    """The group size of an lmdeploy AWQ `quantization_config`; a clear error for what it cannot read."""
    bits, gs = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size"))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4 or qc.get("zero_point", True) is not True or version != "gemm":
        raise AwqLayoutError(f"quantization_config {qc}: only AWQ 4-bit with zero points in the 'gemm' layout "
                             f"(lmdeploy's auto_awq output) can be read")
    if not isinstance(gs, int) or gs <= 0:
        raise AwqLayoutError(f"quantization_config {qc}: group_size must be a positive integer")
    return gs


def shapes(out_features: int, in_features: int, group_size: int) -> Dict[str, Tuple[int, ...]]:
    """The stored shapes of one AWQ-quantized [out, in] linear."""
    if in_features % group_size or out_features % 8:
        raise AwqLayoutError(f"a {out_features} x {in_features} linear cannot be in the AWQ layout with group size "
                             f"{group_size} (inputs must be a multiple of it, outputs of 8)")
    g = in_features // group_size
    return {"qweight": (in_features, out_features // 8), "qzeros": (g, out_features // 8),
            "scales": (g, out_features)}


def unpack(packed: np.ndarray) -> np.ndarray:
    """int32 [R, C / 8] in AWQ's nibble order -> uint8 [R, C]."""
    p = np.ascontiguousarray(packed).view(np.uint32)
    out = np.empty(p.shape + (8,), np.uint8)
    for i, col in enumerate(AWQ_ORDER):
        out[..., col] = (p >> np.uint32(4 * i)) & np.uint32(15)
    return out.reshape(p.shape[0], -1)


def to_ours(part: str, arr: np.ndarray, dtype_code: str) -> np.ndarray:
    """One AWQ tensor of a linear -> our int4 part of the same name (`quantization`)."""
    if part == "qweight":
        return pack_int4(unpack(arr).T)
    if part == "qzeros":
        return np.ascontiguousarray(unpack(arr).T)
    if dtype_code == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(arr.astype(np.float32).T)


__all__ = ["AWQ_ORDER", "PARTS", "check_config", "shapes", "unpack", "to_ours"]
