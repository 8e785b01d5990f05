"""Beam hypotheses and scorer: a numpy port of transformers 4.33 `BeamSearchScorer` / `BeamHypotheses`.

Lengths are those of HF's running `input_ids`, prompt ids included. From embeddings HF 4.33 starts that
sequence at `[<s>]`, so a hypothesis of n generated ids (its eos not counted) is normalised by
(n + 1) ** length_penalty, and the early-stopping bound uses the length after the candidate's id plus one.
"""
from typing import List, Optional, Tuple, Union

import numpy as np


class BeamHypotheses:
    """The n best finished hypotheses of one prompt row, kept in HF's insertion order (ties resolve
    through it in `BeamSearchScorer.finalize`)."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: Union[bool, str],
                 max_length: Optional[int]):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_length = max_length
        self.beams: List[Tuple[float, np.ndarray]] = []
        self.worst_score = 1e9

    def __len__(self):
        return len(self.beams)

    def add(self, hyp: np.ndarray, sum_logprobs: float):
        score = sum_logprobs / (hyp.shape[-1] ** self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self) > self.num_beams:
                ranked = sorted((s, idx) for idx, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping is False:
            return self.worst_score >= best_sum_logprobs / cur_len ** self.length_penalty
        # "never": the best score any open beam could still reach
        if self.length_penalty > 0.0:
            best = best_sum_logprobs / self.max_length ** self.length_penalty
        else:
            best = best_sum_logprobs / cur_len ** self.length_penalty
        return self.worst_score >= best


class BeamSearchScorer:
    def __init__(self, batch_size: int, num_beams: int, length_penalty: float,
                 early_stopping: Union[bool, str], max_length: Optional[int]):
        if num_beams < 2:
            raise ValueError(f"beam search needs num_beams >= 2, got {num_beams}")
        self.num_beams = num_beams
        self.hyps = [BeamHypotheses(num_beams, length_penalty, early_stopping, max_length)
                     for _ in range(batch_size)]
        self.done = np.zeros(batch_size, dtype=bool)

    @property
    def is_done(self) -> bool:
        return bool(self.done.all())

    def process(self, input_ids: np.ndarray, next_scores: np.ndarray, next_tokens: np.ndarray,
                next_indices: np.ndarray, pad_token_id: Optional[int], eos_token_id: Optional[List[int]]):
        """Takes the ranked candidates (`next_*`: [batch, k], best first; `next_indices` is the beam within
        the row) and returns the next beams' scores, ids and source rows, each [batch * num_beams]."""
        cur_len = input_ids.shape[-1] + 1
        batch_size = len(self.hyps)
        nb = self.num_beams
        beam_scores = np.zeros((batch_size, nb), dtype=next_scores.dtype)
        beam_tokens = np.zeros((batch_size, nb), dtype=np.int64)
        beam_rows = np.zeros((batch_size, nb), dtype=np.int64)
        eos = set(eos_token_id) if eos_token_id is not None else set()
        for b in range(batch_size):
            if self.done[b]:
                if eos_token_id is None or pad_token_id is None:
                    raise ValueError("a finished row needs eos_token_id and pad_token_id to be padded")
                beam_tokens[b] = pad_token_id
                continue
            filled = 0
            for rank in range(next_tokens.shape[1]):
                token, score = int(next_tokens[b, rank]), next_scores[b, rank]
                row = b * nb + int(next_indices[b, rank])
                if token in eos:
                    if rank >= nb:  # an eos below the top num_beams candidates is not a hypothesis
                        continue
                    self.hyps[b].add(input_ids[row].copy(), float(score))
                else:
                    beam_scores[b, filled], beam_tokens[b, filled], beam_rows[b, filled] = score, token, row
                    filled += 1
                if filled == nb:
                    break
            if filled < nb:
                raise ValueError(f"at most {nb} of the candidates {next_tokens[b].tolist()} can be eos "
                                 f"{eos_token_id}; the candidates did not fill the beams")
            self.done[b] = self.done[b] or self.hyps[b].is_done(float(next_scores[b].max()), cur_len)
        return beam_scores.reshape(-1), beam_tokens.reshape(-1), beam_rows.reshape(-1)

    def finalize(self, input_ids: np.ndarray, beam_scores: np.ndarray, max_length: Optional[int],
                 pad_token_id: Optional[int], eos_token_id: Optional[List[int]]) -> np.ndarray:
        """The best hypothesis of each row, [batch, length]. As in HF, a hypothesis shorter than the
        output gets the FIRST eos id appended (whichever eos ended it) and then pad ids."""
        nb = self.num_beams
        for b, hyps in enumerate(self.hyps):
            if self.done[b]:
                continue
            for j in range(nb):
                hyps.add(input_ids[b * nb + j], float(beam_scores[b * nb + j]))
        best = [sorted(hyps.beams, key=lambda x: x[0])[-1][1] for hyps in self.hyps]
        lengths = [len(h) for h in best]
        out_len = max(lengths) + 1
        if max_length is not None:
            out_len = min(out_len, max_length)
        if min(lengths) != max(lengths) and pad_token_id is None:
            raise ValueError("hypotheses of different lengths need a pad_token_id")
        out = np.full((len(best), out_len), pad_token_id if pad_token_id is not None else 0, dtype=np.int64)
        for i, hyp in enumerate(best):
            out[i, :len(hyp)] = hyp
            if len(hyp) < out_len and eos_token_id is not None:
                out[i, len(hyp)] = eos_token_id[0]
        return out
