"""The runtime of a training run: its device, its autocast precision and, under torchrun, its process group."""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tinygemma.devices import autocast_dtype, pick_device
from tinygemma.errors import UserError, die_with_parent, whole_number


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False
    matmul_precision: str | None = None  # torch's float32 matmul precision before this set it: close() restores it
    previous_cuda_device: int | None = None  # the current GPU before this set it (cuda:N): close() restores it

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

    def close(self) -> None:
        """Undo what setup_runtime changed in this process: TF32 stays off a notebook's later float32 work, a
        later device="cuda" is the GPU it was (not this run's cuda:1), and the process group this runtime started
        ends."""
        if self.matmul_precision is not None:
            torch.set_float32_matmul_precision(self.matmul_precision)
        if self.owns_process_group:
            dist.destroy_process_group()
        if self.previous_cuda_device is not None:
            torch.cuda.set_device(torch.device("cuda", self.previous_cuda_device))


def setup_runtime(device_name: str = "auto", dtype_name: str = "auto") -> Runtime:
    """Device, precision and, under torchrun (WORLD_SIZE > 1), the process group: NCCL on CUDA, gloo on CPU."""
    world_size = env_world_size()
    rank, local_rank = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])) if world_size > 1 else (0, 0)
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # started by torchrun (one process too: its own session as well)
        die_with_parent()
    device = training_device(device_name, world_size)
    before = previous_device = None  # the matmul precision and the current GPU a CUDA run changes, for close()
    if device.type == "cuda":
        device = cuda_device(device, world_size, local_rank)
        # One process (a notebook's run on cuda:1) gives its GPU back at close(); a torchrun process keeps its own
        # to the end: setting GPU 0 current again would open a CUDA context there, one per process.
        if world_size == 1 and torch.cuda.current_device() != device.index:
            previous_device = torch.cuda.current_device()
        torch.cuda.set_device(device)  # before anything asks "the current GPU" a question
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs outside autocast
    dtype = autocast_dtype(dtype_name, device)

    owns = False
    if world_size > 1 and not dist.is_initialized():
        if rank == 0 and (warning := restart_warning(os.environ)):
            print(warning, file=sys.stderr, flush=True)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        owns = True
    return Runtime(device, dtype, rank, local_rank, world_size, owns, before, previous_device)


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def training_device(device_name: str, world_size: int) -> torch.device:
    """The device `device_name` resolves to for training in `world_size` processes; refused in one line where it
    cannot (a GPU this machine lacks; several processes on MPS)."""
    device = pick_device(device_name)
    if device.type == "mps" and world_size > 1:
        raise UserError("multi-process training runs on CUDA (NCCL) or CPU (gloo), not MPS")
    return device


def env_world_size(env=None) -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 without it), refused in one line when it is not a
    positive integer, or when WORLD_SIZE > 1 comes without the rest of torchrun's environment (a WORLD_SIZE left
    exported in a shell, not torchrun: init_process_group would fail with a traceback). `env`: os.environ as it is
    at the call (a library may replace it: datasets' map(num_proc=...) puts a copy in its place)."""
    env = os.environ if env is None else env
    text = env.get("WORLD_SIZE", "1")
    try:
        world_size = int(text)
        if world_size < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"WORLD_SIZE must be a positive integer (torchrun sets it), got {text!r}") from None
    if world_size > 1:
        missing = [name for name in TORCHRUN_VARIABLES if not env.get(name)]
        if missing:
            raise UserError(f"WORLD_SIZE is {world_size} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'}"
                            " not set: start the processes with torchrun (torchrun --nproc-per-node N -m tinygemma "
                            "...), or unset WORLD_SIZE to run one process")
        for name in ("RANK", "LOCAL_RANK"):
            if (number := whole_number(env[name])) is None or number >= world_size:
                raise UserError(f"{name} must be a whole number below WORLD_SIZE ({world_size}), got {env[name]!r}")
    return world_size


def env_rank(env=None) -> int:
    """This process's rank under torchrun (RANK, checked as env_world_size checks it); 0 in a single process."""
    env = os.environ if env is None else env
    return int(env["RANK"]) if env_world_size(env) > 1 else 0


def restart_warning(env) -> str | None:
    """A warning when torchrun will restart failed processes (--max-restarts) with its rendezvous store shared with
    them: a restarted process can then read the previous attempt's addresses from it and fail to connect
    (pytorch/pytorch#135712, #167288; seen with torch 2.13 and gloo). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives
    each attempt a fresh store."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        return ("tinygemma: warning: torchrun shares its rendezvous store with the processes it restarts, which can "
                "make a restart fail to connect or hang (pytorch/pytorch#135712); run torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment")
    return None


def cuda_device(device: torch.device, world_size: int, local_rank: int) -> torch.device:
    """One GPU per process under torchrun (cuda:LOCAL_RANK); in a single process the GPU asked for (cuda:1 stays
    cuda:1), or the current one for a plain "cuda"."""
    if world_size > 1:
        if device.index is not None and device.index != local_rank:
            raise UserError(f"under torchrun each process trains on cuda:LOCAL_RANK; train.device {device} would put "
                            "two processes on one GPU. Use device = \"cuda\" (choose GPUs with CUDA_VISIBLE_DEVICES)")
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise UserError(f"torchrun started more processes on this machine than it has GPUs: LOCAL_RANK "
                            f"{local_rank}, but {visible} GPU{'s are' if visible != 1 else ' is'} visible. Use "
                            f"--nproc-per-node {visible} or fewer")
        return torch.device("cuda", local_rank)
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def raise_on_all_ranks(message: str | None, rt: Runtime, group=None, kind: type[Exception] = UserError) -> None:
    """Raise kind(message) (UserError: bad input; an OSError: the machine's failure) on every rank if rank 0 has a
    message, so no rank waits on a collective forever. The other ranks' error is marked `shown_by_rank_0`: the
    command line prints it once, not once a process."""
    if rt.world_size > 1:
        box = [message, kind is UserError]
        dist.broadcast_object_list(box, src=0, group=group)
        message = box[0]
        if not rt.is_main:  # (its line is rank 0's to print; the kind gives every process the same exit status)
            kind = UserError if box[1] else OSError
    if message:
        error = kind(message)
        error.shown_by_rank_0 = not rt.is_main
        raise error


def main_process_first(work: Callable[[], None], rt: Runtime, timeout=datetime.timedelta(days=1)) -> None:
    """Run `work` on rank 0 alone while the other processes wait for it, then raise a UserError (or OSError: the
    machine's or the network's failure) it raised on every process. They wait on a gloo group of their own, with
    `timeout`: work such as preparing a dataset can outlast the process group's own timeout (10 minutes under
    NCCL). Any other exception ends rank 0, and torchrun then stops the rest."""
    if rt.world_size == 1:
        work()
        return
    group = dist.new_group(backend="gloo", timeout=timeout)  # every process, before rank 0 starts the work
    try:
        message, kind = None, UserError
        if rt.is_main:
            try:
                work()
            except (UserError, OSError) as e:
                message, kind = str(e), type(e)
        raise_on_all_ranks(message, rt, group, kind)
    finally:
        dist.destroy_process_group(group)
