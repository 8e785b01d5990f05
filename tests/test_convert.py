"""mxc-convert: every source layout converts bit-exactly, casts round like torch, task LoRAs merge, bad input
fails with a message naming file and key, and a failed or interrupted run leaves nothing at DST."""
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

from conftest import HERE

from mindxcomposer import convert as cv
from mindxcomposer.convert import ConvertError, convert, main, parse_size
from mindxcomposer.demo import TOKENIZER_FILE, random_weights, tiny_config
from mindxcomposer.weights import Checkpoint, SafetensorsFile, bf16_to_fp32, fp32_to_bf16, write_safetensors

KINDS = ("st", "st_sharded", "bin", "bin_sharded")
# st: one fp32 model.safetensors; st_sharded: bf16 in 3 shards + index; bin: one fp32 pytorch_model.bin;
# bin_sharded: 3 shards + index, norms and biases fp32, the rest bf16. In the sharded ones every task LoRA
# sits in another shard than the weight it folds into.


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    return config, random_weights(config, seed=0)


def upstream_config(config):
    d = config.to_dict()
    vision = d.pop("vision_config")
    for k in ("plora_rank", "plora_scale", "task_lora_ranks", "projector_hidden_size", "merged_task_lora"):
        d.pop(k)
    d.update(architectures=["InternLMXComposer2ForCausalLM"], model_type="internlmxcomposer2",
             torch_dtype="bfloat16", auto_map={"AutoModel": "modeling_internlm_xcomposer2.X"})
    return d, vision


def _shard_of(name):
    if name.startswith(("vit.", "vision_proj", "plora_")):
        return 0
    return 2 if "lora" in name.lower() else 1


def _source_dtype(kind, name):
    if kind in ("st", "bin"):
        return "F32"
    if kind == "bin_sharded" and (name.endswith("bias") or "norm" in name or "layrnorm" in name):
        return "F32"
    return "BF16"


def write_source(path, kind, config, weights, tokenizer=True):
    """An upstream-layout checkpoint of `kind`; returns {upstream key: (raw array, dtype code)}."""
    os.makedirs(path, exist_ok=True)
    cfg, vision = upstream_config(config)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(path, "vision_config.json"), "w") as f:
        json.dump(vision, f)
    if tokenizer:
        shutil.copyfile(TOKENIZER_FILE, os.path.join(path, "tokenizer.model"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "InternLM2Tokenizer"}, f)
    raw = {}
    for name, w in weights.items():
        dt = _source_dtype(kind, name)
        raw[name] = (fp32_to_bf16(w) if dt == "BF16" else w, dt)
    sharded = kind.endswith("sharded")
    groups = [[n for n in raw if _shard_of(n) == i] for i in range(3)] if sharded else [list(raw)]
    if kind.startswith("st"):
        fnames = ([f"model-{i + 1:05d}-of-00003.safetensors" for i in range(3)] if sharded
                  else ["model.safetensors"])
        for names, fname in zip(groups, fnames):
            write_safetensors(os.path.join(path, fname), {n: raw[n][0] for n in names},
                              metadata={"format": "pt"}, dtypes={n: raw[n][1] for n in names})
        index = "model.safetensors.index.json"
    else:
        torch = pytest.importorskip("torch", reason="torch is needed to write .bin sources")
        fnames = ([f"pytorch_model-{i + 1:05d}-of-00003.bin" for i in range(3)] if sharded
                  else ["pytorch_model.bin"])
        for names, fname in zip(groups, fnames):
            sd = {}
            for n in names:
                t = torch.from_numpy(weights[n].copy())
                sd[n] = t.to(torch.bfloat16) if raw[n][1] == "BF16" else t
                if raw[n][1] == "BF16":  # the bits torch rounded to, which the converter must keep
                    raw[n] = (sd[n].view(torch.int16).numpy().view(np.uint16).copy(), "BF16")
            torch.save(sd, os.path.join(path, fname))
        index = "pytorch_model.bin.index.json"
    if sharded:
        weight_map = {n: fname for names, fname in zip(groups, fnames) for n in names}
        with open(os.path.join(path, index), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return raw


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny):
    """Built once per kind; tests that damage a source copy it first."""
    built = {}

    def get(kind):
        if kind not in built:
            path = str(tmp_path_factory.mktemp(kind) / "src")
            built[kind] = (path, write_source(path, kind, *tiny))
        return built[kind]

    return get


