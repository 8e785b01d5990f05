"""Parity of `mindxcomposer.generation` with transformers 4.33.2 `generate`.

Fixtures (`tests/fixtures/generation/`, from `tools/reference/make_generation_fixtures.py`) hold the ids
HF generated with a toy attention LM; the same toy LM is re-created here in numpy as a `DecoderSession`,
so every case drives our loop and must give HF's ids exactly.
"""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mindxcomposer.generation import (BaseStreamer, BeamSearchScorer, GenerationConfig, StopWordsCriteria,
                                      TextIteratorStreamer, TextStreamer, build_logits_processor,
                                      build_logits_warper, generate, softmax)

FIXTURES = Path(__file__).parent / "fixtures" / "generation"
META = json.loads((FIXTURES / "cases.json").read_text())
CASES = {c["name"]: c for c in META["cases"]}
TOY = META["toy"]


@pytest.fixture(scope="module")
def arrays():
    with np.load(FIXTURES / "toy_lm.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def weights(arrays):
    return {k[len("toy/"):]: v for k, v in arrays.items() if k.startswith("toy/")}


class ToySession:
    """numpy twin of the generator's torch toy LM: one attention head over a KV cache, float64 inside,
    float32 logits out; positions count the real (mask 1) positions only, as upstream's model does."""

    def __init__(self, w):
        self.w = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in w.items()}
        self.calls = []

    def prefill(self, inputs_embeds, attention_mask, **model_inputs):
        self.calls.append(("prefill", inputs_embeds.shape[0]))
        width = inputs_embeds.shape[-1]
        self.k = np.zeros((inputs_embeds.shape[0], 0, width))
        self.v = np.zeros((inputs_embeds.shape[0], 0, width))
        pos = np.cumsum(attention_mask, -1) - 1
        pos[attention_mask == 0] = 1
        return self._forward(inputs_embeds.astype(np.float64), pos, attention_mask)

    def step(self, token_ids, attention_mask):
        self.calls.append(("step", len(token_ids)))
        pos = np.cumsum(attention_mask, -1)[:, -1:] - 1
        return self._forward(self.w["embed"][token_ids][:, None], pos, attention_mask)

    def reorder(self, row_index):
        self.calls.append(("reorder", len(row_index)))
        self.k, self.v = self.k[row_index], self.v[row_index]

    def _forward(self, x, pos, mask):
        w = self.w
        xp = x + w["pos"][pos]
        q = xp @ w["wq"]
        self.k = np.concatenate([self.k, xp @ w["wk"]], axis=1)
        self.v = np.concatenate([self.v, x @ w["wv"]], axis=1)
        n_new, n_all = x.shape[1], self.k.shape[1]
        scores = q @ self.k.transpose(0, 2, 1) / np.sqrt(x.shape[-1])
        causal = np.arange(n_all)[None, :] <= np.arange(n_all - n_new, n_all)[:, None]
        scores = np.where(causal[None] & mask.astype(bool)[:, None, :], scores, -1e9)
        a = np.exp(scores - scores.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        h = np.tanh(a @ self.v + x @ w["wr"])
        logits = h @ w["wout"] + w["pos"][pos] @ w["wpo"] + w["bout"]
        logits[..., w["ramp_ids"]] += np.clip(pos[..., None] - w["ramp_start"], 0, None) * w["ramp_slope"]
        return logits[:, -1].astype(np.float32)


def model_config(**kw):
    """The toy model's own generation defaults (HF takes bos/eos from the model config)."""
    return GenerationConfig(bos_token_id=TOY["model_bos_token_id"], eos_token_id=TOY["model_eos_token_id"]).update(**kw)


def prompt_batch(case, arrays, weights, rows):
    """Left-padded (embeds, mask, prompt_ids) as the generator built them: pad embeddings are zeros, pad
    ids are 0 and stay in HF's running sequence on the text-only path."""
    prompts = [arrays[f"prompt/{case['name']}/{i}"] for i in rows]
    longest = max(len(p) for p in prompts)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for j, p in enumerate(prompts):
        mask[j, longest - len(p):] = 1
    if case["rows"][rows[0]] == "ids":
        ids = np.zeros((len(rows), longest), dtype=np.int64)
        for j, p in enumerate(prompts):
            ids[j, longest - len(p):] = p
        return weights["embed"][ids], mask, ids
    embeds = np.zeros((len(rows), longest, TOY["width"]), dtype=np.float32)
    for j, p in enumerate(prompts):
        embeds[j, longest - len(p):] = p
    return embeds, mask, None


def run_case(case, arrays, weights, rows, **overrides):
    embeds, mask, ids = prompt_batch(case, arrays, weights, rows)
    criteria = [StopWordsCriteria([case["stop_id"]])] if case.get("stop_id") is not None else []
    kwargs = {**case["kwargs"], **overrides}
    return generate(ToySession(weights), embeds, mask, prompt_ids=kwargs.pop("prompt_ids", ids),
                    generation_config=model_config(), stopping_criteria=criteria, rng=0, **kwargs)


def test_toy_session_reproduces_the_torch_toy_logits(arrays, weights):
    session = ToySession(weights)
    prefill = session.prefill(arrays["probe/embeds"], arrays["probe/mask"])
    np.testing.assert_allclose(prefill, arrays["probe/prefill_logits"], rtol=0, atol=1e-5)
    mask = np.concatenate([arrays["probe/mask"], np.ones((3, 1), dtype=np.int64)], 1)
    step = session.step(arrays["probe/step_ids"], mask)
    np.testing.assert_allclose(step, arrays["probe/step_logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_ids_equal_hf_generate(name, arrays, weights):
    case = CASES[name]
    n = len(case["rows"])
    batched = run_case(case, arrays, weights, list(range(n)))
    assert batched.tolist() == case["sequences"], "batched rows differ from HF"
    for i in range(n):
        alone = run_case(case, arrays, weights, [i])
        assert alone.tolist() == [case["alone"][i]], f"row {i} run alone differs from HF"


# Text prompts are left out: their left-padding ids sit in HF's running sequence, so the repetition
# penalty hits the pad id in a batch and not alone (HF does that too: see greedy_ids_batch_pad0).
@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items()
                                        if len(c["rows"]) > 1 and set(c["rows"]) == {"embeds"}))
def test_batched_rows_equal_rows_run_alone(name, arrays, weights):
    case = CASES[name]
    config = model_config(**case["kwargs"])
    rows = list(range(len(case["rows"])))
    batched = run_case(case, arrays, weights, rows)
    for i in rows:
        alone = run_case(case, arrays, weights, [i])[0]
        row = batched[i]
        tail = row[len(alone):]
        assert row[:len(alone)].tolist() == alone.tolist()
        assert (tail == config.effective_pad_token_id).all()


def test_embeddings_prompt_starts_hf_sequence_with_bos(arrays, weights):
    """HF 4.33 runs an embeddings prompt with input_ids = [[<s>]]: outputs start with <s> and the
    repetition penalty hits id 1. The fixture's prompts are ones where that penalty changes the ids; HF
    with the penalty skipping <s> gave `bos_free`, which an empty `prompt_ids` must reproduce."""
    case = CASES["greedy_rep13_bos_race"]
    rows = list(range(len(case["rows"])))
    assert case["bos_free"] != case["sequences"]
    ours = run_case(case, arrays, weights, rows)
    assert (ours[:, 0] == TOY["bos"]).all()
    empty = run_case(case, arrays, weights, rows, prompt_ids=np.zeros((len(rows), 0), dtype=np.int64))
    assert empty.tolist() == [s[1:] for s in case["bos_free"]]


@pytest.mark.parametrize("index", range(len(META["warp"])))
def test_warped_probabilities_equal_hf(index, arrays):
    settings = META["warp"][index]["settings"]
    config = model_config(**settings)
    logits, input_ids = arrays["warp/logits"], arrays["warp/input_ids"]
    scores = build_logits_processor(config, META["warp"][index]["ids_length"])(input_ids, logits)
    probs = softmax(build_logits_warper(config)(input_ids, scores))
    expected = arrays[f"warp/{index}/probs"]
    assert np.array_equal(probs == 0, expected == 0), "a different set of ids was filtered out"
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-8)
    assert np.array_equal(logits, arrays["warp/logits"]), "the processors modified their input"


