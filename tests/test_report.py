"""RUN/report.md and the export's model card (issue 21): each figure is the one in the run's own records
(config.json, metrics.jsonl, the checkpoints), the reproduce command gives back the run's recipe, the card's header
is read by huggingface_hub, its code runs with transformers, and what no record says is called unknown."""

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_train
import torch

import tinygemma
import tinygemma.report
from tinygemma.cli import main
from tinygemma.config import Recipe, load_recipe
from tinygemma.devices import cpu_description
from tinygemma.files import FolderLock
from tinygemma.metrics import format_duration
from tinygemma.report import optimizer_description, validation_description

data_dir, straight_run, one_thread = test_train.data_dir, test_train.straight_run, test_train.one_thread
ROOT = Path(__file__).resolve().parents[1]


def val_at(run_dir: Path, step: int) -> dict:
    return next(r for r in test_train.metrics(run_dir) if r["step"] == step and "val_loss" in r)


def git_head() -> str | None:
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def test_the_report_is_the_runs_records(straight_run, stories_dir):
    """test_train's 40-step run, which wrote report.md at its checkpoints (steps 20 and 40)."""
    text = (straight_run / "report.md").read_text()
    config = json.loads((straight_run / "config.json").read_text())
    run = config["run"]
    state = json.loads((straight_run / "checkpoints" / "step_000040" / "trainer_state.json").read_text())

    command = shlex.split(next(line for line in text.splitlines() if line.startswith("tinygemma train")))
    sets = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
    again, recipe = load_recipe(None, sets), Recipe.from_dict(state["config"])  # the same recipe
    assert {k: v for k, v in again.to_dict().items() if k != "model"} == {
        k: v for k, v in recipe.to_dict().items() if k != "model"}
    assert again.model_config(vocab_size=512) == recipe.model_config(vocab_size=512)  # (settings equal to the preset's are left out)

    assert run["hardware"] == f"1 x {cpu_description()}, 1 threads"  # the one_thread fixture's torch threads
    assert f"| hardware | {run['hardware']} |" in text
    assert f"torch {torch.__version__}" in text and f"tinygemma {tinygemma.__version__}" in text
    head = git_head()
    assert (run["commit"] or "").startswith(head) if head else run["commit"] is None
    assert f"| commit | {run['commit'] or 'unknown'} |" in text
    # From the prepared data's meta.json: the stories trained on, and the limit (of training stories: a source
    # with fewer trains on fewer, as cpu-demo's 2,983 stories against its limit of 5,000)
    documents = json.loads((straight_run / "config.json").read_text())["run"]["data_documents"]
    assert documents == {"train": 600, "val": 66}
    assert f"`{stories_dir / 'train.txt'}`, 600 training stories (limit 600)" in text

    assert f"| parameters | {run['parameters']:,} |" in text
    assert "| tokens | 10,240 (40 steps x 256) |" in text
    assert f"| throughput | {10_240 / state['elapsed_s']:,.0f} tokens/s (average) |" in text
    assert "| MFU | not known (no peak figure for this hardware) |" in text  # a CPU
    final, best = val_at(straight_run, 40), val_at(straight_run, state["best_step"])
    assert f"| final: step 40 | {final['val_loss']:.4f} | {final['val_bpb']:.4f} |" in text
    assert f"| best: step {state['best_step']} | {best['val_loss']:.4f} | {best['val_bpb']:.4f} |" in text
    assert "](loss.png)" in text and "## Samples" not in text  # samples come from `tinygemma run`


def test_the_reproduce_command_reads_back_prompts_outside_ascii():
    """A prompt with an emoji: JSON's \\ud83d surrogate escapes are no TOML, so --set refused the command. Stop
    texts come back as they were too: a newline, a comma, brackets, quotes."""
    from tinygemma.report import reproduce_command

    stop = ["\n", "a,b", "[x]", '"q"']
    recipe = load_recipe(None, ['generate.prompts=["Le café 😀", "Tom, un chien"]', f"generate.stop={json.dumps(stop)}"])
    command = shlex.split(reproduce_command(recipe.to_dict()))
    sets = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
    assert load_recipe(None, sets).generate.prompts == ["Le café 😀", "Tom, un chien"]
    assert recipe.generate.stop == load_recipe(None, sets).generate.stop == stop


def test_the_report_counts_the_parameters_the_model_card_and_readme_count(data_dir, tmp_path):
    """Vocabulary padding adds rows no token uses: report.md counted them (456,192 against the export card's
    398,336 for one run); both now count the model's real parameters, as the README's presets table does."""
    from tinygemma.checkpoint import load

    out = tmp_path / "padded"
    test_train.run(data_dir, out, "max_steps=2", "warmup_steps=1", "checkpoint_interval=2",
                   "model.vocab_pad_multiple=1000")
    recorded = json.loads((out / "config.json").read_text())["run"]["parameters"]
    model = load(out)
    assert model.config.padded_vocab_size == 1000 and model.num_params() > recorded
    assert recorded == model.config.num_params()
    assert f"| parameters | {recorded:,} |" in (out / "report.md").read_text()


