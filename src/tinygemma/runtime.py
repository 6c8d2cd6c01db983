"""The runtime of a training run: its device, its autocast precision and, under torchrun, its process group."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tinygemma.devices import parse_dtype, pick_device
from tinygemma.errors import UserError


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


def setup_runtime(device_name: str = "auto", dtype_name: str = "auto") -> Runtime:
    """Device, precision and, under torchrun (WORLD_SIZE > 1), the process group: NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device(f"cuda:{local_rank}")  # torchrun: one GPU per process
    if device.type == "mps" and world_size > 1:
        raise UserError("multi-process training runs on CUDA (NCCL) or CPU (gloo), not MPS")

    if dtype_name == "auto":
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" else torch.float32
    else:
        dtype = parse_dtype(dtype_name)

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
