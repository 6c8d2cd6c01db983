"""`tinygemma run RECIPE`: prepare, train, evaluate and sample in one command, re-runnable."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

import tinygemma
import tinygemma.cli as cli
import tinygemma.tokenizer
from tinygemma import Gemma3, ModelConfig
from tinygemma.checkpoint import save_model
from tinygemma.cli import main
from tinygemma.config import load_recipe
from tinygemma.data import DEFAULT_BPE_VOCAB_SIZE, prepare
from tinygemma.files import FolderLock
from tinygemma.runtime import TORCHRUN_VARIABLES
from tinygemma.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """
[data]
dir = "{root}/data"
source = ["{stories}/train.txt"]
tokenizer = "bpe"
vocab_size = 400
limit = 300

[model]
preset = "gemma3-tiny"
d_model = 32
n_layers = 2
head_dim = 8
mlp_dim = 64
sliding_window = 16

[train]
out = "{root}/run"
batch_size = 4
block_size = 32
grad_accum_steps = 1
max_steps = 6
warmup_steps = 2
learning_rate = 3e-3
min_lr = 3e-4
eval_interval = 3
eval_batches = 2
checkpoint_interval = 3
device = "cpu"
dtype = "float32"
compile = "false"

[generate]
prompts = ["Once upon a time", "Tom had a dog"]
max_new_tokens = 12
temperature = 0.8
top_k = 20
"""


def test_run_end_to_end_and_again(tmp_path, stories_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the suggested export goes to hf/ under the working directory
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    # top_k: the recipe's own value, so the samples stay comparable; stop texts, met in every sample's first few
    # characters: run's samples, the report's, the card's and the closing command's end before them
    override = ["--set", "generate.top_k=20", "--set", 'generate.stop=["e", " "]']
    assert main(["run", str(recipe), *override]) == 0
    out, err = capsys.readouterr()
    assert "preparing" in err and "training into" in err
    evaluation = json.loads(next(line for line in out.splitlines() if line.startswith('{"eval"')))["eval"]
    assert evaluation["tokens"] > 1000  # the whole validation split, not a sample of windows
    assert f"whole validation split ({evaluation['tokens']:,} tokens predicted" in err  # the log's count is it
    assert 0 < evaluation["bits_per_byte"] < 10
    assert "--- sample 1: 'Once upon a time'\nOnce upon a time" in out
    assert "--- sample 2: 'Tom had a dog'\nTom had a dog" in out
    assert (tmp_path / "data" / "meta.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "last.json").exists()
    assert tinygemma.load(tmp_path / "run").config.n_layers == 2  # a run directory, not its recipe's config.json
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in line]
    assert steps == [1, 2, 3, 4, 5, 6]

    # The closing lines: where everything is, and the next commands, which work as printed.
    run_dir = tmp_path / "run"
    closing = out.split("\n--- where everything is\n")[1].splitlines()
    lines = dict(re.fullmatch(r"(\S.*?)\s{2,}(\S.*)", line).groups() for line in closing if line != "--- next")
    assert lines["run directory"].startswith(str(run_dir))
    assert lines["loss curve"] == str(run_dir / "loss.png") and (run_dir / "loss.png").stat().st_size > 1000
    assert lines["TensorBoard"] == f"tensorboard --logdir {run_dir / 'tb'}" and any((run_dir / "tb").iterdir())
    # report.md: the whole-split evaluation and the samples, recorded in eval.json, beside the training's records.
    assert lines["report"] == str(run_dir / "report.md")
    recorded, report = json.loads((run_dir / "eval.json").read_text()), (run_dir / "report.md").read_text()
    assert recorded["eval"] == evaluation and len(recorded["samples"]) == 2
    assert (f"| whole validation split ({evaluation['tokens']:,} tokens), checkpoint `{recorded['checkpoint']}` | "
            f"{evaluation['loss']:.4f} | {evaluation['bits_per_byte']:.4f} |") in report
    for i, (sample, prompt) in enumerate(zip(recorded["samples"], ["Once upon a time", "Tom had a dog"])):
        assert f"--- sample {i + 1}: " in out and f"\n{sample}\n" in out  # what was printed
        assert "\n".join("> " + line if line else ">" for line in sample.splitlines()) + "\n\n" in report + "\n"
        assert sample.startswith(prompt) and not {"e", " "} & set(sample[len(prompt):])  # ended before a stop
    assert main(shlex.split(lines["export"])[1:]) == 0 and (tmp_path / "hf" / "run" / "model.safetensors").exists()
    # Its model card: the whole-split evaluation of this checkpoint, and samples generated from the exported
    # files with the recipe's settings: the run's own samples again.
    card = (tmp_path / "hf" / "run" / "README.md").read_text()
    assert f"the whole validation split ({evaluation['tokens']:,} tokens), by `tinygemma run`" in card
    assert f"| {evaluation['loss']:.4f} | {evaluation['bits_per_byte']:.4f} |" in card
    for sample in recorded["samples"]:
        assert "\n".join("> " + line if line else ">" for line in sample.splitlines()) + "\n\n" in card + "\n"
    capsys.readouterr()
    # with the recipe's sampling settings (its top-k 20, not generate's 200; its 12 new tokens, not 200) and the
    # dtype it sampled in (float32, where generate's auto would take a CPU's native bfloat16): the run's first
    # sample again, as printed
    assert " --top-k 20" in lines["a story"] and " --temperature" not in lines["a story"]
    assert main(shlex.split(lines["a story"])[1:]) == 0
    assert capsys.readouterr().out == recorded["samples"][0] + "\n"
    story = shlex.split(lines["a story"])[1:]
    stops = [i for i, word in enumerate(story) if word == "--stop"]
    assert [story[i + 1] for i in stops] == ["e", " "]  # without them, the text goes on past the first stop
    assert main([word for i, word in enumerate(story) if i not in stops and i - 1 not in stops]) == 0
    whole = capsys.readouterr().out
    assert whole.startswith(recorded["samples"][0]) and whole[len(recorded["samples"][0])] in "e "
    longer = shlex.split(lines["train longer"])
    assert longer[:3] == ["tinygemma", "run", str(recipe)] and longer[3:7] == override
    again = load_recipe(longer[2], [x for x in longer[3:] if x != "--set"])
    assert (again.train.max_steps, again.out, again.data) == (24, f"{run_dir}-24", load_recipe(str(recipe)).data)

    # Again: the data is reused, the finished run is not trained further, and the same samples come out.
    assert main(["run", str(recipe), *override]) == 0
    out2, err2 = capsys.readouterr()
    assert "prepared data found" in err2 and "preparing" not in err2
    steps2 = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in line]
    assert steps2 == steps
    assert out2.split("--- sample 1")[1] == out.split("--- sample 1")[1]


def torchrun_run(recipe: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m tinygemma run RECIPE --set ...` with 2 gloo processes."""
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tinygemma",
           "run", str(recipe), *[a for o in overrides for a in ("--set", o)]]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_run_under_torchrun_prepares_once_trains_everywhere_and_reports_once(tmp_path, stories_dir, capsys):
    """Process 0 prepares while the other waits (both preparing into one folder raced: one could open it between
    the other's writes), both train, and process 0 alone evaluates, samples and writes. The recipe's global batch
    of 4 x 1 splits over 2 processes though its grad_accum_steps (1) does not: the losses are one process's."""
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    # AdamW: Muon's bfloat16 Newton-Schulz (this CPU's, if it has native bf16) magnifies float summation's
    # differences to about 1e-5 of the loss; AdamW keeps them at float32's.
    proc = torchrun_run(recipe, "generate.max_new_tokens=4", "train.optimizer=adamw")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("[tinygemma run] preparing") == 1
    assert proc.stderr.count("[tinygemma run] evaluating") == 1
    for once in ('{"eval"', "--- sample 1:", "--- sample 2:", "--- where everything is"):
        assert proc.stdout.count(once) == 1, once
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "config.json").read_text())["run"]["world_size"] == 2
    assert json.loads((run_dir / "eval.json").read_text())["eval"]["tokens"] > 1000

    assert main(["run", str(recipe), *[a for o in ("generate.max_new_tokens=4", "train.optimizer=adamw",
                                                   f"train.out={tmp_path / 'one'}") for a in ("--set", o)]]) == 0
    assert "prepared data found" in capsys.readouterr().err  # process 0's dataset, whole

    def losses(out):
        return [json.loads(x)["train_loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "train_loss" in x]

    assert len(losses(run_dir)) == 6 and losses(run_dir) == pytest.approx(losses(tmp_path / "one"), rel=1e-5)

    # A refusal on process 0 (the run and its data folder hold other stories) stops both, printed once.
    refused = torchrun_run(recipe, "data.limit=200")
    assert refused.returncode != 0
    assert refused.stderr.count("tinygemma run: error: ") == 1
    assert "holds a run trained on other [data] (limit: 300, the recipe asks for 200)" in refused.stderr
    # So does the network's failure there (the hub out of reach): one line, not gloo's words from process 1
    failed = torchrun_run(recipe, "data.source=", f"data.dir={tmp_path / 'data2'}", f"train.out={tmp_path / 'run2'}",
                          env={"HF_HUB_OFFLINE": "1"})
    assert failed.returncode != 0
    assert failed.stderr.count("error: ") == 1, failed.stderr[-2000:]
    assert "tinygemma run: error: cannot load roneneldan/TinyStories from the Hugging Face hub" in failed.stderr


def test_a_bpe_that_stops_short_of_its_vocabulary_is_still_the_recipe_s(tmp_path, stories_dir, capsys):
    """20 stories hold fewer merges than a BPE of 4,000 asks: prepare says so, and the data it made is the
    recipe's data when the recipe runs again (it was refused as 'vocabulary: 1,234, the recipe asks for
    4,000')."""
    from tinygemma.data import open_prepared
    from tinygemma.pipeline import prepare_if_missing

    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    recipe = load_recipe(str(recipe_file), ["data.limit=20", "data.vocab_size=4000"])
    prepare_if_missing(recipe)
    reached = open_prepared(tmp_path / "data").vocab_size
    assert reached < 4000
    assert f"warning: the BPE has {reached:,} tokens, not the 4,000 asked for" in capsys.readouterr().err
    prepare_if_missing(recipe)
    assert "prepared data found" in capsys.readouterr().err


def test_one_path_given_from_python_as_data_source_is_one_source(tmp_path, stories_dir, capsys):
    """recipe.data.source = "train.txt" from a notebook: the log named its letters, and the second run of the
    recipe refused the data the first had prepared, as prepared "from other data". A list that is not of paths is
    refused in one line."""
    from tinygemma.pipeline import prepare_if_missing

    recipe = load_recipe(None, [f"data.dir={tmp_path / 'data'}", "data.limit=30", "data.tokenizer=bpe",
                                "data.vocab_size=300"])
    recipe.data.source, recipe.data.val_source = str(stories_dir / "train.txt"), stories_dir / "valid.txt"
    prepare_if_missing(recipe)
    assert f"preparing {stories_dir / 'train.txt'} into" in capsys.readouterr().err
    prepare_if_missing(recipe)
    assert "prepared data found" in capsys.readouterr().err
    recipe.data.source = [stories_dir / "train.txt"]  # a list of Paths: strings in the recipe (JSON) too
    prepare_if_missing(recipe)
    assert recipe.data.source == [str(stories_dir / "train.txt")] and "prepared data found" in capsys.readouterr().err
    recipe.data.source = [1, 2]
    with pytest.raises(tinygemma.UserError, match=r"data.source must be a list of story files \(or one path\), "
                                                  r"got \[1, 2\]"):
        prepare_if_missing(recipe)


@pytest.mark.parametrize("setting, name", [("data.source", "missing.txt"), ("data.source", "folder"),
                                           ("data.source", "stories.csv"), ("data.tokenizer", "missing.json"),
                                           ("data.tokenizer", "stories.csv")])
def test_a_source_or_tokenizer_run_cannot_read_is_the_only_line(tmp_path, stories_dir, capsys, setting, name):
    """A missing or unreadable data.source or data.tokenizer was said after "preparing ... into ...": two lines.
    It is now refused before that line, and nothing is prepared."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "stories.csv").write_text("text\nOnce\n")
    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    extra = ["--set", "data.vocab_size=none"] if setting == "data.tokenizer" else []
    assert main(["run", str(recipe_file), "--set", f"{setting}={tmp_path / name}", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / name) in err, err
    assert not (tmp_path / "data").exists()


def test_run_continues_an_interrupted_run(tmp_path, stories_dir, capsys):
    from tinygemma.config import load_recipe
    from tinygemma.pipeline import prepare_if_missing
    from tinygemma.train import train

    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    recipe = load_recipe(str(recipe_file))
    prepare_if_missing(recipe)
    train(recipe, stop_at=3, quiet=True)  # as if the first `run` had been stopped after step 3
    assert main(["run", str(recipe_file), "--set", "generate.max_new_tokens=2"]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "train_loss" in x] == [1, 2, 3, 4, 5, 6]


def test_run_refuses_data_prepared_from_other_stories_or_with_another_tokenizer(tmp_path, stories_dir, capsys,
                                                                                 monkeypatch):
    """A data.dir already prepared is reused only for the recipe it was prepared for: other stories, another
    limit, validation source or tokenizer are refused in one line (exit 2), before anything is trained or
    written. The same files named another way (a relative path) are the same data."""
    from tinygemma.errors import UserError
    from tinygemma.pipeline import prepare_if_missing

    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    prepare_if_missing(load_recipe(str(recipe_file)))
    meta = (tmp_path / "data" / "meta.json").read_bytes()
    monkeypatch.chdir(stories_dir)
    prepare_if_missing(load_recipe(str(recipe_file), ["data.source=train.txt"]))  # the same file, relative
    assert "prepared data found" in capsys.readouterr().err

    for override, phrase in [(f"data.source={stories_dir}/valid.txt", f"stories: {stories_dir}/train.txt, the "
                                                                       f"recipe asks for {stories_dir}/valid.txt"),
                             ("data.limit=200", "limit: 300, the recipe asks for 200"),
                             (f"data.val_source={stories_dir}/valid.txt", "validation: set aside from the training "
                                                                           f"source, the recipe asks for {stories_dir}"),
                             ("data.tokenizer=gpt2", "the recipe asks for gpt2"),  # (and data.vocab_size=none)
                             ("data.vocab_size=500", "vocabulary: a BPE of 400, the recipe asks for a BPE of 500")]:
        more = ["data.vocab_size=none"] if override == "data.tokenizer=gpt2" else []  # a BPE's setting
        with pytest.raises(UserError, match=re.escape(phrase)):
            prepare_if_missing(load_recipe(str(recipe_file), [override, *more]))
    # Validation the recipe did not ask for (it names no data.val_source): other stories, or another share of them
    # set aside, which leaves other training tokens too.
    for name, kwargs, phrase in [("val-files", {"val_sources": [stories_dir / "valid.txt"]}, f"{stories_dir}/valid.txt"),
                                 ("val-half", {"val_fraction": 0.5}, "0.5 of the stories")]:
        prepare(tmp_path / name, sources=[stories_dir / "train.txt"], tokenizer="bpe", vocab_size=400, limit=300,
                **kwargs)
        with pytest.raises(UserError, match=re.escape(f"validation: {phrase}, the recipe asks for the source's "
                                                      "validation split or 0.05 of its stories")):
            prepare_if_missing(load_recipe(str(recipe_file), [f"data.dir={tmp_path / name}"]))
    assert main(["run", str(recipe_file), "--set", "data.limit=200"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "was prepared from other data than the recipe's [data] asks for" in err
    assert "set data.dir to another folder" in err
    assert (tmp_path / "data" / "meta.json").read_bytes() == meta and not (tmp_path / "run").exists()


def test_data_prepared_from_a_file_changed_since_is_refused_for_a_new_run_not_for_its_own(tmp_path, stories_dir,
                                                                                           capsys):
    """Other stories written under the same file name would find the old ones' tokens in data.dir, which the
    settings cannot tell apart: meta.json keeps each local source's size (and a folder's file count), and a new
    run (or its dry run) on data whose file holds other stories since is refused in one line, before anything is
    written. The run begun on that data goes on with it as prepared; a file touched or copied again, or gone, is
    no matter."""
    from tinygemma.pipeline import prepare_if_missing
    from tinygemma.train import train

    stories = tmp_path / "stories.txt"
    shutil.copy(stories_dir / "train.txt", stories)
    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(RECIPE.format(root=tmp_path, stories=stories_dir).replace(
        f"{stories_dir}/train.txt", str(stories)))
    recipe = load_recipe(str(recipe_file))
    prepare_if_missing(recipe)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["source_stamps"] == {str(stories.resolve()): [stories.stat().st_size, 1]}
    train(recipe, stop_at=3, quiet=True)  # a run begun on it
    stories.write_text((stories_dir / "valid.txt").read_text(encoding="utf-8"), encoding="utf-8")  # other stories
    capsys.readouterr()
    new = ["--set", f"train.out={tmp_path / 'new'}"]
    for dry in ([], ["--dry-run"]):
        assert main(["run", str(recipe_file), *new, *dry]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 + len(dry)  # (a dry run says its plan first)
        assert err[-1] == (f"tinygemma run: error: {tmp_path / 'data'} (data.dir) was prepared from "
                           f"{stories.resolve()} as it was then, and that has changed since (its size): delete that "
                           "folder to prepare the stories again, or set data.dir to another folder")
    assert not (tmp_path / "new").exists()
    assert main(["run", str(recipe_file), "--set", "generate.max_new_tokens=2"]) == 0  # its own run goes on
    assert json.loads((tmp_path / "data" / "meta.json").read_text()) == meta
    shutil.copy(stories_dir / "train.txt", stories)  # the same stories, copied again (a newer time): as it was
    assert main(["run", str(recipe_file), *new, "--dry-run"]) == 0
    stories.unlink()  # gone: the prepared data is all there is
    assert main(["run", str(recipe_file), *new, "--dry-run"]) == 0


@pytest.mark.parametrize("settings", [[], ["data.tokenizer=gpt2", "data.vocab_size=none",
                                            "data.val_source=[\"{stories}/valid.txt\"]"]], ids=["bpe", "gpt2"])
def test_train_config_on_unprepared_data_names_the_prepare_that_makes_it(tmp_path, stories_dir, capsys, settings):
    """`train --config` on a data.dir not prepared yet names the `tinygemma prepare` of the recipe's [data] (a
    `run` suggested before would have trained another run: without --stop-at, --profile or --resume). Pasted as
    it is, that prepares the data the same command then trains on."""
    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    command = ["train", "--config", str(recipe_file), "--stop-at", "2",
               *(part for item in settings for part in ("--set", item.format(stories=stories_dir)))]
    assert main(command) == 2
    suggested = re.search(r"`(tinygemma prepare [^`]*)`", capsys.readouterr().err).group(1)
    assert suggested == (f"tinygemma prepare --out {tmp_path}/data --source {stories_dir}/train.txt "
                         + (f"--val-source {stories_dir}/valid.txt --limit 300" if settings else
                            "--tokenizer bpe --vocab-size 400 --limit 300"))
    assert main(shlex.split(suggested)[1:]) == 0
    assert main(command) == 0
    from tinygemma.cli import prepare_command
    from tinygemma.config import DataConfig
    assert prepare_command(DataConfig(dir="-d", source=["-a b.txt"], val_source=["v.txt"])) == (
        "tinygemma prepare --out ./-d --source './-a b.txt' --val-source v.txt")  # (not read as options)
    assert [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r] == [1, 2]


def test_run_refuses_other_data_for_an_existing_run_before_preparing_it(tmp_path, stories_dir, capsys):
    """A run in train.out continues on its own [data]: another limit in a new data.dir (what the data.dir refusal
    advises) is refused naming the run, before the new data is prepared (training refused it only afterwards)."""
    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    assert main(["run", str(recipe_file), "--set", "generate.max_new_tokens=2"]) == 0
    capsys.readouterr()
    assert main(["run", str(recipe_file), "--set", "data.limit=250", "--set", f"data.dir={tmp_path / 'other'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds a run trained on other [data] (limit: 300, the recipe asks for 250)" in err, err
    assert not (tmp_path / "other").exists()
    # A run another process is training is refused before its data (missing here) is prepared, not after.
    from tinygemma.files import FolderLock
    trainer = FolderLock(tmp_path / "run", "a run")
    trainer.acquire()
    try:
        assert main(["run", str(recipe_file), "--set", f"data.dir={tmp_path / 'other'}"]) == 2
    finally:
        trainer.release()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a run another process is writing" in err, err
    assert not (tmp_path / "other").exists()
    same = stories_dir / ".." / stories_dir.name / "train.txt"  # the same stories, named another way
    assert main(["run", str(recipe_file), "--set", "generate.max_new_tokens=2", "--set", f"data.source={same}"]) == 0


def test_run_refuses_settings_before_preparing_and_prompts_before_training(tmp_path, stories_dir, capsys):
    """What would stop a run after its data is prepared (a block past the model's positions, a micro-batch size
    that does not divide the batch, flex attention off CUDA, data.dir in train.out's folder, initial weights that
    are not there) or after it is trained (an empty prompt, too many new tokens, a seed past
    64 bits) is refused in one line, before that work."""
    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    save_model(Gemma3(ModelConfig.preset("gemma3-tiny", vocab_size=512, d_model=16, n_layers=1, head_dim=8,
                                         mlp_dim=32)), tmp_path / "other")  # known before the data is prepared
    # the recipe's model on GPT-2's 50,257 ids, but another tokenizer's: refused before GPT-2 data is prepared
    bpe = train_bpe(["Once upon a time there was a cat."] * 4, 300)  # (any tokenizer but GPT-2's)
    save_model(Gemma3(load_recipe(str(recipe_file)).model_config(50257)), tmp_path / "gpt2size",
               {"tokenizer": bpe.save(tmp_path / "gpt2size")})
    for overrides, phrase in [(["train.block_size=4096"], "train.block_size 4096 exceeds"),
                              (["train.micro_batch_size=3"], "train.micro_batch_size (3) must divide"),
                              (["train.attention_backend=flex"], "flex needs a CUDA GPU"),  # on this CPU
                              (["train.attention_backend=flash"], "flash needs a CUDA GPU"),
                              (['generate.prompts=["Once", ""]'], "generate.prompts holds ''"),
                              (["generate.max_new_tokens=2049"], "generate.max_new_tokens 2049 leaves no room"),
                              (["generate.seed=100000000000000000000"], "generate.seed must be an integer from 0"),
                              ([f"data.dir={tmp_path}/run", f"train.out={tmp_path}/data/../run"],
                               f"data.dir {tmp_path}/run is train.out itself"),
                              ([f"data.dir={tmp_path}/run/data"], f"data.dir {tmp_path}/run/data is inside train.out"),
                              ([f"train.init_from={tmp_path}/base"], f"train.init_from {tmp_path}/base: checkpoint not "
                                                                     "found"),
                              ([f"train.init_from={tmp_path}/other"], f"train.init_from {tmp_path}/other holds another "
                                                                      "model than the configured one (d_model 16"),
                              ([f"train.init_from={tmp_path}/gpt2size", "data.tokenizer=gpt2", "data.vocab_size=none"],
                               "but the data is tokenized with gpt2")]:
        assert main(["run", str(recipe_file), *(arg for o in overrides for arg in ("--set", o))]) == 2, overrides
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and phrase in err, (overrides, err)
        assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
    # 2000 new tokens leave 48 of the model's 2048 positions, fewer than this prompt's tokens: it was refused once
    # the data's BPE was known. The samples read at most the 32-token block the model trained on, so no position
    # past it: sampled now, to the text's end or 2000 new tokens.
    long_prompt = "Once upon a time there was a little girl named Lily. " * 8
    assert main(["run", str(recipe_file), "--set", "generate.max_new_tokens=2000", "--set",
                 f'generate.prompts=["{long_prompt}"]', "--set", f"train.out={tmp_path}/sampled"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "sampled" / "eval.json").read_text())["samples"][0].startswith(long_prompt)
    assert (tmp_path / "data" / "meta.json").exists() and not (tmp_path / "run").exists()
    # data.dir prepared with another tokenizer than the recipe now asks: that is the refusal, not init_from's
    assert main(["run", str(recipe_file), "--set", f"train.init_from={tmp_path}/gpt2size", "--set",
                 "data.tokenizer=gpt2", "--set", "data.vocab_size=none"]) == 2
    assert "was prepared from other data than the recipe's [data] asks for" in capsys.readouterr().err


def test_a_run_with_checkpoints_is_not_refused_for_a_base_checkpoint_gone_since(tmp_path, monkeypatch):
    """train.init_from is read only by a new run: one that has checkpoints continues from its own, so the base
    checkpoint it was fine-tuned from may have been moved or deleted since."""
    from tinygemma import pipeline

    recipe = load_recipe(None, [f"train.out={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}",
                                f"train.init_from={tmp_path / 'base-deleted'}", "train.device=cpu"])
    monkeypatch.setattr(pipeline, "last_checkpoint", lambda out: tmp_path / "run" / "checkpoints" / "step_000010")
    pipeline.check_training_settings(recipe)  # no refusal: the run continues from its own checkpoint
    monkeypatch.setattr(pipeline, "last_checkpoint", lambda out: None)  # a new run: its base must be there
    with pytest.raises(tinygemma.UserError, match="train.init_from .*base-deleted: checkpoint not found"):
        pipeline.check_training_settings(recipe)


def test_run_continues_a_run_started_by_train_on_the_data_it_trained_on(tmp_path, stories_dir, capsys):
    """`tinygemma train --data DIR` records [data] as DIR alone (its recipe's other [data] fields never made DIR):
    `tinygemma run` with the [data] that prepared DIR continues it (every [data] was refused: the recorded
    defaults against the recipe's, or the recipe against DIR), and other [data] is refused naming the run, by
    DIR while it is there and by the recorded [data] once it is gone."""
    from tinygemma.pipeline import prepare_if_missing

    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    prepare_if_missing(load_recipe(str(recipe_file)))
    same_run = ["model.d_model=32", "model.n_layers=2", "model.head_dim=8", "model.mlp_dim=64",
                "model.sliding_window=16", "batch_size=4", "block_size=32", "grad_accum_steps=1", "warmup_steps=2",
                "learning_rate=3e-3", "min_lr=3e-4", "eval_interval=3", "eval_batches=2", "checkpoint_interval=3",
                "device=cpu", "dtype=float32", "compile=false", "loggers=[]"]
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(run_dir), "--model", "gemma3-tiny",
                 "--max-steps", "6", "--stop-at", "3", *[a for s in same_run for a in ("--set", s)]]) == 0
    assert json.loads((run_dir / "config.json").read_text())["data"] == {"dir": str(tmp_path / "data")}
    capsys.readouterr()

    other = ["--set", f"data.dir={tmp_path / 'other'}", "--set", "data.limit=250"]
    assert main(["run", str(recipe_file), *other]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds a run trained on other [data] (limit: 300, the recipe asks for 250)" in err
    assert not (tmp_path / "other").exists()

    # As an older tinygemma recorded it: the built-in [data] defaults, which never made DIR.
    config = json.loads((run_dir / "config.json").read_text())
    config["data"] = {**load_recipe(None).to_dict()["data"], "dir": str(tmp_path / "data")}
    (run_dir / "config.json").write_text(json.dumps(config))
    assert main(["run", str(recipe_file), "--set", "generate.max_new_tokens=2"]) == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "train_loss" in x] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / "config.json").read_text())["data"]["limit"] == 300  # now the recipe's, true
    (tmp_path / "data").rename(tmp_path / "moved")
    assert main(["run", str(recipe_file), *other]) == 2
    assert "holds a run trained on other [data] (limit 300 -> 250)" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_the_final_evaluation_keeps_a_float32_runs_precision(monkeypatch):
    """On a GPU the whole-split evaluation loads the model in bfloat16 ("auto"), except for a run the recipe
    trained in float32: that one is evaluated in float32 (it was bfloat16 whatever the recipe said)."""
    import torch

    import tinygemma.pipeline as pipeline
    from tinygemma.config import load_recipe

    class Loaded(Exception):
        pass

    def load_model(ckpt, tokenizer, dtype, device):
        raise Loaded(dtype)

    monkeypatch.setattr(pipeline, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(pipeline, "checkpoint_tokenizer", lambda out: None)
    monkeypatch.setattr(pipeline, "load_model", load_model)
    for dtype, loaded in (("float32", "float32"), ("auto", "auto"), ("bfloat16", "auto")):
        with pytest.raises(Loaded) as caught:
            pipeline.evaluate_and_sample(load_recipe(None, [f"dtype={dtype}"]))
        assert caught.value.args == (loaded,)


# ------------------------------------------------------------------ --dry-run


def test_dry_run_prints_the_workshop_recipe_s_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """The workshop's numbers, as its recipe's comments and the README give them, from the recipe alone: no
    data prepared, no run folder, no tiktoken download (the gpt2 vocabulary's size is known)."""
    def loaded():
        raise AssertionError("the dry run loaded the GPT-2 vocabulary")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "no-cache"))
    # The vocabulary is cached once loaded: an earlier test in this process may have loaded it already.
    monkeypatch.setattr(tinygemma.tokenizer, "_gpt2_encoding", loaded)
    assert main(["run", str(ROOT / "configs" / "workshop.toml"), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert printed["recipe"] == load_recipe(ROOT / "configs" / "workshop.toml").to_dict()
    plan = printed["plan"]
    assert plan["model"] == {"preset": "gemma3-270m-gpt2", "vocab_size": 50_257, "vocab_size_from": "the gpt2 tokenizer",
                             "parameters": 132_490_496, "flops_per_token": ModelConfig.preset(
                                 "gemma3-270m-gpt2").flops_per_token(128)}
    assert plan["batch"] == {"sequences_per_step": 1024, "block_size": 128, "tokens_per_step": 131_072}
    assert (plan["steps"], plan["tokens"]) == (4688, 614_465_536)
    assert plan["learning_rates"] == {"adamw": {"first_step": pytest.approx(1e-4 / 31), "highest": 1e-4,
                                                "last_step": pytest.approx(1e-5)}}
    assert plan["this_invocation"] == {"from_step": 0, "to_step": 4688}
    assert plan["checkpoints"]["count"] == 10  # every 500 steps, and the last (4,688)
    assert plan["checkpoints"]["on_disk_at_most"] == 2  # keep_checkpoints = 1 newest, and the best
    assert plan["flops"] == 614_465_536 * plan["model"]["flops_per_token"]
    assert plan["evaluations"] == {"count": 48, "tokens_each": 4 * 131_072}  # step 0, every 100, the last
    assert err.count("\n") == 1 and "614,465,536 tokens" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("eval_interval, checkpoint_interval, max_steps, schedule", [
    (3, 3, 6, ["optimizer=adamw", "lr_schedule=cosine", "warmup_steps=1"]),
    (4, 6, 25, ["optimizer=muon", "lr_schedule=wsd", "warmup_steps=0"]),
    (0, 5, 12, ["optimizer=adamw", "lr_schedule=cosine", "warmup_steps=0"]),  # the peak itself never taken
    (7, 0, 20, ["optimizer=muon", "lr_schedule=wsd", "warmup_steps=0", "cooldown_fraction=1"]),
    (0, 0, 9, ["optimizer=adamw", "lr_schedule=wsd", "warmup_steps=9"]),
    (5, 10, 10, ["optimizer=muon", "lr_schedule=cosine", "warmup_steps=3"]),
    (1, 3, 7, ["optimizer=adamw", "lr_schedule=wsd", "warmup_steps=2", "cooldown_fraction=0"]),
])
def test_dry_run_plans_what_the_run_then_does(tmp_path, stories_dir, capsys, eval_interval, checkpoint_interval,
                                             max_steps, schedule):
    """Against the run itself: its parameters and FLOPs (config.json), tokens and learning rates (metrics.jsonl),
    evaluations, and the checkpoints it wrote (keep_checkpoints large enough to keep them all) and their size."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    settings = [f"train.eval_interval={eval_interval}", f"train.checkpoint_interval={checkpoint_interval}",
                f"train.max_steps={max_steps}", "train.keep_checkpoints=100", "generate.prompts=",
                *(f"train.{s}" for s in schedule)]
    args = ["run", str(recipe), *(part for s in settings for part in ("--set", s))]
    assert main([*args, "--dry-run"]) == 0
    before = json.loads(capsys.readouterr().out)["plan"]
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
    assert before["model"]["vocab_size_from"] == "data.vocab_size, the BPE prepare trains (at most)"
    assert main(args) == 0
    capsys.readouterr()
    # Once the data is prepared, the plan is the trainer's own (the BPE may stop short of data.vocab_size)
    assert main([*args, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    plan = json.loads(out)["plan"]
    assert plan["model"]["vocab_size_from"] == f"the prepared data in {tmp_path / 'data'}"
    assert plan["model"]["vocab_size"] == json.loads((tmp_path / "data" / "meta.json").read_text())["vocab_size"]
    assert plan["this_invocation"] == {"from_step": max_steps, "to_step": max_steps}  # the run is finished
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert plan["model"]["parameters"] == config["run"]["parameters"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    assert plan["tokens"] == steps[-1]["tokens"] and len(steps) == plan["steps"]
    for name, rates in plan["learning_rates"].items():
        logged = [r["lr" if name == "adamw" else "lr_muon"] for r in steps]  # (the records log Muon's rate too)
        assert (rates["first_step"], rates["highest"], rates["last_step"]) == pytest.approx(
            (logged[0], max(logged), logged[-1]))
    assert plan["evaluations"]["count"] == sum("val_loss" in r for r in records)
    written = sorted((run / "checkpoints").glob("step_*"))
    assert plan["checkpoints"]["count"] == len(written)
    assert all(sum(f.stat().st_size for f in c.iterdir()) <= plan["checkpoints"]["bytes_each_at_most"]
               for c in written)


def test_dry_run_of_a_recipe_this_machine_cannot_train_prints_the_plan_then_the_refusal(tmp_path, capsys,
                                                                                        monkeypatch):
    """A GPU recipe's plan on a laptop: printed, then training's refusal in one line and exit status 2; and train
    --dry-run of a recipe whose data is not prepared yet is its plan, not the refusal to train."""
    monkeypatch.chdir(tmp_path)
    if not torch.cuda.is_available():
        assert main(["run", str(ROOT / "configs" / "speedrun.toml"), "--dry-run", "--set", "train.device=cuda"]) == 2
        out, err = capsys.readouterr()
        assert json.loads(out)["plan"]["optimizer"] == "muon"
        assert json.loads(out)["plan"]["on_this_machine"] is None and "on this machine" not in err
        assert err.splitlines()[1:] == ["tinygemma run: error: device cuda was asked for, but PyTorch sees no CUDA GPU"]
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        # A recipe this machine can train says where: the workshop's 270M on a laptop's CPU, in float32
        assert main(["run", str(ROOT / "configs" / "workshop.toml"), "--dry-run"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["plan"]["on_this_machine"] == {"device": "cpu", "dtype": "float32", "processes": 1}
        assert err.splitlines()[0].endswith("; on this machine: 1 x cpu in float32")
    assert main(["train", "--config", str(ROOT / "configs" / "cpu-demo.toml"), "--dry-run", "--max-steps", "77"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["plan"]["steps"] == 77
    assert err.splitlines()[1] == ("tinygemma train: error: data/tinystories-cpu (data.dir) is not prepared yet: "
                                   "`tinygemma prepare --out data/tinystories-cpu --tokenizer bpe --vocab-size 4096 "
                                   "--limit 5000` prepares it as the recipe's [data] asks; then run this command again")
    assert list(tmp_path.iterdir()) == []
    # Under torchrun, process 0 alone prints it.
    for name in TORCHRUN_VARIABLES:
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", str(ROOT / "configs" / "workshop.toml"), "--dry-run"]) == 0
    assert capsys.readouterr() == ("", "")


def test_dry_run_makes_training_s_own_checks_and_writes_nothing(tmp_path, stories_dir, capsys):
    """What the run or train would refuse, the dry run refuses (after the recipe's plan): another model for an
    existing run, data prepared from other stories, a --stop-at of 0, a fork (which writes a folder). A tokenizer
    whose special tokens pass its text's ids (Gemma's) takes a model.vocab_size of its text's ids, as training
    does; a BPE of no set size plans prepare's default."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    assert main(["run", str(recipe), "--set", "generate.prompts="]) == 0
    capsys.readouterr()
    run, data = tmp_path / "run", tmp_path / "data"
    files = sorted(tmp_path.rglob("*"))

    def refused(*args: str) -> str:
        assert main([*args, "--dry-run"]) == 2
        out, err = capsys.readouterr()
        assert json.loads(out)["plan"] and err.count("\n") == 2  # the plan, its line, then the refusal's
        return err.splitlines()[1]

    assert "differs from the configured one in d_model" in refused("run", str(recipe), "--set", "model.d_model=16")
    assert "was prepared from other data than the recipe's [data]" in refused(
        "run", str(recipe), "--set", "data.tokenizer=gpt2", "--set", "data.vocab_size=none", "--set",
        f"train.out={tmp_path / 'other'}")
    assert "--stop-at (stop_at) must be" in refused("train", "--out", str(run), "--resume", "--stop-at", "0")
    assert main(["train", "--resume-from", str(run / "checkpoints" / "step_000006"), "--out", str(tmp_path / "fork"),
                 "--dry-run"]) == 2
    assert "--dry-run does not fork a run" in capsys.readouterr().err
    # This invocation's steps: a new run stopped at 3, the finished one none
    assert main(["train", "--config", str(recipe), "--set", f"train.out={tmp_path / 'new'}", "--stop-at", "3",
                 "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["this_invocation"] == {"from_step": 0, "to_step": 3}
    assert main(["train", "--out", str(run), "--resume", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["this_invocation"] == {"from_step": 6, "to_step": 6}
    assert plan["model"]["vocab_size_from"] == f"the prepared data in {data}"  # (a resume's recipe holds it too)
    assert sorted(tmp_path.rglob("*")) == files  # nothing written, anywhere
    # Muon's step past float32 on the tallest matrices: refused by the dry run, and by run before it prepares
    assert "muon_learning_rate x" in refused("train", "--out", str(run), "--resume", "--set",
                                             "optimizer=muon", "--set", "muon_learning_rate=3e38")
    assert main(["run", str(recipe), "--set", f"data.dir={tmp_path / 'data-m'}", "--set", "train.optimizer=muon",
                 "--set", "train.muon_learning_rate=3e38", "--set", f"train.out={tmp_path / 'run-m'}"]) == 2
    assert "muon_learning_rate x" in capsys.readouterr().err and not (tmp_path / "data-m").exists()
    # A refusal before training's checks still plans the prepared data's vocabulary, not data.vocab_size's
    if not torch.cuda.is_available():
        other = ["--set", "train.device=cuda", "--set", "data.vocab_size=999", "--set", f"train.out={tmp_path / 'o'}"]
        assert "no CUDA GPU" in refused("run", str(recipe), *other)
        assert main(["run", str(recipe), *other, "--dry-run"]) == 2
        plan = json.loads(capsys.readouterr().out)["plan"]
        assert plan["model"]["vocab_size"] == json.loads((data / "meta.json").read_text())["vocab_size"] != 999
    # A run another process is writing is refused, as train refuses it; a resume that would delete checkpoints
    # says so, and deletes none
    lock = FolderLock(run, "a run")
    lock.acquire()
    try:
        assert "another process" in refused("train", "--out", str(run), "--resume")
    finally:
        lock.release(remove=True)
    assert main(["train", "--config", str(recipe), "--set", f"train.out={tmp_path / 'kept'}", "--set",
                 "train.checkpoint_interval=1", "--set", "train.keep_checkpoints=3", "--stop-at", "4"]) == 0
    capsys.readouterr()
    kept = sorted((tmp_path / "kept" / "checkpoints").iterdir())
    assert main(["train", "--out", str(tmp_path / "kept"), "--resume", "--set", "keep_checkpoints=1", "--stop-at",
                 "5", "--dry-run"]) == 0
    assert "warning: keep_checkpoints 3 -> 1: the run's checkpoints past the newest 1" in capsys.readouterr().err
    assert sorted((tmp_path / "kept" / "checkpoints").iterdir()) == kept
    # A resume with a new rate: the plan's schedule is the new settings' from step 1, which no step took before
    # the resume; its own steps' rates apart, as the resume then logs them
    shutil.copytree(tmp_path / "kept", tmp_path / "kept-lr")
    changed = ["train", "--out", str(tmp_path / "kept-lr"), "--resume", "--set", "learning_rate=1e-3"]
    assert main([*changed, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    rates = json.loads(out)["plan"]["learning_rates"]["adamw"]
    assert "(steps 5 to 6: " in err
    assert main(changed) == 0
    records = [json.loads(line) for line in (tmp_path / "kept-lr" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["lr"] for r in records if "train_loss" in r and r["step"] > 4]
    assert rates["this_invocation"] == pytest.approx([logged[0], logged[-1]]) and len(logged) == 2
    assert rates["this_invocation"][0] != rates["first_step"]
    capsys.readouterr()
    # A checkpoint cut short is refused as the resume refuses it, from its header alone
    last = json.loads((tmp_path / "kept" / "checkpoints" / "last.json").read_text())["dir"]
    weights = tmp_path / "kept" / "checkpoints" / last / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert "is not a readable safetensors file" in refused("train", "--out", str(tmp_path / "kept"), "--resume")

    tokenizer = Tokenizer.from_file(str(data / "tokenizer.json"))
    text_ids = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens(["<image_soft_token>"])  # past the text's ids, as in Gemma 3's tokenizer
    tokenizer.save(str(tmp_path / "special.json"))
    assert main(["run", str(recipe), "--dry-run", "--set", f"data.tokenizer={tmp_path / 'special.json'}",
                 "--set", "data.vocab_size=none", "--set", f"data.dir={tmp_path / 'new-data'}",
                 "--set", f"model.vocab_size={text_ids}", "--set", f"train.out={tmp_path / 'other'}"]) == 0
    model = json.loads(capsys.readouterr().out)["plan"]["model"]
    assert (model["vocab_size"], model["vocab_size_from"]) == (text_ids, "model.vocab_size")
    if not torch.cuda.is_available():  # data prepared with it, and a refusal before training's checks: the same
        prepare(tmp_path / "special-data", [stories_dir / "train.txt"], tokenizer=str(tmp_path / "special.json"),
                limit=300, workers=1, progress=False)
        assert "no CUDA GPU" in refused("run", str(recipe), "--set", f"data.tokenizer={tmp_path / 'special.json'}",
                                        "--set", "data.vocab_size=none", "--set", f"data.dir={tmp_path / 'special-data'}",
                                        "--set", f"model.vocab_size={text_ids}", "--set", "train.device=cuda",
                                        "--set", f"train.out={tmp_path / 'other'}")
    assert main(["run", str(recipe), "--dry-run", "--set", "data.vocab_size=none", "--set",
                 f"data.dir={tmp_path / 'new-data'}", "--set", f"train.out={tmp_path / 'other'}"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["model"]["vocab_size"] == DEFAULT_BPE_VOCAB_SIZE
    assert "source not found" in refused("run", str(recipe), "--set", f"data.source={tmp_path / 'gone.txt'}",
                                         "--set", f"data.dir={tmp_path / 'new-data'}", "--set",
                                         f"train.out={tmp_path / 'other'}")


def test_run_keeps_the_evaluation_of_weights_that_cannot_be_sampled(tmp_path, stories_dir, capsys, monkeypatch):
    """Weights whose logits are not finite (a float16 overflow, a NaN) were evaluated on the whole split, minutes
    long, then failed at the first sample before eval.json was written: the evaluation is recorded (and
    report.md), then the run fails in one line as before."""
    import tinygemma.pipeline
    from tinygemma.generate import NonFiniteLogits

    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    assert main(["run", str(recipe_file), "--set", "generate.max_new_tokens=2"]) == 0
    (tmp_path / "run" / "eval.json").unlink()
    capsys.readouterr()

    def broken(model, *args, **kwargs):
        raise NonFiniteLogits(model, None, "at new token 1")

    monkeypatch.setattr(tinygemma.pipeline, "generate_text", broken)
    assert main(["run", str(recipe_file), "--set", "generate.max_new_tokens=2"]) != 0
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("tinygemma run: error: the model's logits hold NaN or inf")
    recorded = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert recorded["samples"] == [] and recorded["eval"]["tokens"] > 0


# ------------------------------------------------------------------ pinned by mutation round 12

FAST = ["--set", "generate.max_new_tokens=2", "--set", "train.max_steps=2", "--set", "train.eval_interval=2",
        "--set", "train.checkpoint_interval=2"]


def test_a_run_whose_data_folder_is_gone_or_broken_continues_on_its_recorded_data(tmp_path, stories_dir, capsys):
    """Without its prepared data (deleted, or its meta.json broken), a run is judged by the [data] it recorded: the
    same stories named another way, a recorded [data] from before a setting existed, and a new data.dir all go on."""
    import shutil

    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    assert main(["run", str(recipe_file), *FAST]) == 0
    capsys.readouterr()
    (tmp_path / "data" / "meta.json").write_text("{broken")
    assert main(["run", str(recipe_file), "--dry-run", *FAST, "--set", f"data.dir={tmp_path / 'again'}"]) == 0, \
        capsys.readouterr().err
    shutil.rmtree(tmp_path / "data")
    same = stories_dir / ".." / stories_dir.name / "train.txt"
    assert main(["run", str(recipe_file), "--dry-run", *FAST, "--set", f"data.source={same}"]) == 0, \
        capsys.readouterr().err
    config = tmp_path / "run" / "config.json"
    recorded = json.loads(config.read_text())
    del recorded["data"]["val_source"]
    config.write_text(json.dumps(recorded))
    assert main(["run", str(recipe_file), "--dry-run", *FAST]) == 0, capsys.readouterr().err


def test_a_dry_run_refuses_a_data_dir_that_prepare_would_damage(tmp_path, stories_dir, capsys):
    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    assert main(["run", str(recipe_file), "--dry-run"]) == 2
    assert "data.dir" in capsys.readouterr().err


def test_dry_run_of_a_new_bpe_recipe_plans_its_data_vocab_size_and_the_checkpoints_kept(tmp_path, stories_dir,
                                                                                        capsys):
    """Before anything is prepared, a BPE recipe plans its model with data.vocab_size (not prepare's default) and
    the checkpoints on disk as the run writes them (not keep_checkpoints + 1 however few):
    RECIPE's BPE of 400 tokens plans a model of 400 rows, and 6 steps checkpointed every 3 keep 2, not 101."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    assert main(["run", str(recipe), "--set", "train.keep_checkpoints=100", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert (plan["model"]["vocab_size"], plan["model"]["vocab_size_from"]) == (
        400, "data.vocab_size, the BPE prepare trains (at most)")
    assert plan["checkpoints"]["count"] == 2 and plan["checkpoints"]["on_disk_at_most"] == 2
    assert not (tmp_path / "data").exists()


def test_dry_run_line_says_the_checkpoint_size_in_gib_and_this_invocation_s_steps(tmp_path, stories_dir, capsys):
    """The plan's one line matches its JSON: the checkpoint's size in GiB, and this invocation's steps."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    assert main(["run", str(ROOT / "configs" / "workshop.toml"), "--dry-run", "--set", f"train.out={tmp_path}/w",
                 "--set", f"data.dir={tmp_path}/wd"]) == 0
    out, err = capsys.readouterr()
    size = json.loads(out)["plan"]["checkpoints"]["bytes_each_at_most"]
    assert size > 2**28 and f"of at most {size / 2**30:.2f} GiB" in err
    prepare(tmp_path / "data", sources=[stories_dir / "train.txt"], tokenizer="gpt2", limit=100, workers=1,
            progress=False)
    assert main(["train", "--config", str(recipe), "--set", f"data.dir={tmp_path / 'data'}", "--set",
                 "data.tokenizer=gpt2", "--set", "data.vocab_size=none", "--set", "data.limit=100",
                 "--stop-at", "3", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["plan"]["this_invocation"] == {"from_step": 0, "to_step": 3}
    assert " (this invocation: steps 0 to 3)" in err


def test_a_run_that_holds_its_prepared_data_continues_with_it(tmp_path, stories_dir, capsys):
    """data.dir inside train.out is refused for a new run (its folder must hold nothing else), but a run already
    trained there may keep its prepared data inside its own folder: `run` goes on with it."""
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE.format(root=tmp_path, stories=stories_dir))
    quick = ["--set", "train.max_steps=2", "--set", "train.eval_interval=0", "--set", "train.checkpoint_interval=0",
             "--set", "generate.prompts="]
    assert main(["run", str(recipe), *quick]) == 0
    shutil.move(tmp_path / "data", tmp_path / "run" / "data")  # the run's data, kept beside its checkpoints
    capsys.readouterr()
    inside = ["--set", f"data.dir={tmp_path / 'run' / 'data'}"]
    assert main(["run", str(recipe), *quick, *inside, "--dry-run"]) == 0, capsys.readouterr().err
    assert main(["run", str(recipe), *quick, *inside]) == 0, capsys.readouterr().err
    assert "inside train.out" not in capsys.readouterr().err


def test_the_plan_names_this_machines_processes_and_none_where_it_cannot_train(monkeypatch):
    """on_this_machine under torchrun: this node's processes (LOCAL_WORLD_SIZE), not every node's (WORLD_SIZE);
    none for several processes on a Mac's GPU, which the runtime refuses (NCCL and gloo only)."""
    from tinygemma.pipeline import plan_machine

    recipe = load_recipe(None, ["train.device=cpu"])
    assert plan_machine(recipe) == {"device": "cpu", "dtype": "float32", "processes": 1}
    for name, value in {"TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "16", "RANK": "0",
                        "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "localhost", "MASTER_PORT": "29599"}.items():
        monkeypatch.setenv(name, value)
    assert plan_machine(recipe)["processes"] == 8
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert plan_machine(load_recipe(None, ["train.device=mps"])) is None


def test_a_dry_run_s_warnings_are_said_once_under_torchrun(capsys, monkeypatch):
    """Under torchrun the plan is printed by process 0 alone, and so are the warnings train.check_run found;
    every other process says nothing."""
    monkeypatch.setattr(tinygemma.pipeline, "recipe_plan", lambda recipe, checked=None: {"steps": 1})
    monkeypatch.setattr(tinygemma.pipeline, "say_plan", lambda plan: "the plan")
    recipe = load_recipe(None, [])
    check = lambda: {"warnings": ["train.init_from: its weights trained 5 steps on this data"]}  # noqa: E731
    for name, value in {"TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "RANK": "1",
                        "MASTER_ADDR": "localhost", "MASTER_PORT": "29599"}.items():
        monkeypatch.setenv(name, value)
    assert cli._print_plan(recipe, check) == 0
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli._print_plan(recipe, check) == 0
    out, err = capsys.readouterr()
    assert err == "the plan\ntinygemma: warning: train.init_from: its weights trained 5 steps on this data\n"
