"""Data-preparation throughput: `tinygemma prepare` against the workshop notebook's pipeline, same text, same cores.

The workshop pipeline (nanoGPT's prepare.py): a `datasets.Dataset` of stories, `.map` calling tiktoken's
`encode_ordinary` on each story with N processes, then a uint16 memmap of the total length filled shard by
shard. Ours: `tinygemma.data.prepare` with N workers, from the .txt file to train.bin/val.bin/meta.json.

The workshop is timed from a Dataset already in memory (as if loaded from the hub cache); ours from the text
file, parsing included, plus a validation split (valid.txt) the workshop does not make. Both favour the
workshop. The runs alternate, best of --rounds each. The tokens are checked identical: the workshop wrote no
end-of-text token, so ours are compared with those removed (tiktoken never gives id 50256 for ordinary text),
and ours must hold exactly one per story.

    python benchmarks/prepare_throughput.py --workers 2 --repeat 16 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYGEMMA_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "data" / "tinystories"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file (it puts src/ first)

from common import cpu_description, positive_int, run_script  # noqa: E402

from tinygemma.data import available_cpus, open_prepared, prepare  # noqa: E402
from tinygemma.tokenizer import GPT2Tokenizer  # noqa: E402

EOT = "<|endoftext|>"


def workshop(stories: list[str], workers: int, out: Path) -> tuple[float, np.ndarray]:
    """The notebook's way, timed from an in-memory Dataset to a flushed memmap."""
    import datasets

    encoding = GPT2Tokenizer().encoding
    dataset = datasets.Dataset.from_dict({"text": stories})

    def process(example):
        ids = encoding.encode_ordinary(example["text"])
        return {"ids": ids, "len": len(ids)}

    started = time.perf_counter()
    tokenized = dataset.map(process, remove_columns=["text"], num_proc=workers)
    arr_len = np.sum(tokenized["len"], dtype=np.uint64)
    arr = np.memmap(out, dtype=np.uint16, mode="w+", shape=(arr_len,))
    total_batches = min(1024, len(tokenized))
    idx = 0
    for batch_idx in range(total_batches):
        batch = tokenized.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
        arr_batch = np.concatenate(batch["ids"])
        arr[idx: idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    return time.perf_counter() - started, np.asarray(arr)


def ours(text_file: Path, workers: int, out: Path) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    prepare(out, sources=[text_file], val_sources=[STORIES / "valid.txt"], workers=workers, progress=False)
    return time.perf_counter() - started, np.asarray(open_prepared(out).split("train"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=positive_int, default=available_cpus())
    parser.add_argument("--repeat", type=positive_int, default=16, help="copies of train.txt to tokenize")
    parser.add_argument("--rounds", type=positive_int, default=2, help="alternating runs of each; the best counts")
    args = parser.parse_args(argv)

    import datasets

    datasets.disable_caching()
    datasets.disable_progress_bars()
    text = (STORIES / "train.txt").read_text(encoding="utf-8") * args.repeat
    stories = [s.strip() for s in text.split(f"\n{EOT}\n") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text_file = tmp / "train.txt"
        text_file.write_text(text, encoding="utf-8")
        times = {"workshop": [], "tinygemma": []}
        for round_ in range(args.rounds):
            t, theirs = workshop(stories, args.workers, tmp / f"workshop{round_}.bin")
            times["workshop"].append(t)
            t, mine = ours(text_file, args.workers, tmp / f"ours{round_}")
            times["tinygemma"].append(t)
            eot = GPT2Tokenizer().eot_id
            assert int((mine == eot).sum()) == len(stories), "one end-of-text token per story"
            assert np.array_equal(mine[mine != eot], theirs), "tokens differ from the workshop's"
            del theirs, mine
    mb = len(text.encode("utf-8")) / 1e6
    print(f"{len(stories):,} stories, {mb:.1f} MB, workers={args.workers}, {cpu_description()}; "
          "tokens identical")
    for name, ts in times.items():
        print(f"{name:>9}: best {min(ts):6.2f} s ({mb / min(ts):5.1f} MB/s)  runs {', '.join(f'{t:.2f}' for t in ts)}")
    print(f"speed-up: {min(times['workshop']) / min(times['tinygemma']):.2f}x")


if __name__ == "__main__":
    run_script(main)
