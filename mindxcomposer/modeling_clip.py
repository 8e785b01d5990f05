"""CLIP ViT vision tower (ViT-L/14 at 560 px in the release), as Hugging Face's CLIPVisionModel.

IXC2.5 reads the last encoder hidden state (before `post_layernorm`) without the class token, so
`post_layernorm` is held only because the checkpoint carries it.
"""
import mindspore as ms
from mindspore import nn, ops

from .configuration import CLIPVisionConfig
from .layers import LayerNorm, Linear, lazy_param

_bmm_t = ops.BatchMatMul(transpose_b=True)
_bmm = ops.BatchMatMul()


def quick_gelu(x):
    return x * ops.sigmoid(1.702 * x)


class CLIPVisionEmbeddings(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig, dtype):
        super().__init__()
        self.class_embedding = lazy_param((cfg.hidden_size,), dtype, "class_embedding")
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size,
                                         pad_mode="valid", has_bias=False, weight_init="zeros", dtype=dtype)
        self.position_embedding = _PositionEmbedding(cfg.num_patches + 1, cfg.hidden_size, dtype)

    def construct(self, pixel_values):
        b = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values)  # [B, C, g, g]
        patches = patches.reshape(b, patches.shape[1], -1).transpose(0, 2, 1)
        cls = ops.broadcast_to(self.class_embedding.reshape(1, 1, -1), (b, 1, patches.shape[-1]))
        return ops.concat((cls, patches), 1) + self.position_embedding.weight.reshape((1,) + self.position_embedding.weight.shape)


class _PositionEmbedding(nn.Cell):
    def __init__(self, num, size, dtype):
        super().__init__()
        self.weight = lazy_param((num, size), dtype, "weight")


class CLIPAttention(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig, dtype):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        h = cfg.hidden_size
        self.k_proj = Linear(h, h, dtype=dtype)
        self.v_proj = Linear(h, h, dtype=dtype)
        self.q_proj = Linear(h, h, dtype=dtype)
        self.out_proj = Linear(h, h, dtype=dtype)

    def _heads(self, x):
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, x):
        b, n, c = x.shape
        # As HF: the query is scaled before the product.
        q = self._heads(self.q_proj(x) * self.scale)
        k = self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))
        probs = ops.softmax(_bmm_t(q, k).astype(ms.float32), axis=-1).astype(x.dtype)
        out = _bmm(probs, v).transpose(0, 2, 1, 3).reshape(b, n, c)
        return self.out_proj(out)


class CLIPMLP(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig, dtype):
        super().__init__()
        if cfg.hidden_act != "quick_gelu":
            raise ValueError(f"CLIP hidden_act {cfg.hidden_act!r} is not supported (IXC2.5 uses quick_gelu)")
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype)

    def construct(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig, dtype):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.mlp = CLIPMLP(cfg, dtype)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)

    def construct(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig, dtype):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])

    def construct(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPVisionTransformer(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig, dtype):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg, dtype)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)  # sic, HF's name
        self.encoder = CLIPEncoder(cfg, dtype)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)

    def construct(self, pixel_values):
        """Last encoder hidden state without the class token: [B, num_patches, C]."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        return self.encoder(x)[:, 1:]


class CLIPVisionModel(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig, dtype=ms.float32):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg, dtype)

    def construct(self, pixel_values):
        return self.vision_model(pixel_values)


class CLIPVisionTower(nn.Cell):
    """Holds the tower under upstream's attribute names (`vit.vision_tower.vision_model...`)."""

    def __init__(self, cfg: CLIPVisionConfig, dtype=ms.float32):
        super().__init__()
        self.vision_tower = CLIPVisionModel(cfg, dtype)

    def construct(self, pixel_values):
        return self.vision_tower(pixel_values)