def test_a_run_resumed_with_other_settings_or_on_another_machine_is_reported_as_it_was_trained(
        data_dir, tmp_path, monkeypatch, capsys):
    """The report's one command trained the final settings throughout, so a run resumed with a lower learning
    rate was not reproduced by it; and its MFU and hardware were the last invocation's, over the whole run's
    time. The trainer state now records each invocation: the report gives one command per part (which do
    reproduce the run's losses, and its evaluations where a resume changed eval_interval), the MFU over each part's
    own peak, and each part's machine."""
    import tinygemma.train as train_module

    out = tmp_path / "run"
    monkeypatch.setattr(train_module, "peak_flops", lambda device: 1e9)  # a made-up peak, so that MFU is known
    test_train.run(data_dir, out, "max_steps=12", "checkpoint_interval=4", stop_at=4)
    monkeypatch.setattr(train_module, "peak_flops", lambda device: 4e9)  # "another GPU" from step 5
    test_train.run(data_dir, out, "max_steps=12", "checkpoint_interval=4", "learning_rate=5e-3", "eval_interval=3",
                   resume=True)
    state = json.loads((out / "checkpoints" / "step_000012" / "trainer_state.json").read_text())
    parts = state["invocations"]
    assert [p["steps"] for p in parts] == [[0, 4], [4, 12]]
    assert parts[0]["changed"] == {} and parts[1]["changed"] == {"learning_rate": [0.01, 0.005],
                                                                  "eval_interval": [10, 3]}
    assert sum(p["elapsed_s"] for p in parts) == pytest.approx(state["elapsed_s"])
    assert [p["peak_flop_s"] / p["elapsed_s"] for p in parts] == pytest.approx([1e9, 4e9])
    config = json.loads((out / "config.json").read_text())
    flops_per_token = tinygemma.ModelConfig(**{k: v for k, v in config["model"].items() if k != "preset"}
                                            ).flops_per_token(32)
    assert [p["flops"] for p in parts] == [4 * 256 * flops_per_token, 8 * 256 * flops_per_token]  # each part's own
    timed = [r for r in test_train.metrics(out) if "tokens_per_s" in r]  # each log line's MFU, over its part's peak
    assert {r["step"] for r in timed} >= {4, 12} and [r["mfu"] for r in timed] == pytest.approx(
        [flops_per_token * r["tokens_per_s"] / (1e9 if r["step"] <= 4 else 4e9) for r in timed])
    text = (out / "report.md").read_text()
    mfu = sum(p["flops"] for p in parts) / sum(p["peak_flop_s"] for p in parts)
    assert f"| MFU | {100 * mfu:.1f}% (over the optimizer steps' time) |" in text

    # The commands, run as written into another folder, train the same losses.
    assert "its settings changed on resume (at step 4, learning_rate 0.01 -> 0.005, eval_interval 10 -> 3)" in text
    commands = [line for line in text.splitlines() if line.startswith("tinygemma train")]
    assert len(commands) == 2 and commands[0].endswith(" --stop-at 4")
    again = tmp_path / "again"
    for command in commands:
        words = [{str(out): str(again), f"train.out={out}": f"train.out={again}"}.get(w, w) for w in shlex.split(command)]
        assert main(words[1:]) == 0
    capsys.readouterr()
    assert test_train.train_losses(again) == test_train.train_losses(out)
    assert test_train.val_losses(again) == test_train.val_losses(out)  # evaluated at the same steps, too
    # The model card's training table says the optimizer row holds the last settings, and what changed.
    assert main(["export", "--ckpt", str(out), "--out", str(tmp_path / "card")]) == 0
    card = (tmp_path / "card" / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| optimizer |"))
    assert row.endswith("learning rate 0.005, cosine schedule to 0.001, 4 warmup steps (the last settings; they "
                        "changed on resume: at step 4, learning_rate 0.01 -> 0.005) |")  # (eval_interval is no optimizer)

    # Checkpoints written before invocations were recorded: the MFU at the average rate, from the log lines'
    # records (it said "not known" for such a run)
    records = [{"step": 1, "tokens_per_s": 100.0, "mfu": 0.10}, {"step": 2, "tokens_per_s": 200.0, "mfu": 0.20}]
    rows = dict(tinygemma.report.training_rows({}, records, {"tokens": 1000, "elapsed_s": 20.0, "step": 2}))
    assert rows["MFU"] == "5.0% (at the average throughput, on the last machine's peak)"

    # A run moved to other hardware lists each part's machine.
    rows = dict(tinygemma.report.machine_rows({}, {"invocations": [
        {"steps": [0, 4], "hardware": "1 x H100", "precision": "bfloat16"},
        {"steps": [4, 12], "hardware": "8 x H100", "precision": "bfloat16"}]}))
    assert rows["hardware and precision"] == "steps 1 to 4: 1 x H100, bfloat16; steps 5 to 12: 8 x H100, bfloat16"


def test_a_run_on_given_data_records_and_reproduces_only_its_data_dir(data_dir, tmp_path, capsys):
    """`train --config RECIPE --data DIR`: the recipe file's [data] section (another tokenizer, vocabulary and
    limit) was never used, yet the checkpoint recorded it, so the Reproduce command and the card's recipe named
    data the run never saw. They hold data.dir alone, as config.json does."""
    out = tmp_path / "run"
    sets = [a for s in test_train.tiny_settings(data_dir, out, "max_steps=2", "warmup_steps=1", "eval_interval=2")[2:]
            for a in ("--set", s)]
    assert main(["train", "--config", str(ROOT / "configs" / "cpu-demo.toml"), "--data", str(data_dir),
                 "--out", str(out), *sets]) == 0
    capsys.readouterr()
    state = json.loads((out / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["config"]["data"] == {"dir": str(data_dir)}
    command = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("tinygemma train"))
    assert [s for s in shlex.split(command) if s.startswith("data.")] == [f"data.dir={data_dir}"]
    assert main(["export", "--ckpt", str(out), "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert '"tokenizer": "bpe"' not in card and f"--set data.dir={data_dir}" in card
    # A checkpoint written before: its state's recipe kept the unused [data] fields; read beside a config.json
    # whose data is data.dir alone, it reproduces only data.dir too.
    old = {"train": {"max_steps": 2}, "data": {"dir": "d", "tokenizer": "bpe", "vocab_size": 4096, "limit": 5000}}
    assert tinygemma.report.recorded_recipe({"config": old}, {"data": {"dir": "d"}}) == {
        "train": {"max_steps": 2}, "data": {"dir": "d"}}
    made = {"dir": "d", "tokenizer": "bpe", "vocab_size": 4096}  # a run whose recipe prepared its data: kept
    assert tinygemma.report.recorded_recipe({"config": {**old, "data": made}}, {"data": made})["data"] == made
    # A newer state says itself: config.json may be a later attempt's (one on other data that failed before its
    # first checkpoint), and the checkpoint's recipe-made data stays whole.
    newer = {"config": {**old, "data": made}, "config_data": "as trained"}
    assert tinygemma.report.recorded_recipe(newer, {"data": {"dir": "d"}})["data"] == made
    assert state["config_data"] == "as trained"


def test_the_machine_and_mfu_rows_are_the_checkpoints_own_parts_not_config_json():
    """config.json's `run` is the newest invocation's, which may have trained none of a checkpoint's steps (the
    best one from before a resume on a bf16 machine; a checkpoint copied out of its run): the rows come from the
    parts the trainer state records. A part whose hardware has no peak leaves the MFU to the parts that have one."""
    newest = {"hardware": "1 x NVIDIA H100", "dtype": "bfloat16", "world_size": 1, "commit": "bbb",
              "software": {"torch": "2.12"}}
    part = {"steps": [0, 20], "hardware": "2 x AMD EPYC", "precision": "float32", "world_size": 2, "commit": "aaa",
            "software": {"torch": "2.11"}, "flops": 4e12, "peak_flop_s": None, "elapsed_s": 10.0}
    rows = dict(tinygemma.report.machine_rows(newest, {"invocations": [part]}))
    assert rows == {"hardware": "2 x AMD EPYC", "precision": "float32 on 2 process(es)", "software": "torch 2.11",
                    "commit": "aaa"}
    assert dict(tinygemma.report.machine_rows({}, {"invocations": [part]}))["commit"] == "aaa"  # copied out
    later = {**part, "steps": [20, 40], "commit": "bbb", "software": {"torch": "2.12"}, "flops": 6e12,
             "peak_flop_s": 3e13}
    rows = dict(tinygemma.report.machine_rows(newest, {"invocations": [part, later]}))
    assert rows["commit"] == "steps 1 to 20: aaa; steps 21 to 40: bbb"
    assert rows["software"] == "steps 1 to 20: torch 2.11; steps 21 to 40: torch 2.12"
    assert rows["hardware"] == "2 x AMD EPYC" and rows["precision"] == "float32 on 2 process(es)"
    # Parts recorded before software, commit and world_size were: config.json's software and commit, the process
    # count from the hardware.
    old = {k: v for k, v in part.items() if k not in ("commit", "software", "world_size")}
    rows = dict(tinygemma.report.machine_rows(newest, {"invocations": [old]}))
    assert rows["precision"] == "float32 on 2 process(es)" and rows["commit"] == "bbb"
    # MFU: over the part with a peak only, said so; never the last log line's MFU at the average rate.
    records = [{"step": 40, "tokens_per_s": 100.0, "mfu": 0.5}]
    state = {"tokens": 1000, "elapsed_s": 20.0, "step": 40, "invocations": [part, later]}
    mfu = dict(tinygemma.report.training_rows({}, records, state))["MFU"]
    assert mfu == "20.0% (over the optimizer steps' time, of steps 21 to 40 only: the other steps' hardware has no " \
                  "peak figure)"
    state["invocations"] = [part]
    assert dict(tinygemma.report.training_rows({}, records, state))["MFU"] == \
        "not known (no peak figure for this hardware)"


def test_a_checkpoint_from_before_the_schedules_end_is_reproduced_to_its_step(data_dir, tmp_path, capsys):
    """A run stopped midway (or exported at an earlier checkpoint) was reproduced by a command that trained the
    whole schedule, a different model. The command now stops where the checkpoint did, and the table says the
    schedule was not finished."""
    out = tmp_path / "run"
    test_train.run(data_dir, out, "max_steps=12", "checkpoint_interval=4", stop_at=4)
    assert main(["export", "--ckpt", str(out), "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "(4 of the schedule's 12 optimizer steps: a checkpoint from before its end)" in card
    text = (out / "report.md").read_text()
    assert [line for line in card.splitlines() if line.startswith("tinygemma train")] == \
        [line for line in text.splitlines() if line.startswith("tinygemma train")]
    (command,) = [line for line in text.splitlines() if line.startswith("tinygemma train")]
    assert command.endswith(" --stop-at 4")
    again = tmp_path / "again"
    assert main([w.replace(f"train.out={out}", f"train.out={again}") for w in shlex.split(command)][1:]) == 0
    capsys.readouterr()
    assert test_train.train_losses(again) == test_train.train_losses(out)
    assert test_train.val_losses(again) == test_train.val_losses(out)  # evaluated at the same steps, too
    assert ((again / "checkpoints" / "step_000004" / "model.safetensors").read_bytes()
            == (out / "checkpoints" / "step_000004" / "model.safetensors").read_bytes())


def test_the_commit_is_unknown_outside_a_git_checkout_of_tinygemma(tmp_path, monkeypatch):
    installed = tmp_path / "site-packages" / "tinygemma"
    installed.mkdir(parents=True)
    monkeypatch.setattr(tinygemma, "__file__", str(installed / "__init__.py"))
    assert tinygemma.report.source_commit() is None  # no repository at all
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert tinygemma.report.source_commit() is None  # a repository around an installed copy is not its source
    assert dict(tinygemma.report.machine_rows({"commit": None}, {}))["commit"] == "unknown"


def card(path: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path / "README.md")


def test_a_recorded_sampling_setting_that_is_refused_never_stops_an_export(straight_run, tmp_path, capsys):
    """A run trained before train checked [generate] may record a seed of -1: its card says the samples were not
    generated, and the export goes on (it stopped with the seed's refusal)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    best = json.loads((run / "checkpoints" / "best.json").read_text())["dir"]
    state_file = run / "checkpoints" / best / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["generate"]["seed"] = -1
    state_file.write_text(json.dumps(state))
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "Not generated from 'Once upon a time': seed must be an integer from 0" in card(tmp_path / "hf").text
    state["config"]["generate"].update(seed=1, prompts=[])  # no prompts: no samples, said so
    state_file.write_text(json.dumps(state))
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "None: the recipe's generate.prompts is empty." in card(tmp_path / "hf").text


def test_the_model_card_of_a_run_and_of_a_bare_transformers_directory(straight_run, stories_dir, tmp_path,
                                                                      capsys):
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    assert main(["export", "--ckpt", str(straight_run), "--out", str(hf)]) == 0
    model_card = card(hf)  # huggingface_hub's own parser reads the header
    assert model_card.data.license == "apache-2.0" and model_card.data.library_name == "transformers"
    assert model_card.data.pipeline_tag == "text-generation" and "gemma3" in model_card.data.tags
    assert model_card.data.datasets is None  # local files, not the hub's dataset: named in the text instead
    text = model_card.text
    assert f"`{stories_dir / 'train.txt'}`" in text
    best = json.loads((straight_run / "checkpoints" / "best.json").read_text())["step"]  # what export takes
    assert f"| tokens | {best * 256:,} ({best:,} optimizer steps) |" in text
    evaluation = val_at(straight_run, best)
    assert f"during training at step {best}" in text
    assert f"| {evaluation['val_loss']:.4f} | {evaluation['val_bpb']:.4f} |" in text
    assert "\n> Once upon a time" in text  # a sample, generated from the exported files
    assert json.loads((straight_run / "config.json").read_text())["run"]["hardware"] in text
    # An AdamW run's card names no Muon learning rate (it said "(Muon 0.04)" whatever the optimizer)
    assert "| optimizer | adamw, learning rate 0.01, cosine schedule to 0.001, 4 warmup steps |" in text
    assert optimizer_description({"optimizer": "muon", "learning_rate": 0.003, "muon_learning_rate": 0.04,
                                  "lr_schedule": "wsd", "cooldown_fraction": 0.4, "min_lr": 3e-4,
                                  "warmup_steps": 100}) == (
        "muon, Muon 0.04 for the matrices, AdamW 0.003 for the rest, wsd schedule to 0.0003 (AdamW) and 0.004 (Muon) "
        "over the last 0.4 of the steps, 100 warmup steps")  # each rate ends at min_lr / learning_rate of its peak
    assert optimizer_description({"optimizer": "muon", "learning_rate": 0.003, "muon_learning_rate": 0.04,
                                  "lr_schedule": "wsd", "cooldown_fraction": 0.0, "min_lr": 3e-4,
                                  "warmup_steps": 100}) == (
        "muon, Muon 0.04 for the matrices, AdamW 0.003 for the rest, wsd schedule with no cooldown (the rates end "
        "at their peak), 100 warmup steps")

    # The card's loading code runs as written, with transformers, on the exported directory.
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    assert f"from_pretrained({str(hf)!r})" in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, {})
    assert printed.getvalue().startswith("Once upon a time")

    bare = tmp_path / "bare"  # a transformers directory records neither training nor evaluation
    assert main(["export", "--ckpt", str(hf), "--out", str(bare)]) == 0
    bare_card = card(bare)
    assert bare_card.data.license == "other" and bare_card.data.datasets is None
    assert "Unknown: the export's source records no training." in bare_card.text
    assert "Unknown: no evaluation was recorded for this checkpoint." in bare_card.text
    # ... but a tinygemma export's weights record the block size it was trained at, as eval reads it
    assert "| context | trained on 32 tokens |" in bare_card.text
    foreign = tmp_path / "foreign"  # saved by transformers itself: no record of a block size
    transformers.AutoModelForCausalLM.from_pretrained(hf).save_pretrained(foreign)
    assert main(["export", "--ckpt", str(foreign), "--out", str(tmp_path / "foreign-hf"), "--tokenizer",
                 str(hf / "tokenizer.json")]) == 0
    assert "| context | unknown (training) |" in card(tmp_path / "foreign-hf").text

    # A model saved by the Python API records no tokenizer and no training: exported with --tokenizer, its card
    # names the tokenizer exported (it said unknown) and does not claim the training it cannot describe.
    from tinygemma.checkpoint import resolve_checkpoint, save_model
    save_model(tinygemma.load(straight_run), tmp_path / "api")
    assert main(["export", "--ckpt", str(tmp_path / "api"), "--out", str(tmp_path / "api-hf"), "--tokenizer",
                 str(resolve_checkpoint(straight_run) / "tokenizer.json")]) == 0
    api_card = card(tmp_path / "api-hf").text
    assert "| vocabulary | 512 tokens, byte-level BPE (tokenizer.json) |" in api_card
    assert "saved by tinygemma's Python API, which records no training" in api_card
    assert "pre-trained from scratch" not in api_card


def test_the_cards_samples_read_at_most_the_block_the_model_trained_on(straight_run, tmp_path, monkeypatch):
    """The card's samples are what `tinygemma generate --ckpt DIR` gives: the model reading at most the 32 tokens of
    its training block at once (its text runs to 200 new tokens), which the card says."""
    pytest.importorskip("transformers")
    from tinygemma.config import GenerateConfig
    from tinygemma.generate import generate_text

    contexts = []  # (this barely trained model samples the same text from 32 tokens as from all: asked, too)
    monkeypatch.setattr(tinygemma.report, "generate_text",
                        lambda *args, **kwargs: contexts.append(kwargs["context"]) or generate_text(*args, **kwargs))
    assert main(["export", "--ckpt", str(straight_run), "--out", str(tmp_path / "hf")]) == 0
    assert contexts == [32]
    text = card(tmp_path / "hf").text
    assert ("; the model reading at most the last 32 tokens at once, the block it trained on (transformers reads "
            "every one).") in text
    model, tokenizer = tinygemma.load(tmp_path / "hf"), tinygemma.report.exported_tokenizer(tmp_path / "hf")
    g = GenerateConfig()

    def sample(context):
        return "Once upon a time" + generate_text(model, tokenizer, "Once upon a time", g.max_new_tokens, seed=g.seed,
                                                  context=context, **g.sampling())[0][0]
    assert tinygemma.report.quote(sample(32)) in text


def test_a_model_with_few_positions_exports_with_shorter_samples(straight_run, tmp_path):
    """max_position_embeddings = 48 (a researcher's block size) leaves no room for the card's 200 new tokens:
    the export was refused ('ask for fewer new tokens', which export has no option for); its samples are now
    as long as the positions allow, and a prompt that fills them is named, not sampled."""
    pytest.importorskip("transformers")
    from tinygemma.checkpoint import checkpoint_tokenizer, save_model
    from tinygemma.config import GenerateConfig, ModelConfig

    tokenizer = checkpoint_tokenizer(straight_run)
    model = tinygemma.Gemma3(ModelConfig.preset("gemma3-tiny", vocab_size=512, max_position_embeddings=48))
    save_model(model, tmp_path / "api", {"tokenizer": tokenizer.save(tmp_path / "api")})
    assert main(["export", "--ckpt", str(tmp_path / "api"), "--out", str(tmp_path / "hf")]) == 0
    prompt_tokens = len(tokenizer.encode("Once upon a time"))
    text = card(tmp_path / "hf").text
    assert "\n> Once upon a time" in text
    assert (f"(at most {48 - prompt_tokens + 1} new tokens: the prompt and they fill the model's 48 positions, the "
            "last new token taking none)") in text
    long = "Once upon a time " * 20
    lines = tinygemma.report.samples_section(tmp_path / "hf", GenerateConfig(prompts=[long, "Tom"]),
                                             tinygemma.report.exported_tokenizer(tmp_path / "hf"))
    assert any(line.startswith(f"Not generated from {long!r}: the prompt's ") for line in lines)
    # prompt i is sampled with seed + i, and the card says so: the settings it states reproduce every sample
    assert "seed 1337 for the first prompt, one more for each next, at most 200 new tokens." in lines[0]
    from tinygemma.generate import generate_text

    g = GenerateConfig()
    room = 48 - len(tokenizer.encode("Tom")) + 1
    tom = generate_text(tinygemma.load(tmp_path / "hf"), tokenizer, "Tom", max_new_tokens=room, seed=1338,
                        **g.sampling())[0][0]
    # (quoted as report.md quotes: a line at each of str.splitlines' breaks, a form feed among them)
    assert tinygemma.report.quote("Tom" + tom) in lines


def test_a_card_names_the_hub_dataset_the_run_was_prepared_from():
    known = {"meta": {"format": "tinygemma"}, "run": {"data_source": {"train": "hf:roneneldan/TinyStories"}}}
    from huggingface_hub import ModelCardData

    header = tinygemma.report.card_header(known)
    assert ModelCardData(**__import__("yaml").safe_load(header)).datasets == ["roneneldan/TinyStories"]


def test_push_to_hub_uploads_the_exported_folder(straight_run, tmp_path, monkeypatch, capsys, hub_login):
    """The upload itself cannot be tested here (no hub): huggingface_hub's calls are replaced by recorders."""
    import huggingface_hub

    calls = []
    # --private asks whether the repository exists and is public first: here it exists, private
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, repo_id, **kwargs: SimpleNamespace(private=True))

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs, (Path(kwargs["folder_path"]) / "README.md").read_text()))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(straight_run), "--out", str(out), "--push-to-hub", "someone/tiny"]) == 0
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == "someone/tiny" and calls[0][2]["exist_ok"] is True
    assert calls[1][1]["repo_id"] == "someone/tiny" and calls[1][1]["folder_path"] == str(out)
    assert "from_pretrained('someone/tiny')" in calls[1][2]  # the card says where it will be loaded from
    # tinygemma's own files (a lock, a killed export's staging folder or temporary) are never uploaded, by
    # huggingface_hub's own matching of the patterns passed
    from huggingface_hub.utils import filter_repo_objects
    names = [".lock", ".tinygemma-staged.ab12cd34/model.safetensors", ".model.safetensors.0123abcd.tmp",
             "README.md", "config.json", "model.safetensors"]
    assert list(filter_repo_objects(names, ignore_patterns=calls[1][1]["ignore_patterns"])) == names[3:]
    # An earlier upload's files that this export does not write, and would change what transformers loads from the
    # hub, are deleted in the same commit (huggingface_hub keeps those uploaded anew); a GGUF and other files stay.
    remote = ["special_tokens_map.json", "added_tokens.json", "tokenizer.model", "model-00001-of-00002.safetensors",
              "model.safetensors.index.json", "pytorch_model.bin", "tiny.gguf", "notes.md", ".gitattributes"]
    assert list(filter_repo_objects(remote, allow_patterns=calls[1][1]["delete_patterns"])) == remote[:6]
    assert "uploaded" in capsys.readouterr().out
    assert not calls[0][2].get("private")  # the hub's default (public) unless asked
    calls.clear()
    assert main(["export", "--ckpt", str(straight_run), "--out", str(out), "--push-to-hub", "someone/tiny",
                 "--private"]) == 0
    assert calls[0][2]["private"] is True  # a new repository is private (an existing one keeps its visibility)
    capsys.readouterr()
    assert main(["export", "--ckpt", str(straight_run), "--out", str(out), "--private"]) == 2
    assert "--private" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    assert main(["export", "--ckpt", str(straight_run), "--out", str(tmp_path / "again"), "--push-to-hub",
                 "someone/tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert 'pip install "tinygemma[hub]"' in err and "\n" not in err


def test_the_cards_transformers_snippet_of_a_greedy_recipe_does_not_sample():
    """transformers refuses temperature 0 with sampling on: a greedy recipe's card says do_sample=False."""
    from tinygemma.config import GenerateConfig
    from tinygemma.report import usage_section

    greedy = "\n".join(usage_section("user/model", GenerateConfig(temperature=0.0)))
    assert "do_sample=False" in greedy and "temperature" not in greedy
    sampled = "\n".join(usage_section("user/model", GenerateConfig(temperature=0.8, top_k=50)))
    assert "do_sample=True, temperature=0.8, top_k=50" in sampled
    # Without top-k, the snippet says top_k=0: transformers' generate otherwise filters to its default of 50
    # (checked against transformers 5.24's logits processors: TopKLogitsWarper with top_k left out, none with 0).
    top_p_only = "\n".join(usage_section("user/model", GenerateConfig(temperature=0.8, top_k=None, top_p=0.9)))
    assert "do_sample=True, temperature=0.8, top_k=0, top_p=0.9)" in top_p_only
    min_p = GenerateConfig(temperature=0.8, top_k=None, min_p=0.05)  # transformers' generate takes min_p
    assert "do_sample=True, temperature=0.8, top_k=0, min_p=0.05)" in "\n".join(usage_section("user/model", min_p))
    import dataclasses

    from tinygemma.report import sampling

    assert "min-p 0.05" in sampling(dataclasses.asdict(min_p))


def test_the_cards_model_rows_count_each_kind_of_layer():
    """The 270M preset: 18 layers, 15 of them sliding over 512 tokens, 3 global; four query heads over one
    key/value head of 256."""
    from tinygemma.config import ModelConfig

    config = ModelConfig.preset("gemma3-270m-gpt2")
    rows = dict(tinygemma.report.model_rows(config, {"meta": {"tokenizer": {"kind": "gpt2"}}, "recipe": {},
                                                     "source": "."}))
    assert rows["layers"] == "18 (15 sliding-window of 512 tokens, 3 global)"
    assert rows["width"] == "d_model 640, MLP 2048, 4 query heads and 1 key/value head(s) of 256"


def test_compare_puts_runs_side_by_side_naming_what_differs(straight_run, data_dir, tmp_path, capsys):
    """`tinygemma compare`: each run's row names the settings in which the runs differ, its steps, tokens and
    validation losses from its own records (the whole split's from eval.json); runs whose sampled validation
    losses came from other windows (another global batch) get the note that says to compare the whole split."""
    other = tmp_path / "other"
    test_train.run(data_dir, other, "learning_rate=5e-3", "batch_size=4", "max_steps=10")
    copy = tmp_path / "copy"
    shutil.copytree(straight_run, copy)
    (copy / "eval.json").write_text(json.dumps({"checkpoint": "step_000040",
                                                "eval": {"loss": 4.25, "bits_per_byte": 1.5, "tokens": 999}}))
    plot = tmp_path / "compare.png"
    assert main(["compare", str(copy), str(other), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line.strip(" |").split(" | ")
            for line in out.splitlines() if line.startswith(f"| {tmp_path}")}
    straight_vals = {r["step"]: r["val_loss"] for r in test_train.metrics(straight_run) if "val_loss" in r}
    other_vals = {r["step"]: r["val_loss"] for r in test_train.metrics(other) if "val_loss" in r}
    best = min(straight_vals, key=straight_vals.get)
    state = json.loads((straight_run / "checkpoints" / "step_000040" / "trainer_state.json").read_text())
    assert rows[str(copy)][1:] == [
        "train.batch_size=8, train.learning_rate=0.01, train.max_steps=40", "40", f"{40 * 8 * 32:,}",
        tinygemma.metrics.format_duration(state["elapsed_s"]), f"{state['tokens'] / state['elapsed_s']:,.0f}",
        f"{straight_vals[40]:.4f} (step 40)",
        f"{straight_vals[best]:.4f} (step {best})", "4.2500 (step 40)", "1.5000"]
    assert rows[str(other)][1:4] == ["train.batch_size=4, train.learning_rate=0.005, train.max_steps=10", "10",
                                     f"{10 * 4 * 32:,}"]
    assert rows[str(other)][6] == f"{other_vals[10]:.4f} (step 10)" and rows[str(other)][8:] == ["-", "-"]
    assert "scored on different windows" in out  # eval_batches x a global batch of 8, and of 4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same run twice over (another folder), its data named by an absolute path in one and a relative one in
    # the other: nothing differs, and the windows are the same.
    config = json.loads((copy / "config.json").read_text())
    config["data"]["dir"] = os.path.relpath(config["data"]["dir"])
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["compare", str(copy), str(straight_run)]) == 0
    out = capsys.readouterr().out
    assert f"| {straight_run} | - | 40 |" in out and "different windows" not in out
    assert "bits per byte)" not in out  # (one tokenizer: the losses compare as they are)
    # Other data (another tokenizer) under the same folder name: named as a difference, with the windows' note.
    config["run"]["tokenizer"]["sha256"] = "0123456789abcdef" * 4
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["compare", str(copy), str(straight_run)]) == 0
    out = capsys.readouterr().out
    assert "| data=" in out and "tokenizer tokenizer.json 01234567" in out and "different windows" not in out
    assert "; validation: set aside from the training source (a 0.1 share), 66 stories; tokenizer" in out
    assert "tokenizers differ: their losses per token do not compare, their bits per byte do" in out
    assert "(the sampled ones up to their windows' noise: other tokens make other windows; the whole split's " in out
    assert "exactly), where each tokenizer gives back the text it reads (prepare warns of one that" in out
    assert "validated on different stories" not in out  # the same stories, in other tokens
    # The sampled losses show their bits per byte beside them, what compares (no eval.json: no whole split's)
    last = [r for r in map(json.loads, (straight_run / "metrics.jsonl").read_text().splitlines()) if "val_bpb" in r][-1]
    assert f"| {last['val_loss']:.4f} (step {last['step']:,}, {last['val_bpb']:.4f} bits per byte) |" in out
    # Told apart by the stories' own digest, which prepare records: the same file named another way (absolute,
    # relative) is the same stories, and other stories of the same name and count are not.
    assert len(config["run"]["val_text_blake2b"]) == 32
    config["run"]["data_source"]["train"] = [os.path.abspath(config["run"]["data_source"]["train"][0])]
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["compare", str(copy), str(straight_run)]) == 0
    assert "validated on different stories" not in capsys.readouterr().out
    config["run"]["data_source"] = json.loads((straight_run / "config.json").read_text())["run"]["data_source"]
    config["run"]["val_text_blake2b"] = "0" * 32
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["compare", str(copy), str(straight_run)]) == 0
    out = capsys.readouterr().out
    assert "validated on different stories too (set aside from the training source (a 0.1 share), 66 stories of " in out
    assert "each, other stories by their text): not even their bits per byte compare" in out
    # Runs on data prepared before the digest was recorded: told apart by where their stories came from.
    del config["run"]["val_text_blake2b"]
    # Other validation stories too (fewer of them): that is said as well, not hidden by the tokenizers' note.
    config["run"]["data_documents"]["val"] = 40
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["compare", str(copy), str(straight_run)]) == 0
    out = capsys.readouterr().out
    from tinygemma.report import data_description

    def told(count, run):  # (the training stories as the table's data column names them)
        return f"set aside from the training source (a 0.1 share), {count} stories of {data_description(run)}"

    straight = json.loads((straight_run / "config.json").read_text())["run"]
    assert "tokenizers differ" in out and (f"validated on different stories too ({told(40, straight)}; "
                                           f"{told(66, straight)}): not even their bits per byte compare as they "
                                           "stand") in out
    # The same share and count set aside from another training file: other stories, named by that file
    config["run"]["data_documents"]["val"] = 66
    config["run"]["data_source"]["train"] = ["elsewhere.txt"]
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["compare", str(copy), str(straight_run)]) == 0
    out = capsys.readouterr().out
    assert "`elsewhere.txt`" in told(66, config["run"]) and (
        f"validated on different stories too ({told(66, straight)}; {told(66, config['run'])})") in out
    # A run that records no source (from before 2026-12-02) is not known to differ: not said to, though the other's
    # stories are named and its own are "unknown"
    config["run"]["data_documents"]["val"] = 66
    del config["run"]["data_source"]
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["compare", str(copy), str(straight_run)]) == 0
    out = capsys.readouterr().out
    assert "tokenizers differ" in out and "validated on different stories" not in out


