"""The runtime of a training run: its device, its autocast precision and, under torchrun, its process group."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tinygemma.devices import autocast_dtype, pick_device
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
    if device.type == "mps" and world_size > 1:
        raise UserError("multi-process training runs on CUDA (NCCL) or CPU (gloo), not MPS")
    if device.type == "cuda":
        device = cuda_device(device, world_size, local_rank)
        torch.cuda.set_device(device)  # before anything asks "the current GPU" a question
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs outside autocast
    dtype = autocast_dtype(dtype_name, device)

    owns = False
    if rank == 0 and (warning := restart_warning(os.environ)):
        print(warning, file=sys.stderr, flush=True)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        owns = True
    return Runtime(device, dtype, rank, local_rank, world_size, owns)


def restart_warning(env) -> str | None:
    """A warning when torchrun will restart failed processes (--max-restarts) with its rendezvous store shared with
    them: a restarted process can then read the previous attempt's addresses from it and fail to connect
    (pytorch/pytorch#135712, #167288; seen with torch 2.13 and gloo). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives
    each attempt a fresh store."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        return ("tinygemma: warning: torchrun shares its rendezvous store with the processes it restarts, which can "
                "make a restart fail to connect (pytorch/pytorch#135712); run torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment")
    return None


def cuda_device(device: torch.device, world_size: int, local_rank: int) -> torch.device:
    """One GPU per process under torchrun (cuda:LOCAL_RANK); in a single process the GPU asked for (cuda:1 stays
    cuda:1), or the current one for a plain "cuda"."""
    if world_size > 1:
        if device.index is not None and device.index != local_rank:
            raise UserError(f"under torchrun each process trains on cuda:LOCAL_RANK; train.device {device} would put "
                            "two processes on one GPU. Use device = \"cuda\" (choose GPUs with CUDA_VISIBLE_DEVICES)")
        return torch.device("cuda", local_rank)
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


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
