"""The release-scale memory paths: ViT micro-batches, task LoRAs resident only when needed, bf16 storage.

Parity with upstream of the fp32 paths is in test_parity_*.py; here each memory-saving path is shown to
compute exactly what the plain path computes."""
import json
import os
import shutil

import numpy as np
import pytest

import mindspore as ms

from conftest import FIXTURES, assert_close
from mindxcomposer import InternLMXComposer2Config, InternLMXComposer2ForCausalLM
from mindxcomposer.demo import TOKENIZER_FILE, random_weights
from mindxcomposer.ops import kernels_enabled
from mindxcomposer.weights import Checkpoint, fp32_to_bf16, write_safetensors

TASKS = ("lora_web", "lora_sft", "lora_dpo")


def _task_params(model):
    return sorted({t for p in model.get_parameters() for t in TASKS if f".{t}_" in p.name})


def test_vit_micro_batches_give_identical_embeddings(demo_model, mode):
    rng = np.random.default_rng(5)
    pixels = rng.standard_normal((1, 3, 1120, 1680)).astype(np.float32)  # 2x3 tiles + global view: 7 crops
    outs = {}
    try:
        for mb in (1, 2, 3, 7):
            demo_model.vit_micro_batch = mb
            outs[mb] = demo_model.img2emb(pixels)[0].asnumpy()
    finally:
        demo_model.vit_micro_batch = None
    for mb in (2, 3, 7):
        np.testing.assert_array_equal(outs[mb], outs[1], err_msg=f"micro-batch {mb} vs 1")
    with pytest.raises(ValueError, match="micro_batch"):
        demo_model.vit.encode(pixels[:, :, :560, :560], micro_batch=0)


def test_mode_switching_loads_the_right_task_lora(demo_dir, mode):
    """Switching modes back and forth on one model gives what a fresh model gives in each mode, and only
    the mode's own task LoRAs are held."""
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((1, 40, 64)).astype(np.float32)
    im = np.zeros((1, 40), bool)
    im[0, 5:25] = True
    fresh = {}
    for m in ("base", "web", "write"):
        model = InternLMXComposer2ForCausalLM.from_pretrained(demo_dir)
        assert _task_params(model) == []
        fresh[m] = model(inputs_embeds=emb, im_mask=im, infer_mode=m).logits.asnumpy()
    assert np.abs(fresh["web"] - fresh["base"]).max() > 1e-3 and np.abs(fresh["write"] - fresh["web"]).max() > 1e-3
    model = InternLMXComposer2ForCausalLM.from_pretrained(demo_dir)
    held = {"base": [], "web": ["lora_web"], "write": ["lora_dpo", "lora_sft"]}
    for m in ("web", "write", "base", "write", "web", "base"):
        got = model(inputs_embeds=emb, im_mask=im, infer_mode=m).logits.asnumpy()
        np.testing.assert_array_equal(got, fresh[m], err_msg=m)
        assert _task_params(model) == held[m], m
    # the cached decoding path switches too: generate in one mode, then another, as chat does
    for m in ("write", "web"):
        a = model.generate(inputs_embeds=emb, im_mask=im, infer_mode=m, max_new_tokens=3, do_sample=False)
        b = InternLMXComposer2ForCausalLM.from_pretrained(demo_dir).generate(
            inputs_embeds=emb, im_mask=im, infer_mode=m, max_new_tokens=3, do_sample=False)
        np.testing.assert_array_equal(a, b, err_msg=m)
        assert _task_params(model) == held[m]


# ------------------------------------------------------------------ bf16 storage at release width

with open(os.path.join(FIXTURES, "model", "cases.json"), encoding="utf-8") as f:
    RELEASE_CONFIG = json.load(f)["configs"]["release_widths"]


@pytest.fixture(scope="module")
def release_bf16_dir(tmp_path_factory):
    """Release widths (hidden 4096, 32/8 heads, 14336, PLoRA 256, ViT 1024) with 2 + 2 layers, the release vocabulary
    and a small web LoRA, stored as bf16 safetensors as the release is."""
    config = InternLMXComposer2Config.from_dict(dict(RELEASE_CONFIG, vocab_size=92544, task_lora_ranks={"lora_web": 16}))
    d = str(tmp_path_factory.mktemp("release_bf16"))
    weights = random_weights(config, seed=3)
    bits = {}
    for name in list(weights):
        bits[name] = fp32_to_bf16(weights.pop(name))
    write_safetensors(os.path.join(d, "model.safetensors"), bits, dtypes={n: "BF16" for n in bits})
    del bits
    config.save_pretrained(d)
    with open(os.path.join(d, "vision_config.json"), "w", encoding="utf-8") as f:
        json.dump(RELEASE_CONFIG["vision_config"], f)
    shutil.copy(TOKENIZER_FILE, os.path.join(d, "tokenizer.model"))
    return d


