"""The Hugging Face adapter: one-to-one names, transformers directories loaded (4.x and 5.x config layouts), and
exports that Gemma3ForCausalLM.from_pretrained loads with the same logits and the checkpoint's tokenizer."""

import json
import os
import re

import pytest
import torch

import tinygemma
from tinygemma import Gemma3, ModelConfig
from tinygemma.checkpoint import export, save_model
from tinygemma.cli import main
from tinygemma.files import read_safetensors
from tinygemma.hf import from_hf_name, hf_config, model_config_from_hf, to_hf_name

transformers = pytest.importorskip("transformers")

import test_checkpoint  # noqa: E402
from test_model import SAME_HALF_KERNELS, make_pair, small_config  # noqa: E402

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
    card = (tmp_path / "hf" / "README.md").read_text()  # a periodic layout: any transformers from 4.50 reads it
    assert "With transformers:" in card and "4.53" not in card
    hf, info = transformers.Gemma3ForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randint(0, 512, (2, 5 * 16))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("float16", torch.float16),
                                                 ("BF16", torch.bfloat16), ("half", torch.float16)])
def test_an_hf_export_in_half_precision(checkpoint, tmp_path, capsys, dtype, torch_dtype):
    """`export --dtype bf16` (or float16) writes half the bytes, as google/gemma-3-270m is published: every weight
    in that dtype, config.json's dtype said, and transformers' logits are tinygemma's in that dtype, bit for bit
    (test_model's half-precision test). A weight past float16's range is refused, naming it; gguf's q8_0 is not
    an hf dtype."""
    from safetensors import safe_open

    model, path = checkpoint
    assert main(["export", "--ckpt", str(path), "--out", str(tmp_path / "hf"), "--dtype", dtype]) == 0
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16" if "bf" in dtype.lower() else "F16"}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert torch_dtype is getattr(torch, config.get("dtype") or config["torch_dtype"])
    hf = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch_dtype, attn_implementation="sdpa")
    x = torch.randint(0, 512, (2, 3 * 16))
    with torch.no_grad():
        theirs, ours = hf(x).logits, tinygemma.load(path, dtype=torch_dtype)(x)
    if SAME_HALF_KERNELS:
        assert torch.equal(theirs, ours)
    else:  # (torch 2.6: SDPA's math kernel for our shared K/V head, its fused one for transformers' repeated K/V)
        assert (ours.float() - theirs.float()).abs().max() < 0.05 * theirs.float().abs().max()
    capsys.readouterr()
    assert main(["export", "--ckpt", str(path), "--out", str(tmp_path / "q"), "--dtype", "q8_0"]) == 2
    err = capsys.readouterr().err
    assert "(q8_0 is --format gguf's)" in err and not (tmp_path / "q").exists()


def test_an_hf_export_in_float16_refuses_weights_past_its_range(tmp_path, capsys):
    model = Gemma3(small_config())
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = 70_000.0
    save_model(model, tmp_path / "ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layers.0.mlp.up_proj.weight" in err and "65,504" in err
    assert not (tmp_path / "hf").exists()
    for dtype in ("float16", torch.float16):  # from Python, the dtype's name as its object
        with pytest.raises(tinygemma.UserError, match="past float16's range"):
            export(tmp_path / "ckpt", tmp_path / "hf", dtype=dtype)
    assert not (tmp_path / "hf").exists()


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


def test_the_exported_period_matches_the_layers_or_is_left_out():
    """transformers before 4.53 reads the period and not layer_types: it must never disagree with the layers."""
    from tinygemma.config import GLOBAL, SLIDING
    from tinygemma.hf import hf_config
    assert hf_config(small_config())["_sliding_window_pattern"] == 6
    every_third = small_config(layer_types=[SLIDING, SLIDING, GLOBAL] * 2)  # pattern field left at its default 6
    assert hf_config(every_third)["_sliding_window_pattern"] == hf_config(every_third)["sliding_window_pattern"] == 3
    assert hf_config(small_config(layer_types=[SLIDING] * 6))["_sliding_window_pattern"] == 7
    irregular = hf_config(small_config(layer_types=[GLOBAL] + [SLIDING] * 5))
    assert "_sliding_window_pattern" not in irregular and "sliding_window_pattern" not in irregular
    assert irregular["layer_types"][0] == "full_attention"


def test_an_export_with_a_window_of_one_says_transformers_generate_needs_use_cache_false(tmp_path, capsys):
    """transformers' cached generate is wrong at sliding_window = 1 (its sliding cache keeps every token), as the
    note says: its greedy text differs from its uncached one, which is tinygemma's; a window of 2 agrees, and
    says nothing. (Where a transformers release mends it, the last check fails: the note goes.)"""
    from tinygemma.generate import generate

    said = "note: transformers' generate with its cache (use_cache=True, the default) computes a sliding window of 1"
    prompt = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    for window in (1, 2):  # (a small vocabulary and large weights: a random model that does not repeat one token)
        model, hf = make_pair(ModelConfig.preset("gemma3-tiny", vocab_size=64, d_model=32, head_dim=16, mlp_dim=64,
                                                 query_pre_attn_scalar=16, n_heads=2, n_layers=3, init_std=0.3,
                                                 sliding_window=window, sliding_window_pattern=3), seed=5)
        save_model(model, tmp_path / f"ckpt{window}")
        assert main(["export", "--ckpt", str(tmp_path / f"ckpt{window}"), "--out", str(tmp_path / f"hf{window}")]) == 0
        assert (said in capsys.readouterr().err) == (window == 1)
        ours = generate(model, prompt, 30, temperature=0)
        kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
        assert torch.equal(hf.generate(prompt, use_cache=False, **kwargs), ours)
        assert torch.equal(hf.generate(prompt, **kwargs), ours) == (window == 2)


def test_an_export_whose_layers_repeat_no_period_says_which_transformers_read_it(tmp_path, capsys):
    """Without a period, transformers before 4.53 (the project takes 4.50 and newer) read its default every-6th
    global layout: all 4 layers of full, sliding, sliding, full loaded as sliding, logits 0.88 off, silently."""
    from tinygemma.config import GLOBAL, SLIDING

    torch.manual_seed(0)
    save_model(Gemma3(small_config(n_layers=4, layer_types=[GLOBAL, SLIDING, SLIDING, GLOBAL])), tmp_path / "ckpt")
    said = ("note: this model's sliding and global layers repeat no period, which only config.json's layer_types can "
            "say: transformers 4.53 and newer read it, older versions")
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().err.count(said) == 1
    assert "With transformers 4.53 or newer (this model's sliding and global layers repeat no period" in (
        tmp_path / "hf" / "README.md").read_text()  # the model card, for whoever downloads it
    export(tmp_path / "ckpt", tmp_path / "py")  # the Python API's (the notebook's) export says it too
    assert said in capsys.readouterr().err


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
    batch = hf_tokenizer(["Once upon a time", "Hi"], padding=True)  # on the left: generate continues each
    assert batch["input_ids"][1][0] == 50256 and batch["attention_mask"][1][0] == 0
    assert batch["input_ids"][1][-1] != 50256 and batch["attention_mask"][1][-1] == 1
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
    # The bare export given a tokenizer in turn: generation_config.json's null ids are filled as config.json's
    # (they stayed null, so transformers' generate never stopped at end-of-text).
    assert main(["export", "--ckpt", str(tmp_path / "bare"), "--out", str(tmp_path / "named"), "--tokenizer",
                 "gpt2"]) == 0
    named = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "named")
    capsys.readouterr()  # the export's note, transformers' progress bar
    assert named.generation_config.eos_token_id == named.config.eos_token_id == 50256
    assert named.generation_config.pad_token_id == named.config.pad_token_id == 50256
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


