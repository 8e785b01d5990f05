"""Our own consistency: PyNative == GRAPH_MODE, cached decoding == full forward, batch rows == alone.
(Parity with the PyTorch reference is in test_parity_*.py.)"""
import numpy as np
import pytest

import mindspore as ms

from mindxcomposer.session import ModelSession
from model_helpers import random_prompt


def _run_all_modes(fn):
    out = {}
    before = ms.get_context("mode")
    try:
        for name, m in (("pynative", ms.PYNATIVE_MODE), ("graph", ms.GRAPH_MODE)):
            ms.set_context(mode=m)
            out[name] = fn()
    finally:
        ms.set_context(mode=before)
    return out


@pytest.mark.parametrize("infer_mode", ["base", "web", "write"])
def test_decoder_same_in_pynative_and_graph(demo_model, infer_mode):
    emb, im = random_prompt(demo_model, 97, 40, 1)
    res = _run_all_modes(lambda: demo_model(inputs_embeds=emb, im_mask=im, infer_mode=infer_mode,
                                            output_hidden_states=True))
    for a, b in zip(res["pynative"].hidden_states, res["graph"].hidden_states):
        assert np.abs(a.asnumpy() - b.asnumpy()).max() <= 1e-6
    assert np.abs(res["pynative"].logits.asnumpy() - res["graph"].logits.asnumpy()).max() <= 1e-6


def test_vision_same_in_pynative_and_graph(demo_model):
    rng = np.random.default_rng(2)
    pixels = rng.standard_normal((1, 3, 560, 1120)).astype(np.float32)
    res = _run_all_modes(lambda: demo_model.img2emb(pixels)[0].asnumpy())
    assert res["pynative"].shape == (1, (2 + 1) * 400 + 1 + 2 * 20, demo_model.config.hidden_size)
    assert np.abs(res["pynative"] - res["graph"]).max() <= 1e-6


def test_infer_modes_differ_and_plora_only_on_image_rows(demo_model):
    emb, im = random_prompt(demo_model, 40, 10, 3)
    base = demo_model(inputs_embeds=emb, im_mask=im).logits.asnumpy()
    web = demo_model(inputs_embeds=emb, im_mask=im, infer_mode="web").logits.asnumpy()
    no_img = demo_model(inputs_embeds=emb, im_mask=np.zeros_like(im)).logits.asnumpy()
    assert np.abs(base - web).max() > 1e-3
    # causal: rows before the first image token cannot see the LoRA difference
    assert np.abs(base[:, :3] - no_img[:, :3]).max() == 0
    assert np.abs(base[:, 3:] - no_img[:, 3:]).max() > 1e-3
    with pytest.raises(ValueError, match="infer_mode"):
        demo_model(inputs_embeds=emb, infer_mode="chat")


def _greedy_uncached(model, emb, im, steps):
    ids, full, imm = [], emb, im
    for _ in range(steps):
        logits = model(inputs_embeds=full, im_mask=imm).logits.asnumpy()[0, -1]
        ids.append(int(logits.argmax()))
        full = np.concatenate([full, model.embed_tokens(np.array([[ids[-1]]]))], 1)
        imm = np.concatenate([imm, np.zeros((1, 1), bool)], 1)
    return ids, logits


@pytest.mark.parametrize("compiled", [False, True])
def test_cached_decoding_equals_full_forward(demo_model, compiled):
    emb, im = random_prompt(demo_model, 70, 30, 4)
    ref_ids, ref_last = _greedy_uncached(demo_model, emb, im, 5)
    s = ModelSession(demo_model, 1, 128, compiled=compiled)
    logits = s.prefill(emb, im)
    ids = [int(logits[0].argmax())]
    for _ in range(4):
        logits = s.step(np.array([ids[-1]]))
        ids.append(int(logits[0].argmax()))
    assert ids == ref_ids
    assert np.abs(logits[0] - ref_last).max() <= 1e-5 * max(1, np.abs(ref_last).max())
    if compiled:
        assert s.compile_count == 2  # one prefill bucket, one step graph


def test_chunks_without_image_rows_skip_the_image_lora(demo_model):
    """A prompt of two prefill chunks, image rows only in the first: the second runs without the Partial LoRA
    (a graph of its own) and the logits are the full forward's; the same prompt with an image row in the
    second chunk too runs one graph."""
    from mindxcomposer.session import PREFILL_CHUNK

    emb, im = random_prompt(demo_model, PREFILL_CHUNK + 100, 60, 9)
    ref = demo_model(inputs_embeds=emb, im_mask=im).logits.asnumpy()[0, -1]
    for second_chunk_image, graphs in ((False, 2), (True, 1)):
        imm = im.copy()
        imm[0, -5] = second_chunk_image
        want = ref if not second_chunk_image else demo_model(inputs_embeds=emb, im_mask=imm).logits.asnumpy()[0, -1]
        s = ModelSession(demo_model, 1, PREFILL_CHUNK + 128, compiled=True)
        got = s.prefill(emb, imm)[0]
        assert np.abs(got - want).max() <= 1e-5 * max(1, np.abs(want).max())
        assert sum(sig[0] == "prefill" for sig in s.signatures) == graphs


