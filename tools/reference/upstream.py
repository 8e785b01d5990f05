"""Run the upstream PyTorch IXC2.5 code offline, at any of our configs, with our seeded weights.

The upstream files are imported from a directory given at run time (they are never copied into this
repository) and adapted by monkeypatching only; see README.md beside this file for every patch and for
what is reconstructed rather than upstream. Needs torch, torchvision, transformers 4.33 and einops.

API (kept small: other reference scripts import it):
    import_upstream(upstream_dir)            -> namespace of the upstream modules (patched)
    upstream_tokenizer(upstream_dir)         -> upstream InternLM2Tokenizer on our tokenizer.model
    load_upstream(upstream_dir, config, seed=0, weights=None)
                                             -> InternLMXComposer2ForCausalLM, eval, float32, CPU
    save_upstream_layout(model_or_weights, config, out_dir, fmt="safetensors", dtype="float32", shards=3,
                         upstream_dir=None)  -> out_dir holding a checkpoint as the release lays it out
"""
import contextlib
import importlib
import importlib.machinery
import json
import os
import shutil
import sys
import tempfile
import types
from typing import Dict, Optional, Union
from unittest import mock

# No hub: the upstream code and transformers must never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import ImageFont  # noqa: E402
from torch import nn  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from mindxcomposer.configuration import InternLMXComposer2Config  # noqa: E402
from mindxcomposer.demo import TOKENIZER_FILE, random_weights  # noqa: E402

INFER_MODES = ("base", "web", "write")
_TASK_LORAS_OF_MODE = {"base": (), "web": ("lora_web",), "write": ("lora_sft", "lora_dpo")}
_UPSTREAM_FILES = ("build_mlp.py", "ixc_utils.py", "modeling_internlm2.py",
                   "modeling_internlm_xcomposer2.py", "configuration_internlm_xcomposer2.py",
                   "tokenization_internlm2.py")
_IMPORTED: Dict[str, types.SimpleNamespace] = {}


def local_font():
    """Stands in for upstream's `get_font()`, which downloads SimHei.ttf; our port draws with it too."""
    return ImageFont.load_default(size=40)


def import_upstream(upstream_dir: str) -> types.SimpleNamespace:
    """Import the upstream files as one package (relative imports intact) and apply the run-time patches
    that do not depend on a config. Returns a namespace: build_mlp, ixc_utils, modeling_internlm2,
    modeling_xcomposer2, configuration, tokenization, TaskPLoRA."""
    upstream_dir = os.path.abspath(upstream_dir)
    if upstream_dir in _IMPORTED:
        return _IMPORTED[upstream_dir]
    missing = [f for f in _UPSTREAM_FILES if not os.path.isfile(os.path.join(upstream_dir, f))]
    if missing:
        raise FileNotFoundError(f"{upstream_dir} is not the upstream IXC2.5 code folder: missing {missing}")
    # A synthetic package whose __path__ is the upstream folder: nothing is copied or linked.
    name = f"_ixc_upstream_{len(_IMPORTED)}"
    pkg = types.ModuleType(name)
    pkg.__path__ = [upstream_dir]
    pkg.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    pkg.__spec__.submodule_search_locations = [upstream_dir]
    sys.modules[name] = pkg
    up = types.SimpleNamespace(dir=upstream_dir, package=name)
    up.ixc_utils = importlib.import_module(f"{name}.ixc_utils")
    up.build_mlp = importlib.import_module(f"{name}.build_mlp")
    up.configuration = importlib.import_module(f"{name}.configuration_internlm_xcomposer2")
    up.modeling_internlm2 = importlib.import_module(f"{name}.modeling_internlm2")
    up.modeling_xcomposer2 = importlib.import_module(f"{name}.modeling_internlm_xcomposer2")
    up.tokenization = importlib.import_module(f"{name}.tokenization_internlm2")

    up.ixc_utils.get_font = local_font
    up.modeling_xcomposer2.get_font = local_font
    up.TaskPLoRA = _make_task_plora(up.build_mlp.PLoRA)
    _thread_infer_mode(up.modeling_internlm2.InternLM2Model, up.TaskPLoRA)
    _IMPORTED[upstream_dir] = up
    return up