def gemma_like_tokenizer(path, words=("Once", "upon", "a", "time"), extra_special=()) -> str:
    """A tokenizer.json built as Gemma's is: <pad> <eos> <bos> first, a post-processor that starts every text
    with <bos>, and (`extra_special`) special tokens past the words."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<eos>", "<bos>", *extra_special)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    path.write_text(tokenizer.to_str(), encoding="utf-8")
    return str(path)


def test_a_prompt_starts_with_the_bos_a_gemma_tokenizer_adds(tmp_path):
    """Gemma's tokenizer.json starts every text with <bos> (its post-processor), and Gemma reads badly without
    it: a prompt's ids are those transformers' tokenizer(prompt) gives. GPT-2's and our BPEs add none."""
    from tinygemma.generate import prompt_ids
    from tinygemma.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(gemma_like_tokenizer(tmp_path / "tokenizer.json"))
    config = small_config()
    assert tokenizer.prompt_prefix == (2,) and tokenizer.encode("Once upon a time") == [3, 4, 5, 6]
    assert prompt_ids(config, tokenizer, "Once upon a time", 10) == [2, 3, 4, 5, 6]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast("Once upon a time").input_ids == [2, 3, 4, 5, 6]
    assert load_tokenizer("gpt2").prompt_prefix == ()
    assert prompt_ids(small_config(vocab_size=50_257), load_tokenizer("gpt2"), "Once", 10) == [7454]


def test_a_chat_starts_with_the_bos_a_prompt_starts_with(tmp_path, capsys):
    """A chat front end renders the chat template and tokenizes the result adding no special token: with a <bos>
    tokenizer (Gemma's) the template starts with it, as tokenizer(prompt) does (the chat began without it). A
    post-processor that also ends every text with a token (T5's </s>), which tinygemma never adds to a prompt,
    is noted by the export."""
    from tinygemma.tokenizer import load_tokenizer

    cases = (("bos", "<bos> $A", (2,), ()), ("bos-eos", "<bos> $A <eos>", (2,), (1,)),
             ("two", "<bos> <pad> $A", (2, 0), ()))  # two before the text: the hf export's template only
    for name, single, prefix, suffix in cases:
        spec = json.loads(open(gemma_like_tokenizer(tmp_path / f"{name}.json")).read())
        spec["post_processor"]["single"] = [{"SpecialToken": {"id": t, "type_id": 0}} if t != "$A" else
                                            {"Sequence": {"id": "A", "type_id": 0}} for t in single.split()]
        for token, i in (("<eos>", 1), ("<pad>", 0)):
            spec["post_processor"]["special_tokens"][token] = {"id": token, "ids": [i], "tokens": [token]}
        (tmp_path / f"{name}.json").write_text(json.dumps(spec), encoding="utf-8")
        tokenizer = load_tokenizer(tmp_path / f"{name}.json")
        assert (tokenizer.prompt_prefix, tokenizer.text_suffix) == (prefix, suffix)
        ckpt, out = tmp_path / f"{name}-ckpt", tmp_path / f"{name}-hf"
        save_model(Gemma3(small_config(vocab_size=7)), ckpt, {"tokenizer": tokenizer.save(ckpt)})
        assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
        assert ("ends every text with <eos>" in capsys.readouterr().err) is bool(suffix)
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        chat = hf_tokenizer.apply_chat_template([{"role": "user", "content": "Once upon a time"}], tokenize=True)
        chat = chat if isinstance(chat, list) else chat["input_ids"]
        assert chat == [*prefix, 3, 4, 5, 6]  # tinygemma's prompt ids: <bos> (and more), the text, no </s>
        assert hf_tokenizer("Once upon a time").input_ids == [*prefix, 3, 4, 5, 6, *suffix]
        # The card names the tokenizer's kind (it said "byte-level BPE" of every tokenizer.json), and its snippet,
        # run, gives the prompt without the </s> (it fed the end-of-story token to generate).
        card = (out / "README.md").read_text()
        assert "| vocabulary | 7 tokens, WordLevel (tokenizer.json) |" in card
        (snippet,) = [line for line in card.splitlines() if line.startswith("ids = tokenizer(")]
        scope = {"tokenizer": hf_tokenizer}
        exec(snippet, scope)
        assert scope["ids"][0].tolist() == [*prefix, 3, 4, 5, 6]


