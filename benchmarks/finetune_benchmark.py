"""Fine-tuning benchmark: LoRA and full fine-tuning steps of `mxc-finetune` (MindSpore, GRAPH_MODE) against
upstream's `finetune.py` (PyTorch eager, transformers 4.33.2 Trainer, peft 0.8.2, torch AdamW), in the same run.

    python benchmarks/finetune_benchmark.py [--quick | --long] [--modes lora,full] [--warmup 2] [--steps 4]
        [--kernel-profile]
        [--upstream /work/upstream/base --finetune /path/to/InternLM-XComposer/finetune
         --upstream-python /work/venv-ref/bin/python] [--json out.json]

A benchmark, not a test: it prints a table and writes JSON. Both sides train the same seeded random-weight model
(`mindxcomposer.demo.tiny_config` at a mid size, `--quick`: a small one) on the same data (image samples at
`--hd-num` and text samples; `--long`: a tiny model on two samples of two images each, ~4,300 positions,
`--sampling sequential`: the same micro-batches in the same order) with the same
flags: upstream's `finetune_lora.sh` / `finetune.sh` (LoRA: adapter only; full: LLM, ViT and projector), fp32,
every dropout 0 (so that the per-step losses of the two sides can be compared: the check that both did the same
work). Each side of each mode runs in its own process; the first `--warmup` optimizer steps (they compile) are
excluded and the next `--steps` are timed. Per side: samples/s and tokens/s (non-padding positions of the
decoder input) over the timed steps, the process's peak RSS (`wait4`'s `ru_maxrss`), the training peak (VmHWM
reset when training starts, so model loading is not in it) and what the trainer holds in memory, measured on
its objects (parameters, trainable parameters, AdamW moments, gradients, the stored layer inputs) and RSS
after each phase.

The upstream side runs upstream's own `finetune.train()` through the run-time patches of
`tools/reference/make_finetune_train_fixtures.py` (imported, not copied; its docstring lists them), under
`--upstream-python`. Without `--upstream` / `--finetune`, or when they are not usable, only our side runs and
the script says why.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from benchmarks.memory_probe import peak_gib, reset_peak, rss_gib, watch_rss  # noqa: E402
from benchmarks.prefill_profile import best_of  # noqa: E402
REFERENCE = os.path.join(REPO, "tools", "reference")
ASSETS = os.path.join(REPO, "tests", "assets")
MARK = "@@bench "
GiB = 2 ** 30

# Mid size: hidden 512 and 6 layers (the 92544-row embedding and head are ~80% of the LLM's weights, as the
# release's vocabulary is kept), a 4-layer ViT of width 256 on real 560-px crops. max_position_embeddings 4096
# as the parity fixtures (upstream's dynamic-NTK RoPE would otherwise rescale on the image micro-batches).
MID = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
           plora_rank=64, max_position_embeddings=4096,
           vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4))
# --long: long image sequences on a tiny model (3 layers of width 96, the tiny ViT), where attention over ~4,300
# positions and the per-position head and loss, not the weights, set the memory. max_position_embeddings 8192 keeps
# upstream's dynamic-NTK RoPE from rescaling, as MID's 4096 does for its shorter sequences.
LONG = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
            plora_rank=8, max_position_embeddings=8192)
QUICK = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             plora_rank=16, max_position_embeddings=4096,
             vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2))

# Upstream's finetune.sh / finetune_lora.sh flags, except: fp32 (--bf16 False, CPU), no DeepSpeed, no saving,
# --max_steps instead of epochs, dropout 0. --batch_size, --gradient_accumulation_steps and --hd_num come from
# this script's options.
COMMON = ["--given_num", "False", "--bf16", "False", "--per_device_train_batch_size", "1",
          "--evaluation_strategy", "no", "--save_strategy", "no", "--weight_decay", "0.1", "--adam_beta2", "0.95",
          "--warmup_ratio", "0.01", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--report_to", "none",
          "--gradient_checkpointing", "True", "--lora_dropout", "0"]
MODES = {
    "lora": ["--fix_vit", "True", "--fix_sampler", "True", "--use_lora", "True", "--lora_r", "64", "--lora_alpha", "64",
             "--learning_rate", "5e-5"],
    "full": ["--fix_vit", "False", "--fix_sampler", "False", "--use_lora", "False", "--learning_rate", "1e-5"],
}


# ----------------------------------------------------------------------------------------------- data
def _conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


SENTENCES = ["The river bends twice before it reaches the old mill, where the water slows and turns green.",
             "Gears trade speed for force: a small wheel driving a large one turns it slower but harder.",
             "Tea leaves release their flavour fastest in water just below boiling, and bitterness after that.",
             "Early maps were drawn from travellers' stories, so distances were measured in days, not miles."]


def write_data(folder):
    """Image samples (one marker each) and longer multi-turn text samples; 2 of each, absolute paths."""
    def text(k, n):
        return " ".join(SENTENCES[(k + i) % len(SENTENCES)] for i in range(n))

    images = [dict(id="img0", image=os.path.join(ASSETS, "chelsea.png"),
                   conversations=_conv("<ImageHere>\nDescribe the picture in detail.", text(0, 6),
                                       "What else can you see?", text(1, 4))),
              dict(id="img1", image=[os.path.join(ASSETS, "coffee.png")],
                   conversations=_conv("What is in this image? <ImageHere>", text(2, 8)))]
    texts = [dict(id="txt0", conversations=_conv(text(3, 4) + " Summarise this.", text(0, 8),
                                                 "Now in one line.", text(1, 2))),
             dict(id="txt1", conversations=_conv("Tell me about rivers, gears, tea and maps.", text(2, 12)))]
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, records in (("images.json", images), ("texts.json", texts)):
        paths.append(os.path.join(folder, name))
        with open(paths[-1], "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
    data_txt = os.path.join(folder, "data.txt")
    with open(data_txt, "w", encoding="utf-8") as f:
        f.write("".join(p + "\n" for p in paths))
    return data_txt


def write_long_data(folder):
    """Two samples, each with two images whose HD transform at hd_num 4 gives 2x2 tiles (2061 positions an
    image): ~4,300 positions a sample."""
    def a(name):
        return os.path.join(ASSETS, name)

    records = [dict(id="pair0", image=[a("coffee.png"), a("chelsea.png")],
                    conversations=_conv("Image1: <ImageHere>; Image2: <ImageHere>. Compare the two images.",
                                        " ".join(SENTENCES[:3]), "Which one is warmer?", SENTENCES[3])),
               dict(id="pair1", image=[a("astronaut.png"), a("rocket_portrait.png")],
                    conversations=_conv("<ImageHere> and <ImageHere>: what links these pictures?",
                                        " ".join(SENTENCES[1:]), "Describe the second one.", SENTENCES[0]))]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "pairs.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    data_txt = os.path.join(folder, "data.txt")
    with open(data_txt, "w", encoding="utf-8") as f:
        f.write(path + "\n")
    return data_txt


# ----------------------------------------------------------------------------------------------- helpers
def _reply(obj):
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _timing(times, ends, micro, warmup, batch_size):
    """samples/s and tokens/s over optimizer steps warmup+1 .. end; `ends[i]` = micro-batches done after step i."""
    if len(times) <= warmup:
        return {}
    first_mb = ends[warmup - 1] if warmup else 0
    t0 = times[warmup - 1] if warmup else None
    timed = micro[first_mb:]
    seconds = times[-1] - t0
    steps = len(times) - warmup
    step_s = np.diff(times[warmup - 1:]) if warmup else np.diff(times)
    tokens = sum(m["tokens"] for m in timed)
    return dict(timed_steps=steps, timed_micro_batches=len(timed), seconds=seconds, tokens=tokens,
                samples=len(timed) * batch_size, samples_per_s=len(timed) * batch_size / seconds,
                tokens_per_s=tokens / seconds, median_step_s=float(np.median(step_s)) if len(step_s) else seconds,
                step_s=[float(x) for x in np.diff(times)])  # every step after the first, warm-up included


# ----------------------------------------------------------------------------------------------- our side
def worker_ours(spec):
    rss = {"start": rss_gib()}
    if spec.get("kernel_profile"):
        os.environ["MXC_KERNEL_PROFILE"] = "1"  # before the kernels are built: a profiling build (cpu_kernels)
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)  # as mxc-finetune runs: the gradient cells compile
    if spec["threads"]:
        ms.set_context(runtime_num_threads=spec["threads"])

    from mindxcomposer.finetune import backprop
    from mindxcomposer.finetune.trainer import Trainer, load_model
    from mindxcomposer.finetune.training_args import parse_args

    backprop.HEAD_CHUNK = spec.get("head_chunk") or backprop.HEAD_CHUNK

    out_dir = tempfile.mkdtemp(prefix="ft-bench-ours-")
    argv = spec["argv"] + ["--model_name_or_path", spec["model_dir"], "--output_dir", out_dir,
                           "--sampling", "sequential", "--plora_dropout", "0", "--progress", "False"]
    if spec.get("adapter_dir"):
        argv += ["--lora_weight_path", spec["adapter_dir"]]
    args, data_args = parse_args(argv)
    rss["imports"] = rss_gib()
    model = load_model(args)
    rss["model_loaded"] = rss_gib()
    trainer = Trainer(args, data_args, model=model)
    rss["trainer_built"] = rss_gib()

    from mindxcomposer.ops.cpu_kernels import kernel_profile, product_flops

    micro, times, ends, held, flops = [], [], [], {}, []
    grads = trainer.grads
    forward_layer = grads.forward_layer
    stored = [0]

    def counting_layer(x, *rest):  # the layer outputs loss_and_grads keeps for the backward
        y = forward_layer(x, *rest)
        stored[0] += y.nbytes
        return y

    grads.forward_layer = counting_layer
    if spec.get("trace"):
        _trace_calls(grads, spec["trace"])
    loss_and_grads = grads.loss_and_grads

    def timed_loss_and_grads(batch, scale, seed=0.0):
        stored[0] = 0
        loss, g, has_vision = loss_and_grads(batch, scale, seed)
        ids = np.asarray(batch["input_ids"])
        micro.append(dict(tokens=int(np.asarray(batch["attention_mask"]).sum()), shape=list(ids.shape),
                          loss=loss / scale, stored_layer_inputs=stored[0] + ids.shape[0] * (
                              -(-ids.shape[1] // 64) * 64) * model.config.hidden_size * 4))
        return loss, g, has_vision

    grads.loss_and_grads = timed_loss_and_grads
    opt = trainer.optimizer
    opt_step = opt.step

    def timed_step(g, lr):
        held["gradients"] = max(held.get("gradients", 0), sum(int(t.nbytes) for t in g.values()))
        opt_step(g, lr)
        last = opt.params[next(reversed(g))] if g else None
        if last is not None:
            last.asnumpy()  # waits for the update
        times.append(time.perf_counter())
        flops.append(product_flops())
        ends.append(len(micro))
        if len(times) == spec["warmup"]:
            rss["after_warmup"] = rss_gib()
            if spec.get("kernel_profile"):
                kernel_profile(reset=True)  # the timed steps' kernels only

    opt.step = timed_step
    load_peak = peak_gib()
    reset = reset_peak()
    start = time.perf_counter()
    trainer.train()
    train_peak = peak_gib() if reset else None
    kernel_rows = None
    if spec.get("kernel_profile") and kernel_profile(spec["kernel_profile"]):
        with open(spec["kernel_profile"], encoding="utf-8") as f:
            kernel_rows = [line.rstrip("\n").split("\t") for line in f]
    vmhwm = max(load_peak, peak_gib())  # the whole process's, build included
    rss["end"] = rss_gib()
    params = list(model.get_parameters())
    held.update(parameters=sum(int(p.nbytes) for p in params),
                trainable=sum(int(p.nbytes) for p in trainer.trainables.params.values()),
                adamw_moments=sum(int(p.nbytes) for d in (opt.exp_avg, opt.exp_avg_sq) for p in d.values()),
                stored_layer_inputs=max(m["stored_layer_inputs"] for m in micro))
    shutil.rmtree(out_dir, ignore_errors=True)
    w = spec["warmup"]
    products = dict(gflop_per_step=(flops[-1] - flops[w - 1]) / 1e9 / (len(flops) - w), **_gemm_rates(model.config))
    _reply(dict(side="ours", mode=spec["mode"], mindspore=ms.__version__, ms_mode="GRAPH_MODE", products=products,
                threads=int(ms.get_context("runtime_num_threads")), first_step_s=times[0] - start,
                **_timing(times, ends, micro, spec["warmup"], spec["batch_size"]),
                step_losses=_step_losses(micro, ends), micro=micro, rss_gib=rss, train_peak_gib=train_peak,
                kernel_profile=kernel_rows,
                vmhwm_gib=vmhwm,
                held_bytes=held, trainable_count=sum(int(np.prod(p.shape)) for p in trainer.trainables.params.values())))


def _gemm_rates(config, repeats=5):
    """GFLOP/s, best of `repeats`, of two of the model's products in fp32, through this package's kernel
    (`cpu_kernels.gemm_nt`, what exact mode runs) and through numpy (its BLAS, a reference library), measured in
    the trainer's process after training: a decoder layer's widest ([640, hidden] x [intermediate, hidden]^T) and
    the head's (a chunk of `HEAD_CHUNK` rows x [vocab, hidden]^T). The better kernel rate is the fastest a step's
    products could run here."""
    from mindxcomposer.finetune.backprop import HEAD_CHUNK
    from mindxcomposer.ops import cpu_kernels

    rng = np.random.default_rng(0)
    out = {}
    for part, (rows, n) in (("layer", (640, config.intermediate_size)), ("head", (HEAD_CHUNK, config.vocab_size))):
        x = rng.standard_normal((rows, config.hidden_size), dtype=np.float32)
        w = rng.standard_normal((n, config.hidden_size), dtype=np.float32)
        gflop = 2 * rows * config.hidden_size * n / 1e9
        for name, fn in (("kernel", lambda: cpu_kernels.gemm_nt(x, w)), ("numpy", lambda: x @ w.T)):
            out[f"{part}_{name}_gflops"] = gflop / best_of(fn, repeats)
        out[f"{part}_shape"] = [rows, config.hidden_size, n]
    out["kernel_gflops"] = max(out["layer_kernel_gflops"], out["head_kernel_gflops"])
    return out


def _trace_calls(grads, path):
    """Resident memory after each block call of our trainer, the call's seconds and its products' GFLOP, appended to
    `path` as it goes (a killed run still says where it was): where the memory and the time go. `loss_and_grads`
    holds the others (its figures include theirs); what lies outside every call (data, optimizer) is the gap
    between them."""
    from mindxcomposer.ops.cpu_kernels import kernel_profile, product_flops

    f = open(path, "a", encoding="utf-8")
    t0 = time.perf_counter()

    def traced(fn, name):
        def call(*a, **k):
            start, f0 = time.perf_counter(), product_flops()
            out = fn(*a, **k)
            end, gflop = time.perf_counter(), (product_flops() - f0) / 1e9
            f.write(f"{end - t0:8.1f} s  took {end - start:7.3f} s  rss {rss_gib():6.2f}  peak {peak_gib():6.2f} GiB  "
                    f"products {gflop:7.2f} GFLOP {gflop / max(end - start, 1e-9):6.1f} GFLOP/s  {name}\n")
            f.flush()
            return out
        return call

    for name in ("forward_layer", "_head", "layer_grad", "_image_embeddings", "_image_backward", "loss_and_grads"):
        setattr(grads, name, traced(getattr(grads, name), name))


def _step_losses(micro, ends):
    out, a = [], 0
    for b in ends:
        out.append(float(np.mean([m["loss"] for m in micro[a:b]])))
        a = b
    return out


# ----------------------------------------------------------------------------------------------- upstream side
def worker_upstream(spec):
    rss = {"start": rss_gib()}
    sys.path.insert(0, REFERENCE)
    import make_finetune_data_fixtures as D
    import make_finetune_train_fixtures as F

    D.ensure_torchvision(None)
    import torch
    import transformers
    from accelerate import Accelerator

    torch.set_num_threads(spec["threads"] or 2)
    data_mix, finetune, _ = D.import_finetune(spec["finetune"])
    rss["imports"] = rss_gib()
    rec = F.Recorder()
    case = dict(config_overrides=spec["config_overrides"], seed=spec["seed"])
    micro, times, ends, held = [], [], [], {}
    out_dir = tempfile.mkdtemp(prefix="ft-bench-up-")
    with F.patched(os.path.abspath(spec["upstream"]), case, finetune, data_mix, rec) as model:
        rss["model_loaded"] = rss_gib()
        # The fixture script's id recorder on the embedding is for its golden files, not part of training.
        model.model.tok_embeddings._forward_pre_hooks.clear()
        model.model.register_forward_pre_hook(
            lambda mod, a, kw: micro.append(dict(tokens=int(kw["attention_mask"].sum()),
                                                 shape=list(kw["inputs_embeds"].shape[:2]))), with_kwargs=True)
        patched_clip = Accelerator.clip_grad_norm_

        def clip(self, parameters, max_norm, norm_type=2):
            g = [p.grad for p in rec.trainer.model.parameters() if p.requires_grad and p.grad is not None]
            held["gradients"] = max(held.get("gradients", 0), sum(t.numel() * t.element_size() for t in g))
            return patched_clip(self, parameters, max_norm, norm_type)

        Accelerator.clip_grad_norm_ = clip  # restored by `patched` on exit

        class Timer(transformers.TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                rss["trainer_built"] = rss_gib()
                self.load_peak = peak_gib()
                self.reset = reset_peak()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter())
                ends.append(len(micro))
                if len(times) == spec["warmup"]:
                    rss["after_warmup"] = rss_gib()

        timer = Timer()
        recording = finetune.Trainer

        class TimedTrainer(recording):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.add_callback(timer)

        finetune.Trainer = TimedTrainer  # restored by `patched` on exit
        sys.argv = ["finetune.py", "--model_name_or_path", "upstream-bench", "--output_dir", out_dir] + spec["argv"]
        start = time.perf_counter()
        finetune.train()
        train_peak = peak_gib() if timer.reset else None
        vmhwm = max(timer.load_peak, peak_gib())  # the whole process's, build included
        rss["end"] = rss_gib()
        trainer = rec.trainer
        opt = trainer.optimizer
        held.update(parameters=sum(p.numel() * p.element_size() for p in trainer.model.parameters()),
                    trainable=sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad),
                    adamw_moments=sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
                                      if k in ("exp_avg", "exp_avg_sq")))
        trainable_count = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        if spec.get("save_adapter") and rec.initial_adapter:
            # Our side starts from the same adapter (peft's layout), as the parity test does.
            # (mindxcomposer.finetune.lora needs MindSpore, absent from this interpreter: peft's file names here.)
            from safetensors.numpy import save_file
            os.makedirs(spec["save_adapter"], exist_ok=True)
            save_file(rec.initial_adapter, os.path.join(spec["save_adapter"], "adapter_model.safetensors"),
                      metadata={"format": "pt"})
            with open(os.path.join(spec["save_adapter"], "adapter_config.json"), "w", encoding="utf-8") as f:
                json.dump(rec.adapter_config, f)
    shutil.rmtree(out_dir, ignore_errors=True)
    for m, loss in zip(micro, rec.micro_losses):
        m["loss"] = loss
    _reply(dict(side="upstream", mode=spec["mode"], torch=torch.__version__, transformers=transformers.__version__,
                peft=__import__("peft").__version__, threads=torch.get_num_threads(), first_step_s=times[0] - start,
                **_timing(times, ends, micro, spec["warmup"], spec["batch_size"]), step_losses=_step_losses(micro, ends),
                micro=micro, rss_gib=rss, train_peak_gib=train_peak, vmhwm_gib=vmhwm, held_bytes=held,
                trainable_count=trainable_count))


# ----------------------------------------------------------------------------------------------- orchestrator


def run_worker(python, side, spec_path, label, rss_limit=None):
    t = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([python, os.path.abspath(__file__), "--worker", side, "--spec", spec_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    seen = [0.0]
    if rss_limit:
        import threading
        threading.Thread(target=watch_rss, args=(proc, rss_limit, seen), daemon=True).start()
    reply, lines = None, []
    for line in proc.stdout:
        if line.startswith(MARK):
            reply = json.loads(line[len(MARK):])
        else:
            lines.append(line)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    res = dict(wall_s=time.perf_counter() - t, peak_rss_gib=usage.ru_maxrss / 2 ** 20, rc=rc)
    if reply is None:
        tail = "".join(lines[-10:]) + err[-3000:]
        if rss_limit and seen[0] > rss_limit:
            tail += f"\nkilled above --rss-limit {rss_limit} GiB (largest RSS sampled {seen[0]:.2f} GiB)"
        print(f"[{label}] failed (exit {rc}):\n{tail}", flush=True)
        res["error"] = tail
        return res
    res.update(reply)
    print(f"[{label}] {res['wall_s']:.0f} s wall, {res.get('samples_per_s', float('nan')):.3f} samples/s, "
          f"peak {res['peak_rss_gib']:.2f} GiB", flush=True)
    return res


def upstream_problem(args):
    """None if the upstream side can run, else why not."""
    if not args.upstream or not args.finetune:
        return "--upstream and --finetune not given"
    for d, files in ((args.upstream, ("modeling_internlm_xcomposer2.py", "build_mlp.py")),
                     (args.finetune, ("finetune.py", "data_mix.py"))):
        missing = [f for f in files if not os.path.isfile(os.path.join(d, f))]
        if missing:
            return f"{d} lacks {missing}"
    if not (args.upstream_python and os.path.exists(args.upstream_python)):
        return f"no upstream Python at {args.upstream_python}"
    probe = subprocess.run([args.upstream_python, "-c", "import torch, transformers, peft, accelerate; "
                            "print(transformers.__version__, peft.__version__)"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{args.upstream_python} cannot import torch/transformers/peft/accelerate: {probe.stderr[-300:]}"
    versions = probe.stdout.split()
    if versions[:2] != ["4.33.2", "0.8.2"]:
        return f"{args.upstream_python} has transformers {versions[0]} / peft {versions[1]}, upstream targets 4.33.2 / 0.8.2"
    return None


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _ratio(a, b):
    return None if a is None or b is None or not b else a / b


def print_kernel_profile(mode, rows, steps):
    """The timed steps' kernel time by kind (the rows of `cpu_kernels.kernel_profile`'s file): a product with a
    64-wide operand (the LoRA and Partial-LoRA rank) apart from the others."""
    kinds = {}
    for ms_, calls, flops, key in rows:
        name = key.split(" ")[0]
        dims = key.replace("[", ",").replace("]", ",").split(",")
        if name.startswith("MxcLinear") and "64" in dims:
            name += " (rank 64)"
        k = kinds.setdefault(name, [0.0, 0.0, 0.0])
        k[0], k[1], k[2] = k[0] + float(ms_), k[1] + float(calls), k[2] + float(flops)
    total = sum(k[0] for k in kinds.values())
    print()
    print(f"{mode}, our side: kernel time of the timed steps by kind (a profiling build; {total / steps / 1e3:.2f} s a "
          f"step in kernels):")
    print("| kernel | ms / step | calls / step | GFLOP / step | GFLOP/s |")
    print("|---|---|---|---|---|")
    for name, (t, calls, flops) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        rate = f"{flops / t / 1e6:.0f}" if flops and t else "-"
        print(f"| {name} | {t / steps:.1f} | {calls / steps:.0f} | {flops / steps / 1e9:.2f} | {rate} |")


def print_report(args, config, results, why_no_upstream, command):
    print()
    print(f"command: {command}")
    v = config["vision_config"]
    data = (f"2 samples of two images each (hd_num {args.hd_num})" if args.long
            else f"2 image samples (hd_num {args.hd_num}) and 2 text samples")
    print(f"model: hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, intermediate "
          f"{config['intermediate_size']}, vocab 92544, PLoRA rank {config['plora_rank']}; ViT width {v['hidden_size']}, "
          f"{v['num_hidden_layers']} layers, 560-px crops; data: {data}, --max_length {args.max_length}, --batch_size {args.batch_size}, --gradient_accumulation_steps {args.grad_accum} (an optimizer "
          f"step = {args.grad_accum} micro-batches); {args.warmup} warm-up steps excluded, {args.steps} timed; fp32; "
          f"{args.threads} threads; {os.cpu_count()} CPUs, {platform.machine()}")
    if why_no_upstream:
        print(f"upstream side not run: {why_no_upstream}")
    print()
    print("| mode | side | s / step | samples/s | tokens/s | peak RSS GiB (process, VmHWM) | training peak GiB | "
          "first step s (compile) |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        for side in ("ours", "upstream"):
            r = results.get(mode, {}).get(side)
            if not r or "samples_per_s" not in r:
                continue
            name = "ours (MindSpore GRAPH)" if side == "ours" else "upstream (PyTorch eager)"
            print(f"| {mode} | {name} | {r['median_step_s']:.2f} | {r['samples_per_s']:.3f} | {r['tokens_per_s']:.1f} | "
                  f"{_fmt(r.get('vmhwm_gib'))} | {_fmt(r.get('train_peak_gib'))} | {r['first_step_s']:.1f} |")
        o, u = results.get(mode, {}).get("ours", {}), results.get(mode, {}).get("upstream", {})
        if "samples_per_s" in o and "samples_per_s" in u:
            print(f"| {mode} | **ours / upstream** | {_fmt(_ratio(o['median_step_s'], u['median_step_s']))} | "
                  f"{_fmt(_ratio(o['samples_per_s'], u['samples_per_s']))} | "
                  f"{_fmt(_ratio(o['tokens_per_s'], u['tokens_per_s']))} | "
                  f"{_fmt(_ratio(o.get('vmhwm_gib'), u.get('vmhwm_gib')))} | "
                  f"{_fmt(_ratio(o.get('train_peak_gib'), u.get('train_peak_gib')))} | "
                  f"{_fmt(_ratio(o['first_step_s'], u['first_step_s']))} |")
    rows = [(mode, results.get(mode, {}).get("ours", {})) for mode in args.modes]
    rows = [(mode, r) for mode, r in rows if r.get("products", {}).get("gflop_per_step") and "seconds" in r]
    if rows:
        print()
        print("Our side's products (the CPU kernels' count: the GEMMs and attention's products of a timed step) against "
              "the machine's rate, measured in the same process after training, fp32, on a decoder layer's widest "
              "product and on the head's (M x K x N); the floor is the products at the better kernel rate:")
        print("| mode | GFLOP / step | mean s / step | achieved GFLOP/s | layer product: kernel / numpy GFLOP/s | "
              "head product: kernel / numpy GFLOP/s | products alone at the kernel's rate, s / step | step / that |")
        print("|---|---|---|---|---|---|---|---|")
        for mode, r in rows:
            pr = r["products"]
            mean = r["seconds"] / r["timed_steps"]
            floor = pr["gflop_per_step"] / pr["kernel_gflops"]
            print(f"| {mode} | {pr['gflop_per_step']:.1f} | {mean:.2f} | {pr['gflop_per_step'] / mean:.1f} | "
                  f"{pr['layer_kernel_gflops']:.1f} / {pr['layer_numpy_gflops']:.1f} "
                  f"({'x'.join(map(str, pr['layer_shape']))}) | {pr['head_kernel_gflops']:.1f} / "
                  f"{pr['head_numpy_gflops']:.1f} ({'x'.join(map(str, pr['head_shape']))}) | {floor:.2f} | "
                  f"{mean / floor:.2f} |")
    print()
    print("Memory held (MB, measured on the trainer's objects) and RSS after each phase (GiB):")
    print("| mode | side | trainable params | parameters | AdamW moments | gradients | stored layer inputs (largest "
          "micro-batch) | RSS model loaded | RSS trainer built | RSS after warm-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        for side in ("ours", "upstream"):
            r = results.get(mode, {}).get(side)
            if not r or "held_bytes" not in r:
                continue
            h, s = r["held_bytes"], r["rss_gib"]
            mb = lambda k: _fmt(h[k] / 2 ** 20, ".0f") if k in h else "-"  # noqa: E731
            print(f"| {mode} | {side} | {r['trainable_count'] / 1e6:.2f} M | {mb('parameters')} | {mb('adamw_moments')} | "
                  f"{mb('gradients')} | {mb('stored_layer_inputs')} | {_fmt(s.get('model_loaded'))} | "
                  f"{_fmt(s.get('trainer_built'))} | {_fmt(s.get('after_warmup'))} |")
    for mode in args.modes:
        o = results.get(mode, {}).get("ours", {})
        if o.get("kernel_profile"):
            print_kernel_profile(mode, o["kernel_profile"], o["timed_steps"])
    for mode in args.modes:
        o, u = results.get(mode, {}).get("ours", {}), results.get(mode, {}).get("upstream", {})
        if "step_losses" in o and "step_losses" in u:
            tokens_same = [m["tokens"] for m in o["micro"]] == [m["tokens"] for m in u["micro"]]
            rel = max(abs(a - b) / abs(b) for a, b in zip(o["step_losses"], u["step_losses"]))
            print(f"{mode}: same micro-batches (token counts equal): {'yes' if tokens_same else 'NO'}; "
                  f"largest relative difference of the per-step mean micro-batch loss: {rel:.1e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, 1 warm-up + 2 timed steps: a smoke run")
    p.add_argument("--long", action="store_true",
                   help="long image sequences: 3 layers of width 96, 2 samples of two images each at --hd-num 4 "
                        "(~4,300 positions), --max_length 8192, an optimizer step = both samples; 1 warm-up + 2 "
                        "timed steps")
    p.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    p.add_argument("--sides", default="upstream,ours", help="comma-separated: upstream, ours (to rerun one side)")
    p.add_argument("--warmup", type=int, default=None, help="optimizer steps excluded from the timing (default 2)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 4)")
    p.add_argument("--batch-size", type=int, default=1, help="--batch_size (samples per micro-batch) of both sides")
    p.add_argument("--grad-accum", type=int, default=None, help="--gradient_accumulation_steps of both sides "
                   "(default: the samples of an epoch / --batch-size, 4 or with --long 2: every optimizer step runs "
                   "each sample once)")
    p.add_argument("--hd-num", type=int, default=None, help="--hd_num of both sides (default 1, --long: 4)")
    p.add_argument("--max-length", type=int, default=None, help="--max_length of both sides (default 16384, "
                   "--long: 8192)")
    p.add_argument("--threads", type=int, default=2, help="MindSpore runtime_num_threads and torch threads")
    p.add_argument("--head-chunk", type=int, default=0, help="our side: positions per head-and-loss call "
                   "(backprop.HEAD_CHUNK; 0: its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-limit", type=float, default=None, help="GiB: a worker is killed above it (its row is then "
                   "missing and the reason printed)")
    p.add_argument("--upstream", help="upstream's IXC2.5 model code folder (tools/reference/README.md)")
    p.add_argument("--finetune", help="upstream's finetune/ folder")
    p.add_argument("--upstream-python", default="/work/venv-ref/bin/python" if os.path.exists(
        "/work/venv-ref/bin/python") else None, help="Python with torch, transformers 4.33.2, peft 0.8.2, accelerate")
    p.add_argument("--workdir", help="where the model and data go (default: a temporary folder)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--trace", action="store_true", help="our side: RSS and seconds of each block call into "
                   "WORKDIR/MODE.ours.trace (use with --workdir)")
    p.add_argument("--kernel-profile", action="store_true", help="our side: a profiling build of the CPU kernels "
                   "(each entry point timed per call; a little slower) and a table of the timed steps' kernel time "
                   "by kind (cpu_kernels.kernel_profile)")
    p.add_argument("--worker", choices=["ours", "upstream"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        with open(args.spec, encoding="utf-8") as f:
            spec = json.load(f)
        (worker_ours if args.worker == "ours" else worker_upstream)(spec)
        return 0
    command = " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] + sys.argv[1:])
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from {sorted(MODES)}")
    if args.quick and args.long:
        p.error("--quick and --long: choose one")
    short = args.quick or args.long
    args.warmup = args.warmup if args.warmup is not None else (1 if short else 2)
    args.steps = args.steps if args.steps is not None else (2 if short else 4)
    args.hd_num = args.hd_num if args.hd_num is not None else (4 if args.long else 1)
    args.max_length = args.max_length if args.max_length is not None else (8192 if args.long else 16384)
    if args.batch_size not in (1, 2):
        p.error("--batch-size must be 1 or 2 (each data file holds 2 samples)")
    samples = 2 if args.long else 4  # samples an epoch
    args.grad_accum = args.grad_accum or samples // args.batch_size
    if args.warmup < 1 or args.steps < 1 or args.grad_accum < 1 or args.hd_num < 1:
        p.error("--warmup, --steps, --grad-accum and --hd-num must be >= 1 (the first step compiles)")
    args.sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    if not args.sides or set(args.sides) - {"upstream", "ours"}:
        p.error("--sides: choose from upstream, ours")
    why_no_upstream = upstream_problem(args) if "upstream" in args.sides else "--sides without upstream"
    if why_no_upstream:
        print(f"upstream side skipped: {why_no_upstream}", flush=True)

    from mindxcomposer.demo import save_demo_model, tiny_config

    overrides = QUICK if args.quick else LONG if args.long else MID
    config = tiny_config(**overrides)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="ft-bench-")
    work = os.path.abspath(args.workdir or tmp.name)
    os.makedirs(work, exist_ok=True)
    results = {}
    try:
        model_dir = save_demo_model(os.path.join(work, "model"), config, args.seed)
        data_txt = (write_long_data if args.long else write_data)(os.path.join(work, "data"))
        for mode in args.modes:
            flags = COMMON + MODES[mode] + ["--data_path", data_txt, "--hd_num", str(args.hd_num),
                                            "--max_length", str(args.max_length),
                                            "--batch_size", str(args.batch_size),
                                            "--gradient_accumulation_steps", str(args.grad_accum),
                                            "--max_steps", str(args.warmup + args.steps)]
            spec = dict(mode=mode, argv=flags, config_overrides=overrides, seed=args.seed, warmup=args.warmup,
                        batch_size=args.batch_size,
                        threads=args.threads, model_dir=model_dir, upstream=args.upstream, finetune=args.finetune,
                        head_chunk=args.head_chunk)
            results[mode] = {}
            if not why_no_upstream:
                if mode == "lora":
                    spec["save_adapter"] = os.path.join(work, "initial_adapter")
                path = os.path.join(work, f"{mode}.upstream.json")
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(spec, f)
                results[mode]["upstream"] = run_worker(args.upstream_python, "upstream", path, f"{mode} upstream",
                                                        args.rss_limit)
                if mode == "lora" and os.path.isdir(spec["save_adapter"]):
                    spec["adapter_dir"] = spec["save_adapter"]
            if "ours" not in args.sides:
                continue
            if args.trace:
                spec["trace"] = os.path.join(work, f"{mode}.ours.trace")
                print(f"[{mode} ours] tracing RSS per call into {spec['trace']}", flush=True)
            if args.kernel_profile:
                spec["kernel_profile"] = os.path.join(work, f"{mode}.ours.kernels.tsv")
            path = os.path.join(work, f"{mode}.ours.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(spec, f)
            results[mode]["ours"] = run_worker(sys.executable, "ours", path, f"{mode} ours", args.rss_limit)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print_report(args, config.to_dict(), results, why_no_upstream, command)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(command=command, config=overrides, args={k: v for k, v in vars(args).items()
                                                                   if k not in ("worker", "spec")},
                           upstream_skipped=why_no_upstream, results=results), f, indent=1)
    failed = [f"{m} {s}" for m, r in results.items() for s, v in r.items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
