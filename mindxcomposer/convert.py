"""`mxc-convert`: a released IXC2.5 checkpoint -> a model directory that `from_pretrained` loads.

SRC is an upstream directory (`pytorch_model*.bin` + `pytorch_model.bin.index.json`, or `model*.safetensors`
+ `model.safetensors.index.json`), or a single file of either kind with its config.json beside it. DST
receives config.json (the CLIP config folded in, the sizes read off the weights), the tokenizer files,
safetensors shards written by `mindspore.save_checkpoint` under our parameter names (`weights.to_ours`),
their index, and manifest.json (source hashes, per-tensor sha256, dtype, converter version).

Memory: source tensors are read one at a time (safetensors with plain reads, .bin through torch's mmap) and
the pages of a .bin tensor are handed back to the kernel once its output is written. MindSpore's safetensors
writer takes a whole file at once, so one output shard is held in memory; output shards never span two
source files, so that is at most min(--shard-size, one source file's tensors in the output dtype). Peak RSS
is about that plus the largest tensor in fp32 (when casting or merging) plus the MindSpore runtime.

Atomicity: everything is written into a temporary directory beside DST, renamed onto DST only once complete
(and verified, with --verify); on any error or Ctrl-C the temporary directory is removed.
"""
import argparse
import ctypes
import functools
import hashlib
import json
import mmap
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import __version__, awq
from .atomic import make_sibling_dir, missing_parents, publish, readable_as_umask, remove_partial
from .cli_support import deferred_interrupts, import_mindspore, run_command, shielded
from .configuration import InternLMXComposer2Config
from .constants import BUNDLED_TOKENIZER, LINEARS, MERGE_TASKS, TASK_LORAS
from .quantization import PART_DTYPES, QuantizationConfigError, make_config, quantize as quantize_weight
from .weights import (Checkpoint, CheckpointError, SafetensorsFile, bf16_to_fp32,
                      check_names_and_shapes, fp32_to_bf16, iter_shards, parameter_shapes, sizes_from_weights,
                      to_ours)

CONVERTER_VERSION = "1"
DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}  # --dtype -> safetensors dtype code
_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "I8": 1, "U8": 1, "I32": 4}
_SOURCE_DTYPES = ("BF16", "F16", "F32")
ARCHITECTURE = "InternLMXComposer2ForCausalLM"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
TORCH_HINT = 'pip install "mindxcomposer[convert]"'
DEFAULT_SHARD_SIZE = "5GB"
_TASK_LORA_KEY = re.compile(r".*\.(?:%s)_[AB]\.weight" % "|".join(TASK_LORAS))
_PLORA_WEIGHT = re.compile(r"model\.layers\.\d+\.(?:%s)\.weight" % "|".join(re.escape(p) for p in LINEARS))
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)
_MADV_DONTNEED = 4  # Linux


class ConvertError(CheckpointError):
    """The source cannot be converted as asked; the message names the file and the key."""


