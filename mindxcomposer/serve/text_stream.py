"""The answer text as decoding goes: what may be sent so far, stop strings, token counts.

`AnswerText` is a streamer (`put` / `end`, as `generate` calls it) that keeps the running ids and
recomputes the answer exactly as `model.chat` does at the end (`decode(ids, skip_special_tokens=True)`
cut at the end-of-turn token), then cut at the first stop string. It only releases text that can no
longer change: decoding more ids can drop a space before punctuation (the tokenizer's clean-up) or
complete a multi-byte character, and a stop string may be forming at the end; such a tail waits. So
the deltas always add up to the final answer, streamed or not.
"""
import threading
from typing import List, Optional, Sequence

import numpy as np

from ..constants import END_TURN


class AnswerText:
    def __init__(self, tokenizer, eos_ids: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.eos_ids = set(int(i) for i in eos_ids)
        self.stop = list(stop)
        self.ids: List[int] = []
        self.prompt_len: Optional[int] = None
        self.text = ""  # the answer so far (cut at a stop string once one appears)
        self.sent = 0  # characters already released
        self.sent_text = ""
        self.stopped = False  # a stop string was found
        self.finished = False
        self.deltas: List[str] = []  # released and not yet taken by `take()` (another thread)
        self._lock = threading.Lock()

    # -- streamer interface
    def put(self, value):
        ids = [int(i) for i in np.asarray(value).reshape(-1)]
        if self.prompt_len is None:
            self.ids, self.prompt_len = ids, len(ids)
            return
        if self.stopped:
            return
        self.ids += ids
        self._update(final=False)

    def end(self):
        self._update(final=True)
        self.finished = True

    # -- results
    @property
    def generated(self) -> List[int]:
        return self.ids[self.prompt_len or 0:]

    @property
    def completion_tokens(self) -> int:
        """Generated ids up to the first end-of-sequence id, which counts (a beam result is padded)."""
        gen = self.generated
        for k, i in enumerate(gen):
            if i in self.eos_ids:
                return k + 1
        return len(gen)

    @property
    def finish_reason(self) -> str:
        if self.stopped or any(i in self.eos_ids for i in self.generated):
            return "stop"
        return "length"

    def take(self) -> str:
        with self._lock:
            out, self.deltas = "".join(self.deltas), []
        return out

    def _update(self, final: bool):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).split(END_TURN)[0]
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped, final = text[:cut], True, True
        self.text = text
        safe = len(text) if final else self._stable_length(text)
        # what was released stays a prefix (see the module docstring); the check keeps a surprise from
        # ever sending text twice
        if safe > self.sent and text.startswith(self.sent_text):
            with self._lock:
                self.deltas.append(text[self.sent:safe])
            self.sent_text = text[:safe]
            self.sent = safe

    def _stable_length(self, text: str) -> int:
        n = len(text.rstrip())
        bad = text.find("\ufffd", self.sent)
        if bad >= 0:
            n = min(n, bad)
        for s in self.stop:  # a stop string may be completed by the next ids
            for k in range(min(len(s) - 1, n), 0, -1):
                if text[:n].endswith(s[:k]):
                    n -= k
                    break
        return max(n, self.sent)
