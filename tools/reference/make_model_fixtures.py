"""Golden outputs of the upstream PyTorch model for the parity tests of the vision tower, the projector,
the decoder (all infer modes and RoPE variants) and the prompt builder.

    /work/venv-ref/bin/python tools/reference/make_model_fixtures.py --upstream /work/upstream/base \
        --out tests/fixtures [--only vision decoder ntk variants prompt release]

Writes tests/fixtures/model/{cases.json,*.npz} and tests/fixtures/prompt/{cases.json,*.npz}. Every
model is the upstream code (see upstream.py) loaded with `mindxcomposer.demo.random_weights`; every
input is a real photo from tests/assets and real text. Big intermediate arrays are stored at seeded
rows/columns (their indices are stored beside them); inputs and final vision outputs in full.
"""
import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import upstream as U  # noqa: E402

from mindxcomposer.configuration import CLIPVisionConfig, InternLMXComposer2Config  # noqa: E402
from mindxcomposer.demo import random_weights, tiny_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GROUPS = ("vision", "decoder", "ntk", "variants", "prompt", "release")
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# Ids that decide generation (unk, bos, eos, [UNUSED_TOKEN_145], [UNUSED_TOKEN_146]) are always among
# the stored logit columns.
SPECIAL_IDS = (0, 1, 2, 92542, 92543)
N_LOGIT_COLS = 256

# Real text (written for these fixtures), cut to the word counts below to reach each prompt length.
TEXT = (
    "The photograph shows a small cup of coffee resting on a saucer on a wooden table. The foam on top "
    "has been poured into a pattern that looks like a leaf, and a thin ring of brown crema separates the "
    "foam from the rim of the cup. Please look at every part of the picture carefully before answering. "
    "Describe the colours, the light, the textures of the ceramic and the wood, and any reflections you "
    "can see. Then explain how a barista usually prepares such a drink: how the beans are roasted and "
    "ground, how long the water runs through the coffee, what temperature the milk should reach, and why "
    "the foam keeps its shape for a few minutes. If some details are not visible, say so instead of "
    "guessing. After that, write a short story of about five sentences in which this cup of coffee plays "
    "a role on a rainy morning in a busy city. The story should mention a train, an umbrella, an old "
    "friend and a letter that arrives too late. 请用中文再简要总结一次你的回答，不超过三句话。 Finally, give "
    "three practical tips for taking better photographs of food and drinks with a phone camera, covering "
    "the angle, the background and the use of natural light from a window. Keep the whole answer well "
    "structured, use numbered lists where they help, and avoid repeating the same words too often. A "
    "second topic follows. The rocket in the other picture stands on its launch pad under a clear sky, "
    "surrounded by towers, cables and a cloud of white vapour. Compare the quiet scene with the coffee cup "
    "to the tense moments before a launch, and describe which sounds, smells and feelings each scene "
    "might bring to a person standing nearby. Mention the engineers who check the weather, the fuel and "
    "the countdown, and the people at the cafe who simply enjoy their morning."
).split(" ")


def asset(name):
    return os.path.join(REPO, "tests", "assets", name)


def open_image(name, op=None):
    img = Image.open(asset(name))
    if op == "transpose":
        img = img.transpose(Image.TRANSPOSE)
    elif op is not None:
        raise ValueError(op)
    return img


def t2n(x):
    return x.detach().cpu().numpy()


def seeded_subset(total, n, seed, must=()):
    """Sorted indices: all of `must` plus seeded others, n in all (everything when total <= n)."""
    if total <= n:
        return np.arange(total, dtype=np.int64)
    must = np.array(sorted({int(m) for m in must if 0 <= m < total}), dtype=np.int64)
    rest = np.setdiff1d(np.arange(total), must)
    extra = np.random.default_rng(seed).choice(rest, n - len(must), replace=False)
    return np.sort(np.concatenate([must, extra])).astype(np.int64)


def mask_edges(im_mask):
    """Rows on both sides of every text/image boundary, plus the first and last row."""
    m = np.asarray(im_mask, dtype=np.int8)
    edges = np.flatnonzero(np.diff(m)) + 1
    return {0, len(m) - 1} | {int(e) for e in edges} | {int(e) - 1 for e in edges}


