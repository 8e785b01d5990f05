"""Serving benchmark: N concurrent OpenAI clients against one `mxc-serve` on loopback, against the same
requests sent one at a time.

    python benchmarks/serve_benchmark.py [--size small|demo | --model DIR] [--clients 4] [--requests 16]
                                         [--max-tokens 64] [--max-batch N] [--image PATH] [--json out.json]

It starts `mxc-serve` as a separate process on 127.0.0.1 (so that the clients do not share its
interpreter), sends every request once sequentially and once from `--clients` threads, each streamed
through the official `openai` client, and prints requests/s, generated tokens/s and p50/p95 of latency
and time to first token. Decoding is greedy, so both passes must produce the same answers: the script
checks it. `--size small` (default) builds a random-weight model wider than the demo one (hidden 512,
4 layers) so that the model's work, not the server's, dominates a step; `--size demo` serves the
bundled demo model. A benchmark, not a test.
"""
import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, plora_rank=64)
PROMPTS = ["Describe a walk along the river at dawn.", "Explain how a bicycle gear works.",
           "Write a short poem about winter.", "What makes a good cup of tea?", "Summarise the history of maps.",
           "Give three tips for learning to draw.", "Why is the sky blue?", "Tell a story about a lost key."]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, max_batch, port):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "mindxcomposer.serve.cli", "--port", str(port), "--max-batch", str(max_batch),
           "--max-queue", "64"]
    if model_dir:
        cmd += ["--model", model_dir, "--served-model-name", "bench"]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit("mxc-serve exited:\n" + log.read())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("mxc-serve did not start")
        time.sleep(0.5)


def _peak_rss_gib(pid):
    """The server process's peak resident memory so far (VmHWM), GiB; None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def one_request(client, model, messages, max_tokens):
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return dict(latency=end - t0, ttft=(first or end) - t0, tokens=usage.completion_tokens, text="".join(text),
                start=t0, end=end)


def run_pass(client, model, requests, max_tokens, workers):
    t0 = time.perf_counter()
    if workers == 1:
        results = [one_request(client, model, m, max_tokens) for m in requests]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda m: one_request(client, model, m, max_tokens), requests))
    wall = time.perf_counter() - t0
    lat = np.array([r["latency"] for r in results])
    ttft = np.array([r["ttft"] for r in results])
    tokens = sum(r["tokens"] for r in results)
    return dict(requests=len(results), wall_s=wall, req_per_s=len(results) / wall, gen_tok_per_s=tokens / wall,
                tokens=tokens, p50_latency_s=float(np.percentile(lat, 50)), p95_latency_s=float(np.percentile(lat, 95)),
                p50_ttft_s=float(np.percentile(ttft, 50)), p95_ttft_s=float(np.percentile(ttft, 95)),
                texts=[r["text"] for r in results])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model directory to serve (default: a random-weight model of --size)")
    p.add_argument("--size", choices=["small", "demo"], default="small")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=None, help="server rows (default: --clients)")
    p.add_argument("--image", help="attach this image to every request")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    import base64

    import openai

    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model
    if model_dir is None and args.size == "small":
        from mindxcomposer.demo import save_demo_model, tiny_config

        model_dir = save_demo_model(os.path.join(tmp.name, "small"), tiny_config(**SMALL))
    name = "bench" if model_dir else "mindxcomposer-demo"
    content_image = []
    if args.image:
        with open(args.image, "rb") as f:
            url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        content_image = [{"type": "image_url", "image_url": {"url": url}}]
    requests = [[{"role": "user", "content": content_image + [{"type": "text", "text": PROMPTS[i % len(PROMPTS)]}]}]
                for i in range(args.requests)]
    port = _free_port()
    proc = start_server(model_dir, args.max_batch or args.clients, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=3600)
        run_pass(client, name, requests[:2], 4, 1)  # warm-up: compiles the graphs
        seq = run_pass(client, name, requests, args.max_tokens, 1)
        conc = run_pass(client, name, requests, args.max_tokens, args.clients)
        server_peak_gib = _peak_rss_gib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        tmp.cleanup()
    same = seq.pop("texts") == conc.pop("texts")
    print(f"model: {args.model or args.size}, {args.requests} requests, max_tokens {args.max_tokens}, greedy, "
          f"image: {args.image or 'none'}; server --max-batch {args.max_batch or args.clients}; "
          f"{os.cpu_count()} CPUs, {platform.machine()}")
    print("| clients | wall s | requests/s | generated tokens/s | p50 latency s | p95 latency s | p50 TTFT s "
          "| p95 TTFT s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in (("1 (sequential)", seq), (f"{args.clients} (concurrent)", conc)):
        print(f"| {label} | {r['wall_s']:.1f} | {r['req_per_s']:.2f} | {r['gen_tok_per_s']:.1f} | "
              f"{r['p50_latency_s']:.2f} | {r['p95_latency_s']:.2f} | {r['p50_ttft_s']:.2f} | {r['p95_ttft_s']:.2f} |")
    if server_peak_gib is not None:
        print(f"server peak RSS (VmHWM, both passes): {server_peak_gib:.2f} GiB")
    print(f"throughput concurrent / sequential: {conc['gen_tok_per_s'] / seq['gen_tok_per_s']:.2f}x; "
          f"identical answers in both passes: {'yes' if same else 'NO'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), sequential=seq, concurrent=conc, identical=same,
                           server_peak_gib=server_peak_gib), f, indent=2)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
