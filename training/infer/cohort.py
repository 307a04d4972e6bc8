"""Segmenting a cohort: every case of a folder with one loaded model, reading and writing overlapped.

A folder holds cases in any of three forms (names sorted, hidden entries ignored):

* nnU-Net's naming, one file per modality: ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz`` … in the
  domain's modality order (a group of names ending ``_NNNN`` that includes ``_0000``);
* one file per case: ``x.nii.gz`` / ``x.nii`` (3D, or 4D with one volume per modality);
* a sub-folder holding one DICOM series.

:func:`run_cohort` segments them in order. A reader thread reads the next case while the network
works on the current one and a writer thread writes the last one (torch, zlib and SimpleITK
release the GIL in their kernels), so a cohort is not read- or write-bound; at most one case is
read ahead and one is being written, so memory stays that of about three cases. Each case ends in
a :class:`CaseReport`: done, skipped (its outputs were all written by an earlier run) or failed
(one line saying why; the other cases go on). Labels are written atomically
(:func:`training.io.volume.write_labels`), so an interrupted run leaves only complete files and
the next run does the rest. :func:`split_cases` gives N jobs disjoint shares whose union is the
cohort (case i goes to part i % N, as nnU-Net does); :func:`write_summary` writes the CSV.
"""

from __future__ import annotations

import csv
import io
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.errors import CancelFlag, Cancelled, InputError, U2NetError, check_cancel
from training.infer.config import InferenceConfig
from training.infer.pipeline import predict
from training.infer.result import DomainResult
from training.infer.sliding_window import InferenceProgress
from training.io.atomic import atomic_write_text
from training.io.dicom import is_dicom_file
from training.io.volume import Volume, is_nifti, read_image, write_labels

__all__ = [
    "SUMMARY_COLUMNS",
    "Case",
    "CaseReport",
    "case_outputs",
    "find_cases",
    "run_cohort",
    "split_cases",
    "summary_path",
    "write_summary",
]

_MODALITY_FILE = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})\.nii(\.gz)?$", re.IGNORECASE)
LABELS_SUFFIX = ".nii.gz"
# The summary's fixed columns; measurements (e.g. per-class volumes) follow as further columns.
SUMMARY_COLUMNS = ("case", "domain", "output", "status", "seconds", "message")
# A measurement hook: (domain result, the case's volume) -> {column: value}, e.g. {"spleen_ml": 212.4}.
Measure = Callable[[DomainResult, Volume], dict[str, float]]


@dataclass
class Case:
    """One case of a cohort: its name (outputs are ``<name>_<domain>.nii.gz``) and its inputs."""

    name: str
    inputs: list[Path]  # the modality files in order, one (3D/4D) file, or one DICOM folder
    problem: str = ""  # why it cannot be segmented, found while listing (a missing modality …)


@dataclass
class CaseReport:
    """What happened to one case."""

    case: str
    status: str  # "done", "skipped" (all outputs were there) or "failed"
    outputs: dict[str, Path]  # domain -> labels file (written now or before; none when failed)
    seconds: float = 0.0  # reading + segmenting + writing (not the time spent waiting)
    message: str = ""  # the error of a failed case; "found nothing" notes of a done one
    empty: list[str] = field(default_factory=list)  # domains that found nothing (all background)
    written: list[str] = field(default_factory=list)  # domains written now (others were there before)
    # per domain, the measurement hook's columns (see Measure); filled for done cases
    measurements: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # "read", "predict", "write" seconds

    @property
    def failed(self) -> bool:
        return self.status == "failed"


