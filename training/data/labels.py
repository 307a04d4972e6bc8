"""Label maps against their class names: what training labels must satisfy before any work."""

from __future__ import annotations

import numpy as np

from training.errors import InputError
from training.io.volume import IGNORE_INDEX


def check_class_names(names: list[str], labels: list[np.ndarray], ignore_index: int = IGNORE_INDEX) -> None:
    """The class names must name every label value of every map (background first), once each;
    ``ignore_index`` marks unlabelled voxels and needs no name."""
    if len(names) < 2:
        raise InputError("give the class names, background first, comma-separated (e.g. background, liver)")
    top = max(int(np.max(lab[lab != ignore_index], initial=0)) for lab in labels)
    if top >= len(names):
        raise InputError(
            f"the labels go up to {top} but only {len(names)} class names are given "
            f"({', '.join(names)}); add a name for each label value"
        )
    if len(set(names)) != len(names):
        raise InputError("two classes have the same name; give each class its own name")
