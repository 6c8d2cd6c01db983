"""Recipes: TOML files and --set overrides become typed dataclasses; anything unknown or impossible is refused by name."""

import dataclasses
import json
import math
import re
import shlex
from pathlib import Path

import pytest

from tinygemma import UserError
from tinygemma.config import (
    CHANGE_SETTINGS,
    MAX_SEED,
    DataConfig,
    ModelConfig,
    Recipe,
    TrainConfig,
    apply_overrides,
    check_sampling,
    load_recipe,
    settings_changes,
)
from tinygemma.optim import cooldown_start

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_a_sound_recipe():
    cfg = TrainConfig()
    assert cfg.min_lr < cfg.learning_rate and cfg.warmup_steps < cfg.max_steps
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert cfg.dtype == "auto" and cfg.compile == "auto" and cfg.device == "auto"


def test_workshop_recipe_is_the_notebook_with_its_bugs_fixed():
    recipe = load_recipe(CONFIGS / "workshop.toml")
    t = recipe.train
    assert recipe.model_preset == "gemma3-270m-gpt2" and recipe.data.tokenizer == "gpt2"
    assert (t.batch_size, t.block_size, t.grad_accum_steps) == (32, 128, 32)
    assert (t.learning_rate, t.beta1, t.beta2, t.weight_decay, t.adam_eps, t.grad_clip) == (1e-4, 0.9, 0.95, 0.1, 1e-9, 0.5)
    tokens = t.batch_size * t.block_size * t.grad_accum_steps * t.max_steps
    assert tokens == pytest.approx(614e6, rel=1e-3)  # the notebook's 150,000 micro-steps of 32 x 128
    assert t.min_lr < t.learning_rate  # fix: the notebook's min_lr was 5x its peak
    assert t.warmup_steps == round(1000 / 32)  # the notebook's 1,000 micro-steps, counted in optimizer steps
    assert t.dtype == "auto"  # fix: autocast (bf16, or fp16 on pre-Ampere GPUs) over float32 master weights
    assert (t.optimizer, t.lr_schedule) == ("adamw", "cosine")  # the notebook's optimizer, whatever the defaults
    assert recipe.model_config(vocab_size=50_257).num_params() == 132_490_496
    text = (CONFIGS / "workshop.toml").read_text()
    assert set(re.findall(r"FIX (\d)", text)) == {"1", "2", "3"}  # min_lr, master weights, end of text


@pytest.mark.parametrize("name", ["workshop.toml", "cpu-demo.toml", "speedrun.toml"])
def test_every_field_of_a_recipe_file_is_commented_with_its_default(name):
    text = (CONFIGS / name).read_text()
    fields = [line for line in text.splitlines() if re.match(r"^\w+ = ", line)]
    assert fields
    for line in fields:
        assert re.search(r"# .+\[.+\]$", line), f"{name}: {line!r} needs a comment ending with its [default]"
    recipe = load_recipe(CONFIGS / name)
    for section, values in recipe.to_dict().items():  # and the file sets every train field explicitly
        if section == "train":
            missing = [k for k in values  # (one left none: commented out, as TOML has no none)
                       if not re.search(rf"^{'(# )?' if values[k] is None else ''}{k} = ", text, re.MULTILINE)]
            assert not missing, f"{name} leaves train fields to their defaults: {missing}"
        elif section != "model":  # a preset, and what the recipe overrides of it
            # [data] and [generate] list every field too, those left unset (TOML has no none) commented out.
            listed = text.split(f"[{section}]")[1].split("\n[")[0]
            missing = [k for k in values if not re.search(rf"^(# )?{k} = .*\[.+\]$", listed, re.MULTILINE)]
            assert not missing, f"{name} does not list [{section}] fields: {missing}"


@pytest.mark.parametrize("name", ["workshop.toml", "cpu-demo.toml", "speedrun.toml"])
def test_the_bracketed_train_defaults_are_the_real_defaults(name):
    """Each [train] line's comment ends with the built-in default in brackets: it must be the current one, so a
    change of a default cannot leave the recipe files describing the old one."""
    import tomllib

    defaults = load_recipe(None).to_dict()["train"]
    section = (CONFIGS / name).read_text().split("[train]")[1].split("\n[")[0]
    checked = 0
    for key, shown in re.findall(r"^(?:# )?(\w+) = .*\[(\[[^\]]*\]|[^\]]*)\]$", section,
                                 re.MULTILINE):  # [x] or [[a, b]]; a setting left none is commented out
        try:
            value = tomllib.loads(f"v = {shown}")["v"]
        except tomllib.TOMLDecodeError:
            value = None if shown == "none" else shown  # a bare word: auto, ddp, runs/tinystories
        assert value == defaults[key], f"{name}: {key} says its default is [{shown}], it is {defaults[key]!r}"
        checked += 1
    assert checked == len(defaults)


def test_cpu_demo_is_small_and_takes_a_local_source():
    recipe = load_recipe(CONFIGS / "cpu-demo.toml", ["data.source=../shared/data/tinystories/train.txt"])
    assert recipe.data.source == ["../shared/data/tinystories/train.txt"]
    assert recipe.model_config(vocab_size=recipe.data.vocab_size).num_params() < 3_000_000
    assert recipe.train.device == "cpu" and recipe.train.dtype == "float32"


def test_overrides_are_typed_from_the_fields():
    recipe = load_recipe(None, [
        "batch_size=4", "train.learning_rate=3e-4", "min_lr=3e-5", "compile=false", "activation_checkpointing=yes",
        "model.preset=gemma3-tiny", "model.d_model=64", "model.tie_embeddings=false", "data.source=a.txt,b.txt",
        'data.val_source=["v.txt"]', "data.limit=none", "generate.top_p=0.9", "generate.top_k=none",
        "train.out=runs/x", "max_steps=1_000",
    ])
    assert recipe.train.batch_size == 4 and recipe.train.learning_rate == 3e-4 and recipe.train.max_steps == 1000
    assert recipe.train.compile == "false" and recipe.train.activation_checkpointing is True
    assert recipe.model_overrides == {"d_model": 64, "tie_embeddings": False}
    assert recipe.data.source == ["a.txt", "b.txt"] and recipe.data.val_source == ["v.txt"] and recipe.data.limit is None
    assert recipe.generate.top_p == 0.9 and recipe.generate.top_k is None and recipe.out == "runs/x"
    assert recipe.model_config(vocab_size=512).d_model == 64


