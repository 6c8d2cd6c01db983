"""Evaluation: loss over non-overlapping (or strided) windows, perplexity = exp(loss), bits per byte, and the eval command."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinygemma import Gemma3, ModelConfig, UserError, load
from tinygemma.checkpoint import save_model
from tinygemma.cli import main
from tinygemma.data import read_stories
from tinygemma.evaluation import evaluate

GPT2_SPEC = {"kind": "gpt2", "vocab_size": 50257, "eot_id": 50256}


def small_model(vocab_size: int = 50257, seed: int = 0, **overrides) -> Gemma3:
    config = ModelConfig.preset("gemma3-tiny", vocab_size=vocab_size, d_model=64, n_layers=2,
                                sliding_window_pattern=2, mlp_dim=128, sliding_window=8, **overrides)
    torch.manual_seed(seed)
    return Gemma3(config).eval()


def uniform_model(vocab_size: int) -> Gemma3:
    """A model whose logits are all zero: every next token has probability 1 / vocab_size."""
    model = small_model(vocab_size)
    with torch.no_grad():
        model.norm.weight.fill_(-1.0)  # RMSNorm's gain is 1 + w = 0: the final hidden state is zero
    return model


def test_uniform_model_against_hand_computed_values():
    V = 1000
    tokens = np.arange(11, dtype=np.uint16) * 7  # 11 tokens: 10 predictions, of ids 7, 14, ..., 70
    token_bytes = np.full(V, 4)
    token_bytes[14] = 0  # a special token (end-of-text): it stands for no text
    result = evaluate(uniform_model(V), tokens, block_size=4, batch_size=2, token_bytes=token_bytes)
    assert result["tokens"] == 10
    assert result["loss"] == pytest.approx(math.log(V), rel=1e-6)  # every prediction, end-of-text included
    assert result["perplexity"] == pytest.approx(V, rel=1e-5)
    # The 9 predictions that stand for text, log2(1000) bits each, over their 9 x 4 bytes.
    assert result["bytes"] == 36
    assert result["bits_per_byte"] == pytest.approx(9 * math.log2(V) / 36, rel=1e-6)
    # The first 6 tokens: 5 predictions (7 ... 35), 4 of them text, 16 bytes; counted, not estimated.
    head = evaluate(uniform_model(V), tokens, block_size=4, batch_size=2, max_tokens=6, token_bytes=token_bytes)
    assert head["tokens"] == 5 and head["bytes"] == 16
    assert head["bits_per_byte"] == pytest.approx(4 * math.log2(V) / 16, rel=1e-6)
    assert evaluate(uniform_model(V), tokens, 4)["bits_per_byte"] is None  # no byte lengths: no bits per byte


def test_windows_cover_every_prediction_once():
    """The loss equals one computed window by window by hand, whatever the batch size; the tail is shorter."""
    model = small_model(vocab_size=300, seed=1)
    tokens = np.random.default_rng(0).integers(0, 300, size=60).astype(np.uint16)  # 59 predictions
    B = 16
    nats = 0.0
    with torch.no_grad():
        for start in range(0, 59, B):
            window = torch.from_numpy(tokens[start : start + B + 1].astype(np.int64))[None]
            logits = model(window[:, :-1]).float()
            nats += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
    expected = nats / 59
    for batch_size in (1, 2, 8):
        result = evaluate(model, tokens, block_size=B, batch_size=batch_size, token_bytes=np.full(300, 4))
        assert result["tokens"] == 59 and result["bytes"] == 59 * 4
        assert result["loss"] == pytest.approx(expected, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
        assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / (59 * 4), rel=1e-5)
    # One window longer than the data: the plain loss of the whole sequence.
    with torch.no_grad():
        whole = torch.from_numpy(tokens.astype(np.int64))[None]
        plain = model(whole[:, :-1], whole[:, 1:]).item()
    assert evaluate(model, tokens, block_size=1000)["loss"] == pytest.approx(plain, rel=1e-5)


def test_a_stride_scores_each_prediction_once_with_the_context_it_promises():
    """--stride S: overlapping windows of B tokens whose ends advance by S, each scoring its last S predictions:
    the first B predictions read what precedes them, every later one exactly the B tokens before it (computed
    here one prediction at a time); S = B is the non-overlapping evaluation, to the bit."""
    from tinygemma.evaluation import window_batches

    for predicted, B, S, batch in [(59, 16, 4, 3), (59, 16, 16, 8), (16, 16, 5, 2), (7, 16, 3, 1), (100, 10, 1, 7)]:
        scored = []
        for starts, length, k in window_batches(predicted, B, S, batch):
            assert len(starts) <= batch and length <= B and 1 <= k <= length
            scored += [p for s in starts for p in range(s + length - k, s + length)]
        assert scored == list(range(predicted))  # every prediction once, in order
    model = small_model(vocab_size=300, seed=1)
    tokens = np.random.default_rng(0).integers(0, 300, size=60).astype(np.uint16)  # 59 predictions
    B, nats = 16, 0.0
    with torch.no_grad():
        for j in range(1, 60):  # the prediction of token j, from the (at most) B tokens before it
            context = torch.from_numpy(tokens[max(0, j - B) : j].astype(np.int64))[None]
            nats -= torch.log_softmax(model(context)[0, -1].float(), -1)[int(tokens[j])].item()
    for batch_size in (1, 4):
        result = evaluate(model, tokens, block_size=B, batch_size=batch_size, stride=1, token_bytes=np.full(300, 4))
        assert result["tokens"] == 59 and result["bytes"] == 59 * 4
        assert result["loss"] == pytest.approx(nats / 59, rel=1e-5)
    assert evaluate(model, tokens, B, stride=B) == evaluate(model, tokens, B)
    with pytest.raises(UserError, match=r"stride must be an integer from 1 to block_size \(16\), got 17"):
        evaluate(model, tokens, B, stride=17)


def test_bad_evaluate_arguments():
    model, tokens = small_model(300), np.zeros(10, dtype=np.uint16)
    for kwargs, says in (({"block_size": 0}, "block_size must be an integer >= 1, got 0"),
                         ({"block_size": 4, "batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
                         ({"block_size": 4, "max_tokens": 1}, r"max_tokens must be an integer >= 2 \(one to read")):
        with pytest.raises(UserError, match=says):
            evaluate(model, tokens, **kwargs)
    with pytest.raises(UserError, match=r"1 tokens to evaluate: at least 2 are needed"):
        evaluate(model, tokens[:1], 4)
    # A token file of the right size holding an id past the model's (corrupt): one line, not the embedding's
    # IndexError traceback
    tokens[7] = 300
    with pytest.raises(UserError, match=r"the tokens hold id 300, outside the model's 300 ids \(0 to 299\): the token file is corrupt"):
        evaluate(model, tokens, 4)
    with pytest.raises(UserError, match=r"token_bytes must give the bytes of each of the model's 300 ids"):
        evaluate(model, np.zeros(10, dtype=np.uint16), 4, token_bytes=np.ones(100, dtype=np.int64))  # (IndexError)


@pytest.mark.parametrize("args, message", [
    ((np.arange(10, dtype=np.uint16), "4"), "block_size must be an integer >= 1, got '4'"),
    ((np.arange(10, dtype=np.uint16), 4, 2.0), "batch_size must be an integer >= 1, got 2.0"),
    ((np.arange(10, dtype=np.uint16), 4, 2, 5.5), "max_tokens must be an integer >= 2 (one to read, one to predict), "
                                                   "got 5.5"),
    ((np.ones((3, 4), dtype=np.int64), 4), "tokens must be a 1-D sequence of token ids, got 2 dimensions"),
    (([[1, 2, 3], [4, 5, 6]], 2), "tokens must be a 1-D sequence of token ids, got 2 dimensions"),
    ((np.array([1.5, 2.0, 3.0, 4.0]), 2), "token ids must be integers, got float64 values"),
    ((np.array([1, -1, 3, 4]), 2), "the tokens hold id -1, outside the model's 300 ids (0 to 299)"),
])
def test_evaluate_from_python_refuses_arguments_of_the_wrong_kind(args, message):
    """evaluate(model, tokens, "4") was a TypeError, 2-d tokens a ValueError, float ids were truncated to ints
    without a word, and -1 ended in the embedding's IndexError: each is a UserError now."""
    with pytest.raises(UserError, match=re.escape(message)):
        evaluate(small_model(300), *args)
    # a list and a tensor of ids are 1-D sequences too
    assert evaluate(small_model(300), list(range(10)), 4)["loss"] == evaluate(small_model(300), torch.arange(10), 4)["loss"]


