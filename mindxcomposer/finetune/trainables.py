"""What trains, as upstream's `finetune.py` sets it up, and the weight-decay groups of the Trainer.

- `--use_lora`: a new LoRA adapter on the target linears trains, and so do `plora_glb_GN` /
  `plora_sub_GN`: peft 0.8.2's `get_peft_model` freezes every parameter whose name lacks "lora_"
  (the ViT and projector whatever `--fix_vit` / `--fix_sampler` say), and the separators' names have
  it; upstream's `finetune.py` froze only the decoder before. Upstream then saves the adapter without
  them (peft keeps names with the adapter name), losing what they learned; here they are saved in the
  adapter file under peft's names (`base_model.model.plora_glb_GN`), which peft's loader also reads.
- full fine-tuning: the whole decoder (embeddings, layers with their Partial LoRA, norm, output head),
  `plora_glb_GN` / `plora_sub_GN`, the projector unless `--fix_sampler`, the ViT unless `--fix_vit`
  (without `post_layernorm`, which upstream replaces by an Identity as IXC reads the hidden state
  before it). Task LoRAs are not part of the base-mode forward: they get no gradient and stay as loaded.

Weight decay as transformers 4.33's Trainer: every parameter except biases and those of
`nn.LayerNorm` modules (the ViT's norms); InternLM2's RMSNorm is not one of transformers'
`ALL_LAYERNORM_LAYERS`, so its weights decay, as upstream.
"""
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from ..constants import LINEARS, TASK_LORAS
from ..weights import LazyArrays
from .lora import SEPARATORS, LoraSettings, adapter_name

_LAYERNORM_PARTS = (".layer_norm1.", ".layer_norm2.", ".pre_layrnorm.", ".post_layernorm.")


def decays(name: str) -> bool:
    return "bias" not in name and not any(part in name for part in _LAYERNORM_PARTS)


@dataclass
class Trainables:
    """The trained tensors by name (peft names for an adapter, upstream names otherwise), in a fixed
    order. Full fine-tuning trains the model's own Parameters in place; an adapter's live here."""
    params: Dict[str, Parameter]
    lora: LoraSettings = None
    names: List[str] = field(default_factory=list)

    def __post_init__(self):
        self.names = list(self.params)
        self._key_of = {id(p): k for k, p in self.params.items()}

    def key(self, param):
        """The trained name of one of the model's (or the adapter's) Parameters, None if it does not train."""
        return self._key_of.get(id(param))

    @property
    def is_lora(self) -> bool:
        return self.lora is not None

    def decay_mask(self) -> List[bool]:
        return [decays(n) for n in self.names]

    def numpy(self) -> Dict[str, np.ndarray]:
        return {n: p.asnumpy().astype(np.float32) for n, p in self.params.items()}

    def arrays(self) -> LazyArrays:
        """The trained tensors as fp32 arrays made one at a time when read (for writing them out)."""
        return LazyArrays(self.params, lambda n: self.params[n].asnumpy().astype(np.float32, copy=False),
                          lambda n: (tuple(self.params[n].shape), np.float32))

    def assign(self, values: Dict[str, np.ndarray]) -> None:
        for n, v in values.items():
            p = self.params[n]
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{n}: shape {tuple(v.shape)} does not match {tuple(p.shape)}")
            ops.assign(p, Tensor(np.asarray(v, np.float32)).astype(p.dtype))


def full_trainables(model, fix_vit: bool, fix_sampler: bool) -> Trainables:
    params = {}
    for _, p in model.parameters_and_names():
        name = p.name
        if name.startswith("vit."):
            if fix_vit or ".post_layernorm." in name:
                continue
        elif name.startswith("vision_proj.") and fix_sampler:
            continue
        elif any(f".{t}_" in name for t in TASK_LORAS):
            continue
        if p.dtype != ms.float32:
            raise ValueError(f"full fine-tuning trains fp32 master weights; {name} is {p.dtype}: load the model "
                             "with dtype='fp32'")
        params[name] = p
    return Trainables(params)


def lora_trainables(model, settings: LoraSettings, initial: Dict[str, np.ndarray]) -> Trainables:
    """Adapter Parameters (fp32) for every layer and target, from `initial` (peft names), and the
    model's two separators (see the module docstring), named with peft's prefix; `initial` may hold
    them (an adapter written here), else the model's values are the start."""
    params = {}
    for key in SEPARATORS:
        gn = key.rsplit(".", 1)[1]
        p = getattr(model, gn)
        if key in initial:
            ops.assign(p, Tensor(np.asarray(initial[key], np.float32)).astype(p.dtype))
        if p.dtype != ms.float32:  # a bf16 base: the separators train in fp32 (the merge reads them as fp32)
            p = Parameter(p.astype(ms.float32), name=gn)
            setattr(model, gn, p)
        params[key] = p
    for layer in range(model.config.num_hidden_layers):
        for lin, target in zip(LINEARS, settings.targets):
            if not target:
                continue
            for part in ("A", "B"):
                name = adapter_name(layer, lin, part)
                params[name] = Parameter(Tensor(np.asarray(initial[name], np.float32)), name=name, requires_grad=True)
    return Trainables(params, settings)
