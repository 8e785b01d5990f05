"""What a LoRA fine-tuning step holds at the release's width: peak RSS of `mxc-finetune`'s trainer on a bf16
checkpoint of the release's sizes (hidden 4096, 92544-token vocabulary, ViT-L/14-560, task LoRAs) with fewer
decoder layers, extrapolated to 32 from the difference between two depths.

    python benchmarks/finetune_release_memory.py --work /tmp/ftmem [--layers 2 4] [--positions 2048]

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
MARK = "@@mem "
GiB = 2 ** 30


def _peak_gib():
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries the parent's peak over fork and
    exec into it, and the parent here has just written a checkpoint of several GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def write_checkpoint(path, layers, seed=0):
    """A release-width bf16 checkpoint (safetensors) with `layers` decoder layers and seeded weights."""
    from benchmarks.release_scale import release_config
    from mindxcomposer.demo import TOKENIZER_FILE
    from mindxcomposer.weights import fp32_to_bf16, parameter_shapes, write_safetensors
    import shutil

    config = release_config(llm_layers=layers)
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
    tensors = {}
    for name, shape in shapes.items():
        scale = 0.1 if "norm" in name else (1.0 if name.endswith(("_GN", "embeddings.weight", "embedding")) else
                                            1.0 / np.sqrt(shape[-1]))
        x = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        if "norm" in name and name.endswith("weight"):
            x += 1
        tensors[name] = fp32_to_bf16(x)
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, metadata={"format": "pt"},
                      dtypes={n: "BF16" for n in tensors})


def write_data(path, positions):
    words = " ".join(f"word{i % 97}" for i in range(positions // 3))
    json.dump([{"id": 0, "conversations": [{"from": "human", "value": "Repeat: " + words},
                                           {"from": "gpt", "value": words}]}], open(path, "w"))


def worker(model_dir, data, out):
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE)
    from mindxcomposer.finetune.trainer import Trainer
    from mindxcomposer.finetune.training_args import parse_args

    t0 = time.perf_counter()
    argv = ["--model_name_or_path", model_dir, "--output_dir", out, "--data_path", data, "--use_lora", "True",
            "--batch_size", "1", "--per_device_train_batch_size", "1", "--max_steps", "1", "--save_strategy", "no",
            "--sampling", "sequential", "--max_length", "16384", "--progress", "False", "--logging_steps", "1"]
    trainer = Trainer(*parse_args(argv))
    loaded = _peak_gib()
    load_s = time.perf_counter() - t0
    batch = trainer.data.build(trainer.data.micro_batch_records(0))
    positions = int(np.asarray(batch["attention_mask"]).sum())
    t1 = time.perf_counter()
    trainer.train()
    sys.stdout.write(MARK + json.dumps({"load_peak_gib": loaded, "step_peak_gib": _peak_gib(), "load_s": load_s,
                                        "step_s": time.perf_counter() - t1, "positions": positions,
                                        "adapter_params": int(sum(np.prod(s) for s in trainer.shapes.values()))})
                     + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="scratch directory (checkpoints of a few GB)")
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 4])
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--_worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        return worker(*args._worker)
    os.makedirs(args.work, exist_ok=True)
    data = os.path.join(args.work, "data.json")
    write_data(data, args.positions)
    results = {}
    for layers in args.layers:
        model_dir = os.path.join(args.work, f"release-{layers}l")
        if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
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