# ------------------------------------------------------------------ the eval command


@pytest.fixture(scope="module")
def stories_file(tmp_path_factory, stories_dir):
    """The first 60 validation stories of the shared TinyStories sample."""
    stories = (stories_dir / "valid.txt").read_text(encoding="utf-8").split("<|endoftext|>")[:60]
    path = tmp_path_factory.mktemp("stories") / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(s.strip() for s in stories), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory, stories_file):
    from tinygemma.data import prepare

    out = tmp_path_factory.mktemp("data-gpt2")
    prepare(out, sources=[stories_file], val_fraction=0.3, tokenizer="gpt2", workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(small_model(), directory, {"tokenizer": GPT2_SPEC})
    return directory


def test_eval_command_prints_one_json_object(ckpt, gpt2_data, capsys, monkeypatch):
    from tinygemma import load
    from tinygemma.data import open_prepared
    from tinygemma.tokenizer import load_tokenizer, token_byte_lengths

    data = open_prepared(gpt2_data)
    tokens, val = data.split("val"), data.meta["splits"]["val"]
    lengths = token_byte_lengths(load_tokenizer("gpt2"), 50257)
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(gpt2_data), "--block-size", "64",
                 "--max-tokens", "300", "--dtype", "float32"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert {"loss", "perplexity", "bits_per_byte", "tokens"} <= set(result)
    assert result["tokens"] == 299 and result["split"] == "val"
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["bytes"] == lengths[tokens[1:300].astype(np.int64)].sum()  # the bytes of the tokens predicted
    assert "evaluated" in err and "tok/s" not in err and "\r" not in err  # no progress frames in a log file
    # --batch-size is the windows per forward pass (a smaller one is the advice for out of memory)
    import tinygemma.evaluation

    seen, real = [], tinygemma.evaluation.evaluate  # (eval imports it as it runs)
    monkeypatch.setattr(tinygemma.evaluation, "evaluate", lambda model, tokens, block, batch, *a, **k: seen.append(
        batch) or real(model, tokens, block, batch, *a, **k))
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(gpt2_data), "--block-size", "64", "--max-tokens", "300",
                 "--dtype", "float32", "--batch-size", "3"]) == 0
    assert seen == [3] and json.loads(capsys.readouterr().out)["loss"] == pytest.approx(result["loss"], rel=1e-6)
    monkeypatch.undo()
    # --dtype auto on a CPU is float32 (bf16 where the CPU computes in it natively gave other numbers than the
    # run's own evaluations, which eval reproduces)
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(gpt2_data), "--block-size", "64",
                 "--max-tokens", "300"]) == 0
    assert json.loads(capsys.readouterr().out) == {**result, "dtype": "float32"}
    # --dtype bfloat16 is what it evaluates in (a test of float32 and auto alone passed with the flag ignored)
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(gpt2_data), "--block-size", "64",
                 "--max-tokens", "300", "--dtype", "bfloat16"]) == 0
    in_bf16 = json.loads(capsys.readouterr().out)
    assert in_bf16["dtype"] == "bfloat16" and in_bf16["loss"] != result["loss"]
    assert in_bf16["loss"] == pytest.approx(result["loss"], rel=2e-2)
    # The whole split: every byte of its stories but those of the first token, which nothing predicts.
    direct = evaluate(load(ckpt), tokens, 64, token_bytes=lengths)
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(gpt2_data), "--block-size", "64", "--dtype",
                 "float32"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["tokens"] == len(tokens) - 1
    assert whole["bytes"] == val["bytes"] - lengths[int(tokens[0])]
    assert whole["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    # --stride: overlapping windows, each prediction past the first window with at least 48 tokens of context
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(gpt2_data), "--block-size", "64", "--stride", "16",
                 "--max-tokens", "300", "--dtype", "float32"]) == 0
    strided = json.loads(capsys.readouterr().out)
    assert strided["stride"] == 16 and strided["tokens"] == 299 and strided["bytes"] == result["bytes"]
    assert strided["loss"] == pytest.approx(evaluate(load(ckpt), tokens, 64, max_tokens=300, stride=16)["loss"],
                                            rel=1e-6)
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(gpt2_data), "--block-size", "64", "--stride", "65"]) == 2
    assert "stride must be an integer from 1 to block_size (64), got 65" in capsys.readouterr().err
    assert whole["bits_per_byte"] == pytest.approx(direct["bits_per_byte"], rel=1e-6)
    # Bits per byte is below loss / ln 2 x tokens / bytes: end-of-text predictions are outside both sums.
    assert whole["bits_per_byte"] < whole["loss"] / math.log(2) * whole["tokens"] / whole["bytes"]


