"""What is applied to the model from outside for training: torch.compile (no graph breaks, no number changed), the
attention backend, DDP and FSDP2 wrapping, the float16 scaler, and the vocabulary padding on CUDA."""

import types
import warnings

import pytest
import torch
from test_model import tiny  # noqa: E402
from test_train import NEEDS_CPU_FSDP

import tinygemma.parallelize as parallelize
from tinygemma import Gemma3, UserError
from tinygemma.config import GLOBAL, SLIDING, ModelConfig, load_recipe
from tinygemma.data import PreparedData
from tinygemma.parallelize import (
    FLEX_MIN_SHARED_MEMORY,
    PROBE_MEMORY_FRACTION,
    check_attention_backend,
    choose_attention_backend,
    choose_kv_layouts,
    choose_loss_head,
    first_fused_kv_layout,
    fsdp_options,
    grad_scaler,
    init_model,
    probe_micro_batch_size,
    wrap_model,
)
from tinygemma.runtime import Runtime
from tinygemma.train import run_model_config


def build_model(model_config: ModelConfig, cfg, rt: Runtime, weights: dict | None):
    """(raw, model): the Gemma3 itself (`init_model`), and what the loop calls (`wrap_model`)."""
    raw = init_model(model_config, cfg, rt, weights)
    return raw, wrap_model(raw, cfg, rt)


@pytest.mark.parametrize("kv_layout", ["shared", "expanded"])
def test_compiled_model_agrees_without_graph_breaks(kv_layout):
    torch.manual_seed(0)
    model = Gemma3(tiny())
    for layer in model.layers:
        layer.self_attn.kv_layout = kv_layout
    x = torch.randint(0, 500, (2, 48))  # longer than the window: the sliding mask is in the graph
    eager_loss = model(x[:, :-1], x[:, 1:])
    eager_loss.backward()
    eager_grad = model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward like inductor does,
    # without its minutes of C++ code generation on a CPU.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(x[:, :-1], x[:, 1:])
    loss.backward()
    assert abs(loss.item() - eager_loss.item()) < 1e-5
    assert torch.allclose(model.layers[0].self_attn.q_proj.weight.grad, eager_grad, atol=1e-6)


def test_a_compiled_training_graph_with_the_chunked_loss_head_is_cached_for_the_next_process(monkeypatch):
    """The chunked loss head is a torch.autograd.Function, for which AOTAutograd's cache bypassed the whole
    training graph: every process (a resumed run, a torchrun restart, a notebook restarted) traced it again. The
    trainer's compile now lets the cache keep it: a second compile (dynamo's own cache emptied, as in a new
    process) takes the graph from it, and nothing bypasses it."""
    import torch._functorch.config as functorch_config
    from torch._dynamo.utils import counters

    monkeypatch.setattr(functorch_config, "autograd_cache_allow_custom_autograd_functions", False)
    torch.manual_seed(0)
    x = torch.randint(0, 500, (2, 17))
    seen = []
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        model = Gemma3(tiny(n_layers=1))
        assert model.loss_chunk_size > 0 and model.loss_full_logits == 0  # the Function's head
        parallelize.wrap_model(model, cfg_with(compile="true", block_size=16, batch_size=2), CPU)
        model(x[:, :-1], x[:, 1:]).backward()
        seen.append(dict(counters["aot_autograd"]))
    assert not any("autograd_cache_bypass" in s for s in seen), seen
    assert seen[1].get("autograd_cache_hit", 0) >= 1, seen


def cfg_with(**fields):
    return load_recipe(None, [f"train.{k}={v}" for k, v in fields.items()]).train


CPU = Runtime(torch.device("cpu"), torch.float32)
GPU = Runtime(torch.device("cuda", 0), torch.bfloat16)  # a stand-in: nothing here touches the device


def fake_gpu(monkeypatch, name: str, shared_kb: int, capability: tuple[int, int] = (9, 0)):
    props = types.SimpleNamespace(name=name, shared_memory_per_block_optin=shared_kb * 1024, major=capability[0],
                                  minor=capability[1])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def fake_gpu_memory(monkeypatch, free: int) -> types.SimpleNamespace:
    """torch.cuda's memory calls for a 1,000-byte "GPU" with `free` bytes free and nothing reserved; a pass's peak
    is what the returned namespace's `value` is set to (by a forward hook)."""
    peak = types.SimpleNamespace(value=0)
    fakes = {"empty_cache": lambda: None, "mem_get_info": lambda device=None: (free, 1000),
             "memory_reserved": lambda device=None: 0, "get_per_process_memory_fraction": lambda device=None: 1.0,
             "set_per_process_memory_fraction": lambda fraction, device=None: None,
             "reset_peak_memory_stats": lambda device=None: None, "synchronize": lambda device=None: None,
             "max_memory_allocated": lambda device=None: peak.value}
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    return peak


def test_attention_backend_choice(monkeypatch):
    model = tiny()  # window 16
    assert choose_attention_backend(cfg_with(block_size=16), model, GPU)[0] == "sdpa"  # the window never binds
    assert choose_attention_backend(cfg_with(block_size=64), model, CPU)[0] == "sdpa"  # auto on a CPU
    assert choose_attention_backend(cfg_with(block_size=64, attention_backend="sdpa"), model, GPU)[0] == "sdpa"
    with pytest.raises(UserError, match="flex needs a CUDA GPU"):
        choose_attention_backend(cfg_with(block_size=64, attention_backend="flex"), model, CPU)
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", 227)
    assert choose_attention_backend(cfg_with(block_size=64), model, GPU)[0] == "flex"
    fake_gpu(monkeypatch, "NVIDIA L4", 99)  # flex's backward at head_dim 256 finds no Triton config there
    backend, why = choose_attention_backend(cfg_with(block_size=64), model, GPU)
    assert backend == "sdpa" and "L4" in why and "99 KB" in why
    assert choose_attention_backend(cfg_with(block_size=64, attention_backend="flex"), model, GPU)[0] == "flex"


