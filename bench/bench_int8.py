"""INT8 and BF16 OpenVINO inference on the CPU against fp32, per shipped domain (issue 19, item 4).

For each domain of the bundled model: its fp32 OpenVINO graph, the same graph quantised to INT8 by
NNCF (``training.infer.quantize``; calibrated on tiles of synthetic cases drawn with
``CALIBRATION_SEED``), and the fp32 graph compiled with BF16 inference precision. Each is run

* through the whole pipeline (``predict``, the OpenVINO backend) on held-out cases — the
  synthetic seed 1000 and the MNI152 evaluation stream of seed 0, as bench_calibration.py — for
  the mean foreground Dice against the truth, and
* on the same fixed tiles (16 of those cases' own sliding-window tiles, batch 1), for
  the speed, the graphs taking turns (best of 5 passes each).

A domain without synthetic cases (``abdomen-ct``) is quantised as a user would, by
``u2net prepare --precision int8``'s code: calibrated on the real patient A's CT and checked on
patient B's, held out, against its labels (skipped without ``../shared/realdata``).

JSON lines (last): ``{"bench": "int8", "domain", "speedup_vs_fp32", "dice_drop", "accepted", …}``
(accepted: Dice drop ≤ 0.005 and speedup ≥ 1.0) and ``{"bench": "bf16", "domain",
"speedup_vs_fp32", "dice_drop", …}``.

    python bench/bench_int8.py                  # 4 held-out cases per domain
    python bench/bench_int8.py --cases 2 --domains spleen-ct
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH_SEED = 1000  # synthetic held-out seed (README, bench_calibration.py)
MNI_BENCH_SEED = 0  # the MNI152 template's evaluation stream
SPEED_TILES = 16
REPEATS = 5


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class _Counted:
    """A compiled graph that counts the runners made from it (the backend asks for one request)."""

    def __init__(self, compiled):
        self.compiled, self.requests = compiled, 0

    def create_infer_request(self):
        self.requests += 1
        return self.compiled.create_infer_request()

    def output(self, i):
        return self.compiled.output(i)


@contextmanager
def graph_in_cache(net, domain: str, patch, compiled):
    """Make the OpenVINO backend's f32 slot run ``compiled`` for this domain (the in-process cache is
    keyed by weights, domain, patch, batch and precision; the CPU's batch is 1): the pipeline then
    runs a quantised graph whatever its check would say (runs themselves take INT8 only once
    ``u2net prepare --precision int8`` accepted it). Fails if the backend did not run it."""
    from training.infer.backends import OPENVINO_CACHE, _weights_key

    counted = _Counted(compiled)
    OPENVINO_CACHE.clear()
    OPENVINO_CACHE.get((_weights_key(net, domain), domain, tuple(int(p) for p in patch), 1, "f32"), lambda: counted)
    try:
        yield
        if counted.requests == 0:
            raise RuntimeError("the OpenVINO backend did not run the graph given to it; update graph_in_cache")
    finally:
        OPENVINO_CACHE.clear()


def mean_dice(model, domain: str, compiled, cases: list) -> float:
    from training.infer.pipeline import InferenceConfig, predict
    from training.train.metrics import dice_per_class, mean_ignoring_nan

    meta = model.meta(domain)
    scores = []
    with graph_in_cache(model.net, domain, meta.patch_size, compiled):
        for volume, truth in cases:
            labels = predict(model, volume, [domain], InferenceConfig(backend="openvino", device="cpu", precision="f32"))[domain].labels
            scores.append(mean_ignoring_nan(dice_per_class(labels, truth, meta.num_classes)))
    return float(np.mean(scores))


def tile_seconds(graphs: dict, tiles: list[np.ndarray]) -> dict[str, float]:
    """Per graph, the best of :data:`REPEATS` passes over ``tiles`` (after a warm-up), the graphs
    taking turns so that a busy machine slows them alike."""
    requests = {k: c.create_infer_request() for k, c in graphs.items()}
    for request in requests.values():
        for t in tiles[:2]:
            request.infer({0: t})
    best = dict.fromkeys(graphs, float("inf"))
    for _ in range(REPEATS):
        for k, request in requests.items():
            t0 = time.perf_counter()
            for t in tiles:
                request.infer({0: t})
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def domain_lines(model, domain: str, n_cases: int, n_calibration: int) -> list[dict]:
    from training.data.mni152 import DOMAIN as BRAIN
    from training.infer import quantize as q

    meta = model.meta(domain)
    t0 = time.perf_counter()
    seed = MNI_BENCH_SEED if domain == BRAIN else BENCH_SEED
    cases = list(q.synthetic_cases(domain, seed, n_cases, q.recipe_of(model)))
    tiles = []
    for volume, _ in cases:
        tiles.extend(q.tiles_of(q.network_input(volume, meta), meta.patch_size))
    step = max(1, len(tiles) // SPEED_TILES)
    tiles = tiles[::step][:SPEED_TILES]
    patches = q.calibration_patches(model, domain, n_calibration)
    fp32 = q.convert_domain(model.net, domain, meta.patch_size, 1)
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: not among the JSON lines
        int8 = q.quantize_openvino(fp32, patches)
    quantize_s = time.perf_counter() - t
    graphs = {"f32": q.compile_for_cpu(fp32), "int8": q.compile_for_cpu(int8), "bf16": q.compile_for_cpu(fp32, "bf16")}
    seconds = tile_seconds(graphs, tiles)
    dice = {k: mean_dice(model, domain, c, cases) for k, c in graphs.items()}
    _log(f"{domain}: {len(patches)} calibration tiles, quantised in {quantize_s:.1f} s; "
         f"{len(tiles)} tiles: {seconds}; Dice on {n_cases} cases: {dice} ({time.perf_counter() - t0:.0f} s)")
    common = {"domain": domain, "cases": n_cases, "dice_fp32": round(dice["f32"], 4)}
    lines = []
    for kind in ("int8", "bf16"):
        speedup = seconds["f32"] / seconds[kind]
        drop = dice["f32"] - dice[kind]
        line = {"bench": kind, **common, "speedup_vs_fp32": round(speedup, 2), "dice_drop": round(drop, 4),
                f"dice_{kind}": round(dice[kind], 4), "tile_ms_fp32": round(1000 * seconds["f32"] / len(tiles), 1),
                f"tile_ms_{kind}": round(1000 * seconds[kind] / len(tiles), 1)}
        if kind == "int8":
            line["accepted"] = bool(drop <= q.MAX_DICE_DROP and speedup >= 1.0)
            line["calibration_tiles"] = len(patches)
            line["quantize_s"] = round(quantize_s, 1)
        lines.append(line)
    return lines


def real_lines(model, domain: str) -> list[dict]:
    """A domain without synthetic cases (``abdomen-ct``) as a user quantises it:
    ``prepare_domain(precision="int8")`` calibrated on patient A's CT and checked on patient B's
    (held out, with its labels), in a cache folder of its own. The figures are the check's: Dice of
    the whole scan on the network's grid, each class's usual components kept."""
    import os
    import tempfile

    from bench_real import ORGANS, REAL, SCANS, load

    from training.infer.prepare import prepare_domain
    from training.io.volume import Volume

    if not REAL.is_dir():
        _log(f"{domain}: skipped: no real data ({REAL})")
        return []
    scans = {s.name: s for s in SCANS}
    image_a, _ = load(scans["ct_patient_a"])
    image_b, labels_b = load(scans["ct_patient_b"])
    truth = np.zeros(labels_b.shape, np.uint8)
    for value, name in enumerate(model.meta(domain).class_names[1:], start=1):
        organ = ORGANS.get(name.replace(" ", "_"))
        if organ is not None:
            truth[labels_b == organ] = value
    old = os.environ.get("U2NET_HOME")
    with tempfile.TemporaryDirectory() as home:
        os.environ["U2NET_HOME"] = home
        try:
            with contextlib.redirect_stdout(sys.stderr):
                done = prepare_domain(model, domain, precision="int8", calibration=[image_a, image_b],
                                      truth=Volume(truth[None], image_b.affine, source="ct_patient_b labels"))
        finally:
            if old is None:
                os.environ.pop("U2NET_HOME", None)
            else:
                os.environ["U2NET_HOME"] = old
    v = done.verdict
    _log(f"{domain}: {v['why']} ({done.seconds:.0f} s)")
    return [{"bench": "int8", "domain": domain, "scan": "ct_patient_b", "calibrated_on": "ct_patient_a",
             "dice_fp32": v["dice_f32"], "dice_int8": v["dice_int8"], "dice_drop": v["drop"],
             "speedup_vs_fp32": v["speedup"], "accepted": v["accepted"], "scope": "prepare's check"}]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=4, help="held-out cases per domain (default 4)")
    p.add_argument("--calibration", type=int, default=64, help="calibration tiles per domain (default 64)")
    p.add_argument("--domains", help="comma-separated (default: every domain of the bundled model)")
    args = p.parse_args()

    from training.infer.backends import openvino_available
    from training.infer.quantize import nncf_available

    if not (openvino_available() and nncf_available()):
        print("skipped: int8 (OpenVINO and NNCF are not installed: pip install napari-u2net[openvino])")
        return 0
    import logging

    logging.getLogger("nncf").setLevel(logging.ERROR)
    from training.io.folders import bundled_model_dir
    from training.model.modelfile import load_model

    model = load_model(bundled_model_dir())
    domains = args.domains.split(",") if args.domains else model.domains
    lines = []
    from training.infer.prepare import has_synthetic_cases

    for domain in domains:
        if has_synthetic_cases(domain):
            lines.extend(domain_lines(model, domain, args.cases, args.calibration))
        else:
            lines.extend(real_lines(model, domain))
    print(f"\n{'domain':<16} {'kind':<5} {'speedup':>8} {'Dice fp32':>10} {'drop':>8}  accepted")
    for line in lines:
        print(f"{line['domain']:<16} {line['bench']:<5} {line['speedup_vs_fp32']:>7.2f}× {line['dice_fp32']:>10.4f} "
              f"{line['dice_drop']:>8.4f}  {line.get('accepted', '')}")
    for line in lines:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
