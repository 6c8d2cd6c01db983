"""The Hugging Face adapter: one-to-one names, transformers directories loaded (4.x and 5.x config layouts), and
exports that Gemma3ForCausalLM.from_pretrained loads with the same logits and the checkpoint's tokenizer."""

import json

import pytest
import torch

import tinygemma
from tinygemma import Gemma3
from tinygemma.checkpoint import export, save_model
from tinygemma.cli import main
from tinygemma.files import read_safetensors
from tinygemma.hf import from_hf_name, to_hf_name

transformers = pytest.importorskip("transformers")

import test_checkpoint  # noqa: E402
from test_model import make_pair, small_config  # noqa: E402

checkpoint = test_checkpoint.checkpoint  # a saved small model (a fixture)


def test_name_map_is_one_to_one():
    model = Gemma3(small_config(tie_embeddings=False))
    names = list(model.state_dict())
    hf_names = [to_hf_name(n) for n in names]
    assert len(set(hf_names)) == len(names)
    assert [from_hf_name(n) for n in hf_names] == names
    assert to_hf_name("layers.11.self_attn.q_norm.weight") == "model.layers.11.self_attn.q_norm.weight"
    assert "lm_head.weight" in hf_names and "model.norm.weight" in hf_names


def test_export_loads_in_transformers_with_same_logits(checkpoint, tmp_path):
    model, path = checkpoint
    assert main(["export", "--ckpt", str(path), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["layer_types"] == list(model.config.layer_types)
    assert config["sliding_window"] == 16 and config["query_pre_attn_scalar"] == 32
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    assert config["tie_word_embeddings"] is True
    hf, info = transformers.Gemma3ForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randint(0, 512, (2, 5 * 16))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4


def test_export_of_padded_vocabulary_has_real_shapes(tmp_path):
    torch.manual_seed(0)
    model = Gemma3(small_config(vocab_size=500, vocab_pad_multiple=128)).eval()
    assert model.embed_tokens.weight.shape[0] == 512
    save_model(model, tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "hf")
    weights = read_safetensors(tmp_path / "hf" / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape == (500, 64)
    hf = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    x = torch.randint(0, 500, (1, 40))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4


def test_load_transformers_directory(tmp_path):
    model, hf = make_pair(small_config(tie_embeddings=False), seed=2)
    hf.save_pretrained(tmp_path / "hf")
    loaded = tinygemma.load(tmp_path / "hf")
    assert loaded.config.layer_types == model.config.layer_types
    x = torch.randint(0, 512, (2, 60))
    with torch.no_grad():
        assert (loaded(x) - hf(x).logits).abs().max().item() <= 1e-4
    # Sharded safetensors with an index, as large checkpoints on the hub are stored.
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert torch.equal(tinygemma.load(tmp_path / "sharded")(x), loaded(x))


def test_load_transformers_4x_config_layout(tmp_path):
    """Gemma 3 270M's config.json on the hub uses rope_theta / rope_local_base_freq (transformers 4.x)."""
    model, hf = make_pair(small_config(rope_local_base=777.0, rope_global_base=99_999.0), seed=4)
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=99_999.0, rope_local_base_freq=777.0, rope_scaling=None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    loaded = tinygemma.load(tmp_path / "hf")
    assert (loaded.config.rope_local_base, loaded.config.rope_global_base) == (777.0, 99_999.0)


def test_export_writes_the_checkpoints_tokenizer(tmp_path):
    from tinygemma.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    torch.manual_seed(0)
    model = Gemma3(small_config(vocab_size=50_257, d_model=32, head_dim=8, mlp_dim=32, n_layers=2))
    save_model(model, tmp_path / "ckpt", {"tokenizer": tokenizer.save(tmp_path / "ckpt")})
    export(tmp_path / "ckpt", tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Once upon a time, Lily saw a big dog.\n\n\"Hello!\" she said."
    assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == 50256 == tokenizer.eot_id
    # Batched calls pad with end-of-text; a chat front end sends the messages' text as it is (as the GGUF's).
    assert hf_tokenizer.pad_token == "<|endoftext|>" and hf_tokenizer.pad_token_id == 50256
    batch = hf_tokenizer(["Once upon a time", "Hi"], padding=True)
    assert batch["input_ids"][1][-1] == 50256 and batch["attention_mask"][1][-1] == 0
    chat = [{"role": "user", "content": "Once upon a time"}]
    assert hf_tokenizer.apply_chat_template(chat, tokenize=False) == "Once upon a time"
    # An export of the export keeps its special ids and generation settings, and its tokenizer.
    export(tmp_path / "hf", tmp_path / "again")
    for name in ("config.json", "generation_config.json"):
        again = json.loads((tmp_path / "again" / name).read_text())
        ids = [again[f"{kind}_token_id"] for kind in ("bos", "eos", "pad")]
        assert ids == [50256] * 3, (name, ids)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()


def test_a_checkpoint_without_a_tokenizer_is_exported_with_the_one_named(tmp_path, capsys):
    """A model saved by the Python API records no tokenizer: --tokenizer names it; without one the export says
    that it holds none; one with more tokens than the model, or another than the checkpoint's own, is refused
    before anything is written."""
    torch.manual_seed(0)
    model = Gemma3(small_config(vocab_size=50_257, d_model=32, head_dim=8, mlp_dim=32, n_layers=2))
    save_model(model, tmp_path / "ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "bare")]) == 0
    assert "records no tokenizer" in capsys.readouterr().err and not (tmp_path / "bare" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "bare" / "config.json").read_text())["eos_token_id"] is None
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--tokenizer",
                 "gpt2"]) == 0
    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 50256
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer.encode("Once upon a time", add_special_tokens=False) == [7454, 2402, 257, 640]
    small = Gemma3(small_config())
    save_model(small, tmp_path / "small")
    assert main(["export", "--ckpt", str(tmp_path / "small"), "--out", str(tmp_path / "new"), "--tokenizer",
                 "gpt2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more than the model's 512" in err and not (tmp_path / "new").exists()


def test_an_export_whose_tokenizer_file_is_gone_is_refused_before_writing(tmp_path, capsys):
    from tinygemma.tokenizer import load_tokenizer

    (tmp_path / "words.json").write_text(test_checkpoint.word_tokenizer("Once", "upon"))
    tokenizer = load_tokenizer(tmp_path / "words.json")
    save_model(Gemma3(small_config()), tmp_path / "ckpt", {"tokenizer": tokenizer.save(tmp_path / "ckpt")})
    (tmp_path / "ckpt" / "tokenizer.json").unlink()
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer.json" in err and not (tmp_path / "hf").exists()
