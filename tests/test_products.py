"""The product kernels behind `mindxcomposer.ops.weight_products` (`csrc/gemm_kernels.cc`).

Each arithmetic is checked against float64 with a rounding-error bound, on every code path the library
has (the CPU's own build, and the AVX2 and portable builds that older CPUs get), then through MindSpore
(PyNative and GRAPH_MODE, forward and gradients) against the library called directly."""
import contextlib

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindxcomposer.ops import cpu_kernels
from mindxcomposer.ops import weight_products as wp
from mindxcomposer.weights import bf16_to_fp32, fp32_to_bf16

ARCHS = ("native", "avx2", "portable")
# bf16 products: where oneDNN is installed, the native build sends them to it; "native-own" is the same
# build with oneDNN switched off (the own GEMM that serves without it).
BF16_PATHS = ARCHS + ("native-own",)
# (M, K, N): edges of every blocking (12-row and 32-column tiles, k blocks of 256 / 512, column blocks of 1024)
SHAPES = [(17, 1, 1), (17, 33, 70), (100, 513, 257), (37, 1030, 96), (25, 64, 1100), (130, 300, 40)]
EPS = 2.0 ** -24


def round_bf16(a):
    return bf16_to_fp32(fp32_to_bf16(np.asarray(a, np.float32)))


def bound(x, w, k, any_order=False):
    """Rounding-error bound of a blocked fp32 sum (FMA chains over blocks of at most 512 k, blocks summed):
    (512 + k / 256 + 2) eps |x| |w|^T, elementwise. `any_order`: of a sum of k exact products in any order
    (oneDNN's, whose blocking is its own): (k + 2) eps |x| |w|^T."""
    terms = max(512 + k / 256, k) if any_order else 512 + k / 256
    return (terms + 2) * EPS * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T)


def gemm(x, w, bf16, arch):
    """x w^T through the library for `arch` (`BF16_PATHS`)."""
    if arch != "native-own":
        return cpu_kernels.gemm_nt(x, w, bf16, arch)
    before = cpu_kernels.onednn()
    cpu_kernels.onednn(False)
    try:
        return cpu_kernels.gemm_nt(x, w, bf16)
    finally:
        cpu_kernels.onednn(before)


@contextlib.contextmanager
def _arithmetics(arch):
    """For `arch` of BF16_PATHS: (the build to call, the arithmetics to check: False exact, True bf16 products).
    "native-own" is the native build with oneDNN switched off, which serves bf16 products only."""
    own = arch == "native-own"
    before = cpu_kernels.onednn()
    if own:
        cpu_kernels.onednn(False)
    try:
        yield ("native" if own else arch), ((True,) if own else (False, True))
    finally:
        cpu_kernels.onednn(before)


def data(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [4096, 14336, 16, 48, 77, 100])
@pytest.mark.parametrize("rows", [1, 2, 3, 7])
def test_bf16_decode_kernel_against_float64(arch, k, rows):
    """The decode kernel (`csrc/bf16_kernels.cc`: the stored bf16 bits read in place, a few activation rows) on every
    build: K multiples of 64, 32 and 16 (its vector steps at 1, 2 and 4 rows) and not (the scalar tail)."""
    x, w = data(rows, k, 37, seed=k + rows)
    bits = fp32_to_bf16(w)
    got = cpu_kernels.decode_bf16(x, bits, arch)
    ref = x.astype(np.float64) @ bf16_to_fp32(bits).astype(np.float64).T
    assert (np.abs(got - ref) <= bound(x, bf16_to_fp32(bits), k, any_order=True)).all()


def test_the_build_matches_the_cpu():
    """One dispatch: the library is built for the CPU it runs on (`-march=native`)."""
    flags = _cpu_flags()
    want = ("AVX-512 + AVX512-BF16" if {"avx512f", "avx512_bf16"} <= flags else "AVX-512" if "avx512f" in flags
            else "AVX2 + FMA" if {"avx2", "fma"} <= flags else "portable C++")
    assert cpu_kernels.isa() == want
    assert cpu_kernels.isa("avx2") == "AVX2 + FMA" and cpu_kernels.isa("portable") == "portable C++"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_exact_products_are_fp32_products(arch, shape):
    m, k, n = shape
    x, w = data(m, k, n)
    wb = fp32_to_bf16(w)
    for weight, wf in ((w, w), (wb, bf16_to_fp32(wb))):
        y = cpu_kernels.gemm_nt(x, weight, False, arch)
        ref = x.astype(np.float64) @ wf.astype(np.float64).T
        assert (np.abs(y - ref) <= bound(x, wf, k)).all()
    # A bf16 weight is widened exactly: the same product as its fp32 copy, bit for bit.
    np.testing.assert_array_equal(cpu_kernels.gemm_nt(x, wb, False, arch),
                                  cpu_kernels.gemm_nt(x, bf16_to_fp32(wb), False, arch))