def damaged_copy(sources, kind, tmp_path):
    path, raw = sources(kind)
    dst = str(tmp_path / f"{kind}_copy")
    shutil.copytree(path, dst)
    return dst, raw


def stored(dst):
    """{name: (fp32 values, dtype code)} through the reader that from_pretrained uses."""
    ckpt = Checkpoint(dst)
    dtypes = {k: sf.dtype(k) for sf in ckpt.files for k in sf.keys()}
    return {n: (ckpt.get(n, dtype=None), dtypes[n]) for n in ckpt.keys()}


def widened(raw, dt):
    return bf16_to_fp32(raw) if dt == "BF16" else raw


def assert_bits_equal(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    assert np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}")), f"{what}: bits differ"


def assert_nothing_at(dst):
    assert not os.path.lexists(dst), f"{dst} was left behind"
    parent, base = os.path.split(dst)
    leftovers = [f for f in os.listdir(parent) if f.startswith(f".{base}.")]
    assert not leftovers, f"temporary directories left beside {dst}: {leftovers}"


def expect_failure(src, dst, match, **kw):
    with pytest.raises(ConvertError, match=match) as e:
        convert(src, dst, progress_stream=io.StringIO(), **kw)
    assert_nothing_at(dst)
    return str(e.value)


def quiet(**kw):
    kw.setdefault("progress_stream", io.StringIO())
    return kw


# ----------------------------------------------------------------------------------------------
# conversions


@pytest.mark.parametrize("kind", KINDS)
def test_each_layout_converts_bit_exactly(kind, sources, tmp_path, tiny):
    src, raw = sources(kind)
    dst = str(tmp_path / "out")
    summary = convert(src, dst, shard_size="10MB", **quiet())
    out = stored(dst)
    assert set(out) == set(raw)
    for name, (arr, dt) in raw.items():
        assert out[name][1] == dt, f"{name}: dtype {out[name][1]}, source {dt}"
        assert_bits_equal(out[name][0], widened(arr, dt), name)
    assert summary.tensors == len(raw) and summary.shards >= 3

    config = json.load(open(os.path.join(dst, "config.json")))
    assert config["vision_config"]["hidden_size"] == 32
    assert config["plora_rank"] == 8 and config["task_lora_ranks"] == {"lora_web": 4, "lora_sft": 4, "lora_dpo": 4}
    assert config["merged_task_lora"] is None
    assert open(os.path.join(dst, "tokenizer.model"), "rb").read() == open(TOKENIZER_FILE, "rb").read()
    assert os.path.isfile(os.path.join(dst, "tokenizer_config.json"))

    manifest = json.load(open(os.path.join(dst, "manifest.json")))
    for f in manifest["source"]["files"]:
        digest = hashlib.sha256(open(os.path.join(src, f["name"]), "rb").read()).hexdigest()
        assert f["sha256"] == digest
    assert manifest["converter_version"] == cv.CONVERTER_VERSION and manifest["dtype"] == "source"
    for name, entry in manifest["tensors"].items():
        sf = SafetensorsFile(os.path.join(dst, entry["file"]))
        assert hashlib.sha256(sf.raw(name).tobytes()).hexdigest() == entry["sha256"], name
        assert entry["source_dtype"] == raw[name][1]


@pytest.mark.parametrize("kind", ["st", "bin"])
def test_single_file_source(kind, sources, tmp_path):
    src, raw = sources(kind)
    file = os.path.join(src, "model.safetensors" if kind == "st" else "pytorch_model.bin")
    dst = str(tmp_path / "out")
    convert(file, dst, **quiet())
    out = stored(dst)
    for name, (arr, dt) in raw.items():
        assert_bits_equal(out[name][0], widened(arr, dt), name)


