"""`mxc-finetune merge`: a LoRA adapter folded into its base model, written as a model directory
(upstream's `merge_peft_adapter.py`, i.e. peft's `merge_and_unload`: W + B @ A * lora_alpha / r on each
target linear). Weights keep the base checkpoint's dtype (the fold itself is computed in fp32). A quantized base
is refused (`quantized_base`)."""
from ..configuration import InternLMXComposer2Config
from ..validation import check_model_dir
from ..weights import Checkpoint
from .lora import load_adapter, merge_adapter
from .model_dir import save_model_dir
from .quantized_base import check_merge


def merge(adapter_dir: str, base_dir: str, out_dir: str) -> str:
    base_dir = check_model_dir(base_dir, None)
    config = InternLMXComposer2Config.from_pretrained(base_dir)
    check_merge(config.quantization, base_dir)
    settings, tensors = load_adapter(adapter_dir, config)
    ckpt = Checkpoint(base_dir)
    merged = merge_adapter(lambda name: ckpt.get(name), tensors, settings, config.num_hidden_layers)
    return save_model_dir(base_dir, out_dir, merged)