def test_other_spellings_of_dtype_and_compile_are_the_same_settings():
    """generate and eval take --dtype bf16, and booleans take yes/on: train.dtype and train.compile refused them."""
    recipe = load_recipe(None, ["dtype=bf16", "compile=on"])
    assert (recipe.train.dtype, recipe.train.compile) == ("bfloat16", "true")  # recorded as the canonical value
    assert load_recipe(None, ["dtype=FP16", "compile=no"]).train.compile == "false"
    # Python's spelling of a boolean, and any case of a choice (compile=True was refused beside
    # activation_checkpointing=True, dtype=Float32 beside dtype=BF16)
    recipe = load_recipe(None, ["compile=True", "dtype=Float32", "device=CPU", "optimizer=AdamW", "lr_schedule=WSD"])
    assert (recipe.train.compile, recipe.train.dtype, recipe.train.device, recipe.train.optimizer,
            recipe.train.lr_schedule) == ("true", "float32", "cpu", "adamw", "wsd")
    with pytest.raises(UserError, match="train.compile must be one of auto, true, regional, false; got 'maybe'"):
        load_recipe(None, ["compile=Maybe"])


def test_the_speedrun_keeps_a_checkpoint_from_which_it_extends():
    """The speedrun's loss target is unmeasured, so a run may end short of it; a wsd run extends only from a
    checkpoint before its cooldown, and the recipe (checkpoints every 500 steps, the newest alone kept) had
    deleted step 1000 once 1500 was written: extending it meant training again from step 0."""
    t = load_recipe(CONFIGS / "speedrun.toml").train
    assert t.lr_schedule == "wsd"
    written = sorted({*range(t.checkpoint_interval, t.max_steps, t.checkpoint_interval), t.max_steps})
    kept_at_the_end = written[-t.keep_checkpoints:]  # besides the best, which may be any
    assert cooldown_start(t) in kept_at_the_end, (cooldown_start(t), kept_at_the_end)


def test_a_whole_number_written_as_a_float_in_a_recipe_file_is_that_integer(tmp_path):
    """TOML has no exponent integers: max_steps = 1e4 in a file was refused, where --set max_steps=1e4 gave 10,000.
    A fraction, or a float past exact integers, is still refused."""
    path = tmp_path / "r.toml"
    path.write_text("[train]\nmax_steps = 1e4\nbatch_size = 8.0\n")
    recipe = load_recipe(path, [])
    assert (recipe.train.max_steps, recipe.train.batch_size) == (10_000, 8)
    assert type(recipe.train.max_steps) is int
    for bad in ("2.5", "1e300", "nan"):
        path.write_text(f"[train]\nmax_steps = {bad}\n")
        with pytest.raises(UserError, match="train.max_steps must be an integer"):
            load_recipe(path, [])


def test_story_paths_take_a_path_likes_path_and_refuse_empty_ones(tmp_path):
    """os.DirEntry (from os.scandir) is path-like, but its str() is its repr: the source was "<DirEntry 'a.txt'>";
    an empty path would be read as the current folder."""
    import os

    from tinygemma.config import story_paths

    (tmp_path / "a.txt").write_text("Once.")
    assert story_paths(list(os.scandir(tmp_path)), "x") == [str(tmp_path / "a.txt")]
    for empty in ([""], [" "], ["a.txt", ""]):
        with pytest.raises(UserError, match="an empty path"):
            story_paths(empty, "data.source must be story files")


def test_the_version_is_one_flag_away(capsys):
    from tinygemma import __version__
    from tinygemma.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0 and capsys.readouterr().out == f"tinygemma {__version__}\n"


def test_a_recipe_round_trips_through_its_dict():
    recipe = load_recipe(CONFIGS / "cpu-demo.toml", ["model.n_layers=3", "model.layer_types=[\"full_attention\", "
                                                      "\"sliding_attention\", \"full_attention\"]"])
    again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert again == recipe


@pytest.mark.parametrize("field", ["rms_norm_eps", "rope_local_base", "rope_global_base", "query_pre_attn_scalar",
                                   "init_std"])
def test_model_floats_must_be_finite(field):
    """--set refuses nan and inf before a ModelConfig is made; the Python API and a config.json's NaN/Infinity
    reached the model, whose logits all came out NaN (an inf scale: uniform attention), generating nonsense."""
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(UserError, match=f"model.{field} must be a positive, finite number"):
            ModelConfig.preset("gemma3-tiny", **{field: value})


def test_vocabulary_comes_from_the_data_and_must_hold_it():
    recipe = load_recipe(None, ["model.preset=gemma3-270m"])
    assert recipe.model_config(vocab_size=512).vocab_size == 512  # the preset's 262,144 gives way to the data's
    assert load_recipe(None, ["model.vocab_size=1024"]).model_config(vocab_size=512).vocab_size == 1024
    with pytest.raises(UserError, match="cannot hold the data's tokens"):
        load_recipe(None, ["model.vocab_size=256"]).model_config(vocab_size=512)
    assert Recipe().model_config(vocab_size=100, needed=100).vocab_size == 100
    with pytest.raises(UserError, match="cannot hold its tokenizer's 100 ids"):  # data one id short of its tokenizer
        Recipe().model_config(vocab_size=99, needed=100)
    # Special ids past the text's (Gemma 3's <image_soft_token>) need no row: gemma-3-270m's shape is allowed
    assert load_recipe(None, ["model.vocab_size=511"]).model_config(512, needed=511).vocab_size == 511
    with pytest.raises(UserError, match="text and end-of-text take 511 ids"):
        load_recipe(None, ["model.vocab_size=510"]).model_config(512, needed=511)