def test_bf16_to_fp32_is_exact_and_fp32_to_bf16_fp16_round_like_torch(tmp_path, tiny):
    torch = pytest.importorskip("torch")
    config, weights = tiny
    weights = dict(weights)
    edge = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8),
                     np.finfo(np.float32).max, 3.3961e38, 65504.0, 65520.0, 65519.0, 1e-8, 6e-8, 2 ** -149,
                     2 ** -126, 1.00048828125, 1.00146484375, -2.5e-39], np.float32)
    norm = weights["model.norm.weight"].copy()
    norm[:len(edge)] = edge
    weights["model.norm.weight"] = norm
    src = str(tmp_path / "src")
    write_source(src, "st", config, weights)

    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        dst = str(tmp_path / dtype)
        summary = convert(src, dst, dtype=dtype, **quiet())
        if dtype == "fp16":  # inf, -inf, max fp32, 3.3961e38 and 65520 end as +-inf
            assert "5 values are +-inf in the fp16 output" in "\n".join(summary.notes)
        out = stored(dst)
        for name, w in weights.items():
            ref = torch.from_numpy(w).to(torch_dtype).float().numpy()
            got, dt = out[name]
            assert dt == cv.DTYPES[dtype]
            got = got.astype(np.float32)
            nan = np.isnan(ref)
            # torch's vectorised cast writes NaN as 0xFFFF, its scalar one as 0x7FC0: only NaN-ness is defined
            assert np.array_equal(np.isnan(got), nan), name
            assert_bits_equal(got[~nan], ref[~nan], f"{name} -> {dtype}")

    back = str(tmp_path / "back")
    convert(str(tmp_path / "bf16"), back, dtype="fp32", **quiet())
    bf16 = stored(str(tmp_path / "bf16"))
    for name, (arr, dt) in stored(back).items():
        assert dt == "F32"
        assert_bits_equal(arr, bf16[name][0], name)


def test_mindspore_writer_keeps_every_bf16_and_fp16_bit_pattern(tmp_path):
    every = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    path = str(tmp_path / "all.safetensors")
    cv._save_shard(path, {"b": every, "h": every.view(np.float16), "f": every.astype(np.float32)},
                   {"b": "BF16", "h": "F16", "f": "F32"})
    sf = SafetensorsFile(path)
    assert (sf.dtype("b"), sf.dtype("h"), sf.dtype("f")) == ("BF16", "F16", "F32")
    assert_bits_equal(sf.raw("b"), every, "bf16")
    assert_bits_equal(sf.raw("h"), every.view(np.float16), "fp16")
    assert_bits_equal(sf.raw("f"), every.astype(np.float32), "fp32")


@pytest.mark.parametrize("kind,task,dtype", [("st", "web", None), ("bin_sharded", "write", "fp32"),
                                             ("st_sharded", "web", "fp32")])
def test_merge_task_folds_loras_and_drops_them(kind, task, dtype, sources, tmp_path, tiny):
    src, raw = sources(kind)
    dst = str(tmp_path / "out")
    convert(src, dst, merge_task=task, dtype=dtype, verify=True, **quiet())
    out = stored(dst)
    task_keys = {n for n in raw if any(f".{t}_" in n for t in ("lora_web", "lora_sft", "lora_dpo"))}
    assert len(task_keys) == 2 * 5 * 3 * 2
    assert set(out) == set(raw) - task_keys
    parts = {"web": ["lora_web"], "write": ["lora_sft", "lora_dpo"]}[task]
    merged = 0
    for name in out:
        values = widened(*raw[name]).astype(np.float64)
        if name.startswith("model.layers.") and name.endswith(("wqkv.weight", "wo.weight", "w1.weight",
                                                               "w2.weight", "w3.weight")):
            base = name[:-len(".weight")]
            for t in parts:
                values = values + (widened(*raw[f"{base}.{t}_B.weight"]).astype(np.float64)
                                   @ widened(*raw[f"{base}.{t}_A.weight"]).astype(np.float64))
            merged += 1
        got = out[name][0].astype(np.float64)
        tol = 1e-6 * max(1.0, float(np.abs(values).max()))
        assert float(np.abs(got - values).max()) <= tol, name
    assert merged == 2 * 5
    config = json.load(open(os.path.join(dst, "config.json")))
    assert config["merged_task_lora"] == task and config["task_lora_ranks"] == {}
    manifest = json.load(open(os.path.join(dst, "manifest.json")))
    assert manifest["merged_task_lora"] == task and set(manifest["dropped_task_lora_keys"]) == task_keys


