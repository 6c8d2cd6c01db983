"""GGUF export: a checkpoint as one file that llama.cpp runs (llama-cli, llama-server, LM Studio, ...).

The file is written with `gguf`, ggml's own Python writer (`pip install "tinygemma[gguf]"`), and holds Gemma 3 the
way llama.cpp's `gemma3` architecture reads it (src/models/gemma3.cpp, src/llama-vocab.cpp):
- the hyper-parameters under llama.cpp's keys: the sliding window, which layers slide (one flag per layer: the
  5-in-6 pattern or any other), the RoPE base of the global layers and that of the sliding ones;
- the weights under llama.cpp's tensor names (gguf's own name map), RMSNorm gains stored as 1 + w (llama.cpp
  multiplies by the stored gain), the vocabulary without its padding rows, the head only when it is not tied;
- the tokenizer as llama.cpp's byte-level BPE ("gpt2") with its merges and GPT-2's pre-tokenizer, or a
  SentencePiece BPE with byte fallback as its SentencePiece tokenizer ("llama"), each piece scored by its first
  merge; end-of-text as the end-of-generation token, and nothing put in front of a prompt but the tokenizer's
  <bos> where it starts every text with one (GPT-2's and prepare's BPEs have none).
What llama.cpp cannot reproduce is refused in one line: its gemma3 graph scales queries by 1/sqrt(head_dim) and
reads no query_pre_attn_scalar, and its tokenizers split text only in the ways they name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from tinygemma.checkpoint import checkpoint_tokenizer, load, resolve_checkpoint
from tinygemma.config import DEFAULT_GGUF_DTYPE, GGUF_DTYPES, SLIDING, ModelConfig
from tinygemma.devices import parse_dtype
from tinygemma.errors import UserError
from tinygemma.files import (
    atomic_path,
    check_output_path,
    is_gguf_file,
    made_folders,
    remove_temporaries,
    write_errors,
)
from tinygemma.hf import hf_state
from tinygemma.model import check_tokenizer_fits
from tinygemma.tokenizer import Tokenizer, missing_bytes, splits_as_gpt2

# GGUF_DTYPES (--dtype's) by the names the hf export takes (devices.parse_dtype's: float16, half, BF16, ...)
GGUF_OF_TORCH = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

ARCH = "gemma3"
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's split regex, which our byte-level BPEs use
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
# SentencePiece BPEs as transformers converts them: spaces read as "▁", and decoded back, byte pieces as bytes.
# Gemma's puts no "▁" before a text; Llama 2's (and Mistral's) puts one there (llama.cpp's add_space_prefix), by a
# Metaspace pre-tokenizer (transformers 5) or a Prepend normalizer (transformers 4), and strips it in decoding.
PIECE = "\u2581"
SPACE_TO_PIECE = {"type": "Replace", "pattern": {"String": " "}, "content": PIECE}
PREPEND_PIECE = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": PIECE}, SPACE_TO_PIECE]}
PIECE_DECODERS = [{"type": "Replace", "pattern": {"String": PIECE}, "content": " "}, {"type": "ByteFallback"},
                  {"type": "Fuse"}]
STRIP_PREFIX = {"type": "Strip", "content": " ", "start": 1, "stop": 0}


def gguf_dtype(name: str) -> str:
    """--dtype as a GGUF_DTYPES key: f32, f16, bf16, q8_0 (in any case), or a name the hf export takes for one of
    the first three; anything else as it is (refused by check_gguf_arguments)."""
    if not isinstance(name, str) or name.lower() in GGUF_DTYPES:
        return name.lower() if isinstance(name, str) else name
    try:
        return GGUF_OF_TORCH[parse_dtype(name)]
    except UserError:
        return name


NAME_PREFIX = "tinygemma "  # every export's general.name starts so: what an export may replace


def check_gguf_arguments(out: str | Path, dtype: str) -> Path:
    """The output file, after checking what needs no model: the dtype, a place to write it (its folder is made if
    need be, as the Hugging Face export makes its own), and that the file is new or an earlier GGUF file (never a
    run's config.json or a dataset's token file)."""
    if gguf_dtype(dtype) not in GGUF_DTYPES:
        raise UserError(f"unknown --dtype {dtype!r} for gguf; choose {', '.join(GGUF_DTYPES)}")
    out = check_output_path(out)
    if out.is_symlink():  # the file it links to is the one written (renamed over, the link would become a file)
        out = check_output_path(Path(os.path.realpath(out)))
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the .gguf file to write")
    if out.exists() and not is_gguf_file(out):
        raise UserError(f"--out {out} exists and is not a GGUF file; an export replaces only an earlier .gguf: "
                        "choose a new file name")
    name = gguf_name(out) if out.exists() else None
    if out.exists() and not (name or "").startswith(NAME_PREFIX):  # (a model downloaded: GBs gone)
        raise UserError(f"--out {out} is a GGUF file that tinygemma did not export (general.name {name!r}); an "
                        "export replaces only an earlier export of tinygemma's: choose a new file name")
    return out


def gguf_name(path: Path) -> str | None:
    """A GGUF file's general.name (None where it has none, or cannot be read as GGUF)."""
    try:
        field = gguf_module().GGUFReader(path).fields.get("general.name")
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace") if field is not None else None
    except UserError:
        raise
    except Exception:  # a damaged file: no name of ours
        return None


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise UserError('the GGUF export needs the gguf package: pip install "tinygemma[gguf]"') from None
    return gguf