def test_eval_of_an_export_takes_the_block_size_it_was_trained_at(gpt2_data, tmp_path, capsys):
    """An hf export carries the training block size in its weights' header, so `tinygemma eval` of the export
    gives the run's numbers again without --block-size; a transformers folder that records none takes 512."""
    from safetensors.torch import load_file, save_file

    from tinygemma.checkpoint import export  # the command's export, without its model card's samples (slow)

    save_model(small_model(), tmp_path / "ckpt", {"tokenizer": GPT2_SPEC, "train": {"block_size": 48}})
    export(tmp_path / "ckpt", tmp_path / "hf")
    export(tmp_path / "ckpt", tmp_path / "twin")  # exports are byte-reproducible (files.sorted_metadata)
    files = sorted(path.name for path in (tmp_path / "hf").iterdir())
    assert files == sorted(path.name for path in (tmp_path / "twin").iterdir()) and "model.safetensors" in files
    assert all((tmp_path / "hf" / name).read_bytes() == (tmp_path / "twin" / name).read_bytes() for name in files)
    results = []
    for source in ("ckpt", "hf"):
        assert main(["eval", "--ckpt", str(tmp_path / source), "--data", str(gpt2_data), "--max-tokens", "300"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["block_size"] == results[1]["block_size"] == 48
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=1e-6)
    # A --block-size past the trained one is measured, with a note: the positions past 48 were never trained on
    for block_size, noted in ((96, True), (48, False), (32, False)):
        assert main(["eval", "--ckpt", str(tmp_path / "hf"), "--data", str(gpt2_data), "--max-tokens", "300",
                     "--block-size", str(block_size)]) == 0
        err = capsys.readouterr().err
        assert ("note: --block-size 96 is past the 48 tokens the model trained on at once: it predicts positions 48 "
                "to 95 from distances it never saw" in err) == noted, err
    # Re-exported, the export keeps it; a folder whose header lacks it (another exporter's) takes the default.
    export(tmp_path / "hf", tmp_path / "again")
    weights = tmp_path / "hf" / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    for source, block_size in (("again", 48), ("hf", 512)):
        assert main(["eval", "--ckpt", str(tmp_path / source), "--data", str(gpt2_data), "--max-tokens", "600"]) == 0
        assert json.loads(capsys.readouterr().out)["block_size"] == block_size
    # A model with fewer positions than that default (a notebook's save_model, no block size recorded) takes its
    # own count, where it was refused for a --block-size never given; given, a longer one is still refused.
    short = small_model(max_position_embeddings=64)
    save_model(short, tmp_path / "short", {"tokenizer": GPT2_SPEC})
    assert main(["eval", "--ckpt", str(tmp_path / "short"), "--data", str(gpt2_data), "--max-tokens", "300"]) == 0
    assert json.loads(capsys.readouterr().out)["block_size"] == 64
    assert main(["eval", "--ckpt", str(tmp_path / "short"), "--data", str(gpt2_data), "--block-size", "65"]) == 2
    assert "--block-size 65 exceeds the model's max_position_embeddings (64)" in capsys.readouterr().err


def test_eval_of_a_story_file_reads_it_in_the_checkpoints_tokens(ckpt, stories_file, capsys):
    """`eval --data stories.txt` evaluates the whole file, read as prepare reads it (each story then end-of-text),
    in the checkpoint's own tokens. It was refused with advice to prepare it, which gave GPT-2's tokens whatever
    the checkpoint's tokenizer (a BPE run's eval then refused them), and a short file no validation split."""
    from tinygemma import load
    from tinygemma.data import read_stories
    from tinygemma.tokenizer import load_tokenizer, token_byte_lengths

    gpt2 = load_tokenizer("gpt2")
    ids = [i for story in read_stories(stories_file) for i in (*gpt2.encode(story), gpt2.eot_id)]
    lengths = token_byte_lengths(gpt2, 50257)
    direct = evaluate(load(ckpt), np.array(ids), 64, token_bytes=lengths)
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(stories_file), "--block-size", "64",
                 "--dtype", "float32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == len(ids) - 1 and result["split"] == "the whole file"
    assert result["bytes"] == sum(len(s.encode("utf-8")) for s in read_stories(stories_file)) - lengths[ids[0]]
    assert result["loss"] == pytest.approx(direct["loss"], rel=1e-6) and "max_tokens" not in result
    # --max-tokens cuts it short: the result says so, not "the whole file"
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(stories_file), "--block-size", "64",
                 "--dtype", "float32", "--max-tokens", "100"]) == 0
    cut_short = json.loads(capsys.readouterr().out)
    assert (cut_short["split"], cut_short["max_tokens"], cut_short["tokens"]) == ("the file's first 100 tokens", 100, 99)
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(stories_file), "--split", "train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--split" in err
    # A mistyped name is not found (it was told to prepare a dataset under that name); a meta.json beside the
    # stories that is not a prepared dataset's (no tokenizer.json, a foreign file) leaves them stories
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(stories_file.parent / "missing.txt")]) == 2
    assert "story file not found" in capsys.readouterr().err
    (stories_file.parent / "meta.json").write_text('{"author": "me"}')
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(stories_file), "--block-size", "64",
                 "--dtype", "float32"]) == 0
    assert json.loads(capsys.readouterr().out) == result
    (stories_file.parent / "meta.json").unlink()
    (stories_file.parent / "empty.jsonl").write_text("")
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(stories_file.parent / "empty.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no stories" in err


def test_eval_refuses_data_from_another_tokenizer(ckpt, stories_file, tmp_path, capsys):
    from tinygemma.data import prepare

    prepare(tmp_path, sources=[stories_file], val_fraction=0.3, tokenizer="bpe", vocab_size=300, workers=1,
            progress=False)
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "tokenizer" in err and err.count("\n") == 1


def test_eval_bad_input(ckpt, gpt2_data, tmp_path, capsys):
    for extra in (["--max-tokens", "1"], ["--block-size", "0"], ["--split", "test"]):
        assert main(["eval", "--ckpt", str(ckpt), "--data", str(gpt2_data), *extra]) == 2
    # Windows longer than the model has positions: refused, not evaluated past what it was built for.
    positions = load(ckpt).config.max_position_embeddings
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(gpt2_data), "--block-size", str(positions + 1)]) == 2
    assert f"--block-size {positions + 1} exceeds the model's max_position_embeddings ({positions})" in \
        capsys.readouterr().err
    assert main(["eval", "--ckpt", str(tmp_path / "missing"), "--data", str(gpt2_data)]) == 2
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(tmp_path)]) == 2  # no meta.json
    assert capsys.readouterr().out == ""


