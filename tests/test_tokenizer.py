"""Tokenizers against real TinyStories text: tiktoken's own ids, exact round trips, saved specs, transformers."""

import json
import os

import numpy as np
import pytest
import tiktoken
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from tinygemma.errors import UserError
from tinygemma.tokenizer import (
    CHAT_TEMPLATE,
    RECORD_FILES,
    GPT2Tokenizer,
    HFTokenizer,
    encode_stories,
    gpt2_as_tokenizers,
    load_tokenizer,
    missing_bytes,
    token_byte_lengths,
    tokenizer_from_spec,
    train_bpe,
)

EOT = "<|endoftext|>"
# Text a byte-level BPE has never seen: other scripts, emoji, control bytes, CRLF, spaces at both ends.
ODD_TEXT = [" leading space", "trailing  \n\n", "a\r\nb\tc\x00d\x7f", "Ünïcödé ½ — “quotes” 日本語 😀👍🏽",
            f"a literal {EOT} inside a story", "  ", "", "x" * 3000, "\u200b\ufeff zero width"]


def read_stories(path, limit=None) -> list[str]:
    """The stories of one of the dataset's text files, parsed independently of tinygemma.data."""
    stories = [s.strip() for s in path.read_text(encoding="utf-8").split(f"\n{EOT}\n")]
    return [s for s in stories if s][:limit]


@pytest.fixture(scope="module")
def r50k():
    return tiktoken.get_encoding("r50k_base")


@pytest.fixture(scope="module")
def bpe(stories_dir):
    return train_bpe(read_stories(stories_dir / "train.txt", 400), vocab_size=512)


def test_gpt2_matches_tiktoken_on_real_stories(stories_dir, r50k):
    tok = load_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eot_id, tok.identity) == (50_257, 50_256, "gpt2")
    stories = read_stories(stories_dir / "v2_train.txt", 200) + read_stories(stories_dir / "valid.txt", 100)
    assert tok.encode_batch(stories) == [r50k.encode_ordinary(s) for s in stories]
    for story in stories[:50]:
        assert tok.encode_to_numpy(story).tolist() == r50k.encode_ordinary(story)
        assert tok.decode(tok.encode(story)) == story
    assert tok.encode("Once upon a time") == [7454, 2402, 257, 640]
    # Ordinary text: the special token's spelling inside a story is text, not the end-of-text id.
    assert tok.eot_id not in tok.encode(f"The end.{EOT}Next")
    assert tok.decode(tok.encode(f"The end.{EOT}Next")) == f"The end.{EOT}Next"


def test_bpe_is_lossless_and_sized(bpe, stories_dir):
    assert bpe.vocab_size == 512
    assert bpe.eot_token == EOT and bpe.backend.token_to_id(EOT) == bpe.eot_id
    stories = read_stories(stories_dir / "v2_train.txt", 100) + read_stories(stories_dir / "valid.txt", 100)
    for text in stories + ODD_TEXT:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
        assert bpe.encode_to_numpy(text).tolist() == ids
    assert bpe.eot_id not in bpe.encode(f"a {EOT} b")
    assert bpe.encode_batch(stories[:5]) == [bpe.encode(s) for s in stories[:5]]
    # Trained on stories, it compresses them: fewer tokens than UTF-8 bytes.
    assert sum(len(bpe.encode(s)) for s in stories) < 0.6 * sum(len(s.encode()) for s in stories)


def test_an_id_past_a_tokenizer_json_is_refused_in_one_line_as_gpt2s(bpe):
    """tokenizers' decode left an id past its vocabulary out of the text without a word (a model with more rows
    than its tokenizer samples them) and failed on a negative one with OverflowError; GPT-2's refuses both."""
    assert bpe.decode([40, 41]) == bpe.backend.decode([40, 41])
    for bad in (512, 600, -1):
        with pytest.raises(UserError, match=rf"^id {bad} has no token in the tokenizer \(byte-level BPE "
                                            r"\(tokenizer.json\): ids 0 to 511; a model with more rows"):
            bpe.decode([40, bad, 41])


def test_spec_save_and_reload(bpe, tmp_path, stories_dir):
    spec = bpe.save(tmp_path)
    assert spec["file"] == "tokenizer.json" and (tmp_path / "tokenizer.json").exists()
    assert json.loads(json.dumps(spec)) == spec
    again = tokenizer_from_spec(spec, tmp_path)
    assert again.identity == bpe.identity != GPT2Tokenizer().identity
    story = read_stories(stories_dir / "valid.txt", 1)[0]
    assert again.encode(story) == bpe.encode(story)
    assert load_tokenizer(tmp_path).identity == bpe.identity  # a directory holding tokenizer.json
    assert tokenizer_from_spec(GPT2Tokenizer().spec(), tmp_path).identity == "gpt2"

    (tmp_path / "tokenizer.json").write_text(bpe.content.replace('"<|endoftext|>"', '"<eos>"', 1))
    with pytest.raises(UserError, match="sha256"):
        tokenizer_from_spec(spec, tmp_path)
    with pytest.raises(UserError, match="not found"):
        tokenizer_from_spec(spec, tmp_path / "elsewhere")
    with pytest.raises(UserError, match="unknown tokenizer spec"):
        tokenizer_from_spec({"kind": "sentencepiece"}, tmp_path)


def _word_level(tmp_path, tokens, special=()) -> str:
    """A WordLevel tokenizer.json of `tokens` (ids in order), those in `special` added as special tokens."""
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    backend.add_special_tokens(list(special))
    path = tmp_path / "tokenizer.json"
    path.write_text(backend.to_str())
    return path


def test_what_the_tokenizers_library_writes_to_stderr_is_dropped_only_where_it_panicked(capfd):
    """The panic hook writes to descriptor 2 itself, past sys.stderr: held while a file is read, and written out
    unless the read panicked (a warning of a read that succeeds, or fails otherwise, still shows)."""
    from tinygemma.tokenizer import _panic_lines_held

    class PanicException(BaseException):  # (pyo3's, by its name)
        pass

    capfd.readouterr()
    with _panic_lines_held():
        os.write(2, b"a warning\n")
    with pytest.raises(ValueError), _panic_lines_held():
        os.write(2, b"before a failure\n")
        raise ValueError
    with pytest.raises(PanicException), _panic_lines_held():
        os.write(2, b"thread panicked at ...\n")
        raise PanicException
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "a warning\nbefore a failure\nafter\n"


