"""Calibration of a domain's probabilities: temperature scaling, its error, and volume intervals.

A segmentation network's softmax is usually overconfident. Temperature scaling (Guo et al., 2017)
divides the logits by one number T fitted on validation cases (the NLL is minimised; the argmax,
hence the labels, do not change) and is stored in the adapter's metadata (``calibration``);
inference applies it wherever it forms probabilities. Because softmax(l / T) ∝ p^(1/T), the
validation probabilities' logarithms serve as logits: nothing but the sliding window's output is
needed.

What is fitted and measured, on the network's grid of the validation cases (what the trainer
validates on):

* ``temperature`` (one per domain; a per-class vector was measured too and not kept: it changes
  the argmax and gained nothing on held-out cases, docs/uncertainty.md),
* ``ece_before`` / ``ece_after``: top-label expected calibration error over voxels, 15 equal-width
  bins of the top-class probability: Σ_b |B_b|/N · |accuracy(B_b) − confidence(B_b)|,
* ``mean_uncertainty_fg``: mean normalised entropy inside the predicted foreground, the yardstick
  of the "looks unlike the training data" note,
* ``volume_interval``: per foreground class a scale ``s`` such that the expected volume ± s·w
  covers the true volume in ``nominal`` of the cases (split conformal on the validation cases),
  with w the volume of the uncertain band, V(p > 0.1) − V(p > 0.9), plus 1 % of the expected
  volume (:func:`training.infer.measure.volume_band`); on new images the interval scales with
  that image's band.

Voxels are subsampled for the fit (seeded), stratified so that the few foreground and uncertain
voxels are all represented, with weights that keep every estimate a full-volume one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from training.infer.measure import DEFAULT_NOMINAL as NOMINAL
from training.infer.measure import volume_band
from training.infer.sliding_window import normalized_entropy
from training.io.volume import IGNORE_INDEX
from training.model.modelfile import TEMPERATURE_RANGE

ECE_BINS = 15
# voxels drawn for the fit, per stratum (foreground or uncertain / the rest): a fit then takes
# ~0.3 s, cheap enough for every validation of a training run
SAMPLE_PER_STRATUM = 50_000
SURE = 0.999  # a voxel whose top probability is below this counts as uncertain (stratum of its own)


# -- the figures ---------------------------------------------------------------------------------
def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor,
                               weights: torch.Tensor | None = None, bins: int = ECE_BINS) -> float:
    """Top-label ECE of ``probabilities`` (N, K) against ``labels`` (N,): voxels binned by their top
    probability into ``bins`` equal-width bins; the weighted mean over bins of
    |accuracy − confidence| (weights: each voxel's share of the full volume, None = equal)."""
    conf, pred = probabilities.float().max(dim=1)
    correct = (pred == labels).float()
    w = torch.ones_like(conf) if weights is None else weights.float()
    idx = (conf * bins).long().clamp_(0, bins - 1)
    gap = torch.zeros(bins).index_add_(0, idx, w * (correct - conf))
    return float(gap.abs().sum() / w.sum())


class EceMeter:
    """Top-label ECE pooled over the voxels of many cases (:func:`expected_calibration_error`'s
    definition), one case at a time: the signed gaps and counts per bin add up."""

    def __init__(self, bins: int = ECE_BINS):
        self.bins = bins
        self.gap = torch.zeros(bins, dtype=torch.float64)
        self.count = 0

    def add(self, probabilities, labels, ignore_index: int = IGNORE_INDEX) -> None:
        """Probabilities (K, Z, Y, X) and labels (Z, Y, X) of one case; ``ignore_index`` voxels skipped."""
        p = torch.as_tensor(np.asarray(probabilities))
        lab = torch.from_numpy(np.asarray(labels).astype(np.int64))
        conf, pred = p.max(dim=0)
        valid = lab != ignore_index
        conf, correct = conf[valid].double(), (pred[valid] == lab[valid]).double()
        idx = (conf * self.bins).long().clamp_(0, self.bins - 1)
        self.gap.index_add_(0, idx, correct - conf)
        self.count += int(valid.sum())

    @property
    def value(self) -> float | None:
        return float(self.gap.abs().sum() / self.count) if self.count else None


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                    per_class: bool = False) -> float | list[float]:
    """The temperature T minimising the (weighted) NLL of softmax(logits / T) (N, K) against
    ``labels`` (N,): LBFGS on log T, within :data:`TEMPERATURE_RANGE`. ``per_class``: one T per
    class (the logit of class k divided by T_k), returned as a list."""
    logits = logits.float()
    labels = labels.long()
    w = torch.ones(len(labels)) if weights is None else weights.float()
    w = w / w.sum()
    log_t = torch.zeros(logits.shape[1] if per_class else 1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")
    lo, hi = (math.log(x) for x in TEMPERATURE_RANGE)

    def closure():
        opt.zero_grad()
        loss = (F.cross_entropy(logits / log_t.clamp(lo, hi).exp(), labels, reduction="none") * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = log_t.detach().clamp(lo, hi).exp()
    return [float(x) for x in t] if per_class else float(t[0])


def conformal_quantile(scores: list[float], nominal: float = NOMINAL) -> float:
    """The split-conformal quantile: the ⌈(n + 1)·nominal⌉-th smallest score (the largest when n is small)."""
    if not scores:
        return 0.0
    s = sorted(scores)
    k = min(math.ceil((len(s) + 1) * nominal), len(s))
    return float(s[k - 1])


def calibrated(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probabilities (K, …) at temperature 1 → at ``temperature`` (p^(1/T) renormalised)."""
    if temperature == 1.0:
        return probabilities.float()
    p = probabilities.float().clamp_min(1e-30).pow(1.0 / temperature)
    return p / p.sum(0, keepdim=True)


# -- a domain's validation cases -------------------------------------------------------------------
@dataclass
class CalibrationSet:
    """The validation cases' predictions, kept small: per case the log-probabilities (float16, the
    network's grid) and the labels. :meth:`add` each case, then :meth:`fit`."""

    num_classes: int
    voxel_ml: float = 0.001  # of a case added without its own
    ignore_index: int = IGNORE_INDEX
    sample_per_stratum: int = SAMPLE_PER_STRATUM
    cases: list[tuple[torch.Tensor, np.ndarray, float]] = field(default_factory=list)

    def add(self, probabilities, label: np.ndarray, voxel_ml: float | None = None) -> None:
        """One case's probabilities (K, Z, Y, X) at temperature 1 (a tensor or array), its labels
        (Z, Y, X) and its voxel volume (mL; default :attr:`voxel_ml`)."""
        p = torch.as_tensor(np.asarray(probabilities)).float()
        log_p = torch.log(p.clamp_min(1e-30)).clamp_min(-60).half()
        self.cases.append((log_p, np.asarray(label), float(voxel_ml or self.voxel_ml)))

    def _samples(self, seed: int):
        """Stratified voxel samples (logits, labels, weights) over all cases: foreground (true or
        predicted) or uncertain voxels, and the rest; each weighted by its stratum's size / draws."""
        g = np.random.default_rng(seed)
        n = max(len(self.cases), 1)
        logits, labels, weights = [], [], []
        for log_p, label, _ in self.cases:
            lp = log_p.reshape(self.num_classes, -1)
            lab = torch.from_numpy(label.reshape(-1).astype(np.int64))
            valid = (lab != self.ignore_index).numpy()
            top, pred = lp.float().max(0)
            special = ((lab > 0) | (pred > 0) | (top.exp() < SURE)).numpy() & valid
            for stratum in (special, valid & ~special):
                where = np.flatnonzero(stratum)
                if where.size == 0:
                    continue
                take = min(where.size, max(self.sample_per_stratum // n, 1))
                pick = g.choice(where, size=take, replace=False) if take < where.size else where
                logits.append(lp[:, pick].T.float())
                labels.append(lab[pick])
                weights.append(torch.full((take,), where.size / take))
        return torch.cat(logits), torch.cat(labels), torch.cat(weights)

    def fit(self, seed: int = 0, per_class: bool = False) -> dict | None:
        """The ``calibration`` entry of the domain's metadata (module docstring), or None without a
        labelled voxel."""
        if not self.cases or not any((lab != self.ignore_index).any() for _, lab, _ in self.cases):
            return None
        logits, labels, weights = self._samples(seed)
        t = fit_temperature(logits, labels, weights, per_class=per_class)
        tt = torch.tensor(t) if per_class else t
        before = expected_calibration_error(torch.softmax(logits, 1), labels, weights)
        after = expected_calibration_error(torch.softmax(logits / tt, 1), labels, weights)
        out = {"temperature": t, "ece_before": round(before, 6), "ece_after": round(after, 6),
               "cases": len(self.cases), "voxels": int(weights.sum())}
        if per_class:
            return out
        out.update(self._uncertainty_and_volumes(t))
        return out

    def _uncertainty_and_volumes(self, t: float) -> dict:
        """Mean uncertainty inside the predicted foreground and the volume interval's scales."""
        fg_sum, fg_count = 0.0, 0
        scores: list[list[float]] = [[] for _ in range(self.num_classes - 1)]
        for log_p, label, voxel_ml in self.cases:
            p = torch.softmax(log_p.float() / t, 0)
            fg = p.argmax(0) > 0
            fg_sum += float(normalized_entropy(p)[fg].sum())
            fg_count += int(fg.sum())
            valid = torch.from_numpy(label != self.ignore_index)
            if not bool(valid.all()):  # a partly labelled case says nothing about whole volumes
                continue
            for k in range(1, self.num_classes):
                expected = float(p[k].sum()) * voxel_ml
                true = float((label == k).sum()) * voxel_ml
                if true == 0 and expected < voxel_ml:
                    continue  # the class is absent and predicted absent: no volume to bound
                scores[k - 1].append(abs(true - expected) / volume_band(p[k].numpy(), voxel_ml, expected))
        return {
            "mean_uncertainty_fg": round(fg_sum / fg_count, 6) if fg_count else None,
            "volume_interval": {
                "method": "expected volume ± scale × (V(p>0.1) − V(p>0.9) + 1% of it), split conformal",
                "nominal": NOMINAL,
                "scale": [round(conformal_quantile(s), 4) if s else 1.0 for s in scores],
                "cases": [len(s) for s in scores],
            },
        }


def calibrate_predictions(cases: Iterable[tuple[torch.Tensor, np.ndarray]], num_classes: int, spacing,
                          seed: int = 0) -> dict | None:
    """The ``calibration`` entry from (probabilities (K, Z, Y, X), labels) pairs on a grid of ``spacing`` (mm)."""
    cs = CalibrationSet(num_classes, float(np.prod(spacing)) / 1000.0)
    for probs, label in cases:
        cs.add(probs, label)
    return cs.fit(seed)


def calibrate_domain(net, data, device="cpu", seed: int = 0) -> dict | None:
    """Fit a domain's calibration on ``data.val`` (a :class:`~training.train.trainer.DomainData`):
    the sliding window as the trainer validates, then :meth:`CalibrationSet.fit`."""
    from training.infer.sliding_window import sliding_window

    def predictions():
        for case in data.val:
            image = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float32))
            yield sliding_window(net, data.name, image, data.patch_size, device=device), case.label

    return calibrate_predictions(predictions(), data.meta.num_classes, data.meta.spacing, seed)
