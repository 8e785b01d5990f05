"""Fine-tuning data against upstream's `finetune/` code (golden outputs in tests/fixtures/finetune/, made by
tools/reference/make_finetune_data_fixtures.py): conv2text, the training image transform, data files and
given_num, upstream's sampling draw for draw, token ids / labels / im_mask / image layout of micro-batches;
then sequential sampling and the errors that name a sample."""
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from mindxcomposer.finetune import (DataArguments, FinetuneData, FinetuneDataError, UpstreamMixSampler, conv2text,
                                    image_token_count, load_data, mask_human_targets, training_canvas,
                                    training_canvas_size, training_pixel_values)
from mindxcomposer.finetune.data import build_micro_batch
from mindxcomposer.finetune.images import open_training_image
from mindxcomposer.tokenization_internlm2 import InternLM2Tokenizer
from mindxcomposer.vision import merged_token_count

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FIXTURES = os.path.join(HERE, "fixtures", "finetune")
ASSETS = os.path.join(HERE, "assets")
CASES = json.load(open(os.path.join(FIXTURES, "cases.json"), encoding="utf-8"))
ARRAYS = np.load(os.path.join(FIXTURES, "arrays.npz"))
PIXEL_TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return InternLM2Tokenizer.from_pretrained()


def by_name(cases):
    return {c["name"]: c for c in cases}


# ---------------------------------------------------------------------------------------------------------
# Text and image transforms

def test_conv2text_matches_upstream():
    for case in CASES["conv2text"]:
        assert conv2text(case["conversations"]) == case["text"]


def _case_image(case, tmp_path):
    path = os.path.join(ASSETS, case["asset"])
    if case["repeat"] == 1:
        return path
    if isinstance(case["repeat"], str):  # another Pillow mode
        out = str(tmp_path / f"{case['repeat']}_{case['asset']}")
        Image.open(path).convert(case["repeat"]).save(out)
        return out
    arr = np.asarray(Image.open(path).convert("RGB"))
    arr = np.repeat(np.repeat(arr, case["repeat"], axis=0), case["repeat"], axis=1)
    out = str(tmp_path / f"x{case['repeat']}_{case['asset']}")
    Image.fromarray(arr).save(out)
    return out


def _digest(arr):
    import hashlib
    arr = np.ascontiguousarray(arr)
    return hashlib.sha256(str(arr.shape).encode() + str(arr.dtype).encode() + arr.tobytes()).hexdigest()


