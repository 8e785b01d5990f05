"""Decode benchmark: ViT + merge, prefill, decode tokens/s, compile cost and peak RSS of the MindSpore port
in GRAPH_MODE and in PyNative, and of the upstream PyTorch code on the same config and weights.

    python benchmarks/decode_benchmark.py [--json out.json] [--upstream /work/upstream/base]

A benchmark, not a test: it prints a table and writes JSON; see benchmarks/README.md for every option.

The model is a mid-size IXC2.5 (default: LLM hidden 1024, 8 layers, 16 heads, 4 kv heads, intermediate
2816, PLoRA rank 256, vocab 92544; CLIP ViT at width 1024, 4 layers, 16 heads) with the seeded random
weights of `mindxcomposer.demo.random_weights`, which the upstream side builds too
(`tools/reference/upstream.py`), so both run the same numbers. The prompt is one 2x2-tile image (a
real photo through `IXCImageProcessor`) inside the chat template: ~2.1k tokens.

Every backend runs in its own processes: one for the vision phase, one for the language model (LM);
the LM processes stay alive and decode in turns (round robin), so that each backend meets the same
machine load, and the box's memory-read bandwidth is probed between turns. Upstream needs torchvision,
which the main environment lacks: it runs under `--upstream-python` (default /work/venv-ref/bin/python).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from mindxcomposer.demo import TINY_CONFIG  # noqa: E402  (numpy only: no MindSpore in the orchestrator)

MID_CONFIG = dict(
    TINY_CONFIG, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=4, max_position_embeddings=24576, max_length=16384, plora_rank=256, task_lora_ranks={},
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16),
)
QUERY = "<ImageHere>Describe this image in detail: every object you can see, its colour and where it is."
MARK = "@@bench "  # worker replies are the stdout lines carrying this prefix; libraries print freely


# ---------------------------------------------------------------------------------------------- workers
def _reply(obj):
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _best_pair(fn):
    """(first call seconds, second call seconds, second result): the first call includes compilation."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = fn()
    return first, time.perf_counter() - t, out


class OursBackend:
    def __init__(self, cfg, seed, mode, threads):
        import mindspore as ms
        from mindspore import Tensor
        from mindxcomposer.configuration import InternLMXComposer2Config
        from mindxcomposer.demo import random_weights
        from mindxcomposer.modeling_xcomposer2 import InternLMXComposer2ForCausalLM

        # The benchmark owns this process: PyNative needs synchronous launch to be fast on CPU.
        ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE, pynative_synchronize=True)
        if threads:
            ms.set_context(runtime_num_threads=threads)
        self.ms, self.mode = ms, mode
        self.threads = int(ms.get_context("runtime_num_threads"))
        self.versions = dict(mindspore=ms.__version__)
        config = InternLMXComposer2Config.from_dict(cfg)
        weights = random_weights(config, seed)
        self.model = InternLMXComposer2ForCausalLM(config)
        for p in self.model.get_parameters():
            p.set_data(Tensor(weights[p.name]))
        del weights

    def vision(self, pixel_values):
        first, warm, emb = _best_pair(lambda: self.model.img2emb(pixel_values)[0].asnumpy())
        return first, warm, emb

    def embed(self, ids):
        return self.model.embed_tokens(np.asarray(ids, np.int64)[None])

    def start(self, embeds, im_mask, max_len):
        from mindxcomposer.session import ModelSession

        self.session = ModelSession(self.model, 1, max_len, compiled=self.mode == "graph")
        if self.mode == "graph":  # a second prefill on the same session reuses the compiled graph
            first, warm, logits = _best_pair(lambda: self.session.prefill(embeds, im_mask))
        else:
            t = time.perf_counter()
            logits = self.session.prefill(embeds, im_mask)
            first = warm = time.perf_counter() - t
        return first, warm, logits[0]

    def step(self, token):
        return self.session.step(np.array([token]))[0]

    def compile_count(self):
        return self.session.compile_count


