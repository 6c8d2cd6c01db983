"""The workshop's Gemma 3 270M, re-implemented in its own style as a baseline for benchmarks/train_throughput.py.

The "Gemma 3 270M from scratch" workshop notebook (Vizuara) builds the model the way LLMs-from-scratch does:
a config dict, `GroupedQueryAttention` that copies the one key/value head to every query head
(`repeat_interleave`) and computes `queries @ keys.transpose(2, 3)`, masked with precomputed `torch.triu` masks,
softmax, `@ values`; RoPE from cos/sin tables precomputed for the whole context; RMSNorm with a (1 + scale) gain;
GeGLU `FeedForward` with tanh GELU; and every weight created in `cfg["dtype"]` (bfloat16 in the workshop, with no
float32 master copy). It is written here from that description, not copied, and kept in that style on purpose:
it is what we measure against, so it must not be optimised.

`workshop_config` and `load_tinygemma_weights` give it a tinygemma model's configuration and weights, so that it
computes the same function (benchmarks/train_throughput.py checks the losses agree in float32).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygemma.config import ModelConfig


def workshop_config(config: ModelConfig, dtype: torch.dtype = torch.bfloat16, tied: bool | None = None) -> dict:
    """The workshop's config dict (GEMMA3_CONFIG_270M's keys) for a tinygemma ModelConfig; `tied` False gives the
    notebook's own separate output head (default: the config's tie_embeddings)."""
    return {
        "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings,
        "emb_dim": config.d_model,
        "n_heads": config.n_heads,
        "n_layers": config.n_layers,
        "hidden_dim": config.mlp_dim,
        "head_dim": config.head_dim,
        "qk_norm": True,
        "n_kv_groups": config.n_kv_heads,
        "rope_local_base": config.rope_local_base,
        "rope_base": config.rope_global_base,
        "sliding_window": config.sliding_window,
        "layer_types": list(config.layer_types),
        "dtype": dtype,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "tie_embeddings": config.tie_embeddings if tied is None else tied,  # the notebook's head was untied
    }


def compute_rope_params(head_dim, theta_base=10_000, context_length=4096, dtype=torch.float32):
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2, dtype=dtype)[: (head_dim // 2)].float() / head_dim))
    positions = torch.arange(context_length, dtype=dtype)
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=1)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    batch_size, num_heads, seq_len, head_dim = x.shape
    x1 = x[..., : head_dim // 2]
    x2 = x[..., head_dim // 2 :]
    cos = cos[:seq_len, :].unsqueeze(0).unsqueeze(0)
    sin = sin[:seq_len, :].unsqueeze(0).unsqueeze(0)
    rotated = torch.cat((-x2, x1), dim=-1)
    x_rotated = (x * cos) + (rotated * sin)
    return x_rotated.to(dtype=x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, emb_dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        input_dtype = x.dtype
        x_f = x.float()
        var = x_f.pow(2).mean(dim=-1, keepdim=True)
        x_norm = x_f * torch.rsqrt(var + self.eps)
        out = x_norm * (1.0 + self.scale.float())
        return out.to(input_dtype)


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], dtype=cfg["dtype"], bias=False)
        self.fc2 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], dtype=cfg["dtype"], bias=False)
        self.fc3 = nn.Linear(cfg["hidden_dim"], cfg["emb_dim"], dtype=cfg["dtype"], bias=False)

    def forward(self, x):
        x_fc1 = self.fc1(x)
        x_fc2 = self.fc2(x)
        x = F.gelu(x_fc1, approximate="tanh") * x_fc2
        return self.fc3(x)


class GroupedQueryAttention(nn.Module):
    def __init__(self, d_in, num_heads, num_kv_groups, head_dim, qk_norm=False, query_pre_attn_scalar=None,
                 dtype=None):
        super().__init__()
        assert num_heads % num_kv_groups == 0, "num_heads must be divisible by num_kv_groups"
        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.group_size = num_heads // num_kv_groups
        self.head_dim = head_dim
        self.d_out = num_heads * head_dim

        self.W_query = nn.Linear(d_in, self.d_out, bias=False, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=False, dtype=dtype)

        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=1e-6)
            self.k_norm = RMSNorm(head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = None

        if query_pre_attn_scalar is not None:
            self.scaling = query_pre_attn_scalar**-0.5
        else:
            self.scaling = head_dim**-0.5

    def forward(self, x, mask, cos, sin):
        b, num_tokens, _ = x.shape

        queries = self.W_query(x)
        keys = self.W_key(x)
        values = self.W_value(x)

        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = keys.view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)

        if self.q_norm:
            queries = self.q_norm(queries)
        if self.k_norm:
            keys = self.k_norm(keys)

        queries = apply_rope(queries, cos, sin)
        keys = apply_rope(keys, cos, sin)

        # Expand K and V to match the number of heads
        keys = keys.repeat_interleave(self.group_size, dim=1)
        values = values.repeat_interleave(self.group_size, dim=1)

        queries = queries * self.scaling

        attn_scores = queries @ keys.transpose(2, 3)
        attn_scores = attn_scores.masked_fill(mask, -torch.inf)
        attn_weights = torch.softmax(attn_scores, dim=-1)

        context = (attn_weights @ values).transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)


class TransformerBlock(nn.Module):
    def __init__(self, cfg, attn_type):
        super().__init__()
        self.attn_type = attn_type
        self.att = GroupedQueryAttention(
            d_in=cfg["emb_dim"],
            num_heads=cfg["n_heads"],
            num_kv_groups=cfg["n_kv_groups"],
            head_dim=cfg["head_dim"],
            qk_norm=cfg["qk_norm"],
            query_pre_attn_scalar=cfg["query_pre_attn_scalar"],
            dtype=cfg["dtype"],
        )
        self.ff = FeedForward(cfg)
        self.input_layernorm = RMSNorm(cfg["emb_dim"], eps=1e-6)
        self.post_attention_layernorm = RMSNorm(cfg["emb_dim"], eps=1e-6)
        self.pre_feedforward_layernorm = RMSNorm(cfg["emb_dim"], eps=1e-6)
        self.post_feedforward_layernorm = RMSNorm(cfg["emb_dim"], eps=1e-6)

    def forward(self, x, mask_global, mask_local, cos_global, sin_global, cos_local, sin_local):
        # Shortcut connection for attention block
        shortcut = x
        x = self.input_layernorm(x)

        if self.attn_type == "sliding_attention":
            attn_mask, cos, sin = mask_local, cos_local, sin_local
        else:
            attn_mask, cos, sin = mask_global, cos_global, sin_global

        x_attn = self.att(x, attn_mask, cos, sin)
        x_attn = self.post_attention_layernorm(x_attn)
        x = shortcut + x_attn

        # Shortcut connection for feed forward block
        shortcut = x
        x_ffn = self.pre_feedforward_layernorm(x)
        x_ffn = self.ff(x_ffn)
        x_ffn = self.post_feedforward_layernorm(x_ffn)
        return shortcut + x_ffn


class Gemma3Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg["layer_types"] is not None and len(cfg["layer_types"]) == cfg["n_layers"]

        # Main model parameters
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=cfg["dtype"])
        self.blocks = nn.ModuleList([TransformerBlock(cfg, attn_type) for attn_type in cfg["layer_types"]])
        self.final_norm = RMSNorm(cfg["emb_dim"], eps=1e-6)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=cfg["dtype"])
        if cfg["tie_embeddings"]:
            self.out_head.weight = self.tok_emb.weight
        self.cfg = cfg

        # Reusable utilities
        cos_local, sin_local = compute_rope_params(
            head_dim=cfg["head_dim"], theta_base=cfg["rope_local_base"], context_length=cfg["context_length"],
            dtype=torch.float32,
        )
        cos_global, sin_global = compute_rope_params(
            head_dim=cfg["head_dim"], theta_base=cfg["rope_base"], context_length=cfg["context_length"],
            dtype=torch.float32,
        )
        self.register_buffer("cos_local", cos_local, persistent=False)
        self.register_buffer("sin_local", sin_local, persistent=False)
        self.register_buffer("cos_global", cos_global, persistent=False)
        self.register_buffer("sin_global", sin_global, persistent=False)

    def _create_masks(self, seq_len, device):
        ones = torch.ones((seq_len, seq_len), dtype=torch.bool, device=device)
        # mask_global (future is masked: j > i)
        mask_global = torch.triu(ones, diagonal=1)
        # far_past (too far back is masked: i - j >= sliding_window)
        far_past = torch.triu(ones, diagonal=self.cfg["sliding_window"]).T
        mask_local = mask_global | far_past
        return mask_global, mask_local

    def forward(self, input_ids, targets=None):
        b, seq_len = input_ids.shape
        x = self.tok_emb(input_ids) * (self.cfg["emb_dim"] ** 0.5)
        mask_global, mask_local = self._create_masks(seq_len, x.device)

        for block in self.blocks:
            x = block(
                x,
                mask_global=mask_global,
                mask_local=mask_local,
                cos_global=self.cos_global,
                sin_global=self.sin_global,
                cos_local=self.cos_local,
                sin_local=self.sin_local,
            )

        x = self.final_norm(x)
        logits = self.out_head(x.to(self.cfg["dtype"]))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


# tinygemma's parameter names -> the workshop's, per layer and for the whole model.
WORKSHOP_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.scale",
    "self_attn.q_proj.weight": "att.W_query.weight",
    "self_attn.k_proj.weight": "att.W_key.weight",
    "self_attn.v_proj.weight": "att.W_value.weight",
    "self_attn.o_proj.weight": "att.out_proj.weight",
    "self_attn.q_norm.weight": "att.q_norm.scale",
    "self_attn.k_norm.weight": "att.k_norm.scale",
    "post_attention_layernorm.weight": "post_attention_layernorm.scale",
    "pre_feedforward_layernorm.weight": "pre_feedforward_layernorm.scale",
    "mlp.gate_proj.weight": "ff.fc1.weight",
    "mlp.up_proj.weight": "ff.fc2.weight",
    "mlp.down_proj.weight": "ff.fc3.weight",
    "post_feedforward_layernorm.weight": "post_feedforward_layernorm.scale",
}
WORKSHOP_MODEL_NAMES = {"embed_tokens.weight": "tok_emb.weight", "norm.weight": "final_norm.scale",
                        "lm_head.weight": "out_head.weight"}


def workshop_name(name: str) -> str:
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"blocks.{index}.{WORKSHOP_LAYER_NAMES[rest]}"
    return WORKSHOP_MODEL_NAMES[name]


@torch.no_grad()
def load_tinygemma_weights(model: Gemma3Model, state: dict[str, torch.Tensor]) -> Gemma3Model:
    """Copy a tinygemma state dict into `model` (cast to its dtype); every workshop parameter must be set."""
    vocab_size = model.cfg["vocab_size"]
    mapped = {workshop_name(k): v[:vocab_size] if k in WORKSHOP_MODEL_NAMES and v.dim() == 2 else v
              for k, v in state.items()}  # vocabulary padding rows, if any, are not part of the function
    if not model.cfg["tie_embeddings"] and "out_head.weight" not in mapped:  # a tied model's: its own copy, so that
        mapped["out_head.weight"] = mapped["tok_emb.weight"].clone()  # step 0 computes the same function
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    tied = {"out_head.weight"} if model.cfg["tie_embeddings"] else set()  # set through the embedding
    if unexpected or set(missing) - tied:
        raise ValueError(f"weights do not fit the workshop model: missing {missing}, unexpected {unexpected}")
    return model
