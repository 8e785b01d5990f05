"""Kernel dispatch: the few places where a device- or dtype-specific kernel may replace the portable path.

- `attention`: Ascend's fused kernel only on Ascend, the portable BatchMatMul + softmax elsewhere.
- `linear` / `embedding`: bf16-stored weights with fp32 arithmetic through the CPU kernels of
  `bf16_kernels` on CPU, a cast to the compute dtype elsewhere or when they cannot be built.

(A top-level package named `ops` would collide with other packages in site-packages, hence
`mindxcomposer.ops`.)
"""
from .attention import attention, fused_attention_available
from .weight_products import cast_like, embedding, enable_kernels, kernels_enabled, linear

__all__ = ["attention", "fused_attention_available", "cast_like", "embedding", "enable_kernels",
           "kernels_enabled", "linear"]