def test_a_ctrl_c_as_stderr_is_held_gives_it_back(capfd, interrupt_on_entry):
    """A Ctrl-C in the instant after the hold began, before the `with` held the manager: descriptor 2 stayed in
    the temporary file until the garbage collector came (the command's "interrupted" line went there)."""
    from tinygemma.tokenizer import _panic_lines_held

    capfd.readouterr()
    interrupt_on_entry.arm(1, "_panic_lines_held")
    with pytest.raises(KeyboardInterrupt) as stopped:
        with _panic_lines_held():
            pytest.fail("the block ran")
    os.write(2, b"interrupted\n")
    assert capfd.readouterr().err == "interrupted\n", stopped  # (`stopped` keeps the generator alive)


def test_stderr_is_held_by_the_main_thread_alone_and_a_child_forked_meanwhile_writes_to_it(tmp_path, monkeypatch):
    """Two threads' holds of descriptor 2 saved each other's temporary file as stderr (everything written later
    was lost), and a lock between them hung a child forked while it was taken: another thread holds nothing, and a
    child forked during the main thread's hold writes to stderr itself. Without a temporary file to hold it in, a
    file is still read (it was "not a valid tokenizer.json")."""
    import threading

    import tinygemma.tokenizer
    from tinygemma.tokenizer import _panic_lines_held

    def where() -> tuple[int, int]:
        status = os.fstat(2)
        return status.st_dev, status.st_ino

    stderr, seen = where(), {}

    def in_a_thread():
        with _panic_lines_held():
            seen["thread"] = where()

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen["thread"] == stderr
    if hasattr(os, "fork"):
        def fork_and_look():  # (a child forked by another thread while the main thread holds descriptor 2)
            read, write = os.pipe()
            if (pid := os.fork()) == 0:
                os.write(write, b"1" if where() == stderr else b"0")
                os._exit(0)
            os.close(write)
            seen["child"] = os.read(read, 1)
            os.close(read)
            os.waitpid(pid, 0)

        with _panic_lines_held():
            assert where() != stderr  # (held)
            forker = threading.Thread(target=fork_and_look)
            forker.start()
            forker.join()
        assert seen["child"] == b"1" and where() == stderr

    def no_temporary_file():
        raise OSError(28, "No space left on device")

    content = _word_level(tmp_path, ["<unk>", "hello", "</s>"]).read_text()
    monkeypatch.setattr(tinygemma.tokenizer.tempfile, "TemporaryFile", no_temporary_file)
    assert HFTokenizer(content).eot_token == "</s>"


def test_eot_of_a_tokenizer_json(tmp_path):
    tok = load_tokenizer(_word_level(tmp_path, ["<unk>", "</s>", "<eos>", "hello"]))
    assert (tok.eot_token, tok.eot_id, tok.vocab_size) == ("<eos>", 2, 4)  # the first candidate present
    assert tok.spec()["eot_token"] == "<eos>"
    with pytest.raises(UserError, match=r"no end-of-text token .* add one as a special token \(tokenizers: "
                                        r"tokenizer.add_special_tokens\(\['<\|endoftext\|>'\]\)"):
        load_tokenizer(_word_level(tmp_path, ["<unk>", "hello"]))
    deepseek = load_tokenizer(_word_level(tmp_path, ["<unk>", "hello", "<｜end▁of▁sentence｜>"]))
    assert (deepseek.eot_token, deepseek.eot_id) == ("<｜end▁of▁sentence｜>", 2)  # DeepSeek's, refused before


