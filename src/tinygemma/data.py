"""Data: TinyStories (the Hugging Face hub, or local files) to memory-mapped token files, and reading them back.

`tinygemma prepare --out DIR` writes
    DIR/train.bin, DIR/val.bin   each story's token ids, then one end-of-text token; uint16 or uint32
    DIR/tokenizer.json           when the tokenizer is a file (a trained BPE, Gemma 3's own, ...)
    DIR/meta.json                tokenizer spec, vocab_size, eot_id, dtype, per split documents/tokens/bytes, source
meta.json is written last, atomically, and only once every .bin is complete; `open_prepared` refuses a
directory without a valid one, so an interrupted run is never mistaken for a dataset. `prepare` writes only into
a new or empty folder, a dataset it prepared before (which it replaces), or what an interrupted run of it left.
"""

from __future__ import annotations

import codecs
import concurrent.futures
import contextlib
import errno
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tinygemma.config import (
    DEFAULT_BPE_VOCAB_SIZE,
    DEFAULT_VAL_FRACTION,
    HUB_DATASET,
    MAX_VOCAB_SIZE,
    SPLITS,
    DataConfig,
    TrainConfig,
    is_integer,
    is_real,
    story_paths,
)
from tinygemma.errors import LONE_SURROGATE, UserError, describe, failure, interrupt_safe, shell_quote
from tinygemma.files import (
    atomic_path,
    atomic_write_json,
    check_output_folder,
    check_output_path,
    is_training_run,
    locked_folder,
    others_than,
    peek_json,
    read_json,
    remove_temporaries,
    signals_held,
    write_errors,
)
from tinygemma.runtime import Runtime
from tinygemma.tokenizer import (
    EOT_TOKEN,
    TOKENIZER_FILE,
    HFTokenizer,
    Tokenizer,
    changed_text,
    dtype_for,
    encode_in_worker,
    init_encoding_worker,
    load_tokenizer,
    missing_bytes,
    tokenizer_from_spec,
    train_bpe,
)

FORMAT = "tinygemma-tokens"
VERSION = 1
META_NAME = "meta.json"
# The training stories that prepare checks a given tokenizer gives back whole, and the most of each it checks (a file
# with no separators is one story)
TEXT_CHECK_STORIES, TEXT_CHECK_CHARS = 100, 10_000
CHUNK_CHARS = 1 << 21  # text per worker task: large enough to amortise the hand-off, small enough to stream
READ_CHARS = 1 << 22  # text read from a .txt file at a time

# A line holding only <|endoftext|>: the separator of the dataset's own text files.
_SEPARATOR = re.compile(r"^[^\S\n]*" + re.escape(EOT_TOKEN) + r"[^\S\n]*$", re.MULTILINE)

# ------------------------------------------------------------------ reading stories


def _clean(stories: Iterable) -> Iterator[str]:
    """A story is its text with surrounding whitespace stripped; empty ones (and null records) are dropped."""
    for story in stories:
        story = story.strip() if story is not None else ""
        if story:
            yield story


def _first_bad_byte(path: Path) -> str:
    """Where a file first stops being UTF-8, as "line L, byte B of the file" (B counted from 0): the text reader's
    error counts within its own buffer, which names no place in the file."""
    decoder, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with open(path, "rb") as f:
        # the last block empty: a file that ends inside a character
        for block in itertools.chain(iter(lambda: f.read(1 << 20), b""), [b""]):
            pending = len(decoder.getstate()[0])  # a character's first bytes, held over from the block before
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                lines = line + block[: max(e.start - pending, 0)].count(b"\n")
                return f"line {lines:,}, byte {offset + e.start - pending:,} of the file"
            line += block.count(b"\n")
            offset += len(block)
    return f"byte {offset:,} of the file"


_INLINE_SEPARATORS_SAID: set[str] = set()  # the .txt files warned of (once a process: they are read more than once)


def _txt_stories(path: Path) -> Iterator[str]:
    """A .txt file's stories, separated by lines holding only <|endoftext|>. One written inline (a story, then the
    marker on the same line) is one story holding the marker as text: said once, when the file has been read."""
    inline = 0
    for story in _txt_file_stories(path):
        inline += EOT_TOKEN in story
        yield story
    if inline and str(path) not in _INLINE_SEPARATORS_SAID:
        _INLINE_SEPARATORS_SAID.add(str(path))
        print(f"tinygemma: warning: {path}: {inline:,} stor{'y holds' if inline == 1 else 'ies hold'} "
              f"{EOT_TOKEN} inside a line, read as text; stories are separated by a line holding only {EOT_TOKEN}",
              file=sys.stderr, flush=True)


def _txt_file_stories(path: Path) -> Iterator[str]:
    # Read in large blocks, splitting each on the separator lines up to its last newline (a separator line is
    # never cut in two), and keeping what is unfinished (the story, the last line) as pieces: a long story, or a
    # file with no separator or no newline at all, is read in time and memory proportional to it, not its square.
    # newline="" keeps "\r\n" inside stories as it is in the file.
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark is not text
        story: list[str] = []  # the unfinished story, in pieces
        line: list[str] = []  # its unfinished last line, in pieces (a line may be longer than a block)
        while True:
            try:
                block = f.read(READ_CHARS)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text ({e.reason} at {_first_bad_byte(path)})") from None
            if "\0" in block:
                raise UserError(f"{path} is not UTF-8 text (it holds NUL bytes)")
            if not block:  # the last line has no newline, and may be a separator still
                first, *finished = _SEPARATOR.split("".join(line))
                yield from _clean(["".join([*story, first]), *finished])
                return
            cut = block.rfind("\n") + 1
            if not cut:
                line.append(block)
                continue
            first, *finished = _SEPARATOR.split("".join(line) + block[:cut])  # starts at a line's start
            line = [block[cut:]]
            story.append(first)
            if finished:  # the unfinished story ended here, and maybe others after it; the last goes on
                *middle, last = finished
                yield from _clean(["".join(story), *middle])
                story = [last]


def _record_text(record, where: str) -> str | None:
    """The story of a JSON record; None (skipped by _clean, as a parquet file's or the hub's null is) where its
    text or story is null."""
    if isinstance(record, dict):
        for field in ("text", "story"):
            if isinstance(record.get(field), str):
                text = record[field]
                if LONE_SURROGATE.search(text):  # JSON's \udc00 escapes decode to what no UTF-8 text holds
                    raise UserError(f"{where}: its {field} holds a lone surrogate (a \\ud800-\\udfff escape), "
                                    "which is not text any tokenizer takes")
                return text
        if any(field in record and record[field] is None for field in ("text", "story")):
            return None
    raise UserError(f"{where}: expected an object with a 'text' or 'story' string")


def _first_character(path: Path) -> str:
    """The first character of a text file that is not whitespace (nor a byte-order mark); "" if none."""
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            text = chunk.lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
            if text:
                return text[:1].decode("latin-1")
    return ""


