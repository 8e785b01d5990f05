"""Upstream's chat prompt and the interleaving of text and image embeddings, independent of the model.

`interleave_chat` is upstream's `interleav_wrap_chat`: template, split at `<ImageHere>`, one image without
a marker goes first, several images use hd_num 6, `<s>` only before the first part, truncation at
max_length. `build_inputs` is upstream's text-only path, which tokenizes `'<s>' + prompt` and so starts
with two `<s>`.

Deliberate deviation: a number of images that differs from the number of `<ImageHere>` markers (other
than one image and no marker) raises `ImageCountMismatchError`; upstream prints a warning and silently
drops or misplaces images.
"""
import logging
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .constants import BEGIN_TURN, END_TURN, IMAGE_MARKER, MULTI_IMAGE_HD_NUM, SINGLE_IMAGE_HD_NUM
from .errors import ImageCountMismatchError

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 16384

META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
    "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the user "
    "such as English and 中文.\n"
    "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based on "
    "the provided image.")

History = Sequence[Tuple[str, str]]


def chat_prompt(query: str, history: History = (), meta_instruction: str = "") -> str:
    """The chat template of upstream `interleav_wrap_chat` (no `<s>`: the tokenizer adds it)."""
    prompt = ""
    if meta_instruction:
        prompt += f"{BEGIN_TURN}system\n{meta_instruction}{END_TURN}\n"
    for user, assistant in history:
        prompt += f"{BEGIN_TURN}user\n{user}{END_TURN}\n{BEGIN_TURN}assistant\n{assistant}{END_TURN}\n"
    prompt += f"{BEGIN_TURN}user\n{query}{END_TURN}\n{BEGIN_TURN}assistant\n"
    return prompt


def text_prompt(query: str, history: History = (), meta_instruction: str = "") -> str:
    """Upstream `build_inputs`' prompt: the chat template behind a literal `<s>`."""
    return "<s>" + chat_prompt(query, history, meta_instruction)


def build_inputs(tokenizer, query: str, history: History = (), meta_instruction: str = "") -> dict:
    """Upstream `build_inputs`: `input_ids` / `attention_mask` int64 [1, n] of the text-only prompt."""
    return tokenizer([text_prompt(query, history, meta_instruction)], return_tensors="np")


def image_hd_num(num_images: int, hd_num: int = SINGLE_IMAGE_HD_NUM) -> int:
    """Upstream forces hd_num 6 as soon as there is more than one image."""
    return MULTI_IMAGE_HD_NUM if num_images > 1 else hd_num


def split_prompt(prompt: str, num_images: int) -> List[str]:
    """The text parts around the images; checks that markers and images agree."""
    if num_images == 1 and IMAGE_MARKER not in prompt:
        prompt = IMAGE_MARKER + prompt
    parts = prompt.split(IMAGE_MARKER)
    if len(parts) != num_images + 1:
        raise ImageCountMismatchError(
            f"the prompt has {len(parts) - 1} {IMAGE_MARKER} marker(s) but {num_images} image(s) were given; "
            f"put one {IMAGE_MARKER} where each image goes (a single image without a marker goes first)")
    return parts


def interleave(prompt: str, images: Sequence, tokenizer,
               embed_tokens: Callable[[np.ndarray], np.ndarray],
               encode_image: Callable[[object, int], np.ndarray],
               hd_num: int = SINGLE_IMAGE_HD_NUM,
               max_length: int = DEFAULT_MAX_LENGTH,
               prepare_image: Optional[Callable[[object, int], object]] = None) -> Tuple[np.ndarray, np.ndarray, int]:
    """Text and image embeddings in prompt order.

    embed_tokens(ids int64 [1, n]) -> float32 [1, n, H]; encode_image(image, hd_num) -> float32 [1, m, H].
    `prepare_image(image, hd_num)`, if given, runs on every image before the first is encoded (decoding,
    so that a broken image is reported before the vision tower has run); encode_image gets its result.
    Returns (inputs_embeds [1, L, H], im_mask bool [1, L], temp_len) with L = min(temp_len, max_length);
    as upstream, temp_len counts every part up to the one that crossed max_length, and no later part is
    encoded.
    """
    parts = split_prompt(prompt, len(images))
    hd_num = image_hd_num(len(images), hd_num)
    if prepare_image is not None:
        images = [prepare_image(image, hd_num) for image in images]
    embeds: List[np.ndarray] = []
    masks: List[np.ndarray] = []
    temp_len = 0
    need_bos = True
    for idx, part in enumerate(parts):
        if need_bos or part:
            ids = tokenizer(part, add_special_tokens=need_bos, return_tensors="np")["input_ids"]
            need_bos = False
            part_embeds = np.asarray(embed_tokens(ids), dtype=np.float32)
            embeds.append(part_embeds)
            masks.append(np.zeros(part_embeds.shape[:2], dtype=bool))
            temp_len += part_embeds.shape[1]
        if idx < len(images):
            img_embeds = np.asarray(encode_image(images[idx], hd_num), dtype=np.float32)
            embeds.append(img_embeds)
            masks.append(np.ones(img_embeds.shape[:2], dtype=bool))
            temp_len += img_embeds.shape[1]
        if temp_len > max_length:
            break
    if temp_len > max_length:
        # As upstream, the prompt is cut (even inside an image or before the assistant header), which
        # changes the answer: say so, once per call.
        logger.warning("the prompt is longer than max_length: %d tokens (counted up to the part that crossed the "
                       "limit) cut to max_length=%d; the end of the prompt, including the assistant header, is lost",
                       temp_len, max_length)
    inputs_embeds = np.concatenate(embeds, axis=1)[:, :max_length]
    im_mask = np.concatenate(masks, axis=1)[:, :max_length]
    return inputs_embeds, im_mask, temp_len


def interleave_chat(query: str, images: Sequence, tokenizer, embed_tokens, encode_image,
                    history: History = (), meta_instruction: str = "",
                    max_length: int = DEFAULT_MAX_LENGTH,
                    hd_num: int = SINGLE_IMAGE_HD_NUM, prepare_image=None) -> Tuple[np.ndarray, np.ndarray, int]:
    """Upstream `interleav_wrap_chat(query, image, history, meta_instruction, max_length, hd_num)`."""
    return interleave(chat_prompt(query, history, meta_instruction), images, tokenizer, embed_tokens,
                      encode_image, hd_num=hd_num, max_length=max_length, prepare_image=prepare_image)
