"""The batching engine below HTTP: what each row computes against `model.chat` alone.

Prefill logits are chat's bit for bit; a request alone in a one-row batch decodes bit for bit; among
other rows a step's logits differ only in the last bits (a matrix product over several rows accumulates
in another order), and the tokens are the same."""
import math
import os

import numpy as np
import pytest

pytest.importorskip("fastapi")

from mindxcomposer.serve.batching import BatchEngine  # noqa: E402
from mindxcomposer.serve.jobs import Job  # noqa: E402
from mindxcomposer.serve.prompt_check import prepare  # noqa: E402
from mindxcomposer.serve.protocol import parse_chat_request  # noqa: E402
from mindxcomposer.serve.text_stream import AnswerText  # noqa: E402
from mindxcomposer.session import ModelSession  # noqa: E402
from mindxcomposer.vision import PROJECTOR_CHUNK, merged_token_count  # noqa: E402

QUERIES = ["Why is the sky blue?", "Tell me a joke, please.", "Hello"]
N = 12


def _chat_logits(model, query, num_beams=1):
    seen = []

    class Recording(ModelSession):
        def prefill(self, *a, **k):
            seen.append(super().prefill(*a, **k))
            return seen[-1]

        def step(self, *a, **k):
            seen.append(super().step(*a, **k))
            return seen[-1]

    text = model.chat(model.tokenizer, query, max_new_tokens=N, do_sample=False, num_beams=num_beams,
                      session_factory=Recording)[0]
    return text, seen


def _served(model, engine, queries, num_beams=1):
    """Runs the queries through `engine` at once; returns (texts, logits each row received)."""
    seen = {q: [] for q in queries}

    def recording(event, job, data):
        if event == "logits":
            seen[job.request.query].append(data)

    engine.observer = recording
    jobs = []
    for q in queries:
        req = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": q}], "max_tokens": N,
                                  "temperature": 0, "num_beams": num_beams}, "m", engine.max_beams)
        jobs.append(Job(req, [], 0, AnswerText(model.tokenizer, model.eos_token_ids(model.tokenizer))))
        engine.submit(jobs[-1])
    for job in jobs:
        assert job.done.wait(300) and job.error is None
    return [job.answer.text for job in jobs], seen


def test_alone_in_a_one_row_batch_is_bit_for_bit(demo_model):
    text, ref = _chat_logits(demo_model, QUERIES[0])
    engine = BatchEngine(demo_model, max_batch=1, max_queue=2).start()
    try:
        (got_text,), seen = _served(demo_model, engine, QUERIES[:1])
    finally:
        engine.stop()
    assert got_text == text
    assert len(seen[QUERIES[0]]) == len(ref)
    for a, b in zip(seen[QUERIES[0]], ref):
        np.testing.assert_array_equal(a, b)


def test_beams_alone_are_bit_for_bit_and_prefilled_once(demo_model):
    """A request of 2 beams filling a 2-row batch: its prompt runs through the layers once and is copied to
    both beams' rows, and every logit it receives is chat's (which prefills the prompt once too)."""
    text, ref = _chat_logits(demo_model, QUERIES[1], num_beams=2)
    engine = BatchEngine(demo_model, max_batch=2, max_queue=2).start()
    try:
        (got_text,), seen = _served(demo_model, engine, QUERIES[1:2], num_beams=2)
    finally:
        engine.stop()
    assert got_text == text
    assert engine.prefilled_rows == 1
    assert len(seen[QUERIES[1]]) == len(ref)
    assert ref[0].shape[0] == 2  # the prefill's logits: one row per beam
    for a, b in zip(seen[QUERIES[1]], ref):
        np.testing.assert_array_equal(a, b)


def test_rows_of_a_shared_batch(demo_model):
    refs = {q: _chat_logits(demo_model, q) for q in QUERIES}
    engine = BatchEngine(demo_model, max_batch=4, max_queue=4).start()
    try:
        texts, seen = _served(demo_model, engine, QUERIES)
        assert engine.max_rows > 1
    finally:
        engine.stop()
    for q, text in zip(QUERIES, texts):
        ref_text, ref = refs[q]
        assert text == ref_text
        np.testing.assert_array_equal(seen[q][0], ref[0])  # prefill: chat's own session shape
        for a, b in zip(seen[q][1:], ref[1:]):
            assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())


def _submit(model, engine, query, max_tokens):
    req = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": query}],
                              "max_tokens": max_tokens, "temperature": 0}, "m", engine.max_beams)
    job = Job(req, [], 0, AnswerText(model.tokenizer, model.eos_token_ids(model.tokenizer)))
    engine.submit(job)
    return job


def _wait(condition, seconds=300):
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_requests_to_an_idle_server_compile_nothing_again(demo_model, monkeypatch):
    """Once a request has run, later ones (the batch empty again, a prompt of another length) make no new
    graph: the shared session keeps its step graph, prefill sessions share the model's prefill graphs. Before,
    each request to an idle server rebuilt the shared decoder, compiled its step again and kept that graph's
    memory (+1.2 GiB a request at release size)."""
    import mindspore as ms

    made = []
    real = ms.jit
    monkeypatch.setattr(ms, "jit", lambda fn=None, *a, **k: made.append(fn) or real(fn, *a, **k))
    ref = demo_model.chat(demo_model.tokenizer, QUERIES[0], max_new_tokens=N, do_sample=False)[0]
    engine = BatchEngine(demo_model, max_batch=2, max_queue=2).start()
    try:
        first = _submit(demo_model, engine, QUERIES[0], N)
        assert first.done.wait(300) and first.error is None
        after_first = len(made)
        for q in (QUERIES[0], QUERIES[2]):
            job = _submit(demo_model, engine, q, N)
            assert job.done.wait(300) and job.error is None
        assert len(made) == after_first
    finally:
        engine.stop()
    assert first.answer.text == ref


