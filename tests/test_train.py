"""Training on real stories with a tiny Gemma 3: the loss falls, resume is exact, the global batch alone decides
the numbers (accumulation, processes), bf16 autocast keeps float32 master weights, the run directory is complete."""

import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import tinygemma
import tinygemma.train
from tinygemma.checkpoint import checkpoint_pointer, fork_run, save_model
from tinygemma.cli import main
from tinygemma.config import TrainConfig, load_recipe
from tinygemma.data import open_prepared, prepare
from tinygemma.evaluation import evaluate_windows
from tinygemma.optim import learning_rate
from tinygemma.parallelize import fsdp_runs_on
from tinygemma.tokenizer import load_tokenizer, token_byte_lengths
from tinygemma.trackers import STATE_NAME as TRACKERS_STATE
from tinygemma.train import (
    check_fork_processes,
    check_initial_model,
    check_initial_tokenizer,
    check_resume_settings,
    check_run,
    check_shapes,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
# FSDP2 on a CPU (gloo) needs torch 2.7 or later; on torch 2.6 training refuses it in one line (test_parallelize)
NEEDS_CPU_FSDP = pytest.mark.skipif(not fsdp_runs_on(torch.device("cpu")),
                                    reason="FSDP2 on a CPU needs torch 2.7 or later")

# A 2-layer Gemma 3 (one sliding layer whose window of 16 is shorter than the 32-token block, one global layer)
# on a 512-token BPE: about 100k parameters, a few milliseconds a step on one core.
TINY = [
    "model.preset=gemma3-tiny", "model.d_model=64", "model.n_layers=2", "model.sliding_window_pattern=2",
    "model.n_heads=4", "model.n_kv_heads=1", "model.head_dim=16", "model.mlp_dim=128", "model.sliding_window=16",
    "model.query_pre_attn_scalar=16", "batch_size=8", "block_size=32", "grad_accum_steps=1", "max_steps=40",
    "learning_rate=1e-2", "min_lr=1e-3", "warmup_steps=4", "eval_interval=10", "eval_batches=4",
    "checkpoint_interval=20", "dtype=float32", "compile=false", "device=cpu", "seed=1234",
    "optimizer=adamw", "lr_schedule=cosine",  # whatever the built-in default; Muon and wsd have their own tests
]


def tiny_settings(data_dir, out, *overrides) -> list[str]:
    return [f"data.dir={data_dir}", f"train.out={out}", *TINY, *overrides]


def run(data_dir, out, *overrides, **kwargs) -> dict:
    return train(load_recipe(None, tiny_settings(data_dir, out, *overrides)), quiet=True, **kwargs)


def last_step(run_dir) -> int:
    return json.loads((Path(run_dir) / "checkpoints" / "last.json").read_text())["step"]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in metrics(run_dir) if "train_loss" in r}


def grad_norms(run_dir) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in metrics(run_dir) if "grad_norm" in r}


def val_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in metrics(run_dir) if "val_loss" in r}


@contextlib.contextmanager
def one_thread_only():
    """One thread per process: the CPUs are shared, and oversubscribed threads make tiny steps 100x slower. The
    count is put back after: the files that follow in this process keep conftest's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread():
    with one_thread_only():
        yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, stories_dir) -> Path:
    """The first 600 real stories, BPE-tokenized to 512 tokens (10% held out), by data.prepare itself."""
    out = tmp_path_factory.mktemp("data") / "bpe512"
    prepare(out, sources=[stories_dir / "train.txt"], tokenizer="bpe", vocab_size=512, limit=600,
            val_fraction=0.1, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, data_dir) -> Path:
    """40 uninterrupted steps: the reference that resume, processes and kills must reproduce."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    with one_thread_only():
        run(data_dir, out)
    return out


