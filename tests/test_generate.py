"""Generation: sampling filters on hand-made logits, determinism, stopping at end of text, streaming text, CLI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_model import make_pair, small_config  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

import tinygemma.generate
from tinygemma import Gemma3, ModelConfig, UserError, load
from tinygemma.checkpoint import save_model
from tinygemma.cli import main
from tinygemma.config import check_stop
from tinygemma.files import atomic_write_json
from tinygemma.generate import (
    Sample,
    StopText,
    TextStream,
    filter_logits,
    generate,
    generate_samples,
    generate_stream,
    generate_text,
    sample_next_token,
)
from tinygemma.tokenizer import GPT2Tokenizer, HFTokenizer, load_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[1]
GPT2_SPEC = {"kind": "gpt2", "vocab_size": 50257, "eot_id": 50256}
PROMPT = "Once upon a time"


def tiny_model(seed: int = 0, **overrides) -> Gemma3:
    """gemma3-tiny shrunk further: GPT-2's vocabulary, 2 layers (sliding then global), d_model 64."""
    config = ModelConfig.preset("gemma3-tiny", **{"d_model": 64, "n_layers": 2, "sliding_window_pattern": 2,
                                                  "mlp_dim": 128, "sliding_window": 8, **overrides})
    torch.manual_seed(seed)
    return Gemma3(config).eval()


def greedy_by_forward(model: Gemma3, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """The prompt and `n_new` greedy tokens from the model's whole forward, the sequence read anew for each token
    (no cache, no decode plan): what generate(..., temperature=0) must give."""
    seq = prompt
    with torch.no_grad():
        for _ in range(n_new):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.fixture(scope="module")
def tokenizer():
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model) -> Path:
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(model, directory, {"tokenizer": GPT2_SPEC})
    return directory


def greedy(model, tokenizer, n: int) -> str:
    return generate_text(model, tokenizer, PROMPT, n, temperature=0)[0][0]


# ------------------------------------------------------------------ top-k / top-p on hand-made logits


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([1.0, 4.0, 3.0, -2.0, 2.0])
    assert kept(filter_logits(logits, top_k=1)) == [1]
    assert kept(filter_logits(logits, top_k=3)) == [1, 2, 4]
    assert kept(filter_logits(logits, top_k=5)) == [0, 1, 2, 3, 4]
    assert kept(filter_logits(logits, top_k=100)) == [0, 1, 2, 3, 4]  # k beyond the vocabulary: nothing cut
    out = filter_logits(logits, top_k=3)
    assert torch.equal(out[[1, 2, 4]], logits[[1, 2, 4]])  # kept logits are unchanged


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 2), 0.05 (id 0)
    logits = probs.log()
    assert kept(filter_logits(logits, top_p=0.4)) == [1]  # 0.5 alone reaches 0.4
    assert kept(filter_logits(logits, top_p=0.5)) == [1]  # ... and 0.5 exactly
    assert kept(filter_logits(logits, top_p=0.6)) == [1, 3]  # 0.5 < 0.6: the token crossing p is kept
    assert kept(filter_logits(logits, top_p=0.9)) == [1, 2, 3]  # 0.5 + 0.3 + 0.15 = 0.95 >= 0.9
    assert kept(filter_logits(logits, top_p=1.0)) == [0, 1, 2, 3]
    # Rows are filtered independently, and the kept tokens' renormalised probabilities are the originals'.
    batch = torch.stack([logits, logits.flip(0)])
    out = filter_logits(batch, top_p=0.6)
    assert kept(out[0]) == [1, 3] and kept(out[1]) == [0, 2]
    assert torch.allclose(out[0].softmax(-1)[[1, 3]], torch.tensor([0.5, 0.3]) / 0.8)


def test_a_top_p_below_float32_s_least_keeps_the_most_likely_token():
    """top_p = 1e-300 is in (0, 1] but rounds to 0 against float32 masses: every token was cut, softmax gave NaN,
    and torch.multinomial a traceback. The most likely token always stays."""
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    assert kept(filter_logits(logits[0], top_p=1e-300)) == [1]
    assert sample_next_token(logits, temperature=1.0, top_p=1e-300).tolist() == [1]


def test_top_p_over_a_large_vocabulary_keeps_the_exact_nucleus():
    """Over Gemma's 262,144 tokens float32's running sum drifted by ~1e-5 and kept 2,448 tokens where the exact
    nucleus (and transformers) holds 2,450."""
    torch.manual_seed(0)
    logits = torch.randn(4, 262144) * 4
    for top_p in (0.9, 0.95, 0.99):
        probs = logits.double().softmax(-1).sort(-1, descending=True).values
        exact = ((probs.cumsum(-1) - probs) < top_p).sum(-1)  # float64: the tokens before the mass reaches top_p
        assert torch.isfinite(filter_logits(logits, None, top_p)).sum(-1).tolist() == exact.tolist()


def test_top_k_then_top_p():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    # top-k 2 leaves ids 1 and 3 with probabilities 0.625 and 0.375; top-p 0.6 then keeps id 1 alone.
    assert kept(filter_logits(logits, top_k=2, top_p=0.6)) == [1]
    assert kept(filter_logits(logits, top_k=3, top_p=0.99)) == [1, 2, 3]


def test_min_p_is_transformers_own_after_top_k_and_top_p():
    """min_p keeps the tokens at least min_p x the most likely one's probability, after top-k and top-p: the same
    tokens as transformers' warpers in their own order (temperature, top-k, top-p, min-p), on random logits."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    assert kept(filter_logits(logits, min_p=0.5)) == [1, 3]  # 0.3 >= 0.25 > 0.15
    assert kept(filter_logits(logits, top_k=3, top_p=0.99, min_p=0.61)) == [1]  # 0.3 < 0.61 x 0.5 (both / 0.95)
    assert kept(filter_logits(logits, top_k=3, top_p=0.99, min_p=0.59)) == [1, 3]
    assert kept(filter_logits(logits, min_p=1.0)) == [1] and kept(filter_logits(logits, min_p=0)) == [0, 1, 2, 3]
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 500, generator=g) * 3
    for temperature, top_k, top_p, min_p in ((1.0, None, None, 0.1), (0.7, 50, None, 0.05), (1.3, 100, 0.9, 0.2)):
        ours = filter_logits(scores / temperature, top_k, top_p, min_p)
        theirs = TemperatureLogitsWarper(temperature)(None, scores)
        if top_k:
            theirs = TopKLogitsWarper(top_k)(None, theirs)
        if top_p:
            theirs = TopPLogitsWarper(top_p)(None, theirs)
        theirs = MinPLogitsWarper(min_p)(None, theirs)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    # Sampled at min_p = 1, only the most likely token is left: the greedy tokens.
    logits = torch.randn(8, 500, generator=g)
    assert torch.equal(sample_next_token(logits, 1.0, generator=g, min_p=1.0), logits.argmax(-1))


def test_the_racing_draw_is_multinomials_own():
    """Sampling draws as torch.multinomial does one sample (the largest probs / exponential(1)) without its checks,
    which read the device back; MPS takes multinomial itself. The same tokens for the same generators, one or a
    generator per row, over filtered (zero) probabilities too."""
    from tinygemma.generate import draw_multinomial, draw_racing

    probs = (torch.randn(6, 300, generator=torch.Generator().manual_seed(1)) * 2).softmax(-1)
    probs[:, ::3] = 0
    for _ in range(20):
        one = [torch.Generator().manual_seed(7) for _ in range(2)]
        rows = [[torch.Generator().manual_seed(i) for i in range(6)] for _ in range(2)]
        assert torch.equal(draw_racing(probs, one[0]), draw_multinomial(probs, one[1]))
        assert torch.equal(draw_racing(probs, rows[0]), draw_multinomial(probs, rows[1]))
        probs = probs.roll(1, dims=-1)


def test_sampling_draws_only_from_the_filtered_tokens():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, 1.0, top_p=0.6, generator=g).tolist()) == {1, 3}
    assert set(sample_next_token(logits, 1.0, top_k=3, generator=g).tolist()) == {1, 2, 3}
    assert set(sample_next_token(logits, 5.0, top_k=1, generator=g).tolist()) == {1}
    assert set(sample_next_token(logits, 0.0).tolist()) == {1}  # temperature 0: argmax
    # Unfiltered, the frequencies follow the probabilities.
    draws = sample_next_token(logits[:1].expand(20000, 4), 1.0, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.05, 0.5, 0.15, 0.3]), atol=0.02)


# ------------------------------------------------------------------ determinism and stopping


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(model, tokenizer):
    runs = [generate_text(model, tokenizer, PROMPT, 12, temperature=0)[0] for _ in range(2)]
    assert runs[0] == runs[1] and runs[0][0]
    # Greedy ignores the seed and the filters.
    assert generate_text(model, tokenizer, PROMPT, 12, temperature=0, top_k=3, seed=5)[0] == runs[0]
    a = generate_text(model, tokenizer, PROMPT, 12, temperature=1.0, seed=1, num_samples=3)[0]
    b = generate_text(model, tokenizer, PROMPT, 12, temperature=1.0, seed=1, num_samples=3)[0]
    c = generate_text(model, tokenizer, PROMPT, 12, temperature=1.0, seed=2, num_samples=3)[0]
    assert a == b and a != c
    assert len(set(a)) == 3  # the samples of a batch differ from each other
    # Sample i is the one seed + i gives alone, whatever the batch (it depended on how many were asked for).
    assert [generate_text(model, tokenizer, PROMPT, 12, temperature=1.0, seed=1 + i)[0][0] for i in range(3)] == a
    assert c[:2] == a[1:]


def test_stops_at_end_of_text(model, tokenizer):
    """With an end-of-text id equal to the greedy continuation's 4th token, generation stops right before it."""
    prompt_ids = tokenizer.encode(PROMPT)
    tokens = generate(model, torch.tensor([prompt_ids]), 12, temperature=0)[0, len(prompt_ids):].tolist()
    stop = next(i for i in range(3, 12) if tokens[i] not in tokens[:i])

    ends_early = GPT2Tokenizer()
    ends_early.eot_id = tokens[stop]
    text, n_new = generate_text(model, ends_early, PROMPT, 12, temperature=0)
    assert text == [tokenizer.decode(tokens[:stop])]
    assert n_new == stop + 1  # the end-of-text token itself is made, but not printed
    # Without it, all 12 tokens.
    text, n_new = generate_text(model, tokenizer, PROMPT, 12, temperature=0)
    assert text == [tokenizer.decode(tokens)] and n_new == 12
    # A batch of greedy rows, alike (rows that end apart: the test below).
    texts, _ = generate_text(model, ends_early, PROMPT, 12, temperature=0, num_samples=2)
    assert texts == [tokenizer.decode(tokens[:stop])] * 2


