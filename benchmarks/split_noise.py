"""The noise floor of a comparison between runs: the same run trained in one pass per step and in two.

A micro-batch split changes float summation only (README, "micro_batch_size"), but training amplifies such
differences, Muon's orthogonalization more than AdamW. This trains a small Gemma 3 on real TinyStories (a BPE of
512 tokens prepared from the first --stories stories) for --steps steps, with every step's batch of --batch
sequences in one pass and in two of half as many, for each optimizer, and prints how far apart the two runs'
train and validation losses came. A difference between two runs of settings smaller than this is noise.

    python benchmarks/split_noise.py --steps 30 --stories 3000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYGEMMA_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file (it puts src/ first)

from common import cpu_description, output_file, positive_int, run_script  # noqa: E402

from tinygemma.config import load_recipe  # noqa: E402
from tinygemma.data import prepare  # noqa: E402
from tinygemma.files import atomic_write_json  # noqa: E402
from tinygemma.metrics import read_records  # noqa: E402
from tinygemma.train import train  # noqa: E402

MODEL = ["model.preset=gemma3-tiny", "model.d_model=64", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=1",
         "model.head_dim=16", "model.mlp_dim=128", "model.sliding_window=16", "model.query_pre_attn_scalar=16"]


def losses(run_dir: Path) -> tuple[dict, dict]:
    records = read_records(run_dir / "metrics.jsonl")
    return ({r["step"]: r["train_loss"] for r in records if "train_loss" in r},
            {r["step"]: r["val_loss"] for r in records if "val_loss" in r})


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=positive_int, default=30, help="optimizer steps per run (default 30)")
    p.add_argument("--stories", type=positive_int, default=3000, help="stories to prepare (default 3000)")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per step, an even number (default 8)")
    p.add_argument("--json", type=output_file, metavar="OUT", help="also write the results as JSON to OUT")
    args = p.parse_args()
    if args.batch % 2:
        p.error(f"--batch must be even (one pass of it against two of half), got {args.batch}")
    import torch

    torch.set_num_threads(1)  # the same summation order whatever the machine's cores
    results = {"machine": cpu_description(), "steps": args.steps, "batch": args.batch, "optimizers": {}}
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        prepare(data, sources=[SHARED / "data" / "tinystories" / "train.txt"], tokenizer="bpe", vocab_size=512,
                limit=args.stories, val_fraction=0.1, workers=1, progress=False)
        for optimizer in ("adamw", "muon"):
            runs = {}
            for micro in (args.batch, args.batch // 2):
                out = Path(work) / f"{optimizer}-{micro}"
                train(load_recipe(None, [*MODEL, f"data.dir={data}", f"train.out={out}", f"batch_size={args.batch}",
                                         "block_size=48", "grad_accum_steps=1", f"max_steps={args.steps}",
                                         f"warmup_steps={max(1, args.steps // 10)}", f"eval_interval={args.steps}",
                                         "checkpoint_interval=0", "dtype=float32", "compile=false", "device=cpu",
                                         "seed=1", f"optimizer={optimizer}", f"micro_batch_size={micro}"]),
                      quiet=True)
                runs[micro] = losses(out)
            (one_train, one_val), (two_train, two_val) = runs[args.batch], runs[args.batch // 2]
            results["optimizers"][optimizer] = {
                "max_train_loss_difference": max(abs(one_train[s] - two_train[s]) for s in one_train),
                "final_val_loss_difference": abs(one_val[args.steps] - two_val[args.steps]),
                "final_val_loss": one_val[args.steps]}
    print(f"{args.steps} steps of {args.batch} x 48 tokens, one pass against two, on {results['machine']}:")
    for optimizer, r in results["optimizers"].items():
        print(f"  {optimizer}: train losses at most {r['max_train_loss_difference']:.2g} apart, final validation "
              f"{r['final_val_loss_difference']:.2g} apart (of {r['final_val_loss']:.4f})")
    if args.json:
        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    run_script(main)
