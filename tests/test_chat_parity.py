"""Token parity of `chat` / `write_*` with upstream (run under transformers 4.33.2) on the tiny model:
the newly generated ids must be identical, and so must the returned text and the written page.
Golden cases: tests/fixtures/chat (image, two images, text with history, video, dynamic NTK in prefill and
across decoding, meta instruction, article and webpage writing; greedy and num_beams 3)."""
import json
import os

import pytest

from conftest import FIXTURES, HERE
from mindxcomposer import InternLMXComposer2Config, InternLMXComposer2ForCausalLM, InternLM2Tokenizer
from mindxcomposer.demo import random_weights
from mindxcomposer.session import ModelSession

CHAT_FIXTURES = os.path.join(FIXTURES, "chat")
with open(os.path.join(CHAT_FIXTURES, "cases.json"), encoding="utf-8") as f:
    GOLDEN = json.load(f)
CASES = {c["name"]: c for c in GOLDEN["cases"]}
ROOT = os.path.dirname(HERE)
# Decoded eagerly too (every case runs compiled): one of each kind of decoding.
PYNATIVE = ["image_greedy", "image_beams3", "ntk_cross_greedy", "text_history_greedy"]


@pytest.fixture(scope="module")
def model():
    config = InternLMXComposer2Config.from_dict(GOLDEN["config"])
    m = InternLMXComposer2ForCausalLM(config)
    m.load_state_dict(random_weights(config, GOLDEN["seed"]))
    m.tokenizer = InternLM2Tokenizer.from_pretrained()
    return m


class _Counting(ModelSession):
    """A `ModelSession` that records the prompt rows each `prefill` was handed (`session_factory` hook)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.prompt_rows = []

    def prefill(self, inputs_embeds, *a, **k):
        self.prompt_rows.append(len(inputs_embeds))
        return super().prefill(inputs_embeds, *a, **k)


def _assert_prefilled_once(session, prompts, num_beams):
    """Each prompt row ran through the decoder's layers once, whatever the number of beams: beam search
    copies it to its beams' cache rows instead of prefilling it once per beam."""
    assert session.prompt_rows == [prompts]
    assert session.prefilled_rows == prompts
    assert session.batch_size == prompts * num_beams


def _run(model, case, tmp_path, compiled):
    """Runs a golden case; returns (generate's outputs, their sessions, the method's result)."""
    args = dict(case["args"])
    if args.get("image"):
        args["image"] = [os.path.join(ROOT, p) for p in args["image"]]
    calls, sessions = [], []
    generate = model.generate

    def counting(*a, **k):
        sessions.append(_Counting(*a, **k))
        return sessions[-1]

    def recording(*a, **k):
        out = generate(*a, compiled=compiled, session_factory=counting, **k)
        calls.append(out)
        return out

    model.generate = recording
    try:
        method = case["method"]
        if method == "chat":
            response, history = model.chat(model.tokenizer, **args)
            result = {"response": response, "history": [list(h) for h in history]}
        else:
            if method == "resume_2_webpage":
                args["inst"] = os.path.join(ROOT, args["inst"])
            if method != "write_artical":
                args["output_dir"] = str(tmp_path)
            result = {"returned": getattr(model, method)(**args)}
    finally:
        del model.generate
    return calls, sessions, result


RUNS = [(name, True) for name in CASES] + [(name, False) for name in PYNATIVE]


@pytest.mark.parametrize("name,compiled", RUNS, ids=[f"{n}-{'graph' if c else 'pynative'}" for n, c in RUNS])
def test_generated_ids_equal_upstream(model, name, compiled, tmp_path):
    case = CASES[name]
    calls, sessions, result = _run(model, case, tmp_path, compiled)
    assert len(calls) == len(case["generate_calls"])
    for session in sessions:
        _assert_prefilled_once(session, 1, case["args"]["num_beams"])
    for ours, ref in zip(calls, case["generate_calls"]):
        new = ours[0][ref["leading_tokens"]:].tolist()
        assert new == ref["new_ids"], f"{name}: generated ids differ"
    ref = case["result"]
    if "response" in ref:
        assert result["response"] == ref["response"]
        assert result["history"] == ref["history"]
    else:
        assert result["returned"] == ref["returned"]
        if ref.get("html_file"):
            with open(tmp_path / ref["html_file"], encoding="utf-8") as f:
                assert f.read() == ref["html_content"]
    if compiled:  # every token of the call went through one compiled step graph, and one prefill graph
        kinds = [sig[0] for sig in model.last_session.signatures]
        assert kinds.count("step") == 1 and kinds.count("prefill") == 1


def test_batch_chat_rows_equal_chat_alone(model):
    """Beyond upstream: several requests decoded together, each as it decodes alone."""
    cat = os.path.join(ROOT, "tests/assets/chelsea_tiny.png")
    requests = [("Describe this image.", [cat]), ("Write one line about tea.", []), ("What is here?", [cat])]
    for num_beams in (1, 3):
        alone = [model.chat(model.tokenizer, q, image=im, do_sample=False, num_beams=num_beams,
                            max_new_tokens=8)[0] for q, im in requests]
        batched = model.batch_chat(model.tokenizer, [q for q, _ in requests], images=[im for _, im in requests],
                                   num_beams=num_beams, max_new_tokens=8, session_factory=_Counting)
        assert batched == alone
        _assert_prefilled_once(model.last_session, len(requests), num_beams)
