"""Which existing domain a new one starts from, which one to tick for an image, and which modality an
image's values suggest (torch-free: the GUI panels use them live)."""

from __future__ import annotations

from collections.abc import Iterable


def closest_domain_name(
    candidates: Iterable[tuple[str, str, int, int]], modality: str, in_channels: int, num_classes: int
) -> str | None:
    """The candidate most like the new domain: same modality first, then the same number of
    input channels, then the same number of classes; ties go to the first name in sorted order.

    ``candidates``: ``(name, modality, in_channels, num_classes)`` for each existing domain.
    """
    return _best(candidates, lambda c: (c[1] == modality, c[2] == in_channels, c[3] == num_classes))


def suggest_domain(
    candidates: Iterable[tuple[str, str, int]], in_channels: int, modality: str | None
) -> str | None:
    """The domain to pre-tick for an image: one that takes its number of volumes first (any other
    cannot run on it), then one of the modality its intensities suggest (None: unknown); ties go
    to the first name in sorted order.

    ``candidates``: ``(name, modality, in_channels)`` for each domain of the model.
    """
    return _best(candidates, lambda c: (c[2] == in_channels, modality is not None and c[1] == modality))


def _best(candidates: Iterable[tuple], score) -> str | None:
    """Name of the highest-scoring candidate; ``max`` keeps the first of equals, so ties go to the
    first name in sorted order."""
    ranked = sorted(candidates)
    return max(ranked, key=score)[0] if ranked else None


# CT scans hold air at about −1000 HU; MR intensities are never negative. Halfway is safe for both.
CT_AIR_HU = -500.0


def guess_modality(data, stride: int = 4) -> str | None:
    """"CT" when an image holds air in Hounsfield units (≤ −500), "MR" when it has no negative
    values, None otherwise. Reads every ``stride``-th row and column (a few ms on a large scan;
    a lazy array is read here, so call it from a worker, never on the GUI thread)."""
    import numpy as np

    sample = np.asarray(data[..., ::stride, ::stride])
    if sample.size == 0:
        return None
    low = float(np.nanmin(sample))
    return "CT" if low <= CT_AIR_HU else "MR" if low >= 0 else None
