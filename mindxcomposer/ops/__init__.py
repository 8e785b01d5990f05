"""Kernel dispatch: the few places where a device- or dtype-specific kernel may replace the portable path.

- `attention`: Ascend's fused kernel only on Ascend, the portable path (two products + fp32 softmax)
  elsewhere.
- `linear`, `linear_add`, `linear_bias`, `batch_nt`, `batch_nn`, `embedding` (`weight_products`): every product, in the
  model's arithmetic (`exact` or `bf16`), through the CPU kernels of `cpu_kernels` on CPU, MindSpore's
  MatMul elsewhere or when they cannot be built; `swiglu`, `rms_norm`, `layer_norm`, `rope_split` and
  fine-tuning's `hash_dropout`, fused element-wise kernels on CPU.

(A top-level package named `ops` would collide with other packages in site-packages, hence
`mindxcomposer.ops`.)
"""
from .attention import attention, fused_attention_available
from .weight_products import (BF16, EXACT, PRODUCT_MODES, QUICK_GELU, batch_nn, batch_nt, cast_like, embedding,
                              enable_kernels, hash_dropout, head_cross_entropy, kernels_enabled, layer_norm, linear,
                              linear_add, linear_bias, linear_int4, linear_int8, quick_gelu, rms_norm, rope_split,
                              swiglu)

__all__ = ["attention", "fused_attention_available", "BF16", "EXACT", "PRODUCT_MODES", "batch_nn", "batch_nt",
           "cast_like", "embedding", "enable_kernels", "hash_dropout", "head_cross_entropy", "kernels_enabled",
           "layer_norm", "linear", "linear_add", "linear_bias", "linear_int4", "linear_int8", "QUICK_GELU",
           "quick_gelu", "rms_norm", "rope_split", "swiglu"]
