"""What the benchmarks share: naming the machine a figure came from, and timing contenders in turns.

Every figure in BENCHMARKS.md names its machine. On a CPU that means the model and the instruction sets that
change the numbers (AVX2, AVX-512, native bf16 through AVX-512 BF16 or AMX), since sessions here land on
different CPUs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

# The machine's description lives with the device choice, so that run reports name the machine the same way.
from tinygemma.devices import CPU_FLAGS, cpu_description, device_description  # noqa: E402, F401 (re-exported)


def time_interleaved(fns: list[Callable], repeats: int, sync: Callable[[], None] = lambda: None):
    """Median seconds of each function over `repeats` runs, after one warm-up run each (first-call allocations
    and kernel selection are not counted), and each function's last result. The runs alternate (A, B, A, B, ...)
    so that load from other processes on a shared machine slows every contender alike. `sync` waits for the
    device (torch.cuda.synchronize) before each clock reading."""
    outs = [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            outs[i] = fn()
            sync()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times], outs
