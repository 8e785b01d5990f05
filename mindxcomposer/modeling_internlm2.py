"""InternLM2 decoder with Partial-LoRA linears: packed grouped `wqkv`, GQA, RoPE, RMSNorm, SwiGLU.

RoPE cos/sin and the additive attention mask are inputs (see `rope.py`), so that one compiled graph
serves every position and no state is carried between calls.
"""
import math
import weakref

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from .configuration import InternLMXComposer2Config
from .layers import Embedding, RMSNorm, _matmul_t
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
    """The decoder over a static KV cache, gpt-fast style: two compiled graphs serve a whole generation.

    - `prefill_layer`: ONE decoder layer on a chunk of prompt rows, its weights and caches passed as
      arguments (memory-sharing views of the Parameters), so that a single graph serves every layer and
      every chunk. MindSpore's CPU graphs keep every intermediate alive until the graph returns: a
      whole-model prefill graph over a 2k-token prompt held 23 GB for an 8-layer, 1024-wide decoder.
      Layer by layer and chunk by chunk, the peak is one layer's activations for one chunk.
    - `step`: the whole model for one new token per row, from token ids to logits, weights captured
      (one launch per token; passing ~100 weights as arguments cost more than a layer's compute).
      Generated tokens never take the image LoRA path (upstream gives them im_mask 0, and PLoRA adds
      exactly zero for such rows), so the step graph has no PLoRA branch: fewer weights to stream and,
      with the fused RoPE below, 37 kernels per layer instead of 72.

    The layer arithmetic is `InternLM2DecoderLayer`'s, op for op, on weights looked up by their names
    in the layer; the one change is RoPE applied to the packed q/k/v at once, with cos 1 and sin 0 on
    the value slot and the sign of `rotate_half` folded into `sin` (bit-identical products and sums).

    Caches are [B, KV, S, D]. New keys and values are ADDED (`index_add`, in place) at their slots,
    which hold zeros: `reset` zeroes the caches before a prefill and padding rows add zeros (`keep`).
    On CPU, `scatter_nd_update` copies the whole cache at every call (0.36 ms per layer and tensor at
    2.3k slots, 1.5 ms at 8k), `index_add` writes only the new rows; 0 + x is exactly x. The additive
    `mask` [B, 1, n, S] hides empty, padded and future slots.

    On CPU the output head multiplies by a transposed copy of its weight ([H, V], one per model, kept
    while the weight's storage is unchanged): oneDNN's GEMV reads a [V, H] weight given as transposed at
    ~7 GB/s and a [H, V] one at ~11 GB/s, which made a decode step ~8% faster on the 92544-word head.
    The cost is the head's size in memory (1.5 GB in fp32 at release size), and a different summation
    order (logits within ~1e-6 relative of the uncached forward's). Smaller matrices showed no gain.
    """

    # id(output-head weight) -> (weakref to it, its storage address, transposed copy): one per model.
    # Keyed by id: a Tensor's == is elementwise, so it cannot be a dictionary key itself.
    _transposed_heads = {}

    def __init__(self, model: InternLM2Model, output, config: InternLMXComposer2Config, batch_size, cache_len, dtype):
        super().__init__()
        self.model = model
        self.output = output
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.eps = config.rms_norm_eps
        self.lora_scale = config.plora_scale
        self.scale_divisor = math.sqrt(self.head_dim)
        self.use_fused_attention = model.layers[0].attention.use_fused_attention
        head_t = self._transposed_head(output.weight) if ms.get_context("device_target") == "CPU" else None
        object.__setattr__(self, "head_weight_t", head_t)  # a shared Parameter: not one of this cell's own
        half = self.head_dim // 2
        # One gather swaps the halves of the last axis (two slices and a concat would be three kernels).
        self.swap_halves = ms.Tensor(np.concatenate([np.arange(half, 2 * half), np.arange(half)]).astype(np.int32))
        named = [tuple(layer.parameters_and_names()) for layer in model.layers]
        # A layer's weights travel as a tuple; graphs find them by name through this constant index.
        self.weight_index = {name: i for i, (name, _) in enumerate(named[0])}
        # Held outside Cell.__setattr__, which would register (and rename) already-owned Parameters.
        object.__setattr__(self, "layer_weights", tuple(tuple(p for _, p in layer) for layer in named))
        shape = (batch_size, config.num_key_value_heads, cache_len, config.head_dim)
        self.k_cache = ms.ParameterTuple([ms.Parameter(ops.zeros(shape, dtype), name=f"k_cache.{i}", requires_grad=False)
                                          for i in range(self.num_layers)])
        self.v_cache = ms.ParameterTuple([ms.Parameter(ops.zeros(shape, dtype), name=f"v_cache.{i}", requires_grad=False)
                                          for i in range(self.num_layers)])

    @classmethod
    def _transposed_head(cls, weight):
        heads = cls._transposed_heads
        for key in [k for k, (ref, _, _) in heads.items() if ref() is None]:
            del heads[key]
        held = heads.get(id(weight))
        if held is None or held[0]() is not weight or held[1] != weight.data_ptr():
            t = ms.Parameter(ms.Tensor(np.ascontiguousarray(weight.asnumpy().T)), name=f"{weight.name}.T",
                             requires_grad=False)
            held = heads[id(weight)] = (weakref.ref(weight), weight.data_ptr(), t)
        return held[2]

    def _rms_norm(self, x, weight):
        dtype = x.dtype
        h = x.astype(ms.float32)
        variance = h.pow(2).mean(-1, keep_dims=True)
        h = h * ops.rsqrt(variance + self.eps)
        return weight * h.astype(dtype)

    @staticmethod
    def _matmul(x, weight):
        lead = x.shape[:-1]
        return _matmul_t(x.reshape(-1, weight.shape[1]), weight).reshape(lead + (weight.shape[0],))

    def _task_lora(self, w, name, x, res):
        if name + "_A.weight" in self.weight_index:
            res = res + self._matmul(self._matmul(x, w[self.weight_index[name + "_A.weight"]]),
                                     w[self.weight_index[name + "_B.weight"]])
        return res

    def _linear(self, w, name, x, im_mask, infer_mode, image_lora):
        """`PLoRA.construct` on the layer weights `w`; without `image_lora` the image branch, which adds
        exactly zero on text rows, is left out."""
        res = self._matmul(x, w[self.weight_index[name + ".weight"]])
        if name + ".bias" in self.weight_index:
            res = res + w[self.weight_index[name + ".bias"]]
        if infer_mode == "web":
            res = self._task_lora(w, name + ".lora_web", x, res)
        elif infer_mode == "write":
            res = self._task_lora(w, name + ".lora_sft", x, res)
            res = self._task_lora(w, name + ".lora_dpo", x, res)
        if image_lora:
            lora = self._matmul(self._matmul(x, w[self.weight_index[name + ".Plora_A.weight"]]),
                                w[self.weight_index[name + ".Plora_B.weight"]])
            res = res + (lora * self.lora_scale) * im_mask
        return res

    def _layer(self, w, x, rot_cos, rot_sin, mask, im_mask, slots, keep, k_cache, v_cache, infer_mode, image_lora):
        b, n, _ = x.shape
        g, kv, d = self.groups, self.num_kv_heads, self.head_dim
        h = self._rms_norm(x, w[self.weight_index["attention_norm.weight"]])
        qkv = self._linear(w, "attention.wqkv", h, im_mask,
                           infer_mode, image_lora).reshape(b, n, kv, g + 2, d)
        qkv = qkv * rot_cos + ops.gather(qkv, self.swap_halves, qkv.ndim - 1) * rot_sin
        if n == 1:  # the transposes below only move a length-1 axis
            q = qkv[:, :, :, :g].reshape(b, self.num_heads, 1, d)
            k = qkv[:, :, :, g].reshape(b, kv, 1, d)
            v = qkv[:, :, :, g + 1].reshape(b, kv, 1, d)
        else:
            q = qkv[:, :, :, :g].transpose(0, 2, 3, 1, 4).reshape(b, self.num_heads, n, d)
            k = qkv[:, :, :, g].transpose(0, 2, 1, 3)
            v = qkv[:, :, :, g + 1].transpose(0, 2, 1, 3)
        if keep is not None:
            k, v = k * keep, v * keep
        # The result is the updated cache: reading it orders the write before the reads.
        k_cache = ops.index_add(k_cache, slots, k, 2)
        v_cache = ops.index_add(v_cache, slots, v, 2)
        out = attention(q, k_cache, v_cache, mask, self.scale_divisor, self.use_fused_attention)
        out = out.reshape(b, n, self.hidden_size) if n == 1 else out.transpose(0, 2, 1, 3).reshape(b, n, self.hidden_size)
        x = x + self._linear(w, "attention.wo", out, im_mask, infer_mode, image_lora)
        h = self._rms_norm(x, w[self.weight_index["ffn_norm.weight"]])
        gate = ops.silu(self._linear(w, "feed_forward.w1", h, im_mask, infer_mode, image_lora))
        gate = gate * self._linear(w, "feed_forward.w3", h, im_mask, infer_mode, image_lora)
        return x + self._linear(w, "feed_forward.w2", gate, im_mask, infer_mode, image_lora)

    def prefill_layer(self, x, rot_cos, rot_sin, mask, im_mask, slots, keep, k_cache, v_cache, infer_mode, *weights):
        """One layer on prompt rows x [B, n, H]; `weights` as in `layer_weights`. rot_cos/rot_sin
        [B, n, 1, G+2, D] (see `ModelSession`), im_mask [B, n, 1], slots int32 [n], keep [1, 1, n, 1]
        (0 on padding rows). Returns the layer's output."""
        return self._layer(weights, x, rot_cos, rot_sin, mask, im_mask, slots, keep, k_cache, v_cache, infer_mode,
                           True)

    def head(self, x):
        """Final norm and output head: hidden [B, H] -> float32 logits [B, V]."""
        h = self._rms_norm(x, self.model.norm.weight)
        if self.head_weight_t is None:
            return _matmul_t(h, self.output.weight).astype(ms.float32)
        return ops.matmul(h, self.head_weight_t).astype(ms.float32)

    def step(self, ids, rot_cos, rot_sin, mask, slot, infer_mode="base"):
        """One token per row at cache slot `slot` (int32 [1]): ids int32 [B, 1] -> float32 logits [B, V]."""
        x = ops.gather(self.model.tok_embeddings.weight, ids, 0)
        for i in range(self.num_layers):
            x = self._layer(self.layer_weights[i], x, rot_cos, rot_sin, mask, None, slot, None, self.k_cache[i],
                            self.v_cache[i], infer_mode, False)
        return self.head(x.reshape(x.shape[0], self.hidden_size))

    def reset(self):
        """Zeroes the caches (see the class docstring)."""
        for cache in tuple(self.k_cache) + tuple(self.v_cache):
            ops.assign(cache, ops.zeros(cache.shape, cache.dtype))

    def reorder(self, beam_idx):
        for i in range(self.num_layers):
            ops.assign(self.k_cache[i], ops.gather(self.k_cache[i], beam_idx, 0))
            ops.assign(self.v_cache[i], ops.gather(self.v_cache[i], beam_idx, 0))
        return beam_idx
