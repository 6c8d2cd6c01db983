"""Recipe efficiency: how many tokens each optimizer recipe needs to reach a validation loss, on tinygemma's own
trainer (tinygemma.train.train), same data, model and token budget for every contender.

Contenders (each run is a real `train()` run with its own run directory):
  workshop  the workshop notebook's optimizer settings: AdamW lr 1e-4 (min_lr 1e-5), betas 0.9/0.95, weight
            decay 0.1, eps 1e-9, clip 0.5, cosine
  adamw     AdamW (clip 1.0, cosine, min_lr = lr / 10), learning rate swept over --adamw-lrs
  muon      Muon on the blocks' matrices + AdamW on embedding and gains, wsd (cooldown 0.4, min_lr = peak / 10);
            swept along one axis: Muon lr over --muon-lrs, with AdamW's lr = Muon's / 10 (so the AdamW part
            takes the same values as the adamw sweep)
The sweeps run one seed (--seeds' first). A sweep whose best value (lowest final validation loss) sits on the
sweep's edge is extended by one more value, a factor of 2 beyond it (up to --extend times), so that "tuned" means
an optimum inside the sweep; the best value then runs the other seeds. The workshop runs every seed. A
contender's figures are the means over its seeds. Runs go in order of importance (the workshop's other seeds
last), each is kept in its own directory and reused by a later invocation, and --report-only reports the runs
that finished, so a benchmark cut short by the clock still says what it measured (and which seeds it lacks).

Data: real stories, ../shared/data/tinystories/train.txt, with a 4,096-token byte-level BPE trained on them (as
configs/cpu-demo.toml), validated on valid.txt. Model: gemma3-tiny, block 128, batch 16 (2,048 tokens a step),
float32 on the CPU. Every run warms up for the first 10% of its steps.

Report: final validation loss and bits per byte per contender (over the runs' fixed evaluation windows, and of
the final models on the whole validation split); the tokens the winner needed to reach the others'
final loss (linear interpolation between evaluations); milliseconds per step (median of the runs' own step times,
and a separate interleaved timing of AdamW, our float32 Muon and torch.optim.Muon on one model); a PNG of
validation loss against tokens; a JSON of everything; a markdown block for BENCHMARKS.md.

    python benchmarks/recipe_efficiency.py --out bench/recipe --threads 2       # the full benchmark, 2M tokens a run
    python benchmarks/recipe_efficiency.py --out bench/recipe --report-only    # report what has finished so far

On 2 cores one run at a time with 2 threads beats two runs at once with 1 thread each (the two contend for the
cores' shared resources: 2.1 s a step each against 0.84 s alone, for Muon on the AVX2 EPYC).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file

from common import (  # noqa: E402
    cpu_description,
    fraction,
    non_negative_int,
    positive_floats,
    positive_int,
    positive_ints,
    run_script,
)

from tinygemma.config import load_recipe  # noqa: E402
from tinygemma.data import prepare  # noqa: E402
from tinygemma.files import atomic_write_json, atomic_write_text  # noqa: E402
from tinygemma.metrics import read_records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STORIES = Path(os.environ.get("TINYGEMMA_SHARED", ROOT.parent / "shared")) / "data" / "tinystories"

COMMON = ["model.preset=gemma3-tiny", "block_size=128", "batch_size=16", "grad_accum_steps=1", "dtype=float32",
          "compile=false", "device=cpu", "weight_decay=0.1", "beta1=0.9", "beta2=0.95", "checkpoint_interval=0",
          "log_interval=1000000"]
WORKSHOP = ["optimizer=adamw", "lr_schedule=cosine", "learning_rate=1e-4", "min_lr=1e-5", "adam_eps=1e-9",
            "grad_clip=0.5"]


def adamw_recipe(lr: float) -> list[str]:
    return ["optimizer=adamw", "lr_schedule=cosine", f"learning_rate={lr}", f"min_lr={lr / 10}", "grad_clip=1.0"]


def muon_recipe(muon_lr: float) -> list[str]:
    lr = muon_lr / 10
    return ["optimizer=muon", "lr_schedule=wsd", "cooldown_fraction=0.4", f"muon_learning_rate={muon_lr}",
            f"learning_rate={lr}", f"min_lr={lr / 10}", "grad_clip=1.0"]


def run_one(job: dict) -> dict:
    """One training run in this (worker) process; returns its validation curve and step times."""
    from tinygemma.train import train

    torch.set_num_threads(job["threads"])
    out = Path(job["out"])
    if done := finished(job):  # by an earlier invocation: reuse (the benchmark can be resumed)
        return done
    if out.exists():  # (cut short, or run with other settings: another budget, --set, --evals)
        import shutil

        shutil.rmtree(out)
    recipe = load_recipe(None, [f"data.dir={job['data']}", f"train.out={out}", *job["settings"]])
    t0 = time.perf_counter()
    summary = train(recipe, quiet=True)
    wall = time.perf_counter() - t0
    records = read_records(out / "metrics.jsonl")  # (a non-finite value, written as null, read as NaN)
    steps = [r for r in records if "train_loss" in r]
    result = {**{k: job[k] for k in ("contender", "value", "seed", "settings")},
              "val_loss": summary["val_loss"], "val_bpb": summary["val_bpb"], "tokens": summary["tokens"],
              "curve": [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r],
              # The log lines' rates (one here: the whole run after its first step), as time per step.
              "step_ms": 1e3 * statistics.median(r["tokens"] / r["step"] / r["tokens_per_s"]
                                                 for r in steps if "tokens_per_s" in r),
              "train_s": summary["elapsed_s"], "wall_s": wall}
    atomic_write_json(out / "summary.json", result)  # the mark of a finished run: never half written
    print(f"  {job['contender']} {job['value']} seed {job['seed']}: val loss {result['val_loss']:.4f}, "
          f"bpb {result['val_bpb']:.4f}, {result['step_ms']:.0f} ms/step, {wall:.0f} s", file=sys.stderr, flush=True)
    return result


def finished(job: dict) -> dict | None:
    """The job's summary, where an earlier invocation finished it with the very same settings."""
    path = Path(job["out"]) / "summary.json"
    if path.exists() and (summary := json.loads(path.read_text()))["settings"] == job["settings"]:
        return summary
    return None


