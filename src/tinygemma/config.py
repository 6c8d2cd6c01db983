"""Configuration dataclasses. Their defaults are the recipe; presets name the model sizes we ship."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tinygemma.errors import UserError

SLIDING = "sliding_attention"  # transformers' names for the two layer kinds, so config.json round-trips
GLOBAL = "full_attention"


@dataclass
class ModelConfig:
    """Gemma 3's text architecture. The defaults are Gemma 3 270M (google/gemma-3-270m) exactly."""

    vocab_size: int = 262_144  # tokens the model can read and predict
    d_model: int = 640  # residual stream width (transformers: hidden_size)
    n_layers: int = 18  # decoder blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 1  # key/value heads: 1 is multi-query attention
    head_dim: int = 256  # width of each attention head (Gemma decouples it from d_model / n_heads)
    mlp_dim: int = 2048  # GeGLU hidden width (transformers: intermediate_size)
    sliding_window: int = 512  # keys visible to a sliding-window layer: i - window < j <= i
    sliding_window_pattern: int = 6  # every 6th layer is global, the other 5 slide
    layer_types: tuple[str, ...] | None = None  # per layer SLIDING or GLOBAL; derived from the pattern if None
    rope_local_base: float = 10_000.0  # RoPE theta of sliding-window layers
    rope_global_base: float = 1_000_000.0  # RoPE theta of global layers
    query_pre_attn_scalar: float = 256.0  # queries are scaled by query_pre_attn_scalar ** -0.5
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    max_position_embeddings: int = 32_768  # recorded for export; RoPE itself has no hard limit
    init_std: float = 0.02  # normal init of every linear and embedding weight (Gemma's initializer_range)
    vocab_pad_multiple: int = 1  # pad embedding rows to a multiple of this (128 is faster on GPUs); 1 = off

    def __post_init__(self):
        if self.layer_types is None:
            if self.sliding_window_pattern < 1:
                raise UserError(f"sliding_window_pattern must be >= 1, got {self.sliding_window_pattern}")
            self.layer_types = tuple(
                SLIDING if (i + 1) % self.sliding_window_pattern else GLOBAL for i in range(self.n_layers)
            )
        else:
            self.layer_types = tuple(self.layer_types)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
                     "sliding_window", "vocab_pad_multiple", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise UserError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.layer_types) != self.n_layers:
            raise UserError(f"model.layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        bad = sorted(set(self.layer_types) - {SLIDING, GLOBAL})
        if bad:
            raise UserError(f"model.layer_types may hold only {SLIDING!r} and {GLOBAL!r}, not {bad}")
        for name in ("rope_local_base", "rope_global_base", "query_pre_attn_scalar", "rms_norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model.{name} must be a positive number, got {value!r}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named configuration, optionally with some fields changed: `ModelConfig.preset("gemma3-tiny", vocab_size=4096)`."""
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**d)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters of the model (without vocabulary padding), counted from the shapes alone."""
        d, hd = self.d_model, self.head_dim
        attention = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + 2 * hd
        block = attention + 3 * d * self.mlp_dim + 4 * d
        n = self.n_layers * block + d
        if embeddings:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return n

    def flops_per_token(self, block_size: int) -> float:
        """Training FLOPs (forward + backward) per token, counted the standard way for MFU (PaLM, nanoGPT):
        6 x the matmul parameters (every linear layer and the output head; the embedding lookup is no matmul)
        plus 12 x n_heads x head_dim x the keys each layer attends: block_size on global layers,
        min(block_size, sliding_window) on sliding ones (the window actually attended)."""
        d, hd = self.d_model, self.head_dim
        matmul_params = self.n_layers * (d * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + 3 * d * self.mlp_dim)
        matmul_params += self.vocab_size * d
        attended = sum(block_size if t == GLOBAL else min(block_size, self.sliding_window) for t in self.layer_types)
        return 6 * matmul_params + 12 * self.n_heads * hd * attended


# Named model sizes. Anything not given takes the ModelConfig default, i.e. Gemma 3 270M.
PRESETS: dict[str, dict] = {
    # google/gemma-3-270m exactly: 268,098,176 parameters.
    "gemma3-270m": {},
    # The same with the GPT-2 vocabulary the workshop used: 132,490,496 parameters (164,654,976 untied).
    "gemma3-270m-gpt2": {"vocab_size": 50_257},
    # The same structure, scaled down for CPU tests and demos: 6 layers so that the last one is global.
    "gemma3-tiny": {
        "vocab_size": 50_257, "d_model": 128, "n_layers": 6, "n_heads": 4, "n_kv_heads": 1,
        "head_dim": 32, "mlp_dim": 512, "sliding_window": 64, "query_pre_attn_scalar": 32.0,
        "max_position_embeddings": 2048,
    },
}
