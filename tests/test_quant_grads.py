"""Gradients through quantized products (a frozen quantized base under a LoRA adapter): dx = dy W with W the
dequantized weight, in the model's product arithmetic, and none for the stored integers, scales and zero points.
The CPU kernel (`csrc/gemm_kernels.cc`, the GEMM's NN product dequantizing W while it packs) in every build
against the GEMM over the dequantized fp32 twin, bit for bit; then through MindSpore's autodiff, kernels on and
off, against the gradient of the twin's product."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from mindxcomposer import quantization as qz
from mindxcomposer.ops import cpu_kernels, weight_products as wp

ARCHS = ["native", "avx2", "portable"]
# (bits, group size, K, N): K odd and groups not a multiple of 32; N (the product's k) over one k block (256 /
# 512 pairs) and odd (a bf16 pair padded with zero)
CASES = [(8, -1, 77, 70), (8, -1, 512, 301), (4, 128, 176, 70), (4, 32, 96, 301), (4, 48, 200, 45),
         (4, 128, 65, 600)]


def _compiler():
    try:
        cpu_kernels.build(arch="portable")
    except RuntimeError as e:
        pytest.skip(f"no kernels here: {e}")


def _weight(bits, gs, k, n, seed=0):
    rng = np.random.default_rng(seed + k + bits)
    w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
    parts = qz.quantize(w, bits, gs)
    return parts, qz.dequantize(parts, bits, gs, k)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits,gs,k,n", CASES)
def test_input_gradient_kernel_equals_the_twin_gemm(arch, bits, gs, k, n):
    """dy W packs the quantized W into the panels its fp32 twin packs into: the same products and sums as the
    GEMM over the twin (dy (W^T)^T through the NT product reads the same B), both arithmetics, and within
    float64's bound in the exact one."""
    _compiler()
    parts, deq = _weight(bits, gs, k, n)
    dy = np.random.default_rng(n).standard_normal((45, n)).astype(np.float32)
    twin_b = np.ascontiguousarray(deq.T)
    got = cpu_kernels.quant_input_grad(dy, parts, bits, k, gs, arch=arch)
    np.testing.assert_array_equal(got, cpu_kernels.gemm_nt(dy, twin_b, arch=arch))
    ref = dy.astype(np.float64) @ deq.astype(np.float64)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    # bf16 products of the fp32 twin may go to oneDNN (`cpu_kernels.onednn`); a quantized weight stays on the
    # own GEMM, whose products the twin's are compared with here.
    before = cpu_kernels.onednn() if arch == "native" else False
    if before:
        cpu_kernels.onednn(False)
    try:
        got16 = cpu_kernels.quant_input_grad(dy, parts, bits, k, gs, arch=arch, bf16_products=True)
        np.testing.assert_array_equal(got16, cpu_kernels.gemm_nt(dy, twin_b, bf16_products=True, arch=arch))
    finally:
        if before:
            cpu_kernels.onednn(True)


def test_input_gradient_kernel_rejects_shapes_that_do_not_fit():
    _compiler()
    parts, _ = _weight(4, 32, 96, 40)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernels.quant_input_grad(np.zeros((3, 41), np.float32), parts, 4, 96, 32)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernels.quant_input_grad(np.zeros((3, 40), np.float32), parts, 4, 90, 32)  # K does not fit the bytes
    with pytest.raises(ValueError, match="rejected its shapes"):
        cpu_kernels.quant_input_grad(np.zeros((3, 40), np.float32), parts, 4, 96, 0)


class _QuantDot(nn.Cell):
    """sum(linear_int8 / linear_int4(x, parts) * dy)."""

    def __init__(self, bits, gs, products):
        super().__init__()
        self.bits, self.gs, self.products = bits, gs, products

    def construct(self, x, dy, *parts):
        if self.bits == 8:
            y = wp.linear_int8(x, parts[0], parts[1], self.products)
        else:
            y = wp.linear_int4(x, parts[0], parts[1], parts[2], self.gs, self.products)
        return (y * dy).sum()


class _TwinDot(nn.Cell):
    def __init__(self, products):
        super().__init__()
        self.products = products

    def construct(self, x, dy, w):
        return (wp.linear(x, w, self.products) * dy).sum()


@pytest.mark.parametrize("kernels", ["cpu", "portable"])
@pytest.mark.parametrize("products", wp.PRODUCT_MODES)
@pytest.mark.parametrize("bits,gs,k,n", [(8, -1, 96, 70), (4, 32, 96, 70), (4, 128, 176, 45)])
@pytest.mark.parametrize("rows", [3, 40])
def test_autodiff_through_quantized_products_is_the_twins(bits, gs, k, n, rows, products, kernels, mode, monkeypatch):
    """ms.grad of a quantized product: dx equals the twin's dx (the same GEMM and panels on the CPU path above
    `KERNEL_MAX_ROWS` rows, the same MatMul on the portable path: bit for bit; decode-sized rows: the decode
    kernel's gradient is the exact GEMM's, the twin's MindSpore's MatMul: the same sums in another order), and the
    stored parts get zeros."""
    if kernels == "cpu" and not wp.enable_kernels():
        pytest.skip("no kernels here")
    if kernels == "portable":
        monkeypatch.setattr(wp, "_kernels", None)
    parts, deq = _weight(bits, gs, k, n)
    rng = np.random.default_rng(rows)
    x = Tensor(rng.standard_normal((1, rows, k)).astype(np.float32))
    dy = Tensor(rng.standard_normal((1, rows, n)).astype(np.float32))
    stored = [Tensor(parts[p]) for p in qz.PARTS[bits]]
    before = cpu_kernels.onednn() if kernels == "cpu" else False
    if before:  # the twin's bf16 products would go to oneDNN; the quantized weight's stay on the own GEMM
        cpu_kernels.onednn(False)
    try:
        grads = ms.grad(_QuantDot(bits, gs, products), grad_position=tuple(range(len(stored) + 2)))(x, dy, *stored)
        twin = ms.grad(_TwinDot(products), grad_position=0)(x, dy, Tensor(deq)).asnumpy()
    finally:
        if before:
            cpu_kernels.onednn(True)
    dx = grads[0].asnumpy()
    if kernels == "cpu" and rows <= wp.KERNEL_MAX_ROWS:
        assert np.abs(dx - twin).max() <= 1e-6 * np.abs(twin).max()
    else:
        np.testing.assert_array_equal(dx, twin)
    ref = dy.asnumpy()[0].astype(np.float64) @ deq.astype(np.float64)
    tol = 1e-5 if products == wp.EXACT or rows <= wp.KERNEL_MAX_ROWS else 3e-2  # bf16 inputs: 2^-8 each
    assert np.abs(dx[0] - ref).max() <= tol * np.abs(ref).max()
    for g, p in zip(grads[2:], stored):
        assert g.shape == p.shape and not np.any(g.asnumpy())
