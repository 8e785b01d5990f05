"""Decoding settings, with the defaults and precedence rules of transformers 4.33 `GenerationConfig`."""
import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Union


@dataclass(frozen=True)
class GenerationConfig:
    """The subset of Hugging Face generation settings that upstream's `chat` / `write_*` methods use.

    Defaults are transformers 4.33's, which upstream inherits for everything it does not pass: sampling
    keeps `top_k=50` unless told otherwise, and `pad_token_id=None` becomes the first eos id.
    `max_new_tokens`, when set, overrides `max_length` (which counts the prompt ids, see `generate`).
    """
    max_length: int = 20
    max_new_tokens: Optional[int] = None
    min_length: int = 0
    min_new_tokens: Optional[int] = None
    do_sample: bool = False
    num_beams: int = 1
    temperature: Optional[float] = 1.0
    top_k: Optional[int] = 50
    top_p: Optional[float] = 1.0
    repetition_penalty: Optional[float] = 1.0
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    num_return_sequences: int = 1
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, List[int]]] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_model_config(cls, model_config, **overrides) -> "GenerationConfig":
        """Takes every generation field the model config defines (bos/eos/pad ids, max_length, ...), as
        HF's `GenerationConfig.from_model_config` does, then `overrides`."""
        names = [f.name for f in dataclasses.fields(cls)]
        found = {n: getattr(model_config, n) for n in names if hasattr(model_config, n)}
        return cls(**{**found, **overrides})

    def update(self, **changes) -> "GenerationConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown generation setting(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    @property
    def eos_token_ids(self) -> Optional[List[int]]:
        if self.eos_token_id is None:
            return None
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @property
    def effective_pad_token_id(self) -> Optional[int]:
        """HF fills finished rows with `pad_token_id`, or with the first eos id when it is unset."""
        if self.pad_token_id is None and self.eos_token_id is not None:
            return self.eos_token_ids[0]
        return self.pad_token_id

    def total_max_length(self, prompt_length: int) -> int:
        """The length (prompt ids included) at which generation stops."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens + prompt_length
        return self.max_length

    def validate(self):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.num_beams) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if self.num_return_sequences != 1:
            raise ValueError(f"only num_return_sequences=1 is supported, got {self.num_return_sequences!r}")
        if self.max_new_tokens is not None and (not is_int(self.max_new_tokens) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not is_int(self.max_length) or self.max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {self.max_length!r}")
        for name in ("min_length", "min_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.do_sample:  # as in HF, the sampling settings are ignored (not checked) when greedy
            if self.temperature is not None and not self.temperature > 0:
                raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature!r}")
            if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 0):
                raise ValueError(f"top_k must be a non-negative integer (0 disables it), got {self.top_k!r}")
            if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
                raise ValueError(f"top_p must be in [0, 1], got {self.top_p!r}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        ids = dict(bos_token_id=self.bos_token_id, pad_token_id=self.pad_token_id)
        for name, value in ids.items():
            if value is not None and (not is_int(value) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
        if self.eos_token_id is not None:
            eos = self.eos_token_ids
            if not eos or not all(is_int(i) and i >= 0 for i in eos):
                raise ValueError(f"eos_token_id must be a non-negative integer or a non-empty list of them, "
                                 f"got {self.eos_token_id!r}")