@pytest.mark.parametrize("arch", BF16_PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bf16_products_round_both_inputs(arch, shape):
    m, k, n = shape
    x, w = data(m, k, n, seed=1)
    xr, wr = round_bf16(x), round_bf16(w)
    for weight in (w, fp32_to_bf16(w)):
        y = gemm(x, weight, True, arch)
        ref = xr.astype(np.float64) @ wr.astype(np.float64).T
        assert (np.abs(y - ref) <= bound(xr, wr, k, any_order=arch == "native")).all()
    if k > 1:  # the rounding is real: the result is not the fp32 product
        exact = x.astype(np.float64) @ w.astype(np.float64).T
        assert np.abs(y - exact).max() > 100 * bound(x, w, k).max() / (512 + k / 256 + 2)


@pytest.mark.parametrize("arch", BF16_PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_input_gradient_products(arch, shape):
    """dx = dy W (a linear's input gradient: W's rows are the sum's index) against float64, exact and with bf16
    products; a bf16 weight gives the product of its fp32 copy bit for bit."""
    m, k, n = shape
    x, w = data(m, k, n, seed=3)
    dy = np.random.default_rng(4).standard_normal((m, n), dtype=np.float32)
    wb = fp32_to_bf16(w)
    with _arithmetics(arch) as (build, modes):
        for bf16 in modes:
            rnd = round_bf16 if bf16 else (lambda a: a)
            got = [cpu_kernels.gemm_nn(dy, weight, bf16, build) for weight in (w, wb)]
            for weight, y in zip((w, bf16_to_fp32(wb)), got):
                ref = rnd(dy).astype(np.float64) @ rnd(weight).astype(np.float64)
                assert (np.abs(y - ref) <= bound(rnd(dy), rnd(weight).T, n, any_order=bf16 and arch == "native")).all()
            np.testing.assert_array_equal(got[1], cpu_kernels.gemm_nn(dy, bf16_to_fp32(wb), bf16, build))


@pytest.mark.parametrize("arch", BF16_PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_weight_gradient_products(arch, shape):
    """dW = dy^T x (a linear's weight gradient: the rows are the sum's index, and A = dy^T is read by
    columns) against float64, exact and with bf16 products, on every build."""
    m, k, n = shape  # rows m, x [m, k], dy [m, n] -> dW [n, k]
    x, _ = data(m, k, 1, seed=5)
    dy = np.random.default_rng(6).standard_normal((m, n), dtype=np.float32)
    with _arithmetics(arch) as (build, modes):
        for bf16 in modes:
            rnd = round_bf16 if bf16 else (lambda a: a)
            got = _aot(build, "MxcLinearTNBf16" if bf16 else "MxcLinearTN", (dy, x), (n, k))
            ref = rnd(dy).astype(np.float64).T @ rnd(x).astype(np.float64)
            assert (np.abs(got - ref) <= bound(rnd(dy).T, rnd(x).T, m, any_order=bf16 and arch == "native")).all()


@pytest.mark.parametrize("bf16,arch", [(False, "native"), (True, "native"), (True, "native-own")])
def test_rows_do_not_depend_on_the_batch(bf16, arch):
    """A row's result is the same alone or among others, at any position (serving batches rows)."""
    for k, n in ((600, 130), (4096, 1024)):
        x, w = data(77, k, n, seed=2)
        whole = gemm(x, fp32_to_bf16(w), bf16, arch)
        for rows in (slice(0, 1), slice(5, 6), slice(12, 37), slice(60, 77)):
            np.testing.assert_array_equal(gemm(x[rows], fp32_to_bf16(w), bf16, arch), whole[rows])


def _aot(arch, name, inputs, out_shape):
    """Kernel `name` of the library for `arch`, called directly on numpy inputs -> its fp32 output."""
    import ctypes
    out = np.zeros(out_shape, np.float32)
    cpu_kernels.AotCall(getattr(ctypes.CDLL(cpu_kernels.build(arch=arch)), name), list(inputs) + [out])()
    return out


def test_exponentials_are_the_same_bits_on_every_build():
    """The softmax's exp (a polynomial, `softmax_exp`) runs 16 lanes wide on AVX-512, 8 on AVX2 and one value at
    a time in the portable build, each the same operations: SwiGLU and CLIP's activation, element-wise, give the
    same bits on every build, over the exp's whole range (underflow to 0, the clamp at the top, -0 and 0)."""
    rng = np.random.default_rng(11)
    g = (rng.standard_normal((37, 1411)) * 8).astype(np.float32)
    g[0, :8] = [0.0, -0.0, 100.0, -100.0, 88.9, -87.4, 51.3, -51.3]
    u = rng.standard_normal(g.shape).astype(np.float32)
    x, w = data(19, 64, 203, seed=5)
    w *= 4
    bias = rng.standard_normal(203).astype(np.float32)
    res = rng.standard_normal((19, 203)).astype(np.float32)
    calls = {"MxcSwiGLU": ([g, u], g.shape), "MxcLinearNTBiasQuickGelu": ([x, w, bias], (19, 203)),
             "MxcLinearNTBiasResidual": ([x, w, bias, res], (19, 203))}
    for name, (inputs, shape) in calls.items():
        ref = _aot("portable", name, inputs, shape)
        for arch in ("native", "avx2"):
            got = _aot(arch, name, inputs, shape)
            assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), (name, arch)
    # The softmax sums its exponentials in lanes: attention agrees across builds to rounding.
    q, k, v = (rng.standard_normal((1, 2, n, 64)).astype(np.float32) for n in (154, 77, 77))
    mask = np.triu(np.full((77, 77), np.finfo(np.float32).min, np.float32), 1)[None, None]
    div = np.array([8.0], np.float32)
    ref = _aot("portable", "MxcAttention", [q, k, v, mask, div], q.shape)
    for arch in ("native", "avx2"):
        np.testing.assert_allclose(_aot(arch, "MxcAttention", [q, k, v, mask, div], q.shape), ref, rtol=0, atol=2e-6)


def _head_ce_data():
    """Rows for the head's cross-entropy: 40 (above the decode size), K 96, a vocabulary of 3001 (not a multiple of any
    vector width), weights 1, 0 (its label outside the vocabulary: not read) and 0.5."""
    rng = np.random.default_rng(21)
    h = rng.standard_normal((40, 96)).astype(np.float32)
    w = (rng.standard_normal((3001, 96)) * 0.3).astype(np.float32)
    labels = rng.integers(0, 3001, 40).astype(np.int32)
    weight = np.ones(40, np.float32)
    weight[[3, 17]] = 0.0
    weight[[5, 30]] = 0.5
    return h, w, labels, weight


def _head_ce_reference(h, w, labels, weight, bf16):
    """float64 (loss [R], dh [R, K]) of `head_cross_entropy` and their error bounds: the logits within the GEMM's
    bound (`bound`), the log-sum-exp within that plus (V + 4) eps (V exponentials within 2 ulp each, summed in any
    order), the loss's three fp32 terms rounded once each; the softmax's rows within twice that relative (plus the
    bf16 rounding of the gradient's first operand in bf16 products), then dh's NN product within its bound."""
    rnd = round_bf16 if bf16 else (lambda a: a)
    h64, w64 = rnd(h).astype(np.float64), rnd(w).astype(np.float64)
    s = h64 @ w64.T
    top = s.max(1, keepdims=True)
    e = np.exp(s - top)
    total = e.sum(1, keepdims=True)
    p = e / total
    rows = np.arange(len(labels))
    picked = s[rows, np.where(weight != 0, labels, 0)]
    loss = weight * (top[:, 0] + np.log(total[:, 0]) - picked)
    g = p.copy()
    g[rows, np.where(weight != 0, labels, 0)] -= 1.0
    g *= weight[:, None]
    delta = 2 * bound(rnd(h), rnd(w), h.shape[1]).max(1) + (w.shape[0] + 4) * EPS
    loss_tol = weight * (delta + 4 * EPS * (np.abs(top[:, 0]) + np.abs(np.log(total[:, 0])) + np.abs(picked)))
    rel = 2.2 * delta[:, None] + (2.0 ** -8 if bf16 else 0.0)
    dh_tol = rel * weight[:, None] * (p @ np.abs(w64)) + bound(np.abs(g), np.abs(w64).T, w.shape[0]) * (
        1 + (2.0 ** -8 if bf16 else 0.0))
    return loss, g @ w64, loss_tol, dh_tol


@pytest.mark.parametrize("arch", ARCHS)
def test_head_cross_entropy_kernel_on_every_build(arch):
    """The head's loss and its gradient in one kernel (`head_cross_entropy`) against float64 within their bounds,
    exact and bf16 products, an fp32 and a bf16 head, on every build; a row of weight 0 is zeros; a label outside
    the vocabulary on a weighted row is refused."""
    import ctypes

    h, w, labels, weight = _head_ce_data()
    lib = ctypes.CDLL(cpu_kernels.build(arch=arch))
    for name, bf16 in (("MxcHeadCrossEntropy", False), ("MxcHeadCrossEntropyBf16", True)):
        for stored in (w, fp32_to_bf16(w)):
            loss, dh = np.zeros(40, np.float32), np.zeros((40, 96), np.float32)
            cpu_kernels.AotCall(getattr(lib, name), [h, stored, labels, weight, loss, dh,
                                                     np.full((40, w.shape[0]), np.nan, np.float32)])()
            values = w if stored.dtype == np.float32 else bf16_to_fp32(stored)
            ref_loss, ref_dh, loss_tol, dh_tol = _head_ce_reference(h, values, labels, weight, bf16)
            assert (np.abs(loss - ref_loss) <= loss_tol).all(), (name, stored.dtype)
            assert (np.abs(dh - ref_dh) <= dh_tol).all(), (name, stored.dtype)
            assert not loss[weight == 0].any() and not dh[weight == 0].any()
    bad = labels.copy()
    bad[0] = w.shape[0]
    with pytest.raises(RuntimeError):
        cpu_kernels.AotCall(lib.MxcHeadCrossEntropy, [h, w, bad, weight, np.zeros(40, np.float32),
                                                       np.zeros((40, 96), np.float32), np.zeros((40, w.shape[0]),
                                                                                                np.float32)])()


class _WeightedHeadLoss(nn.Cell):
    def __init__(self, products):
        super().__init__()
        self.products = products

    def construct(self, h, w, labels, weight, c):
        return (wp.head_cross_entropy(h, w, labels, weight, self.products) * c).sum()


@pytest.mark.parametrize("products", wp.PRODUCT_MODES)
def test_head_cross_entropy_through_mindspore(mode, products):
    """Through MindSpore (the kernel with a frozen head): the loss rows and the gradient in h of a weighted sum of
    them (each row's gradient scaled by its cotangent), against float64 within the bounds above, for an fp32 and a
    bf16 head; the composed path (the kernels off) within the same bounds, where in bf16 products the gradient of
    its cast to bf16 also rounds dh to bf16 (2^-9 relative)."""
    assert wp.enable_kernels()
    h, w, labels, weight = _head_ce_data()
    labels[weight == 0] = 0  # the composed path reads every label
    c = np.random.default_rng(22).uniform(0.5, 2.0, 40).astype(np.float32)
    for head in (Tensor(w), Tensor(w).astype(ms.bfloat16)):
        values = w if head.dtype == ms.float32 else round_bf16(w)
        ref_loss, ref_dh, loss_tol, dh_tol = _head_ce_reference(h, values, labels, weight, products == "bf16")
        for kernels_on in (True, False):
            with (contextlib.nullcontext() if kernels_on else wp.kernels_disabled()):
                cell = _WeightedHeadLoss(products)
                rows = wp.head_cross_entropy(Tensor(h), head, Tensor(labels), Tensor(weight), products).asnumpy()
                total, dh = ms.value_and_grad(cell, grad_position=0)(Tensor(h), head, Tensor(labels), Tensor(weight),
                                                                     Tensor(c))
            assert (np.abs(rows - ref_loss) <= loss_tol).all(), kernels_on
            cast = 0.0 if kernels_on or products == "exact" else 2.0 ** -9 * np.abs(ref_dh * c[:, None])
            assert (np.abs(dh.asnumpy() - ref_dh * c[:, None]) <= dh_tol * c[:, None] * 1.0001 + cast).all(), kernels_on
            assert abs(float(total.asnumpy()) - float((ref_loss * c).sum())) <= float((loss_tol * c).sum()) + 1e-5


def _cpu_flags():
    return set(open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split())


def test_onednn_serves_bf16_products_where_the_cpu_multiplies_bf16():
    """On x86-64 Linux oneDNN is a dependency and the native library links it; after a bf16 product it is
    in use exactly where the CPU has AMX-BF16 or AVX512-BF16 (elsewhere oneDNN would emulate: the own GEMM
    serves). Both paths compute the bf16 arithmetic (`test_bf16_products_round_both_inputs`)."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("oneDNN is a dependency on x86-64 only")
    assert cpu_kernels.onednn_install() is not None
    x, w = data(64, 256, 96, seed=3)
    cpu_kernels.gemm_nt(x, fp32_to_bf16(w), True)
    assert cpu_kernels.onednn() == bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def test_nan_and_inf_propagate():
    x, w = data(20, 40, 50, seed=3)
    x[3, 7], x[4, 8] = np.nan, np.inf
    for bf16 in (False, True):
        y = cpu_kernels.gemm_nt(x, w, bf16)
        assert np.isnan(y[3]).all() and not np.isfinite(y[4]).any() and np.isfinite(np.delete(y, [3, 4], 0)).all()


class _Linear(nn.Cell):
    def __init__(self, products):
        super().__init__()
        self.products = products

    def construct(self, x, w):
        return wp.linear(x, w, self.products)


class _Dot(nn.Cell):
    """sum(linear(x, w) * dy): its gradients are dy w and dy^T x."""

    def __init__(self, products):
        super().__init__()
        self.products = products

    def construct(self, x, w, dy):
        return (wp.linear(x, w, self.products) * dy).sum()


class _AttnDot(nn.Cell):
    def __init__(self, products):
        super().__init__()
        self.products = products

    def construct(self, q, k, v, dy):
        return (wp.batch_nn(wp.batch_nt(q, k, self.products), v, self.products) * dy).sum()


@pytest.mark.parametrize("products", wp.PRODUCT_MODES)
def test_linear_through_mindspore_is_the_kernel(mode, products):
    assert wp.enable_kernels()
    x, w = data(40, 96, 70, seed=4)
    x3 = x.reshape(2, 20, 96)
    for weight in (Tensor(w), Tensor(w).astype(ms.bfloat16)):
        stored = w if weight.dtype == ms.float32 else fp32_to_bf16(w)
        got = _Linear(products)(Tensor(x3), weight).asnumpy()
        np.testing.assert_array_equal(got.reshape(40, 70), cpu_kernels.gemm_nt(x, stored, products == "bf16"))


def test_product_flops_count_each_product(mode):
    """`product_flops` counts 2 m n k for each product the library runs, through MindSpore (the library MindSpore
    loaded is the one it reads) and directly; `reset` reads and clears it."""
    assert wp.enable_kernels()
    x, w = data(40, 96, 70, seed=4)
    cpu_kernels.product_flops(reset=True)
    _Linear(wp.EXACT)(Tensor(x.reshape(2, 20, 96)), Tensor(w)).asnumpy()
    assert cpu_kernels.product_flops() == 2 * 40 * 70 * 96
    cpu_kernels.gemm_nt(x[:25], w[:33])
    assert cpu_kernels.product_flops(reset=True) == 2 * 40 * 70 * 96 + 2 * 25 * 33 * 96
    assert cpu_kernels.product_flops() == 0


@pytest.mark.parametrize("products", wp.PRODUCT_MODES)
def test_gradients(mode, products):
    """dx = dy w and dw = dy^T x through the kernels, against float64 (bf16 products: of the rounded inputs);
    a bf16 weight's gradient comes back in bf16; attention's products likewise."""
    assert wp.enable_kernels()
    rnd = round_bf16 if products == "bf16" else (lambda a: a)
    x, w = data(300, 96, 70, seed=5)
    dy = np.random.default_rng(6).standard_normal((300, 70), dtype=np.float32)
    dx, dw = ms.grad(_Dot(products), grad_position=(0, 1))(Tensor(x), Tensor(w), Tensor(dy))
    ref_dx = rnd(dy).astype(np.float64) @ rnd(w).astype(np.float64)
    ref_dw = rnd(dy).astype(np.float64).T @ rnd(x).astype(np.float64)
    assert (np.abs(dx.asnumpy() - ref_dx) <= bound(rnd(dy), rnd(w).T, 70)).all()
    assert (np.abs(dw.asnumpy() - ref_dw) <= bound(rnd(dy).T, rnd(x).T, 300)).all()
    _, dwb = ms.grad(_Dot(products), grad_position=(0, 1))(Tensor(x), Tensor(w).astype(ms.bfloat16), Tensor(dy))
    assert dwb.dtype == ms.bfloat16

    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 3, 40, 16), dtype=np.float32) for _ in range(3))
    do = rng.standard_normal((2, 3, 40, 16), dtype=np.float32)
    got = ms.grad(_AttnDot(products), grad_position=(0, 1, 2))(Tensor(q), Tensor(k), Tensor(v), Tensor(do))
    import torch

    tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
    ((tq @ tk.transpose(-1, -2)) @ tv * torch.tensor(do, dtype=torch.float64)).sum().backward()
    tol = 1e-6 if products == "exact" else 3e-2  # relative to the largest entry; bf16 inputs: 2^-8 each
    for ours, ref in zip(got, (tq, tk, tv)):
        r = ref.grad.numpy()
        assert np.abs(ours.asnumpy() - r).max() <= tol * np.abs(r).max()


def test_decode_sized_products_stay_exact():
    """At most KERNEL_MAX_ROWS rows (decode steps, read-bound) a product is exact in either mode."""
    assert wp.enable_kernels()
    x, w = data(wp.KERNEL_MAX_ROWS, 64, 50, seed=8)
    wb = Tensor(w).astype(ms.bfloat16)
    exact = wp.linear(Tensor(x), wb, wp.EXACT).asnumpy()
    np.testing.assert_array_equal(wp.linear(Tensor(x), wb, wp.BF16).asnumpy(), exact)
    ref = x.astype(np.float64) @ round_bf16(w).astype(np.float64).T
    assert (np.abs(exact - ref) <= bound(x, round_bf16(w), 64)).all()


def _attention_ref(q, k, v, mask, div):
    """float64 softmax(q k^T / div + mask) v with grouped heads, as `portable_attention` computes it."""
    b, h, n, d = q.shape
    kv = k.shape[1]
    qs = q.reshape(b, kv, (h // kv) * n, d).astype(np.float64)
    s = qs @ k.astype(np.float64).transpose(0, 1, 3, 2) / div
    if mask is not None:
        s = (s.reshape(b, kv, h // kv, n, -1) + mask[:, None].astype(np.float64)).reshape(s.shape)
    s = np.exp(s - s.max(-1, keepdims=True))
    return ((s / s.sum(-1, keepdims=True)) @ v.astype(np.float64)).reshape(b, h, n, d)


@pytest.mark.parametrize("products", wp.PRODUCT_MODES)
def test_fused_attention(products):
    """The CPU attention kernel against float64: a static cache longer than the keys in use (causal mask,
    left padding, empty slots after the chunk), a padding query that sees nothing (uniform weights, as the
    plain softmax gives it), and no mask (the ViT)."""
    from mindxcomposer.ops.attention import attention

    assert wp.enable_kernels()
    rng = np.random.default_rng(9)
    b, h, kv, n, d, slots, start = 2, 4, 2, 24, 16, 100, 30
    q = rng.standard_normal((b, h, n, d), dtype=np.float32)
    k, v = (rng.standard_normal((b, kv, slots, d), dtype=np.float32) for _ in range(2))
    visible = np.arange(slots)[None, :] <= (start + np.arange(n))[:, None]  # chunk rows at slots start..start+n-1
    visible = np.broadcast_to(visible, (b, n, slots)).copy()
    visible[1, :, :7] = False  # row 1 left-padded by 7 slots
    visible[1, 0] = False  # a query that sees nothing
    mask = np.where(visible, 0, np.finfo(np.float32).min).astype(np.float32)[:, None]
    div = float(np.sqrt(d))
    got = attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), div, products=products).asnumpy()
    ref = _attention_ref(q, k, v, mask, div)
    tol = 2e-6 if products == "exact" else 2e-2
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    if products == "bf16":  # the products' inputs really are rounded
        exact = attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), div).asnumpy()
        assert np.abs(got - exact).max() > 1e-4
    qv = rng.standard_normal((1, 2, 40, d), dtype=np.float32)
    kv_ = rng.standard_normal((1, 2, 40, d), dtype=np.float32)
    got = attention(Tensor(qv), Tensor(kv_), Tensor(kv_ * 2), None, 1, products=products).asnumpy()
    ref = _attention_ref(qv, kv_, kv_ * 2, None, 1.0)
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()


@pytest.mark.parametrize("products", wp.PRODUCT_MODES)
def test_decode_attention_goes_through_the_kernel_exactly(products):
    """A decode step's attention (one query per row, a static cache with empty slots after the last written one,
    a left-padded row) goes through the CPU kernel, with exact products in either arithmetic (as decode-sized
    batch products): against float64, against the portable path it replaced, and the same in both modes."""
    from mindxcomposer.ops.attention import attention

    assert wp.enable_kernels()
    rng = np.random.default_rng(12)
    b, h, kv, d, slots, filled = 2, 8, 2, 16, 64, 21
    q = rng.standard_normal((b, h, 1, d), dtype=np.float32)
    k, v = (rng.standard_normal((b, kv, slots, d), dtype=np.float32) for _ in range(2))
    visible = np.broadcast_to(np.arange(slots) < filled, (b, slots)).copy()
    visible[1, :5] = False  # row 1 left-padded by 5 slots
    mask = np.where(visible, 0, np.finfo(np.float32).min).astype(np.float32)[:, None, None]
    div = float(np.sqrt(d))
    args = (Tensor(q), Tensor(k), Tensor(v), Tensor(mask), div)
    calls = []
    real = wp.kernels().gemm["exact"].attention
    wp.kernels().gemm["exact"].attention = lambda *a: calls.append(1) or real(*a)
    try:
        got = attention(*args, products=products).asnumpy()
    finally:
        wp.kernels().gemm["exact"].attention = real
    assert calls, "decode attention did not take the kernel"
    ref = _attention_ref(q, k, v, mask, div)
    assert np.abs(got - ref).max() <= 2e-6 * np.abs(ref).max()
    with wp.kernels_disabled():
        portable = attention(*args, products=products).asnumpy()
    assert np.abs(got - portable).max() <= 2e-6 * np.abs(ref).max()
    np.testing.assert_array_equal(got, attention(*args, products=wp.EXACT).asnumpy())


@pytest.mark.parametrize("products", wp.PRODUCT_MODES)
def test_portable_path_computes_the_same_products(monkeypatch, products):
    """Without the CPU kernels (no g++, MXC_PORTABLE_KERNELS=1) MindSpore's MatMul serves, with both inputs
    rounded to bf16 in the bf16 arithmetic: the kernels' products up to the order of the sums."""
    from mindxcomposer.ops.attention import attention

    assert wp.enable_kernels()
    rng = np.random.default_rng(10)
    x, w = data(40, 96, 70, seed=11)
    q, k, v = (rng.standard_normal((1, 2, 30, 16), dtype=np.float32) for _ in range(3))
    wb = Tensor(w).astype(ms.bfloat16)

    def run():
        return (wp.linear(Tensor(x), wb, products).asnumpy(),
                attention(Tensor(q), Tensor(k), Tensor(v), None, 4.0, products=products).asnumpy())

    kernel = run()
    monkeypatch.setattr(wp, "_kernels", None)
    portable = run()
    ref = (x.astype(np.float64) if products == "exact" else round_bf16(x).astype(np.float64)) @ round_bf16(w).T
    for got in (kernel[0], portable[0]):
        assert (np.abs(got - ref) <= bound(x, round_bf16(w), 96)).all()
    assert np.abs(kernel[1] - portable[1]).max() <= 1e-5 * np.abs(kernel[1]).max()


class _AddSwi(nn.Cell):
    """sum(swiglu(linear_add(x, w, c), u) * dy)."""

    def __init__(self, products):
        super().__init__()
        self.products = products

    def construct(self, x, w, c, u, dy):
        return (wp.swiglu(wp.linear_add(x, w, c, self.products), u) * dy).sum()


@pytest.mark.parametrize("products", wp.PRODUCT_MODES)
def test_linear_add_and_swiglu(mode, products):
    """linear_add is c + x w^T (bit for bit when k fits one block), swiglu is silu(g) * u; both differentiable."""
    import torch

    assert wp.enable_kernels()
    rng = np.random.default_rng(12)
    x, w = data(40, 96, 70, seed=13)
    c, u, dy = (rng.standard_normal((40, 70), dtype=np.float32) for _ in range(3))
    got = wp.linear_add(Tensor(x), Tensor(w), Tensor(c), products).asnumpy()
    np.testing.assert_array_equal(got, c + cpu_kernels.gemm_nt(x, w, products == "bf16"))
    # More rows: the threads split the rows instead of the columns (each copies its part of c before its product).
    x2, w2 = data(200, 96, 70, seed=14)
    c2 = rng.standard_normal((200, 70), dtype=np.float32)
    got = wp.linear_add(Tensor(x2), Tensor(w2), Tensor(c2), products).asnumpy()
    np.testing.assert_array_equal(got, c2 + cpu_kernels.gemm_nt(x2, w2, products == "bf16"))
    g = rng.standard_normal((3, 50, 70), dtype=np.float32) * 4
    g[0, 0, :3] = (-100.0, 100.0, 0.0)
    got = wp.swiglu(Tensor(g), Tensor(g[::-1].copy())).asnumpy()
    ref = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * g[::-1]
    assert np.abs(got - ref).max() <= 4e-7 * np.abs(ref).max()
    grads = ms.grad(_AddSwi(products), grad_position=(0, 1, 2, 3))(Tensor(x), Tensor(w), Tensor(c), Tensor(u), Tensor(dy))
    rnd = round_bf16 if products == "bf16" else (lambda a: a)
    tx, tw, tc, tu = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (rnd(x), rnd(w), c, u))
    (torch.nn.functional.silu(tc + tx @ tw.T) * tu * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    tol = 1e-5 if products == "exact" else 2e-2
    for ours, ref in zip(grads, (tx, tw, tc, tu)):
        r = ref.grad.numpy()
        assert np.abs(ours.asnumpy() - r).max() <= tol * np.abs(r).max()


@pytest.mark.parametrize("arch", ARCHS)
def test_swiglu_gradient_kernel_on_every_build(arch):
    """MxcSwiGLUGrad (dg = dy u s (1 + g (1 - s)), du = dy g s) against float64, on every build, with
    saturated sigmoids at both ends and lengths that leave scalar tails; each element's result does not depend
    on its position (vector and scalar paths do the same operations)."""
    rng = np.random.default_rng(21)
    g = rng.standard_normal((3, 1001), dtype=np.float32) * 4
    g[0, :6] = (-100.0, 100.0, 0.0, -88.0, 88.0, -20.0)
    u, dy = (rng.standard_normal(g.shape, dtype=np.float32) for _ in range(2))
    import ctypes
    kernel = ctypes.CDLL(cpu_kernels.build(arch=arch)).MxcSwiGLUGrad

    def grads(*inputs):  # -> dg, du
        inputs = [np.ascontiguousarray(a) for a in inputs]
        outs = [np.zeros_like(inputs[0]) for _ in range(2)]
        cpu_kernels.AotCall(kernel, inputs + outs)()
        return outs
    dg, du = grads(g, u, dy)
    g64, u64, d64 = (a.astype(np.float64) for a in (g, u, dy))
    s = 1 / (1 + np.exp(-g64))
    ref_du = d64 * g64 * s
    ref_dg = d64 * u64 * s * (1 + g64 * (1 - s))
    # ~1 ulp from the exponential, a few from the division and the products; scaled by each term's magnitude
    scale_dg = np.abs(d64 * u64) * (1 + np.abs(g64))
    assert (np.abs(du - ref_du) <= 16 * EPS * np.abs(d64 * g64)).all()
    assert (np.abs(dg - ref_dg) <= 16 * EPS * scale_dg).all()
    # position independence: the same values shifted by one element give the same results
    dg2, du2 = grads(g[:, 1:], u[:, 1:], dy[:, 1:])
    np.testing.assert_array_equal(dg2, dg[:, 1:])
    np.testing.assert_array_equal(du2, du[:, 1:])


class _BiasDot(nn.Cell):
    """sum(linear_bias(x, w, b, act, residual) * dy)."""

    def __init__(self, products, act, residual):
        super().__init__()
        self.products, self.act, self.residual = products, act, residual

    def construct(self, x, w, b, r, dy):
        return (wp.linear_bias(x, w, b, self.products, self.act, r if self.residual else None) * dy).sum()


@pytest.mark.parametrize("products", wp.PRODUCT_MODES)
def test_linear_bias_activation_and_residual(mode, products):
    """linear_bias (the ViT's projections): x w^T + b, CLIP's quick_gelu of it, or a residual plus it, in one
    kernel; against float64 and through the portable path (MindSpore ops), forward and gradients."""
    import torch

    assert wp.enable_kernels()
    rng = np.random.default_rng(14)
    x, w = data(40, 96, 70, seed=15)
    x *= 3  # quick_gelu's both tails
    b, = (rng.standard_normal(70, dtype=np.float32) for _ in range(1))
    r, dy = (rng.standard_normal((40, 70), dtype=np.float32) for _ in range(2))
    rnd = round_bf16 if products == "bf16" else (lambda a: a)
    for bias in (Tensor(b), Tensor(b).astype(ms.bfloat16)):
        bf = b if bias.dtype == ms.float32 else round_bf16(b)
        z = rnd(x).astype(np.float64) @ rnd(w).astype(np.float64).T + bf
        tol = 1.2 * bound(rnd(x), rnd(w), 96) + 1e-6 * np.abs(z) + 1e-6
        for act, res, ref in ((None, None, z), (wp.QUICK_GELU, None, z / (1 + np.exp(-1.702 * z))), (None, r, r + z)):
            args = (Tensor(x), Tensor(w), bias, products, act, None if res is None else Tensor(res))
            got = wp.linear_bias(*args).asnumpy()
            assert (np.abs(got - ref) <= tol).all()
            with wp.kernels_disabled():
                portable = wp.linear_bias(*args).asnumpy()
            assert (np.abs(portable - ref) <= tol).all()
        # The epilogue's own arithmetic, tightly: the bias and the residual are one fp32 addition each after
        # the product; quick_gelu is float64's within a few ulps plus the fp32 rounding of its exponent's
        # argument (|1.702 z| eps relative: the conditioning of exp, whoever computes it in fp32); far in the
        # negative tail (z < -52) the exponent saturates and the result is below 1e-36 instead of ~0.
        plain = cpu_kernels.gemm_nt(x, w, products == "bf16") + bf
        linear = wp.linear_bias(Tensor(x), Tensor(w), bias, products).asnumpy()
        np.testing.assert_array_equal(linear, plain)
        res = wp.linear_bias(Tensor(x), Tensor(w), bias, products, residual=Tensor(r)).asnumpy()
        np.testing.assert_array_equal(res, r + plain)
        gelu = wp.linear_bias(Tensor(x), Tensor(w), bias, products, wp.QUICK_GELU).asnumpy()
        p64 = plain.astype(np.float64)
        ref = p64 / (1 + np.exp(-1.702 * p64))
        assert (np.abs(gelu - ref) <= (8 + 2 * 1.702 * np.abs(p64)) * EPS * np.abs(ref) + 1e-36).all()
    tol = 1e-5 if products == "exact" else 2e-2
    for act, residual in ((None, True), (wp.QUICK_GELU, False)):
        grads = ms.grad(_BiasDot(products, act, residual), grad_position=(0, 1, 2, 3))(
            Tensor(x), Tensor(w), Tensor(b), Tensor(r), Tensor(dy))
        tx, tw, tb, tr = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (rnd(x), rnd(w), b, r))
        tz = tx @ tw.T + tb
        ty = tz * torch.sigmoid(1.702 * tz) if act else tr + tz
        (ty * torch.tensor(dy, dtype=torch.float64)).sum().backward()
        for ours, ref in zip(grads[:3] + ((grads[3],) if residual else ()), (tx, tw, tb, tr)):
            g = ref.grad.numpy()
            assert np.abs(ours.asnumpy() - g).max() <= tol * np.abs(g).max()