class UpstreamBackend:
    def __init__(self, cfg, seed, upstream_dir, threads):
        import torch

        sys.path.insert(0, os.path.join(REPO, "tools", "reference"))
        import upstream as up_ref
        from mindxcomposer.configuration import InternLMXComposer2Config

        import transformers

        torch.set_num_threads(threads)
        self.torch, self.threads = torch, threads
        self.versions = dict(torch=torch.__version__, transformers=transformers.__version__)
        self.model = up_ref.load_upstream(upstream_dir, InternLMXComposer2Config.from_dict(cfg), seed)

    def vision(self, pixel_values):
        torch = self.torch
        with torch.no_grad():
            pv = torch.from_numpy(pixel_values)
            first, warm, emb = _best_pair(lambda: self.model.img2emb(pv)[0].numpy())
        return first, warm, emb

    def embed(self, ids):
        with self.torch.no_grad():
            return self.model.model.tok_embeddings(self.torch.tensor([ids])).numpy()

    def start(self, embeds, im_mask, max_len):
        """As transformers' generate does for the first step (upstream `chat`): full prompt, all logits."""
        torch = self.torch
        n = embeds.shape[1]
        self.im_mask = torch.from_numpy(im_mask)
        self.length = n
        t = time.perf_counter()
        with torch.no_grad():
            out = self.model(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.ones(1, n, dtype=torch.long),
                             position_ids=torch.arange(n)[None], use_cache=True, im_mask=self.im_mask,
                             infer_mode="base")
        first = time.perf_counter() - t
        self.past = out.past_key_values
        return first, first, out.logits[0, -1].numpy()

    def step(self, token):
        """A later generate step: one id, the cache, the prompt's im_mask (token ids never take PLoRA)."""
        torch = self.torch
        self.length += 1
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([[token]]),
                             attention_mask=torch.ones(1, self.length, dtype=torch.long),
                             position_ids=torch.tensor([[self.length - 1]]), past_key_values=self.past,
                             use_cache=True, im_mask=self.im_mask, infer_mode="base")
        self.past = out.past_key_values
        return out.logits[0, -1].numpy()

    def compile_count(self):
        return 0


def worker_main(args):
    if args.cpus:
        os.sched_setaffinity(0, _cpu_list(args.cpus))  # before any thread pool starts
    req = json.loads(sys.stdin.readline())
    cfg, seed = req["config"], req["seed"]
    t = time.perf_counter()
    if args.worker == "upstream":
        be = UpstreamBackend(cfg, seed, req["upstream"], req["threads"])
    else:
        be = OursBackend(cfg, seed, args.worker, req["threads"])
    _reply(dict(build_s=time.perf_counter() - t, threads=be.threads, versions=be.versions, peak_rss_mb=_peak_rss_mb()))
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "vision":
            first, warm, emb = be.vision(np.load(req["pixels"]))
            np.save(req["out"], emb)
            _reply(dict(first_s=first, warm_s=warm, tokens=int(emb.shape[1]), peak_rss_mb=_peak_rss_mb()))
        elif op == "prefill":
            img = np.load(req["image_embeds"])
            parts = [be.embed(req["ids_before"]), img, be.embed(req["ids_after"])]
            embeds = np.concatenate(parts, 1).astype(np.float32)
            im_mask = np.zeros(embeds.shape[:2], bool)
            im_mask[0, parts[0].shape[1]:parts[0].shape[1] + img.shape[1]] = True
            first, warm, logits = be.start(embeds, im_mask, req["max_len"])
            be.next_token = int(logits.argmax())
            _reply(dict(first_s=first, warm_s=warm, prompt_tokens=int(embeds.shape[1]), peak_rss_mb=_peak_rss_mb()))
        elif op == "decode":
            times, tokens = [], []
            for _ in range(req["tokens"]):
                tokens.append(be.next_token)
                t = time.perf_counter()
                logits = be.step(be.next_token)
                times.append(time.perf_counter() - t)
                be.next_token = int(logits.argmax())
            _reply(dict(step_s=times, tokens=tokens, compile_count=be.compile_count(), peak_rss_mb=_peak_rss_mb()))
        elif op == "exit":
            _reply(dict(peak_rss_mb=_peak_rss_mb()))
            return


# ------------------------------------------------------------------------------------------ orchestrator
def _cpu_list(text):
    return {int(c) for c in text.split(",")}


class Worker:
    def __init__(self, kind, python, init, cpus=None):
        cmd = [python, os.path.abspath(__file__), "--worker", kind] + (["--cpus", cpus] if cpus else [])
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.kind = kind
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self.ask(init)

    def ask(self, req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"the {self.kind} worker exited (code {self.proc.wait()}); see its stderr above")

    def close(self):
        out = self.ask(dict(op="exit"))
        self.proc.wait()
        return out