def _jsonl_stories(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:  # decoded a line at a time: a bad byte is named by its own line
        line_number = 0
        try:
            for line_number, raw in enumerate(f, 1):
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # -sig: a byte-order mark
                if line.strip():
                    yield from _clean([_record_text(json.loads(line), f"{path} line {line_number}")])
        except UnicodeDecodeError as e:
            raise UserError(f"{path} line {line_number} is not UTF-8 text ({e.reason})") from None
        except ValueError as e:  # JSONDecodeError, or a number past Python's 4,300 digits
            raise UserError(f"{path} line {line_number} is not JSON ({getattr(e, 'msg', e)})") from None
        except RecursionError:
            raise UserError(f"{path} line {line_number} is JSON nested too deeply to read") from None


def _json_stories(path: Path) -> Iterator[str]:
    # One file of the dataset's TinyStories_all_data archive is a JSON array of {"story": ...}, ~100 MB. A JSON
    # array is read whole (JSON Lines streams): for corpora larger than memory, use .jsonl, .txt or .parquet.
    if _first_character(path) == "{":  # JSON Lines in a .json (datasets' Dataset.to_json writes them): streamed
        try:
            yield from _jsonl_stories(path)
        except UserError as e:  # (line 1 "{" of one object spread over lines: what is wrong is the file's layout)
            if " line 1 is not JSON " in str(e):
                raise UserError(f"{e}: a .json file of stories holds a JSON array of objects ([{{\"text\": ...}}, "
                                "...]) or one object per line (JSON Lines)") from None
            raise
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON ({e.msg} at line {e.lineno})") from None
    except ValueError as e:  # a number past Python's 4,300 digits
        raise UserError(f"{path} is not JSON that Python reads ({e})") from None
    except RecursionError:
        raise UserError(f"{path} is JSON nested too deeply to read") from None
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON array of objects with a 'text' or 'story' field")
    yield from _clean(_record_text(record, f"{path} item {i}") for i, record in enumerate(records))


def _parquet_stories(path: Path) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"{path} is not a parquet file ({str(e).splitlines()[0][:200]})") from None
    column = next((c for c in ("text", "story") if c in file.schema_arrow.names), None)
    if column is None:
        raise UserError(f"{path} has no 'text' column (columns: {', '.join(file.schema_arrow.names)})")
    kind = file.schema_arrow.field(column).type
    # pandas' Categorical text is written dictionary-encoded: text still, each value read as its string
    kind = str(kind.value_type if pa.types.is_dictionary(kind) else kind)
    if kind not in TEXT_TYPES:
        raise UserError(f"{path}: its '{column}' column holds {kind}, not text")
    batches = file.iter_batches(batch_size=4096, columns=[column])
    while True:
        try:  # a damaged file fails only here, in the middle: it is the source's fault, not the output's
            batch = next(batches, None)
        except Exception as e:
            raise UserError(f"{path} could not be read ({describe(e)})") from None
        if batch is None:
            return
        yield from _clean(s for s in _texts(batch.column(0).to_pylist, str(path)) if s is not None)


# The story files prepare reads, by extension (a datasets save_to_disk folder besides)
STORY_READERS = {".txt": _txt_stories, ".jsonl": _jsonl_stories, ".json": _json_stories, ".parquet": _parquet_stories}
TEXT_FORMATS = tuple(STORY_READERS)


def _texts(convert: Callable[[], list], where: str) -> list:
    """A batch of a text column as Python strings: bytes that are not UTF-8 (a column declared text, written
    without Arrow's checks) are the source's fault, in one line."""
    try:
        return convert()
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: its text is not UTF-8 ({e.reason} at byte {e.start} of a story)") from None


TEXT_TYPES = ("string", "large_string", "string_view")  # Arrow's (and datasets') names of text columns


def _dataset_stories(dataset, where: str) -> Iterator[str]:
    column = next((c for c in ("text", "story") if c in dataset.column_names), None)
    if column is None:
        raise UserError(f"{where} has no 'text' column (columns: {', '.join(dataset.column_names)})")
    kind = getattr(dataset.features.get(column), "dtype", None)
    if kind not in TEXT_TYPES:
        raise UserError(f"{where}: its '{column}' column holds {kind or dataset.features.get(column)}, not text")
    batches = dataset.iter(batch_size=4096)
    while True:
        batch = _texts(lambda: next(batches, None), where)  # datasets converts each batch as it is asked for
        if batch is None:
            return
        yield from _clean(s for s in batch[column] if s is not None)


Stories = Callable[[], Iterator[str]]  # re-iterable: BPE training and a carved validation split read twice


def _open_source(source: str | None, limit: int | None = None, progress: bool = False) -> dict[str, Stories]:
    """The splits a source offers: {"train": stories} and, when it has one, {"validation": stories}.

    From the hub with a `limit`, the stories are streamed: the first `limit` cost seconds, where the whole
    dataset is a download of about 1 GB.
    """
    if source is None:
        import datasets

        try:
            with _hub_errors_only():
                dataset = datasets.load_dataset(HUB_DATASET, streaming=limit is not None)
        except Exception as e:
            raise failure(f"cannot load {HUB_DATASET} from the Hugging Face hub ({describe(e)}); give local "
                          "story files: --source FILE to tinygemma prepare, --set data.source=FILE to tinygemma "
                          "run", e) from None
        if limit is None:
            return _dataset_splits(dataset, HUB_DATASET)
        if "train" not in dataset:
            raise UserError(f"{HUB_DATASET} has no 'train' split (splits: {', '.join(dataset)})")
        return {split: (lambda split=split: _streamed_stories(dataset[split], f"{HUB_DATASET} {split}",
                                                              limit if split == "train" else None, progress))
                for split in ("train", "validation") if split in dataset}
    path = check_source(source)
    if path.is_dir():
        import datasets

        try:
            dataset = datasets.load_from_disk(str(path))
        except Exception as e:
            raise UserError(f"{path} is not a readable datasets directory ({describe(e)})") from None
        return _dataset_splits(dataset, str(path))
    return {"train": lambda: STORY_READERS[path.suffix.lower()](path)}


def check_source(source) -> Path:
    """A local source as a Path, refused in one line where it is missing, a folder that datasets' save_to_disk
    did not write, or of a format prepare does not read: what `tinygemma run` checks before it says it prepares."""
    if not isinstance(source, (str, os.PathLike)):  # (a list, as prepare's sources=[...])
        raise UserError(f"a story source is one file or datasets folder (a str or Path), got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        if not ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            raise UserError(f"{path} is a directory but not a dataset written by datasets' save_to_disk")
        return path
    if not path.exists():
        # (meta.json's hf:NAME, or a hub name as typed: not a file's path, data/train.txt)
        hub = re.fullmatch(r"(hf:)?[\w.-]+/[\w.-]+", str(source)) and path.suffix.lower() not in TEXT_FORMATS
        raise UserError(f"source not found: {path}" + (
            f" (the hub's {HUB_DATASET} is read with no source given; another hub dataset, saved with datasets' "
            "load_dataset(NAME).save_to_disk(FOLDER), is read from that folder)" if hub else ""))
    if path.suffix.lower() not in TEXT_FORMATS:  # (Stories.TXT)
        raise UserError(f"{path}: unknown source format {path.suffix or '(no extension)'!r}; use "
                        f"{', '.join(TEXT_FORMATS)}, or a directory written by datasets' save_to_disk")
    return path


_SILENCED: list = []  # the libraries' own verbosities while _hub_errors_only holds them, one entry per holder


@interrupt_safe
def _hub_errors_only():
    """huggingface_hub's and datasets' own warnings off while the hub is asked: unreachable, huggingface_hub
    retries five times with a line each (about 25 s, 11 lines), and a connection lost while streaming, datasets
    twenty times (5 s apart, a line each), before the error, which prepare then says in one line. Held by several
    streams at once (a training and a validation split), ended in any order: the first sets, the last restores."""
    from datasets.utils import logging as datasets_logging
    from huggingface_hub.utils import logging as hub_logging

    libraries = (hub_logging, datasets_logging)
    if not _SILENCED:
        levels = [library.get_verbosity() for library in libraries]
        for library in libraries:
            library.set_verbosity_error()
    else:
        levels = _SILENCED[0]
    _SILENCED.append(levels)
    try:
        yield
    finally:
        _SILENCED.pop()
        if not _SILENCED:
            for library, level in zip(libraries, levels):
                library.set_verbosity(level)


def _streamed_stories(dataset, where: str, total: int | None, progress: bool) -> Iterator[str]:
    """The stories of a streamed split, one record at a time, so reading stops as soon as the caller stops
    (a batch of records could run into the next file of the dataset)."""
    from tqdm import tqdm

    # (the libraries' warnings off for the whole read: setting their loggers' levels per record cost 55 us each)
    with tqdm(desc=f"reading {where}", total=total, unit=" stories", disable=not progress) as bar, \
            _hub_errors_only():  # a connection lost while streaming: one line, not the libraries' retries
        records, read = iter(dataset), 0  # read: the bar's count, which a disabled bar does not keep
        while True:
            try:
                record = next(records, None)
            except Exception as e:
                raise failure(f"reading {where} failed after {read:,} stories ({describe(e)})", e) from None
            if record is None:
                return
            read += 1
            bar.update()
            if isinstance(record, dict) and all(record.get(f) is None for f in ("text", "story")) and (
                    "text" in record or "story" in record):
                continue  # a null text, skipped as the non-streamed read skips it
            yield from _clean([_record_text(record, where)])


def _dataset_splits(dataset, where: str) -> dict[str, Stories]:
    """A saved Dataset's stories as "train", a DatasetDict's "train" and "validation" splits (either may be
    missing: a validation source needs only one of them, a training source its "train")."""
    if not hasattr(dataset, "keys"):  # a single Dataset
        return {"train": lambda: _dataset_stories(dataset, where)}
    splits = {name: (lambda name=name: _dataset_stories(dataset[name], f"{where} {name}"))
              for name in ("train", "validation") if name in dataset}
    if not splits:
        raise UserError(f"{where} has neither a 'train' nor a 'validation' split (splits: {', '.join(dataset)})")
    return splits


def _training_stories(source: str | None, splits: dict[str, Stories]) -> Stories:
    if "train" not in splits:
        raise UserError(f"{source} has no 'train' split (splits: {', '.join(splits)})")
    return splits["train"]


def read_stories(source: str | Path | None = None, limit: int | None = None) -> list[str]:
    """The first `limit` training stories of a source, read as `prepare` reads them (None: the hub's, streamed
    with a `limit`, else the whole dataset downloaded)."""
    if limit is not None:
        _check_positive_int(limit, "limit")
    return list(itertools.islice(_training_stories(source, _open_source(source, limit))(), limit))


def _chain(streams: list[Stories]) -> Stories:
    return lambda: (story for stream in streams for story in stream())


def _select(stories: Iterable[str], val_fraction: float | None, want_val: bool, limit: int | None) -> Iterator[str]:
    """The training (or the carved validation) stories of a stream, stopping after `limit` training stories.

    Story i is validation when floor((i+1) f) > floor(i f): a fraction f of whole stories, spread evenly
    through the corpus, the same on every run and in both passes.
    """
    n_train = 0
    for i, story in enumerate(stories):
        is_val = val_fraction is not None and math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)
        n_train += not is_val
        if is_val == want_val:
            yield story
        if limit is not None and n_train >= limit:
            return  # before asking the stream for one more story: a streamed source reads no further


