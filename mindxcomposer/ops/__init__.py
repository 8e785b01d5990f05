"""Kernel dispatch: the few places where an Ascend-only fused kernel may replace the portable path.

(A top-level package named `ops` would collide with other packages in site-packages, hence
`mindxcomposer.ops`.)
"""
from .attention import attention, fused_attention_available

__all__ = ["attention", "fused_attention_available"]
