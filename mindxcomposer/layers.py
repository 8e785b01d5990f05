"""Basic cells whose parameters carry upstream's names (`weight`, `bias`), initialised lazily.

Parameters start as lazy zeros: `from_pretrained` overwrites every one of them, and drawing random
initial values for 8B parameters first would only cost time and memory.

Parameters are stored in the model's storage dtype; every product and every use goes through
`mindxcomposer.ops` (`linear`, `embedding`, `cast_like`), which computes in the activations' dtype.
"""
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

from .ops import EXACT, cast_like, embedding, layer_norm, linear, rms_norm


def lazy_param(shape, dtype, name, fill="zeros"):
    return Parameter(initializer(fill, shape, dtype), name=name)


class Linear(nn.Cell):
    """y = x W^T + b with W [out, in] as in torch; any number of leading dimensions."""

    def __init__(self, in_features, out_features, bias=True, dtype=ms.float32, products=EXACT):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.products = products  # the arithmetic of the product (`ops.weight_products`)
        self.weight = lazy_param((out_features, in_features), dtype, "weight")
        self.bias = lazy_param((out_features,), dtype, "bias") if bias else None

    def construct(self, x):
        y = linear(x, self.weight, self.products)
        if self.bias is not None:
            y = y + cast_like(self.bias, y)
        return y


class LayerNorm(nn.Cell):
    def __init__(self, size, eps=1e-5, dtype=ms.float32):
        super().__init__()
        self.weight = lazy_param((size,), dtype, "weight", "ones")
        self.bias = lazy_param((size,), dtype, "bias")
        self.eps = eps
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)  # the portable path

    def construct(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps, self.norm)




class RMSNorm(nn.Cell):
    def __init__(self, size, eps=1e-6, dtype=ms.float32):
        super().__init__()
        self.weight = lazy_param((size,), dtype, "weight", "ones")
        self.eps = eps

    def construct(self, x):
        return rms_norm(x, self.weight, self.eps)


class Embedding(nn.Cell):
    def __init__(self, num, size, dtype=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        self.weight = lazy_param((num, size), dtype, "weight")
        self.compute_dtype = compute_dtype

    def construct(self, ids):
        return embedding(ids, self.weight, self.compute_dtype)
