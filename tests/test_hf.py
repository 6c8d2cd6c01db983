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