class Writer:
    """Collects .npz files and their cases.json entries for one fixture directory."""

    def __init__(self, out_dir, about):
        self.dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.index = os.path.join(out_dir, "cases.json")
        if os.path.isfile(self.index):
            with open(self.index, encoding="utf-8") as f:
                self.data = json.load(f)
        else:
            self.data = {"cases": {}, "configs": {}}
        self.data["about"] = about

    def config(self, name, config):
        self.data["configs"][name] = config.to_dict()

    def case(self, name, meta, arrays):
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        for k, v in arrays.items():
            if v.dtype == np.float64:
                raise TypeError(f"{name}/{k} is float64: fixtures are float32")
        fname = f"{name}.npz"
        np.savez_compressed(os.path.join(self.dir, fname), **arrays)
        meta = dict(meta, file=fname, arrays={
            k: {"shape": list(v.shape), "dtype": str(v.dtype),
                **({"max_abs": float(np.abs(v).max()) if v.size else 0.0} if v.dtype.kind == "f" else {})}
            for k, v in arrays.items()})
        self.data["cases"][name] = meta
        size = os.path.getsize(os.path.join(self.dir, fname))
        scales = ", ".join(f"{k} {a['max_abs']:.3g}" for k, a in meta["arrays"].items() if "max_abs" in a)
        print(f"  wrote {fname} ({size / 1024:.0f} KiB); max|ref|: {scales}", flush=True)

    def save(self, extra):
        self.data.update(extra)
        self.data["cases"] = dict(sorted(self.data["cases"].items()))
        with open(self.index, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, ensure_ascii=False)
            f.write("\n")


# ----------------------------------------------------------------------------------------------
# Capturing upstream intermediates

