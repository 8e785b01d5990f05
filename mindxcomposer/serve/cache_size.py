"""The server's default KV cache: as many rows and slots as the memory left after loading the model holds.

The batching engine allocates its shared cache (`max_batch` rows x `context` slots) when the first request
arrives, and a newcomer's prompt is prefilled in a session of its own (one row per beam, up to `context`
slots) before its keys and values are copied into the shared rows. Beside those caches a request needs
room for one prefill chunk's or one vision call's activations and for the host side. So of the memory
available after loading, `RESERVE_FRACTION` (at least `MIN_RESERVE` bytes) is kept free, and the rest holds
`rows + 1` rows of `context` slots. The release's default (4 rows x (max_length + 1024) fp32 slots, 17 GiB)
fits a machine with room for it; on a smaller one the context shrinks first, down to `MIN_CONTEXT` slots,
then the rows. Limits given on the command line are kept.
"""
import os
from dataclasses import dataclass
from typing import Optional

from ..constants import default_context
from ..session import CACHE_BUCKET

DEFAULT_MAX_BATCH = 4
RESERVE_FRACTION = 0.25
# An image request at release size (858 prompt tokens) peaked 1.4 GiB above the weights and the caches it
# held (a prefill chunk's and the vision tower's activations, MindSpore's pool); 3.5 GiB leaves a margin
# for the machine's other processes.
MIN_RESERVE = int(3.5 * 1024 ** 3)
MIN_CONTEXT = 4096


@dataclass(frozen=True)
class CacheChoice:
    rows: int
    context: int
    slot_bytes: int  # keys and values of every layer for one position of one row
    available: Optional[int]  # bytes available when the choice was made (None: unknown)
    sized: bool  # False when both limits came from the caller (or memory is unknown): nothing was chosen

    @property
    def cache_bytes(self) -> int:
        return self.rows * self.context * self.slot_bytes

    def describe(self) -> str:
        what = (f"KV cache {self.rows} row(s) x {self.context} slots = {self.cache_bytes / 1024 ** 3:.1f} GiB "
                f"({self.slot_bytes // 1024} KiB a slot{'; one request at a time' if self.rows == 1 else ''})")
        if self.available is None:
            return what
        how = "chosen for" if self.sized else "given; "
        return f"{what}, {how} {self.available / 1024 ** 3:.1f} GiB available after loading the model"


def slot_bytes(config, itemsize: int) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize


def available_memory() -> Optional[int]:
    """Bytes the system can give this process now without swapping (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def choose_cache(config, itemsize: int, available: Optional[int], max_batch: Optional[int] = None,
                 context: Optional[int] = None) -> CacheChoice:
    """Rows and slots of the shared cache (see the module docstring). `max_batch` / `context` given are kept;
    those not given are sized to `available` bytes."""
    per_slot = slot_bytes(config, itemsize)
    full = default_context(config)
    if available is None or (max_batch is not None and context is not None):
        return CacheChoice(max_batch or DEFAULT_MAX_BATCH, context or full, per_slot, available, False)
    budget = max(0, available - max(MIN_RESERVE, int(available * RESERVE_FRACTION)))

    def fitting_context(rows):  # slots of `rows` shared rows plus the newcomer's prefill row
        return min(full, budget // ((rows + 1) * per_slot) // CACHE_BUCKET * CACHE_BUCKET)

    if context is not None:
        wanted = max_batch or DEFAULT_MAX_BATCH
        rows = max(1, min(wanted, budget // (context * per_slot) - 1))
        return CacheChoice(rows, context, per_slot, available, True)
    if max_batch is not None:
        return CacheChoice(max_batch, max(CACHE_BUCKET, fitting_context(max_batch)), per_slot, available, True)
    rows = DEFAULT_MAX_BATCH
    floor = min(full, MIN_CONTEXT)
    while rows > 1 and fitting_context(rows) < floor:
        rows -= 1
    return CacheChoice(rows, max(CACHE_BUCKET, fitting_context(rows)), per_slot, available, True)
