"""Images to pixel values: the IXC2.5 high-resolution transform and a Hugging Face style CLIP processor.

Pure numpy / Pillow. `IXCImageProcessor` reproduces what upstream feeds the vision tower
(`Image_transform` + ToTensor + Normalize), `global_view` the bicubic 560x560 resize the vision tower
applies to that canvas. Resizing goes through Pillow exactly as torchvision does for PIL images, so the
uint8 canvas is identical to upstream's, not merely close.
"""
import json
import math
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .constants import IMAGE_EXTENSIONS, SINGLE_IMAGE_HD_NUM, TILE, VIDEO_EXTENSIONS
from .errors import EmptyImageError, ImageTooLargeError, InputError, InputFileNotFoundError, UnreadableImageError
from .pixels import pad_to_tile, to_rgb8
from .validation import check_int, check_media_path
from .video import load_video

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_HD_NUM = SINGLE_IMAGE_HD_NUM  # what upstream `chat` passes for one image

ImageInput = Union[str, os.PathLike, Image.Image]


def _check_pixels(img: Image.Image, what: str) -> None:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise EmptyImageError(f"{what} has no pixels (size {width}x{height})")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageTooLargeError(
            f"{what} has {width * height} pixels ({width}x{height}), more than PIL.Image.MAX_IMAGE_PIXELS = {limit}; "
            "raise that limit if the image is trusted")