def test_an_end_of_text_that_a_transformers_folder_names_is_taken(tmp_path):
    """A file holding none of the five names is read with the eos_token that transformers' files beside it name
    (save_pretrained's tokenizer_config.json, else special_tokens_map.json, as a string or an added token's dict);
    it was refused. A file holding one of the five keeps it (Qwen's instruct folders name <|im_end|>, while its
    stories' separator is <|endoftext|>). The token travels with the spec, to folders without those files."""
    import pickle

    folder = tmp_path / "folder"
    folder.mkdir()
    path = _word_level(folder, ["<unk>", "hello", "[EOS]", "[SEP]", "the"], special=["[EOS]", "[SEP]"])
    with pytest.raises(UserError, match=r"name its own \(an \[EOS\]\) as eos_token in a tokenizer_config.json "):
        load_tokenizer(folder)
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "[SEP]", "special": True}}))
    assert (load_tokenizer(folder).eot_token, load_tokenizer(folder).eot_id) == ("[SEP]", 3)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[EOS]"}))  # (read first)
    for given in (folder, path):
        tok = load_tokenizer(given)
        assert (tok.eot_token, tok.eot_id, tok.spec()["eot_token"]) == ("[EOS]", 2, "[EOS]")
    copy = tmp_path / "copy"  # a prepared dataset's or checkpoint's folder: the tokenizer.json alone
    copy.mkdir()
    spec = tok.save(copy)
    assert tokenizer_from_spec(spec, copy).eot_id == 2 and pickle.loads(pickle.dumps(tok)).eot_id == 2
    # The copy given as a file (prepare --tokenizer DATA/tokenizer.json, generate --tokenizer a checkpoint's) was
    # refused for want of the folder's files: tinygemma's record beside it names the token, for this file alone.
    with pytest.raises(UserError, match="has no end-of-text token"):
        load_tokenizer(copy / "tokenizer.json")
    for record in RECORD_FILES:
        (copy / record).write_text(json.dumps({"tokenizer": {**spec, "sha256": "0" * 64}}))  # another file's
        with pytest.raises(UserError, match="has no end-of-text token"):
            load_tokenizer(copy / "tokenizer.json")
        (copy / record).write_text(json.dumps({"format": "tinygemma", "tokenizer": spec}))
        assert (load_tokenizer(copy / "tokenizer.json").eot_token, load_tokenizer(copy).eot_id) == ("[EOS]", 2)
        (copy / record).unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[SEP]"}))
    assert load_tokenizer(folder).identity != tok.identity  # another story separator: other data
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(UserError, match=r"none of .*, nor '<\|im_end\|>', the eos_token named beside it"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("{not json")  # unreadable: the next file's
    assert load_tokenizer(folder).eot_token == "[SEP]"
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "the"}))  # every " the" would end a story
    with pytest.raises(UserError, match=r"'the', the eos_token named beside it, is an ordinary piece of its "
                                        r"vocabulary, not a special token"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[EOS]"}))
    qwen = _word_level(folder, ["<unk>", "hello", "[EOS]", "<|endoftext|>"])  # one of the five: kept
    assert load_tokenizer(qwen).eot_token == "<|endoftext|>"
    # A copy swapped for another file, without the recorded token: said as another tokenizer than the spec's, not
    # as its lacking that token (which advised naming one beside a file that had nothing beside it)
    other = tmp_path / "other"
    other.mkdir()
    swapped = _word_level(other, ["<unk>", "hi", "[SEP]"], special=["[SEP]"])
    copy.joinpath("tokenizer.json").write_text(swapped.read_text())
    with pytest.raises(UserError, match="is not the tokenizer this was made with"):
        tokenizer_from_spec(spec, copy)


def test_an_end_of_text_added_but_not_special_is_refused(tmp_path):
    """An added token not marked special is split out of any text, encode_special_tokens or not: a story's own
    "<|endoftext|>" would become a false story boundary (and count 13 bytes in bits per byte). One line."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "once": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_tokens([AddedToken("<|endoftext|>", special=False)])
    assert backend.encode("once <|endoftext|>").ids == [1, 2]  # what it would do to a story
    path = tmp_path / "tokenizer.json"
    path.write_text(backend.to_str())
    with pytest.raises(UserError, match=r"end-of-text token '<\|endoftext\|>' is not marked special.*special=True"):
        load_tokenizer(path)
    backend.add_special_tokens(["<|endoftext|>"])  # the same token, now special: read as text in stories
    path.write_text(backend.to_str())
    tok = load_tokenizer(path)
    assert tok.eot_id == 2 and tok.eot_id not in tok.encode("once <|endoftext|>")


def test_bad_tokenizer_names_and_files(tmp_path, capfd):
    with pytest.raises(UserError, match="unknown tokenizer 'gpt3'"):
        load_tokenizer("gpt3")
    with pytest.raises(UserError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    # JSON, but a tokenizer.json's neighbour (transformers' tokenizer_config.json, a vocab.json): said as such, not
    # as a JSON syntax error at line 2
    for neighbour in ({"eos_token": "</s>", "model_max_length": 1024}, {"hello": 0}, ["a"]):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(neighbour, indent=1))
        with pytest.raises(UserError, match=r"is JSON but no tokenizer.json \(it has no \"model\"\): give the "
                                            "tokenizer.json itself, not a tokenizer_config.json or vocab.json"):
            load_tokenizer(tmp_path / "tokenizer_config.json")
    # A file whose reading makes the tokenizers library's Rust code panic (pyo3's PanicException, no Exception):
    # one line, not a traceback
    broken = json.loads(_word_level(tmp_path, ["<unk>", "</s>"]).read_text())
    broken["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": None}
    (tmp_path / "panics.json").write_text(json.dumps(broken))
    capfd.readouterr()
    with pytest.raises(UserError, match=r"panics.json is not a valid tokenizer.json \(Precompiled: "):
        load_tokenizer(tmp_path / "panics.json")
    assert capfd.readouterr().err == ""  # the Rust panic hook's lines (and backtrace) held back: one line in all
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)  # (past Python's parser's recursion)
    with pytest.raises(UserError, match=r"deep.json is not a valid tokenizer.json \(not JSON: "):
        load_tokenizer(tmp_path / "deep.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not UTF-8"):
        load_tokenizer(tmp_path / "binary.json")
    gpt2 = load_tokenizer("gpt2")
    assert load_tokenizer(gpt2) is gpt2  # a loaded tokenizer, as prepare takes one
    with pytest.raises(UserError, match="a tokenizer is gpt2, a tokenizer.json's path or a loaded Tokenizer, got "
                                        "NoneType"):
        load_tokenizer(None)


def test_gpt2_as_tokenizers_matches_tiktoken(stories_dir, r50k):
    converted = gpt2_as_tokenizers(r50k)
    converted.encode_special_tokens = True  # as ordinary text, like encode_ordinary
    stories = read_stories(stories_dir / "train.txt", 300) + ODD_TEXT
    assert [e.ids for e in converted.encode_batch(stories, add_special_tokens=False)] == [
        r50k.encode_ordinary(s) for s in stories]


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_save_hf_loads_in_transformers(kind, bpe, tmp_path, stories_dir):
    transformers = pytest.importorskip("transformers")
    tok = GPT2Tokenizer() if kind == "gpt2" else bpe
    tok.save_hf(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    stories = read_stories(stories_dir / "valid.txt", 100)
    for story in stories:
        ids = hf.encode(story, add_special_tokens=False)
        assert ids == tok.encode(story)
        assert hf.decode(ids) == story
    assert hf.convert_tokens_to_ids(hf.eos_token) == tok.eot_id
    assert len(hf) == tok.vocab_size


def test_identity_survives_a_transformers_resave_and_tells_other_ids_apart(bpe, tmp_path):
    """transformers' save_pretrained rewrites tokenizer.json with a post-processor that adds nothing: other bytes,
    the same ids. Its identity (which decides whether data and a checkpoint go together) is the original's; a
    changed vocabulary, or a post-processor that puts a <bos> before prompts, is another identity."""
    transformers = pytest.importorskip("transformers")
    bpe.save_hf(tmp_path / "export")
    transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export")).save_pretrained(str(tmp_path / "resaved"))
    resaved = load_tokenizer(tmp_path / "resaved")
    assert resaved.sha256 != bpe.sha256 and resaved.identity == bpe.identity
    spec = json.loads(bpe.content)
    vocab = spec["model"]["vocab"]
    first, second = (next(t for t, i in vocab.items() if i == n) for n in (300, 301))
    vocab[first], vocab[second] = 301, 300  # two tokens' ids swapped: the same tokens, other ids
    assert HFTokenizer(json.dumps(spec)).identity != bpe.identity
    spec = json.loads(bpe.content)
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": EOT, "type_id": 0}},
                                                                       {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                              "special_tokens": {EOT: {"id": EOT, "ids": [bpe.eot_id], "tokens": [EOT]}}}
    assert HFTokenizer(json.dumps(spec)).identity != bpe.identity


def test_save_hf_names_the_tokenizers_own_unknown_token(tmp_path):
    """WordPiece's [UNK] and a Unigram's <unk> are the export's unknown token; it named end-of-text, so transformers
    read every unknown token as end-of-text. A byte-level BPE has none: end-of-text, GPT-2's convention."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    words = ["[PAD]", "<|endoftext|>", "[UNK]", "once", "upon"]
    cases = {"wordpiece": (Backend(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]")), "[UNK]"),
             "unigram": (Backend(models.Unigram([(w, -1.0) for w in ["<|endoftext|>", "<unk>", "once", "upon"]],
                                                unk_id=1, byte_fallback=False)), "<unk>"),
             "no-unknown": (Backend(models.WordLevel({w: i for i, w in enumerate(words)})), "<|endoftext|>")}
    for name, (backend, unk) in cases.items():
        tok = HFTokenizer(backend.to_str())
        assert tok.unk_token == unk, name
        tok.save_hf(tmp_path / name)
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))
        assert (hf.unk_token, hf.unk_token_id) == (unk, tok.backend.token_to_id(unk)), name
    assert GPT2Tokenizer().unk_token == "<|endoftext|>"


