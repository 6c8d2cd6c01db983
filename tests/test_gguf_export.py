"""The GGUF export, checked by llama.cpp itself (through llama-cpp-python): it splits real stories into the same
tokens, computes the same logits, continues a prompt longer than the sliding window with the same greedy text as
`tinygemma generate`, and its q8_0 file picks the same next token as f32; bad input is one line.

Greedy text is compared where greedy is well defined. llama.cpp runs its KV cache in f16 and GELU through
an f16 table, which moves a trained tiny model's logits by up to about 1e-3 (measured 8e-4 here, 1.5e-4 on the
270m shape): a step whose top two logits are closer than that could go either way. So the tiny model is trained
until its text is story-like (40 Muon steps), and the prompt is the first held-out one whose greedy path keeps the
top two logits at least MIN_MARGIN apart, chosen by tinygemma's logits alone. The 270m-shaped model gets two
AdamW steps of 64 tokens at a high rate (what 2 cores afford): enough to pull its predictions onto the most common
token with a margin of 0.7, far from any tie, though its text is then one token repeated; so its logits over the
whole prompt are compared as well, which is where the window shows (removing it moves them by 3e-2 at positions
past 512; llama.cpp differs by 1.5e-4).
"""

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import test_train
import torch
from test_tokenizer import ODD_TEXT, read_stories

import tinygemma.checkpoint
import tinygemma.data
from tinygemma import Gemma3, gguf_export
from tinygemma.checkpoint import (
    checkpoint_tokenizer,
    last_checkpoint,
    load_model,
    resolve_checkpoint,
    save_model,
)
from tinygemma.cli import main
from tinygemma.config import GLOBAL, SLIDING, ModelConfig, load_recipe
from tinygemma.data import open_prepared, prepare
from tinygemma.errors import UserError
from tinygemma.files import is_gguf_file
from tinygemma.generate import generate_stream
from tinygemma.gguf_export import (
    GGUF_DTYPES,
    check_byte_level_bpe,
    check_llama_cpp_tokenizer,
    export_gguf,
    has_gemma_layout,
    llama_cpp_vocabulary,
)
from tinygemma.tokenizer import EOT_TOKEN, RECORD_FILES, HFTokenizer, load_tokenizer, train_bpe
from tinygemma.train import train

gguf = pytest.importorskip("gguf", reason='the GGUF export needs the gguf package: pip install "tinygemma[gguf]"')

ROOT = Path(__file__).resolve().parents[1]
data_dir = test_train.data_dir  # the first 600 real stories, BPE-tokenized to 512 tokens (10% held out)

MIN_MARGIN = 0.01  # top-1 minus top-2 logit along a compared greedy path: 12x llama.cpp's largest measured difference
COMMON = ["grad_accum_steps=1", "eval_interval=0", "eval_batches=1", "checkpoint_interval=0", "dtype=float32",
          "compile=false", "device=cpu", "seed=1"]
TINY = ["model.preset=gemma3-tiny", "batch_size=4", "block_size=128", "max_steps=40", "optimizer=muon",
        "learning_rate=4e-3", "warmup_steps=4", *COMMON]  # window 64 < block 128: training slides too
SHAPE_270M = ["model.preset=gemma3-270m-gpt2", "batch_size=1", "block_size=64", "max_steps=2", "optimizer=adamw",
              "learning_rate=3e-3", "min_lr=3e-3", "warmup_steps=0", *COMMON]


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run installs it)")


def crashes_on_q8_0(llama_cpp) -> bool:
    """A llama.cpp built with AMX (natively, on an Intel CPU that has it) ends the process with a segmentation
    fault in its first q8_0 evaluation, of any model (ggml-org/llama.cpp#20824; seen with 0.3.36 on 2026-12-07,
    for gemma3-tiny and the 270M's shape alike): such a test would take its pytest worker down with it. .ci/run
    builds llama.cpp without native flags (AVX2, no AMX)."""
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


AMX_SKIP = ("q8_0 not evaluated: this llama.cpp was built with AMX, which crashes on q8_0 files "
            "(ggml-org/llama.cpp#20824); build it with CMAKE_ARGS=-DGGML_NATIVE=OFF, as .ci/run does")


def open_llama(llama_cpp, path, **kwargs):
    """llama.cpp on the file, with tinygemma's thread count, closed when the block ends."""
    return contextlib.closing(llama_cpp.Llama(str(path), n_threads=torch.get_num_threads(), verbose=False, **kwargs))


def llama_greedy(llama_cpp, llm, ids: list[int], n_new: int) -> list[int]:
    """llama.cpp's greedy continuation: its greedy sampler, no penalties, stopping at end of generation."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    new = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        new.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(new) == n_new:
            return new
    return new


def story_prompts(stories_dir, tokenizer, min_tokens: int):
    """Prompts of whole held-out stories, each at least `min_tokens` tokens long."""
    stories = read_stories(stories_dir / "valid.txt", 120)
    for start in range(0, len(stories), 5):
        prompt, i = stories[start], start + 1
        while len(tokenizer.encode(prompt)) < min_tokens and i < len(stories):
            prompt, i = prompt + "\n\n" + stories[i], i + 1
        yield prompt


def greedy_margins(model, ids: list[int], new: list[int]) -> torch.Tensor:
    """Top-1 minus top-2 logit at each step of a greedy continuation (one forward pass, no cache)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + new]))[0, len(ids) - 1: len(ids) + len(new) - 1]
    top = logits.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def text_of(tokenizer, ids: list[int]) -> str:
    """The text of a continuation as `tinygemma generate` prints it: up to end of text, which is not printed."""
    return tokenizer.decode(ids[: ids.index(tokenizer.eot_id)] if tokenizer.eot_id in ids else ids)


def cli_generate(ckpt, prompt: str, n_new: int, capsys) -> str:
    """`tinygemma generate --temperature 0` in float32 (auto would pick bf16 on CPUs with AVX-512 BF16), reading
    every token as llama.cpp does (by default it reads at most the block the model trained on)."""
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", prompt, "--temperature", "0", "--max-new-tokens",
                 str(n_new), "--dtype", "float32", "--device", "cpu", "--context", "all"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and out.endswith("\n")
    return out[len(prompt):-1]


def export_cli(ckpt, out, dtype: str, capsys) -> None:
    assert main(["export", "--ckpt", str(ckpt), "--format", "gguf", "--out", str(out), "--dtype", dtype]) == 0
    assert f"({dtype}," in capsys.readouterr().out


# ------------------------------------------------------------------ tokens


@pytest.fixture(scope="module")
def bpe(stories_dir):
    return train_bpe(read_stories(stories_dir / "train.txt", 400), vocab_size=512)


def small_export(tokenizer, directory, dtype="f32", **overrides):
    """A small random model saved with `tokenizer`, and its GGUF export; returns (model, path)."""
    config = ModelConfig.preset("gemma3-tiny", **{"vocab_size": tokenizer.vocab_size, "d_model": 32, "head_dim": 16,
                                                  "query_pre_attn_scalar": 16, "mlp_dim": 64, "n_heads": 2,
                                                  "sliding_window": 16, "init_std": 0.3, **overrides})
    torch.manual_seed(0)
    model = Gemma3(config).eval()
    with torch.no_grad():  # gains away from zero, so that a missing 1 + w or a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    save_model(model, directory / "ckpt", {"tokenizer": tokenizer.save(directory / "ckpt")})
    export_gguf(directory / "ckpt", directory / "model.gguf", dtype)
    return model, directory / "model.gguf"


@pytest.mark.parametrize("name", ["gpt2", "bpe"])
def test_llama_cpp_tokenizes_real_stories_as_tinygemma(name, bpe, stories_dir, tmp_path, llama_cpp):
    tokenizer = load_tokenizer("gpt2") if name == "gpt2" else bpe
    _, path = small_export(tokenizer, tmp_path, n_layers=1)
    stories = read_stories(stories_dir / "valid.txt", 300) + read_stories(stories_dir / "v2_train.txt", 200)
    assert any("\n" in s for s in stories) and any('"' in s for s in stories) and any(not s.isascii() for s in stories)
    with open_llama(llama_cpp, path, vocab_only=True) as llm:
        assert llm.n_vocab() == tokenizer.vocab_size
        for text in stories + ODD_TEXT:  # ODD_TEXT: other scripts, emoji, CRLF, a literal <|endoftext|>, ...
            # add_bos=True asks for whatever llama-cli would put in front: the file says nothing.
            ids = llm.tokenize(text.encode(), add_bos=True, special=False)
            assert ids == tokenizer.encode(text), text[:80]
            assert llm.detokenize(ids).decode("utf-8") == text
        # With special tokens parsed (as llama-cli reads a prompt), <|endoftext|> between stories is the one id
        # that `tinygemma prepare` writes there; and it ends generation.
        joined = EOT_TOKEN.join(stories[:20])
        expected = sum(([*tokenizer.encode(s), tokenizer.eot_id] for s in stories[:20]), [])[:-1]
        assert llm.tokenize(joined.encode(), add_bos=True, special=True) == expected
        assert llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), tokenizer.eot_id)
        assert llm.token_eos() == tokenizer.eot_id
        assert not any(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), i)
                       for i in tokenizer.encode(stories[0]))


