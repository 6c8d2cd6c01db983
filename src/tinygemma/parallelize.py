"""What is applied to the model from outside it for training: the attention backend, activation checkpointing,
torch.compile, and DDP or FSDP2 under torchrun (the model file knows nothing of these, as torchtitan's)."""

from __future__ import annotations

import contextlib
import inspect
import types

import torch
import torch.nn.functional as F

from tinygemma.config import GLOBAL, SLIDING, ModelConfig, TrainConfig
from tinygemma.decode import SAME_FORWARD
from tinygemma.devices import function_copy, inductor_runs_on
from tinygemma.errors import UserError
from tinygemma.loss import LOSS_CHUNK_SIZE
from tinygemma.model import (
    KV_LAYOUTS,
    Gemma3,
    compiled_flex_attention,
    flash_window_attention,
    kv_for_every_head,
    sliding_window_mask,
)
from tinygemma.runtime import Runtime


def init_model(model_config: ModelConfig, cfg: TrainConfig, rt: Runtime, weights: dict | None,
               attention: str | None = None) -> Gemma3:
    """The Gemma3 on the device, with its attention backend (`attention`, where the caller has chosen it with
    choose_attention_backend already) and activation checkpointing, not yet compiled or wrapped.

    The model is initialised on the CPU in float32 from the seed, so every process and every device starts from
    the same weights; `weights` (a checkpoint's) replace them before any wrapping. Weights stay float32: autocast
    computes in bf16/fp16 while the master weights and the optimizer state keep full precision (FSDP2 gathers
    them in the autocast dtype, and reduces gradients in float32).
    """
    torch.manual_seed(cfg.seed)
    raw = Gemma3(model_config)
    if weights is not None:
        weights = dict(weights)
        if model_config.tie_embeddings:
            weights["lm_head.weight"] = weights["embed_tokens.weight"]
        raw.load_state_dict(weights, strict=True)
    raw.to(rt.device)
    raw.tabulate_rope(cfg.block_size)  # read by the (compiled) forward, not recomputed in each layer
    raw.attention_backend = attention or choose_attention_backend(cfg, model_config, rt)[0]
    raw.loss_chunk_size, raw.loss_full_logits, _ = choose_loss_head(cfg, rt)
    set_kv_layouts(raw, choose_kv_layouts(raw, cfg, rt))
    if raw.attention_backend == "flex":
        # Built here, before compiling, so the compiled graph only reads them.
        raw.sliding_block_mask(cfg.block_size, rt.device)
        kernel = compiled_flex_attention(fresh=True)  # this model's shapes alone: within dynamo's 8 graphs
        for layer in raw.layers:
            layer.self_attn.flex_kernel = kernel
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(raw)
    return raw


def compiles(cfg: TrainConfig, rt: Runtime) -> bool:
    """Whether training runs the model through torch.compile: `compile = true` or `regional`, or `auto` on a CUDA
    GPU that inductor compiles for (not a Pascal one: check_compile)."""
    return cfg.compile in ("true", "regional") or (cfg.compile == "auto" and rt.is_cuda and inductor_runs_on(rt.device))


def check_compile(cfg: TrainConfig, rt: Runtime) -> str | None:
    """Refuse in one line what asks torch.compile for a GPU that Triton does not support (a P100, a GTX 10xx),
    where inductor would stop the first step with a traceback: `compile = true` or `regional`, or Muon's
    compiled backend. Returns why `compile = auto` leaves the model uncompiled there (None elsewhere)."""
    why = older_than_triton(rt.device)
    if why is None:
        return None
    asked = ([(f"train.compile = {cfg.compile}", "train.compile = auto or false")] if cfg.compile in ("true", "regional")
             else []) + ([("train.muon_backend = compiled", "another train.muon_backend (auto, float32 or torch)")]
                         if cfg.optimizer == "muon" and cfg.muon_backend == "compiled" else [])
    if asked:
        raise every_process(UserError(f"{' and '.join(a for a, _ in asked)} cannot run on this GPU: {why}; use "
                                      f"{' and '.join(fix for _, fix in asked)}"), rt)
    return why


