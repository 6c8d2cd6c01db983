"""Tokenizers: GPT-2's BPE through tiktoken, a byte-level BPE trained on the stories, or any tokenizer.json.

Every stage sees one interface: `encode` (ordinary text: a special-token string in the text is just text),
`decode`, `eot_id`, `vocab_size`, and a `spec()` dict that data and checkpoints record so the same tokenizer
can be rebuilt later (`tokenizer_from_spec`). `identity` names the vocabulary, so a checkpoint trained on one
tokenizer's ids refuses data written with another's.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tinygemma.errors import UserError, describe, die_with_parent, failure, interrupt_safe
from tinygemma.files import atomic_write_json, atomic_write_text

EOT_TOKEN = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50_257  # r50k_base: 50,256 ranks and <|endoftext|>
# The end-of-text token of a tokenizer.json: the first of these it has (GPT-2 and ours, Qwen, Gemma, Llama 2 and
# Mistral, Llama 3, DeepSeek).
EOT_CANDIDATES = ("<|endoftext|>", "<eos>", "</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")
# Where a file holds none of them: the eos_token that transformers' files beside it name (save_pretrained's).
EOS_FILES = ("tokenizer_config.json", "special_tokens_map.json")
RECORD_FILES = ("meta.json", "checkpoint.json")  # tinygemma's records beside its copies: a dataset's, a checkpoint's
TOKENIZER_FILE = "tokenizer.json"
# A story model has no chat format: a chat front end (transformers' apply_chat_template, llama-server's web page,
# LM Studio) sends the messages' text as it is, and the model continues it. Both exports carry it.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


class Tokenizer:
    """The interface; `GPT2Tokenizer` and `HFTokenizer` implement it."""

    vocab_size: int  # one more than the largest id the tokenizer can produce
    eot_id: int  # written after every story
    eot_token: str
    identity: str  # equal for tokenizers whose ids mean the same text (the same vocabulary and rules)
    description: str  # what kind of tokenizer it is, in words (a model card's)

    prompt_prefix: tuple[int, ...] = ()  # ids a prompt starts with: the beginning-of-sequence token, if any
    text_suffix: tuple[int, ...] = ()  # ids the tokenizer.json's post-processor ends a text with (never added)

    @property
    def bos_id(self) -> int:
        """The beginning-of-sequence id an export names: the <bos> a prompt starts with, else end-of-text (which
        separates the stories, so every story follows it)."""
        return self.prompt_prefix[0] if self.prompt_prefix else self.eot_id

    @property
    def bos_token(self) -> str:
        return self.eot_token

    byte_fallback_ids: frozenset[int] = frozenset()  # ids of <0xHH> pieces, decoded as a run (HFTokenizer's)

    @property
    def model_vocab_size(self) -> int:
        """The fewest embedding rows a model needs for this tokenizer: its text's ids, end-of-text and the ids a
        prompt starts with (<bos>). Other special tokens past them are never encoded from text (they are read
        as text) nor sampled: Gemma 3's own tokenizer.json holds <image_soft_token> at 262,144, past
        gemma-3-270m's 262,144 rows."""
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """`encode` as a uint32 array: data preparation's hot path, which never needs Python ints."""
        return np.array(self.encode(text), dtype=np.uint32)

    def decode(self, ids) -> str:
        raise NotImplementedError

    def refuse_ids(self, ids: list[int]) -> None:
        """Refuse an id this tokenizer has no token for, in one line (a model with more rows than its tokenizer
        samples them where vocab_size is not given)."""
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise UserError(f"id {bad} has no token in the tokenizer ({self.description}: ids 0 to "
                            f"{self.vocab_size - 1:,}; a model with more rows than its tokenizer: sample with "
                            "vocab_size=tokenizer.model_vocab_size)") from None

    def spec(self) -> dict:
        raise NotImplementedError

    def save(self, directory: str | Path) -> dict:
        """Copy the files this tokenizer needs into `directory`; return its spec relative to `directory`."""
        raise NotImplementedError

    def chat_template(self) -> str:
        """The chat template both exports carry: CHAT_TEMPLATE, after the ids a prompt starts with (<bos>) as
        Gemma's own template starts. Chat front ends tokenize what it renders adding no special token of their own
        (transformers' apply_chat_template, llama-cpp-python), or take off a leading <bos> that they add
        themselves (llama.cpp's server); without it a chat began with no <bos>, which the model never read."""
        if not self.prompt_prefix:
            return CHAT_TEMPLATE
        rest = self.decode(self.prompt_prefix[1:])  # (more than one: the hf export only; the GGUF refuses them)
        return "{{ bos_token }}" + (f"{{% raw %}}{rest}{{% endraw %}}" if rest else "") + CHAT_TEMPLATE

    def save_hf(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json for `transformers.AutoTokenizer.from_pretrained`."""
        directory = Path(directory)
        atomic_write_text(directory / TOKENIZER_FILE, self.hf_json())
        atomic_write_json(directory / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eot_token, "unk_token": self.unk_token,
            "pad_token": self.eot_token,  # batched calls pad with it, as generation_config.json's pad id
            "padding_side": "left",  # a batch of prompts for generate: each continues from its own last token
            "add_bos_token": False, "add_eos_token": False,
            "chat_template": self.chat_template(),
            "clean_up_tokenization_spaces": False,  # decode gives back the text exactly
            "model_max_length": 1_000_000_000,
        })

    def hf_json(self) -> str:
        """The tokenizer as a Hugging Face tokenizer.json (what save_hf writes and the GGUF export reads)."""
        raise NotImplementedError

    @property
    def unk_token(self) -> str:
        """The unknown token the hf export names: end-of-text, GPT-2's convention for a byte-level BPE, which has
        none of its own (every text is bytes it holds)."""
        return self.eot_token

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# ------------------------------------------------------------------ GPT-2 through tiktoken


@functools.cache
def _gpt2_encoding():
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # "gpt2" needs two files from the network; r50k_base has identical ranks and one file
        try:
            return tiktoken.get_encoding("r50k_base")
        except Exception as e:
            raise failure(f"cannot load the GPT-2 vocabulary through tiktoken ({type(e).__name__}); offline, "
                          "point TIKTOKEN_CACHE_DIR at a directory holding the r50k_base file", e) from None


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE: 50,257 tokens, `<|endoftext|>` = 50256, exactly as tiktoken encodes it."""

    identity = "gpt2"
    description = "GPT-2's BPE (tiktoken)"
    eot_token = EOT_TOKEN

    def __init__(self):
        self.encoding = _gpt2_encoding()
        self.vocab_size = self.encoding.n_vocab
        self.eot_id = self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def encode_to_numpy(self, text: str) -> np.ndarray:
        # With no special token allowed or disallowed, this is encode_ordinary without the Python list.
        return self.encoding.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids) -> str:
        ids = list(map(int, ids))
        try:
            return self.encoding.decode(ids)
        except (KeyError, OverflowError):  # (tiktoken's "Invalid token for decoding: N"; a negative id)
            self.refuse_ids(ids)
            raise

    def spec(self) -> dict:
        return {"kind": "gpt2", "vocab_size": self.vocab_size, "eot_id": self.eot_id}

    def save(self, directory: str | Path) -> dict:
        return self.spec()  # nothing to copy: tiktoken supplies the vocabulary

    def hf_json(self) -> str:
        return _gpt2_json()