def test_tokenizers_pickle_for_workers(bpe):
    import pickle

    for tok in (GPT2Tokenizer(), bpe):
        again = pickle.loads(pickle.dumps(tok))
        assert again.identity == tok.identity
        assert np.array_equal(again.encode_to_numpy("Once upon a time"), tok.encode_to_numpy("Once upon a time"))
    assert isinstance(pickle.loads(pickle.dumps(bpe)), HFTokenizer)


@pytest.mark.parametrize("pieces_special", [False, True], ids=["pieces", "pieces-marked-special"])
@pytest.mark.parametrize("layout", ["gemma", "llama"])
def test_byte_lengths_of_sentencepiece_style_tokenizers(layout, pieces_special, stories_dir):
    """Bits per byte divides by the bytes the tokens stand for. For SentencePiece's kind (Gemma 3's tokenizer.json,
    Llama's) a byte-fallback piece <0xHH> is one byte (alone it decodes to U+FFFD, three), and a word's leading
    space counts where Llama's decoder strips a text's first one: the tokens of a text add up to its bytes (Llama's
    one more: its normalizer puts a space before each text). Counted alone they were 71 bytes against 37 here,
    and 19% short over real stories with Llama's layout. A file that marks its byte pieces special (as a
    BpeTrainer given them among special_tokens writes it) counts them too: they were once 0 bytes."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, trainers

    from tinygemma.tokenizer import HFTokenizer, token_byte_lengths

    stories = read_stories(stories_dir / "train.txt", 300)
    backend = Backend(models.BPE(byte_fallback=True, unk_token="<unk>"))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if layout == "llama":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)])
    else:
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.decoder = decoders.Sequence(steps)
    specials = ["<|endoftext|>", "<unk>", *(f"<0x{b:02X}>" for b in range(256))]
    backend.train_from_iterator(stories, trainers.BpeTrainer(vocab_size=1200, special_tokens=specials,
                                                             limit_alphabet=60, show_progress=False))
    spec = json.loads(backend.to_str())
    if not pieces_special:  # the byte pieces are vocabulary, not special tokens, in Gemma's and Llama's files
        for added in spec["added_tokens"]:
            added["special"] = not added["content"].startswith("<0x")
        spec["added_tokens"] = [a for a in spec["added_tokens"] if a["special"]]
    tokenizer = HFTokenizer(json.dumps(spec))
    lengths = token_byte_lengths(tokenizer, tokenizer.vocab_size)
    prefix = 1 if layout == "llama" else 0
    for text in [*stories[:50], "The café was naïve — 日本 😀.", "x  y\n\n z"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert int(lengths[ids].sum()) == len(text.encode("utf-8")) + prefix, text


def test_an_end_of_text_that_is_an_ordinary_piece_stands_for_no_bytes(bpe, stories_dir):
    """A tokenizer.json made from a vocab.json and merges.txt (GPT-2's vocab.json holds <|endoftext|>) has its
    end-of-text as a piece of the model, not an added special token: bits per byte counted it as 13 bytes of text
    at every story's end (1.5% more bytes than the stories hold, its nats counted as text's)."""
    spec = json.loads(bpe.content)
    model = models.BPE(vocab=spec["model"]["vocab"], merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                                             for m in spec["model"]["merges"]])
    backend = Backend(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    assert not json.loads(backend.to_str())["added_tokens"]  # (the end-of-text in the model's vocabulary alone)
    plain = HFTokenizer(backend.to_str())
    assert plain.eot_id == bpe.eot_id and plain.eot_id not in plain._special_ids
    stories = read_stories(stories_dir / "valid.txt", limit=50)
    ids, text_bytes = encode_stories(stories, plain)
    assert plain.eot_id in ids
    lengths = token_byte_lengths(plain, plain.vocab_size)
    assert lengths[plain.eot_id] == 0 and lengths[ids].sum() == text_bytes  # the stories' own UTF-8 bytes


def test_byte_lengths_of_a_byte_level_tokenizers_added_text(bpe):
    """A byte-level BPE writes each byte of its vocabulary as one character, but an added token is its own text:
    "naïve café" is 12 bytes in 10 characters (it counted 10)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    from tinygemma.tokenizer import HFTokenizer, token_byte_lengths

    backend = Backend.from_str(bpe.backend.to_str())
    backend.add_tokens([AddedToken("naïve café", special=False)])
    tokenizer = HFTokenizer(backend.to_str())
    ids = tokenizer.encode("a naïve café here")
    assert backend.token_to_id("naïve café") in ids
    assert int(token_byte_lengths(tokenizer, tokenizer.vocab_size)[ids].sum()) == len("a naïve café here".encode())


