"""The model against transformers' Gemma3ForCausalLM: same logits, same greedy tokens, sliding layers included."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import tinygemma
import tinygemma.model as model_module
from tinygemma import Gemma3, ModelConfig, UserError
from tinygemma.config import GLOBAL, SLIDING
from tinygemma.generate import generate
from tinygemma.hf import to_transformers
from tinygemma.model import (
    KVCache,
    check_tokenizer_fits,
    kv_for_every_head,
    model_from_state,
    model_state,
    sliding_window_mask,
)
from tinygemma.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")


def cpu_sdpa_fuses_a_shared_kv_head() -> bool:
    """Whether SDPA's fused CPU kernel takes fewer K/V heads than query heads (enable_gqa). torch 2.6's refuses
    them and SDPA runs its math kernel, where transformers, which repeats K/V under a mask, gets the fused one:
    the same function, rounded otherwise in half precision (2.11 and 2.13 fuse both)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, kv = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8)
    try:
        with warnings.catch_warnings(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            warnings.simplefilter("ignore")
            F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        return True
    except RuntimeError:  # "No available kernel"
        return False


# Bit-for-bit agreement with transformers in half precision needs the same attention kernel on both sides
SAME_HALF_KERNELS = cpu_sdpa_fuses_a_shared_kv_head()


def small_config(**overrides) -> ModelConfig:
    """Gemma 3's structure at test size: 6 layers (5 sliding, 1 global), window 16, MQA with 4 query heads."""
    base = dict(vocab_size=512, d_model=64, n_layers=6, n_heads=4, n_kv_heads=1, head_dim=32, mlp_dim=128,
                sliding_window=16, query_pre_attn_scalar=32.0, max_position_embeddings=512)
    return ModelConfig(**{**base, **overrides})


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=500, d_model=64, n_layers=6, n_heads=4, n_kv_heads=1, head_dim=16, mlp_dim=128,
                sliding_window=16, query_pre_attn_scalar=16.0)
    return ModelConfig(**{**base, **overrides})


def randomize_norms(model: Gemma3, seed: int = 0) -> None:
    """Norm weights start at zero; give them values so that the (1 + w) gains are really compared."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def hf_twin(model: Gemma3, attn_implementation: str = "eager"):
    """transformers' Gemma3ForCausalLM with the same weights (eager attention: the plainest reference)."""
    return to_transformers(model, attn_implementation)


def make_pair(config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = Gemma3(config).eval()
    randomize_norms(model, seed)
    return model, hf_twin(model)


def test_the_package_lists_its_lazy_names():
    """dir(tinygemma) (what a notebook's tab completion offers) holds Gemma3, ModelConfig and UserError, which
    import only when first used."""
    assert set(tinygemma.__all__) <= set(dir(tinygemma))


def test_a_model_of_a_dict_is_refused_in_one_line():
    """Gemma3({"vocab_size": 5}) ended in AttributeError: 'dict' object has no attribute 'validate'."""
    with pytest.raises(UserError, match=r"Gemma3 takes a ModelConfig \(ModelConfig.preset\(...\), ModelConfig."
                                        r"from_dict\(...\)\), got dict"):
        Gemma3({"vocab_size": 5})


def test_the_packages_modules_are_reached_by_name_after_import_tinygemma_alone():
    """`import tinygemma`, then tinygemma.model.Block (the notebook's cell that prints the block's code): run after
    a kernel restart it failed, the submodule never imported; a name that is no module is still an AttributeError."""
    import subprocess
    import sys

    script = ("import sys, tinygemma\nassert 'tinygemma.model' not in sys.modules\n"
              "print(tinygemma.model.Block.__name__, tinygemma.generate.generate.__name__)\n"
              "try:\n    tinygemma.nope\nexcept AttributeError as e:\n    print(e)\n"
              "print(getattr(tinygemma, 'a.b', None), getattr(tinygemma, '__main__', None))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out == "Block generate\nmodule 'tinygemma' has no attribute 'nope'\nNone None\n"


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # Gemma 3 270M's layout at test size
        {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "sliding_window": 8, "sliding_window_pattern": 3,
         "rope_local_base": 500.0, "rope_global_base": 50_000.0, "query_pre_attn_scalar": 20.0},
        {"tie_embeddings": False, "n_layers": 3, "layer_types": (GLOBAL, SLIDING, SLIDING), "d_model": 48},
    ],
    ids=["gemma3-layout", "gqa-other-bases", "untied-custom-layers"],
)
def test_logits_match_transformers(overrides):
    config = small_config(**overrides)
    model, hf = make_pair(config)
    # Sequences several times longer than the window, so that the sliding layers really slide.
    T = 5 * config.sliding_window + 3
    input_ids = torch.randint(0, config.vocab_size, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(input_ids)
        theirs = hf(input_ids).logits
    assert ours.shape == theirs.shape == (3, T, config.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # The sliding window changes the result, so the comparison above does test it.
    with torch.no_grad():
        hf_global = hf_twin(Gemma3(ModelConfig(**{**config.to_dict(), "sliding_window": 10_000})).eval())
        hf_global.load_state_dict(hf.state_dict())
        assert (hf_global(input_ids).logits - theirs).abs().max().item() > 1e-3


def test_loss_matches_transformers():
    config = small_config()
    model, hf = make_pair(config, seed=3)
    x = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x[:, :-1], x[:, 1:])
        theirs = hf(input_ids=x, labels=x).loss  # transformers shifts the labels itself
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_sliding_window_mask_is_gemma3s():
    mask = sliding_window_mask(6, 6, 3, "cpu")
    for i in range(6):
        for j in range(6):
            assert bool(mask[i, j]) == (i - 3 < j <= i)


def test_sliding_cache_memory_is_bounded():
    config = small_config()
    model = Gemma3(config)
    cache = model.new_cache(batch_size=1, max_len=10_000)
    for layer_cache, kind in zip(cache, config.layer_types):
        expected = config.sliding_window if kind == SLIDING else 10_000
        assert layer_cache.k.shape[2] == expected


@pytest.mark.parametrize(
    "preset,tie,expected",
    [("gemma3-270m", True, 268_098_176), ("gemma3-270m-gpt2", True, 132_490_496),
     ("gemma3-270m-gpt2", False, 164_654_976)],
)
def test_preset_parameter_counts(preset, tie, expected):
    config = ModelConfig.preset(preset, tie_embeddings=tie)
    assert config.num_params() == expected
    with torch.device("meta"):  # count the real module's parameters without allocating them
        assert Gemma3(config).num_params() == expected


def test_gemma3_270m_preset_is_gemma3():
    c = ModelConfig.preset("gemma3-270m")
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_dim) == (
        262_144, 640, 18, 4, 1, 256, 2048)
    assert c.layer_types == tuple(GLOBAL if (i + 1) % 6 == 0 else SLIDING for i in range(18))
    assert (c.sliding_window, c.rope_local_base, c.rope_global_base, c.query_pre_attn_scalar) == (
        512, 10_000.0, 1_000_000.0, 256.0)


