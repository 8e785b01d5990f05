"""Partial LoRA linear: `W x + B(A x)` on image tokens only, plus the release's task LoRAs.

Upstream gathers the image rows (`x[im_mask]`), a data-dependent shape that graph mode cannot compile.
Here the LoRA branch runs on every row and is multiplied by the 0/1 mask: for image rows that is the
same arithmetic as upstream, for text rows it adds exactly zero.

Task LoRAs (`lora_web_*`, `lora_sft_*`, `lora_dpo_*`) apply to all tokens, unscaled, as the release
does: infer_mode "web" adds the web LoRA, "write" adds sft then dpo. Absent ones are skipped.
"""
import mindspore as ms
from mindspore import nn

from .layers import Linear, lazy_param, _matmul_t

INFER_MODES = ("base", "web", "write")


class PLoRA(nn.Cell):
    def __init__(self, in_features, out_features, bias, lora_rank, lora_scale=1.0, task_ranks=None,
                 dtype=ms.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = lazy_param((out_features, in_features), dtype, "weight")
        self.bias = lazy_param((out_features,), dtype, "bias") if bias else None
        self.lora_scale = lora_scale
        self.Plora_A = Linear(in_features, lora_rank, bias=False, dtype=dtype)
        self.Plora_B = Linear(lora_rank, out_features, bias=False, dtype=dtype)
        task_ranks = task_ranks or {}
        for task in ("lora_web", "lora_sft", "lora_dpo"):
            r = task_ranks.get(task)
            setattr(self, f"{task}_A", Linear(in_features, r, bias=False, dtype=dtype) if r else None)
            setattr(self, f"{task}_B", Linear(r, out_features, bias=False, dtype=dtype) if r else None)

    def construct(self, x, im_mask, infer_mode="base"):
        """x [B, L, in]; im_mask [B, L, 1] of x's dtype, 1.0 on image tokens."""
        lead = x.shape[:-1]
        res = _matmul_t(x.reshape(-1, self.in_features), self.weight).reshape(lead + (self.out_features,))
        if self.bias is not None:
            res = res + self.bias
        if infer_mode == "web":
            if self.lora_web_A is not None:
                res = res + self.lora_web_B(self.lora_web_A(x))
        elif infer_mode == "write":
            if self.lora_sft_A is not None:
                res = res + self.lora_sft_B(self.lora_sft_A(x))
            if self.lora_dpo_A is not None:
                res = res + self.lora_dpo_B(self.lora_dpo_A(x))
        lora = self.Plora_B(self.Plora_A(x)) * self.lora_scale
        return res + lora * im_mask