def run_dir(work: Path, contender: str, value: float | None, seed: int) -> Path:
    return work / "runs" / f"{contender if value is None else f'{contender}-lr{value:g}'}-seed{seed}"


def whole_split(run: Path, data: Path, threads: int, max_tokens: int | None = None) -> dict:
    """The run's final model on the whole validation split, by `tinygemma eval` (cached in the run directory):
    the figures the README's results table gives, where the runs' own evaluations use a fixed subset."""
    cached = run / f"whole_validation{f'_max{max_tokens}' if max_tokens else ''}.json"  # (a smoke test's cap apart)
    if not cached.exists():
        import contextlib
        import io

        from tinygemma.cli import main as cli

        torch.set_num_threads(threads)
        final = run / "checkpoints" / json.loads((run / "checkpoints" / "last.json").read_text())["dir"]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            cli(["eval", "--ckpt", str(final), "--data", str(data), "--device", "cpu", "--dtype", "float32",
                 "--batch-size", "16", *(["--max-tokens", str(max_tokens)] if max_tokens else [])])
        atomic_write_text(cached, printed.getvalue().strip().splitlines()[-1])
    return json.loads(cached.read_text())


def run_all(jobs: list[dict], workers: int, report_only: bool = False) -> list[dict]:
    if report_only:  # only the runs already finished (a benchmark cut short still reports what it has)
        return [done for j in jobs if (done := finished(j))]
    if workers <= 1:
        return [run_one(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(run_one, jobs))


def interpolate_tokens(curve: list, target: float) -> float | None:
    """The first token count at which the validation curve reaches `target` (linear between evaluations)."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t1 if l0 == l1 else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def sweep_decision(sweep: list[dict], may_extend: bool) -> tuple[float, bool]:
    """(value, False): the sweep's best value, to be run at the other seeds; (value, True): the best sits on the
    sweep's edge, so the next value (x2 above, /2 below) is to be run first."""
    sweep = sorted(sweep, key=lambda r: r["value"])
    top = min(range(len(sweep)), key=lambda i: sweep[i]["val_loss"])
    if may_extend and len(sweep) > 1 and top in (0, len(sweep) - 1):
        return (sweep[0]["value"] / 2 if top == 0 else sweep[-1]["value"] * 2), True
    return sweep[top]["value"], False


def mean_curve(runs: list[dict]) -> list:
    return [(points[0][0], statistics.mean(p[1] for p in points)) for points in zip(*(r["curve"] for r in runs))]


def time_optimizers(steps: int, threads: int, settings: list[str], vocab_size: int) -> dict:
    """ms per training step (forward, backward, clip, optimizer) of AdamW, our float32 Muon and torch.optim.Muon
    (bfloat16 iteration) on one batch, the contenders interleaved step by step so load falls on all alike."""
    from types import SimpleNamespace

    from tinygemma.model import Gemma3
    from tinygemma.optim import MuonAdamW, configure_optimizer

    torch.set_num_threads(threads)
    recipe = load_recipe(None, settings)
    cfg = recipe.train
    rt = SimpleNamespace(device=torch.device("cpu"))
    kinds = ["adamw", "muon-float32"] + (["muon-torch"] if hasattr(torch.optim, "Muon") else [])
    contenders = {}
    for kind in kinds:
        torch.manual_seed(0)
        model = Gemma3(recipe.model_config(vocab_size=vocab_size))
        optimizer = configure_optimizer(model, load_recipe(None, [*settings, f"optimizer={kind.split('-')[0]}"]).train, rt)
        if isinstance(optimizer, MuonAdamW):
            optimizer.backend = "torch" if kind == "muon-torch" else "float32"
        contenders[kind] = (model, optimizer)
    x = torch.randint(0, vocab_size, (cfg.batch_size, cfg.block_size + 1), generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in kinds}
    for i in range(steps + 1):
        for kind, (model, optimizer) in contenders.items():
            t0 = time.perf_counter()
            model(x[:, :-1], x[:, 1:]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i:  # the first step of each is warmup
                times[kind].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/recipe_efficiency", help="work directory: data, runs, results")
    p.add_argument("--tokens", type=positive_int, default=2_000_000, help="training tokens per run (the budget)")
    p.add_argument("--adamw-lrs", type=positive_floats, default="4e-3,8e-3,1.6e-2,3.2e-2",
                   help="AdamW learning rates to sweep")
    p.add_argument("--muon-lrs", type=positive_floats, default="0.02,0.04,0.08,0.16",
                   help="Muon learning rates to sweep")
    p.add_argument("--seeds", type=positive_ints, default=[1337, 1338],
                   help="seeds, 1337,1338 by default; sweeps use the first")
    p.add_argument("--evals", type=positive_int, default=8, help="evaluations per run (after step 0)")
    p.add_argument("--eval-batches", type=positive_int, default=8,
                   help="validation batches of 16 windows per evaluation")
    p.add_argument("--jobs", type=positive_int, default=1, help="runs at once (processes)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per run")
    p.add_argument("--timing-threads", type=positive_ints,
                   help="thread counts to time the optimizers at, e.g. 1,2 (default: --threads)")
    p.add_argument("--timing-steps", type=non_negative_int, default=5,
                   help="interleaved timing steps per optimizer (0 = skip)")
    p.add_argument("--extend", type=non_negative_int, default=1,
                   help="times a sweep whose best value is on its edge is extended by a factor of 2 (0 = never)")
    p.add_argument("--val-max-tokens", type=positive_int,
                   help="cap the final models' evaluation on the validation split (smoke tests; default: all of it)")
    p.add_argument("--short-fraction", type=fraction, default=0.6,
                   help="also run the best Muon value planned for this fraction of the budget (0 = skip): under "
                        "wsd a shorter plan cools down sooner, so the long run's curve overstates the tokens needed")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: report the runs already finished in --out (fewer seeds where some are missing)")
    p.add_argument("--limit", type=positive_int, help="use only the first N training stories (smoke tests)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra setting for every run")
    args = p.parse_args(argv)

    work = Path(args.out)
    data = work / "data-bpe4096"
    if args.report_only and not (data / "meta.json").exists():  # "run nothing": not even the data
        raise SystemExit(f"recipe_efficiency: no finished run in {work / 'runs'} to report")
    if (data / "meta.json").exists():  # its stories, and so every run on it, are another --limit's
        held = json.loads((data / "meta.json").read_text())["source"]["limit"]
        if held != args.limit:
            raise SystemExit(f"recipe_efficiency: {data} holds {f'the first {held:,}' if held else 'all the'} "
                             f"training stories, and --limit asks for {f'{args.limit:,}' if args.limit else 'all'}: "
                             "give another --out")
    else:
        prepare(data, sources=[STORIES / "train.txt"], val_sources=[STORIES / "valid.txt"], tokenizer="bpe",
                vocab_size=4096, limit=args.limit, workers=1, progress=False)
    vocab_size = json.loads((data / "meta.json").read_text())["vocab_size"]
    base = load_recipe(None, [*COMMON, *args.set]).train
    tokens_per_step = base.batch_size * base.block_size * base.grad_accum_steps
    steps = max(1, -(-args.tokens // tokens_per_step))  # at least the budget
    common = [*COMMON, f"max_steps={steps}", f"warmup_steps={max(1, steps // 10)}",
              f"eval_interval={max(1, steps // args.evals)}", f"eval_batches={args.eval_batches}"]
    seeds = args.seeds
    grids = {"adamw": sorted(args.adamw_lrs), "muon": sorted(args.muon_lrs)}
    settings_for = {"workshop": lambda _: WORKSHOP, "adamw": adamw_recipe, "muon": muon_recipe}

    def job(contender: str, value: float | None, seed: int) -> dict:
        return {"contender": contender, "value": value, "seed": seed, "threads": args.threads,
                "data": str(data), "out": str(run_dir(work, contender, value, seed)),
                "settings": [*common, *settings_for[contender](value), f"seed={seed}", *args.set]}

    print(f"{steps} steps x {tokens_per_step} tokens = {steps * tokens_per_step:,} tokens per run", file=sys.stderr)
    # Order of importance, so that a benchmark cut short has the most of it: both sweeps and the workshop at the
    # first seed (slowest, Muon, first so a process pool ends with short jobs), any edge extensions, the best
    # values' other seeds, the workshop's other seeds last.
    runs = run_all([*(job("muon", v, seeds[0]) for v in grids["muon"]),
                    *(job("adamw", v, seeds[0]) for v in grids["adamw"]), job("workshop", None, seeds[0])],
                   args.jobs, args.report_only)
    short = None
    muon_runs = [r for r in runs if r["contender"] == "muon"]  # (none yet: a --report-only of a run cut short)
    if args.short_fraction and muon_runs:  # wsd's own measure: the best Muon value in a run *planned* for fewer tokens
        value, _ = sweep_decision(muon_runs, False)
        short_steps = max(1, round(args.short_fraction * steps))
        plan = job("muon", value, seeds[0])
        plan.update(contender="muon-short", out=str(run_dir(work, f"muon-short{args.short_fraction:g}", value, seeds[0])),
                    settings=[*plan["settings"], f"max_steps={short_steps}",
                              f"eval_interval={max(1, short_steps // args.evals)}"])
        short = next(iter(run_all([plan], 1, args.report_only)), None)
    best, extended, pending = {}, {"adamw": 0, "muon": 0}, ["adamw", "muon"]
    while pending:  # a sweep whose best value sits on its edge goes one factor of 2 further (--extend times)
        more = []
        for contender in list(pending):
            sweep = [r for r in runs if r["contender"] == contender and r["seed"] == seeds[0]]
            if not sweep:  # --report-only before any of this sweep's runs finished
                best[contender] = None
                pending.remove(contender)
                continue
            value, beyond = sweep_decision(sweep, extended[contender] < args.extend)
            if beyond:
                extended[contender] += 1
                more.append(job(contender, value, seeds[0]))
            else:
                best[contender] = value
                pending.remove(contender)
                more += [job(contender, value, s) for s in seeds[1:]]
        runs += run_all(more, args.jobs, args.report_only)
    runs += run_all([job("workshop", None, s) for s in seeds[1:]], args.jobs, args.report_only)

    finals = {}
    for contender in ("workshop", "adamw", "muon"):
        chosen = [r for r in runs if r["contender"] == contender and (contender == "workshop" or r["value"] == best[contender])]
        if not chosen:  # --report-only: not run yet (the report names it)
            continue
        finals[contender] = {
            "value": None if contender == "workshop" else best[contender], "seeds": [r["seed"] for r in chosen],
            "val_loss": statistics.mean(r["val_loss"] for r in chosen),
            "val_loss_seeds": [r["val_loss"] for r in chosen],
            "val_bpb": statistics.mean(r["val_bpb"] for r in chosen),
            "val_bpb_seeds": [r["val_bpb"] for r in chosen],
            "step_ms": statistics.median(r["step_ms"] for r in chosen),
            "whole_validation": [whole_split(run_dir(work, contender, r["value"], r["seed"]), data, args.threads,
                                             args.val_max_tokens) for r in chosen],
            "curve": mean_curve(chosen),
        }
    if not finals:
        raise SystemExit(f"recipe_efficiency: no finished run in {work / 'runs'} to report")
    winner = min(finals, key=lambda c: finals[c]["val_loss"])
    for row in finals.values():
        reached = interpolate_tokens(finals[winner]["curve"], row["val_loss"])
        row["winner_tokens_to_reach"] = reached
        row["winner_fraction_of_tokens"] = None if reached is None else reached / (steps * tokens_per_step)

    timing_threads = args.timing_threads or [args.threads]
    if args.report_only:  # "run nothing": the timings an earlier invocation measured, if any
        earlier = json.loads((work / "results.json").read_text()) if (work / "results.json").exists() else {}
        timing = {int(t): v for t, v in earlier.get("timing_ms_per_step_by_threads", {}).items()}
    else:
        timing = {t: time_optimizers(args.timing_steps, t, [*common, "optimizer=adamw", *args.set], vocab_size)
                  for t in (timing_threads if args.timing_steps else [])}
    torch.set_num_threads(args.threads)
    if short is not None:
        short = {**short, "fraction_of_budget": short["tokens"] / (steps * tokens_per_step),
                 "beats": {c: short["val_loss"] <= row["val_loss"] for c, row in finals.items() if c != "muon"}}
    result = {"short": short, "budget_tokens": steps * tokens_per_step, "steps": steps, "tokens_per_step": tokens_per_step,
              "seeds": seeds, "best": best, "winner": winner, "finals": finals, "runs": runs,
              "timing_ms_per_step": timing.get(args.threads, next(iter(timing.values()), {})),
              "timing_ms_per_step_by_threads": timing, "cpu": cpu_description(), "torch": torch.__version__,
              "jobs": args.jobs, "threads": args.threads, "command": "python benchmarks/recipe_efficiency.py "
              + " ".join(argv if argv is not None else sys.argv[1:])}
    atomic_write_json(work / "results.json", result)
    plot(result, work / "recipe_efficiency.png")
    block = markdown(result)
    atomic_write_text(work / "results.md", block)
    print(block)
    return result


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    colors = {"workshop": "tab:gray", "adamw": "tab:blue", "muon": "tab:red"}
    for r in result["runs"]:  # every run, faint
        ax.plot(*zip(*r["curve"]), color=colors[r["contender"]], alpha=0.2, linewidth=0.8)
    for contender, row in result["finals"].items():
        label = contender if row["value"] is None else f"{contender} (lr {row['value']:g})"
        ax.plot(*zip(*row["curve"]), color=colors[contender], marker="o", markersize=3, linewidth=2,
                label=f"{label}: {row['val_loss']:.3f}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title(f"gemma3-tiny, BPE 4,096, {result['budget_tokens']:,} tokens per run (faint: sweeps and seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)


def markdown(result: dict) -> str:
    f, budget = result["finals"], result["budget_tokens"]
    best = {c: "not run yet" if v is None else f"lr {v:g}" for c, v in result["best"].items()}
    lines = [f"Budget {budget:,} training tokens per run ({result['steps']} steps of {result['tokens_per_step']:,}); "
             f"seeds {', '.join(map(str, result['seeds']))}; best of the sweeps: AdamW {best['adamw']}, "
             f"Muon {best['muon']}. CPU: {result['cpu']}; torch {result['torch']}; "
             f"{result['jobs']} run(s) at once, {result['threads']} thread(s) each.", "",
             f"| contender | final val loss (per seed) | bits/byte | whole validation split: loss, bits/byte | "
             f"tokens {result['winner']} needed to reach it | ms/step (in the runs) |",
             "|---|---|---|---|---|---|"]
    for name, row in f.items():
        label = name if row["value"] is None else f"{name} lr {row['value']:g}"
        if len(row["seeds"]) < len(result["seeds"]):
            label += f" ({len(row['seeds'])} of {len(result['seeds'])} seeds)"
        seeds = ", ".join(f"{v:.4f}" for v in row["val_loss_seeds"])
        reached = row["winner_tokens_to_reach"]
        reach = "not reached" if reached is None else f"{reached:,.0f} ({100 * row['winner_fraction_of_tokens']:.0f}%)"
        whole = row["whole_validation"]
        full = (f"{statistics.mean(w['loss'] for w in whole):.4f}, "
                f"{statistics.mean(w['bits_per_byte'] for w in whole):.4f}"
                f" ({whole[0]['tokens']:,} tokens)")
        lines.append(f"| {label} | {row['val_loss']:.4f} ({seeds}) | {row['val_bpb']:.4f} | {full} | {reach} | "
                     f"{row['step_ms']:.0f} |")
    lines += [f"| {name} | not run yet | | | | |" for name in ("workshop", "adamw", "muon") if name not in f]
    short = result.get("short")
    if short:
        verdict = ", ".join(f"{'below' if below else 'above'} {c}'s final {f[c]['val_loss']:.4f}"
                            for c, below in short["beats"].items())
        lines += ["", f"Muon lr {short['value']:g}, wsd, in a run planned for {short['tokens']:,} tokens "
                  f"({100 * short['fraction_of_budget']:.0f}% of the budget; same warmup; seed {short['seed']}): "
                  f"final val loss {short['val_loss']:.4f}, bits/byte {short['val_bpb']:.4f}: {verdict}."]
    lines += ["", f"Sweeps (seed {result['seeds'][0]}):", "", "| contender | lr | final val loss | bits/byte |", "|---|---|---|---|"]
    for r in sorted(result["runs"], key=lambda r: (r["contender"], r["value"] or 0)):
        if r["seed"] == result["seeds"][0] and r["value"] is not None:
            lines.append(f"| {r['contender']} | {r['value']:g} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |")
    for threads, timing in result.get("timing_ms_per_step_by_threads", {}).items():
        adamw = timing["adamw"]
        lines += ["", f"Interleaved timing, one training step (forward, backward, clip, optimizer), median, {threads} "
                  "thread(s): " + ", ".join(f"{k} {v:.0f} ms ({v / adamw:.2f}x)" for k, v in timing.items())]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run_script(main)
