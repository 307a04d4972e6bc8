"""The training loop: round-robin multi-domain training of given parameters (a whole model, or one adapter).

One iteration = one single-domain batch (domains take turns), as in the paper. The loop is a
generator of :class:`TrainReport` and draws nothing: the CLI turns the reports into a progress
bar (:mod:`training.commands._progress`) and the GUI into a curve, and either can stop it between
iterations (``stop``: a callable or a ``threading.Event``).

Reproducibility: the sampling and augmentation draws of iteration *i* on rank *r* come from a
generator seeded by (seed, r, i); with the optimizer state and weights in the checkpoint, a
resumed run ends with exactly the weights of an uninterrupted one (CPU, deterministic kernels).

Multi-GPU: under ``torchrun`` the network is wrapped in DistributedDataParallel with
``find_unused_parameters=True`` (each iteration uses one domain's adapter only). Gradients of
the other adapters stay ``None``, so AdamW/SGD leave them untouched (no decay, no momentum).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.errors import Cancelled, U2NetError, is_cancelled
from training.infer.config import InferenceConfig
from training.model.modelfile import AdapterMeta
from training.model.network import U2Net
from training.train.augment import augment_batch
from training.train.checkpoint import STATE_FILE, load_state, rng_state, save_state, set_rng_state
from training.train.config import TrainConfig
from training.train.distributed import DistInfo, barrier, broadcast_flag
from training.train.losses import make_loss
from training.train.metrics import dice_per_class, mean_ignoring_nan
from training.train.sampling import PatchSampler

LOG_FILE = "log.csv"


@dataclass
class TrainReport:
    """One finished iteration (``val_dice``: {domain: {class: Dice}} when it validated)."""

    iteration: int  # 1-based count of finished iterations
    domain: str
    loss: float
    lr: float
    seconds: float  # this iteration's wall time
    eta_s: float
    val_dice: dict | None = None
    val_mean: float | None = None  # mean foreground Dice over the validated domains
    iterations: int = 0  # total planned
    weights_hash: str | None = None  # last report under torchrun: this rank's weights (all agree)


@dataclass
class DomainData:
    """A domain to train: its metadata (classes, spacing, normalisation…) and its cases.

    Cases are objects with ``image`` (C, Z, Y, X) float32 normalised and ``label`` (Z, Y, X)
    integer arrays (e.g. :class:`training.train.sampling.ArrayCase` or a preprocessed case).
    """

    meta: AdapterMeta
    train: list
    val: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.meta.domain

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(p) for p in self.meta.patch_size)


def parse_domain_weights(items: list[str]) -> dict[str, int]:
    """``["kidney-ct=3", …]`` (the command lines' ``--domain-weight``) as ``{name: weight}``."""
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.isdigit() or int(value) < 1:
            raise U2NetError(f"--domain-weight {item!r}: expected DOMAIN=N with a whole number N ≥ 1, "
                             "e.g. kidney-ct=3")
        weights[name] = int(value)
    return weights


def domain_cycle(names: list[str], weights: dict[str, int]) -> list[str]:
    """One round-robin cycle in which each domain comes ``weights.get(name, 1)`` times, spread
    evenly (smooth weighted round-robin), so a weighted domain never gets long runs of turns."""
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise U2NetError(f"domain weight for {', '.join(map(repr, unknown))}, which is not trained here "
                         f"(domains: {', '.join(names)})")
    w = [int(weights.get(n, 1)) for n in names]
    credit = [0] * len(names)
    cycle = []
    for _ in range(sum(w)):
        credit = [c + x for c, x in zip(credit, w)]
        k = max(range(len(names)), key=lambda i: credit[i])  # first of the largest: deterministic
        credit[k] -= sum(w)
        cycle.append(names[k])
    return cycle


def iteration_generator(seed: int, rank: int, iteration: int) -> torch.Generator:
    """A CPU generator that depends on (seed, rank, iteration) only."""
    s = np.random.SeedSequence([int(seed), int(rank), int(iteration)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))


def lr_at(config: TrainConfig, iteration: int) -> float:
    t = iteration / config.iterations
    if config.schedule == "poly":
        return config.lr * (1 - t) ** 0.9
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * t))
    return config.lr


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=True,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


@torch.no_grad()
def validate(net: U2Net, data: DomainData, device: torch.device, overlap: float = InferenceConfig.overlap,
             keep=None) -> dict:
    """Per-class Dice over the validation cases (sliding window with inference's overlap, so the
    figure is what ``predict`` would score). ``keep``: a
    :class:`~training.train.calibration.CalibrationSet` that gets each case's probabilities."""
    from training.infer.sliding_window import sliding_window

    names = data.meta.class_names[1:]
    scores = []
    for case in data.val:
        image = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float32))
        probs = sliding_window(net, data.name, image, data.patch_size, overlap=overlap, device=device,
                               copy_for_speed=False)  # no copy of every adapter per validation
        pred = probs.argmax(0).numpy()
        if keep is not None:
            keep.add(probs, np.asarray(case.label))
        scores.append(dice_per_class(pred, np.asarray(case.label), data.meta.num_classes))
    if not scores:
        return {}
    return {n: mean_ignoring_nan([s[i] for s in scores]) for i, n in enumerate(names)}