def test_each_sample_of_a_batch_stops_at_its_own_end_of_text(model, tokenizer):
    """Two sampled rows, end of text set to a token the first draws early and the second never: the first ends
    there (then end of text to the end of the tensor), the second runs to max_new_tokens."""
    ids = torch.tensor([tokenizer.encode(PROMPT)] * 2)
    T = ids.shape[1]

    def seeded(seed):
        return [torch.Generator().manual_seed(seed + i) for i in range(2)]

    for seed in range(100):  # the first seed whose rows give such a token
        rows = generate(model, ids, 12, temperature=1.0, generator=seeded(seed))[:, T:].tolist()
        stop = next((i for i in range(2, 8) if rows[0][i] not in rows[0][:i] + rows[1]), None)
        if stop is not None:
            break
    eos = rows[0][stop]
    out = generate(model, ids, 12, temperature=1.0, eos_id=eos, generator=seeded(seed))[:, T:].tolist()
    assert out[0] == rows[0][: stop + 1] + [eos] * (11 - stop) and out[1] == rows[1]
    ends_early = GPT2Tokenizer()
    ends_early.eot_id = eos
    texts, n_new = generate_text(model, ends_early, PROMPT, 12, temperature=1.0, seed=seed, num_samples=2)
    assert texts == [tokenizer.decode(rows[0][:stop]), tokenizer.decode(rows[1])] and n_new == stop + 1 + 12
    # generate_samples says how each ended, with its own count (the end of text's token counted)
    assert generate_samples(model, ends_early, PROMPT, 12, temperature=1.0, seed=seed, num_samples=2) == [
        Sample(texts[0], stop + 1, "end_of_text"), Sample(texts[1], 12, "length")]


def test_stop_text_releases_all_before_the_first_stop_string_met_and_nothing_after():
    """Against str.find on the text so far, after each piece: the text ends at the first stop string met as it
    grows (several met by one piece: the earliest), as llama.cpp's server stops. Random pieces over a small
    alphabet, so that stop strings are often split between pieces, their starts often occur without the rest,
    and one stop string often lies inside another (["abc", "b"]: pieces "a", "b" meet "b" first)."""
    rng = np.random.default_rng(0)
    overlapping = 0
    for _ in range(3000):
        text = "".join(rng.choice(list("abc"), rng.integers(0, 30)))
        stops = ["".join(rng.choice(list("abc"), rng.integers(1, 5))) for _ in range(rng.integers(1, 4))]
        cuts = sorted(rng.integers(0, len(text) + 1, rng.integers(0, 8)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        expected, met, so_far = text, False, ""
        for piece in pieces:
            so_far += piece
            found = [i for i in (so_far.find(stop) for stop in stops) if i >= 0]
            if found:
                expected, met = so_far[: min(found)], True
                break
        overlapping += met and expected != text[: min(i for i in (text.find(s) for s in stops) if i >= 0)]
        stopper, released, stopped = StopText(stops), "", False
        for piece in pieces:
            out, stopped = stopper.push(piece)
            released += out
            assert expected.startswith(released)  # never text at or past a stop string
            if stopped:
                break
        if not stopped:
            released += stopper.flush()
        assert (released, stopped) == (expected, met), (text, stops, pieces)
    assert overlapping > 0  # cases where the piece boundaries decide were drawn (and the three below)
    assert StopText(["abc", "b"]).push("a") == ("", False)
    stopper = StopText(["abc", "b"])
    assert [stopper.push(piece) for piece in ("a", "b")] == [("", False), ("a", True)]
    assert StopText(["abc", "b"]).push("abc") == ("", True)  # both met at once: the earliest


def test_stop_strings_end_each_sample_and_generation(model, tokenizer, monkeypatch):
    """The text ends before the stop string; the count ends at the token that completed it; each sample of a
    batch stops on its own, as the sample alone would; once all have stopped, no more tokens are made."""
    prompt_ids = tokenizer.encode(PROMPT)
    tokens = generate(model, torch.tensor([prompt_ids]), 12, temperature=0)[0, len(prompt_ids):].tolist()
    full = tokenizer.decode(tokens)
    # A stop string spanning tokens 4 and 5 (the end of one, the start of the next): held, then dropped.
    start = len(tokenizer.decode(tokens[:4])) - 1
    stop = full[start : start + 2]
    assert full.find(stop) == start, "the stop string must first occur there"
    pieces = []
    text, n_new = generate_text(model, tokenizer, PROMPT, 12, temperature=0, stop=["never in it", stop],
                                on_text=lambda i, piece: pieces.append(piece))
    assert text == [full[:start]] and "".join(pieces) == full[:start]
    assert n_new == 5
    assert generate_text(model, tokenizer, PROMPT, 12, temperature=0, stop=stop) == (text, n_new)  # one str
    assert generate_text(model, tokenizer, PROMPT, 12, temperature=0, stop="never in it") == ([full], 12)
    assert generate_samples(model, tokenizer, PROMPT, 12, temperature=0, stop=stop) == [Sample(full[:start], 5, "stop")]
    # A batch of sampled texts: each is its seed's text alone, cut at its own first stop string.
    alone = [generate_text(model, tokenizer, PROMPT, 12, temperature=1.0, seed=3 + i)[0][0] for i in range(3)]
    cut = "e"
    assert sum(cut in a for a in alone) >= 2
    texts, _ = generate_text(model, tokenizer, PROMPT, 12, temperature=1.0, seed=3, num_samples=3, stop=cut)
    assert texts == [a.split(cut)[0] for a in alone]
    # The steps the model takes: none after the stop string (the 5th token) when the only sample has stopped.
    steps = []

    def counted(*args, **kwargs):
        for tokens in generate_stream(*args, **kwargs):
            steps.append(tokens)
            yield tokens

    monkeypatch.setattr(tinygemma.generate, "generate_stream", counted)
    generate_text(model, tokenizer, PROMPT, 12, temperature=0, stop=stop)
    assert len(steps) == 5


@pytest.mark.parametrize("stop", ["", [""], ["a", 5], 5, "\udc80"])
def test_bad_stop_strings_are_user_errors(model, tokenizer, stop):
    with pytest.raises(UserError, match="stop"):
        generate_text(model, tokenizer, PROMPT, 4, stop=stop)


def test_max_new_tokens_zero(model, tokenizer):
    assert generate_text(model, tokenizer, PROMPT, 0, temperature=0) == ([""], 0)


@pytest.mark.parametrize("kwargs, says", [
    ({"temperature": -0.5}, "temperature must be a finite number >= 0, got -0.5"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
    ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\], got 1.5"),
    ({"top_k": 0}, "top_k must be an integer >= 1, got 0"),
    ({"min_p": -0.1}, r"min_p must be a number in \[0, 1\] .*, got -0.1"),
    ({"min_p": 1.5}, r"min_p must be a number in \[0, 1\] .*, got 1.5"),
    ({"min_p": "0.1"}, r"min_p must be a number in \[0, 1\] .*, got '0.1'"),
    ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0, got -1"),
    ({"num_samples": 0}, "num_samples must be an integer >= 1, got 0"),
    ({"prompt": ""}, "the prompt is empty"),
    ({"num_samples": "2", "seed": 1}, "num_samples must be an integer >= 1, got '2'"),  # TypeErrors from Python before
    ({"prompt": ["Once", "Hi"]}, "the prompt must be text .*, got list: for several prompts, call once per prompt"),
    ({"prompt": 5}, r"the prompt must be text \(a str\), got int"),
    # past the model's max_position_embeddings (2048) with the prompt
    ({"max_new_tokens": 2048}, "the prompt's 4 tokens plus 2048 new ones need more than the model's 2048 positions"),
])
def test_bad_arguments_are_user_errors(model, tokenizer, kwargs, says):
    args = {"prompt": PROMPT, "max_new_tokens": 4, **kwargs}
    with pytest.raises(UserError, match=says):
        generate_text(model, tokenizer, **args)


def test_prompts_of_the_wrong_kind_and_a_tokenizer_too_big_are_user_errors(model, tokenizer):
    """From Python: a 1-d tensor, a list or float ids say what generate takes; a tokenizer with more ids than the
    model has rows is refused as the command line refuses it (it was an IndexError from the embedding)."""
    for ids in (torch.tensor([1, 2, 3]), [[1, 2, 3]], torch.tensor([[1.0, 2.0]]), torch.tensor([[True, False]])):
        with pytest.raises(UserError, match=r"\[batch, tokens\] tensor of integer token ids"):
            generate(model, ids, 2)
    # int32 ids (torch.from_numpy of an int32 array) and uint16 ones (a token file's) are ids: refused since
    # bf2845d, which a review caught
    for dtype in (torch.int32, torch.uint16):
        assert generate(model, torch.tensor([[1, 2]], dtype=dtype), 2, temperature=0).tolist() == generate(
            model, torch.tensor([[1, 2]]), 2, temperature=0).tolist()
    with pytest.raises(UserError, match="do not belong together"):
        generate_text(tiny_model(vocab_size=512), tokenizer, PROMPT, 2)
    # a prompt that is not a str: the hint fits what it is (bytes were told to call once per prompt)
    for prompt, hint in (([PROMPT, "Tom"], "for several prompts, call once per prompt"),
                         (PROMPT.encode(), r"decode it first: prompt.decode\('utf-8'\)"), (7, "give a str")):
        with pytest.raises(UserError, match=rf"^the prompt must be text \(a str\), got \w+: {hint}$"):
            generate_text(model, tokenizer, prompt, 2)


def test_a_prompt_that_is_not_utf8_is_one_line(ckpt, model, tokenizer, capsys):
    """A byte that is not UTF-8 in --prompt reaches Python as a lone surrogate (\\udcff): GPT-2's tokenizer went on
    from U+FFFD, a tokenizer.json's raised a TypeError; both are refused, naming the character."""
    with pytest.raises(UserError, match=r"not UTF-8 text.*character 5"):
        generate_text(model, tokenizer, "Once \udcff upon", 2)
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "Once \udcff upon", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8 text" in err


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": "0.7"}, "temperature must be a finite number >= 0, got '0.7'"),
    ({"max_new_tokens": "5"}, "max_new_tokens must be an integer >= 0, got '5'"),
    ({"max_new_tokens": 5.0}, "max_new_tokens must be an integer >= 0, got 5.0"),
    ({"top_k": 5.0}, "top_k must be an integer >= 1, got 5.0"),
    ({"top_k": 0}, "top_k must be an integer >= 1, got 0"),  # (None is the Python argument's "off")
    ({"top_p": "0.9"}, "top_p must be a number in (0, 1], got '0.9'"),
    ({"eos_id": "2"}, "eos_id must be one of the model's 50,257 token ids, got '2'"),
    ({"eos_id": 50257}, "eos_id must be one of the model's 50,257 token ids, got 50257"),
    ({"input_ids": torch.tensor([[1, 50257]])}, "input_ids hold id 50257, outside the model's 50,257 ids (0 to 50,256)"),
    ({"input_ids": torch.tensor([[-1, 2]])}, "input_ids hold id -1, outside the model's 50,257 ids (0 to 50,256)"),
    ({"generator": [torch.Generator()] * 2}, "generator holds 2 generators for 1 sequences"),  # one per row
    ({"generator": 5}, "generator must be a torch.Generator, or a list of one per row of input_ids, got 5"),
    ({"generator": [1]}, "generator must be a torch.Generator, or a list of one per row of input_ids, got [1]"),
    ({"vocab_size": 0}, "vocab_size (the tokenizer's) must be an integer from 1 to the model's 50,257, or None; got 0"),
    ({"vocab_size": 50258}, "vocab_size (the tokenizer's) must be an integer from 1 to the model's 50,257"),
    ({"vocab_size": "x"}, "vocab_size (the tokenizer's) must be an integer from 1 to the model's 50,257"),
])
def test_generate_from_python_refuses_arguments_of_the_wrong_kind_in_one_line(model, kwargs, message):
    """A notebook's generate(model, ids, "5") or temperature="0.7" ended in a TypeError deep in the comparison or in
    torch, and an id past the embedding in its IndexError: each is a UserError saying what generate takes."""
    args = {"input_ids": torch.tensor([[1, 2, 3]]), "max_new_tokens": 2, **kwargs}
    with pytest.raises(UserError, match=re.escape(message)):
        generate(model, **args)
    # numpy's integers are integers; a tuple of generators is a list of them
    assert generate(model, torch.tensor([[1, 2]]), np.int64(2), top_k=np.int64(3)).shape == (1, 4)
    assert generate(model, torch.tensor([[1, 2]]), 2, generator=(torch.Generator(),)).shape == (1, 4)


