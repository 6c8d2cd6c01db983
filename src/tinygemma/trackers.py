"""Experiment trackers: TensorBoard, Weights & Biases and trackio, behind one fan-out the training loop calls.

`train.loggers` names them (default ["tensorboard"]). Each gets the same scalars at the same steps (train/loss,
train/lr, train/lr_muon under Muon, train/grad_norm, train/tokens, train/elapsed_s, train/tokens_per_s, train/mfu
where the peak is known; val/loss, val/ppl, val/bpb) and the resolved recipe as the run's config. Only rank 0
opens them.

Start-up is strict: an unknown name, a tracker that is not installed (one line with the install command), or one
that fails to start stops the run before any training. Later, a tracker that fails never stops training: it is
dropped with one warning and the run goes on. A run that fails or is interrupted is finished as failed in wandb.

Resume: RUN/trackers.json keeps each tracker's run id (wandb) or name (trackio), so a resumed run continues the same
tracker run. TensorBoard's events past the checkpoint are cut from its files, whichever trackers the resume runs (a
fresh start cuts all of an earlier attempt's: a run killed before its first checkpoint). wandb and trackio write in
batches, so a kill can lose their last records from before the checkpoint: a resume sends them again from
metrics.jsonl (`backfill`). Online, wandb is sent the steps from the last its server holds; offline, where nothing
says what the earlier invocation's file kept, every step up to the checkpoint again (the newest offline folder then
holds the whole history; how `wandb sync` joins a resumed run's folders varies with wandb's version). trackio is
sent the scalars (by step and name) its store lacks; TensorBoard, every step up to the checkpoint again, in order,
where its events' scalars and samples are not those steps' (a fork made by --resume-from; tensorboard added to
train.loggers on resume, or left out of it for some invocations). Steps redone after the checkpoint are logged
again: wandb keeps the first copy and trackio both (a resume is exact, so they have the same losses, unless a
setting changed on resume).
"""

from __future__ import annotations

import contextlib
import html
import importlib.util
import json
import math
import os
import secrets
import struct
import sys
import threading
from pathlib import Path

import numpy as np

from tinygemma.errors import UserError, describe, failure
from tinygemma.files import atomic_path, atomic_write_json, read_json

STATE_NAME = "trackers.json"
PROJECT = "tinygemma"  # the wandb project (unless WANDB_PROJECT says otherwise) and the trackio project
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": 'pip install "tinygemma[wandb]"',
           "trackio": 'pip install "tinygemma[trackio]"'}


def require_loggers(names: list[str]) -> None:
    """Refuse, in one line, loggers that are not installed (unknown names are refused by TrainConfig): before any
    data is read or step taken, on every process."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise UserError(f"train.loggers names {name}, which is not installed: {INSTALL[name]}")


def train_scalars(record: dict) -> dict[str, float]:
    """An optimizer step's record (metrics.jsonl) as the trackers' scalars; none of any other record (an
    evaluation's or the samples' also hold "tokens")."""
    if "train_loss" not in record:
        return {}
    keys = ("train_loss", "lr", "lr_muon", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "mfu")
    return {f"train/{key.removeprefix('train_')}": record[key] for key in keys if key in record}


def val_scalars(result: dict) -> dict[str, float]:
    """An evaluation's result (val_loss, val_ppl, val_bpb) as the trackers' scalars."""
    return {f"val/{key.removeprefix('val_')}": value for key, value in result.items()}


def record_scalars(record: dict) -> dict[str, float]:
    """Any metrics.jsonl record (an optimizer step's or an evaluation's) as the trackers' scalars."""
    return {**train_scalars(record), **val_scalars({k: v for k, v in record.items() if k.startswith("val_")})}


def sample_key(index: int) -> str:
    """The trackers' name of the sample story of the generate section's `index`-th prompt (from 0)."""
    return f"samples/{index + 1}"


def replay(tracker, records: list[dict]) -> None:
    """Send `tracker` what metrics.jsonl's `records` hold: their scalars, and their sample stories as texts."""
    for record in records:
        if scalars := record_scalars(record):
            tracker.log(scalars, record["step"])
        for i, text in enumerate(record.get("samples", ())):
            tracker.text(sample_key(i), text, record["step"])


