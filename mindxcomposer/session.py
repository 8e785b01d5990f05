"""Host-side bookkeeping for decoding over the static KV cache: slots, positions, masks, RoPE angles.

A `ModelSession` serves the decoding loop (`mindxcomposer.generation`): `prefill` from embeddings,
`step` one token per row, `reorder` rows for beam search. Rows are left-padded by the caller; the
prompt occupies slots [0, n) of the cache and generated tokens the following ones. The prompt runs in
equal chunks of at most `PREFILL_CHUNK` rows, rounded up to a multiple of `prefill_bucket`, the last
one padded on the right: padding rows write nothing into the cache (they add zeros), so padding costs
no cache slots. The prefill graph thus compiles once per chunk size and the step graph once per
(batch, cache size). Positions and the dynamic-NTK RoPE base are computed per row from that row's real
tokens, so a row decodes exactly as it would alone. For beam search (`prefill(..., copies=num_beams)`)
each prompt row runs through the layers once and its keys and values are copied to its beams' rows.

The cache API, for a server that runs several requests in one session (`serve/batching.py`): the write
slot (`write_slot`, `move_write_slot`), the slots a row holds tokens in (`row_slots`, `tokens_held`),
`copy_rows_from` (a prompt prefilled in another session into some rows of this one), `compact_rows` (a
row's slots packed to the front of the cache), and two hooks: `after_prefill_chunk` (run after each
prefill chunk) and `after_vision_calls` (run after each call of the vision encoder in this thread).
"""
import contextlib
from typing import Callable, Iterator, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from .modeling_internlm2 import CachedDecoder
from .ops import kernels_enabled
from .rope import packed_rope
from .vision_pauses import between_vision_calls

