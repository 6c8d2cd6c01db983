"""The Hugging Face adapter: Gemma 3 as transformers names, configures and stores it, both ways.

One table maps every parameter name (`HF_NAME_MAP`, with `{}` for the layer index) and its inverse; config.json
converts to and from ModelConfig; a transformers directory (single or sharded safetensors) loads as a Gemma3, and
a Gemma3 saves as a directory that `Gemma3ForCausalLM.from_pretrained` loads with no missing or unexpected keys,
and such a directory can be uploaded to the hub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tinygemma.config import GLOBAL, SLIDING, ModelConfig
from tinygemma.devices import dtype_name
from tinygemma.errors import UserError, describe, failure, whole_number
from tinygemma.files import (
    LOCK_NAME,
    STAGE_PREFIX,
    atomic_save_safetensors,
    atomic_write_json,
    peek_json,
    read_json,
    read_safetensors,
)
from tinygemma.model import Gemma3, model_from_state, model_state

# Our parameter name -> transformers' Gemma3ForCausalLM name; `{}` stands for the layer index.
HF_NAME_MAP = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.self_attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.self_attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.self_attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.self_attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.self_attn.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "layers.{}.self_attn.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "layers.{}.post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.pre_feedforward_layernorm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "layers.{}.mlp.gate_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.mlp.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.post_feedforward_layernorm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

HF_NAME_MAP_INVERSE = {v: k for k, v in HF_NAME_MAP.items()}

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _translate(name: str, table: dict[str, str]) -> str:
    index = _LAYER_INDEX.search(name)
    key = _LAYER_INDEX.sub(".{}.", name, count=1) if index else name
    if key not in table:
        raise UserError(f"unexpected parameter {name!r}: not a Gemma 3 text-model weight")
    return table[key].format(index.group(1)) if index else table[key]


def to_hf_name(name: str) -> str:
    return _translate(name, HF_NAME_MAP)


def from_hf_name(name: str) -> str:
    return _translate(name, HF_NAME_MAP_INVERSE)


def hf_config(config: ModelConfig, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
              torch_dtype: str = "float32") -> dict:
    """config.json for transformers' Gemma3ForCausalLM (model_type gemma3_text).

    RoPE bases are written in both the transformers 5 form (`rope_parameters`) and the 4.x form
    (`rope_theta`, `rope_local_base_freq`), so either version reads them.
    """
    if not float(config.query_pre_attn_scalar).is_integer():
        raise UserError(f"model.query_pre_attn_scalar is {config.query_pre_attn_scalar}; transformers reads it as an "
                        "integer, so this model cannot be exported to it")
    if config.d_model % config.n_heads:  # tinygemma's head_dim is free of it, transformers' config check is not
        raise UserError(f"model.d_model ({config.d_model}) is not a multiple of n_heads ({config.n_heads}); "
                        "transformers refuses such a Gemma 3 config, so this model cannot be exported to it")
    d = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": float(config.init_std),  # transformers 5 refuses an int in these two
        "rms_norm_eps": float(config.rms_norm_eps),
        # transformers 5 insists on an int here, as in Gemma 3's own config.json (hf_config refuses any other).
        "query_pre_attn_scalar": int(config.query_pre_attn_scalar),
        "sliding_window": config.sliding_window,
        "layer_types": list(config.layer_types),
        "rope_parameters": {
            SLIDING: {"rope_type": "default", "rope_theta": config.rope_local_base},
            GLOBAL: {"rope_type": "default", "rope_theta": config.rope_global_base},
        },
        "rope_theta": config.rope_global_base,
        "rope_local_base_freq": config.rope_local_base,
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    if config.layer_pattern is not None:  # transformers before 4.53 reads this period and not layer_types
        d["_sliding_window_pattern"] = d["sliding_window_pattern"] = config.layer_pattern
    return d


# Said of a model whose layers repeat no period: transformers before 4.53 reads the layout from
# sliding_window_pattern alone (and its default, every 6th layer global, where the file has none)
NEEDS_LAYER_TYPES = ("this model's sliding and global layers repeat no period, which only config.json's layer_types "
                     "can say: transformers 4.53 and newer read it, older versions load the model with other layers "
                     "sliding (wrong logits, no error)")

# Said of a model with a sliding window of 1 (its sliding cache keeps every token: transformers' own bug)
WINDOW_OF_ONE = ("transformers' generate with its cache (use_cache=True, the default) computes a sliding window of 1 "
                 "wrongly (seen with transformers 5.25: its text differs from its own forward pass and from "
                 "tinygemma's); pass use_cache=False there, or train with a window of 2 or more")


def model_config_from_hf(d: dict) -> ModelConfig:
    """ModelConfig from a transformers config.json of a Gemma 3 text model (either RoPE layout)."""
    try:
        return _model_config_from_hf(d)
    except (TypeError, ValueError, AttributeError) as e:  # a null, a string or a list where a number or table is
        raise UserError(f"config.json holds a value of the wrong type ({e})") from None


def _model_config_from_hf(d: dict) -> ModelConfig:
    if d.get("model_type") == "gemma3" and isinstance(d.get("text_config"), dict):
        raise UserError("this is a multimodal Gemma 3 checkpoint (model_type gemma3); tinygemma loads the "
                        "text-only Gemma3ForCausalLM (model_type gemma3_text), such as google/gemma-3-270m")
    if d.get("model_type") != "gemma3_text":
        raise UserError(f"config.json has model_type {d.get('model_type')!r}; tinygemma loads gemma3_text models")
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if d.get(cap) is not None:
            raise UserError(f"config.json sets {cap}, which Gemma 3 does not use and tinygemma does not implement")
    if d.get("use_bidirectional_attention"):
        raise UserError("config.json sets use_bidirectional_attention (an encoder variant); Gemma 3 is causal")
    if d.get("attention_bias"):
        raise UserError("config.json sets attention_bias, which Gemma 3 does not use and tinygemma does not implement")
    if d.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UserError(f"config.json has hidden_activation {d.get('hidden_activation')!r}; Gemma 3 uses gelu_pytorch_tanh")
    rope = d.get("rope_parameters") or {}
    local = (rope.get(SLIDING) or {}).get("rope_theta", d.get("rope_local_base_freq", 10_000.0))
    global_ = (rope.get(GLOBAL) or {}).get("rope_theta", d.get("rope_theta", 1_000_000.0))
    for kind in (SLIDING, GLOBAL):
        rope_type = _rope_type(rope.get(kind))
        if rope_type != "default":
            raise UserError(f"config.json uses {rope_type!r} RoPE scaling on {kind} layers; tinygemma implements the default RoPE")
    if _rope_type(d.get("rope_scaling")) not in ("default", None):
        raise UserError("config.json uses RoPE scaling; tinygemma implements the default RoPE")
    try:
        n_layers = d["num_hidden_layers"]
        # Without layer_types, transformers derives the layers from this key alone (its "_" twin is only recorded).
        pattern = d.get("sliding_window_pattern") or 6  # (null in some configs: the layer types say it)
        return ModelConfig(
            vocab_size=d["vocab_size"],
            d_model=d["hidden_size"],
            n_layers=n_layers,
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads", 4),  # transformers' default, as below: not the head count
            head_dim=d.get("head_dim", 256),
            mlp_dim=d["intermediate_size"],
            sliding_window=4096 if d.get("sliding_window") is None else d["sliding_window"],  # 0: refused
            sliding_window_pattern=pattern,
            layer_types=d.get("layer_types"),
            rope_local_base=float(local),
            rope_global_base=float(global_),
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", True)),
            max_position_embeddings=d.get("max_position_embeddings", 131_072),
            init_std=float(d.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r}") from None


def _rope_type(params: dict | None) -> str | None:
    """A RoPE table's type, under its name or the legacy "type" that transformers also reads."""
    params = params or {}
    return params.get("rope_type", params.get("type", "default"))


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Tensors of a transformers directory: model.safetensors or its shards. Pickled weights are refused."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        weight_map = read_json(index, "safetensors index").get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index} is not a safetensors index (its weight_map maps names to files)")
        shards = sorted(set(weight_map.values()))
        if not shards:
            raise UserError(f"{index} lists no weight files")
        state = {}
        for shard in shards:
            state.update(read_safetensors(directory / shard))
        return state
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise UserError(f"{directory} holds only pickled weights (pytorch_model.bin); tinygemma never unpickles "
                        "weights, since a pickle can run code. Convert them to safetensors first.")
    raise UserError(f"{directory} holds no model.safetensors")