@pytest.mark.parametrize("index", range(len(META["scorer"])))
def test_beam_scorer_steps_equal_hf(index):
    """HF's BeamSearchScorer fed random ranked candidates (eos at every rank): same next beams, same
    finished rows at every step, same final sequences."""
    trace = META["scorer"][index]
    nb, batch, eos = trace["num_beams"], trace["batch"], trace["eos"]
    scorer = BeamSearchScorer(batch, nb, trace["length_penalty"], trace["early_stopping"], trace["max_length"])
    ids = np.full((batch * nb, 1), TOY["bos"], dtype=np.int64)
    for step in trace["steps"]:
        beam_scores, tokens, rows = scorer.process(
            ids, np.array(step["scores"], np.float32), np.array(step["tokens"]), np.array(step["indices"]),
            pad_token_id=0, eos_token_id=eos)
        assert beam_scores.tolist() == step["out_scores"]
        assert tokens.tolist() == step["out_tokens"]
        assert rows.tolist() == step["out_rows"]
        assert scorer.done.tolist() == step["done"]
        ids = np.concatenate([ids[rows], tokens[:, None]], axis=1)
    final = scorer.finalize(ids, beam_scores, trace["max_length"], pad_token_id=0, eos_token_id=eos)
    assert final.tolist() == trace["sequences"]


