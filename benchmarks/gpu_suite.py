"""The GPU acceptance run: the real trainer's speed, the workshop notebook's own code on the same GPU, generation,
the measurements that choose Muon's backend and the loss head on CUDA, and the CUDA tests, in one command,
offline, on one GPU, into one markdown report and one machine-readable summary.

    python benchmarks/gpu_suite.py --make-assets ../shared            # once: stories + GPT-2 vocabulary -> .device/assets
    PYTHONPATH=src python benchmarks/gpu_suite.py --report $OUT/gpu_latest.md --summary $OUT/gpu_latest.json
    PYTHONPATH=src python benchmarks/gpu_suite.py --device cpu --quick     # the same steps at toy size on a CPU
    PYTHONPATH=src python benchmarks/gpu_suite.py --steps trainer,tests --runs 128-adamw,128-muon   # some of it

The run needs no network and no `datasets`: the stories and tiktoken's GPT-2 ranks come from the assets folder
(`--assets`, default .device/assets: tinystories/train.txt, tinystories/valid.txt, tiktoken_cache/), which
`--make-assets` fills from a checkout's ../shared. Every step runs as a subprocess of this script, from the
source tree's root, and the report gives each figure with the command that produced it. Steps:

1. the trainer: `tinygemma prepare` (GPT-2 tokenizer), then `tinygemma train` of gemma3-270m-gpt2 in bf16 with
   `micro_batch_size=auto`, 131,072 tokens per optimizer step at block 128 (32 x 32 sequences: the workshop
   recipe) and at block 1024 (8 x 16), with AdamW and with Muon. Steady-state tokens/s, MFU and peak memory come
   from each run's own metrics.jsonl after its first log interval (compilation), the micro-batch that auto chose
   from its config.json; its validation loss must fall by MIN_VAL_DROP from step 0 to the end. Every run
   then trains PROFILED_STEPS more steps, outside the measured ones, under `--profile` in the AdamW runs: how
   busy the GPU was and on what kinds of kernel, with the top of the operators' table, in the report. Issue 19's speed
   goals (MFU_GOAL in every run, Muon at most MUON_MAX_COST slower than AdamW) are judged in the report;
2. the workshop notebook's own code on the same GPU (benchmarks/train_throughput.py --contenders workshop-untied:
   its model, with its own untied output head, with bf16 weights and its loop of 32 micro-steps of 32 x 128 per AdamW step), against step 1's
   block-128 AdamW row: "tinygemma trains the workshop recipe N x as fast as the workshop's code";
3. generation (benchmarks/generate_speed.py): tinygemma's generate against transformers', batch 1 and 32; and
   with an end-of-text id, the host waiting for the device every 8 tokens (generate's) against each token;
4. the optimizer step alone, AdamW against each Muon backend (benchmarks/optimizer_step.py): what chooses
   Muon's CUDA backend (optim.muon_backend);
5. the loss head alone, chunked against whole logits, compiled, at 32,768 rows (the pass auto took at both blocks
   on the H100), 65,536 (the H200's; measured on the H100 already) then 16,384, with peak memory
   (benchmarks/loss_head.py):
   what chooses `loss_head = "auto"` on CUDA (parallelize.AUTO_FULL_LOSS_LOGITS);
6. the CUDA tests: `python -m pytest -v -m cuda` on the files that hold them (cuda_test_files: test_cuda.py's
   long ones last, and in it those that never ran on a GPU first), last, with whatever time the steps before left:
   the one step whose length compiling small models makes hard to foresee. Each test's outcome goes into the summary,
   so a run stopped at the deadline still says which passed.

Dropped since the first H100 run (2026-11-26), to fit one 10-minute command: the tinygemma-against-transformers
throughput table (train_throughput.py eager and compiled at blocks 128 and 1024, 285 s of that run; its
figures stand in BENCHMARKS.md), and the 3-minute training on real stories, whose criterion (the validation loss
falls) step 1's four runs now check.

`--steps` (of trainer, workshop, generation, optimizer_step, loss_head, tests) and `--runs` (the trainer's, as
BLOCK-OPTIMIZER) run part of it, the chosen steps sharing the whole budget in STEP_SHARES' proportions: all of it
does not fit one 10-minute command on an H100, where a trainer run took 160 s (2026-12-05), so a later GPU
session measures what an earlier one left. Such a run's figures go to gpu_report.{md,json} unless named. Each
trainer run's output lines are kept timed from its start (the report's folded block, the summary's
`trainer_timelines`):
where its minutes went, from startup and compilation to the checkpoint.

The exit status is 0 when every step passed, 1 otherwise; the verdict of a run that left steps or trainer runs
out (--steps, --runs) reads PASS (a partial run), not PASS. The report and the summary are written at the start,
after each trainer run and after each step, so a suite stopped from outside still leaves what it measured
(marked INCOMPLETE); a command stopped at its step's deadline is killed with its whole process group and every
process descended from it (torchrun's workers, in sessions of their own; compile workers), and what it had
written is kept: a trainer run's steady-state figures, the loss head's rows. A step so stopped with nothing
failed (a trainer run, the CUDA tests' tail, the loss head's second size, a command never started for want of
time) makes the verdict INCOMPLETE, not FAIL (the exit status is still 1; the summary lists it in `stopped_at_deadline`). `--budget` (default
570 s) stops a step's commands once its share of the budget is spent (STEP_SHARES). The summary
(`--summary`) is benchmarks/results/gpu_latest.json by default on a GPU, which every full GPU run replaces, and
the report's name with .json for a --quick run (on a CPU, or a smoke run on a GPU), which never writes the GPU's
file. Without .git (a device machine's copy of the tree) the commit comes from the assets: run --make-assets
again just before the device run, or the report says the recorded commit is stale.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

IMPORTED = time.perf_counter()  # the suite's clock starts here, before torch's import: the device's limit counts it

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file (it puts src/ first)

from common import cpu_description  # noqa: E402

from tinygemma.files import atomic_write_json, atomic_write_text  # noqa: E402
from tinygemma.metrics import read_records  # noqa: E402
from tinygemma.profiling import short_kernel_name  # noqa: E402

DEFAULT_ASSETS = ROOT / ".device" / "assets"
COMMIT_FILE = "COMMIT"  # in the assets: the commit --make-assets saw and the source's fingerprint then, for a
# device copy that has no .git
SOURCE_GLOBS = ("pyproject.toml", "src/**/*.py", "benchmarks/*.py", "tests/*.py", "configs/*.toml")
GPU_SUMMARY = ROOT / "benchmarks" / "results" / "gpu_latest.json"

# Step 1: (block, batch_size, grad_accum_steps, optimizer). 131,072 tokens per optimizer step at either block.
# The AdamW runs first: they carry the MFU goal and the profiles, and each compiles its block's model cold. The
# Muon runs then find those graphs in inductor's cache (on disk, shared by the processes). The row a short
# budget loses first is the last: block 1024 with Muon; the H200's run, at 420 s, lost block 1024 whole while
# the block-128 Muon run took its time.
TRAINER_RUNS = [(128, 32, 32, "adamw"), (1024, 8, 16, "adamw"), (128, 32, 32, "muon"), (1024, 8, 16, "muon")]
TRAINER_STEPS, LOG_INTERVAL = 15, 5  # steady state: the 10 steps (1.3M tokens) after the first log interval
# Every run then trains PROFILED_STEPS more steps, left out of the rates; in the runs of PROFILED_OPTIMIZERS under
# torch.profiler (`tinygemma train --profile`: a few seconds a run for the profiler's start and the trace's export).
PROFILED_STEPS, PROFILED_OPTIMIZERS = 1, ("adamw",)
# The Muon runs' backend, by block (absent: `auto`, the device's default, our bfloat16 iteration on CUDA). A Muon step
# does the same work at either block (the same matrices, 131,072 tokens a step), so with the default at block 128
# (the workshop's shape, where issue 19 judges Muon's cost) and the compiled backend at 1,024, each Muon row
# against its block's AdamW row prices one backend inside the real trainer, even if the optimizer-step benchmark
# (step 4) is cut short again, as on the H100 (2026-12-05).
MUON_BACKENDS = {1024: "compiled"}
PROFILE_ROWS = 15  # rows of each run's operator table in the report
TIMELINE_LINES, TIMELINE_CHARS = 40, 160  # of a trainer run's output, timed, in the report and its row
PROFILE_KERNELS, PROFILE_KERNEL_CHARS = 20, 90  # rows of its kernel table, and the characters of a kernel's name
ADAMW_SETTINGS = ("learning_rate=1e-3", "min_lr=1e-4")  # Muon's recipe rate (4e-3) is too high for AdamW at 270M
MIN_VAL_DROP = 1.0  # nats: each run's validation loss must fall at least this much from step 0 to its end
# Issue 19's goals for the trainer's rows: MFU of at least MFU_GOAL in every row (MFU_MOONSHOT the moonshot), and
# a Muon step at most MUON_MAX_COST slower than an AdamW step at the same block. Reported, not a step's pass/fail:
# the suite checks that the runs work; these say how far the speed is from where it should be.
MFU_GOAL, MFU_MOONSHOT, MUON_MAX_COST = 0.40, 0.50, 0.05
# The whole suite's aim (--budget), inside the 10 minutes one command may run on a lent GPU machine (570 s,
# counted from the script's import, leaves half a minute for a stopped command's output and the last writes), and
# the fraction of it by which each step must be done (its commands are stopped there; a step that ends early leaves
# its time to the next). Planned from the H200 run's timings, in seconds of 570: the trainer's four runs by 359
# (there: prepare 5 s; block 128 AdamW, compiling cold, 112 s; block 128 Muon, its graphs in inductor's cache,
# 47 s; block 1024 AdamW had compiled flex attention and the evaluation, not yet the training step, after 54 s:
# at least 100 s cold, so 305 s lost the last run), then windows of 34 s each, so that a trainer step that runs to
# its deadline still leaves every later step more than MIN_COMMAND_SECONDS: the workshop by 393, generation by
# 427, the optimizer step (its eager backends first) by 462, the loss head (two row counts, two compiled heads
# each) by 496, and the CUDA tests last, by 570: at least 74 s and whatever the steps before left (the H200 ran 21
# in about 180 s; the ones that never ran on a GPU come first, and each test's outcome is kept). On the H100
# (2026-12-05) a trainer run took 160-165 s, so the trainer's share held the two AdamW runs, and the optimizer
# step, the loss head and the tests were stopped at their deadlines: the whole suite needs about two commands
# there, which --steps and --runs split.
TOTAL_SECONDS = 570
STEP_SHARES = {"trainer": 0.63, "workshop": 0.69, "generation": 0.75, "optimizer_step": 0.81, "loss_head": 0.87,
               "tests": 1.0}
MIN_COMMAND_SECONDS = 30  # a command with less time left in its share is not started, and says so
MIN_TRAINER_SECONDS = 60  # nor a trainer run with less: compiling the 270M alone takes longer (its time goes on)
OUTPUT_GRACE_SECONDS = 10  # after a stopped command's group is killed, its output is read for this long at most


@dataclass
class Plan:
    """What each step runs: the GPU sizes, or toy sizes for --quick."""

    device: str
    quick: bool
    preset: str = "gemma3-270m-gpt2"
    dtype: str = "bfloat16"
    tests: tuple = ()  # the test files, in order (default: cuda_test_files())
    trainer_runs: list = field(default_factory=lambda: list(TRAINER_RUNS))
    muon_backends: dict = field(default_factory=lambda: dict(MUON_BACKENDS))  # block: the Muon run's backend
    trainer_steps: int = TRAINER_STEPS
    log_interval: int = LOG_INTERVAL
    limit: int | None = None  # prepare's --limit (stories)
    train_extra: tuple = ()
    workshop_steps: tuple = (1, 2)  # warm-up, timed optimizer steps of the workshop's loop
    # (50256: GPT-2's end of text, which the random model is not expected to produce: the end-of-text contenders
    # then decode all 48 tokens, and the report says if one did not)
    generation_args: tuple = ("--dtype", "bf16", "--batch-sizes", "1,32", "--new-tokens", "48", "--repeats", "2",
                              "--eos-id", "50256")
    optimizer_args: tuple = ("--steps", "10", "--warmup", "2")  # besides preset, device and --json
    # The rows of the passes micro_batch_size=auto chose: 32,768 on the H100 (256 of 128 or 32 of 1,024), first;
    # 65,536 on the H200 (512 or 64: an eager pass of the 270M takes about 1 MB a token, so 131,072 tokens do not
    # fit 85% of 80 or 141 GB), which the H100 measured too; and a smaller GPU's
    loss_head_args: tuple = ("--dtype", "bfloat16", "--compile", "--no-in-place", "--rows", "32768,65536,16384")
    budget: float = TOTAL_SECONDS  # the whole suite's aim in seconds (--budget)
    started: float = field(default_factory=time.perf_counter)  # main() sets it to when the script was imported
    steps: tuple = tuple(STEP_SHARES)  # the steps run (--steps), in STEP_SHARES' order
    runs: tuple | None = None  # the trainer runs made, as BLOCK-OPTIMIZER (--runs; None: all of trainer_runs)

    def share(self, step: str) -> float:
        """The fraction of the budget by which `step` must be done: STEP_SHARES' widths of the steps run, scaled
        to fill the budget (all six: STEP_SHARES itself)."""
        names = list(STEP_SHARES)
        width = {name: STEP_SHARES[name] - (STEP_SHARES[names[i - 1]] if i else 0.0) for i, name in enumerate(names)}
        run = [name for name in names if name in self.steps]
        return sum(width[name] for name in run[:run.index(step) + 1]) / sum(width[name] for name in run)

    def runs_made(self, made: bool = True) -> list[tuple]:
        """The trainer runs this suite makes (--runs), in the plan's order; or those it leaves out. Issue 19's goals
        are judged against all of trainer_runs, and the workshop's shape is the first's, whichever are made."""
        return [r for r in self.trainer_runs if (self.runs is None or run_name(r) in self.runs) == made]

    def seconds_left(self, limit: float, share: float = 1.0, at_least: float = MIN_COMMAND_SECONDS) -> float:
        """A command's timeout: at most `limit`, and no later than `share` of the budget after the suite started,
        so that a slow step leaves the later ones their turn and the report is written. 0 (do not start it) when
        less than `at_least` seconds are left."""
        left = self.started + share * self.budget - time.perf_counter()
        return min(limit, left) if left >= at_least else 0.0

    @property
    def workshop_shape(self) -> tuple[int, int, int]:
        """(block, batch, accumulation) of the workshop recipe: the first trainer run's."""
        return self.trainer_runs[0][:3]

    @classmethod
    def quick_cpu(cls, device: str) -> Plan:
        """Toy sizes, one thread per process, that run in under a minute on two shared CPU cores: every step and
        every section of the report and the summary, none of the figures."""
        return cls(device, True, preset="gemma3-tiny", dtype="float32",
                   trainer_runs=[(32, 4, 2, "adamw"), (80, 2, 2, "muon")], trainer_steps=8, log_interval=2,
                   muon_backends={80: "float32"},  # eager: inductor would take minutes on a CPU
                   limit=400, train_extra=("learning_rate=3e-3", "min_lr=3e-4", "muon_learning_rate=0.02"),
                   workshop_steps=(1, 1),
                   generation_args=("--dtype", "fp32", "--batch-sizes", "1,2", "--new-tokens", "4", "--repeats", "1",
                                    "--threads", "1", "--eos-id", "50256"),
                   optimizer_args=("--vocab-size", "512", "--n-layers", "2", "--steps", "1", "--warmup", "0",
                                   "--threads", "1", "--contenders", "adamw,muon-float32"),
                   loss_head_args=("--vocab-size", "512", "--d-model", "64", "--rows", "64,256", "--steps", "1",
                                   "--threads", "1"))


