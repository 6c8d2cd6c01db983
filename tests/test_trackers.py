"""Experiment trackers (issue 21): TensorBoard, wandb (offline) and trackio (a local store) get the same scalars at
the same steps as metrics.jsonl and the resolved recipe as config, read back from each tracker's own files; a
resumed run continues the same tracker runs; bad loggers stop the run before training, in one line; a tracker that
fails mid-run is dropped with one warning and training goes on."""

import errno
import io
import json
import math
import re
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import test_train
from test_train import metrics, run, tiny_settings

import tinygemma.metrics
import tinygemma.trackers
from tinygemma.cli import main
from tinygemma.train import Trainer

data_dir, one_thread = test_train.data_dir, test_train.one_thread  # real stories, BPE-tokenized; one thread

wandb = pytest.importorskip("wandb")
trackio = pytest.importorskip("trackio")

SHORT = ["max_steps=12", "warmup_steps=2", "eval_interval=3", "checkpoint_interval=6"]


# ------------------------------------------------------------------ reading back what each tracker kept


def wandb_records(path: Path) -> list:
    """The records of a .wandb file (wandb's append-only log: a 7-byte header, then 32 KiB blocks of chunks, each
    with a 7-byte header: checksum, length, type 1 whole / 2 first / 3 middle / 4 last), parsed with wandb's own
    protobuf schema. wandb 0.31 has no Python reader of its own any more."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, records, pending = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_logs(run_dir: Path) -> list[list]:
    """The records of each offline run directory (one per invocation), in the order the invocations started: the
    folders are named by the second and the run id, so two started in one second are ordered by their run record's
    start time (a log a kill cut before its run record counts as the earlier).

    wandb's service first: run.finish() returns once the run's exit is handled, but the service holds the log in
    memory until it acts on finish's last message, which is not waited for (twice a test read a log too early: no
    run record, no exit record). Its teardown waits for it to close every log; the next run starts another."""
    wandb.teardown()
    logs = []
    for directory in (run_dir / "wandb").glob("offline-run-*"):
        (log,) = directory.glob("run-*.wandb")
        records = wandb_records(log)
        start = next((r.run.start_time for r in records if r.WhichOneof("record_type") == "run"), None)
        second = directory.name.rsplit("-", 1)[0]  # offline-run-YYYYMMDD_HHMMSS
        logs.append(((second, (start.seconds, start.nanos) if start else (0, 0)), records))
    return [records for _, records in sorted(logs, key=lambda log: log[0])]


def wandb_run(run_dir: Path) -> list[dict]:
    """Per offline run directory (one per invocation, in order): its run id, config, and history {step: {key: value}}."""
    segments = []
    for records in wandb_logs(run_dir):
        segment = {"id": None, "config": {}, "history": {}}
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                segment["id"] = record.run.run_id
                segment["config"] = {u.key or "/".join(u.nested_key): json.loads(u.value_json)
                                     for u in record.run.config.update}
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                segment["history"][row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
        segments.append(segment)
    return segments


def expected_scalars(run_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as the scalars every tracker must hold: {step: {"train/loss": ..., "val/bpb": ...}}."""
    names = {"train_loss": "train/loss", "lr": "train/lr", "lr_muon": "train/lr_muon", "grad_norm": "train/grad_norm",
             "tokens": "train/tokens", "tokens_per_s": "train/tokens_per_s", "elapsed_s": "train/elapsed_s",
             "mfu": "train/mfu", "val_loss": "val/loss", "val_ppl": "val/ppl", "val_bpb": "val/bpb"}
    scalars = {}
    for record in metrics(run_dir):
        step_record = "train_loss" in record  # (an evaluation's record holds tokens too: not a train/ scalar)
        scalars.setdefault(record["step"], {}).update({names[k]: v for k, v in record.items()
                                                       if k in names and (step_record or k != "tokens")})
    return scalars


