"""Training when things go wrong (issue 7): kill -9 at random moments, NaN losses, a full disk, corrupt files."""

import hashlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import test_train
import torch
from test_train import run, tiny_settings, torchrun, train_losses, val_losses

import tinygemma
import tinygemma.checkpoint
import tinygemma.cli
import tinygemma.files
import tinygemma.metrics
import tinygemma.train
from tinygemma.files import WriteError
from tinygemma.model import Gemma3

ROOT = Path(__file__).resolve().parents[1]
# test_train's fixtures: real stories BPE-tokenized, the uninterrupted 40-step run, one thread per process, and
# the uninterrupted 15 steps of two processes under torchrun.
data_dir, straight_run, one_thread = test_train.data_dir, test_train.straight_run, test_train.one_thread
two_process_run = test_train.two_process_run


def last_checkpoint(run_dir: Path) -> dict | None:
    pointer = run_dir / "checkpoints" / "last.json"
    return json.loads(pointer.read_text()) if pointer.exists() else None


def test_kill_9_at_random_moments_then_resume_reaches_the_end_with_the_same_losses(straight_run, data_dir, tmp_path):
    """Checkpoint every step, kill the process with SIGKILL a little after it makes progress (so the kills land
    anywhere: mid-step, mid-checkpoint, mid-plot), check the last checkpoint loads, resume; three times. The run
    must then finish, and its losses must be the uninterrupted run's, exactly."""
    out = tmp_path / "killed"
    settings = tiny_settings(data_dir, out, "checkpoint_interval=1")
    cmd = [sys.executable, "-m", "tinygemma", "train", "--resume", *[a for s in settings for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    rng = random.Random(7)
    kills = 0
    while kills < 3:
        before = (last_checkpoint(out) or {}).get("step", 0)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while (last_checkpoint(out) or {}).get("step", 0) <= before and proc.poll() is None:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:  # finished before the kill: the run is too short for this test
            pytest.fail(f"the run finished before kill {kills + 1}: {proc.stderr.read().decode()[-2000:]}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills += 1
        last = last_checkpoint(out)
        assert last is not None and last["step"] >= before
        tinygemma.load(out / "checkpoints" / last["dir"])  # the previous checkpoint is always loadable
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, test_train.torchrun_failure(proc)
    assert last_checkpoint(out)["step"] == 40
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train_loss" in r]
    assert steps == list(range(1, 41))  # every step once: the lost work was dropped and redone
    assert train_losses(out) == train_losses(straight_run)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def poisoned_step(monkeypatch, poison) -> dict:
    """Make the training loss poison(loss) at one optimizer step, state["at"] (batch size 8, no accumulation: one
    call per step); returns that state."""
    state = {"calls": 0, "at": None}
    forward = Gemma3.forward

    def patched(self, input_ids, targets=None, reduction="mean"):
        loss = forward(self, input_ids, targets, reduction)
        if targets is not None and self.training:
            state["calls"] += 1
            if state["calls"] == state["at"]:
                return poison(loss)
        return loss

    monkeypatch.setattr(Gemma3, "forward", patched)
    return state


class NanGradient(torch.autograd.Function):
    """The loss as it is, its gradient NaN: a finite loss whose backward diverged."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.fixture
def nan_at_step(monkeypatch):
    """The training loss NaN at one optimizer step."""
    return poisoned_step(monkeypatch, lambda loss: loss * float("nan"))


@pytest.fixture
def nan_gradient_at_step(monkeypatch):
    """The gradients NaN, the loss finite, at one optimizer step."""
    return poisoned_step(monkeypatch, NanGradient.apply)


def test_nonfinite_loss_stops_naming_the_step_and_saves_nothing(nan_at_step, data_dir, tmp_path, monkeypatch):
    nan_at_step["at"] = 8
    out = tmp_path / "nan"
    with pytest.raises(tinygemma.train.NonFiniteError,
                       match="non-finite loss at step 8.*last good checkpoint is step 5") as stopped:
        run(data_dir, out, "max_steps=12", "checkpoint_interval=5")
    assert "float16" not in str(stopped.value)  # (float32: no word of float16's overflow)
    assert last_checkpoint(out)["step"] == 5
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.json", "last.json", "step_000005"]
    # The loss stays on the device until the read before step 10's evaluation: steps 9 and 10 ran, but the run
    # stops there, records the steps up to the non-finite one, and saves nothing after it.

    def strict(line):  # jq, JavaScript and other strict JSON readers refuse NaN
        return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
    records = [r for r in map(strict, (out / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9)) and records[-1]["nonfinite"] is True
    assert records[-1]["train_loss"] is None
    assert math.isnan(tinygemma.metrics.read_records(out / "metrics.jsonl")[-1]["train_loss"])
    monkeypatch.undo()
    assert run(data_dir, out, "max_steps=12", "checkpoint_interval=5", resume=True)["step"] == 12


@pytest.mark.parametrize("dtype", ["float32", "float16"])  # float16: the scaler must still update after a skip
def test_nonfinite_loss_can_be_skipped_and_counted(nan_at_step, data_dir, tmp_path, dtype):
    nan_at_step["at"] = 3
    out = tmp_path / "skip"
    summary = run(data_dir, out, "max_steps=6", "on_nonfinite=skip", f"dtype={dtype}")
    assert summary["step"] == 6 and summary["skipped_steps"] == 1
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r}
    assert records[3]["skipped"] is True and records[3]["skipped_steps"] == 1
    # (metrics.jsonl writes a non-finite loss as null: the check is for a number, and a finite one)
    assert all(r["train_loss"] is not None and math.isfinite(r["train_loss"]) for s, r in records.items() if s != 3)
    assert math.isfinite(summary["val_loss"])  # the model was not poisoned


def test_float16_a_skipped_nonfinite_loss_leaves_the_loss_scale_as_it_was(nan_at_step, data_dir, tmp_path):
    """A loss that is not finite (the forward pass overflowed) under float16 and on_nonfinite = skip halved the
    loss scale as if the gradients had overflowed (unscale_ saw their NaN, update() backed off): a run of such steps
    left a scale too small for float16's gradients for thousands of steps. The scale and its growth count stay."""
    nan_at_step["at"] = 3
    out = tmp_path / "skipped"
    assert run(data_dir, out, "max_steps=3", "warmup_steps=1", "dtype=float16", "on_nonfinite=skip")["skipped_steps"] == 1
    state = json.loads((out / "checkpoints" / last_checkpoint(out)["dir"] / "trainer_state.json").read_text())
    assert state["scaler"]["scale"] == 2.0**16 and state["scaler"]["_growth_tracker"] == 2  # (steps 1 and 2 grew it)


def test_a_skipped_last_step_leaves_the_printed_summary_strict_json(nan_at_step, data_dir, tmp_path, capsys):
    """`tinygemma train` prints its summary as one line of JSON; the last step skipped as non-finite made its
    train_loss NaN there, which strict readers (jq's --seq, JavaScript, Go) refuse: it is null, as in
    metrics.jsonl."""
    nan_at_step["at"] = 4
    settings = tiny_settings(data_dir, tmp_path / "skiplast", "max_steps=4", "on_nonfinite=skip")
    assert tinygemma.cli.main(["train", *[a for s in settings for a in ("--set", s)]]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the summary line"))
    assert summary["step"] == 4 and summary["skipped_steps"] == 1 and summary["train_loss"] is None
    assert math.isfinite(summary["val_loss"])


def test_a_failed_resume_leaves_the_next_resume_its_checkpoints_recipe(data_dir, tmp_path, capsys):
    """A resume attempt writes config.json when it starts; one that diverged (a learning rate of 1e30) before any
    checkpoint left its settings there, and a plain --resume took them up again. --resume reads the last
    checkpoint's recipe: the run goes on as it was trained."""
    out = tmp_path / "run"
    settings = [a for s in tiny_settings(data_dir, out, "max_steps=6", "checkpoint_interval=2") for a in ("--set", s)]
    assert tinygemma.cli.main(["train", *settings, "--stop-at", "2"]) == 0
    copied = tmp_path / "copied"  # its checkpoints alone, config.json lost: their recipe, not the built-in one
    shutil.copytree(out / "checkpoints", copied / "checkpoints")
    assert tinygemma.cli.main(["train", "--out", str(copied), "--resume", "--stop-at", "4"]) == 0
    assert json.loads((copied / "config.json").read_text())["train"]["max_steps"] == 6
    code = tinygemma.cli.main(["train", "--out", str(out), "--resume", "--set", "learning_rate=1e30"])
    assert code != 0 and "non-finite" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["train"]["learning_rate"] == 1e30
    assert tinygemma.cli.main(["train", "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "1e+30" not in err and "learning_rate" not in err
    assert json.loads((out / "config.json").read_text())["train"]["learning_rate"] == 1e-2
    straight = tmp_path / "straight"
    run(data_dir, straight, "max_steps=6", "checkpoint_interval=2")
    assert train_losses(out) == train_losses(straight)


def test_float16_overflows_the_scaler_skips_are_counted_and_said(data_dir, tmp_path, monkeypatch, capsys):
    """A loss scale far too large (2**22) overflows the float16 gradients of the first steps: the scaler skips
    their updates and lowers the scale, which the run counts as skipped steps and says in its log line (they
    were shown only as 'grad norm inf'); a resumed run counts on from its checkpoint, and its losses are the
    uninterrupted run's."""
    monkeypatch.setattr(tinygemma.train, "grad_scaler", lambda rt, fsdp: torch.amp.GradScaler(
        rt.device.type, init_scale=2.0**22, enabled=rt.dtype == torch.float16))
    settings = ["max_steps=6", "dtype=float16", "log_interval=1", "checkpoint_interval=3"]
    straight = tinygemma.train.train(tinygemma.config.load_recipe(None, tiny_settings(data_dir, tmp_path / "a", *settings)))
    said = capsys.readouterr().out
    records = {r["step"]: r for r in tinygemma.metrics.read_records(tmp_path / "a" / "metrics.jsonl")
               if "train_loss" in r}  # (an overflowed grad norm, written as null, read back as NaN)
    overflowed = [s for s, r in records.items() if r.get("overflow")]
    assert overflowed[0] == 1 and len(overflowed) < 6  # the scale came down to one that fits
    assert straight["skipped_steps"] == len(overflowed) == records[overflowed[-1]]["skipped_steps"]
    assert all(records[s]["skipped"] and not math.isfinite(records[s]["grad_norm"]) for s in overflowed)
    assert all(math.isfinite(r["grad_norm"]) and "skipped" not in r for s, r in records.items() if s not in overflowed)
    assert f"step {overflowed[0]}/6 | " in said and "(float16 overflow: update skipped, loss scale lowered)" in said
    run(data_dir, tmp_path / "b", *settings, stop_at=3)
    assert run(data_dir, tmp_path / "b", *settings, resume=True)["skipped_steps"] == straight["skipped_steps"]
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")


def test_float16_overflows_and_skipped_nonfinite_losses_are_numbered_in_step_order(nan_at_step, data_dir, tmp_path,
                                                                                   monkeypatch):
    """Under float16 with on_nonfinite = skip, a non-finite loss (seen as the step runs) and the scaler's overflows
    (seen when the records are read, at the log interval) are both skipped steps: skipped_steps counts them in
    step order (the loss's skip was numbered first, ahead of earlier overflows)."""
    monkeypatch.setattr(tinygemma.train, "grad_scaler", lambda rt, fsdp: torch.amp.GradScaler(
        rt.device.type, init_scale=2.0**40, enabled=rt.dtype == torch.float16))
    nan_at_step["at"] = 3  # after the first overflowed steps (a scale of 2**40 takes several to come down)
    out = tmp_path / "mixed"
    summary = run(data_dir, out, "max_steps=6", "dtype=float16", "on_nonfinite=skip", "log_interval=6")
    records = [r for r in tinygemma.metrics.read_records(out / "metrics.jsonl") if "train_loss" in r]
    skipped = [(r["step"], r["skipped_steps"]) for r in records if r.get("skipped")]
    overflowed = [r["step"] for r in records if r.get("overflow")]
    assert overflowed[:2] == [1, 2] and 3 not in overflowed and len(skipped) == summary["skipped_steps"] >= 3
    assert [n for _, n in skipped] == list(range(1, len(skipped) + 1)) and [s for s, _ in skipped] == sorted(
        s for s, _ in skipped)


def test_float16_gradients_that_overflow_at_every_scale_stop_the_run(data_dir, tmp_path, monkeypatch):
    """Under float16 a step whose loss is finite and gradients are not is the scaler's overflow, skipped; gradients
    that are never finite (here NaN from sqrt at 0) were skipped for ever, the scale halving towards zero and the
    run training nothing. Below a loss scale of 1 it stops as a non-finite step does, saving nothing; a
    checkpoint written before stays the last good one."""
    forward = Gemma3.forward
    state = {"poison": False}

    def patched(self, input_ids, targets=None, reduction="mean"):
        loss = forward(self, input_ids, targets, reduction)
        if targets is not None and self.training and state["poison"]:
            loss = loss + (self.norm.weight.sum() * 0).abs().sqrt()  # + 0, with a NaN gradient
        return loss

    monkeypatch.setattr(Gemma3, "forward", patched)
    out = tmp_path / "fp16"
    run(data_dir, out, "max_steps=40", "dtype=float16", "checkpoint_interval=2", stop_at=2)
    state["poison"] = True
    with pytest.raises(tinygemma.train.NonFiniteError,
                       match=r"float16 gradients overflowed at every loss scale tried, which fell to 0\.25 \(step 20, "
                             r"loss \d.*"
                             r"last good checkpoint is step 18\. .*bfloat16 or float32"):
        run(data_dir, out, "max_steps=40", "dtype=float16", "checkpoint_interval=2", "log_interval=40", resume=True)
    # 2**16 halved at each step from 3 on: 1 after step 18 (still saved), 0.5 after 19, and the read before step
    # 20's checkpoint stops the run (the log interval's read would have come at step 40)
    assert last_checkpoint(out)["step"] == 18
    records = [r for r in tinygemma.metrics.read_records(out / "metrics.jsonl") if "train_loss" in r]
    assert [r["step"] for r in records] == list(range(1, 21)) and all(r.get("overflow") for r in records[2:])
    assert records[-1]["loss_scale"] == 0.25 and records[-1]["nonfinite"] and "loss_scale" not in records[-2]
    # Under "skip" too (it skips a step; at a scale of 0 the next finite step's gradients would be NaN, applied)
    skip = tmp_path / "skip"
    state["poison"] = False
    run(data_dir, skip, "max_steps=40", "dtype=float16", "checkpoint_interval=2", stop_at=2)
    state["poison"] = True
    with pytest.raises(tinygemma.train.NonFiniteError, match=r"which fell to 0\.5 \(step 19, "):  # read each step
        run(data_dir, skip, "max_steps=40", "dtype=float16", "checkpoint_interval=2", "on_nonfinite=skip",
            "log_interval=1", resume=True)


def test_float16_a_nonfinite_loss_among_overflows_stops_at_the_loss(nan_at_step, data_dir, tmp_path, monkeypatch):
    """Under on_nonfinite = stop, a NaN loss read in the same window as overflows that took the scale below 1: the
    run stops at the NaN step, as it would without them, keeping no record past it (the loss scale's stop is for
    runs that have no other non-finite step)."""
    monkeypatch.setattr(tinygemma.train, "grad_scaler", lambda rt, fsdp: torch.amp.GradScaler(
        rt.device.type, init_scale=0.5, enabled=rt.dtype == torch.float16))
    forward = Gemma3.forward  # (nan_at_step's)

    def overflowing(self, input_ids, targets=None, reduction="mean"):  # NaN gradients, a finite loss: overflows
        loss = forward(self, input_ids, targets, reduction)
        return loss + (self.norm.weight.sum() * 0).abs().sqrt() if targets is not None and self.training else loss

    monkeypatch.setattr(Gemma3, "forward", overflowing)
    nan_at_step["at"] = 3
    out = tmp_path / "run"
    with pytest.raises(tinygemma.train.NonFiniteError, match=r"non-finite loss at step 3 .*skip such steps; a "
                                                             r"float16 forward pass can also overflow \(float16 stops "
                                                             r"at 65,504\): train.dtype = float32 \(or bfloat16"):
        run(data_dir, out, "max_steps=6", "dtype=float16", "log_interval=6")
    records = [r for r in tinygemma.metrics.read_records(out / "metrics.jsonl") if "train_loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["nonfinite"]
    assert not any("loss_scale" in r for r in records)


def test_a_model_that_overflows_as_it_is_made_is_said_so_not_blamed_on_the_learning_rate(data_dir, tmp_path):
    """A model whose settings overflow before any update (a query_pre_attn_scalar of 1e-300 scales queries by
    infinity: its validation loss at step 0 is already NaN) was told to lower train.learning_rate, which plays no
    part yet: the stop names the model's settings and the dtype."""
    with pytest.raises(tinygemma.train.NonFiniteError,
                       match=r"non-finite loss before any update \(step 0's validation loss nan, step 1's loss nan\): "
                             r"the model overflows as it starts.*model.query_pre_attn_scalar.*float32"):
        run(data_dir, tmp_path / "run", "max_steps=6", "model.query_pre_attn_scalar=1e-300")
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())
    # Begun from another checkpoint's weights (train.init_from), the stop names them: the model's own settings made
    # none of them (a final norm's gain of 3e38, finite, sends the logits past float32's range)
    from safetensors.torch import load_file, save_file

    run(data_dir, tmp_path / "base", "max_steps=2", "warmup_steps=0")
    source = tmp_path / "base" / "checkpoints" / "step_000002"
    shutil.copytree(source, tmp_path / "hot")
    weights = load_file(source / "model.safetensors")
    weights["norm.weight"] = torch.full_like(weights["norm.weight"], 3e38)
    save_file(weights, tmp_path / "hot" / "model.safetensors")
    with pytest.raises(tinygemma.train.NonFiniteError, match=r"before any update .*: the model overflows as it "
                                                             r"starts, whatever the learning rate; look at the "
                                                             r"weights of train.init_from \(.*hot\) and the"):
        run(data_dir, tmp_path / "tuned", "max_steps=6", f"init_from={tmp_path / 'hot'}")


def test_full_disk_fails_before_writing_and_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "disk"
    usage = namedtuple("usage", "total used free")
    calls = {"n": 0}

    def disk_usage(path):
        calls["n"] += 1
        return usage(10**12, 10**12, 10**12 if calls["n"] == 1 else 1000)  # room for the first checkpoint only

    monkeypatch.setattr(tinygemma.checkpoint.shutil, "disk_usage", disk_usage)
    with pytest.raises(WriteError, match="not enough free disk.*step 10.*step 5 is intact"):  # exit status 1
        run(data_dir, out, "max_steps=12", "checkpoint_interval=5")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.json", "last.json", "step_000005"]
    monkeypatch.undo()
    assert run(data_dir, out, "max_steps=12", "checkpoint_interval=5", resume=True)["step"] == 12


def test_a_prepare_into_the_data_folder_mid_run_leaves_the_checkpoints_whole(data_dir, tmp_path, monkeypatch):
    """Each checkpoint copied tokenizer.json from the data folder as it was then: a `prepare` into that folder
    while the run trained (another vocabulary) gave every later checkpoint the new tokenizer beside weights trained
    with the old one and a record of the old one's digest, so generate, eval, export and --resume refused the run
    (and pruning had deleted the good checkpoints). A checkpoint carries the tokenizer the run loaded at its start."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    original = (data / "tokenizer.json").read_bytes()
    real = tinygemma.train.Trainer.checkpoint

    def checkpoint(self, step):
        if step == 4:  # another tokenizer lands in the data folder between two checkpoints
            (data / "tokenizer.json").write_text(json.dumps({**json.loads(original), "normalizer": None,
                                                             "added_tokens": []}))
        return real(self, step)

    monkeypatch.setattr(tinygemma.train.Trainer, "checkpoint", checkpoint)
    out = tmp_path / "run"
    run(data, out, "max_steps=8", "checkpoint_interval=2", "keep_checkpoints=1", stop_at=6)
    monkeypatch.undo()
    (data / "tokenizer.json").write_bytes(original)  # (so the resume below reads the run's own data)
    final = out / "checkpoints" / "step_000006"
    assert (final / "tokenizer.json").read_bytes() == original
    tinygemma.load(final)  # the checkpoint's tokenizer matches its record: loads and exports as any other
    assert tinygemma.cli.main(["export", "--ckpt", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert run(data, out, "max_steps=8", "checkpoint_interval=2", resume=True)["step"] == 8


def test_checkpoints_hold_no_pickles_and_corrupt_state_is_refused(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "corrupt"
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", stop_at=2)
    ckpt = out / "checkpoints" / "step_000002"
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json"}
    optimizer = ckpt / "optimizer.safetensors"
    good = optimizer.read_bytes()
    optimizer.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(tinygemma.UserError, match="not a readable safetensors file"):
        run(data_dir, out, "max_steps=4", "checkpoint_interval=2", resume=True)
    optimizer.write_bytes(good)
    with pytest.raises(tinygemma.UserError, match="differs from the configured one in d_model"):
        run(data_dir, out, "max_steps=4", "checkpoint_interval=2", "model.d_model=32", resume=True)
    # The CLI resumes from the run's config.json, whose layer_types follow its n_layers: a new count is said as
    # the model's difference, not as layer_types' length, a setting the user never gave.
    code = tinygemma.cli.main(["train", "--out", str(out), "--resume", "--set", "model.n_layers=1"])
    assert code == 2 and "differs from the configured one in layer_types, n_layers" in capsys.readouterr().err
    # The run's own count, given again, keeps its layer_types: here its own list, not the pattern's.
    custom = tmp_path / "custom"
    run(data_dir, custom, "max_steps=4", "checkpoint_interval=2", "model.layer_types=full_attention,sliding_attention",
        stop_at=2)
    code = tinygemma.cli.main(["train", "--out", str(custom), "--resume", "--stop-at", "4", "--set", "model.n_layers=2"])
    assert code == 0, capsys.readouterr().err

    def unpickle(*args, **kwargs):
        raise AssertionError("resume unpickled something")

    monkeypatch.setattr(torch, "load", unpickle)
    monkeypatch.setattr(pickle, "load", unpickle)
    monkeypatch.setattr(pickle, "loads", unpickle)
    assert run(data_dir, out, "max_steps=4", "checkpoint_interval=2", resume=True)["step"] == 4


def test_a_token_file_corrupted_in_place_is_refused_in_one_line_before_the_device_sees_it(data_dir, tmp_path, capsys):
    """A token file of the right size holding an id past the model's (a bit flip, another tokenizer's tokens
    copied over it) ended training in the embedding's IndexError traceback on a CPU, and in a device-side assert on
    CUDA. The windows are checked on the host: training refuses the train split's id in one line at its first step,
    and the val split's at the start (every process checks every validation window)."""
    for split in ("train", "val"):
        data = tmp_path / f"data_{split}"
        shutil.copytree(data_dir, data)
        meta = json.loads((data / "meta.json").read_text())
        tokens = np.memmap(data / meta["splits"][split]["file"], dtype=meta["dtype"], mode="r+")
        tokens[:] = 60000
        tokens.flush()
        del tokens
        out = tmp_path / f"run_{split}"
        code = tinygemma.cli.main(["train", *[a for s in tiny_settings(data, out, "max_steps=4")
                                              for a in ("--set", s)]])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.endswith("the tokens hold id 60000, outside the model's 512 ids (0 to 511): the token file is "
                            "corrupt, or not of this model's tokenizer\n"), err
        assert not (out / "checkpoints").exists()  # nothing trained on them
        assert not (out / "metrics.jsonl").exists() or train_losses(out) == {}


def test_checkpoint_files_of_another_run_or_a_lost_pointer_are_refused_in_one_line(data_dir, tmp_path, capsys):
    """A checkpoint's weights or optimizer state swapped for another model's, or AdamW's state in a Muon run,
    failed with a traceback (a half-loaded optimizer state trained on until its first step); a run whose last.json
    was lost started again from step 0 and pruned its checkpoints. Each is now refused in one line, and the run
    folder is left as it was."""
    base, other, adamw = tmp_path / "base", tmp_path / "other", tmp_path / "adamw"
    run(data_dir, base, "max_steps=4", "checkpoint_interval=2", "optimizer=muon", "lr_schedule=wsd", stop_at=2)
    run(data_dir, other, "max_steps=4", "checkpoint_interval=2", "optimizer=muon", "lr_schedule=wsd",
        "model.d_model=32", stop_at=2)
    run(data_dir, adamw, "max_steps=4", "checkpoint_interval=2", "optimizer=adamw", "lr_schedule=wsd", stop_at=2)
    ckpt = base / "checkpoints" / "step_000002"
    saved = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    def refused(source: Path, name: str, match: str) -> None:
        shutil.copyfile(source / "checkpoints" / "step_000002" / name, ckpt / name)
        before = {p.relative_to(base): p.read_bytes() for p in base.rglob("*") if p.is_file()}
        code = tinygemma.cli.main(["train", "--resume", *[a for s in tiny_settings(data_dir, base, "max_steps=4",
                                   "checkpoint_interval=2", "optimizer=muon", "lr_schedule=wsd")
                                   for a in ("--set", s)]])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and match in err, err
        assert {p.relative_to(base): p.read_bytes() for p in base.rglob("*") if p.is_file()} == before
        (ckpt / name).write_bytes(saved[name])

    refused(other, "model.safetensors", "embed_tokens.weight has shape (512, 32), the config needs (512, 64)")
    refused(other, "optimizer.safetensors", "is not the optimizer state of this model")
    refused(adamw, "optimizer.safetensors", "is not the state of this run's optimizer")

    (base / "checkpoints" / "last.json").unlink()  # best.json (and the checkpoint it names) outlived it
    with pytest.raises(tinygemma.UserError, match=r"holds checkpoints \(step_000002\) but no last.json"):
        run(data_dir, base, "max_steps=4", "checkpoint_interval=2", "optimizer=muon", "lr_schedule=wsd", resume=True)
    assert (ckpt / "trainer_state.json").exists()
    (base / "checkpoints" / "last.json").write_text('{"dir": "step_000002"}')  # no step: its trainer state's
    with pytest.raises(tinygemma.UserError, match=r"already holds a run \(last checkpoint: step_000002\); pass --resume "
                                                 r"\(resume=True from Python\) to continue it, or choose another "
                                                 r"--out \(train.out\)"):  # (a recipe's name for it too)
        run(data_dir, base, "max_steps=4", "checkpoint_interval=2", "optimizer=muon", "lr_schedule=wsd")
    assert run(data_dir, base, "max_steps=4", "checkpoint_interval=2", "optimizer=muon", "lr_schedule=wsd",
               resume=True)["step"] == 4
    (base / "checkpoints" / "last.json").write_text('{"dir": "step_000004"}')  # the finished run, run again
    assert run(data_dir, base, "max_steps=4", "checkpoint_interval=2", "optimizer=muon", "lr_schedule=wsd",
               resume=True)["step"] == 4
    assert tinygemma.checkpoint.checkpoint_pointer(base)["step"] == 4


def test_a_damaged_trainer_state_is_refused_in_one_line_and_never_restarts_the_run(data_dir, tmp_path, capsys):
    """A trainer state without its step (or of another step, or of no tinygemma format) was read as a fresh start:
    the run trained again from step 0 and pruned its only checkpoint. One without its random generators' states,
    or with a damaged one, and an optimizer state with damaged metadata, ended in a traceback. Each is now one line,
    the run folder left as it was."""
    out = tmp_path / "damaged"
    settings = ("max_steps=4", "checkpoint_interval=2")
    run(data_dir, out, *settings, stop_at=2)
    ckpt = out / "checkpoints" / "step_000002"
    state_file, optimizer_file = ckpt / "trainer_state.json", ckpt / "optimizer.safetensors"
    good_state_bytes, good_optimizer = state_file.read_bytes(), optimizer_file.read_bytes()
    good_state = json.loads(good_state_bytes)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def refused(match: str) -> None:
        snapshot = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        code = tinygemma.cli.main(["train", "--resume", *[a for s in tiny_settings(data_dir, out, *settings)
                                                          for a in ("--set", s)]])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and match in err, err
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot

    for damaged, match in (({k: v for k, v in good_state.items() if k != "step"}, "is the state of step None, where "
                                                                                  "its pointer names step 2"),
                           ({**good_state, "step": 1}, "is the state of step 1, where its pointer names step 2"),
                           ({**good_state, "format": "other"}, "is not a tinygemma trainer state"),
                           ({}, "is not a tinygemma trainer state"),
                           ({k: v for k, v in good_state.items() if k != "rng"}, "holds no random generators' states"),
                           ({**good_state, "rng": {**good_state["rng"], "torch": "AAAA"}},
                            "holds a damaged random generator state (RuntimeError"),
                           ({**good_state, "rng": {**good_state["rng"], "numpy": 3}},
                            "holds a damaged random generator state (TypeError"),
                           ({**good_state, "best_step": "x"}, "names best step 'x', not one of the run's steps to 2"),
                           ({**good_state, "best_step": 9}, "names best step 9, not one of the run's steps to 2"),
                           ({**good_state, "best_val_loss": "x"}, "holds best validation loss 'x' for best step"),
                           ({**good_state, "best_val_loss": None}, "holds best validation loss None for best step")):
        state_file.write_text(json.dumps(damaged))
        refused(match)
    state_file.write_bytes(good_state_bytes)

    from safetensors.torch import load_file, save_file
    tensors = load_file(optimizer_file)
    for metadata, match in (({"format": "tinygemma-optimizer"}, "metadata is damaged (KeyError: 'param_groups')"),
                            ({"format": "tinygemma-optimizer", "param_groups": "[", "scalars": "{}"},
                             "metadata is damaged (JSONDecodeError")):
        save_file(tensors, optimizer_file, metadata=metadata)
        refused(match)
    optimizer_file.write_bytes(good_optimizer)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert run(data_dir, out, *settings, resume=True)["step"] == 4


def test_a_pointer_written_by_hand_keeps_its_checkpoint_from_pruning(data_dir, tmp_path, capsys, monkeypatch):
    """`{"dir": "step_000002/"}` (a path typed with tab-completion), which the readers accept, made pruning delete
    the very checkpoint it names: pointers are read as a folder name of checkpoints/ wherever they are read, and one
    naming a folder elsewhere is refused in one line. An export, which needs only the weights, is not stopped by
    an unreadable trainer state (it only feeds the model card)."""
    out = tmp_path / "pointer"
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", stop_at=2)
    ckpts = out / "checkpoints"
    (ckpts / "best.json").unlink()
    (ckpts / "last.json").write_text('{"dir": "step_000002/", "step": 2}')
    tinygemma.checkpoint.prune_checkpoints(ckpts)
    assert (ckpts / "step_000002" / "trainer_state.json").exists()
    assert tinygemma.checkpoint.resolve_checkpoint(out) == ckpts / "step_000002"
    # the run's checkpoints folder, given for the run (it said "no checkpoints/last.json" beside its last.json)
    assert tinygemma.checkpoint.resolve_checkpoint(ckpts) == ckpts / "step_000002"
    monkeypatch.chdir(ckpts)  # `--ckpt .` from inside it
    assert tinygemma.checkpoint.resolve_checkpoint(".").resolve() == (ckpts / "step_000002").resolve()
    monkeypatch.chdir(tmp_path)
    assert tinygemma.checkpoint.checkpoint_pointer(out)["dir"] == "step_000002"
    for named in ("../pointer", ".", "step_000002/../../x"):
        (ckpts / "last.json").write_text(json.dumps({"dir": named, "step": 2}))
        code = tinygemma.cli.main(["export", "--ckpt", str(out), "--out", str(tmp_path / "refused")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and f"names no folder of {ckpts} (its dir is {named!r}" in err, err
        with pytest.raises(tinygemma.UserError, match="names no folder of"):
            tinygemma.checkpoint.prune_checkpoints(ckpts)
        assert (ckpts / "step_000002" / "trainer_state.json").exists()
    (ckpts / "last.json").write_text('{"dir": "step_000002", "step": 2}')

    (ckpts / "step_000002" / "trainer_state.json").write_text("")
    code = tinygemma.cli.main(["export", "--ckpt", str(out), "--out", str(tmp_path / "hf")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_under_torchrun_a_non_finite_stop_is_said_alike_by_every_process(data_dir, tmp_path):
    """Process 1's loss is NaN at step 7, after the checkpoint of step 5: the all-reduced figures stop both
    processes, and each says so in the same words, naming the last good checkpoint (process 1's left it out).
    Every process says it: torchrun stops process 0 as soon as another has ended, maybe before it could."""
    out, log = tmp_path / "nan", tmp_path / "attempts.jsonl"
    env = {"TINYGEMMA_FAULTS": json.dumps([{"rank": 1, "nan": 6}]), "TINYGEMMA_FAULT_LOG": str(log),
           "TINYGEMMA_FAULT_RUN": str(out)}
    proc = torchrun(out, data_dir, "--stop-at", "10", settings=test_train.TWO_PROCESS_SETTINGS,
                    entry=[str(ROOT / "tests" / "torchrun_faults.py")], env=env)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "non-finite" in line]
    assert lines, test_train.torchrun_failure(proc)
    assert all(line == lines[0] for line in lines) and len(lines) <= 2
    assert lines[0].startswith("tinygemma train: error: non-finite loss at step 7") and \
        "the last good checkpoint is step 5" in lines[0]
    assert last_checkpoint(out)["step"] == 5


def test_under_torchrun_a_process_stopped_by_its_own_error_takes_the_others_without_a_traceback(data_dir, tmp_path):
    """Process 1 runs out of memory (its one-line error); process 0, waiting in the step's collective, died of
    gloo's "Connection closed by peer" in a 24-line traceback that buried it. It now says in one line that another
    process stopped (unless torchrun's SIGTERM ends it first, silently)."""
    out = tmp_path / "oom"
    env = {"TINYGEMMA_FAULTS": json.dumps([{"rank": 1, "oom": 6}]), "TINYGEMMA_FAULT_LOG": str(tmp_path / "log"),
           "TINYGEMMA_FAULT_RUN": str(out)}
    proc = torchrun(out, data_dir, "--stop-at", "10", settings=test_train.TWO_PROCESS_SETTINGS,
                    entry=[str(ROOT / "tests" / "torchrun_faults.py")], env=env)
    assert proc.returncode != 0
    assert "tinygemma train: error: out of memory (CUDA out of memory (injected))" in proc.stderr, \
        test_train.torchrun_failure(proc)
    worker_tracebacks = [line for line in proc.stderr.splitlines() if line.startswith("[rank") and "Traceback" in line]
    assert not worker_tracebacks, test_train.torchrun_failure(proc)
    assert last_checkpoint(out)["step"] == 5


def test_under_torchrun_processes_on_unlike_machines_are_refused_before_training(data_dir, tmp_path):
    """Process 1 on a machine that differs in native bfloat16 (a CPU without AVX-512 BF16 beside one with it; a
    V100 node beside an A100 one): Muon's auto backend chose another iteration there, and the two copies of the
    model drifted apart with nothing said. The run is refused in one line naming the setting, before a step."""
    out = tmp_path / "unlike"
    env = {"TINYGEMMA_FAULTS": json.dumps([{"rank": 1, "other_cpu": True}]),
           "TINYGEMMA_FAULT_LOG": str(tmp_path / "log"), "TINYGEMMA_FAULT_RUN": str(out)}
    proc = torchrun(out, data_dir, "--stop-at", "2", settings=["optimizer=muon", "warmup_steps=0"],
                    entry=[str(ROOT / "tests" / "torchrun_faults.py")], env=env)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "tinygemma train: error:" in line]
    assert len(errors) == 1 and "chose differently under auto (train.muon_backend: " in errors[0] and \
        "on process 1): " in errors[0], test_train.torchrun_failure(proc)
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step_*"))
    # Under FSDP2 each process keeps only its shard of what it orthogonalizes: one copy, which trains
    sharded = tmp_path / "sharded"
    proc = torchrun(sharded, data_dir, "--stop-at", "2", distributed="fsdp", settings=["optimizer=muon", "warmup_steps=0"],
                    entry=[str(ROOT / "tests" / "torchrun_faults.py")], env={**env, "TINYGEMMA_FAULT_RUN": str(sharded)})
    assert proc.returncode == 0, test_train.torchrun_failure(proc)


@pytest.mark.parametrize("failure", ["refusal", "disk_full", "bug"])
def test_a_refusal_of_process_0_as_it_opens_the_logs_stops_every_process(failure, data_dir, tmp_path):
    """Process 0 alone opens the run's logs, and refuses there a run another command wrote into the folder
    meanwhile, or fails on a full disk or with a bug's error (a ValueError): the other processes went on to the
    first collective and waited for it until its timeout (under an agent that does not stop them, srun's). Every
    process now ends with it (exit status 2; the disk's failure and the bug: 1), said once: the bug's by process
    0's own traceback."""
    out = tmp_path / "refused"
    message = "another command wrote a run into it"
    env = {"TINYGEMMA_FAULTS": json.dumps([{"rank": 0, "refuse_logs": message, failure: True}]),
           "TINYGEMMA_FAULT_LOG": str(tmp_path / "log"), "TINYGEMMA_FAULT_RUN": str(out),
           "TINYGEMMA_EXIT_LOG": str(tmp_path / "exits")}
    proc = torchrun(out, data_dir, "--stop-at", "2", entry=[str(ROOT / "tests" / "torchrun_faults.py")], env=env)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "tinygemma train: error:" in line]
    if failure == "bug":
        assert errors == [] and proc.stderr.count(f"ValueError: {message}") == 1, test_train.torchrun_failure(proc)
    else:
        said = f"[Errno 28] {message}" if failure == "disk_full" else message
        assert errors == [f"tinygemma train: error: {said}"], test_train.torchrun_failure(proc)
    status = 2 if failure == "refusal" else 1
    assert sorted((tmp_path / "exits").read_text().split("\n")[:-1]) == [f"0 {status}", f"1 {status}"]


def test_torchrun_restarts_lost_processes_and_the_run_goes_on_with_the_same_losses(two_process_run, data_dir,
                                                                                   tmp_path):
    """The documented multi-GPU command, `torchrun --max-restarts N -m tinygemma train ... --resume`, on 2 gloo
    processes. First attempt: process 1 is killed (SIGKILL) after the checkpoint of step 5, as it begins step 7.
    torchrun restarts both; the second attempt resumes from step 5, and process 0 is killed in the middle of
    writing the checkpoint of step 10. The third attempt finds the checkpoint of step 5 intact and loadable beside
    the half-written one, resumes from it, and finishes: its losses are those of the uninterrupted two-process run,
    exactly, each step logged once, and one wandb run (only rank 0 logs) continued across the attempts."""
    out, log = tmp_path / "restarted", tmp_path / "attempts.jsonl"
    faults = [{"rank": 1, "step": 6}, {"rank": 0, "save": 2}]  # save 2: the optimizer of checkpoint 10
    env = {"TINYGEMMA_FAULTS": json.dumps(faults), "TINYGEMMA_FAULT_LOG": str(log), "TINYGEMMA_FAULT_RUN": str(out),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # as documented: without it a restart can fail to connect
    proc = torchrun(out, data_dir, "--resume", "--stop-at", "15",
                    settings=[*test_train.TWO_PROCESS_SETTINGS, "loggers=tensorboard,wandb"],
                    entry=[str(ROOT / "tests" / "torchrun_faults.py")], options=["--max-restarts=2"], env=env)
    assert proc.returncode == 0, test_train.torchrun_failure(proc)
    assert "pytorch/pytorch#135712" not in proc.stderr  # the variable reached torchrun: no warning
    attempts = [json.loads(line) for line in log.read_text().splitlines()]
    assert attempts == [{"attempt": 0, "last": None, "loads": False, "half": []},  # --resume starts it fresh
                        {"attempt": 1, "last": 5, "loads": True, "half": []},
                        {"attempt": 2, "last": 5, "loads": True, "half": [".tmp-step_000010"]}]

    assert train_losses(out) == train_losses(two_process_run)  # steps 1 to 15, exactly
    assert val_losses(out) == val_losses(two_process_run)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 16))  # the lost work was cut
    assert last_checkpoint(out)["step"] == 15
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]

    from test_trackers import wandb_run

    # One wandb run, continued by each attempt: one offline directory per attempt (rank 0 alone logs), each named
    # by the run id (the killed attempts' logs may be cut short); the last holds every step: offline, nothing says
    # what the killed attempts' files kept, so it is sent the steps to the checkpoint again (trackers.backfill).
    wandb_id = json.loads((out / "trackers.json").read_text())["wandb"]
    assert [d.name.rsplit("-", 1)[1] for d in sorted((out / "wandb").glob("offline-run-*"))] == [wandb_id] * 3
    last = wandb_run(out)[-1]
    assert last["id"] == wandb_id
    assert {s: h["train/loss"] for s, h in last["history"].items() if "train/loss" in h} == train_losses(out)


def test_a_checkpoint_write_that_fails_midway_leaves_no_staging_folder(data_dir, tmp_path, monkeypatch):
    """A full disk while step 10's optimizer state is written: the half-written .tmp-step_000010 (its weights
    already in it) goes with the error, not left on the disk that just ran out; step 5 stays the checkpoint."""
    out = tmp_path / "run"
    real = tinygemma.checkpoint.save_optimizer

    def full_at_step_10(state_dict, path):
        if Path(path).parent.name == ".tmp-step_000010":
            assert (Path(path).parent / "model.safetensors").exists()  # (midway: the weights are written)
            raise OSError(28, "No space left on device")
        real(state_dict, path)

    monkeypatch.setattr(tinygemma.checkpoint, "save_optimizer", full_at_step_10)
    with pytest.raises(OSError, match="No space left"):
        run(data_dir, out, "max_steps=10", "checkpoint_interval=5")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.json", "last.json", "step_000005"]


def test_a_best_pointer_left_behind_by_a_kill_is_restored_on_resume(data_dir, tmp_path, monkeypatch):
    """last.json switches before best.json: a full disk (or a kill) between the two left best.json naming an older
    checkpoint for good, since the trainer state already counts the new one as the best, and pruning then deleted
    the real best. A resume points best.json at the state's best again."""
    out = tmp_path / "best"
    real = tinygemma.checkpoint.atomic_write_json

    def full_at_best_20(path, obj):
        if Path(path).name == "best.json" and obj.get("step") == 20:
            raise OSError(28, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(tinygemma.checkpoint, "atomic_write_json", full_at_best_20)
    with pytest.raises(OSError, match="No space left"):
        run(data_dir, out, "max_steps=30", "checkpoint_interval=10")
    monkeypatch.undo()
    ckpts = out / "checkpoints"
    state = json.loads((ckpts / "step_000020" / "trainer_state.json").read_text())
    assert state["best_step"] == 20 and json.loads((ckpts / "best.json").read_text())["step"] == 10  # the damage
    run(data_dir, out, "max_steps=30", "checkpoint_interval=10", resume=True, stop_at=20)  # trains nothing
    assert json.loads((ckpts / "best.json").read_text()) == {"dir": "step_000020", "step": 20,
                                                              "val_loss": state["best_val_loss"]}
    assert tinygemma.checkpoint.resolve_checkpoint(out) == ckpts / "step_000020"


def test_a_ctrl_c_as_a_checkpoint_is_renamed_into_place_takes_effect_once_last_json_names_it(data_dir, tmp_path,
                                                                                               monkeypatch):
    """A Ctrl-C between the rename of step 10's folder and last.json's switch to it left a whole checkpoint that no
    pointer named: the resume trained its steps again. It now takes effect once last.json (and best.json) name it."""
    out = tmp_path / "run"
    real = os.replace  # (files.replace_file's, which renames the folder)

    def interrupted_after(src, dst):
        real(src, dst)
        if Path(dst).name == "step_000010":
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "replace", interrupted_after)
    with pytest.raises(KeyboardInterrupt):
        run(data_dir, out, "max_steps=20", "checkpoint_interval=5")
    monkeypatch.undo()
    assert last_checkpoint(out)["step"] == 10
    assert json.loads((out / "checkpoints" / "best.json").read_text())["step"] == 10
    assert run(data_dir, out, "max_steps=20", "checkpoint_interval=5", resume=True)["step"] == 20


def test_resume_on_other_data_with_the_same_tokenizer_is_refused(data_dir, stories_dir, tmp_path):
    """Other tokens with the run's own tokenizer (another data.dir, or the folder prepared again with another
    limit) change every window to come and the validation set best.json compares: refused, as other batches are."""
    from tinygemma.data import prepare

    out = tmp_path / "run"
    run(data_dir, out, "max_steps=10", "checkpoint_interval=5", stop_at=5)
    fewer = tmp_path / "fewer"
    prepare(fewer, sources=[stories_dir / "train.txt"], tokenizer=str(data_dir / "tokenizer.json"), limit=300,
            val_fraction=0.1, workers=1, progress=False)
    with pytest.raises(tinygemma.UserError, match=r"holds other data than the run was trained on \(on .*\) "
                                                  r"\(train [\d,]+ -> [\d,]+ tokens"):
        run(fewer, out, "max_steps=10", "checkpoint_interval=5", resume=True)
    # Other stories with exactly as many tokens (here: the same ones in reverse, digested as prepare digests them).
    same_counts = tmp_path / "same_counts"
    shutil.copytree(data_dir, same_counts)
    tokens = np.fromfile(same_counts / "train.bin", dtype=np.uint16)[::-1].copy()
    tokens.tofile(same_counts / "train.bin")
    meta = json.loads((same_counts / "meta.json").read_text())
    assert meta["splits"]["train"]["blake2b"] == hashlib.blake2b(tokens[::-1].tobytes(), digest_size=16).hexdigest()
    meta["splits"]["train"]["blake2b"] = hashlib.blake2b(tokens.tobytes(), digest_size=16).hexdigest()
    (same_counts / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(tinygemma.UserError, match=r"holds other data .* \(train: as many tokens, but other ones\)"):
        run(same_counts, out, "max_steps=10", "checkpoint_interval=5", resume=True)
    assert run(data_dir, out, "max_steps=10", "checkpoint_interval=5", resume=True)["step"] == 10


def test_a_second_writer_of_a_run_is_refused_and_a_failed_start_lets_go(data_dir, tmp_path):
    """Process 0 holds RUN/.lock while it trains: another train of that run (a second --resume, torchrun workers
    left by a killed launcher) is refused in one line instead of pruning the checkpoints the first reads. A start
    that fails lets go of the lock."""
    from tinygemma.files import FolderLock

    out = tmp_path / "run"
    run(data_dir, out, "max_steps=10", "checkpoint_interval=5", stop_at=5)
    other = FolderLock(out, "a run")
    other.acquire()  # another open file description: as another process's lock
    try:
        with pytest.raises(tinygemma.UserError, match=rf"{out} is a run another process is writing \(pid {os.getpid()}\)"):
            run(data_dir, out, "max_steps=10", "checkpoint_interval=5", resume=True)
    finally:
        other.release()
    with pytest.raises(tinygemma.UserError, match="already holds a run"):  # fails after taking the lock
        run(data_dir, out, "max_steps=10", "checkpoint_interval=5")
    other.acquire()
    assert other.fd is not None
    other.release()
    assert run(data_dir, out, "max_steps=10", "checkpoint_interval=5", resume=True)["step"] == 10


def test_a_new_run_folder_is_checked_again_once_locked_and_a_users_lock_file_is_not_ours(data_dir, tmp_path,
                                                                                         monkeypatch):
    """A new folder is checked before the model is built and locked only once training starts: an export that
    finished into it meanwhile had its config.json replaced by the recipe (transformers then refused it). A user's
    own .lock file was taken for tinygemma's, overwritten, and deleted after a failed start."""
    from tinygemma.checkpoint import export, save_model

    out = tmp_path / "run"
    save_model(Gemma3(tinygemma.ModelConfig.preset("gemma3-tiny", d_model=32, n_layers=2, head_dim=8, mlp_dim=64,
                                                   vocab_size=512)), tmp_path / "ckpt")
    real_init = tinygemma.train.init_model

    def init_while_an_export_finishes(*args, **kwargs):
        export(tmp_path / "ckpt", out)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(tinygemma.train, "init_model", init_while_an_export_finishes)
    with pytest.raises(tinygemma.UserError, match="is a Hugging Face export"):
        run(data_dir, out, "max_steps=2", "warmup_steps=1")
    monkeypatch.undo()
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma3_text"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".lock").write_text("my own notes\n")
    with pytest.raises(tinygemma.UserError, match="is a folder that holds no training run"):
        run(data_dir, mine, "max_steps=2", "warmup_steps=1")
    assert (mine / ".lock").read_text() == "my own notes\n"


def test_a_nonfinite_validation_loss_is_never_checkpointed(data_dir, tmp_path, monkeypatch):
    """Finite losses and gradient norms, then an update that broke the weights: the validation loss before the
    checkpoint is the last look at them, and a non-finite one stops the run without saving."""
    out = tmp_path / "nan-val"
    real = tinygemma.train.evaluate_windows
    calls = {"n": 0}

    def broken_at_the_third(*args, **kwargs):  # step 0, step 5, then step 10's
        calls["n"] += 1
        result = real(*args, **kwargs)
        return {**result, "val_loss": float("nan")} if calls["n"] == 3 else result

    monkeypatch.setattr(tinygemma.train, "evaluate_windows", broken_at_the_third)
    with pytest.raises(tinygemma.train.NonFiniteError, match=r"non-finite validation loss at step 10 \(nan\); "
                                                            r"stopped without saving; the last good checkpoint is step 5"):
        run(data_dir, out, "max_steps=12", "checkpoint_interval=5", "eval_interval=5")
    assert last_checkpoint(out)["step"] == 5 and json.loads((out / "checkpoints" / "best.json").read_text())["step"] == 5


def test_the_run_lock_is_let_go_whatever_stops_the_run(data_dir, tmp_path, monkeypatch):
    """The notebook calls train() again in the same process: a Ctrl-C inside close() (a tracker's upload), or a
    full disk while the lock file is written, must not leave this process holding a lock it cannot let go of; and a
    refused train leaves no .lock in a folder that is no run (prepare and export would count it as a stranger)."""
    from tinygemma.files import FolderLock, WriteError

    out = tmp_path / "run"
    run(data_dir, out, "max_steps=10", "checkpoint_interval=5", stop_at=5)

    def interrupted(self, exit_code):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tinygemma.train.Trackers, "close", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(data_dir, out, "max_steps=10", "checkpoint_interval=5", resume=True, stop_at=6)
    assert run(data_dir, out, "max_steps=10", "checkpoint_interval=5", resume=True)["step"] == 10

    lock = FolderLock(out, "a run")
    with monkeypatch.context() as patch:
        patch.setattr(tinygemma.files.os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(28, "No space left")))
        with pytest.raises(WriteError, match="No space left"):
            lock.acquire()
    assert lock.fd is None
    lock.acquire()  # nothing held by the failed one
    lock.release()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(tinygemma.UserError):
        run(tmp_path / "no-data", empty, "max_steps=10")
    assert list(empty.iterdir()) == []

    def no_tracker(*args, **kwargs):  # a tracker that cannot start: after the lock, before config.json
        raise tinygemma.UserError("wandb could not start")

    monkeypatch.setattr(tinygemma.train, "Trackers", no_tracker)
    with pytest.raises(tinygemma.UserError, match="wandb could not start"):
        run(data_dir, empty, "max_steps=10")
    assert list(empty.iterdir()) == []  # no .lock left for prepare or export to count as a stranger


def test_a_resume_refuses_non_finite_weights_in_its_checkpoint_in_one_line(data_dir, tmp_path, capsys):
    """Training never saves non-finite weights; a checkpoint that holds them (damaged since, hand-edited) was
    resumed, and the run stopped at its first step on a non-finite loss, telling the user to lower the learning
    rate, this damaged checkpoint named as the last good one. Refused in one line naming the file, nothing
    written."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", stop_at=2)
    path = out / "checkpoints" / "step_000002" / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[-1]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert tinygemma.cli.main(["train", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err == (f"tinygemma train: error: {path} holds non-finite values ({name}): a damaged or hand-edited "
                   "checkpoint; resume from another (--resume-from RUN/checkpoints/step_NNNNNN --out NEW)\n")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


@pytest.mark.parametrize("edit", [{"data": "x"}, {"config": "x"}, {"elapsed_s": "x"}, {"skipped_steps": None},
                                  {"invocations": [1]}, {"tokens": "x"},
                                  {"invocations": [{"steps": [0, 2], "changed": {"learning_rate": 1}}]},
                                  {"invocations": [{"steps": [0, 2], "changed": {"learning_rate": [1, 2, 3]}}]},
                                  {"invocations": [{"steps": ["x", 2], "changed": {}}]}, {"skipped_steps": True}],
                         ids=["data", "config", "elapsed", "skipped", "invocations", "tokens", "a-change-not-a-pair",
                              "a-change-of-three", "a-step-not-a-number", "skipped-true"])
def test_a_resume_refuses_a_trainer_state_of_other_kinds_in_one_line(data_dir, tmp_path, capsys, edit):
    """A trainer state whose values are valid JSON of other kinds than training writes was a traceback (some
    after a step had trained) or accepted: one line, the run as it was."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", stop_at=2)
    path = out / "checkpoints" / "step_000002" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert tinygemma.cli.main(["train", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a damaged or hand-edited checkpoint" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_a_finite_loss_with_nonfinite_gradients_is_stopped_or_skipped_at_its_step(nan_gradient_at_step, data_dir,
                                                                                 tmp_path):
    """Every other non-finite test makes the loss NaN: gradients that diverge under a finite loss (float32) are the
    step's too, named as the gradient norm's under stop, skipped under skip; never applied to the weights."""
    nan_gradient_at_step["at"] = 3
    with pytest.raises(tinygemma.train.NonFiniteError, match="non-finite gradient norm at step 3"):
        run(data_dir, tmp_path / "stop", "max_steps=6")
    nan_gradient_at_step.update(calls=0)
    summary = run(data_dir, tmp_path / "skip", "max_steps=6", "on_nonfinite=skip")
    assert summary["skipped_steps"] == 1 and math.isfinite(summary["val_loss"])


def test_float16_logs_and_clips_the_unscaled_gradient_norm(data_dir, tmp_path):
    """The norm float16 logs and clips is the true gradients', as float32's, not the loss scale's 65,536 times it
    (clipped so, every update would be that much too small)."""
    settings = ["max_steps=4", "log_interval=1", "grad_clip=1.0"]
    norms = {}
    for dtype in ("float32", "float16"):
        run(data_dir, tmp_path / dtype, *settings, f"dtype={dtype}")
        norms[dtype] = [r["grad_norm"] for r in tinygemma.metrics.read_records(tmp_path / dtype / "metrics.jsonl")
                        if "train_loss" in r]
    assert all(map(math.isfinite, norms["float16"]))
    assert abs(norms["float16"][0] - norms["float32"][0]) < 0.05 * norms["float32"][0], norms


# ------------------------------------------------------------------ mutation round 19: the trainer, second pass

def test_float16_a_scale_below_one_stops_the_run_though_the_read_ends_on_a_finite_step(data_dir, tmp_path,
                                                                                    monkeypatch):
    """The loss scale fell below 1 at an overflow (step 19) and step 20 fits float16 again: the read
    before step 20's checkpoint still stops the run at step 19, as a read at every step would (the outcome must
    not depend on where the reads fall)."""
    from tinygemma.model import Gemma3

    forward = Gemma3.forward
    state = {"poison": False, "calls": 0}

    def patched(self, input_ids, targets=None, reduction="mean"):
        loss = forward(self, input_ids, targets, reduction)
        if targets is not None and self.training and state["poison"]:
            state["calls"] += 1
            if state["calls"] <= 17:  # steps 3 to 19: NaN gradients, the scale halving from 2**16 to 0.5
                loss = loss + (self.norm.weight.sum() * 0).abs().sqrt()
        return loss

    monkeypatch.setattr(Gemma3, "forward", patched)
    out = tmp_path / "fp16"
    run(data_dir, out, "max_steps=40", "dtype=float16", "checkpoint_interval=2", stop_at=2)
    state["poison"] = True
    with pytest.raises(tinygemma.train.NonFiniteError, match=r"which fell to 0\.5 \(step 19, "):
        run(data_dir, out, "max_steps=40", "dtype=float16", "checkpoint_interval=2", "log_interval=40",
            resume=True, stop_at=20)
    assert json.loads((out / "checkpoints" / "last.json").read_text())["step"] == 18


def test_resume_on_more_tokens_of_the_same_tokenizer_names_the_counts(data_dir, stories_dir, tmp_path):
    """The folder prepared again with a higher limit holds more tokens: refused naming both counts, not said to
    hold "as many tokens, but other ones"."""
    from tinygemma.data import prepare

    out = tmp_path / "run"
    run(data_dir, out, "max_steps=4", "warmup_steps=1", stop_at=1)
    more = tmp_path / "more"
    prepare(more, sources=[stories_dir / "train.txt"], tokenizer=str(data_dir / "tokenizer.json"), limit=700,
            val_fraction=0.1, workers=1, progress=False)
    with pytest.raises(tinygemma.UserError, match=r"holds other data .*\(train [\d,]+ -> [\d,]+ tokens") as refused:
        run(more, out, "max_steps=4", "warmup_steps=1", resume=True)
    assert "as many tokens" not in str(refused.value)


def test_the_free_disk_a_checkpoint_is_checked_for_covers_its_weights_and_adamw_state(data_dir, tmp_path):
    """save_checkpoint refuses before writing when the disk lacks checkpoint_bytes: an estimate below what an
    AdamW checkpoint takes lets a nearly full disk fail halfway through the write instead."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=5", "checkpoint_interval=5", "optimizer=adamw")
    folder = out / "checkpoints" / "step_000005"
    written = sum((folder / name).stat().st_size for name in ("model.safetensors", "optimizer.safetensors"))
    model = tinygemma.load(folder)
    margin = 16 << 20  # checkpoint_bytes's fixed margin, left out: the tiny model's files are far smaller
    assert tinygemma.checkpoint.checkpoint_bytes(model) - margin >= written


def test_a_second_run_started_into_the_same_new_folder_never_overwrites_the_first(data_dir, tmp_path, monkeypatch):
    """Two `train` commands into one new folder: the second found no checkpoint before the first had written one,
    took the folder's lock once the first had finished and released it, and trained from step 0 over the first
    run's config.json, metrics and checkpoints (a scheduler's job submitted twice). It is refused instead, having
    written nothing."""
    out = tmp_path / "twice"
    real_find_start = tinygemma.train.find_start
    first = {}

    def first_runs_meanwhile(*args, **kwargs):  # the first command runs whole while the second starts
        found = real_find_start(*args, **kwargs)
        monkeypatch.setattr(tinygemma.train, "find_start", real_find_start)
        first["summary"] = run(data_dir, out, "max_steps=4", "checkpoint_interval=2")
        first["files"] = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
        return found

    monkeypatch.setattr(tinygemma.train, "find_start", first_runs_meanwhile)
    with pytest.raises(tinygemma.UserError, match="another command wrote a run into .* while this one started"):
        run(data_dir, out, "max_steps=4", "checkpoint_interval=2", "learning_rate=1e-3", "min_lr=1e-4")
    assert first["summary"]["step"] == 4
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name != ".lock"} == first["files"]  # the first run's files, each as it left it


def test_a_resume_rewrites_a_report_that_a_kill_left_behind_its_last_checkpoint(data_dir, tmp_path):
    """A kill between the last checkpoint and report.md's rewrite left the report of the checkpoint before ("Step
    2 of 4", a Reproduce command with --stop-at 2) for good: train --resume of the finished run trains nothing and
    rewrote only loss.png."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", stop_at=2)
    older = (out / "report.md").read_text()
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", resume=True)
    newest = (out / "report.md").read_text()
    assert newest != older
    (out / "report.md").write_text(older)  # as the kill left it
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", resume=True)
    assert (out / "report.md").read_text() == newest