def test_validation_loss_falls_and_run_directory_is_complete(straight_run, data_dir):
    val = val_losses(straight_run)
    assert sorted(val) == [0, 10, 20, 30, 40]  # step 0, every eval_interval, at checkpoints, at the end
    assert val[40] < val[0] - 1.0, val  # from ln(512) = 6.24 to well below
    records = metrics(straight_run)
    steps = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    for r in steps:  # the log lines' records (every 10th step) add their interval's rate; no mfu on CPU
        rate = {"tokens_per_s", "elapsed_s"} if r["step"] % 10 == 0 else set()
        assert set(r) == {"step", "train_loss", "lr", "grad_norm", "tokens", *rate}  # no lr_muon under AdamW
        assert r["tokens"] == r["step"] * 8 * 32
    times = [r["elapsed_s"] for r in steps if "elapsed_s" in r]  # the training time so far, as the state's at the end
    state = json.loads((straight_run / "checkpoints" / "step_000040" / "trainer_state.json").read_text())
    assert 0 < times[0] < times[1] < times[2] < times[3] == pytest.approx(state["elapsed_s"], abs=0.05)
    # The logged rate (metrics.jsonl, the trackers' train/lr) is the schedule's at the step taken: warmup over 4
    # steps from 1e-2 / 4, then the cosine from 1e-2 down to min_lr 1e-3 at the last step.
    cfg = load_recipe(None, tiny_settings(data_dir, straight_run)).train
    assert [r["lr"] for r in steps] == pytest.approx([learning_rate(s, cfg) for s in range(40)], rel=1e-12)
    assert steps[0]["lr"] == pytest.approx(1e-2 / 4) and steps[3]["lr"] == pytest.approx(1e-2)
    assert steps[-1]["lr"] == pytest.approx(1e-3, rel=1e-3)
    assert all(math.isfinite(r["val_bpb"]) and r["val_bpb"] > 0 for r in records if "val_loss" in r)

    config = json.loads((straight_run / "config.json").read_text())
    assert config["model"]["vocab_size"] == 512  # from the data's meta.json
    assert config["model"]["d_model"] == 64 and config["train"]["max_steps"] == 40
    assert config["run"]["tokens_per_step"] == 256
    assert config["run"]["kv_layout"] == {"sliding_attention": "shared", "full_attention": "shared"}  # the model untouched on a CPU

    assert (straight_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((straight_run / "tb").glob("events.out.tfevents.*"))
    ckpts = straight_run / "checkpoints"
    last = json.loads((ckpts / "last.json").read_text())
    assert last["dir"] == "step_000040" and last["step"] == 40
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.json", "last.json", "step_000040"]  # pruned
    files = {p.name for p in (ckpts / "step_000040").iterdir()}
    assert files == {"model.safetensors", "checkpoint.json", "optimizer.safetensors", "trainer_state.json",
                     "tokenizer.json"}  # the checkpoint carries its tokenizer

    # The checkpoint gives back the trained model: its loss on a validation window is the trained one.
    model = tinygemma.load(ckpts / "step_000040")
    assert model.config.vocab_size == 512
    tokens = torch.from_numpy(open_prepared(data_dir).split("val")[:33].astype(np.int64))[None]
    assert model(tokens[:, :-1], tokens[:, 1:]).item() < val[0] - 0.8


def test_load_accepts_the_run_directory(straight_run):
    best = json.loads((straight_run / "checkpoints" / "best.json").read_text())["dir"]
    by_run, by_dir = tinygemma.load(straight_run), tinygemma.load(straight_run / "checkpoints" / best)
    for name, tensor in by_dir.state_dict().items():
        assert torch.equal(by_run.state_dict()[name], tensor)


def script_val_losses(monkeypatch, losses: list[float]) -> None:
    """The trainer's evaluations (each computed as ever) report these validation losses, in turn."""
    scripted = iter(losses)
    monkeypatch.setattr(tinygemma.train, "evaluate_windows",
                        lambda *a, **k: {**evaluate_windows(*a, **k), "val_loss": next(scripted)})


def test_best_json_names_the_checkpoint_of_the_lowest_validation_loss(data_dir, tmp_path, monkeypatch):
    """A validation loss that falls, then rises: best.json (what load, generate, eval and export read from a run
    folder) names the lowest one's checkpoint, not the last, and keep_checkpoints=1 keeps it beside the last."""
    script_val_losses(monkeypatch, [9.0, 5.0, 3.0, 4.0])  # steps 0, 10, 20, 30
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=30", "checkpoint_interval=10", "keep_checkpoints=1")
    assert val_losses(out) == {0: 9.0, 10: 5.0, 20: 3.0, 30: 4.0}
    ckpts = out / "checkpoints"
    best = json.loads((ckpts / "best.json").read_text())
    assert (best["dir"], best["step"]) == ("step_000020", 20)
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.json", "last.json", "step_000020", "step_000030"]
    by_run, best_model, last_model = (tinygemma.load(p) for p in (out, ckpts / "step_000020", ckpts / "step_000030"))
    for name, tensor in by_run.state_dict().items():
        assert torch.equal(tensor, best_model.state_dict()[name])
    assert any(not torch.equal(t, last_model.state_dict()[n]) for n, t in by_run.state_dict().items())


def test_bits_per_byte_counts_the_bytes_of_the_text(data_dir, stories_dir, tmp_path):
    """The bpb denominator: the bytes the validation tokens stand for are the bytes of its stories, for our BPE
    and for GPT-2's tokenizer (end-of-text stands for none)."""
    gpt2_dir = tmp_path / "gpt2"
    prepare(gpt2_dir, sources=[stories_dir / "train.txt"], tokenizer="gpt2", limit=100, val_fraction=0.1,
            workers=1, progress=False)
    for directory in (data_dir, gpt2_dir):
        data = open_prepared(directory)
        lengths = token_byte_lengths(data.tokenizer(), data.vocab_size)
        val = data.split("val").astype(np.int64)
        assert lengths[val].sum().item() == data.meta["splits"]["val"]["bytes"]
        assert lengths[data.eot_id] == 0


def test_resume_reproduces_an_uninterrupted_run(straight_run, data_dir, tmp_path, capsys):
    out = tmp_path / "resumed"
    first = run(data_dir, out, stop_at=20)
    assert first["step"] == 20 and last_step(out) == 20
    with pytest.raises(tinygemma.UserError, match="--resume"):  # a fresh start never overwrites a run
        run(data_dir, out)
    # What writes killed mid-way leave (a lost process, a Ctrl-C) is deleted when the run resumes; a temporary of
    # a file the run does not write stays.
    left = [out / ".loss.png.0a1b2c3d.tmp", out / ".metrics.jsonl.0a1b2c3d.tmp",
            out / "checkpoints" / ".last.json.0a1b2c3d.tmp", out / "profile" / ".trace.json.0a1b2c3d.tmp"]
    for path in [*left, out / ".notes.txt.0a1b2c3d.tmp"]:
        path.parent.mkdir(exist_ok=True)
        path.write_text("killed")
    # A --stop-at the run has passed trains nothing, and the first line says so (it read "steps 20 to 20").
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--stop-at", "12"]) == 0
    assert "no step (the run is at step 20 of 40, which --stop-at does not pass)" in capsys.readouterr().out
    assert last_step(out) == 20
    # The command line resumes from the run's own config.json, with nothing but --out.
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert last_step(out) == 40
    tokens = 40 * json.loads((out / "config.json").read_text())["run"]["tokens_per_step"]
    assert f"of 40 ({tokens:,} tokens in all)" in capsys.readouterr().out  # a small run's read "0.0M"
    assert train_losses(out) == train_losses(straight_run)  # exactly, step for step
    assert val_losses(out) == val_losses(straight_run)
    assert not any(path.exists() for path in left) and (out / ".notes.txt.0a1b2c3d.tmp").exists()


def test_train_checks_the_data_and_sampling_settings_it_is_given(data_dir, tmp_path, capsys, stories_dir):
    """`train --set data.limit=100` trained on data.dir as prepared, whatever the setting said, and recorded it;
    `--set generate.seed=-1` was recorded for the run's samples and model card. Both are refused in one line
    before anything is written. [data] settings that describe the prepared data (the model card's Reproduce
    command gives them) are taken."""
    args = ["train", *(a for s in tiny_settings(data_dir, tmp_path / "run", "max_steps=2", "warmup_steps=0")
                       for a in ("--set", s))]
    for bad, phrase in [("data.limit=100", "limit: 600, the recipe asks for 100"),
                        ("data.tokenizer=gpt2", "tokenizer: "),
                        ("generate.seed=-1", "generate.seed must be an integer from 0"),
                        ('generate.prompts=["Once", ""]', "generate.prompts holds ''"),
                        ("generate.max_new_tokens=100000", "leaves no room for a prompt"),
                        ("generate.prompts=Once \udcff", "not UTF-8 text")]:  # (export's card then failed)
        assert main([*args, "--set", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and phrase in err, err
    recipe = tmp_path / "bad.toml"  # a recipe file's [generate], as run checks it
    recipe.write_text("[generate]\nseed = -1\n")
    assert main(["train", "--config", str(recipe), *args[1:]]) == 2
    assert "generate.seed must be an integer from 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    data = tmp_path / "data"  # prepared as a recipe's [data] can say (the fixture's 0.1 of the stories it cannot)
    prepare(data, sources=[stories_dir / "train.txt"], tokenizer="bpe", vocab_size=300, limit=300, workers=1,
            progress=False)
    same = [f"data.dir={data}", f"data.source={stories_dir / 'train.txt'}", "data.limit=300", "data.tokenizer=bpe",
            "data.vocab_size=300"]
    assert main([*args, *(a for s in same for a in ("--set", s))]) == 0


def test_a_run_folder_on_a_read_only_disk_is_one_line_naming_it(data_dir, tmp_path, read_only_folders):
    """`train --out` on a read-only disk said "[Errno 30] Read-only file system: 'romnt/r'", unlike every other
    write: now "could not write FOLDER (...)" (exit status 1), as the others. Simulated: making the folder is EROFS."""
    from tinygemma.files import WriteError

    out = tmp_path / "ro" / "run"
    read_only_folders.add(out)
    with pytest.raises(WriteError) as refused:
        run(data_dir, out, "max_steps=2", "warmup_steps=1")
    assert str(refused.value) == f"could not write {out} (Read-only file system)"


def test_a_resume_whose_data_is_gone_names_what_prepares_it_again(data_dir, stories_dir, tmp_path, capsys):
    """A resumed run whose data folder was moved or deleted said "no meta.json (run `tinygemma prepare --out DIR`)":
    a command that prepares the hub's stories with GPT-2's tokenizer, which the run then refused. It names the
    `tinygemma prepare` of the run's [data] where its recipe made the data, and none where `--data` gave it (the
    run recorded nothing more of it)."""
    made = ["data.source=" + str(stories_dir / "train.txt"), "data.tokenizer=bpe", "data.vocab_size=512",
            "data.limit=600"]
    for name, extra, said in (("given", [], "give its folder with --data, or prepare the same stories with the same "
                                            "tokenizer into it again; then run this command again"),
                              ("made", made, "`tinygemma prepare --out {data} --source {source} --tokenizer bpe "
                                             "--vocab-size 512 --limit 600` prepares it again as the run's [data] "
                                             "asks")):
        data, out = tmp_path / f"data-{name}", tmp_path / f"run-{name}"
        if name == "given":
            shutil.copytree(data_dir, data)
        else:  # (as the recipe's [data] prepares it: the source's 5% held out)
            prepare(data, sources=[stories_dir / "train.txt"], tokenizer="bpe", vocab_size=512, limit=600, workers=1,
                    progress=False)
        settings = [item for setting in tiny_settings(data, out, "max_steps=2", "warmup_steps=1", *extra)
                    for item in ("--set", setting)]
        assert main(["train", *settings]) == 0
        recorded = json.loads((out / "config.json").read_text())["data"]
        assert (set(recorded) == {"dir"}) == (name == "given"), recorded
        shutil.rmtree(data)
        capsys.readouterr()
        assert main(["train", "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{data} (the run's data.dir) holds no prepared data: it is gone, or " \
            "elsewhere" in err, err
        assert said.format(data=data, source=stories_dir / "train.txt") in err, err


def test_resume_reads_the_saved_recipe_however_the_folder_is_given_and_keeps_the_preset(data_dir, tmp_path, capsys,
                                                                                        monkeypatch):
    """`--set train.out=RUN` (as the run report spells it) resumes from RUN's config.json as --out does (the
    built-in recipe was taken, and refused as another model); another preset on a resume is refused in one line
    (every model field is saved, so it only relabelled the run in config.json and report.md)."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=6", stop_at=2)
    for preset in (["--model", "gemma3-270m"], ["--set", "model.preset=gemma3-270m"]):
        assert main(["train", "--resume", "--out", str(out), *preset]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "holds a run of model preset gemma3-tiny; a resume continues its model" in err
    assert main(["train", "--resume", "--set", f"train.out={out}", "--stop-at", "4"]) == 0
    assert main(["train", "--resume", "--set", f"out={out}"]) == 0
    assert last_step(out) == 6
    assert json.loads((out / "config.json").read_text())["model"]["preset"] == "gemma3-tiny"

    default = tmp_path / "runs" / "tinystories"  # the built-in train.out: `train --resume` alone continues it too
    run(data_dir, default, "max_steps=6", stop_at=2)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "--stop-at", "4"]) == 0  # was: the built-in recipe's data, not prepared
    assert main(["train", "--resume"]) == 0  # and the saved max_steps (6), not the built-in one
    assert last_step(default) == 6


def test_python_resumes_a_run_from_its_saved_recipe(data_dir, tmp_path):
    """train(saved_recipe(RUN), resume=True): what `train --resume --out RUN` does, from a notebook whose kernel
    restarted and lost its Recipe; --set items apply on top. A folder holding no run gives None."""
    from tinygemma.train import saved_recipe

    out = tmp_path / "run"
    run(data_dir, out, "max_steps=6", stop_at=2)
    assert saved_recipe(tmp_path / "nothing") is None
    recipe = saved_recipe(out, ["log_interval=3"])
    assert recipe.model_preset == "gemma3-tiny" and recipe.train.max_steps == 6 and recipe.train.log_interval == 3
    assert recipe.model_overrides["d_model"] == 64 and Path(recipe.out) == out
    # The folder given, not the one its records name: a run moved (or copied to branch it) resumes where it is.
    moved = tmp_path / "moved"
    out.rename(moved)
    assert Path(saved_recipe(moved).out) == moved and train(saved_recipe(moved), resume=True, quiet=True)["step"] == 6
    assert not out.exists()


def test_a_model_llama_cpp_or_transformers_cannot_run_is_said_as_training_starts(data_dir, tmp_path, capsys):
    """model.head_dim set without the query_pre_attn_scalar the preset pairs with it: the GGUF export refused the
    model only once it was trained. A new run now says so first, with the setting that keeps it exportable;
    a model llama.cpp runs, and a resume, say nothing. The dry run warns as the start does. The same for a model
    transformers refuses."""
    settings = ("model.query_pre_attn_scalar=32", "max_steps=4", "warmup_steps=1", "checkpoint_interval=2")
    recipe = load_recipe(None, tiny_settings(data_dir, tmp_path / "run", *settings))
    assert any("llama.cpp cannot run this model" in warning for warning in check_run(recipe)["warnings"])
    run(data_dir, tmp_path / "run", *settings, stop_at=2)
    err = capsys.readouterr().err
    assert err.count("llama.cpp cannot run this model") == 1 and "set model.query_pre_attn_scalar=16" in err
    run(data_dir, tmp_path / "run", *settings, resume=True)
    run(data_dir, tmp_path / "fine", "max_steps=1", "warmup_steps=1")
    assert "llama.cpp" not in capsys.readouterr().err
    # nor transformers: a d_model its heads do not divide (tinygemma's head_dim is free of it), said at the start
    odd = ("model.d_model=60", "model.n_heads=7", "max_steps=1", "warmup_steps=1")
    assert any("not a multiple of n_heads (7)" in warning
               for warning in check_run(load_recipe(None, tiny_settings(data_dir, tmp_path / "odd", *odd)))["warnings"])
    run(data_dir, tmp_path / "odd", *odd)
    err = capsys.readouterr().err
    assert "warning: model.d_model (60) is not a multiple of n_heads (7)" in err
    assert "(`tinygemma export` refuses it once it is trained; its --format gguf takes it)" in err
    assert main(["export", "--ckpt", str(tmp_path / "odd"), "--out", str(tmp_path / "odd_hf")]) == 2  # as it said
    both = check_run(load_recipe(None, tiny_settings(data_dir, tmp_path / "both", *odd,
                                                     "model.query_pre_attn_scalar=32")))["warnings"]
    assert len(both) == 2 and both[0].startswith("model.d_model (60) is not a multiple of n_heads (7)")
    assert both[1].startswith("llama.cpp cannot run this model")
    assert not any("takes it" in w for w in both)  # neither export does


def test_the_update_takes_the_clipped_gradient_and_the_log_the_norm_before(data_dir, tmp_path, monkeypatch):
    """grad_clip bounds the whole (accumulated) gradient's norm when the optimizer steps; metrics.jsonl's grad_norm
    is the norm before clipping; grad_clip = 0 clips nothing."""
    import tinygemma.train as train_module

    real, seen = train_module.configure_optimizer, []

    def watched(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        step = optimizer.step

        def stepping(*a, **k):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            return step(*a, **k)

        optimizer.step = stepping
        return optimizer

    monkeypatch.setattr(train_module, "configure_optimizer", watched)
    for clip, out in ((0.05, tmp_path / "clipped"), (0.0, tmp_path / "free")):
        seen.clear()
        run(data_dir, out, "max_steps=3", "warmup_steps=1", "grad_accum_steps=2", f"grad_clip={clip}")
        logged = [r["grad_norm"] for r in metrics(out) if "grad_norm" in r]
        assert len(seen) == len(logged) == 3 and all(n > 0.05 for n in logged)  # all above the clip
        expected = [0.05] * 3 if clip else logged
        assert seen == pytest.approx(expected, rel=1e-4)


def test_gradient_accumulation_matches_one_big_batch(data_dir, tmp_path):
    """4 micro-steps of 2 sequences make the same optimizer steps as 1 micro-step of 8."""
    big = run(data_dir, tmp_path / "big", "max_steps=6", "batch_size=8", "grad_accum_steps=1")
    small = run(data_dir, tmp_path / "small", "max_steps=6", "batch_size=2", "grad_accum_steps=4")
    a, b = train_losses(tmp_path / "big"), train_losses(tmp_path / "small")
    assert a.keys() == b.keys() and a[1] == pytest.approx(b[1], rel=1e-6)
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-4)
    assert big["val_loss"] == pytest.approx(small["val_loss"], rel=1e-4)
    wa, wb = tinygemma.load(big["checkpoint"]).state_dict(), tinygemma.load(small["checkpoint"]).state_dict()
    # AdamW divides by the gradient's own scale, so an element whose gradient is near zero turns float summation
    # noise into a step difference: 1.6e-5 on one of 8,192 elements on an Intel Xeon (AVX-512, no BF16), where
    # an AMD EPYC stayed under 1e-5. A wrong accumulation moves every weight by about the learning rate (1e-2).
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-4)


def test_bf16_autocast_keeps_float32_master_weights(straight_run, data_dir, tmp_path):
    out = tmp_path / "bf16"
    run(data_dir, out, "dtype=bfloat16", "checkpoint_interval=10", stop_at=10)
    ckpt = out / "checkpoints" / "step_000010"
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118
    with safe_open(str(ckpt / "optimizer.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118
    assert json.loads((out / "config.json").read_text())["run"]["dtype"] == "bfloat16"
    # The matmuls really ran in bfloat16: the losses are close to float32's but not equal to them.
    bf16, fp32 = train_losses(out), train_losses(straight_run)
    assert [bf16[s] for s in range(1, 11)] == pytest.approx([fp32[s] for s in range(1, 11)], rel=2e-2)
    assert any(bf16[s] != fp32[s] for s in range(1, 11))


# The recipe for the multi-process tests: 4 sequences x 2 micro-steps = a global batch of 8, split 2 x 1 x 4
# under two processes. The same recipe, unedited, runs in one process and under torchrun.
SHARED_BATCH = ["batch_size=4", "grad_accum_steps=2"]


def torchrun(out, data_dir, *args, distributed="ddp", nproc=2, settings=(), entry=("-m", "tinygemma"), options=(),
             env=None) -> subprocess.CompletedProcess:
    """`torchrun [options] ENTRY train ARGS` on the shared-batch recipe; `entry` is a module (-m) or a script."""
    settings = tiny_settings(data_dir, out, *SHARED_BATCH, f"distributed={distributed}", *settings)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *options,
           *entry, "train", *args, *[a for s in settings for a in ("--set", s)]]
    # Not WANDB_SERVICE: a wandb service that an earlier test started in this process would serve the workers
    # too, and would keep a killed worker's run open ("run ID is in use") when torchrun restarts it.
    inherited = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    # PYTHONFAULTHANDLER: a worker that aborts or crashes shows where its Python threads were in the failure.
    env = {**inherited, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "PYTHONFAULTHANDLER": "1",
           **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, data_dir) -> Path:
    """The shared-batch recipe in one process, 30 steps: what two processes, and resumes across, must give."""
    out = tmp_path_factory.mktemp("runs") / "one-process"
    with one_thread_only():
        run(data_dir, out, *SHARED_BATCH, stop_at=30)
    return out


def torchrun_failure(proc: subprocess.CompletedProcess) -> str:
    """What a failed torchrun said: the start of its error output, where a worker's own error comes first, its end,
    where torchrun's summary names the failed rank, and the last lines the workers printed."""
    err = proc.stderr
    shown = err if len(err) <= 5000 else f"{err[:2500]}\n[...]\n{err[-2500:]}"
    return f"{shown}\n--- stdout, last lines:\n{proc.stdout[-1500:]}"


TWO_PROCESS_SETTINGS = ["checkpoint_interval=5"]  # checkpoints change no number; the restart test needs them


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory, data_dir) -> Path:
    """The shared-batch recipe under torchrun, 2 processes (DDP), 15 uninterrupted steps: what one process gives,
    and what a run whose processes are killed and restarted must give (test_reliability_train.py). Its checkpoints
    are all kept: FSDP2's run forks the one of step 5 (the restart test keeps its own run's default pruning)."""
    out = tmp_path_factory.mktemp("runs") / "two-processes"
    proc = torchrun(out, data_dir, "--stop-at", "15", settings=[*TWO_PROCESS_SETTINGS, "keep_checkpoints=3"])
    assert proc.returncode == 0, torchrun_failure(proc)
    return out


@pytest.mark.parametrize("distributed", ["ddp", pytest.param("fsdp", marks=NEEDS_CPU_FSDP)])
def test_two_processes_reproduce_one(one_process_run, two_process_run, data_dir, tmp_path, distributed):
    """torchrun, 2 gloo processes x 1 micro-step x 4 sequences = the global batch of 8 that one process makes in 2
    micro-steps: the same losses and validation losses, the same tokens per step, with DDP and with FSDP2 (whose
    checkpoint is gathered from the shards). FSDP2's run is DDP's to step 5 (two_process_run's checkpoint, forked
    in this process as README's torchrun fork path does: one torchrun launch less), resumed under FSDP2 to 10, in
    passes of 2 sequences: its reduction switched off for a process's first pass and on for its last (a switch
    never undone reduced no gradient after step 1), the whole optimizer state given back to the shards (left whole,
    the first step failed), and the switch recorded among the resume's changes."""
    out = two_process_run if distributed == "ddp" else tmp_path / distributed
    if distributed != "ddp":
        settings = [*TWO_PROCESS_SETTINGS, "keep_checkpoints=3", "micro_batch_size=2"]
        run(data_dir, out, *SHARED_BATCH, *settings, resume_from=two_process_run / "checkpoints" / "step_000005",
            stop_at=5)  # trains nothing: the fork is made
        proc = torchrun(out, data_dir, "--resume", "--stop-at", "10", distributed=distributed, settings=settings)
        assert proc.returncode == 0, torchrun_failure(proc)
        state = json.loads((out / "checkpoints" / "step_000010" / "trainer_state.json").read_text())
        # (two_process_run split its steps in passes of 4)
        assert state["invocations"][-1]["changed"] == {"distributed": ["ddp", distributed],
                                                       "micro_batch_size": ["auto", "2"]}
        assert json.loads((out / "config.json").read_text())["run"]["passes_per_step"] == 2
        grads, single = (grad_norms(run_dir) for run_dir in (out, one_process_run))
        assert [grads[s] for s in range(1, 11)] == pytest.approx([single[s] for s in range(1, 11)], rel=1e-4)
    config, single = json.loads((out / "config.json").read_text()), json.loads((one_process_run / "config.json").read_text())
    assert config["run"]["world_size"] == 2 and single["run"]["world_size"] == 1
    assert config["run"]["global_batch"] == single["run"]["global_batch"] == 8
    assert config["run"]["tokens_per_step"] == single["run"]["tokens_per_step"] == 8 * 32
    two, one = train_losses(out), train_losses(one_process_run)
    steps = range(1, 16 if distributed == "ddp" else 11)
    assert sorted(two) == list(steps)
    assert [two[s] for s in steps] == pytest.approx([one[s] for s in steps], rel=1e-5)
    assert val_losses(out)[10] == pytest.approx(val_losses(one_process_run)[10], rel=1e-5)
    assert val_losses(out)[0] == pytest.approx(val_losses(one_process_run)[0], rel=1e-5)  # the same windows
    tinygemma.load(out)  # a whole model, whatever the sharding


ROLES_ENTRY = """
import sys, time
import tinygemma.checkpoint, tinygemma.train
from tinygemma.config import load_recipe
from tinygemma.runtime import env_rank
from tinygemma.train import train

write_json, write_report = tinygemma.checkpoint.atomic_write_json, tinygemma.train.write_report

def slow_last_json(path, obj):  # process 0 is slow to name the final checkpoint
    if path.name == "last.json" and obj.get("step") == 4:
        time.sleep(3)
    return write_json(path, obj)

def counted_report(run_dir):
    print(f"report.md written by rank {env_rank()}", flush=True)
    return write_report(run_dir)

tinygemma.checkpoint.atomic_write_json, tinygemma.train.write_report = slow_last_json, counted_report
tinygemma.train.peak_flops = lambda device: 1e9  # a made-up peak a process, so that MFU is known
assert sys.argv[1] == "train" and set(sys.argv[2::2]) == {"--set"}  # as torchrun() calls it: `train --set S ...`
summary = train(load_recipe(None, sys.argv[3::2]), quiet=True, stop_at=4)
print(f"rank {env_rank()}: step {summary['step']} checkpoint {summary['checkpoint']}", flush=True)
"""


def test_under_torchrun_process_0_writes_and_every_process_returns_the_last_checkpoint(data_dir, tmp_path):
    """train() returns, on every process, the summary of the checkpoint process 0 has just written: the closing
    barrier holds the others until its last.json names it (without it, process 1 returned step 2's). report.md,
    rewritten at each checkpoint, is process 0's alone to write (not one file from two processes at once)."""
    entry, out = tmp_path / "entry.py", tmp_path / "run"
    entry.write_text(ROLES_ENTRY)
    proc = torchrun(out, data_dir, settings=["checkpoint_interval=2"], entry=[str(entry)])
    assert proc.returncode == 0, torchrun_failure(proc)
    for rank in (0, 1):
        assert f"rank {rank}: step 4 checkpoint {out / 'checkpoints' / 'step_000004'}" in proc.stdout, proc.stdout
    writers = [line for line in proc.stdout.splitlines() if line.startswith("report.md written by")]
    assert writers == ["report.md written by rank 0"] * 2, proc.stdout  # checkpoints at steps 2 and 4
    # MFU over both processes' peak (1e9 each): the log's and the report's, which counted one process's
    config = json.loads((out / "config.json").read_text())
    flops_per_token = tinygemma.ModelConfig(**{k: v for k, v in config["model"].items() if k != "preset"}
                                            ).flops_per_token(config["train"]["block_size"])
    timed = [r for r in metrics(out) if "tokens_per_s" in r]
    assert timed and [r["mfu"] for r in timed] == pytest.approx([flops_per_token * r["tokens_per_s"] / 2e9
                                                                 for r in timed])
    state = json.loads((out / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert [p["peak_flop_s"] / p["elapsed_s"] for p in state["invocations"]] == pytest.approx([2e9])


@NEEDS_CPU_FSDP
def test_fsdp_in_float16_agrees_with_one_process(data_dir, tmp_path):
    """FSDP2 under float16: weights gathered in float16, gradients reduced in float32, and one sharded scaler
    whose skip decision every process shares; the losses of one process in float16."""
    one = tmp_path / "one"
    run(data_dir, one, *SHARED_BATCH, "dtype=float16", stop_at=5)
    proc = torchrun(tmp_path / "fsdp", data_dir, "--stop-at", "5", distributed="fsdp", settings=["dtype=float16"])
    assert proc.returncode == 0, torchrun_failure(proc)
    two, single = train_losses(tmp_path / "fsdp"), train_losses(one)
    assert [two[s] for s in range(1, 6)] == pytest.approx([single[s] for s in range(1, 6)], rel=1e-2)
    assert json.loads((tmp_path / "fsdp" / "config.json").read_text())["run"]["dtype"] == "float16"


def test_a_run_moves_between_one_and_two_processes(one_process_run, data_dir, tmp_path):
    """Checkpointed on one process, resumed on two, then on one again: the losses of the uninterrupted run."""
    out = tmp_path / "moving"
    run(data_dir, out, *SHARED_BATCH, stop_at=10)
    # Two processes with 2 sequences a pass: each runs its share of 4 as 2 passes (one process ran 2 of 4).
    proc = torchrun(out, data_dir, "--resume", "--stop-at", "20", settings=["micro_batch_size=2"])
    assert proc.returncode == 0, torchrun_failure(proc)
    assert last_step(out) == 20
    assert json.loads((out / "config.json").read_text())["run"]["passes_per_step"] == 2
    assert main(["train", "--out", str(out), "--resume", "--stop-at", "30"]) == 0
    moved, straight = train_losses(out), train_losses(one_process_run)
    assert sorted(moved) == list(range(1, 31))
    assert [moved[s] for s in range(1, 31)] == pytest.approx([straight[s] for s in range(1, 31)], rel=1e-5)
    assert val_losses(out)[30] == pytest.approx(val_losses(one_process_run)[30], rel=1e-5)


def test_a_world_size_that_does_not_divide_the_global_batch_is_refused(data_dir, tmp_path, monkeypatch, capsys):
    """Refused before any process group is made, and said by every process (under torchrun a process 0 that
    lags behind the others is stopped before it could say it, so none stays silent)."""
    for name, value in {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "29599"}.items():
        monkeypatch.setenv(name, value)
    args = ["train", *[a for s in tiny_settings(data_dir, tmp_path / "r", *SHARED_BATCH) for a in ("--set", s)]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "batch_size x grad_accum_steps = 4 x 2 = 8 sequences, must be a multiple of the number of processes (3)" \
        in err and "\n" not in err
    for rank in ("1", "2"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert main(args) == 2
        assert capsys.readouterr().err.strip() == err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("env, says", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is 2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set: start the "
                          "processes with torchrun"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be a positive integer (torchrun sets it), got 'two'"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29599"},
     "RANK must be a whole number below WORLD_SIZE (2), got '2'"),
    ({"WORLD_SIZE": "2", "RANK": "\u00b2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29599"},
     "RANK must be a whole number below WORLD_SIZE (2), got '\u00b2'"),  # isdigit() but no int(): a traceback
])
def test_a_torchrun_environment_that_is_not_torchrun_s_is_one_line(data_dir, tmp_path, monkeypatch, capsys, env, says):
    """A WORLD_SIZE left exported in a shell would otherwise end in init_process_group's traceback."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["train", *[a for s in tiny_settings(data_dir, tmp_path / "r") for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tinygemma train: error: {says}") and "\n" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("rank", ["x", "1"])
def test_a_stray_rank_outside_torchrun_changes_nothing(data_dir, tmp_path, monkeypatch, capsys, rank):
    """A RANK left exported without WORLD_SIZE: "x" trained the whole run, then ended in int()'s traceback; "1"
    dropped the summary line. Outside torchrun the process is process 0, whatever RANK says."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", rank)
    assert main(["train", *[a for s in tiny_settings(data_dir, tmp_path / "r", "max_steps=2", "warmup_steps=1")
                                                for a in ("--set", s)]]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2  # the summary


def test_activation_checkpointing_changes_no_number(straight_run, data_dir, tmp_path, monkeypatch):
    """The same losses, and the blocks really recomputed: each block's MLP runs twice with gradients on per
    micro-step, once in the forward and once in backward (equal losses alone passed with the setting ignored)."""
    from tinygemma.model import MLP

    calls = []
    forward = MLP.forward
    monkeypatch.setattr(MLP, "forward", lambda self, x: calls.append(torch.is_grad_enabled()) or forward(self, x))
    run(data_dir, tmp_path / "plain", stop_at=3)
    plain, calls[:] = sum(calls), []
    out = tmp_path / "recompute"
    run(data_dir, out, "activation_checkpointing=true", stop_at=3)
    assert plain > 0 and sum(calls) == 2 * plain
    assert [train_losses(out)[s] for s in (1, 2, 3)] == [train_losses(straight_run)[s] for s in (1, 2, 3)]


def test_a_special_token_past_the_text_needs_no_model_row(data_dir, tmp_path, stories_dir):
    """Gemma 3's tokenizer.json holds <image_soft_token> past gemma-3-270m's rows; a run on data it prepared may
    have that shape (train refused what generate, eval and export accept), and the data's ids are still checked."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    backend.add_special_tokens(["<image_soft_token>"])
    (tmp_path / "tokenizer.json").write_text(backend.to_str())
    data = tmp_path / "data"
    prepare(data, sources=[stories_dir / "train.txt"], tokenizer=str(tmp_path / "tokenizer.json"), limit=300,
            val_fraction=0.1, workers=1, progress=False)
    assert open_prepared(data).vocab_size == 513 and open_prepared(data).tokenizer().model_vocab_size == 512
    run(data, tmp_path / "run", "model.vocab_size=512", "max_steps=2", "warmup_steps=0")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["vocab_size"] == 512
    with pytest.raises(tinygemma.UserError, match="cannot hold the data's tokens"):
        run(data, tmp_path / "small", "model.vocab_size=511", "max_steps=2", "warmup_steps=0")


def test_samples_keep_no_weight_copy_and_the_api_checks_generate_as_the_cli(data_dir, tmp_path, monkeypatch):
    """A sample made a decode plan (a copy of every linear weight, for a float32 model) that stayed cached through
    the steps after it; it is dropped once the samples are made. train() from Python refuses the [generate] that
    the command line refuses (a seed of -1 was trained and recorded, for the model card to stumble on)."""
    import tinygemma.decode as decode
    import tinygemma.train as train_module

    held, step = [], train_module.Trainer.step
    monkeypatch.setattr(train_module.Trainer, "step",
                        lambda self, s: held.append(self.raw in decode._PLANS) or step(self, s))
    run(data_dir, tmp_path / "run", "max_steps=8", "sample_interval=2", "generate.max_new_tokens=3")
    assert len(held) == 8 and not any(held)
    with pytest.raises(tinygemma.UserError, match="generate.seed must be an integer from 0"):
        run(data_dir, tmp_path / "bad", "generate.seed=-1")
    assert not (tmp_path / "bad").exists()


def test_train_checks_a_recipe_changed_after_it_was_made_and_leaves_it_as_it_was(data_dir, tmp_path):
    """A notebook sets fields on a Recipe after load_recipe checked it: max_steps below the warmup trained a run
    whose report, export and resume then failed; a Path as train.out ended in a JSON TypeError; a prompt given as
    a string was sampled a character at a time. train() takes a checked copy, and the recipe stays as set."""
    recipe = load_recipe(None, tiny_settings(data_dir, tmp_path / "a", "max_steps=4", "warmup_steps=2"))
    recipe.train.max_steps = 1
    with pytest.raises(tinygemma.UserError, match=r"train.warmup_steps \(2\) must not exceed train.max_steps \(1\)"):
        train(recipe, quiet=True)
    assert not (tmp_path / "a").exists()
    recipe.train.max_steps, recipe.out, recipe.data.dir = 4, tmp_path / "a", Path(data_dir)
    recipe.generate.prompts = "Once upon"
    recipe.train.sample_interval, recipe.generate.max_new_tokens = 4, 3
    assert train(recipe, quiet=True)["step"] == 4
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["out"] == str(tmp_path / "a")
    assert len(next(r["samples"] for r in metrics(tmp_path / "a") if "samples" in r)) == 1  # one prompt
    assert recipe.generate.prompts == "Once upon" and isinstance(recipe.out, Path)  # the caller's, untouched


def test_samples_during_training_change_no_number(data_dir, straight_run, tmp_path, capsys):
    """sample_interval = N continues [generate]'s prompts every N steps (rank 0), printed and kept in
    metrics.jsonl, with their own seeded generators: the training numbers stay those of a run without them.
    Prompts that cannot be sampled are refused before training; so is FSDP's sharded model."""
    out = tmp_path / "run"
    recipe = load_recipe(None, tiny_settings(data_dir, out, "sample_interval=20", "generate.max_new_tokens=6",
                                             'generate.prompts=["Once upon a time", "Tom had"]'))
    train(recipe, quiet=False)
    printed = capsys.readouterr().out
    samples = [r for r in metrics(out) if "samples" in r]
    assert [r["step"] for r in samples] == [20, 40] and all(len(r["samples"]) == 2 for r in samples)
    assert samples[-1]["samples"][0] in printed and "step 40 sample 1: Once upon a time" in printed
    assert train_losses(out) == train_losses(straight_run) and val_losses(out) == val_losses(straight_run)
    # Prompt i from seed + i, as `run` samples: step 40's are generate_text's from the step-40 checkpoint.
    from tinygemma.generate import generate_text

    model, g = tinygemma.load(out / "checkpoints" / "step_000040"), recipe.generate
    assert samples[-1]["samples"] == [prompt + generate_text(model, open_prepared(data_dir).tokenizer(), prompt,
                                                             6, seed=g.seed + i, **g.sampling())[0][0]
                                      for i, prompt in enumerate(g.prompts)]
    report = (out / "report.md").read_text()  # the newest samples, on the run's page
    assert "While training, at step 40 (train.sample_interval)" in report and samples[-1]["samples"][1] in report
    again = tmp_path / "again"  # the same seeds: the same stories
    train(load_recipe(None, tiny_settings(data_dir, again, "sample_interval=20", "generate.max_new_tokens=6",
                                          'generate.prompts=["Once upon a time", "Tom had"]')), quiet=True)
    assert [r for r in metrics(again) if "samples" in r] == samples
    resumed = tmp_path / "resumed"  # cut at step 20 and resumed: the samples before the checkpoint stay
    settings = tiny_settings(data_dir, resumed, "sample_interval=20", "generate.max_new_tokens=6",
                             'generate.prompts=["Once upon a time", "Tom had"]')
    train(load_recipe(None, settings), stop_at=20, quiet=True)
    train(load_recipe(None, settings), resume=True, quiet=True)
    train(load_recipe(None, settings), resume=True, quiet=True)  # a finished run, run again: nothing lost
    assert [r for r in metrics(resumed) if "samples" in r] == samples
    # generate.stop: each sample ends before the first stop text it meets; the text before it is the same. (Two
    # characters from the longer sample, met there: what the other ends at, if anything, is read off its own text.)
    ends = [sample[len(prompt):] for sample, prompt in zip(samples[0]["samples"], recipe.generate.prompts)]
    stop = max(ends, key=len)[1:3]
    assert len(stop) == 2
    settings = tiny_settings(data_dir, tmp_path / "stopped", "sample_interval=20", "generate.max_new_tokens=6",
                             'generate.prompts=["Once upon a time", "Tom had"]', f"generate.stop={stop}")
    train(load_recipe(None, settings), stop_at=20, quiet=True)
    assert [r["samples"] for r in metrics(tmp_path / "stopped") if "samples" in r] == [
        [prompt + end.partition(stop)[0] for prompt, end in zip(recipe.generate.prompts, ends)]]
    with pytest.raises(tinygemma.UserError, match="generate.max_new_tokens 4000 leaves no room"):
        run(data_dir, tmp_path / "bad", "sample_interval=20", "generate.max_new_tokens=4000")
    # (a prompt whose tokens and 2040 new ones pass the 2,048 positions was refused here: the samples read at most
    # the 32-token block, no position past it, and sample it now, as test_pipeline's run does)
    with pytest.raises(tinygemma.UserError, match="sample_interval"):
        run(data_dir, tmp_path / "bad", "sample_interval=-1")
    assert not (tmp_path / "bad").exists()


def test_keep_checkpoints_keeps_the_newest_and_the_best(data_dir, tmp_path, capsys):
    """keep_checkpoints = N keeps the newest N checkpoints (and the best, wherever it is), for eval, generate and
    export of the run at several points; 1 (the default) the last alone. A resume with fewer prunes at its start."""
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    settings = ["max_steps=14", "warmup_steps=2", "checkpoint_interval=2", "eval_interval=2"]
    run(data_dir, out, *settings, "keep_checkpoints=3", stop_at=12)
    best = json.loads((ckpts / "best.json").read_text())["dir"]
    newest = {"step_000008", "step_000010", "step_000012"}
    assert sorted(p.name for p in ckpts.glob("step_*")) == sorted(newest | {best})
    assert tinygemma.load(ckpts / "step_000008").config.n_layers == 2  # each a whole checkpoint
    # At its start: a resume that fails before its first checkpoint (its first update blows up) has pruned
    with pytest.raises(tinygemma.UserError, match="non-finite"):
        run(data_dir, out, *settings, "keep_checkpoints=1", "learning_rate=1e9", "min_lr=1e8", resume=True)
    assert sorted(p.name for p in ckpts.glob("step_*")) == sorted({"step_000012", best})
    assert "are deleted now" in capsys.readouterr().err
    run(data_dir, out, *settings, "keep_checkpoints=1", resume=True)
    best = json.loads((ckpts / "best.json").read_text())["dir"]
    assert sorted(p.name for p in ckpts.glob("step_*")) == sorted({best, "step_000014"})
    assert "keep_checkpoints 3 -> 1" in capsys.readouterr().err  # said, not silent
    # A finished run run again with a lower keep_checkpoints (a recipe's default) trains nothing: deletes nothing
    again = tmp_path / "again"
    run(data_dir, again, *settings, "keep_checkpoints=3")
    kept = sorted(p.name for p in (again / "checkpoints").glob("step_*"))
    capsys.readouterr()
    for stop_at in (None, 4):  # (finished; a --stop-at passed long ago)
        run(data_dir, again, *settings, resume=True, stop_at=stop_at)
        assert sorted(p.name for p in (again / "checkpoints").glob("step_*")) == kept and len(kept) >= 3
        assert "deleted now" not in capsys.readouterr().err  # nor said to be
    with pytest.raises(tinygemma.UserError, match="train.keep_checkpoints must be an integer >= 1"):
        run(data_dir, tmp_path / "none", "keep_checkpoints=0")


def test_a_wsd_run_keeping_several_keeps_its_last_checkpoint_before_the_cooldown(data_dir, tmp_path):
    """The speedrun keeps 3 so that a run found short at its end still extends from its last checkpoint before the
    cooldown; a --stop-at checkpoint among the newest pushed that one out (14, 16, 20 kept of 4, 8, 12, 14, 16,
    20, the cooldown starting after 12), and the run could no longer be extended. It is kept besides them."""
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    settings = ["max_steps=20", "warmup_steps=2", "checkpoint_interval=4", "eval_interval=4", "keep_checkpoints=3",
                "lr_schedule=wsd", "cooldown_fraction=0.4"]
    run(data_dir, out, *settings, stop_at=14)
    run(data_dir, out, *settings, resume=True)
    best = json.loads((ckpts / "best.json").read_text())["dir"]
    assert best != "step_000012"
    assert sorted(p.name for p in ckpts.glob("step_*")) == sorted(
        {"step_000012", "step_000014", "step_000016", "step_000020", best})
    kept = sorted(p.name for p in ckpts.glob("step_*"))
    default = [setting for setting in settings if not setting.startswith("keep_checkpoints")]
    run(data_dir, out, *default, resume=True)  # finished, run again with the default keep_checkpoints (1)
    assert sorted(p.name for p in ckpts.glob("step_*")) == kept  # deletes none the run kept
    assert main(["train", "--resume-from", str(ckpts / "step_000012"), "--out", str(tmp_path / "longer"),
                 "--max-steps", "30"]) == 0
    assert last_step(tmp_path / "longer") == 30


def test_data_and_model_mismatches_are_refused(data_dir, tmp_path):
    with pytest.raises(tinygemma.UserError, match="cannot hold the data's tokens"):
        run(data_dir, tmp_path / "a", "model.vocab_size=100")
    val_tokens = len(open_prepared(data_dir).split("val"))
    with pytest.raises(tinygemma.UserError, match="fewer than one window"):
        run(data_dir, tmp_path / "b", f"block_size={val_tokens}", f"model.max_position_embeddings={val_tokens}")
    with pytest.raises(tinygemma.UserError, match="max_position_embeddings"):
        run(data_dir, tmp_path / "c", "block_size=4096")  # the preset's 2048 positions
    with pytest.raises(tinygemma.UserError, match="not a prepared dataset"):
        run(tmp_path, tmp_path / "d")
    assert not (tmp_path / "a").exists()  # refused before writing anything


def test_init_from_starts_a_new_run_from_a_run_or_its_export(straight_run, data_dir, stories_dir, tmp_path, capsys):
    """train.init_from: a new run starts from another's weights (a run folder: its best checkpoint; or that run's
    transformers export), with its own optimizer and schedule; the vocabulary padding of either side (a CUDA run's
    128) is no obstacle; a resume reads its own checkpoint, and needs the source no more."""
    best = json.loads((straight_run / "checkpoints" / "best.json").read_text())["step"]
    out = tmp_path / "from_run"
    capsys.readouterr()
    run(data_dir, out, "max_steps=4", f"init_from={straight_run}")
    assert val_losses(out)[0] == val_losses(straight_run)[best]  # the same weights on the same windows, exactly
    # The same data and seed: its first steps draw the windows the weights learned first; said, with the way out
    err = capsys.readouterr().err
    assert (f"warning: train.init_from: its weights trained {best:,} steps on this data with seed 1234, and "
            "windows depend on the seed and step alone: this run's steps 1 to 4 draw the windows those weights "
            "learned first, again. Set another train.seed") in err
    run(data_dir, tmp_path / "reseeded", "max_steps=1", "warmup_steps=0", "seed=7", f"init_from={straight_run}")
    assert "learned first" not in capsys.readouterr().err
    other = tmp_path / "other_data"  # the same seed on other stories: other windows, nothing to warn of
    prepare(other, sources=[stories_dir / "valid.txt"], tokenizer=str(data_dir / "tokenizer.json"), limit=300,
            val_fraction=0.1, workers=1, progress=False)
    train(load_recipe(None, tiny_settings(other, tmp_path / "elsewhere", "max_steps=1", "warmup_steps=0",
                                          f"init_from={straight_run}")), quiet=True)
    assert "learned first" not in capsys.readouterr().err
    lrs = {r["step"]: r["lr"] for r in metrics(out) if "lr" in r}
    assert lrs[1] == next(r["lr"] for r in metrics(straight_run) if r.get("step") == 1)  # the warmup's first rate
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["init_from"] == str(straight_run)  # as given, and the checkpoint it resolved to then,
    source = str((straight_run / "checkpoints" / f"step_{best:06d}").resolve())  # which the report names (the
    assert config["run"]["init_checkpoint"] == {"dir": source, "step": best}  # run's best may move on)
    report = (out / "report.md").read_text()
    assert f"| initial weights | `{source}` (train.init_from, step {best}), trained on from there |" in report
    assert f"--set train.init_from={source} " in report  # the Reproduce command
    assert main(["export", "--ckpt", str(out), "--out", str(tmp_path / "card")]) == 0  # those weights' license
    card = (tmp_path / "card" / "README.md").read_text()  # (google/gemma-3-270m's is Gemma's)
    assert "license: other" in card and "The license field says `other`: set it to those weights' license" in card

    export = tmp_path / "hf"
    assert main(["export", "--ckpt", str(straight_run), "--out", str(export)]) == 0
    bare = shutil.copytree(export, tmp_path / "bare")  # its tokenizer.json gone: the one its header records
    (bare / "tokenizer.json").unlink()
    check_initial_tokenizer(str(bare), bare, open_prepared(data_dir).tokenizer())  # the data's: taken
    with pytest.raises(tinygemma.UserError, match="was trained with another tokenizer than the data's \\(gpt2\\)"):
        check_initial_tokenizer(str(bare), bare, load_tokenizer("gpt2"))
    padded = tmp_path / "padded"
    capsys.readouterr()
    run(data_dir, padded, "max_steps=4", f"init_from={export}", "model.vocab_pad_multiple=100", stop_at=2)  # 600 rows
    assert val_losses(padded)[0] == pytest.approx(val_losses(straight_run)[best], rel=1e-6)
    # the export carries what decided its windows: the same warning as from its run
    assert f"warning: train.init_from: its weights trained {best:,} steps on this data" in capsys.readouterr().err
    assert json.loads((padded / "config.json").read_text())["model"]["vocab_pad_multiple"] == 100
    capsys.readouterr()
    assert main(["train", "--out", str(padded), "--resume", "--set", f"init_from={straight_run}"]) == 2
    assert "train.init_from cannot change on resume" in capsys.readouterr().err
    export.rename(tmp_path / "gone")
    assert main(["train", "--out", str(padded), "--resume"]) == 0 and last_step(padded) == 4
    assert f"| initial weights | `{export.resolve()}` (train.init_from)" in (padded / "report.md").read_text()
    unpadded = tmp_path / "unpadded"  # from the padded run's rows back to the vocabulary's own
    run(data_dir, unpadded, "max_steps=1", "warmup_steps=0", f"init_from={padded}")
    padded_best = json.loads((padded / "checkpoints" / "best.json").read_text())["step"]
    assert val_losses(unpadded)[0] == pytest.approx(val_losses(padded)[padded_best], rel=1e-6)


def test_init_from_a_transformers_folder_as_google_ships_gemma_3_270m(straight_run, stories_dir, tmp_path):
    """A folder transformers' save_pretrained wrote, whose tokenizer.json holds a special token past the model's
    rows (gemma-3-270m: <image_soft_token> at 262,144 of 262,144 rows): refused until the model's vocab_size is
    set to the weights' own, then trained on from those exact weights."""
    from tokenizers import AddedToken, Tokenizer

    from tinygemma.hf import to_transformers

    folder = tmp_path / "gemma"
    to_transformers(tinygemma.load(straight_run)).save_pretrained(folder)
    tokenizer = Tokenizer.from_file(str(next((straight_run / "checkpoints").glob("step_*/tokenizer.json"))))
    tokenizer.add_special_tokens([AddedToken("<image_soft_token>", special=True)])  # id 512
    tokenizer.save(str(folder / "tokenizer.json"))
    data = tmp_path / "data"
    prepare(data, sources=[stories_dir / "train.txt"], tokenizer=str(folder / "tokenizer.json"), limit=600,
            val_fraction=0.1, workers=1, progress=False)  # the straight run's stories, in the same ids
    with pytest.raises(tinygemma.UserError, match=r"\(vocab_size 512 where the recipe has 513\): configure its "
                                                  r"model: --set model.vocab_size=512$"):
        run(data, tmp_path / "r", "max_steps=1", "warmup_steps=0", f"init_from={folder}")
    run(data, tmp_path / "r", "max_steps=1", "warmup_steps=0", f"init_from={folder}", "model.vocab_size=512")
    best = json.loads((straight_run / "checkpoints" / "best.json").read_text())["step"]
    assert val_losses(tmp_path / "r")[0] == pytest.approx(val_losses(straight_run)[best], rel=1e-6)


def test_init_from_compares_the_layers_not_the_pattern_an_export_wrote_for_them():
    """An export of a model with fewer layers than its pattern writes the least pattern that gives its layers (3
    for two sliding layers): the same layers, so no difference to refuse."""
    from tinygemma.train import check_initial_model

    want = tinygemma.ModelConfig.preset("gemma3-tiny", n_layers=2, sliding_window_pattern=6)
    have = dataclasses.replace(want, sliding_window_pattern=3)
    assert have.layer_types == want.layer_types
    check_initial_model("hf", have, want)  # no refusal
    with pytest.raises(tinygemma.UserError, match="sliding_window_pattern 2 where the recipe has 6"):
        check_initial_model("hf", dataclasses.replace(want, sliding_window_pattern=2, layer_types=None), want)


def test_init_from_refuses_weights_the_run_cannot_take(straight_run, data_dir, stories_dir, tmp_path):
    """Another model or another tokenizer is refused before anything is written, naming what to set."""
    with pytest.raises(tinygemma.UserError, match="checkpoint not found"):
        run(data_dir, tmp_path / "a", f"init_from={tmp_path / 'none'}")
    with pytest.raises(tinygemma.UserError, match=r"n_layers 2 where the recipe has 3\): configure its model: "
                                                  r"--set model.n_layers=2$"):
        run(data_dir, tmp_path / "a", f"init_from={straight_run}", "model.n_layers=3")
    other = tmp_path / "other_bpe"  # as many tokens (512), learnt from other stories: other ids
    prepare(other, sources=[stories_dir / "valid.txt"], tokenizer="bpe", vocab_size=512, limit=200,
            val_fraction=0.1, workers=1, progress=False)
    with pytest.raises(tinygemma.UserError, match="its token ids would mean other text"):
        run(other, tmp_path / "a", f"init_from={straight_run}")
    with pytest.raises(tinygemma.UserError, match="train.init_from must name"):
        TrainConfig(init_from=" ")  # (--set init_from= is none)
    model = tinygemma.load(straight_run)
    save_model(model, tmp_path / "bare")  # no tokenizer: which ids its weights learnt is not known
    with pytest.raises(tinygemma.UserError, match="copy the tokenizer.json they were trained with into"):
        run(data_dir, tmp_path / "a", f"init_from={tmp_path / 'bare'}")
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    save_model(model, tmp_path / "nan", {"tokenizer": open_prepared(data_dir).tokenizer().save(tmp_path / "nan")})
    with pytest.raises(tinygemma.UserError, match="its layers.0.mlp.up_proj.weight holds NaN or inf"):
        run(data_dir, tmp_path / "a", f"init_from={tmp_path / 'nan'}")
    assert not (tmp_path / "a").exists()


def test_cli_refuses_bad_settings_in_one_line(data_dir, tmp_path, capsys):
    for setting, message in [("nonsense=1", "unknown setting train.nonsense"),
                              ("batch_size=two", "train.batch_size must be an integer"),
                              ("min_lr=1", "min_lr"), ("model.preset=gpt5", "unknown model preset"),
                              ("micro_batch_size=many", "micro_batch_size must be auto or a positive integer"),
                              ("micro_batch_size=3", "train.micro_batch_size (3) must divide each process's share")]:
        assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--set", setting]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def test_on_a_terminal_the_log_lines_still_go_to_stdout_above_the_progress_bar(data_dir, tmp_path, monkeypatch,
                                                                               capsys):
    """With stderr a terminal, the bar replaced the log lines: `train ... | tee train.log` kept no loss, lr, grad
    norm, tok/s or MFU line, and the terminal showed only the bar's loss and tok/s. The lines are written in any
    case, through the bar (which clears itself, writes them to stdout and redraws on stderr)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(load_recipe(None, tiny_settings(data_dir, tmp_path / "run", "max_steps=4", "log_interval=2")))
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("step ") and "tok/s" in line]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"] and all("lr " in line for line in lines), captured.out
    assert "4/4" in captured.err and "it/s" not in captured.out  # the bar is on stderr, and only there


def slow_reads(monkeypatch, seconds: float) -> None:
    """The trainer's reads of its on-device figures take `seconds` longer, as a GPU's wait at the read would."""
    real_read, tolist, reading = tinygemma.train.Trainer.read, torch.Tensor.tolist, []

    def read(self):
        reading.append(True)
        try:
            return real_read(self)
        finally:
            reading.pop()

    def slow_tolist(tensor):
        if reading:
            time.sleep(seconds)
        return tolist(tensor)

    monkeypatch.setattr(tinygemma.train.Trainer, "read", read)
    monkeypatch.setattr(torch.Tensor, "tolist", slow_tolist)


def test_log_lines_rate_is_the_intervals_wall_clock_and_their_mfu_is_at_that_rate(data_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    """The log line's tok/s is its interval's tokens over its wall-clock time: the steps' own time and the wait
    for the device at the read (here made 0.3 s long, as a GPU the host waits for), leaving out this invocation's
    first step (which compiles) unless the line holds nothing else. That rate and the MFU at it go into the
    line's record; the steps between lines get no rate (one step's host time says nothing on a GPU), and the
    waits count in elapsed_s."""
    monkeypatch.setattr(tinygemma.train, "peak_flops", lambda device: 1e9)  # a made-up peak, so that MFU is shown
    slow_reads(monkeypatch, 0.3)
    out = tmp_path / "run"
    started = time.perf_counter()
    summary = train(load_recipe(None, tiny_settings(data_dir, out, "max_steps=5", "warmup_steps=1",
                                                     "log_interval=2", "eval_interval=100")))
    wall = time.perf_counter() - started
    output = capsys.readouterr().out.splitlines()
    assert output[0].startswith("training ") and "torch.compile" not in output[0]  # eager, as a CPU runs by default
    assert "not compiled" not in output[0]  # (said only where auto would compile but cannot: a Pascal GPU)
    assert json.loads((out / "config.json").read_text())["run"]["compiled"] is False
    lines = [line for line in output if line.startswith("step ") and "tok/s" in line]
    records = [r for r in metrics(out) if "train_loss" in r]
    assert len(lines) == 3 and [("tokens_per_s" in r) for r in records] == [False, True, False, True, True]
    config = json.loads((out / "config.json").read_text())["model"]
    config.pop("preset")
    flops_per_token = tinygemma.ModelConfig(**config).flops_per_token(32)
    for line, record, steps in zip(lines, [records[1], records[3], records[4]], (1, 2, 1)):  # 1: step 1 left out
        shown = float(line.split(" tok/s")[0].rsplit("| ", 1)[1].replace(",", ""))
        assert shown == pytest.approx(record["tokens_per_s"], abs=0.51)  # printed to the unit
        assert record["tokens_per_s"] < steps * 256 / 0.3  # the read's wait is in the interval's time
        assert record["mfu"] == pytest.approx(flops_per_token * record["tokens_per_s"] / 1e9, rel=1e-9)
        assert float(line.split("mfu ")[1].split("%")[0]) == pytest.approx(100 * record["mfu"], abs=0.051)
    assert 3 * 0.3 < summary["elapsed_s"] < wall  # the three reads' waits, and no more than the whole run


def test_the_logged_validation_loss_and_bits_per_byte_are_their_definitions(straight_run, data_dir):
    """Step 40's val_loss and val_bpb, recomputed here from the step-40 checkpoint: eval_batches (4) global batches
    (8) of 32-token windows spread evenly over the validation split, each window's 32 next-token losses; bits per
    byte the losses of the tokens that stand for text (not end-of-text) over the UTF-8 bytes of those tokens."""
    data = open_prepared(data_dir)
    val = np.asarray(data.split("val")).astype(np.int64)
    starts = np.linspace(0, len(val) - 32 - 1, 4 * 8).round().astype(np.int64)
    model = tinygemma.load(straight_run / "checkpoints" / "step_000040").float()
    x = torch.from_numpy(np.stack([val[s : s + 32] for s in starts]))
    y = torch.from_numpy(np.stack([val[s + 1 : s + 33] for s in starts]))
    with torch.no_grad():
        nats = torch.nn.functional.cross_entropy(model(x).double().transpose(1, 2), y, reduction="none")
    text_bytes = torch.from_numpy(token_byte_lengths(data.tokenizer(), 512))[y].double()
    bpb = (nats * (text_bytes > 0)).sum() / math.log(2) / text_bytes.sum()
    logged = next(r for r in metrics(straight_run) if r["step"] == 40 and "val_loss" in r)
    assert logged["val_loss"] == pytest.approx(nats.mean().item(), rel=1e-6)
    assert logged["val_bpb"] == pytest.approx(bpb.item(), rel=1e-6)


def test_resuming_a_run_an_older_schedule_trained_says_so(data_dir, tmp_path, capsys):
    """Before 2026-12-03 the cosine decay (and wsd's cooldown) ran one step earlier, and no checkpoint records
    which schedule it took: resuming such a run went on with this version's rates in silence. The rate logged at
    the checkpoint's step tells: where it is not this version's, the resume says so (and so does --dry-run)."""
    out = tmp_path / "run"
    run(data_dir, out, stop_at=30)
    run(data_dir, out, resume=True, stop_at=35)  # this version's own run: no such warning
    assert "older tinygemma" not in capsys.readouterr().err
    cfg = load_recipe(None, tiny_settings(data_dir, out)).train
    floor = cfg.min_lr / cfg.learning_rate
    old = cfg.learning_rate * (floor + 0.5 * (1 + math.cos(math.pi * (34 - 4) / (40 - 4))) * (1 - floor))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    at = next(i for i, r in enumerate(records) if r["step"] == 35 and "lr" in r)
    assert records[at]["lr"] == learning_rate(34, cfg) != pytest.approx(old, rel=1e-6)
    lines[at] = json.dumps({**records[at], "lr": old})  # as the schedule before 2026-12-03 logged step 35
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["train", "--out", str(out), "--resume", "--dry-run"]) == 0
    assert "learning rate logged at step 35" in capsys.readouterr().err
    run(data_dir, out, resume=True)
    err = capsys.readouterr().err
    assert "learning rate logged at step 35" in err and "older tinygemma" in err and last_step(out) == 40


def test_the_eta_counts_evaluations_and_ends_with_this_invocation(data_dir, tmp_path, monkeypatch, capsys):
    """The log line's ETA was the schedule's steps left at the interval's rate: it left out evaluations (here one
    made 1.5 s long) and checkpoints, and under --stop-at it counted to max_steps, not to where this invocation
    stops. It is now the steps left to this invocation's end at the time each step has taken since the first,
    evaluations included."""
    import tinygemma.train as train_module

    real, calls = train_module.evaluate_windows, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # step 2's evaluation (step 0's is before the ETA's clock starts)
            time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_windows", evaluate)

    def etas(name, *settings, **kwargs) -> dict[int, int]:
        train(load_recipe(None, tiny_settings(data_dir, tmp_path / name, *settings)), **kwargs)
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ") and "eta " in line]
        minutes_seconds = [line.rsplit("eta ", 1)[1].split("m") for line in lines]
        return {int(line.split()[1].split("/")[0]): 60 * int(m) + int(sec.rstrip("s"))
                for line, (m, sec) in zip(lines, minutes_seconds)}

    eta = etas("slow-eval", "max_steps=8", "eval_interval=2", "log_interval=4", "checkpoint_interval=0")
    assert 1 <= eta[4] <= 15, eta  # 4 steps left at >= 1.5 s / 3 steps each; the steps alone take milliseconds
    calls.clear()
    eta = etas("stopped", "max_steps=100000", "eval_interval=0", "log_interval=2", "checkpoint_interval=0", stop_at=2)
    assert eta == {2: 0}  # this invocation ends at step 2, not at the schedule's 100,000


def test_a_micro_batch_size_splits_the_step_without_changing_its_numbers(straight_run, data_dir, tmp_path):
    """8 sequences a step as 4 passes of 2: the same windows, so the losses of the straight run (8 in one pass)
    up to float summation; config.json says how the step was split."""
    out = tmp_path / "micro"
    run(data_dir, out, "micro_batch_size=2", stop_at=6)
    run_config = json.loads((out / "config.json").read_text())["run"]
    assert (run_config["micro_batch_size"], run_config["passes_per_step"], run_config["global_batch"]) == (2, 4, 8)
    micro, straight = train_losses(out), train_losses(straight_run)
    assert [micro[s] for s in range(1, 7)] == pytest.approx([straight[s] for s in range(1, 7)], rel=1e-5)
    assert val_losses(out)[0] == pytest.approx(val_losses(straight_run)[0], rel=1e-6)


def test_a_run_lets_its_model_and_optimizer_go_before_it_destroys_the_process_group(data_dir, tmp_path, monkeypatch):
    """close() frees the model and the optimizer itself, before destroy_process_group, even though the run is
    still held by reference cycles (the collector is off here): DDP's reducer holds the process group, and a group
    freed at interpreter shutdown aborted a finished two-process run ("terminate called without an active
    exception"). Under world_size 1 the group is faked as owned, and its destruction recorded. torch 2.6's
    state_dict cache of every model it saw (pytorch#149100) is put back, so that its clearing is checked too."""
    import dataclasses
    import functools
    import gc
    import weakref

    import torch.distributed.checkpoint.state_dict as state_dict

    if not hasattr(state_dict._get_fqns, "cache_clear"):  # (torch 2.6's has its own)
        monkeypatch.setattr(state_dict, "_get_fqns", functools.cache(state_dict._get_fqns))

    import tinygemma.train as train_module

    refs, at_destroy = [], []
    real_init, real_optimizer, real_setup = (train_module.init_model, train_module.configure_optimizer,
                                             train_module.setup_runtime)

    def kept(make):
        def wrapper(*args, **kwargs):
            made = make(*args, **kwargs)
            refs.append(weakref.ref(made))
            return made
        return wrapper

    monkeypatch.setattr(train_module, "init_model", kept(real_init))
    monkeypatch.setattr(train_module, "configure_optimizer", kept(real_optimizer))
    monkeypatch.setattr(train_module, "setup_runtime",
                        lambda *a: dataclasses.replace(real_setup(*a), owns_process_group=True))
    monkeypatch.setattr(train_module.dist, "destroy_process_group",
                        lambda: at_destroy.append([ref() is None for ref in refs]))
    gc.disable()
    try:
        run(data_dir, tmp_path / "released", "max_steps=6", "warmup_steps=1", "eval_interval=3")
    finally:
        gc.enable()
    assert len(refs) == 2 and at_destroy == [[True, True]]


def test_losses_stay_on_the_device_until_log_intervals_evaluations_and_checkpoints(data_dir, tmp_path,
                                                                                   monkeypatch):
    """A step's loss and gradient norm are tensors in its record; the records are read (one transfer for all of
    them) only at log intervals, before each evaluation and checkpoint, and at the end, and then written to
    metrics.jsonl exactly as before."""
    import tinygemma.train as train_module

    reads, steps = [], []
    real_read, real_step = train_module.Trainer.read, train_module.Trainer.step

    def read(self):
        reads.append([r["step"] for r in self.pending])
        return real_read(self)

    def step(self, step):
        record = real_step(self, step)
        steps.append((type(record["train_loss"]), type(record["grad_norm"])))
        return record

    monkeypatch.setattr(train_module.Trainer, "read", read)
    monkeypatch.setattr(train_module.Trainer, "step", step)
    out = tmp_path / "reads"
    run(data_dir, out, "max_steps=13", "log_interval=4", "eval_interval=6", "checkpoint_interval=5")
    assert set(steps) == {(torch.Tensor, torch.Tensor)}
    # Log lines at 4, 8, 12 and the end (13); evaluations at 6, 12, at the checkpoints 5, 10, and at the end.
    assert [r for r in reads if r] == [[1, 2, 3, 4], [5], [6], [7, 8], [9, 10], [11, 12], [13]]
    records = [r for r in metrics(out) if "train_loss" in r]
    assert [r["step"] for r in records] == list(range(1, 14))
    assert all(isinstance(r["train_loss"], float) and math.isfinite(r["grad_norm"]) for r in records)


def test_profiled_steps_count_their_profiling_in_the_log_lines_wall_clock(data_dir, tmp_path, monkeypatch):
    """The profiler's waits and the writing of its files are part of the profiled steps' time (here the writing is
    made 0.5 s long), so the log line over them never shows a rate the run did not have."""
    from tinygemma.profiling import StepProfiler

    real_write = StepProfiler.write

    def slow_write(self, wall_s):
        time.sleep(0.5)
        return real_write(self, wall_s)

    monkeypatch.setattr(StepProfiler, "write", slow_write)
    out = tmp_path / "profiled"
    summary = train(load_recipe(None, tiny_settings(data_dir, out, "max_steps=4", "log_interval=4",
                                                     "eval_interval=100")), quiet=True, profile="2:3")
    tokens_per_step = json.loads((out / "config.json").read_text())["run"]["tokens_per_step"]
    line = [r for r in metrics(out) if "tokens_per_s" in r]
    assert [r["step"] for r in line] == [4]  # steps 2 to 4 (step 1, which compiles, is left out)
    assert line[0]["tokens_per_s"] < 3 * tokens_per_step / 0.5 and summary["elapsed_s"] > 0.5


def test_profile_writes_a_trace_and_an_operator_table(data_dir, tmp_path, capsys, monkeypatch):
    def args(out):
        return ["train", *[a for s in tiny_settings(data_dir, out, "max_steps=4") for a in ("--set", s)]]

    out = tmp_path / "profiled"
    assert main([*args(out), "--profile", "2:3"]) == 0
    trace = json.loads((out / "profile" / "trace.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any(name.startswith("aten::mm") for name in names)  # the model's matrix products were traced
    summary = (out / "profile" / "summary.txt").read_text()
    assert "optimizer steps 2 to 3 on cpu" in summary and "Self CPU" in summary and "aten::" in summary
    assert "operators sorted by self_cpu_time_total" in summary  # each operator's own time, not its callees'
    rows = [re.split(r"\s{2,}", line.strip()) for line in summary.splitlines() if line.strip().endswith(tuple("0123456789"))
            and "%" in line]
    shares = [float(row[1].rstrip("%")) for row in rows]  # the Self CPU % column, row by row
    assert len(shares) > 3 and shares == sorted(shares, reverse=True)
    figures = json.loads((out / "profile" / "profile.json").read_text())
    assert figures["first_step"] == 2 and figures["last_step"] == 3 and figures["wall_s"] > 0
    assert figures["device_activity"] is None and "device busy" not in summary  # a CPU has no kernels to count
    assert not [p for p in (out / "profile").iterdir() if p.name.startswith(".")]  # no temporary files left

    # A profile that cannot be written is a warning: the run trains on and ends as it would have.
    def broken(*args):
        raise ValueError("no trace")

    monkeypatch.setattr("tinygemma.profiling.device_activity", broken)
    assert main([*args(tmp_path / "unprofiled"), "--profile", "2:3"]) == 0
    assert "warning: the profile of steps 2 to 3 was not written: ValueError: no trace" in capsys.readouterr().err
    assert [r["step"] for r in metrics(tmp_path / "unprofiled") if "train_loss" in r] == [1, 2, 3, 4]
    for spec, message in [("3:2", "1 <= START <= END"), ("two", "START:END"), ("0:1", "1 <= START"),
                          ("3:9", "trains optimizer steps 1 to 4")]:
        assert main([*args(tmp_path / "bad"), "--profile", spec]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
        assert not (tmp_path / "bad").exists()
    assert main([*args(tmp_path / "bad"), "--profile", ""]) == 2  # (an unset shell variable: it profiled nothing)
    assert "--profile (profile) must be text such as \"20:25\" (START:END), got ''" in capsys.readouterr().err
    with pytest.raises(tinygemma.UserError, match="must be text such as"):  # the Python API's (a notebook's) too
        run(data_dir, tmp_path / "bad", profile="")
    assert not (tmp_path / "bad").exists()
    # An evaluation or a checkpoint between the profiled steps would be counted as their time and operators.
    for setting, message in [("eval_interval=2", "an evaluation comes after step 2"),
                             ("checkpoint_interval=3", "a checkpoint comes after step 3")]:
        assert main([*args(tmp_path / "bad"), "--set", setting, "--profile", "2:4"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and not (tmp_path / "bad").exists()


def count_graphs(monkeypatch, compiled_class) -> tuple[list, dict]:
    """Modules of `compiled_class` (Gemma3 under compile=true, Block under regional) compiled, with the trainer's
    options, by a backend that counts dynamo's graphs and runs them eagerly (where a GPU's is inductor):
    (graphs, after_step), the graphs' (nodes, symbolic sizes among their inputs) and how many there were at each
    step's end. A Trainer whose `churn` is set changes a value the graph depends on every step: the control that
    shows a recompiling run would be seen."""
    import torch.nn as nn

    import tinygemma.train as train_module

    graphs, after_step, real_step = [], {}, train_module.Trainer.step

    def counting_backend(gm, example_inputs):
        graphs.append((len(gm.graph.nodes), sum(isinstance(x, torch.SymInt) for x in example_inputs)))
        return gm.forward

    def step(self, step):
        if self.churn:
            self.raw.loss_chunk_size = 64 + step
        record = real_step(self, step)
        after_step[step + 1] = len(graphs)
        return record

    monkeypatch.setattr(compiled_class, "compile",
                        lambda self, **kw: nn.Module.compile(self, **kw, backend=counting_backend))
    monkeypatch.setattr(train_module.Trainer, "step", step)
    monkeypatch.setattr(train_module.Trainer, "churn", False, raising=False)
    return graphs, after_step


def test_the_first_log_line_says_why_a_gpu_trains_uncompiled(data_dir, tmp_path, monkeypatch, capsys):
    """Where `compile = auto` cannot compile (a GPU older than Triton's: parallelize.check_compile, tested there),
    the first log line says so, and config.json records the run as not compiled."""
    checked = []

    def pascal(cfg, rt):
        checked.append(cfg.compile)
        return "Tesla P100-PCIE-16GB is compute capability 6.0, and torch.compile's GPU code (Triton) needs 7.0"

    monkeypatch.setattr(tinygemma.train, "check_compile", pascal)
    out = tmp_path / "run"
    train(load_recipe(None, tiny_settings(data_dir, out, "max_steps=1", "warmup_steps=1", "eval_interval=100",
                                          "compile=auto")))
    first = capsys.readouterr().out.splitlines()[0]
    assert checked == ["auto"] and first.startswith("training ")
    assert first.endswith("; not compiled: Tesla P100-PCIE-16GB is compute capability 6.0, and torch.compile's GPU "
                          "code (Triton) needs 7.0")
    assert json.loads((out / "config.json").read_text())["run"]["compiled"] is False
    train(load_recipe(None, tiny_settings(data_dir, tmp_path / "off", "max_steps=1", "warmup_steps=1",
                                          "eval_interval=100", "compile=false")))
    assert "not compiled" not in capsys.readouterr().out.splitlines()[0]  # (asked for: nothing to explain)


def test_a_compiled_run_compiles_nothing_new_once_it_has_trained_and_evaluated(data_dir, tmp_path, monkeypatch,
                                                                              capsys):
    """A recompilation inside the steady state would cost a GPU run its speed without a word (each one minutes of
    inductor, then maybe a graph that lost its static shapes). With compile=true, dynamo's graphs are counted:
    the evaluation at step 0 compiles its graph and the first step training's (two passes of 3 sequences); later
    steps, evaluations and checkpoints compile nothing more. A control that changes a guarded attribute every step
    shows the count would grow."""
    import tinygemma.train as train_module
    from tinygemma.model import Gemma3

    graphs, after_step = count_graphs(monkeypatch, Gemma3)
    settings = ["compile=true", "batch_size=6", "micro_batch_size=3", "max_steps=9", "log_interval=3",
                "eval_interval=3", "checkpoint_interval=3", "eval_batches=1"]
    train(load_recipe(None, tiny_settings(data_dir, tmp_path / "compiled", *settings)))
    assert after_step == dict.fromkeys(range(1, 10), 2), graphs  # evaluation's graph and training's, no more
    assert sorted(train_losses(tmp_path / "compiled")) == list(range(1, 10))
    # The first log line warns of the first step's wait, and config.json says the run was compiled.
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("training ") and first.endswith("; torch.compile: the first step compiles the model "
                                                            "(a minute or more)")
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["run"]["compiled"] is True

    graphs.clear()
    monkeypatch.setattr(train_module.Trainer, "churn", True, raising=False)
    torch._dynamo.reset()
    run(data_dir, tmp_path / "churned", *settings)
    assert after_step[9] > after_step[4] > after_step[1]


def test_a_compiled_run_trained_in_chunks_in_one_process_compiles_once_and_lets_each_chunks_model_go(
        data_dir, tmp_path, monkeypatch):
    """The notebook trains in chunks, a train() call each in one Python process: the first chunk's graphs serve
    the later chunks (dynamo keeps them; the model's weights are the graph's inputs), and each chunk's model,
    with its weights, is freed when its train() returns (on a GPU, a model kept per chunk would fill it)."""
    import gc
    import weakref

    from tinygemma.model import Gemma3

    graphs, _ = count_graphs(monkeypatch, Gemma3)
    models, counted = [], Gemma3.compile
    monkeypatch.setattr(Gemma3, "compile", lambda self, **kw: models.append(weakref.ref(self)) or counted(self, **kw))
    recipe = load_recipe(None, tiny_settings(data_dir, tmp_path / "run", "compile=true", "batch_size=6",
                                             "micro_batch_size=3", "max_steps=6", "warmup_steps=1", "eval_interval=2",
                                             "eval_batches=1", "checkpoint_interval=2"))
    made = []
    for stop_at in (2, 4, 6):
        train(recipe, resume=True, stop_at=stop_at, quiet=True)
        gc.collect()
        made.append(len(graphs))
        assert len(models) == stop_at // 2 and all(model() is None for model in models)
    assert made == [2, 2, 2], graphs  # evaluation's graph and training's, in the first chunk alone


@pytest.mark.parametrize("compile_", ["true", "regional"])
def test_compiled_runs_in_a_process_at_other_shapes_compile_static_graphs_of_their_own(data_dir, tmp_path,
                                                                                        monkeypatch, compile_):
    """A notebook's runs at other block sizes, in one Python process: dynamo would compile the second one's
    shapes as symbolic sizes (it remembers those it compiled), and stop compiling at its limit of 8 graphs for a
    forward's code (the third regional run: 4 graphs each). Each run compiles static graphs of its own."""
    from tinygemma.model import Block, Gemma3

    graphs, _ = count_graphs(monkeypatch, Gemma3 if compile_ == "true" else Block)
    made = []
    for i, block_size in enumerate((32, 24, 20)):  # (each longer than the window of 16)
        run(data_dir, tmp_path / f"run{i}", f"compile={compile_}", f"block_size={block_size}", "batch_size=6",
            "micro_batch_size=3", "max_steps=2", "warmup_steps=1", "eval_interval=2", "eval_batches=1",
            "checkpoint_interval=0")
        made.append(len(graphs) - sum(made))
    assert made[0] >= 2 and made == [made[0]] * 3 and all(symbolic == 0 for _, symbolic in graphs), graphs


def test_a_regionally_compiled_run_trains_the_eager_runs_losses_with_a_few_graphs(data_dir, tmp_path, monkeypatch,
                                                                                  capsys):
    """compile = regional: each layer compiled on its own. Its graphs are made by step 0's evaluation and the
    first step, at most one per kind of layer and grad mode, and never again (the samples at step 3 decode
    eagerly: the compiled layers would trace their shapes too); the losses are the eager run's; the first log
    line says what compiles."""
    from tinygemma.model import Block

    graphs, after_step = count_graphs(monkeypatch, Block)
    settings = ["batch_size=6", "micro_batch_size=3", "max_steps=6", "log_interval=3", "eval_interval=3",
                "checkpoint_interval=3", "eval_batches=1", "sample_interval=3", "generate.max_new_tokens=4",
                'generate.prompts=["Once upon a time", "Tom had a big red"]']
    train(load_recipe(None, tiny_settings(data_dir, tmp_path / "regional", "compile=regional", *settings)))
    assert 2 <= after_step[1] <= 4 and set(after_step.values()) == {after_step[1]}, graphs
    assert [r["step"] for r in metrics(tmp_path / "regional") if "samples" in r] == [3, 6]
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("; torch.compile: the first step compiles each layer (regional)")
    run(data_dir, tmp_path / "eager", *settings)
    assert train_losses(tmp_path / "regional") == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-5)


def test_resume_refuses_data_of_another_tokenizer_and_a_stop_at_below_one(data_dir, stories_dir, tmp_path, capsys):
    """A resumed run continues only on data of the tokenizer it was trained with: another BPE of the same 512 ids
    (trained on other stories) would give each id a second meaning, so it is refused, naming both. --stop-at must
    name a step of 1 or more. Refusals leave the run as it was."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", stop_at=2)
    other = tmp_path / "other-bpe512"
    prepare(other, sources=[stories_dir / "valid.txt"], tokenizer="bpe", vocab_size=512, limit=300,
            val_fraction=0.1, workers=1, progress=False)
    assert open_prepared(other).tokenizer().identity != open_prepared(data_dir).tokenizer().identity
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(tinygemma.UserError, match=rf"{other} was prepared with tokenizer tokenizer\.json:\w+, but "
                                                  rf"the run was trained with tokenizer\.json:\w+ \(on {data_dir}\)"):
        run(other, out, "max_steps=4", "checkpoint_interval=2", resume=True)
    # Another vocabulary size makes the model differ too: the data is still what is named, not the model.
    smaller = tmp_path / "other-bpe384"
    prepare(smaller, sources=[stories_dir / "valid.txt"], tokenizer="bpe", vocab_size=384, limit=300,
            val_fraction=0.1, workers=1, progress=False)
    with pytest.raises(tinygemma.UserError, match=rf"{smaller} was prepared with tokenizer tokenizer\.json:\w+, "
                                                  "but the run was trained with"):
        run(smaller, out, "max_steps=4", "checkpoint_interval=2", resume=True)
    # A larger one, through `train --resume` (which takes the run's saved model, vocab_size included): the same.
    gpt2 = tmp_path / "gpt2"
    prepare(gpt2, sources=[stories_dir / "valid.txt"], limit=100, val_fraction=0.1, workers=1, progress=False)
    assert main(["train", "--out", str(out), "--resume", "--data", str(gpt2)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{gpt2} was prepared with tokenizer gpt2, but the run was trained with tokenizer.json:" in err, err
    # The way out it names: its stories prepared again with the run's own tokenizer, then resumed exactly there
    named = re.search(r"`tinygemma prepare --tokenizer (\S+)`", err).group(1)
    again = tmp_path / "again"
    prepare(again, sources=[stories_dir / "train.txt"], tokenizer=named, limit=600, val_fraction=0.1, workers=1,
            progress=False)
    copy = shutil.copytree(out, tmp_path / "copy")  # (this run is checked unchanged below)
    assert main(["train", "--out", str(copy), "--resume", "--data", str(again)]) == 0 and last_step(copy) == 4
    with pytest.raises(tinygemma.UserError, match="--stop-at \\(stop_at\\) must be an optimizer step of 1 or more, got -3"):
        run(data_dir, out, "max_steps=4", "checkpoint_interval=2", resume=True, stop_at=-3)
    # From Python, arguments of the wrong type (a TypeError from min() before, or "yes" taken as True)
    for kwargs, message in (({"stop_at": "2"}, "--stop-at (stop_at) must be an optimizer step of 1 or more, got '2'"),
                            ({"stop_at": 2.0}, "--stop-at (stop_at) must be an optimizer step of 1 or more, got 2.0"),
                            ({"stop_at": True}, "--stop-at (stop_at) must be an optimizer step of 1 or more, got True"),
                            ({"resume": "no"}, "--resume (resume) must be True or False, got 'no'"),
                            ({"profile": 5}, '--profile (profile) must be text such as "20:25" (START:END), got 5')):
        with pytest.raises(tinygemma.UserError, match=re.escape(message)):
            run(data_dir, out, "max_steps=4", "checkpoint_interval=2", **{"resume": True, **kwargs})
    with pytest.raises(tinygemma.UserError, match="recipe must be a Recipe .* got dict"):
        train({"train": {"max_steps": 4}})
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    # A --stop-at the run has passed trains nothing (the notebook's loop of chunks, run again after a restart).
    losses = train_losses(out)
    assert run(data_dir, out, "max_steps=4", "checkpoint_interval=2", resume=True, stop_at=1)["step"] == 2
    assert train_losses(out) == losses and last_step(out) == 2
    assert run(data_dir, out, "max_steps=4", "checkpoint_interval=2", resume=True)["step"] == 4


def test_resume_refuses_other_batches_and_names_other_rates(data_dir, tmp_path, capsys):
    """A resume that changes the run's batches (block_size, seed, or the global batch batch_size x
    grad_accum_steps) is refused, naming each, and leaves the run as it was: its windows and token counts would no
    longer be one run's (tokens went backwards). Another split of the same global batch is fine. A changed rate
    (a notebook's settings cell edited between sessions) trains on, with a warning naming old and new values."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=6", "checkpoint_interval=2", stop_at=2)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for change, named in ((["batch_size=4"], r"global batch 8 -> 4"), (["block_size=16"], r"block_size 32 -> 16"),
                          (["seed=7", "batch_size=16"], r"seed 1234 -> 7, global batch 8 -> 16")):
        with pytest.raises(tinygemma.UserError, match=rf"the run's batches cannot change on resume \({named};"):
            run(data_dir, out, "max_steps=6", "checkpoint_interval=2", *change, resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    capsys.readouterr()
    run(data_dir, out, "max_steps=6", "checkpoint_interval=2", "batch_size=4", "grad_accum_steps=2", resume=True,
        stop_at=4)
    assert "warning" not in capsys.readouterr().err
    # unwarned, but recorded (float summation differs): the report's Reproduce commands split the steps alike
    state = json.loads((out / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["invocations"][-1]["changed"] == {"batch_size": [8, 4], "grad_accum_steps": [1, 2]}
    split = tmp_path / "split"  # (a copy: the run goes on below)
    shutil.copytree(out, split)
    run(data_dir, split, "max_steps=6", "checkpoint_interval=2", "batch_size=4", "grad_accum_steps=2",
        "micro_batch_size=2", "distributed=fsdp", "loss_head=full", "attention_backend=sdpa", resume=True, stop_at=5)
    state = json.loads((split / "checkpoints" / "step_000005" / "trainer_state.json").read_text())
    # (distributed: no change on one process; test_config has it under torchrun). The loss head's and attention's
    # kernels round otherwise too: recorded, so that Reproduce is the run (it was one command with loss_head=full)
    assert state["invocations"][-1]["changed"] == {"micro_batch_size": ["auto", "2"], "loss_head": ["auto", "full"],
                                                   "attention_backend": ["auto", "sdpa"]}
    assert "warning" not in capsys.readouterr().err
    reproduce = (split / "report.md").read_text()  # its last part takes them; the first trains with the run's own
    assert "--resume --set train.micro_batch_size=2 --set train.loss_head=full --set train.attention_backend=sdpa " \
        "--stop-at 5\n" in reproduce and "loss_head=full --stop-at 2" not in reproduce
    capsys.readouterr()
    assert ("tinygemma train --out " + shlex.quote(str(out)) + " --resume --set train.batch_size=4 --set "
            "train.grad_accum_steps=2 --stop-at 4") in (out / "report.md").read_text()
    run(data_dir, out, "max_steps=6", "checkpoint_interval=2", "learning_rate=5e-3", "grad_clip=0.5",
        "eval_batches=2", resume=True)
    err = capsys.readouterr().err  # eval_batches: the validation set best.json compares earlier losses with
    assert ("tinygemma: warning: resuming at step 4 with settings other than the run's: learning_rate 0.01 -> 0.005, "
            "grad_clip 1.0 -> 0.5, eval_batches 4 -> 2; the steps from here take the new values; best.json will "
            "compare validation losses of other windows than the earlier ones") in err
    records = [r for r in metrics(out) if "train_loss" in r or "val_loss" in r]  # steps' and evaluations'
    assert [r["tokens"] for r in records] == [256 * r["step"] for r in records]  # 8 x 32 tokens a step, throughout

    # The run finished: another rate (a recipe edited, then `tinygemma run` again) trains no step, so it changes
    # nothing, says so, and the run's config.json (the report's recipe, what a later resume reads) keeps the
    # values its steps were trained with.
    saved = (out / "config.json").read_bytes()
    run(data_dir, out, "max_steps=6", "checkpoint_interval=2", "learning_rate=3e-3", "grad_clip=0.5",
        "eval_batches=2", resume=True)
    err = capsys.readouterr().err
    assert ("tinygemma: warning: the run is at step 6 of 6 with settings other than its own: learning_rate 0.005 -> "
            "0.003; no step is left to train, so they change nothing") in err, err
    assert (out / "config.json").read_bytes() == saved


@pytest.mark.parametrize("name,value", [
    ("learning_rate", 5e-3), ("min_lr", 1e-5), ("muon_learning_rate", 0.01), ("muon_backend", "bfloat16"),
    ("weight_decay", 0.05), ("beta1", 0.8), ("beta2", 0.99), ("adam_eps", 1e-6), ("grad_clip", 0.5),
    ("dtype", "bfloat16"), ("on_nonfinite", "skip"), ("activation_checkpointing", True), ("warmup_steps", 3),
    ("cooldown_fraction", 0.3), ("eval_batches", 2),
])
def test_every_setting_that_changes_the_steps_to_come_is_a_named_change_on_resume(name, value):
    """Each setting a resume may change and that changes the steps still to come is named in the resume's warning
    and in the invocation's record of changes (the report splits the run's reproduction there): one left out
    would make report.md's commands silently train other steps."""
    import dataclasses

    from tinygemma.train import check_resume_settings, settings_changes

    cfg = load_recipe(None, ["optimizer=muon", "lr_schedule=wsd", "max_steps=100", "warmup_steps=5"]).train
    saved = dataclasses.asdict(cfg)
    changed = dataclasses.replace(cfg, **{name: value})
    assert settings_changes(saved, changed) == {name: [saved[name], value]}
    assert f"{name} {saved[name]} -> {value}" in check_resume_settings(saved, changed, 10, None)


def test_settings_the_runs_optimizer_never_reads_are_no_change_on_resume():
    """Muon's rate and backend in an AdamW run were warned of as taking effect on resume, and recorded as a change
    (the report split the run's reproduction at it): AdamW never reads them. Under Muon they are changes."""
    import dataclasses

    from tinygemma.config import TrainConfig
    from tinygemma.train import settings_changes

    muon_settings = {"muon_learning_rate": 0.01, "muon_backend": "bfloat16"}
    saved = dataclasses.asdict(TrainConfig(optimizer="adamw"))
    assert settings_changes(saved, TrainConfig(optimizer="adamw", **muon_settings)) == {}
    assert settings_changes(saved, TrainConfig(optimizer="adamw", min_lr=1e-5)) == {"min_lr": [4e-4, 1e-5]}
    saved = dataclasses.asdict(TrainConfig(optimizer="muon"))
    assert settings_changes(saved, TrainConfig(optimizer="muon", **muon_settings)) == {
        "muon_learning_rate": [0.04, 0.01], "muon_backend": ["auto", "bfloat16"]}


def test_resume_in_another_precision_of_the_same_dtype_setting_is_warned_of(data_dir, tmp_path, capsys):
    """dtype = "auto" resolves by device: a run started on a CPU (float32) and resumed on a GPU
    (bfloat16) changed precision without a word, the setting being the same. The checkpoint records what the
    steps computed in, and a resume in another says so (here the record is edited: this machine has one CPU)."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", stop_at=2)
    state_file = out / "checkpoints" / "step_000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["precision"] == "float32"
    capsys.readouterr()
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", resume=True, stop_at=2)  # nothing to train
    state_file.write_text(json.dumps({**state, "precision": "bfloat16"}))
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", resume=True, stop_at=2)
    assert "warning" not in capsys.readouterr().err
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", resume=True)
    assert ("tinygemma: warning: resuming in float32 (dtype float32 on cpu), where the steps before it computed "
            "in bfloat16; the steps from here compute in float32") in capsys.readouterr().err


def test_the_muon_iteration_auto_chose_is_recorded_and_a_resume_that_chooses_another_warns(data_dir, tmp_path, capsys,
                                                                                          monkeypatch):
    """muon_backend = "auto" chooses Muon's iteration by machine (bfloat16 on a CPU with AVX-512 BF16, else
    float32), which round differently; config.json recorded only "auto", and a resume on a machine without it
    changed the iteration without a word. Each invocation records the one it ran, as config.json does, the
    report names each part's, and a resume that runs another one warns (its setting unchanged)."""
    import tinygemma.optim

    out, muon = tmp_path / "run", ("optimizer=muon", "max_steps=4", "checkpoint_interval=2")
    monkeypatch.setattr(tinygemma.optim, "cpu_has_bf16", lambda: True)
    run(data_dir, out, *muon, stop_at=2)
    assert json.loads((out / "config.json").read_text())["run"]["muon_backend"] == "bfloat16"
    monkeypatch.setattr(tinygemma.optim, "cpu_has_bf16", lambda: False)
    capsys.readouterr()
    run(data_dir, out, *muon, resume=True)
    assert ("tinygemma: warning: resuming with Muon's float32 iteration (muon_backend auto on cpu), where the "
            "steps before it took the bfloat16 one; the steps from here round otherwise") in capsys.readouterr().err
    state = json.loads((out / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert [part["muon_backend"] for part in state["invocations"]] == ["bfloat16", "float32"]
    assert json.loads((out / "config.json").read_text())["run"]["muon_backend"] == "float32"
    assert "| Muon iteration | steps 1 to 2: bfloat16; steps 3 to 4: float32 |" in (out / "report.md").read_text()
    # Asked for by name, a change of it is the change warned of among the settings; AdamW records none.
    run(data_dir, out, *muon, "max_steps=6", "muon_backend=bfloat16", resume=True)
    assert "resuming with Muon's" not in capsys.readouterr().err
    run(data_dir, tmp_path / "adamw", "max_steps=4")
    assert json.loads((tmp_path / "adamw" / "config.json").read_text())["run"]["muon_backend"] is None
    assert "Muon iteration" not in (tmp_path / "adamw" / "report.md").read_text()


def test_train_refuses_an_out_that_holds_something_else(data_dir, tmp_path, capsys):
    """--out is a new or empty folder, or a training run: a prepared dataset, a transformers export, any other
    folder or a file is refused in one line (exit 2) and left byte for byte as it was."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    (export / "model.safetensors").write_bytes(b"weights")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "config.json").write_text("{}")
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    cases = {data_dir: "is a prepared dataset", export: "is a Hugging Face export",
             other: "is a folder that holds no training run", a_file: "is a file", a_file / "run": "is a file, not a folder"}
    for out, phrase in cases.items():
        before = {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()} if out.exists() else {}
        args = [a for s in tiny_settings(data_dir, out, "max_steps=4") for a in ("--set", s)]
        assert main(["train", *args]) == 2, out
        err = capsys.readouterr().err
        assert phrase in err and err.count("\n") == 1, err
        assert before == ({p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()} if out.exists() else {})
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(data_dir, empty, "max_steps=4")["step"] == 4
    # A folder holding only training's own files is a run's: tb/ alone, where a tracker (wandb) failed to start
    # before config.json was written, and a temporary a kill left.
    crashed = tmp_path / "crashed"
    (crashed / "tb").mkdir(parents=True)
    (crashed / ".config.json.0a1b2c3d.tmp").write_text("{")
    assert run(data_dir, crashed, "max_steps=4")["step"] == 4


@pytest.mark.parametrize("is_cuda", [True, False])
def test_release_gives_a_gpus_cached_memory_back_to_other_processes(monkeypatch, is_cuda):
    """After train() returns in a notebook, a `!tinygemma run` cell's process finds the GPU's memory free: the
    run's caching-allocator reserve is emptied (on CUDA only; elsewhere there is none)."""
    from types import SimpleNamespace

    from tinygemma.train import Trainer
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    trainer = SimpleNamespace(rt=SimpleNamespace(is_cuda=is_cuda), model=object(), raw=object())
    Trainer.release(trainer)
    assert trainer.model is None and trainer.raw is None and emptied == ([True] if is_cuda else [])


def test_a_ctrl_c_during_releases_garbage_collection_is_not_lost(monkeypatch):
    """A notebook's Stop (SIGINT) that lands while release() collects the run's garbage runs its handler inside
    whatever Python code the collection runs (a weakref callback), where its KeyboardInterrupt is printed as
    "Exception ignored" and dropped: the notebook's chunk loop then trained on. It is held until the collection
    ends, then raised."""
    import gc
    import signal
    import weakref
    from types import SimpleNamespace

    from tinygemma.train import Trainer

    def collect_with_a_callback_interrupted(*args):
        class Garbage:
            pass

        garbage = Garbage()
        weakref.finalize(garbage, signal.raise_signal, signal.SIGINT)
        del garbage  # its finalizer runs now: Python code, where the SIGINT's handler runs
        return 0

    monkeypatch.setattr(gc, "collect", collect_with_a_callback_interrupted)
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    trainer = SimpleNamespace(rt=SimpleNamespace(is_cuda=True), model=object())
    with pytest.raises(KeyboardInterrupt):
        Trainer.release(trainer)
    assert trainer.model is None and emptied == [True]  # the GPU's reserve given back before the interrupt


def test_close_ends_the_runtime_even_when_a_held_ctrl_c_comes_out_of_release():
    """The Ctrl-C release holds through its collection is raised as it ends: close still undoes the runtime's
    settings (a notebook's TF32, its CUDA device, the process group) and lets go of the lock."""
    from types import SimpleNamespace

    from tinygemma.train import Trainer

    done = []

    def interrupted():
        raise KeyboardInterrupt

    trainer = SimpleNamespace(profiler=None, progress=None, writer=None, release=interrupted,
                              unlock=lambda: done.append("unlocked"), caller_random=None,
                              rt=SimpleNamespace(close=lambda: done.append("runtime closed")))
    with pytest.raises(KeyboardInterrupt):
        Trainer.close(trainer, 130)
    assert done == ["unlocked", "runtime closed"]

    def cuda_error_again():  # (after a CUDA error, every CUDA call raises it again)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    trainer.rt = SimpleNamespace(close=cuda_error_again)
    with pytest.raises(KeyboardInterrupt):  # what ended the run, not the runtime's failing close in its place
        Trainer.close(trainer, 130)
    trainer.release = lambda: None
    with pytest.raises(RuntimeError, match="illegal memory access"):  # nothing under way: said
        Trainer.close(trainer, 0)


def test_an_older_schedules_rate_is_told_on_the_workshops_long_schedule(tmp_path):
    """On the workshop recipe's 4,688-step cosine, a step's rate and its neighbour's differ by about 1e-3
    (relative): the comparison is exact up to float rounding, not within a tolerance that would take the older
    schedule's rate for this version's."""
    import dataclasses

    from tinygemma.train import check_logged_schedule

    cfg = load_recipe(str(ROOT / "configs" / "workshop.toml")).train
    saved = dataclasses.asdict(cfg)
    step = 3000
    new, old = learning_rate(step - 1, cfg), learning_rate(step, cfg)  # the older schedule ran a step ahead
    assert 1e-6 < abs(old - new) / new < 2e-3
    for logged, warned in ((new, False), (old, True)):
        (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": step, "tokens": 1, "lr": logged}) + "\n")
        warning = check_logged_schedule(tmp_path, saved, step)
        assert (warning is not None and "an older tinygemma trained the run" in warning) == warned, warning


def test_release_outlives_a_cuda_error_raised_again_by_empty_cache(monkeypatch):
    """After a sticky CUDA error (an illegal memory access) every CUDA call raises it again: release's
    empty_cache must not replace the error that ended the run, nor keep close() from ending the runtime."""
    from types import SimpleNamespace

    from tinygemma.train import Trainer

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "empty_cache", broken)
    trainer = SimpleNamespace(rt=SimpleNamespace(is_cuda=True), model=object())
    Trainer.release(trainer)
    assert trainer.model is None


def test_train_gives_a_notebook_its_random_generators_back(straight_run, data_dir, tmp_path):
    """train seeds torch's generator (the model's initialisation) and a resume restores the checkpoint's
    generators: the caller's came back as the run's, whatever seed a notebook had set."""
    import random

    shutil.copytree(straight_run, tmp_path / "finished")  # (a copy: the fixture stays as it is)
    for resume, out in ((False, tmp_path / "fresh"), (True, tmp_path / "finished")):
        torch.manual_seed(5)
        np.random.seed(6)
        random.seed(7)
        expected = (torch.rand(3), np.random.rand(2), random.random())
        torch.manual_seed(5)
        np.random.seed(6)
        random.seed(7)
        run(data_dir, out, "max_steps=2", "warmup_steps=0") if not resume else run(data_dir, out, resume=True)
        got = (torch.rand(3), np.random.rand(2), random.random())
        assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_a_loss_plot_or_report_that_cannot_be_written_never_stops_training(data_dir, tmp_path, monkeypatch, capsys):
    """loss.png and report.md are views of the records: on Windows an image viewer holding loss.png refused its
    replacement (PermissionError) at an evaluation, which stopped the run and lost the steps since its checkpoint.
    Each is a warning, the run trains on, and its records and checkpoints are whole."""
    def held(*args):
        raise PermissionError(13, "The process cannot access the file because it is being used by another process")

    monkeypatch.setattr(tinygemma.train, "plot_losses", held)
    monkeypatch.setattr(tinygemma.train, "write_report", held)
    out = tmp_path / "run"
    assert run(data_dir, out, "max_steps=4", "eval_interval=2", "checkpoint_interval=2")["step"] == 4
    err = capsys.readouterr().err
    assert "warning: loss.png not written (PermissionError: " in err and "training goes on" in err
    assert "warning: report.md not written (PermissionError: " in err
    assert last_step(out) == 4 and [r["step"] for r in metrics(out) if "val_loss" in r] == [0, 2, 4]
    # a resume redraws the plot before its first step (the lost steps left out): a warning there too
    assert run(data_dir, out, "max_steps=6", "eval_interval=2", "checkpoint_interval=2", resume=True)["step"] == 6
    assert "warning: loss.png not written" in capsys.readouterr().err


# ------------------------------------------------------------------ the loop's bookkeeping (mutation round 11)


def test_a_stop_at_checkpoints_there_and_never_trains_past_the_schedule(data_dir, tmp_path):
    """--stop-at between checkpoint intervals ends with a checkpoint at that step (the notebook's chunks lost each
    chunk otherwise); past max_steps it ends with the schedule."""
    assert run(data_dir, tmp_path / "a", "max_steps=10", "checkpoint_interval=20", stop_at=3)["step"] == 3
    assert last_step(tmp_path / "a") == 3
    assert run(data_dir, tmp_path / "b", "max_steps=6", stop_at=9)["step"] == 6 and last_step(tmp_path / "b") == 6


def test_every_checkpoint_holds_the_validation_loss_of_its_own_step(data_dir, tmp_path):
    """A checkpoint between evaluations evaluates at its step: best.json (what tinygemma.load(RUN) reads) compares
    the losses of the weights each checkpoint holds."""
    out = tmp_path / "r"
    run(data_dir, out, "max_steps=10", "checkpoint_interval=5", "eval_interval=7", "keep_checkpoints=5")
    vals = {r["step"]: r["val_loss"] for r in metrics(out) if "val_loss" in r}
    assert set(vals) == {0, 5, 7, 10}
    assert json.loads((out / "checkpoints" / "last.json").read_text())["val_loss"] == vals[10]


def test_keep_checkpoints_two_keeps_the_two_newest_and_the_best(data_dir, tmp_path):
    out = tmp_path / "r"
    run(data_dir, out, "max_steps=8", "checkpoint_interval=2", "keep_checkpoints=2")
    kept = {p.name for p in (out / "checkpoints").iterdir() if p.is_dir()}
    best = json.loads((out / "checkpoints" / "best.json").read_text())["dir"]
    assert {"step_000006", "step_000008"} <= kept <= {"step_000006", "step_000008", best}


def test_a_resumes_parts_add_up_to_the_run(data_dir, tmp_path):
    """Each invocation's FLOPs and time are its own steps' (report.md's MFU adds them), the trainer state's elapsed
    time the run's, all invocations'."""
    out = tmp_path / "r"
    run(data_dir, out, "max_steps=6", "checkpoint_interval=3", stop_at=3)
    run(data_dir, out, "max_steps=6", "checkpoint_interval=3", resume=True)
    state = json.loads((out / "checkpoints" / "step_000006" / "trainer_state.json").read_text())
    parts = state["invocations"]
    assert [p["steps"] for p in parts] == [[0, 3], [3, 6]] and parts[0]["flops"] == parts[1]["flops"] > 0
    assert state["elapsed_s"] == pytest.approx(sum(p["elapsed_s"] for p in parts))


def test_a_resume_keeps_the_best_of_the_steps_before_it(data_dir, tmp_path, monkeypatch):
    """Worse validation losses after a resume leave best.json at the earlier checkpoint."""
    out = tmp_path / "r"
    settings = ["max_steps=6", "checkpoint_interval=3", "keep_checkpoints=3"]
    run(data_dir, out, *settings, stop_at=3)

    def worse(*args, **kwargs):
        result = evaluate_windows(*args, **kwargs)
        return {**result, "val_loss": result["val_loss"] + 10.0}

    monkeypatch.setattr(tinygemma.train, "evaluate_windows", worse)
    assert run(data_dir, out, *settings, resume=True)["best_step"] == 3
    assert json.loads((out / "checkpoints" / "best.json").read_text())["step"] == 3


def test_a_resume_updates_with_the_new_optimizer_settings(data_dir, tmp_path, monkeypatch):
    """A resume that changes beta1 and weight_decay (named among its changes) trains with them, not with the
    checkpoint's optimizer state's (the learning rate, set every step, hid it)."""
    out = tmp_path / "r"
    run(data_dir, out, "max_steps=6", "checkpoint_interval=3", stop_at=3)
    made, real = [], tinygemma.train.configure_optimizer
    monkeypatch.setattr(tinygemma.train, "configure_optimizer", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    run(data_dir, out, "max_steps=6", "checkpoint_interval=3", "beta1=0.8", "weight_decay=0.05", resume=True)
    groups = made[-1].param_groups
    assert all(g["betas"][0] == 0.8 for g in groups) and max(g["weight_decay"] for g in groups) == 0.05


def eta_seconds(out: str, step: int) -> int:
    line = next(line for line in out.splitlines() if line.startswith(f"step {step}/") and "eta " in line)
    minutes, seconds = line.rsplit("eta ", 1)[1].split("m")
    return 60 * int(minutes) + int(seconds.rstrip("s"))


def eta_after_a_slow_second_evaluation(data_dir, out, monkeypatch, capsys, eval_interval: int,
                                       log_interval: int) -> float:
    """The ETA of the first log line of an 8-step run whose second evaluation (the first is step 0's) takes 6 s on
    the clock, at once."""
    calls, clock, real_clock = [], [0.0], time.perf_counter

    def slow(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            clock[0] += 6
        return evaluate_windows(*args, **kwargs)

    monkeypatch.setattr(tinygemma.train, "evaluate_windows", slow)
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + clock[0])
    train(load_recipe(None, tiny_settings(data_dir, out, "max_steps=8", f"eval_interval={eval_interval}",
                                          f"log_interval={log_interval}", "checkpoint_interval=0")))
    return eta_seconds(capsys.readouterr().out, log_interval)


def test_the_eta_divides_by_the_steps_since_an_invocations_first(data_dir, tmp_path, monkeypatch, capsys):
    """The ETA is the time since this invocation's first step (compilation left out) over the steps since: 3 steps
    that took 6 s (a slow evaluation) leave 4 more at 8 s; a resumed invocation's clock starts at its own first
    step (from step 0's, it read the machine's uptime)."""
    settings = ["max_steps=8", "log_interval=2", "checkpoint_interval=2", "eval_interval=0"]
    run(data_dir, tmp_path / "r", *settings, stop_at=2)
    capsys.readouterr()
    train(load_recipe(None, tiny_settings(data_dir, tmp_path / "r", *settings)), resume=True)
    assert eta_seconds(capsys.readouterr().out, 6) < 60
    assert eta_after_a_slow_second_evaluation(data_dir, tmp_path / "slow", monkeypatch, capsys, 2, 4) >= 7


def test_a_one_step_invocation_is_evaluated_before_it_and_reports_its_last_loss(data_dir, tmp_path):
    """The step-0 validation is recorded for a run of one step too; the summary's train_loss is the last step's,
    not the first of the last log interval's."""
    out = tmp_path / "r"
    run(data_dir, out, "max_steps=4", "warmup_steps=0", stop_at=1)
    assert 0 in [r["step"] for r in metrics(out) if "val_loss" in r]
    summary = run(data_dir, tmp_path / "s", "max_steps=8", "log_interval=4")
    losses = [r["train_loss"] for r in metrics(tmp_path / "s") if "train_loss" in r]
    assert summary["train_loss"] == losses[-1] != losses[-4]


def test_a_profile_holds_no_sample_either():
    """A sample generated inside the profiled steps was counted as theirs (4x the steps' time, the generation's
    operators in their table), where an evaluation or a checkpoint there is refused."""
    from tinygemma.train import check_profile_range

    cfg = TrainConfig(max_steps=8, warmup_steps=1, eval_interval=0, checkpoint_interval=0, sample_interval=4)
    with pytest.raises(tinygemma.UserError, match=r"--profile 3:6: a sample comes after step 4 \(train.sample_interval "
                                                  r"4\), inside the profiled steps.*profile steps between two of them"):
        check_profile_range("3:6", 0, 8, cfg)
    assert check_profile_range("5:8", 0, 8, cfg) == (5, 8)


# ------------------------------------------------------------------ mutation round 19: the trainer, second pass

def test_a_sample_between_log_lines_comes_after_the_steps_it_samples(data_dir, tmp_path):
    """sample_interval reads the queued steps before sampling: metrics.jsonl stays in step order, and a
    non-finite step is stopped before its weights are sampled."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=4", "sample_interval=3", "generate.max_new_tokens=2", "generate.prompts=Tom had")
    records = metrics(out)
    steps = [r["step"] for r in records]
    assert steps == sorted(steps), steps
    sampled = [i for i, r in enumerate(records) if "samples" in r]
    assert [records[i]["step"] for i in sampled] == [3], records  # one sample, at step 3 of 4
    before = [r["step"] for r in records[:sampled[0]] if "train_loss" in r]
    assert before == [1, 2, 3], before  # the steps it samples were written before it


def test_check_run_of_a_stop_at_the_run_has_passed_trains_no_step(data_dir, tmp_path):
    """--stop-at behind the run trains nothing: check_run (--dry-run) says steps 4 to 4, not 4 to 2."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=8", stop_at=4)
    checked = check_run(load_recipe(None, tiny_settings(data_dir, out, "max_steps=8")), resume=True, stop_at=2)
    assert (checked["start"], checked["end"]) == (4, 4)


def test_a_stop_at_the_runs_own_step_says_the_changed_settings_change_nothing(data_dir, tmp_path):
    """--stop-at N on a run at step N trains no step: a changed setting is said to change nothing."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=8", stop_at=4)
    checked = check_run(load_recipe(None, tiny_settings(data_dir, out, "max_steps=8", "learning_rate=5e-3")),
                        resume=True, stop_at=4)
    assert any("trains no step, so they change nothing" in w for w in checked["warnings"]), checked["warnings"]


def test_resume_on_other_validation_tokens_is_refused(data_dir, tmp_path):
    """The validation split is the run's too (best.json compares its losses): other val tokens, as many
    of them, are refused on resume as other train tokens are."""
    import hashlib
    import shutil

    import numpy as np

    out = tmp_path / "run"
    run(data_dir, out, "max_steps=4", stop_at=2)
    other = tmp_path / "other_val"
    shutil.copytree(data_dir, other)
    meta = json.loads((other / "meta.json").read_text())
    tokens = np.fromfile(other / "val.bin", dtype=np.uint16)[::-1].copy()
    tokens.tofile(other / "val.bin")
    meta["splits"]["val"]["blake2b"] = hashlib.blake2b(tokens.tobytes(), digest_size=16).hexdigest()
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(tinygemma.UserError, match=r"holds other data .*val: as many tokens, but other ones"):
        run(other, out, "max_steps=4", resume=True)


def test_init_from_takes_a_run_of_another_init_std(data_dir, tmp_path):
    """init_std only initialises weights: init_from's weights replace them, so it may differ."""
    source = tmp_path / "source"
    run(data_dir, source, "max_steps=2", "warmup_steps=1")
    summary = run(data_dir, tmp_path / "new", "max_steps=2", "warmup_steps=1", f"init_from={source}",
                  "model.init_std=0.05")
    assert summary["step"] == 2


def test_a_run_trained_with_a_padded_vocabulary_resumes_without_the_setting(data_dir, tmp_path):
    """A run keeps the vocabulary padding it was trained with (a GPU's 128, resumed on a CPU), unless
    the recipe sets it: resume reads it from the checkpoint."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=4", "model.vocab_pad_multiple=128", stop_at=2)
    assert run(data_dir, out, "max_steps=4", resume=True)["step"] == 4


def test_a_profile_of_a_step_the_run_has_already_trained_is_refused(data_dir, tmp_path):
    """A resumed run at step 4 trains steps 5 on: --profile 4:6 names a step it never takes."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=8", stop_at=4)
    with pytest.raises(tinygemma.UserError, match="trains optimizer steps 5 to 8"):
        check_run(load_recipe(None, tiny_settings(data_dir, out, "max_steps=8")), resume=True, profile="4:6")


def test_a_resume_checks_generate_settings_it_records_anew(data_dir, tmp_path):
    """[generate] changed on resume is recorded for the run's samples and model card: checked as a new
    run's, even without train.sample_interval."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=4", stop_at=2)
    with pytest.raises(tinygemma.UserError, match="generate.max_new_tokens 4000 leaves no room"):
        run(data_dir, out, "max_steps=4", "generate.max_new_tokens=4000", resume=True)


def test_micro_batch_size_auto_on_a_cpu_is_not_said_to_be_probed(data_dir, tmp_path, capsys):
    """auto off CUDA keeps batch_size without probing: the first log line does not say it fits a GPU."""
    train(load_recipe(None, tiny_settings(data_dir, tmp_path / "run", "max_steps=1", "warmup_steps=0",
                                          "micro_batch_size=auto")), quiet=False)
    said = capsys.readouterr().out
    assert "8 sequences per process" in said and "fits this GPU" not in said


def test_check_run_says_the_init_from_repeated_windows_warning_train_says(data_dir, tmp_path):
    """check_run's `warnings` are 'what its start would warn of': train's start warns that init_from weights
    trained on this data with this seed draw the same windows again; --dry-run must say it too."""
    source = tmp_path / "source"
    run(data_dir, source, "max_steps=2", "warmup_steps=1")
    recipe = load_recipe(None, tiny_settings(data_dir, tmp_path / "new", "max_steps=2", "warmup_steps=1",
                                             f"init_from={source}"))
    assert any("draw the windows those weights learned first" in w for w in check_run(recipe)["warnings"])


FORK_SETTINGS = ["max_steps=9", "checkpoint_interval=3", "keep_checkpoints=3"]


def train_to_step_6_with_best_at_3(data_dir, out, monkeypatch) -> None:
    """A run (FORK_SETTINGS) checkpointed at steps 3 and 6, whose later validation losses are worse: its best
    checkpoint is step 3's, an earlier one than its last. Its evaluations from step 3 on stay 10 nats worse."""
    run(data_dir, out, *FORK_SETTINGS, stop_at=3)
    monkeypatch.setattr(tinygemma.train, "evaluate_windows",
                        lambda *a, **k: {**(r := evaluate_windows(*a, **k)), "val_loss": r["val_loss"] + 10.0})
    run(data_dir, out, *FORK_SETTINGS, stop_at=6, resume=True)


def test_a_fork_keeps_its_sources_earlier_best_checkpoint(data_dir, tmp_path, monkeypatch):
    """--resume-from of a checkpoint whose best is an earlier kept checkpoint carries that best into the fork, so the
    fork's best.json (restored on its resume) names a checkpoint it holds, and load/eval/export of the fork read the
    best, not the last (m28)."""
    out = tmp_path / "r"
    train_to_step_6_with_best_at_3(data_dir, out, monkeypatch)
    assert json.loads((out / "checkpoints" / "best.json").read_text())["step"] == 3
    fork = tmp_path / "fork"
    fork_run(out / "checkpoints" / "step_000006", fork)
    assert sorted(p.name for p in (fork / "checkpoints").glob("step_*")) == ["step_000003", "step_000006"]
    # that best's folder deleted by hand: the fork holds the checkpoint it continues, not a crash on the missing one
    shutil.rmtree(out / "checkpoints" / "step_000003")
    fork_run(out / "checkpoints" / "step_000006", tmp_path / "fork2")
    assert sorted(p.name for p in (tmp_path / "fork2" / "checkpoints").glob("step_*")) == ["step_000006"]


def test_resume_with_a_recipe_file_follows_the_file_not_the_saved_recipe(data_dir, tmp_path, capsys):
    """--resume continues with the run's saved recipe unless --config is given: a recipe file given is followed."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=6", stop_at=2)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[generate]\nmax_new_tokens = 7\n")
    sets = [part for item in tiny_settings(data_dir, out, "max_steps=6") for part in ("--set", item)]
    capsys.readouterr()
    assert main(["train", "--resume", "--config", str(recipe), *sets, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["recipe"]["generate"]["max_new_tokens"] == 7


def test_a_tokenizer_refusal_on_the_runs_own_data_dir_names_no_other_folder(data_dir, stories_dir, tmp_path):
    """Data prepared again in the run's own data.dir with another tokenizer is refused; the refusal names another
    folder ("(on DIR)") only where the run was trained on another one."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    out = tmp_path / "run"
    run(data, out, "max_steps=2", "warmup_steps=1", stop_at=1)
    shutil.rmtree(data)
    prepare(data, sources=[stories_dir / "valid.txt"], tokenizer="bpe", vocab_size=512, limit=200,
            val_fraction=0.1, workers=1, progress=False)  # as many tokens (512), other ids
    with pytest.raises(tinygemma.UserError, match="but the run was trained with") as refused:
        run(data, out, "max_steps=2", "warmup_steps=1", resume=True)
    assert "(on " not in str(refused.value), str(refused.value)


def test_samples_during_training_on_one_process_are_not_refused_under_distributed_fsdp(data_dir, tmp_path):
    """distributed = fsdp shards nothing on one process, so sample_interval's whole-model samples are fine there
    (only under torchrun with FSDP are they refused)."""
    out = tmp_path / "r"
    summary = run(data_dir, out, "max_steps=1", "warmup_steps=0", "distributed=fsdp", "sample_interval=1",
                  "generate.max_new_tokens=2", "generate.prompts=Tom had")
    assert summary["step"] == 1 and any("samples" in r for r in metrics(out))


def test_a_finished_run_run_again_says_its_steps_not_a_stop_at(data_dir, tmp_path, capsys):
    """A finished run, run again, trains nothing: its first line says so (it read "steps 2 to 2 of 2", as if a
    step were to come), not that --stop-at (never given) does not pass its step."""
    out = tmp_path / "r"
    run(data_dir, out, "max_steps=2", "warmup_steps=1")
    capsys.readouterr()
    train(load_recipe(None, tiny_settings(data_dir, out, "max_steps=2", "warmup_steps=1")), resume=True)
    said = capsys.readouterr().out
    assert "no step (the run has finished: step 2 of 2)" in said and "--stop-at" not in said, said
    assert "steps 2 to 2" not in said


def test_a_resumed_init_from_run_does_not_say_its_weights_come_from_the_source(data_dir, tmp_path, capsys):
    """The first line names train.init_from's weights where the run starts from them (step 0); a resume
    continues from its own checkpoint, and says nothing of the source."""
    source = tmp_path / "source"
    run(data_dir, source, "max_steps=2", "warmup_steps=1")
    settings = tiny_settings(data_dir, tmp_path / "new", "max_steps=4", "warmup_steps=1", f"init_from={source}")
    capsys.readouterr()
    train(load_recipe(None, settings), stop_at=2)
    assert "weights from " in capsys.readouterr().out
    train(load_recipe(None, settings), resume=True)
    assert "weights from " not in capsys.readouterr().out


def test_the_logged_training_time_runs_on_across_a_resume(data_dir, tmp_path):
    """metrics.jsonl's elapsed_s is the run's training time so far, all invocations' (loss against time,
    across resumes), as trainer_state.json's: it never goes back at a resume."""
    out = tmp_path / "r"
    settings = ["max_steps=6", "checkpoint_interval=3", "log_interval=1"]
    run(data_dir, out, *settings, stop_at=3)
    before = json.loads((out / "checkpoints" / "step_000003" / "trainer_state.json").read_text())["elapsed_s"]
    run(data_dir, out, *settings, resume=True)
    logged = {r["step"]: r["elapsed_s"] for r in metrics(out) if "elapsed_s" in r}
    assert logged[4] >= before > 0
    assert [logged[s] for s in sorted(logged)] == sorted(logged.values())


def test_the_eta_at_an_invocations_second_step_is_its_wall_clock_since_the_first(data_dir, tmp_path, monkeypatch,
                                                                                 capsys):
    """One step after the first (compiling) one, the ETA already takes the wall-clock time since it, evaluations
    included: a 6 s evaluation after step 1 leaves 6 more steps at 6 s or more each, not at the steps' own rate."""
    assert eta_after_a_slow_second_evaluation(data_dir, tmp_path / "r", monkeypatch, capsys, 1, 2) >= 30


def test_a_resumed_init_from_run_keeps_the_checkpoint_it_started_from(data_dir, tmp_path):
    """The checkpoint train.init_from resolved to at the run's start (a run folder's best moves on) stays in
    config.json and every later checkpoint's state after a resume: the report's Reproduce command starts from it."""
    source = tmp_path / "source"
    run(data_dir, source, "max_steps=2", "warmup_steps=1")
    out = tmp_path / "new"
    settings = ["max_steps=4", "warmup_steps=1", "checkpoint_interval=2", f"init_from={source}"]
    run(data_dir, out, *settings, stop_at=2)
    started = json.loads((out / "config.json").read_text())["run"]["init_checkpoint"]
    run(data_dir, out, *settings, resume=True)
    assert json.loads((out / "config.json").read_text())["run"].get("init_checkpoint") == started
    state = json.loads((out / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state.get("init_checkpoint") == started


def test_a_fork_made_without_training_keeps_its_own_settings_for_the_resume_that_trains_it(data_dir, tmp_path,
                                                                                          capsys):
    """The torchrun fork path (README, "Several GPUs"): `--resume-from CK --stop-at STEP` in one process trains
    nothing, then `--resume` trains the fork. Its own settings (a longer schedule, another learning rate) are
    recorded by the first and taken by the second, which trains exactly what a fork trained at once does."""
    from tinygemma.train import saved_recipe

    source = tmp_path / "source"
    run(data_dir, source, "lr_schedule=wsd", "max_steps=20", "checkpoint_interval=4", stop_at=4)
    checkpoint = source / "checkpoints" / "step_000004"
    fork = ("lr_schedule=wsd", "max_steps=12", "learning_rate=5e-3", "checkpoint_interval=4")
    run(data_dir, tmp_path / "at_once", *fork, resume_from=checkpoint)
    capsys.readouterr()
    run(data_dir, tmp_path / "two_steps", *fork, resume_from=checkpoint, stop_at=4)
    assert ("the fork is at step 4 of 12 with settings other than its source's: max_steps 20 -> 12, learning_rate "
            "0.01 -> 0.005; --stop-at (stop_at) 4 trains no step now: its config.json records them, and --resume "
            "trains with them") in capsys.readouterr().err
    recorded = json.loads((tmp_path / "two_steps" / "config.json").read_text())["train"]
    assert (recorded["max_steps"], recorded["learning_rate"]) == (12, 5e-3)
    recipe = saved_recipe(tmp_path / "two_steps")
    assert (recipe.train.max_steps, recipe.train.learning_rate) == (12, 5e-3)
    # A --resume given other settings (README's torchrun line gives --config, which replaces the saved recipe) is
    # warned that the fork's own are replaced, even where they are its source's.
    other = load_recipe(None, tiny_settings(data_dir, tmp_path / "two_steps", "lr_schedule=wsd", "max_steps=20",
                                            "checkpoint_interval=4"))
    assert ("resuming the fork at step 4 with settings other than those it recorded when it was made: max_steps "
            "12 -> 20, learning_rate 0.005 -> 0.01; the steps from here take this invocation's") in " ".join(
        check_run(other, resume=True)["warnings"])
    # Its own recorded settings are no change: the --resume that trains them is not warned of its source's
    assert not any("settings other than" in w for w in check_run(recipe, resume=True)["warnings"])
    train(recipe, resume=True, quiet=True)
    assert last_step(tmp_path / "two_steps") == 12
    assert train_losses(tmp_path / "two_steps") == train_losses(tmp_path / "at_once")

    # A fork of a fork not yet trained: the first fork's pending settings are its own, not the second's, which
    # takes the checkpoint's recorded ones (the source's) and those given now.
    pending = tmp_path / "pending"
    run(data_dir, pending, "lr_schedule=wsd", "max_steps=20", "learning_rate=5e-3", "checkpoint_interval=4",
        resume_from=checkpoint, stop_at=4)
    assert saved_recipe(pending).train.learning_rate == 5e-3
    fork_run(pending / "checkpoints" / "step_000004", tmp_path / "again")  # what `train --resume-from` reads
    assert saved_recipe(tmp_path / "again").train.learning_rate == 1e-2
    # A fork of a finished run trains no step whatever it is given: its settings change nothing, and are not kept.
    finished = tmp_path / "finished"
    run(data_dir, finished, "lr_schedule=wsd", "max_steps=8", "checkpoint_interval=4")
    capsys.readouterr()
    run(data_dir, tmp_path / "late", "lr_schedule=wsd", "max_steps=8", "checkpoint_interval=4", "eval_batches=3",
        resume_from=finished / "checkpoints" / "step_000008")
    assert "eval_batches 4 -> 3; no step is left to train, so they change nothing" in capsys.readouterr().err
    assert json.loads((tmp_path / "late" / "config.json").read_text())["train"]["eval_batches"] == 4


def test_a_run_from_random_weights_cannot_take_an_init_from_on_resume(data_dir, tmp_path):
    """A resume that names init_from for a run that started from random weights is refused like any other change
    of it: recorded, it would say the run's weights came from that checkpoint (its report's Reproduce command)."""
    source = tmp_path / "source"
    run(data_dir, source, "max_steps=2", "warmup_steps=1")
    out = tmp_path / "r"
    run(data_dir, out, "max_steps=4", "warmup_steps=1", stop_at=2)
    with pytest.raises(tinygemma.UserError, match="train.init_from cannot change on resume \\(none -> "):
        run(data_dir, out, "max_steps=4", "warmup_steps=1", f"init_from={source}", resume=True)


def test_a_fork_killed_while_it_is_made_is_refused_by_a_resume_and_made_again_by_its_retry(data_dir, tmp_path):
    """SIGKILL (the OOM killer, a power loss) while --resume-from links or copies the checkpoint: the folder held
    the source's config.json and metrics.jsonl and a partial checkpoint, so a retry was refused (--out not empty)
    and `--resume` trained a new run from step 0 over the copied records. A marker names it a fork in the
    making until last.json names its checkpoint: a resume refuses it in one line naming the command, and that
    command makes the fork again."""
    source = tmp_path / "source"
    run(data_dir, source, "max_steps=16", "checkpoint_interval=4", "keep_checkpoints=3")
    checkpoint, fork = source / "checkpoints" / "step_000008", tmp_path / "fork"
    killed = subprocess.run([sys.executable, "-c", f"""
import os, signal
links = []
def link(*args):
    links.append(args)
    if len(links) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return os.link.__wrapped__(*args)
link.__wrapped__ = os.link
os.link = link
from tinygemma.cli import main
main(["train", "--resume-from", {str(checkpoint)!r}, "--out", {str(fork)!r}])
"""], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (fork / "config.json").exists() and not (fork / "checkpoints" / "last.json").exists()
    marker = (fork / ".fork-incomplete").read_text()
    assert marker.splitlines()[0] == str(checkpoint.resolve())
    # While its maker runs (another fork into the same folder), the folder is not taken over
    (fork / ".fork-incomplete").write_text(f"{checkpoint.resolve()}\n{os.getppid()}\n")
    with pytest.raises(tinygemma.UserError, match=rf"^--out {fork} is being made into a fork by process "
                                                  rf"{os.getppid()}: wait for it, or choose another --out \(if no "
                                                  r"fork is being made into it, delete the folder\)$"):
        tinygemma.checkpoint.fork_run(checkpoint, fork)
    (fork / ".fork-incomplete").write_text(marker)
    # A checkpoint inside --out, marked as a fork in the making: refused before the takeover would empty it
    (source / ".fork-incomplete").write_text(f"{checkpoint.resolve()}\n0\n")
    with pytest.raises(tinygemma.UserError, match="is inside --out"):
        tinygemma.checkpoint.fork_run(source / "checkpoints" / "step_000012", source)
    (source / ".fork-incomplete").unlink()
    assert (source / "checkpoints" / "step_000012" / "trainer_state.json").exists()
    with pytest.raises(tinygemma.UserError) as refused:
        run(data_dir, fork, "max_steps=16", resume=True)
    assert str(refused.value) == (f"{fork} is a fork stopped while it was made (its checkpoint not all there): make "
                                  f"it again with `tinygemma train --resume-from {checkpoint} --out {fork}` and the "
                                  "settings you gave it, which takes the folder over")
    assert main(["train", "--resume-from", str(checkpoint), "--out", str(fork)]) == 0
    assert last_step(fork) == 16 and not (fork / ".fork-incomplete").exists()
    assert train_losses(fork) == train_losses(source)  # the source's steps from 9 on, as the source trained them


def test_a_ctrl_c_as_a_fork_is_made_leaves_no_fork(data_dir, tmp_path, interrupt_on_entry):
    """A Ctrl-C in the instant after forked_run made the fork, before the `with` held it: the copied checkpoint and
    records stayed until the garbage collector came. It goes at once now, and the source is untouched."""
    source = tmp_path / "source"
    run(data_dir, source, "max_steps=4", "checkpoint_interval=4")
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    interrupt_on_entry.arm(1, "forked_run")
    with pytest.raises(KeyboardInterrupt) as stopped:
        run(data_dir, tmp_path / "fork", resume_from=source / "checkpoints" / "step_000004")
    assert not (tmp_path / "fork").exists() and sorted(p.relative_to(source) for p in source.rglob("*")) == before
    del stopped  # (after the checks: the exception, and the generator with it, lived until here)


def test_a_fork_killed_before_its_first_step_names_the_resume_that_trains_it(data_dir, tmp_path, capsys):
    """A fork made whole, then killed before training wrote its config.json (its settings, --max-steps 24 here,
    recorded nowhere): the same command again was "--out is not empty" alone, and a plain --resume trains the
    source's 16 steps. The refusal now says the folder holds this fork and how to continue it."""
    source = tmp_path / "source"
    run(data_dir, source, "max_steps=16", "checkpoint_interval=4", "keep_checkpoints=3", "lr_schedule=wsd")
    checkpoint, fork = source / "checkpoints" / "step_000008", tmp_path / "fork"
    tinygemma.checkpoint.fork_run(checkpoint, fork)  # what --resume-from had done when the kill came
    command = ["train", "--resume-from", str(checkpoint), "--out", str(fork), "--max-steps", "24", "--stop-at", "9"]
    assert main(command) == 2
    assert capsys.readouterr().err == (f"tinygemma train: error: --out {fork} already holds this fork of {checkpoint}, "
                                       f"not trained yet: continue it with `tinygemma train --out {fork} --resume` "
                                       "and this command's other settings (--max-steps, --set ...)\n")
    assert main(["train", "--out", str(fork), "--resume", "--max-steps", "24", "--stop-at", "9"]) == 0
    assert json.loads((fork / "config.json").read_text())["train"]["max_steps"] == 24 and last_step(fork) == 9
    other = tmp_path / "other"  # a fork of another checkpoint in the folder: not this one's, "not empty" as before
    tinygemma.checkpoint.fork_run(source / "checkpoints" / "step_000012", other)
    assert main(["train", "--resume-from", str(checkpoint), "--out", str(other)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_a_fork_of_a_run_whose_checkpoints_folder_is_a_link_copies_its_records(data_dir, tmp_path):
    """A run whose checkpoints/ is a link to another disk (which in_run_checkpoints follows): --resume-from one of
    its checkpoints still makes the fork of that run, with its config.json and metrics.jsonl."""
    out = tmp_path / "r"
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", "keep_checkpoints=2")
    disk = tmp_path / "bigdisk"
    shutil.move(str(out / "checkpoints"), str(disk))
    (out / "checkpoints").symlink_to(disk, target_is_directory=True)
    fork = tmp_path / "fork"
    fork_run(out / "checkpoints" / "step_000002", fork)
    assert (fork / "config.json").is_file() and (fork / "metrics.jsonl").is_file()


def test_a_stop_at_the_runs_own_step_keeps_the_runs_config_json(data_dir, tmp_path, capsys):
    """--stop-at N on a run (not a fork) at step N trains no step: its config.json keeps the values its steps
    were trained with, not the changed ones said to change nothing."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=8", stop_at=4)
    capsys.readouterr()
    run(data_dir, out, "max_steps=8", "learning_rate=5e-3", resume=True, stop_at=4)
    assert "trains no step, so they change nothing" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["train"]["learning_rate"] == 1e-2


def test_a_longer_schedule_on_resume_is_not_called_a_changed_setting(data_dir, tmp_path):
    """max_steps is the schedule's own setting (check_resume_schedule's): a run extended on resume is not warned
    that its settings differ from the run's."""
    out = tmp_path / "run"
    run(data_dir, out, "lr_schedule=wsd", "max_steps=8", stop_at=4)
    checked = check_run(load_recipe(None, tiny_settings(data_dir, out, "lr_schedule=wsd", "max_steps=12")),
                        resume=True)
    assert not any("max_steps 8 -> 12" in w for w in checked["warnings"]), checked["warnings"]


def test_saved_recipe_of_a_run_not_forked_is_its_last_checkpoints_not_a_failed_invocations(data_dir, tmp_path):
    """An invocation that wrote config.json and then failed before its first checkpoint (a diverged learning
    rate): the run's --resume takes the settings its last checkpoint was trained with."""
    from tinygemma.train import saved_recipe

    out = tmp_path / "run"
    run(data_dir, out, "max_steps=8", "checkpoint_interval=4", stop_at=4)
    config = json.loads((out / "config.json").read_text())
    config["train"]["learning_rate"] = 5e-3  # what the failed invocation recorded
    (out / "config.json").write_text(json.dumps(config))
    assert saved_recipe(out).train.learning_rate == 1e-2


def test_a_fork_without_its_sources_best_never_points_best_json_at_a_missing_checkpoint(data_dir, tmp_path,
                                                                                           monkeypatch):
    """A fork of a checkpoint whose run's best checkpoint is gone (or a checkpoint copied out alone) holds no best
    checkpoint: its resume must not point best.json at the trainer state's best_step, which it does not hold
    (checkpoint_pointer, report.md, `tinygemma report` would then refuse the run)."""
    out = tmp_path / "r"
    train_to_step_6_with_best_at_3(data_dir, out, monkeypatch)
    shutil.rmtree(out / "checkpoints" / "step_000003")  # the best, gone
    fork = tmp_path / "fork"
    fork_run(out / "checkpoints" / "step_000006", fork)
    run(data_dir, fork, *FORK_SETTINGS, stop_at=7, resume=True)  # worse again: the state's best stays step 3
    best = checkpoint_pointer(fork, "best")  # (raised "... names .../step_000003, which is not a complete checkpoint")
    assert best is None  # (none of its checkpoints is the run's best)
    assert sorted(p.name for p in (fork / "checkpoints").iterdir()) == ["last.json", "step_000006", "step_000007"]
    loaded, last = tinygemma.load(fork), tinygemma.load(fork / "checkpoints" / "step_000007")  # the run: its last
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), last.state_dict().values()))


def test_a_later_validation_loss_equal_to_the_best_leaves_best_json_at_the_first(data_dir, tmp_path, monkeypatch):
    """best.json names the checkpoint that first reached the lowest validation loss: a later checkpoint that only
    equals it (a plateau, a learning rate of 0) is no better, and tinygemma.load(RUN) keeps the earlier one."""
    script_val_losses(monkeypatch, [9.0, 3.0, 3.0, 3.0])  # steps 0, 10, 20, 30
    out = tmp_path / "run"
    summary = run(data_dir, out, "max_steps=30", "checkpoint_interval=10", "keep_checkpoints=1")
    assert val_losses(out) == {0: 9.0, 10: 3.0, 20: 3.0, 30: 3.0}
    ckpts = out / "checkpoints"
    best = json.loads((ckpts / "best.json").read_text())
    assert (best["dir"], best["step"]) == ("step_000010", 10)
    assert summary["best_step"] == 10
    state = json.loads((ckpts / "step_000030" / "trainer_state.json").read_text())
    assert state["best_step"] == 10
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.json", "last.json", "step_000010", "step_000030"]


def test_a_log_line_of_the_first_step_alone_counts_the_reads_wait(data_dir, tmp_path, monkeypatch):
    """A log line whose interval holds only this invocation's first step (log_interval=1) takes its rate over the
    step's time and the wait for the device at its read (here 0.3 s), not over the step's host time alone."""
    slow_reads(monkeypatch, 0.3)
    out = tmp_path / "run"
    train(load_recipe(None, tiny_settings(data_dir, out, "max_steps=2", "warmup_steps=1", "log_interval=1",
                                          "eval_interval=100")), quiet=True)
    records = [r for r in metrics(out) if "train_loss" in r]
    assert [r["step"] for r in records] == [1, 2] and all("tokens_per_s" in r for r in records)
    assert records[0]["tokens_per_s"] < 256 / 0.3  # the first step's line: its read's wait is in its time


def test_a_changed_dtype_on_resume_is_said_once_as_a_changed_setting(data_dir, tmp_path, capsys):
    """A resume with another train.dtype is named among the changed settings; the precision warning, which is for
    the same setting resolving to another precision (auto on another device), does not say it a second time."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", stop_at=2)
    capsys.readouterr()
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", "dtype=bfloat16", resume=True)
    err = capsys.readouterr().err
    assert "dtype float32 -> bfloat16" in err
    assert "where the steps before it computed in" not in err


def test_a_resume_on_data_prepared_before_digests_were_recorded_is_not_refused(data_dir, tmp_path):
    """A checkpoint records the data's digests; the same data whose meta.json records none (prepared by a
    tinygemma from before they were recorded) has nothing to compare them with and resumes."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    out = tmp_path / "run"
    run(data, out, "max_steps=4", "checkpoint_interval=2", stop_at=2)
    state = json.loads((out / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["data"]["train_blake2b"] and state["data"]["val_blake2b"]
    meta = json.loads((data / "meta.json").read_text())
    for split in meta["splits"].values():
        split.pop("blake2b", None)
    (data / "meta.json").write_text(json.dumps(meta))
    assert run(data, out, "max_steps=4", "checkpoint_interval=2", resume=True)["step"] == 4


def test_init_from_refuses_weights_of_other_layer_types_than_their_pattern():
    """Weights whose own layer_types list (not their pattern's) puts the global layer elsewhere are another model:
    refused, naming layer_types, where the configured model has the pattern's layers."""
    want = tinygemma.ModelConfig.preset("gemma3-tiny", n_layers=2, sliding_window_pattern=2)
    have = tinygemma.ModelConfig.preset("gemma3-tiny", n_layers=2, sliding_window_pattern=2,
                                        layer_types=["full_attention", "sliding_attention"])
    assert have.layer_types != want.layer_types and dataclasses.replace(have, layer_types=None) != have
    with pytest.raises(tinygemma.UserError, match=re.escape("layer_types ['full_attention', 'sliding_attention'] where the "
                                                            "recipe has ['sliding_attention', 'full_attention']")):
        check_initial_model("run", have, want)


def test_a_split_of_exactly_block_size_tokens_is_refused_as_shorter_than_one_window():
    """A window is block_size + 1 tokens (the inputs and their shifted targets): a split of block_size tokens holds
    none, and the start says so in one line (not a crash when the first batch is drawn)."""
    cfg = TrainConfig(block_size=32)
    model = tinygemma.ModelConfig.preset("gemma3-tiny", n_layers=2, sliding_window_pattern=2)
    check_shapes(cfg, model, Path("data"), np.zeros(33, np.uint16), np.zeros(33, np.uint16))  # one window each
    with pytest.raises(tinygemma.UserError, match="the val split of data holds 32 tokens, fewer than one window of "
                                                  "block_size \\+ 1 = 33"):
        check_shapes(cfg, model, Path("data"), np.zeros(33, np.uint16), np.zeros(32, np.uint16))


def test_a_vocabulary_padding_the_recipe_sets_is_the_runs_on_a_cpu(data_dir, tmp_path):
    """model.vocab_pad_multiple given is the run's on any device (a CPU's default is 1): config.json and the
    checkpoint's model record it, and the embedding has the padded rows."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=2", "warmup_steps=1", "model.vocab_pad_multiple=96")
    assert json.loads((out / "config.json").read_text())["model"]["vocab_pad_multiple"] == 96
    model = tinygemma.load(out / "checkpoints" / "step_000002")
    assert model.config.vocab_pad_multiple == 96
    assert model.state_dict()["embed_tokens.weight"].shape[0] == 576  # 512 padded to a multiple of 96


def test_check_run_refuses_a_resume_whose_optimizer_file_is_truncated(data_dir, tmp_path):
    """The dry run checks the files the resume reads from their headers: a truncated optimizer.safetensors is
    refused as the resume itself refuses it, not said to be fine."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=4", "checkpoint_interval=2", stop_at=2)
    recipe = load_recipe(None, tiny_settings(data_dir, out, "max_steps=4", "checkpoint_interval=2"))
    assert check_run(recipe, resume=True)["start"] == 2
    optimizer = out / "checkpoints" / "step_000002" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:40])  # its header cut off
    with pytest.raises(tinygemma.UserError, match="not a readable safetensors file"):
        check_run(recipe, resume=True)


def test_a_run_whose_start_failed_after_its_trackers_files_starts_again(data_dir, tmp_path):
    """A folder that holds only what training writes before config.json (the trackers' tb/ and trackers.json: a
    tracker that could not start, a full disk) is a run whose start failed, and training starts in it again."""
    out = tmp_path / "run"
    (out / "tb").mkdir(parents=True)
    (out / TRACKERS_STATE).write_text("{}")
    assert run(data_dir, out, "max_steps=2", "warmup_steps=1")["step"] == 2
    assert (out / "config.json").exists()


def test_a_fork_not_trained_now_is_not_said_to_take_new_settings_for_the_steps_from_here():
    """A fork not yet trained, run again with --stop-at at its step (it trains nothing), with settings other than
    the ones it recorded: no step takes them now, so the warning is the one that says so, not 'the steps from here
    take this invocation's'."""
    def settings(rate):
        return TrainConfig(max_steps=8, warmup_steps=1, learning_rate=rate)

    source, recorded, now = settings(1e-2), settings(5e-3), settings(3e-3)
    trains = check_resume_settings(dataclasses.asdict(source), now, 2, None, True, dataclasses.asdict(recorded))
    assert trains.startswith("resuming the fork at step 2 with settings other than those it recorded")
    assert check_resume_settings(dataclasses.asdict(source), recorded, 2, None, True, dataclasses.asdict(recorded)) \
        is None  # the fork trained with what it recorded: no warning of its source's settings
    idle = check_resume_settings(dataclasses.asdict(source), now, 2, 2, True, dataclasses.asdict(recorded))
    assert idle.startswith("the fork is at step 2 of 8 with settings other than its source's: learning_rate")
    assert "--stop-at (stop_at) 2 trains no step now" in idle


def test_a_fork_under_torchrun_is_refused_by_process_0_in_words(monkeypatch):
    """--resume-from under torchrun is refused by every process; process 0 says it (the others' refusal is
    marked as said by process 0), so the user reads it once, not never."""
    monkeypatch.setattr(tinygemma.train, "env_world_size", lambda: 2)
    said = {}
    for rank in (0, 1):
        monkeypatch.setattr(tinygemma.train, "env_rank", lambda rank=rank: rank)
        with pytest.raises(tinygemma.UserError, match="makes the run's folder in one process") as refused:
            check_fork_processes("src/checkpoints/step_000002", "fork")
        said[rank] = getattr(refused.value, "shown_by_rank_0", False)
    assert said == {0: False, 1: True}


def test_validation_records_count_the_tokens_of_their_own_step(data_dir, tmp_path):
    """A validation or sample record's `tokens` are those trained up to its step (step 0: none), as the train
    records' (loss.png and the trackers plot validation against them)."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=4", "warmup_steps=1", "eval_interval=2", "checkpoint_interval=0",
        "sample_interval=2", "generate.max_new_tokens=2")
    per_step = json.loads((out / "config.json").read_text())["run"]["tokens_per_step"]
    vals = [r for r in metrics(out) if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 2, 4]
    assert [r["tokens"] for r in vals] == [0, 2 * per_step, 4 * per_step]
    samples = [r for r in metrics(out) if "samples" in r]
    assert [(r["step"], r["tokens"]) for r in samples] == [(2, 2 * per_step), (4, 4 * per_step)]


def test_metrics_jsonl_is_written_at_each_log_line_not_only_at_evaluations(data_dir, tmp_path, monkeypatch):
    """log_interval is "a log line (and a metrics flush) every this many steps": a run's metrics.jsonl holds each
    logged step's record before the next step, not only once an evaluation or checkpoint comes."""
    out, seen, step = tmp_path / "run", [], tinygemma.train.Trainer.step

    def counting(self, s):
        path = out / "metrics.jsonl"
        seen.append(sum(1 for line in path.read_text().splitlines() if '"train_loss"' in line))
        return step(self, s)

    monkeypatch.setattr(tinygemma.train.Trainer, "step", counting)
    run(data_dir, out, "max_steps=5", "warmup_steps=1", "log_interval=1", "eval_interval=0",
        "checkpoint_interval=0")
    assert seen == [0, 1, 2, 3, 4]


def test_samples_with_no_prompts_record_nothing(data_dir, tmp_path):
    """generate.prompts= (none) with a sample_interval samples nothing: no empty `samples` record."""
    out = tmp_path / "run"
    summary = run(data_dir, out, "max_steps=4", "warmup_steps=1", "sample_interval=2", "generate.prompts=")
    assert summary["step"] == 4 and any("val_loss" in r for r in metrics(out))
    assert not any("samples" in r for r in metrics(out))


def test_the_trainer_state_names_the_step_its_next_batch_is_drawn_from(data_dir, tmp_path):
    """trainer_state.json's data.next_step is the (0-based) step whose windows the resume draws next: the
    checkpoint's own step number, since step N's batch is drawn by Batches.get(N - 1)."""
    out = tmp_path / "run"
    run(data_dir, out, "max_steps=4", "warmup_steps=1", stop_at=2)
    state = json.loads((out / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data"]["next_step"] == 2


def test_the_eta_of_an_invocations_first_step_alone_is_the_steps_left_at_that_steps_time(data_dir, tmp_path,
                                                                                         monkeypatch, capsys):
    """Before a second step the ETA is the steps left at the first step's rate: a first step of 2 s or more
    leaves 3 more at 2 s or more each (not tokens_per_step / rate inverted, which read 0m01s)."""
    rates = tinygemma.train.set_learning_rates

    def slow_first(optimizer, step, cfg):
        if step == 0:
            time.sleep(2.0)  # inside the step's clock
        return rates(optimizer, step, cfg)

    monkeypatch.setattr(tinygemma.train, "set_learning_rates", slow_first)
    train(load_recipe(None, tiny_settings(data_dir, tmp_path / "r", "max_steps=4", "warmup_steps=1", "log_interval=1",
                                          "eval_interval=0", "checkpoint_interval=0")))
    assert eta_seconds(capsys.readouterr().out, 1) >= 5


def test_a_run_stopped_inside_its_profiled_steps_leaves_no_profiler_running(data_dir, tmp_path, monkeypatch):
    """A run that stops inside --profile's steps stops its torch profiler: the caller (a notebook) is not left
    profiling every operator it runs after."""
    step = tinygemma.train.Trainer.step

    def stopping(self, s):
        if s == 2:
            raise RuntimeError("stopped inside the profiled steps")
        return step(self, s)

    monkeypatch.setattr(tinygemma.train.Trainer, "step", stopping)
    with pytest.raises(RuntimeError, match="inside the profiled steps"):
        run(data_dir, tmp_path / "r", "max_steps=6", "warmup_steps=1", "eval_interval=0", "checkpoint_interval=0",
            profile="2:4")
    assert not torch.autograd.profiler._is_profiler_enabled