def older_than_triton(device: torch.device) -> str | None:
    """Why Triton cannot compile for `device`, a GPU older than it supports; None where it can (or on a CPU)."""
    if inductor_runs_on(device):
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return (f"{torch.cuda.get_device_name(device)} is compute capability {major}.{minor}, and Triton (torch.compile's "
            "GPU code, flex_attention's kernels) needs 7.0 or later")


def every_process(error: UserError, rt: Runtime) -> UserError:
    """`error`, which every process raises alike (from the same settings and GPU kind), said once under torchrun:
    by process 0."""
    error.shown_by_rank_0 = not rt.is_main
    return error


# The compiled modules' forward code, copied once per (code object, graph key): see compile_in_place.
_FORWARD_CODES: dict[tuple, types.CodeType] = {}


def compile_in_place(module: torch.nn.Module, key: tuple = ()) -> None:
    """torch.compile of `module` in place, with static shapes (a run's passes all have one), its forward on a copy
    of its code made for `key`, what the graphs depend on besides the weights (wrap_model's). Dynamo keeps graphs
    with a code object, at most 8, past which it runs the code uncompiled, and compiles a code object it has seen
    at other shapes with symbolic sizes. So in one Python process (a notebook's) runs that differ in `key` each
    get static graphs of their own, however many, and runs alike (a notebook's chunks of one run) share them."""
    forward = module.forward
    func = getattr(forward, "__func__", forward)  # a method, or a function set on it (activation checkpointing's)
    # (Keyed by file too: code objects alike in all but their file compare equal.)
    code = _FORWARD_CODES.setdefault((func.__code__, func.__code__.co_filename, key), func.__code__.replace())
    copy = function_copy(func, code)
    setattr(copy, SAME_FORWARD, getattr(func, SAME_FORWARD, func is type(module).forward))  # (the plan may decode)
    module.forward = types.MethodType(copy, forward.__self__) if func is not forward else copy
    module.compile(dynamic=False)


def cache_graphs_with_custom_functions() -> None:
    """Let AOTAutograd's on-disk cache keep graphs that hold a torch.autograd.Function (the chunked loss head):
    torch bypasses it for them by default, so every process traced the whole model's training graph again, its
    inductor code cached or not. On a CPU (2-core Intel Xeon with AMX), `gemma3-270m-gpt2` compiled, inductor's
    cache warm: the first training step 16.7 s without it, 4.6 s with it, the same losses (BENCHMARKS.md). The
    cache key holds the Function's traced forward and backward: a backward changed between two processes missed
    and gave the new gradient (checked on torch 2.13). Process-wide, once training compiles; a torch release
    without the switch keeps its default."""
    import torch._functorch.config as config  # (not loaded with torch itself)

    if hasattr(config, "autograd_cache_allow_custom_autograd_functions"):
        config.autograd_cache_allow_custom_autograd_functions = True


def compile_layers(layers, key: tuple = ()) -> None:
    """`compile = regional`: each decoder layer of `layers` (a model's ModuleList; benchmarks/train_throughput.py
    gives transformers' too) compiled on its own, in place (the embedding and the loss head stay eager), as
    torchtitan compiles. The layers alike share one graph (one for the sliding layers, one for the
    global), so the first step compiles in a fraction of the whole model's time (BENCHMARKS.md, the GPU plan,
    measured on a CPU). What it costs a GPU's step is not measured yet."""
    for block in layers:
        compile_in_place(block, key)


