"""A request on its way through the engine: what the model thread reads and what the HTTP side waits on."""
import threading
import time
from typing import Callable, List, Optional

import numpy as np

from ..generation import StoppingCriteria
from .errors import APIError
from .protocol import ChatRequest
from .text_stream import AnswerText


class Cancelled(Exception):
    """The client went away or the request timed out: its decoding is abandoned."""


class Job:
    def __init__(self, request: ChatRequest, pixels: List[np.ndarray], prompt_tokens: int, answer: AnswerText,
                 timeout: Optional[float] = None, notify: Callable[[], None] = lambda: None):
        self.request = request
        self.pixels = pixels
        self.prompt_tokens = prompt_tokens
        self.answer = answer
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.notify = notify  # called from the model side whenever there is news (text, end, error)
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.error: Optional[APIError] = None

    def cancel(self):
        self.cancelled.set()

    @property
    def timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def check(self):
        """Raises `Cancelled` when the job must stop now."""
        if self.cancelled.is_set():
            raise Cancelled("the client disconnected")
        if self.timed_out:
            raise Cancelled("timeout")

    def finish(self, error: Optional[APIError] = None):
        self.error = error
        self.done.set()
        self.notify()


class JobStreamer:
    """The streamer `generate` sees: feeds the job's `AnswerText` and tells the HTTP side."""

    def __init__(self, job: Job):
        self.job = job

    def put(self, value):
        self.job.answer.put(value)
        self.job.notify()

    def end(self):
        self.job.answer.end()
        self.job.notify()


class JobStops(StoppingCriteria):
    """Ends decoding at a stop string, and abandons it for a cancelled or timed-out job (`Cancelled`:
    its text is not an answer)."""

    def __init__(self, job: Job):
        self.job = job

    def __call__(self, input_ids, scores):
        self.job.check()
        return self.job.answer.stopped
