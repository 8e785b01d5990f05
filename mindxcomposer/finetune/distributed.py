"""Data parallelism over MindSpore's own collectives, as launched by `msrun --worker_num N ...`.

Each worker trains on its own micro-batches (worker r takes r, r+N, ...); before every optimizer step
(and before clipping) the accumulated gradients are averaged over the workers with AllReduce (what DDP
does), so that every worker applies the same update to the same weights: N workers with accumulation A
make the steps one worker makes with accumulation N * A. The logged loss is averaged over the workers
too; only rank 0 writes. AllReduce is used rather than ReduceScatter, which MindSpore's CPU collectives
do not provide.
"""
import os
from typing import Dict, List

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops


def launched_by_msrun() -> bool:
    """msrun runs the command in its workers (MS_ROLE=MS_WORKER) and also in a scheduler process
    (MS_ROLE=MS_SCHED), whatever --worker_num is, 1 included: both must call `init()`, where the
    scheduler serves the cluster and its process ends, instead of training on its own."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


class World:
    """The data-parallel group: `size` workers, this one `rank`; a single process is a world of one."""

    def __init__(self):
        self.size, self.rank = 1, 0
        self._sum = self._gather = None
        if launched_by_msrun():
            from mindspore.communication import get_group_size, get_rank, init
            init()
            ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
            self.size, self.rank = get_group_size(), get_rank()
            self._sum = ops.AllReduce(ops.ReduceOp.SUM)
            self._gather = ops.AllGather()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, tensors: List[Tensor]) -> List[Tensor]:
        if self.size == 1:
            return tensors
        scale = Tensor(np.float32(1.0 / self.size))
        return [self._sum(t.astype(ms.float32)) * scale for t in tensors]

    def mean_scalars(self, values: List[float]) -> List[float]:
        """The mean over workers of Python floats, at float64 precision. MindSpore's CPU collectives
        compute float64 tensors in float32 (measured: AllReduce and AllGather both round), so each value
        travels as a float32 pair (v = hi + lo, exact to ~1e-14) through AllGather, summed here in float64."""
        if self.size == 1:
            return [float(v) for v in values]
        v = np.asarray(values, np.float64)
        hi = v.astype(np.float32)
        lo = (v - hi).astype(np.float32)
        parts = self._gather(Tensor(np.stack([hi, lo])[None])).asnumpy().astype(np.float64)  # [size, 2, n]
        return [float(x) / self.size for x in (parts[:, 0] + parts[:, 1]).sum(0)]

    def average_grads(self, grads: Dict[str, Tensor], names: List[str], shapes: Dict[str, tuple]) -> Dict[str, Tensor]:
        """Average over workers the gradients of the parameters some worker has one for (a worker without
        one adds zeros), as one process accumulating all the workers' micro-batches would; a parameter no
        worker has a gradient for stays out, so that the optimizer skips it as it does in one process
        (no step count, no weight decay). In `names` order, whatever the order the gradients came in."""
        if self.size == 1:
            return {n: grads[n] for n in names if n in grads}
        have = self._sum(Tensor(np.asarray([n in grads for n in names], np.float32))).asnumpy()
        used = [n for n, h in zip(names, have) if h > 0]
        full = [grads[n] if n in grads else ops.zeros(shapes[n], ms.float32) for n in used]
        return dict(zip(used, self.mean(full)))