@pytest.mark.parametrize("products", wp.PRODUCT_MODES)
def test_attention_reads_rows_before_heads(mode, products):
    """BSND attention ([B, S, H, D], the ViT's projections as they come) is the BNSD kernel's arithmetic read
    with other strides: the same result bit for bit, and the same gradients."""
    from mindxcomposer.ops.attention import BSND, attention

    assert wp.enable_kernels()
    rng = np.random.default_rng(16)
    q, k, v, do = (rng.standard_normal((2, 37, 3, 16), dtype=np.float32) for _ in range(4))
    first = [Tensor(a.transpose(0, 2, 1, 3).copy()) for a in (q, k, v)]
    want = attention(*first, None, 4.0, products=products).asnumpy().transpose(0, 2, 1, 3)
    got = attention(Tensor(q), Tensor(k), Tensor(v), None, 4.0, products=products, layout=BSND).asnumpy()
    np.testing.assert_array_equal(got, want)

    class Dot(nn.Cell):
        def construct(self, q, k, v, do, layout):
            return (attention(q, k, v, None, 4.0, products=products, layout=layout) * do).sum()

    class DotFirst(nn.Cell):
        def construct(self, q, k, v, do):
            return (attention(q, k, v, None, 4.0, products=products) * do).sum()

    g_tokens = ms.grad(Dot(), grad_position=(0, 1, 2))(Tensor(q), Tensor(k), Tensor(v), Tensor(do), BSND)
    g_first = ms.grad(DotFirst(), grad_position=(0, 1, 2))(*first, Tensor(do.transpose(0, 2, 1, 3).copy()))
    for a, b in zip(g_tokens, g_first):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy().transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-6)


