"""Release-scale benchmark: the 11.1B-parameter, 22.2 GB bf16 IXC2.5 checkpoint on one 24 GB CPU machine.

    python benchmarks/release_scale.py --workdir /data/release [--checkpoint HUB_DIR]
        [--upstream /work/upstream/base --upstream-python /work/venv-ref/bin/python] [--json out.json]

A benchmark, not a test: it prints a table and writes JSON. Stages, each in its own process so that
every peak RSS is that stage's alone:

1. write    (without --checkpoint) a release-size checkpoint in the hub's layout, seeded random
            weights: 3 bf16 `pytorch_model-0000{1,2,3}-of-00003.bin` shards + index, config.json,
            vision_config.json, tokenizer; task LoRAs at release ranks (web 512, sft/dpo 256).
2. convert  `mxc-convert SRC DST` with default options (keeps bf16).
3. rates    the machine's GEMM rates on one prefill-shaped product [512 x 4096] x [4096 x 14336]: our
            kernel in each arithmetic, numpy (BLAS) fp32 and, where torch is installed, torch fp32 / bf16.
4. ours     GRAPH_MODE, exact products (the default): `from_pretrained(DST)` (bf16 resident, no task
            LoRA); `chat` about a small image (`hd_num=1`, 8 new tokens, greedy) end to end; the same
            prompt through `generate` (prefill s, tokens/s, decoder GFLOP/s, decode ms/token, compile
            count); a text-only prompt's prefill; then in the SAME process the embeddings of a 4K image
            (3840x2160) at hd_num=24 (25 crops): time, peak.
   ours_bf16  the same with `compute_dtype="bf16"` (bf16 products).
5. ours_web `from_pretrained(DST)` and `write_webpage` (2 beams, brings in lora_web): peak RSS and the
            prompt rows prefilled (once, copied to the beams).
6. upstream (with --upstream) the upstream PyTorch code on the same checkpoint: the 4K image's
            embeddings in fp32 eager (compared with ours, 1e-5 relative) and bf16 prefill + decode on our
            chat prompt and on the text prompt, where it fits in memory (the worker says when it does not).

Decode is also put against the bf16 read roofline: the bf16 bytes one decode step must read (decoder
linears without the image LoRA, norms, output head, one embedding row) over the machine's read bandwidth
measured in the same run (best of a BLAS GEMV and a numpy sum over 1 GiB).
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from benchmarks.memory_probe import peak_gib, rss_gib  # noqa: E402

MARK = "@@bench "
RELEASE_TASK_RANKS = {"lora_web": 512, "lora_sft": 256, "lora_dpo": 256}
SMALL_IMAGE = os.path.join(REPO, "tests", "assets", "chelsea.png")  # 451x300: one tile
QUERY = "Describe this image in detail."
GiB = 2 ** 30


def _reply(obj):
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def release_config(llm_layers=32, vit_layers=24):
    """The release configuration; fewer layers only to try the script out quickly."""
    from mindxcomposer.configuration import CLIPVisionConfig, InternLMXComposer2Config

    return InternLMXComposer2Config(num_hidden_layers=llm_layers, vision_config=CLIPVisionConfig(num_hidden_layers=vit_layers),
                                    task_lora_ranks=dict(RELEASE_TASK_RANKS), projector_hidden_size=4096)


# ----------------------------------------------------------------------------------------------- write
def _scale_and_fill(name, shape):
    """(kind, scale) with the conventions of `mindxcomposer.demo.random_weights`."""
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layrnorm.weight", "layernorm.weight")):
        return "one_plus", 0.1
    if name.endswith("bias"):
        return "normal", 0.02
    if name.endswith(("_GN", "tok_embeddings.weight", "position_embedding.weight", "class_embedding")):
        return "normal", 1.0
    if name.endswith("patch_embedding.weight"):
        return "normal", 1.0 / float(np.sqrt(np.prod(shape[1:])))
    return "normal", (1.0 / float(np.sqrt(shape[-1]))) * (0.5 if "lora" in name.lower() else 1.0)


def stage_write(args):
    import torch

    from mindxcomposer.demo import TOKENIZER_FILE
    from mindxcomposer.weights import parameter_shapes

    t0 = time.perf_counter()
    config = release_config(args.llm_layers, args.vit_layers)
    shapes = parameter_shapes(config)
    path = args.src
    os.makedirs(path, exist_ok=True)
    cfg = config.to_dict()
    vision = cfg.pop("vision_config")
    for k in ("plora_rank", "plora_scale", "task_lora_ranks", "projector_hidden_size", "merged_task_lora"):
        cfg.pop(k)
    cfg.update(architectures=["InternLMXComposer2ForCausalLM"], model_type="internlmxcomposer2",
               torch_dtype="bfloat16")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(path, "vision_config.json"), "w") as f:
        json.dump(vision, f, indent=2)
    shutil.copyfile(TOKENIZER_FILE, os.path.join(path, "tokenizer.model"))
    # Three shards of about equal size, in the table's order (the hub's are split by size as well).
    names = list(shapes)
    sizes = {n: int(np.prod(shapes[n])) * 2 for n in names}
    total = sum(sizes.values())
    fnames = [f"pytorch_model-{i + 1:05d}-of-00003.bin" for i in range(3)]
    groups, acc = [[], [], []], 0
    for n in names:
        groups[min(2, acc * 3 // total)].append(n)
        acc += sizes[n]
    weight_map = {}
    for names_i, fname in zip(groups, fnames):
        sd = {}
        for n in names_i:
            kind, scale = _scale_and_fill(n, shapes[n])
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + zlib.crc32(n.encode()))
            t = torch.randn(shapes[n], generator=g) * scale
            if kind == "one_plus":
                t += 1.0
            sd[n] = t.to(torch.bfloat16)
            del t
            weight_map[n] = fname
        torch.save(sd, os.path.join(path, fname + ".tmp"))
        os.replace(os.path.join(path, fname + ".tmp"), os.path.join(path, fname))
        del sd
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    params = sum(int(np.prod(s)) for s in shapes.values())
    _reply({"seconds": time.perf_counter() - t0, "peak_gib": peak_gib(), "params": params, "bytes": total})


# --------------------------------------------------------------------------------------------- measure
def read_bandwidth_gbs():
    """Best read bandwidth of this machine, GB/s, over 1 GiB of float32: a BLAS GEMV (all threads), a
    numpy sum on one thread, and numpy sums over equal parts in one thread per core (numpy releases the
    GIL), best of 5 each. The decode roofline is taken against the best of them."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones((2 ** 14, 2 ** 14), np.float32)
    x = np.ones(2 ** 14, np.float32)
    parts = np.array_split(a, os.cpu_count() or 1)
    best = {"gemv": 0.0, "sum_1thread": 0.0, "sum_threads": 0.0}
    with ThreadPoolExecutor(len(parts)) as pool:
        for _ in range(5):
            for kind, fn in (("gemv", lambda: a @ x), ("sum_1thread", a.sum),
                             ("sum_threads", lambda: list(pool.map(np.sum, parts)))):
                t = time.perf_counter()
                fn()
                best[kind] = max(best[kind], a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def decode_read_bytes(config, itemsize=2):
    """Bytes one decode step reads: decoder linears (no image LoRA), norms, final norm, output head, one
    embedding row."""
    c = config
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    per_layer = (qkv * c.hidden_size + c.hidden_size * c.hidden_size + 3 * c.intermediate_size * c.hidden_size
                 + 2 * c.hidden_size)
    return itemsize * (c.num_hidden_layers * per_layer + c.hidden_size + c.vocab_size * c.hidden_size + c.hidden_size)


class _TokenClock:
    """A streamer that notes when each new token arrives."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _decoder_flops(config, n, cache_len):
    from prefill_profile import decoder_flops

    return sum(decoder_flops(config, n, cache_len).values()) * config.num_hidden_layers


def _ours(args, compute_dtype):
    import mindspore as ms

    from mindxcomposer import InternLMXComposer2ForCausalLM
    from mindxcomposer.ops import cpu_kernels, kernels_enabled
    from mindxcomposer.session import ModelSession

    ms.set_context(mode=ms.GRAPH_MODE)
    out = {"threads": int(ms.get_context("runtime_num_threads")), "compute_dtype": compute_dtype or "fp32"}
    t = time.perf_counter()
    model = InternLMXComposer2ForCausalLM.from_pretrained(args.dst, compute_dtype=compute_dtype)
    out.update(load_s=time.perf_counter() - t, rss_after_load_gib=rss_gib(), storage=str(model.dtype),
               products=model.products, kernels=kernels_enabled(), isa=cpu_kernels.isa())
    # `chat` as a user calls it: a small image (one tile at hd_num=1), 8 new tokens, greedy.
    t = time.perf_counter()
    response, _ = model.chat(model.tokenizer, QUERY, image=[SMALL_IMAGE], hd_num=1, max_new_tokens=8,
                             do_sample=False, num_beams=1)
    out.update(chat_s=time.perf_counter() - t, chat_chars=len(response), peak_chat_gib=peak_gib())
    if args.big_image:
        t = time.perf_counter()
        emb = model.encode_img(args.big_image, hd_num=24).asnumpy()[0]
        out.update(vit4k_s=time.perf_counter() - t, vit4k_tokens=int(emb.shape[0]))
        np.save(os.path.join(args.workdir, f"emb4k_ours{'_' + compute_dtype if compute_dtype else ''}.npy"), emb)
    out["peak_chat_4k_gib"] = peak_gib()  # the bound: base chat + the 4K image's embeddings in one process
    t = time.perf_counter()  # again: the graphs are compiled now
    model.chat(model.tokenizer, QUERY, image=[SMALL_IMAGE], hd_num=1, max_new_tokens=8, do_sample=False, num_beams=1)
    out["chat_warm_s"] = time.perf_counter() - t
    # The same kind of prompt through generate: prefill and decode timed apart.
    clock = _TokenClock()
    t = time.perf_counter()
    inputs, im_mask, _ = model.interleav_wrap_chat(QUERY, [SMALL_IMAGE], hd_num=args.hd_num_small)
    n = int(inputs["inputs_embeds"].shape[1])
    out["small_image_tokens"] = n
    np.savez(os.path.join(args.workdir, "prompt.npz"), inputs_embeds=inputs["inputs_embeds"], im_mask=im_mask)
    t_prompt = time.perf_counter() - t
    t = time.perf_counter()
    ids = model.generate(inputs_embeds=inputs["inputs_embeds"], im_mask=im_mask, streamer=clock,
                         max_new_tokens=args.new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                         eos_token_id=None)  # no early stop: every run decodes new_tokens
    total = time.perf_counter() - t
    steps = np.diff(clock.times[1:])  # times[0]: the prompt put; [1]: first token, after the prefill
    prefill_s = clock.times[1] - t
    cache_len = model.last_session.cache_len
    out.update(prompt_s=t_prompt, prefill_s=prefill_s, prefill_tokens_per_s=n / prefill_s,
               prefill_gflops=_decoder_flops(model.config, n, cache_len) / prefill_s / 1e9,
               decode_ms=float(np.median(steps[1:]) * 1e3), generate_s=total, new_ids=ids[0, 1:].tolist(),
               compile_count=model.last_session.compile_count, peak_after_chat_gib=peak_gib())
    if compute_dtype is None:
        out["bandwidth"] = read_bandwidth_gbs()
        out["bandwidth_gbs"] = max(out["bandwidth"].values())
    # A text-only prompt (no image rows): the prefill alone, after the rest.
    text = _text_prompt(model, args)
    session = ModelSession(model, 1, text["inputs_embeds"].shape[1] + 8)
    t = time.perf_counter()
    session.prefill(text["inputs_embeds"], text["im_mask"])
    text_s = time.perf_counter() - t
    m = int(text["inputs_embeds"].shape[1])
    out.update(text_tokens=m, text_prefill_s=text_s, text_prefill_tokens_per_s=m / text_s,
               text_prefill_gflops=_decoder_flops(model.config, m, session.cache_len) / text_s / 1e9)
    out["peak_gib"] = peak_gib()
    _reply(out)


def _text_prompt(model, args):
    """A text-only prompt of `--text-tokens` ids (seeded), as embeddings, saved for the upstream side."""
    path = os.path.join(args.workdir, "text_prompt.npz")
    if not os.path.isfile(path):
        rng = np.random.default_rng(args.seed)
        ids = rng.integers(100, model.config.vocab_size - 100, size=(1, args.text_tokens))
        np.savez(path, inputs_embeds=model.embed_tokens(ids).astype(np.float32),
                 im_mask=np.zeros((1, args.text_tokens), bool))
    with np.load(path) as z:
        return {"inputs_embeds": z["inputs_embeds"], "im_mask": z["im_mask"]}


def stage_ours(args):
    _ours(args, None)


def stage_ours_bf16(args):
    _ours(args, "bf16")


def stage_rates(args):
    from prefill_profile import kernel_rates, reference_rates

    _reply({"kernel_gflops": kernel_rates(), "reference_gflops": reference_rates()})


def stage_ours_vit(args):
    """The 4K image alone, as the upstream ViT stage runs it: only the vision weights are loaded (the
    decoder's Parameters stay lazy and take no memory)."""
    import mindspore as ms

    from mindxcomposer import InternLMXComposer2Config, InternLMXComposer2ForCausalLM
    from mindxcomposer.modeling_xcomposer2 import to_storage
    from mindxcomposer.weights import Checkpoint, sizes_from_weights

    ms.set_context(mode=ms.GRAPH_MODE)
    config = InternLMXComposer2Config.from_pretrained(args.dst)
    ckpt = Checkpoint(args.dst)
    for k, v in sizes_from_weights(ckpt).items():
        setattr(config, k, v)
    model = InternLMXComposer2ForCausalLM(config, ms.bfloat16)
    params = {p.name: p for p in model.get_parameters()}
    for n in ckpt.keys():
        if n.startswith(("vit.", "vision_proj.", "plora_glb_GN", "plora_sub_GN")):
            params[n].set_data(to_storage(ckpt.raw(n), model.dtype, ckpt.dtype(n)))
    rss_loaded = rss_gib()
    t = time.perf_counter()
    emb = model.encode_img(args.big_image, hd_num=24).asnumpy()[0]
    seconds = time.perf_counter() - t
    np.save(os.path.join(args.workdir, "emb4k_ours_vit_only.npy"), emb)
    _reply({"seconds": seconds, "tokens": int(emb.shape[0]), "rss_loaded_gib": rss_loaded, "peak_gib": peak_gib(),
            "threads": int(ms.get_context("runtime_num_threads"))})


def stage_ours_web(args):
    import mindspore as ms

    from mindxcomposer import InternLMXComposer2ForCausalLM

    ms.set_context(mode=ms.GRAPH_MODE)
    model = InternLMXComposer2ForCausalLM.from_pretrained(args.dst)
    t = time.perf_counter()
    html = model.write_webpage("A one-page site for a cat cafe.", [SMALL_IMAGE], max_new_tokens=args.new_tokens,
                               seed=0, output_dir=args.workdir)
    session = model.last_session
    _reply({"seconds": time.perf_counter() - t, "peak_gib": peak_gib(), "resident_tasks": model.resident_tasks,
            "chars": len(html), "rows": session.batch_size,
            "prompt_rows_prefilled": getattr(session, "prefilled_rows", None)})


def stage_convert(args):
    from mindxcomposer.convert import convert

    if os.path.exists(args.dst):
        shutil.rmtree(args.dst)
    t = time.perf_counter()
    convert(args.src, args.dst)
    _reply({"seconds": time.perf_counter() - t, "peak_gib": peak_gib()})


STAGES = {"write": stage_write, "convert": stage_convert, "rates": stage_rates, "ours": stage_ours,
          "ours_bf16": stage_ours_bf16, "ours_vit": stage_ours_vit, "ours_web": stage_ours_web}


# ----------------------------------------------------------------------------------------- orchestrator
def run_stage(python, argv, label):
    t = time.perf_counter()
    proc = subprocess.Popen([python] + argv, stdout=subprocess.PIPE, text=True)
    reply = None
    for line in proc.stdout:
        if line.startswith(MARK):
            reply = json.loads(line[len(MARK):])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    res = {"wall_s": wall, "maxrss_gib": usage.ru_maxrss / 2 ** 20, "rc": proc.returncode}
    if reply is not None:
        res.update(reply)
    print(f"[{label}] {json.dumps(res)[:400]}", flush=True)
    return res


def make_4k_image(path):
    from PIL import Image

    src = Image.open(os.path.join(REPO, "tests", "assets", "astronaut.png")).convert("RGB")
    src.resize((3840, 2160), Image.BICUBIC).save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="where the checkpoint, its conversion and outputs go")
    ap.add_argument("--checkpoint", help="an existing hub-layout checkpoint (default: write one in WORKDIR/src)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--hd-num-small", type=int, default=24)
    ap.add_argument("--text-tokens", type=int, default=1024, help="length of the text-only prompt")
    ap.add_argument("--stages", default="write,convert,rates,ours,ours_bf16,ours_vit,ours_web,upstream")
    ap.add_argument("--llm-layers", type=int, default=32, help="decoder layers of the written checkpoint (32)")
    ap.add_argument("--vit-layers", type=int, default=24, help="ViT layers of the written checkpoint (24)")
    ap.add_argument("--upstream", help="upstream code folder (internlm-xcomposer2d5-ol-7b/base)")
    ap.add_argument("--upstream-python", default="/work/venv-ref/bin/python")
    ap.add_argument("--upstream-stages", default="vit,decode,text",
                    help="upstream sides to run: vit (fp32 4K embeddings), decode (bf16, image prompt), text")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args(argv)
    args.src = args.checkpoint or os.path.join(args.workdir, "src")
    args.dst = os.path.join(args.workdir, "ms")
    args.big_image = os.path.join(args.workdir, "image_3840x2160.png")
    if args.stage:
        return STAGES[args.stage](args)

    os.makedirs(args.workdir, exist_ok=True)
    if not os.path.isfile(args.big_image):
        make_4k_image(args.big_image)
    stages = args.stages.split(",")
    if args.checkpoint:
        stages = [s for s in stages if s != "write"]
    common = [os.path.abspath(__file__), "--workdir", args.workdir, "--seed", str(args.seed),
              "--new-tokens", str(args.new_tokens), "--hd-num-small", str(args.hd_num_small),
              "--text-tokens", str(args.text_tokens),
              "--llm-layers", str(args.llm_layers), "--vit-layers", str(args.vit_layers)]
    if args.checkpoint:
        common += ["--checkpoint", args.checkpoint]
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "llm_layers": args.llm_layers, "vit_layers": args.vit_layers}
    for s in stages:
        if s == "upstream":
            continue
        results[s] = run_stage(sys.executable, common + ["--stage", s], s)
    if "upstream" in stages and args.upstream:
        worker = os.path.join(REPO, "benchmarks", "upstream_release_worker.py")
        up = [worker, "--upstream", args.upstream, "--checkpoint", args.src]
        if "vit" in args.upstream_stages:
            results["upstream_vit"] = run_stage(args.upstream_python, up + [
                "--stage", "vit", "--image", args.big_image, "--hd-num", "24",
                "--out", os.path.join(args.workdir, "emb4k_upstream.npy")], "upstream_vit")
        threads = str(results.get("ours", {}).get("threads", 2))
        if "decode" in args.upstream_stages:
            results["upstream_decode"] = run_stage(args.upstream_python, up + [
                "--stage", "decode", "--dtype", "bf16", "--prompt", os.path.join(args.workdir, "prompt.npz"),
                "--new-tokens", str(args.new_tokens), "--threads", threads], "upstream_decode")
        if "text" in args.upstream_stages:
            results["upstream_text"] = run_stage(args.upstream_python, up + [
                "--stage", "decode", "--dtype", "bf16", "--prompt", os.path.join(args.workdir, "text_prompt.npz"),
                "--new-tokens", "1", "--threads", threads], "upstream_text")
        a, b = (os.path.join(args.workdir, f) for f in ("emb4k_ours.npy", "emb4k_upstream.npy"))
        if os.path.isfile(a) and os.path.isfile(b):
            ours, ref = np.load(a).astype(np.float64), np.load(b).astype(np.float64)
            results["vit4k_parity"] = {"shape_equal": ours.shape == ref.shape,
                                       "max_abs_err": float(np.abs(ours - ref).max()) if ours.shape == ref.shape else None,
                                       "tol": 1e-5 * max(1.0, float(np.abs(ref).max()))}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print_table(results)


