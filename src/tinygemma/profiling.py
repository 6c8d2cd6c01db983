"""`tinygemma train --profile START:END`: where the time of some optimizer steps goes, as torch.profiler sees it.

The steps START to END (1-based, inclusive, as the log counts them) run under torch.profiler on rank 0; then
RUN/profile/ holds
    trace.json     a Chrome trace: open it in https://ui.perfetto.dev or chrome://tracing
    summary.txt    the operators' table, sorted by their own time on the device (CUDA) or the CPU elsewhere;
                   on CUDA it opens with how busy the GPU was and on what kinds of kernel (`device_activity`),
                   and ends with the kernels that took the most device time, by name (`top_kernels`)
    profile.json   those figures for programs (benchmarks/gpu_suite.py reads them)

The busy fraction answers the first question about a slow GPU step: is the GPU waiting for the host (launches,
synchronisation: low busy) or working on something other than matrix products (high busy, low matmul share)?
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch

from tinygemma.devices import synchronize
from tinygemma.errors import UserError, describe
from tinygemma.files import atomic_path, atomic_write_json, atomic_write_text, write_errors

SUMMARY_ROWS = 60
TOP_KERNELS = 30  # the kernels named in profile.json and summary.txt, by summed device time
KERNEL_NAME_CHARS = 160  # summary.txt's width for a name (profile.json keeps it whole; see short_kernel_name)
PROFILE_FILES = frozenset({"trace.json", "profile.json", "summary.txt"})  # what RUN/profile/ holds

# What a kernel is, by its name in the trace: the first pattern that matches (case-insensitive) wins, so the order
# matters. Inductor names its kernels triton_poi (pointwise), triton_red/per (reductions) and triton_tem (templates:
# its matmul templates under max-autotune, named after the aten op, and otherwise flex attention). SDPA's kernels
# (flash, memory-efficient "fmha_cutlass", cuDNN "..._sdpa_...") carry cutlass/wgmma in their names too, so
# attention is matched before cuBLAS's and CUTLASS's matrix products (gemm/nvjet/xmma/cutlass). Fused AdamW,
# gradient clipping's norm and the foreach updates are multi_tensor_apply kernels.
KERNEL_KINDS = (
    ("matmul", r"^triton_tem_fused_(\w+_)?(mm|addmm|bmm)_(\w+_)?\d+$"),  # among its epilogue's ops, sorted by name
    ("fused pointwise and reductions", r"^triton_(poi|red|per|for)_"),
    ("attention", r"flash_fwd|flash_bwd|pytorch_flash|fmha|_sdpa_|attention|^triton_tem_"),
    ("matmul", r"gemm|gemv|nvjet|xmma|cutlass|cublas|wgmma|s16816|s1688"),
    ("optimizer and clipping (multi-tensor)", r"multi_tensor|adam"),
    ("communication", r"nccl"),
)
DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}  # a Kineto trace's device-side events


def kernel_kind(name: str, category: str = "kernel") -> str:
    """The kind a device event is counted under in `device_activity` (copies and fills by their category)."""
    if category != "kernel":
        return "copies and fills"
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


def device_activity(trace_events: list[dict], wall_s: float) -> dict | None:
    """How busy the device was over `wall_s` seconds of profiled steps, from a Chrome trace's events: the union of
    the device-side events' intervals (kernels on several streams count once while they overlap) over the wall
    time; the kernels' count and mean length (many short kernels: launch-bound); and each kind's share of the
    summed device time. None when the trace has no device events (a CPU run)."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), kernel_kind(e.get("name", ""), e["cat"]),
                    e.get("name", ""))
                   for e in trace_events
                   if e.get("cat") in DEVICE_CATEGORIES and e.get("ph", "X") == "X" and "ts" in e)
    if not spans:
        return None
    busy_us, reach = 0.0, float("-inf")
    by_kind: dict[str, float] = {}
    by_name: dict[tuple[str, str], list[float]] = {}  # (name, kind): [calls, summed us]
    for start, end, kind, name in spans:
        busy_us += max(0.0, end - max(start, reach))
        reach = max(reach, end)
        by_kind[kind] = by_kind.get(kind, 0.0) + (end - start)
        tally = by_name.setdefault((name, kind), [0, 0.0])
        tally[0] += 1
        tally[1] += end - start
    total_us = sum(by_kind.values())
    kernels = [end - start for start, end, kind, _ in spans if kind != "copies and fills"]
    top = sorted(by_name.items(), key=lambda item: -item[1][1])[:TOP_KERNELS]
    return {"wall_s": wall_s, "busy_s": busy_us / 1e6, "busy": min(1.0, busy_us / 1e6 / wall_s) if wall_s > 0 else None,
            "kernels": len(kernels), "mean_kernel_us": sum(kernels) / len(kernels) if kernels else 0.0,
            "share_by_kind": {kind: t / total_us if total_us else 0.0
                              for kind, t in sorted(by_kind.items(), key=lambda item: -item[1])},
            "top_kernels": [{"name": name, "kind": kind, "calls": calls, "total_us": us,
                             "share": us / total_us if total_us else 0.0}
                            for (name, kind), (calls, us) in top]}