def _make_task_plora(upstream_plora):
    """Upstream PLoRA plus the released task LoRAs (absent from the OmniLive code).

    Upstream `PLoRA.forward` runs unchanged: its `super().forward(x)` resolves, through the MRO below,
    to `_TaskLoRALinear.forward`, which adds the task LoRAs of `self.infer_mode` to `W x + b` for every
    token before upstream adds its image-token PLoRA term."""

    class _TaskLoRALinear(nn.Linear):
        infer_mode = "base"

        def forward(self, x):
            res = super().forward(x)
            for task in _TASK_LORAS_OF_MODE[self.infer_mode]:
                res = res + getattr(self, f"{task}_B")(getattr(self, f"{task}_A")(x))
            return res

    class TaskPLoRA(upstream_plora, _TaskLoRALinear):
        def __init__(self, in_features, out_features, bias=True, lora_r=8, lora_alpha=16,
                     lora_len=0, task_lora_ranks=None, **kwargs):
            super().__init__(in_features, out_features, bias=bias, lora_r=lora_r,
                             lora_alpha=lora_alpha, lora_len=lora_len, **kwargs)
            self.task_lora_names = tuple(task_lora_ranks or {})
            for task, rank in (task_lora_ranks or {}).items():
                setattr(self, f"{task}_A", nn.Linear(in_features, rank, bias=False))
                setattr(self, f"{task}_B", nn.Linear(rank, out_features, bias=False))

    return TaskPLoRA


def _thread_infer_mode(model_cls, plora_cls):
    """Upstream hands `infer_mode` to InternLM2Model.forward only as an unused kwarg; set it on every
    PLoRA linear of the model before each forward (generate() included, it goes through here)."""
    original = model_cls.forward
    if getattr(original, "_threads_infer_mode", False):
        return

    def forward(self, *args, **kwargs):
        mode = kwargs.get("infer_mode", "base")
        if mode not in INFER_MODES:
            raise ValueError(f"infer_mode must be one of {INFER_MODES}, got {mode!r}")
        for m in self.modules():
            if isinstance(m, plora_cls):
                missing = [t for t in _TASK_LORAS_OF_MODE[mode] if t not in m.task_lora_names]
                if missing:
                    raise ValueError(f"infer_mode {mode!r} needs task LoRAs {missing}: the config has none")
                m.infer_mode = mode
        return original(self, *args, **kwargs)

    forward._threads_infer_mode = True
    model_cls.forward = forward


def decoder_fields(config: InternLMXComposer2Config) -> dict:
    """The fields of ours that the release's config.json carries (the decoder's)."""
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, bias=config.bias, rope_theta=config.rope_theta,
        rope_scaling=None if config.rope_scaling is None else {
            "type": config.rope_scaling["type"], "factor": float(config.rope_scaling["factor"])},
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, tie_word_embeddings=config.tie_word_embeddings,
        max_length=config.max_length)


def upstream_config(up: types.SimpleNamespace, config: InternLMXComposer2Config, attn_implementation="eager"):
    """The upstream config class filled from ours."""
    return up.configuration.InternLMXcomposer2Config(**decoder_fields(config),
                                                     attn_implementation=attn_implementation)


def hf_vision_config(config: InternLMXComposer2Config):
    from transformers import CLIPVisionConfig
    v = config.vision_config
    return CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                            num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                            num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
                            layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)


@contextlib.contextmanager
def _sized_for(up: types.SimpleNamespace, config: InternLMXComposer2Config):
    """While the model is constructed: the CLIP tower, the projectors and PLoRA at our config's sizes."""
    from transformers import CLIPVisionModel

    def load_model(tower):
        tower.vision_tower = CLIPVisionModel(hf_vision_config(config))
        tower.vision_tower.requires_grad_(False)
        tower.is_loaded = True

    def build_vision_projector(input_dim=4096):
        # Upstream's default input is its merged width (4 x 1024); video_mem_proj passes 1536.
        in_dim = config.vision_merged_size if input_dim == 4096 else input_dim
        return nn.Sequential(nn.Linear(in_dim, config.projector_hidden_size), nn.GELU(),
                             nn.Linear(config.projector_hidden_size, config.hidden_size))

    def plora(in_features, out_features, bias=True, lora_r=None, lora_alpha=None, lora_len=0, **kw):
        # Upstream hard-codes rank 256 / alpha 256; the rank comes from the config (weights) instead.
        return up.TaskPLoRA(in_features, out_features, bias=bias, lora_r=config.plora_rank,
                            lora_alpha=config.plora_rank * config.plora_scale, lora_len=lora_len,
                            task_lora_ranks=config.task_lora_ranks, **kw)

    with mock.patch.object(up.build_mlp.CLIPVisionTower, "load_model", load_model), \
            mock.patch.object(up.modeling_xcomposer2, "build_vision_projector", build_vision_projector), \
            mock.patch.object(up.modeling_internlm2, "PLoRA", plora):
        yield


def upstream_tokenizer(upstream_dir: str):
    """Upstream's InternLM2Tokenizer on our bundled tokenizer.model, through from_pretrained (with
    transformers 4.33 the bare constructor does not split `<s>` out of text)."""
    up = import_upstream(upstream_dir)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(TOKENIZER_FILE, os.path.join(tmp, "tokenizer.model"))
        # Names the class as the release's tokenizer_config.json does; without it transformers guesses
        # a tokenizer type from substrings of the (random) folder name and warns.
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizer_class": "InternLM2Tokenizer"}, f)
        return up.tokenization.InternLM2Tokenizer.from_pretrained(tmp)