def test_compare_reads_a_run_still_training_from_its_records(straight_run, tmp_path, capsys):
    """A run with steps past its last checkpoint (here none yet): while it trains (its lock held), its row is its
    newest records' step, tokens and training time (log-line records carry elapsed_s), not the checkpoint's (here
    0) beside a newer validation loss; once it has stopped (a crash, a kill), those steps are lost, and the row
    says so beside the checkpoint's step."""
    from tinygemma.files import FolderLock

    live = tmp_path / "live"
    shutil.copytree(straight_run, live)
    shutil.rmtree(live / "checkpoints")  # as if it had written none yet
    with open(live / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe not a record\n")  # a damaged line: skipped

    def row() -> list[str]:
        assert main(["compare", str(live)]) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {live}"))
        return line.strip(" |").split(" | ")

    def row_while_training() -> list[str]:
        lock = FolderLock(live, "a run")
        lock.acquire()
        try:
            return row()
        finally:
            lock.release()

    cells = row_while_training()
    record = next(r for r in test_train.metrics(straight_run) if r["step"] == 40 and "train_loss" in r)
    assert cells[2:4] == ["40", f"{40 * 8 * 32:,}"] and cells[5] == f"{record['tokens'] / record['elapsed_s']:,.0f}"
    assert row()[2:4] == ["0 (40 logged, lost: no checkpoint written)", "0"]
    # Its records end off a log step (13; the last with a training time is step 10's): the rate is step 10's
    # tokens over step 10's time, not step 13's tokens over it.
    lines = (live / "metrics.jsonl").read_bytes().splitlines()[:-1]  # (without the damaged line)
    (live / "metrics.jsonl").write_bytes(b"\n".join(line for line in lines if json.loads(line)["step"] <= 13) + b"\n")
    cells = row_while_training()
    timed = next(r for r in test_train.metrics(straight_run) if r["step"] == 10 and "elapsed_s" in r)
    assert "elapsed_s" not in next(r for r in test_train.metrics(straight_run) if r["step"] == 13)
    assert cells[2:4] == ["13", f"{13 * 8 * 32:,}"] and cells[5] == f"{timed['tokens'] / timed['elapsed_s']:,.0f}"


@pytest.mark.parametrize("args,words", [
    (["{tmp}"], "is not a training run"),
    (["{run}", "{run}"], "is given twice"),
    (["{run}", "--plot", "{tmp}/plot.txt"], "give a .png file"),
    (["{run}", "--plot", "{tmp}/missing/plot.png"], "does not exist"),
    (["{run}", "--plot", "{tmp}/notes.png"], "is not a plot tinygemma wrote"),
    (["{run}", "--plot", "{tmp}/photo.png"], "is not a plot tinygemma wrote"),
    (["{run}", "--plot", "{run}/loss.png"], "a run or a dataset of tinygemma's"),
    (["{run}", "{run}/"], "is given twice"),
    (["{run}", "--plot", "{run}/tb/plot.png"], "a run or a dataset of tinygemma's"),
], ids=["not-a-run", "twice", "not-png", "missing-folder", "other-file", "a-photo", "a-runs-plot",
        "twice-with-a-slash", "inside-a-run"])
def test_compare_refuses_bad_input_in_one_line_and_writes_nothing(straight_run, tmp_path, capsys, args, words):
    from PIL import Image

    (tmp_path / "notes.png").write_text("my notes")
    Image.new("RGB", (4, 4), "red").save(tmp_path / "photo.png")  # a PNG of someone else's
    photo = (tmp_path / "photo.png").read_bytes()
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{run}", str(straight_run)) for a in args]
    plot = (straight_run / "loss.png").read_bytes()
    assert main(["compare", *argv]) == 2
    assert (straight_run / "loss.png").read_bytes() == plot
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert (tmp_path / "notes.png").read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.png", "photo.png"] and (tmp_path / "photo.png").read_bytes() == photo


def test_compare_refuses_a_plot_of_nothing_and_a_config_that_is_not_a_runs(straight_run, tmp_path, capsys):
    young = tmp_path / "young"  # a run whose records hold no validation yet
    young.mkdir()
    (young / "config.json").write_text((straight_run / "config.json").read_text())
    assert main(["compare", str(young), "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "nothing to plot" in err and err.count("\n") == 1 and not (tmp_path / "p.png").exists()
    config = json.loads((straight_run / "config.json").read_text())
    (young / "config.json").write_text(json.dumps({**config, "data": ["a", "list"]}))
    assert main(["compare", str(young)]) == 2
    err = capsys.readouterr().err
    assert "sections are not tables" in err and err.count("\n") == 1
    # Hand-edited records of the data (not tables) read as unknown, not as a traceback.
    for key, value in (("data_source", ["x"]), ("data_documents", 5), ("tokenizer", "gpt2")):
        (young / "config.json").write_text(json.dumps({**config, "run": {**config["run"], key: value}}))
        assert main(["compare", str(young), str(straight_run)]) == 0
        capsys.readouterr()


def test_compare_names_the_data_folder_of_runs_recorded_before_their_data_was(straight_run, tmp_path, capsys):
    """config.json's run section has recorded the data's stories and tokenizer since 2026-12-02; runs from before
    differ by their data folders' names, as they did."""
    config = json.loads((straight_run / "config.json").read_text())
    older = {k: v for k, v in config["run"].items() if k not in ("data_source", "data_documents", "tokenizer",
                                                                 "data_blake2b")}
    for name, folder in (("a", "data/gpt2"), ("b", "data/bpe")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "run": older,
                                                                 "data": {**config["data"], "dir": folder}}))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "| data=the folder data/gpt2 |" in out and "| data=the folder data/bpe |" in out and "different windows" in out


def test_compare_names_changes_made_on_resume_and_other_validation_data(straight_run, data_dir, tmp_path, capsys):
    """A learning rate changed on resume is named in the run's row (config.json holds the last settings alone,
    so a run at 5e-3 throughout and one changed to it at step 4 showed nothing between them); another validation
    split, or other stories under the same file names (their tokens' digests differ), is a data difference, and
    the note says that no validation loss of theirs compares."""
    changed, steady = tmp_path / "changed", tmp_path / "steady"
    test_train.run(data_dir, changed, "max_steps=8", stop_at=4)
    test_train.run(data_dir, changed, "max_steps=8", "learning_rate=5e-3", resume=True)
    test_train.run(data_dir, steady, "max_steps=8", "learning_rate=5e-3")
    assert main(["compare", str(steady), str(changed)]) == 0
    out = capsys.readouterr().out
    assert f"| {steady} | - | 8 |" in out
    assert f"| {changed} | changed on resume: at step 4, learning_rate 0.01 -> 0.005 | 8 |" in out
    # Other validation stories under the same file names and counts: told apart by the tokens' digests.
    other = tmp_path / "other_val"
    shutil.copytree(steady, other)
    config = json.loads((other / "config.json").read_text())
    assert config["run"]["data_blake2b"] == {split: json.loads((data_dir / "meta.json").read_text())["splits"][split][
        "blake2b"] for split in ("train", "val")}  # recorded as a run starts (a run with no checkpoint has them)
    del config["run"]["data_blake2b"]  # (as runs recorded before 2026-12-05: their checkpoints' states have them)
    (other / "config.json").write_text(json.dumps(config))
    state_file = other / "checkpoints" / "step_000008" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["data"]["val_blake2b"] = "f" * 32
    state_file.write_text(json.dumps(state))

    def compared() -> str:
        assert main(["compare", str(steady), str(other)]) == 0
        return capsys.readouterr().out

    out = compared()
    train_digest = state["data"]["train_blake2b"][:8]
    assert f"; tokens: train {train_digest}, validation ffffffff | 8 |" in out and f"| {other} | data=" in out
    assert "validated on different stories: neither" in out and "different windows" not in out
    # The same tokens from stories named another way (a relative path, a copy of the file): the same data.
    config = json.loads((other / "config.json").read_text())
    config["run"]["data_source"]["train"] = ["stories.txt"]
    (other / "config.json").write_text(json.dumps(config))
    state["data"]["val_blake2b"] = json.loads(
        (steady / "checkpoints" / "step_000008" / "trainer_state.json").read_text())["data"]["val_blake2b"]
    state_file.write_text(json.dumps(state))
    out = compared()
    assert f"| {other} | - | 8 |" in out and "different stories" not in out and "different windows" not in out
    # A run without the digests (trained before they were recorded): compared by its stories' sources and counts,
    # the validation split's among them.
    del state["data"]["val_blake2b"], state["data"]["train_blake2b"]
    state_file.write_text(json.dumps(state))
    config["run"]["data_source"]["train"] = json.loads((steady / "config.json").read_text())["run"]["data_source"][
        "train"]
    config["run"]["data_source"].update(val=["va.txt"], val_fraction=None)
    config["run"]["data_documents"]["val"] = 58
    (other / "config.json").write_text(json.dumps(config))
    out = compared()
    assert "; validation: `va.txt`, 58 stories; tokenizer" in out and "tokens: train" not in out
    assert "validated on different stories" in out  # 58 stories, and 66: other stories, whatever their names
    # (without digests, a difference of names alone is no proof of other stories: the milder note on windows)
    config["run"]["data_documents"]["val"] = 66
    (other / "config.json").write_text(json.dumps(config))
    out = compared()
    assert "different stories" not in out and "scored on different windows" in out
    del config["run"]["data_documents"]  # (recorded before story counts were): an unknown count is no difference
    (other / "config.json").write_text(json.dumps(config))
    out = compared()
    assert "different stories" not in out and "scored on different windows" in out
    # A run with no checkpoint yet (killed before its first) is compared by the digests its config.json records.
    young = tmp_path / "young"
    shutil.copytree(steady, young)
    shutil.rmtree(young / "checkpoints")
    assert main(["compare", str(steady), str(young)]) == 0
    out = capsys.readouterr().out
    assert f"| {young} | - | 0 (8 logged, lost: no checkpoint written) |" in out and "different" not in out


def test_compares_best_is_of_what_the_run_trained_and_kept(straight_run, tmp_path, capsys):
    """The best validation loss is of a step the run trained (step 0 is the weights it started from, under
    train.init_from another run's, which best.json never names), and of a stopped run, one that a checkpoint
    holds: the validations past its last checkpoint are of weights that were lost."""
    branch = tmp_path / "branch"
    shutil.copytree(straight_run, branch)
    records = test_train.metrics(branch)
    for record in records:
        if record.get("step") == 0 and "val_loss" in record:
            record["val_loss"] = 0.5  # as if it started from better weights than it ended with
        if record.get("step") == 10 and "val_loss" in record:
            record["val_loss"] = None  # NaN, as a diverged evaluation is written: no best
    (branch / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    vals = {r["step"]: r["val_loss"] for r in records if r.get("val_loss") is not None}
    best = min((s for s in vals if s > 0), key=vals.get)

    def cells(run) -> list[str]:
        assert main(["compare", str(run)]) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {run}"))
        return line.strip(" |").split(" | ")

    assert cells(branch)[7] == f"{vals[best]:.4f} (step {best})"
    young = tmp_path / "young"  # validated at step 0 alone (stopped before its first evaluation): that is its best
    young.mkdir()
    shutil.copy(straight_run / "config.json", young / "config.json")
    (young / "metrics.jsonl").write_text(json.dumps(next(r for r in records if "val_loss" in r)) + "\n")
    assert cells(young)[6:8] == ["0.5000 (step 0)", "0.5000 (step 0)"]
    # Killed after step 40 with its last checkpoint at step 20: the validations at 30 and 40 are not kept.
    shutil.copytree(branch / "checkpoints" / "step_000040", branch / "checkpoints" / "step_000020")
    state = json.loads((branch / "checkpoints" / "step_000020" / "trainer_state.json").read_text())
    (branch / "checkpoints" / "step_000020" / "trainer_state.json").write_text(json.dumps(
        {**state, "step": 20, "tokens": 20 * 8 * 32}))
    shutil.rmtree(branch / "checkpoints" / "step_000040")
    (branch / "checkpoints" / "last.json").write_text(json.dumps({"dir": "step_000020", "step": 20}))
    row = cells(branch)
    assert row[2] == "20 (40 logged, lost past the checkpoint)" and row[6] == f"{vals[20]:.4f} (step 20)"
    assert row[7] == f"{vals[20]:.4f} (step 20)"  # (step 10's is NaN)


@pytest.mark.parametrize("file, edit", [
    ("eval.json", {"eval": 5}),
    ("eval.json", {"eval": {"loss": "a"}}),
    ("state", {"step": "x"}),
    ("state", {"elapsed_s": "x"}),
    ("state", {"invocations": [1]}),
    ("state", {"data": "x"}),
    ("eval.json", {"eval": {"loss": 3.0}}),
    ("state", {"invocations": [{"steps": [0, 40], "changed": {"learning_rate": 1}}]}),
    ("state", {"invocations": [{"changed": {"learning_rate": [0.01, 0.005]}}]}),
    ("state", {"invocations": [{"steps": ["x"], "changed": {"learning_rate": [0.01, 0.005]}}]}),
    ("eval.json", {"eval": {"loss": None}}),
    ("eval.json", {"eval": {"tokens": 5}}),
    ("eval.json", {"eval": {"loss": 3.0, "tokens": 5, "bits_per_byte": "x"}}),
    ("state", {"invocations": [{"steps": [], "changed": {"learning_rate": [0.01, 0.005]}}]}),
], ids=["eval-not-a-table", "eval-loss-text", "step-text", "elapsed-text", "invocations-of-numbers", "data-text",
        "eval-without-tokens", "a-change-not-a-pair", "a-change-without-steps", "steps-of-text", "eval-null-alone",
        "eval-without-loss", "bits-per-byte-text", "steps-empty"])
def test_compare_names_a_hand_edited_file_in_one_line(straight_run, tmp_path, capsys, file, edit):
    """Valid JSON of the wrong types in a run's eval.json or trainer state was a traceback: one line naming the
    file; a metrics.jsonl line whose figures are not numbers is no record of the trainer's, skipped."""
    run = tmp_path / "edited"
    shutil.copytree(straight_run, run)
    path = run / "eval.json" if file == "eval.json" else run / "checkpoints" / "step_000040" / "trainer_state.json"
    before = json.loads(path.read_text()) if path.exists() else {"checkpoint": "step_000040"}
    path.write_text(json.dumps({**before, **edit}))
    assert main(["compare", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path} is damaged or hand-edited" in err, err


def test_a_records_line_whose_figures_are_not_numbers_is_skipped(straight_run, tmp_path, capsys):
    run = tmp_path / "edited"
    shutil.copytree(straight_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 41, "tokens": 5, "val_loss": "y"}) + "\n")
    assert all(r["step"] <= 40 for r in tinygemma.metrics.read_records(run / "metrics.jsonl"))
    assert main(["compare", str(run), "--plot", str(tmp_path / "p.png")]) == 0


def test_compare_edges_of_plots_inputs_and_windows(straight_run, data_dir, tmp_path, capsys):
    """A young run (no validation yet) beside a finished one is plotted (the finished one's line); --plot takes
    .PNG in any case and says where it wrote on stderr (stdout is the table alone); a directory, a dataset's
    folder and a transformers export are refused in one line; runs that differ in block size alone get the
    windows' note; a run section that is not a table is refused."""
    young = tmp_path / "young"
    young.mkdir()
    (young / "config.json").write_text((straight_run / "config.json").read_text())
    plot = tmp_path / "P.PNG"
    assert main(["compare", str(straight_run), str(young), "--plot", str(plot)]) == 0
    out, err = capsys.readouterr()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and err == f"wrote {plot}\n"
    assert all(line.startswith("|") for line in out.strip().splitlines()), out
    assert main(["compare", str(straight_run), "--plot", str(plot)]) == 0  # over its own earlier plot
    assert capsys.readouterr().err == f"wrote {plot}\n"
    (tmp_path / "folder.png").mkdir()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}))
    for args, words in (([str(straight_run), "--plot", str(tmp_path / "folder.png")], "is a directory; give the .png"),
                        ([str(straight_run), "--plot", str(data_dir / "plot.png")], "a run or a dataset of tinygemma's"),
                        ([str(straight_run), str(hf)], "is not a training run")):
        assert main(["compare", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert not (data_dir / "plot.png").exists()
    config = json.loads((straight_run / "config.json").read_text())
    (young / "config.json").write_text(json.dumps({**config, "train": {**config["train"], "block_size": 16}}))
    assert main(["compare", str(straight_run), str(young)]) == 0
    assert "scored on different windows" in capsys.readouterr().out
    (young / "config.json").write_text(json.dumps({**config, "run": ["x"]}))
    assert main(["compare", str(young)]) == 2
    assert "sections are not tables" in capsys.readouterr().err


def test_a_nan_whole_split_loss_and_odd_digests_are_shown_not_a_traceback(straight_run, tmp_path, capsys):
    """eval.json writes a NaN loss (weights that overflowed) as null: compare and report.md show it as nan; token
    digests that are not text are as good as none."""
    from tinygemma.metrics import strict_json

    run = tmp_path / "nan"
    shutil.copytree(straight_run, run)
    (run / "eval.json").write_text(strict_json({"checkpoint": "step_000040", "split": "val",
                                                "eval": {"loss": float("nan"), "bits_per_byte": None, "tokens": 99}}))
    state_file = run / "checkpoints" / "step_000040" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "data": {**state["data"], "train_blake2b": 5}}))
    assert main(["compare", str(run), str(straight_run)]) == 0
    assert " | nan (step 40) | nan |" in capsys.readouterr().out
    assert "| whole validation split (99 tokens), checkpoint `step_000040` | nan | nan |" in \
        tinygemma.report.render_report(run)


