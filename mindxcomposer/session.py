"""Host-side bookkeeping for decoding over the static KV cache: slots, positions, masks, RoPE angles.

A `ModelSession` serves the decoding loop (`mindxcomposer.generation`): `prefill` from embeddings,
`step` one token per row, `reorder` rows for beam search. Rows are left-padded, and the prompt is
further left-padded to a length bucket, so that the prefill graph compiles once per bucket and the
step graph once per (batch, cache size). Positions and the dynamic-NTK RoPE base are computed per row
from that row's real tokens, so a row decodes exactly as it would alone.
"""
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor

from .modeling_internlm2 import CachedDecoder
from .rope import rope_cos_sin

_MASK_MIN = np.finfo(np.float32).min
PREFILL_BUCKET = 64
CACHE_BUCKET = 256


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _jit(cell):
    @ms.jit
    def run(*args):
        return cell(*args)
    return run


class ModelSession:
    def __init__(self, model, batch_size: int, max_len: int, infer_mode: str = "base",
                 compiled: Optional[bool] = None, prefill_bucket: int = PREFILL_BUCKET):
        self.model = model
        self.config = model.config
        self.batch_size = batch_size
        self.cache_len = round_up(max_len, CACHE_BUCKET)
        self.infer_mode = infer_mode
        self.prefill_bucket = prefill_bucket
        self.decoder = CachedDecoder(model.model, model.output, model.config, batch_size, self.cache_len, model.dtype)
        if compiled is None:
            compiled = ms.get_context("device_target") != "GPU"
        self.compiled = compiled
        self._run = _jit(self.decoder) if compiled else self.decoder
        self.signatures = set()  # distinct (kind, shapes, mode) = graphs compiled when `compiled`
        self.slot_mask = np.zeros((batch_size, self.cache_len), np.int64)
        self.next_slot = 0

    @property
    def compile_count(self) -> int:
        return len(self.signatures) if self.compiled else 0

    def _forward(self, kind, embeds, positions, real_len, im_mask, slots):
        b, n, _ = embeds.shape
        cos = np.empty((b, n, self.config.head_dim), np.float32)
        sin = np.empty_like(cos)
        for r in range(b):  # the dynamic-NTK base depends on each row's own length
            cos[r], sin[r] = rope_cos_sin(self.config, positions[r], seq_len=int(real_len[r]))
        visible = (np.arange(self.cache_len)[None, None, :] <= slots[None, :, None]) & (self.slot_mask[:, None, :] > 0)
        mask = np.where(visible, np.float32(0), _MASK_MIN).astype(np.float32)[:, None]
        kv = self.config.num_key_value_heads
        write_idx = np.empty((b, kv, n, 3), np.int32)
        write_idx[..., 0] = np.arange(b)[:, None, None]
        write_idx[..., 1] = np.arange(kv)[None, :, None]
        write_idx[..., 2] = slots[None, None, :]
        dt = self.model.dtype
        self.signatures.add((kind, b, n, self.cache_len, self.infer_mode))
        logits = self._run(Tensor(embeds).astype(dt), Tensor(cos).astype(dt), Tensor(sin).astype(dt),
                           Tensor(mask).astype(dt), Tensor(im_mask[..., None]).astype(dt), Tensor(write_idx),
                           self.infer_mode)
        return logits.asnumpy()

    def prefill(self, inputs_embeds, im_mask, attention_mask=None) -> np.ndarray:
        """Left-padded prompt embeddings [B, L, H] -> logits [B, V] of each row's last token."""
        embeds = np.asarray(inputs_embeds, np.float32)
        b, n, hsz = embeds.shape
        am = np.ones((b, n), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        nb = round_up(n, self.prefill_bucket)
        if nb > self.cache_len:
            raise ValueError(f"prompt of {n} tokens does not fit a cache of {self.cache_len}")
        pad = nb - n
        embeds = np.concatenate([np.zeros((b, pad, hsz), np.float32), embeds], 1)
        am = np.concatenate([np.zeros((b, pad), np.int64), am], 1)
        imm = np.concatenate([np.zeros((b, pad), np.float32), np.asarray(im_mask, np.float32)], 1)
        self.slot_mask[:] = 0
        self.slot_mask[:, :nb] = am
        self.next_slot = nb
        positions = np.where(am > 0, np.cumsum(am, 1) - 1, 1)
        return self._forward("prefill", embeds, positions, am.sum(1), imm, np.arange(nb))

    def step(self, token_ids, attention_mask=None) -> np.ndarray:
        """One new token per row -> logits [B, V]. Generated tokens never take the image LoRA path."""
        if self.next_slot >= self.cache_len:
            raise ValueError(f"the KV cache of {self.cache_len} slots is full")
        ids = np.asarray(token_ids, np.int64).reshape(self.batch_size, 1)
        embeds = self.model.embed_tokens(ids)
        slot = self.next_slot
        self.slot_mask[:, slot] = 1
        self.next_slot += 1
        real_len = self.slot_mask.sum(1)
        positions = (real_len - 1)[:, None]
        return self._forward("step", embeds, positions, real_len, np.zeros((self.batch_size, 1), np.float32),
                             np.array([slot]))

    def reorder(self, beam_idx) -> None:
        idx = np.asarray(beam_idx, np.int32)
        self.decoder.reorder(Tensor(idx))
        self.slot_mask = self.slot_mask[idx]
