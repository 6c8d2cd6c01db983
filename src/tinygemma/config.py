"""Configuration dataclasses. Their defaults are the recipe; presets name the model sizes we ship."""

from __future__ import annotations

import dataclasses
import decimal
import functools
import math
import numbers
import os
from dataclasses import dataclass

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tinygemma.errors import LONE_SURROGATE, UserError, whole_number

SLIDING = "sliding_attention"  # transformers' names for the two layer kinds, so config.json round-trips
GLOBAL = "full_attention"


def _pattern_layers(pattern: int, n_layers: int) -> tuple[str, ...]:
    return tuple(SLIDING if (i + 1) % pattern else GLOBAL for i in range(n_layers))


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
    max_position_embeddings: int = 32_768  # the longest context: train, eval and generate's commands refuse more (RoPE itself could go on)
    init_std: float = 0.02  # normal init of every linear and embedding weight (Gemma's initializer_range)
    vocab_pad_multiple: int = 1  # pad embedding rows to a multiple of this (128 is faster on GPUs); 1 = off

    def __post_init__(self):
        if isinstance(self.n_layers, int) and self.n_layers > MAX_LAYERS:  # before a layer_types of that length
            raise UserError(f"model.n_layers must be at most {MAX_LAYERS:,}, got {self.n_layers:,}")
        if self.layer_types is None:
            self.check_pattern()  # (before the layers are derived from it)
            self.layer_types = _pattern_layers(self.sliding_window_pattern, self.n_layers)
        else:
            self.layer_types = tuple(self.layer_types)
        self.validate()

    def check_pattern(self) -> None:
        check_int(self, "sliding_window_pattern", None, "model", "a positive integer")
        if self.sliding_window_pattern < 1:
            raise UserError(f"model.sliding_window_pattern must be >= 1, got {self.sliding_window_pattern}")

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
                     "sliding_window", "vocab_pad_multiple", "max_position_embeddings"):
            check_int(self, name, 1, "model", "a positive integer")
        if self.vocab_size > MAX_MODEL_VOCAB_SIZE:  # (99,999,999 rows: killed for memory, no word said)
            raise UserError(f"model.vocab_size must be at most {MAX_MODEL_VOCAB_SIZE:,}, got {self.vocab_size:,}")
        for name in ("d_model", "n_heads", "n_kv_heads", "head_dim", "mlp_dim"):  # (past int64 in a weight's size:
            if getattr(self, name) > MAX_MODEL_DIM:  # torch's traceback, a dry run's too)
                raise UserError(f"model.{name} must be at most {MAX_MODEL_DIM:,}, got {getattr(self, name):,}")
        if not isinstance(self.tie_embeddings, bool):
            raise UserError(f"model.tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        self.check_pattern()
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise UserError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.layer_types) != self.n_layers:
            raise UserError(f"model.layer_types has {len(self.layer_types)} entries for {self.n_layers} layers (leave "
                            "it out, and sliding_window_pattern makes it: ModelConfig.preset(NAME, n_layers=N) does)")
        bad = sorted(set(self.layer_types) - {SLIDING, GLOBAL})
        if bad:
            raise UserError(f"model.layer_types may hold only {SLIDING!r} and {GLOBAL!r}, not {bad}")
        if self.vocab_pad_multiple > MAX_VOCAB_PAD_MULTIPLE:  # rows padded on: each costs memory and a logit
            raise UserError(f"model.vocab_pad_multiple must be at most {MAX_VOCAB_PAD_MULTIPLE:,} (64 to 256 suits "
                            f"a GPU's matrix units), got {self.vocab_pad_multiple:,}")
        for name in ("rope_local_base", "rope_global_base", "query_pre_attn_scalar", "rms_norm_eps", "init_std"):
            # NaN and inf too (a config.json's NaN/Infinity): every logit came out NaN
            _check_number(self, name, lambda v: 0 < v < math.inf, "a positive, finite number", section="model")

    @property
    def layer_pattern(self) -> int | None:
        """The period p with every p-th layer global and the others sliding, if the layers follow one; else None."""
        return next((p for p in range(1, self.n_layers + 2)
                     if _pattern_layers(p, self.n_layers) == self.layer_types), None)

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
        if not isinstance(d, dict):
            raise UserError(f"a model config is a table of fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config field(s): {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:  # a layer_types of 5, a list of numbers: a damaged or hand-edited record
            raise UserError(f"a model config holds a value of the wrong type ({e})") from None

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


# ------------------------------------------------------------------ training and recipes

DTYPES = ("auto", "float32", "bfloat16", "float16")
MUON_BACKENDS = ("torch", "compiled", "bfloat16", "float16", "float32")  # optim.MuonAdamW's; the config sits below optim
DEVICES = ("auto", "cpu", "cuda", "mps")
LOGGERS = ("tensorboard", "wandb", "trackio")  # experiment trackers (trackers.py); wandb and trackio are extras

# The defaults the commands' --help names, here (no torch) so that `tinygemma --help` comes at once:
SPLITS = ("train", "val")  # prepared data's (data.py)
HUB_DATASET = "roneneldan/TinyStories"
DEFAULT_VAL_FRACTION = 0.05  # of the stories, when the source has no validation split of its own
DEFAULT_BPE_VOCAB_SIZE = 8192
# export's --dtype for GGUF (gguf_export.py): the ggml type of the weight matrices and llama.cpp's name for such
# a file. Norm gains stay float32.
GGUF_DTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
               "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
# The file people run: a quarter of f32's size, half of f16's, and the fastest to decode on a CPU, while its next
# token agrees with f32's almost everywhere (BENCHMARKS.md, "llama.cpp decoding").
DEFAULT_GGUF_DTYPE = "q8_0"


# Train fields a run written before they existed does not record, with the value it was trained with: the
# built-in defaults before the recipe moved to Muon + wsd. A saved run's settings are read through this.
LEGACY_TRAIN = {"optimizer": "adamw", "lr_schedule": "cosine"}


def saved_train_settings(train: dict) -> dict:
    """A run's recorded [train] settings, with the values it really used where it predates a field."""
    return {**LEGACY_TRAIN, **train}


# Settings that change the numbers of the steps still to come, and that a resume may change on purpose (a lower
# peak after a loss spike): said in a warning, since a notebook or recipe edited between sessions does it too.
STEP_SETTINGS = ("learning_rate", "min_lr", "muon_learning_rate", "muon_backend", "weight_decay", "beta1", "beta2", "adam_eps",
                 "grad_clip", "dtype", "on_nonfinite", "activation_checkpointing",
                 "lr_schedule", "warmup_steps", "cooldown_fraction",  # where no rate taken changes (else refused)
                 "eval_batches")  # the validation set that best.json compares against the earlier losses


# Settings that change what a run records (its evaluations, samples, checkpoints and log lines), not its losses:
# kept among an invocation's changes, so that the report's Reproduce commands make the same records.
RECORD_SETTINGS = ("eval_interval", "checkpoint_interval", "keep_checkpoints", "log_interval", "sample_interval")
# Another split of the same global batch, or of the model across processes (DDP's replicas or FSDP2's shards,
# whose low-precision reductions round otherwise), or another way to compute the same math (the loss head's, the
# attention's kernels, compiled or not): the same windows and math, float summation aside (which training
# amplifies, Muon most: README, "tinygemma compare"): kept among the changes too, unwarned, so that the Reproduce
# commands split the steps as they were split.
SPLIT_SETTINGS = ("batch_size", "grad_accum_steps", "micro_batch_size", "distributed", "loss_head",
                  "attention_backend", "compile")
# All that an invocation records among its changes
CHANGE_SETTINGS = STEP_SETTINGS + RECORD_SETTINGS + SPLIT_SETTINGS


def settings_changes(saved: dict | None, cfg: TrainConfig, names: tuple[str, ...] = STEP_SETTINGS,
                     processes: int | None = None) -> dict[str, list]:
    """The settings of `names` (the step settings) a resume changes, {name: [the run's value, this invocation's]}
    (`saved`: the run's recorded [train]); settings the run's optimizer or schedule does not use are no change,
    nor `distributed` on the one process (`processes`) that trains the steps to come."""
    if not saved:
        return {}
    saved, current = saved_train_settings(saved), dataclasses.asdict(cfg)
    unused = {"cooldown_fraction"} if cfg.lr_schedule != "wsd" else set()  # cosine has no cooldown
    if processes == 1:
        unused.add("distributed")
    if cfg.optimizer == "adamw":  # (a change of optimizer itself is refused: check_resume_schedule)
        unused |= {"muon_learning_rate", "muon_backend"}
    return {name: [saved[name], current[name]] for name in names
            if name in saved and saved[name] != current[name] and name not in unused}


# Other spellings of some train settings' values, taken as the canonical one (recorded so)
OTHER_SPELLINGS = {"dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"},
                   "compile": {"yes": "true", "on": "true", "1": "true", "no": "false", "off": "false", "0": "false"}}