def test_init_matches_gemma():
    torch.manual_seed(0)
    model = Gemma3(small_config(vocab_size=4096, d_model=256, mlp_dim=1024))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert abs(model.embed_tokens.weight.std().item() - 0.02) < 1e-3
    assert abs(model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 1e-3
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if n.endswith("norm.weight"))


def test_bfloat16_forward_and_backward():
    config = small_config()
    torch.manual_seed(0)
    model = Gemma3(config).to(torch.bfloat16)
    x = torch.randint(0, config.vocab_size, (2, 3 * config.sliding_window))
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(float(config.vocab_size))).item()) < 0.5
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.embed_tokens.weight.grad.dtype == torch.bfloat16


@pytest.mark.skipif(not SAME_HALF_KERNELS, reason="this torch's fused CPU attention refuses a shared K/V head")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_transformers_exactly(dtype):
    """In bfloat16 and float16 the logits equal transformers' bit for bit on a CPU: the sqrt(d_model) scale is
    rounded to the weights' dtype (d_model 48: sqrt 6.93 is not exact in bf16, as 640's is not), the norms compute
    in float32 and round after the (1 + w) gain, and RoPE's frequencies stay float32, as `from_pretrained` in that
    dtype keeps them. SDPA on both sides, so that the attention kernel is the same."""
    config = small_config(d_model=48)
    torch.manual_seed(8)
    model = Gemma3(config).eval()
    randomize_norms(model, 8)
    model = model.to(dtype)
    hf = to_transformers(model, "sdpa")
    assert all(b.dtype == torch.float32 for n, b in hf.named_buffers() if n.endswith("inv_freq"))
    x = torch.randint(0, config.vocab_size, (2, 3 * config.sliding_window))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs), (ours.float() - theirs.float()).abs().max().item()


