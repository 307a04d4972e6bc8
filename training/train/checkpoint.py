"""Training state for ``--resume``: one file, written atomically, loadable with weights_only=True.

The file holds the trained weights (so it is self-sufficient even if the model directory was
written a moment earlier or later), the optimizer and AMP scaler states, the iteration, and the
python / numpy / torch RNG states. Per-iteration generators for sampling and augmentation are
derived from (seed, rank, iteration), so nothing else is needed to continue exactly.
Only tensors and plain containers are stored: no pickled objects.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from training.errors import U2NetError
from training.model.modelfile import atomic_write_bytes

STATE_FILE = "state.pt"


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], torch.tensor(py[1], dtype=torch.int64), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(int(v) for v in py[1].tolist()), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], npy[1].numpy().astype(np.uint32), *npy[2:]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_state(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise U2NetError(f"{path}: no training state to resume from; run without --resume to start")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file
        raise U2NetError(f"{path}: cannot read the training state ({e}); delete it and start again") from e