def load_image(image: ImageInput) -> Image.Image:
    """Open a path or take a PIL image; return it decoded and in 8-bit RGB (`to_rgb8`).

    Upstream crashes on images that are not RGB. Images above Pillow's decompression-bomb limit are an
    error here, not Pillow's warning.
    """
    if isinstance(image, Image.Image):
        _check_pixels(image, "image")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise UnreadableImageError(f"cannot decode the given PIL image: {e}") from e
        return to_rgb8(image)
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"expected a path or a PIL.Image.Image, got {type(image).__name__}")
    path, _ = check_media_path(image, IMAGE_EXTENSIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as opened:
                _check_pixels(opened, f"image {path!r}")
                opened.load()
                rgb = to_rgb8(opened)
                return rgb.copy() if rgb is opened else rgb  # a copy outlives the closed file
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLargeError(f"image {path!r}: {e}") from e
        except (OSError, SyntaxError, ValueError) as e:  # what Pillow raises for corrupt or truncated data
            raise UnreadableImageError(f"cannot decode image {path!r}: {e}") from e


def hd_scale(width: int, height: int, hd_num: int, width_factor: float = 1.0) -> Tuple[int, int]:
    """Upstream `Image_transform`'s target (new_w, new_h) for a landscape-oriented (width >= height) image.

    The tile count across is ceil(width * width_factor / 560), bounded by `hd_num`: 1.0 at inference,
    1.5 in upstream's fine-tuning transform (`R560_HD18_Identity_transform`), which upscales more.
    """
    ratio = width / height
    limit = math.ceil(width * width_factor / TILE)
    scale = 1
    # Stopping once scale passes `limit` gives the same result (it is capped at `limit` below) and keeps
    # a huge hd_num from looping for minutes.
    while scale * math.ceil(scale / ratio) <= hd_num and scale <= limit:
        scale += 1
    scale = min(limit, scale - 1)
    new_w = int(scale * TILE)
    return new_w, int(new_w / ratio)


def hd_transform(img: Image.Image, hd_num: int = DEFAULT_HD_NUM, width_factor: float = 1.0,
                 centered: bool = False) -> Image.Image:
    """Upstream `Image_transform`: the uint8 canvas (a multiple of 560 on both sides) fed to the vision tower.

    Portrait images are transposed, scaled so that at most `hd_num` 560x560 tiles cover them, padded with
    white at the bottom and transposed back (so their padding ends up on the right). Resizing is Pillow's
    bilinear filter, which is what torchvision's `resize` runs on PIL images (antialiased; torchvision's
    `antialias` flag does not apply to PIL input).
    `width_factor=1.5, centered=True` is upstream's fine-tuning transform instead (see `hd_scale`,
    `pad_to_tile`); `mindxcomposer.finetune.images` uses it.
    """
    hd_num = check_int(hd_num, "hd_num", minimum=1)
    _check_pixels(img, "image")
    img = to_rgb8(img)
    size = img.size
    width, height = size
    transposed = width < height
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = img.size
    new_w, new_h = hd_scale(width, height, int(hd_num), width_factor)
    if new_h < 1:
        raise EmptyImageError(
            f"image of {size[0]}x{size[1]} has an aspect ratio too extreme for hd_num={hd_num}: "
            f"its short side would resize to {new_h} pixels")
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    img = pad_to_tile(img, centered=centered)
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def to_pixel_values(img: Image.Image, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                    std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
    """torchvision ToTensor + Normalize: float32 [1, 3, H, W].

    The same float32 operations ((v / 255 - mean) / std), evaluated once per grey level and channel and
    looked up, since the result depends only on the uint8 value.
    """
    arr = np.asarray(to_rgb8(img), dtype=np.uint8)
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    table = (levels[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    out = np.empty((1, 3) + arr.shape[:2], dtype=np.float32)
    for c in range(3):
        np.take(table[c], arr[..., c], out=out[0, c])
    return out


def bicubic_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Source indices [out, 4] and weights [out, 4] of torch's bicubic `interpolate` along one axis
    (align_corners=False, A=-0.75, no antialias, indices clamped at the borders).

    The source coordinate is rounded to float32 once, as torch's fused float32 computation does; the
    weights are evaluated in float64 from it.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    real = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    index = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    t = np.clip(real - index.astype(np.float32), 0, 1).astype(np.float64)
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    indices = np.clip(index[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    return indices, weights


def _resize_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    if x.shape[axis] == size:
        # The taps are then exactly (0, 1, 0, 0) (t = 0: far(1) = near(1) = far(2) = 0, near(0) = 1) and torch copies
        # the input; the four passes in float64 took ~40 ms for a 560 x 560 image.
        return x
    indices, weights = bicubic_taps(x.shape[axis], size)
    shape = [1] * x.ndim
    shape[axis] = size
    out = np.zeros(x.shape[:axis] + (size,) + x.shape[axis + 1:], dtype=np.float64)
    for k in range(4):
        out += np.take(x, indices[:, k], axis=axis) * weights[:, k].reshape(shape)
    return out


def global_view(pixel_values: np.ndarray, size: int = TILE) -> np.ndarray:
    """torch `F.interpolate(x, size=(560, 560), mode='bicubic')` of [N, C, H, W] pixel values, float32.

    Separable: each axis is a banded [out, in] matrix with four taps per row, applied tap by tap in float64
    (O(4 * H * W) work instead of the dense products' O(560 * H * W)). The longer axis goes first to
    keep the intermediate small; the two orders agree to float64 rounding.
    """
    x = np.asarray(pixel_values)
    if x.ndim != 4:
        raise ValueError(f"expected pixel values of shape [N, C, H, W], got {x.shape}")
    first, second = (2, 3) if x.shape[2] >= x.shape[3] else (3, 2)
    return _resize_axis(_resize_axis(x, first, size), second, size).astype(np.float32)


class IXCImageProcessor:
    """What upstream `encode_img` does to a path or PIL image before the vision tower.

    `processor(image, hd_num=24)` returns float32 `pixel_values` [1, 3, H, W] (H, W multiples of 560).
    A path with a video extension is read as upstream reads videos (see `mindxcomposer.video`); videos
    ignore `hd_num`, as upstream's `Video_transform` does. `font` is the label font for video frames:
    None for Pillow's bundled font at size 40, a path to a TrueType file, or a PIL font.
    """

    def __init__(self, image_mean: Sequence[float] = OPENAI_CLIP_MEAN, image_std: Sequence[float] = OPENAI_CLIP_STD,
                 font=None):
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.font = font

    def canvas(self, image: ImageInput, hd_num: int = DEFAULT_HD_NUM) -> Image.Image:
        """The uint8 RGB canvas before normalisation."""
        if isinstance(image, (str, os.PathLike)):
            ext = os.path.splitext(os.fspath(image))[1].lower()
            if ext in VIDEO_EXTENSIONS:
                return load_video(image, font=self.font)
            if ext not in IMAGE_EXTENSIONS:
                check_media_path(image, IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)
        return hd_transform(load_image(image), hd_num)

    def __call__(self, image: ImageInput, hd_num: int = DEFAULT_HD_NUM) -> np.ndarray:
        return to_pixel_values(self.canvas(image, hd_num), self.image_mean, self.image_std)


def pixel_values(image, hd_num: int = DEFAULT_HD_NUM):
    """`IXCImageProcessor()(image, hd_num)` for a path or PIL image; pixel values (numpy or MindSpore) as
    they are."""
    if isinstance(image, np.ndarray) or hasattr(image, "asnumpy"):
        return image
    return IXCImageProcessor()(image, hd_num=hd_num)


class BatchFeature(dict):
    """A dict whose keys are also attributes, like Hugging Face's BatchFeature."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _size_dict(size, default_to_square: bool, name: str) -> Dict[str, int]:
    if isinstance(size, int):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict) and (set(size) == {"shortest_edge"} or set(size) == {"height", "width"}):
        return {k: int(v) for k, v in size.items()}
    raise ValueError(f"{name} must be an int, (height, width) or a dict with 'shortest_edge' or "
                     f"'height'/'width', got {size!r}")


class CLIPImageProcessor:
    """Hugging Face's `CLIPImageProcessor` (transformers 4.33) in numpy and Pillow.

    Steps: RGB conversion, resize of the shortest edge (Pillow, bicubic by default), center crop (zero
    padding when the image is smaller), rescale by 1/255, normalisation, channels first. Defaults are
    openai/clip-vit-large-patch14's. Accepts PIL images, paths and uint8 [H, W] / [H, W, C] arrays.
    """

    CONFIG_NAME = "preprocessor_config.json"
    _KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
             "do_normalize", "image_mean", "image_std", "do_convert_rgb")

    def __init__(self, do_resize: bool = True, size=None, resample: int = Image.Resampling.BICUBIC,
                 do_center_crop: bool = True, crop_size=None, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: Optional[Sequence[float]] = None, image_std: Optional[Sequence[float]] = None,
                 do_convert_rgb: bool = True):
        self.do_resize = do_resize
        self.size = _size_dict(224 if size is None else size, False, "size")
        if "shortest_edge" not in self.size:
            raise ValueError(f"CLIPImageProcessor resizes the shortest edge: size needs 'shortest_edge', got {size!r}")
        self.resample = Image.Resampling(int(resample))
        self.do_center_crop = do_center_crop
        self.crop_size = _size_dict(224 if crop_size is None else crop_size, True, "crop_size")
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(OPENAI_CLIP_MEAN if image_mean is None else image_mean)
        self.image_std = list(OPENAI_CLIP_STD if image_std is None else image_std)
        self.do_convert_rgb = do_convert_rgb

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **overrides) -> "CLIPImageProcessor":
        """Read `preprocessor_config.json` from a directory (or that file itself); unknown keys are ignored."""
        path = os.fspath(path)
        file = os.path.join(path, cls.CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise InputFileNotFoundError(f"no {cls.CONFIG_NAME} at {path!r}")
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
        kwargs = {k: v for k, v in config.items() if k in cls._KEYS}
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return {"do_resize": self.do_resize, "size": dict(self.size), "resample": int(self.resample),
                "do_center_crop": self.do_center_crop, "crop_size": dict(self.crop_size),
                "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "do_convert_rgb": self.do_convert_rgb,
                "image_processor_type": "CLIPImageProcessor"}

    def _to_array(self, image) -> np.ndarray:
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError(f"numpy images must be uint8 [H, W] or [H, W, C], got {image.dtype} {image.shape}")
            image = Image.fromarray(image)
        elif isinstance(image, (str, os.PathLike)):
            return np.asarray(load_image(image))
        elif not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, a path or a uint8 array, got {type(image).__name__}")
        _check_pixels(image, "image")
        if self.do_convert_rgb:
            image = to_rgb8(image)
        arr = np.asarray(image)
        return arr[..., None] if arr.ndim == 2 else arr

    def _resize(self, arr: np.ndarray) -> np.ndarray:
        height, width = arr.shape[:2]
        short, long = (width, height) if width <= height else (height, width)
        new_short = self.size["shortest_edge"]
        new_long = int(new_short * long / short)
        new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
        pil = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
        out = np.asarray(pil.resize((new_w, new_h), self.resample))
        return out[..., None] if out.ndim == 2 else out

    def _center_crop(self, arr: np.ndarray) -> np.ndarray:
        height, width = arr.shape[:2]
        crop_h, crop_w = self.crop_size["height"], self.crop_size["width"]
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        if top >= 0 and left >= 0:
            return arr[top:top + crop_h, left:left + crop_w]
        new_h, new_w = max(crop_h, height), max(crop_w, width)
        padded = np.zeros((new_h, new_w) + arr.shape[2:], dtype=arr.dtype)
        top_pad, left_pad = (new_h - height) // 2, (new_w - width) // 2
        padded[top_pad:top_pad + height, left_pad:left_pad + width] = arr
        top, left = top + top_pad, left + left_pad
        return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]

    def preprocess_one(self, image) -> np.ndarray:
        """One image to float32 [C, h, w]."""
        arr = self._to_array(image)
        if self.do_resize:
            arr = self._resize(arr)
        if self.do_center_crop:
            arr = self._center_crop(arr)
        if self.do_rescale:
            arr = (arr * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(arr.dtype, np.floating):
                arr = arr.astype(np.float32)
            arr = (arr - np.asarray(self.image_mean, arr.dtype)) / np.asarray(self.image_std, arr.dtype)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def __call__(self, images, return_tensors: Optional[str] = "np") -> BatchFeature:
        if return_tensors not in ("np", None):
            raise ValueError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
        batch: List = images if isinstance(images, (list, tuple)) else [images]
        pixel_values = [self.preprocess_one(image) for image in batch]
        if return_tensors == "np":
            pixel_values = np.stack(pixel_values)
        return BatchFeature(pixel_values=pixel_values)

    preprocess = __call__
