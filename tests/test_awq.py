"""Upstream's 4-bit release layout (lmdeploy AWQ: `internlm/internlm-xcomposer2d5-7b-4bit`) read by mxc-convert.

The fixture (tests/fixtures/awq, `tools/reference/make_awq_fixtures.py`) holds what lmdeploy's own writer
packed for the tiny model's decoder linears, and what lmdeploy's own reader unpacks from it (layer 0)."""
import json
import os

import numpy as np
import pytest

from conftest import FIXTURES, assert_close
from mindxcomposer import awq, quantization as qz
from mindxcomposer.convert import ConvertError, convert
from mindxcomposer.demo import DEMO_IMAGE, TOKENIZER_FILE, random_weights, tiny_config
from mindxcomposer.constants import LINEARS as PLORA_LINEARS
from mindxcomposer.weights import Checkpoint, fp32_to_bf16, write_safetensors
from model_helpers import dequantized_twin, quiet

AWQ = os.path.join(FIXTURES, "awq")


def _meta():
    with open(os.path.join(AWQ, "meta.json")) as f:
        return json.load(f)


def write_awq_source(path, fp16=True):
    """The tiny model in the layout of the 4-bit release: lmdeploy's packed base linears, the rest in fp16."""
    import shutil

    os.makedirs(path)
    config = tiny_config()
    d = config.to_dict()
    vision = d.pop("vision_config")
    for k in ("plora_rank", "plora_scale", "task_lora_ranks", "projector_hidden_size", "merged_task_lora",
              "quantization_config"):
        d.pop(k)
    d.update(torch_dtype="float16", quantization_config=_meta()["quantization_config"])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    with open(os.path.join(path, "vision_config.json"), "w") as f:
        json.dump(vision, f)
    shutil.copyfile(TOKENIZER_FILE, os.path.join(path, "tokenizer.model"))
    packed = np.load(os.path.join(AWQ, "tiny_awq.npz"))
    tensors, dtypes = {}, {}
    for name, w in random_weights(config, 0).items():
        base = name[: -len(".weight")]
        if name.endswith(".weight") and base.split(".", 3)[-1] in PLORA_LINEARS and base.startswith("model.layers."):
            for part in awq.PARTS:
                tensors[f"{base}.{part}"] = packed[f"{base}.{part}"]
            continue
        tensors[name] = w.astype(np.float16) if fp16 else fp32_to_bf16(w)
        if not fp16:
            dtypes[name] = "BF16"
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, metadata={"format": "pt"}, dtypes=dtypes)
    return path, packed


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq")
    src, packed = write_awq_source(str(root / "src"))
    dst = str(root / "ours")
    convert(src, dst, **quiet())
    return src, dst, packed, str(root)


def test_unpacking_equals_lmdeploys_reader(converted):
    """Our int4 parts hold, for every linear of layer 0, the integers and zero points lmdeploy's own reader
    unpacks (`unpack_awq`), transposed to [out, in], and the scales widened exactly."""
    _, dst, packed, _ = converted
    ckpt = Checkpoint(dst)
    with open(os.path.join(dst, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"]) == ("mindxcomposer", 4, _meta()["group_size"])
    for name in PLORA_LINEARS:
        base = f"model.layers.0.{name}"
        iw, iz = packed[base + ".iweight"], packed[base + ".izeros"]
        np.testing.assert_array_equal(qz.unpack_int4(ckpt.raw(base + ".qweight"), iw.shape[0]), iw.T)
        np.testing.assert_array_equal(ckpt.raw(base + ".qzeros"), iz.T)
        np.testing.assert_array_equal(ckpt.raw(base + ".scales"), packed[base + ".scales"].astype(np.float32).T)
        np.testing.assert_array_equal(awq.unpack(packed[base + ".qweight"]), iw)


def test_dequantized_weights_are_the_quantized_originals(converted):
    """Orientation and order: every dequantized weight is within half a step of the weight lmdeploy quantized
    (its fp16 value), in every layer; a transposed or reordered read would be off by several steps."""
    _, dst, _, _ = converted
    ckpt, gs = Checkpoint(dst), _meta()["group_size"]
    for name, w in random_weights(tiny_config(), 0).items():
        base = name[: -len("weight")]
        if base + "qweight" not in ckpt.keys():
            continue
        parts = {p: ckpt.raw(base + p) for p in qz.PARTS[4]}
        deq = qz.dequantize(parts, 4, gs, w.shape[1])
        step = np.repeat(parts["scales"], gs, axis=1)
        w16 = w.astype(np.float16).astype(np.float32)
        # round to nearest: half a step, plus lmdeploy's fp16 arithmetic (w / scale rounded to fp16 before
        # rounding to an integer: up to 0.51 step measured)
        assert float((np.abs(deq - w16) / step).max()) <= 0.52, name


def test_the_converted_release_layout_chats_and_equals_its_twin(converted, graph_mode):
    from mindxcomposer import InternLMXComposer2ForCausalLM as M

    _, dst, _, root = converted
    twin_dir = dequantized_twin(dst, os.path.join(root, "twin"))
    q, twin = M.from_pretrained(dst), M.from_pretrained(twin_dir)
    ids = np.array([[1, 333, 4444, 92000, 17, 2]], np.int64)
    for mode in ("base", "web", "write"):
        assert_close(q(input_ids=ids, infer_mode=mode).logits.asnumpy(),
                     twin(input_ids=ids, infer_mode=mode).logits.asnumpy(), 1e-5, f"awq {mode}")
    a, _ = q.chat(q.tokenizer, "Describe this image.", image=[DEMO_IMAGE], max_new_tokens=10, do_sample=False)
    b, _ = twin.chat(twin.tokenizer, "Describe this image.", image=[DEMO_IMAGE], max_new_tokens=10, do_sample=False)
    assert a == b


def test_awq_source_refusals(converted, tmp_path):
    src, _, _, _ = converted
    with pytest.raises(ConvertError, match="already quantized"):
        convert(src, str(tmp_path / "a"), **quiet(quantize="int8"))
    with pytest.raises(ConvertError, match="cannot be merged"):
        convert(src, str(tmp_path / "b"), **quiet(merge_task="web"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    bad = tmp_path / "bad"
    os.makedirs(bad)
    for fname in os.listdir(src):
        if fname != "config.json":
            os.symlink(os.path.join(src, fname), bad / fname)
    cfg["quantization_config"]["bits"] = 8
    with open(bad / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConvertError, match="only AWQ 4-bit"):
        convert(str(bad), str(tmp_path / "c"), **quiet())
    assert not any(os.path.exists(tmp_path / x) for x in "abc")