# ------------------------------------------------------------------ SentencePiece BPEs

SENTENCEPIECE_LAYOUTS = ["gemma", "gemma-transformers4", "llama", "llama-transformers4"]
# Llama 2's tokenizer.json as transformers 4 wrote it: a "▁" put before the text by a normalizer
PREPEND_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}


@pytest.fixture(scope="module")
def sentencepiece_bpes(tmp_path_factory, stories_dir) -> dict[str, Path]:
    """SentencePiece BPEs trained on 2,000 real stories (byte fallback, 1,000 pieces; llama2.c trains its own so)
    and converted to tokenizer.json by transformers, as a user would (the folder of a tokenizer.model, read by its
    tokenizer class and saved): Gemma's layout (no "▁" before a text) and Llama 2's (one there, SentencePiece's
    dummy prefix), each as transformers 5 writes it and as transformers 4 did (Gemma's without a split at " ",
    Llama's "▁" put by a normalizer)."""
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    root, stories, folders = tmp_path_factory.mktemp("sentencepiece"), read_stories(stories_dir / "train.txt", 2000), {}
    for name, prefix, make, bos, eos in (("gemma", False, transformers.GemmaTokenizer, "<bos>", "<eos>"),
                                         ("llama", True, transformers.LlamaTokenizer, "<s>", "</s>")):
        (root / "model").mkdir(exist_ok=True)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(stories), model_prefix=str(root / "model" / "tokenizer"), model_type="bpe",
            vocab_size=1000, byte_fallback=True, add_dummy_prefix=prefix, remove_extra_whitespaces=False,
            split_digits=True, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
            max_sentence_length=100_000, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece=eos,
            bos_piece=bos, unk_piece="<unk>", minloglevel=2)
        make.from_pretrained(root / "model").save_pretrained(root / name)
        spec = json.loads((root / name / "tokenizer.json").read_text(encoding="utf-8"))
        older = {"pre_tokenizer": None, **({"normalizer": PREPEND_NORMALIZER} if prefix else {})}
        (root / f"{name}-transformers4").mkdir()
        (root / f"{name}-transformers4" / "tokenizer.json").write_text(json.dumps({**spec, **older}), encoding="utf-8")
        folders[name], folders[f"{name}-transformers4"] = root / name, root / f"{name}-transformers4"
    return folders


@pytest.mark.parametrize("layout", SENTENCEPIECE_LAYOUTS)
def test_llama_cpp_tokenizes_real_stories_as_tinygemma_with_a_sentencepiece_bpe(layout, sentencepiece_bpes,
                                                                                stories_dir, tmp_path, llama_cpp):
    """llama.cpp's SentencePiece tokenizer ("llama"), given scores from the merges' order, splits 500 real stories
    and odd text (byte pieces for what the 1,000 pieces lack) as tinygemma does, and decodes them back (Llama's
    layout with the space it puts before a text, which tinygemma's decoder strips); end-of-text ends generation.
    One difference: transformers 5's Llama layout puts no "▁" before a text that starts with a space or a "▁";
    llama.cpp puts one."""
    tokenizer = load_tokenizer(sentencepiece_bpes[layout])
    prefix = layout.startswith("llama")
    assert tokenizer.eot_token == ("</s>" if prefix else "<eos>")
    _, path = small_export(tokenizer, tmp_path, n_layers=1)
    fields = gguf.GGUFReader(path).fields
    model, space = (fields[f"tokenizer.ggml.{key}"] for key in ("model", "add_space_prefix"))
    assert bytes(model.parts[model.data[0]]).decode() == "llama" and bool(space.parts[space.data[0]][0]) == prefix
    stories = read_stories(stories_dir / "valid.txt", 300) + read_stories(stories_dir / "v2_train.txt", 200)
    with open_llama(llama_cpp, path, vocab_only=True) as llm:
        for text in stories + ODD_TEXT + ["\u2581 a piece first"]:
            ids = llm.tokenize(text.encode(), add_bos=True, special=False)
            if layout == "llama" and (text[:1].isspace() or text[:1] == "\u2581"):
                assert ids == tokenizer.encode(" " + text)  # the one difference
                continue
            assert ids == tokenizer.encode(text), text[:80]
            assert llm.detokenize(ids).decode("utf-8") == " " * (prefix and bool(ids)) + tokenizer.decode(ids)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        assert llm.token_eos() == tokenizer.eot_id and llama_cpp.llama_vocab_is_eog(vocab, tokenizer.eot_id)
        assert any(llama_cpp.llama_vocab_get_attr(vocab, i) & llama_cpp.LLAMA_TOKEN_ATTR_BYTE for i in range(300))


def test_sentencepiece_bpe_scores_follow_its_merges(sentencepiece_bpes):
    """Each piece the merges form scores minus the rank of its first merge: llama.cpp merges the highest score
    first, tokenizers the first listed; the transformers 5 and 4 layouts of one model score alike."""
    spec = json.loads((sentencepiece_bpes["gemma"] / "tokenizer.json").read_text(encoding="utf-8"))
    scores, merges = gguf_export.sentencepiece_scores(spec), spec["model"]["merges"]
    formed = ["".join(m if isinstance(m, list) else m.split(" ", 1)) for m in merges]
    assert len(scores) == len(set(formed)) and scores[formed[0]] == 0.0
    for rank, piece in enumerate(formed):  # a piece scores above every piece whose first merge comes later
        assert scores[piece] == -formed.index(piece) and (rank == 0 or scores[piece] <= scores[formed[rank - 1]])
    older = json.loads((sentencepiece_bpes["gemma-transformers4"] / "tokenizer.json").read_text(encoding="utf-8"))
    assert gguf_export.sentencepiece_scores(older) == scores


def _formed_twice(spec) -> tuple[int, int]:
    """Two ranks of merges that form the same piece."""
    formed: dict[str, int] = {}
    for rank, merge in enumerate(spec["model"]["merges"]):
        piece = "".join(merge if isinstance(merge, list) else merge.split(" ", 1))
        if piece in formed:
            return formed[piece], rank
        formed[piece] = rank
    raise AssertionError("no piece formed by two merges")


@pytest.mark.parametrize("layout,change,words", [
    ("gemma", lambda s: s["model"]["merges"].pop(_formed_twice(s)[1]), "its merges lack"),
    ("gemma", lambda s: s["model"]["merges"].append(s["model"]["merges"].pop(_formed_twice(s)[1])),
     "are not listed together"),
    ("gemma", lambda s: s["model"].update(byte_fallback=False), "no byte fallback"),
    ("gemma", lambda s: s["model"]["vocab"].update({"<0x41>x": s["model"]["vocab"].pop("<0x41>")}),
     "lacks 1 of the 256 byte pieces (<0x41>"),
    ("gemma", lambda s: s["added_tokens"].append({"id": 1000, "content": "Lily", "special": False}),
     "'Lily' is not special"),
    ("gemma", lambda s: s["decoder"]["decoders"].pop(), "its decoder is"),
    ("gemma", lambda s: s["model"].update(type="Unigram"), "SentencePiece Unigram model"),
    ("gemma", lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "its pre-tokenizer is"),
    ("llama", lambda s: s["pre_tokenizer"].update(split=True), "its pre-tokenizer is"),
    ("llama", lambda s: s["pre_tokenizer"].update(prepend_scheme="never"), "its pre-tokenizer is"),
    ("llama", lambda s: s["decoder"]["decoders"].pop(), "its decoder is"),  # no Strip of the space it puts
    ("llama-transformers4", lambda s: s["model"].update(dropout=0.1), "its BPE sets dropout"),
], ids=["merge-missing", "merges-apart", "no-byte-fallback", "byte-piece-missing", "plain-added-token",
        "decoder", "unigram", "pre-tokenizer", "metaspace-split", "metaspace-never", "no-strip", "dropout"])
def test_a_sentencepiece_bpe_llama_cpp_cannot_reproduce_is_refused(sentencepiece_bpes, layout, change, words):
    spec = json.loads((sentencepiece_bpes[layout] / "tokenizer.json").read_text(encoding="utf-8"))
    assert check_llama_cpp_tokenizer(spec) == "llama"  # as converted: llama.cpp's SentencePiece tokenizer
    assert words in refused_after(check_llama_cpp_tokenizer, spec, change)


# ------------------------------------------------------------------ logits of the architecture