def test_non_finite_logits_are_one_line_not_a_traceback_or_nonsense(tmp_path, capsys):
    """A NaN weight (or float16 overflow) made sampling raise deep in torch and greedy print token 0s, exit 0."""
    broken = tiny_model()
    with torch.no_grad():
        broken.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    save_model(broken, tmp_path, {"tokenizer": GPT2_SPEC})
    for extra in ([], ["--temperature", "0"]):
        assert main(["generate", "--ckpt", str(tmp_path), "--prompt", PROMPT, "--max-new-tokens", "3", *extra]) == 2
        out, err = capsys.readouterr()
        assert out == PROMPT + "\n"  # the streamed prompt ends its line: the refusal is not printed after it
        assert "Traceback" not in err and err.splitlines()[-1] == (  # after the "loaded ..." line
            "tinygemma generate: error: the model's logits hold NaN or inf at new token 1: are its weights all finite?")
    big = tiny_model()  # finite in float32 and bfloat16, past float16's 65,504
    with torch.no_grad():
        for layer in big.layers:
            layer.post_feedforward_layernorm.weight.fill_(3e4)
    assert torch.isfinite(generate(big, torch.tensor([[1, 2]]), 2, temperature=0)).all()
    with pytest.raises(UserError, match="float16 overflowed; try --dtype bfloat16 or float32"):
        generate(big.half(), torch.tensor([[1, 2]]), 2, temperature=0)
    # generate() checks once, after the last token (sampled from NaN probabilities, torch would refuse, and CUDA
    # stop at a device-side assert): the same refusal, for greedy and sampled tokens, with or without end of text.
    broken.eval()
    for kwargs in ({"temperature": 0}, {"temperature": 1.0, "top_p": 0.9}, {"eos_id": 5}):
        with pytest.raises(UserError, match="the model's logits hold NaN or inf while generating: are its weights"):
            generate(broken, torch.tensor([[1, 2], [3, 4]]), 3, **kwargs)