def test_sampling_says_each_prompts_seed():
    from tinygemma.report import sampling

    one = {"temperature": 0.8, "top_k": 50, "seed": 1337, "max_new_tokens": 9, "prompts": ["Once"]}
    assert sampling(one) == "temperature 0.8, top-k 50, seed 1337, at most 9 new tokens"
    assert sampling({**one, "prompts": ["Once", "Tom"]}) == ("temperature 0.8, top-k 50, seed 1337 for the first "
                                                             "prompt, one more for each next, at most 9 new tokens")


def test_compare_takes_the_settings_of_the_weights_it_shows(straight_run, data_dir, tmp_path, capsys):
    """config.json is the newest attempt's: one killed before its first checkpoint (another learning rate) made
    the run look trained at that rate. A stopped run is compared by its checkpoint's recipe; a run training now by
    config.json, what differs from its checkpoint's recipe a change at the checkpoint's step. Branches of one run
    (train.init_from) are told apart by the checkpoint each started from, not the folder named."""
    from tinygemma.files import FolderLock

    attempt = tmp_path / "attempt"
    shutil.copytree(straight_run, attempt)
    config = json.loads((attempt / "config.json").read_text())
    (attempt / "config.json").write_text(json.dumps({**config, "train": {**config["train"], "learning_rate": 1e-3}}))
    assert main(["compare", str(straight_run), str(attempt)]) == 0
    assert f"| {attempt} | - | 40 |" in capsys.readouterr().out
    config = json.loads((attempt / "config.json").read_text())  # (and its trackers, which change no number)
    (attempt / "config.json").write_text(json.dumps({**config, "train": {**config["train"], "loggers": ["wandb"]}}))
    lock = FolderLock(attempt, "a run")
    lock.acquire()
    try:
        assert main(["compare", str(straight_run), str(attempt)]) == 0
    finally:
        lock.release()
    out = capsys.readouterr().out  # the changes training will record at its next checkpoint, no others
    assert (f"| {attempt} | train.learning_rate=0.001, train.loggers=[\"wandb\"]; changed on resume: at step 40, "
            "learning_rate 0.01 -> 0.001 |") in out
    source = tmp_path / "source"
    test_train.run(data_dir, source, "max_steps=4", "checkpoint_interval=2", stop_at=2)
    first = tmp_path / "first"
    test_train.run(data_dir, first, "max_steps=1", "warmup_steps=0", f"init_from={source}")
    test_train.run(data_dir, source, "max_steps=4", "checkpoint_interval=2", resume=True)
    second = tmp_path / "second"
    test_train.run(data_dir, second, "max_steps=1", "warmup_steps=0", f"init_from={source}")
    assert main(["compare", str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert f"| {first} | train.init_from={(source / 'checkpoints' / 'step_000002').resolve()} |" in out
    assert f"| {second} | train.init_from={(source / 'checkpoints' / 'step_000004').resolve()} |" in out


def test_report_md_refuses_an_eval_json_without_its_checkpoint_in_one_line(straight_run, tmp_path):
    run = tmp_path / "edited"
    shutil.copytree(straight_run, run)
    (run / "eval.json").write_text(json.dumps({"eval": {"loss": 3.0, "tokens": 5}}))
    with pytest.raises(tinygemma.UserError, match="eval.json is damaged or hand-edited"):
        tinygemma.report.render_report(run)


def test_export_of_a_run_whose_whole_split_loss_is_nan_writes_its_card(straight_run, tmp_path):
    """eval.json's null loss (a NaN evaluation) stopped the export with a traceback: the card says nan; an
    eval.json damaged by hand is no evaluation of the weights, and no reason to stop an export either."""
    from tinygemma.metrics import strict_json

    pytest.importorskip("transformers")
    run = tmp_path / "nan"
    shutil.copytree(straight_run, run)
    best = json.loads((run / "checkpoints" / "best.json").read_text())["dir"]
    (run / "eval.json").write_text(strict_json({"checkpoint": best, "split": "val",
                                                "eval": {"loss": float("nan"), "bits_per_byte": None, "tokens": 99}}))
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "| nan | nan |" in (tmp_path / "hf" / "README.md").read_text()
    (run / "eval.json").write_text(json.dumps({"checkpoint": best, "eval": 5}))
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "hf2")]) == 0
    assert "whole validation split" not in (tmp_path / "hf2" / "README.md").read_text()