def wrap_model(raw: Gemma3, cfg: TrainConfig, rt: Runtime, micro_batch_size: int | None = None):
    """What the loop calls: `raw` compiled (in place), or wrapped by DDP, or sharded by FSDP2 (in place).
    `micro_batch_size`: the passes' size where known (the trainer's, after its probe), for compile_in_place's key."""
    compile_ = compiles(cfg, rt)
    if compile_:
        cache_graphs_with_custom_functions()
    # What the compiled graphs depend on besides the weights: the model, the passes' shape, the traced choices.
    key = (repr(raw.config), micro_batch_size or cfg.micro_batch_size, cfg.block_size, cfg.dtype,
           cfg.attention_backend, cfg.loss_head, cfg.activation_checkpointing, str(rt.device), rt.world_size)
    if rt.world_size > 1 and cfg.distributed == "fsdp":
        apply_fsdp(raw, rt, compile_, key)  # (compiled a block at a time, whether true or regional)
        return raw
    if compile_ and cfg.compile == "regional":
        compile_layers(raw.layers, key)
        compile_ = False  # nothing more to compile: DDP then wraps the model with its layers compiled
    if rt.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # No buffer broadcast before each forward: the model's buffers are constants every process makes alike
        # (reset_buffers), and the RoPE tables alone would be 128 MiB a step at 32,768 positions. Torch 2.13
        # renamed the switch (the old name warns; the new one still broadcasts them once, at the start).
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        ddp = DistributedDataParallel(raw, device_ids=[rt.device.index] if rt.is_cuda else None,
                                      **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})
        if compile_:
            # Compiled around DDP, as torchtitan orders it: DDP's graph optimizer splits the graph at its gradient
            # buckets, so their all-reduces overlap the rest of backward. Not compile_in_place: dynamo starts
            # tracing inside DDP's forward, at the model's, so a copy of DDP's would key nothing (and a torchrun
            # process trains one run).
            ddp.compile(dynamic=False)
        return ddp
    if compile_:
        compile_in_place(raw, key)  # in place, so parameter names stay those of the model
    return raw


# A probed micro-batch may peak at this fraction of the GPU's memory: the rest is headroom for what the probe
# does not see (the optimizer's state, made at the first step; compiled kernels' workspace; fragmentation).
PROBE_MEMORY_FRACTION = 0.85


def probe_micro_batch_size(raw: Gemma3, cfg: TrainConfig, rt: Runtime, sizes: list[int]) -> int:
    """`micro_batch_size = auto` on CUDA: the largest of `sizes` (largest first) whose forward and backward pass,
    under the run's autocast, peaks below PROBE_MEMORY_FRACTION of the GPU's memory less what other processes
    hold of it.

    Probed on `raw` before compiling and wrapping, eagerly (compiling the model for each size would take
    minutes; compiled code needs no more memory than eager), on token ids of zeros, so no random state is
    consumed. Only flex attention (sliding layers longer than the window, on A100/H100-class GPUs of 40 GB and
    more) is compiled eagerly, once per size tried: two or three sizes at the 270M's shapes, within dynamo's 8.
    Under torchrun every process takes the smallest of the processes' choices.

    While it probes, the caching allocator is capped at that bound, so a size too large fails as a clean
    out-of-memory error with the rest of the GPU still free, rather than by filling the device: memory that
    CUDA's libraries take outside the allocator (cuBLAS workspaces, kernels loaded for the first backward) could
    then fail as an unrecoverable CUDA error. The cap the process had is restored afterwards.
    """
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(rt.device)
    # What other processes hold (a notebook's kernel that trained before, another run; and this process's CUDA
    # context) is not this one's to take: the headroom is kept below what is left, and below the process's own
    # cap (torch.cuda.get_per_process_memory_fraction is recent; without it the process had none: 1.0).
    others = max(0, total - free - torch.cuda.memory_reserved(rt.device))
    previous = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)(rt.device)
    limit = min(PROBE_MEMORY_FRACTION * total - others, PROBE_MEMORY_FRACTION * previous * total)

    def fits(size: int) -> bool:
        try:  # under the cap even the token ids may not fit (a GPU nearly full already): that too is "no"
            tokens = torch.zeros(size, cfg.block_size, dtype=torch.long, device=rt.device)
            torch.cuda.reset_peak_memory_stats(rt.device)
            with rt.autocast():
                loss = raw(tokens, tokens)
            loss.backward()
            torch.cuda.synchronize(rt.device)
            return torch.cuda.max_memory_allocated(rt.device) <= limit
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            loss = tokens = None
            raw.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    torch.cuda.set_per_process_memory_fraction(min(previous, max(limit, 0) / total), rt.device)
    try:
        chosen = next((size for size in sizes if fits(size)), 0)
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, rt.device)
    size = torch.tensor(chosen, device=rt.device)  # made under the process's own cap, not the probe's
    torch.cuda.reset_peak_memory_stats(rt.device)  # training's peak memory is training's own, not the probe's
    if rt.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(size, op=dist.ReduceOp.MIN)
    if not size:  # on every process, so none waits in a collective
        held = (f" ({others / 2**30:.1f} of its {total / 2**30:.1f} GiB are held by other processes: end them, or "
                "in a notebook let go of its models on the GPU, then torch.cuda.empty_cache())" if others > 0.1 * total
                else "")
        raise UserError(f"not even {sizes[-1]} sequence(s) of block_size {cfg.block_size} fit in this GPU's memory "
                        f"for a forward and backward pass{held}; lower train.block_size, or set "
                        "train.activation_checkpointing=true")
    return int(size)


