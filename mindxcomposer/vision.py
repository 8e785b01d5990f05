"""From ViT features to image embeddings: IXC's HD merge (2x2 patch merge with learned separator
tokens, global view first) and the Linear-GELU-Linear projector."""
from mindspore import nn, ops

from .layers import Linear
from .ops import cast_like


def merged_token_count(h: int, w: int, grid: int = 40) -> int:
    """Tokens of one image with an h x w tile grid: (h*w+1)*400 + 1 + (h+1)*20 at release sizes."""
    m = grid // 2
    return (h * w + 1) * m * m + 1 + (h + 1) * m


class HDMerge(nn.Cell):
    """Upstream `CLIPVisionTower.forward` after the ViT, for one image.

    features: [1 + h*w, grid*grid, C] (global view first, then tiles row-major). Each 2x2 patch block
    becomes one 4C token; every row of merged tokens ends with `plora_sub_GN`; the global view and the
    tiles are separated by `plora_glb_GN`. Output [1, merged_token_count(h, w), 4C].
    """

    def __init__(self, grid: int = 40):
        super().__init__()
        self.grid = grid
        self.m = grid // 2

    def _merge_2x2(self, x):
        n, _, c = x.shape
        m = self.m
        x = x.reshape(n, m, 2, m, 2, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, m, m, 4 * c)

    def construct(self, features, glb_gn, sub_gn, h, w):
        m = self.m
        c4 = 4 * features.shape[-1]
        glb_gn, sub_gn = cast_like(glb_gn, features), cast_like(sub_gn, features)
        glb = self._merge_2x2(features[:1])  # [1, m, m, 4C]
        glb = ops.concat((glb, ops.broadcast_to(sub_gn, (1, m, 1, c4))), 2).reshape(1, -1, c4)

        sub = self._merge_2x2(features[1:1 + h * w])  # [hw, m, m, 4C]
        sub = sub.reshape(1, h, w, m, m, c4).transpose(0, 1, 3, 2, 4, 5).reshape(1, h * m, w * m, c4)
        sub = ops.concat((sub, ops.broadcast_to(sub_gn, (1, h * m, 1, c4))), 2).reshape(1, -1, c4)
        return ops.concat((glb, glb_gn.reshape(1, 1, c4), sub), 1)


class VisionProjector(nn.SequentialCell):
    """`vision_proj`: Linear(4C, mid) - GELU (erf, torch's default) - Linear(mid, hidden)."""

    def __init__(self, in_features, mid_features, out_features, dtype):
        super().__init__([Linear(in_features, mid_features, dtype=dtype), nn.GELU(approximate=False),
                          Linear(mid_features, out_features, dtype=dtype)])