def test_a_fork_that_has_trained_no_step_names_its_source(straight_run, tmp_path):
    """A --resume-from fork stopped before its first checkpoint (or of a finished run): its last.json names the
    checkpoint it continued, which report.md's "continued from" row gives until the fork's own parts record it."""
    from tinygemma.checkpoint import fork_run

    source = straight_run / "checkpoints" / "step_000040"
    fork_run(source, tmp_path / "fork")
    assert (f"| continued from | `{source.resolve()}` (--resume-from): steps 1 to 40 were trained there |"
            in tinygemma.report.render_report(tmp_path / "fork"))


def test_compare_runs_takes_one_run_given_alone(straight_run):
    """compare_runs("runs/a") went through the path's letters ("r is not a training run")."""
    assert f"| {straight_run} | - | 40 |" in tinygemma.report.compare_runs(str(straight_run))
    assert f"| {straight_run} | - | 40 |" in tinygemma.report.compare_runs(Path(straight_run))


# ------------------------------------------------------------------ mutation round 13: report.md's parts

def mutation_recipe(**train):
    return {"model": {"preset": "gemma3-tiny"}, "data": {}, "train": {"max_steps": 12, "warmup_steps": 2, "min_lr": 0.0001, "learning_rate": 0.002, **train},
            "generate": {}}


