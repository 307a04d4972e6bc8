"""What shapes a training run: :class:`TrainConfig`, the one home of its defaults.

Torch-free (augmentation's settings are imported only when a config is made), so the command
lines read their option defaults from here without slowing ``u2net --help``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from training.errors import U2NetError
from training.io.volume import IGNORE_INDEX

if TYPE_CHECKING:
    from training.train.augment import AugmentConfig

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("poly", "cosine", "constant")
# the losses the command lines offer (training.train.losses.LOSSES has more, for experiments)
CLI_LOSSES = ("dice_ce", "lovasz_focal")


def _default_augment() -> AugmentConfig:
    from training.train.augment import AugmentConfig

    return AugmentConfig()


@dataclass
class TrainConfig:
    """Everything that shapes a training run (the CLI maps its options onto this)."""

    iterations: int = 1000
    patch_size: tuple[int, int, int] | None = None  # None: each domain's own (from its plan)
    batch_size: int = 2
    lr: float = 1e-2  # AdamW and SGD alike (what the tests and CLI use)
    weight_decay: float = 3e-5
    optimizer: str = "adamw"  # one of OPTIMIZERS
    momentum: float = 0.99  # sgd (Nesterov)
    schedule: str = "poly"  # one of SCHEDULES
    loss: str = "dice_ce"  # see training.train.losses.LOSSES
    ignore_index: int = IGNORE_INDEX
    fg_fraction: float = 0.33
    grad_clip: float = 12.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # only used on CUDA
    deterministic: bool = False
    val_every: int = 0  # 0: validate at the end only
    checkpoint_every: int = 100  # 0: only at the end (and when stopped)
    augment: AugmentConfig = field(default_factory=_default_augment)
    # iterations per round-robin cycle for some domains (default 1 each): more for a hard one
    domain_weights: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise U2NetError(f"iterations must be ≥ 1, got {self.iterations}")
        if self.batch_size < 1:
            raise U2NetError(f"batch size must be ≥ 1, got {self.batch_size}")
        for name in ("lr", "weight_decay", "momentum", "fg_fraction", "grad_clip"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                what = "> 0" if name == "lr" else "≥ 0"
                raise U2NetError(f"{name.replace('_', ' ')} must be a finite number {what}, got {value}")
        if self.fg_fraction > 1:
            raise U2NetError(f"foreground fraction must be at most 1, got {self.fg_fraction}")
        if self.optimizer not in OPTIMIZERS:
            raise U2NetError(f"unknown optimizer {self.optimizer!r}; use {' or '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise U2NetError(f"unknown schedule {self.schedule!r}; use {', '.join(SCHEDULES)}")
        if self.patch_size is not None:
            self.patch_size = tuple(int(p) for p in self.patch_size)
            if len(self.patch_size) != 3 or min(self.patch_size) < 1:
                raise U2NetError(f"patch size must be three positive sizes Z Y X, got {self.patch_size}")
        for name, w in self.domain_weights.items():
            if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                raise U2NetError(f"domain weight of {name!r} must be a whole number ≥ 1, got {w!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size) if self.patch_size else None
        return d


# -- teaching a new structure from a few corrected slices: the Fine-tune panel's defaults, also
# `u2net adapt`'s. Measured on a real CT (5 labelled liver slices of 112, bench/bench_real.py): a
# patch that holds the whole image (up to 64×128×128) sees every labelled slice in each iteration
# with its anatomical context, and 24 iterations of one patch reach Dice 0.92 on the other slices;
# patches of 32×64×64 (0.42 after 60 iterations of two) or 16×100×120 (0.44 after 40) do not.
TEACH_ITERATIONS = {"cpu": 24, "gpu": 1500}
TEACH_BATCH = {"cpu": 1, "gpu": 2}
TEACH_LR = 1e-2


def teaching_augment() -> AugmentConfig:
    """Augmentation for real anatomy taught from a few slices: no mirroring (a mirrored liver lies
    where the spleen is, a mirrored right kidney is the left one) and an intensity offset that
    imitates another contrast phase."""
    from training.train.augment import AugmentConfig

    return AugmentConfig(p_mirror=0.0, p_shift=0.3)


def teaching_config(gpu: bool, *, iterations: int | None = None, lr: float = TEACH_LR, patch_size=None,
                    device: str = "auto") -> TrainConfig:
    """The defaults of a teaching run on a GPU or a CPU; ``patch_size`` None: the largest that fits
    the image (at most 64×128×128). Two validations (half-way, end) keep the better weights."""
    kind = "gpu" if gpu else "cpu"
    iterations = iterations or TEACH_ITERATIONS[kind]
    return TrainConfig(
        iterations=iterations, lr=lr, patch_size=patch_size, batch_size=TEACH_BATCH[kind], device=device,
        checkpoint_every=0, val_every=max(1, iterations // 2), augment=teaching_augment(),
    )
