"""Golden losses: 30 float32 steps of gemma3-tiny on real stories (512-token BPE), asserted to 1e-6 against tests/golden/.

Any change to the model, the loss, the optimizer, the schedule or the batches moves these numbers; a refactor
must not. float32 matrix products round differently on different CPU kernels (AVX2, AVX-512), so the numbers are
recorded per ATen CPU capability (AVX2 and AVX512 so far): on a recorded one they must agree to 1e-6, elsewhere to
1e-5 (AVX2's and AVX-512's records differ by 5e-7 at most; a real change moves step-30 losses by 1e-2 or more). `TINYGEMMA_RECORD_GOLDEN=1` records them.
"""

import json
import os
from pathlib import Path

import pytest
import test_train
import torch

from tinygemma.config import load_recipe
from tinygemma.train import train

data_dir = test_train.data_dir  # the first 600 real stories, BPE-tokenized to 512 tokens

GOLDEN = Path(__file__).parent / "golden" / "gemma3_tiny_30_steps.json"

SETTINGS = [
    "model.preset=gemma3-tiny",  # 6 layers, window 64: the block of 128 really slides
    "batch_size=4", "block_size=128", "grad_accum_steps=2", "max_steps=30", "learning_rate=2e-3",
    "min_lr=2e-4", "warmup_steps=5", "weight_decay=0.1", "grad_clip=1.0", "eval_interval=15",
    "eval_batches=2", "checkpoint_interval=30", "dtype=float32", "compile=false", "device=cpu", "seed=1337",
    "optimizer=adamw", "lr_schedule=cosine",
]


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("golden")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same summation order on every run
    try:
        train(load_recipe(None, [f"data.dir={data_dir}", f"train.out={root / 'run'}", *SETTINGS]), quiet=True)
    finally:
        torch.set_num_threads(threads)
    records = test_train.metrics(root / "run")
    return {"train_loss": [r["train_loss"] for r in records if "train_loss" in r],
            "val_loss": [r["val_loss"] for r in records if "val_loss" in r]}


def test_losses_match_the_golden_record(golden_run):
    capability = torch.backends.cpu.get_cpu_capability()
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("TINYGEMMA_RECORD_GOLDEN") == "1":
        recorded[capability] = golden_run
        GOLDEN.write_text(json.dumps(recorded, indent=1) + "\n")
        pytest.skip(f"recorded the {capability} losses in {GOLDEN}: nothing was compared")
    assert recorded, f"no golden record at {GOLDEN}"
    assert len(golden_run["train_loss"]) == 30 and len(golden_run["val_loss"]) == 3  # steps 0, 15, 30
    assert golden_run["train_loss"][-1] < golden_run["train_loss"][0] - 1.0  # it learns, not just repeats
    reference, tolerance = (recorded[capability], 1e-6) if capability in recorded else (next(iter(recorded.values())), 1e-5)
    for key in ("train_loss", "val_loss"):
        assert golden_run[key] == pytest.approx(reference[key], abs=tolerance, rel=0), key
