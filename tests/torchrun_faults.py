"""torchrun's entry point for the restart test in tests/test_reliability_train.py: `tinygemma`, with one process
killed by SIGKILL on chosen attempts, the way a GPU process is lost. The faults come from here, not from the
product code.

TINYGEMMA_FAULTS is a JSON list indexed by torchrun's attempt (TORCHELASTIC_RESTART_COUNT): null (no fault), or
{"rank": R, "step": S}: process R dies as it begins optimizer step S (0-based), or
{"rank": R, "save": N}: process R dies on its N-th safetensors write of the attempt (inside a checkpoint), or
{"rank": R, "nan": S}: process R's training loss is NaN at optimizer step S (0-based); it lives on, or
{"rank": R, "oom": S}: process R runs out of memory as it begins optimizer step S (a one-line error of its own), or
{"rank": R, "other_cpu": true}: process R's CPU says the opposite of this one's about native bfloat16 (another
machine's), which Muon's auto backend follows, or
{"rank": R, "refuse_logs": MESSAGE}: process R's opening of the run's logs refuses with MESSAGE (as process 0's
does where another command wrote into the folder meanwhile), or with a full disk's OSError where "disk_full" is
true too, or with a ValueError (a bug's) where "bug" is true.
With TINYGEMMA_EXIT_LOG set, each process appends "RANK EXIT_STATUS" to it as it ends (not one killed; 1 for an
uncaught exception, which then ends it as Python does).
At the start of every attempt, rank 0 appends to TINYGEMMA_FAULT_LOG what it finds in the run directory
TINYGEMMA_FAULT_RUN: the last checkpoint's step, whether that checkpoint loads, and half-written checkpoints.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

import tinygemma
import tinygemma.checkpoint
import tinygemma.model
import tinygemma.optim
import tinygemma.train
from tinygemma.cli import main


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def inject(fault: dict) -> None:
    if fault.get("other_cpu"):
        has_bf16 = tinygemma.optim.cpu_has_bf16
        tinygemma.optim.cpu_has_bf16 = lambda: not has_bf16()
    if "refuse_logs" in fault:
        def refusing_open_logs(self):
            if fault.get("disk_full"):
                raise OSError(28, fault["refuse_logs"])
            if fault.get("bug"):
                raise ValueError(fault["refuse_logs"])
            raise tinygemma.UserError(fault["refuse_logs"])

        tinygemma.train.Trainer.open_logs = refusing_open_logs
    if "oom" in fault:
        step = tinygemma.train.Trainer.step

        def failing_step(self, s):
            if s == fault["oom"]:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return step(self, s)

        tinygemma.train.Trainer.step = failing_step
    if "step" in fault:
        step = tinygemma.train.Trainer.step

        def dying_step(self, s):
            if s == fault["step"]:
                die()
            return step(self, s)

        tinygemma.train.Trainer.step = dying_step
    if "save" in fault:
        save, calls = tinygemma.checkpoint.atomic_save_safetensors, []

        def dying_save(*args, **kwargs):
            calls.append(1)
            if len(calls) == fault["save"]:
                die()
            return save(*args, **kwargs)

        tinygemma.checkpoint.atomic_save_safetensors = dying_save
    if "nan" in fault:
        step, forward, now = tinygemma.train.Trainer.step, tinygemma.model.Gemma3.forward, {}

        def noting_step(self, s):
            now["step"] = s
            return step(self, s)

        def nan_forward(self, *args, **kwargs):
            loss = forward(self, *args, **kwargs)
            return loss * float("nan") if self.training and now.get("step") == fault["nan"] else loss

        tinygemma.train.Trainer.step, tinygemma.model.Gemma3.forward = noting_step, nan_forward


def record(run_dir: Path, attempt: int, log: Path) -> None:
    ckpts = run_dir / "checkpoints"
    last = json.loads((ckpts / "last.json").read_text()) if (ckpts / "last.json").exists() else None
    loads = last is not None and tinygemma.load(ckpts / last["dir"]).config.n_layers > 0
    half = sorted(p.name for p in ckpts.glob(".tmp-*")) if ckpts.exists() else []
    with open(log, "a") as f:
        f.write(json.dumps({"attempt": attempt, "last": last and last["step"], "loads": loads, "half": half}) + "\n")


if __name__ == "__main__":
    attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
    if rank == 0:
        record(Path(os.environ["TINYGEMMA_FAULT_RUN"]), attempt, Path(os.environ["TINYGEMMA_FAULT_LOG"]))
    faults = json.loads(os.environ["TINYGEMMA_FAULTS"])
    fault = faults[attempt] if attempt < len(faults) else None
    if fault and fault["rank"] == rank:
        inject(fault)

    def log_exit(status: int) -> None:
        if os.environ.get("TINYGEMMA_EXIT_LOG"):
            with open(os.environ["TINYGEMMA_EXIT_LOG"], "a") as f:
                f.write(f"{rank} {status}\n")

    try:
        status = main()
    except Exception:
        log_exit(1)
        raise
    log_exit(status)
    sys.exit(status)
