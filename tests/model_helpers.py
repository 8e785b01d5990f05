"""Helpers several test modules share: a random prompt in embedding space, quiet conversion, and a quantized
directory's dequantized fp32 twin."""
import json
import os
import shutil

import numpy as np

from mindxcomposer import quantization as qz
from mindxcomposer.weights import Checkpoint, write_safetensors


def random_prompt(model, n, n_img, seed):
    """Embeddings [1, n, hidden] (seeded normal) and an image mask with rows 3 .. 3 + n_img marked."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((1, n, model.config.hidden_size)).astype(np.float32)
    im = np.zeros((1, n), bool)
    im[0, 3:3 + n_img] = True
    return emb, im


def quiet(**kw):
    """`convert` keyword arguments with its progress lines sent nowhere."""
    return dict(progress_stream=open(os.devnull, "w"), **kw)


def dequantized_twin(qdir, twin):
    """The model of `qdir` with every quantized weight dequantized (numpy) and everything stored in fp32."""
    os.makedirs(twin)
    with open(os.path.join(qdir, "config.json")) as f:
        cfg = json.load(f)
    bits, gs = qz.parse_config(cfg.pop("quantization_config"))
    with open(os.path.join(twin, "config.json"), "w") as f:
        json.dump(cfg, f)
    shutil.copyfile(os.path.join(qdir, "tokenizer.model"), os.path.join(twin, "tokenizer.model"))
    ckpt = Checkpoint(qdir)
    out = {}
    for name in ckpt.keys():
        if name.endswith(".qweight"):
            base = name[: -len("qweight")]
            parts = {p: ckpt.raw(base + p) for p in qz.PARTS[bits]}
            in_f = cfg["intermediate_size"] if base.endswith("w2.") else cfg["hidden_size"]
            out[base + "weight"] = qz.dequantize(parts, bits, gs, in_f)
        elif not qz.is_part_name(name):
            out[name] = ckpt.get(name, np.float32)
    write_safetensors(os.path.join(twin, "model.safetensors"), out)
    return twin