class FixedLogits:
    """A session whose every row always predicts the same logits."""

    def __init__(self, logits):
        self.logits = logits

    def prefill(self, inputs_embeds, attention_mask):
        self.rows = inputs_embeds.shape[0]
        return np.repeat(self.logits[None], self.rows, 0)

    def step(self, token_ids, attention_mask):
        return np.repeat(self.logits[None], self.rows, 0)

    def reorder(self, row_index):
        self.rows = len(row_index)


def test_sampling_draws_from_the_warped_distribution(arrays):
    logits = arrays["warp/logits"][0]
    settings = dict(do_sample=True, temperature=0.7, top_k=0, top_p=0.9)
    rows = 5000
    ids = generate(FixedLogits(logits), np.zeros((rows, 1, 1), np.float32), rng=123, max_new_tokens=1,
                   prompt_ids=np.zeros((rows, 0), np.int64), **settings)[:, 0]
    config = GenerationConfig(**settings)
    expected = softmax(build_logits_warper(config)(np.zeros((1, 0), np.int64), logits[None]))[0]
    counts = np.bincount(ids, minlength=logits.size)
    assert counts[expected == 0].sum() == 0, "a filtered id was sampled"
    support = expected > 0
    freq = counts[support] / rows
    # binomial standard error per id; 5 sigma keeps the fixed-seed check meaningful but not brittle
    sigma = np.sqrt(expected[support] * (1 - expected[support]) / rows)
    assert np.all(np.abs(freq - expected[support]) < 5 * sigma + 1e-4)
    # Kolmogorov-Smirnov distance over the id order: catches biases spread thinly over many ids
    ks = np.abs(np.cumsum(counts) / rows - np.cumsum(expected.astype(np.float64))).max()
    assert ks < 2.0 / np.sqrt(rows)


def test_sampling_is_reproducible_with_a_seed(arrays, weights):
    case = CASES["greedy"]
    embeds, mask, _ = prompt_batch(case, arrays, weights, [0, 1, 2])

    def sample(seed):
        return generate(ToySession(weights), embeds, mask, generation_config=model_config(), do_sample=True,
                        top_p=0.8, eos_token_id=[2, 997], max_new_tokens=20, rng=np.random.default_rng(seed))

    assert np.array_equal(sample(7), sample(7))
    assert not np.array_equal(sample(7), sample(8))


def test_beam_sampling_is_reproducible_with_a_seed(arrays, weights):
    case = CASES["greedy"]
    embeds, mask, _ = prompt_batch(case, arrays, weights, [0, 1])

    def sample(seed):
        return generate(ToySession(weights), embeds, mask, generation_config=model_config(), do_sample=True,
                        num_beams=2, repetition_penalty=3.0, max_new_tokens=20, rng=seed)

    first = sample(3)
    assert np.array_equal(first, sample(3))
    assert (first[:, 0] == TOY["bos"]).all()


def test_beam_search_expands_the_cache_once_after_prefill(arrays, weights):
    case = CASES["beam3_batch"]
    embeds, mask, _ = prompt_batch(case, arrays, weights, [0, 1, 2])
    session = ToySession(weights)
    generate(session, embeds, mask, generation_config=model_config(), **case["kwargs"])
    assert session.calls[:2] == [("prefill", 3), ("reorder", 9)]
    assert all(c[1] == 9 for c in session.calls[2:])


class Recorder(BaseStreamer):
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(["put", np.asarray(value).tolist()])

    def end(self):
        self.calls.append(["end"])


def test_streamer_gets_what_hf_hands_it(arrays, weights):
    spec = META["streamer_generation"]
    recorder = Recorder()
    out = generate(ToySession(weights), arrays[spec["prompt_key"]][None], generation_config=model_config(),
                   streamer=recorder, **spec["kwargs"])
    assert out.tolist() == spec["sequences"]
    assert recorder.calls == spec["calls"]


