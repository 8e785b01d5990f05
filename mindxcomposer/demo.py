"""The bundled demo model: the release architecture at toy sizes, with seeded random weights.

Its weights are random: it produces gibberish, and exists so that the pipeline, the tests and the CLIs
run anywhere without the 22 GB release. The same seeded weights are built by the reference generator
(`tools/reference/`) for the upstream PyTorch model, so golden outputs need no committed weights.
"""
import json
import os
import shutil
from typing import Dict, Optional

import numpy as np

from .configuration import InternLMXComposer2Config
from .constants import BUNDLED_TOKENIZER
from .weights import parameter_shapes, write_safetensors

TINY_CONFIG = dict(
    vocab_size=92544, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, max_length=4096,
    rope_theta=1000000.0, rope_scaling={"type": "dynamic", "factor": 2.0}, rms_norm_eps=1e-5, bias=False,
    plora_rank=8, task_lora_ranks={"lora_web": 4, "lora_sft": 4, "lora_dpo": 4},
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
)

TOKENIZER_FILE = BUNDLED_TOKENIZER  # the name scripts and tests use


def tiny_config(**overrides) -> InternLMXComposer2Config:
    d = json.loads(json.dumps(TINY_CONFIG))
    for k, v in overrides.items():
        if k == "vision_config":
            d["vision_config"].update(v)
        else:
            d[k] = v
    return InternLMXComposer2Config.from_dict(d)


def random_weights(config: InternLMXComposer2Config, seed: int = 0) -> Dict[str, np.ndarray]:
    """Seeded float32 weights by upstream name. Scales keep activations O(1) through the whole model;
    PLoRA and task-LoRA B matrices are non-zero so that every path changes the output."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in parameter_shapes(config).items():
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layrnorm.weight", "layernorm.weight")):
            w = np.float32(1.0) + np.float32(0.1) * rng.standard_normal(shape, dtype=np.float32)
        elif name.endswith("bias"):
            w = np.float32(0.02) * rng.standard_normal(shape, dtype=np.float32)
        elif name.endswith("_GN"):
            w = rng.standard_normal(shape, dtype=np.float32)
        elif name.endswith(("tok_embeddings.weight", "position_embedding.weight", "class_embedding")):
            w = rng.standard_normal(shape, dtype=np.float32)
        elif name.endswith("patch_embedding.weight"):
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(np.prod(shape[1:])))
        else:  # [out, in] linear, LoRA factors included
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(shape[-1]))
            if "lora" in name.lower():
                w *= np.float32(0.5)
        out[name] = np.asarray(w, dtype=np.float32)
    return out


def save_demo_model(path: str, config: Optional[InternLMXComposer2Config] = None, seed: int = 0) -> str:
    """Write an upstream-layout model directory (config.json, vision_config.json, model.safetensors,
    tokenizer.model) that `InternLMXComposer2ForCausalLM.from_pretrained` loads."""
    config = config or tiny_config()
    os.makedirs(path, exist_ok=True)
    d = config.to_dict()
    vision = d.pop("vision_config")
    for k in ("plora_rank", "plora_scale", "task_lora_ranks", "projector_hidden_size", "merged_task_lora"):
        d.pop(k)  # upstream's config.json does not carry them: they come from the weight shapes
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2)
    with open(os.path.join(path, "vision_config.json"), "w", encoding="utf-8") as f:
        json.dump(vision, f, indent=2)
    write_safetensors(os.path.join(path, "model.safetensors"), random_weights(config, seed),
                      metadata={"format": "pt"})
    shutil.copyfile(TOKENIZER_FILE, os.path.join(path, "tokenizer.model"))
    return path


DEMO_IMAGE = os.path.join(os.path.dirname(__file__), "assets", "demo_cat.png")


def main():
    """`python -m mindxcomposer.demo`: the whole pipeline on the demo model, image to answer."""
    import tempfile

    from .modeling_xcomposer2 import InternLMXComposer2ForCausalLM

    print("mindxcomposer demo: the IXC2.5 architecture at toy sizes with RANDOM weights, so the answer is "
          "gibberish; it shows that every stage runs.")
    with tempfile.TemporaryDirectory() as d:
        model = InternLMXComposer2ForCausalLM.from_pretrained(save_demo_model(d))
    query = "Describe this image."
    response, _ = model.chat(model.tokenizer, query, image=[DEMO_IMAGE], do_sample=False, num_beams=1,
                             max_new_tokens=24)
    print(f"image: {DEMO_IMAGE}\nquery: {query}\nresponse: {response!r}")
    print(f"decoding graphs compiled: {model.last_session.compile_count}")


if __name__ == "__main__":
    main()
