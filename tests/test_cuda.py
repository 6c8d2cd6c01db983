"""What only a GPU can check (`pytest -m cuda`; skipped without one): inductor against eager, flex attention
against SDPA at Gemma 3 270M's shapes, bf16 and fp16 steps against float32, exact resume with fused AdamW, and
torchrun with NCCL. benchmarks/gpu_suite.py runs these last. Each compares with something computed another
way on the same GPU, never with a number written down. pytest runs them in this file's order, so a GPU run
stopped at its deadline has run first the ones that had never run on a GPU (attention kernels, the loop's speed).

On a machine without ../shared (the GPU machines), TINYGEMMA_STORIES names the folder holding train.txt.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_train
import torch

import tinygemma
from tinygemma import Gemma3, ModelConfig
from tinygemma.config import SLIDING, load_recipe
from tinygemma.data import prepare
from tinygemma.train import train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


@pytest.fixture
def exact_float32():
    """float32 matmuls in float32, not TF32 (training's setup_runtime turns TF32 on for the whole process)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def small(**overrides) -> ModelConfig:
    """Gemma 3's structure at test size: a sliding layer (window 32) and a global one."""
    base = dict(vocab_size=512, d_model=128, n_layers=2, sliding_window_pattern=2, n_heads=4, n_kv_heads=1,
                head_dim=32, mlp_dim=256, sliding_window=32, query_pre_attn_scalar=32.0)
    return ModelConfig(**{**base, **overrides})


def fresh_model(config: ModelConfig, seed: int = 0) -> Gemma3:
    """A model with random norm gains too (they start at zero), so that every parameter has a real gradient."""
    torch.manual_seed(seed)
    model = Gemma3(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.normal_(0.0, 0.5)
    return model.to(CUDA)


def loss_and_grads(model, x, y, dtype, forward=None) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss = (model if forward is None else forward)(x, y)  # no truth test: a compiled module has no len()
    loss.backward()
    return loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest over parameters of ||a - b|| / ||b||: one number per comparison, whatever the scales."""
    assert a.keys() == b.keys()
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)).item() for n in a)


def batch(vocab: int, batch_size: int, block: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, vocab, (batch_size, block + 1), generator=g).to(CUDA)
    return window[:, :-1], window[:, 1:]


# ------------------------------------------------------------------ generation: one CUDA graph a token


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_decoding_gives_the_tokens_of_kernel_by_kernel_steps(dtype, exact_float32, monkeypatch):
    """generate on CUDA replays one captured step a token (decode.GraphedStep), the position a device tensor:
    greedy and seeded-sampled tokens exactly as the same step launched kernel by kernel, for several prompts, well
    past the sliding window (a ring of 32 slots, come round twice); in float32 also as the steps at int positions
    and the model's own forward."""
    from tinygemma import decode
    from tinygemma import generate as generate_module

    model = fresh_model(small(sliding_window=32), seed=4).to(dtype).eval()
    prompts = torch.randint(0, 512, (3, 7), generator=torch.Generator().manual_seed(2)).to(CUDA)
    replays = []
    real_call = decode.GraphedStep.__call__
    monkeypatch.setattr(decode.GraphedStep, "__call__", lambda self, *a: replays.append(1) or real_call(self, *a))

    class KernelByKernel:  # the step GraphedStep captures, at the same device position, launched eagerly
        def __init__(self, plan, model, cache, batch_size, rope):
            self.step = lambda token, pos: plan.step(model, token, cache, torch.tensor(pos, device=CUDA), rope)

        def __call__(self, token, pos):
            return self.step(token, pos)

    def seeded():
        return [torch.Generator(device=CUDA).manual_seed(100 + i) for i in range(3)]

    graphed = generate_module.generate(model, prompts, 80, temperature=0)
    assert len(replays) == 79  # every step after the prompt's
    # A prompt made on the host (torch.tensor([ids]), as the README writes one) was a device-mismatch traceback
    assert torch.equal(generate_module.generate(model, prompts.cpu(), 80, temperature=0), graphed)
    sampled = generate_module.generate(model, prompts, 40, temperature=1.0, top_k=50, generator=seeded())
    with monkeypatch.context() as patch:
        patch.setattr(generate_module, "GraphedStep", KernelByKernel)
        assert torch.equal(graphed, generate_module.generate(model, prompts, 80, temperature=0))
        assert torch.equal(sampled, generate_module.generate(model, prompts, 40, temperature=1.0, top_k=50,
                                                             generator=seeded()))
    count = len(replays)
    stepped = generate_module.generate(model, prompts, 80, temperature=0, cuda_graph=False)  # at int positions
    assert len(replays) == count
    monkeypatch.setattr(generate_module, "decode_plan", lambda m: None)  # the model's own forward
    forward = generate_module.generate(model, prompts, 80, temperature=0)
    if dtype == torch.float32:  # (bf16's rounding of a longer softmax row may flip a near tie, and all after it)
        assert torch.equal(graphed, stepped) and torch.equal(graphed, forward)


def test_cuda_graph_decoding_within_a_context_gives_the_tokens_of_the_model_s_own_forward(exact_float32, monkeypatch):
    """generate(context=N) on CUDA: the captured step replays at positions that start again from the re-read
    text's length each time the cache fills (its slots past that masked), with a sliding ring of 32 slots smaller
    than the context of 48: greedy tokens in float32 exactly as the model's own forward gives them, read the same
    way."""
    from tinygemma import generate as generate_module

    model = fresh_model(small(sliding_window=32), seed=4).float().eval()
    prompts = torch.randint(0, 512, (3, 7), generator=torch.Generator().manual_seed(2)).to(CUDA)
    graphed = generate_module.generate(model, prompts, 120, temperature=0, context=48)
    assert not torch.equal(graphed, generate_module.generate(model, prompts, 120, temperature=0))
    monkeypatch.setattr(generate_module, "decode_plan", lambda m: None)  # the model's own forward
    assert torch.equal(graphed, generate_module.generate(model, prompts, 120, temperature=0, context=48))


def test_generate_with_end_of_text_waits_every_few_tokens_on_cuda(monkeypatch):
    """On a GPU, generate(eos_id=...) and generate_text read the device every SYNC_EVERY tokens, not each (the
    host queues the graphed steps between): the tokens of a stream read token by token, the texts of
    generate_text reading each token, and reads of a device value (the profiler's) grow by at most two a wait."""
    from test_generate import device_reads

    from tinygemma import generate as generate_module
    from tinygemma.tokenizer import GPT2Tokenizer

    model = fresh_model(small(), seed=4).to(torch.bfloat16).eval()
    prompts = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(2)).to(CUDA)
    greedy = generate_module.generate(model, prompts, 40, temperature=0)
    for eos in (int(greedy[0, 7 + 3]), int(greedy[1, 7 + 12]), next(i for i in range(512) if not (greedy == i).any())):
        streamed = list(generate_module.generate_stream(model, prompts, 40, temperature=0, eos_id=eos))
        expected = torch.cat([prompts] + [t[:, None] for t in streamed], dim=1)
        assert torch.equal(generate_module.generate(model, prompts, 40, temperature=0, eos_id=eos), expected)

    def reads(tokens: int) -> int:  # (eos: an id never met)
        return device_reads(lambda: generate_module.generate(model, prompts, tokens, temperature=0, eos_id=eos))

    assert reads(40) - reads(24) <= 2 * 16 // generate_module.SYNC_EVERY
    tokenizer = GPT2Tokenizer()
    gpt2_model = fresh_model(small(vocab_size=tokenizer.model_vocab_size), seed=4).eval()
    texts = generate_module.generate_text(gpt2_model, tokenizer, "Once upon a time", 30, top_k=3, seed=1,
                                          num_samples=2, stop=["."])
    monkeypatch.setattr(generate_module, "reads_every", lambda device: 1)
    assert generate_module.generate_text(gpt2_model, tokenizer, "Once upon a time", 30, top_k=3, seed=1,
                                         num_samples=2, stop=["."]) == texts


# ------------------------------------------------------------------ attention kernels


@pytest.mark.parametrize("dtype,grad_rtol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("block", [32, 64, 65])  # the window (32): plainly causal, then masked (65: 1 mod 32)
def test_training_attention_runs_a_fused_sdpa_kernel(dtype, grad_rtol, block, exact_float32):
    """Where PyTorch's memory-efficient kernel refuses a shared K/V head (as it does through 2.11 at least), the
    K/V layout chosen at start-up (parallelize.choose_kv_layouts) still gets a fused kernel: forward and backward
    with SDPA's math fallback switched off, at head_dim 256 as the 270M, in each training dtype, with and
    without the sliding window's mask; and the loss and gradients are those of the shared head through
    whatever kernel SDPA picks by itself (the math kernel where flash does not run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tinygemma.parallelize import init_model, kv_layouts, set_kv_layouts
    from tinygemma.runtime import Runtime

    config = small(head_dim=256, query_pre_attn_scalar=256.0)
    cfg = load_recipe(None, [f"train.block_size={block}", "train.attention_backend=sdpa"]).train
    model = init_model(config, cfg, Runtime(CUDA, dtype), None)
    chosen = kv_layouts(model)
    x, y = batch(config.vocab_size, 2, block)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        loss, grads = loss_and_grads(model, x, y, dtype)  # "No available kernel": SDPA would run its math kernel
    set_kv_layouts(model, {kind: "shared" for kind in chosen})
    want_loss, want_grads = loss_and_grads(model, x, y, dtype)
    assert loss == pytest.approx(want_loss, rel=grad_rtol / 5), chosen
    assert relative_error(grads, want_grads) < grad_rtol, chosen


# ------------------------------------------------------------------ the loop's speed: micro-batches, no waiting


def test_auto_micro_batch_size_takes_the_largest_size_that_fits(straight_run, data_dir, tmp_path, monkeypatch):
    """The straight run's share of 8 sequences fits this GPU whole: auto takes one pass of 8. With no memory to
    spare, the probe refuses in one line instead of training into an out-of-memory error."""
    run = json.loads((straight_run / "config.json").read_text())["run"]
    assert (run["micro_batch_size"], run["passes_per_step"]) == (8, 1)
    logged = [r for r in test_train.metrics(straight_run) if "peak_memory_gib" in r]
    assert logged and all(0 < r["peak_memory_gib"] < 139 for r in logged)  # at the log lines

    import tinygemma.parallelize

    monkeypatch.setattr(tinygemma.parallelize, "PROBE_MEMORY_FRACTION", 1e-9)
    with pytest.raises(tinygemma.UserError, match="not even 1 sequence"):
        train(load_recipe(None, settings(data_dir, tmp_path / "none")), quiet=True)
    assert not (tmp_path / "none" / "checkpoints").exists()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_steady_state_bf16_step_under_stop_makes_no_synchronising_call(optimizer, data_dir, tmp_path,
                                                                         monkeypatch):
    """The host queues the next step while the GPU runs this one: once compiled, a bf16 step under
    on_nonfinite = "stop" (the default) makes no call that waits for the device (the loss, gradient norm and
    finiteness are read at log intervals, outside the step)."""
    import tinygemma.train as train_module

    real_step = train_module.Trainer.step

    def step(self, step):
        if step < 3:  # compiling, the first allocations, the optimizer's state
            return real_step(self, step)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_step(self, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(train_module.Trainer, "step", step)
    out = tmp_path / optimizer
    train(load_recipe(None, settings(data_dir, out, "dtype=bfloat16", "compile=true", f"optimizer={optimizer}",
                                     "max_steps=8", "log_interval=4", "eval_interval=100")), quiet=True)
    assert sorted(test_train.train_losses(out)) == list(range(1, 9))


def test_a_cuda_profile_says_how_busy_the_gpu_was_and_on_what(data_dir, tmp_path):
    """--profile on CUDA: the trace holds the GPU's kernels, and the summary opens with the device's busy fraction
    and the kernels' time by kind, which profile.json holds for programs. Eager (the suite's time is short): cuBLAS's
    products and SDPA's attention kernels, sorted into their kinds by name."""
    from tinygemma.cli import main

    out = tmp_path / "profiled"
    args = [a for s in settings(data_dir, out, "dtype=bfloat16", "compile=false", "max_steps=6") for a in ("--set", s)]
    assert main(["train", *args, "--profile", "4:5"]) == 0
    figures = json.loads((out / "profile" / "profile.json").read_text())
    activity = figures["device_activity"]
    assert activity is not None and activity["kernels"] > 0, "the trace holds no CUDA kernels"
    assert 0 < activity["busy"] <= 1 and 0 < activity["busy_s"] <= figures["wall_s"] * 1.01
    shares = activity["share_by_kind"]
    assert sum(shares.values()) == pytest.approx(1.0) and shares.get("matmul", 0) > 0
    assert shares.get("attention", 0) > 0, shares
    top = activity["top_kernels"]
    assert top and [k["total_us"] for k in top] == sorted((k["total_us"] for k in top), reverse=True)
    assert {k["kind"] for k in top} >= {"matmul", "attention"}
    assert sum(k["calls"] for k in top if k["kind"] != "copies and fills") <= activity["kernels"]
    summary = (out / "profile" / "summary.txt").read_text()
    assert summary.splitlines()[1].startswith("device busy ") and "\n\nkernels by device time\n" in summary


# ------------------------------------------------------------------ compiled against eager


@pytest.mark.parametrize("dtype,loss_rtol,grad_rtol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-2, 5e-2)])
def test_inductor_equals_eager(dtype, loss_rtol, grad_rtol, exact_float32):
    """torch.compile (inductor, the GPU's real backend) computes the same loss and gradients, sliding mask included."""
    model = fresh_model(small())
    x, y = batch(512, 4, 96)  # 3 windows long: the sliding mask is in the graph
    eager_loss, eager_grads = loss_and_grads(model, x, y, dtype)
    compiled_loss, compiled_grads = loss_and_grads(model, x, y, dtype, forward=torch.compile(model))
    assert compiled_loss == pytest.approx(eager_loss, rel=loss_rtol)
    assert relative_error(compiled_grads, eager_grads) < grad_rtol


# ------------------------------------------------------------------ flex attention against SDPA


def test_flex_and_flash_attention_equal_sdpa_forward_and_backward_at_270m_shapes(monkeypatch):
    """Block 1024, head_dim 256, 4 query heads on 1 KV head, window 512: gemma3-270m's attention, two layers.
    In bf16, each backend's loss and gradients are compared with float32 SDPA: flex and flash (FlashAttention-2's
    own window) may be no further from it than twice SDPA's own bf16 error (plus a little), so a wrong window or a
    wrong gradient fails. Each kernel must really run, once per sliding layer (a backend that fell back to SDPA
    would compare SDPA with itself)."""
    from test_model import spy_flex

    import tinygemma.model as model_module

    flex_calls, flash_calls, real_flash = spy_flex(monkeypatch), [], model_module.flash_window_attention
    monkeypatch.setattr(model_module, "flash_window_attention",
                        lambda *a, **k: flash_calls.append(1) or real_flash(*a, **k))
    config = ModelConfig.preset("gemma3-270m", vocab_size=512, n_layers=2, sliding_window_pattern=2)
    assert config.head_dim == 256 and config.sliding_window == 512
    model = fresh_model(config)
    x, y = batch(512, 2, 1024)

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        ref_loss, ref_grads = loss_and_grads(model, x, y, torch.float32)  # SDPA in float32
        with torch.no_grad():
            ref_logits = model(x).float()
    finally:
        torch.set_float32_matmul_precision(previous)
    results, calls = {}, {}
    for backend in ("sdpa", "flex", "flash"):
        model.attention_backend = backend
        flex_calls.clear()
        flash_calls.clear()
        loss, grads = loss_and_grads(model, x, y, torch.bfloat16)
        calls[backend] = (len(flex_calls), len(flash_calls))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x).float()
        results[backend] = (abs(loss - ref_loss) / ref_loss, relative_error(grads, ref_grads),
                            ((logits - ref_logits).norm() / ref_logits.norm()).item())
    sliding = config.layer_types.count(SLIDING)
    assert calls == {"sdpa": (0, 0), "flex": (sliding, 0), "flash": (0, sliding)} and sliding > 0
    for backend in ("flex", "flash"):
        for what, s, f, floor in zip(("loss", "gradients", "logits"), results["sdpa"], results[backend],
                                     (1e-3, 5e-3, 5e-3)):
            assert f <= 2 * s + floor, f"{backend}'s {what} are {f:.2e} from float32 SDPA's; bf16 SDPA's {s:.2e}"


def test_flash_attention_compiled_equals_eager():
    """FlashAttention-2's window through inductor (its fallback kernel, as the trainer compiles it) gives eager's
    loss and gradients, in bf16, at a block three windows long."""
    model = fresh_model(small())
    model.attention_backend = "flash"
    x, y = batch(512, 4, 96)
    eager_loss, eager_grads = loss_and_grads(model, x, y, torch.bfloat16)
    compiled_loss, compiled_grads = loss_and_grads(model, x, y, torch.bfloat16, forward=torch.compile(model))
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-2)
    assert relative_error(compiled_grads, eager_grads) < 5e-2