def read_bandwidth(gib=1.0, repeats=5):
    """Best-of-N memory-read bandwidth (GB/s) over a `gib` GiB float32 array: numpy sum on one thread, the
    same split over every core, and a BLAS GEMV (a decode step's access pattern)."""
    a = np.ones(int(gib * 2 ** 30) // 4, np.float32)
    cores = len(os.sched_getaffinity(0))
    parts = np.array_split(a, cores)
    mat, vec = a.reshape(-1, 1024), np.ones(1024, np.float32)
    probes = {"numpy_sum_1thread": lambda: a.sum(), f"numpy_sum_{cores}threads": None, "blas_gemv": lambda: mat @ vec}
    out = {}
    with ThreadPoolExecutor(cores) as pool:
        probes[f"numpy_sum_{cores}threads"] = lambda: list(pool.map(np.sum, parts))
        for name, fn in probes.items():
            best = min(_timed(fn) for _ in range(repeats))
            out[name] = a.nbytes / best / 1e9
    return out


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_bytes(cfg):
    """Bytes one decode step must read (fp32): the decoder's linears without their PLoRA branches (generated
    tokens never take it), the norms, the output head and one embedding row; and the upstream step's
    extra PLoRA factors, which it reads for its `x[:1] * 0` LoRA term."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, kv, r = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["plora_rank"]
    d = h // nh
    qkv = (nh + 2 * kv) * d
    shapes = [(qkv, h), (h, nh * d), (i, h), (i, h), (h, i)]
    layer = sum(o * k for o, k in shapes) + 2 * h
    lora = sum(r * (o + k) for o, k in shapes)
    n = cfg["num_hidden_layers"]
    return dict(weights=4 * (n * layer + h + v * h + h), upstream_lora=4 * n * lora)


def machine_facts():
    facts = dict(platform=platform.platform(), python=platform.python_version(), cores=os.cpu_count())
    try:
        with open("/proc/cpuinfo") as f:
            facts["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        with open("/proc/meminfo") as f:
            facts["mem_total_gb"] = int(f.readline().split()[1]) / 2 ** 20
    except (OSError, StopIteration):
        pass
    facts["numpy"] = np.__version__  # the workers report MindSpore's and torch's
    return facts


def prompt_ids():
    from mindxcomposer.prompt import chat_prompt, split_prompt
    from mindxcomposer.tokenization_internlm2 import InternLM2Tokenizer
    from mindxcomposer.demo import TOKENIZER_FILE

    tok = InternLM2Tokenizer(TOKENIZER_FILE)
    before, after = split_prompt(chat_prompt(QUERY), 1)
    return tok.encode(before, add_special_tokens=True), tok.encode(after, add_special_tokens=False)


def pixel_values(image):
    from mindxcomposer.image_processing import IXCImageProcessor, load_image

    return IXCImageProcessor()(load_image(image)), f"{os.path.relpath(image, REPO)} through IXCImageProcessor"


def run(args):
    if args.cpus:  # the bandwidth probes run here: same cores as the workers
        os.sched_setaffinity(0, _cpu_list(args.cpus))
    cfg = json.loads(json.dumps(MID_CONFIG))
    cfg.update(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.intermediate,
               plora_rank=args.plora_rank)
    cfg["vision_config"]["num_hidden_layers"] = args.vit_layers
    with tempfile.TemporaryDirectory(prefix="mxc_bench_") as tmp:  # pixels and image embeddings
        return _run(args, cfg, tmp)


def _run(args, cfg, tmp):
    pixels, pixel_source = pixel_values(args.image)
    np.save(os.path.join(tmp, "pixels.npy"), pixels)
    ids_before, ids_after = prompt_ids()
    backends = [m for m in args.modes.split(",") if m]
    upstream_python = args.upstream_python or (
        "/work/venv-ref/bin/python" if os.path.exists("/work/venv-ref/bin/python") else sys.executable)
    if args.upstream:
        probe = subprocess.run([upstream_python, "-c", "import torch, torchvision, transformers"], capture_output=True)
        if probe.returncode == 0:
            backends.append("upstream")
        else:
            print(f"upstream skipped: torch/torchvision/transformers not importable by {upstream_python}")
    report = dict(command=" ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]), config=cfg,
                  seed=args.seed, cpus=args.cpus, pixels=dict(shape=list(pixels.shape), source=pixel_source),
                  machine=machine_facts(), load_before=os.getloadavg(), bandwidth_probes=[], backends={})
    ours_threads = None

    def init(kind):
        threads = args.threads if kind != "upstream" else (
            args.upstream_threads or args.threads or ours_threads or os.cpu_count())
        return dict(config=cfg, seed=args.seed, upstream=args.upstream, threads=threads)

    def spawn(kind):
        python = upstream_python if kind == "upstream" else sys.executable
        return Worker(kind, python, init(kind), args.cpus)

    # Vision: one short-lived process per backend, so that its peak memory is its own.
    for kind in backends:
        w = spawn(kind)
        ours_threads = ours_threads or (w.info["threads"] if kind != "upstream" else None)
        out = w.ask(dict(op="vision", pixels=os.path.join(tmp, "pixels.npy"), out=os.path.join(tmp, f"img_{kind}.npy")))
        out["peak_rss_mb"] = w.close()["peak_rss_mb"]
        report["backends"][kind] = dict(vision=out, threads=w.info["threads"], versions=w.info["versions"])
        print(f"[{kind}] vision+merge+projector: first {out['first_s']:.2f} s, warm {out['warm_s']:.2f} s, "
              f"{out['tokens']} image tokens, peak RSS {out['peak_rss_mb']:.0f} MB", flush=True)

    # LM: persistent processes, prefill one after the other, then decode in turns.
    prompt_len = len(ids_before) + report["backends"][backends[0]]["vision"]["tokens"] + len(ids_after)
    max_len = prompt_len + args.rounds * args.new_tokens + 1
    workers = {}
    for kind in backends:
        w = workers[kind] = spawn(kind)
        out = w.ask(dict(op="prefill", image_embeds=os.path.join(tmp, f"img_{kind}.npy"), ids_before=ids_before,
                         ids_after=ids_after, max_len=max_len))
        report["backends"][kind].update(build_s=w.info["build_s"], prefill=out)
        print(f"[{kind}] prefill of {out['prompt_tokens']} tokens: first {out['first_s']:.2f} s, "
              f"warm {out['warm_s']:.2f} s", flush=True)
    steps = {k: [] for k in backends}
    tokens = {k: [] for k in backends}
    for r in range(args.rounds):
        report["bandwidth_probes"].append(read_bandwidth(args.probe_gib))
        for kind, w in workers.items():
            out = w.ask(dict(op="decode", tokens=args.new_tokens))
            steps[kind].append(out["step_s"])
            tokens[kind] += out["tokens"]
            report["backends"][kind]["compile_count"] = out["compile_count"]
            ms_tok = 1e3 * float(np.median(out["step_s"][1:] if r == 0 else out["step_s"]))
            print(f"[{kind}] decode round {r + 1}: {ms_tok:.1f} ms/token (median)", flush=True)
    for kind, w in workers.items():
        report["backends"][kind]["lm_peak_rss_mb"] = w.close()["peak_rss_mb"]
    report["bandwidth_probes"].append(read_bandwidth(args.probe_gib))
    report["load_after"] = os.getloadavg()
    summarize(report, cfg, steps, tokens)
    return report


def summarize(report, cfg, steps, tokens):
    bw = max(max(p.values()) for p in report["bandwidth_probes"])
    nbytes = decode_bytes(cfg)
    roofline_s = nbytes["weights"] / (bw * 1e9)
    report["roofline"] = dict(bandwidth_gbs=bw, weight_bytes_per_token=nbytes["weights"],
                              upstream_extra_lora_bytes_per_token=nbytes["upstream_lora"],
                              ms_per_token=1e3 * roofline_s, tokens_per_s=1 / roofline_s)
    rows = []
    for kind, b in report["backends"].items():
        first_step = steps[kind][0][0]
        warm = np.concatenate([steps[kind][0][1:]] + steps[kind][1:])
        med = float(np.median(warm))
        round_medians = [float(np.median(s[1:] if i == 0 else s)) for i, s in enumerate(steps[kind])]
        b["decode"] = dict(first_step_s=first_step, median_ms=1e3 * med, best_round_median_ms=1e3 * min(round_medians),
                           round_median_ms=[1e3 * x for x in round_medians], tokens_per_s=1 / med,
                           roofline_fraction=roofline_s / med, tokens=tokens[kind])
        compile_s = None
        if kind == "graph":
            compile_s = dict(vision=b["vision"]["first_s"] - b["vision"]["warm_s"],
                             prefill=b["prefill"]["first_s"] - b["prefill"]["warm_s"], step=first_step - med)
        b["compile_s"] = compile_s
        rows.append(kind)
    if "upstream" in report["backends"]:
        up = report["backends"]["upstream"]["decode"]
        for kind in rows:
            d = report["backends"][kind]["decode"]
            d["speedup_vs_upstream"] = up["median_ms"] / d["median_ms"]
            d["same_tokens_as_upstream"] = sum(a == b for a, b in zip(d["tokens"], up["tokens"])) / len(up["tokens"])
    print_table(report, rows)


def print_table(report, rows):
    r = report["roofline"]
    print()
    print(f"machine: {report['machine'].get('cpu', '?')}, {report['machine']['cores']} cores, "
          f"load average {report['load_before'][0]:.1f} -> {report['load_after'][0]:.1f}")
    print(f"read bandwidth (best probe): {r['bandwidth_gbs']:.1f} GB/s; decode reads "
          f"{r['weight_bytes_per_token'] / 1e6:.0f} MB of weights per token -> roofline "
          f"{r['ms_per_token']:.1f} ms/token ({r['tokens_per_s']:.1f} tokens/s)")
    head = ("backend", "threads", "ViT+merge s", "prefill s", "compile s (count)", "decode ms/tok", "tok/s", "% roofline",
            "vs upstream", "peak RSS MB (vision/LM)")
    lines = [head]
    for kind in rows:
        b = report["backends"][kind]
        d = b["decode"]
        c = b["compile_s"]
        comp = "-" if c is None else f"{sum(c.values()):.1f} ({b['compile_count']} LM graphs)"
        lines.append((kind, b["threads"], f"{b['vision']['warm_s']:.2f}", f"{b['prefill']['warm_s']:.2f}", comp,
                      f"{d['median_ms']:.1f}", f"{d['tokens_per_s']:.2f}", f"{100 * d['roofline_fraction']:.0f}%",
                      f"{d['speedup_vs_upstream']:.2f}x" if "speedup_vs_upstream" in d else "-",
                      f"{b['vision']['peak_rss_mb']:.0f} / {b['lm_peak_rss_mb']:.0f}"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--upstream", help="folder of the upstream IXC2.5 code: also benchmark upstream PyTorch eager")
    p.add_argument("--upstream-python", help="interpreter with torch + torchvision + transformers 4.33 "
                                             "(default /work/venv-ref/bin/python when present)")
    p.add_argument("--modes", default="graph,pynative", help="our backends, comma-separated (graph, pynative)")
    p.add_argument("--image", default=os.path.join(REPO, "tests", "assets", "coffee.png"),
                   help="a photo whose IXC HD transform gives a 2x2 tile grid")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per decode round")
    p.add_argument("--rounds", type=int, default=2, help="decode rounds per backend, taken in turns")
    p.add_argument("--layers", type=int, default=MID_CONFIG["num_hidden_layers"])
    p.add_argument("--hidden", type=int, default=MID_CONFIG["hidden_size"])
    p.add_argument("--intermediate", type=int, default=MID_CONFIG["intermediate_size"])
    p.add_argument("--plora-rank", type=int, default=MID_CONFIG["plora_rank"])
    p.add_argument("--vit-layers", type=int, default=MID_CONFIG["vision_config"]["num_hidden_layers"])
    p.add_argument("--threads", type=int, help="MindSpore runtime_num_threads (default: MindSpore's); upstream "
                                                 "gets the same torch.set_num_threads")
    p.add_argument("--upstream-threads", type=int, help="torch threads for upstream, if not equal to ours")
    p.add_argument("--cpus", help="pin every process to these cores, e.g. 0 (MindSpore's oneDNN kernels use all "
                                  "cores whatever --threads says)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-gib", type=float, default=1.0, help="size of the bandwidth probe array")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)
    report = run(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
