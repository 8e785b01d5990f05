"""Continuous batching: requests join the running batch at a step boundary and leave it when done.

One model thread (`BatchEngine._loop`) owns every MindSpore call and a shared `ModelSession` of
`max_batch` rows over a static KV cache of `cache_len` slots. Each request runs `model.chat` in its own
thread, unchanged, with a `session_factory` that hands it a `RowGroup`: a session whose `prefill`,
`step` and `reorder` are carried out by the model thread on the request's rows of the shared cache.
So the decoding loop, its processors, sampling, beams, stop rules and the decoded text are `chat`'s own.

How a row decodes exactly as it would alone:
- its prompt is prefilled in a session shaped as `chat` alone shapes it (same rows, same cache length,
  with beams each prompt row prefilled once and copied to its beams' rows), so the first logits are the
  same; the prompt's keys and values are then copied into the request's rows;
- rows share the step's write slot (`ModelSession.write_slot`), but positions, the dynamic-NTK base and
  the attention mask come from each row's own slot mask, so where a row's slots lie does not change
  the computation: a newcomer reserves the slots the batch will write during its `max_new_tokens` steps
  and puts its prompt right before them (or, early in the cache, in the first free ones);
- the model thread waits at each step boundary until every running request has handed in its ids.
"Exactly" means the same tokens, as `batch_chat` guarantees: the prefill logits are chat's bit for bit,
a step's logits differ from chat's in the last bits (about 2e-6 on the demo model) because a matrix
product over several rows accumulates in another order than over one, so only a near-tie between two
candidate tokens could decode differently. A request alone in a one-row batch decodes bit for bit.
When the batch is empty the write slot goes back to the start; when a newcomer's reserved slots do not
fit after the write slot, the running rows' slots are packed to the front of the cache
(`ModelSession.compact_rows`),
and if they still do not fit it waits for rows to finish. Only one `infer_mode` runs at a time.

Work that is not a step happens between two steps, alternating with them: one request's prompt building,
or one prefill. Neither holds running decodes up for long: the prompt is built in the request's thread,
and after each call of its vision encoder (a ViT layer on a micro-batch of crops, a projector chunk) the
batch takes a step (`_lend`, through `ModelSession.after_vision_calls`); a prefill steps the batch after each
prefill chunk (`_prefill_between_steps`, through `ModelSession.after_prefill_chunk`). Such a step waits for the running requests to hand in their ids (each is at
most one host iteration of its decoding loop away), so between two steps a running request waits for
one of those calls (or one prefill chunk) and the host work around it, not more.
"""
import collections
import logging
import threading
from typing import Callable, List, Optional

import numpy as np

from ..constants import default_context
from ..session import CACHE_BUCKET, ModelSession, round_up
from .engine import finish_with, run_chat
from .errors import APIError
from .jobs import Job

log = logging.getLogger("mindxcomposer.serve")
_POLL = 0.25  # seconds between checks for a cancelled request while it waits


class _Turn:
    """A request's permission to use the model from its own thread (to build its prompt)."""

    def __init__(self, engine: "BatchEngine", job: Job):
        self.engine = engine
        self.job = job
        self.granted = threading.Event()
        self.released = threading.Event()
        self.wants_step = False  # the request paused its vision encoding for a step of the batch (under cv)

    def release(self):
        with self.engine.cv:
            self.released.set()
            self.engine.cv.notify_all()

    def pause(self, kind: str):
        """Called in the request's thread after each call of its vision encoder (`kind`: "vit" or
        "projector"): the model thread steps the running batch meanwhile (`BatchEngine._lend`). A cancelled
        request stops encoding here."""
        self.engine.notify(kind, self.job)
        self.job.check()
        cv = self.engine.cv
        with cv:
            if self.released.is_set() or not self.engine.active:
                return
            self.wants_step = True
            cv.notify_all()
            while self.wants_step:
                cv.wait()


class RowGroup:
    """The `DecoderSession` a request's `generate` sees: `batch_size` rows of the shared batch."""

    compile_count = 0

    def __init__(self, engine: "BatchEngine", job: Job, batch_size: int, max_len: int, infer_mode: str,
                 compiled: Optional[bool]):
        self.engine = engine
        self.job = job
        self.batch_size = batch_size
        self.max_len = max_len
        self.infer_mode = infer_mode
        self.compiled = compiled
        self.rows: Optional[np.ndarray] = None  # rows of the shared cache, once prefilled
        self.pending = None  # ("prefill", args) or ("step", ids): what the model thread is to do
        self.perm: Optional[np.ndarray] = None  # reorder to apply before the next step
        self.result = None
        self.error: Optional[BaseException] = None
        self.ready = threading.Event()
        self.closed = False

    def prefill(self, inputs_embeds, im_mask, attention_mask=None, copies=1):
        """As `ModelSession.prefill`: P prompt rows, each copied to `copies` rows (P * copies = batch_size)."""
        return self.engine._ask(self, ("prefill", (inputs_embeds, im_mask, attention_mask, copies)))

    def step(self, token_ids, attention_mask=None):
        self.job.check()
        return self.engine._ask(self, ("step", np.asarray(token_ids, np.int64).reshape(self.batch_size)))

    def reorder(self, row_index):
        idx = np.asarray(row_index, np.int64)
        self.perm = idx if self.perm is None else self.perm[idx]