def test_verify_passes_and_tokenizer_is_bundled_when_absent(tmp_path, tiny):
    src = str(tmp_path / "src")
    write_source(src, "st", *tiny, tokenizer=False)
    dst = str(tmp_path / "out")
    summary = convert(src, dst, dtype="bf16", verify=True, **quiet())
    assert summary.verified
    assert any("bundled" in n for n in summary.notes)
    assert open(os.path.join(dst, "tokenizer.model"), "rb").read() == open(TOKENIZER_FILE, "rb").read()


# ----------------------------------------------------------------------------------------------
# against the model (needs mindxcomposer.modeling_xcomposer2)


def _model_class():
    try:
        from mindxcomposer import InternLMXComposer2ForCausalLM
    except ImportError as e:
        pytest.skip(f"mindxcomposer.modeling_xcomposer2 is not importable yet: {e}")
    return InternLMXComposer2ForCausalLM


def _params(model):
    return {p.name: p.asnumpy() for p in model.get_parameters()}


@pytest.mark.parametrize("kind", ["st", "bin"])
def test_from_pretrained_loads_the_output_as_the_source(kind, sources, tmp_path):
    cls = _model_class()
    src, _ = sources(kind)
    dst = str(tmp_path / "out")
    convert(src, dst, **quiet())
    direct = _params(cls.from_pretrained(sources("st")[0]))
    converted = _params(cls.from_pretrained(dst))
    assert set(converted) == set(direct)
    for name, arr in direct.items():
        np.testing.assert_array_equal(converted[name], arr, err_msg=name)


@pytest.mark.parametrize("task", ["web", "write"])
def test_merged_model_in_base_mode_equals_unmerged_in_task_mode(task, sources, tmp_path):
    cls = _model_class()
    src, _ = sources("st")
    dst = str(tmp_path / "merged")
    convert(src, dst, merge_task=task, **quiet())
    merged = cls.from_pretrained(dst)
    assert merged.config.merged_task_lora == task and merged.config.task_lora_ranks == {}
    ids = np.array([[1, 333, 4444, 92000, 17, 2]], np.int64)
    ref = cls.from_pretrained(src)(input_ids=ids, infer_mode=task).logits.asnumpy()
    got = merged(input_ids=ids, infer_mode="base").logits.asnumpy()
    plain = cls.from_pretrained(src)(input_ids=ids, infer_mode="base").logits.asnumpy()
    scale = max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(got - ref).max()) <= 1e-5 * scale
    assert float(np.abs(plain - ref).max()) > 1e-3 * scale  # the task LoRA does change the logits


# ----------------------------------------------------------------------------------------------
# failures: a clear message, and nothing at DST


def _edit_config(path, **changes):
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    cfg.update(changes)
    json.dump(cfg, open(cfg_file, "w"))


def test_unknown_architecture_model_type_and_bad_config(sources, tmp_path):
    src, _ = damaged_copy(sources, "st", tmp_path)
    dst = str(tmp_path / "out")
    _edit_config(src, architectures=["LlamaForCausalLM"])
    expect_failure(src, dst, r"config\.json: architectures \['LlamaForCausalLM'\] is not InternLMXComposer2")
    _edit_config(src, architectures=["InternLMXComposer2ForCausalLM"], model_type="llama")
    expect_failure(src, dst, r"model_type 'llama' is not an InternLM-XComposer2 model")
    _edit_config(src, model_type="internlmxcomposer2", num_key_value_heads=3)
    expect_failure(src, dst, r"config\.json .*not a usable IXC2\.5 config: num_attention_heads 4 is not divisible")
    open(os.path.join(src, "config.json"), "w").write("{not json")
    expect_failure(src, dst, r"config\.json is not valid JSON")
    os.remove(os.path.join(src, "config.json"))
    expect_failure(src, dst, r"no config\.json in .*: the upstream config must sit beside the weights")