def attention_scale_dim(config: ModelConfig) -> int:
    """What llama.cpp's gemma3 scales queries by (1/sqrt of it): d_model / n_heads in 62-layer models (Gemma 3
    27B, as Gemma's reference code), head_dim in every other; it reads no query_pre_attn_scalar."""
    return config.d_model // config.n_heads if config.n_layers == 62 else config.head_dim


def llama_cpp_refusal(config: ModelConfig) -> str | None:
    """Why llama.cpp's gemma3 would compute this model differently (None: it would not)."""
    scale_dim = attention_scale_dim(config)
    if config.query_pre_attn_scalar != scale_dim:
        return (f"llama.cpp cannot run this model: it has query_pre_attn_scalar {config.query_pre_attn_scalar:g}, "
                f"but llama.cpp's gemma3 reads no such setting and scales queries by 1/sqrt({scale_dim}) for a "
                f"model of {config.n_layers} layers")
    if config.n_layers > MAX_LAYERS:
        return f"llama.cpp cannot run this model: it has {config.n_layers} layers, llama.cpp at most {MAX_LAYERS}"
    return None


def check_llama_cpp_model(config: ModelConfig) -> None:
    """Refuse a model that llama.cpp's gemma3 would compute differently."""
    why = llama_cpp_refusal(config)
    if why:
        raise UserError(why)


# ------------------------------------------------------------------ the tokenizer as llama.cpp's BPE


def _refuse(why: str):
    raise UserError(f"llama.cpp cannot reproduce this tokenizer: {why}; the GGUF export carries byte-level BPE "
                    "tokenizers with GPT-2's split (GPT-2's own, one trained by `tinygemma prepare`, or such a "
                    "tokenizer.json) and SentencePiece BPEs as transformers converts Gemma's")


def sentencepiece_prefix(spec: dict) -> bool | None:
    """Whether a tokenizer.json that reads spaces as SentencePiece's "▁" puts one before a text (Llama 2's layout:
    True; Gemma's: False), as llama.cpp's SentencePiece tokenizer ("llama") takes it; None where it reads spaces
    otherwise: a byte-level BPE's layout, or none llama.cpp has."""
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer") or {}
    if normalizer == SPACE_TO_PIECE:
        return False
    if normalizer == PREPEND_PIECE or (normalizer is None and pre.get("type") == "Metaspace"):
        return True
    return None


