"""LoRA over a frozen quantized base (`mxc-convert --quantize int8|int4`): the same training as LoRA over the
dequantized model stored in fp32 (its "twin"): the first micro-batch's loss and every adapter gradient, then
the logged losses and gradient norms of a few optimizer steps and the trained adapter, with the CPU kernels and
on the portable path. What a quantized base refuses (full fine-tuning, merging), before any work, and the way
to a merged quantized model that docs/finetune.md gives."""
import gc
import os

import numpy as np
import pytest

from model_helpers import dequantized_twin

from mindxcomposer.convert import convert
from mindxcomposer.demo import save_demo_model, tiny_config
from mindxcomposer.finetune import backprop
from mindxcomposer.finetune.lora import WEIGHTS_FILE, LoraSettings, adapter_name, init_adapter, save_adapter
from mindxcomposer.finetune.merge import merge
from mindxcomposer.finetune.quantized_base import QuantizedBaseError
from mindxcomposer.finetune.trainer import Trainer
from mindxcomposer.finetune.training_args import parse_args
from mindxcomposer.ops import cpu_kernels, weight_products as wp
from mindxcomposer.weights import SafetensorsFile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two image samples and text ones, Partial LoRA on the image rows; every target linear, separators trained
# (their gradient crosses every quantized linear's input gradient).
LORA_ARGV = ["--bf16", "False", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
             "--per_device_train_batch_size", "1", "--weight_decay", "0.1", "--adam_beta2", "0.95",
             "--learning_rate", "1e-3", "--max_length", "4096",
             "--data_path", os.path.join(REPO, "tests/fixtures/finetune_train/data/full_mixed.txt"),
             "--use_lora", "True", "--fix_vit", "True", "--fix_sampler", "True", "--lora_dropout", "0",
             "--plora_dropout", "0", "--hd_num", "1", "--batch_size", "2", "--gradient_accumulation_steps", "1",
             "--max_steps", "3", "--warmup_steps", "1", "--lr_scheduler_type", "cosine", "--lora_r", "4",
             "--lora_alpha", "8", "--max_grad_norm", "1.0", "--sampling", "sequential", "--progress", "False"]
SCHEMES = {"int8": ("int8", None), "int4": ("int4", 32)}  # int4: two groups of the hidden size's 64 inputs


