"""Data parallelism over MindSpore's own collectives, as launched by `msrun --worker_num N ...`.

Each worker trains on its own micro-batches (worker r takes r, r+N, ...); before every optimizer step
the accumulated gradients are averaged over the workers with AllReduce (what DDP does), so that every
worker applies the same update to the same weights. The logged loss is averaged the same way.
AllReduce is used rather than ReduceScatter, which MindSpore's CPU collectives do not provide.
"""
import os
from typing import Dict, List

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops


def launched_by_msrun() -> bool:
    return int(os.environ.get("MS_WORKER_NUM", "1")) > 1 and "MS_ROLE" in os.environ


class World:
    """The data-parallel group: `size` workers, this one `rank`; a single process is a world of one."""

    def __init__(self):
        self.size, self.rank = 1, 0
        self._sum = None
        if launched_by_msrun():
            from mindspore.communication import get_group_size, get_rank, init
            init()
            ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
            self.size, self.rank = get_group_size(), get_rank()
            self._sum = ops.AllReduce(ops.ReduceOp.SUM)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, tensors: List[Tensor]) -> List[Tensor]:
        if self.size == 1:
            return tensors
        scale = Tensor(np.float32(1.0 / self.size))
        return [self._sum(t.astype(ms.float32)) * scale for t in tensors]

    def mean_scalars(self, values: List[float]) -> List[float]:
        if self.size == 1:
            return [float(v) for v in values]
        out = self._sum(Tensor(np.asarray(values, np.float64).astype(np.float32)))
        return [float(v) / self.size for v in out.asnumpy()]

    def any(self, flag: bool) -> bool:
        if self.size == 1:
            return bool(flag)
        return float(self._sum(Tensor(np.float32(1.0 if flag else 0.0)).reshape(1)).asnumpy()[0]) > 0

    def average_grads(self, grads: Dict[str, Tensor], names: List[str], shapes: Dict[str, tuple]) -> Dict[str, Tensor]:
        """Average over workers; a name some worker has no gradient for counts as zeros there."""
        if self.size == 1:
            return grads
        full = [grads[n] if n in grads else ops.zeros(shapes[n], ms.float32) for n in names]
        return dict(zip(names, self.mean(full)))
