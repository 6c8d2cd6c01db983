"""metrics.jsonl (issue 21): a flush appends only the records since the last one; a resume cuts the file back to
the checkpoint once, atomically; a line torn by a crash is skipped by readers and dropped by the next resume. And
MFU's peak per GPU."""

import errno
import json
import math
import os
import types

import pytest
import torch
from matplotlib.figure import Figure

import tinygemma.metrics
from tinygemma.errors import UserError
from tinygemma.files import WriteError
from tinygemma.metrics import (
    MetricsLog,
    format_duration,
    log_line,
    peak_flops,
    plot_losses,
    plot_validation,
    read_records,
)


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_flush_writes_only_the_new_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 9, "from": "an earlier run"}\n')
    log = MetricsLog(path)  # a fresh run starts an empty file
    assert path.read_text() == ""
    log.append({"step": 1, "train_loss": 3.0})
    log.append({"step": 2, "train_loss": 2.5})
    log.flush()
    assert lines(path) == [{"step": 1, "train_loss": 3.0}, {"step": 2, "train_loss": 2.5}]
    # Change what is on disk: a flush that rewrote the file would undo this, one that appends keeps it.
    path.write_text('{"step": 1, "marker": true}\n' + path.read_text().split("\n", 1)[1])
    inode = os.stat(path).st_ino
    log.append({"step": 3, "train_loss": 2.0})
    log.flush()
    log.flush()  # nothing new: nothing written
    assert lines(path) == [{"step": 1, "marker": True}, {"step": 2, "train_loss": 2.5}, {"step": 3, "train_loss": 2.0}]
    assert os.stat(path).st_ino == inode  # the same file, appended to, not replaced
    assert [r["step"] for r in log.records] == [1, 2, 3]  # loss.png still draws from all of them


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")  # as a full disk says it: no file named


def test_a_full_disk_names_the_log_or_the_plot_it_could_not_write(tmp_path, monkeypatch):
    """A full disk while appending to metrics.jsonl or drawing loss.png said only "[Errno 28] No space left on
    device"; the line names the file, and the plot already there stays whole."""
    log, plot = tmp_path / "metrics.jsonl", tmp_path / "loss.png"
    records = [{"step": 1, "tokens": 10, "train_loss": 3.0}]
    plot_losses(records, plot)
    drawn = plot.read_bytes()
    monkeypatch.setattr(Figure, "savefig", no_space)
    with pytest.raises(WriteError, match=f"could not write {plot} \\(No space left on device\\); the disk may be full"):
        plot_losses(records, plot)
    assert plot.read_bytes() == drawn and list(tmp_path.iterdir()) == [plot]
    metrics = MetricsLog(log)
    metrics.append(records[0])
    monkeypatch.setattr(tinygemma.metrics, "open", no_space, raising=False)
    with pytest.raises(WriteError, match=f"could not write {log} \\(No space left on device\\); the disk may be full"):
        metrics.flush()


def test_resume_cuts_back_to_the_checkpoint_once_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 0, "tokens": 0, "val_loss": 6.0},
               *({"step": s, "tokens": 8 * s, "train_loss": 6.0 - s} for s in range(1, 6)),
               {"step": 4, "tokens": 32, "val_loss": 4.5}]
    by_hand = ['{"val_loss": 1.0}', '{"step": "3", "tokens": 24, "train_loss": 1.0}', "[1, 2]",  # no trainer's
               '{"step": true, "tokens": 24, "train_loss": 1.0}', '{"step": 3, "tokens": 24, "train_loss": true}',
               '{"step": 3, "tokens": 24, "train_loss": "1.0"}']
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n".join(by_hand) + "\n"
                    + '{"step": 6, "train_lo')  # killed mid-write
    assert read_records(path) == records  # readers skip the torn line, and lines by hand that the plot and
    # report.md would index by step and tokens (a KeyError's traceback)

    inode = os.stat(path).st_ino
    log = MetricsLog.resume(path, 4)  # the checkpoint is at step 4: steps 5 and 6 were lost work
    kept = [r for r in records if r["step"] <= 4]
    assert log.records == kept and lines(path) == kept
    assert os.stat(path).st_ino != inode  # rewritten under a temporary name and renamed into place
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left
    log.append({"step": 5, "tokens": 40, "train_loss": 1.5})
    log.flush()
    assert lines(path) == [*kept, {"step": 5, "tokens": 40, "train_loss": 1.5}]
    assert read_records(tmp_path / "missing.jsonl") == []


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12),
    ("NVIDIA L4", 121e12), ("Tesla T4", 65e12), ("NVIDIA GeForce RTX 4090", None),
    ("NVIDIA T400 4GB", None), ("NVIDIA T4000", None), ("NVIDIA GH200 480GB", 989e12),  # whole words only
])
def test_mfu_peaks_match_the_gpu_by_name_longest_names_first(name, peak, monkeypatch):
    """A name containing another's ("NVIDIA L40S" holds "L4") takes its own peak; an unknown GPU gets no MFU."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == peak
    assert peak_flops(torch.device("cpu")) is None


def test_durations_round_to_the_second_as_the_seconds_beside_them():
    """The report's "training time 0m15s (16.0 s ...)": 15.97 s truncated where the figure beside it rounds."""
    assert [format_duration(s) for s in (15.97, 15.4, 59.6, 3599.6, 3600 * 25 + 61)] == [
        "0m16s", "0m15s", "1m00s", "1h00m", "25h01m"]


