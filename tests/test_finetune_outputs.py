"""mxc-finetune's outputs: checkpoints and resuming, the adapter in peft's layout, the full model directory,
`merge`, dropout that recomputation reproduces, the command line and its errors."""
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from mindxcomposer.atomic import atomic_dir
from mindxcomposer.finetune.checkpoints import checkpoint_dirs
from mindxcomposer.finetune.lora import load_adapter
from mindxcomposer.finetune.merge import merge
from mindxcomposer.finetune.trainer import Trainer
from mindxcomposer.finetune.training_args import parse_args
from mindxcomposer.modeling_xcomposer2 import InternLMXComposer2ForCausalLM
from mindxcomposer.weights import Checkpoint

from test_finetune_train import CASES, REPO, run_case

BY_NAME = {c["name"]: c for c in CASES}


def _state(out):
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("name,at", [("lora_text", 2), ("full_epochs", 3)])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(name, at, tmp_path):
    """full_epochs step 3 accumulates across the epoch boundary; resuming after it must pick up there."""
    case = BY_NAME[name]
    whole, result, _ = run_case(case, tmp_path / "a", ["--save_strategy", "steps", "--save_steps", "1",
                                                        "--save_total_limit", "3"])
    out = whole.args.output_dir
    steps = [s for s, _ in checkpoint_dirs(out)]
    assert steps == [result.global_step - 2, result.global_step - 1, result.global_step]  # save_total_limit
    ckpt = os.path.join(out, f"checkpoint-{at}")
    resumed, result2, _ = run_case(case, tmp_path / "b", ["--resume_from_checkpoint", ckpt])
    assert [e for e in result2.log_history if "loss" in e] == [e for e in result.log_history if "loss" in e]
    a, b = whole.trainables.numpy(), resumed.trainables.numpy()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert resumed.optimizer.steps == whole.optimizer.steps


def test_lora_outputs_peft_layout_and_merge(tmp_path):
    case = BY_NAME["lora_text"]
    trainer, result, _ = run_case(case, tmp_path)
    out = trainer.args.output_dir
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json"} <= set(os.listdir(out))
    cfg = json.load(open(os.path.join(out, "adapter_config.json"), encoding="utf-8"))
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["task_type"]) == ("LORA", 4, 8, "CAUSAL_LM")
    settings, tensors = load_adapter(out, trainer.model.config)
    trained = trainer.trainables.numpy()
    assert set(tensors) == set(trained)
    for k, v in tensors.items():
        np.testing.assert_array_equal(v, trained[k])
    assert any(k.endswith("layers.0.attention.wqkv.lora_A.weight") and k.startswith("base_model.model.model.")
               for k in tensors)
    assert _state(out)["log_history"] == result.log_history

    # merge: the merged model without adapter computes the adapted model's loss
    merged = merge(out, trainer.args.model_name_or_path, str(tmp_path / "merged"))
    batch = trainer.data.build(trainer.data.micro_batch_records(0))
    with_adapter = trainer.grads.loss_and_grads(batch, 1.0)[0]
    data_args = trainer.data_args
    argv = ["--model_name_or_path", merged, "--output_dir", str(tmp_path / "x"), "--data_path",
            data_args.data_path, "--batch_size", str(data_args.batch_size), "--per_device_train_batch_size", "1",
            "--plora_dropout", "0", "--sampling", "sequential", "--max_length", str(data_args.max_length)]
    plain = Trainer(*parse_args(argv), data_root=REPO)
    assert plain.grads.loss_and_grads(batch, 1.0)[0] == pytest.approx(with_adapter, rel=1e-5)
    base = Checkpoint(trainer.args.model_name_or_path)
    changed = Checkpoint(merged)
    name = "model.layers.1.feed_forward.w2.weight"
    assert not np.array_equal(base.get(name), changed.get(name))
    assert np.array_equal(base.get("model.layers.1.feed_forward.w2.Plora_A.weight"),
                          changed.get("model.layers.1.feed_forward.w2.Plora_A.weight"))


def test_full_output_is_a_model_directory(tmp_path):
    case = BY_NAME["full_epochs"]
    trainer, _, _ = run_case(case, tmp_path)
    model = InternLMXComposer2ForCausalLM.from_pretrained(trainer.args.output_dir)
    trained = trainer.trainables.numpy()
    for name, p in model.parameters_and_names():
        key = p.name
        if key in trained:
            np.testing.assert_array_equal(p.asnumpy(), trained[key], err_msg=key)
    assert model.tokenizer is not None
    response, _ = model.chat(model.tokenizer, "hi", max_new_tokens=3, do_sample=False, num_beams=1)
    assert isinstance(response, str)


