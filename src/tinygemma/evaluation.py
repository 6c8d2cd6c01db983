"""Evaluation: next-token loss, perplexity and bits per byte, with one definition for training, `eval` and `run`."""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from tinygemma.config import is_integer
from tinygemma.data import to_device, windows
from tinygemma.devices import as_device, float64_on
from tinygemma.errors import UserError
from tinygemma.model import Gemma3
from tinygemma.runtime import Runtime, all_reduce_sum


def nats_and_bytes(nats: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor) -> torch.Tensor:
    """The four sums evaluation adds up, float64 (float32 on MPS, which has no float64: `sums_on` adds a batch's
    up on the host): nats of every prediction, predictions, nats of the predictions that stand for text, and the
    UTF-8 bytes those stand for (`token_bytes[id]`, 0 for end-of-text and other special tokens). Loss is the first
    over the second; bits per byte the third / ln 2 over the fourth (as nanochat), so models with different
    tokenizers compare. Training's evaluation uses it too."""
    dtype = torch.float64 if float64_on(nats.device) else torch.float32
    nats, nbytes = nats.reshape(-1).to(dtype), token_bytes[targets.reshape(-1)].to(dtype)
    # No boolean indexing and no number copied in: on a GPU either waits for the device (nonzero, a blocking copy)
    count = torch.full((), nats.numel(), dtype=nats.dtype, device=nats.device)
    return torch.stack([nats.sum(), count, torch.where(nbytes > 0, nats, 0.0).sum(), nbytes.sum()])


def sums_on(device: torch.device) -> torch.Tensor:
    """The float64 total of nats_and_bytes' sums: on `device`, so that adding a batch's makes the host wait for
    nothing; on the host for MPS, which has no float64 (there host and GPU share memory)."""
    return torch.zeros(4, dtype=torch.float64, device=device if float64_on(device) else "cpu")


