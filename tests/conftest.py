"""Shared test fixtures: real TinyStories text and the offline GPT-2 vocabulary from ../shared."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYGEMMA_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "data" / "tinystories"

# tiktoken's own mechanism for an offline vocabulary: the GPT-2 ranks under their cache name.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Experiment trackers stay on this machine: wandb offline (its files under each run directory), trackio's store
# in a temporary directory rather than the user's cache (read when trackio is first imported).
os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", TRACKIO_DIR=tempfile.mkdtemp(prefix="tinygemma-trackio-"))
for remote in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
    os.environ.pop(remote, None)
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """../shared/data/tinystories: train.txt, v2_train.txt, valid.txt (see its README)."""
    assert (STORIES / "train.txt").exists(), f"real TinyStories samples expected at {STORIES}"
    return STORIES