def test_flex_asked_for_at_head_dim_256_is_refused_where_its_kernels_do_not_fit(monkeypatch):
    """At the 270M's head_dim (256) flex_attention's kernels need more shared memory than an L4 or a T4 has: asked
    for there, it is refused in one line, where Triton would stop the first step with OutOfResources. Where they
    fit (an H100), where the GPU's shared memory is not known, at smaller heads, or where the block fits in the
    window (plain causal attention), it is taken as asked."""
    wide = tiny(head_dim=256, query_pre_attn_scalar=256.0)  # window 16
    flex = cfg_with(block_size=64, attention_backend="flex")
    fake_gpu(monkeypatch, "NVIDIA L4", 99)
    with pytest.raises(UserError, match=r"^train.attention_backend = flex cannot train here: NVIDIA L4 has 99 KB of "
                                        r"shared memory per block, too little .* \(head_dim 256; Triton would stop "
                                        r"the first step with OutOfResources\); use auto or sdpa$"):
        choose_attention_backend(flex, wide, GPU)
    assert choose_attention_backend(cfg_with(block_size=64), wide, GPU)[0] == "sdpa"  # auto: SDPA there
    assert choose_attention_backend(cfg_with(block_size=16, attention_backend="flex"), wide, GPU)[0] == "sdpa"
    assert choose_attention_backend(flex, tiny(), GPU) == ("flex", "asked for")  # head_dim 16
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", 227)
    assert choose_attention_backend(flex, wide, GPU) == ("flex", "asked for")
    fake_gpu(monkeypatch, "a GPU of unknown shared memory", 0)
    assert choose_attention_backend(flex, wide, GPU) == ("flex", "asked for")
    fake_gpu(monkeypatch, "Tesla P100-PCIE-16GB", 48, (6, 0))  # older than Triton: whatever the head size
    for model in (wide, tiny()):
        with pytest.raises(UserError, match=r"^train.attention_backend = flex cannot train here: Tesla P100-PCIE-16GB "
                                            r"is compute capability 6.0, and Triton \(torch.compile's GPU code, "
                                            r"flex_attention's kernels\) needs 7.0 or later; use auto or sdpa$") as refused:
            choose_attention_backend(flex, model, GPU)
        assert not getattr(refused.value, "shown_by_rank_0", False)  # (process 0 says it; the others not again)
    assert choose_attention_backend(cfg_with(block_size=64), wide, GPU)[0] == "sdpa"  # auto


def test_flash_attention_is_taken_where_asked_and_its_window_runs(monkeypatch):
    """attention_backend = flash (FlashAttention-2's own window): refused off CUDA for a block longer than the
    window, in one line naming the kernel's own refusal where its probe fails (a T4, float32), taken where the
    probe passes; `auto` never takes it (unmeasured on a GPU so far)."""
    model = tiny()  # window 16
    with pytest.raises(UserError, match=r"flash needs a CUDA GPU \(FlashAttention-2's kernels are CUDA's\)"):
        choose_attention_backend(cfg_with(block_size=64, attention_backend="flash"), model, CPU)
    assert choose_attention_backend(cfg_with(block_size=16, attention_backend="flash"), model, CPU)[0] == "sdpa"
    with pytest.raises(UserError, match="flash needs train.dtype bfloat16 or float16 .FlashAttention-2 takes no "
                                        "float32.; use auto, flex or sdpa"):  # before any data is prepared
        check_attention_backend(cfg_with(block_size=64, attention_backend="flash", dtype="float32"), model, GPU.device)
    probed = []
    monkeypatch.setattr(parallelize, "flash_window_refusal", lambda *args: probed.append(args))
    assert choose_attention_backend(cfg_with(block_size=64, attention_backend="flash"), model, GPU) == (
        "flash", "asked for")
    assert probed == [(GPU.device, torch.bfloat16, 4, 1, 16, 16)]  # the run's dtype, heads, head size, window
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", 227)
    assert choose_attention_backend(cfg_with(block_size=64), model, GPU)[0] == "flex"
    monkeypatch.setattr(parallelize, "flash_window_refusal", lambda *args: "FlashAttention only supports Ampere GPUs "
                        "or newer.")
    with pytest.raises(UserError, match=r"^train.attention_backend = flash: FlashAttention-2's window does not run "
                       r"here in bfloat16 \(FlashAttention only supports Ampere GPUs or newer.\); use auto, flex or sdpa$"):
        choose_attention_backend(cfg_with(block_size=64, attention_backend="flash"), model, GPU)


def test_the_flash_probe_passes_a_kernel_that_keeps_the_window_and_refuses_one_that_ignores_it(flash_stand_in,
                                                                                                 monkeypatch):
    """flash_window_refusal runs one forward and backward of FlashAttention's window on inputs where only the
    window tells right from wrong: the kernel as FlashAttention documents it passes (and is remembered); one that
    runs but keeps every earlier key (a ROCm build that ignores the window) is refused, and not remembered."""
    from tinygemma.parallelize import _FLASH_WINDOW_RUNS, flash_window_attention, flash_window_refusal

    cpu = torch.device("cpu")
    _FLASH_WINDOW_RUNS.clear()
    wrong = {"ignored": lambda q, k, v, w, scale: flash_window_attention(q, k, v, 10**6, scale),  # plain causal
             "a key too many": lambda q, k, v, w, scale: flash_window_attention(q, k, v, w + 1, scale),
             "a key short": lambda q, k, v, w, scale: flash_window_attention(q, k, v, w - 1, scale),
             "NaN": lambda q, k, v, w, scale: flash_window_attention(q, k, v, w, scale) * float("nan")}
    for name, kernel in wrong.items():
        monkeypatch.setattr(parallelize, "flash_window_attention", kernel)
        for dtype, kv_heads in ((torch.float32, 1), (torch.bfloat16, 2)):
            why = flash_window_refusal(cpu, dtype, 4, kv_heads, 16, 8)
            assert why and why.startswith("the kernel ran but its window is not 8 keys"), (name, dtype, why)
    assert not _FLASH_WINDOW_RUNS
    monkeypatch.setattr(parallelize, "flash_window_attention", flash_window_attention)
    assert flash_window_refusal(cpu, torch.bfloat16, 4, 2, 16, 8) is None  # (bfloat16, two K/V heads: a pass too)
    assert flash_window_refusal(cpu, torch.float32, 4, 1, 16, 8) is None
    assert flash_stand_in[-1] == (7, 0, True) and (cpu, torch.float32, 4, 1, 16, 8) in _FLASH_WINDOW_RUNS
    calls = len(flash_stand_in)
    assert flash_window_refusal(cpu, torch.float32, 4, 1, 16, 8) is None and len(flash_stand_in) == calls  # remembered
    _FLASH_WINDOW_RUNS.clear()


