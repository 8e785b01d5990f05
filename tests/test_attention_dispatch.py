"""The kernel dispatch of mindxcomposer.ops: portable attention everywhere but Ascend, and the fused
kernel's call wired as MindSpore documents it (checked with a stand-in, since no Ascend device is here)."""
import importlib

import numpy as np
import mindspore as ms
from mindspore import Tensor

# the module, not the `attention` function that mindxcomposer.ops exports under the same name
attn_mod = importlib.import_module("mindxcomposer.ops.attention")


def _inputs(seed=0, b=2, h=4, kv=2, n=5, d=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, n, d)).astype(np.float32)
    k = rng.standard_normal((b, kv, n, d)).astype(np.float32)
    v = rng.standard_normal((b, kv, n, d)).astype(np.float32)
    mask = np.where(np.tril(np.ones((n, n), bool)), 0, np.finfo(np.float32).min).astype(np.float32)
    return q, k, v, np.broadcast_to(mask, (b, 1, n, n)).copy()


def test_portable_attention_is_grouped_query_attention():
    q, k, v, mask = _inputs()
    out = attn_mod.attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), np.sqrt(8.0)).asnumpy()
    kr, vr = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)  # query head j reads kv head j // groups
    s = q @ kr.transpose(0, 1, 3, 2) / np.sqrt(8.0) + mask
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ vr
    assert np.abs(out - ref).max() < 1e-5


def test_fused_kernel_only_on_ascend_and_called_with_a_keep_out_mask(monkeypatch):
    assert ms.get_context("device_target") != "Ascend" and not attn_mod.fused_attention_available()
    calls = {}

    def fake_flash_attention_score(q, k, v, head_num, attn_mask=None, scalar_value=1.0, input_layout="BSH"):
        calls.update(head_num=head_num, mask=attn_mask.asnumpy(), scale=scalar_value, layout=input_layout)
        additive = Tensor(np.where(attn_mask.asnumpy() > 0, np.finfo(np.float32).min, 0).astype(np.float32))
        return attn_mod.portable_attention(q, k, v, additive, 1.0 / scalar_value)

    monkeypatch.setattr(ms.ops, "flash_attention_score", fake_flash_attention_score, raising=False)
    q, k, v, mask = _inputs(1)
    fused = attn_mod.attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), np.sqrt(8.0), use_fused=True)
    portable = attn_mod.attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), np.sqrt(8.0))
    assert calls["head_num"] == 4 and calls["layout"] == "BNSD"
    assert np.isclose(calls["scale"], 1 / np.sqrt(8.0))
    np.testing.assert_array_equal(calls["mask"], (mask < 0).astype(np.uint8))  # 1 = masked out
    assert np.abs(fused.asnumpy() - portable.asnumpy()).max() < 1e-6
