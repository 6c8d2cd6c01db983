"""The chunked cross-entropy equals F.cross_entropy on whole logits, in value and gradients, in every precision."""

import pytest
import torch
import torch.nn.functional as F
from test_model import tiny  # noqa: E402

from tinygemma import Gemma3
from tinygemma.loss import cross_entropy_from_hidden, token_cross_entropy


def logit_rows(monkeypatch) -> list:
    """The rows of each block of logits the loss computes (loss.masked_logits), in turn."""
    from tinygemma import loss as loss_module

    rows, real = [], loss_module.masked_logits
    monkeypatch.setattr(loss_module, "masked_logits", lambda h, w, v: rows.append(h.shape[0]) or real(h, w, v))
    return rows


@pytest.mark.parametrize("chunk_size", [64, 300, None], ids=["5-chunks", "one-exact-chunk", "unchunked"])
def test_chunked_loss_equals_plain_loss_and_gradients(chunk_size, monkeypatch):
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
    rows = logit_rows(monkeypatch)
    with torch.no_grad():  # evaluation takes the no-gradient chunked path: chunk_size rows of logits at a time
        assert abs(cross_entropy_from_hidden(h, w, targets, chunk_size).item() - plain.item()) < 1e-5
    assert sum(rows) == 300 and max(rows) == (chunk_size or 300)


@pytest.mark.parametrize("chunk_size", [None, 50])  # 50: 256 positions in 6 chunks, the last one short
def test_model_loss_and_gradients_equal_the_plain_cross_entropy(chunk_size, monkeypatch):
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
    rows = logit_rows(monkeypatch)
    with torch.no_grad():
        per_token = model(x[:, :-1], x[:, 1:], reduction="none")
    assert sum(rows) == 256 and max(rows) == (chunk_size or 256)  # 256 positions, chunk_size rows at a time
    with torch.no_grad():
        reference = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
    assert per_token.shape == (4, 64)
    assert torch.allclose(per_token, reference, atol=1e-5)


