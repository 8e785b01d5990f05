"""The single table from upstream checkpoint names to our parameters, and safetensors I/O without torch.

Our cells are named after upstream's modules, so a parameter keeps its upstream name and layout
(`nn.Linear` and `nn.Dense` both store [out, in]; conv weights are [out, in, kh, kw] in both). The table
below therefore only lists what differs: buffers upstream may have saved that are not parameters.
The converter (`mindxcomposer.convert`, CLI `mxc-convert`) and `from_pretrained` both go through `to_ours`.
"""
import json
import os
import re
import struct
from collections.abc import Mapping
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from .constants import TASK_LORAS
from .quantization import part_shapes

# Upstream names that carry no parameter of ours: dropped on load and on conversion.
IGNORED_UPSTREAM = (
    re.compile(r".*\.embeddings\.position_ids$"),  # CLIP buffer, persistent in some transformers versions
    re.compile(r".*\.rotary_emb\.inv_freq$"),  # RoPE buffer in older checkpoints
)

# Upstream name -> our name. Identity today; kept as a table so that a renamed cell changes one line.
RENAMES: Tuple[Tuple[re.Pattern, str], ...] = ()


def to_ours(upstream_name: str) -> Optional[str]:
    """Our parameter name for an upstream checkpoint key, or None if the key holds no parameter."""
    if any(p.fullmatch(upstream_name) for p in IGNORED_UPSTREAM):
        return None
    name = upstream_name
    for pattern, repl in RENAMES:
        name = pattern.sub(repl, name)
    return name


# ----------------------------------------------------------------------------------------------
# safetensors, read with numpy only (bf16 included, which numpy has no dtype for)

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: names the file and the key."""


def bf16_to_fp32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    nan = np.isnan(x)
    out = (rounded >> 16).astype(np.uint16)
    out[nan] = 0x7FC0
    return out


class SafetensorsFile:
    """Lazy reader of one .safetensors file: the header is parsed up front, tensors on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 * 2**20:
                    raise CheckpointError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + n
        self._entries = header
        for key, e in header.items():
            if e.get("dtype") not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {e.get('dtype')!r}")
            start, end = e["data_offsets"]
            if self._data_start + end > size:
                raise CheckpointError(f"{path}: tensor {key!r} runs past the end of the file (truncated?)")

    def keys(self) -> List[str]:
        return list(self._entries)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> str:
        return self._entries[key]["dtype"]

    def raw(self, key: str) -> np.ndarray:
        """The stored array; bf16 comes back as its uint16 bit pattern."""
        e = self._entries[key]
        start, end = e["data_offsets"]
        dt = np.dtype(_ST_DTYPES[e["dtype"]])
        count = (end - start) // dt.itemsize
        if count != int(np.prod(e["shape"], dtype=np.int64)):
            raise CheckpointError(f"{self.path}: tensor {key!r} byte size does not match its shape {e['shape']}")
        arr = np.fromfile(self.path, dtype=dt, count=count, offset=self._data_start + start)
        return arr.reshape(e["shape"])

    def get(self, key: str, dtype=np.float32) -> np.ndarray:
        arr = self.raw(key)
        if self.dtype(key) == "BF16":
            arr = bf16_to_fp32(arr)
        return arr.astype(dtype, copy=False) if dtype is not None else arr