def describe_activity(activity: dict) -> str:
    """Two lines for summary.txt: how busy the device was, and on what. The profiler's own overhead slows the
    host's launches, so a launch-bound run reads somewhat less busy than it runs unprofiled."""
    shares = ", ".join(f"{kind} {share:.1%}" for kind, share in activity["share_by_kind"].items())
    busy = f"{activity['busy']:.1%}" if activity["busy"] is not None else "?"
    return (f"device busy {busy} of the {activity['wall_s']:.3f} s the steps took ({activity['busy_s']:.3f} s with "
            f"a kernel or copy running; {activity['kernels']:,} kernels, {activity['mean_kernel_us']:.1f} us on "
            f"average)\ndevice time by kind of kernel (by name): {shares}")


def short_kernel_name(name: str, chars: int) -> str:
    """A kernel's name in at most `chars` characters. C++ template names run to thousands, and two of ATen's
    kernels often differ only far into theirs (the functor: std::plus or std::multiplies), so a long name keeps
    its head and its tail around an ellipsis."""
    if len(name) <= chars:
        return name
    tail = (chars - 1) // 2
    return f"{name[:chars - 1 - tail]}\u2026{name[len(name) - tail:]}"


def kernel_table(activity: dict) -> str:
    """`top_kernels` as a table for summary.txt, the longest first."""
    rows = [f"{'share':>6}  {'total ms':>9}  {'calls':>6}  {'kind':<38}  kernel"]
    rows += [f"{k['share']:>6.1%}  {k['total_us'] / 1e3:>9.3f}  {k['calls']:>6}  {k['kind']:<38}  "
             f"{short_kernel_name(k['name'], KERNEL_NAME_CHARS)}" for k in activity["top_kernels"]]
    return "\n".join(rows)


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
        self.started = 0.0

    def begin(self, step: int) -> None:
        if step + 1 != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.synchronize()  # nothing of the earlier steps still queued: the trace and the wall time are these steps'
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.__enter__()
        self.started = time.perf_counter()

    def end(self, step: int) -> None:
        if self.profiler is None or step + 1 != self.last:
            return
        self.synchronize()  # the queued kernels belong to the profiled steps
        wall_s = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        try:
            self.write(wall_s)
        except Exception as e:  # a diagnostic: training goes on without it
            print(f"warning: the profile of steps {self.first} to {self.last} was not written: {describe(e)}",
                  file=sys.stderr, flush=True)
        self.profiler = None

    def synchronize(self) -> None:
        synchronize(self.device)

    def abandon(self) -> None:
        """Stop profiling without writing (the run ended inside the profiled steps)."""
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None

    def write(self, wall_s: float) -> None:
        with write_errors(self.directory):
            self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.directory / "trace.json") as tmp:
            self.profiler.export_chrome_trace(str(tmp))
            activity = device_activity(json.loads(Path(tmp).read_text(encoding="utf-8")).get("traceEvents", []),
                                       wall_s)
        sort_by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self.profiler.key_averages().table(sort_by=sort_by, row_limit=SUMMARY_ROWS)
        steps = f"{self.first}" if self.first == self.last else f"{self.first} to {self.last}"
        header = f"torch.profiler: optimizer steps {steps} on {self.device}, {wall_s:.3f} s"
        header += f"\n{describe_activity(activity)}" if activity else ""
        atomic_write_json(self.directory / "profile.json",
                          {"first_step": self.first, "last_step": self.last, "device": str(self.device),
                           "wall_s": wall_s, "device_activity": activity})
        kernels = f"\n\nkernels by device time\n\n{kernel_table(activity)}" if activity else ""
        atomic_write_text(self.directory / "summary.txt",
                          f"{header}\n\noperators sorted by {sort_by}\n\n{table}{kernels}\n")
