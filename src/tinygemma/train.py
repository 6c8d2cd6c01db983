"""Pre-training: the loop that `tinygemma train` and `tinygemma run` call.

`train()` tells the loop's story in one screen: set up, then for each optimizer step run the micro-steps, log,
evaluate, checkpoint. `Trainer` holds the run's state and does each of those things; the pieces it uses live
in their own modules: the runtime (runtime.py), the batches (data.py), the model's wrapping (parallelize.py),
validation (evaluation.py), run checkpoints (checkpoint.py) and the records (metrics.py).

A run directory holds
    config.json                    the resolved recipe (data, model, train, generate) and the run's shape
    metrics.jsonl                  one object per optimizer step and one per evaluation (appended at each flush)
    tb/                            TensorBoard event files (wandb/ and trackers.json too, with train.loggers = wandb)
    report.md                      the run in one page (recipe, machine, time, losses), rewritten at each checkpoint
    loss.png                       train and validation loss against tokens, redrawn at each evaluation
    checkpoints/step_000040/       model.safetensors, checkpoint.json, optimizer.safetensors, trainer_state.json
    checkpoints/last.json          {"dir": "step_000040", "step": 40, ...}: the checkpoint `--resume` continues
    checkpoints/best.json          the checkpoint with the lowest validation loss (what `tinygemma.load(RUN)` reads)

Crash safety: every file is written under a temporary name and renamed into place; a checkpoint is written
into a temporary directory, renamed to its step name, and only then named by last.json (an atomic rename too).
A `kill -9` at any moment leaves the previous checkpoint loadable. Nothing here unpickles: weights and
optimizer state are safetensors, the rest JSON. metrics.jsonl and the trackers' files are the exceptions to the
rename rule (they are appended to): a resumed run cuts metrics.jsonl back to the checkpoint (atomically) and
purges TensorBoard's events past it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tinygemma.checkpoint import (
    META_NAME,
    OPTIMIZER_NAME,
    STATE_NAME,
    TRAINER_STATE_FORMAT,
    WEIGHTS_NAME,
    check_fork_complete,
    checkpoint_pointer,
    checkpoint_tokenizer,
    forget_saved_models,
    fork_source,
    forked_run,
    last_checkpoint,
    load_optimizer,
    matches_spec,
    prune_checkpoints,
    read_checkpoint_meta,
    read_trainer_state,
    resolve_checkpoint,
    restore_best_pointer,
    rng_state,
    save_checkpoint,
    set_rng_state,
    stored_model_config,
    training_record,
)
from tinygemma.checkpoint import (
    load as load_checkpoint,
)
from tinygemma.config import (
    CHANGE_SETTINGS,
    ModelConfig,
    Recipe,
    TrainConfig,
    apply_overrides,
    check_block_size,
    checked_recipe,
    is_integer,
    parse_override,
    saved_train_settings,
    settings_changes,
)
from tinygemma.data import (
    Batches,
    check_windows,
    data_differences,
    is_prepared_dataset,
    micro_batch_sizes,
    open_prepared,
    process_share,
    requested_micro_batch_size,
    validation_starts,
)
from tinygemma.decode import forget_decode_plan
from tinygemma.devices import dtype_name, pick_device
from tinygemma.errors import UserError, describe, exit_status
from tinygemma.evaluation import evaluate_windows, perplexity_text
from tinygemma.files import (
    FolderLock,
    atomic_write_json,
    check_output_folder,
    check_unlocked,
    is_training_run,
    others_than,
    peek_json,
    read_json,
    read_safetensors,
    remove_temporaries,
    signals_held,
    write_errors,
)
from tinygemma.generate import generate_text, prompt_ids
from tinygemma.gguf_export import attention_scale_dim, llama_cpp_refusal
from tinygemma.hf import TOKENIZER_KEY, exported_record, hf_config, is_hf_export
from tinygemma.metrics import MetricsLog, log_line, peak_flops, plot_losses, read_records
from tinygemma.model import checked_state, model_state
from tinygemma.optim import (
    check_muon_rate,
    check_resume_schedule,
    configure_optimizer,
    cooldown_start,
    describe_optimizer,
    learning_rate,
    muon_iteration,
    set_learning_rates,
    taken_settings,
)
from tinygemma.parallelize import (
    check_choices_agree,
    check_compile,
    choose_attention_backend,
    choose_loss_head,
    compiles,
    describe_kv_layouts,
    grad_scaler,
    gradient_sync,
    init_model,
    kv_layouts,
    probe_micro_batch_size,
    wrap_model,
)
from tinygemma.profiling import PROFILE_FILES, StepProfiler, parse_profile_range
from tinygemma.report import EVAL_NAME, REPORT_NAME, environment, write_report
from tinygemma.runtime import all_reduce_sum, env_rank, env_world_size, raise_on_all_ranks, setup_runtime
from tinygemma.tokenizer import TOKENIZER_FILE, token_byte_lengths
from tinygemma.trackers import STATE_NAME as TRACKERS_STATE
from tinygemma.trackers import Trackers, require_loggers, train_scalars, val_scalars

# ------------------------------------------------------------------ the loop


# float16's loss scale below which a run stops, under either on_nonfinite: gradients that overflow even unscaled
# (DeepSpeed's min_loss_scale; GradScaler starts at 2**16 and halves at each overflow)
MIN_LOSS_SCALE = 1.0


class NonFiniteError(UserError):
    """A NaN or infinite loss or gradient norm (the run stops; the last good checkpoint stays as it was)."""


def train(recipe: Recipe, resume: bool = False, stop_at: int | None = None, quiet: bool = False,
          profile: str | None = None, resume_from: str | None = None) -> dict:
    """Train `recipe.model_config()` on the prepared data in `recipe.data.dir`, writing the run to `recipe.out`.

    `resume` continues from the run directory's last checkpoint (a fresh start if it has none). `stop_at`
    ends this invocation after that optimizer step, with a checkpoint, without changing the schedule (which
    always runs to `max_steps`). `profile` ("START:END") profiles those optimizer steps into RUN/profile/
    (profiling.py). `resume_from` (a run's checkpoint folder) first makes `recipe.out`, a new folder, the run of
    that checkpoint as it was then (checkpoint.fork_run), and resumes it. Returns a summary: final step, losses,
    best checkpoint. Under torchrun every process calls this; only rank 0 writes.
    """
    recipe = checked_recipe(recipe)
    check_train_arguments(resume, stop_at, profile)
    if resume_from is not None:
        if not isinstance(resume_from, (str, os.PathLike)) or not str(resume_from).strip():
            raise UserError(f"resume_from must name a run's checkpoint folder (RUN/checkpoints/step_NNNNNN), got "
                            f"{resume_from!r}")
        check_fork_processes(resume_from, recipe.out)
        with forked_run(resume_from, recipe.out):
            return train(recipe, True, stop_at, quiet, profile)
    run = Trainer(recipe, resume, stop_at, quiet, profile)  # data, start, runtime, model, optimizer, logs
    try:
        if run.start == 0 and run.end > 0:
            run.evaluate(0)
        for step in range(run.start, run.end):
            record = run.step(step)  # the passes' forward and backward, then one optimizer step (or a skip)
            evaluate, checkpoint, sample = run.due(step + 1)
            run.log(record, read=evaluate or checkpoint or sample)  # the device's figures are read before these
            if evaluate:
                run.evaluate(step + 1)  # every checkpoint has a validation loss, so best.json means something
            if sample:
                run.sample(step + 1)
            if checkpoint:
                run.checkpoint(step + 1)
        if run.rt.world_size > 1:
            dist.barrier()  # rank 0 has written the last checkpoint before anyone reads it
    except BaseException as e:  # the trackers record the run as failed (130: interrupted, as the shell says)
        run.close(exit_code=exit_status(e) if isinstance(e, KeyboardInterrupt) else 1)
        raise
    run.close(exit_code=0)
    return run.summary()


def check_run(recipe: Recipe, resume: bool = False, stop_at: int | None = None, profile: str | None = None) -> dict:
    """What train(recipe, resume, stop_at, profile) would do, found by its own start's checks (the data, the run
    folder and its checkpoint, the settings), without training, locking or writing anything: the model, and the
    steps this invocation would train, start to end; `warnings`: what its start would warn of (changed settings,
    checkpoints it would delete)."""
    recipe = checked_recipe(recipe)
    check_train_arguments(resume, stop_at, profile)
    run = Trainer(recipe, resume, stop_at, quiet=True, profile=profile, check_only=True)
    return {"model": run.model_config, "data_vocab_size": run.data.vocab_size, "start": run.start, "end": run.end,
            "warnings": run.warnings}


def saved_recipe(out, overrides: list[str] | tuple[str, ...] = ()) -> Recipe | None:
    """The recipe the run in `out` was last trained with, `overrides` (--set's KEY=VALUE items) applied: what
    `tinygemma train --resume --out RUN` continues, and `train(saved_recipe(RUN), resume=True)` from Python. The
    last checkpoint's recorded recipe decides, since config.json is the newest invocation's, which may have
    failed before writing any (a learning rate that diverged would otherwise come back with every resume), or be
    missing (a run's checkpoints/ copied alone); except in a --resume-from fork not yet trained, whose checkpoint
    is its source's copy: once an invocation of the fork has written its config.json (naming the fork's source),
    that holds the fork's own settings. None where `out` records no recipe."""
    if not isinstance(out, (str, os.PathLike)):
        raise UserError(f"saved_recipe takes a run's folder, got {out!r}")
    saved = Path(out) / "config.json"
    last = checkpoint_pointer(Path(out))
    resolved = read_json(saved, "run config") if saved.exists() else {}
    forks = pending_fork_settings(resolved, fork_source(last)) is not None  # (config.json read once)
    resolved.pop("run", None)
    recorded = peek_json(Path(out) / "checkpoints" / last["dir"] / STATE_NAME).get("config") if last else None
    recorded = recorded if isinstance(recorded, dict) and recorded and not forks else None
    if not (saved.exists() or recorded):
        return None
    if recorded:
        resolved = {**recorded, "model": resolved.get("model", recorded.get("model"))}  # (the same model)
    if isinstance(resolved.get("train", {}), dict):  # else from_dict says what is wrong with it
        resolved["train"] = saved_train_settings(resolved.get("train", {}))
    # The saved layer_types follow the run's n_layers and sliding_window_pattern: with either of those set to
    # another value they would refuse the count ("layer_types has 6 entries for 4 layers"), a setting the user
    # never gave; derived again, the checkpoint's comparison says what the resume would change.
    given = dict(parse_override(item) for item in overrides)
    model = resolved.get("model") if isinstance(resolved.get("model"), dict) else {}
    if "model.layer_types" not in given and any(
            f"model.{name}" in given and given[f"model.{name}"] != str(model.get(name))
            for name in ("n_layers", "sliding_window_pattern")):
        model.pop("layer_types", None)
    # The folder given, not the one its records name (a run moved, or copied to branch it, would resume another)
    recipe = apply_overrides(Recipe.from_dict(resolved, source=str(saved)), [f"train.out={out}", *overrides])
    had = model.get("preset")
    # Every saved model field is an override: another preset would change nothing but the run's label.
    if had is not None and recipe.model_preset != had:
        raise UserError(f"{out} holds a run of model preset {had}; a resume continues its model, so the preset "
                        f"cannot become {recipe.model_preset} (start a new run in another --out, train.out)")
    return recipe


class Trainer:
    """The state of one run and the steps of its loop; see `train` for the order they run in."""

    def __init__(self, recipe: Recipe, resume: bool, stop_at: int | None, quiet: bool, profile: str | None = None,
                 check_only: bool = False):
        """`check_only`: the start's checks and no more (check_run's): no lock, weights, runtime or file."""
        self.recipe, self.cfg, self.quiet = recipe, recipe.train, quiet
        require_loggers(self.cfg.loggers)  # a tracker not installed stops every process here, before any work
        self.run_dir, self.data_dir = check_run_out(recipe.out), Path(recipe.data.dir)
        # Process 0 writes the run: it holds the run folder's lock from before it reads a checkpoint (a folder made
        # now is locked once open_logs makes it); a second writer is refused in one line.
        self.lock = FolderLock(self.run_dir, "a run") if env_rank() == 0 and not check_only else None
        if check_only and env_rank() == 0 and is_training_run(self.run_dir):
            check_unlocked(self.run_dir, "a run")  # (probed read-only: the lock file is never written)
        try:
            self.start_run(recipe, resume, stop_at, profile, check_only)
        except BaseException:
            self.unlock()
            raise

    def start_run(self, recipe: Recipe, resume: bool, stop_at: int | None, profile: str | None,
                  check_only: bool = False) -> None:
        """The data, the start (a checkpoint or none), the settings' checks, the runtime, then build()."""
        if self.lock and is_training_run(self.run_dir):  # other folders are refused below, or locked once a run
            self.lock.acquire()
        self.data = open_prepared(self.data_dir)
        self.train_tokens, self.val_tokens = self.data.split("train"), self.data.split("val")
        last = last_checkpoint(self.run_dir)
        self.last_seen = (last or {}).get("step")  # (open_logs checks it again once it holds the folder's lock)
        ckpt_dir, state = find_start(self.run_dir, last, resume, self.data, self.data_dir)
        self.forked_from = fork_source(last)  # (this invocation's part of the run names it)
        self.model_config = run_model_config(recipe, self.data, self.run_dir, last)
        self.start = state.get("step", 0)
        saved_train = state.get("config", {}).get("train")  # the run's [train] settings, as it last ran
        # A --stop-at the run has passed trains nothing (the notebook's loop of chunks, run again, does that)
        self.end = max(self.start, min(self.cfg.max_steps, stop_at)) if stop_at is not None else self.cfg.max_steps
        # Under torchrun every process says a refusal of these, before any process group exists: one that only some
        # meet (a node with other data) must not go unsaid, nor one said by a process 0 torchrun stops first.
        check_shapes(self.cfg, self.model_config, self.data_dir, self.train_tokens, self.val_tokens)
        check_resume_schedule(saved_train, self.cfg, self.start)
        fork_settings = (pending_fork_settings(peek_json(self.run_dir / "config.json"), self.forked_from)
                         if self.forked_from else None)  # (config.json read only for a fork not yet trained)
        changed = check_resume_settings(saved_train, self.cfg, self.start, stop_at, bool(self.forked_from),
                                        fork_settings)
        self.profile_steps = check_profile_range(profile, self.start, self.end, self.cfg) if profile else None
        self.generate = recipe.generate
        if not state or self.cfg.sample_interval or state.get("config", {}).get("generate") != dataclasses.asdict(
                recipe.generate):  # new to the run (recorded for its samples and model card), or sampled now
            check_generate_settings(recipe, self.model_config, self.data.tokenizer())
        self.micro_batch_size = requested_micro_batch_size(self.cfg, env_world_size(), pick_device(self.cfg.device).type)
        check_muon_rate(self.cfg, self.model_config)
        # Checkpoints kept: an invocation that trains nothing (a finished run, run again) deletes none the run kept
        kept, keep = (saved_train or {}).get("keep_checkpoints", 1), self.cfg.keep_checkpoints
        self.start_keep = keep if self.start < self.end else max(kept, keep)
        # (said by process 0 alone: the others need not each read the run's whole metrics.jsonl)
        older = check_logged_schedule(self.run_dir, saved_train, self.start) if env_rank() == 0 else None
        unexportable = not_exportable(self.model_config) if self.start == 0 else []
        self.warnings = [warning for warning in (older, changed, *unexportable) if warning]
        if self.start_keep < kept:
            self.warnings.append(f"keep_checkpoints {kept} -> {keep}: the run's checkpoints past the newest {keep} "
                                 "(and the best) are deleted now")
        # The checkpoint train.init_from resolved to when the run started (a run folder's best moves on): recorded
        # in config.json and each checkpoint's state, for the report and its Reproduce command.
        initial = ckpt_dir is None and self.cfg.init_from
        self.init_record = (initial_checkpoint(self.cfg.init_from, self.model_config, self.data) if initial
                            else state.get("init_checkpoint"))
        if initial:
            self.warnings += filter(None, [repeated_windows(self.init_record, self.cfg, self.data)])
        if check_only:
            check_resumed_files(ckpt_dir, self.model_config)
            return
        weights = (initial_weights(self.cfg.init_from, self.init_record, self.model_config) if initial
                   else resumed_weights(ckpt_dir, self.model_config))
        self.best_val, self.best_step = state.get("best_val_loss", float("inf")), state.get("best_step")
        self.skipped, self.elapsed = state.get("skipped_steps", 0), state.get("elapsed_s", 0.0)
        # The run's earlier invocations (machine, time, settings changed), for the report; this one joins them.
        self.history = earlier_invocations(state)
        self.changes = settings_changes(saved_train, self.cfg, CHANGE_SETTINGS, env_world_size())
        self.start_elapsed = self.elapsed
        self.train_loss = self.last_val = None
        self.pending: list[dict] = []  # step records whose loss and gradient norm are still on the device
        self.window = [0, 0.0]  # tokens and seconds of the steps since the last log line (for its rate)
        self.first_step_s = 0.0  # this invocation's first step's host time (compilation), kept out of the window
        self.after_first_step = 0.0  # when that first step ended
        self.log_file = self.writer = self.progress = self.profiler = None
        self.rt = setup_runtime(self.cfg.device, self.cfg.dtype)
        self.caller_random = random_state(self.rt)  # (the run seeds torch's generator: a notebook gets its own back)
        for warning in self.warnings if self.rt.is_main else ():
            print(f"tinygemma: warning: {warning}", file=sys.stderr, flush=True)
        was, now = state.get("precision"), dtype_name(self.rt.dtype)
        same_setting = (saved_train or {}).get("dtype") == self.cfg.dtype  # (else named among `changed`)
        if was and was != now and same_setting and self.start < self.end and self.rt.is_main:
            print(f"tinygemma: warning: resuming in {now} (dtype {self.cfg.dtype} on {self.rt.device.type}), where "
                  f"the steps before it computed in {was}; the steps from here compute in {now}",
                  file=sys.stderr, flush=True)
        try:
            self.build(ckpt_dir, state, weights)
        except BaseException:
            self.close(exit_code=1)  # the process group and the logs, when setup fails once they exist
            raise

    def build(self, ckpt_dir: Path | None, state: dict, weights: dict | None) -> None:
        """On the runtime: the model, optimizer, scaler, batches and logs, restored from the checkpoint if any."""
        cfg, rt = self.cfg, self.rt
        self.fsdp = rt.world_size > 1 and cfg.distributed == "fsdp"
        self.uncompiled_why = check_compile(cfg, rt)  # (a Pascal GPU: what asks torch.compile is refused)
        # (chosen once: flash's choice probes its kernel, and under torchrun gathers every process's verdict)
        self.attention = choose_attention_backend(cfg, self.model_config, rt)  # (backend, why), for the log too
        self.raw = init_model(self.model_config, cfg, rt, weights, self.attention[0])
        if self.micro_batch_size is None:  # auto on CUDA: the largest that fits, before compiling
            sizes = micro_batch_sizes(process_share(cfg, rt.world_size))
            self.micro_batch_size = probe_micro_batch_size(self.raw, cfg, rt, sizes)
        self.model = wrap_model(self.raw, cfg, rt, self.micro_batch_size)
        self.optimizer = configure_optimizer(self.raw, cfg, rt)
        self.muon_iteration = muon_iteration(self.optimizer, self.fsdp)
        # (MuonAdamW's iteration: under FSDP2 each process keeps only its shard of what it computes, one copy)
        muon = self.muon_iteration if not self.fsdp else None
        check_choices_agree({"train.dtype": dtype_name(rt.dtype), **({"train.muon_backend": muon} if muon else {})}, rt)
        self.warn_muon_iteration()
        self.scaler = grad_scaler(rt, self.fsdp)
        self.loss_head = choose_loss_head(cfg, rt)[2]  # what init_model set, and why, for the log
        if ckpt_dir is not None:
            load_optimizer(ckpt_dir / OPTIMIZER_NAME, self.raw, self.optimizer)
            if state.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"], ckpt_dir / STATE_NAME)

        self.batches = Batches(self.train_tokens, cfg, rt, self.micro_batch_size, self.model_config.vocab_size)
        # eval_batches global batches: the same windows whatever the split into micro-steps and processes.
        self.val_starts = validation_starts(len(self.val_tokens), cfg.block_size,
                                            cfg.eval_batches * self.batches.global_batch)
        # Every process checks every validation window once, not only its share: all refuse a bad id together
        check_windows(self.val_tokens, self.val_starts, cfg.block_size, self.model_config.vocab_size)
        vocab = self.model_config.vocab_size
        self.token_bytes = torch.from_numpy(token_byte_lengths(self.data.tokenizer(), vocab)).to(rt.device)
        self.tokens_per_step = self.batches.global_batch * cfg.block_size
        self.flops_per_token, self.peak = self.model_config.flops_per_token(cfg.block_size), peak_flops(rt.device)
        self.machine = environment(rt.device, rt.world_size)  # hardware, software, commit: config.json's, each part's
        self.tokenizer = {**self.data.meta["tokenizer"], "eot_id": self.data.eot_id}
        self.open_logs_on_rank_0()
        self.next_batch = self.batches.get(self.start, 0) if self.start < self.end else None
        if self.profile_steps and rt.is_main:
            self.profiler = StepProfiler(*self.profile_steps, self.run_dir / "profile", rt.device)
        self.raw.train()

    def warn_muon_iteration(self) -> None:
        """A resume whose Muon iteration is not the one the run's last steps took, its setting unchanged (auto, on
        a machine that chooses another: float32 on a CPU without AVX-512 BF16, bfloat16 with it), as a resume in
        another precision warns: the steps from here round otherwise."""
        was = self.history[-1].get("muon_backend") if self.history else None
        now, changed = self.muon_iteration, "muon_backend" in self.changes
        if was and now and was != now and not changed and self.start < self.end and self.rt.is_main:
            print(f"tinygemma: warning: resuming with Muon's {now} iteration (muon_backend {self.cfg.muon_backend} "
                  f"on {self.rt.device.type}), where the steps before it took the {was} one; the steps from here "
                  f"round otherwise", file=sys.stderr, flush=True)

    @property
    def probed(self) -> bool:
        """Whether micro_batch_size was probed (auto on CUDA) rather than given or kept at batch_size."""
        return self.cfg.micro_batch_size == "auto" and self.rt.is_cuda

    @functools.cached_property
    def recipe_made_data(self) -> bool:
        """Whether the recipe's [data] would prepare the data this run trains on (as `tinygemma run` did); asked
        once, by the process that writes config.json and the checkpoints' state."""
        try:
            return not data_differences(self.recipe.data, self.data)
        except UserError:  # its tokenizer.json is gone
            return False

    def recorded_recipe(self) -> dict:
        """The recipe as config.json and each checkpoint record it: `train --data DIR` keeps only data.dir, since
        the recipe's other [data] fields (its defaults, or a recipe file's unused section) say nothing true of the
        data, and a Reproduce command built from them would prepare other data."""
        recipe = self.recipe.to_dict()
        if not self.recipe_made_data:
            recipe["data"] = {"dir": self.recipe.data.dir}
        return recipe

    def open_logs_on_rank_0(self) -> None:
        """open_logs on process 0 alone; its failure ends every process (else the others wait at the first
        collective until its timeout): a refusal (another command wrote into the folder meanwhile) as bad input,
        else as the machine's failure, process 0's own error (a bug's, with its traceback) printed once."""
        refusal, kind, failure = None, UserError, None
        if self.rt.is_main:
            try:
                self.open_logs()
            except Exception as e:
                if self.rt.world_size == 1:
                    raise
                refusal, kind = str(e) or type(e).__name__, UserError if isinstance(e, UserError) else OSError
                failure = None if isinstance(e, (UserError, OSError)) else e
        try:
            raise_on_all_ranks(refusal, self.rt, kind=kind)
        except OSError:
            if failure is not None:  # (process 0: its own error, not the one it shared)
                raise failure from None
            raise

    def open_logs(self) -> None:
        """config.json, metrics.jsonl (cut back to the checkpoint), the trackers, and the progress bar or header."""
        cfg, run_dir, start = self.cfg, self.run_dir, self.start
        made = not run_dir.exists()
        with write_errors(run_dir):  # (a read-only disk: one line naming the folder)
            run_dir.mkdir(parents=True, exist_ok=True)
        if self.lock:
            self.lock.acquire()  # a run started in a new (or empty) folder: locked now that it becomes one
            if not is_training_run(run_dir):  # and checked again: another command may have written it meanwhile
                check_run_out(str(run_dir))
            elif (last_checkpoint(run_dir) or {}).get("step") != self.last_seen:  # (a run into a new folder twice)
                raise UserError(f"another command wrote a run into {run_dir} while this one started (its last "
                                "checkpoint is not the one this one started from): nothing was written; run this "
                                "again to resume from it (--resume), or choose another folder")
        remove_temporaries(run_dir, RUN_FILES)  # left by writes a kill interrupted (a lost process, a Ctrl-C)
        remove_temporaries(run_dir / "profile", PROFILE_FILES)
        if (run_dir / "checkpoints").exists():
            restore_best_pointer(run_dir / "checkpoints", self.best_step, self.best_val)
            prune_checkpoints(run_dir / "checkpoints", self.start_keep, self.keep_before)
        resolved = self.resolved_config()
        # Nothing to train (a finished run, run again): config.json keeps the settings its steps were trained with.
        # A fork not yet trained has no steps of its own: it takes this invocation's, for its --resume.
        pending = self.forked_from and start < cfg.max_steps  # (a fork of a finished run can train no step)
        kept = peek_json(run_dir / "config.json") if start >= self.end and not pending else {}
        # The trackers first: one that cannot start stops the run before config.json is written, and a folder
        # made for the run goes again (it held only the trackers' first files).
        try:
            self.writer = Trackers(cfg.loggers, run_dir, kept or resolved, start)
        except BaseException:
            if made:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if not kept:
            atomic_write_json(run_dir / "config.json", resolved)
        metrics = run_dir / "metrics.jsonl"
        self.log_file = MetricsLog.resume(metrics, start) if start else MetricsLog(metrics)
        if start and self.log_file.records:  # what a kill cost the trackers; a plot that still showed lost work
            self.writer.backfill(self.log_file.records, start)
            self.plot()
        if start:  # and a report of an older checkpoint, a kill having come between the last one and its report
            self.write_view("report.md", lambda: write_report(run_dir))
        if self.quiet:
            return
        self.say_start(resolved["run"]["compiled"])

    def resolved_config(self) -> dict:
        """What config.json records: the resolved recipe, the run's own model, and how this invocation runs it."""
        cfg, rt = self.cfg, self.rt
        resolved = self.recorded_recipe()
        resolved["model"] = {"preset": self.recipe.model_preset, **self.model_config.to_dict()}
        resolved["run"] = {**({"init_checkpoint": self.init_record} if self.init_record else {}),
                           "world_size": rt.world_size, "device": str(rt.device), "dtype": dtype_name(rt.dtype),
                           "global_batch": self.batches.global_batch, "tokens_per_step": self.tokens_per_step,
                           "micro_batch_size": self.micro_batch_size, "passes_per_step": self.batches.micro_steps,
                           "parameters": self.model_config.num_params(), "tokenizer": self.tokenizer,
                           **({"forked_from": self.forked_from} if self.forked_from else {}),  # (saved_recipe)
                           "attention_backend": self.attention[0], "kv_layout": kv_layouts(self.raw),
                           "loss_head": self.loss_head, "muon_backend": self.muon_iteration,
                           "compiled": compiles(cfg, rt),
                           "data_source": self.data.meta.get("source"),
                           "data_blake2b": {split: self.data.digest(split) for split in ("train", "val")},
                           "val_text_blake2b": self.data.text_digest(),
                           "data_documents": {split: self.data.meta["splits"][split].get("documents")
                                              for split in ("train", "val")},
                           **self.machine}
        return resolved

    def say_start(self, compiled: bool) -> None:
        """The first log line (what trains, how, on what), and the progress bar on a terminal."""
        cfg, rt, start = self.cfg, self.rt, self.start
        total = cfg.max_steps * self.tokens_per_step  # (a small run's 40,960 read "0.0M")
        initial = f"weights from {self.init_record['dir']}; " if self.init_record and start == 0 else ""
        compiling = "each layer (regional)" if cfg.compile == "regional" else "the model (a minute or more)"
        steps = (f"steps {start} to {self.end} of {cfg.max_steps}" if self.end > start
                 else f"no step (the run has finished: step {start} of {cfg.max_steps})" if start >= cfg.max_steps
                 else f"no step (the run is at step {start} of {cfg.max_steps}, which --stop-at does not pass)")
        print(f"training {self.model_config.num_params():,} parameters on {rt.world_size} x {rt.device} in "
              f"{dtype_name(rt.dtype)}: {self.tokens_per_step:,} tokens per step, {steps} ({f'{total / 1e6:,.1f}M' if total >= 1e6 else f'{total:,}'} tokens in all) in "
              f"{self.batches.micro_steps} pass(es) of {self.micro_batch_size} sequences per process"
              f"{' (micro_batch_size auto: the largest whose eager pass fits this GPU)' if self.probed else ''}; "
              f"{describe_optimizer(self.optimizer, self.fsdp)}, {cfg.lr_schedule} schedule; "
              f"{initial}"
              f"sliding-window attention: {self.attention[0]} ({self.attention[1]})"
              f"{describe_kv_layouts(kv_layouts(self.raw))}; loss head {self.loss_head}"
              f"{'; torch.compile: the first step compiles ' + compiling if compiled else ''}"
              f"{'; not compiled: ' + self.uncompiled_why if self.uncompiled_why and cfg.compile == 'auto' else ''}",
              flush=True)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.progress = tqdm(total=cfg.max_steps, initial=start, unit="step", dynamic_ncols=True)

    def step(self, step: int) -> dict:
        """One optimizer step: the passes' forward and backward, clipping, and the update (or a skip).

        Nothing here waits for the device: the loss, the gradient norm and whether both are finite stay tensors
        in the record, so the host queues the next step while the GPU works. `read` brings them back at log
        intervals and before any evaluation or checkpoint, and stops the run there if a step was not finite
        (on_nonfinite = "stop"). Only under "skip" is the flag read at once, to withhold that step's update; and
        under float16 the scaler's step reads whether the gradients overflowed, except with fused AdamW, which
        takes that flag on the device."""
        cfg, rt, optimizer, scaler = self.cfg, self.rt, self.optimizer, self.scaler
        t0 = time.perf_counter()  # the profiler's waits and writing count as the step's: the log's rate is wall-clock
        if self.profiler:
            self.profiler.begin(step)
        rates = set_learning_rates(optimizer, step, cfg)
        loss_sum = torch.zeros((), device=rt.device)
        x, y = self.next_batch
        passes = self.batches.micro_steps  # this process's share of the global batch, micro_batch_size at a time
        for micro in range(passes):
            last_micro = micro == passes - 1
            with gradient_sync(self.model, last_micro):
                with rt.autocast():
                    loss = self.model(x, y)
                # Fetch the next micro-batch now, so its copy overlaps this backward pass.
                if not last_micro:
                    x, y = self.batches.get(step, micro + 1)
                elif step + 1 < self.end:
                    self.next_batch = self.batches.get(step + 1, 0)
                loss_sum += loss.detach()
                scaler.scale(loss / passes).backward()  # DDP/FSDP average the processes' gradients
        loss = all_reduce_sum(loss_sum / passes, rt) / rt.world_size
        # float16 under "skip": a loss that is not finite (the forward pass overflowed) is no overflow of the scaled
        # gradients, and leaves the scale as it is; unscale_ would count it as one and update() halve the scale, a
        # run of such steps leaving gradients too small for float16 for thousands of steps. (The skip's own read.)
        forward_failed = scaler.is_enabled() and cfg.on_nonfinite == "skip" and not torch.isfinite(loss).item()
        if forward_failed:
            grad_norm = torch.full((), math.nan, device=rt.device)
        else:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(),
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        # fp16's scaler expects an occasional overflow and skips that step itself; anything else is divergence.
        finite = torch.isfinite(loss) if scaler.is_enabled() else torch.isfinite(loss) & torch.isfinite(grad_norm)
        record = {"step": step + 1, "train_loss": loss, **rates, "grad_norm": grad_norm,
                  "tokens": (step + 1) * self.tokens_per_step, "finite": finite}
        # (skip's one synchronisation a step: under float16 the loss's, read above)
        if forward_failed or cfg.on_nonfinite == "skip" and not scaler.is_enabled() and not finite.item():
            record["skipped"] = True  # numbered in read(), in step order with float16's overflows
        else:
            scaler.step(optimizer)  # under "stop" a non-finite step is caught at the next read, before any save
        if not forward_failed:
            scaler.update()  # also after a gradient's skip: unscale_ has run, and the fp16 scale backs off
        optimizer.zero_grad(set_to_none=True)
        if self.profiler:
            self.profiler.end(step)
        step_time = time.perf_counter() - t0
        self.elapsed += step_time
        if step == self.start:  # left out of the log line's rate (compilation), unless a line has nothing else
            self.first_step_s = step_time
            self.after_first_step = time.perf_counter()  # the ETA's clock
        else:
            self.window = [self.window[0] + self.tokens_per_step, self.window[1] + step_time]
        return record

    def due(self, done: int) -> tuple[bool, bool, bool]:
        """(evaluate, checkpoint, sample) after optimizer step `done`: evaluations at every eval_interval, at
        checkpoints and at the end of the schedule; checkpoints at every checkpoint_interval and at this
        invocation's end; samples at every sample_interval."""
        cfg = self.cfg
        checkpoint = done == self.end or bool(cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0)
        evaluate = done == cfg.max_steps or checkpoint or bool(cfg.eval_interval and done % cfg.eval_interval == 0)
        return evaluate, checkpoint, bool(cfg.sample_interval and done % cfg.sample_interval == 0)

    def read(self) -> tuple[list[dict], dict | None]:
        """The pending records, with their loss, gradient norm and finiteness brought from the device in one
        transfer (the one synchronisation: the host waits here for the queued steps, and that wait is training
        time, in the log line's rate and in elapsed_s). Returns them, cut after the first non-finite step under
        on_nonfinite = "stop" (what came after it is lost work), and that step, or None."""
        pending, self.pending = self.pending, []
        if not pending:
            return [], None
        started = time.perf_counter()
        values = torch.stack([torch.stack([r["train_loss"].float(), r["grad_norm"].float(), r["finite"].float()])
                              for r in pending]).tolist()
        waited = time.perf_counter() - started
        self.elapsed += waited
        self.window[1] += waited
        for record, (loss, norm, _) in zip(pending, values):
            record.update(train_loss=loss, grad_norm=norm)
            del record["finite"]
            if self.scaler.is_enabled() and math.isfinite(loss) and not math.isfinite(norm):
                # float16: the scaler skipped the update of this overflowed step and lowered its scale
                record.update(skipped=True, overflow=True)
            if record.get("skipped"):
                self.skipped += 1
                record["skipped_steps"] = self.skipped
        self.train_loss = pending[-1]["train_loss"]
        stop = self.cfg.on_nonfinite == "stop"
        first_bad = next((i for i, v in enumerate(values) if not v[2]), None) if stop else None
        if first_bad is None and any(r.get("overflow") for r in pending):
            # float16: gradients that overflow whatever the scale would be skipped for ever, the scale halving to
            # zero (where, under "skip", the next finite step's unscaled gradients are NaN); below MIN_LOSS_SCALE
            # they exceed float16 at their true size: the run has diverged, whatever on_nonfinite says
            scale = self.scaler.get_scale()
            if scale < MIN_LOSS_SCALE:
                first_bad = max(i for i, r in enumerate(pending) if r.get("overflow"))
                pending[first_bad]["loss_scale"] = scale
        if first_bad is None:
            return pending, None
        pending[first_bad]["nonfinite"] = True
        return pending[: first_bad + 1], pending[first_bad]

    def record(self, records: list[dict], bad: dict | None) -> None:
        """The read records into metrics.jsonl and the trackers (rank 0); then stop at a non-finite step."""
        if self.rt.is_main:
            for record in records:
                self.log_file.append(record)
                self.writer.log(train_scalars(record), record["step"])
        if bad is not None:
            self.refuse(bad)

    def refuse(self, record: dict) -> None:
        """Stop the run at the non-finite step `record`; its last good checkpoint stays as it was."""
        if self.rt.is_main:
            self.log_file.flush()
        loss, norm = record["train_loss"], record["grad_norm"]
        first_val = self.last_val["val_loss"] if self.last_val is not None else 0.0
        if record["step"] == 1 and not math.isfinite(first_val):
            made = (f"the weights of train.init_from ({self.init_record['dir']})" if self.init_record else
                    "its settings (model.init_std, model.query_pre_attn_scalar, model.rms_norm_eps, ...)")
            raise NonFiniteError(f"non-finite loss before any update (step 0's validation loss {first_val}, step 1's "
                                 f"loss {loss}): the model overflows as it starts, whatever the learning rate; look "
                                 f"at {made} and the training dtype ({dtype_name(self.rt.dtype)})")
        if "loss_scale" in record:
            raise NonFiniteError(f"float16 gradients overflowed at every loss scale tried, which fell to "
                                 f"{record['loss_scale']:g} (step {record['step']}, loss {loss}); stopped without "
                                 f"saving{self.last_good()}. Lower train.learning_rate, or train in bfloat16 or "
                                 "float32 (train.dtype)")
        raise NonFiniteError(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step "
                             f"{record['step']} (loss {loss}, gradient norm {norm}); stopped without saving"
                             f"{self.last_good()}. Lower train.learning_rate, or pass --set on_nonfinite=skip to "
                             "skip such steps" + ("; a float16 forward pass can also overflow (float16 stops at "
                                                  "65,504): train.dtype = float32 (or bfloat16, where the GPU has "
                                                  "it) avoids that" if self.rt.dtype == torch.float16 else ""))

    def last_good(self) -> str:
        """"; the last good checkpoint is step N", or nothing: the same words from every process, each of which
        says a non-finite stop under torchrun (process 1's left the checkpoint out)."""
        previous = checkpoint_pointer(self.run_dir)
        return f"; the last good checkpoint is step {previous['step']}" if previous else ""

    def mfu(self, rate: float) -> float:
        """Model FLOPs utilization at `rate` tokens/s over all processes' peak."""
        return self.flops_per_token * rate / (self.peak * self.rt.world_size)

    def log(self, record: dict, read: bool = False) -> None:
        """Queue the step's record. Every log_interval steps and at this invocation's end, read the queued records
        (`read` reads them anyway: before an evaluation or a checkpoint), give this step's record the interval's
        rate, MFU and peak memory, write them, and show a log line (on stdout, above the progress bar on a
        terminal: `| tee train.log` keeps every line)."""
        self.pending.append(record)
        if self.progress:
            self.progress.update(1)
        done = record["step"]
        line_due = done % self.cfg.log_interval == 0 or done == self.end
        if not (line_due or read):
            return
        records, bad = self.read()
        rate = self.interval_rate(record) if line_due else None
        self.record(records, bad)
        if not (line_due and self.rt.is_main):
            return
        self.log_file.flush()
        if self.progress:
            self.progress.set_postfix_str(f"loss {record['train_loss']:.4f} | {rate:,.0f} tok/s")
        if not self.quiet:  # above the bar on a terminal: the bar has no room for lr, grad norm or MFU
            self.say(log_line(record, self.cfg.max_steps, rate, self.eta(done, rate), record.get("mfu")))

    def eta(self, done: int, rate: float) -> float:
        """Seconds until this invocation's last step (its end: --stop-at's, not the schedule's): the steps left at
        the wall-clock time each has taken since the first (compiling) one, evaluations, samples and checkpoints
        included; before a second step, at the interval's rate."""
        after_first = done - self.start - 1
        if after_first > 0:
            per_step = (time.perf_counter() - self.after_first_step) / after_first
        else:
            per_step = self.tokens_per_step / rate
        return (self.end - done) * per_step

    def interval_rate(self, record: dict) -> float:
        """The log interval's tokens over its wall-clock time (its steps and the wait at its reads; not this
        invocation's first step, which compiles, unless the interval holds no other), into `record` with its MFU,
        the run's training time so far (all invocations' steps and reads, not evaluations or checkpoints: loss
        against time, across runs) and, on CUDA, the peak memory so far. A single step's host time says nothing
        on a GPU: the host does not wait for it."""
        tokens, seconds = self.window
        rate = tokens / seconds if tokens else self.tokens_per_step / (self.first_step_s + seconds)
        self.window = [0, 0.0]
        record["tokens_per_s"] = rate
        record["elapsed_s"] = self.elapsed  # the run's training time so far, as trainer_state.json's
        if self.peak:
            record["mfu"] = self.mfu(rate)
        if self.rt.is_cuda:
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**30
        return rate

    def evaluate(self, step: int) -> dict:
        """Validation loss, perplexity and bits per byte at `step`, recorded and plotted."""
        result = evaluate_windows(self.raw, self.val_tokens, self.val_starts, self.token_bytes,
                                  self.micro_batch_size, self.cfg.block_size, self.rt)
        self.last_val = result
        if self.rt.is_main:
            self.log_file.append({"step": step, "tokens": step * self.tokens_per_step, **result})
            self.log_file.flush()
            self.writer.log(val_scalars(result), step)
            self.writer.flush()
            self.plot()
            if not self.quiet:
                self.say(f"step {step}: val loss {result['val_loss']:.4f} | ppl {perplexity_text(result['val_ppl'])} | "
                         f"bpb {result['val_bpb']:.4f}")
        return result

    def sample(self, step: int) -> None:
        """[generate]'s prompts continued by the model at `step` (process 0), prompt i from seed + i as `run`'s
        samples, printed and kept in metrics.jsonl. Their own generators leave the training's random state as it
        was; the decoding's time is outside the steps' rate. Decoded eagerly: under compile = regional the
        layers' compiled code would otherwise trace the decoding's shapes too (new graphs, compiled at the first
        sample, for a few stories), as the whole model's compiled forward never sees them."""
        if not self.rt.is_main:
            return
        g, tokenizer = self.generate, self.data.tokenizer()
        if not g.prompts:  # (generate.prompts= : none)
            return
        try:
            with self.rt.autocast(), torch.compiler.set_stance("force_eager"):
                texts = [prompt + generate_text(self.raw, tokenizer, prompt, g.max_new_tokens, seed=g.seed + i,
                                                cuda_graph=False, context=self.cfg.block_size, **g.sampling())[0][0]
                         for i, prompt in enumerate(g.prompts)]
        finally:
            forget_decode_plan(self.raw)  # its copy of the weights, stale at the next step, not kept through them
        self.log_file.append({"step": step, "tokens": step * self.tokens_per_step, "samples": texts})
        self.log_file.flush()
        self.writer.samples(texts, step)
        self.writer.flush()
        if not self.quiet:
            for i, text in enumerate(texts):
                self.say(f"step {step} sample {i + 1}: {text}")

    def invocation(self, step: int) -> dict:
        """This invocation's part of the run up to `step`: its steps, time, machine, software, commit and
        precision, its FLOPs and the peak FLOPs its time allowed (None where the peak is unknown), and the settings
        it changed."""
        seconds, rt = self.elapsed - self.start_elapsed, self.rt
        return {"steps": [self.start, step], "elapsed_s": seconds, "hardware": self.machine["hardware"],
                "software": self.machine["software"], "commit": self.machine["commit"],
                "world_size": rt.world_size, "precision": dtype_name(rt.dtype), "muon_backend": self.muon_iteration,
                "flops": (step - self.start) * self.tokens_per_step * self.flops_per_token,
                "peak_flop_s": seconds * self.peak * rt.world_size if self.peak else None,
                "changed": self.changes, **({"forked_from": self.forked_from} if self.forked_from else {})}

    def checkpoint(self, step: int) -> None:
        """Weights, optimizer, and everything exact resume needs, as checkpoints/step_NNNNNN (every rank calls)."""
        cfg, val_loss = self.cfg, self.last_val["val_loss"]
        if not math.isfinite(val_loss):  # finite losses and norms, then an update that broke the weights
            raise NonFiniteError(f"non-finite validation loss at step {step} ({val_loss}); stopped without saving"
                                 f"{self.last_good()}. Lower train.learning_rate")
        is_best = val_loss < self.best_val
        if is_best:
            self.best_val, self.best_step = val_loss, step
        state = {
            "format": TRAINER_STATE_FORMAT, "step": step, "tokens": step * self.tokens_per_step,
            "best_val_loss": self.best_val, "best_step": self.best_step, "skipped_steps": self.skipped,
            "elapsed_s": self.elapsed,
            "data": {"sampler": "random windows, a pure function of (seed, step)", "seed": cfg.seed,
                     "next_step": step, "global_batch": self.batches.global_batch, "block_size": cfg.block_size,
                     "train_tokens": len(self.train_tokens), "val_tokens": len(self.val_tokens),
                     **{f"{split}_blake2b": digest for split in ("train", "val")
                        if (digest := self.data.digest(split))}},
            "rng": rng_state(), "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "precision": dtype_name(self.rt.dtype),  # what dtype resolved to (auto: by device), for a resume's warning
            "config": self.recorded_recipe(),
            "config_data": "as trained",  # its [data] is data.dir alone where the recipe did not make the data
            "invocations": [*self.history, self.invocation(step)],
            **({"init_checkpoint": self.init_record} if self.init_record else {}),
        }
        meta = {"tokenizer": self.tokenizer, "step": step, "train": dataclasses.asdict(cfg)}
        save_checkpoint(self.run_dir, step, self.raw, self.optimizer, state, meta, self.data.tokenizer(), val_loss,
                        is_best, self.rt, self.fsdp, cfg.keep_checkpoints, self.keep_before)
        if self.rt.is_main:
            self.write_view("report.md", lambda: write_report(self.run_dir))

    def plot(self) -> None:
        self.write_view("loss.png", lambda: plot_losses(self.log_file.records, self.run_dir / "loss.png"))

    @staticmethod
    def write_view(name: str, write) -> None:
        """Write a view of the run's records (report.md, loss.png): a convenience that never stops training, nor
        leaves ranks waiting (on Windows, an image viewer holding loss.png refuses its replacement)."""
        try:
            write()
        except Exception as e:
            print(f"tinygemma: warning: {name} not written ({describe(e)}); training goes on", file=sys.stderr,
                  flush=True)

    def say(self, text: str) -> None:
        if self.progress:
            self.progress.write(text)
        else:
            print(text, flush=True)

    def close(self, exit_code: int) -> None:
        """Stop the profiler, progress bar and trackers (told the run's `exit_code`), let go of the model and the
        run folder's lock, and undo the runtime's settings (the process group this run started, TF32)."""
        failing = True
        try:
            if self.profiler:
                self.profiler.abandon()  # a run stopped inside the profiled steps
            if self.progress:
                self.progress.close()
            if self.writer:
                self.writer.close(exit_code)  # a tracker's upload: a second Ctrl-C may land here
            self.release()
            failing = False
        finally:
            self.unlock()  # else the notebook's next train() of this run is refused until the kernel restarts
            if getattr(self, "caller_random", None):
                restore_random_state(self.caller_random, self.rt)
            try:  # (also after a Ctrl-C held through release: a notebook's TF32 and device restored)
                self.rt.close()
            except RuntimeError:  # (a CUDA or NCCL error raised again: not in place of what is under way)
                if not failing:
                    raise

    def unlock(self) -> None:
        if self.lock:  # a start that failed early leaves the folder as it was, for prepare or export
            self.lock.release(remove=self.lock.fd is not None and not is_training_run(self.run_dir))

    @property
    def keep_before(self) -> int | None:
        """A wsd run that keeps several checkpoints also keeps its last before the cooldown, which it extends from
        (prune_checkpoints): by start_keep, so that a finished run run again with fewer deletes none of them."""
        return cooldown_start(self.cfg) if self.cfg.lr_schedule == "wsd" and self.start_keep > 1 else None

    def release(self) -> None:
        """Let the model, its wrappers, the optimizer and the batch go now, not whenever the garbage collector finds
        this run (libraries' caught exceptions keep frames that hold it in reference cycles). DDP's reducer and
        FSDP's parameters hold the process group: freed at interpreter shutdown instead, gloo's worker threads can
        no longer take the GIL and the process aborts ("terminate called without an active exception") after a
        finished run. In a notebook, the GPU's memory comes back when train() returns, also to other processes
        (a `!tinygemma run` cell after it): the caching allocator's reserve is emptied."""
        self.model = self.raw = self.optimizer = self.scaler = self.next_batch = None
        forget_saved_models()
        with signals_held():  # a Ctrl-C (a notebook's Stop) landing in a weakref callback would be dropped there
            gc.collect()
            if self.rt.is_cuda:
                with contextlib.suppress(RuntimeError):  # (a CUDA error that ended the run is raised again here)
                    torch.cuda.empty_cache()

    def summary(self) -> dict:
        final, best = checkpoint_pointer(self.run_dir), checkpoint_pointer(self.run_dir, "best")
        step = final["step"] if final else self.start
        val = self.last_val if self.last_val is not None and self.end > self.start else None
        return {
            "run_dir": str(self.run_dir), "step": step, "max_steps": self.cfg.max_steps,
            "tokens": step * self.tokens_per_step, "train_loss": self.train_loss,
            "val_loss": val["val_loss"] if val else None, "val_bpb": val["val_bpb"] if val else None,
            "best_val_loss": best["val_loss"] if best else None, "best_step": best["step"] if best else None,
            "checkpoint": str(self.run_dir / "checkpoints" / final["dir"]) if final else None,
            "skipped_steps": self.skipped, "elapsed_s": self.elapsed,
        }


def earlier_invocations(state: dict) -> list[dict]:
    """The invocations a checkpoint's state records; a checkpoint written before they were recorded stands for
    one whose machine is unknown."""
    if isinstance(state.get("invocations"), list):
        return state["invocations"]
    step = state.get("step", 0)
    return [{"steps": [0, step], "elapsed_s": state.get("elapsed_s", 0.0), "hardware": None, "precision": None,
             "flops": None, "peak_flop_s": None, "changed": {}}] if step else []


def check_profile_range(spec: str, start: int, end: int, cfg: TrainConfig) -> tuple[int, int]:
    """--profile's steps, which must lie among the steps this invocation trains (start + 1 to end), with no
    evaluation, checkpoint or sample between them (its time and operators would be counted as the steps')."""
    first, last = parse_profile_range(spec)
    if start >= end:
        raise UserError(f"--profile {spec}: this invocation trains no step (the run is at step {start} and "
                        + (f"its schedule ends there, max_steps {cfg.max_steps})" if start >= cfg.max_steps else
                           "--stop-at is not past that step)") + "; profile a run with steps to train")
    if first <= start or last > end:
        raise UserError(f"--profile {spec}: this invocation trains optimizer steps {start + 1} to {end}; profile "
                        "steps among those (past the first few, once compilation is done)")
    for done in range(first, last):
        for name, setting in (("an evaluation", "eval_interval"), ("a checkpoint", "checkpoint_interval"),
                              ("a sample", "sample_interval")):
            interval = getattr(cfg, setting)
            if interval and done % interval == 0:
                raise UserError(f"--profile {spec}: {name} comes after step {done} (train.{setting} {interval}), "
                                "inside the profiled steps, and its time would be counted as theirs; profile steps "
                                "between two of them")
    return first, last


def check_run_out(out: str, flag: str = "--out") -> Path:
    """The run directory, refused in one line unless training may write there: a new or empty folder, or a
    training run (its own, continued or started again after a crash before its first checkpoint). A transformers
    export, a prepared dataset or any other folder would lose its config.json, report.md or loss.png."""
    path = check_output_folder(out, "the run", flag)  # (never inside a run's checkpoints/)
    if not path.exists():
        return path
    if is_training_run(path) or not others_than(path, EARLY_RUN_FILES, {"config.json"}):
        return path
    what = ("a prepared dataset" if is_prepared_dataset(path) else "a Hugging Face export" if is_hf_export(path)
            else "a folder that holds no training run")
    raise UserError(f"{flag} {path} is {what}; training would write its config.json, report.md and logs into it. "
                    "Choose a new folder for the run")


# What training writes into a run folder before its config.json (which makes it a run: is_training_run): the
# trackers' files. A folder holding only these, or temporaries a kill left of them and of config.json, is a run
# whose start failed (a tracker that could not start, a full disk), and training may start in it again.
EARLY_RUN_FILES = frozenset({"tb", "wandb", TRACKERS_STATE})  # (and tinygemma's lock file: others_than)
# The files a run's folder holds that are written whole and renamed into place (train, run and eval).
RUN_FILES = frozenset({"config.json", "metrics.jsonl", "loss.png", REPORT_NAME, EVAL_NAME, TRACKERS_STATE})


def check_fork_processes(checkpoint, out, first: str | None = None) -> None:
    """A fork is made by one process, before any trains it. `first`: the command that makes it, as the user gave
    theirs with --stop-at 1 (the command line's own arguments: its settings are the fork's, which it records)."""
    if env_world_size() > 1:
        command = first or f"tinygemma train --resume-from {checkpoint} --out {out} --stop-at 1"
        settings = "" if first else " with the fork's settings"
        error = UserError(f"--resume-from (resume_from) makes the run's folder in one process: run `{command}`"
                          f"{settings} first (it trains nothing, and records its settings), then torchrun with "
                          "--resume")
        error.shown_by_rank_0 = env_rank() != 0  # said once, not once a process
        raise error


def check_train_arguments(resume: bool, stop_at: int | None, profile: str | None) -> None:
    """train()'s own arguments beside the recipe, which a notebook passes untyped. --stop-at names an optimizer
    step: 1 or more (one the run has already passed trains nothing)."""
    if not isinstance(resume, bool):
        raise UserError(f"--resume (resume) must be True or False, got {resume!r}")
    if stop_at is not None and not (is_integer(stop_at) and stop_at >= 1):
        raise UserError(f"--stop-at (stop_at) must be an optimizer step of 1 or more, got {stop_at!r}")
    if profile is not None and not (isinstance(profile, str) and profile.strip()):  # ("": an unset shell variable)
        raise UserError(f"--profile (profile) must be text such as \"20:25\" (START:END), got {profile!r}")


def check_generate_settings(recipe: Recipe, model_config: ModelConfig, tokenizer) -> None:
    """[generate] as `run` checks it, before training: its settings, and its prompts in the data's tokens (each
    must encode to some; read at most the training block, any length fits the model's positions). train.sample_interval
    samples them with the whole model on process 0, which FSDP shards."""
    sampling = recipe.train.sample_interval
    if sampling and recipe.train.distributed == "fsdp" and env_world_size() > 1:
        raise UserError("train.sample_interval samples the whole model on process 0, which FSDP shards over the "
                        "processes: sample after training (tinygemma generate), or train with distributed = ddp")
    recipe.check_generate()
    for prompt in recipe.generate.prompts:
        try:
            prompt_ids(model_config, tokenizer, prompt, recipe.generate.max_new_tokens, recipe.train.block_size)
        except UserError as e:
            why = " (train.sample_interval samples them)" if sampling else ""
            raise UserError(f"generate.prompts{why}: {e}") from None


def check_same_data(ckpt_dir: Path, state: dict, data, data_dir: Path) -> None:
    """A resumed run continues on the data it was trained on. Another tokenizer's ids would teach the model a
    second meaning for each (the vocabulary sizes can agree, e.g. two BPEs of 4,096); other tokens with the same
    tokenizer (another data.dir, the folder prepared again with another limit) would change every window still to
    come and the validation set that best.json compares, so resume would no longer be exact. The token counts
    and the digests prepare recorded tell them apart (what was written before they were recorded is not checked)."""
    own = checkpoint_tokenizer(ckpt_dir)
    trained, now = own.identity, data.tokenizer().identity
    before = (state.get("config") or {}).get("data", {}).get("dir")
    elsewhere = f" (on {before})" if before and Path(before) != data_dir else ""
    if trained != now:
        name = "gpt2" if trained == "gpt2" else str(getattr(own, "path", None) or ckpt_dir / TOKENIZER_FILE)
        raise UserError(f"{data_dir} was prepared with tokenizer {now}, but the run was trained with {trained}"
                        + elsewhere + "; resume it on data prepared with its own tokenizer (its stories prepared "
                        f"again into a new folder with `tinygemma prepare --tokenizer {shlex.quote(name)}`, then "
                        "--data that folder), or start a new run with another --out (train.out)")
    saved = state.get("data") or {}
    counts = {split: len(data.split(split)) for split in ("train", "val")}
    moved = [f"{split} {saved[f'{split}_tokens']:,} -> {n:,} tokens" for split, n in counts.items()
             if f"{split}_tokens" in saved and saved[f"{split}_tokens"] != n]
    moved += [f"{split}: as many tokens, but other ones" for split in counts if not moved
              and saved.get(f"{split}_blake2b") and data.digest(split) not in (None, saved[f"{split}_blake2b"])]
    if moved:
        raise UserError(f"{data_dir} holds other data than the run was trained on{elsewhere} ({', '.join(moved)}): "
                        "resume it on its own data (the same data.dir, prepared as before), or start a new run with "
                        "another --out (train.out)")


def batch_stream(train: dict) -> dict:
    """What a run's batches are, in [train] settings: random windows of block_size tokens, a global batch
    (batch_size x grad_accum_steps) of them a step, drawn from (seed, step); its token counts follow from them."""
    return {"block_size": train["block_size"], "seed": train["seed"],
            "global batch": train["batch_size"] * train["grad_accum_steps"]}


def pending_fork_settings(config: dict, forked_from: dict | None) -> dict | None:
    """The [train] settings a fork not yet trained (its last checkpoint the copy of `forked_from`) recorded in
    `config` (its config.json) for the --resume that trains it, where an invocation of the fork wrote it (naming
    that source): not the source's copy. Else None."""
    run, train = config.get("run"), config.get("train")
    ours = forked_from and isinstance(run, dict) and run.get("forked_from") == forked_from and isinstance(train, dict)
    return saved_train_settings(train) if ours else None


def named_changes(saved: dict, cfg: TrainConfig, length: bool) -> list[str]:
    """settings_changes as "name was -> now", with max_steps first where `length` (a fork's own length; a run's is
    the schedule's check)."""
    changed = [f"{name} {was} -> {now}" for name, (was, now) in settings_changes(saved, cfg).items()]
    return ([f"max_steps {saved.get('max_steps')} -> {cfg.max_steps}"] if length and saved.get("max_steps") !=
            cfg.max_steps else []) + changed


def check_resume_settings(saved: dict | None, cfg: TrainConfig, step: int, stop_at: int | None,
                          forked: bool = False, pending: dict | None = None) -> str | None:
    """Refuse a resume that changes the run's batches (its windows and token counts would no longer be one run's;
    the micro-batch split and the process count may change, they change no number). Returns a warning naming
    the settings that change the steps still to come, or that change nothing when this invocation trains no step
    (the run finished, or --stop-at is behind it), unless the run is a fork not yet trained (`forked`): its
    settings are recorded for the --resume that trains it, which is warned where it trains with others
    (`pending`: those recorded; a --config file given to that --resume replaces them). Else None. The schedule's
    own settings and the optimizer are check_resume_schedule's."""
    if not saved:
        return None
    saved, current = saved_train_settings(saved), dataclasses.asdict(cfg)
    was, now = batch_stream({**current, **saved}), batch_stream(current)
    moved = [f"{name} {was[name]} -> {now[name]}" for name in was if was[name] != now[name]]
    if moved:
        raise UserError(f"the run's batches cannot change on resume ({', '.join(moved)}; the global batch is "
                        "batch_size x grad_accum_steps): resume with the run's own settings, or start a new run "
                        "with another --out (train.out)")
    if saved.get("init_from") != cfg.init_from:  # (a run from before the setting started from random weights)
        raise UserError(f"train.init_from cannot change on resume ({saved.get('init_from') or 'none'} -> "
                        f"{cfg.init_from or 'none'}): it only says where a new run's weights come from, and "
                        "this run's own checkpoints hold its weights now; resume with the run's own value, or start "
                        "a new run with another --out (train.out)")
    trains = step < cfg.max_steps and (stop_at is None or stop_at > step)
    replaced = named_changes(pending, cfg, True) if pending is not None and trains else []
    if replaced:
        return (f"resuming the fork at step {step} with settings other than those it recorded when it was made: "
                f"{', '.join(replaced)}; the steps from here take this invocation's (a --config file given to "
                "--resume replaces the fork's: leave it out to train with them)")
    if pending is not None and trains:  # the fork's own, as recorded (their change from its source said then)
        return None
    changed = named_changes(saved, cfg, forked)
    if not changed:
        return None
    if not trains:  # nothing is trained now: the run (and
        # its config.json) keeps the values its steps had
        why = "no step is left to train" if step >= cfg.max_steps else f"--stop-at (stop_at) {stop_at} trains no step"
        if forked and step < cfg.max_steps:  # (the torchrun fork: made in one process, trained by the --resume)
            return (f"the fork is at step {step} of {cfg.max_steps} with settings other than its source's: "
                    f"{', '.join(changed)}; {why} now: its config.json records them, and --resume trains with them")
        return (f"the run is at step {step} of {cfg.max_steps} with settings other than its own: "
                f"{', '.join(changed)}; {why}, so they change nothing")
    later = ("; best.json will compare validation losses of other windows than the earlier ones"
             if any(c.startswith("eval_batches ") for c in changed) else "")
    return (f"resuming at step {step} with settings other than the run's: {', '.join(changed)}; the steps from "
            f"here take the new values{later}")


def check_logged_schedule(run_dir: Path, saved: dict | None, step: int) -> str | None:
    """A warning where the learning rate logged at the resumed checkpoint's step (metrics.jsonl) is not the one
    this tinygemma's schedule gives there with the settings that step was trained with: a run trained by a
    tinygemma from before 2026-12-03, whose cosine decay and wsd cooldown ran one step earlier (no checkpoint
    records which schedule it took). Its steps from here take this version's rates. None where the rate is this
    version's, or not logged."""
    if not saved or step == 0:
        return None
    record = next((r for r in reversed(read_records(run_dir / "metrics.jsonl"))
                   if r["step"] == step and isinstance(r.get("lr"), float)), None)
    if record is None:
        return None
    try:
        planned = taken_settings(saved)
    except (UserError, TypeError):  # (settings this version refuses are refused with their own words elsewhere)
        return None
    expected = learning_rate(step - 1, planned)
    if math.isclose(record["lr"], expected, rel_tol=1e-9):
        return None
    return (f"the learning rate logged at step {step} ({record['lr']:.6g}) is not the one this tinygemma's schedule "
            f"gives there ({expected:.6g}): an older tinygemma trained the run (before 2026-12-03 the decay ran one "
            "step earlier); the steps from here take this version's rates, so the run is neither version's "
            "uninterrupted run (resume it with the tinygemma that trained it for that)")


def not_exportable(config: ModelConfig) -> list[str]:
    """Said as a run starts (and by its dry run), not only by an export at its end: a model transformers refuses
    (hf_config's reasons: a d_model that n_heads does not divide, say), or one llama.cpp cannot run (a head_dim
    set without the query_pre_attn_scalar the preset pairs with it)."""
    why = llama_cpp_refusal(config)
    try:
        hf_config(config)
        warnings = []
    except UserError as e:
        warnings = [f"{e} (`tinygemma export` refuses it once it is trained"
                    + ("" if why else "; its --format gguf takes it") + ")"]
    if why:
        fix = (f"; set model.query_pre_attn_scalar={attention_scale_dim(config)} for one it can"
               if config.query_pre_attn_scalar != attention_scale_dim(config) else "")
        takes = "" if warnings else " (the transformers export takes it)"
        warnings.append(f"{why}, so `tinygemma export --format gguf` will refuse it{takes}{fix}")
    return warnings


def check_shapes(cfg: TrainConfig, model_config: ModelConfig, data_dir: Path, train_tokens, val_tokens) -> None:
    check_block_size(cfg.block_size, model_config)  # the run's own model (a resumed run's saved one)
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) < cfg.block_size + 1:
            raise UserError(f"the {split} split of {data_dir} holds {len(tokens):,} tokens, fewer than one "
                            f"window of block_size + 1 = {cfg.block_size + 1}")


