"""Optimizer step time alone: AdamW against MuonAdamW with each Newton-Schulz backend, on one model's parameters.

A training step's optimizer share is what decides between Muon's backends on a device, and it is cheap to
measure apart from the model: this times `optimizer.step()` only, for the parameters of a preset, with the
same fixed gradients for every contender.

Contenders (each with its own copy of the weights and its own state, taking turns round by round):
  adamw           torch.optim.AdamW as `optimizer = "adamw"` builds it (fused on CUDA)
  muon-torch      MuonAdamW, Muon through torch.optim.Muon's functional form: bf16, one matrix at a time
                  (no default chooses it since 2026-12-05); needs torch >= 2.9
  muon-float32    MuonAdamW, our iteration in float32, same-shape matrices batched (the default on a CPU
                  without native bf16)
  muon-float16    MuonAdamW, our batched iteration in float16 (the default on a GPU without bf16: a T4, a
                  V100; not in the default contenders, which the lent H100/H200 run)
  muon-bfloat16   MuonAdamW, our batched iteration in bf16 (the default where the device computes bf16
                  natively: optim.muon_backend)
  muon-compiled   MuonAdamW, our bf16 update torch.compile'd, one graph per group of same-shape matrices, the
                  learning rate a device tensor (no default chooses it yet: this measures it; its compilation
                  falls in the untimed first step)

On CUDA the clock is read after `torch.cuda.synchronize()`; the figure is the median of --steps timed rounds
after --warmup untimed ones (at least two: the first checks that every Muon backend moved the Muon matrices
alike, the last is common.time_interleaved's own). muon-compiled starts last: the others are timed and their
figures written to --json first ("complete": false), so a run stopped while it compiles keeps them; then all
are timed again, in turn, for the final figures.

    python benchmarks/optimizer_step.py                                   # gemma3-tiny on this CPU
    python benchmarks/optimizer_step.py --preset gemma3-270m-gpt2 --device cuda --json optimizer_step.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file

from common import device_description, device_sync, output_file, positive_int, run_script, time_interleaved  # noqa: E402

from tinygemma import Gemma3, ModelConfig  # noqa: E402
from tinygemma.config import load_recipe  # noqa: E402
from tinygemma.devices import pick_device  # noqa: E402
from tinygemma.files import atomic_write_json  # noqa: E402
from tinygemma.optim import MUON_BACKENDS, MuonAdamW, configure_optimizer, muon_parameters  # noqa: E402
from tinygemma.runtime import Runtime  # noqa: E402


def build(name: str, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The contender's optimizer exactly as training configures it, its Muon backend then set by name."""
    if name == "adamw":
        return configure_optimizer(model, load_recipe(None, ["optimizer=adamw"]).train, Runtime(device, torch.float32))
    backend = name.removeprefix("muon-")
    if backend not in MUON_BACKENDS:
        raise SystemExit(f"optimizer_step: error: unknown contender {name!r}")
    optimizer = configure_optimizer(model, load_recipe(None, ["optimizer=muon"]).train, Runtime(device, torch.float32))
    assert isinstance(optimizer, MuonAdamW)
    optimizer.backend = backend
    return optimizer