def flipped(model: Gemma3) -> Gemma3:
    """The same weights with every layer's kind swapped (sliding <-> global): what a wrong window, pattern or
    RoPE base assignment would compute. The control that shows the comparison can fail."""
    kinds = tuple(GLOBAL if kind == SLIDING else SLIDING for kind in model.config.layer_types)
    other = Gemma3(dataclasses.replace(model.config, layer_types=kinds)).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("overrides", [
    {},  # gemma3-tiny's 6 layers: 5 sliding, then 1 global
    # 2-in-3 sliding, other RoPE bases, an untied head, and a vocabulary padded from 520 to 576 rows
    {"n_layers": 3, "sliding_window_pattern": 3, "rope_local_base": 777.0, "rope_global_base": 99_999.0,
     "tie_embeddings": False, "vocab_size": 520, "vocab_pad_multiple": 64},
    {"n_layers": 2, "sliding_window_pattern": 1},  # no sliding layer at all
], ids=["5-in-6", "custom", "all-global"])
def test_llama_cpp_computes_the_same_logits(overrides, bpe, stories_dir, tmp_path, llama_cpp):
    model, path = small_export(bpe, tmp_path, **overrides)
    assert has_gemma_layout(model.config) == (overrides == {})  # what older llama.cpp builds assume
    ids = bpe.encode(read_stories(stories_dir / "valid.txt", 1)[0])[:100]  # 100 tokens: the window of 16 slides
    reader = gguf.GGUFReader(path)
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert shapes["token_embd.weight"] == [32, model.config.vocab_size]  # the padding rows are gone
    assert ("output.weight" in shapes) == (not model.config.tie_embeddings)
    with torch.no_grad():
        ours, control = model(torch.tensor([ids]))[0].numpy(), flipped(model)(torch.tensor([ids]))[0].numpy()
    with open_llama(llama_cpp, path, n_ctx=128, logits_all=True) as llm:
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
    error, wrong = np.abs(theirs - ours).max(), np.abs(control - ours).max()
    assert error < 0.02 * ours.std(), (error, ours.std())
    assert wrong > 20 * error, (wrong, error)


# ------------------------------------------------------------------ greedy text of trained models


def train_run(directory, data, settings):
    train(load_recipe(None, [f"data.dir={data}", f"train.out={directory}", *settings]), quiet=True)
    return directory


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    return train_run(tmp_path_factory.mktemp("gguf") / "tiny", data_dir, TINY)


def test_the_gguf_is_named_after_its_run(tiny_run, small_ckpt, tmp_path, monkeypatch):
    """general.name (what LM Studio shows) names the run and its step; it was the step folder alone, the same
    for every run. A folder outside a run is named by itself."""
    def name(source) -> str:
        field = gguf.GGUFReader(export_gguf(source, tmp_path / "m.gguf", "f16")["path"]).fields["general.name"]
        return bytes(field.parts[field.data[0]]).decode()

    step = resolve_checkpoint(tiny_run).name
    assert step.startswith("step_") and name(tiny_run) == f"tinygemma tiny {step}"
    assert name(small_ckpt) == "tinygemma ckpt"
    # `export --ckpt .` from inside the run (or the checkpoint folder) names them as their paths do
    monkeypatch.chdir(tiny_run)
    assert name(".") == f"tinygemma tiny {step}"
    monkeypatch.chdir(small_ckpt)
    assert name(".") == "tinygemma ckpt"


def test_the_gguf_records_the_context_length_and_the_special_ids(small_ckpt, tmp_path):
    """What llama.cpp takes its defaults from, read back from the file: the context (llama-server's and
    llama-cli's default n_ctx) is the model's max_position_embeddings, and end of text is the eos, eot and pad id
    (llama.cpp stops there)."""
    reader = gguf.GGUFReader(export_gguf(small_ckpt, tmp_path / "m.gguf", "f32")["path"])

    def value(key):
        field = reader.fields[key]
        return field.parts[field.data[0]][0]

    tokenizer = checkpoint_tokenizer(small_ckpt)
    config, eot = load_model(small_ckpt, tokenizer, "float32", "cpu").config, tokenizer.eot_id
    assert value("gemma3.context_length") == config.max_position_embeddings
    assert [value(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "padding")] == [eot] * 3
    # no bos of its own: llama.cpp puts nothing before or after a prompt; the type named is the type written
    assert [value("tokenizer.ggml.add_bos_token"), value("tokenizer.ggml.add_eos_token")] == [False, False]
    assert value("general.file_type") == int(gguf.LlamaFileType.ALL_F32)
    template = reader.fields["tokenizer.chat_template"]  # llama-server's chat would fall back to ChatML
    assert bytes(template.parts[template.data[0]]).decode() == tokenizer.chat_template()


def test_an_end_of_text_named_by_a_transformers_folder_goes_through_every_stage(bpe, stories_dir, tmp_path, capsys):
    """A BPE whose end-of-text is "[EOS]" (none of the five names), saved by transformers with eos_token="[EOS]":
    prepare reads it from the folder, the data, the run and both exports end their stories with it, and
    transformers and llama.cpp's file name it as their eos."""
    transformers = pytest.importorskip("transformers")
    folder, data, run = tmp_path / "tok", tmp_path / "data", tmp_path / "run"
    (tmp_path / "bare.json").write_text(bpe.content.replace(f'"{EOT_TOKEN}"', '"[EOS]"'), encoding="utf-8")
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "bare.json"),
                                         eos_token="[EOS]").save_pretrained(folder)
    eos = bpe.eot_id
    assert main(["prepare", "--source", str(stories_dir / "train.txt"), "--limit", "100", "--tokenizer", str(folder),
                 "--out", str(data), "--workers", "1", "--no-progress"]) == 0
    prepared = open_prepared(data)
    assert prepared.tokenizer().eot_token == "[EOS]" and (prepared.split("train") == eos).sum() >= 90
    train_run(run, data, [*TINY, "max_steps=2", "warmup_steps=0"])
    assert checkpoint_tokenizer(run).eot_token == "[EOS]"
    # The copies in the dataset and the checkpoint, given as files, read the token from tinygemma's record beside
    # them (meta.json, checkpoint.json; the names tokenizer.RECORD_FILES holds): they were refused without the
    # transformers folder's files.
    assert RECORD_FILES == (tinygemma.data.META_NAME, tinygemma.checkpoint.META_NAME)
    step = last_checkpoint(run)["dir"]
    for copy in (data / "tokenizer.json", run / "checkpoints" / step / "tokenizer.json"):
        assert load_tokenizer(copy).eot_token == "[EOS]"
    assert main(["prepare", "--source", str(stories_dir / "valid.txt"), "--limit", "20", "--tokenizer",
                 str(data / "tokenizer.json"), "--out", str(tmp_path / "more"), "--workers", "1", "--no-progress"]) == 0
    assert open_prepared(tmp_path / "more").tokenizer().identity == prepared.tokenizer().identity
    assert main(["generate", "--ckpt", str(run), "--prompt", "Once", "--max-new-tokens", "4"]) == 0
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (hf.eos_token, hf.eos_token_id) == ("[EOS]", eos)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == eos
    reader = gguf.GGUFReader(export_gguf(run, tmp_path / "m.gguf", "f32")["path"])
    field = reader.fields["tokenizer.ggml.eos_token_id"]
    assert field.parts[field.data[0]][0] == eos


def test_tiny_greedy_text_matches_tinygemma_generate(tiny_run, stories_dir, tmp_path, llama_cpp, capsys):
    export_cli(tiny_run, tmp_path / "tiny.gguf", "f32", capsys)
    tokenizer = checkpoint_tokenizer(tiny_run)
    model = load_model(tiny_run, tokenizer, "float32", "cpu")
    window, n_new = model.config.sliding_window, 24
    for prompt in story_prompts(stories_dir, tokenizer, min_tokens=2 * window):
        ids = tokenizer.encode(prompt)
        new = [int(t) for t in generate_stream(model, torch.tensor([ids]), n_new, temperature=0,
                                               eos_id=tokenizer.eot_id)]
        margins = greedy_margins(model, ids, new)
        if margins.min() >= MIN_MARGIN:
            break
    else:
        pytest.fail(f"no held-out prompt has a greedy path without near-ties (>= {MIN_MARGIN})")
    assert len(ids) > window and len(new) == n_new
    with open_llama(llama_cpp, tmp_path / "tiny.gguf", n_ctx=1024) as llm:
        theirs = llama_greedy(llama_cpp, llm, ids, n_new)
        # A chat front end (llama-server's web page, LM Studio) sends the text as it is: the same story.
        chat = llm.create_chat_completion([{"role": "user", "content": prompt}], temperature=0, repeat_penalty=1.0,
                                          max_tokens=n_new)["choices"][0]["message"]["content"]
    assert theirs == new  # token for token
    assert cli_generate(tiny_run, prompt, n_new, capsys) == text_of(tokenizer, theirs) == chat


@pytest.fixture(scope="module")
def shape_270m_run(tmp_path_factory, stories_dir):
    root = tmp_path_factory.mktemp("gguf270m")
    prepare(root / "data", sources=[stories_dir / "train.txt"], tokenizer="gpt2", limit=200, val_fraction=0.1,
            workers=1, progress=False)
    return train_run(root / "run", root / "data", SHAPE_270M)