def test_byte_lengths_when_the_anchor_text_is_unknown_or_cannot_be_encoded():
    """Tokens are decoded after the text "a"; where "a" is an unknown token, or cannot be encoded at all, each token
    is decoded alone (as before the anchor) rather than counting the unknown token's text, or failing."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers

    from tinygemma.tokenizer import HFTokenizer, token_byte_lengths

    vocab = ["<unk>", "<|endoftext|>", "▁the", "▁cat", "▁sat", "▁", "t", "h", "e", "c", "s"]
    unigram = Backend(models.Unigram([(token, -1.0) for token in vocab], unk_id=0, byte_fallback=False))
    unigram.normalizer = normalizers.Replace(" ", "▁")
    unigram.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    unigram.add_special_tokens(["<unk>", "<|endoftext|>"])  # "a" is <unk>, a special token here
    tokenizer = HFTokenizer(unigram.to_str())
    ids = tokenizer.encode(" the cat sat")
    assert int(token_byte_lengths(tokenizer, tokenizer.vocab_size)[ids].sum()) == len(" the cat sat")

    words = Backend(models.WordLevel({"<|endoftext|>": 0, "the": 1, "cat": 2}))  # no unknown token: "a" fails
    words.add_special_tokens(["<|endoftext|>"])
    tokenizer = HFTokenizer(words.to_str())
    assert list(token_byte_lengths(tokenizer, 3)) == [0, 3, 3]


def test_a_tokenizer_json_encodes_whole_stories_whatever_its_truncation_and_padding(bpe, tmp_path, stories_dir):
    """A tokenizer.json saved with truncation or padding on (hub files often are) gives every story's ids
    whole, as transformers does unless a call asks (prepare cut each story to 16 ids, or padded it with
    end-of-text); the file is kept as it was, digest and all."""
    from tokenizers import Tokenizer as Backend

    story = read_stories(stories_dir / "train.txt", 1)[0]
    whole = bpe.encode(story)
    assert len(whole) > 20
    for name, setting in [("truncated", lambda t: t.enable_truncation(16)),
                          ("padded", lambda t: t.enable_padding(length=len(whole) + 50, pad_id=bpe.eot_id,
                                                                pad_token=bpe.eot_token))]:
        backend = Backend.from_str(bpe.content)
        setting(backend)
        path = tmp_path / f"{name}.json"
        backend.save(str(path))
        tok = load_tokenizer(path)
        assert tok.encode(story) == whole and tok.encode_batch([story, story]) == [whole, whole], name
        assert tok.content == path.read_text(encoding="utf-8")


def test_a_tokenizer_json_with_bpe_dropout_is_refused_in_one_line(bpe, tmp_path, capsys):
    """BPE dropout splits the same text into other tokens on each call (two prepares of the same stories gave
    other digests, two evaluations other bits per byte, a greedy prompt other ids): refused where the file is
    read, as the GGUF export refused it; a dropout of null or 0 is no dropout, and taken."""
    from tinygemma.cli import main

    spec = json.loads(bpe.content)
    for dropout in (None, 0.0):
        spec["model"]["dropout"] = dropout
        (tmp_path / "fine.json").write_text(json.dumps(spec), encoding="utf-8")
        assert load_tokenizer(tmp_path / "fine.json").encode("Once upon a time") == bpe.encode("Once upon a time")
    spec["model"]["dropout"] = 0.3
    (tmp_path / "dropout.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(UserError, match=r"dropout.json: its BPE model sets dropout \(0.3\), which splits the same "
                                        r'text into other tokens on every call.*set "dropout" to null in it$'):
        load_tokenizer(tmp_path / "dropout.json")
    (tmp_path / "stories.txt").write_text("Once upon a time.\n<|endoftext|>\nThe end.\n", encoding="utf-8")
    assert main(["prepare", "--source", str(tmp_path / "stories.txt"), "--tokenizer", str(tmp_path / "dropout.json"),
                 "--out", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sets dropout" in err and not (tmp_path / "data").exists()


def test_an_untrained_tokenizer_json_is_one_line(tmp_path):
    """A BPE saved before training has no vocabulary at all: named as lacking end-of-text (was max() of nothing)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    Backend(models.BPE()).save(str(tmp_path / "untrained.json"))
    with pytest.raises(UserError, match="has no end-of-text token"):
        load_tokenizer(tmp_path / "untrained.json")


def test_a_tokenizer_json_that_drops_a_whole_text_is_one_line(tmp_path):
    """A vocabulary of end-of-text alone (no byte fallback) turned each story into nothing, and prepare wrote data
    of end-of-text tokens only: refused, naming the text; text it holds pieces of still encodes."""
    tok = load_tokenizer(_word_level(tmp_path, ["<unk>", "<|endoftext|>", "hello"]))
    assert tok.encode("hello") == [2] and tok.encode_batch(["hello", "hello"]) == [[2], [2]]
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, normalizers

    backend = Backend(models.WordLevel({"[UNK]": 0, "<|endoftext|>": 1}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True)  # removes control characters, as BERT's
    backend.save(str(tmp_path / "bert.json"))
    assert load_tokenizer(tmp_path / "bert.json").encode("\x07") == []  # nothing left to encode: no refusal

    backend = Backend(models.BPE({"z": 0}, []))  # no unknown piece: what it lacks is dropped
    backend.add_special_tokens(["<|endoftext|>"])
    backend.save(str(tmp_path / "eot_only.json"))
    tok = load_tokenizer(tmp_path / "eot_only.json")
    for encode in (lambda: tok.encode("Once upon a time"), lambda: tok.encode_batch(["a story", "Once upon"])):
        with pytest.raises(UserError, match="encodes the text starting '(Once upon a time|a story)' as no tokens"):
            encode()
    # Special tokens alone, no piece of text (transformers 5 writes such a file from a SentencePiece model under
    # another name than tokenizer.model, without a word): refused as it is read, naming the likely cause
    backend = Backend(models.BPE())
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.save(str(tmp_path / "specials_only.json"))
    with pytest.raises(UserError, match=r"holds no piece of text, only its 3 special tokens: a conversion that "
                                        r"found no vocabulary\? \(transformers reads a SentencePiece model only"):
        load_tokenizer(tmp_path / "specials_only.json")
    (tmp_path / "tok4096.model").write_bytes(b"\n\x0f\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\xff")  # (protobuf)
    with pytest.raises(UserError, match=r"tok4096.model is a SentencePiece model, not a tokenizer.json: put it in "
                                        r"a folder as tokenizer.model"):
        load_tokenizer(tmp_path / "tok4096.model")


def test_gpt2s_vocabulary_that_splits_or_changes_text_otherwise_is_not_gpt2(r50k):
    """GPT-2's ids in a tokenizer.json that puts a space before each text, or lowercases it, encode other ids
    for the same text: such a file is its own tokenizer, never taken for gpt2, whose
    checkpoints and data it would then pass for."""
    spec = json.loads(gpt2_as_tokenizers(r50k).to_str())
    assert HFTokenizer(json.dumps(spec)).identity == "gpt2"
    prefixed = {**spec, "pre_tokenizer": {**spec["pre_tokenizer"], "add_prefix_space": True}}
    lowered = {**spec, "normalizer": {"type": "Lowercase"}}
    # A post-processor that starts each text with <|endoftext|>: its stories' ids gain one, and prompts start with it
    opened = {**spec, "post_processor": {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [50256], "tokens": ["<|endoftext|>"]}}}}
    assert HFTokenizer(json.dumps(opened)).prompt_prefix == (50256,)
    # One that ends each text with it changes no id tinygemma writes or reads (it never adds that token): GPT-2's
    closing = opened["post_processor"]["single"][::-1]
    closed = {**opened, "post_processor": {**opened["post_processor"], "single": closing}}
    assert HFTokenizer(json.dumps(closed)).text_suffix == (50256,)
    assert HFTokenizer(json.dumps(closed)).identity == "gpt2"
    for other in (prefixed, lowered, opened):  # (identified by its file's sha256)
        tokenizer = HFTokenizer(json.dumps(other))
        assert tokenizer.identity != "gpt2" and tokenizer.identity.startswith("tokenizer.json:")
        assert "GPT-2" not in tokenizer.description