@pytest.mark.parametrize("setting, message", [
    ("nonsense=1", "unknown setting train.nonsense"),
    ("optim.lr=1", "unknown section in optim.lr"),
    ("model.width=3", "unknown setting model.width"),
    ("data.path=x", "unknown setting data.path"),
    ("batch_size", "--set expects KEY=VALUE"),
    ("batch_size=0", "train.batch_size must be an integer >= 1"),
    ("batch_size=2.5", "train.batch_size must be an integer"),
    ("batch_size=99999999999999999999", "train.batch_size must be at most 1,048,576"),  # hung, listing its splits
    ("learning_rate=fast", "train.learning_rate must be a number"),
    ("learning_rate=nan", "train.learning_rate must be a number"),
    ("learning_rate=-1", "train.learning_rate must be a positive number"),
    ("min_lr=1", "min_lr (1.0) must not exceed train.learning_rate"),
    ("warmup_steps=6000", "warmup_steps (6000) must not exceed train.max_steps"),
    ("beta2=1", "train.beta2 must be a number in [0, 1)"),
    ("grad_clip=-1", "train.grad_clip must be a number >= 0"),
    ("dtype=fp8", "train.dtype must be one of auto, float32, bfloat16, float16"),
    ("device=tpu", "train.device must be one of auto, cpu, cuda, mps"),
    ("compile=maybe", "train.compile must be one of auto, true, regional, false"),
    ("distributed=zero3", "train.distributed must be one of ddp, fsdp"),
    ("loss_head=fused", "train.loss_head must be one of auto, chunked, full"),
    ("activation_checkpointing=sometimes", "train.activation_checkpointing must be true or false"),
    ("model.preset=gemma9", "unknown model preset 'gemma9'"),
    ("model.n_kv_heads=3", "n_heads (4) must be a multiple of n_kv_heads (3)"),
    ("model.sliding_window_pattern=0", "model.sliding_window_pattern must be >= 1, got 0"),  # named as set
    ("model.d_model=big", "model.d_model must be an integer"),
    ("model.vocab_pad_multiple=1000000000000", "model.vocab_pad_multiple must be at most 65,536"),  # out of memory
    ("model.n_layers=1e9", "model.n_layers must be at most 1,024"),  # built one module at a time: ran for minutes
    # a weight's size past int64: torch's traceback, in a dry run too
    ("model.mlp_dim=9223372036854775808", "model.mlp_dim must be at most 1,048,576, got 9,223,372,036,854,775,808"),
    ("model.d_model=1048577", "model.d_model must be at most 1,048,576"),
    ("model.head_dim=1e20", "model.head_dim must be at most 1,048,576"),
    ("data.source=[1, 2]", "data.source must be a list of strings"),
    ("block_size=40000", "train.block_size 40000 exceeds model.max_position_embeddings 32768"),
    ("seed=18446744073709551616", "train.seed must be at most 18,446,744,073,709,551,615 (64 bits)"),  # a traceback
    ("eval_batches=1000000000000", "train.eval_batches must be at most 1,048,576"),  # was out of memory, exit 1
    ("generate.temperature=-0.5", "generate.temperature must be a finite number >= 0, got -0.5"),
    ("generate.top_k=-5", "generate.top_k must be an integer >= 1 (0 or none: no top-k filter), got -5"),
    ("generate.min_p=2", "generate.min_p must be a number in [0, 1] (0 or none: off), got 2.0"),
    ("grad_accum_steps=1048577", "train.grad_accum_steps must be at most 1,048,576"),
    ("sample_interval=1000000000001", "train.sample_interval must be at most 1,000,000,000,000"),
    ("keep_checkpoints=0", "train.keep_checkpoints must be an integer >= 1"),
    ("log_interval=0", "train.log_interval must be an integer >= 1"),
    ("loggers=tensorbord", "train.loggers may name tensorboard, wandb, trackio; got 'tensorbord'"),
    ("generate.top_p=0", "generate.top_p must be a number in (0, 1], got 0.0"),
    ("generate.repetition_penalty=0", "generate.repetition_penalty must be a positive, finite number"),
    *((f"{name}=-1", f"train.{name} must be an integer >= 0, got -1")
      for name in ("warmup_steps", "eval_interval", "checkpoint_interval", "seed", "sample_interval")),
    ("adam_eps=1e39", "train.adam_eps must be a positive number within float32's range"),
    ("muon_learning_rate=1e39", "train.muon_learning_rate must be a positive number within float32's range"),
    ("cooldown_fraction=1.5", "train.cooldown_fraction must be a number in [0, 1], got 1.5"),
])
def test_bad_settings_are_refused_by_name(setting, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_recipe(None, [setting])


@pytest.mark.parametrize("setting, message", [
    ("data.limit=0", "data.limit must be an integer >= 1 or none, got 0"),
    ("data.vocab_size=100", "data.vocab_size must be an integer >= 257"),
    ("data.vocab_size=300000", "data.vocab_size must be at most 262,208"),  # named as set, not as prepare's flag
    ("data.vocab_size=4096", "data.vocab_size (4096) applies only to data.tokenizer = bpe; gpt2 has its own"),
    ("generate.seed=-1", "generate.seed must be an integer from 0"),  # named apart from train.seed
    ("generate.seed=9223372036854775808", "generate.seed must be an integer from 0 to 9,223,372,036,854,775,807 (a 64-bit seed), got "
                                          "9223372036854775808"),  # read exactly, not through a float
    ('generate.prompts=["Once", ""]', "generate.prompts holds ''"),
    ("generate.max_new_tokens=32769", "generate.max_new_tokens 32769 leaves no room for a prompt"),
])
def test_what_only_run_needs_is_refused_by_name_before_it_starts(setting, message):
    """[data] and the prompts' settings: `tinygemma run` refuses them before it prepares or trains; a run's saved
    recipe holding one (recorded before these checks) still reads, so that `train --resume` works."""
    recipe = load_recipe(None, [setting])
    with pytest.raises(UserError, match=re.escape(message)):
        recipe.check_for_run()
    assert Recipe.from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()


@pytest.mark.parametrize("setting", ['[train]\nout = "runs/a\\u0000b"', '[data]\nsource = ["a.txt", "b\\u0000.txt"]',
                                     '[data]\ndir = "d\\u0000"', '[train]\ninit_from = "\\u0000"',
                                     '[data]\ntokenizer = "t\\u0000.json"'])
def test_a_nul_character_in_a_path_setting_is_refused_by_name(tmp_path, capsys, setting):
    """A TOML's "\\u0000" in a setting naming a file or folder: one line naming the setting (train.out's was
    os.path's "embedded null byte" traceback, in a dry run too; data.dir's named a mangled path)."""
    from tinygemma.cli import main

    recipe = tmp_path / "nul.toml"
    recipe.write_text(setting + "\n")
    key = ".".join(part.strip("[]") for part in setting.split(" =")[0].split("\n"))
    with pytest.raises(UserError, match=re.escape(f"{key} holds a NUL character, which no path can")):
        load_recipe(recipe, [])
    assert main(["train", "--config", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NUL character" in err


def test_a_nul_character_in_a_path_given_from_python_is_refused_by_name():
    """A Path from Python (a notebook's recipe.out = Path(...), a source list of Paths) too, not only TOML's text."""
    from tinygemma.config import checked_recipe

    with pytest.raises(UserError, match=r"data.source holds a NUL character"):
        Recipe.from_dict({"data": {"source": [Path("a.txt"), Path("x\0y.txt")]}})
    recipe = load_recipe(None, [])
    recipe.out = Path("/tmp/x/a\0b")
    with pytest.raises(UserError, match=r"train.out holds a NUL character"):
        checked_recipe(recipe)


def test_the_python_api_takes_one_override_as_a_string_and_refuses_a_recipe_that_is_no_table():
    """load_recipe(None, "max_steps=500") walked the string a letter at a time ("--set expects KEY=VALUE, got 'm'");
    Recipe.from_dict(None) was a TypeError."""
    assert load_recipe(None, "max_steps=500").train.max_steps == 500
    assert apply_overrides(Recipe(), "max_steps=600").train.max_steps == 600
    with pytest.raises(UserError, match=r"recipe: a recipe is a table of sections, got NoneType"):
        Recipe.from_dict(None)


def test_a_prompt_with_commas_is_one_prompt_and_a_list_is_a_list():
    """--set generate.prompts=TEXT is one prompt, commas and all (it became two truncated prompts); a TOML
    array is a list of prompts; other lists still split on commas."""
    recipe = load_recipe(None, ["generate.prompts=Once upon a time, there was a dog", "loggers=tensorboard,wandb"])
    assert recipe.generate.prompts == ["Once upon a time, there was a dog"]
    assert recipe.train.loggers == ["tensorboard", "wandb"]
    assert load_recipe(None, ['generate.prompts=["One, two", "Three"]']).generate.prompts == ["One, two", "Three"]
    assert load_recipe(None, ["generate.prompts=[Title] Once"]).generate.prompts == ["[Title] Once"]  # no TOML
    assert load_recipe(None, ["generate.prompts="]).generate.prompts == []  # no samples, as before


def test_none_and_a_top_k_of_0_read_from_a_recipe_file(tmp_path):
    """TOML has no null: an optional field written "none" in a recipe file is none, as the comments say (it was
    refused as 'a quoted string'); top_k = 0 means no top-k filter, as `generate --top-k 0` (was refused)."""
    path = tmp_path / "recipe.toml"
    path.write_text('[data]\nlimit = "none"\n[generate]\ntop_k = "none"\ntop_p = "None"\n')
    recipe = load_recipe(path)
    assert recipe.data.limit is None and recipe.generate.top_k is None and recipe.generate.top_p is None
    path.write_text("[generate]\ntop_k = 0\n")
    assert load_recipe(path).generate.top_k is None
    assert load_recipe(None, ["generate.top_k=0"]).generate.top_k is None


def test_a_huge_integer_setting_is_read_exactly():
    assert load_recipe(None, ["generate.seed=9223372036854775807"]).generate.seed == 2**63 - 1
    assert load_recipe(None, ["seed=18446744073709551615"]).train.seed == 2**64 - 1  # torch and numpy take it
    assert load_recipe(None, ["batch_size=1e2", "max_steps=4_000"]).train.batch_size == 100
    # A whole number written in a float's form is read exactly too, not rounded through a float
    assert load_recipe(None, ["seed=12345678901234567.0"]).train.seed == 12345678901234567
    assert load_recipe(None, ["seed=1.8446744073709551615e19"]).train.seed == 2**64 - 1
    for text in ("seed=1.5", "seed=nan", "seed=inf", "seed=1e", "seed=1e500000000"):  # (the last: not built)
        with pytest.raises(UserError, match="train.seed must be an integer"):
            load_recipe(None, [text])
    for text in ("max_steps=1e30", "max_steps=1" + "0" * 400, "eval_interval=1e13"):  # a float's overflow later
        with pytest.raises(UserError, match=r"must be at most 1,000,000,000,000, got"):
            load_recipe(None, [text])


def test_bad_recipe_files_are_refused(tmp_path):
    cases = {
        "[train]\nbatch_size = \"32\"\n": "train.batch_size must be an integer, got '32' (a quoted string in the "
                                         "recipe file: numbers and true/false go without quotes)",
        "[train]\nlearning_rate = \"3e-4\"\n": "train.learning_rate must be a number, got '3e-4' (a quoted string",
        "[train]\nlearning_rate = true\n": "train.learning_rate must be a number",
        "[train]\nmicro_batch_size = 4.0\n": "train.micro_batch_size must be auto or a positive integer, got 4.0",
        # A number or a boolean for a text setting was taken as its text: out = 5 trained into a folder named 5
        "[train]\nout = 5\n": "train.out must be a string, got 5",
        "[train]\ndtype = 16\n": "train.dtype must be a string, got 16",
        "[train]\nmicro_batch_size = true\n": "train.micro_batch_size must be auto or a positive integer, got True",
        "[data]\ntokenizer = 5\nvocab_size = 300\n": "data.tokenizer must be a string, got 5",
        "[data]\ndir = 5\n": "data.dir must be a string, got 5",
        "[model]\npreset = 270\n": "model.preset must be a string, got 270",
        "[training]\nbatch_size = 3\n": "unknown section(s) training",
        "[train]\nbatch_size = 3\nbatch_sise = 4\n": "unknown setting train.batch_sise",
        "[model]\npreset = \"gemma3-tiny\"\nlayers = 4\n": "unknown setting model.layers",
        "train = 3\n": "[train] must be a table",
        "[train\n": "is not valid TOML",
    }
    for text, message in cases.items():
        path = tmp_path / "recipe.toml"
        path.write_text(text)
        with pytest.raises(UserError, match=re.escape(message)):
            load_recipe(path)
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "missing.toml")


def test_data_tokenizer_is_named_text_or_a_path():
    """An empty data.tokenizer (`--set data.tokenizer=`) is refused by name; a pathlib.Path, which the Python API
    takes for the other paths of [data], is a tokenizer.json path as its text is."""
    from tinygemma.config import DataConfig

    DataConfig(tokenizer=Path("stories/tokenizer.json")).validate()
    for empty in ("", "  ", None):
        with pytest.raises(UserError, match="data.tokenizer must name a tokenizer"):
            DataConfig(tokenizer=empty).validate()


def test_a_damaged_model_record_is_one_line():
    """A checkpoint.json whose model table was damaged or hand-edited ended in a TypeError traceback (now on run's
    early check of train.init_from too)."""
    from tinygemma import ModelConfig, UserError

    for record, message in ((None, "a model config is a table of fields, got NoneType"),
                            ([1], "a model config is a table of fields, got list"),
                            ({"layer_types": 5}, "a model config holds a value of the wrong type"),
                            ({"tie_embeddings": "false"}, "model.tie_embeddings must be true or false"),
                            ({"sliding_window_pattern": 2.5}, "model.sliding_window_pattern must be a positive integer")):
        with pytest.raises(UserError, match=message):
            ModelConfig.from_dict(record)


def test_the_closing_story_command_gives_the_recipes_sampling_settings(monkeypatch):
    from tinygemma.config import GenerateConfig
    from tinygemma.pipeline import sampling_flags

    assert sampling_flags(GenerateConfig()) == ""
    assert sampling_flags(GenerateConfig(top_k=None, top_p=0.9, seed=42, repetition_penalty=1.2)) == (
        " --top-k none --top-p 0.9 --repetition-penalty 1.2 --seed 42")
    # The recipe's sample length too (cpu-demo's 100), not generate's default 200.
    assert sampling_flags(GenerateConfig(max_new_tokens=100)) == " --max-new-tokens 100"
    assert sampling_flags(GenerateConfig(min_p=0.05)) == " --min-p 0.05"
    assert sampling_flags(GenerateConfig(stop=["\n", "The end"])) == " --stop '\n' --stop 'The end'"
    from tinygemma.cli import build_parser

    for stop in ("---", "-e", "\n"):  # a text that starts with "-" as --stop=TEXT: argparse took it for a flag
        words = shlex.split(sampling_flags(GenerateConfig(stop=[stop])))
        assert build_parser().parse_args(["generate", "--ckpt", "run", "--prompt", "Once", *words]).stop == [stop]
    from tinygemma.config import load_recipe
    from tinygemma.pipeline import where_and_next

    monkeypatch.chdir(CONFIGS.parent)  # the recipe named as a user names it, from the checkout's root
    recipe = load_recipe("configs/cpu-demo.toml")
    story = [line for line in where_and_next(recipe, "configs/cpu-demo.toml", []).splitlines()
             if line.startswith("a story")]
    assert story and f"--max-new-tokens {recipe.generate.max_new_tokens} " in story[0] + " "
    assert story[0].count("--max-new-tokens") == 1


def test_a_recipes_stop_texts_are_read_as_its_prompts_and_refused_before_anything_runs(tmp_path):
    """generate.stop: none by default; one text (a TOML string, or --set's text, its commas its own) or a TOML
    array. An empty one, or one that is not UTF-8 (a byte that is not, in --set's argument), is refused as the
    recipe is read; a prompt that is not UTF-8, before `run` prepares or trains anything."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('[generate]\nstop = "\\n"\n')
    assert load_recipe(None).generate.stop == []
    assert load_recipe(str(recipe)).generate.stop == ["\n"]
    assert load_recipe(str(recipe), ["generate.stop="]).generate.stop == []
    assert load_recipe(None, ["generate.stop=, or ."]).generate.stop == [", or ."]
    assert load_recipe(None, ['generate.stop=["\\n\\n", "The end"]']).generate.stop == ["\n\n", "The end"]
    for text in ("\n", "\n\n", " The end", " "):  # one text as it is given: --set strips no stop text
        assert load_recipe(None, [f"generate.stop={text}"]).generate.stop == [text]
    for setting, message in (('generate.stop=["a", ""]', "generate.stop must be text, or a list of texts, none "
                                                          "of them empty"),
                             ("generate.stop=a\udcff", r"generate.stop 'a\\udcff' is not UTF-8 text"),
                             ("generate.stop=[1]", "generate.stop must be a list of strings")):
        with pytest.raises(UserError, match=message):
            load_recipe(None, [setting])
    prompts = load_recipe(None, ["generate.prompts=Once\udcff"])
    with pytest.raises(UserError, match=r"generate.prompts holds 'Once\\udcff', which is not UTF-8 text"):
        prompts.check_for_run()


def test_the_closing_story_command_samples_where_run_did(monkeypatch):
    """run samples a CPU run in float32; generate's --dtype auto takes bfloat16 on a CPU that computes in it
    natively, which rounds otherwise and gives other text: the command then says --dtype float32."""
    import torch

    import tinygemma.devices as devices
    import tinygemma.pipeline as pipeline

    recipe = load_recipe(None, ["device=cpu", "dtype=float32"])
    monkeypatch.setattr(pipeline, "pick_device", lambda name: torch.device("cpu"))  # (a GPU machine's auto too)
    for native, flags in ((True, " --dtype float32"), (False, "")):
        monkeypatch.setattr(devices, "cpu_has_bf16", lambda native=native: native)
        assert pipeline.place_flags(recipe) == flags


def test_numpy_integers_and_floats_from_a_notebook_are_taken_as_pythons():
    """np.int64 from a notebook's arithmetic: accepted everywhere an int is, and stored as Python's, since
    config.json is written as JSON; a numpy float too. A float where an integer belongs is still refused."""
    import numpy as np

    model = ModelConfig.preset("gemma3-tiny", n_layers=np.int64(6), sliding_window_pattern=np.int32(3))
    train = TrainConfig(batch_size=np.int64(8), learning_rate=np.float32(5e-4), micro_batch_size=np.int64(4))
    data = DataConfig(limit=np.int64(5))
    data.validate()
    assert model.layer_types.count("full_attention") == 2
    assert type(model.n_layers) is int and type(train.batch_size) is int and type(data.limit) is int
    assert type(train.learning_rate) is float and train.micro_batch_size == "4"
    json.dumps([dataclasses.asdict(model), dataclasses.asdict(train), dataclasses.asdict(data)])
    with pytest.raises(UserError, match="train.batch_size must be an integer >= 1, got np.float64"):
        TrainConfig(batch_size=np.float64(8))
    # Set on a recipe afterwards, as a notebook does: train() and run() read it through checked_recipe.
    from tinygemma.config import GenerateConfig, checked_recipe

    recipe = load_recipe(None)
    recipe.train.batch_size, recipe.train.learning_rate = np.int64(8), np.float32(1e-3)
    recipe.model_overrides["n_layers"], recipe.generate = np.int64(4), GenerateConfig(seed=np.int64(3))
    checked = checked_recipe(recipe)
    assert (checked.train.batch_size, checked.model_overrides["n_layers"], checked.generate.seed) == (8, 4, 3)
    assert type(checked.train.learning_rate) is float


def test_set_items_are_read_one_way_everywhere():
    """--set KEY=VALUE: a bare key is train's, spaces around either side are dropped; the run's closing "train
    longer" command replaces the run's own max_steps and out however they were spelled."""
    from tinygemma.config import parse_override
    from tinygemma.pipeline import where_and_next

    assert parse_override(" max_steps = 5 ") == ("train.max_steps", "5")
    assert parse_override("model.n_layers=2") == ("model.n_layers", "2")
    with pytest.raises(UserError, match="--set expects KEY=VALUE, got 'max_steps'"):
        parse_override("max_steps")
    recipe = load_recipe(CONFIGS / "cpu-demo.toml")  # (its path is not printed here)
    longer = [line for line in where_and_next(recipe, "r.toml", ["max_steps=5", " out = x", "model.n_layers=2"])
              .splitlines() if line.startswith("train longer")][0]
    assert "max_steps=5" not in longer and "out = x" not in longer and "--set model.n_layers=2" in longer


def test_config_bounds_at_their_edges():
    """A flat learning rate (min_lr = learning_rate) is a schedule, not an error; a block of exactly the model's
    positions is accepted and one more refused; nothing after = is none for a setting that takes none."""
    from tinygemma.config import MAX_BATCH, check_block_size

    assert load_recipe(None, ["learning_rate=1e-3", "min_lr=1e-3"]).train.min_lr == 1e-3
    with pytest.raises(UserError, match="min_lr"):
        load_recipe(None, ["learning_rate=1e-3", "min_lr=1.1e-3"])
    config = ModelConfig.preset("gemma3-tiny")
    check_block_size(config.max_position_embeddings, config)
    with pytest.raises(UserError, match="exceeds model.max_position_embeddings"):
        check_block_size(config.max_position_embeddings + 1, config)
    recipe = load_recipe(None, ["generate.top_p=", "init_from=", "data.vocab_size="])
    assert (recipe.generate.top_p, recipe.train.init_from, recipe.data.vocab_size) == (None, None, None)
    for name in ("batch_size", "grad_accum_steps", "eval_batches"):  # the largest is taken, one more refused
        assert getattr(load_recipe(None, [f"{name}={MAX_BATCH}"]).train, name) == MAX_BATCH
        with pytest.raises(UserError, match=f"train.{name} must be at most"):
            load_recipe(None, [f"{name}={MAX_BATCH + 1}"])
    assert load_recipe(None, ["max_steps=10", "warmup_steps=10"]).train.warmup_steps == 10
    with pytest.raises(UserError, match=re.escape("warmup_steps (11) must not exceed train.max_steps (10)")):
        load_recipe(None, ["max_steps=10", "warmup_steps=11"])
    assert load_recipe(None, ["cooldown_fraction=1"]).train.cooldown_fraction == 1.0
    # the vocabulary padded to the next multiple, not one more
    assert [ModelConfig.preset("gemma3-tiny", vocab_size=v, vocab_pad_multiple=128).padded_vocab_size
            for v in (256, 257)] == [256, 384]
    assert ModelConfig.preset("gemma3-tiny", vocab_size=500).padded_vocab_size == 500  # multiple 1: off


@pytest.mark.parametrize("section", ["data", "train", "generate"])
def test_a_recipe_section_replaced_by_a_dict_is_one_line(section):
    from tinygemma.config import checked_recipe

    recipe = load_recipe(None)
    setattr(recipe, section, {"max_steps": 3})
    kind = {"data": "DataConfig", "train": "TrainConfig", "generate": "GenerateConfig"}[section]
    with pytest.raises(UserError, match=rf"recipe.{section} must be a {kind}, got dict: set its fields instead"):
        checked_recipe(recipe)


def test_new_tokens_may_fill_every_position_after_a_one_token_prompt():
    """The last new token takes no position: a one-token prompt leaves room for max_position_embeddings of them."""
    positions = load_recipe(None).model_config().max_position_embeddings
    load_recipe(None, [f"generate.max_new_tokens={positions}"]).check_generate()
    with pytest.raises(UserError, match=f"generate.max_new_tokens {positions + 1} leaves no room"):
        load_recipe(None, [f"generate.max_new_tokens={positions + 1}"]).check_generate()


def test_a_switch_between_ddp_and_fsdp_is_a_change_where_processes_share_the_steps():
    """DDP to FSDP2 under torchrun rounds bf16 otherwise: a resume records it, so that the report's Reproduce
    commands split the steps alike; on one process (or a count not known) `distributed` does nothing."""
    from tinygemma.config import CHANGE_SETTINGS, TrainConfig, settings_changes

    saved = dataclasses.asdict(TrainConfig())
    now = TrainConfig(distributed="fsdp", compile=True)  # (compile=True from Python, as from a recipe file)
    assert now.compile == "true"
    # (compile too, on any count of processes: compiled kernels round otherwise)
    assert settings_changes(saved, now, CHANGE_SETTINGS, 2) == {"distributed": ["ddp", "fsdp"],
                                                                "compile": ["auto", "true"]}
    assert settings_changes(saved, now, CHANGE_SETTINGS, 1) == {"compile": ["auto", "true"]}


def test_commands_printed_for_pasting_are_quoted_for_the_users_shell(monkeypatch):
    """On Windows, cmd.exe (Anaconda Prompt) splits a single-quoted prompt ("unrecognized arguments: upon a time'"):
    the commands tinygemma prints for pasting are double-quoted there, which PowerShell reads too; POSIX elsewhere."""
    from tinygemma import errors
    from tinygemma.pipeline import where_and_next

    monkeypatch.chdir(CONFIGS.parent)
    recipe = load_recipe("configs/cpu-demo.toml")
    assert errors.shell_quote("Once upon a time") == "'Once upon a time'"
    posix = where_and_next(recipe, "configs/cpu-demo.toml", ["max_steps=5"])
    assert "--prompt 'Once upon a time'" in posix
    monkeypatch.setattr(errors, "WINDOWS", True)
    assert errors.shell_quote("Once upon a time") == '"Once upon a time"' and errors.shell_quote("runs\\a") == "runs\\a"
    windows = where_and_next(recipe, "configs/cpu-demo.toml", ["max_steps=5"])
    assert "--prompt \"Once upon a time\"" in windows and "'" not in windows


# ------------------------------------------------------------------ mutation round 14

def test_a_resume_s_changes_name_the_cooldown_of_wsd_and_muon_s_rate_and_the_micro_batch():  # c02, c03, c05
    saved = {"lr_schedule": "wsd", "optimizer": "muon", "cooldown_fraction": 0.4, "muon_learning_rate": 0.04,
             "micro_batch_size": "auto"}
    cfg = TrainConfig(cooldown_fraction=0.2, muon_learning_rate=0.02, micro_batch_size="4")
    changes = settings_changes(saved, cfg, CHANGE_SETTINGS)
    assert changes["cooldown_fraction"] == [0.4, 0.2]
    assert changes["muon_learning_rate"] == [0.04, 0.02]
    assert changes["micro_batch_size"] == ["auto", "4"]


def test_compile_off_is_false():  # c06
    assert TrainConfig(compile="off").compile == "false"
    assert load_recipe(None, ["compile=off"]).train.compile == "false"


def test_warmup_may_last_the_whole_run_and_cooldown_may_be_none():  # c08, c12
    assert TrainConfig(max_steps=10, warmup_steps=10).warmup_steps == 10
    assert TrainConfig(cooldown_fraction=0).cooldown_fraction == 0


@pytest.mark.parametrize("value", ["0", "abc"])
def test_a_micro_batch_size_of_zero_or_a_word_is_refused(value):  # c10
    with pytest.raises(UserError, match="micro_batch_size"):
        TrainConfig(micro_batch_size=value)


def test_only_cuda_takes_a_device_index():  # c11
    assert TrainConfig(device="cuda:1").device == "cuda:1"
    with pytest.raises(UserError, match="train.device"):
        TrainConfig(device="cpu:1")


def test_data_settings_refused_before_run_prepares():  # c15, c16, c28
    with pytest.raises(UserError, match="data.vocab_size"):
        DataConfig(tokenizer="bpe", vocab_size=256).validate()
    with pytest.raises(UserError, match="applies only to data.tokenizer = bpe"):
        DataConfig(tokenizer="gpt2", vocab_size=4096).validate()
    with pytest.raises(UserError, match="an empty path"):
        DataConfig(source=["  "]).validate()


def test_generate_may_fill_every_position_but_the_prompt_s():  # c18
    recipe = load_recipe(None, ["model.preset=gemma3-tiny", "model.max_position_embeddings=64", "block_size=64",
                                "generate.max_new_tokens=64"])
    recipe.check_generate()
    recipe.generate.max_new_tokens = 65
    with pytest.raises(UserError, match="max_new_tokens"):
        recipe.check_generate()


def test_a_blank_out_in_a_recipe_file_is_refused():  # c20
    with pytest.raises(UserError, match="train.out is empty"):
        Recipe.from_dict({"train": {"out": "   "}})


def test_a_toml_boolean_for_compile_is_its_word():  # c24
    assert Recipe.from_dict({"train": {"compile": True}}).train.compile == "true"
    assert Recipe.from_dict({"train": {"compile": False}}).train.compile == "false"


def test_set_loggers_to_nothing_turns_the_trackers_off():  # c26
    assert load_recipe(None, ["loggers="]).train.loggers == []
    assert load_recipe(None, ["loggers=tensorboard,"]).train.loggers == ["tensorboard"]


def test_the_seed_of_the_last_prompt_fits_64_bits():  # c29
    check_sampling(10, seed=MAX_SEED - 1, prompts=2)
    with pytest.raises(UserError, match="seed"):
        check_sampling(10, seed=MAX_SEED, prompts=2)


def test_min_p_zero_is_off_not_refused():  # c30
    check_sampling(10, min_p=0.0, prefix="--")


def test_a_recipe_with_a_byte_order_mark_is_read(tmp_path):  # c31
    path = tmp_path / "r.toml"
    path.write_bytes(b"\xef\xbb\xbf[train]\nmax_steps = 7\nwarmup_steps = 0\n")
    assert load_recipe(path).train.max_steps == 7


def test_a_superscript_micro_batch_is_one_line():  # e03
    with pytest.raises(UserError, match="micro_batch_size"):
        TrainConfig(micro_batch_size="²")


def test_the_commands_printed_for_the_user_are_quoted():  # e04
    from tinygemma.errors import shell_join
    assert shell_join(["tinygemma", "run", "my recipe.toml", "--set", "generate.prompts=Once upon"]) == \
        "tinygemma run 'my recipe.toml' --set 'generate.prompts=Once upon'"


def test_a_setting_given_by_a_flag_and_by_set_is_refused(tmp_path, capsys):  # l04
    from tinygemma.cli import main
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--max-steps", "10", "--set", "max_steps=20", "--dry-run"]) == 2
    assert "--max-steps and --set max_steps=20 both set train.max_steps; give it once" in capsys.readouterr().err
    assert not out.exists()


def test_the_presets_are_the_sizes_the_readme_names():
    from tinygemma.config import GLOBAL, SLIDING

    gpt2 = ModelConfig.preset("gemma3-270m-gpt2")
    assert gpt2.vocab_size == 50_257 and gpt2.num_params() == 132_490_496
    tiny = ModelConfig.preset("gemma3-tiny")
    assert (tiny.vocab_size, tiny.d_model, tiny.n_layers, tiny.n_heads, tiny.n_kv_heads, tiny.head_dim,
            tiny.mlp_dim) == (50_257, 128, 6, 4, 1, 32, 512)
    assert (tiny.sliding_window, tiny.query_pre_attn_scalar, tiny.max_position_embeddings) == (64, 32.0, 2048)
    assert tiny.layer_types == (SLIDING,) * 5 + (GLOBAL,)  # "6 layers so that the last one is global"
    assert tiny.num_params() == 7_861_888  # README: `gemma3-tiny` | 50,257 | 7,861,888


def test_a_model_with_fewer_layers_than_its_period_has_that_period():
    """Every layer sliding (a 5-layer model of period 6, a 3-layer tiny) repeats the period n_layers + 1: the HF
    export writes it as sliding_window_pattern, and no "repeat no period" note is printed."""
    assert ModelConfig.preset("gemma3-tiny", n_layers=5).layer_pattern == 6
    assert ModelConfig.preset("gemma3-tiny", n_layers=3).layer_pattern == 4
    assert ModelConfig.preset("gemma3-tiny", n_layers=1).layer_pattern == 2
    irregular = ("full_attention", "sliding_attention", "full_attention", "full_attention")
    assert ModelConfig.preset("gemma3-tiny", n_layers=4, layer_types=irregular).layer_pattern is None


def test_model_bounds_at_their_edges():
    """Each bound is "at most N": N itself is taken, N + 1 refused."""
    from tinygemma.config import MAX_LAYERS, MAX_MODEL_VOCAB_SIZE, MAX_VOCAB_PAD_MULTIPLE

    assert ModelConfig.preset("gemma3-tiny", n_layers=MAX_LAYERS).n_layers == 1024
    with pytest.raises(UserError, match="model.n_layers must be at most 1,024, got 1,025"):
        ModelConfig.preset("gemma3-tiny", n_layers=MAX_LAYERS + 1)
    assert ModelConfig.preset("gemma3-tiny", vocab_size=MAX_MODEL_VOCAB_SIZE).vocab_size == 2**22
    with pytest.raises(UserError, match="model.vocab_size must be at most 4,194,304, got 4,194,305"):
        load_recipe(None, ["model.vocab_size=4194305"])
    assert ModelConfig.preset("gemma3-tiny", vocab_pad_multiple=MAX_VOCAB_PAD_MULTIPLE).padded_vocab_size == 65_536
    with pytest.raises(UserError, match="model.vocab_pad_multiple must be at most 65,536"):
        ModelConfig.preset("gemma3-tiny", vocab_pad_multiple=MAX_VOCAB_PAD_MULTIPLE + 1)


@pytest.mark.parametrize("field", ["rms_norm_eps", "rope_local_base", "rope_global_base", "query_pre_attn_scalar",
                                   "init_std"])
def test_model_floats_of_zero_are_refused(field):
    """A query_pre_attn_scalar of 0 scales the queries by 0 ** -0.5 (inf: NaN logits); init_std 0 makes every weight
    zero; a RoPE base of 0 has no frequencies: "a positive, finite number" excludes 0."""
    with pytest.raises(UserError, match=f"model.{field} must be a positive, finite number, got 0"):
        load_recipe(None, ["model.preset=gemma3-tiny", f"model.{field}=0"])


def test_a_config_copied_with_another_depth_says_how_to_make_its_layer_types():
    """A copy of a config with n_layers changed keeps the old layer_types: the refusal says to leave them out."""
    config = ModelConfig.preset("gemma3-tiny")
    with pytest.raises(UserError, match=re.escape("model.layer_types has 6 entries for 4 layers (leave it out, and "
                                                  "sliding_window_pattern makes it: ModelConfig.preset(NAME, "
                                                  "n_layers=N) does)")):
        ModelConfig.from_dict({**config.to_dict(), "n_layers": 4})
    fixed = {k: v for k, v in config.to_dict().items() if k != "layer_types"}
    assert ModelConfig.from_dict({**fixed, "n_layers": 4}) == ModelConfig.preset("gemma3-tiny", n_layers=4)


def test_layer_types_of_another_kind_are_refused():
    """transformers' other attention kinds (Llama 4's chunked_attention) have no implementation here: they would
    have been read as sliding layers."""
    with pytest.raises(UserError, match=re.escape("model.layer_types may hold only 'sliding_attention' and "
                                                  "'full_attention', not ['chunked_attention']")):
        ModelConfig.preset("gemma3-tiny", n_layers=2, layer_types=["sliding_attention", "chunked_attention"])


def test_a_model_read_from_its_record_keeps_its_period():
    """config.json's layer_types is a JSON list: read back, it is the tuple the pattern derives, so that the HF
    export still writes sliding_window_pattern (transformers < 4.53) and prints no "repeat no period" note."""
    import json

    config = ModelConfig.preset("gemma3-tiny", n_layers=12)
    again = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.layer_pattern == 6
    assert isinstance(again.layer_types, tuple) and again == config


def test_no_prompts_need_no_room_for_new_tokens():
    """generate.prompts= (no samples) with a long max_new_tokens samples nothing: nothing to refuse."""
    recipe = load_recipe(None, ["model.preset=gemma3-tiny", "generate.prompts=", "generate.max_new_tokens=4096"])
    recipe.check_for_run()
    with pytest.raises(UserError, match="generate.max_new_tokens 4096 leaves no room"):
        load_recipe(None, ["model.preset=gemma3-tiny", "generate.max_new_tokens=4096"]).check_for_run()


def test_an_empty_data_dir_is_refused():
    """--set data.dir= would prepare into, and train from, the current folder."""
    with pytest.raises(UserError, match="data.dir is empty: it must name the prepared data's folder"):
        load_recipe(None, ["data.dir="])


def test_null_in_a_recipe_file_is_none(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('[data]\nlimit = "null"\n[generate]\ntop_p = "NULL"\n')
    recipe = load_recipe(path)
    assert recipe.data.limit is None and recipe.generate.top_p is None


def test_a_float_integer_past_a_float_s_precision_in_a_recipe_file_is_refused(tmp_path):
    """seed = 12345678901234567.0 is read by TOML as the float 12345678901234568.0: taken, the run's seed would
    silently be another than the file says."""
    path = tmp_path / "recipe.toml"
    path.write_text("[train]\nseed = 12345678901234567.0\n")
    with pytest.raises(UserError, match="train.seed must be an integer"):
        load_recipe(path)
    path.write_text("[train]\nseed = 9007199254740992.0\n")  # 2**53: still exact
    assert load_recipe(path).train.seed == 2**53


def test_an_integer_micro_batch_in_a_recipe_file_is_taken(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text("[train]\nmicro_batch_size = 4\n")
    assert load_recipe(path).train.micro_batch_size == "4"


def test_a_boolean_setting_takes_any_case():
    recipe = load_recipe(None, ["activation_checkpointing=True", "model.tie_embeddings=FALSE"])
    assert recipe.train.activation_checkpointing is True and recipe.model_overrides["tie_embeddings"] is False


def test_a_tuple_of_paths_or_loggers_set_from_python_is_a_list():
    from tinygemma.config import checked_recipe

    recipe = load_recipe(None)
    recipe.train.loggers, recipe.data.source = ("tensorboard",), ("a.txt", "b.txt")
    checked = checked_recipe(recipe)
    assert checked.train.loggers == ["tensorboard"] and checked.data.source == ["a.txt", "b.txt"]


def test_adamw_s_first_step_must_fit_float32():
    with pytest.raises(UserError, match=re.escape("train.learning_rate / (1 - train.beta1) (AdamW's first step size) "
                                                  "must be within float32's range")):
        load_recipe(None, ["learning_rate=1e38", "min_lr=0", "beta1=0.99"])


def test_a_blank_init_from_in_a_recipe_file_is_refused(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('[train]\ninit_from = "   "\n')
    with pytest.raises(UserError, match="train.init_from must name a run, checkpoint or transformers folder"):
        load_recipe(path)


def test_data_vocab_size_at_its_edge():
    from tinygemma.config import MAX_VOCAB_SIZE

    DataConfig(tokenizer="bpe", vocab_size=MAX_VOCAB_SIZE).validate()
    with pytest.raises(UserError, match=r"data.vocab_size must be at most 262,208 \(.*\), got 262,209"):
        DataConfig(tokenizer="bpe", vocab_size=MAX_VOCAB_SIZE + 1).validate()


def test_a_resume_s_changes_name_eval_batches_and_sample_interval():
    saved = dataclasses.asdict(TrainConfig())
    now = TrainConfig(eval_batches=20, sample_interval=100)
    assert settings_changes(saved, now) == {"eval_batches": [10, 20]}  # a warned step setting
    assert settings_changes(saved, now, CHANGE_SETTINGS) == {"eval_batches": [10, 20], "sample_interval": [0, 100]}


def test_a_run_from_before_the_schedule_setting_was_cosine():
    """A run recorded before lr_schedule existed trained with cosine: resumed under today's wsd default, that is a
    change (and refused or warned as one), not silently the same schedule."""
    saved = {k: v for k, v in dataclasses.asdict(TrainConfig(optimizer="adamw")).items() if k != "lr_schedule"}
    assert settings_changes(saved, TrainConfig(optimizer="adamw")) == {"lr_schedule": ["cosine", "wsd"]}
    assert settings_changes(saved, TrainConfig(optimizer="adamw", lr_schedule="cosine")) == {}


def test_fp32_and_compiled_are_settings_too():
    recipe = load_recipe(None, ["dtype=fp32", "muon_backend=compiled"])
    assert (recipe.train.dtype, recipe.train.muon_backend) == ("float32", "compiled")


def test_greedy_no_new_tokens_and_seed_0_are_sound_sampling():
    recipe = load_recipe(None, ["generate.temperature=0", "generate.max_new_tokens=0", "generate.seed=0"])
    recipe.check_for_run()
    assert (recipe.generate.temperature, recipe.generate.max_new_tokens, recipe.generate.seed) == (0.0, 0, 0)
    check_sampling(0, temperature=0, seed=0)


def test_a_path_like_of_bytes_is_refused_as_a_source():
    class BytesPath:
        def __fspath__(self):
            return b"stories.txt"

    with pytest.raises(UserError, match="data.source must be a list of story files"):
        DataConfig(source=[BytesPath()]).validate()


def test_cooldown_fraction_is_no_change_to_a_cosine_run():
    saved = dataclasses.asdict(TrainConfig(lr_schedule="cosine"))
    assert settings_changes(saved, TrainConfig(lr_schedule="cosine", cooldown_fraction=0.3)) == {}
    saved = dataclasses.asdict(TrainConfig(lr_schedule="wsd"))  # wsd reads it: a change
    assert settings_changes(saved, TrainConfig(lr_schedule="wsd", cooldown_fraction=0.3)) == {
        "cooldown_fraction": [0.4, 0.3]}


def test_an_infinite_temperature_is_refused():
    with pytest.raises(UserError, match=r"temperature must be a finite number >= 0, got inf"):
        check_sampling(10, temperature=float("inf"))
    with pytest.raises(UserError, match=r"--temperature must be a finite number >= 0, got inf"):
        check_sampling(10, temperature=float("inf"), prefix="--")


def test_a_top_k_of_zero_from_python_is_refused():
    """From Python, top_k's "off" is None alone (a recipe file's 0 reads as none)."""
    check_sampling(10, top_k=1)
    with pytest.raises(UserError, match="top_k must be an integer >= 1"):
        check_sampling(10, top_k=0)