def test_the_sums_of_a_batch_make_no_call_that_waits_for_a_gpu():
    """nats_and_bytes runs for every evaluation batch, in training's evaluations too: a boolean mask (nonzero) or a
    number copied to the device makes the host wait for a GPU. The CPU sees the same operators; none of those.
    The sums agree with the plain arithmetic, the masked tokens' infinite nats left out of the text's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tinygemma.evaluation import nats_and_bytes

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            masks = [i for i in (args[1] if func.overloadpacket is torch.ops.aten.index else ())
                     if i is not None and i.dtype == torch.bool]
            self.ops.append(str(func.overloadpacket) + (" with a boolean mask" if masks else ""))
            return func(*args, **(kwargs or {}))

    nats = torch.tensor([[1.0, 2.0, math.inf], [0.5, 0.25, 4.0]])
    targets = torch.tensor([[3, 1, 0], [2, 0, 3]])
    token_bytes = torch.tensor([0, 2, 3, 1])  # id 0: end-of-text, no bytes
    with Calls() as calls:
        sums = nats_and_bytes(nats, targets, token_bytes)
    waits = [op for op in calls.ops if op.split(".")[-1] in ("nonzero", "_local_scalar_dense", "lift_fresh",
                                                             "masked_select") or "boolean mask" in op]
    assert not waits and "aten.index" in calls.ops, calls.ops  # token_bytes[targets]: an index by ids, no wait
    assert sums.tolist() == [math.inf, 6.0, 1.0 + 2.0 + 0.5 + 4.0, 1 + 2 + 3 + 1]


def test_max_tokens_beyond_the_data_evaluates_all_of_it():
    """`eval --max-tokens 1000000` on a short file: the whole of it, as without the cap."""
    torch.manual_seed(0)
    model = Gemma3(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                               mlp_dim=64, sliding_window=8, query_pre_attn_scalar=16.0))
    tokens = torch.randint(0, 64, (101,)).numpy()
    assert evaluate(model, tokens, 16, max_tokens=10_000) == evaluate(model, tokens, 16)


def test_evaluation_on_a_device_without_float64_sums_each_batch_in_float32_and_the_total_on_the_host(monkeypatch):
    """Apple's MPS has no float64 (a TypeError): training's step-0 evaluation, and `tinygemma eval`, failed there at
    their float64 sums on the device. On such a device (the CPU standing in for it) no operator makes a float64
    tensor but the host's total and its additions, and the figures are those of float64 sums."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import tinygemma.evaluation as evaluation
    from tinygemma.runtime import Runtime

    class Float64(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
                self.ops.add(func.overloadpacket.__name__)
            return out

    torch.manual_seed(0)
    model = Gemma3(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                               mlp_dim=64, sliding_window=8, query_pre_attn_scalar=16.0))
    tokens = torch.randint(0, 64, (301,)).numpy()
    token_bytes = torch.arange(64) % 3
    starts = np.arange(0, 280, 20)
    cpu = Runtime(torch.device("cpu"), torch.float32)
    exact = evaluate(model, tokens, 16, batch_size=4, token_bytes=token_bytes)
    exact_windows = evaluation.evaluate_windows(model, tokens, starts, token_bytes, 4, 16, cpu)
    monkeypatch.setattr(evaluation, "float64_on", lambda device: False)
    with Float64() as mode:
        figures = evaluate(model, tokens, 16, batch_size=4, token_bytes=token_bytes)
        windows = evaluation.evaluate_windows(model, tokens, starts, token_bytes, 4, 16, cpu)
    assert mode.ops <= {"zeros", "add_"}, mode.ops
    monkeypatch.undo()
    assert evaluation.sums_on(torch.device("mps")).device.type == "cpu"  # (where a real MPS device would fail)
    assert evaluation.sums_on(torch.device("cpu")).dtype == torch.float64
    assert evaluate(model, tokens, 16, batch_size=4, token_bytes=token_bytes, device="cpu") == exact  # a str too
    for got, want in ((figures, exact), (windows, exact_windows)):
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-6) for k in want)


