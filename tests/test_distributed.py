"""Multi-process training under torchrun (gloo on CPU): 2 ranks, two domains, round-robin."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from tests.training_data import TINY_TRAIN_ARGS, small_synth_dataset
from training.model.modelfile import load_model, weights_hash

ROOT = Path(__file__).resolve().parent.parent


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    hip = small_synth_dataset(tmp_path / "hip", "hippocampus-mr", cases=2)
    from training.data.synth import write_dataset

    pro = write_dataset(tmp_path / "pro", "prostate-mr", 2, 1, size_scale=0.4)
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.commands.cli", "train", str(hip), str(pro), "-o", str(out), "--iterations", "4",
           "--checkpoint-every", "2", *TINY_TRAIN_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
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


class _RecordingStream:
    """A stdout that records each write, as an unbuffered pipe sees them (one write each)."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_rank_lines_reach_the_shared_pipe_in_one_write_each(monkeypatch):
    """Under torchrun the ranks share one stdout pipe; a line written in two parts (print writes
    its newline apart when Python runs unbuffered, as CI does) let another rank's line land inside
    the JSON summary. Each line must be one write, newline included."""
    from training.commands._trainargs import print_rank_hash, summary_line
    from training.train.distributed import DistInfo
    from training.train.trainer import TrainReport

    report = TrainReport(iteration=4, domain="d", loss=0.5, lr=0.1, seconds=1.0, eta_s=0.0,
                         val_dice={"d": {"c": 0.5}}, val_mean=0.5, iterations=4, weights_hash="ab" * 32)
    stream = _RecordingStream()
    monkeypatch.setattr(sys, "stdout", stream)
    rank0 = DistInfo(rank=0, world_size=2)
    print_rank_hash(report, rank0)
    summary_line(report, rank0)
    hash_line, summary = stream.writes  # exactly two writes: one per line
    assert hash_line == f"rank 0 weights {'ab' * 32}\n"
    assert summary.endswith("}\n") and json.loads(summary)["iterations"] == 4