def test_a_flash_refusal_on_one_process_is_every_process_refusal(monkeypatch):
    """Under torchrun every process probes its own GPU; one that refuses (out of memory there, say) makes every
    process refuse, naming it, with process 0 the one to print it, rather than the others going on to wait in a
    collective for ever."""
    import dataclasses

    import torch.distributed as dist

    model = tiny()
    monkeypatch.setattr(parallelize, "flash_window_refusal", lambda *args: None)  # this process's GPU: fine
    monkeypatch.setattr(dist, "all_gather_object", lambda said, mine: said.__setitem__(slice(None), [mine, "no memory"]))
    for rank in (0, 1):
        rt = dataclasses.replace(GPU, rank=rank, world_size=2)
        with pytest.raises(UserError, match=r"window does not run here in bfloat16 \(process 1: no memory\)") as e:
            choose_attention_backend(cfg_with(block_size=64, attention_backend="flash"), model, rt)
        assert getattr(e.value, "shown_by_rank_0", False) == (rank == 1)
    monkeypatch.setattr(dist, "all_gather_object", lambda said, mine: said.__setitem__(slice(None), [mine, None]))
    assert choose_attention_backend(cfg_with(block_size=64, attention_backend="flash"), model,
                                    dataclasses.replace(GPU, world_size=2))[0] == "flash"


def test_processes_whose_machines_chose_otherwise_under_auto_are_refused_alike(monkeypatch):
    """Under torchrun each process resolves auto from its own machine: a node without bf16 beside one with it ran
    another Muon iteration (or float16 with a scaler) and its copy of the model drifted from process 0's unseen.
    Every process refuses alike, naming the setting and the process, and process 0 prints it; agreeing is fine."""
    import dataclasses

    import torch.distributed as dist

    from tinygemma.parallelize import check_choices_agree

    mine = {"train.dtype": "bfloat16", "train.muon_backend": "bfloat16"}
    other = {"train.dtype": "float16", "train.muon_backend": "float16"}
    monkeypatch.setattr(dist, "all_gather_object", lambda said, me: said.__setitem__(slice(None), [mine, mine, other]))
    for rank in (0, 2):
        with pytest.raises(UserError) as e:
            check_choices_agree(mine, dataclasses.replace(GPU, rank=rank, world_size=3))
        assert str(e.value) == (
            "the processes' machines chose differently under auto (train.dtype: bfloat16 on process 0, float16 on "
            "process 2; train.muon_backend: bfloat16 on process 0, float16 on process 2): their steps would part "
            "unseen (another precision or Muon iteration on some); set train.dtype and train.muon_backend in the "
            "recipe to what every machine runs (float32 runs everywhere), or train on like machines")
        assert getattr(e.value, "shown_by_rank_0", False) == (rank == 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda said, me: said.__setitem__(slice(None), [mine] * 3))
    assert check_choices_agree(mine, dataclasses.replace(GPU, world_size=3)) is None


def test_the_flash_probe_gives_the_kernels_refusal_in_one_line():
    """Where the kernel refuses (here a CPU, which has none), the probe gives the first line of its message."""
    from tinygemma.parallelize import _FLASH_WINDOW_RUNS, flash_window_refusal

    _FLASH_WINDOW_RUNS.clear()
    why = flash_window_refusal(torch.device("cpu"), torch.float32, 4, 1, 16, 8)
    assert why and "\n" not in why and "_flash_attention_forward" in why, why
    assert not _FLASH_WINDOW_RUNS


