"""CPU decoding speed of the GGUF export in llama.cpp (through llama-cpp-python) against `tinygemma generate`.

One model (random weights, seeded) is saved as a tinygemma checkpoint with the GPT-2 tokenizer and exported with
`tinygemma.gguf_export.export_gguf` in each dtype; the file sizes are recorded. Then tinygemma (in the dtype
`tinygemma generate` picks by default on this machine, or --tinygemma-dtype) and llama.cpp on each --dtypes file
decode the same prompt greedily for the same number of new tokens, on the same number of CPU threads, each in
a process of its own (torch and llama.cpp each bring an OpenMP runtime). Every timed run includes the prefill, as
a user waits for it; llama.cpp starts each run from an empty KV cache. The contenders alternate for --repeats
timed runs after one warm-up each (common.time_interleaved), and the medians give tokens/s. Random weights decode through near-ties, so the tokens themselves are not compared here; the
tests compare them on trained models.

    python benchmarks/gguf_decode.py --threads 2 --json benchmarks/results/gguf_decode_cpu.json
    python benchmarks/gguf_decode.py --preset gemma3-tiny --new-tokens 16 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file

from common import cpu_description, output_file, positive_int, run_script, time_interleaved  # noqa: E402

from tinygemma import Gemma3, ModelConfig
from tinygemma.checkpoint import load, save_model
from tinygemma.devices import dtype_name, pick_device, pick_dtype
from tinygemma.files import atomic_write_json
from tinygemma.generate import generate
from tinygemma.gguf_export import GGUF_DTYPES, export_gguf
from tinygemma.tokenizer import load_tokenizer


def _serve(kind: str, path: str, dtype: str, threads: int, prompt: list[int], n: int, conn) -> None:
    """A contender in its own process: build it, then decode `n` tokens after `prompt` greedily each time asked,
    sending back the tokens. llama.cpp and torch each bring an OpenMP runtime; apart, neither one's waiting
    threads take cores from the other's work."""
    torch.set_num_threads(threads)
    if kind == "tinygemma":
        model = load(path, dtype=dtype)
        ids = torch.tensor([prompt])

        def decode() -> list[int]:
            return generate(model, ids, n, temperature=0)[0, len(prompt):].tolist()
    else:
        import llama_cpp

        llm = llama_cpp.Llama(path, n_ctx=len(prompt) + n + 16, n_threads=threads, n_threads_batch=threads,
                              verbose=False)

        def decode() -> list[int]:
            llm.reset()  # an empty cache: the prefill is timed, as on our side
            new = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                new.append(token)
                if len(new) == n:
                    return new
            return new
    conn.send("ready")
    while conn.recv():
        conn.send(decode())
    conn.close()


def start_contender(kind: str, path: Path, dtype: str, threads: int, prompt: list[int], n: int):
    """(process, function that runs one decode in it and returns its tokens)."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    process = ctx.Process(target=_serve, args=(kind, str(path), dtype, threads, prompt, n, theirs), daemon=True)
    process.start()
    theirs.close()  # the child's end: held here too, a child that dies would never close the pipe to this side
    try:
        ready = ours.recv()
    except EOFError:  # it died while loading (its traceback is on stderr, which it shares)
        ready = None
    if ready != "ready":
        process.join()
        raise SystemExit(f"gguf_decode: the {kind} contender failed to start (exit status {process.exitcode})")

    def run() -> list[int]:
        ours.send(True)
        return ours.recv()

    return process, ours, run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    p.add_argument("--preset", default="gemma3-270m-gpt2")
    p.add_argument("--dtypes", default="q8_0,f16", help=f"GGUF files to time, of {', '.join(GGUF_DTYPES)}")
    p.add_argument("--tinygemma-dtype", default="auto", help="auto (what `tinygemma generate` picks), float32, bfloat16")
    p.add_argument("--prompt-tokens", type=positive_int, default=16)
    p.add_argument("--new-tokens", type=positive_int, default=128)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="CPU threads, the same for both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=output_file, default=None, help="also write the result here")
    args = p.parse_args(argv)
    timed = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not timed or set(timed) - set(GGUF_DTYPES):
        p.error(f"--dtypes: {', '.join(sorted(set(timed) - set(GGUF_DTYPES))) or 'none given'}; choose from "
                f"{', '.join(GGUF_DTYPES)}")
    import llama_cpp

    tokenizer = load_tokenizer("gpt2")
    torch.manual_seed(args.seed)
    model = Gemma3(ModelConfig.preset(args.preset, vocab_size=tokenizer.vocab_size)).eval()
    prompt = torch.randint(0, tokenizer.vocab_size, (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(args.seed)).tolist()
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_model(model, tmp / "ckpt", {"tokenizer": tokenizer.save(tmp / "ckpt")})
        sizes = {dtype: export_gguf(tmp / "ckpt", tmp / f"{dtype}.gguf", dtype)["bytes"] for dtype in GGUF_DTYPES}
        ours_dtype = pick_dtype(args.tinygemma_dtype, pick_device("cpu"))
        contenders = [start_contender("tinygemma", tmp / "ckpt", dtype_name(ours_dtype), args.threads, prompt, n)]
        contenders += [start_contender("llama.cpp", tmp / f"{dtype}.gguf", "", args.threads, prompt, n)
                       for dtype in timed]
        try:
            times, outs = time_interleaved([run for _, _, run in contenders], args.repeats)
        finally:
            for process, conn, _ in contenders:
                conn.send(False)
                process.join()
    assert all(len(out) == n for out in outs)
    result = {
        "preset": args.preset, "parameters": model.num_params(), "prompt_tokens": args.prompt_tokens,
        "new_tokens": n, "repeats": args.repeats, "threads": args.threads,
        "tinygemma_dtype": dtype_name(ours_dtype), "tinygemma_tokens_per_s": round(n / times[0], 2),
        "llama_cpp_tokens_per_s": {dtype: round(n / t, 2) for dtype, t in zip(timed, times[1:])},
        "speedup_vs_tinygemma": {dtype: round(times[0] / t, 2) for dtype, t in zip(timed, times[1:])},
        "file_bytes": sizes, "cpu": cpu_description(), "torch": torch.__version__,
        "llama_cpp_python": llama_cpp.__version__, "gguf": importlib.metadata.version("gguf"),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_json(Path(args.json), result)  # a kill mid-write leaves no half file
    return result


if __name__ == "__main__":
    run_script(main)
