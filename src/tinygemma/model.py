"""Gemma 3's text model, written from scratch, reading top to bottom in the order data flows through it.

Every parameter name matches transformers' Gemma3ForCausalLM once `model.` is put in front (see
`checkpoint.HF_NAME_MAP`), and every numerical detail that could change a logit matches it too; the comments
say "as transformers" where a line exists only for that.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygemma.config import GLOBAL, SLIDING, ModelConfig
from tinygemma.errors import UserError

try:  # flex attention: sliding-window layers that do work proportional to the window (torch >= 2.5)
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover
    BlockMask = create_block_mask = flex_attention = None
_compiled_flex_attention = None


def _flex_attention(q, k, v, block_mask, scale, enable_gqa):
    """flex_attention through torch.compile on GPUs, where it makes a fused kernel. Elsewhere (CPU: forward
    only, in torch 2.13) the uncompiled reference implementation, which serves to check the block mask."""
    global _compiled_flex_attention
    if q.device.type != "cuda":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 with a (1 + w) gain whose w starts at zero, as Gemma."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, 1.0 + self.weight.float(), self.eps)


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * gain in float32, cast back to x's dtype; `gain` is the float32 (1 + w), as transformers."""
    out = x.float()
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
    return (out * gain).type_as(x)


def rope_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin of shape [T, head_dim] for the given positions (float32 angles, as transformers)."""
    freqs = positions[:, None].float() * inv_freq[None, :].float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (the "rotate_half" convention of transformers' Gemma)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def sliding_window_mask(q_len: int, kv_len: int, window: int, device) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask, True where key j is visible from query i: i - window < j <= i.

    Queries are the last q_len of the kv_len positions.
    """
    i = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