def load_upstream(upstream_dir: str, config: InternLMXComposer2Config, seed: int = 0,
                  weights: Optional[Dict[str, np.ndarray]] = None):
    """Upstream InternLMXComposer2ForCausalLM for `config`: eager attention, eval mode, float32, CPU,
    loaded with `weights` (default: `mindxcomposer.demo.random_weights(config, seed)`), tokenizer set.

    Build a fresh model whenever dynamic-NTK state matters: upstream RoPE keeps the scaled base once
    a sequence longer than max_position_embeddings went through it."""
    up = import_upstream(upstream_dir)
    torch.manual_seed(0)  # upstream initialises before loading; keep even that reproducible
    with _sized_for(up, config):
        model = up.modeling_xcomposer2.InternLMXComposer2ForCausalLM(upstream_config(up, config))
    merged = config.vision_merged_size
    model.plora_glb_GN = nn.Parameter(torch.zeros([1, 1, merged]))
    model.plora_sub_GN = nn.Parameter(torch.zeros([1, 1, 1, merged]))

    if weights is None:
        weights = random_weights(config, seed)
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in weights.items()}
    result = model.load_state_dict(state, strict=False)
    video_mem = {k for k in model.state_dict() if k.startswith("video_mem_proj.")}
    if set(result.missing_keys) != video_mem or result.unexpected_keys:
        raise RuntimeError(f"weights do not fit the upstream model: missing "
                           f"{sorted(set(result.missing_keys) - video_mem)}, unexpected {result.unexpected_keys}")
    del model.video_mem_proj  # OmniLive-only: plain IXC2.5 has no such module
    model = model.float().eval()
    model.tokenizer = upstream_tokenizer(upstream_dir)
    return model


# ----------------------------------------------------------------------------------------------
# Checkpoints in the release layout, for the converter's tests

SAVE_FORMATS = ("safetensors", "bin", "sharded-bin")


def save_upstream_layout(model_or_weights: Union[nn.Module, Dict[str, np.ndarray]],
                         config: InternLMXComposer2Config, out_dir: str, fmt: str = "safetensors",
                         dtype: str = "float32", shards: int = 3, upstream_dir: Optional[str] = None) -> str:
    """Write a model directory as the release lays it out: `config.json` (the upstream config class's
    JSON, decoder fields only), `vision_config.json` (transformers' CLIPVisionConfig), `tokenizer.model`
    and the weights by upstream name in `fmt`:
      "safetensors" -> model.safetensors
      "bin"         -> pytorch_model.bin (a torch pickle of the state dict)
      "sharded-bin" -> pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json (as the release)
    `dtype` is "float32" or "bfloat16" (the release stores bf16). `upstream_dir` is needed to write
    config.json with the upstream class; without it the same fields are written from ours."""
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"fmt must be one of {SAVE_FORMATS}, got {fmt!r}")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if isinstance(model_or_weights, nn.Module):
        state = {k: v.detach() for k, v in model_or_weights.state_dict().items()
                 if not k.startswith("video_mem_proj.")}
    else:
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model_or_weights.items()}
    state = {k: v.to(torch_dtype).contiguous() for k, v in state.items()}
    os.makedirs(out_dir, exist_ok=True)

    cfg = _release_config_json(config, upstream_dir, dtype)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    hf_vision_config(config).to_json_file(os.path.join(out_dir, "vision_config.json"))
    shutil.copyfile(TOKENIZER_FILE, os.path.join(out_dir, "tokenizer.model"))

    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(state, os.path.join(out_dir, "pytorch_model.bin"))
    else:
        names = list(state)
        if not 1 <= shards <= len(names):
            raise ValueError(f"shards must be between 1 and {len(names)}, got {shards}")
        weight_map, total = {}, 0
        for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
            fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save({names[j]: state[names[j]] for j in part}, os.path.join(out_dir, fname))
            for j in part:
                weight_map[names[j]] = fname
                total += state[names[j]].numel() * state[names[j]].element_size()
        with open(os.path.join(out_dir, "pytorch_model.bin.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return out_dir


def _release_config_json(config: InternLMXComposer2Config, upstream_dir: Optional[str], dtype: str) -> dict:
    if upstream_dir is not None:
        d = upstream_config(import_upstream(upstream_dir), config,
                            attn_implementation="flash_attention_2").to_diff_dict()
    else:
        d = dict(decoder_fields(config), model_type="internlm2", attn_implementation="flash_attention_2")
    d["architectures"] = ["InternLMXComposer2ForCausalLM"]
    d["auto_map"] = {
        "AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
        "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
        "AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
    }
    d["torch_dtype"] = dtype
    return d
