"""End to end on a CT-sized scan: our pipeline per backend against the same job done with MONAI
(issue 19, item 6).

The scan: a synthetic spleen CT (``generate_case``, seed 1000's stream, finer than the training
grid) resampled onto a 300×512×512 grid of 0.8 mm voxels (air outside the phantom), stored like
DICOM-derived files (axes running posterior and left), written as int16 ``.nii.gz``. The job:
the bundled model's ``spleen-ct`` domain (6.4×3.7×3.7 mm grid, patch 32×64×64), labels written
as ``.nii.gz`` on the scan's grid.

* **Ours, end to end**: ``predict_files`` (what ``u2net predict`` runs: model load, read,
  reorient, resample, normalise, sliding window, resample back, argmax, largest component,
  atomic write), one fresh process per backend; compiled graphs are prepared beforehand in
  another process (a warm on-disk cache, as every run after a domain's first).
* **Ours, by stage**: the same steps called one by one from the same functions, in another fresh
  process, timing each: read, reorient+resample, normalise, network, resample back, argmax,
  post-process, write.
* **MONAI**, the way its tutorials do it: ``LoadImaged → EnsureChannelFirstd → Orientationd(RAS)
  → Spacingd(bilinear) → ScaleIntensityRanged`` (set to exactly our clip-and-z-score) →
  ``sliding_window_inference`` (Gaussian, overlap 0.5, batch 1, the same weights: our network
  with its domain fixed, axes permuted to the canonical order it was trained on) → ``Invertd``
  (bilinear on the probabilities) → ``AsDiscreted(argmax)`` → ``KeepLargestConnectedComponentd``
  → ``SaveImaged``, timed per transform, in a fresh process.

Peak memory: ``ru_maxrss`` of each pipeline's own process (everything it held, imports
included: ``peak_mb``) and the same less the process's resident memory once the imports were done
(``above_start_mb``). Seconds exclude the imports (MONAI's take longer) and
include loading the model; ``cpu_s`` (user + system, all threads) is what each cost in CPU time,
which another job sharing the machine disturbs less than the wall clock. Our labels and MONAI's are compared (Dice) as a check that both did
the same job.

    python bench/bench_e2e.py            # the CT-sized scan (many minutes on 2 busy cores)
    python bench/bench_e2e.py --small    # 96×256×256 at 1.25 mm, for trying things out

JSON lines (last): ``{"bench": "e2e_stage", "backend", "stage", "seconds"}`` (backend "monai"
for MONAI's stages) and ``{"bench": "default_path", "backend", "speedup_vs_monai",
"end_to_end_s", "monai_s", "peak_mb", "monai_peak_mb", …}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOMAIN = "spleen-ct"
SHAPE, SPACING = (300, 512, 512), 0.8
SMALL_SHAPE, SMALL_SPACING = (96, 256, 256), 1.25
PHANTOM_SEED, PHANTOM_SCALE = 1000, 1.5  # a held-out seed; 1.5: ~3.3 × 1.9 mm before upsampling
OVERLAP = 0.5
STAGES = ("read", "reorient_resample", "normalise", "network", "resample_back", "argmax", "postprocess", "write")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """CPU seconds of this process, all threads: what the work cost, whoever else shares the CPU."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- the scan -----------------------------------------------------------------------------------
def make_scan(path: Path, shape, spacing: float) -> dict:
    """A synthetic spleen CT on a ``shape`` grid of ``spacing`` mm voxels, written to ``path``;
    returns its description."""
    import SimpleITK as sitk

    from training.data.synth import case_seed, generate_case
    from training.io.volume import from_sitk, to_sitk, write_nifti

    volume, _ = generate_case(DOMAIN, case_seed(PHANTOM_SEED, 0), PHANTOM_SCALE)
    affine = volume.affine
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    centre = affine[:3, :3] @ ((np.array(volume.shape) - 1) / 2) + affine[:3, 3]
    target = np.eye(4)
    target[:3, :3] = directions * spacing
    target[:3, 3] = centre - target[:3, :3] @ ((np.array(shape) - 1) / 2)
    ref = to_sitk(np.zeros((1, 1, 1), np.uint8), target)
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in reversed(shape)])
    f.SetOutputOrigin(ref.GetOrigin())
    f.SetOutputSpacing(ref.GetSpacing())
    f.SetOutputDirection(ref.GetDirection())
    f.SetInterpolator(sitk.sitkLinear)
    f.SetDefaultPixelValue(-1000.0)  # air around the phantom's field of view
    data, _ = from_sitk(f.Execute(to_sitk(volume.data[0].astype(np.float32), affine)))
    data = np.rint(data).astype(np.int16)
    write_nifti(path, data, target)
    return {"shape": list(shape), "spacing_mm": spacing, "phantom_shape": list(volume.shape),
            "megavoxels": round(float(np.prod(shape)) / 1e6, 1), "file_mb": round(path.stat().st_size / 2**20, 1)}


