"""Pillow images as the image and video pipelines need them: any mode as 8-bit RGB, padded to whole tiles."""
import numpy as np
from PIL import Image

from .constants import TILE

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def _gray_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """8-bit grey levels of a 16-bit, 32-bit integer ("I") or float ("F") single-channel image.

    Pillow's own conversion clips these at 255 (a full-range 16-bit image turns almost white). Here 16-bit
    values are scaled, v * 255 / 65535 rounded (so 257 * g maps back to g exactly); "I" images are taken as
    8-bit when no value exceeds 255 and as 16-bit otherwise (values clipped to [0, 65535]); "F" images as
    [0, 1] when no value exceeds 1 and as [0, 255] otherwise (NaN is 0, values clipped).
    """
    if mode == "F":
        x = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if x.size and x.max() <= 1.0:
            x = x * 255.0
        return np.rint(np.clip(x, 0, 255)).astype(np.uint8)
    x = np.clip(arr.astype(np.int64), 0, 65535)
    if mode == "I" and (x.size == 0 or x.max() <= 255):
        return x.astype(np.uint8)
    return ((x * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB. Alpha (RGBA, LA, PA, a palette's transparent index) is dropped, not
    composited: a transparent pixel keeps its colour. 16-bit, "I" and "F" images are scaled to 8 bits
    (`_gray_to_uint8`), LAB goes through Pillow's colour management to sRGB, every other mode through
    `Image.convert("RGB")`."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_gray_to_uint8(np.asarray(img), mode)).convert("RGB")
    if mode in ("P", "PA"):
        # via RGBA, so that a palette's transparency (index or per-entry bytes) is read and then dropped
        # like any alpha, without Pillow's warning about transparency "expressed in bytes"
        return img.convert("RGBA").convert("RGB")
    if mode == "La":  # premultiplied: Pillow converts it only to LA
        return img.convert("LA").convert("RGB")
    if mode == "LAB":  # Image.convert("RGB") would copy the L, a, b bytes into R, G, B
        from PIL import ImageCms

        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                            "LAB", "RGB")
        return ImageCms.applyTransform(img, transform)
    return img.convert("RGB")


def pad_to_tile(img: Image.Image, tile: int = TILE, centered: bool = False) -> Image.Image:
    """Upstream `padding_336`: white rows up to a multiple of `tile`, at the bottom (the inference code's
    version) or, with `centered`, split top / bottom with the odd row at the bottom (the fine-tuning
    code's version: top = int((target - height) / 2))."""
    width, height = img.size
    target = int(np.ceil(height / tile) * tile)
    if target == height:
        return img.copy()
    top = int((target - height) / 2) if centered else 0
    canvas = Image.new("RGB", (width, target), (255, 255, 255))
    canvas.paste(img, (0, top))
    return canvas
