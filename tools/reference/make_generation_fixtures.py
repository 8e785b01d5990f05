"""Golden fixtures for `mindxcomposer.generation`: transformers 4.33.2 `generate` on a toy LM.

Run with the reference venv (upstream's module needs torchvision):

    /work/venv-ref/bin/python tools/reference/make_generation_fixtures.py \
        --upstream /work/upstream/base --out tests/fixtures/generation

The toy LM is a one-layer, one-head attention model with a KV cache (width 8, vocab 1000), computed in
float64 and returned as float32 logits, so that numpy re-creates its logits to the last bit or nearly.
It borrows upstream's `prepare_inputs_for_generation` and `_reorder_cache` (position ids from the
attention mask, embeddings only at the first step, cache rows reordered for beams), so `generate` walks
the same path as upstream's `chat` / `write_*` methods. Every case is run again with its logits perturbed
by +-1e-4; a case whose ids change is regenerated with other prompts, so that float32 differences
between torch and numpy cannot flip a decision in the committed expectations.

Writes `toy_lm.npz` (toy weights, prompts, probe logits, warper logits and HF's warped probabilities)
and `cases.json` (per case: settings and HF's ids batched and row by row; what a streamer receives;
HF TextStreamer chunks with the decode calls behind them; BeamSearchScorer step traces).
"""
import argparse
import json
import os
import zlib

import numpy as np
import torch
import transformers
from transformers import BeamSearchScorer, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.generation import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StoppingCriteria,
                                     StoppingCriteriaList, TextStreamer)
from transformers.modeling_outputs import CausalLMOutputWithPast

import upstream as U

VOCAB, WIDTH, MAX_POS = 1000, 8, 128
BOS, EOS_A, EOS_B = 1, 2, 997  # EOS_B plays the role of [UNUSED_TOKEN_145] (92542)
NOISE = 1e-4