# -- workers (each in a fresh process; print one JSON line) ---------------------------------------
def _model():
    from training.io.folders import bundled_model_dir
    from training.model.modelfile import load_model

    return load_model(bundled_model_dir(), domains=[DOMAIN])


def ours_worker(image: Path, out: Path, backend: str) -> dict:
    """``predict_files``, what ``u2net predict`` runs."""
    from training.infer.pipeline import InferenceConfig, predict_files

    start_mb, c0 = rss_mb(), cpu_s()
    t0 = time.perf_counter()
    model = _model()
    prediction = predict_files([image], [DOMAIN], out, model, InferenceConfig(backend=backend, device="cpu"))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cpu_s": cpu_s() - c0, "peak_mb": peak_mb(), "start_mb": start_mb,
            "path": str(prediction[DOMAIN].path)}


def stages_worker(image: Path, out: Path, backend: str) -> dict:
    """The steps of ``predict`` for one domain, one by one, timed (the same functions)."""
    import torch

    from training.data.normalization import normalize
    from training.infer.backends import make_runner
    from training.infer.pipeline import _WayBack
    from training.infer.postprocess import keep_largest_components
    from training.infer.sliding_window import ProbabilitySink, sweep_slabs
    from training.io.resample import (
        canonical_orientation,
        reorient_affine,
        reorient_array,
        resample,
        resampled_grid,
    )
    from training.io.volume import read_image, write_labels

    model = _model()
    meta = model.meta(DOMAIN)
    seconds = {}
    clock = [time.perf_counter()]

    def lap(stage):
        now = time.perf_counter()
        seconds[stage] = seconds.get(stage, 0.0) + now - clock[0]
        clock[0] = now

    clock[0] = time.perf_counter()
    volume = read_image(image)
    lap("read")
    orient = canonical_orientation(volume.affine)
    affine_c = reorient_affine(volume.affine, volume.shape, orient)
    data_c = reorient_array(volume.data, orient)
    shape_c = tuple(data_c.shape[1:])
    grid_affine, grid_shape = resampled_grid(affine_c, shape_c, meta.spacing)
    grid = np.stack([resample(c, affine_c, grid_affine, grid_shape) for c in data_c])
    lap("reorient_resample")
    x = torch.from_numpy(normalize(grid, meta.normalization))
    lap("normalise")
    runner = make_runner(model.net, DOMAIN, backend, torch.device("cpu"), patch_size=meta.patch_size, batch_size=1)
    sink = ProbabilitySink(grid_shape, meta.num_classes, torch.float16)
    sweep_slabs(runner, DOMAIN, x, meta.patch_size, [sink], overlap=OVERLAP, batch_size=1)
    lap("network")
    back = _WayBack(orient, affine_c, shape_c, grid_affine)
    labels = back.labels(sink, None)  # as the pipeline: resampled and argmaxed together, slab by slab
    lap("resample_back")
    lap("argmax")  # in the previous stage
    keep_largest_components(labels, meta.kept_components)
    lap("postprocess")
    write_labels(out, labels, volume.affine, like=volume)
    lap("write")
    return {"stages": seconds, "grid_shape": list(grid_shape)}


