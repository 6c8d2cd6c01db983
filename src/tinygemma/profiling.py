"""`tinygemma train --profile START:END`: where the time of some optimizer steps goes, as torch.profiler sees it.

The steps START to END (1-based, inclusive, as the log counts them) run under torch.profiler on rank 0; then
RUN/profile/ holds
    trace.json     a Chrome trace: open it in https://ui.perfetto.dev or chrome://tracing
    summary.txt    the operators' table, sorted by their own time on the device (CUDA) or the CPU elsewhere
"""

from __future__ import annotations

from pathlib import Path

import torch

from tinygemma.errors import UserError
from tinygemma.files import atomic_path, atomic_write_text

SUMMARY_ROWS = 60


def parse_profile_range(spec: str) -> tuple[int, int]:
    """"START:END" (or one step "N") as (START, END), 1 <= START <= END."""
    start, sep, end = spec.partition(":")
    try:
        first, last = int(start), int(end if sep else start)
    except ValueError:
        first = last = 0
    if not 1 <= first <= last:
        raise UserError(f"--profile expects START:END, optimizer steps with 1 <= START <= END (e.g. 20:25), "
                        f"got {spec!r}")
    return first, last


class StepProfiler:
    """Profiles optimizer steps `first` to `last` (1-based) of a run, writing into `directory` once `last` ends.
    `begin(step)` and `end(step)` bracket every step (0-based, as the loop counts); they do nothing elsewhere."""

    def __init__(self, first: int, last: int, directory: Path, device: torch.device):
        self.first, self.last, self.directory, self.device = first, last, directory, device
        self.profiler = None

    def begin(self, step: int) -> None:
        if step + 1 != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.__enter__()

    def end(self, step: int) -> None:
        if self.profiler is None or step + 1 != self.last:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the queued kernels belong to the profiled steps
        self.profiler.__exit__(None, None, None)
        self.write()
        self.profiler = None

    def abandon(self) -> None:
        """Stop profiling without writing (the run ended inside the profiled steps)."""
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None

    def write(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.directory / "trace.json") as tmp:
            self.profiler.export_chrome_trace(str(tmp))
        sort_by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self.profiler.key_averages().table(sort_by=sort_by, row_limit=SUMMARY_ROWS)
        steps = f"{self.first}" if self.first == self.last else f"{self.first} to {self.last}"
        atomic_write_text(self.directory / "summary.txt",
                          f"torch.profiler: optimizer steps {steps} on {self.device}, operators sorted by "
                          f"{sort_by}\n\n{table}\n")
