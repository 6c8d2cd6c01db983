"""Past the trained block: how well a model predicts positions beyond the windows it trained on.

A model trained on windows of `train.block_size` tokens never read a position past them. `tinygemma generate`
therefore reads at most that many tokens at once by default (`--context trained`: generate.CachedReader, which
reads the text's last three quarters anew each time its cache fills), where transformers and llama.cpp read every
position. This measures both on validation text: windows of --length tokens from the prepared data's validation
split, each token's next-token loss (1) with every earlier token read, as transformers reads them, and (2) with
what the cached reader of the trained block holds, grouped by position.

    python benchmarks/past_block.py --ckpt runs/block32 --data data/block32 --length 256
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file (it puts src/ first)

from common import cpu_description, output_file, positive_int, run_script  # noqa: E402

from tinygemma.files import atomic_write_json  # noqa: E402


def reader_starts(length: int, context: int) -> list[int]:
    """For each token i of a text (0 to length - 1), where the text the cached reader of `context` holds after
    reading it begins (it predicts token i + 1 from tokens start..i), as generate.CachedReader crops it."""
    start, starts = 0, []
    for i in range(length):
        if i + 1 - start > context:
            start = i + 1 - (context - context // 4)
        starts.append(start)
    return starts


def position_losses(model, windows, context: int):
    """[positions] mean losses over the windows [N, length + 1]: each token read with all before it, and read as
    the reader of `context` reads it (one forward per stretch the reader keeps)."""
    import torch
    import torch.nn.functional as F

    x, targets = windows[:, :-1], windows[:, 1:]

    def losses(inputs, wanted):
        logits = model(inputs).float()
        return F.cross_entropy(logits.transpose(1, 2), wanted, reduction="none")

    with torch.no_grad():
        full = losses(x, targets).mean(0)
        cropped = torch.empty_like(full)
        starts = reader_starts(x.shape[1], context)
        for start in sorted(set(starts)):
            read = [i for i, s in enumerate(starts) if s == start]  # (consecutive tokens)
            end = read[-1] + 1
            cropped[read[0]:end] = losses(x[:, start:end], targets[:, start:end]).mean(0)[read[0] - start:]
    return full, cropped


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a training run or checkpoint of tinygemma's (its block recorded)")
    p.add_argument("--data", required=True, help="the prepared data it trained on (its validation split is read)")
    p.add_argument("--length", type=positive_int, default=256, help="tokens per window (default 256)")
    p.add_argument("--windows", type=positive_int, default=300, help="windows of validation text (default 300)")
    p.add_argument("--json", type=output_file, metavar="OUT", help="also write the results as JSON to OUT")
    args = p.parse_args()
    import numpy as np
    import torch

    from tinygemma.checkpoint import load, trained_block_size
    from tinygemma.data import open_prepared
    from tinygemma.errors import UserError

    block = trained_block_size(args.ckpt)
    if block is None:
        raise UserError(f"{args.ckpt} records no training block size")
    model = load(args.ckpt, dtype="float32", device="cpu")
    val = np.asarray(open_prepared(args.data).split("val"), dtype=np.int64)
    n = min(args.windows, len(val) // (args.length + 1))
    if n == 0:
        raise UserError(f"the validation split holds {len(val):,} tokens, fewer than one window of {args.length + 1}")
    windows = torch.from_numpy(val[: n * (args.length + 1)].reshape(n, args.length + 1))
    full, cropped = position_losses(model, windows, block)
    edges = sorted({0, block // 4, block // 2, 3 * block // 4, *range(block, args.length, block), args.length})
    groups = [{"positions": [a, b - 1], "all_read": round(float(full[a:b].mean()), 4),
               "trained_block_read": round(float(cropped[a:b].mean()), 4)} for a, b in zip(edges, edges[1:])]
    results = {"machine": cpu_description(), "ckpt": str(args.ckpt), "block_size": block, "windows": n,
               "length": args.length, "groups": groups}
    print(f"{n} validation windows of {args.length} tokens, a model trained on {block}-token blocks; mean loss "
          f"(nats) of the token predicted at each position, on {results['machine']}:")
    print(f"{'positions':>12} {'every token read':>17} {f'at most {block} read':>17}")
    for g in groups:
        a, b = g["positions"]
        print(f"{f'{a}-{b}':>12} {g['all_read']:>17.4f} {g['trained_block_read']:>17.4f}")
    if args.json:
        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    run_script(main)