def toy_weights(seed=20240611):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    w = {
        "embed": rng.standard_normal((VOCAB, WIDTH)).astype(f32),
        "pos": (0.5 * rng.standard_normal((MAX_POS, WIDTH))).astype(f32),
        "wq": (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(f32),
        "wk": (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(f32),
        "wv": (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(f32),
        "wr": (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(f32),
        "wout": (1.2 * rng.standard_normal((WIDTH, VOCAB))).astype(f32),
        "bout": (0.5 * rng.standard_normal(VOCAB)).astype(f32),
        "wpo": rng.standard_normal((WIDTH, VOCAB)).astype(f32),  # position-dependent logits break loops
        # ids whose logit grows with the position: eos becomes likely late, at prompt-dependent times
        "ramp_ids": np.array([BOS, EOS_A, EOS_B], dtype=np.int64),
        "ramp_slope": np.array([0.05, 0.4, 0.44], dtype=f32),
        "ramp_start": np.array([0.0, 16.0, 18.0], dtype=f32),
    }
    w["bout"][BOS] = 2.0  # the leading <s> is a strong candidate: repetition penalty on it is visible
    return w


class ToyConfig(PretrainedConfig):
    model_type = "toy_kv_lm"


class ToyLM(PreTrainedModel):
    config_class = ToyConfig
    noise = None  # a torch.Generator while perturbing

    def __init__(self, config, weights):
        super().__init__(config)
        self.w = {k: torch.from_numpy(v).double() if v.dtype == np.float32 else torch.from_numpy(v)
                  for k, v in weights.items()}
        self.wout = torch.nn.Parameter(self.w["wout"], requires_grad=False)  # gives the model a device

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=None, im_mask=None, infer_mode=None, return_dict=True,
                output_attentions=None, output_hidden_states=None):
        w = self.w
        x = w["embed"][input_ids] if inputs_embeds is None else inputs_embeds.double()
        xp = x + w["pos"][position_ids]
        q, k, v = xp @ w["wq"], (xp @ w["wk"])[:, None], (x @ w["wv"])[:, None]
        if past_key_values is not None:
            k = torch.cat([past_key_values[0][0], k], dim=2)
            v = torch.cat([past_key_values[0][1], v], dim=2)
        n_new, n_all = x.shape[1], k.shape[2]
        scores = q @ k[:, 0].transpose(1, 2) / np.sqrt(WIDTH)
        causal = torch.arange(n_all)[None, :] <= torch.arange(n_all - n_new, n_all)[:, None]
        allowed = causal[None] & attention_mask.bool()[:, None, :]
        scores = scores.masked_fill(~allowed, -1e9)
        h = torch.tanh(torch.softmax(scores, dim=-1) @ v[:, 0] + x @ w["wr"])
        logits = h @ w["wout"] + w["pos"][position_ids] @ w["wpo"] + w["bout"]
        ramp = torch.clamp(position_ids[..., None].double() - w["ramp_start"], min=0) * w["ramp_slope"]
        logits[..., w["ramp_ids"]] += ramp
        logits = logits.float()
        if self.noise is not None:
            logits = logits + (torch.rand(logits.shape, generator=self.noise) * 2 - 1) * NOISE
        return CausalLMOutputWithPast(logits=logits, past_key_values=((k, v),))


def make_model(upstream, weights):
    cls = upstream.InternLMXComposer2ForCausalLM
    ToyLM.prepare_inputs_for_generation = cls.prepare_inputs_for_generation
    ToyLM._reorder_cache = staticmethod(cls._reorder_cache)
    config = ToyConfig(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS_A, pad_token_id=None,
                       max_position_embeddings=MAX_POS)
    model = ToyLM(config, weights).eval()
    model.generation_config = GenerationConfig.from_model_config(config)
    return model


# Cases: rows are ("embeds", length) prompts (the image-chat path: HF starts `input_ids` at [<s>]) or
# ("ids", length) prompts (the text-only chat path: `input_ids` are the prompt). Several rows run as
# one left-padded batch, and each row also alone.
CHAT_EOS = [EOS_A, EOS_B]
ROWS3 = [("embeds", 4), ("embeds", 7), ("embeds", 11)]
CASES = [
    dict(name="greedy", rows=ROWS3, kw=dict(eos_token_id=CHAT_EOS, max_new_tokens=22)),
    dict(name="greedy_rep1005", rows=ROWS3, kw=dict(eos_token_id=CHAT_EOS, max_new_tokens=22,
                                                    repetition_penalty=1.005)),
    dict(name="greedy_rep13", rows=ROWS3, kw=dict(eos_token_id=CHAT_EOS, max_new_tokens=22,
                                                  repetition_penalty=1.3)),
    # prompts where penalising the leading <s> changes the ids: what a bos-free start (later transformers,
    # or prompt_ids=[]) would generate is stored too
    dict(name="greedy_rep13_bos_race", rows=[("embeds", 6), ("embeds", 9)], bos_race=True,
         kw=dict(eos_token_id=CHAT_EOS, max_new_tokens=22, repetition_penalty=1.3)),
    dict(name="greedy_rep3", rows=[("embeds", 6)], kw=dict(max_new_tokens=22, repetition_penalty=3.0)),
    dict(name="greedy_ids_prompt", rows=[("ids", 8)], kw=dict(eos_token_id=CHAT_EOS, max_new_tokens=22,
                                                              repetition_penalty=1.3)),
    dict(name="greedy_ids_batch_pad0", rows=[("ids", 5), ("ids", 9)],
         kw=dict(eos_token_id=CHAT_EOS, pad_token_id=0, max_new_tokens=25, repetition_penalty=1.2)),
    dict(name="greedy_min_length", rows=ROWS3, kw=dict(eos_token_id=CHAT_EOS, max_new_tokens=22,
                                                       min_length=14)),
    dict(name="greedy_min_new_tokens", rows=ROWS3, kw=dict(eos_token_id=CHAT_EOS, max_new_tokens=22,
                                                           min_new_tokens=16)),
    dict(name="greedy_eos_int", rows=[("embeds", 5), ("embeds", 10)], kw=dict(eos_token_id=EOS_B,
                                                                              max_new_tokens=22)),
    dict(name="greedy_pad0", rows=ROWS3, kw=dict(eos_token_id=CHAT_EOS, pad_token_id=0, max_new_tokens=22)),
    dict(name="greedy_max_length", rows=[("embeds", 6)], kw=dict(eos_token_id=CHAT_EOS, max_length=9)),
    dict(name="greedy_stop_word", rows=[("embeds", 9)], stop_at=3,
         kw=dict(eos_token_id=CHAT_EOS, max_new_tokens=22, repetition_penalty=1.005)),
    dict(name="beam3_stop_word", rows=[("embeds", 8)], stop_at=5,
         kw=dict(num_beams=3, eos_token_id=CHAT_EOS, max_new_tokens=22)),
    dict(name="sample_topk1", rows=ROWS3, kw=dict(do_sample=True, temperature=0.7, top_k=1,
                                                  eos_token_id=CHAT_EOS, max_new_tokens=22,
                                                  repetition_penalty=1.3)),
    dict(name="sample_topp_tiny", rows=[("embeds", 8)], kw=dict(do_sample=True, top_p=1e-4,
                                                                eos_token_id=CHAT_EOS, max_new_tokens=22)),
    dict(name="beam2_rep3", rows=[("embeds", 6)], kw=dict(num_beams=2, repetition_penalty=3.0,
                                                          max_new_tokens=22)),
    dict(name="beam3_batch", rows=ROWS3, kw=dict(num_beams=3, eos_token_id=CHAT_EOS, max_new_tokens=22)),
    dict(name="beam4_batch_rep1005", rows=ROWS3, kw=dict(num_beams=4, eos_token_id=CHAT_EOS,
                                                         max_new_tokens=22, repetition_penalty=1.005)),
    dict(name="beam2_short", rows=[("embeds", 5), ("embeds", 12)], kw=dict(num_beams=2, eos_token_id=CHAT_EOS,
                                                                           max_new_tokens=6)),
    dict(name="beam3_eos_order", rows=ROWS3, kw=dict(num_beams=3, eos_token_id=[EOS_B, EOS_A],
                                                     max_new_tokens=22)),
    dict(name="beam3_early_true", rows=ROWS3, kw=dict(num_beams=3, eos_token_id=CHAT_EOS, max_new_tokens=22,
                                                      early_stopping=True)),
    dict(name="beam3_early_never", rows=ROWS3, kw=dict(num_beams=3, eos_token_id=CHAT_EOS, max_new_tokens=22,
                                                       early_stopping="never")),
    dict(name="beam3_min_new_tokens", rows=ROWS3, kw=dict(num_beams=3, eos_token_id=CHAT_EOS,
                                                          max_new_tokens=22, min_new_tokens=20)),
    dict(name="beam2_ids_prompt", rows=[("ids", 7)], kw=dict(num_beams=2, eos_token_id=CHAT_EOS,
                                                             max_new_tokens=22, repetition_penalty=1.3)),
    dict(name="beam_sample2_topk2", rows=ROWS3, kw=dict(do_sample=True, num_beams=2, top_k=2, temperature=0.8,
                                                        eos_token_id=CHAT_EOS, max_new_tokens=22,
                                                        repetition_penalty=1.005)),
    dict(name="beam_sample3_topk2", rows=[("embeds", 9)], kw=dict(do_sample=True, num_beams=3, top_k=2,
                                                                  eos_token_id=CHAT_EOS, max_new_tokens=22)),
]
for beams in (2, 3, 4):
    for lp in (1.0, 0.5, 2.0, -1.0):
        CASES.append(dict(name=f"beam{beams}_lp{lp}", rows=[("embeds", 5), ("embeds", 10)],
                          kw=dict(num_beams=beams, length_penalty=lp, eos_token_id=CHAT_EOS,
                                  max_new_tokens=22)))


def make_prompts(rows, weights, seed):
    rng = np.random.default_rng(seed)
    prompts = []
    for kind, length in rows:
        if kind == "embeds":
            prompts.append(dict(kind=kind, embeds=rng.standard_normal((length, WIDTH)).astype(np.float32)))
        else:
            ids = rng.integers(3, EOS_B, size=length)
            prompts.append(dict(kind=kind, ids=ids, embeds=weights["embed"][ids]))
    return prompts


def hf_generate(model, prompts, kw, stopping_criteria=None, streamer=None, noise_seed=None):
    """Left-pads `prompts` into one batch and runs `generate`; returns the sequences as a list of lists."""
    model.noise = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)
    kw = dict(kw)
    longest = max(len(p["embeds"]) for p in prompts)
    mask = np.zeros((len(prompts), longest), dtype=np.int64)
    for i, p in enumerate(prompts):
        mask[i, longest - len(p["embeds"]):] = 1
    extra = dict(stopping_criteria=stopping_criteria) if stopping_criteria is not None else {}
    if streamer is not None:
        extra["streamer"] = streamer
    if len(prompts) > 1:
        extra["attention_mask"] = torch.from_numpy(mask)
    torch.manual_seed(0)
    with torch.no_grad():
        if prompts[0]["kind"] == "ids":
            ids = np.zeros((len(prompts), longest), dtype=np.int64)  # pad id 0 on the left
            for i, p in enumerate(prompts):
                ids[i, longest - len(p["ids"]):] = p["ids"]
            out = model.generate(input_ids=torch.from_numpy(ids), **extra, **kw)
        else:
            embeds = np.zeros((len(prompts), longest, WIDTH), dtype=np.float32)
            for i, p in enumerate(prompts):
                embeds[i, longest - len(p["embeds"]):] = p["embeds"]
            im_mask = torch.zeros(embeds.shape[:2], dtype=torch.bool)
            out = model.generate(inputs_embeds=torch.from_numpy(embeds), im_mask=im_mask, **extra, **kw)
    model.noise = None
    return out.tolist()


class TailRecorder(StoppingCriteria):
    """Records the last id of every row at each step; never stops."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores, **kwargs):
        self.steps.append(input_ids[:, -1].tolist())
        return False


class PenaltyAfterFirstId:
    """HF's repetition penalty over the running ids except the leading <s>."""

    def __init__(self, penalty):
        self.inner = RepetitionPenaltyLogitsProcessor(penalty)

    def __call__(self, input_ids, scores):
        return self.inner(input_ids[:, 1:], scores)


def stable_run(model, prompts, kw, make_criteria=lambda: None, without_bos_penalty=False):
    """The sequences, or None when a +-1e-4 perturbation of the logits changes them."""
    if without_bos_penalty:
        kw = dict(kw)
        penalty = kw.pop("repetition_penalty")
        make_criteria, kw["logits_processor"] = (lambda: None), LogitsProcessorList([PenaltyAfterFirstId(penalty)])
    try:
        clean = hf_generate(model, prompts, kw, make_criteria())
        for noise_seed in range(1, 5):
            if hf_generate(model, prompts, kw, make_criteria(), noise_seed=noise_seed) != clean:
                return None
    except ValueError as e:
        # beam sampling draws 2 * num_beams candidates; with two eos ids they can all be eos, and HF
        # 4.33 then raises (so would upstream's chat(num_beams > 1, do_sample=True))
        if "can be equal to `eos_token_id" not in str(e):
            raise
        return None
    return clean


def run_case(case, model, upstream, weights, arrays):
    for attempt in range(40):
        seed = 1000 * (zlib.crc32(case["name"].encode()) % 100000) + attempt
        prompts = make_prompts(case["rows"], weights, seed)
        kw = dict(case["kw"])
        make_criteria = lambda: None  # noqa: E731
        if "stop_at" in case:
            # a stop word that the FIRST row (with beams: the best running beam) reaches at step stop_at,
            # and that no other row reaches before: a criterion watching any other row would differ
            tails = TailRecorder()
            if stable_run(model, prompts, kw) is None:
                continue
            hf_generate(model, prompts, kw, StoppingCriteriaList([tails]))
            if len(tails.steps) <= case["stop_at"]:
                continue
            stop_id = tails.steps[case["stop_at"]][0]
            earlier = [t[0] for t in tails.steps[:case["stop_at"]]]
            others = [i for t in tails.steps[:case["stop_at"] + 1] for i in t[1:]]
            if stop_id in CHAT_EOS or stop_id in earlier or stop_id in others:
                continue
            case["stop_id"] = int(stop_id)
            make_criteria = lambda: StoppingCriteriaList(  # noqa: E731
                [upstream.StoppingCriteriaSub(stops=[torch.tensor([stop_id])])])
        batched = stable_run(model, prompts, kw, make_criteria)
        if batched is None:
            continue
        if case.get("bos_race"):
            bos_free = stable_run(model, prompts, kw, without_bos_penalty=True)
            if bos_free is None or all(a == b for a, b in zip(bos_free, batched)):
                continue
            case["bos_free"] = bos_free
        alone = [stable_run(model, [p], kw, make_criteria) for p in prompts] if len(prompts) > 1 else [batched[0]]
        if any(a is None for a in alone):
            continue
        alone = [a[0] for a in alone] if len(prompts) > 1 else alone
        break
    else:
        raise RuntimeError(f"case {case['name']}: no prompt set with decisions robust to {NOISE}")
    for i, p in enumerate(prompts):
        arrays[f"prompt/{case['name']}/{i}"] = p["ids"] if p["kind"] == "ids" else p["embeds"]
    return dict(name=case["name"], rows=[kind for kind, _ in case["rows"]], kwargs=kw,
                stop_id=case.get("stop_id"), prompt_seed=seed, sequences=batched, alone=alone,
                bos_free=case.get("bos_free"))


def streamer_puts(model, weights):
    """What HF hands a streamer during greedy generation: the prompt ids first, then one token a step."""
    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(["put", value.tolist()])

        def end(self):
            self.calls.append(["end"])

    prompts = make_prompts([("embeds", 7)], weights, 77)
    kw = dict(eos_token_id=CHAT_EOS, max_new_tokens=22, repetition_penalty=1.005)
    assert stable_run(model, prompts, kw) is not None
    rec = Recorder()
    seqs = hf_generate(model, prompts, kw, streamer=rec)
    return dict(prompt_key="prompt/streamer/0", kwargs=kw, calls=rec.calls, sequences=seqs), prompts[0]["embeds"]


def warper_cases(model):
    """Processed scores and probabilities of HF's processor + warper chains on random logits."""
    settings = [
        dict(do_sample=True, top_p=0.8),  # chat() defaults (top_k=50 from GenerationConfig)
        dict(do_sample=True, top_p=0.8, top_k=40, repetition_penalty=1.005),  # write_artical
        dict(do_sample=True, temperature=0.7, top_k=0, top_p=0.9),
        dict(do_sample=True, temperature=1.6, top_k=5),
        dict(do_sample=True, temperature=0.5, top_k=0, top_p=0.3, repetition_penalty=1.3),
        dict(do_sample=True, top_k=1, num_beams=2),  # min_tokens_to_keep=2 with beams
        dict(do_sample=True, top_k=0, top_p=0.01, num_beams=3),
        dict(do_sample=True, repetition_penalty=3.0, min_length=12, eos_token_id=[EOS_A, EOS_B]),
        dict(do_sample=True, top_k=0, min_new_tokens=4, eos_token_id=EOS_B, temperature=1.3),
    ]
    out = []
    for attempt in range(50):
        rng = np.random.default_rng(31337 + attempt)
        logits = (3.0 * rng.standard_normal((5, VOCAB))).astype(np.float32)
        # row 4 sums to nearly one in its top tokens, which pushes top_p to its min_tokens_to_keep limit
        logits[4, :3] += 12.0
        input_ids = rng.integers(0, VOCAB, size=(5, 6))
        input_ids[:, 0] = BOS
        out, ok = [], True
        for s in settings:
            gc = GenerationConfig(**{**model.generation_config.to_dict(), **s})
            processors = model._get_logits_processor(
                generation_config=gc, input_ids_seq_length=3, encoder_input_ids=torch.from_numpy(input_ids),
                prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(),
                model_kwargs=dict(use_cache=True))
            warpers = model._get_logits_warper(gc)
            ids_t = torch.from_numpy(input_ids)
            processed = processors(ids_t, torch.from_numpy(logits.copy()))
            warped = warpers(ids_t, processed.clone())
            probs = torch.softmax(warped, dim=-1)
            top_p = gc.top_p if gc.top_p is not None else 1.0
            if top_p < 1.0:  # the cut must not sit within float noise of a cumulative sum
                pre_top_p = LogitsProcessorList([w for w in warpers if type(w).__name__ != "TopPLogitsWarper"])
                x = pre_top_p(ids_t, processed.clone()).double()
                cum = torch.sort(torch.softmax(x, -1), dim=-1)[0].cumsum(-1)
                if (cum - (1 - top_p)).abs().min() < 1e-5:
                    ok = False
            out.append(dict(settings=s, probs=probs.numpy()))
        if ok:
            return logits, input_ids, out
    raise RuntimeError("no warper logits with a top_p cut clear of float noise")


def scorer_traces():
    """HF's BeamSearchScorer driven directly with random ranked candidates, many of them eos at every rank,
    for each early-stopping mode and several length penalties: each step's inputs and outputs, and the
    finalized sequences. These reach corners the toy LM rarely does (eos below the top num_beams,
    "never" bounds, hypotheses evicted from a full list)."""
    rng = np.random.default_rng(4242)
    traces = []
    settings = [(2, 1.0, False, [EOS_A, EOS_B], 9), (3, 0.7, False, [EOS_A], 10),
                (3, 2.0, "never", [EOS_A, EOS_B], 12), (2, 1.0, "never", [EOS_A], 12),
                (4, -0.5, "never", [EOS_B], 8), (2, 1.5, True, [EOS_A, EOS_B], 9), (4, 1.0, True, [EOS_A], 8),
                (3, 0.0, False, [EOS_B, EOS_A], 12)]
    for nb, lp, early, eos, steps in settings * 2:
        batch, n_eos = 2, len(eos)
        k = (1 + n_eos) * nb
        max_length = 1 + steps
        scorer = BeamSearchScorer(batch_size=batch, num_beams=nb, device="cpu", length_penalty=lp,
                                  do_early_stopping=early, max_length=max_length)
        ids = torch.full((batch * nb, 1), BOS, dtype=torch.long)
        beam_scores = torch.zeros(batch * nb)
        record = []
        for step in range(steps):
            scores = np.sort(-0.6 * (step + 1) - rng.uniform(0, 2.5, size=(batch, k)), axis=1)[:, ::-1]
            tokens = rng.integers(3, EOS_B, size=(batch, k))
            for b in range(batch):
                n = rng.integers(0, n_eos * nb + 1)
                tokens[b, rng.choice(k, size=n, replace=False)] = rng.choice(eos, size=n)
            indices = rng.integers(0, nb, size=(batch, k))
            t_scores = torch.from_numpy(scores.astype(np.float32).copy())
            out = scorer.process(ids, t_scores, torch.from_numpy(tokens), torch.from_numpy(indices),
                                 pad_token_id=0, eos_token_id=eos)
            beam_scores = out["next_beam_scores"]
            record.append(dict(scores=t_scores.tolist(), tokens=tokens.tolist(), indices=indices.tolist(),
                               out_scores=beam_scores.tolist(), out_tokens=out["next_beam_tokens"].tolist(),
                               out_rows=out["next_beam_indices"].tolist(), done=scorer._done.tolist()))
            ids = torch.cat([ids[out["next_beam_indices"]], out["next_beam_tokens"][:, None]], dim=-1)
            if scorer.is_done:
                break
        final = scorer.finalize(ids, beam_scores, None, None, max_length=max_length, pad_token_id=0,
                                eos_token_id=eos)
        traces.append(dict(num_beams=nb, length_penalty=lp, early_stopping=early, eos=eos, batch=batch,
                           max_length=max_length, steps=record, sequences=final["sequences"].tolist()))
    return traces


def streamer_text_case(upstream_dir):
    """HF TextStreamer chunks for a mixed English / Chinese / newline / byte-fallback text, with every
    `decode` call it made, so that a test can replay the tokenizer without sentencepiece."""
    tok = U.upstream_tokenizer(upstream_dir)
    text = "Hello world, this is a streamed reply.\n第二行：你好世界 and mixed words 🚀 end."
    ids = tok.encode(text, add_special_tokens=False)

    class LoggingTokenizer:
        def __init__(self):
            self.calls = []

        def decode(self, token_ids, **kwargs):
            result = tok.decode(token_ids, **kwargs)
            self.calls.append([list(map(int, token_ids)), kwargs, result])
            return result

    cases = []
    for skip_prompt in (True, False):
        logger = LoggingTokenizer()

        class Capture(TextStreamer):
            chunks = []

            def on_finalized_text(self, text, stream_end=False):
                self.chunks.append([text, stream_end])

        Capture.chunks = []
        streamer = Capture(logger, skip_prompt=skip_prompt, skip_special_tokens=True)
        streamer.put(torch.tensor([[BOS]]))
        for t in ids:
            streamer.put(torch.tensor([t]))
        streamer.end()
        cases.append(dict(skip_prompt=skip_prompt, prompt=[BOS], token_ids=ids, chunks=Capture.chunks,
                          decode_calls=logger.calls))
    return dict(text=text, cases=cases)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="directory of the upstream IXC python files")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if transformers.__version__ != "4.33.2":
        raise SystemExit(f"transformers 4.33.2 required (upstream's target), found {transformers.__version__}")
    transformers.logging.set_verbosity_error()
    upstream = U.import_upstream(args.upstream).modeling_xcomposer2
    weights = toy_weights()
    model = make_model(upstream, weights)
    arrays = {f"toy/{k}": v for k, v in weights.items()}

    cases = [run_case(c, model, upstream, weights, arrays) for c in CASES]
    streamer, streamer_prompt = streamer_puts(model, weights)
    arrays["prompt/streamer/0"] = streamer_prompt

    # the toy's own logits, so that a test can tell a toy-model mismatch from a decoding mismatch
    probe = make_prompts(ROWS3, weights, 5)
    embeds = np.zeros((3, 11, WIDTH), dtype=np.float32)
    mask = np.zeros((3, 11), dtype=np.int64)
    for i, p in enumerate(probe):
        embeds[i, 11 - len(p["embeds"]):] = p["embeds"]
        mask[i, 11 - len(p["embeds"]):] = 1
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    pos[mask == 0] = 1
    with torch.no_grad():
        out = model(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos))
        nxt = torch.tensor([[5], [EOS_B], [BOS]])
        mask2 = torch.cat([torch.from_numpy(mask), torch.ones(3, 1, dtype=torch.long)], 1)
        out2 = model(input_ids=nxt, attention_mask=mask2, position_ids=torch.from_numpy(pos[:, -1:] + 1),
                     past_key_values=out.past_key_values)
    arrays.update({"probe/embeds": embeds, "probe/mask": mask, "probe/prefill_logits": out.logits[:, -1].numpy(),
                   "probe/step_ids": nxt[:, 0].numpy(), "probe/step_logits": out2.logits[:, -1].numpy()})

    logits, input_ids, warps = warper_cases(model)
    arrays["warp/logits"], arrays["warp/input_ids"] = logits, input_ids
    warp_meta = []
    for i, w in enumerate(warps):
        arrays[f"warp/{i}/probs"] = w["probs"]
        warp_meta.append(dict(settings=w["settings"], ids_length=3))

    text = streamer_text_case(args.upstream)
    os.makedirs(args.out, exist_ok=True)
    np.savez_compressed(os.path.join(args.out, "toy_lm.npz"), **arrays)
    meta = dict(
        generator="tools/reference/make_generation_fixtures.py",
        versions=dict(transformers=transformers.__version__, torch=torch.__version__),
        toy=dict(vocab=VOCAB, width=WIDTH, max_pos=MAX_POS, bos=BOS, eos=CHAT_EOS,
                 model_bos_token_id=BOS, model_eos_token_id=EOS_A),
        cases=cases, streamer_generation=streamer, warp=warp_meta, text_streamer=text, scorer=scorer_traces(),
    )
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(meta, f, ensure_ascii=False, separators=(",", ":"))
    summarize(cases, model, arrays)