def test_attention_backend_choice_where_torch_does_not_report_shared_memory(monkeypatch):
    """PyTorch 2.6's device properties lack shared_memory_per_block_optin: an H100 was then said to have 0 KB and
    never got flex. The compute capability's figure stands in for it."""
    model = tiny()
    for name, (major, minor), backend in [("NVIDIA H100 80GB HBM3", (9, 0), "flex"), ("NVIDIA A100-SXM4-40GB", (8, 0), "flex"),
                                          ("NVIDIA L4", (8, 9), "sdpa"), ("Tesla T4", (7, 5), "sdpa")]:
        props = types.SimpleNamespace(name=name, major=major, minor=minor)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, props=props: props)
        chosen, why = choose_attention_backend(cfg_with(block_size=64), model, GPU)
        assert chosen == backend and ("0 KB" not in why), (name, why)
    props = types.SimpleNamespace(name="a future GPU", major=13, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    chosen, why = choose_attention_backend(cfg_with(block_size=64), model, GPU)
    assert chosen == "sdpa" and "does not tell a future GPU's shared memory" in why


def test_kv_layout_is_the_first_that_a_fused_sdpa_kernel_takes(monkeypatch):
    """Shared K/V heads where a fused kernel takes them; else expanded (a view), else repeated (a copy); shared
    where none does. Judged per layer kind at the training shape, dtype and mask; left alone on a CPU."""
    import tinygemma.parallelize as parallelize
    from tinygemma.parallelize import choose_kv_layouts, first_fused_kv_layout

    q, kv = torch.empty(1, 4, 8, 16), torch.empty(1, 1, 8, 16)

    def equal_heads(q, k, v, mask, enable_gqa):  # the memory-efficient kernel of PyTorch <= 2.11: no shared heads
        return k.shape[1] == q.shape[1]

    def equal_heads_in_memory(q, k, v, mask, enable_gqa):  # a kernel that took no zero-stride view
        return equal_heads(q, k, v, mask, enable_gqa) and k.stride(1) != 0

    assert first_fused_kv_layout(q, kv, None, lambda *args: True) == "shared"
    assert first_fused_kv_layout(q, kv, None, equal_heads) == "expanded"
    assert first_fused_kv_layout(q, kv, None, equal_heads_in_memory) == "repeated"
    assert first_fused_kv_layout(q, kv, None, lambda *args: False) == "shared"
    mask = torch.ones(8, 8, dtype=torch.bool)  # masked: never the zero-stride view (pytorch#191937), the copy
    assert first_fused_kv_layout(q, kv, mask, equal_heads) == "repeated"
    # On this CPU PyTorch's own checks answer (no fused CUDA kernel here), whatever SDPAParams' signature.
    assert parallelize.sdpa_fused_kernel_runs(q, kv, kv, None, True) is False

    raw = Gemma3(tiny())  # window 16
    assert choose_kv_layouts(raw, cfg_with(block_size=64), CPU) == {SLIDING: "shared", GLOBAL: "shared"}
    build_model(tiny(), cfg_with(block_size=64, compile="false"), CPU, None)  # nothing asked of the CPU

    # A stand-in GPU (on CPU tensors), whose flash kernel takes shared heads but no mask, and whose
    # memory-efficient kernel takes masks but not shared heads, asked in fp16 and with gradients.
    asked = []

    def t4_like(q, k, v, mask, enable_gqa):
        asked.append((mask is not None, enable_gqa, q.dtype, q.requires_grad))
        return (mask is None and enable_gqa) or k.shape[1] == q.shape[1]

    monkeypatch.setattr(parallelize, "sdpa_fused_kernel_runs", t4_like)
    gpu = types.SimpleNamespace(is_cuda=True, device=torch.device("cpu"), dtype=torch.float16)
    raw.attention_backend = "sdpa"
    assert choose_kv_layouts(raw, cfg_with(block_size=64), gpu) == {SLIDING: "repeated", GLOBAL: "shared"}
    assert asked[0] == (True, True, torch.float16, True) and all(dtype == torch.float16 for *_, dtype, _ in asked)
    assert choose_kv_layouts(raw, cfg_with(block_size=16), gpu) == {SLIDING: "shared", GLOBAL: "shared"}
    for backend in ("flex", "flash"):  # their sliding layers: no SDPA, nothing to choose
        raw.attention_backend = backend
        asked.clear()
        assert choose_kv_layouts(raw, cfg_with(block_size=64), gpu) == {SLIDING: "shared", GLOBAL: "shared"}
        assert asked == [(False, True, torch.float16, True)]  # the global layers' question only
    assert choose_kv_layouts(Gemma3(tiny(n_kv_heads=4)), cfg_with(block_size=64), gpu) == {
        SLIDING: "shared", GLOBAL: "shared"}  # no K/V heads to share: plain multi-head attention

    # build_model hands the choice to every layer of its kind, and the first log line says what changed.
    from tinygemma.parallelize import describe_kv_layouts, kv_layouts, set_kv_layouts

    set_kv_layouts(raw, {SLIDING: "expanded", GLOBAL: "shared"})
    kinds = {layer.self_attn.kv_layout for layer, kind in zip(raw.layers, raw.config.layer_types) if kind == SLIDING}
    assert kinds == {"expanded"} and kv_layouts(raw) == {SLIDING: "expanded", GLOBAL: "shared"}
    assert "sliding layers expanded" in describe_kv_layouts(kv_layouts(raw))
    assert describe_kv_layouts({SLIDING: "shared", GLOBAL: "shared"}) == ""


def test_loss_head_choice_is_applied_to_the_model(monkeypatch):
    """chunked and full as asked on any device; auto takes the device's measured bound of logits per micro-batch
    (none measured: chunked), and build_model hands the choice to the model."""
    import tinygemma.parallelize as parallelize

    assert choose_loss_head(cfg_with(loss_head="full"), CPU)[:2] == (0, 0)
    assert choose_loss_head(cfg_with(loss_head="chunked"), GPU)[:2] == (8192, 0)
    # the first log line says why: the measurement that chose it on each device
    assert choose_loss_head(cfg_with(), GPU)[2] == "chunked (the faster one on an H100 at 65,536 rows)"
    assert choose_loss_head(cfg_with(), CPU)[2] == "chunked (the faster one on a CPU)"
    monkeypatch.setattr(parallelize, "AUTO_FULL_LOSS_LOGITS", {"cuda": 2**28})
    assert choose_loss_head(cfg_with(), CPU)[:2] == (8192, 0)  # a device with no measured bound
    chunk, bound, why = choose_loss_head(cfg_with(), GPU)
    assert (chunk, bound) == (8192, 2**28) and "268,435,456 logits" in why
    assert choose_loss_head(cfg_with(loss_head="chunked"), GPU)[:2] == (8192, 0)  # asked for: no bound
    raw, _ = build_model(tiny(), cfg_with(loss_head="full", compile="false"), CPU, None)
    assert (raw.loss_chunk_size, raw.loss_full_logits) == (0, 0)
    monkeypatch.setattr(parallelize, "AUTO_FULL_LOSS_LOGITS", {"cpu": 1000})
    raw, _ = build_model(tiny(), cfg_with(compile="false"), CPU, None)
    assert (raw.loss_chunk_size, raw.loss_full_logits) == (8192, 1000)


def test_fsdp_gathers_in_the_autocast_dtype_and_reduces_in_float32():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    assert fsdp_options(torch.float32) == {}
    for dtype in (torch.bfloat16, torch.float16):
        assert fsdp_options(dtype) == {"mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)}


def test_float16_under_fsdp_uses_the_sharded_scaler():
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    fp16 = Runtime(torch.device("cpu"), torch.float16)
    assert isinstance(grad_scaler(fp16, fsdp=True), ShardedGradScaler)
    plain = grad_scaler(fp16, fsdp=False)
    assert not isinstance(plain, ShardedGradScaler) and plain.is_enabled()
    assert not grad_scaler(Runtime(torch.device("cpu"), torch.bfloat16), fsdp=True).is_enabled()


def test_ddp_is_compiled_around_the_wrapper(tmp_path):
    """DDP first, then torch.compile of the wrapper (its graph optimizer splits the graph at the gradient buckets
    so the all-reduces overlap backward); the model inside stays uncompiled, with its own parameter names."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        config = tiny()
        rt = Runtime(torch.device("cpu"), torch.float32, world_size=2)  # build_model wraps; the group has one
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # torch 2.13 deprecated broadcast_buffers: no warning
            raw, model = build_model(config, cfg_with(compile="true", block_size=32), rt, None)
        assert isinstance(model, DistributedDataParallel) and model.module is raw
        assert model._compiled_call_impl is not None and raw._compiled_call_impl is None
        # Its buffers (constants, the RoPE tables among them) are not broadcast from process 0 before each forward.
        assert not model.broadcast_buffers and raw.rope_table_sliding_attention.shape[1] == 32
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [1, 2])
def test_regional_compiling_compiles_each_layer_and_nothing_around_them(tmp_path, world_size):
    """compile = regional: every decoder layer compiled in place, the model itself (and, under torchrun, DDP's
    wrapper) not; the loss is the eager model's."""
    import torch.distributed as dist

    if world_size > 1:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        rt = Runtime(torch.device("cpu"), torch.float32, world_size=world_size)
        raw, model = build_model(tiny(), cfg_with(compile="regional", block_size=32), rt, None)
        assert all(block._compiled_call_impl is not None for block in raw.layers)
        assert raw._compiled_call_impl is None and getattr(model, "_compiled_call_impl", None) is None
        assert (model is raw) == (world_size == 1)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def test_flex_attention_is_compiled_once_and_never_inside_a_traced_graph():
    """compiled_flex_attention makes its function once; a compiled model traces flex_attention as it is and
    builds nothing (a function made inside a trace would be written back uncompiled), with SDPA's numbers."""
    import tinygemma.model as model_module

    first = model_module.compiled_flex_attention()
    assert model_module.compiled_flex_attention() is first
    model_module._compiled_flex_attention = None
    try:
        torch.manual_seed(0)
        model = Gemma3(tiny()).eval()
        x = torch.randint(0, 500, (1, 48))  # three windows of 16
        reference = model(x)
        model.attention_backend = "flex"
        model.sliding_block_mask(48, x.device)
        with torch.no_grad():
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        assert model_module._compiled_flex_attention is None  # nothing made while tracing
        torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-4)
    finally:
        model_module._compiled_flex_attention = first


def test_each_trained_model_gets_a_flex_kernel_with_graphs_of_its_own(monkeypatch):
    """Eager flex attention on a GPU (the auto micro-batch probe; compile=false) went through one compiled function
    for the whole process, whose 8 graphs (one per shape) a notebook's runs used up, each probing a few sizes;
    past them it ran the unfused reference, quadratic in memory, and the probe chose far smaller micro-batches.
    init_model gives each model a copy of its own (its own code object, where dynamo keeps the graphs), and
    eager attention on a GPU takes its model's copy."""
    import tinygemma.model as model_module
    import tinygemma.parallelize as parallelize_module

    monkeypatch.setattr(parallelize_module, "choose_attention_backend", lambda cfg, config, rt: ("flex", "asked"))
    cfg = load_recipe(None, ["block_size=48"]).train
    models = [parallelize_module.init_model(tiny(), cfg, CPU, None) for _ in range(2)]
    kernels = [{id(layer.self_attn.flex_kernel) for layer in model.layers} for model in models]
    assert all(len(k) == 1 for k in kernels) and kernels[0] != kernels[1]  # one per model, shared by its layers
    codes = [model.layers[0].self_attn.flex_kernel._torchdynamo_orig_callable.__code__ for model in models]
    # (equal code objects, but dynamo keeps its graphs on each object itself)
    assert codes[0] is not codes[1] and all(code is not model_module.flex_attention.__code__ for code in codes)

    calls = []
    owner = types.SimpleNamespace(flex_kernel=lambda *args, **kwargs: calls.append("own") or "own result")
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))  # a stand-in: only its device is read
    assert model_module._flex_attention(on_gpu, None, None, None, 1.0, True, owner) == "own result"
    monkeypatch.setattr(model_module, "compiled_flex_attention", lambda: lambda *args, **kwargs: "shared result")
    assert model_module._flex_attention(on_gpu, None, None, None, 1.0, True) == "shared result"  # a bare model's
    assert calls == ["own"]