def test_270m_shape_greedy_text_and_logits_match(shape_270m_run, stories_dir, tmp_path, llama_cpp, capsys):
    export_cli(shape_270m_run, tmp_path / "270m.gguf", "f32", capsys)
    tokenizer = checkpoint_tokenizer(shape_270m_run)
    model = load_model(shape_270m_run, tokenizer, "float32", "cpu")
    assert model.config.head_dim == 256 and model.config.sliding_window == 512 and model.config.n_layers == 18
    prompt = next(story_prompts(stories_dir, tokenizer, min_tokens=520))
    ids, n_new = tokenizer.encode(prompt), 8
    text = cli_generate(shape_270m_run, prompt, n_new, capsys)
    with open_llama(llama_cpp, tmp_path / "270m.gguf", n_ctx=1024, n_batch=1024, logits_all=True) as llm:
        llm.eval(ids)
        theirs_logits = np.array(llm.scores[: len(ids)])
        new = llama_greedy(llama_cpp, llm, ids, n_new)
    assert text == text_of(tokenizer, new)
    with torch.no_grad():
        logits = model(torch.tensor([ids + new]))[0]
    ours_logits, ours_next = logits[: len(ids)].numpy(), logits[len(ids) - 1: -1].argmax(-1).tolist()
    assert ours_next == new  # token for token, from tinygemma's float32 logits
    assert greedy_margins(model, ids, new).min() >= MIN_MARGIN  # the premise: no near-tie on the path
    # Every prompt position, 512 and past it included: llama.cpp's window is ours.
    assert np.abs(theirs_logits - ours_logits).max() < 1e-3


# ------------------------------------------------------------------ dtypes


def test_q8_0_picks_the_same_next_token_as_f32(tiny_run, data_dir, tmp_path, llama_cpp, capsys):
    tokens = open_prepared(data_dir).split("val")[:512].astype(np.int64).tolist()
    tokenizer = checkpoint_tokenizer(tiny_run)
    with torch.no_grad():
        ours = load_model(tiny_run, tokenizer, "float32", "cpu")(torch.tensor([tokens]))[0].argmax(-1).numpy()
    choices, sizes = {}, {}
    for dtype in GGUF_DTYPES:
        path = tmp_path / f"{dtype}.gguf"
        export_cli(tiny_run, path, dtype, capsys)
        sizes[dtype] = path.stat().st_size
        if dtype == "q8_0" and crashes_on_q8_0(llama_cpp):
            continue
        with open_llama(llama_cpp, path, n_ctx=512, n_batch=512, logits_all=True) as llm:
            llm.eval(tokens)
            choices[dtype] = np.array(llm.scores[: len(tokens)]).argmax(-1)
    agreement = {dtype: float((choices[dtype] == choices["f32"]).mean()) for dtype in choices}
    print(f"\nnext-token agreement with f32 over {len(tokens)} held-out positions: {agreement}; "
          f"f32 with tinygemma: {(choices['f32'] == ours).mean():.4f}; file sizes: {sizes}")
    assert (choices["f32"] == ours).mean() >= 0.98
    assert agreement["f16"] >= 0.95 and agreement["bf16"] >= 0.95
    assert sizes["q8_0"] < sizes["f16"] == sizes["bf16"] < sizes["f32"]
    if "q8_0" not in choices:
        pytest.skip(f"f32, f16 and bf16 checked; {AMX_SKIP}")
    assert agreement["q8_0"] >= 0.95


def test_decode_benchmark_runs(llama_cpp, capsys, monkeypatch):
    """benchmarks/gguf_decode.py on gemma3-tiny: every dtype exported, each contender timed in its process."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the contenders' processes import it by name
    import gguf_decode

    timed = "f16" if crashes_on_q8_0(llama_cpp) else "q8_0"  # (there q8_0's process would die: AMX_SKIP)
    result = gguf_decode.main(["--preset", "gemma3-tiny", "--dtypes", timed, "--new-tokens", "4", "--repeats", "1",
                               "--threads", str(torch.get_num_threads())])
    assert set(result["file_bytes"]) == set(GGUF_DTYPES) and result["llama_cpp_tokens_per_s"][timed] > 0
    assert result["tinygemma_tokens_per_s"] > 0 and json.loads(capsys.readouterr().out) == result


def test_a_transformers_directory_exports_the_same_file(small_ckpt, tmp_path):
    """`--ckpt` may name a transformers directory (an hf export, or Gemma 3 from the hub): its tokenizer.json and
    weights give the same tensors and vocabulary as the checkpoint they came from."""
    assert main(["export", "--ckpt", str(small_ckpt), "--out", str(tmp_path / "hf")]) == 0
    files = [export_gguf(source, tmp_path / f"{name}.gguf", "f16")["path"]
             for name, source in (("ckpt", small_ckpt), ("hf", tmp_path / "hf"))]
    readers = [gguf.GGUFReader(path) for path in files]
    tensors = [{t.name: t.data for t in reader.tensors} for reader in readers]
    assert tensors[0].keys() == tensors[1].keys()
    assert all(np.array_equal(tensors[0][name], tensors[1][name]) for name in tensors[0])
    tokens = [reader.fields["tokenizer.ggml.tokens"] for reader in readers]
    assert [bytes(tokens[0].parts[i]) for i in tokens[0].data] == [bytes(tokens[1].parts[i]) for i in tokens[1].data]


# ------------------------------------------------------------------ refusals and bad input


def run_cli(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return code, err


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory, bpe):
    directory = tmp_path_factory.mktemp("small")
    small_export(bpe, directory, n_layers=1)
    return directory / "ckpt"


@pytest.mark.parametrize("args,words", [
    (["--ckpt", "{tmp}/nowhere", "--out", "{tmp}/m.gguf"], "checkpoint not found"),
    (["--ckpt", "{ckpt}", "--out", "{tmp}/m.gguf", "--dtype", "q4_k"], "unknown --dtype"),
    (["--ckpt", "{ckpt}", "--out", "{tmp}/taken/m.gguf"], "taken is a file, not a folder"),
    (["--ckpt", "{ckpt}", "--out", "{tmp}"], "is a directory"),
], ids=["missing-checkpoint", "wrong-dtype", "out-below-a-file", "out-is-a-folder"])
def test_bad_input_is_one_line(small_ckpt, tmp_path, capsys, args, words):
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(small_ckpt)) for a in args]
    (tmp_path / "taken").write_text("a file where a folder would be made")
    code, err = run_cli(["export", "--format", "gguf", *argv], capsys)
    assert code == 2 and words in err
    assert not list(tmp_path.rglob("*.gguf*"))


def test_the_gguf_file_gets_new_folders_and_a_failed_export_leaves_none(small_ckpt, tmp_path, monkeypatch):
    """As the Hugging Face export makes its --out folder, the GGUF export makes the folders above its file; where
    the export fails, the folders it made (left empty) go, and a folder that was there stays."""
    out = tmp_path / "exports" / "tiny" / "m.gguf"
    assert main(["export", "--ckpt", str(small_ckpt), "--out", str(out), "--dtype", "f32"]) == 0
    assert is_gguf_file(out)

    def fail(*args):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(gguf_export, "_write_tokenizer", fail)
    with pytest.raises(RuntimeError, match="disk gone"):
        export_gguf(small_ckpt, tmp_path / "new" / "deeper" / "m.gguf", "f32")
    assert not (tmp_path / "new").exists()
    with pytest.raises(RuntimeError, match="disk gone"):
        export_gguf(small_ckpt, tmp_path / "exports" / "other" / "m.gguf", "f32")
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["tiny"]
    assert is_gguf_file(out)


def test_format_and_dtype_are_checked(small_ckpt, tmp_path, capsys):
    assert run_cli(["export", "--ckpt", small_ckpt, "--out", tmp_path / "hf", "--format", "onnx"], capsys)[0] == 2
    code, err = run_cli(["export", "--ckpt", small_ckpt, "--out", tmp_path / "hf", "--dtype", "q8_0"], capsys)
    assert code == 2 and "--format gguf" in err and not (tmp_path / "hf").exists()


def test_push_to_hub_uploads_the_gguf_file(small_ckpt, tmp_path, capsys, monkeypatch, hub_login):
    """The upload itself cannot be tested here (no hub): huggingface_hub's calls are replaced by recorders. The
    file goes up as itself under its own name (not its folder, which may hold anything), and the line printed
    says how llama.cpp runs it from the hub."""
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_file(self, **kwargs):
        calls.append(("upload_file", kwargs, Path(kwargs["path_or_fileobj"]).read_bytes()))

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs))

    def repo_info(self, repo_id, **kwargs):  # (--private: whether it exists and is public; here it is new)
        import httpx
        from huggingface_hub.errors import RepositoryNotFoundError

        calls.append(("repo_info", repo_id))
        request = httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        raise RepositoryNotFoundError("404 Client Error", response=httpx.Response(404, request=request))

    for name, recorder in [("create_repo", create_repo), ("upload_file", upload_file),
                           ("upload_folder", upload_folder), ("repo_info", repo_info)]:
        monkeypatch.setattr(huggingface_hub.HfApi, name, recorder)
    (tmp_path / "other.txt").write_text("not for the hub")
    out = tmp_path / "tiny.gguf"
    assert main(["export", "--ckpt", str(small_ckpt), "--out", str(out), "--push-to-hub", "someone/tiny-gguf",
                 "--private"]) == 0
    assert [c[0] for c in calls] == ["repo_info", "create_repo", "upload_file"]
    calls.pop(0)
    assert calls[0][1] == "someone/tiny-gguf" and calls[0][2] == {"repo_type": "model", "exist_ok": True,
                                                                 "private": True}
    upload = calls[1][1]
    assert upload["repo_id"] == "someone/tiny-gguf" and upload["repo_type"] == "model"
    assert upload["path_in_repo"] == "tiny.gguf" and calls[1][2] == out.read_bytes()
    printed = capsys.readouterr().out
    assert "uploaded" in printed and "--hf-repo someone/tiny-gguf --hf-file tiny.gguf" in printed

    def unreachable(self, *args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    code, err = run_cli(["export", "--ckpt", small_ckpt, "--out", out, "--push-to-hub", "someone/tiny-gguf"], capsys)
    assert code == 1 and "could not upload" in err and out.exists()  # the machine's failure; the file stays
    # Without huggingface_hub: refused before the export, which only it would upload (nothing written).
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    code, err = run_cli(["export", "--ckpt", small_ckpt, "--out", tmp_path / "new.gguf", "--push-to-hub", "a/b"],
                        capsys)
    assert code == 2 and 'pip install "tinygemma[hub]"' in err and not (tmp_path / "new.gguf").exists()


def test_gguf_package_missing_is_one_line(small_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails as if it were not installed
    code, err = run_cli(["export", "--ckpt", small_ckpt, "--format", "gguf", "--out", tmp_path / "m.gguf"], capsys)
    assert code == 2 and 'pip install "tinygemma[gguf]"' in err


def test_existing_file_is_replaced_atomically(small_ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model.gguf"
    export_gguf(small_ckpt, out, "f32")
    previous = out.read_bytes()

    def disk_full(self, **kwargs):  # numpy's own words when a write comes up short (its tofile on a full disk)
        raise OSError("524288 requested and 324408 written")

    with monkeypatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
        code, err = run_cli(["export", "--ckpt", small_ckpt, "--format", "gguf", "--out", out], capsys)
    assert code == 1 and f"could not write {out} (524288 requested and 324408 written); the disk may be full" in err
    assert out.read_bytes() == previous and sorted(tmp_path.iterdir()) == [out]  # no temporary
    assert main(["export", "--ckpt", str(small_ckpt), "--format", "gguf", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and out.read_bytes() != previous and sorted(tmp_path.iterdir()) == [out]


def test_an_out_ending_in_gguf_means_the_gguf_format(small_ckpt, tmp_path, capsys):
    """`export --out model.gguf` without --format writes the GGUF file (it once wrote a transformers folder of that
    name, which llama.cpp then could not open); --format hf with such a name is refused in one line."""
    out = tmp_path / "model.GGUF"
    assert main(["export", "--ckpt", str(small_ckpt), "--out", str(out)]) == 0
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF" and "llama-completion -m" in capsys.readouterr().out
    assert main(["export", "--ckpt", str(small_ckpt), "--out", str(out) + "/"]) == 0  # (tab completion's slash)
    assert out.is_file()
    code, err = run_cli(["export", "--ckpt", small_ckpt, "--format", "hf", "--out", tmp_path / "other.gguf"], capsys)
    assert code == 2 and "names a .gguf file, but --format hf writes a transformers directory" in err
    assert not (tmp_path / "other.gguf").exists()


def test_an_existing_file_that_is_not_gguf_is_never_replaced(small_ckpt, tmp_path, capsys):
    """A run's config.json, a dataset's token file, anything but an earlier GGUF file: refused in one line."""
    for name, content in (("config.json", b'{"train": {}}'), ("train.bin", b"\x01\x00" * 8), ("empty", b"")):
        path = tmp_path / name
        path.write_bytes(content)
        code, err = run_cli(["export", "--ckpt", small_ckpt, "--format", "gguf", "--out", path], capsys)
        assert code == 2 and "is not a GGUF file" in err, name
        assert path.read_bytes() == content
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    code, err = run_cli(["export", "--ckpt", small_ckpt, "--format", "gguf", "--out",
                         tmp_path / "metrics.jsonl" / "m.gguf"], capsys)
    assert code == 2 and "metrics.jsonl is a file, not a folder" in err
    assert not list(tmp_path.rglob("*.gguf*")) and not list(tmp_path.glob(".*"))


def test_a_gguf_file_of_another_program_is_never_replaced(small_ckpt, tmp_path, capsys):
    """A GGUF that tinygemma did not export (a model downloaded for llama.cpp, GBs of it) was replaced like an
    earlier export: refused in one line naming its general.name, as a damaged one is; tinygemma's own is replaced."""
    foreign = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(foreign), "llama")
    writer.add_name("Llama 3.2 1B Instruct")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + b"\xff" * 20)
    for path, named in ((foreign, "'Llama 3.2 1B Instruct'"), (damaged, "None")):
        before = path.read_bytes()
        code, err = run_cli(["export", "--ckpt", small_ckpt, "--out", path], capsys)
        assert code == 2 and f"is a GGUF file that tinygemma did not export (general.name {named})" in err, err
        assert path.read_bytes() == before
    ours = tmp_path / "ours.gguf"
    for _ in range(2):  # an earlier export of tinygemma's: replaced
        assert main(["export", "--ckpt", str(small_ckpt), "--out", str(ours)]) == 0