def device_reads(call) -> int:
    """How many times `call()` reads a device value back to the host (an item, a bool), as the profiler sees it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        call()
    return sum(event.count for event in profile.key_averages() if event.key == "aten::_local_scalar_dense")


def test_generate_samples_only_the_tokenizers_ids_where_the_model_has_more(tokenizer):
    """A model with more rows than its tokenizer (model.vocab_size set above the data's): generate from Python
    sampled them all, and GPT-2's decode of one was tiktoken's KeyError. vocab_size=tokenizer.model_vocab_size keeps
    the draws to the tokenizer's ids, as generate_text and the CLI do; an id past GPT-2's is a UserError."""
    model = tiny_model(vocab_size=64)  # a tokenizer of 10 ids here: 54 rows more
    ids = torch.tensor([[1, 2, 3]] * 4)
    args = dict(max_new_tokens=50, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert (generate(model, ids, **args) >= 10).any()
    args["generator"].manual_seed(0)
    kept = generate(model, ids, **args, vocab_size=10)
    assert (kept < 10).all() and kept.shape == (4, 3 + 50) and len(set(kept[:, 3:].flatten().tolist())) > 1
    for bad in (50_266, -1):
        with pytest.raises(UserError, match=rf"id {bad} has no token in the tokenizer \(GPT-2's BPE \(tiktoken\): "
                                            r"ids 0 to 50,256;"):
            tokenizer.decode([1, bad])


def test_generate_waits_for_the_device_only_after_the_last_token(model, monkeypatch):
    """Without end of text, generate() reads nothing back from the device between tokens (on a GPU the host then
    queues the steps while the device runs them): one wait, for the non-finite check, after the last token;
    generate_stream, whose consumer reads each token anyway, checks each before it is drawn."""
    waits = []
    real = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: waits.append(1) or real(self))
    ids = torch.tensor([[1, 2, 3]])
    out = generate(model, ids, 8, temperature=0)
    assert len(waits) == 1
    waits.clear()
    streamed = torch.stack(list(generate_stream(model, ids, 8, temperature=0)), dim=1)
    assert len(waits) == 8 and torch.equal(out[:, 3:], streamed)

    # Sampling neither: torch.multinomial read two checks back to the host for every draw (per row, with a
    # generator each). Counted as the profiler sees reads of a device value: as many for 16 tokens as for 4.
    def reads(tokens: int, **kwargs) -> int:
        return device_reads(lambda: generate(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), tokens, **kwargs))

    for kwargs in ({"temperature": 0}, {"temperature": 1.0},
                   {"temperature": 0.8, "top_k": 20, "generator": [torch.Generator().manual_seed(i) for i in (0, 1)]}):
        assert reads(4, **kwargs) == reads(16, **kwargs) <= 4, kwargs


def test_generate_with_end_of_text_waits_every_few_tokens_and_returns_the_tokens_of_a_wait_per_token(monkeypatch):
    """With eos_id, generate() learns whether every row has ended only every SYNC_EVERY tokens (on a GPU the host
    queues the steps between), then drops the steps it ran past the end: the tensor is the one a stream read
    token by token gives, whichever step the last row ends at (before, at and after a wait; never); and no more
    steps are run than up to the first wait after the end."""
    torch.manual_seed(0)
    model = Gemma3(small_config(vocab_size=8, n_layers=2, sliding_window_pattern=2)).eval()  # ids met often
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])

    def rows(seed: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed * 2 + i) for i in range(2)]

    draws, sample = [], tinygemma.generate.sample_next_token
    monkeypatch.setattr(tinygemma.generate, "sample_next_token", lambda *args: draws.append(1) or sample(*args))
    ends, every = set(), tinygemma.generate.SYNC_EVERY
    wanted = {2, 7, 8, 9, 24}  # the last row's end (new tokens): the 8th is a wait's; 24, no end met
    for seed in range(32):  # until those are met: which seeds meet them depends on torch's sampling draws
        for eos in range(8):
            per_token = generate_stream(model, ids, 24, temperature=1.0, eos_id=eos, generator=rows(seed))
            expected = torch.cat([ids] + [t[:, None] for t in per_token], dim=1)
            draws.clear()
            assert torch.equal(generate(model, ids, 24, temperature=1.0, eos_id=eos, generator=rows(seed)), expected)
            end = expected.shape[1] - 3
            assert len(draws) == min(24, -(-end // every) * every), (end, len(draws))
            ends.add(end)
        if wanted <= ends:
            break
    assert wanted <= ends, sorted(ends)

    greedy = generate(model, ids, 32, temperature=0)[:, 3:]
    unmet = next(i for i in range(8) if not (greedy == i).any())

    def reads(tokens: int) -> int:
        out = []
        count = device_reads(lambda: out.append(generate(model, ids, tokens, temperature=0, eos_id=unmet)))
        assert torch.equal(out[0][:, 3:], greedy[:, :tokens])
        return count

    assert reads(32) - reads(16) <= 2 * 16 // tinygemma.generate.SYNC_EVERY  # (per token: 16)


def test_generate_text_reading_every_few_tokens_gives_the_same_texts(model, tokenizer, monkeypatch):
    """On a GPU generate_text reads the tokens every SYNC_EVERY steps, not each: the same texts, pieces and count
    of new tokens, with samples ending at end of text, at stop strings and at max_new_tokens; and logits that are
    not finite are refused before any text from them is handed out."""
    ids = torch.tensor([tokenizer.encode(PROMPT)] * 3)
    drawn = generate(model, ids, 20, temperature=1.0, top_k=3,
                     generator=[torch.Generator().manual_seed(4 + i) for i in range(3)])  # generate_text's draws
    ends_early = GPT2Tokenizer()
    ends_early.eot_id = int(drawn[0, ids.shape[1] + 5])  # sample 0 ends by its 6th token
    runs = {}
    for every in (1, 3, 8):
        monkeypatch.setattr(tinygemma.generate, "reads_every", lambda device, every=every: every)
        for case, (tok, kwargs) in {"end": (ends_early, {}), "stop": (ends_early, {"stop": [" a", "."]}),
                                    "plain": (tokenizer, {})}.items():
            pieces = []
            texts, n = generate_text(model, tok, PROMPT, 20, temperature=1.0, top_k=3, seed=4,
                                     num_samples=3, on_text=lambda i, piece, out=pieces: out.append((i, piece)), **kwargs)
            runs.setdefault(case, []).append((texts, n, pieces))
    for case, (first, *others) in runs.items():
        assert all(other == first for other in others), case

    def made(row: torch.Tensor, stops: list[str]) -> int:
        """A sample's new tokens: up to its end of text, or the token that completes a stop text, else all 20."""
        return next((k for k in range(1, 21) if int(row[k - 1]) == ends_early.eot_id
                     or any(stop in tokenizer.decode(row[:k].tolist()) for stop in stops)), 20)

    new = drawn[:, ids.shape[1]:]  # (which sample stops where depends on torch's sampling draws)
    ended, stopped = [made(row, []) for row in new], [made(row, [" a", "."]) for row in new]
    assert ended[0] == 6 and 20 in ended and any(k < min(20, e) for k, e in zip(stopped, ended))
    assert [runs[case][0][1] for case in runs] == [sum(ended), sum(stopped), 60]  # (the new tokens made)
    broken = tiny_model()
    with torch.no_grad():
        broken.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    pieces = []  # (reads_every: 8, as on a GPU)
    with pytest.raises(UserError, match="the model's logits hold NaN or inf while generating"):
        generate_text(broken, tokenizer, PROMPT, 20, on_text=lambda i, piece: pieces.append(piece))
    assert pieces == []


def nan_after(model: Gemma3, token_id: int) -> Gemma3:
    """The model's logits turn NaN once `token_id` has been fed back to it (as float16 may overflow on what
    follows one token); the caller turns the decode plan off, so that the embedding module runs."""
    def hook(module, inputs, out):
        return torch.where((inputs[0] == token_id)[..., None], torch.full_like(out, float("nan")), out)

    model.embed_tokens.register_forward_hook(hook)
    return model


@pytest.mark.parametrize("model", [None, torch.nn.Linear(2, 2)], ids=["none", "another-module"])
def test_a_model_that_is_no_gemma3_is_one_line(model, tokenizer):
    """generate and generate_text given None or another library's module: a UserError naming what they take, not
    an AttributeError from deep inside."""
    for call in (lambda: generate(model, torch.tensor([[1, 2]]), 5), lambda: generate_text(model, tokenizer, "Once", 5)):
        with pytest.raises(UserError, match=f"model must be a tinygemma Gemma3 .* got {type(model).__name__}$"):
            call()


def test_a_compiled_model_is_refused_naming_the_model_inside(tokenizer):
    """torch.compile's wrapper is no Gemma3: the refusal says where the model is."""
    compiled = torch.compile(tiny_model())  # (nothing compiles until it is called)
    with pytest.raises(UserError, match=r"got OptimizedModule \(torch.compile's wrapper: give its _orig_mod\)$"):
        generate(compiled, torch.tensor([[1, 2]]), 5)
    assert generate(compiled._orig_mod, torch.tensor([[1, 2]]), 2, temperature=0).shape == (1, 4)


def test_logits_that_turn_non_finite_after_every_row_has_ended_are_never_refused(monkeypatch):
    """Reading every few tokens, generate and generate_text run a few steps past the end (every row's end of
    text, every sample's stop string): logits that are not finite there are never read, so never refused; a
    reading of each token returns, and so do they, with the same tokens and texts."""
    monkeypatch.setattr(tinygemma.generate, "decode_plan", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    model = Gemma3(small_config(vocab_size=8, n_layers=2, sliding_window_pattern=2)).eval()
    ids = torch.tensor([[1, 2, 3], [1, 2, 3]])
    eos = int(generate(model, ids, 1, temperature=0)[0, 3])  # every row's first new token
    assert eos not in ids[0].tolist()
    nan_after(model, eos)
    streamed = list(generate_stream(model, ids, 12, temperature=0, eos_id=eos))  # (sync_every 1)
    assert torch.equal(generate(model, ids, 12, temperature=0, eos_id=eos), torch.cat([ids, streamed[0][:, None]], 1))
    assert len(streamed) == 1
    tokenizer, gpt2_model = GPT2Tokenizer(), tiny_model()
    third = int(generate(gpt2_model, torch.tensor([tokenizer.encode(PROMPT)]), 3, temperature=0)[0, -1])
    nan_after(gpt2_model, third)
    results = {}
    for every in (1, 8):
        monkeypatch.setattr(tinygemma.generate, "reads_every", lambda device, every=every: every)
        results[every] = generate_text(gpt2_model, tokenizer, PROMPT, 12, temperature=0,
                                       stop=[tokenizer.decode([third])])
    assert results[8] == results[1] and results[1][1] == 3
    # A sample still running reads them: refused, even where the token drawn from them (greedy over the zeroed
    # logits: id 0) would end the sample
    for stop in ([], [tokenizer.decode([0])]):
        with pytest.raises(UserError, match="while generating"):
            generate_text(gpt2_model, tokenizer, PROMPT, 12, temperature=0, stop=stop)


def test_the_readmes_python_example_runs(ckpt, capsys):
    """README's Python block as written, at gemma3-tiny's size, on a saved checkpoint for runs/cpu-demo (no
    google/gemma-3-270m here): it once used names it never defined."""
    block = (ROOT / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    code = block.replace('"gemma3-270m-gpt2"', '"gemma3-tiny"').replace('"runs/cpu-demo"', repr(str(ckpt)))
    code = "\n".join(line for line in code.splitlines() if "google/gemma-3-270m" not in line)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].shape == (1, scope["ids"].shape[1] + 20) and torch.isfinite(scope["loss"])
    assert capsys.readouterr().out.startswith("Once upon a time there was")
    assert len(scope["texts"]) == 1 and 0 < scope["new_tokens"] <= 100
    assert len(scope["samples"]) == 4 and {s.finish_reason for s in scope["samples"]} <= {"end_of_text", "length"}


# ------------------------------------------------------------------ streaming text


def test_text_stream_never_breaks_a_character(tokenizer):
    text = " Tom saw a 🦖 and said: «größer!» 東京 🙂🙂"
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer, context=tokenizer.encode("Once"))
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # some token ended inside a character, and its text was held back
    # An unfinished character at the very end comes out as U+FFFD rather than being lost.
    stream = TextStream(tokenizer)
    emoji = tokenizer.encode("🦖")
    assert len(emoji) > 1 and stream.push(emoji[0]) == ""
    assert stream.flush() == "\ufffd"


def test_text_stream_of_byte_fallback_pieces_is_what_decode_gives(tmp_path):
    """A byte-fallback tokenizer (SentencePiece's, Gemma's) decodes a run of <0xHH> pieces together, and a run
    that is not UTF-8 becomes U+FFFD for each of its bytes, those of a character already complete included: the
    stream printed "Ø" and then the wrong count of U+FFFD. It now waits for a run's end, and whatever ids come,
    what it prints is tokenizer.decode of them all."""
    import random

    from tokenizers import Tokenizer, decoders, models

    from tinygemma.tokenizer import HFTokenizer

    vocab = {"<|endoftext|>": 0, "a": 1, **{f"<0x{i:02X}>": 2 + i for i in range(256)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = HFTokenizer(backend.to_str())
    assert len(tokenizer.byte_fallback_ids) == 256 and 1 not in tokenizer.byte_fallback_ids

    def streamed(ids: list[int]) -> str:
        stream = TextStream(tokenizer, context=[1])
        return "".join(stream.push(i) for i in ids) + stream.flush()

    assert streamed([2 + 0xC3, 2 + 0x98, 2 + 0xF0]) == tokenizer.decode([1, 2 + 0xC3, 2 + 0x98, 2 + 0xF0])[1:]
    rng = random.Random(0)
    for _ in range(300):  # runs of bytes, valid UTF-8 or not, between other tokens
        ids = [rng.choice([1, 2 + rng.choice([0x41, 0xC3, 0x98, 0xE6, 0x97, 0xA5, 0xF0, 0x9F])]) for _ in range(12)]
        assert streamed(ids) == tokenizer.decode([1, *ids])[1:], ids

    # A prompt ending in a run longer than the stream's context window ("日本": six byte pieces), which the reply
    # continues ("語"): the context decoded with the new ids starts at the run's start, not inside it, where the
    # run read as invalid and the reply came out as U+FFFD.
    def pieces(text: str) -> list[int]:
        return [1 if ch == "a" else 2 + b for ch in text for b in ch.encode("utf-8")]

    prompt, reply = pieces("a日本"), pieces("語a")
    stream = TextStream(tokenizer, context=prompt)
    assert "".join(stream.push(i) for i in reply) + stream.flush() == "語a"


# ------------------------------------------------------------------ command line


def test_cli_prints_prompt_and_continuation_only(ckpt, model, tokenizer, capsys):
    args = ["generate", "--ckpt", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "10", "--temperature", "0",
            "--dtype", "float32"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    expected = greedy(model, tokenizer, 10)
    assert out == PROMPT + expected + "\n"
    assert "tokens/s" in err and "loaded" in err  # logs go to stderr
    assert main(args) == 0
    assert capsys.readouterr().out == out  # greedy: the same text again


def test_cli_reads_at_most_the_block_the_model_trained_on_unless_told(model, tokenizer, tmp_path, capsys):
    """A checkpoint trained on 8-token windows, asked for 30 new tokens: by default the model reads at most the
    last 8 tokens at once (as the workshop's generate crops the text), said on stderr; --context all reads every
    one, --context N that many; a checkpoint that records no block reads every one."""
    trained = tmp_path / "trained"
    save_model(model, trained, {"tokenizer": GPT2_SPEC, "train": {"block_size": 8}})
    save_model(model, tmp_path / "unknown", {"tokenizer": GPT2_SPEC})
    ids = torch.tensor([tokenizer.encode(PROMPT)])

    def text(ckpt, *extra) -> tuple[str, str]:
        assert main(["generate", "--ckpt", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "30", "--temperature",
                     "0", "--dtype", "float32", *extra]) == 0
        return capsys.readouterr()

    def expected(context) -> str:
        return PROMPT + tokenizer.decode(generate(model, ids, 30, temperature=0, context=context)[0, ids.shape[1]:]
                                         .tolist()) + "\n"

    out, err = text(trained)
    assert out == expected(8) and out != expected(None)
    assert "note: the text can pass 8 tokens, the most the model reads at once" in err
    out, err = text(trained, "--context", "all")
    assert out == expected(None) and "note:" not in err
    assert text(trained, "--context", "12")[0] == expected(12)
    out, err = text(tmp_path / "unknown")
    assert out == expected(None) and "note:" not in err
    for bad in ("0", "-4", "some", "8.5"):
        with pytest.raises(SystemExit):
            main(["generate", "--ckpt", str(trained), "--prompt", PROMPT, "--context", bad])
        assert "--context: takes trained, all or a number of tokens >= 1" in capsys.readouterr().err


def test_cli_writes_what_stdouts_encoding_lacks_as_question_marks(ckpt, model, tokenizer):
    """stdout in ASCII (Windows redirected to a cp1252 file, for an emoji): the prompt's é failed in a traceback
    before any text; now the text comes, what the encoding lacks as "?"."""
    prompt = "Once upon a café"
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "tinygemma", "generate", "--ckpt", str(ckpt), "--prompt", prompt,
                           "--max-new-tokens", "5", "--temperature", "0", "--dtype", "float32"],
                          capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-500:]
    expected = prompt + generate_text(model, tokenizer, prompt, 5, temperature=0)[0][0] + "\n"
    assert done.stdout.decode("ascii") == expected.encode("ascii", "replace").decode("ascii")
    assert "Traceback" not in done.stderr.decode()


def test_generate_refuses_an_empty_batch_and_positions_past_the_models(model):
    """From Python, as the text path and the command line refuse them: an empty batch was a RuntimeError from
    aminmax, and a prompt plus new tokens past max_position_embeddings ran on positions never trained."""
    with pytest.raises(UserError, match="no prompt"):
        generate(model, torch.zeros(0, 3, dtype=torch.long), 3)
    limit = model.config.max_position_embeddings
    with pytest.raises(UserError, match=f"the prompt's {limit - 2} tokens plus 4 new ones need more than the "
                                        f"model's {limit} positions"):
        generate(model, torch.ones(1, limit - 2, dtype=torch.long), 4, temperature=0)
    assert generate(model, torch.ones(1, limit - 2, dtype=torch.long), 3, temperature=0).shape == (1, limit + 1)


def test_cli_continues_each_prompt_given(ckpt, capsys):
    """--prompt given twice kept the last one alone, silently. Each is now continued in turn, with the same
    settings and seed (its text is what it gives alone), separated as samples are; an empty one is refused."""
    def alone(prompt: str, *extra: str) -> str:
        assert main(["generate", "--ckpt", str(ckpt), "--prompt", prompt, "--max-new-tokens", "5", "--seed", "7",
                     *extra]) == 0
        return capsys.readouterr().out

    first, second = alone(PROMPT), alone("Tom had a dog")
    assert alone(PROMPT, "--prompt", "Tom had a dog") == first[:-1] + "\n---\n" + second
    pair = alone(PROMPT, "--prompt", "Tom had a dog", "--num-samples", "2").split("\n---\n")
    assert len(pair) == 4 and [p[:len(PROMPT)] for p in pair[:2]] == [PROMPT] * 2 and pair[2].startswith("Tom")
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", PROMPT, "--prompt", ""]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--prompt is empty" in err


def test_cli_reads_prompts_from_files_and_standard_input(ckpt, tmp_path, capsys, monkeypatch):
    """--prompt-file FILE (llama.cpp's -f, nanoGPT's FILE:): the file's whole text is a prompt, less the final newline
    an editor adds; - reads standard input; in turn with --prompt, in the order given. A missing file, a folder,
    bytes that are not UTF-8 or an empty file are one line each; no prompt at all is argparse's usage error."""
    import io

    def out(*prompts: str) -> str:
        assert main(["generate", "--ckpt", str(ckpt), "--max-new-tokens", "5", "--seed", "7", *prompts]) == 0
        return capsys.readouterr().out

    story = "Tom had a dog.\nThe dog liked to run"
    (tmp_path / "story.txt").write_text(story + "\n", encoding="utf-8")
    (tmp_path / "crlf.txt").write_bytes((story + "\r\n").encode())
    both = out("--prompt", PROMPT, "--prompt", story)
    (tmp_path / "bom.txt").write_bytes(("\ufeff" + story + "\n").encode())  # (Notepad's UTF-8)
    for name in ("story.txt", "crlf.txt", "bom.txt"):
        assert out("--prompt", PROMPT, "--prompt-file", str(tmp_path / name)) == both, name
    for given in (story.encode(), (story + "\r\n").encode(), story.replace("\n", "\r\n").encode() + b"\r\n"):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(given)))  # standard input read as a file is
        assert out("--prompt", PROMPT, "--prompt-file", "-") == both, given
    assert out("--prompt-file", str(tmp_path / "story.txt"), "--prompt", PROMPT) == out("--prompt", story, "--prompt",
                                                                                       PROMPT)  # (the order given)
    (tmp_path / "latin1.txt").write_bytes("Café".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n")
    for path, said in ((tmp_path / "gone.txt", "not found"), (tmp_path, "is a folder"),
                       (tmp_path / "latin1.txt", "is not UTF-8 text (byte 3)"), (tmp_path / "empty.txt", "holds no text")):
        assert main(["generate", "--ckpt", str(ckpt), "--prompt-file", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--prompt-file {path}" in err and said in err, err
    for stdin, args, said in ((io.TextIOWrapper(io.BytesIO(b"Caf\xe9")), ["-"], "standard input is not UTF-8 text"),
                              (None, ["-"], "standard input is closed"),
                              (io.TextIOWrapper(io.BytesIO(b"Tom")), ["-", "--prompt-file", "-"], "is given twice")):
        monkeypatch.setattr(sys, "stdin", stdin)
        assert main(["generate", "--ckpt", str(ckpt), "--prompt-file", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err, err
    with pytest.raises(SystemExit) as stopped:
        main(["generate", "--ckpt", str(ckpt)])
    assert stopped.value.code == 2 and "required: --prompt (or --prompt-file)" in capsys.readouterr().err


def test_cli_json_prints_one_line_a_sample(ckpt, tokenizer, capsys):
    """--json: one JSON object a line a sample, prompts in turn, that a script parses whatever the text holds (the
    '---' between plain samples may occur in a story), each the sample generate_samples gives, with its seed and
    how it ended; nothing else on stdout."""
    args = ["generate", "--ckpt", str(ckpt), "--prompt", PROMPT, "--prompt", "Tom had", "--max-new-tokens", "6",
            "--temperature", "1.0", "--top-k", "0", "--seed", "3", "--num-samples", "2", "--stop", "e", "--json",
            "--dtype", "float32"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["prompt"], r["sample"], r["seed"]) for r in records] == [
        (PROMPT, 0, 3), (PROMPT, 1, 4), ("Tom had", 0, 3), ("Tom had", 1, 4)]
    model = load(ckpt)
    for prompt, pair in ((PROMPT, records[:2]), ("Tom had", records[2:])):
        samples = generate_samples(model, tokenizer, prompt, 6, 1.0, seed=3, num_samples=2, stop="e")
        assert [(r["text"], r["new_tokens"], r["finish_reason"]) for r in pair] == [
            (s.text, s.new_tokens, s.finish_reason) for s in samples]
    assert {r["finish_reason"] for r in records} <= {"stop", "length", "end_of_text"}
    assert "stop" in {r["finish_reason"] for r in records}  # (the seeds chosen so that "e" ends one)
    one = ["generate", "--ckpt", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "6", "--seed", "3"]
    assert main(one) == 0
    plain = capsys.readouterr().out
    assert main([*one, "--json"]) == 0  # one sample: the text streamed without --json, in one line
    [line] = capsys.readouterr().out.splitlines()
    assert PROMPT + json.loads(line)["text"] + "\n" == plain and json.loads(line)["new_tokens"] == 6


def test_cli_seeded_samples_and_run_directory(ckpt, tokenizer, tmp_path, capsys):
    # A run directory: checkpoints/last.json points at the checkpoint, as training writes it.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    os.symlink(ckpt, run / "checkpoints" / "step_10")
    atomic_write_json(run / "checkpoints" / "last.json", {"dir": "step_10", "step": 10})
    args = ["generate", "--ckpt", str(run), "--prompt", PROMPT, "--max-new-tokens", "6", "--temperature", "1.0",
            "--top-k", "50", "--top-p", "0.9", "--seed", "3", "--num-samples", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    samples = out[:-1].split("\n---\n")
    assert len(samples) == 3 and all(s.startswith(PROMPT) for s in samples)
    assert main(args) == 0
    assert capsys.readouterr().out == out
    # --repetition-penalty: the same seeded samples with the penalty as generate_text gives them from Python
    assert main([*args, "--repetition-penalty", "1.3", "--dtype", "float32"]) == 0
    penalized = capsys.readouterr().out[:-1].split("\n---\n")
    texts, _ = generate_text(load(ckpt), tokenizer, PROMPT, 6, 1.0, 50, 0.9, 3, num_samples=3,
                             repetition_penalty=1.3)
    assert penalized == [PROMPT + t for t in texts]


def test_every_sampling_flag_reaches_generate_samples(ckpt, capsys, monkeypatch):
    """Each of generate's sampling flags is the setting generate_samples is called with (--top-p 0.9 with --top-k 50
    drew the same tiny samples with the flag dropped, and --min-p was only ever tested off)."""
    import inspect

    import tinygemma.generate

    calls, real = [], tinygemma.generate.generate_samples  # (generate imports it as it runs)

    def recorded(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(tinygemma.generate, "generate_samples", recorded)
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "3", "--temperature", "1.5",
                 "--top-k", "40", "--top-p", "0.85", "--min-p", "0.02", "--repetition-penalty", "1.2", "--seed", "11",
                 "--num-samples", "2", "--stop", "xyz"]) == 0
    capsys.readouterr()
    [call] = calls
    assert {name: call[name] for name in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                                          "repetition_penalty", "seed", "num_samples")} == {
        "max_new_tokens": 3, "temperature": 1.5, "top_k": 40, "top_p": 0.85, "min_p": 0.02,
        "repetition_penalty": 1.2, "seed": 11, "num_samples": 2}
    assert tuple(call["stop"]) == ("xyz",)


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "--top-p must be"),
    (["--top-p", "1.01"], "--top-p must be"),
    (["--top-k", "-1"], "--top-k must be an integer >= 1 (0 or none: no top-k filter)"),
    (["--seed", "100000000000000000000000"], "seed"),  # past torch's 64-bit seed: refused before the prompt prints
    (["--seed", "-1"], "seed"),
    # the last sample's seed, seed + 1, past 64 bits: refused before the model loads, as the option
    (["--seed", "9223372036854775807", "--num-samples", "2"], "--seed must be an integer from 0 to "
                                                              "9,223,372,036,854,775,806"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be a positive, finite number (1: none), got 0.0"),
    (["--min-p", "2"], "--min-p must be a number in [0, 1] (0 or none: off), got 2.0"),
    (["--num-samples", "0"], "num-samples"),
    (["--num-samples", "100000000"], "--num-samples must be at most 65,536"),  # a generator each: killed, silent
    (["--prompt", ""], "prompt"),
    (["--tokenizer", "bpe"], "give the tokenizer.json it wrote"),  # prepare's name, not a file
    (["--stop", "x", "--stop", ""], "--stop must be text"),
])
def test_cli_bad_input_is_one_line_and_exit_2(ckpt, capsys, extra, message):
    args = ["generate", "--ckpt", str(ckpt), "--prompt", PROMPT, *extra]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err and err.count("\n") == 1


def test_cli_stop_ends_the_printed_text_before_it(ckpt, model, tokenizer, capsys):
    full = greedy(model, tokenizer, 10)
    stop = full[3:6]
    args = ["generate", "--ckpt", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "10", "--temperature", "0",
            "--dtype", "float32", "--stop", "never in it", "--stop", stop]
    assert main(args) == 0
    assert capsys.readouterr().out == PROMPT + full[: full.find(stop)] + "\n"
    assert main([*args, "--num-samples", "2"]) == 0
    assert capsys.readouterr().out == "\n---\n".join([PROMPT + full[: full.find(stop)]] * 2) + "\n"


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "nope"), "--prompt", PROMPT]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_transformers_directory_uses_its_tokenizer_json(ckpt, model, tokenizer, tmp_path, capsys):
    from tinygemma.checkpoint import export

    hf_dir = export(ckpt, tmp_path / "hf")
    assert (hf_dir / "tokenizer.json").exists()
    assert main(["generate", "--ckpt", str(hf_dir), "--prompt", PROMPT, "--max-new-tokens", "8",
                 "--temperature", "0", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == PROMPT + greedy(model, tokenizer, 8) + "\n"


def test_cli_in_a_real_process_streams_to_stdout(ckpt, model, tokenizer):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-m", "tinygemma", "generate", "--ckpt", str(ckpt), "--prompt", PROMPT,
         "--max-new-tokens", "8", "--temperature", "0", "--dtype", "float32"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + greedy(model, tokenizer, 8) + "\n"
    assert "tokens/s" in result.stderr
    bad = subprocess.run([sys.executable, "-m", "tinygemma", "generate", "--ckpt", str(ckpt), "--prompt", PROMPT,
                          "--top-p", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1


def test_generate_writes_each_piece_while_it_still_samples(ckpt, monkeypatch):
    """Streaming: the prompt is on stdout before the first token is sampled, and text before the last one is (a
    test of the whole output alone passed with everything written at the end)."""
    import io

    import tinygemma.generate as generate_module

    sampled, writes = [], []
    sample = generate_module.sample_next_token
    monkeypatch.setattr(generate_module, "sample_next_token", lambda *a, **k: sampled.append(1) or sample(*a, **k))

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append((len(sampled), text))
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0",
                 "--dtype", "float32"]) == 0
    assert writes[0] == (0, PROMPT) and len(sampled) == 8
    assert any(0 < n < 8 and text.strip() for n, text in writes[1:]), writes


def test_bf16_generation_runs(ckpt, capsys):
    """--dtype is the precision the model is loaded and run in, as the log line says (a test of the output alone
    passed with the flag ignored)."""
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "4",
                 "--temperature", "0", "--dtype", "bfloat16"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(PROMPT) and "bfloat16, cpu) and tokenizer" in err
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "1", "--dtype", "fp8"]) == 2
    assert "fp8" in capsys.readouterr().err


