"""What a LoRA fine-tuning step holds at the release's width: peak RSS of `mxc-finetune`'s trainer on a bf16
checkpoint of the release's sizes (hidden 4096, 92544-token vocabulary, ViT-L/14-560, task LoRAs) with fewer
decoder layers, extrapolated to 32 from the difference between two depths.

    python benchmarks/finetune_release_memory.py --work /tmp/ftmem [--layers 2 4] [--positions 2048]
    python benchmarks/finetune_release_memory.py --work /tmp/ftmem --model /path/to/converted --positions 1024 \
        --steps 2 [--image photo.jpg --hd_num 2]      # full depth, seconds per optimizer step

With `--model`, the converted checkpoint runs at its full depth with upstream's LoRA flags, and the run is killed
if its resident memory passes `--rss-limit` GiB (so that an overrun ends this run, not another process).

Each depth runs in its own process (MindSpore's memory pool keeps a process's high-water mark): load the
model (base kept in bf16, as a LoRA run does), then one optimizer step of LoRA r 64 on the five linears (upstream's
defaults) over one text sample of about `--positions` tokens, GRAPH_MODE. Random weights; the loss is meaningless.
Prints a table: peak RSS after loading and after the step, per depth, and the per-layer increments
extrapolated to the release's 32 layers.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from benchmarks.memory_probe import peak_gib, rss_gib, watch_rss  # noqa: E402
MARK = "@@mem "
GiB = 2 ** 30


def write_checkpoint(path, layers, seed=0, task_loras=True, shard_gib=2.0):
    """A release-width bf16 checkpoint (sharded safetensors and an index) with `layers` decoder layers and seeded
    weights, written shard by shard (memory bounded by a shard). Without `task_loras` it leaves out the task LoRAs,
    which a base LoRA run never loads (they load on demand), so that the full depth fits a smaller disk."""
    from benchmarks.release_scale import release_config
    from mindxcomposer.demo import TOKENIZER_FILE
    from mindxcomposer.weights import fp32_to_bf16, iter_shards, parameter_shapes, write_safetensors
    import shutil

    config = release_config(llm_layers=layers)
    if not task_loras:
        config.task_lora_ranks = {}
    os.makedirs(path, exist_ok=True)
    cfg = config.to_dict()
    vision = cfg.pop("vision_config")
    for k in ("plora_rank", "plora_scale", "task_lora_ranks", "projector_hidden_size", "merged_task_lora"):
        cfg.pop(k)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"), indent=2)
    json.dump(vision, open(os.path.join(path, "vision_config.json"), "w"), indent=2)
    shutil.copyfile(TOKENIZER_FILE, os.path.join(path, "tokenizer.model"))
    rng = np.random.default_rng(seed)
    shapes = parameter_shapes(config)
    shards = iter_shards(shapes, {n: 2 * int(np.prod(s)) for n, s in shapes.items()}, int(shard_gib * GiB))
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for names, file in zip(shards, files):
        tensors = {}
        for name in names:
            shape = shapes[name]
            scale = 0.1 if "norm" in name else (1.0 if name.endswith(("_GN", "embeddings.weight", "embedding")) else
                                                1.0 / np.sqrt(shape[-1]))
            x = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
            if "norm" in name and name.endswith("weight"):
                x += 1
            tensors[name] = fp32_to_bf16(x)
            weight_map[name] = file
        write_safetensors(os.path.join(path, file), tensors, metadata={"format": "pt"},
                          dtypes={n: "BF16" for n in tensors})
    json.dump({"metadata": {"total_size": sum(2 * int(np.prod(s)) for s in shapes.values())},
               "weight_map": weight_map}, open(os.path.join(path, "model.safetensors.index.json"), "w"), indent=1)


def write_data(path, positions, image=None):
    """One sample of about `positions` tokens: text only, or `image` first and words up to the length."""
    words = " ".join(f"word{i % 97}" for i in range(positions // 3))
    sample = {"id": 0, "conversations": [{"from": "human", "value": "Repeat: " + words},
                                         {"from": "gpt", "value": words}]}
    if image:
        sample["image"] = os.path.abspath(image)
    json.dump([sample], open(path, "w"))


def _first_layers(n):
    """Load only the first `n` decoder layers of a converted checkpoint (its other weights as they are): the same
    run at a smaller depth, for the growth with depth."""
    import re
    import mindxcomposer.modeling_xcomposer2 as mx
    base, config_cls = mx.Checkpoint, mx.InternLMXComposer2Config
    read_config = config_cls.from_pretrained.__func__

    class FirstLayers(base):
        def __init__(self, path):
            super().__init__(path)
            deep = re.compile(r"model\.layers\.(\d+)\.")
            self._where = {k: v for k, v in self._where.items()
                           if not (deep.match(k) and int(deep.match(k).group(1)) >= n)}

    def config(cls, path, *a, **k):
        c = read_config(cls, path, *a, **k)
        c.num_hidden_layers = n
        return c
    mx.Checkpoint = FirstLayers
    config_cls.from_pretrained = classmethod(config)


def worker(model_dir, data, out, steps="1", hd_num="18", bf16="False", layers="0", mode="graph", layer_inputs="auto",
           layer_rows="0", head_chunk="0", optimizer_state="auto", resume="False"):
    import mindspore as ms
    import mindxcomposer.finetune.backprop as backprop
    backprop.LAYER_ROWS = int(layer_rows) or backprop.LAYER_ROWS  # 0: the trainer's own
    backprop.HEAD_CHUNK = int(head_chunk) or backprop.HEAD_CHUNK
    ms.set_context(mode=ms.PYNATIVE_MODE if mode == "pynative" else ms.GRAPH_MODE)
    if int(layers):
        _first_layers(int(layers))
    from mindxcomposer.finetune.trainer import Trainer
    from mindxcomposer.finetune.training_args import parse_args

    t0 = time.perf_counter()
    # Upstream's LoRA flags (finetune_lora.sh); dropout as upstream's defaults. Its `--save_strategy epoch
    # --save_total_limit 1`: the data is one sample, so each optimizer step ends an epoch and writes a checkpoint
    # (adapter and AdamW's moments), whose memory the step's peak then includes.
    argv = ["--model_name_or_path", model_dir, "--output_dir", out, "--data_path", data, "--use_lora", "True",
            "--lora_r", "64", "--lora_alpha", "64", "--fix_vit", "True", "--fix_sampler", "True", "--hd_num", hd_num,
            "--batch_size", "1", "--per_device_train_batch_size", "1", "--max_steps", steps,
            "--save_strategy", "epoch", "--save_total_limit", "1",
            "--sampling", "sequential", "--max_length", "16384", "--progress", "False", "--logging_steps", "1",
            "--bf16", bf16, "--layer_inputs", layer_inputs, "--optimizer_state", optimizer_state]
    if resume == "True":  # the latest checkpoint-<step> in `out`: the steps after it, in a new process
        argv += ["--resume_from_checkpoint", "True"]
    from mindxcomposer.finetune import layer_grads
    init = layer_grads.DecoderLayerBlocks.__init__

    def timed_parts(self, *a, **k):  # seconds of each compiled part of a decoder layer (`--parts` in the table)
        init(self, *a, **k)
        for part in ("inputs", "attend", "output", "output_grad", "attend_grad", "inputs_grad"):
            setattr(self, part, _timed(getattr(self, part), part))
    layer_grads.DecoderLayerBlocks.__init__ = timed_parts
    trainer = Trainer(*parse_args(argv))
    loaded = peak_gib()
    load_s = time.perf_counter() - t0
    batch = trainer.data.build(trainer.data.micro_batch_records(0))
    positions = int(np.asarray(batch["attention_mask"]).sum())
    trace(f"loaded in {load_s:.0f} s, peak {loaded:.2f} GiB; {positions} positions")
    grads = trainer.grads
    stores = []  # what `auto` chose
    choose = backprop.choose_store
    backprop.choose_store = lambda *a: stores.append(choose(*a)) or stores[-1]
    for name in ("forward_layer", "_head", "layer_grad", "_image_embeddings", "loss_and_grads"):
        setattr(grads, name, traced(getattr(grads, name), name))  # where the memory goes, as it goes
    for name in ("forward_layer", "layer_grad"):
        setattr(grads, name, _timed(getattr(grads, name), name))
    ends = []
    step = trainer.optimizer.step

    def timed_step(grads, lr):  # the end of each optimizer step
        step(grads, lr)
        ends.append(time.perf_counter())
        trace(f"optimizer step {len(ends)}")
    trainer.optimizer.step = timed_step
    trainer._save_checkpoint = traced(trainer._save_checkpoint, "checkpoint written")
    t1 = time.perf_counter()
    result = trainer.train()
    sys.stdout.write(MARK + json.dumps({"load_peak_gib": loaded, "step_peak_gib": peak_gib(), "load_s": load_s,
                                        "step_s": time.perf_counter() - t1, "positions": positions,
                                        "steps_s": list(np.diff([t1] + ends)),
                                        "losses": [e["loss"] for e in result.log_history if "grad_norm" in e],
                                        "layer_rows": grads.layer_blocks.rows, "head_chunk": backprop.HEAD_CHUNK,
                                        "parts": _PARTS, "layers": grads.config.num_hidden_layers,
                                        "optimizer_state": optimizer_state + (
                                            " (disk)" if trainer.optimizer.on_disk else " (memory)"),
                                        "layer_inputs": layer_inputs + (f" ({stores[0]})" if stores else ""),
                                        "adapter_params": int(sum(np.prod(s) for s in trainer.shapes.values()))})
                     + "\n")


_PARTS = {}  # name -> [calls, seconds]


def _timed(fn, name):
    """`fn`, adding its calls' seconds to `_PARTS[name]` (MindSpore's CPU graphs return when they are done)."""
    def call(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        entry = _PARTS.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += time.perf_counter() - t
        return out
    return call


def trace(text):
    sys.stderr.write(f"@@trace {time.strftime('%H:%M:%S')} rss {rss_gib():.2f} peak {peak_gib():.2f} GiB: {text}\n")
    sys.stderr.flush()


def traced(fn, name):
    """`fn`, tracing resident memory after each call (a killed run still tells where it was)."""
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        trace(name)
        return out
    return call


def run_guarded(cmd, limit_gib, stderr_path):
    """Run `cmd`, killing it if its resident memory passes `limit_gib` (rather than the machine's OOM killer
    taking whatever it picks) -> (returncode, stdout, stderr, its largest sampled RSS in GiB). Its stderr goes to
    `stderr_path` as it comes (a long run can be followed there)."""
    import threading
    with open(stderr_path, "w") as err_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True)
        seen = [0.0]
        t = threading.Thread(target=watch_rss, args=(proc, limit_gib, seen), daemon=True)
        t.start()
        out, _ = proc.communicate()
        t.join()
    with open(stderr_path) as f:
        return proc.returncode, out, f.read(), seen[0]


def full_depth(args):
    """Full depth on a converted checkpoint (`--model`): peak RSS and seconds per optimizer step, one run per
    `--layer-rows` value."""
    data = os.path.join(args.work, f"data-{args.positions}.json")
    write_data(data, args.positions, args.image)
    results = []
    for rows in args.layer_rows:
        tag = f"{args.truncate or 'full'}" + (f"-rows{rows}" if rows else "")
        rc, out, err, seen = run_guarded(
            [sys.executable, os.path.abspath(__file__), "--work", args.work, "--_worker", args.model, data,
             os.path.join(args.work, "out-full"), str(args.steps), str(args.hd_num), str(args.bf16),
             str(args.truncate), args.mode, args.layer_inputs, str(rows), str(args.head_chunk), args.optimizer_state,
             str(args.resume)],
            args.rss_limit, os.path.join(args.work, f"stderr-{tag}.log"))
        line = [x for x in out.splitlines() if x.startswith(MARK)]
        traces = "\n".join(x for x in err.splitlines() if x.startswith("@@trace"))
        with open(os.path.join(args.work, f"trace-{tag}.log"), "w") as f:
            f.write(traces + "\n")
        if rc or not line:
            print(err[-3000:], file=sys.stderr)
            print(traces, file=sys.stderr)
            raise SystemExit(f"the run failed (status {rc}; largest RSS seen {seen:.2f} GiB, limit {args.rss_limit})")
        results.append(json.loads(line[0][len(MARK):]))
    r = results[0]
    image = f", image {os.path.basename(args.image)} at hd_num {args.hd_num}" if args.image else ""
    print(f"command: python benchmarks/finetune_release_memory.py --work {args.work} --model {args.model} "
          f"--positions {args.positions} --steps {args.steps}" + (f" --image {args.image} --hd_num {args.hd_num}"
                                                                   if args.image else "")
          + (" --bf16" if args.bf16 else "") + (f" --truncate {args.truncate}" if args.truncate else "")
          + f" --layer-inputs {args.layer_inputs} --optimizer-state {args.optimizer_state}"
          + (f" --layer-rows {' '.join(map(str, args.layer_rows))}" if any(args.layer_rows) else "")
          + (f" --head-chunk {args.head_chunk}" if args.head_chunk else "") + (" --resume" if args.resume else ""))
    depth = f"its first {args.truncate} decoder layers" if args.truncate else "full depth"
    print(f"LoRA r 64 on the five linears (upstream's flags), {depth}, {r['positions']} positions{image}, "
          f"{'bf16' if args.bf16 else 'exact'} products, layer inputs: {r['layer_inputs']}, AdamW moments: "
          f"{r['optimizer_state']}, "
          f"head chunks of {r['head_chunk']} positions\n")
    if args.resume:
        print("Resumed from the last run's checkpoint: this process ran the steps after it (their seconds below); the "
              "losses are the whole run's, from the checkpoint's log history on.\n")
    print("| rows per block | peak after load (GiB) | peak after the steps (GiB) | s / optimizer step | load (s) | "
          "losses |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['layer_rows']} | {r['load_peak_gib']:.2f} | {r['step_peak_gib']:.2f} | "
              f"{', '.join(f'{s:.0f}' for s in r['steps_s'])} | {r['load_s']:.0f} | "
              f"{', '.join(f'{x:.4f}' for x in r['losses'])} |")
    # Where a layer's time goes: each compiled part over all its blocks and layers, per layer and step.
    first = results[0]  # (`r` is the last run after the loop above)
    layers_run = first["layers"]
    parts = first.get("parts", {})
    if parts:
        print("\n| part (first run) | calls | s per layer and step | % of forward + gradient |")
        print("|---|---|---|---|")
        whole = sum(parts.get(k, [0, 0.0])[1] for k in ("forward_layer", "layer_grad"))
        for name, (calls, sec) in parts.items():
            print(f"| {name} | {calls} | {sec / layers_run / args.steps:.2f} | {100 * sec / whole:.0f}% |")
    # Seconds per step against the machine: the decoder's products are the forward's 2 x positions x weights, the
    # gradient's recomputation of it and the input gradients (the adapters' products add ~2%, attention's grow
    # with the square of the length and are left out).
    flop = 3 * 2.0 * r["positions"] * decoder_linear_params(args.model, args.truncate)
    rates = machine_rates()
    mode = "bf16" if args.bf16 else "exact"
    best = min(s for r in results for s in r["steps_s"])
    print(f"\nA step's decoder products: {flop / 1e12:.1f} TFLOP, {flop / best / 1e9:.0f} GFLOP/s at the fastest "
          f"step ({best:.0f} s). This machine in this run ({rates['isa']}), one product [512 x 4096] x "
          f"[4096 x 14336]: " + ", ".join(f"ours {m} {v:.0f}" for m, v in rates["ours"].items())
          + ", " + ", ".join(f"{m} {v:.0f}" for m, v in rates["ref"].items())
          + f" GFLOP/s: the step runs its products at {flop / best / 1e9 / rates['ours'][mode]:.0%} of ours {mode}.")


def decoder_linear_params(model_dir, layers=0):
    """The decoder's base linear weights (wqkv, wo, w1, w2, w3 over its layers, or its first `layers`), by the
    model's own parameter shapes (unquantized: the weights the products multiply)."""
    from mindxcomposer.configuration import InternLMXComposer2Config
    from mindxcomposer.constants import LINEARS
    from mindxcomposer.weights import parameter_shapes

    config = InternLMXComposer2Config.from_pretrained(model_dir, ignore_quantization=True)
    shapes = parameter_shapes(config)
    return sum(int(np.prod(shapes[f"model.layers.{i}.{lin}.weight"]))
               for i in range(layers or config.num_hidden_layers) for lin in LINEARS)


