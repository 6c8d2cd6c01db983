"""Checkpoints: our own format, loading any model directory, and the checkpoints of a training run.

A tinygemma checkpoint is a directory with
    model.safetensors      the weights, under our parameter names (a tied head is stored once)
    checkpoint.json        {"format": "tinygemma", "model": ModelConfig, "tokenizer": spec, ...}
and, when written by training,
    optimizer.safetensors  the optimizer's state, by parameter name
    trainer_state.json     step, data position, random states, best loss: what exact resume needs
A run directory keeps its checkpoints under checkpoints/, named by the pointers last.json and best.json.
Nothing here unpickles: weights come from safetensors, metadata from JSON. Transformers directories load through
the adapter in hf.py.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tinygemma.config import SLIDING, ModelConfig, is_integer
from tinygemma.data import is_prepared_dataset
from tinygemma.devices import as_device, pick_dtype
from tinygemma.errors import UserError, interrupt_safe, shell_quote
from tinygemma.files import (
    WriteError,
    atomic_path,
    atomic_save_safetensors,
    atomic_write_json,
    check_output_folder,
    check_unlocked,
    fsync_dir,
    in_run_checkpoints,
    is_gguf_file,
    is_training_run,
    others_than,
    peek_json,
    read_json,
    read_safetensors,
    remove_temporaries,
    replace_file,
    signals_held,
    staged_folder,
    write_errors,
)
from tinygemma.hf import (
    EXPORT_FILES,
    HF_TOKENIZER_FILES,
    NEEDS_LAYER_TYPES,
    TOKENIZER_KEY,
    TRAINED_KEY,
    WINDOW_OF_ONE,
    exported_block_size,
    exported_record,
    hf_config,
    is_hf_export,
    load_hf,
    model_config_from_hf,
    save_hf,
    written_by_tinygemma,
)
from tinygemma.model import WEIGHT_DTYPES, Gemma3, check_tokenizer_fits, model_from_state, model_state
from tinygemma.runtime import Runtime, raise_on_all_ranks
from tinygemma.tokenizer import (
    TOKENIZER_FILE,
    Tokenizer,
    TokenizerFileMissing,
    load_tokenizer,
    tokenizer_from_spec,
)

CHECKPOINT_FORMAT = "tinygemma"
WEIGHTS_NAME = "model.safetensors"
META_NAME = "checkpoint.json"
OPTIMIZER_NAME = "optimizer.safetensors"  # written by training, with the loop state beside it
STATE_NAME = "trainer_state.json"

# ------------------------------------------------------------------ our checkpoint format


def save_model(model: Gemma3, directory: str | Path, meta: dict | None = None) -> None:
    """Write `model.safetensors` and `checkpoint.json` (the model config plus `meta`) into `directory`: a folder
    that is no run, checkpoint, prepared dataset or transformers model (check_model_out). Each file is written
    atomically."""
    if not isinstance(model, Gemma3):
        raise UserError(f"save_model takes a Gemma3 and a folder, got a {type(model).__name__} as the model")
    directory = check_model_out(directory)
    model.config.validate()  # (a config changed after the model was built is refused, not saved)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise UserError(f"meta must be a dict of what checkpoint.json records beside the model, got {meta!r}")
    taken = sorted({"format", "model"} & set(meta))
    if taken:  # (they replaced the model's own config: a checkpoint that never loads)
        raise UserError(f"meta may not set {', '.join(taken)}: checkpoint.json records them itself")
    for key in ("tokenizer", "train"):  # read back as tables (a tokenizer's spec, the training recipe)
        if key in meta and not isinstance(meta[key], dict):
            raise UserError(f"meta's {key} must be a dict, as loading reads it (the tokenizer's spec, the training "
                            f"recipe), got {meta[key]!r}")
    try:  # before any file is written: a value JSON cannot hold left new weights beside the old checkpoint.json
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"meta must hold what JSON can (strings, numbers, lists, dicts): {e}") from None
    write_model(model, directory, meta)


def write_model(model: Gemma3, directory: Path, meta: dict | None = None) -> None:
    """save_model's files, unchecked: training writes them into the staging folder of a checkpoint, which it then
    renames into place whole."""
    with write_errors(directory):
        directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(model_state(model), directory / WEIGHTS_NAME, metadata={"format": CHECKPOINT_FORMAT})
    atomic_write_json(directory / META_NAME, {"format": CHECKPOINT_FORMAT, "model": model.config.to_dict(), **(meta or {})})


def check_model_out(directory: str | Path) -> Path:
    """save_model's folder: new, or one that is no training run, prepared dataset or transformers model (each
    would be damaged, a run's best checkpoint hidden behind the new checkpoint.json)."""
    directory = check_output_folder(directory, "the model", flag="save_model's directory")
    if is_training_run(directory) or (directory / STATE_NAME).exists():  # (inside a run's checkpoints/: above)
        raise UserError(f"{directory} is a training run or one of its checkpoints: save the model into a folder of "
                        "its own")
    if is_prepared_dataset(directory):
        raise UserError(f"{directory} is a prepared dataset: save the model into a folder of its own")
    if not (directory / META_NAME).exists() and any((directory / name).exists()
                                                    for name in ("config.json", WEIGHTS_NAME)):
        raise UserError(f"{directory} holds a transformers model (its config.json or {WEIGHTS_NAME}), which saving "
                        "would replace: save the model into a folder of its own")
    return directory


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that `path` names: a run directory (its best checkpoint, else its last), a
    tinygemma checkpoint directory, or a transformers Gemma 3 directory."""
    if not isinstance(path, (str, os.PathLike)):  # a notebook's export(model, ...): save_model writes one
        raise UserError(f"a checkpoint is given by its folder's path, got a {type(path).__name__}; a model in "
                        "memory is saved to one by tinygemma.checkpoint.save_model")
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_file() and is_gguf_file(path):
        raise UserError(f"{path} is a GGUF file, which llama.cpp runs and tinygemma does not load: give the run, "
                        "checkpoint or transformers export it was made from")
    if path.is_file():
        raise UserError(f"{path} is a file; give the checkpoint or run directory that holds it")
    if (path / META_NAME).exists():
        return path
    if path.resolve().name == "checkpoints" and (path / "last.json").exists():  # a run's checkpoints/: the run's
        path = path.resolve().parent  # (resolved: `--ckpt .` from inside it)
    # A run directory (its config.json is the run's recipe, not a transformers config): follow its pointers.
    ckpts = path / "checkpoints"
    dangling = []
    for name in ("best", "last"):
        pointer = ckpts / f"{name}.json"
        if pointer.exists():
            named = pointer_dir(pointer)
            if (ckpts / named / META_NAME).exists():
                return ckpts / named
            dangling.append(f"checkpoints/{name}.json names {named}, which holds no {META_NAME}")
    if (path / "config.json").exists() and not ckpts.exists():
        if is_training_run(path):  # its recipe, not a transformers config.json
            raise UserError(f"{path} is a training run with no checkpoint (none written yet: the first comes at "
                            "train.checkpoint_interval, or at the end of the run; or checkpoints/ was removed)")
        return path
    if dangling:
        raise UserError(f"{path} holds no checkpoint: {'; '.join(dangling)}")
    raise UserError(f"{path} holds no checkpoint (no {META_NAME}, no config.json, no checkpoints/last.json)")


def read_checkpoint_meta(path: str | Path) -> dict:
    """checkpoint.json of a tinygemma checkpoint (run directories resolved), or {} for a transformers directory."""
    directory = resolve_checkpoint(path)
    if (directory / META_NAME).exists():
        meta = read_json(directory / META_NAME, "checkpoint metadata")
        if meta.get("format") != CHECKPOINT_FORMAT or "model" not in meta:
            raise UserError(f"{directory / META_NAME} is not a tinygemma checkpoint")
        return meta
    return {}


def stored_model_config(directory: Path) -> ModelConfig:
    """The model config of a resolved checkpoint directory (resolve_checkpoint), its weights unread."""
    meta = read_checkpoint_meta(directory)
    if meta:
        return ModelConfig.from_dict(meta["model"])
    return model_config_from_hf(read_json(directory / "config.json", "config.json"))


def trained_block_size(path: str | Path) -> int | None:
    """The block size the model at `path` was trained at: what a tinygemma checkpoint records (train.py), or a
    tinygemma export's weights carry (hf.save_hf); None where neither says (another transformers model)."""
    meta = read_checkpoint_meta(path)
    if meta:
        return (meta.get("train") or {}).get("block_size")
    return exported_block_size(resolve_checkpoint(path))


