"""Our checkpoint format, Hugging Face import (`tinygemma.load`) and export (`tinygemma export`)."""

import gc
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

import tinygemma
from tinygemma import Gemma3, UserError, files
from tinygemma.checkpoint import (
    TRAINER_STATE_FORMAT,
    checkpoint_pointer,
    export,
    forget_saved_models,
    last_checkpoint,
    load_optimizer,
    prune_checkpoints,
    read_trainer_state,
    resolve_checkpoint,
    rng_state,
    save_model,
    save_optimizer,
    set_rng_state,
    state_kinds_wrong,
)
from tinygemma.cli import main
from tinygemma.data import is_prepared_dataset
from tinygemma.devices import pick_device, pick_dtype
from tinygemma.files import is_training_run
from tinygemma.hf import is_hf_export
from tinygemma.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

from test_model import make_pair, randomize_norms, small_config  # noqa: E402


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Gemma3(small_config()).eval()
    randomize_norms(model)
    save_model(model, tmp_path / "ckpt", {"step": 7})
    return model, tmp_path / "ckpt"


def test_save_and_load_round_trip(checkpoint):
    model, path = checkpoint
    loaded = tinygemma.load(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    x = torch.randint(0, 512, (2, 50))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert tinygemma.load(path, dtype=torch.bfloat16).embed_tokens.weight.dtype == torch.bfloat16
    # The names load_model and the commands take ("auto" raised torch's RuntimeError, or was refused as a dtype)
    auto = tinygemma.load(path, dtype="auto", device="auto").embed_tokens.weight
    assert auto.device == pick_device("auto") and auto.dtype == pick_dtype("auto", auto.device)
    assert tinygemma.load(path, dtype="bf16", device="cpu").embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        tinygemma.load(path, device="gpu")


def test_save_model_never_writes_over_a_run_a_dataset_or_a_transformers_model(checkpoint, tmp_path):
    """save_model into a run folder hid its best checkpoint behind the new checkpoint.json, and into an export
    replaced its weights under the old config.json: refused, each folder as it was. Its own folder, or one
    holding only the tokenizer.json saved first, it may write again."""
    model, path = checkpoint
    export(path, tmp_path / "hf")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {}, "model": {}, "data": {}}))
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "checkpoints" / "step_000001" / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / "last.json").write_text(json.dumps({"dir": "step_000001", "step": 1}))
    folders = {"hf": "holds a transformers model", "run": "is a training run",  # and its checkpoints, a new one too
               "run/checkpoints": r"a run's checkpoints \(which that run prunes\)",
               "run/checkpoints/step_000001": r"a run's checkpoints \(which that run prunes\)"}
    with pytest.raises(UserError, match=r"a run's checkpoints \(which that run prunes\)"):
        save_model(model, run / "checkpoints" / "step_000002")
    assert not (run / "checkpoints" / "step_000002").exists()
    for name, message in folders.items():
        before = {p: p.read_bytes() for p in (tmp_path / name).rglob("*") if p.is_file()}
        with pytest.raises(UserError, match=message):
            save_model(model, tmp_path / name)
        assert {p: p.read_bytes() for p in (tmp_path / name).rglob("*") if p.is_file()} == before
    save_model(model, path, {"step": 8})  # its own checkpoint, saved again
    assert json.loads((path / "checkpoint.json").read_text())["step"] == 8
    for name in ("mine", "mine_v2"):  # a user's own folder named checkpoints is no run's
        save_model(model, tmp_path / "project" / "checkpoints" / name)