def hf_state(model: Gemma3) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names, without vocabulary padding (the exported shapes are the
    real ones) and with a tied head stored once."""
    state = {}
    for name, tensor in model_state(model).items():
        if name in ("embed_tokens.weight", "lm_head.weight"):
            tensor = tensor[: model.config.vocab_size]
        state[to_hf_name(name)] = tensor
    return state


def to_transformers(model: Gemma3, attn_implementation: str = "sdpa"):
    """transformers' Gemma3ForCausalLM holding a copy of `model`'s weights, in its dtype, on its device, in eval
    mode: the reference that tests and benchmarks compare against."""
    import transformers

    config = hf_config(model.config)
    for key in ("architectures", "model_type", "torch_dtype", "dtype"):
        config.pop(key)
    hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**config, attn_implementation=attn_implementation))
    missing, unexpected = hf.load_state_dict(hf_state(model), strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if model.config.tie_embeddings else set()):
        raise RuntimeError(f"transformers' Gemma3ForCausalLM does not take these weights: missing {missing}, "
                           f"unexpected {unexpected}")
    hf.tie_weights()
    weight = model.embed_tokens.weight
    # RoPE's inverse frequencies stay float32, as from_pretrained in a half dtype keeps them (a plain .to() rounds).
    rope = {name: buffer for name, buffer in hf.named_buffers() if name.endswith("inv_freq")}
    hf = hf.to(device=weight.device, dtype=weight.dtype).eval()
    for name, buffer in rope.items():
        owner, _, leaf = name.rpartition(".")
        setattr(hf.get_submodule(owner), leaf, buffer.to(weight.device))
    return hf


def load_hf(directory: str | Path) -> Gemma3:
    """A transformers Gemma 3 directory (config.json and single or sharded model.safetensors) as a Gemma3."""
    directory = Path(directory)
    config = model_config_from_hf(read_json(directory / "config.json", "config.json"))
    state = {from_hf_name(k): v for k, v in read_hf_weights(directory).items()}
    return model_from_state(config, state, source=directory)


# In the safetensors header of every export: what tells a folder tinygemma wrote, and may write again, from a
# transformers model it did not (a downloaded google/gemma-3-270m), which an export must never replace.
EXPORT_MARK = {"exporter": "tinygemma"}


# Also in an export's header, where the checkpoint recorded it: the block size the model was trained at, which
# `tinygemma eval` of the export then evaluates at by default, as it does the run itself.
TRAINED_BLOCK_KEY = "train_block_size"
# Records an export carries in its weights' header, as JSON: the tokenizer's spec (what its tokenizer.json was, so
# that one given for it once the file is gone is checked as a run checkpoint's is) and what decided the windows its
# weights trained on (so that train.init_from it warns as from its run: train.repeated_windows).
TOKENIZER_KEY, TRAINED_KEY = "tokenizer", "trained"


def export_metadata(path: str | Path) -> dict:
    """The metadata in the header of `path`/model.safetensors (its header only is read); {} where the file is
    missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return {}


