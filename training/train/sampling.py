"""Patch sampling with foreground oversampling (nnU-Net's rule).

A third of the patches of a batch (``fg_fraction``) are centred on a random labelled
foreground voxel, so that small structures are seen often; the rest are anywhere in a random
case, except in a case labelled only in part (some slices, the rest ``ignore_index``): there they
are centred on a random labelled voxel, background included, since a patch without one teaches
nothing. Cases smaller than the patch are padded as inference pads them (the edge values,
:func:`training.infer.sliding_window.sliding_window`), the label with ``pad_label`` (default the
ignore value, so padding counts in no loss): a 20-slice slab is then seen in training as it will
be seen when segmented.
All randomness comes from the ``torch.Generator`` passed to :meth:`PatchSampler.sample`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.io.volume import IGNORE_INDEX

MAX_FG_POINTS = 20000  # per class per case: enough to sample from, small in memory


@dataclass
class ArrayCase:
    """One preprocessed training case: image (C, Z, Y, X) float32 normalised, label (Z, Y, X)."""

    id: str
    image: np.ndarray
    label: np.ndarray


def _foreground_points(label: np.ndarray, ignore_index: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Coordinates (n, 3) of each foreground class present (subsampled), for oversampling."""
    points = []
    for c in np.unique(label):
        if c == 0 or c == ignore_index:
            continue
        points.append(_subsample(np.argwhere(label == c), rng))
    return points


def _subsample(idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """At most :data:`MAX_FG_POINTS` of the coordinates ``idx`` (n, 3), as int64."""
    if len(idx) > MAX_FG_POINTS:
        idx = idx[rng.choice(len(idx), MAX_FG_POINTS, replace=False)]
    return idx.astype(np.int64)


def _labelled_points(label: np.ndarray, ignore_index: int, rng: np.random.Generator) -> np.ndarray | None:
    """Coordinates (n, 3) of labelled voxels (subsampled) of a partly labelled case, else None."""
    ignored = label == ignore_index
    if not ignored.any() or ignored.all():
        return None
    return _subsample(np.argwhere(~ignored), rng)


class PatchSampler:
    def __init__(
        self,
        cases: list,
        patch_size: tuple[int, int, int],
        fg_fraction: float = 0.33,
        ignore_index: int = IGNORE_INDEX,
        pad_label: int | None = None,
    ):
        if not cases:
            raise ValueError("no training cases to sample from")
        self.cases = cases
        self.patch_size = tuple(int(p) for p in patch_size)
        self.fg_fraction = fg_fraction
        self.ignore_index = ignore_index
        self.pad_label = ignore_index if pad_label is None else pad_label
        rng = np.random.default_rng(0)  # fixed: the subsample is part of the data, not the run
        self.fg = [_foreground_points(np.asarray(c.label), ignore_index, rng) for c in cases]
        self.labelled = [_labelled_points(np.asarray(c.label), ignore_index, rng) for c in cases]

    def _start(self, dim: int, p: int, g: torch.Generator, centre: int | None) -> int:
        lo, hi = (0, dim - p) if dim >= p else (dim - p, 0)
        if centre is None:
            return lo + int(torch.randint(hi - lo + 1, (1,), generator=g))
        return min(max(centre - p // 2, lo), hi)

    def crop(self, case, starts: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The patch at ``starts`` (may lie partly outside the case: padded)."""
        image, label = np.asarray(case.image), np.asarray(case.label)
        p = self.patch_size
        out_lab = np.full(p, self.pad_label, dtype=np.uint8)
        src, dst, pads = [], [], []
        for s, size, dim in zip(starts, p, label.shape):
            a, b = max(s, 0), min(s + size, dim)
            src.append(slice(a, b))
            dst.append(slice(a - s, b - s))
            pads.append((a - s, s + size - b))
        out_img = np.asarray(image[(slice(None), *src)], dtype=np.float32)
        if any(a or b for a, b in pads):
            out_img = np.pad(out_img, [(0, 0), *pads], mode="edge")
        out_lab[tuple(dst)] = label[tuple(src)]
        return np.ascontiguousarray(out_img), out_lab

    def sample(self, batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: image (N, C, *patch) float32 and label (N, *patch) int64 tensors (CPU)."""
        n_random = round(batch_size * (1 - self.fg_fraction))
        images, labels = [], []
        for i in range(batch_size):
            k = int(torch.randint(len(self.cases), (1,), generator=g))
            case = self.cases[k]
            if batch_size > 1:
                want_fg = i >= n_random
            else:
                want_fg = float(torch.rand(1, generator=g)) < self.fg_fraction
            centre = [None, None, None]
            if want_fg and self.fg[k]:
                pts = self.fg[k][int(torch.randint(len(self.fg[k]), (1,), generator=g))]
                centre = pts[int(torch.randint(len(pts), (1,), generator=g))].tolist()
            elif self.labelled[k] is not None:
                pts = self.labelled[k]
                centre = pts[int(torch.randint(len(pts), (1,), generator=g))].tolist()
            shape = np.asarray(case.label).shape
            starts = tuple(self._start(d, p, g, c) for d, p, c in zip(shape, self.patch_size, centre))
            img, lab = self.crop(case, starts)
            images.append(img)
            labels.append(lab)
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels).astype(np.int64))
