"""What the benchmarks share: naming the machine a figure came from, and timing contenders in turns.

Every figure in BENCHMARKS.md names its machine. On a CPU that means the model and the instruction sets that
change the numbers (AVX2, AVX-512, native bf16 through AVX-512 BF16 or AMX), since sessions here land on
different CPUs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# This source tree's tinygemma, whatever is installed: a device machine has none, and a script run there without
# PYTHONPATH=src must measure this checkout all the same (each script imports common before tinygemma).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tinygemma.config import FLOAT32_MAX  # noqa: E402

# The machine's description lives with the device choice, so that run reports name the machine the same way.
from tinygemma.devices import CPU_FLAGS, cpu_description, device_description  # noqa: E402, F401 (re-exported)
from tinygemma.errors import UserError  # noqa: E402
from tinygemma.files import check_output_path  # noqa: E402


def whole_number_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, refused in argparse's one line."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse


positive_int = whole_number_at_least(1)  # a count of steps, tokens, rows
non_negative_int = whole_number_at_least(0)  # a count where 0 means none


def positive_ints(text: str) -> list[int]:
    """An argparse type: a comma-separated list of integers >= 1 (batch sizes, row counts), at least one."""
    values = [positive_int(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}")
    return values


def number_or_nan(text: str) -> float:
    """float(text), or nan for text that is no number: a bound then refuses both alike."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def positive_floats(text: str) -> list[float]:
    """An argparse type: a comma-separated list of numbers > 0 and within float32's range (learning rates), at
    least one; empty parts skipped, as positive_ints does."""
    def parse(part: str) -> float:
        value = number_or_nan(part)
        if not 0 < value <= FLOAT32_MAX:  # train's own bound (nan fails it too), else refused after the data step
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}")
        return value

    values = [parse(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}")
    return values


def fraction(text: str) -> float:
    """An argparse type: a number from 0 to 1 (nan and inf refused: a plan's steps are rounded from it)."""
    value = number_or_nan(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def output_file(text: str) -> str:
    """An argparse type: a path a results file can be written to (not a folder, no file among the folders above
    it), refused before the measurement whose figures it is to keep."""
    try:
        path = check_output_path(text, "the file")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give the file to write")
    return text


# Packages some benchmarks' contenders need that tinygemma's own install does not bring: what installs each.
OPTIONAL_PACKAGES = {"llama_cpp": "llama-cpp-python", "gguf": '"tinygemma[gguf]"', "transformers": '"tinygemma[dev]"'}


def run_script(main: Callable[[], object]) -> None:
    """A benchmark run as a script: what tinygemma refuses (an unknown preset or dtype, a device not there) ends
    in one line on stderr and exit status 2, and the machine's failure (a full disk, after the measurement; a
    file that cannot be read) in one line and exit status 1, as tinygemma's commands do; an int that main
    returns is the exit status."""
    try:
        result = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ModuleNotFoundError as e:  # an optional package a contender or a step needs
        if e.name not in OPTIONAL_PACKAGES:
            raise
        print(f"error: this needs {e.name}, which is not installed: pip install {OPTIONAL_PACKAGES[e.name]}",
              file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # (WriteError among them: it names the file and the cause)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


def device_sync(device) -> Callable[[], None]:
    """What waits for `device`'s queued work before a clock reading: torch.cuda.synchronize of that GPU (a bare
    synchronize() waits for the current one, not --device cuda:1's), nothing elsewhere."""
    import torch

    device = torch.device(device)
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


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
