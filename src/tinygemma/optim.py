"""Optimizers and learning-rate schedules: `train.optimizer` and `train.lr_schedule`.

optimizer = "adamw"   torch.optim.AdamW on every parameter (weight decay on the 2-D ones only).
optimizer = "muon"    Muon on the decoder blocks' matrices (q/k/v/o, gate/up/down), AdamW on the rest: the token
                      embedding (which is also the tied output head) and the RMSNorm gains. Muon replaces each
                      matrix's momentum by the nearest semi-orthogonal matrix (a Newton-Schulz iteration), so every
                      direction of the update moves at the same rate; embeddings and gains are not matrices in
                      that sense and keep AdamW. Both live in ONE optimizer object (MuonAdamW), so state_dict,
                      torch.distributed.checkpoint and the safetensors checkpoint see one set of groups and state.

lr_schedule = "cosine"  linear warmup, then cosine decay from learning_rate to min_lr at max_steps.
lr_schedule = "wsd"     warmup-stable-decay: linear warmup, constant learning_rate, then a linear cooldown to min_lr
                        over the last cooldown_fraction of max_steps. Until the cooldown starts the learning rate
                        does not depend on max_steps, so a run can be extended on --resume (check_resume_schedule).

Muon's learning rate (muon_learning_rate) follows the same schedule shape: every group's rate is its peak times
schedule(step), and min_lr / learning_rate is the floor for both.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch

from tinygemma.config import FLOAT32_MAX, MUON_BACKENDS, TrainConfig, saved_train_settings
from tinygemma.devices import compiled_copy, cpu_has_bf16, cuda_has_bf16, cuda_has_fp16_tensor_cores
from tinygemma.errors import UserError

# Muon's settings, fixed rather than configurable (see README, "Optimizers and schedules"):
MUON_MOMENTUM = 0.95  # Keller Jordan's Muon, nanochat and torch.optim.Muon's default
MUON_NESTEROV = True
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic Newton-Schulz coefficients of Keller Jordan's Muon
NS_STEPS = 5
NS_EPS = 1e-7
# The precision of our own batched iteration, by backend; "torch" and "compiled" (and FSDP2's gathered matrices
# under them) iterate in bfloat16.
ITERATION_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------ schedules


def schedule(step: int, cfg: TrainConfig) -> float:
    """The learning rate at optimizer step `step` (0-based) as a fraction of the peak: warmup to 1, then the decay
    to min_lr / learning_rate (cosine), or a plateau at 1 and a linear cooldown (wsd). Steps count from 1 in
    both parts: the warmup's last step is the one at the peak, and the run's last step, max_steps - 1, is the
    one at min_lr."""
    floor = cfg.min_lr / cfg.learning_rate
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "wsd":
        start = cooldown_start(cfg)
        if step < start:
            return 1.0
        return 1.0 - (1.0 - floor) * (step + 1 - start) / (cfg.max_steps - start)
    if cfg.max_steps == cfg.warmup_steps:
        return 1.0
    progress = (step + 1 - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)


def cooldown_start(cfg: TrainConfig) -> int:
    """The first step of the wsd cooldown: the last cooldown_fraction of max_steps (at least the last step, when
    the fraction is not 0, so that a short run still ends at min_lr), never inside the warmup."""
    steps = round(cfg.cooldown_fraction * cfg.max_steps)
    return max(cfg.warmup_steps, cfg.max_steps - (max(1, steps) if cfg.cooldown_fraction > 0 else steps))


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """AdamW's learning rate at optimizer step `step` (what the logs call lr)."""
    return cfg.learning_rate * schedule(step, cfg)