class Capture:
    """Forward hooks on the upstream model: ViT input/last hidden state, tower output (token counts),
    projector input (merged tokens), every decoder layer's output and the token ids embedded."""

    def __init__(self, model):
        self.model = model
        self.handles = []
        self.vit_in, self.vit_last, self.token_counts, self.merged, self.layers, self.events = [], [], [], [], [], []

    def __enter__(self):
        m = self.model

        def on_clip(mod, args, kwargs, out):
            self.vit_in.append(args[0] if args else kwargs["pixel_values"])
            self.vit_last.append(out.hidden_states[-1][:, 1:])

        def on_tower(mod, args, out):
            self.token_counts.extend(out[1])
            self.events.append(("image", out[0].shape[1]))

        def on_embed(mod, args, out):
            self.events.append(("text", t2n(args[0][0]).astype(np.int64)))

        self.handles = [
            m.vit.vision_tower.register_forward_hook(on_clip, with_kwargs=True),
            m.vit.register_forward_hook(on_tower),
            m.vision_proj.register_forward_pre_hook(lambda mod, args: self.merged.append(args[0])),
            m.model.tok_embeddings.register_forward_hook(on_embed),
        ] + [layer.register_forward_hook(lambda mod, args, out: self.layers.append(out[0]))
             for layer in m.model.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def normalise_like_torch(canvas_u8):
    """ToTensor + Normalize as torchvision does them, in float32: x / 255, then (x - mean) / std."""
    x = canvas_u8.astype(np.float32) / np.float32(255)
    return ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------
# Cases

VISION_CASES = (
    # name, asset, op applied to the asset before the HD transform, hd_num, store the global view
    ("vision_coffee", "coffee.png", None, 1, False),
    ("vision_rocket_portrait", "rocket_portrait.png", None, 24, False),
    ("vision_coffee_strip_1x2", "coffee_strip_1x8.png", None, 2, True),
    ("vision_coffee_strip_2x1", "coffee_strip_1x8.png", "transpose", 2, False),
)
N_VIT_ROWS, N_MERGED_ROWS = 256, 256


def make_vision(model, up, w, config_name):
    for name, image_file, op, hd_num, keep_global in VISION_CASES:
        canvas = up.ixc_utils.Image_transform(open_image(image_file, op), hd_num=hd_num)
        canvas_u8 = np.asarray(canvas).copy()
        pixels = model.vis_processor(canvas)
        if not np.array_equal(normalise_like_torch(canvas_u8), t2n(pixels)):
            raise AssertionError(f"{name}: float32 (x/255 - mean)/std differs from upstream vis_processor")
        with Capture(model) as cap:
            image_embeds = model.img2emb(pixels.unsqueeze(0))[0]
        h, wd = canvas_u8.shape[0] // 560, canvas_u8.shape[1] // 560
        vit_last = t2n(cap.vit_last[0])
        merged = t2n(cap.merged[0][0])
        vit_rows = seeded_subset(vit_last.shape[1], N_VIT_ROWS, seed=1, must=(0, 39, 1560, 1599))
        merged_rows = seeded_subset(merged.shape[0], N_MERGED_ROWS, seed=2,
                                    must=(0, 19, 20, 419, 420, 421, 440, merged.shape[0] - 1))
        arrays = dict(canvas=canvas_u8, vit_rows=vit_rows, vit_last_hidden=vit_last[:, vit_rows],
                      merged_rows=merged_rows, merged=merged[merged_rows],
                      image_embeds=t2n(image_embeds[0]), token_count=np.int64(cap.token_counts[0]))
        if keep_global:
            arrays["global_view"] = t2n(cap.vit_in[0][0])
        w.case(name, {
            "kind": "vision", "config": config_name, "seed": 0, "image": f"tests/assets/{image_file}",
            "image_op": op, "hd_num": hd_num, "grid": [h, wd], "token_count": int(cap.token_counts[0]),
            "n_tiles": h * wd,
        }, arrays)


def fit_query(model, images, hd_num, lo, hi, n_before, max_length=16384):
    """The shortest `TEXT[:n_before] <ImageHere> TEXT[n_before:n]` whose prompt length is >= lo
    (asserted <= hi); with several images the markers follow one another."""
    def build(n):
        q = " ".join(TEXT[:n_before]) + " " + " ".join("<ImageHere>" for _ in images) + " " + \
            " ".join(TEXT[n_before:n])
        inputs, im_mask, length = model.interleav_wrap_chat(q, list(images), hd_num=hd_num,
                                                            max_length=max_length)
        return q, inputs["inputs_embeds"][0], im_mask[0], length
    a, b = n_before + 1, len(TEXT)
    if build(b)[3] < lo:
        raise ValueError(f"TEXT is too short to reach {lo} tokens")
    while a < b:
        mid = (a + b) // 2
        if build(mid)[3] >= lo:
            b = mid
        else:
            a = mid + 1
    q, embeds, im_mask, length = build(a)
    if not lo <= length <= hi:
        raise AssertionError(f"prompt length {length} not in [{lo}, {hi}]")
    return q, embeds, im_mask, length


def run_decoder(model, embeds, im_mask, infer_mode):
    """Upstream forward; returns per-layer outputs [L,T,H], the final normed state and the logits."""
    with torch.no_grad(), Capture(model) as cap:
        out = model(inputs_embeds=embeds[None], im_mask=im_mask[None], infer_mode=infer_mode,
                    use_cache=False, output_hidden_states=True, return_dict=True)
    layers = torch.stack([x[0] for x in cap.layers])
    final = out.hidden_states[-1][0]
    # Upstream's hidden_states tuple is (inputs, outputs of layers 0..L-2, norm(output of layer L-1)).
    assert torch.equal(out.hidden_states[0][0], embeds)
    assert all(torch.equal(out.hidden_states[i + 1][0], layers[i]) for i in range(len(layers) - 1))
    assert torch.equal(final, model.model.norm(layers[-1][None])[0])
    return layers, final, out.logits[0]


def logit_cols(vocab, n=N_LOGIT_COLS):
    return seeded_subset(vocab, n, seed=3, must=SPECIAL_IDS)


def decoder_arrays(model, embeds, im_mask, infer_mode, n_rows, seed):
    layers, final, logits = run_decoder(model, embeds, im_mask, infer_mode)
    T = embeds.shape[0]
    rows = seeded_subset(T, n_rows, seed=seed, must=mask_edges(t2n(im_mask)))
    cols = logit_cols(logits.shape[-1])
    lse = torch.logsumexp(logits.double(), dim=-1).float()
    arrays = dict(inputs_embeds=t2n(embeds), im_mask=t2n(im_mask).astype(bool), rows=rows,
                  layer_outputs=t2n(layers)[:, rows], final_hidden=t2n(final)[rows], logits_cols=cols,
                  logits=t2n(logits)[rows][:, cols], logits_argmax=t2n(logits.argmax(-1)).astype(np.int64),
                  logits_lse=t2n(lse))
    return arrays, logits


def decoder_meta(config_name, infer_mode, prompt, T, im_mask, note=""):
    return {"kind": "decoder", "config": config_name, "seed": 0, "infer_mode": infer_mode,
            "prompt": prompt, "seq_len": int(T), "image_rows": int(im_mask.sum()), "note": note}


def short_from_long(embeds, im_mask, n_image_rows):
    """The long prompt with its image block cut to its first n_image_rows rows: text, image, text."""
    m = t2n(im_mask)
    start = int(np.flatnonzero(m)[0])
    end = int(np.flatnonzero(m)[-1]) + 1
    keep = np.r_[0:start + n_image_rows, end:len(m)]
    prompt = {"builder": "rows of decoder_base_long's inputs (its image block cut short)",
              "source_case": "decoder_base_long", "source_rows": [[0, start + n_image_rows], [end, len(m)]]}
    return embeds[keep], im_mask[keep], prompt


def max_diff(a, b):
    return float((a - b).abs().max())


def task_lora_fold_check(model):
    """The reconstructed task LoRAs against lmdeploy's fold (W + sum B @ A) on text rows."""
    lin = model.model.layers[0].attention.wqkv
    x = torch.randn(1, 7, lin.in_features, generator=torch.Generator().manual_seed(4))
    no_image = torch.zeros(1, 7, dtype=torch.bool)
    out = {}
    for mode, tasks in (("web", ("lora_web",)), ("write", ("lora_sft", "lora_dpo"))):
        lin.infer_mode = mode
        got = lin(x, no_image)
        lin.infer_mode = "base"
        folded = lin.weight + sum(getattr(lin, f"{t}_B").weight @ getattr(lin, f"{t}_A").weight for t in tasks)
        out[f"task_lora_{mode}_vs_folded_weight"] = max_diff(got, x @ folded.T)
    return out


def make_decoder(up_dir, w, config, checks):
    model = U.load_upstream(up_dir, config, seed=0)
    # >= 1000 tokens yet <= max_position_embeddings (1024), so that dynamic NTK stays off.
    q, embeds, im_mask, T = fit_query(model, [asset("coffee.png")], 1, 1000, 1024, n_before=12)
    prompt = {"builder": "interleav_wrap_chat", "query": q, "image": ["tests/assets/coffee.png"], "hd_num": 1,
              "history": [], "meta_instruction": "", "length": int(T)}
    inv_freq = model.model.layers[0].attention.rotary_emb.inv_freq.clone()
    arrays, base_logits = decoder_arrays(model, embeds, im_mask, "base", 256, seed=10)
    w.case("decoder_base_long", decoder_meta("tiny", "base", prompt, T, t2n(im_mask)), arrays)
    assert torch.equal(inv_freq, model.model.layers[0].attention.rotary_emb.inv_freq), "NTK fired at T <= 1024"

    # Sanity: the fixtures exercise PLoRA (zeroing every Plora_B changes the logits).
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("Plora_B.weight")}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved:
                p.zero_()
        _, _, no_plora = run_decoder(model, embeds, im_mask, "base")
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    checks["base_logits_change_without_plora"] = max_diff(base_logits, no_plora)
    text_rows = ~im_mask
    first_img = int(np.flatnonzero(t2n(im_mask))[0])
    checks["rows_before_image_unchanged_without_plora"] = max_diff(base_logits[:first_img], no_plora[:first_img])
    del no_plora

    checks.update(task_lora_fold_check(model))
    short, short_mask, short_prompt = short_from_long(embeds, im_mask, n_image_rows=300 - int(text_rows.sum()))
    mode_logits = {}
    for mode in ("base", "web", "write"):
        arrays, mode_logits[mode] = decoder_arrays(model, short, short_mask, mode, 128, seed=11)
        if mode != "base":
            w.case(f"decoder_{mode}_short", decoder_meta("tiny", mode, short_prompt, len(short), t2n(short_mask)),
                   arrays)
    checks["web_vs_base_logits"] = max_diff(mode_logits["web"], mode_logits["base"])
    checks["write_vs_base_logits"] = max_diff(mode_logits["write"], mode_logits["base"])
    checks["write_vs_web_logits"] = max_diff(mode_logits["write"], mode_logits["web"])
    return short, short_mask, short_prompt, mode_logits["base"]


