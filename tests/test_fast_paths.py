"""The fast paths compute the same function as the plain ones: chunked loss, vocabulary padding, flex
attention, torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from tinygemma import Gemma3, ModelConfig
from tinygemma.checkpoint import model_from_state, model_state
from tinygemma.model import cross_entropy_from_hidden


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=500, d_model=64, n_layers=6, n_heads=4, n_kv_heads=1, head_dim=16, mlp_dim=128,
                sliding_window=16, query_pre_attn_scalar=16.0)
    return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize("chunk_size", [64, 300, None], ids=["5-chunks", "one-exact-chunk", "unchunked"])
def test_chunked_loss_equals_plain_loss_and_gradients(chunk_size):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 32, generator=g, requires_grad=True)
    w = (torch.randn(700, 32, generator=g) * 0.2).requires_grad_()
    targets = torch.randint(0, 700, (300,), generator=g)
    targets[::5] = -100  # ignored positions count neither in the sum nor in the mean
    plain = F.cross_entropy(h @ w.t(), targets, ignore_index=-100)
    plain.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    chunked = cross_entropy_from_hidden(h, w, targets, chunk_size=chunk_size)
    (chunked * 3).backward()  # backward scales by the incoming gradient
    assert abs(chunked.item() - plain.item()) < 1e-5
    assert torch.allclose(h.grad, 3 * grads[0], atol=1e-6)
    assert torch.allclose(w.grad, 3 * grads[1], atol=1e-6)
    with torch.no_grad():  # evaluation takes the no-gradient chunked path
        assert abs(cross_entropy_from_hidden(h, w, targets, chunk_size).item() - plain.item()) < 1e-5


@pytest.mark.parametrize("chunk_size", [None, 50])  # 50: 256 positions in 6 chunks, the last one short
def test_model_loss_and_gradients_equal_the_plain_cross_entropy(chunk_size):
    torch.manual_seed(0)
    model = Gemma3(tiny())
    x = torch.randint(0, 500, (4, 65))
    plain = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    plain.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.loss_chunk_size = chunk_size
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert abs(loss.item() - plain.item()) < 1e-5
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-6), name
    # Per-position nats (evaluation's reduction="none"), chunked, against the full logits.
    with torch.no_grad():
        per_token = model(x[:, :-1], x[:, 1:], reduction="none")
        reference = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
    assert per_token.shape == (4, 64)
    assert torch.allclose(per_token, reference, atol=1e-5)


def test_chunked_loss_under_bfloat16_autocast_keeps_float32_gradients():
    torch.manual_seed(0)
    model = Gemma3(tiny())
    model.loss_chunk_size = 40
    x = torch.randint(0, 500, (2, 65))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    model.loss_chunk_size = None
    reference = model(x[:, :-1], x[:, 1:])
    assert loss.dtype == torch.float32 and abs(loss.item() - reference.item()) < 0.05
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


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
        assert padded.generate(x[:, :5], 8, temperature=0).max() < 500
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


def test_chunked_loss_refuses_a_second_backward():
    """Its saved gradients are scaled in place, so a retained graph cannot be differentiated twice: it says so
    rather than doubling the gradients; chunk size 0 (the plain loss) allows it."""
    torch.manual_seed(0)
    model = Gemma3(tiny())
    x = torch.randint(0, 500, (2, 17))
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()
    model.loss_chunk_size = 0
    model.zero_grad()
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward(retain_graph=True)
    once = model.embed_tokens.weight.grad.clone()
    loss.backward()
    assert torch.allclose(model.embed_tokens.weight.grad, 2 * once)


def test_flex_attention_equals_reference_sliding_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    model = Gemma3(tiny(sliding_window=8)).eval()
    x = torch.randint(0, 500, (2, 40))  # 5 windows long, so the block mask really slides
    with torch.no_grad():
        reference = model(x)
        model.attention_backend = "flex"
        flex = model(x)
    assert (flex - reference).abs().max().item() < 1e-5


def test_compiled_model_agrees_without_graph_breaks():
    torch.manual_seed(0)
    model = Gemma3(tiny())
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
