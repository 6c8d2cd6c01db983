"""The GPU acceptance run: the CUDA tests, the training-throughput table and a short training on real stories,
in one command, offline, on one GPU, into one markdown report.

    python benchmarks/gpu_suite.py --make-assets ../shared            # once: stories + GPT-2 vocabulary -> .device/assets
    PYTHONPATH=src python benchmarks/gpu_suite.py --report gpu_report.md   # on the GPU machine (aims at 9 min)
    PYTHONPATH=src python benchmarks/gpu_suite.py --device cpu --quick     # the same steps at toy size on a CPU

The run needs no network and no `datasets`: the stories and tiktoken's GPT-2 ranks come from the assets folder
(`--assets`, default .device/assets: tinystories/train.txt, tinystories/valid.txt, tiktoken_cache/), which
`--make-assets` fills from a checkout's ../shared. Every step runs as a subprocess of this script, from the
source tree's root, and the report gives each figure with the command that produced it. Steps:

1. the CUDA tests: `python -m pytest -q -m cuda tests/` (tests/test_cuda.py);
2. the throughput table (benchmarks/train_throughput.py): gemma3-270m-gpt2 in bf16 at blocks 128 and 1024,
   tinygemma and transformers' Gemma3ForCausalLM in one process on the same batch, eager and compiled
   (compiled tinygemma against eager transformers at block 1024, where compiling both takes minutes), and the
   optimizer's step alone, AdamW against each Muon backend (benchmarks/optimizer_step.py);
3. `tinygemma prepare` (GPT-2 tokenizer) and `tinygemma train` of gemma3-270m-gpt2 for about 3 minutes, whose
   validation loss must fall. Its step budget comes from step 2's compiled tinygemma figure at block 1024.

The exit status is 0 when every step passed, 1 otherwise. The report is written after each step, so a suite
stopped from outside still leaves what it measured (marked INCOMPLETE). `--budget` (default 540 s) sizes step 3
and stops a step's commands once its share of the budget is spent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this source tree's tinygemma, whatever is installed

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file

from common import cpu_description  # noqa: E402

from tinygemma.config import ModelConfig  # noqa: E402

DEFAULT_ASSETS = ROOT / ".device" / "assets"

# Step 2: (block, batch) pairs. Both fit an 80 GB H100 comfortably with transformers' float32 logits.
THROUGHPUT_SHAPES = [(128, 32), (1024, 8)]
# The blocks at which transformers is compiled too. At block 1024 (flex attention) compiling both models took
# over 110 s on the first H100 run (2026-11-26) and was stopped; there compiled tinygemma meets eager transformers.
COMPILED_TRANSFORMERS_BLOCKS = (128,)
# Step 3 trains at block 1024, past the 512-token window, so the sliding-window attention path (flex on a GPU
# that compiles it) runs in real training, with 16 x 1,024 = 16,384 tokens per optimizer step.
TRAIN_BATCH, TRAIN_BLOCK, EVAL_INTERVAL = 16, 1024, 50
TRAIN_SECONDS = 150  # the steps' share of the ~3 minutes; compilation and evaluations come on top
# The whole suite's aim (--budget), inside the 10 minutes one command may run on a lent GPU machine: step 3's
# steps get less time if steps 1 and 2 took longer than planned, and each command is stopped at its share.
TOTAL_SECONDS = 540
TRAIN_OVERHEAD_SECONDS = 100  # step 3 besides its steps: preparation, compilation, evaluations, checkpoint
MIN_TRAIN_SECONDS = 60
FALLBACK_TRAIN_STEPS = 300  # when step 2 gave no compiled figure to size the run from (Muon: about 40 s)
STEP_SHARES = (0.3, 0.62)  # steps 1 and 2 end by these fractions of the budget, stopped if need be; the rest
# (205 s of 540) is step 3's: its 60 s minimum of steps plus its overhead
MIN_COMMAND_SECONDS = 30  # a command with less time left in its share is not started, and says so
# Step 3 trains with the default recipe (Muon), step 2 times AdamW: on the first H100 run Muon's steps at one
# micro-step ran at 133k tokens/s against compiled AdamW's 192k. Sizing step 3 by step 2's rate alone overran.
MUON_RATE_FACTOR = 0.65
MIN_VAL_DROP = 1.0  # nats: validation loss must fall at least this much from step 0 to the end


@dataclass
class Plan:
    """What each step runs: the GPU sizes, or toy sizes for --quick."""

    device: str
    quick: bool
    preset: str = "gemma3-270m-gpt2"
    dtype: str = "bfloat16"
    tests: str = "tests/"
    shapes: list = field(default_factory=lambda: list(THROUGHPUT_SHAPES))
    modes: tuple = ("eager", "compiled")
    bench_steps: tuple = (3, 10)  # warm-up (compilation falls in the first), timed
    train_batch: int = TRAIN_BATCH
    train_block: int = TRAIN_BLOCK
    limit: int | None = None
    train_extra: tuple = ()
    optimizer_args: tuple = ()  # benchmarks/optimizer_step.py's arguments besides preset, device and --json
    budget: float = TOTAL_SECONDS  # the whole suite's aim in seconds (--budget)
    started: float = field(default_factory=time.perf_counter)

    def seconds_left(self, limit: float, share: float = 1.0) -> float:
        """A command's timeout: at most `limit`, and no later than `share` of the budget after the suite started,
        so that a slow step leaves the later ones their turn and the report is written. 0 (do not start it) when
        less than MIN_COMMAND_SECONDS are left."""
        left = self.started + share * self.budget - time.perf_counter()
        return min(limit, left) if left >= MIN_COMMAND_SECONDS else 0.0

    @classmethod
    def quick_cpu(cls, device: str) -> Plan:
        """Toy sizes, one thread per process, that run in about a minute on two shared CPU cores: every step and
        every section of the report, none of the figures."""
        return cls(device, True, preset="gemma3-tiny", dtype="float32", tests="tests/test_cuda.py",
                   shapes=[(32, 1), (80, 1)], modes=("eager",), bench_steps=(1, 1), train_batch=2,
                   train_block=96, limit=400, train_extra=("learning_rate=3e-3", "min_lr=3e-4", "eval_batches=2"),
                   optimizer_args=("--vocab-size", "512", "--n-layers", "2", "--steps", "1", "--warmup", "0",
                                   "--threads", "1", "--contenders", "adamw,muon-float32"))


@dataclass
class Result:
    title: str
    ok: bool
    lines: list[str]
    seconds: float


def run(cmd: list[str], env: dict, timeout: float) -> tuple[int, str, float]:
    """Run `cmd` from the source root; (exit status, stdout and stderr together, seconds). A timeout is status 124."""
    if timeout <= 0:
        return 124, "(not started: its step's share of --budget was spent)", 0.0
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        code, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:  # its output is bytes whatever text= says
        code, output = 124, (e.stdout or b"").decode("utf-8", "replace") + f"\n(stopped after {timeout:.0f} s)"
    return code, output, time.perf_counter() - start


def shown(cmd: list[str]) -> str:
    """The command as a user types it from the source root: `python` for this interpreter."""
    return shlex.join(["python" if c == sys.executable else c for c in cmd])


def tail(output: str, lines: int = 40) -> list[str]:
    text = "\n".join(output.rstrip().splitlines()[-lines:])
    return ["<details><summary>output (last lines)</summary>", "", "```text", text, "```", "", "</details>"]


# ------------------------------------------------------------------ 1. the CUDA tests


def cuda_tests(plan: Plan, env: dict) -> Result:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", plan.tests]
    code, output, seconds = run(cmd, env, timeout=plan.seconds_left(400, STEP_SHARES[0]))
    summary = next((line.strip("= ") for line in reversed(output.splitlines())
                    if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)), "no summary line")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    # On a GPU some test must really run; on a CPU (--quick) they are all skipped, and must be.
    ran = counts.get("passed", 0) > 0 if plan.device != "cpu" else counts.get("skipped", 0) > 0
    ok = code == 0 and ran
    lines = [f"Command: `{shown(cmd)}`", "", f"Result: **{summary}** (exit status {code}, {seconds:.0f} s)", ""]
    return Result("1. CUDA tests", ok, lines + tail(output), seconds)


# ------------------------------------------------------------------ 2. the throughput table


def throughput(plan: Plan, env: dict, work: Path) -> tuple[Result, float | None]:
    """The table, and compiled tinygemma's tokens/s at the training block (to size step 3), if measured."""
    rows, commands, failures, start = [], [], [], time.perf_counter()
    train_rate, n = None, 0  # n numbers the commands
    window = ModelConfig.preset(plan.preset).sliding_window
    for block, batch in plan.shapes:
        for mode in ("eager", "compiled"):
            if mode not in plan.modes:
                rows.append(f"| {block} | {batch} | {mode} | not run (--quick: inductor on a CPU takes minutes) "
                            "| | | | | | |")
                continue
            suffix = "+compile" if mode == "compiled" else ""
            other = "transformers" + (suffix if block in COMPILED_TRANSFORMERS_BLOCKS else "")
            attention = "flex" if plan.device != "cpu" and block > window else "sdpa"
            out = work / f"throughput-{block}-{mode}.json"
            cmd = [sys.executable, "benchmarks/train_throughput.py", "--preset", plan.preset, "--device", plan.device,
                   "--dtype", plan.dtype, "--batch-size", str(batch), "--block-size", str(block),
                   "--warmup", str(plan.bench_steps[0]), "--steps", str(plan.bench_steps[1]),
                   "--attention", attention, "--contenders", f"tinygemma{suffix},{other}",
                   "--json", str(out)]
            code, output, seconds = run(cmd, env, timeout=plan.seconds_left(300, STEP_SHARES[1]))
            n += 1
            commands.append(f"{n}. `{shown(cmd)}` ({seconds:.0f} s)")
            if code != 0 and mode == "compiled" and other != "transformers":
                # transformers may not compile where tinygemma does: say so, and still measure tinygemma.
                failures.append(f"block {block}: the compiled pair failed (exit status {code}, command {n}); "
                                "tinygemma compiled was measured again against transformers eager")
                commands += ["", *tail(output, 25), ""]
                cmd[cmd.index("--contenders") + 1] = "tinygemma+compile,transformers"
                code, output, seconds = run(cmd, env, timeout=plan.seconds_left(300, STEP_SHARES[1]))
                n += 1
                commands.append(f"{n}. `{shown(cmd)}` ({seconds:.0f} s)")
            if code != 0 or not out.exists():
                failures.append(f"block {block} {mode}: exit status {code}")
                rows.append(f"| {block} | {batch} | {mode} | FAILED, see command {n} | | | | | | |")
                commands += ["", *tail(output, 25), ""]
                continue
            result = json.loads(out.read_text())
            for r in result["results"]:
                mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                memory = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
                ratio = "-" if r["ratio_vs_transformers"] is None else f"{r['ratio_vs_transformers']:.2f}x"
                rows.append(f"| {block} | {batch} | {mode} | {r['contender']} | {r['tokens_per_s']:,.0f} | {mfu} "
                            f"| {memory} | {1000 * r['step_time_s']:,.1f} ms | {ratio} | {r['loss_step0']:.4f} |")
                if block == plan.train_block and mode == "compiled" and r["contender"].startswith("tinygemma"):
                    train_rate = r["tokens_per_s"]
    header = ["| block | batch | mode | contender | tokens/s | MFU | peak memory | step time (median) "
              "| vs transformers | loss at step 0 |", "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    lines = [f"`{plan.preset}`, {plan.dtype}, one training step (forward with loss, backward, clip, AdamW); "
             f"median of {plan.bench_steps[1]} timed steps after {plan.bench_steps[0]} warm-up; the two contenders "
             "alternate in one process on the same batch from the same weights. Peak memory: the contender's "
             "weights and optimizer state plus its step's peak above what the process held before it "
             "(`torch.cuda.max_memory_allocated`). Sliding layers: flex attention on the GPU past the window, "
             "as training uses it; SDPA otherwise.", "", *header, *rows, "", "Commands:", "", *commands]
    # The optimizer's step alone, AdamW against each Muon backend: what decides Muon's backend on this device.
    cmd = [sys.executable, "benchmarks/optimizer_step.py", "--preset", plan.preset, "--device", plan.device,
           *plan.optimizer_args, "--json", str(work / "optimizer_step.json")]
    code, output, seconds = run(cmd, env, timeout=plan.seconds_left(120, STEP_SHARES[1]))
    lines += ["", f"Optimizer step alone (`{shown(cmd)}`, {seconds:.0f} s):", ""]
    if code == 0:
        lines += [line for line in output.splitlines() if line.startswith("|")]
    else:
        failures.append(f"the optimizer step timing: exit status {code}")
        lines += tail(output, 25)
    if failures:
        lines += ["", "Failed: " + "; ".join(failures)]
    return Result("2. Training throughput", not failures, lines, time.perf_counter() - start), train_rate


