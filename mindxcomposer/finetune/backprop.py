"""Loss and gradients of one micro-batch, as upstream's `forward(samples=...)` + `backward` give them.

The forward is upstream's training forward: token embeddings with each image's embeddings (ViT on
its global view and tiles, HD merge, projector) at its positions, the decoder on positions 0..L-1
with the padding masked, the output head, and CrossEntropyLoss (mean over the supervised tokens) of
logits t against labels t + 1. The backward goes block by block (`layer_grads`): the decoder and head
from stored layer inputs, then each image's projector, HD merge (data movement: its transpose is an
index scatter), ViT layers and stem, recomputing the ViT forward one crop micro-batch at a time.

Sequences are padded to a multiple of `LENGTH_BUCKET` so that graphs compiled for one length serve
the next micro-batches (padded keys are masked out, padded rows carry no loss: the values are those
of the unpadded sequence). RoPE is computed for the real length: upstream's dynamic-NTK table depends
on it, and, as upstream's cached table, on the longest sequence this process has seen
(`rope_length`).
"""
from typing import Dict, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..modeling_clip import LAYER_WEIGHTS
from ..constants import LINEARS
from ..modeling_xcomposer2 import causal_mask
from ..ops import embedding, kernels_enabled, linear, rms_norm
from ..rope import packed_rope
from ..vision import PROJECTOR_CHUNK
from .labels import IGNORE_INDEX
from .lora import adapter_name
from .layer_grads import (ChainGrad, ClipLayerGrad, DecoderLayerBlocks, DecoderLossGrad, HeadLossGrad,
                          TrainingMath, dropout_rows)
from .spill import LayerInputs, check_store, choose_store, layer_input_bytes
from .trainables import Trainables

LENGTH_BUCKET = 64
# Positions with a target per head-and-loss call (a multiple of LENGTH_BUCKET). The call's logits and their gradient
# are [rows, vocab] fp32 (47 MB each at 128 rows and the release's vocabulary) and add to the pool's high-water mark:
# at the release's width, 2 layers and 1,375 positions, two LoRA steps peaked 1.56 GiB above the loaded model with
# 128 rows and 1.76 with 256, in the same time (docs/finetune.md).
HEAD_CHUNK = 128
# Positions per call of a decoder layer's row-wise parts, forward and gradient (`DecoderLayerBlocks`): `LAYER_ROWS`
# where set (tests, benchmarks), else `layer_rows(config)`, as many rows as keep a block's widest activation
# ([rows, intermediate]) within BLOCK_ELEMENTS: 128 rows at the release's width. A call's working set adds to the
# memory pool's high-water mark (freed blocks of one size do not serve the next stage's other sizes): at the
# release's width, 2 layers and 1,375 positions, two LoRA steps peaked 3.32 GiB above the loaded model with 256 rows,
# 2.33 with 128 and 2.08 with 64, at about the same speed (docs/finetune.md, "Rows per block"); as one graph over
# all rows the first layer's gradient alone added 4.5 GiB. At a narrower width the same memory holds more rows, and
# fewer calls matter: at hidden 512, blocks of 128 rows made a step 1.3x slower than one call per layer.
# Over a quantized base (LoRA over int8 / int4) every block dequantizes each weight again while its products pack
# it, so blocks are QUANTIZED_ROWS_FACTOR times larger: that cost is shared by more rows, and the base's resident
# weights leave the room (int4 release: 6.7 GiB against bf16's 16.2). Measured at the release's width, 2 layers of the
# int4 release, 8,187 positions, one step: 289 s with 128 rows, 261 s with 256; peak 6.81 and 7.01 GiB
# (docs/finetune.md).
QUANTIZED_ROWS_FACTOR = 2
LAYER_ROWS = None
BLOCK_ELEMENTS = 128 * 14336


