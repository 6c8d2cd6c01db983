"""Optimizers and schedules (optim.py): Muon trains exactly the blocks' matrices, our float32 Muon agrees with
torch.optim.Muon, Muon's state survives a checkpoint and resume is exact, wsd's boundaries and its extension on
resume, and bad settings are refused in one line."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_train
import torch
from safetensors import safe_open
from test_train import ROOT, tiny_settings, train_losses, val_losses

import tinygemma
from tinygemma.cli import main
from tinygemma.config import ModelConfig, load_recipe
from tinygemma.errors import UserError
from tinygemma.model import Gemma3
from tinygemma.optim import (
    MuonAdamW,
    check_resume_schedule,
    configure_optimizer,
    cooldown_start,
    describe_optimizer,
    learning_rate,
    muon_backend,
    muon_parameters,
    orthogonalize,
    orthogonalize_groups,
    schedule,
    set_learning_rates,
)
from tinygemma.train import train

CPU = SimpleNamespace(device=torch.device("cpu"))


data_dir, one_thread = test_train.data_dir, test_train.one_thread  # 600 stories, 512-token BPE; one thread


def run(data_dir, out, *overrides, **kwargs) -> dict:
    settings = tiny_settings(data_dir, out, "optimizer=muon", "muon_learning_rate=0.05", "lr_schedule=wsd",
                             "checkpoint_interval=0", *overrides)
    return train(load_recipe(None, settings), quiet=True, **kwargs)


def test_muon_trains_exactly_the_blocks_matrices():
    model = Gemma3(ModelConfig.preset("gemma3-tiny", vocab_size=512, n_layers=2))
    cfg = load_recipe(None, ["optimizer=muon", "muon_learning_rate=0.03", "learning_rate=1e-3"]).train
    optimizer = configure_optimizer(model, cfg, CPU)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if g["muon"] for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.param_groups if not g["muon"] for p in g["params"]}
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert muon == {f"layers.{i}.{proj}.weight" for i in range(2) for proj in projections}
    assert "embed_tokens.weight" in adamw and "norm.weight" in adamw  # the embedding (tied head) and the gains
    assert muon | adamw == set(names.values()) and not muon & adamw
    peaks = {g["muon"]: g["peak_lr"] for g in optimizer.param_groups}
    assert peaks == {True: 0.03, False: 1e-3}
    # Weight decay: the embedding's AdamW group only (norm gains and Muon's matrices have none).
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {"embed_tokens.weight"}
    assert isinstance(configure_optimizer(model, load_recipe(None, []).train, CPU), MuonAdamW)  # the default
    assert isinstance(configure_optimizer(model, load_recipe(None, ["optimizer=adamw"]).train, CPU), torch.optim.AdamW)


def matrices(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((48, 32), (32, 96), (64, 64))]


def take_steps(params, optimizer, steps: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    return [p.detach().clone() for p in params]


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_own_muon_matches_torch_muon():
    """Three steps on tall, wide and square matrices: our batched iteration, in float32, bfloat16 or float16,
    agrees with torch.optim.Muon's bfloat16 one within bfloat16's precision; the "torch" backend is
    torch.optim.Muon exactly."""
    start = [p.detach().clone() for p in matrices(0)]
    ref_params = matrices(0)
    reference = take_steps(ref_params, torch.optim.Muon(ref_params, lr=0.02, weight_decay=0.0, momentum=0.95,
                                                        nesterov=True, adjust_lr_fn="original"))
    for backend in ("float32", "bfloat16", "float16", "torch"):
        params = matrices(0)
        ours = take_steps(params, MuonAdamW([{"params": params, "muon": True}], lr=0.02, betas=(0.9, 0.95),
                                            eps=1e-8, backend=backend))
        for a, b, p0 in zip(ours, reference, start):
            if backend == "torch":
                assert torch.equal(a, b)
            else:
                # float32 against bf16, or our batched bf16 against torch's one matrix at a time (another order of
                # rounding): bf16 keeps 8 bits, a relative error ~ 2^-8 a step
                moved, differ = (b - p0).norm(), (a - b).norm()
                assert moved > 0.01 and differ < 2e-2 * moved
                if backend in ("float32", "float16"):  # (float16 keeps 11 bits: nearer float32's than bf16's)
                    assert differ > 0  # the iteration really ran in another precision
                else:  # the same precision as torch's: far closer than float32 gets (1-1.5% here)
                    assert differ < 5e-3 * moved


def test_batched_iteration_equals_one_matrix_at_a_time():
    """orthogonalize_groups stacks same-shape matrices into one batched iteration: each result is that matrix's
    own (each normalized by its own norm, tall ones turned wide), named by its index, iterated in the dtype asked
    for and given back in its own (matrices of one shape and two dtypes are two groups), and nearly orthogonal."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 16), (16, 64), (64, 16), (32, 32), (16, 64), (8, 64)]
    updates = [torch.randn(s, generator=gen) * scale for s, scale in zip(shapes, (1, 10, 0.01, 3, 1, 100))]
    groups = list(orthogonalize_groups(updates, torch.float32))
    assert [indices for indices, _ in groups] == [[0, 2], [1, 4], [3], [5]]
    batched = [None] * len(updates)
    for indices, done in groups:
        assert done.dtype == torch.float32 and done.shape == (len(indices), *updates[indices[0]].shape)
        assert all(d.stride() == updates[i].stride() for d, i in zip(done, indices))
        for j, i in enumerate(indices):
            batched[i] = done[j]
    for indices, done in orthogonalize_groups(updates, torch.bfloat16):  # iterated in bf16, given back in float32
        assert done.dtype == torch.float32
        # laid out as the matrices (tall ones too): the step's foreach add then stays one multi-tensor kernel
        assert all(d.stride() == updates[i].stride() for d, i in zip(done, indices))
        assert torch.equal(done, orthogonalize(torch.stack([updates[i] for i in indices]), torch.bfloat16).float())
    mixed = [updates[0], updates[2].to(torch.bfloat16)]  # one shape, two dtypes: two groups, each its own dtype
    assert [(i, done.dtype) for i, done in orthogonalize_groups(mixed, torch.float32)] == [
        ([0], torch.float32), ([1], torch.bfloat16)]
    for u, b in zip(updates, batched):
        one = orthogonalize(u, torch.float32)
        assert b.shape == u.shape and torch.allclose(b, one, atol=1e-5, rtol=1e-5)
        wide = b if b.size(0) <= b.size(1) else b.T
        singular = torch.linalg.svdvals(wide)
        assert singular.min() > 0.5 and singular.max() < 1.3  # Muon's iteration: every direction near 1


