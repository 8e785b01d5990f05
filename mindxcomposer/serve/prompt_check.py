"""Images to pixel values and the prompt's length, before the request is queued (numpy and Pillow only:
no model work, so it runs in the request's own thread).

The length is what `interleav_wrap_chat` will build, computed by `prompt.interleave` itself with
stand-ins that return empty embeddings of the right lengths: a text part's token count, an image's
`merged_token_count` of its tile grid. So the limit check and the `usage` count cannot drift from the
real prompt.
"""
from typing import List, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..image_processing import IXCImageProcessor
from ..prompt import chat_prompt, image_hd_num, interleave
from ..vision import merged_token_count
from .errors import bad_request
from .protocol import ChatRequest


def pixel_values(req: ChatRequest, media: Sequence, processor: IXCImageProcessor) -> List[np.ndarray]:
    """Each PIL image or local path -> pixel values [1, 3, H, W], with the hd_num `model.chat` uses."""
    hd = image_hd_num(len(media), req.hd_num)
    out = []
    for part, item in zip(req.images, media):
        try:
            out.append(processor(item, hd_num=hd))
        except (InputError, OSError, ValueError) as e:
            raise bad_request(f"{part.where}: {e}", param=part.where, code="invalid_image")
    return out


def prompt_length(req: ChatRequest, pixels: Sequence[np.ndarray], tokenizer, grid: int, tile: int) -> int:
    """Tokens of the prompt `model.chat` builds for this request (image tokens included); raises on a
    marker/image count mismatch."""
    def text(ids):
        return np.zeros(ids.shape + (0,), np.float32)

    def image(pv, _hd):
        return np.zeros((1, merged_token_count(pv.shape[2] // tile, pv.shape[3] // tile, grid), 0), np.float32)

    meta = req.meta_instruction if req.use_meta else ""
    try:
        _, _, n = interleave(chat_prompt(req.query, req.history, meta), list(pixels), tokenizer, text, image,
                             max_length=np.iinfo(np.int64).max)
    except InputError as e:
        raise bad_request(str(e), param="messages", code="image_marker_mismatch")
    return n


def check_length(n: int, max_new_tokens: int, max_length: int, cache_len: int) -> None:
    if n > max_length:
        raise bad_request(f"the prompt has {n} tokens (images included), more than the model's max_length "
                          f"{max_length}", param="messages", code="context_length_exceeded")
    if n + max_new_tokens > cache_len:
        raise bad_request(f"the prompt ({n} tokens) plus max_tokens ({max_new_tokens}) exceed this server's "
                          f"context of {cache_len} tokens; lower max_tokens", param="max_tokens",
                          code="context_length_exceeded")


def prepare(req: ChatRequest, media: Sequence, tokenizer, config, cache_len: int) -> Tuple[List[np.ndarray], int]:
    v = config.vision_config
    pixels = pixel_values(req, media, IXCImageProcessor())
    n = prompt_length(req, pixels, tokenizer, v.image_size // v.patch_size, v.image_size)
    check_length(n, req.max_new_tokens, config.max_length, cache_len)
    return pixels, n
