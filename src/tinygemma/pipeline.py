"""`tinygemma run RECIPE.toml`: the whole pipeline a recipe describes, in one re-runnable command.

prepare (if the prepared directory is missing) -> train (resuming the run if it has checkpoints) -> evaluate
the best checkpoint on the whole validation split -> print sample stories from the recipe's prompts -> record
them in RUN/eval.json and write RUN/report.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import torch

from tinygemma.checkpoint import (
    checkpoint_bytes,
    checkpoint_tokenizer,
    last_checkpoint,
    load_model,
    resolve_checkpoint,
    stored_model_config,
)
from tinygemma.config import GenerateConfig, Recipe, checked_recipe, parse_override
from tinygemma.data import (
    DEFAULT_BPE_VOCAB_SIZE,
    META_NAME,
    changed_sources,
    check_prepare_out,
    check_source,
    data_differences,
    open_prepared,
    prepare,
    requested_micro_batch_size,
    same_sources,
)
from tinygemma.devices import autocast_dtype, dtype_name, evaluation_dtype, pick_device, pick_dtype
from tinygemma.errors import UserError, shell_quote
from tinygemma.evaluation import evaluate
from tinygemma.files import atomic_write_json, check_unlocked, is_training_run, peek_json
from tinygemma.generate import NonFiniteLogits, generate_text
from tinygemma.metrics import strict_json
from tinygemma.model import Gemma3
from tinygemma.optim import check_muon_rate, cooldown_start, schedule
from tinygemma.parallelize import check_attention_backend
from tinygemma.report import EVAL_NAME, REPORT_NAME, write_report
from tinygemma.runtime import env_rank, env_world_size, main_process_first, setup_runtime, training_device
from tinygemma.tokenizer import GPT2_VOCAB_SIZE, TOKENIZER_FILE, load_tokenizer, token_byte_lengths
from tinygemma.trackers import require_loggers
from tinygemma.train import (
    check_initial_model,
    check_initial_tokenizer,
    check_run,
    check_run_out,
    init_checkpoint,
    train,
)


def log(message: str) -> None:
    print(f"[tinygemma run] {message}", file=sys.stderr, flush=True)


def prepare_if_missing(recipe: Recipe) -> None:
    """Prepare the recipe's data into data.dir, unless it is there already: prepared from the same stories with the
    same tokenizer (a directory prepared from others is refused, never trained on in the recipe's name)."""
    data_dir, data = Path(recipe.data.dir), prepared_data(recipe)
    if data is not None:
        log(f"prepared data found in {data_dir} ({data.meta['splits']['train']['tokens']:,} training tokens); "
            "delete it to prepare again")
        return
    tokenizer = data_to_prepare(recipe)  # (its refusals are the only line, not one after the next)
    name = recipe.data.tokenizer
    source = ", ".join(recipe.data.source) or "the Hugging Face hub (roneneldan/TinyStories)"
    log(f"preparing {source} into {data_dir} with the {name} tokenizer")
    prepare(data_dir, sources=recipe.data.source or None, val_sources=recipe.data.val_source or None,
            tokenizer=tokenizer, vocab_size=recipe.data.vocab_size, limit=recipe.data.limit)


def data_to_prepare(recipe: Recipe):
    """The recipe's sources checked (each there and readable) and its tokenizer: gpt2 or bpe by name, a
    tokenizer.json loaded (read once: prepare takes it)."""
    for path in (*recipe.data.source, *recipe.data.val_source):
        check_source(path)
    name = recipe.data.tokenizer
    return name if name in ("gpt2", "bpe") else load_tokenizer(name)


def check_outputs(recipe: Recipe) -> None:
    """Refuse a train.out that training may not write into, or a data.dir to prepare that prepare may not, before
    anything is prepared (a refused run then leaves no new dataset behind): train's and prepare's own checks,
    naming the recipe's settings where those commands name their --out."""
    out, data = Path(recipe.out).resolve(), Path(recipe.data.dir).resolve()
    if out == data or (out in data.parents and not is_training_run(out)):  # a new run's folder holds nothing else
        raise UserError(f"data.dir {data} is {'train.out itself' if out == data else 'inside train.out'}: the run "
                        "and its prepared data each need a folder of their own (side by side, not one in the other)")
    check_run_out(recipe.out, "train.out")
    check_run_data(recipe)
    if is_training_run(recipe.out):  # trained by another process now: refused before preparing, not after
        check_unlocked(recipe.out, "a run")
    if not (Path(recipe.data.dir) / META_NAME).exists():
        check_prepare_out(recipe.data.dir, "data.dir")


RUN_DATA_SETTINGS = ("source", "val_source", "tokenizer", "vocab_size", "limit")  # [data] that makes its tokens


def check_given_settings(recipe: Recipe, given: list[str]) -> None:
    """--set's [data] settings beyond data.dir (`given`: KEY=VALUE items), which `train` records but does not use:
    they must describe the data there, as `run` checks them (train trains on data.dir as prepared). A recipe
    file's own [data] is not compared: train records data.dir alone for a run on data it did not make. ([generate]
    is the trainer's to check: train.check_generate_settings.)"""
    keys = {parse_override(item)[0] for item in given}
    if keys & {f"data.{name}" for name in RUN_DATA_SETTINGS}:
        differences = data_differences(recipe.data, open_prepared(recipe.data.dir))
        if differences:
            raise UserError(f"{recipe.data.dir} (data.dir) holds other data than the [data] settings given say "
                            f"({'; '.join(differences)}); train trains on data.dir as prepared: drop those "
                            "settings, or let `tinygemma run` prepare the data they ask for")


def check_run_data(recipe: Recipe) -> None:
    """A run already in train.out continues on the data it was trained on: other stories, limit or tokenizer are
    refused here, naming the run, before anything is prepared (training would refuse the new tokens only after
    preparing them: for the workshop recipe, all of TinyStories). The run's prepared data decides while its folder
    is there (a run started by `tinygemma train --data DIR` recorded no [data] but DIR); else its recorded [data]."""
    if not is_training_run(recipe.out):
        return
    had = peek_json(Path(recipe.out) / "config.json").get("data")
    if not isinstance(had, dict):
        return
    moved = None
    if isinstance(had.get("dir"), str) and (Path(had["dir"]) / META_NAME).exists():
        try:
            moved = data_differences(recipe.data, open_prepared(had["dir"]))
        except UserError:  # that folder is broken now: the recorded [data] decides
            pass
    if moved is None:
        want = recipe.to_dict()["data"]

        def same(name) -> bool:
            a, b = had.get(name), want.get(name)
            if name in ("source", "val_source") and isinstance(a, list) and isinstance(b, list):
                return same_sources(a, b)
            return a == b

        moved = [f"{name} {had.get(name)!r} -> {want.get(name)!r}" for name in RUN_DATA_SETTINGS
                 if name in had and not same(name)]
    if moved:
        raise UserError(f"train.out {recipe.out} holds a run trained on other [data] ({'; '.join(moved)}): continue "
                        "it with the [data] it was trained on, or set train.out to a new folder for this data")


def check_run_recipe(recipe: Recipe) -> dict | None:
    """What `run` checks before it prepares, then, with the data there, what training checks as it starts
    (train.check_run's findings; None where the data is not prepared yet): `run --dry-run`. Nothing is written."""
    recipe = checked_recipe(recipe)
    check_outputs(recipe)
    check_training_settings(recipe)
    if prepared_data(recipe) is None:
        data_to_prepare(recipe)  # (the sources and tokenizer prepare would read)
        return None
    return check_run(recipe, resume=True)


def recipe_plan(recipe: Recipe, checked: dict | None = None) -> dict:
    """What the recipe trains (`train --dry-run`, `run --dry-run`): the model, the batch, the steps, tokens and
    FLOPs, the learning rates, how many evaluations and checkpoints. `checked`: what train.check_run found (the
    model for the prepared data, the steps this invocation trains); without it (data not prepared yet), the
    vocabulary is the tokenizer's where that is known before preparing (gpt2, a tokenizer.json, bpe's
    data.vocab_size). Nothing is written."""
    recipe = checked_recipe(recipe)  # (from Python, a recipe changed after it was made)
    t, data_dir = recipe.train, Path(recipe.data.dir)
    if checked is not None:
        config, vocab_size, vocab_from = checked["model"], checked["data_vocab_size"], f"the prepared data in {data_dir}"
        start, end = checked["start"], checked["end"]
    else:
        vocab_size, needed, vocab_from = plan_vocab_size(recipe)
        config, start, end = recipe.model_config(vocab_size, needed), 0, t.max_steps
    if config.vocab_size != vocab_size:  # set larger (a resume's saved recipe holds the data's own: not this)
        vocab_from = "model.vocab_size"
    tokenizer_file = data_dir / TOKENIZER_FILE if checked is not None else None
    with torch.device("meta"):  # shapes only
        checkpoint_size = checkpoint_bytes(Gemma3(config), tokenizer_file.stat().st_size
                                           if tokenizer_file is not None and tokenizer_file.is_file() else 0)
    sequences = t.batch_size * t.grad_accum_steps
    tokens_per_step = sequences * t.block_size

    def multiples(*intervals: int) -> int:  # steps in 1..max_steps that are a multiple of any interval (or the last)
        every = [i for i in intervals if i]
        union = sum(t.max_steps // i for i in every) - (t.max_steps // math.lcm(*every) if len(every) == 2 else 0)
        return union + (not any(t.max_steps % i == 0 for i in every))

    # The highest rate is the warmup's last step's, or the first after it (a warmup of 0 never reaches the peak)
    top = max(schedule(s, t) for s in {0, max(t.warmup_steps - 1, 0), min(t.warmup_steps, t.max_steps - 1)})
    peaks = {"adamw": t.learning_rate, **({"muon": t.muon_learning_rate} if t.optimizer == "muon" else {})}
    checkpoints = multiples(t.checkpoint_interval)
    return {
        "model": {"preset": recipe.model_preset, "vocab_size": config.vocab_size, "vocab_size_from": vocab_from,
                  "parameters": config.num_params(), "flops_per_token": config.flops_per_token(t.block_size)},
        "batch": {"sequences_per_step": sequences, "block_size": t.block_size, "tokens_per_step": tokens_per_step},
        "steps": t.max_steps, "tokens": t.max_steps * tokens_per_step,
        "flops": t.max_steps * tokens_per_step * config.flops_per_token(t.block_size),
        "this_invocation": {"from_step": start, "to_step": end},
        "optimizer": t.optimizer,
        "schedule": {"kind": t.lr_schedule, "warmup_steps": t.warmup_steps,
                     **({"cooldown_from_step": cooldown_start(t)} if t.lr_schedule == "wsd" else {})},
        # The schedule of these settings; a resume's own steps also apart, where a changed rate makes them differ
        "learning_rates": {name: {"first_step": peak * schedule(0, t), "highest": peak * top,
                                  "last_step": peak * schedule(t.max_steps - 1, t),
                                  **({"this_invocation": [peak * schedule(start, t), peak * schedule(end - 1, t)]}
                                     if 0 < start < end else {})} for name, peak in peaks.items()},
        "evaluations": {"count": 1 + multiples(t.eval_interval, t.checkpoint_interval),  # and at step 0
                        "tokens_each": t.eval_batches * tokens_per_step},
        "checkpoints": {"count": checkpoints, "bytes_each_at_most": checkpoint_size,
                        "on_disk_at_most": min(checkpoints, t.keep_checkpoints + 1)},  # the newest, and the best
        "on_this_machine": plan_machine(recipe),
    }


def plan_machine(recipe: Recipe) -> dict | None:
    """Where this machine would train the recipe: the device its device setting resolves to, the precision its
    dtype setting resolves to there, and the processes (torchrun's); None where it cannot (a CUDA recipe on a
    laptop: training's refusal says why). A workshop recipe on a laptop trains on its CPU, in days."""
    try:
        device = training_device(recipe.train.device, env_world_size())
    except UserError:
        return None
    local = os.environ.get("LOCAL_WORLD_SIZE", "")  # (torchrun's processes on this node, of all nodes' WORLD_SIZE)
    return {"device": device.type, "dtype": dtype_name(autocast_dtype(recipe.train.dtype, device)),
            "processes": int(local) if local.isdigit() and int(local) > 0 else env_world_size()}


def plan_vocab_size(recipe: Recipe) -> tuple[int, int, str]:
    """Without training's checks: the vocabulary a run of the recipe would have, the ids its text and end of text
    take (model.vocab_size may not be below them), and where they come from: the prepared data, else the
    tokenizer."""
    name, data_dir = recipe.data.tokenizer, Path(recipe.data.dir)
    if (data_dir / META_NAME).exists():  # (a dry run refused before training's checks: the data's all the same)
        data = open_prepared(data_dir)
        return data.vocab_size, data.tokenizer().model_vocab_size, f"the prepared data in {data_dir}"
    if name == "gpt2":
        return GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE, "the gpt2 tokenizer"
    if name == "bpe":
        size = recipe.data.vocab_size or DEFAULT_BPE_VOCAB_SIZE
        return size, size, "data.vocab_size, the BPE prepare trains (at most)"
    tokenizer = load_tokenizer(name)
    return tokenizer.vocab_size, tokenizer.model_vocab_size, name


def say_plan(plan: dict) -> str:
    """The plan in one line."""
    m, lr, t, now = plan["model"], plan["learning_rates"], plan["schedule"], plan["this_invocation"]
    rates = "; ".join(f"{name} {r['first_step']:.3g} -> {r['highest']:.3g} -> {r['last_step']:.3g}"
                      + (" (steps {:,} to {:,}: {:.3g} -> {:.3g})".format(now["from_step"] + 1, now["to_step"],
                                                                         *r["this_invocation"])
                         if "this_invocation" in r else "") for name, r in lr.items())
    steps = ("" if (now["from_step"], now["to_step"]) == (0, plan["steps"])
             else f" (this invocation: steps {now['from_step']:,} to {now['to_step']:,})")
    return (f"{m['preset']} ({m['parameters']:,} parameters, vocabulary {m['vocab_size']:,} from {m['vocab_size_from']}): "
            f"{plan['steps']:,} steps x {plan['batch']['tokens_per_step']:,} tokens = {plan['tokens']:,} tokens, "
            f"{plan['flops']:.3g} FLOP{steps}; {plan['optimizer']}, {t['kind']} schedule, warmup "
            f"{t['warmup_steps']} steps, learning rate {rates}; evaluations: {plan['evaluations']['count']:,} of "
            f"{plan['evaluations']['tokens_each']:,} tokens; checkpoints: {plan['checkpoints']['count']:,} of at most "
            f"{plan['checkpoints']['bytes_each_at_most'] / 2**30:.2f} GiB" + (
                "; on this machine: {processes} x {device} in {dtype}".format(**plan["on_this_machine"])
                if plan.get("on_this_machine") else ""))


def prepared_data(recipe: Recipe):
    """The recipe's prepared data in data.dir, or None where it is not prepared yet; refused where it was prepared
    from other data than the recipe's [data] asks for (never trained on in the recipe's name), or, for a new run,
    from a local file that has changed since."""
    data_dir = Path(recipe.data.dir)
    recipe.data.validate()
    if not (data_dir / META_NAME).exists():
        return None
    data = open_prepared(data_dir)  # validated: a truncated or foreign directory stops here
    differences = data_differences(recipe.data, data)
    if differences:
        raise UserError(f"{data_dir} was prepared from other data than the recipe's [data] asks for "
                        f"({'; '.join(differences)}): set data.dir to another folder to prepare it there, "
                        "delete this one to prepare it again, or give [data] the settings it was prepared "
                        "with (--set data.source=..., data.tokenizer=..., data.limit=...)")
    # (by process 0 alone, which prepared it: under torchrun another node's copy of a source is no matter)
    changed = changed_sources(data) if env_rank() == 0 and not is_training_run(recipe.out) else []
    if changed:  # (a run begun on it goes on with its data as prepared)
        raise UserError(f"{data_dir} (data.dir) was prepared from {', '.join(changed)} as it was then, and that has "
                        "changed since (its size): delete that folder to prepare the stories again, or set data.dir "
                        "to another folder")
    return data


def check_training_settings(recipe: Recipe) -> None:
    """What training would refuse whatever the data: a micro-batch size that does not divide a process's share,
    a logger not installed, flex attention off CUDA; and the recipe's own [data] and [generate] settings. Checked
    before the data is prepared (for the workshop recipe, all of TinyStories)."""
    recipe.check_for_run()
    require_loggers(recipe.train.loggers)
    device = pick_device(recipe.train.device)
    requested_micro_batch_size(recipe.train, env_world_size(), device.type)
    check_attention_backend(recipe.train, recipe.model_config(), device)
    check_muon_rate(recipe.train, recipe.model_config())
    if recipe.train.init_from and last_checkpoint(Path(recipe.out)) is None:  # a new run: its weights, their model
        directory = init_checkpoint(recipe.train.init_from)
        have = stored_model_config(directory)  # (the data's vocabulary: theirs, here)
        check_initial_model(recipe.train.init_from, have, recipe.model_config(have.vocab_size))
        data_dir, name = Path(recipe.data.dir), recipe.data.tokenizer
        prepared = open_prepared(data_dir) if (data_dir / META_NAME).exists() else None
        if prepared is not None and data_differences(recipe.data, prepared):
            return  # other data than the recipe's: prepare_if_missing says so
        if prepared is not None or name != "bpe":  # the data's tokenizer, known before preparing it
            ours = prepared.tokenizer() if prepared is not None else load_tokenizer(name)
            check_initial_tokenizer(recipe.train.init_from, directory, ours)


def run(recipe: Recipe) -> dict:
    """Run the recipe end to end; return {"train": summary, "eval": metrics, "samples": [...]}.

    Under torchrun (`torchrun --nproc-per-node N -m tinygemma run RECIPE`), process 0 checks the outputs and
    prepares the data while the others wait; all train; process 0 alone then evaluates, samples and writes (the
    others return {"train": summary}). Across machines, data.dir must then be one folder that all of them see."""
    recipe = checked_recipe(recipe)

    def before_training() -> None:
        check_outputs(recipe)
        check_training_settings(recipe)
        prepare_if_missing(recipe)  # (the trainer checks the prompts in the data's tokens, before it trains)
        log(f"training into {recipe.out} (resumes from its last checkpoint if it has one)")

    if env_world_size() == 1:
        before_training()
        return {"train": train(recipe, resume=True), **evaluate_and_sample(recipe)}
    rt = setup_runtime(recipe.train.device, recipe.train.dtype)  # the process group that training then joins
    try:
        main_process_first(before_training, rt)
        summary = train(recipe, resume=True)
    finally:
        rt.close()
    return {"train": summary, **evaluate_and_sample(recipe)} if rt.is_main else {"train": summary}


def evaluate_and_sample(recipe: Recipe) -> dict:
    """The trained run's best checkpoint on the whole validation split and the recipe's prompts, printed and
    recorded in RUN/eval.json and RUN/report.md; returns {"eval": metrics, "samples": [...]}."""
    tokenizer = checkpoint_tokenizer(recipe.out)
    device, dtype = sampling_place(recipe)
    model = load_model(recipe.out, tokenizer, dtype=dtype, device=str(device))
    data = open_prepared(recipe.data.dir)
    val = data.meta["splits"]["val"]
    log(f"evaluating the best checkpoint on the whole validation split ({val['tokens'] - 1:,} tokens predicted: "
        "all but the first)")
    metrics = evaluate(model, data.split("val"), block_size=recipe.train.block_size,
                       batch_size=recipe.train.batch_size,
                       token_bytes=token_byte_lengths(tokenizer, model.config.vocab_size),
                       progress=sys.stderr.isatty())  # minutes on a CPU for the hub's split; a log gets no frames
    print(strict_json({"eval": metrics}), flush=True)

    g = recipe.generate
    samples, broken = [], None
    for i, prompt in enumerate(g.prompts):
        try:
            texts, _ = generate_text(model, tokenizer, prompt, max_new_tokens=g.max_new_tokens, seed=g.seed + i,
                                     context=recipe.train.block_size, **g.sampling())  # (as generate's default)
        except NonFiniteLogits as e:  # (weights that are not finite: their evaluation, minutes long, is kept)
            broken = e
            break
        samples.append(prompt + texts[0])
        print(f"\n--- sample {i + 1}: {prompt!r}\n{prompt}{texts[0]}", flush=True)
    # Recorded for report.md, and for the model card of this checkpoint's export (its whole-split evaluation).
    checkpoint = resolve_checkpoint(recipe.out).name
    atomic_write_json(Path(recipe.out) / EVAL_NAME, {"checkpoint": checkpoint, "split": "val", "eval": metrics,
                                                    "samples": samples, "generate": dataclasses.asdict(g)})
    write_report(recipe.out)
    if broken is not None:
        raise broken
    return {"eval": metrics, "samples": samples}


def sampling_place(recipe: Recipe) -> tuple[torch.device, str]:
    """Where `run` evaluates and samples the trained run: the recipe's device, and the dtype it trained in where
    that is float32, else "auto" as evaluation takes it (bfloat16 on a GPU that computes in it, float32 on CPUs)."""
    device = pick_device(recipe.train.device)
    return device, evaluation_dtype("float32" if recipe.train.dtype == "float32" else "auto", device)


def place_flags(recipe: Recipe) -> str:
    """generate's --device and --dtype where its "auto" would choose otherwise than `run` sampled (on a CPU with
    native bfloat16, generate's auto is bfloat16, `run`'s float32): other rounding, other text."""
    device, dtype = sampling_place(recipe)
    flags = "" if device == pick_device("auto") else f" --device {device}"
    if pick_dtype(dtype, device) != pick_dtype("auto", device):
        flags += f" --dtype {dtype_name(pick_dtype(dtype, device))}"
    return flags


def sampling_flags(g: GenerateConfig) -> str:
    """generate's options for the recipe's sampling settings where they differ from generate's defaults (the
    built-in [generate]): with them, generate draws the run's own first sample."""
    default = GenerateConfig()
    flags = [(f"--{name.replace('_', '-')}", getattr(g, name))
             for name in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
             if getattr(g, name) != getattr(default, name)]
    text = "".join(f" {flag} {'none' if value is None else value}" for flag, value in flags)
    # --stop=TEXT where TEXT starts with "-": argparse takes `--stop ---` for a flag without its value
    stops = [shell_quote("--stop=" + stop) if stop.startswith("-") else f"--stop {shell_quote(stop)}" for stop in g.stop]
    return text + "".join(f" {stop}" for stop in stops)


def where_and_next(recipe: Recipe, recipe_file: str, overrides: list[str]) -> str:
    """The closing lines of `tinygemma run`: where the run's files are, and the commands a user wants next."""
    out, q = Path(recipe.out), shell_quote
    run_dir = q(str(out))
    prompt = recipe.generate.prompts[0] if recipe.generate.prompts else "Once upon a time"
    # A longer run goes to a new directory: a finished run has taken its whole schedule, cooldown included, so it
    # cannot be stretched (a wsd run can be, with train --resume --max-steps, before its cooldown). The prepared
    # data is reused.
    longer = 4 * recipe.train.max_steps
    kept = [o for o in overrides if parse_override(o)[0] not in ("train.max_steps", "train.out")]
    rerun = " ".join(["tinygemma run", q(recipe_file), *(f"--set {q(o)}" for o in kept),
                      f"--set train.max_steps={longer}", f"--set {q(f'train.out={out}-{longer}')}"])
    return "\n".join([
        "\n--- where everything is",
        f"run directory  {run_dir}  (config.json, metrics.jsonl, checkpoints/)",
        f"loss curve     {q(str(out / 'loss.png'))}",
        f"report         {q(str(out / REPORT_NAME))}",
        *([f"TensorBoard    tensorboard --logdir {q(str(out / 'tb'))}"] if "tensorboard" in recipe.train.loggers
          else []),
        f"export         tinygemma export --ckpt {run_dir} --out {q(str(Path('hf') / out.name))}",
        "--- next",
        f"a story        tinygemma generate --ckpt {run_dir} --prompt {q(prompt)}"
        f"{sampling_flags(recipe.generate)}{place_flags(recipe)}",
        f"train longer   {rerun}",
    ])
