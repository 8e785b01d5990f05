"""Image inputs: the IXC HD transform, pixel values and global view against upstream's golden output
(tests/fixtures/inputs/images.*, made by tools/reference/make_input_fixtures.py), and the CLIP processor
against Hugging Face's own."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from golden_inputs import check_against_golden, load_golden
from mindxcomposer import CLIPImageProcessor, IXCImageProcessor
from mindxcomposer.image_processing import bicubic_taps, global_view, to_pixel_values

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "assets")
FIXTURES = os.path.join(HERE, "fixtures", "inputs")
PHOTOS = sorted(f for f in os.listdir(ASSETS) if f.endswith(".png"))

with open(os.path.join(FIXTURES, "images.json")) as f:
    CASES = json.load(f)["cases"]


@pytest.fixture(scope="module")
def golden():
    return load_golden("images.npz")


def case_input(case):
    """The asset path itself, or the asset upscaled by pixel repetition as the reference script did."""
    path = os.path.join(ASSETS, case["asset"])
    if case["repeat"] == 1:
        return path
    r = case["repeat"]
    arr = np.asarray(Image.open(path).convert("RGB"))
    return Image.fromarray(np.repeat(np.repeat(arr, r, axis=0), r, axis=1))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_ixc_transform_matches_upstream(golden, case):
    processor = IXCImageProcessor()
    image = case_input(case)
    canvas = processor.canvas(image, hd_num=case["hd_num"])
    if isinstance(image, str):  # the public call on a path; the large synthetic cases skip the second pass
        pixel_values = processor(image, hd_num=case["hd_num"])
        np.testing.assert_array_equal(pixel_values, to_pixel_values(canvas))
    else:
        pixel_values = to_pixel_values(canvas)
    check_against_golden(golden, case, canvas, pixel_values)


def test_bicubic_taps_are_a_partition_of_unity():
    for n_in in (1, 2, 37, 560, 1120, 3920):
        idx, w = bicubic_taps(n_in, 560)
        assert idx.min() >= 0 and idx.max() < n_in
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)


def test_global_view_of_a_560_canvas_is_the_identity():
    # `_resize_axis` returns an axis already at the size as it is: torch's taps there are exactly (0, 1, 0, 0).
    for n in (560, 37):
        idx, w = bicubic_taps(n, n)
        np.testing.assert_array_equal(w, np.tile([0.0, 1.0, 0.0, 0.0], (n, 1)))
        np.testing.assert_array_equal(idx[:, 1], np.arange(n))
    x = np.random.default_rng(0).standard_normal((1, 3, 560, 560)).astype(np.float32)
    np.testing.assert_array_equal(global_view(x), x)


# -- CLIPImageProcessor vs transformers' ------------------------------------------------------------------
CLIP_CONFIGS = {
    "defaults": {},
    "clip_l_336": dict(size=336, crop_size=336),
    "crop_larger_than_image": dict(size={"shortest_edge": 100}, crop_size={"height": 150, "width": 120}),
    "no_crop_bilinear": dict(do_center_crop=False, resample=2, size=64),
    "uint8_out": dict(do_rescale=False, do_normalize=False, size=32, crop_size=32),
    "custom_norm": dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], size=48, crop_size=40),
}


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers


@pytest.mark.parametrize("config", list(CLIP_CONFIGS), ids=list(CLIP_CONFIGS))
def test_clip_processor_matches_transformers(hf, config):
    kwargs = CLIP_CONFIGS[config]
    ours, theirs = CLIPImageProcessor(**kwargs), hf.CLIPImageProcessor(**kwargs)
    worst = 0.0
    for name in PHOTOS:
        img = Image.open(os.path.join(ASSETS, name))
        a = ours(img, return_tensors="np")["pixel_values"]
        b = theirs(img, return_tensors="np")["pixel_values"]
        assert a.shape == b.shape and a.dtype == b.dtype
        worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()))
    assert worst <= 1e-6, f"{config}: max abs error {worst}"


def test_clip_processor_modes_batches_and_arrays(hf):
    ours, theirs = CLIPImageProcessor(), hf.CLIPImageProcessor()
    img = Image.open(os.path.join(ASSETS, "chelsea.png"))
    for mode in ("RGBA", "L", "P", "CMYK"):
        a = ours(img.convert(mode))["pixel_values"]
        b = theirs(img.convert(mode), return_tensors="np")["pixel_values"]
        assert np.abs(a - b).max() <= 1e-6, mode
    batch = [Image.open(os.path.join(ASSETS, n)) for n in ("coffee.png", "astronaut.png")]
    a = ours(batch).pixel_values
    b = theirs(batch, return_tensors="np")["pixel_values"]
    assert a.shape == (2, 3, 224, 224) and np.abs(a - b).max() <= 1e-6
    arr = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(ours(arr)["pixel_values"], ours(img)["pixel_values"])
    listed = ours(batch, return_tensors=None)["pixel_values"]
    assert isinstance(listed, list) and len(listed) == 2


def test_clip_processor_from_pretrained_reads_transformers_config(hf, tmp_path):
    hf.CLIPImageProcessor(**CLIP_CONFIGS["clip_l_336"]).save_pretrained(tmp_path)
    ours = CLIPImageProcessor.from_pretrained(tmp_path)
    theirs = hf.CLIPImageProcessor.from_pretrained(tmp_path)
    img = Image.open(os.path.join(ASSETS, "rocket_portrait.png"))
    a, b = ours(img)["pixel_values"], theirs(img, return_tensors="np")["pixel_values"]
    assert a.shape == (1, 3, 336, 336) and np.abs(a - b).max() <= 1e-6


def test_clip_processor_legacy_int_config(hf, tmp_path):
    # The form of openai/clip-vit-large-patch14-336's preprocessor_config.json.
    config = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
              "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = CLIPImageProcessor.from_pretrained(tmp_path)
    theirs = hf.CLIPImageProcessor.from_pretrained(tmp_path)
    img = Image.open(os.path.join(ASSETS, "coffee.png"))
    assert np.abs(ours(img)["pixel_values"] - theirs(img, return_tensors="np")["pixel_values"]).max() <= 1e-6