def test_reproduce_block_starts_from_the_settings_before_the_first_of_several_changes():
    """Two resumes that changed the learning rate (0.02 -> 0.005 at step 4, 0.005 -> 0.002 at step 8): the first
    command trains at 0.02, the rate of the steps before the first change, not the second change's 0.005."""
    state = {"step": 12, "invocations": [
        {"steps": [0, 4]},
        {"steps": [4, 8], "changed": {"learning_rate": [0.02, 0.005]}},
        {"steps": [8, 12], "changed": {"learning_rate": [0.005, 0.002]}}]}
    lines = tinygemma.report.reproduce_block(mutation_recipe(), state, "Reproduce")
    commands = [line for line in lines if line.startswith("tinygemma train")]
    assert len(commands) == 3
    assert "--set train.learning_rate=0.02 " in commands[0] and commands[0].endswith("--stop-at 4")
    assert "train.learning_rate=0.005 --stop-at 8" in commands[1]
    assert commands[2].endswith("--set train.learning_rate=0.002")


def test_reproduce_block_in_parts_of_a_checkpoint_before_the_schedules_end_stops_at_its_step():
    """A run changed on resume and checkpointed at step 10 of 12: its last command stops at 10 (--stop-at keeps
    the schedule), as the single command of an unchanged run does."""
    state = {"step": 10, "invocations": [
        {"steps": [0, 4]}, {"steps": [4, 10], "changed": {"learning_rate": [0.02, 0.002]}}]}
    commands = [line for line in tinygemma.report.reproduce_block(mutation_recipe(), state, "Reproduce")
                if line.startswith("tinygemma train")]
    assert commands[-1].endswith("--stop-at 10"), commands