def run_model_config(recipe: Recipe, data, run_dir: Path, last: dict | None) -> ModelConfig:
    """The recipe's model for this data (PreparedData). Unless the recipe says otherwise, the vocabulary is
    padded to a multiple of 128 on CUDA (tensor-core-friendly matrix shapes; no logit changes, the export drops
    it), and a resumed run keeps the padding it was trained with."""
    config = recipe.model_config(data.vocab_size, data.tokenizer().model_vocab_size)
    if "vocab_pad_multiple" in recipe.model_overrides:
        return config
    if last is not None:
        saved = read_json(run_dir / "checkpoints" / last["dir"] / META_NAME, "checkpoint metadata")["model"]
        pad = saved.get("vocab_pad_multiple", 1)
    else:
        pad = 128 if pick_device(recipe.train.device).type == "cuda" else 1
    return dataclasses.replace(config, vocab_pad_multiple=pad)


def find_start(run_dir: Path, last: dict | None, resume: bool, data, data_dir: Path) -> tuple[Path | None, dict]:
    """(checkpoint directory, trainer state) of the run's last checkpoint, or (None, {}) for a fresh run. A run
    that exists is only continued with `resume`, and only on data it may continue on (check_same_data), checked
    before the model is built: other data's vocabulary makes the model differ too (a run's saved vocab_size
    cannot hold a larger one's tokens), and the data is what to name then."""
    check_fork_complete(run_dir)
    if last and not resume:
        raise UserError(f"{run_dir} already holds a run (last checkpoint: {last['dir']}); pass --resume "
                        "(resume=True from Python) to continue it, or choose another --out (train.out)")
    if last is None:
        return None, {}
    ckpt_dir = run_dir / "checkpoints" / last["dir"]
    state = read_trainer_state(ckpt_dir, last["step"])
    check_same_data(ckpt_dir, state, data, data_dir)
    return ckpt_dir, state


