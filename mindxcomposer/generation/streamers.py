"""Streamers with the interface of transformers 4.33 `generation/streamers.py`.

`generate` calls `put(prompt_ids)` once, `put(ids)` after every step and `end()` at the end. The text
streamers decode with any tokenizer offering `decode(ids, **decode_kwargs)` and release text as HF's
`TextStreamer` does: up to the last space, at once after a newline or a CJK character.
"""
import sys
from queue import Queue
from typing import Optional

import numpy as np


class BaseStreamer:
    def put(self, value):
        raise NotImplementedError

    def end(self):
        raise NotImplementedError


class TextStreamer(BaseStreamer):
    """Decodes a single row incrementally. Finalized text goes to `on_finalized_text`, which prints it
    (when `print_text`) and appends it to `text`, the text of the current stream so far."""

    def __init__(self, tokenizer, skip_prompt: bool = False, print_text: bool = True, file=None,
                 **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.print_text = print_text
        self.file = file
        self.decode_kwargs = decode_kwargs
        self.token_cache = []
        self.print_len = 0
        self.next_tokens_are_prompt = True
        self.text = ""

    def put(self, value):
        value = np.asarray(value)
        if value.ndim > 1 and value.shape[0] > 1:
            raise ValueError(f"TextStreamer only supports one row, got ids of shape {value.shape}")
        if value.ndim > 1:
            value = value[0]
        if self.next_tokens_are_prompt:
            self.text = ""
            if self.skip_prompt:
                self.next_tokens_are_prompt = False
                return
        self.next_tokens_are_prompt = False
        self.token_cache.extend(int(t) for t in np.atleast_1d(value))
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            printable = text[self.print_len:]
            self.token_cache = []
            self.print_len = 0
        elif len(text) > 0 and _is_cjk(ord(text[-1])):
            printable = text[self.print_len:]
            self.print_len += len(printable)
        else:
            # a word may still grow: hold back everything after the last space
            printable = text[self.print_len:text.rfind(" ") + 1]
            self.print_len += len(printable)
        self.on_finalized_text(printable)

    def end(self):
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            printable = text[self.print_len:]
            self.token_cache = []
            self.print_len = 0
        else:
            printable = ""
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.text += text
        if self.print_text:
            print(text, flush=True, end=None if stream_end else "", file=self.file or sys.stdout)


class TextIteratorStreamer(TextStreamer):
    """Queues finalized text for another thread: iterate over it while `generate` runs elsewhere."""

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: Optional[float] = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt=skip_prompt, print_text=False, **decode_kwargs)
        self.text_queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False):
        super().on_finalized_text(text, stream_end)
        self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self):
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration()
        return value


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)