class _NormDot(nn.Cell):
    def construct(self, x, w, dy):
        return (wp.rms_norm(x, w, 1e-6) * dy).sum()


def test_rms_norm_kernel(mode):
    """The RMSNorm kernel against float64 and the portable path (upstream's op sequence in MindSpore), with
    fp32 and bf16 weights, forward and gradients."""
    import torch

    assert wp.enable_kernels()
    rng = np.random.default_rng(17)
    x = rng.standard_normal((3, 37, 100), dtype=np.float32) * 5
    x[0, 0] = 0  # a zero row: eps alone
    w = 1 + 0.1 * rng.standard_normal(100, dtype=np.float32)
    dy = rng.standard_normal((3, 37, 100), dtype=np.float32)
    for weight in (Tensor(w), Tensor(w).astype(ms.bfloat16)):
        wf = w if weight.dtype == ms.float32 else round_bf16(w)
        x64 = x.astype(np.float64)
        ref = wf * (x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6))
        got = wp.rms_norm(Tensor(x), weight, 1e-6).asnumpy()
        assert np.abs(got - ref).max() <= 8 * EPS * np.abs(ref).max()
        with wp.kernels_disabled():
            portable = wp.rms_norm(Tensor(x), weight, 1e-6).asnumpy()
        assert np.abs(portable - got).max() <= 8 * EPS * np.abs(ref).max()
    dx, dw = ms.grad(_NormDot(), grad_position=(0, 1))(Tensor(x), Tensor(w), Tensor(dy))
    tx, tw = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w))
    (tw * tx * torch.rsqrt((tx * tx).mean(-1, keepdim=True) + 1e-6) * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    for ours, ref in ((dx, tx), (dw, tw)):
        r = ref.grad.numpy()
        assert np.abs(ours.asnumpy() - r).max() <= 1e-5 * np.abs(r).max()


class _LayerNormDot(nn.Cell):
    def __init__(self):
        super().__init__()
        self.portable = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=1e-5)

    def construct(self, x, w, b, dy):
        return (wp.layer_norm(x, w, b, 1e-5, self.portable) * dy).sum()


