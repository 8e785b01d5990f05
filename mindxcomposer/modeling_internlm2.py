"""InternLM2 decoder with Partial-LoRA linears: packed grouped `wqkv`, GQA, RoPE, RMSNorm, SwiGLU.

One implementation of the layer arithmetic, `DecoderMath.layer`, serves the three ways the decoder
runs: the uncached forward (`InternLM2Model.forward`), the prefill over the static KV cache and the
decode step (`CachedDecoder`). The cells below (`InternLM2DecoderLayer` and its parts) hold the
parameters under upstream's names; the arithmetic takes a layer's weights as a flat tuple in the order
of `layer_weights`, so that ONE compiled graph serves every layer (weights are arguments) and
MindSpore's CPU graphs, which keep every intermediate alive until they return, hold one layer's
activations at a time.

RoPE cos/sin come packed for the q/k/v heads of one kv group ([B, n, 1, G+2, D], see `rope.packed_rope`)
and the additive attention mask is an input, so one compiled graph serves every position and no
state is carried between calls.
"""
import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from .configuration import InternLMXComposer2Config
from .constants import LINEARS
from .layers import Embedding, RMSNorm
from .ops import (EXACT, attention, embedding, linear, linear_add, linear_int4, linear_int8, rms_norm, rope_split,
                  swiglu)
from .plora import PLoRA


def _plora(config, in_f, out_f, bias, dtype):
    return PLoRA(in_f, out_f, bias, config.plora_rank, config.plora_scale, dtype, config.quantization)


class InternLM2Attention(nn.Cell):
    def __init__(self, config: InternLMXComposer2Config, dtype):
        super().__init__()
        qkv_out = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
        self.wqkv = _plora(config, config.hidden_size, qkv_out, config.bias, dtype)
        self.wo = _plora(config, config.num_attention_heads * config.head_dim, config.hidden_size, config.bias, dtype)


class InternLM2MLP(nn.Cell):
    def __init__(self, config: InternLMXComposer2Config, dtype):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (InternLM2 uses silu)")
        self.w1 = _plora(config, config.hidden_size, config.intermediate_size, False, dtype)
        self.w3 = _plora(config, config.hidden_size, config.intermediate_size, False, dtype)
        self.w2 = _plora(config, config.intermediate_size, config.hidden_size, False, dtype)


class InternLM2DecoderLayer(nn.Cell):
    """One layer's parameters under upstream's names; the arithmetic is `DecoderMath.layer`."""

    def __init__(self, config: InternLMXComposer2Config, dtype):
        super().__init__()
        self.attention = InternLM2Attention(config, dtype)
        self.feed_forward = InternLM2MLP(config, dtype)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def plora(self, name) -> PLoRA:
        part, lin = name.split(".")
        return getattr(getattr(self, part), lin)

    def layer_weights(self, tasks=()):
        """The flat weight tuple `DecoderMath.layer` takes: per linear in `LINEARS` order weight (or its
        quantized parts, `PLoRA.base_weights`), [bias], Plora_A, Plora_B; then the two norms; then per linear
        the (A, B) of each of `tasks`."""
        base, extra = [], []
        for name in LINEARS:
            p = self.plora(name)
            base += list(p.base_weights()) + ([p.bias] if p.bias is not None else []) + [p.Plora_A.weight, p.Plora_B.weight]
            for task in tasks:
                extra += list(p.task_weights(task))
        return tuple(base + [self.attention_norm.weight, self.ffn_norm.weight] + extra)