def test_a_config_changed_after_it_was_made_is_refused_not_built(tmp_path):
    """n_layers set on a config whose layer types were derived built the old number of layers, and saved a
    checkpoint no load could read; an odd head_dim failed in RoPE at the first forward."""
    config = small_config()
    config.n_layers = config.n_layers + 1
    with pytest.raises(UserError, match="layer_types has"):
        Gemma3(config)
    config = small_config()
    model = Gemma3(config)
    config.head_dim = 33
    with pytest.raises(UserError, match="head_dim must be even"):
        save_model(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


class Exploit:
    """Unpickling this object runs `open(path, "w")`: the pickle that must never be loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_weights_are_refused_and_never_run(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    model, hf = make_pair(small_config(), seed=1)
    (hf_dir / "config.json").write_text(json.dumps(hf.config.to_dict()))
    marker = tmp_path / "pwned"
    (hf_dir / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit(str(marker))))
    with pytest.raises(UserError, match="never unpickles"):
        tinygemma.load(hf_dir)
    assert not marker.exists()
    # The same pickle planted where our checkpoint's weights belong.
    save_model(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(pickle.dumps(Exploit(str(marker))))
    with pytest.raises(UserError, match="not a readable safetensors"):
        tinygemma.load(tmp_path / "ckpt")
    assert not marker.exists()


def test_bad_checkpoints_are_clear_errors(tmp_path, checkpoint, capsys):
    _, path = checkpoint
    with pytest.raises(UserError, match="not found"):
        tinygemma.load(tmp_path / "nowhere")
    # A truncated weights file.
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable safetensors"):
        tinygemma.load(path)
    # Weights of another architecture under a valid config.
    other = Gemma3(small_config(n_layers=3))
    save_model(other, tmp_path / "other")
    meta = json.loads((tmp_path / "other" / "checkpoint.json").read_text())
    meta["model"]["n_layers"] = 6
    meta["model"]["layer_types"] = None
    (tmp_path / "other" / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match the model config"):
        tinygemma.load(tmp_path / "other")
    # A multimodal or non-Gemma config.json.
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="gemma3_text"):
        tinygemma.load(tmp_path / "llama")
    # A run whose pointers name no checkpoint folder (a number), or folders that are gone: named as such.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.json").write_text(json.dumps({"dir": 5, "step": 1}))
    with pytest.raises(UserError, match=r"checkpoint pointer .*best.json names no folder of .*checkpoints \(its dir is 5;"):
        tinygemma.load(run)  # was a TypeError of Path / int
    for name in ("best", "last"):
        (run / "checkpoints" / f"{name}.json").write_text(json.dumps({"dir": "step_000099", "step": 99}))
    with pytest.raises(UserError, match="checkpoints/best.json names step_000099, which holds no checkpoint.json; "
                                        "checkpoints/last.json names step_000099"):
        tinygemma.load(run)  # said there was no checkpoints/last.json
    # A run before its first checkpoint: its config.json is its recipe, not a transformers config.
    young = tmp_path / "young"
    young.mkdir()
    (young / "config.json").write_text(json.dumps({"train": {"max_steps": 10}, "model": {"preset": "gemma3-tiny"}}))
    (young / "metrics.jsonl").write_text("")
    for command in (["export", "--ckpt", str(young), "--out", str(tmp_path / "young-hf")],
                    ["generate", "--ckpt", str(young), "--prompt", "Once"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{young} is a training run with no checkpoint (none written yet" in err, err
    assert not (tmp_path / "young-hf").exists()
    # Through the CLI: one line on stderr, exit 2, nothing written.
    assert main(["export", "--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint not found" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    # From Python, a model object where its folder belongs (export(model, out) in a notebook) says how to save it,
    # where it was a TypeError from Path().

    with pytest.raises(UserError, match="a checkpoint is given by its folder's path, got a Gemma3; a model in memory "
                                        "is saved to one by tinygemma.checkpoint.save_model"):
        export(Gemma3(small_config()), tmp_path / "out")
    with pytest.raises(UserError, match="got a NoneType"):
        tinygemma.load(None)
    # A device or dtype given as torch takes them is checked as a name is: torch.device("meta") was accepted, an
    # index without an accelerator a RuntimeError traceback
    ckpt = tmp_path / "ckpt"
    save_model(Gemma3(small_config()), ckpt)
    cases = [(torch.device("meta"), "unknown device 'meta'")]
    if not torch.cuda.is_available():
        cases += [(0, "unknown device 0|sees no CUDA GPU"), (torch.device("cuda", 3), "sees no CUDA GPU")]
    for device, message in cases:
        with pytest.raises(UserError, match=message):
            tinygemma.load(ckpt, device=device)
    # (np.float32 and 5 were torch's .to() traceback; float8 loaded, then failed in its first product; float64
    # loaded, then was saved as float32 without a word)
    for dtype in (torch.int64, np.float32, 5, torch.float8_e4m3fn, torch.float64):
        with pytest.raises(UserError, match="a model's dtype is a floating-point one"):
            tinygemma.load(ckpt, dtype=dtype)
    assert tinygemma.load(ckpt, device=torch.device("cpu")).embed_tokens.weight.device.type == "cpu"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ where an export may write, and how


def test_weights_of_a_dtype_the_model_cannot_take_are_refused_in_one_line(checkpoint, tmp_path, capsys):
    """An integer tensor in a checkpoint ended in load_state_dict's traceback; fp8 weights loaded and went on into
    an export that transformers cannot open. Each is refused naming the tensor; float64 weights load as float32."""
    from safetensors.torch import load_file, save_file

    model, path = checkpoint
    weights = load_file(path / "model.safetensors")
    for dtype, says in ((torch.int32, "model.norm.weight is int32"),
                        (torch.float8_e4m3fn, "model.norm.weight is float8_e4m3fn")):
        broken = tmp_path / f"broken_{dtype}".replace("torch.", "")
        shutil.copytree(path, broken)
        save_file({**weights, "norm.weight": weights["norm.weight"].to(dtype)}, broken / "model.safetensors")
        code = main(["export", "--ckpt", str(broken), "--out", str(tmp_path / "hf")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and says.replace("model.", "") in err, err
        assert "float32, bfloat16 or float16" in err and not (tmp_path / "hf").exists()
    wide = tmp_path / "float64"
    shutil.copytree(path, wide)
    save_file({k: v.double() for k, v in weights.items()}, wide / "model.safetensors")
    loaded = tinygemma.load(wide)
    assert loaded.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(loaded.norm.weight, model.norm.weight)


def test_export_files_get_the_permissions_open_gives(checkpoint, tmp_path, capsys):
    """Others (another user, a container) can read an export: 0666 less the umask, as open() would make them."""
    _, path = checkpoint
    old = os.umask(0o022)
    try:
        assert main(["export", "--ckpt", str(path), "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_export_writes_over_its_own_earlier_export_and_nothing_else(checkpoint, tmp_path, capsys):
    _, path = checkpoint
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(path), "--out", str(out)]) == 0
    assert is_hf_export(out) and not is_training_run(out) and not is_prepared_dataset(out)
    assert main(["export", "--ckpt", str(path), "--out", str(out)]) == 0  # a re-export replaces it
    (tmp_path / "empty").mkdir()
    assert main(["export", "--ckpt", str(path), "--out", str(tmp_path / "empty")]) == 0
    # An export stopped halfway holds only export's own files, config.json (written first) among them, or only a
    # temporary (a kill during the first write): exporting into it again finishes it.
    for name, kept in [("half", ["config.json"]), ("killed", [])]:
        half = tmp_path / name
        half.mkdir()
        for file in kept:
            (half / file).write_bytes((out / file).read_bytes())
        (half / ".model.safetensors.0a1b2c3d.tmp").write_bytes(b"half")
        assert not is_hf_export(half)
        assert main(["export", "--ckpt", str(path), "--out", str(half)]) == 0 and is_hf_export(half)
    capsys.readouterr()
    # Export's config.json beside tokenizer files but no weights is no export stopped halfway either (the weights
    # come second): the tokenizer files are someone's, kept.
    (tmp_path / "theirs_half").mkdir()
    (tmp_path / "theirs_half" / "config.json").write_bytes((out / "config.json").read_bytes())
    (tmp_path / "theirs_half" / "chat_template.jinja").write_text("{{ messages }}")
    assert main(["export", "--ckpt", str(path), "--out", str(tmp_path / "theirs_half")]) == 2
    assert (tmp_path / "theirs_half" / "chat_template.jinja").read_text() == "{{ messages }}"
    assert not (tmp_path / "theirs_half" / "model.safetensors").exists()
    capsys.readouterr()
    # A lone weights file is no export stopped halfway (config.json comes first): someone else's, kept.
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"theirs")
    assert main(["export", "--ckpt", str(path), "--out", str(tmp_path / "weights")]) == 2
    assert (tmp_path / "weights" / "model.safetensors").read_bytes() == b"theirs"
    assert "not an earlier export" in capsys.readouterr().err
    # A transformers model that tinygemma did not write (a download of google/gemma-3-270m, a save_pretrained) is
    # never replaced, though it has the files an export has: no mark of ours in its model.safetensors.
    theirs = tmp_path / "theirs"
    transformers.AutoModelForCausalLM.from_pretrained(out).save_pretrained(theirs)
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    assert is_hf_export(theirs)
    capsys.readouterr()  # transformers' progress bars
    assert main(["export", "--ckpt", str(path), "--out", str(theirs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "without tinygemma's mark" in err and "delete it yourself" in err
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before
    # A folder of other things is not an export's to fill.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text('{"model_type": "llama"}')
    assert main(["export", "--ckpt", str(path), "--out", str(tmp_path / "notes")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an earlier export" in err
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["config.json"]


def test_a_full_disk_during_export_is_one_line_and_keeps_the_earlier_export(checkpoint, tmp_path, capsys,
                                                                            monkeypatch):
    _, path = checkpoint
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(path), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def disk_full(tensors, filename, metadata=None):  # what safetensors raises when the disk fills
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(files, "save_file", disk_full)
    assert main(["export", "--ckpt", str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"could not write {out / 'model.safetensors'} (" in err and "the disk may be full" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # every earlier file intact, no temporary


def export_contents(folder: Path) -> dict:
    """Each file's bytes; model.safetensors as its metadata and tensors (safetensors writes the header's metadata
    keys in either order, run to run)."""
    from safetensors import safe_open

    contents = {}
    for p in folder.iterdir():
        if p.name == "model.safetensors":
            with safe_open(str(p), framework="pt") as f:
                contents[p.name] = (sorted(f.metadata().items()),
                                    [(k, f.get_tensor(k).flatten().view(torch.uint8).tolist()) for k in sorted(f.keys())])
        else:
            contents[p.name] = p.read_bytes()
    return contents


def word_tokenizer(*words: str) -> str:
    """A tokenizer.json of whole words, end-of-text first (id 0): a small vocabulary a 512-token model covers."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab={"<|endoftext|>": 0, **{w: i + 1 for i, w in enumerate(words)}},
                                           unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer.to_str()


