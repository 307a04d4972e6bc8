"""``u2net predict``: segment one case (its modality files, a 4D NIfTI or a DICOM folder)."""

from __future__ import annotations

import argparse
import sys

from training.infer.config import BACKENDS, InferenceConfig

NAME = "predict"
HELP = "segment one image (NIfTI or DICOM folder) with one or more domains"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "images", nargs="+", metavar="IMAGE",
        help="one case: a .nii/.nii.gz file (3D, or 4D with one volume per modality), a DICOM "
        "folder, or one file per modality in the domain's order",
    )
    p.add_argument("--domain", action="append", required=True, metavar="NAME",
                   help="domain to segment with (repeat for several; see `u2net info`)")
    p.add_argument("--model", help="model directory or registry name (default: the bundled model)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="a .nii/.nii.gz file (one domain) or a folder (writes OUT/<case>_<domain>.nii.gz)")
    p.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--overlap", type=float, default=InferenceConfig.overlap,
                   help=f"tile overlap in [0, 1) (default {InferenceConfig.overlap})")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per batch (default: by device)")
    p.add_argument("--backend", choices=BACKENDS, default=InferenceConfig.backend,
                   help="torch (default, eager); compiled (CPU: TorchInductor ahead-of-time, compiled once per "
                        "domain and patch and kept on disk: the first run takes minutes, later runs are faster); "
                        "openvino (CPU only; pip install napari-u2net[openvino])")
    p.add_argument("--no-postprocess", action="store_true",
                   help="keep every connected component (default: each class keeps as many as its training labels had)")
    p.add_argument("--no-amp", action="store_true", help="full float32 on the GPU")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--series", metavar="UID",
                   help="for a DICOM folder holding several series: the series to segment (its UID, or the "
                        "start of it; the error for such a folder lists them)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from training.commands._progress import Bars
    from training.infer.pipeline import predict_files

    config = InferenceConfig(
        device=args.device, overlap=args.overlap, batch_size=args.batch_size,
        postprocess=not args.no_postprocess, backend=args.backend, amp=not args.no_amp,
    )
    with Bars("tile", enabled=not args.quiet) as bars:  # one bar per domain
        prediction = predict_files(args.images, args.domain, args.output, model=args.model, config=config,
                                   progress=lambda p: bars.update(p.domain, p.done, p.total, p.stage),
                                   overwrite=args.overwrite, series=args.series)
    for result in prediction:
        print(f"{result.domain}: {result.path}")
        if result.empty:
            print(f"u2net predict: warning: {result.domain} found nothing in {args.images[0]} (the labels are "
                  "all background); check that the image shows what this domain segments (`u2net info`)",
                  file=sys.stderr)
    return 0
