"""Pre-training: `tinygemma train --data DIR --out RUN`.

The loop, top to bottom: the runtime (device, precision, processes), the batches, the model and optimizer, the
evaluation, the checkpoints, the logs, and `train()` itself. Parallelism, compilation and activation
checkpointing are applied here, from outside the model.

A run directory holds
    config.json                    the resolved recipe (data, model, train, generate) and the run's shape
    metrics.jsonl                  one object per optimizer step and one per evaluation
    tb/                            TensorBoard event files
    loss.png                       train and validation loss against tokens, redrawn at each evaluation
    checkpoints/step_000040/       model.safetensors, checkpoint.json, optimizer.safetensors, trainer_state.json
    checkpoints/last.json          {"dir": "step_000040", "step": 40, ...}: the checkpoint `--resume` continues
    checkpoints/best.json          the checkpoint with the lowest validation loss (what `tinygemma.load(RUN)` reads)

Crash safety: every file is written under a temporary name and renamed into place; a checkpoint is written
into a temporary directory, renamed to its step name, and only then named by last.json (an atomic rename too).
A `kill -9` at any moment leaves the previous checkpoint loadable. Nothing here unpickles: weights and
optimizer state are safetensors, the rest JSON. TensorBoard's event files are the one exception to the
rename rule (the format is append-only); a resumed run purges their events past the checkpoint.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tinygemma.checkpoint import (
    META_NAME,
    WEIGHTS_NAME,
    atomic_path,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    model_from_state,
    parse_dtype,
    read_json,
    read_safetensors,
    save_model,
)
from tinygemma.config import ModelConfig, Recipe, TrainConfig, apply_overrides, load_recipe
from tinygemma.data import open_prepared
from tinygemma.errors import UserError
from tinygemma.generate import nats_and_bytes, pick_device, summarize
from tinygemma.model import Gemma3
from tinygemma.optim import (  # noqa: F401 (learning_rate: the schedule, imported from here by callers)
    check_resume_schedule,
    configure_optimizer,
    describe_optimizer,
    learning_rate,
    set_learning_rates,
)
from tinygemma.tokenizer import token_byte_lengths

OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"

# ------------------------------------------------------------------ runtime: device, precision, processes


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Device, precision and, under torchrun (WORLD_SIZE > 1), the process group: NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device(f"cuda:{local_rank}")  # torchrun: one GPU per process
    if device.type == "mps" and world_size > 1:
        raise UserError("multi-process training runs on CUDA (NCCL) or CPU (gloo), not MPS")

    if cfg.dtype == "auto":
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" else torch.float32
    else:
        dtype = parse_dtype(cfg.dtype)

    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs outside autocast

    owns = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        owns = True
    return Runtime(device, dtype, rank, local_rank, world_size, owns)


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def raise_on_all_ranks(message: str | None, rt: Runtime) -> None:
    """Raise UserError(message) on every rank if rank 0 has a message, so no rank waits on a collective forever."""
    if rt.world_size > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise UserError(message)


# ------------------------------------------------------------------ data


def window_starts(seed: int, step: int, n_tokens: int, block_size: int, count: int) -> np.ndarray:
    """First token of each of the `count` windows of optimizer step `step`: a pure function of (seed, step),
    so a resumed run and a run on any number of processes see the same global batches."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - block_size, size=count)  # a window holds block_size + 1 tokens


class Batches:
    """Random windows of block_size + 1 tokens from the training memmap.

    The global batch of a step is split as [micro-step][rank][batch_size]: rank r's micro-step m takes rows
    (m * world_size + r) * batch_size onwards. Any split of the same global batch gives the same gradient.
    """

    def __init__(self, tokens: np.ndarray, cfg: TrainConfig, rt: Runtime):
        self.tokens, self.cfg, self.rt = tokens, cfg, rt
        self.global_batch = cfg.batch_size * cfg.grad_accum_steps * rt.world_size
        self._step, self._starts = None, None

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, rt = self.cfg, self.rt
        if step != self._step:
            self._step = step
            self._starts = window_starts(cfg.seed, step, len(self.tokens), cfg.block_size, self.global_batch)
        first = (micro * rt.world_size + rt.rank) * cfg.batch_size
        return to_device(windows(self.tokens, self._starts[first : first + cfg.batch_size], cfg.block_size), rt)


def windows(tokens: np.ndarray, starts, block_size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64))