def trained_state(net: U2Net, prefixes: list[str]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if k.startswith(tuple(prefixes))}


class TrainLog:
    """``log.csv``: one row per finished iteration (rank 0 only; None ``path``: no log)."""

    HEADER = ("iteration", "domain", "loss", "lr", "seconds", "val_mean")

    def __init__(self, path: Path | None, append: bool):
        self.path = path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if not append or not path.exists():  # a resumed run continues its own log
            path.write_text(",".join(self.HEADER) + "\n")

    def write(self, r: TrainReport) -> None:
        if self.path is None:
            return
        val_text = "" if r.val_mean is None else f"{r.val_mean:.4f}"
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([r.iteration, r.domain, f"{r.loss:.6f}", f"{r.lr:.3e}", f"{r.seconds:.3f}",
                                    val_text])


class _EtaClock:
    """Remaining time from the mean of the last ``window`` iterations (the first ones are slow)."""

    def __init__(self, total: int, window: int = 20):
        self.total, self.window, self.recent = total, window, []

    def eta(self, seconds: float, done: int) -> float:
        self.recent = (self.recent + [seconds])[-self.window:]
        return float(np.mean(self.recent)) * (self.total - done)


class _Trainer:
    """One run's moving parts (optimizer, scaler, samplers…) and the steps of an iteration."""

    def __init__(self, net: U2Net, domains: list[DomainData], config: TrainConfig, params, prefixes,
                 write_model, work_dir: Path | None, dist: DistInfo):
        self.net, self.domains, self.config, self.params, self.prefixes = net, domains, config, params, prefixes
        self.write_model, self.dist, self.device = write_model, dist, dist.device
        _set_cudnn(config.deterministic)
        net.to(self.device)
        self.loss_fn = make_loss(config.loss, config.ignore_index)
        self.by_name = {d.name: d for d in domains}
        self.cycle = domain_cycle([d.name for d in domains], config.domain_weights)
        self.samplers = {}
        for d in domains:
            if not d.train:
                raise U2NetError(f"domain {d.name!r} has no training cases")
            patch = config.patch_size or d.patch_size
            self.samplers[d.name] = PatchSampler(d.train, patch, config.fg_fraction, config.ignore_index)
        self.optimizer = make_optimizer(params, config)
        self.use_amp = config.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.state_path = Path(work_dir) / STATE_FILE if work_dir is not None else None
        self.model = net  # the DDP wrapper under torchrun, after _resume (see _wrap)
        self.calibration: dict = {}  # {domain: its calibration entry}, fitted at each validation

    def resume(self) -> int:
        """Weights, optimizer, scaler and RNG states from ``state.pt``; the iterations already done."""
        config, state_path = self.config, self.state_path
        if state_path is None:
            raise U2NetError("resume needs a work directory holding the training state")
        st = load_state(state_path)
        missing = set(trained_state(self.net, self.prefixes)) - set(st["weights"])
        if missing:
            raise U2NetError(f"{state_path}: training state does not match this model "
                             f"({sorted(missing)[:2]} missing); start without --resume")
        self.net.load_state_dict({k: v.to(self.device) for k, v in st["weights"].items()}, strict=False)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        set_rng_state(st["rng"])
        start = int(st["iteration"])
        if start >= config.iterations:
            raise U2NetError(
                f"{state_path}: this run already finished {start} iterations; "
                "ask for more with --iterations to continue it"
            )
        return start

    def wrap(self) -> None:
        """Under torchrun: DistributedDataParallel (unused adapters are normal, see the module doc)."""
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=ids, find_unused_parameters=True)

    def train_step(self, it: int) -> tuple[str, float, float]:
        """Iteration ``it`` (0-based): one batch of its domain, one optimizer step; (domain, loss, lr)."""
        config, device, optimizer, scaler = self.config, self.device, self.optimizer, self.scaler
        d = self.by_name[self.cycle[it % len(self.cycle)]]
        g = iteration_generator(config.seed, self.dist.rank, it)
        image, label = self.samplers[d.name].sample(config.batch_size, g)
        image, label = augment_batch(image.to(device), label.to(device), config.augment, g)
        lr = lr_at(config, it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            logits = self.model(image, d.name)
        loss = self.loss_fn(logits.float(), label)
        if not torch.isfinite(loss):
            raise U2NetError(
                f"loss became {loss.item()} at iteration {it + 1} (domain {d.name!r}); "
                "lower the learning rate (--lr) or check the labels"
            )
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = [p for p in self.params if p.grad is not None]
        if config.grad_clip and grads:
            torch.nn.utils.clip_grad_norm_(grads, config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return d.name, float(loss.item()), lr

    def validate(self, done: int) -> dict | None:
        """{domain: {class: Dice}} when ``done`` is a validation point (rank 0, domains with val cases)."""
        config = self.config
        if not (_due(done, config.val_every) or done == config.iterations):
            return None
        if not self.dist.is_main or not any(x.val for x in self.domains):
            return None
        from training.train.calibration import CalibrationSet

        self.net.eval()
        out = {}
        for x in self.domains:
            if x.val:  # the validation's probabilities also fit the domain's temperature
                kept = CalibrationSet(x.meta.num_classes, float(np.prod(x.meta.spacing)) / 1000.0,
                                      config.ignore_index)
                out[x.name] = validate(self.net, x, self.device, keep=kept)
                self.calibration[x.name] = kept.fit(seed=config.seed)
        return out

    def checkpoint_due(self, done: int) -> bool:
        return _due(done, self.config.checkpoint_every) or done == self.config.iterations

    def checkpoint(self, iteration: int, metrics: dict) -> None:
        """Model files and (with a work directory) ``state.pt`` on rank 0; then every rank waits."""
        if self.dist.is_main:
            self.write_model(self.net, iteration, metrics)
            if self.state_path is not None:
                save_state(self.state_path, {
                    "iteration": iteration,
                    "weights": trained_state(self.net, self.prefixes),
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": rng_state(),
                    "config": _plain(self.config.to_dict()),
                })
        barrier(self.dist)


def _set_cudnn(deterministic: bool) -> None:
    """Deterministic kernels on request (resume-exact on GPU); otherwise cuDNN picks the fastest."""
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def _due(done: int, every: int) -> bool:
    """Whether a periodic event (``every`` iterations, 0 = never) falls on iteration ``done``."""
    return bool(every) and done % every == 0


def run_training(
    net: U2Net,
    domains: list[DomainData],
    config: TrainConfig,
    *,
    params: list[torch.nn.Parameter],
    prefixes: list[str],
    write_model: Callable[[U2Net, int, dict], None],
    work_dir: Path | None = None,
    dist: DistInfo | None = None,
    resume: bool = False,
    stop=None,
) -> Iterator[TrainReport]:
    """Train ``params`` of ``net`` on ``domains``; yields a report per iteration.

    ``prefixes`` name the state-dict entries that are trained (and checkpointed);
    ``write_model(net, iteration, metrics)`` writes the model files (called on rank 0 at each checkpoint,
    at the end and when stopped). ``work_dir`` holds ``state.pt`` and ``log.csv`` (None: no
    checkpoint state, no log: e.g. a short fine-tune from the GUI).
    """
    if dist is None:
        from training.io.devices import resolve_device

        dist = DistInfo(device=resolve_device(config.device))
    trainer = _Trainer(net, domains, config, params, prefixes, write_model, work_dir, dist)
    start = trainer.resume() if resume else 0
    trainer.wrap()
    log = TrainLog(Path(work_dir) / LOG_FILE if work_dir is not None and dist.is_main else None, append=resume)
    clock = _EtaClock(config.iterations)
    metrics: dict = {}  # the last validation's, written with every checkpoint
    for it in range(start, config.iterations):
        if broadcast_flag(dist, is_cancelled(stop) if dist.is_main else False):
            trainer.checkpoint(it, metrics)
            return
        t0 = time.perf_counter()
        domain, loss, lr = trainer.train_step(it)
        done = it + 1
        val = trainer.validate(done)
        if val is not None:
            metrics = {"val_dice": val, "val_mean": _mean_val(val), "iteration": done,
                       "calibration": dict(trainer.calibration)}
        if trainer.checkpoint_due(done):
            trainer.checkpoint(done, metrics)
        seconds = time.perf_counter() - t0
        report = TrainReport(done, domain, loss, lr, seconds, clock.eta(seconds, done), val,
                             _mean_val(val) if val else None, config.iterations)
        if dist.enabled and done == config.iterations:
            from training.model.modelfile import weights_hash

            report.weights_hash = weights_hash(net.state_dict())
        log.write(report)
        yield report


def _mean_val(val: dict) -> float:
    return mean_ignoring_nan([v for per in val.values() for v in per.values()])


def _plain(d):
    """Only JSON-like values (weights_only loading accepts nothing else)."""
    if isinstance(d, dict):
        return {str(k): _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d if isinstance(d, (int, float, str, bool, type(None))) else str(d)


def consume(reports: Iterator[TrainReport]) -> TrainReport | None:
    """Run a report generator to its end; its last report (None if it yielded none).

    Drawing progress is the caller's (the CLI wraps ``reports`` in
    :func:`training.commands._progress.track_training`); the core only reports.
    """
    last = None
    for last in reports:
        pass
    return last


__all__ = ["Cancelled", "DomainData", "TrainConfig", "TrainReport", "run_training", "validate"]