def set_learning_rates(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> dict[str, float]:
    """Each group's rate for this step: its peak (learning_rate, or muon_learning_rate) times schedule(step).
    Returns the rates for the logs: "lr", AdamW's, and under Muon "lr_muon", its matrices' (before Muon's
    per-shape scale), which a sweep of muon_learning_rate changes and "lr" does not."""
    factor = schedule(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
    rates = {"lr": cfg.learning_rate * factor}
    if any(group.get("muon") for group in optimizer.param_groups):
        rates["lr_muon"] = cfg.muon_learning_rate * factor
    return rates


def taken_settings(saved: dict) -> TrainConfig:
    """A run's recorded [train] settings (a checkpoint's, as saved_train_settings reads them) as the TrainConfig
    its steps were taken with; settings this version does not know are left out."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved_train_settings(saved).items() if k in known})


def check_resume_schedule(saved: dict | None, cfg: TrainConfig, step: int) -> None:
    """Refuse a resume whose settings change learning rates already taken. Under wsd the rate before the
    cooldown does not depend on max_steps, so raising (or lowering) it before the cooldown has started continues
    the run exactly as if it had been planned that long; cosine's rate depends on max_steps from the warmup on."""
    if step > cfg.max_steps:
        raise UserError(f"the run is at step {step}, past train.max_steps = {cfg.max_steps}")
    if not saved:
        return
    planned = taken_settings(saved)  # the schedule the run took
    if planned.optimizer != cfg.optimizer:
        raise UserError(f"train.optimizer cannot change from {planned.optimizer} to {cfg.optimizer} "
                        f"on resume: the checkpoint holds the state of {planned.optimizer}")
    # The schedule's shape, with the run's peak and floor: a new learning_rate or min_lr changes the steps to come
    # alone (check_resume_settings warns of it), whatever ratio of the two the fractions hold.
    shape = dataclasses.replace(cfg, learning_rate=planned.learning_rate, min_lr=planned.min_lr)
    if all(schedule(s, planned) == schedule(s, shape) for s in range(step)):
        return
    try:
        same_length = dataclasses.replace(shape, max_steps=planned.max_steps)  # what the other settings change alone
    except UserError:  # a new warmup longer than the old run: the schedule changed (not max_steps, as it would say)
        same_length = None
    if same_length is None or planned.lr_schedule != cfg.lr_schedule or any(
            schedule(s, planned) != schedule(s, same_length) for s in range(step)):
        raise UserError(f"the learning-rate schedule of the run ({planned.lr_schedule}; lr_schedule, warmup_steps, "
                        f"cooldown_fraction) cannot change at step {step}: it would change rates "
                        "already taken")
    if cfg.lr_schedule == "wsd":
        began = cooldown_start(planned)
        # Steps counted as the log counts them: "step N" is the N-th, whose checkpoint is at step N
        raise UserError(f"train.max_steps cannot change from {planned.max_steps} to {cfg.max_steps} at step {step}: "
                        + (f"the wsd cooldown of the run began after step {began} (step {began + 1} took the first "
                           f"lower rate); extend it from a checkpoint of step {began} or earlier, if the run kept one (it "
                           f"keeps its best and its newest keep_checkpoints, 1 by default), into a new folder: "
                           f"tinygemma train --resume-from RUN/checkpoints/step_NNNNNN --out NEW --max-steps "
                           f"{cfg.max_steps}"
                           if began < step else
                           f"the wsd cooldown would then begin after step {cooldown_start(cfg)}, before this one, "
                           "changing rates already taken"))
    raise UserError(f"train.max_steps cannot change from {planned.max_steps} to {cfg.max_steps} at step {step}: "
                    "the cosine schedule's learning rates depend on max_steps; use lr_schedule=wsd for runs that "
                    "may be extended")


# ------------------------------------------------------------------ optimizers


def muon_parameters(model) -> set[str]:
    """Names of the parameters Muon trains: the 2-D weights inside the decoder blocks (attention and MLP
    projections). The embedding / tied head and every norm gain stay with AdamW."""
    return {name for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("layers.")}


def check_muon_rate(cfg: TrainConfig, model_config) -> None:
    """Refuse a muon_learning_rate whose step overflows float32 on the model's tallest matrices (Muon scales its
    rate by sqrt(rows / cols)): found from the model's shapes alone, before any data is prepared or weight made.
    (The AdamW part's bound is TrainConfig.validate's.)"""
    if cfg.optimizer != "muon":
        return
    from tinygemma.model import Gemma3

    with torch.device("meta"):  # shapes only
        model = Gemma3(model_config)
    shapes = dict(model.named_parameters())
    scale = max((muon_lr_scale(shapes[name].shape) for name in muon_parameters(model)), default=1.0)
    if cfg.muon_learning_rate * scale > FLOAT32_MAX:
        raise UserError(f"train.muon_learning_rate x {scale:.3g} (Muon's step on this model's tallest matrices) must "
                        f"be within float32's range, got {cfg.muon_learning_rate}")


# torch.compile's backend for the "compiled" Muon backend. The CPU tests put "aot_eager" here: the same traced
# graph, without inductor's code generation, which takes minutes on a CPU.
MUON_COMPILER = "inductor"


def muon_backend(device: torch.device) -> str:
    """The Muon iteration `muon_backend = "auto"` runs on `device`, by measurement (benchmarks/optimizer_step.py,
    BENCHMARKS.md): "bfloat16", our batched bfloat16 iteration, where the device computes in bfloat16 natively. On
    a CPU with AVX-512 BF16 (or AMX) it is 1.7x faster than torch.optim.Muon's one matrix at a time; on an H100
    (2026-12-05, the 270M's matrices) 4.4x (11.2 ms a step against 49.9; AdamW's, 2.0). "float16" on a GPU
    without bfloat16 but with float16 tensor cores (a T4, a V100), which multiply it at 8x their float32 rate
    (by the cards' specifications: no such GPU was measured here); it keeps more bits than bfloat16, and
    nothing in the iteration overflows it (an update's smallest entries can fall below its normal range and
    lose bits: at most 1.4% from the float32 result in trials on a CPU, 2026-12-07). Elsewhere "float32" (an
    older GPU; a CPU without AVX-512 BF16, where emulated bfloat16 made a gemma3-tiny step 2.3-3x slower than
    AdamW's)."""
    if (device.type == "cpu" and cpu_has_bf16()) or (device.type == "cuda" and cuda_has_bf16(device)):
        return "bfloat16"
    return "float16" if device.type == "cuda" and cuda_has_fp16_tensor_cores(device) else "float32"


def configure_optimizer(model, cfg: TrainConfig, rt) -> torch.optim.Optimizer:
    """AdamW with weight decay on the 2-D weights only (matrices and embeddings, not norm gains), fused on CUDA;
    or, under optimizer = "muon", Muon on the blocks' matrices and that AdamW on the rest, in one optimizer.
    Each group's `peak_lr` is what set_learning_rates scales by the schedule."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        groups = [
            {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay,
             "peak_lr": cfg.learning_rate},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0, "peak_lr": cfg.learning_rate},
        ]
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                 fused=True if rt.device.type == "cuda" else None)
    muon = muon_parameters(model)  # (its rate's float32 bound: check_muon_rate, as training starts)
    groups = [
        # Muon without weight decay: decoupled decay scales with the learning rate, and Muon's is ~10x AdamW's.
        {"params": [p for n, p in named if n in muon], "muon": True, "peak_lr": cfg.muon_learning_rate,
         "lr": cfg.muon_learning_rate, "weight_decay": 0.0},
        {"params": [p for n, p in named if n not in muon and p.dim() >= 2], "muon": False,
         "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if n not in muon and p.dim() < 2], "muon": False, "weight_decay": 0.0},
    ]
    backend = muon_backend(rt.device) if cfg.muon_backend == "auto" else cfg.muon_backend
    if backend == "torch" and not hasattr(torch.optim, "Muon"):
        raise UserError(f"train.muon_backend = torch needs torch.optim.Muon (PyTorch 2.9 or newer); this is "
                        f"{torch.__version__}: choose compiled, bfloat16, float16 or float32, or auto")
    optimizer = MuonAdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                          backend=backend)
    optimizer.backend_asked = cfg.muon_backend != "auto"  # (describe_optimizer gives auto's reasons only to auto)
    return optimizer


def describe_optimizer(optimizer: torch.optim.Optimizer, sharded: bool = False) -> str:
    """One phrase for the start-of-training line: which optimizer, and which Muon iteration runs (`sharded`:
    under FSDP2, where each matrix is gathered whole and the torch and compiled backends give way to our own)."""
    if not isinstance(optimizer, MuonAdamW):
        return type(optimizer).__name__
    if sharded:
        return f"Muon (own batched {muon_iteration(optimizer, True)} Newton-Schulz on each FSDP2 matrix gathered " \
               "whole) + AdamW"
    if optimizer.backend == "torch":  # (also where muon_backend asks for it without native bf16: no claim of it)
        return "Muon (torch.optim.Muon, bfloat16 Newton-Schulz, one matrix at a time) + AdamW"
    if optimizer.backend in ("bfloat16", "float16"):
        return f"Muon (own batched {optimizer.backend} Newton-Schulz) + AdamW"
    if optimizer.backend == "compiled":
        return "Muon (own bfloat16 Newton-Schulz, one torch.compile'd update per shape group) + AdamW"
    why = ("train.muon_backend = float32" if getattr(optimizer, "backend_asked", False)
           else "no native bf16 on this device")
    return f"Muon (own float32 Newton-Schulz: {why}) + AdamW"


def muon_iteration(optimizer: torch.optim.Optimizer, sharded: bool = False) -> str | None:
    """The Muon iteration that runs, recorded with the run: muon_backend as resolved (auto's choice by device),
    and under FSDP2 (`sharded`) our own iteration's dtype, which the torch and compiled backends give way to;
    None without Muon. The backends round differently, so a resume on a machine that chooses another one
    trains on with other arithmetic."""
    if not isinstance(optimizer, MuonAdamW):
        return None
    if sharded:
        return optimizer.backend if optimizer.backend in ITERATION_DTYPES else "bfloat16"
    return optimizer.backend


def orthogonalize(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of Muon in `dtype`: maps G = U S V^T to about U S' V^T with S' near 1
    (between roughly 0.7 and 1.2; exactness does not matter for training). Works on the wide orientation so the
    Gram matrix is the small one. `g` is one matrix or a stack of them (..., rows, cols), each done alone."""
    a, b, c = NS_COEFFICIENTS
    if dtype == torch.float16:  # its range: 6e-5 to 65,504 (normal); scaled into it before the cast, in float32
        g = g / torch.linalg.matrix_norm(g, keepdim=True, dtype=torch.float32).clamp(min=NS_EPS)
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp(min=NS_EPS)
    flat = x.reshape(-1, *x.shape[-2:]) if x.dim() > 3 else x  # one stack of matrices, or one matrix
    fma = torch.baddbmm if flat.dim() == 3 else torch.addmm  # beta * input + alpha * (m1 @ m2), rounded once
    for _ in range(NS_STEPS):
        gram = flat @ flat.mT
        flat = fma(flat, fma(gram, gram, gram, beta=b, alpha=c), flat, beta=a)
    x = flat.reshape(x.shape)
    return x.mT if tall else x


def shape_groups(tensors: list[torch.Tensor]) -> list[list[int]]:
    """The indices of `tensors`, grouped by shape and dtype (in order of first appearance): each group stacks."""
    by_shape: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        by_shape.setdefault((tuple(t.shape), t.dtype), []).append(i)
    return list(by_shape.values())


def orthogonalize_groups(updates: list[torch.Tensor], dtype: torch.dtype):
    """(indices, results) for each shape group of `updates`: `orthogonalize` of each matrix in `dtype`, the
    matrices of one shape stacked into one batched iteration (a few large products instead of one small product
    per matrix: gemma3-tiny's are 128 wide, which threads use better), the results a stack in the updates' own
    dtype, cast at once, and laid out as the matrices are (a tall one's comes back transposed from the iteration:
    a foreach add over parameters and results of unequal strides falls back to one kernel a matrix on a GPU)."""
    for indices in shape_groups(updates):
        done = orthogonalize(torch.stack([updates[i] for i in indices]), dtype)
        # (.contiguous(): a cast to the same dtype gives the stack back as it is, whatever memory_format asks)
        yield indices, done.to(updates[indices[0]].dtype, memory_format=torch.contiguous_format).contiguous()


def muon_lr_scale(shape: torch.Size) -> float:
    """sqrt(max(1, rows / cols)): Keller Jordan's (and torch.optim.Muon's "original") shape scaling, so a tall
    matrix (gate/up: 512 x 128) gets an update of the same per-entry size as a square one."""
    return math.sqrt(max(1.0, shape[0] / shape[1]))


def muon_shape_group(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                     lr: torch.Tensor, momentum: torch.Tensor, weight_decay: torch.Tensor, nesterov: bool) -> None:
    """Muon's whole update of matrices of one shape, written to be compiled into one graph: the momentum and
    Nesterov blends, one batched bfloat16 Newton-Schulz iteration over their stack, the decay and the step (the
    "bfloat16" backend's arithmetic). lr, momentum and weight_decay are 0-d tensors on the matrices' device:
    values the schedule changes every step then change no guard of the compiled graph (no recompilation), and
    reading them makes the host wait for nothing."""
    updates, momentum = [], momentum.to(bufs[0].dtype)  # lerp's weight has its tensors' dtype
    for g, buf in zip(grads, bufs):
        buf.lerp_(g, 1 - momentum)
        updates.append(g.lerp(buf, momentum) if nesterov else buf)
    orthogonal = orthogonalize(torch.stack(updates), torch.bfloat16)
    step = lr * muon_lr_scale(params[0].shape)
    for i, p in enumerate(params):
        p.mul_(1 - lr * weight_decay)
        p.sub_(orthogonal[i].to(p.dtype) * step)


def local_shard_of(full: torch.Tensor, like) -> torch.Tensor:
    """`full`, a whole matrix every rank computed alike, as a DTensor placed like the parameter `like`: each rank
    keeps its own shard of it. PyTorch 2.7 and later do that without communication (src_data_rank=None); 2.6
    has no such argument, and scatters rank 0's copy, which is the same matrix."""
    from torch.distributed.tensor import distribute_tensor

    if "src_data_rank" in inspect.signature(distribute_tensor).parameters:
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return distribute_tensor(full, like.device_mesh, like.placements)


def compiled_muon_shape_group():
    """muon_shape_group through torch.compile, for one optimizer. Static shapes: each shape group (shape and
    number of matrices) gets its own graph, Gemma 3 at most 5 (q, k and v, o, gate and up, down), within dynamo's
    recompile limit of 8 graphs per function (past it, under fullgraph=True, dynamo raises). Dynamo keeps a
    function's graphs with its code object, so each optimizer compiles a copy of its own: one shared by the
    process failed at the third model of a notebook's sweep. (A graph seen before comes from inductor's cache.)"""
    return compiled_copy(muon_shape_group, backend=MUON_COMPILER, dynamic=False, fullgraph=True)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups marked `muon`, AdamW for the others, in one optimizer.

    Muon (per matrix W with gradient G): B <- momentum B + (1 - momentum) G; U = Nesterov's G + momentum (B - G);
    W <- W (1 - lr wd) - lr sqrt(max(1, rows/cols)) NS(U). This is torch.optim.Muon's update; the "torch"
    backend calls its functional form (bfloat16 iteration, one matrix at a time), "float32" and "bfloat16" run
    `orthogonalize_groups` (same-shape matrices batched) in that precision, and "compiled" runs the bfloat16
    update of each shape group as one compiled graph (`muon_shape_group`). `muon_backend` chooses the default by
    device; "torch" and "compiled" are there to be chosen, and measured (benchmarks/optimizer_step.py).
    AdamW: torch.optim.AdamW's update, through its functional form (bias-corrected moments, decoupled decay).

    FSDP2: a sharded matrix's update is gathered whole (DTensor.full_tensor), orthogonalized identically on every
    rank, and each rank keeps its own shard; the iteration needs the whole matrix. Sharded matrices take the
    "bfloat16" backend's batched iteration under "torch" and "compiled" too.
    """

    def __init__(self, groups, lr: float, betas: tuple[float, float], eps: float, backend: str = "float32"):
        if backend not in MUON_BACKENDS:
            raise ValueError(f"unknown Muon backend {backend!r}")
        self.backend = backend
        self._hyper: dict[torch.device, tuple[torch.Tensor, ...]] = {}  # "compiled": lr, momentum, weight decay
        self._compiled = None  # "compiled": this optimizer's compiled muon_shape_group
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0, "muon": False,
                    "momentum": MUON_MOMENTUM, "nesterov": MUON_NESTEROV}
        super().__init__(groups, defaults)
        for group in self.param_groups:
            group.setdefault("peak_lr", group["lr"])
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon takes only 2-D parameters")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        sharded = any(hasattr(p, "full_tensor") for p in params)
        if self.backend == "compiled" and params and not sharded:
            hyper = self.hyperparameters(params[0].device, lr, momentum, wd)
            if self._compiled is None:
                self._compiled = compiled_muon_shape_group()
            update = self._compiled
            for indices in shape_groups(params):
                update([params[i] for i in indices], [params[i].grad for i in indices], [bufs[i] for i in indices],
                       *hyper, group["nesterov"])
            return
        if self.backend == "torch" and not sharded:
            from torch.optim._muon import muon  # torch.optim.Muon.step's own functional form

            muon(params, [p.grad for p in params], bufs, lr=lr, weight_decay=wd, momentum=momentum,
                 nesterov=group["nesterov"], ns_coefficients=NS_COEFFICIENTS, eps=NS_EPS, ns_steps=NS_STEPS,
                 adjust_lr_fn="original", has_complex=False)
            return
        if not params:
            return
        # Each elementwise pass is one multi-tensor kernel over all the matrices (on a GPU, where one kernel a
        # matrix was about 5 launches x 126 matrices a step at 270M), with the arithmetic of one a matrix.
        grads = [p.grad for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        updates = bufs
        if group["nesterov"]:  # (FSDP2: torch 2.6 to 2.11's DTensor shards the in-place foreach lerp, not this one)
            updates = [g.lerp(b, momentum) for g, b in zip(grads, bufs)] if sharded else torch._foreach_lerp(
                grads, bufs, momentum)
        # FSDP2: the iteration needs the whole matrix; every rank gathers and orthogonalizes the same one
        updates = [u.full_tensor() if hasattr(u, "full_tensor") else u for u in updates]
        dtype = ITERATION_DTYPES.get(self.backend, torch.bfloat16)
        if wd:  # (the trainer's Muon groups take none) one matrix at a time: a CPU's foreach multiply rounds the
            for p in params:  # factor to a bfloat16 or float16 matrix's dtype first
                p.mul_(1 - lr * wd)
        for indices, done in orthogonalize_groups(updates, dtype):
            mine = [params[i] for i in indices]
            if hasattr(mine[0], "full_tensor"):  # keep this rank's shard of the result: no scatter from rank 0
                done = [local_shard_of(update, p) for update, p in zip(done, mine)]
            torch._foreach_add_(mine, list(done), alpha=-lr * muon_lr_scale(mine[0].shape))

    def hyperparameters(self, device: torch.device, *values: float) -> tuple[torch.Tensor, ...]:
        """`values` in 0-d float32 tensors on `device`, kept from step to step and refilled in place: on a GPU a
        fill is a queued kernel, so a new learning rate every step costs no wait for the device."""
        if device not in self._hyper:
            self._hyper[device] = tuple(torch.zeros((), device=device) for _ in values)
        for tensor, value in zip(self._hyper[device], values):
            tensor.fill_(value)
        return self._hyper[device]

    def _adamw(self, group: dict) -> None:
        """torch.optim.AdamW's own update (its functional form; multi-tensor on a GPU), on this group's tensors."""
        from torch.optim.adamw import adamw

        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
