"""Checkpoints: atomic writes, our own checkpoint format, and Hugging Face import and export.

A tinygemma checkpoint is a directory with
    model.safetensors   the weights, under our parameter names (a tied head is stored once)
    checkpoint.json     {"format": "tinygemma", "model": ModelConfig, "tokenizer": spec, ...}
and, when written by training, the optimizer and loop state beside them (see train.py).
Nothing here unpickles: weights come from safetensors, metadata from JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tinygemma.config import GLOBAL, SLIDING, ModelConfig
from tinygemma.errors import UserError
from tinygemma.model import Gemma3

CHECKPOINT_FORMAT = "tinygemma"
WEIGHTS_NAME = "model.safetensors"
META_NAME = "checkpoint.json"

# ------------------------------------------------------------------ atomic writes


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; once the block succeeds, fsync it and rename it onto `path`.

    A crash at any moment leaves either the old file or the new one, never a half-written file under `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_json(path: str | Path, what: str = "file") -> dict:
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} does not hold a JSON object")
    return obj


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a truncated or corrupt file is a UserError, never a crash."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except FileNotFoundError:
        raise UserError(f"weights not found: {path}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


# ------------------------------------------------------------------ our checkpoint format


def model_state(model: Gemma3) -> dict[str, torch.Tensor]:
    """The weights to save: a tied output head is the embedding, so it is stored once, under the embedding."""
    state = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model(model: Gemma3, directory: str | Path, meta: dict | None = None) -> None:
    """Write `model.safetensors` and `checkpoint.json` (the model config plus `meta`) into `directory`.

    Each file is written atomically; callers that need the whole directory to switch at once (training)
    write into a fresh directory and rename it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(model_state(model), directory / WEIGHTS_NAME, metadata={"format": CHECKPOINT_FORMAT})
    atomic_write_json(directory / META_NAME, {"format": CHECKPOINT_FORMAT, "model": model.config.to_dict(), **(meta or {})})


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that `path` names: a run directory (its best checkpoint, else its last), a
    tinygemma checkpoint directory, or a transformers Gemma 3 directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_file():
        raise UserError(f"{path} is a file; give the checkpoint or run directory that holds it")
    if (path / META_NAME).exists():
        return path
    # A run directory (its config.json is the run's recipe, not a transformers config): follow its pointers.
    ckpts = path / "checkpoints"
    for name in ("best", "last"):
        pointer = ckpts / f"{name}.json"
        if pointer.exists():
            target = ckpts / read_json(pointer, "checkpoint pointer").get("dir", "")
            if (target / META_NAME).exists():
                return target
    if (path / "config.json").exists() and not ckpts.exists():
        return path
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


