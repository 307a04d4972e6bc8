"""Label clean-up after the argmax: keep each class's usual number of connected components."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from training.io.volume import IGNORE_INDEX
from training.model.modelfile import default_counts

_STRUCTURE = np.ones((3, 3, 3), dtype=bool)
# Components smaller than this share of the class's largest one (in that case) are specks of the
# labelling, not another organ; more than MAX_KEPT components means "many lesions": keep all.
MIN_SHARE = 0.1
MAX_KEPT = 4


def _components(mask: np.ndarray):
    """26-connected components of ``mask`` inside its bounding box (the cost follows the object's
    size, not the volume's): ``(box, component labels, sizes)`` with ``sizes[0]`` = 0, or None."""
    boxes = ndimage.find_objects(mask.astype(np.uint8))
    if not boxes or boxes[0] is None:
        return None
    box = boxes[0]
    comp, _ = ndimage.label(mask[box], structure=_STRUCTURE)
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    return box, comp, sizes



def component_counts(
    labels: Iterable[np.ndarray], num_classes: int, ignore_index: int | None = IGNORE_INDEX
) -> list[int]:
    """How many connected components of each class post-processing should keep, from training labels.

    Per class: the most components that any case has (ignoring specks under ``MIN_SHARE`` of
    the largest), e.g. 2 for "kidney" when both kidneys carry one label; 0 (keep all) for a class
    with more than ``MAX_KEPT`` components or never seen. Entry 0 (background) is always 0. Cases
    with unlabelled voxels (``ignore_index``, e.g. a few annotated slices) say nothing about 3D
    connectivity and are skipped; with no dense case at all the result is :func:`default_counts`.
    """
    most = [0] * num_classes
    dense = 0
    for lab in labels:
        lab = np.asarray(lab)
        if ignore_index is not None and np.any(lab == ignore_index):
            continue
        dense += 1
        for c in range(1, num_classes):
            found = _components(lab == c)
            if found is None:
                continue
            sizes = found[2][1:]
            most[c] = max(most[c], int((sizes >= MIN_SHARE * sizes.max()).sum()))
    if not dense:
        return default_counts(num_classes)
    return [0] + [n if 0 < n <= MAX_KEPT else 0 for n in most[1:]]


def keep_largest_components(labels: np.ndarray, counts: list[int]) -> np.ndarray:
    """Per foreground class ``c`` keep its ``counts[c]`` largest 26-connected components (in place;
    0: keep all).

    Stray false-positive islands far from the organ are the most common error of patch-based
    networks; the removed voxels become background.
    """
    for c in range(1, len(counts)):
        keep = int(counts[c])
        if keep <= 0:
            continue
        found = _components(labels == c)
        if found is None:
            continue
        box, comp, sizes = found
        if len(sizes) - 1 <= keep:
            continue
        kept = np.argsort(sizes)[::-1][:keep]
        drop = (comp > 0) & ~np.isin(comp, kept)
        labels[box][drop] = 0
    return labels
