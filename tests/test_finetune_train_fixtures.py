"""The golden training runs of upstream's finetune.py (tests/fixtures/finetune_train/, made by
tools/reference/make_finetune_train_fixtures.py) against this repository's data pipeline: the micro-batches the
Trainer ran, in its order across epochs, are those `--sampling sequential` gives, with the same kind and [B, L];
and the fixtures hold what a parity test of the trainer needs (every trainable weight, the initial adapter, the
step/micro-batch bookkeeping)."""
import json
import os

import numpy as np
import pytest

from mindxcomposer.finetune import DataArguments, FinetuneData
from mindxcomposer.tokenization_internlm2 import InternLM2Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FIXTURES = os.path.join(HERE, "fixtures", "finetune_train")
CASES = json.load(open(os.path.join(FIXTURES, "cases.json"), encoding="utf-8"))["cases"]
BIG = ("model.tok_embeddings.weight", "output.weight")


def flag(case, name, default=None):
    argv = case["argv"]
    return argv[argv.index(name) + 1] if name in argv else default


@pytest.fixture(scope="module")
def tok():
    return InternLM2Tokenizer.from_pretrained()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_sequential_sampling_is_the_trainers_order(case, tok):
    args = DataArguments(data_path=flag(case, "--data_path"), batch_size=int(flag(case, "--batch_size")),
                         hd_num=int(flag(case, "--hd_num", "18")), max_length=int(flag(case, "--max_length")),
                         sampling="sequential")
    data = FinetuneData(args, tok, root=REPO)
    assert data.micro_batches_per_epoch == max(m["item"] for m in case["micro_batches"]) + 1
    built = {}
    for j, upstream in enumerate(case["micro_batches"]):  # j: the j-th micro-batch the Trainer ran
        assert data.sampler.global_indices(j) == upstream["samples"], j
        records = data.micro_batch_records(j)
        key = tuple(upstream["samples"])
        if key not in built:
            built[key] = data.build(records)
        batch = built[key]
        assert batch["data_type"] == upstream["data_type"], j
        assert list(batch["input_ids"].shape) == upstream["shape"], j


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fixture_holds_what_a_trainer_test_needs(case):
    arrays = np.load(os.path.join(FIXTURES, f"{case['name']}.npz"))
    with open(os.path.join(FIXTURES, f"{case['name']}.trainer_state.json"), encoding="utf-8") as f:
        steps = [e for e in json.load(f)["log_history"] if "grad_norm" in e]
    for name in case["trainable"]:
        if name in BIG:
            rows = arrays[f"rows/{name}"]
            assert arrays[f"final_rows/{name}"].shape[0] == rows.shape[0]
            assert arrays[f"final_rownorm/{name}"].shape == (92544,)
        else:
            assert f"final/{name}" in arrays.files, name
    initial = sorted(k[len("initial/"):] for k in arrays.files if k.startswith("initial/"))
    if case["initial_adapter"]:
        assert initial == case["saved_files"]["adapter_model.bin"]
    else:
        assert not initial
    # Bookkeeping: one entry per optimizer step, its loss the sum of its micro-batches' / accumulation.
    ga = int(flag(case, "--gradient_accumulation_steps"))
    assert len(steps) == len(case["micro_batches_per_step"]) >= 3
    # A micro-batch without target has upstream's NaN loss (null here): transformers' logging_nan_inf_filter adds the
    # step's loss so far in its place (logging every step).
    for entry, mbs in zip(steps, case["micro_batches_per_step"]):
        expected = np.float32(0)
        for i in mbs:
            loss = case["micro_batches"][i]["loss"]
            expected = expected + (expected if loss is None else np.float32(loss) / np.float32(ga))
        assert entry["loss"] == pytest.approx(float(expected), rel=1e-6)
    max_norm = float(flag(case, "--max_grad_norm"))
    assert any(e["grad_norm"] > max_norm for e in steps) and any(e["grad_norm"] <= max_norm for e in steps)