def test_special_tokens_past_the_models_rows_do_not_refuse_it(tmp_path):
    """Gemma 3's tokenizer.json holds <image_soft_token> at 262,144, past gemma-3-270m's 262,144 rows: special
    tokens are never encoded from text nor sampled, so only the text's ids (and end-of-text) must fit."""
    from tinygemma.checkpoint import load_model
    from tinygemma.tokenizer import load_tokenizer

    words = tuple(f"w{i}" for i in range(509))  # ids 3..511: the model's 512 rows hold every text id
    tokenizer = load_tokenizer(gemma_like_tokenizer(tmp_path / "tokenizer.json", words, ("<image_soft_token>",)))
    assert tokenizer.vocab_size == 513 and tokenizer.model_vocab_size == 512
    save_model(Gemma3(small_config()), tmp_path / "ckpt")
    assert load_model(tmp_path / "ckpt", tokenizer, "float32", "cpu").config.vocab_size == 512
    more = load_tokenizer(gemma_like_tokenizer(tmp_path / "more.json", (*words, "w509")))  # a text id at 512
    with pytest.raises(tinygemma.UserError, match="more than the model's 512"):
        load_model(tmp_path / "ckpt", more, "float32", "cpu")


def test_the_cards_transformers_snippet_ends_before_the_recipes_stop_texts(tmp_path):
    """The card's transformers snippet, run as printed on the export, passes the recipe's stop texts as
    `stop_strings` (generation ends at the first met) and prints the text cut before it, as tinygemma's samples
    are: the greedy text without them, up to the earlier of two stop texts read off that text."""
    import contextlib
    import io

    from tinygemma.config import GenerateConfig
    from tinygemma.report import usage_section
    from tinygemma.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = Gemma3(small_config(vocab_size=50_257, d_model=32, head_dim=8, mlp_dim=32, n_layers=2))
    save_model(model, tmp_path / "ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--tokenizer",
                 "gpt2"]) == 0
    tokenizer = load_tokenizer("gpt2")

    def snippet_prints(stop: list[str]) -> tuple[str, int]:
        """What the snippet prints, and the tokens it generated."""
        card = "\n".join(usage_section(str(tmp_path / "hf"), GenerateConfig(temperature=0.0, stop=stop), tokenizer))
        code = card.split("```python\n")[1].split("```")[0]
        scope, printed = {}, io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(code, scope)
        return printed.getvalue(), scope["out"].shape[1] - scope["ids"].shape[1]

    prompt = GenerateConfig().prompts[0]
    whole, n_whole = snippet_prints([])
    assert whole.startswith(prompt)
    text = whole[len(prompt):].rstrip("\n")
    letters = [i for i, c in enumerate(text) if c.isascii() and c.isalnum()]  # a letter of the first half, one later
    early, late = letters[len(letters) // 4], letters[-1]
    stop = [text[late], text[early]]
    cut = text[:min(text.index(text[late]), text.index(text[early]))]
    assert len(cut) < len(text) // 2
    stopped, n_stopped = snippet_prints(stop)
    assert "stop_strings=stop" in "\n".join(usage_section("m", GenerateConfig(stop=stop)))
    assert stopped == prompt + cut + "\n" and n_stopped < n_whole  # ended by transformers, not only cut


def test_a_transformers_directory_exports_with_its_ids_template_and_nothing_stale(tmp_path, capsys):
    """Exporting a transformers directory keeps its special ids and generation settings whether or not it has
    tokenizer files, and copies transformers 5's chat_template.jinja; an export into an earlier one leaves no
    tokenizer file of the earlier one behind its new weights."""
    torch.manual_seed(0)
    model = Gemma3(small_config(vocab_size=50_257, d_model=32, head_dim=8, mlp_dim=32, n_layers=2))
    save_model(model, tmp_path / "ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "src"), "--tokenizer",
                 "gpt2"]) == 0
    src = tmp_path / "src"
    (src / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                 "pad_token_id": 0}))
    generation = (src / "generation_config.json").read_text()
    assert main(["export", "--ckpt", str(src), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}!"
    assert json.loads((tmp_path / "a" / "config.json").read_text())["pad_token_id"] == 0
    assert (tmp_path / "a" / "generation_config.json").read_text() == generation
    # A tokenizer.json saved with a byte-order mark (a Windows editor's): tinygemma reads it, and the copy goes
    # without the mark, which transformers' reader refuses
    (src / "tokenizer.json").write_bytes(b"\xef\xbb\xbf" + (src / "tokenizer.json").read_bytes())
    assert main(["export", "--ckpt", str(src), "--out", str(tmp_path / "marked")]) == 0
    assert (tmp_path / "marked" / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "marked").encode("Once upon") == [7454, 2402]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # a directory without them
        (src / name).unlink()
    assert main(["export", "--ckpt", str(src), "--out", str(tmp_path / "b")]) == 0
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (50256, 0)
    assert (tmp_path / "b" / "generation_config.json").read_text() == generation
    # A transformers directory whose tokenizer.json tinygemma cannot read, exported with --tokenizer: the named
    # one is written (the unreadable file was copied, and the export then failed, exit 2, once written).
    export(tmp_path / "ckpt", tmp_path / "c", tokenizer="gpt2")
    broken = (tmp_path / "c" / "tokenizer.json").read_text().replace("<|endoftext|>", "<|end|>")
    (tmp_path / "c" / "tokenizer.json").write_text(broken)
    assert main(["export", "--ckpt", str(tmp_path / "c"), "--out", str(tmp_path / "d"), "--tokenizer", "gpt2"]) == 0
    from tinygemma.tokenizer import load_tokenizer
    assert load_tokenizer(tmp_path / "d").identity == "gpt2"
    # The bare checkpoint exported into the earlier export: its tokenizer is gone with it, and the note says so.
    capsys.readouterr()
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "a")]) == 0
    assert "records no tokenizer" in capsys.readouterr().err
    assert not any((tmp_path / "a" / name).exists() for name in ("tokenizer.json", "tokenizer_config.json",
                                                                  "chat_template.jinja"))