def make_ntk(up_dir, w, config, checks):
    """Longer than max_position_embeddings on a fresh model; then a short prompt on the same model,
    whose RoPE keeps the scaled base (upstream's state across calls)."""
    model = U.load_upstream(up_dir, config, seed=0)
    imgs = [asset("coffee_strip_1x8.png")]
    q, embeds, im_mask, T = fit_query(model, imgs, 2, 1380, 1500, n_before=20)
    prompt = {"builder": "interleav_wrap_chat", "query": q, "image": ["tests/assets/coffee_strip_1x8.png"],
              "hd_num": 2, "history": [], "meta_instruction": "", "length": int(T)}
    arrays, ntk_logits = decoder_arrays(model, embeds, im_mask, "base", 256, seed=12)
    w.case("decoder_ntk_long", decoder_meta("tiny", "base", prompt, T, t2n(im_mask),
                                            note="fresh model; T > max_position_embeddings"), arrays)
    rot = model.model.layers[0].attention.rotary_emb
    checks["ntk_inv_freq_changed"] = bool(not torch.allclose(
        rot.inv_freq, 1.0 / (config.rope_theta ** (torch.arange(0, rot.dim, 2).float() / rot.dim))))
    checks["ntk_cached_len"] = int(rot.max_seq_len_cached)

    plain = U.load_upstream(up_dir, tiny_config(rope_scaling=None), seed=0)
    _, _, plain_logits = run_decoder(plain, embeds, im_mask, "base")
    checks["ntk_vs_plain_rope_logits_long"] = max_diff(ntk_logits, plain_logits)
    del plain, plain_logits
    return model


