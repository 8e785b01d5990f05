"""`make_engine`: the model thread for the server's limits, continuous batching or one request at a time."""
from typing import Optional

from .engine import SerialEngine


def make_engine(model, max_batch: int = 4, max_queue: int = 16, cache_len: Optional[int] = None,
                compiled: Optional[bool] = None):
    """The engine for these limits (not started): continuous batching, or one request at a time when
    `max_batch` is 1."""
    if max_batch == 1:
        return SerialEngine(model, max_queue=max_queue, compiled=compiled)
    from .batching import BatchEngine  # MindSpore's import, only for a batching server

    return BatchEngine(model, max_batch=max_batch, max_queue=max_queue, cache_len=cache_len, compiled=compiled)