def test_layer_norm_kernel(mode):
    """The LayerNorm kernel (the ViT's) against float64 and the portable path (MindSpore's LayerNorm), with fp32 and
    bf16 weights, forward and the gradients in x, weight and bias (rows over several of the gradient's 64-row blocks,
    a width with a tail past its 16 lanes, a constant row: its deviations are zero)."""
    import torch

    assert wp.enable_kernels()
    rng = np.random.default_rng(19)
    x = rng.standard_normal((3, 61, 100), dtype=np.float32) * 3 + 2
    x[0, 0] = 1.5
    w = 1 + 0.1 * rng.standard_normal(100, dtype=np.float32)
    b = 0.1 * rng.standard_normal(100, dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    portable = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=1e-5)
    for weight, bias in ((Tensor(w), Tensor(b)), (Tensor(w).astype(ms.bfloat16), Tensor(b).astype(ms.bfloat16))):
        wf, bf = (w, b) if weight.dtype == ms.float32 else (round_bf16(w), round_bf16(b))
        x64 = x.astype(np.float64)
        mean = x64.mean(-1, keepdims=True)
        ref = wf * (x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean(-1, keepdims=True) + 1e-5) + bf
        got = wp.layer_norm(Tensor(x), weight, bias, 1e-5, portable).asnumpy()
        assert np.abs(got - ref).max() <= 16 * EPS * np.abs(ref).max()
        with wp.kernels_disabled():
            other = wp.layer_norm(Tensor(x), weight, bias, 1e-5, portable).asnumpy()
        assert np.abs(other - got).max() <= 16 * EPS * np.abs(ref).max()
    dx, dw, db = ms.grad(_LayerNormDot(), grad_position=(0, 1, 2))(Tensor(x), Tensor(w), Tensor(b), Tensor(dy))
    tx, tw, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w, b))
    (torch.nn.functional.layer_norm(tx, (100,), tw, tb, 1e-5) * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    for ours, ref in ((dx, tx), (dw, tw), (db, tb)):
        r = ref.grad.numpy()
        assert np.abs(ours.asnumpy() - r).max() <= 1e-5 * np.abs(r).max()


from mindxcomposer.ops.attention import attention  # noqa: E402  (traced in a graph: imported at module level)


class _FusedAttnDot(nn.Cell):
    def __init__(self, div, masked, products=wp.EXACT):
        super().__init__()
        self.div, self.masked, self.products = div, masked, products

    def construct(self, q, k, v, mask, dy):
        return (attention(q, k, v, mask if self.masked else None, self.div, products=self.products) * dy).sum()


@pytest.mark.parametrize("n", [40, 200])
def test_fused_attention_gradient(mode, n):
    """The attention kernel's gradient (one kernel recomputing the weights by blocks of 96 query rows, never
    [heads, positions, keys] at once) against float64: one block and several (200 positions of 2 query heads a
    key head: 5 blocks, each over the keys its rows see), a causal mask with a left-padded row, a row that sees no
    key (uniform weights, differentiated as the plain softmax is), and no mask (the ViT). bf16 products: inputs
    of every product rounded to bf16, so a looser bound, still far below a wrong gradient's error."""
    import torch

    assert wp.enable_kernels()
    b, h, kv, d = 2, 4, 2, 16
    rng = np.random.default_rng(12)
    q, dy = (rng.standard_normal((b, h, n, d), dtype=np.float32) for _ in range(2))
    k, v = (rng.standard_normal((b, kv, n, d), dtype=np.float32) for _ in range(2))
    visible = np.broadcast_to(np.tril(np.ones((n, n), bool)), (b, n, n)).copy()
    visible[1, :, :5] = False
    visible[1, :5] = np.eye(n, dtype=bool)[:5]  # padding rows see themselves only
    visible[0, 7] = False  # sees no key
    mask = np.where(visible, 0, np.finfo(np.float32).min).astype(np.float32)[:, None]
    for products, tol in ((wp.EXACT, 2e-5), (wp.BF16, 2e-2)):
        for masked in (True, False):
            got = ms.grad(_FusedAttnDot(4.0, masked, products), grad_position=(0, 1, 2))(
                Tensor(q), Tensor(k), Tensor(v), Tensor(mask), Tensor(dy))
            tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
            g = h // kv
            s = tq.reshape(b, kv, g * n, d) @ tk.transpose(-1, -2) / 4.0
            if masked:
                s = (s.reshape(b, kv, g, n, n) + torch.tensor(mask, dtype=torch.float64)[:, None]).reshape(s.shape)
            out = (torch.softmax(s, -1) @ tv).reshape(b, h, n, d)
            (out * torch.tensor(dy, dtype=torch.float64)).sum().backward()
            for ours, ref in zip(got, (tq, tk, tv)):
                r = ref.grad.numpy()
                assert np.abs(ours.asnumpy() - r).max() <= tol * np.abs(r).max(), (products, masked)


_ATTENTION_GRAD_MEMORY = """
import sys
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from benchmarks.memory_probe import peak_gib, reset_peak, rss_gib
from mindxcomposer.ops import weight_products as wp
from mindxcomposer.ops.attention import attention

ms.set_context(mode=ms.GRAPH_MODE)
assert wp.enable_kernels()
n, kv, g, d = int(sys.argv[1]), 2, 3, 16


class Dot(nn.Cell):
    def construct(self, q, k, v, mask, dy):
        return (attention(q, k, v, mask, 4.0) * dy).sum()


rng = np.random.default_rng(0)
q, dy = (Tensor(rng.standard_normal((1, kv * g, n, d), dtype=np.float32)) for _ in range(2))
k, v = (Tensor(rng.standard_normal((1, kv, n, d), dtype=np.float32)) for _ in range(2))
mask = Tensor(np.where(np.tril(np.ones((n, n), bool)), 0, np.finfo(np.float32).min).astype(np.float32)[None, None])
before = rss_gib()
reset_peak()
ms.grad(Dot(), grad_position=(0, 1, 2))(q, k, v, mask, dy)[0].asnumpy()
print("@@grew", peak_gib() - before)
"""


def test_attention_gradient_memory(tmp_path):
    """The attention gradient, compiled (GRAPH_MODE, as the decoder layer's gradient cell runs it), in a fresh
    process at 3,072 positions: its peak grows by less than one [heads, positions, keys] fp32 tensor (0.21 GiB).
    A compiled graph keeps every intermediate until it returns: written with MindSpore ops by query blocks, the
    same gradient held every block's weights at once (a tiny model's decoder-layer gradient: +7.6 GiB at 4,288
    positions, docs/finetune.md); checked by hand, that version fails this test. The kernel keeps none."""
    import os
    import subprocess
    import sys

    n, heads = 3072, 6
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = tmp_path / "attention_grad_memory.py"  # GRAPH_MODE compiles from source files only
    script.write_text(_ATTENTION_GRAD_MEMORY)
    proc = subprocess.run([sys.executable, str(script), str(n)], capture_output=True, text=True, cwd=repo, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew = float(next(x for x in proc.stdout.splitlines() if x.startswith("@@grew")).split()[1])
    scores = heads * n * n * 4 / 2 ** 30
    assert grew < scores, f"the attention gradient grew the peak by {grew:.3f} GiB, one score tensor is {scores:.3f}"


_KERNEL_PROFILE = """
import sys
import numpy as np
import mindspore as ms
from mindspore import Tensor
from mindxcomposer.ops import cpu_kernels
from mindxcomposer.ops import weight_products as wp

assert wp.enable_kernels()
x, w = np.ones((40, 24), np.float32), np.ones((56, 24), np.float32)
assert cpu_kernels.kernel_profile(reset=True)
for _ in range(3):
    wp.linear(Tensor(x), Tensor(w)).asnumpy()
assert cpu_kernels.kernel_profile(sys.argv[1])
"""


def test_kernel_profile_build(tmp_path):
    """A profiling build (MXC_KERNEL_PROFILE=1 when the library is built, the fine-tuning benchmark's
    --kernel-profile) counts each entry point's calls, time and FLOPs with its operands' shapes; a normal build has
    no counts (`kernel_profile` is False)."""
    import os
    import subprocess
    import sys

    assert wp.enable_kernels() and not cpu_kernels.kernel_profile()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), MXC_KERNEL_PROFILE="1")
    script, out = tmp_path / "kernel_profile.py", tmp_path / "kernels.tsv"
    script.write_text(_KERNEL_PROFILE)
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, cwd=repo, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert [r[3] for r in rows] == ["MxcLinearNT [40,24] x [56,24] x [40,56]"], rows  # its first three operands
    ms_, calls, flops = (float(v) for v in rows[0][:3])
    assert calls == 3 and flops == 3 * 2 * 40 * 24 * 56 and ms_ > 0