def print_table(r):
    from mindxcomposer.configuration import InternLMXComposer2Config

    rows = [("stage", "wall s", "peak RSS GiB", "notes")]
    for key in ("write", "convert"):
        if key in r:
            rows.append((key, f"{r[key]['wall_s']:.0f}", f"{r[key]['maxrss_gib']:.2f}", ""))
    for key in ("ours", "ours_bf16"):
        o = r.get(key)
        if not o or "load_s" not in o:
            continue
        tag = f"{key} ({o['compute_dtype']})"
        rows.append((f"{tag}: load", f"{o['load_s']:.0f}", f"{o['rss_after_load_gib']:.2f} (RSS)",
                     f"products={o.get('products')}, kernels: {o.get('isa')}"))
        rows.append((f"{tag}: chat, small image", f"{o['chat_s']:.1f}", f"{o['peak_chat_gib']:.2f}",
                     f"`chat`, hd_num=1, 8 new tokens, end to end, first call; {o['chat_warm_s']:.1f} s the second"))
        rows.append((f"{tag}: prefill", f"{o['prefill_s']:.1f}", "",
                     f"{o['small_image_tokens']} tokens: {o['prefill_tokens_per_s']:.1f} tokens/s, decoder "
                     f"{o['prefill_gflops']:.0f} GFLOP/s; decode {o['decode_ms']:.0f} ms/token; "
                     f"compiles {o.get('compile_count')}"))
        rows.append((f"{tag}: text prefill", f"{o['text_prefill_s']:.1f}", "",
                     f"{o['text_tokens']} tokens: {o['text_prefill_tokens_per_s']:.1f} tokens/s, "
                     f"decoder {o['text_prefill_gflops']:.0f} GFLOP/s"))
        if "vit4k_s" in o:
            rows.append((f"{tag}: 4K image, hd_num 24", f"{o['vit4k_s']:.1f}", f"{o['peak_chat_4k_gib']:.2f}",
                         f"{o['vit4k_tokens']} tokens; same process as the chat (peak: chat + 4K image)"))
    if "ours_vit" in r and "seconds" in r["ours_vit"]:
        v = r["ours_vit"]
        rows.append(("ours_vit (fp32): 4K image alone", f"{v['seconds']:.1f}", f"{v['maxrss_gib']:.2f}", ""))
    if "ours_web" in r:
        w = r["ours_web"]
        rows.append(("ours: write_webpage", f"{w.get('seconds', float('nan')):.0f}", f"{w['maxrss_gib']:.2f}",
                     f"resident {w.get('resident_tasks')}, {w.get('rows')} beams, prompt rows prefilled "
                     f"{w.get('prompt_rows_prefilled')}"))
    for key in ("upstream_vit", "upstream_decode", "upstream_text"):
        if key in r:
            u = r[key]
            note = json.dumps({k: v for k, v in u.items() if k not in ("wall_s", "maxrss_gib", "ids", "new_ids",
                                                                          "step_ms")})[:160]
            rows.append((key, f"{u['wall_s']:.0f}", f"{u['maxrss_gib']:.2f}", note))
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")

    rates = r.get("rates", {})
    if "kernel_gflops" in rates:
        ref = rates["reference_gflops"]
        print("\nGEMM [512 x 4096] x [4096 x 14336], GFLOP/s: "
              + ", ".join(f"ours {m} {v:.0f}" for m, v in rates["kernel_gflops"].items()) + ", "
              + ", ".join(f"{k} {v:.0f}" for k, v in ref.items()))
        best_fp32 = max(v for k, v in ref.items() if k.endswith("fp32"))
        ours = r.get("ours", {})
        if "prefill_gflops" in ours:
            print(f"exact prefill's decoder products: {ours['prefill_gflops']:.0f} GFLOP/s = "
                  f"{100 * ours['prefill_gflops'] / best_fp32:.0f}% of the best reference fp32 GEMM ({best_fp32:.0f})")
    up, upt = r.get("upstream_decode", {}), r.get("upstream_text", {})
    for key in ("ours", "ours_bf16"):
        o = r.get(key, {})
        if up.get("prefill_s") and "prefill_s" in o:
            print(f"{key}: image prompt prefill {o['prefill_s']:.1f} s vs upstream bf16 {up['prefill_s']:.1f} s: "
                  f"{up['prefill_s'] / o['prefill_s']:.2f}x")
        if upt.get("prefill_s") and "text_prefill_s" in o:
            print(f"{key}: text prompt prefill {o['text_prefill_s']:.1f} s vs upstream bf16 {upt['prefill_s']:.1f} s: "
                  f"{upt['prefill_s'] / o['text_prefill_s']:.2f}x")
    ours = r.get("ours", {})
    if "bandwidth_gbs" in ours:
        cfg = InternLMXComposer2Config(num_hidden_layers=r["llm_layers"])
        roof = decode_read_bytes(cfg) / (ours["bandwidth_gbs"] * 1e9) * 1e3
        dec = ours["decode_ms"]
        print(f"\ndecode: {dec:.0f} ms/token; bf16 read roofline {roof:.0f} ms/token "
              f"({decode_read_bytes(cfg) / 1e9:.2f} GB per step at "
              f"{ours['bandwidth_gbs']:.1f} GB/s): {100 * roof / dec:.0f}% of roofline")
        if up.get("decode_ms"):
            print(f"upstream bf16 decode: {up['decode_ms']:.0f} ms/token -> ours is {up['decode_ms'] / dec:.2f}x")
    if "vit4k_parity" in r:
        p = r["vit4k_parity"]
        print(f"4K image embeddings vs upstream fp32: max abs err {p['max_abs_err']} (tolerance {p['tol']:.3g})")


if __name__ == "__main__":
    main()
