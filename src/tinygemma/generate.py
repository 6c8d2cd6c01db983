"""Generation and evaluation: `tinygemma generate` and `tinygemma eval`.

generate: a prompt and its continuation on stdout, streamed as the tokens are made (progress and logs go to
stderr), with the tokenizer that came with the checkpoint. The decoding itself is `Gemma3.generate_stream`.

eval: next-token loss over a prepared split in non-overlapping windows, as one JSON object with loss,
perplexity and bits per byte, the number that compares models across tokenizers.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tinygemma.checkpoint import load, parse_dtype, read_checkpoint_meta, resolve_checkpoint
from tinygemma.config import GenerateConfig
from tinygemma.errors import UserError
from tinygemma.model import Gemma3, check_sampling
from tinygemma.tokenizer import token_byte_lengths

DEFAULT_EVAL_BLOCK_SIZE = 512  # when the checkpoint records no training block size

# ------------------------------------------------------------------ loading


def pick_device(name: str = "auto") -> torch.device:
    """The device `name` names ("auto": CUDA, else MPS, else the CPU), checked to be there. Training uses it too."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} was asked for, but PyTorch sees no CUDA GPU")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name} was asked for, but this PyTorch has no MPS backend")
    return device


def _cpu_has_bf16() -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated, slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 where the device computes in it natively, else float32."""
    if name != "auto":
        return parse_dtype(name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_bf16() else torch.float32
    return torch.float32


def checkpoint_tokenizer(ckpt: str | Path, tokenizer: str | None = None):
    """The tokenizer that goes with a checkpoint: `tokenizer` ("gpt2" or a tokenizer.json path) if given, else
    the spec recorded in checkpoint.json at training time, else a transformers directory's tokenizer.json."""
    from tinygemma.tokenizer import TOKENIZER_FILE, load_tokenizer, tokenizer_from_spec

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    directory = resolve_checkpoint(ckpt)
    spec = read_checkpoint_meta(directory).get("tokenizer")
    if spec:
        return tokenizer_from_spec(spec, base_dir=directory)
    if (directory / TOKENIZER_FILE).exists():
        return load_tokenizer(directory)
    raise UserError(f"{directory} records no tokenizer and holds no {TOKENIZER_FILE}; name one with --tokenizer")


def load_model(ckpt: str | Path, tokenizer, dtype: str = "auto", device: str = "auto") -> Gemma3:
    """The checkpoint's model in eval mode, on `device` ("auto": a GPU if there is one) in `dtype` ("auto":
    bfloat16 where the device computes in it natively), checked to cover the tokenizer's ids."""
    dev = pick_device(device)
    model = load(ckpt, dtype=pick_dtype(dtype, dev), device=dev)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer ({tokenizer.identity}) has {tokenizer.vocab_size:,} tokens, more than the "
                        f"model's {model.config.vocab_size:,}: they do not belong together")
    return model


# ------------------------------------------------------------------ streaming text


class TextStream:
    """Turns token ids, one at a time, into text that can be printed as it comes.

    A token may end in the middle of a multi-byte character (GPT-2's byte-level BPE splits emoji and accented
    letters), so text is released only once it decodes without a trailing U+FFFD replacement character; the
    rest waits for the next token. A few tokens of context before the new ones are decoded with them, so that
    tokenizers whose decoding depends on the neighbours (SentencePiece's leading spaces) come out right.
    Decoding stays O(1) per token, not O(length).
    """

    def __init__(self, tokenizer, context: list[int] = (), context_tokens: int = 5):
        self.tokenizer = tokenizer
        self.ids = list(context)
        self.prefix_offset = max(0, len(self.ids) - context_tokens)  # start of the context decoded with new ids
        self.read_offset = len(self.ids)  # ids before this are already released

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete ("" while a character is unfinished)."""
        self.ids.append(int(token_id))
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is left at the end, unfinished characters included (as U+FFFD)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        done = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(self.ids) == self.read_offset or (text.endswith("\ufffd") and not final):
            return ""
        new = text[len(done) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new


# ------------------------------------------------------------------ generate


def generate_text(model: Gemma3, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  num_samples: int = 1, on_text=None) -> tuple[list[str], int]:
    """The prompt's continuations (without the prompt), one per sample, each ending at end of text or after
    `max_new_tokens` tokens; and the number of new tokens made, all samples together (end of text included).
    `on_text(sample, text)` receives each piece of text as soon as it is complete.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {num_samples}")
    if not prompt:
        raise UserError("the prompt is empty; give some text to continue")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError(f"the prompt {prompt!r} encodes to no tokens")
    limit = model.config.max_position_embeddings  # also bounds the KV cache, which holds every position
    if len(ids) + max_new_tokens > limit:
        raise UserError(f"the prompt's {len(ids)} tokens plus {max_new_tokens} new ones exceed the model's "
                        f"{limit} positions (max_position_embeddings); ask for fewer new tokens")
    device = model.embed_tokens.weight.device
    input_ids = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    eot = tokenizer.eot_id
    streams = [TextStream(tokenizer, context=ids) for _ in range(num_samples)]
    texts = [""] * num_samples
    finished = [False] * num_samples
    new_tokens = 0

    def emit(i: int, piece: str) -> None:
        if piece:
            texts[i] += piece
            if on_text is not None:
                on_text(i, piece)

    for tokens in model.generate_stream(input_ids, max_new_tokens, temperature, top_k, top_p, eos_id=eot,
                                        generator=generator):
        for i, token in enumerate(tokens.tolist()):
            if finished[i]:
                continue
            new_tokens += 1
            if token == eot:
                finished[i] = True
                emit(i, streams[i].flush())
            else:
                emit(i, streams[i].push(token))
    for i in range(num_samples):
        if not finished[i]:
            emit(i, streams[i].flush())
    return texts, new_tokens


