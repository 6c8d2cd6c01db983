"""The run's records: metrics.jsonl, loss.png, the log line, and MFU's peak figures."""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import torch

from tinygemma.errors import UserError
from tinygemma.files import atomic_path, atomic_write_text, write_errors

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (no sparsity), for MFU, matched as parts of the device's
# name, first match first (so "L40S" before "L40" before "L4"). The T4 has no bf16: its fp16 peak, the dtype it
# trains in. Unknown GPUs get no MFU.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200 NVL": 835e12,
    "H200": 989e12,  # SXM
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,  # Colab's L4
    "T4": 65e12,  # Colab's free GPU ("Tesla T4"), fp16
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # Whole words: "T4" is not "T400", "L4" not "L40" (the table lists the longer names first where both exist).
    return next((peak for key, peak in PEAK_BF16_FLOPS.items()
                 if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name)), None)


class MetricsLog:
    """metrics.jsonl: records kept in memory (for loss.png) and appended to the file at each flush.

    The file is rewritten whole only once, when the log opens: emptied for a fresh run, cut back to the
    checkpoint for a resumed one (atomically). After that each flush appends the records since the last one, so
    a flush costs what it writes, not the length of the run. A crash can leave a torn last line; readers skip it,
    and the next resume drops it.
    """

    def __init__(self, path: Path, records: list[dict] | None = None):
        self.path, self.records = path, list(records or [])
        atomic_write_text(self.path, "".join(map(record_line, self.records)))
        self.written = len(self.records)

    @classmethod
    def resume(cls, path: Path, step: int) -> MetricsLog:
        """The records of a run up to its checkpoint at `step` (later ones belong to the lost work)."""
        return cls(path, [r for r in read_records(path) if r.get("step", step + 1) <= step])

    def append(self, record: dict) -> None:
        self.records.append(record)

    def flush(self) -> None:
        new = self.records[self.written:]
        if new:
            with write_errors(self.path), open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(map(record_line, new)))
            self.written = len(self.records)


def strict_json(value, indent: int | None = None) -> str:
    """`value` in strict JSON (jq, pandas, JavaScript's JSON.parse, Go): a non-finite number, at any depth (the loss
    of a skipped or stopping step, the evaluation of a model whose weights overflowed), is written as null."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return [finite(x) for x in v] if isinstance(v, (list, tuple)) else v
    return json.dumps(finite(value), allow_nan=False, indent=indent)


def record_line(record: dict) -> str:
    """One line of metrics.jsonl, in strict JSON: a non-finite number (the loss of the step that stopped a run) is
    written as null, which read_records reads back as NaN."""
    return strict_json(record) + "\n"


# A record's figures, numbers (or null) wherever present: a line whose are not is no record of the trainer's.
NUMERIC_FIELDS = ("train_loss", "val_loss", "val_bpb", "lr", "lr_muon", "grad_norm", "elapsed_s", "tokens_per_s",
                  "mfu")


def is_record(record) -> bool:
    """Whether a metrics.jsonl line's JSON is one of the trainer's records: an integer step and tokens, and
    numbers (or null) as its figures."""
    return (isinstance(record, dict) and all(type(record.get(k)) is int for k in ("step", "tokens"))
            and all(record[k] is None or type(record[k]) in (int, float) for k in NUMERIC_FIELDS if k in record))


def read_records(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, or a run folder's (none if it is missing), skipping a line torn by a crash
    and one that is no record of the trainer's (is_record's: a line added or edited by hand); null is NaN."""
    path = Path(path)
    if path.is_dir():  # a run's folder: its records
        path = path / "metrics.jsonl"
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():  # (a damaged line: skipped)
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if is_record(record):
                    records.append({k: math.nan if v is None else v for k, v in record.items()})
    return records


def plot_losses(records: list[dict], path: Path) -> None:
    """loss.png: train and validation loss against tokens seen."""
    from matplotlib.figure import Figure

    train = [(r["tokens"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_validation(runs: dict[str, list[dict]], path: Path, per_byte: bool = False) -> None:
    """Several runs' validation loss against tokens seen, one line each (`tinygemma compare --plot`): past the ten
    colours of matplotlib's cycle, the lines are dashed, then dotted. `per_byte`: in bits per byte (`val_bpb`),
    for runs whose tokenizers differ, whose losses per token do not compare (nor do their tokens, of other
    lengths: the axis says so)."""
    from matplotlib.figure import Figure

    key = "val_bpb" if per_byte else "val_loss"
    curves = {name: [(r["tokens"], r[key]) for r in records if r.get(key) is not None] for name, records in runs.items()}
    if not any(curves.values()) or (per_byte and not any(math.isfinite(v) for c in curves.values() for _, v in c)):
        raise UserError(f"none of these runs has recorded {'bits per byte' if per_byte else 'a validation loss'} "
                        "yet: nothing to plot")
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for i, (name, val) in enumerate(curves.items()):
        if val:
            ax.plot(*zip(*val), label=name, marker="o", markersize=3, linestyle=("-", "--", ":", "-.")[i // 10 % 4])
    ax.set_xlabel("tokens (each run's own tokenizer's)" if per_byte else "tokens")
    ax.set_ylabel("validation bits per byte (the runs' tokenizers differ)" if per_byte
                  else "validation loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


# The PNG's Software text of the plots tinygemma writes: `compare --plot` writes over such a file and no other PNG
PLOT_SOFTWARE = "tinygemma"


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG marked as tinygemma's (PLOT_SOFTWARE), written atomically (a full disk: one
    line naming the file)."""
    with atomic_path(path) as tmp, write_errors(path):
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": PLOT_SOFTWARE})


def is_own_plot(path: Path) -> bool:
    """Whether `path` is a PNG that save_figure wrote (any other image, or no image, is not)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == PLOT_SOFTWARE
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def log_line(record: dict, max_steps: int, throughput: float, eta: float, mfu: float | None = None) -> str:
    """One progress line. `throughput` is the log interval's rate and `mfu`, if known, is at that same rate (both
    also in the record, in metrics.jsonl)."""
    mfu = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
    skipped = (" (float16 overflow: update skipped, loss scale lowered)" if record.get("overflow")
               else " (skipped)" if record.get("skipped") else "")
    muon = f" (muon {record['lr_muon']:.2e})" if "lr_muon" in record else ""
    return (f"step {record['step']}/{max_steps} | loss {record['train_loss']:.4f} | lr {record['lr']:.2e}{muon} | "
            f"grad norm {record['grad_norm']:.3f}{skipped} | {throughput:,.0f} tok/s{mfu} | eta {format_duration(eta)}")


def format_duration(seconds: float) -> str:
    seconds = round(seconds)  # (15.97 s is 0m16s, as the "16.0 s" beside it in the report)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
