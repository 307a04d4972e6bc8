"""Segmentation losses on logits (N, K, Z, Y, X) and integer labels (N, Z, Y, X).

Every loss takes an ``ignore_index`` (default 255): voxels with that label count in no term,
which is what makes sparse annotations (a few labelled slices, the rest 255) trainable.

* ``dice_ce`` (default): soft Dice over the foreground classes + cross-entropy (nnU-Net style).
* ``lovasz_focal``: Lovász-softmax + focal loss (γ=2), the paper's choice.

The network already sums its deep-supervision logits into its output, so one loss on the
output is exactly what the architecture trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.io.volume import IGNORE_INDEX

LOSSES = ("dice_ce", "lovasz_focal", "dice", "ce", "focal", "lovasz")


def _valid(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of counted voxels and labels with ignored voxels mapped to 0 (any valid class)."""
    valid = labels != ignore_index
    return valid, torch.where(valid, labels, torch.zeros_like(labels)).long()


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    valid, _ = _valid(labels, ignore_index)
    if not valid.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index)


def soft_dice(logits, labels, ignore_index: int = IGNORE_INDEX, smooth: float = 1e-5) -> torch.Tensor:
    """1 − mean soft Dice of the foreground classes, batch-wise (stable on empty patches)."""
    valid, lab = _valid(labels, ignore_index)
    probs = torch.softmax(logits.float(), dim=1)
    k = probs.shape[1]
    onehot = F.one_hot(lab, k).movedim(-1, 1).float()
    mask = valid.unsqueeze(1).float()
    probs, onehot = probs * mask, onehot * mask
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1 - dice[1:].mean() if k > 1 else 1 - dice.mean()


def focal(logits, labels, ignore_index: int = IGNORE_INDEX, gamma: float = 2.0) -> torch.Tensor:
    valid, lab = _valid(labels, ignore_index)
    if not valid.any():
        return logits.sum() * 0.0
    logp = torch.log_softmax(logits.float(), dim=1).gather(1, lab.unsqueeze(1)).squeeze(1)
    loss = -((1 - logp.exp()) ** gamma) * logp
    return loss[valid].mean()


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    if len(gt_sorted) > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax(logits, labels, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Lovász-softmax (Berman et al. 2018) over the classes present in the batch."""
    valid, lab = _valid(labels, ignore_index)
    probs = torch.softmax(logits.float(), dim=1).movedim(1, -1).reshape(-1, logits.shape[1])
    lab, valid = lab.reshape(-1), valid.reshape(-1)
    probs, lab = probs[valid], lab[valid]
    if lab.numel() == 0:
        return logits.sum() * 0.0
    losses = []
    for c in range(probs.shape[1]):
        fg = (lab == c).float()
        if fg.sum() == 0:
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_grad(fg[perm])))
    return torch.stack(losses).mean() if losses else logits.sum() * 0.0


def make_loss(name: str = "dice_ce", ignore_index: int = IGNORE_INDEX):
    """A callable ``loss(logits, labels) -> scalar`` by name (see :data:`LOSSES`)."""
    terms = {
        "dice_ce": (soft_dice, cross_entropy),
        "lovasz_focal": (lovasz_softmax, focal),
        "dice": (soft_dice,),
        "ce": (cross_entropy,),
        "focal": (focal,),
        "lovasz": (lovasz_softmax,),
    }
    if name not in terms:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    fns = terms[name]

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(f(logits, labels, ignore_index) for f in fns)

    loss.__name__ = name
    return loss
