"""Data parallelism under msrun (issue 9, points 4 and 7): `msrun --worker_num 2 ... mxc-finetune` with
`--gradient_accumulation_steps 1` must train as one process with `--gradient_accumulation_steps 2` on the
same global batch (`--sampling sequential`: worker r takes micro-batches r, r+2, ...; every dropout 0):
the same per-step loss, learning rate and gradient norm in `trainer_state.json`, the same final weights,
both workers ending with identical weights, and only rank 0 writing outputs.

The tiny demo model on CPU; MindSpore's own collectives over loopback. Each msrun job starts a scheduler
and two workers (~20 s of start-up on two cores)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import ops
from safetensors.numpy import load_file

from mindxcomposer.demo import random_weights, save_demo_model, tiny_config
from mindxcomposer.finetune.distributed import World
from mindxcomposer.finetune.trainer import Trainer
from mindxcomposer.finetune.training_args import parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join("tests", "fixtures", "finetune_train", "data")  # relative to REPO, the runs' cwd
MSRUN = shutil.which("msrun")
CONFIG = dict(max_position_embeddings=4096)
MAX_STEPS = 3

needs_msrun = pytest.mark.skipif(MSRUN is None, reason="msrun (MindSpore's launcher) is not on PATH")

COMMON = ["--sampling", "sequential", "--lora_dropout", "0", "--plora_dropout", "0", "--per_device_train_batch_size",
          "1", "--max_steps", str(MAX_STEPS), "--learning_rate", "1e-3", "--weight_decay", "0.1", "--adam_beta2",
          "0.95", "--logging_steps", "1", "--save_strategy", "no", "--progress", "False", "--max_length", "4096",
          "--bf16", "False"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_demo_model(str(tmp_path_factory.mktemp("dp") / "model"), tiny_config(**CONFIG), 0)


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MS_", "RANK_"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # msrun runs its command as given only when the first word is literally `python` (or python3 /
    # pytest); anything else it runs as a script with `python`: make that word this interpreter.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _check(proc, what, log_dir=None):
    if proc.returncode == 0:
        return
    logs = ""
    if log_dir and os.path.isdir(log_dir):
        for name in sorted(os.listdir(log_dir)):
            with open(os.path.join(log_dir, name), encoding="utf-8", errors="replace") as f:
                lines = [ln for ln in f.read().splitlines() if "[WARNING]" not in ln and "[INFO]" not in ln]
            logs += f"\n--- {name}\n" + "\n".join(lines[-30:])
    pytest.fail(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}{logs}")


def one_worker(argv, out):
    proc = subprocess.run([sys.executable, "-m", "mindxcomposer.finetune.cli", *argv,
                           "--gradient_accumulation_steps", "2", "--output_dir", out],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    _check(proc, "mxc-finetune (1 worker)")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_workers(command, argv, out, log_dir):
    """`msrun --worker_num 2 ... <command> <argv>`, as docs/finetune.md shows it."""
    proc = subprocess.run([MSRUN, "--worker_num", "2", "--local_worker_num", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(_free_port()), "--join", "True", "--log_dir", log_dir,
                           *command, *argv, "--gradient_accumulation_steps", "1", "--output_dir", out],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    _check(proc, "msrun --worker_num 2 mxc-finetune", log_dir)


def assert_same_steps(one_dir, two_dir):
    """trainer_state.json's per-step loss (the mean over all micro-batches of the step, all workers),
    learning rate and pre-clipping gradient norm agree to 1e-5 relative."""
    def history(d):
        with open(os.path.join(d, "trainer_state.json"), encoding="utf-8") as f:
            return json.load(f)["log_history"]
    one, two = history(one_dir), history(two_dir)
    steps1, steps2 = [e for e in one if "loss" in e], [e for e in two if "loss" in e]
    assert [e["step"] for e in steps1] == list(range(1, MAX_STEPS + 1))
    assert [e["step"] for e in steps2] == [e["step"] for e in steps1]
    assert [e["epoch"] for e in steps2] == [e["epoch"] for e in steps1]
    for a, b in zip(steps1, steps2):
        for key in ("loss", "learning_rate", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-12), (a["step"], key, a[key], b[key])
    assert two[-1]["train_loss"] == pytest.approx(one[-1]["train_loss"], rel=1e-5)
    return steps1


def assert_same_tensors(one, two, rel=1e-5):
    """Equal within `rel` of each tensor's largest entry."""
    assert sorted(one) == sorted(two)
    for name in one:
        scale = max(float(np.abs(one[name]).max()), 1e-30)
        err = float(np.abs(one[name].astype(np.float64) - two[name]).max())
        assert err <= rel * scale, (name, err, scale)


def moved(before, after):
    """The largest change of each tensor, relative to its largest entry."""
    return {n: float(np.abs(after[n] - before[n]).max()) / max(float(np.abs(before[n]).max()), 1e-30) for n in after}