# The train settings that name one of a few values, in their canonical spelling
TRAIN_CHOICES = {"dtype": DTYPES, "compile": ("auto", "true", "regional", "false"), "distributed": ("ddp", "fsdp"),
                 "on_nonfinite": ("stop", "skip"), "attention_backend": ("auto", "sdpa", "flex", "flash"),
                 "loss_head": ("auto", "chunked", "full"), "muon_backend": ("auto", *MUON_BACKENDS),
                 "optimizer": ("adamw", "muon"), "lr_schedule": ("cosine", "wsd")}


@dataclass
class TrainConfig:
    """The training loop. The defaults are a sound recipe for the 270M model on one GPU: 131,072 tokens per
    optimizer step (32 x 512 x 8), 5,000 steps (655M tokens, about 1.4 epochs' worth of TinyStories in GPT-2 tokens;
    windows are drawn at random offsets, so not every token is seen),
    Muon on the blocks' matrices and AdamW on the rest, warmup-stable-decay: the recipe that needed the fewest
    tokens to a loss in benchmarks/recipe_efficiency.py (BENCHMARKS.md, "Recipe efficiency"). Its learning rates
    are that benchmark's best on gemma3-tiny; no GPU has measured them at 270M yet."""

    batch_size: int = 32  # with grad_accum_steps, the global batch: batch_size x grad_accum_steps sequences a step
    block_size: int = 512  # tokens per sequence (the context the model trains on)
    grad_accum_steps: int = 8  # global batch = batch_size x this, split evenly over the processes
    micro_batch_size: str = "auto"  # sequences per forward/backward pass on each process: a number dividing its share of the global batch, or auto (on CUDA the largest that fits, probed at start-up; elsewhere batch_size where it divides the share, else the largest size below it that does)
    max_steps: int = 5000  # optimizer steps in the whole run (the schedule's length)
    learning_rate: float = 4e-3  # AdamW's peak rate, after warmup (under muon: the embedding's and gains')
    min_lr: float = 4e-4  # the schedule ends here, at max_steps (Muon's floor is the same fraction of its peak)
    warmup_steps: int = 250  # optimizer steps of linear warmup from 0 to learning_rate
    weight_decay: float = 0.1  # AdamW decoupled weight decay, applied to 2-D weights only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    adam_eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    eval_interval: int = 250  # evaluate every this many optimizer steps, and at step 0, at checkpoints, at the end (0: only then)
    eval_batches: int = 10  # validation batches per evaluation, each of the global batch's size
    checkpoint_interval: int = 500  # save every this many optimizer steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 1  # the newest checkpoints kept, besides the best (and under wsd, past 1, the last before the cooldown): 1 keeps the last alone
    log_interval: int = 10  # a log line (and a metrics flush) every this many steps
    sample_interval: int = 0  # continue [generate]'s prompts every this many steps, printed and in metrics.jsonl; 0 = never
    dtype: str = "auto"  # auto (bfloat16 on GPUs with native bf16, float16 + scaler on older ones; float32 elsewhere), float32, bfloat16, float16
    compile: str = "auto"  # torch.compile the model: auto (on for CUDA GPUs that Triton supports: compute capability 7.0 and later), true, regional (each layer on its own: compiles several times faster; the step's speed on GPUs unmeasured), false
    seed: int = 1337  # model initialisation and the training batches
    init_from: str | None = None  # start a new run from these weights (a run, a checkpoint, or a transformers Gemma 3 folder, e.g. google/gemma-3-270m downloaded) with a fresh optimizer and schedule; none = random initialisation
    device: str = "auto"  # auto (cuda, else mps, else cpu), cpu, cuda, mps
    distributed: str = "ddp"  # under torchrun: ddp, or fsdp (FSDP2 fully_shard of each block and the model)
    attention_backend: str = "auto"  # sliding layers longer than the window: flex (flex_attention, CUDA), flash (FlashAttention-2's own window, CUDA), sdpa (a mask), auto
    loss_head: str = "auto"  # the output head's cross-entropy: chunked (8,192 rows of logits at a time), full (F.cross_entropy on whole logits, fused by torch.compile), auto (per device, by measurement)
    activation_checkpointing: bool = False  # recompute each block's activations in backward to save memory
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient norm: stop (save nothing), or skip the step (counted)
    optimizer: str = "muon"  # muon (Muon on the blocks' matrices, AdamW on the rest; see optim.py), or adamw
    muon_learning_rate: float = 0.04  # Muon's peak learning rate (optimizer = muon); learning_rate stays AdamW's
    muon_backend: str = "auto"  # Muon's iteration: torch (torch.optim.Muon's, a matrix at a time), compiled (one compiled bfloat16 update per group of same-shape matrices), bfloat16, float16 or float32 (ours, batched, eager), auto (per device: bfloat16 where it is native, float16 on a GPU without it that has tensor cores, else float32)
    lr_schedule: str = "wsd"  # wsd (warmup, stable, linear decay), or cosine (decay to min_lr from the warmup on)
    cooldown_fraction: float = 0.4  # wsd: the last fraction of max_steps that decays linearly to min_lr
    loggers: list[str] = dataclasses.field(default_factory=lambda: ["tensorboard"])  # trackers: tensorboard, wandb, trackio

    def __post_init__(self):
        if is_integer(self.micro_batch_size):
            self.micro_batch_size = str(int(self.micro_batch_size))
        if isinstance(self.compile, bool):  # (from Python: compile=True)
            self.compile = str(self.compile).lower()
        for name in (*TRAIN_CHOICES, "device"):  # any case; generate's --dtype bf16, a boolean's yes: the same here
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, OTHER_SPELLINGS.get(name, {}).get(value.lower(), value.lower()))
        self.validate()

    def validate(self) -> None:
        for name in ("batch_size", "block_size", "grad_accum_steps", "max_steps", "eval_batches", "log_interval",
                     "keep_checkpoints"):
            check_int(self, name, 1)
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval", "seed", "sample_interval"):
            check_int(self, name, 0)
        if self.seed > MAX_TRAIN_SEED:
            raise UserError(f"train.seed must be at most {MAX_TRAIN_SEED:,} (64 bits), got {self.seed:,}")
        for name in ("batch_size", "grad_accum_steps", "eval_batches"):  # far past any memory; quick to list
            if getattr(self, name) > MAX_BATCH:
                raise UserError(f"train.{name} must be at most {MAX_BATCH:,}, got {getattr(self, name):,}")
        for name in ("max_steps", "warmup_steps", "eval_interval", "checkpoint_interval", "log_interval",
                     "keep_checkpoints", "sample_interval"):
            if getattr(self, name) > MAX_STEPS:  # past any run; a 400-digit count ended in a float's overflow
                raise UserError(f"train.{name} must be at most {MAX_STEPS:,}, got {getattr(self, name):,}")
        for name in ("learning_rate", "adam_eps", "muon_learning_rate"):  # the optimizers' float32 arithmetic
            _check_number(self, name, lambda v: 0 < v <= FLOAT32_MAX, "a positive number within float32's range")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            _check_number(self, name, lambda v: v >= 0, "a number >= 0")
        for name in ("beta1", "beta2"):
            _check_number(self, name, lambda v: 0 <= v < 1, "a number in [0, 1)")
        _check_number(self, "cooldown_fraction", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        if self.learning_rate / (1 - self.beta1) > FLOAT32_MAX:  # AdamW's first step, bias-corrected
            raise UserError(f"train.learning_rate / (1 - train.beta1) (AdamW's first step size) must be within "
                            f"float32's range, got {self.learning_rate} / (1 - {self.beta1})")
        if self.min_lr > self.learning_rate:
            raise UserError(f"train.min_lr ({self.min_lr}) must not exceed train.learning_rate ({self.learning_rate}); "
                            f"set min_lr too, e.g. a tenth of the peak: --set min_lr={self.learning_rate / 10:g}")
        if self.warmup_steps > self.max_steps:
            raise UserError(f"train.warmup_steps ({self.warmup_steps}) must not exceed train.max_steps ({self.max_steps})")
        if self.micro_batch_size != "auto" and not (whole_number(str(self.micro_batch_size)) or 0) > 0:
            raise UserError(f"train.micro_batch_size must be auto or a positive integer, got {self.micro_batch_size!r}")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise UserError(f"train.init_from must name a run, checkpoint or transformers folder, or be none; got "
                            f"{self.init_from!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise UserError(f"train.activation_checkpointing must be true or false, got {self.activation_checkpointing!r}")
        for name, allowed in TRAIN_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"train.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise UserError(f"train.loggers may name {', '.join(LOGGERS)}; got {', '.join(map(repr, unknown))}")
        if self.device.split(":")[0] not in DEVICES or (self.device.count(":") and not self.device.startswith("cuda:")):
            raise UserError(f"train.device must be one of {', '.join(DEVICES)} (or cuda:N); got {self.device!r}")


@dataclass
class DataConfig:
    """What `tinygemma run` prepares before training (see data.py); `train` reads only `dir`."""

    dir: str = "data/tinystories-gpt2"  # prepared data: train.bin, val.bin, meta.json
    source: list[str] = dataclasses.field(default_factory=list)  # story text files; empty = the Hugging Face hub
    val_source: list[str] = dataclasses.field(default_factory=list)  # validation text files; empty = the hub's split
    tokenizer: str = "gpt2"  # gpt2 (GPT-2's BPE), bpe (a byte-level BPE trained on the data), or a tokenizer.json
    vocab_size: int | None = None  # vocabulary of the trained bpe tokenizer; none = data.py's default
    limit: int | None = None  # use at most this many training stories; none = all

    def validate(self) -> None:
        """[data]'s own mistakes, named as the recipe's settings, before `tinygemma run` prepares anything. Not
        checked when a run's saved recipe is read: `train` reads only data.dir. One path given from Python as a
        source (recipe.data.source = "stories.txt") becomes a list of one, as prepare() takes it."""
        for name in ("source", "val_source"):  # (Paths as strings too: the recipe is written as JSON)
            setattr(self, name, story_paths(getattr(self, name), f"data.{name} must be a list of story files (or "
                                                                 "one path)"))
        for name, minimum in (("limit", 1), ("vocab_size", 257)):  # a BPE holds the 256 bytes and end-of-text
            if getattr(self, name) is not None:
                check_int(self, name, minimum, "data", f"an integer >= {minimum} or none")
        if self.vocab_size is not None and self.vocab_size > MAX_VOCAB_SIZE:
            raise UserError(f"data.vocab_size must be at most {MAX_VOCAB_SIZE:,} (the model's largest embedding), "
                            f"got {self.vocab_size:,}")
        if not isinstance(self.tokenizer, (str, os.PathLike)) or not str(self.tokenizer).strip():  # a Path: the API
            raise UserError(f"data.tokenizer must name a tokenizer: gpt2, bpe or a tokenizer.json path, got "
                            f"{self.tokenizer!r}")
        if self.vocab_size is not None and self.tokenizer != "bpe":
            raise UserError(f"data.vocab_size ({self.vocab_size}) applies only to data.tokenizer = bpe; "
                            f"{self.tokenizer} has its own vocabulary: set data.vocab_size=none")


@dataclass
class GenerateConfig:
    """Sampling for the samples of `tinygemma run` (and the defaults of `tinygemma generate`'s options)."""

    prompts: list[str] = dataclasses.field(default_factory=lambda: ["Once upon a time"])  # one sample per prompt
    max_new_tokens: int = 200  # tokens to generate after each prompt (stops early at end-of-text)
    temperature: float = 0.8  # softmax temperature; 0 = greedy
    top_k: int | None = 200  # sample among the k most likely tokens; none (or 0) = all
    top_p: float | None = None  # nucleus sampling threshold in (0, 1]; none = off
    min_p: float | None = None  # keep only tokens at least this fraction of the most likely one's probability, in [0, 1], after temperature, top-k and top-p, as transformers' min_p; none (or 0) = off
    seed: int = 1337  # sampling seed: prompt i (from 0) samples with seed + i
    repetition_penalty: float = 1.0  # a token already in the text has its logit divided by this (multiplied, if negative), as transformers' repetition_penalty; 1 = none
    stop: list[str] = dataclasses.field(default_factory=list)  # end each sample before the first of these texts it meets, which is not kept (generate's --stop); [] = none, only end of text and max_new_tokens

    def sampling(self) -> dict:
        """The sampling settings and stop texts, as generate_text's (and check_sampling's) keyword arguments."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
                "repetition_penalty": self.repetition_penalty, "stop": self.stop}


@dataclass
class Recipe:
    """Everything one run needs: a recipe file's [data], [model], [train] and [generate] sections."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model_preset: str = "gemma3-270m"  # [model] preset; the vocabulary size comes from the prepared data
    model_overrides: dict = dataclasses.field(default_factory=dict)  # [model] fields other than preset
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    out: str = "runs/tinystories"  # [train] out: the run directory

    def model_config(self, vocab_size: int | None = None, needed: int | None = None) -> ModelConfig:
        """The model: the preset with the overrides; `vocab_size` (the data's tokenizer's) replaces the preset's
        unless the recipe sets model.vocab_size itself, which must then hold `needed` rows (default vocab_size):
        the ids of the data's text and end-of-text, its tokenizer's model_vocab_size. Special ids past those
        (Gemma 3's <image_soft_token>, past gemma-3-270m's 262,144 rows) never occur in stories."""
        overrides = dict(self.model_overrides)
        if vocab_size is not None:
            needed = vocab_size if needed is None else needed
            if "vocab_size" not in overrides and vocab_size < needed:  # (prepare writes the tokenizer's own)
                raise UserError(f"the data's vocab_size {vocab_size} cannot hold its tokenizer's {needed} ids: its "
                                "meta.json is damaged or hand-edited; prepare the data again")
            if overrides.get("vocab_size", vocab_size) < needed:
                raise UserError(f"model.vocab_size {overrides['vocab_size']} cannot hold the data's tokens "
                                f"(its tokenizer's text and end-of-text take {needed} ids); remove the override "
                                "or raise it")
            overrides.setdefault("vocab_size", vocab_size)
        return ModelConfig.preset(self.model_preset, **overrides)

    def to_dict(self) -> dict:
        """The recipe as a recipe file's sections (what `from_dict` and `load_recipe` read back)."""
        return {
            "data": dataclasses.asdict(self.data),
            "model": {"preset": self.model_preset, **self.model_overrides},
            "train": {**dataclasses.asdict(self.train), "out": self.out},
            "generate": dataclasses.asdict(self.generate),
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "recipe") -> Recipe:
        if not isinstance(d, dict):
            raise UserError(f"{source}: a recipe is a table of sections, got {type(d).__name__}")
        unknown = sorted(set(d) - {"data", "model", "train", "generate"})
        if unknown:
            raise UserError(f"{source}: unknown section(s) {', '.join(unknown)}; expected data, model, train, generate")
        sections = {}
        for name in ("data", "model", "train", "generate"):
            sections[name] = d.get(name, {})
            if not isinstance(sections[name], dict):
                raise UserError(f"{source}: [{name}] must be a table")
        recipe = cls()
        for section, values in sections.items():
            for key, value in values.items():
                _set_field(recipe, section, key, value, from_text=False)
        return recipe._validated()

    def _validated(self) -> Recipe:
        """Rebuild the dataclasses so their checks run on the final values (fields are set one at a time)."""

        self.train = TrainConfig(**dataclasses.asdict(self.train))
        if self.generate.top_k == 0:  # no top-k filter, as generate's --top-k 0
            self.generate.top_k = None
        # An unknown preset or impossible model field fails here, before any data is read; so does a block too long.
        check_block_size(self.train.block_size, self.model_config())
        g = self.generate  # and bad sampling settings before hours of training, not after
        check_sampling(g.max_new_tokens, prefix="generate.", **g.sampling())
        return self

    def check_for_run(self) -> None:
        """What `tinygemma run` needs beyond what training does, refused before it prepares or trains anything:
        [data]'s settings, and prompts that can be sampled (each some text, a seed within 64 bits, room in the
        model's positions for new tokens). A saved run's recipe is read without these: they never stop a resume."""
        self.data.validate()
        self.check_generate()

    def check_generate(self) -> None:
        """[generate]'s prompts can be sampled: each some text, a seed within 64 bits, room in the model's
        positions for new tokens (`run`'s samples, train's sample_interval, an export's model card)."""
        g = self.generate
        check_sampling(g.max_new_tokens, seed=g.seed, prompts=len(g.prompts), prefix="generate.", **g.sampling())
        for prompt in g.prompts:
            if not isinstance(prompt, str) or not prompt:
                raise UserError(f"generate.prompts holds {prompt!r}: each prompt must be some text to continue")
            if LONE_SURROGATE.search(prompt):  # (a byte that is not UTF-8 in --set's argument)
                raise UserError(f"generate.prompts holds {prompt!r}, which is not UTF-8 text; give it in UTF-8")
        positions = self.model_config().max_position_embeddings
        if g.prompts and g.max_new_tokens > positions:  # a one-token prompt and positions - 1 fed back
            raise UserError(f"generate.max_new_tokens {g.max_new_tokens} leaves no room for a prompt in the "
                            f"model's {positions} positions (max_position_embeddings)")


def checked_recipe(recipe: Recipe) -> Recipe:
    """A checked copy of `recipe`: what training and `run` take, since a notebook may set fields on a Recipe after
    it was made (recipe.train.max_steps = 20 below its warmup, recipe.out = Path(...)); `recipe` is left as it was."""
    if not isinstance(recipe, Recipe):
        raise UserError(f"recipe must be a Recipe (tinygemma.config.load_recipe makes one), got "
                        f"{type(recipe).__name__}")
    for name, kind in (("data", DataConfig), ("train", TrainConfig), ("generate", GenerateConfig)):
        if not isinstance(getattr(recipe, name), kind):  # (a notebook's recipe.train = dict(...))
            raise UserError(f"recipe.{name} must be a {kind.__name__}, got {type(getattr(recipe, name)).__name__}: set "
                            f"its fields instead (recipe.{name}.FIELD = VALUE)")
    return Recipe.from_dict(recipe.to_dict(), source="the recipe")


def load_recipe(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe from a TOML file (or the defaults), then `section.field=value` overrides; a bare `field=value`
    means `train.field`. Unknown sections or fields and ill-typed values are UserErrors naming them."""
    if path is None:
        recipe = Recipe()
    elif not isinstance(path, (str, os.PathLike)):  # (open(5) would read file descriptor 5)
        raise UserError(f"a recipe is given by its file's path, got {path!r}")
    else:
        try:
            with open(path, "rb") as f:  # (utf-8-sig: a byte-order mark, as Windows' Notepad writes, is no TOML)
                recipe = Recipe.from_dict(tomllib.loads(f.read().decode("utf-8-sig")), source=str(path))
        except FileNotFoundError:
            raise UserError(f"recipe not found: {path}") from None
        except IsADirectoryError:
            raise UserError(f"recipe {path} is a folder, not a TOML file") from None
        except UnicodeDecodeError:
            raise UserError(f"{path} is not a recipe: not UTF-8 text, as TOML is") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path} is not valid TOML ({e})") from None
    return apply_overrides(recipe, overrides)


def parse_override(item: str) -> tuple[str, str]:
    """--set's KEY=VALUE as ("section.name", value): a bare name is train's (--set max_steps=100)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects KEY=VALUE, got {item!r}")
    key = key.strip()
    key = key if "." in key else f"train.{key}"
    # a stop text is taken as it is: a newline (one paragraph) or a leading space is the text itself
    return key, (value if key == "generate.stop" else value.strip())


def apply_overrides(recipe: Recipe, overrides: list[str] | tuple[str, ...]) -> Recipe:
    if isinstance(overrides, str):  # one KEY=VALUE, not its letters each taken for one
        overrides = [overrides]
    for item in overrides:
        key, value = parse_override(item)
        section, _, name = key.rpartition(".")
        _set_field(recipe, section, name, value, from_text=True)
    return recipe._validated()


NAMED_SETTINGS = {"model.preset": "a model preset", "train.out": "the run's folder", "data.dir": "the prepared data's folder"}


# The settings that name files or folders: a NUL character in one (a TOML's "\u0000") is no path the system
# takes, and os.path's ValueError was a traceback
PATH_SETTINGS = ("train.out", "train.init_from", "data.dir", "data.source", "data.val_source", "data.tokenizer")


def _set_field(recipe: Recipe, section: str, name: str, value, from_text: bool) -> None:
    key = f"{section}.{name}"
    if key in NAMED_SETTINGS and isinstance(value, str) and not value.strip():  # "" would read as the current folder
        raise UserError(f"{key} is empty: it must name {NAMED_SETTINGS[key]}")
    if key in PATH_SETTINGS and any("\0" in str(os.fspath(v)) for v in (value if isinstance(value, list) else [value])
                                    if isinstance(v, (str, os.PathLike))):  # (a Path, from Python)
        raise UserError(f"{key} holds a NUL character, which no path can: {value!r}")
    if section == "model":
        if name == "preset":
            recipe.model_preset = _coerce(value, str, key, from_text)
            return
        types = _field_types(ModelConfig)
        if name not in types:
            raise UserError(f"unknown setting {key}; model fields are preset, {', '.join(types)}")
        recipe.model_overrides[name] = _coerce(value, types[name], key, from_text)
        return
    if section == "train" and name == "out":
        recipe.out = _coerce(value, str, key, from_text)
        return
    targets = {"data": recipe.data, "train": recipe.train, "generate": recipe.generate}
    if section not in targets:
        raise UserError(f"unknown section in {key}; expected data, model, train or generate")
    types = _field_types(type(targets[section]))
    if name not in types:
        extra = ", out" if section == "train" else ""
        raise UserError(f"unknown setting {key}; {section} fields are {', '.join(types)}{extra}")
    setattr(targets[section], name, _coerce(value, types[name], key, from_text))


@functools.cache  # typing's reading of the annotations took a twentieth of a tiny training run, field by field
def _field_types(cls) -> dict:
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value, tp, key: str, from_text: bool):
    """`value` (a TOML value, or a command-line string when `from_text`) as the field type `tp`."""
    import types
    import typing

    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
        # TOML has no null: a recipe file writes "none", as its comments say; on the command line, nothing is none
        nothing = ("none", "null", "") if from_text else ("none", "null")
        if value is None or isinstance(value, str) and value.lower() in nothing:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    origin = typing.get_origin(tp)
    read = _read_list if origin in (list, tuple) else _READERS[tp]
    try:
        value = read(value, from_text, key)
        return tuple(value) if origin is tuple else value
    except (ValueError, KeyError, TypeError, decimal.InvalidOperation):
        pass
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, "a list of strings")
    if key == "train.micro_batch_size":  # a str field for "auto", whose numbers are whole ones (4.0 said "a string")
        expected = "auto or a positive integer"
    quoted = not from_text and isinstance(value, str) and tp in (int, float, bool)
    raise UserError(f"{key} must be {expected}, got {value!r}"
                    + (" (a quoted string in the recipe file: numbers and true/false go without quotes)"
                       if quoted else ""))


# Each reader takes a TOML value, or a command-line string when `from_text`, and raises ValueError (KeyError,
# TypeError) for a value that is not of its type; _coerce then names the setting and the type.


def _read_list(value, from_text: bool, key: str) -> list[str]:
    if from_text:
        value = _parse_prompts(value) if key in ("generate.prompts", "generate.stop") else _parse_text_list(value)
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if isinstance(value, tuple):  # (from Python)
        value = list(value)
    if isinstance(value, list):  # a notebook's Path objects, as their text
        value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError
    return value


BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _read_bool(value, from_text: bool, key: str) -> bool:
    if from_text:
        return BOOLEAN_WORDS[value.lower()]
    if not isinstance(value, bool):
        raise ValueError
    return value


def _read_int(value, from_text: bool, key: str) -> int:
    if not from_text:
        if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:  # TOML's 1e4, exact
            return int(value)
        if not is_integer(value):  # (numpy's too, from a notebook)
            raise ValueError
        return int(value)
    try:
        return int(value.replace("_", ""))  # exactly, however large (a seed of 64 bits)
    except ValueError:
        # 1e4 and 4096.0 are whole numbers too, read exactly (through a float, a 17-digit seed would change silently)
        number = decimal.Decimal(value.replace("_", ""))
    # (past any setting's range, 1e500000000 would be built digit by digit: refused as it is)
    if not number.is_finite() or number.adjusted() > 30 or number != number.to_integral_value():
        raise ValueError
    return int(number)


def _read_float(value, from_text: bool, key: str) -> float:
    if from_text:
        value = float(value.replace("_", ""))
    if not is_real(value) or value != value or abs(value) == float("inf"):  # (numpy's too)
        raise ValueError
    return float(value)


def _read_str(value, from_text: bool, key: str) -> str:
    """Text; a recipe file's true or false for train.compile, and its number for train.micro_batch_size (other
    settings' numbers and booleans were taken as their text: `out = 5` trained into a folder named 5)."""
    if isinstance(value, os.PathLike):  # train.out = Path("runs/x") from Python
        value = os.fspath(value)
    if isinstance(value, bool) and key == "train.compile":
        return "true" if value else "false"
    if is_integer(value) and not isinstance(value, bool) and key == "train.micro_batch_size":
        return str(int(value))
    if not isinstance(value, str):
        raise ValueError
    return value


_READERS = {bool: _read_bool, int: _read_int, float: _read_float, str: _read_str}


def _parse_prompts(text: str) -> list[str]:
    """--set generate.prompts=TEXT (or generate.stop=TEXT): a TOML array of prompts, or else one prompt, its commas
    and brackets its own; nothing at all is no prompt."""
    if not text:
        return []
    try:
        return _parse_text_list(text) if text.startswith("[") else [text]
    except ValueError:  # "[Title] Once upon a time"
        return [text]


def _parse_text_list(text: str) -> list[str]:
    """A command-line list: a TOML array (`["a", "b"]`) or comma-separated words (`a,b`)."""
    if text.startswith("["):
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            raise ValueError from None
    return [part.strip() for part in text.split(",") if part.strip()]


FLOAT32_MAX = 3.4028234663852886e38
MAX_VOCAB_PAD_MULTIPLE = 1 << 16  # model.vocab_pad_multiple
MAX_LAYERS = 1 << 10  # model.n_layers: 16x Gemma 3 27B's 62 (the model is built a module at a time)
# model.d_model, n_heads, n_kv_heads, head_dim, mlp_dim: 48x Gemma 3 27B's MLP width; a weight of three (the query
# projection's d_model x n_heads x head_dim) stays within int64
MAX_MODEL_DIM = 1 << 20
MAX_BATCH = 1 << 20  # train.batch_size, train.grad_accum_steps and train.eval_batches
MAX_STEPS = 10**12  # optimizer steps: a trillion, past any run (the ETA of 1e30 steps was 10^29 hours)


def check_block_size(block_size: int, model_config: ModelConfig) -> None:
    """Refuse windows longer than the model has positions for."""
    if block_size > model_config.max_position_embeddings:
        raise UserError(f"train.block_size {block_size} exceeds model.max_position_embeddings "
                        f"{model_config.max_position_embeddings}")


def story_paths(value, refusal: str) -> list[str]:
    """Story sources given as one path or a list of paths (str or PathLike), as a list of strings: one path is one
    source, not its letters. Anything else is refused as "`refusal`, got VALUE"."""
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if not (isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value)):
        raise UserError(f"{refusal}, got {value!r}")
    paths = [os.fspath(v) for v in value]  # (a PathLike's path, not its str(): os.DirEntry's is its repr)
    if not all(isinstance(v, str) for v in paths):  # a path-like of bytes
        raise UserError(f"{refusal}, got {value!r}")
    if any(not v.strip() for v in paths):  # "" would be read as the current folder
        raise UserError(f"{refusal}, got {value!r}: an empty path")
    return paths


