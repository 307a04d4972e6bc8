"""Sample data: a synthetic CT-like case and the MNI152 T1, each with its ground truth layer.

Both come with their true geometry (the image layer's affine is the volume's index → RAS mm
matrix) and a Labels layer on the same grid, so a segmentation can be compared with the truth.
"""

from __future__ import annotations

import numpy as np

from training.errors import InputError

from ._geometry import META_KEY, to_napari_affine
from ._reader import WORLD_AXES, volume_layer_data

SYNTHETIC_SEED = 20240  # fixed: the sample is the same volume every time
SAMPLE_DOMAIN = "spleen-ct"  # a CT domain of the bundled model (scripts/default_model.py)


# Ground truth (reference) labels are drawn in these colours, never in a domain's class colours,
# so the truth and a segmentation result laid over it tell apart at a glance (issue #16).
REFERENCE_COLORS = ("#ffe119", "#00ffff", "#ff00ff", "#ffffff", "#bfef45", "#fabed4", "#f58231")


def reference_colors(class_colors) -> list[str]:
    """Colours for a reference (ground truth) labels layer with ``class_colors``' classes: the
    background transparent, each class a reference colour the domain does not use."""
    used = {str(c).lower() for c in class_colors}
    free = [c for c in REFERENCE_COLORS if c not in used]
    return [class_colors[0]] + [free[(i - 1) % len(free)] for i in range(1, len(class_colors))]


def _labels_layer(labels: np.ndarray, volume, name: str, class_names=None, colors=None) -> tuple:
    attrs = {
        "name": name,
        "affine": to_napari_affine(volume.affine),
        "units": "mm",
        "axis_labels": WORLD_AXES,
        "opacity": 0.4,
        "visible": True,
        "metadata": {
            META_KEY: {
                "affine": np.asarray(volume.affine).copy(),
                "header": volume.header,
                "source": volume.source,
                "shape": tuple(int(s) for s in labels.shape),
                "classes": list(class_names) if class_names else None,
            }
        },
    }
    if class_names:
        import pandas as pd

        attrs["features"] = pd.DataFrame({"index": np.arange(len(class_names)), "class": list(class_names)})
    if colors:
        from napari.utils.colormaps import DirectLabelColormap

        cmap = {None: "transparent", 0: "transparent"}
        cmap.update({i: c for i, c in enumerate(colors) if i})
        attrs["colormap"] = DirectLabelColormap(color_dict=cmap)
    return (np.asarray(labels), attrs, "labels")


def _named_for(domain: str, layers: list[tuple]) -> list[tuple]:
    """Record in each layer the domain that segments it, so the domain selector pre-ticks that
    one: by its values alone the MNI152 T1 is a 1-volume MR image like heart-mr's and
    hippocampus-mr's, and the first of those would be ticked."""
    for _data, attrs, _kind in layers:
        attrs["metadata"][META_KEY]["domain"] = domain
    return layers


def synthetic_domain() -> str:
    """The synthetic domain the sample shows: one the bundled default model segments."""
    return SAMPLE_DOMAIN


def _domain_classes(domain: str) -> tuple[list[str], list[str]]:
    """(class names incl. background, colours) of a synthetic domain."""
    from training.data.synth import domain_info

    info = domain_info(domain)
    return list(info.classes), list(info.colors)


def synthetic_ct() -> list[tuple]:
    """A synthetic CT-like volume (fixed seed) and its ground truth labels."""
    from training.data.synth import generate_case

    domain = synthetic_domain()
    volume, labels = generate_case(domain, SYNTHETIC_SEED)
    names, colors = _domain_classes(domain)
    image = volume_layer_data(volume, "synthetic CT", colormap="gray")
    truth = _labels_layer(labels, volume, f"synthetic CT {domain} truth", names, reference_colors(colors))
    truth[1]["metadata"][META_KEY]["reference"] = True
    return _named_for(domain, [image, truth])


def mni152_t1() -> list[tuple]:
    """The MNI152 T1 template (2 mm) and its grey/white matter labels (needs nilearn)."""
    from training.data.mni152 import CLASS_COLORS, CLASS_NAMES, DOMAIN, load_mni152, mni152_available

    if not mni152_available():
        raise InputError("the MNI152 sample needs nilearn: pip install nilearn (or napari-u2net[nilearn])")
    volume, labels = load_mni152(resolution_mm=2.0)
    image = volume_layer_data(volume, "MNI152 T1", colormap="gray")
    truth = _labels_layer(labels, volume, "MNI152 tissue ground truth", CLASS_NAMES, reference_colors(CLASS_COLORS))
    truth[1]["metadata"][META_KEY]["reference"] = True
    return _named_for(DOMAIN, [image, truth])
