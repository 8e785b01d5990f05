"""The CPU kernels for quantized weights (`csrc/quant_kernels.cc`: decode rows; `csrc/gemm_kernels.cc`: the GEMM
that dequantizes while packing), in every build (native, AVX2, portable), against float64 products of the
dequantized weights; and the dispatch (`weight_products`) against its portable path."""
import numpy as np
import pytest

from mindspore import Tensor

from mindxcomposer import quantization as qz
from mindxcomposer.ops import cpu_kernels, weight_products as wp

ARCHS = ["native", "avx2", "portable"]
# (bits, group size, K): the release's 128 (K a multiple and not), groups not a multiple of 32, odd K; K above
# `kTileAbove` (6144: one activation row against tiles of weight rows) a multiple of 32 and not; K and the groups
# multiples of 128 up to it (one row: `int4_row128`, the release's K = 4096), groups of 256 among them
CASES = [(8, -1, 4096), (8, -1, 77), (4, 128, 512), (4, 128, 176), (4, 32, 96), (4, 48, 200), (4, 128, 65),
         (8, -1, 6176), (8, -1, 6165), (4, 128, 6272), (4, 32, 6176), (4, 128, 6163), (4, 128, 4096), (4, 256, 1024),
         (4, 128, 6144)]


def _compiler():
    try:
        cpu_kernels.build(arch="portable")
    except RuntimeError as e:
        pytest.skip(f"no kernels here: {e}")


def _weight(bits, gs, k, n=37, seed=0):
    rng = np.random.default_rng(seed + k + bits)
    w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
    parts = qz.quantize(w, bits, gs)
    return parts, qz.dequantize(parts, bits, gs, k)


def _check(got, x, deq, what):
    ref = x.astype(np.float64) @ deq.astype(np.float64).T
    # fp32 sums of K products: error well under 1e-5 of the output's scale
    bound = 1e-5 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= bound, f"{what}: {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits,gs,k", CASES)
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 16])  # 7: tiles of 4, 2 and 1 rows
def test_decode_kernel_against_float64(arch, bits, gs, k, rows):
    _compiler()
    parts, deq = _weight(bits, gs, k)
    x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
    got = cpu_kernels.quant_linear(x, parts, bits, gs, arch=arch)
    _check(got, x, deq, f"decode {arch} int{bits} g{gs} K{k} M{rows}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits,gs,k", [(4, 128, 4096), (4, 128, 14336), (4, 32, 200), (8, -1, 4096)])
@pytest.mark.parametrize("rows", [1, 4])
def test_decode_kernel_with_activations_of_one_sign(arch, bits, gs, k, rows):
    """Activations all positive (after an activation function, or a norm with a large mean): where a kernel takes
    sum x q and z sum x apart (int4 on AVX2), the two cancel most; the result stays within the same bound."""
    _compiler()
    parts, deq = _weight(bits, gs, k)
    x = (np.abs(np.random.default_rng(rows).standard_normal((rows, k))) + 4.0).astype(np.float32)
    got = cpu_kernels.quant_linear(x, parts, bits, gs, arch=arch)
    _check(got, x, deq, f"decode {arch} int{bits} g{gs} K{k} M{rows} one sign")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits,gs,k", CASES)
def test_gemm_dequantizing_while_packing_equals_the_twin_gemm(arch, bits, gs, k):
    """The GEMM packs a quantized weight into the very panels of its dequantized fp32 twin: bit for bit the
    same products and sums as the GEMM over the fp32 twin (and within float64's bound)."""
    _compiler()
    parts, deq = _weight(bits, gs, k, n=70)
    x = np.random.default_rng(k).standard_normal((45, k)).astype(np.float32)
    got = cpu_kernels.quant_linear(x, parts, bits, gs, arch=arch, gemm=True)
    np.testing.assert_array_equal(got, cpu_kernels.gemm_nt(x, deq, arch=arch))
    _check(got, x, deq, f"gemm {arch} int{bits} g{gs} K{k}")
    got16 = cpu_kernels.quant_linear(x, parts, bits, gs, arch=arch, gemm=True, bf16_products=True)
    # bf16 products of the fp32 twin may go to oneDNN (`cpu_kernels.onednn`); a quantized weight stays on the
    # own GEMM, whose products the twin's are compared with here.
    before = cpu_kernels.onednn() if arch == "native" else False
    if before:
        cpu_kernels.onednn(False)
    try:
        np.testing.assert_array_equal(got16, cpu_kernels.gemm_nt(x, deq, bf16_products=True, arch=arch))
    finally:
        if before:
            cpu_kernels.onednn(True)


@pytest.mark.parametrize("bits,gs,k", [(8, -1, 96), (4, 32, 96), (4, 128, 176)])
@pytest.mark.parametrize("rows", [2, 40])
def test_dispatch_kernels_equal_the_portable_path(bits, gs, k, rows, mode, monkeypatch):
    """`linear_int8` / `linear_int4` with the kernels (decode-sized rows: the decode kernel; more: the GEMM)
    against the portable path (dequantize with MindSpore ops, then MatMul), both in MindSpore."""
    if not wp.enable_kernels():
        pytest.skip("no kernels here")
    parts, deq = _weight(bits, gs, k)
    x = np.random.default_rng(rows).standard_normal((1, rows, k)).astype(np.float32)
    args = [Tensor(parts[p]) for p in qz.PARTS[bits]]

    def run():
        if bits == 8:
            return wp.linear_int8(Tensor(x), *args).asnumpy()
        return wp.linear_int4(Tensor(x), *args, gs).asnumpy()

    fast = run()
    monkeypatch.setattr(wp, "_kernels", None)
    portable = run()
    _check(fast[0], x[0], deq, "kernel path")
    _check(portable[0], x[0], deq, "portable path")