def test_model_llama_cpp_cannot_run_is_refused(bpe, tmp_path, capsys):
    config = ModelConfig.preset("gemma3-tiny", vocab_size=bpe.vocab_size, n_layers=1, query_pre_attn_scalar=64.0)
    save_model(Gemma3(config), tmp_path / "ckpt", {"tokenizer": bpe.save(tmp_path / "ckpt")})
    code, err = run_cli(["export", "--ckpt", tmp_path / "ckpt", "--format", "gguf", "--out", tmp_path / "m.gguf"],
                        capsys)
    assert code == 2 and "query_pre_attn_scalar 64" in err and "1/sqrt(32)" in err


@pytest.mark.parametrize("change,words", [
    (lambda s: s.update(normalizer={"type": "NFKC"}), "normalizes"),
    (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "pre-tokenizer"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer"),
    (lambda s: s["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda s: s["model"].update(type="WordPiece"), "WordPiece"),
    (lambda s: s["added_tokens"].append({"id": 512, "content": "Lily", "special": False, "lstrip": True}),
     "'Lily' sets lstrip"),
    (lambda s: s["model"].update(merges=[]), "no merges"),  # a 257-token BPE: exported, then llama.cpp refused it
], ids=["normalizer", "prefix-space", "whitespace-split", "byte-fallback", "wordpiece", "stripping-added-token",
        "no-merges"])
def test_tokenizer_llama_cpp_cannot_reproduce_is_refused(bpe, change, words):
    assert words in refused_after(check_byte_level_bpe, json.loads(bpe.hf_json()), change)


def refused_after(check, spec: dict, change) -> str:
    """The refusal that `check` makes of `spec` once `change` is made to it: it passes as it is."""
    check(spec)
    change(spec)
    with pytest.raises(UserError, match="llama.cpp cannot reproduce this tokenizer") as raised:
        check(spec)
    return str(raised.value)


def test_checkpoint_with_such_a_tokenizer_is_refused_in_one_line(bpe, tmp_path, capsys):
    spec = json.loads(bpe.hf_json())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    tokenizer = HFTokenizer(json.dumps(spec))
    config = ModelConfig.preset("gemma3-tiny", vocab_size=tokenizer.vocab_size, n_layers=1)
    save_model(Gemma3(config), tmp_path / "ckpt", {"tokenizer": tokenizer.save(tmp_path / "ckpt")})
    code, err = run_cli(["export", "--ckpt", tmp_path / "ckpt", "--format", "gguf", "--out", tmp_path / "m.gguf"],
                        capsys)
    assert code == 2 and "llama.cpp cannot reproduce this tokenizer" in err and "Whitespace" in err
    assert not (tmp_path / "m.gguf").exists()


def test_byte_level_split_without_use_regex_is_gpt2s(bpe):
    """tokenizer.json files older than the `use_regex` key (GPT-2's on the hub among them) mean it as true."""
    spec = json.loads(bpe.hf_json())
    del spec["pre_tokenizer"]["use_regex"]
    check_byte_level_bpe(spec)
    del spec["pre_tokenizer"]["add_prefix_space"]  # missing means true: a space before the text, not GPT-2's split
    with pytest.raises(UserError, match="pre-tokenizer"):
        check_byte_level_bpe(spec)


def test_special_tokens_past_the_models_rows_are_left_out(bpe, tmp_path, llama_cpp):
    """A special token past the model's rows (as Gemma 3's <image_soft_token>) is never encoded nor sampled: the
    export leaves it out, as the transformers export keeps such a tokenizer; llama.cpp reads the file."""
    spec = json.loads(bpe.hf_json())
    spec["added_tokens"].append({"id": bpe.vocab_size, "content": "<|pad|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    tokenizer = HFTokenizer(json.dumps(spec))
    assert tokenizer.model_vocab_size == bpe.vocab_size
    _, path = small_export(tokenizer, tmp_path, n_layers=1, vocab_size=bpe.vocab_size)  # 512 rows, 513 tokens
    tokens = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == bpe.vocab_size
    with open_llama(llama_cpp, path) as llm:
        assert llm.tokenize(b"Once upon a time", add_bos=False, special=False) == bpe.encode("Once upon a time")


def test_added_tokens_that_are_not_special_are_matched_in_text_by_llama_cpp_too(bpe, tmp_path, llama_cpp):
    """`tokenizer.add_tokens(["Lily"])` (special=False) makes a token matched wherever its text appears; the
    export refused it, though llama.cpp's user-defined tokens are read the same way."""
    spec = json.loads(bpe.hf_json())
    plain = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}
    spec["added_tokens"] += [{"id": bpe.vocab_size, "content": "Lily", **plain},
                             {"id": bpe.vocab_size + 1, "content": "[CLS]", **plain}]
    tokenizer = HFTokenizer(json.dumps(spec))
    _, path = small_export(tokenizer, tmp_path, n_layers=1, vocab_size=bpe.vocab_size + 2)
    texts = ["Lily went home.", "Lilypad aLily LilyLily", " Lily's [CLS][CLS] day", *ODD_TEXT]
    assert bpe.vocab_size in tokenizer.encode(texts[0]) and bpe.vocab_size + 1 in tokenizer.encode(texts[2])
    with open_llama(llama_cpp, path, vocab_only=True) as llm:
        for text in texts:
            ids = tokenizer.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
            assert llm.detokenize(ids).decode() == tokenizer.decode(ids) == text


@pytest.mark.parametrize("added, words", [
    ([("Lily", True), ("lyons", True)], "'Lily' and 'lyons' overlap"),  # "Lilyons": Lily+ons, or Li+lyons
    ([("Zorbax", True), ("bax", False)], "'bax', unnormalized, is matched inside 'Zorbax'"),
    ([("Zoë", True)], "'Zoë' decodes as 'Zo\ufffd'"),  # ë as one byte: printed otherwise than llama.cpp's
])
def test_added_tokens_llama_cpp_would_match_or_print_otherwise_are_refused(bpe, added, words):
    spec = json.loads(bpe.hf_json())
    plain = {"single_word": False, "lstrip": False, "rstrip": False, "special": False}
    spec["added_tokens"] += [{"id": bpe.vocab_size + i, "content": text, "normalized": normalized, **plain}
                             for i, (text, normalized) in enumerate(added)]
    with pytest.raises(UserError, match="llama.cpp cannot reproduce this tokenizer") as raised:
        check_byte_level_bpe(spec)
    assert words in str(raised.value)
    # Matched alike (checked through llama.cpp on every short text of their letters): a plain prefix, a longer
    # token ending as a shorter one starts, unnormalized and normalized tokens neither inside the other
    own = spec["added_tokens"][:-len(added)]
    for pair in ((("Tim", True), ("Timmy", True)), (("Lilyo", True), ("yon", True)), (("Lily", True), ("Tom", False))):
        spec["added_tokens"] = own + [{"id": bpe.vocab_size + i, "content": text, "normalized": normalized, **plain}
                                      for i, (text, normalized) in enumerate(pair)]
        check_byte_level_bpe(spec)


def test_a_killed_exports_temporary_is_removed(small_ckpt, tmp_path, capsys):
    """A SIGKILL between writing and renaming leaves `.NAME.xxxxxxxx.tmp`, as large as the file: the next export
    of that name removes it; another file's temporary stays."""
    out = tmp_path / "m.gguf"
    (tmp_path / ".m.gguf.42c403a6.tmp").write_bytes(b"GGUF half")
    (tmp_path / ".other.gguf.42c403a6.tmp").write_bytes(b"GGUF someone else's")
    assert main(["export", "--ckpt", str(small_ckpt), "--format", "gguf", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.gguf.42c403a6.tmp", "m.gguf"]


def test_the_printed_llama_command_runs_as_pasted(small_ckpt, tmp_path, capsys):
    """The command the export prints quotes a path with a space (`-m my demo.gguf` loaded a file named my)."""
    import shlex

    out = tmp_path / "my demo.gguf"
    assert main(["export", "--ckpt", str(small_ckpt), "--format", "gguf", "--out", str(out)]) == 0
    command = capsys.readouterr().out.split("run it with: ", 1)[1]
    assert shlex.split(command)[:3] == ["llama-completion", "-m", str(out)]


def test_q8_0_rows_that_are_not_blocks_are_said_to_fall_back(bpe, tmp_path, capsys):
    """q8_0 packs rows in blocks of 32: a 40-wide model's matrices are written as f16, and the export says so."""
    config = ModelConfig.preset("gemma3-tiny", vocab_size=bpe.vocab_size, n_layers=1, d_model=40)
    save_model(Gemma3(config), tmp_path / "ckpt", {"tokenizer": bpe.save(tmp_path / "ckpt")})
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    err = capsys.readouterr().err
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    as_f16 = sorted(name for name, kind in types.items() if kind == "F16")
    assert "token_embd.weight" in as_f16 and "Q8_0" in types.values()  # 40-wide rows fall back; 128-wide do not
    assert f"note: {len(as_f16)} matrices have rows" in err
    assert export_gguf(tmp_path / "ckpt", tmp_path / "f16.gguf", "f16")["matrices_as_f16"] == 0
    # 96 values a row are three blocks of 32 (not a multiple of 64): q8_0 throughout.
    wide = ModelConfig.preset("gemma3-tiny", vocab_size=bpe.vocab_size, n_layers=1, d_model=96, mlp_dim=160)
    save_model(Gemma3(wide), tmp_path / "ckpt96", {"tokenizer": bpe.save(tmp_path / "ckpt96")})
    assert export_gguf(tmp_path / "ckpt96", tmp_path / "q96.gguf", "q8_0")["matrices_as_f16"] == 0
    # The hf export's names of the types are taken too (--dtype float16 was "unknown --dtype 'float16' for gguf")
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "float16.gguf"), "--dtype",
                 "float16"]) == 0
    assert (tmp_path / "float16.gguf").read_bytes() == (tmp_path / "f16.gguf").read_bytes()
    assert export_gguf(tmp_path / "ckpt", tmp_path / "b.gguf", "bfloat16")["dtype"] == "bf16"


def test_f16_refuses_weights_past_its_range_and_keeps_the_old_file(bpe, tmp_path, capsys):
    """f16 (and q8_0's f16 fall-back) would write a weight past 65,504 as inf: refused in one line, naming it,
    with the file already there kept; bf16 takes it."""
    config = ModelConfig.preset("gemma3-tiny", vocab_size=bpe.vocab_size, n_layers=1, d_model=40)
    model = Gemma3(config)
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = 70_000.0
    save_model(model, tmp_path / "ckpt", {"tokenizer": bpe.save(tmp_path / "ckpt")})
    assert export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "bf16")["dtype"] == "bf16"  # (bf16 takes it)
    earlier = (tmp_path / "m.gguf").read_bytes()
    for dtype in ("f16", "q8_0"):  # (40-wide rows: q8_0 falls back to f16)
        assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
                     "--dtype", dtype]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "layers.0.mlp.up_proj.weight" in err, err
        assert "65,504" in err and (tmp_path / "m.gguf").read_bytes() == earlier


def test_a_chat_with_a_bos_tokenizers_gguf_starts_with_bos(bpe, tmp_path, llama_cpp):
    """A tokenizer whose post-processor starts a text with <bos> (Gemma's): a completion prompt gets it from
    llama.cpp (add_bos), and a chat through the file's template gets it from the template, which llama-cpp-python
    renders and tokenizes without adding one (llama.cpp's server takes off a leading one it adds itself). The
    chat began without <bos>, which the model never read."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    spec, bos = json.loads(bpe.hf_json()), bpe.vocab_size
    spec["added_tokens"].append({"id": bos, "content": "<bos>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [bos], "tokens": ["<bos>"]}},
    }
    tokenizer = HFTokenizer(json.dumps(spec))
    assert tokenizer.prompt_prefix == (bos,)
    _, path = small_export(tokenizer, tmp_path, n_layers=1, vocab_size=bos + 1)
    text = "Once upon a time"
    with open_llama(llama_cpp, path, vocab_only=True) as llm:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == [bos, *tokenizer.encode(text)]
        formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], bos_token="<bos>",
                                        eos_token=EOT_TOKEN)  # as llama-cpp-python makes it from the file
        chat = formatter(messages=[{"role": "user", "content": text}])
        ids = llm.tokenize(chat.prompt.encode(), add_bos=not chat.added_special, special=True)
    assert ids == [bos, *tokenizer.encode(text)]


def test_a_tokenizer_with_two_tokens_before_a_text_is_refused(bpe, tmp_path, capsys):
    """llama.cpp adds at most one token (<bos>) before a prompt: a post-processor adding two would be read
    otherwise there than by tinygemma generate."""
    spec = json.loads(bpe.hf_json())
    extra = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    spec["added_tokens"] += [{"id": 512, "content": "<a>", **extra}, {"id": 513, "content": "<b>", **extra}]
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": name, "type_id": 0}} for name in ("<a>", "<b>")]
        + [{"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {name: {"id": name, "ids": [i], "tokens": [name]} for name, i in (("<a>", 512), ("<b>", 513))},
    }
    tokenizer = HFTokenizer(json.dumps(spec))
    assert tokenizer.prompt_prefix == (512, 513)
    config = ModelConfig.preset("gemma3-tiny", vocab_size=514, n_layers=1)
    save_model(Gemma3(config), tmp_path / "ckpt", {"tokenizer": tokenizer.save(tmp_path / "ckpt")})
    code, err = run_cli(["export", "--ckpt", tmp_path / "ckpt", "--format", "gguf", "--out", tmp_path / "m.gguf"],
                        capsys)
    assert code == 2 and "2 tokens before every text" in err and not (tmp_path / "m.gguf").exists()


def test_llama_cpps_builtin_template_matcher_does_not_know_the_story_template(llama_cpp):
    """What README.md says of `--no-jinja`: libllama's own matcher does not recognize the pass-through template
    (llama.cpp then falls back to ChatML); the Jinja path, which the tests' chat checks use, does."""
    import ctypes

    from tinygemma.tokenizer import CHAT_TEMPLATE

    messages = (llama_cpp.llama_chat_message * 1)()
    messages[0].role, messages[0].content = b"user", b"Once upon a time"
    buffer = ctypes.create_string_buffer(1024)
    assert llama_cpp.llama_chat_apply_template(CHAT_TEMPLATE.encode(), messages, 1, True, buffer, 1024) < 0
    chatml = b"{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    assert llama_cpp.llama_chat_apply_template(chatml, messages, 1, True, buffer, 1024) > 0  # the call itself works


def test_gguf_dtypes_are_taken_in_any_case():
    from tinygemma.gguf_export import gguf_dtype

    assert [gguf_dtype(name) for name in ("Q8_0", "q8_0", "F16", "BF16", "f32")] == ["q8_0", "q8_0", "f16", "bf16",
                                                                                  "f32"]


# ------------------------------------------------------------------ mutation round 15

def test_llama_cpp_refusal_knows_27bs_scale_and_the_layer_limit():
    """llama.cpp scales a 62-layer gemma3's queries by 1/sqrt(d_model / n_heads) (kills G12: head_dim always),
    and takes at most 512 layers (kills G13: the limit off by one)."""
    from tinygemma.config import ModelConfig
    from tinygemma.gguf_export import llama_cpp_refusal

    like_27b = dict(n_layers=62, d_model=5376, n_heads=32, n_kv_heads=16, head_dim=128, vocab_size=512, mlp_dim=64)
    assert "1/sqrt(168)" in llama_cpp_refusal(ModelConfig(**like_27b, query_pre_attn_scalar=128.0))
    assert llama_cpp_refusal(ModelConfig(**like_27b, query_pre_attn_scalar=168.0)) is None
    deep = dict(vocab_size=512, d_model=64, n_heads=4, head_dim=16, query_pre_attn_scalar=16.0, mlp_dim=64)
    assert llama_cpp_refusal(ModelConfig(n_layers=512, **deep)) is None
    assert "513 layers" in llama_cpp_refusal(ModelConfig(n_layers=513, **deep))


def test_gemma_layout_needs_gemmas_local_rope_base():
    """Older llama.cpp builds assume a sliding RoPE base of 10,000 (kills G14: the base not checked)."""
    from tinygemma.config import ModelConfig
    from tinygemma.gguf_export import has_gemma_layout

    assert has_gemma_layout(ModelConfig(n_layers=6))
    assert not has_gemma_layout(ModelConfig(n_layers=6, rope_local_base=777.0))


def test_the_gguf_records_every_hyperparameter_as_the_model_has_it(bpe, tmp_path):
    """Every hyper-parameter llama.cpp reads, read back from the file, with values that differ from llama.cpp's
    defaults (kills G05: rms_norm_eps written as 1e-6; G03: no key_length, which llama.cpp then takes as
    d_model / n_heads, 16 here; and any other key written from the wrong field)."""
    import gguf

    model, path = small_export(bpe, tmp_path, n_layers=3, head_dim=32, query_pre_attn_scalar=32, rms_norm_eps=1e-5,
                               sliding_window_pattern=3, rope_local_base=777.0, rope_global_base=99_999.0)
    reader = gguf.GGUFReader(path)

    def value(key):
        field = reader.fields[f"gemma3.{key}"]
        return [v.item() for part in (field.parts[i] for i in field.data) for v in part]

    c = model.config
    assert value("context_length") == [c.max_position_embeddings] and value("block_count") == [3]
    assert value("embedding_length") == [c.d_model] and value("feed_forward_length") == [c.mlp_dim]
    assert value("attention.head_count") == [c.n_heads] and value("attention.head_count_kv") == [c.n_kv_heads]
    assert value("attention.key_length") == value("attention.value_length") == [32]
    assert abs(value("attention.layer_norm_rms_epsilon")[0] - 1e-5) < 1e-10
    assert value("attention.sliding_window") == [c.sliding_window]
    assert value("rope.freq_base") == [99_999.0] and value("rope.freq_base_swa") == [777.0]
    assert value("attention.sliding_window_pattern") == [t == SLIDING for t in c.layer_types] == [True, True, False]


@pytest.mark.parametrize("change,words", [
    (lambda s: s.update(decoder={"type": "BPEDecoder", "suffix": "</w>"}), "decoder is not byte-level"),
    (lambda s: s.update(decoder=None), "decoder is not byte-level"),
    (lambda s: s["model"].update(ignore_merges=True), "ignore_merges"),
], ids=["bpe-decoder", "no-decoder", "ignore-merges"])
def test_tokenizers_llama_cpp_would_decode_or_merge_otherwise_are_refused(bpe, change, words):
    """A tokenizer.json decoded otherwise than byte-level or whose BPE
    takes whole words from the vocabulary before merging: llama.cpp's
    gpt2 BPE would print or split its text otherwise."""
    spec = json.loads(bpe.hf_json())
    change(spec)
    with pytest.raises(UserError, match="llama.cpp cannot reproduce this tokenizer") as raised:
        check_byte_level_bpe(spec)
    assert words in str(raised.value)


def test_a_vocabulary_without_every_bytes_character_is_refused(bpe):
    """A BPE trained without the whole byte alphabet drops text with the missing bytes, where llama.cpp splits
    around them."""
    spec = json.loads(bpe.hf_json())
    byte_char = "\u0100"  # GPT-2's byte-level character for byte 0, in every byte-level vocabulary
    assert byte_char in spec["model"]["vocab"]
    del spec["model"]["vocab"][byte_char]
    spec["model"]["merges"] = [m for m in spec["model"]["merges"]
                               if byte_char not in (m if isinstance(m, str) else " ".join(m))]
    with pytest.raises(UserError, match="of the 256 bytes' characters"):
        check_byte_level_bpe(spec)


@pytest.mark.parametrize("added, words", [
    ([("Lily", True, {"single_word": True})], "'Lily' sets single_word"),
    ([("Lily", True, {}), ("lyon", True, {})], "'Lily' and 'lyon' overlap"),  # same length
    ([("Tom", True, {}), ("mask", True, {})], "'Tom' and 'mask' overlap"),  # one letter
], ids=["single-word", "same-length-overlap", "one-letter-overlap"])
def test_more_added_tokens_llama_cpp_would_match_otherwise_are_refused(bpe, added, words):
    """llama.cpp reads no single_word; it matches the longer of two overlapping tokens first, and either of two
    as long ("Lilyon": Lily+on or Li+lyon), and an overlap of one letter is one ("Tomask": Tom+ask or To+mask)."""
    spec = json.loads(bpe.hf_json())
    plain = {"single_word": False, "lstrip": False, "rstrip": False, "special": False}
    spec["added_tokens"] += [{"id": bpe.vocab_size + i, "content": text, "normalized": normalized, **plain, **extra}
                             for i, (text, normalized, extra) in enumerate(added)]
    with pytest.raises(UserError, match="llama.cpp cannot reproduce this tokenizer") as raised:
        check_byte_level_bpe(spec)
    assert words in str(raised.value)


def test_ids_the_tokenizer_lacks_are_unused_fillers(bpe, tmp_path):
    """A model with more rows than the tokenizer has ids: the rows past it are llama.cpp's UNUSED tokens (never
    printed), the tokenizer's own NORMAL or CONTROL."""
    _, path = small_export(bpe, tmp_path, n_layers=1, vocab_size=bpe.vocab_size + 3)
    reader = gguf.GGUFReader(path)
    field = reader.fields["tokenizer.ggml.token_type"]
    types = [int(field.parts[i][0]) for i in field.data]
    assert types[bpe.vocab_size:] == [int(gguf.TokenType.UNUSED)] * 3
    assert types[bpe.eot_id] == int(gguf.TokenType.CONTROL) and types[bpe.vocab_size - 1] == int(gguf.TokenType.NORMAL)


def test_q8_0_rows_of_a_half_block_fall_back_too(bpe, tmp_path):
    """A 48-wide model: 48 is a multiple of 16 but not of q8_0's 32-value blocks, so its matrices fall back to
    f16."""
    _, path = small_export(bpe, tmp_path, dtype="q8_0", n_layers=1, d_model=48, n_heads=3, n_kv_heads=1)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"


def test_an_export_whose_sliding_layers_differ_from_gemmas_says_older_builds_assume_them(bpe, tmp_path, capsys):
    """A model whose local RoPE base is not Gemma 3's exports with a note on stderr; Gemma 3's own layout with none."""
    for name, overrides in (("gemma", {}), ("other", {"rope_local_base": 777.0})):
        config = ModelConfig.preset("gemma3-tiny", vocab_size=bpe.vocab_size, d_model=32, head_dim=16,
                                    query_pre_attn_scalar=16, mlp_dim=64, n_heads=2, sliding_window=16, **overrides)
        save_model(Gemma3(config), tmp_path / name, {"tokenizer": bpe.save(tmp_path / name)})
        assert main(["export", "--ckpt", str(tmp_path / name), "--out", str(tmp_path / f"{name}.gguf")]) == 0
        out, err = capsys.readouterr()
        assert "llama-completion -m" in out
        assert ("older llama.cpp builds and Ollama assume Gemma 3's" in err) is bool(overrides), err


def test_a_half_precision_hf_export_exports_to_gguf_as_its_checkpoint_does(tmp_path, stories_dir):
    """`export --dtype bf16` / `--dtype float16` folders (as google/gemma-3-270m is published) export to GGUF:
    their weights are read as float32 first (numpy has no bfloat16; float16 data tagged F32 is not F32), and give
    the tensors the checkpoint itself gives in that dtype."""
    bpe = train_bpe(read_stories(stories_dir / "train.txt", 400), vocab_size=512)
    small_export(bpe, tmp_path, n_layers=1)
    ckpt = tmp_path / "ckpt"
    for hf_dtype, gguf_dtype in (("bf16", "bf16"), ("float16", "f16")):
        assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / hf_dtype), "--dtype", hf_dtype]) == 0
        files = [export_gguf(src, tmp_path / f"{name}-{hf_dtype}.gguf", gguf_dtype)["path"]
                 for name, src in (("ckpt", ckpt), ("hf", tmp_path / hf_dtype))]
        readers = [gguf.GGUFReader(path) for path in files]
        kinds = [{x.name: x.tensor_type.name for x in r.tensors} for r in readers]
        assert kinds[0] == kinds[1]
        tensors = [{x.name: np.asarray(x.data) for x in r.tensors} for r in readers]
        assert tensors[0].keys() == tensors[1].keys()
        # matrices: the same rounding either way; norm gains (float32 1 + w): w as rounded to the half dtype
        differ = [name for name in tensors[0] if not np.array_equal(tensors[0][name], tensors[1][name])]
        assert all(name.endswith("norm.weight") for name in differ), differ
        assert all(np.allclose(tensors[0][name], tensors[1][name], rtol=1e-2, atol=1e-2) for name in differ)