def test_the_float16_iteration_keeps_its_range_and_beats_bfloat16s_precision():
    """The "float16" backend (auto's on a T4 or V100): on a matrix of the 270M's (256 x 640, its smallest: a CPU
    without AVX512-FP16 emulates float16 products, 100x slower than float32's) and its transpose, its result is
    within 0.5% of the float32 iteration's (bfloat16's, about 1%); updates far outside float16's range (an
    overflow to inf above 65,504; a flush to zero below 6e-8) give the same result as at scale 1, since each is
    scaled to norm 1 in float32 before the cast."""
    gen = torch.Generator().manual_seed(0)
    for u in (torch.randn(256, 640, generator=gen), torch.randn(640, 256, generator=gen)):
        reference = orthogonalize(u, torch.float32)
        error = {dtype: ((orthogonalize(u, dtype).float() - reference).norm() / reference.norm()).item()
                 for dtype in (torch.float16, torch.bfloat16)}
        assert error[torch.float16] < 5e-3 and error[torch.float16] < error[torch.bfloat16] / 4, error
    small = torch.randn(64, 256, generator=gen)
    at_one = orthogonalize(small, torch.float16)
    for scale in (1e6, 1e-9):
        scaled = orthogonalize(small * scale, torch.float16)
        assert scaled.dtype == torch.float16 and torch.isfinite(scaled).all()
        torch.testing.assert_close(scaled, at_one, rtol=0, atol=2e-3)


def steps_with_a_schedule(params, optimizer, lrs) -> list[torch.Tensor]:
    """One step per learning rate in `lrs`, set as the trainer sets it (a Python float in the group)."""
    g = torch.Generator().manual_seed(7)
    for lr in lrs:
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    return [p.detach().clone() for p in params]


def muon(params, backend: str) -> MuonAdamW:
    return MuonAdamW([{"params": params, "muon": True}], lr=0.02, betas=(0.9, 0.95), eps=1e-8, backend=backend)


@pytest.fixture
def traced_muon(monkeypatch):
    """The "compiled" backend traced by aot_eager (dynamo and AOT autograd as inductor gets the graph, without
    its C++ code generation). Graphs are counted from zero: conftest empties dynamo's cache after each test."""
    import tinygemma.optim as optim

    monkeypatch.setattr(optim, "MUON_COMPILER", "aot_eager")


def test_compiled_backend_compiles_once_per_shape_group_whatever_the_learning_rate(traced_muon):
    """Five steps whose learning rate changes every step, on four matrices of three shapes: three graphs, one
    per shape, and the "bfloat16" backend's update (the same arithmetic, traced)."""
    from torch._dynamo.utils import counters

    shapes = ((48, 32), (32, 96), (64, 64), (48, 32))
    lrs = [0.004, 0.008, 0.02, 0.02, 0.011]  # a warmup, the plateau, a cooldown
    make = lambda: [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                    for i, s in enumerate(shapes)]
    start, reference = make(), make()
    expected = steps_with_a_schedule(reference, muon(reference, "bfloat16"), lrs)
    graphs = counters["stats"]["unique_graphs"]
    params = make()
    optimizer = muon(params, "compiled")
    assert "torch.compile'd update per shape group" in describe_optimizer(optimizer)
    ours = steps_with_a_schedule(params, optimizer, lrs)
    assert counters["stats"]["unique_graphs"] - graphs == 3
    for a, b, p0 in zip(ours, expected, start):
        # the traced graph's lerp is decomposed (other float32 rounding), which flips a few bf16 roundings
        moved, differ = (b - p0).norm(), (a - b).norm()
        assert moved > 0.01 and differ < 5e-3 * moved


def test_compiled_backend_serves_any_number_of_models_in_one_process(traced_muon):
    """Each optimizer compiles its own copy: one compile shared by the process counted every model's graphs (a
    shape group is a shape and a number of matrices) toward dynamo's limit of 8, and the third model of a sweep
    (gemma3-tiny at 1, 2, 3 layers: 4 graphs each) raised FailOnRecompileLimitHit. Each model's steps are
    compiled graphs of its own, and give the "bfloat16" backend's update."""
    from torch._dynamo.utils import counters

    for n_layers in (1, 2, 3):
        model = Gemma3(ModelConfig.preset("gemma3-tiny", n_layers=n_layers, d_model=32, mlp_dim=64, head_dim=8))
        params = [p for n, p in model.named_parameters() if n in muon_parameters(model)]
        start = [p.detach().clone() for p in params]
        reference = [torch.nn.Parameter(p.clone()) for p in start]
        expected = steps_with_a_schedule(reference, muon(reference, "bfloat16"), [0.01, 0.02])
        graphs = counters["stats"]["unique_graphs"]
        ours = steps_with_a_schedule(params, muon(params, "compiled"), [0.01, 0.02])
        assert counters["stats"]["unique_graphs"] - graphs == 4  # (q, k/v, o, gate/up/down: the shape groups)
        for a, b, p0 in zip(ours, expected, start):  # (a few bf16 roundings flip: more of a tiny matrix's update)
            moved, differ = (b - p0).norm(), (a - b).norm()
            assert moved > 0.01 and differ < 2e-2 * moved


@pytest.mark.parametrize("torch_2_6", [False, True], ids=["distribute_tensor", "without_src_data_rank"])
def test_compiled_backend_takes_sharded_matrices_like_the_others(traced_muon, tmp_path, monkeypatch, torch_2_6):
    """FSDP2's DTensors (here sharded over a one-process gloo group): the "compiled" backend gathers each whole and
    takes the "bfloat16" backend's batched iteration, as "torch" does: the same update as "bfloat16" on plain
    matrices. Also with PyTorch 2.6's distribute_tensor, which has no src_data_rank (passing it raised), and its
    DTensor, which (to 2.11) has no rule for the out-of-place foreach lerp (Nesterov's blend of all matrices)."""
    import torch.distributed as dist
    import torch.distributed.tensor as dtensor
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if torch_2_6:
        monkeypatch.setattr(dtensor, "distribute_tensor", lambda tensor, device_mesh, placements:
                            distribute_tensor(tensor, device_mesh, placements))
        foreach_lerp = torch._foreach_lerp

        def lerp_of_plain_tensors(tensors, *args):
            if any(hasattr(t, "full_tensor") for t in tensors):
                raise NotImplementedError("Operator aten._foreach_lerp.Scalar does not have a sharding strategy")
            return foreach_lerp(tensors, *args)

        monkeypatch.setattr(torch, "_foreach_lerp", lerp_of_plain_tensors)

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain = matrices(0)
        sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in plain]
        lrs = [0.01, 0.02, 0.015]
        start = [p.detach().clone() for p in plain]
        expected = steps_with_a_schedule(plain, muon(plain, "bfloat16"), lrs)
        g = torch.Generator().manual_seed(7)
        optimizer = muon(sharded, "compiled")
        for lr in lrs:
            optimizer.param_groups[0]["lr"] = lr
            for p in sharded:
                p.grad = distribute_tensor(torch.randn(p.shape, generator=g), mesh, [Shard(0)])
            optimizer.step()
        for p, b, p0 in zip(sharded, expected, start):
            assert hasattr(p, "full_tensor") and (b - p0).norm() > 0.01  # still sharded, and moved
            torch.testing.assert_close(p.full_tensor(), b, rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["float32", "bfloat16", "float16"])