def test_configs_transformers_cannot_read_or_that_hold_nulls_are_one_line(tmp_path, capsys):
    """A query_pre_attn_scalar that is no whole number: transformers 5 reads it as an int, so the export is
    refused before any folder is made. A config.json with a null where a number belongs is one line too."""
    save_model(Gemma3(small_config(query_pre_attn_scalar=20.5)), tmp_path / "odd")
    assert main(["export", "--ckpt", str(tmp_path / "odd"), "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "query_pre_attn_scalar is 20.5" in err and not (tmp_path / "new").exists()
    save_model(Gemma3(small_config()), tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key, value in (("rms_norm_eps", None), ("rope_parameters", [1, 2]), ("query_pre_attn_scalar", "big")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(tinygemma.UserError, match="config.json holds a value of the wrong type"):
            tinygemma.load(tmp_path / "hf")
    # Out of range: a window of 0 was read as transformers' default 4096; NaN (json reads it) reached the logits.
    for key, value, message in (("sliding_window", 0, "model.sliding_window must be a positive integer, got 0"),
                                ("rms_norm_eps", float("nan"), "model.rms_norm_eps must be a positive, finite")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(tinygemma.UserError, match=re.escape(message)):
            tinygemma.load(tmp_path / "hf")


def test_data_prepared_with_a_bos_tokenizer_starts_each_story_as_a_prompt_starts(tmp_path):
    """A tokenizer whose post-processor adds <bos> (Gemma's): prepare puts it before every story, as generate puts
    it before a prompt, so a model trained from scratch has read it; it counts among the ids a model needs."""
    from tinygemma.data import open_prepared, prepare
    from tinygemma.tokenizer import load_tokenizer

    path = gemma_like_tokenizer(tmp_path / "tokenizer.json")
    for name in ("stories.txt", "valid.txt"):
        (tmp_path / name).write_text("Once upon a time\n<|endoftext|>\na time\n", encoding="utf-8")
    prepare(tmp_path / "data", sources=[str(tmp_path / "stories.txt")], val_sources=[str(tmp_path / "valid.txt")],
            tokenizer=path, progress=False, workers=1)
    assert open_prepared(tmp_path / "data").split("train").tolist() == [2, 3, 4, 5, 6, 1, 2, 5, 6, 1]
    # <bos> as the last id, past the words and end-of-text: a model needs its row too.
    from tokenizers import AddedToken, Tokenizer, models, processors

    late = Tokenizer(models.WordLevel(vocab={"<|endoftext|>": 0, "a": 1, "b": 2, "<bos>": 3}, unk_token="a"))
    late.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<bos>")])
    late.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    (tmp_path / "late.json").write_text(late.to_str(), encoding="utf-8")
    tokenizer = load_tokenizer(tmp_path / "late.json")
    assert tokenizer.prompt_prefix == (3,) and tokenizer.model_vocab_size == 4


def test_models_transformers_config_check_refuses_are_refused_and_its_floats_are_floats(tmp_path, capsys):
    """tinygemma's head_dim is free of d_model / n_heads, transformers' config check is not: such a model is
    refused in one line before --out is made (the export succeeded, then from_pretrained refused it). An integer
    rms_norm_eps or init_std (the Python API allows it) is written as a float, as transformers 5 insists."""
    save_model(Gemma3(small_config(n_heads=3, n_kv_heads=1, d_model=64)), tmp_path / "three")
    assert main(["export", "--ckpt", str(tmp_path / "three"), "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "d_model (64) is not a multiple of n_heads (3)" in err
    assert not (tmp_path / "new").exists()
    model = Gemma3(small_config(rms_norm_eps=1, init_std=1)).eval()
    save_model(model, tmp_path / "ints")
    export(tmp_path / "ints", tmp_path / "hf")
    hf = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    x = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4


def test_an_export_that_fails_into_an_earlier_one_leaves_it_as_it_was(tmp_path, monkeypatch, capsys):
    """Exporting another model into an earlier export: a full disk while writing the weights left the new
    config.json beside the old weights (from_pretrained refused the folder), and a Ctrl-C while the model card's
    samples were generated left the new model under the old card (--push-to-hub would upload it). The export is
    now written whole into a staging folder inside --out and swapped in: a failure leaves the earlier export as it
    was. What a killed export left (a temporary as large as the weights, which --push-to-hub uploaded; a staging
    folder) is removed by the next one; a replaced file keeps its mode (a private model stays private)."""
    import errno

    from test_checkpoint import export_contents

    import tinygemma.hf
    import tinygemma.report

    torch.manual_seed(0)
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "hf"
    save_model(Gemma3(small_config(vocab_size=50_257, d_model=32, head_dim=8, mlp_dim=32, n_layers=2)), first)
    save_model(Gemma3(small_config(vocab_size=50_257, d_model=32, head_dim=8, mlp_dim=32, n_layers=3)), second)
    assert main(["export", "--ckpt", str(first), "--out", str(out), "--tokenizer", "gpt2"]) == 0
    assert (out / "README.md").exists() and (out / "tokenizer.json").exists()
    (out / "model.safetensors").chmod(0o600)
    before = export_contents(out)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for module, name, failure, status in ((tinygemma.hf, "atomic_save_safetensors", full_disk, 1),
                                          (tinygemma.report, "generate_text", interrupted, 130)):
        with monkeypatch.context() as m:
            m.setattr(module, name, failure)
            assert main(["export", "--ckpt", str(second), "--out", str(out), "--tokenizer", "gpt2"]) == status
        assert export_contents(out) == before, name  # no staging folder, no lock file either
    (out / ".model.safetensors.0123abcd.tmp").write_bytes(b"\0" * 1000)  # what a killed export left
    (out / ".tinygemma-staged.k1ll3d").mkdir()
    (out / ".tinygemma-staged.k1ll3d" / "config.json").write_text("{}")
    assert main(["export", "--ckpt", str(second), "--out", str(out), "--tokenizer", "gpt2"]) == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                     "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o600
    assert f"from_pretrained({str(out)!r})" in (out / "README.md").read_text()  # the folder, not the staging one
    capsys.readouterr()


def test_an_export_into_a_folder_being_written_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """An export into a folder a prepare is writing was refused only once the model had loaded (seconds to a
    minute for a large checkpoint); the folder's lock is now tried first, and a folder nobody holds keeps no lock
    file from the try."""
    import tinygemma.checkpoint as checkpoint
    from tinygemma.files import FolderLock

    save_model(Gemma3(small_config()), tmp_path / "ckpt")
    out = tmp_path / "hf"
    out.mkdir()
    holder = FolderLock(out, "a dataset")
    holder.acquire()
    loaded = []
    real_load = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    try:
        assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out)]) == 2
    finally:
        holder.release(remove=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a dataset another process is writing" in err, err
    assert loaded == [] and list(out.iterdir()) == []
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    assert len(loaded) == 1 and not (out / ".lock").exists()


def test_an_export_is_one_writer_and_stages_on_its_own_filesystem(tmp_path, monkeypatch, capsys):
    """A second export into a folder being exported into is refused in one line (it deleted the first one's
    staging folder and both ended with README.md alone). The staging folder is inside --out, so `--out .` and a
    folder whose parent is not writable (or is another filesystem) export as they did before staging."""
    from tinygemma.files import FolderLock

    save_model(Gemma3(small_config()), tmp_path / "ckpt")
    out = tmp_path / "hf"
    out.mkdir()
    other = FolderLock(out, "an export")
    other.acquire()
    try:
        assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out)]) == 2
    finally:
        other.release()
    assert "is an export another process is writing" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [".lock"]  # (the other's lock file; nothing written)
    monkeypatch.chdir(out)
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", "."]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                     "model.safetensors"]
    if os.geteuid() != 0:  # root writes anywhere
        tmp_path.chmod(0o555)
        try:
            assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
        finally:
            tmp_path.chmod(0o755)


def test_a_malformed_shard_index_is_one_line(tmp_path):
    save_model(Gemma3(small_config()), tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    for weight_map in (["model.safetensors"], {"a": None}):
        (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(tinygemma.UserError, match="is not a safetensors index"):
            tinygemma.load(tmp_path / "hf")


def test_configs_are_read_as_transformers_reads_them(tmp_path):
    """A RoPE table under the legacy "type" key is scaling (transformers reads it so): refused, not read as plain
    RoPE. Without layer_types, transformers derives the layers from sliding_window_pattern alone (its "_" twin
    only recorded), and so does tinygemma: they computed differently."""
    save_model(Gemma3(small_config(n_layers=4)), tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    scaled = {**config, "rope_parameters": {**config["rope_parameters"],
                                            "full_attention": {"type": "linear", "factor": 8.0, "rope_theta": 1e6}}}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(scaled))
    with pytest.raises(tinygemma.UserError, match="'linear' RoPE scaling on full_attention layers"):
        tinygemma.load(tmp_path / "hf")
    legacy = {k: v for k, v in config.items() if k not in ("layer_types", "sliding_window_pattern")}
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**legacy, "_sliding_window_pattern": 2}))
    hf = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    loaded = tinygemma.load(tmp_path / "hf")
    assert list(loaded.config.layer_types) == list(hf.config.layer_types)
    x = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        assert (hf(x).logits - loaded(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("setting,value,words", [
    ("final_logit_softcapping", 30.0, "sets final_logit_softcapping"),
    ("attn_logit_softcapping", 50.0, "sets attn_logit_softcapping"),
    ("use_bidirectional_attention", True, "use_bidirectional_attention (an encoder variant)"),
    ("attention_bias", True, "sets attention_bias"),
    ("hidden_activation", "gelu", "has hidden_activation 'gelu'"),
], ids=["final-softcap", "attention-softcap", "bidirectional", "attention-bias", "activation"])
def test_a_config_computing_other_than_gemma_3_is_refused_in_one_line(tmp_path, capsys, setting, value, words):
    """transformers' gemma3_text takes these settings (Gemma 2's softcapping, EmbeddingGemma's bidirectional
    attention, ...); tinygemma's model computes none of them, so loading one must refuse, not compute another
    function. The settings as exported (their Gemma 3 values) load."""
    save_model(Gemma3(small_config()), tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert setting not in config or not config[setting] or config[setting] == "gelu_pytorch_tanh"
    tinygemma.load(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, setting: value}))
    with pytest.raises(tinygemma.UserError, match=re.escape(words)):
        tinygemma.load(tmp_path / "hf")
    assert main(["export", "--ckpt", str(tmp_path / "hf"), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_a_gemma_style_tokenizer_is_exported_with_its_own_bos(tmp_path):
    """Gemma's tokenizer.json starts every text with <bos>: the export names <bos> as the beginning of sequence
    (it named <eos>, so transformers' generate from nothing started from <eos>); eos and pad stay end-of-text."""
    from tinygemma.tokenizer import load_tokenizer

    path = gemma_like_tokenizer(tmp_path / "tokenizer.json")
    save_model(Gemma3(small_config()), tmp_path / "ckpt", {"tokenizer": load_tokenizer(path).save(tmp_path / "ckpt")})
    export(tmp_path / "ckpt", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 1)
    assert generation["bos_token_id"] == 2
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (fast.bos_token, fast.bos_token_id, fast.eos_token_id) == ("<bos>", 2, 1)
    assert fast("Once").input_ids == [2, 3]  # (GPT-2's <bos> stays end-of-text: test_export_writes_the_...)


def test_an_export_rechecks_its_folder_once_locked_and_swaps_config_json_last(tmp_path, monkeypatch, capsys):
    """A prepare finishing into --out while the export loaded its model (the check ran before): the export
    deleted the dataset's tokenizer.json; it now checks again once it holds the folder's lock. The swap removes
    config.json first and renames it in last: a failure amid the renames leaves a folder transformers refuses
    (no config.json), never the new config beside the old weights, and the next export finishes it; Ctrl-C waits
    for the renames. A user's own .lock file is not taken for tinygemma's."""
    import signal

    import tinygemma.checkpoint
    import tinygemma.files

    torch.manual_seed(0)
    save_model(Gemma3(small_config(n_layers=2)), tmp_path / "two")
    save_model(Gemma3(small_config(n_layers=3)), tmp_path / "three")
    out = tmp_path / "hf"
    out.mkdir()
    real_load = tinygemma.checkpoint.load

    def load_while_a_prepare_finishes(*args, **kwargs):
        from tinygemma.data import FORMAT

        (out / "meta.json").write_text(json.dumps({"format": FORMAT}))
        (out / "tokenizer.json").write_text("{}")
        return real_load(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(tinygemma.checkpoint, "load", load_while_a_prepare_finishes)
        assert main(["export", "--ckpt", str(tmp_path / "two"), "--out", str(out)]) == 2
    assert "is a prepared dataset" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json"]
    for name in ("meta.json", "tokenizer.json"):
        (out / name).unlink()

    assert main(["export", "--ckpt", str(tmp_path / "two"), "--out", str(out)]) == 0
    real_replace, calls = tinygemma.files.os.replace, []

    def fails_at_the_second(src, dst):
        if os.path.dirname(dst) != str(out):  # an atomic write into the staging folder
            return real_replace(src, dst)
        calls.append(os.path.basename(dst))
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    fresh = tmp_path / "fresh"  # the same failure exporting into a new folder (it then held README.md alone)
    with monkeypatch.context() as m:
        m.setattr(tinygemma.files.os, "replace", fails_at_the_second)
        out_before, out = out, fresh
        assert main(["export", "--ckpt", str(tmp_path / "three"), "--out", str(fresh)]) == 1
        assert calls == ["model.safetensors", calls[1]] and calls[1] != "config.json"  # the marked weights first
        calls.clear()
        out = out_before
        assert main(["export", "--ckpt", str(tmp_path / "three"), "--out", str(out)]) == 1
    assert main(["export", "--ckpt", str(tmp_path / "three"), "--out", str(fresh)]) == 0  # finished
    assert calls[-1] != "config.json" and not (out / "config.json").exists()
    from tinygemma.hf import is_hf_export
    assert not is_hf_export(out)  # no config.json: not taken for a model (transformers' refusal is slow to reach)
    assert main(["export", "--ckpt", str(tmp_path / "three"), "--out", str(out)]) == 0  # finished
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3

    calls.clear()

    def interrupted_at_the_second(src, dst):
        if os.path.dirname(dst) != str(out):  # an atomic write into the staging folder
            return real_replace(src, dst)
        calls.append(os.path.basename(dst))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(tinygemma.files.os, "replace", interrupted_at_the_second)
        assert main(["export", "--ckpt", str(tmp_path / "two"), "--out", str(out)]) == 130
    assert calls[-1] == "config.json" and len(calls) > 2  # every rename ran before the interrupt
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert not any(p.name.startswith((".lock", ".tinygemma-staged")) for p in out.iterdir())
    capsys.readouterr()

    (out / ".lock").write_text("important notes of the user's\n")
    assert main(["export", "--ckpt", str(tmp_path / "two"), "--out", str(out)]) == 2
    assert "holds a model that is not an earlier export" in capsys.readouterr().err
    assert (out / ".lock").read_text() == "important notes of the user's\n"


# ------------------------------------------------------------------ mutation round 15

def test_the_4x_rope_keys_name_the_same_bases_as_rope_parameters():
    """transformers 4.x reads rope_theta / rope_local_base_freq and not rope_parameters: an export must say the
    same bases in both forms (kills H02: rope_local_base_freq written from the global base)."""
    from tinygemma.hf import hf_config, model_config_from_hf

    d = hf_config(small_config(rope_local_base=777.0, rope_global_base=99_999.0))
    assert d["rope_parameters"]["sliding_attention"]["rope_theta"] == d["rope_local_base_freq"] == 777.0
    assert d["rope_parameters"]["full_attention"]["rope_theta"] == d["rope_theta"] == 99_999.0
    d.pop("rope_parameters")  # as a 4.x reader sees the file
    back = model_config_from_hf(d)
    assert (back.rope_local_base, back.rope_global_base) == (777.0, 99_999.0)


def test_the_init_std_survives_an_export_round_trip():
    """config.json's initializer_range is the model's init_std (kills H05: written as 0.02 always)."""
    from tinygemma.hf import hf_config, model_config_from_hf

    config = small_config(init_std=0.05)
    assert model_config_from_hf(hf_config(config)).init_std == 0.05


def test_a_config_without_optional_keys_reads_as_transformers_reads_it():
    """A config.json that leaves keys out gets transformers' Gemma3TextConfig defaults (kills H07: head_dim
    defaulting to d_model / n_heads; H08: tie_word_embeddings defaulting to False; H16, H19, H20: other defaults).
    num_key_value_heads defaulted to the head count, where transformers' is 4: a folder without it was refused
    (its key/value weights' shapes) where transformers loaded it."""
    import transformers

    from tinygemma.hf import model_config_from_hf

    required = dict(vocab_size=512, hidden_size=64, num_hidden_layers=6, num_attention_heads=8, intermediate_size=128)
    ours = model_config_from_hf({"model_type": "gemma3_text", **required})
    theirs = transformers.Gemma3TextConfig(**required)
    assert ours.head_dim == theirs.head_dim and ours.tie_embeddings == theirs.tie_word_embeddings
    assert ours.n_kv_heads == theirs.num_key_value_heads == 4
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.sliding_window == theirs.sliding_window and ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.query_pre_attn_scalar == theirs.query_pre_attn_scalar
    assert list(ours.layer_types) == list(theirs.layer_types)
    # head_dim given, query_pre_attn_scalar not: transformers' 256, not head_dim (kills H16)
    ours = model_config_from_hf({"model_type": "gemma3_text", **required, "head_dim": 32})
    assert ours.query_pre_attn_scalar == transformers.Gemma3TextConfig(**required, head_dim=32).query_pre_attn_scalar


def test_an_untied_padded_model_exports_with_the_same_logits(tmp_path):
    """An untied head, with a padded vocabulary, through the hf export (kills H06: tie_word_embeddings always
    true, which makes transformers ignore lm_head; H11: the head's padding rows not dropped)."""
    import transformers

    torch.manual_seed(0)
    model = Gemma3(small_config(tie_embeddings=False, vocab_size=500, vocab_pad_multiple=128)).eval()
    save_model(model, tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "hf")
    # transformers 5 unties a file holding both matrices anyway; 4.x ties them by this flag (H06 passes the logits)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    hf, info = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                              attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randint(0, 500, (1, 40))
    with torch.no_grad():
        assert (hf(x).logits - model(x)[..., :500]).abs().max().item() <= 1e-4


def test_a_null_sliding_window_pattern_beside_layer_types_loads():
    """Some transformers configs hold "sliding_window_pattern": null beside layer_types; the layer types say the
    layout."""
    from tinygemma.config import GLOBAL, SLIDING
    from tinygemma.hf import model_config_from_hf

    required = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=8, intermediate_size=128)
    layers = [SLIDING, GLOBAL, SLIDING, GLOBAL]
    config = model_config_from_hf({"model_type": "gemma3_text", **required, "sliding_window_pattern": None,
                                   "layer_types": layers})
    assert list(config.layer_types) == layers


def test_a_config_without_rope_keys_has_transformers_default_bases():
    """No rope_parameters, rope_theta nor rope_local_base_freq: transformers' bases, 10,000 sliding and 1,000,000
    global."""
    import transformers

    from tinygemma.hf import model_config_from_hf

    required = dict(vocab_size=512, hidden_size=64, num_hidden_layers=6, num_attention_heads=8, intermediate_size=128)
    ours = model_config_from_hf({"model_type": "gemma3_text", **required})
    theirs = transformers.Gemma3TextConfig(**required).rope_parameters
    assert ours.rope_local_base == theirs["sliding_attention"]["rope_theta"] == 10_000.0
    assert ours.rope_global_base == theirs["full_attention"]["rope_theta"] == 1_000_000.0


def test_rope_scaling_on_sliding_layers_or_under_the_4x_key_is_refused():
    """RoPE scaling is refused wherever a config says it: on the sliding layers' table of rope_parameters
    and under transformers 4.x's rope_scaling, as Gemma 3 4B's
    config.json holds it."""
    import pytest

    import tinygemma
    from tinygemma.hf import model_config_from_hf

    required = dict(model_type="gemma3_text", vocab_size=512, hidden_size=64, num_hidden_layers=6,
                    num_attention_heads=8, intermediate_size=128)
    sliding = {"sliding_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10_000.0},
               "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}
    with pytest.raises(tinygemma.UserError, match="'linear' RoPE scaling on sliding_attention layers"):
        model_config_from_hf({**required, "rope_parameters": sliding})
    with pytest.raises(tinygemma.UserError, match="uses RoPE scaling"):
        model_config_from_hf({**required, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                              "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0})
    model_config_from_hf({**required, "rope_scaling": None})  # as an export writes it


def test_a_multimodal_gemma_3_config_is_named_as_such():
    """google/gemma-3-4b's config.json (model_type gemma3, its text model under text_config) is refused with the
    reason and the model to take instead."""
    import pytest

    import tinygemma
    from tinygemma.hf import model_config_from_hf

    with pytest.raises(tinygemma.UserError, match="multimodal Gemma 3 checkpoint.*gemma3_text"):
        model_config_from_hf({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}})


def test_both_dtype_keys_say_the_exported_dtype():
    """transformers before 4.56 reads torch_dtype (dtype="auto" loads in it), 5 reads dtype: a bf16 export says
    bfloat16 under both."""
    from tinygemma.hf import hf_config

    config = hf_config(small_config(), torch_dtype="bfloat16")
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"


def test_the_context_length_survives_an_export_round_trip():
    """config.json's max_position_embeddings is the model's."""
    from tinygemma.hf import hf_config, model_config_from_hf

    config = small_config(max_position_embeddings=1_000)
    assert hf_config(config)["max_position_embeddings"] == 1_000
    assert model_config_from_hf(hf_config(config)).max_position_embeddings == 1_000


def test_only_a_tinygemma_export_says_its_trained_block_size(tmp_path):
    """The block size an export records is read from tinygemma's own exports only."""
    from safetensors.torch import save_file

    from tinygemma.hf import exported_block_size

    weights = {"w": torch.zeros(2)}
    (tmp_path / "ours").mkdir(), (tmp_path / "theirs").mkdir()
    save_file(weights, str(tmp_path / "ours" / "model.safetensors"),
              metadata={"format": "pt", "exporter": "tinygemma", "train_block_size": "64"})
    save_file(weights, str(tmp_path / "theirs" / "model.safetensors"),
              metadata={"format": "pt", "train_block_size": "64"})
    assert exported_block_size(tmp_path / "ours") == 64
    assert exported_block_size(tmp_path / "theirs") is None


def test_the_transformers_reference_keeps_rope_frequencies_in_float32():
    """to_transformers in a half dtype keeps RoPE's inverse frequencies float32, as from_pretrained does (kills
    H26: rounded to bf16 by .to(), so the reference that tests and benchmarks compare against computed other
    logits than the exported model loads with)."""
    from tinygemma.hf import to_transformers

    torch.manual_seed(0)
    model = Gemma3(small_config()).to(torch.bfloat16).eval()
    hf = to_transformers(model)
    buffers = {name: b for name, b in hf.named_buffers() if name.endswith("inv_freq")}
    assert buffers and all(b.dtype == torch.float32 for b in buffers.values())
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_bare_export_given_a_tokenizer_keeps_the_generation_settings_it_set(tmp_path):
    """A bare export (no tokenizer) whose generation_config.json sets an id of its own (its owner's stop token)
    exported again with --tokenizer: only the ids left null are filled with the tokenizer's."""
    torch.manual_seed(0)
    model = Gemma3(small_config(vocab_size=50_257, d_model=32, head_dim=8, mlp_dim=32, n_layers=2))
    save_model(model, tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "bare")
    generation = json.loads((tmp_path / "bare" / "generation_config.json").read_text())
    assert generation["eos_token_id"] is None
    (tmp_path / "bare" / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": 13}))
    export(tmp_path / "bare", tmp_path / "named", tokenizer="gpt2")
    named = json.loads((tmp_path / "named" / "generation_config.json").read_text())
    assert named["eos_token_id"] == 13  # its own, kept
    assert named["bos_token_id"] == named["pad_token_id"] == 50256  # the nulls, filled
    assert json.loads((tmp_path / "named" / "config.json").read_text())["eos_token_id"] == 50256


def test_the_python_export_refuses_a_tokenizer_larger_than_the_model(tmp_path):
    """export() from Python (no model card, whose samples the CLI's refusal came from) refuses a tokenizer with
    more ids than the model has rows, before anything is written."""
    save_model(Gemma3(small_config()), tmp_path / "small")
    with pytest.raises(tinygemma.UserError, match="more than the model's 512"):
        export(tmp_path / "small", tmp_path / "new", tokenizer="gpt2")
    assert not (tmp_path / "new").exists()


def test_a_config_without_initializer_range_has_transformers_default_init_std():
    """A config.json without initializer_range reads as transformers reads it (its 0.02), so that an export of
    the loaded model writes back the value transformers had, not another."""
    required = dict(vocab_size=512, hidden_size=64, num_hidden_layers=6, num_attention_heads=8, intermediate_size=128)
    ours = model_config_from_hf({"model_type": "gemma3_text", **required})
    theirs = transformers.Gemma3TextConfig(**required)
    assert ours.init_std == theirs.initializer_range == 0.02
    assert hf_config(ours)["initializer_range"] == theirs.initializer_range


def test_a_transformers_folder_of_pt_weights_alone_is_refused_as_pickled(tmp_path):
    """A folder whose weights are only a pickled .pt file (consolidated.pt, model.pt) is named as pickled weights,
    which tinygemma never unpickles, not as a folder without weights."""
    save_model(Gemma3(small_config()), tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, tmp_path / "hf" / "model.pt")
    with pytest.raises(tinygemma.UserError, match="holds only pickled weights"):
        tinygemma.load(tmp_path / "hf")


def test_a_shard_index_listing_no_files_is_refused(tmp_path):
    from tinygemma.hf import read_hf_weights

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(tinygemma.UserError, match="lists no weight files"):
        read_hf_weights(tmp_path)


def test_the_transformers_reference_refuses_a_missing_weight(monkeypatch):
    pytest.importorskip("transformers")
    from tinygemma.hf import to_transformers

    real = tinygemma.hf.hf_state
    monkeypatch.setattr(tinygemma.hf, "hf_state",
                        lambda model: {k: v for k, v in real(model).items() if k != "model.norm.weight"})
    with pytest.raises(RuntimeError, match="does not take these weights"):
        to_transformers(Gemma3(small_config()))