def machine_rates():
    """This machine's GEMM rates in this run (`prefill_profile`: one product [512 x 4096] x [4096 x 14336], our
    kernel exact and bf16, numpy fp32), measured in a process of their own after the training runs."""
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); from prefill_profile import kernel_rates, "
            "reference_rates; from mindxcomposer.ops import cpu_kernels; "
            "print(json.dumps({'isa': cpu_kernels.isa(), 'ours': kernel_rates(), 'ref': reference_rates()}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="scratch directory (checkpoints of a few GB)")
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 4])
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--model", help="a converted checkpoint: run it at its full depth instead of --layers")
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps (with --model)")
    ap.add_argument("--image", help="an image placed first in the sample (with --model)")
    ap.add_argument("--hd_num", type=int, default=18)
    ap.add_argument("--bf16", action="store_true", help="--bf16 True: bf16 products")
    ap.add_argument("--mode", choices=("graph", "pynative"), default="graph", help="with --model: MindSpore's mode")
    ap.add_argument("--truncate", type=int, default=0, help="with --model: its first N decoder layers only")
    ap.add_argument("--layer-inputs", choices=("auto", "memory", "disk"), default="auto",
                    help="with --model: mxc-finetune's --layer_inputs")
    ap.add_argument("--optimizer-state", choices=("auto", "memory", "disk"), default="auto",
                    help="with --model: mxc-finetune's --optimizer_state")
    ap.add_argument("--layer-rows", type=int, nargs="+", default=[0],
                    help="with --model: decoder rows per block (backprop.LAYER_ROWS; 0: the trainer's own), a run each")
    ap.add_argument("--head-chunk", type=int, default=0, help="with --model: backprop.HEAD_CHUNK (0: its default)")
    ap.add_argument("--rss-limit", type=float, default=21.5, help="GiB; the run is killed above it")
    ap.add_argument("--resume", action="store_true",
                    help="with --model: resume from the latest checkpoint of the last run (WORK/out-full) and run its "
                         "steps up to --steps in a new process (mxc-finetune's --resume_from_checkpoint True)")
    ap.add_argument("--_worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        return worker(*args._worker)
    os.makedirs(args.work, exist_ok=True)
    if args.model:
        return full_depth(args)
    data = os.path.join(args.work, "data.json")
    write_data(data, args.positions)
    results = {}
    for layers in args.layers:
        model_dir = os.path.join(args.work, f"release-{layers}l")
        if not os.path.isfile(os.path.join(model_dir, "model.safetensors.index.json")):
            write_checkpoint(model_dir, layers)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--work", args.work, "--_worker", model_dir,
                               data, os.path.join(args.work, f"out-{layers}")], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith(MARK)]
        if proc.returncode or not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"worker for {layers} layers failed")
        results[layers] = json.loads(line[0][len(MARK):])
    a, b = args.layers
    ra, rb = results[a], results[b]
    per_layer_load = (rb["load_peak_gib"] - ra["load_peak_gib"]) / (b - a)
    per_layer_step = (rb["step_peak_gib"] - ra["step_peak_gib"]) / (b - a)
    print(f"command: python benchmarks/finetune_release_memory.py --work {args.work} --layers {a} {b} "
          f"--positions {args.positions}")
    print(f"LoRA r 64 on the five linears, one text sample of {ra['positions']} positions, bf16 base, fp32 compute\n")
    print("| decoder layers | peak after load (GiB) | peak after one step (GiB) | step (s) |")
    print("|---|---|---|---|")
    for n in args.layers:
        r = results[n]
        print(f"| {n} | {r['load_peak_gib']:.2f} | {r['step_peak_gib']:.2f} | {r['step_s']:.0f} |")
    for n in (32,):
        print(f"| {n} (extrapolated: + {per_layer_load:.3f} GiB/layer loaded, + {per_layer_step:.3f} GiB/layer "
              f"at the step's peak) | {ra['load_peak_gib'] + (n - a) * per_layer_load:.2f} | "
              f"{ra['step_peak_gib'] + (n - a) * per_layer_step:.2f} | |")


if __name__ == "__main__":
    main()