# (B, N, KV, G, D): release width (8 kv groups of 4 query heads, D 128), batches, odd and single rows (decode), a
# half-width that is not a multiple of the 16-lane vectors (the scalar tail), one query head per group.
ROPE_SHAPES = [(1, 37, 8, 4, 128), (2, 9, 8, 4, 128), (3, 1, 8, 4, 128), (2, 33, 2, 3, 40), (1, 6, 3, 1, 8)]


def _rope_inputs(b, n, kv, g, d, seed):
    """Packed q/k/v with signed zeros among them, cos / sin as `rope.packed_rope` lays them out (rotation on the
    query and key slots, cos 1 and sin 0 on the value slot, rotate_half's sign in sin's first half)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, n, kv, g + 2, d), dtype=np.float32) * 3
    x.reshape(-1)[::7] = -0.0
    x.reshape(-1)[3::11] = 0.0
    angles = rng.uniform(0, 300, (b, n, 1, 1, d // 2))
    cos = np.ones((b, n, 1, g + 2, d), np.float32)
    sin = np.zeros((b, n, 1, g + 2, d), np.float32)
    cos[..., :g + 1, :] = np.cos(np.concatenate([angles, angles], -1)).astype(np.float32)
    s = np.sin(np.concatenate([angles, angles], -1)).astype(np.float32)
    s[..., :d // 2] = -s[..., :d // 2]
    sin[..., :g + 1, :] = s
    return x, cos, sin


def _swap(d):
    return Tensor(np.concatenate([np.arange(d // 2, d), np.arange(d // 2)]).astype(np.int32))


class _RopeDot(nn.Cell):
    """sum(q dq + k dk + v dv) through the kernel's primitive itself (`kernel`), or through the portable path
    (then traced with the kernels off): both paths give the same bits, so the choice is explicit."""

    def __init__(self, d, kernel):
        super().__init__()
        self.swap = _swap(d)
        self.kernel = kernel

    def construct(self, x, cos, sin, dq, dk, dv):
        if self.kernel:
            q, k, v = wp.kernels().rope_split(x, cos, sin)
        else:
            q, k, v = wp.rope_split(x, cos, sin, self.swap)
        return (q * dq).sum() + (k * dk).sum() + (v * dv).sum()


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("shape", ROPE_SHAPES)
def test_rope_split_kernel_is_the_portable_path_bit_for_bit(mode, shape):
    """RoPE + the q/k/v split in one kernel pass: the same bits (signed zeros included) as the portable path's
    Mul, Gather, Mul, Add and transposes, and as numpy's separately rounded x cos + swap(x) sin: no FMA anywhere."""
    b, n, kv, g, d = shape
    x, cos, sin = _rope_inputs(*shape, seed=sum(shape))
    assert wp.enable_kernels()
    args = (Tensor(x), Tensor(cos), Tensor(sin), _swap(d))
    kernel = [t.asnumpy() for t in wp.rope_split(*args)]
    with wp.kernels_disabled():
        portable = [t.asnumpy() for t in wp.rope_split(*args)]
    half = d // 2
    y = x * cos + np.concatenate([x[..., half:], x[..., :half]], -1) * sin  # fp32, each operation rounded
    ref = (y[:, :, :, :g].transpose(0, 2, 3, 1, 4).reshape(b, kv * g, n, d), y[:, :, :, g].transpose(0, 2, 1, 3),
           y[:, :, :, g + 1].transpose(0, 2, 1, 3))
    for got, por, want in zip(kernel, portable, ref):
        assert got.shape == want.shape
        np.testing.assert_array_equal(_bits(got), _bits(por))
        np.testing.assert_array_equal(_bits(got), _bits(want))
    np.testing.assert_array_equal(kernel[2], x[:, :, :, g + 1].transpose(0, 2, 1, 3))  # the value slot: unrotated