def test_vocabulary_is_padded_to_128_on_cuda_unless_the_recipe_says(monkeypatch, tmp_path):
    import tinygemma.train as train_module

    recipe = load_recipe(None, ["model.preset=gemma3-tiny"])
    gpt2 = PreparedData(tmp_path, {"vocab_size": 50_257, "tokenizer": {"kind": "gpt2"}})
    monkeypatch.setattr(train_module, "pick_device", lambda name: torch.device("cpu"))
    assert run_model_config(recipe, gpt2, tmp_path, None).vocab_pad_multiple == 1
    monkeypatch.setattr(train_module, "pick_device", lambda name: torch.device("cuda", 0))
    assert run_model_config(recipe, gpt2, tmp_path, None).padded_vocab_size == 50_304
    explicit = load_recipe(None, ["model.preset=gemma3-tiny", "model.vocab_pad_multiple=1"])
    assert run_model_config(explicit, gpt2, tmp_path, None).vocab_pad_multiple == 1


def test_the_micro_batch_probe_takes_the_largest_size_under_its_memory_bound(monkeypatch):
    """micro_batch_size = auto's probe, on a CPU with CUDA's memory calls faked (tests/test_cuda.py runs the real
    one): sizes are tried largest first, an out-of-memory error or a peak over PROBE_MEMORY_FRACTION of the GPU's
    memory rejects a size, the first that fits is taken, and nothing is left behind: no gradients, no random
    numbers drawn, the peak counter reset for training. While it probes, the allocator is capped at that fraction
    (a size too large fails in the allocator, with the rest of the GPU free); the process's own cap comes back
    after, also when nothing fits. With no size that fits, one line says what to do."""
    total, per_sequence = 1000, 7  # a pass of n sequences peaks at 7 n bytes of a 1,000-byte "GPU"
    memory = types.SimpleNamespace(peak=0, resets=0, tried=[], fraction=1.0, caps=[], others=0, reserved=30)

    def set_fraction(fraction, device=None):  # (torch refuses a fraction outside 0 to 1)
        assert isinstance(fraction, float) and 0 <= fraction <= 1, fraction
        memory.fraction = fraction

    def synchronize(device=None):  # where a real GPU would raise an out-of-memory error asynchronously
        if memory.tried[-1] > 128:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (faked)")

    def reset_peak_memory_stats(device=None):
        memory.peak, memory.resets = 0, memory.resets + 1

    fakes = {"get_device_properties": lambda device: types.SimpleNamespace(total_memory=total),
             "synchronize": synchronize, "reset_peak_memory_stats": reset_peak_memory_stats,
             "max_memory_allocated": lambda device=None: memory.peak, "empty_cache": lambda: None,
             "get_per_process_memory_fraction": lambda device=None: memory.fraction,
             "mem_get_info": lambda device=None: (total - memory.others - memory.reserved, total),
             "memory_reserved": lambda device=None: memory.reserved,
             "set_per_process_memory_fraction": set_fraction}
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    model = Gemma3(tiny())

    def forward_hook(module, args, output):
        memory.tried.append(args[0].shape[0])
        memory.caps.append(memory.fraction)
        memory.peak = per_sequence * args[0].shape[0]

    model.register_forward_hook(forward_hook)
    cfg = cfg_with(block_size=8)
    rng = torch.get_rng_state()
    assert probe_micro_batch_size(model, cfg, CPU, [256, 128, 64, 32, 16]) == 64
    assert memory.tried == [256, 128, 64]  # 256: out of memory; 128: 896 bytes fit, but > 850; 64: 448 bytes
    assert PROBE_MEMORY_FRACTION * total == 850 and memory.peak == 0 and memory.resets == 4
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), rng)
    assert memory.caps == [PROBE_MEMORY_FRACTION] * 3 and memory.fraction == 1.0  # capped while probing, then not
    memory.tried.clear()
    memory.caps.clear()
    memory.fraction = 0.5  # the process's own, lower cap: the bound is 85% of it, and it is there after a refusal
    with pytest.raises(UserError, match=r"not even 128 sequence\(s\) of block_size 8 fit") as error:
        probe_micro_batch_size(model, cfg, CPU, [512, 256, 128])
    assert memory.tried == [512, 256, 128] and "activation_checkpointing=true" in str(error.value)
    assert memory.caps == [0.425] * 3 and memory.fraction == 0.5
    memory.tried.clear()
    assert probe_micro_batch_size(model, cfg, CPU, [64, 32]) == 32  # 448 bytes: past 85% of the process's 500
    assert memory.fraction == 0.5
    # A GPU so full that under the cap not even the token ids fit: the same refusal, not an out-of-memory crash.
    real_zeros = torch.zeros

    def zeros(*args, **kwargs):
        if kwargs.get("dtype") is torch.long and "device" in kwargs:  # the probe's token ids
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (faked)")
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros)
    memory.tried.clear()
    with pytest.raises(UserError, match=r"not even 64 sequence\(s\)"):
        probe_micro_batch_size(model, cfg, CPU, [128, 64])
    assert memory.tried == [] and memory.fraction == 0.5
    # Other processes hold 450 bytes (a notebook's kernel after training): the bound is 850 - 450, so 64 sequences
    # (448 bytes), which fit an idle GPU, are too many; and where nothing fits, the line says who holds the memory.
    monkeypatch.setattr(torch, "zeros", real_zeros)
    memory.tried.clear()
    memory.fraction, memory.others = 1.0, 450
    memory.others, memory.reserved, memory.tried = 0, 500, []  # this process's own reserve is its own to use
    assert probe_micro_batch_size(model, cfg, CPU, [64, 32]) == 64 and memory.tried == [64]
    memory.others, memory.reserved, memory.tried = 450, 30, []
    memory.caps.clear()
    assert probe_micro_batch_size(model, cfg, CPU, [64, 32, 16]) == 32 and memory.tried == [64, 32]
    assert memory.caps == [0.4, 0.4]  # the allocator capped at the bound: a size too large fails in it
    memory.others, memory.tried = 900, []  # others hold more than the bound: nothing fits, said in one line
    with pytest.raises(UserError, match="held by other processes"):
        probe_micro_batch_size(model, cfg, CPU, [64, 32])
    assert memory.caps[-1] == 0.0 and memory.fraction == 1.0
    with pytest.raises(UserError, match=r"\(0\.0 of its 0\.0 GiB are held by other processes: end them"):
        probe_micro_batch_size(model, cfg, CPU, [128, 64])