# ------------------------------------------------------------------ 3. training on real stories


def train_steps(plan: Plan, rate: float | None, forced: int | None, elapsed: float) -> tuple[int, str]:
    """The step budget: about TRAIN_SECONDS of steps at step 2's compiled rate, less if the suite is late."""
    tokens_per_step = plan.train_batch * plan.train_block
    if forced:
        return forced, "set by --train-steps"
    if plan.quick:
        return 20, "--quick"
    if rate is None:
        return FALLBACK_TRAIN_STEPS, "a fixed budget: step 2 gave no compiled tinygemma figure at this block"
    seconds = max(MIN_TRAIN_SECONDS, min(TRAIN_SECONDS, plan.budget - elapsed - TRAIN_OVERHEAD_SECONDS))
    steps = int(seconds * MUON_RATE_FACTOR * rate / tokens_per_step) // EVAL_INTERVAL * EVAL_INTERVAL
    steps = max(2 * EVAL_INTERVAL, min(steps, 5000))
    return steps, (f"{seconds:.0f} s at {MUON_RATE_FACTOR} x the compiled tinygemma (AdamW) rate of step 2 "
                   f"({rate:,.0f} tokens/s; Muon's steps are slower), {tokens_per_step:,} tokens per step, rounded "
                   f"down to a multiple of {EVAL_INTERVAL}; {elapsed:.0f} s had passed")


