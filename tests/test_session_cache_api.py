"""`ModelSession`'s cache API, as the server uses it: copy rows in from another session, move the write
slot, compact rows, read a row's slots, and the hooks after each prefill chunk and each vision call."""
import os
import threading

import numpy as np
import pytest

from mindxcomposer.session import PREFILL_CHUNK, ModelSession

CAT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "chelsea_tiny.png")


def _prompt(model, n, rows=1, seed=0):
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((rows, n, model.config.hidden_size)).astype(np.float32) * 0.1
    return embeds, np.zeros((rows, n), np.float32)


def _steps(session, ids):
    return [session.step(np.array([t] * session.batch_size)) for t in ids]


def test_rows_copied_in_decode_as_the_prompt_alone(demo_model):
    n, ids = 37, [5, 17, 99]
    embeds, im = _prompt(demo_model, n)
    alone = ModelSession(demo_model, 1, 256, compiled=False)
    alone.prefill(embeds, im)
    ref = _steps(alone, ids)

    # the same layout (the prompt right before the write slot) in a session of its own: bit for bit
    alone.prefill(embeds, im)
    shared = ModelSession(demo_model, 1, 256, compiled=False)
    shared.copy_rows_from(alone, [0], np.arange(n))
    shared.move_write_slot(n)
    assert shared.write_slot == n and np.array_equal(shared.row_slots(0), np.arange(n))
    for a, b in zip(_steps(shared, ids), ref):
        np.testing.assert_array_equal(a, b)

    # row 1 of a two-row session, its prompt 40 slots further on: positions come from the row's own slots
    shared = ModelSession(demo_model, 2, 256, compiled=False)
    shared.copy_rows_from(alone, [1], np.arange(40, 40 + n))
    shared.move_write_slot(40 + n)
    assert shared.tokens_held([0, 1]).tolist() == [0, n]
    got = _steps(shared, ids)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a[1:], b, rtol=0, atol=1e-5 * max(1.0, np.abs(b).max()))
    assert shared.tokens_held([1]).tolist() == [n + len(ids)]


def test_left_padding_stays_empty_and_bad_shapes_are_refused(demo_model):
    embeds, im = _prompt(demo_model, 12, rows=2)
    mask = np.ones((2, 12), np.int64)
    mask[1, :4] = 0  # row 1 is left-padded by 4
    alone = ModelSession(demo_model, 2, 256, compiled=False)
    alone.prefill(embeds, im, mask)
    shared = ModelSession(demo_model, 3, 256, compiled=False)
    shared.copy_rows_from(alone, [2, 0], np.arange(100, 112))
    assert np.array_equal(shared.row_slots(2), np.arange(100, 112))
    assert np.array_equal(shared.row_slots(0), np.arange(104, 112))
    with pytest.raises(ValueError, match="rows"):
        shared.copy_rows_from(alone, [0], np.arange(12))
    with pytest.raises(ValueError, match="slots"):
        shared.copy_rows_from(alone, [0, 1], np.arange(250, 262))
    with pytest.raises(ValueError, match="outside"):
        shared.move_write_slot(shared.cache_len + 1)


def test_compacted_rows_decode_as_before(demo_model):
    n, ids = 20, [3, 8]
    embeds, im = _prompt(demo_model, n, seed=1)
    alone = ModelSession(demo_model, 1, 256, compiled=False)
    alone.prefill(embeds, im)
    holes = ModelSession(demo_model, 2, 256, compiled=False)
    holes.copy_rows_from(alone, [0], np.arange(150, 150 + n))
    holes.move_write_slot(200)  # the slots between the prompt and the write slot were a finished row's
    before = _steps(holes, [ids[0]])[0]
    assert holes.row_slots(0).tolist() == list(range(150, 150 + n)) + [200]
    assert holes.compact_rows([0]) == n + 1 == holes.write_slot
    assert np.array_equal(holes.row_slots(0), np.arange(n + 1))
    after = holes.step(np.array([ids[1], ids[1]]))
    again = ModelSession(demo_model, 2, 256, compiled=False)  # the same tokens, never compacted
    again.copy_rows_from(alone, [0], np.arange(150, 150 + n))
    again.move_write_slot(200)
    np.testing.assert_array_equal(_steps(again, [ids[0]])[0], before)
    ref = again.step(np.array([ids[1], ids[1]]))
    np.testing.assert_allclose(after[0], ref[0], rtol=0, atol=1e-5 * max(1.0, np.abs(ref[0]).max()))


@pytest.mark.parametrize("copies", [1, 2])
def test_a_hook_runs_after_each_prefill_chunk_without_changing_the_logits(demo_model, copies):
    n = PREFILL_CHUNK + 40  # two chunks
    embeds, im = _prompt(demo_model, n, seed=2)
    session = ModelSession(demo_model, copies, 1024, compiled=False)
    ref = session.prefill(embeds, im, copies=copies)
    calls = []
    session.after_prefill_chunk = lambda: calls.append(session.prefilled_rows)
    got = session.prefill(embeds, im, copies=copies)
    np.testing.assert_array_equal(got, ref)
    assert len(calls) == 2


def test_a_hook_runs_after_each_vision_call_of_this_thread_only(demo_model):
    once = []
    with ModelSession.after_vision_calls(once.append):
        demo_model.encode_img(CAT, hd_num=1)
    layers = demo_model.config.vision_config.num_hidden_layers
    assert once.count("vit") % layers == 0 and once.count("vit") >= layers
    assert once.count("projector") >= 1 and set(once) == {"vit", "projector"}
    assert once.index("projector") > len(once) - 1 - once[::-1].index("vit")  # the projector runs last
    seen = []
    with ModelSession.after_vision_calls(seen.append):
        worker = threading.Thread(target=lambda: demo_model.encode_img(CAT, hd_num=1))
        worker.start()
        worker.join()  # another thread's encoding: not this block's
        demo_model.encode_img(CAT, hd_num=1)
    demo_model.encode_img(CAT, hd_num=1)  # after the block
    assert seen == once


def test_last_session_is_per_thread(demo_model):
    demo_model.chat(demo_model.tokenizer, "Hi", max_new_tokens=2, do_sample=False)
    mine = demo_model.last_session
    assert isinstance(mine, ModelSession) and mine.batch_size == 1
    theirs = []

    def other():
        theirs.append(demo_model.last_session)  # nothing run in this thread yet
        demo_model.chat(demo_model.tokenizer, "Hi", max_new_tokens=2, do_sample=False, num_beams=2)
        theirs.append(demo_model.last_session)

    worker = threading.Thread(target=other)
    worker.start()
    worker.join()
    assert theirs[0] is None and theirs[1].batch_size == 2
    assert demo_model.last_session is mine  # another thread's call did not replace this thread's
