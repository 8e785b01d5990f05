"""Fine-tuning over a quantized base (`mxc-convert --quantize int8|int4`): what is allowed and what is not.

- LoRA (`--use_lora True`) trains over the frozen quantized base, as QLoRA does: the adapter (fp32), the image
  separators and the optimizer state train; the base linears' gradient is their input's alone, dy W with W
  dequantized tile by tile (`ops.weight_products.linear_int8` / `linear_int4`). The losses and adapter gradients
  are those of LoRA over the dequantized model stored in fp32.
- Full fine-tuning would train the quantized linears themselves: integers, scales and zero points have no
  gradient step. Refused before anything is loaded; fine-tune the unquantized checkpoint instead.
- Merging an adapter into a quantized base (`mxc-finetune merge`) is refused too: W + B A * scaling is a new
  weight that would have to be quantized again, and at int4 the round trip gives back a large share of what the
  adapter learned (its update is typically small against a quantization step), silently. Merge into the
  unquantized checkpoint the quantized one was converted from, then quantize the merged model
  (`mxc-convert MERGED OUT --quantize ...`); see docs/finetune.md.
"""
from typing import Optional, Tuple


class QuantizedBaseError(ValueError):
    """Something that would change the weights of a quantized base model."""


def describe(quantization: Tuple[int, int]) -> str:
    bits, group_size = quantization
    return "int8 per output channel" if bits == 8 else f"int4, groups of {group_size}"


def check_training(quantization: Optional[Tuple[int, int]], use_lora: bool, model_dir: str) -> None:
    """A quantized base trains only under a LoRA adapter (frozen)."""
    if quantization is not None and not use_lora:
        raise QuantizedBaseError(
            f"--model_name_or_path {model_dir} stores the decoder's linears quantized ({describe(quantization)}): "
            "full fine-tuning (--use_lora False) would train them, and quantized weights cannot be trained. "
            "Train a LoRA adapter over the frozen quantized base (--use_lora True), or fully fine-tune the "
            "checkpoint converted without --quantize")


def check_merge(quantization: Optional[Tuple[int, int]], base_dir: str) -> None:
    """An adapter is not merged into a quantized base (see the module docstring)."""
    if quantization is not None:
        raise QuantizedBaseError(
            f"--base_model_name {base_dir} is quantized ({describe(quantization)}): merging would quantize W + "
            "B A * scaling again and lose much of the adapter's update to rounding. Merge into the unquantized "
            "checkpoint it was converted from, then quantize the merged model with `mxc-convert MERGED OUT "
            "--quantize ...`")