def load(path: str | Path, dtype: torch.dtype | str | None = None, device=None) -> Gemma3:
    """A Gemma3 in eval mode from a run directory, a tinygemma checkpoint, or a transformers Gemma 3 directory.
    `device` and `dtype` as load_model takes them ("auto", "cuda", "bf16", ...) or torch's; None keeps the
    stored dtype on the CPU. Both are resolved (and refused) before anything is read."""
    if device is not None:
        device = as_device(device)
    if dtype is not None and not isinstance(dtype, str) and dtype not in WEIGHT_DTYPES:  # (float8 cannot compute,
        # and float64 would be saved as float32)
        raise UserError(f"a model's dtype is a floating-point one (float32, bfloat16, float16), got {dtype!r}")
    if isinstance(dtype, str):
        dtype = pick_dtype(dtype, torch.device("cpu" if device is None else device))  # (device 0 is cuda:0)
    directory = resolve_checkpoint(path)
    if (directory / META_NAME).exists():
        config = ModelConfig.from_dict(read_checkpoint_meta(directory)["model"])
        state = read_safetensors(directory / WEIGHTS_NAME)
        model = model_from_state(config, state, source=directory)
    else:
        model = load_hf(directory)
    model.to(device=device, dtype=dtype)
    return model.eval()


# ------------------------------------------------------------------ export: a checkpoint as a transformers folder