def training(plan: Plan, env: dict, work: Path, assets: Path, rate: float | None, forced: int | None,
             elapsed: float) -> Result:
    start = time.perf_counter()
    data, out = work / "data", work / "run"
    prepare = [sys.executable, "-m", "tinygemma", "prepare", "--out", str(data), "--tokenizer", "gpt2",
               "--source", str(assets / "tinystories" / "train.txt"),
               "--val-source", str(assets / "tinystories" / "valid.txt"), "--no-progress"]
    prepare += ["--limit", str(plan.limit)] if plan.limit else []
    code, output, prep_seconds = run(prepare, env, timeout=plan.seconds_left(300))
    lines = [f"1. `{shown(prepare)}` ({prep_seconds:.0f} s)"]
    if code != 0:
        return Result("3. Training on real stories", False, lines + tail(output), time.perf_counter() - start)
    steps, why = train_steps(plan, rate, forced, elapsed + prep_seconds)
    interval = 10 if plan.quick else EVAL_INTERVAL
    settings = [f"device={plan.device}", f"dtype={plan.dtype}", f"compile={'false' if plan.quick else 'auto'}",
                f"batch_size={plan.train_batch}", f"block_size={plan.train_block}", "grad_accum_steps=1",
                f"max_steps={steps}", f"warmup_steps={max(1, steps // 20)}", f"eval_interval={interval}",
                "eval_batches=4", "checkpoint_interval=0", f"log_interval={interval}", "model.vocab_pad_multiple=128",
                *plan.train_extra]
    train = [sys.executable, "-m", "tinygemma", "train", "--data", str(data), "--out", str(out), "--model",
             plan.preset, *[a for s in settings for a in ("--set", s)]]
    code, output, train_seconds = run(train, env, timeout=plan.seconds_left(600))
    lines += [f"2. `{shown(train)}` ({train_seconds:.0f} s; {steps} steps: {why})", ""]
    metrics = out / "metrics.jsonl"
    if code != 0 or not metrics.exists():
        lines += [f"`tinygemma train` failed (exit status {code})."]
        return Result("3. Training on real stories", False, lines + tail(output), time.perf_counter() - start)
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    lines += training_figures(records, json.loads((out / "config.json").read_text()))
    vals = [r for r in records if "val_loss" in r]
    ok = len(vals) >= 2 and vals[-1]["val_loss"] < vals[0]["val_loss"] - MIN_VAL_DROP
    lines += ["", f"Criterion: the last validation loss is at least {MIN_VAL_DROP} nat below step 0's: "
              f"**{'met' if ok else 'NOT met'}**.", "", *tail(output, 15)]
    return Result("3. Training on real stories", ok, lines, time.perf_counter() - start)


