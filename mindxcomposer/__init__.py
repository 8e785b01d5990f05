"""mindxcomposer: InternLM-XComposer-2.5 in native MindSpore cells."""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "InternLMXComposer2Config": "configuration",
    "CLIPVisionConfig": "configuration",
    "InternLMXComposer2ForCausalLM": "modeling_xcomposer2",
    "CLIPImageProcessor": "image_processing",
    "IXCImageProcessor": "image_processing",
    "InternLM2Tokenizer": "tokenization_internlm2",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Lazy, so that `import mindxcomposer` does not load MindSpore for the tokenizer or the processors.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'mindxcomposer' has no attribute {name!r}")
