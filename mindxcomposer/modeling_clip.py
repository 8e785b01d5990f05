"""CLIP ViT vision tower (ViT-L/14 at 560 px in the release), as Hugging Face's CLIPVisionModel.

IXC2.5 reads the last encoder hidden state (before `post_layernorm`) without the class token, so
`post_layernorm` is held only because the checkpoint carries it.

Memory is bounded whatever the number of crops: `CLIPVisionTower.encode` runs the crops in
micro-batches and the encoder one layer per call, through ONE `CLIPLayerMath` cell that takes the
layer's weights as arguments. In GRAPH_MODE that cell compiles once and serves all 24 layers;
MindSpore's CPU graphs keep every intermediate alive until they return, so a whole-tower graph over
5 crops of 560 px needed more than 24 GB, while one layer on one crop holds well under 1 GB.
Crops never interact, so the result does not depend on the micro-batch size.
"""
import math
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from .configuration import CLIPVisionConfig
from .layers import LayerNorm, Linear, lazy_param
from .ops import EXACT, QUICK_GELU, attention, cast_like, layer_norm, linear, linear_bias
from .ops.attention import BSND
from .vision_pauses import VIT, vision_call_done

# Order in which a layer's weights are passed to `CLIPLayerMath` (upstream names under the layer).
LAYER_WEIGHTS = (
    "layer_norm1.weight", "layer_norm1.bias",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
    "layer_norm2.weight", "layer_norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)
DEFAULT_MICRO_BATCH = 1  # crops per call: a 560-px crop is 1601 tokens, already a large product


class CLIPVisionEmbeddings(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig, dtype):
        super().__init__()
        self.class_embedding = lazy_param((cfg.hidden_size,), dtype, "class_embedding")
        self.patch_embedding = _PatchEmbedding(cfg, dtype)
        self.position_embedding = _PositionEmbedding(cfg.num_patches + 1, cfg.hidden_size, dtype)

    def construct(self, pixel_values):
        b = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values)  # [B, g * g, C]
        cls = ops.broadcast_to(cast_like(self.class_embedding, patches).reshape(1, 1, -1), (b, 1, patches.shape[-1]))
        pos = cast_like(self.position_embedding.weight, patches)
        return ops.concat((cls, patches), 1) + pos.reshape((1,) + pos.shape)


class _PatchEmbedding(nn.Cell):
    """Conv2d(3, C, patch, stride=patch, no bias) with `weight` [C, 3, p, p] in the storage dtype, computed as what
    it is: each p x p patch (channels, rows, columns: the weight's order) times the weight, one product through
    the model's kernels -> [B, patches, C] in the patches' row-major order (the conv's flattened output). Exact
    products, as the conv computed in the input's dtype. Not MindSpore's Conv2D: on AVX2 CPUs its result for a
    crop depended on how many crops shared the call (2.6e-6 at 32 channels), which made the ViT's micro-batches
    differ."""

    def __init__(self, cfg: CLIPVisionConfig, dtype):
        super().__init__()
        self.patch = cfg.patch_size
        self.weight = lazy_param((cfg.hidden_size, cfg.num_channels, self.patch, self.patch), dtype, "weight")

    def construct(self, x):
        b, c, h, w = x.shape
        p = self.patch
        gh, gw = h // p, w // p
        if h != gh * p or w != gw * p:  # a conv drops the rest; the slice of a whole crop was an 18 ms copy
            x = x[:, :, :gh * p, :gw * p]
        x = x.reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
        # The weight in x's dtype first, as the conv took it (MindSpore's CPU Reshape has no bf16; widening is exact).
        w = cast_like(self.weight, x)
        return linear(x.reshape(b, gh * gw, c * p * p), w.reshape(w.shape[0], -1), EXACT)


class _PositionEmbedding(nn.Cell):
    def __init__(self, num, size, dtype):
        super().__init__()
        self.weight = lazy_param((num, size), dtype, "weight")


class CLIPAttention(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig, dtype):
        super().__init__()
        h = cfg.hidden_size
        self.k_proj = Linear(h, h, dtype=dtype)
        self.v_proj = Linear(h, h, dtype=dtype)
        self.q_proj = Linear(h, h, dtype=dtype)
        self.out_proj = Linear(h, h, dtype=dtype)


class CLIPMLP(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig, dtype):
        super().__init__()
        if cfg.hidden_act != "quick_gelu":
            raise ValueError(f"CLIP hidden_act {cfg.hidden_act!r} is not supported (IXC2.5 uses quick_gelu)")
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype)


class CLIPEncoderLayer(nn.Cell):
    """Holds one layer's parameters under HF's names; the arithmetic is `CLIPLayerMath`."""

    def __init__(self, cfg: CLIPVisionConfig, dtype):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.mlp = CLIPMLP(cfg, dtype)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)

    def weights(self):
        params = dict(self.parameters_and_names())
        return tuple(params[n] for n in LAYER_WEIGHTS)