# -- finding and splitting cases ----------------------------------------------------------------
def find_cases(folder: str | Path, modalities: int) -> list[Case]:
    """The cases of ``folder`` sorted by name; ``modalities`` is how many files a case in
    nnU-Net's naming must have (the domain's). A case with missing or extra modality files is
    listed with its ``problem``; two inputs with one case name are refused before any work."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: no such folder; give the folder that holds the cases")
    if not folder.is_dir():
        raise InputError(f"{folder}: is a file, not a folder; give it without -i to segment one image")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    groups: dict[str, dict[int, Path]] = {}
    for p in entries:
        m = _MODALITY_FILE.match(p.name)
        if m and p.is_file():
            groups.setdefault(m["case"], {})[int(m["index"])] = p
    found: dict[str, list[Case]] = {}
    for p in entries:
        m = _MODALITY_FILE.match(p.name)
        if m and p.is_file() and 0 in groups[m["case"]]:
            continue  # part of a case in nnU-Net's naming, added below
        if p.is_file() and is_nifti(p):
            found.setdefault(_stem(p.name), []).append(Case(_stem(p.name), [p]))
        elif p.is_dir() and _holds_dicom(p):
            found.setdefault(p.name, []).append(Case(p.name, [p]))
    for name, files in groups.items():
        if 0 not in files:
            continue  # names like scan_2024.nii.gz: plain cases, listed above
        indices = sorted(files)
        case = Case(name, [files[i] for i in indices])
        if indices != list(range(modalities)):
            have = ", ".join(f"_{i:04d}" for i in indices)
            want = ", ".join(f"_{i:04d}" for i in range(modalities))
            case.problem = f"has modality files {have}; the domain needs {modalities}: {want}"
        found.setdefault(name, []).append(case)
    clashes = {n: cs for n, cs in found.items() if len(cs) > 1}
    if clashes:
        name, cs = min(clashes.items())
        listing = ", ".join(c.inputs[0].name for c in cs)
        raise InputError(f"{folder}: several inputs make case {name!r} ({listing}); rename or move all but one")
    return [found[n][0] for n in sorted(found)]


def _stem(name: str) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)


def _holds_dicom(folder: Path) -> bool:
    """A folder with a DICOM file directly in it (one case per sub-folder; others are ignored)."""
    try:
        return any(is_dicom_file(p) for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return False


def split_cases(cases: list[Case], num_parts: int = 1, part_id: int = 0) -> list[Case]:
    """Part ``part_id`` of ``num_parts``: the sorted cases whose index i has i % num_parts == part_id,
    so N jobs (a SLURM array, N GPUs) together take every case exactly once."""
    if num_parts < 1:
        raise InputError(f"--num-parts must be ≥ 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise InputError(f"--part-id must be between 0 and {num_parts - 1} (--num-parts {num_parts}), got {part_id}")
    ordered = sorted(cases, key=lambda c: c.name)
    return ordered[part_id::num_parts]


def case_outputs(case: Case | str, domains: list[str], out_dir: str | Path) -> dict[str, Path]:
    """Where a case's labels go: ``OUT_DIR/<case>_<domain>.nii.gz`` per domain."""
    name = case.name if isinstance(case, Case) else case
    return {d: Path(out_dir) / f"{name}_{d}{LABELS_SUFFIX}" for d in domains}


def summary_path(out_dir: str | Path, num_parts: int = 1, part_id: int = 0) -> Path:
    """``summary.csv``; one file per part when the cohort is split (parts run at the same time)."""
    name = "summary.csv" if num_parts == 1 else f"summary.part-{part_id}-of-{num_parts}.csv"
    return Path(out_dir) / name


# -- the overlapped loop ------------------------------------------------------------------------
def run_cohort(
    model,
    cases: list[Case],
    domains: list[str],
    out_dir: str | Path,
    config: InferenceConfig | None = None,
    overwrite: bool = False,
    progress: Callable[[str, InferenceProgress], None] | None = None,
    measure: Measure | None = None,
    cancel: CancelFlag = None,
) -> Iterator[CaseReport]:
    """Segment ``cases`` with the loaded ``model``, yielding a :class:`CaseReport` as each ends.

    A case whose outputs all exist is skipped unless ``overwrite``; when only some exist, only the
    missing domains are computed. ``progress(case, p)`` reports the network's tiles. Failures of
    one case (unreadable, wrong modalities, blank, a full disk …) are reported and the loop goes
    on; :class:`~training.errors.Cancelled` and interrupts stop it, after the file being written
    is complete.
    """
    config = config or InferenceConfig()
    todo: list[tuple[Case, dict[str, Path]]] = []
    for case in cases:
        outputs = case_outputs(case, domains, out_dir)
        missing = {d: p for d, p in outputs.items() if overwrite or not p.exists()}
        if not missing:
            yield CaseReport(case.name, "skipped", outputs, message="all outputs written before")
        elif case.problem:
            yield CaseReport(case.name, "failed", {}, message=case.problem)
        else:
            todo.append((case, missing))
    if not todo:
        return
    reader = _Reader([case for case, _ in todo])
    writer = _Writer(overwrite)
    reader.start()
    writer.start()
    try:
        for case, missing in todo:
            check_cancel(cancel)
            got_case, volume, error, read_s = reader.take()
            assert got_case is case
            if error:
                yield CaseReport(case.name, "failed", {}, read_s, error, timings={"read": read_s})
                yield from writer.finished()
                continue
            start = time.perf_counter()
            try:
                prediction = predict(model, volume, list(missing), config,
                                     None if progress is None else (lambda p, c=case.name: progress(c, p)), cancel)
                measurements = {r.domain: measure(r, volume) for r in prediction} if measure else {}
            except Cancelled:
                raise
            except Exception as e:  # noqa: BLE001 - one bad case is reported; the others go on
                seconds = read_s + time.perf_counter() - start
                yield CaseReport(case.name, "failed", {}, seconds, _one_line(e), timings={"read": read_s})
                yield from writer.finished()
                continue
            predict_s = time.perf_counter() - start
            report = CaseReport(case.name, "done", case_outputs(case, domains, out_dir), read_s + predict_s,
                                measurements=measurements, timings={"read": read_s, "predict": predict_s})
            # the writer needs the labels and the geometry only: the image's memory is freed now
            header_only = Volume(np.zeros((1, 1, 1, 1), np.uint8), volume.affine, volume.header, volume.source)
            del volume
            writer.give(report, prediction, header_only, missing)
            del prediction
            yield from writer.finished()
        writer.close()
        yield from writer.finished()
    finally:
        reader.stop()
        writer.stop()  # a write under way completes (or is removed): never half a file