@functools.cache
def _gpt2_json() -> str:  # seconds to build (the merges are replayed in Python), so made once per process
    return gpt2_as_tokenizers(_gpt2_encoding()).to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return {b: chr(b if b in keep else next(shifted)) for b in range(256)}


def gpt2_as_tokenizers(encoding):
    """tiktoken's GPT-2 ranks as a Hugging Face `tokenizers` byte-level BPE that encodes identically.

    A token's rank is its merge priority, so each multi-byte token's merge is the last step of replaying BPE
    on its own bytes with only lower ranks allowed (the way transformers' TikTokenConverter does it).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    ranks: dict[bytes, int] = encoding._mergeable_ranks  # noqa: SLF001 (tiktoken exposes no public accessor)
    to_text = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_text[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(token): rank for token, rank in ranks.items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    assert tokenizer.token_to_id(EOT_TOKEN) == encoding.eot_token
    return tokenizer


@functools.cache
def _gpt2_vocabulary() -> dict[str, int]:
    """GPT-2's vocabulary as a byte-level tokenizer.json holds it: each token's printable text -> its id."""
    encoding = _gpt2_encoding()
    to_text = _bytes_to_unicode()
    vocab = {"".join(to_text[b] for b in token): rank
             for token, rank in encoding._mergeable_ranks.items()}  # noqa: SLF001 (as gpt2_as_tokenizers)
    return {**vocab, EOT_TOKEN: encoding.eot_token}


# GPT-2's split before its BPE, as a tokenizer.json's pre_tokenizer writes it, and what the tokenizers library
# reads for a ByteLevel key that a file (an older one) lacks.
GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
BYTE_LEVEL_DEFAULTS = {"add_prefix_space": True, "use_regex": True}


def splits_as_gpt2(spec: dict) -> bool:
    """Whether a tokenizer.json (parsed) changes no text and splits it as GPT-2 does before its BPE."""
    pre = spec.get("pre_tokenizer") or {}
    read = {**BYTE_LEVEL_DEFAULTS, **pre} if pre.get("type") == "ByteLevel" else pre
    return not spec.get("normalizer") and {key: read.get(key) for key in GPT2_SPLIT} == GPT2_SPLIT


def missing_bytes(spec: dict) -> int:
    """How many of the 256 bytes a byte-level BPE's vocabulary has no token for (0 for other models): a BPE trained
    without the whole byte alphabet, whose encoder silently drops any character holding one of them."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or not _decodes_byte_level(spec):
        return 0
    vocab = model.get("vocab") or {}
    return sum(ch not in vocab for ch in _bytes_to_unicode().values())


