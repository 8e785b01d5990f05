"""Checkpoints (`output_dir/checkpoint-<step>/`, as transformers names them) and the run's final outputs.

A checkpoint holds what resuming needs: the trained tensors (an adapter in peft's layout, or
`trainable.safetensors` with the fully fine-tuned weights by upstream name), `optimizer.safetensors`
(torch AdamW's per-parameter step, exp_avg, exp_avg_sq) and `trainer_state.json` (transformers' file,
plus a `mxc` entry with the data position). Each checkpoint directory is written under a temporary
name and renamed when complete, so an interrupted run leaves its last complete checkpoint.
"""
import json
import os
import re
import shutil
from typing import Dict, Mapping, Optional

import numpy as np

from ..atomic import atomic_dir, write_json
from ..weights import LazyArrays, SafetensorsFile, array_spec, write_safetensors
from .lora import LoraSettings, load_adapter, write_adapter

PREFIX = "checkpoint-"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


def checkpoint_dirs(output_dir: str):
    """(step, path) of the complete checkpoints in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(rf"{PREFIX}(\d+)", name)
        if m and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1][1] if dirs else None


def _stored(dtype) -> np.dtype:
    """What a checkpoint keeps of an array of `dtype`: int64 (AdamW's steps) as it is, everything else as fp32."""
    return np.dtype(np.int64 if dtype == np.int64 else np.float32)


def _write_arrays(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Made one array at a time as the file is written (`arrays` may be a `LazyArrays`, made once when it has
    specs)."""
    def make(k):
        v = np.asarray(arrays[k])
        return v.astype(_stored(v.dtype), copy=False)

    def spec(k):
        shape, dtype = array_spec(arrays, k)
        return shape, _stored(dtype)
    write_safetensors(path, LazyArrays(arrays, make, spec), metadata={"format": "mxc"})


def _read_arrays(path: str) -> LazyArrays:
    """The file's arrays, each read when it is asked for (an optimizer state is 2.25 GB at the release's size),
    with their shapes and dtypes from the header."""
    sf = SafetensorsFile(path)

    def dtype(k):
        return np.dtype(np.int64 if sf.dtype(k) == "I64" else np.float32)
    return LazyArrays(sf.keys(), lambda k: sf.get(k, dtype(k)), lambda k: (sf.shape(k), dtype(k)))


def save_checkpoint(output_dir: str, step: int, trained: Mapping[str, np.ndarray], lora: Optional[LoraSettings],
                    optimizer_state: Mapping[str, np.ndarray], state: dict, base_model: str,
                    save_total_limit: Optional[int]) -> str:
    """`trained` and `optimizer_state` may be `LazyArrays`: each array is made when it is written, one at a time."""
    path = os.path.join(output_dir, f"{PREFIX}{step}")
    with atomic_dir(path) as tmp:
        if lora is not None:
            write_adapter(tmp, trained, lora, base_model)
        else:
            _write_arrays(os.path.join(tmp, TRAINABLE_FILE), trained)
        _write_arrays(os.path.join(tmp, OPTIMIZER_FILE), optimizer_state)
        write_json(os.path.join(tmp, STATE_FILE), state)
    if save_total_limit is not None and save_total_limit > 0:
        for _, old in checkpoint_dirs(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str, lora: Optional[LoraSettings], config):
    """-> (trained tensors, optimizer state, trainer state); the tensors and the state are read when asked for."""
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise ValueError(f"{path} is not a checkpoint (no {STATE_FILE})")
    with open(state_file, encoding="utf-8") as f:
        state = json.load(f)
    if "mxc" not in state:
        raise ValueError(f"{path}: {STATE_FILE} was not written by mxc-finetune (no 'mxc' entry): cannot resume")
    if lora is not None:
        saved, trained = load_adapter(path, config)
        if (saved.r, saved.targets) != (lora.r, lora.targets):
            raise ValueError(f"{path}: adapter r={saved.r} targets {saved.target_modules} differ from this run's "
                             f"r={lora.r} {lora.target_modules}")
    else:
        f = os.path.join(path, TRAINABLE_FILE)
        if not os.path.isfile(f):
            raise ValueError(f"{path}: no {TRAINABLE_FILE}: a LoRA checkpoint cannot resume a full fine-tune")
        trained = _read_arrays(f)
    return trained, _read_arrays(os.path.join(path, OPTIMIZER_FILE)), state