class DecoderMath(nn.Cell):
    """The decoder-layer arithmetic on weights given as a flat tuple (`InternLM2DecoderLayer.layer_weights`).

    RoPE is applied to the packed q/k/v at once, with cos 1 and sin 0 on the value slot and the sign of
    `rotate_half` folded into `sin` (bit-identical products and sums to upstream's `apply_rotary_pos_emb`), and
    the heads are split out in the same pass (`rope_split`: one kernel on CPU).
    Without a cache, attention runs over the rows' own keys; with one, new keys and values are ADDED
    (`index_add`, in place) at their slots, which hold zeros (see `CachedDecoder`).
    """

    def __init__(self, config: InternLMXComposer2Config, use_fused_attention=False, products=EXACT):
        super().__init__()
        self.products = products  # the arithmetic of every product (`ops.weight_products`)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.eps = config.rms_norm_eps
        self.lora_scale = config.plora_scale
        # Per linear: weight (or its quantized parts), [bias], Plora_A, Plora_B. Only the attention linears may
        # have a bias.
        quant = config.quantization
        self.quant_bits = 0 if quant is None else quant[0]
        self.group_size = 0 if quant is None else quant[1]
        self.base_parts = {0: 1, 8: 2, 4: 3}[self.quant_bits]  # tensors of one stored base weight
        self.has_bias = tuple(bool(config.bias) and name.startswith("attention.") for name in LINEARS)
        per_linear = tuple(self.base_parts + (3 if b else 2) for b in self.has_bias)
        self.offsets = tuple(int(sum(per_linear[:i])) for i in range(len(LINEARS)))
        self.num_base = int(sum(per_linear)) + 2
        self.scale_divisor = math.sqrt(self.head_dim)
        self.use_fused_attention = use_fused_attention
        half = self.head_dim // 2
        # One gather swaps the halves of the last axis (two slices and a concat would be three kernels).
        self.swap_halves = Tensor(np.concatenate([np.arange(half, 2 * half), np.arange(half)]).astype(np.int32))

    def plora_linear(self, w, i, x, im_mask, tasks, image_lora):
        """Linear number i of `LINEARS`: W x [+ b] + task LoRAs [+ scale * B(A x) on image rows].
        Without `image_lora` the image branch, which adds exactly zero on text rows, is left out."""
        o = self.offsets[i]
        res = self.base_product(x, w, o)
        o = o + self.base_parts - 1  # the base weight's last tensor: bias, Plora_A, Plora_B follow
        if self.has_bias[i]:
            res = res + w[o + 1].astype(res.dtype)
            o = o + 1
        t = self.num_base + i * 2 * len(tasks)
        for k in range(len(tasks)):
            res = self.add_lora(res, linear(x, w[t + 2 * k], self.products), w[t + 2 * k + 1], 1)
        if image_lora:
            # The 0/1 mask multiplies the rank-r input of B rather than B's [n, out] output: text rows become
            # exact zeros either way (B 0 = 0), image rows are unchanged, and the elementwise work shrinks
            # from out to r columns. The scale stays on the output (1 in the release).
            mid = linear(self.lora_input(x, w, i, 0), w[o + 1], self.products) * im_mask
            res = self.add_lora(res, mid, w[o + 2], self.lora_scale)
        return self.adapt(res, w, i, x)

    def base_product(self, x, w, o):
        """x W^T for the base weight stored at w[o:o + base_parts] (float, or quantized parts)."""
        if self.quant_bits == 8:
            return linear_int8(x, w[o], w[o + 1], self.products)
        if self.quant_bits == 4:
            return linear_int4(x, w[o], w[o + 1], w[o + 2], self.group_size, self.products)
        return linear(x, w[o], self.products)

    def add_lora(self, res, mid, b, scale):
        """res + scale * mid B^T, a LoRA's B product onto a linear's output: with a scale of 1 (no multiply)
        the product is summed onto res in the same pass (`linear_add`)."""
        if scale == 1:
            return linear_add(mid, b, res, self.products)
        return res + linear(mid, b, self.products) * scale

    # Hooks for fine-tuning (`mindxcomposer.finetune.layer_grads.TrainingMath`): dropout on the LoRA inputs
    # and a trained adapter added to a linear's output. Inference uses neither.
    def lora_input(self, x, w, i, branch):
        return x

    def adapt(self, res, w, i, x):
        return res

    def prefill_layer(self, x, rot_cos, rot_sin, mask, im_mask, slots, keep, k_cache, v_cache, tasks, image_lora,
                      *weights):
        """One layer on prompt rows x [B, n, H] over a cache (`CachedDecoder`); `weights` as
        `InternLM2DecoderLayer.layer_weights(tasks)`. rot_cos/rot_sin [B, n, 1, G+2, D], im_mask [B, n, 1],
        slots int32 [n], keep [1, 1, n, 1] (0 on padding rows). `image_lora` False leaves the Partial LoRA
        out, for rows none of which is an image token (it adds exact zeros there). Returns the layer's output."""
        return self.layer(weights, x, rot_cos, rot_sin, mask, im_mask, tasks, image_lora, slots, keep, k_cache,
                          v_cache)

    def layer(self, w, x, rot_cos, rot_sin, mask, im_mask, tasks, image_lora, slots=None, keep=None,
              k_cache=None, v_cache=None):
        q, k, v = self.attention_inputs(w, x, rot_cos, rot_sin, im_mask, tasks, image_lora)
        if k_cache is not None:
            if keep is not None:
                k, v = k * keep, v * keep
            # The result is the updated cache: reading it orders the write before the reads.
            k = ops.index_add(k_cache, slots, k, 2)
            v = ops.index_add(v_cache, slots, v, 2)
        return self.layer_output(w, x, self.attend(q, k, v, mask), im_mask, tasks, image_lora)

    # The layer in three parts, for fine-tuning's row-chunked recomputation (`finetune.layer_grads`): the first
    # and the last act on each row alone, so they can run a block of rows at a time; only `attend` mixes rows.
    def attention_inputs(self, w, x, rot_cos, rot_sin, im_mask, tasks, image_lora):
        """x [B, n, H] -> RoPE'd q [B, heads, n, D], k and v [B, kv heads, n, D]."""
        b, n, _ = x.shape
        h = rms_norm(x, w[self.num_base - 2], self.eps)
        qkv = self.plora_linear(w, 0, h, im_mask, tasks, image_lora).reshape(
            b, n, self.num_kv_heads, self.groups + 2, self.head_dim)
        return rope_split(qkv, rot_cos, rot_sin, self.swap_halves)

    def attend(self, q, k, v, mask):
        """Attention of q [B, heads, n, D] over k / v -> [B, n, heads * D], the rows' order."""
        b, _, n, _ = q.shape
        out = attention(q, k, v, mask, self.scale_divisor, self.use_fused_attention, self.products)
        return out.reshape(b, n, self.hidden_size) if n == 1 else out.transpose(0, 2, 1, 3).reshape(b, n, self.hidden_size)

    def layer_output(self, w, x, out, im_mask, tasks, image_lora):
        """The layer's input rows x and their attention output `out` -> the layer's output rows: `wo` and the
        residual, then the MLP and its residual."""
        x = x + self.plora_linear(w, 1, out, im_mask, tasks, image_lora)
        h = rms_norm(x, w[self.num_base - 1], self.eps)
        gate = swiglu(self.plora_linear(w, 2, h, im_mask, tasks, image_lora),
                      self.plora_linear(w, 3, h, im_mask, tasks, image_lora))
        return x + self.plora_linear(w, 4, gate, im_mask, tasks, image_lora)


