"""Training throughput: tokens/s and MFU of one training step, tinygemma against two baselines in the same run.

Contenders, all on the same device, from the same initial weights, on the same batch:
  tinygemma           `Gemma3(config)(x, targets)`
  tinygemma-bf16stream  the same with its residual stream in bfloat16 under autocast (`Gemma3.residual_dtype`),
                      as a model with bf16 weights has it: the memory-bound norms and residual adds read and
                      write half the bytes (issue 19's lever at block 128). Under --dtype float32 it is
                      tinygemma itself
  tinygemma-flash     tinygemma with its sliding layers through FlashAttention-2's own window
                      (`attention_backend = "flash"`) whatever --attention says, for a block longer than the
                      window on CUDA (issue 19's lever at block 1024, beside --attention flex's tinygemma)
  transformers        `Gemma3ForCausalLM` with SDPA attention (its default), `labels=` its own loss
  transformers-eager  the same with eager attention (optional)
  NAME+compile        any of these through torch.compile, e.g. tinygemma+compile,transformers+compile
  NAME+tuned          the same with inductor's coordinate-descent tuning of its kernels' block sizes, as
                      modded-nanogpt compiles (a longer compile; issue 19's lever for the norms and GeGLU)
  NAME+autotune       the same with inductor's max_autotune option alone (the mode max-autotune-no-cudagraphs
                      adds coordinate-descent tuning, +tuned's): Triton templates timed against cuBLAS for each
                      product, and flex_attention's kernels' block sizes timed at this head size (issue 19's
                      lever at block 1024); minutes more of compiling
  NAME+regional       each decoder layer compiled on its own (as the trainer's `compile = regional`, torchtitan
                      and our FSDP2 path do), the embedding and loss head left eager: layers alike share one
                      compiled graph, so it compiles in a fraction of the time; whether the steady step loses
                      speed is what to measure
  workshop            the workshop notebook's model style (benchmarks/workshop_model.py): manual attention with
                      repeated K/V heads, bfloat16 weights with no float32 master under --dtype bfloat16, and the
                      workshop loop's autocast (CUDA only, as in the notebook) and loss / grad_accum_steps;
                      its head tied as the preset's, so that every contender trains the same function
  workshop-untied     the same with the notebook's own separate output head (164.7M parameters at 270M, where
                      tied is 132.5M), starting as a copy of the embedding: the notebook's code as it trained

A step is forward with loss, backward, gradient clipping at 0.5 and AdamW (the workshop loop's settings), then
`zero_grad(set_to_none=True)`; with --grad-accum N, N forward and backward passes (each loss / N, as the workshop
loop accumulates) before the clipping and AdamW, and a step's tokens are N batches'. Every contender runs that same loop, so the ratios measure model code and
precision handling, not the loop. Under --dtype bfloat16 tinygemma and transformers keep float32 weights and
run under autocast; the workshop model holds bfloat16 weights, as it did.

Honest figures: the contenders take turns (A, B, C, A, B, C, ...) so that noise from other processes falls on all
of them; the first --warmup rounds are not timed; the figure is the median step time; on CUDA the clock is read
only after `torch.cuda.synchronize()`. Before any timing the step-0 losses must agree (float32: to 1e-4 relative),
which shows that all contenders compute the same function on the same batch.

Peak memory (CUDA only) is what a contender would hold at the peak of its step if it ran alone: its weights
and optimizer state, plus the most its step allocated above what the process held before the step
(`torch.cuda.max_memory_allocated`, its peak reset before each step). The contenders share one process, so the
process-wide peak alone would count the others' weights too.

    python benchmarks/train_throughput.py --steps 4 --warmup 1              # this CPU: fp32, 8 x 128
    python benchmarks/train_throughput.py --steps 4 --warmup 1 --isolate 3  # each contender in its own process
    python benchmarks/train_throughput.py --device cuda --dtype bfloat16 --block-size 1024 --json out.json
    python benchmarks/train_throughput.py --device cuda --dtype bfloat16 --block-size 1024 --attention flex \
        --contenders tinygemma+compile,transformers+compile
    python benchmarks/train_throughput.py --device cuda --dtype bfloat16 --batch-size 32 --grad-accum 32 \
        --contenders workshop-untied                                # the workshop notebook's own loop
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # workshop_model beside this file

from common import device_description, non_negative_int, output_file, positive_int, run_script  # noqa: E402
from workshop_model import Gemma3Model, load_tinygemma_weights, workshop_config  # noqa: E402

from tinygemma import Gemma3, ModelConfig  # noqa: E402
from tinygemma.devices import pick_device  # noqa: E402
from tinygemma.files import atomic_write_json  # noqa: E402
from tinygemma.hf import to_transformers  # noqa: E402
from tinygemma.metrics import peak_flops as trainer_peak_flops  # noqa: E402
from tinygemma.parallelize import (  # noqa: E402
    CUDA_ONLY_ATTENTION,
    attention_cannot_train,
    compile_layers,
    flash_window_refusal,
)

CONTENDERS = ("tinygemma", "tinygemma-bf16stream", "tinygemma-flash", "transformers", "transformers-eager", "workshop", "workshop-untied")
# How a contender is compiled, by its name's suffix: torch.compile's inductor options.
COMPILE_SUFFIXES = {"+compile": {}, "+tuned": {"coordinate_descent_tuning": True}, "+autotune": {"max_autotune": True},
                    "+regional": {}}
REFERENCE = "transformers"  # ratios are against transformers with SDPA, its default attention
COMPILED = " (compile"  # a compiled contender's label: its name and this, then ")" or the suffix, as ", tuned)"

# The workshop loop's optimizer and clipping, used by every contender.
LEARNING_RATE, BETAS, WEIGHT_DECAY, ADAM_EPS = 1e-4, (0.9, 0.95), 0.1, 1e-9
CLIP_NORM = 0.5

# float32's dense peak FLOP/s without tensor cores (PyTorch does not use TF32 for float32 matmuls unless asked to),
# from NVIDIA's data sheets for the SXM parts; bf16's peaks are the trainer's (tinygemma.metrics.PEAK_BF16_FLOPS).
PEAK_FLOAT32_FLOPS = {"H100": 67e12, "H200": 67e12}
LOSS_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@dataclass
class Contender:
    name: str
    model: nn.Module
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y) -> mean loss
    autocast: bool  # run the forward under bfloat16 autocast
    optimizer: torch.optim.Optimizer | None = None

    def __post_init__(self):
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE, betas=BETAS,
                                           weight_decay=WEIGHT_DECAY, eps=ADAM_EPS)
        self.model.train()

    def step(self, x: torch.Tensor, y: torch.Tensor, grad_accum: int = 1) -> torch.Tensor:
        """`grad_accum` forward and backward passes (the workshop loop's loss / grad_accum_steps), then the
        clipping and AdamW; the last pass's loss."""
        for _ in range(grad_accum):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.forward(x, y)
            (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def randomize_norms(model: Gemma3, seed: int) -> None:
    """Norm gains start at zero; random ones make the step-0 loss check compare the (1 + w) gains too.
    (Throughput does not depend on the values.)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def transformers_twin(model: Gemma3, attn_implementation: str) -> nn.Module:
    """transformers' Gemma3ForCausalLM with `model`'s weights, in float32, in training mode."""
    return to_transformers(model, attn_implementation).float().train()


def build_contenders(names: list[str], config: ModelConfig, dtype: torch.dtype, device: torch.device,
                     compile: bool, seed: int, attention: str = "sdpa", block_size: int = 0) -> list[Contender]:
    """`compile` compiles tinygemma (as `tinygemma+compile`); `attention` is tinygemma's attention backend."""
    torch.manual_seed(seed)
    reference = Gemma3(config)
    randomize_norms(reference, seed)
    contenders = []
    for full_name in names:
        name, suffix, options = split_name(full_name)
        if options is None and compile and name.startswith("tinygemma"):
            options = {}
        compiled = options is not None
        how = "" if suffix in ("", "+compile") else ", " + suffix.removeprefix("+")  # ", tuned"
        label = name + (f"{COMPILED}{how})" if compiled else "")
        if name.startswith("tinygemma"):
            model = Gemma3(config)
            model.load_state_dict(reference.state_dict())
            model.to(device)
            model.attention_backend = "flash" if name == "tinygemma-flash" else attention
            if name == "tinygemma-bf16stream":
                model.residual_dtype = torch.bfloat16
            if attention == "flex" and block_size > config.sliding_window:
                model.sliding_block_mask(block_size, device)  # built before compiling, as training does
            run = compiled_model(model, model.layers, suffix, options)
            contenders.append(Contender(label, model, lambda x, y, m=run: m(x, y), dtype == torch.bfloat16))
        elif name.startswith("transformers"):
            model = transformers_twin(reference, "eager" if name.endswith("eager") else "sdpa").to(device)
            run = compiled_model(model, model.model.layers, suffix, options)
            # HF shifts `labels` itself; `shift_labels` hands it the targets already aligned with x, as ours.
            contenders.append(Contender(label, model, lambda x, y, m=run: m(
                input_ids=x, labels=y, shift_labels=y, use_cache=False).loss, dtype == torch.bfloat16))
        elif name in ("workshop", "workshop-untied") and not compiled:  # bfloat16 weights under --dtype bfloat16
            model = Gemma3Model(workshop_config(config, dtype, tied=False if name == "workshop-untied" else None))
            load_tinygemma_weights(model, reference.state_dict()).to(device)
            contenders.append(Contender(name, model, lambda x, y, m=model: m(x, y)[1],
                                        dtype == torch.bfloat16 and device.type == "cuda"))  # nullcontext on CPU
        else:
            raise SystemExit(f"unknown contender {full_name!r}; choose from {', '.join(CONTENDERS)} "
                             "(tinygemma and transformers also as NAME+compile, +tuned, +autotune or +regional)")
    return contenders


def compiled_model(model: nn.Module, layers: nn.ModuleList, suffix: str, options: dict | None) -> nn.Module:
    """What a contender calls: `model` itself (eager, or with each of `layers` compiled in place under
    +regional), or `model` through torch.compile with `options`, with static shapes as the trainer compiles."""
    if options is None:
        return model
    if suffix == "+regional":
        compile_layers(layers)  # as the trainer's compile = regional
        return model
    return torch.compile(model, dynamic=False, options=options or None)


def warm_compiler(device: torch.device) -> None:
    """Compile something trivial first, so that inductor's one-time start-up (its imports, its compiler's first
    run, on CUDA its pool of compile workers) falls on no contender's first step: the first step's figure is
    then that contender's own compiling. (Kernels inductor cached on disk from an earlier run still load rather
    than compile: TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 makes every contender compile cold.)"""
    torch.compile(lambda t: (t * 2).sum())(torch.ones(8, device=device))


def split_name(full_name: str) -> tuple[str, str, dict | None]:
    """A contender's name, its suffix and its compile options (None: eager)."""
    for suffix, options in COMPILE_SUFFIXES.items():
        if full_name.endswith(suffix):
            return full_name.removesuffix(suffix), suffix, options
    return full_name, "", None


def check_losses(losses: dict[str, float], dtype: torch.dtype) -> float:
    """The largest relative difference between step-0 losses; in float32 it must be within LOSS_RTOL."""
    values = list(losses.values())
    spread = (max(values) - min(values)) / abs(min(values))
    if spread > LOSS_RTOL[dtype]:
        message = f"step-0 losses differ by {spread:.2e} (relative), more than {LOSS_RTOL[dtype]:.0e}: {losses}"
        if dtype == torch.float32:
            raise SystemExit("the contenders do not compute the same function: " + message)
        print("warning: " + message, file=sys.stderr)  # bfloat16 weights round differently; report, go on
    return spread


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None  # no honest peak for a shared CPU
    if dtype != torch.float32:
        return trainer_peak_flops(device)
    name = torch.cuda.get_device_name(device)
    if "PCIe" in name or "NVL" in name:
        return None
    return next((peak for chip, peak in PEAK_FLOAT32_FLOPS.items() if chip in name), None)


def resident_bytes(c: Contender) -> int:
    """Bytes of a contender's weights, buffers (the workshop model's RoPE tables) and optimizer state (a tied
    weight counted once)."""
    tensors = {t.data_ptr(): t for t in (*c.model.parameters(), *c.model.buffers())}
    for state in c.optimizer.state.values():
        tensors.update((t.data_ptr(), t) for t in state.values() if isinstance(t, torch.Tensor))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def gib(n_bytes: float | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**30:.2f} GiB"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| contender | tokens/s | step time (median) | MFU | vs transformers | paired | loss at step 0 "
             "| peak memory | first step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        ratio, paired = ("-" if r[key] is None else f"{r[key]:.2f}x"
                         for key in ("ratio_vs_transformers", "paired_ratio_vs_transformers"))
        lines.append(f"| {r['contender']} | {r['tokens_per_s']:,.0f} | {1000 * r['step_time_s']:,.0f} ms | {mfu} "
                     f"| {ratio} | {paired} | {r['loss_step0']:.5f} | {gib(r.get('peak_memory_bytes'))} "
                     f"| {'-' if r.get('first_step_s') is None else format(r['first_step_s'], '.1f') + ' s'} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    p.add_argument("--preset", default="gemma3-270m-gpt2")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--block-size", type=positive_int, default=128)
    p.add_argument("--grad-accum", type=positive_int, default=1, help="forward/backward passes per optimizer step")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per contender (the median is reported)")
    p.add_argument("--warmup", type=positive_int, default=1,
                   help="untimed steps per contender first (at least 1: step 0 checks the losses, never timed)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the tinygemma contenders (only them)")
    p.add_argument("--attention", choices=("sdpa", "flex", "flash"), default="sdpa",
                   help="tinygemma's attention backend for sliding layers longer than the window (flex and flash "
                        "need CUDA)")
    p.add_argument("--contenders", default="tinygemma,transformers,workshop",
                   help=f"comma-separated, from {', '.join(CONTENDERS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=output_file, metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--isolate", type=non_negative_int, metavar="ROUNDS", default=0,
                   help="run each contender alone in its own process, the processes taking turns for ROUNDS "
                        "rounds (each of --warmup + --steps steps), instead of all in one process")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if split_name(n)[0] not in CONTENDERS]
    if unknown or not names:
        p.error(f"--contenders: {', '.join(unknown) or 'none given'}; choose from {', '.join(CONTENDERS)}, each "
                "optionally with +compile, +tuned, +autotune or +regional")
    # An unknown preset or a device not there: one line (UserError), before any process starts.
    config = ModelConfig.preset(args.preset)
    device = pick_device("cuda" if args.device == "auto" and torch.cuda.is_available()
                         else "cpu" if args.device == "auto" else args.device)
    asked = {args.attention: ("--attention " + args.attention, "use --attention sdpa")}
    if any(split_name(n)[0] == "tinygemma-flash" for n in names):
        asked["flash"] = ("tinygemma-flash", "leave it out")
    for backend, (what, instead) in asked.items():
        if attention_cannot_train(backend, args.block_size, config, device):
            p.error(f"{what} needs a CUDA GPU for a block longer than the sliding window "
                    f"({CUDA_ONLY_ATTENTION[backend]}); {instead}")
        refusal = backend == "flash" and args.block_size > config.sliding_window and flash_window_refusal(
            device, getattr(torch, args.dtype), config.n_heads, config.n_kv_heads, config.head_dim, config.sliding_window)
        if refusal:  # (as the trainer's start: float32, a GPU older than Ampere), before any contender compiles
            p.error(f"{what}: FlashAttention-2's window does not run here ({refusal}); {instead}")
    if args.isolate:
        return run_isolated(args, argv, names)

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # as tensors name it: the block mask's cache key
    dtype = getattr(torch, args.dtype)
    contenders = build_contenders(names, config, dtype, device, args.compile, args.seed, args.attention,
                                  args.block_size)

    if any(COMPILED in c.name for c in contenders):
        warm_compiler(device)

    # One fixed batch for every contender and every step: throughput does not depend on the token values.
    g = torch.Generator().manual_seed(args.seed)
    window = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size + 1), generator=g)
    x, y = window[:, :-1].contiguous().to(device), window[:, 1:].contiguous().to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {c.name: [] for c in contenders}
    firsts = {}  # the first step's time: compiling, for a compiled contender
    losses = {c.name: [] for c in contenders}
    peaks = {c.name: [] for c in contenders}
    tokens = args.batch_size * args.block_size * args.grad_accum
    peak = peak_flops(device, dtype)
    flops_per_token = config.flops_per_token(args.block_size)
    described = device_description(device)  # once: on a CPU it reads /proc/cpuinfo

    def rows() -> list[dict]:
        table = [result_row(c.name, times[c.name], losses[c.name], tokens, flops_per_token, peak,
                            max(peaks[c.name], default=None), firsts[c.name]) for c in contenders]
        add_ratios(table, [[t] for t in zip(*(r["step_times_s"] for r in table))])
        return table

    for r in range(args.warmup + args.steps):
        step_times = []
        for c in contenders:  # interleaved: A, B, C, A, B, C, ...
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                held_before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            loss = c.step(x, y, args.grad_accum)
            sync()
            elapsed = time.perf_counter() - start
            step_times.append(elapsed)
            losses[c.name].append(loss.item())
            firsts.setdefault(c.name, elapsed)
            if r >= args.warmup:
                times[c.name].append(elapsed)
                if device.type == "cuda":
                    step_peak = torch.cuda.max_memory_allocated(device) - held_before
                    peaks[c.name].append(resident_bytes(c) + step_peak)
        if r == 0:
            spread = check_losses({name: v[0] for name, v in losses.items()}, dtype)
        status = "warm-up" if r < args.warmup else "timed"
        # each step's seconds too (the first round's: compiling), so that a run stopped from outside has said them
        print(f"round {r + 1}/{args.warmup + args.steps} ({status}): "
              + ", ".join(f"{c.name} {losses[c.name][-1]:.4f} in {t:.3f} s" for c, t in zip(contenders, step_times)),
              file=sys.stderr, flush=True)
        if args.json and args.warmup <= r < args.warmup + args.steps - 1:  # the figures so far, for a stopped run
            atomic_write_json(args.json, result_of(args, argv, rows(), described, flops_per_token, peak, spread,
                                                   complete=False))

    return report(args, argv, rows(), described, flops_per_token, peak, spread,
                  f"median of {args.steps} steps after {args.warmup} warm-up, interleaved in one process")


