"""Golden data for the fine-tuning data pipeline from upstream's `finetune/` code: tests/fixtures/finetune/.

    python tools/reference/make_finetune_data_fixtures.py --finetune /path/to/InternLM-XComposer/finetune \
        --upstream /path/to/InternLM-XComposer-2.5-OmniLive/internlm-xcomposer2d5-ol-7b/base --site /tmp/ft-site

Upstream code runs unmodified, imported at run time (never copied): `finetune/data_mix.py` (conv2text,
ImageProcessorHD = R560_HD18_Identity_transform + ToTensor + Normalize, Sample_dataset, Mix_dataset),
`finetune/finetune.py` (make_supervised_data_module, DataCollatorForSupervisedDataset) and the model's
`forward(samples=...)` (`interleav_wrap`, `text2emb`, `mask_human_targets`) on the tiny model that
`upstream.py` builds. The working directory is the repository root, so the relative paths in the data
files resolve as upstream resolves them.

Run-time adaptations (upstream files untouched):
- torch 2.13's PyPI torchvision cannot load its compiled ops beside the CPU torch. `--site` names a
  folder holding a `pip install --target` of torchvision 0.28.0, einops and decord (the model's imports);
  when `import torchvision` fails, its pure-Python `torchvision.transforms` (all upstream uses) is
  imported from there under a bare `torchvision` package.
- finetune.py imports deepspeed, peft and accelerate at module level for training; the data code never
  calls them. Missing ones are stood in by empty modules while finetune.py is imported, then removed.
- The model: `model.model.forward` is replaced by a capture of its keyword arguments (inputs_embeds,
  attention_mask, im_mask) that stops the forward; `interleav_wrap` / `text2emb` are wrapped to record
  the targets they return (forward's labels are these, cut at max_length). Token embedding column 0 is
  set to the token id; the vision tower runs for real (its output lengths are upstream's), then its
  features are replaced by the image's index in the micro-batch, and `vision_proj` keeps the first
  `hidden` features, so column 0 of the embeddings reads back as token id or image index.
- Samples are put in a micro-batch by the real `Sample_dataset.get_item`, with `random.randrange(n)` (its
  sample draw) answered from a script; the scale draw of the image transform goes to Python's random.
- Text-only micro-batches: upstream's collator keeps only each item's first text; the text-encoding
  cases pass all texts to `forward` (what this repository does) and the sampling cases record the
  collator's one text.
"""
import argparse
import contextlib
import hashlib
import importlib.machinery
import json
import os
import platform
import random
import sys
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(REPO, "tests", "fixtures", "finetune")
DATA = "tests/fixtures/finetune/data"
END_TURN_ID, EOS_ID = 92542, 2

# name, asset, integer upscale (or a Pillow mode to convert to), hd_num
IMAGE_CASES = [
    ("chelsea_L_hd18", "chelsea.png", "L", 18), ("coffee_RGBA_hd18", "coffee.png", "RGBA", 18),
    ("astronaut_hd18", "astronaut.png", 1, 18), ("chelsea_hd18", "chelsea.png", 1, 18),
    ("chelsea_tiny_hd18", "chelsea_tiny.png", 1, 18), ("coffee_hd18", "coffee.png", 1, 18),
    ("coffee_strip_1x8_hd18", "coffee_strip_1x8.png", 1, 18), ("rocket_portrait_hd18", "rocket_portrait.png", 1, 18),
    ("rocket_strip_8x1_hd18", "rocket_strip_8x1.png", 1, 18), ("astronaut_hd3", "astronaut.png", 1, 3),
    ("coffee_strip_1x8_hd1", "coffee_strip_1x8.png", 1, 1), ("rocket_portrait_hd2", "rocket_portrait.png", 1, 2),
    ("coffee_x4_hd18", "coffee.png", 4, 18), ("coffee_x4_hd6", "coffee.png", 4, 6),
    ("rocket_portrait_x3_hd18", "rocket_portrait.png", 3, 18), ("rocket_strip_8x1_x3_hd18", "rocket_strip_8x1.png", 3, 18),
]
FULL_FLOAT = ("coffee_strip_1x8_hd1",)  # whole normalised tensors kept (small: mostly white padding)
FULL_CANVAS = ("chelsea_tiny_hd18", "rocket_strip_8x1_hd18")  # whole uint8 canvases kept
GRID_STRIDE, GRID_OFFSET = 16, (5, 11)