@pytest.mark.parametrize("backend,autocast", [("inductor", False), ("aot_eager", True)])
def test_compiled_chunked_loss_takes_the_fusible_form_with_the_same_result(backend, autocast, monkeypatch):
    """Under torch.compile each chunk takes loss._chunk_loss_fusible (elementwise expressions that inductor fuses,
    where eager mode takes the in-place form): the same loss and gradients as eager mode, vocabulary padding
    and ignored targets included; under bfloat16 autocast, the same bfloat16 roundings."""
    from tinygemma import loss as loss_module

    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 32, generator=g)
    w = torch.randn(768, 32, generator=g) * 0.2  # 700 ids, padded to 768 rows
    targets = torch.randint(0, 700, (300,), generator=g)
    targets[::7] = -100

    def loss_and_grads(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(hh, ww, targets)
        loss.backward()
        return loss.detach(), hh.grad, ww.grad

    def head(hh, ww, t):
        return cross_entropy_from_hidden(hh, ww, t, chunk_size=64, vocab_size=700)

    eager = loss_and_grads(head)

    def in_place(*args):
        raise AssertionError("the compiled graph took the in-place form")

    monkeypatch.setattr(loss_module, "_chunk_loss_in_place", in_place)
    compiled = loss_and_grads(torch.compile(head, backend=backend, fullgraph=True))
    tolerance = dict(rtol=1e-2, atol=1e-4) if autocast else dict(rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled, eager):
        assert torch.allclose(got, want, **tolerance), (got - want).abs().max()
    assert torch.allclose(eager[0], F.cross_entropy(h @ w[:700].t(), targets), rtol=1e-2 if autocast else 1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_inductor_writes_no_float32_logits_for_the_fusible_form(device, monkeypatch):
    """The point of the fusible form: compiled under bfloat16 autocast (the trainer on a GPU), inductor's code for
    the chunked head allocates no float32 [rows, vocabulary] buffer, where the in-place form's has three (its
    logits and softmax written out and read back). Read from the code inductor generates: C++ for a CPU, Triton
    kernels for a GPU."""
    import re

    from torch._inductor.utils import run_and_get_code

    from tinygemma import loss as loss_module

    g = torch.Generator().manual_seed(0)
    h = torch.randn(512, 64, generator=g).to(device).requires_grad_()
    w = (torch.randn(1024, 64, generator=g) * 0.1).to(device).requires_grad_()
    targets = torch.randint(0, 1000, (512,), generator=g).to(device)

    def float32_logit_buffers() -> int:
        torch._dynamo.reset()
        head = torch.compile(lambda h, w, t: cross_entropy_from_hidden(h, w, t, chunk_size=256, vocab_size=1000))

        def step():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = head(h, w, targets)
            loss.backward()

        _, code = run_and_get_code(step)
        return len(re.findall(r"empty_strided\w*\(\(256, 1024\), \(1024, 1\), torch\.float32", "\n".join(code)))

    assert float32_logit_buffers() == 0
    monkeypatch.setattr(loss_module, "_chunk_loss_fusible", loss_module._chunk_loss_in_place)
    assert float32_logit_buffers() >= 2  # the in-place form's: the check sees such buffers where they are


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


def fp16_gradients(h, weight, targets, chunk_size, scale=2.0**16):
    """d(loss)/dh and d(loss)/dW under float16 autocast, the loss scaled as GradScaler scales it, then unscaled."""
    h, weight = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = cross_entropy_from_hidden(h, weight, targets, chunk_size)
    (loss * scale).backward()
    return h.grad.float() / scale, weight.grad.float() / scale  # unscaled in float32, as GradScaler unscales


def test_chunked_loss_under_float16_autocast_gives_the_plain_gradients():
    """With GradScaler, float16 autocast scales the loss only in backward: gradients computed during the forward
    pass must not be rounded to float16 unscaled, where the softmax part (about 1 / vocabulary / tokens) falls
    below float16's smallest number. Both paths against the plain F.cross_entropy on whole logits."""
    torch.manual_seed(0)
    vocab, d, n = 50_257, 16, 256  # GPT-2's vocabulary: softmax terms near 1 / (50,257 x 256) = 8e-8
    h = torch.randn(n, d) * 0.5
    weight = torch.randn(vocab, d) * 0.02  # initialisation scale: near-uniform probabilities
    targets = torch.randint(0, vocab, (n,))
    plain_h, plain_w = fp16_gradients(h, weight, targets, chunk_size=0)
    grad_h, grad_w = fp16_gradients(h, weight, targets, chunk_size=100)
    # float16 noise is 3e-4 here; gradients rounded to float16 before scaling were 1e-2 (h) and 1.3e-3 (W) off
    assert (grad_h - plain_h).norm() / plain_h.norm() < 1e-3
    assert (grad_w - plain_w).norm() / plain_w.norm() < 1e-3


def test_chunked_loss_with_float16_weights_scales_before_it_rounds():
    """Under FSDP2 with float16 (two T4s) the hidden states and the head are float16 themselves: the gradients the
    chunked loss makes in its forward pass stay float32 until backward's scale reaches them, as the plain loss
    scales first, then rounds. Rounded unscaled, the non-target rows' (about p / tokens) fell to zero."""
    torch.manual_seed(0)
    vocab, d, n = 8192, 64, 2048  # softmax terms near 1 / (8,192 x 2,048) = 6e-8: float16's subnormal floor
    h = (torch.randn(n, d) * 0.5).half()
    weight = (torch.randn(vocab, d) * 0.02).half()
    targets = torch.randint(0, vocab, (n,))
    plain_h, plain_w = fp16_gradients(h, weight, targets, chunk_size=0)
    grad_h, grad_w = fp16_gradients(h, weight, targets, chunk_size=512)
    exact_h, exact_w = fp16_gradients(h.float(), weight.float(), targets, chunk_size=0)  # float32 inputs: the reference
    others = torch.ones(vocab, dtype=torch.bool)
    others[targets] = False  # rows no target names: only the softmax part, the smallest gradients
    for got in (plain_w, grad_w):  # both within float16's noise of the reference (rounded first: 3e-2 off)
        assert (got - exact_w)[others].norm() / exact_w[others].norm() < 3e-3
    assert (grad_h - exact_h).norm() / exact_h.norm() < 1e-3  # rounded first: 1.8e-3, and 295 of them zero
    assert not (grad_h == 0).any()
    assert (grad_w[others] == 0).sum() <= (plain_w[others] == 0).sum() + 8


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


def test_the_model_takes_the_plain_loss_up_to_its_bound_of_logits(monkeypatch):
    """model.loss_full_logits (train.loss_head): a micro-batch of at most that many logits (rows x padded
    vocabulary) takes the plain F.cross_entropy on whole logits, a larger one the chunked head; at the same
    weights and batch both give the same loss and gradients."""
    import tinygemma.model as model_module

    taken = []
    plain = model_module.cross_entropy_from_hidden
    monkeypatch.setattr(model_module, "cross_entropy_from_hidden",
                        lambda h, w, t, chunk_size, v: taken.append(chunk_size) or plain(h, w, t, chunk_size, v))
    torch.manual_seed(0)
    model = Gemma3(tiny())
    model.loss_chunk_size = 50
    x = torch.randint(0, 500, (4, 65))
    model.loss_full_logits = 2 * 64 * model.lm_head.weight.shape[0]  # two sequences' logits
    model(x[:2, :-1], x[:2, 1:])
    model(x[:3, :-1], x[:3, 1:])
    assert taken == [0, 50]
    results = []
    for bound in (0, 4 * 64 * 500):  # the four sequences chunked, then whole
        model.zero_grad()
        model.loss_full_logits = bound
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert taken[-2:] == [50, 0]
    (chunked, chunked_grads), (full, full_grads) = results
    assert abs(chunked - full) < 1e-5
    for name, grad in chunked_grads.items():
        assert torch.allclose(grad, full_grads[name], atol=1e-6), name


@pytest.mark.parametrize("chunk_size", [64, None])
def test_chunked_loss_of_large_logits_stays_finite(chunk_size):
    """Logits in the hundreds (float32's exp overflows past 88): the chunked loss and its gradients still equal
    F.cross_entropy's, as a max-subtracted softmax gives."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(300, 32, generator=g) * 40).requires_grad_()
    w = (torch.randn(700, 32, generator=g)).requires_grad_()
    targets = torch.randint(0, 700, (300,), generator=g)
    plain = F.cross_entropy(h @ w.t(), targets)
    plain.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    chunked = cross_entropy_from_hidden(h, w, targets, chunk_size=chunk_size)
    chunked.backward()
    assert torch.isfinite(chunked) and abs(chunked.item() - plain.item()) < 1e-3 * plain.item()
    assert torch.allclose(h.grad, grads[0], atol=1e-5) and torch.allclose(w.grad, grads[1], atol=1e-5)


@pytest.mark.parametrize("grad", [True, False], ids=["training", "no-grad"])
def test_a_batch_whose_targets_are_all_ignored_has_loss_zero_not_nan(grad):
    """Every target -100 (a micro-batch that a masked fine-tune leaves without a scored token): the chunked loss
    is 0 with zero gradients, never nan (a nan would poison the whole accumulated step)."""
    torch.manual_seed(0)
    model = Gemma3(tiny())
    x = torch.randint(0, 500, (2, 17))
    ignored = torch.full((2, 16), -100)
    with torch.set_grad_enabled(grad):
        loss = model(x[:, :-1], ignored)
    assert loss.item() == 0.0
    if grad:
        loss.backward()
        assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("target", [-1, -5, 100, 110, 10_000], ids=["nanogpt-ignore", "negative", "padding-row",
                                                                      "last-padding-row", "past-the-rows"])
def test_a_target_outside_the_ids_makes_the_chunked_loss_nan_not_another_ids_loss(target):
    """Only -100 is ignored. A -1 (nanoGPT's ignore index) was clamped to id 0 and trained toward it, silently; a
    padding row's id gave inf, and one past the head's rows an index error (on CUDA, a device-side assert). The
    chunked loss and its gradients are NaN for any of them, found on the device (F.cross_entropy raises, which
    waits for it); the same targets with that row -100 train as before."""
    torch.manual_seed(0)
    h = torch.randn(20, 16, requires_grad=True)
    w = torch.randn(112, 16, requires_grad=True)  # 100 ids, 12 padding rows
    targets = torch.randint(0, 100, (20,))
    fine = cross_entropy_from_hidden(h, w, torch.where(torch.arange(20) == 7, -100, targets), 8, vocab_size=100)
    assert torch.isfinite(fine)
    fine.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    h.grad = w.grad = None
    targets[7] = target
    loss = cross_entropy_from_hidden(h, w, targets, chunk_size=8, vocab_size=100)
    assert torch.isnan(loss)
    loss.backward()  # the gradients too: a step taken on them would train toward a clamped id
    assert torch.isnan(h.grad).all() and torch.isnan(w.grad).all()


def test_eager_mode_takes_the_in_place_chunk_loss(monkeypatch):
    """Outside torch.compile each chunk takes the in-place form (one [rows, vocab] tensor); the fusible form,
    meant for inductor, would make several [rows, vocab] float32 temporaries in eager mode."""
    from tinygemma import loss as loss_module

    def fusible(*args):
        raise AssertionError("eager mode took the fusible form")

    monkeypatch.setattr(loss_module, "_chunk_loss_fusible", fusible)
    h = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    cross_entropy_from_hidden(h, w, torch.randint(0, 100, (64,)), chunk_size=16).backward()


def test_a_last_chunk_of_one_row_is_counted():
    """Rows one more than a multiple of the chunk size: the last chunk holds a single row, whose loss and
    gradients count as the others'."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(129, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (129,), generator=g)
    F.cross_entropy(h @ w.t(), targets).backward()
    plain = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = cross_entropy_from_hidden(h, w, targets, chunk_size=64)
    loss.backward()
    assert abs(loss.item() - F.cross_entropy(h @ w.t(), targets).item()) < 1e-5
    assert torch.allclose(h.grad, plain[0], atol=1e-6) and torch.allclose(w.grad, plain[1], atol=1e-6)


def test_a_head_trained_alone_takes_the_chunked_loss():
    """Hidden states without gradient (a frozen body, a head trained alone) and a head that wants one: the chunked
    loss, which never keeps the [tokens, vocab] logits for backward, not the plain autograd path that keeps them."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 32, generator=g)  # no gradient wanted
    w = (torch.randn(700, 32, generator=g) * 0.2).requires_grad_()
    targets = torch.randint(0, 700, (300,), generator=g)
    F.cross_entropy(h @ w.t(), targets).backward()
    want, w.grad = w.grad.clone(), None
    loss = cross_entropy_from_hidden(h, w, targets, chunk_size=64)
    assert type(loss.grad_fn).__name__ == "_ChunkedLinearCrossEntropyBackward"
    loss.backward()
    assert torch.allclose(w.grad, want, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [64, None])
def test_a_batch_of_no_rows_has_loss_zero_and_zero_gradients(chunk_size):
    """No rows at all (an empty micro-batch): loss 0, and zero gradients of the head's shape, not a crash."""
    h = torch.zeros(0, 32, requires_grad=True)
    w = torch.randn(700, 32, requires_grad=True)
    loss = cross_entropy_from_hidden(h, w, torch.zeros(0, dtype=torch.long), chunk_size=chunk_size)
    loss.backward()
    assert loss.item() == 0.0
    assert w.grad.shape == w.shape and not w.grad.any() and h.grad.shape == (0, 32)


@pytest.mark.parametrize("chunk_size", [64, None, 0])
def test_padding_rows_of_the_head_get_no_probability_and_no_gradient(chunk_size):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(150, 16, generator=g, requires_grad=True)
    w = (torch.randn(768, 16, generator=g) * 0.5).requires_grad_()  # 700 ids, padded to 768 rows
    targets = torch.randint(0, 700, (150,), generator=g)
    targets[::7] = -100
    F.cross_entropy(h @ w[:700].t(), targets).backward()
    want_h, want_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = cross_entropy_from_hidden(h, w, targets, chunk_size=chunk_size, vocab_size=700)
    loss.backward()
    plain = F.cross_entropy(h @ w[:700].t(), targets).item()
    assert abs(loss.item() - plain) < 1e-5
    assert torch.allclose(h.grad, want_h, atol=1e-6) and torch.allclose(w.grad, want_w, atol=1e-6)
    assert not w.grad[700:].any()  # padding rows: no gradient
    with torch.no_grad():
        assert abs(cross_entropy_from_hidden(h, w, targets, chunk_size, 700).item() - plain) < 1e-5
        per_token = token_cross_entropy(h, w, targets, chunk_size, 700)
        reference = F.cross_entropy(h @ w[:700].t(), targets, reduction="none")
    assert torch.allclose(per_token, reference, atol=1e-5)


def test_bfloat16_hidden_states_and_head_without_autocast():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(96, 16, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(200, 16, generator=g) * 0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, 200, (96,), generator=g)
    loss = cross_entropy_from_hidden(h, w, targets, chunk_size=32)
    loss.backward()
    plain = F.cross_entropy((h.float() @ w.float().t()), targets)
    assert abs(loss.item() - plain.item()) < 2e-2
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    assert torch.isfinite(h.grad.float()).all() and torch.isfinite(w.grad.float()).all()