@pytest.mark.parametrize("name", [c["name"] for c in CASES["images"]["cases"]])
def test_training_transform_matches_upstream(name, tmp_path):
    case = by_name(CASES["images"]["cases"])[name]
    path = _case_image(case, tmp_path)
    image = open_training_image(path)
    assert list(image.size) == case["source_size"]

    canvas = np.asarray(training_canvas(image, case["hd_num"]))
    assert _digest(canvas) == case["canvas_sha256"]  # uint8: the same pixels
    if f"image/{name}/canvas" in ARRAYS:
        np.testing.assert_array_equal(canvas, ARRAYS[f"image/{name}/canvas"])
    _, h, w = case["shape"]
    assert training_canvas_size(*case["source_size"], case["hd_num"]) == (w, h)

    px = training_pixel_values(path, case["hd_num"])
    assert px.dtype == np.float32 and list(px.shape) == [1] + case["shape"]
    px = px[0]
    oy, ox = CASES["images"]["grid_offset"]
    stride = CASES["images"]["grid_stride"]
    np.testing.assert_allclose(px[:, oy::stride, ox::stride], ARRAYS[f"image/{name}/grid"], rtol=0, atol=PIXEL_TOL)
    np.testing.assert_allclose(px[:, h // 2, :], ARRAYS[f"image/{name}/centre_row"], rtol=0, atol=PIXEL_TOL)
    np.testing.assert_allclose(px[:, :, w // 2], ARRAYS[f"image/{name}/centre_col"], rtol=0, atol=PIXEL_TOL)
    if f"image/{name}/pixels" in ARRAYS:
        np.testing.assert_allclose(px, ARRAYS[f"image/{name}/pixels"], rtol=0, atol=PIXEL_TOL)
    # Every pixel within the tolerance bounds each channel's sum.
    sums = px.astype(np.float64).sum(axis=(1, 2))
    np.testing.assert_allclose(sums, case["channel_sums"], rtol=0, atol=PIXEL_TOL * h * w)


def test_mask_human_targets_matches_upstream(tok):
    end_turn, eos = tok.convert_tokens_to_ids("[UNUSED_TOKEN_145]"), tok.eos_token_id
    assert (end_turn, eos) == (92542, 2)  # what upstream hard-codes
    for n in CASES["mask_cases"]:
        ids = ARRAYS[f"mask/{n}/ids"].astype(np.int64)
        np.testing.assert_array_equal(mask_human_targets(ids[None], end_turn, eos)[0], ARRAYS[f"mask/{n}/targets"])


# ---------------------------------------------------------------------------------------------------------
# Micro-batches

def _image_index_map(batch, records):
    """Upstream numbers the images of a micro-batch sample by sample, including images it never places."""
    out = np.full(batch["input_ids"].shape, -1, dtype=np.int64)
    offsets = np.cumsum([0] + [len(r.images) for r in records])
    seen = {}
    for row, start, kept in batch["image_spans"].tolist():
        j = seen.get(row, 0)
        seen[row] = j + 1
        out[row, start:start + kept] = offsets[row] + j
    return out


def _compare(batch, prefix, records=None, rows=None):
    keys = ("input_ids", "attention_mask", "labels", "im_mask")
    for key in keys:
        ours = np.asarray(batch[key]).astype(np.int64)
        theirs = ARRAYS[prefix + key].astype(np.int64)
        if rows is not None:
            ours = ours[:rows, :theirs.shape[1]]
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{prefix}{key}")
    if records is not None and records[0].images is not None:
        np.testing.assert_array_equal(_image_index_map(batch, records), ARRAYS[prefix + "image_index"])


@pytest.mark.parametrize("name", [c["name"] for c in CASES["encodings"]])
def test_micro_batch_matches_upstream(name, tok):
    case = by_name(CASES["encodings"])[name]
    group, = load_data(case["file"], root=REPO)
    records = [group.records[i] for i in case["indices"]]
    if case["data_type"] == "multi":
        counts = [image_token_count(*Image.open(p).size, case["hd_num"]) for r in records for p in r.images]
        assert counts == case["image_token_counts"]  # the vision tower's lengths
    batch = build_micro_batch(records, tok, case["max_length"], case["hd_num"])
    assert batch["data_type"] == case["data_type"]
    _compare(batch, f"encoding/{name}/", records)
    # One pixel tensor per image placed, at the training transform's size.
    assert len(batch["pixel_values"]) == len(batch["image_spans"])
    for (row, start, kept), px in zip(batch["image_spans"].tolist(), batch["pixel_values"]):
        tokens = merged_token_count(px.shape[2] // 560, px.shape[3] // 560)
        assert kept == min(tokens, batch["input_ids"].shape[1] - start)


def test_text_micro_batch_uses_every_text(tok):
    """The deviation from upstream's collator, which would keep only the first text."""
    group, = load_data(f"{os.path.relpath(FIXTURES, REPO)}/data/text.json", root=REPO)
    batch = build_micro_batch(group.records[:3], tok, 16384)
    assert batch["input_ids"].shape[0] == 3
    assert all((batch["labels"][row] != -100).sum() > 0 for row in range(3))


@pytest.mark.parametrize("name", [c["name"] for c in CASES["sampling"]])
def test_upstream_sampling_draw_for_draw(name, tok):
    case = by_name(CASES["sampling"])[name]
    args = DataArguments(data_path=case["data_path"], given_num=case["given_num"], batch_size=case["batch_size"],
                         hd_num=case["hd_num"], seed=case["seed"], max_length=case["model_max_length"])
    data = FinetuneData(args, tok, root=REPO)
    by_kind = {"multi": [g for g in data.groups if g.data_type == "multi"],
               "text": [g for g in data.groups if g.data_type == "text"]}
    for kind, groups in by_kind.items():  # given_num / ratio resampling
        assert [[r.sample_id for r in g.records] for g in groups] == case["resampled"][kind]
    sampler = UpstreamMixSampler(data.groups, args.batch_size, seed=args.seed)
    stream = data.iter_records()
    for step, expected in enumerate(case["steps"]):
        g, picks = next(sampler)
        group = data.groups[g]
        assert group.data_type == expected["data_type"], step
        assert by_kind[group.data_type].index(group) == expected["subset"], step
        assert picks == expected["indices"], step
        records = next(stream)
        assert [r.sample_id for r in records] == expected["ids"], step
        if step < case["model_steps"]:
            batch = data.build(records)
            prefix = f"sampling/{name}/step{step}/"
            if expected["data_type"] == "multi":
                _compare(batch, prefix, records)
            else:  # upstream's collator kept the first text only: compare that row
                _compare(batch, prefix, rows=1)
                assert not batch["attention_mask"][0, ARRAYS[prefix + "input_ids"].shape[1]:].any()


def test_resuming_and_ranks(tok):
    args = DataArguments(data_path=f"{os.path.relpath(FIXTURES, REPO)}/data/given_num.txt", given_num=True,
                         batch_size=2, seed=3, max_length=16384)
    data = FinetuneData(args, tok, root=REPO)
    full = data.iter_records()
    first = [[r.sample_id for r in next(full)] for _ in range(7)]
    assert [r.sample_id for r in next(data.iter_records(start=4))] == first[4]
    # Worker r draws from seed + r (the data files are resampled with `seed` on every worker).
    rank1 = FinetuneData(args, tok, world_size=2, rank=1, root=REPO)
    sampler = UpstreamMixSampler(rank1.groups, 2, seed=4)
    stream = rank1.iter_records()
    for _ in range(7):
        g, picks = next(sampler)
        assert [r.sample_id for r in next(stream)] == [rank1.groups[g].records[i].sample_id for i in picks]


# ---------------------------------------------------------------------------------------------------------
# Sequential sampling

def _write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return str(path)


def _text_records(n, prefix="t"):
    return [{"id": f"{prefix}{i}", "conversations": [{"from": "human", "value": f"Question {i}?"},
                                                      {"from": "gpt", "value": f"Answer {i}."}]} for i in range(n)]


def _image_records(n, tmp_path):
    img = shutil.copy(os.path.join(ASSETS, "chelsea_tiny.png"), tmp_path / "cat.png")
    return [{"id": f"m{i}", "image": str(img), "conversations": [{"from": "human", "value": f"Picture {i}?"},
                                                                    {"from": "gpt", "value": "A cat."}]}
            for i in range(n)]


def test_sequential_micro_batches_and_workers(tok, tmp_path):
    path = _write(tmp_path / "t.json", _text_records(7))
    args = DataArguments(data_path=path, batch_size=3, sampling="sequential")
    one = FinetuneData(args, tok)
    ids = [[r.sample_id for r in one.micro_batch_records(k)] for k in range(4)]
    assert ids == [["t0", "t1", "t2"], ["t3", "t4", "t5"], ["t6", "t0", "t1"], ["t2", "t3", "t4"]]
    workers = [FinetuneData(args, tok, world_size=2, rank=r) for r in range(2)]
    for k in range(6):  # worker r takes micro-batches k = r, r + 2, ...
        assert [r.sample_id for r in workers[k % 2].micro_batch_records(k // 2)] == \
            [r.sample_id for r in one.micro_batch_records(k)]
    batch = one.build(one.micro_batch_records(2))
    np.testing.assert_array_equal(
        batch["input_ids"], build_micro_batch(one.micro_batch_records(2), tok, args.max_length)["input_ids"])
    assert one.micro_batches_per_epoch == 2 and workers[1].micro_batches_per_epoch == 1


def test_sequential_refuses_micro_batches_of_two_kinds(tok, tmp_path):
    text = _write(tmp_path / "t.json", _text_records(3))
    multi = _write(tmp_path / "m.json", _image_records(2, tmp_path))
    listing = tmp_path / "data.txt"
    listing.write_text(f"{text}\n{multi}\n")
    with pytest.raises(FinetuneDataError, match=r"micro-batch 1 .*mixes image samples .*m\.json sample #0"):
        FinetuneData(DataArguments(data_path=str(listing), batch_size=2, sampling="sequential"), tok)
    listing.write_text(f"{text} 0.667\n{multi}\n")  # 2 texts: every micro-batch is one kind
    FinetuneData(DataArguments(data_path=str(listing), batch_size=2, sampling="sequential"), tok)


# ---------------------------------------------------------------------------------------------------------
# Errors name the sample

@pytest.mark.parametrize("mutate, message", [
    (lambda r, d: r.update(image=str(d / "missing.jpg")), r"bad\.json sample #1 \(id 'm1'\): no such image file"),
    (lambda r, d: r["conversations"][0].update(value="<ImageHere> and <ImageHere>"),
     r"sample #1 \(id 'm1'\): 2 <ImageHere> marker\(s\) but 1 image"),
    (lambda r, d: r.update(conversations=[]), r"sample #1 \(id 'm1'\): the conversation is empty"),
    (lambda r, d: r.pop("image"), r"sample #1 \(id 'm1'\): has no 'image' while the file's first sample has one"),
    (lambda r, d: r.update(image=[]), r"sample #1 \(id 'm1'\): 'image' must be a path or a non-empty list"),
])
def test_bad_samples_are_named(tok, tmp_path, mutate, message):
    records = _image_records(3, tmp_path)
    mutate(records[1], tmp_path)
    path = _write(tmp_path / "bad.json", records)
    with pytest.raises(FinetuneDataError, match=message):
        FinetuneData(DataArguments(data_path=path, batch_size=1), tok)


def test_samples_without_target_are_trained_as_upstream_with_a_warning(tok, tmp_path, caplog):
    """Upstream trains on a sample whose supervised tokens max_length all cuts (and on one without an answer):
    it contributes nothing to its micro-batch's loss. Accepted, one warning per such sample naming it."""
    records = _image_records(3, tmp_path)  # 841 image tokens, then the question and the answer
    records[2]["conversations"] = [{"from": "human", "value": "only asking"}]
    path = _write(tmp_path / "cut.json", records)
    with caplog.at_level(logging.WARNING, logger="mindxcomposer.finetune.data"):
        data = FinetuneData(DataArguments(data_path=path, batch_size=1, max_length=880), tok)
    assert [d.split("/")[-1] for d in data.samples_without_target] == ["cut.json sample #2 (id 'm2')"]
    assert [r.getMessage() for r in caplog.records if "sample #0" in r.getMessage()] == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mindxcomposer.finetune.data"):
        data = FinetuneData(DataArguments(data_path=path, batch_size=1, max_length=850), tok)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert [d.split("/")[-1] for d in data.samples_without_target] == [f"cut.json sample #{i} (id 'm{i}')"
                                                                        for i in range(3)]
    m = re.search(r"cut\.json sample #0 \(id 'm0'\): max_length=850 cuts every supervised token: the sample is (\d+) "
                  r"positions long and its first supervised token is at position (\d+) \(max_length >= (\d+) keeps it\)",
                  messages[0])
    assert m, messages[0]
    length, first, needed = map(int, m.groups())
    assert needed == first + 1 and 850 < needed <= length
    # The bound is right: one position less cuts every target, the bound keeps one.
    assert not (build_micro_batch(data.groups[0].records[:1], tok, needed - 1)["labels"][0, 1:] != -100).any()
    assert (build_micro_batch(data.groups[0].records[:1], tok, needed)["labels"][0, 1:] != -100).sum() == 1
    assert "sample #2 (id 'm2'): no supervised token" in messages[2]


def test_bad_data_lists(tok, tmp_path):
    text = _write(tmp_path / "t.json", _text_records(3))
    listing = tmp_path / "data.txt"
    listing.write_text(f"{text}\n")
    with pytest.raises(FinetuneDataError, match=r"line 1: with given_num every line needs"):
        FinetuneData(DataArguments(data_path=str(listing), given_num=True), tok)
    listing.write_text(f"{text} 0.5\n{text} 1\n")
    with pytest.raises(FinetuneDataError, match=r"line 2: .* is listed twice"):
        FinetuneData(DataArguments(data_path=str(listing)), tok)
    with pytest.raises(FinetuneDataError, match=r"no such data file"):
        FinetuneData(DataArguments(data_path=str(tmp_path / "nope.json")), tok)
    with pytest.raises(FinetuneDataError, match=r"must name a \.json file"):
        FinetuneData(DataArguments(data_path=str(tmp_path / "data.csv")), tok)
    with pytest.raises(ValueError, match=r"sampling must be one of"):
        FinetuneData(DataArguments(data_path=text, sampling="shuffle"), tok)


# ---------------------------------------------------------------------------------------------------------
# Flags and the inspection command

def test_upstream_flags_parse_as_upstream():
    from mindxcomposer.finetune.arguments import parse_data_arguments
    args = parse_data_arguments(["--data_path", "d.txt", "--given_num", "True", "--batch_size", "2", "--hd_num", "6",
                                 "--max_length", "16384"])
    assert (args.data_path, args.given_num, args.batch_size, args.hd_num, args.max_length) == ("d.txt", True, 2, 6, 16384)
    assert parse_data_arguments(["--given_num"]).given_num is True
    assert parse_data_arguments(["--given_num", "false"]).given_num is False
    assert parse_data_arguments([]) == DataArguments()
    with pytest.raises(SystemExit):
        parse_data_arguments(["--sampling", "shuffle"])


def test_inspect_data_command(tmp_path, capsys):
    from mindxcomposer.finetune.inspect_data import main
    path = _write(tmp_path / "m.json", _image_records(2, tmp_path))
    assert main(["--data_path", path, "--batch_size", "2", "--show", "1", "--sampling", "sequential"]) == 0
    out = capsys.readouterr().out
    assert "2 multi samples" in out and "micro-batch 0: multi" in out and "m.json sample #1 (id 'm1')" in out
    assert main(["--data_path", path, "--batch_size", "1", "--max_length", "100", "--show", "1"]) == 0
    assert "micro-batch 0: multi, length 100, supervised [0]" in capsys.readouterr().out


def test_text_sample_with_a_marker_is_an_error(tok, tmp_path):
    records = _text_records(2)
    records[0]["conversations"][0]["value"] = "What is <ImageHere>?"
    with pytest.raises(FinetuneDataError, match=r"sample #0 \(id 't0'\): 1 <ImageHere> marker\(s\) but 0 image"):
        FinetuneData(DataArguments(data_path=_write(tmp_path / "t.json", records)), tok)


def test_pixel_values_fit_the_model_vision_path(tok, demo_model):
    """Each image of a micro-batch goes through the model's `img2emb` into exactly the positions the
    micro-batch gives it."""
    group, = load_data(f"{os.path.relpath(FIXTURES, REPO)}/data/two.json", root=REPO)
    batch = build_micro_batch(group.records[:2], tok, 16384, hd_num=2)
    assert len(batch["pixel_values"]) == 3
    for (row, start, kept), px in zip(batch["image_spans"].tolist(), batch["pixel_values"]):
        embeds = demo_model.img2emb(px)[0]
        assert embeds.shape[1] == kept and batch["im_mask"][row, start:start + kept].all()
