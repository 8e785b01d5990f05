"""Upstream's own bf16 error, the yardstick of our bf16-product mode (issue #15): tests/fixtures/bf16/.

    /work/venv-ref/bin/python tools/reference/make_bf16_fixtures.py --upstream /work/upstream/base \
        --out tests/fixtures [--only tiny release]

The upstream IXC2.5 model (upstream.py, our seeded weights) runs twice on the same inputs: in float32, and
in bfloat16 as upstream runs on a GPU (`model.to(torch.bfloat16)`, every floating input cast to bf16: the
decoder's inputs_embeds, the image pixels; upstream itself casts the logits to float32 before the loss),
here with CPU torch. What is stored, per case, are both runs' outputs at seeded rows and columns, so that a
test measures three errors on the same elements: upstream bf16 vs upstream fp32 (the allowance), ours
(bf16 products) vs upstream fp32, ours (exact) vs upstream fp32. cases.json also holds the allowance
measured over the whole tensors, for the record.

Inputs are those of existing fixtures (read here from tests/fixtures/model, referenced in cases.json,
not copied):
- tiny model (`tiny`, seed 0):
  - `decoder_base_long`, `decoder_web_short`: logits of the decoder cases of the same name (1000 rows of
    which 841 image rows, infer_mode base; 300 rows of which 141 image rows, infer_mode web);
  - `vision_coffee`: image embeddings (ViT, HD merge, projector: `img2emb`) of vision_coffee's canvas;
  - `train_loss`: upstream's training forward `model(samples=...)` (interleav_wrap: tokenizer, ViT,
    projector, mask_human_targets, padding; CrossEntropyLoss) on two conversations, each with one image
    (the canvases of vision_coffee and vision_rocket_portrait, 841 tokens each), as one micro-batch
    (`loss_pair`) and the first alone (`loss_first`). The ids, labels, masks and image spans upstream
    built are stored, for the test to build the same micro-batch;
- release widths (`release_widths` of make_model_fixtures.py: hidden 4096, 32/8 heads, 14336, PLoRA 256,
  ViT 1024 wide; 2 decoder and 2 ViT layers, vocab 1024; seed 1): image embeddings of the coffee canvas
  and the logits of release_widths' decoder input (its token_ids and image_block).
"""
import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import upstream as U  # noqa: E402
from make_model_fixtures import (SPECIAL_IDS, Writer, mask_edges, normalise_like_torch,  # noqa: E402
                                 release_widths_config, seeded_subset, t2n, versions)

from mindxcomposer.demo import tiny_config  # noqa: E402

GROUPS = ("tiny", "release")
BF16 = torch.bfloat16

# Conversations of the training-loss case, in upstream finetune/data_mix.py conv2text's format
# ([UNUSED_TOKEN_146]role\n value [UNUSED_TOKEN_145]\n per turn, then </s>).
TRAIN_CONVERSATIONS = (
    ("vision_coffee", [
        ("user", "<ImageHere>What is in this picture?"),
        ("assistant", "A small cup of coffee on a saucer. The milk foam on top has been poured into the shape "
                      "of a leaf, with a thin ring of brown crema around it."),
        ("user", "Where is the cup standing?"),
        ("assistant", "On a wooden table, lit by soft daylight from the left."),
    ]),
    ("vision_rocket_portrait", [
        ("user", "<ImageHere>Describe the photo in two sentences."),
        ("assistant", "A rocket stands on its launch pad under a clear sky, surrounded by service towers. "
                      "A white cloud of vapour drifts around its base."),
    ]),
)


def conv2text(turns):
    return "".join(f"[UNUSED_TOKEN_146]{role}\n{text.strip()}[UNUSED_TOKEN_145]\n" for role, text in turns) + "</s>"


def fixture(out, group, name):
    return np.load(os.path.join(out, group, f"{name}.npz"))


def errors(ours, ref):
    """max |a - b| and RMS(a - b), in float64."""
    d = np.asarray(ours, np.float64) - np.asarray(ref, np.float64)
    return {"max_abs": float(np.abs(d).max()), "rms": float(np.sqrt(np.mean(d * d)))}


def load_bf16(up_dir, config, seed):
    """The upstream model as upstream runs it in bf16: built and loaded as the fp32 one, then `.to(bf16)`.
    Buffers too: RoPE's cos/sin caches become the bf16 rounding of the fp32 ones, as under
    `from_pretrained(torch_dtype=torch.bfloat16)`; its inv_freq becomes bf16, which only matters when a
    sequence outgrows the cache (none here does: 1000 rows at most, cache 1024 / 32768)."""
    return U.load_upstream(up_dir, config, seed=seed).to(BF16)