def check_llama_cpp_tokenizer(spec: dict) -> str:
    """Refuse a tokenizer.json that llama.cpp would split otherwise; else its llama.cpp tokenizer model's name."""
    if sentencepiece_prefix(spec) is not None:
        check_sentencepiece_bpe(spec)
        return "llama"
    check_byte_level_bpe(spec)
    return "gpt2"


def model_name(src: Path) -> str:
    """general.name (what LM Studio and llama.cpp's server show): a run's checkpoint by its run's folder and step
    ("tinygemma my-run step_000030"; the step folder alone named every run alike), else the folder's name."""
    src = src.resolve()
    return (f"{NAME_PREFIX}{src.parent.parent.name} {src.name}" if src.parent.name == "checkpoints"
            else f"{NAME_PREFIX}{src.name}")


def check_byte_level_bpe(spec: dict) -> None:
    """Refuse a tokenizer.json that llama.cpp's "gpt2" BPE with the "gpt-2" pre-tokenizer would split otherwise."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        _refuse(f"it is a {model.get('type')} model, not BPE")
    if spec.get("normalizer"):
        _refuse(f"it normalizes text first ({spec['normalizer'].get('type')})")
    if not splits_as_gpt2(spec):  # (its normalizer refused above)
        _refuse(f"its pre-tokenizer is {json.dumps(spec.get('pre_tokenizer'))[:120]}, not GPT-2's byte-level split")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        _refuse("its decoder is not byte-level")
    for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback", "ignore_merges"):
        if model.get(option):
            _refuse(f"its BPE sets {option}")
    lacking = missing_bytes(spec)
    if lacking:  # its encoder drops text with those bytes; llama.cpp would split around them otherwise
        _refuse(f"its vocabulary lacks {lacking} of the 256 bytes' characters (a BPE trained without the whole byte "
                "alphabet: tokenizers' BpeTrainer needs initial_alphabet=pre_tokenizers.ByteLevel.alphabet())")
    if not model.get("merges"):  # gguf writes no empty list, and llama.cpp refuses a file without the key
        _refuse("its BPE has no merges (a vocabulary of single bytes, such as a BPE of 257 tokens), and llama.cpp "
                "loads none without them; prepare with --vocab-size 258 or more")
    check_plain_added_tokens(spec, [added for added in spec.get("added_tokens") or [] if not added.get("special")])


def check_plain_added_tokens(spec: dict, plain: list[dict]) -> None:
    """Refuse non-special added tokens (matched wherever their text appears; a special token's spelling in text is
    text to tinygemma) that llama.cpp's user-defined tokens would match or print otherwise: it reads no strip or
    single-word option; it matches the longest token first across the whole text where tokenizers takes the
    leftmost (one token ending as another, at least as long, starts: "Lily" and "lyons" in "Lilyons"); it matches
    all in one pass where tokenizers matches the unnormalized ones first ("bax" inside "Zorbax"); and it prints a
    token's text where tinygemma decodes it byte by byte ("Zoë")."""
    for added in plain:
        option = next((o for o in ("single_word", "lstrip", "rstrip") if added.get(o)), None)
        if option:
            _refuse(f"its added token {added['content']!r} sets {option}, which llama.cpp does not read")
    unnormalized = [added["content"] for added in plain if not added.get("normalized", True)]
    for inner in unnormalized:  # matched before the normalized ones, even inside one
        if outer := next((a["content"] for a in plain if a.get("normalized", True) and inner in a["content"]), None):
            _refuse(f"its added token {inner!r}, unnormalized, is matched inside {outer!r} before it, where llama.cpp "
                    f"matches {outer!r}")
    texts = [added["content"] for added in plain]
    for a in texts:  # a starting first, b after it: the leftmost is a, llama.cpp's longest b (a tie: either)
        for b in texts:
            if a != b and len(b) >= len(a) and any(a.endswith(b[:n]) for n in range(1, len(a))):
                _refuse(f"its added tokens {a!r} and {b!r} overlap ({a!r} ends as {b!r} starts), and llama.cpp "
                        "matches the longer first where tinygemma matches the leftmost")
    if plain:
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_str(json.dumps(spec))  # (tinygemma's decode: no end-of-text needed here)
        for added in plain:
            if (decoded := backend.decode([added["id"]], skip_special_tokens=False)) != added["content"]:
                _refuse(f"its added token {added['content']!r} decodes as {decoded!r} in tinygemma, as its own text "
                        "in llama.cpp")