@pytest.mark.parametrize("setting, cuda, cpu", [("auto", True, False), ("true", True, True), ("regional", True, True),
                                               ("false", False, False)])
def test_compile_auto_compiles_on_cuda_alone(setting, cuda, cpu, monkeypatch):
    """The default (auto) trains compiled on a GPU and eagerly elsewhere; true and false everywhere. (The GPU
    suite's runs set compile themselves: a default that stopped compiling on CUDA would pass them.)"""
    from tinygemma.parallelize import compiles

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cfg = load_recipe(None, [f"compile={setting}"]).train
    assert compiles(cfg, Runtime(torch.device("cuda", 0), torch.bfloat16)) is cuda
    assert compiles(cfg, Runtime(torch.device("cpu"), torch.float32)) is cpu
    assert load_recipe(None, []).train.compile == "auto"


def test_gradient_sync_reduces_on_the_last_micro_step_alone():
    """DDP: no_sync() on every pass but the last (whose backward all-reduces); FSDP2: the reduction switched off
    for those passes and on again for the last, every step. Kills: an all-reduce on every micro-step (numbers alike,
    one all-reduce of all gradients per pass instead of one per step), a switch-off never undone, inversions."""
    import contextlib

    from tinygemma.parallelize import gradient_sync

    class FakeDDP:
        def __init__(self):
            self.entered = 0

        @contextlib.contextmanager
        def no_sync(self):
            self.entered += 1
            yield

    ddp = FakeDDP()
    for _step in range(2):
        for micro in range(3):
            with gradient_sync(ddp, micro == 2):
                pass
    assert ddp.entered == 4  # passes 0 and 1 of each of the 2 steps

    class FakeFSDP:
        def __init__(self):
            self.calls = []

        def set_requires_gradient_sync(self, flag):
            self.calls.append(flag)

    fsdp = FakeFSDP()
    for _step in range(2):
        for micro in range(3):
            with gradient_sync(fsdp, micro == 2):
                assert fsdp.calls[-1] == (micro == 2)  # as the backward of this pass runs
    assert fsdp.calls == [False, False, True] * 2


def test_under_torchrun_every_process_takes_the_smallest_probed_micro_batch(monkeypatch):
    """micro_batch_size = auto under torchrun: this process fits 64 but another only 32 (it has less free memory):
    both take 32, the MIN of the choices (MAX would let the other process run out of memory at its first step).
    CUDA's memory calls and the all-reduce are faked."""
    import torch.distributed as dist

    peak = fake_gpu_memory(monkeypatch, free=1000)
    other = torch.tensor(32)  # the other process's choice

    def all_reduce(tensor, op):
        tensor.copy_(torch.minimum(tensor, other) if op == dist.ReduceOp.MIN else torch.maximum(tensor, other))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    model = Gemma3(ModelConfig.preset("gemma3-tiny", vocab_size=64, n_layers=1))
    model.register_forward_hook(lambda module, args, output: setattr(peak, "value", 7 * args[0].shape[0]))
    cfg = load_recipe(None, ["block_size=8"]).train
    rt = Runtime(torch.device("cpu"), torch.float32, world_size=2)
    assert probe_micro_batch_size(model, cfg, rt, [64, 32]) == 32  # 64 fits here (448 <= 850), not there


def test_flex_asked_for_a_block_within_the_window_is_not_refused_off_cuda():
    """attention_backend = flex with a block no longer than the sliding window: every layer is plainly causal, so a
    CPU trains it with SDPA (the docstring's "whatever is asked"); only a longer block is refused off CUDA. Kills
    the block_size > sliding_window condition dropped from check_attention_backend."""
    mc = ModelConfig.preset("gemma3-tiny", vocab_size=64, n_layers=1)
    short = load_recipe(None, ["attention_backend=flex", f"block_size={mc.sliding_window}"]).train
    check_attention_backend(short, mc, torch.device("cpu"))  # no refusal
    long = load_recipe(None, ["attention_backend=flex", f"block_size={mc.sliding_window + 1}"]).train
    with pytest.raises(UserError, match="flex needs a CUDA GPU"):
        check_attention_backend(long, mc, torch.device("cpu"))


