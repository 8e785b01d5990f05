"""Stopping criteria: HF 4.33 semantics, where one criterion returning True ends generation for all rows."""
from typing import Optional, Sequence, Union

import numpy as np


class StoppingCriteria:
    def __call__(self, input_ids: np.ndarray, scores: Optional[np.ndarray]) -> bool:
        """`input_ids`: int [rows, length], the running sequences after this step's ids were appended."""
        raise NotImplementedError


class MaxLengthCriteria(StoppingCriteria):
    """Stops once the running sequences (prompt ids included) reach `max_length` ids."""

    def __init__(self, max_length: int):
        self.max_length = max_length

    def __call__(self, input_ids, scores):
        return input_ids.shape[-1] >= self.max_length


class StopWordsCriteria(StoppingCriteria):
    """Stops when the FIRST row ends with one of `stop_words_ids`, like upstream's `StoppingCriteriaSub`
    (which `write_artical` uses with `[92542]`). With beam search the first row is the best running beam;
    other rows of a batch are not looked at."""

    def __init__(self, stop_words_ids: Sequence[Union[int, Sequence[int]]]):
        if len(stop_words_ids) == 0:
            raise ValueError("stop_words_ids is empty")
        self.stops = [np.atleast_1d(np.asarray(s, dtype=np.int64)) for s in stop_words_ids]
        if any(s.ndim != 1 or s.size == 0 for s in self.stops):
            raise ValueError(f"each stop word must be an id or a non-empty list of ids, got {stop_words_ids!r}")

    def __call__(self, input_ids, scores):
        first = input_ids[0]
        return any(len(first) >= len(s) and np.array_equal(first[-len(s):], s) for s in self.stops)


class StoppingCriteriaList(list):
    def __call__(self, input_ids: np.ndarray, scores: Optional[np.ndarray]) -> bool:
        return any(criteria(input_ids, scores) for criteria in self)

    @property
    def max_length(self) -> Optional[int]:
        for criteria in self:
            if isinstance(criteria, MaxLengthCriteria):
                return criteria.max_length
        return None