def monai_worker(image: Path, out: Path, backend: str) -> dict:
    """The same job as a MONAI user writes it (its spleen tutorial's transforms), each transform timed."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted,
        EnsureChannelFirstd,
        Invertd,
        KeepLargestConnectedComponentd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    from training.infer.backends import DomainNet

    start_mb, c0 = rss_mb(), cpu_s()
    t0 = time.perf_counter()
    model = _model()
    meta = model.meta(DOMAIN)
    spec = meta.normalization[0]  # {"scheme": "ct", "clip": [lo, hi], "mean", "std"}
    (lo, hi), mean, std = spec["clip"], float(spec["mean"]), float(spec["std"])
    pre = [
        ("read", [LoadImaged("image", image_only=False), EnsureChannelFirstd("image")]),
        ("reorient_resample", [Orientationd("image", axcodes="RAS"),
                               Spacingd("image", pixdim=tuple(reversed(meta.spacing)), mode="bilinear")]),
        ("normalise", [ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=(lo - mean) / std,
                                            b_max=(hi - mean) / std, clip=True)]),
    ]
    from monai.transforms import Compose

    model.net.cpu_kernels = False  # a MONAI user's network: the plain PyTorch modules
    net = DomainNet(model.net, DOMAIN).eval()

    def predictor(x):  # MONAI's RAS arrays are (X=R, Y=A, Z=S); the network was trained on (S, A, R)
        return net(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)

    seconds = {"model": time.perf_counter() - t0}
    data = {"image": str(image)}
    for stage, transforms in pre:
        t = time.perf_counter()
        for tr in transforms:
            data = tr(data)
        seconds[stage] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        data["pred"] = sliding_window_inference(data["image"][None], tuple(reversed(meta.patch_size)), 1, predictor,
                                                overlap=OVERLAP, mode="gaussian")[0]
        data["pred"] = torch.softmax(data["pred"], 0)
    seconds["network"] = time.perf_counter() - t
    post = [
        ("resample_back", Invertd("pred", transform=Compose([tr for _, trs in pre for tr in trs]), orig_keys="image",
                                  nearest_interp=False, to_tensor=True)),
        ("argmax", AsDiscreted("pred", argmax=True)),
        ("postprocess", KeepLargestConnectedComponentd("pred", applied_labels=[1])),
        ("write", SaveImaged("pred", output_dir=str(out.parent), output_postfix="monai", separate_folder=False,
                             output_dtype=np.uint8, resample=False, print_log=False)),
    ]
    for stage, tr in post:
        t = time.perf_counter()
        data = tr(data)
        seconds[stage] = time.perf_counter() - t
    total = time.perf_counter() - t0
    written = sorted(out.parent.glob("*_monai.nii.gz"))
    return {"seconds": total, "cpu_s": cpu_s() - c0, "stages": seconds, "peak_mb": peak_mb(), "start_mb": start_mb,
            "path": str(written[-1]) if written else None}


def prepare_worker(image: Path, out: Path, backend: str) -> dict:
    """Build a compiled backend's graph into the on-disk cache (what a first run pays once; for
    ``auto``, OpenVINO's, as the plugin's background preparation or ``u2net prepare`` would)."""
    import torch

    from training.infer.backends import make_runner, openvino_available

    if backend == "auto" and openvino_available():
        backend = "openvino"

    model = _model()
    meta = model.meta(DOMAIN)
    t = time.perf_counter()
    make_runner(model.net, DOMAIN, backend, torch.device("cpu"), patch_size=meta.patch_size, batch_size=1)
    return {"seconds": time.perf_counter() - t}


WORKERS = {"ours": ours_worker, "stages": stages_worker, "monai": monai_worker, "prepare": prepare_worker}


def run_worker(kind: str, image: Path, out: Path, backend: str = "torch") -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--image", str(image), "--out", str(out), "--backend", backend]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} ({backend}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(a: Path, b: Path) -> float:
    """Dice of the foreground of two label files on the same grid."""
    import nibabel as nib

    x, y = np.asarray(nib.load(str(a)).dataobj) > 0, np.asarray(nib.load(str(b)).dataobj) > 0
    if x.shape != y.shape:
        x, y = x.squeeze(), y.squeeze()
    return float(2 * (x & y).sum() / max(int(x.sum()) + int(y.sum()), 1))


def backends_to_run(asked: str | None) -> list[str]:
    from training.infer.backends import openvino_available
    from training.infer.config import BACKENDS

    names = asked.split(",") if asked else ["torch", "openvino"] + (["auto"] if "auto" in BACKENDS else [])
    out = []
    for b in names:
        if b not in BACKENDS:
            print(f"skipped: backend {b} (not offered by this version: {', '.join(BACKENDS)})")
        elif b == "openvino" and not openvino_available():
            print("skipped: backend openvino (not installed: pip install napari-u2net[openvino])")
        else:
            out.append(b)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help=f"a {SMALL_SHAPE} scan at {SMALL_SPACING} mm (quick)")
    p.add_argument("--backends", help="comma-separated (default torch,openvino, and auto when offered)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.image, args.out, args.backend)))
        return 0

    backends = backends_to_run(args.backends)
    shape, spacing = (SMALL_SHAPE, SMALL_SPACING) if args.small else (SHAPE, SPACING)
    lines = []
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        tmp = Path(tmp)
        os.environ["U2NET_HOME"] = str(tmp / "home")  # compiled graphs: a cache of this run's own
        image = tmp / "ct.nii.gz"
        t = time.perf_counter()
        scan = make_scan(image, shape, spacing)
        _log(f"scan {scan} written in {time.perf_counter() - t:.0f} s")

        monai = run_worker("monai", image, tmp / "monai" / "ct.nii.gz")
        _log(f"MONAI: {monai['seconds']:.1f} s, peak {monai['peak_mb']:.0f} MB, stages {monai['stages']}")
        lines += [{"bench": "e2e_stage", "backend": "monai", "stage": s, "seconds": round(monai["stages"][s], 2)}
                  for s in STAGES]
        for backend in backends:
            if backend in ("openvino", "compiled", "auto"):
                prep = run_worker("prepare", image, tmp / "unused.nii.gz", backend)
                _log(f"{backend}: graph prepared in {prep['seconds']:.1f} s (once per domain, kept on disk)")
            stages = run_worker("stages", image, tmp / f"stages_{backend}.nii.gz", backend)
            lines += [{"bench": "e2e_stage", "backend": backend, "stage": s, "seconds": round(stages["stages"][s], 2)}
                      for s in STAGES]
            ours = run_worker("ours", image, tmp / f"ours_{backend}.nii.gz", backend)
            dice = agreement(Path(ours["path"]), Path(monai["path"]))
            _log(f"{backend}: {ours['seconds']:.1f} s end to end, peak {ours['peak_mb']:.0f} MB; stages "
                 f"{ {k: round(v, 1) for k, v in stages['stages'].items()} } (network grid {stages['grid_shape']}); "
                 f"Dice vs MONAI's labels {dice:.4f}")
            lines.append({
                "bench": "default_path", "backend": backend,
                "speedup_vs_monai": round(monai["seconds"] / ours["seconds"], 2),
                "end_to_end_s": round(ours["seconds"], 2), "monai_s": round(monai["seconds"], 2),
                "cpu_s": round(ours["cpu_s"], 1), "monai_cpu_s": round(monai["cpu_s"], 1),
                "speedup_cpu_s": round(monai["cpu_s"] / ours["cpu_s"], 2),
                "peak_mb": round(ours["peak_mb"]), "monai_peak_mb": round(monai["peak_mb"]),
                "peak_ratio": round(ours["peak_mb"] / monai["peak_mb"], 3),
                "above_start_mb": round(ours["peak_mb"] - ours["start_mb"]),
                "monai_above_start_mb": round(monai["peak_mb"] - monai["start_mb"]),
                "dice_vs_monai": round(dice, 4), "shape": scan["shape"], "spacing_mm": spacing,
            })
            if backend == "torch":  # what MPS and compiler-less machines run
                lines.append({"bench": "eager", "scope": "end_to_end",
                              "speedup_vs_monai": round(monai["seconds"] / ours["seconds"], 2),
                              "network_speedup_vs_monai": round(monai["stages"]["network"] / stages["stages"]["network"], 2)})
    print(f"\n{'backend':<9} {'ours s':>8} {'MONAI s':>8} {'speedup':>8} {'peak MB':>8} {'MONAI MB':>9}")
    for line in lines:
        if line["bench"] == "default_path":
            print(f"{line['backend']:<9} {line['end_to_end_s']:>8.1f} {line['monai_s']:>8.1f} "
                  f"{line['speedup_vs_monai']:>7.2f}× {line['peak_mb']:>8} {line['monai_peak_mb']:>9}")
    for line in lines:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
