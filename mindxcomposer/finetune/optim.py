"""The optimisation of transformers 4.33's Trainer with `optim=adamw_torch` (upstream's default), in MindSpore.

- `AdamW`: torch.optim.AdamW's single-tensor update (what torch runs on CPU), operation for operation:
  decoupled decay `p *= 1 - lr*wd`, `m.lerp_(g, 1-beta1)`, `v = v*beta2 + (1-beta2) g g`, then
  `p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)`, with a step count per parameter. A parameter without a
  gradient in a step (torch: `grad is None`, e.g. the ViT after text-only micro-batches) is skipped
  entirely: no decay, no moment update, no step count.
- `lr_lambda`: transformers' schedules (`get_scheduler`), every one but reduce_lr_on_plateau; the learning rate of optimizer step k (0-based) is `lr * lambda(k)`, so with
  warmup the first step runs at 0, as upstream.
- `state_dir`: the moments in files there (read and written back per parameter at each step, the same fp32
  values: DeepSpeed's optimizer-state offload to NVMe), not in memory (1.1 GiB with upstream's LoRA at the release's
  size).
- `clip_grad_norm`: torch.nn.utils.clip_grad_norm_: the 2-norm of the per-tensor 2-norms, and every
  gradient times min(1, max_norm / (norm + 1e-6)).

On CPU (the library of `ops.cpu_kernels`) the update runs in place in the Parameters' and moments' own memory, in
threads, and a norm's sum of squares in double (`MxcAdamWStep`, `MxcSumSquares`): numpy's version made a temporary
array per operation, and for the trained head and embedding of full fine-tuning (47M values each at the mid size)
those came as fresh pages every step (a mid-size full step spent ~4.8 s in AdamW and ~1.3 s in the norm).
Elsewhere, numpy (the same AdamW values).
"""
import math
import os
import shutil
import weakref
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from ..ops import cpu_kernels
from ..weights import LazyArrays, array_spec
from .spill import spill_directory

SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
             "inverse_sqrt")


