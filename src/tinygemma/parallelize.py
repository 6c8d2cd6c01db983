"""What is applied to the model from outside it for training: the attention backend, activation checkpointing,
torch.compile, and DDP or FSDP2 under torchrun (the model file knows nothing of these, as torchtitan's)."""

from __future__ import annotations

import contextlib

import torch

from tinygemma.config import ModelConfig, TrainConfig
from tinygemma.model import Gemma3
from tinygemma.runtime import Runtime


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