def quiet():
    return open(os.devnull, "w")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{"src": the fp32 model, scheme: (quantized dir, its dequantized fp32 twin)}."""
    root = tmp_path_factory.mktemp("qlora")
    src = save_demo_model(str(root / "src"), tiny_config(max_position_embeddings=4096), seed=3)
    # The run starts from an adapter whose B is not zero (peft starts B at zero, where A has no gradient).
    settings = LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0)
    initial = init_adapter(tiny_config(), settings, seed=5)
    rng = np.random.default_rng(6)
    for n in initial:
        if ".lora_B." in n:
            initial[n] = (0.05 * rng.standard_normal(initial[n].shape)).astype(np.float32)
    save_adapter(str(root / "initial"), initial, settings)
    built = {"src": src, "initial": str(root / "initial")}
    for name, (scheme, gs) in SCHEMES.items():
        q = str(root / name)
        convert(src, q, quantize=scheme, group_size=gs, progress_stream=quiet())
        built[name] = (q, dequantized_twin(q, str(root / f"{name}-twin")))
    return built


def trainer(model_dir, out, extra=(), initial=None):
    """A LoRA run (`LORA_ARGV`) on `model_dir`, from the adapter in `initial` if given."""
    start = ["--lora_weight_path", initial] if initial else []
    args, data_args = parse_args(LORA_ARGV + ["--model_name_or_path", model_dir, "--output_dir", out] + start +
                                 list(extra))
    return Trainer(args, data_args, data_root=REPO)


def first_grads_and_run(model_dir, out, extra, initial):
    """(loss and gradients of the first micro-batch, the run's log, the trained adapter, rows per decoder block)."""
    t = trainer(model_dir, out, extra, initial)
    assert not any(n.endswith((".qweight", ".scales", ".qzeros")) for n in t.trainables.names)
    loss, grads, _ = t.grads.loss_and_grads(t.data.build(t.data.micro_batch_records(0)), 1.0, 0.0)
    grads = {n: g.asnumpy() for n, g in grads.items()}
    result = t.train()
    rows = t.grads.layer_blocks.rows
    del t
    gc.collect()  # the compiled gradient cells of this run
    adapter = SafetensorsFile(os.path.join(out, WEIGHTS_FILE))
    return loss, grads, result.log_history, {k: adapter.get(k, np.float32) for k in adapter.keys()}, rows


def close(ours, ref, rel, what):
    """|ours - ref| <= rel * max |ref| (each tensor on its own scale: gradients are far below 1)."""
    err = float(np.abs(np.asarray(ours, np.float64) - ref).max())
    tol = rel * float(np.abs(ref).max())
    assert err <= tol, f"{what}: {err:.3g} > {tol:.3g}"
    return err


# Each scheme, each path and each arithmetic at least once, in three runs (a trainer's compiled cells cost ~0.5
# GiB that MindSpore's memory pool keeps for the process, and each run trains twice: the whole matrix would
# double the module's memory and time). The kernels themselves are checked against the twin's GEMM bit for bit
# for both schemes, both arithmetics and every build in test_quant_grads.py.
RUNS = [("int8", "cpu", "exact"), ("int4", "cpu", "bf16"), ("int4", "portable", "exact")]


@pytest.mark.parametrize("scheme,kernels,products", RUNS, ids=["-".join(r) for r in RUNS])
def test_lora_over_a_quantized_base_trains_as_over_its_twin(scheme, kernels, products, bases, graph_mode,
                                                            monkeypatch, tmp_path):
    if kernels == "cpu" and not wp.enable_kernels():
        pytest.skip("no kernels here")
    if kernels == "portable":
        monkeypatch.setattr(wp, "_kernels", None)
    extra = ["--bf16", "True"] if products == "bf16" else []
    # The twin's bf16 products go to oneDNN where installed; the quantized weights' stay on the own GEMM
    # (tested against it bit for bit in test_quant_grads.py): one GEMM for both runs here.
    onednn = kernels == "cpu" and cpu_kernels.onednn()
    if (scheme, kernels, products) == RUNS[0]:
        # Blocks of one length bucket over the twin, of QUANTIZED_ROWS_FACTOR buckets over the quantized base: the
        # samples span several blocks whose boundaries differ between the two runs (a weight gradient adds other
        # partial sums), which must still agree within the tolerances.
        monkeypatch.setattr(backprop, "BLOCK_ELEMENTS", backprop.LENGTH_BUCKET * tiny_config().intermediate_size)
        monkeypatch.setattr(backprop, "KEEP_ACTIVATIONS_BYTES", None)  # by blocks (the other runs: one graph)
    if onednn:
        cpu_kernels.onednn(False)
    try:
        qdir, twin_dir = bases[scheme]
        q = first_grads_and_run(qdir, str(tmp_path / "q"), extra, bases["initial"])
        twin = first_grads_and_run(twin_dir, str(tmp_path / "twin"), extra, bases["initial"])
    finally:
        if onednn:
            cpu_kernels.onednn(True)
    (q_loss, q_grads, q_log, q_adapter, q_rows), (t_loss, t_grads, t_log, t_adapter, t_rows) = q, twin
    assert q_rows == backprop.QUANTIZED_ROWS_FACTOR * t_rows
    errors = {"first loss": close(q_loss, t_loss, 1e-5, "first micro-batch loss")}
    assert sorted(q_grads) == sorted(t_grads)
    # every target of both layers and the two separators got a gradient
    assert adapter_name(0, "attention.wqkv", "A") in q_grads and "base_model.model.plora_sub_GN" in q_grads
    for name, ref in t_grads.items():
        assert np.abs(ref).max() > 0, name
        errors["gradients"] = max(errors.get("gradients", 0.0), close(q_grads[name], ref, 1e-5, f"gradient of {name}")
                                  / float(np.abs(ref).max()))
    steps = [(a, b) for a, b in zip(q_log, t_log) if "loss" in b]
    assert len(steps) == 3
    for k, (a, b) in enumerate(steps):
        errors[f"step {k + 1} loss"] = close(a["loss"], b["loss"], 1e-5 if k == 0 else 1e-4, f"step {k + 1} loss")
        close(a["grad_norm"], b["grad_norm"], 1e-4, f"step {k + 1} grad_norm")
    assert sorted(q_adapter) == sorted(t_adapter)
    moved = 0.0
    for name, ref in t_adapter.items():
        close(q_adapter[name], ref, 1e-4, f"trained {name}")
        if ".lora_B." in name:
            moved = max(moved, float(np.abs(ref).max()))  # B starts at zero: training moved it
    assert moved > 1e-4
    if (scheme, kernels, products) == RUNS[1]:
        # The comparison has teeth: over the unquantized source the same micro-batch's loss differs from the
        # twin's by the base's quantization error, far above the tolerance.
        t = trainer(bases["src"], str(tmp_path / "src"), extra, bases["initial"])
        src_loss, _, _ = t.grads.loss_and_grads(t.data.build(t.data.micro_batch_records(0)), 1.0, 0.0)
        assert abs(src_loss - t_loss) > 1e-3 * abs(src_loss), (src_loss, t_loss)
    print(f"{scheme} {kernels} {products}: differences from the twin (gradients: relative to each tensor) {errors}")


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_full_fine_tuning_of_a_quantized_base_is_refused_before_any_work(scheme, bases, tmp_path, monkeypatch):
    import mindxcomposer.finetune.trainer as trainer_mod

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the quantized base was refused")

    monkeypatch.setattr(trainer_mod, "load_model", no_loading)
    out = tmp_path / "out"
    with pytest.raises(QuantizedBaseError, match=r"stores the decoder's linears quantized .*--use_lora True"):
        trainer(bases[scheme][0], str(out), ["--use_lora", "False", "--fix_vit", "False"])
    assert not out.exists()


def test_mxc_finetune_names_the_problem(bases, tmp_path, capsys):
    from mindxcomposer.finetune.cli import main

    argv = [a if a != "True" or i == 0 or LORA_ARGV[i - 1] != "--use_lora" else "False"
            for i, a in enumerate(LORA_ARGV)]
    rc = main(argv + ["--model_name_or_path", bases["int4"][0], "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc != 0 and "int4, groups of 32" in err and "full fine-tuning (--use_lora False)" in err, err
    assert not (tmp_path / "out").exists()


def test_merging_into_a_quantized_base_is_refused_and_the_documented_way_works(bases, graph_mode, tmp_path):
    """`mxc-finetune merge` into a quantized base: a clear error, nothing written. The way docs/finetune.md gives:
    merge into the unquantized source, then quantize the merged model; it loads and carries the adapter."""
    if not wp.enable_kernels():
        pytest.skip("no kernels here")
    qdir = bases["int4"][0]
    adapter = str(tmp_path / "adapter")
    trainer(qdir, adapter, ["--max_steps", "2"], bases["initial"]).train()
    out = tmp_path / "merged-q"
    with pytest.raises(QuantizedBaseError, match="Merge into the unquantized checkpoint"):
        merge(adapter, qdir, str(out))
    assert not out.exists()

    from mindxcomposer import InternLMXComposer2ForCausalLM as M
    from mindxcomposer.weights import Checkpoint

    merged = merge(adapter, bases["src"], str(tmp_path / "merged"))
    name = "model.layers.0.attention.wqkv.weight"
    assert not np.array_equal(Checkpoint(merged).get(name), Checkpoint(bases["src"]).get(name))
    requantized = str(tmp_path / "merged-int4")
    convert(merged, requantized, quantize="int4", group_size=32, progress_stream=quiet())
    assert M.from_pretrained(requantized).config.quantization == (4, 32)