_MASK_MIN = np.finfo(np.float32).min
PREFILL_BUCKET = 64
PREFILL_CHUNK = 512  # most rows per prefill graph call: bounds its memory
CACHE_BUCKET = 256


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class ModelSession:
    # Called (no arguments) after each prefill chunk has run through every layer; with beams (layer by layer)
    # after each chunk's worth of layer calls. Runs between compiled calls: the computation is unchanged.
    after_prefill_chunk: Optional[Callable[[], None]] = None

    def __init__(self, model, batch_size: int, max_len: int, infer_mode: str = "base",
                 compiled: Optional[bool] = None, prefill_bucket: int = PREFILL_BUCKET):
        self.model = model
        self.config = model.config
        self.batch_size = batch_size
        self.cache_len = round_up(max_len, CACHE_BUCKET)
        self.infer_mode = infer_mode
        self.prefill_bucket = prefill_bucket
        self.compiled = self.resolve_compiled(compiled)
        self.decoder = None
        self.set_infer_mode(infer_mode)
        self.signatures = set()  # distinct (kind, shapes, mode) = graphs compiled when `compiled`
        self.slot_mask = np.zeros((batch_size, self.cache_len), np.int64)
        self.next_slot = 0
        self.prefilled_rows = 0  # prompt rows `prefill` has run through the layers, over the session's life
        self._slots = np.arange(self.cache_len)

    @staticmethod
    def resolve_compiled(compiled: Optional[bool]) -> bool:
        return ms.get_context("device_target") != "GPU" if compiled is None else bool(compiled)

    def fits(self, batch_size: int, max_len: int, compiled: Optional[bool] = None) -> bool:
        """Whether this session is what `ModelSession(model, batch_size, max_len, compiled=compiled)` would
        be (same rows, cache slots and graphs): then it can serve that call in its place, since `prefill`
        starts from a cleared cache, with the graphs it has compiled."""
        return (batch_size == self.batch_size and round_up(max_len, CACHE_BUCKET) == self.cache_len
                and self.resolve_compiled(compiled) == self.compiled
                and self.prefill_compiled == self._prefill_compiles())

    def _prefill_compiles(self) -> bool:
        # With weights stored in another dtype than the arithmetic (bf16 on CPU) and no CPU kernels, the
        # prefill runs op by op even when `compiled`: a layer graph would keep the compute-dtype casts of all
        # the layer's weights alive until it returns (0.9 GB at release width); op by op each cast is freed
        # after its product. The CPU kernels read bf16 weights in place (no cast exists), so with them the
        # prefill layer compiles like the step.
        return self.compiled and (self.model.dtype == self.model.compute_dtype or kernels_enabled())

    def set_infer_mode(self, infer_mode: str) -> None:
        """Decode in `infer_mode` from the next prefill on: brings in the task LoRAs the mode needs (and
        drops the others, see `use_task_loras`), and rebuilds the decoder over them, keeping the caches."""
        model = self.model
        self.infer_mode = infer_mode
        tasks = model.use_task_loras(infer_mode)
        if self.decoder is not None and tasks == self.tasks and model.task_version == self._task_version:
            return  # the same weights: keep the decoder and its compiled step (a rebuild compiles it again)
        self.tasks = tasks
        self._task_version = model.task_version
        caches = None if self.decoder is None else (self.decoder.k_cache, self.decoder.v_cache)
        d = self.decoder = CachedDecoder(model.model, model.output, model.config, self.batch_size, self.cache_len,
                                         model.compute_dtype, self.tasks, caches)
        self.prefill_compiled = self._prefill_compiles()
        self._prefill_layer = d.prefill_layer(self.prefill_compiled)
        self._step = None  # made at the first step: a session that only prefills (the server's) has no step graph

    def _current_weights(self) -> None:
        """Another session on the same model may have switched its task LoRAs since this one was built:
        bring this session's back (the model holds one set at a time)."""
        if self.model.task_version != self._task_version or self.model.resident_tasks != self.tasks:
            self.set_infer_mode(self.infer_mode)

    @property
    def compile_count(self) -> int:
        return len(self.signatures) if self.compiled else 0

    def _tensor(self, arr):
        t = Tensor(arr)
        return t if self.model.compute_dtype == ms.float32 else t.astype(self.model.compute_dtype)

    def prefill(self, inputs_embeds, im_mask, attention_mask=None, copies: int = 1) -> np.ndarray:
        """Left-padded prompt embeddings [P, L, H] -> logits [P * copies, V] of each row's last token.

        Each prompt row runs through the layers once. With `copies` > 1 (beam search, one copy per beam) its
        keys, values and last hidden state are then copied to `copies` consecutive rows (prompt row r to
        rows r * copies ... r * copies + copies - 1) and the head runs on every row: the session holds
        P * copies rows, as if each prompt had been prefilled that many times side by side."""
        embeds = np.asarray(inputs_embeds, np.float32)
        b, n, hsz = embeds.shape
        if isinstance(copies, bool) or not isinstance(copies, (int, np.integer)) or copies < 1:
            raise ValueError(f"copies must be an integer >= 1, got {copies!r}")
        if b * copies != self.batch_size:
            raise ValueError(f"the session holds {self.batch_size} rows, the prompt has {b}"
                             + (f" rows copied {copies} times" if copies > 1 else ""))
        if n > self.cache_len:
            raise ValueError(f"prompt of {n} tokens does not fit a cache of {self.cache_len}")
        am = np.ones((b, n), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        self._current_weights()
        chunks = -(-n // PREFILL_CHUNK)
        chunk = round_up(-(-n // chunks), self.prefill_bucket)
        pad = chunks * chunk - n
        embeds = np.concatenate([embeds, np.zeros((b, pad, hsz), np.float32)], 1)
        imm = np.concatenate([np.asarray(im_mask, np.float32), np.zeros((b, pad), np.float32)], 1)[..., None]
        am_padded = np.concatenate([am, np.zeros((b, pad), np.int64)], 1)
        slot_mask = np.zeros((b, self.cache_len), np.int64)
        slot_mask[:, :n] = am
        self.slot_mask = np.repeat(slot_mask, copies, 0)
        self.next_slot = n
        positions = np.where(am_padded > 0, np.cumsum(am_padded, 1) - 1, 1)
        cos, sin = packed_rope(self.config, positions, am.sum(1))
        # Padding rows add zeros (keep 0), past the cache's end all at its last slot.
        slots = np.minimum(np.arange(n + pad), self.cache_len - 1).astype(np.int32)
        keep = (np.arange(n + pad) < n).astype(np.float32)[None, None, :, None]
        # A chunk without image rows runs without the Partial LoRA (it adds exact zeros there): a second
        # graph, compiled when a prompt has such a chunk (text-only prompts, long text after an image).
        has_image = [bool(imm[:, start:start + chunk].any()) for start in range(0, n + pad, chunk)]
        if self.prefill_compiled:
            for image_lora in set(has_image):
                self.signatures.add(("prefill", b, chunk, self.cache_len, self.infer_mode, image_lora))
        d = self.decoder
        weights = [tuple(Tensor(p) for p in layer) for layer in d.layer_weights]  # views, no copies

        def chunk_args(start):
            rows = slice(start, start + chunk)
            visible = (self._slots[None, None, :] <= slots[None, rows, None]) & (slot_mask[:, None, :] > 0)
            mask = self._tensor(np.where(visible, np.float32(0), _MASK_MIN).astype(np.float32)[:, None])
            return (self._tensor(cos[:, rows]), self._tensor(sin[:, rows]), mask, self._tensor(imm[:, rows]),
                    Tensor(slots[rows]), self._tensor(keep[:, :, rows]))

        starts = range(0, n + pad, chunk)
        hook = self.after_prefill_chunk
        if copies == 1:  # chunk by chunk, each through every layer, straight into the session's caches
            d.reset()
            k_caches = [Tensor(c) for c in d.k_cache]
            v_caches = [Tensor(c) for c in d.v_cache]
            for c, start in enumerate(starts):
                args = chunk_args(start)
                x = self._tensor(embeds[:, start:start + chunk])
                for i in range(d.num_layers):
                    x = self._prefill_layer(x, *args, k_caches[i], v_caches[i], self.tasks, has_image[c], *weights[i])
                if hook is not None:
                    hook()
            last = x[:, (n - 1) - start]
        else:
            # Layer by layer, each over every chunk (the same calls as above, in another order): one layer's
            # keys and values of the P prompt rows fill a P-row cache, then are copied to the beams' rows of
            # the session's cache. Beside the session's cache this holds one layer's P-row cache and every
            # chunk's hidden states and mask (P rows each), not P * copies rows of activations.
            args = [chunk_args(start) for start in starts]
            xs = [self._tensor(embeds[:, start:start + chunk]) for start in starts]
            beams = Tensor(np.repeat(np.arange(b), copies).astype(np.int32))
            shape = (b,) + tuple(d.k_cache[0].shape[1:])
            calls = 0
            for i in range(d.num_layers):
                k_cache, v_cache = ops.zeros(shape, d.k_cache[i].dtype), ops.zeros(shape, d.v_cache[i].dtype)
                for c in range(len(xs)):
                    xs[c] = self._prefill_layer(xs[c], *args[c], k_cache, v_cache, self.tasks, has_image[c],
                                                *weights[i])
                    calls += 1
                    if hook is not None and calls % d.num_layers == 0:  # a chunk's worth of work
                        hook()
                d.broadcast_rows(i, k_cache, v_cache, beams)
                del k_cache, v_cache
            last = ops.gather(xs[-1][:, (n - 1) - starts[-1]], beams, 0)
        self.prefilled_rows += b
        return d.head(last, Tensor(d.norm_weight), Tensor(d.head_weight))[1].asnumpy()

    def step(self, token_ids, attention_mask=None) -> np.ndarray:
        """One new token per row -> logits [B, V]. Generated tokens never take the image LoRA path."""
        if self.next_slot >= self.cache_len:
            raise ValueError(f"the KV cache of {self.cache_len} slots is full")
        self._current_weights()
        ids = np.asarray(token_ids, np.int32).reshape(self.batch_size, 1)
        slot = self.next_slot
        self.slot_mask[:, slot] = 1
        self.next_slot += 1
        real_len = self.slot_mask.sum(1)
        cos, sin = packed_rope(self.config, (real_len - 1)[:, None], real_len)
        mask = np.where(self.slot_mask > 0, np.float32(0), _MASK_MIN).astype(np.float32)[:, None, None]
        self.signatures.add(("step", self.batch_size, 1, self.cache_len, self.infer_mode))
        if self._step is None:
            self._step = ms.jit(self.decoder.step) if self.compiled else self.decoder.step
        logits = self._step(Tensor(ids), self._tensor(cos), self._tensor(sin), self._tensor(mask),
                            Tensor(np.array([slot], np.int32)))
        return logits.asnumpy()

    def reorder(self, beam_idx) -> None:
        idx = np.asarray(beam_idx, np.int32)
        self.decoder.reorder(Tensor(idx))
        self.slot_mask = self.slot_mask[idx]

    # ------------------------------------------------------------------ the cache API
    @property
    def write_slot(self) -> int:
        """The cache slot the next `step` writes (every row's)."""
        return self.next_slot

    def move_write_slot(self, slot: int) -> None:
        """The next `step` writes `slot`: the rows' tokens may lie anywhere before or after it, as long as
        the slots the coming steps write are free (positions come from each row's own slots)."""
        if not 0 <= slot <= self.cache_len:
            raise ValueError(f"slot {slot} is outside the cache of {self.cache_len} slots")
        self.next_slot = int(slot)

    def row_slots(self, row: int) -> np.ndarray:
        """The slots row `row` holds tokens in, in their order."""
        return np.nonzero(self.slot_mask[row])[0]

    def tokens_held(self, rows) -> np.ndarray:
        """How many slots each of `rows` holds tokens in."""
        return self.slot_mask[np.asarray(rows, np.int64)].sum(1)

    def copy_rows_from(self, source: "ModelSession", rows, slots) -> None:
        """Put the keys and values of `source`'s first `len(slots)` positions (each of its rows, in order)
        into rows `rows` of this session's cache at `slots`; each such row holds tokens exactly where the
        source row did among those positions (left padding stays empty). The rows' other slots are
        cleared. `source` is typically a session a prompt was prefilled in alone, shaped as `chat` shapes
        it, so that the first logits are chat's."""
        rows, slots = np.asarray(rows, np.int64), np.asarray(slots, np.int64)
        length = len(slots)
        if len(rows) != source.batch_size:
            raise ValueError(f"{len(rows)} rows given for the {source.batch_size} rows of the source session")
        if length > source.cache_len or (length and (slots.min() < 0 or slots.max() >= self.cache_len)):
            raise ValueError(f"{length} slots do not fit the source's {source.cache_len} or this session's "
                             f"{self.cache_len} slots")
        row_index = Tensor(rows.astype(np.int32))
        for src, dst in zip(tuple(source.decoder.k_cache) + tuple(source.decoder.v_cache),
                            tuple(self.decoder.k_cache) + tuple(self.decoder.v_cache)):
            block = np.zeros((len(rows),) + tuple(dst.shape[1:]), np.float32)
            block[:, :, slots] = src.asnumpy().astype(np.float32)[:, :, :length]
            ops.scatter_update(dst, row_index, Tensor(block).astype(dst.dtype))
        self.slot_mask[rows] = 0
        self.slot_mask[rows[:, None], slots[None, :]] = source.slot_mask[:, :length]

    def compact_rows(self, rows) -> int:
        """Pack each of `rows`' slots (in their order) to the front of its cache row and move the write slot
        back to just after the longest of them; returns the new write slot. Rows that finished leave holes
        behind the write slot; this lets it move back. Attention does not depend on where a row's slots
        lie, only their order is kept (for the order of its sums). Rows not given must hold nothing."""
        rows = np.asarray(rows, np.int64)
        order = [self.row_slots(r) for r in rows]
        index = Tensor(rows.astype(np.int32))
        for cache in tuple(self.decoder.k_cache) + tuple(self.decoder.v_cache):
            arr = cache.astype(ms.float32).asnumpy()
            block = np.zeros((len(rows),) + arr.shape[1:], np.float32)
            for i, r in enumerate(rows):
                block[i, :, :len(order[i])] = arr[r][:, order[i]]
            ops.scatter_update(cache, index, Tensor(block).astype(cache.dtype))
        for i, r in enumerate(rows):
            self.slot_mask[r] = 0
            self.slot_mask[r, :len(order[i])] = 1
        self.next_slot = max((len(o) for o in order), default=0)
        return self.next_slot

    @staticmethod
    @contextlib.contextmanager
    def after_vision_calls(callback: Callable[[str], None]) -> Iterator[None]:
        """Run `callback(kind)` after each call of the vision encoder that this thread makes inside the block
        (`kind`: "vit" for a ViT layer on a micro-batch of crops, "projector" for a projector chunk); the
        encoder is reached through upstream's signatures (`chat` -> `encode_img` -> `img2emb`), hence a
        per-thread hook rather than an argument."""
        with between_vision_calls(callback):
            yield
