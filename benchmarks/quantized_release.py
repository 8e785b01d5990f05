"""Quantized weights at release size: decode speed against bf16 and against each one's read roofline, resident
weights and peak RSS of chat + the 4K image, all in one run.

    python benchmarks/quantized_release.py bf16=/work/rs/ms int4=/tmp/int4 [int8=/tmp/int8] \
        [--no-chat bf16] [--no-4k bf16] [--new-tokens 16] [--json out.json]

Each NAME=DIR is a model directory (`mxc-convert SRC DIR [--quantize int8|int4]`), measured in its own process,
one after the other (GRAPH_MODE, the CPU kernels, exact products, base mode: no task LoRA resident):

1. `from_pretrained(DIR)`: seconds, resident parameter bytes, RSS;
2. `chat` about a small image (tests/assets/chelsea.png, `hd_num=1`, 8 new tokens, greedy): peak RSS;
3. the embeddings of a 4K image (3840x2160, `hd_num=24`, 25 crops) in the same process: seconds, peak RSS
   (the bound of issue #16: int4 9 GiB, int8 13 GiB);
4. decode: a 32-token text prompt prefilled, then `--new-tokens` greedy steps of a `ModelSession`
   (batch 1); median ms per step, the first two left out;
5. the machine's read bandwidth in the same process (`release_scale.read_bandwidth_gbs`: best of a BLAS GEMV and
   numpy sums over 1 GiB) and the bytes one decode step reads, counted from the resident parameters (per layer
   the stored base weights (int8 / int4 parts or bf16) and norms, the final norm, the output head, one
   embedding row; the KV cache of a 32-token prompt is left out: < 0.1%). Roofline = bytes / bandwidth.

A benchmark, not a test: it prints a table (and with --json writes every number). Run it alone on the machine.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (REPO, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)
from benchmarks.memory_probe import peak_gib  # noqa: E402

MARK = "@@bench "
SMALL_IMAGE = os.path.join(REPO, "tests", "assets", "chelsea.png")
QUERY = "Describe this image in detail."
GiB = 2 ** 30


def decode_read_bytes(model) -> int:
    """Bytes of the parameters one decode step reads (see the module docstring)."""
    total = 0
    for layer in model.model.layers:
        for p in layer.layer_weights(()):
            if "Plora" not in p.name:  # the image LoRA: decode steps never take it
                total += p.nbytes
    total += model.model.norm.weight.nbytes + model.output.weight.nbytes
    emb = model.model.tok_embeddings.weight
    return total + emb.nbytes // emb.shape[0]


def worker(args):
    import mindspore as ms

    from mindxcomposer import InternLMXComposer2ForCausalLM
    from mindxcomposer.ops import cpu_kernels, kernels_enabled
    from mindxcomposer.session import ModelSession
    from release_scale import read_bandwidth_gbs

    ms.set_context(mode=ms.GRAPH_MODE)
    out = {"dir": args.dir, "threads": int(ms.get_context("runtime_num_threads"))}
    t = time.perf_counter()
    model = InternLMXComposer2ForCausalLM.from_pretrained(args.dir)
    out.update(load_s=time.perf_counter() - t, resident_gib=sum(p.nbytes for p in model.get_parameters()) / GiB,
               peak_load_gib=peak_gib(), quantization=model.config.quantization_config, kernels=kernels_enabled(),
               isa=cpu_kernels.isa())
    if args.chat:
        t = time.perf_counter()
        response, _ = model.chat(model.tokenizer, QUERY, image=[SMALL_IMAGE], hd_num=1, max_new_tokens=8,
                                 do_sample=False, num_beams=1)
        out.update(chat_s=time.perf_counter() - t, chat_response=response, peak_chat_gib=peak_gib())
    if args.big_image:
        t = time.perf_counter()
        emb = model.encode_img(args.big_image, hd_num=24)
        out.update(vit4k_s=time.perf_counter() - t, vit4k_tokens=int(emb.shape[1]), peak_chat_4k_gib=peak_gib())
        del emb
    rng = np.random.default_rng(0)
    ids = rng.integers(100, model.config.vocab_size - 100, size=(1, 32))
    session = ModelSession(model, 1, 32 + args.new_tokens + 8)
    t = time.perf_counter()
    logits = session.prefill(model.embed_tokens(ids).astype(np.float32), np.zeros((1, 32), bool))
    out["prefill32_s"] = time.perf_counter() - t
    steps, tokens = [], [int(logits[0].argmax())]
    for _ in range(args.new_tokens):
        t = time.perf_counter()
        logits = session.step(np.array([tokens[-1]]))
        steps.append(time.perf_counter() - t)
        tokens.append(int(logits[0].argmax()))
    out.update(decode_ms=float(np.median(steps[2:]) * 1e3), decode_steps_ms=[s * 1e3 for s in steps], tokens=tokens,
               read_bytes=decode_read_bytes(model), peak_gib=peak_gib())
    out["bandwidth"] = read_bandwidth_gbs()
    out["bandwidth_gbs"] = max(out["bandwidth"].values())
    out["roofline_ms"] = out["read_bytes"] / (out["bandwidth_gbs"] * 1e9) * 1e3
    sys.stdout.write(MARK + json.dumps(out) + "\n")


def run(name, path, args):
    argv = [sys.executable, os.path.abspath(__file__), "--worker", path, "--new-tokens", str(args.new_tokens)]
    if name not in args.no_chat:
        argv.append("--chat")
    if name not in args.no_4k:
        argv += ["--four-k", "--big-image", args.big_image]
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    reply = {}
    for line in proc.stdout:
        if line.startswith(MARK):
            reply = json.loads(line[len(MARK):])
    _, status, usage = os.wait4(proc.pid, 0)
    reply.update(rc=os.waitstatus_to_exitcode(status), wall_s=time.perf_counter() - t,
                 maxrss_gib=usage.ru_maxrss / 2 ** 20)
    print(f"[{name}] " + json.dumps({k: v for k, v in reply.items() if k not in ("decode_steps_ms", "tokens")})[:600],
          flush=True)
    return reply


def print_table(results):
    base = results.get("bf16", {}).get("decode_ms")
    print("\n| model | resident GiB | load s | peak chat GiB | peak chat + 4K GiB | 4K s | decode ms/token | "
          "vs bf16 | GB read/step | bandwidth GB/s | roofline ms | % of roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "decode_ms" not in r:
            print(f"| {name} | failed (rc {r.get('rc')}) |")
            continue

        def f(key, fmt="{:.2f}"):
            return fmt.format(r[key]) if key in r else "-"

        speed = f"{base / r['decode_ms']:.2f}x" if base else "-"
        print(f"| {name} | {f('resident_gib')} | {f('load_s', '{:.0f}')} | {f('peak_chat_gib')} | "
              f"{f('peak_chat_4k_gib')} | {f('vit4k_s', '{:.0f}')} | {r['decode_ms']:.0f} | {speed} | "
              f"{r['read_bytes'] / 1e9:.2f} | {r['bandwidth_gbs']:.1f} | {r['roofline_ms']:.0f} | "
              f"{100 * r['roofline_ms'] / r['decode_ms']:.0f}% |")


def make_4k_image(path):
    from PIL import Image

    src = Image.open(os.path.join(REPO, "tests", "assets", "astronaut.png")).convert("RGB")
    src.resize((3840, 2160), Image.BICUBIC).save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="NAME=DIR, measured in this order")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--no-chat", default="", help="comma-separated NAMEs that skip the chat")
    ap.add_argument("--no-4k", default="", help="comma-separated NAMEs that skip the 4K image")
    ap.add_argument("--big-image", default="/tmp/mxc_image_3840x2160.png")
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--four-k", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.dir = args.worker
        args.big_image = args.big_image if args.four_k else None
        return worker(args)
    args.no_chat, args.no_4k = set(args.no_chat.split(",")), set(args.no_4k.split(","))
    if not os.path.isfile(args.big_image):
        make_4k_image(args.big_image)
    results = {}
    for spec in args.models:
        name, path = spec.split("=", 1)
        results[name] = run(name, path, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print_table(results)


if __name__ == "__main__":
    main()