def parse_size(text) -> int:
    """'5GB' -> 5e9 bytes, '512MiB' -> 512 * 2**20; a bare number is bytes."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE.fullmatch(str(text))
        if not m:
            raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB or a number of bytes)")
        power = "kmgt".find(m.group(2).lower()) + 1 if m.group(2) else 0
        size = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


# ----------------------------------------------------------------------------------------------
# reading the source


@dataclass
class _Entry:
    key: str  # upstream name in the source file
    file: str
    shape: Tuple[int, ...]
    dtype: str  # safetensors dtype code


@dataclass
class _Layout:
    root: str  # the directory holding config.json
    format: str  # "pytorch" or "safetensors"
    files: List[str]
    index: Optional[str]  # path of the index json
    weight_map: Optional[Dict[str, str]]  # upstream key -> file name, from the index


def _locate(path: str) -> _Layout:
    if not os.path.exists(path):
        raise ConvertError(f"source {path!r} does not exist")
    path = os.path.abspath(path)
    if os.path.isfile(path):
        root = os.path.dirname(path)
        for ext, fmt in ((".safetensors", "safetensors"), (".bin", "pytorch")):
            if path.endswith(ext):
                return _Layout(root, fmt, [path], None, None)
        raise ConvertError(f"{path}: not a checkpoint file (expected .bin or .safetensors)")
    for name, fmt in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "pytorch")):
        index = os.path.join(path, name)
        if os.path.isfile(index):
            weight_map = _read_index(index)
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise ConvertError(f"{index} names shard(s) that are not in {path}: {missing}")
            return _Layout(path, fmt, [os.path.join(path, f) for f in files], index, weight_map)
    for name, fmt in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "pytorch")):
        if os.path.isfile(os.path.join(path, name)):
            return _Layout(path, fmt, [os.path.join(path, name)], None, None)
    shards = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".safetensors")))
    hint = f"; found shards without an index: {shards}" if shards else ""
    raise ConvertError(f"no checkpoint in {path}: expected pytorch_model.bin[.index.json] or "
                       f"model.safetensors[.index.json]{hint}")


def _read_index(index: str) -> Dict[str, str]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ConvertError(f"{index}: not a checkpoint index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConvertError(f"{index}: 'weight_map' must map tensor names to shard files")
    for key, f in weight_map.items():
        if not isinstance(f, str) or os.path.basename(f) != f or f in ("", ".", ".."):
            raise ConvertError(f"{index}: key {key!r} maps to {f!r}, not a shard file name in this directory")
    return weight_map


def _import_torch(path: str):
    try:
        with deferred_interrupts():  # torch's C++ start-up, like MindSpore's, must not be interrupted half-way
            import torch
    except ImportError:
        raise ConvertError(f"{path} is a PyTorch checkpoint: reading it needs torch, "
                           f"which is not installed. Install it with: {TORCH_HINT}") from None
    return torch


class _SafetensorsShard:
    """One safetensors source file; tensors are read into fresh arrays, so nothing needs releasing."""

    def __init__(self, path: str):
        try:
            self._file = SafetensorsFile(path)  # validates the header and that no tensor runs past the end
        except CheckpointError as e:
            raise ConvertError(str(e)) from None

    def entries(self) -> List[Tuple[str, Tuple[int, ...], str]]:
        return [(k, self._file.shape(k), self._file.dtype(k)) for k in self._file.keys()]

    def get(self, key: str) -> np.ndarray:
        return self._file.raw(key)

    def release(self, key: str) -> None:
        pass

    def close(self) -> None:
        pass


class _TorchShard:
    """One .bin source file, loaded with torch's mmap: a tensor's bytes are read from disk when touched."""

    def __init__(self, path: str):
        torch = _import_torch(path)
        self._torch = torch
        self._dtypes = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch's mmap needs the zip format (torch >= 1.6 writes it)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
            raise ConvertError(f"{path}: cannot be read as a PyTorch checkpoint (truncated or corrupt?): "
                               f"{type(e).__name__}: {e}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ConvertError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}")
        self._sd = sd
        # Pages may be dropped only where the file itself is mapped: anywhere else they would be lost.
        self._mapped = _mapped_ranges(path) if zipped else []

    def entries(self) -> List[Tuple[str, Tuple[int, ...], str]]:
        return [(k, tuple(t.shape), self._dtypes.get(t.dtype, str(t.dtype).replace("torch.", "")))
                for k, t in self._sd.items()]

    def get(self, key: str) -> np.ndarray:
        t = self._sd[key]
        if t.dtype == self._torch.bfloat16:
            return np.ascontiguousarray(t.view(self._torch.int16).numpy().view(np.uint16))
        return np.ascontiguousarray(t.numpy())

    def release(self, key: str) -> None:
        storage = self._sd[key].untyped_storage()
        _drop_pages(storage.data_ptr(), storage.nbytes(), self._mapped)

    def close(self) -> None:
        self._sd = None


def _mapped_ranges(path: str) -> List[Tuple[int, int]]:
    """Address ranges where this process maps `path` (Linux's /proc/self/maps; empty elsewhere)."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == real:
            lo, hi = parts[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _drop_pages(address: int, nbytes: int, mapped: List[Tuple[int, int]]) -> None:
    """Drop the whole pages of a read-only file mapping from our RSS; touched again, they are re-read from
    the file. Rounded inwards so that a neighbouring tensor's pages stay."""
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (address + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start and any(lo <= start and end <= hi for lo, hi in mapped):
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


@functools.lru_cache(maxsize=None)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


class _Source:
    """The tensors of an upstream checkpoint by our names. Offers the parts of `weights.Checkpoint` that
    `sizes_from_weights` and `check_names_and_shapes` use."""

    def __init__(self, layout: _Layout, awq_group: Optional[int] = None):
        self.layout = layout
        self.awq_group = awq_group  # an lmdeploy AWQ source: its packed int32 tensors are read too
        self._open_shard = _SafetensorsShard if layout.format == "safetensors" else _TorchShard
        self.entries: Dict[str, _Entry] = {}
        self.ignored: List[str] = []
        seen: Dict[str, str] = {}
        for path in layout.files:
            shard = self._open_shard(path)
            try:
                found = shard.entries()
            finally:
                shard.close()
            for key, shape, dtype in found:
                self._check_index(key, path)
                if key in seen:
                    raise ConvertError(f"{path}: key {key!r} also appears in {seen[key]}")
                seen[key] = path
                ours = to_ours(key)
                if ours is None:
                    self.ignored.append(key)
                    continue
                if ours in self.entries:
                    raise ConvertError(f"{path}: key {key!r} and {self.entries[ours].key!r} in "
                                       f"{self.entries[ours].file} are both parameter {ours!r}")
                if dtype not in _SOURCE_DTYPES and not (awq_group and dtype == "I32" and ours.endswith(
                        (".qweight", ".qzeros"))):
                    raise ConvertError(f"{path}: tensor {key!r} has dtype {dtype}; only bf16, fp16 and fp32 "
                                       f"tensors can be converted")
                self.entries[ours] = _Entry(key, path, tuple(shape), dtype)
        if layout.weight_map is not None:
            absent = sorted(k for k in layout.weight_map if k not in seen)
            if absent:
                where = {k: layout.weight_map[k] for k in absent[:20]}
                raise ConvertError(f"{layout.index} lists {len(absent)} key(s) that their shard does not hold "
                                   f"(truncated or wrong shard?): {where}")

    def _check_index(self, key: str, path: str) -> None:
        weight_map = self.layout.weight_map
        if weight_map is None:
            return
        listed = weight_map.get(key)
        if listed is None:
            raise ConvertError(f"{path}: key {key!r} is not listed in {self.layout.index}")
        if listed != os.path.basename(path):
            raise ConvertError(f"{path}: holds key {key!r}, which {self.layout.index} places in {listed}")

    def describe(self) -> str:
        what = os.path.basename(self.layout.index) if self.layout.index else os.path.basename(self.layout.files[0])
        return f"{self.layout.root} ({what}, {len(self.layout.files)} file(s))"

    def keys(self) -> List[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.entries[name].shape

    def open(self, path: str):
        return self._open_shard(path)


class _Readers:
    """The source shards currently open; `close_unneeded` keeps only those a later step reads."""

    def __init__(self, source: _Source):
        self._source = source
        self._open = {}

    def _shard(self, entry: _Entry):
        if entry.file not in self._open:
            self._open[entry.file] = self._source.open(entry.file)
        return self._open[entry.file]

    def get(self, name: str) -> np.ndarray:
        entry = self._source.entries[name]
        return self._shard(entry).get(entry.key)

    def release(self, name: str) -> None:
        entry = self._source.entries[name]
        self._shard(entry).release(entry.key)

    def close_unneeded(self, needed) -> None:
        for path in [p for p in self._open if p not in needed]:
            self._open.pop(path).close()

    def close(self) -> None:
        self.close_unneeded(())


# ----------------------------------------------------------------------------------------------
# what to write


def _to_fp32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 array that is never a view of `raw` (the source may be a read-only mapping)."""
    return bf16_to_fp32(raw) if dtype == "BF16" else raw.astype(np.float32, copy=True)


def _from_fp32(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return fp32_to_bf16(x)  # round to nearest even, as torch
    if dtype == "F16":
        with np.errstate(over="ignore"):  # beyond fp16's range becomes inf, as in torch; `_write` counts them
            return x.astype(np.float16)
    return x


def _cast(raw: np.ndarray, src: str, dst: str) -> np.ndarray:
    """bf16 / fp16 / fp32 conversion with a single rounding, as torch's `.to(dtype)`."""
    if src == dst:
        return raw
    return _from_fp32(_to_fp32(raw, src), dst)


@dataclass
class _Plan:
    config: InternLMXComposer2Config  # of the output
    names: List[str]  # output tensors, in source order
    dtypes: Dict[str, str]
    merges: Dict[str, List[Tuple[str, str]]]  # base weight -> [(B, A)] to fold in
    dropped: List[str]
    shards: List[List[str]]
    shard_names: List[str]
    sizes: Dict[str, int]  # output bytes
    dtype_arg: Optional[str]
    merge_task: Optional[str]
    sources: Dict[str, str]  # output tensor -> the source tensor it comes from (a quantized weight: 2-3 parts)
    quant_parts: Dict[str, str]  # output tensor -> its part ('qweight', 'scales', 'qzeros') of a quantized weight
    quantization: Optional[Tuple[int, int]]  # (bits, group_size)
    quant_cache: Optional[Tuple[str, Dict[str, np.ndarray]]] = None  # the last weight quantized, with its parts


def _load_config(root: str) -> Tuple[InternLMXComposer2Config, bool, Optional[int]]:
    """The source's config, whether it has a vision config, and the group size of an lmdeploy AWQ source (None:
    not one)."""
    cfg_file = os.path.join(root, "config.json")
    if not os.path.isfile(cfg_file):
        raise ConvertError(f"no config.json in {root}: the upstream config must sit beside the weights")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
    archs = raw.get("architectures")
    if archs is not None and (not isinstance(archs, list) or ARCHITECTURE not in archs):
        raise ConvertError(f"{cfg_file}: architectures {archs!r} is not {ARCHITECTURE}; this converter "
                           f"handles InternLM-XComposer-2.5 checkpoints only")
    has_vision = "vision_config" in raw or os.path.isfile(os.path.join(root, "vision_config.json"))
    qc = raw.get("quantization_config")
    awq_group = None
    if isinstance(qc, dict) and qc.get("quant_method") == "awq":
        try:
            awq_group = awq.check_config(qc)
        except awq.AwqLayoutError as e:
            raise ConvertError(f"{cfg_file}: {e}") from None
    try:
        config = InternLMXComposer2Config.from_pretrained(root, ignore_quantization=awq_group is not None)
    except (ValueError, TypeError, AttributeError) as e:
        raise ConvertError(f"{cfg_file} (with vision_config.json, if any) is not a usable IXC2.5 config: "
                           f"{e}") from None
    return config, has_vision, awq_group


def _plan(source: _Source, config: InternLMXComposer2Config, has_vision: bool, dtype: Optional[str],
          merge_task: Optional[str], shard_size: int, quantization_config: Optional[dict] = None) -> _Plan:
    for k, v in sizes_from_weights(source).items():
        setattr(config, k, v)
    expected = parameter_shapes(config)
    if source.awq_group:  # lmdeploy's AWQ parts instead of each base linear's weight
        for n in [n for n in expected if _PLORA_WEIGHT.fullmatch(n)]:
            out_f, in_f = expected.pop(n)
            try:
                parts = awq.shapes(out_f, in_f, source.awq_group)
            except awq.AwqLayoutError as e:
                raise ConvertError(f"{source.describe()}: {n[: -len('.weight')]}: {e}") from None
            for part, shape in parts.items():
                expected[n[: -len("weight")] + part] = shape
        quantization_config = make_config("int4", source.awq_group)
    try:
        check_names_and_shapes(expected, source, source.describe())
    except CheckpointError as e:
        raise ConvertError(str(e) + _where_and_why(source, expected, has_vision)) from None
    if config.merged_task_lora and merge_task:
        raise ConvertError(f"the source already has task LoRA {config.merged_task_lora!r} merged")

    merges, dropped = {}, []
    if merge_task:
        absent = [t for t in MERGE_TASKS[merge_task] if t not in config.task_lora_ranks]
        if absent:
            raise ConvertError(f"--merge-task {merge_task} needs {absent} tensors, which {source.describe()} "
                               f"does not hold (it has task LoRAs {sorted(config.task_lora_ranks)})")
        dropped = [n for n in source.entries if _TASK_LORA_KEY.fullmatch(n)]
        for n in source.entries:
            if _PLORA_WEIGHT.fullmatch(n):
                base = n[: -len(".weight")]
                merges[n] = [(f"{base}.{t}_B.weight", f"{base}.{t}_A.weight") for t in MERGE_TASKS[merge_task]]
    out_config = InternLMXComposer2Config.from_dict(config.to_dict())
    if merge_task:
        out_config.task_lora_ranks = {}
        out_config.merged_task_lora = merge_task
    out_config.quantization_config = quantization_config
    quant = out_config.quantization
    shapes = parameter_shapes(out_config)
    dropped_set = set(dropped)
    names, sources, parts, dtypes = [], {}, {}, {}
    for n in source.entries:
        if n in dropped_set:
            continue
        if source.awq_group and n.endswith(awq.PARTS):  # an AWQ part: our part of the same name
            names.append(n)
            sources[n], parts[n], dtypes[n] = n, n.rsplit(".", 1)[1], PART_DTYPES[4][n.rsplit(".", 1)[1]]
            continue
        if quant is not None and _PLORA_WEIGHT.fullmatch(n):  # a base linear: its quantized parts instead
            for part, code in PART_DTYPES[quant[0]].items():
                out = n[: -len("weight")] + part
                names.append(out)
                sources[out], parts[out], dtypes[out] = n, part, code
            continue
        names.append(n)
        sources[n] = n
        dtypes[n] = DTYPES[dtype] if dtype else source.entries[n].dtype
    sizes = {n: int(np.prod(shapes[n], dtype=np.int64)) * _ITEMSIZE[dtypes[n]] for n in names}
    # An output shard never spans two source files: it then holds at most one source file's tensors.
    by_file: Dict[str, List[str]] = {}
    for n in names:
        by_file.setdefault(source.entries[sources[n]].file, []).append(n)
    shards = [shard for group in by_file.values() for shard in iter_shards(group, sizes, shard_size)]
    shard_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    return _Plan(out_config, names, dtypes, merges, dropped, shards, shard_names, sizes, dtype, merge_task,
                 sources, parts, quant)


def _where_and_why(source: _Source, expected: Dict[str, Tuple[int, ...]], has_vision: bool) -> str:
    bad = [k for k in source.entries if k not in expected or tuple(expected[k]) != source.shape(k)]
    out = ""
    if bad:
        shown = "; ".join(f"{k} in {os.path.basename(source.entries[k].file)}" for k in bad[:20])
        out += f". Offending source keys: {shown}" + (f" (and {len(bad) - 20} more)" if len(bad) > 20 else "")
    vision_keys = ("vit.", "vision_proj.", "plora_glb_GN", "plora_sub_GN")
    missing = [k for k in expected if k not in source.entries]
    if not has_vision and any(k.startswith(vision_keys) for k in bad + missing):
        out += (". No vision_config.json (nor a vision_config key) was found beside config.json, so the "
                "release's CLIP ViT-L/14-560 was assumed: put the checkpoint's CLIP config there")
    return out


def _output(name: str, plan: _Plan, readers: _Readers, source: _Source) -> Tuple[np.ndarray, bool]:
    """The tensor to write for `name`, and whether it still views the source's memory."""
    part = plan.quant_parts.get(name)
    if part is not None and source.awq_group:  # lmdeploy's layout, repacked into ours
        return awq.to_ours(part, readers.get(name), source.entries[name].dtype), False
    if part is not None:  # the parts of one weight are consecutive: it is quantized once, for the first
        src = plan.sources[name]
        if plan.quant_cache is None or plan.quant_cache[0] != src:
            plan.quant_cache = None  # the previous weight's parts go before this one's are made
            plan.quant_cache = (src, quantize_weight(_merged_fp32(src, plan, readers, source), *plan.quantization))
        return plan.quant_cache[1][part], False
    entry = source.entries[name]
    if not plan.merges.get(name):
        raw = readers.get(name)
        out = _cast(raw, entry.dtype, plan.dtypes[name])
        return out, out is raw
    return _from_fp32(_merged_fp32(name, plan, readers, source), plan.dtypes[name]), False


def _merged_fp32(name: str, plan: _Plan, readers: _Readers, source: _Source) -> np.ndarray:
    """Source tensor `name` in fp32 (a fresh array), with the task LoRAs of --merge-task folded in."""
    entry = source.entries[name]
    acc = _to_fp32(readers.get(name), entry.dtype)
    factors = plan.merges.get(name) or ()
    for b_name, a_name in factors:
        b = _to_fp32(readers.get(b_name), source.entries[b_name].dtype)
        a = _to_fp32(readers.get(a_name), source.entries[a_name].dtype)
        acc += b @ a
        readers.release(b_name)
        readers.release(a_name)
    return acc


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)).hexdigest()


def _save_shard(path: str, arrays: Dict[str, np.ndarray], dtypes: Dict[str, str]) -> None:
    """Write one safetensors file through MindSpore. `Tensor.from_numpy` shares the arrays' memory and
    MindSpore passes their pointers on to safetensors, so the shard is not copied again on the way."""
    ms = import_mindspore()  # here, so that argument and source errors come without MindSpore's start-up

    from mindspore.common.np_dtype import bfloat16 as bf16  # (ms.dtype_to_nptype is deprecated since 2.7)

    items = [{"name": n, "data": ms.Tensor.from_numpy(a.view(bf16) if dtypes[n] == "BF16" else a)}
             for n, a in arrays.items()]
    ms.save_checkpoint(items, path, format="safetensors")
    readable_as_umask(path)  # MindSpore writes its checkpoints 0400


# ----------------------------------------------------------------------------------------------
# progress and summary


class _Progress:
    """One bar per shard on stderr; when stderr is not a terminal, only each shard's final line."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done_bytes = label, max(total, 1), 0
        self.t0 = self.last = time.monotonic()
        self._draw(end="")

    def advance(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        now = time.monotonic()
        if self.tty and now - self.last >= 0.1:
            self.last = now
            self._draw(end="")

    def finish(self) -> None:
        self.done_bytes = self.total
        self._draw(end="\n", final=True)

    def _draw(self, end: str, final: bool = False) -> None:
        if not self.tty and not final:
            return
        frac = min(self.done_bytes / self.total, 1.0)
        bar = "#" * int(frac * 30) + "-" * (30 - int(frac * 30))
        secs = max(time.monotonic() - self.t0, 1e-9)
        line = (f"{self.label} [{bar}] {frac * 100:3.0f}% {_gb(self.done_bytes)}/{_gb(self.total)} GB "
                f"{self.done_bytes / secs / 1e9:.2f} GB/s")
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


@dataclass
class ConversionSummary:
    dst: str
    tensors: int
    shards: int
    bytes_read: int  # source bytes of the tensors converted
    bytes_written: int  # tensor bytes in the output shards
    seconds: float
    dtype: str
    merged_task_lora: Optional[str]
    verified: bool
    notes: List[str]
    quantize: Optional[str] = None

    def __str__(self) -> str:
        rate = self.bytes_written / max(self.seconds, 1e-9) / 1e9
        lines = [f"converted {self.tensors} tensors ({_gb(self.bytes_read)} GB read, {_gb(self.bytes_written)} GB "
                 f"written in {self.shards} shard(s), dtype {self.dtype}"
                 + (f", task LoRA {self.merged_task_lora!r} merged" if self.merged_task_lora else "")
                 + (f", decoder linears {self.quantize}" if self.quantize else "")
                 + (", verified" if self.verified else "")
                 + f") in {self.seconds:.1f} s ({rate:.2f} GB/s) -> {self.dst}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


# ----------------------------------------------------------------------------------------------
# the conversion


def convert(src: str, dst: str, dtype: Optional[str] = None, merge_task: Optional[str] = None,
            force: bool = False, verify: bool = False, shard_size=DEFAULT_SHARD_SIZE,
            progress_stream=None, quantize: Optional[str] = None,
            group_size: Optional[int] = None) -> ConversionSummary:
    """Convert the checkpoint at `src` into the model directory `dst`; see the module docstring.
    `quantize` 'int8' / 'int4' stores the decoder's base linears quantized (`quantization`); `group_size`
    (int4 only, default 128) is the number of inputs that share a scale and zero point."""
    t0 = time.monotonic()
    quantization_config = None
    if quantize is not None or group_size is not None:
        if quantize is None:
            raise ConvertError("group_size applies to quantize='int4' only")
        try:
            quantization_config = make_config(quantize, group_size)
        except QuantizationConfigError as e:
            raise ConvertError(str(e)) from None
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"dtype must be one of {sorted(DTYPES)} or None (keep the source's), got {dtype!r}")
    if merge_task is not None and merge_task not in MERGE_TASKS:
        raise ConvertError(f"merge_task must be one of {sorted(MERGE_TASKS)} or None, got {merge_task!r}")
    try:
        shard_size = parse_size(shard_size)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    dst = os.path.abspath(dst)
    _check_destination(src, dst, force)
    layout = _locate(src)
    config, has_vision, awq_group = _load_config(layout.root)
    if config.quantization_config is not None or (awq_group and quantization_config):
        raise ConvertError(f"{layout.root} is already quantized: convert the unquantized checkpoint to quantize "
                           f"it (an lmdeploy AWQ checkpoint converts without --quantize)")
    if awq_group and merge_task:
        raise ConvertError(f"{layout.root} is quantized (lmdeploy AWQ): task LoRAs cannot be merged into its "
                           f"4-bit weights")
    source = _Source(layout, awq_group)
    plan = _plan(source, config, has_vision, dtype, merge_task, shard_size, quantization_config)
    notes = []
    if not has_vision:
        notes.append("no vision config beside config.json: wrote the release's CLIP ViT-L/14-560 config")
    progress = _Progress(progress_stream)

    created = missing_parents(dst)  # removed again on failure: an interrupted run leaves nothing behind
    tmp = None
    try:
        with deferred_interrupts():  # the folders and the record of them, or neither
            for folder in created:
                os.mkdir(folder)
            tmp = make_sibling_dir(dst, "partial")
        manifest, read, written, overflow = _write(tmp, plan, source, progress)
        if overflow:
            notes.append(f"{overflow} values are +-inf in the fp16 output (inf in the source, or beyond fp16's "
                         f"+-65504)")
        notes += _copy_tokenizer(layout.root, tmp, manifest)
        manifest["notes"] = notes
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        if verify:
            _verify(tmp, plan, source, manifest, progress)
        with deferred_interrupts():  # renames that must not stop half-way
            publish(tmp, dst, lambda: _check_destination(src, dst, force))
    except BaseException:
        with shielded():  # a second Ctrl-C must not cut the cleanup short
            remove_partial(tmp, created)
        raise
    return ConversionSummary(dst, len(plan.names), len(plan.shards), read, written, time.monotonic() - t0,
                             dtype or "source", merge_task, verify, notes, quantize)


def _check_destination(src: str, dst: str, force: bool) -> None:
    if not os.path.lexists(dst):
        parent = os.path.dirname(dst)
        while not os.path.lexists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ConvertError(f"cannot create {dst}: {parent} is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConvertError(f"cannot create {dst}: {parent} is not writable")
        return
    if not os.path.isdir(dst):
        raise ConvertError(f"destination {dst} exists and is not a directory")
    if not force:
        raise ConvertError(f"destination {dst} already exists; pass --force to replace it")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_src == real_dst or real_src.startswith(real_dst.rstrip(os.sep) + os.sep):
        raise ConvertError(f"destination {dst} holds the source {src}: replacing it would delete the source")


def _hash_file(path: str, progress: _Progress) -> str:
    h = hashlib.sha256()
    progress.start(f"sha256 {os.path.basename(path)}", os.path.getsize(path))
    with open(path, "rb") as f:
        while True:
            block = f.read(16 * 2**20)
            if not block:
                break
            h.update(block)
            progress.advance(len(block))
    progress.finish()
    return h.hexdigest()


def _write(tmp: str, plan: _Plan, source: _Source, progress: _Progress) -> Tuple[dict, int, int, int]:
    ms_version = _mindspore_version()  # imports MindSpore now, so that its start-up is not timed as shard 1
    files = [{"name": os.path.basename(p), "bytes": os.path.getsize(p), "sha256": _hash_file(p, progress)}
             for p in source.layout.files]
    # The last shard that reads each source file, so that a file is closed (and unmapped) right after it.
    last_use: Dict[str, int] = {}
    for i, names in enumerate(plan.shards):
        for n in names:
            src = plan.sources[n]
            for m in [src] + [x for pair in plan.merges.get(src, ()) for x in pair]:
                last_use[source.entries[m].file] = i
    tensors, weight_map = {}, {}
    read = written = overflow = 0
    readers = _Readers(source)
    try:
        for i, (names, fname) in enumerate(zip(plan.shards, plan.shard_names)):
            progress.start(f"[{i + 1}/{len(plan.shards)}] {fname}", sum(plan.sizes[n] for n in names))
            arrays, keep = {}, []
            for n in names:
                out, is_view = _output(n, plan, readers, source)
                src = plan.sources[n]
                if is_view:
                    keep.append(src)
                else:
                    readers.release(src)
                e = source.entries[src]
                tensors[n] = {"file": fname, "dtype": plan.dtypes[n], "shape": list(out.shape),
                              "sha256": _sha256(out), "source_key": e.key,
                              "source_file": os.path.basename(e.file), "source_dtype": e.dtype}
                if n in plan.quant_parts:
                    tensors[n]["quantized"] = plan.quant_parts[n]
                weight_map[n] = fname
                if src == n or plan.quant_parts[n] == "qweight":  # a quantized weight's source counts once
                    read += int(np.prod(e.shape, dtype=np.int64)) * _ITEMSIZE[e.dtype]
                written += out.nbytes
                if plan.dtypes[n] == "F16" and e.dtype != "F16":
                    overflow += int(np.count_nonzero(np.isinf(out)))
                arrays[n] = out
                progress.advance(out.nbytes)
            _save_shard(os.path.join(tmp, fname), arrays, plan.dtypes)
            del arrays, out  # the shard's memory goes before the source pages are dropped
            plan.quant_cache = None
            for n in keep:
                readers.release(n)
            readers.close_unneeded({f for f, last in last_use.items() if last > i})
            progress.finish()
    finally:
        readers.close()
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": written}, "weight_map": weight_map}, f, indent=1)
    plan.config.save_pretrained(tmp)
    manifest = {
        "converter": "mindxcomposer.convert",
        "converter_version": CONVERTER_VERSION,
        "mindxcomposer_version": __version__,
        "mindspore_version": ms_version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"path": source.layout.root, "format": source.layout.format,
                   "index": os.path.basename(source.layout.index) if source.layout.index else None,
                   "files": files, "ignored_keys": source.ignored},
        "dtype": plan.dtype_arg or "source",
        "merged_task_lora": plan.merge_task,
        "quantization_config": plan.config.quantization_config,
        "dropped_task_lora_keys": plan.dropped,
        "tensors": tensors,
    }
    return manifest, read, written, overflow


def _mindspore_version() -> str:
    return import_mindspore().__version__


def _copy_tokenizer(root: str, tmp: str, manifest: dict) -> List[str]:
    copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(root, f))]
    for f in copied:
        shutil.copyfile(os.path.join(root, f), os.path.join(tmp, f))
    manifest["tokenizer_files"] = copied
    if "tokenizer.model" in copied:
        return []
    shutil.copyfile(BUNDLED_TOKENIZER, os.path.join(tmp, "tokenizer.model"))
    manifest["tokenizer_files"].append("tokenizer.model (bundled)")
    return [f"{root} has no tokenizer.model: copied the bundled InternLM2 tokenizer ({BUNDLED_TOKENIZER})"]


def _verify(tmp: str, plan: _Plan, source: _Source, manifest: dict, progress: _Progress) -> None:
    """Re-read the written directory as `from_pretrained` would, and compare every tensor's bits with the
    source put through the same cast / merge (the source's own bits when the dtype is kept)."""
    try:
        config = InternLMXComposer2Config.from_pretrained(tmp)
        ckpt = Checkpoint(tmp)
        for k, v in sizes_from_weights(ckpt).items():
            setattr(config, k, v)
        check_names_and_shapes(parameter_shapes(config), ckpt, tmp)
    except (CheckpointError, ValueError) as e:
        raise ConvertError(f"verification failed: the written directory does not load: {e}") from None
    readers = _Readers(source)
    try:
        for i, fname in enumerate(plan.shard_names):
            sf = SafetensorsFile(os.path.join(tmp, fname))
            progress.start(f"verify [{i + 1}/{len(plan.shard_names)}] {fname}",
                           sum(plan.sizes[n] for n in plan.shards[i]))
            if sorted(sf.keys()) != sorted(plan.shards[i]):
                raise ConvertError(f"verification failed: {fname} holds {sorted(sf.keys())[:5]}..., "
                                   f"expected {sorted(plan.shards[i])[:5]}...")
            for n in plan.shards[i]:
                got = sf.raw(n)
                expected, _ = _output(n, plan, readers, source)
                e = source.entries[plan.sources[n]]
                if sf.dtype(n) != plan.dtypes[n] or got.shape != expected.shape or not _same_bytes(got, expected):
                    raise ConvertError(f"verification failed: {n} in {fname} ({sf.dtype(n)} {list(got.shape)}) "
                                       f"differs from the source {e.key!r} in {os.path.basename(e.file)} "
                                       f"converted to {plan.dtypes[n]}")
                if _sha256(got) != manifest["tensors"][n]["sha256"]:
                    raise ConvertError(f"verification failed: {n} in {fname} does not match its manifest sha256")
                readers.release(plan.sources[n])
                progress.advance(got.nbytes)
            progress.finish()
    finally:
        readers.close()


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality (NaN payloads included) in 64 MB blocks: a whole-array comparison would allocate a
    boolean per element, 0.4 GB for the embedding."""
    a, b = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
    step = 1 << 26
    return a.size == b.size and all(np.array_equal(a[i:i + step], b[i:i + step]) for i in range(0, a.size, step))


# ----------------------------------------------------------------------------------------------
# command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="mxc-convert",
        description="Convert a released InternLM-XComposer-2.5 checkpoint (PyTorch .bin or safetensors, with "
                    "config.json) into a mindxcomposer model directory.")
    parser.add_argument("src", help="upstream model directory, or a single .bin / .safetensors file with "
                                    "config.json beside it")
    parser.add_argument("dst", help="output model directory (must not exist unless --force)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast every tensor (default: keep the source's)")
    parser.add_argument("--merge-task", choices=sorted(MERGE_TASKS),
                        help="fold that task's LoRAs into the base weights and drop all task LoRA tensors")
    parser.add_argument("--quantize", choices=("int8", "int4"),
                        help="store the decoder's base linears (wqkv, wo, w1, w2, w3) quantized: int8 symmetric "
                             "per output channel, or int4 asymmetric per group of inputs (AWQ's scheme); "
                             "everything else keeps its dtype")
    parser.add_argument("--group-size", type=int,
                        help="inputs per int4 scale and zero point (default 128; int4 only)")
    parser.add_argument("--force", action="store_true", help="replace an existing DST")
    parser.add_argument("--verify", action="store_true",
                        help="re-read the output and compare every tensor with the source before publishing")
    parser.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE,
                        help="maximum bytes per output shard, e.g. 5GB, 500MB, 2GiB (default %(default)s); one "
                             "shard is held in memory while it is written")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)

    def run():
        print(convert(args.src, args.dst, dtype=args.dtype, merge_task=args.merge_task, force=args.force,
                      verify=args.verify, shard_size=args.shard_size, quantize=args.quantize,
                      group_size=args.group_size))

    return run_command("mxc-convert", run, debug=args.debug, whole_process=argv is None,
                       interrupted_note=f"; nothing was written to {args.dst}")


if __name__ == "__main__":
    sys.exit(main())