def test_rope_frequencies_stay_float32_in_a_bfloat16_model(tmp_path):
    """Loading in bfloat16 must not round RoPE's inverse frequencies (at position 1000 a rounded frequency is off
    by radians): the bf16 model's logits are as close to float32's at position ~1000 as at position ~10."""
    from tinygemma.checkpoint import save_model

    config = small_config(max_position_embeddings=2048, sliding_window=2048)  # attention sees every position
    model, _ = make_pair(config, seed=9)
    save_model(model, tmp_path / "ckpt")
    bf16 = tinygemma.load(tmp_path / "ckpt", dtype="bfloat16")
    assert bf16.inv_freq_local.dtype == bf16.inv_freq_global.dtype == torch.float32
    assert torch.equal(bf16.inv_freq_global, model.inv_freq_global)
    x = torch.randint(0, config.vocab_size, (1, 1040), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = (bf16(x).float() - model(x)).abs().amax(dim=-1)[0]  # per position
    early, late = error[5:15].mean().item(), error[1000:1040].mean().item()
    assert late < 1.5 * early, (early, late)  # rounded to bf16: 2x (0.021 against 0.010); kept float32: 0.85x


def test_tabulated_rope_computes_the_same_function():
    """tabulate_rope (which training calls with its block size) keeps cos and sin in buffers: the same logits,
    bit for bit, within the table and past it (positions computed as before), in float32 and bfloat16; the
    tables stay float32 and their length through .to(), and are not saved with the weights."""
    config = small_config(sliding_window=8)
    plain, _ = make_pair(config, seed=3)
    tabulated, _ = make_pair(config, seed=3)
    tabulated.tabulate_rope(24)
    assert "rope_table_" + SLIDING not in tabulated.state_dict()
    x = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for T in (24, 17, 40):  # the block, a shorter one, one past the table
            assert torch.equal(tabulated(x[:, :T]), plain(x[:, :T])), T
        cache_plain, cache_tab = plain.new_cache(2, 40), tabulated.new_cache(2, 40)
        for start, end in ((0, 20), *((i, i + 1) for i in range(20, 40))):  # a prompt, then steps into and past it
            assert torch.equal(tabulated.trunk(x[:, start:end], cache_tab, start),
                               plain.trunk(x[:, start:end], cache_plain, start)), start
        plain.to(torch.bfloat16), tabulated.to(torch.bfloat16)
        table = getattr(tabulated, "rope_table_" + GLOBAL)
        assert table.dtype == torch.float32 and table.shape == (2, 24, config.head_dim)
        assert torch.equal(tabulated(x[:, :24]), plain(x[:, :24]))


def test_compiled_training_forward_reads_the_rope_table():
    """What the table is for: in the graph torch.compile traces for a training forward, cos and sin are not
    computed (inductor would fuse them into every layer's kernel, computing them per element of q and k)."""
    config = small_config(sliding_window=8)
    model, _ = make_pair(config)
    x = torch.randint(0, config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))

    def traced_ops(model) -> set[str]:
        ops = set()

        def backend(gm, example_inputs):
            ops.update(str(node.target) for node in gm.graph.nodes if node.op in ("call_function", "call_method"))
            return gm.forward

        torch._dynamo.reset()
        torch.compile(model, backend=backend)(x, x)
        return ops

    assert any("cos" in op for op in traced_ops(model))  # computed in the forward: the check can see it
    model.tabulate_rope(24)
    assert not any("cos" in op or "sin" in op for op in traced_ops(model))


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attention_gets_one_dtype_under_autocast(backend, monkeypatch):
    """Under bf16 autocast the residual stream is float32, and so are the RoPE tables: q and k must still reach
    attention in v's dtype, with SDPA and with flex_attention (which refuses a mix on several torch releases)."""
    seen = {"sdpa": [], "flex": []}

    def recorder(kind):
        def record(q, k, v, *args, **kwargs):
            seen[kind].append((q.dtype, k.dtype, v.dtype))
            return torch.zeros_like(q)
        return record

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", recorder("sdpa"))
    monkeypatch.setattr(model_module, "_flex_attention", recorder("flex"))
    model = Gemma3(small_config())
    model.attention_backend = backend
    x = torch.randint(0, 512, (1, 2 * model.config.sliding_window))  # longer than the window: flex really runs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    sliding, n = model.config.layer_types.count(SLIDING), model.config.n_layers
    assert (len(seen["flex"]), len(seen["sdpa"])) == ((sliding, n - sliding) if backend == "flex" else (0, n))
    assert set(seen["flex"] + seen["sdpa"]) == {(torch.bfloat16,) * 3}