def pixels(canvas):
    return torch.from_numpy(normalise_like_torch(canvas))[None]


def logits_of(model, embeds, im_mask, infer_mode, dtype):
    with torch.no_grad():
        out = model(inputs_embeds=embeds.to(dtype)[None], im_mask=im_mask[None], infer_mode=infer_mode,
                    use_cache=False, return_dict=True)
    return out.logits[0].float()


def img2emb(model, canvas, dtype):
    with torch.no_grad():
        return model.img2emb(pixels(canvas).to(dtype))[0][0].float()


def pair_meta(ref32, ref16, stored32, stored16, **meta):
    """Meta of a case: where its inputs come from, and upstream bf16's error (stored elements, all)."""
    return dict(meta, upstream_bf16_error={"stored": errors(stored16, stored32), "all": errors(t2n(ref16), t2n(ref32))})


# ----------------------------------------------------------------------------------------------
# Tiny model

DECODER_CASES = (("decoder_base_long", 64, 30), ("decoder_web_short", 64, 31))  # source case, rows, seed
N_LOGIT_COLS = 128
N_IMAGE_ROWS = 128


def make_tiny(up_dir, out, w, checks):
    config = tiny_config()
    w.config("tiny", config)
    model = U.load_upstream(up_dir, config, seed=0)
    model16 = load_bf16(up_dir, config, 0)
    cases = json.load(open(os.path.join(out, "model", "cases.json"), encoding="utf-8"))["cases"]

    for name, n_rows, seed in DECODER_CASES:
        src = fixture(out, "model", name)
        mode = cases[name]["infer_mode"]
        embeds, im_mask = torch.from_numpy(src["inputs_embeds"]), torch.from_numpy(src["im_mask"])
        l32 = logits_of(model, embeds, im_mask, mode, torch.float32)
        l16 = logits_of(model16, embeds, im_mask, mode, BF16)
        # The fp32 run is the model fixture's (same code, weights and inputs).
        same = np.abs(t2n(l32)[src["rows"]][:, src["logits_cols"]] - src["logits"]).max()
        checks[f"{name}_fp32_vs_model_fixture_logits"] = float(same)
        if same > 1e-5:
            raise AssertionError(f"{name}: fp32 logits differ from tests/fixtures/model by {same}")
        rows = seeded_subset(len(embeds), n_rows, seed=seed, must=mask_edges(src["im_mask"]))
        cols = seeded_subset(config.vocab_size, N_LOGIT_COLS, seed=seed + 100, must=SPECIAL_IDS)
        a32, a16 = t2n(l32)[rows][:, cols], t2n(l16)[rows][:, cols]
        w.case(name, pair_meta(l32, l16, a32, a16, kind="decoder_logits", config="tiny", seed=0,
                               infer_mode=mode, inputs_from=f"model/{name}.npz (inputs_embeds, im_mask)",
                               seq_len=len(embeds), image_rows=int(src["im_mask"].sum())),
               dict(rows=rows, cols=cols, logits_fp32=a32, logits_bf16=a16))

    src = fixture(out, "model", "vision_coffee")
    e32, e16 = img2emb(model, src["canvas"], torch.float32), img2emb(model16, src["canvas"], BF16)
    same = np.abs(t2n(e32) - src["image_embeds"]).max()
    checks["vision_coffee_fp32_vs_model_fixture_image_embeds"] = float(same)
    if same > 1e-5:
        raise AssertionError(f"vision_coffee: fp32 image embeddings differ from tests/fixtures/model by {same}")
    rows = seeded_subset(e32.shape[0], N_IMAGE_ROWS, seed=32, must=(0, 19, 20, 419, 420, 421, 440, e32.shape[0] - 1))
    a32, a16 = t2n(e32)[rows], t2n(e16)[rows]
    w.case("vision_coffee", pair_meta(e32, e16, a32, a16, kind="image_embeds", config="tiny", seed=0,
                                      inputs_from="model/vision_coffee.npz (canvas)", hd_num=1),
           dict(rows=rows, image_embeds_fp32=a32, image_embeds_bf16=a16))

    make_train_loss(model, model16, out, w, checks)


