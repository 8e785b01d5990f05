"""from_pretrained: upstream layout, sizes from weight shapes, clear errors for bad checkpoints."""
import json
import os
import shutil

import numpy as np
import pytest

from mindxcomposer import InternLMXComposer2Config, InternLMXComposer2ForCausalLM
from mindxcomposer.demo import random_weights, tiny_config
from mindxcomposer.vision import merged_token_count
from mindxcomposer.weights import (Checkpoint, CheckpointError, SafetensorsFile, bf16_to_fp32, fp32_to_bf16,
                                   parameter_shapes, write_safetensors)


def test_loaded_parameters_equal_checkpoint(demo_dir):
    """Every parameter equals the checkpoint; task LoRAs are resident only in the mode that needs them."""
    model = InternLMXComposer2ForCausalLM.from_pretrained(demo_dir)
    ckpt = Checkpoint(demo_dir)
    tasks = {"base": (), "web": ("lora_web",), "write": ("lora_sft", "lora_dpo")}
    for mode in ("base", "web", "write", "web", "base"):
        model.use_task_loras(mode)
        params = {p.name: p.asnumpy() for p in model.get_parameters()}
        resident = {n for n in ckpt.keys() if not any(f".{t}_" in n for t in ("lora_web", "lora_sft", "lora_dpo"))}
        resident |= {n for n in ckpt.keys() if any(f".{t}_" in n for t in tasks[mode])}
        assert set(params) == resident, mode
        for name in resident:
            np.testing.assert_array_equal(params[name], ckpt.get(name), err_msg=name)


def test_sizes_come_from_weights(demo_model):
    c = demo_model.config
    assert c.plora_rank == 8 and c.task_lora_ranks == {"lora_web": 4, "lora_sft": 4, "lora_dpo": 4}
    assert c.projector_hidden_size == 64 and c.vision_config.hidden_size == 32
    assert demo_model.tokenizer is not None


def test_release_defaults_and_token_count():
    c = InternLMXComposer2Config()
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (4096, 32, 8, 14336)
    assert c.vision_config.hidden_size == 1024 and c.vision_merged_size == 4096
    shapes = parameter_shapes(c)
    assert shapes["model.layers.0.attention.wqkv.weight"] == (6144, 4096)
    assert shapes["plora_sub_GN"] == (1, 1, 1, 4096)
    for h, w in [(1, 1), (2, 3), (4, 6), (1, 8)]:
        assert merged_token_count(h, w) == (h * w + 1) * 400 + 1 + (h + 1) * 20


def test_vision_config_key_inside_config_json(tmp_path, demo_dir):
    d = tmp_path / "m"
    shutil.copytree(demo_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_config"] = json.loads((d / "vision_config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg))
    os.remove(d / "vision_config.json")
    assert InternLMXComposer2Config.from_pretrained(str(d)).vision_config.hidden_size == 32


def _copy_with(tmp_path, demo_dir, edit):
    d = tmp_path / "m"
    shutil.copytree(demo_dir, d)
    w = random_weights(tiny_config())
    edit(w)
    write_safetensors(str(d / "model.safetensors"), w)
    return str(d)


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path, demo_dir):
    def edit(w):
        del w["model.norm.weight"]
        w["model.extra.weight"] = np.zeros(3, np.float32)
        w["output.weight"] = w["output.weight"][:, :32]
    d = _copy_with(tmp_path, demo_dir, edit)
    with pytest.raises(CheckpointError) as e:
        InternLMXComposer2ForCausalLM.from_pretrained(d)
    msg = str(e.value)
    assert "missing keys (1): model.norm.weight" in msg
    assert "unexpected keys (1): model.extra.weight" in msg
    assert "output.weight: checkpoint (92544, 32) vs model (92544, 64)" in msg


def test_truncated_and_missing_files(tmp_path, demo_dir):
    d = tmp_path / "m"
    shutil.copytree(demo_dir, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        InternLMXComposer2ForCausalLM.from_pretrained(str(d))
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        InternLMXComposer2ForCausalLM.from_pretrained(str(d))
    os.remove(f)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="mxc-convert"):
        InternLMXComposer2ForCausalLM.from_pretrained(str(d))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InternLMXComposer2ForCausalLM.from_pretrained(str(tmp_path / "nowhere"))
    os.remove(d / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        InternLMXComposer2ForCausalLM.from_pretrained(str(d))


def test_bf16_round_trip_and_reader(tmp_path):
    # 1.00390625 and 1.01171875 sit exactly halfway between two bf16 values: ties go to even
    x = np.array([1.0, -2.5, 3.14159, 1e-3, 65504.0, np.inf, -0.0, 1.00390625, 1.01171875], np.float32)
    bits = fp32_to_bf16(x)
    write_safetensors(str(tmp_path / "a.safetensors"), {"x": bits}, dtypes={"x": "BF16"})
    sf = SafetensorsFile(str(tmp_path / "a.safetensors"))
    assert sf.dtype("x") == "BF16"
    np.testing.assert_array_equal(sf.get("x"), bf16_to_fp32(bits))
    # values torch gives for x.bfloat16().float()
    np.testing.assert_array_equal(bf16_to_fp32(bits), [1.0, -2.5, 3.140625, 0.00099945068359375, 65536.0,
                                                       np.inf, -0.0, 1.0, 1.015625])


def test_reloading_weights_replaces_resident_task_loras():
    """New weights while a mode's task LoRA is resident: the old task cells go, sessions see a new version,
    and the mode brings the new values in."""
    import numpy as np
    from mindxcomposer.demo import random_weights, tiny_config
    from mindxcomposer.modeling_xcomposer2 import InternLMXComposer2ForCausalLM
    cfg = tiny_config()
    first, second = random_weights(cfg, 0), random_weights(cfg, 1)
    model = InternLMXComposer2ForCausalLM(cfg)
    model.load_state_dict(first)
    model.use_task_loras("web")
    version = model.task_version
    model.load_state_dict(second)
    assert model.resident_tasks == () and model.task_version > version
    model.use_task_loras("web")
    name = "model.layers.1.feed_forward.w2.lora_web_B.weight"
    np.testing.assert_array_equal(model.model.layers[1].feed_forward.w2.lora_web_B.weight.asnumpy(), second[name])