def test_bpe_options_llama_cpp_does_not_read_are_refused(stories_dir):
    """BPE-dropout (merges skipped at random as text is encoded) and WordPiece-style sub-word markers change how
    tokenizers splits or decodes text; llama.cpp's gpt2 BPE reads none of them."""
    bpe = train_bpe(read_stories(stories_dir / "train.txt", 400), vocab_size=512)
    check_byte_level_bpe(json.loads(bpe.hf_json()))  # as it is: exported
    for option, value in (("dropout", 0.1), ("continuing_subword_prefix", "##"), ("end_of_word_suffix", "</w>")):
        spec = json.loads(bpe.hf_json())
        spec["model"][option] = value
        with pytest.raises(UserError, match="llama.cpp cannot reproduce this tokenizer") as raised:
            check_byte_level_bpe(spec)
        assert f"its BPE sets {option}" in str(raised.value)


def test_an_added_token_that_strips_on_its_right_is_refused(stories_dir):
    """An added token with rstrip swallows the spaces after it in tokenizers; llama.cpp reads no such option."""
    bpe = train_bpe(read_stories(stories_dir / "train.txt", 400), vocab_size=512)
    spec = json.loads(bpe.hf_json())
    plain = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}
    spec["added_tokens"].append({"id": bpe.vocab_size, "content": "Lily", **plain})
    check_byte_level_bpe(spec)  # without the option: exported
    spec["added_tokens"][-1]["rstrip"] = True
    with pytest.raises(UserError, match="'Lily' sets rstrip"):
        check_byte_level_bpe(spec)


