"""The model thread: it owns the model, and every MindSpore call of the server runs on it.

`SerialEngine` takes jobs one at a time from a bounded queue and runs `model.chat` on each with the
request's own arguments (so a response is what `model.chat` returns, by construction), streaming through
the job. A full queue answers 429; a cancelled or timed-out job stops at the next decoding step.
"""
import logging
import queue
import threading
from typing import Optional

from .errors import APIError
from .jobs import Cancelled, Job, JobStops, JobStreamer

log = logging.getLogger("mindxcomposer.serve")


def run_chat(model, job: Job, **extra):
    """`model.chat` on the job's conversation, decoding arguments and pixel values."""
    req = job.request
    model.chat(model.tokenizer, req.query, image=job.pixels, history=req.history, streamer=JobStreamer(job),
               stopping_criteria=[JobStops(job)], **req.chat_kwargs(), **extra)


def finish_with(job: Job, exc: Optional[BaseException]):
    if exc is None:
        job.finish()
    elif isinstance(exc, Cancelled):
        job.finish(APIError(f"the request was abandoned: {exc}", 408, "timeout_error", None, "request_timeout"))
    elif isinstance(exc, APIError):
        job.finish(exc)
    elif isinstance(exc, ValueError):  # bad input only the model side could see
        job.finish(APIError(str(exc), 400))
    else:
        log.exception("request failed", exc_info=exc)
        job.finish(APIError(f"internal error: {type(exc).__name__}: {exc}", 500, "server_error"))


class SerialEngine:
    def __init__(self, model, max_queue: int = 16, compiled: Optional[bool] = None):
        self.model = model
        self.extra = {} if compiled is None else {"compiled": compiled}
        self.max_batch = 1
        self.max_beams = 16  # a request decodes alone here: only memory bounds its beams
        self.queue: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._loop, name="mxc-model", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.queue.put(None)
        self.thread.join(timeout=60)

    def submit(self, job: Job):
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise APIError("the server is busy: its request queue is full; retry later", 429, "rate_limit_error",
                           None, "queue_full")

    def _loop(self):
        while True:
            job = self.queue.get()
            if job is None:
                return
            try:
                job.check()
                run_chat(self.model, job, **self.extra)
                exc = None
            except BaseException as e:  # noqa: BLE001 - one request's failure must not end the loop
                exc = e
            finish_with(job, exc)