def make_variants(up_dir, w, short, short_mask, short_prompt, short_base_logits, ntk_model, checks):
    after, after_logits = decoder_arrays(ntk_model, short, short_mask, "base", 128, seed=13)
    w.case("decoder_ntk_after_long_short", decoder_meta(
        "tiny", "base", short_prompt, len(short), t2n(short_mask),
        note="same model as decoder_ntk_long, run right after it: RoPE keeps the scaled base and a "
             f"cos/sin cache of length {ntk_model.model.layers[0].attention.rotary_emb.max_seq_len_cached}"),
        after)
    checks["ntk_state_kept_vs_fresh_short_logits"] = max_diff(after_logits, short_base_logits)
    for name, cfg_name, cfg in (
            ("decoder_linear_bias_short", "tiny_bias_linear",
             tiny_config(bias=True, rope_scaling={"type": "linear", "factor": 2.0})),
            ("decoder_plain_rope_short", "tiny_no_rope_scaling", tiny_config(rope_scaling=None))):
        model = U.load_upstream(up_dir, cfg, seed=0)
        # The short inputs were embedded by the tiny model: the variants share its embedding table.
        assert torch.equal(model.model.tok_embeddings.weight, torch.from_numpy(
            random_weights(tiny_config(), 0)["model.tok_embeddings.weight"])), "variant embeddings differ"
        arrays, logits = decoder_arrays(model, short, short_mask, "base", 128, seed=14)
        w.config(cfg_name, cfg)
        note = ("below max_position_embeddings this equals the tiny (dynamic-NTK) model's base output"
                if cfg.rope_scaling is None else "")
        w.case(name, decoder_meta(cfg_name, "base", short_prompt, len(short), t2n(short_mask), note), arrays)
        checks[f"{name}_vs_tiny_base_logits"] = max_diff(logits, short_base_logits)