def check_export_out(out: str | Path, src: Path) -> Path:
    """The --out of an hf export, refused in one line unless the export is the only thing it can replace: a new or
    empty folder, or an earlier export (see hf.is_hf_export), never the checkpoint itself, a training run (its
    config.json is the recipe --resume reads), a prepared dataset (its tokenizer.json) or any other folder."""
    out = check_output_folder(out, "the export")
    if not out.exists():
        return out
    if out.resolve() == src.resolve():
        raise UserError("--out must differ from the checkpoint directory")
    if is_training_run(out):
        raise UserError(f"--out {out} is a training run; exporting into it would replace its config.json (the "
                        "recipe that --resume reads): choose a new folder")
    if is_prepared_dataset(out):
        raise UserError(f"--out {out} is a prepared dataset; exporting into it would replace its tokenizer.json: "
                        "choose a new folder")
    only_export_files = not others_than(out, EXPORT_FILES, stages=True)
    if (out / "model.safetensors").exists():  # an earlier export, or a transformers model tinygemma did not write
        # (without config.json: an export killed while its files were being renamed in, config.json last)
        swapping = not (out / "config.json").exists()
        if only_export_files and (is_hf_export(out) or swapping) and written_by_tinygemma(out):
            return out
        if only_export_files and is_hf_export(out):
            raise UserError(f"--out {out} holds a Gemma 3 model without tinygemma's mark in model.safetensors: a "
                            "transformers model (a download, a save_pretrained), or an export of a tinygemma older "
                            "than the mark; it is not replaced: delete it yourself if it is yours to lose, or "
                            "choose a new folder")
        raise UserError(f"--out {out} holds a model that is not an earlier export (tinygemma marks its own in "
                        "model.safetensors), or files an export does not write: exporting would replace it; choose "
                        "a new or empty folder")
    # An export stopped halfway: save_hf writes config.json first, then the weights, so it holds config.json (of
    # gemma3_text) or nothing, beside temporaries of export's files. Anything else is someone's, kept.
    gemma3_config = peek_json(out / "config.json").get("model_type") == "gemma3_text"
    if others_than(out, {"config.json"} if gemma3_config else set(), EXPORT_FILES, stages=True):
        raise UserError(f"--out {out} holds other files and is not an earlier export (a config.json of model_type "
                        "gemma3_text beside model.safetensors): choose a new or empty folder")
    return out


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def export(ckpt: str | Path, out: str | Path, tokenizer: str | None = None,
           finish: Callable[[Path], None] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a transformers Gemma3ForCausalLM directory (config.json, model.safetensors, generation_config.json
    and the tokenizer's files). The tokenizer is the checkpoint's own (a transformers directory's files are
    copied as they are), or `tokenizer` ("gpt2" or a tokenizer.json path) where it has none; a model saved
    with neither is exported without one. Everything that can refuse (the tokenizer, the weights) is read
    before the first file is written: a refused export leaves --out as it was. The files are written whole
    into a staging folder inside --out, `finish(folder)` adds its own (the model card), and they then replace
    --out's together: an export that fails or is stopped leaves an earlier export in --out as it was, never the new
    config.json beside the old weights or the old model card beside the new model. `dtype`: the weights' (the
    checkpoint's by default); float16 refuses a weight past its range."""
    src = resolve_checkpoint(ckpt)
    out = check_export_out(out, src)  # before the (slow) model load, as is a prepare or export writing it now
    if out.exists():
        check_unlocked(out, "an export")
    meta = read_checkpoint_meta(src)
    if not meta:  # a transformers directory: its tokenizer files and special ids as they are
        copied = [name for name in HF_TOKENIZER_FILES if (src / name).exists()]
        has_own = TOKENIZER_FILE in copied
        # (read, or refused, first; a tinygemma export that lost its GPT-2 tokenizer.json gets GPT-2's again)
        recorded = exported_record(src, TOKENIZER_KEY)
        gpt2 = records_gpt2(recorded)
        own = checkpoint_tokenizer(src, tokenizer) if has_own or tokenizer else None
        if own is None and gpt2:  # (GPT-2's ranks out of reach offline: exported without, as the note then says)
            with contextlib.suppress(UserError):
                own = checkpoint_tokenizer(src)
        if own is not None and not (has_own and _loads_tokenizer(src)):
            copied = []  # the named tokenizer's files, not a part of the source's, nor a tokenizer.json it cannot read
        source_config = peek_json(src / "config.json")
        special = {key: source_config.get(key) for key in SPECIAL_IDS}
        generation = peek_json(src / "generation_config.json") or special
        if own is not None and all(value is None for value in special.values()):
            # A folder exported without a tokenizer, now given one: its ids, in generation_config.json too where
            # that left them null (transformers' generate reads them there, and would never stop at end-of-text).
            special = special_ids(own)
            generation = {**generation, **{k: v for k, v in special.items() if generation.get(k) is None}}
    else:
        copied = []
        own = checkpoint_tokenizer(src, tokenizer) if tokenizer or meta.get("tokenizer") else None
        special = generation = special_ids(own)
    model = load(src, dtype=dtype)
    if model.embed_tokens.weight.dtype == torch.float16:  # (given as torch.float16 or "float16", or stored so)
        for name, p in model.named_parameters():
            if not torch.isfinite(p).all():
                raise UserError(f"{name} holds values past float16's range (65,504): export it in bfloat16 or "
                                "float32")
    if own is not None:
        check_tokenizer_fits(own, model)
    hf_config(model.config)  # what transformers could not load is refused here, before any folder is made
    with staged_folder(out, EXPORT_FILES, "an export", check=lambda: check_export_out(out, src),
                       first="model.safetensors", last="config.json") as stage:
        # (the tokenizer whose files go in: the source's copied, or `own`; a source with none keeps its record)
        written = load_tokenizer(src) if tokenizer and TOKENIZER_FILE in copied else own
        records = {TOKENIZER_KEY: tokenizer_record(written) or exported_record(src, TOKENIZER_KEY),
                   TRAINED_KEY: training_record(src)}
        save_hf(model, stage, special, generation, block_size=trained_block_size(src), records=records)
        if own is not None and not copied:
            own.save_hf(stage)
        for name in copied:
            with atomic_path(stage / name) as tmp:
                if name == TOKENIZER_FILE:  # without a byte-order mark, which transformers' reader refuses (ours
                    tmp.write_bytes((src / name).read_bytes().removeprefix(codecs.BOM_UTF8))  # reads after it)
                else:
                    shutil.copyfile(src / name, tmp)
        if finish is not None:
            finish(stage)
    if model.config.layer_pattern is None:
        print(f"note: {NEEDS_LAYER_TYPES}", file=sys.stderr)
    if model.config.sliding_window == 1 and SLIDING in model.config.layer_types:
        print(f"note: {WINDOW_OF_ONE}", file=sys.stderr)
    return out


def tokenizer_record(tokenizer) -> dict:
    """What an export records of its tokenizer (hf.TOKENIZER_KEY): its spec, less the file's name, and its
    identity (equal for a tokenizer.json that transformers wrote again: matches_spec); {} for none."""
    if tokenizer is None:
        return {}
    return {**{key: value for key, value in tokenizer.spec().items() if key != "file"}, "identity": tokenizer.identity}


def training_record(directory: Path) -> dict:
    """What decided the windows a checkpoint's weights trained on: the step, the seed and the training tokens'
    digest, from its trainer_state.json, or as a tinygemma export of a run records them (hf.TRAINED_KEY); {}
    where neither says (another transformers model, a checkpoint written by hand)."""
    saved = peek_json(directory / STATE_NAME)  # (none: a transformers folder, or unreadable)
    if not isinstance(saved.get("data"), dict):
        return exported_record(directory, TRAINED_KEY)
    return {"step": saved.get("step"), "seed": saved["data"].get("seed"),
            "train_blake2b": saved["data"].get("train_blake2b")}


def _loads_tokenizer(directory: Path) -> bool:
    try:
        load_tokenizer(directory)
    except UserError:
        return False
    return True


def special_ids(tokenizer) -> dict:
    """config.json's special ids for a tokenizer: its <bos> (Gemma's) or end-of-text, and end-of-text for eos and
    pad (a TinyStories model knows no other special token); all None without a tokenizer."""
    if tokenizer is None:
        return dict.fromkeys(SPECIAL_IDS)
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.eot_id}


# ------------------------------------------------------------------ the checkpoint that goes with a tokenizer


def checkpoint_tokenizer(ckpt: str | Path, tokenizer: str | None = None):
    """The tokenizer that goes with a checkpoint: the spec recorded in checkpoint.json at training time, else a
    transformers directory's tokenizer.json. `tokenizer` ("gpt2" or a tokenizer.json path), if given, is taken
    where the checkpoint has none of its own, or where its own cannot be read (a tokenizer file gone), and
    refused where it has another vocabulary than the checkpoint's own: its ids would mean other text."""
    directory = resolve_checkpoint(ckpt)
    spec = read_checkpoint_meta(directory).get("tokenizer")
    # A tinygemma export's record of its tokenizer: checked, as a run's spec is, only where its files are gone
    recorded, where = (spec, "its checkpoint.json") if spec else (exported_record(directory, TOKENIZER_KEY),
                                                                  "its model.safetensors")
    gpt2 = records_gpt2(recorded)
    own = None
    try:
        if spec:
            own = tokenizer_from_spec(spec, base_dir=directory)
        elif (directory / TOKENIZER_FILE).exists():
            own = exported_with(load_tokenizer(directory), recorded, directory)
        elif gpt2:  # an export's record, its file gone: GPT-2's
            own = load_tokenizer("gpt2")  # vocabulary needs no file of its own
    except UserError as e:
        if tokenizer is None and not (spec and isinstance(e, TokenizerFileMissing)):  # (its file gone: said below,
            raise  # with what to do)
    if tokenizer is None:
        if own is None and recorded:
            raise UserError(f"{directory} holds no {TOKENIZER_FILE}, and {where} records a tokenizer.json of sha256 "
                            f"{str(recorded.get('sha256'))[:12]}...: name that file with --tokenizer")
        if own is None:
            raise UserError(f"{directory} records no tokenizer and holds no {TOKENIZER_FILE}; name one with "
                            "--tokenizer")
        return own
    given = load_tokenizer(tokenizer)
    if own is None and recorded and recorded.get("vocab_size") not in (None, given.vocab_size):  # its file gone
        raise UserError(f"--tokenizer {tokenizer} has {given.vocab_size:,} tokens, but {directory} was made with a "
                        f"tokenizer of {recorded['vocab_size']:,}: its token ids would mean other text")
    if own is None and recorded and not matches_spec(given, recorded):  # the same size, but another vocabulary
        made = "GPT-2's" if gpt2 else f"a tokenizer.json of sha256 {str(recorded.get('sha256'))[:12]}..."
        raise UserError(f"--tokenizer {tokenizer} ({given.identity}) is not the tokenizer {directory} was made "
                        f"with ({made}, by {where}): its token ids would mean other text")
    if own is not None and given.identity != own.identity:
        raise UserError(f"--tokenizer {tokenizer} ({given.identity}) is not the tokenizer {directory} was made "
                        f"with ({own.identity}): its token ids would mean other text; leave --tokenizer out to "
                        "use the checkpoint's own")
    return given


def records_gpt2(record: dict) -> bool:
    """Whether a tokenizer record (a checkpoint's spec, an export's header entry; {} for none) names GPT-2's."""
    return "gpt2" in (record.get("kind"), record.get("identity"))


def exported_with(tokenizer, recorded: dict, directory: Path):
    """A tinygemma export's tokenizer.json, refused where it is plainly not the tokenizer the export's weights
    header records (`recorded`; {} for another transformers folder): another number of tokens. (Nothing finer:
    the recorded identity is a digest of the file as the installed `tokenizers` writes it back, which another
    release may spell otherwise, and whether a file is GPT-2's depends on GPT-2's ranks being at hand.)"""
    size = recorded.get("vocab_size")
    if is_integer(size) and size != tokenizer.vocab_size:
        made = "GPT-2's" if records_gpt2(recorded) else "a tokenizer.json"
        raise UserError(f"{directory / TOKENIZER_FILE} ({tokenizer.identity}, {tokenizer.vocab_size:,} tokens) is not "
                        f"the tokenizer {directory} was exported with ({made} of {size:,} tokens, by its "
                        "model.safetensors): its token ids would mean other text; put the export's own tokenizer.json "
                        "back, or name it with --tokenizer")
    return tokenizer


def matches_spec(tokenizer, spec: dict) -> bool:
    """Whether `tokenizer` is the one a checkpoint's recorded spec names, where the spec's own file cannot be
    read: GPT-2 (tiktoken's, or a tokenizer.json of its vocabulary) for a gpt2 spec; for a tokenizer.json spec,
    the file of its sha256, or GPT-2's vocabulary where it holds GPT-2's number of tokens (a GPT-2 file written
    another way); or, where the spec records it (an export's), the same identity (a file written again)."""
    if spec.get("kind") == "gpt2":
        return tokenizer.identity == "gpt2"
    if spec.get("identity") and tokenizer.identity == spec["identity"]:
        return True
    if not spec.get("sha256") or getattr(tokenizer, "sha256", None) == spec["sha256"]:
        return True
    return tokenizer.identity == "gpt2" and spec.get("vocab_size") == tokenizer.vocab_size


def load_model(ckpt: str | Path, tokenizer, dtype: str = "auto", device: str = "auto") -> Gemma3:
    """The checkpoint's model in eval mode, on `device` ("auto": a GPU if there is one) in `dtype` ("auto":
    bfloat16 where the device computes in it natively), checked to cover the tokenizer's ids."""
    model = load(ckpt, dtype=dtype, device=device)
    check_tokenizer_fits(tokenizer, model)
    return model


# ------------------------------------------------------------------ run checkpoints: save, resume, pointers, pruning


def pointer_dir(pointer: Path) -> str:
    """The checkpoint folder that a pointer (checkpoints/last.json or best.json) names, as the name of a folder
    of checkpoints/ ("step_000010/", written by hand, is "step_000010"): the one spelling that pruning keeps."""
    named = read_json(pointer, "checkpoint pointer").get("dir")
    name = os.path.normpath(named) if isinstance(named, str) and named else None
    if name is None or name == ".." or Path(name).name != name:  # a path elsewhere, or "." (the folder itself)
        raise UserError(f"checkpoint pointer {pointer} names no folder of {pointer.parent} (its dir is {named!r}; "
                        "a checkpoint's folder name, such as \"step_000010\", is expected)")
    return name


def checkpoint_pointer(run_dir: Path, name: str = "last") -> dict | None:
    """checkpoints/last.json (or best.json) if it names a complete checkpoint, else None."""
    pointer = run_dir / "checkpoints" / f"{name}.json"
    if not pointer.exists():
        return None
    info = {**read_json(pointer, "checkpoint pointer"), "dir": pointer_dir(pointer)}
    directory = run_dir / "checkpoints" / info["dir"]
    if not (directory / STATE_NAME).exists():
        raise UserError(f"{pointer} names {directory}, which is not a complete checkpoint")
    if not isinstance(info.get("step"), int) or isinstance(info["step"], bool):  # a pointer written by hand
        info["step"] = read_json(directory / STATE_NAME, "trainer state").get("step")
        if not isinstance(info["step"], int):
            raise UserError(f"{directory / STATE_NAME} names no step: not a checkpoint of tinygemma's")
    return info


def last_checkpoint(run_dir: Path) -> dict | None:
    """checkpoints/last.json (checkpoint_pointer), or None for a run with no checkpoint yet. A kill leaves no
    last.json only around a run's first checkpoint (written whole, not yet named): a run without it whose
    best.json, or two complete checkpoints, remain lost it otherwise, and is refused rather than started over
    (which would prune them)."""
    ckpts = run_dir / "checkpoints"
    last = checkpoint_pointer(run_dir) if ckpts.is_dir() else None
    if last is None and ckpts.is_dir():
        complete = sorted(p.name for p in ckpts.glob("step_*") if (p / STATE_NAME).exists())
        if complete and ((ckpts / "best.json").exists() or len(complete) > 1):
            raise UserError(f"{ckpts} holds checkpoints ({', '.join(complete)}) but no last.json, which names the "
                            "one to resume from: put it back (a JSON object {\"dir\": \"step_NNNNNN\", \"step\": N}), "
                            "or remove the folder to train from scratch")
    return last


def fork_source(last: dict | None) -> dict | None:
    """{"dir", "step"} of the checkpoint a --resume-from fork continued, which its last.json names until the
    fork's first checkpoint: its first resume's part of the run records it (report.md's "continued from")."""
    fork = (last or {}).get("forked_from")
    return fork if isinstance(fork, dict) and is_integer(fork.get("step")) and isinstance(fork.get("dir"), str) else None


def fork_origin(src: Path, run: Path | None, step: int) -> dict:
    """{"dir", "step"} of the checkpoint a fork of `src` (of step `step`, in `run`) continues: `src` itself, or
    where `run` is a fork and `src` the checkpoint it was made of (its own copy, never trained there), that
    fork's source, so that no run is said to have trained steps it only copied."""
    if run is not None:
        last = peek_json(run / "checkpoints" / "last.json")
        state = peek_json(run / "checkpoints" / str(last.get("dir")) / STATE_NAME) if last.get("dir") else {}
        parts = state.get("invocations") if isinstance(state.get("invocations"), list) else []
        for fork in (fork_source(last), *(fork_source(part) for part in parts if isinstance(part, dict))):
            if fork is not None and fork["step"] == step:
                return fork
    return {"dir": str(src.resolve()), "step": step}


def checkpoint_name(step: int) -> str:
    """The folder of a run's checkpoint of `step` in its checkpoints/: step_NNNNNN, which pruning counts."""
    return f"step_{step:06d}"


def fork_run(checkpoint: str | Path, out: str | Path) -> dict:
    """Make `out` (a new or empty folder, in no run) the run that `checkpoint` (RUN/checkpoints/step_NNNNNN, or
    such a folder copied alone) belongs to, as it was at that checkpoint: the run's config.json and metrics.jsonl
    where it has them (a resume cuts the records back to the step), and the checkpoint as its last one, with its
    best where that is an earlier checkpoint still kept. A resume of `out` then continues exactly as the run would
    have from there (a wsd run extended from before its cooldown, say), and the run itself is left as it was. The
    checkpoints' files are hard links where the filesystem allows (a checkpoint's files are never written again),
    else copies. Returns {"dir", "step"} of the checkpoint, and what remove_fork needs."""
    src = Path(checkpoint)
    if not (src / STATE_NAME).is_file():  # (not there at all: one keep_checkpoints has since pruned, say)
        raise UserError(f"--resume-from {src}: checkpoint not found" if not src.exists() else
                        f"--resume-from {src} is not a checkpoint of a training run (a run's "
                        f"checkpoints/step_NNNNNN, holding {STATE_NAME})")
    step = read_json(src / STATE_NAME, "trainer state").get("step")
    state = read_trainer_state(src, step if isinstance(step, int) and not isinstance(step, bool) else -1)
    ckpts_of = in_run_checkpoints(src)  # the run it belongs to, if it was not copied out alone
    # (its checkpoints/ may be a link to a bigger disk: compared where both lead)
    run = ckpts_of.parent if ckpts_of is not None and ckpts_of.resolve() == src.resolve().parent else None
    out = check_output_folder(out, "the run")
    if src.resolve() in (out.resolve(), *out.resolve().parents):  # (a run's checkpoints/: check_output_folder's)
        raise UserError(f"--out {out} is inside the checkpoint it continues: give the new run a folder of its own")
    if out.resolve() in src.resolve().parents:
        raise UserError(f"--resume-from {src} is inside --out {out}: give the new run a folder of its own")
    origin = fork_origin(src, run, step)
    check_fork_out(out, src, origin)
    made = not out.exists()
    with write_errors(out):  # (a read-only disk: one line naming the folder)
        out.mkdir(parents=True, exist_ok=True)
    try:  # Until last.json names the checkpoint the folder is no run (a resume of it would start afresh): said so,
        # with what makes it and who is making it; made anew, or another fork began it meanwhile (its, not ours)
        marker = os.open(out / FORK_INCOMPLETE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        raise fork_in_making(out, "another process") from None
    with os.fdopen(marker, "w") as f:
        f.write(f"{src.resolve()}\n{os.getpid()}\n")
    ckpts = out / "checkpoints"
    try:
        ckpts.mkdir()
        for name in ("config.json", "metrics.jsonl"):
            if run is not None and (run / name).is_file():
                with atomic_path(out / name) as tmp:
                    shutil.copyfile(run / name, tmp)
                    config = peek_json(tmp) if name == "config.json" else {}
                    if isinstance(config.get("run"), dict) and config["run"].pop("forked_from", None) is not None:
                        # (a fork not yet trained, forked again: its pending settings are its own, not this fork's)
                        Path(tmp).write_text(json.dumps(config, indent=2) + "\n")
        best = state.get("best_step")
        kept = {step: src.resolve()}  # named as training names them, which pruning counts (a copy's name may differ)
        if run is not None and isinstance(best, int) and best != step \
                and (run / "checkpoints" / checkpoint_name(best) / STATE_NAME).is_file():
            kept[best] = run / "checkpoints" / checkpoint_name(best)
        for number, folder in kept.items():
            stage = ckpts / f".tmp-{checkpoint_name(number)}"
            stage.mkdir()
            for file in folder.iterdir():
                if file.is_file():
                    try:
                        os.link(file, stage / file.name)
                    except OSError:  # another filesystem, or one without hard links
                        shutil.copyfile(file, stage / file.name)
            replace_file(stage, ckpts / checkpoint_name(number))
        # (where it came from, which the fork's resume records in its part of the run: the checkpoint's own
        # files are the source's, hard links, never written)
        atomic_write_json(ckpts / "last.json", {"dir": checkpoint_name(step), "step": step,
                                                "forked_from": origin})
        (out / FORK_INCOMPLETE).unlink()
    except BaseException:
        remove_fork(out, {"made": made})
        raise
    config = out / "config.json"
    return {"dir": checkpoint_name(step), "step": step, "made": made,
            "config": config.stat().st_ino if config.exists() else None,
            "copies": {**{str(ckpts / checkpoint_name(number)): str(folder) for number, folder in kept.items()},
                       **{str(out / name): str(run / name) for name in ("config.json", "metrics.jsonl")
                          if run is not None}}}


def check_fork_out(out: Path, src: Path, origin: dict) -> None:
    """The folder a fork of `src` (continuing `origin`, fork_origin's) is made in: new or empty, or a fork killed
    while it was made (taken over, unless its maker still runs); refused in one line otherwise."""
    if (out / FORK_INCOMPLETE).is_file():  # a fork killed while it was made (SIGKILL, power): made again
        maker = fork_maker(out)
        if maker is not None:
            raise fork_in_making(out, f"process {maker}")
        remove_fork(out, {"made": False})
    if out.exists() and any(out.iterdir()):
        # This fork, made, then killed before its first step (its settings recorded nowhere yet): said so
        if peek_json(out / "checkpoints" / "last.json").get("forked_from") == origin:
            raise UserError(f"--out {out} already holds this fork of {src}, not trained yet: continue it with "
                            f"`tinygemma train --out {shell_quote(str(out))} --resume` and this command's other "
                            "settings (--max-steps, --set ...)")
        raise UserError(f"--out {out} is not empty: --resume-from continues the run in a new (or empty) folder, "
                        "leaving the run it comes from as it was")


# In a folder --resume-from is making into a run until last.json names its checkpoint: the checkpoint's path.
FORK_INCOMPLETE = ".fork-incomplete"


def fork_in_making(out: Path, maker: str) -> UserError:
    return UserError(f"--out {out} is being made into a fork by {maker}: wait for it, or choose another --out (if "
                     "no fork is being made into it, delete the folder)")


def fork_maker(out: Path) -> int | None:
    """The process making `out` into a fork, where it is still running (on this machine), else None: a pid that
    is not one (garbled, 0 or 1, a container's first process, which a retry may see alive) counts as none."""
    lines = (out / FORK_INCOMPLETE).read_text(errors="replace").splitlines()
    text = lines[1].strip() if len(lines) > 1 else ""
    pid = int(text) if text.isascii() and text.isdigit() and len(text) < 10 else None
    if pid is None or pid <= 1 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # (another user's process: running)
        pass
    return pid


def check_fork_complete(run_dir: Path) -> None:
    """Refuse a folder whose fork was killed while it was made, in one line naming the command that makes it."""
    marker = Path(run_dir) / FORK_INCOMPLETE
    if marker.is_file():
        source = next(iter(marker.read_text(errors="replace").splitlines()), "").strip() or "CHECKPOINT"
        raise UserError(f"{run_dir} is a fork stopped while it was made (its checkpoint not all there): make it "
                        f"again with `tinygemma train --resume-from {shell_quote(source)} --out "
                        f"{shell_quote(str(run_dir))}` and the settings you gave it, which takes the folder over")


@interrupt_safe
def forked_run(checkpoint: str | Path, out: str | Path):
    """fork_run, undone where what follows fails before training opened the fork (a resume it refuses)."""
    fork = fork_run(checkpoint, out)
    try:
        yield fork
    except BaseException as e:
        if not fork_started(Path(out), fork):
            remove_fork(Path(out), fork)
            if isinstance(e, UserError) and e.args and isinstance(e.args[0], str):  # the copy is gone: name the source
                message = e.args[0]
                for copy, source in fork["copies"].items():
                    message = message.replace(copy, source)
                e.args = (message, *e.args[1:])
        raise


def fork_started(out: Path, fork: dict) -> bool:
    """Whether training has opened the fork `out` as its run (written its config.json anew), after which what it
    holds is the run's (its records of a divergence, say), not only fork_run's copies."""
    config = out / "config.json"
    return (config.stat().st_ino if config.exists() else None) != fork["config"]


def remove_fork(out: Path, fork: dict) -> None:
    """What fork_run made: `out` itself if it made it, else what it put into the empty folder it was given. The
    fork's marker goes last: a kill meanwhile leaves a fork still marked as in the making, which a retry takes over."""
    for child in sorted(out.iterdir(), key=lambda c: c.name == FORK_INCOMPLETE) if out.is_dir() else ():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    if fork["made"]:
        with contextlib.suppress(OSError):
            out.rmdir()


TRAINER_STATE_FORMAT = "tinygemma-trainer-state"


def read_trainer_state(ckpt_dir: Path, step: int) -> dict:
    """The trainer state of the checkpoint in `ckpt_dir`, which its pointer says is of `step`: refused in one line
    unless it is a trainer state of that step with the random generators' states, never read as a fresh start
    (which would train from step 0 and prune the checkpoint)."""
    path = ckpt_dir / STATE_NAME
    state = read_json(path, "trainer state")
    if state.get("format") != TRAINER_STATE_FORMAT:
        raise UserError(f"{path} is not a tinygemma trainer state (its format is {state.get('format')!r})")
    if state.get("step") != step or isinstance(state.get("step"), bool):
        raise UserError(f"{path} is the state of step {state.get('step')!r}, where its pointer names step {step}: "
                        "a damaged or hand-edited checkpoint; resume from an intact one")
    if not isinstance(state.get("rng"), dict):
        raise UserError(f"{path} holds no random generators' states (rng): a damaged or hand-edited checkpoint")
    best = state.get("best_step")
    if best is not None and not (isinstance(best, int) and not isinstance(best, bool) and 0 <= best <= step):
        raise UserError(f"{path} names best step {best!r}, not one of the run's steps to {step}: a damaged or "
                        "hand-edited checkpoint")
    loss = state.get("best_val_loss", math.inf)
    if not (isinstance(loss, (int, float)) and not isinstance(loss, bool) and not math.isnan(loss)
            and (best is None) == (loss == math.inf)):
        raise UserError(f"{path} holds best validation loss {loss!r} for best step {best!r}: a damaged or "
                        "hand-edited checkpoint")
    if wrong := state_kinds_wrong(state):
        raise UserError(f"{path} holds {', '.join(wrong)} of another kind than training writes: a damaged or "
                        "hand-edited checkpoint; resume from an intact one")
    return state


def state_kinds_wrong(state: dict) -> list[str]:
    """The fields of a trainer state that hold another kind of value than training writes (a hand-edited or
    damaged file): what a resume and compare refuse in one line rather than fail on later. An invocation's
    changes are {setting: [was, now]} of a part whose steps it names."""
    kinds = {"step": int, "tokens": int, "skipped_steps": int, "elapsed_s": (int, float), "data": dict,
             "config": dict, "invocations": list}
    wrong = [key for key, kind in kinds.items() if key in state and (not isinstance(state[key], kind)
                                                                    or isinstance(state[key], bool))]
    parts = state["invocations"] if isinstance(state.get("invocations"), list) else []
    if not all(map(part_of_a_run, parts)):
        wrong.append("invocations")
    return wrong


def part_of_a_run(part) -> bool:
    """Whether an invocation's record (a trainer state's part) is of the kinds training writes: its steps [from,
    to], and its changes {setting: [was, now]}, which name the step they took effect at."""
    if not isinstance(part, dict):
        return False
    steps, changed = part.get("steps"), part.get("changed") or {}
    if steps is None:
        return not changed
    return (isinstance(steps, list) and len(steps) == 2 and all(map(is_integer, steps)) and isinstance(changed, dict)
            and all(isinstance(c, list) and len(c) == 2 for c in changed.values()))


def checkpoint_bytes(model: Gemma3, tokenizer_bytes: int = 0) -> int:
    """At most what a checkpoint takes on disk: the weights, AdamW's two moments (Muon keeps fewer), the copy of
    the run's tokenizer file (`tokenizer_bytes`), and a margin."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = 2 * sum(p.numel() * 4 for p in model.parameters())
    return int(1.05 * (weights + moments)) + tokenizer_bytes + (16 << 20)


def forget_saved_models() -> None:
    """torch 2.6 caches distributed state_dict's parameter names per (model, name) in an unbounded lru_cache
    (pytorch#149100; gone from 2.7), so every model saved or resumed here stayed in memory for good, each run's in
    a notebook. Forget them (a no-op where the cache is gone)."""
    module = sys.modules.get("torch.distributed.checkpoint.state_dict")
    cache_clear = getattr(getattr(module, "_get_fqns", None), "cache_clear", None)
    if cache_clear is not None:
        cache_clear()


def save_checkpoint(run_dir: Path, step: int, raw: Gemma3, optimizer, state: dict, meta: dict,
                    tokenizer: Tokenizer, val_loss: float | None, is_best: bool, rt: Runtime, fsdp: bool,
                    keep: int = 1, keep_before: int | None = None) -> None:
    """Write checkpoints/step_NNNNNN/ into a temporary directory, rename it into place, then switch last.json
    (and best.json) to it; finally delete the checkpoints but the best and the newest `keep` (and the newest at or
    before `keep_before`: prune_checkpoints). Every rank calls
    this (FSDP gathers the shards); rank 0 writes. A tokenizer.json run carries its tokenizer's file as the run
    loaded it at its start (`tokenizer`, checked against the data's record then): not the data folder's file as it
    is now, which a `prepare` into that folder may have replaced meanwhile."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    ckpts, name = run_dir / "checkpoints", checkpoint_name(step)
    tokenizer_file = meta.get("tokenizer", {}).get("file")  # a checkpoint carries its tokenizer, so it stands alone
    message = None
    if rt.is_main:
        ckpts.mkdir(parents=True, exist_ok=True)
        tokenizer_text = tokenizer.hf_json().encode("utf-8") if tokenizer_file else b""
        need = checkpoint_bytes(raw, len(tokenizer_text))
        free = shutil.disk_usage(ckpts).free
        if free < need:
            previous = checkpoint_pointer(run_dir)
            message = (f"not enough free disk in {ckpts} for the checkpoint of step {step}: it needs about "
                       f"{need / 2**20:,.0f} MiB and {free / 2**20:,.0f} MiB are free; nothing was written"
                       + (f", and the checkpoint of step {previous['step']} is intact" if previous else ""))
    raise_on_all_ranks(message, rt, kind=WriteError)  # the machine's failure, not the input's (exit status 1)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer_state = get_optimizer_state_dict(raw, optimizer, options=full)
    model_state = get_model_state_dict(raw, options=full) if fsdp else None
    if not rt.is_main:
        return
    model = model_from_state(raw.config, model_state) if fsdp else raw

    tmp = ckpts / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_model(model, tmp, meta)
        save_optimizer(optimizer_state, tmp / OPTIMIZER_NAME)
        if tokenizer_file:
            with atomic_path(tmp / tokenizer_file) as t:
                t.write_bytes(tokenizer_text)
        atomic_write_json(tmp / STATE_NAME, state)  # written last: its presence marks a complete checkpoint
        fsync_dir(tmp)
        final = ckpts / name
        if final.exists():  # left by a crash after its rename but before last.json named it: never referenced
            shutil.rmtree(final)
        # Renamed and named together: a Ctrl-C between the two left a whole checkpoint no pointer named (its steps
        # trained again on resume). The signal takes effect once last.json names it.
        with signals_held():
            replace_file(tmp, final)
            fsync_dir(ckpts)
            pointer = {"dir": name, "step": step, "val_loss": val_loss}
            atomic_write_json(ckpts / "last.json", pointer)
            if is_best:
                atomic_write_json(ckpts / "best.json", pointer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(ckpts, keep, keep_before)


POINTER_FILES = frozenset({"last.json", "best.json"})


def restore_best_pointer(ckpts: Path, best_step: int | None, best_val: float) -> None:
    """Point best.json at the checkpoint the resumed trainer state calls the best, if it exists and best.json names
    another: last.json switches first, so a kill or a full disk between the two left best.json naming an older
    checkpoint for good (the state already counts the new one as the best), and pruning then deleted the real
    best once last.json moved on."""
    if best_step is None:
        return
    name = checkpoint_name(best_step)
    if (ckpts / name / STATE_NAME).exists() and peek_json(ckpts / "best.json").get("dir") != name:
        atomic_write_json(ckpts / "best.json", {"dir": name, "step": best_step, "val_loss": best_val})


def checkpoint_step(name) -> int | None:
    """The step of a checkpoint folder's name (step_000040: 40), if it is one."""
    match = re.fullmatch(r"step_([0-9]+)", name) if isinstance(name, str) else None
    return int(match.group(1)) if match else None


def prune_checkpoints(ckpts: Path, newest: int = 1, before: int | None = None) -> None:
    """Delete the step directories but the one best.json names and the `newest` complete ones up to the one
    last.json names (one past it was left by a crash before last.json named it), and with `before` the newest
    complete one at or before that step (a wsd run's last before its cooldown, which it extends from: a --stop-at
    checkpoint among the newest would push it out); leftover temporary ones, and the temporaries of pointers whose
    writing was killed."""
    remove_temporaries(ckpts, POINTER_FILES)
    keep = set()
    for name in ("last", "best"):
        if (ckpts / f"{name}.json").exists():
            keep.add(pointer_dir(ckpts / f"{name}.json"))
    last = peek_json(ckpts / "last.json").get("step")
    if (newest > 1 or before is not None) and isinstance(last, int):
        complete = {checkpoint_step(p.name): p.name for p in ckpts.glob("step_*")
                    if checkpoint_step(p.name) is not None and (p / STATE_NAME).exists()}  # step_1000000 is newest
        steps = sorted(s for s in complete if s <= last)
        keep.update(complete[step] for step in steps[-newest:])
        if before is not None:
            keep.update(complete[step] for step in [s for s in steps if s <= before][-1:])
    for path in ckpts.iterdir():
        if path.is_dir() and path.name not in keep and (path.name.startswith("step_") or path.name.startswith(".tmp-")):
            shutil.rmtree(path, ignore_errors=True)


def save_optimizer(state_dict: dict, path: Path) -> None:
    """A full optimizer state dict (parameter names as keys) as safetensors: `name/key` tensors, and the
    parameter groups as JSON in the metadata."""
    tensors, scalars = {}, {}
    for param, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{key}"] = value
            else:
                scalars[f"{param}/{key}"] = value
    groups = json.dumps(state_dict["param_groups"], default=str)
    atomic_save_safetensors(tensors, path, metadata={"format": "tinygemma-optimizer", "param_groups": groups,
                                                      "scalars": json.dumps(scalars)})


def load_optimizer(path: Path, raw: Gemma3, optimizer) -> None:
    """Restore the optimizer's moments and step counts; its hyper-parameters stay those of the current config."""
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # On a CPU, copies of the process's own: safetensors' tensors map the file, which a CPU run's moments kept
    # mapped to its end (the checkpoint pruning then deleted kept its disk space; on Windows it could not be
    # deleted at all). Elsewhere torch copies them onto the device, and every process shares the map meanwhile.
    tensors = read_safetensors(path)
    if next(raw.parameters()).device.type == "cpu":
        tensors = {name: tensor.clone() for name, tensor in tensors.items()}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != "tinygemma-optimizer":
        raise UserError(f"{path} is not a tinygemma optimizer state")
    try:
        groups, scalars = json.loads(metadata["param_groups"]), json.loads(metadata.get("scalars", "{}"))
        if not isinstance(groups, list) or not isinstance(scalars, dict):
            raise ValueError("param_groups must be a list, scalars an object")
    except (KeyError, ValueError) as e:  # (json's errors are ValueErrors)
        raise UserError(f"{path}'s metadata is damaged ({type(e).__name__}: {e})") from None
    state: dict = {}
    for key, value in {**tensors, **scalars}.items():
        param, _, name = key.rpartition("/")
        state.setdefault(param, {})[name] = value
    shapes = {name: tuple(p.shape) for name, p in raw.named_parameters()}  # (a DTensor's: the whole tensor's)
    for param, values in state.items():
        wrong = next((k for k, v in values.items() if isinstance(v, torch.Tensor) and v.dim()
                      and tuple(v.shape) != shapes.get(param)), None)
        if param not in shapes or wrong:
            raise UserError(f"{path} is not the optimizer state of this model: "
                            + (f"it holds {param}, which the model has not" if param not in shapes else
                               f"its {wrong} of {param} has shape {tuple(values[wrong].shape)}, the parameter "
                               f"{shapes[param]}"))
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    for group, settings in zip((g for g in groups if isinstance(g, dict)), current):
        # torch places each step count by the loaded groups' fused and capturable: a CPU run's (neither) would
        # leave them on the CPU, where a fused AdamW on CUDA takes them on the GPU
        group.update({k: settings[k] for k in ("fused", "capturable") if k in settings})
    try:
        set_optimizer_state_dict(raw, optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError) as e:  # another optimizer's state (AdamW's for Muon's groups)
        raise UserError(f"{path} is not the state of this run's optimizer ({type(e).__name__}: {e})") from None
    for group, settings in zip(optimizer.param_groups, current):
        group.update(settings)


def encode_bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def decode_bytes(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": encode_bytes(torch.get_rng_state()),
        "cuda": [encode_bytes(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": json.loads(json.dumps(random.getstate())),
    }


def set_rng_state(state: dict, source: Path | str = "the trainer state") -> None:
    """Restore the generators rng_state() saved; a damaged state is refused in one line naming `source`."""
    try:
        restore_rng_state(state)
    except (KeyError, TypeError, ValueError, RuntimeError, binascii.Error) as e:
        raise UserError(f"{source} holds a damaged random generator state ({type(e).__name__}: {e}); resume "
                        "from an intact checkpoint") from None


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(decode_bytes(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([decode_bytes(s) for s in state["cuda"]])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