def result_row(contender: str, step_times: list[float], losses: list[float], tokens: int,
               flops_per_token: float, peak: float | None, peak_memory: int | None = None,
               first_step: float | None = None) -> dict:
    """One contender's figures from its timed step times (median) and its losses (step 0 first); peak memory
    in bytes (CUDA only, see the module's docstring); the first step's seconds (compiling, where it compiles)."""
    step_time = statistics.median(step_times)
    return {
        "contender": contender, "tokens_per_s": tokens / step_time, "step_time_s": step_time,
        "step_times_s": step_times, "mfu": flops_per_token * tokens / step_time / peak if peak else None,
        "loss_step0": losses[0], "losses": losses, "peak_memory_bytes": peak_memory, "first_step_s": first_step,
    }


def add_ratios(rows: list[dict], rounds: list[list[tuple[float, ...]]]) -> None:
    """Each row's speed against transformers': the ratio of the median step times, and the median over rounds
    of the ratio of each round's median step times. A round's contenders ran back to back, so load that drifts
    over the run cancels out of the paired ratio, where it does not between two medians. `rounds[i]` holds
    the step times of round i, one tuple per step with one time per row. A compiled row is compared with
    transformers compiled the same way where that ran too (like with like), else with transformers plainly
    compiled, else eager."""
    index = {r["contender"]: i for i, r in enumerate(rows)}
    for i, r in enumerate(rows):
        how = r["contender"][r["contender"].find(COMPILED):] if COMPILED in r["contender"] else ""
        # compiled alike ("transformers (compile, tuned)"), else plainly compiled, else eager
        labels = [REFERENCE + how, f"{REFERENCE}{COMPILED})", REFERENCE] if how else [REFERENCE]
        ref = next((index[label] for label in labels if label in index), None)
        if ref is None:
            r["ratio_vs_transformers"] = r["paired_ratio_vs_transformers"] = None
            continue
        r["ratio_vs_transformers"] = rows[ref]["step_time_s"] / r["step_time_s"]
        r["paired_ratio_vs_transformers"] = statistics.median(
            statistics.median(step[ref] for step in rnd) / statistics.median(step[i] for step in rnd)
            for rnd in rounds)


