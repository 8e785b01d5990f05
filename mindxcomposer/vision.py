"""From ViT features to image embeddings: IXC's HD merge (2x2 patch merge with learned separator
tokens, global view first) and the Linear-GELU-Linear projector.

Both run with bounded memory whatever the number of crops (a 4K image at hd_num 24 gives 25 crops and
~10k tokens): the merge is pure data movement, done on the host; the projector, row-wise, runs in
chunks of `PROJECTOR_CHUNK` rows through one compiled shape. As whole graphs over 10k tokens they held
~3 GB of intermediates (MindSpore's CPU graphs keep them until they return, and the memory pool keeps
that high-water mark).
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from .layers import Linear
from .ops import EXACT
from .vision_pauses import PROJECTOR, vision_call_done

PROJECTOR_CHUNK = 1024


def merged_token_count(h: int, w: int, grid: int = 40) -> int:
    """Tokens of one image with an h x w tile grid: (h*w+1)*400 + 1 + (h+1)*20 at release sizes."""
    m = grid // 2
    return (h * w + 1) * m * m + 1 + (h + 1) * m


def _host(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return (x if x.dtype == ms.float32 else x.astype(ms.float32)).asnumpy()
    return np.asarray(x, np.float32)


class HDMerge:
    """Upstream `CLIPVisionTower.forward` after the ViT, for one image.

    features: [1 + h*w, grid*grid, C] (global view first, then tiles row-major). Each 2x2 patch block
    becomes one 4C token; every row of merged tokens ends with `plora_sub_GN`; the global view and the
    tiles are separated by `plora_glb_GN`. Output [1, merged_token_count(h, w), 4C] (float32 Tensor).
    """

    def __init__(self, grid: int = 40):
        self.grid = grid
        self.m = grid // 2

    def _merge_2x2(self, x):
        n, _, c = x.shape
        m = self.m
        x = x.reshape(n, m, 2, m, 2, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, m, m, 4 * c)

    def __call__(self, features, glb_gn, sub_gn, h, w):
        features = _host(features)
        m = self.m
        c4 = 4 * features.shape[-1]
        glb_gn, sub_gn = _host(glb_gn).reshape(c4), _host(sub_gn).reshape(c4)
        # Each part is written once into the output (a 4K image's 10k tokens are 165 MB in fp32: no copies of
        # the whole beyond it), which the returned Tensor shares.
        out = np.empty((merged_token_count(h, w, self.grid), c4), np.float32)
        glb = out[:m * (m + 1)].reshape(m, m + 1, c4)
        glb[:, :m] = self._merge_2x2(features[:1])[0]  # [m, m, 4C]
        glb[:, m] = sub_gn
        out[m * (m + 1)] = glb_gn
        sub = out[m * (m + 1) + 1:].reshape(h * m, w * m + 1, c4)
        sub[:, :w * m] = self._merge_2x2(features[1:1 + h * w]).reshape(h, w, m, m, c4).transpose(
            0, 2, 1, 3, 4).reshape(h * m, w * m, c4)
        sub[:, w * m] = sub_gn
        return Tensor.from_numpy(out[None])


class VisionProjector(nn.SequentialCell):
    """`vision_proj`: Linear(4C, mid) - GELU (erf, torch's default) - Linear(mid, hidden), applied to
    `PROJECTOR_CHUNK` rows at a time (the last chunk padded with zeros: one compiled shape)."""

    def __init__(self, in_features, mid_features, out_features, dtype, compute_dtype=ms.float32, products=EXACT):
        super().__init__([Linear(in_features, mid_features, dtype=dtype, products=products), nn.GELU(approximate=False),
                          Linear(mid_features, out_features, dtype=dtype, products=products)])
        self.compute_dtype = compute_dtype

    def __call__(self, x):
        x = _host(x)
        lead, c = x.shape[:-1], x.shape[-1]
        rows = x.reshape(-1, c)
        n = rows.shape[0]
        chunk = min(PROJECTOR_CHUNK, n)
        out = None  # [n, out_features], filled chunk by chunk and shared by the returned Tensor: no concatenation
        for start in range(0, n, chunk):
            part = rows[start:start + chunk]
            if part.shape[0] < chunk:
                part = np.concatenate([part, np.zeros((chunk - part.shape[0], c), np.float32)])
            y = _host(super().__call__(Tensor(part).astype(self.compute_dtype)))
            if out is None:
                out = np.empty((n, y.shape[-1]), np.float32)
            out[start:start + chunk] = y[:min(chunk, n - start)]
            vision_call_done(PROJECTOR)  # a pause point (see vision_pauses)
        return Tensor.from_numpy(out.reshape(lead + (-1,)))