def test_missing_vision_config_is_explained(sources, tmp_path):
    src, _ = damaged_copy(sources, "st", tmp_path)
    os.remove(os.path.join(src, "vision_config.json"))
    msg = expect_failure(src, str(tmp_path / "out"), r"shape mismatches")
    assert "vit.vision_tower.vision_model.embeddings.class_embedding" in msg
    assert "release's CLIP ViT-L/14-560 was assumed" in msg


@pytest.mark.parametrize("kind", ["st_sharded", "bin_sharded"])
def test_missing_shard_named_by_index(kind, sources, tmp_path):
    src, _ = damaged_copy(sources, kind, tmp_path)
    shard = sorted(f for f in os.listdir(src) if f.endswith((".bin", ".safetensors")))[1]
    os.remove(os.path.join(src, shard))
    expect_failure(src, str(tmp_path / "out"), rf"index\.json names shard\(s\) that are not in .*\['{shard}'\]")


@pytest.mark.parametrize("kind", ["st_sharded", "bin_sharded"])
def test_truncated_and_corrupt_shards(kind, sources, tmp_path):
    src, _ = damaged_copy(sources, kind, tmp_path)
    dst = str(tmp_path / "out")
    shard = os.path.join(src, sorted(f for f in os.listdir(src) if f.endswith((".bin", ".safetensors")))[1])
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    which = "runs past the end of the file" if kind.startswith("st") else "cannot be read as a PyTorch checkpoint"
    msg = expect_failure(src, dst, which)
    assert shard in msg
    open(shard, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage: here" + data[24:4096])
    msg = expect_failure(src, dst, "corrupt safetensors header" if kind.startswith("st") else "truncated or corrupt")
    assert shard in msg


def test_index_that_disagrees_with_its_shards(sources, tmp_path):
    src, _ = damaged_copy(sources, "st_sharded", tmp_path)
    index = os.path.join(src, "model.safetensors.index.json")
    d = json.load(open(index))
    d["weight_map"]["model.layers.9.attention.wo.weight"] = "model-00002-of-00003.safetensors"
    json.dump(d, open(index, "w"))
    expect_failure(src, str(tmp_path / "out"),
                   r"lists 1 key\(s\) that their shard does not hold .*model\.layers\.9\.attention\.wo\.weight")
    del d["weight_map"]["model.layers.9.attention.wo.weight"]
    d["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    json.dump(d, open(index, "w"))
    expect_failure(src, str(tmp_path / "out"), r"model-00002-of-00003\.safetensors: holds key 'model\.norm\.weight', "
                                               r"which .* places in model-00001-of-00003\.safetensors")


@pytest.mark.parametrize("kind", ["st", "bin_sharded"])
def test_missing_unexpected_and_misshapen_keys(kind, sources, tmp_path, tiny):
    config, weights = tiny
    dst = str(tmp_path / "out")
    w = dict(weights)
    del w["model.layers.1.feed_forward.w2.Plora_B.weight"]
    w["model.layers.0.attention.extra.weight"] = np.zeros((3, 3), np.float32)
    w["model.norm.weight"] = np.ones(65, np.float32)
    src = str(tmp_path / "src")
    write_source(src, kind, config, w)
    msg = expect_failure(src, dst, r"does not fit the model")
    assert "missing keys (1): model.layers.1.feed_forward.w2.Plora_B.weight" in msg
    assert "unexpected keys (1): model.layers.0.attention.extra.weight" in msg
    assert "model.norm.weight: checkpoint (65,) vs model (64,)" in msg
    holder = "model.safetensors" if kind == "st" else "pytorch_model-00002-of-00003.bin"
    assert f"model.norm.weight in {holder}" in msg and f"model.layers.0.attention.extra.weight in {holder}" in msg


def test_unsupported_dtype_is_named(tmp_path, tiny):
    config, weights = tiny
    src = str(tmp_path / "src")
    write_source(src, "st", config, weights)
    w = dict(weights)
    w["model.norm.weight"] = w["model.norm.weight"].astype(np.float64)
    write_safetensors(os.path.join(src, "model.safetensors"), w)
    expect_failure(src, str(tmp_path / "out"), r"model\.safetensors: tensor 'model\.norm\.weight' has dtype F64")


def test_merge_task_without_task_loras(tmp_path, tiny):
    config = tiny_config(task_lora_ranks={})
    src = str(tmp_path / "src")
    write_source(src, "st", config, random_weights(config, seed=0))
    expect_failure(src, str(tmp_path / "out"), r"--merge-task web needs \['lora_web'\] tensors", merge_task="web")


def test_existing_destination_needs_force_and_never_the_source(sources, tmp_path):
    src, raw = sources("st")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(ConvertError, match="already exists; pass --force"):
        convert(src, str(dst), **quiet())
    assert (dst / "old.txt").read_text() == "old"
    convert(src, str(dst), force=True, **quiet())
    assert not (dst / "old.txt").exists() and set(stored(str(dst))) == set(raw)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".out.")] == []
    with pytest.raises(ConvertError, match="holds the source"):
        convert(src, os.path.dirname(src), force=True, **quiet())
    assert os.path.isfile(os.path.join(src, "model.safetensors"))


