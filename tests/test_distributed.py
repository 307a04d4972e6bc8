"""Multi-process training under torchrun (gloo on CPU): 2 ranks, two domains, round-robin."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from training.modelfile import load_model, weights_hash
from tests.training_data import TINY_TRAIN_ARGS, small_synth_dataset

ROOT = Path(__file__).resolve().parent.parent


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    hip = small_synth_dataset(tmp_path / "hip", "hippocampus-mr", cases=2)
    from training.synth import write_dataset

    pro = write_dataset(tmp_path / "pro", "prostate-mr", 2, 1, size_scale=0.4)
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.cli", "train", str(hip), str(pro), "-o", str(out), "--iterations", "4",
           "--checkpoint-every", "2", *TINY_TRAIN_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    hashes = dict(re.findall(r"rank (\d) weights ([0-9a-f]{64})", proc.stdout))
    assert set(hashes) == {"0", "1"}
    assert hashes["0"] == hashes["1"]  # gradients were averaged: both ranks hold the same weights
    model = load_model(out)
    assert sorted(model.domains) == ["hippocampus-mr", "prostate-mr"]
    assert weights_hash(model.net.state_dict()) == hashes["0"]  # rank 0 wrote the final weights
    summary = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
    assert summary["iterations"] == 4
    state = torch.load(out / "training" / "state.pt", weights_only=True)
    assert state["iteration"] == 4
    assert len((out / "training" / "log.csv").read_text().splitlines()) == 5  # header + 4 rows, rank 0 only
