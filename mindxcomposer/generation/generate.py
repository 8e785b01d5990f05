"""The host-side decoding loop: transformers 4.33 `generate` semantics over any `DecoderSession`.

The model side only turns inputs into float32 logits; everything else (processors, warpers, sampling,
beam bookkeeping, stopping) is numpy here, so the loop runs unchanged on any backend.

HF 4.33 facts this loop reproduces (the port is compared with upstream as run under 4.33.2):
- Generating from `inputs_embeds`, HF's running `input_ids` start as `[[bos_token_id]]`, not empty: the
  returned sequences begin with `<s>`, `max_length`/`min_length` count it, the repetition penalty
  penalises id 1 from the first step, and beam scores are normalised by (generated ids + 1). Pass
  `prompt_ids` to change what that sequence starts with (the prompt ids on the text-only path).
- Greedy and sampling: a finished row keeps receiving `pad_token_id` (default: the first eos id);
  generation stops when every row is finished or a stopping criterion fires.
- Beam search outputs end with the FIRST eos id whichever eos finished the hypothesis.
"""
from typing import Optional, Protocol, Sequence, Union

import numpy as np

from .beam_search import BeamSearchScorer
from .config import GenerationConfig
from .logits_process import (LogitsProcessor, build_logits_processor, build_logits_warper, log_softmax,
                             softmax)
from .stopping_criteria import MaxLengthCriteria, StoppingCriteria, StoppingCriteriaList


