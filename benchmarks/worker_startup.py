"""What a tokenizing worker of `tinygemma prepare` imports before its first story, where it starts as a new
interpreter: macOS and Windows spawn their workers, and Linux from Python 3.14 starts them from a fork server, so
each imports the module of its task (forked workers, Linux's up to 3.13, import nothing).

A fresh interpreter imports tinygemma.tokenizer (the workers' module since 2026-12-07) and tinygemma.data (their
module before, which imports torch): the import's seconds and the process's peak resident memory, the median of
--repeat alternating runs of each.

    python benchmarks/worker_startup.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file (it puts src/ first)

from common import cpu_description, positive_int, run_script  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
MODULES = {"tinygemma.tokenizer": "the workers' module now", "tinygemma.data": "their module before 2026-12-07"}
# The peak from /proc (VmHWM, this process's own since its exec: Linux's ru_maxrss keeps the parent's, this
# script's, which imported torch), else ru_maxrss (bytes on macOS)
PROBE = ("import os, resource, sys, time\nstarted = time.perf_counter()\nimport {module}\n"
         "seconds = time.perf_counter() - started\n"
         "status = open('/proc/self/status').read() if os.path.exists('/proc/self/status') else ''\n"
         "hwm = [line.split()[1] for line in status.splitlines() if line.startswith('VmHWM:')]\n"
         "peak = int(hwm[0]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20\n"
         "print(seconds, peak, 'torch' in sys.modules)\n")


def probe(module: str) -> tuple[float, float, bool]:
    """(seconds to import `module`, peak MiB of the process, whether torch came with it) in a new interpreter."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return float(out[0]), float(out[1]), out[2] == "True"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=positive_int, default=5, help="alternating runs of each module")
    args = parser.parse_args(argv)
    runs: dict[str, list[tuple[float, float, bool]]] = {module: [] for module in MODULES}
    for _ in range(args.repeat):
        for module in MODULES:
            runs[module].append(probe(module))
    print(f"a new interpreter's import, median of {args.repeat}; {cpu_description()}, Python "
          f"{sys.version.split()[0]}")
    print("| module | what | import | peak memory | torch |")
    print("|---|---|---:|---:|---|")
    for module, what in MODULES.items():
        seconds = statistics.median(r[0] for r in runs[module])
        peak = statistics.median(r[1] for r in runs[module])
        print(f"| `{module}` | {what} | {seconds:.2f} s | {peak:.0f} MiB | {'yes' if runs[module][0][2] else 'no'} |")


if __name__ == "__main__":
    run_script(main)