def test_ctrl_c_while_writing_leaves_nothing(sources, tmp_path, monkeypatch):
    src, _ = sources("st")
    dst = str(tmp_path / "out")
    real, calls = cv._save_shard, []

    def interrupted(path, arrays, dtypes):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, arrays, dtypes)

    monkeypatch.setattr(cv, "_save_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, shard_size="10MB", **quiet())
    assert not os.path.exists(calls[0])
    assert_nothing_at(dst)
    calls.clear()
    assert main([src, dst, "--shard-size", "10MB"]) == 130
    assert_nothing_at(dst)


def test_interrupt_or_error_removes_the_folders_it_created(sources, tmp_path, monkeypatch):
    src, _ = sources("st")
    dst = str(tmp_path / "new" / "deeper" / "out")

    def interrupted(path, arrays, dtypes):
        raise KeyboardInterrupt

    monkeypatch.setattr(cv, "_save_shard", interrupted)
    assert main([src, dst]) == 130
    assert os.listdir(tmp_path) == [], "the parents mxc-convert created must go too"
    (tmp_path / "new").mkdir()  # a folder that existed before stays
    monkeypatch.setattr(cv, "_save_shard", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    assert main([src, dst]) == 1
    assert os.listdir(tmp_path) == ["new"] and os.listdir(tmp_path / "new") == []


def test_destination_under_a_file_is_a_clear_error(sources, tmp_path, capsys):
    src, _ = sources("st")
    (tmp_path / "plain").write_text("x")
    assert main([src, str(tmp_path / "plain" / "sub" / "out")]) == 1
    err = capsys.readouterr().err
    assert "mxc-convert: error: cannot create" in err and "plain is a file, not a directory" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind,module,extension", [("st", "mindspore", "mindspore._c_expression"),
                                                    ("bin", "torch", "torch._C")])