def _marked(metadata: dict) -> bool:
    return all(metadata.get(key) == value for key, value in EXPORT_MARK.items())


def written_by_tinygemma(path: str | Path) -> bool:
    """Whether `path`/model.safetensors carries EXPORT_MARK (unreadable, or no safetensors: not ours to replace)."""
    return _marked(export_metadata(path))


def exported_block_size(path: str | Path) -> int | None:
    """The training block size a tinygemma export of `path` records, else None (any other transformers model)."""
    metadata = export_metadata(path)
    value = metadata.get(TRAINED_BLOCK_KEY, "") if _marked(metadata) else ""
    return number if (number := whole_number(value)) else None  # (0: none)


def exported_record(path: str | Path, key: str) -> dict:
    """One of the records (TOKENIZER_KEY, TRAINED_KEY) a tinygemma export of `path` carries in its weights'
    header (save_hf), else {} (another transformers model, an export from before it was recorded, or an
    unreadable entry)."""
    metadata = export_metadata(path)
    try:
        value = json.loads(metadata.get(key, "")) if _marked(metadata) else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def is_hf_export(path: str | Path) -> bool:
    """Whether `path` is a folder holding a transformers Gemma 3 text model as `save_hf` writes one: a config.json
    with model_type gemma3_text beside a model.safetensors. (A run's config.json is its recipe, with no
    model_type; a prepared dataset has neither file.) An export may be written over such a folder again."""
    path = Path(path)
    return (path / "model.safetensors").is_file() and peek_json(path / "config.json").get("model_type") == "gemma3_text"


def save_hf(model: Gemma3, out: str | Path, special: dict, generation: dict, block_size: int | None = None,
            records: dict | None = None) -> None:
    """config.json, generation_config.json and model.safetensors for `Gemma3ForCausalLM.from_pretrained`.
    `special` holds the bos/eos/pad token ids for config.json (end-of-text for all three in a TinyStories model:
    it has no other special token), `generation` generation_config.json's settings, `block_size` the training
    block size (recorded in the weights' header as TRAINED_BLOCK_KEY, when known), `records` the TOKENIZER_KEY and
    TRAINED_KEY entries known (as JSON in that header, which transformers ignores; exported_record). The
    tokenizer's files are the caller's (Tokenizer.save_hf). config.json comes first: an export stopped halfway (a
    full disk) is then still recognisably one, and may be exported into again (checkpoint.check_export_out)."""
    out = Path(out)
    dtype = dtype_name(model.embed_tokens.weight.dtype)
    config = hf_config(model.config, bos_id=special.get("bos_token_id"), eos_id=special.get("eos_token_id"),
                       pad_id=special.get("pad_token_id"), torch_dtype=dtype)  # may refuse: before any folder
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config)
    metadata = {"format": "pt", **EXPORT_MARK, **({TRAINED_BLOCK_KEY: str(block_size)} if block_size else {}),
                **{key: json.dumps(value, sort_keys=True) for key, value in (records or {}).items() if value}}
    atomic_save_safetensors(hf_state(model), out / "model.safetensors", metadata=metadata)
    atomic_write_json(out / "generation_config.json", generation)


