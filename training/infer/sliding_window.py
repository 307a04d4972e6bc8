"""Sliding-window inference with Gaussian blending, in bounded memory.

Tiles are placed exactly as MONAI's ``sliding_window_inference`` places them (same start
positions, same symmetric padding of volumes smaller than the patch (edge values: MONAI's
``padding_mode="replicate"``), same Gaussian
importance map with sigma = patch/8, clamped at 1e-3), and logits are blended the same way, so
the probabilities agree with MONAI's to float precision.

Unlike MONAI we do not hold full-volume float32 output and weight maps. Tiles are visited slab
by slab along axis 0: once every tile starting at z has run, the voxels before the next start
are final, so they go out as a :class:`Slab` and the accumulator (only one patch deep) rolls
on. What is kept of each slab is the caller's choice, one *sink* per output
(:class:`SlabSink`): argmax labels (:class:`LabelSink`, never forming probabilities),
probabilities in a chosen precision (:class:`ProbabilitySink`), the normalised entropy
(:class:`UncertaintySink`), or any other per-voxel reduction. A new output is a new sink; the sweep itself does not change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from training.errors import CancelFlag, InputError, U2NetError, check_cancel
from training.infer.config import InferenceConfig, validate_overlap
from training.io.devices import default_batch_size, is_out_of_memory, release_memory, resolve_device
from training.io.volume import label_dtype

SIGMA_SCALE = 0.125  # Gaussian sigma as a fraction of the patch (MONAI's and nnU-Net's choice)
MIN_WEIGHT = 1e-3  # MONAI's floor for the importance map (avoids 0/0 at tile corners)
OUTPUT_ROWS = 8  # finished slices are handed out this many at a time


@dataclass
class InferenceProgress:
    """Where a run stands, for progress bars: tiles are the unit, stages name the slow steps."""

    domain: str
    done: int  # tiles done (for this domain)
    total: int  # tiles in total (for this domain)
    stage: str  # "preprocess", "sliding-window", "resample", "postprocess", "done"


ProgressFn = Callable[[InferenceProgress], None]


# -- tile geometry ------------------------------------------------------------------------------
def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices along one axis (``size`` ≥ ``patch``), the last tile flush with the end."""
    if patch >= size:
        return [0]
    step = max(int(patch * (1 - overlap)), 1)
    count = next(i for i in range(math.ceil(size / step) + 1) if i * step + patch >= size) + 1
    return [min(i * step, size - patch) for i in range(count)]