def test_speed_benchmark_runs_and_both_sides_agree():
    """benchmarks/generate_speed.py on gemma3-tiny: both contenders timed, the same greedy tokens."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_speed", ROOT / "benchmarks" / "generate_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--preset", "gemma3-tiny", "--dtype", "fp32", "--new-tokens", "6", "--repeats", "1",
                         "--batch-sizes", "1,3"])
    assert [r["batch_size"] for r in result["results"]] == [1, 3]
    for r in result["results"]:
        assert r["same_tokens"] and r["equal_leading_tokens"] == 6
        assert r["tinygemma_tokens_per_s"] > 0 and r["transformers_tokens_per_s"] > 0
        assert "cuda_graph_speedup" not in r and "kernel_by_kernel_tokens_per_s" not in r  # CUDA's contender only


def test_greedy_generate_matches_transformers_and_no_cache_loop():
    config = small_config()
    model, hf = make_pair(config, seed=5)
    prompt = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    n_new = 4 * config.sliding_window  # well past the window, so the ring cache wraps around several times
    ours = generate(model, prompt, n_new, temperature=0)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new,
                         pad_token_id=0, eos_token_id=None)
    assert ours.shape == (2, 7 + n_new)
    assert torch.equal(ours, theirs)
    # The same tokens from a loop that recomputes the whole sequence without any cache.
    assert torch.equal(ours, greedy_by_forward(model, prompt, n_new))


def cropped_greedy(model, prompt: torch.Tensor, n_new: int, context: int) -> torch.Tensor:
    """Greedy tokens without any cache, each predicted from the text's tokens that a reader of `context` holds:
    the last `context` of the prompt, and once more than `context` tokens would be read, the last 3/4 of them."""
    seq, start = prompt, max(0, prompt.shape[1] - context)
    with torch.no_grad():
        for _ in range(n_new):
            seq = torch.cat([seq, model(seq[:, start:])[:, -1].argmax(-1, keepdim=True)], dim=1)
            if seq.shape[1] - start > context:
                start = seq.shape[1] - (context - context // 4)
    return seq


@pytest.mark.parametrize("context,prompt_len,window", [(12, 7, 16), (12, 20, 16), (5, 3, 16), (3, 2, 16), (1, 4, 16),
                                                       (12, 7, 8), (9, 20, 8), (20, 3, 8)])
def test_a_context_reads_only_the_trained_blocks_tokens_as_a_loop_without_cache_does(context, prompt_len, window):
    """generate(context=N) (a model trained on N-token windows, its text running past them): every token is
    predicted from at most the text's last N tokens read from position 0, as a loop that recomputes each step
    without a cache and crops the text gives; through the cache, with the text read anew each time it fills.
    A context longer than the sliding window (its ring cache then smaller than the text read anew), a prompt
    longer than the context, a context of 1."""
    config = small_config(sliding_window=window)
    model, _ = make_pair(config, seed=5)
    prompt = torch.randint(0, config.vocab_size, (2, prompt_len), generator=torch.Generator().manual_seed(4))
    n_new = 40
    ours = generate(model, prompt, n_new, temperature=0, context=context)
    assert torch.equal(ours, cropped_greedy(model, prompt, n_new, context))
    assert not torch.equal(ours, generate(model, prompt, n_new, temperature=0))  # (it reads another text)
    assert torch.equal(generate(model, prompt, 3, temperature=0, context=prompt_len + 2),
                       generate(model, prompt, 3, temperature=0))  # the text within the context: read as before
    # The decode plan's step at a device-tensor position (what a CUDA graph replays, its stale slots masked) too
    reader = tinygemma.generate.CachedReader(model, prompt, n_new, None, False, context)
    reader.plan = tinygemma.decode.decode_plan(model, pack=False)
    reader.rope = reader.plan.rope_tables(model, context)
    reader.graphed = lambda token, pos: reader.plan.step(model, token, reader.cache, torch.tensor(pos), reader.rope)
    seq = prompt
    for _ in range(n_new):
        token = reader.logits.argmax(-1)
        seq = torch.cat([seq, token[:, None]], dim=1)
        reader.read(token)
    assert torch.equal(seq, ours)
    for bad in (0, -3, 2.5, "128", True):
        with pytest.raises(UserError, match="context .* must be an integer >= 1 or None"):
            generate(model, prompt, 2, context=bad)


def test_a_text_read_at_most_a_context_may_run_past_the_models_positions():
    """Read at most `context` tokens at once, the model never reads a position past the context: a text longer
    than max_position_embeddings (a long prompt, many new tokens) is generated, not refused for positions it
    never reads; read whole, it is refused as before."""
    config = small_config(max_position_embeddings=48)
    model, _ = make_pair(config, seed=5)
    for prompt_len in (10, 60):
        prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(4))
        assert torch.equal(generate(model, prompt, 100, temperature=0, context=32),
                           cropped_greedy(model, prompt, 100, 32))
        with pytest.raises(UserError, match="need more than the model's 48 positions"):
            generate(model, prompt, 100, temperature=0)
        with pytest.raises(UserError, match="need more than the model's 48 positions"):
            generate(model, prompt, 100, temperature=0, context=64)  # (a context past the positions: no help)


def test_repetition_penalty_is_transformers_own():
    """repetition_penalty: greedy tokens are transformers' generate's with the same penalty, and the penalty changes
    them (a random model repeats itself); 1 changes nothing; a penalty that is not positive is refused."""
    config = small_config()
    model, hf = make_pair(config, seed=5)
    prompt = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    n_new = 2 * config.sliding_window
    ours = generate(model, prompt, n_new, temperature=0, repetition_penalty=1.5)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new, repetition_penalty=1.5,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)
    plain = generate(model, prompt, n_new, temperature=0)
    assert not torch.equal(ours, plain) and torch.equal(generate(model, prompt, n_new, temperature=0,
                                                                 repetition_penalty=1.0), plain)
    for bad in (0, -1.2, float("inf"), "1.3"):
        with pytest.raises(UserError, match="repetition_penalty must be a positive, finite number"):
            generate(model, prompt, 2, repetition_penalty=bad)
    # Negative logits too (greedy tokens never show them: a sampled seen token with a negative logit must become
    # less likely, multiplied by the penalty, not divided)
    from transformers import RepetitionPenaltyLogitsProcessor

    logits, ids = torch.tensor([[2.0, -2.0, 0.5, -0.5, 1.0]]), torch.tensor([[0, 1, 3]])
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, True)
    ours = tinygemma.generate.penalize_repeats(logits, seen, 1.5)
    assert torch.equal(ours, RepetitionPenaltyLogitsProcessor(1.5)(ids, logits.clone()))
    assert torch.equal(ours, torch.tensor([[2.0 / 1.5, -3.0, 0.5, -0.75, 1.0]]))
    # A penalty far below 1 (1e-300 divides a logit past float32's range): the seen tokens' logits stay finite,
    # and the most likely token is still drawn (an infinite logit made inf - inf, and id 0 came out)
    for dtype in (torch.float32, torch.bfloat16):
        favoured = tinygemma.generate.penalize_repeats(logits.to(dtype), seen, 1e-300)
        assert torch.isfinite(favoured).all() and favoured[0].argmax() == 0 and favoured[0, 0] > 1e37
    assert tinygemma.generate.sample_next_token(tinygemma.generate.penalize_repeats(
        torch.tensor([[1.0, 2.0, 3.0, -1.0]]), torch.tensor([[False, False, True, False]]), 1e-300), 0.8).item() == 2
    # A penalty that rounds to 0 in the logits' dtype, and a seen logit of 0 (0 / 0 was NaN, and id 0 came out)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        zero = tinygemma.generate.penalize_repeats(torch.tensor([[1.0, 0.0, 3.0, -1.0]], dtype=dtype),
                                                   torch.tensor([[False, True, False, False]]), 1e-300)
        assert torch.isfinite(zero).all() and zero[0, 1] == 0 and zero.argmax().item() == 2


def test_generate_with_prompt_longer_than_window():
    config = small_config()
    model, _ = make_pair(config, seed=6)
    prompt = torch.randint(0, config.vocab_size, (1, 3 * config.sliding_window + 5))
    out = generate(model, prompt, 20, temperature=0)
    assert torch.equal(out, greedy_by_forward(model, prompt, 20))


def test_generate_stops_at_eos_and_is_seeded():
    config = small_config()
    model, _ = make_pair(config, seed=7)
    prompt = torch.randint(0, config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    greedy = generate(model, prompt, 10, temperature=0)
    eos = int(greedy[0, 5 + 3])  # the 4th new token: generation must stop right after producing it
    stopped = generate(model, prompt, 10, temperature=0, eos_id=eos)
    first = (greedy[0, 5:] == eos).nonzero()[0].item()
    assert torch.equal(stopped, greedy[:, : 5 + first + 1])
    a = generate(model, prompt, 15, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, 15, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(1))
    c = generate(model, prompt, 15, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_0_or_none_samples_among_all_tokens(ckpt, capsys):
    """The recipe's top_k = none on the command line: --top-k 0 (or none) turns the filter off."""
    base = ["generate", "--ckpt", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "3",
            "--seed", "5"]
    outs = {}
    for k in ("0", "none", str(GPT2_SPEC["vocab_size"]), "1"):
        assert main([*base, "--top-k", k]) == 0
        outs[k] = capsys.readouterr().out
    assert outs["0"] == outs["none"] == outs[str(GPT2_SPEC["vocab_size"])]  # no filter = k of the whole vocabulary
    assert outs["0"] != outs["1"]  # where top-k 1 would have been greedy
    # --top-p none and --min-p none (their recipes' none) are no filter too, as 1 and 0 are
    for flags in (["--top-p", "none", "--min-p", "none"], ["--top-p", "1", "--min-p", "0"]):
        assert main([*base, "--top-k", "0", *flags]) == 0
        assert capsys.readouterr().out == outs["0"]


