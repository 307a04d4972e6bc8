"""Which existing domain a new one starts from (torch-free: the fine-tune panel shows it live)."""

from __future__ import annotations

from collections.abc import Iterable


def closest_domain_name(
    candidates: Iterable[tuple[str, str, int, int]], modality: str, in_channels: int, num_classes: int
) -> str | None:
    """The candidate most like the new domain: same modality first, then the same number of
    input channels, then the same number of classes; ties go to the first name in sorted order.

    ``candidates``: ``(name, modality, in_channels, num_classes)`` for each existing domain.
    """
    best, best_score = None, None
    for name, cand_modality, channels, classes in sorted(candidates):
        score = (cand_modality == modality, channels == in_channels, classes == num_classes)
        if best_score is None or score > best_score:
            best, best_score = name, score
    return best


def suggest_domain(
    candidates: Iterable[tuple[str, str, int]], in_channels: int, modality: str | None
) -> str | None:
    """The domain to pre-tick for an image: one that takes its number of volumes first (any other
    cannot run on it), then one of the modality its intensities suggest (None: unknown); ties go
    to the first name in sorted order.

    ``candidates``: ``(name, modality, in_channels)`` for each domain of the model.
    """
    best, best_score = None, None
    for name, cand_modality, channels in sorted(candidates):
        score = (channels == in_channels, modality is not None and cand_modality == modality)
        if best_score is None or score > best_score:
            best, best_score = name, score
    return best