def training_figures(records: list[dict], config: dict) -> list[str]:
    """The validation table and a summary from metrics.jsonl and config.json."""
    vals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "train_loss" in r]
    settled = steps[len(steps) // 5 :] or steps  # past compilation and warm-up
    rate = statistics.median(r["tokens_per_s"] for r in settled) if settled else None
    mfu = [r["mfu"] for r in settled if "mfu" in r]
    run = config["run"]
    lines = [f"{run['parameters']:,} parameters, {run['dtype']} on {run['device']}, {run['tokens_per_step']:,} "
             f"tokens per step, {len(steps)} steps ({steps[-1]['tokens'] if steps else 0:,} tokens).", "",
             "| step | tokens | val loss | val bits/byte |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |" for r in vals]
    if vals:
        first, last = vals[0], vals[-1]
        best = min(vals, key=lambda r: r["val_loss"])
        lines += ["", f"- validation loss: first {first['val_loss']:.4f} (step {first['step']}), last "
                      f"{last['val_loss']:.4f} (step {last['step']}), best {best['val_loss']:.4f} (step {best['step']})",
                  f"- bits per byte: first {first['val_bpb']:.4f}, last {last['val_bpb']:.4f}"]
    if rate is not None:
        lines.append(f"- training throughput: {rate:,.0f} tokens/s (median over steps {settled[0]['step']} to "
                     f"{settled[-1]['step']}, from metrics.jsonl)"
                     + (f", MFU {100 * statistics.median(mfu):.1f}%" if mfu else ""))
    return lines


# ------------------------------------------------------------------ the report


def environment(plan: Plan) -> list[str]:
    import torch

    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = "not installed"
    if plan.device != "cpu":
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible"
    else:
        device = f"{cpu_description()} (no GPU: a smoke run)"
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty=, with uncommitted changes"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return ["| | |", "|---|---|", f"| device | {device} |", f"| torch | {torch.__version__} |",
            f"| CUDA | {torch.version.cuda or '-'} |", f"| transformers | {hf} |",
            f"| Python | {platform.python_version()} ({sys.executable}) |", f"| commit | {commit} |",
            f"| date | {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} |"]