def test_muons_decay_of_half_precision_matrices_multiplies_by_the_float_factor(backend, dtype):
    """Weight decay W <- W (1 - lr wd) of bfloat16 or float16 matrices, as `W.mul_(1 - lr wd)` computes it: on a
    CPU a foreach multiply rounds the factor to the matrices' dtype first (0.99752 to 0.99609375 in bfloat16),
    so a decay of lr x wd below about 0.002 vanished. (A zero gradient: the step is the decay alone.)"""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in ((64, 16), (16, 64), (64, 16))]
    lr, wd = 0.0248, 0.1
    expected = [p.detach().clone().mul_(1 - lr * wd) for p in params]
    assert not torch.equal(expected[0], params[0].detach())
    optimizer = MuonAdamW([{"params": params, "muon": True, "weight_decay": wd}], lr=lr, betas=(0.9, 0.95),
                          eps=1e-8, backend=backend)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, e in zip(params, expected):
        assert torch.equal(p.detach(), e)


def test_compiled_backend_trains_and_resumes_exactly(traced_muon, data_dir, tmp_path, monkeypatch):
    """The trainer with the "compiled" backend: a run stopped at step 4 and resumed (a fresh optimizer, its
    learning-rate tensors made again) gives the uninterrupted run's losses exactly, and those follow the "bfloat16"
    backend's run within bfloat16's rounding."""
    import tinygemma.optim as optim

    losses = {}
    for backend in ("bfloat16", "compiled"):
        monkeypatch.setattr(optim, "muon_backend", lambda device, backend=backend: backend)
        run(data_dir, tmp_path / backend, "max_steps=8")
        losses[backend] = train_losses(tmp_path / backend)
    out = tmp_path / "resumed"
    run(data_dir, out, "max_steps=8", stop_at=4)
    run(data_dir, out, "max_steps=8", resume=True)
    assert train_losses(out) == losses["compiled"]  # exactly
    assert list(losses["compiled"].values()) == pytest.approx(list(losses["bfloat16"].values()), rel=2e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_backend_on_cuda_matches_bfloat16_and_never_waits_for_the_gpu():
    """Inductor's graphs for gemma3-270m-gpt2's Muon matrices (the same graphs as benchmarks/optimizer_step.py's,
    which then finds them in inductor's cache): the "bfloat16" backend's update within bfloat16's rounding, one graph
    per shape whatever the learning rate, and steps that make no synchronising call (torch.cuda.set_sync_debug_mode
    raises on one), so a trainer that does not wait each step keeps the GPU fed."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    base = Gemma3(ModelConfig.preset("gemma3-270m-gpt2"))
    names = muon_parameters(base)
    shapes = [p.shape for n, p in base.named_parameters() if n in names]
    make = lambda: [torch.nn.Parameter(p.detach().to("cuda", copy=True)) for n, p in base.named_parameters()
                    if n in names]
    start, reference, params = make(), make(), make()
    optimizers = {"bfloat16": muon(reference, "bfloat16"), "compiled": muon(params, "compiled")}
    g = torch.Generator(device="cuda").manual_seed(1)
    grads = [1e-3 * torch.randn(shape, generator=g, device="cuda") for shape in shapes]
    graphs = counters["stats"]["unique_graphs"]
    for step, lr in enumerate([0.004, 0.02, 0.013, 0.007]):
        for optimizer in optimizers.values():
            optimizer.param_groups[0]["lr"] = lr
            for p, grad in zip(optimizer.param_groups[0]["params"], grads):
                p.grad = grad * (1 + step)
        optimizers["bfloat16"].step()
        if step < 2:
            optimizers["compiled"].step()
        else:  # compiled by now: no step waits for the device
            torch.cuda.set_sync_debug_mode("error")
            try:
                optimizers["compiled"].step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert counters["stats"]["unique_graphs"] - graphs == 5  # q; k and v; o; gate and up; down
    moved = torch.cat([(b - p0).flatten() for b, p0 in zip(reference, start)]).norm()
    differ = torch.cat([(a - b).flatten() for a, b in zip(params, reference)]).norm()
    assert differ < 3e-2 * moved  # inductor keeps some bf16 intermediates in float32 (1.3% on a CPU)


def test_adamw_part_matches_torch_adamw():
    params = [torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(16, 8))]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = take_steps(params, MuonAdamW([{"params": params, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8))
    theirs = take_steps(ref_params, torch.optim.AdamW(ref_params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_backend_follows_native_bf16(monkeypatch):
    import tinygemma.optim as optim

    monkeypatch.setattr(optim, "cpu_has_bf16", lambda: False)
    assert muon_backend(torch.device("cpu")) == "float32"
    monkeypatch.setattr(optim, "cpu_has_bf16", lambda: True)  # our batched bf16: 1.7x torch.optim.Muon's there
    assert muon_backend(torch.device("cpu")) == "bfloat16"


def test_muon_backend_setting_overrides_the_devices_choice(monkeypatch):
    """train.muon_backend: the GPU user picks the compiled iteration without editing code; auto is the device's."""
    import tinygemma.optim as optim

    model = Gemma3(ModelConfig.preset("gemma3-tiny", n_layers=1))
    for backend in ("compiled", "bfloat16", "float16", "float32"):
        assert configure_optimizer(model, load_recipe(None, [f"muon_backend={backend}"]).train, CPU).backend == backend
    assert configure_optimizer(model, load_recipe(None, []).train, CPU).backend == muon_backend(torch.device("cpu"))
    # The first log line's reason is the setting where the user chose float32, not auto's "no native bf16 here"
    asked = describe_optimizer(configure_optimizer(model, load_recipe(None, ["muon_backend=float32"]).train, CPU))
    assert asked == "Muon (own float32 Newton-Schulz: train.muon_backend = float32) + AdamW"
    monkeypatch.setattr(optim, "muon_backend", lambda device: "float32")  # auto's choice, on a CPU without bf16
    chosen = describe_optimizer(configure_optimizer(model, load_recipe(None, []).train, CPU))
    assert chosen == "Muon (own float32 Newton-Schulz: no native bf16 on this device) + AdamW"
    monkeypatch.undo()
    with pytest.raises(UserError, match="train.muon_backend must be one of auto, torch, compiled, bfloat16, float16, float32"):
        load_recipe(None, ["muon_backend=fast"])
    monkeypatch.delattr(torch.optim, "Muon", raising=False)  # torch < 2.9
    with pytest.raises(UserError, match="train.muon_backend = torch needs torch.optim.Muon"):
        configure_optimizer(model, load_recipe(None, ["muon_backend=torch"]).train, CPU)
    # ours need no torch.optim.Muon: a CPU's choice stands without it
    assert optim.muon_backend(torch.device("cpu")) == ("bfloat16" if optim.cpu_has_bf16() else "float32")


def test_wsd_values_at_the_boundaries():
    cfg = load_recipe(None, ["learning_rate=1e-3", "min_lr=1e-4", "warmup_steps=10", "max_steps=100",
                             "lr_schedule=wsd", "cooldown_fraction=0.4"]).train
    assert cooldown_start(cfg) == 60
    lr = lambda s, c=cfg: learning_rate(s, c)
    assert lr(0) == pytest.approx(1e-4) and lr(9) == 1e-3  # warmup ends at the peak
    assert lr(10) == lr(59) == 1e-3  # stable; the cooldown's first step, 60, is its first below the peak
    assert lr(60) == pytest.approx(1e-3 - 0.9e-3 / 40)
    assert lr(79) == pytest.approx(5.5e-4) and lr(98) == pytest.approx(1e-4 + 0.9e-3 / 40)
    assert lr(99) == pytest.approx(1e-4)  # min_lr at the run's last step (the log's "step 100/100")
    # Twice as long: the same rates up to the old cooldown, the new cooldown over the last 40%.
    longer = load_recipe(None, ["learning_rate=1e-3", "min_lr=1e-4", "warmup_steps=10", "max_steps=200",
                                "lr_schedule=wsd"]).train
    assert [lr(s, longer) for s in range(60)] == [lr(s) for s in range(60)]
    assert cooldown_start(longer) == 120 and lr(199, longer) == pytest.approx(1e-4)
    # Muon's groups follow the same shape from their own peak.
    model = Gemma3(ModelConfig.preset("gemma3-tiny", vocab_size=512, n_layers=1))
    muon_cfg = load_recipe(None, ["learning_rate=1e-3", "min_lr=1e-4", "warmup_steps=10", "max_steps=100",
                                  "lr_schedule=wsd", "optimizer=muon", "muon_learning_rate=0.02"]).train
    optimizer = configure_optimizer(model, muon_cfg, CPU)
    assert set_learning_rates(optimizer, 79, muon_cfg) == pytest.approx({"lr": 5.5e-4, "lr_muon": 0.011})
    assert {g["muon"]: g["lr"] for g in optimizer.param_groups} == pytest.approx({True: 0.011, False: 5.5e-4})


def test_a_cooldown_longer_than_the_steps_after_the_warmup_starts_when_the_warmup_ends():
    """wsd with cooldown_fraction 0.8 of 20 steps and a warmup of 10: the cooldown would start at step 4, inside
    the warmup; it starts at step 10, after the warmup has reached the peak."""
    cfg = load_recipe(None, ["learning_rate=1e-3", "min_lr=1e-4", "warmup_steps=10", "max_steps=20",
                             "lr_schedule=wsd", "cooldown_fraction=0.8"]).train
    assert cooldown_start(cfg) == 10
    assert schedule(9, cfg) == 1.0 and learning_rate(19, cfg) == pytest.approx(1e-4)
    rates = [learning_rate(s, cfg) for s in range(20)]
    assert rates[:10] == sorted(rates[:10]) and rates[9:] == sorted(rates[9:], reverse=True)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_recipes_adam_settings_reach_every_adamw_group(optimizer):
    """adam_eps, betas and weight_decay as the recipe sets them (not their defaults) in each AdamW group; decay on
    the 2-D weights only."""
    cfg = load_recipe(None, [f"optimizer={optimizer}", "adam_eps=1e-6", "beta1=0.8", "beta2=0.99",
                             "weight_decay=0.05"]).train
    model = Gemma3(ModelConfig.preset("gemma3-tiny", vocab_size=512, n_layers=1))
    groups = [g for g in configure_optimizer(model, cfg, CPU).param_groups if not g.get("muon")]
    assert groups and all(g["eps"] == 1e-6 and tuple(g["betas"]) == (0.8, 0.99) for g in groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
    assert all((g["weight_decay"] > 0) == all(p.dim() == 2 for p in g["params"]) for g in groups)


def test_a_short_wsd_run_still_ends_at_min_lr():
    """A cooldown fraction that rounds to no step (0.4 of 1, 0.2 of 2) still gives the run's last step min_lr;
    a fraction of 0 keeps the plateau to the end, as asked."""
    for max_steps, fraction in ((1, 0.4), (2, 0.2), (3, 0.1)):
        cfg = load_recipe(None, ["learning_rate=1e-3", "min_lr=1e-4", "warmup_steps=0", f"max_steps={max_steps}",
                                 "lr_schedule=wsd", f"cooldown_fraction={fraction}"]).train
        assert cooldown_start(cfg) == max_steps - 1
        assert learning_rate(max_steps - 1, cfg) == pytest.approx(1e-4)
    flat = load_recipe(None, ["learning_rate=1e-3", "min_lr=1e-4", "warmup_steps=0", "max_steps=5",
                              "lr_schedule=wsd", "cooldown_fraction=0"]).train
    assert cooldown_start(flat) == 5 and learning_rate(4, flat) == 1e-3


def test_muon_state_round_trips_and_resume_is_exact(data_dir, tmp_path, monkeypatch):
    """A Muon + wsd run interrupted at step 10 of a planned 20 and resumed with max_steps raised to 30 (before the
    cooldown at step 12) gives, step for step, the losses of a run planned for 30 from the start."""
    straight = tmp_path / "straight"
    run(data_dir, straight, "max_steps=30")
    # Both rates are logged (a sweep of muon_learning_rate showed the same AdamW lr in every run): each the
    # schedule's shape from its own peak (metrics.jsonl, the trackers' train/lr and train/lr_muon).
    cfg = load_recipe(None, tiny_settings(data_dir, straight, "optimizer=muon", "muon_learning_rate=0.05",
                                          "lr_schedule=wsd", "max_steps=30")).train
    steps = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "train_loss" in r]
    assert [r["lr_muon"] for r in steps] == pytest.approx([0.05 * schedule(s, cfg) for s in range(30)], rel=1e-12)
    assert [r["lr"] for r in steps] == pytest.approx([1e-2 * schedule(s, cfg) for s in range(30)], rel=1e-12)
    out = tmp_path / "extended"
    run(data_dir, out, "max_steps=20", stop_at=10)
    with safe_open(str(out / "checkpoints" / "step_000010" / "optimizer.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "layers.0.mlp.up_proj.weight/momentum_buffer" in keys  # Muon's state
    assert {"embed_tokens.weight/exp_avg", "embed_tokens.weight/exp_avg_sq", "norm.weight/exp_avg"} <= keys
    assert not any(k.startswith("layers.0.mlp.up_proj.weight/exp_avg") for k in keys)
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "30"]) == 0
    assert train_losses(out) == train_losses(straight)  # exactly
    # A run whose cooldown is over extends from a checkpoint it kept from before it, into a new folder (hard
    # links), exactly as well; the run itself stays as it was.
    done = tmp_path / "done"
    run(data_dir, done, "max_steps=20", "checkpoint_interval=5", "keep_checkpoints=4")
    before = {p.relative_to(done): p.read_bytes() for p in done.rglob("*") if p.is_file()}
    fork = tmp_path / "fork"
    assert main(["train", "--resume-from", str(done / "checkpoints" / "step_000010"), "--out", str(fork),
                 "--max-steps", "30"]) == 0
    assert train_losses(fork) == train_losses(straight) and val_losses(fork)[30] == val_losses(straight)[30]
    assert {p.relative_to(done): p.read_bytes() for p in done.rglob("*") if p.is_file()} == before
    # The fork says where it came from (its folder alone did not): its invocation, and its report.
    source = str((done / "checkpoints" / "step_000010").resolve())
    state = json.loads((fork / "checkpoints" / "step_000030" / "trainer_state.json").read_text())
    assert [part.get("forked_from") for part in state["invocations"]] == [None, {"dir": source, "step": 10}]
    assert f"| continued from | `{source}` (--resume-from): steps 1 to 10 were trained there |" in (
        fork / "report.md").read_text()
    assert main(["export", "--ckpt", str(fork), "--out", str(tmp_path / "fork_hf")]) == 0  # and so does its card
    assert f"| continued from | `{source}` (--resume-from)" in (tmp_path / "fork_hf" / "README.md").read_text()
    # A fork of the fork, named by a relative path: recorded whole, each part with the steps it trained.
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume-from", "fork/checkpoints/step_000020", "--out", "fork2", "--max-steps", "30",
                 "--stop-at", "22"]) == 0
    report = (tmp_path / "fork2" / "report.md").read_text()
    assert f"| continued from | `{source}` (--resume-from): steps 1 to 10 were trained there |" in report
    # A fork of fork2's own copy of its first checkpoint: continued from the original (the copy trained nothing)
    assert main(["train", "--resume-from", "fork2/checkpoints/step_000020", "--out", "fork3", "--max-steps", "30",
                 "--stop-at", "21"]) == 0
    report = (tmp_path / "fork3" / "report.md").read_text()
    assert (f"| continued from | `{(fork / 'checkpoints' / 'step_000020').resolve()}` (--resume-from): steps 11 to "
            "20 were trained there |") in report and report.count("| continued from |") == 2
    assert (f"| continued from | `{(fork / 'checkpoints' / 'step_000020').resolve()}` (--resume-from): steps 11 to "
            "20 were trained there |") in report
    assert val_losses(out) == val_losses(straight)
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 30


