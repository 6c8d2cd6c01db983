"""RUN/report.md and the model card of an export: thin renderings of the records a run already keeps.

Nothing here computes a result of its own. The report reads config.json (the resolved recipe, and the machine it
ran on, recorded by train when it starts), metrics.jsonl, the checkpoint pointers and the last trainer state, and
eval.json (the whole-split evaluation and the samples of `tinygemma run`). The model card reads the same records
through the checkpoint it exports, and says "unknown" wherever an export has none (a transformers directory, a
checkpoint copied out of its run); its samples are generated from the exported files themselves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import shlex
import subprocess
from pathlib import Path

import torch

import tinygemma
from tinygemma.checkpoint import (
    STATE_NAME,
    checkpoint_pointer,
    checkpoint_step,
    checkpoint_tokenizer,
    fork_source,
    load_model,
    read_checkpoint_meta,
    resolve_checkpoint,
    state_kinds_wrong,
)
from tinygemma.config import (
    CHANGE_SETTINGS,
    DataConfig,
    GenerateConfig,
    ModelConfig,
    Recipe,
    TrainConfig,
    is_integer,
    is_real,
    saved_train_settings,
    settings_changes,
)
from tinygemma.data import HUB_DATASET, META_NAME
from tinygemma.devices import device_description, pick_device
from tinygemma.errors import UserError
from tinygemma.files import (
    atomic_write_text,
    check_output_path,
    check_unlocked,
    is_training_run,
    peek_json,
    read_json,
)
from tinygemma.generate import generate_text, prompt_ids
from tinygemma.hf import NEEDS_LAYER_TYPES, exported_block_size, model_config_from_hf
from tinygemma.metrics import format_duration, is_own_plot, plot_validation, read_records
from tinygemma.tokenizer import TOKENIZER_FILE, GPT2Tokenizer, Tokenizer

REPORT_NAME = "report.md"
EVAL_NAME = "eval.json"  # written by `tinygemma run`: the best checkpoint on the whole validation split, samples
CARD_NAME = "README.md"
UNKNOWN = "unknown"

# ------------------------------------------------------------------ the machine, recorded when training starts


def environment(device: torch.device, world_size: int) -> dict:
    """Hardware, software versions and source commit, for config.json's "run" section."""
    software = {"python": platform.python_version(), "torch": torch.__version__, "tinygemma": tinygemma.__version__}
    if device.type == "cuda":
        software["cuda"] = torch.version.cuda
    return {"hardware": hardware(device, world_size), "software": software, "commit": source_commit()}


def hardware(device: torch.device, world_size: int) -> str:
    return f"{world_size} x {device_description(device)}"


