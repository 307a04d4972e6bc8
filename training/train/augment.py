"""Data augmentation on a patch batch, in torch, on CPU or GPU.

Spatial transforms (rotation, scaling, elastic deformation) are folded into ONE sampling grid
per sample and applied with ``grid_sample``: trilinear for the image and nearest for the label,
so image and label stay aligned. Voxels that come from outside the patch get image 0 (the
normalised mean) and label ``ignore_index`` (they count in no loss). Mirroring flips axes.
Intensity transforms (brightness, contrast, gamma, Gaussian noise) touch the image only.

Every random number comes from the ``torch.Generator`` passed in (always a CPU generator;
draws are moved to the data's device), so a run is reproducible and resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.io.volume import IGNORE_INDEX


@dataclass
class AugmentConfig:
    """Probabilities are per sample; ranges are (low, high) of a uniform draw."""

    p_rotate: float = 0.2
    rotate_deg: tuple[float, float, float] = (15.0, 15.0, 15.0)  # max |angle| about z, y, x
    p_scale: float = 0.2
    scale: tuple[float, float] = (0.85, 1.25)
    p_elastic: float = 0.1
    elastic_magnitude: float = 0.04  # displacement std, fraction of the patch half-extent
    elastic_grid: int = 4  # control points per axis of the smooth displacement field
    p_mirror: float = 0.5  # per axis
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.1)
    # an additive offset in normalised units: CT's contrast phases move soft tissue by tens of HU,
    # which a multiplicative brightness change around zero does not imitate (off by default)
    p_shift: float = 0.0
    shift: tuple[float, float] = (-0.3, 0.3)
    ignore_index: int = IGNORE_INDEX

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation at all (for tests and debugging)."""
        return cls(p_rotate=0, p_scale=0, p_elastic=0, p_mirror=0, p_brightness=0,
                   p_contrast=0, p_gamma=0, p_noise=0, p_shift=0)


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """3×3 rotation (x, y, z coordinate order, as affine_grid wants) from angles about z, y, x."""
    az, ay, ax = (float(a) for a in angles)
    rz = torch.tensor([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    ry = torch.tensor([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rx = torch.tensor([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    return (rz @ ry @ rx).double()


def spatial_grid(
    shape: tuple[int, int, int], n: int, cfg: AugmentConfig, g: torch.Generator
) -> torch.Tensor | None:
    """Sampling grids (n, Z, Y, X, 3) for rotation/scaling/elastic, or None if no sample needs one."""
    do_rot = torch.rand(n, generator=g) < cfg.p_rotate
    do_scale = torch.rand(n, generator=g) < cfg.p_scale
    do_el = torch.rand(n, generator=g) < cfg.p_elastic
    if not (do_rot.any() or do_scale.any() or do_el.any()):
        return None
    # Work in voxel units so that a rotation of a non-cubic patch is a true rotation.
    half = torch.tensor([shape[2], shape[1], shape[0]], dtype=torch.float64) / 2  # x, y, z
    thetas = []
    for i in range(n):
        m = torch.eye(3, dtype=torch.float64)
        if do_rot[i]:
            limits = torch.tensor(cfg.rotate_deg, dtype=torch.float64) * math.pi / 180
            m = _rotation((torch.rand(3, generator=g, dtype=torch.float64) * 2 - 1) * limits) @ m
        if do_scale[i]:
            m = m / float(_uniform(g, 1, *cfg.scale))  # sampling coords shrink = content grows
        m = torch.diag(1 / half) @ m @ torch.diag(half)
        thetas.append(torch.cat([m, torch.zeros(3, 1, dtype=torch.float64)], dim=1))
    theta = torch.stack(thetas).float()
    grid = F.affine_grid(theta, [n, 1, *shape], align_corners=False)
    if do_el.any():
        k = cfg.elastic_grid
        coarse = torch.randn(n, 3, k, k, k, generator=g) * cfg.elastic_magnitude
        coarse = coarse * do_el.view(n, 1, 1, 1, 1).float()
        field = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
        grid = grid + field.movedim(1, -1)
    return grid


def augment_batch(
    image: torch.Tensor, label: torch.Tensor, cfg: AugmentConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment image (N, C, Z, Y, X) float and label (N, Z, Y, X) int; returns new tensors."""
    n, shape, dev = image.shape[0], tuple(image.shape[2:]), image.device
    image = image.float()
    label = label.long()
    grid = spatial_grid(shape, n, cfg, g)
    if grid is not None:
        grid = grid.to(dev)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # Shift labels by one so that "outside" (0 after zero padding) is told apart from background.
        shifted = (label + 1).unsqueeze(1).float()
        lab = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        lab = lab.squeeze(1).round().long() - 1
        label = torch.where(lab < 0, torch.full_like(lab, cfg.ignore_index), lab)
    for axis in cfg.mirror_axes:
        flip = (torch.rand(n, generator=g) < cfg.p_mirror).to(dev)
        if flip.any():
            image = torch.where(flip.view(n, 1, 1, 1, 1), image.flip(2 + axis), image)
            label = torch.where(flip.view(n, 1, 1, 1), label.flip(1 + axis), label)
    return _intensity(image, cfg, g), label


def _intensity(image: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    n, c = image.shape[:2]
    dev = image.device

    def draw(p: float, lo: float, hi: float, neutral: float) -> torch.Tensor:
        on = torch.rand(n, c, generator=g) < p
        val = lo + (hi - lo) * torch.rand(n, c, generator=g)
        return torch.where(on, val, torch.full_like(val, neutral)).view(n, c, 1, 1, 1).to(dev)

    bright = draw(cfg.p_brightness, *cfg.brightness, 1.0)
    contrast = draw(cfg.p_contrast, *cfg.contrast, 1.0)
    gamma = draw(cfg.p_gamma, *cfg.gamma, 1.0)
    noise = draw(cfg.p_noise, *cfg.noise_std, 0.0)
    image = image * bright
    if cfg.p_shift > 0:  # drawn only when on: older runs keep their random stream
        image = image + draw(cfg.p_shift, *cfg.shift, 0.0)
    if (contrast != 1).any():
        mean = image.mean(dim=(2, 3, 4), keepdim=True)
        lo = image.amin(dim=(2, 3, 4), keepdim=True)
        hi = image.amax(dim=(2, 3, 4), keepdim=True)
        image = torch.maximum(torch.minimum((image - mean) * contrast + mean, hi), lo)
    if (gamma != 1).any():
        # Gamma on the [0, 1]-rescaled intensities, then back to the original range.
        lo = image.amin(dim=(2, 3, 4), keepdim=True)
        rng = (image.amax(dim=(2, 3, 4), keepdim=True) - lo).clamp_min(1e-6)
        image = ((image - lo) / rng).clamp(0, 1) ** gamma * rng + lo
    if (noise != 0).any():
        eps = torch.randn(image.shape, generator=g).to(dev)
        image = image + eps * noise
    return image