def test_resume_from_refuses_in_one_line_and_leaves_nothing_behind(data_dir, tmp_path, capsys, monkeypatch):
    """--resume-from takes a checkpoint (in its run, or copied alone) and a new or empty --out outside any run; a
    fork its resume then refuses (another global batch) is removed again, an empty folder given kept, and the run
    it came from is as it was. A fork that trains, even to a divergence, keeps its records."""
    import shutil

    source = tmp_path / "source"
    run(data_dir, source, "max_steps=4", "checkpoint_interval=2", "keep_checkpoints=2")
    step2 = source / "checkpoints" / "step_000002"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    for argv, says in [
        (["--resume-from", str(step2)], "--resume-from continues a run in a new folder: name it with --out"),
        (["--resume-from", str(source), "--out", str(tmp_path / "f")], "is not a checkpoint of a training run"),
        # one pruned since (keep_checkpoints): not found, not the wrong kind of folder
        (["--resume-from", str(source / "checkpoints" / "step_000001"), "--out", str(tmp_path / "f")],
         "checkpoints/step_000001: checkpoint not found"),
        (["--resume-from", str(step2), "--out", str(tmp_path / "full")], "is not empty"),
        (["--resume-from", str(step2), "--out", str(step2 / "branch")], "a run's checkpoints (which that run prunes)"),
        (["--resume-from", str(step2), "--out", str(source / "checkpoints" / "b")], "a run's checkpoints (which that run prunes)"),
        (["--resume-from", str(step2), "--out", str(tmp_path / "f"), "--set", "batch_size=4"],
         "the run's batches cannot change on resume"),
        (["--resume-from", str(step2), "--out", str(tmp_path / "empty"), "--set", "batch_size=4"],
         "the run's batches cannot change on resume"),
    ]:
        assert main(["train", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err, (argv, err)
    assert not (tmp_path / "f").exists() and [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
    assert sorted(p.name for p in (source / "checkpoints").iterdir()) == [
        "best.json", "last.json", "step_000002", "step_000004"]
    assert not any(p.name == "branch" for p in source.rglob("*"))
    # A checkpoint copied alone (named as training names it, so pruning counts it), and --out given by --set as
    # a run's Reproduce command gives it; a run's own checkpoints/ is no place for a run, a folder of that name is
    shutil.copytree(step2, tmp_path / "home" / "checkpoints" / "alone")
    assert main(["train", "--resume-from", str(tmp_path / "home" / "checkpoints" / "alone"), "--set",
                 f"train.out={tmp_path / 'home' / 'b'}"]) == 0
    assert train_losses(tmp_path / "home" / "b") == {s: v for s, v in train_losses(source).items() if s > 2}
    assert sorted(p.name for p in (tmp_path / "home" / "b" / "checkpoints").iterdir()) == [
        "best.json", "last.json", "step_000002", "step_000004"]  # (keep_checkpoints = 2)
    assert main(["train", "--out", str(source / "checkpoints" / "run"), "--resume"]) == 2
    assert "a run's checkpoints (which that run prunes)" in capsys.readouterr().err
    # From Python: train(recipe, resume_from=...), a value of another kind refused in one line
    run(data_dir, tmp_path / "py", "max_steps=4", "checkpoint_interval=2", "keep_checkpoints=2", resume_from=step2)
    assert train_losses(tmp_path / "py") == train_losses(source)
    for bad in (5, "", True):
        with pytest.raises(UserError, match="resume_from must name a run's checkpoint folder"):
            run(data_dir, tmp_path / "bad", resume_from=bad)
    # No output of any command goes where the run's pruning would delete it
    for argv in (["export", "--ckpt", str(source), "--out", str(source / "checkpoints" / "step_hf")],
                 ["export", "--ckpt", str(source), "--out", str(step2 / "m.gguf")],
                 ["prepare", "--source", str(ROOT / "README.md"), "--out", str(source / "checkpoints" / "step_d")]):
        assert main(argv) == 2, argv
        assert "a run's checkpoints (which that run prunes)" in capsys.readouterr().err
    assert not any(p.name in ("step_hf", "m.gguf", "step_d") for p in source.rglob("*"))
    # A branch that diverges keeps what it recorded (nothing is deleted once training opened it); 1e9 left torch
    # 2.6's losses finite (4.8e18)
    assert main(["train", "--resume-from", str(step2), "--out", str(tmp_path / "d"), "--set", "learning_rate=1e20"]) == 2
    assert "non-finite" in capsys.readouterr().err and (tmp_path / "d" / "metrics.jsonl").exists()
    # Under torchrun the fork is made in one process first: said once, by process 0
    for name, value in {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29599",
                        "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(name, value)
    # (the command it names to make the fork first is the user's own, settings and all, with --stop-at 1)
    first = (f"run `tinygemma train --resume-from {step2} --out {tmp_path / 't'} --set max_steps=9 --set "
             "'generate.stop=The end' --stop-at 1` first")
    for rank, said in (("1", ""), ("0", first)):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "--resume-from", str(step2), "--out", str(tmp_path / "t"), "--set", "max_steps=9",
                     "--set", "generate.stop=The end"]) == 2
        err = capsys.readouterr().err
        assert (said in err and err.count("\n") == 1) if said else err == "", err
    assert not (tmp_path / "t").exists()


def test_extension_after_the_cooldown_began_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "late"
    # The cooldown of 20 steps begins at step 12 (still at the peak: a run stopped after it could be extended);
    # step 13 took a lower rate.
    run(data_dir, out, "max_steps=20", stop_at=14)
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "30"]) == 2
    err = capsys.readouterr().err.strip()
    assert ("cooldown of the run began after step 12 (step 13 took the first lower rate); extend it from a "
            "checkpoint of step 12 or earlier, if the run kept one (it keeps its best and its newest "
            "keep_checkpoints, 1 by default), into a new folder: tinygemma train --resume-from "
            "RUN/checkpoints/step_NNNNNN --out NEW --max-steps 30") in err and "\n" not in err
    # Before the cooldown: a max_steps that moves it before the run's step, or another warmup, is refused for what
    # it is (both were said to be a cooldown that had begun).
    early = tmp_path / "early"
    run(data_dir, early, "max_steps=20", stop_at=10)
    for more, says in [(["--max-steps", "15"], "train.max_steps cannot change from 20 to 15 at step 10: the wsd "
                                               "cooldown would then begin after step 9"),
                       (["--max-steps", "30", "--set", "warmup_steps=5"], "the learning-rate schedule of the run (wsd; "
                                                                          "lr_schedule, warmup_steps, cooldown_fraction) "
                                                                          "cannot change at step 10")]:
        assert main(["train", "--out", str(early), "--resume", *more]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err, err
    # A later cooldown changes only the steps to come: it trains on, and says so as for other rates.
    assert main(["train", "--out", str(early), "--resume", "--set", "cooldown_fraction=0.2", "--stop-at", "11"]) == 0
    assert "other than the run's: cooldown_fraction 0.4 -> 0.2; the steps from here" in capsys.readouterr().err
    cosine = tmp_path / "cosine"
    run(data_dir, cosine, "max_steps=20", "lr_schedule=cosine", stop_at=8)
    # cosine has no cooldown: its fraction changes nothing, and is not said to. A --stop-at behind the run trains
    # nothing, and says so with the value given.
    assert main(["train", "--out", str(cosine), "--resume", "--set", "cooldown_fraction=0.9", "--stop-at", "9"]) == 0
    assert "warning" not in capsys.readouterr().err
    # Another schedule within the warmup (the rates taken are the same) changes the steps to come: said, as above
    # (it trained on in silence)
    switch = tmp_path / "switch"
    run(data_dir, switch, "max_steps=20", "warmup_steps=8", stop_at=4)
    assert main(["train", "--out", str(switch), "--resume", "--set", "lr_schedule=cosine", "--stop-at", "5"]) == 0
    assert "other than the run's: lr_schedule wsd -> cosine; the steps from here" in capsys.readouterr().err
    assert main(["train", "--out", str(cosine), "--resume", "--set", "learning_rate=5e-3", "--stop-at", "3"]) == 0
    assert "the run is at step 9 of 20 with settings other than its own: learning_rate 0.01 -> 0.005; --stop-at " \
           "(stop_at) 3 trains no step, so they change nothing" in capsys.readouterr().err  # the notebook's name too
    with pytest.raises(tinygemma.UserError, match="cosine schedule's learning rates depend on max_steps"):
        run(data_dir, cosine, "max_steps=30", "lr_schedule=cosine", resume=True)


def test_cosine_reaches_min_lr_at_the_last_step_and_leaves_the_peak_after_the_warmup():
    """The peak once, at the warmup's last step; min_lr at the run's last step, max_steps - 1 (it stayed above
    min_lr, and the first two steps after the warmup were both at the peak)."""
    cfg = load_recipe(None, ["learning_rate=1e-3", "min_lr=1e-4", "warmup_steps=10", "max_steps=110",
                             "lr_schedule=cosine"]).train
    lrs = [learning_rate(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == 1e-3 and lrs.count(1e-3) == 1  # linear warmup, per step
    assert lrs[59] == pytest.approx(5.5e-4)  # half way down: 50 of the 100 decay steps taken
    assert lrs[-1] == pytest.approx(1e-4) and min(lrs[10:]) == lrs[-1]
    assert all(a > b for a, b in zip(lrs[9:], lrs[10:]))


@pytest.mark.filterwarnings("ignore:Detected call of")  # the notebook's order: a scheduler step per micro-step
def test_the_workshop_recipe_s_schedule_is_the_notebook_s_in_optimizer_steps():
    """configs/workshop.toml counts in optimizer steps what the notebook counted in micro-steps: the notebook's own
    schedulers (LinearLR, then CosineAnnealingLR, stepped every one of its 150,000 micro-steps of 32 a step), with
    the recipe's min_lr for the notebook's 5e-4, give the rates of the same 4,688 updates after the warmup."""
    cfg = load_recipe(str(ROOT / "configs" / "workshop.toml")).train
    micro_steps, accumulation, warmup = 150_000, 32, 1_000
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=micro_steps - warmup, eta_min=cfg.min_lr),
    ], milestones=[warmup])
    notebook = []  # the rate of each update, as the notebook's loop took it
    for micro_step in range(micro_steps):
        if (micro_step + 1) % accumulation == 0 or micro_step + 1 == micro_steps:
            notebook.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert len(notebook) == cfg.max_steps == 4688
    ours = [learning_rate(step, cfg) for step in range(cfg.max_steps)]
    after = cfg.warmup_steps
    assert max(abs(a - b) for a, b in zip(notebook[after:], ours[after:])) < 2e-8
    assert notebook[0] == pytest.approx(3.54e-5) and ours[0] == pytest.approx(1e-4 / 31)  # the recipe's comments


