"""Does a LoRA step's memory grow with the number of decoder layers? Peak RSS of `mxc-finetune`'s trainer on a
bf16 checkpoint of one width at two depths, against what a step must hold per layer (its input, kept from the
forward to the backward: positions x hidden x 4 bytes) and what the checkpoint adds per layer.

    python benchmarks/finetune_depth_memory.py --work /tmp/ftdepth [--layers 2 8] [--hidden 1024] [--positions 1024]

Each depth runs in its own process (a process's peak is its high-water mark): load the model (base kept in bf16,
as a LoRA run does), then `--steps` optimizer steps of LoRA r 64 on the five linears over one text sample of about
`--positions` tokens, GRAPH_MODE, random weights. Prints a table: peak after loading, peak after the steps, the
step's own growth (peak after the steps minus peak after loading), the resident memory during the decoder's
backward beyond the loaded model (sampled after each layer's gradient call), per depth; then the growth of both per
extra layer against one layer input. It measures the recomputed blocks, the path a deep or wide model takes
(`backprop.KEEP_ACTIVATIONS_BYTES` off): a small model's one-graph decoder keeps every layer's activations, by
design, within that bound.
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
from benchmarks.memory_probe import peak_gib, rss_gib  # noqa: E402
MARK = "@@mem "
GiB = 2 ** 30


def depth_config(hidden, layers):
    """The release's shapes scaled to `hidden` (head_dim 128, 4 query heads a key head, intermediate 2.75 x),
    a small ViT (images are not used here)."""
    from mindxcomposer.demo import tiny_config

    heads = max(hidden // 128, 1)
    return tiny_config(hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 16 * 16, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), plora_rank=64,
                       max_position_embeddings=32768)


def write_bf16_model(path, config, seed=0):
    """The demo model's seeded weights for `config`, stored in bf16 (the release's storage)."""
    from mindxcomposer.demo import random_weights, save_demo_model
    from mindxcomposer.weights import fp32_to_bf16, write_safetensors

    save_demo_model(path, config, seed)
    weights = random_weights(config, seed)
    write_safetensors(os.path.join(path, "model.safetensors"), {k: fp32_to_bf16(v) for k, v in weights.items()},
                      metadata={"format": "pt"}, dtypes={k: "BF16" for k in weights})


def write_data(path, positions):
    words = " ".join(f"word{i % 97}" for i in range(positions // 3))
    with open(path, "w") as f:
        json.dump([{"id": 0, "conversations": [{"from": "human", "value": "Repeat: " + words},
                                               {"from": "gpt", "value": words}]}], f)


def run_steps(model_dir, data, out, steps, extra=()):
    """Load and train `steps` LoRA steps in this process -> dict of peaks (GiB), seconds and sizes."""
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE)
    from mindxcomposer.finetune import backprop
    from mindxcomposer.finetune.trainer import Trainer
    from mindxcomposer.finetune.training_args import parse_args

    # The recomputed blocks, the path a deep or wide model takes: their memory is what must stay flat in depth. (A
    # small model's one-graph decoder keeps every layer's activations, within `backprop.KEEP_ACTIVATIONS_BYTES`.)
    backprop.KEEP_ACTIVATIONS_BYTES = None
    argv = ["--model_name_or_path", model_dir, "--output_dir", out, "--data_path", data, "--use_lora", "True",
            "--batch_size", "1", "--per_device_train_batch_size", "1", "--max_steps", str(steps),
            "--save_strategy", "no", "--sampling", "sequential", "--max_length", "16384", "--progress", "False",
            "--logging_steps", "1", "--plora_dropout", "0", "--lora_dropout", "0"] + list(extra)
    trainer = Trainer(*parse_args(argv))
    loaded, loaded_rss = peak_gib(), rss_gib()
    # Resident memory after each decoder layer's gradient call: the layer inputs still held, the gradients so far
    # and anything a call leaves behind, at the same point of every step whatever the depth (the step's peak
    # itself is set by the head and loss, and hides what the decoder's backward holds).
    backward_rss = []
    layer_grad = trainer.grads.layer_grad

    def recording_layer_grad(*args):
        out = layer_grad(*args)
        out[0].asnumpy()  # waits for the call
        backward_rss.append(rss_gib())
        return out
    trainer.grads.layer_grad = recording_layer_grad
    batch = trainer.data.build(trainer.data.micro_batch_records(0))
    positions = int(np.asarray(batch["attention_mask"]).sum())
    t = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t
    return {"load_peak_gib": loaded, "step_peak_gib": peak_gib(), "seconds_per_step": seconds / steps,
            "loaded_rss_gib": loaded_rss, "backward_rss_gib": max(backward_rss),
            "positions": positions, "hidden": trainer.model.config.hidden_size,
            "losses": [e["loss"] for e in result.log_history if "grad_norm" in e]}


def measure(work, hidden, layers_list, positions, steps, extra=()):
    """{layers: run_steps(...)} each in its own process."""
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, f"data-{positions}.json")
    write_data(data, positions)
    results = {}
    for layers in layers_list:
        model_dir = os.path.join(work, f"h{hidden}-{layers}l")
        if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
            write_bf16_model(model_dir, depth_config(hidden, layers))
        code = (f"import json, sys; sys.path.insert(0, {REPO!r}); from benchmarks.finetune_depth_memory import "
                f"run_steps, MARK; print(MARK + json.dumps(run_steps({model_dir!r}, {data!r}, "
                f"{os.path.join(work, f'out-{layers}')!r}, {steps}, {list(extra)!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
        line = [x for x in proc.stdout.splitlines() if x.startswith(MARK)]
        if proc.returncode or not line:
            raise RuntimeError(f"worker for {layers} layers failed:\n{proc.stderr[-3000:]}")
        results[layers] = json.loads(line[0][len(MARK):])
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="scratch directory (checkpoints)")
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 8])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    results = measure(args.work, args.hidden, args.layers, args.positions, args.steps)
    a, b = args.layers
    ra, rb = results[a], results[b]
    print(f"command: python benchmarks/finetune_depth_memory.py --work {args.work} --layers {a} {b} "
          f"--hidden {args.hidden} --positions {args.positions} --steps {args.steps}")
    print(f"LoRA r 64 on the five linears, bf16 base, one text sample of {ra['positions']} positions, "
          f"{args.steps} optimizer steps\n")
    print("| decoder layers | peak after load (GiB) | peak after the steps (GiB) | step growth (GiB) | RSS in the "
          "decoder's backward over loaded (GiB) | s / step |")
    print("|---|---|---|---|---|---|")
    for n in args.layers:
        r = results[n]
        print(f"| {n} | {r['load_peak_gib']:.3f} | {r['step_peak_gib']:.3f} | "
              f"{r['step_peak_gib'] - r['load_peak_gib']:.3f} | {backward_held(r):.3f} | {r['seconds_per_step']:.2f} |")
    growth = ((rb["step_peak_gib"] - rb["load_peak_gib"]) - (ra["step_peak_gib"] - ra["load_peak_gib"])) / (b - a)
    held = (backward_held(rb) - backward_held(ra)) / (b - a)
    layer_input = -(-ra["positions"] // 64) * 64 * args.hidden * 4 / GiB
    print(f"\nper extra layer: step peak + {growth * 1024:.1f} MiB, held in the decoder's backward + {held * 1024:.1f} "
          f"MiB; one layer input ({ra['positions']} positions x {args.hidden} x 4 bytes, padded to 64): "
          f"{layer_input * 1024:.1f} MiB")


def backward_held(r):
    """GiB resident during the decoder's backward beyond the loaded model."""
    return r["backward_rss_gib"] - r["loaded_rss_gib"]


if __name__ == "__main__":
    main()