class KVCache:
    """Keys and values of one layer for generation.

    A global layer keeps every position; a sliding-window layer keeps a ring of `sliding_window` slots, so its
    memory stays bounded however long the text gets. Keys are stored after RoPE, so the order of the slots in the
    ring does not matter to attention; only which positions are in it.
    """

    def __init__(self, batch_size: int, size: int, n_kv_heads: int, head_dim: int, dtype, device):
        self.size = size
        self.k = torch.zeros(batch_size, n_kv_heads, size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store positions 0..T-1 (only the last `size` of them if T > size)."""
        T = k.shape[2]
        if T <= self.size:
            self.k[:, :, :T] = k
            self.v[:, :, :T] = v
        else:
            slots = torch.arange(T - self.size, T, device=k.device) % self.size
            self.k.index_copy_(2, slots, k[:, :, -self.size:])
            self.v.index_copy_(2, slots, v[:, :, -self.size:])

    def decode(self, k: torch.Tensor, v: torch.Tensor, pos: int):
        """Store the one new position `pos`; return the keys and values it attends to."""
        slot = pos % self.size
        self.k[:, :, slot : slot + 1] = k
        self.v[:, :, slot : slot + 1] = v
        n = min(pos + 1, self.size)
        return self.k[:, :, :n], self.v[:, :, :n]


class Attention(nn.Module):
    """Multi-query attention (n_kv_heads=1) with QK-norm and RoPE; sliding-window or global."""

    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.is_sliding = layer_type == SLIDING
        self.sliding_window = config.sliding_window if self.is_sliding else None
        self.scale = config.query_pre_attn_scalar**-0.5
        d, hd = config.d_model, config.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, start_pos: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        is_causal = mask is None
        if cache is not None:
            if start_pos == 0:
                cache.prefill(k, v)  # the prompt attends to itself, masked as in training
            elif T == 1:
                k, v = cache.decode(k, v, start_pos)  # one new token sees every cached key: no mask at all
                is_causal = False
            else:
                raise ValueError("the KV cache takes a whole prompt at start_pos=0, then one token at a time")

        # One K/V head serves all query heads without being copied (enable_gqa), where the kernel allows it.
        gqa = self.n_kv_heads != self.n_heads
        if BlockMask is not None and isinstance(mask, BlockMask):
            y = _flex_attention(q, k, v, mask, self.scale, gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                                               enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.mlp_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.mlp_dim, bias=False)
        self.down_proj = nn.Linear(config.mlp_dim, config.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    """A decoder layer: RMSNorm before and after both attention and the MLP (Gemma's "sandwich" norms)."""

    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_type)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(config.d_model, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, start_pos=0):
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start_pos)
        )
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


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
        n_valid = (targets != -100).sum().clamp(min=1)
        grad_dtype = h.dtype if h.dtype == weight.dtype else torch.promote_types(h.dtype, weight.dtype)
        grad_h = torch.empty_like(h)
        grad_w = None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            hc, tc = h[start : start + chunk_size], targets[start : start + chunk_size]
            logits = masked_logits(hc, weight, vocab_size)  # padding columns at -inf: no probability, no gradient
            valid = tc != -100
            safe_t = tc.clamp(min=0)
            target_logits = logits.gather(1, safe_t[:, None]).squeeze(1)
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # unnormalised softmax, in place of the logits
            sum_exp = probs.sum(dim=-1, keepdim=True)
            loss += ((sum_exp.log() + row_max).squeeze(1) - target_logits).mul_(valid).sum()
            weight_per_row = valid / n_valid  # each valid row's share of the mean; 0 for ignored rows
            probs.mul_(weight_per_row[:, None] / sum_exp)  # d(mean loss) / d(logits) = softmax - one-hot ...
            probs[torch.arange(len(tc), device=tc.device), safe_t] -= weight_per_row  # ... times the share
            dlogits = probs.to(grad_dtype)
            grad_h[start : start + chunk_size] = (dlogits @ weight.to(grad_dtype)).to(h.dtype)
            chunk_grad_w = (dlogits.t() @ hc.to(grad_dtype)).float()
            grad_w = chunk_grad_w if grad_w is None else grad_w.add_(chunk_grad_w)
        if grad_w is None:  # no rows at all
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ctx.backward_done = False
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place: a fresh [vocab, d] tensor would cost more than the multiplication (on a CPU, the
        # page faults of 128 MB for GPT-2's vocabulary at d=640). So the saved gradients serve one backward.
        if ctx.backward_done:
            raise RuntimeError("the chunked cross-entropy supports one backward pass per forward "
                               "(set model.loss_chunk_size = 0 for the plain loss, which allows retain_graph)")
        ctx.backward_done = True
        grad_h, grad_w = ctx.saved_tensors
        return grad_h.mul_(grad_loss), grad_w.mul_(grad_loss), None, None, None


def cross_entropy_from_hidden(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk_size: int | None, vocab_size: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of the head `weight` [V, d] applied to h [N, d]; targets -100 are ignored.
    Rows of `weight` from `vocab_size` on are vocabulary padding: they take part in the matrix product (whose
    shape they are there for) but get no probability and no gradient.

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


class Gemma3(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        self.embed_tokens = nn.Embedding(V, config.d_model)
        self.layers = nn.ModuleList(Block(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.d_model, V, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_buffers()
        self.apply(self._init_weights)
        # Rows of logits made at once by the loss (None: all at once; 0: the plain F.cross_entropy, which
        # autograd differentiates). Not architecture: a memory/speed knob (see cross_entropy_from_hidden).
        self.loss_chunk_size: int | None = 8192
        # "sdpa" (a boolean mask for sliding layers longer than the window) or "flex" (flex_attention with a
        # block mask: work proportional to the window; for GPUs). Either computes the same function.
        self.attention_backend = "sdpa"
        self._block_masks: dict = {}

    def reset_buffers(self, device=None):
        """(Re)compute the constant buffers, e.g. after building the model on the meta device."""
        c, device = self.config, device or self.embed_tokens.weight.device
        if device.type == "meta":
            device = None
        # sqrt(d_model) as a tensor, so that it is rounded to the weights' dtype before multiplying (as transformers).
        self.register_buffer("embed_scale", torch.tensor(c.d_model**0.5, device=device), persistent=False)
        self.register_buffer("inv_freq_local", rope_inv_freq(c.head_dim, c.rope_local_base).to(device), persistent=False)
        self.register_buffer("inv_freq_global", rope_inv_freq(c.head_dim, c.rope_global_base).to(device), persistent=False)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        elif isinstance(module, RMSNorm):
            nn.init.zeros_(module.weight)

    def num_params(self, embeddings: bool = True) -> int:
        """Distinct parameters (a tied head counts once); without embeddings, the token embedding is left out."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """Logits [B, T, vocab_size], or with `targets` [B, T] the mean next-token cross-entropy (targets equal
        to -100 are ignored), or with reduction="none" each position's cross-entropy in nats, [B, T].
        """
        h = self.norm(self.trunk(input_ids))
        if targets is None:
            return self.lm_head(h)[..., : self.config.vocab_size]
        # The whole (padded) head in the product; vocabulary padding never takes probability mass.
        weight, V = self.lm_head.weight, self.config.vocab_size
        flat_h, flat_targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
        if reduction == "none":
            return token_cross_entropy(flat_h, weight, flat_targets, self.loss_chunk_size, V).view_as(targets)
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")
        return cross_entropy_from_hidden(flat_h, weight, flat_targets, self.loss_chunk_size, V)

    def trunk(self, input_ids: torch.Tensor, cache: list[KVCache] | None = None, start_pos: int = 0):
        """Embedding and decoder layers: the hidden states [B, T, d_model] before the final norm.

        With `cache`, positions start at `start_pos` (see `generate_stream`).
        """
        T = input_ids.shape[1]
        h = self.embed_tokens(input_ids)
        h = h * self.embed_scale.to(h.dtype)
        positions = torch.arange(start_pos, start_pos + T, device=input_ids.device)
        rope = {
            SLIDING: rope_cos_sin(self.inv_freq_local, positions, h.dtype),
            GLOBAL: rope_cos_sin(self.inv_freq_global, positions, h.dtype),
        }
        # Masks, built once per forward and shared by the layers of each kind. None means plain causal:
        # a window at least as long as the sequence is the causal mask itself, the common case in training.
        masks = {SLIDING: None, GLOBAL: None}
        if T > self.config.sliding_window:
            if self.attention_backend == "flex" and cache is None:
                masks[SLIDING] = self.sliding_block_mask(T, input_ids.device)
            else:
                masks[SLIDING] = sliding_window_mask(T, T, self.config.sliding_window, input_ids.device)
        for i, layer in enumerate(self.layers):
            kind = self.config.layer_types[i]
            h = layer(h, *rope[kind], masks[kind], None if cache is None else cache[i], start_pos)
        return h

    def sliding_block_mask(self, T: int, device):
        """flex_attention's block mask for Gemma 3's sliding window (i - window < j <= i), built once per length."""
        key = (T, str(device))
        if key not in self._block_masks:
            if create_block_mask is None:
                raise UserError("attention_backend 'flex' needs torch >= 2.5 (torch.nn.attention.flex_attention)")
            window = self.config.sliding_window

            def sliding(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

            self._block_masks[key] = create_block_mask(sliding, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
        return self._block_masks[key]

    # ------------------------------------------------------------------ generation

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> list[KVCache]:
        """One KVCache per layer: `max_len` slots for global layers, `sliding_window` for sliding ones."""
        c = self.config
        dtype = dtype or self.embed_tokens.weight.dtype
        device = device or self.embed_tokens.weight.device
        return [
            KVCache(batch_size, min(max_len, c.sliding_window) if t == SLIDING else max_len,
                    c.n_kv_heads, c.head_dim, dtype, device)
            for t in c.layer_types
        ]

    @torch.no_grad()
    def generate_stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                        generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every sequence, [B], one step at a time, using a KV cache.

        Stops after `max_new_tokens`, or once every sequence has produced `eos_id` (a finished sequence keeps
        receiving `eos_id`). `temperature=0` is greedy.
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        B, T = input_ids.shape
        if T == 0:
            raise UserError("the prompt must hold at least one token")
        if max_new_tokens == 0:
            return
        # The cache holds the dtype that the model computes in (autocast's, if active).
        dtype = torch.get_autocast_dtype(input_ids.device.type) if torch.is_autocast_enabled(input_ids.device.type) else None
        cache = self.new_cache(B, T + max_new_tokens, dtype=dtype)
        plan = decode_plan(self) if dtype is None else None
        if plan is not None:
            rope = plan.rope_tables(self, T + max_new_tokens)
        logits = self._last_logits(input_ids, cache, 0)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_id), token)
                finished |= token == eos_id
            yield token
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                return
            if plan is None:
                logits = self._last_logits(token[:, None], cache, T + step)
            else:
                logits = plan.step(self, token[:, None], cache, T + step, rope)

    def _last_logits(self, input_ids, cache, start_pos):
        """Logits of the last position only: the head runs on one position, not the whole prompt."""
        h = self.norm(self.trunk(input_ids, cache, start_pos)[:, -1])
        return self.lm_head(h)[..., : self.config.vocab_size].float()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """The prompt [B, T] followed by up to `max_new_tokens` new tokens, as one [B, T + n] tensor."""
        new = list(self.generate_stream(input_ids, max_new_tokens, temperature, top_k, top_p, eos_id, generator))
        return torch.cat([input_ids] + [t[:, None] for t in new], dim=1)


class DecodePlan:
    """The weights of one decode step, rearranged for a single new token; see `decode_plan`.

    Per layer: one projection for q, k and v together (their weights stacked), one for gate and up, and the
    RMSNorm gains (1 + w) precomputed in float32, q's and k's stacked so that one norm serves all heads.
    `linear(x, weight)` multiplies by a weight prepared by `prepare(weight)`.
    """

    def __init__(self, model: Gemma3, prepare, linear):
        self.linear = linear
        self.layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                gain(layer.input_layernorm),
                prepare(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
                torch.cat([gain(attn.q_norm).expand(attn.n_heads, -1),
                           gain(attn.k_norm).expand(attn.n_kv_heads, -1)])[:, None, :],  # [q+kv heads, 1, hd]
                prepare(attn.o_proj.weight),
                gain(layer.post_attention_layernorm),
                gain(layer.pre_feedforward_layernorm),
                prepare(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                prepare(mlp.down_proj.weight),
                gain(layer.post_feedforward_layernorm),
            ))
        self.final_gain = gain(model.norm)
        self.head = prepare(model.lm_head.weight)

    @staticmethod
    def rope_tables(model: Gemma3, max_len: int) -> dict:
        """cos, sin and sin with the first half negated, [max_len, head_dim], for each kind of layer: the values
        `rope_cos_sin` gives position by position, so that a step only looks them up."""
        dtype, positions = model.embed_tokens.weight.dtype, torch.arange(max_len, device=model.embed_tokens.weight.device)
        tables = {}
        for kind, inv_freq in ((SLIDING, model.inv_freq_local), (GLOBAL, model.inv_freq_global)):
            cos, sin = rope_cos_sin(inv_freq, positions, dtype)
            half = sin.shape[-1] // 2
            tables[kind] = (cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))
        return tables

    @torch.no_grad()
    def step(self, model: Gemma3, token: torch.Tensor, cache: list[KVCache], pos: int, rope: dict) -> torch.Tensor:
        """Float32 logits [B, vocab] of the token [B, 1] at position `pos`: the arithmetic of `trunk`, the final
        norm and the head (the same operations on the same values), in fewer, larger operations."""
        c, linear = model.config, self.linear
        B, H, KV, hd, eps = token.shape[0], c.n_heads, c.n_kv_heads, c.head_dim, c.rms_norm_eps
        h = model.embed_tokens(token)
        h = h * model.embed_scale.to(h.dtype)
        cos_sin = {kind: (cos[pos : pos + 1], sin[pos : pos + 1]) for kind, (cos, sin) in rope.items()}
        for kind, layer, kv, weights in zip(c.layer_types, model.layers, cache, self.layers):
            input_gain, qkv_w, qk_gain, o_w, post_attn_gain, pre_ffw_gain, gate_up_w, down_w, post_ffw_gain = weights
            qkv = linear(rms_norm(h, input_gain, eps), qkv_w)  # [B, 1, (H + 2 KV) hd]
            qk = rms_norm(qkv[..., : (H + KV) * hd].view(B, H + KV, 1, hd), qk_gain, eps)
            cos, sin = cos_sin[kind]
            qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin  # apply_rope, with rotate_half's sign folded into sin
            k, v = kv.decode(qk[:, H:], qkv[..., (H + KV) * hd :].view(B, KV, 1, hd), pos)
            y = decode_attention(qk[:, :H], k, v, layer.self_attn.scale)
            h = h + rms_norm(linear(y.view(B, 1, H * hd), o_w), post_attn_gain, eps)
            gate, up = linear(rms_norm(h, pre_ffw_gain, eps), gate_up_w).chunk(2, dim=-1)
            h = h + rms_norm(linear(F.gelu(gate, approximate="tanh") * up, down_w), post_ffw_gain, eps)
        return linear(rms_norm(h[:, -1], self.final_gain, eps), self.head)[..., : c.vocab_size].float()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one new query per sequence, q [B, H, 1, hd], to the cached k, v [B, KV, n, hd], in float32.

    Each K/V head serves its group of query heads as one matrix product (no copy of K or V). For a single
    query, SDPA's CPU kernel is several times slower than these two products (450 against 120 us at 512
    keys, 4 heads of 256), and it is the largest cost of a step after the weights.
    """
    B, H, _, hd = q.shape
    KV = k.shape[1]
    scores = torch.matmul(q.reshape(B, KV, H // KV, hd).float(), k.float().transpose(-1, -2)).mul_(scale)
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype).view(B, H, 1, hd)


def gain(norm: RMSNorm) -> torch.Tensor:
    return 1.0 + norm.weight.detach().float()


def decode_plan(model: Gemma3, pack: bool | None = None) -> DecodePlan | None:
    """The `DecodePlan` of a float32 model on a CPU with oneDNN, or a bfloat16 one on a CPU that computes in
    bfloat16 natively, its weights packed by oneDNN; None anywhere else (decoding then runs the model's own
    forward). `pack=False` builds a plan of plain stacked weights for any model, which the tests use to check
    the plan's arithmetic apart from oneDNN.

    A decode step is one matrix-vector product per weight, which should run at memory bandwidth; ATen's plain
    paths for it do not (the packed layout is the one torch.compile's weight freezing uses for CPU linears;
    with it 270M decodes 1.5x faster in float32, 1.6x in bfloat16, with the same tokens), and the rest of a
    step is the dispatch of small operations, which the plan halves. Building a plan copies the weights (0.15
    to 0.3 s for 270M), so it is kept on the model for the next call, keyed on each parameter's storage and
    in-place version counter: an optimizer step, load_state_dict or .to() changes the key and a new plan is
    built, never a stale one. The copies cost as much memory as the linear weights; `del model._decode_plan`
    frees them.
    """
    weight = next(model.parameters())
    mkldnn = torch.ops.mkldnn
    if pack is None:
        pack = (weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
                and hasattr(mkldnn, "_reorder_linear_weight")
                and (weight.dtype == torch.float32
                     or (weight.dtype == torch.bfloat16 and mkldnn._is_mkldnn_bf16_supported())))
        if not pack:
            return None
    key = (pack, tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters()))
    cached = model.__dict__.get("_decode_plan")
    if cached is not None and cached[0] == key:
        return cached[1]
    model.__dict__.pop("_decode_plan", None)  # free the old copies before making new ones
    with torch.no_grad():
        if pack:
            plan = DecodePlan(model, lambda w: mkldnn._reorder_linear_weight(w.detach(), 1),  # laid out for batch 1
                              lambda x, w: mkldnn._linear_pointwise(x, w, None, "none", [], ""))
        else:
            plan = DecodePlan(model, torch.Tensor.detach, F.linear)
    model.__dict__["_decode_plan"] = (key, plan)
    return plan


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0 or math.isinf(temperature):
        raise UserError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top k, then outside the nucleus: the smallest set of most likely
    tokens whose probability reaches top_p (the token that crosses top_p is kept)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `logits` [B, V]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
