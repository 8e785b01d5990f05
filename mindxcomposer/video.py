"""Videos to one labelled image, as upstream's `load_video` + `frame2img` + `Video_transform`.

Frames are decoded with OpenCV instead of decord. The frame selection is upstream's: every
round(fps)-th frame (about one per second, by decord's average frame rate, which OpenCV reports as
CAP_PROP_FPS for constant-rate streams), then at most 32 of those, evenly strided. The frames are
stacked into one canvas with `<IMAGE i>` labels and separator lines, scaled so that its short side is
560 and padded with white to a multiple of 560.

Label font: upstream downloads SimHei.ttf from the model hub. Here the default is Pillow's bundled
font at size 40 (no network); pass `font=` a path to SimHei.ttf to label with upstream's font.
"""
import os
from typing import List, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import EmptyVideoError, UnreadableVideoError
from .constants import TILE, VIDEO_EXTENSIONS
from .pixels import pad_to_tile, to_rgb8
from .validation import check_media_path

NUM_FRAMES = 32
FONT_SIZE = 40


def frame_indices(num_frames: int, fps: float, num_frm: int = NUM_FRAMES) -> List[int]:
    """Indices of the frames upstream's `load_video` keeps out of `num_frames` at `fps`."""
    stride = int(round(float(fps))) if np.isfinite(fps) else 0
    if stride < 1:
        raise UnreadableVideoError(f"frame rate {fps!r} gives no sampling stride (upstream needs fps >= 0.5)")
    positions = list(range(0, num_frames, stride))
    if len(positions) > num_frm:
        step = len(positions) / (num_frm + 1)
        positions = [positions[int(i * step)] for i in range(num_frm)]
    return positions


def _open(path: str):
    import cv2

    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise UnreadableVideoError(f"OpenCV cannot open video {path!r}")
    # decord ignores rotation metadata; OpenCV would apply it by default.
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)
    return cap


def read_frames(path: Union[str, os.PathLike], num_frm: int = NUM_FRAMES) -> List[np.ndarray]:
    """The RGB uint8 frames [H, W, 3] upstream's `load_video` selects.

    Two sequential passes (count, then decode the chosen frames): container frame counts and seeking are
    not exact for every codec, and keeping every sampled frame of a long video would not fit in memory.
    """
    import cv2

    path, _ = check_media_path(path, VIDEO_EXTENSIONS)
    cap = _open(path)
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
        count = 0
        while cap.grab():
            count += 1
    finally:
        cap.release()
    if count == 0:
        raise EmptyVideoError(f"video {path!r} has no decodable frames")
    wanted = frame_indices(count, fps, num_frm)

    frames = {}
    cap = _open(path)
    try:
        targets = set(wanted)
        for index in range(wanted[-1] + 1):
            if not cap.grab():
                break
            if index in targets:
                ok, bgr = cap.retrieve()
                if not ok:
                    break
                frames[index] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()
    if len(frames) != len(set(wanted)):
        raise UnreadableVideoError(f"video {path!r} ended early on the second read ({len(frames)} of "
                                   f"{len(set(wanted))} frames)")
    return [frames[i] for i in wanted]


def default_font() -> ImageFont.FreeTypeFont:
    """Pillow's bundled font at upstream's label size."""
    return ImageFont.load_default(size=FONT_SIZE)


def resolve_font(font=None):
    """None -> Pillow's bundled font; a path -> that TrueType font at size 40; a PIL font as is."""
    if font is None:
        return default_font()
    if isinstance(font, (str, os.PathLike)):
        return ImageFont.truetype(os.fspath(font), size=FONT_SIZE)
    return font


def frames_to_image(frames: Sequence[Union[np.ndarray, Image.Image]], font=None) -> Image.Image:
    """Upstream `frame2img`: frames scaled to 1120 on their long side, stacked vertically (landscape) or
    horizontally (portrait and square), each under an `<IMAGE i>` label, separated by black lines."""
    if len(frames) == 0:
        raise EmptyVideoError("no frames to compose")
    font = resolve_font(font)
    resized = []
    for frame in frames:
        img = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, dtype=np.uint8))
        img = to_rgb8(img)
        w, h = img.size
        scale = w / h
        if w > h:
            new_w, new_h = 560 * 2, int(560 * 2 / scale)
        else:
            new_w, new_h = int(560 * 2 * scale), 560 * 2
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        resized.append(img)

    # As upstream, the layout follows the last frame's original orientation.
    pad = 40
    if w > h:
        canvas_w = max(im.size[0] for im in resized)
        canvas_h = sum(im.size[1] + 10 + pad for im in resized)
        canvas = Image.new("RGB", (canvas_w, canvas_h), "white")
        draw = ImageDraw.Draw(canvas)
        top = 0
        for idx, im in enumerate(resized):
            ih = im.size[1]
            canvas.paste(im, (0, pad + top))
            draw.text((0, top), f"<IMAGE {idx}>", font=font, fill="black")
            if idx + 1 < len(resized):
                draw.line([(0, pad + top + ih + 5), (canvas_w, pad + top + ih + 5)], fill="black", width=2)
            top += ih + 10 + pad
    else:
        canvas_w = sum(im.size[0] + 10 for im in resized)
        canvas_h = max(im.size[1] for im in resized) + pad
        canvas = Image.new("RGB", (canvas_w, canvas_h), "white")
        draw = ImageDraw.Draw(canvas)
        left = 0
        for idx, im in enumerate(resized):
            iw = im.size[0]
            canvas.paste(im, (left, pad))
            draw.text((left, 0), f"<IMAGE {idx}>", font=font, fill="black")
            if idx + 1 < len(resized):
                draw.line([(left + iw + 5, 0), (left + iw + 5, canvas_h)], fill="black", width=2)
            left += iw + 10
    return canvas


def video_transform(img: Image.Image) -> Image.Image:
    """Upstream `Video_transform`: short side to 560, the long side padded with white to a multiple of 560."""
    width, height = img.size
    transposed = width < height
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = img.size
    new_h = TILE
    new_w = int(new_h * (width / height))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    img = pad_to_tile(img.transpose(Image.Transpose.TRANSPOSE))
    if not transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def load_video(path: Union[str, os.PathLike], font=None, num_frm: int = NUM_FRAMES) -> Image.Image:
    """The uint8 RGB canvas upstream's `encode_img` builds from a video file."""
    return video_transform(frames_to_image(read_frames(path, num_frm), font))
