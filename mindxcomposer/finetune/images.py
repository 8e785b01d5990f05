"""Upstream's fine-tuning image transform (`finetune/ixc_utils.py` `R560_HD18_Identity_transform`, then
ToTensor + Normalize in `data_mix.ImageProcessorHD`).

It differs from the inference transform (`mindxcomposer.image_processing.hd_transform`) in two places:
the tile count across is ceil(1.5 * width / 560) instead of ceil(width / 560), bounded by `hd_num` as
before, and the white padding is split above and below the image (left and right for portrait images)
instead of going to the bottom. The global 560x560 view is not part of it: the vision tower makes it
from this canvas. Resizing, padding and normalisation are the package's own helpers, so the canvas is
Pillow's bilinear resize exactly as torchvision runs it on PIL images.

Upstream draws `random.randrange(scale_low, scale_up + 1)` with scale_low == scale_up, a draw that does
not change the result but advances Python's random stream; `mindxcomposer.finetune.sampling` replays it.
"""
import math
import os
import warnings
from typing import Tuple

import numpy as np
from PIL import Image

from ..errors import EmptyImageError, ImageTooLargeError, InputError, InputFileNotFoundError, UnreadableImageError
from ..image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TILE, hd_scale, hd_transform, load_image, \
    to_pixel_values
from ..vision import merged_token_count

WIDTH_FACTOR = 1.5  # upstream's `np.ceil(width * 1.5 / resolution)`
DEFAULT_HD_NUM = 18  # upstream's DataArguments.hd_num


def open_training_image(path: str) -> Image.Image:
    """Decoded RGB image, as upstream's `Image.open(path).convert('RGB')`. Any format Pillow reads is
    accepted (upstream does not look at the extension); errors name the file."""
    if not os.path.isfile(path):
        raise InputFileNotFoundError(f"no such image file: {path!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as opened:
                return load_image(opened)
        except InputError as e:
            raise type(e)(f"image {path!r}: {e}") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLargeError(f"image {path!r}: {e}") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise UnreadableImageError(f"cannot decode image {path!r}: {e}") from e


def image_size(path: str) -> Tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    if not os.path.isfile(path):
        raise InputFileNotFoundError(f"no such image file: {path!r}")
    try:
        with Image.open(path) as opened:
            return opened.size
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableImageError(f"cannot read image {path!r}: {e}") from e


def check_hd_num(hd_num) -> int:
    if not isinstance(hd_num, (int, np.integer)) or isinstance(hd_num, bool) or hd_num < 1:
        raise ValueError(f"hd_num must be a positive integer, got {hd_num!r}")
    return int(hd_num)


def training_canvas_size(width: int, height: int, hd_num: int = DEFAULT_HD_NUM) -> Tuple[int, int]:
    """(width, height) of the canvas `training_canvas` makes from a width x height image: both multiples
    of 560. The same arithmetic as the transform itself (`hd_scale`), without touching pixels."""
    hd_num = check_hd_num(hd_num)
    if width <= 0 or height <= 0:
        raise EmptyImageError(f"image has no pixels (size {width}x{height})")
    transposed = width < height
    w, h = (height, width) if transposed else (width, height)
    new_w, new_h = hd_scale(w, h, hd_num, WIDTH_FACTOR)
    if new_h < 1:
        raise EmptyImageError(
            f"image of {width}x{height} has an aspect ratio too extreme for hd_num={hd_num}: "
            f"its short side would resize to {new_h} pixels")
    padded = int(math.ceil(new_h / TILE) * TILE)
    return (padded, new_w) if transposed else (new_w, padded)


def image_token_count(width: int, height: int, hd_num: int = DEFAULT_HD_NUM) -> int:
    """How many embedding positions the vision tower gives a width x height image in training."""
    cw, ch = training_canvas_size(width, height, hd_num)
    return merged_token_count(ch // TILE, cw // TILE)


def training_canvas(image: Image.Image, hd_num: int = DEFAULT_HD_NUM) -> Image.Image:
    """`R560_HD18_Identity_transform(image, 560, hd_num)`: the uint8 RGB canvas."""
    return hd_transform(image, check_hd_num(hd_num), width_factor=WIDTH_FACTOR, centered=True)


def training_pixel_values(path: str, hd_num: int = DEFAULT_HD_NUM) -> np.ndarray:
    """`ImageProcessorHD(hd_num=hd_num)(path)`: float32 [1, 3, H, W], normalised with CLIP's mean / std."""
    return to_pixel_values(training_canvas(open_training_image(path), hd_num), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