def test_a_vocabulary_with_an_empty_token_is_refused(stories_dir):
    """llama.cpp finds tokens by their text: a token of no text at all is refused, as two of the same text are."""
    bpe = train_bpe(read_stories(stories_dir / "train.txt", 400), vocab_size=512)
    spec = json.loads(bpe.hf_json())
    tokens, _, _ = llama_cpp_vocabulary(spec, bpe.vocab_size)  # as it is: every token has a text
    assert all(tokens)
    spec["model"]["vocab"][""] = bpe.vocab_size
    with pytest.raises(UserError, match="llama.cpp cannot reproduce this tokenizer.*are both ''"):
        llama_cpp_vocabulary(spec, bpe.vocab_size + 1)


def added_token(token_id: int, content: str, special: bool) -> dict:
    """An added token as tokenizer.json writes one, matched as llama.cpp matches it (no word or strip rules)."""
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": True, "special": special}


def test_a_special_token_just_past_the_models_rows_is_left_out_of_the_vocabulary(bpe):
    spec = json.loads(bpe.hf_json())
    spec["added_tokens"].append(added_token(bpe.vocab_size, "<image_soft_token>", special=True))
    tokens, types, _ = llama_cpp_vocabulary(spec, bpe.vocab_size)
    assert len(tokens) == len(types) == bpe.vocab_size and "<image_soft_token>" not in tokens
    with pytest.raises(UserError, match="do not belong together"):  # a tokenizer one id larger than the model
        llama_cpp_vocabulary(json.loads(bpe.hf_json()), bpe.vocab_size - 1)