def padding_for(shape, patch) -> list[tuple[int, int]]:
    """Symmetric padding (before, after) per axis so that each axis is ≥ the patch."""
    pads = []
    for s, p in zip(shape, patch):
        diff = max(int(p) - int(s), 0)
        pads.append((diff // 2, diff - diff // 2))
    return pads


def tile_grid(shape, patch, overlap: float) -> list[list[int]]:
    """Tile start indices per axis of the volume once padded (:func:`padding_for`) to the patch."""
    return [tile_starts(max(int(s), int(p)), int(p), overlap) for s, p in zip(shape, patch)]


def count_tiles(shape, patch, overlap: float) -> int:
    """How many tiles the sweep runs (the progress total)."""
    return math.prod(len(starts) for starts in tile_grid(shape, patch, overlap))


def gaussian_importance(patch, sigma_scale: float = SIGMA_SCALE, device=None) -> torch.Tensor:
    """Separable Gaussian weight map (peak 1 at the centre, floored at :data:`MIN_WEIGHT`)."""
    weights = None
    for p in patch:
        x = torch.arange(p, dtype=torch.float32, device=device) - (p - 1) / 2.0
        g = torch.exp(-(x**2) / (2 * (p * sigma_scale) ** 2))
        weights = g if weights is None else weights.unsqueeze(-1) * g
    return weights.clamp_(min=MIN_WEIGHT)


# -- what is kept of each slab ------------------------------------------------------------------
class Slab:
    """Finished rows ``z0:z1`` of the volume (unpadded coordinates), as every sink sees them.

    It holds the Gaussian-weighted logit sums, not probabilities: the argmax needs no softmax,
    and the probabilities are formed at most once, however many sinks ask. Its tensors are
    views into the rolling accumulator, valid only while the sinks' ``add`` runs.
    """

    def __init__(self, z0: int, z1: int, logit_sum: torch.Tensor, weight: torch.Tensor):
        self.z0, self.z1 = z0, z1
        self._logit_sum = logit_sum  # (K, z1-z0, Y, X) on the accumulator's device
        self._weight = weight  # (z1-z0, Y, X), positive
        self._probabilities: dict[float, torch.Tensor] = {}

    def probabilities(self, temperature: float = 1.0) -> torch.Tensor:
        """Softmax probabilities (K, z1-z0, Y, X) float32 on the CPU of the logits divided by
        ``temperature`` (the domain's calibration; 1: as the network gives them). The argmax is
        the same at any temperature."""
        t = float(temperature)
        if t not in self._probabilities:
            self._probabilities[t] = torch.softmax(self._logit_sum / (self._weight * t), dim=0).cpu()
        return self._probabilities[t]

    def argmax(self) -> torch.Tensor:
        """The most probable class (z1-z0, Y, X) on the CPU; the weights are positive, so the
        argmax of the weighted sum is that of the average and no probability is formed."""
        return self._logit_sum.argmax(dim=0).cpu()


class SlabSink(Protocol):
    """One output of the sweep: ``add`` sees every slab once, in order; ``result`` at the end."""

    def add(self, slab: Slab) -> None: ...

    def result(self): ...


class LabelSink:
    """Argmax labels (Z, Y, X) uint8 (uint16 beyond 256 classes); never forms probabilities."""

    def __init__(self, shape, num_classes: int):
        self.labels = np.empty(tuple(shape), dtype=label_dtype(num_classes - 1))

    def add(self, slab: Slab) -> None:
        self.labels[slab.z0 : slab.z1] = slab.argmax().numpy()

    def result(self) -> np.ndarray:
        return self.labels


class ProbabilitySink:
    """Softmax probabilities (K, Z, Y, X) on the CPU, stored as ``dtype`` (float16 halves what a
    volume that is resampled afterwards costs), at ``temperature`` (see :meth:`Slab.probabilities`)."""

    def __init__(self, shape, num_classes: int, dtype: torch.dtype = torch.float32, temperature: float = 1.0):
        self.probabilities = torch.empty((num_classes, *shape), dtype=dtype)
        self.temperature = float(temperature)

    def add(self, slab: Slab) -> None:
        self.probabilities[:, slab.z0 : slab.z1] = slab.probabilities(self.temperature)

    def result(self) -> torch.Tensor:
        return self.probabilities


def normalized_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy of class probabilities (K, …) over axis 0 divided by log K: 0 where one class is
    certain, 1 where all are equally likely (float32, clamped to [0, 1])."""
    k = probabilities.shape[0]
    h = -torch.special.xlogy(probabilities, probabilities).sum(0)
    return (h / math.log(k)).clamp_(0, 1)


class UncertaintySink:
    """Per-voxel uncertainty (Z, Y, X) float16: the :func:`normalized_entropy` of the probabilities
    at ``temperature``, formed slab by slab (never all classes of the volume at once)."""

    def __init__(self, shape, num_classes: int, temperature: float = 1.0):
        self.uncertainty = torch.empty(tuple(shape), dtype=torch.float16)
        self.temperature = float(temperature)

    def add(self, slab: Slab) -> None:
        self.uncertainty[slab.z0 : slab.z1] = normalized_entropy(slab.probabilities(self.temperature))

    def result(self) -> torch.Tensor:
        return self.uncertainty


# -- out-of-memory policy -----------------------------------------------------------------------
@dataclass
class OomPolicy:
    """What to give up next when a GPU runs out of memory: never crash, degrade step by step.

    1. fewer tiles per batch (halve down to one), 2. keep the accumulator on the CPU,
    3. run the network itself on the CPU. Only a CPU out-of-memory is an error.
    """

    batch_size: int

    def next_step(self, compute_device: torch.device, accumulate_device: torch.device) -> str:
        if self.batch_size > 1:
            self.batch_size = max(1, self.batch_size // 2)
            return "smaller-batch"
        if accumulate_device.type != "cpu":
            return "accumulate-on-cpu"
        if compute_device.type != "cpu":
            return "run-on-cpu"
        return "give-up"


# -- the sweep ----------------------------------------------------------------------------------
def _accumulators(k: int, patch, yp: int, xp: int, device: torch.device):
    """Importance map, logit sums (K, pz, Y, X) and weight sums (pz, Y, X): one patch deep."""
    importance = gaussian_importance(patch, device=device)
    acc = torch.zeros((k, patch[0], yp, xp), dtype=torch.float32, device=device)
    weight = torch.zeros((patch[0], yp, xp), dtype=torch.float32, device=device)
    return importance, acc, weight


def sweep_slabs(
    runner,
    domain: str,
    image: torch.Tensor,
    patch_size,
    sinks: Sequence[SlabSink],
    *,
    overlap: float = InferenceConfig.overlap,
    batch_size: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
) -> None:
    """Run ``runner`` over ``image`` (C, Z, Y, X) tile by tile and hand every finished
    :class:`Slab` of axis 0, in order, to each of ``sinks`` until the whole volume is covered.

    Volumes smaller than the patch are padded with their edge values; the slabs cover the
    unpadded volume only. Edge values, not zeros: a 30-slice CT slab zero-padded to a 64-slice
    patch sits between blocks of uniform "soft tissue" (0 is the window's centre) that no
    training patch showed, and abdomen-ct's liver Dice on such a slab fell from 0.85 to 0.10.
    """
    if image.ndim != 4:
        raise InputError(f"expected an image (C, Z, Y, X), got shape {tuple(image.shape)}")
    validate_overlap(overlap)
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise InputError(f"patch size must be three positive integers, got {patch_size}")
    shape = tuple(image.shape[1:])
    pads = padding_for(shape, patch)
    if any(a or b for a, b in pads):
        flat = [v for pair in reversed(pads) for v in pair]  # F.pad wants the last axis first
        image = F.pad(image[None], flat, mode="replicate")[0]
    _, zp, yp, xp = image.shape
    pz, py, px = patch
    z_starts, y_starts, x_starts = tile_grid(shape, patch, overlap)
    yx_starts = [(y, x) for y in y_starts for x in x_starts]
    total = count_tiles(shape, patch, overlap)
    policy = OomPolicy(batch_size or default_batch_size(runner.device))

    try:
        importance, acc, weight = _accumulators(runner.num_classes, patch, yp, xp, runner.device)
    except Exception as e:  # a GPU too full for the accumulator: keep it on the CPU
        if not is_out_of_memory(e) or runner.device.type == "cpu":
            raise
        release_memory(runner.device)
        importance, acc, weight = _accumulators(runner.num_classes, patch, yp, xp, torch.device("cpu"))
    (zlo, _), (ylo, _), (xlo, _) = pads
    z_end = zlo + shape[0]
    ys, xs = slice(ylo, ylo + shape[1]), slice(xlo, xlo + shape[2])
    done = 0
    try:
        for gi, z0 in enumerate(z_starts):
            i = 0
            while i < len(yx_starts):
                check_cancel(cancel)
                chunk = yx_starts[i : i + policy.batch_size]
                tiles = torch.stack([image[:, z0 : z0 + pz, y : y + py, x : x + px] for y, x in chunk])
                try:
                    logits = runner(tiles).to(acc.device, torch.float32)
                except Exception as e:  # only out-of-memory is handled
                    if not is_out_of_memory(e):
                        raise
                    del tiles
                    release_memory(runner.device)
                    step = policy.next_step(runner.device, acc.device)
                    if step == "accumulate-on-cpu":
                        acc, weight, importance = acc.cpu(), weight.cpu(), importance.cpu()
                        release_memory(runner.device)
                    elif step == "run-on-cpu":
                        runner.to_cpu()
                    elif step == "give-up":
                        raise U2NetError(
                            "out of memory even with one tile on the CPU; close other programs "
                            "or use a smaller model patch"
                        ) from e
                    continue
                # In-place updates only (no allocation), so an error above never leaves a
                # half-added batch behind.
                for j, (y, x) in enumerate(chunk):
                    acc[:, :, y : y + py, x : x + px].addcmul_(logits[j], importance)
                    weight[:, y : y + py, x : x + px].add_(importance)
                del logits, tiles
                i += len(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(InferenceProgress(domain, done, total, "sliding-window"))

            z1 = z_starts[gi + 1] if gi + 1 < len(z_starts) else zp
            n = z1 - z0
            a, b = max(z0, zlo), min(z1, z_end)  # drop the padding rows
            # Finished rows go out a few at a time, so temporaries stay a few slices thin.
            for r0 in range(a, b, OUTPUT_ROWS):
                r1 = min(r0 + OUTPUT_ROWS, b)
                slab = Slab(r0 - zlo, r1 - zlo, acc[:, r0 - z0 : r1 - z0, ys, xs], weight[r0 - z0 : r1 - z0, ys, xs])
                for sink in sinks:
                    sink.add(slab)
                del slab
            keep = pz - n
            if keep > 0:
                acc[:, :keep] = acc[:, n : n + keep].clone()
                weight[:keep] = weight[n : n + keep].clone()
            acc[:, max(keep, 0) :].zero_()
            weight[max(keep, 0) :].zero_()
    finally:
        del acc, weight, importance
        release_memory(runner.device)


def sliding_window(
    net,
    domain: str,
    image: torch.Tensor,
    patch_size,
    *,
    overlap: float = InferenceConfig.overlap,
    batch_size: int | None = None,
    device: str | torch.device = InferenceConfig.device,
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
    amp: bool = InferenceConfig.amp,
    backend: str = InferenceConfig.backend,
    copy_for_speed: bool = True,
) -> torch.Tensor:
    """Softmax probabilities (K, Z, Y, X) float32 on the CPU for a normalised image (C, Z, Y, X)
    already at the domain's spacing: the whole volume at once, for callers that want it.

    ``copy_for_speed=False`` runs ``net`` itself (no channels-last copy): the trainer's
    validation, where copying every adapter each time costs more than it saves."""
    from training.infer.backends import make_runner

    dev = resolve_device(device)
    bs = batch_size or default_batch_size(dev)
    runner = make_runner(net, domain, backend, dev, amp=amp, patch_size=patch_size, batch_size=bs,
                         channels_last=None if copy_for_speed else False)
    sink = ProbabilitySink(image.shape[1:], runner.num_classes)
    sweep_slabs(runner, domain, image, patch_size, [sink], overlap=overlap, batch_size=bs,
                progress=progress, cancel=cancel)
    return sink.result()