# Model settings whose value only initialises weights, or pads the vocabulary: init_from's weights replace them.
INITIAL_ONLY = ("init_std", "vocab_pad_multiple")


def init_checkpoint(source: str) -> Path:
    """The checkpoint directory train.init_from names, or a UserError naming the setting."""
    try:
        return resolve_checkpoint(source)
    except UserError as e:
        raise UserError(f"train.init_from {source}: {e}") from None


def check_initial_model(source: str, have: ModelConfig, want: ModelConfig) -> None:
    """train.init_from's model `have` must be the configured one, `want`, but for INITIAL_ONLY (a fine-tune of
    google/gemma-3-270m configures the gemma3-270m preset): refused otherwise, naming the settings to give."""
    have_d, want_d = have.to_dict(), want.to_dict()
    differ = [name for name in want_d if name not in INITIAL_ONLY and have_d.get(name) != want_d[name]]
    if "layer_types" in differ and dataclasses.replace(have, layer_types=None) == have:
        differ.remove("layer_types")  # its pattern and layer count say them: the settings to give are those
    if "sliding_window_pattern" in differ and have.layer_types == want.layer_types:
        differ.remove("sliding_window_pattern")  # (the pattern an export writes for fewer layers than it: no change)
    if differ:
        sets = " ".join(f"--set model.{name}={','.join(have_d[name]) if name == 'layer_types' else have_d[name]}"
                        for name in differ)
        raise UserError(f"train.init_from {source} holds another model than the configured one ("
                        + ", ".join(f"{name} {have_d[name]} where the recipe has {want_d[name]}" for name in differ)
                        + f"): configure its model: {sets}")