class Trackers:
    """The run's trackers, as one: `log(scalars, step)`, `flush()`, `close()`."""

    def __init__(self, names: list[str], run_dir: Path, config: dict, start: int):
        # A fresh start (start == 0) begins new tracker runs; a resume continues those of trackers.json.
        path = run_dir / STATE_NAME
        state = read_json(path, "tracker state") if start and path.exists() else {}
        opened = []
        try:
            for name in dict.fromkeys(names):
                opened.append(OPENERS[name](run_dir, config, start, state.get(name)))
        except BaseException:
            for tracker in opened:
                with contextlib.suppress(Exception):
                    tracker.close(1)  # another failed to start: this run failed too
            raise
        if "tensorboard" not in names:  # tb/ kept as metrics.jsonl is, whichever trackers an invocation runs
            try:
                cut_to_start(run_dir / "tb", start)
            except Exception as e:  # (tensorboard not installed, or broken: this run does not need it)
                print(f"tinygemma: warning: {run_dir / 'tb'} was left as it was ({describe(e)}): TensorBoard may "
                      "show steps past the checkpoint there", file=sys.stderr, flush=True)
        self.trackers = opened
        ids = {t.name: t.resume_id for t in opened if t.resume_id is not None}
        if ids or path.exists():
            atomic_write_json(path, {**state, **ids})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._each("log", scalars, step)

    def samples(self, texts: list[str], step: int) -> None:
        """The sample stories of the generate section's prompts, at `step`, where the tracker shows texts:
        TensorBoard's and wandb's."""
        for i, text in enumerate(texts):
            self._each("text", sample_key(i), text, step)

    def flush(self) -> None:
        self._each("flush")

    def backfill(self, records: list[dict], start: int) -> None:
        """On resume, send each tracker the records up to the checkpoint at `start` that a kill may have cost it. A
        backfill that fails (trackio's store API changed, say) is a warning: the tracker still logs the new steps."""
        kept = [r for r in records if r["step"] <= start]
        for tracker in self.trackers:
            try:
                tracker.backfill(kept)
            except Exception as e:
                print(f"tinygemma: warning: {tracker.name} could not be sent again what a kill cost it "
                      f"({describe(e)}); it may lack some steps before the checkpoint", file=sys.stderr, flush=True)

    def close(self, exit_code: int = 0) -> None:
        """Finish each tracker's run; a non-zero `exit_code` (the run failed or was interrupted) marks it so where
        the tracker keeps a run's outcome (wandb: failed, not finished)."""
        self._each("close", exit_code)
        self.trackers = []

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # a tracker must never stop training: warn once, go on without it
                self.trackers.remove(tracker)
                print(f"tinygemma: warning: {tracker.name} failed ({describe(e)}); training goes on without it",
                      file=sys.stderr, flush=True)


def startup_error(name: str, error: Exception) -> Exception:
    """A UserError, or an OSError where the machine failed (a full disk, no network): exit status 2 or 1."""
    # Three lines: a settings validation error names the setting and its allowed values on its second and third.
    return failure(f"{name} could not start ({describe(error, lines=3)}); fix it, or leave {name} out of "
                   "train.loggers", error)