def test_reproduce_command_names_a_vocab_size_that_equals_the_presets():
    """A recipe that set model.vocab_size (to the preset's own 262,144, say, on GPT-2 data) is reproduced with it:
    without it train sizes the vocabulary from the data's tokenizer, another model."""
    recipe = mutation_recipe()
    recipe["model"] = {"preset": "gemma3-270m", "vocab_size": 262_144}
    assert "--set model.vocab_size=262144" in tinygemma.report.reproduce_command(recipe)


def test_a_fork_of_a_step_0_checkpoint_is_named():
    """--resume-from a run's step-0 checkpoint: the "continued from" row names it (no step was trained there)."""
    state = {"step": 5, "invocations": [{"steps": [0, 5], "forked_from": {"dir": "/runs/a/checkpoints/step_000000",
                                                                         "step": 0}}]}
    rows = tinygemma.report.start_rows({"train": {}}, None, state)
    assert rows == [("continued from", "`/runs/a/checkpoints/step_000000` (--resume-from): no step was trained there")]


def test_the_mfu_of_steps_from_before_invocations_is_at_the_last_machines_peak():
    """A run checkpointed before invocations were recorded, whose log lines moved to another machine (another
    peak): its MFU is the average rate at the last record's ratio of MFU to rate, not the first's."""
    records = [{"step": 10, "mfu": 0.2, "tokens_per_s": 1000.0}, {"step": 20, "mfu": 0.1, "tokens_per_s": 1000.0}]
    rows = dict(tinygemma.report.training_rows({}, records, {"step": 20, "tokens": 20_000, "elapsed_s": 10.0}))
    assert rows["MFU"].startswith("20.0% (at the average throughput")  # 0.1 / 1000 x 2000 tokens/s


def test_the_validation_tables_best_row_is_best_jsons_checkpoint():
    """last.json at step 20 (a loss spike), best.json at step 10: the best row is step 10's loss, not the last's."""
    records = [{"step": 10, "val_loss": 2.0, "val_bpb": 1.0}, {"step": 20, "val_loss": 3.0, "val_bpb": 1.5}]
    lines = tinygemma.report.validation_table(records, {"dir": "step_000020", "step": 20},
                                              {"dir": "step_000010", "step": 10}, {})
    assert "| final: step 20 | 3.0000 | 1.5000 |" in lines and "| best: step 10 | 2.0000 | 1.0000 |" in lines


def test_val_cells_of_a_nan_loss_without_bits_per_byte():
    assert tinygemma.report.val_cells(float("nan"), None) == ("nan", "nan")


def test_the_reports_samples_are_the_newest_sampled_while_training(tmp_path):
    """Samples taken at steps 5 and 10 (train.sample_interval), no eval.json: the report quotes step 10's."""
    (tmp_path / "config.json").write_text(json.dumps({**mutation_recipe(), "run": {}}))
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, text in ((5, "Once upon a old"), (10, "Once upon a new")):
            f.write(json.dumps({"step": step, "tokens": step * 64, "samples": [text]}) + "\n")
    report = tinygemma.report.render_report(tmp_path)
    assert "While training, at step 10 (train.sample_interval)" in report
    assert "> Once upon a new" in report and "Once upon a old" not in report


def test_sampling_names_a_repetition_penalty():
    words = tinygemma.report.sampling({"temperature": 0.8, "repetition_penalty": 1.3, "seed": 7, "max_new_tokens": 5})
    assert words == "temperature 0.8, repetition penalty 1.3, seed 7, at most 5 new tokens"


def test_sampling_names_the_stop_texts():
    words = tinygemma.report.sampling({"temperature": 0.8, "seed": 7, "max_new_tokens": 5, "stop": ["\n", "The end"]})
    assert words == "temperature 0.8, seed 7, at most 5 new tokens, ending before '\\n' or 'The end'"
    assert "ending" not in tinygemma.report.sampling({"temperature": 0.8, "seed": 7, "max_new_tokens": 5, "stop": []})


def test_the_recipe_names_the_checkpoint_init_from_resolved_to():
    state = {"config": mutation_recipe(init_from="runs/a")}
    config = {"run": {"init_checkpoint": {"dir": "/abs/runs/a/checkpoints/step_000040", "step": 40}}}
    assert tinygemma.report.recorded_recipe(state, config)["train"]["init_from"] == "/abs/runs/a/checkpoints/step_000040"


def test_the_precision_row_counts_the_processes_of_a_part_recorded_before_its_world_size():
    state = {"invocations": [{"steps": [0, 10], "hardware": "2 x NVIDIA H100", "precision": "bfloat16"}]}
    rows = dict(tinygemma.report.machine_rows({}, state))
    assert rows["precision"] == "bfloat16 on 2 process(es)"


def test_a_repository_not_asked_private_gets_the_hubs_default_visibility(tmp_path, monkeypatch):
    """Without --private, create_repo is given no `private` at all, so an organisation whose repositories are
    private by default keeps them so."""
    import tinygemma.hf as hf_module

    calls = []

    class Api:
        def create_repo(self, repo_id, **kwargs):
            calls.append(kwargs)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            pass

    monkeypatch.setattr(hf_module, "hub_api", lambda: Api)
    hf_module.push_to_hub(tmp_path, "me/model")
    hf_module.push_to_hub(tmp_path, "me/model", private=True)
    assert "private" not in calls[0] and calls[1]["private"] is True


def test_a_fork_of_a_fork_names_the_steps_each_run_trained():
    """C forked from B's step 8, B from A's step 4 (C's state, as train records it): A trained steps 1 to 4, B
    steps 5 to 8; without `start = fork["step"]` B was said to have trained steps 1 to 8."""
    state = {"step": 12, "invocations": [
        {"steps": [0, 4]},
        {"steps": [4, 8], "forked_from": {"dir": "/runs/a/checkpoints/step_000004", "step": 4}},
        {"steps": [8, 12], "forked_from": {"dir": "/runs/b/checkpoints/step_000008", "step": 8}}]}
    assert tinygemma.report.start_rows({"train": {}}, None, state) == [
        ("continued from", "`/runs/a/checkpoints/step_000004` (--resume-from): steps 1 to 4 were trained there"),
        ("continued from", "`/runs/b/checkpoints/step_000008` (--resume-from): steps 5 to 8 were trained there")]


def test_the_card_of_weights_trained_on_from_others_says_license_other():
    """train.init_from (google/gemma-3-270m's weights, say): the card's header says `license: other`, as its
    summary asks the user to set those weights' license; tinygemma's own Apache-2.0 is for weights trained from
    scratch."""
    pytest.importorskip("huggingface_hub")
    scratch = {"meta": {"step": 40}, "run": {}, "recipe": mutation_recipe()}
    initialised = {**scratch, "recipe": mutation_recipe(init_from="/runs/a/checkpoints/step_000040")}
    assert "license: apache-2.0" in tinygemma.report.card_header(scratch)
    assert "license: other" in tinygemma.report.card_header(initialised)
    assert "The license field says `other`: set it to those weights' license" in tinygemma.report.card_summary(
        initialised, tinygemma.ModelConfig.preset("gemma3-tiny", vocab_size=512))
    assert "The license field is tinygemma's own (Apache-2.0)" in tinygemma.report.card_summary(
        scratch, tinygemma.ModelConfig.preset("gemma3-tiny", vocab_size=512))


def test_the_card_leaves_out_the_whole_split_evaluation_of_another_checkpoint(straight_run, tmp_path):
    """eval.json scored step 20 (an earlier best); the card of step 40 must not give step 20's loss as its own."""
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    (run / "eval.json").write_text(json.dumps({"checkpoint": "step_000020",
                                               "eval": {"loss": 4.25, "bits_per_byte": 1.5, "tokens": 999}}))
    assert tinygemma.report.export_records(run / "checkpoints" / "step_000040")["evaluation"] is None
    (run / "eval.json").write_text(json.dumps({"checkpoint": "step_000040",
                                               "eval": {"loss": 4.25, "bits_per_byte": 1.5, "tokens": 999}}))
    assert tinygemma.report.export_records(run / "checkpoints" / "step_000040")["evaluation"]["loss"] == 4.25


@pytest.mark.parametrize("where, given", [("run/checkpoints", "step_000040"), ("run/checkpoints/step_000040", "."),
                                          ("run/checkpoints/step_000040", "../step_000040")])