def test_the_log_line_gives_muons_rate_beside_adamws_under_muon_alone():
    record = {"step": 3, "train_loss": 2.5, "lr": 1e-3, "grad_norm": 0.5}
    line = tinygemma.metrics.log_line({**record, "lr_muon": 2e-2}, 10, 1000.0, 5.0)
    assert "| lr 1.00e-03 (muon 2.00e-02) | grad norm 0.500 |" in line
    assert "muon" not in tinygemma.metrics.log_line(record, 10, 1000.0, 5.0)


def test_read_records_takes_a_str_path_or_a_run_folder(tmp_path):
    """As every other function of the Python API that takes a path (a notebook's 'runs/a/metrics.jsonl')."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 8, "train_loss": 2.0}) + "\n")
    assert read_records(str(tmp_path / "metrics.jsonl")) == read_records(tmp_path) == [
        {"step": 1, "tokens": 8, "train_loss": 2.0}]


# ------------------------------------------------------------------ mutation round 16

def test_strict_json_writes_non_finite_numbers_as_null_inside_tuples_too():  # kills m07
    from tinygemma.metrics import strict_json
    assert json.loads(strict_json({"a": (math.nan, 1.0), "b": [(math.inf,)]})) == {"a": [None, 1.0], "b": [[None]]}


def _captured_plots(monkeypatch):
    from matplotlib.axes import Axes
    calls = []
    original = Axes.plot

    def plot(self, *args, **kwargs):
        calls.append((list(args[0]), list(args[1]), kwargs))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(Axes, "plot", plot)
    return calls


def test_loss_png_plots_both_curves_against_tokens(tmp_path, monkeypatch):  # kills m11
    from tinygemma.metrics import plot_losses
    calls = _captured_plots(monkeypatch)
    records = [{"step": 1, "tokens": 256, "train_loss": 3.0}, {"step": 2, "tokens": 512, "train_loss": 2.5},
               {"step": 2, "tokens": 512, "val_loss": 2.7}]
    plot_losses(records, tmp_path / "loss.png")
    assert [(c[0], c[1]) for c in calls] == [([256, 512], [3.0, 2.5]), ([512], [2.7])]
    calls.clear()  # before the first evaluation (or in a run without one): the training curve alone
    plot_losses(records[:2], tmp_path / "loss.png")
    assert [(c[0], c[1]) for c in calls] == [([256, 512], [3.0, 2.5])]


def test_compare_plots_ten_solid_lines_before_dashed_ones(tmp_path, monkeypatch):  # kills m12
    from tinygemma.metrics import plot_validation
    calls = _captured_plots(monkeypatch)
    runs = {f"run{i}": [{"step": 1, "tokens": 8, "val_loss": 3.0 + i}] for i in range(12)}
    plot_validation(runs, tmp_path / "compare.png")
    assert [c[2]["linestyle"] for c in calls] == ["-"] * 10 + ["--"] * 2


def test_compare_plots_bits_per_byte_where_the_tokenizers_differ(tmp_path, monkeypatch):
    """Runs of other tokenizers compare by bits per byte alone: per_byte plots each run's val_bpb (a NaN, where a
    tokenizer has no bytes to count, leaves a gap), says so on its axes, and refuses where no run has any."""
    from matplotlib.axes import Axes

    calls, labels = _captured_plots(monkeypatch), []
    original = Axes.set_ylabel
    monkeypatch.setattr(Axes, "set_ylabel", lambda self, text, **kw: labels.append(text) or original(self, text, **kw))
    runs = {"gpt2": [{"step": 0, "tokens": 0, "val_loss": 10.9, "val_bpb": 3.6},
                     {"step": 9, "tokens": 90, "val_loss": 6.0, "val_bpb": math.nan}],
            "bpe": [{"step": 9, "tokens": 120, "val_loss": 5.2, "val_bpb": 2.4}, {"step": 9, "tokens": 120}]}
    plot_validation(runs, tmp_path / "compare.png", per_byte=True)
    (xs, ys, _), bpe = calls
    assert xs == [0, 90] and ys[0] == 3.6 and math.isnan(ys[1]) and bpe[:2] == ([120], [2.4])
    assert labels == ["validation bits per byte (the runs' tokenizers differ)"]
    plot_validation(runs, tmp_path / "compare.png")  # the same tokenizer: losses per token
    assert [c[1] for c in calls[2:]] == [[10.9, 6.0], [5.2]]
    diverged = {"a": [{"step": 1, "tokens": 8, "val_loss": math.nan}, {"step": 2, "tokens": 16, "val_loss": math.inf}]}
    plot_validation(diverged, tmp_path / "diverged.png")  # losses recorded, none finite: a plot, not "none yet"
    assert (tmp_path / "diverged.png").exists()
    without = {"gpt2": [{"step": 9, "tokens": 90, "val_loss": 6.0, "val_bpb": math.nan}], "bpe": runs["bpe"][1:]}
    with pytest.raises(UserError, match="none of these runs has recorded bits per byte yet"):
        plot_validation(without, tmp_path / "none.png", per_byte=True)


def test_the_log_line_tells_a_skipped_step_from_a_float16_overflow():  # kills m13
    from tinygemma.metrics import log_line
    record = {"step": 3, "train_loss": 2.5, "lr": 1e-3, "grad_norm": math.nan}
    skipped = log_line({**record, "skipped": True}, 10, 1000.0, 5.0)
    assert "(skipped)" in skipped and "float16" not in skipped
    assert "(float16 overflow: update skipped, loss scale lowered)" in log_line(
        {**record, "skipped": True, "overflow": True}, 10, 1000.0, 5.0)


def test_mfu_divides_by_every_processes_peak():  # kills m17 (MFU world_size times too high under torchrun)
    from tinygemma.train import Trainer
    trainer = types.SimpleNamespace(flops_per_token=6e6, peak=1e12, rt=types.SimpleNamespace(world_size=4))
    assert Trainer.mfu(trainer, 1e5) == pytest.approx(6e6 * 1e5 / 4e12)


def test_a_log_interval_of_the_first_step_alone_counts_its_read_wait():  # kills m20
    from tinygemma.train import Trainer
    trainer = types.SimpleNamespace(window=[0, 0.5], first_step_s=1.5, tokens_per_step=1000, elapsed=2.0, peak=None,
                                    rt=types.SimpleNamespace(is_cuda=False))
    record = {}
    assert Trainer.interval_rate(trainer, record) == pytest.approx(500.0)  # 1000 tokens over 1.5 + 0.5 s
    assert record["tokens_per_s"] == pytest.approx(500.0) and trainer.window == [0, 0.0]


def test_a_damaged_line_that_is_not_utf8_is_skipped_not_a_crash(tmp_path):
    """A damaged metrics.jsonl (a disk error, a line saved by an editor in Latin-1) is read as the docstring
    says: the bad line skipped, by the readers and by a resume, not a UnicodeDecodeError's traceback."""
    path = tmp_path / "metrics.jsonl"
    good = {"step": 1, "tokens": 8, "train_loss": 2.0}
    path.write_bytes((json.dumps(good) + "\n").encode() + '{"step": 2, "note": "café"}\n'.encode("latin-1"))
    assert read_records(path) == [good]
    assert MetricsLog.resume(path, 2).records == [good] and lines(path) == [good]


