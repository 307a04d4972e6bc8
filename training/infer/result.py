"""What a segmentation returns: per domain, the labels and any further per-voxel outputs.

Everything in a :class:`Prediction` lies on the input volume's grid (its shape, its affine), so
a caller writes or shows each array with the input's geometry and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class DomainResult:
    """One domain's outputs on the input's grid."""

    domain: str
    labels: np.ndarray  # (Z, Y, X) uint8 (uint16 beyond 256 classes), exactly the input's shape
    # Further per-voxel outputs by name, each (…, Z, Y, X) float16 on the same grid: "uncertainty"
    # and "probabilities" when InferenceConfig asks for them; none by default.
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None  # where the labels were written (predict_files), if they were
    # What the user should know about this result, in their words, one sentence each (an empty
    # result, one that cannot be what the domain describes…): the CLI prints them as warnings, the
    # plugin shows them in its notification.
    notes: list[str] = field(default_factory=list)
    # the domain's calibration (its adapter metadata's entry: temperature, volume interval scales)
    # when probabilities or uncertainty were computed with it; what training/infer/measure.py reads
    calibration: dict | None = None

    @property
    def empty(self) -> bool:
        """No foreground voxel at all: worth telling the user (wrong domain, wrong region?)."""
        return not self.labels.any()


@dataclass
class Prediction:
    """What :func:`training.infer.pipeline.predict` returns: one result per domain, in the order asked."""

    results: dict[str, DomainResult] = field(default_factory=dict)

    def __getitem__(self, domain: str) -> DomainResult:
        return self.results[domain]

    def __iter__(self) -> Iterator[DomainResult]:
        return iter(self.results.values())

    def __len__(self) -> int:
        return len(self.results)

    @property
    def domains(self) -> list[str]:
        return list(self.results)

    @property
    def labels(self) -> dict[str, np.ndarray]:
        """``{domain: labels}``."""
        return {d: r.labels for d, r in self.results.items()}
