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


def test_recipe_efficiency_smoke(tmp_path, capsys):
    """The whole benchmark on a 2-layer model and a few steps: every contender runs through train(), the sweeps'
    best values get the second seed, and the report (JSON, PNG, markdown) is complete and consistent."""
    recipe_efficiency = load_script("recipe_efficiency")
    tiny = ["model.d_model=64", "model.n_layers=2", "model.sliding_window_pattern=2", "model.head_dim=16",
            "model.mlp_dim=128", "model.sliding_window=16", "model.query_pre_attn_scalar=16", "block_size=32",
            "batch_size=4"]
    result = recipe_efficiency.main(["--out", str(tmp_path), "--tokens", "1024", "--adamw-lrs", "1e-3,8e-3",
                                     "--muon-lrs", "0.01,0.08", "--evals", "2", "--eval-batches", "1",
                                     "--timing-steps", "1", "--limit", "300", *[a for s in tiny for a in ("--set", s)]])
    assert result["steps"] == 8 and result["budget_tokens"] == 1024
    runs = result["runs"]
    assert len(runs) == 5 + 3  # workshop + 2 + 2 sweeps at the first seed, then three contenders at the second
    assert {(r["contender"], r["seed"]) for r in runs if r["seed"] == 1338} == {("workshop", 1338), ("adamw", 1338), ("muon", 1338)}
    for name, row in result["finals"].items():
        assert row["seeds"] == [1337, 1338] and len(row["val_loss_seeds"]) == 2
        assert row["val_loss"] == pytest.approx(sum(row["val_loss_seeds"]) / 2)
        assert 0 < row["val_bpb"] < 5 and row["step_ms"] > 0
        sweep = [r for r in runs if r["contender"] == name and r["seed"] == 1337]
        assert row["val_loss_seeds"][0] == min(r["val_loss"] for r in sweep)  # the best value got the seeds
    winner = result["finals"][result["winner"]]
    assert winner["val_loss"] == min(r["val_loss"] for r in result["finals"].values())
    assert winner["winner_tokens_to_reach"] == pytest.approx(1024, rel=0.3)  # its own final loss: near the end
    for r in runs:  # real training: the loss fell from ln(vocab) at step 0
        assert r["curve"][0][0] == 0 and r["curve"][-1][0] == 1024 and r["curve"][-1][1] < r["curve"][0][1]
    assert set(result["timing_ms_per_step"]) >= {"adamw", "muon-float32"}
    assert (tmp_path / "recipe_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["winner"] == result["winner"]
    out = capsys.readouterr().out
    assert "| contender | final val loss (per seed) |" in out and "| workshop |" in out