STEP_TITLES = ("1. CUDA tests", "2. Training throughput", "3. Training on real stories")


def write_report(path: Path, plan: Plan, argv: list[str], env_line: str, results: list[Result], total: float) -> None:
    """The report of the steps run so far: written after each step, so a suite stopped from outside (a machine's
    time limit) still leaves what it measured, marked INCOMPLETE."""
    pending = STEP_TITLES[len(results):]
    verdict = "FAIL" if not all(r.ok for r in results) else "INCOMPLETE" if pending else "PASS"
    lines = ["# GPU acceptance run" + (" (--quick smoke run, not a GPU result)" if plan.quick else ""), "",
             f"**{verdict}**: " + ", ".join(f"{r.title.split('. ', 1)[1]} {'passed' if r.ok else 'FAILED'}"
                                            for r in results) + f"; {total / 60:.1f} minutes in all.", "",
             f"Suite: `python benchmarks/gpu_suite.py {shlex.join(argv)}`. Every command below ran from the "
             f"source tree's root with `{env_line}`.", "", *environment(plan)]
    for r in results:
        lines += ["", f"## {r.title}", "", *r.lines, "", f"({r.seconds:.0f} s)"]
    for title in pending:
        lines += ["", f"## {title}", "", "Not reached: the suite was still running, or was stopped, before this step."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_assets(shared: Path, assets: Path) -> int:
    """Copy the stories and the GPT-2 ranks from a checkout's ../shared into the assets folder."""
    stories, cache = shared / "data" / "tinystories", shared / "tiktoken_cache"
    missing = [p for p in (stories / "train.txt", stories / "valid.txt", cache) if not p.exists()]
    if missing:
        print(f"gpu_suite: error: {missing[0]} not found (expected ../shared's layout)", file=sys.stderr)
        return 2
    (assets / "tinystories").mkdir(parents=True, exist_ok=True)
    for name in ("train.txt", "valid.txt"):
        shutil.copyfile(stories / name, assets / "tinystories" / name)
    shutil.copytree(cache, assets / "tiktoken_cache", dirs_exist_ok=True)
    size = sum(p.stat().st_size for p in assets.rglob("*") if p.is_file())
    print(f"wrote {assets} ({size / 1e6:.1f} MB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report", default="gpu_report.md", help="the markdown report to write (default gpu_report.md)")
    p.add_argument("--assets", default=str(DEFAULT_ASSETS),
                   help="folder with tinystories/train.txt, tinystories/valid.txt, tiktoken_cache/")
    p.add_argument("--make-assets", metavar="SHARED", help="fill --assets from SHARED (a checkout's ../shared), then stop")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="toy sizes and no inductor: a smoke run of every step")
    p.add_argument("--train-steps", type=int, metavar="N", help="step 3's budget (default: sized to ~3 minutes)")
    p.add_argument("--budget", type=float, default=TOTAL_SECONDS, metavar="SECONDS",
                   help=f"the whole suite's aim (default {TOTAL_SECONDS}): sizes step 3 and caps each command")
    p.add_argument("--work", help="folder for the prepared data and the run (default: a temporary folder)")
    args = p.parse_args(argv)
    assets = Path(args.assets).resolve()
    if args.make_assets:
        return make_assets(Path(args.make_assets), assets)

    import torch

    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: error: --device cuda, but PyTorch sees no CUDA GPU", file=sys.stderr)
        return 2
    if device == "cpu" and not args.quick:
        print("gpu_suite: error: no GPU here; `--device cpu --quick` runs the smoke version", file=sys.stderr)
        return 2
    for needed in (assets / "tinystories" / "train.txt", assets / "tinystories" / "valid.txt", assets / "tiktoken_cache"):
        if not needed.exists():
            print(f"gpu_suite: error: {needed} not found; build the assets with "
                  f"`python benchmarks/gpu_suite.py --make-assets ../shared --assets {args.assets}`", file=sys.stderr)
            return 2
    plan = Plan.quick_cpu(device) if args.quick else Plan(device, False)
    plan.budget = args.budget

    extra = {"TIKTOKEN_CACHE_DIR": str(assets / "tiktoken_cache"), "HF_HUB_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "TINYGEMMA_STORIES": str(assets / "tinystories")}
    if plan.quick:
        extra["OMP_NUM_THREADS"] = "1"  # toy sizes: more threads only contend for shared cores
    env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    env_line = " ".join(f"{k}={v}" for k, v in {"PYTHONPATH": "src", **extra}.items())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        work = Path(args.work).resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        def done(result: Result) -> None:
            results.append(result)
            print(f"{result.title}: {'passed' if result.ok else 'FAILED'}", file=sys.stderr, flush=True)
            write_report(Path(args.report), plan, argv, env_line, results, time.perf_counter() - start)

        results: list[Result] = []
        done(cuda_tests(plan, env))
        table, rate = throughput(plan, env, work)
        done(table)
        done(training(plan, env, work, assets, rate, args.train_steps, time.perf_counter() - start))
    print(f"wrote {args.report}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