class TrainCapture:
    """Wraps upstream's interleav_wrap and mask_human_targets to record the micro-batch they build."""

    def __init__(self, model):
        self.model = model
        self.tokens, self.batch = [], None

    def __enter__(self):
        m = self.model
        self._wrap, self._mask = m.interleav_wrap, m.mask_human_targets

        def mask_human_targets(input_ids, *a, **k):
            self.tokens.append(t2n(input_ids[0]).astype(np.int64))
            return self._mask(input_ids, *a, **k)

        def interleav_wrap(*a, **k):
            out = self._wrap(*a, **k)
            self.batch = out
            return out

        m.mask_human_targets, m.interleav_wrap = mask_human_targets, interleav_wrap
        return self

    def __exit__(self, *exc):
        del self.model.mask_human_targets, self.model.interleav_wrap


def train_forward(model, texts, canvases, dtype):
    """Upstream's training forward (eval mode: PLoRA's dropout off) -> (loss, recorded micro-batch)."""
    samples = {"data_type": ["multi"], "text_input": [list(texts)],
               "image": [[pixels(c).to(dtype) for c in canvases]]}
    with torch.no_grad(), TrainCapture(model) as cap:
        loss = model(samples=samples, return_dict=True).loss
    embeds, attention_mask, targets, im_mask = cap.batch
    L = embeds.shape[1]
    ids = np.full((len(texts), L), model.tokenizer.pad_token_id, np.int64)
    for i, t in enumerate(cap.tokens):
        ids[i, :min(len(t), L)] = t[:L]
    batch = dict(input_ids=ids, attention_mask=t2n(attention_mask).astype(np.int64),
                 labels=t2n(targets).astype(np.int64), im_mask=t2n(im_mask).astype(bool))
    if not np.array_equal(batch["im_mask"], ids == -100) or not np.array_equal(batch["attention_mask"] > 0,
                                                                               np.arange(L)[None] < np.array([len(t) for t in cap.tokens])[:, None]):
        raise AssertionError("the recorded ids do not fit upstream's im_mask / attention_mask")
    return float(loss), batch


def image_spans(im_mask):
    spans = []
    for row, m in enumerate(im_mask):
        edges = np.flatnonzero(np.diff(np.r_[0, m.astype(np.int8), 0]))
        spans += [(row, int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2])]
    return np.asarray(spans, np.int64)


def make_train_loss(model, model16, out, w, checks):
    canvases = [fixture(out, "model", src)["canvas"] for src, _ in TRAIN_CONVERSATIONS]
    texts = [conv2text(turns) for _, turns in TRAIN_CONVERSATIONS]
    arrays, meta = {}, {}
    for key, n in (("pair", 2), ("first", 1)):
        l32, b32 = train_forward(model, texts[:n], canvases[:n], torch.float32)
        l16, b16 = train_forward(model16, texts[:n], canvases[:n], BF16)
        for k in b32:
            if not np.array_equal(b32[k], b16[k]):
                raise AssertionError(f"train_loss {key}: the bf16 run built another {k}")
        spans = image_spans(b32["im_mask"])
        if [s[2] for s in spans] != [841] * n:
            raise AssertionError(f"train_loss {key}: image spans {spans.tolist()}")
        arrays.update({f"{key}/{k}": v for k, v in b32.items()})
        arrays[f"{key}/image_spans"] = spans
        arrays[f"loss_{key}_fp32"] = np.float32(l32)
        arrays[f"loss_{key}_bf16"] = np.float32(l16)
        meta[f"loss_{key}"] = {"samples": n, "length": int(b32["input_ids"].shape[1]),
                               "supervised_tokens": int((b32["labels"][:, 1:] != -100).sum()),
                               "fp32": l32, "bf16": l16, "upstream_bf16_error": abs(l16 - l32)}
    w.case("train_loss", dict(kind="train_loss", config="tiny", seed=0, texts=texts,
                              canvases_from=[src for src, _ in TRAIN_CONVERSATIONS],
                              note="micro-batch k: `k/input_ids` (-100 on image rows, the tokenizer's pad id on "
                                   "padding), `k/attention_mask`, `k/labels`, `k/im_mask`, `k/image_spans` (row, "
                                   "start, length); image i of the micro-batch is the `canvas` of "
                                   "model/<canvases_from[i]>.npz", **meta),
           arrays)


# ----------------------------------------------------------------------------------------------
# Release widths

RELEASE_LOGIT_ROWS, RELEASE_LOGIT_COLS = 48, 256
RELEASE_IMAGE_ROWS, RELEASE_HIDDEN_COLS = 48, 256


