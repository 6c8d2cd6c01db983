"""`tinygemma prepare` on real TinyStories: exact round trips, tiktoken's counts, every source format, bad input,
and interrupted runs that must never look finished."""

import ast
import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from tinygemma import data
from tinygemma.cli import main
from tinygemma.config import DataConfig
from tinygemma.data import data_differences, is_prepared_dataset, open_prepared, prepare
from tinygemma.errors import UserError
from tinygemma.tokenizer import GPT2Tokenizer

EOT = "<|endoftext|>"
EOT_ID = 50_256


def read_stories(path, limit=None) -> list[str]:
    """The stories of one of the dataset's text files, parsed independently of tinygemma.data."""
    stories = [s.strip() for s in path.read_text(encoding="utf-8").split(f"\n{EOT}\n")]
    return [s for s in stories if s][:limit]


def documents(prepared, split) -> list[str]:
    """Decode a split back into its stories, cutting at each end-of-text id."""
    ids = np.asarray(prepared.split(split))
    assert ids[-1] == prepared.eot_id
    tokenizer = prepared.tokenizer()
    ends = np.flatnonzero(ids == prepared.eot_id)
    return [tokenizer.decode(ids[a + 1 if i else 0:b]) for i, (a, b) in enumerate(zip([0, *ends], ends))]


def write_txt(path, stories, newline="\n"):
    path.write_text("".join(f"{s}{newline}{EOT}{newline}" for s in stories), encoding="utf-8", newline="")
    return path


@pytest.fixture(scope="module")
def r50k():
    return tiktoken.get_encoding("r50k_base")


@pytest.fixture(scope="module")
def valid(stories_dir):
    return read_stories(stories_dir / "valid.txt")


def text_digest(stories: list[str]) -> str:
    """The validation stories' own digest as meta.json records it: each story's UTF-8 bytes after their count
    (8 bytes, little-endian), in order."""
    digest = hashlib.blake2b(digest_size=16)
    for story in stories:
        digest.update(len(story.encode("utf-8")).to_bytes(8, "little") + story.encode("utf-8"))
    return digest.hexdigest()


def test_round_trip_and_tiktoken_counts(stories_dir, valid, r50k, tmp_path):
    train = read_stories(stories_dir / "train.txt", 400)
    assert len(read_stories(stories_dir / "train.txt")) == 2983 and len(valid) == 500  # the README's counts
    meta = prepare(tmp_path, sources=[stories_dir / "train.txt"], val_sources=[stories_dir / "valid.txt"],
                   limit=400, workers=1, progress=False)
    prepared = open_prepared(tmp_path)
    assert prepared.meta == json.loads((tmp_path / "meta.json").read_text())
    assert meta == prepared.meta
    assert (prepared.vocab_size, prepared.eot_id, meta["dtype"]) == (50_257, EOT_ID, "uint16")
    for split, stories in (("train", train), ("val", valid)):
        assert documents(prepared, split) == stories
        assert meta["splits"][split] == {
            "file": f"{split}.bin",
            "documents": len(stories),
            "tokens": sum(len(r50k.encode_ordinary(s)) + 1 for s in stories),
            "bytes": sum(len(s.encode("utf-8")) for s in stories),
            "blake2b": hashlib.blake2b(np.asarray(prepared.split(split)).tobytes(), digest_size=16).hexdigest(),
            **({"text_blake2b": text_digest(stories)} if split == "val" else {}),
        }
        assert prepared.split(split).dtype == np.uint16
        assert int((prepared.split(split) == EOT_ID).sum()) == len(stories)


def test_workers_give_identical_files(stories_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_CHARS", 20_000)  # many small batches, so the ordered window really turns
    monkeypatch.setattr(data, "available_cpus", lambda: 2)  # two processes, however many cores run the tests
    args = dict(sources=[stories_dir / "train.txt"], val_sources=[stories_dir / "valid.txt"], limit=600,
                progress=False)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    prepare(tmp_path / "one", workers=1, **args)
    prepare(tmp_path / "two", workers=2, **args)
    # Set while the workers fork (test below), then taken away: left set, it turned off tokenizers' threads for
    # the rest of the caller's process (a notebook's BPE training).
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.mark.parametrize("before", [None, "true"])
def test_workers_fork_with_tokenizers_parallelism_off_and_give_the_caller_s_setting_back(monkeypatch, before):
    """tokenizers < 0.23 warns in each worker forked after its threads ran, unless the variable is off at the fork;
    after it, the caller's own setting (or none) is back."""
    if before is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", before)
    workers = data._Workers(GPT2Tokenizer(), 2)
    try:
        assert os.environ.get("TOKENIZERS_PARALLELISM") == before
        seen = {workers.pool.submit(os.getenv, "TOKENIZERS_PARALLELISM").result() for _ in range(8)}
    finally:
        workers.close()
    assert seen == {before or "false"}  # every worker forked with it set


def test_workers_read_only_a_few_batches_ahead_and_give_them_back_in_order():
    """At most 2 x workers batches in flight: the corpus is not read ahead into memory (the whole of TinyStories,
    tokenized, before the first write), and the results come in the batches' order."""
    batches = [[f"Story {i}: the cat sat."] * (1 + i % 3) for i in range(20)]
    drawn = []

    def reading():
        for batch in batches:
            drawn.append(1)
            yield batch

    workers = data._Workers(GPT2Tokenizer(), 2)
    try:
        ahead, results = [], []
        for ids, nbytes, documents in workers.map(reading()):
            ahead.append(len(drawn) - len(results))
            results.append((ids.tolist(), nbytes, documents))
    finally:
        workers.close()
    assert max(ahead) <= 4 and ahead[0] == 4
    inline = data._Workers(GPT2Tokenizer(), 1)  # one worker: in this process, one batch at a time
    assert results == [(ids.tolist(), nbytes, documents) for ids, nbytes, documents in inline.map(iter(batches))]
    assert [documents for *_, documents in results] == [len(b) for b in batches]


def test_val_fraction_sets_aside_whole_stories(stories_dir, tmp_path):
    stories = read_stories(stories_dir / "train.txt")
    meta = prepare(tmp_path, sources=[stories_dir / "train.txt"], val_fraction=0.1, limit=300, workers=1,
                   progress=False)
    prepared = open_prepared(tmp_path)
    train, val = documents(prepared, "train"), documents(prepared, "val")
    assert len(train) == 300 == meta["splits"]["train"]["documents"]  # --limit counts training stories
    # Story i goes to validation when floor((i+1)/10) > floor(i/10): every tenth, in order.
    assert val == [s for i, s in enumerate(stories[:len(train) + len(val)]) if (i + 1) % 10 == 0]
    assert sorted(train + val) == sorted(stories[:len(train) + len(val)])
    assert meta["source"]["val_fraction"] == 0.1
    again = prepare(tmp_path / "again", sources=[stories_dir / "train.txt"], val_fraction=0.1, limit=300,
                    workers=1, progress=False)
    assert again["splits"] == meta["splits"]
    assert (tmp_path / "val.bin").read_bytes() == (tmp_path / "again" / "val.bin").read_bytes()


def test_default_val_fraction_without_a_validation_split(stories_dir, tmp_path):
    meta = prepare(tmp_path, sources=[stories_dir / "v2_train.txt"], limit=200, workers=1, progress=False)
    n_val = meta["splits"]["val"]["documents"]
    assert meta["splits"]["train"]["documents"] == 200
    assert n_val == math.floor((200 + n_val) * 0.05) == 10


def test_each_source_format(stories_dir, valid, tmp_path):
    stories = read_stories(stories_dir / "v2_train.txt", 60)
    stories[3] = f"A literal {EOT} mid-story is text.\n\nA second paragraph."  # not a separator line
    expected = open_prepared(_prepared(tmp_path / "txt", [write_txt(tmp_path / "s.txt", stories)], valid))

    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"  {s}\n"}) + "\n" for s in stories) + "\n")
    as_json = tmp_path / "s.json"
    as_json.write_text(json.dumps([{"story": s, "summary": "x"} for s in stories] + [{"story": "  "}]))
    crlf = write_txt(tmp_path / "crlf.txt", [s.replace("\n", "\r\n") for s in stories], newline="\r\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "s.parquet"
    pq.write_table(pa.table({"text": stories}), parquet, row_group_size=16)
    categorical = tmp_path / "categorical.parquet"  # pandas' Categorical text: dictionary-encoded strings
    pq.write_table(pa.table({"text": pa.array(stories).dictionary_encode()}), categorical)
    halves = [write_txt(tmp_path / "a.txt", stories[:25]), write_txt(tmp_path / "b.txt", stories[25:])]
    for name, sources in (("jsonl", [jsonl]), ("json", [as_json]), ("parquet", [parquet]),
                          ("categorical", [categorical]), ("halves", halves)):
        prepared = open_prepared(_prepared(tmp_path / name, sources, valid))
        assert prepared.meta["splits"] == expected.meta["splits"], name
        assert np.array_equal(prepared.split("train"), expected.split("train")), name
    assert documents(expected, "train") == stories
    crlf_docs = documents(open_prepared(_prepared(tmp_path / "crlf", [crlf], valid)), "train")
    assert crlf_docs == [s.replace("\n", "\r\n") for s in stories]  # bytes kept as they are in the file


def _prepared(out, sources, valid_stories, **kw):
    val = out.parent / "valid_stories.jsonl"
    if not val.exists():
        val.write_text("".join(json.dumps({"text": s}) + "\n" for s in valid_stories))
    prepare(out, sources=sources, val_sources=[val], workers=1, progress=False, **kw)
    return out


def test_datasets_on_disk_and_the_hub_path(stories_dir, valid, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    train = read_stories(stories_dir / "train.txt", 80)
    saved = tmp_path / "tinystories"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": train}),
        "validation": datasets.Dataset.from_dict({"text": valid[:40]}),
    }).save_to_disk(str(saved))
    prepare(tmp_path / "disk", sources=[saved], workers=1, progress=False)
    prepared = open_prepared(tmp_path / "disk")
    assert documents(prepared, "train") == train and documents(prepared, "val") == valid[:40]

    # The default source, roneneldan/TinyStories on the hub, with the download replaced by the saved copy.
    # Without a limit the whole dataset is downloaded (with one, it is streamed: see the next test).
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, streaming: asked.append((name, streaming))
                        or datasets.load_from_disk(str(saved)))
    meta = prepare(tmp_path / "hub", workers=1, progress=False)
    assert asked == [("roneneldan/TinyStories", False)] and meta["source"]["train"] == "hf:roneneldan/TinyStories"
    hub = open_prepared(tmp_path / "hub")
    assert documents(hub, "train") == train and documents(hub, "val") == valid[:40]

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": train}).save_to_disk(str(single))
    meta = prepare(tmp_path / "one", sources=[single], workers=1, progress=False)
    assert meta["splits"]["val"]["documents"] == 4  # no validation split: 5% set aside

    # A recipe naming the saved DatasetDict takes its validation split: the same source prepared with
    # --val-fraction, even the default's 0.05, set other stories aside and is not the recipe's data. Where the
    # source has no split, 0.05 asked for is what the recipe prepares.
    from tinygemma.config import DataConfig
    from tinygemma.data import data_differences
    prepare(tmp_path / "carved", sources=[saved], val_fraction=0.05, workers=1, progress=False)
    assert len(documents(open_prepared(tmp_path / "carved"), "train")) == 76
    assert data_differences(DataConfig(source=[str(saved)]), open_prepared(tmp_path / "carved")) == [
        "validation: 0.05 of the stories (its validation split unused), the recipe asks for the source's validation split or 0.05 of its stories "
        "(no data.val_source)"]
    assert data_differences(DataConfig(source=[str(saved)]), prepared) == []
    prepare(tmp_path / "one_asked", sources=[single], val_fraction=0.05, workers=1, progress=False)
    assert data_differences(DataConfig(source=[str(single)]), open_prepared(tmp_path / "one_asked")) == []
    assert data_differences(DataConfig(source=[str(single)]), open_prepared(tmp_path / "one")) == []

    # A saved DatasetDict of only a validation split is a validation source (it was refused for lacking 'train'),
    # and no training source.
    val_only = tmp_path / "val_only"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": valid[:40]})}).save_to_disk(str(val_only))
    prepare(tmp_path / "val", sources=[single], val_sources=[val_only], workers=1, progress=False)
    assert documents(open_prepared(tmp_path / "val"), "val") == valid[:40]
    with pytest.raises(UserError, match=re.escape(f"{val_only} has no 'train' split (splits: validation)")):
        prepare(tmp_path / "none", sources=[val_only], workers=1, progress=False)
    assert not (tmp_path / "none").exists()

    # Mixed: a source with a validation split and one without. 5% of all is set aside, the split unused: said.
    import contextlib
    import io

    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        meta = prepare(tmp_path / "mixed", sources=[saved, stories_dir / "valid.txt"], limit=60, workers=1,
                       progress=False)
    assert meta["source"]["val"] == "set aside from the training source"
    assert f"warning: the validation split of {saved} is unused: the other sources have none" in said.getvalue()

    # A .json in JSON Lines layout, as Dataset.to_json writes by default: read as .jsonl (it was "not JSON"),
    # one row too (a lone object).
    for rows in (train, train[:1]):
        lines = tmp_path / f"exported{len(rows)}.json"
        datasets.Dataset.from_dict({"text": rows}).to_json(str(lines))
        prepare(tmp_path / f"lines{len(rows)}", sources=[lines], val_sources=[stories_dir / "valid.txt"], workers=1,
                progress=False)
        assert documents(open_prepared(tmp_path / f"lines{len(rows)}"), "train") == rows