# ----------------------------------------------------------------------------------------------
# Prompt building

PROMPT_CASES = (
    # name, query, images, hd_num, history, meta_instruction
    ("one_image_no_marker", "Describe this image in detail.", ["chelsea_tiny.png"], 24, [], ""),
    ("two_images_markers", "First image: <ImageHere>; second image: <ImageHere>. Which one is larger?",
     ["coffee_strip_1x8.png", "chelsea_tiny.png"], 1, [], ""),
    ("marker_in_middle", "Look at this picture <ImageHere> and tell me what animal it shows.",
     ["chelsea_tiny.png"], 24, [], ""),
    ("history_and_meta", "And what colour is its fur?", ["chelsea_tiny.png"], 24,
     [["What is in the picture?", "A cat lying on a blanket."], ["Is it asleep?", "No, it is awake."]],
     "You are a helpful assistant who answers briefly."),
)
TEXT_ONLY_CASES = (
    ("text_only_plain", "Write a haiku about coffee.", [], ""),
    ("text_only_history_meta", "Now one about tea.", [["Write a haiku about coffee.", "Dark cup, morning steam."]],
     "You are a poet."),
)


def make_prompt(up_dir, out_dir, versions, command):
    w = Writer(out_dir, "Upstream prompt building (interleav_wrap_chat, build_inputs) on the tiny config, "
                        "seed 0. See tests/fixtures/model/README.md for how they were made.")
    config = tiny_config()
    w.config("tiny", config)
    model = U.load_upstream(up_dir, config, seed=0)
    for name, query, images, hd_num, history, meta in PROMPT_CASES:
        paths = [asset(i) for i in images]
        with Capture(model) as cap:
            inputs, im_mask, length = model.interleav_wrap_chat(
                query, paths, history=[tuple(h) for h in history], meta_instruction=meta, hd_num=hd_num)
        embeds = inputs["inputs_embeds"][0]
        token_ids = np.concatenate([ids if kind == "text" else np.full(ids, -1, dtype=np.int64)
                                    for kind, ids in cap.events])
        if len(token_ids) != embeds.shape[0]:
            raise AssertionError(f"{name}: recorded {len(token_ids)} rows, upstream returned {embeds.shape[0]}")
        table = model.model.tok_embeddings.weight
        text = token_ids >= 0
        assert torch.equal(embeds[torch.from_numpy(text)], table[torch.from_numpy(token_ids[text])])
        assert np.array_equal(~text, t2n(im_mask[0]))
        w.case(name, {
            "kind": "interleav_wrap_chat", "config": "tiny", "seed": 0,
            "args": {"query": query, "image": [f"tests/assets/{i}" for i in images], "history": history,
                     "meta_instruction": meta, "hd_num": hd_num, "max_length": 16384},
            "effective_hd_num": 6 if len(images) > 1 else hd_num,
            "image_token_counts": [int(c) for c in cap.token_counts], "length": int(length),
        }, dict(inputs_embeds=t2n(embeds), im_mask=t2n(im_mask[0]).astype(bool), token_ids=token_ids,
                length=np.int64(length)))
    for name, query, history, meta in TEXT_ONLY_CASES:
        ids = model.build_inputs(model.tokenizer, query, [tuple(h) for h in history], meta)["input_ids"][0]
        w.case(name, {"kind": "build_inputs", "config": "tiny",
                      "args": {"query": query, "history": history, "meta_instruction": meta}},
               dict(input_ids=t2n(ids).astype(np.int64)))
    w.save({"versions": versions, "command": command})


# ----------------------------------------------------------------------------------------------
# Release widths

def release_widths_config():
    return InternLMXComposer2Config(num_hidden_layers=2, vocab_size=1024,
                                    vision_config=CLIPVisionConfig(num_hidden_layers=2))