def test_a_byte_level_bpe_without_the_byte_alphabet_is_said_at_prepare_and_refused_for_gguf(tmp_path, capsys):
    """A byte-level BPE trained without initial_alphabet lacks the bytes it never saw and has no unknown token:
    its encoder silently drops every character holding one ("naïve" becomes "nave"). prepare warns; the GGUF
    export refuses it (llama.cpp would split such text otherwise)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from tinygemma.data import prepare
    from tinygemma.gguf_export import check_byte_level_bpe
    from tinygemma.tokenizer import missing_bytes

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    stories = ["Tom saw a big dog. The dog ran.", "Lily had a red ball and a cat."] * 20
    backend.train_from_iterator(stories, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT],
                                                             show_progress=False))
    spec = json.loads(backend.to_str())
    assert 200 < missing_bytes(spec) < 256
    assert "ï" not in HFTokenizer(backend.to_str()).decode(HFTokenizer(backend.to_str()).encode("a naïve cat"))
    (tmp_path / "tokenizer.json").write_text(backend.to_str())
    (tmp_path / "stories.txt").write_text(f"\n{EOT}\n".join(stories))
    for source, out in ((tmp_path / "nowhere.txt", tmp_path / "fresh"), (tmp_path / "stories.txt", tmp_path)):
        with pytest.raises(UserError):  # a refusal is its one line: the warning waits for every check
            prepare(out, sources=[str(source)], tokenizer=str(tmp_path / "tokenizer.json"), progress=False)
        assert capsys.readouterr().err == ""
    prepare(tmp_path / "data", sources=[str(tmp_path / "stories.txt")], tokenizer=str(tmp_path / "tokenizer.json"),
            progress=False)
    assert f"lacks {missing_bytes(spec)} of the 256 bytes" in capsys.readouterr().err
    with pytest.raises(UserError, match=f"lacks {missing_bytes(spec)} of the 256 bytes"):
        check_byte_level_bpe(spec)
    whole = Backend(models.BPE())  # with the alphabet: nothing lacking, nothing said
    whole.pre_tokenizer, whole.decoder = backend.pre_tokenizer, backend.decoder
    whole.train_from_iterator(stories, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert missing_bytes(json.loads(whole.to_str())) == 0


def test_a_unigram_reads_no_special_token_out_of_a_story(tmp_path):
    """A Unigram model holds its special pieces in its own vocabulary, scored as its likeliest (tokenizers'
    UnigramTrainer writes 0.0; T5's </s> too), and read "<eos>" in a story as the end-of-text id: prepare wrote
    an end-of-text mid-story (3 in 2 stories). They are read as text now; text without them is unchanged."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    pieces = [("<unk>", 0.0), ("<eos>", 0.0), ("▁", -2.0), ("<", -3.0), (">", -3.0), ("e", -3.0), ("o", -3.0),
              ("s", -3.0), ("▁the", -2.5), ("▁cat", -2.5), ("c", -4.0), ("a", -4.0), ("t", -4.0), ("h", -4.0)]
    unigram = Backend(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    unigram.add_special_tokens(["<unk>", "<eos>"])
    unigram.add_tokens(["[NAME]"])  # an added token after them keeps its id (it took one past the vocabulary)
    raw = Backend.from_str(unigram.to_str())
    raw.encode_special_tokens = True
    assert 1 in raw.encode("the cat <eos>").ids  # what the tokenizer itself does
    tok = HFTokenizer(unigram.to_str())
    assert tok.eot_id == 1
    for text in ("the cat <eos> the cat", "<eos>the<eos>", "the<eos>", "the cat <eos> [NAME]"):
        ids = tok.encode(text)
        assert tok.eot_id not in ids and tok.decode(ids).replace(" ", "") == text.replace(" ", "")
        assert tok.encode_batch([text, "the cat"]) == [ids, raw.encode("the cat").ids]
    assert tok.encode("the cat") == raw.encode("the cat").ids  # no special text: the file's own pieces
    assert tok.encode("the <eos> [NAME]")[-1] == raw.token_to_id("[NAME]") < tok.vocab_size
    assert tok.encode("the zz") == raw.encode("the zz").ids and 0 in tok.encode("the zz")  # <unk> is text's

    words = Backend(models.BPE({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}, [("a", "b")]))
    words.add_special_tokens(["ab", "<|endoftext|>"])  # a BPE whose merge makes a special token: said
    with pytest.raises(UserError, match="reads its special token 'ab' out of the text starting 'aab'"):
        HFTokenizer(words.to_str()).encode("aab")
    assert HFTokenizer(words.to_str()).encode("ba") == [1, 0]


def test_a_post_processor_id_outside_the_vocabulary_is_refused(tmp_path):
    """A post-processor whose <bos> was id 70000 in a vocabulary of 278: prepare wrote 4464 (70000 in uint16) before
    each story, and generation fed 70000 to a model of 70,001 rows."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, processors

    backend = Backend(models.WordLevel({"<unk>": 0, "<|endoftext|>": 1, "hello": 2}, unk_token="<unk>"))
    backend.add_special_tokens(["<|endoftext|>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 70000)])
    backend.save(str(tmp_path / "pp.json"))
    with pytest.raises(UserError, match="pp.json: its post-processor puts id 70000 around a text, an id its "
                                        "vocabulary does not hold"):
        load_tokenizer(tmp_path / "pp.json")
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", 1)])
    assert HFTokenizer(backend.to_str()).prompt_prefix == (1,)


def test_byte_lengths_and_vocabulary_size_of_a_sentencepiece_style_file():
    """Bits per byte divides by UTF-8 bytes: a piece "▁é" stands for 3 (a space and a 2-byte é), not 2 characters;
    end-of-text for none. A file whose ids skip some has a vocabulary up to its largest id."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from tinygemma.tokenizer import token_byte_lengths

    pieces = [("<unk>", 0.0), ("<eos>", 0.0), ("▁", -2.0), ("a", -3.0), ("▁é", -2.0), ("▁the", -2.5)]
    unigram = Backend(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    unigram.add_special_tokens(["<unk>", "<eos>"])
    tok = HFTokenizer(unigram.to_str())
    lengths = token_byte_lengths(tok, tok.vocab_size)
    assert lengths[4] == 3 and lengths[1] == 0
    words = Backend(models.WordLevel({"<unk>": 0, "<|endoftext|>": 5, "x": 2}, unk_token="<unk>"))
    words.add_special_tokens(["<|endoftext|>"])
    assert HFTokenizer(words.to_str()).vocab_size == 6


def gemma_like(tmp_path=None, suffix=False, single=None):
    """A tokenizer.json laid out as Gemma 3's: <pad> 0, <eos> 1, <bos> a special token past the text's ids that the
    post-processor puts before every text (and, with `suffix`, a </s> after it as T5's does)."""
    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "once": 3, "upon": 4, "a": 5, "time": 6, ",": 7, ".": 8,
             "<bos>": 9, "</s>": 10}
    backend = Backend(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<pad>", "<eos>", "<unk>", "<bos>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(
        single=single or ("<bos> $A </s>" if suffix else "<bos> $A"), special_tokens=[("<bos>", 9), ("</s>", 10)])
    return HFTokenizer(backend.to_str())


def test_a_gemma_style_exports_tokenizer_config_names_its_bos_and_pads_with_end_of_text(tmp_path):
    """The hf export's
    tokenizer_config.json of a tokenizer whose prompts start with <bos> names <bos> as bos_token (its chat
    template starts with {{ bos_token }}) and pads with end-of-text, generation_config.json's pad id."""
    tok = gemma_like()
    assert tok.prompt_prefix == (9,) and tok.bos_token == "<bos>"
    tok.save_hf(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<bos>", "<eos>", "<eos>")
    assert config["padding_side"] == "left"  # a batch of prompts: each one's continuation follows its text
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = hf.apply_chat_template([{"role": "user", "content": "once upon a time"}], tokenize=False)
    assert text == "<bos>once upon a time" and hf(text, add_special_tokens=False)["input_ids"] == [9, 3, 4, 5, 6]


def test_model_vocab_size_holds_the_bos_a_prompt_starts_with():
    """<bos> (id 9) is special and past the text's ids, but
    every prompt starts with it, so the model needs its row; the </s> past it (never encoded) needs none."""
    tok = gemma_like()
    assert tok.vocab_size == 11 and tok.model_vocab_size == 10


def test_the_ids_a_post_processor_ends_a_text_with_are_known():
    """A T5-style post-processor's </s> after the text is what the hf export
    notes and the model card's snippet drops (report.py, cli._note_text_suffix); the prefix alone is not all."""
    tok = gemma_like(suffix=True)
    assert (tok.prompt_prefix, tok.text_suffix) == ((9,), (10,))
    assert tok.identity != gemma_like().identity  # other ids around a prompt: another tokenizer


def test_a_missing_tokenizer_file_is_said_as_a_file_not_found():
    """`--tokenizer tok.json` or
    `--tokenizer mine/tok` missing was called an unknown tokenizer name, not a file that is not there."""
    for name in ("no-such-tokenizer.json", "no-such-folder/tok"):
        with pytest.raises(UserError, match="tokenizer file not found"):
            load_tokenizer(name)
    with pytest.raises(UserError, match="unknown tokenizer 'gtp2'"):
        load_tokenizer("gtp2")


def test_gpt2s_tokenizer_json_written_without_use_regex_is_gpt2(tmp_path):
    """GPT-2's tokenizer.json
    as older tokenizers wrote it, with no use_regex key (openai-community/gpt2's own file), splits as GPT-2 does:
    it is GPT-2's tokenizer, whose data and checkpoints go with tiktoken's."""
    spec = json.loads(GPT2Tokenizer().hf_json())
    spec["pre_tokenizer"].pop("use_regex")
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert load_tokenizer(tmp_path).identity == "gpt2"


def test_gpt2s_vocabulary_decoded_otherwise_is_not_gpt2(tmp_path):
    """GPT-2's ids and split but no ByteLevel decoder
    decode "ĠOnce" for " Once": not GPT-2's text, so not GPT-2's tokenizer."""
    spec = json.loads(GPT2Tokenizer().hf_json())
    spec["decoder"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(tmp_path)
    assert tok.decode(tok.encode(" Once")) != " Once" and tok.identity != "gpt2"


def test_gpt2s_tokenizer_json_is_described_as_gpt2s():
    """The model card's words for a GPT-2 tokenizer.json (a transformers export of a GPT-2 run)."""
    assert HFTokenizer(GPT2Tokenizer().hf_json()).description == "GPT-2's BPE (tokenizer.json)"


def test_added_tokens_not_marked_special_are_text_the_model_needs_rows_for(bpe):
    """An added token that is not special is encoded out of text
    (here past the BPE's ids), so the model's rows must hold it; a special one past them needs none."""
    backend = Backend.from_str(bpe.backend.to_str())
    backend.add_tokens([AddedToken("dragonfly", special=False)])
    backend.add_special_tokens(["<image_soft_token>"])
    tok = HFTokenizer(backend.to_str())
    ids = tok.encode("a dragonfly")
    assert max(ids) == bpe.vocab_size and tok.model_vocab_size == bpe.vocab_size + 1 == tok.vocab_size - 1


def test_a_spec_whose_vocab_size_or_eot_id_differs_from_its_tokenizer_is_refused(tmp_path):
    spec = GPT2Tokenizer().spec()
    assert tokenizer_from_spec(spec, tmp_path).vocab_size == 50_257
    with pytest.raises(UserError, match="has vocab_size 50257, the spec records 50000"):
        tokenizer_from_spec({**spec, "vocab_size": 50_000}, tmp_path)
    with pytest.raises(UserError, match="has eot_id 50256, the spec records 0"):
        tokenizer_from_spec({**spec, "eot_id": 0}, tmp_path)
    # A tokenizer.json spec that records no sha256 (written by hand) is still held to its sizes
    bpe = train_bpe(["Once upon a time there was a cat.", "The end of the story."] * 20, vocab_size=300)
    saved = {key: value for key, value in bpe.save(tmp_path).items() if key != "sha256"}
    assert tokenizer_from_spec(saved, tmp_path).identity == bpe.identity
    with pytest.raises(UserError, match=f"has eot_id {bpe.eot_id}, the spec records {bpe.eot_id + 1}"):
        tokenizer_from_spec({**saved, "eot_id": bpe.eot_id + 1}, tmp_path)


def test_a_byte_level_bpe_with_byte_fallback_lacks_no_byte(tmp_path):
    """A byte-level BPE whose model falls back to <0xHH> pieces drops no character its vocabulary lacks: it is not
    the BPE trained without the byte alphabet that prepare warns of (and the GGUF export refuses)."""
    vocab = {EOT: 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}}
    for ch in "abcdefghijklmnopqrstuvwxyz\u0120":  # a few of the byte-level alphabet's 256 characters only
        vocab.setdefault(ch, len(vocab))
    backend = Backend(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.ByteLevel()])
    backend.add_special_tokens([AddedToken(EOT, special=True)])
    tok = HFTokenizer(backend.to_str())
    text = "a café! 1 😀"
    assert tok.decode(tok.encode(text)) == text  # nothing dropped: the bytes it lacks come back as <0xHH>
    assert missing_bytes(tok.parsed) == 0


def test_save_hf_decodes_spaces_before_punctuation_exactly(tmp_path):
    """transformers' clean-up of tokenization spaces rewrites " ," as "," and " ." as "." (transformers 5 skips it
    only for BPE models): the exported tokenizer's decode must give the text tinygemma's decode gives."""
    transformers = pytest.importorskip("transformers")

    words = ["<unk>", EOT, "Hi", ",", "you", ".", "Tom", "'s", "dog", "!"]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([EOT])
    tok = HFTokenizer(backend.to_str())
    tok.save_hf(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok.encode("Hi , you . Tom 's dog !")
    assert tok.decode(ids) == "Hi , you . Tom 's dog !"
    assert hf.decode(ids) == tok.decode(ids)


def test_byte_lengths_of_a_tokenizer_json_for_fewer_rows_than_its_vocabulary():
    """A table for a model of fewer rows than the tokenizer's ids (trained on its first ids, as GPT-2's table
    allows) is the full table's first rows: it ended in an IndexError for a tokenizer.json."""
    bpe = train_bpe(["Once upon a time there was a little cat.", "The end of the story."] * 20, vocab_size=300)
    full = token_byte_lengths(bpe, bpe.vocab_size)
    assert np.array_equal(token_byte_lengths(bpe, 280), full[:280])
    assert np.array_equal(token_byte_lengths(GPT2Tokenizer(), 1000), token_byte_lengths(GPT2Tokenizer(), 50257)[:1000])


def test_model_vocab_size_holds_an_end_of_text_past_the_texts_ids():
    """End-of-text is special and, in GPT-2's tokenizer.json and many others, the last id: every story ends with it,
    so the model needs its row (without it a model of 50,256 rows met id 50,256 in every window)."""
    backend = Backend(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    backend.add_special_tokens([EOT])
    tok = HFTokenizer(backend.to_str())
    assert (tok.eot_id, tok.vocab_size, tok.model_vocab_size) == (3, 4, 4)
    gpt2_file = HFTokenizer(GPT2Tokenizer().hf_json())
    assert (gpt2_file.eot_id, gpt2_file.model_vocab_size) == (50_256, 50_257)


def test_a_chat_template_holds_every_id_a_prompt_starts_with():
    tok = gemma_like(single="<bos> </s> $A")
    assert tok.prompt_prefix == (9, 10)
    assert tok.chat_template() == "{{ bos_token }}{% raw %}</s>{% endraw %}" + CHAT_TEMPLATE
    assert gemma_like().chat_template() == "{{ bos_token }}" + CHAT_TEMPLATE


def test_a_bpe_that_is_not_byte_level_lacks_no_byte():
    vocab = {"<unk>": 0, EOT: 1, "▁": 2, "a": 3, "b": 4, "▁a": 5}
    backend = Backend(models.BPE(vocab=vocab, merges=[("▁", "a")], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.add_special_tokens([EOT])
    assert missing_bytes(json.loads(backend.to_str())) == 0


def test_a_saved_tokenizer_json_spec_names_the_copy_in_its_folder(tmp_path):
    (tmp_path / "a").mkdir()
    train_bpe(["Once upon a time there was a cat.", "The end."] * 10, vocab_size=280).save(tmp_path / "a")
    tok = load_tokenizer(tmp_path / "a" / "tokenizer.json")
    spec = tok.save(tmp_path / "b")
    assert spec["file"] == "tokenizer.json" and (tmp_path / "b" / "tokenizer.json").exists()
    (tmp_path / "a" / "tokenizer.json").unlink()  # the copy alone is what the spec needs
    assert tokenizer_from_spec(spec, tmp_path / "b").identity == tok.identity


def test_gpt2s_end_of_text_stands_for_no_bytes():
    tok = GPT2Tokenizer()
    lengths = token_byte_lengths(tok, tok.vocab_size)
    assert lengths[tok.eot_id] == 0
    assert lengths[tok.encode(" Once")[0]] == 5 and np.all(lengths[:tok.eot_id] > 0)


def test_saving_over_another_tokenizer_json_writes_this_one(tmp_path):
    texts = ["Once upon a time there was a cat.", "The end."] * 10
    (tmp_path / "mine").mkdir()
    train_bpe(texts, vocab_size=280).save(tmp_path / "mine")
    train_bpe(texts, vocab_size=300).save(tmp_path / "out")  # another tokenizer already in the folder
    mine = load_tokenizer(tmp_path / "mine")
    spec = mine.save(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text(encoding="utf-8") == mine.content
    assert tokenizer_from_spec(spec, tmp_path / "out").identity == mine.identity
    assert mine.save(tmp_path / "mine")["sha256"] == mine.sha256  # its own file: kept as it is


def test_a_tokenizer_without_byte_fallback_has_no_byte_pieces():
    vocab = {"<unk>": 0, EOT: 1, "<0x41>": 2, "hello": 3}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([EOT])
    tok = HFTokenizer(backend.to_str())
    assert tok.encode("<0x41> hello") == [2, 3]
    assert tok.byte_fallback_ids == frozenset()


def test_a_tokenizer_json_with_a_byte_order_mark_is_the_same_tokenizer(tmp_path):
    """A tokenizer.json saved with a UTF-8 byte-order mark (Windows Notepad's) was refused as "not a valid
    tokenizer.json (expected value at line 1 column 1)", where recipes and story files read with one: it is the
    file's text after the mark, the same tokenizer (sha256 and all) as without it, and its copy carries none."""
    texts = ["Once upon a time there was a cat.", "The end."] * 10
    (tmp_path / "plain").mkdir()
    train_bpe(texts, vocab_size=280).save(tmp_path / "plain")
    plain = load_tokenizer(tmp_path / "plain")
    marked = tmp_path / "marked.json"
    marked.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain" / "tokenizer.json").read_bytes())
    tok = load_tokenizer(marked)
    assert (tok.identity, tok.sha256, tok.encode(texts[0])) == (plain.identity, plain.sha256, plain.encode(texts[0]))
    spec = tok.save(tmp_path / "copy")
    assert (tmp_path / "copy" / "tokenizer.json").read_bytes()[:1] == b"{"
    assert tokenizer_from_spec(spec, tmp_path / "copy").sha256 == plain.sha256