def tensorboard_scalars(run_dir: Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            scalars.setdefault(event.step, {})[tag] = event.value
    return scalars


def tensorboard_samples(run_dir: Path) -> dict[int, str]:
    """The first prompt's sample stories TensorBoard holds, {step: text}, as the run wrote them: an indented code
    block, so that Markdown leaves the story as it is."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("samples/1/text_summary")}


def as_tensorboard_text(story: str) -> str:
    return "".join(f"    {line}\n" for line in story.split("\n"))


def wandb_sampled_steps(history: dict) -> list[int]:
    """The steps of a wandb history that hold the first prompt's sample (an html file each, named by its path)."""
    return [step for step in sorted(history) if any(key.startswith("samples/1/") for key in history[step])]


def trackio_scalars(name: str) -> dict[int, dict[str, float]]:
    from trackio.sqlite_storage import SQLiteStorage

    scalars = {}
    for row in SQLiteStorage.get_logs(tinygemma.trackers.PROJECT, name):
        values, seen = {k: v for k, v in row.items() if "/" in k}, scalars.setdefault(row["step"], {})
        assert not set(values) & set(seen), f"step {row['step']} holds {sorted(set(values) & set(seen))} twice"
        seen.update(values)  # (a step's train and val scalars may come in rows of their own)
    return scalars


# ------------------------------------------------------------------ the tests


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the wandb service in /proc (Linux)")
def test_wandb_logs_are_read_only_once_wandb_s_service_has_written_them(tmp_path, monkeypatch):
    """A service slow to act on finish's last message (here: paused for half a second just before it is sent, as
    a loaded machine may leave it unscheduled) still writes the whole log before it is read: the run record, the
    history and the exit record. Read as soon as finish returned, the log was its 7-byte header."""
    import os
    import signal

    from wandb.sdk.lib.service import service_connection

    inform_finish = service_connection.ServiceConnection.inform_finish

    def late(self, run_id):
        for stat in Path("/proc").glob("[0-9]*/stat"):  # the service: this process's child wandb-core
            try:
                text = stat.read_text()
            except OSError:
                continue
            if "(wandb-core)" in text and int(text.rsplit(")", 1)[1].split()[1]) == os.getpid():
                os.kill(int(stat.parent.name), signal.SIGSTOP)
                threading.Timer(0.5, os.kill, (int(stat.parent.name), signal.SIGCONT)).start()
                paused.append(stat.parent.name)
        inform_finish(self, run_id)

    paused = []
    monkeypatch.setattr(service_connection.ServiceConnection, "inform_finish", late)
    run = wandb.init(project="p", mode="offline", dir=str(tmp_path), settings=wandb.Settings(silent=True))
    for step in range(3):
        run.log({"train/loss": 3.0 - step}, step=step)
    run.finish(exit_code=1)
    assert paused, "no wandb-core process of this one's to pause"
    (records,) = wandb_logs(tmp_path)
    kinds = [record.WhichOneof("record_type") for record in records]
    assert "run" in kinds and kinds.count("history") == 3
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [1]


def test_every_tracker_gets_the_scalars_and_the_recipe_and_a_resume_continues_them(data_dir, tmp_path):
    out = tmp_path / "tracked"
    loggers = "loggers=tensorboard,wandb,trackio"
    run(data_dir, out, *SHORT, loggers, stop_at=6)
    ids = json.loads((out / "trackers.json").read_text())
    run(data_dir, out, *SHORT, loggers, resume=True)  # continues from the checkpoint at step 6
    assert json.loads((out / "trackers.json").read_text()) == ids  # the same tracker runs, not new ones

    want = expected_scalars(out)
    assert sorted(want) == list(range(13)) and set(want[6]) == {
        "train/loss", "train/lr", "train/grad_norm", "train/tokens", "train/tokens_per_s", "train/elapsed_s",
        "val/loss", "val/ppl", "val/bpb"}
    config = json.loads((out / "config.json").read_text())

    first, second = wandb_run(out)  # one offline directory per invocation, both the same wandb run
    assert first["id"] == second["id"] == ids["wandb"]
    # Offline nothing says what the first file kept: the resume sends the steps to the checkpoint again.
    assert sorted(first["history"]) == list(range(7)) and sorted(second["history"]) == list(range(13))
    assert first["history"] == {step: want[step] for step in range(7)} and second["history"] == want  # exactly
    assert {k: second["config"][k] for k in config} == config  # the resolved recipe and the run's shape

    assert trackio_scalars(ids["trackio"]) == want
    # named after the run's folder, as wandb's run is, and apart from another run of that folder's name
    assert re.fullmatch(r"tracked-[0-9a-f]{6}", ids["trackio"])
    from trackio.sqlite_storage import SQLiteStorage

    saved = SQLiteStorage.get_run_config(tinygemma.trackers.PROJECT, ids["trackio"])
    assert {k: saved[k] for k in config} == config

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    text = events.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```")) == config
    board = tensorboard_scalars(out)  # float32 on disk
    assert board.keys() == want.keys()
    for step, scalars in want.items():
        assert board[step] == pytest.approx(scalars, rel=1e-6), step


def test_tensorboard_of_a_fork_or_added_on_resume_holds_the_steps_before_too(data_dir, tmp_path):
    """A fork (--resume-from copies config.json and metrics.jsonl, not tb/) and tensorboard added to
    train.loggers on resume: TensorBoard began at the checkpoint, where wandb and trackio got the whole history."""
    from tinygemma.config import load_recipe
    from tinygemma.train import train

    out, fork = tmp_path / "run", tmp_path / "fork"
    run(data_dir, out, *SHORT, "loggers=wandb", stop_at=6)
    train(load_recipe(None, tiny_settings(data_dir, fork, *SHORT, "loggers=tensorboard")),
          resume_from=out / "checkpoints" / "step_000006", quiet=True)
    from torch.utils.tensorboard import SummaryWriter

    failed = SummaryWriter(str(out / "tb"))  # what a resume whose other logger failed to start left: no scalars
    failed.add_text("config", "{}", 6)
    failed.close()
    run(data_dir, out, *SHORT, "loggers=tensorboard,wandb", resume=True)
    for folder in (out, fork):
        want, board = expected_scalars(folder), tensorboard_scalars(folder)
        assert sorted(board) == sorted(want) == list(range(13))
        for step, scalars in want.items():
            assert board[step] == pytest.approx(scalars, rel=1e-6), (folder.name, step)


def test_samples_during_training_reach_tensorboard_and_wandb_as_text(data_dir, tmp_path):

    out = tmp_path / "sampled"
    run(data_dir, out, *SHORT, "loggers=tensorboard,wandb", "sample_interval=6", "generate.max_new_tokens=4")
    samples = {r["step"]: r["samples"][0] for r in metrics(out) if "samples" in r}
    assert sorted(samples) == [6, 12]
    assert tensorboard_samples(out) == {step: as_tensorboard_text(text) for step, text in samples.items()}
    (history,) = [segment["history"] for segment in wandb_run(out)]
    assert wandb_sampled_steps(history) == [6, 12]


def test_a_resume_sends_the_samples_before_the_checkpoint_again_too(data_dir, tmp_path):
    """README: offline, the newest offline-run folder holds the whole history. The resume re-sent the scalars
    alone, so it lacked the sample stories from before the checkpoint; a fork's TensorBoard lacked them too."""

    from tinygemma.config import load_recipe
    from tinygemma.train import train

    out, fork = tmp_path / "run", tmp_path / "fork"
    sampled = ("sample_interval=3", "generate.max_new_tokens=4")
    run(data_dir, out, *SHORT, "loggers=wandb", *sampled, stop_at=6)
    train(load_recipe(None, tiny_settings(data_dir, fork, *SHORT, "loggers=tensorboard", *sampled)),
          resume_from=out / "checkpoints" / "step_000006", quiet=True)
    run(data_dir, out, *SHORT, "loggers=wandb", *sampled, resume=True)
    samples = {r["step"]: r["samples"][0] for r in metrics(out) if "samples" in r}
    assert sorted(samples) == [3, 6, 9, 12]
    assert wandb_sampled_steps(wandb_run(out)[-1]["history"]) == [3, 6, 9, 12]
    assert tensorboard_samples(fork) == {step: as_tensorboard_text(text) for step, text in samples.items()}


def test_a_resume_sends_the_trackers_what_a_kill_cost_them_and_redraws_the_plot(data_dir, tmp_path, monkeypatch):
    """wandb and trackio write in batches, so a kill loses their last records from before the checkpoint (a kill
    -9 left wandb without steps 0-6): the resume sends them again from metrics.jsonl. loss.png, drawn at the last
    evaluation before the kill, showed the lost work until the next one."""
    out = tmp_path / "killed"
    loggers = "loggers=wandb,trackio"
    wandb_log, trackio_log = tinygemma.trackers.Wandb.log, tinygemma.trackers.Trackio.log
    with monkeypatch.context() as patch:  # what the killed invocation's trackers never wrote
        patch.setattr(tinygemma.trackers.Wandb, "log",
                      lambda self, scalars, step: step < 3 and wandb_log(self, scalars, step))
        # trackio: steps 3-5, and the checkpoint step's evaluation alone (its train row was written)
        patch.setattr(tinygemma.trackers.Trackio, "log", lambda self, scalars, step: (
            (step < 3 or step == 6 and "val/loss" not in scalars) and trackio_log(self, scalars, step)))
        run(data_dir, out, *SHORT, loggers, stop_at=6)
    ids = json.loads((out / "trackers.json").read_text())
    assert set(trackio_scalars(ids["trackio"])[6]) == {"train/loss", "train/lr", "train/grad_norm", "train/tokens",
                                                       "train/tokens_per_s", "train/elapsed_s"}
    at_checkpoint = (out / "loss.png").read_bytes()
    lost = [{**record, "step": step, "tokens": 2 * record["tokens"]}  # steps past the checkpoint, then the kill
            for step, record in zip((7, 8, 9), (r for r in metrics(out) if "train_loss" in r))]
    with open(out / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lost))
    tinygemma.metrics.plot_losses(metrics(out), out / "loss.png")
    assert (out / "loss.png").read_bytes() != at_checkpoint
    run(data_dir, out, *SHORT, loggers, resume=True, stop_at=6)  # trains nothing
    assert (out / "loss.png").read_bytes() == at_checkpoint
    want = expected_scalars(out)
    assert sorted(want) == list(range(7))
    assert trackio_scalars(ids["trackio"]) == want
    first, second = wandb_run(out)
    assert sorted(first["history"]) == [0, 1, 2] and second["history"] == want


def tensorboard_shown(run_dir: Path) -> dict[str, dict[int, float]]:
    """The scalars `tensorboard --logdir` shows: its own loader (the Rust data server) reads the events files in
    name order and ignores purge_step; a point at a step its tag has passed drops that tag's points from that
    step on (checked against the server itself)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    shown = {}
    for path in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag.startswith(("train/", "val/")):
                    points = shown.setdefault(value.tag, {})
                    for step in [s for s in points if s >= event.step]:
                        del points[step]
                    points[event.step] = value.tensor.float_val[0] if value.HasField("tensor") else value.simple_value
    return shown


def test_tensorboard_s_own_loader_drops_the_lost_work_when_the_resume_evaluates_on_other_steps(data_dir, tmp_path):
    """A kill after step 9's evaluation, the checkpoint at 6, and a resume evaluating every 5 steps: tensorboard
    --logdir ignores purge_step, and showed the lost step 9's validation between 6 and the new 10."""
    out = tmp_path / "killed"
    run(data_dir, out, *SHORT, "loggers=tensorboard", "keep_checkpoints=2", stop_at=9)
    checkpoints = out / "checkpoints"  # the kill: step 9's checkpoint never written
    shutil.rmtree(checkpoints / "step_000009")
    for pointer in ("last.json", "best.json"):
        (checkpoints / pointer).write_text(json.dumps({"dir": "step_000006", "step": 6, "val_loss": None}))
    assert 9 in tensorboard_shown(out)["val/loss"]
    run(data_dir, out, *SHORT, "loggers=tensorboard", "eval_interval=5", resume=True)
    want = expected_scalars(out)
    assert sorted(step for step, scalars in want.items() if "val/loss" in scalars) == [0, 3, 6, 10, 12]
    shown = tensorboard_shown(out)
    assert {tag: sorted(points) for tag, points in shown.items()} == {
        tag: sorted(step for step, scalars in want.items() if tag in scalars) for tag in shown}
    assert shown["val/loss"] == pytest.approx({step: want[step]["val/loss"] for step in shown["val/loss"]})


def test_tensorboard_holding_only_lost_work_is_backfilled_once_that_is_cut(data_dir, tmp_path):
    """tensorboard added to train.loggers on a resume that a kill then cut short: tb/ holds the lost steps past
    the checkpoint alone. Cut, it holds none, so the next resume writes the steps before the checkpoint (it had
    judged tb/ by what it held before the cut, and wrote none)."""
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    run(data_dir, out, *SHORT, "loggers=", stop_at=6)
    lost = SummaryWriter(str(out / "tb"))
    for step in (7, 8):
        lost.add_scalar("train/loss", 9.0, step)
    lost.close()
    run(data_dir, out, *SHORT, "loggers=tensorboard", resume=True)
    assert sorted(tensorboard_scalars(out)) == sorted(expected_scalars(out)) == list(range(13))
    assert tensorboard_shown(out)["train/loss"] == pytest.approx(
        {step: scalars["train/loss"] for step, scalars in expected_scalars(out).items() if "train/loss" in scalars})


def tensorboard_points(run_dir: Path) -> list[tuple[str, int]]:
    """(tag, step) of every scalar and sample event in tb/'s files, repeats included."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [(value.tag, event.step) for path in sorted((run_dir / "tb").glob("events.out.tfevents.*"))
            for event in EventFileLoader(str(path)).Load() for value in event.summary.value
            if value.tag.startswith(("train/", "val/", "samples/"))]


def assert_tensorboard_shows_the_records(run_dir: Path) -> None:
    """What `tensorboard --logdir` shows is metrics.jsonl's history, each point once."""
    want, shown = expected_scalars(run_dir), tensorboard_shown(run_dir)
    assert {tag: sorted(points) for tag, points in shown.items()} == {
        tag: sorted(step for step, scalars in want.items() if tag in scalars) for tag in shown}
    assert sorted(shown) == sorted({tag for scalars in want.values() for tag in scalars})
    for tag, points in shown.items():
        assert points == pytest.approx({step: want[step][tag] for step in points}), tag
    points = tensorboard_points(run_dir)
    assert len(points) == len(set(points))


def test_steps_trained_with_tensorboard_off_reach_it_when_it_is_on_again(data_dir, tmp_path):
    """loggers= for one invocation (steps 7-9), tensorboard again for the next: the resume wrote only what tb/
    lacked when it held nothing at all, so steps 7-9 were missing for good. Written again in step order: `tensorboard
    --logdir` takes a step after a later one of its tag as a restart and drops the later points."""
    out = tmp_path / "run"
    sampled = ("sample_interval=3", "generate.max_new_tokens=4")
    run(data_dir, out, *SHORT, *sampled, stop_at=6)
    run(data_dir, out, *SHORT, *sampled, "loggers=", resume=True, stop_at=9)
    run(data_dir, out, *SHORT, *sampled, resume=True)
    assert sorted(expected_scalars(out)) == list(range(13))
    assert_tensorboard_shows_the_records(out)
    samples = {r["step"]: r["samples"][0] for r in metrics(out) if "samples" in r}
    assert sorted(samples) == [3, 6, 9, 12]
    assert tensorboard_samples(out) == {step: as_tensorboard_text(text) for step, text in samples.items()}
    assert len(list((out / "tb").iterdir())) == 2  # one events file per invocation that ran tensorboard
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "tb").iterdir()}
    run(data_dir, out, *SHORT, *sampled, resume=True)  # finished, holding everything: nothing written again
    assert {p: p.stat().st_mtime_ns for p in (out / "tb").iterdir() if p in mtimes} == mtimes
    assert_tensorboard_shows_the_records(out)


@pytest.mark.parametrize("loggers", ["tensorboard", ""])
def test_a_run_started_again_after_a_kill_before_its_first_checkpoint_keeps_no_event_of_the_killed_attempt(
        data_dir, tmp_path, loggers):
    """A kill before the first checkpoint, then the run started again at step 0 (with another learning rate), with
    tensorboard or without it until its next resume: tb/ kept the killed attempt's events beside the new ones (steps
    0-6 twice, and the old curve shown), or in place of those the restart did not write."""
    out = tmp_path / "run"
    run(data_dir, out, *SHORT, stop_at=6)
    shutil.rmtree(out / "checkpoints")  # what a kill as step 6's checkpoint was written leaves: records, tb/
    run(data_dir, out, *SHORT, "learning_rate=0.002", f"loggers={loggers}", resume=True, stop_at=6)
    run(data_dir, out, *SHORT, "learning_rate=0.002", resume=True)
    assert sorted(expected_scalars(out)) == list(range(13))
    assert_tensorboard_shows_the_records(out)


@pytest.mark.parametrize("tag, step", [("val/loss", 5), ("train/loss", 3), ("train/loss", 13)])
def test_points_tb_holds_that_are_not_the_records_are_cut_on_resume(data_dir, tmp_path, tag, step):
    """tb/ of a version that left the lost work in its files (purge_step alone), or of an attempt that ran other
    settings: a point at a step the records never had (a lost evaluation between two of the resumed run's), or
    another value at one of their steps, stayed drawn, whatever the later resumes; one past the checkpoint too."""
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    run(data_dir, out, *SHORT, "max_steps=14", stop_at=12)
    old = SummaryWriter(str(out / "tb"))
    old.add_scalar(tag, 99.0, step)
    old.close()
    assert 99.0 in tensorboard_shown(out)[tag].values()
    run(data_dir, out, *SHORT, "max_steps=14", resume=True, stop_at=12)  # trains nothing, but tb/ is the run's again
    assert_tensorboard_shows_the_records(out)


def test_a_broken_tensorboard_stops_no_run_that_leaves_it_out(data_dir, tmp_path, monkeypatch, capsys):
    """tensorboard installed but broken (a protobuf it cannot use): the error says to leave it out of
    train.loggers, and a run that does so must not need it to cut tb/ back to its checkpoint."""
    out = tmp_path / "run"
    run(data_dir, out, *SHORT, stop_at=6)

    def broken(*args):
        raise TypeError("Descriptors cannot be created directly")

    monkeypatch.setattr(tinygemma.trackers, "cut_events", broken)
    capsys.readouterr()
    assert run(data_dir, out, *SHORT, "loggers=", resume=True)["step"] == 12
    assert (f"tinygemma: warning: {out / 'tb'} was left as it was (TypeError: Descriptors cannot be created "
            "directly)") in capsys.readouterr().err


def test_points_compare_as_the_events_file_and_metrics_jsonl_hold_them(recwarn):
    """metrics.jsonl writes every non-finite number as null (NaN when read back), where tb/ keeps an infinite
    gradient norm (a float16 overflow's) as inf: a plain resume then rewrote tb/ each time. A perplexity past float32's
    range (a diverged run's) is inf in tb/, and its cast printed numpy's warning."""
    from tinygemma.trackers import point

    assert point(float("inf")) == point(float("nan")) == point(-float("inf")) == point(1e307) == point(math.nan)
    assert point(2**53 + 1) == point(float(2**53)) and point(0.1) != point(0.1000001)
    assert not recwarn.list


def record_offsets(path: Path) -> list[int]:
    """Where each record of an events file starts (8 bytes of length, 4 of its CRC, the data, 4 of the data's)."""
    data, offsets, at = path.read_bytes(), [], 0
    while at + 8 <= len(data):
        offsets.append(at)
        at += 16 + struct.unpack("<Q", data[at : at + 8])[0]
    return offsets


@pytest.mark.parametrize("where", ["data", "length"])
def test_an_events_file_damaged_mid_way_is_left_as_it_was(data_dir, tmp_path, capsys, where):
    """tensorboard's reader stops silently at a damaged record: the events after it were taken for none, and the
    file rewritten without them; a damaged length was taken for a torn last record."""
    out = tmp_path / "run"
    run(data_dir, out, *SHORT, stop_at=6)
    (events,) = (out / "tb").iterdir()
    damaged = bytearray(events.read_bytes())
    at = record_offsets(events)[len(record_offsets(events)) * 3 // 4]  # a record among the scalars
    damaged[at + 20 if where == "data" else at + 5] ^= 0x40
    events.write_bytes(bytes(damaged))
    capsys.readouterr()
    run(data_dir, out, *SHORT, resume=True, stop_at=9)
    assert events.read_bytes() == damaged
    assert f"tinygemma: warning: {events} cannot be read whole" in capsys.readouterr().err


@pytest.mark.parametrize("tail", ["torn", "zeros", "torn, then zeros"])
def test_an_events_file_ending_in_a_torn_record_or_zeros_is_cut_back_to_the_checkpoint(data_dir, tmp_path, tail):
    """A kill mid-write tears the last record; a crash can leave zeros after it: the file's records before it are
    read, and the lost work past the checkpoint cut (zeros were taken for damage: nothing was cut, ever)."""
    out = tmp_path / "run"
    run(data_dir, out, *SHORT, "keep_checkpoints=2", stop_at=9)
    checkpoints = out / "checkpoints"  # the kill: step 9's checkpoint never written
    shutil.rmtree(checkpoints / "step_000009")
    for pointer in ("last.json", "best.json"):
        (checkpoints / pointer).write_text(json.dumps({"dir": "step_000006", "step": 6, "val_loss": None}))
    (events,) = (out / "tb").iterdir()
    whole = events.read_bytes()
    events.write_bytes({"torn": whole[:-5], "zeros": whole + bytes(4096),  # (a page that never reached the disk:)
                        "torn, then zeros": whole[:-20] + bytes(4096)}[tail])
    run(data_dir, out, *SHORT, "keep_checkpoints=2", "eval_interval=5", resume=True)
    assert_tensorboard_shows_the_records(out)


def test_a_backfill_that_fails_is_a_warning_and_the_tracker_stays(tmp_path, capsys):
    """trackio's backfill reads its store's API: if that changed (or the file is locked), the resumed run still
    logs its new steps to it."""
    class Broken:
        name, resume_id, logged = "trackio", None, []

        def backfill(self, records):
            raise AttributeError("SQLiteStorage has no attribute 'get_logs'")

        def log(self, scalars, step):
            self.logged.append(step)

    trackers = tinygemma.trackers.Trackers([], tmp_path, {}, 0)
    trackers.trackers = [Broken()]
    trackers.backfill([{"step": 1, "tokens": 8, "train_loss": 2.0}], 1)
    trackers.log({"train/loss": 1.5}, 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trackio could not be sent again what a kill cost it" in err
    assert Broken.logged == [2]


def test_tensorboard_s_writer_thread_prints_no_traceback_of_its_own(tmp_path, capsys, monkeypatch):
    """A full disk under TensorBoard's event file: its writing thread printed a 35-line traceback before the
    main thread's flush raised the same error, which the run says in one line. The thread is quiet now."""
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # Python's own, as the CLI has it
    tracker = tinygemma.trackers.TensorBoard(tmp_path, {}, 0, None)
    record_writer = tracker.writer._get_file_writer().event_writer._async_writer._writer

    def full(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    record_writer.write = full
    tracker.log({"train/loss": 1.5}, 1)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(100):  # (until the thread has met the failure)
            tracker.flush()
            time.sleep(0.01)
    assert capsys.readouterr().err == ""
    other = threading.Thread(target=lambda: 1 / 0)  # any other thread's failure is printed as before
    other.start()
    other.join()
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_warning(data_dir, tmp_path, monkeypatch, capsys):
    """TensorBoard's writer breaks at step 3 (say, its disk): one warning, the run finishes with every step in
    metrics.jsonl, and the other tracker (trackio) still gets every step."""
    from torch.utils.tensorboard import SummaryWriter

    add_scalar = SummaryWriter.add_scalar

    def failing(self, tag, value, step=None, *args, **kwargs):
        if step == 3:
            raise OSError("No space left on device")
        return add_scalar(self, tag, value, step, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", failing)
    out = tmp_path / "broken"
    summary = run(data_dir, out, *SHORT, "max_steps=6", "loggers=tensorboard,trackio")
    assert summary["step"] == 6
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["tinygemma: warning: tensorboard failed (OSError: No space left on device); training goes "
                        "on without it"]
    assert [r["step"] for r in metrics(out) if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert max(tensorboard_scalars(out)) == 2  # nothing after the failure
    trackio_run = json.loads((out / "trackers.json").read_text())["trackio"]
    assert trackio_scalars(trackio_run) == expected_scalars(out)


@pytest.mark.parametrize("case", ["unknown", "not installed", "fails to start"])
def test_bad_loggers_stop_the_run_in_one_line_before_training(case, data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "refused"
    logger = {"unknown": "neptune", "not installed": "wandb", "fails to start": "wandb"}[case]
    if case == "not installed":
        find_spec = tinygemma.trackers.importlib.util.find_spec
        monkeypatch.setattr(tinygemma.trackers.importlib.util, "find_spec",
                            lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    if case == "fails to start":
        def init(**kwargs):
            raise wandb.errors.CommError("could not reach api.wandb.ai\nretrying")

        monkeypatch.setattr(wandb, "init", init)
    settings = tiny_settings(data_dir, out, f"loggers=tensorboard,{logger}")
    assert main(["train", *[a for s in settings for a in ("--set", s)]]) == (1 if case == "fails to start" else 2)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert {"unknown": "train.loggers may name tensorboard, wandb, trackio; got 'neptune'",
            "not installed": 'train.loggers names wandb, which is not installed: pip install "tinygemma[wandb]"',
            "fails to start": "wandb could not start (CommError: could not reach api.wandb.ai; retrying)"}[case] in err
    assert not out.exists()  # refused before anything was written, or the folder made for the run removed again


def test_a_tracker_installed_broken_or_with_a_store_it_cannot_write_stops_the_start_in_one_line(
        data_dir, tmp_path, monkeypatch, capsys):
    """wandb that fails to import (protobuf's 'Descriptors cannot be created directly', say) was a traceback;
    trackio with a store it cannot write warned from its own thread and lost every record, exit 0."""
    broken = tmp_path / "site" / "wandb"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise TypeError("Descriptors cannot be created directly.\\nmore")\n')
    with monkeypatch.context() as patch:
        patch.syspath_prepend(str(tmp_path / "site"))
        patch.delitem(tinygemma.trackers.sys.modules, "wandb")
        settings = tiny_settings(data_dir, tmp_path / "a", "loggers=tensorboard,wandb")
        assert main(["train", *[a for s in settings for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "wandb could not start (TypeError: Descriptors cannot be created directly.; more)" in err

    from trackio.sqlite_storage import SQLiteStorage
    monkeypatch.setattr(SQLiteStorage, "get_project_db_path", staticmethod(lambda project: Path("/proc/no/store.db")))
    settings = tiny_settings(data_dir, tmp_path / "b", "loggers=trackio")
    assert main(["train", *[a for s in settings for a in ("--set", s)]]) == 2  # a store that is not there
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "trackio could not start (" in err and "/proc/no" in err
    assert not (tmp_path / "b" / "metrics.jsonl").exists()

    # A full disk as TensorBoard starts: exit status 1 (it was 2, bad input's), one line.
    import torch.utils.tensorboard

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", full)
    settings = tiny_settings(data_dir, tmp_path / "c", "loggers=tensorboard")
    assert main(["train", *[a for s in settings for a in ("--set", s)]]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("tinygemma train: error: tensorboard could not start (OSError: [Errno 28] No space left on "
                   "device); fix it, or leave tensorboard out of train.loggers")


def test_wandb_marks_a_failed_or_interrupted_run_as_failed(data_dir, tmp_path, monkeypatch):
    """wandb's exit record: 130 for a Ctrl-C, 1 for a failure, 0 for a run that ends (every run said 0, so wandb
    showed runs that stopped on a non-finite loss as finished)."""
    out = tmp_path / "run"
    evaluate = Trainer.evaluate
    for failure in (KeyboardInterrupt, RuntimeError):  # at the evaluation of step 3
        def failing(self, step, failure=failure):
            if step == 3:
                raise failure()
            return evaluate(self, step)

        with monkeypatch.context() as patch:
            patch.setattr(Trainer, "evaluate", failing)
            with pytest.raises(failure):
                run(data_dir, out, *SHORT, "max_steps=6", "loggers=wandb", resume=True)
    run(data_dir, out, *SHORT, "max_steps=6", "loggers=wandb", resume=True)
    exits = [[r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] for records in wandb_logs(out)]
    assert exits == [[130], [1], [0]]


def test_trackers_keep_the_order_given_and_open_each_once(data_dir, tmp_path):
    """A name given twice opens one tracker; no logger at all is allowed (metrics.jsonl is always written)."""
    out = tmp_path / "twice"
    run(data_dir, out, *SHORT, "max_steps=2", "loggers=tensorboard,tensorboard")
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    out = tmp_path / "none"
    run(data_dir, out, *SHORT, "max_steps=2", "loggers=")
    assert not (out / "tb").exists() and [r["step"] for r in metrics(out) if "train_loss" in r] == [1, 2]


def test_scalars_carry_mfu_when_the_record_has_it():
    record = {"step": 3, "train_loss": 2.5, "lr": 1e-3, "lr_muon": 1e-2, "grad_norm": 0.5, "tokens": 96,
              "tokens_per_s": 1e4, "elapsed_s": 2.0, "mfu": 0.25, "finite": True}
    assert tinygemma.trackers.train_scalars(record) == {
        "train/loss": 2.5, "train/lr": 1e-3, "train/lr_muon": 1e-2, "train/grad_norm": 0.5, "train/tokens": 96,
        "train/tokens_per_s": 1e4, "train/elapsed_s": 2.0, "train/mfu": 0.25}
    assert tinygemma.trackers.train_scalars({"step": 4, "tokens": 128, "val_loss": 2.0}) == {}  # an evaluation's
    assert tinygemma.trackers.val_scalars({"val_loss": 2.0, "val_ppl": 7.4, "val_bpb": 1.1}) == {
        "val/loss": 2.0, "val/ppl": 7.4, "val/bpb": 1.1}


def test_a_run_started_again_after_a_kill_before_its_first_checkpoint_begins_new_tracker_runs(data_dir, tmp_path):
    """The killed attempt's wandb run (other losses at steps 0-5) is not continued by the fresh start."""
    out = tmp_path / "run"
    run(data_dir, out, *SHORT, "loggers=wandb", stop_at=2)
    killed = json.loads((out / "trackers.json").read_text())["wandb"]
    shutil.rmtree(out / "checkpoints")  # a kill before the first checkpoint
    run(data_dir, out, *SHORT, "max_steps=2", "loggers=wandb", "learning_rate=0.002", resume=True)
    fresh = json.loads((out / "trackers.json").read_text())["wandb"]
    assert fresh != killed
    assert [segment["id"] for segment in wandb_run(out)] == [killed, fresh]


def test_a_fresh_start_without_wandb_forgets_the_killed_attempt_s_wandb_run(data_dir, tmp_path):
    """Trackers.json of a killed attempt is emptied by a fresh start that opens no tracker with an id, so
    a later resume with wandb begins a new wandb run rather than continuing the killed attempt's."""
    out = tmp_path / "run"
    run(data_dir, out, *SHORT, "loggers=wandb", stop_at=2)
    shutil.rmtree(out / "checkpoints")
    run(data_dir, out, *SHORT, "loggers=tensorboard", stop_at=2, resume=True)  # starts at 0 again
    assert json.loads((out / "trackers.json").read_text()) == {}


def test_an_invocation_without_a_tracker_keeps_its_run_id_for_the_next(data_dir, tmp_path):
    """Loggers=tensorboard for one invocation, wandb again for the next: the same wandb run continues."""
    out = tmp_path / "run"
    run(data_dir, out, *SHORT, "loggers=wandb", stop_at=6)
    ids = json.loads((out / "trackers.json").read_text())
    run(data_dir, out, *SHORT, "loggers=tensorboard", stop_at=9, resume=True)
    assert json.loads((out / "trackers.json").read_text()) == ids


def test_a_failed_start_of_another_tracker_marks_the_resumed_wandb_run_failed(data_dir, tmp_path, monkeypatch):
    """Wandb opened, then trackio fails to start: the wandb run is finished as failed (exit 1), not 0."""
    from tinygemma.cli import main

    out = tmp_path / "run"
    run(data_dir, out, *SHORT, "loggers=wandb", stop_at=2)
    trackio = pytest.importorskip("trackio")

    def init(**kwargs):
        raise RuntimeError("trackio broke")

    monkeypatch.setattr(trackio, "init", init)
    settings = tiny_settings(data_dir, out, *SHORT, "loggers=wandb,trackio")
    assert main(["train", "--resume", *[a for s in settings for a in ("--set", s)]]) == 2  # a UserError
    exits = [[r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] for records in wandb_logs(out)]
    assert exits == [[0], [1]]


def wandb_to_a_list(first_step: int) -> tuple[tinygemma.trackers.Wandb, list]:
    """A Wandb tracker whose run (wandb's, faked) appends each (data, step) it is given to the returned list."""
    logged = []

    class FakeRun:
        def log(self, data, step):
            logged.append((data, step))

    tracker = object.__new__(tinygemma.trackers.Wandb)
    tracker.run, tracker.first_step = FakeRun(), first_step
    return tracker, logged


def test_wandb_shows_a_sample_with_markup_as_text(monkeypatch):
    """A story holding <, > or & is shown as written, not taken as HTML."""
    tracker, logged = wandb_to_a_list(0)
    tracker.text("samples/1", "Tom said <b>hi</b> & left", 3)
    ((data, step),) = logged
    assert step == 3 and data["samples/1"].html.endswith("<pre>Tom said &lt;b&gt;hi&lt;/b&gt; &amp; left</pre>")


def config_steps(run_dir):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sorted(event.step for path in sorted((run_dir / "tb").glob("events.out.tfevents.*"))
                  for event in EventFileLoader(str(path)).Load() for value in event.summary.value
                  if value.tag == "config/text_summary")


def test_a_resume_that_writes_tensorboard_s_history_again_keeps_its_config_text(data_dir, tmp_path):
    """Tensorboard added on a resume at step 6: its history is written again, and the config it runs
    with is still there, at the step it starts from."""
    out = tmp_path / "run"
    run(data_dir, out, *SHORT, "loggers=wandb", stop_at=6)
    run(data_dir, out, *SHORT, "loggers=tensorboard", resume=True, stop_at=9)
    assert sorted(tensorboard_scalars(out)) == list(range(10))
    assert config_steps(out) == [6]


def test_samples_of_every_prompt_are_written_again_to_a_fork_s_tensorboard(data_dir, tmp_path):
    """The second prompt's stories before the checkpoint reach a fork's TensorBoard too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tinygemma.config import load_recipe
    from tinygemma.train import train

    out, fork = tmp_path / "run", tmp_path / "fork"
    sampled = ("sample_interval=3", "generate.max_new_tokens=4", 'generate.prompts=["Once upon a time", "Tom"]')
    run(data_dir, out, *SHORT, "loggers=", *sampled, stop_at=6)
    train(load_recipe(None, tiny_settings(data_dir, fork, *SHORT, "loggers=tensorboard", *sampled)),
          resume_from=out / "checkpoints" / "step_000006", quiet=True, stop_at=6)
    events = EventAccumulator(str(fork / "tb"))
    events.Reload()
    assert [e.step for e in events.Tensors("samples/2/text_summary")] == [3, 6]


def test_an_events_file_tinygemma_cannot_read_is_left_and_nothing_is_written_again(data_dir, tmp_path):
    """An events file whose records do not parse: what it holds is unknown, so the resume writes no step
    before the checkpoint again (which could repeat what it holds) and leaves the file as it was."""
    from tensorboard.summary.writer.record_writer import RecordWriter

    out = tmp_path / "run"
    run(data_dir, out, *SHORT, "loggers=", stop_at=6)
    (out / "tb").mkdir()
    bad = out / "tb" / "events.out.tfevents.0000000001.host.1.0"
    with open(bad, "wb") as f:
        RecordWriter(f).write(b"\xff" * 16)  # framed as a record, but no Event
    before = bad.read_bytes()
    run(data_dir, out, *SHORT, "loggers=tensorboard", resume=True, stop_at=9)
    assert bad.read_bytes() == before
    bad.unlink()
    assert sorted({step for _, step in tensorboard_points(out)}) == [7, 8, 9]


def _records(*payloads: bytes) -> bytes:
    from tensorboard.summary.writer.record_writer import RecordWriter

    buffer = io.BytesIO()
    writer = RecordWriter(buffer)
    for payload in payloads:
        writer.write(payload)
    return buffer.getvalue()


@pytest.mark.parametrize("cut", range(8, 12))
def test_a_torn_header_of_eight_to_eleven_bytes_is_a_torn_record(tmp_path, cut):
    """A kill after 8 to 11 bytes of the last record's 12-byte header (its length whole, its CRC not) is a torn
    record (cut back to the checkpoint), not damage that leaves the file and its lost work as they were."""
    path = tmp_path / "events.out.tfevents.1"
    whole, first = _records(b"first", b"second"), _records(b"first")
    path.write_bytes(whole[:len(first) + cut])
    tinygemma.trackers.check_read_whole(path, [b"first"])  # raises nothing


def test_a_whole_last_record_that_the_reader_refused_is_damage(tmp_path):
    """The last record there whole but its data's CRC
    wrong (a bit flipped on disk) is damage, not a torn write: its event is not ours to cut."""
    path = tmp_path / "events.out.tfevents.1"
    damaged = bytearray(_records(b"first", b"second"))
    damaged[-6] ^= 0x40  # in the last record's data
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="a damaged record at byte"):
        tinygemma.trackers.check_read_whole(path, [b"first"])


def test_sample_stories_are_among_the_points_an_events_file_holds(tmp_path):
    """A resume compares tb/'s points with
    metrics.jsonl's, samples included; without them every resume of a run with samples rewrote tb/ and a fork's
    tb/ kept the parent's sample texts beside the ones written again."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("train/loss", 1.5, 3)
    writer.add_text("samples/1", tinygemma.trackers.markdown_block("Once upon a time"), 3)
    writer.add_text("config", "{}", 0)
    writer.close()
    held = tinygemma.trackers.cut_events(tinygemma.trackers.event_files(tmp_path), lambda event: True)
    assert held == {(3, "train/loss"): 1.5, (3, "samples/1"): "    Once upon a time\n"}


def test_a_point_held_twice_is_no_records(tmp_path):
    """tb/ holding a step twice (a fork's copied
    events and its own) must not compare equal to metrics.jsonl's once, or the duplicate is never cut."""
    for name in ("a", "b"):
        write_loss(tmp_path, 3, 1.5, filename_suffix=name)
    files = tinygemma.trackers.event_files(tmp_path)
    assert len(files) == 2
    assert tinygemma.trackers.cut_events(files, lambda event: True) == {(3, "train/loss"): None}


def test_a_resumed_tensorboard_keeps_the_checkpoints_own_step_for_readers_that_purge(tmp_path):
    """TensorBoard's EventAccumulator (purge_orphaned_data,
    its default) drops every point at or past purge_step; the checkpoint's own step (its val/loss) must stay."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(str(tmp_path / "tb"))
    for step in range(1, 9):
        first.add_scalar("train/loss", 10.0 - step, step)
    first.close()
    tracker = tinygemma.trackers.TensorBoard(tmp_path, {}, 5, None)  # a resume from the checkpoint at step 5
    tracker.log({"train/loss": 4.5}, 6)
    tracker.close(0)
    reader = EventAccumulator(str(tmp_path / "tb"))
    reader.Reload()
    assert [(e.step, e.value) for e in reader.Scalars("train/loss")] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0),
                                                                        (5, 5.0), (6, 4.5)]


def write_loss(folder, step: int, value: float, filename_suffix: str = "", new_style: bool = False) -> None:
    """An events file in `folder` holding one train/loss point (new_style: as a tensor, TensorBoard's newer form)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder), filename_suffix=filename_suffix)
    writer.add_scalar("train/loss", value, step, new_style=new_style)
    writer.close()


def test_a_scalar_held_as_a_tensor_is_read_back_as_its_value(tmp_path):
    """Or a resume takes tb/ for not the records' and writes it again each time."""
    write_loss(tmp_path, 3, 1.5, new_style=True)
    held = tinygemma.trackers.cut_events(tinygemma.trackers.event_files(tmp_path), lambda event: True)
    assert held == {(3, "train/loss"): 1.5}


@pytest.mark.parametrize("method", ["log", "text"])
def test_wandb_logs_the_first_step_it_does_not_hold_and_skips_those_below(method):
    """A resumed wandb run's first_step is the next step it takes: that step is logged, those below not."""
    tracker, logged = wandb_to_a_list(5)
    for step in (4, 5, 6):
        if method == "log":
            tracker.log({"train/loss": 1.0}, step)
        else:
            tracker.text("samples/1", "Once upon a time", step)
    assert [step for _, step in logged] == [5, 6]


def test_every_line_of_a_sample_story_is_indented_for_tensorboard():
    assert tinygemma.trackers.markdown_block("Once upon a time.\n\nThe *end*.") == (
        "    Once upon a time.\n    \n    The *end*.\n")


def test_an_events_file_left_with_no_event_is_deleted(tmp_path):
    write_loss(tmp_path, 3, 1.5)
    files = tinygemma.trackers.event_files(tmp_path)
    assert len(files) == 1
    assert tinygemma.trackers.cut_events(files, lambda event: False) == {}
    assert tinygemma.trackers.event_files(tmp_path) == []


def test_a_fresh_tensorboard_start_deletes_the_earlier_attempts_events_files(tmp_path):
    """`tensorboard --logdir` ignores purge_step: a killed attempt's events files would show beside the new ones."""
    write_loss(tmp_path / "tb", 4, 9.0, filename_suffix=".killed")
    tracker = tinygemma.trackers.TensorBoard(tmp_path, {}, 0, None)
    tracker.close(0)
    files = tinygemma.trackers.event_files(tmp_path / "tb")
    assert len(files) == 1 and not files[0].name.endswith(".killed")
    assert tinygemma.trackers.cut_events(files, lambda event: True) == {}


def test_a_backfill_sends_the_records_up_to_and_including_the_checkpoint_step(tmp_path):
    class Recording:
        name, resume_id = "recording", None

        def __init__(self):
            self.records = None

        def backfill(self, records):
            self.records = records

    trackers = tinygemma.trackers.Trackers([], tmp_path, {}, 0)
    tracker = Recording()
    trackers.trackers = [tracker]
    records = [{"step": s, "tokens": 8 * s, "train_loss": 2.0} for s in (1, 2, 3, 4)] + [{"step": 3, "val_loss": 1.9}]
    trackers.backfill(records, 3)
    assert [r["step"] for r in tracker.records] == [1, 2, 3, 3]