def row_norms(x):
    return np.linalg.norm(x.astype(np.float64), axis=-1).astype(np.float32)


# Release-widths decoder input: text rows, image rows, text rows; the image rows are image_embeds rows
# from this start on (inside the first tile, past the global view).
RELEASE_DECODER_ROWS = (300, 32, 300)
RELEASE_IMAGE_BLOCK_START = 441


def make_release(up_dir, w, checks):
    config = release_widths_config()
    w.config("release_widths", config)
    t0 = time.time()
    model = U.load_upstream(up_dir, config, seed=1)
    t_build = time.time() - t0
    hidden_cols = seeded_subset(config.hidden_size, 256, seed=20)
    vit_cols = seeded_subset(config.vision_config.hidden_size, 256, seed=21)
    merged_cols = seeded_subset(config.vision_merged_size, 256, seed=22)

    t0 = time.time()
    canvas = U.import_upstream(up_dir).ixc_utils.Image_transform(Image.open(asset("coffee.png")), hd_num=1)
    with Capture(model) as cap:
        image_embeds = model.img2emb(model.vis_processor(canvas).unsqueeze(0))[0][0]
    t_vision = time.time() - t0
    # The decoder input is rebuilt exactly by the test from what is stored: embedding rows of seeded
    # ids (the real tokenizer's ids do not fit a 1024-word vocabulary) around a block of upstream image
    # embeddings stored in full, so the decoder check does not inherit the vision stack's rounding.
    n_before, n_image, n_after = RELEASE_DECODER_ROWS
    ids = np.random.default_rng(26).integers(3, config.vocab_size, n_before + n_after)
    ids[0] = config.bos_token_id
    before, after = ids[:n_before], ids[n_before:]
    image_block = image_embeds[RELEASE_IMAGE_BLOCK_START:RELEASE_IMAGE_BLOCK_START + n_image]
    token_ids = np.concatenate([before, np.full(n_image, -1), after]).astype(np.int64)
    table = model.model.tok_embeddings
    embeds = torch.cat([table(torch.from_numpy(before)), image_block, table(torch.from_numpy(after))])
    im_mask = torch.from_numpy(token_ids < 0)
    T = len(token_ids)
    # The input canvas is vision_coffee's (same photo, same hd_num): stored once, there.
    coffee = os.path.join(w.dir, "vision_coffee.npz")
    if os.path.isfile(coffee) and not np.array_equal(np.load(coffee)["canvas"], np.asarray(canvas)):
        raise AssertionError("release_widths canvas differs from vision_coffee's")
    vit_last, merged = t2n(cap.vit_last[0]), t2n(cap.merged[0][0])
    vit_rows = seeded_subset(vit_last.shape[1], 64, seed=23, must=(0, 1599))
    img_rows = seeded_subset(merged.shape[0], 64, seed=24, must=(0, 20, 420, merged.shape[0] - 1))

    t0 = time.time()
    layers, final, logits = run_decoder(model, embeds, im_mask, "base")
    t_decoder = time.time() - t0
    rows = seeded_subset(T, 64, seed=25, must=mask_edges(t2n(im_mask)))
    ref_final = final.clone()

    # How far a float32-rounding-sized change of the inputs moves the outputs: the port feeds the
    # decoder its own image embeddings, not these.
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(embeds.shape, generator=gen) * embeds.abs() * 1e-6
    _, final_p, logits_p = run_decoder(model, embeds + noise, im_mask, "base")
    checks["release_final_hidden_change_for_1e-6_relative_input_noise"] = max_diff(final_p, ref_final)
    checks["release_logits_change_for_1e-6_relative_input_noise"] = max_diff(logits_p, logits)

    lse = torch.logsumexp(logits.double(), dim=-1).float()
    arrays = dict(
        vit_rows=vit_rows, vit_cols=vit_cols, vit_last_hidden=vit_last[:, vit_rows][:, :, vit_cols],
        vit_row_norms=row_norms(vit_last),
        image_rows=img_rows, merged_cols=merged_cols, merged=merged[img_rows][:, merged_cols],
        merged_row_norms=row_norms(merged),
        hidden_cols=hidden_cols, image_embeds=t2n(image_embeds)[img_rows][:, hidden_cols],
        image_embeds_row_norms=row_norms(t2n(image_embeds)),
        token_ids=token_ids, image_block=t2n(image_block), im_mask=t2n(im_mask).astype(bool),
        rows=rows, layer_outputs=t2n(layers)[:, rows][:, :, hidden_cols],
        layer_outputs_row_norms=row_norms(t2n(layers)),
        final_hidden=t2n(final)[rows][:, hidden_cols], final_hidden_row_norms=row_norms(t2n(final)),
        logits=t2n(logits)[rows], logits_argmax=t2n(logits.argmax(-1)).astype(np.int64), logits_lse=t2n(lse))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    timing = {"build_and_load_s": round(t_build, 1), "vision_s": round(t_vision, 1),
              "decoder_forward_s": round(t_decoder, 1), "peak_rss_gib": round(peak_gib, 2)}
    print(f"  release widths: {timing}", flush=True)
    w.case("release_widths", {
        "kind": "release_widths", "config": "release_widths", "seed": 1, "image": "tests/assets/coffee.png",
        "hd_num": 1, "token_count": int(image_embeds.shape[0]), "infer_mode": "base", "seq_len": int(T),
        "reference_run": timing,
        "canvas_from": "vision_coffee", "image_block_start": RELEASE_IMAGE_BLOCK_START,
        "note": "decoder input = model.tok_embeddings rows of token_ids, with image_block (rows "
                "image_block_start.. of the image embeddings) on the rows where token_ids is -1 (= im_mask); "
                "token_ids are seeded, not tokenizer output (the real ids do not fit vocab_size 1024). Big "
                "arrays are stored at seeded rows (vit_rows, image_rows, rows) and columns (*_cols), plus "
                "per-row L2 norms over all rows and columns",
    }, arrays)


