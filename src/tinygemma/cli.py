"""The `tinygemma` command: one sub-command per pipeline stage, and the one place that knows argparse.

Each `add_*` function declares a sub-command and the function it runs; the stages themselves live in their
modules (prepare in data.py, train in train.py, run in pipeline.py, ...). `main` turns `UserError` (bad input)
into one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import signal
import sys
import time
from pathlib import Path

# Only modules without torch here: torch takes a second or two to import, which `tinygemma --help` and a
# mistyped option did not need. Each command imports what it runs.
from tinygemma.config import (
    DEFAULT_BPE_VOCAB_SIZE,
    DEFAULT_GGUF_DTYPE,
    DEFAULT_VAL_FRACTION,
    GGUF_DTYPES,
    HUB_DATASET,
    SPLITS,
    DataConfig,
    GenerateConfig,
    Recipe,
    check_sampling,
    load_recipe,
    parse_override,
)
from tinygemma.errors import (
    UserError,
    describe,
    exit_status,
    interrupt,
    interrupt_safe,
    says_stops,
    shell_join,
    shell_quote,
    stop_word,
    under_torchrun,
)
from tinygemma.files import peek_json, signal_handler, signals_held
from tinygemma.tokenizer import EOT_TOKEN, TOKENIZER_FILE, encode_stories, token_byte_lengths


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusal of the command line (a missing or ill-typed argument) is one line, as
    every other refusal here, rather than the usage block and then the error. A misspelled option is named as
    such by the subcommand's parser, also where argparse would first call a required one missing (`--promt`
    for `--prompt`)."""

    def parse_known_args(self, args=None, namespace=None):
        self.given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        unknown = self.unknown_options()
        if message.startswith("the following arguments are required") and unknown:
            message = f"unrecognized arguments: {' '.join(unknown)}"
        message += self.dash_text_hint(message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def dash_text_hint(self, message: str) -> str:
        """For an option whose text begins with "-" (`--prompt "-Hello," said Tom`), which argparse reads as an
        option and calls missing: how to give it."""
        missing = re.fullmatch(r"argument (?:\S+/)?(--\S+): expected one argument", message)
        given = getattr(self, "given", [])
        for arg, text in zip(given, given[1:]):  # (not where it is an option: `--out --resume` lacks a value)
            if missing and arg == missing.group(1) and text.startswith("-") and (
                    text in ("-", "--") or not self.names_option(text)):
                return f"; a text that begins with '-' goes after '=': {arg}={shell_quote(text)}"
        return ""

    def unknown_options(self) -> list[str]:
        """The items given that argparse reads as options (not "-", a negative number, text with a space, or
        anything after "--") and that are none of this parser's, nor an abbreviation of one."""
        given = getattr(self, "given", [])
        given = given[:given.index("--")] if "--" in given else given
        return [arg for arg in given if arg.startswith("-") and arg != "-" and " " not in arg
                and not re.fullmatch(r"-\d+|-\d*\.\d+", arg)
                and not self.names_option(arg)]

    def names_option(self, arg: str) -> bool:
        """Whether `arg` (--name or --name=value) is one of this parser's options, or an abbreviation of one."""
        return any(option.startswith(arg.split("=", 1)[0]) for option in self._option_string_actions)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(  # its subcommands' parsers are of its class
        prog="tinygemma",
        description="Pre-train Gemma 3 270M from scratch on TinyStories.",
    )
    parser.add_argument("--version", action="version", version=f"tinygemma {installed_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add in (add_prepare, add_train, add_run, add_generate, add_eval, add_export, add_compare):  # --help's order
        add(subparsers)
    parser.commands = subparsers.choices  # (a command's own parser refuses what it does not take)
    return parser


def installed_version() -> str:
    """The installed package's version (pyproject.toml's), as pip knows it."""
    import importlib.metadata

    try:
        return importlib.metadata.version("tinygemma")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree (PYTHONPATH=src) without installing
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given (a command to repeat names them)
    if args.command == "generate" and not args.prompts:  # (either of two options: argparse's required takes one;
        # before the unknown ones, as argparse's own: its parser then names a misspelled option as such)
        parser.commands["generate"].error("the following arguments are required: --prompt (or --prompt-file)")
    if unknown:
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        # Text stdout's encoding lacks (a story's é or emoji on Windows redirected to a cp1252 file) is written as
        # "?", not a traceback in the middle of it; PYTHONUTF8=1 writes it all.
        sys.stdout.reconfigure(errors="replace")
    try:
        check_one_process(args.command)
        with interrupts_once():
            torch_loaded()
            result = args.func(args)
    except UserError as e:
        if not getattr(e, "shown_by_rank_0", False):  # under torchrun, an error every process shares prints once
            print(f"tinygemma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError as e:
        left = [stream for stream in (sys.stdout, sys.stderr) if _reader_left(stream)]
        if not left:  # another pipe or socket (a tracker's, a worker's): an error like any other
            print(f"tinygemma {args.command}: error: {e}", file=sys.stderr)
            return 1
        # The reader of stdout or stderr left (`tinygemma generate ... | head`): stop quietly, as `cat` does.
        null = os.open(os.devnull, os.O_WRONLY)
        for stream in left:  # no second error when Python flushes it
            os.dup2(null, stream.fileno())
        os.close(null)
        return 141  # 128 + SIGPIPE, what a shell reports for a program a closed pipe stopped
    except OSError as e:  # disk full, permission denied, ...: the user's environment, not a bug
        if not getattr(e, "shown_by_rank_0", False):
            print(f"tinygemma {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        return stop_said(e, args.command)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and under_torchrun() and PEER_LOST.search(str(e)):
            # Waiting in a collective when another process stopped (its own error, in one line, is above it):
            # gloo's and NCCL's tracebacks buried that line
            print(f"tinygemma {args.command}: error: another process of this torchrun job stopped or became "
                  f"unreachable (its own error, if it could say one, is above); stopping too "
                  f"({str(e).strip().splitlines()[0][:200]})", file=sys.stderr)
            return 1
        if not isinstance(e, MemoryError) and not OUT_OF_MEMORY.search(str(e)):
            if (stop := interrupt_within(e)) is None:  # (a bug: its traceback)
                raise
            return stop_said(stop, args.command)
        cause = (str(e).strip().splitlines() or ["MemoryError"])[0][:200]
        print(f"tinygemma {args.command}: error: out of memory ({cause}); {MEMORY_ADVICE.get(args.command, '')}"
              .rstrip("; "), file=sys.stderr)
        return 1
    except Exception as e:
        if (stop := interrupt_within(e)) is None:  # (a bug: its traceback)
            raise
        return stop_said(stop, args.command)
    return int(result or 0)


def interrupt_within(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM an error was raised from (its __cause__, or theirs): a library's wrapping of it (a
    class body's __set_name__ makes it a RuntimeError as torch.distributed loads); None for any other."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


def stop_said(stop: KeyboardInterrupt, command: str) -> int:
    """The interrupt's line (under torchrun, once a machine) and its exit status."""
    if says_stops():
        print(f"tinygemma {command}: {stop_word(stop)}", file=sys.stderr)
    return exit_status(stop)


def torch_loaded() -> None:
    """Import torch (every command uses it) with Ctrl-C and SIGTERM held until it has loaded, a second or two: a
    handler that raised inside one of the Python callbacks torch's C++ makes as it loads ended the process by C++'s
    terminate (SIGABRT and a stack dump; an interrupt fuzz saw it for 3 of about 100 signals at that moment).
    Only signals with a handler of Python's: SIGTERM's default under torchrun ends the process at once, as ever."""
    if "torch" not in sys.modules:
        with signals_held(tuple(s for s in (signal.SIGINT, signal.SIGTERM) if callable(signal.getsignal(s)))):
            import torch  # noqa: F401


def check_one_process(command: str) -> None:
    """Only train and run share their work among torchrun's processes: the other commands, started once per GPU,
    each did the whole of it on the first GPU, writing the same files at once."""
    try:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return  # (a stray WORLD_SIZE outside torchrun means nothing to these commands)
    if command not in ("train", "run") and under_torchrun() and processes > 1:
        error = UserError(f"{command} runs in one process, not one per GPU: run it without torchrun (train and run "
                          "are the commands that share their work among torchrun's processes)")
        error.shown_by_rank_0 = os.environ.get("RANK", "0") != "0"  # said once, not once a process
        raise error


@interrupt_safe
def interrupts_once():
    """While the command runs, SIGTERM raises Terminated (a KeyboardInterrupt), so that it cleans up as after
    Ctrl-C: it used to end the process at once, leaving a prepare's gigabytes of temporaries, an export's staging
    folder and the lock files. The first of either signal then holds both off, so that a second one (a Ctrl-C
    pressed twice) cannot cut the clean-up short: it left a prepare waiting forever on workers never told to stop.
    Not under torchrun, which ends its workers with SIGTERM and must not wait for them to leave a collective; nor
    outside the main thread, where no handler can be set."""
    if under_torchrun():
        yield
        return
    with signal_handler(interrupt):
        yield


# CUDA's "CUDA out of memory", the CPU allocator's "can't allocate memory", MPS's "MPS backend out of memory"
OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory", re.IGNORECASE)
# A collective's error when another process of the job is gone (gloo's, NCCL's)
PEER_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|remote process exited|"
                       r"NCCL communicator was aborted|Socket Timeout", re.IGNORECASE)
# How --set reads a list: a prompt containing a comma stays one prompt.
LIST_HELP = """a list as a,b or '["a", "b"]' (generate.prompts=TEXT is one prompt, commas and all; nothing after = is none)"""
TRAINING_MEMORY_ADVICE = ("set train.micro_batch_size lower (or to auto, on CUDA), or train.block_size, or choose a "
                          "smaller model")
MEMORY_ADVICE = {"generate": "ask for fewer --num-samples or --max-new-tokens", "eval": "use a smaller --batch-size",
                 "train": TRAINING_MEMORY_ADVICE, "run": TRAINING_MEMORY_ADVICE}


def _reader_left(stream) -> bool:
    """Whether the reader of `stream` (stdout, stderr) has gone: poll reports an error on a pipe's writing end, a
    hang-up on a socket (and on a pipe, on macOS)."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLERR | select.POLLHUP)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))  # a socket: HUP
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout is no file (captured)
        return False


# ------------------------------------------------------------------ prepare


def add_prepare(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="tokenize TinyStories into memory-mapped train.bin / val.bin")
    p.add_argument("--out", required=True, type=named, help="directory to write train.bin, val.bin, meta.json and (bpe or a tokenizer.json) tokenizer.json")
    p.add_argument("--source", action="extend", nargs="+", metavar="SRC", type=named,
                   help=f"training stories: .txt (stories separated by a line {EOT_TOKEN}), .jsonl/.json "
                        "(a text or story field), .parquet (a text column), or a datasets save_to_disk "
                        f"directory; several (a shell pattern: --source data/*.json) or repeated, read in the order "
                        f"given (default: {HUB_DATASET} from the Hugging Face hub)")
    p.add_argument("--val-source", action="extend", nargs="+", metavar="SRC", type=named,
                   help="validation stories, same formats")
    p.add_argument("--val-fraction", type=float, metavar="F",
                   help=f"set aside this fraction of whole training stories for validation (default "
                        f"{DEFAULT_VAL_FRACTION} when the source has no validation split)")
    p.add_argument("--tokenizer", default="gpt2", metavar="NAME", type=named,
                   help="gpt2 (default), bpe (trained on the training stories), or a path to a tokenizer.json")
    p.add_argument("--vocab-size", type=int, metavar="N",
                   help=f"vocabulary of --tokenizer bpe (default {DEFAULT_BPE_VOCAB_SIZE})")
    p.add_argument("--limit", type=int, metavar="N", help="keep only the first N training stories (quick runs)")
    p.add_argument("--workers", type=int, metavar="N", help="tokenizer processes (default: every core this process may use)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare_main)


def _prepare_main(args) -> int:
    from tinygemma.data import prepare

    started = time.perf_counter()
    meta = prepare(args.out, sources=args.source, val_sources=args.val_source, val_fraction=args.val_fraction,
                   tokenizer=args.tokenizer, vocab_size=args.vocab_size, limit=args.limit, workers=args.workers,
                   progress=not args.no_progress)
    for split in SPLITS:
        info = meta["splits"][split]
        print(f"{split}: {info['documents']:,} stories, {info['tokens']:,} tokens, {info['bytes']:,} bytes")
    print(f"wrote {args.out} ({meta['dtype']}, vocabulary {meta['vocab_size']:,}) in {time.perf_counter() - started:.1f} s")
    return 0


# ------------------------------------------------------------------ train


def add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="pre-train the model on prepared data (single process or torchrun)",
        description="Pre-train the model on prepared data. On several GPUs: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                    "torchrun --nproc-per-node N --max-restarts 3 -m tinygemma train --out RUN --resume ...: when a "
                    "process is lost, torchrun restarts them all, and --resume continues from the last checkpoint "
                    "(the first start, with no checkpoint yet, is a fresh run). The variable works around "
                    "pytorch/pytorch#135712, which can make a restart fail to connect.")
    p.add_argument("--data", type=named, help="prepared data directory (train.bin, val.bin, meta.json); default: the recipe's data.dir")
    p.add_argument("--out", type=named, help="run directory to write; default: the recipe's train.out")
    p.add_argument("--model", type=named, help="model preset (gemma3-270m, gemma3-270m-gpt2, gemma3-tiny); default: the recipe's")
    p.add_argument("--config", type=named, help="recipe file (TOML), e.g. configs/workshop.toml; default: the built-in recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting: train.FIELD=V (or just FIELD=V), model.FIELD=V, data.FIELD=V, "
                        "generate.FIELD=V (the samples of sample_interval); "
                        f"{LIST_HELP}; repeatable")
    p.add_argument("--max-steps", type=int, help="optimizer steps of the whole run (the schedule's length)")
    p.add_argument("--stop-at", type=int, help="end this invocation after this step, with a checkpoint; the schedule "
                   "still runs to max-steps (continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with "
                   "its saved recipe unless --config is given; a run with no checkpoint yet (or no run at all) "
                   "starts fresh, so the same command both starts a run and continues it after a crash")
    p.add_argument("--resume-from", type=named, metavar="CKPT",
                   help="continue a run from one of its checkpoints (RUN/checkpoints/step_NNNNNN, kept with "
                        "keep_checkpoints) in the new folder --out, exactly as it would have gone on from there, "
                        "leaving the run itself as it was: a wsd run extended from before its cooldown (--max-steps), "
                        "a branch with another learning rate")
    p.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    p.add_argument("--profile", metavar="START:END",
                   help="profile optimizer steps START to END with torch.profiler (on rank 0): RUN/profile/trace.json "
                        "(open in ui.perfetto.dev) and summary.txt (operators by device time on CUDA, CPU time "
                        "elsewhere); pick steps after the first few, which compile")
    p.set_defaults(func=_train_main)


def _train_main(args) -> int:
    from tinygemma.checkpoint import forked_run
    from tinygemma.train import check_fork_processes

    flags = {"model.preset": ("--model", args.model), "data.dir": ("--data", args.data),
             "train.out": ("--out", args.out), "train.max_steps": ("--max-steps", args.max_steps)}
    overrides = [f"{key}={value}" for key, (_, value) in flags.items() if value is not None]
    # The run folder, however it is given: --out, --set out= (as the run report spells it), or else the built-in
    # recipe's (a recipe file given by --config names its own, and --resume then follows the file).
    out, given = args.out or Recipe.out, args.out is not None
    for item in args.set:  # the same setting from a flag and from --set: which was meant is not ours to guess
        key, value = parse_override(item)
        if key in flags and flags[key][1] is not None:
            raise UserError(f"{flags[key][0]} and --set {item} both set {key}; give it once")
        if key == "train.out":
            out, given = value, True
    if not args.resume_from:
        return _train_run(args, out, overrides)
    if args.dry_run:  # (a fork is made before its recipe can be read)
        raise UserError(f"--dry-run does not fork a run: see what the fork would train with `tinygemma train --out "
                        f"SOURCE_RUN --resume --dry-run` and the settings you would give, SOURCE_RUN being the run "
                        f"{args.resume_from} belongs to")
    if not given:
        raise UserError("--resume-from continues a run in a new folder: name it with --out")
    # (under torchrun, the command that makes the fork first: the user's own, with their settings)
    check_fork_processes(args.resume_from, out, " ".join(["tinygemma", *map(shell_quote, args.argv), "--stop-at", "1"]))
    with forked_run(args.resume_from, out):  # the recipe then read from the fork, as --resume reads a run's
        args.resume = True
        return _train_run(args, out, overrides)


def prepare_command(data: DataConfig) -> str:
    """The `tinygemma prepare` that prepares what `data` (a recipe's [data]) asks for into its data.dir, as
    `tinygemma run` would."""
    def path(p: str) -> str:  # (one starting with "-" would read as an option)
        return f"./{p}" if p.startswith("-") else p

    return shell_join(["tinygemma", "prepare", "--out", path(data.dir),
                       *(["--source", *map(path, data.source)] if data.source else []),
                       *(["--val-source", *map(path, data.val_source)] if data.val_source else []),
                       *(["--tokenizer", data.tokenizer] if data.tokenizer != "gpt2" else []),
                       *(["--vocab-size", str(data.vocab_size or DEFAULT_BPE_VOCAB_SIZE)] if data.tokenizer == "bpe"
                         else []),
                       *(["--limit", str(data.limit)] if data.limit is not None else [])])


def unprepared_data(recipe: Recipe, run: str | None = None) -> UserError | None:
    """The refusal of a recipe's data.dir that holds no data yet, or of the data.dir of the `run` resumed that holds
    none any more, naming the `tinygemma prepare` that makes it: a bare `prepare --out DIR` would ignore the
    recipe's [data] (and `run` would train another command's run). A run trained with `--data DIR` recorded no
    more of its data than the folder: no command can be named."""
    data_dir = Path(recipe.data.dir)
    if data_dir.is_dir() and any(data_dir.iterdir()):
        return None
    if run is None:
        return UserError(f"{data_dir} (data.dir) is not prepared yet: `{prepare_command(recipe.data)}` prepares it "
                         "as the recipe's [data] asks; then run this command again")
    recorded = peek_json(Path(run) / "config.json").get("data")
    if isinstance(recorded, dict) and set(recorded) - {"dir"}:  # (the recipe's [data] made it)
        how = f"`{prepare_command(recipe.data)}` prepares it again as the run's [data] asks"
    else:
        how = "give its folder with --data, or prepare the same stories with the same tokenizer into it again"
    return UserError(f"{data_dir} (the run's data.dir) holds no prepared data: it is gone, or elsewhere (a relative "
                     f"path is read from the folder this command runs in); {how}; then run this command again")


def _train_run(args, out: str, overrides: list[str]) -> int:
    from tinygemma.metrics import strict_json
    from tinygemma.pipeline import check_given_settings, check_training_settings
    from tinygemma.runtime import env_rank
    from tinygemma.train import check_run, saved_recipe, train

    # --resume continues the recipe the run was trained with (a recipe file given is followed instead)
    recipe = saved_recipe(out, overrides + args.set) if args.resume and args.config is None and out else None
    resumed = recipe is not None
    recipe = recipe or load_recipe(args.config, overrides + args.set)
    unprepared = unprepared_data(recipe, out if resumed else None) if (resumed or args.config) and not args.data \
        else None
    if unprepared and not args.dry_run:
        raise unprepared
    check_given_settings(recipe, overrides + args.set)
    if args.dry_run:
        def check():  # what train would refuse, then what it finds
            check_training_settings(recipe)
            if unprepared:
                raise unprepared
            return check_run(recipe, args.resume, args.stop_at, args.profile)

        return _print_plan(recipe, check)
    summary = train(recipe, resume=args.resume, stop_at=args.stop_at, profile=args.profile)
    if env_rank() == 0:
        print(strict_json(summary))  # (a last step skipped as non-finite: its train_loss null, not NaN)
    return 0


# ------------------------------------------------------------------ run


def add_run(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="the main job: prepare (if needed), train (resuming), evaluate and sample, from one recipe")
    p.add_argument("recipe", type=named, help="recipe file (TOML), e.g. configs/cpu-demo.toml or configs/workshop.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting, e.g. data.source=path/to/stories.txt, "
                        f"train.max_steps=100 (or just max_steps=100), model.n_layers=4, generate.temperature=0.5; "
                        f"{LIST_HELP}; repeatable")
    p.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    p.set_defaults(func=_run_main)


DRY_RUN_HELP = ("print the recipe resolved, with what it trains (parameters, tokens, FLOPs, learning rates, "
                "evaluations, checkpoints), as JSON, then check it as training would on this machine (exit status "
                "2 if refused); nothing is prepared, trained or written")


def _print_plan(recipe, check) -> int:
    """--dry-run: the resolved recipe and its plan as JSON on stdout, the plan in one line on stderr. `check()`
    makes training's own checks and returns train.check_run's findings (None where the data is not prepared
    yet); where training would refuse (a GPU recipe on a laptop), the recipe's plan comes first, then the
    refusal (exit status 2)."""
    from tinygemma.metrics import strict_json
    from tinygemma.pipeline import recipe_plan, say_plan
    from tinygemma.runtime import env_rank

    def say(plan: dict) -> None:
        if env_rank() == 0:  # (under torchrun, once)
            print(strict_json({"recipe": recipe.to_dict(), "plan": plan}, indent=2), flush=True)
            print(say_plan(plan), file=sys.stderr, flush=True)

    try:
        checked = check()
    except UserError as refusal:
        try:
            plan = recipe_plan(recipe)
        except UserError:  # (the recipe's plan refused on its own: the training's refusal says more)
            raise refusal from None
        say(plan)
        raise
    say(recipe_plan(recipe, checked))
    for warning in checked["warnings"] if checked and env_rank() == 0 else ():  # (as train's start says them)
        print(f"tinygemma: warning: {warning}", file=sys.stderr, flush=True)
    return 0


def _run_main(args) -> int:
    from tinygemma.pipeline import check_run_recipe, run, where_and_next
    from tinygemma.runtime import env_rank

    recipe = load_recipe(args.recipe, args.set)  # refuses a recipe that is missing, a folder, not TOML
    if args.dry_run:
        return _print_plan(recipe, lambda: check_run_recipe(recipe))
    run(recipe)
    if env_rank() == 0:  # under torchrun, process 0 evaluated, sampled and wrote
        print(where_and_next(recipe, args.recipe, args.set), flush=True)
    return 0


# ------------------------------------------------------------------ generate and eval


DEFAULT_EVAL_BLOCK_SIZE = 512  # when neither the checkpoint nor the export records its training block size

SAMPLE_SEPARATOR = "\n---\n"  # between samples on stdout, when there are several


def _generate_main(args) -> int:
    from tinygemma.checkpoint import checkpoint_tokenizer, load_model, trained_block_size
    from tinygemma.devices import dtype_name
    from tinygemma.generate import check_num_samples, prompt_ids

    # Every argument is checked before the (slow) model load.
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                   prompts=args.num_samples, prefix="--",
                   repetition_penalty=args.repetition_penalty, min_p=args.min_p, stop=args.stop)  # seed + i: sample i
    check_num_samples(args.num_samples, "--num-samples")
    if [value for kind, value in args.prompts if kind == "file"].count("-") > 1:
        raise UserError("--prompt-file - is given twice: standard input is read once")
    args.prompt = [read_prompt_file(value) if kind == "file" else value for kind, value in args.prompts]
    for (kind, value), prompt in zip(args.prompts, args.prompt):
        if not prompt:
            raise UserError(("--prompt is empty" if kind == "text" else f"--prompt-file {value} holds no text") +
                            "; give some text to continue")
    started = time.perf_counter()
    tokenizer = checkpoint_tokenizer(args.ckpt, args.tokenizer)
    model = load_model(args.ckpt, tokenizer, args.dtype, args.device)
    args.context = trained_block_size(args.ckpt) if args.context == "trained" else args.context
    args.context = None if args.context == "all" else args.context
    longest = max(len(prompt_ids(model.config, tokenizer, prompt, args.max_new_tokens, args.context))
                  for prompt in args.prompt)  # (its refusal is then the only line)
    weight = model.embed_tokens.weight
    print(f"loaded {args.ckpt} ({model.num_params() / 1e6:.1f}M parameters, "
          f"{dtype_name(weight.dtype)}, {weight.device}) and tokenizer "
          f"{tokenizer.identity} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    if args.context is not None and longest + args.max_new_tokens - 1 > args.context:
        print(f"note: the text can pass {args.context} tokens, the most the model reads at once (--context; the "
              "block it trained on by default): it reads the last of them, read anew as the text grows; --context "
              "all reads every one", file=sys.stderr)
    out = sys.stdout
    started, n_tokens = time.perf_counter(), 0
    for i, prompt in enumerate(args.prompt):  # each with the same settings and seed: the text it gives alone
        if i and not args.json:
            out.write(SAMPLE_SEPARATOR[1:])  # (after the previous prompt's newline)
        n_tokens += _continue_prompt(model, tokenizer, prompt, args, out)
    seconds = time.perf_counter() - started
    print(f"{n_tokens} new tokens in {seconds:.2f}s ({n_tokens / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


def _continue_prompt(model, tokenizer, prompt: str, args, out) -> int:
    """Print the prompt's continuations (one streamed as it comes, several each whole, separated; under --json,
    one JSON line each), then a newline; return the new tokens."""
    from tinygemma.generate import generate_samples

    streamed = args.num_samples == 1 and not args.json
    if streamed:  # each piece of text is printed as soon as it is complete
        out.write(prompt)
        out.flush()

        def on_text(_, piece):
            out.write(piece)
            out.flush()
    else:  # a batch of samples advances together; print each whole, one after another
        on_text = None
    try:
        samples = generate_samples(model, tokenizer, prompt, args.max_new_tokens, args.temperature,
                                   args.top_k, args.top_p, args.seed, args.num_samples, on_text,
                                   repetition_penalty=args.repetition_penalty, min_p=args.min_p,
                                   stop=args.stop, context=args.context)
    except UserError:  # (non-finite logits): the text streamed so far ends its line before the refusal's
        if streamed:
            out.write("\n")
            out.flush()
        raise
    if args.json:  # (the seed sample i was drawn from: --seed + i)
        out.write("".join(json.dumps({"prompt": prompt, "sample": i, "seed": args.seed + i, "text": sample.text,
                                      "new_tokens": sample.new_tokens, "finish_reason": sample.finish_reason})
                          + "\n" for i, sample in enumerate(samples)))
    elif streamed:
        out.write("\n")
    else:
        out.write(SAMPLE_SEPARATOR.join(prompt + sample.text for sample in samples) + "\n")
    out.flush()
    return sum(sample.new_tokens for sample in samples)


def _eval_main(args) -> int:
    from tinygemma.checkpoint import checkpoint_tokenizer, load_model, trained_block_size
    from tinygemma.data import is_story_file, open_prepared, read_stories
    from tinygemma.devices import dtype_name, evaluation_dtype, pick_device
    from tinygemma.evaluation import check_evaluation, evaluate
    from tinygemma.metrics import strict_json

    block_size = args.block_size if args.block_size is not None else (trained_block_size(args.ckpt)
                                                                      or DEFAULT_EVAL_BLOCK_SIZE)
    check_evaluation(block_size, args.batch_size, args.max_tokens, args.stride)  # before the (slow) model load
    story_file = is_story_file(args.data)
    if story_file and not Path(args.data).exists():
        raise UserError(f"story file not found: {args.data}")
    if story_file and args.split != "val":
        raise UserError(f"--split {args.split} names a split of prepared data; the story file {args.data} is "
                        "evaluated whole")
    data = None if story_file else open_prepared(args.data)
    tokenizer = checkpoint_tokenizer(args.ckpt, args.tokenizer)
    if story_file:  # read as prepare reads it, in the checkpoint's own tokens
        stories = read_stories(args.data)
        if not stories:
            raise UserError(f"{args.data} holds no stories to evaluate")
        tokens, data_tokenizer = encode_stories(stories, tokenizer)[0], tokenizer
    else:
        tokens, data_tokenizer = data.split(args.split), data.tokenizer()
    if data_tokenizer.identity != tokenizer.identity:
        raise UserError(f"{args.data} was prepared with tokenizer {data_tokenizer.identity}, but the checkpoint "
                        f"uses {tokenizer.identity}: its token ids mean other text to this model. Prepare the "
                        "data with the checkpoint's tokenizer, or give the story file itself.")
    model = load_model(args.ckpt, tokenizer, evaluation_dtype(args.dtype, pick_device(args.device)), args.device)
    if args.block_size is None:  # the default, not the user's: no longer than the model's positions
        block_size = min(block_size, model.config.max_position_embeddings)
    if block_size > model.config.max_position_embeddings:
        raise UserError(f"--block-size {block_size} exceeds the model's max_position_embeddings "
                        f"({model.config.max_position_embeddings}): it has no positions beyond those")
    if data_tokenizer.model_vocab_size > model.config.vocab_size:  # special ids past the rows never occur in it
        raise UserError(f"{args.data} has {data_tokenizer.model_vocab_size:,} token ids, more than the model's "
                        f"{model.config.vocab_size:,}")
    trained = trained_block_size(args.ckpt) if args.block_size is not None else None  # (the default is it)
    if trained and block_size > trained:  # (a measurement past the training block: BENCHMARKS.md's "Past the ...")
        print(f"note: --block-size {block_size} is past the {trained} tokens the model trained on at once: it "
              f"predicts positions {trained} to {block_size - 1} from distances it never saw", file=sys.stderr)
    started = time.perf_counter()
    result = evaluate(model, tokens, block_size, args.batch_size, args.max_tokens,
                      token_bytes=token_byte_lengths(tokenizer, model.config.vocab_size),
                      progress=sys.stderr.isatty(), stride=args.stride)  # (a log file got one frame per batch)
    seconds = time.perf_counter() - started
    print(f"evaluated {result['tokens']:,} tokens in {seconds:.1f}s", file=sys.stderr)
    cut = args.max_tokens is not None and args.max_tokens < len(tokens)  # (--max-tokens: the first N tokens)
    whole = "the whole file" if not cut else f"the file's first {args.max_tokens:,} tokens"
    result.update(split=whole if story_file else args.split, block_size=block_size,
                  **({"max_tokens": args.max_tokens} if cut else {}),
                  **({"stride": args.stride} if args.stride else {}), dtype=dtype_name(model.embed_tokens.weight.dtype))
    print(strict_json(result))
    return 0


def _note_text_suffix(tokenizer, out) -> None:
    """A tokenizer.json whose post-processor ends every text with a token (T5's </s>): transformers' tokenizer(prompt)
    adds it, tinygemma and llama.cpp do not, and the model read it only where a story ended."""
    if tokenizer.text_suffix:
        ends = tokenizer.decode(tokenizer.text_suffix)
        print(f"note: {out}'s tokenizer ends every text with {ends} (its post-processor), so transformers' "
              "tokenizer(prompt) ends a prompt with it, where this model reads the end of a story; drop that last "
              "id before generate, as tinygemma and llama.cpp do", file=sys.stderr)


def _add_model_arguments(p, auto_dtype: str = "bfloat16 where the device computes in it natively, else "
                                               "float32") -> None:
    p.add_argument("--ckpt", required=True, type=named,
                   help="run directory (its best checkpoint, else its last), checkpoint directory, or transformers "
                        "Gemma 3 directory")
    p.add_argument("--tokenizer", default=None, type=named,
                   help="gpt2 or a tokenizer.json path (default: the checkpoint's own, or the transformers "
                        "directory's tokenizer.json)")
    p.add_argument("--dtype", default="auto", help=f"auto ({auto_dtype}), float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps")


def named(text: str) -> str:
    """A path or a name given on the command line, never empty: "" (an unset shell variable, `--out "$RUN"`)
    would read as the current folder, or let a default take its place."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give a path or a name")
    return text


def _top_k(text: str) -> int | None:
    """--top-k: a number of tokens, where 0 and none mean no top-k filter (the recipe's top_k = none)."""
    if text.strip().lower() in ("0", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or none, got {text!r}") from None


def _optional_number(text: str) -> float | None:
    """--top-p, --min-p: a number, or none for no such filter (the recipe's none)."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


def add_generate(subparsers) -> None:
    defaults = GenerateConfig()  # the recipe's [generate] defaults
    p = subparsers.add_parser("generate", help="continue a prompt with a trained model, streaming the text")
    _add_model_arguments(p)
    p.add_argument("--prompt", dest="prompts", action="append", type=lambda text: ("text", text), metavar="TEXT",
                   help="text to continue; repeatable: each prompt in turn, with the same settings and seed")
    p.add_argument("--prompt-file", dest="prompts", action="append", type=_prompt_file, metavar="FILE",
                   help="a UTF-8 file whose whole text is a prompt (less one final newline, which editors add), "
                        "as llama.cpp's -f; - reads standard input; repeatable, in turn with any --prompt")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                   help=f"stop after this many new tokens, or at end of text (default {defaults.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=defaults.temperature,
                   help=f"softmax temperature; 0 is greedy and deterministic (default {defaults.temperature})")
    p.add_argument("--top-k", type=_top_k, default=defaults.top_k,
                   help=f"sample only among the k most likely tokens; 0 or none: among all of them, as with "
                        f"--top-p alone (default {defaults.top_k})")
    p.add_argument("--top-p", type=_optional_number, default=defaults.top_p,
                   help="nucleus sampling: only the most likely tokens whose probabilities add up to p, in (0, 1] "
                        f"(default {defaults.top_p})")
    p.add_argument("--min-p", type=_optional_number, default=defaults.min_p,
                   help="keep only the tokens at least p times as likely as the most likely one, in [0, 1], after "
                        "the temperature, top-k and top-p, as transformers' min_p (llama.cpp's min_p has the same "
                        "threshold, but applies the temperature after it); 0 or none is none (default "
                        f"{defaults.min_p})")
    p.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty,
                   help="divide the logit of each token already in the text by this (multiply it, if negative), "
                        "as transformers' repetition_penalty: 1.1 to 1.3 curb a small model's loops; 1 is none "
                        f"(default {defaults.repetition_penalty:g})")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help=f"sampling seed: the same seed gives the same text; sample i of --num-samples is the one "
                   f"seed + i gives alone (default {defaults.seed})")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the continuation before this text, which is not printed (as llama.cpp's server and "
                        "OpenAI's API); repeatable: the first met ends it; e.g. --stop $'\\n' for one paragraph")
    p.add_argument("--num-samples", type=int, default=1,
                   help="continuations generated together in one batch; printed one after another, separated "
                        "by a line '---' (only a single sample is streamed)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object a line for each sample, for scripts: prompt, sample, seed, text "
                        "(without the prompt), new_tokens and finish_reason (end_of_text, stop or length); "
                        "nothing is streamed")
    p.add_argument("--context", type=_context, default="trained", metavar="trained|all|N",
                   help="the most tokens the model reads at once: trained, the block it trained on (its training "
                        "block_size, where the checkpoint or export records it; else all), as the workshop's "
                        "generate crops the text; all, every one (as transformers and llama.cpp), or a number "
                        "(default trained)")
    p.set_defaults(func=_generate_main)


def _prompt_file(text: str) -> tuple[str, str]:
    return "file", named(text)


def read_prompt_file(path: str) -> str:
    """--prompt-file's prompt: the file's UTF-8 text (standard input's for -, read as bytes, alike on every
    system), a byte-order mark left out, its line ends as \\n, less one final newline."""
    where = "standard input" if path == "-" else path
    try:
        if path == "-" and (sys.stdin is None or sys.stdin.closed):
            raise UserError("--prompt-file -: standard input is closed")
        data = (sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin).read() if path == "-" else \
            Path(path).read_bytes()
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data  # (a stdin of text: a notebook's)
    except FileNotFoundError:
        raise UserError(f"--prompt-file {path}: not found") from None
    except IsADirectoryError:
        raise UserError(f"--prompt-file {path} is a folder; give a text file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt-file {where} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:  # (no permission; on Windows a folder too)
        raise UserError(f"--prompt-file {where} cannot be read ({describe(e)})") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text[:-1] if text.endswith("\n") else text


def _context(text: str) -> str | int:
    if text in ("trained", "all"):
        return text
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"takes trained, all or a number of tokens >= 1, not {text!r}")
    return number


def add_eval(subparsers) -> None:
    p = subparsers.add_parser("eval", help="next-token loss, perplexity and bits per byte on prepared data or a "
                              "story file")
    _add_model_arguments(p, "bfloat16 on a GPU that computes in it, else float32: the numbers of `tinygemma run`'s "
                            "final evaluation")
    p.add_argument("--data", required=True, type=named,
                   help="directory written by `tinygemma prepare`, or a story file (.txt, .jsonl, .json, "
                        ".parquet), evaluated whole in the checkpoint's own tokens")
    p.add_argument("--split", default="val", help="split to evaluate (default val)")
    p.add_argument("--block-size", type=int, default=None,
                   help=f"tokens predicted per window (default: the training block size, else {DEFAULT_EVAL_BLOCK_SIZE})")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the split's first N tokens")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--stride", type=int, default=None,
                   help="overlapping windows whose ends advance by this many tokens, each scoring only those: every "
                        "prediction past the first window then reads at least block size - stride tokens of context, "
                        "for block size / stride times the work (default: the block size, windows that do not "
                        "overlap)")
    p.set_defaults(func=_eval_main)


# ------------------------------------------------------------------ compare


def add_compare(subparsers) -> None:
    p = subparsers.add_parser("compare", help="several training runs side by side: the settings they differ in, "
                              "their tokens, time and validation losses")
    p.add_argument("runs", nargs="+", metavar="RUN", type=named, help="run directories (train's --out)")
    p.add_argument("--plot", default=None, type=named, metavar="FILE.png",
                   help="also draw their validation loss against tokens into this PNG")
    p.set_defaults(func=_compare_main)


def _compare_main(args) -> int:
    from tinygemma.report import compare_runs

    print(compare_runs(args.runs, args.plot))
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ export


def add_export(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a checkpoint as a Hugging Face transformers directory, or as "
                              "one GGUF file for llama.cpp")
    p.add_argument("--ckpt", required=True, type=named, help="run directory, checkpoint directory, or transformers directory")
    p.add_argument("--out", required=True, type=named, help="directory to write config.json, model.safetensors, tokenizer "
                   "files and the model card README.md (hf), or the .gguf file to write (gguf)")
    p.add_argument("--format", default=None, help="hf (a transformers directory) or gguf (one file for llama.cpp: "
                   "llama-cli, llama-server, LM Studio); default: gguf where --out ends in .gguf, else hf")
    p.add_argument("--dtype", default=None, help=f"the weights: gguf as {', '.join(GGUF_DTYPES)} (or float32, float16, "
                   f"bfloat16; default {DEFAULT_GGUF_DTYPE}: a quarter of f32's size, and the fastest on a CPU); hf as float32, "
                   "bfloat16 (bf16: half the size, as google/gemma-3-270m) or float16 (default: the checkpoint's)")
    p.add_argument("--tokenizer", default=None, type=named, help="gpt2 or a tokenizer.json path, for a checkpoint that records "
                   "none of its own (one saved by the Python API); refused if it has another")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload the export to the Hugging Face hub as REPO "
                   "(user/name; needs huggingface_hub and a login): hf's directory, model card included, or the GGUF "
                   "file, which llama.cpp then runs with --hf-repo REPO --hf-file NAME.gguf")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private (an "
                   "existing one keeps its visibility)")
    p.set_defaults(func=_export_main)


def _export_main(args) -> int:
    from tinygemma.checkpoint import checkpoint_tokenizer, export
    from tinygemma.devices import parse_dtype
    from tinygemma.gguf_export import export_gguf
    from tinygemma.hf import check_hub_repo, push_to_hub
    from tinygemma.report import write_model_card

    gguf_name = Path(args.out).suffix.lower() == ".gguf"  # (a trailing slash too: model.gguf/)
    if args.format is None:
        args.format = "gguf" if gguf_name else "hf"
    elif args.format == "hf" and gguf_name:  # a folder named .gguf would reach llama.cpp as a missing file
        raise UserError(f"--out {args.out} names a .gguf file, but --format hf writes a transformers directory; "
                        "use --format gguf, or another --out")
    if args.push_to_hub is not None and not args.push_to_hub.strip():  # (an unset $REPO: exported, never uploaded)
        raise UserError("--push-to-hub is empty: give the repository as USER/NAME")
    if args.private and not args.push_to_hub:
        raise UserError("--private applies to the repository --push-to-hub creates; give --push-to-hub REPO too")
    if args.push_to_hub:  # before the export, which only the upload needs (and whose card names the repository)
        check_hub_repo(args.push_to_hub, args.private)
    if args.format == "gguf":
        # (an empty --dtype "$UNSET" is refused as export_gguf refuses it, not taken for the default)
        info = export_gguf(args.ckpt, args.out, DEFAULT_GGUF_DTYPE if args.dtype is None else args.dtype, args.tokenizer)
        print(f"exported {args.ckpt} to {info['path']} ({info['dtype']}, {info['bytes'] / 2**20:.1f} MiB); run it "
              f"with: llama-completion -m {shell_quote(str(info['path']))} -no-cnv -p {shell_quote('Once upon a time')}")
        if info["matrices_as_f16"]:
            print(f"note: {info['matrices_as_f16']} matrices have rows that are not a multiple of 32 values (q8_0's "
                  "block) and were written as f16, as llama.cpp's own converter does", file=sys.stderr)
        if not info["gemma_layout"]:
            print("note: this model's sliding layers or their RoPE base differ from Gemma 3's; llama.cpp reads them "
                  "from the file, but older llama.cpp builds and Ollama assume Gemma 3's", file=sys.stderr)
        if args.push_to_hub:
            url = push_to_hub(info["path"], args.push_to_hub, args.private)
            print(f"uploaded {info['path']} to {url}; run it from there with: llama-completion --hf-repo "
                  f"{args.push_to_hub} --hf-file {shell_quote(Path(info['path']).name)} -no-cnv -p "
                  f"{shell_quote('Once upon a time')}")
        return 0
    if args.format != "hf":
        raise UserError(f"unknown --format {args.format!r}; choose hf or gguf")
    dtype = None
    if args.dtype is not None:  # (gguf's spellings of the same types too)
        try:
            dtype = parse_dtype(args.dtype)
        except UserError:
            gguf_only = ", ".join(name for name in GGUF_DTYPES if name not in ("f32", "f16", "bf16"))
            raise UserError(f"--dtype {args.dtype!r} is not an hf export's: choose float32, bfloat16 or float16 "
                            f"({gguf_only} is --format gguf's)") from None
    out = export(args.ckpt, args.out, args.tokenizer, dtype=dtype,
                 finish=lambda folder: write_model_card(args.ckpt, folder, args.push_to_hub, name=args.out))
    if not (out / TOKENIZER_FILE).exists():
        print(f"note: {args.ckpt} records no tokenizer, so {out} holds none: AutoTokenizer cannot load it; export "
              "again with --tokenizer gpt2 (or a tokenizer.json) to add the one it was trained with",
              file=sys.stderr)
    else:
        with contextlib.suppress(UserError):  # a note only: never the failure of an export that is written
            _note_text_suffix(checkpoint_tokenizer(out), out)
    print(f"exported {args.ckpt} to {out} (load with Gemma3ForCausalLM.from_pretrained({str(out)!r}))")
    if args.push_to_hub:
        print(f"uploaded {out} to {push_to_hub(out, args.push_to_hub, args.private)}")
    return 0
