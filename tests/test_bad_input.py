"""Bad inputs raise specific exceptions; non-RGB images are converted instead of crashing as upstream does."""
import os

import numpy as np
import pytest
from PIL import Image

from mindxcomposer import CLIPImageProcessor, IXCImageProcessor
from mindxcomposer.errors import (EmptyImageError, EmptyVideoError, ImageTooLargeError, InputError,
                                  InputFileNotFoundError, UnreadableImageError, UnreadableVideoError,
                                  UnsupportedFormatError)
from mindxcomposer.image_processing import hd_transform, load_image
from mindxcomposer.video import frame_indices, read_frames

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
COFFEE = os.path.join(ASSETS, "coffee.png")


@pytest.fixture(scope="module")
def processor():
    return IXCImageProcessor()


def test_missing_file(processor, tmp_path):
    for name in ("missing.png", "missing.mp4"):
        with pytest.raises(InputFileNotFoundError, match="no such file") as info:
            processor(str(tmp_path / name))
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(InputFileNotFoundError):
        processor(str(folder))


def test_unsupported_extension(processor, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(UnsupportedFormatError, match="'.txt'"):
        processor(str(path))
    with pytest.raises(UnsupportedFormatError, match="none"):
        load_image(str(tmp_path / "no_extension"))


def test_unreadable_and_truncated_images(processor, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png" * 20)
    with pytest.raises(UnreadableImageError, match="junk.png"):
        processor(str(junk))
    data = open(COFFEE, "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match="truncated.png"):
        processor(str(truncated))


def test_zero_sized_and_degenerate_images(processor):
    with pytest.raises(EmptyImageError, match="no pixels"):
        processor(Image.new("RGB", (0, 7)))
    with pytest.raises(EmptyImageError, match="aspect ratio"):
        hd_transform(Image.new("RGB", (2000, 1)), hd_num=1)  # 560 / 2000 rounds down to 0 rows
    with pytest.raises(ValueError, match="hd_num"):
        processor(COFFEE, hd_num=0)
    with pytest.raises(TypeError):
        processor(42)


def test_decompression_bomb_limit_is_an_error(processor, monkeypatch):
    pixels = Image.open(COFFEE).size[0] * Image.open(COFFEE).size[1]
    # Just above the limit Pillow itself only warns; far above it raises. Both are errors here.
    for limit in (pixels - 1, pixels // 4):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS|decompression|exceeds"):
            processor(COFFEE)
        with pytest.raises(ImageTooLargeError):
            processor(Image.new("RGB", (600, 400)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert processor(COFFEE).shape == (1, 3, 1120, 1120)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_non_rgb_modes_are_converted(processor, mode, tmp_path):
    base = Image.open(os.path.join(ASSETS, "chelsea.png"))
    img = base.convert(mode) if mode != "I;16" else Image.fromarray(
        (np.asarray(base.convert("L"), dtype=np.uint16) * 257))
    expected = processor(img.convert("RGB"))
    np.testing.assert_array_equal(processor(img), expected)
    if mode in ("RGBA", "LA", "L", "P", "1"):  # also through a file
        path = tmp_path / f"image_{mode}.png"
        img.save(path)
        np.testing.assert_array_equal(processor(str(path)), expected)


def test_rgba_alpha_is_dropped_not_composited(processor):
    rgb = np.asarray(Image.open(COFFEE).convert("RGB"))
    alpha = np.zeros(rgb.shape[:2] + (1,), np.uint8)  # fully transparent
    rgba = Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA")
    np.testing.assert_array_equal(processor(rgba), processor(COFFEE))


def test_clip_processor_bad_inputs():
    clip = CLIPImageProcessor()
    with pytest.raises(EmptyImageError):
        clip(Image.new("RGB", (5, 0)))
    with pytest.raises(ValueError, match="uint8"):
        clip(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="shortest_edge"):
        CLIPImageProcessor(size={"height": 5, "width": 5})
    with pytest.raises(InputFileNotFoundError):
        CLIPImageProcessor.from_pretrained("/nonexistent/dir")


def test_video_errors(processor, tmp_path):
    cv2 = pytest.importorskip("cv2")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 50)
    with pytest.raises(UnreadableVideoError, match="junk.mp4"):
        processor(str(junk))
    empty = tmp_path / "empty.avi"
    writer = cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"FFV1"), 5.0, (64, 64))
    writer.release()
    with pytest.raises(EmptyVideoError, match="no decodable frames"):
        read_frames(str(empty))
    for fps in (0.4, 0.0, float("nan")):
        with pytest.raises(UnreadableVideoError, match="frame rate"):
            frame_indices(10, fps)
    for err in (EmptyVideoError, UnreadableVideoError):
        assert issubclass(err, InputError) and issubclass(err, ValueError)
