"""Logits processors and warpers: numpy float32 ports of transformers 4.33 `generation/logits_process.py`.

Every callable takes `input_ids` (int [rows, length], the ids HF holds as the running sequence) and
`scores` (float32 [rows, vocab]) and returns new float32 scores; the inputs are never modified.
"""
from typing import List, Optional

import numpy as np

from .config import GenerationConfig

_F32 = np.float32
NEG_INF = _F32(-np.inf)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-probabilities, computed in float64 so that they sit within an ulp of the exact value."""
    x = logits.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    lse = m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))
    return (x - lse).astype(_F32)


def softmax(scores: np.ndarray) -> np.ndarray:
    x = scores.astype(np.float64)
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return (e / np.sum(e, axis=-1, keepdims=True)).astype(_F32)


class LogitsProcessor:
    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class LogitsProcessorList(list):
    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


def _eos_list(eos_token_id) -> List[int]:
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


class MinLengthLogitsProcessor(LogitsProcessor):
    """Bans eos while the running sequence (prompt ids included) is shorter than `min_length`."""

    def __init__(self, min_length: int, eos_token_id):
        self.min_length = min_length
        self.eos_token_id = _eos_list(eos_token_id)

    def __call__(self, input_ids, scores):
        scores = scores.copy()
        if input_ids.shape[-1] < self.min_length:
            scores[:, self.eos_token_id] = NEG_INF
        return scores


class MinNewTokensLengthLogitsProcessor(LogitsProcessor):
    """Bans eos until `min_new_tokens` ids follow the first `prompt_length_to_skip` ids."""

    def __init__(self, prompt_length_to_skip: int, min_new_tokens: int, eos_token_id):
        self.prompt_length_to_skip = prompt_length_to_skip
        self.min_new_tokens = min_new_tokens
        self.eos_token_id = _eos_list(eos_token_id)

    def __call__(self, input_ids, scores):
        scores = scores.copy()
        if input_ids.shape[-1] - self.prompt_length_to_skip < self.min_new_tokens:
            scores[:, self.eos_token_id] = NEG_INF
        return scores


class RepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """CTRL penalty on every id present in `input_ids`: negative scores are multiplied by the penalty,
    positive ones divided. Ids HF holds but the model never saw (the leading `<s>` when generating from
    embeddings, left-padding ids) are penalised too."""

    def __init__(self, penalty: float):
        self.penalty = _F32(penalty)

    def __call__(self, input_ids, scores):
        scores = scores.copy()
        if input_ids.shape[-1] == 0:
            return scores
        rows = np.arange(scores.shape[0])[:, None]
        picked = scores[rows, input_ids]
        scores[rows, input_ids] = np.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores


class TemperatureLogitsWarper(LogitsProcessor):
    def __init__(self, temperature: float):
        self.temperature = _F32(temperature)

    def __call__(self, input_ids, scores):
        return scores / self.temperature


class TopKLogitsWarper(LogitsProcessor):
    """Keeps the ids scoring at least the k-th best score (ties at the k-th score are all kept)."""

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1):
        self.top_k = max(top_k, min_tokens_to_keep)

    def __call__(self, input_ids, scores):
        vocab = scores.shape[-1]
        k = min(self.top_k, vocab)
        kth = np.partition(scores, vocab - k, axis=-1)[:, vocab - k:vocab - k + 1]
        return np.where(scores < kth, NEG_INF, scores).astype(_F32)


class TopPLogitsWarper(LogitsProcessor):
    """Nucleus filtering in HF's formulation: sort ascending, drop the ids whose cumulative probability
    is <= 1 - top_p, always keep the best `min_tokens_to_keep`."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1):
        self.top_p = float(top_p)
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids, scores):
        order = np.argsort(scores, axis=-1, kind="stable")
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        # torch's CPU cumsum accumulates float32 in float64; a float32 running sum drifts by ~1e-3 over
        # a large vocabulary and would move the cut
        cumulative = np.cumsum(softmax(sorted_scores).astype(np.float64), axis=-1).astype(_F32)
        remove_sorted = cumulative <= _F32(1 - self.top_p)
        remove_sorted[:, -self.min_tokens_to_keep:] = False
        remove = np.empty_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        return np.where(remove, NEG_INF, scores).astype(_F32)


def build_logits_processor(config: GenerationConfig, prompt_length: int,
                           extra: Optional[List[LogitsProcessor]] = None) -> LogitsProcessorList:
    """The processors HF 4.33 `_get_logits_processor` builds for these settings, in its order, then
    `extra` (a custom processor of a type already built is an error, as in HF)."""
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    eos = config.eos_token_ids
    if config.min_length is not None and eos is not None and config.min_length > 0:
        processors.append(MinLengthLogitsProcessor(config.min_length, eos))
    if config.min_new_tokens is not None and eos is not None and config.min_new_tokens > 0:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, config.min_new_tokens, eos))
    for custom in extra or ():
        for built in processors:
            if type(custom) is type(built):
                raise ValueError(f"a custom {type(custom).__name__} was passed, but the generation settings "
                                 f"already create one; change the settings instead")
    processors.extend(extra or ())
    return processors


def build_logits_warper(config: GenerationConfig) -> LogitsProcessorList:
    """The sampling warpers of HF 4.33 `_get_logits_warper`: temperature, then top-k, then top-p.
    Beam sampling keeps at least two ids per row."""
    warpers = LogitsProcessorList()
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    min_tokens_to_keep = 2 if config.num_beams > 1 else 1
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(config.top_k, min_tokens_to_keep))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(config.top_p, min_tokens_to_keep))
    return warpers