@pytest.mark.parametrize("n_kv_heads", [1, 2])
@pytest.mark.parametrize("layout", ["expanded", "repeated"])
def test_every_kv_layout_computes_the_same_function(layout, n_kv_heads):
    """K/V expanded or repeated to every query head (what SDPA's memory-efficient kernel takes where it refuses
    shared heads) gives the loss and gradients of the shared heads, sliding layers' masks included; with one
    K/V head, expanded is a view, not a copy."""
    torch.manual_seed(0)
    model = Gemma3(tiny(n_kv_heads=n_kv_heads))  # window 16
    randomize_norms(model)
    x = torch.randint(0, 500, (2, 41))  # 40 positions: the sliding layers' mask binds

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    shared_loss, shared_grads = loss_and_grads()
    for layer in model.layers:
        layer.self_attn.kv_layout = layout
    loss, grads = loss_and_grads()
    assert loss == pytest.approx(shared_loss, rel=1e-6)
    for name, grad in grads.items():  # float32 summation in another order: relative to the gradient's norm
        assert (grad - shared_grads[name]).norm() <= 1e-5 * shared_grads[name].norm(), name

    kv = torch.randn(2, n_kv_heads, 5, 16)
    every = kv_for_every_head(kv, 4, layout)
    assert every.shape == (2, 4, 5, 16)
    for h in range(4):  # query head h reads K/V head h // (4 / n_kv_heads), as enable_gqa
        assert torch.equal(every[:, h], kv[:, h // (4 // n_kv_heads)])
    assert (every.data_ptr() == kv.data_ptr() and every.stride(1) == 0) == (layout == "expanded" and n_kv_heads == 1)


def test_bad_configs_are_refused():
    from tinygemma import UserError

    with pytest.raises(UserError, match="multiple of n_kv_heads"):
        small_config(n_heads=3, n_kv_heads=2)
    with pytest.raises(UserError, match="positive integer"):
        small_config(d_model=0)
    with pytest.raises(UserError, match="layer_types"):
        small_config(layer_types=("sliding_attention",))
    with pytest.raises(UserError, match="unknown model preset"):
        ModelConfig.preset("gemma3-9000b")


def test_vocabulary_padding_changes_no_logits_or_loss():
    torch.manual_seed(0)
    plain = Gemma3(tiny()).eval()
    padded = model_from_state(tiny(vocab_pad_multiple=128), model_state(plain)).eval()
    assert padded.embed_tokens.weight.shape[0] == 512 and plain.embed_tokens.weight.shape[0] == 500
    with torch.no_grad():  # give the padding rows large values: they must still change nothing
        padded.embed_tokens.weight[500:] = 10.0
    x = torch.randint(0, 500, (2, 40))
    with torch.no_grad():
        assert padded(x).shape == (2, 40, 500)
        assert torch.equal(padded(x), plain(x))
        assert abs(padded(x[:, :-1], x[:, 1:]).item() - plain(x[:, :-1], x[:, 1:]).item()) < 1e-6
        assert generate(padded, x[:, :5], 8, temperature=0).max() < 500
    # Training: the same loss and gradients on the real rows; none at all on the padding rows.
    for chunk_size in (None, 24, 0):
        plain.zero_grad(), padded.zero_grad()
        plain.loss_chunk_size = padded.loss_chunk_size = chunk_size
        loss_plain, loss_padded = plain(x[:, :-1], x[:, 1:]), padded(x[:, :-1], x[:, 1:])
        loss_plain.backward(), loss_padded.backward()
        assert abs(loss_padded.item() - loss_plain.item()) < 1e-6
        grad = padded.embed_tokens.weight.grad
        assert torch.allclose(grad[:500], plain.embed_tokens.weight.grad, atol=1e-6)
        assert not grad[500:].any()


def spy_flex(monkeypatch) -> list:
    """The calls that reach flex_attention (model._flex_attention), each passed through: a "flex" that fell back
    to SDPA would compare SDPA with itself."""
    import tinygemma.model as model_module

    calls, real = [], model_module._flex_attention
    monkeypatch.setattr(model_module, "_flex_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_flex_attention_equals_reference_sliding_mask(monkeypatch):
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    model = Gemma3(tiny(sliding_window=8)).eval()
    x = torch.randint(0, 500, (2, 40))  # 5 windows long, so the block mask really slides
    calls = spy_flex(monkeypatch)
    with torch.no_grad():
        reference = model(x)
        assert calls == []  # SDPA's path
        model.attention_backend = "flex"
        flex = model(x)
    assert len(calls) == model.config.layer_types.count(SLIDING) > 0  # flex ran, once per sliding layer
    assert (flex - reference).abs().max().item() < 1e-5


def loss_and_gradients(model, x):
    model.zero_grad(set_to_none=True)
    loss = model(x, x)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_flash_window_equals_the_sliding_mask_forward_and_backward(flash_stand_in, n_kv_heads):
    """attention_backend "flash" hands each sliding layer's window to FlashAttention-2's own kernel: window_size_left
    = window - 1 and right 0, causal, on its [B, T, heads, D] layout with the K/V heads shared, so that it keeps
    i - window < j <= i (the stand-in computes what FlashAttention documents). Loss and every gradient equal the
    boolean mask's, at a block neither a multiple of the window nor within it; global layers keep SDPA."""
    torch.manual_seed(0)
    model = Gemma3(tiny(sliding_window=8, n_kv_heads=n_kv_heads))
    randomize_norms(model)
    x = torch.randint(0, 500, (2, 29))
    reference = loss_and_gradients(model, x)
    assert flash_stand_in == []  # the mask's path
    model.attention_backend = "flash"
    flash = loss_and_gradients(model, x)
    assert flash_stand_in == [(7, 0, True)] * model.config.layer_types.count(SLIDING)
    assert flash[0] == pytest.approx(reference[0], rel=1e-6)
    for name, grad in reference[1].items():
        assert torch.allclose(flash[1][name], grad, rtol=1e-4, atol=1e-6), name


def test_flash_window_leaves_short_blocks_and_the_kv_cache_to_sdpa(flash_stand_in):
    """Within the window every layer is plainly causal, and generation's cache keeps its own masks: neither
    reaches FlashAttention's window, and the tokens are the mask's."""
    torch.manual_seed(0)
    model = Gemma3(tiny(sliding_window=8)).eval()
    prompt = torch.randint(0, 500, (1, 12))
    expected = generate(model, prompt, max_new_tokens=6, temperature=0)
    model.attention_backend = "flash"
    with torch.no_grad():
        model(prompt[:, :8])
    assert torch.equal(generate(model, prompt, max_new_tokens=6, temperature=0), expected)
    assert flash_stand_in == []


def test_flash_window_compiles(flash_stand_in):
    """Under torch.compile (inductor, the trainer's compiler) FlashAttention's window is traced as torch's own
    operator, its backward included: the same loss and gradients as eager."""
    torch.manual_seed(0)
    model = Gemma3(tiny(sliding_window=8, n_layers=2, sliding_window_pattern=2))
    randomize_norms(model)
    model.attention_backend = "flash"
    x = torch.randint(0, 500, (2, 24))
    eager = loss_and_gradients(model, x)
    loss, grads = loss_and_gradients(torch.compile(model, dynamic=False), x)
    assert len(flash_stand_in) == 2  # eager once, and the compiled graph's own call
    assert loss == pytest.approx(eager[0], rel=1e-5)
    grads = {name.removeprefix("_orig_mod."): grad for name, grad in grads.items()}  # (the compiled wrapper's names)
    for name, grad in eager[1].items():
        assert torch.allclose(grads[name], grad, rtol=1e-3, atol=1e-5), name


@pytest.mark.parametrize("chunk_size", [None, 0], ids=["chunked-loss", "plain-loss"])
def test_flops_per_token_is_what_a_training_step_computes(chunk_size):
    """MFU's numerator, checked against torch's own FLOP counter over a real forward and backward with the loss:
    the matrix products of every layer and of the tied head, and attention's two products per head, each counted
    three times (forward, and the gradients of both operands). SDPA runs as its math backend, whose products the
    counter sees. At a block within the window every layer attends the whole causal block, and the counts agree
    exactly (the formula, as nanoGPT's and PaLM's, counts the causal square whole, as the counter does; a block
    shorter than the window, as the workshop's 128 under 512, is not credited with the window); past it,
    the formula credits sliding layers with the window of keys only, where the masked math backend computes the
    whole square."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = tiny(vocab_size=384, vocab_pad_multiple=128)  # no padding: the formula counts the real vocabulary
    model = Gemma3(config)
    model.loss_chunk_size = chunk_size  # the chunked loss makes its gradients' products in forward: same count
    n_sliding = config.layer_types.count(SLIDING)
    for B, T in [(2, config.sliding_window // 4), (2, config.sliding_window), (1, 3 * config.sliding_window)]:
        x = torch.randint(0, config.vocab_size, (B, T))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x, x).backward()
        beyond_window = 12 * config.n_heads * config.head_dim * max(T - config.sliding_window, 0) * n_sliding * B * T
        assert counter.get_total_flops() == config.flops_per_token(T) * B * T + beyond_window
        model.zero_grad()


def test_a_sequence_one_longer_than_the_window_slides():
    """T = sliding_window + 1, the shortest sequence whose last query must not see the first key (a prompt of that
    length, a block of it): transformers' logits, where the plain causal mask would see one key too many."""
    config = small_config()
    model, hf = make_pair(config)
    x = torch.randint(0, config.vocab_size, (2, config.sliding_window + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_the_configs_rms_norm_eps_reaches_every_norm():
    """model.rms_norm_eps (exported to transformers and GGUF) is the eps every norm uses, QK-norm included: a
    model with a large eps still gives transformers' logits."""
    config = small_config(rms_norm_eps=0.5)
    model, hf = make_pair(config)
    x = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_init_std_sets_every_weights_scale(tie):
    """model.init_std (Gemma's initializer_range) is the std of every linear and embedding weight, in every layer,
    the token embedding of an untied model included."""
    torch.manual_seed(0)
    model = Gemma3(small_config(vocab_size=4096, d_model=256, mlp_dim=1024, init_std=0.05, tie_embeddings=tie))
    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            seen.add(name.rsplit(".", 1)[-1])
            std = module.weight.std().item()
            assert abs(std - 0.05) < 2.5e-3, (name, std)
            assert abs(module.weight.mean().item()) < 2.5e-3, name
    expected = {"embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert seen >= expected | (set() if tie else {"lm_head"}), seen


def test_per_token_nats_of_a_padded_vocabulary_give_no_mass_to_the_padding():
    """reduction="none" (what evaluation reads) of a model with vocabulary padding: the padding rows take no
    probability, as with reduction="mean" and the logits; freshly initialised padding rows are not zero."""
    torch.manual_seed(0)
    padded = Gemma3(tiny(vocab_pad_multiple=128)).eval()  # 500 ids, 512 rows, the 12 padding rows random
    assert padded.embed_tokens.weight[500:].abs().sum() > 0
    x = torch.randint(0, 500, (2, 40))
    with torch.no_grad():
        nats = padded(x[:, :-1], x[:, 1:], reduction="none")
        reference = F.cross_entropy(padded(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
        assert torch.allclose(nats, reference, atol=1e-5)
        assert abs(nats.mean().item() - padded(x[:, :-1], x[:, 1:]).item()) < 1e-5


def test_an_untied_head_is_padded_with_the_embedding():
    """Loading unpadded weights of an untied model into a config with vocabulary padding (init_from, an HF folder)
    pads the output head as well as the embedding: the same logits, not a refusal of lm_head's shape."""
    torch.manual_seed(0)
    plain = Gemma3(tiny(tie_embeddings=False)).eval()
    padded = model_from_state(tiny(tie_embeddings=False, vocab_pad_multiple=128), model_state(plain)).eval()
    assert padded.lm_head.weight.shape[0] == 512 and not padded.lm_head.weight[500:].any()
    x = torch.randint(0, 500, (2, 20))
    with torch.no_grad():
        assert torch.equal(padded(x), plain(x))


def test_a_tokenizer_whose_ids_reach_the_vocabulary_padding_is_refused():
    """The padding rows are no tokens (their logits are -inf): a tokenizer with ids past vocab_size is refused
    even where they would fall inside the padded rows (GPT-2's 50,257 ids, a 50,200-id model padded to 50,304)."""
    with torch.device("meta"):
        model = Gemma3(tiny(vocab_size=50_200, vocab_pad_multiple=128))
    assert model.config.padded_vocab_size >= 50_257
    with pytest.raises(UserError, match="do not belong together"):
        check_tokenizer_fits(load_tokenizer("gpt2"), model)


def test_flops_per_token_follows_the_layer_types():
    """Only global layers attend the whole block: 12 x heads x head_dim x the keys past the window, per global
    layer, whatever the position of the global layers (here the first of three) and none for an all-sliding model."""
    for layer_types in ((GLOBAL, SLIDING, SLIDING), (SLIDING, SLIDING, SLIDING)):
        c = tiny(n_layers=3, layer_types=layer_types)
        W = c.sliding_window
        extra = 12 * c.n_heads * c.head_dim * 2 * W * layer_types.count(GLOBAL)
        assert c.flops_per_token(3 * W) - c.flops_per_token(W) == extra, layer_types


def test_flex_attention_takes_the_query_pre_attn_scalar(monkeypatch):
    """flex_attention scales by query_pre_attn_scalar ** -0.5 as SDPA does, where it differs from head_dim ** -0.5
    (every preset has them equal, so the existing flex test cannot tell)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    model = Gemma3(tiny(sliding_window=8, query_pre_attn_scalar=40.0)).eval()
    x = torch.randint(0, 500, (2, 40))
    calls = spy_flex(monkeypatch)
    with torch.no_grad():
        reference = model(x)
        model.attention_backend = "flex"
        flex = model(x)
    assert len(calls) == model.config.layer_types.count(SLIDING) > 0
    assert (flex - reference).abs().max().item() < 1e-5


def test_flops_per_token_counts_the_real_vocabulary_of_a_padded_one():
    """The head's share is 6 x vocab_size x d_model, vocabulary padding or not (the existing counter test uses a
    vocabulary with no padding)."""
    plain, padded = tiny(), tiny(vocab_pad_multiple=128)
    assert padded.padded_vocab_size == 512
    assert padded.flops_per_token(64) == plain.flops_per_token(64)


@pytest.mark.parametrize("tie", [True, False])
def test_num_params_without_embeddings(tie):
    """num_params(embeddings=False): the parameters less the token embedding, and less the head when untied (a
    tied head counted once, so subtracted once)."""
    config = small_config(tie_embeddings=tie)
    model = Gemma3(config)
    assert model.num_params(embeddings=False) == config.num_params(embeddings=False)
    assert model.num_params(embeddings=False) == sum(
        p.numel() for n, p in model.named_parameters() if n not in ("embed_tokens.weight", "lm_head.weight"))


def test_bfloat16_residual_stream_under_autocast(monkeypatch):
    """residual_dtype: under autocast, every layer's output is in that dtype (float32 without it), the RoPE
    tables stay float32, the loss and gradients stay those of the float32 stream within bf16's rounding, the
    compiled model agrees with the eager one; and without autocast the knob changes nothing (a float32 model
    would otherwise meet bf16 inputs)."""
    import tinygemma.model as model_module

    torch.manual_seed(0)
    model = Gemma3(tiny())
    randomize_norms(model)
    x = torch.randint(0, 500, (2, 41))  # past the window of 16
    outputs, rope_dtypes = [], []
    for layer in model.layers:
        layer.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    apply_rope = model_module.apply_rope
    monkeypatch.setattr(model_module, "apply_rope", lambda t, cos, sin: rope_dtypes.append(cos.dtype) or apply_rope(t, cos, sin))

    def loss_and_grads(autocast=True, run=model):
        model.zero_grad(set_to_none=True)
        outputs.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = run(x[:, :-1], x[:, 1:])
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    float32_loss, float32_grads = loss_and_grads()
    assert outputs == [torch.float32] * model.config.n_layers
    plain_loss, _ = loss_and_grads(autocast=False)
    model.residual_dtype = torch.bfloat16
    rope_dtypes.clear()
    loss, grads = loss_and_grads()
    assert outputs == [torch.bfloat16] * model.config.n_layers
    assert set(rope_dtypes) == {torch.float32}
    assert loss != float32_loss and loss == pytest.approx(float32_loss, rel=1e-2)
    for name, grad in grads.items():
        cosine = F.cosine_similarity(grad.flatten(), float32_grads[name].flatten(), dim=0)
        assert cosine > 0.99, name
    assert loss_and_grads(autocast=False)[0] == plain_loss
    assert outputs == [torch.float32] * model.config.n_layers
    compiled_loss, _ = loss_and_grads(run=torch.compile(model, backend="aot_eager"))
    assert compiled_loss == pytest.approx(loss, rel=1e-3)
    assert outputs == [torch.bfloat16] * model.config.n_layers


def test_several_tokens_after_the_prompt_are_refused_not_attended_without_the_cache():
    """The cache takes a whole prompt at start_pos 0, then one token at a time: a later step of several tokens
    would neither be stored nor see the cached keys (causal attention over itself alone), silently wrong."""
    torch.manual_seed(0)
    model = Gemma3(tiny()).eval()
    ids = torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(1, 32)
    with torch.no_grad():
        model.trunk(ids, cache, 0)
        with pytest.raises(ValueError, match="one token at a time"):
            model.trunk(ids[:, :3], cache, 8)


def test_an_unknown_reduction_is_refused_not_taken_as_the_mean():
    torch.manual_seed(0)
    model = Gemma3(tiny()).eval()
    ids = torch.randint(0, 500, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean = model(ids, ids)
        assert torch.allclose(model(ids, ids, reduction="none").mean(), mean, atol=1e-5)
        with pytest.raises(ValueError, match="reduction must be"):
            model(ids, ids, reduction="sum")


def test_a_state_with_an_unexpected_tensor_is_refused_not_half_loaded():
    config = tiny()
    torch.manual_seed(0)
    state = model_state(Gemma3(config))
    state["layers.0.self_attn.q_proj.bias"] = torch.zeros(64)  # a model with attention biases
    with pytest.raises(UserError, match=r"unexpected \['layers.0.self_attn.q_proj.bias'\]"):
        model_from_state(config, state)


def test_a_sliding_cache_shorter_than_the_window_takes_only_max_len_slots():
    config = tiny(sliding_window=16)
    with torch.device("meta"):
        model = Gemma3(config)
    cache = model.new_cache(batch_size=1, max_len=8, device=torch.device("cpu"))
    assert [c.k.shape[2] for c in cache] == [8] * config.n_layers
    assert [c.v.shape[2] for c in cache] == [8] * config.n_layers


def test_a_tied_head_saved_anyway_is_dropped_not_refused():
    config = tiny()
    torch.manual_seed(0)
    model = Gemma3(config).eval()
    state = dict(model.state_dict())  # state_dict() lists the tied head under lm_head.weight too
    assert "lm_head.weight" in state
    loaded = model_from_state(config, state).eval()
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("prompt", [4, 21])  # 21 = 16 + 5: past the window, the ring's slots start mid-way
def test_cached_decoding_gives_the_full_forwards_hidden_states(prompt):
    """A prompt prefilled into the cache, then one token at a time past the sliding window of 16: each step's
    hidden state is the full forward's at that position."""
    torch.manual_seed(0)
    model = Gemma3(tiny()).eval()
    ids = torch.randint(0, 500, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.trunk(ids)
        cache = model.new_cache(1, 32)
        steps = [model.trunk(ids[:, :prompt], cache, 0)[:, -1]]
        for pos in range(prompt, 30):
            steps.append(model.trunk(ids[:, pos : pos + 1], cache, pos)[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full[:, prompt - 1 :], atol=1e-4)


def test_decode_at_masks_in_every_slot_up_to_the_position():
    cache = KVCache(1, 4, 1, 2, torch.float32, "cpu")
    k = torch.ones(1, 1, 1, 2)
    for pos, expected in [(0, [1, 0, 0, 0]), (2, [1, 1, 1, 0]), (3, [1, 1, 1, 1]), (6, [1, 1, 1, 1])]:
        keys, _, mask = cache.decode_at(k * (pos + 1), k, torch.tensor(pos))
        assert mask.tolist() == [bool(e) for e in expected], pos
        assert keys[0, 0, pos % 4, 0].item() == pos + 1


def test_a_micro_batch_of_exactly_loss_full_logits_takes_the_full_head(monkeypatch):
    seen = []
    real = model_module.cross_entropy_from_hidden

    def spy(h, weight, targets, chunk_size, V):
        seen.append(chunk_size)
        return real(h, weight, targets, chunk_size, V)

    monkeypatch.setattr(model_module, "cross_entropy_from_hidden", spy)
    torch.manual_seed(0)
    model = Gemma3(tiny()).eval()
    ids = torch.randint(0, 500, (2, 8), generator=torch.Generator().manual_seed(1))
    model.loss_chunk_size = 4
    model.loss_full_logits = 2 * 8 * 500  # rows x padded vocabulary, exactly
    with torch.no_grad():
        model(ids, ids)
        model.loss_full_logits -= 1
        model(ids, ids)
    assert seen == [0, 4]


def test_a_tokenizer_that_fills_the_vocabulary_exactly_fits():
    tokenizer = load_tokenizer("gpt2")
    with torch.device("meta"):
        exact = Gemma3(tiny(vocab_size=tokenizer.model_vocab_size))
        short = Gemma3(tiny(vocab_size=tokenizer.model_vocab_size - 1))
    check_tokenizer_fits(tokenizer, exact)
    with pytest.raises(UserError, match="they do not belong together"):
        check_tokenizer_fits(tokenizer, short)


def test_model_state_of_a_tied_model_stores_the_head_once():
    torch.manual_seed(0)
    assert "lm_head.weight" not in model_state(Gemma3(tiny()))
    assert "lm_head.weight" in model_state(Gemma3(tiny(tie_embeddings=False)))


@pytest.mark.parametrize("case", ["float64", "padded"])
def test_a_state_loads_back_as_the_model_it_was(case):
    """A float64 state (numpy's default) loads in float32; a padded model's own state, already padded, is not
    padded again."""
    torch.manual_seed(0)
    config = tiny(vocab_pad_multiple=128) if case == "padded" else tiny()
    model = Gemma3(config).eval()
    state = model_state(model)
    if case == "float64":
        state = {k: v.double() for k, v in state.items()}
    loaded = model_from_state(config, state).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert loaded.embed_tokens.weight.shape[0] == (512 if case == "padded" else 500)
    ids = torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_the_cache_takes_the_models_dtype():
    model = Gemma3(tiny()).to(torch.bfloat16)
    assert {c.k.dtype for c in model.new_cache(1, 8)} == {torch.bfloat16}
    assert {c.v.dtype for c in model.new_cache(1, 8)} == {torch.bfloat16}
    assert {c.k.dtype for c in model.new_cache(1, 8, dtype=torch.float32)} == {torch.float32}


def test_an_integer_state_is_refused():
    torch.manual_seed(0)
    state = model_state(Gemma3(tiny()))
    state["norm.weight"] = state["norm.weight"].long()
    with pytest.raises(UserError, match="norm.weight is int64; the model takes float32, bfloat16 or float16"):
        model_from_state(tiny(), state)


def test_forward_refuses_what_is_not_a_batch_of_token_ids_in_one_line():
    """From Python, the usual mistakes failed deep in torch (float ids: the embedding's argument check; 1-D ids:
    IndexError: tuple index out of range; a list: AttributeError), and targets one shorter than the ids in a
    size mismatch inside the loss. Each is now a UserError naming the argument; int32 ids are ids."""
    model = Gemma3(small_config()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    for bad, got in [(ids.float(), "a 2-d torch.float32 tensor"), (ids[0], "a 1-d torch.int64 tensor"),
                     (ids.tolist(), "list"), (ids > 3, "a 2-d torch.bool tensor")]:
        with pytest.raises(UserError, match=rf"^input_ids must be a \[batch, tokens\] tensor of integer token ids, "
                                            rf"got {got}; one prompt is torch.tensor\(\[ids\]\)$"):
            model(bad)
    for bad, got in [(ids[:, 1:], "shape (2, 6)"), (ids[:1], "shape (1, 7)"), (ids.tolist(), "list")]:
        with pytest.raises(UserError, match=rf"^targets must be a tensor of input_ids' shape \(2, 7\), got "
                                            rf"{re.escape(got)}$"):
            model(ids, bad)
    with torch.no_grad():
        assert torch.equal(model(ids.int()), model(ids))