def _one_line(e: BaseException) -> str:
    if isinstance(e, U2NetError):
        text = str(e)
    else:
        text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())


def _read_case(case: Case) -> Volume:
    return read_image(case.inputs if len(case.inputs) > 1 else case.inputs[0])


class _Reader(threading.Thread):
    """Reads the cases in order, at most one ahead of the case being segmented."""

    def __init__(self, cases: list[Case]):
        super().__init__(name="u2net-cohort-reader", daemon=True)
        self.cases = cases
        self._out: queue.Queue = queue.Queue()
        self._slot = threading.Semaphore(1)  # a case read (or being read) and not yet taken
        self._halt = threading.Event()

    def run(self) -> None:
        for case in self.cases:
            while not self._slot.acquire(timeout=0.1):
                if self._halt.is_set():
                    return
            if self._halt.is_set():
                return
            start = time.perf_counter()
            try:
                volume, error = _read_case(case), ""
            except Exception as e:  # noqa: BLE001 - reported as this case's failure
                volume, error = None, _one_line(e)
            self._out.put((case, volume, error, time.perf_counter() - start))

    def take(self) -> tuple[Case, Volume | None, str, float]:
        item = self._out.get()
        self._slot.release()  # the next case may be read now
        return item

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=1.0)  # a read under way only costs memory; it ends with the process


class _Writer(threading.Thread):
    """Writes one case's labels while the next is segmented; one case at a time."""

    def __init__(self, overwrite: bool):
        super().__init__(name="u2net-cohort-writer", daemon=True)
        self.overwrite = overwrite
        self._inbox: queue.Queue = queue.Queue(maxsize=1)
        self._idle = threading.Semaphore(1)
        self._done: queue.Queue = queue.Queue()

    def run(self) -> None:
        while True:
            job = self._inbox.get()
            if job is None:
                return
            report, prediction, like, paths = job
            start = time.perf_counter()
            try:
                for d, path in paths.items():
                    write_labels(path, prediction[d].labels, like.affine, like=like, overwrite=self.overwrite)
                    report.written.append(d)
                report.empty = [r.domain for r in prediction if r.empty]
                if report.empty:
                    report.message = "found nothing (all background): " + ", ".join(report.empty)
            except Exception as e:  # noqa: BLE001 - a full disk, a file written meanwhile …
                report.status, report.message = "failed", _one_line(e)
                report.outputs = {d: p for d, p in report.outputs.items() if p.exists()}
            report.timings["write"] = time.perf_counter() - start
            report.seconds += report.timings["write"]
            del job, prediction
            self._done.put(report)
            self._idle.release()

    def give(self, report: CaseReport, prediction, like: Volume, paths: dict[str, Path]) -> None:
        """Write ``prediction``'s labels of each domain to ``paths[domain]`` with ``like``'s geometry."""
        self._idle.acquire()  # the previous case is written: at most one case held for writing
        self._inbox.put((report, prediction, like, paths))

    def finished(self) -> Iterator[CaseReport]:
        while True:
            try:
                yield self._done.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        """Finish the pending write and end the thread."""
        self._inbox.put(None)
        self.join()

    def stop(self) -> None:
        if self.is_alive():
            try:
                self._inbox.put_nowait(None)
            except queue.Full:  # a case waits to be written: it is dropped, the one under way completes
                try:
                    self._inbox.get_nowait()
                except queue.Empty:
                    pass
                self._inbox.put_nowait(None)
            self.join()


# -- the summary --------------------------------------------------------------------------------
def write_summary(path: str | Path, reports: list[CaseReport], domains: list[str]) -> Path:
    """Write the cohort's summary CSV atomically: one row per case and domain, sorted by case.

    Columns: :data:`SUMMARY_COLUMNS`, then the measurement columns in order of first appearance.
    A skipped case keeps the measurements an earlier run wrote for it in the same file.
    """
    path = Path(path)
    before = _previous_rows(path)
    rows, extra = [], []
    for report in sorted(reports, key=lambda r: r.case):
        for d in domains:
            out = report.outputs.get(d)
            row = {
                "case": report.case, "domain": d, "output": "" if out is None else str(out),
                "status": "skipped" if report.status == "done" and d not in report.written else report.status,
                "seconds": f"{report.seconds:.2f}" if report.seconds else "",
                "message": report.message,
            }
            measured = report.measurements.get(d)
            if measured is None and row["status"] == "skipped":
                old = before.get((report.case, d), {})
                measured = {k: v for k, v in old.items() if k not in SUMMARY_COLUMNS and v != ""}
            for k, v in (measured or {}).items():
                if k not in extra:
                    extra.append(k)
                row[k] = v
            rows.append(row)
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=[*SUMMARY_COLUMNS, *extra], restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, text.getvalue())
    return path


def _previous_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {(r.get("case", ""), r.get("domain", "")): r for r in csv.DictReader(f)}
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
