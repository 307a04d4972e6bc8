"""The training loop: round-robin multi-domain training, and adapter-only adaptation.

One iteration = one single-domain batch (domains take turns), as in the paper. The loop is a
generator of :class:`TrainReport` so that the CLI can draw a progress bar and the GUI a curve,
and either can stop it between iterations (``stop``: a callable or a ``threading.Event``).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.errors import Cancelled, U2NetError, is_cancelled
from training.io.volume import IGNORE_INDEX
from training.model.modelfile import AdapterMeta
from training.model.network import U2Net
from training.train.augment import AugmentConfig, augment_batch
from training.train.checkpoint import STATE_FILE, load_state, rng_state, save_state, set_rng_state
from training.train.distributed import DistInfo, barrier, broadcast_flag
from training.train.losses import make_loss
from training.train.metrics import dice_per_class, mean_ignoring_nan
from training.train.sampling import PatchSampler

LOG_FILE = "log.csv"


@dataclass
class TrainConfig:
    """Everything that shapes a training run (the CLI maps its options onto this)."""

    iterations: int = 1000
    patch_size: tuple[int, int, int] | None = None  # None: each domain's own (from its plan)
    batch_size: int = 2
    lr: float = 1e-2  # AdamW and SGD alike (what the tests and CLI use)
    weight_decay: float = 3e-5
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.99  # sgd (Nesterov)
    schedule: str = "poly"  # poly | cosine | constant
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
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # iterations per round-robin cycle for some domains (default 1 each): more for a hard one
    domain_weights: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise U2NetError(f"iterations must be ≥ 1, got {self.iterations}")
        if self.batch_size < 1:
            raise U2NetError(f"batch size must be ≥ 1, got {self.batch_size}")
        if self.optimizer not in ("adamw", "sgd"):
            raise U2NetError(f"unknown optimizer {self.optimizer!r}; use adamw or sgd")
        if self.schedule not in ("poly", "cosine", "constant"):
            raise U2NetError(f"unknown schedule {self.schedule!r}; use poly, cosine or constant")
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
def validate(net: U2Net, data: DomainData, device: torch.device, overlap: float = 0.5) -> dict:
    """Per-class Dice over the validation cases (sliding window, as at inference)."""
    from training.infer.sliding_window import sliding_window

    names = data.meta.class_names[1:]
    scores = []
    for case in data.val:
        image = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float32))
        probs = sliding_window(net, data.name, image, data.patch_size, overlap=overlap, device=device,
                               copy_for_speed=False)  # no copy of every adapter per validation
        pred = probs.argmax(0).numpy()
        scores.append(dice_per_class(pred, np.asarray(case.label), data.meta.num_classes))
    if not scores:
        return {}
    return {n: mean_ignoring_nan([s[i] for s in scores]) for i, n in enumerate(names)}


def trained_state(net: U2Net, prefixes: list[str]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if k.startswith(tuple(prefixes))}


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
    device = dist.device
    if config.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    net.to(device)
    loss_fn = make_loss(config.loss, config.ignore_index)
    by_name = {d.name: d for d in domains}
    cycle = domain_cycle([d.name for d in domains], config.domain_weights)
    samplers = {}
    for d in domains:
        if not d.train:
            raise U2NetError(f"domain {d.name!r} has no training cases")
        patch = config.patch_size or d.patch_size
        samplers[d.name] = PatchSampler(d.train, patch, config.fg_fraction, config.ignore_index)
    optimizer = make_optimizer(params, config)
    use_amp = config.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    start = 0
    state_path = Path(work_dir) / STATE_FILE if work_dir is not None else None
    if resume:
        if state_path is None:
            raise U2NetError("resume needs a work directory holding the training state")
        st = load_state(state_path)
        missing = set(trained_state(net, prefixes)) - set(st["weights"])
        if missing:
            raise U2NetError(f"{state_path}: training state does not match this model "
                             f"({sorted(missing)[:2]} missing); start without --resume")
        net.load_state_dict({k: v.to(device) for k, v in st["weights"].items()}, strict=False)
        optimizer.load_state_dict(st["optimizer"])
        scaler.load_state_dict(st["scaler"])
        set_rng_state(st["rng"])
        start = int(st["iteration"])
        if start >= config.iterations:
            raise U2NetError(
                f"{state_path}: this run already finished {start} iterations; "
                "ask for more with --iterations to continue it"
            )

    model = net
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(net, device_ids=ids, find_unused_parameters=True)

    log_path = Path(work_dir) / LOG_FILE if work_dir is not None and dist.is_main else None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if not resume or not log_path.exists():
            log_path.write_text("iteration,domain,loss,lr,seconds,val_mean\n")

    def checkpoint(iteration: int, metrics: dict) -> None:
        if not dist.is_main:
            return
        write_model(net, iteration, metrics)
        if state_path is not None:
            save_state(state_path, {
                "iteration": iteration,
                "weights": trained_state(net, prefixes),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_state(),
                "config": _plain(config.to_dict()),
            })

    metrics: dict = {}
    recent: list[float] = []
    for it in range(start, config.iterations):
        if broadcast_flag(dist, is_cancelled(stop) if dist.is_main else False):
            checkpoint(it, metrics)
            barrier(dist)
            return
        t0 = time.perf_counter()
        d = by_name[cycle[it % len(cycle)]]
        g = iteration_generator(config.seed, dist.rank, it)
        image, label = samplers[d.name].sample(config.batch_size, g)
        image, label = augment_batch(image.to(device), label.to(device), config.augment, g)
        lr = lr_at(config, it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            logits = model(image, d.name)
        loss = loss_fn(logits.float(), label)
        if not torch.isfinite(loss):
            raise U2NetError(
                f"loss became {loss.item()} at iteration {it + 1} (domain {d.name!r}); "
                "lower the learning rate (--lr) or check the labels"
            )
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = [p for p in params if p.grad is not None]
        if config.grad_clip and grads:
            torch.nn.utils.clip_grad_norm_(grads, config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        done = it + 1

        val = None
        if (config.val_every and done % config.val_every == 0) or done == config.iterations:
            if dist.is_main and any(x.val for x in domains):
                net.eval()
                val = {x.name: validate(net, x, device) for x in domains if x.val}
                metrics = {"val_dice": val, "val_mean": _mean_val(val), "iteration": done}
        if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.iterations:
            checkpoint(done, metrics)
            barrier(dist)
        seconds = time.perf_counter() - t0
        recent = (recent + [seconds])[-20:]
        eta = float(np.mean(recent)) * (config.iterations - done)
        report = TrainReport(done, d.name, float(loss.item()), lr, seconds, eta, val,
                             _mean_val(val) if val else None, config.iterations)
        if dist.enabled and done == config.iterations:
            from training.model.modelfile import weights_hash

            report.weights_hash = weights_hash(net.state_dict())
        if log_path is not None:
            with log_path.open("a", newline="") as f:
                val_text = "" if report.val_mean is None else f"{report.val_mean:.4f}"
                csv.writer(f).writerow([done, d.name, f"{report.loss:.6f}", f"{lr:.3e}", f"{seconds:.3f}", val_text])
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


def consume(reports: Iterator[TrainReport], progress: bool = False, is_main: bool = True
            ) -> TrainReport | None:
    """Run a report generator to its end (optionally with a tqdm-free text progress bar)."""
    last = None
    for last in reports:
        if progress and is_main:
            _draw(last)
    if progress and is_main and last is not None:
        print(flush=True)
    return last


def _draw(r: TrainReport) -> None:
    import sys

    n = r.iterations or r.iteration
    width = 30
    filled = int(width * r.iteration / n)
    val = f" val Dice {r.val_mean:.3f}" if r.val_mean is not None else ""
    eta = time.strftime("%H:%M:%S", time.gmtime(r.eta_s))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {r.iteration}/{n} {r.domain} "
                     f"loss {r.loss:.4f} lr {r.lr:.2e} eta {eta}{val}   ")
    if r.val_mean is not None:
        sys.stderr.write("\n")
    sys.stderr.flush()


__all__ = ["TrainConfig", "TrainReport", "DomainData", "run_training", "validate", "Cancelled"]
