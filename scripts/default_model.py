"""The recipe of the bundled default model (``make model``): data, training, evaluation, export.

One command rebuilds it reproducibly::

    python -m scripts.default_model resources/models/default

1. Training data: synthetic datasets from :mod:`training.data.synth` (seed ``seed``) and random
   deformations of the real MNI152 T1 with its grey/white-matter labels (:mod:`training.data.mni152`).
2. Joint training of every domain (round-robin, :func:`training.train.runs.train_model`) in a
   work folder, with checkpoints, so an interrupted build continues with ``--resume``.
3. Optionally (``--adapt DOMAIN=N``), more synthetic domains taught afterwards on the frozen
   trunk, adapter only (:func:`training.train.adaptation.adapt`, as ``u2net adapt`` does): the other
   domains' weights stay bit-identical, so a domain is added without re-checking the others.
4. Evaluation on held-out cases drawn from seeds never used for training (synthetic: ``seed +
   EVAL_SEED_OFFSET``; MNI152: its separate evaluation stream), with the same inference as
   ``u2net predict``; the Dice figures go into each adapter's provenance and ``evaluation.json``.
5. Export in float16 (half the size on disk) to the output folder, files written atomically.
   Domains named by ``--withhold`` shape the trunk and are evaluated, but their adapters are not
   shipped (below the quality bar); their figures stay in the trunk's provenance.

The MNI152 figures come from ONE subject (the template) under synthetic deformations and
intensity changes: they show that the pipeline handles a real MR's contrast and anatomy, not
how it generalises to other people's brains.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from training.data.mni152 import DOMAIN as BRAIN_DOMAIN
from training.errors import U2NetError

SYNTH_DOMAINS = ["spleen-ct", "kidney-ct", "prostate-mr", "hippocampus-mr"]
EVAL_SEED_OFFSET = 1000
# a shipped domain's held-out mean foreground Dice is at least this (below it: ``--withhold``)
QUALITY_BAR = 0.85


@dataclass
class Recipe:
    """Every setting of the build; all of it is written into the model's provenance."""

    seed: int = 0
    cases: int = 16
    eval_cases: int = 20
    size_scale: float = 0.75
    # per-domain voxel-count scale overriding size_scale (e.g. {"kidney-ct": 1.5}: a finer grid
    # for small organs, whose Dice is limited by partial-volume voxels on the coarse grid)
    domain_size_scale: dict[str, float] = field(default_factory=dict)
    # iterations per round-robin cycle for some domains (default 1): more for the hardest one
    domain_weights: dict[str, int] = field(default_factory=dict)
    mni_resolution_mm: float = 3.0
    iterations: int = 4000
    batch_size: int = 2
    lr: float = 1e-2
    base_channels: int = 16
    levels: int = 4
    patch_size: tuple[int, int, int] | None = None  # one size for all domains; None: each plan's
    max_patch: tuple[int, int, int] = (32, 64, 64)  # caps the plans' patches: CPU-sized iterations
    domains: tuple[str, ...] = tuple(SYNTH_DOMAINS) + (BRAIN_DOMAIN,)
    # synthetic domains added after the joint training, adapter only on the frozen trunk:
    # {domain: iterations}
    adapt: dict[str, int] = field(default_factory=dict)
    # trained with the trunk (they shape it) and evaluated, but not shipped
    withhold: tuple[str, ...] = ()
    device: str = "auto"

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        """The recipe written into a model's provenance (JSON: lists where the fields hold tuples)."""
        d = dict(d)
        for name in ("patch_size", "max_patch", "domains", "withhold"):
            if d.get(name) is not None:
                d[name] = tuple(d[name])
        return cls(**d)

    @property
    def all_domains(self) -> tuple[str, ...]:
        """Every domain with data: the jointly trained ones, then the adapted ones."""
        return self.domains + tuple(self.adapt)


