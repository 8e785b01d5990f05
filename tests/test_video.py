"""Video inputs: OpenCV decoding, upstream's frame selection, the labelled composite and Video_transform,
against upstream's golden output (decord + torchvision) on lossless test videos written here by OpenCV."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from golden_inputs import check_against_golden, load_golden
from mindxcomposer import IXCImageProcessor
from mindxcomposer.image_processing import to_pixel_values
from mindxcomposer.video import frame_indices, frames_to_image, read_frames, video_transform

cv2 = pytest.importorskip("cv2")

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "inputs")

with open(os.path.join(FIXTURES, "video.json")) as f:
    META = json.load(f)
CASES = META["cases"]


@pytest.fixture(scope="module")
def golden():
    return load_golden("video.npz")


def source_frames(case):
    stacked = np.asarray(Image.open(os.path.join(FIXTURES, case["frames_png"])).convert("RGB"))
    return stacked.reshape(case["frames"], case["height"], case["width"], 3)


def write_video(path, frames, fps, fourcc):
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), float(fps), (w, h))
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} video"
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()


@pytest.fixture(scope="module", params=CASES, ids=[c["name"] for c in CASES])
def video(request, tmp_path_factory):
    case = request.param
    frames = source_frames(case)
    path = tmp_path_factory.mktemp("video") / f"{case['name']}.avi"
    write_video(path, frames, case["fps"], case["codec"])
    return case, frames, str(path)


def test_frames_are_read_losslessly_with_upstream_selection(video):
    case, frames, path = video
    # upstream's decord saw the same frame count and rate
    assert len(frames) == case["decord_frames"]
    cap = cv2.VideoCapture(path)
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(case["decord_fps"])
    cap.release()
    got = read_frames(path)
    wanted = frame_indices(len(frames), case["decord_fps"])
    assert len(got) == len(wanted) <= 32
    for index, frame in zip(wanted, got):
        np.testing.assert_array_equal(frame, frames[index])


def test_video_matches_upstream(video, golden):
    case, _, path = video
    # Upstream ran with hd_num 24; videos ignore it, so any value must give the same result.
    canvas = IXCImageProcessor().canvas(path, hd_num=1)
    check_against_golden(golden, case, canvas, to_pixel_values(canvas))


def test_frame_indices_rules():
    assert frame_indices(45, 10.0) == [0, 10, 20, 30, 40]
    assert frame_indices(3, 30.0) == [0]
    many = frame_indices(10_000, 25.0)
    assert len(many) == 32 and many == sorted(set(many)) and many[0] == 0 and all(i % 25 == 0 for i in many)
    assert frame_indices(90, 2.5)[:2] == [0, 2]  # round(2.5) == 2, as Python rounds


def test_composite_layout_follows_frame_orientation():
    land = [np.zeros((30, 60, 3), np.uint8)] * 2
    port = [np.zeros((60, 30, 3), np.uint8)] * 2
    assert frames_to_image(land).size == (1120, 2 * (560 + 50))  # stacked vertically
    assert frames_to_image(port).size == (2 * (560 + 10), 1120 + 40)  # side by side
    for frames in (land, port):
        out = video_transform(frames_to_image(frames))
        assert min(out.size) == 560 and max(out.size) % 560 == 0