@pytest.mark.parametrize("temperature", [1e-6, 1e-40, 1e-300])
def test_a_tiny_temperature_is_all_but_greedy(temperature):
    """A temperature that overflows the division (1e-40 in float32) or rounds to 0 there (1e-300) picked NaN
    probabilities and a traceback; it is greedy in the limit."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.999], [3.0, -2.0, 0.0, 1.0]])
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert sample_next_token(logits, temperature, generator=generator).tolist() == [1, 0]


def test_a_model_with_more_ids_than_its_tokenizer_samples_only_the_tokenizers():
    """model.vocab_size may exceed the data's (rounded up, say): the ids past the tokenizer's have no text, and
    sampling one crashed tiktoken's decode. Here the extra ids are made the likeliest by far."""
    tokenizer = GPT2Tokenizer()
    model = tiny_model(vocab_size=tokenizer.vocab_size + 64)
    with torch.no_grad():
        model.embed_tokens.weight[tokenizer.vocab_size :] *= 50  # tied head: the extra rows dominate the logits
    texts, n = generate_text(model, tokenizer, PROMPT, 30, temperature=2.0, seed=0, num_samples=4)
    assert n > 0 and len(texts) == 4
    ids = generate(model, torch.tensor([tokenizer.encode(PROMPT)]), 30, temperature=0)[0].tolist()
    assert max(ids) >= tokenizer.vocab_size  # without the tokenizer's limit the model does pick them