def test_a_gpu_30_percent_held_by_others_says_so_when_nothing_fits(monkeypatch):
    """Other processes hold 30% of the GPU (a notebook's earlier model) and nothing fits: the refusal says who
    holds the memory (any share over a tenth, not only a majority)."""
    peak = fake_gpu_memory(monkeypatch, free=700)  # 300 of 1,000 held by others
    model = Gemma3(tiny())
    model.register_forward_hook(lambda module, args, output: setattr(peak, "value", 20 * args[0].shape[0]))
    cfg = load_recipe(None, ["block_size=8"]).train
    with pytest.raises(UserError, match=r"held by other processes"):  # bound 850 - 300 = 550 < 640
        probe_micro_batch_size(model, cfg, CPU, [64, 32])


@NEEDS_CPU_FSDP
def test_a_gpu_older_than_triton_trains_uncompiled_under_auto_and_refuses_what_asks_torch_compile(monkeypatch):
    """Triton (inductor's GPU code) compiles for compute capability 7.0 and later: on a P100 (6.0, Kaggle's) `compile
    = auto` trains eagerly, saying why in the first log line, and what asks torch.compile (compile = true or
    regional, Muon's compiled backend) is refused in one line before the model is built, where inductor would
    stop the first step with GPUTooOldForTriton. A T4 (7.5) compiles."""
    from tinygemma.parallelize import check_compile, compiles

    capability = [6, 0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: tuple(capability))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    P100 = Runtime(torch.device("cuda", 0), torch.float16)
    auto = cfg_with(compile="auto")
    assert not compiles(auto, P100) and compiles(cfg_with(compile="true"), P100)
    assert check_compile(auto, P100) == ("Tesla P100-PCIE-16GB is compute capability 6.0, and Triton (torch.compile's "
                                         "GPU code, flex_attention's kernels) needs 7.0 or later")
    assert check_compile(cfg_with(compile="false", optimizer="muon", muon_backend="float32"), P100) is not None
    assert check_compile(cfg_with(optimizer="adamw", muon_backend="compiled"), P100) is not None  # (not Muon)
    for setting in ("true", "regional"):
        with pytest.raises(UserError, match=rf"^train.compile = {setting} cannot run on this GPU: Tesla P100-PCIE-16GB "
                                            r"is compute capability 6\.0, .*; use train.compile = auto or false$"):
            check_compile(cfg_with(compile=setting), P100)
    with pytest.raises(UserError, match=r"^train.muon_backend = compiled cannot run on this GPU: .*; use another "
                                        r"train.muon_backend \(auto, float32 or torch\)$"):
        check_compile(cfg_with(optimizer="muon", muon_backend="compiled"), P100)
    with pytest.raises(UserError, match=r"^train.compile = true and train.muon_backend = compiled cannot run .*; use "
                                        r"train.compile = auto or false and another train.muon_backend"):
        check_compile(cfg_with(compile="true", optimizer="muon", muon_backend="compiled"), P100)
    for rank in (0, 1):  # under torchrun every process refuses alike: said once, by process 0
        with pytest.raises(UserError) as refused:
            check_compile(cfg_with(compile="true"), Runtime(torch.device("cuda", 0), torch.float16, rank=rank))
        assert getattr(refused.value, "shown_by_rank_0", False) is (rank == 1)
    capability[:] = [7, 5]  # a T4
    assert compiles(auto, P100) and check_compile(cfg_with(compile="true", optimizer="muon", muon_backend="compiled"),
                                                  P100) is None
    assert check_compile(auto, CPU) is None and not compiles(auto, CPU)


def test_fsdp_compiles_each_block_inside_its_shard(tmp_path):
    """compile = true (or auto on CUDA) with distributed = fsdp compiles each block inside its shard, not
    silently none; the root is sharded and left uncompiled."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from tinygemma.parallelize import apply_fsdp

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        raw = Gemma3(tiny())
        apply_fsdp(raw, Runtime(torch.device("cpu"), torch.float32, world_size=1), True)
        assert all(isinstance(b, FSDPModule) and b._compiled_call_impl is not None for b in raw.layers)
        assert isinstance(raw, FSDPModule) and raw._compiled_call_impl is None
    finally:
        dist.destroy_process_group()


def test_fsdp_on_a_cpu_that_torch_cannot_shard_on_is_refused_in_one_line(monkeypatch):
    """torch 2.6's FSDP2 stops a CPU run at its first forward (its CPU streams record no events): training
    refuses distributed = fsdp there in one line before any collective, naming the way out; on CUDA it shards."""
    from tinygemma.parallelize import apply_fsdp, fsdp_runs_on

    monkeypatch.setattr(torch.cpu, "Stream", type("Stream", (), {}))  # torch 2.6's: no record_event
    assert not fsdp_runs_on(torch.device("cpu")) and fsdp_runs_on(torch.device("cuda", 0))
    with pytest.raises(UserError, match=r"^distributed = fsdp on a CPU needs torch 2\.7 or later .*distributed = ddp"
                       ) as refused:
        apply_fsdp(Gemma3(tiny()), Runtime(torch.device("cpu"), torch.float32, world_size=2), False)
    assert "\n" not in str(refused.value)


def test_distributed_fsdp_under_torchrun_shards_the_model_in_place_whatever_it_compiles(monkeypatch):
    """distributed = fsdp on several processes shards the model itself (apply_fsdp, which compiles a block at a
    time), never a DDP wrapper: that gives the same losses, but every process would hold the whole model, its
    gradients and the optimizer's state, which is what fsdp is chosen to avoid."""
    sharded = []
    monkeypatch.setattr(parallelize, "apply_fsdp",
                        lambda raw, rt, compile_, key: sharded.append((raw, rt.world_size, compile_)))
    raw, rt = Gemma3(tiny()), Runtime(torch.device("cpu"), torch.float32, world_size=2)
    for setting, compiled in (("false", False), ("true", True), ("regional", True)):
        assert parallelize.wrap_model(raw, cfg_with(compile=setting, distributed="fsdp"), rt) is raw
        assert sharded == [(raw, 2, compiled)]
        sharded.clear()