def markdown_table(median: dict[str, float]) -> str:
    """Each contender's median step in ms, and against AdamW's (the first contender's without it)."""
    reference = median.get("adamw", next(iter(median.values()), None))
    return "\n".join(["| contender | ms per step | vs adamw |", "|---|---:|---:|",
                      *(f"| {name} | {1000 * t:,.2f} | {t / reference:.2f}x |" for name, t in median.items())])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    p.add_argument("--preset", default="gemma3-tiny")
    p.add_argument("--vocab-size", type=positive_int, help="override the preset's vocabulary (e.g. 4096 for cpu-demo's BPE)")
    p.add_argument("--n-layers", type=positive_int, help="override the preset's layer count (a smaller smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--contenders", default="adamw,muon-torch,muon-float32,muon-bfloat16,muon-compiled")
    p.add_argument("--steps", type=positive_int, default=20, help="timed rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (at least 2)")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's)")
    p.add_argument("--json", type=output_file, help="write the figures here too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    names = [n for n in args.contenders.split(",") if n]
    if "muon-torch" in names and not hasattr(torch.optim, "Muon"):
        print("optimizer_step: muon-torch skipped: this torch has no torch.optim.Muon", file=sys.stderr)
        names.remove("muon-torch")

    overrides = {k: v for k, v in (("vocab_size", args.vocab_size), ("n_layers", args.n_layers)) if v}
    torch.manual_seed(0)
    base = Gemma3(ModelConfig.preset(args.preset, **overrides)).to(device)
    g = torch.Generator(device=device).manual_seed(1)
    grads = {n: 1e-3 * torch.randn(p.shape, generator=g, device=device) for n, p in base.named_parameters()}
    models = {name: copy.deepcopy(base) for name in names}
    optimizers, moved = {}, {}
    muon_names = muon_parameters(base)  # only Muon's matrices: AdamW's embedding would dominate the norm
    before = dict(base.named_parameters())
    untimed = max(2, args.warmup)  # the agreement check's round, and time_interleaved's own last one
    sync = device_sync(device)

    def start(group: list[str]) -> None:
        """Build the group's optimizers and take one step each (muon-compiled compiles here), recording how far
        each moved Muon's matrices from the common start; then the untimed rounds."""
        for name in group:
            optimizers[name] = build(name, models[name], device)
            for n, p in models[name].named_parameters():  # the gradients stay put: nothing here writes or zeroes them
                p.grad = grads[n]
        for name in group:
            optimizers[name].step()
            moved[name] = torch.cat([(p.detach() - before[n].detach()).flatten().float()
                                     for n, p in models[name].named_parameters() if n in muon_names])
        for _ in range(untimed - 2):
            for name in group:
                optimizers[name].step()

    def timed(group: list[str]) -> dict[str, float]:
        seconds, _ = time_interleaved([optimizers[name].step for name in group], args.steps, sync)
        return dict(zip(group, seconds))

    def agreement() -> dict[str, float] | None:
        """Each Muon backend's first step against the first's, relative; None (said) where one differs."""
        muons = [n for n in names if n in moved and n.startswith("muon-")]
        rel = {n: ((moved[n] - moved[muons[0]]).norm() / moved[muons[0]].norm()).item() for n in muons[1:]}
        for n, value in rel.items():
            if value > 5e-2:
                print(f"optimizer_step: error: {n}'s first step differs from {muons[0]}'s by {value:.1%}", file=sys.stderr)
                return None
        return rel

    def write(median: dict[str, float], rel: dict[str, float], complete: bool, untimed_rounds: dict) -> None:
        if args.json:
            atomic_write_json(args.json, {  # a kill mid-write leaves no half file for the suite to read
                "command": "python benchmarks/optimizer_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "preset": args.preset, "parameters": params, "device": device_description(device),
                "torch": torch.__version__, "steps": args.steps, "warmup": untimed, "untimed_rounds": untimed_rounds,
                "ms_per_step": {n: 1000 * m for n, m in median.items()}, "first_step_relative_difference": rel,
                "complete": complete, "not_measured": [n for n in names if n not in median],
                "table": markdown_table(median),
            })

    # The compiled backend last, after the others' figures are written: its compilation can take a minute on a
    # GPU, and a run stopped there (the acceptance run's deadline) keeps the backends it did time.
    params = sum(p.numel() for p in base.parameters())
    eager, later = [n for n in names if n != "muon-compiled"], [n for n in names if n == "muon-compiled"]
    # Untimed steps before the final figures: the eager ones' first timing counts among theirs once muon-compiled runs
    rounds = {n: untimed + (args.steps + 1 if later and n in eager else 0) for n in names}
    start(eager)
    if (rel := agreement()) is None:
        return 1
    median = timed(eager) if eager else {}
    if later:
        write(median, rel, complete=False, untimed_rounds={n: untimed for n in median})
        start(later)
        if (rel := agreement()) is None:
            return 1
        median = timed(names)  # all of them again, in turn: the figures of one timing
    print(f"{args.preset} ({params:,} parameters), {device_description(device)}, torch {torch.__version__}; "
          f"optimizer.step() alone, median of {args.steps} rounds after "
          + (f"{untimed} to {max(rounds.values())}" if later and eager else f"{untimed}") + " untimed")
    print(markdown_table(median))
    write(median, rel, complete=True, untimed_rounds=rounds)
    return 0


if __name__ == "__main__":
    run_script(main)
