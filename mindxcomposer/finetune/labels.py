"""Upstream's `mask_human_targets`: which token positions carry a loss.

Walking the ids, every `[UNUSED_TOKEN_145]` (end of turn) toggles between a human and an assistant turn.
At the end of a human turn everything from the end of the previous answer up to five tokens past the
marker (`\\n[UNUSED_TOKEN_146]assistant\\n`) is masked; at the end of an answer the next masked span starts
one token later. The first `</s>` keeps its label and everything after it is masked; a sequence cut
before its `</s>` while a question is open loses everything after the last answer. So the loss falls on
the answers, their end-of-turn markers, the newline after the last one and `</s>`.
"""
import numpy as np

IGNORE_INDEX = -100  # labels (and image placeholders in input_ids) that carry no token


def mask_human_targets(input_ids: np.ndarray, end_turn_id: int, eos_id: int) -> np.ndarray:
    """Labels for int [batch, n] ids (image positions hold IGNORE_INDEX): a copy with the positions that
    carry no loss set to IGNORE_INDEX. Upstream hard-codes end_turn_id 92542 and eos_id 2, the ids of
    `[UNUSED_TOKEN_145]` and `</s>` in the InternLM2 tokenizer."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"expected ids of shape [batch, n], got {input_ids.shape}")
    targets = input_ids.astype(np.int64, copy=True)
    for row, ids in zip(targets, input_ids):
        end_count = 0
        last_eoa = 0
        temp_id = None
        for i, temp_id in enumerate(ids.tolist()):
            if temp_id == end_turn_id:
                if end_count % 2 == 0:
                    row[last_eoa:i + 6] = IGNORE_INDEX
                else:
                    last_eoa = i + 1
                end_count += 1
            elif temp_id == eos_id:
                row[i + 1:] = IGNORE_INDEX
                break
        if temp_id != eos_id and end_count % 2 == 0:
            row[last_eoa + 1:] = IGNORE_INDEX
    return targets
