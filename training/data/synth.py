"""Synthetic CT and MR phantoms with ground truth, written as MSD-layout datasets.

No real MSD data can be downloaded here, so these phantoms exercise the whole system (training,
adaptation, inference, the plugin). They are built to make a wrong pipeline fail:

* **Anatomy, not boxes.** Every case is rendered from implicit surfaces (ellipsoids, tubes along
  curved centre lines, unions of blobs) perturbed by smooth random noise, evaluated in a
  canonical anatomical frame (RAS millimetres). A random pose (rotation, translation), a smooth
  elastic displacement and per-case size variation move that frame relative to the scanner grid.
* **Realistic contrast.** CT is in Hounsfield units (air −1000, fat ≈ −100, muscle ≈ +40,
  liver ≈ +60, spleen ≈ liver − 10, kidney cortex ≈ +170, bone) with unlabelled neighbours of
  similar intensity (the spleen domain still contains the liver), partial-volume blur and
  correlated noise of σ 10–20 HU. MR has arbitrary units, a smooth multiplicative bias field and
  Rician noise; neighbours of equal intensity (amygdala next to the hippocampus, the other
  blood-filled heart chambers next to the left atrium) force the use of shape and position.
* **Scanner-like grids.** CT slices are 4–6 mm apart with ~2.6–3 mm pixels (anisotropic); the
  physical field of view does not depend on ``size_scale``, which multiplies the voxel counts
  and divides the spacing.

The canonical frame is RAS: x to the patient's right, y anterior, z superior. Arrays follow
:mod:`training.io.volume` (axis 0 = slices = z, axis 1 = y, axis 2 = x) with an axis-aligned
affine whose origin varies per case; CT is stored like DICOM-derived files (axes 1, 2 running
posterior and left), MR in RAS order, so a pipeline that ignores the affine sees differently
oriented anatomy across domains.

API: :data:`SYNTH_DOMAINS`, :func:`list_domains`, :func:`generate_case`, :func:`case_seed`,
:func:`write_dataset`.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from training.data import deform
from training.errors import DatasetError, InputError
from training.io.atomic import atomic_write_text
from training.io.volume import Volume, write_labels, write_nifti

SYNTH_VERSION = 1


@dataclass(frozen=True)
class SynthDomainInfo:
    """What a synthetic domain holds; ``classes`` include background at index 0."""

    name: str
    modality: str  # "CT" or "MR"
    modalities: tuple[str, ...]
    classes: tuple[str, ...]
    colors: tuple[str, ...]
    description: str
    shape: tuple[int, int, int]  # (D0, D1, D2) at size_scale 1
    spacing: tuple[tuple[float, float], tuple[float, float]]  # (slice range, in-plane range) mm


_CT_SHAPE = (48, 112, 112)
_CT_SPACING = ((4.0, 6.0), (2.6, 3.0))

SYNTH_DOMAINS: dict[str, SynthDomainInfo] = {
    d.name: d
    for d in [
        SynthDomainInfo(
            "liver-ct",
            "CT",
            ("CT",),
            ("background", "liver", "tumour"),
            ("#000000", "#d2691e", "#ffe119"),
            "Abdominal CT (HU), liver with 1-3 hypodense tumours; spleen, kidneys, stomach, bowel unlabelled",
            _CT_SHAPE,
            _CT_SPACING,
        ),
        SynthDomainInfo(
            "spleen-ct",
            "CT",
            ("CT",),
            ("background", "spleen"),
            ("#000000", "#911eb4"),
            "Abdominal CT (HU), spleen only 5-15 HU darker than the (unlabelled) liver",
            _CT_SHAPE,
            _CT_SPACING,
        ),
        SynthDomainInfo(
            "kidney-ct",
            "CT",
            ("CT",),
            ("background", "kidney", "tumour"),
            ("#000000", "#3cb44b", "#e6194b"),
            "Abdominal CT (HU), both kidneys (cortex + medulla) and one renal tumour, often exophytic",
            _CT_SHAPE,
            _CT_SPACING,
        ),
        SynthDomainInfo(
            "pancreas-ct",
            "CT",
            ("CT",),
            ("background", "pancreas", "tumour"),
            ("#000000", "#f58231", "#4363d8"),
            "Abdominal CT (HU), lobulated pancreas (head to tail) with one hypodense tumour",
            _CT_SHAPE,
            _CT_SPACING,
        ),
        SynthDomainInfo(
            "prostate-mr",
            "MR",
            ("T2", "ADC"),
            ("background", "PZ", "TZ"),
            ("#000000", "#46f0f0", "#f032e6"),
            "Pelvic MR, T2 (coil bias field) + ADC (lower resolution); peripheral and transition zones",
            (24, 96, 96),
            ((3.0, 4.0), (1.3, 1.6)),
        ),
        SynthDomainInfo(
            "hippocampus-mr",
            "MR",
            ("T1",),
            ("background", "anterior", "posterior"),
            ("#000000", "#e6194b", "#4363d8"),
            "T1 MR crop around one hippocampus (left or right), head/body split; amygdala unlabelled",
            (36, 48, 40),
            ((1.0, 1.0), (1.0, 1.0)),
        ),
        SynthDomainInfo(
            "heart-mr",
            "MR",
            ("MRI",),
            ("background", "left-atrium"),
            ("#000000", "#e6194b"),
            "Bright-blood cardiac MR; left atrium with pulmonary veins among the other blood pools",
            (48, 80, 80),
            ((2.4, 2.8), (2.4, 2.8)),
        ),
    ]
}


def list_domains() -> list[str]:
    return list(SYNTH_DOMAINS)


def domain_info(domain: str) -> SynthDomainInfo:
    try:
        return SYNTH_DOMAINS[domain]
    except KeyError:
        raise InputError(
            f"unknown synthetic domain {domain!r}; choose one of: {', '.join(SYNTH_DOMAINS)} (u2net synth --list)"
        ) from None


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a dataset generated with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


# -- geometry helpers -------------------------------------------------------------------------------
def _noise(P: np.ndarray, rng: np.random.Generator, wavelength: float, terms: int = 6) -> np.ndarray:
    """Smooth random field of unit RMS over canonical mm coordinates (random Fourier features)."""
    dirs = rng.standard_normal((terms, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = 2 * np.pi / wavelength * rng.uniform(0.7, 1.3, terms)
    phase = rng.uniform(0, 2 * np.pi, terms)
    out = np.zeros(P.shape[1:], dtype=np.float32)
    for d, kk, ph in zip(dirs, k, phase):
        arg = (kk * d[0]) * P[0] + (kk * d[1]) * P[1] + (kk * d[2]) * P[2] + ph
        out += np.cos(arg, dtype=np.float32)
    return out * np.float32(np.sqrt(2.0 / terms))


def _rot(angles_deg) -> np.ndarray:
    return deform.rotation_matrix(np.radians(angles_deg))


def _ellipsoid(P, center, radii, rot=None) -> np.ndarray:
    """Normalised level: < 0 inside; ≈ (distance to the surface) / radius near it."""
    q = P - np.asarray(center, dtype=np.float32).reshape(3, 1, 1, 1)
    if rot is not None:
        q = np.einsum("ji,j...->i...", np.asarray(rot, dtype=np.float32), q)  # Rᵀ q
    r = np.asarray(radii, dtype=np.float32)
    return np.sqrt((q[0] / r[0]) ** 2 + (q[1] / r[1]) ** 2 + (q[2] / r[2]) ** 2) - 1.0


def _cylinder(P, center_xy, radii_xy) -> np.ndarray:
    """Infinite cylinder along z (the body axis)."""
    return (
        np.sqrt(((P[0] - center_xy[0]) / radii_xy[0]) ** 2 + ((P[1] - center_xy[1]) / radii_xy[1]) ** 2) - 1.0
    )


def _tube(P, points, radii) -> np.ndarray:
    """Union of spheres along a centre line: a tube of varying radius (level as for ellipsoids)."""
    points = np.asarray(points, dtype=np.float32)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float32), (len(points),))
    # dense resampling so consecutive spheres overlap
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    n = max(2, int(np.ceil(seg.sum() / max(radii.min() * 0.5, 0.5))) + 1)
    t = np.concatenate([[0], np.cumsum(seg)]) / max(seg.sum(), 1e-6)
    tt = np.linspace(0, 1, n)
    pts = np.stack([np.interp(tt, t, points[:, a]) for a in range(3)], axis=1)
    rr = np.interp(tt, t, radii)
    lo = pts.min(axis=0) - rr.max()
    hi = pts.max(axis=0) + rr.max()
    level = np.full(P.shape[1:], 10.0, dtype=np.float32)
    box = np.all([(P[a] >= lo[a]) & (P[a] <= hi[a]) for a in range(3)], axis=0)
    if not box.any():
        return level
    q = P[:, box]
    best = np.full(q.shape[1], 10.0, dtype=np.float32)
    for p, r in zip(pts, rr):
        d = np.sqrt(((q - p[:, None]) ** 2).sum(axis=0)) / r - 1.0
        np.minimum(best, d, out=best)
    level[box] = best
    return level


def _curve(rng, start, end, bend_mm: float, n: int = 8) -> np.ndarray:
    """Points along a smoothly bent path from start to end."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    t = np.linspace(0, 1, n)[:, None]
    off = rng.normal(0, bend_mm, (2, 3))
    return start + (end - start) * t + np.sin(np.pi * t) * off[0] + np.sin(2 * np.pi * t) * off[1] * 0.5