def quiet_event_writer_threads() -> None:
    """Have threading.excepthook leave TensorBoard's event-writing thread to its writer: the thread keeps its
    failure (a full disk, a run folder deleted) and the next write or flush raises it again in the main thread,
    where it is said in one line; printed by the thread too, it came first as a 35-line traceback. Other
    threads' failures go to the hook there was."""
    previous = threading.excepthook
    if getattr(previous, "quiet_event_writers", False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook.quiet_event_writers = True
    threading.excepthook = hook


class TensorBoard:
    name, resume_id = "tensorboard", None

    def __init__(self, run_dir: Path, config: dict, start: int, saved):
        # tensorboard --logdir's own loader ignores purge_step: the events it must not show are cut from the files.
        # A resume cuts the lost work past the checkpoint; a fresh start (a run killed before its first checkpoint,
        # started again) every event of the earlier attempt, as metrics.jsonl loses its records.
        try:  # installed but broken (a protobuf it cannot use, ...) is one line, as a failed start is
            from torch.utils.tensorboard import SummaryWriter

            quiet_event_writer_threads()
            folder = run_dir / "tb"
            self.held = cut_to_start(folder, start)
            self.earlier = event_files(folder)  # (the writer's own file is never rewritten while it is open)
            # Hide events past the checkpoint from readers that honour it; a fresh start hides every earlier event.
            self.writer = SummaryWriter(str(folder), purge_step=start + 1 if start else 0)
        except Exception as e:
            raise startup_error("tensorboard", e) from None
        self.writer.add_text("config", f"```json\n{json.dumps(config, indent=2)}\n```", start)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def text(self, key: str, value: str, step: int) -> None:
        self.writer.add_text(key, markdown_block(value), step)

    def flush(self) -> None:
        self.writer.flush()

    def backfill(self, records: list[dict]) -> None:
        """Where the events up to the checkpoint are not the records' (a fork: --resume-from copies the records,
        not tb/; tensorboard added to train.loggers on a resume, or off for some invocations; tb/ of a version
        that kept lost work), all of them are written again, in order: tensorboard --logdir takes a step written
        after a later one of its tag as a restart and drops that tag's later points. The earlier files keep their
        other events (the configs); the steps go into this invocation's file, after its start. With a file that
        cannot be read, nothing is written (what it holds is unknown)."""
        wanted = Points()
        replay(wanted, records)
        if self.held is None or wanted == self.held:  # flushed at every evaluation, so before every checkpoint
            return
        cut_events(self.earlier, lambda event: not any(map(is_tracked, event.summary.value)))
        replay(self, records)
        self.flush()

    def close(self, exit_code: int) -> None:
        self.writer.close()


class Points(dict):
    """What a tracker sent (`replay`'s) would put in an events file: {(step, name): value}, as cut_events reads
    them back."""

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.update({(step, key): point(value) for key, value in scalars.items()})

    def text(self, key: str, value: str, step: int) -> None:
        self[step, key] = markdown_block(value)


def markdown_block(text: str) -> str:
    """A sample story as TensorBoard gets it: an indented code block (TensorBoard renders text as Markdown: a
    story's *word* in italics, its lines run together)."""
    return "".join(f"    {line}\n" for line in text.split("\n"))


def point(value) -> float | str:
    """A scalar as an events file holds it (float32); every non-finite one alike (metrics.jsonl writes them all as
    null, read back as NaN)."""
    with np.errstate(over="ignore"):  # (a diverged run's perplexity past float32's range)
        value = float(np.float32(value))
    return value if math.isfinite(value) else "non-finite"


def held_point(value) -> float | str | None:
    """What an events file's summary value holds: its scalar (as `point`) or its text."""
    if value.WhichOneof("value") == "simple_value":
        return point(value.simple_value)
    tensor = value.tensor
    if tensor.string_val:
        return tensor.string_val[0].decode("utf-8", "replace")
    return point(tensor.float_val[0]) if tensor.float_val else None


def is_tracked(value) -> bool:
    """Whether an events file's summary value is one of the run's scalars or sample stories."""
    return value.tag.startswith(("train/", "val/", "samples/"))


def event_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("events.out.tfevents.*"))


def cut_to_start(folder: Path, start: int) -> dict | None:
    """tb/ as a start at step `start` keeps it (cut_events): a resume's events up to its checkpoint; a fresh start
    (a run killed before its first checkpoint, started again) none, as metrics.jsonl loses its records."""
    if start:
        return cut_events(event_files(folder), lambda event: event.step <= start)
    for path in event_files(folder):
        path.unlink()
    return {}


def cut_events(files: list[Path], keep) -> dict[tuple[int, str], float | str | None] | None:
    """Rewrite each events file of `files` with the events `keep(event)` accepts (atomically; a file left with
    none is deleted), and return the scalars and sample stories kept, {(step, name): value} (None for a point held
    twice), or None if a file could not be read whole (it is left as it was, with a warning: its events are not
    ours to lose)."""
    if not files:
        return {}
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    held: dict | None = {}
    for path in files:
        try:
            raw = list(RawEventFileLoader(str(path)).Load())
            check_read_whole(path, raw)
            records = [(record, Event.FromString(record)) for record in raw]
        except Exception as e:
            print(f"tinygemma: warning: {path} cannot be read whole ({describe(e)}): it is left as it was, and "
                  "TensorBoard's steps are not written again", file=sys.stderr, flush=True)
            held = None
            continue
        kept = [(record, event) for record, event in records if keep(event)]
        for _, event in kept if held is not None else ():
            for value in filter(is_tracked, event.summary.value):
                key = event.step, value.tag.removesuffix("/text_summary")
                held[key] = None if key in held else held_point(value)  # (a point held twice is no record's)
        if not kept:
            path.unlink()
        elif len(kept) < len(records):
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                writer = RecordWriter(f)
                for record, _ in kept:
                    writer.write(record)
    return held


