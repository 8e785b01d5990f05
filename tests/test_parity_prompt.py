"""`interleav_wrap_chat` / `build_inputs` against upstream's outputs on the tiny model (tests/fixtures/prompt):
the whole pipeline from image file and text to decoder inputs."""
import json
import os

import numpy as np
import pytest

from conftest import FIXTURES, HERE, assert_close
from mindxcomposer import InternLMXComposer2Config, InternLMXComposer2ForCausalLM, InternLM2Tokenizer
from mindxcomposer.demo import random_weights

PROMPT_FIXTURES = os.path.join(FIXTURES, "prompt")
with open(os.path.join(PROMPT_FIXTURES, "cases.json"), encoding="utf-8") as f:
    CASES = json.load(f)


@pytest.fixture(scope="module")
def tiny_model():
    config = InternLMXComposer2Config.from_dict(CASES["configs"]["tiny"])
    model = InternLMXComposer2ForCausalLM(config)
    model.load_state_dict(random_weights(config, 0))
    model.tokenizer = InternLM2Tokenizer.from_pretrained()
    return model


def _asset(path):
    return os.path.join(os.path.dirname(HERE), path)


@pytest.mark.parametrize("name", sorted(k for k, c in CASES["cases"].items() if c["kind"] == "interleav_wrap_chat"))
def test_interleav_wrap_chat(tiny_model, name):
    case = CASES["cases"][name]
    ref = np.load(os.path.join(PROMPT_FIXTURES, case["file"]))
    a = case["args"]
    inputs, im_mask, length = tiny_model.interleav_wrap_chat(
        a["query"], [_asset(p) for p in a["image"]], history=[tuple(h) for h in a["history"]],
        meta_instruction=a["meta_instruction"], max_length=a["max_length"], hd_num=a["hd_num"])
    assert length == int(ref["length"]) == case["length"]
    np.testing.assert_array_equal(im_mask[0], ref["im_mask"])
    assert_close(inputs["inputs_embeds"][0], ref["inputs_embeds"], what=f"prompt {name} inputs_embeds")
    text = ~ref["im_mask"]  # text rows are embedding lookups: bit-exact
    np.testing.assert_array_equal(inputs["inputs_embeds"][0][text], ref["inputs_embeds"][text])


@pytest.mark.parametrize("name", sorted(k for k, c in CASES["cases"].items() if c["kind"] == "build_inputs"))
def test_build_inputs(tiny_model, name):
    case = CASES["cases"][name]
    ref = np.load(os.path.join(PROMPT_FIXTURES, case["file"]))
    a = case["args"]
    ids = tiny_model.build_inputs(tiny_model.tokenizer, a["query"], [tuple(h) for h in a["history"]],
                                  a["meta_instruction"])["input_ids"]
    np.testing.assert_array_equal(np.asarray(ids).reshape(-1), ref["input_ids"].reshape(-1))
