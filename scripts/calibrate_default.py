"""Calibrate the bundled model's domains (``make model``'s last step): temperature scaling and the
volume interval fitted on held-out cases, stored in each adapter's metadata.

    python -m scripts.calibrate_default resources/models/default [--cases 20] [--seed 2000]

The cases come from seeds never used in training (the recipe trains on seed 0 and evaluates on
seed 1000; the benchmark, ``bench/bench_calibration.py``, measures on seed 1000 too, so the fit
and the measurement never share a case): synthetic domains from
:func:`training.data.synth.generate_case` with ``case_seed(seed, i)`` at the recipe's size
scale (what ``u2net synth --seed SEED`` writes), the MNI152 brain from the template's evaluation
stream with ``seed``. Each case is segmented exactly as ``u2net predict`` does (probabilities
on the image's own grid, temperature 1), and :class:`training.train.calibration.CalibrationSet`
fits the temperature and the interval scales.

Only the ``calibration`` entry of each adapter's metadata changes: the file's current metadata
are read from disk just before it is rewritten (another step may have changed other fields),
and the stored weights are written back as they are, bit for bit (checked), with a fresh
checksum.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

FIT_SEED = 2000
MNI_MARGIN_MM = 20.0  # as training.data.mni152.write_mni152_dataset


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def recipe_of(model) -> dict:
    """The build recipe recorded in the model's provenance (size scales, MNI resolution)."""
    for meta in model.adapters.values():
        recipe = meta.provenance.get("recipe")
        if recipe:
            return recipe
    return {}


def heldout_cases(domain: str, seed: int, cases: int, recipe: dict) -> Iterator[tuple]:
    """``cases`` (Volume, labels) of ``domain`` drawn with ``seed``: the synthetic generator at the
    recipe's size scale, or the MNI152 template's evaluation stream."""
    from training.data.mni152 import DOMAIN as BRAIN
    from training.io.volume import Volume

    if domain == BRAIN:
        from training.data.mni152 import TEST_ROLE, case_rng, load_mni152, make_case

        template, labels = load_mni152(float(recipe.get("mni_resolution_mm", 3.0)), MNI_MARGIN_MM)
        for i in range(cases):
            image, lab = make_case(template, labels, case_rng(seed, TEST_ROLE, i))
            yield Volume(image[None].astype(np.float32), template.affine, source=f"mni152:{seed}:{i}"), lab
        return
    from training.data.synth import case_seed, generate_case

    scale = float((recipe.get("domain_size_scale") or {}).get(domain, recipe.get("size_scale", 0.75)))
    for i in range(cases):
        yield generate_case(domain, case_seed(seed, i), scale)


def heldout_probabilities(model, domain: str, seed: int, cases: int, recipe: dict) -> Iterator[tuple]:
    """(volume, probabilities at temperature 1 on the image's grid, labels) per held-out case."""
    from training.infer.pipeline import InferenceConfig, predict

    meta = model.meta(domain)
    saved, meta.calibration = meta.calibration, None  # the network's own probabilities
    try:
        for volume, labels in heldout_cases(domain, seed, cases, recipe):
            result = predict(model, volume, [domain], InferenceConfig(probabilities=True))[domain]
            yield volume, result.maps["probabilities"], labels
    finally:
        meta.calibration = saved


def fit_domain(model, domain: str, seed: int, cases: int, recipe: dict) -> dict:
    """The domain's calibration entry from ``cases`` held-out cases, plus (for the log only) what
    one temperature per class would have given."""
    from training.infer.measure import voxel_volume_ml
    from training.train.calibration import CalibrationSet

    meta = model.meta(domain)
    cs = CalibrationSet(meta.num_classes, sample_per_stratum=200_000)  # offline: a larger sample than training's
    for volume, probs, labels in heldout_probabilities(model, domain, seed, cases, recipe):
        cs.add(probs, labels, voxel_volume_ml(volume.affine))
    entry = cs.fit(seed=seed)
    per_class = cs.fit(seed=seed, per_class=True)
    entry["mean_uncertainty_fg"] = reference_uncertainty(model, domain, entry, seed, cases, recipe)
    _log(f"{domain}: T={entry['temperature']:.3f} ECE {entry['ece_before']:.4f} → {entry['ece_after']:.4f}; "
         f"per class T={[round(t, 3) for t in per_class['temperature']]} ECE → {per_class['ece_after']:.4f}; "
         f"mean fg uncertainty {entry['mean_uncertainty_fg']}; interval scales {entry['volume_interval']['scale']}")
    entry["fitted_on"] = f"{cases} held-out cases, seed {seed} (scripts/calibrate_default.py)"
    entry["per_class_ece_after"] = per_class["ece_after"]
    return entry