def apply_fsdp(raw: Gemma3, rt: Runtime, compile_: bool, key: tuple = ()) -> None:
    """FSDP2: each block, then the rest (embedding, tied head, final norm), sharded over the processes. Under
    autocast the weights are gathered in its dtype, not float32, and gradients reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not fsdp_runs_on(rt.device):  # (every process decides alike, before any collective)
        raise UserError(f"distributed = fsdp on a CPU needs torch 2.7 or later (torch {torch.__version__}'s FSDP2 "
                        "calls what its CPU streams lack): train with distributed = ddp, or upgrade torch")
    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    kwargs = fsdp_options(rt.dtype)
    for block in raw.layers:
        if compile_:
            compile_in_place(block, key)  # per block, as torchtitan: FSDP's hooks stay outside the compiled graphs
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(raw, mesh=mesh, **kwargs)


def fsdp_runs_on(device: torch.device) -> bool:
    """Whether FSDP2 can shard on `device`'s kind: on a CPU from torch 2.7, whose CPU streams record events (as
    no-ops) for fully_shard's all-gathers; torch 2.6's stop at the first forward with an AttributeError."""
    return device.type != "cpu" or hasattr(torch.cpu.Stream, "record_event")


def fsdp_options(dtype: torch.dtype) -> dict:
    """fully_shard's mixed precision: parameters gathered in the autocast dtype, gradients reduced in float32."""
    if dtype == torch.float32:
        return {}
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return {"mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)}


def grad_scaler(rt: Runtime, fsdp: bool):
    """The float16 loss scaler (disabled otherwise). Under FSDP2 each process sees only its own shards'
    gradients, so the sharded scaler makes every process agree on whether a step overflowed and is skipped."""
    enabled = rt.dtype == torch.float16
    if fsdp and enabled:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(rt.device.type)
    return torch.amp.GradScaler(rt.device.type, enabled=enabled)


# Shared memory per block that flex_attention's kernels at head_dim 256 need with inductor's default configs (one
# config each, never pruned by size): compiled without a GPU by torch 2.11's Triton 3.6 for each architecture,
# forward / backward took 148 / 133 KB on sm80 (A100: 163 KB usable, fits), the same on sm86/89 (RTX 3090/4090,
# A10, L4: 99 KB, neither fits), 128 / 193 KB on sm90 (H100: 227 KB, fits) and a 128 KB forward on sm75 (T4:
# 64 KB). `auto` takes flex only where both fit; kernel_options with smaller blocks would fit the others (not
# run on those GPUs, so not set).
FLEX_MIN_SHARED_MEMORY = 160 * 1024
FLEX_SHARED_MEMORY_HEAD_DIM = 256  # the head size those figures are for


# The attention backends that train only on CUDA, and why.
CUDA_ONLY_ATTENTION = {"flex": "PyTorch has no flex_attention backward elsewhere",
                       "flash": "FlashAttention-2's kernels are CUDA's"}


def attention_cannot_train(backend: str, block_size: int, model_config: ModelConfig, device: torch.device) -> bool:
    """Whether attention `backend` asked for could not train here: flex or flash off CUDA, for a block longer than
    the window (shorter ones take plain causal SDPA whatever is asked)."""
    return backend in CUDA_ONLY_ATTENTION and block_size > model_config.sliding_window and device.type != "cuda"


def check_attention_backend(cfg: TrainConfig, model_config: ModelConfig, device: torch.device) -> None:
    """Refuse flex or flash attention where it cannot train (attention_cannot_train). `tinygemma run` checks it
    before preparing the data."""
    backend = cfg.attention_backend
    if attention_cannot_train(backend, cfg.block_size, model_config, device):
        raise UserError(f"train.attention_backend = {backend} needs a CUDA GPU ({CUDA_ONLY_ATTENTION[backend]}); "
                        "use auto or sdpa")
    if backend == "flash" and cfg.block_size > model_config.sliding_window and cfg.dtype == "float32":
        raise UserError("train.attention_backend = flash needs train.dtype bfloat16 or float16 (FlashAttention-2 "
                        "takes no float32); use auto, flex or sdpa")


def choose_attention_backend(cfg: TrainConfig, model_config: ModelConfig, rt: Runtime) -> tuple[str, str]:
    """(backend, why) for the sliding layers: "flex" (flex_attention, work proportional to the window), "flash"
    (FlashAttention-2's own window; asked for only, where one pass of it runs) or "sdpa" (SDPA with the window as
    a mask). `auto` takes flex on GPUs where its kernels compile."""
    check_attention_backend(cfg, model_config, rt.device)
    if cfg.block_size <= model_config.sliding_window:
        return "sdpa", f"the block ({cfg.block_size}) fits in the window, so every layer is plainly causal"
    if cfg.attention_backend == "flash":
        mc = model_config
        refusal = agreed_refusal(flash_window_refusal(rt.device, rt.dtype, mc.n_heads, mc.n_kv_heads, mc.head_dim,
                                                      mc.sliding_window), rt)
        if refusal:  # (every process refuses: none waits in a collective)
            raise every_process(UserError(f"train.attention_backend = flash: FlashAttention-2's window does not run "
                                          f"here in {str(rt.dtype).removeprefix('torch.')} ({refusal}); use auto, "
                                          "flex or sdpa"), rt)
        return "flash", "asked for"
    if cfg.attention_backend == "sdpa":
        return "sdpa", "asked for"
    if not rt.is_cuda:  # (flex asked for was refused above)
        return "sdpa", f"flex_attention trains on CUDA only, not {rt.device.type}"
    props = torch.cuda.get_device_properties(rt.device)
    shared = shared_memory_per_block(props)
    too_little = (f"{props.name} has {shared // 1024} KB of shared memory per block, too little for "
                  "flex_attention's backward at this head size") if shared and shared < FLEX_MIN_SHARED_MEMORY else None
    if cfg.attention_backend == "flex":  # (refused where Triton would stop the first step with a traceback)
        why = older_than_triton(rt.device) or (
            f"{too_little} (head_dim {model_config.head_dim}; Triton would stop the first step with OutOfResources)"
            if too_little and model_config.head_dim >= FLEX_SHARED_MEMORY_HEAD_DIM else None)
        if why:
            raise every_process(UserError(f"train.attention_backend = flex cannot train here: {why}; use auto or "
                                          "sdpa"), rt)
        return "flex", "asked for"
    if shared is None:
        return "sdpa", (f"this PyTorch does not tell {props.name}'s shared memory per block, which flex_attention's "
                        "backward at this head size needs plenty of")
    if too_little:
        return "sdpa", too_little
    return "flex", f"{props.name}: flex_attention's fused kernels"


def agreed_refusal(refusal: str | None, rt: Runtime) -> str | None:
    """The first refusal any process met (naming the process, past process 0), on every process: under torchrun
    one that went on where another refused would wait in its first collective for ever."""
    if rt.world_size == 1:
        return refusal
    import torch.distributed as dist

    said = [None] * rt.world_size
    dist.all_gather_object(said, refusal)
    return next((f"process {rank}: {why}" if rank else why for rank, why in enumerate(said) if why), None)


def check_choices_agree(choices: dict[str, str], rt: Runtime) -> None:
    """Under torchrun, refused alike on every process (said by process 0) where a process chose otherwise than
    process 0 from its own machine under auto (`choices`: train.dtype's and, under DDP, train.muon_backend's):
    under DDP each process steps its own copy of the model from the averaged gradients, so another Muon
    iteration's rounding drifts the copies apart unseen (the loss logged is their mean, the checkpoints process
    0's), and float16's gradient scaler on some processes only skips steps on those only (under FSDP2 its
    collectives would hang). Like machines (every GPU of one kind) always agree."""
    if rt.world_size == 1:
        return
    import torch.distributed as dist

    said = [None] * rt.world_size
    dist.all_gather_object(said, choices)
    for rank, theirs in enumerate(said):
        differ = [key for key in said[0] if theirs.get(key) != said[0][key]]
        if differ:
            told = "; ".join(f"{key}: {said[0][key]} on process 0, {theirs.get(key)} on process {rank}"
                             for key in differ)
            raise every_process(UserError(
                f"the processes' machines chose differently under auto ({told}): their steps would part unseen "
                f"(another precision or Muon iteration on some); set {' and '.join(differ)} in the recipe to what "
                "every machine runs (float32 runs everywhere), or train on like machines"), rt)


# The (device, dtype, heads, K/V heads, head size, window) where flash_window_refusal's probe passed.
_FLASH_WINDOW_RUNS: set = set()


def flash_window_refusal(device: torch.device, dtype: torch.dtype, n_heads: int, n_kv_heads: int, head_dim: int,
                         window: int) -> str | None:
    """Why FlashAttention-2's window cannot train here, in a line, or None: one forward and backward pass of
    flash_window_attention at these heads, head size and dtype on `device`, on inputs where the window's edge
    decides the last query's output. The keys before its window and the oldest key in it score high; the ones
    before hold 1 in one channel of their values, the oldest in another, the rest 0: a right window reads the
    second alone (forward and backward), one reaching a key too far or stopping a key short does not. A kernel
    that refuses (bf16 and fp16 only, sm80 and newer, head_dim 256's backward on sm80 and sm90), ignores the
    window (a ROCm build without it), or gives NaN is refused. A pass is remembered for the process; a refusal is
    not (out of memory, say, may not last)."""
    key = (device, dtype, n_heads, n_kv_heads, head_dim, window)
    if key in _FLASH_WINDOW_RUNS:
        return None
    try:  # (making the inputs too: out of memory is a refusal, not a traceback)
        position = torch.arange(2 * window, device=device)[:, None]
        channel = torch.arange(head_dim, device=device)[None, :]
        q = torch.ones(1, n_heads, 2 * window, head_dim, device=device, dtype=dtype, requires_grad=True)
        k = (position <= window).to(dtype).expand(1, n_kv_heads, -1, head_dim).clone().requires_grad_()
        v = (((position < window) & (channel == 0)) | ((position == window) & (channel == 1))).to(dtype).expand(
            1, n_kv_heads, -1, -1).clone().requires_grad_()
        out = flash_window_attention(q, k, v, window, 30.0 / head_dim)[:, :, -1].float()  # high scores: 30, else 0
        out.sum().backward()
        grad = v.grad.float()
        before, before_grad, edge, edge_grad = (x.item() for x in (
            out[..., 0].abs().max(), grad[:, :, :window].abs().max(), out[..., 1].min(), grad[:, :, window].min()))
    except (RuntimeError, NotImplementedError, TypeError) as e:  # (TypeError: a PyTorch without the window's keywords)
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    if not (before <= 1e-3 and before_grad <= 1e-3 and edge >= 0.5 and edge_grad >= 0.5):  # (NaN fails each)
        return (f"the kernel ran but its window is not {window} keys (the last query read {before:.3g} of the keys "
                f"before it and {edge:.3g} of the oldest in it, where 0 and 1 were due)")
    _FLASH_WINDOW_RUNS.add(key)
    return None


# The most shared memory a block can opt into, by compute capability (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability"): for PyTorch releases whose device properties lack it (2.6).
SHARED_MEMORY_PER_BLOCK_KB = {(7, 0): 96, (7, 2): 96, (7, 5): 64, (8, 0): 163, (8, 6): 99, (8, 7): 163, (8, 9): 99,
                              (9, 0): 227, (10, 0): 227, (12, 0): 99}


def shared_memory_per_block(props) -> int | None:
    """Bytes of shared memory a block can use on the GPU `props` describes: what PyTorch reports, or else the
    CUDA guide's figure for its compute capability; None when neither is known."""
    reported = getattr(props, "shared_memory_per_block_optin", None)
    if reported:
        return reported
    kb = SHARED_MEMORY_PER_BLOCK_KB.get((getattr(props, "major", 0), getattr(props, "minor", 0)))
    return kb * 1024 if kb else None


def choose_kv_layouts(raw: Gemma3, cfg: TrainConfig, rt: Runtime) -> dict[str, str]:
    """{layer kind: kv_layout} for training on `rt`: how SDPA gets the one K/V head of the sliding and of the
    global layers (model.Attention.kv_layout). The first layout that a fused CUDA kernel (flash or
    memory-efficient) runs forward and backward at the training shape, dtype and mask (sdpa_fused_kernel_runs):
    shared where flash runs (sm80 and newer, bf16 or fp16, no mask); otherwise, as long as this PyTorch's
    memory-efficient kernel takes no shared heads (a T4, a V100, float32, the sliding window's mask), expanded
    or repeated. Shared, as without training, on other devices, under flex attention, and where no fused kernel
    runs any layout (SDPA's math kernel then, as before)."""
    mc = raw.config
    layouts = {SLIDING: "shared", GLOBAL: "shared"}
    if not rt.is_cuda or mc.n_kv_heads == mc.n_heads:
        return layouts
    T, dtype = cfg.block_size, rt.dtype
    q = torch.zeros(1, mc.n_heads, T, mc.head_dim, device=rt.device, dtype=dtype, requires_grad=True)
    kv = torch.zeros(1, mc.n_kv_heads, T, mc.head_dim, device=rt.device, dtype=dtype, requires_grad=True)
    masked = T > mc.sliding_window
    if not (masked and raw.attention_backend in ("flex", "flash")):  # (their sliding layers take shared heads)
        mask = sliding_window_mask(T, T, mc.sliding_window, rt.device) if masked else None
        layouts[SLIDING] = first_fused_kv_layout(q, kv, mask, sdpa_fused_kernel_runs)
    layouts[GLOBAL] = first_fused_kv_layout(q, kv, None, sdpa_fused_kernel_runs)
    return layouts


def first_fused_kv_layout(q: torch.Tensor, kv: torch.Tensor, mask, fused) -> str:
    """The first of KV_LAYOUTS for which `fused(q, k, v, mask, enable_gqa)` says a fused kernel runs; "shared"
    (what the model does untouched) when none does. With a mask, no zero-stride view: the memory-efficient
    kernel was reported to give wrong outputs for a boolean mask over stride-0 K/V heads (pytorch#191937), so
    masked layers take the copy, still small beside the [T, T] scores the math kernel would make."""
    for layout in KV_LAYOUTS if mask is None else ("shared", "repeated"):
        k = kv if layout == "shared" else kv_for_every_head(kv, q.shape[1], layout)
        if fused(q, k, k, mask, layout == "shared"):  # keys and values alike in shape and layout: one serves both
            return layout
    return "shared"


def sdpa_fused_kernel_runs(q, k, v, mask, enable_gqa: bool) -> bool:
    """Whether SDPA runs flash or memory-efficient attention on these inputs (causal without a mask), forward
    and backward: PyTorch's own checks first (torch.backends.cuda.can_use_*, which say nothing of backward's
    kernels), then one pass with the math kernel switched off. False where this PyTorch cannot say. cuDNN is
    left out: SDPA tries it before its math kernel only on some GPUs and cuDNN versions."""
    from torch.backends import cuda
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        params = cuda.SDPAParams(q, k, v, mask, 0.0, mask is None, enable_gqa)
        if not (cuda.can_use_flash_attention(params, False) or cuda.can_use_efficient_attention(params, False)):
            return False
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), torch.enable_grad():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=enable_gqa)
            out.sum().backward()
        return True
    except (TypeError, RuntimeError):  # an SDPAParams of another signature; "No available kernel"; a launch
        return False