def check_sentencepiece_bpe(spec: dict) -> None:
    """Refuse a SentencePiece-style tokenizer.json that llama.cpp's "llama" tokenizer would split or decode
    otherwise: it merges any two neighbouring pieces that form a token, the highest score first, and spells what
    no piece holds as <0xHH> bytes; tokenizers merges only the pairs its list holds, the first listed first."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        _refuse(f"it is a SentencePiece {model.get('type')} model, not BPE")
    if not model.get("byte_fallback"):
        _refuse("its SentencePiece BPE has no byte fallback")
    for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges"):
        if model.get(option):
            _refuse(f"its BPE sets {option}")
    pre = spec.get("pre_tokenizer")
    if spec.get("normalizer"):  # none, or a split at " ", which finds none after the normalizer (transformers 5's)
        fits = pre is None or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}
                               and not pre.get("invert"))
    else:  # a Metaspace that puts "▁" before the text alone, as llama.cpp does, not before each word
        fits = (pre.get("replacement") == PIECE and pre.get("split") is False
                and pre.get("prepend_scheme") in ("first", "always"))
    if not fits:
        _refuse(f"its pre-tokenizer is {json.dumps(pre)[:120]}, not SentencePiece's")
    decoders = [*PIECE_DECODERS, STRIP_PREFIX] if sentencepiece_prefix(spec) else PIECE_DECODERS
    if spec.get("decoder") != {"type": "Sequence", "decoders": decoders}:
        _refuse(f"its decoder is {json.dumps(spec.get('decoder'))[:120]}, not SentencePiece's")
    vocab = model.get("vocab") or {}
    if lacking := [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]:
        _refuse(f"its vocabulary lacks {len(lacking)} of the 256 byte pieces ({lacking[0]}, ...)")
    if plain := [added["content"] for added in spec.get("added_tokens") or [] if not added.get("special")]:
        _refuse(f"its added token {plain[0]!r} is not special")
    sentencepiece_scores(spec)


def sentencepiece_scores(spec: dict) -> dict[str, float]:
    """Each token that merges form, with the score that makes llama.cpp merge as tokenizers does: minus the rank
    of the first merge forming it. Refused unless the merges are SentencePiece's as transformers converts them:
    every pair of pieces that forms a piece, the pairs forming one piece listed together."""
    model = spec["model"]
    pieces = {**model["vocab"], **{added["content"]: added["id"] for added in spec.get("added_tokens") or []}}
    first: dict[str, int] = {}
    pairs, last = set(), None
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        formed = left + right
        if formed in first and formed != last:
            _refuse(f"its merges forming {formed!r} are not listed together, as SentencePiece's are")
        first.setdefault(formed, rank)
        pairs.add((left, right))
        last = formed
    for piece in pieces:  # (a byte piece's text, "<0x41>", is formed by no two pieces of a SentencePiece vocabulary)
        for cut in range(1, len(piece)):
            if piece[:cut] in pieces and piece[cut:] in pieces and (piece[:cut], piece[cut:]) not in pairs:
                _refuse(f"its merges lack {piece[:cut]!r} + {piece[cut:]!r} (forming {piece!r}), which llama.cpp "
                        "would merge: not SentencePiece's merges (a BPE trained by tokenizers' BpeTrainer?)")
    return {formed: -float(rank) for formed, rank in first.items()}


def llama_cpp_vocabulary(spec: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """A tokenizer.json (`spec`, parsed) as llama.cpp reads it: each id's token (`vocab_size` of them, the model's
    rows), its token type (gguf.TokenType: special tokens are control tokens, other added tokens (matched in
    text) user-defined ones, a SentencePiece vocabulary's byte pieces byte tokens and its unknown piece the
    unknown token, ids the tokenizer lacks unused fillers) and, for a byte-level BPE, the merges in priority
    order, as "left right" (a SentencePiece BPE's go as scores: sentencepiece_scores). `spec` is one that
    check_llama_cpp_tokenizer passed (export_gguf checks it before the model loads)."""
    gguf = gguf_module()
    sentencepiece = sentencepiece_prefix(spec) is not None
    # Special tokens past the model's rows (Gemma 3's <image_soft_token>) are never encoded from text nor sampled:
    # left out, as model.check_tokenizer_fits leaves them (it refused the text's ids, end-of-text and <bos>).
    added = [token for token in spec.get("added_tokens") or [] if token["id"] < vocab_size]
    ids = {**spec["model"]["vocab"], **{token["content"]: token["id"] for token in added}}
    if max(ids.values()) >= vocab_size:
        raise UserError(f"the tokenizer has {max(ids.values()) + 1:,} tokens, more than the model's "
                        f"{vocab_size:,}: they do not belong together")
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    for token, i in spec["model"]["vocab"].items():
        tokens[i] = token
    for token in added:
        tokens[token["id"]] = token["content"]
        types[token["id"]] = int(gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED)
    if sentencepiece:
        for i, token in enumerate(tokens):
            if token is not None and re.fullmatch("<0x[0-9A-F]{2}>", token):
                types[i] = int(gguf.TokenType.BYTE)  # (decoded as their byte, not their text)
        unk = spec["model"].get("unk_token")
        if unk in spec["model"]["vocab"] and spec["model"]["vocab"][unk] < vocab_size:
            types[spec["model"]["vocab"][unk]] = int(gguf.TokenType.UNKNOWN)
    for i, token in enumerate(tokens):
        if token is None:  # an id the model has and the tokenizer never produces
            tokens[i], types[i] = f"[PAD{i}]", int(gguf.TokenType.UNUSED)
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in seen or not token:  # llama.cpp finds tokens by their text
            _refuse(f"ids {seen.get(token)} and {i} are both {token!r}")
        seen[token] = i
    merges = []
    for merge in [] if sentencepiece else spec["model"].get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if " " in left or " " in right or not left:
            _refuse(f"its merge {merge!r} holds a space, which llama.cpp reads as the separator")
        merges.append(f"{left} {right}")
    return tokens, types, merges


# ------------------------------------------------------------------ the file


def _write_hyperparameters(writer, config: ModelConfig) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.mlp_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_global_base)  # global layers
    sliding = [kind == SLIDING for kind in config.layer_types]
    if any(sliding):  # without the window llama.cpp builds the plain causal graph
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern(sliding)
        writer.add_rope_freq_base_swa(config.rope_local_base)


def _write_tokenizer(writer, tokenizer: Tokenizer, spec: dict, vocab_size: int) -> None:
    tokens, types, merges = llama_cpp_vocabulary(spec, vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    prefix = sentencepiece_prefix(spec)
    if prefix is not None:
        writer.add_tokenizer_model("llama")
        scores = sentencepiece_scores(spec)
        writer.add_token_scores([scores.get(token, 0.0) for token in tokens])
        writer.add_add_space_prefix(prefix)  # (llama.cpp's default for "llama" puts a "▁" before a text)
        if (unk := spec["model"].get("unk_token")) in tokens:
            writer.add_unk_token_id(tokens.index(unk))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(PRE_TOKENIZER)
        writer.add_token_merges(merges)
    eot = tokenizer.eot_id  # every story ends with it: the end of generation, and what a story follows
    for add in (writer.add_eos_token_id, writer.add_eot_token_id, writer.add_pad_token_id):
        add(eot)
    # Prompts are tokenized as tinygemma does: with the tokenizer's <bos> in front where it adds one, else nothing.
    bos = tokenizer.prompt_prefix[0] if len(tokenizer.prompt_prefix) == 1 else None
    writer.add_bos_token_id(eot if bos is None else bos)
    writer.add_add_bos_token(bos is not None)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template())


def _write_tensors(writer, model, dtype: str) -> int:
    """The weights under llama.cpp's names: matrices in `dtype` (q8_0 needs rows of whole 32-value blocks; other
    rows fall back to f16, as llama.cpp's converter does), norm gains as float32 1 + w. Returns how many matrices
    fell back to f16."""
    gguf = gguf_module()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, model.config.n_layers)
    matrix_type = gguf.GGMLQuantizationType[GGUF_DTYPES[dtype][0]]
    fell_back = 0
    for hf_name, tensor in hf_state(model).items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        data = tensor.detach().float().cpu().numpy()
        qtype = matrix_type
        if data.ndim == 1:
            if hf_name.endswith("norm.weight"):
                data = data + 1.0  # Gemma's (1 + w) gain, in float32 as the model computes it
            qtype = gguf.GGMLQuantizationType.F32
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            qtype, fell_back = gguf.GGMLQuantizationType.F16, fell_back + 1
        with np.errstate(over="ignore"):
            overflows = qtype == gguf.GGMLQuantizationType.F16 and not np.isfinite(data.astype(np.float16)).all()
        if overflows:
            raise UserError(f"{hf_name} holds values past float16's range (65,504), which f16 writes as inf: "
                            "export it with --dtype bf16 or f32")
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    return fell_back


def export_gguf(ckpt: str | Path, out: str | Path, dtype: str = DEFAULT_GGUF_DTYPE,
                tokenizer: str | None = None) -> dict:
    """Write `ckpt` (a run, checkpoint or transformers directory) as one GGUF file for llama.cpp, replacing `out`
    atomically, with its own tokenizer or, where it records none, `tokenizer` (checkpoint_tokenizer); return
    what was written: its path, dtype, size in bytes, vocabulary, whether the model has Gemma 3's layout
    of sliding layers (`gemma_layout`), and how many q8_0 matrices were written as f16 (`matrices_as_f16`)."""
    out, dtype = check_gguf_arguments(out, dtype), gguf_dtype(dtype)
    src = resolve_checkpoint(ckpt)
    tokenizer = checkpoint_tokenizer(src, tokenizer)  # a wrong --tokenizer is named whether gguf is installed or not
    spec = json.loads(tokenizer.hf_json())
    check_llama_cpp_tokenizer(spec)  # before the (slow) model load
    if len(tokenizer.prompt_prefix) > 1:
        _refuse(f"it puts {len(tokenizer.prompt_prefix)} tokens before every text, where llama.cpp adds at most one "
                "(<bos>)")
    gguf = gguf_module()
    model = load(src)
    config = model.config
    check_tokenizer_fits(tokenizer, model)  # as every other command: the text's ids, end-of-text and <bos>
    check_llama_cpp_model(config)
    remove_temporaries(out.parent, {out.name})  # a killed export's temporary, as large as the file
    # A full disk: one line naming the file; the old one stays (and folders made for it, left empty, go).
    with made_folders(out.parent), atomic_path(out) as tmp, write_errors(out):
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            writer.add_name(model_name(src))
            writer.add_file_type(int(gguf.LlamaFileType[GGUF_DTYPES[dtype][1]]))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _write_hyperparameters(writer, config)
            _write_tokenizer(writer, tokenizer, spec, config.vocab_size)
            as_f16 = _write_tensors(writer, model, dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return {"path": str(out), "dtype": dtype, "bytes": out.stat().st_size, "vocab_size": config.vocab_size,
            "tokenizer": tokenizer.identity, "gemma_layout": has_gemma_layout(config), "matrices_as_f16": as_f16}


def has_gemma_layout(config: ModelConfig) -> bool:
    """Whether the layers slide 5 in 6 with a RoPE base of 10,000, as in Gemma 3: older llama.cpp builds (and
    Ollama) assume both instead of reading them from the file."""
    gemma = ModelConfig(n_layers=config.n_layers).layer_types
    return tuple(config.layer_types) == gemma and config.rope_local_base == 10_000.0
