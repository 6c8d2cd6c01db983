"""The model against transformers' Gemma3ForCausalLM: same logits, same greedy tokens, sliding layers included."""

import pytest
import torch

from tinygemma import Gemma3, ModelConfig
from tinygemma.checkpoint import to_transformers
from tinygemma.config import GLOBAL, SLIDING
from tinygemma.model import sliding_window_mask

transformers = pytest.importorskip("transformers")


def small_config(**overrides) -> ModelConfig:
    """Gemma 3's structure at test size: 6 layers (5 sliding, 1 global), window 16, MQA with 4 query heads."""
    base = dict(vocab_size=512, d_model=64, n_layers=6, n_heads=4, n_kv_heads=1, head_dim=32, mlp_dim=128,
                sliding_window=16, query_pre_attn_scalar=32.0, max_position_embeddings=512)
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


def test_greedy_generate_matches_transformers_and_no_cache_loop():
    config = small_config()
    model, hf = make_pair(config, seed=5)
    prompt = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    n_new = 4 * config.sliding_window  # well past the window, so the ring cache wraps around several times
    ours = model.generate(prompt, n_new, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new,
                         pad_token_id=0, eos_token_id=None)
    assert ours.shape == (2, 7 + n_new)
    assert torch.equal(ours, theirs)
    # The same tokens from a loop that recomputes the whole sequence without any cache.
    seq = prompt
    with torch.no_grad():
        for _ in range(n_new):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, seq)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "sliding_window": 8, "sliding_window_pattern": 3},
     {"n_heads": 2, "n_kv_heads": 2, "tie_embeddings": False}],
    ids=["mqa", "gqa", "mha-untied"],
)
def test_decode_plan_matches_transformers(overrides, monkeypatch):
    """The decode plan (stacked projections, one norm for q and k, float32 single-query attention) is the
    model's arithmetic: in float32 its greedy tokens are transformers' and the module path's, past the window,
    and each step's logits are the module path's."""
    from tinygemma import model as model_module

    config = small_config(**overrides)
    model, hf = make_pair(config, seed=9)
    real_plan = model_module.decode_plan
    monkeypatch.setattr(model_module, "decode_plan", lambda m: real_plan(m, pack=False))
    prompt = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    n_new = 3 * config.sliding_window
    ours = model.generate(prompt, n_new, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)

    plan = real_plan(model, pack=False)
    rope = plan.rope_tables(model, ours.shape[1])
    cache = model.new_cache(2, ours.shape[1])
    with torch.no_grad():
        model._last_logits(prompt, cache, 0)
        for pos in range(5, ours.shape[1]):
            logits = plan.step(model, ours[:, pos : pos + 1], cache, pos, rope)
            expected = model(ours[:, : pos + 1])[:, -1]
            assert (logits - expected).abs().max().item() <= 1e-4


def test_greedy_generate_is_the_same_with_and_without_a_decode_plan(monkeypatch):
    """Generation on this CPU in float32 runs a plan of oneDNN-packed weights (where oneDNN exists): the same
    tokens as the model's own forward; `test_greedy_generate_matches_transformers...` checks the default."""
    from tinygemma import model as model_module

    config = small_config()
    model, _ = make_pair(config, seed=10)
    prompt = torch.randint(0, config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(5))
    planned = model.generate(prompt, 2 * config.sliding_window, temperature=0)
    if model_module.decode_plan(model) is None:
        pytest.skip("no oneDNN on this CPU")
    monkeypatch.setattr(model_module, "decode_plan", lambda m: None)
    assert torch.equal(planned, model.generate(prompt, 2 * config.sliding_window, temperature=0))


def test_generate_with_prompt_longer_than_window():
    config = small_config()
    model, _ = make_pair(config, seed=6)
    prompt = torch.randint(0, config.vocab_size, (1, 3 * config.sliding_window + 5))
    out = model.generate(prompt, 20, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sliding_cache_memory_is_bounded():
    config = small_config()
    model = Gemma3(config)
    cache = model.new_cache(batch_size=1, max_len=10_000)
    for layer_cache, kind in zip(cache, config.layer_types):
        expected = config.sliding_window if kind == SLIDING else 10_000
        assert layer_cache.k.shape[2] == expected


def test_generate_stops_at_eos_and_is_seeded():
    config = small_config()
    model, _ = make_pair(config, seed=7)
    prompt = torch.randint(0, config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    greedy = model.generate(prompt, 10, temperature=0)
    eos = int(greedy[0, 5 + 3])  # the 4th new token: generation must stop right after producing it
    stopped = model.generate(prompt, 10, temperature=0, eos_id=eos)
    first = (greedy[0, 5:] == eos).nonzero()[0].item()
    assert torch.equal(stopped, greedy[:, : 5 + first + 1])
    a = model.generate(prompt, 15, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 15, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(1))
    c = model.generate(prompt, 15, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


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


def test_bfloat16_matches_transformers_in_bfloat16():
    config = small_config()
    model, hf = make_pair(config, seed=8)
    model, hf = model.to(torch.bfloat16), hf.to(torch.bfloat16)
    x = torch.randint(0, config.vocab_size, (2, 3 * config.sliding_window))
    with torch.no_grad():
        diff = (model(x).float() - hf(x).logits.float()).abs().max().item()
    assert diff <= 0.05  # the same bf16 roundings (embedding scale in bf16, float32 norms) up to kernel order


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
