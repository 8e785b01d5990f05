"""Which samples make each micro-batch (`batch_size` samples, all of one kind).

`UpstreamMixSampler` is upstream's `Mix_dataset.__getitem__` + `Sample_dataset.get_item` draw for draw:
while image data exists, `batch_size` image micro-batches, then `batch_size + 1` text micro-batches, and
again (text only when there is no image data and the reverse); the file by `random.choices` weighted by
its sample count; each sample by `random.randrange(len(file))`, followed by one `random.randrange` per
image of it (upstream's image transform draws its scale, a range of one value). Upstream seeds Python's
random with the first index the Trainer's sampler asks for; here worker `rank` seeds a `random.Random`
with `seed + rank`, so that the stream is reproducible.

`SequentialSampler`: micro-batch k holds samples (k*B ... k*B+B-1) mod N of the concatenated files in
order; with W data-parallel workers, worker r takes the micro-batches k = r, r+W, r+2W, ...
"""
import math
import random
from typing import List, Sequence, Tuple

from .records import MULTI, TEXT, DataGroup
from .errors import FinetuneDataError


def _check_batch(batch_size, world_size, rank):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")


class UpstreamMixSampler:
    """`next()` -> (group index, [record indices in that group]) for this worker's next micro-batch."""

    def __init__(self, groups: Sequence[DataGroup], batch_size: int, seed: int = 0, world_size: int = 1,
                 rank: int = 0):
        _check_batch(batch_size, world_size, rank)
        self.batch_size = batch_size
        self.groups = list(groups)
        self.multi = [i for i, g in enumerate(self.groups) if g.data_type == MULTI]
        self.text = [i for i, g in enumerate(self.groups) if g.data_type == TEXT]
        if not self.multi and not self.text:
            raise FinetuneDataError("no data: cannot sample micro-batches")
        counts_multi = [len(self.groups[i].records) for i in self.multi]
        counts_text = [len(self.groups[i].records) for i in self.text]
        # Upstream's float weights, computed the same way (they feed random.choices' cumulative sums).
        self.ratio_multi = [float(n) / sum(counts_multi) for n in counts_multi]
        self.ratio_text = [float(n) / sum(counts_text) for n in counts_text]
        self.rng = random.Random(seed + rank)
        self.use_multi = 0

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[int, List[int]]:
        if self.multi and (self.use_multi < self.batch_size or not self.text):
            group = self.multi[self.rng.choices(range(len(self.ratio_multi)), weights=self.ratio_multi, k=1)[0]]
        else:
            group = self.text[self.rng.choices(range(len(self.ratio_text)), weights=self.ratio_text, k=1)[0]]
        records = self.groups[group].records
        picks = []
        for _ in range(self.batch_size):
            i = self.rng.randrange(len(records))
            picks.append(i)
            for _ in records[i].images or ():
                self.rng.randrange(0, 1)  # upstream's scale draw: randrange(s, s + 1)
        self.use_multi += 1
        if self.use_multi > self.batch_size * 2:
            self.use_multi = 0
        return group, picks


class SequentialSampler:
    """`micro_batch(j)` -> [(group index, record index)] of this worker's j-th micro-batch (global k = j*W + r)."""

    def __init__(self, groups: Sequence[DataGroup], batch_size: int, world_size: int = 1, rank: int = 0):
        _check_batch(batch_size, world_size, rank)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.flat = [(g, r) for g, group in enumerate(groups) for r in range(len(group.records))]
        self.kinds = [groups[g].data_type for g, _ in self.flat]
        self.groups = list(groups)
        self._check_kinds()

    def global_indices(self, k: int) -> List[int]:
        n = len(self.flat)
        return [(k * self.batch_size + t) % n for t in range(self.batch_size)]

    def _check_kinds(self):
        """Every micro-batch must be one kind. Windows repeat after N / gcd(N, B) micro-batches: check them all."""
        n = len(self.flat)
        for k in range(n // math.gcd(n, self.batch_size)):
            idx = self.global_indices(k)
            kinds = {self.kinds[i] for i in idx}
            if len(kinds) > 1:
                first = {kind: next(i for i in idx if self.kinds[i] == kind) for kind in (MULTI, TEXT)}
                g_m, r_m = self.flat[first[MULTI]]
                g_t, r_t = self.flat[first[TEXT]]
                raise FinetuneDataError(
                    f"sequential sampling: micro-batch {k} (samples {idx[0]}..{idx[-1]} mod {n}) mixes image samples "
                    f"({self.groups[g_m].records[r_m].describe()}) and text-only samples "
                    f"({self.groups[g_t].records[r_t].describe()}); every micro-batch must be one kind: make each "
                    f"file's sample count a multiple of batch_size={self.batch_size}")

    def micro_batch(self, j: int) -> List[Tuple[int, int]]:
        if j < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {j}")
        return [self.flat[i] for i in self.global_indices(j * self.world_size + self.rank)]
