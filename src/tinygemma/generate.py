"""Generation: sampling, the decoding loop with a KV cache, and text streamed as the tokens come.

`generate_stream` yields one token per sequence per step; it runs the steps through the decode plan
(decode.py) where one can be built (CPUs with oneDNN; on CUDA, replayed as a CUDA graph), else through the
model's own forward. `generate_text` turns that into text with a tokenizer, as `tinygemma generate` and
`tinygemma run` print it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tinygemma.config import check_sampling, check_stop, is_integer
from tinygemma.decode import GraphedStep, decode_plan
from tinygemma.devices import float64_on
from tinygemma.errors import LONE_SURROGATE, UserError
from tinygemma.model import Gemma3, check_token_ids, check_tokenizer_fits
from tinygemma.tokenizer import load_tokenizer

# ------------------------------------------------------------------ sampling


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top k, then outside the nucleus: the smallest set of most likely
    tokens whose probability reaches top_p (the token that crosses top_p is kept), then every logit whose
    probability is below min_p x the most likely token's (transformers' order and its min_p)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        # float32's running sum over 50k-262k tokens drifts by ~1e-5 and moves the nucleus' edge (MPS has no float64)
        probs = sorted_logits.to(torch.float64 if float64_on(logits.device) else torch.float32).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        outside = mass_before >= top_p
        outside[..., 0] = False  # the most likely token always stays (a top_p below float32's least rounds to 0)
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    if min_p:
        probs = logits.softmax(dim=-1)  # (the most likely token is never below min_p <= 1 times itself)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition_penalty (CTRL's): the logit of a token already in the row's text (`seen`, [B, V]
    booleans) divided by `penalty`, or multiplied where it is negative, so that it becomes less likely. Kept in
    the logits' range: a penalty far below 1 made an infinite logit, and inf - inf sampled id 0."""
    finfo = torch.finfo(logits.dtype)
    penalty = max(penalty, finfo.tiny)  # (one that rounds to 0 in the logits' dtype made 0 / 0 of a zero logit)
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty).clamp(-finfo.max, finfo.max),
                       logits)


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None,
                      generator: torch.Generator | list[torch.Generator] | None = None,
                      min_p: float | None = None) -> torch.Tensor:
    """One token id per row of `logits` [B, V]; temperature 0 is greedy. `generator` may be one per row: each row
    is then drawn from its own, so that a row's tokens do not depend on how many rows there are."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # The largest logit is 0 before the division: a tiny temperature sends the others to -inf, never inf - inf.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    logits = filter_logits(logits, top_k, top_p, min_p)
    probs = logits.softmax(dim=-1)
    # multinomial's own draw, without its checks of the probabilities: each a wait for the device on a GPU (twice
    # a token, or per row with a generator each). On other devices (MPS: memory shared with the host, and its own
    # multinomial), multinomial itself.
    return (draw_racing if probs.device.type in ("cpu", "cuda") else draw_multinomial)(probs, generator)


def draw_multinomial(probs: torch.Tensor, generator) -> torch.Tensor:
    """One token per row of `probs` [B, V], by torch.multinomial (a generator each, for a list of them)."""
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(row[None], 1, generator=g)[0] for row, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def draw_racing(probs: torch.Tensor, generator) -> torch.Tensor:
    """draw_multinomial's tokens for the same generators, as torch.multinomial draws one sample: the largest
    probs / q, for q exponential(1), which picks each token with its probability."""
    if isinstance(generator, list):
        q = torch.stack([torch.empty_like(row).exponential_(1, generator=g) for row, g in zip(probs, generator)])
    else:
        q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(dim=-1)


# ------------------------------------------------------------------ the generation loop

SYNC_EVERY = 8  # tokens that generate, and generate_text on a GPU, queue between waits for the device


@torch.no_grad()
def generate_stream(model: Gemma3, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                    generator: torch.Generator | list[torch.Generator] | None = None,
                    vocab_size: int | None = None, cuda_graph: bool = True,
                    repetition_penalty: float = 1.0, min_p: float | None = None,
                    sync_every: int | None = 1, context: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, [B], one step at a time, using a KV cache.

    Stops after `max_new_tokens`, or once every sequence has produced `eos_id` (a finished sequence keeps
    receiving `eos_id`). `temperature=0` is greedy; top_k, top_p and min_p filter as filter_logits;
    `repetition_penalty` (penalize_repeats) applies first, to the tokens of the prompt and of the text so far, as in
    transformers. `vocab_size` (the tokenizer's) keeps the tokens sampled below it, where the model has more ids
    than its tokenizer (model.vocab_size rounded up, say). On CUDA, outside autocast, the steps after the prompt
    replay one CUDA graph (`cuda_graph=False`: launched one kernel at a time).
    The host waits for the device only at every `sync_every`-th token (None: at none) and at the last. At a wait
    it refuses logits that were not finite at any step so far before every sequence had produced `eos_id`
    (UserError, before yielding that wait's token; its `step` is the first such step), and stops if every sequence
    has produced `eos_id` (a finished row yields `eos_id`: a consumer may get a few steps of `eos_id` in every
    row). The default 1 checks each token's logits before the draw: a consumer that reads each token waits for the
    device anyway. A larger one lets the host queue the steps while the device runs them (generate's, and
    generate_text's on a GPU); a consumer that reads the tokens only at the waits never reads one drawn from
    logits that were not finite. `context`: the most tokens the model reads at once (CachedReader's), None for
    all of them.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty=repetition_penalty, min_p=min_p)
    if not (sync_every is None or is_integer(sync_every) and sync_every >= 1):
        raise UserError(f"sync_every must be an integer >= 1 or None, got {sync_every!r}")
    input_ids, generator = checked_inputs(model, input_ids, eos_id, generator, vocab_size)
    B, T = input_ids.shape
    check_context(context)
    check_positions(model.config, T, max_new_tokens, context)
    vocab = model.config.vocab_size
    if max_new_tokens == 0:
        return
    # The cache holds the dtype that the model computes in (autocast's, if active).
    dtype = torch.get_autocast_dtype(input_ids.device.type) if torch.is_autocast_enabled(input_ids.device.type) else None
    reader = CachedReader(model, input_ids, max_new_tokens, dtype, cuda_graph, context)
    logits = reader.logits
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    seen = None  # the tokens of each row's text, for the repetition penalty
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=input_ids.device).scatter_(1, input_ids, True)
    # The first step whose logits were not finite (before every row had ended), -1 while none was
    first_bad = torch.full((), -1, dtype=torch.long, device=input_ids.device)
    for step in range(max_new_tokens):
        finite = torch.isfinite(logits)
        if sync_every == 1:
            if not bool(finite.all()):  # sampling would raise deep in torch, argmax print nonsense
                raise NonFiniteLogits(model, dtype, f"at new token {step + 1}")
        else:  # (what is drawn from them is discarded: zeroed, they draw uniformly, without NaN's errors)
            fine = finite.all() if eos_id is None else finite.all() | finished.all()  # (past every row's end: unread)
            first_bad = torch.where(fine | (first_bad >= 0), first_bad, step)
            logits = torch.where(finite, logits, 0.0)
        if seen is not None:
            logits = penalize_repeats(logits, seen, repetition_penalty)
        token = sample_next_token(logits[:, :vocab_size], temperature, top_k, top_p, generator, min_p)
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        if eos_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_id), token)
            finished |= token == eos_id
        stop = False
        if step == max_new_tokens - 1 or sync_every is not None and (step + 1) % sync_every == 0:  # the waits
            if sync_every != 1 and bool(first_bad >= 0):
                raise NonFiniteLogits(model, dtype, "while generating", step=int(first_bad))
            stop = step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all()))
        yield token
        if stop:
            return
        logits = reader.read(token)


def check_context(context) -> None:
    if not (context is None or is_integer(context) and context >= 1):
        raise UserError(f"context (the most tokens the model reads at once) must be an integer >= 1 or None (all), "
                        f"got {context!r}")


class CachedReader:
    """The model reading a batch's text through a KV cache: the prompt [B, T] first, then one new token a step;
    `logits` [B, vocab] (float32) are the last read token's. Each step runs through the decode plan where there is
    one (on CUDA, replayed as a CUDA graph), else the model's forward.

    `context` (None: every position): the most tokens the model reads at once, for a model trained on windows of
    that many (train.block_size) whose text runs past them: it reads positions it never trained on otherwise, and
    predicts there worse (BENCHMARKS.md, "Past the trained block"). The cache then holds `context` positions;
    once it is full, the text's last 3/4 of `context` tokens are read anew from position 0 (nanoGPT crops the
    text to its context and reads it anew at each token), so that each token is predicted from 3/4 to all of the
    `context` tokens before it. A prompt longer than `context` is read from its last `context` tokens."""

    def __init__(self, model: Gemma3, input_ids: torch.Tensor, max_new_tokens: int, dtype, cuda_graph: bool,
                 context: int | None):
        B, T = input_ids.shape
        self.model = model
        # (the last new token is read by none: the text's positions read are T + max_new_tokens - 1)
        self.context = context if context is not None and T + max_new_tokens - 1 > context else None
        slots = T + max_new_tokens if self.context is None else self.context
        self.cache = model.new_cache(B, slots, dtype=dtype)
        self.plan = decode_plan(model) if dtype is None else None
        self.graphed = None
        if self.plan is not None:
            self.rope = self.plan.rope_tables(model, slots)
            if cuda_graph and input_ids.device.type == "cuda" and max_new_tokens > 1:
                # before the prompt fills the cache (see there)
                self.graphed = graphed_step(self.plan, model, self.cache, B, self.rope)
        self.text = input_ids if self.context is None else input_ids[:, -self.context:]  # (kept only to read anew)
        self.pos = self.text.shape[1]  # the next token's position
        self.logits = last_logits(model, self.text, self.cache, 0)

    def read(self, token: torch.Tensor) -> torch.Tensor:
        """The logits after `token` [B], read at the next position (or with the text's last tokens, anew)."""
        if self.context is not None:
            self.text = torch.cat([self.text, token[:, None]], dim=1)
            if self.pos == self.context:  # the cache is full
                self.text = self.text[:, -(self.context - self.context // 4):]
                self.pos = self.text.shape[1]
                self.logits = last_logits(self.model, self.text, self.cache, 0)
                return self.logits
        pos, self.pos = self.pos, self.pos + 1
        if self.graphed is not None:
            self.logits = self.graphed(token[:, None], pos)
        elif self.plan is not None:
            self.logits = self.plan.step(self.model, token[:, None], self.cache, pos, self.rope)
        else:
            self.logits = last_logits(self.model, token[:, None], self.cache, pos)
        return self.logits


class NonFiniteLogits(UserError):
    """The model's logits hold NaN or inf (NaN weights, or float16's overflow): no token can be drawn from them."""

    def __init__(self, model: Gemma3, dtype: torch.dtype | None, when: str, step: int | None = None):
        self.step = step  # (sync_every > 1: the first step, from 0, whose logits were not finite)
        computes_in = dtype or model.embed_tokens.weight.dtype
        why = ("float16 overflowed; try --dtype bfloat16 or float32" if computes_in == torch.float16
               else "are its weights all finite?")
        super().__init__(f"the model's logits hold NaN or inf {when}: {why}")


def check_model(model) -> None:
    """The model generate and generate_text take: a tinygemma Gemma3 (not None, not another library's module)."""
    if not isinstance(model, Gemma3):
        compiled = " (torch.compile's wrapper: give its _orig_mod)" if isinstance(model, torch.nn.Module) and \
            isinstance(getattr(model, "_orig_mod", None), Gemma3) else ""
        raise UserError(f"model must be a tinygemma Gemma3 (tinygemma.load(PATH) gives one), got "
                        f"{type(model).__name__}{compiled}")


def checked_inputs(model: Gemma3, input_ids, eos_id, generator, vocab_size=None) -> tuple[torch.Tensor, object]:
    """generate_stream's prompt ids (as int64 on the model's device), eos_id, generator(s) and vocab_size, refused
    in one line where they cannot work."""
    check_model(model)
    check_token_ids(input_ids)
    # (torch.from_numpy of int32 ids, say), on the model's device: torch.tensor([ids]) is the host's
    input_ids = input_ids.to(model.embed_tokens.weight.device).long()
    if input_ids.shape[0] == 0:
        raise UserError("input_ids hold no prompt (a batch of 0 rows)")
    if input_ids.shape[1] == 0:
        raise UserError("the prompt must hold at least one token")
    vocab = model.config.vocab_size
    low, high = (int(v) for v in input_ids.aminmax())  # one wait for the device, before the first token
    if low < 0 or high >= vocab:
        raise UserError(f"input_ids hold id {low if low < 0 else high}, outside the model's {vocab:,} ids (0 to "
                        f"{vocab - 1:,}): were they made by another tokenizer?")
    if eos_id is not None and not (is_integer(eos_id) and 0 <= eos_id < vocab):
        raise UserError(f"eos_id must be one of the model's {vocab:,} token ids, got {eos_id!r}")
    if not (vocab_size is None or is_integer(vocab_size) and 1 <= vocab_size <= vocab):
        raise UserError(f"vocab_size (the tokenizer's) must be an integer from 1 to the model's {vocab:,}, or None; "
                        f"got {vocab_size!r}")
    if isinstance(generator, tuple):
        generator = list(generator)
    if not (generator is None or isinstance(generator, torch.Generator) or isinstance(generator, list) and all(
            isinstance(g, torch.Generator) for g in generator)):
        raise UserError(f"generator must be a torch.Generator, or a list of one per row of input_ids, got "
                        f"{generator!r}")
    if isinstance(generator, list) and len(generator) != len(input_ids):
        raise UserError(f"generator holds {len(generator)} generators for {len(input_ids)} sequences: give one per "
                        "row of input_ids, or a single one")
    return input_ids, generator


def graphed_step(plan, model: Gemma3, cache, batch_size: int, rope: dict) -> GraphedStep | None:
    """The decode step as a CUDA graph; None, said in one warning, where capturing it fails (an operation this
    PyTorch or driver cannot capture): decoding then launches the same step kernel by kernel, with the same
    tokens, only slower. The failed capture's run wrote only the cache slots that the prompt overwrites next."""
    try:
        return GraphedStep(plan, model, cache, batch_size, rope)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"decoding without a CUDA graph, kernel by kernel (slower, the same tokens): capturing the "
                      f"step failed: {first}", RuntimeWarning, stacklevel=3)
        return None


def last_logits(model: Gemma3, input_ids, cache, start_pos):
    """Logits of the last position only: the head runs on one position, not the whole prompt."""
    h = model.norm(model.trunk(input_ids, cache, start_pos)[:, -1])
    return model.lm_head(h)[..., : model.config.vocab_size].float()


@torch.no_grad()
def generate(model: Gemma3, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             generator: torch.Generator | list[torch.Generator] | None = None,
             cuda_graph: bool = True, repetition_penalty: float = 1.0, min_p: float | None = None,
             vocab_size: int | None = None, context: int | None = None) -> torch.Tensor:
    """The prompt [B, T] followed by up to `max_new_tokens` new tokens, as one [B, T + n] tensor on the model's
    device, n ending where the last sequence to produce `eos_id` produced it. With `eos_id`, the host waits for the
    device every SYNC_EVERY tokens, to learn whether every sequence has ended (without, only after the last): the
    steps run past that end are dropped, though a generator has drawn for them. Logits that are not finite are
    refused at the next wait. `vocab_size` (tokenizer.model_vocab_size) keeps the tokens sampled to those the
    tokenizer decodes, where the model has more ids (a model.vocab_size set above the data's). `context`: the
    most tokens the model reads at once (the block it trained on; None: all, as transformers' generate reads).
    The tokens are those of the model's layers, hooks and parametrizations included (decode.plan_sees_all); a
    hook on the Gemma3 itself is not called (the model's trunk, norm and head are read apart)."""
    every = SYNC_EVERY if eos_id is not None else None
    new = list(generate_stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_id, generator,
                               vocab_size=vocab_size, cuda_graph=cuda_graph, repetition_penalty=repetition_penalty,
                               min_p=min_p, sync_every=every, context=context))
    if eos_id is not None and new:  # steps made after every row had ended: all eos_id, left out
        ended = (torch.stack(new, dim=1) == eos_id).cummax(dim=1).values.all(dim=0)  # [n], False then True
        new = new[: len(new) - max(int(ended.sum()) - 1, 0)]
    prompt = input_ids.to(model.embed_tokens.weight.device).long()  # (uint16 ids do not promote)
    return torch.cat([prompt] + [t[:, None] for t in new], dim=1)


# ------------------------------------------------------------------ text


class TextStream:
    """Turns token ids, one at a time, into text that can be printed as it comes.

    A token may end in the middle of a multi-byte character (GPT-2's byte-level BPE splits emoji and accented
    letters), so text is released only once it decodes without a trailing U+FFFD replacement character; the
    rest waits for the next token. A byte-fallback tokenizer's <0xHH> pieces are decoded as a run, all of whose
    bytes become U+FFFD when the run is not UTF-8: text ending in such a run waits until a token of another kind
    ends it. A few tokens of context before the new ones are decoded with them, so that tokenizers whose
    decoding depends on the neighbours (SentencePiece's leading spaces) come out right. What is released is
    tokenizer.decode of all the ids, piece by piece. Decoding stays O(1) per token, not O(length).
    """

    def __init__(self, tokenizer, context: list[int] = (), context_tokens: int = 5):
        self.tokenizer = tokenizer
        self.ids = list(context)
        self.prefix_offset = max(0, len(self.ids) - context_tokens)  # start of the context decoded with new ids
        self.pieces = getattr(tokenizer, "byte_fallback_ids", frozenset())  # (a tokenizer-like object may lack it)
        while 0 < self.prefix_offset and {self.ids[self.prefix_offset - 1], self.ids[self.prefix_offset]} <= self.pieces:
            self.prefix_offset -= 1  # never inside a run of byte pieces, which decodes whole or as U+FFFD
        self.read_offset = len(self.ids)  # ids before this are already released

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete ("" while a character is unfinished)."""
        self.ids.append(int(token_id))
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is left at the end, unfinished characters included (as U+FFFD)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if len(self.ids) == self.read_offset:
            return ""
        if not final and self.ids[-1] in self.pieces:
            return ""  # a run of byte pieces, which a later one may still make invalid as a whole
        done = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if text.endswith("\ufffd") and not final:
            return ""
        # A decoder that rewrote text already released (none known when runs are waited for): the new part only
        new = text[len(done) :] if text.startswith(done) else text[len(os.path.commonprefix([done, text])) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new


class StopText:
    """Ends a text at the first of some stop strings met as text arrives piece by piece (several met by one piece:
    the one that starts first), as llama.cpp's server stops: with "abc" and "b", pieces "a", "b" end at "b".

    push(piece) gives the text that can be released now, and whether a stop string was met; the stop string and
    whatever follows it are never released. Text that may be the start of a stop string (the longest end of the
    text so far that begins one) is held back until the next piece says whether it is; flush() releases it at the
    end. A stop string can then only start inside what is held, so each piece is searched with the held text
    alone: O(held + piece) per token, not O(length).
    """

    def __init__(self, stops):
        self.stops = tuple(stops)
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        text = self.held + piece
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.held = ""
            return text[: min(found)], True
        keep = max((n for stop in self.stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                    if text.endswith(stop[:n])), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


def prompt_ids(config, tokenizer, prompt: str, max_new_tokens: int, context: int | None = None) -> list[int]:
    """The prompt's token ids, refused in one line when there are none or when they and `max_new_tokens` would
    pass the model's positions (check_positions; none is, read at most `context` at once)."""
    if prompt is not None and not isinstance(prompt, str):
        hint = ("for several prompts, call once per prompt" if isinstance(prompt, (list, tuple)) else
                "decode it first: prompt.decode('utf-8')" if isinstance(prompt, (bytes, bytearray)) else "give a str")
        raise UserError(f"the prompt must be text (a str), got {type(prompt).__name__}: {hint}")
    if not prompt:
        raise UserError("the prompt is empty; give some text to continue")
    if bad := LONE_SURROGATE.search(prompt):
        raise UserError(f"the prompt is not UTF-8 text: {bad.group()!r} at character {bad.start()} (a byte "
                        "that is not UTF-8 on the command line reads as \\udc80-\\udcff); give it in UTF-8")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError(f"the prompt {prompt!r} encodes to no tokens")
    ids = [*tokenizer.prompt_prefix, *ids]  # a Gemma tokenizer's <bos>, as transformers' tokenizer(prompt) adds it
    check_positions(config, len(ids), max_new_tokens, context)
    return ids


def check_positions(config, prompt_tokens: int, max_new_tokens: int, context: int | None = None) -> None:
    """Refuses a prompt and new tokens past the model's positions, which it never trained (transformers' generate
    runs on there without a word). The model reads the prompt and every new token but the last (which nothing
    follows): a prompt that fills the positions still gets one new token, as transformers' generate gives it.
    Read at most `context` tokens at once (CachedReader), within the positions, a text of any length passes none."""
    limit = config.max_position_embeddings
    if context is not None and context <= limit:
        return
    if prompt_tokens + max(max_new_tokens - 1, 0) > limit:
        fix = "shorten the prompt" if prompt_tokens >= limit else "ask for fewer new tokens"
        raise UserError(f"the prompt's {prompt_tokens} tokens plus {max_new_tokens} new ones need more than the "
                        f"model's {limit} positions (max_position_embeddings; the last new token takes none); {fix}")


# One batch of samples: each has its own generator and text stream, made before the batch's tensors, so that a
# count past memory was killed silently instead of refused.
MAX_SAMPLES = 1 << 16


def check_num_samples(num_samples, name: str) -> None:
    if not (is_integer(num_samples) and num_samples >= 1):
        raise UserError(f"{name} must be an integer >= 1, got {num_samples!r}")
    if num_samples > MAX_SAMPLES:
        raise UserError(f"{name} must be at most {MAX_SAMPLES:,} (one batch; call again for more), got "
                        f"{num_samples:,}")


def reads_every(device: torch.device) -> int:
    """How many tokens generate_text takes from the stream between reads of them: each on a CPU (whose steps do
    not run ahead of the host), SYNC_EVERY on a GPU (whose steps the host queues meanwhile)."""
    return 1 if device.type == "cpu" else SYNC_EVERY


def read_in_groups(stream: Iterator[torch.Tensor], every: int, read, finished: list[bool]) -> None:
    """Hand `read` the tokens of `stream` (made with sync_every=every) `every` steps at a time, as the stream has
    waited for the device, until every sample is `finished` (at end of text or a stop string: the rows the device
    still runs are never read). Logits that were not finite are refused only where a sample still running would
    read a token drawn from them: the steps before the first such step are read first, as a reading of each token
    reads them."""
    steps, done = [], 0
    try:
        for tokens in stream:
            steps.append(tokens)
            if len(steps) == every:
                read(steps)
                steps, done = [], done + every
                if all(finished):
                    return
    except NonFiniteLogits as e:
        if e.step is not None and e.step > done:
            read(steps[: e.step - done])
        if not all(finished):
            raise
        return
    if steps:
        read(steps)


@dataclass(frozen=True)
class Sample:
    """One continuation of a prompt: its text (without the prompt), the new tokens made for it (end of text, or
    the token that completed a stop text, included) and why it ended: "end_of_text", "stop" (one of the stop
    texts, left out of the text) or "length" (max_new_tokens made)."""
    text: str
    new_tokens: int
    finish_reason: str


def generate_samples(model: Gemma3, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     num_samples: int = 1, on_text=None, cuda_graph: bool = True,
                     repetition_penalty: float = 1.0, min_p: float | None = None,
                     stop: str | list[str] = (), context: int | None = None) -> list[Sample]:
    """The prompt's continuations, one `Sample` each, each ending at end of text, before the first of the `stop`
    strings (which is left out, as in llama.cpp's server and OpenAI's API) or after `max_new_tokens` tokens.
    `on_text(sample, text)` receives each piece of text as soon as it is complete (and known not to begin a stop
    string). Sample i is drawn from seed `seed + i`: it is the text a single sample with that seed gives, whatever
    `num_samples`, up to the rounding of a batched matrix product (a float32 logit may differ by about 1e-6 from
    one row's, flipping a near-tie). `cuda_graph`: as generate_stream's. The defaults sample the model's whole
    distribution (temperature 1, no filter), where `tinygemma generate` and a recipe's [generate] default to
    temperature 0.8 and top-k 200: **GenerateConfig().sampling() gives those. `context`: the most tokens the model
    reads at once (CachedReader's; `tinygemma generate` and train's samples give the block the model trained
    on), None for all of them.
    """
    check_num_samples(num_samples, "num_samples")
    stops = check_stop(stop)
    check_context(context)
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed, prompts=num_samples,
                   repetition_penalty=repetition_penalty, min_p=min_p)
    if isinstance(tokenizer, (str, os.PathLike)):  # a name or a tokenizer.json, as --tokenizer takes them
        tokenizer = load_tokenizer(tokenizer)
    if on_text is not None and not callable(on_text):
        raise UserError(f"on_text must be a function of (sample, text), got {on_text!r}")
    check_model(model)
    check_tokenizer_fits(tokenizer, model)
    ids = prompt_ids(model.config, tokenizer, prompt, max_new_tokens, context)
    device = model.embed_tokens.weight.device
    input_ids = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = [torch.Generator(device=device).manual_seed(int(seed) + i) for i in range(num_samples)]  # (numpy's)
    eot = tokenizer.eot_id
    streams = [TextStream(tokenizer, context=ids) for _ in range(num_samples)]
    stoppers = [StopText(stops) for _ in range(num_samples)]
    texts = [""] * num_samples
    finished = [False] * num_samples
    made = [0] * num_samples
    reasons = ["length"] * num_samples

    def emit(i: int, piece: str, last: bool = False) -> None:
        piece, finished[i] = stoppers[i].push(piece)
        if finished[i]:
            reasons[i] = "stop"
        elif last:
            piece += stoppers[i].flush()
            finished[i] = True
        if piece:
            texts[i] += piece
            if on_text is not None:
                on_text(i, piece)

    def read(steps: list[torch.Tensor]) -> None:
        for tokens in torch.stack(steps).tolist():
            for i, token in enumerate(tokens):
                if finished[i]:
                    continue
                made[i] += 1
                if token == eot:
                    reasons[i] = "end_of_text"
                    emit(i, streams[i].flush(), last=True)
                else:
                    emit(i, streams[i].push(token))

    every = reads_every(device)
    read_in_groups(generate_stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_id=eot,
                                   generator=generator, vocab_size=tokenizer.model_vocab_size, cuda_graph=cuda_graph,
                                   repetition_penalty=repetition_penalty, min_p=min_p, sync_every=every,
                                   context=context),
                   every, read, finished)
    for i in range(num_samples):
        if not finished[i]:
            emit(i, streams[i].flush(), last=True)
    return [Sample(text, n, reason) for text, n, reason in zip(texts, made, reasons)]


def generate_text(model: Gemma3, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  num_samples: int = 1, on_text=None, cuda_graph: bool = True,
                  repetition_penalty: float = 1.0, min_p: float | None = None,
                  stop: str | list[str] = (), context: int | None = None) -> tuple[list[str], int]:
    """The prompt's continuations (without the prompt), one per sample, and the number of new tokens made, all
    samples together: generate_samples' texts and new tokens (its docstring says how each ends and is drawn)."""
    samples = generate_samples(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                               num_samples, on_text, cuda_graph, repetition_penalty, min_p, stop, context)
    return [sample.text for sample in samples], sum(sample.new_tokens for sample in samples)
