"""The house rules of src/tinygemma, checked on its source: dependencies only point down, and functions stay short.

A module may import only modules below it in LAYERS (lazy imports inside functions included), which also rules out
import cycles. A new module must be given its place here.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tinygemma"

LAYERS = [
    # shared pieces, importing only each other (errors, then files and devices, then runtime)
    "errors", "files", "devices", "runtime",
    "config",
    "tokenizer",
    "loss", "model",  # the chunked cross-entropy, then Gemma 3's architecture
    "data",
    "evaluation", "decode", "generate",
    "hf", "checkpoint",  # the Hugging Face adapter, then our checkpoints (which load through it)
    "gguf_export",  # a checkpoint as one GGUF file for llama.cpp
    "metrics", "report", "trackers",  # the run's records: metrics.jsonl; report.md and the model card; trackers
    "profiling", "optim", "parallelize", "train",
    "pipeline",
    "cli", "__main__",
]
MAX_FUNCTION_LINES = 80
MAX_TRAIN_LINES = 60


def package_imports(path: Path) -> set[str]:
    """The package's modules that `path` imports: absolute (tinygemma.x) or relative (.x, from . import x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = "tinygemma" + (f".{node.module}" if node.module else "") if node.level else node.module or ""
            if module == "tinygemma":
                names.update(alias.name for alias in node.names)
            elif module.startswith("tinygemma."):
                names.add(module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("tinygemma."))
    return names


def upward_imports(path: Path) -> list[str]:
    """The modules `path` imports that sit at or above it in LAYERS (or have no place there)."""
    rank = LAYERS.index(path.stem)
    return sorted(name for name in package_imports(path) if name not in LAYERS or LAYERS.index(name) >= rank)


MODULES = sorted(p for p in SRC.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_dependencies_only_point_down(path):
    assert path.stem in LAYERS, f"{path.name} has no place in LAYERS (tests/test_structure.py): give it one"
    upward = upward_imports(path)
    assert not upward, f"{path.name} imports {upward}, which sit at or above it"


@pytest.mark.parametrize("statement", ["from tinygemma.train import train", "import tinygemma.train",
                                       "from tinygemma import train", "from .train import train",
                                       "from . import train", "from .train.sub import x"])
def test_the_rule_catches_an_upward_import(tmp_path, statement):
    """The check itself: a model that imports train, absolutely or relatively, is caught (so the test above can
    fail); one that imports errors (below it) is not."""
    bad = tmp_path / "model.py"
    bad.write_text(f"def f():\n    {statement}\n    from .errors import UserError\n    from tinygemma import errors\n")
    assert upward_imports(bad) == ["train"]


def test_functions_are_short_and_train_reads_in_one_screen():
    long = []
    for path in sorted(SRC.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
                if path.stem == "train" and node.name == "train":
                    assert lines <= MAX_TRAIN_LINES, f"train() has {lines} lines"
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


MAX_TRACKED_BYTES = 1 << 20
PACKAGE_SUFFIXES = (".whl", ".tar.gz", ".zip", ".egg")


def test_the_repository_tracks_no_downloads_or_large_files():
    """Every clone carries what git tracks: a downloaded wheel or sdist (once 93 MB of them) has no place in it."""
    import shutil
    import subprocess

    root = SRC.parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    paths = [root / name for name in tracked.decode().split("\0") if name]
    packages = [p.name for p in paths if p.name.endswith(PACKAGE_SUFFIXES)]
    large = [f"{p.relative_to(root)} ({p.stat().st_size:,} bytes)" for p in paths
             if p.is_file() and p.stat().st_size > MAX_TRACKED_BYTES]
    assert not packages, f"downloaded packages tracked by git: {packages} (git rm --cached them)"
    assert not large, f"files over {MAX_TRACKED_BYTES:,} bytes tracked by git: {large}"


def test_the_tests_start_without_pytest_xdist():
    """The README's command runs the tests under pytest-xdist, but the GPU image's pytest has no xdist
    (benchmarks/gpu_suite.py runs the CUDA tests there): conftest's xdist hook must not stop pytest starting."""
    import os
    import subprocess
    import sys

    root = SRC.parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}  # an -n there needs xdist
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "--collect-only",
                           "-q", "tests/test_structure.py"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "test_the_tests_start_without_pytest_xdist" in proc.stdout