SAMPLE_SEPARATOR = "\n---\n"  # between samples on stdout, when there are several


def _generate_main(args) -> int:
    # Every argument is checked before the (slow) model load.
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if not args.prompt:
        raise UserError("--prompt is empty; give some text to continue")
    started = time.perf_counter()
    tokenizer = checkpoint_tokenizer(args.ckpt, args.tokenizer)
    model = load_model(args.ckpt, tokenizer, args.dtype, args.device)
    weight = model.embed_tokens.weight
    print(f"loaded {args.ckpt} ({model.num_params() / 1e6:.1f}M parameters, "
          f"{str(weight.dtype).removeprefix('torch.')}, {weight.device}) and tokenizer "
          f"{tokenizer.identity} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    out = sys.stdout

    if args.num_samples == 1:  # stream: each piece of text is printed as soon as it is complete
        out.write(args.prompt)
        out.flush()

        def on_text(_, piece):
            out.write(piece)
            out.flush()
    else:  # a batch of samples advances together; print each whole, one after another
        on_text = None
    started = time.perf_counter()
    texts, n_tokens = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                                    args.top_k, args.top_p, args.seed, args.num_samples, on_text)
    seconds = time.perf_counter() - started
    if args.num_samples == 1:
        out.write("\n")
    else:
        out.write(SAMPLE_SEPARATOR.join(args.prompt + text for text in texts) + "\n")
    out.flush()
    print(f"{n_tokens} new tokens in {seconds:.2f}s ({n_tokens / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ evaluate


def nats_and_bytes(nats: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor) -> torch.Tensor:
    """The four sums evaluation adds up, float64: nats of every prediction, predictions, nats of the predictions
    that stand for text, and the UTF-8 bytes those stand for (`token_bytes[id]`, 0 for end-of-text and other
    special tokens). Loss is the first over the second; bits per byte the third / ln 2 over the fourth (as
    nanochat), so models with different tokenizers compare. Training's evaluation uses it too."""
    nats, nbytes = nats.reshape(-1).double(), token_bytes[targets.reshape(-1)].double()
    return torch.stack([nats.sum(), nats.new_tensor(nats.numel()), nats[nbytes > 0].sum(), nbytes.sum()])


def summarize(sums: torch.Tensor) -> dict:
    nats, predicted, text_nats, nbytes = sums.tolist()
    loss = nats / predicted
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": text_nats / math.log(2) / nbytes if nbytes else None,
            "tokens": int(predicted), "bytes": int(nbytes)}


def check_evaluation(block_size: int, batch_size: int, max_tokens: int | None) -> None:
    if block_size < 1:
        raise UserError(f"block_size must be >= 1, got {block_size}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        raise UserError(f"max_tokens must be >= 2 (one to read, one to predict), got {max_tokens}")


@torch.no_grad()
def evaluate(model: Gemma3, tokens, block_size: int, batch_size: int = 8, max_tokens: int | None = None,
             device=None, token_bytes=None, progress: bool = False) -> dict:
    """Loss, perplexity and bits per byte over `tokens` (a 1-D array of ids: a numpy memmap is read a batch at a
    time, so memory stays bounded) or over its first `max_tokens`.

    The tokens are cut into non-overlapping windows of `block_size` predictions: window w reads tokens
    [w*B, (w+1)*B) and predicts [w*B + 1, (w+1)*B + 1), so every token but the first is predicted exactly once,
    with between 0 and B-1 tokens of context; the last window may be shorter.

    `token_bytes` (tokenizer.token_byte_lengths) gives the UTF-8 bytes each id stands for; bits per byte is
    None without it. See `nats_and_bytes` for the definitions.
    """
    check_evaluation(block_size, batch_size, max_tokens)
    n = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))
    if n < 2:
        raise UserError(f"{n} tokens to evaluate: at least 2 are needed (one to read, one to predict)")
    device = device or model.embed_tokens.weight.device
    token_bytes = torch.zeros(model.config.vocab_size, dtype=torch.int64) if token_bytes is None else token_bytes
    token_bytes = torch.as_tensor(token_bytes).to(device)
    was_training = model.training
    model.eval()
    predicted = n - 1
    starts = list(range(0, predicted, block_size))
    full = [s for s in starts if s + block_size <= predicted]
    tail = [s for s in starts if s + block_size > predicted]
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    try:
        from tqdm import tqdm

        with tqdm(total=predicted, unit="tok", unit_scale=True, disable=not progress, file=sys.stderr) as bar:
            batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in tail]
            for batch in batches:
                length = min(block_size, predicted - batch[0])  # block_size except for the tail window
                rows = np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in batch])
                window = torch.from_numpy(rows).to(device, non_blocking=True)
                x, y = window[:, :-1], window[:, 1:]
                sums += nats_and_bytes(model(x, y, reduction="none"), y, token_bytes)
                bar.update(len(batch) * length)
    finally:
        model.train(was_training)
    return summarize(sums)