class DecoderSession(Protocol):
    """A model holding a KV cache for a batch of rows. Rows may be left-padded: `attention_mask`
    (int [rows, cached + new], 1 = real position) always covers every position cached so far plus the
    new ones, and positions count only the real ones."""

    def prefill(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, **model_inputs) -> np.ndarray:
        """Starts a new cache from `inputs_embeds` [rows, length, hidden]; returns float32 logits
        [rows, vocab] of the last position."""

    def step(self, token_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Feeds one id per row (`token_ids` int [rows]); returns float32 logits [rows, vocab]."""

    def reorder(self, row_index: np.ndarray) -> None:
        """Row i of the cache becomes the former row `row_index[i]`. Beam search first calls it with each
        prompt row repeated `num_beams` times (the cache grows from B to B * num_beams rows), then with
        same-length permutations as beams are re-ranked."""


def generate(session: DecoderSession, inputs_embeds: np.ndarray, attention_mask: Optional[np.ndarray] = None, *,
             prompt_ids: Optional[np.ndarray] = None, generation_config: Optional[GenerationConfig] = None,
             logits_processor: Sequence[LogitsProcessor] = (), stopping_criteria: Sequence[StoppingCriteria] = (),
             streamer=None, rng: Union[None, int, np.random.Generator] = None, model_inputs: Optional[dict] = None,
             **settings) -> np.ndarray:
    """Decodes from a prompt given as embeddings and returns int64 sequences [rows, length]: the prompt ids
    (see `prompt_ids`) followed by the generated ids, as HF's `generate` returns them.

    - `inputs_embeds`: float [rows, length, hidden], left-padded when rows differ in length.
    - `attention_mask`: int [rows, length]; all ones when omitted.
    - `prompt_ids`: int [rows, n], the ids HF holds as the start of the running sequence (what the
      repetition penalty and length limits see). Default `[[bos_token_id]]` per row, as HF 4.33 does for
      an embeddings prompt; for a text-only prompt pass its ids (then they are penalised too).
    - `generation_config` / `**settings`: `GenerationConfig` fields; keywords override the config.
    - `logits_processor`, `stopping_criteria`: extra ones, applied after the built-in ones.
    - `streamer`: gets `put(prompt_ids)`, then `put(ids [rows])` per step, then `end()`. With beam search
      it gets the prompt ids and then all the final generated ids at once (HF 4.33 refuses streamers there).
    - `rng`: a `numpy.random.Generator` or a seed, for sampling.
    - `model_inputs`: extra keyword arrays for `session.prefill` (e.g. an image-token mask).
    """
    config = generation_config or GenerationConfig()
    if settings:
        config = config.update(**settings)
    inputs_embeds = np.asarray(inputs_embeds)
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
        raise ValueError(f"inputs_embeds must be [rows, length, hidden] with rows, length > 0, "
                         f"got shape {inputs_embeds.shape}")
    rows, length = inputs_embeds.shape[:2]
    attention_mask = _check_mask(attention_mask, rows, length)
    prompt_ids = _check_prompt_ids(prompt_ids, rows, config)

    processors = build_logits_processor(config, prompt_ids.shape[1], list(logits_processor))
    criteria = StoppingCriteriaList([MaxLengthCriteria(config.total_max_length(prompt_ids.shape[1]))])
    for custom in stopping_criteria:
        if isinstance(custom, MaxLengthCriteria):
            raise ValueError("a custom MaxLengthCriteria was passed; set max_length / max_new_tokens instead")
        criteria.append(custom)
    if config.do_sample and not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)

    logits = session.prefill(inputs_embeds, attention_mask, **(model_inputs or {}))
    if config.num_beams == 1:
        return _decode_rows(session, logits, attention_mask, prompt_ids, config, processors, criteria,
                            streamer, rng)
    return _beam_decode(session, logits, attention_mask, prompt_ids, config, processors, criteria, streamer, rng)


def _check_mask(mask, rows, length):
    if mask is None:
        return np.ones((rows, length), dtype=np.int64)
    mask = np.asarray(mask)
    if mask.shape != (rows, length):
        raise ValueError(f"attention_mask must be [rows, length] = {(rows, length)}, got {mask.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 and 1")
    if not (mask[:, -1] == 1).all():
        raise ValueError("rows must be left-padded: the last position of every row must be real (mask 1)")
    return mask.astype(np.int64)


def _check_prompt_ids(prompt_ids, rows, config):
    if prompt_ids is None:
        if config.bos_token_id is None:
            raise ValueError("bos_token_id is needed to start the sequence of an embeddings prompt "
                             "(or pass prompt_ids)")
        return np.full((rows, 1), config.bos_token_id, dtype=np.int64)
    prompt_ids = np.asarray(prompt_ids)
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] != rows or not np.issubdtype(prompt_ids.dtype, np.integer):
        raise ValueError(f"prompt_ids must be integer [rows={rows}, n], got {prompt_ids.dtype} {prompt_ids.shape}")
    return prompt_ids.astype(np.int64)


def _check_logits(logits, rows, config):
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != rows:
        raise ValueError(f"the session must return logits [rows={rows}, vocab], got {logits.shape}")
    vocab = logits.shape[1]
    ids = (config.eos_token_ids or []) + [i for i in (config.effective_pad_token_id,) if i is not None]
    if any(i >= vocab for i in ids):
        raise ValueError(f"eos/pad ids {ids} do not fit the vocabulary of {vocab} ids")
    return logits.astype(np.float32, copy=False)


def _decode_rows(session, logits, mask, ids, config, processors, criteria, streamer, rng):
    """Greedy search and multinomial sampling (HF `greedy_search` / `sample`)."""
    rows = ids.shape[0]
    warpers = build_logits_warper(config) if config.do_sample else None
    eos = config.eos_token_ids
    pad = config.effective_pad_token_id
    unfinished = np.ones(rows, dtype=bool)
    if streamer is not None:
        streamer.put(ids.copy())
    while True:
        logits = _check_logits(logits, rows, config)
        scores = processors(ids, logits)
        if warpers is not None:
            next_ids = _sample_rows(softmax(warpers(ids, scores)).astype(np.float64), rng)
        else:
            next_ids = np.argmax(scores, axis=-1).astype(np.int64)
        if eos is not None:
            next_ids = np.where(unfinished, next_ids, pad)
        ids = np.concatenate([ids, next_ids[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((rows, 1), dtype=mask.dtype)], axis=1)
        if streamer is not None:
            streamer.put(next_ids.copy())
        done = False
        if eos is not None:
            unfinished &= ~np.isin(next_ids, eos)
            done = not unfinished.any()
        if criteria(ids, None) or done:  # HF 4.33 hands criteria no scores unless asked to keep them
            break
        logits = session.step(next_ids, mask)
    if streamer is not None:
        streamer.end()
    return ids


def _beam_decode(session, logits, mask, prompt_ids, config, processors, criteria, streamer, rng):
    """Beam search and beam sampling (HF `beam_search` / `beam_sample`)."""
    batch, nb = prompt_ids.shape[0], config.num_beams
    logits = _check_logits(logits, batch, config)
    expand = np.repeat(np.arange(batch), nb)
    session.reorder(expand)
    logits, mask, ids = logits[expand], mask[expand], prompt_ids[expand]
    eos = config.eos_token_ids
    pad = config.effective_pad_token_id
    warpers = build_logits_warper(config) if config.do_sample else None
    max_length = criteria.max_length
    scorer = BeamSearchScorer(batch, nb, config.length_penalty, config.early_stopping, max_length)
    beam_scores = np.zeros((batch, nb), dtype=np.float32)
    if warpers is None:
        # only the first beam's candidates count at the first step; HF's beam_sample starts all beams at
        # zero, so there identical beams compete from the start
        beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.reshape(-1)
    while True:
        logits = _check_logits(logits, batch * nb, config)
        vocab = logits.shape[1]
        scores = processors(ids, log_softmax(logits)) + beam_scores[:, None]
        if warpers is not None:
            scores = warpers(ids, scores)
        flat = scores.reshape(batch, nb * vocab)
        if warpers is not None:
            picks = _sample_candidates(flat, 2 * nb, rng)
        else:
            picks = _top_candidates(flat, max(2, 1 + len(eos or ())) * nb)
        next_scores = np.take_along_axis(flat, picks, axis=1)
        beam_scores, beam_tokens, beam_rows = scorer.process(
            ids, next_scores, picks % vocab, picks // vocab, pad, eos)
        ids = np.concatenate([ids[beam_rows], beam_tokens[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((batch * nb, 1), dtype=mask.dtype)], axis=1)
        if scorer.is_done or criteria(ids, None):
            break
        session.reorder(beam_rows)
        logits = session.step(beam_tokens, mask)
    sequences = scorer.finalize(ids, beam_scores, max_length, pad, eos)
    if streamer is not None:
        streamer.put(prompt_ids.copy())
        streamer.put(sequences[:, prompt_ids.shape[1]:].copy())
        streamer.end()
    return sequences


def _sample_rows(probs, rng):
    """One id per row drawn from the (unnormalised) `probs`, by inverting the cumulative distribution
    with one uniform number per row."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(len(probs))[:, None] * cdf[:, -1:]
    picked = (cdf <= u).sum(axis=1)
    # u rounding up to the total would step past the last id that has probability
    last = probs.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=1)
    return np.minimum(picked, last).astype(np.int64)


def _top_candidates(flat, k):
    """Flat indices of the k best scores per row, best first (ties: lower index first)."""
    part = np.argpartition(-flat, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(flat, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _sample_candidates(flat, k, rng):
    """k distinct flat indices per row drawn without replacement from softmax(flat), then ranked by score
    (HF: `multinomial(..., replacement=False)` then a descending sort)."""
    out = np.empty((flat.shape[0], k), dtype=np.int64)
    for r, row in enumerate(flat):
        p = softmax(row[None])[0].astype(np.float64)
        if np.count_nonzero(p) < k:
            raise ValueError(f"beam sampling needs {k} candidates with non-zero probability, "
                             f"only {np.count_nonzero(p)} are left after the warpers")
        chosen = rng.choice(p.size, size=k, replace=False, p=p / p.sum())
        vals = row[chosen]
        out[r] = chosen[np.lexsort((chosen, -vals))]
    return out