def _batches(stories: Iterable[str], chars: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for story in stories:
        batch.append(story)
        size += len(story)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ------------------------------------------------------------------ tokenizing


WINDOWS_MAX_WORKERS = 61  # what ProcessPoolExecutor takes on Windows at most (a ValueError past it)


def pool_size(workers: int) -> int:
    """The worker processes to start for `workers`: on Windows at most 61, which a machine of more cores passed."""
    return min(workers, WINDOWS_MAX_WORKERS) if sys.platform == "win32" else workers


class _Workers:
    """Tokenize batches in order, in worker processes (or inline for one worker), at most a few ahead.

    Results come back in submission order and a worker's exception is raised here, in the caller: a failed
    batch is never skipped. Only `2 * workers` batches are in flight, so memory stays bounded however long
    the corpus is (Pool.imap would read the whole input ahead).
    """

    def __init__(self, tokenizer: Tokenizer, workers: int):
        self.workers = workers
        self.pool = None
        if workers > 1:
            # The processes are the parallelism; without this, `tokenizers` warns in every forked worker.
            # Set while the workers fork, then as it was: left set, it turned off `tokenizers`' threads for the
            # rest of the caller's process (a notebook's later BPE training and encode_batch ran on one thread).
            parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            # Not multiprocessing.Pool: its terminate() after a worker's exception, with tasks still in flight,
            # can hang forever (python/cpython#96995, #78178); this pool shuts down after what is running.
            # The workers start now, with Ctrl-C held back until they have: one that lands in the parent amid a
            # fork (in CPython's after-fork callbacks) is printed as ignored and lost, and prepare went on to exit 0.
            try:
                self.pool = concurrent.futures.ProcessPoolExecutor(
                    pool_size(workers), initializer=init_encoding_worker, initargs=(tokenizer, True))
                with signals_held():
                    self.pool.submit(int).result()
            except BaseException as e:
                started = list((self.pool._processes or {}).values()) if self.pool else []
                self.close()
                for process in started:  # a pool that failed part-way through starting (no file descriptors left)
                    process.kill()  # never tells those it started to stop, and the exit waited on them forever
                    process.join()  # (SIGKILL: one caught amid its fork has the parent's SIGTERM handler still)
                if isinstance(e, OSError):
                    raise OSError(e.errno, f"could not start {workers} tokenizing worker processes ({e.strerror or e}); "
                                  "run with fewer --workers (workers), or raise the limit on open files (ulimit -n)"
                                  ) from None
                raise
            finally:
                if parallelism is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            init_encoding_worker(tokenizer)

    def map(self, batches: Iterable[list[str]]) -> Iterator[tuple[np.ndarray, int, int]]:
        """(ids, documents, bytes) per batch, in order."""
        if self.pool is None:
            for batch in batches:
                yield (*encode_in_worker(batch), len(batch))
            return
        pending = deque()
        try:
            for batch in batches:
                pending.append((self.pool.submit(encode_in_worker, batch), len(batch)))
                if len(pending) >= 2 * self.workers:
                    result, n = pending.popleft()
                    yield (*result.result(), n)
            while pending:
                result, n = pending.popleft()
                yield (*result.result(), n)
        except BrokenProcessPool:  # a worker killed from outside: the kernel's out-of-memory killer, most likely
            raise OSError(f"a tokenizing worker process died (killed from outside, perhaps for lack of memory); "
                          f"run again with fewer --workers (workers) than {self.workers}") from None

    def close(self) -> None:
        """The workers go: batches not yet handed to them are dropped, the few they hold (a CHUNK_CHARS of stories
        each) finish first."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _hashed(stories: Iterable[str], digest) -> Iterator[str]:
    """`stories` as they are, each fed to `digest` as it passes (its UTF-8 bytes, after their count)."""
    for story in stories:
        data = story.encode("utf-8", "surrogatepass")  # (never raises here: a story the tokenizer refuses, it does)
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
        yield story


def _tokenize_to_file(stories: Iterable[str], workers: _Workers, path: Path, target: Path, desc: str,
                      progress: bool, text_digest: bool = False) -> dict:
    """Tokenize `stories` into the file `path` (a temporary of `target`): failing writes name `target`, and only
    they do (a source that fails to read is the source's own error). With `text_digest`, the counts hold the
    stories' own digest too, whatever their tokens ("text_blake2b")."""
    from tqdm import tqdm

    counts = {"documents": 0, "tokens": 0, "bytes": 0}
    written, digest = 0, hashlib.blake2b(digest_size=16)  # the tokens' identity, for a resume's data check
    text = hashlib.blake2b(digest_size=16)
    with write_errors(target):
        f = open(path, "wb", buffering=0)  # unbuffered (the writes are MBs): nothing left to fail at close
    with f, tqdm(desc=desc, unit="B", unit_scale=True, disable=not progress, delay=2) as bar:
        for ids, nbytes, documents in workers.map(_batches(_hashed(stories, text) if text_digest else stories,
                                                           CHUNK_CHARS)):
            with write_errors(target):  # a full disk: one line naming the file
                written += _write_all(f, memoryview(ids).cast("B"))
            digest.update(ids)
            counts["documents"] += documents
            counts["tokens"] += len(ids)
            counts["bytes"] += nbytes
            bar.update(nbytes)
        with write_errors(target):  # what the file holds, not what was asked: a short write is never a dataset
            on_disk = os.fstat(f.fileno()).st_size
            if on_disk != written:
                raise OSError(errno.EIO, f"{on_disk:,} bytes on disk, {written:,} written")
    return {**counts, "blake2b": digest.hexdigest(), **({"text_blake2b": text.hexdigest()} if text_digest else {})}


# A container's CPU quota (docker --cpus, a Kubernetes CPU limit): cgroup v2's "QUOTA PERIOD" or "max PERIOD", else
# cgroup v1's quota (-1: none) and period, each in a file of its own
CPU_QUOTA_FILE = Path("/sys/fs/cgroup/cpu.max")
CPU_QUOTA_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def available_cpus() -> int:
    """The cores this process may run on (a taskset's or container's CPU set, within a container's CPU quota), not
    the machine's."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    for read in (lambda: CPU_QUOTA_FILE.read_text().split()[:2], lambda: [f.read_text() for f in CPU_QUOTA_V1]):
        try:
            quota, period = map(int, read())
        except (OSError, ValueError):  # not this cgroup version, or no quota ("max")
            continue
        if quota > 0 and period > 0:  # (v1's -1: none)
            return min(cores, max(1, math.ceil(quota / period)))
    return cores


def _write_all(f, data: memoryview) -> int:
    """Write all of `data` to the unbuffered file `f`: a raw write may store only part of it (a disk filling up,
    a file size limit, Linux's 2 GiB a call) and says so only by its count; one that stores nothing is a full
    disk."""
    done = 0
    while done < len(data):
        n = f.write(data[done:])
        if not n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n
    return done


# ------------------------------------------------------------------ prepare


def prepare(out_dir, sources=None, val_sources=None, val_fraction=None, tokenizer="gpt2", vocab_size=None,
            limit=None, workers=None, progress=True) -> dict:
    """Tokenize stories into DIR/train.bin and DIR/val.bin and describe them in DIR/meta.json; return the meta.

    sources: local files (.txt, .jsonl, .json, .parquet) or datasets' save_to_disk directories, read in
        order (one path, or a list); None reads roneneldan/TinyStories from the Hugging Face hub.
    val_sources: the validation stories. Without them, the sources' own validation splits, or else (or when
        val_fraction is given) a fraction of the training stories (default 0.05).
    tokenizer: "gpt2", "bpe" (trained here on the training stories, vocab_size tokens), a tokenizer.json
        path, or a Tokenizer.
    limit: keep only the first `limit` training stories. workers: processes (default: the cores this process may use).
    """
    out_dir = check_output_path(out_dir)  # (a path: prepare(5) is refused in one line; the rest in check_prepare_out)
    # One path is one source (a string is no list of one-letter sources)
    refusal = "must be story files: a path or a list of paths"  # (None: the hub, or the sources' own split)
    if sources is not None:
        sources = story_paths(sources, f"--source (sources) {refusal}")
    if val_sources is not None:
        val_sources = story_paths(val_sources, f"--val-source (val_sources) {refusal}")
    for given, name, none_means in ((sources, "--source (sources)", "the hub's TinyStories"),
                                    (val_sources, "--val-source (val_sources)", "the training source's own split")):
        if given == []:  # (a pattern that matched no file): never the hub's whole dataset in its place
            raise UserError(f"{name} is an empty list: give story files, or None for {none_means}")
    workers = available_cpus() if workers is None else workers
    tokenizer, vocab_size = _check_prepare_arguments(val_sources, val_fraction, tokenizer, vocab_size, limit, workers)
    # numpy's numbers are numbers, but meta.json is JSON: Python's own from here
    limit, workers, vocab_size = (None if v is None else int(v) for v in (limit, workers, vocab_size))
    val_fraction = None if val_fraction is None else float(val_fraction)
    cores, notes = available_cpus(), []  # warnings, said once every input is checked (a refusal stays one line)
    if workers > cores:  # each is a process: --workers 100000 forked until memory ran out
        notes.append(f"--workers (workers) {workers} is more than the {cores} cores this process may use; using "
                     f"{cores}")
        workers = cores
    # (asked without fixing it: the workers' pool, when there is one, does)
    started_by = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if workers > 1 and type(tokenizer).__module__ == "__main__" and started_by != "fork":
        notes.append(f"the tokenizer's class {type(tokenizer).__name__} is defined in the notebook or the script run, "
                     f"which worker processes started by {started_by} (macOS, Windows) cannot import; tokenizing in "
                     "this process (define it in a module for workers)")
        workers = 1
    lacking = missing_bytes(tokenizer.parsed) if isinstance(tokenizer, HFTokenizer) else 0
    if lacking:
        notes.append(f"the tokenizer's byte-level vocabulary lacks {lacking} of the 256 bytes: its encoder silently "
                     "drops every character holding one (accents, emoji), so the prepared text loses them; a BPE "
                     "trained with tokenizers needs initial_alphabet=pre_tokenizers.ByteLevel.alphabet()")
    check_prepare_out(out_dir)
    # One prepare writes a folder at a time: a second one (two `tinygemma run`s of one fresh recipe) is refused in
    # one line instead of deleting the first one's temporaries and racing it to meta.json. A failed prepare leaves
    # no folder it made.
    with locked_folder(out_dir, "a dataset", check=lambda: check_prepare_out(out_dir)):
        before = peek_json(out_dir / META_NAME)
        meta = _prepare_into(out_dir, sources, val_sources, val_fraction, tokenizer, vocab_size, limit, workers,
                             progress, notes)
    if replaced_other_data(before, meta):
        print(f"tinygemma: warning: {out_dir} held other prepared data, now replaced: a run trained on what it held "
              "refuses to resume on it (prepare that data again, into this folder, to go on with such a run)",
              file=sys.stderr, flush=True)
    return meta


def replaced_other_data(before: dict, meta: dict) -> bool:
    """Whether a dataset's meta.json before a prepare (`before`, {} where there was none) recorded other tokens
    than the new one's, as the runs trained on it check them when they resume: other token counts, or other
    tokens by their digests (where both record them: older datasets have none). Another tokenizer's tokens show
    in either; the same tokens from another file of the same tokenizer (GPT-2's tokenizer.json for gpt2) are
    the same data."""
    def recorded(m: dict) -> list:
        splits = m.get("splits") if isinstance(m.get("splits"), dict) else {}
        return [(split.get("tokens"), split.get("blake2b")) if isinstance(split := splits.get(name), dict)
                else (None, None) for name in SPLITS]

    return bool(before) and any(a[0] != b[0] or None not in (a[1], b[1]) and a[1] != b[1]
                                for a, b in zip(recorded(before), recorded(meta)))


def _prepare_into(out_dir: Path, sources, val_sources, val_fraction, tokenizer, vocab_size, limit, workers,
                  progress, notes: list[str] = ()) -> dict:
    notes = list(notes)
    split_stories, val_from, carve = _open_splits(sources, val_sources, val_fraction, limit, progress, notes)
    # (once the sources are found, before they are read; keyed by absolute path, a run may start in another folder,
    # the path as given: a link repointed at other stories is the source changed)
    stamps = {os.path.abspath(s): source_stamp(s) for s in [*(sources or []), *(val_sources or [])]}
    for note in notes:  # the sources found too: nothing refused
        print(f"tinygemma: warning: {note}", file=sys.stderr, flush=True)

    # Said before anything is tokenized (the whole training split, for an empty validation file) or a BPE trained
    stories = split_stories["train"]()
    first = next(stories, None)
    if first is None:
        raise _no_stories("train", carve, limit)
    if next(split_stories["val"](), None) is None:
        raise _no_stories("val", carve, limit)
    sample = []  # the first stories, which a given tokenizer must give back as it read them (the trained BPE does)
    if tokenizer != "bpe":
        sample = [story[:TEXT_CHECK_CHARS] for story in [first, *itertools.islice(stories, TEXT_CHECK_STORIES - 1)]]
        stories.close()  # (its file, or a hub stream, let go of: the tokenizing passes read the splits again)
    else:
        tokenizer = train_bpe(itertools.chain([first], stories), vocab_size)
        if tokenizer.vocab_size < vocab_size:
            print(f"tinygemma: warning: the BPE has {tokenizer.vocab_size:,} tokens, not the {vocab_size:,} asked for: "
                  "these stories hold no more pairs to merge", file=sys.stderr, flush=True)
    _check_vocab_size(tokenizer.vocab_size, f"tokenizer {tokenizer.identity}")
    if tokenizer.identity != "gpt2" and (changed := changed_text(tokenizer, sample)):
        count, read, back = changed
        print(f"tinygemma: warning: the tokenizer does not give back the text it reads ({count} of the first "
              f"{len(sample)} training stories; {read!r} comes back as {back!r}): it changes text (a "
              "normalizer's lowercasing or NFKC; a pre-tokenizer that splits off spaces with no decoder to put "
              "them back) or drops what its vocabulary lacks (or reads it as its unknown token). The model learns "
              "the text as changed, generate writes it so, and its loss and bits per byte measure it: they do not "
              "compare with those of a tokenizer that keeps the text", file=sys.stderr, flush=True)
    dtype = dtype_for(tokenizer.vocab_size)

    remove_temporaries(out_dir, PREPARED_FILES)  # an earlier prepare's, killed mid-write: up to GBs each
    pool = _Workers(tokenizer, workers)
    try:
        # (withs, not an ExitStack's enter_context: a Ctrl-C as it took a temporary made left that for the garbage
        # collector, after locked_folder had found the folder it made not empty, and kept it)
        with atomic_path(out_dir / "train.bin") as train_tmp, atomic_path(out_dir / "val.bin") as val_tmp:
            tmp = {"train": train_tmp, "val": val_tmp}
            counts = {}
            for split in SPLITS:
                # (the validation stories' own digest: what tells runs of other tokenizers validated on the same
                # stories; the training split's would hash GBs in this process, which feeds the workers)
                counts[split] = _tokenize_to_file(split_stories[split](), pool, tmp[split], out_dir / f"{split}.bin",
                                                  split, progress, text_digest=split == "val")
                if not counts[split]["documents"]:  # (a stream that gave its first story above and none now)
                    raise _no_stories(split, carve, limit)
            # From here until meta.json is written the directory holds no dataset, old or new: the marker says
            # its files are prepare's, for the next prepare to replace (not someone's train.bin or tokenizer.json).
            (out_dir / INCOMPLETE_NAME).touch()
            (out_dir / META_NAME).unlink(missing_ok=True)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": tokenizer.save(out_dir),
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "dtype": dtype.name,
            "splits": {split: {"file": f"{split}.bin", **counts[split]} for split in SPLITS},
            "source": {"train": [str(s) for s in sources] if sources else f"hf:{HUB_DATASET}", "val": val_from,
                       "val_fraction": carve, "limit": limit,
                       **({"bpe_vocab_size": vocab_size} if vocab_size is not None else {})},  # asked; may reach less
            "source_stamps": stamps,
        }
        atomic_write_json(out_dir / META_NAME, meta)
        if meta["tokenizer"].get("file") != TOKENIZER_FILE:  # gpt2 over an earlier BPE dataset: its file is stale
            (out_dir / TOKENIZER_FILE).unlink(missing_ok=True)
        (out_dir / INCOMPLETE_NAME).unlink()
    except BaseException:
        remove_unfinished(out_dir)
        raise
    finally:
        pool.close()
    return meta


def remove_unfinished(out_dir: Path) -> None:
    """After a failed prepare (a Ctrl-C as it renamed its files in, say), the files of a dataset marked as in the
    making and never finished (no meta.json: the old one goes before the first rename, the new one comes last),
    and the marker: a folder made for the dataset is left empty (and removed), one that held a dataset holds none
    (prepare replaced it already). A dataset with its meta.json (the old one, not replaced yet; the new one,
    finished) loses only the marker, and a tokenizer.json it does not name (an earlier BPE's, under gpt2)."""
    if not (out_dir / INCOMPLETE_NAME).is_file():
        return
    unfinished = [TOKENIZER_FILE]
    if (out_dir / META_NAME).exists():
        tokenizer = peek_json(out_dir / META_NAME).get("tokenizer")
        if isinstance(tokenizer, dict) and tokenizer.get("file") == TOKENIZER_FILE:
            unfinished = []
    else:
        unfinished += [f"{split}.bin" for split in SPLITS]
    for name in (*unfinished, INCOMPLETE_NAME):  # the marker last
        (out_dir / name).unlink(missing_ok=True)


def first_set_aside(fraction: float) -> int:
    """The index of the first story _select sets aside at `fraction`: the least i with floor((i + 1) f) >= 1 in
    _select's own float arithmetic, found by bisection (a fraction of 1e-30 is 1e30 stories; past 2**1000, none
    is ever set aside, and that bound is returned)."""
    low, high = 0, 1  # floor(low f) < 1 <= floor(high f), for the count of stories high = i + 1
    while math.floor(high * fraction) < 1:
        if high > 2**1000:
            return high - 1
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if math.floor(middle * fraction) >= 1 else (middle, high)
    return high - 1


def _no_stories(split: str, carve: float | None, limit: int | None) -> UserError:
    """The refusal of an empty split; for validation set aside (a fraction `carve`), why none was and what to do."""
    why = ""
    if split == "val" and carve:
        first = first_set_aside(carve) if limit is not None else None
        why = (f" (a limit of {limit:,} training stories sets none aside at a fraction of {carve:g}, whose first is "
               f"story {first + 1}: use a limit of {first + 1} or more (--limit, data.limit) with that many stories, "
               "or give validation stories (--val-source, data.val_source))" if first is not None and limit <= first else
               " (too few stories to set some aside; give validation stories (--val-source, data.val_source) or "
               f"more stories; a .txt file separates its stories with lines holding only {EOT_TOKEN})")
    return UserError(f"no {split} stories: the {'validation' if split == 'val' else 'training'} corpus is empty{why}")


def _check_prepare_arguments(val_sources, val_fraction, tokenizer, vocab_size, limit, workers):
    """(tokenizer, vocab_size) once every argument of `prepare` is checked; "bpe" stays a name until trained."""
    _check_positive_int(workers, "workers")
    if limit is not None:
        _check_positive_int(limit, "limit")
    if val_fraction is not None:
        if val_sources:
            raise UserError("give either --val-source (val_sources) or --val-fraction (val_fraction), not both")
        if not (is_real(val_fraction) and 0 < val_fraction < 1):
            raise UserError(f"--val-fraction (val_fraction) must be a number between 0 and 1, got {val_fraction!r}")
    if vocab_size is not None and tokenizer != "bpe":
        raise UserError("--vocab-size (vocab_size) applies only to --tokenizer bpe (other tokenizers have their own "
                        "vocabulary)")
    if tokenizer == "bpe":
        vocab_size = DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size
        _check_positive_int(vocab_size, "vocab_size")
        _check_vocab_size(vocab_size, "--vocab-size (vocab_size)")
        if vocab_size < 257:
            raise UserError(f"--vocab-size (vocab_size) must be at least 257 (256 bytes and <|endoftext|>), got "
                            f"{vocab_size}")
    elif not isinstance(tokenizer, Tokenizer):
        if not isinstance(tokenizer, (str, os.PathLike)):
            raise UserError(f"--tokenizer (tokenizer) must be gpt2, bpe, a path to a tokenizer.json or a Tokenizer, "
                            f"got {tokenizer!r}")
        tokenizer = load_tokenizer(tokenizer)
    return tokenizer, vocab_size


SPLIT_UNUSED = " (its validation split unused)"  # meta's source.val where --val-fraction passed a split over


def _open_splits(sources, val_sources, val_fraction, limit, progress, notes: list[str]):
    """({"train": stories, "val": stories} as re-readable streams, where validation comes from, and the fraction
    of training stories set aside for it, or None). Every source is opened before anything is written: a missing
    file fails here, with no output. What is worth a warning goes into `notes`."""
    if not val_sources:  # validation carved from the sources (or their splits): one given twice leaks into training
        seen = {}
        for i, source in enumerate(sources or []):  # (a shell pattern and the same file again, say)
            with contextlib.suppress(OSError, ValueError):  # (an unreadable path is refused by _open_source)
                first, same = seen.setdefault(Path(source).resolve(), (i, source))
                if first != i:
                    raise UserError(f"{source} and {same} are the same training source, given twice: the stories "
                                    "set aside from one for validation would be trained on through the other (give "
                                    "--val-source to repeat a source on purpose)")
    train_splits = [_open_source(s, limit, progress) for s in (sources or [None])]
    val_splits = [_open_source(s) for s in val_sources or []]
    training_files = {Path(s).resolve() for s in sources or []}
    for source, splits in zip(val_sources or [], val_splits):
        if "validation" not in splits and Path(source).resolve() in training_files:
            raise UserError(f"{source} is both a training and a validation source: the validation loss would "
                            "measure stories the model trains on (leave --val-source out to set a fraction aside)")
    for source, splits in [*zip(sources or [], train_splits), *zip(val_sources or [], val_splits)]:
        if Path(source).suffix.lower() != ".json":  # (a JSON array is parsed whole to yield its first story)
            _read_first_story(splits)
    train = _chain([_training_stories(s, splits) for s, splits in zip(sources or [None], train_splits)])
    if val_sources:
        val = _chain([splits["validation"] if "validation" in splits else splits["train"] for splits in val_splits])
        val_from = [str(s) for s in val_sources]
    elif val_fraction is None and all("validation" in splits for splits in train_splits):
        val = _chain([splits["validation"] for splits in train_splits])
        val_from = "the training source's validation split"
    else:
        unused = val_fraction is not None and all("validation" in splits for splits in train_splits)
        dropped = [str(s) for s, splits in zip(sources or [], train_splits) if "validation" in splits]
        if dropped and not unused:  # (recorded as before: the recipe that made it would make it so again)
            notes.append(f"the validation split of {', '.join(dropped)} is unused: the other sources have none, so "
                         f"validation is {val_fraction or DEFAULT_VAL_FRACTION:g} of all the training stories")
        val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        val = None
        val_from = "set aside from the training source" + (SPLIT_UNUSED if unused else "")
    carve = val_fraction if val is None else None
    split_stories = {
        "train": lambda: _select(train(), carve, False, limit),
        "val": (lambda: _select(train(), carve, True, limit)) if val is None else val,
    }
    return split_stories, val_from, carve


def _read_first_story(splits: dict[str, Stories]) -> None:
    """Read the first story of each of a local source's splits now: a parquet file or datasets folder without a
    text column, or a file that is not JSON or UTF-8 from its start, is refused before anything is tokenized (it
    was found after the sources before it, and after BPE training)."""
    for stories in splits.values():
        stream = stories()
        next(stream, None)
        stream.close()


def is_prepared_dataset(path: str | Path) -> bool:
    """Whether `path` is a folder holding a dataset of `prepare`: a meta.json of this format (its token files may
    still be truncated: `open_prepared` checks them)."""
    return peek_json(Path(path) / META_NAME).get("format") == FORMAT


# What prepare writes: the split files, the tokenizer, meta.json (and, if killed, temporaries of these).
PREPARED_FILES = frozenset({META_NAME, TOKENIZER_FILE, *(f"{split}.bin" for split in SPLITS)})
# Present while prepare replaces a folder's files, from the old meta.json's removal to the new one's writing.
INCOMPLETE_NAME = ".prepare-incomplete"


def check_prepare_out(out_dir: str | Path, flag: str = "--out") -> None:
    """Refuse an --out that prepare would damage: it writes into a new or empty folder, replaces a dataset it
    prepared before, or finishes what an interrupted run left (its temporaries, or the files of a run stopped while
    it replaced them, which its marker names as prepare's); any other folder (a transformers export, a training run,
    nanoGPT's train.bin and val.bin, a lone tokenizer.json) would lose its files to it."""
    out_dir = check_output_folder(out_dir, "the dataset", flag)
    others = files_not_prepares(out_dir)
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        if META_NAME in others and set(others) <= PREPARED_FILES:  # a dataset whose meta.json is damaged or another's
            raise UserError(f"{flag} {out_dir} holds a meta.json that is not a readable one of prepare's ({shown}): "
                            "a damaged copy of a dataset, or another tool's files; delete the folder (or its "
                            f"{META_NAME}) to prepare into it again, or prepare into a new folder")
        raise UserError(f"{flag} {out_dir} is not a prepared dataset and holds other files ({shown}); prepare into "
                        "a new or empty folder, or into an earlier prepared dataset to replace it")


def files_not_prepares(folder: Path) -> list[str]:
    """The names in `folder` that prepare would neither write nor replace: none in a new or empty folder, a dataset
    it prepared, or what an interrupted prepare left (its temporaries, or files its marker names as its own)."""
    if not folder.is_dir() or is_prepared_dataset(folder):
        return []
    interrupted = (folder / INCOMPLETE_NAME).is_file()
    return others_than(folder, PREPARED_FILES | {INCOMPLETE_NAME} if interrupted else frozenset(),
                       temporaries_of=PREPARED_FILES)


def _check_positive_int(value, name: str) -> None:
    """`name` is prepare's argument; the message names its flag too."""
    if not (is_integer(value) and value >= 1):
        raise UserError(f"--{name.replace('_', '-')} ({name}) must be a positive integer, got {value!r}")


def _check_vocab_size(vocab_size: int, what: str) -> None:
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(f"{what} has a vocabulary of {vocab_size:,} tokens, more than the model's largest "
                        f"embedding ({MAX_VOCAB_SIZE:,})")


# ------------------------------------------------------------------ reading prepared data


@dataclass
class PreparedData:
    """A directory written by `prepare`, validated: use `split("train")` for the token memmap."""

    directory: Path
    meta: dict
    _tokenizer: Tokenizer | None = field(default=None, repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def eot_id(self) -> int:
        return self.meta["eot_id"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def split(self, name: str) -> np.memmap:
        if name not in self.meta["splits"]:
            raise UserError(f"{self.directory} has no {name!r} split (splits: {', '.join(self.meta['splits'])})")
        return np.memmap(self.directory / self.meta["splits"][name]["file"], dtype=self.dtype, mode="r")

    def tokenizer(self) -> Tokenizer:
        """Its tokenizer, loaded once (Gemma 3's tokenizer.json takes seconds to parse)."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer_from_spec(self.meta["tokenizer"], self.directory)
        return self._tokenizer

    def digest(self, name: str) -> str | None:
        """The split's tokens' BLAKE2b digest as prepare wrote them (None for data prepared before it recorded one)."""
        value = self.meta["splits"][name].get("blake2b")
        return value if isinstance(value, str) else None

    def text_digest(self) -> str | None:
        """The validation stories' BLAKE2b digest, whatever their tokens (None for data prepared before
        2026-12-07)."""
        value = self.meta["splits"]["val"].get("text_blake2b")
        return value if isinstance(value, str) else None


def is_story_file(path: str | Path) -> bool:
    """Whether `path` names a file of stories prepare reads (.txt, .jsonl, .json, .parquet; it may be missing), not
    one of a prepared dataset's own (its meta.json or tokenizer.json)."""
    path = Path(path)
    own = path.name in (META_NAME, TOKENIZER_FILE) and (path.parent / META_NAME).is_file()
    return path.suffix.lower() in TEXT_FORMATS and not path.is_dir() and not own


def open_prepared(directory: str | Path) -> PreparedData:
    """The dataset `prepare` wrote to `directory`; anything missing, truncated or malformed is a UserError."""
    directory = Path(directory)
    if directory.is_file() and (directory.parent / META_NAME).is_file():  # meta.json, train.bin: one of its files
        raise UserError(f"{directory} is a file of a prepared dataset; give its folder, {directory.parent}")
    if directory.is_file() and is_story_file(directory):  # a story file given where its tokens belong
        raise UserError(f"{directory} is a file, not a prepared dataset: tokenize it first with `tinygemma prepare "
                        f"--source {directory} --out DIR`, then pass DIR")
    if directory.is_file():  # a GGUF file, weights, anything else
        raise UserError(f"{directory} is a file, not a prepared dataset; give the folder that `tinygemma prepare "
                        f"--out` wrote (story files, which prepare and eval read, are {', '.join(TEXT_FORMATS)})")
    if not directory.exists():  # (a mistyped path: not a folder to prepare with the defaults)
        raise UserError(f"{directory} is not a prepared dataset: no such folder; give the folder that `tinygemma "
                        f"prepare --out` wrote, or make this one with `tinygemma prepare --out "
                        f"{shell_quote(str(directory))}` and the --source and --tokenizer you mean")
    if not (directory / META_NAME).exists():
        if is_training_run(directory):  # the run folder given for its data: prepare would refuse it
            data = peek_json(directory / "config.json").get("data")
            where = data.get("dir") if isinstance(data, dict) else None
            relative = where is not None and not Path(where).is_absolute()
            raise UserError(f"{directory} is a training run, not a prepared dataset: give the folder its data was "
                            "prepared in" + (f", {where} (its config.json's data.dir"
                                             + (", from where it was trained" if relative else "") + ")"
                                             if where else ""))
        if files_not_prepares(directory):  # a checkpoint, an export, anything else: not prepare's to fill
            raise UserError(f"{directory} is not a prepared dataset (no {META_NAME}) and holds other files; give "
                            "the folder that `tinygemma prepare --out` wrote")
        raise UserError(f"{directory} is not a prepared dataset: no {META_NAME} (an interrupted prepare leaves "
                        f"none); make it with `tinygemma prepare --out {shell_quote(str(directory))}` and the "
                        "--source and --tokenizer you mean")
    meta = read_json(directory / META_NAME, "dataset metadata")
    where = directory / META_NAME
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{where} is not {FORMAT} version {VERSION} data")
    try:
        dtype = np.dtype(meta["dtype"])
        if dtype.name not in ("uint16", "uint32") or not isinstance(meta["tokenizer"], dict):
            raise ValueError
        for key in ("vocab_size", "eot_id"):
            if not isinstance(meta[key], int) or meta[key] < 0:
                raise ValueError
        if meta["eot_id"] >= meta["vocab_size"] or not isinstance(meta.get("source", {}), dict):
            raise ValueError
        for split in SPLITS:
            info = meta["splits"][split]
            for key in ("documents", "tokens", "bytes"):
                if not isinstance(info[key], int) or info[key] < 1:
                    raise ValueError
            path = directory / info["file"]
            expected = info["tokens"] * dtype.itemsize
            size = path.stat().st_size if path.exists() else None
            if size != expected:
                raise UserError(f"{path} is {'missing' if size is None else f'{size:,} bytes'}, but {META_NAME} "
                                f"records {info['tokens']:,} {dtype.name} tokens ({expected:,} bytes): "
                                "truncated or not from this run; prepare the data again")
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where} is malformed: it lacks or mangles tokenizer, vocab_size, eot_id (an id below "
                        "vocab_size), dtype, source or splits (train/val with file, documents, tokens, bytes)") from None
    return PreparedData(directory, meta)


def source_stamp(source) -> list[int]:
    """[bytes, files] of a local story source (a file, or a datasets folder's files less the caches its `map`
    writes and hidden files): what tells that it holds other stories since it was prepared, without reading it
    again. Not its modification time, which a `touch`, a copy or a sync changes with the same stories."""
    path = Path(source)
    files = [f for f in path.rglob("*") if f.is_file() and not f.name.startswith(("cache-", "."))
             and not any(part.startswith(".") for part in f.relative_to(path).parts)] if path.is_dir() else [path]
    return [sum(f.stat().st_size for f in files), len(files)]


def changed_sources(data: PreparedData) -> list[str]:
    """The local story sources `data` was prepared from that are there still but hold other stories since (by
    its meta.json's source_stamps); none for data prepared before they were recorded."""
    stamps = data.meta.get("source_stamps")
    changed = []
    for source, stamp in (stamps.items() if isinstance(stamps, dict) else ()):
        with contextlib.suppress(OSError):  # (gone, or unreadable now: nothing to compare; the data is what it is)
            if Path(source).exists() and source_stamp(source) != stamp:
                changed.append(source)
    return changed


def same_sources(had: list, asked: list) -> bool:
    """Whether two lists of story sources name the same files, as written or as resolved paths."""
    return len(had) == len(asked) and all(a == b or Path(a).resolve() == Path(b).resolve() for a, b in zip(had, asked))


def data_differences(want: DataConfig, data: PreparedData) -> list[str]:
    """How the prepared `data` differs from what a recipe's [data] `want` would prepare, as "what: recorded, asked"
    phrases (none: the same). Sources match as written or as resolved paths; the tokenizer by kind, a
    tokenizer.json by its contents, a trained BPE by its vocabulary size (the recipe's, or prepare's default)."""
    want.validate()  # (one path given from Python as data.source: a list of one, not of its letters)
    meta = data.meta
    recorded = meta.get("source") or {}
    differences = []
    had = recorded.get("train")
    had = [had] if isinstance(had, str) else list(had or [])
    asked = list(want.source) or [f"hf:{HUB_DATASET}"]
    if not same_sources(had, asked):
        differences.append(f"stories: {', '.join(had)}, the recipe asks for {', '.join(asked)}")
    had_val = recorded.get("val")
    if want.val_source and not (isinstance(had_val, list) and same_sources(had_val, list(want.val_source))):
        differences.append(f"validation: {had_val if isinstance(had_val, str) else ', '.join(had_val or [])}, "
                           f"the recipe asks for {', '.join(want.val_source)}")
    elif not want.val_source and (isinstance(had_val, list) or recorded.get("val_fraction") not in
                                  ((None,) if not want.source else (None, DEFAULT_VAL_FRACTION))
                                  or str(had_val).endswith(SPLIT_UNUSED)):
        # Other files, or another share set aside (the hub has a validation split: none at all there; a source with
        # one, where --val-fraction set a share aside instead, even the default's).
        was = (", ".join(had_val) if isinstance(had_val, list) else f"{recorded['val_fraction']:g} of the stories"
               + (SPLIT_UNUSED if str(had_val).endswith(SPLIT_UNUSED) else ""))
        differences.append(f"validation: {was}, the recipe asks for the source's validation split or "
                           f"{DEFAULT_VAL_FRACTION:g} of its stories (no data.val_source)")
    if recorded.get("limit") != want.limit:
        differences.append(f"limit: {recorded.get('limit')}, the recipe asks for {want.limit}")
    spec = meta.get("tokenizer") or {}
    kind = spec.get("kind")
    if want.tokenizer == "gpt2" and kind == "gpt2":
        pass
    elif want.tokenizer == "bpe" and kind == "gpt2":
        differences.append("tokenizer: gpt2, the recipe asks for bpe")
    elif want.tokenizer == "bpe" and "bpe_vocab_size" not in recorded and data.digest("train") is not None:
        # prepare has recorded the size asked of every BPE it trained since before it recorded digests: this data's
        # tokenizer.json was given, not trained on these stories (the recipe's would be another, whatever its size)
        differences.append(f"tokenizer: {data.tokenizer().identity}, the recipe asks for a BPE trained on its stories")
    elif want.tokenizer == "bpe":
        vocab_size = want.vocab_size or DEFAULT_BPE_VOCAB_SIZE
        # What prepare was asked for (a BPE trained on few stories can stop short of it), else what it has.
        asked = recorded.get("bpe_vocab_size", data.vocab_size)
        if asked != vocab_size:
            older = ("" if "bpe_vocab_size" in recorded else
                     f" (prepared by a tinygemma that did not record the size asked for, where a BPE trained on few "
                     f"stories stops short of it: if this recipe prepared it, set data.vocab_size = {asked})")
            differences.append(f"vocabulary: a BPE of {asked:,}, the recipe asks for a BPE of {vocab_size:,}{older}")
    elif want.tokenizer == "gpt2":  # data of a tokenizer.json: GPT-2's own as a file is gpt2 (no ranks loaded:
        if data.tokenizer().identity != "gpt2":  # an offline train --data of a BPE run asked the network for them)
            differences.append(f"tokenizer: {data.tokenizer().identity}, the recipe asks for gpt2")
    elif load_tokenizer(want.tokenizer).identity != data.tokenizer().identity:
        differences.append(f"tokenizer: {data.tokenizer().identity}, the recipe asks for {want.tokenizer}")
    return differences


# ------------------------------------------------------------------ training batches


def window_starts(seed: int, step: int, n_tokens: int, block_size: int, count: int) -> np.ndarray:
    """First token of each of the `count` windows of optimizer step `step`: a pure function of (seed, step),
    so a resumed run and a run on any number of processes see the same global batches."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - block_size, size=count)  # a window holds block_size + 1 tokens


class Batches:
    """Random windows of block_size + 1 tokens from the training memmap.

    The global batch of a step is the recipe's batch_size x grad_accum_steps windows, whatever the number of
    processes or the micro-batch size: each process trains an equal share of it, micro_batch_size windows per
    forward/backward pass. The batch is laid out as [chunk][rank][unit] with unit = gcd(batch_size, share): rank
    r's share is its unit of rows of every chunk, in order, and its passes take that share micro_batch_size rows
    at a time. Where world_size divides grad_accum_steps the unit is batch_size, so with micro_batch_size =
    batch_size each pass is one of the recipe's micro-steps. Any split of the same global batch gives the same
    gradient.
    """

    def __init__(self, tokens: np.ndarray, cfg: TrainConfig, rt: Runtime, micro_batch_size: int, vocab_size: int):
        self.tokens, self.cfg, self.rt, self.vocab_size = tokens, cfg, rt, vocab_size
        self.global_batch = cfg.batch_size * cfg.grad_accum_steps
        self.micro_batch_size = micro_batch_size
        self.micro_steps = check_micro_batch_size(cfg, rt.world_size, micro_batch_size)
        share = process_share(cfg, rt.world_size)
        unit = math.gcd(cfg.batch_size, share)
        rows = (np.arange(share // unit)[:, None] * rt.world_size + rt.rank) * unit + np.arange(unit)
        self.rows = rows.reshape(-1)  # this process's share of the global batch, in pass order
        self._step, self._starts = None, None

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, rt = self.cfg, self.rt
        if step != self._step:
            self._step = step
            self._starts = window_starts(cfg.seed, step, len(self.tokens), cfg.block_size, self.global_batch)
            if rt.world_size > 1:  # every process refuses a bad id in any process's share: none waits for the others
                check_windows(self.tokens, self._starts, cfg.block_size, self.vocab_size)
        rows = self.rows[micro * self.micro_batch_size : (micro + 1) * self.micro_batch_size]
        return to_device(windows(self.tokens, self._starts[rows], cfg.block_size, self.vocab_size), rt)


def process_share(cfg: TrainConfig, world_size: int) -> int:
    """Sequences each process trains per optimizer step: an equal share of the global batch, so that the global
    batch, and so the learning rate it was tuned with, stay the recipe's on any number of GPUs."""
    global_batch = cfg.batch_size * cfg.grad_accum_steps
    if global_batch % world_size:
        raise UserError(f"the global batch, train.batch_size x grad_accum_steps = {cfg.batch_size} x "
                        f"{cfg.grad_accum_steps} = {global_batch} sequences, must be a multiple of the number of "
                        f"processes ({world_size}): each trains an equal share of it")
    return global_batch // world_size


def micro_batch_sizes(share: int) -> list[int]:
    """The micro-batch sizes a process's share of `share` sequences splits into evenly, largest first."""
    small = [size for size in range(1, math.isqrt(share) + 1) if share % size == 0]  # a huge batch_size is instant
    return sorted({*small, *(share // size for size in small)}, reverse=True)


def check_micro_batch_size(cfg: TrainConfig, world_size: int, size: int) -> int:
    """The forward/backward passes per process and step at `size` sequences a pass; refused unless it divides
    the process's share."""
    share = process_share(cfg, world_size)
    if share % size:
        sizes = ", ".join(map(str, micro_batch_sizes(share)))
        raise UserError(f"train.micro_batch_size ({size}) must divide each process's share of the global batch, "
                        f"batch_size x grad_accum_steps / processes = {share} sequences: choose one of {sizes} "
                        "(or auto)")
    return share // size


def requested_micro_batch_size(cfg: TrainConfig, world_size: int, device_type: str) -> int | None:
    """The micro-batch size the recipe fixes (checked against the share), or None where `auto` must probe the
    device (CUDA). `auto` elsewhere keeps batch_size, or where a process's share is not a multiple of it (more
    processes than micro-steps), the largest size below it that divides the share."""
    if cfg.micro_batch_size == "auto":
        share = process_share(cfg, world_size)
        return None if device_type == "cuda" else max(s for s in micro_batch_sizes(share) if s <= cfg.batch_size)
    size = int(cfg.micro_batch_size)
    check_micro_batch_size(cfg, world_size, size)
    return size


def windows(tokens: np.ndarray, starts, block_size: int, vocab_size: int) -> torch.Tensor:
    """The windows of block_size + 1 tokens at `starts`, their ids checked against the model's `vocab_size`."""
    rows = np.stack([np.asarray(tokens[s : s + block_size + 1]) for s in starts])  # (a tensor's or a list's too)
    check_token_ids(rows, vocab_size)  # (before the cast: float ids are refused, not truncated)
    return torch.from_numpy(rows.astype(np.int64))


def check_windows(tokens: np.ndarray, starts, block_size: int, vocab_size: int, chunk: int = 1024) -> None:
    """check_token_ids over the windows at `starts`, `chunk` windows at a time (memory stays bounded)."""
    for i in range(0, len(starts), chunk):
        windows(tokens, starts[i : i + chunk], block_size, vocab_size)


def check_token_ids(rows: np.ndarray, vocab_size: int) -> None:
    """Refuses ids the model has no embedding for (a token file corrupted in place keeps its size, so opening it
    cannot tell), on the host: no wait for the device, where CUDA's embedding would end in a device-side assert."""
    if rows.dtype.kind not in "iu":
        raise UserError(f"token ids must be integers, got {rows.dtype} values")
    low, top = int(rows.min(initial=0)), int(rows.max(initial=0))
    if low < 0 or top >= vocab_size:
        raise UserError(f"the tokens hold id {low if low < 0 else top}, outside the model's {vocab_size:,} ids (0 to "
                        f"{vocab_size - 1:,}): the token file is corrupt, or not of this model's tokenizer")


def to_device(batch: torch.Tensor, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets on the device; on CUDA through pinned memory, so the copy is asynchronous
    and overlaps the step that is running (the caching host allocator keeps the pinned buffer alive)."""
    if rt.is_cuda:
        batch = batch.pin_memory().to(rt.device, non_blocking=True)
    else:
        batch = batch.to(rt.device)
    return batch[:, :-1], batch[:, 1:]


def validation_starts(n_tokens: int, block_size: int, count: int) -> np.ndarray:
    """A fixed set of `count` windows spread evenly over the validation split (the same for every seed)."""
    return np.linspace(0, n_tokens - block_size - 1, count).round().astype(np.int64)
