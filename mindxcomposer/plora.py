"""Partial LoRA linear: `W x + B(A x)` on image tokens only, plus the release's task LoRAs.

This cell holds the parameters under upstream's names; the arithmetic is `DecoderMath.plora_linear` in
`modeling_internlm2.py`, the one implementation that the uncached forward, the prefill and the decode
step share. Upstream gathers the image rows (`x[im_mask]`), a data-dependent shape that graph mode
cannot compile: here the LoRA branch runs on every row and is multiplied by the 0/1 mask; for image
rows that is the same arithmetic as upstream, for text rows it adds exactly zero.

Task LoRAs (`lora_web_*`, `lora_sft_*`, `lora_dpo_*`) apply to all tokens, unscaled, as the release
does: infer_mode "web" adds the web LoRA, "write" adds sft then dpo. They are resident only while a
mode that needs them runs (`InternLMXComposer2ForCausalLM.use_task_loras`): `add_task` creates
and `drop_task` drops their cells.
"""
import mindspore as ms
from mindspore import nn

from .constants import TASK_LORAS
from .layers import Linear, lazy_param
from .quantization import PART_DTYPES, part_shapes

_MS_DTYPES = {"I8": ms.int8, "U8": ms.uint8, "F32": ms.float32}


class PLoRA(nn.Cell):
    def __init__(self, in_features, out_features, bias, lora_rank, lora_scale=1.0, dtype=ms.float32,
                 quantization=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.quantization = quantization  # (bits, group_size) or None (`quantization`)
        if quantization is None:
            self.weight = lazy_param((out_features, in_features), dtype, "weight")
        else:  # the stored parts in their own dtypes (int8 / uint8 codes, fp32 scales) instead of `weight`
            self.weight = None
            kinds = PART_DTYPES[quantization[0]]
            for part, shape in part_shapes(out_features, in_features, *quantization).items():
                setattr(self, part, lazy_param(shape, _MS_DTYPES[kinds[part]], part))
        self.bias = lazy_param((out_features,), dtype, "bias") if bias else None
        self.lora_scale = lora_scale
        self.Plora_A = Linear(in_features, lora_rank, bias=False, dtype=dtype)
        self.Plora_B = Linear(lora_rank, out_features, bias=False, dtype=dtype)
        for task in TASK_LORAS:
            setattr(self, f"{task}_A", None)
            setattr(self, f"{task}_B", None)

    def base_weights(self) -> tuple:
        """The stored base weight: (weight,), or its quantized parts in `quantization.PARTS` order."""
        if self.quantization is None:
            return (self.weight,)
        return tuple(getattr(self, part) for part in PART_DTYPES[self.quantization[0]])

    def add_task(self, task, rank, prefix):
        """Create the (lazy) cells of one task LoRA; their parameters get their full upstream names
        (`prefix` is this linear's name), since they are attached after the model was built."""
        a = Linear(self.in_features, rank, bias=False, dtype=self.dtype)
        b = Linear(rank, self.out_features, bias=False, dtype=self.dtype)
        setattr(self, f"{task}_A", a)
        setattr(self, f"{task}_B", b)
        a.weight.name = f"{prefix}.{task}_A.weight"  # after setattr, which gives a name relative to self
        b.weight.name = f"{prefix}.{task}_B.weight"
        return a.weight, b.weight

    def drop_task(self, task):
        setattr(self, f"{task}_A", None)
        setattr(self, f"{task}_B", None)

    def task_weights(self, task):
        a = getattr(self, f"{task}_A")
        return () if a is None else (a.weight, getattr(self, f"{task}_B").weight)
