"""InternLM2 decoder with Partial-LoRA linears: packed grouped `wqkv`, GQA, RoPE, RMSNorm, SwiGLU.

RoPE cos/sin and the additive attention mask are inputs (see `rope.py`), so that one compiled graph
serves every position and no state is carried between calls.
"""
import math

import mindspore as ms
from mindspore import nn, ops

from .configuration import InternLMXComposer2Config
from .layers import Embedding, RMSNorm
from .ops import attention
from .plora import PLoRA


def rotate_half(x):
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), -1)


def apply_rope(x, cos, sin):
    """x [B, H, L, D]; cos/sin [B, L, D]."""
    cos = cos.expand_dims(1)
    sin = sin.expand_dims(1)
    return x * cos + rotate_half(x) * sin


def _plora(config, in_f, out_f, bias, dtype):
    return PLoRA(in_f, out_f, bias, config.plora_rank, config.plora_scale, config.task_lora_ranks, dtype)


class InternLM2Attention(nn.Cell):
    def __init__(self, config: InternLMXComposer2Config, dtype, use_fused_attention=False):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.scale_divisor = math.sqrt(self.head_dim)
        self.use_fused_attention = use_fused_attention
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.wqkv = _plora(config, config.hidden_size, qkv_out, config.bias, dtype)
        self.wo = _plora(config, self.num_heads * self.head_dim, config.hidden_size, config.bias, dtype)

    def qkv(self, x, cos, sin, im_mask, infer_mode):
        """Rotated q [B, H, L, D] and k, v [B, KV, L, D] from the packed projection.

        `wqkv` rows are grouped per kv head: `groups` query heads, then one key, then one value head."""
        b, n, _ = x.shape
        qkv = self.wqkv(x, im_mask, infer_mode).reshape(b, n, self.num_kv_heads, self.groups + 2, self.head_dim)
        q = qkv[:, :, :, :self.groups].reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = qkv[:, :, :, self.groups].transpose(0, 2, 1, 3)
        v = qkv[:, :, :, self.groups + 1].transpose(0, 2, 1, 3)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask, im_mask, infer_mode):
        b, _, n, _ = q.shape
        out = attention(q, k, v, mask, self.scale_divisor, self.use_fused_attention)
        out = out.transpose(0, 2, 1, 3).reshape(b, n, self.hidden_size)
        return self.wo(out, im_mask, infer_mode)

    def construct(self, x, cos, sin, mask, im_mask, infer_mode="base"):
        q, k, v = self.qkv(x, cos, sin, im_mask, infer_mode)
        return self.attend(q, k, v, mask, im_mask, infer_mode)


class InternLM2MLP(nn.Cell):
    def __init__(self, config: InternLMXComposer2Config, dtype):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (InternLM2 uses silu)")
        self.w1 = _plora(config, config.hidden_size, config.intermediate_size, False, dtype)
        self.w3 = _plora(config, config.hidden_size, config.intermediate_size, False, dtype)
        self.w2 = _plora(config, config.intermediate_size, config.hidden_size, False, dtype)

    def construct(self, x, im_mask, infer_mode="base"):
        return self.w2(ops.silu(self.w1(x, im_mask, infer_mode)) * self.w3(x, im_mask, infer_mode),
                       im_mask, infer_mode)


class InternLM2DecoderLayer(nn.Cell):
    def __init__(self, config: InternLMXComposer2Config, dtype, use_fused_attention=False):
        super().__init__()
        self.attention = InternLM2Attention(config, dtype, use_fused_attention)
        self.feed_forward = InternLM2MLP(config, dtype)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def construct(self, x, cos, sin, mask, im_mask, infer_mode="base"):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, im_mask, infer_mode)
        return x + self.feed_forward(self.ffn_norm(x), im_mask, infer_mode)


class InternLM2Model(nn.Cell):
    def __init__(self, config: InternLMXComposer2Config, dtype=ms.float32, use_fused_attention=False):
        super().__init__()
        self.tok_embeddings = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.CellList([InternLM2DecoderLayer(config, dtype, use_fused_attention)
                                   for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def construct(self, inputs_embeds, cos, sin, mask, im_mask, infer_mode="base", output_hidden_states=False):
        """Returns the normed last hidden state and, if asked, every layer's input plus that output
        (upstream's `hidden_states` tuple: L + 1 entries, the last one normed)."""
        x = inputs_embeds
        states = ()
        for layer in self.layers:
            if output_hidden_states:
                states = states + (x,)
            x = layer(x, cos, sin, mask, im_mask, infer_mode)
        x = self.norm(x)
        if output_hidden_states:
            states = states + (x,)
        return x, states


class CachedDecoder(nn.Cell):
    """The decoder over a static KV cache, gpt-fast style: one graph for prefill (per length bucket) and
    one for the one-token step (per batch and cache size), reused for every token.

    Caches are Parameters [B, KV, S, D] updated in place with `scatter_nd_update` at the slots named by
    `write_idx` [B, KV, n, 3]; the additive `mask` [B, 1, n, S] hides empty and padded slots. Only the
    last position goes through the output head: the prompt's other logits are never needed to decode.
    """

    def __init__(self, model: InternLM2Model, output, config: InternLMXComposer2Config, batch_size, cache_len, dtype):
        super().__init__()
        self.model = model
        self.output = output
        self.num_layers = config.num_hidden_layers
        shape = (batch_size, config.num_key_value_heads, cache_len, config.head_dim)
        self.k_cache = ms.ParameterTuple([ms.Parameter(ops.zeros(shape, dtype), name=f"k_cache.{i}", requires_grad=False)
                                          for i in range(self.num_layers)])
        self.v_cache = ms.ParameterTuple([ms.Parameter(ops.zeros(shape, dtype), name=f"v_cache.{i}", requires_grad=False)
                                          for i in range(self.num_layers)])

    def construct(self, x, cos, sin, mask, im_mask, write_idx, infer_mode="base"):
        for i in range(self.num_layers):
            layer = self.model.layers[i]
            attn = layer.attention
            q, k, v = attn.qkv(layer.attention_norm(x), cos, sin, im_mask, infer_mode)
            ops.scatter_nd_update(self.k_cache[i], write_idx, k)
            ops.scatter_nd_update(self.v_cache[i], write_idx, v)
            x = x + attn.attend(q, self.k_cache[i], self.v_cache[i], mask, im_mask, infer_mode)
            x = x + layer.feed_forward(layer.ffn_norm(x), im_mask, infer_mode)
        x = self.model.norm(x[:, -1:])
        return self.output(x)[:, 0].astype(ms.float32)

    def reorder(self, beam_idx):
        for i in range(self.num_layers):
            ops.assign(self.k_cache[i], ops.gather(self.k_cache[i], beam_idx, 0))
            ops.assign(self.v_cache[i], ops.gather(self.v_cache[i], beam_idx, 0))
        return beam_idx