def summarize(cases, model, arrays):
    """Prints, per case, how rows ended, and whether beam search chose other ids than greedy would."""
    for c in cases:
        ends = []
        for s in c["alone"]:
            eos = c["kwargs"].get("eos_token_id", EOS_A)
            eos = eos if isinstance(eos, list) else [eos]
            hit = [i for i, t in enumerate(s[1:]) if t in eos]
            ends.append(f"eos@{hit[0] + 1}" if hit else f"len{len(s) - 1}")
        note = ""
        if c["kwargs"].get("num_beams", 1) > 1:
            kw = {k: v for k, v in c["kwargs"].items() if k not in ("num_beams", "length_penalty", "early_stopping",
                                                                   "do_sample", "top_k", "temperature")}
            prompts = [dict(kind=kind, ids=arrays[f"prompt/{c['name']}/{i}"] if kind == "ids" else None,
                            embeds=(model.w["embed"].float().numpy()[arrays[f"prompt/{c['name']}/{i}"]]
                                    if kind == "ids" else arrays[f"prompt/{c['name']}/{i}"]))
                       for i, kind in enumerate(c["rows"])]
            greedy = [hf_generate(model, [p], kw)[0] for p in prompts]
            note = f"differs_from_greedy={[g != a[:len(g)] or len(g) != len(a) for g, a in zip(greedy, c['alone'])]}"
        print(f"{c['name']:24s} ends={ends} {note}")


if __name__ == "__main__":
    main()