class _UncachedLayer(nn.Cell):
    """One decoder layer without a cache; weights are arguments, so one graph serves every layer."""

    def __init__(self, math_cell: DecoderMath):
        super().__init__()
        self.math = math_cell

    def construct(self, x, rot_cos, rot_sin, mask, im_mask, tasks, *weights):
        return self.math.layer(weights, x, rot_cos, rot_sin, mask, im_mask, tasks, True)


class _Head(nn.Cell):
    """Final RMSNorm and output head -> (normed hidden state, float32 logits)."""

    def __init__(self, eps, products=EXACT):
        super().__init__()
        self.eps = eps
        self.products = products

    def construct(self, x, norm_weight, head_weight):
        h = rms_norm(x, norm_weight, self.eps)
        return h, linear(h, head_weight, self.products).astype(ms.float32)


class InternLM2Model(nn.Cell):
    def __init__(self, config: InternLMXComposer2Config, dtype=ms.float32, use_fused_attention=False,
                 compute_dtype=ms.float32, products=EXACT):
        super().__init__()
        self.config = config
        self.tok_embeddings = Embedding(config.vocab_size, config.hidden_size, dtype, compute_dtype)
        self.layers = nn.CellList([InternLM2DecoderLayer(config, dtype) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        # Not sub-cells: they hold no parameters of their own.
        object.__setattr__(self, "math", DecoderMath(config, use_fused_attention, products))
        object.__setattr__(self, "_uncached_layer", _UncachedLayer(self.math))
        object.__setattr__(self, "head", _Head(config.rms_norm_eps, products))

    def forward(self, inputs_embeds, rot_cos, rot_sin, mask, im_mask, tasks=(), output_hidden_states=False):
        """Layer by layer (one graph call each in GRAPH_MODE). Returns the normed last hidden state and, if
        asked, every layer's input plus that output (upstream's `hidden_states`: L + 1 entries, the last
        one normed)."""
        x = inputs_embeds
        states = []
        for layer in self.layers:
            if output_hidden_states:
                states.append(x)
            x = self._uncached_layer(x, rot_cos, rot_sin, mask, im_mask, tasks,
                                     *[Tensor(p) for p in layer.layer_weights(tasks)])
        return x, states


class CachedDecoder(nn.Cell):
    """The decoder over a static KV cache, gpt-fast style: two compiled graphs serve a whole generation.

    - `prefill_layer`: ONE decoder layer on a chunk of prompt rows, its weights and caches passed as
      arguments (memory-sharing views of the Parameters), so that a single graph serves every layer and
      every chunk. A whole-model prefill graph over a 2k-token prompt held 23 GB for an 8-layer,
      1024-wide decoder; layer by layer and chunk by chunk, the peak is one layer's activations.
    - `step`: the whole model for one new token per row, from token ids to logits, weights captured
      (one launch per token; passing ~100 weights as arguments cost more than a layer's compute).
      Generated tokens never take the image LoRA path (upstream gives them im_mask 0, and PLoRA adds
      exactly zero for such rows), so the step graph has no PLoRA branch: fewer weights to stream.
      With bf16 weights on CPU its products go through the bf16 kernels (`mindxcomposer.ops.weight_products`),
      which read the stored bits: no fp32 copy of any weight exists during decoding.

    Caches are [B, KV, S, D] in the compute dtype. New keys and values are ADDED (`index_add`) at their
    slots, which hold zeros: `reset` zeroes the caches before a prefill and padding rows add zeros
    (`keep`). On CPU, `scatter_nd_update` copies the whole cache at every call, `index_add` writes only
    the new rows; 0 + x is exactly x. The additive `mask` [B, 1, n, S] hides empty, padded and future slots.
    """

    def __init__(self, model: InternLM2Model, output, config: InternLMXComposer2Config, batch_size, cache_len,
                 compute_dtype, tasks=(), caches=None):
        super().__init__()
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.compute_dtype = compute_dtype
        self.tasks = tuple(tasks)
        # Held outside Cell.__setattr__, which would register (and rename) already-owned Parameters.
        object.__setattr__(self, "math", model.math)
        object.__setattr__(self, "head", model.head)
        object.__setattr__(self, "tok_embeddings", model.tok_embeddings.weight)
        object.__setattr__(self, "norm_weight", model.norm.weight)
        object.__setattr__(self, "head_weight", output.weight)
        object.__setattr__(self, "layer_weights", tuple(layer.layer_weights(self.tasks) for layer in model.layers))
        if caches is not None:  # another decoder's (same shapes): a session changing its task LoRAs
            self.k_cache, self.v_cache = caches
            return
        shape = (batch_size, config.num_key_value_heads, cache_len, config.head_dim)
        self.k_cache = ms.ParameterTuple([ms.Parameter(ops.zeros(shape, compute_dtype), name=f"k_cache.{i}",
                                                       requires_grad=False) for i in range(self.num_layers)])
        self.v_cache = ms.ParameterTuple([ms.Parameter(ops.zeros(shape, compute_dtype), name=f"v_cache.{i}",
                                                       requires_grad=False) for i in range(self.num_layers)])

    def prefill_layer(self, compiled: bool):
        """The prefill call `math.prefill_layer` (see there), compiled or op by op. The compiled one is made
        once per model and shared by every decoder over it: its arguments are all it reads, so one graph per
        chunk shape serves every session, and a new session (each `chat` makes one) compiles nothing again
        and keeps no graph memory of its own."""
        if not compiled:
            return self.math.prefill_layer
        jitted = getattr(self.math, "_compiled_prefill_layer", None)
        if jitted is None:
            jitted = ms.jit(self.math.prefill_layer)
            object.__setattr__(self.math, "_compiled_prefill_layer", jitted)  # not a Cell attribute
        return jitted

    def step(self, ids, rot_cos, rot_sin, mask, slot):
        """One token per row at cache slot `slot` (int32 [1]): ids int32 [B, 1] -> float32 logits [B, V]."""
        x = embedding(ids, self.tok_embeddings, self.compute_dtype)
        for i in range(self.num_layers):
            x = self.math.layer(self.layer_weights[i], x, rot_cos, rot_sin, mask, None, self.tasks, False, slot,
                                None, self.k_cache[i], self.v_cache[i])
        return self.head(x.reshape(x.shape[0], self.hidden_size), self.norm_weight, self.head_weight)[1]

    def reset(self):
        """Zeroes the caches (see the class docstring)."""
        for cache in tuple(self.k_cache) + tuple(self.v_cache):
            ops.assign(cache, ops.zeros(cache.shape, cache.dtype))

    def broadcast_rows(self, layer, k, v, rows):
        """Layer `layer`'s caches become rows `rows` (int32 [B]) of `k`, `v` [P, KV, S, D]: beam search runs
        each prompt row once and copies its keys and values to its beams' rows."""
        ops.assign(self.k_cache[layer], ops.gather(k, rows, 0))
        ops.assign(self.v_cache[layer], ops.gather(v, rows, 0))
        return rows

    def reorder(self, beam_idx):
        for i in range(self.num_layers):
            ops.assign(self.k_cache[i], ops.gather(self.k_cache[i], beam_idx, 0))
            ops.assign(self.v_cache[i], ops.gather(self.v_cache[i], beam_idx, 0))
        return beam_idx