def test_the_same_training_source_twice_is_refused(stories_dir, tmp_path):
    """Given twice (a shell pattern and the file again), a source's stories set aside for validation were trained
    on through the other copy."""
    link = tmp_path / "link.txt"
    link.symlink_to(stories_dir / "valid.txt")
    with pytest.raises(UserError, match=f"{link} and {stories_dir / 'valid.txt'} are the same training source"):
        prepare(tmp_path / "out", sources=[stories_dir / "valid.txt", link], progress=False, workers=1)
    assert not (tmp_path / "out").exists()
    # With validation from elsewhere nothing is set aside: a source given twice is trained on twice, as asked.
    once, twice = (prepare(tmp_path / name, sources=[link] * n, val_sources=[stories_dir / "train.txt"], progress=False,
                           workers=1)["splits"]["train"]["documents"] for name, n in (("once", 1), ("twice", 2)))
    assert twice == 2 * once


def test_gpt2_as_a_tokenizer_json_is_gpt2_for_a_recipe(stories_dir, tmp_path):
    """GPT-2's vocabulary saved as a tokenizer.json (a transformers export's) goes with gpt2 data and back; a
    recipe asking for one found the other refused as "tokenizer: gpt2, the recipe asks for gpt2"."""
    from tinygemma.config import DataConfig
    from tinygemma.data import data_differences
    from tinygemma.tokenizer import load_tokenizer

    saved = tmp_path / "gpt2.json"
    saved.write_text(load_tokenizer("gpt2").hf_json())
    source = [str(stories_dir / "valid.txt")]
    for tokenizer, asked in (("gpt2", str(saved)), (str(saved), "gpt2")):
        prepare(tmp_path / tokenizer.replace("/", "_"), sources=source, tokenizer=tokenizer, limit=30, workers=1,
                progress=False)
        prepared = open_prepared(tmp_path / tokenizer.replace("/", "_"))
        assert data_differences(DataConfig(source=source, limit=30, tokenizer=asked), prepared) == []
    assert data_differences(DataConfig(source=source, limit=30, tokenizer="bpe"), open_prepared(tmp_path / "gpt2")) == [
        "tokenizer: gpt2, the recipe asks for bpe"]


def test_data_differences_of_a_bpe_need_no_gpt2_ranks_and_name_an_old_bpes_size(stories_dir, tmp_path, monkeypatch):
    """A recipe whose data.tokenizer is the default gpt2 (train --data DIR of a BPE run) was compared by loading
    GPT-2's ranks through tiktoken: offline without its cache, train and --resume of a BPE run failed naming
    GPT-2, which the run never used. And data prepared before meta.json recorded the BPE size asked for, whose BPE
    stopped short of it, was "other [data]" for the recipe that made it, with no word of the way on."""
    import tinygemma.data as data_module
    from tinygemma.config import DataConfig

    source = [str(stories_dir / "valid.txt")]
    prepare(tmp_path / "bpe", sources=source, tokenizer="bpe", vocab_size=4096, limit=30, workers=1, progress=False)
    prepared = open_prepared(tmp_path / "bpe")
    assert prepared.vocab_size < 4096  # 30 stories: the BPE stopped short

    def offline(name):
        raise OSError("cannot load the GPT-2 vocabulary through tiktoken (ConnectionError)")

    monkeypatch.setattr(data_module, "load_tokenizer", offline)
    assert data_module.data_differences(DataConfig(source=source, limit=30), prepared) == [
        f"tokenizer: {prepared.tokenizer().identity}, the recipe asks for gpt2"]
    recipe = DataConfig(source=source, limit=30, tokenizer="bpe", vocab_size=4096)
    assert data_module.data_differences(recipe, prepared) == []
    meta = json.loads((tmp_path / "bpe" / "meta.json").read_text())
    del meta["source"]["bpe_vocab_size"]  # as prepared by a tinygemma before 2026-12-02 (which wrote no digests)
    for split in meta["splits"].values():
        del split["blake2b"]
    (tmp_path / "bpe" / "meta.json").write_text(json.dumps(meta))
    [why] = data_module.data_differences(recipe, open_prepared(tmp_path / "bpe"))
    assert why.startswith(f"vocabulary: a BPE of {prepared.vocab_size:,}, the recipe asks for a BPE of 4,096")
    assert f"set data.vocab_size = {prepared.vocab_size}" in why
    assert data_module.data_differences(DataConfig(source=source, limit=30, tokenizer="bpe",
                                                   vocab_size=prepared.vocab_size), open_prepared(tmp_path / "bpe")) == []


def test_hub_with_a_limit_streams_only_the_first_stories(stories_dir, valid, r50k, tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    train = read_stories(stories_dir / "train.txt", 400)
    # A stand-in for the hub: a dataset directory whose second training file is not JSON, so reading the whole
    # dataset (on the real hub, a download of about 1 GB) fails, and reading only the first stories does not.
    hub = tmp_path / "hub"
    hub.mkdir()
    for name, stories in (("train-00000-of-00002", train), ("validation-00000-of-00001", valid[:40])):
        (hub / f"{name}.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    (hub / "train-00001-of-00002.jsonl").write_text('{"text": "not a story\n')
    monkeypatch.setattr(data, "HUB_DATASET", str(hub))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # the full read's cache

    meta = prepare(tmp_path / "out", limit=300, workers=1, progress=True)
    prepared = open_prepared(tmp_path / "out")
    assert documents(prepared, "train") == train[:300] and documents(prepared, "val") == valid[:40]
    assert meta["splits"]["train"]["tokens"] == sum(len(r50k.encode_ordinary(s)) + 1 for s in train[:300])
    assert meta["source"]["train"] == f"hf:{hub}"
    err = capsys.readouterr().err
    assert f"reading {hub} train" in err and "300/300" in err  # progress while reading, and not one story more
    assert data.read_stories(limit=3) == train[:3]

    with pytest.raises(UserError, match=f"cannot load {hub}") as error:  # without a limit, everything is read
        prepare(tmp_path / "all", workers=1, progress=False)
    # What to do instead, for both commands that prepare (run has no --source of its own)
    assert str(error.value).endswith("--source FILE to tinygemma prepare, --set data.source=FILE to tinygemma run")


def test_bpe_prepare(stories_dir, valid, tmp_path):
    train = read_stories(stories_dir / "train.txt", 200)
    meta = prepare(tmp_path, sources=[stories_dir / "train.txt"], val_sources=[stories_dir / "valid.txt"],
                   tokenizer="bpe", vocab_size=600, limit=200, workers=2, progress=False)
    assert meta["tokenizer"]["file"] == "tokenizer.json" and (tmp_path / "tokenizer.json").exists()
    assert meta["vocab_size"] == 600 and meta["dtype"] == "uint16"
    prepared = open_prepared(tmp_path)
    assert prepared.tokenizer().sha256 == meta["tokenizer"]["sha256"]
    assert prepared.tokenizer().identity.startswith("tokenizer.json:")
    assert documents(prepared, "train") == train and documents(prepared, "val") == valid
    assert int(np.asarray(prepared.split("train")).max()) < 600


def test_prepare_says_when_a_tokenizer_does_not_give_back_the_text_it_reads(stories_dir, tmp_path, capsys,
                                                                          monkeypatch):
    """A tokenizer.json that lowercases (a normalizer), or whose vocabulary lacks a character, trains the model on
    other text than the stories, and its loss and bits per byte measure that text: prepare went on without a word,
    and compare set its bits per byte beside a lossless tokenizer's. It warns, naming what changed; a tokenizer that
    keeps the text (the trained BPE) says nothing."""
    from tinygemma.tokenizer import HFTokenizer

    bpe = tmp_path / "bpe"
    prepare(bpe, sources=[stories_dir / "train.txt"], val_sources=[stories_dir / "valid.txt"], tokenizer="bpe",
            vocab_size=400, limit=100, workers=1, progress=False)
    assert "warning" not in capsys.readouterr().err
    spec = json.loads((bpe / "tokenizer.json").read_text())
    lowered = tmp_path / "lowered.json"
    lowered.write_text(json.dumps({**spec, "normalizer": {"type": "Lowercase"}}))
    lacking = tmp_path / "lacking.json"  # (no "J" in its vocabulary: "Jack" reads as "ack")
    vocab = spec["model"]["vocab"]
    assert "J" in vocab
    lacking.write_text(json.dumps({**spec, "model": {**spec["model"], "vocab": {t: i for t, i in vocab.items()
                                                                             if t != "J"}, "merges": [
        m for m in spec["model"]["merges"] if "J" not in (m.split(" ") if isinstance(m, str) else m)]}}))
    assert HFTokenizer(lacking.read_text()).decode(HFTokenizer(lacking.read_text()).encode("Jim")) == "im"
    first = read_stories(stories_dir / "train.txt", 100)
    for tokenizer, changed, change in ((lowered, sum(story != story.lower() for story in first), str.lower),
                                       (lacking, sum("J" in story for story in first), lambda t: t.replace("J", ""))):
        prepare(tmp_path / tokenizer.stem, sources=[stories_dir / "train.txt"],
                val_sources=[stories_dir / "valid.txt"], tokenizer=str(tokenizer), limit=100, workers=1,
                progress=False)
        err = capsys.readouterr().err
        said = re.search(r"warning: the tokenizer does not give back the text it reads \((\d+) of the first 100 "
                         r"training stories; ('.*') comes back as ('.*')\): it changes text", err)
        assert said and int(said[1]) == changed > 0, err
        read, back = ast.literal_eval(said[2]), ast.literal_eval(said[3])
        assert back != read and change(read)[:20] == back[:20]  # the text around the first change
        assert "they do not compare with those of a tokenizer that keeps the text" in err
    # Spaces split off by a pre-tokenizer and never put back (no decoder): the warning names that cause too
    unjoined = tmp_path / "unjoined.json"
    unjoined.write_text(json.dumps({**spec, "pre_tokenizer": {"type": "Whitespace"}, "decoder": None}))
    prepare(tmp_path / "unjoined", sources=[stories_dir / "train.txt"], val_sources=[stories_dir / "valid.txt"],
            tokenizer=str(unjoined), limit=100, workers=1, progress=False)
    err = capsys.readouterr().err
    assert "does not give back the text it reads (100 of the first 100 training stories;" in err
    assert "a pre-tokenizer that splits off spaces with no decoder to put them back" in err
    # A file with no separators is one story: the check reads its first 10,000 characters (it read 20 MB whole)
    long = tmp_path / "long.txt"
    long.write_text(" ".join(first) * 3)
    seen = []
    monkeypatch.setattr(data, "changed_text", lambda tokenizer, stories: seen.extend(stories))
    prepare(tmp_path / "long", sources=[long], val_sources=[stories_dir / "valid.txt"], tokenizer=str(lowered),
            workers=1, progress=False)
    assert len(long.read_text()) > 30_000 and [len(story) for story in seen] == [data.TEXT_CHECK_CHARS]


def test_token_files_switch_to_uint32_exactly_past_65536_ids():
    """uint16 holds ids 0 to 65535: a vocabulary of 65,536 fits, one of 65,537 (id 65536 would wrap to 0) does not."""
    from tinygemma.tokenizer import dtype_for

    assert dtype_for(65_536) == np.uint16 and dtype_for(65_537) == np.uint32 and dtype_for(50_257) == np.uint16


def test_gemma_size_vocabulary_is_uint32(tmp_path, stories_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(c): c - 32 for c in range(32, 127)} | {"\n": 95, "<eos>": 100_000, "<unk>": 100_001}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    (tmp_path / "big.json").write_text(backend.to_str())
    meta = prepare(tmp_path / "out", sources=[stories_dir / "valid.txt"], tokenizer=tmp_path / "big.json",
                   limit=20, workers=1, progress=False)
    prepared = open_prepared(tmp_path / "out")
    assert meta["dtype"] == "uint32" and prepared.split("train").dtype == np.uint32
    assert (meta["eot_id"], meta["vocab_size"]) == (100_000, 100_002)
    assert int((np.asarray(prepared.split("train")) == 100_000).sum()) == 20  # one per training story


# ------------------------------------------------------------------ bad input


def _fail(capsys, *argv):
    """Run the CLI; return (exit status, stderr lines)."""
    capsys.readouterr()
    status = main(["prepare", "--no-progress", *map(str, argv)])
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "latin1", "tokenizer", "vocab", "vocab_gpt2",
                                  "format", "val_empty", "json_field"])