@needs_msrun
def test_lora_text_two_workers_match_one(model_dir, tmp_path):
    """LoRA on text-only data (4 samples, 2 per micro-batch: 2 micro-batches an epoch, so each epoch is one
    step of one micro-batch per worker), clipping active, launched exactly as documented."""
    argv = ["--model_name_or_path", model_dir, "--data_path", os.path.join(DATA, "text4.json"), "--use_lora", "True",
            "--lora_r", "4", "--lora_alpha", "8", "--batch_size", "2", "--warmup_steps", "0",
            "--lr_scheduler_type", "linear", "--max_grad_norm", "0.3", *COMMON]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    one_worker(argv, one)
    two_workers(["python", "-m", "mindxcomposer.finetune.cli"], argv, two, str(tmp_path / "msrun_logs"))

    for rank in (0, 1):  # both workers trained (the scheduler runs the command too, and must not)
        with open(tmp_path / "msrun_logs" / f"worker_{rank}.log", encoding="utf-8") as f:
            assert f"trained {MAX_STEPS} steps" in f.read()
    expected = {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"}
    assert set(os.listdir(one)) == expected and set(os.listdir(two)) == expected
    steps = assert_same_steps(one, two)
    assert all(e["grad_norm"] > 0.3 for e in steps)  # clipping acted in every step

    a1 = load_file(os.path.join(one, "adapter_model.safetensors"))
    a2 = load_file(os.path.join(two, "adapter_model.safetensors"))
    assert_same_tensors(a1, a2)
    # peft's B starts at zero: the adapter trained
    assert all(np.abs(a1[n]).max() > 1e-4 for n in a1 if ".lora_B." in n)
    with open(os.path.join(two, "adapter_config.json"), encoding="utf-8") as f:
        assert json.load(f)["r"] == 4


@needs_msrun
def test_full_image_and_text_two_workers_match_one(model_dir, tmp_path):
    """Full fine-tuning (ViT and projector too) of a data.txt mixing a text file, an image file (hd_num 1)
    and a text file, one sample per micro-batch, so that the steps pair (text, image), (image, text),
    (text, text): vision parameters get a gradient from one worker only in steps 1 and 2, and none in
    step 3, where they must not step (one process skips a parameter without gradient)."""
    with open(os.path.join(REPO, DATA, "text4.json"), encoding="utf-8") as f:
        text = json.load(f)
    for name, records in (("t1.json", text[:1]), ("t3.json", text[1:])):
        with open(tmp_path / name, "w", encoding="utf-8") as f:
            json.dump(records, f)
    with open(tmp_path / "data.txt", "w", encoding="utf-8") as f:
        f.write(f"{tmp_path / 't1.json'}\n{os.path.join(DATA, 'mixed_images.json')}\n{tmp_path / 't3.json'}\n")
    argv = ["--model_name_or_path", model_dir, "--data_path", str(tmp_path / "data.txt"), "--use_lora", "False",
            "--fix_vit", "False", "--fix_sampler", "False", "--hd_num", "1", "--batch_size", "1",
            "--warmup_steps", "1", "--lr_scheduler_type", "cosine", "--max_grad_norm", "1.0", *COMMON]
    one, two, dump = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "dump")
    one_worker(argv, one)
    two_workers(["python", os.path.join("tests", "finetune_dp_worker.py"), dump], argv, two,
                str(tmp_path / "msrun_logs"))

    # Only rank 0 writes (each worker was pointed at its own directory).
    assert not os.path.exists(os.path.join(two, "rank1"))
    two = os.path.join(two, "rank0")
    assert_same_steps(one, two)
    m1 = load_file(os.path.join(one, "model.safetensors"))
    m2 = load_file(os.path.join(two, "model.safetensors"))
    assert_same_tensors(m1, m2)
    # Both workers end with identical weights.
    r0, r1 = np.load(os.path.join(dump, "rank0.npz")), np.load(os.path.join(dump, "rank1.npz"))
    assert sorted(r0.files) == sorted(r1.files)
    for name in r0.files:
        assert np.array_equal(r0[name], r1[name]), name

    # The comparison has teeth: the decoder, the ViT and the projector all moved by far more than 1e-5.
    change = moved(random_weights(tiny_config(**CONFIG), 0), m1)
    for name in ("model.tok_embeddings.weight", "output.weight", "model.layers.1.feed_forward.w2.weight",
                 "vit.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight", "vision_proj.0.weight",
                 "plora_glb_GN"):
        assert change[name] > 1e-4, (name, change[name])


class _Shard(World):
    """Rank `rank` of `size`, without collectives: what each worker computes, seen in one process."""

    def __init__(self, size, rank):
        super().__init__()
        self.size, self.rank = size, rank

    def mean_scalars(self, values):
        return [float(v) for v in values]

    def average_grads(self, grads, names, shapes):
        return {names[0]: ops.zeros(shapes[names[0]], ms.float32)}  # an optimizer step that changes nothing


def test_workers_take_the_micro_batches_and_dropout_masks_of_one_worker(model_dir, tmp_path):
    """Without msrun: worker r of 2 (accumulation 1) computes, step by step, the micro-batches one worker
    (accumulation 2) computes in that step, with the same dropout seeds (masks are a function of the seed)."""
    argv = ["--model_name_or_path", model_dir, "--data_path", os.path.join(DATA, "text10.json"), "--use_lora", "True",
            "--lora_r", "4", "--batch_size", "1", "--max_grad_norm", "0", *COMMON, "--lora_dropout", "0.05",
            "--plora_dropout", "0.05", "--max_steps", "7"]  # 10 micro-batches an epoch: into a second epoch

    def computed(size, rank, accumulation):
        args, data_args = parse_args(argv + ["--gradient_accumulation_steps", str(accumulation),
                                             "--output_dir", str(tmp_path / f"out{size}{rank}")])
        trainer = Trainer(args, data_args, world=_Shard(size, rank), data_root=REPO)
        seen = []

        def record(batch, scale, seed):
            seen.append((trainer.optimizer_steps, tuple(batch["samples"]), seed))
            return 0.0, {}, False
        trainer.grads.loss_and_grads = record
        step = trainer.optimizer.step

        def count(grads, lr):
            trainer.optimizer_steps += 1
            return step(grads, lr)
        trainer.optimizer_steps = 0
        trainer.optimizer.step = count
        trainer.train()
        return seen

    one = computed(1, 0, 2)
    two = computed(2, 0, 1) + computed(2, 1, 1)
    assert len(one) == 14 and len({seed for _, _, seed in one}) == 14
    assert sorted(two) == sorted(one)