def test_the_windows_go_to_a_device_other_than_cuda_synchronously(monkeypatch):
    """evaluate copied each batch of windows with non_blocking=True on every device: on Apple's MPS such a copy of
    ordinary (not pinned) CPU memory reads it after the call returns, and the temporary batch could be freed by
    then (pytorch/pytorch#139550: wrong ids, a wrong loss said as right). Only CUDA's copy is asynchronous now
    (the CPU standing in for MPS: no copy asks for it)."""
    calls, real = [], torch.Tensor.to

    def to(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking", False))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    evaluate(small_model(64), np.arange(200) % 64, 16, batch_size=2, token_bytes=torch.ones(64, dtype=torch.long))
    assert len(calls) >= 6 and not any(calls)  # (six batches of windows at least)


def test_an_evaluation_whose_loss_overflows_exp_still_reports():
    """A diverged model's validation (mean nats past 709): perplexity is inf (null in JSON), not an OverflowError
    that ends training at its periodic evaluation, nor e**700 for every loss past it; the log line shows 3
    figures of a huge one, not 300 digits."""
    from tinygemma.evaluation import perplexity_text, summarize

    result = summarize(torch.tensor([1000.0 * 8, 8, 1000.0 * 8, 32], dtype=torch.float64))
    assert result["loss"] == 1000.0 and result["perplexity"] == math.inf and result["tokens"] == 8
    assert summarize(torch.tensor([709.0 * 8, 8, 0.0, 32], dtype=torch.float64))["perplexity"] == math.exp(709.0)
    assert [perplexity_text(v) for v in (7.389, 999_999.0, math.exp(700.0), math.inf)] == [
        "7.39", "999999.00", "1.01e+304", "inf"]
    assert summarize(torch.tensor([math.inf, 8, 0.0, 0.0], dtype=torch.float64))["bits_per_byte"] is None


def test_a_stride_of_zero_is_refused_before_the_model_loads():
    from tinygemma.evaluation import check_evaluation

    with pytest.raises(UserError, match=r"stride must be an integer from 1 to block_size \(16\), got 0"):
        check_evaluation(16, 8, None, 0)


def test_max_tokens_of_one_is_refused_before_the_model_loads():
    from tinygemma.evaluation import check_evaluation

    with pytest.raises(UserError, match=r"max_tokens must be an integer >= 2"):
        check_evaluation(16, 8, 1)


def test_evaluate_gives_back_the_models_mode():
    model, tokens = small_model(300), np.arange(20, dtype=np.uint16)
    model.eval()
    evaluate(model, tokens, 4)
    assert not model.training
    model.train()
    evaluate(model, tokens, 4)
    assert model.training


def test_validation_windows_are_split_between_the_processes(tmp_path, monkeypatch):
    """Under torchrun each process evaluates its own share of the validation batches, together all of them once
    (every process evaluating all of them gave the same figures for world_size times the work). A one-process
    gloo group stands in for torchrun's, this process posing as process 0 and then 1 of two."""
    import torch.distributed as dist

    import tinygemma.evaluation as evaluation
    from tinygemma.runtime import Runtime

    model = small_model(300)
    tokens = np.random.default_rng(0).integers(0, 300, size=400).astype(np.uint16)
    starts, token_bytes = np.arange(0, 320, 20), torch.full((300,), 2)  # 16 windows: 4 batches of 4
    read, real = [], evaluation.windows
    monkeypatch.setattr(evaluation, "windows", lambda t, s, *a: (read.append([int(x) for x in s]), real(t, s, *a))[1])
    whole = evaluation.evaluate_windows(model, tokens, starts, token_bytes, 4, 16, Runtime(torch.device("cpu"), torch.float32))
    assert sorted(sum(read, [])) == starts.tolist()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shares = []
        for rank in (0, 1):
            read.clear()
            evaluation.evaluate_windows(model, tokens, starts, token_bytes, 4, 16,
                                        Runtime(torch.device("cpu"), torch.float32, rank=rank, world_size=2))
            shares.append(sum(read, []))
    finally:
        dist.destroy_process_group()
    assert len(shares[0]) == len(shares[1]) == 8 and sorted(shares[0] + shares[1]) == starts.tolist()
    assert math.isfinite(whole["val_loss"])


def test_byte_lengths_longer_than_the_models_ids_are_taken():
    """token_bytes names at least the model's ids; a longer table (a tokenizer's whole, the model trained on its
    first ids) is read only where the model's ids reach, as the documentation of the refusal says."""
    model, tokens = small_model(300), np.arange(20, dtype=np.uint16)
    longer = evaluate(model, tokens, 4, token_bytes=np.full(310, 2))
    assert longer == evaluate(model, tokens, 4, token_bytes=np.full(300, 2)) and longer["bytes"] == 38


def test_validation_runs_in_the_runtimes_autocast(monkeypatch):
    """tests/test_evaluation.py (small_model). Training's evaluation computes in the precision training does
    (rt.autocast()), as `tinygemma eval` of its checkpoint in that dtype does."""
    import tinygemma.evaluation as evaluation
    from tinygemma.runtime import Runtime

    model = small_model(300)
    tokens = np.random.default_rng(0).integers(0, 300, size=200).astype(np.uint16)
    seen, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: (seen.append(torch.get_autocast_dtype("cpu")
                                                                       if torch.is_autocast_enabled("cpu") else None),
                                                           forward(*a, **k))[1])
    evaluation.evaluate_windows(model, tokens, np.arange(0, 160, 20), torch.full((300,), 2), 4, 16,
                                Runtime(torch.device("cpu"), torch.bfloat16))
    assert seen == [torch.bfloat16, torch.bfloat16]