def result_of(args, argv, rows: list[dict], device: str, flops_per_token: float, peak, spread: float,
              complete: bool = True) -> dict:
    """The JSON's figures; `complete` false while timed rounds are still to come (their medians so far)."""
    return {
        "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset": args.preset, "batch_size": args.batch_size, "block_size": args.block_size,
        "grad_accum": args.grad_accum, "dtype": args.dtype,
        "steps": args.steps, "warmup": args.warmup, "isolate": args.isolate, "compile": args.compile,
        "attention": args.attention,
        "device": device, "torch": torch.__version__, "flops_per_token": flops_per_token, "peak_flops": peak,
        "step0_loss_spread": spread, "complete": complete, "results": rows,
    }


def report(args, argv, rows: list[dict], device: str, flops_per_token: float, peak, spread: float,
           how: str) -> dict:
    result = result_of(args, argv, rows, device, flops_per_token, peak, spread)
    print(f"{args.preset}, batch {args.batch_size} x block {args.block_size} x {args.grad_accum} pass(es), "
          f"{args.dtype}, {device}, "
          f"torch {torch.__version__}; {how}")
    print(markdown_table(rows))
    if args.json:
        atomic_write_json(args.json, result)  # a kill mid-write leaves no half file for the suite to read
    return result


def run_isolated(args, argv, names: list[str]) -> dict:
    """--isolate: every contender in a process of its own, so that none runs in a heap shaped by another's
    allocations (on a CPU, a fresh 100 MB tensor costs more in page faults than the arithmetic on it, and how
    many a step takes depends on what ran before in the process). The processes take turns, round by round."""
    import subprocess
    import tempfile

    common = ["--preset", args.preset, "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
              "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--grad-accum", str(args.grad_accum),
              "--device", args.device, "--seed", str(args.seed), "--attention", args.attention]
    common += ["--compile"] if args.compile else []
    runs = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.isolate):
            for name in names:
                out = os.path.join(tmp, f"{r}-{name}.json")
                child_run = subprocess.run([sys.executable, os.path.abspath(__file__), *common, "--contenders",
                                            name, "--json", out], stdout=subprocess.DEVNULL)
                if child_run.returncode != 0:  # it said why on stderr, which it shares with this process
                    raise SystemExit(f"--isolate: the {name} process failed (exit status {child_run.returncode})")
                with open(out, encoding="utf-8") as f:
                    child = json.load(f)
                runs[name].append(child["results"][0])
                print(f"round {r + 1}/{args.isolate}: {child['results'][0]['contender']} median "
                      f"{child['results'][0]['step_time_s']:.3f} s", file=sys.stderr, flush=True)
    spread = check_losses({name: v[0]["loss_step0"] for name, v in runs.items()}, getattr(torch, args.dtype))
    tokens = args.batch_size * args.block_size * args.grad_accum
    flops_per_token, peak = child["flops_per_token"], child["peak_flops"]
    rows = [result_row(runs[name][0]["contender"], [t for run in runs[name] for t in run["step_times_s"]],
                       runs[name][0]["losses"], tokens, flops_per_token, peak,
                       max((run["peak_memory_bytes"] for run in runs[name] if run["peak_memory_bytes"]),
                           default=None), runs[name][0]["first_step_s"]) for name in names]
    rounds = [list(zip(*(runs[name][r]["step_times_s"] for name in names))) for r in range(args.isolate)]
    add_ratios(rows, rounds)
    return report(args, argv, rows, child["device"], flops_per_token, peak, spread, f"{args.isolate} rounds of {args.steps} steps after {args.warmup} warm-up, "
                          "each contender in its own process")


if __name__ == "__main__":
    run_script(main)
