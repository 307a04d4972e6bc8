"""Easy in-memory segmentation data for training tests: bright (or dark) balls in noise."""

from __future__ import annotations

import numpy as np

from training.model.modelfile import AdapterMeta, make_classes
from training.train.sampling import ArrayCase
from training.train.trainer import DomainData


def ball_case(seed: int, shape=(32, 32, 32), contrast: float = 2.0, balls: int = 1):
    """Image (1, Z, Y, X) float32 (noise + ``contrast`` inside the balls) and labels (Z, Y, X)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    lab = np.zeros(shape, np.uint8)
    for _ in range(balls):
        c = [rng.uniform(0.3 * s, 0.7 * s) for s in shape]
        r = rng.uniform(0.15, 0.25) * min(shape)
        lab[((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < r * r] = 1
    img = rng.normal(0, 1, shape).astype(np.float32) + contrast * lab
    return img[None], lab


def ball_domain(name: str, n_train: int = 4, n_val: int = 1, seed: int = 0, contrast: float = 2.0,
                patch=(16, 16, 16), shape=(32, 32, 32)) -> DomainData:
    def case(i):
        img, lab = ball_case(seed * 1000 + i, shape, contrast)
        return ArrayCase(f"{name}{i}", img, lab)

    meta = AdapterMeta(domain=name, modalities=["CT"], classes=make_classes(["background", "ball"]),
                       patch_size=list(patch), normalization=[{"scheme": "none"}])
    return DomainData(meta, [case(i) for i in range(n_train)], [case(100 + i) for i in range(n_val)])


def small_synth_dataset(path, domain: str = "hippocampus-mr", cases: int = 3, seed: int = 0):
    """A tiny MSD-layout synthetic dataset (about 18×24×20 voxels per case)."""
    from training.data.synth import write_dataset

    return write_dataset(path, domain, cases, seed, size_scale=0.5)


TINY_ARGS = ["--patch-size", "16", "16", "16", "--device", "cpu", "--quiet", "--batch-size", "2"]
TINY_TRAIN_ARGS = TINY_ARGS + ["--base-channels", "4", "--levels", "3"]