def test_batched_rows_equal_rows_alone(demo_model):
    a_emb, a_im = random_prompt(demo_model, 50, 20, 5)
    b_emb, b_im = random_prompt(demo_model, 33, 0, 6)
    alone = []
    for emb, im in ((a_emb, a_im), (b_emb, b_im)):
        s = ModelSession(demo_model, 1, 128)
        lg = [s.prefill(emb, im)[0]]
        for t in (11, 12, 13):
            lg.append(s.step(np.array([t]))[0])
        alone.append(np.stack(lg))
    pad = 50 - 33
    emb = np.concatenate([a_emb, np.concatenate([np.zeros((1, pad, 64), np.float32), b_emb], 1)])
    im = np.concatenate([a_im, np.concatenate([np.zeros((1, pad), bool), b_im], 1)])
    am = np.ones((2, 50), np.int64)
    am[1, :pad] = 0
    s = ModelSession(demo_model, 2, 128)
    lg = [s.prefill(emb, im, am)]
    for t in (11, 12, 13):
        lg.append(s.step(np.array([t, t])))
    batched = np.stack(lg, 1)
    for r in range(2):
        assert np.abs(batched[r] - alone[r]).max() <= 1e-5 * max(1, np.abs(alone[r]).max())


def _two_prompts(model, n_a, n_b):
    """Two left-padded prompts (the second shorter), with image rows: embeds, im_mask, attention_mask."""
    (a_emb, a_im), (b_emb, b_im) = random_prompt(model, n_a, 20, 7), random_prompt(model, n_b, 10, 8)
    pad = n_a - n_b
    emb = np.concatenate([a_emb, np.concatenate([np.zeros((1, pad, a_emb.shape[2]), np.float32), b_emb], 1)])
    im = np.concatenate([a_im, np.concatenate([np.zeros((1, pad), bool), b_im], 1)])
    am = np.ones((2, n_a), np.int64)
    am[1, :pad] = 0
    return emb, im, am


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("lengths", [(50, 33), (600, 333)], ids=["one-chunk", "two-chunks"])
def test_beam_copies_equal_prefilling_every_beam(demo_model, compiled, lengths):
    """`prefill(..., copies=k)` runs each prompt row through the layers once and copies it to its k beams'
    rows: the caches, the logits of the prefill and of the steps after it (beams re-ranked in between) are
    bit for bit those of prefilling every beam's copy of the prompt side by side, as beam search did before."""
    k = 3
    emb, im, am = _two_prompts(demo_model, *lengths)
    every = ModelSession(demo_model, 2 * k, 1024, compiled=compiled)
    once = ModelSession(demo_model, 2 * k, 1024, compiled=compiled)
    ref = [every.prefill(np.repeat(emb, k, 0), np.repeat(im, k, 0), np.repeat(am, k, 0))]
    got = [once.prefill(emb, im, am, copies=k)]
    assert (every.prefilled_rows, once.prefilled_rows) == (2 * k, 2)
    for a, b in zip(tuple(every.decoder.k_cache) + tuple(every.decoder.v_cache),
                    tuple(once.decoder.k_cache) + tuple(once.decoder.v_cache)):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    np.testing.assert_array_equal(every.slot_mask, once.slot_mask)
    for order, ids in (([0, 2, 2, 3, 3, 5], [11, 12, 13, 14, 15, 16]), ([1, 0, 0, 4, 5, 3], [17, 18, 19, 20, 21, 22])):
        for s, out in ((every, ref), (once, got)):
            s.reorder(np.array(order))
            out.append(s.step(np.array(ids)))
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="copied 2 times"):
        once.prefill(emb, im, am, copies=2)


def _count_jits(monkeypatch):
    """Every `mindspore.jit` made from here on (each compiles its graphs afresh and keeps their memory)."""
    made = []
    real = ms.jit

    def counting(fn=None, *args, **kwargs):
        made.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(ms, "jit", counting)
    return made


def test_graphs_are_compiled_once_per_model(demo_model, monkeypatch):
    """A second `chat` of the same shapes decodes in the first one's session (its step graph), and a new
    session of other shapes reuses the model's prefill graphs: neither makes a jit again. Before, every call
    compiled its graphs anew and the process kept each one's memory (about 13 MB a chat on this model)."""
    made = _count_jits(monkeypatch)
    tok = demo_model.tokenizer
    first = demo_model.chat(tok, "Why is the sky blue?", max_new_tokens=4, do_sample=False)[0]
    session = demo_model.last_session
    assert session.compile_count == 2
    after_first = len(made)
    again = demo_model.chat(tok, "Why is the sky blue?", max_new_tokens=4, do_sample=False)[0]
    assert demo_model.last_session is session and again == first
    assert len(made) == after_first
    # The same mode again is not a change: the session keeps its decoder and step graph.
    step_fn = session._step
    session.set_infer_mode("base")
    session.step(np.array([5]))
    assert session._step is step_fn and len(made) == after_first
    # Other shapes: a session of its own over the model's prefill graphs (its step graph comes at its first step).
    emb, im = random_prompt(demo_model, 40, 10, 3)
    other = ModelSession(demo_model, 1, 1024)
    ref = ModelSession(demo_model, 1, 1024, compiled=False).prefill(emb, im)
    assert np.abs(other.prefill(emb, im) - ref).max() <= 1e-5 * max(1, np.abs(ref).max())
    assert len(made) == after_first
