"""Prompt template and text/image interleaving against upstream's `interleav_wrap_chat` / `build_inputs`
(tests/fixtures/inputs/prompt.json): upstream ran with an embedder whose rows are the token id and images
encoded as constant rows of -(1000 * length + hd_num); the same stand-ins are used here."""
import json
import os

import numpy as np
import pytest

from mindxcomposer import InternLM2Tokenizer
from mindxcomposer.errors import ImageCountMismatchError
from mindxcomposer.prompt import META_INSTRUCTION, build_inputs, interleave, interleave_chat

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "inputs")

with open(os.path.join(FIXTURES, "prompt.json")) as f:
    GOLDEN = json.load(f)
WIDTH = GOLDEN["embed_width"]


@pytest.fixture(scope="module")
def tok():
    return InternLM2Tokenizer.from_pretrained()


def embed_tokens(ids):
    assert ids.dtype == np.int64 and ids.ndim == 2 and ids.shape[0] == 1
    return np.repeat(ids[..., None].astype(np.float32), WIDTH, axis=-1)


def encode_image(length, hd_num):
    return np.full((1, length, WIDTH), -(1000.0 * length + hd_num), dtype=np.float32)


def test_meta_instruction_is_upstreams():
    assert META_INSTRUCTION == GOLDEN["meta_instruction"]


@pytest.mark.parametrize("case", GOLDEN["interleave"], ids=[c["name"] for c in GOLDEN["interleave"]])
def test_interleave_matches_upstream(tok, case):
    kwargs = {k: case[k] for k in ("max_length", "hd_num") if k in case}
    embeds, im_mask, temp_len = interleave_chat(
        case["query"], case["images"], tok, embed_tokens, encode_image, history=case.get("history", ()),
        meta_instruction=META_INSTRUCTION if case.get("use_meta") else "", **kwargs)
    assert embeds.dtype == np.float32 and embeds.shape == (1, len(case["values"]), WIDTH)
    assert (embeds == embeds[..., :1]).all()
    assert embeds[0, :, 0].tolist() == case["values"]
    assert im_mask.dtype == bool and im_mask[0].astype(int).tolist() == case["im_mask"]
    assert temp_len == case["temp_len"]


def test_golden_exercises_truncation_and_hd_rules():
    cases = {c["name"]: c for c in GOLDEN["interleave"]}
    assert cases["truncate_mid_image"]["temp_len"] > len(cases["truncate_mid_image"]["values"])
    assert cases["truncate_mid_text"]["temp_len"] > len(cases["truncate_mid_text"]["values"])
    assert -(1000 * 20 + 6) in cases["two_images"]["values"]  # several images: hd_num 6
    assert -(1000 * 50 + 24) in cases["one_image_no_marker"]["values"]


@pytest.mark.parametrize("case", GOLDEN["build_inputs"])
def test_build_inputs_matches_upstream(tok, case):
    out = build_inputs(tok, case["query"], case["history"], META_INSTRUCTION if case["use_meta"] else "")
    assert out["input_ids"].dtype == np.int64
    assert out["input_ids"][0].tolist() == case["input_ids"]
    assert out["input_ids"][0, :2].tolist() == [tok.bos_token_id] * 2  # upstream's double <s>


@pytest.mark.parametrize("prompt,images", [
    ("two markers <ImageHere> <ImageHere>", [5]),
    ("one marker <ImageHere>", [5, 6]),
    ("no marker", [5, 6]),
    ("a marker but no image <ImageHere>", []),
])
def test_image_count_mismatch_is_an_error(tok, prompt, images):
    with pytest.raises(ImageCountMismatchError, match="marker"):
        interleave(prompt, images, tok, embed_tokens, encode_image)


def test_no_image_is_encoded_after_max_length(tok):
    calls = []

    def counting(length, hd_num):
        calls.append(length)
        return encode_image(length, hd_num)

    interleave("<ImageHere> x <ImageHere> y <ImageHere>", [10, 11, 12], tok, embed_tokens, counting, max_length=5)
    assert calls == [10]