def source_commit() -> str | None:
    """The git commit of the tinygemma source that runs (" (modified)" if it has uncommitted changes), or None
    when it is not a git checkout of tinygemma (an installed wheel, or git missing)."""
    package = Path(tinygemma.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top / "src" / "tinygemma" != package:  # a git repository around an installed copy is not ours
            return None
        commit = git("rev-parse", "HEAD")
        return commit + (" (modified)" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------ the recipe, and the command that reproduces it


def recorded_recipe(state: dict, config: dict) -> dict:
    """The recipe a checkpoint was trained with (its state's; else config.json's). A checkpoint written before
    runs on given data (`train --data DIR`) recorded data.dir alone (its state has no `config_data`) kept the
    recipe's unused [data] fields: where config.json's data is data.dir alone, so is the recipe's, and its
    Reproduce command names no other data. A newer state says it itself (config.json may be a later attempt's)."""
    recipe = state.get("config") or {k: v for k, v in config.items() if k != "run"}
    data = config.get("data")
    if ("config_data" not in state and isinstance(data, dict) and set(data) == {"dir"}
            and isinstance(recipe.get("data"), dict)):
        recipe = {**recipe, "data": {"dir": recipe["data"].get("dir", data["dir"])}}
    start = initial_checkpoint(state, config)
    if start and isinstance(recipe.get("train"), dict) and recipe["train"].get("init_from"):
        # the checkpoint it started from, not the run folder named (whose best may since have moved on)
        recipe = {**recipe, "train": {**recipe["train"], "init_from": start["dir"]}}
    return recipe


def initial_checkpoint(state: dict, config: dict) -> dict | None:
    """{"dir", "step"} of the checkpoint train.init_from resolved to as the run started, if it had one."""
    return state.get("init_checkpoint") or (config.get("run") or {}).get("init_checkpoint")


def reproduce_command(recipe: dict) -> str:
    """`tinygemma train --set ...` with every setting of `recipe` (Recipe.to_dict()) that differs from the
    built-in defaults, in the form --set reads back: the same recipe, whatever file it first came from."""
    recipe = {**recipe, "train": saved_train_settings(recipe.get("train") or {})}  # as the run was trained
    recipe = Recipe.from_dict(recipe, source="the run's recipe")
    sets = [f"model.preset={recipe.model_preset}"]
    preset = ModelConfig.preset(recipe.model_preset).to_dict()
    sets += [f"model.{k}={as_text(v)}" for k, v in recipe.model_overrides.items()
             if k == "vocab_size" or as_text(v) != as_text(preset.get(k))]
    for section, default in (("data", DataConfig()), ("train", TrainConfig()), ("generate", GenerateConfig())):
        value = getattr(recipe, section)
        sets += [f"{section}.{f.name}={as_text(getattr(value, f.name))}" for f in dataclasses.fields(value)
                 if getattr(value, f.name) != getattr(default, f.name)]
    if recipe.out != Recipe().out:
        sets.append(f"train.out={recipe.out}")
    return " ".join(["tinygemma train", *(f"--set {shlex.quote(s)}" for s in sets)])


def reproduce_block(recipe: dict, state: dict, intro: str) -> list[str]:
    """`intro`, then the command that reproduces the run; where a resume changed settings (a lower learning rate
    after a spike), one command for each part, each --stop-at where the next changed them."""
    changes = resume_changes(state)
    # A checkpoint before the schedule's end (a run stopped midway, an earlier best): trained to it, not past it
    # (--stop-at keeps the schedule).
    stop = f" --stop-at {state['step']}" if stopped_early(recipe, state) else ""
    if not changes:
        return [f"{intro}:", "", "```bash", reproduce_command(recipe) + stop, "```", ""]
    first = {**recipe, "train": dict(recipe.get("train") or {})}
    for _, changed in reversed(changes):  # the settings before the first change
        first["train"].update({name: was for name, (was, _) in changed.items()})
    out = shlex.quote(str(first["train"].get("out", Recipe.out)))
    commands = [f"{reproduce_command(first)} --stop-at {changes[0][0]}"]
    for k, (_, changed) in enumerate(changes):
        sets = " ".join(f"--set {shlex.quote(f'train.{name}={as_text(now)}')}" for name, (_, now) in changed.items())
        until = f" --stop-at {changes[k + 1][0]}" if k + 1 < len(changes) else stop
        commands.append(f"tinygemma train --out {out} --resume {sets}{until}")
    return [f"{intro}, in parts, as it was trained: its settings changed on resume ({changes_told(changes)}):", "",
            "```bash", *commands, "```", ""]


# The settings the card's optimizer row states (a change of the others, an interval say, is no change of it)
OPTIMIZER_SETTINGS = ("optimizer", "learning_rate", "min_lr", "muon_learning_rate", "lr_schedule", "warmup_steps",
                      "cooldown_fraction")


def optimizer_changes(state: dict) -> str:
    """What the optimizer row adds where a resume changed what it states: that it gives the last settings."""
    changes = [(step, {name: c for name, c in changed.items() if name in OPTIMIZER_SETTINGS})
               for step, changed in resume_changes(state)]
    changes = [(step, changed) for step, changed in changes if changed]
    return f" (the last settings; they changed on resume: {changes_told(changes)})" if changes else ""


def resume_changes(state: dict) -> list[tuple[int, dict]]:
    """(first step, {setting: (was, now)}) of each invocation that changed settings on resume."""
    return [(p["steps"][0], p["changed"]) for p in state.get("invocations") or [] if p.get("changed")]


def changes_told(changes: list[tuple[int, dict]]) -> str:
    return "; ".join(f"at step {step:,}, " + ", ".join(f"{name} {as_text(was)} -> {as_text(now)}"
                                                      for name, (was, now) in changed.items())
                     for step, changed in changes)


def stopped_early(recipe: dict, state: dict) -> bool:
    """Whether the checkpoint is from before the end of its schedule (train.max_steps)."""
    max_steps = (recipe.get("train") or {}).get("max_steps")
    return isinstance(state.get("step"), int) and isinstance(max_steps, int) and state["step"] < max_steps


def as_text(value) -> str:
    """A setting's value as --set reads it: none, true/false, a TOML array, or the number or string itself."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), ensure_ascii=False)  # a TOML array (which has no surrogate-pair escapes)
    return str(value)


# ------------------------------------------------------------------ report.md


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.md (atomically) from the run's records; return its path."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_NAME
    atomic_write_text(path, render_report(run_dir))
    return path


def render_report(run_dir: Path) -> str:
    config = read_json(run_dir / "config.json", "run config")
    run = config.get("run", {})
    records = read_records(run_dir / "metrics.jsonl")
    last, best = checkpoint_pointer(run_dir), checkpoint_pointer(run_dir, "best")
    state = read_json(run_dir / "checkpoints" / last["dir"] / STATE_NAME, "trainer state") if last else {}
    evaluation = read_evaluation(run_dir)
    recipe = recorded_recipe(state, config)
    steps = state.get("step", 0)
    lines = [f"# tinygemma run `{run_dir.name}`", "",
             f"Step {steps:,} of {config['train']['max_steps']:,}"
             + (f", checkpoint `checkpoints/{last['dir']}`" if last else ", no checkpoint yet") + ".", ""]
    lines += ["## Recipe", "", *reproduce_block(recipe, state, "Reproduce it (on the data prepared in `data.dir`, "
                                                 "with `train.out` set to a new folder: the one named holds this run; "
                                                 "the number of processes changes losses only by float rounding)"),
              *details("The resolved recipe (config.json)", "json", json.dumps(config, indent=2))]
    lines += ["## Machine", "", *table(machine_rows(run, state))]
    lines += ["## Training", "", *table([*start_rows(recipe, initial_checkpoint(state, config), state, last),
                                          *training_rows(run, records, state)])]
    lines += ["## Validation", "", *validation_table(records, last, best, evaluation)]
    if (run_dir / "loss.png").exists():
        lines += ["![train and validation loss against tokens](loss.png)", ""]
    if evaluation.get("samples"):
        lines += ["## Samples", "", f"From checkpoint `{evaluation.get('checkpoint')}`, "
                  f"{sampling(evaluation.get('generate', {}))}.", ""]
        for sample in evaluation["samples"]:
            lines += [quote(sample), ""]
    elif sampled := [r for r in records if r.get("samples")]:  # train.sample_interval's, the newest
        lines += ["## Samples", "", f"While training, at step {sampled[-1]['step']:,} (train.sample_interval), "
                  f"{sampling(recipe.get('generate') or {})}.", ""]
        for sample in sampled[-1]["samples"]:
            lines += [quote(sample), ""]
    return "\n".join(lines)


def machine_rows(run: dict, state: dict) -> list[tuple[str, str]]:
    """The machines, precision, software and commit that trained the checkpoint's steps, from the parts its
    trainer state records (one per invocation): config.json's `run` is the newest invocation's, which may have
    trained none of them (a best checkpoint from before a resume, an attempt that failed). Where no part records
    a figure (a checkpoint from before they did), config.json's."""
    parts = state.get("invocations") or []

    def per_part(name: str, value) -> tuple[str, str]:
        """One row: the parts' common value, or each part's."""
        values = [value(p) or UNKNOWN for p in parts]
        if len(set(values)) == 1:
            return name, values[0]
        return name, "; ".join(f"steps {p['steps'][0] + 1:,} to {p['steps'][1]:,}: {v}" for p, v in zip(parts, values))

    def versions(software: dict | None) -> str | None:
        return ", ".join(f"{k} {v}" for k, v in software.items()) if software else None

    def precision(dtype, world_size) -> str:
        return f"{dtype or UNKNOWN} on {world_size or '?'} process(es)"

    def processes(part: dict):  # (a part recorded before its world_size: the count its hardware starts with)
        count = re.match(r"(\d+) x ", part.get("hardware") or "")
        return part.get("world_size") or (count and count[1])

    if any(p.get("hardware") for p in parts):
        if len({(p.get("hardware"), p.get("precision")) for p in parts}) > 1:  # a run moved between machines
            machines = [per_part("hardware and precision",
                                 lambda p: f"{p.get('hardware') or UNKNOWN}, {p.get('precision') or UNKNOWN}")]
        else:
            machines = [per_part("hardware", lambda p: p.get("hardware")),
                        per_part("precision", lambda p: precision(p.get("precision"), processes(p)))]
    else:
        machines = [("hardware", run.get("hardware") or UNKNOWN),
                    ("precision", precision(run.get("dtype"), run.get("world_size")))]
    if any(p.get("muon_backend") for p in parts):  # (its rounding: auto chooses it by machine)
        machines.append(per_part("Muon iteration", lambda p: p.get("muon_backend")))
    if any("commit" in p for p in parts):  # recorded per part (the earlier ones may not have been)
        return [*machines, per_part("software", lambda p: versions(p.get("software"))),
                per_part("commit", lambda p: p.get("commit"))]
    return [*machines, ("software", versions(run.get("software")) or UNKNOWN), ("commit", run.get("commit") or UNKNOWN)]


def start_rows(recipe: dict, start: dict | None, state: dict, last: dict | None = None) -> list[tuple[str, str]]:
    """Where a run's weights started (recorded_recipe's init_from, the checkpoint `start`), if not from a random
    initialisation, and the checkpoints of other runs --resume-from continued (the trainer state's parts; a fork
    that has written no checkpoint of its own yet: its last.json, `last`)."""
    rows = []
    source = (recipe.get("train") or {}).get("init_from")
    if source:
        step = f", step {start['step']:,}" if start and isinstance(start.get("step"), int) else ""
        rows.append(("initial weights", f"`{source}` (train.init_from{step}), trained on from there"))
    start = 0
    parts = [part for part in state.get("invocations") or [] if isinstance(part, dict)]
    for fork in [*(fork_source(part) for part in parts), fork_source(last)]:
        if fork is not None and fork["step"] >= start:
            trained = f"steps {start + 1:,} to {fork['step']:,} were" if fork["step"] > start else "no step was"
            rows.append(("continued from", f"`{fork['dir']}` (--resume-from): {trained} trained there"))
            start = fork["step"]
    return rows


def training_rows(run: dict, records: list[dict], state: dict) -> list[tuple[str, str]]:
    """Parameters, tokens, time, throughput and MFU from the run's records."""
    tokens, seconds = state.get("tokens", 0), state.get("elapsed_s", 0.0)
    rate = tokens / seconds if seconds else None
    rows = [("data", data_description(run)),
            ("parameters", f"{run['parameters']:,}" if "parameters" in run else UNKNOWN),
            ("tokens", f"{tokens:,} ({state.get('step', 0):,} steps x {run.get('tokens_per_step', 0):,})"),
            ("training time", f"{format_duration(seconds)} ({seconds:,.1f} s of optimizer steps, summed over "
                              "invocations; evaluations and checkpoints not counted)"),
            ("throughput", f"{rate:,.0f} tokens/s (average)" if rate else UNKNOWN)]
    # The FLOPs of every invocation over the peak FLOPs its time allowed on its own machine and processes: a run
    # moved from one GPU to eight, or to another GPU, is counted on each.
    parts = state.get("invocations") or []
    # Steps checkpointed before invocations were recorded: a log line's record holds its interval's rate and the
    # MFU at it, whose ratio gives the MFU at the average rate (on the last invocation's machine).
    ratio = next((r["mfu"] / r["tokens_per_s"] for r in reversed(records) if r.get("mfu") and r.get("tokens_per_s")),
                 None)
    known = [p for p in parts if p.get("peak_flop_s")]
    if known:
        mfu = f"{100 * sum(p['flops'] for p in known) / sum(p['peak_flop_s'] for p in known):.1f}% (over the " \
              "optimizer steps' time" + ("" if len(known) == len(parts) else ", of steps " + ", ".join(
                  f"{p['steps'][0] + 1:,} to {p['steps'][1]:,}" for p in known) + " only: the other steps' "
                  "hardware has no peak figure") + ")"
    elif ratio and rate and not any(p.get("hardware") for p in parts):  # only steps from before invocations
        mfu = f"{100 * ratio * rate:.1f}% (at the average throughput, on the last machine's peak)"
    else:
        mfu = "not known (no peak figure for this hardware)"
    rows.append(("MFU", mfu))
    skipped = state.get("skipped_steps")
    if skipped:
        rows.append(("skipped steps", f"{skipped} (non-finite loss or gradient, or a float16 overflow that the loss "
                                      "scaler skipped)"))
    return rows


def read_evaluation(run_dir: Path) -> dict:
    """RUN/eval.json, `tinygemma run`'s evaluation of a checkpoint on the whole validation split ({} if none):
    refused in one line unless its eval holds a loss (a number, or null for NaN), bits per byte (the same, or
    none) and the tokens scored, and it names the checkpoint."""
    path = run_dir / EVAL_NAME
    evaluation = read_json(path, "evaluation") if path.exists() else {}
    whole = evaluation.get("eval")
    if evaluation and not (isinstance(whole, dict) and "loss" in whole and is_integer(whole.get("tokens"))
                           and all(whole.get(k) is None or is_real(whole[k]) for k in ("loss", "bits_per_byte"))
                           and isinstance(evaluation.get("checkpoint"), str)):
        raise UserError(f"{path} is damaged or hand-edited: it is not the checkpoint, loss, bits per byte and "
                        "tokens `tinygemma run` writes")
    return evaluation


def validation_table(records: list[dict], last: dict | None, best: dict | None, evaluation: dict) -> list[str]:
    evals = {r["step"]: r for r in records if "val_loss" in r}
    rows = []
    for name, pointer in (("final", last), ("best", best)):
        record = evals.get(pointer["step"]) if pointer else None
        if record:
            rows.append((f"{name}: step {pointer['step']:,}", *val_cells(record["val_loss"], record.get("val_bpb"))))
    if evaluation.get("eval"):
        e = evaluation["eval"]
        rows.append((f"whole validation split ({e['tokens']:,} tokens), checkpoint `{evaluation['checkpoint']}`",
                     *val_cells(e["loss"], e.get("bits_per_byte"))))
    if not rows:
        return ["No evaluation recorded yet.", ""]
    return table(rows, ("", "loss", "bits per byte"))


def run_record(run: dict, key: str) -> dict:
    """A record of config.json's "run" (data_source, data_documents) where it is one, else {} (an older or damaged
    config.json)."""
    value = run.get(key)
    return value if isinstance(value, dict) else {}


def data_description(run: dict) -> str:
    """Where the training stories came from, as the prepared data's meta.json says (recorded in config.json)."""
    source = run_record(run, "data_source")
    train = source.get("train")
    if not train:
        return UNKNOWN
    where = (f"[{HUB_DATASET}](https://huggingface.co/datasets/{HUB_DATASET}) from the Hugging Face hub"
             if train == f"hf:{HUB_DATASET}" else ", ".join(f"`{s}`" for s in train))
    documents = run_record(run, "data_documents").get("train")
    # (what was trained on; the limit is only a bound)
    limit = source.get("limit")
    if documents:
        return where + f", {documents:,} training stories" + (f" (limit {limit:,})" if limit else "")
    return where + (f", at most the first {limit:,} stories" if limit else "")


def val_cells(loss: float | None, bpb: float | None) -> tuple[str, str]:
    """A loss and bits per byte as the tables show them (eval.json's null, a NaN: "nan", and so are its bits
    per byte)."""
    if loss is None or math.isnan(loss):
        return "nan", "nan"
    return f"{loss:.4f}", f"{bpb:.4f}" if bpb is not None else UNKNOWN


# ------------------------------------------------------------------ markdown pieces


def table(rows: list[tuple], header: tuple = ("", "")) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows] + [""]


def details(summary: str, language: str, text: str) -> list[str]:
    return ["<details><summary>" + summary + "</summary>", "", f"```{language}", text, "```", "", "</details>", ""]


def quote(text: str) -> str:
    return "\n".join("> " + line if line else ">" for line in text.splitlines())


def sampling(g: dict) -> str:
    """The sampling settings of `g` (GenerateConfig as a dict), in words."""
    settings = [f"temperature {g.get('temperature')}"]
    settings += [f"{name} {g[key]}" for key, name in (("top_k", "top-k"), ("top_p", "top-p"), ("min_p", "min-p"))
                 if g.get(key)]
    if g.get("repetition_penalty", 1.0) != 1.0:
        settings.append(f"repetition penalty {g['repetition_penalty']}")
    each = " for the first prompt, one more for each next" if len(g.get("prompts") or []) > 1 else ""  # (as sampled)
    settings += [f"seed {g.get('seed')}{each}", f"at most {g.get('max_new_tokens')} new tokens"]
    if g.get("stop"):
        settings.append("ending before " + " or ".join(map(repr, g["stop"])))
    return ", ".join(settings)


# ------------------------------------------------------------------ the model card of an export


def write_model_card(ckpt: str | Path, out: str | Path, repo_id: str | None = None,
                     name: str | Path | None = None) -> Path:
    """README.md in the exported directory `out`: the hub's YAML header, then the model, its training, its
    evaluation, samples generated from `out` itself, and how to load it; from the records of `ckpt`, the
    checkpoint it was exported from. `repo_id` is the hub repository it will be loaded from, if known; `name`
    the folder it will be loaded from otherwise (`out`, unless that is a staging folder)."""
    out = Path(out)
    name = Path(name or out)
    known = export_records(ckpt)
    config = model_config_from_hf(read_json(out / "config.json", "config.json"))
    tokenizer = exported_tokenizer(out)
    where = repo_id or str(name)
    recipe = known["recipe"]
    generate = GenerateConfig(**recipe["generate"]) if recipe else GenerateConfig()
    text = "\n".join([
        "---", card_header(known).rstrip("\n"), "---", "",
        f"# {repo_id or name.name}", "", card_summary(known, config), "",
        "## Model", "", *table(model_rows(config, known, tokenizer)),
        "## Training", "", *training_section(known),
        "## Evaluation", "", *evaluation_section(known),
        "## Samples", "", *samples_section(out, generate, tokenizer),
        "## How to use", "", *usage_section(where, generate, tokenizer, config),
    ])
    atomic_write_text(out / CARD_NAME, text)
    return out / CARD_NAME


def export_records(ckpt: str | Path) -> dict:
    """What the records of the checkpoint an export comes from say: its metadata and trainer state (a tinygemma
    checkpoint), and its run's config.json, metrics.jsonl and eval.json (a checkpoint inside its run directory).
    Whatever is missing or unreadable stays empty: they make the model card, which must not stop an export of
    intact weights."""
    # Named from inside its run (`step_000040`, `.`) the path's own parts do not show the run: made absolute (not
    # resolved, so a checkpoints/ linked to another disk, named through the link, still leads to its run; from
    # inside such a link the working directory is the other disk's, and the card goes without the run's records).
    src = Path(os.path.abspath(resolve_checkpoint(ckpt)))
    meta = read_checkpoint_meta(src)
    state = peek_json(src / STATE_NAME) if meta else {}
    run_dir = src.parent.parent if meta and src.parent.name == "checkpoints" else None
    config = peek_json(run_dir / "config.json") if run_dir else {}
    recipe = recorded_recipe(state, config)
    records = read_records(run_dir / "metrics.jsonl") if run_dir else []
    try:  # (a damaged or hand-edited eval.json is no evaluation of these weights, and no reason to stop)
        evaluation = read_evaluation(run_dir) if run_dir else {}
    except UserError:
        evaluation = {}
    if evaluation.get("checkpoint") != src.name:  # the whole-split evaluation of another checkpoint
        evaluation = {}
    step = state.get("step", meta.get("step"))
    during = next((r for r in records if "val_loss" in r and r["step"] == step), None)
    if during is None and state.get("best_step") == step and is_real(state.get("best_val_loss")):
        during = {"step": step, "val_loss": state["best_val_loss"]}  # (copied out of its run: its state's own)
    return {"source": src, "meta": meta, "state": state, "run": config.get("run", {}), "recipe": recipe,
            "evaluation": evaluation.get("eval"), "during_training": during, "step": step}


def card_header(known: dict) -> str:
    """The hub's YAML metadata, written by huggingface_hub itself (which `datasets` already brings in)."""
    try:
        from huggingface_hub import ModelCardData
    except ImportError:
        raise UserError('the model card needs huggingface_hub: pip install "tinygemma[hub]"') from None

    trained = bool(known["meta"])
    from_hub = (known["run"].get("data_source") or {}).get("train") == f"hf:{HUB_DATASET}"
    # Weights trained on from others' (train.init_from: google/gemma-3-270m's, say) keep those weights' license
    initialised = bool(((known.get("recipe") or {}).get("train") or {}).get("init_from"))
    return ModelCardData(
        license="apache-2.0" if trained and not initialised else "other", datasets=[HUB_DATASET] if from_hub else None, language=["en"],
        library_name="transformers", pipeline_tag="text-generation",
        tags=["tinygemma", "gemma3", *(["tinystories"] if trained else [])],
    ).to_yaml()


def card_summary(known: dict, config: ModelConfig) -> str:
    size = f"A Gemma 3 text model (`Gemma3ForCausalLM`, {config.num_params():,} parameters)"
    if not known["meta"]:
        return (f"{size}, exported by tinygemma from a transformers directory. That directory records neither "
                "how the model was trained nor how it scores, so those are unknown here; the license field says "
                "`other` because the weights' license is unknown to tinygemma: set it before publishing.")
    source = (known["recipe"].get("train") or {}).get("init_from")
    how = (f"trained by tinygemma on the data below, starting from the weights of `{source}`" if source else
           "pre-trained from scratch by tinygemma on the data below" if known["recipe"] else
           "saved by tinygemma's Python API, which records no training: how it was trained is unknown here")
    if source:
        return (f"{size}, {how}. The license field says `other`: set it to those weights' license (google/gemma-3-270m's "
                "is Gemma's), checked against your data's terms (TinyStories is CDLA-Sharing-1.0), before publishing.")
    return (f"{size}, {how}. The license field is tinygemma's own (Apache-2.0): check it against your data's terms "
            "(TinyStories is CDLA-Sharing-1.0) before publishing.")


def exported_tokenizer(out: Path) -> Tokenizer | None:
    """The tokenizer an export holds, or None when it holds none."""
    if not (out / TOKENIZER_FILE).exists():
        return None
    try:
        return checkpoint_tokenizer(out)
    except UserError:
        return None


def model_rows(config: ModelConfig, known: dict, exported: Tokenizer | None = None) -> list[tuple[str, str]]:
    """The card's Model table; `exported`: the tokenizer the export holds, described from its own file."""
    recorded = (known["meta"].get("tokenizer") or {}).get("kind")
    tokenizer = GPT2Tokenizer.description if recorded == "gpt2" else exported.description if exported else UNKNOWN
    trained_context = ((known["recipe"].get("train") or {}).get("block_size") if known["recipe"]
                       else exported_block_size(known["source"]))  # a tinygemma export's weights record it
    sliding = sum(t == "sliding_attention" for t in config.layer_types)
    return [
        ("architecture", "Gemma 3 (text): RMSNorm before and after attention and MLP, GeGLU MLP, RoPE, "
                         "grouped-query attention with q/k norms, tied embeddings" if config.tie_embeddings
         else "Gemma 3 (text), untied output head"),
        ("parameters", f"{config.num_params():,}"),
        ("layers", f"{config.n_layers} ({sliding} sliding-window of {config.sliding_window} tokens, "
                   f"{config.n_layers - sliding} global)"),
        ("width", f"d_model {config.d_model}, MLP {config.mlp_dim}, {config.n_heads} query heads and "
                  f"{config.n_kv_heads} key/value head(s) of {config.head_dim}"),
        ("vocabulary", f"{config.vocab_size:,} tokens, {tokenizer}"),
        ("context", f"trained on {trained_context:,} tokens" if trained_context else f"{UNKNOWN} (training)"),
    ]


def training_section(known: dict) -> list[str]:
    recipe, run, state = known["recipe"], known["run"], known["state"]
    if not recipe:
        return ["Unknown: the export's source records no training.", ""]
    train, tokens = recipe.get("train", {}), state.get("tokens")
    rows = [("data", data_description(run)), *start_rows(recipe, initial_checkpoint(state, {"run": run}), state),
            ("tokens", (f"{tokens:,} ({state['step']:,} of the schedule's {train['max_steps']:,} optimizer steps: "
                        "a checkpoint from before its end)" if stopped_early(recipe, state)
                        else f"{tokens:,} ({state['step']:,} optimizer steps)") if tokens else UNKNOWN),
            ("batch", f"{train.get('batch_size', 0) * train.get('grad_accum_steps', 0):,} sequences of "
                      f"{train.get('block_size', 0):,} tokens per step"),
            ("optimizer", optimizer_description(train) + optimizer_changes(state)),
            *machine_rows(run, state)]
    if state.get("elapsed_s"):
        rows.append(("training time", f"{format_duration(state['elapsed_s'])} of optimizer steps"))
    return [*table(rows), *reproduce_block(recipe, state, "Reproduce (on the data prepared in `data.dir`, with "
                                           "`train.out` set to a new folder)"),
            *details("The whole recipe", "json", json.dumps(recipe, indent=2))]


def optimizer_description(train: dict) -> str:
    """The optimizer and schedule as the card states them: Muon's rate only where Muon trained the matrices."""
    muon = train.get("optimizer") == "muon"
    lr, min_lr, muon_lr = (train.get(k) for k in ("learning_rate", "min_lr", "muon_learning_rate"))
    rates = (f"Muon {muon_lr} for the matrices, AdamW {lr} for the rest" if muon else f"learning rate {lr}")
    # Every rate ends at the same fraction of its peak (min_lr / learning_rate): Muon's at its own
    numbers = all(is_real(v) for v in (lr, min_lr, muon_lr)) and lr
    end = f"{min_lr} (AdamW) and {min_lr / lr * muon_lr:.3g} (Muon)" if muon and numbers else f"{min_lr}"
    if train.get("lr_schedule") == "wsd" and train.get("cooldown_fraction") == 0:
        decay = "wsd schedule with no cooldown (the rates end at their peak)"
    elif train.get("lr_schedule") == "wsd":
        decay = f"wsd schedule to {end} over the last {train.get('cooldown_fraction')} of the steps"
    else:
        decay = f"{train.get('lr_schedule')} schedule to {end}"
    return f"{train.get('optimizer')}, {rates}, {decay}, {train.get('warmup_steps')} warmup steps"


def evaluation_section(known: dict) -> list[str]:
    e, during = known["evaluation"], known["during_training"]
    if e:
        where = f"the whole validation split ({e['tokens']:,} tokens), by `tinygemma run`"
        loss, bpb = e["loss"], e.get("bits_per_byte")
    elif during:
        train = known["recipe"].get("train", {})
        where = (f"the validation windows evaluated during training at step {during['step']:,} "
                 f"({train.get('eval_batches')} batches of the global batch, {train.get('block_size')} tokens "
                 "each): a sample of the split, not all of it")
        loss, bpb = during["val_loss"], during.get("val_bpb")
    else:
        return ["Unknown: no evaluation was recorded for this checkpoint. Measure one with "
                "`tinygemma eval --ckpt DIR --data PREPARED_DATA`.", ""]
    return [f"Next-token loss on {where}:", "",
            *table([val_cells(loss, bpb)], ("loss (nats per token)", "bits per byte")),
            "Bits per byte divide the loss by the UTF-8 bytes of the text, so that models with different "
            "tokenizers compare (where each tokenizer gives back the text it reads, as tinygemma prepare checks).", ""]


def samples_section(out: Path, g: GenerateConfig, tokenizer: Tokenizer | None) -> list[str]:
    """Samples generated now, from the exported files (so they are what a downloader gets); `tokenizer` is the
    export's own (exported_tokenizer)."""
    if tokenizer is None:
        return ["Unknown: the export holds no tokenizer.", ""]
    if not g.prompts:
        return ["None: the recipe's generate.prompts is empty.", ""]
    device = pick_device("auto")
    model = load_model(out, tokenizer, dtype="auto" if device.type == "cuda" else "float32", device=str(device))
    block = exported_block_size(out)  # (read at most at once, as `tinygemma generate` reads by default)
    lines = [f"Generated at export by tinygemma from these files: {sampling(dataclasses.asdict(g))}" + (
        f"; the model reading at most the last {block:,} tokens at once, the block it trained on (transformers "
        "reads every one)" if block else "") + ".", ""]
    positions = model.config.max_position_embeddings
    for i, prompt in enumerate(g.prompts):
        # As many new tokens as the recipe asks; read whole (no block recorded), as many as the model's positions
        # leave room for (a model with max_position_embeddings = block_size has fewer than a prompt and 200): the
        # card never stops an export.
        try:  # (a run trained before train checked its [generate], with a seed of -1, say: refused here)
            room = (g.max_new_tokens if block and block <= positions  # (read at most the block: no limit)
                    else positions - len(prompt_ids(model.config, tokenizer, prompt, 0)) + 1)  # (prompt_ids' count)
            texts, _ = generate_text(model, tokenizer, prompt, max_new_tokens=min(g.max_new_tokens, room),
                                     seed=g.seed + i, context=block, **g.sampling())
        except UserError as e:
            lines += [f"Not generated from {prompt!r}: {e}.", ""]
            continue
        lines += [quote(prompt + texts[0]), ""]
        if room < g.max_new_tokens:
            lines += [f"(at most {room} new tokens: the prompt and they fill the model's {positions} positions, the "
                      "last new token taking none)", ""]
    return lines


def usage_section(where: str, g: GenerateConfig, tokenizer: Tokenizer | None = None,
                  config: ModelConfig | None = None) -> list[str]:
    prompt = g.prompts[0] if g.prompts else "Once upon a time"
    # A tokenizer.json whose post-processor ends every text (T5's </s>): the model read that only where a story
    # ended, so the prompt goes without it.
    drop_suffix = (f"[:, :-{len(tokenizer.text_suffix)}]  # without the {tokenizer.decode(tokenizer.text_suffix)!r} "
                   "the tokenizer ends every text with" if tokenizer and tokenizer.text_suffix else "")
    if g.temperature == 0:  # greedy: transformers refuses a temperature of 0 with sampling on
        options = "do_sample=False"
    else:
        # top_k=0 said outright: transformers' generate otherwise filters to its own default, 50
        options = f"do_sample=True, temperature={g.temperature}, top_k={g.top_k or 0}" + (
            f", top_p={g.top_p}" if g.top_p else "") + (f", min_p={g.min_p}" if g.min_p else "")
    if g.repetition_penalty != 1.0:
        options += f", repetition_penalty={g.repetition_penalty}"
    needs = f" 4.53 or newer ({NEEDS_LAYER_TYPES})" if config is not None and config.layer_pattern is None else ""
    return [f"With transformers{needs}:", "", "```python", "from transformers import AutoTokenizer, Gemma3ForCausalLM", "",
            f"tokenizer = AutoTokenizer.from_pretrained({where!r})",
            f"model = Gemma3ForCausalLM.from_pretrained({where!r})",
            f"ids = tokenizer({prompt!r}, return_tensors=\"pt\").input_ids{drop_suffix}",
            *generate_lines(prompt, options, g.stop), "```", "",
            "With tinygemma, from a local copy of this directory:", "", "```bash",
            f"tinygemma generate --ckpt DIR --prompt {shlex.quote(prompt)}", "```", ""]


def generate_lines(prompt: str, options: str, stop: list[str]) -> list[str]:
    """The snippet's generate and print. With stop texts, transformers' `stop_strings` end the generation at the
    first, and the text is cut before it, as tinygemma's samples are (transformers keeps it)."""
    if not stop:
        return [f"out = model.generate(ids, max_new_tokens=100, {options})",
                "print(tokenizer.decode(out[0], skip_special_tokens=True))"]
    return [f"stop = {list(stop)!r}  # the recipe's stop texts: the text ends before the first",
            f"out = model.generate(ids, max_new_tokens=100, {options}, stop_strings=stop, tokenizer=tokenizer)",
            "text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)",
            f"print({prompt!r} + min((text.split(s)[0] for s in stop), key=len))"]


# ------------------------------------------------------------------ several runs side by side

COMPARED_SECTIONS = ("model", "train")  # the recipe's settings whose differences the table names, and "data"
NOT_COMPARED = {"train.out"}  # where each run is, which always differs


def compare_runs(run_dirs: list[str | Path], plot: str | Path | None = None) -> str:
    """Several training runs side by side, as a markdown table: the settings in which they differ (those of the
    weights shown; the data by what was prepared, not by its folder's name), then each one's steps, tokens,
    training time and throughput (its newest records'), its validation losses (the last and best sampled, and the
    whole split's where `tinygemma run` evaluated a checkpoint, named), with a note where their losses do not
    compare as they stand (comparison_note). `plot`: their validation loss against tokens, in one PNG (in bits
    per byte where their tokenizers differ)."""
    plot = check_plot_path(plot) if plot is not None else None
    runs, seen = {}, {}
    for given in [run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else run_dirs:  # (one run: a list of one)
        run_dir = Path(given)
        if not is_training_run(run_dir) or not (run_dir / "config.json").is_file():
            raise UserError(f"{run_dir} is not a training run (no config.json of tinygemma's): compare takes "
                            "the folders train writes")
        if run_dir.resolve() in seen:
            raise UserError(f"{given} is given twice (as {seen[run_dir.resolve()]} too)")
        seen[run_dir.resolve()] = given
        runs[str(given)] = compared_run(run_dir)
    settings = {name: flat_settings(run["config"]) for name, run in runs.items()}
    # The tokens' digests (meta.json's, recorded since 2026-12-03) tell the data apart by what was prepared: not
    # by the stories' file names as typed, nor by their counts. Compared where every run has them.
    by_tokens = all(all(run["digests"]) for run in runs.values())
    data = {name: compared_data(run, by_tokens) for name, run in runs.items()}
    if len({(train, val) for train, val, _ in data.values()}) > 1:
        for name, (_, _, text) in data.items():
            settings[name]["data"] = text
    keys = sorted({key for flat in settings.values() for key in flat} - NOT_COMPARED)
    differ = [key for key in keys if len({json.dumps(flat.get(key), sort_keys=True) for flat in settings.values()}) > 1]
    per_byte = tokenizers_differ(runs)  # (then the sampled losses show their bits per byte too: what compares)
    rows = [compared_row(name, run, ", ".join(f"{key}={as_text(settings[name].get(key))}" for key in differ), per_byte)
            for name, run in runs.items()]
    lines = table(rows, ("run", "differs in", "steps", "tokens", "training time", "tokens/s", "val loss (last)",
                         "val loss (best)", "whole split loss", "bits per byte"))
    lines += comparison_note(runs, data, by_tokens)
    if plot is not None:
        plot_validation({name: run["records"] for name, run in runs.items()}, plot, per_byte=per_byte)
    return "\n".join(lines)


def compared_row(name: str, run: dict, differs: str, per_byte: bool = False) -> tuple[str, ...]:
    """compare's row of one run (compared_run's), `differs` its settings that differ from the others';
    `per_byte`: the sampled losses with their bits per byte (where the runs' tokenizers differ)."""
    records, whole, newest = run["records"], run["evaluation"].get("eval") or {}, run["newest"]
    evals = {r["step"]: r for r in records if "val_loss" in r}
    last = max(evals) if evals else None
    # the best as best.json's: of what this run trained (step 0 is the weights it started from; under
    # train.init_from, another run's); NaN, a diverged step's, orders nothing
    trained = [s for s in evals if s > 0 and math.isfinite(evals[s]["val_loss"])] or [
        s for s in evals if math.isfinite(evals[s]["val_loss"])]
    best = min(trained, key=lambda step: evals[step]["val_loss"]) if trained else None
    timed = newest.get("elapsed_s")
    scored = checkpoint_step(run["evaluation"].get("checkpoint"))
    lost = ("" if not newest["lost"] else f" ({newest['lost']:,} logged, lost past the checkpoint)"
            if run["checkpointed"] else f" ({newest['lost']:,} logged, lost: no checkpoint written)")
    whole_loss, whole_bpb = val_cells(whole["loss"], whole.get("bits_per_byte")) if whole else ("-", UNKNOWN)
    return (name, "; ".join(filter(None, (differs, run["changes"] and "changed on resume: "
                                          + changes_told(run["changes"])))) or "-",
            f"{newest['step']:,}{lost}", f"{newest['tokens']:,}", format_duration(timed) if timed else "-",
            f"{newest['timed_tokens'] / timed:,.0f}" if timed else "-",
            sampled_cell(evals[last], per_byte) if evals else "-",
            sampled_cell(evals[best], per_byte) if best is not None else "-",
            whole_loss + (f" (step {scored:,})" if scored is not None and whole else ""),
            whole_bpb.replace(UNKNOWN, "-"))


def sampled_cell(record: dict, per_byte: bool) -> str:
    """A sampled validation loss as compare's table shows it: "2.1234 (step 500)", and with `per_byte` its bits
    per byte too, where the record holds them."""
    bpb = record.get("val_bpb") if per_byte else None
    also = f", {bpb:.4f} bits per byte" if isinstance(bpb, float) and math.isfinite(bpb) else ""
    return f"{record['val_loss']:.4f} (step {record['step']:,}{also})"


def comparison_note(runs: dict, data: dict, by_tokens: bool) -> list[str]:
    """What compare says under its table, the first that holds: the runs' tokenizers differ (bits per byte
    compare, losses per token do not; and if their validation stories differ too, by where they came from and
    how many, that neither compares as it stands), their validation stories differ (by their tokens, or without
    digests by their counts: no validation loss compares), or only their sampled windows do (the whole split's
    compare)."""
    samples = {validation_sample(run["config"], data[name][1] if by_tokens else None) for name, run in runs.items()}
    if tokenizers_differ(runs):
        configs = [run["config"] for run in runs.values()]
        by_text = all(isinstance((config.get("run") or {}).get("val_text_blake2b"), str) for config in configs)
        stories = {validation_stories(config, by_text): stories_told(config.get("run") or {}) for config in configs}
        stories.pop(None, None)  # (a run that records no source: not known to differ)
        told = sorted(set(stories.values()))
        told = "; ".join(told) if len(told) > 1 else f"{told[0]} each, other stories by their text" if told else ""
        also = (f" They were validated on different stories too ({told}): not even their bits per byte compare as "
                "they stand." if len(stories) > 1 else "")
        return ["The runs' tokenizers differ: their losses per token do not compare, their bits per byte do, on the "
                "same stories (the sampled ones up to their windows' noise: other tokens make other windows; the whole "
                "split's exactly), where each tokenizer gives back the text it reads (prepare warns of one that "
                f"lowercases or drops text).{also} `tinygemma eval --ckpt RUN --data STORIES.txt` scores each run on "
                "one story file in its own tokens.", ""]
    if len({val for _, val, _ in data.values()} - {None}) > 1:
        return ["The runs were validated on different stories: neither their sampled nor their whole split's losses "
                "compare. Score them on the same stories: `tinygemma eval --ckpt RUN --data DATA` (one dataset, or "
                "one story file, for every run).", ""]
    if len(samples) > 1:
        return ["The sampled validation losses (last, best) were scored on different windows (other data, block "
                "size, or eval_batches x global batch): compare the whole split's, which `tinygemma run` writes to "
                "eval.json and `tinygemma eval --ckpt RUN --data DATA` gives for any checkpoint.", ""]
    return []


def validation_stories(config: dict, by_text: bool) -> str | None:
    """Which stories a run was validated on, whatever their tokens: `by_text`, their digest (runs on data
    prepared since 2026-12-07), else their file (or the hub's split) as named and count, or, set aside, the
    training stories' sources and limit, the share and the count; None where its config.json records no source (a
    run from before 2026-12-02)."""
    run = config.get("run") or {}
    if by_text:
        return run.get("val_text_blake2b")
    source = run.get("data_source")
    if not isinstance(source, dict):
        return None
    aside = source.get("val_fraction")
    documents = run_record(run, "data_documents").get("val")
    return json.dumps([source.get("val"), aside, source.get("train") if aside else None,
                       source.get("limit") if aside else None, documents])


def stories_told(run: dict) -> str:
    """The validation stories as compare's note names them: where they came from and how many, and for stories
    set aside from the training ones, those (validation_stories tells them apart by them too)."""
    source = run_record(run, "data_source")
    aside = f" of {data_description(run)}" if source.get("val_fraction") else ""
    return validation_description(run) + aside


def tokenizers_differ(runs: dict) -> bool:
    """Whether the compared runs (of those that record theirs) were trained with different tokenizers."""
    return len({json.dumps(tokenizer, sort_keys=True) for run in runs.values()
                if isinstance(tokenizer := (run["config"].get("run") or {}).get("tokenizer"), dict)}) > 1


def check_plot_path(plot: str | Path) -> Path:
    """--plot's file, refused in one line unless it is a new .png in a folder that exists, or an earlier plot of
    tinygemma's (not a photo of the same name, nor a figure of another program), and outside any run (whose
    loss.png it could replace) or dataset."""
    plot = check_output_path(plot, "--plot")
    if plot.suffix.lower() != ".png":
        raise UserError(f"--plot {plot}: give a .png file to write")
    if plot.is_dir():
        raise UserError(f"--plot {plot} is a directory; give the .png file to write")
    if not plot.parent.is_dir():
        raise UserError(f"--plot {plot}: the folder {plot.parent} does not exist")
    for folder in plot.resolve().parents:  # (a run's tb/ too)
        if is_training_run(folder) or (folder / META_NAME).exists():
            raise UserError(f"--plot {plot} is inside {folder}, a run or a dataset of tinygemma's: give it a "
                            "place of its own")
    if plot.exists() and not is_own_plot(plot):
        raise UserError(f"--plot {plot} exists and is not a plot tinygemma wrote; choose a new file name")
    return plot


def compared_run(run_dir: Path) -> dict:
    """What compare_runs reads of a run: its config.json, records and eval.json, and its newest step ("newest":
    step, tokens, and the training time to the newest record that holds one, with the tokens by then), from its
    records (a run still training has steps past its last checkpoint) or its last checkpoint's state."""
    config = read_json(run_dir / "config.json", "run config")
    if not all(isinstance(config.get(section, {}), dict) for section in (*COMPARED_SECTIONS, "data", "run")):
        raise UserError(f"{run_dir / 'config.json'} is not a run's config.json (its sections are not tables)")
    last = checkpoint_pointer(run_dir)
    state = read_json(run_dir / "checkpoints" / last["dir"] / STATE_NAME, "trainer state") if last else {}
    if wrong := state_kinds_wrong(state):
        raise UserError(f"{run_dir / 'checkpoints' / last['dir'] / STATE_NAME} is damaged or hand-edited: its "
                        f"{', '.join(wrong)} are not what training writes")
    records = read_records(run_dir / "metrics.jsonl")
    steps = [r for r in records if "train_loss" in r]
    newest = {"step": state.get("step", 0), "tokens": state.get("tokens", 0), "elapsed_s": state.get("elapsed_s"),
              "timed_tokens": state.get("tokens", 0), "lost": None}
    past = bool(steps) and steps[-1]["step"] > newest["step"]  # steps past the last checkpoint
    if past and not training_now(run_dir):
        newest["lost"] = steps[-1]["step"]  # a run that stopped (a crash, a kill) past its last checkpoint
        # its records past the checkpoint are of weights no one has (a resume cuts them): left out of the
        # validation losses and the plot, as the run's own loss.png leaves them out
        records = [r for r in records if not isinstance(r.get("step"), int) or r["step"] <= newest["step"]]
    elif past:  # a run training now: where it is
        newest.update(step=steps[-1]["step"], tokens=steps[-1]["tokens"])
        timed = [r for r in steps if r.get("elapsed_s") and r["step"] > state.get("step", 0)]
        if timed:
            newest.update(elapsed_s=timed[-1]["elapsed_s"], timed_tokens=timed[-1]["tokens"])
    evaluation = read_evaluation(run_dir)
    # The settings of the weights shown: the checkpoint's recipe (config.json is the newest attempt's, which may
    # have failed before its first checkpoint); of a run training now, config.json's, what its checkpoint's
    # recipe differs in being a change on resume at the checkpoint's step, not yet in its state.
    # (the model is config.json's, resolved whole, which no resume changes)
    recipe, changes = {**recorded_recipe(state, config), "model": config.get("model")}, resume_changes(state)
    if training_now(run_dir) and state.get("config"):
        was, recipe = recipe.get("train") or {}, {**recorded_recipe({}, config), "model": config.get("model")}
        try:  # (what training will record as this invocation's changes, at its first checkpoint)
            now = TrainConfig(**{key: value for key, value in (recipe.get("train") or {}).items()
                                 if key in TrainConfig.__dataclass_fields__})  # (train.out is the recipe's)
            pending = settings_changes(was, now, CHANGE_SETTINGS, (config.get("run") or {}).get("world_size"))
        except (TypeError, UserError):  # a config.json of another version's settings
            pending = {}
        changes = [*changes, *([(state.get("step", 0), pending)] if pending else [])]
    # the tokens' digests: recorded as the run started (config.json), or by its checkpoint (older runs)
    recorded = (config.get("run") or {}).get("data_blake2b")
    recorded, checkpointed = recorded if isinstance(recorded, dict) else {}, state.get("data") or {}
    digests = tuple(digest if isinstance(digest := recorded.get(split) or checkpointed.get(f"{split}_blake2b"), str)
                    else None for split in ("train", "val"))
    return {"config": {**recipe, "run": config.get("run") or {}}, "records": records, "evaluation": evaluation,
            "newest": newest, "changes": changes, "digests": digests, "checkpointed": last is not None}


def training_now(run_dir: Path) -> bool:
    """Whether a process holds the run's lock (trains it now), probed without writing anything."""
    try:
        check_unlocked(run_dir, "the run")
    except UserError:
        return True
    return False


def flat_settings(config: dict) -> dict:
    """config.json's model and train settings as {"section.key": value}."""
    return {f"{section}.{key}": value for section in COMPARED_SECTIONS
            for key, value in (config.get(section) or {}).items()}


def compared_data(run: dict, by_tokens: bool) -> tuple[str, str | None, str]:
    """(what a run trained on, what it was validated on, how to name its data) for compare: by the tokenizer and
    the splits' token digests where `by_tokens`, else by the stories' sources and counts and the tokenizer (and
    what it was validated on unknown: None)."""
    config = run["config"]
    text = data_identity(config)
    if not by_tokens:  # how a source was spelled, or another file of the same stories, must not say "other data";
        # validation splits of other sizes are other stories, though
        documents = (config.get("run") or {}).get("data_documents")
        val = documents.get("val") if isinstance(documents, dict) else None
        return text, json.dumps(val) if is_integer(val) else None, text
    tokenizer = (config.get("run") or {}).get("tokenizer")
    tokenizer = [tokenizer.get("kind"), tokenizer.get("sha256")] if isinstance(tokenizer, dict) else [None]
    train, val = run["digests"]
    return (json.dumps([*tokenizer, train]), json.dumps([*tokenizer, val]),
            f"{text}; tokens: train {train:.8}, validation {val:.8}")


def data_identity(config: dict) -> str:
    """The prepared data a run trained on, as its config.json's run section records it: the stories' source and
    count, and the tokenizer (its digest, where it has a file)."""
    run = config.get("run") or {}
    tokenizer = run.get("tokenizer") if isinstance(run.get("tokenizer"), dict) else {}
    if not tokenizer and not run.get("data_source"):  # a run recorded before 2026-12-02: its data's folder
        return f"the folder {as_text((config.get('data') or {}).get('dir'))}"
    digest = tokenizer.get("sha256")
    return (f"{data_description(run)}; validation: {validation_description(run)}; tokenizer "
            f"{tokenizer.get('kind', UNKNOWN)}" + (f" {digest[:8]}" if isinstance(digest, str) else ""))


def validation_description(run: dict) -> str:
    """Where the validation stories came from (another file, the hub's split, set aside from the training
    stories: what share) and how many, as meta.json says."""
    source = run_record(run, "data_source")
    val = source.get("val")
    where = ", ".join(f"`{s}`" for s in val) if isinstance(val, list) else val or UNKNOWN
    if source.get("val_fraction"):
        where += f" (a {source['val_fraction']:g} share)"
    documents = run_record(run, "data_documents").get("val")
    return where + (f", {documents:,} stories" if isinstance(documents, int) else "")


def validation_sample(config: dict, validation: str | None) -> str:
    """What decides the windows of a run's sampled validation losses: its validation data (compared_data's, or
    where that is unknown, its data's folder), block size and window count."""
    train, run = config.get("train") or {}, config.get("run") or {}
    windows = (train.get("eval_batches") or 0) * (run.get("global_batch") or 0)
    return json.dumps([validation or data_identity(config), train.get("block_size"), windows])
