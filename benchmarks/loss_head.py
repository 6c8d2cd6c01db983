"""The output head's loss alone: the chunked cross-entropy against F.cross_entropy on whole logits, forward and
backward, at the micro-batch sizes the trainer runs. What decides `train.loss_head = "auto"` per device
(parallelize.AUTO_FULL_LOSS_LOGITS).

Each contender computes what Gemma3.forward computes after the last block, through the same functions: the final
RMSNorm of the hidden states h [rows, d_model], the tied head's logits, the mean next-token cross-entropy, and
the gradients of h, the norm's gain and the head. `chunked` takes loss.LOSS_CHUNK_SIZE rows of logits at a time
(loss_chunk_size = 8192, the model's default); `full` makes the whole [rows, vocabulary] float32 logits and
calls F.cross_entropy on them (loss_chunk_size = 0), which torch.compile fuses with the head's product.
--compile compiles both, as the trainer compiles the model on CUDA; on a CPU the trainer runs eagerly. Compiled,
a third contender, `in-place`, is the chunked head with each chunk in the in-place form that eager mode runs
(loss._chunk_loss_in_place) traced instead of the fusible one (loss._chunk_loss_fusible): what the fusible
form gains under torch.compile.

The contenders take turns on the same inputs (common.time_interleaved; median of --steps after one untimed
step); their losses must agree. Peak memory (CUDA): the most allocated during a pass above what the inputs and
the head hold before it. The vocabulary is padded to a multiple of 128 on CUDA, as the trainer pads it there.

    python benchmarks/loss_head.py                      # this CPU: float32, eager, 1,024 and 4,096 rows
    python benchmarks/loss_head.py --device cuda --dtype bfloat16 --compile --rows 4096,16384,65536,131072
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file

from common import (  # noqa: E402
    device_description,
    device_sync,
    output_file,
    positive_int,
    positive_ints,
    run_script,
    time_interleaved,
)

from tinygemma import ModelConfig  # noqa: E402
from tinygemma import loss as loss_module  # noqa: E402
from tinygemma.devices import pick_device  # noqa: E402
from tinygemma.files import atomic_write_json  # noqa: E402
from tinygemma.loss import LOSS_CHUNK_SIZE, cross_entropy_from_hidden  # noqa: E402
from tinygemma.model import RMSNorm  # noqa: E402

HEADS = {"chunked": LOSS_CHUNK_SIZE, "full": 0}  # name -> loss_chunk_size
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


def in_place_form(run):
    """`run` (a compiled chunked head) with loss._chunk_loss_in_place traced where torch.compile takes the fusible
    form. Dynamo guards on the function it traced, so each form keeps its own compiled graph."""
    def call(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        fusible = loss_module._chunk_loss_fusible
        loss_module._chunk_loss_fusible = loss_module._chunk_loss_in_place
        try:
            return run(h, targets)
        finally:
            loss_module._chunk_loss_fusible = fusible
    return call


class Head(torch.nn.Module):
    """The final norm, the tied head and the loss, as Gemma3.forward runs them."""

    def __init__(self, config: ModelConfig, chunk_size: int):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.weight = torch.nn.Parameter(torch.randn(config.padded_vocab_size, config.d_model) * config.init_std)
        self.vocab_size, self.chunk_size = config.vocab_size, chunk_size

    def forward(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy_from_hidden(self.norm(h), self.weight, targets, self.chunk_size, self.vocab_size)


def measure(config: ModelConfig, rows: int, dtype: torch.dtype, device: torch.device, compile_: bool,
            steps: int, in_place: bool = True) -> dict:
    """Both heads at one row count: median ms per pass, peak memory, and the losses they agree on."""
    torch.manual_seed(0)
    names = [*HEADS, "in-place"] if compile_ and in_place else list(HEADS)
    heads = {name: Head(config, HEADS.get(name, LOSS_CHUNK_SIZE)).to(device) for name in names}
    for name in names[1:]:
        heads[name].load_state_dict(heads["chunked"].state_dict())
    h = torch.randn(rows, config.d_model, device=device, requires_grad=True)
    targets = torch.randint(0, config.vocab_size, (rows,), device=device)
    cuda = device.type == "cuda"
    peaks: dict[str, int] = {}
    passes_done: dict[str, int] = {}

    def one_pass(name: str, run) -> float:
        head = heads[name]
        h.grad = None
        head.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = run(h, targets)
        loss.backward()
        passes_done[name] = passes_done.get(name, 0) + 1
        # The timed passes' peak, not the warm-up's: that first pass compiles, and what compiling holds (inputs
        # cloned to try kernels on, say) is not what the head needs at each step.
        if cuda and passes_done[name] > 1:
            peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device) - before)
        return loss.detach()

    torch._dynamo.reset()  # each row count's two graphs fresh: dynamo keeps at most 8 per function
    runs = {name: torch.compile(head, dynamic=False) if compile_ else head for name, head in heads.items()}
    if "in-place" in runs:
        runs["in-place"] = in_place_form(runs["in-place"])
    passes = [lambda name=name: one_pass(name, runs[name]) for name in names]
    sync = device_sync(device)
    try:
        seconds, losses = time_interleaved(passes, steps, sync)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"rows": rows, "logits": rows * config.padded_vocab_size, "out_of_memory": True}
    losses = dict(zip(names, (loss.item() for loss in losses)))
    spread = max(abs(loss - losses["chunked"]) for loss in losses.values()) / abs(losses["chunked"])
    if spread > LOSS_RTOL[dtype]:
        raise SystemExit(f"loss_head: error: the heads' losses differ by {spread:.1e} at {rows} rows: {losses}")
    row = {"rows": rows, "logits": rows * config.padded_vocab_size, "loss": losses["chunked"]}
    for name, s in zip(names, seconds):
        row[name] = {"ms": 1000 * s, "tokens_per_s": rows / s,
                     "peak_memory_gib": peaks[name] / 2**30 if name in peaks else None}
    row["full_vs_chunked"] = row["chunked"]["ms"] / row["full"]["ms"]  # > 1: the full head is faster
    if "in-place" in runs:
        row["fusible_vs_in_place"] = row["in-place"]["ms"] / row["chunked"]["ms"]  # > 1: the fusible form is faster
    return row


def full_faster_up_to(results: list[dict]) -> int:
    """The most logits per micro-batch up to which the full head was faster at every size measured (0: at
    none), from the smallest size up: the bound "auto" can take on this device."""
    bound = 0
    for r in sorted(results, key=lambda r: r["logits"]):
        if r.get("out_of_memory") or r["full_vs_chunked"] <= 1.0:
            break
        bound = r["logits"]
    return bound


def markdown_table(results: list[dict]) -> str:
    """The heads' times per row count; compiled, also the chunked head's in-place form and what the fusible gains."""
    in_place = any("in-place" in r for r in results)
    extra = " chunked, in-place form | fusible vs in-place |" if in_place else ""
    lines = ["| rows | logits | chunked | full | full vs chunked | peak memory (chunked / full) |" + extra,
             "|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if in_place else "")]
    for r in results:
        if r.get("out_of_memory"):
            lines.append(f"| {r['rows']:,} | {r['logits'] / 1e6:,.1f}M | out of memory | | | |" + (" | |" if in_place else ""))
            continue
        c, f = r["chunked"], r["full"]
        memory = ("-" if c["peak_memory_gib"] is None
                  else f"{c['peak_memory_gib']:.2f} / {f['peak_memory_gib']:.2f} GiB")
        line = (f"| {r['rows']:,} | {r['logits'] / 1e6:,.1f}M | {c['ms']:,.2f} ms | {f['ms']:,.2f} ms "
                f"| {r['full_vs_chunked']:.2f}x | {memory} |")
        if in_place:
            line += f" {r['in-place']['ms']:,.2f} ms | {r['fusible_vs_in_place']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    p.add_argument("--preset", default="gemma3-270m-gpt2")
    p.add_argument("--vocab-size", type=positive_int, help="override the preset's vocabulary")
    p.add_argument("--d-model", type=positive_int, help="override the preset's width (a smaller smoke run)")
    p.add_argument("--rows", type=positive_ints, default=[1024, 4096],
                   help="comma-separated rows (tokens) per micro-batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="autocast dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile the heads (the trainer does on CUDA); adds the in-place form")
    p.add_argument("--no-in-place", action="store_true",
                   help="compiled, time only the two heads, not also the in-place form (a compile fewer per row count)")
    p.add_argument("--steps", type=positive_int, default=5, help="timed passes per head")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's)")
    p.add_argument("--json", type=output_file, help="write the figures here too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = pick_device(args.device), getattr(torch, args.dtype)
    overrides = {k: v for k, v in (("vocab_size", args.vocab_size), ("d_model", args.d_model)) if v}
    overrides["vocab_pad_multiple"] = 128 if device.type == "cuda" else 1
    config = ModelConfig.preset(args.preset, **overrides)
    results, sizes = [], args.rows

    def summary() -> dict:
        return {
            "command": "python benchmarks/loss_head.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "preset": args.preset, "d_model": config.d_model, "vocab_size": config.vocab_size,
            "padded_vocab_size": config.padded_vocab_size, "device": device_description(device),
            "torch": torch.__version__, "dtype": args.dtype, "compile": args.compile, "steps": args.steps,
            "chunk_size": LOSS_CHUNK_SIZE, "results": results, "full_faster_up_to_logits": full_faster_up_to(results),
            "table": markdown_table(results), "complete": len(results) == len(sizes),
        }

    for rows in sizes:
        results.append(measure(config, rows, dtype, device, args.compile, args.steps, not args.no_in_place))
        print(f"{rows} rows done", file=sys.stderr, flush=True)
        if args.json:  # after every row: a run stopped at a deadline keeps the rows it measured ("complete": false)
            atomic_write_json(Path(args.json), summary())
    result = summary()
    print(f"{args.preset} head ({config.padded_vocab_size:,} x {config.d_model}), {args.dtype}, "
          f"{'compiled' if args.compile else 'eager'}, {result['device']}, torch {torch.__version__}; forward and "
          f"backward, median of {args.steps} passes after one")
    print(result["table"])
    return result


if __name__ == "__main__":
    run_script(main)