def test_a_prompt_that_fills_the_positions_still_gets_one_new_token(tokenizer):
    """The last new token is never fed back: a prompt of max_position_embeddings tokens gets one new token (as
    transformers' generate gives it), where it was refused as exceeding the positions; one more is refused."""
    from tinygemma.generate import prompt_ids

    config = ModelConfig.preset("gemma3-tiny", vocab_size=50257, max_position_embeddings=16)

    def words(n: int) -> str:  # n GPT-2 tokens
        return "a" + " a" * (n - 1)

    assert len(prompt_ids(config, tokenizer, words(16), 1)) == 16
    assert len(prompt_ids(config, tokenizer, words(10), 7)) == 10  # 10 + 6 fed back = 16
    assert len(prompt_ids(config, tokenizer, words(16), 0)) == 16
    for n, new, fix in ((16, 2, "shorten the prompt"), (10, 8, "ask for fewer new tokens"), (17, 0, "shorten the prompt")):
        with pytest.raises(UserError, match=f"need more than the model's 16 positions.*; {fix}"):
            prompt_ids(config, tokenizer, words(n), new)


def test_a_numpy_seed_is_a_seed(model, tokenizer):
    """seed=np.int64(1) (a notebook's loop over np.arange) failed in torch.Generator.manual_seed."""
    assert generate_text(model, tokenizer, PROMPT, 4, temperature=1.0, seed=np.int64(1))[0] == generate_text(
        model, tokenizer, PROMPT, 4, temperature=1.0, seed=1)[0]


# ------------------------------------------------------------------ pinned by mutation round 12


def test_sampling_filters_and_the_tiniest_temperature_at_their_edges():
    """top_p reached exactly keeps no more tokens (transformers' rule: uniform quarters, 0.5 keeps two); a temperature
    of 1e-40 over logits past 4 is greedy (the largest logit is subtracted before dividing, else inf and NaN); the
    most samples allowed are allowed."""
    from tinygemma.generate import MAX_SAMPLES, check_num_samples

    assert len(kept(filter_logits(torch.zeros(4), top_p=0.5))) == 2
    assert len(kept(filter_logits(torch.zeros(2), top_p=0.5))) == 1
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert sample_next_token(torch.tensor([[1.0, 6.0, 5.0, -6.0]]), 1e-40, generator=generator).tolist() == [1]
    check_num_samples(MAX_SAMPLES, "num_samples")
    with pytest.raises(UserError, match="at most 65,536"):
        check_num_samples(MAX_SAMPLES + 1, "num_samples")


def test_non_finite_logits_under_the_multinomial_draw_are_the_one_line_refusal(monkeypatch):
    """MPS draws with torch.multinomial, which raises on NaN probabilities: the refusal is still one line."""
    monkeypatch.setattr(tinygemma.generate, "draw_racing", tinygemma.generate.draw_multinomial)
    broken = tiny_model()
    with torch.no_grad():
        broken.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="while generating"):
        generate(broken, torch.tensor([[1, 2]]), 3, temperature=1.0)


