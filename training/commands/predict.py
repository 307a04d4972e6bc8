"""``u2net predict``: segment one case (its modality files, a 4D NIfTI or a DICOM folder), or a cohort (``-i``)."""

from __future__ import annotations

import argparse
import sys

from training.infer.config import BACKENDS, PRECISIONS, InferenceConfig

NAME = "predict"
HELP = "segment one image (NIfTI or DICOM folder), or every case of a folder (-i), with one or more domains"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "images", nargs="*", metavar="IMAGE",
        help="one case: a .nii/.nii.gz file (3D, or 4D with one volume per modality), a DICOM "
        "folder, or one file per modality in the domain's order (or -i FOLDER for a cohort)",
    )
    p.add_argument("-i", "--input-folder", metavar="FOLDER",
                   help="segment every case of FOLDER into the folder -o (nnU-Net's CASE_0000.nii.gz naming, "
                        "one-file cases, DICOM sub-folders); cases already written are skipped; writes summary.csv")
    p.add_argument("--num-parts", type=int, default=1, metavar="N",
                   help="with -i: split the sorted cases into N parts (case i goes to part i %% N) ...")
    p.add_argument("--part-id", type=int, default=0, metavar="K",
                   help="... and segment part K (0 ≤ K < N), e.g. $SLURM_ARRAY_TASK_ID")
    p.add_argument("--domain", action="append", required=True, metavar="NAME",
                   help="domain to segment with (repeat for several; see `u2net info`)")
    p.add_argument("--model", help="model directory or registry name (default: the bundled model)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="a .nii/.nii.gz file (one domain) or a folder (writes OUT/<case>_<domain>.nii.gz)")
    p.add_argument("--device", default=InferenceConfig.device, help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--overlap", type=float, default=InferenceConfig.overlap,
                   help=f"tile overlap in [0, 1) (default {InferenceConfig.overlap})")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per batch (default: by device)")
    p.add_argument("--backend", choices=BACKENDS, default=InferenceConfig.backend,
                   help="auto (default: the fastest here; on a CPU OpenVINO, converted once per domain when the scan "
                        "is big enough to pay for it, see `u2net prepare`); torch (eager); compiled (CPU: "
                        "TorchInductor ahead-of-time, compiled once per domain and patch and kept on disk: the first "
                        "run takes minutes); openvino (CPU only, converted on its first run)")
    p.add_argument("--precision", choices=PRECISIONS, default=InferenceConfig.precision,
                   help="OpenVINO's number format on the CPU: auto (default: INT8 where `u2net prepare --precision "
                        "int8` quantised the domain and its check accepted it, else f32); f32; bf16 (CPUs with bf16 "
                        "units); int8 (needs that preparation)")
    p.add_argument("--no-postprocess", action="store_true",
                   help="keep every connected component (default: each class keeps as many as its training labels had)")
    p.add_argument("--no-amp", action="store_true", help="full float32 on the GPU")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--series", metavar="UID",
                   help="for a DICOM folder holding several series: the series to segment (its UID, or the "
                        "start of it; the error for such a folder lists them)")
    p.add_argument("--format", choices=("nifti", "dicom-seg"), default=None,
                   help="nifti, or dicom-seg: a DICOM Segmentation (for PACS) referencing the input DICOM series, "
                        "OUT.dcm or OUT/<case>_<domain>.dcm (default: by OUT's suffix, .dcm is dicom-seg)")
    p.add_argument("--stats", metavar="FILE",
                   help="also write per class the volume (mL) of the labels, the expected volume from the calibrated "
                        "probabilities with a 90%% interval, and the image intensity inside (HU for CT) to FILE "
                        "(.json or .csv; docs/uncertainty.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from training.commands._progress import Bars
    from training.errors import InputError
    from training.infer.pipeline import predict_files

    config = InferenceConfig(
        device=args.device, overlap=args.overlap, batch_size=args.batch_size,
        postprocess=not args.no_postprocess, backend=args.backend, amp=not args.no_amp,
        precision=args.precision,
    )
    if args.input_folder is not None:
        if args.images:
            raise InputError("give either IMAGE... (one case) or -i FOLDER (a cohort), not both")
        if args.format == "dicom-seg":
            raise InputError("--format dicom-seg writes one case's DICOM SEG; a cohort (-i FOLDER) is written as NIfTI")
        return _run_cohort(args, config)
    if not args.images:
        raise InputError("give the image to segment (IMAGE...) or a folder of cases (-i FOLDER)")
    if (args.num_parts, args.part_id) != (1, 0):
        raise InputError("--num-parts and --part-id split a cohort; use them with -i FOLDER")
    model, stats = args.model, None
    check_backend(config)
    if args.stats is not None:
        from training.infer.measure import check_stats_path

        stats = check_stats_path(args.stats, args.overwrite)  # refused now, not after the inference
        config.probabilities = True  # the expected volume and its interval
    if args.stats is not None:
        from training.model.modelfile import load_model
        from training.model.registry import resolve_model

        model = load_model(resolve_model(args.model), domains=list(dict.fromkeys(args.domain)))
    fast = FastPath(model, config, args.domain, quiet=args.quiet) if config.backend == "auto" else None
    with Bars("tile", enabled=not args.quiet) as bars:  # one bar per domain
        def progress(p):
            if fast is not None:
                fast.before_run(p, say=bars.write if not args.quiet else None)
            bars.update(p.domain, p.done, p.total, p.stage)

        prediction = predict_files(args.images, args.domain, args.output, model=model, config=config,
                                   progress=progress,
                                   overwrite=args.overwrite, series=args.series, fmt=args.format)
    if stats is not None:
        _write_stats(args, stats, prediction, model)
    for result in prediction:
        print(f"{result.domain}: {result.path}")
        for note in result.notes:
            print(f"u2net predict: warning: {note}", file=sys.stderr)
        if result.empty:
            print(f"u2net predict: warning: {result.domain} found nothing in {args.images[0]} (the labels are "
                  "all background); check that the image shows what this domain segments (`u2net info`)",
                  file=sys.stderr)
    return 0


def check_backend(config: InferenceConfig) -> None:
    """Refuse a device that is not here, or a backend that is not installed or cannot run on the
    device, before any file is read (:func:`training.infer.backends.resolve_backend`)."""
    from training.infer.backends import resolve_backend
    from training.io.devices import resolve_device

    resolve_backend(config.backend, resolve_device(config.device), precision=config.precision)


class FastPath:
    """``--backend auto`` on a CPU: just before a domain's sweep (its "preprocess" report, once the
    inputs and outputs are checked and the tiles counted), convert the domain to OpenVINO when
    the work ahead (``cases`` × its tiles) is big enough to pay for the conversion
    (:func:`training.infer.prepare.worth_preparing`; its progress on stderr), then say once, on
    stdout with the output paths, what runs and why."""

    def __init__(self, model, config: InferenceConfig, domains: list[str], cases: int = 1, quiet: bool = False):
        # ``model``: a loaded model, or the --model value (loaded at the first report, after the
        # run has checked its inputs and outputs: their errors come first)
        self.model, self.config, self.cases, self.quiet = model, config, cases, quiet
        self.domains = list(dict.fromkeys(domains))
        self.single = len(set(domains)) == 1  # "backend: …" alone, else "backend for D: …"
        self.done: set[str] = set()

    def before_run(self, p, say=None) -> None:
        from training.infer.backends import resolve_backend
        from training.infer.prepare import (
            PAYS_OFF_TILES,
            cpu_batch,
            needs_preparing,
            prepare_domain,
            worth_preparing,
        )
        from training.io.devices import default_batch_size, resolve_device

        d = p.domain
        if p.stage != "preprocess" or d in self.done:
            return
        self.done.add(d)
        if not hasattr(self.model, "adapters"):
            from training.model.modelfile import load_model
            from training.model.registry import resolve_model

            self.model = load_model(resolve_model(self.model), domains=self.domains)
        say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        config, tiles, note = self.config, p.total * self.cases, ""
        # bf16 and int8 need no f32 graph first (int8: prepared on purpose, or refused just below)
        if config.precision in ("auto", "f32") and needs_preparing(self.model, d, config.device, config.batch_size):
            if worth_preparing(tiles):
                say(f"preparing the fast path for {d}, once (converting it to OpenVINO; later runs start at once)…")
                done = prepare_domain(self.model, d, config.batch_size,
                                      progress=None if self.quiet else lambda stage: say(f"  {d}: {stage}…"))
                note = f"; prepared in {done.seconds:.1f} s"
            else:
                note = (f"; {tiles} tiles < {PAYS_OFF_TILES}: converting to OpenVINO first would take longer than "
                        f"it saves here, `u2net prepare --domain {d}` makes it ready for the next runs")
        device = resolve_device(config.device)
        batch = cpu_batch(config.batch_size) if device.type == "cpu" else (config.batch_size or default_batch_size(device))
        name, reason = resolve_backend(config.backend, device, self.model.net, d, self.model.meta(d).patch_size,
                                       batch, config.amp, precision=config.precision)
        print(f"backend{'' if self.single else f' for {d}'}: {name} ({reason}{note})", flush=True)  # stdout


def _write_stats(args: argparse.Namespace, path, prediction, model) -> None:
    """The measurements of one case (training.infer.measure) into ``path``."""
    from training.infer.measure import stats_rows, write_stats
    from training.io.volume import case_name, read_image

    images = args.images if len(args.images) > 1 else args.images[0]
    volume = read_image(images, series=args.series)  # the intensities and the voxel size
    write_stats(path, stats_rows(case_name(args.images[0]), prediction, volume, model), overwrite=args.overwrite)
    print(f"stats: {path}")


def _run_cohort(args: argparse.Namespace, config: InferenceConfig) -> int:
    """``-i FOLDER``: every case of the folder with the model loaded once (training.infer.cohort);
    exit 1 when some case failed (each said on one line), 2 for what is wrong before any work."""
    from pathlib import Path

    from training.commands._progress import Bars
    from training.errors import InputError
    from training.infer.cohort import find_cases, run_cohort, split_cases, summary_path, write_summary
    from training.infer.config import validate_config
    from training.io.atomic import check_writable
    from training.model.modelfile import load_model
    from training.model.registry import resolve_model

    folder, out = Path(args.input_folder), Path(args.output)
    if args.series is not None:
        raise InputError("--series picks a series of one DICOM folder; a cohort takes one series per sub-folder")
    stats = None
    if args.stats is not None:
        from training.infer.measure import check_stats_path

        stats = check_stats_path(args.stats, args.overwrite)  # refused now, not after the cohort
        config.probabilities = True  # the expected volumes and their intervals
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; with -i give the folder that receives the labels")
    if folder.is_dir() and out.resolve() == folder.resolve():
        raise InputError(f"{out}: is the input folder; write the labels to another folder")
    validate_config(config)
    check_backend(config)
    domains = list(dict.fromkeys(args.domain))
    model = load_model(resolve_model(args.model), domains=domains)
    modalities = {model.meta(d).in_channels for d in domains}
    if len(modalities) > 1:
        raise InputError("these domains take different numbers of modalities; segment a cohort with one of them at a time")
    cases = find_cases(folder, modalities.pop())
    if not cases:
        raise InputError(f"{folder}: no cases here (.nii/.nii.gz files, CASE_0000.nii.gz per modality, "
                         "or DICOM sub-folders)")
    part = split_cases(cases, args.num_parts, args.part_id)
    summary = summary_path(out, args.num_parts, args.part_id)
    check_writable(summary)  # a read-only or full place is said now, not after the work
    fast = FastPath(model, config, domains, cases=len(part), quiet=args.quiet) if config.backend == "auto" else None

    measured: dict[tuple[str, str], list] = {}  # (first input, domain) -> ClassMeasure rows
    by_input = {str(c.inputs[0]): c.name for c in part}

    def measure(result, volume) -> dict:
        """The summary's measurement columns of one case and domain (and the rows for --stats)."""
        from training.infer.measure import measure_result

        rows = measure_result(result, volume, model.meta(result.domain).class_names)
        measured[(str(volume.source), result.domain)] = rows
        return _summary_columns(rows)

    reports = []
    # one overall bar over the cases, and the case under way's tiles (one bar per domain)
    with Bars("case", enabled=not args.quiet) as bars, Bars("tile", enabled=not args.quiet) as tiles:
        def say(line: str) -> None:
            if args.quiet:
                print(line, file=sys.stderr)
            else:
                bars.write(line)

        bars.update("cases", 0, len(part))

        def progress(case, p):
            if fast is not None:
                fast.before_run(p, say=say)
            tiles.update(p.domain, p.done, p.total, f"{case} {p.stage}")

        for report in run_cohort(model, part, domains, out, config, overwrite=args.overwrite, progress=progress,
                                 measure=measure):
            reports.append(report)
            bars.update("cases", len(reports), len(part), f"{sum(r.failed for r in reports)} failed")
            if report.failed:
                say(f"u2net predict: case {report.case} failed: {report.message}")
            elif report.empty:
                say(f"u2net predict: warning: case {report.case}: {', '.join(report.empty)} found nothing "
                    "(the labels are all background)")
    write_summary(summary, reports, domains)
    if stats is not None:
        from dataclasses import asdict

        from training.infer.measure import write_stats

        rows = [{"case": by_input.get(source, source), "domain": d, **asdict(m)}
                for (source, d), ms in measured.items() for m in ms]
        write_stats(stats, rows, overwrite=args.overwrite)
        print(f"stats: {stats}")
    counts = {s: sum(r.status == s for r in reports) for s in ("done", "skipped", "failed")}
    where = f" (part {args.part_id} of {args.num_parts})" if args.num_parts > 1 else ""
    print(f"{len(part)} cases{where}: {counts['done']} done, {counts['skipped']} skipped, "
          f"{counts['failed']} failed; summary: {summary}")
    if counts["failed"]:
        print(f"u2net predict: error: {counts['failed']} of {len(part)} cases failed (see above and {summary})",
              file=sys.stderr)
        return 1
    return 0


def _summary_columns(rows) -> dict:
    """Per class of one case and domain: volume (mL) of the labels, the intensity inside, and the
    expected volume with its interval when the probabilities were computed (``--stats``)."""
    out = {}
    for m in rows:
        out[f"{m.name}_ml"] = round(m.volume_ml, 3)
        if m.expected_ml is not None:
            out[f"{m.name}_expected_ml"] = round(m.expected_ml, 3)
            out[f"{m.name}_low_ml"], out[f"{m.name}_high_ml"] = round(m.low_ml, 3), round(m.high_ml, 3)
        if m.mean is not None:
            out[f"{m.name}_mean"] = round(m.mean, 2)
    return out
