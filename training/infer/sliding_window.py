"""Sliding-window inference with Gaussian blending, in bounded memory.

Tiles are placed exactly as MONAI's ``sliding_window_inference`` places them (same start
positions, same symmetric zero padding of volumes smaller than the patch, same Gaussian
importance map with sigma = patch/8, clamped at 1e-3), and logits are blended the same way, so
the probabilities agree with MONAI's to float precision.

Unlike MONAI we do not hold full-volume float32 output and weight maps. Tiles are visited slab
by slab along axis 0: once every tile starting at z has run, the voxels before the next start
are final, so they are normalised, turned into probabilities and handed to the caller, and the
accumulator (only one patch deep) rolls on. The caller decides what to keep: full
probabilities (:func:`sliding_window`), float16 probabilities, or only the argmax labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training.errors import CancelFlag, Cancelled, InputError, U2NetError, check_cancel, is_cancelled  # noqa: F401
from training.io.devices import default_batch_size, is_out_of_memory, release_memory, resolve_device

SIGMA_SCALE = 0.125  # Gaussian sigma as a fraction of the patch (MONAI's and nnU-Net's choice)
MIN_WEIGHT = 1e-3  # MONAI's floor for the importance map (avoids 0/0 at tile corners)
OUTPUT_ROWS = 8  # finished slices are handed out this many at a time


@dataclass
class InferenceProgress:
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
    """Symmetric zero padding (before, after) per axis so that each axis is ≥ the patch."""
    pads = []
    for s, p in zip(shape, patch):
        diff = max(int(p) - int(s), 0)
        pads.append((diff // 2, diff - diff // 2))
    return pads


def gaussian_importance(patch, sigma_scale: float = SIGMA_SCALE, device=None) -> torch.Tensor:
    """Separable Gaussian weight map (peak 1 at the centre, floored at :data:`MIN_WEIGHT`)."""
    weights = None
    for p in patch:
        x = torch.arange(p, dtype=torch.float32, device=device) - (p - 1) / 2.0
        g = torch.exp(-(x**2) / (2 * (p * sigma_scale) ** 2))
        weights = g if weights is None else weights.unsqueeze(-1) * g
    return weights.clamp_(min=MIN_WEIGHT)


def count_tiles(shape, patch, overlap: float) -> int:
    padded = [max(s, p) for s, p in zip(shape, patch)]
    return math.prod(len(tile_starts(s, p, overlap)) for s, p in zip(padded, patch))


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


# -- the streaming core -------------------------------------------------------------------------
def iter_probability_slabs(
    runner,
    domain: str,
    image: torch.Tensor,
    patch_size,
    *,
    overlap: float = 0.5,
    batch_size: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
    labels_only: bool = False,
) -> Iterator[tuple[int, int, torch.Tensor | np.ndarray]]:
    """Yield ``(z0, z1, probs)``: softmax probabilities (K, z1-z0, Y, X) float32 on the CPU for
    consecutive slabs of axis 0 of ``image`` (C, Z, Y, X) until the whole volume is covered.

    With ``labels_only`` the slabs are argmax labels (z1-z0, Y, X) as uint8 (uint16 beyond 256
    classes) numpy arrays instead: no probabilities are ever formed."""
    if image.ndim != 4:
        raise InputError(f"expected an image (C, Z, Y, X), got shape {tuple(image.shape)}")
    if not 0 <= overlap < 1:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise InputError(f"patch size must be three positive integers, got {patch_size}")
    shape = tuple(image.shape[1:])
    pads = padding_for(shape, patch)
    if any(a or b for a, b in pads):
        flat = [v for pair in reversed(pads) for v in pair]  # F.pad wants the last axis first
        image = F.pad(image, flat)
    _, zp, yp, xp = image.shape
    pz, py, px = patch
    z_starts = tile_starts(zp, pz, overlap)
    yx_starts = [(y, x) for y in tile_starts(yp, py, overlap) for x in tile_starts(xp, px, overlap)]
    total = len(z_starts) * len(yx_starts)
    k = runner.num_classes
    label_dtype = np.uint8 if k <= 256 else np.uint16
    policy = OomPolicy(batch_size or default_batch_size(runner.device))

    try:
        acc_device = runner.device
        importance = gaussian_importance(patch, device=acc_device)
        acc = torch.zeros((k, pz, yp, xp), dtype=torch.float32, device=acc_device)
        weight = torch.zeros((pz, yp, xp), dtype=torch.float32, device=acc_device)
    except Exception as e:  # noqa: BLE001 - a GPU too full for the accumulator: keep it on the CPU
        if not is_out_of_memory(e) or runner.device.type == "cpu":
            raise
        release_memory(runner.device)
        acc_device = torch.device("cpu")
        importance = gaussian_importance(patch, device=acc_device)
        acc = torch.zeros((k, pz, yp, xp), dtype=torch.float32, device=acc_device)
        weight = torch.zeros((pz, yp, xp), dtype=torch.float32, device=acc_device)
    (zlo, _), (ylo, _), (xlo, _) = pads
    z_end = zlo + shape[0]
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
                except Exception as e:  # noqa: BLE001 - only out-of-memory is handled
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
            ys, xs = slice(ylo, ylo + shape[1]), slice(xlo, xlo + shape[2])
            for r0 in range(a, b, OUTPUT_ROWS):
                r1 = min(r0 + OUTPUT_ROWS, b)
                block = acc[:, r0 - z0 : r1 - z0, ys, xs]
                if labels_only:  # the weights are positive: argmax of the sum = of the average
                    out = block.argmax(dim=0).cpu().numpy().astype(label_dtype)
                else:
                    out = torch.softmax(block / weight[r0 - z0 : r1 - z0, ys, xs], dim=0).cpu()
                del block
                yield r0 - zlo, r1 - zlo, out
                del out
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
    overlap: float = 0.5,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
    amp: bool = True,
    backend: str = "torch",
    copy_for_speed: bool = True,
) -> torch.Tensor:
    """Softmax probabilities (K, Z, Y, X) float32 on the CPU for a normalised image (C, Z, Y, X)
    already at the domain's spacing. Volumes smaller than the patch are zero-padded.

    ``copy_for_speed=False`` runs ``net`` itself (no channels-last copy): the trainer's
    validation, where copying every adapter each time costs more than it saves."""
    from training.infer.backends import make_runner

    dev = resolve_device(device)
    bs = batch_size or default_batch_size(dev)
    runner = make_runner(net, domain, backend, dev, amp=amp, patch_size=patch_size, batch_size=bs,
                         channels_last=None if copy_for_speed else False)
    shape = tuple(image.shape[1:])
    out = torch.empty((runner.num_classes, *shape), dtype=torch.float32)
    for z0, z1, probs in iter_probability_slabs(
        runner, domain, image, patch_size, overlap=overlap, batch_size=bs, progress=progress, cancel=cancel
    ):
        out[:, z0:z1] = probs
    return out


def sliding_window_labels(runner, domain: str, image: torch.Tensor, patch_size, **kwargs) -> np.ndarray:
    """Argmax labels (Z, Y, X) uint8 (uint16 beyond 256 classes), never forming probabilities."""
    k = runner.num_classes
    labels = np.empty(tuple(image.shape[1:]), dtype=np.uint8 if k <= 256 else np.uint16)
    for z0, z1, block in iter_probability_slabs(runner, domain, image, patch_size, labels_only=True, **kwargs):
        labels[z0:z1] = block
    return labels