def test_bad_optimizer_and_schedule_settings_are_refused_in_one_line(data_dir, tmp_path, capsys):
    for setting, message in [("optimizer=sgd", "train.optimizer must be one of adamw, muon"),
                             ("lr_schedule=linear", "train.lr_schedule must be one of cosine, wsd"),
                             ("cooldown_fraction=1.5", "train.cooldown_fraction must be a number in [0, 1]"),
                             ("muon_learning_rate=0", "train.muon_learning_rate must be a positive number")]:
        assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--set", setting]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def muon_single_run(tmp_path_factory, data_dir) -> Path:
    """6 Muon steps in one process: what DDP and FSDP2 must both give (made once for the two)."""
    single = tmp_path_factory.mktemp("runs") / "muon-single"
    with test_train.one_thread_only():
        run(data_dir, single, stop_at=6)
    return single


@pytest.mark.parametrize("distributed", ["ddp", pytest.param("fsdp", marks=test_train.NEEDS_CPU_FSDP)])
def test_two_processes_reproduce_one_with_muon(muon_single_run, data_dir, tmp_path, distributed):
    """torchrun, 2 gloo processes, each 1 micro-step of 4 of the global batch of 8: the same Muon losses as one
    process; under FSDP2 each sharded matrix is gathered whole for the Newton-Schulz iteration."""
    single = muon_single_run
    out = tmp_path / distributed
    settings = tiny_settings(data_dir, out, "optimizer=muon", "muon_learning_rate=0.05", "lr_schedule=wsd",
                             "checkpoint_interval=0", "batch_size=4", "grad_accum_steps=2", f"distributed={distributed}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tinygemma", "train", "--stop-at", "6", *[a for s in settings for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, test_train.torchrun_failure(proc)
    if distributed == "fsdp":  # the start line names the iteration that runs: torch.optim.Muon's was named
        assert "Newton-Schulz on each FSDP2 matrix gathered whole) + AdamW" in proc.stdout
    else:
        assert any(f"Muon ({name}" in proc.stdout for name in ("own float32", "own batched bfloat16",
                                                                 "torch.optim.Muon"))
    many, one = train_losses(out), train_losses(single)
    assert sorted(many) == list(range(1, 7))
    assert [many[s] for s in range(1, 7)] == pytest.approx([one[s] for s in range(1, 7)], rel=1e-4)


def test_resume_refuses_a_changed_schedule_or_optimizer_and_a_step_past_the_end():
    saved = load_recipe(None, ["max_steps=100", "warmup_steps=10", "optimizer=adamw", "lr_schedule=cosine"]).train
    as_dict = dataclasses.asdict(saved)
    check_resume_schedule(as_dict, saved, 50)  # unchanged: fine
    check_resume_schedule(as_dict, saved, 100)  # a finished run, at its last step: not past its end
    with pytest.raises(UserError, match="past train.max_steps"):
        check_resume_schedule(as_dict, saved, 101)
    with pytest.raises(UserError, match="schedule of the run"):  # cosine run resumed as wsd: rates already taken move
        check_resume_schedule(as_dict, dataclasses.replace(saved, lr_schedule="wsd"), 50)
    with pytest.raises(UserError, match="schedule of the run \\(cosine"):  # resumed as wsd with a new length
        check_resume_schedule(as_dict, dataclasses.replace(saved, lr_schedule="wsd", max_steps=200), 50)
    with pytest.raises(UserError, match="optimizer cannot change from adamw to muon"):
        check_resume_schedule(as_dict, dataclasses.replace(saved, optimizer="muon"), 50)
    # A new warmup longer than the run was: the schedule's refusal (it said warmup_steps must not exceed the old
    # max_steps, though the new one was 400)
    with pytest.raises(UserError, match="schedule of the run \\(cosine; lr_schedule, warmup_steps"):
        check_resume_schedule(as_dict, dataclasses.replace(saved, max_steps=400, warmup_steps=150), 50)
    with pytest.raises(UserError, match="past train.max_steps"):
        check_resume_schedule(as_dict, dataclasses.replace(saved, max_steps=40, warmup_steps=10), 50)
    # A new peak or floor changes the steps to come alone (check_resume_settings warns of it): the schedule's
    # shape is the same, whichever of the two moved.
    for lrs in ({"learning_rate": 5e-3}, {"min_lr": 1e-5}, {"learning_rate": 5e-3, "min_lr": 5e-4}):
        check_resume_schedule(as_dict, dataclasses.replace(saved, **lrs), 50)


def test_a_run_written_before_the_optimizer_fields_resumes_as_it_was_trained(data_dir, tmp_path):
    """Runs recorded before `optimizer` and `lr_schedule` existed trained with AdamW + cosine; since the built-in
    default became Muon + wsd, a plain --resume must still continue them with AdamW + cosine, exactly."""
    legacy = ["optimizer=adamw", "lr_schedule=cosine", "checkpoint_interval=10"]
    straight = tmp_path / "straight"
    train(load_recipe(None, tiny_settings(data_dir, straight, *legacy, "max_steps=20")), quiet=True)
    out = tmp_path / "old"
    train(load_recipe(None, tiny_settings(data_dir, out, *legacy, "max_steps=20")), quiet=True, stop_at=10)
    added = ("optimizer", "muon_learning_rate", "lr_schedule", "cooldown_fraction")
    for path, section in ((out / "config.json", None), (out / "checkpoints" / "step_000010" / "trainer_state.json", "config")):
        recorded = json.loads(path.read_text())
        train_settings = (recorded[section] if section else recorded)["train"]
        for key in added:  # as the old code wrote them
            del train_settings[key]
        path.write_text(json.dumps(recorded))
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert train_losses(out) == train_losses(straight)  # AdamW + cosine, exactly
    saved = {k: v for k, v in load_recipe(None, ["max_steps=100", "warmup_steps=10", *legacy]).train.__dict__.items()
             if k not in added}
    cosine = load_recipe(None, ["max_steps=100", "warmup_steps=10", *legacy]).train
    check_resume_schedule(saved, cosine, 50)  # the schedule it took: cosine
    with pytest.raises(UserError, match="optimizer cannot change from adamw to muon"):
        check_resume_schedule(saved, dataclasses.replace(cosine, optimizer="muon"), 50)


def test_adamw_decays_every_matrix_and_the_embedding_and_no_gain():
    """optimizer = adamw (the workshop's): weight decay on every 2-D weight (embedding and all projections), none on
    the norm gains. Kills the decayed group losing its matrices (p.dim() > 2: no decay anywhere, silently)."""
    model = Gemma3(ModelConfig.preset("gemma3-tiny", vocab_size=512, n_layers=2))
    names = {id(p): n for n, p in model.named_parameters()}
    cfg = load_recipe(None, ["optimizer=adamw", "weight_decay=0.05"]).train
    optimizer = configure_optimizer(model, cfg, CPU)
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {n for n, p in model.named_parameters() if p.dim() == 2}
    assert "embed_tokens.weight" in decayed and "layers.0.mlp.down_proj.weight" in decayed


@pytest.mark.parametrize("setting, kwarg", [("adam_eps=1e-3", "eps"), ("beta1=0.5", "betas"), ("beta2=0.6", "betas")])
def test_muon_s_adamw_part_steps_with_the_recipes_adam_settings(setting, kwarg):
    """Under optimizer = muon the embedding and gains step with the recipe's adam_eps and betas, exactly as
    torch.optim.AdamW given them: not only stored in the groups (test_the_recipes_adam_settings_reach_every_adamw_group)
    but used by MuonAdamW._adamw. Kills eps or betas hard-coded to their defaults in _adamw."""
    cfg = load_recipe(None, ["optimizer=muon", "weight_decay=0.1", "learning_rate=1e-2", setting]).train
    model = Gemma3(ModelConfig.preset("gemma3-tiny", vocab_size=64, n_layers=1))
    optimizer = configure_optimizer(model, cfg, CPU)
    params = [p for g in optimizer.param_groups if not g["muon"] for p in g["params"]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = torch.optim.AdamW([{"params": [r for r, p in zip(ref, params) if p.dim() == 2], "weight_decay": 0.1},
                                   {"params": [r for r, p in zip(ref, params) if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, r in zip(params, ref):
            p.grad = torch.randn(p.shape, generator=g) * 1e-3  # small gradients: eps matters
            r.grad = p.grad.clone()
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"]
        optimizer.step()
        reference.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)


def test_a_cooldown_fraction_is_rounded_not_truncated():
    """0.29 of 100 steps is 28.999999999999996 in floating point: the cooldown is the last 29 steps (round), not 28
    (int); 0.4 of 7 is 2.8: the last 3. Kills round() turned into int()."""
    for fraction, max_steps, start in ((0.29, 100, 71), (0.4, 7, 4)):
        cfg = load_recipe(None, ["learning_rate=1e-3", "min_lr=1e-4", "warmup_steps=0", f"max_steps={max_steps}",
                                 "lr_schedule=wsd", f"cooldown_fraction={fraction}"]).train
        assert cooldown_start(cfg) == start
        assert learning_rate(start - 1, cfg) == 1e-3 and learning_rate(start, cfg) < 1e-3


def test_adamw_is_fused_on_cuda_and_left_to_torch_elsewhere(monkeypatch):
    """optimizer = adamw asks torch for the fused kernel on CUDA (one launch for all parameters) and leaves the
    choice to torch elsewhere. Kills fused=None everywhere (GPU runs silently on the slower foreach path)."""
    seen = []

    class Recorder(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            seen.append(kwargs.get("fused"))
            super().__init__(params, **{**kwargs, "fused": None})

    monkeypatch.setattr(torch.optim, "AdamW", Recorder)
    model = Gemma3(ModelConfig.preset("gemma3-tiny", vocab_size=64, n_layers=1))
    cfg = load_recipe(None, ["optimizer=adamw"]).train
    configure_optimizer(model, cfg, SimpleNamespace(device=torch.device("cuda", 0)))
    configure_optimizer(model, cfg, CPU)
    assert seen == [True, None]


def test_the_sharded_start_line_names_the_float32_iteration_where_it_runs():
    """Under FSDP2 with muon_backend = float32 the start line says float32, not bfloat16 (kills the sharded branch
    naming bfloat16 whatever the backend)."""
    p = [torch.nn.Parameter(torch.randn(8, 8))]
    for backend, word in (("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16"), ("torch", "bfloat16"),
                          ("compiled", "bfloat16")):
        optimizer = MuonAdamW([{"params": p, "muon": True}], lr=0.02, betas=(0.9, 0.95), eps=1e-8, backend=backend)
        assert describe_optimizer(optimizer, sharded=True) == (
            f"Muon (own batched {word} Newton-Schulz on each FSDP2 matrix gathered whole) + AdamW")


def test_a_zero_update_orthogonalizes_to_zero_not_nan():
    """A matrix whose momentum is all zeros (a gradient of zeros at the first step) gives a zero update, as
    torch.optim.Muon's clamped norm does: not NaN weights. Kills the NS_EPS clamp removed."""
    for shape in ((8, 8), (16, 4), (2, 8, 8)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = orthogonalize(torch.zeros(shape), dtype)
            assert torch.equal(out, torch.zeros(shape, dtype=dtype))


def test_a_wsd_run_extends_from_the_checkpoint_of_its_cooldowns_start():
    """The refusal of a late extension says "extend it from a checkpoint of step {began} or earlier": the checkpoint
    of step cooldown_start itself has taken only peak rates (its next step, not yet taken, is the first lower one),
    so its extension must be allowed; only rates already taken count, never the next step's."""
    saved = load_recipe(None, ["max_steps=20", "warmup_steps=2", "optimizer=adamw", "lr_schedule=wsd",
                               "cooldown_fraction=0.4"]).train
    as_dict = dataclasses.asdict(saved)
    began = cooldown_start(saved)
    assert began == 12
    longer = dataclasses.replace(saved, max_steps=30)
    check_resume_schedule(as_dict, longer, began)  # steps 0..11 all at the peak: the same in the longer run
    with pytest.raises(UserError, match="cooldown of the run began after step 12"):
        check_resume_schedule(as_dict, longer, began + 1)


@pytest.mark.parametrize("backend", ["float32", "bfloat16", "float16", "compiled", "torch"])
def test_muon_s_weight_decay_scales_the_matrices(backend, traced_muon):
    if backend == "torch" and not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((16, 8), (8, 8))]
    start = [p.detach().clone() for p in params]
    optimizer = MuonAdamW([{"params": params, "muon": True, "weight_decay": 0.1}], lr=0.5, betas=(0.9, 0.95),
                          eps=1e-8, backend=backend)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, p0 in zip(params, start):
        torch.testing.assert_close(p.detach(), p0 * (1 - 0.5 * 0.1))


@pytest.mark.parametrize("backend", ["float32", "bfloat16", "float16", "compiled"])
def test_muon_skips_matrices_without_a_gradient(backend, traced_muon):
    g = torch.Generator().manual_seed(0)
    stepped, idle = torch.nn.Parameter(torch.randn(8, 8, generator=g)), torch.nn.Parameter(torch.randn(8, 8, generator=g))
    lonely = torch.nn.Parameter(torch.randn(4, 4, generator=g))
    optimizer = MuonAdamW([{"params": [stepped, idle], "muon": True}, {"params": [lonely], "muon": True}],
                          lr=0.02, betas=(0.9, 0.95), eps=1e-8, backend=backend)
    before = idle.detach().clone(), lonely.detach().clone(), stepped.detach().clone()
    stepped.grad = torch.randn(8, 8, generator=g)
    optimizer.step()
    assert torch.equal(idle, before[0]) and torch.equal(lonely, before[1]) and not torch.equal(stepped, before[2])
    assert idle not in optimizer.state and lonely not in optimizer.state


def test_adamw_part_skips_parameters_without_a_gradient():
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    optimizer = MuonAdamW([{"params": [a, b], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    before = b.detach().clone()
    a.grad = torch.ones_like(a)
    optimizer.step()
    assert torch.equal(b, before) and b not in optimizer.state


def test_step_returns_the_closure_s_loss():
    p = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = MuonAdamW([{"params": [p], "muon": True}], lr=0.02, betas=(0.9, 0.95), eps=1e-8)

    def closure():
        optimizer.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss is not None and torch.is_tensor(loss) and loss.item() > 0


def test_muon_adamw_refuses_an_unknown_backend_and_a_non_matrix():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="unknown Muon backend"):
        MuonAdamW([{"params": [p], "muon": True}], lr=0.02, betas=(0.9, 0.95), eps=1e-8, backend="fast")
    with pytest.raises(ValueError, match="only 2-D"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.randn(4))], "muon": True}], lr=0.02, betas=(0.9, 0.95), eps=1e-8)
