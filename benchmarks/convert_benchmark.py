#!/usr/bin/env python
"""Peak memory and throughput of `mxc-convert` on a multi-GB checkpoint with the release's names and shapes.

Builds a synthetic bf16 checkpoint at release width (hidden 4096, intermediate 14336, vocab 92544, PLoRA 256,
task LoRAs, CLIP ViT-L 1024 x 24 layers) with only a few decoder layers, saved both as `.bin` shards (torch)
and as safetensors shards, each with its index. Every case converts it in a child process; the child's
peak RSS is its VmHWM. The source was just written, so it is read from the page cache: the GB/s
are the converter's own cost, not a disk's. Not a test: it takes minutes and several GB of disk.

    python benchmarks/convert_benchmark.py [--layers 2] [--source-shard-size 2GB] [--shard-size 1GB]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from mindxcomposer.configuration import InternLMXComposer2Config  # noqa: E402
from mindxcomposer.convert import parse_size  # noqa: E402
from mindxcomposer.demo import TOKENIZER_FILE  # noqa: E402
from mindxcomposer.weights import TASK_LORAS, iter_shards, parameter_shapes, write_safetensors  # noqa: E402


def random_bf16(shape, rng):
    """bf16 bits of values with magnitude in [2^-8, 2^0) and a random sign: finite, as weights are."""
    bits = rng.integers(0x3B80, 0x3F80, size=shape, dtype=np.uint16)
    return bits | (rng.integers(0, 2, size=shape, dtype=np.uint16) << 15)


def build(root, config, shard_bytes, seed=0):
    """Write the same tensors as bin/ (torch .bin shards) and st/ (safetensors shards)."""
    import torch

    shapes = parameter_shapes(config)
    sizes = {n: int(np.prod(s)) * 2 for n, s in shapes.items()}
    shards = iter_shards(list(shapes), sizes, shard_bytes)
    d = config.to_dict()
    vision = d.pop("vision_config")
    for k in ("plora_rank", "plora_scale", "task_lora_ranks", "projector_hidden_size", "merged_task_lora"):
        d.pop(k)  # the upstream config.json does not carry them
    rng = np.random.default_rng(seed)
    for fmt, ext, index in (("bin", "bin", "pytorch_model.bin.index.json"),
                            ("st", "safetensors", "model.safetensors.index.json")):
        os.makedirs(os.path.join(root, fmt))
        for name, obj in (("config.json", d), ("vision_config.json", vision)):
            with open(os.path.join(root, fmt, name), "w") as f:
                json.dump(obj, f)
        shutil.copyfile(TOKENIZER_FILE, os.path.join(root, fmt, "tokenizer.model"))
    weight_map = {"bin": {}, "st": {}}
    for i, names in enumerate(shards):
        arrays = {n: random_bf16(shapes[n], rng) for n in names}
        bin_name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        st_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        torch.save({n: torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) for n, a in arrays.items()},
                   os.path.join(root, "bin", bin_name))
        write_safetensors(os.path.join(root, "st", st_name), arrays, metadata={"format": "pt"},
                          dtypes={n: "BF16" for n in names})
        weight_map["bin"].update({n: bin_name for n in names})
        weight_map["st"].update({n: st_name for n in names})
        print(f"  wrote shard {i + 1}/{len(shards)} ({sum(sizes[n] for n in names) / 1e9:.2f} GB)", flush=True)
    for fmt, index in (("bin", "pytorch_model.bin.index.json"), ("st", "model.safetensors.index.json")):
        with open(os.path.join(root, fmt, index), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map[fmt]}, f)
    return sum(sizes.values()), max(sizes.values())


def run_child(cmd):
    """Wall time and peak RSS (bytes) of a child process. The peak is VmHWM polled from /proc: the child's
    `ru_maxrss` would start at this (large) process's RSS, which Linux carries across fork + exec."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        peak = 0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    peak = max([peak] + [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")])
            except (OSError, ValueError):
                pass  # the child exited between poll() and open()
            time.sleep(0.02)
        log.seek(0)
        out = log.read()
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out}")
    return time.monotonic() - t0, peak, out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="decoder layers (the release has 32)")
    p.add_argument("--task-lora-rank", type=int, default=256)
    p.add_argument("--source-shard-size", default="2GB")
    p.add_argument("--shard-size", default="1GB", help="--shard-size given to mxc-convert")
    p.add_argument("--workdir", help="where to build (default: a temporary directory, removed afterwards)")
    args = p.parse_args()

    config = InternLMXComposer2Config(num_hidden_layers=args.layers,
                                      task_lora_ranks={t: args.task_lora_rank for t in TASK_LORAS})
    root = args.workdir or tempfile.mkdtemp(prefix="mxc-convert-bench-")
    os.makedirs(root, exist_ok=True)
    try:
        print(f"building a synthetic checkpoint in {root}", flush=True)
        total, largest_tensor = build(root, config, parse_size(args.source_shard_size))
        largest_shard = max(os.path.getsize(os.path.join(root, "bin", f))
                            for f in os.listdir(os.path.join(root, "bin")) if f.endswith(".bin"))
        _, baseline, _ = run_child([sys.executable, "-c", "import mindspore, numpy"])
        convert_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "convert_weights",
                                  "convert.py")
        small = ["--shard-size", args.shard_size]
        cases = [("bin", small), ("st", small), ("bin", small + ["--merge-task", "web"]),
                 ("st", small + ["--dtype", "fp32"]), ("bin", small + ["--verify"]), ("bin", [])]
        rows = []
        for fmt, extra in cases:
            dst = os.path.join(root, "out")
            cmd = [sys.executable, os.path.normpath(convert_py), os.path.join(root, fmt), dst] + extra
            print("$ " + " ".join(cmd), flush=True)
            secs, peak, out = run_child(cmd)
            print("\n".join(line for line in out.splitlines() if line.startswith(("converted", "note"))), flush=True)
            written = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst)
                          if f.endswith(".safetensors"))
            shutil.rmtree(dst)
            rows.append((fmt, " ".join(extra) or "(defaults: keep bf16, --shard-size 5GB)", secs, total / secs / 1e9, written / 1e9,
                         peak / 1e9, (peak - baseline) / 1e9, peak <= largest_shard + 1e9))
        print()
        print(f"checkpoint: {total / 1e9:.2f} GB bf16, {args.layers} decoder layers at release width, task LoRA rank "
              f"{args.task_lora_rank}; largest source shard {largest_shard / 1e9:.2f} GB; largest tensor "
              f"{largest_tensor / 1e9:.2f} GB (bf16); MindSpore+numpy import "
              f"alone: {baseline / 1e9:.2f} GB RSS")
        print("| source | options | wall s | GB/s (source, end to end) | written GB | peak RSS GB | peak - import GB | "
              "<= largest shard + 1 GB |")
        print("|---|---|---|---|---|---|---|---|")
        for fmt, opts, secs, rate, written, peak, over, ok in rows:
            print(f"| {'.bin (torch mmap)' if fmt == 'bin' else 'safetensors'} | {opts} | {secs:.1f} | {rate:.2f} | "
                  f"{written:.2f} | {peak:.2f} | {over:.2f} | {'yes' if ok else 'NO'} |")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