def check_initial_tokenizer(source: str, directory: Path, ours) -> None:
    """train.init_from's checkpoint (`directory`) must have been trained with the data's tokenizer, `ours`: other
    ids would mean other text to its weights."""
    where = f"train.init_from {source}"
    if not read_checkpoint_meta(directory).get("tokenizer") and not (directory / TOKENIZER_FILE).exists():
        recorded = exported_record(directory, TOKENIZER_KEY)  # an export's, its tokenizer.json gone
        if recorded:
            if not matches_spec(ours, recorded):
                raise UserError(f"{where} was trained with another tokenizer than the data's ({ours.identity}), "
                                "by its model.safetensors: its token ids would mean other text; prepare the data "
                                "with its tokenizer")
            return
        raise UserError(f"{where} records no tokenizer and holds no {TOKENIZER_FILE}, so nothing says which token "
                        f"ids its weights learnt: copy the {TOKENIZER_FILE} they were trained with into {directory}")
    try:
        theirs = checkpoint_tokenizer(directory)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if theirs.identity != ours.identity:
        raise UserError(f"{where} was trained with tokenizer {theirs.identity}, but the data is tokenized with "
                        f"{ours.identity}: its token ids would mean other text; prepare the data with its tokenizer")


def initial_checkpoint(source: str, model_config: ModelConfig, data) -> dict:
    """{"dir", "step"} of the checkpoint train.init_from names: a run (its best checkpoint, else its last), a
    checkpoint, or a transformers Gemma 3 folder. Its tokenizer must be the data's (its ids would mean other
    text), and its model the configured one (check_initial_model): from its files, before any weight is read."""
    directory = init_checkpoint(source)
    meta = read_checkpoint_meta(directory)
    check_initial_tokenizer(source, directory, data.tokenizer())
    check_initial_model(source, stored_model_config(directory), model_config)
    return {"dir": str(directory.resolve()), "step": meta.get("step")}