class ReplayTokenizer:
    """Answers `decode` from the calls HF's TextStreamer made to the real tokenizer; any other call fails."""

    def __init__(self, calls):
        self.answers = {(tuple(ids), json.dumps(kw, sort_keys=True)): text for ids, kw, text in calls}
        self.asked = []

    def decode(self, ids, **kwargs):
        key = (tuple(int(i) for i in ids), json.dumps(kwargs, sort_keys=True))
        self.asked.append(key)
        if key not in self.answers:
            raise AssertionError(f"decode called with ids HF's streamer never decoded: {key}")
        return self.answers[key]


@pytest.mark.parametrize("index", range(len(META["text_streamer"]["cases"])))
def test_text_streamer_releases_text_like_hf(index):
    spec = META["text_streamer"]["cases"][index]
    tokenizer = ReplayTokenizer(spec["decode_calls"])
    chunks = []

    class Capture(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            super().on_finalized_text(text, stream_end)
            chunks.append([text, stream_end])

    streamer = Capture(tokenizer, skip_prompt=spec["skip_prompt"], print_text=False, skip_special_tokens=True)
    streamer.put(np.array([spec["prompt"]]))
    for t in spec["token_ids"]:
        streamer.put(np.array([t]))
    streamer.end()
    assert chunks == spec["chunks"]
    assert [list(k[0]) for k in tokenizer.asked] == [c[0] for c in spec["decode_calls"]]
    assert streamer.text == "".join(c[0] for c in spec["chunks"])


class DigitsTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"{i} " for i in ids if not (skip_special_tokens and i in (1, 2, 997)))


def test_text_streamer_prints_greedy_text_as_produced(arrays, weights, capsys):
    case = CASES["greedy"]
    embeds, _, _ = prompt_batch(case, arrays, weights, [1])
    streamer = TextStreamer(DigitsTokenizer(), skip_prompt=True, skip_special_tokens=True)
    out = generate(ToySession(weights), embeds, generation_config=model_config(), streamer=streamer,
                   **case["kwargs"])
    expected = DigitsTokenizer().decode(out[0, 1:].tolist(), skip_special_tokens=True)
    assert streamer.text == expected
    assert capsys.readouterr().out == expected + "\n"


def test_beam_search_streams_the_final_text_only(arrays, weights):
    case = CASES["beam3_batch"]
    embeds, _, _ = prompt_batch(case, arrays, weights, [0])
    streamer = TextIteratorStreamer(DigitsTokenizer(), skip_prompt=True)
    out = generate(ToySession(weights), embeds, generation_config=model_config(), streamer=streamer,
                   **case["kwargs"])
    pieces = list(streamer)
    assert "".join(pieces) == DigitsTokenizer().decode(out[0, 1:].tolist())
    assert len([p for p in pieces if p]) == 1


def test_text_streamer_refuses_several_rows():
    with pytest.raises(ValueError, match="one row"):
        TextStreamer(DigitsTokenizer(), print_text=False).put(np.array([[1], [1]]))


def test_model_config_supplies_token_ids_and_lengths():
    model = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_length=16384, hidden_size=4096)
    config = GenerationConfig.from_model_config(model, max_new_tokens=8)
    assert (config.bos_token_id, config.eos_token_ids, config.pad_token_id) == (1, [2], 0)
    assert config.total_max_length(5) == 13 and config.update(max_new_tokens=None).total_max_length(5) == 16384


@pytest.mark.parametrize("settings, message", [
    (dict(num_beams=0), "num_beams"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(eos_token_id=[]), "eos_token_id"),
    (dict(num_return_sequences=2), "num_return_sequences"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**settings)


def test_bad_inputs_are_named(weights):
    embeds = np.zeros((2, 3, TOY["width"]), np.float32)
    config = model_config(max_new_tokens=2)
    with pytest.raises(TypeError, match="top_q"):
        generate(ToySession(weights), embeds, generation_config=config, top_q=0.5)
    with pytest.raises(ValueError, match="left-padded"):
        generate(ToySession(weights), embeds, np.array([[1, 1, 0], [1, 1, 1]]), generation_config=config)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(ToySession(weights), embeds, np.ones((2, 4), np.int64), generation_config=config)
    with pytest.raises(ValueError, match="bos_token_id"):
        generate(ToySession(weights), embeds, generation_config=GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="vocabulary"):
        generate(ToySession(weights), embeds, generation_config=config, eos_token_id=5000)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(ToySession(weights), embeds, generation_config=config, prompt_ids=np.ones((3, 1), np.int64))