def test_a_tied_model_takes_the_embedding_of_its_weights():
    source = Gemma3(tiny())
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    weights["lm_head.weight"] = torch.zeros_like(weights["embed_tokens.weight"])  # a stale head saved beside it
    raw, _ = build_model(tiny(), cfg_with(compile="false", seed=123), CPU, weights)
    assert torch.equal(raw.embed_tokens.weight, source.embed_tokens.weight)
    assert raw.lm_head.weight is raw.embed_tokens.weight
    del weights["lm_head.weight"]  # the head left out: loads, tied
    raw, _ = build_model(tiny(), cfg_with(compile="false", seed=123), CPU, weights)
    assert torch.equal(raw.lm_head.weight, source.embed_tokens.weight)


def test_weights_that_do_not_match_the_model_are_refused():
    weights = dict(Gemma3(tiny()).state_dict())
    del weights["layers.0.self_attn.q_proj.weight"]
    with pytest.raises(RuntimeError, match="q_proj"):
        build_model(tiny(), cfg_with(compile="false"), CPU, weights)
    weights = dict(Gemma3(tiny()).state_dict(), stray=torch.zeros(1))
    with pytest.raises(RuntimeError, match="stray"):
        build_model(tiny(), cfg_with(compile="false"), CPU, weights)


def test_activation_checkpointing_wraps_every_block(monkeypatch):
    import torch.utils.checkpoint as checkpoint_module

    calls = []
    real = checkpoint_module.checkpoint
    monkeypatch.setattr(checkpoint_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    raw, model = build_model(tiny(), cfg_with(compile="false", activation_checkpointing="true", block_size=32), CPU, None)
    x = torch.randint(0, 500, (1, 33))
    model(x[:, :-1], x[:, 1:]).backward()
    assert len(calls) == len(raw.layers)
    calls.clear()
    raw, model = build_model(tiny(), cfg_with(compile="false", block_size=32), CPU, None)
    model(x[:, :-1], x[:, 1:])
    assert calls == []


def test_compile_true_on_one_process_compiles_the_model_in_place():
    raw, model = build_model(tiny(), cfg_with(compile="true", block_size=32), CPU, None)
    assert model is raw and raw._compiled_call_impl is not None
    raw, model = build_model(tiny(), cfg_with(compile="false", block_size=32), CPU, None)
    assert raw._compiled_call_impl is None


def test_a_peak_exactly_at_the_bound_fits(monkeypatch):
    peak = fake_gpu_memory(monkeypatch, free=1000)
    model = Gemma3(tiny())
    model.register_forward_hook(lambda module, args, output: setattr(peak, "value", 850 if args[0].shape[0] == 2 else 900))
    assert probe_micro_batch_size(model, cfg_with(block_size=8), CPU, [4, 2, 1]) == 2  # 850 = 0.85 x 1000


def test_flex_at_exactly_the_shared_memory_it_needs(monkeypatch):
    fake_gpu(monkeypatch, "edge GPU", FLEX_MIN_SHARED_MEMORY // 1024)
    assert choose_attention_backend(cfg_with(block_size=64), tiny(), GPU)[0] == "flex"


def test_multi_head_attention_asks_no_fused_kernel(monkeypatch):
    asked = []
    monkeypatch.setattr(parallelize, "sdpa_fused_kernel_runs", lambda *args: asked.append(args) or True)
    gpu = types.SimpleNamespace(is_cuda=True, device=torch.device("cpu"), dtype=torch.float16)
    raw = Gemma3(tiny(n_kv_heads=4))
    raw.attention_backend = "sdpa"
    assert choose_kv_layouts(raw, cfg_with(block_size=64), gpu) == {SLIDING: "shared", GLOBAL: "shared"}
    assert asked == []


def test_only_shared_heads_are_probed_with_enable_gqa():
    q, kv = torch.empty(1, 4, 8, 16), torch.empty(1, 1, 8, 16)

    def no_gqa_kernel(q, k, v, mask, enable_gqa):  # equal heads only, and refuses enable_gqa
        return k.shape[1] == q.shape[1] and not enable_gqa

    assert first_fused_kv_layout(q, kv, None, no_gqa_kernel) == "expanded"
    assert first_fused_kv_layout(q, kv, torch.ones(8, 8, dtype=torch.bool), no_gqa_kernel) == "repeated"


def test_ddp_on_a_gpu_is_given_the_process_device(monkeypatch):
    import torch.nn.parallel

    made = []

    class FakeDDP:
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            made.append((device_ids, broadcast_buffers))

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    raw = Gemma3(tiny())
    parallelize.wrap_model(raw, cfg_with(compile="false"), Runtime(torch.device("cuda", 1), torch.bfloat16, world_size=2))
    parallelize.wrap_model(raw, cfg_with(compile="false"), Runtime(torch.device("cpu"), torch.float32, world_size=2))
    assert made == [([1], False), (None, False)]


def test_compiled_layers_keep_activation_checkpointing(monkeypatch):
    """compile = regional puts each block's forward on a code object of its own (compile_in_place): under
    activation checkpointing that forward is the checkpointing wrapper set on the block, so the compiled
    graphs still checkpoint (a control without it: none does)."""
    import torch.nn as nn

    from tinygemma.model import Block

    ops = set()

    def backend(gm, example_inputs):
        ops.update(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    monkeypatch.setattr(Block, "compile", lambda self, **kw: nn.Module.compile(self, **kw, backend=backend))
    x = torch.randint(0, 500, (1, 33))
    for checkpointing in ("true", "false"):
        ops.clear()
        raw, model = build_model(tiny(), cfg_with(compile="regional", activation_checkpointing=checkpointing,
                                                  block_size=32), CPU, None)
        model(x[:, :-1], x[:, 1:]).backward()
        assert any("checkpoint" in op for op in ops) == (checkpointing == "true"), sorted(ops)


def test_compiled_runs_share_a_forward_code_object_when_their_graphs_would_be_alike():
    """compile_in_place's key: the runs of one process whose passes differ in size (the trainer's micro-batch,
    after its probe, not the recipe's `auto`) or in block size each get a forward code object of their own; runs
    alike, and the chunks of one run, share one (so they share dynamo's graphs)."""
    def forward_code(micro_batch_size, **fields):
        raw = Gemma3(tiny())
        parallelize.wrap_model(raw, cfg_with(compile="true", **fields), CPU, micro_batch_size)
        assert raw._compiled_call_impl is not None and raw.forward.__self__ is raw
        return raw.forward.__func__.__code__

    first = forward_code(2, block_size=32)
    assert forward_code(2, block_size=32) is first and first is not Gemma3.forward.__code__
    assert forward_code(4, block_size=32) is not first and forward_code(2, block_size=16) is not first
