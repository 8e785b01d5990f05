"""LoRA adapters in peft's layout (peft 0.8.2, what upstream's recipe uses).

An adapter directory holds `adapter_config.json` (peft's `LoraConfig` fields) and
`adapter_model.safetensors` with peft's tensor names, e.g.
`base_model.model.model.layers.0.attention.wqkv.lora_A.weight` [r, in] and `...lora_B.weight` [out, r].
The adapter adds `lora_B(lora_A(dropout(x))) * lora_alpha / r` to the output of the (Partial-LoRA)
linear it targets, as peft's `Linear` wrapping upstream's `PLoRA` does; `merge_adapter` folds
`B @ A * scaling` into the linear's weight (peft's `merge_and_unload`).
"""
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..constants import LINEARS
from ..atomic import atomic_dir
from ..weights import LazyArrays, SafetensorsFile, array_spec, write_safetensors

DEFAULT_TARGETS = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
CONFIG_FILE = "adapter_config.json"
# Trained beside the adapter in LoRA mode (see `trainables`), saved in the adapter file under these names.
SEPARATORS = ("base_model.model.plora_glb_GN", "base_model.model.plora_sub_GN")
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterError(InputError):
    """An adapter directory that cannot be used with this model."""


def adapter_name(layer: int, linear: str, part: str) -> str:
    return f"base_model.model.model.layers.{layer}.{linear}.lora_{part}.weight"


def matches(module: str, target_modules: Sequence[str]) -> bool:
    """peft's rule for a list of targets: the module's name equals a target or ends with '.' + target."""
    return any(module == t or module.endswith("." + t) for t in target_modules)


@dataclass
class LoraSettings:
    r: int = 64
    lora_alpha: float = 64
    lora_dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    bias: str = "none"

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora_r must be a positive integer, got {self.r!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise ValueError(f"lora_bias {self.bias!r} is not supported (upstream's recipe uses 'none')")
        if not any(self.targets):
            raise ValueError(f"lora_target_modules {self.target_modules} match none of the decoder's linears "
                             f"{list(LINEARS)}")

    @property
    def targets(self) -> Tuple[bool, ...]:
        """Per linear of `LINEARS`: whether the adapter targets it."""
        return tuple(matches(name, self.target_modules) for name in LINEARS)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def peft_config(self, base_model: str = "") -> dict:
        """adapter_config.json as peft 0.8.2 writes it."""
        return {
            "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model, "bias": self.bias,
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
            "layers_to_transform": None, "loftq_config": {},
            "lora_alpha": int(self.lora_alpha) if float(self.lora_alpha).is_integer() else self.lora_alpha,
            "lora_dropout": self.lora_dropout, "megatron_config": None, "megatron_core": "megatron.core",
            "modules_to_save": None, "peft_type": "LORA", "r": self.r, "rank_pattern": {}, "revision": None,
            "target_modules": sorted(self.target_modules), "task_type": "CAUSAL_LM", "use_rslora": False,
        }


def adapter_shapes(config, settings: LoraSettings) -> Dict[str, Tuple[int, ...]]:
    """peft name -> shape, for every layer and target linear, in layer then `LINEARS` order."""
    qkv_out = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    dims = {"attention.wqkv": (config.hidden_size, qkv_out),
            "attention.wo": (config.num_attention_heads * config.head_dim, config.hidden_size),
            "feed_forward.w1": (config.hidden_size, config.intermediate_size),
            "feed_forward.w3": (config.hidden_size, config.intermediate_size),
            "feed_forward.w2": (config.intermediate_size, config.hidden_size)}
    out = {}
    for layer in range(config.num_hidden_layers):
        for lin, target in zip(LINEARS, settings.targets):
            if target:
                fan_in, fan_out = dims[lin]
                out[adapter_name(layer, lin, "A")] = (settings.r, fan_in)
                out[adapter_name(layer, lin, "B")] = (fan_out, settings.r)
    return out


def init_adapter(config, settings: LoraSettings, seed: int) -> Dict[str, np.ndarray]:
    """peft's initialisation: A as `nn.Linear`'s default (kaiming_uniform with a = sqrt(5), i.e. uniform
    in +-1/sqrt(fan_in)), B zeros, so that the adapter starts as the identity change. torch's random
    stream is not reproduced: the same seed gives other values than upstream."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in adapter_shapes(config, settings).items():
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(shape[1])
            out[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            out[name] = np.zeros(shape, np.float32)
    return out


def write_adapter(directory: str, tensors: Dict[str, np.ndarray], settings: LoraSettings, base_model: str = "") -> None:
    """Write an adapter's two files (peft's layout) into an existing directory."""
    write_safetensors(os.path.join(directory, WEIGHTS_FILE),
                      LazyArrays(tensors, lambda k: np.asarray(tensors[k], np.float32),
                                 lambda k: (array_spec(tensors, k)[0], np.float32)), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(settings.peft_config(base_model), f, indent=2)


def save_adapter(path: str, tensors: Dict[str, np.ndarray], settings: LoraSettings, base_model: str = "") -> None:
    """Write (atomically) an adapter directory in peft's layout."""
    with atomic_dir(path) as tmp:
        write_adapter(tmp, tensors, settings, base_model)