def test_validation_with_one_window_a_batch_reads_every_window(monkeypatch):
    """tests/test_evaluation.py (small_model). micro_batch_size 1: each window its own batch, all of them read."""
    import tinygemma.evaluation as evaluation
    from tinygemma.runtime import Runtime

    model = small_model(300)
    tokens = np.random.default_rng(0).integers(0, 300, size=200).astype(np.uint16)
    read, real = [], evaluation.windows
    monkeypatch.setattr(evaluation, "windows", lambda t, s, *a: (read.append([int(x) for x in s]), real(t, s, *a))[1])
    starts = np.arange(0, 140, 20)
    for batch_size in (1, 2, 3):
        read.clear()
        evaluation.evaluate_windows(model, tokens, starts, torch.full((300,), 2), batch_size, 16,
                                    Runtime(torch.device("cpu"), torch.float32))
        assert sum(read, []) == starts.tolist(), batch_size


def test_eval_reads_eight_windows_a_pass_when_no_batch_size_is_given(ckpt, gpt2_data, capsys, monkeypatch):
    """--batch-size's default is the 8 its help promises (and the number the out-of-memory advice lowers)."""
    import tinygemma.evaluation

    seen, real = [], tinygemma.evaluation.evaluate  # (eval imports it as it runs)
    monkeypatch.setattr(tinygemma.evaluation, "evaluate", lambda model, tokens, block, batch, *a, **k: seen.append(
        batch) or real(model, tokens, block, batch, *a, **k))
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(gpt2_data), "--block-size", "64", "--max-tokens", "300",
                 "--dtype", "float32"]) == 0
    capsys.readouterr()
    assert seen == [8]