# name, data file, sample indices (one micro-batch, in order), max_length, hd_num
ENCODING_CASES = [
    ("multi_b2", "multi.json", [0, 1], 16384, 18),
    ("multi_b3_markers", "multi.json", [2, 3, 4], 16384, 18),
    ("multi_hd2", "multi.json", [1, 2, 5], 16384, 2),
    ("multi_cut_mid_image", "multi.json", [3, 5], 1500, 18),
    ("multi_cut_mid_text", "multi.json", [5, 3], 2150, 18),
    ("multi_cut_before_second_image", "two.json", [0, 1], 900, 18),
    ("two_images_and_lists", "two.json", [0, 1, 2], 16384, 18),
    ("text_b5", "text.json", [0, 1, 2, 3, 4], 16384, 18),
    ("text_cut", "text.json", [3, 0, 4], 40, 18),
    ("text_cut_in_answer", "text.json", [3, 1], 90, 18),
]

# name, data.txt, given_num, batch_size, hd_num, seed, steps, steps run through the model
SAMPLING_CASES = [
    ("given_num_b2_seed3", "given_num.txt", True, 2, 18, 3, 14, 6),
    ("given_num_b2_seed11", "given_num.txt", True, 2, 18, 11, 14, 0),
    ("ratio_b3_seed5", "ratio.txt", False, 3, 4, 5, 12, 0),
    ("multi_only_b1_seed7", "multi.json", False, 1, 2, 7, 8, 0),
    ("text_only_b4_seed9", "text.json", False, 4, 18, 9, 6, 2),
]


def digest(arr):
    arr = np.ascontiguousarray(arr)
    return hashlib.sha256(str(arr.shape).encode() + str(arr.dtype).encode() + arr.tobytes()).hexdigest()


def asset_image(asset, repeat, tmpdir):
    """The asset, upscaled by integer pixel repetition (exact, library-free) when repeat > 1, or converted
    to another Pillow mode (upstream's `.convert('RGB')` then undoes it)."""
    from PIL import Image
    path = os.path.join(REPO, "tests", "assets", asset)
    if repeat == 1:
        return path
    if isinstance(repeat, str):
        out = os.path.join(tmpdir, f"{os.path.splitext(asset)[0]}_{repeat}.png")
        Image.open(path).convert(repeat).save(out)
        return out
    arr = np.asarray(Image.open(path).convert("RGB"))
    arr = np.repeat(np.repeat(arr, repeat, axis=0), repeat, axis=1)
    out = os.path.join(tmpdir, f"{os.path.splitext(asset)[0]}_x{repeat}.png")
    Image.fromarray(arr).save(out)
    return out


# ---------------------------------------------------------------------------------------------------------
# Importing upstream

def ensure_torchvision(site):
    if site and site not in sys.path:
        sys.path.append(site)  # after site-packages: the installed torch wins
    try:
        import torchvision.transforms  # noqa: F401
        return "full package"
    except Exception:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
    folder = os.path.join(site or "", "torchvision")
    if not os.path.isdir(folder):
        raise SystemExit("torchvision does not import here: pass --site <dir> holding `pip install --target <dir> "
                         "--no-deps torchvision==0.28.0 einops decord`")
    pkg = types.ModuleType("torchvision")
    pkg.__path__ = [folder]
    pkg.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    pkg.__spec__.submodule_search_locations = [folder]
    sys.modules["torchvision"] = pkg
    import torchvision.transforms  # noqa: F401,F811
    return "transforms only (compiled ops not loadable beside this torch)"