def load(path: str | Path, dtype: torch.dtype | str | None = None, device=None) -> Gemma3:
    """A Gemma3 in eval mode from a run directory, a tinygemma checkpoint, or a transformers Gemma 3 directory."""
    directory = resolve_checkpoint(path)
    if (directory / META_NAME).exists():
        config = ModelConfig.from_dict(read_checkpoint_meta(directory)["model"])
        state = read_safetensors(directory / WEIGHTS_NAME)
    else:
        config = model_config_from_hf(read_json(directory / "config.json", "config.json"))
        state = {from_hf_name(k): v for k, v in read_hf_weights(directory).items()}
    model = model_from_state(config, state, source=directory)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    model.to(device=device, dtype=dtype)
    return model.eval()


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise UserError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16")
    return table[name]


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], source="checkpoint") -> Gemma3:
    """Build the model and load `state` strictly: any missing, unexpected or misshapen tensor is a UserError
    (a checkpoint of another architecture), never a silently half-loaded model."""
    with torch.device("meta"):
        model = Gemma3(config)
    expected = {k: v for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # a tied head saved anyway
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{source} does not match the model config: "
            + (f"missing {missing[:3]}{'...' if len(missing) > 3 else ''} " if missing else "")
            + (f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}" if unexpected else "")
        )
    V, Vp = config.vocab_size, config.padded_vocab_size
    for name, param in expected.items():
        tensor = state[name]
        if name in ("embed_tokens.weight", "lm_head.weight") and tensor.shape[0] == V and Vp > V:
            tensor = torch.cat([tensor, tensor.new_zeros(Vp - V, tensor.shape[1])])  # vocabulary padding
            state[name] = tensor
        if tuple(tensor.shape) != tuple(param.shape):
            raise UserError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config needs {tuple(param.shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_buffers()
    return model


# ------------------------------------------------------------------ Hugging Face names and config

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
    return {
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
        "initializer_range": config.init_std,
        "rms_norm_eps": config.rms_norm_eps,
        # transformers 5 insists on an int here, as in Gemma 3's own config.json.
        "query_pre_attn_scalar": int(q) if float(q := config.query_pre_attn_scalar).is_integer() else q,
        "sliding_window": config.sliding_window,
        "layer_types": list(config.layer_types),
        "_sliding_window_pattern": config.sliding_window_pattern,
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


def model_config_from_hf(d: dict) -> ModelConfig:
    """ModelConfig from a transformers config.json of a Gemma 3 text model (either RoPE layout)."""
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
        rope_type = (rope.get(kind) or {}).get("rope_type", "default")
        if rope_type != "default":
            raise UserError(f"config.json uses {rope_type!r} RoPE scaling on {kind} layers; tinygemma implements the default RoPE")
    if (d.get("rope_scaling") or {}).get("rope_type", "default") not in ("default", None):
        raise UserError("config.json uses RoPE scaling; tinygemma implements the default RoPE")
    try:
        n_layers = d["num_hidden_layers"]
        pattern = d.get("_sliding_window_pattern", d.get("sliding_window_pattern", 6))
        return ModelConfig(
            vocab_size=d["vocab_size"],
            d_model=d["hidden_size"],
            n_layers=n_layers,
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
            head_dim=d.get("head_dim", 256),
            mlp_dim=d["intermediate_size"],
            sliding_window=d.get("sliding_window") or 4096,
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


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Tensors of a transformers directory: model.safetensors or its shards. Pickled weights are refused."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        shards = sorted(set(read_json(index, "safetensors index").get("weight_map", {}).values()))
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


# ------------------------------------------------------------------ export


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
    return hf.to(device=weight.device, dtype=weight.dtype).eval()


def export(ckpt: str | Path, out: str | Path) -> Path:
    """Write a transformers Gemma3ForCausalLM directory (config.json, model.safetensors, tokenizer files)."""
    src = resolve_checkpoint(ckpt)
    meta = read_checkpoint_meta(src)
    model = load(src)
    out = Path(out)
    if out.exists() and out.resolve() == src.resolve():
        raise UserError("--out must differ from the checkpoint directory")
    state = hf_state(model)
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    eot = (meta.get("tokenizer") or {}).get("eot_id")
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(state, out / "model.safetensors", metadata={"format": "pt"})
    atomic_write_json(out / "config.json", hf_config(model.config, bos_id=eot, eos_id=eot, pad_id=eot, torch_dtype=dtype))
    atomic_write_json(out / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
    if meta.get("tokenizer"):
        from tinygemma.tokenizer import tokenizer_from_spec

        tokenizer_from_spec(meta["tokenizer"], base_dir=src).save_hf(out)
    elif src != out:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
            if (src / name).exists():
                shutil.copyfile(src / name, out / name)
    return out


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a checkpoint as a Hugging Face transformers directory")
    p.add_argument("--ckpt", required=True, help="run directory, checkpoint directory, or transformers directory")
    p.add_argument("--out", required=True, help="directory to write config.json, model.safetensors and tokenizer files")
    p.set_defaults(func=_export_main)


def _export_main(args) -> int:
    out = export(args.ckpt, args.out)
    print(f"exported {args.ckpt} to {out} (load with Gemma3ForCausalLM.from_pretrained({str(out)!r}))")
    return 0