def test_packing_the_cache_lets_a_newcomer_join_without_a_drain(demo_model):
    """A small cache: after A finishes, the write slot is too far for C's 300 reserved slots, though B,
    still decoding, uses few. The running rows are packed to the front and C joins B."""
    engine = BatchEngine(demo_model, max_batch=2, max_queue=4, cache_len=512).start()
    try:
        # Warm up the prefill sessions of B's and C's shape (one shape: 1 row, a 512-slot cache), so that a
        # graph compilation does not delay their admission by hundreds of steps: the scenario below needs
        # B to join before A ends and C to arrive before B has decoded ~100 tokens.
        assert _submit(demo_model, engine, "Warm-up question?", 300).done.wait(300)
        warm_steps = engine.steps
        a = _submit(demo_model, engine, "First question?", 200)
        _wait(lambda: engine.steps >= warm_steps + 120)
        b = _submit(demo_model, engine, "Second question?", 300)
        assert a.done.wait(300)
        assert not b.done.is_set()
        c = _submit(demo_model, engine, "Third question?", 300)
        _wait(lambda: engine.joins >= 2 or b.done.is_set())
        assert engine.compactions >= 1 and not b.done.is_set()  # C joined while B decodes
        for job in (b, c):
            assert job.done.wait(300) and job.error is None
    finally:
        engine.stop()
    for job, q, k in ((a, "First question?", 200), (b, "Second question?", 300), (c, "Third question?", 300)):
        assert job.answer.text == demo_model.chat(demo_model.tokenizer, q, max_new_tokens=k, do_sample=False)[0], q


COFFEE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "coffee.png")  # 2x2 tiles at hd_num 4


def _image_job(model, engine, query, max_tokens, hd_num):
    """A job as the HTTP side makes it for one image and `query` (which holds its `<ImageHere>`)."""
    req = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "unused: the test gives the image itself"}},
        {"type": "text", "text": query}]}], "max_tokens": max_tokens, "temperature": 0, "hd_num": hd_num},
        "m", engine.max_beams)
    pixels, n_prompt = prepare(req, [COFFEE], model.tokenizer, model.config, engine.cache_len)
    return Job(req, pixels, n_prompt, AnswerText(model.tokenizer, model.eos_token_ids(model.tokenizer)))


def test_running_decodes_step_between_a_newcomers_vision_calls(demo_model):
    """While A decodes, B arrives with an image of 2x2 tiles (5 crops): A takes a step after each of B's ViT
    layer calls and projector chunks, not only after B's whole encoding; both answers are chat's alone."""
    qa, ka, qb, kb, hd = "Tell me a long story.", 300, "<ImageHere>Describe it.", 6, 4
    engine = BatchEngine(demo_model, max_batch=2, max_queue=4)
    b = _image_job(demo_model, engine, qb, kb, hd)
    tile = demo_model.config.vision_config.image_size
    h, w = b.pixels[0].shape[2] // tile, b.pixels[0].shape[3] // tile
    assert (h, w) == (2, 2)
    vit_calls = (1 + h * w) * demo_model.config.vision_config.num_hidden_layers
    chunks = math.ceil(merged_token_count(h, w, tile // demo_model.config.vision_config.patch_size) / PROJECTOR_CHUNK)
    assert chunks >= 2

    events = []  # in the order they happen: "vit" after each ViT layer call, "step" after each batched step

    def recording(event, job, data):
        if event in ("vit", "step"):
            events.append(event)

    engine.observer = recording
    engine.start()
    try:
        a = _submit(demo_model, engine, qa, ka)
        _wait(lambda: engine.steps >= 3)
        engine.submit(b)
        assert b.done.wait(300) and b.error is None
        assert not a.done.is_set()  # B was encoded, prefilled and decoded while A decoded
        assert a.done.wait(300) and a.error is None
    finally:
        engine.stop()
    first = events.index("vit")
    last = len(events) - 1 - events[::-1].index("vit")
    assert events[first:last + 1] == ["vit", "step"] * (vit_calls - 1) + ["vit"]
    assert engine.steps_in_vision == vit_calls + chunks  # and one after each projector chunk
    assert a.answer.text == demo_model.chat(demo_model.tokenizer, qa, max_new_tokens=ka, do_sample=False)[0]
    assert b.answer.text == demo_model.chat(demo_model.tokenizer, qb, image=[COFFEE], hd_num=hd, max_new_tokens=kb,
                                            do_sample=False)[0]


def test_a_request_cancelled_during_its_vision_encoding_stops_at_the_next_call(demo_model):
    engine = BatchEngine(demo_model, max_batch=2, max_queue=4)
    job = _image_job(demo_model, engine, "<ImageHere>Describe it.", 4, 4)
    calls = []

    def cancelling(event, job_seen, data):
        if event == "vit":
            calls.append(1)
            job.cancel()  # the client goes away during the first ViT layer call

    engine.observer = cancelling
    engine.start()
    try:
        engine.submit(job)
        assert job.done.wait(300)
    finally:
        engine.stop()
    assert job.error is not None and job.error.status == 408
    assert len(calls) == 1 and engine.steps == 0