def checkpoint_files(path: str) -> List[str]:
    """The safetensors files of a model directory, in index order when there is an index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are not in {path}: {missing}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(path, f) for f in found]
    bins = [f for f in os.listdir(path) if f.endswith(".bin")]
    hint = (" It holds PyTorch .bin shards: convert them first with `mxc-convert SRC DST`." if bins else "")
    raise CheckpointError(f"no safetensors weights in {path}.{hint}")


class Checkpoint:
    """All tensors of a (possibly sharded) safetensors checkpoint, keyed by our parameter names."""

    def __init__(self, path: str):
        self.files = [SafetensorsFile(f) for f in checkpoint_files(path)]
        self._where: Dict[str, Tuple[SafetensorsFile, str]] = {}
        for sf in self.files:
            for key in sf.keys():
                ours = to_ours(key)
                if ours is None:
                    continue
                if ours in self._where:
                    raise CheckpointError(f"{sf.path}: key {key!r} also appears in {self._where[ours][0].path}")
                self._where[ours] = (sf, key)

    def keys(self) -> List[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> Tuple[int, ...]:
        sf, key = self._where[name]
        return sf.shape(key)

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        sf, key = self._where[name]
        return sf.get(key, dtype)

    def raw(self, name: str) -> np.ndarray:
        """The stored array (bf16 as its uint16 bits): no conversion, no copy beyond the read."""
        sf, key = self._where[name]
        return sf.raw(key)

    def dtype(self, name: str) -> str:
        """The safetensors dtype code of a tensor: 'BF16', 'F16', 'F32', ..."""
        sf, key = self._where[name]
        return sf.dtype(key)

    def items(self, dtype=np.float32) -> Iterator[Tuple[str, np.ndarray]]:
        for name in self._where:
            yield name, self.get(name, dtype)


def sizes_from_weights(ckpt: Checkpoint) -> dict:
    """Config fields that config.json does not carry, read off the weight shapes."""
    probe = "model.layers.0.attention.wqkv"
    out = {}
    if f"{probe}.Plora_A.weight" in ckpt:
        out["plora_rank"] = ckpt.shape(f"{probe}.Plora_A.weight")[0]
    out["task_lora_ranks"] = {t: ckpt.shape(f"{probe}.{t}_A.weight")[0]
                              for t in TASK_LORAS if f"{probe}.{t}_A.weight" in ckpt}
    if "vision_proj.0.weight" in ckpt:
        out["projector_hidden_size"] = ckpt.shape("vision_proj.0.weight")[0]
    return out


def check_names_and_shapes(expected: Dict[str, Tuple[int, ...]], ckpt: Checkpoint, where: str) -> None:
    """Raise one error that lists every missing key, unexpected key and shape mismatch."""
    have = set(ckpt.keys())
    want = set(expected)
    problems = []
    missing = sorted(want - have)
    unexpected = sorted(have - want)
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_clip_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_clip_list(unexpected)}")
    bad = [f"{k}: checkpoint {ckpt.shape(k)} vs model {tuple(expected[k])}"
           for k in sorted(want & have) if tuple(ckpt.shape(k)) != tuple(expected[k])]
    if bad:
        problems.append(f"shape mismatches ({len(bad)}): {_clip_list(bad)}")
    if problems:
        raise CheckpointError(f"checkpoint {where} does not fit the model: " + "; ".join(problems))


def _clip_list(items: List[str], n: int = 20) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


Spec = Tuple[Tuple[int, ...], np.dtype]


class LazyArrays(Mapping):
    """Arrays by name, each made by `make(name)` when it is read, so that `write_safetensors` holds one at a time
    rather than all (an adapter's 0.6 GB at the release's size). `specs(name)` -> (shape, dtype), when given,
    announces an array without making it: `write_safetensors` then makes each array once, not also for its header
    (a second read of 1.1 GiB of moment files per checkpoint at the release's size)."""

    def __init__(self, names: Iterable[str], make: Callable[[str], np.ndarray],
                 specs: Optional[Callable[[str], Spec]] = None):
        self._names, self._make, self._specs = list(names), make, specs
        self._known = set(self._names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        return self._make(name)

    def __contains__(self, name) -> bool:  # Mapping's would make the array
        return name in self._known

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def spec(self, name: str) -> Optional[Spec]:
        """(shape, dtype) that `self[name]` will have, or None when not announced."""
        if name not in self._known:
            raise KeyError(name)
        if self._specs is None:
            return None
        shape, dtype = self._specs(name)
        return tuple(shape), np.dtype(dtype)


def array_spec(arrays: Mapping, name: str) -> Spec:
    """(shape, dtype) of `arrays[name]`: announced by a `LazyArrays` with specs, else read off the array."""
    spec = arrays.spec(name) if isinstance(arrays, LazyArrays) else None
    if spec is None:
        arr = np.asarray(arrays[name])
        spec = tuple(arr.shape), arr.dtype
    return spec


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Optional[dict] = None,
                      dtypes: Optional[Dict[str, str]] = None) -> None:
    """Write numpy arrays as safetensors. `dtypes[name] = "BF16"` marks uint16 arrays holding bf16 bits.
    The header comes first, from `array_spec`; an array that then differs from it is an error naming it."""
    rev = {np.dtype(v): k for k, v in _ST_DTYPES.items() if k != "BF16"}
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    order = list(tensors)
    specs = {name: array_spec(tensors, name) for name in order}
    for name, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        dt = (dtypes or {}).get(name) or rev[dtype]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            arr = np.asarray(tensors[name])
            if (tuple(arr.shape), arr.dtype) != specs[name]:
                raise ValueError(f"{path}: array {name!r} is {arr.dtype}{list(arr.shape)}, but was announced as "
                                 f"{specs[name][1]}{list(specs[name][0])}")
            f.write(np.ascontiguousarray(arr).tobytes())


def iter_shards(names: Iterable[str], sizes: Dict[str, int], max_bytes: int) -> List[List[str]]:
    """Group names into shards of at most max_bytes (a tensor larger than that gets a shard alone)."""
    shards, cur, cur_bytes = [], [], 0
    for n in names:
        if cur and cur_bytes + sizes[n] > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(n)
        cur_bytes += sizes[n]
    if cur:
        shards.append(cur)
    return shards


def parameter_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Every parameter of InternLMXComposer2ForCausalLM for `config`, by upstream name, in a fixed order."""
    c, v = config, config.vision_config
    shapes: Dict[str, Tuple[int, ...]] = {}
    vp = "vit.vision_tower.vision_model."
    n_pos = v.num_patches + 1
    shapes[vp + "embeddings.class_embedding"] = (v.hidden_size,)
    shapes[vp + "embeddings.patch_embedding.weight"] = (v.hidden_size, v.num_channels, v.patch_size, v.patch_size)
    shapes[vp + "embeddings.position_embedding.weight"] = (n_pos, v.hidden_size)
    shapes[vp + "pre_layrnorm.weight"] = (v.hidden_size,)
    shapes[vp + "pre_layrnorm.bias"] = (v.hidden_size,)
    for i in range(v.num_hidden_layers):
        lp = f"{vp}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{lp}self_attn.{proj}.weight"] = (v.hidden_size, v.hidden_size)
            shapes[f"{lp}self_attn.{proj}.bias"] = (v.hidden_size,)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[f"{lp}{ln}.weight"] = (v.hidden_size,)
            shapes[f"{lp}{ln}.bias"] = (v.hidden_size,)
        shapes[f"{lp}mlp.fc1.weight"] = (v.intermediate_size, v.hidden_size)
        shapes[f"{lp}mlp.fc1.bias"] = (v.intermediate_size,)
        shapes[f"{lp}mlp.fc2.weight"] = (v.hidden_size, v.intermediate_size)
        shapes[f"{lp}mlp.fc2.bias"] = (v.hidden_size,)
    # In the checkpoint although upstream reads the hidden state before it.
    shapes[vp + "post_layernorm.weight"] = (v.hidden_size,)
    shapes[vp + "post_layernorm.bias"] = (v.hidden_size,)

    merged = config.vision_merged_size
    shapes["vision_proj.0.weight"] = (c.projector_hidden_size, merged)
    shapes["vision_proj.0.bias"] = (c.projector_hidden_size,)
    shapes["vision_proj.2.weight"] = (c.hidden_size, c.projector_hidden_size)
    shapes["vision_proj.2.bias"] = (c.hidden_size,)
    shapes["plora_glb_GN"] = (1, 1, merged)
    shapes["plora_sub_GN"] = (1, 1, 1, merged)

    shapes["model.tok_embeddings.weight"] = (c.vocab_size, c.hidden_size)
    qkv_out = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    linears = {
        "attention.wqkv": (qkv_out, c.hidden_size, c.bias),
        "attention.wo": (c.hidden_size, c.hidden_size, c.bias),
        "feed_forward.w1": (c.intermediate_size, c.hidden_size, False),
        "feed_forward.w3": (c.intermediate_size, c.hidden_size, False),
        "feed_forward.w2": (c.hidden_size, c.intermediate_size, False),
    }
    quant = c.quantization
    for i in range(c.num_hidden_layers):
        lp = f"model.layers.{i}."
        for name, (out_f, in_f, bias) in linears.items():
            if quant is None:
                shapes[f"{lp}{name}.weight"] = (out_f, in_f)
            else:  # the stored parts of the quantized weight (`quantization`)
                for part, shape in part_shapes(out_f, in_f, *quant).items():
                    shapes[f"{lp}{name}.{part}"] = shape
            if bias:
                shapes[f"{lp}{name}.bias"] = (out_f,)
            shapes[f"{lp}{name}.Plora_A.weight"] = (c.plora_rank, in_f)
            shapes[f"{lp}{name}.Plora_B.weight"] = (out_f, c.plora_rank)
            for task, r in c.task_lora_ranks.items():
                shapes[f"{lp}{name}.{task}_A.weight"] = (r, in_f)
                shapes[f"{lp}{name}.{task}_B.weight"] = (out_f, r)
        shapes[f"{lp}attention_norm.weight"] = (c.hidden_size,)
        shapes[f"{lp}ffn_norm.weight"] = (c.hidden_size,)
    shapes["model.norm.weight"] = (c.hidden_size,)
    shapes["output.weight"] = (c.vocab_size, c.hidden_size)
    return shapes