def _decodes_byte_level(spec: dict) -> bool:
    """Whether a tokenizer.json (parsed) decodes byte-level: each byte of text written as one printable character."""
    return '"ByteLevel"' in json.dumps(spec.get("decoder"))


def _is_gpt2_vocabulary(vocab: dict[str, int], content: str) -> bool:
    """Whether a tokenizer.json's vocabulary (with its added tokens) and byte-level decoding are GPT-2's. False
    where GPT-2's ranks cannot be had (offline without tiktoken's cache)."""
    if len(vocab) != GPT2_VOCAB_SIZE or vocab.get(EOT_TOKEN) != GPT2_VOCAB_SIZE - 1:  # the quick no for the others
        return False
    # GPT-2's ids, but text changed (a lowercasing normalizer) or split otherwise (a prefix space) before them:
    # another tokenizer, which would feed a GPT-2 model splits it never saw.
    spec = json.loads(content)
    if not _decodes_byte_level(spec) or not splits_as_gpt2(spec):
        return False
    try:
        return vocab == _gpt2_vocabulary()
    except Exception:  # no ranks to compare with: not known to be GPT-2's
        return False


# ------------------------------------------------------------------ any tokenizer.json


def tokenizers_failure(e: BaseException) -> bool:
    """Whether `e` is the tokenizers library's failure on a file or text: an Exception, or a panic of its Rust code
    (pyo3's PanicException, a BaseException: a tokenizer.json whose normalizer holds null ended in a traceback)."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


_STDERR_HELD: list[int] = []  # while the main thread holds descriptor 2: a copy of what it was


def _stderr_back_in_child() -> None:
    """A child forked (by another thread) while descriptor 2 is held writes to stderr, not to the held file."""
    if _STDERR_HELD:
        saved = _STDERR_HELD.pop()
        os.dup2(saved, 2)
        os.close(saved)


if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(after_in_child=_stderr_back_in_child)


@interrupt_safe
def _panic_lines_held():
    """Hold what is written to stderr's descriptor (the Rust panic hook's lines, a backtrace under RUST_BACKTRACE)
    while the tokenizers library reads a file: dropped where it panicked (the one line that follows names the
    panic), written out otherwise. In the main thread alone (two threads' holds saved each other's file as stderr,
    and a lock between them hung a child forked meanwhile); without a descriptor 2 or a temporary file to hold it
    in, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            held = stack.enter_context(tempfile.TemporaryFile())
            saved = os.dup(2)
        except OSError:  # (no temporary file, or no descriptor 2: a service's)
            yield
            return
        panicked = False
        try:
            sys.stderr.flush()
            _STDERR_HELD.append(saved)
            os.dup2(held.fileno(), 2)
            yield
        except BaseException as e:
            panicked = type(e).__name__ == "PanicException"
            raise
        finally:
            os.dup2(saved, 2)
            _STDERR_HELD.clear()
            os.close(saved)
            held.seek(0)
            if not panicked and (lines := held.read()):
                os.write(2, lines)