def test_strided_evaluation_scores_the_whole_first_window_at_once():
    # evaluation.py:115 `(block_size if end == 0 else stride)` -> `stride`: the first window is all of its own
    # (block_size predictions in one forward), the later ones advance by the stride
    from tinygemma.evaluation import window_batches

    assert list(window_batches(10, 4, 2, 8)) == [([0], 4, 4), ([2, 4, 6], 4, 2)]


def test_token_bytes_of_the_wrong_shape_is_refused_in_one_line():
    # evaluation.py:85 dropping `token_bytes.dim() != 1`: a [vocab, 2] table got past the check into a raw torch error
    model = small_model(vocab_size=64)
    tokens = np.arange(40) % 64
    with pytest.raises(UserError, match="token_bytes must give"):
        evaluate(model, tokens, block_size=8, token_bytes=torch.ones(64, 2, dtype=torch.int64))


def test_validation_without_byte_counts_gives_nan_bits_per_byte_not_none():
    # evaluation.py:150: no text bytes (special tokens only) -> val_bpb NaN (a number for metrics.jsonl), never None
    from tinygemma.evaluation import evaluate_windows
    from tinygemma.runtime import Runtime

    model = small_model(vocab_size=64)
    tokens = (np.arange(100) % 64).astype(np.uint16)
    result = evaluate_windows(model, tokens, np.arange(0, 64, 16), torch.zeros(64, dtype=torch.int64), 2, 8,
                              Runtime(torch.device("cpu"), torch.float32))
    assert math.isfinite(result["val_loss"])
    assert isinstance(result["val_bpb"], float) and math.isnan(result["val_bpb"])


