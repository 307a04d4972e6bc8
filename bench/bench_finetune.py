"""Fine-tuning a new organ on the CPU: time, and Dice on an unseen volume (full and 5-slice labels).

Runs the fine-tune panel's job (``napari_u2net._finetune_worker.finetune_job``: staging copy,
adapter-only training, best-checkpoint publishing) without Qt, on the synthetic liver CT: labels
of one volume (all slices, then only 5 labelled slices with the "labelled slices" option), Dice on
a second, unseen volume through the real inference path. The base model is the bundled one when
it is installed, else a random trunk (``ArchConfig(8, 3 levels)``) with a kidney CT and a heart MR
adapter: the adapters alone must then do all the learning. Last line: one JSON object.

    python bench/bench_finetune.py [--iterations 300] [--size-scale 0.5] [--patch 16 48 48]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ORGAN = "liver-ct"


def random_base_model(out: Path, patch) -> Path:
    import torch

    from training.model.modelfile import AdapterMeta, make_classes, save_model
    from training.model.network import ArchConfig, DomainConfig, U2Net

    torch.manual_seed(0)
    net = U2Net(ArchConfig(base_channels=8, levels=3), [DomainConfig("kidney-ct", 1, 3), DomainConfig("heart-mr", 1, 2)])
    metas = {
        "kidney-ct": AdapterMeta(
            domain="kidney-ct", modalities=["CT"], classes=make_classes(["background", "kidney", "tumour"]),
            modality="CT", patch_size=list(patch), spacing=[10.0, 6.0, 6.0],
            normalization=[{"scheme": "ct", "clip": [-200.0, 300.0], "mean": 50.0, "std": 80.0}],
        ),
        "heart-mr": AdapterMeta(
            domain="heart-mr", modalities=["MRI"], classes=make_classes(["background", "left-atrium"]),
            modality="MR", patch_size=list(patch), spacing=[10.0, 6.0, 6.0], normalization=[{"scheme": "zscore", "nonzero": False}],
        ),
    }
    save_model(out, net, metas, provenance={"made_by": "bench_finetune (random trunk)"})
    return out


def sparse_labels(lab: np.ndarray, n: int) -> np.ndarray:
    """Only ``n`` slices through the organ labelled (evenly spread), the rest left at 0."""
    rows = np.nonzero(lab.reshape(lab.shape[0], -1).any(1))[0]
    keep = rows[np.linspace(0, len(rows) - 1, n + 2).round().astype(int)[1:-1]]
    out = np.zeros_like(lab)
    out[keep] = lab[keep]
    return out


def finetune(base: Path, target: Path, name: str, labels: np.ndarray, volume, only_labelled: bool, args):
    from napari_u2net import _finetune_worker as fw
    from training.train.trainer import TrainConfig

    pair = fw.TrainingPair("ct1", volume.data, volume.affine, "ct1 labels",
                           fw.prepare_labels(labels, "ct1 labels", only_labelled))
    config = TrainConfig(iterations=args.iterations, lr=args.lr, patch_size=tuple(args.patch), batch_size=2,
                         device="cpu", checkpoint_every=0, val_every=max(10, args.iterations // 10))
    req = fw.FineTuneRequest(base, target, name, [pair], ["background", "liver"], "CT", config=config,
                             only_labelled_slices=only_labelled, threads=args.threads)
    gen = fw.finetune_job(req, threading.Event())
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    try:
        while True:
            r = next(gen)
            if r.iteration % 50 == 0 or r.val_mean is not None:
                val = f"  val Dice {r.val_mean:.3f}" if r.val_mean is not None else ""
                print(f"  {name:<14} {r.iteration:>5}/{args.iterations}  loss {r.loss:.3f}{val}", flush=True)
    except StopIteration as stop:
        result = stop.value
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    fw.publish(result)
    return seconds, cpu, result


def dice_unseen(model_dir: Path, name: str, seeds, scale: float) -> float:
    from training.data.synth import generate_case
    from training.infer.pipeline import InferenceConfig, predict
    from training.model.modelfile import load_model
    from training.train.metrics import dice_per_class

    model = load_model(model_dir)
    scores = []
    for s in seeds:
        volume, truth = generate_case(ORGAN, s, scale)
        pred = predict(model, volume, [name], InferenceConfig(device="cpu"))[name].labels
        scores.append(dice_per_class(pred, (truth > 0).astype(np.uint8), 2)[0])
    return float(np.mean(scores))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--size-scale", type=float, default=0.5)
    parser.add_argument("--patch", type=int, nargs=3, default=[16, 48, 48])
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores - 1)")
    parser.add_argument("--unseen", type=int, default=2, help="unseen volumes to average Dice over")
    args = parser.parse_args()

    from training.data.synth import generate_case
    from training.io.folders import bundled_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    try:
        bundled = bundled_model_dir()
    except FileNotFoundError:
        bundled = None
    if bundled is not None and (bundled / "trunk.safetensors").is_file():
        base, kind = bundled, "bundled"
    else:
        base, kind = random_base_model(tmp / "base", args.patch), "random trunk (no bundled model)"
    volume, truth = generate_case(ORGAN, 1, args.size_scale)
    lab = (truth > 0).astype(np.uint8)
    target = tmp / "user"
    seeds = [100 + i for i in range(args.unseen)]

    print(f"base model: {kind}; volume {volume.shape}; patch {args.patch}; {args.iterations} iterations", flush=True)
    s_full, cpu_full, res_full = finetune(base, target, "liver", lab, volume, False, args)
    d_full = dice_unseen(target, "liver", seeds, args.size_scale)
    s_sparse, cpu_sparse, res_sparse = finetune(base, target, "liver-5slices", sparse_labels(lab, 5), volume, True, args)
    d_sparse = dice_unseen(target, "liver-5slices", seeds, args.size_scale)

    print()
    print(f"{'run':<16}{'wall s':>9}{'CPU s':>9}{'kept':>7}{'Dice unseen':>13}")
    for label, s, c, r, d in (("all slices", s_full, cpu_full, res_full, d_full),
                              ("5 slices", s_sparse, cpu_sparse, res_sparse, d_sparse)):
        kept = "best" if r.chosen_file == r.best_file else "last"
        print(f"{label:<16}{s:>9.1f}{c:>9.1f}{kept:>7}{d:>13.3f}")
    print("goal: Dice ≥ 0.80 (all slices) within 5 min of CPU time; ≥ 0.70 from 5 slices")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({
        "bench": "finetune", "seconds": round(s_full, 1), "cpu_seconds": round(cpu_full, 1),
        "iterations": args.iterations, "dice_unseen": round(d_full, 4), "dice_sparse": round(d_sparse, 4),
        "seconds_sparse": round(s_sparse, 1), "volume": list(volume.shape), "patch": list(args.patch),
        "base": kind,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