def initial_weights(source: str, record: dict, model_config: ModelConfig) -> dict:
    """The weights of train.init_from's checkpoint (`record`, initial_checkpoint's) as the configured model
    takes them."""
    where = f"train.init_from {source}"
    model = load_checkpoint(Path(record["dir"]))
    state = model_state(model)
    broken = next((name for name, tensor in state.items() if not torch.isfinite(tensor).all()), None)
    if broken:  # (it would stop at the first step, blaming the learning rate)
        raise UserError(f"{where}: its {broken} holds NaN or inf; start from finite weights")
    for name in ("embed_tokens.weight", "lm_head.weight"):  # its vocabulary padding, if any, goes
        if name in state:
            state[name] = state[name][:model.config.vocab_size]
    return checked_state(model_config, state, where)


def random_state(rt) -> tuple:
    """The generators a run sets (torch's, on the host and the run's GPU; numpy's and Python's, on resume), as
    the caller had them."""
    return (torch.get_rng_state(), torch.cuda.get_rng_state(rt.device) if rt.is_cuda else None,
            np.random.get_state(), random.getstate())


def restore_random_state(saved: tuple, rt) -> None:
    cpu, cuda, numpy_state, python_state = saved
    torch.set_rng_state(cpu)
    if cuda is not None:
        with contextlib.suppress(RuntimeError):  # (a CUDA error that ended the run is raised again here)
            torch.cuda.set_rng_state(cuda, rt.device)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