# What an hf export writes, config.json first (hf.save_hf). A folder holding that config.json alone, or only
# temporaries of these (a kill during the first write), is an export stopped halfway (a full disk): it may be
# exported into again.
EXPORT_FILES = frozenset({"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
                          "chat_template.jinja", "README.md"})
# A transformers directory's own tokenizer files, copied as they are by an export of it.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                      "added_tokens.json", "chat_template.jinja")  # transformers 5 keeps the chat template apart
# tinygemma's own files in an export's folder, never part of the model: a lock, a killed export's staging folder
# and temporaries (fnmatch patterns, matched against paths inside the folder)
NOT_UPLOADED = [LOCK_NAME, f"{STAGE_PREFIX}*", ".*.tmp"]
# What an hf export's upload removes from the repository unless it uploads a file of that name: an earlier upload's
# tokenizer files that this export lacks (a special_tokens_map.json, say) would otherwise change the tokenizer that
# transformers loads from the hub, a sharded model's files the weights. GGUF files beside them stay.
REPLACED_ON_HUB = sorted(EXPORT_FILES) + ["model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin*"]


def hub_api():
    """huggingface_hub's HfApi class, or the one line that says how to install it (checked before an export that
    will be uploaded, so that a missing package costs no export)."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError('--push-to-hub needs huggingface_hub: pip install "tinygemma[hub]"') from None
    return HfApi


def check_hub_repo(repo_id: str, private: bool = False) -> None:
    """Refuses in one line, before an export that only the upload needs, what would make push_to_hub fail or do
    other than asked: huggingface_hub missing, a repository name the hub refuses (its own rules), offline mode, no
    login; and with `private`, a repository that exists and is public (create_repo leaves an existing one's
    visibility alone: the upload would be public)."""
    api = hub_api()()
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, RepositoryNotFoundError, validate_repo_id

    if not re.fullmatch(r"[^/\s]+/[^/\s]+", repo_id):
        raise UserError(f"--push-to-hub takes the repository as USER/NAME (or ORG/NAME), not {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"--push-to-hub {repo_id}: the hub refuses that name ({e})") from None
    if constants.HF_HUB_OFFLINE:
        raise UserError("--push-to-hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it")
    try:
        token = get_token()
    except Exception as e:  # (HF_OIDC_RESOURCE's token exchange, failed)
        raise failure(f"--push-to-hub: cannot get a Hugging Face token ({describe(e)})", e) from None
    if token is None:
        raise UserError("--push-to-hub needs a Hugging Face login: run `hf auth login`, or set HF_TOKEN")
    if private:
        try:
            public = not api.repo_info(repo_id, repo_type="model").private
        except RepositoryNotFoundError:  # (to be created private)
            public = False
        except Exception as e:
            raise failure(f"cannot ask the hub about {repo_id} ({describe(e)})", e) from None
        if public:
            raise UserError(f"{repo_id} exists on the hub and is public, and --private does not change an existing "
                            "repository: make it private in its settings first, or leave out --private")


def push_to_hub(path: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an export to the Hugging Face hub as the model repository `repo_id` (created if it does not exist:
    `private`, or with the hub's default visibility), with the token of `hf auth login` or HF_TOKEN; return the
    repository's URL. An hf export's directory is uploaded whole (but for tinygemma's own files in it), a GGUF
    file as one file of that name at the repository's top, beside whatever the repository holds. A thin call into
    huggingface_hub, which is not exercised against the real hub by the tests."""
    path, api = Path(path), hub_api()()
    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True, **({"private": True} if private else {}))
        if path.is_file():
            api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo_id, repo_type="model",
                            commit_message=f"Upload {path.name}, a GGUF file exported by tinygemma")
        else:
            api.upload_folder(repo_id=repo_id, folder_path=str(path), repo_type="model",
                              commit_message="Upload a model exported by tinygemma",
                              ignore_patterns=NOT_UPLOADED, delete_patterns=REPLACED_ON_HUB)
    except Exception as e:  # network, authentication, a bad repository name: one line, whatever the cause
        raise failure(f"could not upload {path} to the hub as {repo_id} ({describe(e)})", e) from None
    return str(url)
