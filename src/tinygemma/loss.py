"""The next-token loss from the final hidden states, computed a chunk of logits at a time.

A [tokens, vocabulary] float32 logit tensor is the largest thing a small model with a large vocabulary makes
(GPT-2's 50,257 ids x 32 x 512 tokens = 3.3 GB); these functions never hold it whole, and never keep it for
backward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

LOSS_CHUNK_SIZE = 8192  # rows of logits at a time: GPT-2's vocabulary x 8,192 x 4 bytes = 1.6 GB at most


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ W.T) against targets, computed `chunk_size` rows at a time.

    The gradients of h and W are made during the forward pass, while each chunk's logits are at hand, so the
    [tokens, vocab] float32 logits are never kept for backward, nor made whole when there are several
    chunks; backward only scales them. The softmax is computed in place of the logits (one exp pass, whose
    row sums also give the log-sum-exp), where F.cross_entropy's log_softmax, its backward and the one-hot
    gradient of nll_loss each pass over [tokens, vocab]. Same result as F.cross_entropy on full logits, up
    to float rounding.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, vocab_size):
        scored = targets != -100
        n_valid = scored.sum().clamp(min=1)
        grad_dtype = h.dtype if h.dtype == weight.dtype else torch.promote_types(h.dtype, weight.dtype)
        # Under float16 autocast the gradients made here are not yet scaled by GradScaler (the scale arrives in
        # backward): rounded to float16, the softmax part of d(loss)/d(logits), about 1 / vocabulary / tokens,
        # would flush to zero. Their products run outside autocast, in float32. bfloat16 has float32's range.
        device = h.device.type
        fp16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
        gradient_precision = torch.autocast(device, enabled=False) if fp16 else contextlib.nullcontext()
        if fp16:
            grad_dtype = torch.float32
        # d(loss)/d(logits) is cast once to what the products below take: under bfloat16 autocast each product
        # would cast it again, a pass over [rows, vocab] each.
        autocast_bf16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        dlogits_dtype = torch.bfloat16 if autocast_bf16 else grad_dtype
        # Kept in that precision until backward has scaled them: under FSDP2's float16 parameters h and W are
        # float16 themselves, and their unscaled gradients (about softmax / tokens) would round to zero there.
        grad_h = torch.empty_like(h, dtype=grad_dtype if fp16 else h.dtype)
        grad_w = None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        outside = (scored & ((targets < 0) | (targets >= vocab_size))).any()  # a target not an id met
        # The compiled form (below) in eager mode would make several [rows, vocab] temporaries; the in-place one
        # under torch.compile makes inductor write the float32 softmax out before its scatter and read it back.
        chunk_loss = _chunk_loss_fusible if torch.compiler.is_compiling() else _chunk_loss_in_place
        for start in range(0, h.shape[0], chunk_size):
            hc, tc = h[start : start + chunk_size], targets[start : start + chunk_size]
            valid = scored[start : start + chunk_size]
            share = valid / n_valid  # each valid row's share of the mean; 0 for ignored rows
            summed_loss, dlogits = chunk_loss(hc, weight, tc.clamp(0, vocab_size - 1), valid, share, vocab_size)
            loss += summed_loss
            dlogits = dlogits.to(dlogits_dtype)
            with gradient_precision:
                grad_h[start : start + chunk_size] = (dlogits @ weight.to(grad_dtype)).to(grad_h.dtype)
                chunk_grad_w = (dlogits.t() @ hc.to(grad_dtype)).float()
            grad_w = chunk_grad_w if grad_w is None else grad_w.add_(chunk_grad_w)
        if grad_w is None:  # no rows at all
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_h, grad_w if fp16 else grad_w.to(weight.dtype), outside)
        ctx.dtypes = h.dtype, weight.dtype  # what the gradients are returned in, once scaled
        ctx.backward_done = False
        # A target outside the ids (-1, nanoGPT's ignore index; a padding row's) makes the loss and the gradients
        # NaN (a scaler or a finite check then skips the step), not the clamped id's loss trained on:
        # F.cross_entropy raises, which would need the host to wait for the device here.
        return torch.where(outside, torch.nan, loss / n_valid)

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place: a fresh [vocab, d] tensor would cost more than the multiplication (on a CPU, the
        # page faults of 128 MB for GPT-2's vocabulary at d=640). So the saved gradients serve one backward.
        if ctx.backward_done:
            raise RuntimeError("the chunked cross-entropy supports one backward pass per forward "
                               "(set model.loss_chunk_size = 0 for the plain loss, which allows retain_graph)")
        ctx.backward_done = True
        grad_h, grad_w, outside = ctx.saved_tensors
        grad_loss = torch.where(outside, torch.nan, grad_loss)
        return (grad_h.mul_(grad_loss).to(ctx.dtypes[0]), grad_w.mul_(grad_loss).to(ctx.dtypes[1]),
                None, None, None)


def _chunk_loss_in_place(hc, weight, targets, valid, weight_per_row, vocab_size):
    """(the chunk's summed loss, d(mean loss)/d(logits) in float32): the softmax in place of the logits, one
    [rows, vocab] tensor; for eager mode."""
    logits = masked_logits(hc, weight, vocab_size)  # padding columns at -inf: no probability, no gradient
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    row_max = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(row_max).exp_()  # unnormalised softmax, in place of the logits
    sum_exp = probs.sum(dim=-1, keepdim=True)
    summed_loss = ((sum_exp.log() + row_max).squeeze(1) - target_logits).mul_(valid).sum()
    probs.mul_(weight_per_row[:, None] / sum_exp)  # d(mean loss) / d(logits) = softmax - one-hot ...
    probs[torch.arange(len(targets), device=targets.device), targets] -= weight_per_row  # ... times the share
    return summed_loss, probs


def _chunk_loss_fusible(hc, weight, targets, valid, weight_per_row, vocab_size):
    """What _chunk_loss_in_place computes, as pure elementwise expressions and reductions of the head's product,
    which inductor fuses: one kernel reads the product for the log-sum-exp, one reads it again and writes the
    gradient in the dtype the next products take (bfloat16 under autocast). Nothing [rows, vocab] in float32
    need be written to memory, where the in-place form's scatter makes inductor write the float32 softmax and
    read it back (at 65,536 rows of GPT-2's padded vocabulary, 13 GB each way)."""
    product = hc @ weight.t()
    columns = torch.arange(product.shape[1], device=product.device)
    logits = product.float().masked_fill(columns >= vocab_size, float("-inf"))
    log_sum_exp = torch.logsumexp(logits, dim=-1)
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    summed_loss = ((log_sum_exp - target_logits) * valid).sum()
    one_hot = columns == targets[:, None]
    dlogits = ((logits - log_sum_exp[:, None]).exp() - one_hot.float()) * weight_per_row[:, None]
    return summed_loss, dlogits


def cross_entropy_from_hidden(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk_size: int | None, vocab_size: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of the head `weight` [V, d] applied to h [N, d]; targets -100 are ignored.
    Rows of `weight` from `vocab_size` on are vocabulary padding: they take part in the matrix product (whose
    shape they are there for) but get no probability and no gradient. Any other target outside [0, vocab_size)
    is an error: F.cross_entropy's (or an infinite loss, for a padding row's) without gradients and with
    `chunk_size=0`, a NaN loss from the chunked one (found on the device, without the host waiting for it).

    When gradients are wanted, _ChunkedLinearCrossEntropy computes it `chunk_size` rows of logits at a time
    (None or 0: all rows in one chunk); `chunk_size=0` is the plain F.cross_entropy on whole logits, which
    autograd differentiates (slower; for checks and for retain_graph). Without gradients, the per-row losses
    are summed, chunk by chunk.
    """
    vocab_size = vocab_size or weight.shape[0]
    if chunk_size == 0:
        return F.cross_entropy(masked_logits(h, weight, vocab_size), targets, ignore_index=-100)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(h, weight, targets, chunk_size or max(h.shape[0], 1), vocab_size)
    return (token_cross_entropy(h, weight, targets, chunk_size, vocab_size).sum()
            / (targets != -100).sum().clamp(min=1))


def masked_logits(h: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Float32 logits h @ weight.T with the padding columns (from `vocab_size` on) at -inf."""
    logits = (h @ weight.t()).float()
    logits[:, vocab_size:] = float("-inf")  # in place: the product's backward needs h and weight, not this
    return logits


def token_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk_size: int | None, vocab_size: int | None = None) -> torch.Tensor:
    """Each row's cross-entropy in nats (0 where the target is -100), `chunk_size` rows of logits at a time."""
    chunk_size, vocab_size = chunk_size or max(h.shape[0], 1), vocab_size or weight.shape[0]
    return torch.cat([F.cross_entropy(masked_logits(h[i : i + chunk_size], weight, vocab_size),
                                      targets[i : i + chunk_size], ignore_index=-100, reduction="none")
                      for i in range(0, h.shape[0], chunk_size)])