def is_integer(value) -> bool:
    """An integer from Python code (numpy's too), not a bool: what a setting taken from the Python API must be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (an integer too; numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(obj, name: str, minimum: int | None, section: str = "train", what: str | None = None) -> None:
    """The setting `section.name` of `obj` must be an integer >= `minimum` (None: any); numpy's integers, from a
    notebook, become Python's, as config.json is written as JSON."""
    value = getattr(obj, name)
    if not is_integer(value) or minimum is not None and value < minimum:
        raise UserError(f"{section}.{name} must be {what or f'an integer >= {minimum}'}, got {value!r}")
    setattr(obj, name, int(value))


def _check_number(obj, name: str, ok, what: str, section: str = "train") -> None:
    value = getattr(obj, name)
    if not is_real(value) or value != value or not ok(value):
        raise UserError(f"{section}.{name} must be {what}, got {value!r}")
    if not isinstance(value, int):
        setattr(obj, name, float(value))  # numpy's float32 too (config.json is JSON)


# Largest vocabulary we prepare data for: Gemma 3's largest embedding table (262,208 rows). Gemma 3's own
# tokenizer.json (ids up to 262,144, <image_soft_token>) fits.
MAX_VOCAB_SIZE = 262_208
# A model's: room for a Gemma 3 whose embedding grew with added tokens; far beyond it, gigabytes of rows for nothing.
MAX_MODEL_VOCAB_SIZE = 2**22

