"""benchmarks/train_throughput.py on a tiny preset: the contenders compute the same loss, the output is complete."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_throughput_smoke(tmp_path, capsys):
    train_throughput = load_script("train_throughput")
    out = tmp_path / "result.json"
    # Block 80 > gemma3-tiny's window of 64, so the sliding-window masks are compared too.
    result = train_throughput.main(["--preset", "gemma3-tiny", "--batch-size", "1", "--block-size", "80",
                                    "--steps", "1", "--warmup", "1", "--device", "cpu", "--json", str(out)])

    rows = {r["contender"]: r for r in result["results"]}
    assert list(rows) == ["tinygemma", "transformers", "workshop"]
    step0 = [r["loss_step0"] for r in rows.values()]
    assert max(step0) - min(step0) < 1e-4 * min(step0)
    assert abs(step0[0] - math.log(50_257)) < 2.0  # a fresh model's loss is near ln(vocab)
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and len(r["step_times_s"]) == 1
        assert r["mfu"] is None  # no peak is claimed for a CPU
        assert len(r["losses"]) == 2
    assert rows["transformers"]["ratio_vs_transformers"] == rows["transformers"]["paired_ratio_vs_transformers"] == 1.0
    times = rows["transformers"]["step_times_s"][0], rows["tinygemma"]["step_times_s"][0]
    assert rows["tinygemma"]["paired_ratio_vs_transformers"] == times[0] / times[1]
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))

    table = capsys.readouterr().out
    assert "| contender | tokens/s | step time (median) | MFU | vs transformers | paired |" in table
    for name in rows:
        assert f"| {name} |" in table


def test_train_throughput_isolated_runs_each_contender_in_its_own_process(capsys):
    """--isolate: one process per contender and round; their step times gathered, losses still checked equal."""
    train_throughput = load_script("train_throughput")
    result = train_throughput.main(["--preset", "gemma3-tiny", "--batch-size", "1", "--block-size", "16",
                                    "--steps", "2", "--warmup", "1", "--device", "cpu", "--isolate", "2",
                                    "--contenders", "tinygemma,transformers"])
    rows = {r["contender"]: r for r in result["results"]}
    assert list(rows) == ["tinygemma", "transformers"] and result["isolate"] == 2
    assert rows["tinygemma"]["loss_step0"] == pytest.approx(rows["transformers"]["loss_step0"], rel=1e-4)
    for r in rows.values():
        assert len(r["step_times_s"]) == 4 and r["step_time_s"] > 0  # 2 rounds x 2 steps
    assert rows["transformers"]["paired_ratio_vs_transformers"] == 1.0
    assert rows["tinygemma"]["ratio_vs_transformers"] == pytest.approx(
        rows["transformers"]["step_time_s"] / rows["tinygemma"]["step_time_s"])
    assert capsys.readouterr().err.count(" median ") == 4  # one line per process: two rounds of two
