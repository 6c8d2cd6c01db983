"""Batch-1 greedy decoding speed: tinygemma's `Gemma3.generate` against transformers' `generate`.

Both models hold the same random weights (copied by `hf.to_transformers`) in the same dtype, on the
same CPU threads, and decode the same prompt greedily for the same number of new tokens. Each is warmed up
once; then the two alternate for `--repeats` timed runs each, and the medians are compared. Everything a user
waits for is timed on both sides: prefill, the decode steps, and (ours) packing the bf16 weights for oneDNN.
The machine is shared, so load from other processes shows up as noise; alternating spreads it over both.

    python benchmarks/generate_speed.py --dtype bf16            # the issue's target: >= 1.5x, aiming at 2x
    python benchmarks/generate_speed.py --dtype fp32 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file

from common import cpu_description, time_interleaved  # noqa: E402

from tinygemma import Gemma3, ModelConfig
from tinygemma.devices import dtype_name, parse_dtype
from tinygemma.generate import generate
from tinygemma.hf import to_transformers


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gemma3-270m-gpt2")
    p.add_argument("--dtype", default="bf16", help="bf16 or fp32, the same for both models")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)

    torch.manual_seed(args.seed)
    config = ModelConfig.preset(args.preset)
    model = Gemma3(config).eval().to(dtype)
    hf = to_transformers(model, attn_implementation="sdpa")  # the same weights, dtype and device
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed))
    n = args.new_tokens

    def ours():
        return generate(model, prompt, n, temperature=0)

    def theirs():
        with torch.no_grad():
            return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0, eos_token_id=None)

    (t_ours, t_theirs), (out_ours, out_theirs) = time_interleaved([ours, theirs], args.repeats)
    same = out_ours[0, args.prompt_tokens:] == out_theirs[0, args.prompt_tokens:]
    result = {
        "preset": args.preset, "dtype": dtype_name(dtype), "prompt_tokens": args.prompt_tokens,
        "new_tokens": n, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "tinygemma_tokens_per_s": round(n / t_ours, 2), "transformers_tokens_per_s": round(n / t_theirs, 2),
        "speedup": round(t_theirs / t_ours, 2),
        # In bf16 two correct implementations may round differently and part ways at a near-tie; the count of
        # equal leading tokens shows where.
        "same_tokens": bool(same.all()), "equal_leading_tokens": int(same.long().cumprod(0).sum()),
        "cpu": cpu_description(), "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
