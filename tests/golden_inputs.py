"""Comparison of image and video inputs with upstream's golden canvases, pixels and global views
(tests/fixtures/inputs), shared by test_image_processing.py and test_video.py."""
import hashlib
import os

import numpy as np

from mindxcomposer.image_processing import global_view

INPUT_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "inputs")


def load_golden(name):
    with np.load(os.path.join(INPUT_FIXTURES, name)) as data:
        return {k: data[k] for k in data.files}


def digest(arr):
    arr = np.ascontiguousarray(arr)
    return hashlib.sha256(str(arr.shape).encode() + str(arr.dtype).encode() + arr.tobytes()).hexdigest()


def check_against_golden(golden, case, canvas, pixel_values):
    """Canvas exact, pixel values <= 1e-6, global view <= 1e-5."""
    name, grid = case["name"], case["grid"]
    canvas = np.asarray(canvas)
    assert list(canvas.shape) == case["canvas_shape"]
    grid_diff = np.abs(canvas[::grid, ::grid].astype(int) - golden[f"{name}/canvas_grid"]).max()
    assert grid_diff == 0, f"{name}: canvas differs from upstream by up to {grid_diff} grey levels"
    assert digest(canvas) == case["canvas_sha256"], f"{name}: canvas differs from upstream off the sampled grid"

    assert list(pixel_values.shape) == case["pixel_values_shape"] and pixel_values.dtype == np.float32
    err = np.abs(pixel_values[0][:, ::grid, ::grid] - golden[f"{name}/pixel_grid"]).max()
    assert err <= 1e-6, f"{name}: pixel values max abs error {err}"

    glb = global_view(pixel_values)
    assert glb.shape == (1, 3, 560, 560) and glb.dtype == np.float32
    ref = golden[f"{name}/global_rows"]
    err = np.abs(glb[0][:, case["global_rows"], :] - ref).max()
    assert err <= 1e-5 * max(1.0, np.abs(ref).max()), f"{name}: global view max abs error {err}"