def repeated_windows(record: dict, cfg: TrainConfig, data) -> str | None:
    """The warning for train.init_from weights that trained on this data with this seed: windows are a pure
    function of (seed, step), so the new run's first steps draw the very windows its weights learned first."""
    trained = training_record(Path(record["dir"]))
    step, digest = trained.get("step"), data.digest("train")
    if not (is_integer(step) and step > 0 and trained.get("seed") == cfg.seed and digest
            and trained.get("train_blake2b") == digest):
        return None
    return (f"train.init_from: its weights trained {step:,} steps on this data with seed {cfg.seed}, and windows "
            f"depend on the seed and step alone: this run's steps 1 to {min(step, cfg.max_steps):,} draw the windows "
            "those weights learned first, again. Set another train.seed for other windows, or continue that run "
            "with --resume-from (its optimizer and schedule too)")


def resumed_weights(ckpt_dir: Path | None, model_config: ModelConfig) -> dict | None:
    """The weights of the checkpoint a run resumes from, which must be the configured model's; None for a fresh
    run."""
    if ckpt_dir is None:
        return None
    check_resumed_model(ckpt_dir, model_config)
    weights = checked_state(model_config, read_safetensors(ckpt_dir / WEIGHTS_NAME), str(ckpt_dir))
    # Training never saves non-finite weights (a non-finite step is never checkpointed): these were damaged since,
    # and resumed would stop the run at its first step as a divergence of this checkpoint's "last good" weights.
    damaged = next((name for name, tensor in weights.items() if not torch.isfinite(tensor).all()), None)
    if damaged:
        raise UserError(f"{ckpt_dir / WEIGHTS_NAME} holds non-finite values ({damaged}): a damaged or hand-edited "
                        "checkpoint; resume from another (--resume-from RUN/checkpoints/step_NNNNNN --out NEW)")
    return weights


def check_resumed_files(ckpt_dir: Path | None, model_config: ModelConfig) -> None:
    """What the dry run checks of the checkpoint a run resumes from: its model the configured one, its files whole
    and its weights the model's, from their headers alone."""
    check_resumed_model(ckpt_dir, model_config)
    if ckpt_dir is not None:
        checked_state(model_config, read_safetensors(ckpt_dir / WEIGHTS_NAME, header_only=True), str(ckpt_dir))
        read_safetensors(ckpt_dir / OPTIMIZER_NAME, header_only=True)


def check_resumed_model(ckpt_dir: Path | None, model_config: ModelConfig) -> None:
    """Refuse a resume whose configured model is not the checkpoint's (recorded in its checkpoint.json)."""
    if ckpt_dir is None:
        return
    saved = read_json(ckpt_dir / META_NAME, "checkpoint metadata")["model"]
    if saved != model_config.to_dict():
        changed = sorted(k for k in saved if saved[k] != model_config.to_dict().get(k))
        raise UserError(f"the model of {ckpt_dir} differs from the configured one in {', '.join(changed)}; "
                        "resume with the run's own model settings")