def _read_stories(backend):
    """`backend`, set to read stories: ordinary text ("<|endoftext|>" in a story is just text), whole (never cut
    or padded by the file's own settings: transformers, too, applies them only when a call asks). The file itself
    is kept as it is, for its digest and the export."""
    backend.encode_special_tokens = True
    backend.no_truncation()
    backend.no_padding()
    return backend


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json: ours trained by `train_bpe`, Gemma 3's own, or any other."""

    def __init__(self, content: str, path: Path | None = None, eos_token: str | None = None):
        """`eos_token`: the end-of-text token where the file holds none of EOT_CANDIDATES (a transformers folder's
        eos_token, or the one a spec records)."""
        from tokenizers import Tokenizer as Backend

        where = path or "tokenizer"
        try:
            parsed = json.loads(content)
        except (ValueError, RecursionError) as e:  # (RecursionError: arrays nested past Python's parser)
            raise UserError(f"{where} is not a valid tokenizer.json (not JSON: {e})") from None
        if not isinstance(parsed, dict) or "model" not in parsed:  # (tokenizer_config.json, vocab.json: its neighbours)
            raise UserError(f"{where} is JSON but no tokenizer.json (it has no \"model\"): give the tokenizer.json "
                            "itself, not a tokenizer_config.json or vocab.json beside it")
        try:
            with _panic_lines_held():
                self.backend = Backend.from_str(content)
        except BaseException as e:
            if not tokenizers_failure(e):
                raise
            raise UserError(f"{where} is not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None
        _read_stories(self.backend)
        self.content = content
        self.parsed = parsed  # (the cached property, parsed once)
        self.path = path
        dropout = (self.parsed.get("model") or {}).get("dropout")
        if isinstance(dropout, (int, float)) and dropout > 0:
            raise UserError(f"{where}: its BPE model sets dropout ({dropout:g}), which splits the same text into "
                            "other tokens on every call: prepared data, bits per byte and prompts would not repeat; "
                            'set "dropout" to null in it')
        self.sha256 = hashlib.sha256(content.encode("utf-8")).hexdigest()
        vocab = self.backend.get_vocab(with_added_tokens=True)
        eot = [token for token in (*EOT_CANDIDATES, eos_token) if token in vocab]
        if not eot:
            named = f", nor {eos_token!r}, the eos_token named beside it" if eos_token else ""
            raise UserError(f"{where} has no end-of-text token (none of {', '.join(EOT_CANDIDATES)}{named}), which "
                            "prepare puts after each story: add one as a special token (tokenizers: "
                            "tokenizer.add_special_tokens(['<|endoftext|>']), then tokenizer.save(path)), or name "
                            f"its own (an [EOS]) as eos_token in a {EOS_FILES[0]} beside it")
        self.vocab_size = max(vocab.values()) + 1
        self.eot_token = eot[0]
        self.eot_id = vocab[self.eot_token]
        added = self.backend.get_added_tokens_decoder()
        if self.eot_token not in EOT_CANDIDATES and not (self.eot_id in added and added[self.eot_id].special):
            raise UserError(f"{where}: {self.eot_token!r}, the eos_token named beside it, is an ordinary piece of "
                            "its vocabulary, not a special token, so it would be read out of the stories' text; "
                            "name a special token")
        if self.eot_id in added and not added[self.eot_id].special:
            raise UserError(f"{where}: its end-of-text token {self.eot_token!r} is not marked special, so a story's "
                            f"own {self.eot_token!r} would be read as it; add it with special=True "
                            "(tokenizers' add_special_tokens)")
        self.prompt_prefix, self.text_suffix = self._post_processor_parts()
        held = set(vocab.values())
        for i in (*self.prompt_prefix, *self.text_suffix):
            if i not in held:  # (prepare's token files are sized by the vocabulary: 70000 became 4464 in uint16)
                raise UserError(f"{where}: its post-processor puts id {i} around a text, an id its vocabulary does "
                                "not hold")
        special = {i for i, token in added.items() if token.special}
        self._special_ids = frozenset(special)
        text_ids = [i for i in vocab.values() if i not in special]
        if not text_ids:  # (transformers 5 writes one from a SentencePiece model not named tokenizer.model)
            raise UserError(f"{where} holds no piece of text, only its {len(special)} special tokens: a conversion "
                            "that found no vocabulary? (transformers reads a SentencePiece model only as a folder's "
                            "tokenizer.model)")
        self._model_vocab_size = max(max(text_ids, default=-1), self.eot_id, *self.prompt_prefix) + 1
        # GPT-2's vocabulary written as a tokenizer.json (a transformers export of a GPT-2 run) is GPT-2's: its
        # ids mean the same text, so data and checkpoints made with either go together.
        # (with no post-processor token before a text: one that starts each with <|endoftext|> gives other ids; one
        # after it changes none, since tinygemma never adds it)
        gpt2 = not self.prompt_prefix and _is_gpt2_vocabulary(vocab, content)
        self.identity = "gpt2" if gpt2 else f"tokenizer.json:{self._ids_digest()}"

    @functools.cached_property
    def _text_specials(self) -> frozenset[int]:
        """The special tokens the model's own vocabulary holds, other than its unknown piece and its byte pieces
        (both stand for text): a Unigram model (T5's, ALBERT's, tokenizers' UnigramTrainer's) scores its `</s>` and
        `<eos>` as its likeliest pieces and reads them out of ordinary text, which encode_special_tokens does not
        stop (it stops only the added tokens' matcher)."""
        own = self.backend.get_vocab(with_added_tokens=False)
        if self._is_unigram:  # (its unknown piece is an id in the file, not a token the bindings name)
            unknown = (self.parsed.get("model") or {}).get("unk_id")
        else:
            unknown = own.get(getattr(self.backend.model, "unk_token", None) or "")
        return frozenset((set(own.values()) & self._special_ids) - {unknown} - self.byte_fallback_ids)

    @property
    def _is_unigram(self) -> bool:
        return type(self.backend.model).__name__ == "Unigram"

    @functools.cached_property
    def _text_backend(self):
        """For a text in which the model read a special token: the same Unigram model with those pieces renamed to
        what no text holds (their scores, and so every other piece's odds and the unknown piece's, unchanged)."""
        if not self._is_unigram:
            return None
        spec = json.loads(self.content)
        renamed = {i: f"\uffff\x00tinygemma:special:{i}" for i in self._text_specials}  # (U+FFFF: a noncharacter)
        for i, name in renamed.items():
            spec["model"]["vocab"][i][0] = name
        for token in spec.get("added_tokens") or []:  # (else each would take a new id, and every later one's move)
            if token.get("id") in renamed:
                token["content"] = renamed[token["id"]]
        return _read_stories(type(self.backend).from_str(json.dumps(spec)))

    def _as_text(self, text: str, ids: list[int]) -> list[int]:
        """`ids`, with no special token the model read out of the text itself (see _text_specials)."""
        if self._text_specials.isdisjoint(ids):
            return ids
        if self._text_backend is not None:
            ids = self._text_backend.encode(text, add_special_tokens=False).ids
        read = [i for i in ids if i in self._text_specials]
        if read:
            raise UserError(f"the tokenizer {self.identity} reads its special token "
                            f"{self.backend.id_to_token(read[0])!r} out of the text starting {text[:40]!r}")
        return ids

    def _ids_digest(self) -> str:
        """A digest of what decides the ids and their text: the file as the installed `tokenizers` writes it back
        (one spelling of each setting, whatever wrote the file), less its padding, truncation and post-processor,
        plus the ids that post-processor puts around a prompt. transformers' save_pretrained rewrites the file
        with a post-processor that adds nothing, which changes no id: the same identity."""
        canonical = json.loads(self.backend.to_str())
        for key in ("version", "truncation", "padding", "post_processor"):
            canonical.pop(key, None)
        canonical["prompt_affixes"] = [list(self.prompt_prefix), list(self.text_suffix)]
        if self.eot_token not in EOT_CANDIDATES:  # named beside the file: another name makes other data
            canonical["eot_token"] = self.eot_token
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode("utf-8")).hexdigest()

    @property
    def model_vocab_size(self) -> int:
        return self._model_vocab_size

    @functools.cached_property
    def parsed(self) -> dict:
        """The file's JSON, parsed once (Gemma 3's tokenizer.json is 33 MB): read it, never change it."""
        return json.loads(self.content)

    @functools.cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """The ids of a byte-fallback model's <0xHH> pieces (SentencePiece's, Llama's, Gemma's): its decoder reads
        a run of them together, and a run that is not UTF-8 becomes U+FFFD for each of its bytes, so text made of
        them is final only once a token of another kind follows."""
        if not (self.parsed.get("model") or {}).get("byte_fallback"):
            return frozenset()
        return frozenset(i for token, i in self.backend.get_vocab(with_added_tokens=True).items()
                         if _BYTE_TOKEN.fullmatch(token))

    @property
    def description(self) -> str:
        """"byte-level BPE (tokenizer.json)", "Unigram (tokenizer.json)", ...: its model's type, from the file."""
        if self.identity == "gpt2":
            return "GPT-2's BPE (tokenizer.json)"
        kind = (self.parsed.get("model") or {}).get("type") or "tokenizer"
        return f"{'byte-level ' if _decodes_byte_level(self.parsed) else ''}{kind} (tokenizer.json)"

    @property
    def bos_token(self) -> str:
        return self.backend.id_to_token(self.bos_id) if self.prompt_prefix else self.eot_token

    @property
    def unk_token(self) -> str:
        """The file's own unknown token where its model has one (WordPiece's [UNK], a Unigram's <unk>): naming
        end-of-text instead, the export's tokenizer read every unknown token as end-of-text."""
        model = self.parsed.get("model") or {}
        unk = model.get("unk_token")
        if model.get("type") == "Unigram" and isinstance(model.get("unk_id"), int):
            unk = self.backend.id_to_token(model["unk_id"])
        return unk if isinstance(unk, str) and self.backend.token_to_id(unk) is not None else self.eot_token

    def _post_processor_parts(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The ids the tokenizer's post-processor puts before a text (Gemma's <bos>; none for GPT-2's and our
        BPEs), and after it (a T5- or BERT-style </s> or [SEP]). Stories are tokenized without either (documents
        are joined by end-of-text, and prepare puts the first before each); a prompt starts with the first, as
        transformers' tokenizer(prompt) starts it, and as the model was trained to read. The second tinygemma
        never adds (a prompt is no finished text); the hf export says so (cli)."""
        try:
            plain = self.backend.encode("a", add_special_tokens=False).ids
            full = self.backend.encode("a", add_special_tokens=True).ids
        except Exception:  # a tokenizer that cannot encode "a": encode says so when it is used
            return (), ()
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return tuple(full[:start]), tuple(full[start + len(plain) :])
        return (), ()

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """The file, with the end-of-text token a transformers folder names beside it where it holds none of
        EOT_CANDIDATES, or else the one tinygemma's record beside its copy names (recorded_eos_token)."""
        path = Path(path)
        content = tokenizer_text(path)
        return cls(content, path, named_eos_token(path.parent) or recorded_eos_token(path, content))

    def encode(self, text: str) -> list[int]:
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        except BaseException as e:  # a tokenizer.json that cannot encode every text: a WordLevel with no [UNK], ...
            if not tokenizers_failure(e):
                raise
            raise UserError(f"the tokenizer {self.identity} cannot encode the text starting {text[:40]!r} "
                            f"({describe(e)})") from None
        return self._kept(text, self._as_text(text, ids))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            batch = [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        except BaseException as e:
            if not tokenizers_failure(e):
                raise
            raise UserError(f"the tokenizer {self.identity} cannot encode these texts ({describe(e)})") from None
        return [self._kept(text, self._as_text(text, ids)) for text, ids in zip(texts, batch)]

    def _kept(self, text: str, ids: list[int]) -> list[int]:
        """`ids`, unless the tokenizer dropped all of a text its normalizer keeps: a model without byte fallback
        drops what its vocabulary lacks (one of end-of-text alone turned every story into nothing). Text its
        normalizer removes (a BERT-style one's control characters) encodes to nothing, as it should."""
        if not ids and text.strip():
            normalizer = self.backend.normalizer
            if (normalizer.normalize_str(text) if normalizer else text).strip():
                raise UserError(f"the tokenizer {self.identity} encodes the text starting {text[:40]!r} as no "
                                "tokens at all: its vocabulary holds none of that text's pieces")
        return ids

    def decode(self, ids) -> str:
        ids = list(map(int, ids))
        self.refuse_ids(ids)  # (tokenizers leaves an id past its vocabulary out, and fails on a negative one)
        return self.backend.decode(ids, skip_special_tokens=False)

    def spec(self) -> dict:
        return {"kind": "tokenizer.json", "file": str(self.path or TOKENIZER_FILE), "sha256": self.sha256,
                "vocab_size": self.vocab_size, "eot_id": self.eot_id, "eot_token": self.eot_token}

    def save(self, directory: str | Path) -> dict:
        target = Path(directory) / TOKENIZER_FILE
        if not (self.path and target.exists() and target.resolve() == self.path.resolve()):
            atomic_write_text(target, self.content)  # the exact bytes, so the sha256 still holds
        return {**self.spec(), "file": TOKENIZER_FILE}

    def hf_json(self) -> str:
        return self.content

    def __getstate__(self):  # workers rebuild the backend from the JSON
        return {"content": self.content, "path": self.path, "eot_token": self.eot_token}

    def __setstate__(self, state):
        self.__init__(state["content"], state["path"], state["eot_token"])


class TokenizerFileMissing(UserError):
    """A tokenizer.json that is not there (a checkpoint's, gone: its caller says what to do instead)."""


def tokenizer_text(path: Path) -> str:
    """A tokenizer.json's text. (A byte-order mark, Windows Notepad's, is no part of the JSON: the tokenizer, its
    copies and sha256 are the file's text after it, as recipes and stories.)"""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TokenizerFileMissing(f"tokenizer file not found: {path}") from None
    except IsADirectoryError:  # (bad input, not a failing machine's exit status 1)
        raise UserError(f"{path} is a folder, not a tokenizer.json") from None
    except UnicodeDecodeError:
        if path.suffix == ".model":  # (llama2.c's tok4096.model, Llama 2's and Gemma's tokenizer.model)
            raise UserError(f"{path} is a SentencePiece model, not a tokenizer.json: put it in a folder as "
                            "tokenizer.model, and transformers writes its tokenizer.json (python -c \"from "
                            "transformers import LlamaTokenizer as T; T.from_pretrained('FOLDER')"
                            ".save_pretrained('OUT')\")") from None
        raise UserError(f"{path} is not a tokenizer.json (not UTF-8 text)") from None


def named_eos_token(directory: Path) -> str | None:
    """The eos_token a transformers folder names (tokenizer_config.json's, else special_tokens_map.json's: a string
    or an added token's {"content": ...}); None where neither file is there, readable or naming one."""
    for name in EOS_FILES:
        try:
            parsed = json.loads((directory / name).read_text(encoding="utf-8-sig"))
        except (OSError, ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
            continue
        eos = parsed.get("eos_token") if isinstance(parsed, dict) else None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and eos:
            return eos
    return None


def recorded_eos_token(path: Path, content: str) -> str | None:
    """The end-of-text token that tinygemma's record beside its copy of a tokenizer.json names (a prepared
    dataset's meta.json, a checkpoint's checkpoint.json: their spec, of this very file by its sha256). The copy is
    the tokenizer.json alone, without the transformers files that named the token; None where no record is."""
    sha256 = None  # (hashed only where a record names a token: a user's own folder holds none)
    for name in RECORD_FILES:
        try:
            parsed = json.loads((path.parent / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        spec = parsed.get("tokenizer") if isinstance(parsed, dict) else None
        if not (isinstance(spec, dict) and isinstance(spec.get("eot_token"), str)):
            continue
        sha256 = sha256 or hashlib.sha256(content.encode("utf-8")).hexdigest()
        if spec.get("sha256") == sha256:
            return spec["eot_token"]
    return None


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE trained on `texts`, with `<|endoftext|>` as its only special token.

    Every byte is in its alphabet and there is no normalizer, so decode(encode(text)) == text for any text.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return HFTokenizer(backend.to_str())


# ------------------------------------------------------------------ loading


def load_tokenizer(name_or_path: str | Path | Tokenizer) -> Tokenizer:
    """"gpt2", or a tokenizer.json (or a directory holding one); a Tokenizer already loaded is itself."""
    if isinstance(name_or_path, Tokenizer):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise UserError(f"a tokenizer is gpt2, a tokenizer.json's path or a loaded Tokenizer, got "
                        f"{type(name_or_path).__name__}")
    if str(name_or_path) == "gpt2":
        return GPT2Tokenizer()
    path = Path(name_or_path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
        if not path.exists():
            raise UserError(f"{path.parent} holds no {TOKENIZER_FILE}")
    elif str(name_or_path) == "bpe" and not path.exists():  # prepare's word for the BPE it trains
        raise UserError("bpe names the tokenizer that prepare trains on the stories; here give the tokenizer.json "
                        "it wrote (in the prepared data's folder), or gpt2")
    elif not path.exists() and (path.suffix == ".json" or len(path.parts) > 1):  # meant as a file
        raise UserError(f"tokenizer file not found: {path} (a tokenizer is gpt2, bpe, or a path to a "
                        "tokenizer.json; names on the Hugging Face hub are not loaded)")
    elif not path.exists():
        raise UserError(f"unknown tokenizer {str(name_or_path)!r}: use gpt2, bpe (prepare trains it), "
                        "or a path to a tokenizer.json")
    return HFTokenizer.from_file(path)


def tokenizer_from_spec(spec: dict, base_dir: str | Path = ".") -> Tokenizer:
    """The tokenizer a spec describes; a relative `file` is found in `base_dir`."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "gpt2":
        tokenizer = GPT2Tokenizer()
    elif kind == "tokenizer.json":
        path = Path(base_dir) / spec.get("file", TOKENIZER_FILE)
        content = tokenizer_text(path)
        sha256 = hashlib.sha256(content.encode("utf-8")).hexdigest()
        if spec.get("sha256") and spec["sha256"] != sha256:  # (before reading it: its own refusals would mislead)
            raise UserError(f"{path} has sha256 {sha256[:12]}..., but the spec records {spec['sha256'][:12]}...: it "
                            "is not the tokenizer this was made with")
        eot = spec.get("eot_token")  # (the token named beside the file it was made from: not beside this copy)
        tokenizer = HFTokenizer(content, path, eot if isinstance(eot, str) else None)
    else:
        raise UserError(f"unknown tokenizer spec {json.dumps(spec)[:200]}")
    for key in ("vocab_size", "eot_id"):
        if key in spec and spec[key] != getattr(tokenizer, key):
            raise UserError(f"tokenizer {tokenizer.identity} has {key} {getattr(tokenizer, key)}, the spec records {spec[key]}")
    return tokenizer


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each token id stands for (int64, `vocab_size` entries): what bits per byte divides by.

    0 for special tokens such as end-of-text, which stand for no text, and for ids the tokenizer lacks.
    """
    lengths = _text_byte_lengths(tokenizer, vocab_size)
    # End-of-text stands for no text even where the file has it as an ordinary piece (a tokenizer.json made from
    # GPT-2's vocab.json and merges.txt: 13 bytes a story were counted), as do the post-processor's <bos>.
    for i in (tokenizer.eot_id, *tokenizer.prompt_prefix, *tokenizer.text_suffix):
        if i < vocab_size:
            lengths[i] = 0
    return lengths


def _text_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """token_byte_lengths, by what each id decodes to (0 for the tokenizer's special tokens)."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    if isinstance(tokenizer, GPT2Tokenizer):
        enc = tokenizer.encoding
        special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
        for i in range(min(vocab_size, enc.n_vocab)):
            if i not in special:
                lengths[i] = len(enc.decode_single_token_bytes(i))
        return lengths
    backend = tokenizer.backend
    added = backend.get_added_tokens_decoder()
    spec = json.loads(backend.to_str())
    byte_level = _decodes_byte_level(spec)
    model = spec.get("model") or {}
    byte_fallback = bool(model.get("byte_fallback"))
    # (byte-fallback pieces <0xHH> stand for text bytes even where the file marks them special, as a BpeTrainer
    # given them as special_tokens does)
    special = {i for i, t in added.items() if t.special and not (byte_fallback and _BYTE_TOKEN.fullmatch(t.content))}
    ids = [i for i in range(min(vocab_size, backend.get_vocab_size(with_added_tokens=True)))
           if i not in special and backend.id_to_token(i) is not None]
    if byte_level:  # a byte-level BPE writes each byte as one printable character; an added token is its text
        for i in ids:
            lengths[i] = len(added[i].content.encode("utf-8")) if i in added else len(backend.id_to_token(i))
        return lengths
    # Other tokenizers (SentencePiece's kind: Gemma's, Llama's) are decoded after an anchor text, so that a decoder
    # stripping a text's leading space (Llama 2's) leaves a word's space counted; a byte-fallback token <0xHH> is
    # one byte, which alone decodes to U+FFFD (three).
    anchor = _anchor_ids(backend, special | {backend.token_to_id(tokenizer.unk_token)})  # (BPE's, Unigram's, ...)
    anchor_bytes = len(backend.decode(anchor, skip_special_tokens=False).encode("utf-8"))
    texts = backend.decode_batch([[*anchor, i] for i in ids], skip_special_tokens=False)
    for i, text in zip(ids, texts):
        fallback = byte_fallback and _BYTE_TOKEN.fullmatch(backend.id_to_token(i))
        lengths[i] = 1 if fallback else max(0, len(text.encode("utf-8")) - anchor_bytes)
    return lengths


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte-fallback pieces


def changed_text(tokenizer: Tokenizer, stories: list[str]) -> tuple[int, str, str] | None:
    """How many of `stories` the tokenizer does not give back as it read them (the text of their ids), with the
    first one's text where it starts to differ, as read and as given back; None where each comes back whole (a
    leading space aside: SentencePiece's kind reads one before each text, which its decoder may give back). A
    normalizer's lowercasing or NFKC, and what a vocabulary lacks (dropped, or read as an unknown token), change
    the text the model learns, and what its loss and bits per byte measure."""
    changed = [(story, back) for story in stories
               if (back := tokenizer.decode(tokenizer.encode(story))).removeprefix(" ") != story.removeprefix(" ")]
    if not changed:
        return None
    story, back = changed[0]
    at = next((i for i, (a, b) in enumerate(zip(story, back)) if a != b), min(len(story), len(back)))
    return len(changed), story[max(0, at - 12) : at + 24], back[max(0, at - 12) : at + 24]


def _anchor_ids(backend, avoid: set[int]) -> list[int]:
    """The ids of a plain text ("a") to decode each token after; none (each token alone) where the tokenizer cannot
    encode it, or only with a special or unknown token (`avoid`)."""
    try:
        ids = backend.encode("a", add_special_tokens=False).ids
    except Exception:  # e.g. a WordLevel without an unknown token
        return []
    return [] if set(ids) & avoid else list(ids)


# ------------------------------------------------------------------ encoding stories, in worker processes too
# (prepare's workers import this module alone: no torch, which takes seconds and 200 MB a spawned process)


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


_worker_tokenizer: Tokenizer | None = None


def init_encoding_worker(tokenizer: Tokenizer, quiet_interrupt: bool = False) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    if quiet_interrupt:  # a worker process: Ctrl-C is the parent's to handle (it shuts the pool down), not a
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # traceback from each worker; SIGTERM (its parent's end,
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # below) ends it, never as the CLI's Terminated
        die_with_parent()  # (a prepare killed: SIGKILL, SIGTERM)


def encode_in_worker(stories: list[str]) -> tuple[np.ndarray, int]:
    """One worker task: encode_stories with the worker's tokenizer."""
    return encode_stories(stories, _worker_tokenizer)


def encode_stories(stories: list[str], tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """The stories' ids as prepare writes them, each followed by the end-of-text id (and preceded by the ids the
    tokenizer starts a text with: Gemma's <bos>, as a prompt starts with it), and their UTF-8 bytes."""
    eot = np.array([tokenizer.eot_id], dtype=np.uint32)
    prefix = np.array(tokenizer.prompt_prefix, dtype=np.uint32)
    pieces = []
    for story in stories:
        pieces += (prefix, tokenizer.encode_to_numpy(story), eot)
    ids = np.concatenate(pieces, dtype=dtype_for(tokenizer.vocab_size))
    return ids, sum(len(story.encode("utf-8")) for story in stories)