def check_read_whole(path: Path, records: list[bytes]) -> None:
    """Raise if tensorboard's reader stopped before the end of the events file at `path` for another reason than
    a torn last record (a kill mid-write; zeros a crash left after it): it stops silently at a damaged one, and
    the events after it are not ours to drop. A record is its length (8 bytes) and the length's masked CRC (4),
    its data, and the data's CRC (4)."""
    from tensorboard.summary.writer.record_writer import masked_crc32c

    read = sum(len(record) + 16 for record in records)
    with open(path, "rb") as f:
        f.seek(read)
        rest = f.read().rstrip(b"\0")
    if len(rest) < 12:  # (nothing left, or part of a header)
        return
    length, crc = struct.unpack("<QI", rest[:12])
    if masked_crc32c(rest[:8]) != crc or 16 + length <= len(rest):
        raise ValueError(f"a damaged record at byte {read} of {path.stat().st_size}")


class Wandb:
    """Weights & Biases, its files under RUN/wandb/. WANDB_PROJECT, WANDB_ENTITY and WANDB_MODE (offline, ...)
    are read by wandb itself."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, start: int, saved: str | None):
        try:
            import wandb

            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=run_dir.name,
                                  dir=str(run_dir), config=config, id=saved, resume="allow" if saved else None)
        except Exception as e:
            raise startup_error("wandb", e) from None
        self.resume_id = self.run.id
        # A resumed wandb run ignores steps below the last it holds (with a warning each): skip those ourselves.
        # Offline it knows of none (run.step is 0).
        self.first_step = self.run.step if saved else 0

    def log(self, scalars: dict[str, float], step: int) -> None:
        if step >= self.first_step:
            self.run.log(scalars, step=step)

    def text(self, key: str, value: str, step: int) -> None:
        import wandb

        if step >= self.first_step:
            self.run.log({key: wandb.Html(f"<pre>{html.escape(value)}</pre>")}, step=step)

    def backfill(self, records: list[dict]) -> None:
        replay(self, records)  # offline, the newest offline-run folder then holds the whole history, samples too

    def flush(self) -> None:
        pass  # wandb sends in the background

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)  # non-zero: shown as failed


class Trackio:
    """trackio's local store (TRACKIO_DIR, by default under the Hugging Face cache); `trackio show` opens it."""

    name = "trackio"

    def __init__(self, run_dir: Path, config: dict, start: int, saved: str | None):
        try:
            import trackio

            # trackio writes from a background thread, where a store it cannot write to only warns, and every
            # record is lost: its store is made (or opened) here, so that such a store stops the start.
            storage = getattr(getattr(trackio, "sqlite_storage", None), "SQLiteStorage", None)
            if hasattr(storage, "init_db"):
                storage.init_db(PROJECT)
            # Named after the run's folder, as wandb's are, with a suffix of its own: trackio adds a second run of
            # a name it holds to the first's rows (two runs/*/cpu-demo, a run begun again in its folder)
            name = saved or f"{run_dir.resolve().name or 'run'}-{secrets.token_hex(3)}"  # (--out . named too)
            with contextlib.redirect_stdout(sys.stderr):  # its banner is not the run's output
                self.run = trackio.init(project=PROJECT, name=name, config=config, embed=False,
                                        resume="allow" if saved else "never")
        except Exception as e:
            raise startup_error("trackio", e) from None
        self.resume_id, self.trackio = self.run.name, trackio

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def text(self, key: str, value: str, step: int) -> None:
        pass  # trackio's dashboard shows scalars; the samples are in metrics.jsonl

    def backfill(self, records: list[dict]) -> None:
        from trackio.sqlite_storage import SQLiteStorage

        # By step and name: a step's train and val scalars are two rows, and a kill loses the later (val) alone
        held = {(row["step"], key) for row in SQLiteStorage.get_logs(PROJECT, self.run.name) for key in row}
        for record in records:
            lacking = {k: v for k, v in record_scalars(record).items() if (record["step"], k) not in held}
            if lacking:
                self.log(lacking, record["step"])

    def flush(self) -> None:
        pass  # trackio writes in the background

    def close(self, exit_code: int) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.trackio.finish()  # the module's finish, which also forgets the run (else it finishes it again at exit)


OPENERS = {"tensorboard": TensorBoard, "wandb": Wandb, "trackio": Trackio}