@dataclass
class _Grid:
    P: np.ndarray  # (3, D0, D1, D2) canonical RAS mm of every voxel
    affine: np.ndarray
    spacing: np.ndarray


def _make_grid(shape, spacing, rng, rot_deg, shift_mm, elastic_mm, smooth_mm, lps: bool = False) -> _Grid:
    """Scanner grid (axis-aligned affine) and each voxel's position in the posed, deformed anatomy.

    Axis 0 runs to superior; axes 1, 2 to anterior, right, or with ``lps`` to posterior, left
    (how DICOM-converted CT is often stored), so pipelines must honour the affine.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    affine = np.zeros((4, 4))
    sign = -1.0 if lps else 1.0
    affine[2, 0], affine[1, 1], affine[0, 2] = spacing * [1.0, sign, sign]
    affine[3, 3] = 1.0
    center_idx = (np.asarray(shape) - 1) / 2
    origin = rng.uniform(-60, 60, 3).round(1)
    affine[:3, 3] = origin - affine[:3, :3] @ center_idx
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    idx -= center_idx.astype(np.float32).reshape(3, 1, 1, 1)
    if elastic_mm > 0:
        idx += deform.random_smooth_displacement(shape, rng, elastic_mm, smooth_mm, spacing)
    world = np.einsum("ij,j...->i...", affine[:3, :3].astype(np.float32), idx)  # relative to FOV centre
    shift = rng.uniform(-1, 1, 3) * np.asarray(shift_mm, dtype=np.float64)
    world -= shift.astype(np.float32).reshape(3, 1, 1, 1)
    R = _rot(rng.uniform(-1, 1, 3) * np.asarray(rot_deg, dtype=np.float64))
    P = np.einsum("ji,j...->i...", R.astype(np.float32), world)  # Rᵀ (w − t)
    return _Grid(np.ascontiguousarray(P, dtype=np.float32), affine, spacing)


class _Canvas:
    """Tissues painted in order (later ones on top); labels follow what is visible."""

    def __init__(self, P: np.ndarray, rng: np.random.Generator, background, channels: int = 1):
        self.P = P
        self.rng = rng
        shape = P.shape[1:]
        self.img = np.empty((channels, *shape), dtype=np.float32)
        self.img[:] = np.asarray(background, dtype=np.float32).reshape(channels, 1, 1, 1)
        self.lab = np.zeros(shape, dtype=np.uint8)
        self.texture = _noise(P, rng, 9.0, 8) * 0.6 + _noise(P, rng, 25.0, 6) * 0.4

    def blob(self, level: np.ndarray, amp: float, wavelength: float) -> np.ndarray:
        """Perturb a level set with smooth noise (irregular, organ-like outlines)."""
        return level + amp * _noise(self.P, self.rng, wavelength)

    def paint(self, mask: np.ndarray, values, label: int = 0, texture=0.0) -> np.ndarray:
        values = np.atleast_1d(np.asarray(values, dtype=np.float32))
        texture = np.broadcast_to(np.atleast_1d(np.asarray(texture, dtype=np.float32)), values.shape)
        if mask.any():
            tex = self.texture[mask]
            for c, (v, a) in enumerate(zip(values, texture)):
                self.img[c][mask] = v + a * tex
            self.lab[mask] = label
        return mask


# -- CT abdomen -------------------------------------------------------------------------------------
def _ct_abdomen(g: _Grid, rng: np.random.Generator, labels: dict[str, int], tumour_in: str | None) -> _Canvas:
    P = g.P
    Z = P[2]
    cv = _Canvas(P, rng, [-1000.0])
    u = rng.uniform
    liver_hu = u(55, 68)

    # body wall: skin/fat, muscle ring, visceral cavity
    ax, ay = u(125, 155), u(95, 118)
    body = cv.blob(_cylinder(P, (0, 0), (ax, ay)) - 0.04 * Z / 100, 0.025, 120)
    fat_mm, mus_mm = u(12, 35), u(8, 14)
    cv.paint(body < 0, -100 + u(-10, 10), texture=8)
    cavity_wall = _cylinder(P, (0, 0), (ax - fat_mm, ay - fat_mm))
    cv.paint((body < 0) & (cavity_wall < 0), 45, texture=6)
    cavity = cv.blob(_cylinder(P, (0, 0), (ax - fat_mm - mus_mm, ay - fat_mm - mus_mm)), 0.02, 80) < 0
    cv.paint(cavity & (body < 0), -95 + u(-10, 10), texture=10)
    inside = cavity & (body < 0)

    # lung bases and heart at the top
    dome = u(85, 105)
    for side in (-1, 1):
        lung = _ellipsoid(P, (side * 70, -10, dome + 70), (75, 80, 90))
        cv.paint((lung < 0) & inside, -850, texture=30)
    cv.paint((_ellipsoid(P, (-20, 35, dome + 55), (60, 50, 55)) < 0) & inside, 45, texture=5)

    # spine, canal, paraspinal and psoas muscles, aorta, IVC
    ys = -(ay - fat_mm) + 40
    cv.paint((_cylinder(P, (0, ys - 32), (32, 24)) < 0) & (body < 0), 50, texture=6)
    for side in (-1, 1):
        cv.paint((_cylinder(P, (side * 32, ys - 40), (24, 20)) < 0) & (body < 0), 50, texture=6)
    vb = _cylinder(P, (0, ys), (19, 17))
    cv.paint(vb < 0.15, 700)
    disc = np.cos(2 * np.pi * (Z - u(0, 30)) / 31.0) > 0.82
    cv.paint(vb < 0, 250, texture=40)
    cv.paint((vb < 0) & disc, 85, texture=5)
    cv.paint(_cylinder(P, (0, ys - 27), (16, 14)) < 0, 650)
    cv.paint(_cylinder(P, (0, ys - 25), (7, 7)) < 0, 15)
    for side in (-1, 1):
        psoas = _cylinder(P, (side * 38, ys + 2), (13, 11)) * (1 + 0.004 * (Z - 0))
        cv.paint((psoas < 0) & (Z < 10), 45, texture=5)
    aorta_hu = u(130, 190)
    cv.paint(_cylinder(P, (-14, ys + 28), (11, 11)) < 0, aorta_hu)
    cv.paint(_cylinder(P, (22, ys + 30), (13, 9)) < 0, aorta_hu - 25)

    # bowel loops (lower and anterior cavity), with gas pockets
    for _ in range(int(rng.integers(6, 11))):
        start = np.array([u(-ax * 0.6, ax * 0.6), u(-10, ay * 0.6), u(-120, -10)])
        pts = _curve(rng, start, start + rng.normal(0, 40, 3), 15)
        loop = _tube(P, pts, u(9, 15)) < 0
        cv.paint(loop & inside, u(15, 40), texture=12)
        gas = _tube(P, pts, u(3, 7)) < 0
        if rng.random() < 0.5:
            cv.paint(gas & inside, -900, texture=40)

    # stomach: wall, fluid below an air-fluid level, gas above
    sc = np.array([u(-65, -40), u(30, 55), u(30, 55)])
    stomach = cv.blob(
        _ellipsoid(P, sc, (u(35, 50), u(28, 38), u(35, 50)), _rot([0, 0, u(-20, 20)])), 0.08, 40
    )
    cv.paint((stomach < 0.12) & inside, 40, texture=5)
    lumen = (stomach < 0) & inside
    cv.paint(lumen, u(0, 20), texture=5)
    cv.paint(lumen & (Z > sc[2] + u(0, 20)), -950, texture=20)

    # liver: union of a right lobe and a left lobe, gallbladder at its inferior margin
    lc = np.array([u(45, 65), u(-10, 10), u(20, 40)])
    right = _ellipsoid(P, lc, (u(65, 80), u(70, 85), u(60, 75)), _rot([u(-10, 10), u(-10, 10), u(-15, 15)]))
    left = _ellipsoid(
        P, lc + [-u(65, 85), u(30, 45), u(5, 20)], (u(40, 55), u(25, 35), u(28, 38)), _rot([0, 0, u(-20, 20)])
    )
    liver = cv.blob(np.minimum(right, left), 0.05, 60) < 0
    liver &= inside & (Z < dome)
    cv.paint(liver, liver_hu, labels.get("liver", 0), texture=6)
    for _ in range(int(rng.integers(3, 6))):  # hepatic vessels (unlabelled inside the liver label)
        a = lc + rng.normal(0, 20, 3)
        v = _tube(P, _curve(rng, a, a + rng.normal(0, 35, 3), 8, 5), u(2.5, 5)) < 0
        cv.paint(v & liver, liver_hu + u(60, 100), labels.get("liver", 0))
    gb = _ellipsoid(
        P, lc + [u(0, 15), u(40, 55), -u(40, 55)], (u(12, 18), u(20, 32), u(12, 18)), _rot([u(-30, 30), 0, 0])
    )
    cv.paint((gb < 0) & inside, u(0, 20), texture=3)

    # spleen: left, posterior, upper; 5–15 HU darker than the liver
    spc = np.array([-(ax - fat_mm - mus_mm) + u(28, 40), u(-45, -25), u(25, 55)])
    spleen = (
        cv.blob(_ellipsoid(P, spc, (u(20, 28), u(45, 60), u(38, 52)), _rot([0, 0, u(-40, -20)])), 0.07, 45)
        < 0
    )
    cv.paint(spleen & inside, liver_hu - u(5, 15), labels.get("spleen", 0), texture=6)

    # kidneys: cortex, medulla, sinus fat; the right one lower (under the liver)
    kidney_hu = u(150, 190)
    kidneys = []
    for side in (-1, 1):
        kc = np.array([side * u(62, 75), ys + u(0, 10), u(-45, -20) - (12 if side > 0 else 0)])
        kr = _rot([0, side * u(8, 18), side * u(20, 35)])
        kl = cv.blob(_ellipsoid(P, kc, (u(24, 30), u(22, 27), u(48, 60)), kr), 0.04, 35)
        cv.paint(kl < 0, kidney_hu, labels.get("kidney", 0), texture=6)
        cv.paint(cv.blob(kl + 0.25, 0.08, 12) < 0, kidney_hu - u(50, 80), labels.get("kidney", 0), texture=8)
        sinus = _ellipsoid(P, kc + kr @ np.array([-side * 16.0, 0, 0]), (10, 9, 25), kr) < 0
        cv.paint(sinus & (kl < 0), -60, texture=15)
        kidneys.append((kc, kl))

    # pancreas (head near the duodenum → tail at the splenic hilum), splenic vein behind it
    head = np.array([u(20, 35), ys + u(45, 60), u(-20, -5)])
    tail = np.array([spc[0] + u(10, 20), spc[1] + u(20, 35), spc[2] - u(15, 30)])
    pts = _curve(rng, head, tail, 10, 10)
    pts[len(pts) // 2 - 1 : len(pts) // 2 + 1, 1] = np.maximum(
        pts[len(pts) // 2 - 1 : len(pts) // 2 + 1, 1], ys + 50
    )
    radii = np.linspace(u(12, 16), u(7, 10), len(pts))
    cv.paint((_tube(P, pts + [0, -14, 0], 4) < 0) & inside, aorta_hu - 30)
    pancreas = cv.blob(_tube(P, pts, radii), 0.18, 12) < 0
    pancreas &= inside
    cv.paint(pancreas, liver_hu - u(10, 20), labels.get("pancreas", 0), texture=10)
    duo = _tube(P, _curve(rng, head + [15, 10, 25], head + [20, 0, -35], 5, 6), u(8, 11))
    cv.paint((duo < 0) & ~pancreas & inside, u(10, 30), texture=10)

    # tumours, always at least one visible
    organs = {"liver": liver, "kidney": None, "pancreas": pancreas}
    if tumour_in == "liver":
        for k in range(int(rng.integers(1, 4))):
            _tumour(
                cv,
                liver,
                u(7, 22) if k else u(14, 24),
                liver_hu - u(25, 45),
                labels["tumour"],
                10,
                inside=liver,
            )
    elif tumour_in == "kidney":
        kc, kl = kidneys[int(rng.integers(2))]
        shell = (kl < 0) & (kl > -0.25)  # tumours arise in the cortex and bulge out
        _tumour(cv, shell, u(12, 26), kidney_hu - u(40, 80), labels["tumour"], 20, inside=inside)
    elif tumour_in == "pancreas":
        _tumour(
            cv,
            organs["pancreas"],
            u(10, 18),
            liver_hu - u(30, 45),
            labels["tumour"],
            8,
            inside=inside & ~liver,
        )
    return cv


def _tumour(
    cv: _Canvas, host: np.ndarray, radius: float, hu: float, label: int, texture: float, inside
) -> None:
    rng = cv.rng
    idx = np.argwhere(host)
    if len(idx) == 0:
        return
    c = cv.P[(slice(None), *idx[int(rng.integers(len(idx)))])]
    level = cv.blob(
        _ellipsoid(cv.P, c, radius * rng.uniform(0.8, 1.2, 3), _rot(rng.uniform(-45, 45, 3))), 0.1, 15
    )
    cv.paint((level < 0) & inside, hu, label, texture=texture)


def _finish_ct(cv: _Canvas, g: _Grid, rng) -> np.ndarray:
    img = cv.img[0]
    # partial volume: in-plane PSF and the slice profile
    img = ndimage.gaussian_filter(img, sigma=(0.45, 0.6, 0.6))
    noise = ndimage.gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), (0.3, 0.7, 0.7))
    noise *= rng.uniform(10, 20) / max(float(noise.std()), 1e-6)
    img = np.clip(np.round(img + noise), -1024, 3071).astype(np.int16)
    return img[None]


# -- MR ---------------------------------------------------------------------------------------------
def _bias(P, rng, strength: float, wavelength: float = 120.0) -> np.ndarray:
    return np.exp(strength * _noise(P, rng, wavelength, 4)).astype(np.float32)


def _rician(img: np.ndarray, sigma: float, rng) -> np.ndarray:
    n1 = rng.standard_normal(img.shape).astype(np.float32) * sigma
    n2 = rng.standard_normal(img.shape).astype(np.float32) * sigma
    return np.sqrt((img + n1) ** 2 + n2**2)


def _to_int16(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img), 0, 32767).astype(np.int16)


def _prostate(g: _Grid, rng, labels) -> tuple[np.ndarray, np.ndarray]:
    P = g.P
    Y = P[1]
    u = rng.uniform
    # channels: (T2 relative, ADC in µm²/s)
    cv = _Canvas(P, rng, [0.85, 250.0], channels=2)  # pelvic fat
    for side in (-1, 1):  # obturator internus, levator ani
        cv.paint(
            _ellipsoid(P, (side * u(48, 58), u(-5, 5), 0), (14, 40, 60)) < 0, [0.3, 1400], texture=[0.04, 80]
        )
        cv.paint(
            _ellipsoid(P, (side * 22, -22, -15), (8, 20, 25), _rot([0, 0, side * 30])) < 0,
            [0.3, 1400],
            texture=[0.04, 80],
        )
    # pubic bone anteriorly: marrow and cortex
    pub = _ellipsoid(P, (0, u(38, 48), u(-5, 10)), (40, 12, 25))
    cv.paint(pub < 0.1, [0.05, 300])
    cv.paint(pub < 0, [0.55, 450], texture=[0.08, 60])
    # bladder above, rectum behind
    cv.paint(
        cv.blob(_ellipsoid(P, (0, u(5, 15), u(38, 48)), (u(30, 40), u(25, 35), u(22, 30))), 0.06, 40) < 0,
        [1.0, 2900],
        texture=[0.02, 80],
    )
    rect = _tube(P, _curve(rng, (0, u(-32, -26), -60), (0, u(-32, -24), 60), 6, 6), u(13, 17))
    cv.paint(rect < 0, [0.28, 1200], texture=[0.05, 100])
    cv.paint(rect < -0.45, [0.06, 300], texture=[0.02, 50])
    # gland: transition zone (with BPH nodules), peripheral zone, anterior stroma, urethra
    r = np.array([u(20, 28), u(14, 19), u(16, 23)])
    gr = _rot([u(-15, 15), u(-5, 5), u(-8, 8)])
    gland = cv.blob(_ellipsoid(P, (0, 0, 0), r, gr), 0.05, 25) < 0
    tz_c = gr @ np.array([0, 0.25 * r[1], 0.1 * r[2]])
    tz = cv.blob(_ellipsoid(P, tz_c, r * u(0.55, 0.75), gr), 0.08, 14) < 0
    Yg = np.einsum("j,j...->...", gr[:, 1].astype(np.float32), P)  # along the gland's AP axis
    pz = gland & ~tz & (Yg < 0.3 * r[1])
    afs = gland & ~tz & ~pz
    cv.paint(afs, [0.2, 950], labels["TZ"], texture=[0.03, 60])
    cv.paint(pz, [u(0.65, 0.8), u(1600, 1900)], labels["PZ"], texture=[0.08, 150])
    cv.paint(tz, [u(0.4, 0.5), u(1000, 1250)], labels["TZ"], texture=[0.1, 120])
    for _ in range(int(rng.integers(2, 6))):  # nodules
        c = tz_c + rng.normal(0, 5, 3)
        cv.paint(
            tz & (_ellipsoid(P, c, u(3, 7, 3)) < 0),
            [u(0.3, 0.65), u(900, 1300)],
            labels["TZ"],
            texture=[0.05, 50],
        )
    if rng.random() < 0.5:  # a lesion: dark on T2 and ADC, still peripheral zone anatomically
        idx = np.argwhere(pz)
        if len(idx):
            c = P[(slice(None), *idx[int(rng.integers(len(idx)))])]
            cv.paint(pz & (_ellipsoid(P, c, u(3, 7, 3)) < 0), [0.35, 800], labels["PZ"])
    ur = _tube(
        P, [gr @ np.array([0, 0.15 * r[1], -1.2 * r[2]]), gr @ np.array([0, 0.15 * r[1], 1.2 * r[2]])], 2.0
    )
    cv.paint(gland & (ur < 0), [0.6, 1500], labels["TZ"])

    t2 = ndimage.gaussian_filter(cv.img[0], (0.4, 0.6, 0.6))
    t2 *= _bias(P, rng, 0.15) * np.exp(-u(0.0, 0.5) * Y / 60.0).astype(np.float32)  # coil behind
    gain = u(300, 1500)
    t2 = _rician(t2 * gain, gain * u(0.02, 0.04), rng)
    adc = ndimage.gaussian_filter(cv.img[1], (0.6, 1.5, 1.5))  # DWI is lower-resolution
    adc = _rician(adc, u(60, 120), rng)
    return np.stack([_to_int16(t2), _to_int16(adc)]), cv.lab


def _hippocampus(g: _Grid, rng, labels) -> tuple[np.ndarray, np.ndarray]:
    P = g.P
    u = rng.uniform
    s = 1 if rng.random() < 0.5 else -1  # lateral direction (+x for a right hippocampus)
    wm, gm, csf = 0.85, u(0.5, 0.56), u(0.12, 0.2)
    cv = _Canvas(P, rng, [wm])
    folds = _noise(P, rng, 14.0, 8)
    cv.paint(folds > 0.35, gm, texture=0.03)
    cv.paint(folds > 1.1, csf, texture=0.02)
    # medial: ambient cistern and brainstem
    cv.paint(_ellipsoid(P, (-s * u(16, 20), -5, 0), (6, 40, 30)) < 0, csf, texture=0.02)
    cv.paint(_ellipsoid(P, (-s * 32, -5, 8), (12, 40, 40)) < 0, 0.75, texture=0.02)
    # parahippocampal gyrus below, amygdala in front and above the head
    cv.paint(_ellipsoid(P, (s * 1, -2, -9), (9, 24, 4.5), _rot([u(-10, 10), 0, 0])) < 0, gm, texture=0.03)
    size = u(0.85, 1.15)
    t = np.linspace(0, 1, 12)
    cl = np.stack([s * (1.5 - 4 * t) * size, (13 - 34 * t) * size, (-2 + 9 * t**2) * size], axis=1)
    rad = (6.0 - 3.8 * t + 1.2 * (t < 0.25)) * size
    amy_c = cl[0] + [s * 1.0, u(7, 10), u(5, 8)]
    cv.paint(cv.blob(_ellipsoid(P, amy_c, (8, 7, 6)), 0.06, 10) < 0, gm + 0.01, texture=0.03)
    # temporal horn (CSF) lateral-superior to the body
    cv.paint(_tube(P, cl[2:10] + [s * 5.5, 0, 5], 1.8) < 0, csf)
    hippo = cv.blob(_tube(P, cl, rad), 0.08, 8) < 0
    split = int(np.clip(round(u(0.33, 0.42) * 11), 3, 5))
    n = np.array([0.0, np.cos(np.radians(u(-15, 15))), np.sin(np.radians(u(-15, 15)))])
    front = (
        np.einsum("i,i...->...", n.astype(np.float32), P - cl[split].astype(np.float32).reshape(3, 1, 1, 1))
        > 0
    )
    cv.paint(hippo & front, gm - 0.02, labels["anterior"], texture=0.03)
    cv.paint(hippo & ~front, gm - 0.02, labels["posterior"], texture=0.03)

    img = ndimage.gaussian_filter(cv.img[0], 0.5) * _bias(P, rng, 0.1, 80)
    gain = u(200, 1000)
    img = _rician(img * gain, gain * u(0.03, 0.05), rng)
    return _to_int16(img)[None], cv.lab


def _heart(g: _Grid, rng, labels) -> tuple[np.ndarray, np.ndarray]:
    P = g.P
    Y = P[1]
    u = rng.uniform
    blood, myo, wall = 1.0, 0.3, 0.35
    cv = _Canvas(P, rng, [0.7])  # mediastinal fat / chest wall
    for side in (-1, 1):
        cv.paint(cv.blob(_ellipsoid(P, (side * 80, -5, 10), (60, 75, 110)), 0.05, 50) < 0, 0.06, texture=0.02)
    for _ in range(25):  # pulmonary vessels in the lungs
        c = np.array([rng.choice([-1, 1]) * u(45, 110), u(-60, 50), u(-60, 60)])
        cv.paint((_ellipsoid(P, c, (3, 3, 3)) < 0) & (cv.img[0] < 0.1), 0.6)
    cv.paint(_cylinder(P, (0, -62), (16, 14)) < 0, 0.55, texture=0.05)  # spine
    cv.paint(_cylinder(P, (-18, -42), (11, 11)) < 0, blood)  # descending aorta
    cv.paint(_ellipsoid(P, (45, 15, -95), (80, 70, 45)) < 0, 0.4, texture=0.03)  # liver dome

    def chamber(center, radii, rot, wall_mm, inner, label=0):
        lvl = cv.blob(_ellipsoid(P, center, radii, rot), 0.05, 30)
        cv.paint(lvl < wall_mm / float(np.mean(radii)), inner[0])
        cv.paint(lvl < 0, inner[1], label)
        return lvl

    chamber((u(5, 15), u(50, 60), -25), (u(28, 34), 20, 35), _rot([0, 0, 20]), 4, (myo, blood))  # RV
    chamber(
        (-u(25, 35), u(35, 45), -25), (25, 25, 40), _rot([u(20, 35), u(-30, -15), 0]), 10, (myo, blood)
    )  # LV
    chamber((u(35, 42), 10, -5), (24, 22, 28), None, 3, (wall, blood))  # RA
    pa = _tube(P, [(-10, 40, 10), (-15, 30, 35), (-30, 5, 40)], 12)
    cv.paint(pa < 0.25, wall)
    cv.paint(pa < 0, blood)
    ao = _tube(P, [(2, 22, 0), (0, 25, 40), (-10, 10, 70)], 13)
    cv.paint(ao < 0.25, wall)
    cv.paint(ao < 0, blood)

    la_r = np.array([u(28, 36), u(17, 23), u(19, 25)])
    la_rot = _rot([u(-10, 10), u(-10, 10), u(-15, 15)])
    la = cv.blob(_ellipsoid(P, (0, 0, 0), la_r, la_rot), 0.06, 30)
    veins = []
    for side in (-1, 1):
        for dz in (1, -1):
            start = la_rot @ np.array([side * la_r[0] * 0.7, -la_r[1] * 0.3, dz * la_r[2] * 0.4])
            end = start + np.array([side * u(25, 35), -u(5, 15), dz * u(5, 15)])
            veins.append(_tube(P, _curve(rng, start, end, 3, 5), u(5, 7)))
    appendage = _tube(
        P,
        _curve(
            rng,
            la_rot @ [-la_r[0] * 0.6, la_r[1] * 0.6, la_r[2] * 0.3],
            la_rot @ [-la_r[0] * 1.1, la_r[1] * 1.5, la_r[2] * 0.5],
            3,
            5,
        ),
        u(5, 7),
    )
    lvl = np.minimum.reduce([la, appendage, *veins])
    cv.paint(lvl < 0.12, wall)
    cv.paint(lvl < 0, blood, labels["left-atrium"])

    img = ndimage.gaussian_filter(cv.img[0], 0.6)
    img *= _bias(P, rng, 0.25, 150) * np.exp(u(0, 0.4) * Y / 80.0).astype(np.float32)  # anterior coil
    gain = u(100, 1000)
    img = _rician(img * gain, gain * u(0.03, 0.05), rng)
    return _to_int16(img)[None], cv.lab


# -- public API -------------------------------------------------------------------------------------
def _render(info: SynthDomainInfo, rng: np.random.Generator, size_scale: float) -> tuple[Volume, np.ndarray]:
    domain = info.name
    shape = tuple(max(8, round(n * size_scale)) for n in info.shape)
    (z0, z1), (p0, p1) = info.spacing
    base = np.array([rng.uniform(z0, z1), *([rng.uniform(p0, p1)] * 2)])
    spacing = base * np.array(info.shape) / np.array(shape)  # keep the field of view
    labels = {name: i for i, name in enumerate(info.classes)}
    if info.modality == "CT":
        g = _make_grid(shape, spacing, rng, (4, 4, 10), (15, 15, 15), 6.0, 60.0, lps=True)
        organ = domain.split("-")[0]
        cv = _ct_abdomen(g, rng, labels, tumour_in=organ if "tumour" in labels else None)
        img, lab = _finish_ct(cv, g, rng), cv.lab
    elif domain == "prostate-mr":
        g = _make_grid(shape, spacing, rng, (8, 5, 8), (6, 6, 6), 2.5, 30.0)
        img, lab = _prostate(g, rng, labels)
    elif domain == "hippocampus-mr":
        g = _make_grid(shape, spacing, rng, (10, 10, 10), (3, 3, 3), 1.5, 12.0)
        img, lab = _hippocampus(g, rng, labels)
    elif domain == "heart-mr":
        g = _make_grid(shape, spacing, rng, (10, 10, 15), (8, 8, 8), 3.0, 40.0)
        img, lab = _heart(g, rng, labels)
    else:  # pragma: no cover - every registered domain has a generator
        raise InputError(f"no generator for domain {domain!r}")
    return Volume(img, g.affine), lab


def generate_case(domain: str, seed: int, size_scale: float = 1.0) -> tuple[Volume, np.ndarray]:
    """One synthetic case: image ``Volume`` (C, D0, D1, D2) and labels (D0, D1, D2) uint8, same grid.

    Deterministic for a given (domain, seed, size_scale). ``size_scale`` multiplies the voxel counts
    and divides the spacing (the physical field of view stays the same).
    """
    info = domain_info(domain)
    if not (0.05 <= size_scale <= 8):
        raise InputError(f"size scale {size_scale} is out of range; use a value between 0.05 and 8")
    for attempt in range(8):  # re-draw (deterministically) the rare case where a class is not visible
        vol, lab = _render(
            info, np.random.default_rng([zlib.crc32(domain.encode()), int(seed), attempt]), size_scale
        )
        if np.bincount(lab.ravel(), minlength=len(info.classes)).min() > 0:
            break
    meta = {
        "synth": {
            "domain": domain,
            "seed": int(seed),
            "size_scale": float(size_scale),
            "version": SYNTH_VERSION,
        }
    }
    vol.source, vol.meta = f"synth:{domain}:{seed}", meta
    return vol, lab


def _file_stem(domain: str) -> str:
    return domain.replace("-", "_")


_CASE_FILE = re.compile(r"^[a-z0-9_]+_\d{3,}\.nii\.gz$")


def _clear_previous(out: Path) -> None:
    """``--force``: remove a synthetic dataset written here before, refusing anything else."""
    js = out / "dataset.json"
    if js.exists():
        try:
            ours = "synth" in json.loads(js.read_text()).get("u2net", {})
        except (ValueError, AttributeError):
            ours = False
        if not ours:
            raise DatasetError(f"{js}: not a synthetic dataset; refusing to replace it even with --force")
    for entry in out.iterdir():
        if entry.name in ("dataset.json", "splits_final.json", ".u2net_cache"):
            continue
        if (
            entry.name in ("imagesTr", "labelsTr", "imagesTs")
            and entry.is_dir()
            and all(_CASE_FILE.match(f.name) for f in entry.iterdir())
        ):
            continue
        raise DatasetError(
            f"{entry}: not part of a synthetic dataset; refusing to replace {out} even with --force"
        )
    for name in ("imagesTr", "labelsTr", "imagesTs", ".u2net_cache"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("dataset.json", "splits_final.json"):
        (out / name).unlink(missing_ok=True)


def write_dataset(
    out_dir,
    domain: str,
    cases: int,
    seed: int,
    test_cases: int = 0,
    size_scale: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
    force: bool = False,
) -> Path:
    """Write ``cases`` training and ``test_cases`` test cases in the MSD layout; returns ``out_dir``.

    A non-empty ``out_dir`` is refused; with ``force`` a synthetic dataset written there before
    (and nothing else) is replaced. ``dataset.json`` is written last, so an interrupted run leaves
    no loadable half-dataset. ``progress(done, total)`` is called after each case.
    """
    info = domain_info(domain)
    if cases < 1 or test_cases < 0:
        raise InputError("need at least 1 training case and a non-negative number of test cases")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise DatasetError(
                f"{out}: folder is not empty; choose a new folder, or pass --force to replace a synthetic dataset there"
            )
        _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = _file_stem(domain)
    training, test = [], []
    total = cases + test_cases
    for i in range(total):
        vol, lab = generate_case(domain, case_seed(seed, i), size_scale)
        name = f"{stem}_{i:03d}.nii.gz"
        data = vol.data[0] if vol.channels == 1 else vol.data
        if i < cases:
            write_nifti(out / "imagesTr" / name, data, vol.affine)
            write_labels(out / "labelsTr" / name, lab, vol.affine)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            write_nifti(out / "imagesTs" / name, data, vol.affine)
            test.append(f"./imagesTs/{name}")
        if progress is not None:
            progress(i + 1, total)
    doc = {
        "name": domain,
        "description": f"Synthetic: {info.description}",
        "reference": "napari-u2net synthetic phantoms",
        "licence": "CC-0",
        "release": f"synth v{SYNTH_VERSION}",
        "tensorImageSize": "4D" if len(info.modalities) > 1 else "3D",
        "modality": {str(i): m for i, m in enumerate(info.modalities)},
        "labels": {str(i): c for i, c in enumerate(info.classes)},
        "numTraining": cases,
        "numTest": test_cases,
        "training": training,
        "test": test,
        "u2net": {
            "modality": info.modality,
            "colors": list(info.colors),
            "synth": {
                "domain": domain,
                "seed": int(seed),
                "size_scale": float(size_scale),
                "version": SYNTH_VERSION,
            },
        },
    }
    atomic_write_text(out / "dataset.json", json.dumps(doc, indent=2))
    return out