def set_kv_layouts(raw: Gemma3, layouts: dict[str, str]) -> None:
    for layer, kind in zip(raw.layers, raw.config.layer_types):
        layer.self_attn.kv_layout = layouts[kind]


def kv_layouts(raw: Gemma3) -> dict[str, str]:
    """{layer kind: kv_layout}, as the model's layers have them."""
    return {kind: layer.self_attn.kv_layout for layer, kind in zip(raw.layers, raw.config.layer_types)}


def describe_kv_layouts(layouts: dict[str, str]) -> str:
    """For the first log line: "" when every layer shares its K/V head (the model untouched)."""
    changed = {kind: layout for kind, layout in layouts.items() if layout != "shared"}
    if not changed:
        return ""
    names = {SLIDING: "sliding", GLOBAL: "global"}
    where = " and ".join(f"{names.get(kind, kind)} layers {layout}" for kind, layout in sorted(changed.items()))
    return f"; K/V heads {where} for a fused SDPA kernel (none takes a shared K/V head there)"


# loss_head = "auto": the most logits (rows x padded vocabulary) of one micro-batch for which the plain
# F.cross_entropy on whole logits is taken, per device type; larger micro-batches, and devices not listed, take
# the chunked head, whose memory does not grow with the micro-batch. Whole float32 logits and their gradient
# cost 8 bytes a logit: 1.5 GiB for 32 x 128 tokens of GPT-2's vocabulary (padded to 50,304), 49 GiB for a
# whole 131,072-token step in one pass. From benchmarks/loss_head.py (BENCHMARKS.md, "Loss head"): on a CPU
# (eager, float32, as the trainer runs there) the chunked head was the faster at every size measured, so no
# bound; on an H100 (2026-12-05, compiled, bfloat16) the chunked head was the faster at 65,536 rows (29.6 against
# 32.0 ms, and 7.5 against 18.6 GiB), so none on CUDA either; smaller micro-batches there are unmeasured
# (benchmarks/gpu_suite.py's loss-head step measures 16,384 rows too, and reports the bound to put here).
AUTO_FULL_LOSS_LOGITS = {"cpu": 0, "cuda": 0}


