"""Shared test fixtures: real TinyStories text and the offline GPT-2 vocabulary from ../shared."""

import atexit
import builtins
import contextlib
import errno
import gc
import importlib.util
import inspect
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYGEMMA_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "data" / "tinystories"
PACKAGE = Path(importlib.util.find_spec("tinygemma").origin).parent  # (src/tinygemma, or where installed)

# tiktoken's own mechanism for an offline vocabulary: the GPT-2 ranks under their cache name.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Experiment trackers stay on this machine: wandb offline (its files under each run directory), trackio's store
# in a temporary directory rather than the user's cache (read when trackio is first imported).
TRACKIO_DIR = tempfile.mkdtemp(prefix="tinygemma-trackio-")
atexit.register(shutil.rmtree, TRACKIO_DIR, ignore_errors=True)  # one per test process: none left in /tmp
os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", TRACKIO_DIR=TRACKIO_DIR)
for remote in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
    os.environ.pop(remote, None)
# A Ctrl-C or SIGTERM this process was started to ignore (a CI script's background job) would be ignored by every
# tinygemma process the tests start, which keeps such a signal so: the tests' own go to them with Python's defaults.
for _signum, _default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
    if signal.getsignal(_signum) == signal.SIG_IGN:
        signal.signal(_signum, _default)
# Two threads at most; under pytest-xdist (`-n N`) the cores are shared out among the N workers, so that
# workers' OpenMP threads do not spin against each other on a small machine.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _workers)))
if _workers > 1:  # likewise tokenizers' thread pool, one thread per core in every worker otherwise
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without xdist (the GPU image) pytest must still start
def pytest_xdist_auto_num_workers(config) -> int | None:
    """`-n auto`: one worker per usable core, at most 8. The README's command hands out whole files
    (`--dist loadfile`), and the longest files take a minute or two each: more workers would wait, each with its
    own torch in memory. xdist's own choice (None) where the user made one: PYTEST_XDIST_AUTO_NUM_WORKERS, or
    `-n logical`."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS") or config.option.numprocesses == "logical":
        return None
    from tinygemma.data import available_cpus  # after the environment above is set

    return min(8, available_cpus())


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """../shared/data/tinystories: train.txt, v2_train.txt, valid.txt (see its README)."""
    assert (STORIES / "train.txt").exists(), f"real TinyStories samples expected at {STORIES}"
    return STORIES


@pytest.fixture
def hub_login(monkeypatch):
    """A Hugging Face login and the hub online, as --push-to-hub checks before exporting (the tests' environment is
    offline, with no token): HfApi's calls themselves are the test's to replace."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _process_settings() -> dict:
    """Process-wide settings a test file must leave as it found them: xdist hands a worker's files out in an
    order that varies, so one left changed reaches whichever files follow, only sometimes."""
    import torch.distributed as dist

    return {"torch threads": torch.get_num_threads(), "torch interop threads": torch.get_num_interop_threads(),
            "default dtype": torch.get_default_dtype(), "float32 matmul precision": torch.get_float32_matmul_precision(),
            "grad enabled": torch.is_grad_enabled(),
            "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
            "process group": dist.is_available() and dist.is_initialized(), "cwd": os.getcwd(),
            "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM")}


_SETTINGS = _process_settings()


@pytest.fixture(autouse=True)
def _objects_before_this_test_frozen():
    """The objects alive as a test starts (the imported modules, torch's, matplotlib's and transformers' included;
    the files' fixtures and caches) move out of the garbage collector's sight, after a collection of the earlier
    tests' garbage: every run's end collects garbage (train's release, once in a user's process), and in a test
    process of some 400,000 objects each collection took half a second, hundreds of times. What the test itself
    makes is still collected."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _compiled_shapes_forgotten_after_this_test():
    """Dynamo remembers, per code object, the shapes it compiled: a later compile of the same code (Gemma3.forward)
    at other shapes traces them as symbolic sizes ("automatic dynamic"). One test's compile would then make the
    next one's a dynamic-shape graph, several times slower to make and unlike the static one a training process
    compiles. After each test that loaded dynamo, its graphs and that memory go."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


@pytest.fixture(scope="module", autouse=True)
def _file_leaves_process_settings_alone():
    yield
    changed = {k: (v, now) for k, v in _SETTINGS.items() if (now := _process_settings()[k]) != v}
    if changed:  # put back what can be, so that the files after this one are not blamed for it as well
        torch.set_num_threads(_SETTINGS["torch threads"])
        torch.set_default_dtype(_SETTINGS["default dtype"])
        torch.set_float32_matmul_precision(_SETTINGS["float32 matmul precision"])
        torch.set_grad_enabled(_SETTINGS["grad enabled"])
        torch.use_deterministic_algorithms(_SETTINGS["deterministic algorithms"])
        os.chdir(_SETTINGS["cwd"])
        if _SETTINGS["TOKENIZERS_PARALLELISM"] is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = _SETTINGS["TOKENIZERS_PARALLELISM"]
    assert not changed, f"this file changed process-wide settings (before, after): {changed}"