@pytest.mark.slow
def test_bf16_storage_equals_fp32_storage_at_release_width(release_bf16_dir, graph_mode):
    """A bf16 checkpoint kept in bf16 computes what the same weights widened to fp32 compute: logits of the
    uncached forward bit for bit (exact casts, same products), the output head of the prefill and the decode
    steps (one row: the bf16 kernel, another summation order) within fp32 rounding, and the same chat tokens."""
    from mindxcomposer.session import ModelSession

    bf16 = InternLMXComposer2ForCausalLM.from_pretrained(release_bf16_dir)
    assert bf16.dtype == ms.bfloat16 and bf16.compute_dtype == ms.float32
    assert {p.dtype for p in bf16.get_parameters()} == {ms.bfloat16}
    assert kernels_enabled()  # g++ is on every machine of this project: the kernel path is the one tested
    ckpt = Checkpoint(release_bf16_dir)
    name = "model.layers.1.feed_forward.w2.weight"
    np.testing.assert_array_equal(bf16.parameters_dict()[name].asnumpy().view(np.uint16), ckpt.raw(name))
    fp32 = InternLMXComposer2ForCausalLM.from_pretrained(release_bf16_dir, dtype="fp32")
    assert {p.dtype for p in fp32.get_parameters()} == {ms.float32}

    image = os.path.join(os.path.dirname(__file__), "assets", "chelsea_tiny.png")
    emb_bf16 = bf16.encode_img(image, hd_num=4).asnumpy()
    emb_fp32 = fp32.encode_img(image, hd_num=4).asnumpy()
    np.testing.assert_array_equal(emb_bf16, emb_fp32)

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1, 96, 4096)).astype(np.float32)
    im = np.zeros((1, 96), bool)
    im[0, 10:60] = True
    for mode in ("base", "web"):
        a = bf16(inputs_embeds=emb, im_mask=im, infer_mode=mode).logits.asnumpy()
        b = fp32(inputs_embeds=emb, im_mask=im, infer_mode=mode).logits.asnumpy()
        np.testing.assert_array_equal(a, b, err_msg=mode)

    steps = {}
    for name, model in (("bf16", bf16), ("fp32", fp32)):
        s = ModelSession(model, 1, 128)
        first = s.prefill(emb, im)
        steps[name] = (first, [s.step([[t]]) for t in (17, 1000, 92000)])
    for a, b in zip([steps["bf16"][0]] + steps["bf16"][1], [steps["fp32"][0]] + steps["fp32"][1]):
        assert_close(a, b, what="decode step, bf16 kernel vs fp32 MatMul")

    kw = dict(max_new_tokens=8, do_sample=False, num_beams=1)
    r_bf16 = bf16.chat(bf16.tokenizer, "Describe the image.", image=[image], hd_num=4, **kw)[0]
    r_fp32 = fp32.chat(fp32.tokenizer, "Describe the image.", image=[image], hd_num=4, **kw)[0]
    assert r_bf16 == r_fp32 and len(r_bf16) > 0


def test_sessions_of_different_modes_interleave(demo_dir):
    """The model holds one task-LoRA set at a time; a session whose set was swapped out by another
    session brings it back before it computes."""
    from mindxcomposer.session import ModelSession

    rng = np.random.default_rng(11)
    emb = rng.standard_normal((1, 30, 64)).astype(np.float32)
    im = np.zeros((1, 30), bool)
    im[0, 2:12] = True

    def run(session):
        out = [session.prefill(emb, im)]
        return out + [session.step([[t]]) for t in (7, 300)]

    fresh = {m: run(ModelSession(InternLMXComposer2ForCausalLM.from_pretrained(demo_dir), 1, 64, infer_mode=m))
             for m in ("web", "write")}
    model = InternLMXComposer2ForCausalLM.from_pretrained(demo_dir)
    web = ModelSession(model, 1, 64, infer_mode="web")
    write = ModelSession(model, 1, 64, infer_mode="write")  # swaps lora_web out for lora_sft + lora_dpo
    assert _task_params(model) == ["lora_dpo", "lora_sft"]
    for got, want in zip(run(web), fresh["web"]):
        np.testing.assert_array_equal(got, want)
    assert _task_params(model) == ["lora_web"]
    for got, want in zip(run(write), fresh["write"]):
        np.testing.assert_array_equal(got, want)


def test_bf16_decode_kernel_and_portable_path_agree(demo_dir, monkeypatch):
    """The two paths behind `mindxcomposer.ops.weight_products` give the same decode logits: the bf16
    CPU kernel (reads the stored bits) and the portable cast-then-MatMul path."""
    from mindxcomposer.ops import weight_products as dispatch
    from mindxcomposer.session import ModelSession

    model = InternLMXComposer2ForCausalLM.from_pretrained(demo_dir, dtype="bf16")
    assert model.dtype == ms.bfloat16 and kernels_enabled()
    rng = np.random.default_rng(13)
    emb = rng.standard_normal((2, 20, 64)).astype(np.float32)
    im = np.zeros((2, 20), bool)
    im[:, 3:9] = True

    def run():
        s = ModelSession(model, 2, 40, infer_mode="web")
        return [s.prefill(emb, im)] + [s.step([[t], [t + 1]]) for t in (5, 900)]

    with_kernel = run()
    monkeypatch.setattr(dispatch, "_kernels", None)
    portable = run()
    for a, b in zip(with_kernel, portable):
        assert_close(a, b, what="bf16 kernel vs portable path")
    # The two paths sum in different orders: some step differs in the last bits, which shows that the
    # portable path really ran (and not a graph compiled for the kernel).
    assert any(np.abs(a - b).max() > 0 for a, b in zip(with_kernel[1:], portable[1:]))
