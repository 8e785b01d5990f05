"""The text side of upstream's training inputs: token ids, labels, image positions and padding.

Multimodal samples follow `InternLMXComposer2ForCausalLM.interleav_wrap`: a single image without an
`<ImageHere>` marker is put first; the text is split at the markers; each non-empty part is tokenized,
`<s>` only before the first non-empty part (so a leading image comes before `<s>`, unlike chat); each
image takes as many positions as the vision tower gives it; parts stop being added once the length
passes `max_length`; labels come from `mask_human_targets` on that whole sequence; the batch is cut to
min(longest, max_length) and right-padded with the pad token (attention 0, label -100, im_mask 0).

Text-only samples follow its `text2emb`: `<s>` + tokens cut at `max_length`, right-padded with the pad
token, labels from `mask_human_targets` on the padded batch.
"""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from ..prompt import END_TURN, IMAGE_MARKER
from .labels import IGNORE_INDEX, mask_human_targets


@dataclass
class EncodedSample:
    """One sample before batching. `input_ids` hold IGNORE_INDEX where an image goes; `image_spans` is
    (start, length) of each image placed, in order (images after the point where upstream stops adding
    parts are not placed)."""
    input_ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]
    im_mask: np.ndarray  # bool [n]
    image_spans: List[Tuple[int, int]]


def special_ids(tokenizer) -> Tuple[int, int, int]:
    """(end-of-turn id, eos id, pad id): 92542, 2, 2 for the InternLM2 tokenizer."""
    return tokenizer.convert_tokens_to_ids(END_TURN), tokenizer.eos_token_id, tokenizer.pad_token_id


def split_at_markers(text: str, num_images: int) -> List[str]:
    """Upstream's split; the caller has checked that the markers match the images."""
    if num_images == 1 and IMAGE_MARKER not in text:
        text = IMAGE_MARKER + text
    parts = text.split(IMAGE_MARKER)
    if len(parts) != num_images + 1:
        raise ValueError(f"{len(parts) - 1} {IMAGE_MARKER} marker(s) for {num_images} image(s)")
    return parts


def encode_multimodal(text: str, image_token_counts: Sequence[int], tokenizer, max_length: int) -> EncodedSample:
    """One sample of a multimodal micro-batch, as `interleav_wrap` builds it before padding."""
    parts = split_at_markers(text, len(image_token_counts))
    pieces, masks, spans = [], [], []
    temp_len = 0
    need_bos = True
    for idx, part in enumerate(parts):
        if len(part) > 0:
            ids = np.asarray(tokenizer.encode(part, add_special_tokens=need_bos), dtype=np.int64)
            need_bos = False
            pieces.append(ids)
            masks.append(np.zeros(len(ids), dtype=bool))
            temp_len += len(ids)
        if idx < len(image_token_counts):
            count = int(image_token_counts[idx])
            spans.append((temp_len, count))
            pieces.append(np.full(count, IGNORE_INDEX, dtype=np.int64))
            masks.append(np.ones(count, dtype=bool))
            temp_len += count
        if temp_len > max_length:
            break
    input_ids = np.concatenate(pieces)
    end_turn_id, eos_id, _ = special_ids(tokenizer)
    labels = mask_human_targets(input_ids[None], end_turn_id, eos_id)[0]
    return EncodedSample(input_ids, labels, np.concatenate(masks), spans)


def encode_text(text: str, tokenizer, max_length: int) -> np.ndarray:
    """Token ids of one text-only sample: `<s>` + tokens, cut at max_length (the tokenizer's truncation)."""
    return np.asarray(tokenizer.encode(text, add_special_tokens=True)[:max_length], dtype=np.int64)


def collate_multimodal(samples: Sequence[EncodedSample], pad_id: int, max_length: int) -> dict:
    """`interleav_wrap`'s padding: int64 input_ids / attention_mask / labels and bool im_mask [B, L] with
    L = min(longest, max_length), plus image_spans int64 [n_images, 3] of (row, start, kept length) for
    the images with at least one position left."""
    length = min(max(len(s.input_ids) for s in samples), max_length)
    batch = len(samples)
    input_ids = np.full((batch, length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((batch, length), dtype=np.int64)
    labels = np.full((batch, length), IGNORE_INDEX, dtype=np.int64)
    im_mask = np.zeros((batch, length), dtype=bool)
    spans = []
    for row, s in enumerate(samples):
        n = min(len(s.input_ids), length)
        input_ids[row, :n] = s.input_ids[:n]
        attention_mask[row, :n] = 1
        labels[row, :n] = s.labels[:n]
        im_mask[row, :n] = s.im_mask[:n]
        spans.extend((row, start, min(count, length - start)) for start, count in s.image_spans if start < length)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, im_mask=im_mask,
                image_spans=np.asarray(spans, dtype=np.int64).reshape(-1, 3))


def collate_text(token_ids: Sequence[np.ndarray], tokenizer) -> dict:
    """`text2emb`'s batch: ids right-padded with the pad token, attention mask, labels from
    `mask_human_targets` on the padded ids, im_mask all False."""
    end_turn_id, eos_id, pad_id = special_ids(tokenizer)
    length = max(len(ids) for ids in token_ids)
    input_ids = np.full((len(token_ids), length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(token_ids), length), dtype=np.int64)
    for row, ids in enumerate(token_ids):
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
    labels = mask_human_targets(input_ids, end_turn_id, eos_id)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                im_mask=np.zeros(input_ids.shape, dtype=bool), image_spans=np.zeros((0, 3), dtype=np.int64))