@pytest.mark.parametrize("shape", [ROPE_SHAPES[0], ROPE_SHAPES[2], ROPE_SHAPES[3]])
def test_rope_split_gradient_is_the_portable_paths(mode, shape):
    """The kernel's gradient (dy cos + swap(dy sin), dy put back in the packed layout) equals MindSpore's
    autodiff of the portable path bit for bit, and float64's."""
    b, n, kv, g, d = shape
    x, cos, sin = _rope_inputs(*shape, seed=sum(shape) + 1)
    rng = np.random.default_rng(sum(shape) + 2)
    dq = rng.standard_normal((b, kv * g, n, d), dtype=np.float32)
    dk, dv = (rng.standard_normal((b, kv, n, d), dtype=np.float32) for _ in range(2))
    args = [Tensor(a) for a in (x, cos, sin, dq, dk, dv)]
    assert wp.enable_kernels()
    kernel = ms.grad(_RopeDot(d, True), grad_position=0)(*args).asnumpy()
    with wp.kernels_disabled():
        portable = ms.grad(_RopeDot(d, False), grad_position=0)(*args).asnumpy()
    np.testing.assert_array_equal(kernel, portable)
    dy = np.concatenate([dq.reshape(b, kv, g, n, d).transpose(0, 3, 1, 2, 4),
                         dk.transpose(0, 2, 1, 3)[:, :, :, None], dv.transpose(0, 2, 1, 3)[:, :, :, None]], 3)
    t = dy.astype(np.float64) * sin
    half = d // 2
    ref = dy * cos.astype(np.float64) + np.concatenate([t[..., half:], t[..., :half]], -1)
    assert np.abs(kernel - ref).max() <= 2 * EPS * np.abs(ref).max()