@pytest.mark.parametrize("path", ["blocks", "blocks of 16", "one graph"])
def test_dropout_masks_are_reproduced_by_recomputation(path, tmp_path, monkeypatch):
    """With dropout on, gradients must still be those of the loss the forward computed: the masks drawn
    in a block's recomputation equal the forward's (a finite difference along the gradient agrees), also when a
    decoder layer runs by blocks of 16 rows, whose masks are those of the whole sequence (the same loss), and in the
    one-graph decoder (activations kept, nothing recomputed), which draws the masks the blocks draw (the same loss)."""
    import mindxcomposer.finetune.backprop as backprop
    flags = ["--lora_dropout", "0.3", "--plora_dropout", "0.3", "--max_steps", "1"]
    whole = None
    if path != "blocks":  # the loss of the same micro-batch by blocks of the whole sequence
        monkeypatch.setattr(backprop, "KEEP_ACTIVATIONS_BYTES", None)
        monkeypatch.setattr(backprop, "LAYER_ROWS", 10 ** 6)
        t0, _, _ = run_case(BY_NAME["lora_text"], tmp_path / "whole", flags)
        whole = t0.grads.loss_and_grads(t0.data.build(t0.data.micro_batch_records(0)), 1.0, seed=5.0)[0]
        monkeypatch.undo()
    if path != "one graph":
        monkeypatch.setattr(backprop, "KEEP_ACTIVATIONS_BYTES", None)
    if path == "blocks of 16":
        monkeypatch.setattr(backprop, "LAYER_ROWS", 16)
    case = BY_NAME["lora_text"]
    trainer, _, _ = run_case(case, tmp_path, flags)
    batch = trainer.data.build(trainer.data.micro_batch_records(0))
    g = trainer.grads
    assert g.math.has_seed
    l1, grads, _ = g.loss_and_grads(batch, 1.0, seed=5.0)
    assert bool(g._decoder_grads) == (path == "one graph")  # the path asked for is the one that ran
    if path == "blocks of 16":
        assert batch["input_ids"].shape[1] > 3 * 16
    if whole is not None:
        assert abs(l1 - whole) <= 1e-6 * abs(whole), (l1, whole)
    assert g.loss_and_grads(batch, 1.0, seed=5.0)[0] == l1
    assert g.loss_and_grads(batch, 1.0, seed=6.0)[0] != l1
    name = "base_model.model.model.layers.0.attention.wqkv.lora_A.weight"
    p = trainer.trainables.params[name]
    d = grads[name].asnumpy()
    d = d / np.linalg.norm(d)
    base = p.asnumpy().copy()
    eps = 1e-2
    ms.ops.assign(p, ms.Tensor(base + eps * d))
    lp = g.loss_and_grads(batch, 1.0, seed=5.0)[0]
    ms.ops.assign(p, ms.Tensor(base - eps * d))
    lm = g.loss_and_grads(batch, 1.0, seed=5.0)[0]
    ms.ops.assign(p, ms.Tensor(base))
    assert (lp - lm) / (2 * eps) == pytest.approx(float(np.linalg.norm(grads[name].asnumpy())), rel=2e-2)


def test_an_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "checkpoint-7"
    with pytest.raises(RuntimeError):
        with atomic_dir(str(target)) as tmp:
            open(os.path.join(tmp, "half"), "w").write("x")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def _cli(*argv, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "mindxcomposer.finetune.cli", *argv], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def test_cli_runs_upstream_flags_and_merges(tmp_path):
    """An upstream finetune_lora.sh-style command line, unchanged but for the command (plus our sampling flag)."""
    from mindxcomposer.demo import save_demo_model, tiny_config
    model = save_demo_model(str(tmp_path / "model"), tiny_config(max_position_embeddings=4096))
    out = tmp_path / "out"
    r = _cli("--model_name_or_path", model, "--data_path", "tests/fixtures/finetune_train/data/text4.json",
             "--given_num", "False", "--bf16", "False", "--fix_vit", "True", "--fix_sampler", "True", "--use_lora", "True",
             "--hd_num", "18", "--output_dir", str(out), "--num_train_epochs", "1", "--batch_size", "2",
             "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
             "--gradient_accumulation_steps", "1", "--evaluation_strategy", "no", "--save_strategy", "epoch",
             "--save_total_limit", "1", "--learning_rate", "5e-5", "--weight_decay", "0.1", "--adam_beta2", "0.95",
             "--warmup_ratio", "0.01", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--report_to", "none",
             "--max_length", "16384", "--deepspeed", "ds_config_zero2.json", "--gradient_checkpointing", "True",
             "--lora_r", "4", "--sampling", "sequential", "--progress", "False")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(out / "adapter_model.safetensors")
    assert [s for s, _ in checkpoint_dirs(str(out))] == [2]
    assert len([e for e in _state(str(out))["log_history"] if "loss" in e]) == 2
    r = _cli("merge", "--adapter_model_name", str(out), "--base_model_name", model, "--output_name", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(tmp_path / "m" / "model.safetensors")


@pytest.mark.parametrize("flags,message", [
    (["--per_device_train_batch_size", "2"], "per_device_train_batch_size"),
    (["--lr_scheduler_type", "reduce_lr_on_plateau"], "lr_scheduler_type"),
    (["--optim", "adafactor"], "optim"),
    (["--lora_weight_path", "/nonexistent"], "lora_weight_path"),
    (["--use_lora", "True", "--lora_target_modules", "q_proj"], "match none"),
    (["--data_path", "tests/fixtures/finetune_train/data/missing.json"], "missing.json"),
])
def test_cli_bad_arguments_fail_before_work(flags, message, tmp_path):
    argv = ["--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "o"),
            "--data_path", "tests/fixtures/finetune_train/data/text4.json", "--per_device_train_batch_size", "1"] + flags
    r = _cli(*argv)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "o")


