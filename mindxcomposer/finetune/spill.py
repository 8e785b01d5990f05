"""What a fine-tuning run may keep in files instead of memory: the decoder layers' inputs (`LayerInputs`) and
AdamW's moments (`optim.AdamW`'s `state_dir`); `choose_store` decides for `auto`.

Layer inputs: where a micro-batch's decoder layer inputs wait between the forward and the backward.

The backward recomputes each decoder layer from its input (upstream's gradient checkpointing), so the forward keeps
one input per layer: positions x hidden x 4 bytes each, 32 of them at the release's depth (0.74 GB at 1,408
padded positions, 4.3 GB at 8,256). `LayerInputs` holds them in memory (`memory`), or writes each to a file as the forward
makes it and reads it back when its layer's gradient runs (`disk`), so that what stays resident no longer grows with
depth or length (DeepSpeed's activation checkpointing offers the same trade with its CPU/NVMe offload). The values
are the same bits either way: a file holds the tensor's fp32 bytes. Either way an input is dropped as soon as its
layer's gradient has used it.
"""
import os
import shutil
import tempfile
from typing import Dict, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor

STORES = ("auto", "memory", "disk")
# `auto` writes to disk what would hold more than this in memory.
AUTO_DISK_BYTES = 512 * 2 ** 20


def free_bytes(directory: str) -> int:
    """Free space of the filesystem that holds `directory` (or would: its nearest existing parent)."""
    path = os.path.abspath(directory)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def check_store(store: str, flag: str) -> None:
    """The one check of a `--<flag>` value (`--layer_inputs`, `--optimizer_state`)."""
    if store not in STORES:
        raise ValueError(f"--{flag} must be one of {', '.join(STORES)}, got {store!r}")


def choose_store(store: str, nbytes: int, flag: str = "layer_inputs", directory: Optional[str] = None) -> str:
    """`memory` or `disk` for `--<flag> store` and what would hold `nbytes` in memory; with `directory`, where the
    files would go, `auto` keeps in memory what that disk has no room for (twice the bytes: room for the rest),
    and `disk` without the room is an error, before any of it is written."""
    check_store(store, flag)
    if store == "memory" or (store == "auto" and nbytes <= AUTO_DISK_BYTES):
        return "memory"
    if directory is None:
        return "disk"
    free = free_bytes(directory)
    if store == "auto":
        return "disk" if free >= 2 * nbytes else "memory"
    if free < nbytes:
        raise ValueError(f"--{flag} disk: {nbytes / 2 ** 20:.0f} MiB to write in {directory}, which has "
                         f"{free / 2 ** 20:.0f} MiB free")
    return "disk"


def spill_directory(parent: str, prefix: str) -> str:
    """A fresh hidden directory in `parent` (made if need be) for one store's files."""
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


def layer_input_bytes(layers: int, positions: int, hidden: int) -> int:
    """What a micro-batch's layer inputs hold in fp32: one per layer (`positions` padded)."""
    return layers * positions * hidden * 4


class LayerInputs:
    """Tensors by layer index: `put(i, x)`, `get(i)`, `drop(i)`; `close()` removes what is left (files included).

    `directory`: where `disk` files go (a fresh subdirectory, removed by `close`); None keeps them in memory."""

    def __init__(self, directory: Optional[str] = None):
        self._held: Dict[int, Tensor] = {}
        self._files: Dict[int, tuple] = {}
        self._dir = spill_directory(directory, ".layer-inputs-") if directory is not None else None

    @property
    def on_disk(self) -> bool:
        return self._dir is not None

    def put(self, i: int, x: Tensor) -> None:
        if self._dir is None:
            self._held[i] = x
            return
        # fp32 bytes whatever the arithmetic's dtype (numpy has no bf16); `get` gives the dtype back.
        arr = x.astype(ms.float32).asnumpy() if x.dtype != ms.float32 else x.asnumpy()
        path = os.path.join(self._dir, f"{i}.f32")
        arr.tofile(path)
        self._files[i] = (path, arr.shape, x.dtype)

    def get(self, i: int) -> Tensor:
        if self._dir is None:
            return self._held[i]
        path, shape, dtype = self._files[i]
        x = Tensor(np.fromfile(path, np.float32).reshape(shape))
        return x if dtype == ms.float32 else x.astype(dtype)

    def drop(self, i: int) -> None:
        self._held.pop(i, None)
        if i in self._files:
            os.remove(self._files.pop(i)[0])

    def close(self) -> None:
        self._held.clear()
        self._files.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
