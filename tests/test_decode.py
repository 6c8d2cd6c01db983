"""The decode plan computes what the model computes: against transformers, against the module path, in
float32 and packed bfloat16, and never from stale weights."""

import contextlib

import pytest
import torch

from tinygemma import generate as generate_module
from tinygemma.decode import decode_plan, forget_decode_plan
from tinygemma.generate import generate, last_logits
from tinygemma.model import KVCache

transformers = pytest.importorskip("transformers")

from test_generate import greedy_by_forward, tiny_model  # noqa: E402
from test_model import make_pair, small_config  # noqa: E402


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

    config = small_config(**overrides)
    model, hf = make_pair(config, seed=9)
    real_plan = generate_module.decode_plan
    monkeypatch.setattr(generate_module, "decode_plan", lambda m: real_plan(m, pack=False))
    prompt = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    n_new = 3 * config.sliding_window
    ours = generate(model, prompt, n_new, temperature=0)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)

    plan = real_plan(model, pack=False)
    rope = plan.rope_tables(model, ours.shape[1])
    cache = model.new_cache(2, ours.shape[1])
    with torch.no_grad():
        last_logits(model, prompt, cache, 0)
        for pos in range(5, ours.shape[1]):
            logits = plan.step(model, ours[:, pos : pos + 1], cache, pos, rope)
            expected = model(ours[:, : pos + 1])[:, -1]
            # (1e-6 apart in float32; a GELU without its tanh approximation is 1e-4 apart, with the same tokens)
            assert (logits - expected).abs().max().item() <= 1e-5


def test_greedy_generate_is_the_same_with_and_without_a_decode_plan(monkeypatch):
    """Generation on this CPU in float32 runs a plan of oneDNN-packed weights (where oneDNN exists): the same
    tokens as the model's own forward; `test_greedy_generate_matches_transformers...` checks the default."""

    config = small_config()
    model, _ = make_pair(config, seed=10)
    prompt = torch.randint(0, config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(5))
    planned = generate(model, prompt, 2 * config.sliding_window, temperature=0)
    if generate_module.decode_plan(model) is None:
        pytest.skip("no oneDNN on this CPU")
    monkeypatch.setattr(generate_module, "decode_plan", lambda m: None)
    assert torch.equal(planned, generate(model, prompt, 2 * config.sliding_window, temperature=0))


def test_packed_bfloat16_decoding_matches_the_plain_path(monkeypatch):
    """On CPUs with native bfloat16, decoding runs a plan of oneDNN-packed weights: the same tokens as the
    model's own forward in bfloat16, for a batch of several sequences."""

    model = tiny_model(seed=3, vocab_size=512).to(torch.bfloat16)
    if generate_module.decode_plan(model) is None:
        pytest.skip("no oneDNN bfloat16 on this CPU")
    prompt = torch.randint(0, 512, (3, 5), generator=torch.Generator().manual_seed(0))
    packed = generate(model, prompt, 24, temperature=0)
    monkeypatch.setattr(generate_module, "decode_plan", lambda model: None)
    plain = generate(model, prompt, 24, temperature=0)
    assert torch.equal(packed, plain)


def test_decode_plan_is_reused_but_never_stale():
    """The plan's copies of the weights outlive one generate call, and are made afresh once a weight changes
    in place (as an optimizer step changes it), a norm's included."""

    model = tiny_model(seed=4, vocab_size=512).to(torch.bfloat16)
    first = generate_module.decode_plan(model)
    if first is None:
        pytest.skip("no oneDNN bfloat16 on this CPU")
    assert generate_module.decode_plan(model) is first
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(0))
    before = generate(model, prompt, 12, temperature=0)
    with torch.no_grad():
        model.layers[0].post_feedforward_layernorm.weight.add_(0.5)
    assert generate_module.decode_plan(model) is not first
    with torch.no_grad():  # in place, same storage
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    after = generate(model, prompt, 12, temperature=0)
    assert not torch.equal(before, after)  # the new weights were used...
    forget_decode_plan(model)
    assert torch.equal(after, generate(model, prompt, 12, temperature=0))  # ...exactly as a fresh plan


