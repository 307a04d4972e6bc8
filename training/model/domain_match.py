"""Which existing domain a new one starts from, which one to tick for an image, and which modality an
image's values suggest (torch-free: the GUI panels use them live)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from training.data.normalization import CT_AIR_HU


def closest_domain_name(
    candidates: Iterable[tuple[str, str, int, int]], modality: str, in_channels: int, num_classes: int
) -> str | None:
    """The candidate most like the new domain: same modality first, then the same number of
    input channels, then the same number of classes; ties go to the first name in sorted order.

    ``candidates``: ``(name, modality, in_channels, num_classes)`` for each existing domain.
    """
    return _best(candidates, lambda c: (c[1] == modality, c[2] == in_channels, c[3] == num_classes))


def _best(candidates: Iterable[tuple], score) -> str | None:
    """Name of the highest-scoring candidate; ``max`` keeps the first of equals, so ties go to the
    first name in sorted order."""
    ranked = sorted(candidates)
    return max(ranked, key=score)[0] if ranked else None



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


# What a sample of an image's values says (see :func:`read_values`): a modality, or neither.
BLANK = "blank"  # one value everywhere (e.g. all zeros): nothing to segment, no modality
UNKNOWN = "unknown"  # negative values but no air: neither CT-like nor MR-like


def read_values(data, stride: int = 4) -> str:
    """"CT", "MR", :data:`BLANK` (a constant or empty image) or :data:`UNKNOWN` (negative values
    without air), from every ``stride``-th row and column (call it from a worker: a lazy array is
    read here)."""
    import numpy as np

    sample = np.asarray(data[..., ::stride, ::stride])
    finite = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
    if finite.size == 0 or float(finite.min()) == float(finite.max()):
        return BLANK
    return guess_modality(finite.reshape(1, 1, -1), stride=1) or UNKNOWN


def trained_on_phantoms(meta) -> bool:
    """Whether a domain learnt from synthetic phantoms only (its model card says so)."""
    card = getattr(meta, "card", None) or {}
    return isinstance(card, dict) and card.get("data_kind") == "synthetic"


@dataclass(frozen=True)
class DomainPick:
    """The domain to tick for an image (None: tick nothing) and why, in plain words for the
    status line (``reason`` is empty while the image's values are still being read)."""

    domain: str | None
    reason: str


def pick_domain(
    candidates: Iterable[tuple[str, str, int]],
    in_channels: int,
    values: str | None,
    named: str | None = None,
) -> DomainPick:
    """The domain to pre-tick for an image, or none, with the reason (a wrong domain ticked is
    worse than none: the user runs it and gets nonsense).

    * the domain the image names in its metadata (``named``, our samples do) wins;
    * else a domain only if it is the ONLY one taking ``in_channels`` volumes of the modality the
      values suggest (``values``: "CT", "MR", :data:`BLANK`, :data:`UNKNOWN`, None: not read yet);
    * a blank image, an unknown modality, no fit or a tie: none, and the reason says which.

    * among several that fit, the only one trained on real scans, when the others learnt from
      synthetic phantoms only (they do not carry over to real anatomy).

    ``candidates``: ``(name, modality, in_channels)`` or ``(name, modality, in_channels,
    synthetic)`` for each domain of the model (``synthetic``: trained on phantoms only; see
    :func:`trained_on_phantoms`).
    """
    candidates = sorted(tuple(c) + (False,) * (4 - len(c)) for c in candidates)
    names = [c[0] for c in candidates]
    if named is not None and named in names:
        return DomainPick(named, f"Ticked {named}: the domain this image names.")
    if not in_channels:
        return DomainPick(None, "No domain ticked: open or choose a 3D image first.")
    if values is None:
        return DomainPick(None, "")  # its values are being read
    if values == BLANK:
        return DomainPick(None, "No domain ticked: the image is blank (one value everywhere).")
    if values not in ("CT", "MR"):
        return DomainPick(
            None,
            "No domain ticked: could not tell whether this is CT or MR (it has negative values but "
            "no air); tick the domain for this scan.",
        )
    vols = "1 volume" if in_channels == 1 else f"{in_channels} volumes"
    fits = [c[0] for c in candidates if c[2] == in_channels and c[1] == values]
    if len(fits) == 1:
        return DomainPick(fits[0], f"Ticked {fits[0]}: the only {values} domain for {vols}.")
    real = [c[0] for c in candidates if c[0] in fits and not c[3]]
    if len(fits) > 1 and len(real) == 1:
        others = ", ".join(f for f in fits if f != real[0])
        return DomainPick(real[0], f"Ticked {real[0]}: the only {values} domain trained on real scans "
                                   f"({others} learnt from synthetic phantoms).")
    if fits:
        return DomainPick(
            None,
            f"No domain ticked: several {values} domains could fit this image ({', '.join(fits)}); "
            "tick the one for this scan.",
        )
    return DomainPick(None, f"No domain ticked: no {values} domain of this model takes {vols}.")