def test_max_tokens_of_exactly_the_files_length_is_the_whole_file(ckpt, stories_file, capsys):
    """--max-tokens equal to the file's token count evaluates all of it, and the result says "the whole file"
    with no max_tokens, as without the cap."""
    from tinygemma.tokenizer import load_tokenizer

    gpt2 = load_tokenizer("gpt2")
    n = sum(len(gpt2.encode(story)) + 1 for story in read_stories(stories_file))
    argv = ["eval", "--ckpt", str(ckpt), "--data", str(stories_file), "--block-size", "8", "--dtype", "float32"]
    assert main(argv) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main([*argv, "--max-tokens", str(n)]) == 0
    capped = json.loads(capsys.readouterr().out)
    assert capped == whole and capped["split"] == "the whole file" and capped["tokens"] == n - 1


def test_evaluate_refuses_a_single_id_in_one_line():
    """A 0-d array, tensor or int of one id (tokens[0] where tokens was meant) is no 1-D sequence: a UserError
    naming its 0 dimensions, not len()'s TypeError traceback."""
    for tokens in (np.array(5), np.int64(5), torch.tensor(5)):
        with pytest.raises(UserError, match=r"tokens must be a 1-D sequence of token ids, got 0 dimensions"):
            evaluate(small_model(300), tokens, 4)