# torch.Generator.manual_seed takes a 64-bit seed; a run's prompt i samples with seed + i.
MAX_SEED = 2**63 - 1
MAX_TRAIN_SEED = 2**64 - 1  # torch.manual_seed and numpy's default_rng([seed, step]) take any 64-bit seed


def check_stop(stop, name: str = "stop") -> tuple[str, ...]:
    """Stop strings as a tuple: each some text; one string alone is taken as one stop string."""
    stops = (stop,) if isinstance(stop, str) else stop
    if stops is None:
        return ()
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise UserError(f"{name} must be text, or a list of texts, none of them empty, got {stop!r}")
    if bad := next((s for s in stops if LONE_SURROGATE.search(s)), None):
        raise UserError(f"{name} {bad!r} is not UTF-8 text; give it in UTF-8")
    return tuple(stops)


def check_sampling(max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None, prompts: int = 1, prefix: str = "", repetition_penalty: float = 1.0,
                   min_p: float | None = None, stop=None) -> None:
    """Refuse sampling settings (and stop texts, as check_stop) that cannot work: in one line, before a model is
    loaded or trained. Each is named as the user gave it: `prefix` "generate." (a recipe's [generate], apart from
    train.seed), "--" (the generate command's options), "" (the Python arguments)."""
    def name(setting: str) -> str:
        return prefix + (setting.replace("_", "-") if prefix == "--" else setting)

    if seed is not None and not (is_integer(seed) and 0 <= seed <= MAX_SEED - max(prompts - 1, 0)):
        raise UserError(f"{name('seed')} must be an integer from 0 to {MAX_SEED - max(prompts - 1, 0):,} (a 64-bit "
                        f"seed), got {seed!r}")
    if not (is_integer(max_new_tokens) and max_new_tokens >= 0):
        raise UserError(f"{name('max_new_tokens')} must be an integer >= 0, got {max_new_tokens!r}")
    if not (is_real(temperature) and temperature >= 0 and not math.isinf(temperature)):
        raise UserError(f"{name('temperature')} must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and not (is_integer(top_k) and top_k >= 1):
        off = " (0 or none: no top-k filter)" if prefix else ""  # (the Python argument's off is None alone)
        raise UserError(f"{name('top_k')} must be an integer >= 1{off}, got {top_k!r}")
    if top_p is not None and not (is_real(top_p) and 0 < top_p <= 1):
        raise UserError(f"{name('top_p')} must be a number in (0, 1], got {top_p!r}")
    if min_p is not None and not (is_real(min_p) and 0 <= min_p <= 1):
        raise UserError(f"{name('min_p')} must be a number in [0, 1] (0 or none: off), got {min_p!r}")
    if not (is_real(repetition_penalty) and 0 < repetition_penalty < math.inf):
        raise UserError(f"{name('repetition_penalty')} must be a positive, finite number (1: none), got "
                        f"{repetition_penalty!r}")
    check_stop(stop, name("stop"))