@dataclass
class Result:
    title: str
    ok: bool
    lines: list[str]
    seconds: float
    data: dict = field(default_factory=dict)  # the step's part of the summary
    partial: bool = False  # a step still running: what it has measured so far, written in case the suite is stopped
    cut: bool = False  # not ok only because its deadline stopped it, with nothing failed before: INCOMPLETE, not FAIL

    @property
    def state(self) -> str:
        return ("still running" if self.partial else "passed" if self.ok else "stopped at its deadline" if self.cut
                else "FAILED")


def run(cmd: list[str], env: dict, timeout: float, timeline: list | None = None) -> tuple[int, str, float]:
    """Run `cmd` from the source root; (exit status, stdout and stderr together, seconds). A timeout is status 124.
    `timeline` (a list) gets (seconds since the start, line) for each line of output as it came: where a
    command's time went, from its own messages."""
    if timeout <= 0:
        return 124, "(not started: its step's share of --budget was spent)", 0.0
    start = time.perf_counter()
    # Its own session: at the deadline the whole group goes, and whatever descends from it (kill_group), so
    # nothing left running holds the GPU while the next steps measure.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=die_with_parent)
    chunks: list[bytes] = []

    def read() -> None:  # a thread: the output as it comes (a line not yet ended included), until the pipe closes
        pending = b""
        with proc.stdout:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                chunks.append(chunk)
                *ended, pending = (pending + chunk).split(b"\n")
                if timeline is not None:
                    now = time.perf_counter() - start
                    timeline.extend((now, line.decode("utf-8", "replace")) for line in ended)
        if pending and timeline is not None:  # the last line, unended
            timeline.append((time.perf_counter() - start, pending.decode("utf-8", "replace")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
        # A process descended from the command may still hold the output open: it has the rest of the time
        reader.join(max(0.0, start + timeout - time.perf_counter()))
        if reader.is_alive():
            raise subprocess.TimeoutExpired(cmd, timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        kill_group(proc)
        reader.join(OUTPUT_GRACE_SECONDS)  # a process outside the group may hold the pipe open: not for longer
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(OUTPUT_GRACE_SECONDS)  # reaped, once killed
        code = 124
        chunks.append(f"\n(stopped after {timeout:.0f} s)".encode())
    except BaseException:  # the suite itself stopped (Ctrl-C): its command goes with it
        kill_group(proc)
        raise
    # Decoded leniently: a command killed amid a multi-byte character must not cost its step all of its output.
    return code, b"".join(chunks).decode("utf-8", "replace"), time.perf_counter() - start


def die_with_parent() -> None:
    """In the command's process, before it starts: killed if the suite dies (SIGKILL included), since its own
    session no longer receives the signals sent to the suite's process group (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_on_signal(signum, frame) -> None:
    """SIGTERM or SIGHUP to the suite (a job runner's timeout): stop as Ctrl-C does, so that the running command's
    group is killed (run) and the report says what was measured."""
    raise SystemExit(128 + signum)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the command's process group and every process descended from it, also those in sessions of their
    own: torchrun starts its workers with start_new_session, out of reach of the group's kill."""
    stray = descendants(proc.pid)  # before the kill: orphans are given to init, no longer found as descendants
    for kill, pid in ((os.killpg, proc.pid), *((os.kill, p) for p in stray)):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # gone already
            pass


def descendants(pid: int) -> list[int]:
    """The processes descended from `pid`, from /proc's parent links (Linux; elsewhere none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (command name)": state, ppid, ...
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # a process that ended while read
            continue
    found, queue = [], [pid]
    while queue:
        below = children.get(queue.pop(), [])
        found += below
        queue += below
    return found


def shown(cmd: list[str]) -> str:
    """The command as a user types it from the source root: `python` for this interpreter."""
    return shlex.join(["python" if c == sys.executable else c for c in cmd])


def timeline_lines(timeline: list[tuple[float, str]]) -> list[str]:
    """A command's output lines, each after the seconds since its start when it came (startup, compilation,
    evaluations, the profiled step and the checkpoint stand out between the log lines), folded in the report."""
    text = "\n".join(f"{t:6.1f} s  {line[:TIMELINE_CHARS]}" for t, line in timeline[:TIMELINE_LINES])
    return ["", "<details><summary>output, each line after the seconds since the command started</summary>", "",
            "```text", text, "```", "", "</details>", ""]


def tail(output: str, lines: int = 40) -> list[str]:
    text = "\n".join(output.rstrip().splitlines()[-lines:])
    return ["<details><summary>output (last lines)</summary>", "", "```text", text, "```", "", "</details>"]


# ------------------------------------------------------------------ helpers of the steps


def benchmark(plan: Plan, env: dict, work: Path, step: str, script: str, args, intro: str):
    """benchmarks/SCRIPT.py on the plan's preset and device, writing --json work/STEP.json, stopped at STEP's share
    of the budget: (the report's lines so far, its JSON or None on failure, seconds, whether it was stopped at that
    deadline or never started for want of time: a step with nothing failed, INCOMPLETE)."""
    out = work / f"{step}.json"
    out.unlink(missing_ok=True)  # a reused --work: no earlier run's figures read as this one's
    cmd = [sys.executable, f"benchmarks/{script}.py", "--preset", plan.preset, "--device", plan.device, *args,
           "--json", str(out)]
    code, output, seconds = run(cmd, env, plan.seconds_left(150, plan.share(step)))
    try:
        result = json.loads(out.read_text()) if out.exists() else None
    except (OSError, ValueError):  # unreadable: the step fails with the command's output, the suite goes on
        result = None
    if code != 0 and not (result is not None and result.get("complete") is False):
        result = None  # a failed command's figures are kept only where its script wrote them as it went
    lines = [f"Command: `{shown(cmd)}` ({seconds:.0f} s): {intro}", ""]
    if code != 0 and result is not None:
        result["partial"], result["cut"] = True, code == 124  # cut: stopped at its deadline, not failed
        lines += [f"Stopped (exit status {code}) before it finished: the figures below are the ones it wrote.", ""]
    return (lines if code == 0 else lines + tail(output, 25)), result, seconds, code == 124


def figure(value, spec: str = ",.0f", suffix: str = "") -> str:
    """`value` formatted, or "-" where nothing was measured."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


# ------------------------------------------------------------------ 1. the trainer


def steady_state(records: list[dict], log_interval: int, tokens_per_step: int,
                 until: int | None = None) -> dict | None:
    """A run's tokens/s, MFU and peak memory once compiled, from its metrics.jsonl records (None: no log line
    after the first).

    The trainer does not wait for the GPU inside a step, so a single step's time means nothing there; each log
    line's record holds its interval's rate instead (tokens over wall-clock time, the waits for the GPU at the
    reads included), with the MFU at that rate. The steady rate is the tokens of every interval after the first
    (which holds the compilation) over the sum of their times; MFU, the intervals' MFU weighted by their times
    (each is proportional to its rate, so it is the MFU at that steady rate). Peak memory: the largest recorded.
    Intervals that end after step `until` (the profiled steps) are left out."""
    lines = [r for r in records if "tokens_per_s" in r and (until is None or r["step"] <= until)]  # log lines
    settled = [(previous["step"], r) for previous, r in zip(lines, lines[1:]) if previous["step"] >= log_interval]
    if not settled:
        return None
    tokens = [(r["step"] - before) * tokens_per_step for before, r in settled]
    seconds = [n / r["tokens_per_s"] for n, (_, r) in zip(tokens, settled)]
    weighted = [r["mfu"] * t for t, (_, r) in zip(seconds, settled) if "mfu" in r]
    peaks = [r["peak_memory_gib"] for r in lines if "peak_memory_gib" in r]
    return {"tokens_per_s": sum(tokens) / sum(seconds),
            "mfu": sum(weighted) / sum(seconds) if len(weighted) == len(settled) else None,
            "peak_memory_gib": max(peaks, default=None), "steps_measured": sum(tokens) // tokens_per_step,
            "seconds_measured": sum(seconds)}


def trainer_command(plan: Plan, data: Path, out: Path, block: int, batch: int, accum: int, optimizer: str) -> list:
    settings = [f"device={plan.device}", f"dtype={plan.dtype}", f"batch_size={batch}", f"block_size={block}",
                f"grad_accum_steps={accum}", "micro_batch_size=auto", f"optimizer={optimizer}",
                f"max_steps={plan.trainer_steps + PROFILED_STEPS}", f"warmup_steps={max(1, plan.trainer_steps // 4)}",
                "eval_interval=0", "eval_batches=1", "checkpoint_interval=0", f"log_interval={plan.log_interval}",
                "model.vocab_pad_multiple=128", *(ADAMW_SETTINGS if optimizer == "adamw" else ()),
                *([f"muon_backend={plan.muon_backends[block]}"] if optimizer == "muon" and block in plan.muon_backends
                  else []), *plan.train_extra]
    profile = (["--profile", f"{plan.trainer_steps + 1}:{plan.trainer_steps + PROFILED_STEPS}"]
               if optimizer in PROFILED_OPTIMIZERS else [])  # every run trains those steps: one schedule for all
    return [sys.executable, "-m", "tinygemma", "train", "--data", str(data), "--out", str(out), "--model",
            plan.preset, *profile, *[a for s in settings for a in ("--set", s)]]


def trainer_row(out: Path, block: int, optimizer: str, plan: Plan, output: str) -> dict:
    """One run's row of the summary, from its config.json and metrics.jsonl, the optimizer its log names, and its
    profile (profile/profile.json: the device's busy fraction and time by kind of kernel)."""
    config = json.loads((out / "config.json").read_text())
    run_info = config["run"]
    records = read_records(out / "metrics.jsonl")
    figures = steady_state(records, plan.log_interval, run_info["tokens_per_step"], until=plan.trainer_steps) or {}
    profile = out / "profile" / "profile.json"
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    described = re.search(r"; ([^;]+), (?:wsd|cosine) schedule;", output)
    return {"block_size": block, "optimizer": optimizer,
            "muon_backend": config["train"]["muon_backend"] if optimizer == "muon" else None,
            "micro_batch_size": run_info.get("micro_batch_size"),
            "tokens_per_s": figures.get("tokens_per_s"), "mfu": figures.get("mfu"),
            "peak_memory_gib": figures.get("peak_memory_gib"), "global_batch": run_info["global_batch"],
            "passes_per_step": run_info.get("passes_per_step"), "tokens_per_step": run_info["tokens_per_step"],
            "steps_measured": figures.get("steps_measured", 0), "val_loss_first": vals[0][1] if vals else None,
            # None where no evaluation followed step 0's (a run stopped before its end): not "the loss stayed"
            "val_loss_last": vals[-1][1] if len(vals) > 1 and vals[-1][0] > vals[0][0] else None,
            "optimizer_detail": described.group(1) if described else None, "kv_layout": run_info.get("kv_layout"),
            "profile": json.loads(profile.read_text()) if profile.exists() else None}


def profile_lines(out: Path, block: int, optimizer: str, profile: dict | None) -> list[str]:
    """A run's profile in the report: the summary's device lines, the top of its operator table, and on a GPU the
    kernels that took the most device time (`profile`, its row's profile.json: `top_kernels`; the operator table
    mixes aten operators with the kernels they launch, and names inductor's fused kernels only among them)."""
    summary = out / "profile" / "summary.txt"
    if not summary.exists():
        return [f"Block {block}, {optimizer}: no profile was written."]
    head, _, table = summary.read_text().partition("\n\n")
    table = table.split("\n\nkernels by device time\n", 1)[0]  # the operators' table alone
    _, *table_lines = table.strip().splitlines()  # "operators sorted by ...", a blank line, the table
    table_lines = [line for line in table_lines if line.strip()]
    top, rest = table_lines[:PROFILE_ROWS + 3], table_lines[PROFILE_ROWS + 3:]  # 3: the header and its rules
    closing = [line for line in rest if line.startswith(("-", "Self "))]  # the closing rule, "Self CPU time total"
    lines = [f"Block {block}, {optimizer}:", "", *[f"- {line}" for line in head.strip().splitlines()], "", "```",
             *top, *closing, "```"]
    kernels = ((profile or {}).get("device_activity") or {}).get("top_kernels")
    if kernels:
        lines += ["", f"The {min(len(kernels), PROFILE_KERNELS)} kernels that took the most device time (the "
                  f"summary's `profile.device_activity.top_kernels` names {len(kernels)}):", "",
                  "| share | total | calls | kind | kernel |",
                  "|---:|---:|---:|---|---|"]
        lines += [f"| {k['share']:.1%} | {k['total_us'] / 1e3:.2f} ms | {k['calls']} | {k['kind']} "
                  f"| `{short_kernel_name(k['name'], PROFILE_KERNEL_CHARS).replace('|', '/')}` |" for k in kernels[:PROFILE_KERNELS]]
    return lines


def optimizer_cell(row: dict) -> str:
    """"muon (compiled)" where the run asked for a Muon backend, the optimizer's name otherwise."""
    backend = row.get("muon_backend")
    return f"{row['optimizer']} ({backend})" if backend and backend != "auto" else row["optimizer"]


def measured_note(plan: Plan, row: dict) -> str:
    """" (stopped: 4 of 10 steps)" after the tokens/s of a run stopped before its last measured step: a rate, but
    over fewer steps than planned (those after the first log interval)."""
    planned = plan.trainer_steps - plan.log_interval
    if row.get("stopped_at_deadline") and row["tokens_per_s"] is not None and row["steps_measured"] < planned:
        return f" (stopped: {row['steps_measured']} of {planned} steps)"
    return ""


def trainer_table(plan: Plan, rows: list[dict]) -> list[str]:
    lines = [f"`tinygemma train` of `{plan.preset}` in {plan.dtype}, `micro_batch_size=auto`, {plan.trainer_steps} "
             f"optimizer steps a run. Steady state over the steps after the first log interval ({plan.log_interval} "
             "steps, with the compilation): the steps' tokens over the sum of their wall-clock times, from the run's "
             "metrics.jsonl; MFU likewise (`ModelConfig.flops_per_token` against the GPU's dense bf16 peak); peak "
             "memory: `torch.cuda.max_memory_allocated` at the log steps. The micro-batch is the one auto chose "
             "(config.json).", "",
             f"GPU busy and matmul share: from the {PROFILED_STEPS} profiled step(s) after those, in the "
             f"{'/'.join(PROFILED_OPTIMIZERS)} runs (`--profile`: the GPU's busy fraction of the step's wall time, a "
             "little low for the profiler's own overhead; the share of its kernel time on matrix products, by kernel "
             "name, which under Muon would include the optimizer's own products; the profiles are below).", "",
             "| block | optimizer | global batch | micro-batch (auto) | passes a step | tokens/s | MFU | peak memory "
             "| GPU busy | matmul share | val loss, step 0 -> end | command |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        activity = (r.get("profile") or {}).get("device_activity") or {}
        lines.append(f"| {r['block_size']} | {optimizer_cell(r)} | {r['global_batch']} | {figure(r['micro_batch_size'])} "
                     f"| {figure(r['passes_per_step'])} | {figure(r['tokens_per_s'])}{measured_note(plan, r)} "
                     f"| {figure(r['mfu'], '.1%')} "
                     f"| {figure(r['peak_memory_gib'], '.2f', ' GiB')} | {figure(activity.get('busy'), '.1%')} "
                     f"| {figure(activity.get('share_by_kind', {}).get('matmul'), '.1%')} "
                     f"| {figure(r['val_loss_first'], '.4f')} -> {figure(r['val_loss_last'], '.4f')} | {r['command']} |")
    details = sorted({r["optimizer_detail"] for r in rows if r["optimizer_detail"]})
    return lines + (["", "Optimizers, as the runs' first log lines name them: " + "; ".join(details) + "."]
                    if details else [])


def trainer(plan: Plan, env: dict, work: Path, assets: Path, progress=lambda result: None) -> Result:
    """The four runs; after each, `progress` gets the step's Result so far (partial), to be written at once."""
    start, share, data = time.perf_counter(), plan.share("trainer"), work / "data"
    prepare = [sys.executable, "-m", "tinygemma", "prepare", "--out", str(data), "--tokenizer", "gpt2",
               "--source", str(assets / "tinystories" / "train.txt"),
               "--val-source", str(assets / "tinystories" / "valid.txt"), "--no-progress"]
    prepare += ["--limit", str(plan.limit)] if plan.limit else []
    code, output, seconds = run(prepare, env, timeout=plan.seconds_left(300, share))
    commands = [f"1. `{shown(prepare)}` ({seconds:.0f} s)"]
    if code != 0:
        return Result(STEP_TITLES[0], False, commands + tail(output), time.perf_counter() - start, cut=code == 124)
    rows, failures, stopped, profiles, timelines = [], [], [], [], {}
    for n, (block, batch, accum, optimizer) in enumerate(plan.runs_made(), start=2):
        out = work / f"run-{block}-{optimizer}"
        shutil.rmtree(out, ignore_errors=True)  # a reused --work: no earlier run's rows read as this one's
        cmd = trainer_command(plan, data, out, block, batch, accum, optimizer)
        # (at toy size, --quick, a run takes seconds)
        at_least = MIN_COMMAND_SECONDS if plan.quick else MIN_TRAINER_SECONDS
        timeline: list[tuple[float, str]] = []
        code, output, seconds = run(cmd, env, timeout=plan.seconds_left(240, share, at_least), timeline=timeline)
        commands.append(f"{n}. `{shown(cmd)}` ({seconds:.0f} s)")
        if timeline:  # every run that started, a stopped one most of all: where did its minutes go?
            commands += timeline_lines(timeline)
            timelines[run_name((block, batch, accum, optimizer))] = [[round(t, 1), line[:TIMELINE_CHARS]]
                                                 for t, line in timeline[:TIMELINE_LINES]]
        if code != 0:
            # Stopped at the step's deadline (or never started) is not a failure: the verdict reads INCOMPLETE.
            (stopped if code == 124 else failures).append(f"block {block} {optimizer}: exit status {code} "
                                                          f"(command {n})")
            commands += ["", *tail(output, 25), ""]
        # A run stopped at its deadline keeps the figures its metrics.jsonl holds already (all of them, if it
        # was stopped in the profiled step, the final evaluation or the checkpoint): its row is kept and marked.
        if (out / "config.json").exists() and (out / "metrics.jsonl").exists():
            rows.append({**trainer_row(out, block, optimizer, plan, output), "command": n,
                         "stopped_at_deadline": code == 124})
            profiles += (["", *profile_lines(out, block, optimizer, rows[-1]["profile"])]
                         if optimizer in PROFILED_OPTIMIZERS else [])
            first, last = rows[-1]["val_loss_first"], rows[-1]["val_loss_last"]
            if code == 0 and (rows[-1]["tokens_per_s"] is None or first is None or not last < first - MIN_VAL_DROP):
                failures.append(f"block {block} {optimizer}: no steady state, or the validation loss fell less "
                                f"than {MIN_VAL_DROP} nat (command {n})")
        if n - 1 < len(plan.runs_made()):
            progress(trainer_result(plan, rows, failures, stopped, commands, profiles, start, timelines,
                                    runs_done=n - 1))
    return trainer_result(plan, rows, failures, stopped, commands, profiles, start, timelines)


def trainer_result(plan: Plan, rows: list[dict], failures: list[str], stopped: list[str], commands: list[str],
                   profiles: list[str], start: float, timelines: dict | None = None,
                   runs_done: int | None = None) -> Result:
    """The step's Result from the runs so far (`stopped`: those stopped at the step's deadline, or never started
    for want of time; `timelines`: each started run's timed output lines, by BLOCK-OPTIMIZER); `runs_done`: a
    partial one, while runs remain."""
    goals, goal_lines = speed_goals(rows, plan.trainer_runs)
    # Met only when every planned run ended and its loss fell; a run stopped (or never started) is not judged
    unjudged = len(plan.runs_made()) - sum(not r.get("stopped_at_deadline") for r in rows)
    judged = ("NOT met" if failures else "met" if not unjudged else
              f"not judged yet ({runs_done} of {len(plan.runs_made())} runs done)" if runs_done is not None else
              f"not judged for {unjudged} run(s), stopped at the step's deadline or never started")
    lines = [*trainer_table(plan, rows), "", *goal_lines, "", f"Criterion: each run's validation loss falls at least "
             f"{MIN_VAL_DROP} nat from step 0 to its end: **{judged}**.", "", "Commands:", "", *commands]
    if failures:
        lines += ["", "Failed: " + "; ".join(failures)]
    if stopped:
        lines += ["", "Stopped at the step's deadline: " + "; ".join(stopped)]
    if profiles:
        lines += ["", "### Where the time goes", *profiles]
    partial = runs_done is not None
    if partial:
        lines = [f"Still running: {runs_done} of {len(plan.runs_made())} runs done.", "", *lines]
    ok = not failures and not unjudged  # every planned run ended, and none failed
    return Result(STEP_TITLES[0], ok, lines, time.perf_counter() - start,
                  {"trainer": list(rows), "goals": goals, "trainer_timelines": dict(timelines or {})},
                  partial=partial, cut=bool(stopped) and not failures)


def speed_goals(rows: list[dict], runs: list[tuple]) -> tuple[dict, list[str]]:
    """Issue 19's goals against the trainer's rows: the MFU of every planned run (`runs`, as TRAINER_RUNS) at least
    MFU_GOAL, and Muon's step time over AdamW's at the same block (the inverse ratio of their tokens/s) at most
    1 + MUON_MAX_COST. A goal whose figures were not all measured (no MFU off CUDA, a run that failed) is None,
    never met."""
    planned = [(block, optimizer) for block, _, _, optimizer in runs]
    got = {(r["block_size"], r["optimizer"]): r for r in rows}
    mfus = {key: got[key]["mfu"] if key in got else None for key in planned}
    rates = {key: got[key]["tokens_per_s"] if key in got else None for key in planned}
    blocks = sorted({block for block, _ in planned})
    # (rounded: 105,000 / 100,000 - 1 is 0.050000000000000044 in floating point, past a cost of exactly 5%)
    muon_cost = {block: (round(rates[block, "adamw"] / rates[block, "muon"] - 1, 9)
                         if rates.get((block, "adamw")) and rates.get((block, "muon")) else None) for block in blocks}
    measured = bool(mfus) and None not in mfus.values()
    got_mfus = [m for m in mfus.values() if m is not None]
    lowest = min(got_mfus, default=None)
    # Known not met as soon as one measured row is below; met only when every planned row was measured.
    mfu_met = False if lowest is not None and lowest < MFU_GOAL else (lowest >= MFU_GOAL if measured else None)
    # Likewise: one measured block over the cost is NOT met, whatever the other block would say.
    costs_got = [c for c in muon_cost.values() if c is not None]
    muon_met = (False if any(c > MUON_MAX_COST for c in costs_got)
                else (max(costs_got) <= MUON_MAX_COST if muon_cost and len(costs_got) == len(muon_cost) else None))
    moonshot_met = (False if lowest is not None and lowest < MFU_MOONSHOT
                    else (lowest >= MFU_MOONSHOT if measured else None))
    goals = {"mfu_goal": MFU_GOAL, "mfu_moonshot": MFU_MOONSHOT, "lowest_mfu": lowest,
             "mfu_rows_measured": len(got_mfus), "mfu_rows_planned": len(planned),
             "mfu_met": mfu_met, "moonshot_met": moonshot_met,
             "muon_max_cost": MUON_MAX_COST, "muon_cost": {str(b): c for b, c in muon_cost.items()},
             "muon_met": muon_met}

    def verdict(met):
        return "not measured" if met is None else "**met**" if met else "**NOT met**"

    backends = {r["block_size"]: r["muon_backend"] for r in rows
                if r["optimizer"] == "muon" and r.get("muon_backend") not in (None, "auto")}
    costs = ", ".join(f"block {b}{f' (Muon {backends[b]})' if b in backends else ''}: {figure(c, '+.1%')}"
                      for b, c in muon_cost.items()) or "no rows"
    lines = [f"Goals (issue 19): MFU of at least {MFU_GOAL:.0%} in every row: {verdict(mfu_met)} (lowest "
             f"{figure(goals['lowest_mfu'], '.1%')} of {len(got_mfus)} measured row(s) of {len(planned)}; the moonshot, {MFU_MOONSHOT:.0%}: {verdict(goals['moonshot_met'])}). "
             f"A Muon step at most {MUON_MAX_COST:.0%} slower than an AdamW step at the same block: "
             f"{verdict(muon_met)} ({costs})."]
    return goals, lines


# ------------------------------------------------------------------ 2. the workshop's own code


def workshop(plan: Plan, env: dict, work: Path, trainer_rows: list[dict]) -> Result:
    """The workshop notebook's model and loop at the workshop recipe's shape, against tinygemma's trainer there."""
    block, batch, accum = plan.workshop_shape
    args = ("--dtype", plan.dtype, "--contenders", "workshop-untied", "--batch-size", str(batch), "--block-size", str(block),
            "--grad-accum", str(accum), "--warmup", str(plan.workshop_steps[0]), "--steps", str(plan.workshop_steps[1]))
    lines, result, seconds, stopped = benchmark(
        plan, env, work, "workshop", "train_throughput", args,
        f"the workshop notebook's model (benchmarks/workshop_model.py, weights in {plan.dtype}: bf16 in the notebook; "
        f"its own untied output head) and its loop, {accum} micro-steps of {batch} x {block} tokens (each loss / "
        f"{accum}) then clipping and AdamW; median of {plan.workshop_steps[1]} timed optimizer steps after "
        f"{plan.workshop_steps[0]} warm-up. The notebook's batch loading (a memmap read and a copy to the GPU each "
        f"micro-step) and its evaluations are not timed, so the speedup below is a lower bound.")
    if result is None:
        return Result(STEP_TITLES[1], False, lines, seconds, cut=stopped)
    rate = result["results"][0]["tokens_per_s"]
    ours = {r["optimizer"]: r["tokens_per_s"] for r in trainer_rows if r["block_size"] == block and r["tokens_per_s"]}
    speedup = {name: ours[name] / rate for name in ("adamw", "muon") if name in ours}
    summary = {"block_size": block, "batch_size": batch, "grad_accum": accum, "tokens_per_s": rate,
               "speedup": speedup.get("adamw"), "speedup_muon": speedup.get("muon"),
               "speedup_against": "tinygemma train at the same block and global batch, AdamW (the workshop's "
                                  "optimizer); speedup_muon: with Muon"}
    lines.append(f"The workshop's code: **{rate:,.0f} tokens/s**.")
    if "adamw" in speedup:
        lines.append(f"**tinygemma trains the workshop recipe {speedup['adamw']:.2f}x as fast as the workshop's code "
                     f"on this {'GPU' if plan.device != 'cpu' else 'CPU'}** (`tinygemma train`, AdamW, "
                     f"{ours['adamw']:,.0f} tokens/s)"
                     + (f"; with Muon, the recipe's default, {speedup['muon']:.2f}x." if "muon" in speedup else "."))
    else:
        lines.append(f"No trainer row at block {block} with AdamW to compare with (step 1).")
    # (stopped at its deadline after a timed round: train_throughput.py's figures so far, the step cut short)
    return Result(STEP_TITLES[1], not result.get("partial"), lines, seconds, {"workshop": summary},
                  cut=bool(result.get("cut")))


# ------------------------------------------------------------------ 3. the CUDA tests


def cuda_tests(plan: Plan, env: dict) -> Result:
    # -v: a line per test as it ends, so a run stopped at the step's deadline still says which tests passed
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider",
           *(plan.tests or cuda_test_files())]
    code, output, seconds = run(cmd, env, timeout=plan.seconds_left(400, plan.share("tests")))
    outcomes = test_outcomes(output)
    summary = pytest_summary(output)
    if summary is None:  # stopped, or crashed, before pytest's closing line: what its -v lines said
        tally = ", ".join(f"{sum(v == o for v in outcomes.values())} {o.lower()}" for o in sorted(set(outcomes.values())))
        ended = ("stopped at the step's deadline" if code == 124
                 else f"ended without pytest's closing line (exit status {code})")  # a crash: a segfault, an abort
        summary = f"{ended} after {len(outcomes)} test(s)" + (f": {tally}" if tally else "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    # On a GPU some test must really run; on a CPU (--quick) they are all skipped, and must be.
    ran = counts.get("passed", 0) > 0 if plan.device != "cpu" else counts.get("skipped", 0) > 0
    lines = [f"Command: `{shown(cmd)}`", "", f"Result: **{summary}** (exit status {code}, {seconds:.0f} s)", ""]
    cut = code == 124 and pytest_summary(output) is None and not {"FAILED", "ERROR"} & set(outcomes.values())
    return Result(STEP_TITLES[5], code == 0 and ran, lines + tail(output), seconds,
                  {"cuda_tests": summary, "cuda_test_outcomes": outcomes}, cut=cut)


def cuda_test_files(tests: Path = ROOT / "tests") -> list[str]:
    """The test files holding CUDA tests, in the order the step runs them. pytest runs files in the order named
    (a folder's in name order), so a run stopped at the step's deadline has run these first: the other files'
    single CUDA tests of one module each, then test_cuda.py, whose tests train, resume and start torchrun."""
    files = [f for f in sorted(tests.glob("test_*.py")) if "pytest.mark.cuda" in f.read_text(encoding="utf-8")]
    return [str(f.relative_to(ROOT)) for f in sorted(files, key=lambda f: f.name == "test_cuda.py")]


def pytest_summary(output: str) -> str | None:
    """pytest's closing line ("14 passed, 362 deselected in 65.21s"), or None if it never came: not the line
    that counts what was collected and deselected."""
    closing = re.compile(r"^=+ (.*\d+ (?:passed|failed|skipped|deselected|errors?|xfailed|xpassed).* in [\d.]+s"
                         r"(?: \([\d:]+\))?) =+$")
    return next((m.group(1) for line in reversed(output.splitlines()) if (m := closing.match(line.strip()))), None)


def test_outcomes(output: str) -> dict[str, str]:
    """Each test's outcome from pytest -v's lines ("tests/test_cuda.py::test_x[bf16] PASSED [ 7%]")."""
    found = re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", output, re.M)
    return {name: outcome for name, outcome in found}


# ------------------------------------------------------------------ 4. generation


def generation(plan: Plan, env: dict, work: Path) -> Result:
    lines, result, seconds, stopped = benchmark(
        plan, env, work, "generation", "generate_speed", plan.generation_args,
        "greedy decoding of random prompts, the same weights in both, prefill included; median of the timed runs, "
        "the contenders alternating.")
    if result is None:
        return Result(STEP_TITLES[2], False, lines, seconds, cut=stopped)
    graphs = any("cuda_graph_speedup" in r for r in result["results"])  # on CUDA: one CUDA graph a token
    lines += [f"{result['prompt_tokens']}-token prompts, {result['new_tokens']} new tokens, {result['dtype']}"
              + (" (tinygemma replays one CUDA graph a token; \"kernel by kernel\": its steps launched one kernel "
                 "at a time, `cuda_graph=False`)" if graphs else "") + ":", "",
              "| batch | tinygemma | transformers | speed-up | same tokens |"
              + (" tinygemma kernel by kernel | CUDA graph's gain |" if graphs else ""),
              "|---:|---:|---:|---:|---|" + ("---:|---:|" if graphs else "")]
    for r in result["results"]:
        same = "all" if r["same_tokens"] else f"first {r['equal_leading_tokens']}"
        lines.append(f"| {r['batch_size']} | {r['tinygemma_tokens_per_s']:,.1f} tokens/s | "
                     f"{r['transformers_tokens_per_s']:,.1f} tokens/s | {r['speedup']:.2f}x | {same} |"
                     + (f" {figure(r.get('kernel_by_kernel_tokens_per_s'), ',.1f', ' tokens/s')} | "
                        f"{figure(r.get('cuda_graph_speedup'), '.2f', 'x')} |" if graphs else ""))
    lines += end_of_text_lines(result["results"])
    keep = ("dtype", "prompt_tokens", "new_tokens", "repeats", "results")
    return Result(STEP_TITLES[2], not result.get("partial"), lines, seconds,
                  {"generation": {k: result[k] for k in keep}}, cut=bool(result.get("cut")))


def end_of_text_lines(results: list[dict]) -> list[str]:
    """The table of decoding with an end-of-text id (generate_speed.py's --eos-id): the host waiting for the device
    every few tokens (generate's) against each token; none where the run had no such contenders."""
    rows = [r for r in results if "not_waiting_gain" in r]
    if not rows:
        return []
    lines = ["", f"With end of text (id {rows[0]['end_of_text_id']}), the host waiting for the device every "
             f"{rows[0]['waits_every']} tokens (generate's) or each token (as transformers' generate):", "",
             "| batch | every few tokens | each token | gain | same tokens | a sequence ended |",
             "|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['waiting_every_tokens_per_s']:,.1f} tokens/s | "
                     f"{r['waiting_each_tokens_per_s']:,.1f} tokens/s | {r['not_waiting_gain']:.2f}x | "
                     f"{'yes' if r['same_tokens_either_way'] else 'NO'} | {'yes' if r['end_of_text_met'] else 'no'} |")
    return lines


# ------------------------------------------------------------------ 5. the optimizer step


def optimizer_step(plan: Plan, env: dict, work: Path) -> Result:
    """AdamW against each Muon backend: the step's figures that choose Muon's backend on this device."""
    lines, result, seconds, stopped = benchmark(
        plan, env, work, "optimizer_step", "optimizer_step", plan.optimizer_args,
        "`optimizer.step()` alone on the model's parameters, median of the timed rounds, contenders in turn.")
    if result is None:
        return Result(STEP_TITLES[3], False, lines, seconds, cut=stopped)
    ms = result["ms_per_step"]
    lines += result["table"].splitlines()
    if result.get("not_measured"):  # a run stopped while the compiled backend compiled keeps the others
        lines += ["", f"Not measured before it stopped: {', '.join(result['not_measured'])}."]
    muons = {name: t for name, t in ms.items() if name.startswith("muon-")}
    fastest = min(muons, key=muons.get) if muons else None
    if fastest:
        lines += ["", f"Fastest Muon backend here: **{fastest}** ({muons[fastest]:,.2f} ms a step"
                      + (f", {ms['adamw']:,.2f} ms for AdamW" if "adamw" in ms else "") + ")"
                      + (" of those measured" if result.get("not_measured") else "")
                      + "; `optim.muon_backend` chooses the CUDA default."]
    summary = {"ms_per_step": ms, "first_step_relative_difference": result["first_step_relative_difference"],
               "fastest_muon": fastest, "not_measured": result.get("not_measured", [])}
    return Result(STEP_TITLES[3], not result.get("partial"), lines, seconds, {"optimizer_step": summary},
                  cut=bool(result.get("cut")))


# ------------------------------------------------------------------ 6. the loss head


def loss_head(plan: Plan, env: dict, work: Path) -> Result:
    """Chunked against whole logits, with peak memory: the bound that `loss_head = "auto"` takes on this device."""
    lines, result, seconds, stopped = benchmark(
        plan, env, work, "loss_head", "loss_head", plan.loss_head_args,
        "the final norm, the tied head and the cross-entropy, forward and backward, alone; the heads in turn "
        "on the same inputs.")
    if result is None:
        return Result(STEP_TITLES[4], False, lines, seconds, cut=stopped)
    lines += result["table"].splitlines()
    bound = result["full_faster_up_to_logits"]
    lines += ["", f"The full head was the faster up to **{bound:,} logits per micro-batch** (0: at no size measured): "
                  f"the bound for `AUTO_FULL_LOSS_LOGITS[\"{plan.device}\"]` in parallelize.py, with its memory above"
                  + (", from the rows measured before it stopped." if result.get("partial") else ".")]
    gains = [f"{r['fusible_vs_in_place']:.2f}x at {r['rows']:,} rows" for r in result["results"] if "fusible_vs_in_place" in r]
    if gains:
        lines += ["", "The chunked head's fusible form (what torch.compile traces now) against its in-place form "
                      f"(what it traced before): {', '.join(gains)} (> 1: the fusible form is faster)."]
    keep = ("dtype", "compile", "chunk_size", "padded_vocab_size", "results", "full_faster_up_to_logits", "complete")
    return Result(STEP_TITLES[4], not result.get("partial"), lines, seconds,
                  {"loss_head": {k: result[k] for k in keep}}, cut=bool(result.get("cut")))


# ------------------------------------------------------------------ the report and the summary


def source_fingerprint() -> str:
    """A hash of the source that decides a run's figures (SOURCE_GLOBS), the same with or without .git."""
    digest = hashlib.sha256()
    for path in sorted({p for pattern in SOURCE_GLOBS for p in ROOT.glob(pattern) if p.is_file()}):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def git_commit() -> str | None:
    """This tree's commit as git describes it, or None (no git, no .git, or a slow git: never a stop)."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty=, with uncommitted changes"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return described.stdout.strip() if described.returncode == 0 and described.stdout.strip() else None


def source_commit(assets: Path) -> str:
    """The commit --make-assets recorded in the assets where this source is still the one it fingerprinted (a
    device machine gets a copy of the working tree, with no .git or with a .git copied when the session began,
    older than the tree), else git's own answer, else the record said to be stale (--make-assets was not run
    again before the device run); "unknown" without either."""
    try:
        recorded, _, fingerprint = (assets / COMMIT_FILE).read_text().strip().partition("\n")
    except OSError:
        recorded = fingerprint = None
    if recorded and fingerprint.strip() == source_fingerprint():
        return f"{recorded} (as recorded by --make-assets for this very source)"
    described = git_commit()
    if recorded:  # a device's .git may be older than its tree: git's answer is only a hint then
        return (f"unknown: the source has changed since --make-assets recorded {recorded} (run --make-assets again "
                f"before the device run; this copy's git says {described or 'nothing'})")
    return described or "unknown"


def environment(plan: Plan, assets: Path = DEFAULT_ASSETS) -> tuple[list[str], dict]:
    """The report's table of the machine and the software, and the summary's fields for them."""
    import torch

    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = "not installed"
    if plan.device != "cpu":
        props = torch.cuda.get_device_properties(0)
        gpu = props.name
        device = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible"
    else:
        gpu = device = f"{cpu_description()} (no GPU: a smoke run)"
    commit = source_commit(assets)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = ["| | |", "|---|---|", f"| device | {device} |", f"| torch | {torch.__version__} |",
             f"| CUDA | {torch.version.cuda or '-'} |", f"| transformers | {hf} |",
             f"| Python | {platform.python_version()} ({sys.executable}) |", f"| commit | {commit} |",
             f"| date | {date} |"]
    info = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": hf, "date": date,
            "commit": commit}
    return lines, info


STEP_TITLES = ("1. Trainer", "2. The workshop's code", "3. Generation", "4. Optimizer step", "5. Loss head",
               "6. CUDA tests")  # in STEP_SHARES' order


def run_name(run: tuple) -> str:
    """A trainer run's name for --runs: BLOCK-OPTIMIZER."""
    return f"{run[0]}-{run[3]}"


def step_titles(plan: Plan, chosen: bool = True) -> list[str]:
    """The titles of the steps this run takes (--steps), or of those it leaves out."""
    return [title for name, title in zip(STEP_SHARES, STEP_TITLES) if (name in plan.steps) == chosen]


def left_out(plan: Plan) -> tuple[list[str], list[str]]:
    """(the steps left out by --steps, the trainer runs left out by --runs where the trainer runs at all)."""
    runs = [run_name(r) for r in plan.runs_made(made=False)] if "trainer" in plan.steps else []
    return [title.split(". ", 1)[1] for title in step_titles(plan, chosen=False)], runs


def write_report(path: Path, plan: Plan, argv: list[str], env_line: str, machine: list[str], results: list[Result],
                 total: float) -> None:
    """The report of the steps run so far (the last may be partial: a step still running): written at the start,
    during the trainer and after each step, so a suite stopped from outside (a machine's time limit) still leaves
    what it measured, marked INCOMPLETE."""
    pending = step_titles(plan)[len(results):]
    finished = [r for r in results if not r.partial]
    steps_out, runs_out = left_out(plan)
    verdict = ("FAIL" if not all(r.ok or r.cut for r in finished) else "INCOMPLETE"
               if pending or len(finished) < len(results) or any(r.cut for r in finished) else
               "PASS (a partial run)" if steps_out or runs_out else "PASS")  # (not the whole suite's: --steps, --runs)
    states = [f"{r.title.split('. ', 1)[1]} {r.state}" for r in results]
    lines = ["# GPU acceptance run" + (" (--quick smoke run, not a GPU result)" if plan.quick else ""), "",
             f"**{verdict}**: " + (", ".join(states) or "no step finished yet") + f"; {total / 60:.1f} minutes in all"
             + (f"; left out (--steps): {', '.join(steps_out)}" if steps_out else "")
             + (f"; the trainer's runs left out (--runs): {', '.join(runs_out)}" if runs_out else "") + ".",
             "",
             f"Suite: `python benchmarks/gpu_suite.py {shlex.join(argv)}`. Every command below ran from the "
             f"source tree's root with `{env_line}`.", "", *machine]
    for r in results:
        lines += ["", f"## {r.title}", "", *r.lines, "", f"({r.seconds:.0f} s)"]
    for title in pending:
        lines += ["", f"## {title}", "", "Not reached: the suite was still running, or was stopped, before this step."]
    for title in step_titles(plan, chosen=False):
        lines += ["", f"## {title}", "", "Left out of this run (`--steps`)."]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_summary(path: Path, plan: Plan, info: dict, results: list[Result], total: float) -> None:
    """gpu_latest.json: the machine, then each finished step's figures (trainer, workshop, generation, ...)."""
    finished = [r for r in results if not r.partial]
    cut = [r.title.split(". ", 1)[1] for r in finished if r.cut]  # (not ok in "steps": they did not finish)
    steps_out, runs_out = left_out(plan)
    summary = {**info, "quick": plan.quick,
               "complete": len(finished) == len(STEP_TITLES) and not cut and not runs_out,
               "seconds": round(total), "budget_s": plan.budget,
               "steps": {r.title.split(". ", 1)[1]: r.ok for r in finished}, "stopped_at_deadline": cut,
               "steps_left_out": steps_out, "trainer_runs_left_out": runs_out}
    for r in results:
        summary.update(r.data)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, summary)


def make_assets(shared: Path, assets: Path) -> int:
    """Copy the stories and the GPT-2 ranks from a checkout's ../shared into the assets folder."""
    stories, cache = shared / "data" / "tinystories", shared / "tiktoken_cache"
    missing = [p for p in (stories / "train.txt", stories / "valid.txt", cache) if not p.exists()]
    if missing:
        print(f"gpu_suite: error: {missing[0]} not found (expected ../shared's layout)", file=sys.stderr)
        return 2
    try:
        (assets / "tinystories").mkdir(parents=True, exist_ok=True)
        for name in ("train.txt", "valid.txt"):
            shutil.copyfile(stories / name, assets / "tinystories" / name)
        # ../shared's read-only modes, copied, made a second copy fail: a copy made earlier is made writable first
        copied = assets / "tiktoken_cache"
        for path in [copied, *copied.rglob("*")] if copied.exists() else []:
            path.chmod(path.stat().st_mode | 0o200)  # (the owner may write)
        shutil.copytree(cache, copied, dirs_exist_ok=True)
        (assets / COMMIT_FILE).write_text(f"{git_commit() or 'unknown'}\n{source_fingerprint()}\n")
    except (OSError, shutil.Error) as e:
        print(f"gpu_suite: error: could not write the assets into {assets} ({e})", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in assets.rglob("*") if p.is_file())
    print(f"wrote {assets} ({size / 1e6:.1f} MB)")
    return 0


def output_paths(args) -> tuple[Path, Path]:
    """(report, summary): by default benchmarks/results/gpu_latest.md and .json for a full run (on a GPU);
    for a --quick one (on a CPU, or a smoke run on a GPU), or one of some steps or runs (--steps, --runs),
    gpu_report.md and gpu_report.json in the working folder."""
    part = args.quick or args.steps is not None or args.runs is not None  # never the whole suite's figures
    report = Path(args.report or ("gpu_report.md" if part else GPU_SUMMARY.with_suffix(".md")))
    return report, Path(args.summary or (report.with_suffix(".json") if part else GPU_SUMMARY))


def refusal(args, device: str, assets: Path, report: Path, summary: Path) -> str | None:
    """Why the suite cannot run as asked (one line), or None."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return "--device cuda, but PyTorch sees no CUDA GPU"
    if device == "cpu" and not args.quick:
        return "no GPU here; `--device cpu --quick` runs the smoke version"
    if not math.isfinite(args.budget) or args.budget < MIN_COMMAND_SECONDS:
        return f"--budget must be at least {MIN_COMMAND_SECONDS} seconds, not {args.budget:g}"
    for option, path, folder in (("--report", report, False), ("--summary", summary, False),
                                 ("--work", Path(args.work) if args.work else None, True)):
        if path is None:
            continue
        if path.exists() and path.is_dir() != folder:
            return f"{option} {path} is {'a folder' if path.is_dir() else 'a file'}"
        in_file = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
        if in_file:
            return f"{option} {path}: {in_file} is a file"
    if args.quick and {report.resolve(), summary.resolve()} & {GPU_SUMMARY, GPU_SUMMARY.with_suffix(".md")}:
        return (f"a --quick run does not write {GPU_SUMMARY.relative_to(ROOT)} or its report (toy figures); give "
                "--report and --summary elsewhere")
    for needed in (assets / "tinystories" / "train.txt", assets / "tinystories" / "valid.txt", assets / "tiktoken_cache"):
        if not needed.exists():
            return (f"{needed} not found; build the assets with "
                    f"`python benchmarks/gpu_suite.py --make-assets ../shared --assets {args.assets}`")
    return None


def choose_steps(plan: Plan, steps: str | None, runs: str | None) -> str | None:
    """--steps and --runs into `plan`; why they cannot be taken (one line), or None."""
    if steps is not None:
        names = steps.split(",")
        unknown = [name for name in names if name not in STEP_SHARES]
        if unknown or not steps:
            return f"--steps {steps!r}: each must be one of {', '.join(STEP_SHARES)}"
        plan.steps = tuple(name for name in STEP_SHARES if name in names)
    if runs is not None:
        planned = [run_name(r) for r in plan.trainer_runs]
        unknown = [name for name in runs.split(",") if name not in planned]
        if unknown or not runs:
            return f"--runs {runs!r}: each must be one of {', '.join(planned)}"
        plan.runs = tuple(runs.split(","))
    return None


def guarded(index: int, step, *args, partials: list | None = None, **kwargs) -> Result:
    """`step(*args, **kwargs)`, or, if the suite's own code raises in it, that step FAILED with the traceback: one
    mistake here must not cost the later steps (the device's time is lent once). What the step had measured
    before (its last partial Result, in `partials`) is kept, with its figures."""
    start = time.perf_counter()
    try:
        return step(*args, **kwargs)
    except Exception as error:
        lines = [f"The suite's code for this step raised {type(error).__name__}: {error}", "",
                 *tail(traceback.format_exc())]
        if partials:
            last = partials[-1]
            return Result(last.title, False, [*last.lines, "", *lines], time.perf_counter() - start, last.data)
        return Result(STEP_TITLES[index], False, lines, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    run_as_script = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    p.add_argument("--report", help="the markdown report (default: benchmarks/results/gpu_latest.md for the whole "
                                    "suite on a GPU; gpu_report.md for --quick, --steps or --runs, or on a CPU)")
    p.add_argument("--summary", help="the JSON summary (default: benchmarks/results/gpu_latest.json for the whole "
                                     "suite on a GPU; else the report's name with .json)")
    p.add_argument("--assets", default=str(DEFAULT_ASSETS),
                   help="folder with tinystories/train.txt, tinystories/valid.txt, tiktoken_cache/")
    p.add_argument("--make-assets", metavar="SHARED", help="fill --assets from SHARED (a checkout's ../shared), then stop")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="toy sizes and no inductor: a smoke run of every step")
    p.add_argument("--budget", type=float, default=TOTAL_SECONDS, metavar="SECONDS",
                   help=f"the whole suite's aim (default {TOTAL_SECONDS}): each step's commands stop at its share")
    p.add_argument("--work", help="folder for the prepared data and the runs (default: a temporary folder)")
    p.add_argument("--steps", help=f"the steps to run, comma-separated, of {','.join(STEP_SHARES)} (default: all); "
                                   "the budget is shared among them")
    p.add_argument("--runs", help="the trainer's runs to make, comma-separated BLOCK-OPTIMIZER "
                                  f"(default: {','.join(f'{r[0]}-{r[3]}' for r in TRAINER_RUNS)})")
    args = p.parse_args(argv)
    assets = Path(args.assets).resolve()
    if args.make_assets:
        return make_assets(Path(args.make_assets), assets)

    import torch

    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    report, summary = output_paths(args)
    error = refusal(args, device, assets, report, summary)
    if error:
        print(f"gpu_suite: error: {error}", file=sys.stderr)
        return 2
    plan = Plan.quick_cpu(device) if args.quick else Plan(device, False)
    plan.budget = args.budget
    error = choose_steps(plan, args.steps, args.runs)
    if error:
        print(f"gpu_suite: error: {error}", file=sys.stderr)
        return 2
    plan.started = IMPORTED if run_as_script else time.perf_counter()  # tests call main() long after the import

    extra = {"TIKTOKEN_CACHE_DIR": str(assets / "tiktoken_cache"), "HF_HUB_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "TINYGEMMA_STORIES": str(assets / "tinystories")}
    if plan.quick:
        extra["OMP_NUM_THREADS"] = "1"  # toy sizes: more threads only contend for shared cores
    env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    env_line = " ".join(f"{k}={v}" for k, v in {"PYTHONPATH": "src", **extra}.items())
    machine, info = environment(plan, assets)
    start = time.perf_counter()
    results: list[Result] = []

    def write(shown_results: list[Result]) -> None:
        write_report(report, plan, argv, env_line, machine, shown_results, time.perf_counter() - start)
        write_summary(summary, plan, info, shown_results, time.perf_counter() - start)

    def done(result: Result) -> None:
        results.append(result)
        print(f"{result.title}: {result.state}", file=sys.stderr, flush=True)
        write(results)

    write(results)  # the machine, and every step "not reached", before anything can go wrong
    previous = {signum: signal.signal(signum, stop_on_signal) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
            work = Path(args.work).resolve() if args.work else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            partials: list[Result] = []  # the trainer's step so far, kept if the suite's own code fails in it
            if "trainer" in plan.steps:
                done(guarded(0, trainer, plan, env, work, assets, partials=partials,
                             progress=lambda partial: (partials.append(partial), write([partial]))))
            trainer_rows = results[0].data.get("trainer", []) if "trainer" in plan.steps else []
            for index, name, step, args in ((1, "workshop", workshop, (trainer_rows,)), (2, "generation", generation, ()),
                                            (3, "optimizer_step", optimizer_step, ()), (4, "loss_head", loss_head, ()),
                                            (5, "tests", cuda_tests, None)):
                if name in plan.steps:
                    done(guarded(index, step, plan, env) if args is None else guarded(index, step, plan, env, work, *args))
    finally:
        for signum, handler in previous.items():  # main() called from Python (the tests): theirs again
            signal.signal(signum, handler)
    print(f"wrote {report} and {summary}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