def test_a_checkpoint_named_from_within_its_run_keeps_its_runs_records(straight_run, tmp_path, monkeypatch, where,
                                                                       given):
    """`export --ckpt step_000040` from inside checkpoints/ (or `--ckpt .` from the step's folder) reads the
    run's config.json, metrics.jsonl and eval.json as the same checkpoint named from outside does."""
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    (run / "eval.json").write_text(json.dumps({"checkpoint": "step_000040",
                                               "eval": {"loss": 4.25, "bits_per_byte": 1.5, "tokens": 999}}))
    outside = tinygemma.report.export_records(run / "checkpoints" / "step_000040")
    monkeypatch.chdir(tmp_path / where)
    inside = tinygemma.report.export_records(given)
    assert inside["evaluation"] == outside["evaluation"] == {"loss": 4.25, "bits_per_byte": 1.5, "tokens": 999}
    assert inside["run"] == outside["run"] and inside["run"]
    assert inside["during_training"] == outside["during_training"] and inside["during_training"]


def test_a_sample_given_exactly_the_room_left_is_not_said_to_be_shortened(straight_run, tmp_path):
    """generate.max_new_tokens equal to the room the positions leave: the sample is as long as asked, and the card
    must not add "(at most N new tokens: ...)"; one more token asked, and it does."""
    pytest.importorskip("transformers")
    from tinygemma.checkpoint import checkpoint_tokenizer, save_model
    from tinygemma.config import GenerateConfig, ModelConfig

    tokenizer = checkpoint_tokenizer(straight_run)
    model = tinygemma.Gemma3(ModelConfig.preset("gemma3-tiny", vocab_size=512, max_position_embeddings=48))
    save_model(model, tmp_path / "api", {"tokenizer": tokenizer.save(tmp_path / "api")})
    assert main(["export", "--ckpt", str(tmp_path / "api"), "--out", str(tmp_path / "hf")]) == 0
    room = 48 - len(tokenizer.encode("Tom")) + 1
    exported = tinygemma.report.exported_tokenizer(tmp_path / "hf")
    for asked, told in ((room, False), (room + 1, True)):
        lines = tinygemma.report.samples_section(tmp_path / "hf", GenerateConfig(prompts=["Tom"], max_new_tokens=asked),
                                                 exported)
        assert any(line.startswith(f"(at most {room} new tokens") for line in lines) is told, (asked, lines)


def test_the_initial_weights_row_names_the_step_init_from_resolved_to():
    """report.md's and the card's "initial weights" row says which checkpoint (step) train.init_from resolved to."""
    start = {"dir": "/runs/a/checkpoints/step_000040", "step": 40}
    rows = tinygemma.report.start_rows({"train": {"init_from": start["dir"]}}, start, {})
    assert rows == [("initial weights", "`/runs/a/checkpoints/step_000040` (train.init_from, step 40), trained on "
                                        "from there")]


def test_the_cards_batch_row_is_the_global_batch():
    """batch_size 4 x grad_accum_steps 8: the card's batch row says 32 sequences a step, not 4."""
    known = {"recipe": mutation_recipe(batch_size=4, grad_accum_steps=8, block_size=32), "run": {},
             "state": {"step": 12, "tokens": 12 * 32 * 32}}
    assert "| batch | 32 sequences of 32 tokens per step |" in tinygemma.report.training_section(known)


def test_sampling_names_a_repetition_penalty_below_one():
    """A penalty in (0, 1) (train accepts any positive one: it favours repeats) is a setting of the samples too."""
    words = tinygemma.report.sampling({"temperature": 0.8, "repetition_penalty": 0.8, "seed": 7, "max_new_tokens": 5})
    assert words == "temperature 0.8, repetition penalty 0.8, seed 7, at most 5 new tokens"


def test_data_prepared_without_a_recorded_source_is_named_by_its_tokenizer_not_its_folder():
    """A run that recorded its tokenizer but whose data's meta.json has no source (prepared by an older version):
    compare names its data by the tokenizer, not by the folder as typed."""
    config = {"run": {"tokenizer": {"kind": "gpt2"}}, "data": {"dir": "d"}}
    assert tinygemma.report.data_identity(config) == "unknown; validation: unknown; tokenizer gpt2"


def test_a_checkpoint_copied_out_of_its_run_names_the_checkpoint_init_from_resolved_to():
    """The trainer state records the checkpoint train.init_from resolved to; a checkpoint copied out of its run (no
    config.json beside it) must still name it, with its step, not the folder the recipe named."""
    start = {"dir": "/abs/runs/a/checkpoints/step_000040", "step": 40}
    state = {"config": mutation_recipe(init_from="runs/a"), "init_checkpoint": start}
    assert tinygemma.report.initial_checkpoint(state, {}) == start
    assert tinygemma.report.recorded_recipe(state, {})["train"]["init_from"] == start["dir"]


def test_the_reproduce_command_of_a_recipe_from_before_optimizer_and_schedule_fields_names_adamw_and_cosine():
    """A checkpoint recorded before train.optimizer and train.lr_schedule existed trained with AdamW and cosine;
    today's defaults are muon and wsd, so its Reproduce command must name them."""
    command = tinygemma.report.reproduce_command(mutation_recipe())  # (no optimizer, no lr_schedule recorded)
    assert "--set train.optimizer=adamw" in command and "--set train.lr_schedule=cosine" in command


def test_the_cards_training_table_gives_the_training_time():
    """The card's training table gives the training time."""
    known = {"recipe": mutation_recipe(), "run": {}, "state": {"step": 12, "tokens": 3072, "elapsed_s": 65.0}}
    assert "| training time | 1m05s of optimizer steps |" in tinygemma.report.training_section(known)


def test_the_card_of_a_best_checkpoint_copied_out_of_its_run_gives_the_loss_its_state_records(straight_run, tmp_path):
    """A checkpoint copied out of its run has no metrics.jsonl beside it, but its trainer state records its own
    validation loss where it was the run's best: the card gives that, not "no evaluation was recorded"."""
    last = json.loads((straight_run / "checkpoints" / "last.json").read_text())["dir"]
    state = json.loads((straight_run / "checkpoints" / last / "trainer_state.json").read_text())
    assert state["best_step"] == state["step"]  # the straight run's last checkpoint is its best
    shutil.copytree(straight_run / "checkpoints" / last, tmp_path / "alone")
    during = tinygemma.report.export_records(tmp_path / "alone")["during_training"]
    assert during == {"step": state["step"], "val_loss": state["best_val_loss"]}
    state["best_step"] = state["step"] - 20  # an earlier best: its loss is not this checkpoint's
    (tmp_path / "alone" / "trainer_state.json").write_text(json.dumps(state))
    assert tinygemma.report.export_records(tmp_path / "alone")["during_training"] is None


def test_the_cards_title_is_the_hub_repository_it_is_pushed_to(straight_run, tmp_path, monkeypatch, capsys,
                                                               hub_login):
    """The card's title names what the model is loaded by: the repository of --push-to-hub (the hub page's own
    heading), else the exported folder (never the staging folder it was written in)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kwargs: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kwargs: None)
    assert main(["export", "--ckpt", str(straight_run), "--out", str(tmp_path / "hf")]) == 0
    assert "\n# hf\n" in card(tmp_path / "hf").text
    assert main(["export", "--ckpt", str(straight_run), "--out", str(tmp_path / "hub"), "--push-to-hub",
                 "someone/tiny"]) == 0
    text = card(tmp_path / "hub").text
    assert "\n# someone/tiny\n" in text and "# hub" not in text


def test_the_cards_transformers_snippet_keeps_the_recipes_repetition_penalty():
    # report.py:651 dropping the repetition_penalty option: the card's snippet sampled without the penalty the
    # recipe (and the card's own samples) used
    from tinygemma.config import GenerateConfig
    from tinygemma.report import usage_section

    text = "\n".join(usage_section("user/model", GenerateConfig(temperature=0.8, top_k=50, repetition_penalty=1.3)))
    assert "do_sample=True, temperature=0.8, top_k=50, repetition_penalty=1.3)" in text
    greedy = "\n".join(usage_section("user/model", GenerateConfig(temperature=0.0, repetition_penalty=1.3)))
    assert "do_sample=False, repetition_penalty=1.3)" in greedy


def test_compare_of_a_run_training_now_keeps_its_checkpoints_time_when_no_later_record_holds_one(
        straight_run, tmp_path, capsys):
    """A run training now whose checkpoint (step 40) is off a log step and whose records past it hold no
    training time (flushed by an evaluation before the next log line): its time and rate are the checkpoint's,
    not those of the last log line at or before the checkpoint (step 10 here: 2,560 tokens in half the
    time, a rate half the true one), which is older than the weights."""
    live = tmp_path / "live"
    shutil.copytree(straight_run, live)
    records = [json.loads(line) for line in (live / "metrics.jsonl").read_text().splitlines()]
    state = json.loads((live / "checkpoints" / "step_000040" / "trainer_state.json").read_text())
    for r in records:  # only step 10 was a log step (at half the checkpoint's time: slow first steps)
        if r["step"] > 10:
            r.pop("elapsed_s", None), r.pop("tokens_per_s", None)
        elif "elapsed_s" in r:
            r["elapsed_s"] = state["elapsed_s"] / 2
    step40 = next(r for r in records if r["step"] == 40 and "train_loss" in r)
    records += [{**step40, "step": s, "tokens": s * 8 * 32} for s in (41, 42, 43)]  # past the checkpoint, untimed
    (live / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    lock = FolderLock(live, "a run")
    lock.acquire()
    try:
        assert main(["compare", str(live)]) == 0
    finally:
        lock.release()
    cells = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {live}")).strip(
        " |").split(" | ")
    assert cells[2:4] == ["43", f"{43 * 8 * 32:,}"]
    assert cells[4] == format_duration(state["elapsed_s"])
    assert cells[5] == f"{state['tokens'] / state['elapsed_s']:,.0f}"


def test_validation_description_names_only_a_whole_number_of_stories():
    """meta.json's validation story count, recorded in config.json: 0 is said; a count that is no integer (a
    hand-edited "66") is left out rather than crashing compare with a ValueError from the thousands format."""
    source = {"data_source": {"val": ["valid.txt"]}}
    assert validation_description({**source, "data_documents": {"val": 0}}) == "`valid.txt`, 0 stories"
    assert validation_description({**source, "data_documents": {"val": "66"}}) == "`valid.txt`"
    assert validation_description({**source, "data_documents": {"val": 6600}}) == "`valid.txt`, 6,600 stories"