def flash_reference(q, k, v, scale, is_causal, left, right):
    """FlashAttention-2's local attention as its documentation states it, on its [B, T, heads, D] layout: query i
    sees keys i - left <= j <= i + right (a negative or absent bound: none), and j <= i when causal (T_q = T_k);
    a K/V head serves n_heads // n_kv_heads query heads. (probabilities [B, H, T, T] in float32, q, k, v as
    [B, H, T, D] in float32 with K/V repeated per query head)"""
    H, KV, T = q.shape[2], k.shape[2], q.shape[1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    keep = (j <= i) if is_causal else torch.ones(T, T, dtype=torch.bool)
    if left is not None and left >= 0:
        keep &= j >= i - left
    if right is not None and right >= 0 and not is_causal:
        keep &= j <= i + right
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
    kf, vf = kf.repeat_interleave(H // KV, 1), vf.repeat_interleave(H // KV, 1)
    probs = ((qf @ kf.transpose(-1, -2)) * scale).masked_fill(~keep, float("-inf")).softmax(-1)
    return probs, qf, kf, vf


@pytest.fixture
def read_only_folders(monkeypatch):
    """Folders whose making fails as on a read-only disk (EROFS): read_only_folders.add(path)."""
    folders, real = set(), Path.mkdir

    def mkdir(path, *args, **kwargs):
        if path in folders:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    return folders


class EntryInterrupter:
    """contextlib's next(), once armed: KeyboardInterrupt as the `at`-th of tinygemma's generators entered from then
    in the arming thread (of those named `name`, where one is given) yields, where a Ctrl-C lands when CPython runs
    its handler as next() returns, before the `with` holds the manager; once. `entered` names those entered since
    it was armed. (Other packages' managers are not counted: wandb's stderr hook, left by an earlier test, enters
    one as a warning is printed.)"""

    def __init__(self):
        self.at, self.name, self.entered, self.thread = None, None, [], None

    def arm(self, at: int, name: str | None = None) -> None:
        self.at, self.name, self.entered, self.thread = at, name, [], threading.get_ident()

    def entering(self, name: str, filename: str) -> None:
        if (self.at is not None and self.name in (None, name) and threading.get_ident() == self.thread
                and Path(filename).is_relative_to(PACKAGE)):
            self.entered.append(name)
            if len(self.entered) == self.at:
                self.at = None
                raise KeyboardInterrupt

    def __call__(self, gen, *default):
        starting = inspect.getgeneratorstate(gen) == inspect.GEN_CREATED
        value = builtins.next(gen, *default)
        if starting:
            self.entering(gen.__name__, gen.gi_code.co_filename)
        return value


@pytest.fixture
def interrupt_on_entry(monkeypatch):
    """An EntryInterrupter in contextlib's next(), which also counts, as "ExitStack", the instant an ExitStack's
    enter_context (called by tinygemma) has entered a manager and not yet taken hold of it."""
    interrupter, push = EntryInterrupter(), contextlib.ExitStack._push_cm_exit

    def take_hold(stack, manager, exit):
        interrupter.entering("ExitStack", sys._getframe(2).f_code.co_filename)  # (enter_context's caller)
        return push(stack, manager, exit)

    monkeypatch.setattr(contextlib, "next", interrupter, raising=False)
    monkeypatch.setattr(contextlib.ExitStack, "_push_cm_exit", take_hold)
    return interrupter


@pytest.fixture
def flash_stand_in():
    """torch's FlashAttention-2 entry points (`aten::_flash_attention_forward` and its backward: CUDA kernels
    only) given CPU kernels that compute what FlashAttention's documentation says, so that a CPU can check what
    the model asks of them (layout, window bounds, the shared K/V head) under autograd and torch.compile. What
    the real kernels compute is test_cuda.py's to check. Yields the calls' window sizes."""
    calls = []

    def forward(q, k, v, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, scale=None,
                window_size_left=None, window_size_right=None, *rest, **options):
        assert q.dim() == 4 and q.shape[1] == max_q and k.shape[1] == max_k and cum_seq_q is None and not dropout_p
        calls.append((window_size_left, window_size_right, is_causal))
        probs, _, _, vf = flash_reference(q, k, v, scale, is_causal, window_size_left, window_size_right)
        lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1])  # (read by nothing here)
        # Laid out as FlashAttention lays them (torch.empty_like of the inputs), as inductor checks them to be
        return (torch.empty_like(q).copy_((probs @ vf).transpose(1, 2)), lse, torch.zeros(2, dtype=torch.uint64),
                torch.zeros((), dtype=torch.uint64), torch.empty(0, dtype=q.dtype))

    def backward(grad_out, q, k, v, out, lse, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, rng_state,
                 unused, scale=None, window_size_left=None, window_size_right=None):
        probs, qf, kf, vf = flash_reference(q, k, v, scale, is_causal, window_size_left, window_size_right)
        do = grad_out.float().transpose(1, 2)
        ds = probs * (do @ vf.transpose(-1, -2) - (do * (probs @ vf)).sum(-1, keepdim=True))
        folded = [x.unflatten(1, (k.shape[2], -1)).sum(2) for x in (ds.transpose(-1, -2) @ qf * scale,
                                                                   probs.transpose(-1, -2) @ do)]
        return tuple(torch.empty_like(x).copy_(g.transpose(1, 2)) for g, x in zip((ds @ kf * scale, *folded), (q, k, v)))

    library = torch.library.Library("aten", "IMPL")
    library.impl("_flash_attention_forward", forward, "CPU")
    library.impl("_flash_attention_backward", backward, "CPU")
    try:
        yield calls
    finally:
        library._destroy()