def test_text_stream_decodes_a_bounded_window_per_token():
    """O(1) per token, as TextStream promises: a few tokens of context and the new one, never the whole text."""
    tokenizer = GPT2Tokenizer()
    longest, decode = [], tokenizer.decode
    tokenizer.decode = lambda ids: (longest.append(len(ids)), decode(ids))[1]
    ids = tokenizer.encode(" Tom saw a dog and said hello." * 20)
    stream = TextStream(tokenizer, context=tokenizer.encode("Once upon a time"))
    assert "".join(stream.push(i) for i in ids) + stream.flush() == decode(ids)
    assert max(longest) <= 12


def test_a_prompt_whose_bos_passes_the_positions_is_refused_up_front(tmp_path):
    """The positions are counted with the <bos> a Gemma tokenizer puts first (the recipe's up-front check of the
    prompts, which a run passed to fail only at its samples)."""
    from test_hf import gemma_like_tokenizer

    from tinygemma.generate import prompt_ids
    from tinygemma.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(gemma_like_tokenizer(tmp_path / "tokenizer.json"))
    config = small_config(max_position_embeddings=4)
    assert prompt_ids(config, tokenizer, "Once upon a", 1) == [2, 3, 4, 5]  # 4 with <bos>: fills the positions
    with pytest.raises(UserError, match="positions"):
        prompt_ids(config, tokenizer, "Once upon a time", 1)


def test_samples_text_is_flushed_at_the_end_and_each_piece_streams_to_its_own_sample(monkeypatch):
    """A sample that stops at max_new_tokens inside a character keeps what was held back (a byte-fallback
    tokenizer's last whole characters, GPT-2's U+FFFD); on_text gets each sample's pieces under its own index."""
    tokenizer = GPT2Tokenizer()
    got = {}
    texts, _ = generate_text(tiny_model(), tokenizer, "Once upon a time", 8, temperature=1.0, seed=0, num_samples=3,
                             on_text=lambda i, piece: got.setdefault(i, []).append(piece))
    assert ["".join(got.get(i, [])) for i in range(3)] == texts and len(set(texts)) > 1
    emoji, real = tokenizer.encode(" 🦖"), tinygemma.generate.generate_stream

    def scripted(model, input_ids, max_new_tokens, *args, **kwargs):
        for step, _ in zip(range(max_new_tokens), real(model, input_ids, max_new_tokens, *args, **kwargs)):
            yield torch.tensor([emoji[step]] * len(input_ids))

    monkeypatch.setattr(tinygemma.generate, "generate_stream", scripted)
    texts, n = generate_text(tiny_model(), tokenizer, "Once", len(emoji) - 1, temperature=0)
    assert n == len(emoji) - 1 and texts == [tokenizer.decode(emoji[:-1])] and texts[0].endswith("\ufffd")


def test_a_top_p_below_float32s_least_keeps_the_most_likely_token_where_masses_are_float32(monkeypatch):
    """On MPS (no float64) the nucleus is summed in float32, against which top_p = 1e-300 rounds to 0: every
    token was cut. On the CPU the existing test runs in float64, where 1e-300 does not round, so it never
    exercised the guard; here the float32 path is forced."""
    monkeypatch.setattr(tinygemma.generate, "float64_on", lambda device: False)
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    assert kept(filter_logits(logits[0], top_p=1e-300)) == [1]
    assert tinygemma.generate.sample_next_token(logits, temperature=1.0, top_p=1e-300).tolist() == [1]


def test_an_end_of_text_of_id_0_stops_generation(monkeypatch):
    """A tokenizer trained by tinygemma (train_bpe: <|endoftext|> is its first special token) has eot_id 0: eos_id 0
    is one of the model's ids like any other, and generation stops at it (the tokens drawn are scripted, so that a
    0 comes second)."""
    tokenizer = train_bpe(["Once upon a time there was a little dog. It was happy."] * 20, 300)
    assert tokenizer.eot_id == 0
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    prompt = torch.tensor([tokenizer.encode("Once upon a time")])
    T = prompt.shape[1]

    def scripted():
        tokens = iter([5, 0, 7, 8, 9])
        return lambda logits, *args: torch.full((logits.shape[0],), next(tokens), dtype=torch.long)

    monkeypatch.setattr(tinygemma.generate, "sample_next_token", scripted())
    assert generate(model, prompt, 5, temperature=0)[0, T:].tolist() == [5, 0, 7, 8, 9]
    monkeypatch.setattr(tinygemma.generate, "sample_next_token", scripted())
    assert generate(model, prompt, 5, temperature=0, eos_id=0)[0, T:].tolist() == [5, 0]
    monkeypatch.setattr(tinygemma.generate, "sample_next_token", scripted())
    assert generate_text(model, tokenizer, "Once upon a time", 5, temperature=0)[1] == 2


def scripted_text(monkeypatch, tokenizer, prompt: str, tokens: list[int], max_new_tokens: int):
    """generate_text's texts, the pieces it streamed and the tokens it counted, where the model draws `tokens`
    whatever it computes."""
    def scripted(model, input_ids, max_new_tokens, *args, **kwargs):
        for token in tokens[:max_new_tokens]:
            yield torch.tensor([token] * len(input_ids))

    monkeypatch.setattr(tinygemma.generate, "generate_stream", scripted)
    pieces = []
    texts, n = generate_text(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, prompt, max_new_tokens,
                             temperature=0, on_text=lambda i, piece: pieces.append(piece))
    return texts, "".join(pieces), n


def test_a_samples_text_starts_with_the_space_a_sentencepiece_decoder_gives_it_after_the_prompt(tmp_path, monkeypatch):
    """A Metaspace (SentencePiece, Gemma) decoder drops the leading space of the first piece it decodes: the
    continuation's first word is decoded after the prompt's last tokens, so that "Once upon" goes on " a time",
    not "a time" (which the CLI prints as "Once upona time")."""
    words = ["<eos>", "\u2581Once", "\u2581upon", "\u2581a", "\u2581time"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    backend.add_special_tokens([AddedToken("<eos>", special=True)])
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    (tmp_path / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer.encode("Once upon") == [1, 2] and tokenizer.decode([3]) == "a"

    assert scripted_text(monkeypatch, tokenizer, "Once upon", [3, 4], 2) == ([" a time"], " a time", 2)


def test_a_run_of_byte_pieces_just_before_end_of_text_is_kept(monkeypatch):
    """A byte-fallback tokenizer's (Gemma's) run of <0xHH> pieces is held until a token of another kind ends it:
    when that token is end of text, the run (here "é", valid UTF-8) is still part of the sample's text."""
    vocab = {"<|endoftext|>": 0, "a": 1, **{f"<0x{i:02X}>": 2 + i for i in range(256)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = HFTokenizer(backend.to_str())
    reply = [1, *(2 + b for b in "é".encode()), 0]  # a, é as two byte pieces, end of text
    assert scripted_text(monkeypatch, tokenizer, "a", reply, 10) == (["a\u00e9"], "a\u00e9", 4)


def test_generation_under_autocast_caches_and_computes_in_the_autocast_dtype(monkeypatch):
    """Training's samples run under its autocast (rt.autocast(): bfloat16 on a GPU, or --set dtype=bfloat16 on a
    CPU): the KV cache holds the autocast dtype and the steps run the model's forward under it; the decode plan,
    which multiplies by its own float32 copies of the weights whatever autocast says, is not built."""
    model = tiny_model()
    caches, new_cache = [], model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1])
    monkeypatch.setattr(tinygemma.generate, "decode_plan", lambda *a, **k: pytest.fail("a decode plan under autocast"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, torch.tensor([[1, 2, 3]]), 4, temperature=0)
    assert out.shape == (1, 7) and all(layer.k.dtype == torch.bfloat16 for layer in caches[0])


def test_cli_top_k_zero_means_no_top_k_filter_as_none_does(ckpt, capsys):
    """--top-k 0 is documented as none (no top-k filter): it samples as --top-k none does, never a refusal."""
    args = ["generate", "--ckpt", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "4", "--temperature", "1.0",
            "--seed", "5", "--dtype", "float32"]
    assert main([*args, "--top-k", "none"]) == 0
    none = capsys.readouterr().out
    assert main([*args, "--top-k", "0"]) == 0
    assert capsys.readouterr().out == none


def test_the_padding_rows_of_a_padded_vocabulary_are_never_drawn():
    model = tiny_model(vocab_size=500, vocab_pad_multiple=128)
    assert model.embed_tokens.weight.shape[0] == 512
    with torch.no_grad():  # tied head: the padding rows made the likeliest by far
        model.embed_tokens.weight[500:] = torch.randn(12, model.config.d_model,
                                                      generator=torch.Generator().manual_seed(0)) * 50
    prompt = torch.tensor([[1, 2, 3]])
    greedy = generate(model, prompt, 4, temperature=0)[0, 3:]
    sampled = generate(model, prompt, 4, temperature=1.0, generator=torch.Generator().manual_seed(0))[0, 3:]
    assert greedy.max().item() < 500 and sampled.max().item() < 500


def test_zero_samples_is_refused_by_name(model, tokenizer):
    with pytest.raises(UserError, match=r"num_samples must be an integer >= 1, got 0"):
        generate_text(model, tokenizer, PROMPT, 4, num_samples=0)


def test_text_held_as_a_stop_strings_start_is_kept_at_end_of_text(model, tokenizer, monkeypatch):
    ids = tokenizer.encode(" Tom sa")

    def scripted(model, input_ids, max_new_tokens, *args, **kwargs):
        for token in [*ids, tokenizer.eot_id]:
            yield torch.tensor([token] * len(input_ids))

    monkeypatch.setattr(tinygemma.generate, "generate_stream", scripted)
    texts, n = generate_text(model, tokenizer, "Once", 10, temperature=0, stop="saw")
    assert texts == [" Tom sa"] and n == len(ids) + 1


def test_stop_none_is_no_stop_string():
    assert check_stop(None) == ()
