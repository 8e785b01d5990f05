"""lmdeploy's AWQ 4-bit layout (that of `internlm/internlm-xcomposer2d5-7b-4bit`) on the tiny model:
tests/fixtures/awq/.

    /work/venv-ref/bin/python tools/reference/make_awq_fixtures.py --lmdeploy-git /path/to/lmdeploy/.git \
        --out tests/fixtures [--writer-rev v0.5.3] [--reader-rev HEAD]

The decoder's base linears of the tiny model (`mindxcomposer.demo.random_weights(tiny_config(), seed 0)`, in
fp16 as lmdeploy quantizes a model) go through lmdeploy's own code, read from its git history at run time and
never copied into this repository:

- writer (`--writer-rev`, default v0.5.3, the lmdeploy of the 4-bit release; its `auto_awq` quantizes every
  `nn.Linear` of the decoder layers but those whose name contains 'lora' (`skip_if_contains='lora'`), so the
  Partial LoRA stays in 16 bits): `lmdeploy/lite/quantization/awq.py:pseudo_quantize_tensor(w, 4, group,
  return_scale_zeros=True)` then `lmdeploy/lite/quantization/modules/linear.py:WeightOnlyQLinear.from_linear`
  (awq_layout=True), which packs `qweight` int32 [in, out / 8], `qzeros` int32 [in / group, out / 8] and
  `scales` [in / group, out] — what `auto_awq` saves under `<linear>.qweight/.qzeros/.scales`;
- reader (`--reader-rev`, default HEAD): `lmdeploy/pytorch/backends/default/awq_modules.py:unpack_awq`, the
  integers lmdeploy's own PyTorch engine reads back from those tensors (stored for layer 0 only, to keep the
  fixture small).

Group size 16: the tiny model's inputs (64 and 176) must be multiples of it (lmdeploy asserts so), and its
outputs (128, 64, 176) multiples of 8. Output: `tiny_awq.npz` (the packed tensors of every base linear, and
layer 0's unpacked integers) and `meta.json` (revisions, group size, what each array is).
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from mindxcomposer.demo import random_weights, tiny_config  # noqa: E402
from mindxcomposer.constants import LINEARS as PLORA_LINEARS  # noqa: E402

GROUP = 16
WRITER_FILES = {"awq": "lmdeploy/lite/quantization/awq.py", "linear": "lmdeploy/lite/quantization/modules/linear.py",
                "cal_qparams": "lmdeploy/lite/utils/cal_qparams.py"}
READER_FILE = "lmdeploy/pytorch/backends/default/awq_modules.py"


def git_show(git_dir, rev, path):
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"{rev}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def rev_hash(git_dir, rev):
    return subprocess.run(["git", "--git-dir", git_dir, "rev-parse", f"{rev}^{{commit}}"], check=True,
                          capture_output=True, text=True).stdout.strip()


def load_module(name, source, tmp):
    path = os.path.join(tmp, name.replace(".", "_") + ".py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def stub(name, **attrs):
    mod = types.ModuleType(name)
    mod.__path__ = []
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def load_lmdeploy(git_dir, writer_rev, reader_rev, tmp):
    """lmdeploy's writer and reader functions, imported from its git history with only the packages they
    import stood in (lmdeploy itself is not installed: its package __init__ pulls in its engines)."""
    for pkg in ("lmdeploy", "lmdeploy.lite", "lmdeploy.lite.utils", "lmdeploy.pytorch", "lmdeploy.pytorch.backends",
                "lmdeploy.pytorch.backends.default"):
        stub(pkg)
    load_module("lmdeploy.lite.utils.cal_qparams", git_show(git_dir, writer_rev, WRITER_FILES["cal_qparams"]), tmp)
    awq = load_module("lmdeploy_awq", git_show(git_dir, writer_rev, WRITER_FILES["awq"]), tmp)
    linear = load_module("lmdeploy_linear", git_show(git_dir, writer_rev, WRITER_FILES["linear"]), tmp)
    stub("lmdeploy.pytorch.distributed")

    class _Impl:  # base classes of the reader module's engine classes, which are not used here
        pass

    stub("lmdeploy.pytorch.backends.awq_modules", LinearW4A16Builder=_Impl, LinearW4A16Impl=_Impl)
    src = git_show(git_dir, reader_rev, READER_FILE)
    reader = load_module("lmdeploy.pytorch.backends.default.awq_modules", src, tmp)
    return awq, linear, reader


class _Quantizer:
    """What `WeightOnlyQLinear.from_linear` reads of the quantizer `quant_weights` passes (`WeightQuantizer(4,
    False, 'per_group', group)`) when the qparams are given."""
    bits, symmetry = 4, False

    def __init__(self, group):
        self.group_size = group


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lmdeploy-git", required=True, help="git directory of InternLM/lmdeploy")
    ap.add_argument("--writer-rev", default="v0.5.3")
    ap.add_argument("--reader-rev", default="HEAD")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out_dir = os.path.join(args.out, "awq")
    os.makedirs(out_dir, exist_ok=True)
    config = tiny_config()
    weights = random_weights(config, seed=0)
    arrays = {}
    with tempfile.TemporaryDirectory() as tmp:
        awq, linear_mod, reader = load_lmdeploy(args.lmdeploy_git, args.writer_rev, args.reader_rev, tmp)
        QParams = sys.modules["lmdeploy.lite.utils.cal_qparams"].QParams
        for i in range(config.num_hidden_layers):
            for name in PLORA_LINEARS:
                key = f"model.layers.{i}.{name}"
                w = torch.from_numpy(weights[key + ".weight"]).to(torch.float16)
                fc = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float16)
                fc.weight.data = w.clone()
                # as lmdeploy's quant_weights: the weight is replaced by its integers, then packed
                fc.weight.data, scales, zeros = awq.pseudo_quantize_tensor(fc.weight.data, 4, GROUP,
                                                                           return_scale_zeros=True)
                q = linear_mod.WeightOnlyQLinear.from_linear(fc, _Quantizer(GROUP), qparams=QParams(scales, zeros))
                arrays[key + ".qweight"] = q.qweight.numpy()
                arrays[key + ".qzeros"] = q.qzeros.numpy()
                arrays[key + ".scales"] = q.scales.to(torch.float16).numpy()
                if i == 0:
                    iw, iz = reader.unpack_awq(q.qweight, q.qzeros, 4)
                    arrays[key + ".iweight"] = iw.numpy().astype(np.uint8)
                    arrays[key + ".izeros"] = iz.numpy().astype(np.uint8)
    np.savez_compressed(os.path.join(out_dir, "tiny_awq.npz"), **arrays)
    meta = {
        "lmdeploy_writer": {"rev": args.writer_rev, "commit": rev_hash(args.lmdeploy_git, args.writer_rev),
                            "files": list(WRITER_FILES.values())},
        "lmdeploy_reader": {"rev": args.reader_rev, "commit": rev_hash(args.lmdeploy_git, args.reader_rev),
                            "file": READER_FILE},
        "model": "mindxcomposer.demo.tiny_config(), random_weights seed 0, base linears cast to float16",
        "group_size": GROUP,
        "quantization_config": {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": GROUP,
                                "zero_point": True},
        "arrays": {"<linear>.qweight": "int32 [in, out / 8], as saved", "<linear>.qzeros": "int32 [in / group, out / 8]",
                   "<linear>.scales": "float16 [in / group, out]",
                   "model.layers.0.<linear>.iweight": "uint8 [in, out]: lmdeploy's unpack_awq of qweight",
                   "model.layers.0.<linear>.izeros": "uint8 [in / group, out]: lmdeploy's unpack_awq of qzeros"},
        "torch": torch.__version__,
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out_dir}: {len(arrays)} arrays, {os.path.getsize(os.path.join(out_dir, 'tiny_awq.npz'))} bytes")


if __name__ == "__main__":
    main()