# ------------------------------------------------------------------ bf16 and fp16 steps against float32


def train_steps(dtype: torch.dtype, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor], dict]:
    """`steps` AdamW steps of the same model on the same batches: the losses, the first step's (unscaled)
    gradients, and how far each parameter moved (the norm of its change). fp16 through a GradScaler, as training
    does; GPT-2's 50,257-token vocabulary, where at initialisation each softmax gradient (about 1 / (vocab x
    tokens)) is below float16's smallest subnormal."""
    model = fresh_model(small(vocab_size=50_257))
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    # A moderate scale: no step of a fresh model overflows it (a skipped step would compare nothing).
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12, enabled=dtype == torch.float16)
    losses, first_grads = [], None
    for step in range(steps):
        x, y = batch(50_257, 8, 512, seed=step)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if first_grads is None:
            first_grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    moved = {n: (p.detach().float() - start[n]).norm().item() for n, p in model.named_parameters()}
    return losses, first_grads, moved


@pytest.mark.parametrize("dtype,grad_rtol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_low_precision_steps_follow_float32(dtype, grad_rtol, exact_float32):
    ref_losses, ref_grads, ref_moved = train_steps(torch.float32)
    losses, grads, moved = train_steps(dtype)
    assert all(g.isfinite().all() for g in grads.values())
    assert losses == pytest.approx(ref_losses, rel=2e-2)
    assert relative_error(grads, ref_grads) < grad_rtol
    # The steps updated every parameter about as far as float32's did (AdamW's steps are about lr an element,
    # whatever the precision): on random tokens the losses barely move, so a step never applied (a scaler
    # skipping every step) would pass the losses' comparison alone.
    assert all(ref_moved[n] > 0 and 0.5 < moved[n] / ref_moved[n] < 2 for n in ref_moved), (moved, ref_moved)


# ------------------------------------------------------------------ runs: resume and torchrun


# The 2-layer model of test_train.py, its block no longer than its window (plain causal attention: these tests
# are about the loop and the processes, not the attention backend), in float32 with fused AdamW on one GPU.
TINY = [*test_train.TINY, "model.sliding_window=32", "batch_size=2", "grad_accum_steps=4", "max_steps=20",
        "eval_batches=2", "checkpoint_interval=10", "device=cuda"]  # later settings win
# Some CUDA kernels (attention's backward among them) add in an order that may vary between runs.
RTOL = 1e-5


def settings(data_dir, out, *overrides) -> list[str]:
    return [f"data.dir={data_dir}", f"train.out={out}", *TINY, *overrides]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """600 real stories, BPE-tokenized to 512 tokens (10% held out)."""
    stories = Path(os.environ.get("TINYGEMMA_STORIES", ROOT.parent / "shared" / "data" / "tinystories"))
    assert (stories / "train.txt").exists(), f"real stories expected at {stories} (set TINYGEMMA_STORIES)"
    out = tmp_path_factory.mktemp("data") / "bpe512"
    prepare(out, sources=[stories / "train.txt"], tokenizer="bpe", vocab_size=512, limit=600, val_fraction=0.1,
            workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    train(load_recipe(None, settings(data_dir, out)), quiet=True)
    return out


def test_resume_with_fused_adamw_reproduces_the_straight_run(straight_run, data_dir, tmp_path):
    config = json.loads((straight_run / "config.json").read_text())
    assert config["run"]["device"].startswith("cuda")  # fused AdamW is the CUDA path
    out = tmp_path / "resumed"
    train(load_recipe(None, settings(data_dir, out)), stop_at=10, quiet=True)
    assert sorted(test_train.train_losses(out)) == list(range(1, 11))
    train(load_recipe(None, settings(data_dir, out)), resume=True, quiet=True)
    straight, resumed = test_train.train_losses(straight_run), test_train.train_losses(out)
    assert sorted(resumed) == list(range(1, 21))
    assert [resumed[s] for s in range(11, 21)] == pytest.approx([straight[s] for s in range(11, 21)], rel=RTOL)
    assert test_train.val_losses(out)[20] == pytest.approx(test_train.val_losses(straight_run)[20], rel=RTOL)


def torchrun(nproc: int, data_dir, out, *overrides) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tinygemma", "train", "--stop-at", "10",
           *[a for s in settings(data_dir, out, *overrides) for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, test_train.torchrun_failure(proc)


@pytest.mark.parametrize("nproc,distributed", [(1, "ddp"), (2, "ddp"), (2, "fsdp")])
def test_torchrun_reproduces_one_process(nproc, distributed, straight_run, data_dir, tmp_path):
    """torchrun with NCCL: the losses of the one-process run of the same global batch, with 1 process, and
    with 2 under DDP and FSDP2 (whose checkpoint is gathered from the shards into a whole model)."""
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs, this machine has {torch.cuda.device_count()}")
    out = tmp_path / f"{distributed}{nproc}"
    torchrun(nproc, data_dir, out, f"distributed={distributed}")
    run = json.loads((out / "config.json").read_text())["run"]
    assert run["world_size"] == nproc
    # The same recipe's global batch on any number of processes (2 sequences x 4 micro-steps): the one-process run
    # is the reference.
    assert run["global_batch"] == 8
    reference = straight_run
    got, want = test_train.train_losses(out), test_train.train_losses(reference)
    assert sorted(got) == list(range(1, 11))
    assert [got[s] for s in range(1, 11)] == pytest.approx([want[s] for s in range(1, 11)], rel=1e-4)
    assert test_train.val_losses(out)[10] == pytest.approx(test_train.val_losses(reference)[10], rel=1e-4)
    tinygemma.load(out / "checkpoints" / "step_000010")