# ----------------------------------------------------------------------------------------------

def command_line(args):
    """The full regeneration command (a run with --only rewrites a subset of what it writes)."""
    out = os.path.relpath(os.path.abspath(args.out), os.getcwd())
    return (f"/work/venv-ref/bin/python {os.path.relpath(os.path.abspath(__file__), REPO)} "
            f"--upstream {args.upstream} --out {out}")


def versions():
    import PIL
    import torchvision
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "torch_threads": torch.get_num_threads()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="folder holding the upstream IXC2.5 .py files")
    p.add_argument("--out", required=True, help="fixtures root (tests/fixtures)")
    p.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS))
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    U.import_upstream(args.upstream)
    vers = versions()
    model_dir = os.path.join(args.out, "model")
    w = Writer(model_dir, "Upstream IXC2.5 (PyTorch) golden outputs for the parity tests; see README.md.")
    checks = w.data.setdefault("sanity_checks", {})
    w.config("tiny", tiny_config())
    t0 = time.time()
    if "vision" in args.only:
        print("vision", flush=True)
        make_vision(U.load_upstream(args.upstream, tiny_config(), seed=0),
                    U.import_upstream(args.upstream), w, "tiny")
    short = None
    if {"decoder", "variants"} & set(args.only):
        print("decoder", flush=True)
        short = make_decoder(args.upstream, w, tiny_config(), checks)
    ntk_model = None
    if {"ntk", "variants"} & set(args.only):
        print("ntk", flush=True)
        ntk_model = make_ntk(args.upstream, w, tiny_config(), checks)
    if "variants" in args.only:
        print("variants", flush=True)
        make_variants(args.upstream, w, *short, ntk_model, checks)
    if "release" in args.only:
        print("release", flush=True)
        make_release(args.upstream, w, checks)
    w.save({"versions": vers, "command": command_line(args), "logits_special_ids": list(SPECIAL_IDS)})
    if "prompt" in args.only:
        print("prompt", flush=True)
        make_prompt(args.upstream, os.path.join(args.out, "prompt"), vers, command_line(args))
    print(json.dumps(checks, indent=1))
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