def choose_loss_head(cfg: TrainConfig, rt: Runtime) -> tuple[int, int, str]:
    """(loss_chunk_size, loss_full_logits, why) for the model: "chunked" makes LOSS_CHUNK_SIZE rows of logits
    at a time, "full" one F.cross_entropy on whole logits (which torch.compile fuses with the head's product),
    "auto" the full head up to this device's AUTO_FULL_LOSS_LOGITS logits per micro-batch, chunked above."""
    if cfg.loss_head == "full":
        return 0, 0, "full, asked for"
    if cfg.loss_head == "chunked":
        return LOSS_CHUNK_SIZE, 0, "chunked, asked for"
    limit = AUTO_FULL_LOSS_LOGITS.get(rt.device.type, 0)
    if not limit:
        measured = {"cpu": "the faster one on a CPU", "cuda": "the faster one on an H100 at 65,536 rows"}.get(
            rt.device.type, f"the two not yet measured on {rt.device.type}")
        return LOSS_CHUNK_SIZE, 0, f"chunked ({measured})"
    return LOSS_CHUNK_SIZE, limit, f"full up to {limit:,} logits per micro-batch, chunked above"


def apply_activation_checkpointing(model: Gemma3) -> None:
    """Recompute each block's activations during backward instead of storing them (names stay unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        forward, same = block.forward, getattr(block.forward, SAME_FORWARD, "forward" not in vars(block))
        block.forward = lambda *args, _forward=forward, **kwargs: checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        setattr(block.forward, SAME_FORWARD, same)  # (recomputed in backward: the same function, for the plan)


def gradient_sync(model, last_micro_step: bool):
    """All-reduce gradients only on the last micro-step of an optimizer step."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if last_micro_step else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last_micro_step)
    return contextlib.nullcontext()
