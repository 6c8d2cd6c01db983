"""Gemma 3's text model, written from scratch, reading top to bottom in the order data flows through it.

Every parameter name matches transformers' Gemma3ForCausalLM once `model.` is put in front (see
`hf.HF_NAME_MAP`), and every numerical detail that could change a logit matches it too; the comments
say "as transformers" where a line exists only for that.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygemma.config import GLOBAL, SLIDING, ModelConfig
from tinygemma.devices import compiled_copy
from tinygemma.errors import UserError
from tinygemma.loss import LOSS_CHUNK_SIZE, cross_entropy_from_hidden, token_cross_entropy
from tinygemma.tokenizer import Tokenizer

try:  # flex attention: sliding-window layers that do work proportional to the window (torch >= 2.5)
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover
    BlockMask = create_block_mask = flex_attention = None
_compiled_flex_attention = None


def compiled_flex_attention(fresh: bool = False):
    """flex_attention compiled into a fused kernel: the process's one, made once, or with `fresh` a copy with
    graphs of its own, for one model (init_model gives each trained model one: dynamo keeps a function's graphs
    with its code object, at most 8, one per shape; a shared one ran out of them over a notebook's runs, each
    probing a few micro-batch sizes, and past them ran the unfused reference, whose memory, quadratic in the block,
    made the probe choose far smaller micro-batches). Call it outside traced code (training's setup does): made
    inside a graph that dynamo traces, the module global would be written back uncompiled, and later eager calls
    would run the unfused reference."""
    global _compiled_flex_attention
    if flex_attention is None:
        raise UserError("attention_backend 'flex' needs torch >= 2.5 (torch.nn.attention.flex_attention)")
    if fresh:
        return compiled_copy(flex_attention, dynamic=False)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def _flex_attention(q, k, v, block_mask, scale, enable_gqa, owner=None):
    """flex_attention: inside a compiled model, traced as it is (the model's compiler fuses it); eagerly on a
    GPU, through `owner.flex_kernel` (the attention module's, set by init_model), else `compiled_flex_attention`;
    elsewhere (CPU: forward only) the uncompiled reference implementation, which serves to check the block mask."""
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, **kwargs)
    if q.device.type == "cuda":
        return (getattr(owner, "flex_kernel", None) or compiled_flex_attention())(q, k, v, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, **kwargs)


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


class FlashWindow:
    """A sliding layer's "mask" under attention_backend "flash": none at all, the window given to the kernel."""

    def __init__(self, window: int):
        self.window = window


def flash_window_attention(q, k, v, window: int, scale: float) -> torch.Tensor:
    """Causal attention within Gemma 3's window (i - window < j <= i) by FlashAttention-2's own local attention
    (torch's `_flash_attention_forward`, CUDA only; its backward is FlashAttention's too): it keeps the window's
    keys, i - window_size_left <= j <= i + window_size_right, with no mask to read. q [B, H, T, D] and k, v
    [B, KV, T, D] (KV dividing H: FlashAttention reads a shared head itself); returns [B, H, T, D]."""
    T = q.shape[2]
    out = torch.ops.aten._flash_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, T, T, 0.0, True, False, scale=scale,
        window_size_left=window - 1, window_size_right=0)[0]  # (the kernels take [B, T, heads, D])
    return out.transpose(1, 2)


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

    def decode_at(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """`decode` with the position as a 0-d tensor on the cache's device, its value never read by the host (a
        CUDA graph replays the step at every position): every slot is returned, with a boolean [size] mask of
        those that hold positions up to `pos` (in a ring, all of them once it has come round)."""
        slot = (pos % self.size).view(1)
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        return self.k, self.v, torch.arange(self.size, device=self.k.device) <= pos


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
        # How SDPA gets the K/V head(s) when there are fewer than query heads: "shared" (enable_gqa: the kernel
        # reads one K/V head for all of its query heads), "expanded" (a view with every query head's K/V, no
        # copy) or "repeated" (a copy). Not architecture: all three compute the same function. "shared" unless
        # training chose otherwise for this GPU (parallelize.choose_kv_layouts): on CUDA flash takes shared heads,
        # the memory-efficient kernel does not (through PyTorch 2.11 at least), and where flash does not run (a
        # T4, a V100, float32, a mask) SDPA would fall back to its unfused math kernel.
        self.kv_layout = "shared"
        self.flex_kernel = None  # flex_attention compiled for this model, where training made one (init_model)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, start_pos: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        # The RoPE tables follow the float32 residual stream; under autocast v is bf16/fp16, and attention
        # kernels want one dtype (flex_attention refuses a mix; SDPA would read q and k at twice the bytes).
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)

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
            y = _flex_attention(q, k, v, mask, self.scale, gqa, self)
        elif isinstance(mask, FlashWindow):
            y = flash_window_attention(q, k, v, mask.window, self.scale)
        else:
            if gqa and self.kv_layout != "shared":  # every query head's K/V, for a kernel that takes no sharing
                k = kv_for_every_head(k, self.n_heads, self.kv_layout)
                v = kv_for_every_head(v, self.n_heads, self.kv_layout)
                gqa = False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                                               enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


KV_LAYOUTS = ("shared", "expanded", "repeated")


def kv_for_every_head(kv: torch.Tensor, n_heads: int, layout: str) -> torch.Tensor:
    """K or V [B, n_kv_heads, T, head_dim] as [B, n_heads, T, head_dim], query head h reading K/V head
    h // (n_heads // n_kv_heads) as enable_gqa does. "expanded" with one K/V head: a view (stride 0 over the
    heads, no copy); "repeated", or several K/V heads: a copy."""
    B, n_kv, T, hd = kv.shape
    if layout == "expanded" and n_kv == 1:
        return kv.expand(B, n_heads, T, hd)
    return kv.repeat_interleave(n_heads // n_kv, dim=1)


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


class Gemma3(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if not hasattr(config, "validate"):  # (a dict: from_dict makes one; not isinstance, which a notebook's
            # autoreload of tinygemma.config would fail)
            raise UserError(f"Gemma3 takes a ModelConfig (ModelConfig.preset(...), ModelConfig.from_dict(...)), got "
                            f"{type(config).__name__}")
        config.validate()  # a config whose fields were set after it was made (layer_types no longer the layers')
        self.config = config
        V = config.padded_vocab_size
        self.embed_tokens = nn.Embedding(V, config.d_model)
        self.layers = nn.ModuleList(Block(config, t) for t in config.layer_types)
        self.rope_positions = 0  # none tabulated until tabulate_rope
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.d_model, V, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_buffers()
        self.apply(self._init_weights)
        # Rows of logits made at once by the loss (None: all at once; 0: the plain F.cross_entropy, which
        # autograd differentiates). Not architecture: a memory/speed knob (see cross_entropy_from_hidden).
        self.loss_chunk_size: int | None = LOSS_CHUNK_SIZE
        # Micro-batches of at most this many logits (rows x padded vocabulary) take the plain F.cross_entropy on
        # whole logits instead, whatever loss_chunk_size says; 0 = never. Set by parallelize.choose_loss_head.
        self.loss_full_logits = 0
        # "sdpa" (a boolean mask for sliding layers longer than the window), "flex" (flex_attention with a
        # block mask: work proportional to the window; for GPUs) or "flash" (FlashAttention-2's own window, no
        # mask: CUDA only, flash_window_attention). Each computes the same function.
        self.attention_backend = "sdpa"
        # Under autocast, the hidden states between layers (the residual stream) in this dtype; None: the
        # embedding's, float32 with float32 weights. bfloat16 halves the bytes of the memory-bound norms and
        # residual adds (a model with bf16 weights, or FSDP2 gathering them in bf16, has it so anyway). Not
        # architecture: a speed knob, measured by benchmarks/train_throughput.py's tinygemma-bf16stream.
        self.residual_dtype: torch.dtype | None = None
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
        # RoPE's float32 cos and sin, [2, rope_positions, head_dim] per kind of layer (see tabulate_rope).
        positions = torch.arange(self.rope_positions, device=device)
        for kind, inv_freq in ((SLIDING, self.inv_freq_local), (GLOBAL, self.inv_freq_global)):
            table = torch.stack(rope_cos_sin(inv_freq, positions, torch.float32))
            self.register_buffer(f"rope_table_{kind}", table, persistent=False)

    def tabulate_rope(self, positions: int) -> None:
        """Keep RoPE's cos and sin for positions [0, positions) (the training block) in buffers, which the forward
        then reads. Made in the forward instead, a compiled graph recomputes them (float32 cos and sin of every
        element of q and k) inside each layer's kernel: 4.6% of a training step on an H200. The values are those
        `rope_cos_sin` gives; positions past the table are computed as before."""
        self.rope_positions = positions
        self.reset_buffers()

    def rope(self, kind: str, start: int, end: int, dtype: torch.dtype):
        """cos and sin [end - start, head_dim] in `dtype` for positions [start, end) of layers of `kind`."""
        table = getattr(self, f"rope_table_{kind}")
        if end <= table.shape[1]:
            return table[0, start:end].to(dtype), table[1, start:end].to(dtype)
        inv_freq = self.inv_freq_local if kind == SLIDING else self.inv_freq_global
        return rope_cos_sin(inv_freq, torch.arange(start, end, device=inv_freq.device), dtype)

    def _apply(self, fn, recurse=True):
        """After any .to() / .cuda() / .half(): the constant buffers are made again on the new device in float32,
        so a bfloat16 model keeps exact RoPE frequencies (rounded to bf16 they are off by radians at position
        1000). Weights and norms take the dtype asked for, as always."""
        super()._apply(fn, recurse)
        self.reset_buffers()
        return self

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

        Ids and targets are checked for their type and shape, not their range (that would wait for the device at
        every step): an id past the vocabulary reads a padding row or fails in the embedding; what a target out
        of range gives (NaN, inf, an IndexError, a device assert) depends on the loss head's path: see
        loss.cross_entropy_from_hidden. The embedding takes int64 or int32 ids, the loss int64 targets.
        """
        check_token_ids(input_ids, targets)
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
        chunk_size = 0 if flat_h.shape[0] * weight.shape[0] <= self.loss_full_logits else self.loss_chunk_size
        return cross_entropy_from_hidden(flat_h, weight, flat_targets, chunk_size, V)

    def trunk(self, input_ids: torch.Tensor, cache: list[KVCache] | None = None, start_pos: int = 0):
        """Embedding and decoder layers: the hidden states [B, T, d_model] before the final norm.

        With `cache`, positions start at `start_pos` (see `generate.generate_stream`).
        """
        T = input_ids.shape[1]
        h = self.embed_tokens(input_ids)
        h = h * self.embed_scale.to(h.dtype)
        rope = {kind: self.rope(kind, start_pos, start_pos + T, h.dtype) for kind in (SLIDING, GLOBAL)}
        if self.residual_dtype is not None and torch.is_autocast_enabled(h.device.type):
            h = h.to(self.residual_dtype)  # after the RoPE tables, which stay float32 under autocast
        # Masks, built once per forward and shared by the layers of each kind. None means plain causal:
        # a window at least as long as the sequence is the causal mask itself, the common case in training.
        masks = {SLIDING: None, GLOBAL: None}
        if T > self.config.sliding_window:
            if self.attention_backend == "flex" and cache is None:
                masks[SLIDING] = self.sliding_block_mask(T, input_ids.device)
            elif self.attention_backend == "flash" and cache is None:
                masks[SLIDING] = FlashWindow(self.config.sliding_window)
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


def check_token_ids(input_ids, targets=None) -> None:
    """Refuse what is not a [batch, tokens] tensor of integer token ids (any integers, which generate makes int64:
    uint16 is a token file's), or targets of another shape, in one line: in torch they failed deep inside (an
    embedding's argument check, a tuple index) or, for targets, broadcast."""
    if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point
            or input_ids.dtype.is_complex or input_ids.dtype == torch.bool):
        got = (f"a {input_ids.dim()}-d {input_ids.dtype} tensor" if isinstance(input_ids, torch.Tensor)
               else type(input_ids).__name__)
        raise UserError(f"input_ids must be a [batch, tokens] tensor of integer token ids, got {got}; one prompt "
                        "is torch.tensor([ids])")
    if targets is not None and not (isinstance(targets, torch.Tensor) and targets.shape == input_ids.shape):
        got = f"shape {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise UserError(f"targets must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {got}")


def check_tokenizer_fits(tokenizer, model: Gemma3) -> None:
    """Refuse a tokenizer whose ids (those of its text, end-of-text and <bos>) the model has no rows for."""
    if not isinstance(tokenizer, Tokenizer):  # (a transformers tokenizer, say)
        raise UserError(f"the tokenizer must be tinygemma's (tinygemma.tokenizer.load_tokenizer: gpt2, or a "
                        f"tokenizer.json), got a {type(tokenizer).__name__}")
    if tokenizer.model_vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer ({tokenizer.identity}) has {tokenizer.model_vocab_size:,} tokens, more "
                        f"than the model's {model.config.vocab_size:,}: they do not belong together")


def model_state(model: Gemma3) -> dict[str, torch.Tensor]:
    """The weights to save: a tied output head is the embedding, so it is stored once, under the embedding."""
    state = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], source="checkpoint") -> Gemma3:
    """Build the model and load `state` strictly: any missing, unexpected or misshapen tensor is a UserError
    (a checkpoint of another architecture), never a silently half-loaded model."""
    with torch.device("meta"):
        model = Gemma3(config)
    model.load_state_dict(checked_state(config, state, source, model), strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_buffers()
    return model


def checked_state(config: ModelConfig, state: dict[str, torch.Tensor], source="checkpoint",
                  model: Gemma3 | None = None) -> dict[str, torch.Tensor]:
    """`state` as the model of `config` takes it (a tied head dropped, the vocabulary padded), or a UserError in
    one line naming the first missing, unexpected or misshapen tensor. `model`: one of `config`, if at hand."""
    if model is None:
        with torch.device("meta"):
            model = Gemma3(config)
    expected = dict(model.state_dict())
    state = dict(state)
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # a tied head saved anyway
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{source} does not match the model config: "
            + (f"missing {missing[:3]}{'...' if len(missing) > 3 else ''} " if missing else "")
            + (f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}" if unexpected else "")
        )
    V, Vp = config.vocab_size, config.padded_vocab_size
    for name, param in expected.items():
        tensor = state[name]
        if name in ("embed_tokens.weight", "lm_head.weight") and tensor.shape[0] == V and Vp > V:
            tensor = torch.cat([tensor, tensor.new_zeros(Vp - V, tensor.shape[1])])  # vocabulary padding
            state[name] = tensor
        if tuple(tensor.shape) != tuple(param.shape):
            raise UserError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config needs {tuple(param.shape)}")
        if tensor.dtype == torch.float64:  # a weight the model takes in float32 (or casts to its dtype anyway)
            state[name] = tensor.float()
        elif tensor.dtype not in WEIGHT_DTYPES:  # integers cannot train; fp8 would go on into an export
            raise UserError(f"{source}: {name} is {str(tensor.dtype).removeprefix('torch.')}; the model takes "
                            "float32, bfloat16 or float16 weights")
    return state


WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