def test_ctrl_c_during_a_framework_import_exits_130_and_leaves_nothing(sources, tmp_path, kind, module, extension):
    """The signal arrives while `import mindspore` (or torch, for .bin sources) runs: the import must complete
    (a KeyboardInterrupt inside MindSpore's C++ initialisation gives "ImportError: initialization failed" or
    aborts the interpreter), then the command exits 130 and removes what it created."""
    src, _ = sources(kind)
    dst = str(tmp_path / "a" / "b" / "out")
    script = (
        "import atexit, os, signal, sys\n"
        "class SendCtrlC:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {module!r}:\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, SendCtrlC())\n"
        f"atexit.register(lambda: print('imported', {extension!r} in sys.modules, file=sys.stderr))\n"
        "from mindxcomposer.convert_cli import main as convert_main\n"
        f"sys.exit(convert_main([{src!r}, {dst!r}]))\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert r.returncode == 130, r.stderr
    assert "mxc-convert: interrupted" in r.stderr and "Traceback" not in r.stderr
    assert "imported True" in r.stderr  # the import was not cut short
    assert os.listdir(tmp_path) == []


def test_a_converted_directory_is_readable_as_the_umask_allows(sources, tmp_path):
    """Every file (MindSpore writes its shards 0400) and folder has the mode the umask gives: 0644 / 0755
    by default, so a teammate can read the model on a shared disk."""
    src, _ = sources("st_sharded")
    for mask in (0o022, 0o027):
        dst = str(tmp_path / f"out{mask:o}" / "model")
        old = os.umask(mask)
        try:
            convert(src, dst, shard_size="20MB", **quiet())
        finally:
            os.umask(old)
        shards = [f for f in os.listdir(dst) if f.endswith(".safetensors")]
        assert len(shards) > 1
        for folder in (dst, os.path.dirname(dst)):
            assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~mask, folder
        for f in os.listdir(dst):
            assert stat.S_IMODE(os.stat(os.path.join(dst, f)).st_mode) == 0o666 & ~mask, f


def test_a_conversion_prints_no_deprecation_warning(sources, tmp_path):
    """mxc-convert as a user runs it (its own process: MindSpore's logger writes to the stderr it started
    with), a bf16 source written as bf16: nothing on stderr says deprecated."""
    src, _ = sources("st")
    dst = str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "mindxcomposer.convert_cli", src,
                        dst, "--dtype", "bf16", "--verify"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "deprecated" not in (r.stdout + r.stderr).lower(), r.stderr


def test_verify_catches_a_corrupted_write(sources, tmp_path, monkeypatch):
    src, _ = sources("st")
    dst = str(tmp_path / "out")
    real = cv._save_shard

    def flips_a_bit(path, arrays, dtypes):
        if "model.norm.weight" in arrays:
            arrays = dict(arrays)
            bad = arrays["model.norm.weight"].copy()
            bad.view(np.uint32)[0] ^= 1
            arrays["model.norm.weight"] = bad
        real(path, arrays, dtypes)

    monkeypatch.setattr(cv, "_save_shard", flips_a_bit)
    expect_failure(src, dst, r"verification failed: model\.norm\.weight in model-00001-of-00001\.safetensors .* "
                             r"differs from the source 'model\.norm\.weight' in model\.safetensors", verify=True)
    convert(src, dst, **quiet())  # without --verify the damage would have gone unnoticed
    assert os.path.isdir(dst)


def test_bin_source_without_torch_says_how_to_install(sources, tmp_path, monkeypatch):
    bin_src, _ = sources("bin_sharded")
    st_src, raw = sources("st_sharded")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    expect_failure(bin_src, str(tmp_path / "a"), r'pip install "mindxcomposer\[convert\]"')
    convert(st_src, str(tmp_path / "b"), **quiet())  # safetensors sources never import torch
    assert set(stored(str(tmp_path / "b"))) == set(raw)


# ----------------------------------------------------------------------------------------------
# command line


def test_command_line(sources, tmp_path, capsys):
    src, raw = sources("st_sharded")
    dst = str(tmp_path / "out")
    assert main([src, dst, "--dtype", "fp32", "--shard-size", "20MB", "--verify"]) == 0
    captured = capsys.readouterr()
    assert f"converted {len(raw)} tensors" in captured.out and dst in captured.out
    assert "[1/" in captured.err and "model-00001-of-" in captured.err  # one progress line per shard
    assert all(dt == "F32" for _, dt in stored(dst).values())
    assert main([src, dst]) == 1
    assert "mxc-convert: error: destination" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([src, dst, "--dtype", "int8"])


def test_parse_size():
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("512MiB") == 512 * 2 ** 20
    assert parse_size("1.5gb") == 1_500_000_000 and parse_size("1000") == 1000 and parse_size(7) == 7
    for bad in ("5 parsecs", "-1GB", "0", ""):
        with pytest.raises(ValueError):
            parse_size(bad)
