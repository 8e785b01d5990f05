"""Configuration of IXC2.5: the InternLM2 decoder, the CLIP vision tower and the sizes read off the weights.

Defaults equal the released internlm-xcomposer2d5-7b checkpoint. `config.json` in the upstream layout
carries only the decoder fields; the CLIP config comes from `vision_config.json` or a `vision_config`
key, and the PLoRA / task-LoRA / projector sizes come from the weight shapes (see `weights.py`).
"""
import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, Optional

from .errors import ConfigError, ModelNotFoundError
from .quantization import parse_config
from .validation import read_config_json


@dataclass
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 560
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPVisionConfig":
        d = dict(d)
        if "vision_config" in d and isinstance(d["vision_config"], dict):
            d = d["vision_config"]  # a full CLIPConfig
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class InternLMXComposer2Config:
    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 24576
    rms_norm_eps: float = 1e-5
    bias: bool = False
    rope_theta: float = 1000000.0
    rope_scaling: Optional[dict] = field(default_factory=lambda: {"type": "dynamic", "factor": 2.0})
    max_length: int = 16384
    pad_token_id: int = 2
    bos_token_id: int = 1
    eos_token_id: int = 2
    tie_word_embeddings: bool = False
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    # Read off the weights when loading; these defaults are the release's.
    plora_rank: int = 256
    plora_scale: float = 1.0  # lora_alpha / lora_r = 256 / 256 in the release
    task_lora_ranks: Dict[str, int] = field(default_factory=dict)  # e.g. {"lora_web": 512, ...}
    projector_hidden_size: Optional[int] = None  # hidden of Linear-GELU-Linear; None = hidden_size
    # Set by `mxc-convert --merge-task`: that task's LoRAs are folded into the base weights and the task
    # LoRA tensors dropped, so infer_mode 'base' computes what the unmerged model does in that mode.
    merged_task_lora: Optional[str] = None  # None, 'web' or 'write'
    # Set by `mxc-convert --quantize`: how the decoder's base linears are stored (`quantization.make_config`).
    quantization_config: Optional[dict] = None

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            self.vision_config = CLIPVisionConfig.from_dict(self.vision_config)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            factor = self.rope_scaling.get("factor")
            if kind not in ("linear", "dynamic"):
                raise ValueError(f"rope_scaling type must be 'linear' or 'dynamic', got {kind!r}")
            if not isinstance(factor, (int, float)) or factor < 1.0:
                raise ValueError(f"rope_scaling factor must be a number >= 1, got {factor!r}")
        if self.merged_task_lora not in (None, "web", "write"):
            raise ValueError(f"merged_task_lora must be None, 'web' or 'write', got {self.merged_task_lora!r}")
        if self.projector_hidden_size is None:
            self.projector_hidden_size = self.hidden_size
        parse_config(self.quantization_config)  # a clear error now rather than at the first product

    @property
    def quantization(self):
        """(bits, group_size) of the decoder's base linears, or None when they are stored as floats."""
        return parse_config(self.quantization_config)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def vision_merged_size(self) -> int:
        """Width of one merged token: 2x2 ViT patches concatenated."""
        return 4 * self.vision_config.hidden_size

    @classmethod
    def from_dict(cls, d: dict) -> "InternLMXComposer2Config":
        known = {f.name for f in fields(cls)}
        return cls(**{k: copy.deepcopy(v) for k, v in d.items() if k in known})

    @classmethod
    def from_pretrained(cls, path: str, ignore_quantization: bool = False) -> "InternLMXComposer2Config":
        """Read `config.json` (upstream or ours) and the CLIP config beside it, if any. `ignore_quantization`
        leaves out its `quantization_config` (the converter reads another library's layout itself)."""
        cfg_file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(cfg_file):
            raise ModelNotFoundError(f"no config.json in {path!r}: not an IXC2.5 model directory")
        d = read_config_json(cfg_file)
        if ignore_quantization:
            d.pop("quantization_config", None)
        model_type = d.get("model_type")
        if model_type not in (None, "internlm2", "internlmxcomposer2"):
            raise ConfigError(f"{cfg_file}: model_type {model_type!r} is not an InternLM-XComposer2 model")
        vision_file = os.path.join(os.path.dirname(cfg_file), "vision_config.json")
        if "vision_config" not in d and os.path.isfile(vision_file):
            try:
                with open(vision_file, encoding="utf-8") as f:
                    d["vision_config"] = CLIPVisionConfig.from_dict(json.load(f))
            except (ValueError, TypeError, AttributeError) as e:  # not JSON, or not a JSON object
                raise ConfigError(f"{vision_file} is not a usable CLIP config: {e}") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_type"] = "internlmxcomposer2"
        d["architectures"] = ["InternLMXComposer2ForCausalLM"]
        return d

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