def perplexity(loss: float) -> float:
    """exp(loss), and inf past float64's range (a diverged run's mean nats past 709.78; what JSON writes as null),
    not an OverflowError ending training at its evaluation, nor one number for every loss past it."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def perplexity_text(value: float) -> str:
    """A perplexity as a log line shows it: 2 decimals, or 3 figures past a million (not a diverged run's 300
    digits)."""
    return f"{value:.2f}" if value < 1e6 else f"{value:.3g}"


def summarize(sums: torch.Tensor) -> dict:
    nats, predicted, text_nats, nbytes = sums.tolist()
    loss = nats / predicted
    return {"loss": loss, "perplexity": perplexity(loss),
            "bits_per_byte": text_nats / math.log(2) / nbytes if nbytes else None,
            "tokens": int(predicted), "bytes": int(nbytes)}


def check_evaluation(block_size: int, batch_size: int, max_tokens: int | None, stride: int | None = None) -> None:
    if not (is_integer(block_size) and block_size >= 1):
        raise UserError(f"block_size must be an integer >= 1, got {block_size!r}")
    if stride is not None and not (is_integer(stride) and 1 <= stride <= block_size):
        raise UserError(f"stride must be an integer from 1 to block_size ({block_size}), got {stride!r}")
    if not (is_integer(batch_size) and batch_size >= 1):
        raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if max_tokens is not None and not (is_integer(max_tokens) and max_tokens >= 2):
        raise UserError(f"max_tokens must be an integer >= 2 (one to read, one to predict), got {max_tokens!r}")


@torch.no_grad()
def evaluate(model: Gemma3, tokens, block_size: int, batch_size: int = 8, max_tokens: int | None = None,
             device=None, token_bytes=None, progress: bool = False, stride: int | None = None) -> dict:
    """Loss, perplexity and bits per byte over `tokens` (a 1-D array of ids: a numpy memmap is read a batch at a
    time, so memory stays bounded) or over its first `max_tokens`.

    The tokens are cut into non-overlapping windows of `block_size` predictions: window w reads tokens
    [w*B, (w+1)*B) and predicts [w*B + 1, (w+1)*B + 1), so every token but the first is predicted exactly once,
    with between 0 and B-1 tokens of context; the last window may be shorter. With a `stride` S below B, the
    windows overlap (as transformers' perplexity guide does it): each reads the B tokens before its last prediction
    and scores only its last S (the first window all of its own), so every prediction but the first B has at
    least B - S tokens of context, for B / S times the work.

    `token_bytes` (tokenizer.token_byte_lengths) gives the UTF-8 bytes each id stands for; bits per byte is
    None without it. See `nats_and_bytes` for the definitions.
    """
    check_evaluation(block_size, batch_size, max_tokens, stride)
    if not isinstance(model, Gemma3):
        raise UserError(f"evaluate takes a Gemma3 (tinygemma.load(path) gives one), got a {type(model).__name__}")
    dimensions = tokens.ndim if hasattr(tokens, "ndim") else np.ndim(tokens)  # (a memmap is not read whole)
    if dimensions != 1:
        raise UserError(f"tokens must be a 1-D sequence of token ids, got {dimensions} dimensions")
    n = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))
    if n < 2:
        raise UserError(f"{n} tokens to evaluate: at least 2 are needed (one to read, one to predict)")
    device = as_device(device) if device is not None else model.embed_tokens.weight.device
    token_bytes = torch.zeros(model.config.vocab_size, dtype=torch.int64) if token_bytes is None else token_bytes
    token_bytes = torch.as_tensor(token_bytes).to(device)
    if token_bytes.dim() != 1 or len(token_bytes) < model.config.vocab_size:
        raise UserError(f"token_bytes must give the bytes of each of the model's {model.config.vocab_size:,} ids "
                        f"(token_byte_lengths(tokenizer, model.config.vocab_size)), got shape "
                        f"{tuple(token_bytes.shape)}")
    was_training = model.training
    model.eval()
    predicted = n - 1
    sums = sums_on(device)
    try:
        from tqdm import tqdm

        with tqdm(total=predicted, unit="tok", unit_scale=True, disable=not progress, file=sys.stderr) as bar:
            for starts, length, scored in window_batches(predicted, block_size, stride or block_size, batch_size):
                window = windows(tokens, starts, length, model.config.vocab_size)
                # asynchronous on CUDA only: MPS's copy may read the CPU memory once freed (pytorch#139550, #189690)
                window = window.to(device, non_blocking=device.type == "cuda")
                x, y = window[:, :-1], window[:, 1:]
                nats = model(x, y, reduction="none").reshape(len(starts), length)
                sums += nats_and_bytes(nats[:, length - scored :], y[:, length - scored :], token_bytes).to(sums.device)
                bar.update(len(starts) * scored)
    finally:
        model.train(was_training)
    return summarize(sums)


def window_batches(predicted: int, block_size: int, stride: int, batch_size: int):
    """(window starts, window length, predictions scored at each window's end) of `evaluate`'s batches: windows
    of at most block_size predictions whose ends advance by `stride` (the last one's to the last prediction),
    each scoring the predictions since the previous end (without overlap, stride = block_size, all of its own);
    windows alike in length and score go together."""
    windows, end = [], 0
    while end < predicted:
        new_end = min(end + (block_size if end == 0 else stride), predicted)
        start = end if stride == block_size else max(0, new_end - block_size)  # (the tail: short, or with context)
        windows.append((start, new_end - start, new_end - end))
        end = new_end
    i = 0
    while i < len(windows):
        _, length, scored = windows[i]
        j = i
        while j < len(windows) and j - i < batch_size and windows[j][1:] == (length, scored):
            j += 1
        yield [w[0] for w in windows[i:j]], length, scored
        i = j


# ------------------------------------------------------------------ training's validation windows


@torch.no_grad()
def evaluate_windows(raw: Gemma3, val: np.ndarray, starts: np.ndarray, token_bytes: torch.Tensor, batch_size: int,
                     block_size: int, rt: Runtime) -> dict:
    """Loss, perplexity and bits per byte on the fixed validation windows, split over the processes; the same
    definitions as `tinygemma eval` (nats_and_bytes). Training's evaluation."""
    raw.eval()
    sums = sums_on(rt.device)
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
    for batch in batches[rt.rank :: rt.world_size]:
        x, y = to_device(windows(val, batch, block_size, raw.config.vocab_size), rt)
        with rt.autocast():
            nats = raw(x, y, reduction="none")
        sums += nats_and_bytes(nats, y, token_bytes).to(sums.device)
    raw.train()
    if hasattr(raw, "reshard"):  # FSDP2's root keeps its parameters gathered after a forward with no backward
        raw.reshard()
    result = summarize(all_reduce_sum(sums, rt))
    return {"val_loss": result["loss"], "val_ppl": result["perplexity"],
            "val_bpb": result["bits_per_byte"] if result["bits_per_byte"] is not None else float("nan")}