def test_bad_input_is_one_line_and_no_output(case, stories_dir, tmp_path, capsys):
    out = tmp_path / "out"
    txt = stories_dir / "train.txt"
    bad = tmp_path / "bad.txt"
    args = {
        "missing": ["--source", tmp_path / "nope.txt"],
        "empty": ["--source", write_txt(bad, ["", "  \n "])],
        "binary": ["--source", bad],
        "latin1": ["--source", bad],
        "tokenizer": ["--source", txt, "--tokenizer", "gpt5"],
        "vocab": ["--source", txt, "--tokenizer", "bpe", "--vocab-size", "1000000"],
        "vocab_gpt2": ["--source", txt, "--vocab-size", "4096"],
        "format": ["--source", tmp_path / "stories.csv"],
        "val_empty": ["--source", txt, "--limit", "5"],
        "json_field": ["--source", tmp_path / "s.jsonl"],
    }[case]
    if case == "binary":
        bad.write_bytes(bytes(range(256)) * 40)
    if case == "latin1":
        bad.write_bytes("Once upon a time, a café.\n<|endoftext|>\n".encode("latin-1"))
    (tmp_path / "stories.csv").write_text("text\nhello\n")
    (tmp_path / "s.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    status, err = _fail(capsys, "--out", out, *args)
    assert status == 2
    assert len(err) == 1 and err[0].startswith("tinygemma prepare: error: "), err
    assert "Traceback" not in err[0]
    assert not out.exists()
    expected = {"missing": "not found", "empty": "empty", "binary": "not UTF-8", "latin1": "not UTF-8",
                "tokenizer": "unknown tokenizer", "vocab": "vocabulary", "vocab_gpt2": "only to --tokenizer bpe",
                "format": "unknown source format", "val_empty": "no val stories", "json_field": "line 2"}[case]
    assert expected in err[0]


def test_cli_writes_a_dataset(stories_dir, tmp_path, capsys):
    assert main(["prepare", "--out", str(tmp_path), "--source", str(stories_dir / "train.txt"), "--limit", "50",
                 "--val-fraction", "0.2", "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    splits = open_prepared(tmp_path).meta["splits"]
    assert splits["val"]["documents"] == 12
    for split in ("train", "val"):  # each split's summary line, with its own counts
        assert f"\n{split}: {splits[split]['documents']:,} stories, {splits[split]['tokens']:,} tokens" in "\n" + out
    assert "train: 50 stories" in out


def test_preparing_other_data_over_a_dataset_says_its_runs_will_not_resume(stories_dir, tmp_path, capsys):
    """prepare replaces a dataset in its --out as it is asked to, but other data there (another limit, source or
    tokenizer) went without a word, and a run trained on the old data learned it only as its resume was refused.
    The same data prepared again says nothing."""
    out = tmp_path / "data"
    args = dict(sources=[stories_dir / "train.txt"], val_fraction=0.2, limit=40, workers=1, progress=False)
    prepare(out, **args)
    prepare(out, **args)
    assert "warning" not in capsys.readouterr().err
    prepare(out, **{**args, "limit": 30})
    assert capsys.readouterr().err == (f"tinygemma: warning: {out} held other prepared data, now replaced: a run "
                                       "trained on what it held refuses to resume on it (prepare that data again, "
                                       "into this folder, to go on with such a run)\n")
    assert open_prepared(out).meta["splits"]["train"]["documents"] == 30  # (the new data)
    # A dataset from before the digests: told by its tokenizer and token counts, as a resume tells it
    for limit, says in ((30, False), (40, True)):
        meta = json.loads((out / "meta.json").read_text())
        for split in meta["splits"].values():
            split.pop("blake2b")
        (out / "meta.json").write_text(json.dumps(meta))
        prepare(out, **{**args, "limit": limit})
        assert ("held other prepared data" in capsys.readouterr().err) == says, limit
    # GPT-2's tokenizer.json gives gpt2's very tokens, which a gpt2 run resumes on: the same data
    (tmp_path / "gpt2.json").write_text(GPT2Tokenizer().hf_json())
    prepare(out, **args)
    capsys.readouterr()
    prepare(out, **{**args, "tokenizer": str(tmp_path / "gpt2.json")})
    assert "warning" not in capsys.readouterr().err


def test_cli_takes_several_sources_after_one_flag(stories_dir, tmp_path, capsys):
    """`--source data/*.json` (the shell's expansion: several paths after one flag) was refused as unrecognized
    arguments; it reads them in the order given, as repeated flags do."""
    stories = read_stories(stories_dir / "train.txt", 40)
    parts = [write_txt(tmp_path / f"{i}.txt", stories[i * 10:(i + 1) * 10]) for i in range(4)]
    valid = str(stories_dir / "valid.txt")
    assert main(["prepare", "--out", str(tmp_path / "one"), "--source", *map(str, parts), "--val-source", valid,
                 "--no-progress", "--workers", "1"]) == 0
    assert main(["prepare", "--out", str(tmp_path / "many"), "--source", str(parts[0]), "--source",
                 *map(str, parts[1:]), "--val-source", valid, "--no-progress", "--workers", "1"]) == 0
    capsys.readouterr()
    assert documents(open_prepared(tmp_path / "one"), "train") == stories
    assert np.array_equal(open_prepared(tmp_path / "one").split("train"), open_prepared(tmp_path / "many").split("train"))


def test_prepare_takes_one_path_as_one_source(stories_dir, tmp_path):
    """From Python, sources="train.txt" (or a Path) is that file, as sources=["train.txt"] is: not the letters."""
    listed = prepare(tmp_path / "listed", sources=[stories_dir / "train.txt"], val_sources=[stories_dir / "valid.txt"],
                     limit=20, workers=1, progress=False)
    for one, val in ((str(stories_dir / "train.txt"), str(stories_dir / "valid.txt")),
                     (stories_dir / "train.txt", stories_dir / "valid.txt")):
        meta = prepare(tmp_path / type(one).__name__, sources=one, val_sources=val, limit=20, workers=1,
                       progress=False)
        assert meta["splits"] == listed["splits"] and meta["source"] == listed["source"]


@pytest.mark.parametrize("kwargs, message", [
    ({"tokenizer": "bpe", "vocab_size": "300"}, "--vocab-size (vocab_size) must be a positive integer, got '300'"),
    ({"tokenizer": "bpe", "vocab_size": 300.0}, "--vocab-size (vocab_size) must be a positive integer, got 300.0"),
    ({"val_fraction": "0.1"}, "--val-fraction (val_fraction) must be a number between 0 and 1, got '0.1'"),
    ({"tokenizer": None}, "--tokenizer (tokenizer) must be gpt2, bpe, a path to a tokenizer.json or a Tokenizer"),
    ({"limit": 0}, "--limit (limit) must be a positive integer, got 0"),
    ({"workers": 1.5}, "--workers (workers) must be a positive integer, got 1.5"),
    ({"sources": 123}, "--source (sources) must be story files: a path or a list of paths, got 123"),
    ({"sources": [None]}, "--source (sources) must be story files: a path or a list of paths, got [None]"),
    ({"val_sources": [5]}, "--val-source (val_sources) must be story files: a path or a list of paths, got [5]"),
    # a pattern that matched no file: never the hub's whole dataset (or a fraction set aside) in its place
    ({"sources": []}, "--source (sources) is an empty list: give story files, or None for the hub's TinyStories"),
    ({"val_sources": ()}, "--val-source (val_sources) is an empty list: give story files, or None for the "
                          "training source's own split"),
])
def test_prepare_from_python_refuses_bad_arguments_by_their_names(kwargs, message, stories_dir, tmp_path):
    """A notebook's prepare(vocab_size="300") ended in a TypeError traceback, and the refusals named only the
    command's flags: each is now a UserError naming the argument beside its flag, and nothing is written."""
    with pytest.raises(UserError, match=re.escape(message)):
        prepare(tmp_path / "out", **{"sources": stories_dir / "train.txt", "progress": False, **kwargs})
    assert not (tmp_path / "out").exists()


def test_a_txt_with_its_separators_written_inline_is_said_once(stories_dir, tmp_path, capsys):
    """`"".join(s + "<|endoftext|>" for s in stories)`, a common way to write such a file, is one story holding
    the marker as text (a separator is a line of its own): said once, though a BPE's training reads it twice."""
    stories = read_stories(stories_dir / "train.txt", 30)
    joined = tmp_path / "joined.txt"
    joined.write_text("".join(f"{s}{EOT}" for s in stories), encoding="utf-8")
    meta = prepare(tmp_path / "out", sources=joined, val_sources=stories_dir / "valid.txt", tokenizer="bpe",
                   vocab_size=300, workers=1, progress=False)
    assert meta["splits"]["train"]["documents"] == 1
    err = capsys.readouterr().err
    assert err.count(f"{joined}: 1 story holds {EOT} inside a line, read as text; stories are separated by a line "
                     f"holding only {EOT}") == 1, err
    prepare(tmp_path / "fine", sources=stories_dir / "valid.txt", limit=20, workers=1, progress=False)
    assert "inside a line" not in capsys.readouterr().err


def test_the_training_file_as_validation_source_is_refused(stories_dir, tmp_path):
    """The same file as --source and --val-source made validation the training stories, without a word."""
    train, link = stories_dir / "train.txt", tmp_path / "link.txt"
    link.symlink_to(train)  # another spelling of the same file
    for val_sources in (train, [stories_dir / "valid.txt", link]):
        with pytest.raises(UserError, match="is both a training and a validation source"):
            prepare(tmp_path / "out", sources=train, val_sources=val_sources, progress=False, workers=1)
    assert not (tmp_path / "out").exists()


def test_prepare_takes_numpy_numbers(stories_dir, tmp_path):
    """limit=np.int64(50) was refused as "not a positive integer", where train and generate take numpy's."""
    meta = prepare(tmp_path / "np", sources=stories_dir / "train.txt", limit=np.int64(50), val_fraction=np.float32(0.1),
                   workers=np.int64(1), progress=False)
    assert meta["splits"]["train"]["documents"] == 50 and meta["splits"]["val"]["documents"] == 5


def die(stories):
    os._exit(1)  # as the kernel's out-of-memory killer ends a worker


def test_a_bad_later_or_validation_source_is_refused_before_any_tokenizing(stories_dir, tmp_path, monkeypatch):
    """A second source or a validation source that is not JSON (or a parquet file without a text column) was
    found only after every story before it was tokenized, and after BPE training: minutes of the full corpus.
    Every local source's first story is read before anything else."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not JSON\n", encoding="utf-8")

    def too_late(*args, **kwargs):
        raise AssertionError("work started before every source was read")

    monkeypatch.setattr(data, "_tokenize_to_file", too_late)
    monkeypatch.setattr(data, "train_bpe", too_late)
    for kwargs in ({"sources": [stories_dir / "train.txt", bad]},
                   {"sources": stories_dir / "train.txt", "val_sources": bad}):
        with pytest.raises(UserError, match="bad.jsonl line 1 is not JSON"):
            prepare(tmp_path / "out", tokenizer="bpe", vocab_size=300, workers=1, progress=False, **kwargs)
        assert not (tmp_path / "out").exists()


def test_reading_edges_a_review_found(stories_dir, tmp_path, monkeypatch, capsys):
    """A null text in JSON Lines is skipped, as a parquet file's or the hub's null is (it stopped prepare); an
    upper-case extension is its format (".TXT" was unknown); a meta.json nested past Python's stack is not a
    dataset (a RecursionError traceback); a tokenizing worker killed from outside is one line (a
    BrokenProcessPool traceback)."""
    nulls = tmp_path / "nul.jsonl"
    nulls.write_text('{"text": "Tom ran."}\n{"text": null}\n{"story": "Ann sat."}\n', encoding="utf-8")
    upper = write_txt(tmp_path / "Stories.TXT", ["Tom ran.", "Ann sat."])
    upper_val = write_txt(tmp_path / "Valid.TXT", ["Tom sat.", "Ann ran."])
    for source in (nulls, upper):
        meta = prepare(tmp_path / source.stem, sources=source, val_sources=upper_val, tokenizer="gpt2", workers=1,
                       progress=False)
        assert meta["splits"]["train"]["documents"] == 2
    # A bad byte in JSON Lines is named by its own line (it said "after line 190" of line 201: decoding ran ahead)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b"".join(b'{"text": "Tom ran %d."}\n' % i for i in range(200)) + '{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin.jsonl line 201 is not UTF-8 text \(invalid continuation byte\)"):
        prepare(tmp_path / "latin", sources=latin, val_sources=upper, workers=1, progress=False)
    # ... and in text, by its line and byte in the file (it named none), past the reader's first block
    head = b"".join(b"Tom ran %d.\n" % i for i in range(200_000))
    (tmp_path / "latin.txt").write_bytes(head + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=rf"latin.txt is not UTF-8 text \(invalid continuation byte at line "
                                        rf"200,001, byte {len(head) + 3:,} of the file\)"):
        prepare(tmp_path / "latin-txt", sources=tmp_path / "latin.txt", val_sources=upper, workers=1, progress=False)
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "meta.json").write_text("[" * 100_000 + "]" * 100_000)
    assert not is_prepared_dataset(deep)
    monkeypatch.setattr(data, "encode_in_worker", die)  # forked workers find it by name
    status, err = _fail(capsys, "--out", tmp_path / "killed", "--source", stories_dir / "train.txt", "--workers", "2")
    assert status == 1 and len(err) == 1 and "a tokenizing worker process died" in err[0], err  # the machine's
    assert not (tmp_path / "killed").exists()


def test_prepare_writes_only_where_a_dataset_belongs(stories_dir, tmp_path, capsys):
    """A new or empty folder, or an earlier dataset (replaced); never a folder of other things, such as a
    transformers export whose tokenizer.json it would swap."""
    args = ["--source", stories_dir / "valid.txt", "--limit", "20", "--workers", "1"]
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text('{"model_type": "gemma3_text"}')
    (export / "tokenizer.json").write_text('{"the": "export\'s tokenizer"}')
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    status, err = _fail(capsys, "--out", export, *args)
    assert status == 2 and len(err) == 1 and "not a prepared dataset and holds other files (config.json, tokenizer.json)" in err[0]
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    (tmp_path / "empty").mkdir()
    assert _fail(capsys, "--out", tmp_path / "empty", *args)[0] == 0
    assert is_prepared_dataset(tmp_path / "empty") and not is_prepared_dataset(export)
    assert _fail(capsys, "--out", tmp_path / "empty", *args, "--tokenizer", "bpe", "--vocab-size", "300")[0] == 0
    assert open_prepared(tmp_path / "empty").vocab_size == 300  # the earlier dataset, replaced
    assert (tmp_path / "empty" / "tokenizer.json").exists()
    assert _fail(capsys, "--out", tmp_path / "empty", *args)[0] == 0  # gpt2 again: the BPE's file goes with it
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["meta.json", "train.bin", "val.bin"]
    status, err = _fail(capsys, "--out", tmp_path / "empty" / "meta.json", *args)
    assert status == 2 and "is a file" in err[0]


def test_prepare_leaves_other_programs_files_alone(stories_dir, tmp_path, capsys):
    """nanoGPT's train.bin and val.bin, or a lone tokenizer.json, are no dataset of prepare's: they were written
    over (and the tokenizer deleted), exit status 0."""
    args = ["--source", stories_dir / "valid.txt", "--limit", "20", "--workers", "1"]
    for names in (("train.bin", "val.bin"), ("tokenizer.json",), ("train.bin",)):
        folder = tmp_path / "-".join(names)
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"someone else's " + name.encode())
        status, err = _fail(capsys, "--out", folder, *args)
        assert status == 2 and len(err) == 1 and f"holds other files ({', '.join(names)})" in err[0], err
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == {n: b"someone else's " + n.encode() for n in names}


def test_a_prepare_stopped_while_replacing_a_dataset_is_finished_by_the_next(stories_dir, tmp_path, monkeypatch):
    """Killed between the old meta.json's removal and the new one's writing, the folder holds bins and no
    meta.json; its marker names them prepare's, so the next prepare replaces them, and removes the marker."""
    args = dict(sources=[stories_dir / "valid.txt"], workers=1, progress=False)
    prepare(tmp_path, limit=20, **args)

    def stopped(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # killed: no clean-up runs (a Ctrl-C's removes the unfinished files)
        patch.setattr(data, "atomic_write_json", stopped)
        patch.setattr(data, "remove_unfinished", lambda out_dir: None)
        with pytest.raises(KeyboardInterrupt):
            prepare(tmp_path, limit=30, **args)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prepare-incomplete", "train.bin", "val.bin"]
    prepare(tmp_path, limit=25, **args)
    assert open_prepared(tmp_path).meta["splits"]["train"]["documents"] == 25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "val.bin"]


# ------------------------------------------------------------------ interrupted runs, corrupt data


class FailingTokenizer(GPT2Tokenizer):
    """GPT-2, except that a worker fails on the story that mentions the needle."""

    def encode_to_numpy(self, text):
        if "needle" in text:
            raise RuntimeError("worker failed on purpose")
        return super().encode_to_numpy(text)


def test_a_failing_worker_is_surfaced_and_the_old_dataset_survives(stories_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_CHARS", 20_000)
    args = dict(sources=[stories_dir / "train.txt"], val_sources=[stories_dir / "valid.txt"], progress=False)
    prepare(tmp_path, limit=100, workers=1, **args)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="on purpose"):  # the first story mentions a needle
        prepare(tmp_path, tokenizer=FailingTokenizer(), limit=300, workers=2, **args)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files, nothing replaced
    assert open_prepared(tmp_path).meta["splits"]["train"]["documents"] == 100


def start_big_prepare(stories_dir, tmp_path, workers: int, stderr) -> tuple[subprocess.Popen, Path]:
    """`tinygemma prepare` of twelve copies of the sample stories into tmp_path/out, in a process of its own."""
    big = tmp_path / "big.txt"
    big.write_text((stories_dir / "train.txt").read_text(encoding="utf-8") * 12, encoding="utf-8")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(data.Path(data.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "tinygemma", "prepare", "--out", str(out), "--source", str(big),
                             "--workers", str(workers), "--no-progress"], env=env, stderr=stderr)
    return proc, out


def test_killed_prepare_leaves_no_dataset(stories_dir, tmp_path):
    proc, out = start_big_prepare(stories_dir, tmp_path, 1, subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(out.glob(".train.bin.*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert list(out.glob(".train.bin.*")), "killed before it started writing"
    assert not (out / "meta.json").exists() and not (out / "train.bin").exists()
    with pytest.raises(UserError, match="no meta.json"):
        open_prepared(out)
    # What the killed run left is prepare's own: preparing again into it is allowed, finishes a dataset, and
    # deletes the killed run's temporary (as large as what it had written).
    prepare(out, sources=[stories_dir / "valid.txt"], limit=20, workers=1, progress=False)
    assert open_prepared(out).meta["splits"]["train"]["documents"] == 20
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_a_second_prepare_into_a_folder_being_prepared_is_refused_and_touches_nothing(stories_dir, tmp_path):
    """Two `tinygemma run`s of one fresh recipe: the second prepare deleted the first one's temporaries."""
    from tinygemma.files import FolderLock
    out = tmp_path / "out"
    out.mkdir()
    writing = out / ".train.bin.0123abcd.tmp"  # the first prepare's temporary, as atomic_path names them
    writing.write_bytes(b"x" * 10)
    first = FolderLock(out, "a dataset")  # a second open file description conflicts even within one process
    first.acquire()
    try:
        with pytest.raises(UserError, match="is a dataset another process is writing"):
            prepare(out, sources=[stories_dir / "valid.txt"], limit=20, workers=1, progress=False)
        assert writing.exists() and (out / ".lock").exists()  # the holder's lock file is not removed either
    finally:
        first.release()
    prepare(out, sources=[stories_dir / "valid.txt"], limit=20, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_checks_its_folder_again_once_locked(stories_dir, tmp_path, monkeypatch):
    """Another command writing the folder between prepare's check and its lock (an export) is refused, not
    written over."""
    from tinygemma.files import FolderLock

    out = tmp_path / "out"
    real_acquire = FolderLock.acquire

    def acquire_after_another_wrote(self):
        (out / "model.safetensors").write_bytes(b"weights")
        real_acquire(self)

    monkeypatch.setattr(FolderLock, "acquire", acquire_after_another_wrote)
    with pytest.raises(UserError, match="is not a prepared dataset and holds other files"):
        prepare(out, sources=[stories_dir / "valid.txt"], limit=20, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_a_dataset_whose_meta_json_is_damaged_is_named_as_such(stories_dir, tmp_path):
    """A dataset copied short (its meta.json truncated) was refused as holding "other files", prepare's own: the
    refusal now says what is wrong with it, and what to delete; nothing is written over it."""
    out = tmp_path / "out"
    prepare(out, sources=[stories_dir / "valid.txt"], limit=20, workers=1, progress=False)
    (out / "meta.json").write_text('{"format": ')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=r"holds a meta.json that is not a readable one of prepare's \(meta.json, "
                                        r"train.bin, val.bin\): a damaged copy of a dataset, or another tool's files; "
                                        r"delete the folder \(or its meta.json\)"):
        prepare(out, sources=[stories_dir / "valid.txt"], limit=20, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_dataset_prepared_before_sources_were_recorded_opens(stories_dir, tmp_path):
    """meta.json's source is optional (datasets prepared before it was recorded): such a dataset opens."""
    out = tmp_path / "out"
    prepare(out, sources=[stories_dir / "valid.txt"], limit=20, workers=1, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    del meta["source"]
    (out / "meta.json").write_text(json.dumps(meta))
    opened = data.open_prepared(out)
    assert opened.meta["vocab_size"] == meta["vocab_size"] and len(opened.split("train")) == meta["splits"]["train"]["tokens"]


def test_a_byte_order_mark_is_not_text(tmp_path):
    """Files saved by Windows editors start with a byte-order mark: it is not the first story's text (in .txt it
    became three tokens of it) nor a JSON error (.jsonl and .json refused it)."""
    files = {".txt": "Once upon a time.\n<|endoftext|>\nThe end.\n",
             ".jsonl": '{"text": "Once upon a time."}\n{"text": "The end."}\n',
             ".json": '[{"story": "Once upon a time."}, {"story": "The end."}]'}
    for suffix, text in files.items():
        path = tmp_path / f"stories{suffix}"
        path.write_text("\ufeff" + text, encoding="utf-8")
        assert data.read_stories(path) == ["Once upon a time.", "The end."], suffix


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killed_prepare_takes_its_workers_with_it(stories_dir, tmp_path):
    """SIGKILL (or SIGTERM) to a prepare with 2 workers: the workers end too (they stayed, blocked, forever)."""
    if data.available_cpus() < 2:  # one usable core: prepare runs one worker, in process, and says so
        pytest.skip("needs two usable cores (prepare takes --workers 2 as one there)")
    proc, out = start_big_prepare(stories_dir, tmp_path, 2, subprocess.DEVNULL)
    children, workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children"), []
    deadline = time.monotonic() + 60
    while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        workers = [int(pid) for pid in children.read_text().split()]
    time.sleep(0.5)  # at work: tokenizing, or blocked handing back what they made
    proc.kill()
    proc.wait()
    assert len(workers) == 2, "killed before its workers started"

    def alive(pid: int) -> bool:  # a zombie (ended, not yet reaped by init) counts as ended
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 20
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, workers))


def test_no_file_descriptors_left_for_the_workers_is_one_line_not_a_hang(stories_dir, tmp_path):
    """Under a low limit on open files (ulimit -n), the worker pool failed part-way through starting: the error
    was printed, then the process waited forever at exit on the worker it had started. Each limit from too low to
    enough ends promptly: one line and exit status 1 (with no folder left), or the data written. The limits go
    down from enough: the pool's part-way start is just below the first limit that is enough, so the scan stops
    four limits past it, then tries the lowest, where the pool cannot even be made (a process each: 2.5 s of
    torch's import, so not every limit between)."""
    import resource

    env = {**os.environ, "PYTHONPATH": str(data.Path(data.__file__).parents[1])}
    said, failed = set(), 0
    for limit in range(18, 8, -1):
        if failed == 4 and limit != 9:
            continue
        out = tmp_path / f"limit{limit}"
        proc = subprocess.run(
            [sys.executable, "-m", "tinygemma", "prepare", "--out", str(out), "--source",
             str(stories_dir / "train.txt"), "--limit", "100", "--workers", "2", "--no-progress"],
            env=env, capture_output=True, text=True, timeout=60,
            preexec_fn=lambda n=limit: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)))
        if proc.returncode == 0:
            assert is_prepared_dataset(out)
            continue
        failed += 1
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, (limit, proc.stderr)
        assert "Too many open files" in proc.stderr and not out.exists()
        said.add("could not start 2 tokenizing worker processes" in proc.stderr)
    if len(os.sched_getaffinity(0)) >= 2:  # (on one core prepare takes one worker, in process)
        assert True in said, "no limit met the pool's start: widen the range"
        assert False not in said, "a limit met another failure: narrow the range"


def test_interrupted_prepare_with_workers_says_one_line(stories_dir, tmp_path):
    """Ctrl-C reaches the whole foreground group, workers included: the parent says one line and exits 130, no
    worker prints a traceback, and the half-written output goes."""
    if data.available_cpus() < 2:  # one usable core: prepare runs one worker, in process, and says so
        pytest.skip("needs two usable cores (prepare takes --workers 2 as one there)")
    big = tmp_path / "big.txt"
    big.write_text((stories_dir / "train.txt").read_text(encoding="utf-8") * 48, encoding="utf-8")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(data.Path(data.__file__).parents[1])}

    def own_group_with_default_sigint():  # as a terminal's foreground job (a background shell job ignores it)
        os.setpgrp()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-m", "tinygemma", "prepare", "--out", str(out), "--source", str(big),
                             "--workers", "2", "--no-progress"], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=own_group_with_default_sigint)
    deadline = time.monotonic() + 60
    while not list(out.glob(".train.bin.*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "tinygemma prepare: interrupted\n", err
    assert not out.exists(), sorted(p.name for p in out.iterdir())  # what was left, should it ever fail again


def test_open_prepared_refuses_corrupt_data(stories_dir, tmp_path):
    prepare(tmp_path, sources=[stories_dir / "valid.txt"], limit=40, workers=1, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    open_prepared(tmp_path)

    train = tmp_path / "train.bin"
    whole = train.read_bytes()
    train.write_bytes(whole[:-2])
    with pytest.raises(UserError, match="train.bin"):
        open_prepared(tmp_path)
    train.unlink()
    with pytest.raises(UserError, match="train.bin is missing"):
        open_prepared(tmp_path)
    train.write_bytes(whole)  # whole again: each refusal below is meta.json's own, not the missing file's
    open_prepared(tmp_path)

    for broken, words in (("{truncated", "meta.json"),
                          (json.dumps({**meta, "format": "nanogpt"}), "is not tinygemma-tokens version 1 data"),
                          (json.dumps({**meta, "version": 2}), "is not tinygemma-tokens version 1 data"),
                          (json.dumps({**meta, "dtype": "int8"}), "meta.json is malformed"),
                          (json.dumps({k: v for k, v in meta.items() if k != "splits"}), "meta.json is malformed")):
        (tmp_path / "meta.json").write_text(broken)
        with pytest.raises(UserError, match=words) as refused:
            open_prepared(tmp_path)
        assert "train.bin is" not in str(refused.value), str(refused.value)
    with pytest.raises(UserError, match="not a prepared dataset: no such folder; give the folder that `tinygemma "
                                        "prepare --out` wrote, or make this one with `tinygemma prepare --out "):
        open_prepared(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()  # (a bare `prepare --out DIR` would prepare the hub's stories with GPT-2's tokenizer)
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'empty'} is not a prepared dataset: no meta.json (an "
                                                  "interrupted prepare leaves none); make it with `tinygemma prepare "
                                                  f"--out {tmp_path / 'empty'}` and the --source and --tokenizer you mean")):
        open_prepared(tmp_path / "empty")


# ------------------------------------------------------------------ training batches


def batch_windows(tokens, settings: dict, world_size: int, micro_batch_size: int, step: int = 3) -> list[list]:
    """Every process's passes of one optimizer step, as lists of windows (token lists)."""
    import torch

    from tinygemma.config import TrainConfig
    from tinygemma.runtime import Runtime

    cfg = TrainConfig(**settings)
    passes = []
    for rank in range(world_size):
        rt = Runtime(torch.device("cpu"), torch.float32, rank=rank, world_size=world_size)
        batches = data.Batches(tokens, cfg, rt, micro_batch_size, vocab_size=int(tokens.max()) + 1)
        passes.append([torch.cat([x, y[:, -1:]], 1).tolist() for x, y in
                       (batches.get(step, m) for m in range(batches.micro_steps))])
    return passes


def assert_each_window_once(tokens, settings: dict, splits: list[tuple[int, int]]) -> None:
    """Under each (processes, micro_batch_size) of `splits`, the passes of all processes hold the step's global
    batch (batch_size x grad_accum_steps windows drawn from (seed, step 3)), each window once, in full passes."""
    global_batch = settings["batch_size"] * settings["grad_accum_steps"]
    starts = data.window_starts(settings["seed"], 3, len(tokens), settings["block_size"], global_batch)
    everything = sorted(tokens[s : s + settings["block_size"] + 1].tolist() for s in starts)
    for world_size, micro_batch_size in splits:
        passes = batch_windows(tokens, settings, world_size, micro_batch_size)
        assert all(len(p) == global_batch // world_size // micro_batch_size for p in passes)
        assert all(len(w) == micro_batch_size for p in passes for w in p)
        assert sorted(w for p in passes for windows in p for w in windows) == everything


def test_the_global_batch_is_the_same_windows_whatever_the_processes_and_micro_batch_size():
    """batch_size x grad_accum_steps windows a step, drawn from (seed, step): any number of processes and any
    micro-batch size train exactly those windows, each once; with micro_batch_size = batch_size a pass is one of
    the recipe's micro-steps, as before micro_batch_size existed."""
    tokens = np.arange(5000, dtype=np.uint16)
    settings = {"batch_size": 4, "grad_accum_steps": 4, "block_size": 8, "seed": 11}
    assert_each_window_once(tokens, settings, [(1, 4), (1, 16), (1, 2), (2, 4), (2, 8), (2, 1), (4, 4), (4, 2)])
    starts = data.window_starts(11, 3, len(tokens), 8, 16)
    one = batch_windows(tokens, settings, 1, 4)[0]
    assert one == [[tokens[s : s + 9].tolist() for s in starts[m * 4 : m * 4 + 4]] for m in range(4)]
    # Two processes, 8 sequences a pass: each pass is its two micro-steps of the interleaved layout.
    two = batch_windows(tokens, settings, 2, 8)
    assert two[1][0] == one[1] + one[3]


def test_every_process_refuses_a_bad_id_in_any_process_share():
    """Under torchrun a corrupt id in process 1's windows was refused by process 1 alone, while process 0 waited
    in a collective (a traceback there, or the NCCL timeout): every process checks the step's whole global batch."""
    import torch

    from tinygemma.config import TrainConfig
    from tinygemma.runtime import Runtime

    cfg = TrainConfig(batch_size=4, grad_accum_steps=2, block_size=8, seed=11)
    tokens = np.arange(5000, dtype=np.uint16) % 100
    starts = data.window_starts(11, 3, len(tokens), 8, 8)
    rank0 = data.Batches(tokens, cfg, Runtime(torch.device("cpu"), torch.float32, rank=0, world_size=2), 4, 100)
    theirs = [s for i, s in enumerate(starts) if i not in set(rank0.rows)]
    mine = {t for i in rank0.rows for t in range(starts[i], starts[i] + 9)}
    bad = next(t for s in theirs for t in range(s, s + 9) if t not in mine)  # in process 1's windows only
    tokens[bad] = 100
    with pytest.raises(UserError, match="the tokens hold id 100, outside the model's 100 ids"):
        rank0.get(3, 0)


def test_one_batches_object_draws_each_steps_own_windows():
    """train.py keeps one Batches for the run: each step's passes are that step's windows (a step's windows are
    read once and kept for its passes; a cache never refreshed trained the first step's windows throughout)."""
    import torch

    from tinygemma.config import TrainConfig
    from tinygemma.runtime import Runtime

    tokens = np.arange(5000, dtype=np.uint16)
    cfg = TrainConfig(batch_size=4, grad_accum_steps=2, block_size=8, seed=11)
    batches = data.Batches(tokens, cfg, Runtime(torch.device("cpu"), torch.float32), 4, vocab_size=5000)
    for step in (3, 4, 4, 7):
        starts = data.window_starts(11, step, len(tokens), 8, 8)
        for micro in range(batches.micro_steps):
            x, y = batches.get(step, micro)
            want = torch.from_numpy(np.stack([tokens[s : s + 9] for s in starts[micro * 4 : micro * 4 + 4]]))
            assert torch.equal(x, want[:, :-1].long()) and torch.equal(y, want[:, 1:].long())


def test_check_windows_checks_every_window_of_every_chunk():
    """The up-front check reads the windows 1,024 at a time: a corrupt id in the last window of a chunk is
    refused too (more windows than one chunk: a global batch of 32 x 64, or the validation windows)."""
    tokens = np.zeros(2048 * 10, dtype=np.uint16)
    starts = np.arange(2048) * 10  # window w holds tokens [10 w, 10 w + 10)
    for window in (1023, 1024, 2047):
        tokens[:] = 0
        tokens[starts[window] + 9] = 100  # its last token, a target only
        with pytest.raises(UserError, match="the tokens hold id 100, outside the model's 100 ids"):
            data.check_windows(tokens, starts, 9, 100)
    tokens[:] = 0
    data.check_windows(tokens, starts, 9, 100)


def test_processes_need_only_divide_the_global_batch_not_the_accumulation():
    """batch_size 6 x grad_accum_steps 2 on 4 processes (2 does not divide by 4; the global 12 does): each process
    trains 3 of the 12 windows, every window once, as on one process."""
    tokens = np.arange(5000, dtype=np.uint16)
    settings = {"batch_size": 6, "grad_accum_steps": 2, "block_size": 8, "seed": 5}
    assert_each_window_once(tokens, settings, [(1, 6), (2, 6), (2, 3), (3, 4), (3, 1), (4, 3), (6, 2), (12, 1)])
    from tinygemma.config import TrainConfig

    with pytest.raises(UserError, match=r"^the global batch, train.batch_size x grad_accum_steps = 6 x 2 = 12 "
                                        r"sequences, must be a multiple of the number of processes \(5\)"):
        data.process_share(TrainConfig(**settings), 5)


def test_micro_batch_sizes_that_do_not_divide_a_process_share_are_refused():
    from tinygemma.config import TrainConfig

    cfg = TrainConfig(batch_size=4, grad_accum_steps=4)
    assert data.micro_batch_sizes(8) == [8, 4, 2, 1]
    assert data.micro_batch_sizes(36) == [36, 18, 12, 9, 6, 4, 3, 2, 1] and data.micro_batch_sizes(1) == [1]
    assert data.micro_batch_sizes(2**40) == [2**k for k in range(40, -1, -1)]  # the largest batch: at once
    assert data.check_micro_batch_size(cfg, 2, 8) == 1 and data.check_micro_batch_size(cfg, 1, 2) == 8
    with pytest.raises(UserError, match=r"train.micro_batch_size \(3\) must divide .* = 8 sequences: choose one "
                                        r"of 8, 4, 2, 1 \(or auto\)"):
        data.check_micro_batch_size(cfg, 2, 3)
    assert data.requested_micro_batch_size(cfg, 2, "cpu") == 4  # auto off CUDA: batch_size
    # ... or, where a process's share is less (6 x 2 on 4 processes: 3 each), the largest size that divides it
    assert data.requested_micro_batch_size(TrainConfig(batch_size=6, grad_accum_steps=2), 4, "cpu") == 3
    assert data.requested_micro_batch_size(TrainConfig(batch_size=6, grad_accum_steps=1), 3, "cpu") == 2
    assert data.requested_micro_batch_size(cfg, 2, "cuda") is None  # auto on CUDA: probed
    assert data.requested_micro_batch_size(TrainConfig(batch_size=4, grad_accum_steps=4, micro_batch_size=16),
                                           1, "cuda") == 16
    for bad in ("0", "\u00b2", "\u0664"):  # "²" passed isdigit() and int() raised; int() took Arabic-Indic "٤"
        with pytest.raises(UserError, match=f"micro_batch_size must be auto or a positive integer, got '{bad}'"):
            TrainConfig(micro_batch_size=bad)


def test_a_full_disk_while_preparing_is_one_line_naming_the_file(stories_dir, tmp_path, monkeypatch):
    """The token files are written through write_errors too: a full disk names train.bin (not a bare errno line),
    and the dataset prepared before stays whole."""
    from tinygemma.files import WriteError

    out = tmp_path / "data"
    prepare(out, sources=[stories_dir / "train.txt"], limit=50, val_fraction=0.1, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(28, "No space left on device")

    real_open = open
    # data.py's open(): token files get a disk that is full, sources read as usual.
    monkeypatch.setattr(data, "open", lambda path, mode="r", *args, **kwargs: FullDisk() if "w" in mode else
                        real_open(path, mode, *args, **kwargs), raising=False)
    with pytest.raises(WriteError, match=rf"could not write {out / 'train.bin'} \(No space left on device\); the "
                                         "disk may be full"):
        prepare(out, sources=[stories_dir / "train.txt"], limit=50, val_fraction=0.1, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_write_that_stores_only_part_of_its_bytes_is_a_full_disk(stories_dir, tmp_path):
    """A raw write may store part of its bytes and say so only by its count (a disk filling up, a file size limit):
    prepare writes the rest, and a disk that takes no more is one line, the dataset prepared before kept whole.
    A real kernel's short writes: a file size limit (RLIMIT_FSIZE) with SIGXFSZ ignored, in a child process."""
    out = tmp_path / "data"
    prepare(out, sources=[stories_dir / "valid.txt"], limit=20, val_fraction=0.1, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    script = (
        "import resource, signal, sys\n"
        "from tinygemma.cli import main\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))\n"
        f"sys.exit(main(['prepare', '--out', {str(out)!r}, '--source', {str(stories_dir / 'train.txt')!r}, "
        "'--val-fraction', '0.1', '--limit', '1500', '--workers', '1', '--no-progress']))\n")
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and f"could not write {out / 'train.bin'}" in done.stderr, done.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_source_that_fails_to_read_is_not_blamed_on_the_output(tmp_path):
    """A parquet file damaged in the middle fails only once reading reaches it: that is the source's error, in
    one line naming it (it was reported as 'could not write train.bin', which reads like a full disk)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "stories.parquet"
    pq.write_table(pa.table({"text": [f"Story {i}: " + "a cat sat on a mat. " * 20 for i in range(4000)]}), source,
                   row_group_size=500)
    raw = bytearray(source.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 5000] = b"\xff" * 5000
    source.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=rf"^{source} could not be read \("):
        prepare(tmp_path / "out", sources=[source], workers=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_txt_reading_splits_each_block_once_whatever_the_layout(tmp_path, monkeypatch):
    """Stories of a .txt file are what splitting the whole text on its separator lines gives, whatever block the
    lines fall in; and each split reads only about a block, so a long story, or a file with no separator, is read
    in linear time (the unfinished story was split again with every block: 12 minutes for 1 GB)."""
    import random

    def whole(text):  # the reference: the whole file split at once
        return [s.strip() for s in data._SEPARATOR.split(text) if s.strip()]

    pieces = ["a", "bb\n", "\r\n", "  <|endoftext|>  \n", "<|endoftext|>\n", "<|endoftext|>", "x<|endoftext|>\n",
              "\n", " story ", "é😀\n", "\t<|endoftext|>\r\n"]
    rng = random.Random(0)
    path = tmp_path / "t.txt"
    for _ in range(500):
        text = "".join(rng.choice(pieces) * rng.randint(1, 3) for _ in range(rng.randint(0, 12)))
        path.write_text(text, encoding="utf-8", newline="")
        monkeypatch.setattr(data, "READ_CHARS", rng.randint(1, 20))
        assert list(data._txt_stories(path)) == whole(text), (text, data.READ_CHARS)

    split_sizes = []

    class Recording:
        def split(self, text):
            split_sizes.append(len(text))
            return separator.split(text)

    separator = data._SEPARATOR
    monkeypatch.setattr(data, "_SEPARATOR", Recording())
    monkeypatch.setattr(data, "READ_CHARS", 64)
    path.write_text("a line of a story that never ends\n" * 2000)  # 68,000 characters, no separator
    assert [len(s) for s in data._txt_stories(path)] == [68_000 - 1]
    assert max(split_sizes) <= 2 * 64


def test_null_stories_are_skipped_streamed_or_not(stories_dir, tmp_path, monkeypatch):
    """A null text row is skipped whether the hub is streamed (--limit) or read whole, as a parquet file's."""
    datasets = pytest.importorskip("datasets")
    train = read_stories(stories_dir / "train.txt", 60)
    hub = tmp_path / "hub"
    hub.mkdir()
    rows = [{"text": s} for s in train[:30]] + [{"text": None}] + [{"text": s} for s in train[30:]]
    (hub / "train-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(data, "HUB_DATASET", str(hub))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    assert data.read_stories(limit=40) == train[:40]  # streamed
    assert data.read_stories() == train  # read whole


def test_text_that_is_not_utf8_in_a_parquet_column_is_one_line(tmp_path):
    """A column declared text may hold bytes that are not UTF-8 (written without Arrow's checks): the source's
    fault, named in one line, not a UnicodeDecodeError's traceback."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    column = pa.array([b"Once upon a time.", b"bad \xff\xfe story"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": column}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad.parquet: its text is not UTF-8"):
        data.read_stories(tmp_path / "bad.parquet")


def test_workers_default_to_the_cores_this_process_may_use(monkeypatch, tmp_path):
    """Under taskset or a container's CPU set, one tokenizer process per usable core, not per core of the host."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert data.available_cpus() == 1
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(data, "CPU_QUOTA_FILE", Path("/nonexistent/cpu.max"))
    monkeypatch.setattr(data, "CPU_QUOTA_V1", (Path("/nonexistent/q"), Path("/nonexistent/p")))
    assert data.available_cpus() == (os.cpu_count() or 1)
    # docker --cpus 1.5 on a larger host: two tokenizer processes, not one per host core
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    for quota, cores in (("150000 100000", 2), ("max 100000", 64), ("50000 100000", 1), ("junk", 64)):
        (tmp_path / "cpu.max").write_text(quota + "\n")
        monkeypatch.setattr(data, "CPU_QUOTA_FILE", tmp_path / "cpu.max")
        assert data.available_cpus() == cores, quota
    monkeypatch.setattr(data, "CPU_QUOTA_FILE", Path("/nonexistent/cpu.max"))  # cgroup v1: two files
    monkeypatch.setattr(data, "CPU_QUOTA_V1", (tmp_path / "quota", tmp_path / "period"))
    for quota, cores in (("250000", 3), ("-1", 64)):
        (tmp_path / "quota").write_text(quota + "\n")
        (tmp_path / "period").write_text("100000\n")
        assert data.available_cpus() == cores, quota


def test_a_windows_machine_of_more_than_61_cores_starts_61_workers(monkeypatch):
    """ProcessPoolExecutor refuses more than 61 processes on Windows (a ValueError's traceback): prepare's default,
    one worker a core, passed it on a machine of 64 or more."""
    monkeypatch.setattr(sys, "platform", "win32")
    assert [data.pool_size(n) for n in (2, 61, 64, 256)] == [2, 61, 61, 61]
    monkeypatch.setattr(sys, "platform", "linux")
    assert data.pool_size(256) == 256


def test_a_tokenizer_class_of_the_notebook_is_used_in_process_where_workers_are_spawned(stories_dir, tmp_path,
                                                                                        monkeypatch, capsys):
    """Worker processes that are spawned (macOS's and Windows' default; forkserver, Linux's from Python 3.14)
    import the tokenizer's class: one defined in the notebook or script (__main__) is not found there, and prepare
    failed with the workers' tracebacks and a bare BrokenProcessPool. It tokenizes in its own process instead,
    said; where workers fork, they are used."""
    class Mine(GPT2Tokenizer):
        pass

    Mine.__module__ = "__main__"
    monkeypatch.setattr(data, "available_cpus", lambda: 2)
    started, workers = [], data._Workers
    monkeypatch.setattr(data, "_Workers", lambda tokenizer, n: started.append(n) or workers(tokenizer, n))
    for method, used in (("spawn", 1), ("forkserver", 1), ("fork", 2)):
        monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False, method=method: method)
        prepare(tmp_path / method, sources=[stories_dir / "train.txt"], limit=50, workers=2, tokenizer=Mine(),
                progress=False)
        assert started[-1] == used, method
        said = f"the tokenizer's class Mine is defined in the notebook or the script run, which worker processes " \
               f"started by {method} (macOS, Windows) cannot import; tokenizing in this process"
        assert (said in capsys.readouterr().err) == (used == 1), method
    assert (tmp_path / "spawn" / "train.bin").read_bytes() == (tmp_path / "fork" / "train.bin").read_bytes()


def test_spawned_workers_import_no_torch_and_tokenize_as_forked_ones(stories_dir, tmp_path):
    """Workers that are spawned (macOS, Windows) or come from a fork server (Linux from Python 3.14) import the
    module of their task and of the tokenizer's class: that was data.py, which imports torch, 3 s and 200 MB a
    worker (and a Ctrl-C in those seconds a worker's traceback). Their module now imports no torch, and their
    dataset is byte for byte the one tokenized in this process."""
    env = {**os.environ, "PYTHONPATH": str(data.Path(data.__file__).parents[1])}
    imported = subprocess.run([sys.executable, "-c", "import sys, tinygemma.tokenizer; "
                               "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"],
                              env=env, capture_output=True, text=True, check=True).stdout
    assert imported == "[]\n"
    source = stories_dir / "train.txt"
    script = (f"import multiprocessing\nmultiprocessing.set_start_method('spawn')\nfrom tinygemma.data import "
              f"prepare\nprepare({str(tmp_path / 'spawned')!r}, sources=[{str(source)!r}], limit=300, workers=2, "
              f"progress=False)\n")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    prepare(tmp_path / "here", sources=[source], limit=300, workers=1, progress=False)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "spawned" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()


def test_more_workers_than_cores_are_the_cores(stories_dir, tmp_path, monkeypatch, capsys):
    """--workers 100000 forked processes until memory ran out: more than the usable cores take the cores, said."""
    monkeypatch.setattr(data, "available_cpus", lambda: 2)
    started = []
    workers = data._Workers
    # (never more than 2 started here: without the cap this test must fail, not fork 100,000 processes)
    monkeypatch.setattr(data, "_Workers", lambda tokenizer, n: started.append(n) or workers(tokenizer, min(n, 2)))
    prepare(tmp_path / "d", sources=[stories_dir / "train.txt"], limit=50, workers=100_000, progress=False)
    assert started == [2]
    assert "tinygemma: warning: --workers (workers) 100000 is more than the 2 cores this process may use; using 2" in (
        capsys.readouterr().err)


def test_an_unreachable_hub_is_one_line_not_its_retries(tmp_path, monkeypatch, capsys):
    """huggingface_hub says each retry on stderr (11 lines over 25 s unreachable); prepare says the failure once."""
    datasets = pytest.importorskip("datasets")
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()

    def unreachable(name, streaming):
        hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    assert main(["prepare", "--out", str(tmp_path / "d"), "--limit", "10", "--no-progress"]) == 1  # the network's
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load roneneldan/TinyStories" in err and "Retrying" not in err
    assert hub_logging.get_verbosity() == level  # the library's own setting again afterwards

    def missing(name, streaming):  # not the network's failure: the name's (bad input, exit status 2)
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    assert main(["prepare", "--out", str(tmp_path / "d"), "--limit", "10", "--no-progress"]) == 2
    assert "cannot load roneneldan/TinyStories" in capsys.readouterr().err

    from datasets.utils import logging as datasets_logging

    datasets_level = datasets_logging.get_verbosity()

    def lost_while_streaming():  # the connection goes after the first story of a streamed split
        yield {"text": "Once upon a time."}
        hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        # datasets' own retries of a streamed file's read (20, 5 s apart), each a warning of its logger's
        datasets_logging.get_logger("datasets.utils.file_utils").warning(
            "Got disconnected from remote data host. Retrying in 5sec [1/20]")
        raise ConnectionError("Connection reset by peer")

    class Streamed:
        def __iter__(self):
            return lost_while_streaming()

    monkeypatch.setattr(datasets, "load_dataset", lambda name, streaming: {"train": Streamed()})
    assert main(["prepare", "--out", str(tmp_path / "d"), "--limit", "10", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "failed after 1 stories" in err and "Retrying" not in err
    assert (hub_logging.get_verbosity(), datasets_logging.get_verbosity()) == (level, datasets_level)


def test_two_streams_ended_in_either_order_leave_the_libraries_warnings_as_they_were():
    """The hub's streamed splits (training and validation, read together) each silence huggingface_hub's and
    datasets' warnings while they read; the first ended restored the levels the second had set, leaving them
    silenced for the rest of the process."""
    pytest.importorskip("datasets")
    from datasets.utils import logging as datasets_logging
    from huggingface_hub.utils import logging as hub_logging

    before = hub_logging.get_verbosity(), datasets_logging.get_verbosity()
    records = [{"text": "Once upon a time."}, {"text": "The end."}]
    first = data._streamed_stories(records, "train", None, False)
    second = data._streamed_stories(records, "validation", None, False)
    assert next(first) and next(second)
    assert (hub_logging.get_verbosity(), datasets_logging.get_verbosity()) == (40, 40)  # (ERROR) while they read
    first.close()
    assert (hub_logging.get_verbosity(), datasets_logging.get_verbosity()) == (40, 40)  # the second reads still
    second.close()
    assert (hub_logging.get_verbosity(), datasets_logging.get_verbosity()) == before


def test_hub_data_with_validation_set_aside_is_not_the_default_recipes():
    """A recipe without data.val_source takes the hub's validation split: hub data prepared with --val-fraction
    (any share, the default's 0.05 too) has other training tokens, and is not the recipe's; as prepared by
    default (the split), it is."""
    from types import SimpleNamespace

    from tinygemma.config import DataConfig
    from tinygemma.data import HUB_DATASET, data_differences

    def hub_data(val, carve):
        return SimpleNamespace(meta={"source": {"train": f"hf:{HUB_DATASET}", "val": val, "val_fraction": carve,
                                                "limit": None}, "tokenizer": {"kind": "gpt2"}})

    assert data_differences(DataConfig(), hub_data("the training source's validation split", None)) == []
    assert data_differences(DataConfig(), hub_data("set aside from the training source", 0.05)) == [
        "validation: 0.05 of the stories, the recipe asks for the source's validation split or 0.05 of its stories "
        "(no data.val_source)"]


def test_a_run_folder_given_for_data_names_its_data_dir_as_recorded(tmp_path):
    """A run's config.json holds data.dir as typed: a relative one is said to be from where it was trained."""
    from tinygemma.data import open_prepared

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for recorded, said in (("data", "data (its config.json's data.dir, from where it was trained)"),
                           (str(tmp_path / "data"), f"{tmp_path / 'data'} (its config.json's data.dir)")):
        (run / "config.json").write_text(json.dumps({"train": {}, "data": {"dir": recorded}}))
        with pytest.raises(UserError, match=re.escape(f"is a training run, not a prepared dataset: give the folder "
                                                      f"its data was prepared in, {said}")):
            open_prepared(run)


def test_a_list_given_as_one_story_source_is_one_line():
    """read_stories(["stories.txt"]) (a list, as prepare's sources=[...] takes) was a TypeError from Path()."""
    from tinygemma import UserError
    from tinygemma.data import read_stories

    with pytest.raises(UserError, match=r"a story source is one file or datasets folder \(a str or Path\), got list"):
        read_stories(["stories.txt"], limit=3)


@pytest.mark.parametrize("source", ["hf:roneneldan/TinyStories", "roneneldan/TinyStories", "someone/stories"])
def test_a_hub_name_as_source_says_how_hub_data_is_read(source, tmp_path, monkeypatch, capsys):
    """meta.json records the hub's stories as source hf:roneneldan/TinyStories; given back as --source (or any hub
    name) it was "source not found" alone, as a mistyped file is."""
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--source", source, "--out", "d", "--limit", "10", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"source not found: {source} (the hub's roneneldan/TinyStories is read with no " \
        "source given" in err and "save_to_disk(FOLDER)" in err and not (tmp_path / "d").exists()
    for path in ("stories.txt", "data/train.txt"):  # a file's path: no hub hint
        assert main(["prepare", "--source", path, "--out", "d", "--limit", "10"]) == 2
        assert capsys.readouterr().err.endswith(f"source not found: {path}\n")


# ------------------------------------------------------------------ pinned by mutation round 10


def test_windows_reach_the_last_target_and_differ_by_step():
    """Training's windows start anywhere the last of their block_size + 1 tokens fits (the split's last token is a
    target), a pure function of (seed, step) that changes with the step; validation's span the split to its end."""
    starts = np.concatenate([data.window_starts(0, step, 12, 10, 64) for step in range(20)])
    assert starts.min() == 0 and starts.max() == 12 - 10 - 1
    assert not np.array_equal(data.window_starts(0, 1, 1000, 10, 8), data.window_starts(0, 2, 1000, 10, 8))
    assert np.array_equal(data.window_starts(0, 1, 1000, 10, 8), data.window_starts(0, 1, 1000, 10, 8))
    starts = data.validation_starts(100, 10, 5)
    assert starts[0] == 0 and starts[-1] == 100 - 10 - 1


def test_story_files_read_as_written(tmp_path):
    """An indented separator line still separates; a record with both fields is read from "text"; a source more or
    less is other data (`tinygemma run` would train on data prepared from fewer files)."""
    path = tmp_path / "s.txt"
    path.write_text("one\n  <|endoftext|>\ntwo\n\t<|endoftext|>  \nthree\n")
    assert data.read_stories(path) == ["one", "two", "three"]
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"text": "the text", "story": "the story"}) + "\n")
    assert data.read_stories(path) == ["the text"]
    assert not data.same_sources(["a.txt"], ["a.txt", "b.txt"]) and not data.same_sources(["a.txt", "b.txt"], ["a.txt"])
    assert data.same_sources(["a.txt"], [str(Path("a.txt").resolve())])


def test_prepare_refuses_a_vocabulary_below_the_bytes_and_no_validation(tmp_path):
    source = tmp_path / "s.txt"
    source.write_text("\n<|endoftext|>\n".join(f"story {i} of a cat." for i in range(40)))
    with pytest.raises(UserError, match="at least 257"):
        prepare(tmp_path / "d", sources=[source], tokenizer="bpe", vocab_size=256, workers=1, progress=False)
    with pytest.raises(UserError, match="between 0 and 1"):
        prepare(tmp_path / "d", sources=[source], val_fraction=0, workers=1, progress=False)
    prepare(tmp_path / "d", sources=[source], workers=1, progress=False)  # a meta.json with an empty split: damaged
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    meta["splits"]["val"].update(documents=0, tokens=0, bytes=0)
    (tmp_path / "d" / "val.bin").write_bytes(b"")
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="malformed"):
        open_prepared(tmp_path / "d")


# ------------------------------------------------------------------ mutation round 20: data preparation, second pass

def test_a_bad_byte_after_a_character_cut_by_the_block_is_placed_exactly(tmp_path):
    """_first_bad_byte reads 1 MiB blocks; a character cut by the block's end is held over (`pending`), and the
    error's start counts those held bytes: the line and byte named must not count them twice."""
    head = b"a" * ((1 << 20) - 2) + "\u20ac".encode()  # the euro's 3 bytes: 2 in the first block, 1 in the next
    path = tmp_path / "cut.txt"
    path.write_bytes(head + b"\nx\n" + b"\xe9\n")  # latin-1 e-acute on line 3, at byte len(head) + 3
    with pytest.raises(UserError, match=rf"invalid continuation byte at line 3, byte {len(head) + 3:,} of the file"):
        data.read_stories(path)


def test_a_utf16_text_file_without_a_byte_order_mark_is_refused(tmp_path):
    """ASCII as UTF-16 is valid UTF-8 holding a NUL after every character: refused, never tokenized as stories."""
    path = tmp_path / "utf16.txt"
    path.write_bytes(f"Tom ran.\n{EOT}\nAnn sat.\n{EOT}\n".encode("utf-16-le"))
    with pytest.raises(UserError, match="utf16.txt is not UTF-8 text \\(it holds NUL bytes\\)"):
        data.read_stories(path)


def test_json_lines_in_a_json_file_that_starts_with_a_bom(tmp_path):
    """datasets' to_json writes JSON Lines into a .json; saved again by a Windows editor it starts with a BOM: still
    JSON Lines (streamed), not a JSON array that fails with "Extra data"."""
    path = tmp_path / "stories.json"
    path.write_text('\ufeff{"text": "Once upon a time."}\n{"text": "The end."}\n', encoding="utf-8")
    assert data.read_stories(path) == ["Once upon a time.", "The end."]


def test_a_json_object_spread_over_lines_is_named_as_the_files_layout(tmp_path):
    """A pretty-printed object in a .json is read as JSON Lines and fails on line 1: the refusal says what a .json
    of stories holds, not only that line 1 is not JSON."""
    path = tmp_path / "pretty.json"
    path.write_text('{\n  "text": "Once upon a time."\n}\n')
    with pytest.raises(UserError, match=r"pretty.json line 1 is not JSON .*: a \.json file of stories holds a JSON "
                                        r"array of objects .* or one object per line \(JSON Lines\)"):
        data.read_stories(path)


def test_a_parquet_story_column_is_read(tmp_path):
    """The archive's field is "story": a parquet file whose text column is named so is read, as JSON's is."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "stories.parquet"
    pq.write_table(pa.table({"story": ["Once upon a time.", None, "The end."], "n": [1, 2, 3]}), path)
    assert data.read_stories(path) == ["Once upon a time.", "The end."]


def test_large_string_text_columns_are_text(tmp_path):
    """Arrow's large_string (what polars and pandas' pyarrow strings write) is text, in parquet and in datasets."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "large.parquet"
    pq.write_table(pa.table({"text": pa.array(["Once upon a time.", "The end."], pa.large_string())}), path)
    assert data.read_stories(path) == ["Once upon a time.", "The end."]


def test_a_saved_dataset_with_a_story_column_is_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"story": ["Once upon a time.", "The end."]}).save_to_disk(str(tmp_path / "ds"))
    assert data.read_stories(tmp_path / "ds") == ["Once upon a time.", "The end."]


def test_a_cpu_quota_above_the_cores_is_the_cores(monkeypatch, tmp_path):
    """docker --cpus 8 on a container pinned to 2 cores (--cpuset-cpus 0,1): 2 workers, not 8 processes on 2 cores."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    (tmp_path / "cpu.max").write_text("800000 100000\n")
    monkeypatch.setattr(data, "CPU_QUOTA_FILE", tmp_path / "cpu.max")
    assert data.available_cpus() == 2


def test_a_datasets_folder_with_both_splits_may_be_its_own_validation_source(tmp_path):
    """--source DS --val-source DS, DS a DatasetDict with train and validation splits: the validation stories are
    its validation split, no leak, so it is not refused as "both a training and a validation source"."""
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["Tom ran.", "Ann sat."]}),
                          "validation": datasets.Dataset.from_dict({"text": ["Tom sat."]})}).save_to_disk(
        str(tmp_path / "ds"))
    meta = prepare(tmp_path / "d", sources=tmp_path / "ds", val_sources=tmp_path / "ds", workers=1, progress=False)
    assert meta["splits"]["train"]["documents"] == 2 and meta["splits"]["val"]["documents"] == 1


def test_a_later_parquet_source_without_text_is_refused_before_bpe_training(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    good = write_txt(tmp_path / "good.txt", ["Tom ran.", "Ann sat."])
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"summary": ["x"]}), bad)

    def no_training(*args, **kwargs):
        raise AssertionError("a BPE was trained before the bad source was refused")

    monkeypatch.setattr(data, "train_bpe", no_training)
    with pytest.raises(UserError, match="bad.parquet has no 'text' column"):
        prepare(tmp_path / "out", sources=[good, bad], tokenizer="bpe", vocab_size=300, workers=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_open_prepared_refuses_a_meta_json_whose_files_still_fit(tmp_path):
    """Malformed meta.json that the token files' sizes cannot expose: a 16-bit dtype that is not uint16 (int16 ids
    above 32767 read negative), an end-of-text id outside the vocabulary, a split of no stories, a source that is
    no object (data_differences' .get() on it was a traceback)."""
    train = write_txt(tmp_path / "train.txt", ["Tom ran.", "Ann sat."])
    val = write_txt(tmp_path / "val.txt", ["Tom sat."])
    meta = prepare(tmp_path / "d", sources=train, val_sources=val, workers=1, progress=False)
    open_prepared(tmp_path / "d")
    bad_val = {**meta["splits"]["val"], "documents": 0}
    for broken in ({**meta, "dtype": "int16"}, {**meta, "dtype": "float16"}, {**meta, "eot_id": meta["vocab_size"]},
                   {**meta, "splits": {**meta["splits"], "val": bad_val}}, {**meta, "source": ["train.txt"]}):
        (tmp_path / "d" / "meta.json").write_text(json.dumps(broken))
        with pytest.raises(UserError, match="meta.json is malformed"):
            open_prepared(tmp_path / "d")


def test_a_digest_that_is_not_a_string_is_none(tmp_path):
    """A meta.json's blake2b that is not a string (hand-edited, another tool's) is no digest: a resume skips the check
    rather than comparing a checkpoint's digest to a number."""
    train = write_txt(tmp_path / "train.txt", ["Tom ran.", "Ann sat."])
    meta = prepare(tmp_path / "d", sources=train, val_sources=write_txt(tmp_path / "v.txt", ["Tom sat."]), workers=1,
                   progress=False)
    assert open_prepared(tmp_path / "d").digest("train") == meta["splits"]["train"]["blake2b"]
    meta["splits"]["train"]["blake2b"] = 12345
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    assert open_prepared(tmp_path / "d").digest("train") is None


def test_the_validation_stories_digest_is_their_text_whatever_the_tokenizer_or_file(tmp_path):
    """meta.json's val text_blake2b is the validation stories' own: the same for gpt2 and a BPE, for a .txt and
    the same stories as .jsonl, and another for other stories of the same count and size (what compare tells runs
    of other tokenizers apart by; the tokens' digest differs with the tokenizer)."""
    train = write_txt(tmp_path / "train.txt", ["Tom ran to the park.", "Ann sat on the mat.", "The dog ran."] * 4)
    val = write_txt(tmp_path / "v.txt", ["Tom sat.", "Ann ran."])
    jsonl = tmp_path / "v.jsonl"
    jsonl.write_text("".join(json.dumps({"text": story}) + "\n" for story in ("Tom sat.", "Ann ran.")))
    other = write_txt(tmp_path / "w.txt", ["Tom ran.", "Ann sat."])
    metas = [prepare(tmp_path / name, sources=train, val_sources=v, tokenizer=tokenizer, vocab_size=vocab, workers=1,
                     progress=False)
             for name, v, tokenizer, vocab in (("g", val, "gpt2", None), ("b", val, "bpe", 300), ("j", jsonl, "gpt2", None),
                                               ("o", other, "gpt2", None))]
    texts = [meta["splits"]["val"]["text_blake2b"] for meta in metas]
    assert texts[0] == texts[1] == texts[2] != texts[3] and len(texts[0]) == 32
    assert metas[0]["splits"]["val"]["blake2b"] != metas[1]["splits"]["val"]["blake2b"]  # other tokens
    assert "text_blake2b" not in metas[0]["splits"]["train"]
    assert open_prepared(tmp_path / "b").text_digest() == texts[0]


def test_a_prepared_datasets_own_json_files_are_not_story_files(tmp_path):
    """`tinygemma eval --data DIR/meta.json` is the dataset's folder given wrongly, not a story file to tokenize."""
    (tmp_path / "d").mkdir()
    for name in ("meta.json", "tokenizer.json"):
        (tmp_path / "d" / name).write_text("{}")
    assert not data.is_story_file(tmp_path / "d" / "meta.json")
    assert not data.is_story_file(tmp_path / "d" / "tokenizer.json")
    assert data.is_story_file(tmp_path / "d" / "stories.json") and data.is_story_file(tmp_path / "tokenizer.json")


def test_a_vocabulary_of_exactly_the_largest_embedding_is_taken():
    from tinygemma.config import MAX_VOCAB_SIZE

    data._check_vocab_size(MAX_VOCAB_SIZE, "tokenizer x")
    with pytest.raises(UserError, match="more than the model's largest embedding"):
        data._check_vocab_size(MAX_VOCAB_SIZE + 1, "tokenizer x")


def test_one_worker_more_than_the_cores_is_the_cores(tmp_path, monkeypatch, capsys):
    """The cap on --workers is exact: cores + 1 workers are the cores, said, as 100,000 are."""
    monkeypatch.setattr(data, "available_cpus", lambda: 2)
    started = []
    workers = data._Workers
    monkeypatch.setattr(data, "_Workers", lambda tokenizer, n: started.append(n) or workers(tokenizer, min(n, 2)))
    train = write_txt(tmp_path / "train.txt", ["Tom ran.", "Ann sat."])
    prepare(tmp_path / "d", sources=train, val_sources=write_txt(tmp_path / "v.txt", ["Tom sat."]), workers=3,
            progress=False)
    assert started == [2]
    assert "--workers (workers) 3 is more than the 2 cores this process may use; using 2" in capsys.readouterr().err


def test_too_few_stories_to_set_validation_aside_says_how_to_fix_it(stories_dir, tmp_path):
    """5 stories at the default fraction 0.05 set none aside: the refusal names the cause and the remedies, not
    just an empty validation corpus the user never gave; where a limit is the cause, the limit that would set one
    aside (story i is set aside where floor((i + 1) f) > floor(i f): the 20th at 0.05, the 4th at 0.3)."""
    with pytest.raises(UserError) as caught:
        prepare(tmp_path / "out", sources=[write_txt(tmp_path / "five.txt", ["Tom ran."] * 5)], workers=1,
                progress=False)
    message = str(caught.value)
    assert "no val stories" in message
    assert "too few stories to set some aside; give validation stories (--val-source, data.val_source)" in message
    for limit, fraction, first in [(19, None, 20), (1, None, 20), (3, 0.3, 4), (5, 1e-9, 1000000000)]:
        with pytest.raises(UserError) as caught:
            prepare(tmp_path / "out", sources=[stories_dir / "train.txt"], limit=limit, val_fraction=fraction,
                    workers=1, progress=False)
        assert str(caught.value) == (
            f"no val stories: the validation corpus is empty (a limit of {limit} training stories sets none aside at "
            f"a fraction of {fraction or 0.05:g}, whose first is story {first}: use a limit of {first} or more "
            "(--limit, data.limit) with that many stories, or give validation stories (--val-source, data.val_source))")
    started = time.perf_counter()
    for fraction in (1e-30, 1e-310):  # (1e30 stories to its first: computed, not counted; past floats, a bound)
        with pytest.raises(UserError, match=r"at a fraction of 1e-\d+, whose first is story \d{30,}: use a limit"):
            prepare(tmp_path / "out", sources=[stories_dir / "train.txt"], limit=5, val_fraction=fraction, workers=1,
                    progress=False)
    assert time.perf_counter() - started < 30
    prepare(tmp_path / "ok", sources=[stories_dir / "train.txt"], limit=20, workers=1, progress=False)
    assert json.loads((tmp_path / "ok" / "meta.json").read_text())["splits"]["val"]["documents"] == 1
    # A validation source that is truly empty is not told to set stories aside
    empty = write_txt(tmp_path / "empty.txt", ["", "  "])
    with pytest.raises(UserError) as caught:
        prepare(tmp_path / "out2", sources=[stories_dir / "train.txt"], val_sources=[empty], limit=5, workers=1,
                progress=False)
    assert "no val stories" in str(caught.value) and "set some aside" not in str(caught.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_a_source_stamp_tells_a_file_or_a_datasets_folder_changed_since(tmp_path):
    """[bytes, files]: what `run` compares with meta.json's before training a new run on data prepared from a
    local source (test_pipeline has the refusal). Not the modification time, which a `touch`, a copy or a sync
    changes with the same stories, nor a datasets folder's `map` caches and hidden files, written beside the data
    by the user's own reads of it."""
    from tinygemma.data import source_stamp

    story = write_txt(tmp_path / "s.txt", ["Tom ran."])
    stamp = source_stamp(story)
    assert stamp == [story.stat().st_size, 1]
    os.utime(story, ns=(1, 1))  # touched: the same stories
    assert source_stamp(story) == stamp
    write_txt(story, ["Tom sat down."])
    assert source_stamp(story) != stamp
    folder = tmp_path / "saved"
    (folder / "train").mkdir(parents=True)
    for name in ("dataset_dict.json", "train/data-00000-of-00001.arrow"):
        (folder / name).write_text("x")
    assert source_stamp(folder) == [2, 2]
    for name in ("train/cache-0123abcd.arrow", ".DS_Store", ".cache/x.lock", "train/.tmp"):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text("cached")
    assert source_stamp(folder) == [2, 2]
    (folder / "train/data-00001-of-00002.arrow").write_text("yy")
    assert source_stamp(folder) == [4, 3]


def test_a_source_given_as_a_link_is_stamped_as_the_link_not_its_target(tmp_path):
    """A recipe names stories.txt, a link; pointed at other stories since, the source has changed. Stamped by the
    link's target's path, the data was reused (the link's new target unstamped), and an edit of the old target,
    which no recipe names any more, refused it."""
    from tinygemma.data import changed_sources

    old, new = write_txt(tmp_path / "v1.txt", ["Tom ran."] * 30), write_txt(tmp_path / "v2.txt", ["Ann sat down."] * 30)
    link = tmp_path / "stories.txt"
    link.symlink_to(old)
    prepare(tmp_path / "d", sources=[link], tokenizer="bpe", vocab_size=300, workers=1, progress=False)
    data = open_prepared(tmp_path / "d")
    assert list(data.meta["source_stamps"]) == [str(link)] and changed_sources(data) == []
    link.unlink()
    link.symlink_to(new)
    assert changed_sources(data) == [str(link)]


@pytest.mark.parametrize("val_lines", [[""], ["", "  "]], ids=["empty", "separators only"])
def test_an_empty_validation_source_is_refused_before_the_training_stories_are_tokenized(stories_dir, tmp_path,
                                                                                        monkeypatch, val_lines):
    """Whatever the tokenizer: for the whole of TinyStories, minutes of tokenizing came before the refusal."""
    started = []
    monkeypatch.setattr(data, "_Workers", lambda *args: started.append(args))
    for tokenizer in ("gpt2", "bpe"):
        with pytest.raises(UserError, match="^no val stories: the validation corpus is empty$"):
            prepare(tmp_path / "out", sources=[stories_dir / "train.txt"], tokenizer=tokenizer,
                    val_sources=[write_txt(tmp_path / "empty.txt", val_lines)], workers=1, progress=False)
    assert started == [] and not (tmp_path / "out").exists()


def test_a_bpe_is_not_trained_for_stories_that_leave_none_to_validate_on(stories_dir, tmp_path, monkeypatch):
    """--tokenizer bpe on too few stories to set some aside: refused before the BPE is trained (minutes on the
    whole corpus, thrown away), as an empty training corpus is."""
    trained = []
    monkeypatch.setattr(data, "train_bpe", lambda *args: trained.append(args))
    for val_sources in (None, [write_txt(tmp_path / "empty.txt", [""])]):
        with pytest.raises(UserError, match="no val stories"):
            prepare(tmp_path / "out", sources=[stories_dir / "train.txt"], val_sources=val_sources, limit=5,
                    tokenizer="bpe", vocab_size=300, workers=1, progress=False)
    assert trained == [] and not (tmp_path / "out").exists()


def test_val_source_and_val_fraction_together_are_refused(stories_dir, tmp_path, capsys):
    """Both given, the fraction was silently ignored: validation came from --val-source, and meta.json recorded no
    fraction, the user's --val-fraction 0.2 lost without a word."""
    with pytest.raises(UserError, match="give either --val-source \\(val_sources\\) or --val-fraction"):
        prepare(tmp_path / "api", sources=[stories_dir / "train.txt"], val_sources=[stories_dir / "valid.txt"],
                val_fraction=0.2, limit=20, workers=1, progress=False)
    assert main(["prepare", "--out", str(tmp_path / "cli"), "--source", str(stories_dir / "train.txt"),
                 "--val-source", str(stories_dir / "valid.txt"), "--val-fraction", "0.2", "--limit", "20",
                 "--workers", "1", "--no-progress"]) == 2
    assert "give either --val-source" in capsys.readouterr().err
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()


def test_a_recipes_bpe_is_not_met_by_data_of_a_given_tokenizer_json(stories_dir, tmp_path):
    """A recipe asking for a BPE trained on its stories, against data prepared from the same stories with a
    tokenizer.json of the same size trained on other text: another tokenizer (the recipe's own prepare makes a
    different one), so `run` must not train on it as the recipe's data."""
    stories, other = stories_dir / "train.txt", stories_dir / "valid.txt"
    prepare(tmp_path / "other", sources=[other], tokenizer="bpe", vocab_size=300, limit=60, workers=1, progress=False)
    given = tmp_path / "other" / "tokenizer.json"
    prepare(tmp_path / "given", sources=[stories], tokenizer=str(given), limit=60, workers=1, progress=False)
    want = DataConfig(source=[str(stories)], tokenizer="bpe", vocab_size=300, limit=60)
    assert data_differences(want, open_prepared(tmp_path / "given")) == [
        f"tokenizer: {open_prepared(tmp_path / 'given').tokenizer().identity}, the recipe asks for a BPE trained on "
        "its stories"]
    prepare(tmp_path / "own", sources=[stories], tokenizer="bpe", vocab_size=300, limit=60, workers=1, progress=False)
    assert data_differences(want, open_prepared(tmp_path / "own")) == []  # the recipe's own: the same


def test_a_parquet_file_with_text_and_story_columns_is_read_from_text(tmp_path):
    """As a JSON record with both fields is read from "text", so is a parquet file with both columns."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "both.parquet"
    pq.write_table(pa.table({"story": ["the story", "another story"], "text": ["the text", "another text"]}), path)
    assert data.read_stories(path) == ["the text", "another text"]


def test_a_saved_dataset_with_text_and_story_columns_is_read_from_text(tmp_path):
    """As a JSON record and a parquet file with both are read from "text", so is a datasets folder."""
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"story": ["the story", "another story"], "text": ["the text", "another text"]}
                               ).save_to_disk(str(tmp_path / "ds"))
    assert data.read_stories(tmp_path / "ds") == ["the text", "another text"]


def test_an_upper_case_extension_picks_its_own_reader(tmp_path):
    """check_source takes STORIES.JSONL (the extension's case ignored): it is read as JSON Lines, each record's text,
    not as a .txt of one story holding the JSON."""
    path = tmp_path / "STORIES.JSONL"
    path.write_text('{"text": "Tom ran."}\n{"text": "Ann sat."}\n', encoding="utf-8")
    assert data.read_stories(path) == ["Tom ran.", "Ann sat."]


def test_json_lines_in_a_json_file_after_a_bom_and_blank_lines(tmp_path):
    """A .json of JSON Lines that starts with a byte-order mark and then blank lines (or more than one read's worth
    of them) is still JSON Lines, streamed, not a JSON array that fails with "Extra data"."""
    for name, head in (("bom_blank.json", "\ufeff\n\n"), ("long_blank.json", "\n" * 5000)):
        path = tmp_path / name
        path.write_text(head + '{"text": "Once upon a time."}\n{"text": "The end."}\n', encoding="utf-8")
        assert data.read_stories(path) == ["Once upon a time.", "The end."]


def test_only_a_trained_bpe_records_the_vocabulary_size_asked_for(tmp_path):
    """meta.json's source.bpe_vocab_size is the size a BPE was asked for; data of any other tokenizer has none (a
    null there reads as "a BPE of None" to data_differences)."""
    source = tmp_path / "s.txt"
    source.write_text("".join(f"Story {i}: the cat sat on a mat.\n{EOT}\n" for i in range(40)), encoding="utf-8")
    meta = prepare(tmp_path / "gpt2", sources=[source], workers=1, progress=False)
    assert "bpe_vocab_size" not in meta["source"]
    assert "bpe_vocab_size" not in json.loads((tmp_path / "gpt2" / "meta.json").read_text())["source"]
    meta = prepare(tmp_path / "bpe", sources=[source], tokenizer="bpe", vocab_size=300, workers=1, progress=False)
    assert meta["source"]["bpe_vocab_size"] == 300


def test_the_sources_are_recorded_in_the_order_given(tmp_path):
    """meta.json's source.train lists the sources as given (they are read in that order): the recipe that prepared
    the data, sources not in sorted order, finds it its own."""
    sources = []
    for name in ("zoo.txt", "ant.txt"):
        path = tmp_path / name
        path.write_text("".join(f"{name} story {i}.\n{EOT}\n" for i in range(30)), encoding="utf-8")
        sources.append(str(path))
    meta = prepare(tmp_path / "d", sources=sources, workers=1, progress=False)
    assert meta["source"]["train"] == sources
    assert data_differences(DataConfig(source=sources), open_prepared(tmp_path / "d")) == []


def test_a_mixed_sources_unused_split_names_the_fraction_asked_for(tmp_path):
    """--val-fraction 0.2 over a DatasetDict with a validation split and a .txt without: the split is unused, said
    with the fraction asked for, and meta.json does not call it unused by --val-fraction alone."""
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [f"Tom ran {i}." for i in range(20)]}),
                          "validation": datasets.Dataset.from_dict({"text": ["Tom sat."]})}).save_to_disk(str(saved))
    txt = tmp_path / "s.txt"
    txt.write_text("".join(f"Ann sat {i}.\n{EOT}\n" for i in range(20)), encoding="utf-8")
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        meta = prepare(tmp_path / "d", sources=[saved, txt], val_fraction=0.2, workers=1, progress=False)
    assert f"the validation split of {saved} is unused: the other sources have none, so validation is 0.2 of all" in (
        said.getvalue())
    assert meta["source"]["val"] == "set aside from the training source" and meta["splits"]["val"]["documents"] == 8


def test_validation_sources_are_recorded_as_a_list_the_recipe_matches(tmp_path):
    """meta.json's source.val lists every --val-source, as given: the recipe with that data.val_source finds the data
    its own (a lone string, or only the first file, reads as other validation data)."""
    paths = {}
    for name in ("s.txt", "v1.txt", "v2.txt"):
        paths[name] = tmp_path / name
        paths[name].write_text("".join(f"{name} story {i}.\n{EOT}\n" for i in range(10)), encoding="utf-8")
    val = [str(paths["v1.txt"]), str(paths["v2.txt"])]
    meta = prepare(tmp_path / "d", sources=[paths["s.txt"]], val_sources=val, workers=1, progress=False)
    assert meta["source"]["val"] == val and meta["splits"]["val"]["documents"] == 20
    assert data_differences(DataConfig(source=[str(paths["s.txt"])], val_source=val), open_prepared(tmp_path / "d")) == []


def test_a_streamed_validation_split_has_no_total_of_the_training_limit(tmp_path, monkeypatch, capsys):
    """--limit counts training stories: the streamed validation split's progress is not shown out of it ("3/4")."""
    datasets = pytest.importorskip("datasets")
    splits = {"train": [{"text": f"Tom ran {i}."} for i in range(6)],
              "validation": [{"text": f"Ann sat {i}."} for i in range(3)]}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, streaming: splits)
    prepare(tmp_path / "d", limit=4, workers=1, progress=True)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any("reading roneneldan/TinyStories train" in line and "4/4" in line for line in lines)
    val = [line for line in lines if "reading roneneldan/TinyStories validation" in line]
    assert val and not any("/4" in line for line in val)


def test_a_ctrl_c_at_any_context_managers_entry_leaves_no_half_dataset(stories_dir, tmp_path, interrupt_on_entry):
    """A Ctrl-C where CPython runs its handler as each context manager of prepare is entered (as its generator
    yields): a new folder goes (an interrupted prepare's test saw it left empty now and then, the temporary still
    there when the folder's clean-up came), and a folder that held a dataset holds it still, or none once prepare
    began renaming its files in: never a half."""
    source = [stories_dir / "valid.txt"]
    prepare(tmp_path / "old", sources=source, limit=20, val_fraction=0.2, workers=1, progress=False)
    old = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}

    def interrupted(out: Path, at: int) -> str | None:
        """What prepare into `out`, interrupted as its at-th manager is entered, left; None where it went through."""
        interrupt_on_entry.arm(at)
        try:
            prepare(out, sources=source, limit=30, val_fraction=0.2, workers=1, progress=False)
        except KeyboardInterrupt as stopped:  # (alive here, and the generators with it)
            left = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
            assert left is None if out.name.startswith("new") else left in ({}, old), (at, left, stopped)
            return "gone" if left is None else "none" if left == {} else "kept"
        interrupt_on_entry.at = None  # (pytest's own managers follow)
        assert len(interrupt_on_entry.entered) == at - 1  # every manager it enters was interrupted once
        return None

    outcomes = []
    for at in range(1, 100):
        shutil.copytree(tmp_path / "old", tmp_path / f"old{at}")
        outcomes += [interrupted(tmp_path / f"new{at}", at), interrupted(tmp_path / f"old{at}", at)]
        if outcomes[-1] is None:
            break
    assert outcomes[-2:] == [None, None] and open_prepared(tmp_path / f"new{at}").split("val").size
    entered = interrupt_on_entry.entered
    assert {"locked_folder", "made_folders", "atomic_path"} <= set(entered), entered
    assert {"gone", "none", "kept"} == set(outcomes[:-2]) and len(outcomes) > 30, outcomes


def test_a_ctrl_c_once_meta_json_is_written_keeps_the_dataset_and_drops_the_marker(stories_dir, tmp_path,
                                                                                   monkeypatch):
    """A Ctrl-C just after the new meta.json is written: the dataset is finished and stays, without the marker or
    the earlier BPE's tokenizer.json (gpt2 names none) that the rest of prepare removes; one just after the marker
    is made, before the old meta.json goes: the old dataset stays whole, without the marker."""
    args = dict(sources=[stories_dir / "valid.txt"], val_fraction=0.2, workers=1, progress=False)
    prepare(tmp_path, limit=20, tokenizer="bpe", vocab_size=300, **args)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_touch, real_write, touched = Path.touch, data.atomic_write_json, []

    def touch_then_ctrl_c(path, *a, **k):
        real_touch(path, *a, **k)
        if path.name == data.INCOMPLETE_NAME:
            touched.append(path)
            raise KeyboardInterrupt

    def write_then_ctrl_c(path, value):
        real_write(path, value)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Path, "touch", touch_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            prepare(tmp_path, limit=30, **args)
    assert touched and {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old
    monkeypatch.setattr(data, "atomic_write_json", write_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, limit=30, **args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert open_prepared(tmp_path).meta["splits"]["train"]["documents"] == 30


def test_a_ctrl_c_as_the_hubs_warnings_are_silenced_gives_them_back(interrupt_on_entry):
    """A Ctrl-C in the instant the hub's and datasets' warnings were silenced left them silenced (in a Python
    session, until the garbage collector came): they come back at once."""
    from datasets.utils import logging as datasets_logging
    from huggingface_hub.utils import logging as hub_logging

    before = hub_logging.get_verbosity(), datasets_logging.get_verbosity()
    assert before != (hub_logging.ERROR, datasets_logging.ERROR)
    interrupt_on_entry.arm(1, "_hub_errors_only")
    with pytest.raises(KeyboardInterrupt) as stopped:
        with data._hub_errors_only():
            pytest.fail("the block ran")
    assert (hub_logging.get_verbosity(), datasets_logging.get_verbosity()) == before and not data._SILENCED
    del stopped  # (after the checks: the exception, and the generator with it, lived until here)