@contextlib.contextmanager
def stand_ins():
    """Empty deepspeed / peft / accelerate modules for finetune.py's training imports, if missing."""
    added = []

    def stub(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        added.append(name)
        return mod

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        stub("deepspeed", zero=stub("deepspeed.zero"))
        stub("deepspeed.runtime")
        stub("deepspeed.runtime.zero")
        stub("deepspeed.runtime.zero.partition_parameters", ZeroParamStatus=None)
    try:
        import peft  # noqa: F401
    except ImportError:
        stub("peft", LoraConfig=None, get_peft_model=None)
    try:
        import accelerate.utils  # noqa: F401
    except ImportError:
        stub("accelerate", utils=stub("accelerate.utils", DistributedType=types.SimpleNamespace(DEEPSPEED="DEEPSPEED")))
    try:
        yield added
    finally:
        for name in added:
            del sys.modules[name]


def import_finetune(finetune_dir):
    import transformers  # noqa: F401  (its availability flags are computed before any stand-in exists)
    from transformers import Trainer  # noqa: F401
    sys.path.insert(0, os.path.abspath(finetune_dir))
    with stand_ins() as added:
        import data_mix
        import finetune
    return data_mix, finetune, added


# ---------------------------------------------------------------------------------------------------------
# The model's forward(samples=...), read back

class _Stop(Exception):
    pass


def build_capturing_model(upstream_dir):
    import torch
    from torch import nn

    import upstream as U
    from mindxcomposer.demo import tiny_config

    torch.Tensor.cuda = lambda self, *a, **k: self  # the text-only branch calls .cuda()
    model = U.load_upstream(upstream_dir, tiny_config())
    model.tokenizer.padding_side = "right"  # as finetune.py loads it
    hidden = model.config.hidden_size
    with torch.no_grad():
        emb = model.model.tok_embeddings.weight
        emb[:, 0] = torch.arange(emb.shape[0], dtype=emb.dtype)  # exact in float32 below 2**24

    class MarkImages(nn.Module):
        """The real tower (its lengths), its features replaced by each image's index."""

        def __init__(self, tower):
            super().__init__()
            self.tower = tower
            self.calls = []

        def forward(self, images, glb_gn, sub_gn):
            embeds, split = self.tower(images, glb_gn, sub_gn)
            self.calls.append(dict(shapes=[list(im.shape) for im in images], split=[int(s) for s in split]))
            marks = torch.cat([torch.full((int(n),), float(i)) for i, n in enumerate(split)])
            return marks[None, :, None].expand(1, -1, embeds.shape[-1]).contiguous(), split

    class KeepHidden(nn.Module):
        def forward(self, x):
            return x[..., :hidden]

    model.vit = MarkImages(model.vit)
    model.vision_proj = KeepHidden()
    captured = {}

    def capture_decoder(*args, **kwargs):
        captured.update(kwargs)
        raise _Stop

    model.model.forward = capture_decoder
    for name, target_index in (("interleav_wrap", 2), ("text2emb", 1)):
        original = getattr(model, name)

        def wrapped(*args, _original=original, _i=target_index, **kwargs):
            out = _original(*args, **kwargs)
            captured["targets"] = out[_i]
            return out

        setattr(model, name, wrapped)
    return model, captured


def run_forward(model, captured, samples, max_length):
    """forward(samples=...) up to the decoder: ids (-100 on images), image index (-1 on text), attention,
    labels, im_mask, all [B, L]."""
    import torch
    captured.clear()
    model.vit.calls.clear()
    model.max_length = max_length
    with torch.no_grad():
        try:
            model(samples=samples)
        except _Stop:
            pass
        else:
            raise RuntimeError("the decoder was not reached")
    emb = captured["inputs_embeds"][..., 0].numpy().astype(np.float64)
    im_mask = captured["im_mask"].numpy().astype(bool)
    values = np.rint(emb).astype(np.int64)
    if np.abs(emb - values).max() != 0:
        raise RuntimeError("embedding column 0 is not integral")
    length = emb.shape[1]
    return dict(input_ids=np.where(im_mask, -100, values).astype(np.int32),
                image_index=np.where(im_mask, values, -1).astype(np.int32),
                attention_mask=captured["attention_mask"].numpy().astype(np.int8),
                labels=captured["targets"][:, :length].numpy().astype(np.int32),
                im_mask=im_mask.astype(np.int8)), [c["split"] for c in model.vit.calls]


@contextlib.contextmanager
def scripted_sample_draws(indices):
    """random.randrange(n) (a sample draw) answers from `indices`; other calls go to Python's random."""
    original = random.randrange
    queue = list(indices)

    def randrange(start, stop=None, step=1):
        if stop is None:
            return queue.pop(0)
        return original(start, stop, step)

    random.randrange = randrange
    try:
        yield
    finally:
        random.randrange = original
    if queue:
        raise RuntimeError(f"unused scripted draws {queue}")


# ---------------------------------------------------------------------------------------------------------
# Cases

def conv2text_cases(data_mix):
    convs = []
    for name in ("multi.json", "text.json", "two.json"):
        with open(os.path.join(REPO, DATA, name), encoding="utf-8") as f:
            convs += [r["conversations"] for r in json.load(f)]
    convs += [
        [{"from": "HUMAN", "value": ""}, {"from": "system", "value": "  odd role  "}],
        [{"from": "User", "value": "\n\ttabs and newlines\n"}, {"from": "Bot", "value": "x"},
         {"from": "user", "value": "</s> inside"}, {"from": "gpt", "value": "[UNUSED_TOKEN_145] literal"}],
        [{"from": "human", "value": "only a question"}],
    ]
    return [dict(conversations=c, text=data_mix.conv2text(c)) for c in convs]


def image_cases(data_mix, tmpdir, arrays):
    import torch
    canvases = []
    original = data_mix.R560_HD18_Identity_transform

    def capture(img, *args, **kwargs):
        out = original(img, *args, **kwargs)
        canvases.append(np.asarray(out).copy())
        return out

    data_mix.R560_HD18_Identity_transform = capture
    cases = []
    try:
        for name, asset, repeat, hd_num in IMAGE_CASES:
            path = asset_image(asset, repeat, tmpdir)
            canvases.clear()
            pixels = data_mix.ImageProcessorHD(resolution=560, hd_num=hd_num)(path)
            assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.float32
            px = pixels.numpy()
            canvas = canvases[0]
            _, h, w = px.shape
            oy, ox = GRID_OFFSET
            arrays[f"image/{name}/grid"] = px[:, oy::GRID_STRIDE, ox::GRID_STRIDE]
            arrays[f"image/{name}/centre_row"] = px[:, h // 2, :]
            arrays[f"image/{name}/centre_col"] = px[:, :, w // 2]
            if name in FULL_FLOAT:
                arrays[f"image/{name}/pixels"] = px
            if name in FULL_CANVAS:
                arrays[f"image/{name}/canvas"] = canvas
            with Image_size(path) as size:
                source_size = size
            cases.append(dict(name=name, asset=asset, repeat=repeat, hd_num=hd_num, source_size=source_size,
                              shape=list(px.shape), canvas_sha256=digest(canvas), pixels_sha256=digest(px),
                              channel_sums=[float(s) for s in px.astype(np.float64).sum(axis=(1, 2))]))
    finally:
        data_mix.R560_HD18_Identity_transform = original
    return cases


@contextlib.contextmanager
def Image_size(path):
    from PIL import Image
    with Image.open(path) as im:
        yield list(im.size)


def encoding_cases(data_mix, finetune, model, captured, arrays):
    cases = []
    collate = finetune.DataCollatorForSupervisedDataset()
    for name, file, indices, max_length, hd_num in ENCODING_CASES:
        with open(os.path.join(REPO, DATA, file), encoding="utf-8") as f:
            raw = json.load(f)
        has_img = "image" in raw[0]
        ds = data_mix.Sample_dataset(raw, len(indices), has_img=has_img, hd_num=hd_num)
        with scripted_sample_draws(indices):
            sample = ds.get_item()
        if has_img:
            samples = collate([dict(samples=sample)])["samples"]
        else:
            # All texts of the micro-batch (upstream's collator would keep the first only).
            samples = dict(text_input=sample["text_input"], data_type=["text"])
        out, splits = run_forward(model, captured, samples, max_length)
        for key, value in out.items():
            arrays[f"encoding/{name}/{key}"] = value
        cases.append(dict(name=name, file=f"{DATA}/{file}", indices=indices, max_length=max_length, hd_num=hd_num,
                          data_type="multi" if has_img else "text", image_token_counts=splits[0] if splits else [],
                          shape=list(out["input_ids"].shape),
                          supervised=[int(n) for n in (out["labels"] != -100).sum(1)]))
    return cases


def sampling_cases(data_mix, finetune, model, captured, arrays):
    cases = []
    collate = finetune.DataCollatorForSupervisedDataset()
    for name, data_txt, given_num, batch_size, hd_num, seed, steps, model_steps in SAMPLING_CASES:
        args = types.SimpleNamespace(data_path=f"{DATA}/{data_txt}", given_num=given_num, batch_size=batch_size,
                                     resolution=560, hd_num=hd_num)
        random.seed(seed)  # upstream's draws come from the global, unseeded random: seed it as our loader
        if data_txt.endswith("json"):
            # finetune.py passes a .json list where Mix_dataset wants {file: samples}; give it that.
            with open(args.data_path, encoding="utf-8") as f:
                mix = data_mix.Mix_dataset({args.data_path: json.load(f)}, batch_size, hd_num=hd_num, local_rank=0)
        else:
            mix = finetune.make_supervised_data_module(None, args)["train_dataset"]
        subsets = mix.datasets_multi + mix.datasets_text
        resampled = {"multi": [[r["id"] for r in d.raw_data] for d in mix.datasets_multi],
                     "text": [[r["id"] for r in d.raw_data] for d in mix.datasets_text]}
        log = []
        original = data_mix.Sample_dataset.__get_item__

        def logged(self, i, _original=original):
            log.append((subsets.index(self), i))
            return _original(self, i)

        data_mix.Sample_dataset.__get_item__ = logged
        drawn = []
        try:
            for step in range(steps):
                log.clear()
                item = mix[seed if step == 0 else step]  # the first index asked seeds Python's random
                sample = item["samples"]
                which = log[0][0]
                subset = subsets[which]
                n_multi = len(mix.datasets_multi)
                drawn.append(dict(data_type=sample["data_type"], ids=[subset.raw_data[i]["id"] for _, i in log],
                                  subset=which if which < n_multi else which - n_multi,
                                  indices=[i for _, i in log]))
                if step < model_steps:
                    batch = collate([item])["samples"]
                    out, _ = run_forward(model, captured, batch, 16384)
                    for key, value in out.items():
                        arrays[f"sampling/{name}/step{step}/{key}"] = value
        finally:
            data_mix.Sample_dataset.__get_item__ = original
        cases.append(dict(name=name, data_path=args.data_path, given_num=given_num, batch_size=batch_size,
                          hd_num=hd_num, seed=seed, resampled=resampled, steps=drawn, model_steps=model_steps,
                          model_max_length=16384))
    return cases


def mask_cases(model, arrays):
    import torch
    rng = np.random.default_rng(0)
    cases = []
    for n in range(24):
        length = int(rng.integers(1, 60))
        ids = rng.integers(3, 40, size=length)
        ids[rng.random(length) < 0.15] = END_TURN_ID
        if rng.random() < 0.5:
            ids[rng.random(length) < 0.08] = EOS_ID
        ids[rng.random(length) < 0.1] = -100
        out = type(model).mask_human_targets(model, torch.from_numpy(ids[None].astype(np.int64))).numpy()[0]
        arrays[f"mask/{n}/ids"] = ids.astype(np.int32)
        arrays[f"mask/{n}/targets"] = out.astype(np.int32)
        cases.append(n)
    return cases


def check_upstream_example(data_mix, finetune, model, captured, finetune_dir, steps=8):
    """Upstream's own example data (finetune/data.txt, its JSON files and images; not committable here)
    through upstream and through mindxcomposer.finetune: every micro-batch's ids, labels, attention mask
    and im_mask must be equal (text micro-batches: upstream's collator keeps row 0 only), its pixels within
    1e-5. Writes nothing."""
    from mindxcomposer.finetune import DataArguments, FinetuneData
    from mindxcomposer.tokenization_internlm2 import InternLM2Tokenizer

    collate = finetune.DataCollatorForSupervisedDataset()
    tok = InternLM2Tokenizer.from_pretrained()
    cwd = os.getcwd()
    os.chdir(finetune_dir)
    try:
        for seed, batch_size, hd_num in ((42, 2, 18), (7, 3, 6)):
            random.seed(seed)
            args = types.SimpleNamespace(data_path="data.txt", given_num=True, batch_size=batch_size, resolution=560,
                                         hd_num=hd_num)
            mix = finetune.make_supervised_data_module(None, args)["train_dataset"]
            ours = FinetuneData(DataArguments(data_path="data.txt", given_num=True, batch_size=batch_size,
                                              hd_num=hd_num, seed=seed, max_length=16384), tok)
            stream = ours.iter_records()
            for step in range(steps):
                item = mix[seed if step == 0 else step]
                out, _ = run_forward(model, captured, collate([item])["samples"], 16384)
                batch = ours.build(next(stream))
                if batch["data_type"] == "multi":  # upstream's pixels: per sample, per image [1, 3, H, W]
                    theirs = [im.numpy() for sample in item["samples"]["image"] for im in sample]
                    if len(theirs) != len(batch["pixel_values"]) or any(
                            a.shape != b.shape or np.abs(a - b).max() > 1e-5
                            for a, b in zip(theirs, batch["pixel_values"])):
                        raise SystemExit(f"upstream example data, seed {seed}, micro-batch {step}: pixels differ")
                rows = out["input_ids"].shape[0]
                for key in ("input_ids", "labels", "attention_mask", "im_mask"):
                    mine = np.asarray(batch[key]).astype(np.int64)[:rows, :out[key].shape[1]]
                    if not np.array_equal(mine, out[key].astype(np.int64)):
                        raise SystemExit(f"upstream example data, seed {seed}, micro-batch {step}: {key} differs")
                print(f"upstream example data, seed {seed}, batch_size {batch_size}, hd_num {hd_num}, micro-batch "
                      f"{step}: {batch['data_type']} {list(batch['input_ids'].shape)} equal")
    finally:
        os.chdir(cwd)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--finetune", required=True, help="upstream's finetune/ folder")
    ap.add_argument("--upstream", required=True, help="upstream's IXC2.5 model code folder (see README.md here)")
    ap.add_argument("--site", help="folder with torchvision 0.28.0, einops, decord installed by pip --target")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--check-example", action="store_true",
                    help="instead of writing fixtures, compare upstream's own example data (--finetune's data.txt) "
                         "through upstream and through this repository")
    args = ap.parse_args()
    if args.check_example:
        import mindxcomposer.finetune  # noqa: F401  (MindSpore fails to import after decord in one process)

    os.chdir(REPO)  # upstream opens data and image paths relative to the working directory
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torchvision_mode = ensure_torchvision(args.site)
    import tempfile

    import torch
    import transformers
    torch.set_num_threads(2)
    model, captured = build_capturing_model(os.path.abspath(args.upstream))
    data_mix, finetune, stood_in = import_finetune(args.finetune)
    if args.check_example:
        check_upstream_example(data_mix, finetune, model, captured, os.path.abspath(args.finetune))
        return

    arrays = {}
    with tempfile.TemporaryDirectory() as tmp:
        result = dict(
            versions=dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                          numpy=np.__version__, pillow=__import__("PIL").__version__, torchvision=torchvision_mode,
                          stood_in=stood_in),
            conv2text=conv2text_cases(data_mix),
            images=dict(grid_stride=GRID_STRIDE, grid_offset=list(GRID_OFFSET), cases=image_cases(data_mix, tmp, arrays)),
            encodings=encoding_cases(data_mix, finetune, model, captured, arrays),
            sampling=sampling_cases(data_mix, finetune, model, captured, arrays),
            mask_cases=mask_cases(model, arrays),
        )
    os.makedirs(args.out, exist_ok=True)
    np.savez_compressed(os.path.join(args.out, "arrays.npz"), **arrays)
    with open(os.path.join(args.out, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(arrays)} arrays, {os.path.getsize(os.path.join(args.out, 'arrays.npz')) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