def test_a_stale_plan_is_freed_before_its_replacement_is_built(monkeypatch):
    """A plan holds a copy of every linear weight (about 1 GB for 270M in float32): renewed after the weights
    changed, the stale one is let go first, so a renewal never holds two."""
    from tinygemma import decode

    model = tiny_model()
    decode.decode_plan(model, pack=False)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    held = []
    build = decode._build_plan
    monkeypatch.setattr(decode, "_build_plan", lambda m, pack: held.append(m in decode._PLANS) or build(m, pack))
    decode.decode_plan(model, pack=False)
    assert held == [False]


def test_a_plan_sees_writes_through_data_and_leaves_the_model_copyable():
    """Writes through .data (an EMA's p.data.mul_, a copy from another model) bump no version counter: the plan
    kept from before decoded with the old weights after a prefill with the new ones. The kept plan made the model
    impossible to deepcopy or torch.save (oneDNN's opaque tensors), and a model made under inference_mode (no
    version counters) could not generate at all."""
    import copy
    import io

    model, other = tiny_model(seed=4, vocab_size=512), tiny_model(seed=5, vocab_size=512)
    if generate_module.decode_plan(model) is None:
        pytest.skip("no oneDNN on this CPU")
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(0))
    generate(model, prompt, 12, temperature=0)  # a plan is kept
    copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    for p, q in zip(model.parameters(), other.parameters()):
        p.data.copy_(q.data)
    assert torch.equal(generate(model, prompt, 12, temperature=0), generate(other, prompt, 12, temperature=0))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # a probed value: a NaN equals itself, the plan is kept
    assert generate_module.decode_plan(model) is generate_module.decode_plan(model)
    with torch.inference_mode():
        frozen = tiny_model(seed=5, vocab_size=512)
        assert torch.equal(generate(frozen, prompt, 12, temperature=0), generate(other, prompt, 12, temperature=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_at_a_device_position_is_the_step_at_an_int_one(dtype):
    """The step a CUDA graph replays (GraphedStep) takes its position as a 0-d tensor, writes the cache through
    it and attends to every slot with the unwritten ones masked: the same logits and cache as the step at an int
    position, which attends only to the written slots (to rounding: softmax sums a longer row), past the sliding
    window's ring included."""
    config = small_config(n_heads=4, n_kv_heads=2, head_dim=16, sliding_window=8, sliding_window_pattern=3)
    model, _ = make_pair(config, seed=11)
    model = model.to(dtype)
    plan = generate_module.decode_plan(model, pack=False)
    tokens = torch.randint(0, config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(6))
    rope = plan.rope_tables(model, tokens.shape[1])
    caches = [model.new_cache(2, tokens.shape[1]) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            last_logits(model, tokens[:, :5], cache, 0)
        for pos in range(5, tokens.shape[1]):  # 3 rings of 8 slots
            at_int = plan.step(model, tokens[:, pos : pos + 1], caches[0], pos, rope)
            at_tensor = plan.step(model, tokens[:, pos : pos + 1], caches[1], torch.tensor(pos), rope)
            assert (at_int - at_tensor).abs().max().item() <= (1e-5 if dtype == torch.float32 else 0.05)
            assert torch.equal(at_int.argmax(-1), at_tensor.argmax(-1))
    for one, other in zip(*caches):  # (the first layer's exactly: the rest read attention's rounding)
        for a, b in ((one.k, other.k), (one.v, other.v)):
            assert (a.float() - b.float()).abs().max().item() <= (1e-5 if dtype == torch.float32 else 0.05)
    assert torch.equal(caches[0][0].k, caches[1][0].k) and torch.equal(caches[0][0].v, caches[1][0].v)


def test_a_kv_cache_written_at_a_device_position_masks_what_is_not_written_yet():
    cache = KVCache(1, 4, 1, 2, torch.float32, "cpu")
    for pos in range(6):
        new = torch.full((1, 1, 1, 2), float(pos))
        k, v, written = cache.decode_at(new, new + 100, torch.tensor(pos))
        assert k is cache.k and v is cache.v
        assert written.tolist() == [slot <= pos for slot in range(4)]  # a ring of 4: full from position 3
        assert cache.k[0, 0, pos % 4].tolist() == [pos, pos] and cache.v[0, 0, pos % 4].tolist() == [pos + 100] * 2
    assert cache.k[0, 0, :, 0].tolist() == [4, 5, 2, 3]  # positions 4 and 5 came round over 0 and 1


def test_generation_off_cuda_captures_no_cuda_graph(monkeypatch):
    from tinygemma import decode

    monkeypatch.setattr(generate_module, "GraphedStep", lambda *a: pytest.fail("a CUDA graph on a CPU"))
    model = tiny_model(seed=3, vocab_size=512)
    generate(model, torch.zeros(1, 3, dtype=torch.long), 4, temperature=0)
    # Off CUDA, a plan needs oneDNN: without it decoding runs the model's own forward (a CUDA model gets a plain
    # plan for its graph instead).
    monkeypatch.setattr(decode, "onednn_linear_available", lambda weight: False)
    decode.forget_decode_plan(model)
    assert decode.decode_plan(model) is None


def test_a_cuda_graph_that_cannot_be_captured_falls_back_to_the_steps_with_a_warning(monkeypatch):
    """Where capturing fails (an operation some PyTorch or driver cannot capture), decoding goes on kernel by
    kernel, the failure said in one warning, not a traceback."""
    from tinygemma import decode

    def cannot(*args):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(generate_module, "GraphedStep", cannot)
    model = tiny_model(seed=3, vocab_size=512)
    plan = decode.decode_plan(model, pack=False)
    with pytest.warns(RuntimeWarning, match="decoding without a CUDA graph.*operation not permitted when stream "
                      "is capturing$"):
        assert generate_module.graphed_step(plan, model, model.new_cache(1, 4), 1, {}) is None


def stand_in_cuda_graphs(monkeypatch, calls: list, capture_error: Exception | None = None) -> list:
    """torch.cuda's streams and graphs stood in for (no GPU here), each call recorded in `calls`; capture_end raises
    `capture_error` where one is given (CUDA's word for a broken capture). Returns the devices streams were made
    for."""
    streams = []

    class Stream:
        def __init__(self, device=None):
            streams.append(device)

        def wait_stream(self, other):
            calls.append("wait")

    class Graph:
        def capture_begin(self, capture_error_mode="global"):
            calls.append(f"begin ({capture_error_mode})")

        def capture_end(self):
            calls.append("end")
            if capture_error is not None:
                raise capture_error

        def replay(self):
            calls.append("replay")

    for name, stand_in in (("device", lambda d: contextlib.nullcontext()), ("Stream", Stream),
                           ("current_stream", Stream), ("stream", lambda s: contextlib.nullcontext()),
                           ("CUDAGraph", Graph), ("synchronize", lambda *a: calls.append("synchronize")),
                           ("empty_cache", lambda: calls.append("empty_cache"))):
        monkeypatch.setattr(torch.cuda, name, stand_in)
    return streams


def test_graphed_step_warms_up_then_captures_on_the_models_own_gpu_without_emptying_its_memory(monkeypatch):
    """GraphedStep's order of CUDA calls, with torch.cuda stood in for (no GPU here; tests/test_cuda.py replays a
    real graph): a side stream of the model's device, one warm-up run of the step there, the capture begun and
    ended on that stream, no device-wide synchronisation and no emptying of torch's memory cache (which
    torch.cuda.graph does at every call); then each call copies the token and position in and replays."""
    from tinygemma import decode

    calls = []
    streams = stand_in_cuda_graphs(monkeypatch, calls)
    model = tiny_model(seed=3, vocab_size=512)
    plan = decode.decode_plan(model, pack=False)
    real_step = plan.step
    monkeypatch.setattr(plan, "step", lambda *a: calls.append("step") or real_step(*a))
    cache = model.new_cache(2, 20)
    graphed = decode.GraphedStep(plan, model, cache, 2, plan.rope_tables(model, 20))
    assert calls == ["wait", "step", "begin (thread_local)", "step", "end", "wait"]
    assert set(streams) == {model.embed_tokens.weight.device}
    assert cache[0].k[:, :, 0].abs().sum() > 0  # the warm-up wrote position 0's slot: the prompt comes after
    calls.clear()
    logits = graphed(torch.tensor([[5], [7]]), 3)
    assert calls == ["replay"] and logits is graphed.logits
    assert graphed.token.tolist() == [[5], [7]] and graphed.pos.item() == 3


def test_a_write_through_data_to_half_of_a_weight_renews_the_plan():
    """The staleness probe samples across each weight, not its first value only: an EMA of half the rows through
    .data (no version counter sees it) renews the plan, which would otherwise decode with the old weights."""
    model = tiny_model(seed=4, vocab_size=512)
    plan = decode_plan(model, pack=False)
    assert decode_plan(model, pack=False) is plan
    weight = model.layers[0].mlp.down_proj.weight
    weight.data[weight.shape[0] // 2:] *= 2
    assert decode_plan(model, pack=False) is not plan


def test_an_in_place_write_the_probe_does_not_sample_renews_the_plan():
    """The plan is keyed on each parameter's version counter: an in-place write (a notebook's `w[i] += x`, an
    optimizer's, copy_) renews it even where it changes none of the sixteen values the probe samples."""
    model = tiny_model()
    weight = model.layers[0].self_attn.q_proj.weight
    assert weight.numel() // 16 > 1  # index 1 is not among the probe's values
    plan = decode_plan(model, pack=False)
    assert decode_plan(model, pack=False) is plan  # kept while nothing changed
    with torch.no_grad():
        weight.view(-1)[1] += 1.0
    renewed = decode_plan(model, pack=False)
    assert renewed is not plan
    q_rows = weight.shape[0]
    assert torch.equal(renewed.layers[0][1][:q_rows], weight)  # its stacked q, k, v weights are the new ones


def test_a_plain_plan_asked_for_after_a_packed_one_is_plain():
    # decode.py:187 key without `pack`: decode_plan(model, pack=False) after decode_plan(model) (oneDNN-packed)
    # handed back the packed plan, not the plain stacked weights the caller asked for
    import torch.nn.functional as F

    model = tiny_model(vocab_size=64)
    if decode_plan(model) is None:
        pytest.skip("no oneDNN here: no packed plan")
    assert decode_plan(model, pack=False).linear is F.linear
    forget_decode_plan(model)


def test_a_plan_step_gives_logits_of_the_vocabulary_not_of_its_padding():
    # decode.py:89 dropping `[..., : c.vocab_size]`: with a padded head (vocab 100 padded to 128) the step returned
    # [B, 128] logits, padding included, against the documented [B, vocab] of the model's own forward
    from tinygemma import Gemma3, ModelConfig

    torch.manual_seed(0)
    model = Gemma3(ModelConfig(vocab_size=100, vocab_pad_multiple=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                               head_dim=16, mlp_dim=64, sliding_window=8, query_pre_attn_scalar=16.0)).eval()
    assert model.config.padded_vocab_size == 128
    plan = decode_plan(model, pack=False)
    tokens = torch.tensor([[1, 2, 3, 4]])
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        full = model(tokens)[:, -1].float()
        for pos in range(4):
            logits = plan.step(model, tokens[:, pos : pos + 1], cache, pos, plan.rope_tables(model, 8))
    assert logits.shape == (1, 100)
    assert torch.allclose(logits, full, atol=1e-4)


def test_a_graphed_step_whose_capture_fails_ends_the_capture_and_raises(monkeypatch):
    """A step that fails during the capture: the capture is ended (else the side stream stays capturing and every
    later CUDA call on it fails), and the step's own error is raised, not capture_end's."""
    from tinygemma import decode

    calls = []
    stand_in_cuda_graphs(monkeypatch, calls, capture_error=RuntimeError("the capture is invalidated"))
    model = tiny_model(seed=3, vocab_size=512)
    plan = decode.decode_plan(model, pack=False)
    real_step = plan.step

    def step(*args):
        calls.append("step")
        if "begin (thread_local)" in calls:
            raise RuntimeError("operation not permitted when stream is capturing")
        return real_step(*args)

    monkeypatch.setattr(plan, "step", step)
    with pytest.raises(RuntimeError, match="operation not permitted"):
        decode.GraphedStep(plan, model, model.new_cache(1, 8), 1, plan.rope_tables(model, 8))
    assert calls == ["wait", "step", "begin (thread_local)", "step", "end"]


def test_a_plan_is_kept_for_a_model_with_parameters_of_fewer_than_sixteen_values():
    model = tiny_model(vocab_size=512, head_dim=8, n_heads=2, n_kv_heads=1, query_pre_attn_scalar=8.0)
    assert model.layers[0].self_attn.q_norm.weight.numel() < 16
    plan = decode_plan(model, pack=False)
    assert decode_plan(model, pack=False) is plan
    with torch.no_grad():
        model.layers[0].self_attn.q_norm.weight.data[3] += 1.0  # through .data: seen by the probe alone
    assert decode_plan(model, pack=False) is not plan


def test_onednn_packs_float32_on_a_cpu_and_bfloat16_only_where_the_cpu_computes_in_it(monkeypatch):
    from tinygemma import decode

    mkldnn = getattr(torch.ops, "mkldnn", None)
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise")):
        pytest.skip("no oneDNN in this torch")
    model = tiny_model(seed=1, vocab_size=512)
    assert decode.onednn_linear_available(model.lm_head.weight)
    plan = decode.decode_plan(model)
    assert plan is not None and plan.linear is decode.onednn_linear
    assert not decode.onednn_linear_available(torch.zeros(4, 4, dtype=torch.float16))
    monkeypatch.setattr(mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not decode.onednn_linear_available(torch.zeros(4, 4, dtype=torch.bfloat16))
    monkeypatch.setattr(mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert decode.onednn_linear_available(torch.zeros(4, 4, dtype=torch.bfloat16))
    decode.forget_decode_plan(model)


def steer(model):  # activation steering: a vector added to a block's output
    shift = torch.randn(model.config.d_model, generator=torch.Generator().manual_seed(1)) * 20
    return model.layers[0].register_forward_hook(lambda module, args, out: out + shift)


def scale_inputs(model):  # a pre-hook on a projection (as torch.nn.utils.prune adds one)
    return model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda module, args: (args[0].roll(1, -1),))


def prune(model):
    import torch.nn.utils.prune

    torch.nn.utils.prune.random_unstructured(model.layers[0].self_attn.v_proj, "weight", 0.9)


def weight_norm(model):  # a parametrization: its weight made from two others
    torch.nn.utils.parametrizations.weight_norm(model.layers[0].mlp.gate_proj)
    with torch.no_grad():
        model.layers[0].mlp.gate_proj.parametrizations.weight.original0.mul_(4)


def lora(model):  # a Linear replaced by a subclass that adds a low-rank update
    class LoRALinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + x @ self.a.T @ self.b.T

    old = model.layers[0].self_attn.q_proj
    new = LoRALinear(old.in_features, old.out_features, bias=False)
    new.weight = old.weight
    new.a = torch.nn.Parameter(torch.randn(4, old.in_features))
    new.b = torch.nn.Parameter(torch.randn(old.out_features, 4))
    model.layers[0].self_attn.q_proj = new


def bias(model):
    proj = model.layers[0].mlp.up_proj
    proj.bias = torch.nn.Parameter(torch.randn(proj.out_features) * 3)


def patched_forward(model):
    mlp = model.layers[1].mlp
    mlp.forward = lambda x, _forward=mlp.forward: _forward(x).roll(1, -1)


def global_hook(model):
    from tinygemma.model import Block

    return torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: out * 2 if isinstance(module, Block) else None)


@pytest.mark.parametrize("change", [steer, scale_inputs, prune, weight_norm, lora, bias, patched_forward,
                                    global_hook])
def test_decoding_follows_what_changes_the_layers_past_their_weights(change, monkeypatch):
    """The plan multiplies by its own copies of the weights and never calls the layers: a hook (activation
    steering, pruning's mask), a module replaced, a bias or a patched forward changed the first new token (read
    by the layers) but none after it. Decoding now runs the layers for such a model, and for a parametrized one
    (weight norm: its plan read the weight it makes, the same tokens; a parametrization's class is no Linear):
    its greedy tokens are those of the model's forward, token by token."""
    model = tiny_model(seed=3, vocab_size=512)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # confident predictions: a change shows in the tokens
    real_plan = generate_module.decode_plan
    monkeypatch.setattr(generate_module, "decode_plan", lambda m: real_plan(m, pack=False))  # any CPU
    prompt = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(2))
    assert real_plan(model, pack=False) is not None
    plain = generate(model, prompt, 16, temperature=0)
    handle = change(model)
    try:
        assert real_plan(model, pack=False) is None
        ids = greedy_by_forward(model, prompt, 16)
        assert not torch.equal(ids, plain)  # (the change changes the tokens)
        assert torch.equal(generate(model, prompt, 16, temperature=0), ids)
    finally:
        if handle is not None:
            handle.remove()
    if change in (steer, scale_inputs, global_hook):  # hooks gone: the plan again, and the plain tokens
        assert real_plan(model, pack=False) is not None
        assert torch.equal(generate(model, prompt, 16, temperature=0), plain)


def test_the_plan_decodes_a_model_compiled_or_recomputed_by_training_and_not_one_patched_otherwise():
    """Training's own wrappers set an instance's forward that computes the class's (compile in place, per layer
    or whole; activation checkpointing): the plan still decodes such a model (training's samples on a GPU). A hook
    on the Gemma3 itself is never called by generation: no reason to leave the plan either. A class patched after
    import, a trunk set on the instance, a norm's own eps: the plan would compute otherwise, so it does not."""
    from tinygemma import model as model_module
    from tinygemma.decode import plan_sees_all
    from tinygemma.parallelize import apply_activation_checkpointing, compile_in_place, compile_layers

    wrappers = [lambda m: apply_activation_checkpointing(m), lambda m: compile_layers(m.layers), compile_in_place]
    for wrap in [*([w] for w in wrappers), wrappers]:  # each alone, then all three
        model = tiny_model(seed=3, vocab_size=512)
        for w in wrap:
            w(model)
        assert plan_sees_all(model)
    handle = model.register_forward_hook(lambda module, args, out: out * 0)
    assert plan_sees_all(model)
    handle.remove()
    model.layers[0].mlp.forward = lambda x: x  # a patch of the user's
    assert not plan_sees_all(model)
    model = tiny_model(seed=3, vocab_size=512)
    model.layers[1].input_layernorm.eps = 0.5
    assert not plan_sees_all(model)
    model = tiny_model(seed=3, vocab_size=512)
    model.trunk = lambda *args, **kwargs: None
    assert not plan_sees_all(model)
    model = tiny_model(seed=3, vocab_size=512)
    original = model_module.MLP.forward
    try:
        model_module.MLP.forward = lambda self, x: original(self, x).roll(1, -1)
        assert not plan_sees_all(model)
    finally:
        model_module.MLP.forward = original
    assert plan_sees_all(model)