def to_device(batch: torch.Tensor, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets on the device; on CUDA through pinned memory, so the copy is asynchronous
    and overlaps the step that is running (the caching host allocator keeps the pinned buffer alive)."""
    if rt.is_cuda:
        batch = batch.pin_memory().to(rt.device, non_blocking=True)
    else:
        batch = batch.to(rt.device)
    return batch[:, :-1], batch[:, 1:]


def validation_starts(n_tokens: int, block_size: int, count: int) -> np.ndarray:
    """A fixed set of `count` windows spread evenly over the validation split (the same for every seed)."""
    return np.linspace(0, n_tokens - block_size - 1, count).round().astype(np.int64)


# ------------------------------------------------------------------ model, optimizer, schedule


def build_model(model_config: ModelConfig, cfg: TrainConfig, rt: Runtime, weights: dict | None):
    """(raw, model): the Gemma3 itself, and what the loop calls (the same module, or its DDP wrapper).

    The model is initialised on the CPU in float32 from the seed, so every process and every device starts from
    the same weights; `weights` (a checkpoint's) replace them before any wrapping. Weights stay float32: autocast
    computes in bf16/fp16 while the master weights and the optimizer state keep full precision.
    """
    torch.manual_seed(cfg.seed)
    raw = Gemma3(model_config)
    if weights is not None:
        weights = dict(weights)
        if model_config.tie_embeddings:
            weights["lm_head.weight"] = weights["embed_tokens.weight"]
        raw.load_state_dict(weights, strict=True)
    raw.to(rt.device)
    if rt.is_cuda and cfg.block_size > model_config.sliding_window:
        # Sliding layers through flex_attention: work proportional to the window, not the block. The block
        # mask is built here, before compiling, so the compiled graph only reads it.
        raw.attention_backend = "flex"
        raw.sliding_block_mask(cfg.block_size, rt.device)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(raw)
    compile_ = cfg.compile == "true" or (cfg.compile == "auto" and rt.is_cuda)
    if rt.world_size > 1 and cfg.distributed == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(rt.device.type, (rt.world_size,))
        for block in raw.layers:
            if compile_:
                block.compile()  # per block, as torchtitan: FSDP's hooks stay outside the compiled graphs
            fully_shard(block, mesh=mesh)
        fully_shard(raw, mesh=mesh)  # the embedding, tied head and final norm
        return raw, raw
    if compile_:
        raw.compile()  # in place, so parameter names stay those of the model
    if rt.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        return raw, DistributedDataParallel(raw, device_ids=[rt.device.index] if rt.is_cuda else None)
    return raw, raw


def apply_activation_checkpointing(model: Gemma3) -> None:
    """Recompute each block's activations during backward instead of storing them (names stay unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        forward = block.forward
        block.forward = lambda *args, _forward=forward, **kwargs: checkpoint(_forward, *args, use_reentrant=False, **kwargs)


def gradient_sync(model, last_micro_step: bool):
    """All-reduce gradients only on the last micro-step of an optimizer step."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if last_micro_step else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last_micro_step)
    return contextlib.nullcontext()


# Dense bf16 tensor-core peaks from the vendor's data sheets (no sparsity), for MFU. Unknown GPUs get no MFU.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


# ------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(raw: Gemma3, val: np.ndarray, starts: np.ndarray, token_bytes: torch.Tensor, cfg: TrainConfig,
             rt: Runtime) -> dict:
    """Loss, perplexity and bits per byte on the fixed validation windows, split over the processes; the same
    definitions as `tinygemma eval` (generate.nats_and_bytes)."""
    raw.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)
    batches = [starts[i : i + cfg.batch_size] for i in range(0, len(starts), cfg.batch_size)]
    for batch in batches[rt.rank :: rt.world_size]:
        x, y = to_device(windows(val, batch, cfg.block_size), rt)
        with rt.autocast():
            nats = raw(x, y, reduction="none")
        sums += nats_and_bytes(nats, y, token_bytes)
    raw.train()
    if hasattr(raw, "reshard"):  # FSDP2's root keeps its parameters gathered after a forward with no backward
        raw.reshard()
    result = summarize(all_reduce_sum(sums, rt))
    return {"val_loss": result["loss"], "val_ppl": result["perplexity"],
            "val_bpb": result["bits_per_byte"] if result["bits_per_byte"] is not None else float("nan")}


# ------------------------------------------------------------------ checkpoints


def checkpoint_pointer(run_dir: Path, name: str = "last") -> dict | None:
    """checkpoints/last.json (or best.json) if it names a complete checkpoint, else None."""
    pointer = run_dir / "checkpoints" / f"{name}.json"
    if not pointer.exists():
        return None
    info = read_json(pointer, "checkpoint pointer")
    directory = run_dir / "checkpoints" / str(info.get("dir", ""))
    if not (directory / STATE_NAME).exists():
        raise UserError(f"{pointer} names {directory}, which is not a complete checkpoint")
    return info


def checkpoint_bytes(model: Gemma3) -> int:
    """What a checkpoint takes on disk: the weights, AdamW's two moments, and a margin."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = 2 * sum(p.numel() * 4 for p in model.parameters())
    return int(1.05 * (weights + moments)) + (16 << 20)


def save_checkpoint(run_dir: Path, step: int, raw: Gemma3, optimizer, state: dict, meta: dict, data_dir: Path,
                    val_loss: float | None, is_best: bool, rt: Runtime, fsdp: bool) -> None:
    """Write checkpoints/step_NNNNNN/ into a temporary directory, rename it into place, then switch last.json
    (and best.json) to it; finally delete the checkpoints that neither pointer names. Every rank calls this
    (FSDP gathers the shards); rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    ckpts, name = run_dir / "checkpoints", f"step_{step:06d}"
    message = None
    if rt.is_main:
        ckpts.mkdir(parents=True, exist_ok=True)
        need, free = checkpoint_bytes(raw), shutil.disk_usage(ckpts).free
        if free < need:
            previous = checkpoint_pointer(run_dir)
            message = (f"not enough free disk in {ckpts} for the checkpoint of step {step}: it needs about "
                       f"{need / 2**20:,.0f} MiB and {free / 2**20:,.0f} MiB are free; nothing was written"
                       + (f", and the checkpoint of step {previous['step']} is intact" if previous else ""))
    raise_on_all_ranks(message, rt)

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
        save_model(model, tmp, meta)
        save_optimizer(optimizer_state, tmp / OPTIMIZER_NAME)
        tokenizer_file = meta.get("tokenizer", {}).get("file")
        if tokenizer_file:  # a checkpoint carries its tokenizer, so it stands alone
            with atomic_path(tmp / tokenizer_file) as t:
                shutil.copyfile(data_dir / tokenizer_file, t)
        atomic_write_json(tmp / STATE_NAME, state)  # written last: its presence marks a complete checkpoint
        fsync_dir(tmp)
        final = ckpts / name
        if final.exists():  # left by a crash after its rename but before last.json named it: never referenced
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(ckpts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = {"dir": name, "step": step, "val_loss": val_loss}
    atomic_write_json(ckpts / "last.json", pointer)
    if is_best:
        atomic_write_json(ckpts / "best.json", pointer)
    prune_checkpoints(ckpts)


def prune_checkpoints(ckpts: Path) -> None:
    """Delete step directories that neither last.json nor best.json names, and leftover temporary ones."""
    keep = set()
    for name in ("last", "best"):
        if (ckpts / f"{name}.json").exists():
            keep.add(read_json(ckpts / f"{name}.json", "checkpoint pointer").get("dir"))
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

    tensors = read_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != "tinygemma-optimizer":
        raise UserError(f"{path} is not a tinygemma optimizer state")
    state: dict = {}
    for key, value in {**tensors, **json.loads(metadata.get("scalars", "{}"))}.items():
        param, _, name = key.rpartition("/")
        state.setdefault(param, {})[name] = value
    groups = json.loads(metadata["param_groups"])
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    set_optimizer_state_dict(raw, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
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


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(decode_bytes(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([decode_bytes(s) for s in state["cuda"]])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ------------------------------------------------------------------ logs


class MetricsLog:
    """metrics.jsonl, kept in memory and rewritten whole under a temporary name at each flush."""

    def __init__(self, path: Path, records: list[dict] | None = None):
        self.path, self.records = path, list(records or [])

    @classmethod
    def resume(cls, path: Path, step: int) -> MetricsLog:
        """The records of a run up to its checkpoint at `step` (later ones belong to the lost work)."""
        records = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if record.get("step", step + 1) <= step:
                        records.append(record)
        return cls(path, records)

    def append(self, record: dict) -> None:
        self.records.append(record)

    def flush(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))


def plot_losses(records: list[dict], path: Path) -> None:
    """loss.png: train and validation loss against tokens seen."""
    from matplotlib.figure import Figure

    train = [(r["tokens"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def log_line(record: dict, max_steps: int, throughput: float, eta: float) -> str:
    mfu = f" | mfu {100 * record['mfu']:.1f}%" if "mfu" in record else ""
    return (f"step {record['step']}/{max_steps} | loss {record['train_loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad norm {record['grad_norm']:.3f} | {throughput:,.0f} tok/s{mfu} | eta {format_duration(eta)}")


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ------------------------------------------------------------------ the loop


class NonFiniteError(UserError):
    """A NaN or infinite loss or gradient norm (the run stops; the last good checkpoint stays as it was)."""


def train(recipe: Recipe, resume: bool = False, stop_at: int | None = None, quiet: bool = False) -> dict:
    """Train `recipe.model_config()` on the prepared data in `recipe.data.dir`, writing the run to `recipe.out`.

    `resume` continues from the run directory's last checkpoint (a fresh start if it has none). `stop_at`
    ends this invocation after that optimizer step, with a checkpoint, without changing the schedule (which
    always runs to `max_steps`). Returns a summary: final step, losses, best checkpoint.
    Under torchrun every process calls this; only rank 0 writes.
    """
    cfg, run_dir, data_dir = recipe.train, Path(recipe.out), Path(recipe.data.dir)
    data = open_prepared(data_dir)
    model_config = recipe.model_config(vocab_size=data.vocab_size)
    if cfg.block_size > model_config.max_position_embeddings:
        raise UserError(f"train.block_size {cfg.block_size} exceeds model.max_position_embeddings "
                        f"{model_config.max_position_embeddings}")
    train_tokens, val_tokens = data.split("train"), data.split("val")
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) < cfg.block_size + 1:
            raise UserError(f"the {split} split of {data_dir} holds {len(tokens):,} tokens, fewer than one "
                            f"window of block_size + 1 = {cfg.block_size + 1}")

    # Where to start: a fresh run, or the last checkpoint of this one.
    last = checkpoint_pointer(run_dir) if (run_dir / "checkpoints").exists() else None
    if last and not resume:
        raise UserError(f"{run_dir} already holds a run (checkpoint at step {last['step']}); pass --resume to "
                        "continue it, or choose another --out")
    ckpt_dir = run_dir / "checkpoints" / last["dir"] if last else None
    trainer_state, weights = {}, None
    if ckpt_dir is not None:
        trainer_state = read_json(ckpt_dir / STATE_NAME, "trainer state")
        saved = read_json(ckpt_dir / META_NAME, "checkpoint metadata")["model"]
        if saved != model_config.to_dict():
            changed = sorted(k for k in saved if saved[k] != model_config.to_dict().get(k))
            raise UserError(f"the model of {ckpt_dir} differs from the configured one in {', '.join(changed)}; "
                            "resume with the run's own model settings")
        weights = read_safetensors(ckpt_dir / WEIGHTS_NAME)
    start = trainer_state.get("step", 0)
    check_resume_schedule(trainer_state.get("config", {}).get("train"), cfg, start)
    end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps

    rt = setup_runtime(cfg)
    fsdp = rt.world_size > 1 and cfg.distributed == "fsdp"
    raw, model = build_model(model_config, cfg, rt, weights)
    optimizer = configure_optimizer(raw, cfg, rt)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    if ckpt_dir is not None:
        load_optimizer(ckpt_dir / OPTIMIZER_NAME, raw, optimizer)
        if trainer_state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(trainer_state["scaler"])
        set_rng_state(trainer_state["rng"])

    batches = Batches(train_tokens, cfg, rt)
    # eval_batches global batches: the same windows whatever the split into micro-steps and processes.
    val_starts = validation_starts(len(val_tokens), cfg.block_size, cfg.eval_batches * batches.global_batch)
    token_bytes = torch.from_numpy(token_byte_lengths(data.tokenizer(), model_config.vocab_size)).to(rt.device)
    tokens_per_step = batches.global_batch * cfg.block_size
    flops_per_token, peak = model_config.flops_per_token(cfg.block_size), peak_flops(rt.device)
    tokenizer = {**data.meta["tokenizer"], "eot_id": data.eot_id}
    best_val = trainer_state.get("best_val_loss", float("inf"))
    best_step = trainer_state.get("best_step")
    skipped = trainer_state.get("skipped_steps", 0)
    elapsed = trainer_state.get("elapsed_s", 0.0)

    log = writer = None
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / "checkpoints").exists():
            prune_checkpoints(run_dir / "checkpoints")
        resolved = recipe.to_dict()
        resolved["model"] = {"preset": recipe.model_preset, **model_config.to_dict()}
        resolved["run"] = {"world_size": rt.world_size, "device": str(rt.device), "dtype": str(rt.dtype).removeprefix("torch."),
                           "global_batch": batches.global_batch, "tokens_per_step": tokens_per_step,
                           "parameters": raw.num_params(), "tokenizer": tokenizer}
        atomic_write_json(run_dir / "config.json", resolved)
        log = MetricsLog.resume(run_dir / "metrics.jsonl", start) if start else MetricsLog(run_dir / "metrics.jsonl")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=start)  # drop events past the checkpoint
        if not quiet:
            print(f"training {raw.num_params():,} parameters on {rt.world_size} x {rt.device} in "
                  f"{str(rt.dtype).removeprefix('torch.')}: {tokens_per_step:,} tokens per step, steps {start} to {end} "
                  f"of {cfg.max_steps} ({cfg.max_steps * tokens_per_step / 1e6:,.1f}M tokens in all); "
                  f"{describe_optimizer(optimizer)}, {cfg.lr_schedule} schedule", flush=True)

    def run_eval(step: int) -> dict:
        result = evaluate(raw, val_tokens, val_starts, token_bytes, cfg, rt)
        if rt.is_main:
            record = {"step": step, "tokens": step * tokens_per_step, **result}
            log.append(record)
            log.flush()
            for key, value in result.items():
                writer.add_scalar(f"val/{key.removeprefix('val_')}", value, step)
            writer.flush()
            plot_losses(log.records, run_dir / "loss.png")
            if not quiet:
                say(f"step {step}: val loss {result['val_loss']:.4f} | ppl {result['val_ppl']:.2f} | "
                    f"bpb {result['val_bpb']:.4f}")
        return result

    def checkpoint(step: int, val_loss: float) -> None:
        nonlocal best_val, best_step
        is_best = val_loss < best_val
        if is_best:
            best_val, best_step = val_loss, step
        state = {
            "format": "tinygemma-trainer-state", "step": step, "tokens": step * tokens_per_step,
            "best_val_loss": best_val, "best_step": best_step, "skipped_steps": skipped, "elapsed_s": elapsed,
            "data": {"sampler": "random windows, a pure function of (seed, step)", "seed": cfg.seed,
                     "next_step": step, "global_batch": batches.global_batch, "block_size": cfg.block_size},
            "rng": rng_state(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "config": recipe.to_dict(),
        }
        meta = {"tokenizer": tokenizer, "step": step, "train": dataclasses.asdict(cfg)}
        save_checkpoint(run_dir, step, raw, optimizer, state, meta, data_dir, val_loss, is_best, rt, fsdp)

    progress = None
    if rt.is_main and not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=cfg.max_steps, initial=start, unit="step", dynamic_ncols=True)

    def say(text: str) -> None:
        if progress:
            progress.write(text)
        else:
            print(text, flush=True)

    try:
        if start == 0 and end > 0:
            run_eval(0)
        train_loss, summary_val = None, None
        throughput = None  # tokens/s, smoothed
        x, y = batches.get(start, 0) if start < end else (None, None)
        raw.train()
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = set_learning_rates(optimizer, step, cfg)
            loss_sum = torch.zeros((), device=rt.device)
            for micro in range(cfg.grad_accum_steps):
                last_micro = micro == cfg.grad_accum_steps - 1
                with gradient_sync(model, last_micro):
                    with rt.autocast():
                        loss = model(x, y)
                    # Fetch the next micro-batch now, so its copy overlaps this backward pass.
                    if not last_micro:
                        x, y = batches.get(step, micro + 1)
                    elif step + 1 < end:
                        x, y = batches.get(step + 1, 0)
                    loss_sum += loss.detach()
                    scaler.scale(loss / cfg.grad_accum_steps).backward()
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            train_loss = all_reduce_sum(loss_sum / cfg.grad_accum_steps, rt).item() / rt.world_size
            grad_norm = grad_norm.item()
            done = step + 1
            # fp16's scaler expects an occasional overflow and skips that step itself; anything else is divergence.
            bad = not math.isfinite(train_loss) or (not math.isfinite(grad_norm) and not scaler.is_enabled())
            if bad and cfg.on_nonfinite == "stop":
                if rt.is_main:
                    log.append({"step": done, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                                "tokens": done * tokens_per_step, "nonfinite": True})
                    log.flush()
                previous = checkpoint_pointer(run_dir) if rt.is_main else None
                where = f"; the last good checkpoint is step {previous['step']}" if previous else ""
                raise NonFiniteError(f"non-finite {'loss' if not math.isfinite(train_loss) else 'gradient norm'} at step "
                                     f"{done} (loss {train_loss}, gradient norm {grad_norm}); stopped without saving{where}. "
                                     "Lower train.learning_rate, or pass --set on_nonfinite=skip to skip such steps")
            if bad:
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
            else:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)

            step_time = time.perf_counter() - t0
            elapsed += step_time
            rate = tokens_per_step / step_time
            throughput = rate if throughput is None else 0.9 * throughput + 0.1 * rate
            if rt.is_main:
                record = {"step": done, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens": done * tokens_per_step, "tokens_per_s": rate}
                if peak:
                    record["mfu"] = flops_per_token * rate / (peak * rt.world_size)
                if bad:
                    record.update(skipped=True, skipped_steps=skipped)
                log.append(record)
                writer.add_scalar("train/loss", train_loss, done)
                writer.add_scalar("train/lr", lr, done)
                writer.add_scalar("train/grad_norm", grad_norm, done)
                writer.add_scalar("train/tokens_per_s", rate, done)
                if progress:
                    progress.update(1)
                    progress.set_postfix_str(f"loss {train_loss:.4f} | {throughput:,.0f} tok/s")
                if done % cfg.log_interval == 0 or done == end:
                    log.flush()
                    if not progress and not quiet:
                        eta = (cfg.max_steps - done) * tokens_per_step / throughput
                        say(log_line(record, cfg.max_steps, throughput, eta))

            checkpoint_due = done == end or (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0)
            if done == cfg.max_steps or checkpoint_due or (cfg.eval_interval and done % cfg.eval_interval == 0):
                summary_val = run_eval(done)  # every checkpoint has a validation loss, so best.json means something
            if checkpoint_due:
                checkpoint(done, summary_val["val_loss"])

        if rt.world_size > 1:
            dist.barrier()  # rank 0 has written the last checkpoint before anyone reads it
    finally:
        if progress:
            progress.close()
        if writer:
            writer.close()
        if rt.owns_process_group:
            dist.destroy_process_group()
    final = checkpoint_pointer(run_dir)
    best = checkpoint_pointer(run_dir, "best")
    return {
        "run_dir": str(run_dir), "step": final["step"] if final else start, "max_steps": cfg.max_steps,
        "tokens": (final["step"] if final else start) * tokens_per_step, "train_loss": train_loss,
        "val_loss": summary_val["val_loss"] if summary_val else None,
        "val_bpb": summary_val["val_bpb"] if summary_val else None,
        "best_val_loss": best["val_loss"] if best else None, "best_step": best["step"] if best else None,
        "checkpoint": str(run_dir / "checkpoints" / final["dir"]) if final else None,
        "skipped_steps": skipped, "elapsed_s": elapsed,
    }


# ------------------------------------------------------------------ command line


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="pre-train the model on prepared data (single process or torchrun)")
    p.add_argument("--data", help="prepared data directory (train.bin, val.bin, meta.json); default: the recipe's data.dir")
    p.add_argument("--out", help="run directory to write; default: the recipe's train.out")
    p.add_argument("--model", help="model preset (gemma3-270m, gemma3-270m-gpt2, gemma3-tiny); default: the recipe's")
    p.add_argument("--config", help="recipe file (TOML), e.g. configs/workshop.toml; default: the built-in recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting: train.FIELD=V (or just FIELD=V), model.FIELD=V, data.FIELD=V; repeatable")
    p.add_argument("--max-steps", type=int, help="optimizer steps of the whole run (the schedule's length)")
    p.add_argument("--stop-at", type=int, help="end this invocation after this step, with a checkpoint; the schedule "
                   "still runs to max-steps (continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with "
                   "its saved recipe unless --config is given (starts fresh if it has no checkpoint yet)")
    p.set_defaults(func=_train_main)


def _train_main(args) -> int:
    overrides = []
    if args.model:
        overrides.append(f"model.preset={args.model}")
    if args.data:
        overrides.append(f"data.dir={args.data}")
    if args.out:
        overrides.append(f"train.out={args.out}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    saved = Path(args.out or "") / "config.json"
    if args.resume and args.config is None and args.out and saved.exists():
        resolved = read_json(saved, "run config")
        resolved.pop("run", None)
        recipe = apply_overrides(Recipe.from_dict(resolved, source=str(saved)), overrides + args.set)
    else:
        recipe = load_recipe(args.config, overrides + args.set)
    summary = train(recipe, resume=args.resume, stop_at=args.stop_at)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0