def test_tokenizer_files_of_a_transformers_directory_are_copied_atomically(checkpoint, tmp_path, capsys,
                                                                           monkeypatch):
    """Exporting a transformers directory copies its tokenizer files and special ids as they are; one whose copy
    fails leaves the earlier one, and one that is no tokenizer is refused before anything is written."""
    _, path = checkpoint
    source = tmp_path / "source"
    assert main(["export", "--ckpt", str(path), "--out", str(source)]) == 0
    (source / "tokenizer.json").write_text(word_tokenizer("the"))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "bos_token_id": 2, "eos_token_id": 1}))
    (source / "generation_config.json").write_text('{"eos_token_id": [1, 0], "do_sample": true}')
    out = tmp_path / "out"
    assert main(["export", "--ckpt", str(source), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").read_text() == word_tokenizer("the")
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, None)
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": [1, 0], "do_sample": True}
    before = export_contents(out)
    write_bytes = Path.write_bytes

    def fails_halfway(self, data):  # (the copy of tokenizer.json, written without a byte-order mark it may have)
        if "tokenizer.json" not in self.name:
            return write_bytes(self, data)
        write_bytes(self, data[:8])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", fails_halfway)
    (source / "tokenizer.json").write_text(word_tokenizer("a", "newer"))
    assert main(["export", "--ckpt", str(source), "--out", str(out)]) == 1
    assert export_contents(out) == before  # the earlier tokenizer, no temporary
    monkeypatch.undo()
    # A tokenizer.json that is none: refused in one line before the first write, the earlier export intact.
    assert main(["export", "--ckpt", str(source), "--out", str(out)]) == 0
    before = export_contents(out)
    capsys.readouterr()
    (source / "tokenizer.json").write_text('{"the": "tokenizer"}')
    assert main(["export", "--ckpt", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is JSON but no tokenizer.json" in err
    assert export_contents(out) == before
    assert main(["export", "--ckpt", str(source), "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


def test_a_checkpoint_whose_tokenizer_file_is_gone_takes_only_that_tokenizer(checkpoint, tmp_path):
    """checkpoint.json records the tokenizer's sha256: where its file is gone, --tokenizer must be that file
    (another vocabulary of the same size was taken, and its ids meant other text)."""
    from tinygemma.checkpoint import checkpoint_tokenizer
    from tinygemma.tokenizer import load_tokenizer

    model, _ = checkpoint
    paths = {}
    for name, words in (("own", ("cat", "dog", "sun")), ("other", ("red", "big", "sky"))):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(word_tokenizer(*words), encoding="utf-8")
    own = load_tokenizer(paths["own"])
    ckpt = tmp_path / "ckpt"
    save_model(model, ckpt, {"tokenizer": own.save(ckpt)})  # its tokenizer.json, as training records it
    (ckpt / "tokenizer.json").unlink()  # then lost: the spec's sha256 is all that is left of it
    paths["own"].rename(tmp_path / "kept.json")
    paths["own"] = tmp_path / "kept.json"
    # Without --tokenizer: what to do, as for an export whose file is gone ("tokenizer file not found: ..." was all)
    with pytest.raises(UserError, match=f"^{re.escape(str(ckpt))} holds no tokenizer.json, and its checkpoint.json "
                                        f"records a tokenizer.json of sha256 {own.sha256[:12]}\\.\\.\\.: name that "
                                        "file with --tokenizer$"):
        checkpoint_tokenizer(ckpt)
    # A spec without "file" reads tokenizer.json (tokenizer_from_spec's default): another one there is refused for
    # its sha256, not said to be gone
    bare = tmp_path / "bare"
    save_model(model, bare, {"tokenizer": {k: v for k, v in own.save(bare).items() if k != "file"}})
    (bare / "tokenizer.json").write_text(paths["other"].read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(UserError, match="tokenizer.json has sha256 .*, but the spec records"):
        checkpoint_tokenizer(bare)
    with pytest.raises(UserError, match="not the tokenizer .* was made with"):
        checkpoint_tokenizer(ckpt, str(paths["other"]))  # 4 tokens too
    assert checkpoint_tokenizer(ckpt, str(paths["own"])).identity == own.identity
    gpt2_spec = {"kind": "gpt2", "vocab_size": 50257, "eot_id": 50256}
    save_model(model, tmp_path / "gpt2", {"tokenizer": gpt2_spec})
    assert checkpoint_tokenizer(tmp_path / "gpt2", "gpt2").identity == "gpt2"


def test_pruning_orders_checkpoints_by_step_number_not_name(tmp_path):
    """keep_checkpoints keeps the newest by number (step_1000000 after step_999999, though it sorts first as a
    name), never one past last.json's, and deletes step_ folders whose name is not a step."""
    from tinygemma.checkpoint import STATE_NAME, checkpoint_step, prune_checkpoints
    ckpts = tmp_path / "checkpoints"
    for name in ("step_999998", "step_999999", "step_1000000", "step_1000001", "step_x12"):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / STATE_NAME).write_text("{}")
    (ckpts / "last.json").write_text(json.dumps({"dir": "step_1000000", "step": 1_000_000}))
    prune_checkpoints(ckpts, newest=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.json", "step_1000000", "step_999999"]
    assert [checkpoint_step(n) for n in ("step_000040", "step_40x", "step_", "steps_1", None)] == [40, None, None,
                                                                                                  None, None]


@pytest.mark.parametrize("command", [["generate", "--prompt", "Once"], ["eval", "--data", "{tmp}"], ["export", "--out", "{tmp}/hf"]])
def test_a_gguf_file_given_as_a_checkpoint_is_named_as_one(tmp_path, capsys, command):
    """`--ckpt model.gguf` (an export's file, in no checkpoint folder) was told to give 'the checkpoint or run
    directory that holds it'; it is named as a GGUF file, which llama.cpp runs, with what to give instead."""
    gguf = tmp_path / "model-q8_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    assert main([args[0], "--ckpt", str(gguf), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a GGUF file, which llama.cpp runs and tinygemma does not load" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-q8_0.gguf"]


def _complete(ckpts, step):
    folder = ckpts / f"step_{step:06d}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    return folder


def test_pruning_removes_a_staging_folder_left_by_a_kill(tmp_path):
    """A .tmp-step_NNNNNN left by a kill mid-write (of a step the run never reaches again: a resume with another
    checkpoint_interval) is deleted by the next pruning, not left to fill the disk (m04)."""
    ckpts = tmp_path / "checkpoints"
    _complete(ckpts, 2)
    (ckpts / "last.json").write_text(json.dumps({"dir": "step_000002", "step": 2}))
    stale = ckpts / ".tmp-step_000005"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    prune_checkpoints(ckpts, 1)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.json", "step_000002"]


def test_two_complete_checkpoints_without_last_json_are_refused_not_started_over(tmp_path):
    """No last.json and no best.json, but two complete checkpoints (keep_checkpoints >= 2): last.json was lost,
    and a fresh start would prune both; refused (m06)."""
    ckpts = tmp_path / "checkpoints"
    _complete(ckpts, 2)
    _complete(ckpts, 4)
    with pytest.raises(UserError, match="but no last.json"):
        last_checkpoint(tmp_path)
    (ckpts / "step_000002").rename(tmp_path / "gone")  # one alone: a first checkpoint not yet named, fine
    assert last_checkpoint(tmp_path) is None


def _state(tmp_path, **edit):
    state = {"format": TRAINER_STATE_FORMAT, "step": 4, "rng": {}, "best_step": 2, "best_val_loss": 3.5, **edit}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    return tmp_path


@pytest.mark.parametrize("edit, match", [
    ({"best_step": None, "best_val_loss": 3.5}, "holds best validation loss 3.5 for best step None"),   # m08
    ({"best_step": 2, "best_val_loss": math.inf}, "holds best validation loss inf for best step 2"),  # m08
    ({"best_step": -1}, "names best step -1, not one of the run's steps to 4"),                        # m09
])
def test_a_trainer_state_whose_best_step_and_loss_disagree_is_refused(tmp_path, edit, match):
    with pytest.raises(UserError, match=match):
        read_trainer_state(_state(tmp_path, **edit), 4)
    assert read_trainer_state(_state(tmp_path), 4)["best_step"] == 2  # the intact state is read


def test_an_invocation_whose_steps_are_no_pair_is_of_another_kind():
    """report.md and compare read an invocation's steps as [from, to]; three numbers are refused (m10)."""
    assert state_kinds_wrong({"invocations": [{"steps": [0, 2, 4], "changed": {}}]}) == ["invocations"]
    assert state_kinds_wrong({"invocations": [{"steps": [0], "changed": {}}]}) == ["invocations"]
    assert state_kinds_wrong({"invocations": [{"steps": [0, 2], "changed": {}}]}) == []


def test_a_pointer_written_by_hand_without_its_step_takes_the_trainer_states(tmp_path):
    """last.json put back by hand as {"dir": "step_000002"}: its step is read from the checkpoint's trainer state
    (m20)."""
    ckpts = tmp_path / "checkpoints"
    _complete(ckpts, 2)
    (ckpts / "last.json").write_text(json.dumps({"dir": "step_000002"}))
    assert checkpoint_pointer(tmp_path)["step"] == 2
    (ckpts / "last.json").write_text(json.dumps({"dir": "step_000002", "step": "2"}))
    assert checkpoint_pointer(tmp_path)["step"] == 2


def test_save_model_refuses_a_training_checkpoint_copied_out_of_its_run(tmp_path):
    """A run's checkpoint copied alone (for --resume-from) holds trainer_state.json and optimizer.safetensors:
    save_model into it would put new weights beside the old optimizer state and trainer state (m24)."""
    model = tinygemma.Gemma3(small_config())
    folder = tmp_path / "step_000010"
    save_model(model, folder)
    (folder / "trainer_state.json").write_text(json.dumps({"format": TRAINER_STATE_FORMAT, "step": 10}))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(UserError, match="is a training run or one of its checkpoints"):
        save_model(model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_checkpoint_json_without_its_model_is_refused_in_one_line(tmp_path):
    """checkpoint.json of tinygemma's format but without "model" (hand-edited, damaged) was a KeyError (m25)."""
    save_model(tinygemma.Gemma3(small_config()), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "checkpoint.json").write_text(json.dumps({"format": "tinygemma"}))
    with pytest.raises(UserError, match="is not a tinygemma checkpoint"):
        tinygemma.load(tmp_path / "ckpt")


def test_a_run_whose_pointers_name_gone_checkpoints_says_so_beside_its_recipe(tmp_path):
    """A run (its recipe as config.json) whose last.json names a checkpoint folder removed by hand is named as
    such, not as a run that wrote no checkpoint yet."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {"max_steps": 10}, "model": {"preset": "gemma3-tiny"}}))
    (run / "checkpoints" / "last.json").write_text(json.dumps({"dir": "step_000010", "step": 10}))
    with pytest.raises(UserError, match="checkpoints/last.json names step_000010, which holds no checkpoint.json"):
        tinygemma.load(run)


def test_a_best_pointer_naming_a_folder_without_weights_falls_back_to_the_last_checkpoint(checkpoint, tmp_path):
    """best.json naming a folder that holds no checkpoint.json (a damaged or half-removed checkpoint) is passed
    over for last.json's complete one, as a best.json naming a gone folder is."""
    model, path = checkpoint
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(path, ckpts / "step_000010")
    (ckpts / "step_000005").mkdir()
    (ckpts / "step_000005" / "trainer_state.json").write_text("{}")
    (ckpts / "best.json").write_text(json.dumps({"dir": "step_000005", "step": 5}))
    (ckpts / "last.json").write_text(json.dumps({"dir": "step_000010", "step": 10}))
    assert resolve_checkpoint(tmp_path / "run") == ckpts / "step_000010"
    loaded = tinygemma.load(tmp_path / "run")
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)


def test_an_export_into_the_export_it_is_made_from_is_refused(checkpoint, tmp_path, capsys):
    """An earlier export given as both --ckpt and --out is refused before anything is read or written: exporting
    it into itself would rewrite, in place, the very folder it reads (its files and model card replaced)."""
    _, path = checkpoint
    assert main(["export", "--ckpt", str(path), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    assert main(["export", "--ckpt", str(tmp_path / "hf"), "--out", str(tmp_path / "hf" / ".")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out must differ from the checkpoint directory" in err, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before


def export_again(checkpoint, out: Path, capsys, change) -> str:
    """Export `checkpoint` to `out`, `change()` the export, and export again: refused (exit 2); its stderr."""
    _, path = checkpoint
    assert main(["export", "--ckpt", str(path), "--out", str(out)]) == 0
    change()
    capsys.readouterr()
    assert main(["export", "--ckpt", str(path), "--out", str(out)]) == 2
    return capsys.readouterr().err


def test_an_earlier_export_holding_a_file_of_someone_else_is_not_exported_into(checkpoint, tmp_path, capsys):
    """An earlier export to which someone added a file of their own (notes, a key) is no longer only an export:
    exporting into it (and --push-to-hub uploading the folder, their file with it) is refused, the file kept."""
    out = tmp_path / "hf"
    err = export_again(checkpoint, out, capsys, lambda: (out / "notes.txt").write_text("mine"))
    assert err.count("\n") == 1 and "files an export does not write" in err, err
    assert (out / "notes.txt").read_text() == "mine"


def test_an_export_whose_config_json_was_replaced_by_another_models_is_not_exported_into(checkpoint, tmp_path,
                                                                                          capsys):
    """Our marked weights beside a config.json of another model (not gemma3_text) are no export of ours: the
    folder is refused, its config.json kept."""
    out = tmp_path / "hf"
    assert "not an earlier export" in export_again(
        checkpoint, out, capsys, lambda: (out / "config.json").write_text('{"model_type": "llama"}'))
    assert (out / "config.json").read_text() == '{"model_type": "llama"}'


def test_save_model_refuses_a_prepared_dataset_and_leaves_it_as_it_was(checkpoint, tmp_path):
    """save_model into a folder of `tinygemma prepare` would put a checkpoint beside its token files: refused in one
    line, the dataset as it was."""
    from tinygemma.data import prepare

    model, _ = checkpoint
    for name in ("stories.txt", "valid.txt"):
        (tmp_path / name).write_text("Once upon a time\n<|endoftext|>\nThe end\n", encoding="utf-8")
    data = tmp_path / "data"
    prepare(data, sources=[str(tmp_path / "stories.txt")], val_sources=[str(tmp_path / "valid.txt")],
            tokenizer="gpt2", progress=False, workers=1)
    assert is_prepared_dataset(data)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    with pytest.raises(UserError, match="is a prepared dataset"):
        save_model(model, data)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


def test_a_gpt2_checkpoint_whose_gpt2_cannot_be_read_takes_no_other_vocabulary_of_its_size(checkpoint, tmp_path,
                                                                                         monkeypatch):
    """A checkpoint that records GPT-2, where GPT-2's ranks cannot be read (offline, no cache): --tokenizer must
    still be GPT-2's vocabulary; another tokenizer.json of GPT-2's 50,257 tokens is refused (its ids mean other
    text)."""
    from tinygemma import checkpoint as checkpoint_module
    from tinygemma.checkpoint import checkpoint_tokenizer

    def unreadable(spec, base_dir="."):
        raise UserError("could not load GPT-2's ranks (offline)")

    model, _ = checkpoint
    save_model(model, tmp_path / "gpt2", {"tokenizer": {"kind": "gpt2", "vocab_size": 50257, "eot_id": 50256}})
    other = tmp_path / "other.json"
    other.write_text(word_tokenizer(*(f"w{i}" for i in range(50256))), encoding="utf-8")  # 50,257 tokens
    monkeypatch.setattr(checkpoint_module, "tokenizer_from_spec", unreadable)
    with pytest.raises(UserError, match="is not the tokenizer .* was made with \\(GPT-2's"):
        checkpoint_tokenizer(tmp_path / "gpt2", str(other))


def test_an_export_whose_tokenizer_json_is_gone_takes_only_its_own_tokenizer(checkpoint, tmp_path, capsys):
    """An export records its tokenizer in its weights' header: with the export's tokenizer.json gone, a --tokenizer
    of the same size but other words is refused, as for a run checkpoint whose file is gone; its own is taken,
    and so is the same tokenizer written again (other bytes, the same ids); an export of the export keeps the
    record."""
    from tinygemma.checkpoint import checkpoint_tokenizer
    from tinygemma.hf import TOKENIZER_KEY, exported_record

    _, path = checkpoint
    own, other, rewritten = tmp_path / "own.json", tmp_path / "other.json", tmp_path / "rewritten.json"
    own.write_text(word_tokenizer("cat", "dog", "sun"), encoding="utf-8")
    other.write_text(word_tokenizer("cat", "dog", "moon"), encoding="utf-8")  # 4 tokens too: other ids' text
    rewritten.write_text(json.dumps(json.loads(own.read_text()), indent=1), encoding="utf-8")
    out = export(path, tmp_path / "hf", tokenizer=str(own))
    (out / "tokenizer.json").unlink()
    sha = hashlib.sha256(own.read_bytes()).hexdigest()
    with pytest.raises(UserError, match=f"holds no tokenizer.json, and its model.safetensors records a tokenizer.json "
                                        f"of sha256 {sha[:12]}\\.\\.\\.: name that file with --tokenizer"):
        checkpoint_tokenizer(out)
    with pytest.raises(UserError, match="is not the tokenizer .* by its model.safetensors"):
        checkpoint_tokenizer(out, str(other))
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(out), "--tokenizer", str(other), "--prompt", "cat"]) == 2
    assert "is not the tokenizer" in capsys.readouterr().err
    taken = [checkpoint_tokenizer(out, str(given)) for given in (own, rewritten)]  # neither refused
    assert taken[0].sha256 != taken[1].sha256 and taken[0].identity == taken[1].identity
    for again in (export(out, tmp_path / "again", tokenizer=str(own)), export(out, tmp_path / "bare")):
        assert exported_record(again, TOKENIZER_KEY) == exported_record(out, TOKENIZER_KEY) != {}
    with pytest.raises(UserError, match="is not the tokenizer .* by its model.safetensors"):
        checkpoint_tokenizer(tmp_path / "bare", str(other))  # exported without a tokenizer: its source's record
    # A folder's own tokenizer.json is copied, whatever --tokenizer of its ids is given: the record is the copy's
    full = export(path, tmp_path / "full", tokenizer=str(own))
    copied = export(full, tmp_path / "copied", tokenizer=str(rewritten))
    assert (copied / "tokenizer.json").read_bytes() == own.read_bytes()
    assert exported_record(copied, TOKENIZER_KEY)["sha256"] == hashlib.sha256(own.read_bytes()).hexdigest()


def test_an_export_whose_tokenizer_json_was_replaced_by_another_is_refused(checkpoint, tmp_path, capsys):
    """An export's tokenizer.json swapped for another tokenizer's (another size) is refused against the record in
    its weights' header, by every command that reads it, in one line, where it generated and evaluated garbage;
    the same tokenizer written again is taken, and so is the export's own named with --tokenizer."""
    from tinygemma.checkpoint import checkpoint_tokenizer

    _, path = checkpoint
    own, other = tmp_path / "own.json", tmp_path / "other.json"
    own.write_text(word_tokenizer("cat", "dog", "sun"), encoding="utf-8")
    other.write_text(word_tokenizer("cat", "dog", "sun", "moon", "star"), encoding="utf-8")
    out = export(path, tmp_path / "hf", tokenizer=str(own))
    (out / "tokenizer.json").write_text(json.dumps(json.loads(own.read_text()), indent=1), encoding="utf-8")
    assert checkpoint_tokenizer(out).identity == load_tokenizer(str(own)).identity  # written again: taken
    shutil.copyfile(other, out / "tokenizer.json")
    refusal = (re.escape(f"{out / 'tokenizer.json'} (tokenizer.json:") + "[0-9a-f]+" + re.escape(
        f", 6 tokens) is not the tokenizer {out} was exported with (a tokenizer.json of 4 tokens, by its "
        "model.safetensors)"))
    with pytest.raises(UserError, match=refusal):
        checkpoint_tokenizer(out)
    for command in (["generate", "--ckpt", str(out), "--prompt", "cat"], ["export", "--ckpt", str(out), "--out",
                                                                          str(tmp_path / "again")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not the tokenizer" in err, err
    assert checkpoint_tokenizer(out, str(own)).identity == load_tokenizer(str(own)).identity


def test_an_export_that_lost_its_gpt2_tokenizer_json_is_exported_with_gpt2s_again(tmp_path, monkeypatch):
    """A GPT-2 model's export without its tokenizer.json: every command reads GPT-2 from the header's record, and
    so does an export of it, which writes GPT-2's tokenizer files (it wrote none, and said the record was none).
    Offline, without GPT-2's ranks, an export's own GPT-2 tokenizer.json is still taken (it cannot be told to be
    GPT-2's then, but it is the recorded size), and an export of one that lost it goes without, as before."""
    import tinygemma.tokenizer as tokenizer_module
    from tinygemma.checkpoint import checkpoint_tokenizer

    model = Gemma3(small_config(vocab_size=50257, d_model=16, n_layers=1, mlp_dim=32))
    save_model(model, tmp_path / "ckpt", {"tokenizer": {"kind": "gpt2", "vocab_size": 50257, "eot_id": 50256}})
    out = export(tmp_path / "ckpt", tmp_path / "hf")
    (out / "tokenizer.json").unlink()
    again = export(out, tmp_path / "again")
    assert load_tokenizer(str(again / "tokenizer.json")).identity == "gpt2"
    assert checkpoint_tokenizer(again).identity == "gpt2"

    def offline():
        raise UserError("cannot load the GPT-2 vocabulary through tiktoken (offline)")

    monkeypatch.setattr(tokenizer_module, "_gpt2_encoding", offline)
    monkeypatch.setattr(tokenizer_module, "_gpt2_vocabulary", offline)
    assert checkpoint_tokenizer(again).identity != "gpt2" and checkpoint_tokenizer(again).vocab_size == 50257
    assert not (export(out, tmp_path / "bare") / "tokenizer.json").exists()


def test_a_tokenizer_spec_without_a_sha256_takes_a_given_tokenizer_of_its_size(checkpoint, tmp_path):
    """A tokenizer.json spec that records no sha256 (written by hand; tokenizer_from_spec accepts it), its file
    gone: --tokenizer of the recorded size is taken, not a KeyError."""
    from tinygemma.checkpoint import checkpoint_tokenizer

    model, _ = checkpoint
    given = tmp_path / "given.json"
    given.write_text(word_tokenizer("cat", "dog", "sun"), encoding="utf-8")
    save_model(model, tmp_path / "ckpt", {"tokenizer": {"kind": "tokenizer.json", "file": "tokenizer.json",
                                                        "vocab_size": 4, "eot_id": 0}})
    assert checkpoint_tokenizer(tmp_path / "ckpt", str(given)).vocab_size == 4


def test_a_gpt2_tokenizer_json_whose_file_is_gone_takes_gpt2(checkpoint, tmp_path):
    """A checkpoint trained with GPT-2's vocabulary as a tokenizer.json (its own sha256), the file gone:
    --tokenizer gpt2 is the same vocabulary and is taken."""
    from tinygemma.checkpoint import checkpoint_tokenizer

    model, _ = checkpoint
    spec = {"kind": "tokenizer.json", "file": "tokenizer.json", "sha256": "0" * 64, "vocab_size": 50257,
            "eot_id": 50256}
    save_model(model, tmp_path / "ckpt", {"tokenizer": spec})
    assert checkpoint_tokenizer(tmp_path / "ckpt", "gpt2").identity == "gpt2"


def test_a_last_json_whose_fork_record_is_malformed_names_no_source():
    """fork_source reads a hand-edited last.json's forked_from only when it is {"dir": text, "step": integer}."""
    from tinygemma.checkpoint import fork_source

    assert fork_source({"forked_from": {"dir": "r/checkpoints/step_000002", "step": 2}}) == {
        "dir": "r/checkpoints/step_000002", "step": 2}
    for bad in ({"dir": None, "step": 2}, {"dir": "x", "step": "2"}, {"dir": "x", "step": True}, {"dir": "x"}, "x"):
        assert fork_source({"forked_from": bad}) is None


def test_a_saved_rng_state_restores_torchs_numpys_and_pythons_generators():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.standard_normal()  # (numpy keeps a cached gaussian: part of its state)
    saved = json.loads(json.dumps(rng_state()))  # as trainer_state.json holds it
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(saved)
    assert (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(),
            torch.rand(1).item()) == expected


def test_a_safetensors_file_not_written_as_an_optimizer_state_is_refused_as_one(tmp_path):
    torch.manual_seed(0)
    model = Gemma3(small_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 512, (1, 8))).float().sum().backward()
    optimizer.step()
    save_optimizer(get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True)),
                   tmp_path / "optimizer.safetensors")
    with safe_open(str(tmp_path / "optimizer.safetensors"), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={**metadata, "format": "pt"})
    load_optimizer(tmp_path / "optimizer.safetensors", model, optimizer)  # its own: loads
    with pytest.raises(UserError, match="is not a tinygemma optimizer state"):
        load_optimizer(tmp_path / "other.safetensors", model, optimizer)


def test_a_fork_marker_names_its_maker_only_where_that_is_a_process_still_running(tmp_path):
    """A retry takes over a fork killed while it was made unless its maker still runs. A pid that is none (garbled,
    0, whose signal goes to the process group, or 1, a container's first process, which a retry may see alive,
    past any pid) counts as no maker, not a refusal for ever or a traceback."""
    import subprocess
    import sys

    from tinygemma.checkpoint import FORK_INCOMPLETE, fork_maker

    marker = tmp_path / FORK_INCOMPLETE
    for pid in ("", "x", "0", "1", "99999999999999999999", "\u00b2", "-5", str(os.getpid())):
        marker.write_text(f"/runs/a/checkpoints/step_000008\n{pid}\n")
        assert fork_maker(tmp_path) is None, pid
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        marker.write_text(f"/runs/a/checkpoints/step_000008\n{alive.pid}\n")
        assert fork_maker(tmp_path) == alive.pid
    finally:
        alive.kill()
        alive.wait()
    assert fork_maker(tmp_path) is None  # (it has ended)


def test_an_optimizer_state_is_loaded_under_the_current_runs_fused_and_capturable(tmp_path):
    """torch places each loaded step count by the loaded groups' `fused` and `capturable` (on the parameter's device
    for either, else where it was read: the CPU). A CPU run's AdamW (neither) resumed on CUDA, whose AdamW is fused,
    would keep its step counts on the CPU for the fused kernel: the groups torch loads carry the current run's."""
    class Recording(torch.optim.AdamW):
        def load_state_dict(self, state_dict):
            self.loaded = [{k: g.get(k) for k in ("fused", "capturable", "lr")} for g in state_dict["param_groups"]]
            super().load_state_dict(state_dict)

    torch.manual_seed(0)
    model = Gemma3(small_config())
    saved = torch.optim.AdamW(model.parameters(), lr=1e-3)  # fused None, as a CPU run's
    model(torch.randint(0, 512, (1, 8))).float().sum().backward()
    saved.step()
    save_optimizer(get_optimizer_state_dict(model, saved, options=StateDictOptions(full_state_dict=True)),
                   tmp_path / "optimizer.safetensors")
    model.zero_grad(set_to_none=True)  # (as a resumed run's model: torch's loading then makes the state first)
    resumed = Recording(model.parameters(), lr=2e-3, fused=True)
    load_optimizer(tmp_path / "optimizer.safetensors", model, resumed)
    assert resumed.loaded == [{"fused": True, "capturable": False, "lr": 1e-3}]  # (the rate: restored after)
    assert resumed.param_groups[0]["fused"] and resumed.param_groups[0]["lr"] == 2e-3
    assert all(state["step"].item() == 1 for state in resumed.state.values())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_a_loaded_optimizer_state_keeps_no_map_of_its_file(tmp_path):
    """safetensors reads a file's tensors as a memory map of it, and a CPU run's optimizer took them as its moments:
    the resumed run held optimizer.safetensors mapped to its end, so the checkpoint that pruning then deleted kept
    its disk space until the process ended (the moments of a 270M in float32: 2 GB), and on Windows, where a mapped
    file cannot be deleted, left a half-removed folder. The moments are now the process's own memory."""
    torch.manual_seed(0)
    model = Gemma3(small_config())
    saved = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 512, (1, 8))).float().sum().backward()
    saved.step()
    path = tmp_path / "optimizer.safetensors"
    save_optimizer(get_optimizer_state_dict(model, saved, options=StateDictOptions(full_state_dict=True)), path)
    model.zero_grad(set_to_none=True)  # (as a resumed run's model)
    resumed = torch.optim.AdamW(model.parameters(), lr=1e-3)
    load_optimizer(path, model, resumed)
    gc.collect()
    assert str(path) not in Path("/proc/self/maps").read_text()
    assert all(torch.equal(resumed.state[p]["exp_avg"], saved.state[p]["exp_avg"]) for p in model.parameters())


def test_a_checkpoint_folder_on_a_read_only_disk_is_one_line_naming_it(tmp_path, read_only_folders):
    """save_model (and a fork's folder, and a profile's) made its folder unwrapped: "[Errno 30] ...", where every
    other write says "could not write FOLDER (...)". Simulated: making the folder is EROFS."""
    out = tmp_path / "ro" / "ckpt"
    read_only_folders.add(out)
    with pytest.raises(files.WriteError, match=re.escape(f"could not write {out} (Read-only file system)")):
        save_model(Gemma3(small_config()), out)


def test_exporting_a_transformers_directory_copies_its_tokenizer_files_and_adds_none(checkpoint, tmp_path):
    _, path = checkpoint
    source = tmp_path / "source"
    assert main(["export", "--ckpt", str(path), "--out", str(source)]) == 0
    (source / "tokenizer.json").write_text(word_tokenizer("the"))  # its tokenizer.json alone, no tokenizer_config.json
    assert not (source / "tokenizer_config.json").exists()
    out = export(source, tmp_path / "out")
    assert (out / "tokenizer.json").read_text() == word_tokenizer("the")
    assert not (out / "tokenizer_config.json").exists()  # none of tinygemma's own beside the copied file


def test_a_runs_checkpoints_folder_resolves_to_its_checkpoint(checkpoint, tmp_path, monkeypatch):
    _, path = checkpoint
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {}}))
    shutil.copytree(path, run / "checkpoints" / "step_000007")
    (run / "checkpoints" / "last.json").write_text(json.dumps({"dir": "step_000007", "step": 7}))
    assert resolve_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_000007"
    monkeypatch.chdir(run / "checkpoints")  # `--ckpt .` from inside it
    assert resolve_checkpoint(".").resolve() == (run / "checkpoints" / "step_000007").resolve()
    assert tinygemma.load(".").config == tinygemma.load(path).config


def test_save_model_refuses_a_meta_value_json_cannot_hold_before_writing(tmp_path):
    torch.manual_seed(0)
    model = Gemma3(small_config())
    with pytest.raises(UserError, match="meta must hold what JSON can"):
        save_model(model, tmp_path / "ckpt", {"val_loss": float("nan")})  # NaN is no JSON: other readers refuse it
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_the_models_torch_2_6s_state_dict_cache_holds_are_forgotten(monkeypatch):
    """torch 2.6 keeps every model given to its distributed state_dict functions, a key of an unbounded
    lru_cache (pytorch#149100): forget_saved_models (each run's release) lets them go; where the cache is gone
    (torch 2.7 on) it does nothing."""
    import functools
    import gc
    import weakref

    import torch.distributed.checkpoint.state_dict as state_dict

    @functools.cache
    def cached_get_fqns(model, name):  # torch 2.6's _get_fqns, as it holds its arguments
        return {name}

    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(state_dict, "_get_fqns", cached_get_fqns)
    cached_get_fqns(model, "weight")
    held = weakref.ref(model)
    del model
    gc.collect()
    assert held() is not None  # (the cache holds it)
    forget_saved_models()
    assert held() is None
    monkeypatch.setattr(state_dict, "_get_fqns", lambda model, name: {name})  # no cache: nothing to clear
    forget_saved_models()
