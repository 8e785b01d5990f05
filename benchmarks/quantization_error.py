"""Quantization error against the unquantized model: logits' relative error and greedy agreement.

    python benchmarks/quantization_error.py [--config tiny|mid] [--tokens 32] [--json out.json]

The model (`tiny`: the demo model; `mid`: decode_benchmark's mid-size config, hidden 1024, 8 layers) gets the
seeded random weights of `mindxcomposer.demo.random_weights`, is written in the upstream layout, and converted
with `mxc-convert --quantize int8`, `--quantize int4` (group 128) and `--quantize int4 --group-size 32`. Each is
compared with the unquantized model (fp32, the same weights) on:

- logits of the uncached forward of two prompts (random embeddings, 200 rows of which 60 image rows; and 32
  token ids) in every infer_mode: max |q - ref| / max |ref| and the RMS of q - ref over the RMS of ref;
- greedy decoding of `--tokens` new tokens from the token prompt (`generate`, base mode): how many tokens agree
  before the first difference, and the share of positions equal.

Random weights are not real weights: a trained model's weights have outlier channels and structure that make
quantization error larger or smaller than here; these figures show the scale of the error and that it is
measured, not what the release will show (use this script on a real checkpoint for that: --checkpoint DIR).
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

SCHEMES = (("int8", None), ("int4", None), ("int4", 32))


def _config(name):
    from mindxcomposer.configuration import InternLMXComposer2Config
    from mindxcomposer.demo import tiny_config

    if name == "tiny":
        return tiny_config()
    from decode_benchmark import MID_CONFIG

    return InternLMXComposer2Config.from_dict(MID_CONFIG)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=("tiny", "mid"))
    ap.add_argument("--checkpoint", help="an unquantized model directory instead of random weights")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import mindspore as ms

    from mindxcomposer import InternLMXComposer2ForCausalLM as M
    from mindxcomposer.convert import convert
    from mindxcomposer.demo import save_demo_model

    ms.set_context(mode=ms.GRAPH_MODE)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = args.checkpoint or save_demo_model(os.path.join(tmp, "src"), _config(args.config))
        ref = M.from_pretrained(src)
        rng = np.random.default_rng(0)
        emb = rng.standard_normal((1, 200, ref.config.hidden_size)).astype(np.float32)
        im = np.zeros((1, 200), bool)
        im[0, 20:80] = True
        ids = rng.integers(100, ref.config.vocab_size - 100, size=(1, 32))
        modes = [m for m in ("base", "web", "write") if m == "base" or ref.config.task_lora_ranks]
        ref_logits = {(p, m): (ref(inputs_embeds=emb, im_mask=im, infer_mode=m) if p == "image" else
                               ref(input_ids=ids, infer_mode=m)).logits.asnumpy()
                      for p in ("image", "text") for m in modes}
        ref_ids = ref.generate(input_ids=ids, max_new_tokens=args.tokens, do_sample=False, num_beams=1,
                               eos_token_id=None)[0, ids.shape[1]:].tolist()
        del ref
        for scheme, gs in SCHEMES:
            dst = os.path.join(tmp, f"{scheme}-{gs}")
            convert(src, dst, quantize=scheme, group_size=gs, progress_stream=open(os.devnull, "w"))
            q = M.from_pretrained(dst)
            for (p, m), r in ref_logits.items():
                got = (q(inputs_embeds=emb, im_mask=im, infer_mode=m) if p == "image" else
                       q(input_ids=ids, infer_mode=m)).logits.asnumpy()
                rows.append(dict(scheme=scheme, group=gs or (128 if scheme == "int4" else "channel"), prompt=p, mode=m,
                                 max_rel=float(np.abs(got - r).max() / np.abs(r).max()),
                                 rms_rel=float(np.sqrt(np.mean((got - r) ** 2)) / np.sqrt(np.mean(r ** 2))),
                                 argmax_agree=float(np.mean(got.argmax(-1) == r.argmax(-1)))))
            out = q.generate(input_ids=ids, max_new_tokens=args.tokens, do_sample=False, num_beams=1,
                             eos_token_id=None)[0, ids.shape[1]:].tolist()
            same = [a == b for a, b in zip(out, ref_ids)]
            first = same.index(False) if False in same else len(same)
            rows.append(dict(scheme=scheme, group=gs or (128 if scheme == "int4" else "channel"), prompt="greedy",
                             agree_prefix=first, agree_share=float(np.mean(same)), tokens=len(same)))
            del q
    print(f"\nquantization error vs the unquantized model ({args.checkpoint or args.config + ' config, random weights'})")
    print("| scheme | group | prompt | infer_mode | max abs err / max abs logit | RMS err / RMS logit | argmax agreement |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["prompt"] != "greedy":
            print(f"| {r['scheme']} | {r['group']} | {r['prompt']} | {r['mode']} | {r['max_rel']:.2e} | "
                  f"{r['rms_rel']:.2e} | {100 * r['argmax_agree']:.1f}% |")
    print("\n| scheme | group | greedy tokens equal before the first difference | positions equal |")
    print("|---|---|---|---|")
    for r in rows:
        if r["prompt"] == "greedy":
            print(f"| {r['scheme']} | {r['group']} | {r['agree_prefix']} of {r['tokens']} | {100 * r['agree_share']:.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