class BatchEngine:
    def __init__(self, model, max_batch: int = 4, max_queue: int = 16, cache_len: Optional[int] = None,
                 compiled: Optional[bool] = None, keep_sessions: int = 2):
        self.model = model
        self.max_batch = max_batch
        self.max_beams = max_batch  # a request's beams are rows of the batch
        self.max_queue = max_queue
        self.cache_len = cache_len or default_context(model.config)
        self.compiled = compiled
        self.cv = threading.Condition()
        self.turns = collections.deque()
        self.waiting: set = set()  # jobs submitted and not yet decoding
        self.prefills: List[RowGroup] = []
        self.active: List[RowGroup] = []
        self.free_rows = list(range(max_batch))
        self.stopping = False
        self.steps = 0  # batched steps run, and the rows they carried: for tests and benchmarks
        self.row_steps = 0
        self.max_rows = 0  # the most requests one step carried
        self.joins = 0  # requests that joined a batch already decoding
        self.steps_in_prefill = 0  # steps run between the chunks of a newcomer's prefill
        self.steps_in_vision = 0  # steps run between the vision calls of a newcomer's prompt building
        self.compactions = 0
        self.prefilled_rows = 0  # prompt rows the prefills ran through the layers (once per prompt, beams or not)
        self.shared: Optional[ModelSession] = None
        # observer(event, job, data), for tests and benchmarks: "logits" (job, the logits a row group
        # received), "step" after each batched step, "vit" / "projector" after each of a newcomer's vision calls
        self.observer: Optional[Callable] = None
        self._sessions: "collections.OrderedDict" = collections.OrderedDict()  # prefill sessions, LRU
        self.keep_sessions = keep_sessions
        self.thread = threading.Thread(target=self._loop, name="mxc-model", daemon=True)
        self.started = threading.Event()

    # ------------------------------------------------------------------ request side
    def start(self):
        self.thread.start()
        self.started.wait()
        return self

    def stop(self):
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        self.thread.join(timeout=60)

    def submit(self, job: Job):
        with self.cv:
            # free rows will take that many of the waiting jobs; the rest is the queue
            if len(self.waiting) - len(self.free_rows) >= self.max_queue:
                raise APIError("the server is busy: its request queue is full; retry later", 429,
                               "rate_limit_error", None, "queue_full")
            self.waiting.add(job)
        threading.Thread(target=self._run, args=(job,), name="mxc-request", daemon=True).start()

    def _run(self, job: Job):
        turn = _Turn(self, job)
        groups = []

        def factory(model, batch_size, max_len, infer_mode="base", compiled=None):
            turn.release()  # the prompt is built: the rest of this thread's model work is the model thread's
            groups.append(RowGroup(self, job, batch_size, max_len, infer_mode, self.compiled))
            return groups[-1]

        exc = None
        try:
            job.check()
            with self.cv:
                self.turns.append(turn)
                self.cv.notify_all()
            while not turn.granted.wait(_POLL):
                if job.cancelled.is_set() or job.timed_out:
                    with self.cv:
                        if turn in self.turns:
                            self.turns.remove(turn)
                            job.check()
            with ModelSession.after_vision_calls(turn.pause):
                run_chat(self.model, job, session_factory=factory)
        except BaseException as e:  # noqa: BLE001 - one request's failure must not reach the others
            exc = e
        finally:
            turn.release()
            with self.cv:
                self.waiting.discard(job)
                for g in groups:
                    self._close(g)
                self.cv.notify_all()
        finish_with(job, exc)

    def notify(self, event: str, job: Optional[Job] = None, data=None):
        if self.observer is not None:
            self.observer(event, job, data)

    def _ask(self, group: RowGroup, item):
        """Hands `item` to the model thread and waits for its result."""
        with self.cv:
            group.ready.clear()
            group.pending, group.result, group.error = item, None, None
            if item[0] == "prefill":
                self.prefills.append(group)
            self.cv.notify_all()
        while not group.ready.wait(_POLL):
            if group.job.cancelled.is_set() or group.job.timed_out:
                with self.cv:
                    if group in self.prefills:  # not started: withdraw it
                        self.prefills.remove(group)
                        group.pending = None
                        group.job.check()
        if group.error is not None:
            raise group.error
        self.notify("logits", group.job, group.result)
        return group.result

    def _close(self, group: RowGroup):
        """Frees the group's rows (called with `cv` held)."""
        group.closed = True
        if group in self.prefills:
            self.prefills.remove(group)
        if group in self.active:
            self.active.remove(group)
            self.free_rows += [int(r) for r in group.rows]
            self.free_rows.sort()

    # ------------------------------------------------------------------ model thread
    def _admissible(self) -> Optional[RowGroup]:
        s = self.shared
        for g in self.prefills:
            embeds = g.pending[1][0]
            need = self.cache_len - (0 if not self.active else s.write_slot)
            fits_mode = not self.active or g.infer_mode == s.infer_mode
            if g.batch_size <= len(self.free_rows) and fits_mode and g.max_len - embeds.shape[1] <= need:
                return g
        return None

    def _active_rows(self) -> np.ndarray:
        return np.array(sorted(int(r) for g in self.active for r in g.rows), np.int64)

    def _compaction_helps(self) -> bool:
        """Whether a waiting newcomer that only lacks room after the batch's write slot would fit once the
        running rows' slots are packed to the front of the cache."""
        if not self.active:
            return False
        s = self.shared
        packed = int(s.tokens_held(self._active_rows()).max())
        for g in self.prefills:
            reserved = g.max_len - g.pending[1][0].shape[1]
            if (g.batch_size <= len(self.free_rows) and g.infer_mode == s.infer_mode
                    and s.write_slot + reserved > self.cache_len >= packed + reserved):
                return True
        return False

    def _compact(self):
        """Packs the running rows' slots to the front of the cache, so that the write slot can move back:
        rows that finished leave holes behind it, and without this a newcomer would wait for the batch to
        drain."""
        with self.cv:
            rows = self._active_rows()
        self.shared.compact_rows(rows)
        self.compactions += 1

    def _steps_ready(self) -> bool:
        return bool(self.active) and all(g.pending is not None and g.pending[0] == "step" for g in self.active)

    def _loop(self):
        try:
            self.shared = ModelSession(self.model, self.max_batch, self.cache_len, compiled=self.compiled)
        finally:
            self.started.set()
        last_was_job = False
        while True:
            with self.cv:
                while True:
                    if self.stopping:
                        return
                    steps = self._steps_ready()
                    job = None
                    if self.turns:
                        job = ("turn", self.turns[0])
                    else:
                        group = self._admissible()
                        if group is not None:
                            job = ("prefill", group)
                        elif self._compaction_helps():
                            job = ("compact", None)
                    if steps and (last_was_job or job is None):
                        work = ("step", None)
                        break
                    if job is not None:
                        if job[0] == "turn":
                            self.turns.popleft()
                        elif job[0] == "prefill":
                            self.prefills.remove(job[1])
                        work = job
                        break
                    self.cv.wait()
            kind, what = work
            last_was_job = kind != "step"
            try:
                if kind == "turn":
                    self._lend(what)
                elif kind == "prefill":
                    self._prefill(what)
                elif kind == "compact":
                    self._compact()
                else:
                    self._step()
            except BaseException as e:  # noqa: BLE001
                log.exception("model thread: %s failed", kind)
                self._fail(what if kind == "prefill" else None, e)

    def _lend(self, turn: _Turn):
        """Lets the request build its prompt (`chat`'s own code, in its thread) until it releases the turn;
        each time its vision encoder pauses between two calls, the running batch takes a step."""
        turn.granted.set()
        while True:
            with self.cv:
                while not (turn.released.is_set() or turn.wants_step):
                    self.cv.wait()
                if not turn.wants_step:
                    return
            try:
                if self._step_when_ready():
                    self.steps_in_vision += 1
            except BaseException as e:  # noqa: BLE001 - the running requests fail, the newcomer goes on
                log.exception("model thread: a step during a vision encoding failed")
                self._fail(None, e)
            finally:
                with self.cv:
                    turn.wants_step = False
                    self.cv.notify_all()

    def _step_when_ready(self) -> bool:
        """A step of the running batch, if there is one, once all its requests have handed in their ids:
        each is at most one host iteration of its decoding loop away (a running request does nothing
        else), and not waiting would let it miss this step and wait for a whole other call."""
        with self.cv:
            while self.active and not self._steps_ready() and not self.stopping:
                self.cv.wait()
            ready = self._steps_ready()
        if ready:
            self._step()
        return ready

    def _fail(self, group, exc):
        with self.cv:
            for g in [group] if group is not None else list(self.active):
                g.error = exc
                g.pending = None
                g.ready.set()

    def _prefill(self, g: RowGroup):
        s = self.shared
        embeds, im_mask, attention_mask, copies = g.pending[1]
        k = g.batch_size  # prompt rows times copies
        am = np.ones(embeds.shape[:2], np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        with self.cv:
            if not self.active:
                s.move_write_slot(0)
                s.set_infer_mode(g.infer_mode)
            else:
                self.joins += 1
            rows = np.array(self.free_rows[:k], np.int64)
            del self.free_rows[:k]
        try:
            logits, slots = self._prefill_rows(g, rows, embeds, im_mask, am, copies)
        except BaseException:
            with self.cv:
                self.free_rows = sorted(self.free_rows + [int(r) for r in rows])
            raise
        with self.cv:
            g.rows = rows
            self.waiting.discard(g.job)
            if g.closed:  # the request ended while its prompt ran
                self.free_rows = sorted(self.free_rows + [int(r) for r in rows])
            else:
                self.active.append(g)
            g.result, g.pending = logits, None
            g.ready.set()

    def _prefill_session(self, rows: int, max_len: int, infer_mode: str) -> ModelSession:
        """A session shaped as `chat` alone shapes it (same rows, same cache length), so that the first
        logits are chat's. `prefill` starts from a cleared cache, so a session can be reused, and with it
        its compiled prefill graph (a new session compiles again, which is most of a short request's
        time to first token)."""
        key = (rows, round_up(max_len, CACHE_BUCKET), infer_mode)
        if key in self._sessions:
            self._sessions.move_to_end(key)
        else:
            self._sessions[key] = ModelSession(self.model, rows, max_len, infer_mode=infer_mode,
                                               compiled=self.compiled)
            while len(self._sessions) > self.keep_sessions:  # each holds a KV cache
                self._sessions.popitem(last=False)
        return self._sessions[key]

    def _prefill_rows(self, g, rows, embeds, im_mask, am, copies):
        """Prefills the prompt and puts it into `rows` of the shared cache; returns (logits, its slots)."""
        s = self.shared
        k, length = g.batch_size, embeds.shape[1]
        reserved = g.max_len - length  # slots the batch writes while this request decodes
        alone = self._prefill_session(k, g.max_len, g.infer_mode)
        before = alone.prefilled_rows
        logits = self._prefill_between_steps(alone, reserved, embeds, im_mask, am, copies)
        self.prefilled_rows += alone.prefilled_rows - before
        # The prompt goes right before the slots the row will write, as in chat's own cache: the same
        # layout keeps attention's sums in the same order (a request alone in a one-row batch then
        # decodes bit for bit as chat); otherwise into the first slots the batch will not write.
        if not self.active:
            s.move_write_slot(length)
        start = s.write_slot  # the batch may have stepped meanwhile
        if start >= length:
            slots = np.arange(start - length, start)
        else:
            free = np.array([i for i in range(self.cache_len) if not start <= i < start + reserved])
            slots = free[:length]
        s.copy_rows_from(alone, rows, slots)
        return logits, slots

    def _prefill_between_steps(self, alone: ModelSession, reserved: int, embeds, im_mask, am, copies):
        """`alone.prefill`, with a step of the running batch after each prefill chunk (`_step_when_ready`):
        a long prompt delays running decodes by one chunk at a time (`ModelSession.after_prefill_chunk`,
        which runs between the session's compiled calls: its logits are the same). Steps stop while the
        batch's next write slot would leave the newcomer less than `reserved` slots."""
        if not self.active:
            return alone.prefill(embeds, im_mask, am, copies=copies)

        def between_chunks():
            if self.shared.write_slot + 1 + reserved <= self.cache_len and self._step_when_ready():
                self.steps_in_prefill += 1

        alone.after_prefill_chunk = between_chunks
        try:
            return alone.prefill(embeds, im_mask, am, copies=copies)
        finally:
            alone.after_prefill_chunk = None

    def _step(self):
        s = self.shared
        ids = np.zeros(self.max_batch, np.int64)  # idle rows decode a dummy id nobody reads
        order = np.arange(self.max_batch)
        reorder = False
        with self.cv:
            groups = list(self.active)
            for g in groups:
                ids[g.rows] = g.pending[1]
                if g.perm is not None:
                    order[g.rows] = g.rows[g.perm]
                    g.perm, reorder = None, True
        if reorder:
            s.reorder(order)
        logits = s.step(ids)
        with self.cv:
            self.steps += 1
            self.row_steps += len(groups)
            self.max_rows = max(self.max_rows, len(groups))
            for g in groups:
                g.result, g.pending = logits[g.rows], None
                g.ready.set()
        self.notify("step")