def _eval_main(args) -> int:
    from tinygemma.data import open_prepared

    trained = (read_checkpoint_meta(args.ckpt).get("train") or {}).get("block_size")  # train.py records it
    block_size = args.block_size if args.block_size is not None else trained or DEFAULT_EVAL_BLOCK_SIZE
    check_evaluation(block_size, args.batch_size, args.max_tokens)  # before the (slow) model load
    data = open_prepared(args.data)
    tokens = data.split(args.split)
    tokenizer = checkpoint_tokenizer(args.ckpt, args.tokenizer)
    data_tokenizer = data.tokenizer()
    if data_tokenizer.identity != tokenizer.identity:
        raise UserError(f"{args.data} was prepared with tokenizer {data_tokenizer.identity}, but the checkpoint "
                        f"uses {tokenizer.identity}: its token ids mean other text to this model. Prepare the "
                        "data with the checkpoint's tokenizer.")
    model = load_model(args.ckpt, tokenizer, args.dtype, args.device)
    if data.vocab_size > model.config.vocab_size:
        raise UserError(f"{args.data} has {data.vocab_size:,} token ids, more than the model's "
                        f"{model.config.vocab_size:,}")
    started = time.perf_counter()
    result = evaluate(model, tokens, block_size, args.batch_size, args.max_tokens,
                      token_bytes=token_byte_lengths(tokenizer, model.config.vocab_size), progress=True)
    seconds = time.perf_counter() - started
    print(f"evaluated {result['tokens']:,} tokens in {seconds:.1f}s", file=sys.stderr)
    result.update(split=args.split, block_size=block_size,
                  dtype=str(model.embed_tokens.weight.dtype).removeprefix("torch."))
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------ command line


def _add_model_arguments(p) -> None:
    p.add_argument("--ckpt", required=True,
                   help="run directory (its best checkpoint, else its last), checkpoint directory, or transformers "
                        "Gemma 3 directory")
    p.add_argument("--tokenizer", default=None,
                   help="gpt2 or a tokenizer.json path (default: the checkpoint's own, or the transformers "
                        "directory's tokenizer.json)")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 where the device computes in it natively, else float32), float32, "
                        "bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")


def register(subparsers) -> None:
    defaults = GenerateConfig()  # the recipe's [generate] defaults
    p = subparsers.add_parser("generate", help="continue a prompt with a trained model, streaming the text")
    _add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                   help=f"stop after this many new tokens, or at end of text (default {defaults.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=defaults.temperature,
                   help=f"softmax temperature; 0 is greedy and deterministic (default {defaults.temperature})")
    p.add_argument("--top-k", type=int, default=defaults.top_k,
                   help=f"sample only among the k most likely tokens (default {defaults.top_k})")
    p.add_argument("--top-p", type=float, default=defaults.top_p,
                   help="nucleus sampling: only the most likely tokens whose probabilities add up to p, in (0, 1] "
                        f"(default {defaults.top_p})")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help=f"sampling seed: the same seed gives the same text (default {defaults.seed})")
    p.add_argument("--num-samples", type=int, default=1,
                   help="continuations generated together in one batch; printed one after another, separated "
                        "by a line '---' (only a single sample is streamed)")
    p.set_defaults(func=_generate_main)

    p = subparsers.add_parser("eval", help="next-token loss, perplexity and bits per byte on prepared data")
    _add_model_arguments(p)
    p.add_argument("--data", required=True, help="directory written by `tinygemma prepare`")
    p.add_argument("--split", default="val", help="split to evaluate (default val)")
    p.add_argument("--block-size", type=int, default=None,
                   help=f"tokens predicted per window (default: the training block size, else {DEFAULT_EVAL_BLOCK_SIZE})")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the split's first N tokens")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.set_defaults(func=_eval_main)
