"""Bad input across every command: one clear line on stderr, a non-zero exit, no traceback, and every
existing output left exactly as it was. One table, one test per row."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tinygemma.cli as cli
from tinygemma.checkpoint import export
from tinygemma.cli import main
from tinygemma.config import load_recipe
from tinygemma.data import prepare
from tinygemma.train import train


@pytest.fixture(scope="module")
def world(tmp_path_factory, stories_dir):
    """A prepared GPT-2 dataset, a BPE dataset, a trained tiny run, its hf export, and a few broken files beside
    them."""
    root = tmp_path_factory.mktemp("world")
    prepare(root / "data", sources=[str(stories_dir / "train.txt")], tokenizer="gpt2", limit=300, progress=False)
    prepare(root / "bpe", sources=[str(stories_dir / "train.txt")], tokenizer="bpe", vocab_size=300, limit=100,
            progress=False)
    recipe = load_recipe(None, [
        f"data.dir={root / 'data'}", f"train.out={root / 'run'}", "model.preset=gemma3-tiny", "model.d_model=32",
        "model.n_layers=2", "model.head_dim=8", "model.mlp_dim=64", "model.sliding_window=8", "batch_size=2",
        "block_size=16", "grad_accum_steps=1", "max_steps=2", "eval_interval=1", "eval_batches=1",
        "checkpoint_interval=1", "warmup_steps=1", "device=cpu", "dtype=float32", "compile=false",
    ])
    train(recipe, quiet=True)
    export(root / "run", root / "hf")
    stories = (stories_dir / "valid.txt").read_text(encoding="utf-8").split("<|endoftext|>")[:40]
    (root / "stories.txt").write_text("\n<|endoftext|>\n".join(stories), encoding="utf-8")
    (root / "notutf8.txt").write_bytes(b"Once upon a time \xff\xfe\xfa there was a cat.\n")
    (root / "empty.txt").write_text("\n<|endoftext|>\n   \n")
    (root / "bad.toml").write_text("[train\nbatch_size = ")
    # Sources that read as data but are not text: a JSON escape of a lone surrogate, JSON nested past Python's
    # recursion limit, a parquet file and a datasets directory whose text column holds numbers, and a datasets
    # directory whose index is not JSON.
    (root / "surrogate.jsonl").write_text('{"text": "Once upon a time \\udc00 there was a cat."}\n')
    (root / "deep.json").write_text("[" * 100_000)
    long_number = '{"text": "a story", "id": ' + "9" * 5000 + "}"  # past Python's 4,300 digits of int()
    (root / "long_number.jsonl").write_text('{"text": "a story"}\n' + long_number + "\n")
    (root / "long_number.json").write_text(f"[{long_number}]")
    (root / "one_object.json").write_text('{\n  "text": "Once upon a time."\n}\n')  # pretty-printed, one story
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, models, pre_tokenizers

    pq.write_table(pa.table({"text": list(range(10))}), root / "numbers.parquet")
    datasets.Dataset.from_dict({"text": list(range(10))}).save_to_disk(str(root / "numbers_ds"))
    (root / "broken_ds").mkdir()
    (root / "broken_ds" / "dataset_dict.json").write_text("{not json")
    (root / "tokdir" / "tokenizer.json").mkdir(parents=True)  # a folder where the file should be
    (root / "stories.csv").write_text("text\nOnce upon a time.\n")
    # A tokenizer.json that cannot encode every text: a word-level vocabulary with no unknown token.
    words = Tokenizer(models.WordLevel(vocab={"<|endoftext|>": 0, "Once": 1}))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.add_special_tokens(["<|endoftext|>"])
    words.save(str(root / "words.json"))
    # A dataset whose train.bin was truncated after prepare.
    truncated = root / "truncated"
    truncated.mkdir()
    for name in ("meta.json", "train.bin", "val.bin"):
        (truncated / name).write_bytes((root / "data" / name).read_bytes())
    data = (truncated / "train.bin").read_bytes()
    (truncated / "train.bin").write_bytes(data[: len(data) // 2 + 1])
    # A checkpoint whose config says another architecture than its weights.
    other = root / "other"
    other.mkdir()
    ckpt = Path(json.loads((root / "run" / "checkpoints" / "last.json").read_text())["dir"])
    for f in (root / "run" / "checkpoints" / ckpt).iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    meta = json.loads((other / "checkpoint.json").read_text())
    meta["model"]["n_layers"], meta["model"]["layer_types"] = 3, None
    (other / "checkpoint.json").write_text(json.dumps(meta))
    return root


REPO = Path(__file__).resolve().parents[1]
RUN_ARGS = ["--set", "batch_size=2", "--set", "block_size=16", "--set", "device=cpu", "--set", "compile=false"]

# (id, argv with {root} for the fixture directory, words the error line must contain)
CASES = [
    ("prepare-missing-file", ["prepare", "--out", "{root}/new", "--source", "{root}/nope.txt"], "not found"),
    ("prepare-empty-corpus", ["prepare", "--out", "{root}/new", "--source", "{root}/empty.txt"], "empty"),
    ("prepare-empty-corpus-for-a-bpe", ["prepare", "--out", "{root}/new", "--source", "{root}/empty.txt",
                                        "--tokenizer", "bpe", "--vocab-size", "300"], "the training corpus is empty"),
    ("prepare-not-utf8", ["prepare", "--out", "{root}/new", "--source", "{root}/notutf8.txt"], "UTF-8"),
    ("prepare-lone-surrogate", ["prepare", "--out", "{root}/data", "--source", "{root}/surrogate.jsonl"],
     "lone surrogate"),
    ("prepare-json-nested-too-deep", ["prepare", "--out", "{root}/data", "--source", "{root}/deep.json"],
     "nested too deeply"),
    ("prepare-jsonl-number-too-long", ["prepare", "--out", "{root}/data", "--source", "{root}/long_number.jsonl"],
     "line 2 is not JSON (Exceeds the limit (4300 digits)"),
    ("prepare-json-number-too-long", ["prepare", "--out", "{root}/data", "--source", "{root}/long_number.json"],
     "is not JSON that Python reads (Exceeds the limit (4300 digits)"),
    ("prepare-json-one-object-over-lines", ["prepare", "--out", "{root}/data", "--source", "{root}/one_object.json"],
     "line 1 is not JSON (Expecting property name enclosed in double quotes): a .json file of stories holds a JSON "
     "array of objects"),
    ("prepare-parquet-numbers", ["prepare", "--out", "{root}/data", "--source", "{root}/numbers.parquet"],
     "'text' column holds int64, not text"),
    ("prepare-dataset-numbers", ["prepare", "--out", "{root}/data", "--source", "{root}/numbers_ds"],
     "'text' column holds int64, not text"),
    ("prepare-broken-dataset-dir", ["prepare", "--out", "{root}/data", "--source", "{root}/broken_ds"],
     "not a readable datasets directory"),
    ("prepare-tokenizer-that-cannot-encode", ["prepare", "--out", "{root}/data", "--source", "{root}/stories.txt",
                                              "--tokenizer", "{root}/words.json"], "cannot encode the text"),
    ("prepare-unknown-tokenizer", ["prepare", "--out", "{root}/new", "--source", "{root}/notutf8.txt",
                                   "--tokenizer", "gpt5"], "tokenizer"),
    ("prepare-over-existing-data", ["prepare", "--out", "{root}/data", "--source", "{root}/empty.txt"], ""),
    # Outputs that are not prepare's: a transformers export (its tokenizer.json), a run, a path under a file.
    ("prepare-into-an-export", ["prepare", "--out", "{root}/hf", "--source", "{root}/stories.txt"],
     "not a prepared dataset"),
    ("prepare-into-a-run", ["prepare", "--out", "{root}/run", "--source", "{root}/stories.txt"],
     "not a prepared dataset"),
    ("prepare-under-a-file", ["prepare", "--out", "{root}/run/metrics.jsonl/new", "--source", "{root}/stories.txt"],
     "is a file, not a folder"),
    ("train-missing-data", ["train", "--data", "{root}/nowhere", "--out", "{root}/new"], "not a prepared dataset"),
    ("train-truncated-tokens", ["train", "--data", "{root}/truncated", "--out", "{root}/new"], "truncated"),
    ("train-unknown-key", ["train", "--data", "{root}/data", "--out", "{root}/new", "--set", "bach_size=4"],
     "bach_size"),
    ("train-ill-typed-value", ["train", "--data", "{root}/data", "--out", "{root}/new", "--set", "batch_size=four"],
     "batch_size"),
    ("train-batch-size-zero", ["train", "--data", "{root}/data", "--out", "{root}/new", "--set", "batch_size=0"],
     "batch_size"),
    ("train-unknown-model-field", ["train", "--data", "{root}/data", "--out", "{root}/new", "--set",
                                   "model.n_layer=4"], "model.n_layer"),
    ("train-vocab-too-small", ["train", "--data", "{root}/data", "--out", "{root}/new", "--model", "gemma3-tiny",
                               "--set", "model.vocab_size=1000"] + RUN_ARGS, "vocab_size"),
    ("train-min-lr-above-lr", ["train", "--data", "{root}/data", "--out", "{root}/new", "--set",
                               "learning_rate=1e-4", "--set", "min_lr=1e-3"], "min_lr"),
    ("train-over-existing-run", ["train", "--data", "{root}/data", "--out", "{root}/run"] + RUN_ARGS, "--resume"),
    ("train-flag-and-set-disagree", ["train", "--data", "{root}/data", "--out", "{root}/new", "--max-steps", "3",
                                     "--set", "max_steps=2"], "--max-steps and --set max_steps=2"),
    ("train-out-flag-and-set", ["train", "--data", "{root}/data", "--out", "{root}/new", "--set",
                                "train.out={root}/new2"], "--out and --set"),
    ("train-bad-recipe-file", ["train", "--config", "{root}/bad.toml"], "TOML"),
    ("train-missing-recipe-file", ["train", "--config", "{root}/nope.toml"], "not found"),
    ("train-recipe-not-utf8", ["train", "--config", "{root}/notutf8.txt"], "not UTF-8 text, as TOML is"),
    ("train-recipe-a-folder", ["train", "--config", "{root}/data"], "is a folder, not a TOML file"),
    ("train-learning-rate-past-float32", ["train", "--data", "{root}/data", "--out", "{root}/new", "--model",
                                          "gemma3-tiny", "--max-steps", "1", "--set", "learning_rate=1e300"]
     + RUN_ARGS, "train.learning_rate must be a positive number within float32's range"),
    ("train-adamw-first-step-past-float32", ["train", "--data", "{root}/data", "--out", "{root}/new", "--model",
                                             "gemma3-tiny", "--max-steps", "1", "--set", "learning_rate=1e38"]
     + RUN_ARGS, "train.learning_rate / (1 - train.beta1) (AdamW's first step size) must be within float32's range, "
                 "got 1e+38 / (1 - 0.9)"),  # a traceback from AdamW's step, and a run folder left behind
    ("train-muon-step-past-float32", ["train", "--data", "{root}/data", "--out", "{root}/new", "--model",
                                      "gemma3-tiny", "--max-steps", "1", "--set", "optimizer=muon", "--set",
                                      "muon_learning_rate=2.5e38", "--set", "warmup_steps=0"] + RUN_ARGS,
     "train.muon_learning_rate x 2 (Muon's step on this model's tallest matrices) must be within float32's range"),
    ("generate-device-not-ours", ["generate", "--ckpt", "{root}/run", "--prompt", "Once", "--device", "meta"],
     "unknown device 'meta'"),
    ("eval-device-not-ours", ["eval", "--ckpt", "{root}/run", "--data", "{root}/data", "--device", "cpu:1"],
     "unknown device 'cpu:1'"),
    ("run-missing-recipe", ["run", "{root}/nope.toml"], "not found"),
    ("run-recipe-a-folder", ["run", "{root}/data"], "is a folder, not a TOML file"),  # said "not found"
    ("run-tokenizer-empty", ["run", "{repo}/configs/cpu-demo.toml", "--set", "data.tokenizer="],
     "data.tokenizer must name a tokenizer: gpt2, bpe or a tokenizer.json path, got ''"),
    ("run-bad-sampling-setting", ["run", "{repo}/configs/cpu-demo.toml", "--set", "generate.top_p=1.5",
                                  "--set", "data.dir={root}/new"], "top_p"),
    # run's outputs are the recipe's settings, checked before anything is prepared (data.dir {root}/new).
    ("run-into-a-dataset", ["run", "{repo}/configs/cpu-demo.toml", "--set", "train.out={root}/data",
                            "--set", "data.dir={root}/new"], "train.out"),
    ("run-into-a-file", ["run", "{repo}/configs/cpu-demo.toml", "--set", "train.out={root}/stories.txt",
                         "--set", "data.dir={root}/new"], "train.out"),
    ("run-data-into-a-run", ["run", "{repo}/configs/cpu-demo.toml", "--set", "data.dir={root}/run",
                             "--set", "train.out={root}/new"], "data.dir"),
    ("train-absent-cuda", ["train", "--data", "{root}/data", "--out", "{root}/new"] + RUN_ARGS[:6]
     + ["--set", "device=cuda"], "no CUDA GPU"),
    ("generate-absent-cuda", ["generate", "--ckpt", "{root}/run", "--prompt", "Once", "--device", "cuda"],
     "no CUDA GPU"),
    # An empty path (an unset shell variable: --out "$RUN") read as the current folder, or let a default stand in
    # A recipe's data not yet prepared: `prepare --out DIR`, which the plain refusal suggests, ignores its [data]
    ("train-recipe-data-unprepared", ["train", "--config", "{repo}/configs/cpu-demo.toml", "--set",
                                      "data.dir={root}/new", "--set", "out={root}/new-run"],
     "{root}/new (data.dir) is not prepared yet: `tinygemma prepare --out {root}/new --tokenizer bpe --vocab-size "
     "4096 --limit 5000` prepares it as the recipe's [data] asks; then run this command again"),
    ("prepare-tokenizer-file-missing", ["prepare", "--out", "{root}/new", "--source", "{root}/stories.txt",
                                        "--tokenizer", "{root}/nowhere/tokenizer.json"],
     "tokenizer file not found: {root}/nowhere/tokenizer.json"),  # not "unknown tokenizer", naming what was given
    ("prepare-tokenizer-json-a-folder", ["prepare", "--out", "{root}/new", "--source", "{root}/stories.txt",
                                         "--tokenizer", "{root}/tokdir"],
     "{root}/tokdir/tokenizer.json is a folder, not a tokenizer.json"),  # was errno 21 and exit 1, a machine's
    ("train-data-with-a-space", ["train", "--data", "{root}/new dir", "--out", "{root}/new-run"],
     "no such folder; give the folder that `tinygemma prepare --out` wrote, or make this one with `tinygemma "
     "prepare --out '{root}/new dir'` and the --source and --tokenizer you mean"),  # a command that pastes whole
    ("run-empty-source-path", ["run", "{repo}/configs/cpu-demo.toml", "--set", 'data.source=[""]', "--set",
                               "data.dir={root}/new", "--set", "out={root}/new-run"], "an empty path"),
    ("train-empty-out-set", ["train", "--set", "out="], "train.out is empty: it must name the run's folder"),
    ("train-empty-data-set", ["train", "--set", "data.dir= "], "data.dir is empty: it must name the prepared data"),
    ("generate-missing-ckpt", ["generate", "--ckpt", "{root}/nowhere", "--prompt", "Once"], "not found"),
    ("generate-negative-temperature", ["generate", "--ckpt", "{root}/run", "--prompt", "Once",
                                       "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    ("generate-top-p-above-one", ["generate", "--ckpt", "{root}/run", "--prompt", "Once", "--top-p", "1.5"],
     "--top-p must be a number in (0, 1]"),
    ("generate-top-k-negative", ["generate", "--ckpt", "{root}/run", "--prompt", "Once", "--top-k", "-1"], "--top-k must be an integer >= 1"),
    ("generate-negative-length", ["generate", "--ckpt", "{root}/run", "--prompt", "Once", "--max-new-tokens",
                                  "-3"], "--max-new-tokens must be an integer >= 0"),
    # (read every token: read at most the trained block, the default, a text of any length reads no position past it)
    ("generate-past-the-positions", ["generate", "--ckpt", "{root}/run", "--prompt", "Once", "--max-new-tokens",
                                     "100000000", "--context", "all"], "max_position_embeddings"),
    ("generate-zero-samples", ["generate", "--ckpt", "{root}/run", "--prompt", "Once", "--num-samples", "0"],
     "num-samples"),
    ("generate-other-architecture", ["generate", "--ckpt", "{root}/other", "--prompt", "Once"],
     "does not match"),
    ("eval-wrong-tokenizer", ["eval", "--ckpt", "{root}/run", "--data", "{root}/bpe"], "but the checkpoint uses gpt2"),
    # --tokenizer naming another vocabulary than the checkpoint's own: its ids would mean other text.
    ("eval-given-another-tokenizer", ["eval", "--ckpt", "{root}/run", "--data", "{root}/bpe", "--tokenizer",
                                      "{root}/bpe/tokenizer.json"], "is not the tokenizer"),
    ("generate-given-another-tokenizer", ["generate", "--ckpt", "{root}/run", "--prompt", "Once", "--tokenizer",
                                          "{root}/bpe/tokenizer.json"], "is not the tokenizer"),
    ("generate-export-given-another-tokenizer", ["generate", "--ckpt", "{root}/hf", "--prompt", "Once",
                                                 "--tokenizer", "{root}/bpe/tokenizer.json"], "is not the tokenizer"),
    ("eval-truncated-tokens", ["eval", "--ckpt", "{root}/run", "--data", "{root}/truncated"], "truncated"),
    ("eval-missing-data", ["eval", "--ckpt", "{root}/run", "--data", "{root}/nowhere"], "not a prepared dataset"),
    # The run folder given for its data: not "run prepare --out" there, which would refuse the run's folder.
    ("eval-run-as-data", ["eval", "--ckpt", "{root}/run", "--data", "{root}/run"],
     "is a training run, not a prepared dataset: give the folder its data was prepared in, "),
    # A checkpoint's folder, or an export: not prepare's to fill either.
    ("eval-checkpoint-as-data", ["eval", "--ckpt", "{root}/run", "--data", "{root}/other"],
     "is not a prepared dataset (no meta.json) and holds other files; give the folder that `tinygemma prepare"),
    ("eval-export-as-data", ["eval", "--ckpt", "{root}/run", "--data", "{root}/hf"],
     "is not a prepared dataset (no meta.json) and holds other files"),
    ("eval-meta-json-as-data", ["eval", "--ckpt", "{root}/run", "--data", "{root}/data/meta.json"],
     "is a file of a prepared dataset; give its folder, "),
    ("eval-weights-as-data", ["eval", "--ckpt", "{root}/run", "--data", "{root}/hf/model.safetensors"],
     "is a file, not a prepared dataset; give the folder that `tinygemma prepare --out` wrote"),
    ("eval-csv-as-data", ["eval", "--ckpt", "{root}/run", "--data", "{root}/stories.csv"],  # named no story format
     "wrote (story files, which prepare and eval read, are .txt, .jsonl, .json, .parquet)"),
    ("train-story-file-as-data", ["train", "--data", "{root}/stories.txt", "--out", "{root}/new"],
     "tokenize it first with `tinygemma prepare --source"),  # (eval reads it: test_evaluation.py)
    ("export-given-another-tokenizer", ["export", "--ckpt", "{root}/run", "--out", "{root}/new", "--tokenizer",
                                        "{root}/bpe/tokenizer.json"], "is not the tokenizer"),
    ("export-gguf-given-another-tokenizer", ["export", "--ckpt", "{root}/run", "--format", "gguf", "--out",
                                             "{root}/new", "--tokenizer", "{root}/bpe/tokenizer.json"],
     "is not the tokenizer"),
    ("export-missing-ckpt", ["export", "--ckpt", "{root}/nowhere", "--out", "{root}/new"], "not found"),
    # generate and eval take auto, their default, as well: the refusal named only the others
    ("generate-unknown-dtype", ["generate", "--ckpt", "{root}/run", "--prompt", "Once", "--dtype", "bogus"],
     "unknown dtype 'bogus'; choose auto, float32, bfloat16 or float16"),
    ("export-other-architecture", ["export", "--ckpt", "{root}/other", "--out", "{root}/new"], "does not match"),
    # Outputs that are not export's: the run itself (its config.json is what --resume reads), a dataset, another
    # folder, a path under a file, and for gguf any existing file that is not GGUF.
    ("export-push-to-hub-without-user", ["export", "--ckpt", "{root}/run", "--out", "{root}/new", "--push-to-hub",
                                         "bad"], "USER/NAME"),
    ("export-into-its-run", ["export", "--ckpt", "{root}/run", "--out", "{root}/run"], "is a training run"),
    ("export-into-a-dataset", ["export", "--ckpt", "{root}/run", "--out", "{root}/data"], "is a prepared dataset"),
    ("export-into-a-checkpoint", ["export", "--ckpt", "{root}/run", "--out", "{root}/other"],
     "not an earlier export"),
    ("export-under-a-file", ["export", "--ckpt", "{root}/run", "--out", "{root}/run/metrics.jsonl/new"],
     "is a file, not a folder"),
    ("export-gguf-over-run-config", ["export", "--ckpt", "{root}/run", "--format", "gguf", "--out",
                                     "{root}/run/config.json"], "not a GGUF file"),
    ("export-gguf-over-token-file", ["export", "--ckpt", "{root}/run", "--format", "gguf", "--out",
                                     "{root}/data/train.bin"], "not a GGUF file"),
    # An empty --dtype (a script's unset "$DTYPE") was taken for the default, q8_0, with no word said
    ("export-gguf-empty-dtype", ["export", "--ckpt", "{root}/run", "--format", "gguf", "--out", "{root}/new.gguf",
                                 "--dtype", ""], "unknown --dtype '' for gguf"),
]


def snapshot(root: Path) -> dict[str, str]:
    """Hash of every file under root: an error must leave all of them as they were."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case_id,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(world, capsys, case_id, argv, words):
    if case_id.endswith("absent-cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    before = snapshot(world)
    code = main([a.replace("{root}", str(world)).replace("{repo}", str(REPO)) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert code != 0, f"{case_id}: exit status 0"
    assert "Traceback" not in err
    assert len(lines) == 1 and " error: " in lines[0], f"{case_id}: stderr was {err!r}"
    words = words.replace("{root}", str(world)).replace("{repo}", str(REPO))
    assert words in lines[0], f"{case_id}: {lines[0]!r} does not mention {words!r}"
    assert snapshot(world) == before, f"{case_id}: existing outputs changed"
    assert not (world / "new").exists(), f"{case_id}: left a partial output"


def test_commands_torchrun_does_not_share_out_are_refused_under_it(world, tmp_path, capsys, monkeypatch):
    """eval, generate, export and prepare started once per GPU each did the whole work on the first GPU, writing the
    same files at once: refused in one line under torchrun with more than one process; one process, or a stray
    WORLD_SIZE outside torchrun, changes nothing."""
    torchrun = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x",
                "MASTER_ADDR": "localhost", "MASTER_PORT": "29599"}
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    for argv in (["eval", "--ckpt", str(world / "run"), "--data", str(world / "data")],
                 ["generate", "--ckpt", str(world / "run"), "--prompt", "Once", "--max-new-tokens", "2"],
                 ["export", "--ckpt", str(world / "run"), "--out", str(tmp_path / "hf")],
                 ["prepare", "--source", str(world / "stories.txt"), "--out", str(tmp_path / "data")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"tinygemma {argv[0]}: error: {argv[0]} runs in one process, not one per GPU: run it without " \
                      "torchrun (train and run are the commands that share their work among torchrun's processes)"
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv("RANK", "1")  # the other processes refuse too, silently: the line is said once
    assert main(["eval", "--ckpt", str(world / "run"), "--data", str(world / "data")]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["generate", "--ckpt", str(world / "run"), "--prompt", "Once", "--max-new-tokens", "2"]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.delenv("LOCAL_RANK")
    assert main(["generate", "--ckpt", str(world / "run"), "--prompt", "Once", "--max-new-tokens", "2"]) == 0


def test_a_ctrl_c_under_torchrun_is_said_once_a_machine(monkeypatch, capsys):
    """torchrun passes a Ctrl-C on to every process it started: each said "interrupted" (two lines for two GPUs,
    eight for eight). The first on each machine (LOCAL_RANK 0) says it; every process still exits with 130."""
    import tinygemma.cli
    from tinygemma.errors import Terminated

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tinygemma.cli, "_train_main", interrupted)
    for name, value in {"WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "29599"}.items():
        monkeypatch.setenv(name, value)
    # two machines of two processes: ranks 0 and 2 are their machines' first
    for rank, local_rank, said in (("0", "0", "tinygemma train: interrupted\n"), ("1", "1", ""),
                                   ("2", "0", "tinygemma train: interrupted\n"), ("3", "1", "")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert main(["train"]) == 130 and capsys.readouterr().err == said
    monkeypatch.setattr(tinygemma.cli, "_train_main", lambda args: (_ for _ in ()).throw(Terminated()))
    assert main(["train"]) == 143 and capsys.readouterr().err == ""  # (process 3)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):  # no torchrun: said
        monkeypatch.delenv(name)
    assert main(["train"]) == 143 and capsys.readouterr().err == "tinygemma train: terminated\n"


def test_bad_input_in_a_real_process(world):
    """The same through the installed entry point: exit status 2, one stderr line, nothing on stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-m", "tinygemma", "generate", "--ckpt", str(world / "run"),
                             "--prompt", "Once", "--top-p", "2"], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--top-p must be" in result.stderr and "Traceback" not in result.stderr


def test_a_reader_that_leaves_the_pipe_stops_the_command_quietly(world):
    """`tinygemma generate ... | head`: once head has gone, writing to the pipe fails; the command stops with exit
    status 141 (128 + SIGPIPE, as a shell reports it) and adds nothing to stderr: no traceback, no error."""
    script = ("import os, sys\n"
              "read, write = os.pipe()\n"
              "os.close(read)\n"  # the reader is gone before the first line
              "os.dup2(write, 1)\n"
              "from tinygemma.cli import main\n"
              f"sys.exit(main(['generate', '--ckpt', {str(world / 'run')!r}, '--prompt', 'Once', "
              "'--max-new-tokens', '4', '--device', 'cpu']))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 141
    assert result.stderr.startswith("loaded ") and result.stderr.count("\n") == 1  # its one line of progress


def generate_replaced_by(body: str, setup: str = "") -> subprocess.CompletedProcess:
    """cli.main's `generate` in a fresh process, after `setup`, its work replaced by `body` (a function's body); the
    process prints the command's exit status on stdout and exits 0."""
    script = ("import os, sys\n" + setup + "import tinygemma.cli as cli\n"
              "def replaced(args):\n" + body + "cli._generate_main = replaced\n"
              "status = cli.main(['generate', '--ckpt', 'x', '--prompt', 'Once'])\n"
              "print(status, flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)


def test_a_broken_pipe_other_than_stdout_is_an_error():
    """A pipe or socket that is not stdout breaking (a tracker's service, a worker) is an error line and exit
    status 1, not the quiet stop of a reader that left: stdout here is a pipe still read."""
    result = generate_replaced_by("    raise BrokenPipeError(32, 'Broken pipe')\n")
    assert (result.returncode, result.stdout) == (0, "1\n"), result.stderr
    assert result.stderr == "tinygemma generate: error: [Errno 32] Broken pipe\n"


def test_running_out_of_memory_is_one_line_with_what_to_lower(world, capsys, monkeypatch):
    """A KV cache too large (the CPU allocator's error), a GPU's out of memory in training: one line
    naming the setting to lower, exit status 1, not a traceback. Any other RuntimeError stays a bug's traceback."""
    import tinygemma.cli as cli
    import tinygemma.generate

    def cpu_allocator(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 402653184000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(tinygemma.generate.Gemma3, "new_cache", cpu_allocator)
    assert main(["generate", "--ckpt", str(world / "run"), "--prompt", "Once", "--num-samples", "3",
                 "--max-new-tokens", "5"]) == 1
    err = capsys.readouterr().err.split("\n", 1)[1]  # after the line saying what was loaded
    assert err.count("\n") == 1 and err.startswith("tinygemma generate: error: out of memory ([enforce fail")
    assert err.endswith("; ask for fewer --num-samples or --max-new-tokens\n")

    def cuda(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 79.19 GiB\nof which 1.2 GiB is free.")

    monkeypatch.setattr(cli, "_train_main", cuda)
    assert main(["train", "--config", "configs/workshop.toml"]) == 1
    err = capsys.readouterr().err
    assert err == ("tinygemma train: error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has "
                   "a total capacity of 79.19 GiB); set train.micro_batch_size lower (or to auto, on CUDA), or "
                   "train.block_size, or choose a smaller model\n")

    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(tinygemma.generate.Gemma3, "new_cache", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["generate", "--ckpt", str(world / "run"), "--prompt", "Once", "--max-new-tokens", "5"])


def test_a_closed_stdout_or_stderr_is_no_failure(world, capsys):
    """A stream the shell closed (`>&-`, `2>&-`): generate with stdout closed gave a traceback, and a command whose
    first status line met a closed stderr stopped there, before its work, exit status 1 and silent. They now
    write what would go there to /dev/null and do their work. (The text with both streams open, to compare
    with, comes from main in this process: a third process would only import torch again.)"""
    import shlex

    argv = ["generate", "--ckpt", str(world / "run"), "--prompt", "Once", "--max-new-tokens", "3", "--temperature", "0"]
    command = shlex.join([sys.executable, "-m", "tinygemma", *argv])
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    no_stdout = subprocess.run(f"{command} >&-", shell=True, capture_output=True, text=True, env=env)
    assert no_stdout.returncode == 0 and "3 new tokens in" in no_stdout.stderr, no_stdout.stderr
    no_stderr = subprocess.run(f"{command} 2>&-", shell=True, capture_output=True, text=True, env=env)
    assert main(argv) == 0
    both = capsys.readouterr().out
    assert no_stderr.returncode == 0 and no_stderr.stdout == both and both.startswith("Once"), (no_stderr.stdout, both)


def test_a_reader_of_stderr_that_left_stops_the_command_quietly():
    """stderr's reader gone (`tinygemma run ... 2>&1 >log | grep -m1 warning`): a quiet stop with 141, as for
    stdout's, where the error line about it, written to the same broken pipe, failed again (exit 1)."""
    result = generate_replaced_by("    print('loaded', file=sys.stderr, flush=True)\n",
                                  setup="read, write = os.pipe()\nos.dup2(write, 2)\nos.close(read)\n")
    assert (result.returncode, result.stdout) == (0, "141\n"), result.stdout


def test_the_closed_reader_of_stdout_is_seen_on_a_pipe_and_a_socket(monkeypatch):
    """A pipe's closed reader is an error on the writing end; a socket's closed peer is a hang-up (Linux, and
    pipes on macOS): both are the reader that left. An open one, a file or a captured stdout is not."""
    import socket

    from tinygemma.cli import _reader_left

    read, write = os.pipe()
    mine, peer = socket.socketpair()
    try:
        for stream, close in ((os.fdopen(write, "w", closefd=False), lambda: os.close(read)),
                              (mine.makefile("w"), peer.close)):
            assert not _reader_left(stream)
            close()
            assert _reader_left(stream)
    finally:
        os.close(write)
        mine.close()
    assert not _reader_left(sys.stdout) and not _reader_left(sys.stderr)  # pytest's captured streams


def test_ctrl_c_while_the_command_is_still_importing_is_one_line(tmp_path):
    """`import tinygemma` leaves torch unimported, so the command's entry point (tinygemma.__main__:main, also
    `python -m tinygemma`) catches a Ctrl-C pressed while the CLI and torch load: one line, exit status 130, as
    one pressed later. The interrupt is planted at the import of the CLI, where a real one lands."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    light = subprocess.run([sys.executable, "-c", "import sys, tinygemma; print('torch' in sys.modules)"],
                           capture_output=True, text=True, env=env)
    assert light.stdout.strip() == "False", light.stderr
    script = ("import builtins\n"
              "real_import = builtins.__import__\n"
              "def planted(name, *args, **kwargs):\n"
              "    if name == 'tinygemma.cli':\n"
              "        raise KeyboardInterrupt\n"
              "    return real_import(name, *args, **kwargs)\n"
              "builtins.__import__ = planted\n"
              "from tinygemma.__main__ import main\n"
              "raise SystemExit(main())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "tinygemma: interrupted\n")
    # Earlier still, as the entry point's own module imports what handles the signals: it was a traceback
    earliest = script.replace("'tinygemma.cli'", "'tinygemma.errors'")
    result = subprocess.run([sys.executable, "-c", earliest], capture_output=True, text=True, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "tinygemma: interrupted\n")
    then_ctrl_c = "import atexit, os, signal\natexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n" + earliest
    result = subprocess.run([sys.executable, "-c", then_ctrl_c], capture_output=True, text=True, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "tinygemma: interrupted\n")  # held off
    # SIGTERM (a `timeout` that fires early) ended the process there with no word; it is one line and 143 now.
    term = script.replace("raise KeyboardInterrupt", "import os, signal, time; os.kill(os.getpid(), signal.SIGTERM); "
                                                     "time.sleep(5)")
    result = subprocess.run([sys.executable, "-c", term], capture_output=True, text=True, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (143, "", "tinygemma: terminated\n")
    # A SIGTERM after that Ctrl-C, as Python shuts down: it ended the process by SIGTERM (the shell's 143) after
    # the line that said "interrupted".
    then_term = ("import atexit, os, signal, time\n"
                 "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.5)))\n") + script
    result = subprocess.run([sys.executable, "-c", then_term], capture_output=True, text=True, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "tinygemma: interrupted\n")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'tinygemma = "tinygemma.__main__:main"' in pyproject  # the installed command goes through it too


def test_help_and_a_mistyped_option_come_without_importing_torch():
    """`tinygemma --help`, a command's --help and a mistyped option took 1.5 s, all of it importing torch and the
    modules that use it: the CLI imports each command's modules when the command runs. A Ctrl-C while they
    import (now inside the command) is still one line and exit status 130."""
    show = "import atexit, sys\natexit.register(lambda: print('torch' in sys.modules))\n"
    for argv, status in ((["--help"], 0), (["train", "--help"], 0),
                         (["export", "--ckpt", "r", "--out", "o", "--bogus"], 2), (["generate", "--ckpt", "r"], 2)):
        result = entry_point(show, *argv)
        assert (result.returncode, result.stdout.splitlines()[-1]) == (status, "False"), (argv, result.stderr)
    planted = ("import builtins\n"
               "real_import = builtins.__import__\n"
               "def planted(name, *args, **kwargs):\n"
               "    if name == 'torch':\n"
               "        raise KeyboardInterrupt\n"
               "    return real_import(name, *args, **kwargs)\n"
               "builtins.__import__ = planted\n")
    result = entry_point(planted, "eval", "--ckpt", "r", "--data", "d")
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "tinygemma eval: interrupted\n")


def entry_point(script: str, *argv: str, env: dict | None = None, timeout: float = 300,
                **options) -> subprocess.CompletedProcess:
    """`tinygemma ARGV` through its entry point, after `script` has planted what the test needs (`options`:
    subprocess.run's)."""
    call = f"from tinygemma.__main__ import main\nimport sys\nsys.argv[1:] = {list(argv)!r}\nraise SystemExit(main())\n"
    return subprocess.run([sys.executable, "-c", script + call], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}, **options)


def small_prepare(out: Path, stories_dir: Path, workers: int = 1) -> list[str]:
    """The arguments of a prepare of 50 stories into `out`: a second or two, once torch is imported."""
    return ["prepare", "--out", str(out), "--source", str(stories_dir / "valid.txt"), "--limit", "50",
            "--workers", str(workers), "--no-progress"]


def test_interrupts_before_and_after_the_command_are_one_line_or_none(tmp_path, stories_dir):
    """A Ctrl-C while the arguments are read (after the imports) gave a traceback; one that came as Python shut
    down after a finished command (a second of torch's teardown) made the exit status 130, with no word, for work
    that was done. Now the first is one line and 130, the second ends the process with the command's status."""
    early = entry_point("import tinygemma.cli\n"
                        "def planted():\n"
                        "    raise KeyboardInterrupt\n"
                        "tinygemma.cli.build_parser = planted\n", "prepare", "--out", str(tmp_path / "d"))
    assert (early.returncode, early.stderr) == (130, "tinygemma: interrupted\n")
    late = entry_point("import atexit, os, signal, time\n"
                       "def planted():\n"
                       "    os.kill(os.getpid(), signal.SIGINT)\n"
                       "    time.sleep(1)\n"
                       "atexit.register(planted)\n", *small_prepare(tmp_path / "d", stories_dir))
    assert (late.returncode, late.stderr) == (0, ""), late.stderr
    assert (tmp_path / "d" / "meta.json").exists()
    # Later still: amid the modules' teardown, where Python has put its handlers back to the defaults.
    teardown = entry_point("import os, signal, time\n"
                           "class Planted:\n"
                           "    def __del__(self, kill=os.kill, pid=os.getpid(), sleep=time.sleep, sig=signal.SIGTERM):\n"
                           "        kill(pid, sig)\n"
                           "        sleep(0.5)\n"
                           "planted = Planted()\n", *small_prepare(tmp_path / "e", stories_dir))
    assert (teardown.returncode, teardown.stderr) == (0, ""), teardown.stderr


def test_sigterm_cleans_up_as_ctrl_c_does_and_a_ctrl_c_amid_the_workers_start_is_not_lost(tmp_path, stories_dir):
    """SIGTERM (timeout, docker stop, Slurm) ended a prepare at once, leaving its lock file and temporaries as large
    as the data; it now cleans up as Ctrl-C does, in one line, with exit status 143 (not under torchrun, which
    ends its workers with it). A Ctrl-C that came while the tokenizing processes were being forked was printed as
    ignored, and prepare went on to exit 0; it now stops it."""
    term = ("import os, signal, time, tinygemma.data\n"
            "def planted(*args, **kwargs):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5)\n"
            "tinygemma.data._tokenize_to_file = planted\n")
    stopped = entry_point(term, *small_prepare(tmp_path / "new" / "d", stories_dir))
    assert (stopped.returncode, stopped.stderr) == (143, "tinygemma prepare: terminated\n")
    assert list(tmp_path.iterdir()) == []  # the folders it made, lock file and all, are gone
    under_torchrun = entry_point(term, *small_prepare(tmp_path / "d", stories_dir), env={"LOCAL_RANK": "0"})
    assert under_torchrun.returncode == -15
    from tinygemma.data import available_cpus
    if available_cpus() < 2:  # one core: prepare takes one worker, and forks none
        return
    amid_fork = entry_point("import os, signal\n"
                            "os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGINT))\n",
                            *small_prepare(tmp_path / "forked", stories_dir, workers=2))
    assert (amid_fork.returncode, amid_fork.stderr) == (130, "tinygemma prepare: interrupted\n"), amid_fork.stderr
    assert not (tmp_path / "forked").exists()
    # A second signal (Ctrl-C pressed twice) during the clean-up cut it short: the workers, never told to stop,
    # kept the process waiting forever. It is held off now.
    twice = entry_point(term + "real_close = tinygemma.data._Workers.close\n"
                               "def close(self):\n"
                               "    os.kill(os.getpid(), signal.SIGINT)\n"
                               "    real_close(self)\n"
                               "tinygemma.data._Workers.close = close\n",
                        *small_prepare(tmp_path / "twice", stories_dir, workers=2), timeout=120)
    assert (twice.returncode, twice.stderr) == (143, "tinygemma prepare: terminated\n"), twice.stderr
    assert not (tmp_path / "twice").exists()


def ignore_interrupts() -> None:
    """What a shell does for a background job of a script (SIGINT), or `trap '' INT TERM`, before it runs a command."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def test_signals_the_shell_set_to_be_ignored_stay_ignored(tmp_path, stories_dir):
    """A process started with SIGINT and SIGTERM ignored (a background job of a script: a Ctrl-C meant for the
    script; `trap '' INT TERM`) was stopped by them all the same once tinygemma had set its handlers, where Python
    itself leaves such a SIGINT ignored. Both, sent amid the work, now change nothing; elsewhere they still stop it."""
    planted = ("import os, signal, tinygemma.data\n"
               "real = tinygemma.data._tokenize_to_file\n"
               "def planted(*args, **kwargs):\n"
               "    os.kill(os.getpid(), signal.SIGINT)\n"
               "    os.kill(os.getpid(), signal.SIGTERM)\n"
               "    return real(*args, **kwargs)\n"
               "tinygemma.data._tokenize_to_file = planted\n")
    ignored = entry_point(planted, *small_prepare(tmp_path / "d", stories_dir), preexec_fn=ignore_interrupts)
    assert (ignored.returncode, ignored.stderr) == (0, ""), ignored.stderr
    assert (tmp_path / "d" / "meta.json").exists()
    stopped = entry_point(planted, *small_prepare(tmp_path / "e", stories_dir))
    assert stopped.returncode == 130 and not (tmp_path / "e").exists()


def test_sigterm_and_ctrl_c_together_are_one_line(tmp_path, stories_dir):
    """A SIGTERM and a Ctrl-C that arrive together (a supervisor's stop while the user presses Ctrl-C) are both
    pending when Python next runs its handlers: the first one's handler held the other off with SIG_IGN, and
    Python printed "OSError: Signal 15 ignored due to race condition" with a traceback. Planted: both sent
    while blocked, then let through at once."""
    # (sent to this thread, which blocks them: sent to the process, another thread, torch's, took them at once)
    both = ("import os, signal, threading, time, tinygemma.data\n"
            "def planted(*args, **kwargs):\n"
            "    signals = {signal.SIGINT, signal.SIGTERM}\n"
            "    signal.pthread_sigmask(signal.SIG_BLOCK, signals)\n"
            "    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)\n"
            "    signal.pthread_kill(threading.get_ident(), signal.SIGINT)\n"
            "    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)\n"
            "    time.sleep(5)\n"
            "tinygemma.data._tokenize_to_file = planted\n")
    stopped = entry_point(both, *small_prepare(tmp_path / "new" / "d", stories_dir))
    assert (stopped.returncode, stopped.stderr) == (130, "tinygemma prepare: interrupted\n"), stopped.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_gpt2_runs_export_goes_with_gpt2_data_and_the_given_tokenizer_if_it_is_its_own(world, capsys):
    """The transformers export of a GPT-2 run holds GPT-2's vocabulary as a tokenizer.json: the same ids, the
    same text, so it evaluates GPT-2 data as the run does, and --tokenizer gpt2 is its own, not another."""
    from tinygemma.tokenizer import load_tokenizer

    root = world
    assert load_tokenizer(root / "hf").identity == "gpt2"
    assert load_tokenizer(root / "bpe").identity.startswith("tokenizer.json:")  # another vocabulary keeps its hash
    losses = []
    for ckpt, given in ((root / "run", []), (root / "hf", []), (root / "hf", ["--tokenizer", "gpt2"]),
                        (root / "run", ["--tokenizer", str(root / "hf" / "tokenizer.json")])):
        assert main(["eval", "--ckpt", str(ckpt), "--data", str(root / "data"), "--dtype", "float32",
                     "--device", "cpu", "--max-tokens", "400", "--block-size", "16", *given]) == 0, capsys.readouterr().err
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    assert losses == pytest.approx([losses[0]] * 4, rel=1e-5)


def test_a_checkpoint_without_its_own_tokenizer_takes_the_given_one(world, tmp_path):
    """--tokenizer is what names the tokenizer where the checkpoint has none of its own (an export whose
    tokenizer.json was left behind): the one its weights header records (GPT-2's here, taken without it), or any
    where it records none (an export from before it did, another transformers model; without it, one line says to
    give one)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tinygemma import UserError
    from tinygemma.checkpoint import checkpoint_tokenizer
    from tinygemma.hf import TOKENIZER_KEY, export_metadata

    bare = tmp_path / "bare"
    shutil.copytree(world / "hf", bare)
    (bare / "tokenizer.json").unlink()
    bpe = str(world / "bpe" / "tokenizer.json")
    assert checkpoint_tokenizer(bare, "gpt2").identity == "gpt2"
    with pytest.raises(UserError, match="is not the tokenizer .* was made with \\(gpt2\\)"):
        checkpoint_tokenizer(bare, bpe)
    assert checkpoint_tokenizer(bare).identity == "gpt2"  # GPT-2's vocabulary, as recorded, needs no file
    metadata = export_metadata(bare)
    del metadata[TOKENIZER_KEY]
    save_file(load_file(bare / "model.safetensors"), bare / "model.safetensors", metadata=metadata)
    assert checkpoint_tokenizer(bare, bpe).identity.startswith("tokenizer.json:")
    with pytest.raises(UserError, match="records no tokenizer and holds no tokenizer.json; name one with --tokenizer"):
        checkpoint_tokenizer(bare)


@pytest.mark.parametrize("argv,words", [(["eval", "--ckpt", "x"], "required: --data"),
                                        (["train", "--max-steps", "abc"], "invalid int value"),
                                        (["frob"], "invalid choice"),
                                        # an empty path (an unset variable: --out "$RUN") read as the current folder
                                        (["train", "--out", ""], "argument --out: is empty: give a path or a name"),
                                        (["prepare", "--out", ""], "argument --out: is empty"),
                                        (["eval", "--ckpt", "x", "--data", ""], "argument --data: is empty"),
                                        (["export", "--ckpt", "x", "--out", " "], "argument --out: is empty"),
                                        (["run", ""], "argument recipe: is empty"),
                                        # a misspelled option is named, by its command, not called a missing one
                                        (["generate", "--ckpt", "x", "--promt", "hi"],
                                         "tinygemma generate: error: unrecognized arguments: --promt (see tinygemma "
                                         "generate --help)"),
                                        (["generate", "--ckpt", "x", "--prompt", "hi", "--tmperature", "0"],
                                         "tinygemma generate: error: unrecognized arguments: --tmperature 0 (see"),
                                        (["generate", "--ckpt", "x"],
                                         "required: --prompt (or --prompt-file) (see tinygemma generate"),
                                        # values argparse takes as values, not options: the missing one is named
                                        (["generate", "--prompt", "- Hello, said Tom", "--max-new-tokens", "3"],
                                         "required: --ckpt (see"),
                                        (["generate", "--ckpt", "x", "--temperature", "-.5"], "required: --prompt"),
                                        (["generate", "--ckpt", "x", "--", "--promt"], "required: --prompt"),
                                        # a text that begins with "-" (a line of dialogue), read as an option: how
                                        # to give it, where argparse said only "expected one argument"
                                        (["generate", "--ckpt", "x", "--prompt", "-Hello"],
                                         "argument --prompt: expected one argument; a text that begins with '-' "
                                         "goes after '=': --prompt=-Hello (see"),
                                        (["generate", "--ckpt", "x", "--prompt", "Once", "--stop", "--"],
                                         "a text that begins with '-' goes after '=': --stop=-- (see"),
                                        (["generate", "--ckpt", "x", "--prompt"],
                                         "argument --prompt: expected one argument (see"),
                                        # an option of the command's after it: a value left out, no such hint
                                        (["train", "--out", "--resume"], "argument --out: expected one argument (see"),
                                        (["generate", "--ckpt", "x", "--prompt", "--js"],
                                         "argument --prompt: expected one argument (see")])
def test_a_command_line_argparse_refuses_is_one_line_too(argv, words, capsys):
    """A missing or ill-typed argument: argparse's refusal, in one line naming --help, and exit status 2."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and words in err and "--help" in err, err


def test_what_a_fuzz_review_found_from_python_and_the_command_line(world, tmp_path, capsys):
    """A save_model whose meta JSON cannot hold wrote new weights beside the old checkpoint.json (a traceback, and
    a checkpoint that no longer loaded), and meta could replace the model's config; paths of the wrong type were
    TypeErrors (load_recipe(5) opened file descriptor 5); generate_text took no tokenizer name; a huge
    model.vocab_size was killed for memory; a recipe with a byte-order mark was 'not valid TOML';
    --push-to-hub "" exported without uploading; a GGUF export to a link replaced the link; a --resume-from
    refusal named the fork's deleted copy."""
    import datetime

    import tinygemma
    from tinygemma import UserError
    from tinygemma.checkpoint import save_model
    from tinygemma.config import ModelConfig
    from tinygemma.evaluation import evaluate
    from tinygemma.generate import generate_text
    from tinygemma.train import saved_recipe

    model = tinygemma.load(world / "run")
    save_model(model, tmp_path / "saved", meta={"note": "v1"})
    before = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    for meta, says in (({"when": datetime.date(2026, 1, 1)}, "meta must hold what JSON can"),
                       ({"model": 5}, "meta may not set model"), ([1], "meta must be a dict")):
        with pytest.raises(UserError, match=says):
            save_model(model, tmp_path / "saved", meta=meta)
    assert {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()} == before
    for call, says in ((lambda: prepare(5, sources=[world / "stories.txt"]), "must be a path, got 5"),
                       (lambda: export(world / "run", None), "must be a path, got None"),
                       (lambda: load_recipe(5), "a recipe is given by its file's path, got 5"),
                       (lambda: saved_recipe(None), "saved_recipe takes a run's folder, got None"),
                       (lambda: generate_text(model, tokenizer=object(), prompt="Once"), "must be tinygemma's"),
                       (lambda: generate_text(model, "gpt2", "Once", 2, on_text=5), "on_text must be a function"),
                       (lambda: ModelConfig.preset("gemma3-tiny", vocab_size=99_999_999), "at most 4,194,304"),
                       (lambda: save_model(model, tmp_path / "m", meta={"tokenizer": "gpt2"}),
                        "meta's tokenizer must be a dict"),
                       (lambda: save_model("model", tmp_path / "m"), "save_model takes a Gemma3 and a folder, got a str"),
                       (lambda: evaluate(None, [1, 2, 3], 2), "evaluate takes a Gemma3")):
        with pytest.raises(UserError, match=re.escape(says)):
            call()
    assert len(generate_text(model, "gpt2", "Once", 3, temperature=0)[0][0]) > 0  # a tokenizer's name is taken
    bom = tmp_path / "bom.toml"
    bom.write_bytes("\ufeff[train]\nmax_steps = 700\n".encode())
    assert load_recipe(bom).train.max_steps == 700

    hf = ["export", "--ckpt", str(world / "run"), "--out", str(tmp_path / "hf")]
    assert main([*hf, "--push-to-hub", ""]) == 2
    assert "--push-to-hub is empty" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    (tmp_path / "models").mkdir()
    (tmp_path / "current.gguf").symlink_to(tmp_path / "models" / "v1.gguf")
    from tinygemma.gguf_export import check_gguf_arguments

    assert check_gguf_arguments(tmp_path / "current.gguf", "f32") == tmp_path / "models" / "v1.gguf"  # written there

    broken = tmp_path / "broken"  # a checkpoint copied out of its run, its weights truncated
    source = world / "run" / "checkpoints" / json.loads((world / "run" / "checkpoints" / "last.json").read_text())["dir"]
    broken.mkdir()
    for f in source.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:100])
    assert main(["train", "--data", str(world / "data"), "--out", str(tmp_path / "fork"), "--resume-from", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"{broken / 'model.safetensors'} is not a readable safetensors file" in err and not (tmp_path / "fork").exists()
    import shutil

    copied = tmp_path / "copied"  # a whole run whose config.json is damaged: the source's is named
    shutil.copytree(world / "run", copied)
    (copied / "config.json").write_text("{not json")
    assert main(["train", "--data", str(world / "data"), "--out", str(tmp_path / "fork"), "--resume-from",
                 str(copied / "checkpoints" / source.name)]) == 2
    err = capsys.readouterr().err
    assert f"{copied / 'config.json'} is not valid JSON" in err and not (tmp_path / "fork").exists(), err


TINY_RUN = ["--set", "model.preset=gemma3-tiny", "--set", "model.d_model=32", "--set", "model.n_layers=2", "--set",
            "model.head_dim=8", "--set", "model.mlp_dim=64", "--set", "model.sliding_window=8", "--set",
            "batch_size=2", "--set", "block_size=16", "--set", "max_steps=1", "--set", "warmup_steps=0", "--set",
            "device=cpu", "--set", "compile=false"]


@pytest.mark.parametrize("edit, words", [
    ({"source": "x"}, "is malformed: it lacks or mangles"),
    ({"eot_id": 99999}, "eot_id (an id below vocab_size)"),
    ({"vocab_size": "eot+1"}, "cannot hold its tokenizer's 300 ids: its meta.json is damaged or hand-edited"),
    ({"vocab_size": 299}, "cannot hold its tokenizer's 300 ids: its meta.json is damaged or hand-edited"),
    ({"eot_id": "vocab"}, "eot_id (an id below vocab_size)"),
], ids=["source-not-a-table", "eot-outside-the-vocabulary", "vocabulary-below-the-tokenizers", "one-id-short",
        "eot-at-the-vocabulary-size"])
def test_a_hand_edited_meta_json_is_one_line_for_train_and_eval(world, tmp_path, capsys, edit, words):
    """meta.json values of the right JSON but the wrong meaning were a traceback (a KeyError inside the message
    for another model.vocab_size, an AttributeError reading the sources) or accepted by eval."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("meta.json", "train.bin", "val.bin", "tokenizer.json"):
        (data / name).write_bytes((world / "bpe" / name).read_bytes())
    meta = json.loads((data / "meta.json").read_text())
    meta.update({k: {"eot+1": meta["eot_id"] + 1, "vocab": meta["vocab_size"]}.get(v, v) if isinstance(v, str) and
                 v in ("eot+1", "vocab") else v for k, v in edit.items()})
    (data / "meta.json").write_text(json.dumps(meta))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY_RUN]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "run").exists()
    if "vocab_size" not in edit:  # (eval takes the checkpoint's model; its embedding holds the ids)
        assert main(["eval", "--ckpt", str(world / "run"), "--data", str(data)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


def test_running_out_of_memory_in_eval_says_to_lower_the_batch_size(world, capsys, monkeypatch):
    """eval's out of memory is one line naming its own flag to lower, as generate's and train's do."""
    import tinygemma.evaluation

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setattr(tinygemma.evaluation, "evaluate", oom)  # (eval imports it as it runs)
    assert main(["eval", "--ckpt", str(world / "run"), "--data", str(world / "data"), "--max-tokens", "100"]) == 1
    assert capsys.readouterr().err == ("tinygemma eval: error: out of memory (CUDA out of memory. Tried to allocate "
                                       "2.00 GiB.); use a smaller --batch-size\n")


def test_push_to_hub_takes_only_user_slash_name_before_anything_is_exported(world, tmp_path, capsys, monkeypatch):
    """A URL, a path of three parts or a name with a space is refused in one line before the export (the name goes
    into the model card), not after an export that the hub then refuses."""
    import tinygemma.hf

    uploads = []
    monkeypatch.setattr(tinygemma.hf, "push_to_hub", lambda *args: uploads.append(args) or "https://huggingface.co/x")
    for repo in ("https://huggingface.co/user/name", "user/name/extra", "user/my model"):
        assert main(["export", "--ckpt", str(world / "run"), "--out", str(tmp_path / "new"),
                     "--push-to-hub", repo]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "takes the repository as USER/NAME" in err, err
        assert not (tmp_path / "new").exists() and not uploads


def test_push_to_hub_refuses_before_the_export_what_the_hub_would_refuse_after(world, tmp_path, capsys, monkeypatch,
                                                                              hub_login):
    """A name the hub's own rules refuse, offline mode, no login, and --private for a repository that is public
    (create_repo leaves it public) were found only after the export (its samples generated, the name in its card):
    each is now one line before anything is written, and nothing is uploaded."""
    import huggingface_hub
    from huggingface_hub import constants

    import tinygemma.hf

    uploads = []
    monkeypatch.setattr(tinygemma.hf, "push_to_hub", lambda *args: uploads.append(args) or "https://huggingface.co/x")
    export = ["export", "--ckpt", str(world / "run"), "--out", str(tmp_path / "new"), "--push-to-hub"]

    def refused(repo, *more) -> str:
        assert main([*export, repo, *more]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and not (tmp_path / "new").exists() and not uploads, err
        return err

    for repo in ("me/a--b", "me/model.git", "me/-model", "me/ü", "me/" + "x" * 97):
        assert "the hub refuses that name" in refused(repo)
    with monkeypatch.context() as offline:
        offline.setattr(constants, "HF_HUB_OFFLINE", True)
        assert "HF_HUB_OFFLINE is set" in refused("me/tiny")
    with monkeypatch.context() as logged_out:
        logged_out.delenv("HF_TOKEN")
        logged_out.setattr(huggingface_hub, "get_token", lambda: None)  # (nor a token file of `hf auth login`)
        assert "needs a Hugging Face login" in refused("me/tiny")
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, repo_id, **kwargs: SimpleNamespace(private=False))
    assert "exists on the hub and is public" in refused("me/tiny", "--private")
    assert main([*export, "me/tiny"]) == 0 and len(uploads) == 1  # without --private: uploaded to the public one


@pytest.mark.parametrize("argv", [["generate", "--ck", "x"], ["generate", "--ckpt=x"],
                                  ["generate", "--ckpt", "x", "--max-new=3"]])
def test_an_abbreviated_or_joined_option_is_not_called_unrecognized_when_a_required_one_is_missing(argv, capsys):
    """argparse takes `--ck` (an abbreviation) and `--ckpt=x` (option=value): the missing --prompt is named, not
    an option that was given rightly."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "required: --prompt" in err and "unrecognized" not in err, err


def test_a_python_memory_error_is_one_line_too(capsys, monkeypatch):
    """numpy's or Python's own MemoryError (whose text names no "out of memory", often none at all) is the
    one-line out-of-memory refusal, exit status 1, not a traceback."""
    def numpy_allocation(args):
        raise MemoryError("Unable to allocate 3.20 GiB for an array with shape (429496730,) and data type int64")

    monkeypatch.setattr(cli, "_train_main", numpy_allocation)
    assert main(["train"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tinygemma train: error: out of memory (Unable to allocate 3.20 GiB") and err.count("\n") == 1

    def bare(args):
        raise MemoryError()

    monkeypatch.setattr(cli, "_train_main", bare)
    assert main(["train"]) == 1
    assert capsys.readouterr().err.startswith("tinygemma train: error: out of memory (MemoryError); set ")


def test_a_lost_peer_is_one_line_under_torchrun_and_a_bug_elsewhere(capsys, monkeypatch):
    """Under torchrun, gloo's "Connection closed by peer" while another process stopped is one line, exit status
    1; outside torchrun the same RuntimeError is nobody's peer and stays a traceback (the one-line text would
    blame a torchrun job that does not exist)."""
    def lost(args):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:41234\nmore")

    monkeypatch.setattr(cli, "_train_main", lost)
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        main(["train"])
    capsys.readouterr()
    for name, value in {"TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    assert main(["train"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tinygemma train: error: another process of this torchrun job "
                                                   "stopped or became unreachable") and "Connection closed by peer" in err


@pytest.mark.parametrize("caught_by", ["the command", "the entry point"])
def test_a_ctrl_c_that_left_code_run_by_exec_ends_with_status_130(tmp_path, caught_by):
    """CPython marks a KeyboardInterrupt that leaves code run by exec() of a string (a dataclass's methods being
    made, hundreds of them as torch loads) as never handled, and `python -m` then ended the process by SIGINT
    even though the command had caught it and said so: a parent saw -2, not 130 (about one Ctrl-C in ten in a
    prepare's first second)."""
    if caught_by == "the command":
        body = ("    try:\n        exec('raise KeyboardInterrupt')\n    except KeyboardInterrupt:\n"
                "        print('tinygemma prepare: interrupted', file=sys.stderr)\n        return 130\n")
    else:
        body = "    exec('raise KeyboardInterrupt')\n"
    (tmp_path / "stopped_in_exec.py").write_text(
        "import sys\nfrom tinygemma import cli\nfrom tinygemma.__main__ import main\n"
        f"def command(argv=None):\n{body}"
        "cli.main = command\nraise SystemExit(main())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO / "src")])}
    result = subprocess.run([sys.executable, "-m", "stopped_in_exec"], capture_output=True, text=True, env=env)
    said = "tinygemma prepare: interrupted\n" if caught_by == "the command" else "tinygemma: interrupted\n"
    assert (result.returncode, result.stderr) == (130, said)


def test_a_ctrl_c_as_torch_loads_waits_until_it_has_loaded(tmp_path):
    """A Ctrl-C or SIGTERM whose handler raised inside one of the Python callbacks torch's C++ makes as it loads
    ended the process by C++'s terminate (SIGABRT and a stack dump): the command imports torch with both held,
    and the interrupt comes once it has loaded (planted as the import begins)."""
    script = ("import builtins, os, signal, sys\n"
              "real_import = builtins.__import__\n"
              "def planted(name, *args, **kwargs):\n"
              "    if name == 'torch' and 'torch' not in sys.modules:\n"
              "        builtins.__import__ = real_import\n"
              "        os.kill(os.getpid(), signal.SIGINT)\n"
              "        module = real_import(name, *args, **kwargs)\n"
              "        print('loaded', file=sys.stderr)\n"
              "        return module\n"
              "    return real_import(name, *args, **kwargs)\n"
              "builtins.__import__ = planted\n")
    result = entry_point(script, "compare", str(tmp_path), timeout=120)
    # (a warning torch prints as it loads, on some machine, would come before "loaded")
    assert result.returncode == 130 and result.stderr.endswith("loaded\ntinygemma compare: interrupted\n")
    assert "Traceback" not in result.stderr, result.stderr
    # Under torchrun, SIGTERM keeps its default, which ends the process at once (no Python code runs in it)
    term = script.replace("signal.SIGINT", "signal.SIGTERM")
    result = entry_point(term, "compare", str(tmp_path), env={"TORCHELASTIC_RUN_ID": "test", "LOCAL_RANK": "0"},
                         timeout=120)
    assert (result.returncode, result.stderr) == (-signal.SIGTERM, "")


def test_a_ctrl_c_that_a_library_wrapped_in_its_own_error_is_an_interrupt(monkeypatch, capsys):
    """A Ctrl-C landing in a class body as torch.distributed loads came out as "RuntimeError: Error calling
    __set_name__" (Python wraps what __set_name__ raises): a traceback and exit status 1. An error raised from a
    Ctrl-C or SIGTERM is that interrupt's one line and status; one raised from anything else stays a bug's."""
    from tinygemma.errors import Terminated

    def wrapping(stop):
        def command(args):
            try:
                raise stop
            except KeyboardInterrupt as e:
                raise RuntimeError("Error calling __set_name__ on '_Field' instance") from e
        return command

    for stop, said, status in ((KeyboardInterrupt(), "interrupted", 130), (Terminated(), "terminated", 143)):
        monkeypatch.setattr(cli, "_compare_main", wrapping(stop))
        assert cli.main(["compare", "a"]) == status
        assert capsys.readouterr().err == f"tinygemma compare: {said}\n"

    def wrapped_otherwise(args):  # (not a RuntimeError: the last clause's)
        raise TypeError("a class body's error") from KeyboardInterrupt()

    monkeypatch.setattr(cli, "_compare_main", wrapped_otherwise)
    assert cli.main(["compare", "a"]) == 130 and capsys.readouterr().err == "tinygemma compare: interrupted\n"
    for bug in (ValueError("a bug"), RuntimeError("a bug")):  # raised from nothing: a bug's traceback, as it was
        def buggy(args, bug=bug):
            raise bug
        monkeypatch.setattr(cli, "_compare_main", buggy)
        with pytest.raises(type(bug), match="a bug") as raised:
            cli.main(["compare", "a"])
        names = [entry.name for entry in raised.traceback]  # (raised again from a helper, its frame came between)
        assert names[names.index("main") + 1:] == ["buggy"], names


def test_a_second_ctrl_c_just_after_the_commands_clean_up_is_held_off(tmp_path):
    """The command's handlers hold a second signal off during its clean-up; they are given back as it ends, and a
    second Ctrl-C just then met Python's own handler: a traceback after the command's line (an interrupt fuzz
    saw it once in about 60 double signals). The entry point's own handler now holds it off too."""
    script = ("import os, signal, sys, time\n"
              "from tinygemma import cli\n"
              "def command(argv=None):\n"
              "    try:\n"
              "        with cli.interrupts_once():\n"
              "            os.kill(os.getpid(), signal.SIGINT)\n"
              "            time.sleep(5)\n"
              "    except KeyboardInterrupt:\n"
              "        os.kill(os.getpid(), signal.SIGINT)  # the second, as the command's handlers are gone\n"
              "        time.sleep(0.2)\n"
              "        print('tinygemma export: interrupted', file=sys.stderr)\n"
              "        return 130\n"
              "cli.main = command\n")
    result = entry_point(script, timeout=60)
    assert (result.returncode, result.stderr) == (130, "tinygemma export: interrupted\n")
    # Under torchrun, a SIGTERM after the Ctrl-C keeps its default: it ends a worker at once (one stuck in a
    # collective, say), as torchrun's SIGTERM must
    term = script.replace("signal.SIGINT)  # the second, as the command's handlers are gone",
                          "signal.SIGTERM)  # torchrun's, during the clean-up")
    assert term != script
    result = entry_point(term, env={"TORCHELASTIC_RUN_ID": "test", "LOCAL_RANK": "0"}, timeout=60)
    assert (result.returncode, result.stderr) == (-signal.SIGTERM, "")


@pytest.mark.parametrize("argv", [["--help"], ["prepare", "--bogus"]])
def test_a_ctrl_c_as_python_shuts_down_after_help_or_a_usage_error_keeps_its_status(argv):
    """argparse ends --help and a usage error with SystemExit: no status was recorded, and a Ctrl-C as Python shut
    down met the entry point's handler (or Python's), a traceback after the help ("Exception ignored in atexit
    callback"), or the process ended by SIGINT. It ends with argparse's status now, as after a command."""
    script = ("import atexit, os, signal, time\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)))\n")
    result = entry_point(script, *argv, timeout=60)
    assert result.returncode == (0 if argv == ["--help"] else 2), result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr


def test_the_entry_point_called_again_in_one_process_interrupts_as_the_first_time():
    """What an earlier command left (the signals that stopped it) made a second call of the entry point in the same
    process hold off a Ctrl-C that came before its command's own handlers."""
    script = ("import os, signal, time\n"
              "from tinygemma import cli, errors\n"
              "errors.STOPPED.append(signal.SIGINT)  # as an interrupted command left it\n"
              "def early(argv=None):\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(2)\n"
              "    return 0\n"
              "cli.main = early\n")
    result = entry_point(script, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "tinygemma: interrupted\n")
