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
projector's cells, `rms_norm` + `head_cross_entropy` for the head. `TrainingMath` adds what training has and
inference has not: the trained LoRA adapter on the target linears (peft's `lora_B(lora_A(drop(x))) *
scaling` on top of the Partial-LoRA linear) and dropout on the LoRA inputs.
"""
from typing import Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..modeling_internlm2 import DecoderMath
from ..ops import EXACT, hash_dropout, head_cross_entropy, linear, rms_norm


class TrainingMath(DecoderMath):
    """`DecoderMath` with a trained LoRA adapter and dropout.

    Weight tuple: the layer's base weights (`InternLM2DecoderLayer.layer_weights()`), then (A, B) for
    each adapter target in `LINEARS` order, then, when a dropout is on, a float32 scalar seed and the float32
    [B, 1] row of the micro-batch's [B * n] rows where each sample's given rows start (`hash_dropout`)."""

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
        return hash_dropout(x, p, w[len(w) - 2], float(i * 2 + branch) * 1.618, w[len(w) - 1])

    def adapt(self, res, w, i, x):
        k = self.adapter_slots[i]
        if k < 0:
            return res
        return self.add_lora(res, linear(self.lora_input(x, w, i, 1), w[k], self.products), w[k + 1], self.scaling)


def dropout_rows(b: int, n: int, start: int = 0) -> Tensor:
    """The float32 [B, 1] index, in the micro-batch's [B * n] rows, of each sample's row `start`: a block's rows for
    `hash_dropout`, so that any block of rows draws the masks the whole sequence draws."""
    return Tensor(np.arange(b, dtype=np.float32).reshape(b, 1) * np.float32(n) + np.float32(start))


class _OnMath(nn.Cell):
    """A cell over the layer arithmetic `math_cell` (a `TrainingMath`); subclasses define `construct`.
    `image_lora` False leaves the Partial LoRA out (for blocks none of whose rows is an image token)."""

    def __init__(self, math_cell, image_lora=True):
        super().__init__()
        self.math = math_cell
        self.image_lora = bool(image_lora)


class _AttentionInputs(_OnMath):
    def construct(self, x, rot_cos, rot_sin, im_mask, *w):
        return self.math.attention_inputs(w, x, rot_cos, rot_sin, im_mask, (), self.image_lora)


class _Attend(_OnMath):
    def construct(self, q, k, v, mask):
        return self.math.attend(q, k, v, mask)


class _LayerOutput(_OnMath):
    def construct(self, x, out, im_mask, *w):
        return self.math.layer_output(w, x, out, im_mask, (), self.image_lora)


class _InputsDot(_OnMath):
    def construct(self, x, dq, dk, dv, rot_cos, rot_sin, im_mask, *w):
        q, k, v = self.math.attention_inputs(w, x, rot_cos, rot_sin, im_mask, (), self.image_lora)
        return (q * dq).sum() + (k * dk).sum() + (v * dv).sum()


class _AttendDot(_OnMath):
    def construct(self, q, k, v, dout, mask):
        return (self.math.attend(q, k, v, mask) * dout).sum()


class _OutputDot(_OnMath):
    def construct(self, x, out, dy, im_mask, *w):
        return (self.math.layer_output(w, x, out, im_mask, (), self.image_lora) * dy).sum()


class _ByImage:
    """A row-wise part as two compiled cells: with the Partial LoRA, for a block holding an image token, and
    without it, for a text-only block, where it adds exact zeros (its rank-r input is multiplied by the 0
    mask) to the output and to every gradient. Called as `part(has_image, *args)`."""

    def __init__(self, make):
        self.cells = {True: make(True), False: make(False)}

    def __call__(self, has_image, *args):
        return self.cells[bool(has_image)](*args)


class _Grad(nn.Cell):
    """A compiled `ms.grad` of `cell` at `positions`."""

    def __init__(self, cell, positions):
        super().__init__()
        self.grad = ms.grad(cell, grad_position=tuple(positions))

    def construct(self, *args):
        return self.grad(*args)


def _part_weights(math_cell: TrainingMath):
    """The positions in the weight tuple that `attention_inputs` and `layer_output` read (two disjoint sets)."""
    ends = tuple(math_cell.offsets[1:]) + (math_cell.num_base - 2,)
    used = [set(range(o, e)) for o, e in zip(math_cell.offsets, ends)]
    for i, k in enumerate(math_cell.adapter_slots):
        if k >= 0:
            used[i] |= {k, k + 1}
    inputs = used[0] | {math_cell.num_base - 2}
    output = set().union(*used[1:]) | {math_cell.num_base - 1}
    return inputs, output


class DecoderLayerBlocks:
    """A decoder layer's forward and its vector-Jacobian product (dx, d trainable weights), `rows` rows at a time.

    The layer's arithmetic is `DecoderMath.layer` in its three parts: `attention_inputs` (RMSNorm, `wqkv`, RoPE)
    and `layer_output` (`wo`, residual, RMSNorm, MLP, residual) act on each row alone and run as compiled graphs on
    blocks of `rows` rows; `attend` mixes the rows and runs once over the whole sequence (on CPU one kernel that
    keeps no [heads, n, n] weights, forward and gradient). A compiled graph keeps every intermediate until it
    returns: at the release's width the whole layer's gradient graph held ~4.5 GiB at 1,400 positions, growing
    with the length; by blocks, a call holds one block's intermediates (fixed by `rows`), and what spans the
    sequence is q, k, v, the attention output and their gradients. The sums over rows of a weight's gradient add
    the blocks' partial sums (rounding-level differences from one product over all rows).

    `trainable` indexes the weight tuple (`TrainingMath`); a dropout's row index is carried per block (the
    tuple's last entry, `hash_dropout`), so a block draws the masks the whole sequence draws. A block with no
    image token runs the row-wise parts without the Partial LoRA (`_ByImage`): it adds exact zeros there, to
    the output and to every gradient, and costs its products and its dropout (text is most rows of a long
    sample)."""

    def __init__(self, math_cell: TrainingMath, trainable: Sequence[int], rows: int):
        self.math = math_cell
        self.rows = int(rows)
        self.trainable = tuple(trainable)
        used_in, used_out = _part_weights(math_cell)
        self.t_in = tuple(i for i in self.trainable if i in used_in)
        self.t_out = tuple(i for i in self.trainable if i in used_out)
        if set(self.t_in) | set(self.t_out) != set(self.trainable):
            raise ValueError("a trainable weight is read by neither part of the decoder layer")
        at_in, at_out = (0,) + tuple(7 + i for i in self.t_in), (0, 1) + tuple(4 + i for i in self.t_out)
        self.inputs = _ByImage(lambda image: _AttentionInputs(math_cell, image))
        self.attend = _Attend(math_cell)
        self.output = _ByImage(lambda image: _LayerOutput(math_cell, image))
        self.inputs_grad = _ByImage(lambda image: _Grad(_InputsDot(math_cell, image), at_in))
        self.attend_grad = _Grad(_AttendDot(math_cell), (0, 1, 2))
        self.output_grad = _ByImage(lambda image: _Grad(_OutputDot(math_cell, image), at_out))

    def _blocks(self, x, im_mask, w):
        """[(rows slice, whether a row of it is an image token, the weight tuple with that block's dropout rows)]
        over x's rows."""
        b, n = x.shape[0], x.shape[1]
        image = im_mask.asnumpy().reshape(b, n) != 0
        out = []
        for s in range(0, n, self.rows):
            part = slice(s, min(s + self.rows, n))
            out.append((part, bool(image[:, part].any()),
                        tuple(w) + ((dropout_rows(b, n, s),) if self.math.has_seed else ())))
        return out

    @staticmethod
    def _rows(t, part, axis=1):
        if part.start == 0 and part.stop == t.shape[axis]:
            return t
        return t[:, part] if axis == 1 else t[:, :, part]

    def _attention_inputs(self, x, rot_cos, rot_sin, im_mask, blocks):
        parts = [self.inputs(img, self._rows(x, p), self._rows(rot_cos, p), self._rows(rot_sin, p),
                             self._rows(im_mask, p), *wb) for p, img, wb in blocks]
        if len(parts) == 1:
            return parts[0]
        return tuple(ops.concat([qkv[j] for qkv in parts], 2) for j in range(3))

    def forward(self, x, rot_cos, rot_sin, mask, im_mask, w):
        blocks = self._blocks(x, im_mask, w)
        out = self.attend(*self._attention_inputs(x, rot_cos, rot_sin, im_mask, blocks), mask)
        ys = [self.output(img, self._rows(x, p), self._rows(out, p), self._rows(im_mask, p), *wb)
              for p, img, wb in blocks]
        return ys[0] if len(ys) == 1 else ops.concat(ys, 1)

    def grad(self, x, dy, rot_cos, rot_sin, mask, im_mask, w):
        """(dx, d weight for each of `trainable`, in its order), recomputing the layer's forward."""
        blocks = self._blocks(x, im_mask, w)
        q, k, v = self._attention_inputs(x, rot_cos, rot_sin, im_mask, blocks)
        out = self.attend(q, k, v, mask)
        g = {}

        def add(keys, values):
            for key, val in zip(keys, values):
                g[key] = val if key not in g else g[key] + val
        dxs, douts = [], []
        for p, img, wb in blocks:
            r = self.output_grad(img, self._rows(x, p), self._rows(out, p), self._rows(dy, p), self._rows(im_mask, p),
                                 *wb)
            dxs.append(r[0])
            douts.append(r[1])
            add(self.t_out, r[2:])
        del out
        dout = douts[0] if len(douts) == 1 else ops.concat(douts, 1)
        dq, dk, dv = self.attend_grad(q, k, v, dout, mask)
        del q, k, v, dout
        for j, (p, img, wb) in enumerate(blocks):
            r = self.inputs_grad(img, self._rows(x, p), self._rows(dq, p, 2), self._rows(dk, p, 2), self._rows(dv, p, 2),
                                 self._rows(rot_cos, p), self._rows(rot_sin, p), self._rows(im_mask, p), *wb)
            r = r if isinstance(r, tuple) else (r,)  # one position (no trained weight here) gives dx itself
            dxs[j] = dxs[j] + r[0]
            add(self.t_in, r[1:])
        dx = dxs[0] if len(dxs) == 1 else ops.concat(dxs, 1)
        return (dx,) + tuple(g[i] for i in self.trainable)


class _DecoderLoss(nn.Cell):
    """The whole decoder, the final RMSNorm, the head and upstream's loss as one function of the embeddings and every
    layer's weights (`DecoderMath.layer` in its three parts, layer after layer, then `_HeadLoss` on the rows with a
    target): differentiated as one graph, which keeps every intermediate from the forward to the backward instead of
    recomputing each block (`DecoderLossGrad`). `w` is the layers' weight tuples one after the other, `per_layer`
    entries each."""

    LEADING = 12  # the arguments of `construct` before the weights

    def __init__(self, math_cell, num_layers, per_layer, eps, image_lora, products=EXACT):
        super().__init__()
        self.math = math_cell
        self.num_layers, self.per_layer = int(num_layers), int(per_layer)
        self.image_lora = bool(image_lora)
        self.head = _HeadLoss(eps, products)

    def construct(self, x, rot_cos, rot_sin, mask, im_mask, rows, next_labels, valid, count, scale, norm_w, head_w,
                  *w):
        for i in range(self.num_layers):
            wi = w[i * self.per_layer:(i + 1) * self.per_layer]
            q, k, v = self.math.attention_inputs(wi, x, rot_cos, rot_sin, im_mask, (), self.image_lora)
            out = self.math.attend(q, k, v, mask)
            x = self.math.layer_output(wi, x, out, im_mask, (), self.image_lora)
        b, n, hidden = x.shape
        picked = ops.gather(x.reshape(b * n, hidden), rows, 0).expand_dims(0)
        return self.head(picked, next_labels, valid, count, scale, norm_w, head_w)


class DecoderLossGrad(nn.Cell):
    """(loss * scale, (d embeddings, d each trainable layer weight)) of `_DecoderLoss`, without recomputation:
    `trainable` indexes one layer's weight tuple (the same positions in every layer), and the gradients come
    layer by layer in that order. A frozen head only (a trained one keeps the block path)."""

    def __init__(self, math_cell, num_layers, per_layer, trainable, eps, image_lora, products=EXACT):
        super().__init__()
        positions = (0,) + tuple(_DecoderLoss.LEADING + li * per_layer + k for li in range(num_layers)
                                 for k in trainable)
        self.grad = ms.value_and_grad(_DecoderLoss(math_cell, num_layers, per_layer, eps, image_lora, products),
                                      grad_position=positions)

    def construct(self, *args):
        return self.grad(*args)


class _HeadLoss(nn.Cell):
    """Final RMSNorm, output head and upstream's loss: CrossEntropyLoss (mean over the supervised
    tokens) of logits t against labels t + 1, times `scale` (1 / gradient accumulation steps). `head_grad`:
    whether the head is trained (`head_cross_entropy`: a frozen head's loss and gradient are one kernel on CPU)."""

    def __init__(self, eps, products=EXACT, head_grad=False):
        super().__init__()
        self.eps = eps
        self.products = products
        self.head_grad = head_grad

    def construct(self, x, next_labels, valid, count, scale, norm_w, head_w):
        nll = head_cross_entropy(rms_norm(x, norm_w, self.eps), head_w, next_labels, valid, self.products,
                                 self.head_grad)
        return nll.sum() / count * scale


class HeadLossGrad(nn.Cell):
    """(loss * scale, (dx[, d norm, d head])) of `_HeadLoss`."""

    def __init__(self, eps, train_head: bool, products=EXACT):
        super().__init__()
        positions = (0, 5, 6) if train_head else (0,)
        self.grad = ms.value_and_grad(_HeadLoss(eps, products, train_head), grad_position=positions)

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