def reference_uncertainty(model, domain: str, entry: dict, seed: int, cases: int, recipe: dict) -> float:
    """The mean uncertainty inside the predicted foreground over the held-out cases, measured
    exactly as inference measures it for the "looks unlike" note: on the uncertainty map at the
    image's grid, with the calibration ``entry``."""
    from training.infer.pipeline import InferenceConfig, predict

    meta = model.meta(domain)
    saved, meta.calibration = meta.calibration, entry
    total, count = 0.0, 0
    try:
        for volume, _ in heldout_cases(domain, seed, cases, recipe):
            result = predict(model, volume, [domain], InferenceConfig(uncertainty=True))[domain]
            fg = result.labels > 0
            total += float(result.maps["uncertainty"][fg].sum(dtype=np.float64))
            count += int(fg.sum())
    finally:
        meta.calibration = saved
    return round(total / count, 6) if count else None


def store_calibration(path: Path, entry: dict) -> None:
    """Rewrite one adapter file with ``entry`` as its calibration; nothing else changes."""
    import torch

    from training.model.modelfile import read_weights, tensors_digest, validate_adapter_meta, write_weights

    state, meta = read_weights(path, "adapter")  # read now: never a copy read earlier
    dtypes = {str(t.dtype).removeprefix("torch.") for t in state.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in ("float16", "float32"):
        raise SystemExit(f"{path}: mixed or unexpected weight types {dtypes}")
    before = tensors_digest(state)
    meta = {**meta, "calibration": json.loads(json.dumps(entry))}
    validate_adapter_meta(meta)
    write_weights(path, state, meta, dtype=dtypes.pop())
    state2, meta2 = read_weights(path, "adapter")
    if tensors_digest(state2) != before or not all(torch.equal(state[k], state2[k]) for k in state):
        raise SystemExit(f"{path}: the weights changed while re-saving; restore the file")
    assert meta2["calibration"]["temperature"] == entry["temperature"]


def main(argv: list[str] | None = None) -> int:
    from training.model.layout import adapter_path
    from training.model.modelfile import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--cases", type=int, default=20, help="held-out cases per domain (default 20)")
    p.add_argument("--seed", type=int, default=FIT_SEED, help=f"seed of the held-out cases (default {FIT_SEED})")
    p.add_argument("--domain", action="append", help="only these domains (default: all)")
    p.add_argument("--dry-run", action="store_true", help="fit and print, write nothing")
    p.add_argument("--reference-only", action="store_true",
                   help="keep each domain's stored calibration and measure its mean foreground uncertainty again")
    args = p.parse_args(argv)
    model = load_model(args.model_dir)
    recipe = recipe_of(model)
    for domain in args.domain or model.domains:
        if model.meta(domain).provenance.get("real_scans"):  # no synthetic generator: its own validation fitted it
            _log(f"{domain}: taught on real scans (scripts/real_domains.py); its calibration stays")
            continue
        if args.reference_only:
            entry = dict(model.meta(domain).calibration)
            entry["mean_uncertainty_fg"] = reference_uncertainty(model, domain, entry, args.seed, args.cases, recipe)
            _log(f"{domain}: mean fg uncertainty {entry['mean_uncertainty_fg']}")
        else:
            entry = fit_domain(model, domain, args.seed, args.cases, recipe)
        print(json.dumps({"domain": domain, **entry}), flush=True)
        if not args.dry_run:
            store_calibration(adapter_path(args.model_dir, domain), entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