def load_adapter(path: str, config=None) -> Tuple[LoraSettings, Dict[str, np.ndarray]]:
    """Read a peft-layout adapter directory (safetensors or peft's older `adapter_model.bin` is not read:
    convert it first). With `config`, names and shapes are checked against the model."""
    cfg_file = os.path.join(path, CONFIG_FILE)
    st_file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isdir(path):
        raise AdapterError(f"adapter directory {path!r} does not exist")
    for f in (cfg_file, st_file):
        if not os.path.isfile(f):
            hint = " (peft's adapter_model.bin is a torch pickle; save the adapter with safe_serialization=True)" \
                if f == st_file and os.path.isfile(os.path.join(path, "adapter_model.bin")) else ""
            raise AdapterError(f"{path}: no {os.path.basename(f)}{hint}")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: not JSON ({e})") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type {raw.get('peft_type')!r}, only LORA adapters are supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise AdapterError(f"{cfg_file}: per-module {key} is not supported")
    try:
        targets = raw.get("target_modules") or DEFAULT_TARGETS
        settings = LoraSettings(r=int(raw["r"]), lora_alpha=raw["lora_alpha"],
                                lora_dropout=float(raw.get("lora_dropout", 0.0)),
                                target_modules=[targets] if isinstance(targets, str) else list(targets),
                                bias=raw.get("bias", "none"))
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterError(f"{cfg_file}: {e}") from None
    sf = SafetensorsFile(st_file)
    tensors = {}
    for key in sf.keys():
        name = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        tensors[name] = sf.get(key, np.float32)
    if config is not None:
        expected = adapter_shapes(config, settings)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected) - set(SEPARATORS))
        bad = [f"{k}: {tensors[k].shape} vs {expected[k]}" for k in expected if k in tensors
               and tuple(tensors[k].shape) != expected[k]]
        if missing or extra or bad:
            raise AdapterError(f"adapter {path} does not fit the model: missing {missing[:4]}, unexpected {extra[:4]}, "
                               f"shape mismatches {bad[:4]}")
    return settings, tensors


def merge_adapter(get_weight, tensors: Dict[str, np.ndarray], settings: LoraSettings, num_layers: int
                  ) -> Dict[str, np.ndarray]:
    """The merged linear weights `W + B @ A * scaling` (float32) by model name, and the trained image
    separators if the adapter holds them; `get_weight(name)` reads a base weight as float32."""
    out = {name[len("base_model.model."):]: np.asarray(v, np.float32) for name, v in tensors.items()
           if name in SEPARATORS}
    for layer in range(num_layers):
        for lin, target in zip(LINEARS, settings.targets):
            if not target:
                continue
            a = tensors[adapter_name(layer, lin, "A")].astype(np.float32)
            b = tensors[adapter_name(layer, lin, "B")].astype(np.float32)
            name = f"model.layers.{layer}.{lin}.weight"
            out[name] = get_weight(name) + (b @ a) * np.float32(settings.scaling)
    return out