def lr_lambda(kind: str, warmup: int, total: int, lr_init: float = 1.0):
    """transformers 4.33's `get_scheduler(kind, warmup, total)` lambdas (defaults: one cosine cycle; polynomial
    to lr_end 1e-7 with power 1; inverse_sqrt with timescale = warmup)."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type must be one of {SCHEDULES}, got {kind!r}")
    if kind == "polynomial" and not lr_init > 1e-7:
        raise ValueError(f"lr_scheduler_type polynomial decays to 1e-7: learning_rate must be above it, got {lr_init}")
    if kind == "inverse_sqrt" and warmup < 1:
        raise ValueError("lr_scheduler_type inverse_sqrt needs warmup steps (its timescale)")

    def warm(step: int) -> float:
        if kind == "constant_with_warmup":
            return float(step) / float(max(1.0, warmup))
        return float(step) / float(max(1, warmup))

    def f(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warmup:
            return warm(step)
        if kind == "constant_with_warmup":
            return 1.0
        if kind == "inverse_sqrt":
            return 1.0 / math.sqrt(step / warmup)  # timescale = warmup: no shift
        if kind == "linear":
            return max(0.0, float(total - step) / float(max(1, total - warmup)))
        if kind == "polynomial":
            lr_end = 1e-7
            if step > total or total == warmup:
                return lr_end / lr_init
            pct_remaining = 1 - (step - warmup) / (total - warmup)
            return ((lr_init - lr_end) * pct_remaining ** 1.0 + lr_end) / lr_init
        progress = float(step - warmup) / float(max(1, total - warmup))
        if kind == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((1.0 * progress) % 1.0))))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    return f


def _adamw_update(p, m, v, g, decay_factor, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size):
    """One torch AdamW update on fp32 numpy arrays with fp32 scalars -> new (p, m, v): each operation one IEEE fp32
    operation, as torch's CPU kernels and MindSpore's element-wise ops make them. In numpy, not a compiled graph: the
    update of a small tensor is microseconds of arithmetic, and a graph call per parameter cost ~3-7 ms (a mid-size
    LoRA step's 60 adapter tensors: 0.19-0.44 s, against ~0.07 s now with the assignments; docs/finetune.md)."""
    p = p * decay_factor
    m = m + one_minus_beta1 * (g - m)  # torch's lerp for a weight below 0.5
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = np.sqrt(v) / bc2_sqrt + eps
    return p + neg_step_size * (m / denom), m, v


def _array(t) -> np.ndarray:
    """fp32 numpy values of a Tensor or Parameter (a bf16 gradient widened first)."""
    return (t if t.dtype == ms.float32 else t.astype(ms.float32)).asnumpy()


def _host_kernels():
    """The CPU library's plain-C entry points (`cpu_kernels.host_entry_points`: `adamw_step`, `sum_squares`), or None
    (not on CPU, or not built): then numpy, with the same values for AdamW."""
    return cpu_kernels.host_entry_points()


def _writable(a: np.ndarray) -> np.ndarray:
    """`a` as a C-contiguous, writable fp32 array (itself where it is one; a checkpoint's arrays may be read-only)."""
    a = np.ascontiguousarray(a, np.float32)
    return a if a.flags.writeable else a.copy()


def _shared(p, a: np.ndarray) -> bool:
    """Whether the numpy array `a` (from `p.asnumpy()`) is the Parameter's own memory: so on CPU, where a write to it
    is what the graphs read next."""
    return np.shares_memory(a, p.asnumpy())


class AdamW:
    """torch.optim.AdamW over named Parameters, `decay[name]` choosing weight decay or 0. With `state_dir`, the
    moments live in files in a fresh directory there (removed with the optimizer)."""

    def __init__(self, params: Dict[str, Parameter], lr: float, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, decay: Dict[str, bool] = None, state_dir: Optional[str] = None):
        self.params = params
        self.lr = float(lr)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.decay = decay or {n: True for n in params}
        self.steps: Dict[str, int] = {}
        self.exp_avg: Dict[str, np.ndarray] = {}  # in memory (without `state_dir`)
        self.exp_avg_sq: Dict[str, np.ndarray] = {}
        self._dir = spill_directory(state_dir, ".optimizer-state-") if state_dir is not None else None
        if self._dir is not None:
            self._file_of = {name: i for i, name in enumerate(params)}
            weakref.finalize(self, shutil.rmtree, self._dir, True)

    @property
    def on_disk(self) -> bool:
        return self._dir is not None

    def _paths(self, name) -> Tuple[str, str]:
        i = self._file_of[name]
        return os.path.join(self._dir, f"{i}.exp_avg.f32"), os.path.join(self._dir, f"{i}.exp_avg_sq.f32")

    def _state(self, name) -> Tuple[np.ndarray, np.ndarray]:
        """The in-memory moments of `name` (fp32 numpy arrays, updated in place), zeros before its first step."""
        if name not in self.exp_avg:
            shape = tuple(self.params[name].shape)
            self.exp_avg[name], self.exp_avg_sq[name] = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        return self.exp_avg[name], self.exp_avg_sq[name]

    def _moments(self, name) -> Tuple[np.ndarray, np.ndarray]:
        """(exp_avg, exp_avg_sq) of `name` as writable fp32 numpy arrays: in memory the kept arrays themselves, on disk
        what the files hold; zeros before its first step."""
        if self._dir is None:
            return self._state(name)
        shape = tuple(self.params[name].shape)
        if name not in self.steps:
            return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        return tuple(np.fromfile(f, np.float32).reshape(shape) for f in self._paths(name))

    def _keep(self, name, m: np.ndarray, v: np.ndarray) -> None:
        if self._dir is None:
            for kept, a in ((self.exp_avg, m), (self.exp_avg_sq, v)):
                # The kept array itself after an in-place step; any other (a loaded state, numpy's update) is copied:
                # the optimizer's moments are its own.
                kept[name] = a if kept.get(name) is a else np.array(a, np.float32)
            return
        for f, a in zip(self._paths(name), (m, v)):
            np.asarray(a, np.float32).tofile(f)

    def step(self, grads: Dict[str, Tensor], lr: float) -> None:
        kernels = _host_kernels()
        for name, g in grads.items():
            m, v = self._moments(name)
            step = self.steps.get(name, 0) + 1
            wd = self.weight_decay if self.decay[name] else 0.0
            bc1 = 1 - self.beta1 ** step
            bc2 = 1 - self.beta2 ** step
            p = self.params[name]
            f32 = np.float32
            scalars = (f32(1 - lr * wd), f32(1 - self.beta1), f32(self.beta2), f32(1 - self.beta2),
                       f32(math.sqrt(bc2)), f32(self.eps), f32(-(lr / bc1)))
            if kernels is not None and p.dtype == ms.float32:
                # In place, in threads, no temporaries (`MxcAdamWStep`: numpy's operations, the same values).
                pa, ga = _array(p), np.ascontiguousarray(_array(g))
                target = _writable(pa)  # pa itself where it can be written in place
                kernels.adamw_step(target.ctypes.data, m.ctypes.data, v.ctypes.data, ga.ctypes.data, target.size,
                                   *scalars)
                if target is not pa or not _shared(p, pa):
                    ops.assign(p, Tensor(target))
            else:
                new_p, m, v = _adamw_update(_array(p), m, v, _array(g), *scalars)
                ops.assign(p, Tensor(new_p))
            self._keep(name, m, v)
            self.steps[name] = step

    # -- state for checkpoints (torch's layout: per-parameter step, exp_avg, exp_avg_sq) --------------
    def state_dict(self) -> Dict[str, np.ndarray]:
        return dict(self.state_arrays())

    def state_arrays(self) -> LazyArrays:
        """`state_dict`'s entries, each read when it is asked for: writing a checkpoint then holds one moment at a
        time (the adapter's moments are 2.25 GB at the release's size)."""
        names = [f"{kind}/{name}" for name in self.steps for kind in ("step", "exp_avg", "exp_avg_sq")]

        def make(key):
            kind, name = key.split("/", 1)
            if kind == "step":
                return np.asarray(self.steps[name], np.int64)
            if self._dir is None:
                m, v = self._state(name)
                return m if kind == "exp_avg" else v
            f = self._paths(name)[0 if kind == "exp_avg" else 1]
            return np.fromfile(f, np.float32).reshape(tuple(self.params[name].shape))

        def spec(key):
            kind, name = key.split("/", 1)
            return ((), np.int64) if kind == "step" else (tuple(self.params[name].shape), np.float32)
        return LazyArrays(names, make, spec)

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Takes what `state_dict` wrote: each parameter's step and both moments, or nothing of it (not stepped
        yet); anything else is an error naming the parameter, before any of it is applied. `state` may be lazy
        (a checkpoint's file): each moment is read once, when applied, so resuming holds one at a time; its size is
        checked from the mapping's specs when it has them."""
        entries: Dict[str, set] = {}
        for key in state:
            kind, _, name = key.partition("/")
            if kind not in ("step", "exp_avg", "exp_avg_sq"):
                raise ValueError(f"optimizer state has an entry this optimizer does not keep: {key}")
            if name not in self.params:
                raise ValueError(f"optimizer state names a parameter that does not train here: {name}")
            entries.setdefault(name, set()).add(kind)
        for name, kinds in entries.items():
            missing = {"step", "exp_avg", "exp_avg_sq"} - kinds
            if missing:
                raise ValueError(f"optimizer state of {name} lacks {', '.join(sorted(missing))}")
            shape = tuple(self.params[name].shape)
            for kind in ("exp_avg", "exp_avg_sq"):
                size = int(np.prod(array_spec(state, f"{kind}/{name}")[0], dtype=np.int64))
                if size != int(np.prod(shape)):
                    raise ValueError(f"optimizer state {kind}/{name} has {size} values, the parameter's shape is "
                                     f"{shape}")

        def moment(kind, name):
            return np.asarray(state[f"{kind}/{name}"], np.float32).reshape(tuple(self.params[name].shape))
        for name in entries:
            self._keep(name, moment("exp_avg", name), moment("exp_avg_sq", name))
            self.steps[name] = int(np.asarray(state[f"step/{name}"]))


def _norm(g) -> np.float32:
    """One tensor's 2-norm as an fp32 value: with the CPU kernels its sum of squares in double (`MxcSumSquares`, no
    temporary), else numpy's fp32 sum."""
    a = np.ascontiguousarray(_array(g))
    kernels = _host_kernels()
    if kernels is not None:
        return np.float32(math.sqrt(kernels.sum_squares(a.ctypes.data, a.size)))
    return np.sqrt(np.sum(np.square(a), dtype=np.float32))


def global_norm(grads: List[Tensor]) -> float:
    """The 2-norm of the per-tensor 2-norms, in fp32 (on the host: no graph call per tensor)."""
    norms = np.array([_norm(g) for g in grads], np.float32)
    return float(np.sqrt(np.sum(norms * norms, dtype=np.float32)))


def clip_grad_norm(grads: Dict[str, Tensor], max_norm: float) -> float:
    """Scales `grads` in place as torch does; returns the total norm before clipping. A coefficient of 1 leaves them
    as they are (x * 1 is x); with the CPU kernels a gradient is scaled in its own memory (no copy)."""
    total = global_norm(list(grads.values()))
    coef = np.float32(min(np.float32(max_norm) / (np.float32(total) + np.float32(1e-6)), np.float32(1.0)))
    if coef == np.float32(1.0):
        return total
    in_place = _host_kernels() is not None
    for name, g in grads.items():
        a = _array(g)
        if in_place and g.dtype == ms.float32 and a.flags.writeable and _shared(g, a):
            np.multiply(a, coef, out=a)
        else:
            grads[name] = Tensor(a * coef)
    return total