def test_null_figures_are_read_back_as_nan(tmp_path):
    """A non-finite loss is written as null (strict JSON) and read back as NaN, a float the plot and report take."""
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.append({"step": 1, "tokens": 8, "train_loss": math.inf, "grad_norm": math.nan})
    log.flush()
    assert lines(path) == [{"step": 1, "tokens": 8, "train_loss": None, "grad_norm": None}]
    (record,) = read_records(path)
    assert math.isnan(record["train_loss"]) and math.isnan(record["grad_norm"])


def test_compare_plot_draws_runs_with_validation_beside_one_without(tmp_path):
    # metrics.py:144 `if not any(curves.values())` -> `all`: one run without a validation loss yet must not stop
    # the plot of the others (only "none of these runs" refuses)
    path = tmp_path / "cmp.png"
    plot_validation({"a": [{"step": 10, "tokens": 100, "val_loss": 3.0}, {"step": 20, "tokens": 200, "val_loss": 2.5}],
                     "b": [{"step": 10, "tokens": 100, "train_loss": 4.0}]}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_log_line_gives_muons_rate_even_where_adamws_is_zero():
    # metrics.py:170: the Muon rate is shown whenever the record has one (AdamW's lr may be 0 at the schedule's end)
    record = {"step": 5, "train_loss": 2.0, "lr": 0.0, "lr_muon": 0.02, "grad_norm": 1.0}
    assert "(muon 2.00e-02)" in log_line(record, 10, 1000.0, 5.0)


def test_a_hand_edited_figure_that_is_no_number_makes_the_line_no_record(tmp_path):
    """Every figure the trainer writes (is_record's NUMERIC_FIELDS: mfu included, which report.md divides by
    tokens_per_s) must be a number or null: a line with text in any one of them is skipped, not read as a record
    whose figure then crashes report.md's MFU row with a TypeError."""
    good = {"step": 10, "tokens": 80, "train_loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "elapsed_s": 2.0,
            "tokens_per_s": 40.0, "mfu": 0.1}
    fields = ("train_loss", "val_loss", "val_bpb", "lr", "lr_muon", "grad_norm", "elapsed_s", "tokens_per_s", "mfu")
    for field in fields:
        path = tmp_path / f"{field}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "step": 11, field: "12%"}) + "\n")
        assert read_records(path) == [good], field
