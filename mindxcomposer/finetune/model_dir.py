"""A model directory that `from_pretrained` loads, written from a base directory plus changed weights:
the full fine-tuning result and `mxc-finetune merge`. Every file of the base directory other than its
weights (config.json, vision_config.json, tokenizer files) is copied; every base tensor is written,
the changed ones replaced, each in the base tensor's dtype; Hugging Face's sharded safetensors layout
(`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`) above `max_shard_bytes`."""
import json
import os
import shutil
from typing import Dict

import numpy as np

from ..atomic import atomic_dir
from ..weights import Checkpoint, fp32_to_bf16, iter_shards, write_safetensors

MAX_SHARD_BYTES = 5 * 1024 ** 3  # transformers' default max_shard_size
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _stored(arr: np.ndarray, code: str) -> np.ndarray:
    arr = np.asarray(arr, np.float32)
    if code == "BF16":
        return fp32_to_bf16(arr)
    return arr.astype({"F32": np.float32, "F16": np.float16}[code])


def save_model_dir(base_dir: str, out_dir: str, changed: Dict[str, np.ndarray],
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Write `out_dir` atomically: base_dir's model with `changed` (float32, by name) replacing weights."""
    ckpt = Checkpoint(base_dir)
    unknown = sorted(set(changed) - set(ckpt.keys()))
    if unknown:
        raise ValueError(f"weights not in the base model {base_dir}: {unknown[:5]}")
    names = ckpt.keys()
    sizes = {n: int(np.prod(ckpt.shape(n))) * {"BF16": 2, "F16": 2, "F32": 4}.get(ckpt.dtype(n), 4) for n in names}
    shards = iter_shards(names, sizes, max_shard_bytes)
    with atomic_dir(out_dir) as tmp:
        for f in os.listdir(base_dir):
            src = os.path.join(base_dir, f)
            if os.path.isfile(src) and not f.endswith(_WEIGHT_SUFFIXES):
                shutil.copyfile(src, os.path.join(tmp, f))
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            arrays, dtypes = {}, {}
            for n in shard:
                code = ckpt.dtype(n)
                arrays[n] = _stored(changed[n], code) if n in changed else ckpt.raw(n)
                dtypes[n] = code
                weight_map[n] = fname
            write_safetensors(os.path.join(tmp, fname), arrays, metadata={"format": "pt"}, dtypes=dtypes)
        if len(shards) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f, indent=2)
    return out_dir