class _Dropout(nn.Cell):
    """sum(hash_dropout(x) * dy), and the dropout itself."""

    def __init__(self, p, salt):
        super().__init__()
        self.p, self.salt = p, salt

    def construct(self, x, seed, row_base):
        return wp.hash_dropout(x, self.p, seed, self.salt, row_base)


class _DropoutDot(_Dropout):
    def construct(self, x, seed, row_base, dy):
        return (wp.hash_dropout(x, self.p, seed, self.salt, row_base) * dy).sum()


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_hash_dropout_kernel(mode, p):
    """Fine-tuning's dropout in one kernel pass against the portable path (the sin-hash in MindSpore's ops): the
    same values wherever the masks agree, and masks that differ only where libm's sin and MindSpore's differ in a
    last bit next to the threshold (or next to an integer, where the fraction wraps); a block of rows draws the
    whole sequence's mask there; the gradient is dy through the same mask."""
    assert wp.enable_kernels()
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 96, 700), dtype=np.float32)
    dy = rng.standard_normal((2, 96, 700), dtype=np.float32)
    seed, base = Tensor(np.float32(37.0)), np.array([[0.0], [5000.0]], np.float32)
    salt = 3 * 1.618
    cell = _Dropout(p, salt)
    got = cell(Tensor(x), seed, Tensor(base)).asnumpy()
    with wp.kernels_disabled():
        portable = cell(Tensor(x), seed, Tensor(base)).asnumpy()
    kept, kept_portable = got != 0, portable != 0
    np.testing.assert_array_equal(got[kept & kept_portable], portable[kept & kept_portable])
    np.testing.assert_array_equal(got[kept], (x[kept] / np.float32(1.0 - p)))
    flips = np.argwhere(kept != kept_portable)
    assert len(flips) <= 1e-4 * x.size, len(flips)
    for s, i, c in flips:  # the hash's fraction, from the same fp32 argument, lies next to p or to 0 / 1
        arg = (np.float32(base[s, 0] + np.float32(i)) * np.float32(12.9898) + np.float32(c) * np.float32(78.233)
               + (np.float32(37.0) + np.float32(salt)))
        u = np.sin(np.float64(np.float32(arg))) * 43758.5453
        frac = u - np.floor(u)
        assert min(abs(frac - p), frac, 1 - frac) < 1e-2, (s, i, c, frac)
    assert abs(kept.mean() - (1 - p)) < 1e-2
    block = cell(Tensor(x[:, 40:80].copy()), seed, Tensor(base + np.float32(40))).asnumpy()
    np.testing.assert_array_equal(block, got[:, 40:80])
    dx = ms.grad(_DropoutDot(p, salt), grad_position=0)(Tensor(x), seed, Tensor(base), Tensor(dy)).asnumpy()
    np.testing.assert_array_equal(dx, cell(Tensor(dy), seed, Tensor(base)).asnumpy())