def test_lora_on_a_bf16_checkpoint_equals_fp32_of_the_same_values(tmp_path):
    """The release is bf16: a LoRA run keeps the base in bf16 (no fp32 copy) and computes in fp32, which must
    give exactly what an fp32 checkpoint holding the same (bf16-representable) values gives."""
    from mindxcomposer.demo import save_demo_model, tiny_config
    from mindxcomposer.weights import Checkpoint as Ck, bf16_to_fp32, fp32_to_bf16, write_safetensors
    case = BY_NAME["lora_text"]
    src = save_demo_model(str(tmp_path / "src"), tiny_config(**case["config_overrides"]), case["seed"])
    outs = {}
    for kind in ("bf16", "fp32"):
        d = tmp_path / kind
        d.mkdir()
        for f in os.listdir(src):
            if f != "model.safetensors":
                (d / f).write_bytes(open(os.path.join(src, f), "rb").read())
        bits = {n: fp32_to_bf16(a) for n, a in Ck(src).items()}
        if kind == "bf16":
            write_safetensors(str(d / "model.safetensors"), bits, dtypes={n: "BF16" for n in bits})
        else:
            write_safetensors(str(d / "model.safetensors"), {n: bf16_to_fp32(b) for n, b in bits.items()})
        argv = list(case["argv"]) + ["--model_name_or_path", str(d), "--output_dir", str(tmp_path / f"o-{kind}"),
                                     "--sampling", "sequential", "--plora_dropout", "0", "--progress", "False"]
        i = argv.index("--data_path")
        argv[i + 1] = os.path.join(REPO, argv[i + 1])
        trainer = Trainer(*parse_args(argv), data_root=REPO)
        assert str(trainer.model.model.layers[0].attention.wqkv.weight.dtype) == ("BFloat16" if kind == "bf16"
                                                                                  else "Float32")
        outs[kind] = (trainer.train().log_history, trainer.trainables.numpy())
    steps = lambda h: [e for e in h if "loss" in e]
    for a, b in zip(steps(outs["bf16"][0]), steps(outs["fp32"][0])):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for k, v in outs["fp32"][1].items():
        np.testing.assert_allclose(outs["bf16"][1][k], v, rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("rows", [8, 40])
def test_frozen_bf16_head_by_vocabulary_slices_equals_autodiff(mode, rows):
    """`_frozen_head` (a bf16 head read 8192 rows at a time, gradient written out) against the compiled
    autodiff head on the fp32 values of the same weights, over three vocabulary slices; 2 x 8 rows take the
    decode-sized products, 2 x 40 the GEMM kernels (on CPU; this path runs where the kernels are not built)."""
    from mindxcomposer.demo import tiny_config
    from mindxcomposer.finetune.backprop import MicroBatchGradients
    from mindxcomposer.finetune.layer_grads import HeadLossGrad
    from mindxcomposer.weights import bf16_to_fp32, fp32_to_bf16
    g = MicroBatchGradients.__new__(MicroBatchGradients)  # only the config is needed
    g.config = tiny_config()
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((2, rows, 64)).astype(np.float32))
    norm = ms.Tensor((1 + 0.1 * rng.standard_normal(64)).astype(np.float32))
    head32 = bf16_to_fp32(fp32_to_bf16((rng.standard_normal((20000, 64)) * 0.1).astype(np.float32)))
    labels = ms.Tensor(rng.integers(0, 20000, (2, rows)).astype(np.int32))
    valid = np.ones((2, rows), np.float32)
    valid[1, 5:] = 0
    loss, dx = g._frozen_head(x, labels, ms.Tensor(valid), float(valid.sum()), 0.5, norm,
                              ms.Tensor(head32).astype(ms.bfloat16))
    ref_loss, ref_dx = HeadLossGrad(g.config.rms_norm_eps, False)(
        x, labels, ms.Tensor(valid), ms.Tensor(np.float32(valid.sum())), ms.Tensor(np.float32(0.5)), norm,
        ms.Tensor(head32))
    assert float(loss.asnumpy()) == pytest.approx(float(ref_loss.asnumpy()), rel=1e-6)
    np.testing.assert_allclose(dx.asnumpy(), ref_dx.asnumpy(), rtol=1e-5, atol=1e-7)