def test_plain_added_tokens_are_user_defined_and_special_ones_control(bpe):
    """llama.cpp matches a USER_DEFINED token in text; a CONTROL one never."""
    spec = json.loads(bpe.hf_json())
    spec["added_tokens"].append(added_token(bpe.vocab_size, "Lily", special=False))
    _, types, _ = llama_cpp_vocabulary(spec, bpe.vocab_size + 1)
    assert types[bpe.vocab_size] == int(gguf.TokenType.USER_DEFINED)
    assert types[bpe.eot_id] == int(gguf.TokenType.CONTROL)


def test_merges_are_written_in_priority_order_as_left_space_right(bpe):
    spec = json.loads(bpe.hf_json())
    _, _, merges = llama_cpp_vocabulary(spec, bpe.vocab_size)
    expected = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert merges == expected and len(merges) > 0


def test_norm_gains_are_written_as_one_plus_w(small_ckpt):
    """Gemma's norms scale by 1 + w; llama.cpp's by the tensor as it is: the file holds 1 + w (small_export drew
    the gains away from zero)."""
    tokenizer = checkpoint_tokenizer(small_ckpt)
    model = load_model(small_ckpt, tokenizer, "float32", "cpu")
    tensors = {t.name: t.data for t in gguf.GGUFReader(small_ckpt.parent / "model.gguf").tensors}
    assert np.allclose(tensors["output_norm.weight"], model.norm.weight.detach().numpy() + 1.0)
    assert np.allclose(tensors["blk.0.attn_q_norm.weight"], model.layers[0].self_attn.q_norm.weight.detach().numpy() + 1.0)


def test_a_merge_whose_token_holds_a_space_is_refused():
    """llama.cpp splits each merge at its first space: a hand-made tokenizer.json's merge of "a b" and "c" would
    be read back as "a" and "b c". Refused in one line, not written."""
    spec = json.loads(train_bpe(["Once upon a time there was a cat."] * 4, 300).hf_json())
    vocab = spec["model"]["vocab"]
    for token in ("a b", "c", "a bc"):
        vocab.setdefault(token, len(vocab))
    spec["model"]["merges"] = [*spec["model"]["merges"], ["a b", "c"]]
    with pytest.raises(UserError, match="its merge .* holds a space, which llama.cpp reads as the separator"):
        llama_cpp_vocabulary(spec, len(vocab))