class CLIPLayerMath(nn.Cell):
    """One CLIP encoder layer (HF's CLIPEncoderLayer) on weights given in `LAYER_WEIGHTS` order."""

    def __init__(self, cfg: CLIPVisionConfig, products=EXACT):
        super().__init__()
        self.products = products  # the arithmetic of every product (`ops.weight_products`)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        # HF scales the query before the product. With a power of two (head_dim 64 in the release) dividing
        # the scores instead is the same arithmetic bit for bit (scaling by 2^-3 is exact in fp32 and bf16)
        # and saves a pass over the queries.
        self.scale_scores = math.log2(self.scale).is_integer()
        self.eps = cfg.layer_norm_eps
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=self.eps)  # the portable path

    def _heads(self, x):  # [B, N, C] -> [B, N, heads, head_dim]: a view, attention reads it as BSND
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim)

    def _dense(self, x, w, b, act=None, residual=None):
        return linear_bias(x, w, b, self.products, act, residual)

    def construct(self, x, ln1_w, ln1_b, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, ln2_w, ln2_b,
                  fc1_w, fc1_b, fc2_w, fc2_b):
        b, n, c = x.shape
        h = layer_norm(x, ln1_w, ln1_b, self.eps, self.norm)
        q = self._dense(h, q_w, q_b)
        if not self.scale_scores:
            q = q * self.scale
        k = self._heads(self._dense(h, k_w, k_b))
        v = self._heads(self._dense(h, v_w, v_b))
        out = attention(self._heads(q), k, v, None, 1 / self.scale if self.scale_scores else 1, False,
                        self.products, BSND).reshape(b, n, c)
        x = self._dense(out, o_w, o_b, residual=x)
        h = layer_norm(x, ln2_w, ln2_b, self.eps, self.norm)
        return self._dense(self._dense(h, fc1_w, fc1_b, QUICK_GELU), fc2_w, fc2_b, residual=x)


class CLIPEncoder(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig, dtype):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])


class _Stem(nn.Cell):
    """Patch + position embeddings and `pre_layrnorm`: the part before the encoder layers."""

    def __init__(self, embeddings, pre_layrnorm):
        super().__init__()
        self.embeddings = embeddings
        self.pre_layrnorm = pre_layrnorm

    def construct(self, pixel_values):
        return self.pre_layrnorm(self.embeddings(pixel_values))


class CLIPVisionTransformer(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig, dtype):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg, dtype)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)  # sic, HF's name
        self.encoder = CLIPEncoder(cfg, dtype)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)


class CLIPVisionModel(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig, dtype=ms.float32):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg, dtype)


class CLIPVisionTower(nn.Cell):
    """Holds the tower under upstream's attribute names (`vit.vision_tower.vision_model...`) and runs it
    crop micro-batch by micro-batch, layer by layer (see the module docstring)."""

    def __init__(self, cfg: CLIPVisionConfig, dtype=ms.float32, compute_dtype=ms.float32, products=EXACT):
        super().__init__()
        self.vision_tower = CLIPVisionModel(cfg, dtype)
        self.compute_dtype = compute_dtype
        vm = self.vision_tower.vision_model
        # Not registered as sub-cells: they would give the same parameters a second name.
        object.__setattr__(self, "_stem", _Stem(vm.embeddings, vm.pre_layrnorm))
        object.__setattr__(self, "_math", CLIPLayerMath(cfg, products))

    def __call__(self, pixel_values, micro_batch: Optional[int] = None) -> Tensor:
        return self.encode(pixel_values.asnumpy() if isinstance(pixel_values, Tensor) else pixel_values, micro_batch)

    def encode(self, pixel_values: np.ndarray, micro_batch: Optional[int] = None) -> Tensor:
        """Normalised crops [N, 3, S, S] -> last hidden states without the class token [N, patches, C]
        (compute dtype). `micro_batch` crops go through the tower at a time (default 1); the last
        micro-batch is padded with zero crops so that every call has the same shape."""
        pv = np.asarray(pixel_values, np.float32)
        mb = DEFAULT_MICRO_BATCH if micro_batch is None else micro_batch
        if not isinstance(mb, int) or isinstance(mb, bool) or mb < 1:
            raise ValueError(f"micro_batch must be a positive int, got {mb!r}")
        n = pv.shape[0]
        mb = min(mb, n)
        # Tensor views of the Parameters (no copies): a Parameter passed as a graph input makes a new
        # graph per layer (they differ by name), each keeping its own intermediates.
        layers = [tuple(Tensor(p) for p in layer.weights()) for layer in self.vision_tower.vision_model.encoder.layers]
        # fp32 outputs are gathered in host memory, each micro-batch's as it is done: not in MindSpore's memory
        # pool, whose high-water mark would keep them (and their concatenation: 2 x 164 MB for a 4K image).
        host = self.compute_dtype == ms.float32
        out = None if host else []
        for start in range(0, n, mb):
            chunk = pv[start:start + mb]
            if chunk.shape[0] < mb:
                chunk = np.concatenate([chunk, np.zeros((mb - chunk.shape[0],) + chunk.shape[1:], np.float32)])
            x = self._stem(Tensor(chunk).astype(self.compute_dtype))
            for w in layers:
                x = self._math(x, *w)
                vision_call_done(VIT)  # a pause point (vision_pauses: the server steps decodes there)
            if host:
                xh = x.asnumpy()  # shares x's memory
                if out is None:
                    out = np.empty((n, xh.shape[1] - 1, xh.shape[2]), np.float32)
                out[start:start + mb] = xh[:min(mb, n - start), 1:]
            else:
                out.append(x[:min(mb, n - start), 1:])
        if host:
            return Tensor.from_numpy(out)
        return out[0] if len(out) == 1 else ops.concat(out, 0)