def make_release(up_dir, out, w, checks):
    config = release_widths_config()
    w.config("release_widths", config)
    t0 = time.time()
    model = U.load_upstream(up_dir, config, seed=1)
    t_build = time.time() - t0
    canvas = fixture(out, "model", "vision_coffee")["canvas"]
    src = fixture(out, "model", "release_widths")
    ids, image_block, im_mask = src["token_ids"], torch.from_numpy(src["image_block"]), torch.from_numpy(src["im_mask"])

    def decoder_input(m):
        x = m.model.tok_embeddings(torch.from_numpy(np.where(ids < 0, 0, ids)))
        x[torch.from_numpy(ids < 0)] = image_block.to(x.dtype)
        return x

    t0 = time.time()
    e32 = img2emb(model, canvas, torch.float32)
    with torch.no_grad():
        l32 = logits_of(model, decoder_input(model), im_mask, "base", torch.float32)
    t_fp32 = time.time() - t0
    same_e = np.abs(t2n(e32)[src["image_rows"]][:, src["hidden_cols"]] - src["image_embeds"]).max()
    same_l = np.abs(t2n(l32)[src["rows"]] - src["logits"]).max()
    checks["release_fp32_vs_model_fixture_image_embeds"] = float(same_e)
    checks["release_fp32_vs_model_fixture_logits"] = float(same_l)
    if max(same_e, same_l) > 1e-4:
        raise AssertionError(f"release widths: fp32 run differs from tests/fixtures/model ({same_e}, {same_l})")

    model.to(BF16)  # in place: one release-width model in memory
    t0 = time.time()
    e16 = img2emb(model, canvas, BF16)
    with torch.no_grad():
        l16 = logits_of(model, decoder_input(model), im_mask, "base", BF16)
    t_bf16 = time.time() - t0

    img_rows = seeded_subset(e32.shape[0], RELEASE_IMAGE_ROWS, seed=40, must=(0, 20, 420, e32.shape[0] - 1))
    hidden_cols = seeded_subset(config.hidden_size, RELEASE_HIDDEN_COLS, seed=41)
    rows = seeded_subset(len(ids), RELEASE_LOGIT_ROWS, seed=42, must=mask_edges(src["im_mask"]))
    cols = seeded_subset(config.vocab_size, RELEASE_LOGIT_COLS, seed=43, must=(0, 1, 2))
    ie32, ie16 = t2n(e32)[img_rows][:, hidden_cols], t2n(e16)[img_rows][:, hidden_cols]
    lg32, lg16 = t2n(l32)[rows][:, cols], t2n(l16)[rows][:, cols]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    timing = {"build_and_load_s": round(t_build, 1), "fp32_s": round(t_fp32, 1), "bf16_s": round(t_bf16, 1),
              "peak_rss_gib": round(peak, 2)}
    print(f"  release widths: {timing}", flush=True)
    w.case("release_widths", dict(
        kind="release_widths", config="release_widths", seed=1, reference_run=timing,
        inputs_from="image: model/vision_coffee.npz (canvas); decoder: model/release_widths.npz (token_ids, "
                    "image_block: tok_embeddings rows of token_ids, image_block where token_ids == -1)",
        upstream_bf16_error={
            "image_embeds": {"stored": errors(ie16, ie32), "all": errors(t2n(e16), t2n(e32))},
            "logits": {"stored": errors(lg16, lg32), "all": errors(t2n(l16), t2n(l32))}}),
        dict(image_rows=img_rows, hidden_cols=hidden_cols, image_embeds_fp32=ie32, image_embeds_bf16=ie16,
             rows=rows, cols=cols, logits_fp32=lg32, logits_bf16=lg16))


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="folder holding the upstream IXC2.5 .py files")
    p.add_argument("--out", required=True, help="fixtures root (tests/fixtures): reads model/, writes bf16/")
    p.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS))
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    U.import_upstream(args.upstream)
    w = Writer(os.path.join(args.out, "bf16"),
               "Upstream IXC2.5 (PyTorch) in float32 and in bfloat16 on the same inputs, the yardstick of the "
               "bf16-product mode; see README.md.")
    checks = w.data.setdefault("sanity_checks", {})
    t0 = time.time()
    if "tiny" in args.only:
        print("tiny", flush=True)
        make_tiny(args.upstream, args.out, w, checks)
    if "release" in args.only:
        print("release", flush=True)
        make_release(args.upstream, args.out, w, checks)
    out = os.path.relpath(os.path.abspath(args.out), os.getcwd())
    w.save({"versions": versions(), "command": f"/work/venv-ref/bin/python tools/reference/make_bf16_fixtures.py "
                                               f"--upstream {args.upstream} --out {out}"})
    print(json.dumps(checks, indent=1))
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
