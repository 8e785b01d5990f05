"""Pause points of the vision encoder: a thread can have a callback run after each compiled call of its
image encoding (each ViT layer call on a micro-batch of crops, each projector chunk).

The server uses it, through `ModelSession.after_vision_calls`, to step running decodes while a
newcomer's images are encoded (`serve/batching.py`). The callback is per thread, so other threads' encodings (and the default path,
where no callback is set) are unchanged; it runs between compiled calls, never inside one, so no graph
changes either. It lives here rather than as an argument because the encoder is reached through
`chat` -> prompt assembly -> `encode_img` -> `img2emb`, whose signatures are upstream's.
"""
import contextlib
import threading
from typing import Callable, Iterator

VIT, PROJECTOR = "vit", "projector"  # the kinds of call: a ViT layer on a micro-batch of crops, a projector chunk

_local = threading.local()


@contextlib.contextmanager
def between_vision_calls(callback: Callable[[str], None]) -> Iterator[None]:
    """Runs `callback(kind)` after each vision call this thread makes inside the `with` block."""
    before = getattr(_local, "callback", None)
    _local.callback = callback
    try:
        yield
    finally:
        _local.callback = before


def vision_call_done(kind: str) -> None:
    """Called by the vision encoder after each compiled call (`VIT` or `PROJECTOR`)."""
    callback = getattr(_local, "callback", None)
    if callback is not None:
        callback(kind)
