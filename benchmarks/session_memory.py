"""What a decoding session of new shapes leaves in memory: RSS after sessions of growing cache length, one after
the other (each a short prefill and two steps), the previous one dropped first, as successive `chat` calls whose
prompts grow (a multi-turn conversation) use them.

    python benchmarks/session_memory.py MODEL_DIR [--sessions 5] [--bucket 256]

Prints one row per session: its cache slots, RSS after its prefill and after its steps, and seconds (its graphs
compile: a prefill graph per cache length, since the caches are the prefill graph's arguments, and a step graph).
"""
import argparse
import gc
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--sessions", type=int, default=5)
    p.add_argument("--bucket", type=int, default=256, help="cache slots added per session")
    p.add_argument("--prompt", type=int, default=40, help="prompt rows prefilled in each session")
    args = p.parse_args(argv)
    import mindspore as ms

    from memory_probe import rss_gib
    from mindxcomposer import InternLMXComposer2ForCausalLM
    from mindxcomposer.session import ModelSession

    ms.set_context(mode=ms.GRAPH_MODE)
    model = InternLMXComposer2ForCausalLM.from_pretrained(args.model)
    emb = np.random.default_rng(0).standard_normal((1, args.prompt, model.config.hidden_size)).astype(np.float32)
    emb *= 0.02
    im = np.zeros((1, args.prompt), bool)
    loaded = rss_gib()
    print(f"model: {args.model}; RSS after loading {loaded:.2f} GiB")
    print("| session | cache slots | RSS after prefill GiB | RSS after 2 steps GiB | added GiB | s |")
    print("|---|---|---|---|---|---|")
    session, last = None, loaded
    for i in range(args.sessions):
        del session
        gc.collect()
        t = time.perf_counter()
        session = ModelSession(model, 1, args.bucket * (i + 1))
        session.prefill(emb, im)
        after_prefill = rss_gib()
        session.step(np.array([[5]]))
        session.step(np.array([[6]]))
        now = rss_gib()
        print(f"| {i + 1} | {session.cache_len} | {after_prefill:.2f} | {now:.2f} | {now - last:+.2f} | "
              f"{time.perf_counter() - t:.1f} |", flush=True)
        last = now
    return 0


if __name__ == "__main__":
    sys.exit(main())
