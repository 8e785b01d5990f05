"""Compiled gradient cells for fine-tuning, one per kind of block, each recomputing its block's forward.

Backpropagation runs block by block: a forward pass without gradients keeps only each block's input
(a decoder layer, a ViT layer, the ViT stem, the projector, the head and loss); then, from the loss
back, each block is recomputed inside the gradient cell of `<block(x, w), dy>`, which gives the
vector-Jacobian product (dx, dw) for the incoming gradient dy. That is gradient checkpointing at block
granularity, and it is how MindSpore's CPU graphs (which keep every intermediate of a graph until it
returns) stay bounded: one block's activations at a time. Weights are graph inputs (Tensor views of
the Parameters), so one compiled graph serves every layer of a kind; only the positions of the
trainable weights are fixed per cell (`ms.grad(grad_position=...)`).

The arithmetic is the model's own: `DecoderMath.layer`, `CLIPLayerMath`, the ViT stem, the
projector's cells, `rms_norm` + `linear` for the head. `TrainingMath` adds what training has and
inference has not: the trained LoRA adapter on the target linears (peft's `lora_B(lora_A(drop(x))) *
scaling` on top of the Partial-LoRA linear) and dropout on the LoRA inputs.
"""
from typing import Sequence

import mindspore as ms
from mindspore import nn, ops

from ..modeling_internlm2 import DecoderMath
from ..ops import EXACT, linear, rms_norm


def hash_dropout(x, p, seed, salt):
    """Dropout whose mask is a pure function of (seed, salt, element position): recomputing a block
    in its gradient cell draws the same mask as its forward did (a stateful RNG would not).
    The mask comes from the classic sin-hash, fractional part of sin(a r + b c + s) * 43758.5453."""
    cols = x.shape[-1]
    rows = x.size // cols
    r = ops.arange(rows).astype(ms.float32).reshape(rows, 1)
    c = ops.arange(cols).astype(ms.float32).reshape(1, cols)
    u = ops.sin(r * 12.9898 + c * 78.233 + (seed + salt)) * 43758.5453
    u = u - ops.floor(u)
    keep = (u >= p).astype(x.dtype).reshape(x.shape)
    return x * keep / (1.0 - p)


class TrainingMath(DecoderMath):
    """`DecoderMath` with a trained LoRA adapter and dropout.

    Weight tuple: the layer's base weights (`InternLM2DecoderLayer.layer_weights()`), then (A, B) for
    each adapter target in `LINEARS` order, then, when a dropout is on, a float32 scalar seed."""

    def __init__(self, config, targets: Sequence[bool] = (False,) * 5, scaling=1.0, lora_dropout=0.0,
                 plora_dropout=0.0, use_fused_attention=False, products=EXACT):
        super().__init__(config, use_fused_attention, products)
        self.targets = tuple(bool(t) for t in targets)
        self.scaling = float(scaling)
        self.lora_p = float(lora_dropout)
        self.plora_p = float(plora_dropout)
        slots, k = [], self.num_base
        for t in self.targets:
            slots.append(k if t else -1)
            k += 2 if t else 0
        self.adapter_slots = tuple(slots)
        self.has_seed = self.lora_p > 0 or self.plora_p > 0

    def lora_input(self, x, w, i, branch):
        p = self.plora_p if branch == 0 else self.lora_p
        if p == 0:
            return x
        return hash_dropout(x, p, w[len(w) - 1], float(i * 2 + branch) * 1.618)

    def adapt(self, res, w, i, x):
        k = self.adapter_slots[i]
        if k < 0:
            return res
        return self.add_lora(res, linear(self.lora_input(x, w, i, 1), w[k], self.products), w[k + 1], self.scaling)


class _LayerDot(nn.Cell):
    def __init__(self, math_cell):
        super().__init__()
        self.math = math_cell

    def construct(self, x, dy, rot_cos, rot_sin, mask, im_mask, *w):
        return (self.math.layer(w, x, rot_cos, rot_sin, mask, im_mask, (), True) * dy).sum()


class DecoderLayerGrad(nn.Cell):
    """(dx, d trainable weights) of one decoder layer; `trainable` indexes the weight tuple."""

    def __init__(self, math_cell: TrainingMath, trainable: Sequence[int]):
        super().__init__()
        self.trainable = tuple(trainable)
        self.grad = ms.grad(_LayerDot(math_cell), grad_position=(0,) + tuple(6 + i for i in self.trainable))

    def construct(self, x, dy, rot_cos, rot_sin, mask, im_mask, *w):
        return self.grad(x, dy, rot_cos, rot_sin, mask, im_mask, *w)


class _HeadLoss(nn.Cell):
    """Final RMSNorm, output head and upstream's loss: CrossEntropyLoss (mean over the supervised
    tokens) of logits t against labels t + 1, times `scale` (1 / gradient accumulation steps)."""

    def __init__(self, eps, products=EXACT):
        super().__init__()
        self.eps = eps
        self.products = products

    def construct(self, x, next_labels, valid, count, scale, norm_w, head_w):
        logits = linear(rms_norm(x, norm_w, self.eps), head_w, self.products).astype(ms.float32)
        logp = ops.log_softmax(logits, -1)
        nll = -ops.gather_elements(logp, 2, next_labels.expand_dims(2)).squeeze(2)
        return (nll * valid).sum() / count * scale


class HeadLossGrad(nn.Cell):
    """(loss * scale, (dx[, d norm, d head])) of `_HeadLoss`."""

    def __init__(self, eps, train_head: bool, products=EXACT):
        super().__init__()
        positions = (0, 5, 6) if train_head else (0,)
        self.grad = ms.value_and_grad(_HeadLoss(eps, products), grad_position=positions)

    def construct(self, x, next_labels, valid, count, scale, norm_w, head_w):
        return self.grad(x, next_labels, valid, count, scale, norm_w, head_w)


class _ClipDot(nn.Cell):
    def __init__(self, clip_math):
        super().__init__()
        self.math = clip_math

    def construct(self, x, dy, *w):
        return (self.math(x, *w) * dy).sum()


class ClipLayerGrad(nn.Cell):
    """(dx[, d weights]) of one ViT encoder layer (weights in `modeling_clip.LAYER_WEIGHTS` order)."""

    def __init__(self, clip_math, train_weights: bool, num_weights: int):
        super().__init__()
        positions = (0,) + (tuple(range(2, 2 + num_weights)) if train_weights else ())
        self.grad = ms.grad(_ClipDot(clip_math), grad_position=positions)

    def construct(self, x, dy, *w):
        return self.grad(x, dy, *w)


class _CellDot(nn.Cell):
    def __init__(self, cells):
        super().__init__()
        # Not registered: registering the model's cells here would rename their Parameters.
        object.__setattr__(self, "cells", tuple(cells))

    def construct(self, x, dy):
        for cell in self.cells:
            x = cell(x)
        return (x * dy).sum()


class ChainGrad(nn.Cell):
    """(dx, d Parameters) of a chain of the model's own cells (the ViT stem; the projector's Linear,
    GELU, Linear), gradients taken with respect to their Parameters."""

    def __init__(self, cells, params, input_grad: bool):
        super().__init__()
        params = ms.ParameterTuple(list(params))
        object.__setattr__(self, "params", params)  # not registered (it would rename them)
        # Returns (dx, d params), dx alone without params, d params alone without input_grad.
        self.grad = ms.grad(_CellDot(cells), grad_position=0 if input_grad else None,
                            weights=params if len(params) else None)

    def construct(self, x, dy):
        return self.grad(x, dy)