def _log(msg: str) -> None:
    print(f"[default-model {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _dataset_matches(folder: Path, cases: int, size_scale: float | None) -> bool:
    """A complete dataset written before with these settings (``size_scale`` None: not synthetic)."""
    try:
        doc = json.loads((folder / "dataset.json").read_text())
        if int(doc["numTraining"]) != cases:
            return False
        return size_scale is None or float(doc["u2net"]["synth"]["size_scale"]) == float(size_scale)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def size_scale_of(recipe: Recipe, domain: str) -> float:
    return float(recipe.domain_size_scale.get(domain, recipe.size_scale))


def write_domain_dataset(recipe: Recipe, domain: str, role: str, folder: Path, cases: int) -> Path:
    """``cases`` cases of ``domain`` for ``role`` ("train" or "eval") into a new ``folder``.

    Evaluation cases never repeat a training case: synthetic ones come from ``seed +
    EVAL_SEED_OFFSET``, MNI152 ones from the template's separate evaluation stream.
    """
    from training.data.mni152 import write_mni152_dataset
    from training.data.synth import write_dataset

    if domain == BRAIN_DOMAIN:
        write_mni152_dataset(folder, cases=cases, seed=recipe.seed, resolution_mm=recipe.mni_resolution_mm,
                             evaluation=role == "eval")
    else:
        seed = recipe.seed + EVAL_SEED_OFFSET if role == "eval" else recipe.seed
        write_dataset(folder, domain, cases=cases, seed=seed, size_scale=size_scale_of(recipe, domain))
    return folder


def write_datasets(recipe: Recipe, work: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Training and evaluation datasets per domain (reused when already complete)."""
    train, evaluation = {}, {}
    for domain in recipe.all_domains:
        for role, n, out in (("train", recipe.cases, train), ("eval", recipe.eval_cases, evaluation)):
            folder = work / "data" / role / domain
            out[domain] = folder
            scale = None if domain == BRAIN_DOMAIN else size_scale_of(recipe, domain)
            if _dataset_matches(folder, n, scale):
                continue
            if folder.exists():
                shutil.rmtree(folder)  # our own work folder: interrupted, or other settings
            _log(f"writing {role} data for {domain} ({n} cases{'' if scale is None else f', size scale {scale}'})")
            write_domain_dataset(recipe, domain, role, folder, n)
    return train, evaluation


def _domain_data(recipe: Recipe, datasets: dict[str, Path], name: str):
    """A domain's prepared training data, its patch capped at ``recipe.max_patch``."""
    from training.train.runs import domain_from_dataset

    data = domain_from_dataset(datasets[name], name=name, max_val_cases=2)
    data.meta.patch_size = [min(p, m) for p, m in zip(data.meta.patch_size, recipe.max_patch)]
    return data


def _config(recipe: Recipe, iterations: int, domain_weights: dict[str, int] | None = None):
    from training.train.trainer import TrainConfig

    return TrainConfig(
        iterations=iterations,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        patch_size=recipe.patch_size,
        seed=recipe.seed,
        device=recipe.device,
        checkpoint_every=200,
        domain_weights=dict(domain_weights or {}),
    )


def train(recipe: Recipe, datasets: dict[str, Path], model_dir: Path, resume: bool) -> None:
    from training.commands._progress import track_training
    from training.model.network import ArchConfig
    from training.train.runs import train_model
    from training.train.trainer import consume

    config = _config(recipe, recipe.iterations, recipe.domain_weights)
    domains = [_domain_data(recipe, datasets, d) for d in recipe.domains]
    arch = ArchConfig(base_channels=recipe.base_channels, levels=recipe.levels)
    reports = train_model(domains, model_dir, config, None if resume else arch, resume=resume)
    consume(track_training(reports))


def _adapted_on(dst: Path, src: Path) -> dict[str, int] | None:
    """``{domain: iterations}`` of ``dst``'s adapters if ``dst`` holds ``src``'s trunk (None if
    not, or if it is missing or unreadable), from the files' headers."""
    from training.model.layout import model_dir_domains, trunk_hash_of

    try:
        if trunk_hash_of(dst) != trunk_hash_of(src):
            return None
    except Exception:  # noqa: BLE001 - no or a damaged copy: rebuilt, not reused
        return None
    return {d["name"]: d.get("provenance", {}).get("iterations") for d in model_dir_domains(dst)[0]}


def adapt_domains(recipe: Recipe, datasets: dict[str, Path], work: Path, reuse: bool) -> Path:
    """``work/adapted``: the trained model plus ``recipe.adapt``'s domains, each adapter trained
    alone on the frozen trunk. ``reuse``: keep an existing one made on the same trunk with the same
    iterations (``--evaluate-only``); otherwise it is rebuilt from scratch (a partial copy first,
    renamed when complete).
    """
    from training.commands._progress import track_training
    from training.train.adaptation import adapt
    from training.train.runs import WORK_SUBDIR
    from training.train.trainer import consume

    src, dst = work / "model", work / "adapted"
    done = _adapted_on(dst, src) if reuse else None
    if done is not None and {n: done.get(n) for n in recipe.adapt} == recipe.adapt:
        _log(f"reusing {dst} (adapted: {', '.join(recipe.adapt)})")
        return dst
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(WORK_SUBDIR))
    for name, iterations in recipe.adapt.items():
        _log(f"adapting {name}: {iterations} iterations, adapter only, trunk frozen")
        state = work / f"adapt-{name}"
        if state.exists():
            shutil.rmtree(state)
        reports = adapt(tmp, _domain_data(recipe, datasets, name), _config(recipe, iterations), work_dir=state)
        consume(track_training(reports, desc=f"adapt {name}"))
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def evaluate(model_dir: Path, datasets: dict[str, Path], device: str) -> dict[str, dict]:
    from training.model.modelfile import load_model
    from training.train.evaluation import evaluate_dataset

    model = load_model(model_dir)
    results = {}
    for domain, folder in datasets.items():
        _log(f"evaluating {domain}")
        summary = evaluate_dataset(model, folder, domain, device=device)
        results[domain] = {k: summary[k] for k in ("cases", "mean_dice", "mean_dice_per_class")}
        _log(f"{domain}: mean Dice {summary['mean_dice']:.3f} {summary['mean_dice_per_class']}")
    return results


def export(model_dir: Path, out: Path, recipe: Recipe, results: dict, command: str) -> None:
    """float16 copy with the recipe and the held-out Dice in the provenance."""
    from dataclasses import asdict

    from training.io.atomic import atomic_write_bytes
    from training.model.modelfile import load_model, save_model

    model = load_model(model_dir)
    recipe_d = asdict(recipe)
    shipped = {name: meta for name, meta in model.adapters.items() if name not in recipe.withhold}
    withheld = {name: results.get(name) for name in model.adapters if name in recipe.withhold}
    for name, meta in shipped.items():
        meta.provenance = {
            **meta.provenance,
            "recipe": recipe_d,
            "command": command,
            "heldout_evaluation": results.get(name),
        }
        if name == BRAIN_DOMAIN:
            meta.provenance["note"] = (
                "one subject (the MNI152 2009 template) under synthetic deformations: shows the "
                "pipeline on a real MR, not generalisation to other subjects"
            )
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    trunk_prov = {**model.trunk.provenance, "recipe": recipe_d, "command": command}
    if withheld:
        trunk_prov["withheld"] = {"note": "trained with the trunk and evaluated; adapter not shipped",
                                  "heldout_evaluation": withheld}
    save_model(tmp, model.net, shipped, provenance=trunk_prov, dtype="float16")
    figures = {name: r for name, r in results.items() if name in shipped}
    atomic_write_bytes(tmp / "evaluation.json", json.dumps(figures, indent=2).encode())
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _parse_adapt(p: argparse.ArgumentParser, items: list[str], trained: list[str]) -> dict[str, int]:
    """``--adapt DOMAIN=N`` options as ``{domain: N}``; refused (exit 2) before any work is done."""
    from training.data.synth import list_domains

    adapt = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value.isdigit() or int(value) < 1:
            p.error(f"--adapt {item!r}: expected DOMAIN=N with N a positive number of iterations")
        if name not in list_domains():
            p.error(f"--adapt {item!r}: {name!r} is not a synthetic domain ({', '.join(list_domains())})")
        if name in trained or name in adapt:
            p.error(f"--adapt {item!r}: {name!r} is already a domain of this build")
        adapt[name] = int(value)
    return adapt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.default_model", description=__doc__.splitlines()[0])
    p.add_argument("output", type=Path, help="model folder to write (e.g. resources/models/default)")
    p.add_argument("--work", type=Path, default=Path(".cache/default-model"), help="data, checkpoints, logs")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    p.add_argument("--evaluate-only", action="store_true",
                   help="no trunk training: evaluate and export the trained work model (--adapt domains "
                        "are trained only when the work folder has none for this trunk)")
    d = Recipe()
    for field_name in ("seed", "cases", "eval_cases", "iterations", "batch_size", "base_channels", "levels"):
        p.add_argument(f"--{field_name.replace('_', '-')}", type=int, default=getattr(d, field_name))
    p.add_argument("--size-scale", type=float, default=d.size_scale)
    p.add_argument("--domain-size-scale", action="append", default=[], metavar="DOMAIN=SCALE",
                   help="size scale for one synthetic domain (repeatable), e.g. kidney-ct=1.5")
    p.add_argument("--domain-weight", action="append", default=[], metavar="DOMAIN=N",
                   help="train DOMAIN N times per round-robin cycle instead of once (repeatable)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--patch-size", type=int, nargs=3, default=None)
    p.add_argument("--max-patch", type=int, nargs=3, default=list(d.max_patch))
    p.add_argument("--mni-resolution-mm", type=float, default=d.mni_resolution_mm)
    p.add_argument("--device", default=d.device)
    p.add_argument("--domains", nargs="+", default=list(d.domains))
    p.add_argument("--adapt", action="append", default=[], metavar="DOMAIN=N",
                   help="after training, add synthetic DOMAIN with N iterations of adapter-only training on "
                        "the frozen trunk (repeatable)")
    p.add_argument("--withhold", action="append", default=[], metavar="DOMAIN",
                   help="train and evaluate DOMAIN but leave its adapter out of the output (repeatable)")
    args = p.parse_args(argv)
    adapt = _parse_adapt(p, args.adapt, args.domains)
    for name in args.withhold:
        if name not in args.domains:
            p.error(f"--withhold {name!r}: not trained here ({', '.join(args.domains)})")
    if set(args.domains) <= set(args.withhold) and not adapt:
        p.error("--withhold: every domain would be left out; the model would have none")
    domain_scales = {}
    synthetic = [d for d in [*args.domains, *adapt] if d != BRAIN_DOMAIN]
    for item in args.domain_size_scale:
        name, _, value = item.partition("=")
        try:
            scale = float(value)
        except ValueError:
            scale = None
        if scale is None or name not in synthetic:
            p.error(f"--domain-size-scale {item!r}: expected SYNTHETIC_DOMAIN=SCALE with a domain of this "
                    f"build ({', '.join(synthetic)})")
        domain_scales[name] = scale
    from training.train.trainer import domain_cycle, parse_domain_weights

    try:
        domain_weights = parse_domain_weights(args.domain_weight)
        domain_cycle(list(args.domains), domain_weights)  # each weighted domain is one of this build's
    except U2NetError as e:
        p.error(str(e))
    recipe = Recipe(
        seed=args.seed, cases=args.cases, eval_cases=args.eval_cases, size_scale=args.size_scale,
        iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
        base_channels=args.base_channels, levels=args.levels,
        patch_size=tuple(args.patch_size) if args.patch_size else None,
        max_patch=tuple(args.max_patch), mni_resolution_mm=args.mni_resolution_mm,
        domains=tuple(args.domains), device=args.device, domain_size_scale=domain_scales,
        domain_weights=domain_weights, adapt=adapt, withhold=tuple(args.withhold),
    )
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    train_sets, eval_sets = write_datasets(recipe, work)
    model_dir = work / "model"
    if not args.evaluate_only:
        train(recipe, train_sets, model_dir, resume=args.resume)
    if recipe.adapt:
        model_dir = adapt_domains(recipe, train_sets, work, reuse=args.evaluate_only)
    results = evaluate(model_dir, eval_sets, recipe.device)
    command = "python -m scripts.default_model " + " ".join(argv if argv is not None else sys.argv[1:])
    export(model_dir, args.output, recipe, results, command)
    _log(f"model written to {args.output}")
    for name in recipe.withhold:
        _log(f"{name} withheld (not in {args.output}): mean Dice {results[name]['mean_dice']:.3f}")
    print(json.dumps({name: r["mean_dice"] for name, r in results.items() if name not in recipe.withhold}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
