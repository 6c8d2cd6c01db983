"""What the benchmarks share: naming the machine a figure came from, and timing contenders in turns.

Every figure in BENCHMARKS.md names its machine. On a CPU that means the model and the instruction sets that
change the numbers (AVX2, AVX-512, native bf16 through AVX-512 BF16 or AMX), since sessions here land on
different CPUs.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones that change our CPU figures


def cpu_description() -> str:
    """E.g. "AMD EPYC (avx2; no avx512f, avx512_bf16, amx_bf16), 2 cores"."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    have = [f for f in CPU_FLAGS if f in flags]
    lacking = [f for f in CPU_FLAGS if f not in flags]
    listed = ", ".join(have) or "none of " + ", ".join(CPU_FLAGS)
    return f"{name} ({listed}{'; no ' + ', '.join(lacking) if have and lacking else ''}), {os.cpu_count()} cores"


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's description with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_description()}, {torch.get_num_threads()} threads"


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