def layer_rows(config) -> int:
    """Rows per block of a decoder layer's row-wise parts (a multiple of LENGTH_BUCKET), see LAYER_ROWS."""
    if LAYER_ROWS:
        return int(LAYER_ROWS)
    rows = max(LENGTH_BUCKET, BLOCK_ELEMENTS // config.intermediate_size // LENGTH_BUCKET * LENGTH_BUCKET)
    return rows * QUANTIZED_ROWS_FACTOR if config.quantization is not None else rows


# The decoder and the head are differentiated as one graph that keeps every intermediate from the forward to the
# backward (`DecoderLossGrad`), instead of block by block with each block's forward recomputed, where the
# micro-batch's activations are estimated (`kept_activation_bytes`) at no more than this: a narrow or shallow model
# on short samples. Recomputation costs a second forward of every layer (a mid-size LoRA step's products: 693 GFLOP
# by blocks, 580 as one graph; docs/finetune.md); the blocks keep the memory of a step flat in depth, which the
# release needs (one of its layers at 1,000 positions: ~1.8 GB by this estimate). None: every micro-batch goes by
# blocks.
KEEP_ACTIVATIONS_BYTES = 2 ** 31


def kept_activation_bytes(config, rows: int, head_rows: int) -> int:
    """Estimate of what the one-graph decoder adds to the memory for `rows` positions (all samples of a micro-batch,
    padding included) and `head_rows` positions with a target: per layer and position 40 hidden-wide and 20
    intermediate-wide fp32 values (the forward's intermediates, the norms, q / k / v, the LoRA and Partial-LoRA inputs
    and outputs, the MLP's halves, and the backward's gradients of as many, with the memory pool's slack), and the
    head's logits and their gradient ([head_rows, vocab] each, inside its kernel). Fitted to the mid-size benchmark
    (hidden 512, 6 layers, micro-batches of up to 1,088 positions): 1.5 GB estimated, 1.6 GiB measured above the
    block path's peak; 0.8 GiB since RMSNorm's gradient is one kernel (its composed form kept ten [rows, hidden]
    intermediates per norm): on the safe side by about 2x, kept so (docs/finetune.md)."""
    per_row = 40 * config.hidden_size + 20 * config.intermediate_size
    return 4 * (rows * config.num_hidden_layers * per_row + 2 * head_rows * config.vocab_size)


VOCAB_CHUNK = 8192  # vocabulary rows per slice of a frozen head in another dtype (`_frozen_head`)


def _layer_seed(seed: float, layer: int) -> float:
    """The dropout seed of one decoder layer in a micro-batch drawn with `seed` (`hash_dropout`)."""
    return seed * 1000.0 + layer


def _pad_to(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


def _next_labels(labels):
    """Labels t + 1 at position t (upstream's shift), where they have a target, and their count."""
    b, n_pad = labels.shape
    next_labels = np.full((b, n_pad), IGNORE_INDEX, np.int64)
    next_labels[:, :-1] = labels[:, 1:]
    valid = next_labels != IGNORE_INDEX
    return next_labels, valid, int(valid.sum())


def _head_rows(part: np.ndarray, flat_labels: np.ndarray, size: int):
    """(rows int32 [size], labels int32 [1, size], weight float32 [1, size]) of one head-and-loss call over the flat
    positions `part` (with a target), padded to `size` with a repeat of the last real row: finite, and weighted 0."""
    rows = np.full(size, part[-1], np.int32)
    rows[:part.size] = part
    labels = np.zeros((1, size), np.int32)
    labels[0, :part.size] = flat_labels[part]
    weight = np.zeros((1, size), np.float32)
    weight[0, :part.size] = 1.0
    return rows, labels, weight


class _FinalNorm(nn.Cell):
    """The final RMSNorm as a function of the hidden state alone (for `ms.vjp`)."""

    def __init__(self, weight, eps):
        super().__init__()
        self.weight, self.eps = weight, eps

    def construct(self, x):
        return rms_norm(x, self.weight, self.eps)


class MicroBatchGradients:
    """`loss_and_grads(batch, scale, seed)` for a model and its `Trainables`. `layer_inputs` (`auto`, `memory`,
    `disk`) and `spill_dir`: where the decoder layers' inputs wait for the backward (`spill.LayerInputs`)."""

    def __init__(self, model, trainables: Trainables, plora_dropout: float = 0.0, layer_inputs: str = "auto",
                 spill_dir: Optional[str] = None):
        check_store(layer_inputs, "layer_inputs")  # before any work
        self.layer_inputs, self.spill_dir = layer_inputs, spill_dir
        self.model = model
        self.config = model.config
        self.trainables = trainables
        self.dt = model.compute_dtype
        lora = trainables.lora
        targets = lora.targets if lora else (False,) * 5
        # Ascend's fused attention (and its backward) where the model uses it; the portable path elsewhere.
        self.math = TrainingMath(self.config, targets, lora.scaling if lora else 1.0,
                                 lora.lora_dropout if lora else 0.0, plora_dropout,
                                 model.model.math.use_fused_attention, model.products)
        key = trainables.key
        # Per layer: the trained name of each weight in the layer's weight tuple (None: frozen).
        self.layer_keys = []
        for li, layer in enumerate(model.model.layers):
            keys = [key(p) for p in layer.layer_weights(())]
            if lora:
                keys += [adapter_name(li, lin, part) for lin, t in zip(LINEARS, targets) if t for part in "AB"]
            self.layer_keys.append(keys)
        self.adapter_names = [[k for k in keys if k is not None and ".lora_" in k] for keys in self.layer_keys]
        # Trainable positions in a layer's weight tuple: the same for every layer.
        self.layer_trainable = [i for i, k in enumerate(self.layer_keys[0]) if k is not None]
        self.layer_blocks = DecoderLayerBlocks(self.math, self.layer_trainable, layer_rows(self.config))
        m = model.model
        self.head_keys = (key(m.norm.weight), key(model.output.weight))
        self.train_head = self.head_keys[1] is not None
        # A frozen head stored in another dtype than the arithmetic, without the CPU kernels (which read it in
        # place, in the forward and in the gradient): see `_frozen_head`.
        self.frozen_cast_head = (not self.train_head and model.output.weight.dtype != self.dt
                                 and not kernels_enabled())
        self.head_grad = HeadLossGrad(self.config.rms_norm_eps, self.train_head, model.products)
        self._decoder_grads = {}  # whether the micro-batch holds an image token -> DecoderLossGrad (made on first use)
        self.embedding_key = key(m.tok_embeddings.weight)
        vit = model.vit.vision_tower.vision_model
        self.vit_layer_keys = [[key(p) for p in layer.weights()] for layer in vit.encoder.layers]
        self.train_vit = any(k is not None for k in self.vit_layer_keys[0])
        proj_params = [p for c in (model.vision_proj[0], model.vision_proj[2]) for p in (c.weight, c.bias)]
        self.proj_keys = [key(p) for p in proj_params]
        self.train_proj = self.proj_keys[0] is not None
        self.gn_keys = (key(model.plora_glb_GN), key(model.plora_sub_GN))
        self.train_gn = self.gn_keys[0] is not None
        self.needs_vision_grad = self.train_vit or self.train_proj or self.train_gn
        if self.needs_vision_grad:
            proj_cells = (model.vision_proj[0], model.vision_proj[1], model.vision_proj[2])
            self.proj_grad = ChainGrad(proj_cells, proj_params if self.train_proj else [],
                                       input_grad=self.train_vit or self.train_gn)
            if self.train_vit:
                self.clip_grad = ClipLayerGrad(model.vit._math, True, len(LAYER_WEIGHTS))
                stem = model.vit._stem
                self.stem_params = list(stem.get_parameters())
                self.stem_keys = [key(p) for p in self.stem_params]
                self.stem_grad = ChainGrad((stem,), self.stem_params, input_grad=False)
        self.rope_length = 0  # the longest sequence seen (upstream's cached dynamic-NTK table)

    # ------------------------------------------------------------------ a decoder layer
    def forward_layer(self, x, rot_cos, rot_sin, mask, im_mask, w):
        return self.layer_blocks.forward(x, rot_cos, rot_sin, mask, im_mask, w)

    def layer_grad(self, x, dy, rot_cos, rot_sin, mask, im_mask, w):
        """(dx, gradient of each trainable weight of the layer, in `layer_trainable` order)."""
        return self.layer_blocks.grad(x, dy, rot_cos, rot_sin, mask, im_mask, w)

    # ------------------------------------------------------------------ inputs
    def _layer_weights(self, li: int, seed: Optional[float]) -> tuple:
        layer = self.model.model.layers[li]
        base = [Tensor(p) for p in layer.layer_weights(())]
        adapter = [Tensor(self.trainables.params[n]) for n in self.adapter_names[li]]
        extra = [Tensor(np.float32(seed))] if self.math.has_seed else []
        return tuple(base + adapter + extra)

    def _image_embeddings(self, pixel_values) -> Tuple[np.ndarray, dict]:
        """Embeddings [T, hidden] of one image and what its backward needs."""
        model = self.model
        crops, h, w = model.vit_crops(pixel_values)
        feats = model.vit.encode(crops, model.vit_micro_batch)
        merged = model.merger(feats, model.plora_glb_GN, model.plora_sub_GN, h, w)
        emb = model.vision_proj(merged)
        ctx = {"crops": crops, "h": h, "w": w, "merged": merged.asnumpy()[0], "feat_shape": tuple(feats.shape)}
        return emb.asnumpy()[0].astype(np.float32), ctx

    # ------------------------------------------------------------------ the micro-batch
    def loss_and_grads(self, batch, scale: float, seed: float = 0.0) -> Tuple[float, Dict[str, Tensor], bool]:
        """(loss * scale, gradients of loss * scale by trainable name, whether vision parameters got one).
        `seed` draws the dropout masks."""
        cfg, dt = self.config, self.dt
        ids = np.asarray(batch["input_ids"], np.int64)
        b, n = ids.shape
        n_pad = _pad_to(n, LENGTH_BUCKET)
        am = np.zeros((b, n_pad), np.int64)
        am[:, :n] = np.asarray(batch["attention_mask"], np.int64)
        labels = np.full((b, n_pad), IGNORE_INDEX, np.int64)
        labels[:, :n] = batch["labels"]
        im = np.zeros((b, n_pad), np.float32)
        im[:, :n] = np.asarray(batch["im_mask"], np.float32)
        tok = np.zeros((b, n_pad), np.int32)
        tok[:, :n] = np.where(ids >= 0, ids, 0)
        x0 = embedding(Tensor(tok), self.model.model.tok_embeddings.weight, dt).asnumpy().astype(np.float32)
        spans = np.asarray(batch.get("image_spans", np.zeros((0, 3), np.int64))).reshape(-1, 3)
        images = []
        for (row, start, kept), pv in zip(spans, batch.get("pixel_values", [])):
            emb, ctx = self._image_embeddings(pv)
            x0[row, start:start + kept] = emb[:kept]
            images.append((int(row), int(start), int(kept), ctx))
        self.rope_length = max(self.rope_length, n)
        cos = np.ones((b, n_pad) + (1, cfg.num_attention_heads // cfg.num_key_value_heads + 2, cfg.head_dim),
                      np.float32)
        sin = np.zeros_like(cos)
        pos = np.tile(np.arange(n), (b, 1))
        cos[:, :n], sin[:, :n] = packed_rope(cfg, pos, [self.rope_length] * b)
        cos_t, sin_t = Tensor(cos).astype(dt), Tensor(sin).astype(dt)
        mask_t = Tensor(causal_mask(am, n_pad)).astype(dt)
        im_t = Tensor(im[..., None]).astype(dt)

        num_layers = cfg.num_hidden_layers
        if self.layer_inputs == "disk" and not self.spill_dir:
            raise ValueError("layer_inputs disk needs a directory for its files")
        store = choose_store(self.layer_inputs, layer_input_bytes(num_layers, b * n_pad, cfg.hidden_size),
                             "layer_inputs", self.spill_dir)
        targets = _next_labels(labels)
        if self._keeps_activations(store, b * n_pad, targets[2]):
            loss, dy, grads = self._decoder_kept(Tensor(x0).astype(dt), cos_t, sin_t, mask_t, im_t, targets, scale,
                                                 seed, bool(im.any()))
        else:
            with LayerInputs(self.spill_dir if store == "disk" else None) as xs:
                loss, dy, grads = self._decoder(xs, Tensor(x0).astype(dt), cos_t, sin_t, mask_t, im_t, targets, scale,
                                                seed)

        dx0 = dy.astype(ms.float32)
        if self.embedding_key is not None:
            text = (ids >= 0) & (np.arange(n)[None, :] < n)
            rows = np.nonzero(text.reshape(-1))[0]
            flat_ids = tok[:, :n].reshape(-1)[rows]
            d_rows = dx0[:, :n].reshape(b * n, -1)[Tensor(rows.astype(np.int32))]
            table = self.model.model.tok_embeddings.weight
            grads[self.embedding_key] = ops.zeros(table.shape, ms.float32).index_add(0, Tensor(flat_ids.astype(np.int32)), d_rows)
        has_vision = False
        if self.needs_vision_grad and images:
            dx0_np = dx0.asnumpy()
            has_vision = True
            for row, start, kept, ctx in images:
                d_emb = np.zeros((ctx["merged"].shape[0], cfg.hidden_size), np.float32)
                d_emb[:kept] = dx0_np[row, start:start + kept]
                self._image_backward(ctx, d_emb, grads)
        return loss, grads, has_vision

    def _decoder(self, xs: LayerInputs, x, cos_t, sin_t, mask_t, im_t, targets, scale, seed):
        """Decoder layers, head and loss, and their backward -> (loss, d embeddings, gradients by name). Each
        layer's input waits in `xs` from the forward to its gradient."""
        next_labels, valid, count = targets
        num_layers = self.config.num_hidden_layers
        seeds = [_layer_seed(seed, li) for li in range(num_layers)]
        for li in range(num_layers):
            xs.put(li, x)
            x = self.forward_layer(x, cos_t, sin_t, mask_t, im_t, self._layer_weights(li, seeds[li]))

        # head and loss
        m = self.model.model
        # No target left (every sample cut by max_length): upstream's CrossEntropyLoss is NaN (0 / 0) and its
        # gradients are zeros, which the backward below gives exactly (dy = 0, every head chunk skipped).
        loss, dy, d_norm, d_head = self._head(x, next_labels, valid, max(count, 1), scale)
        del x
        if count == 0:
            loss = float("nan")
        grads: Dict[str, Tensor] = {}
        if self.train_head:
            grads[self.head_keys[0]] = d_norm if d_norm is not None else ops.zeros(m.norm.weight.shape, ms.float32)
            grads[self.head_keys[1]] = (d_head if d_head is not None
                                        else ops.zeros(self.model.output.weight.shape, ms.float32))

        # decoder layers, last first
        for li in reversed(range(num_layers)):
            w = self._layer_weights(li, seeds[li])
            out = self.layer_grad(xs.get(li), dy, cos_t, sin_t, mask_t, im_t, w)
            xs.drop(li)
            dy = out[0]
            for k, gi in zip(self.layer_trainable, out[1:]):
                grads[self.layer_keys[li][k]] = gi
        return loss, dy, grads

    def _keeps_activations(self, store, rows: int, count: int) -> bool:
        """Whether a micro-batch of `rows` positions (padding included), `count` with a target, goes through
        `_decoder_kept` (see KEEP_ACTIVATIONS_BYTES): a frozen head in the arithmetic's dtype or read by the kernels,
        layer inputs not sent to disk, a target somewhere, and the activations within the bound."""
        if KEEP_ACTIVATIONS_BYTES is None or self.train_head or self.frozen_cast_head or store == "disk":
            return False
        return count > 0 and kept_activation_bytes(
            self.config, rows, _pad_to(count, LENGTH_BUCKET)) <= KEEP_ACTIVATIONS_BYTES

    def _decoder_kept(self, x, cos_t, sin_t, mask_t, im_t, targets, scale, seed, has_image):
        """`_decoder` as one graph (`DecoderLossGrad`): the same layers, head and loss, the same dropout masks (one
        block of rows per layer), nothing recomputed -> (loss, d embeddings, gradients by name)."""
        b, n_pad = x.shape[0], x.shape[1]
        num_layers = self.config.num_hidden_layers
        next_labels, valid, count = targets
        where = np.flatnonzero(valid.reshape(-1))
        rows, head_labels, weight = _head_rows(where, next_labels.reshape(-1), _pad_to(where.size, LENGTH_BUCKET))
        block_rows = (dropout_rows(b, n_pad),) if self.math.has_seed else ()  # one block of rows per layer
        weights = [self._layer_weights(li, _layer_seed(seed, li)) + block_rows for li in range(num_layers)]
        per_layer = len(weights[0])
        if has_image not in self._decoder_grads:
            self._decoder_grads[has_image] = DecoderLossGrad(self.math, num_layers, per_layer, self.layer_trainable,
                                                             self.config.rms_norm_eps, has_image, self.model.products)
        m = self.model.model
        val, g = self._decoder_grads[has_image](
            x, cos_t, sin_t, mask_t, im_t, Tensor(rows), Tensor(head_labels), Tensor(weight), Tensor(np.float32(count)),
            Tensor(np.float32(scale)), Tensor(m.norm.weight), Tensor(self.model.output.weight),
            *[t for w in weights for t in w])
        grads: Dict[str, Tensor] = {}
        t = len(self.layer_trainable)
        for li in range(num_layers):
            for j, k in enumerate(self.layer_trainable):
                grads[self.layer_keys[li][k]] = g[1 + li * t + j]
        return float(val.asnumpy()), g[0], grads

    def _head(self, x, next_labels, valid, count, scale):
        """Head and loss over the positions with a target only, gathered `HEAD_CHUNK` at a time: the fp32 logits
        and their gradient, [positions, vocab] each (1.5 GB per 4k positions at the release's vocabulary), never
        exist whole. A position without a target (an image's, a prompt's, padding) adds nothing to the loss nor
        to any gradient, so its logits are not computed: at hidden 512 the head's 92544 rows cost more than a
        decoder layer, and an image sample's ~1,000 image positions have none. The last chunk is padded to a
        multiple of LENGTH_BUCKET (few compiled shapes) with rows whose weight is zero."""
        b, n_pad, hidden = x.shape
        where = np.flatnonzero(valid.reshape(-1))  # flat positions with a target, in order
        if where.size == 0:
            return 0.0, ops.zeros(x.shape, x.dtype), None, None
        flat = x.reshape(b * n_pad, hidden)
        flat_labels = next_labels.reshape(-1)
        m = self.model.model
        norm_w, head_w = Tensor(m.norm.weight), Tensor(self.model.output.weight)
        loss, dxs, d_norm, d_head = 0.0, [], None, None
        for s in range(0, where.size, HEAD_CHUNK):
            part = where[s:s + HEAD_CHUNK]
            rows, labels, weight = _head_rows(part, flat_labels, min(HEAD_CHUNK, _pad_to(part.size, LENGTH_BUCKET)))
            xs = ops.gather(flat, Tensor(rows), 0).expand_dims(0)
            labels_t, valid_t = Tensor(labels), Tensor(weight)
            if self.frozen_cast_head:
                val, g = self._frozen_head(xs, labels_t, valid_t, count, scale, norm_w, head_w)
            else:
                val, g = self.head_grad(xs, labels_t, valid_t, Tensor(np.float32(count)),
                                        Tensor(np.float32(scale)), norm_w, head_w)
            loss += float(val.asnumpy())
            if self.train_head:  # one grad_position gives the gradient itself, not a tuple
                g, dn, dh = g
                d_norm = dn if d_norm is None else d_norm + dn
                d_head = dh if d_head is None else d_head + dh
            dxs.append(g[0, :part.size])
        # Back to [B, n, hidden]: each position takes its row of the chunks' gradients, or the zero row after them.
        back = np.full(b * n_pad, where.size, np.int32)
        back[where] = np.arange(where.size, dtype=np.int32)
        rows_dx = ops.concat(dxs + [ops.zeros((1, hidden), dxs[0].dtype)], 0)
        return loss, ops.gather(rows_dx, Tensor(back), 0).reshape(b, n_pad, hidden), d_norm, d_head

    def _frozen_head(self, x, labels, valid, count, scale, norm_w, head_w):
        """The head and loss of `_HeadLoss` for a frozen output head stored in another dtype than the
        arithmetic (a bf16 checkpoint on CPU), with its gradient written out: the vocabulary in slices of
        `VOCAB_CHUNK` rows, each cast to the compute dtype only while it is used, twice (a log-sum-exp pass,
        then softmax minus one-hot times the slice). Autodiff would keep an fp32 copy of the whole head
        (1.5 GB at the release's size) from the forward to the backward. Runs op by op."""
        h, h_vjp = ms.vjp(_FinalNorm(norm_w, self.config.rms_norm_eps), x)
        h32 = h.astype(ms.float32)
        vocab = head_w.shape[0]
        slices = [(v, min(v + VOCAB_CHUNK, vocab)) for v in range(0, vocab, VOCAB_CHUNK)]
        top = None
        parts = []
        for v0, v1 in slices:  # running maximum, then the sum of exponentials
            logits = linear(h32, head_w[v0:v1].astype(ms.float32))
            parts.append(ops.amax(logits, -1))
        top = ops.amax(ops.stack(parts, -1), -1)
        total = None
        for v0, v1 in slices:
            logits = linear(h32, head_w[v0:v1].astype(ms.float32))
            e = ops.exp(logits - top.expand_dims(-1)).sum(-1)
            total = e if total is None else total + e
        lse = top + ops.log(total)
        rows = embedding(labels, head_w, ms.float32)  # the labels' rows of the head
        picked = (h32 * rows).sum(-1)
        weight = valid * (float(scale) / float(count))
        loss = ((lse - picked) * weight).sum()
        dh = -(rows * weight.expand_dims(-1))
        for v0, v1 in slices:
            w = head_w[v0:v1].astype(ms.float32)
            probs = ops.exp(linear(h32, w) - lse.expand_dims(-1)) * weight.expand_dims(-1)
            dh = dh + ops.matmul(probs, w)
        return loss, h_vjp(dh.astype(h.dtype))[0]

    # ------------------------------------------------------------------ vision backward
    def _add(self, grads, name, g):
        grads[name] = g if name not in grads else grads[name] + g

    def _image_backward(self, ctx, d_emb: np.ndarray, grads) -> None:
        merged = ctx["merged"]
        rows, c4 = merged.shape
        d_merged = np.zeros_like(merged)
        chunk = min(PROJECTOR_CHUNK, rows)
        for s in range(0, rows, chunk):
            x = np.zeros((chunk, c4), np.float32)
            dy = np.zeros((chunk, d_emb.shape[1]), np.float32)
            part = merged[s:s + chunk]
            x[:part.shape[0]], dy[:part.shape[0]] = part, d_emb[s:s + chunk]
            out = self.proj_grad(Tensor(x).astype(self.dt), Tensor(dy).astype(self.dt))
            need_dx = self.train_vit or self.train_gn
            dx, dps = (out if self.train_proj else (out, ())) if need_dx else (None, out)
            if need_dx:
                d_merged[s:s + part.shape[0]] = dx.asnumpy()[:part.shape[0]]
            for name, gp in zip(self.proj_keys, dps):
                self._add(grads, name, gp)
        if not (self.train_vit or self.train_gn):
            return
        d_feats, d_glb, d_sub = self._merge_backward(d_merged, ctx)
        if self.train_gn:
            self._add(grads, self.gn_keys[0], Tensor(d_glb.reshape(self.model.plora_glb_GN.shape)))
            self._add(grads, self.gn_keys[1], Tensor(d_sub.reshape(self.model.plora_sub_GN.shape)))
        if self.train_vit:
            self._vit_backward(ctx["crops"], d_feats, grads)

    def _merge_backward(self, d_merged: np.ndarray, ctx):
        """The HD merge only moves values: run it on each feature's own index (and -1 / -2 for the two
        separators) to learn where every merged entry came from, then scatter-add the gradient back."""
        n_crops, patches, c = ctx["feat_shape"]
        idx_feats = np.arange(n_crops * patches, dtype=np.float32).reshape(n_crops, patches, 1)
        where = self.model.merger(idx_feats, np.full(4, -1, np.float32), np.full(4, -2, np.float32),
                                  ctx["h"], ctx["w"]).asnumpy()[0].astype(np.int64)  # [T, 4]
        d = d_merged.reshape(-1, 4, c)
        d_feats = np.zeros((n_crops * patches, c), np.float32)
        feat = where >= 0
        np.add.at(d_feats, where[feat], d[feat])
        d_glb = d[where == -1].reshape(-1, 4, c).sum(0) if np.any(where == -1) else np.zeros((4, c), np.float32)
        d_sub = d[where == -2].reshape(-1, 4, c).sum(0) if np.any(where == -2) else np.zeros((4, c), np.float32)
        return d_feats.reshape(n_crops, patches, c), d_glb.reshape(-1), d_sub.reshape(-1)

    def _vit_backward(self, crops: np.ndarray, d_feats: np.ndarray, grads) -> None:
        """Per crop micro-batch: recompute the tower's layer inputs, then back through layers and stem."""
        vit = self.model.vit
        layers = vit.vision_tower.vision_model.encoder.layers
        weights = [tuple(Tensor(p) for p in layer.weights()) for layer in layers]
        mb = self.model.vit_micro_batch or 1
        n = crops.shape[0]
        for s in range(0, n, mb):
            chunk = crops[s:s + mb]
            real = chunk.shape[0]
            if real < mb:
                chunk = np.concatenate([chunk, np.zeros((mb - real,) + chunk.shape[1:], np.float32)])
            xs = [vit._stem(Tensor(chunk).astype(self.dt))]
            for w in weights[:-1]:
                xs.append(vit._math(xs[-1], *w))
            dy = np.zeros((mb,) + tuple(xs[0].shape[1:]), np.float32)
            dy[:real, 1:] = d_feats[s:s + real]  # no gradient on the class token (IXC drops it)
            dy = Tensor(dy).astype(self.dt)
            for li in reversed(range(len(layers))):
                out = self.clip_grad(xs[li], dy, *weights[li])
                dy = out[0]
                for name, g in zip(self.vit_layer_keys[li], out[1:]):
                    self._add(grads, name, g)
            for name, g in zip(self.stem_keys, self.stem_grad(Tensor(chunk).astype(self.dt), dy)):
                self._add(grads, name, g)
