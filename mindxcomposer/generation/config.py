"""Decoding settings, with the defaults and precedence rules of transformers 4.33 `GenerationConfig`."""
import dataclasses
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Union

import numpy as np

from ..errors import ArgumentTypeError, InvalidArgumentError
from ..validation import check_bool, check_float, check_int


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
            raise ArgumentTypeError(f"unknown generation setting(s) {unknown}; known: {sorted(known)}")
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
        # Types are checked whatever the mode (a str or float count is always a mistake); as in HF, the
        # ranges of the sampling settings only when sampling, since greedy decoding ignores them.
        check_int(self.num_beams, "num_beams", minimum=1)
        if check_int(self.num_return_sequences, "num_return_sequences") != 1:
            raise InvalidArgumentError(f"only num_return_sequences=1 is supported, got {self.num_return_sequences!r}")
        check_int(self.max_new_tokens, "max_new_tokens", minimum=1, allow_none=True)
        check_int(self.max_length, "max_length", minimum=1)
        check_int(self.min_length, "min_length", minimum=0)
        check_int(self.min_new_tokens, "min_new_tokens", minimum=0, allow_none=True)
        if self.early_stopping not in (True, False, "never"):
            raise InvalidArgumentError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        check_bool(self.do_sample, "do_sample")
        check_float(self.temperature, "temperature", allow_none=True)
        check_int(self.top_k, "top_k", allow_none=True)
        check_float(self.top_p, "top_p", allow_none=True)
        if self.do_sample:
            check_float(self.temperature, "temperature (use do_sample=False for greedy)", minimum=0.0,
                        min_exclusive=True, allow_none=True)
            check_int(self.top_k, "top_k (0 disables it)", minimum=0, allow_none=True)
            check_float(self.top_p, "top_p", minimum=0.0, maximum=1.0, allow_none=True)
        check_float(self.repetition_penalty, "repetition_penalty", minimum=0.0, min_exclusive=True, allow_none=True)
        check_float(self.length_penalty, "length_penalty")
        check_int(self.bos_token_id, "bos_token_id", minimum=0, allow_none=True)
        check_int(self.pad_token_id, "pad_token_id", minimum=0, allow_none=True)
        if self.eos_token_id is not None:
            eos = self.eos_token_id
            if isinstance(eos, (list, tuple)):
                if not eos:
                    raise InvalidArgumentError("eos_token_id must be an id or a non-empty list of ids, got []")
                for i, v in enumerate(eos):
                    check_int(v, f"eos_token_id[{i}]", minimum=0)
            else:
                check_int(eos, "eos_token_id", minimum=0)


def check_generation_settings(settings: Mapping[str, Any]) -> GenerationConfig:
    """The decoding settings of `generate` (GenerationConfig fields) as a validated `GenerationConfig`;
    numpy scalars become Python numbers."""
    clean = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in settings.items()}
    return GenerationConfig().update(**clean)
