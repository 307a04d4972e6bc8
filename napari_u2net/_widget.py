"""The domain selector dock widget: wires the layout to napari layers and the jobs of ``_models``
(model sources) and ``_segment`` (the segmentation).

Every slow step (importing torch, downloading or loading a model, reading image values,
segmenting) runs in a napari thread worker; the GUI thread only looks at layers' shapes and
transforms, starts jobs and turns their reports into the progress bar and their result (the
core's :class:`~training.infer.result.Prediction`) into layers: a Labels layer per domain and an
Image layer per further per-voxel map. Errors become napari notifications that say what went
wrong and what to do.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QFileDialog, QListWidgetItem, QVBoxLayout, QWidget

from training.errors import InputError
from training.infer.config import InferenceConfig, validate_config
from training.infer.measure import measure_result
from training.model.domain_match import BLANK, UNKNOWN, pick_domain, read_values, trained_on_phantoms

from . import _jobs
from ._devices import start_device_probe
from ._domain_share import DomainShare
from ._geometry import META_KEY, layer_volume, result_geometry, with_leading_axes
from ._models import ModelChoice, load_model_job, model_choices
from ._orientation import prepare_for_reading
from ._panel import follow_layers
from ._progress_bar import stage_words
from ._segment import RunReport, RunRequest, check_case, layer_channels, run_segmentation
from ._session import session_for
from ._turns import Turns, insert_layer_steps
from ._widget_gui import DomainSelectorGui, grey_backend

log = logging.getLogger(__name__)
PREVIOUS_SUFFIX = " (previous)"
OOM_ADVICE = "choose the CPU device or a smaller tile overlap, close other programs, then run again"
# The fast path is prepared once the ticks have stayed put this long (not for every passing tick).
PREPARE_DELAY_MS = 1500
_PREPARE_POLL_MS = 100  # how often the GUI looks at the preparation's reports


def _prepare_thread(model, model_dir, domains, config, stop, reports) -> None:
    """Run :func:`._fastpath.prepare_job` and put ("report" | "done" | "error", value), then
    ("finished", None), into ``reports``; "done" carries (domains prepared, what a run takes now)."""
    from ._fastpath import backend_choices, describe, prepare_job

    try:
        gen = prepare_job(model, model_dir, domains, config, stop)
        while True:
            reports.put(("report", next(gen)))
    except StopIteration as end:
        try:
            now = describe(backend_choices(model, domains, config))
        except Exception:  # noqa: BLE001 - a device not here: the run says so
            now = ""
        reports.put(("done", (end.value, now)))
    except Exception as e:  # noqa: BLE001 - said under Backend; runs go on eager
        log.warning("fast-path preparation failed: %s", e)
        reports.put(("error", e))
    finally:
        reports.put(("finished", None))


def _folder_label(folder: Path) -> str:
    """How the model picker names a folder: "Yours" for the user's models in the cache (as
    :func:`~._models.model_choices` lists them after a restart), else "Folder"."""
    from training.io.folders import cache_dir

    try:
        return "Yours" if folder.resolve().parent == (cache_dir() / "models").resolve() else "Folder"
    except (OSError, InputError):
        return "Folder"


def _ensure_worker_threads(minimum: int = 6) -> None:
    """napari's workers share Qt's global pool, sized to the CPU count (2 on small machines):
    a slow download and a device probe could then hold back the segmentation. Raise the floor."""
    from qtpy.QtCore import QThreadPool

    pool = QThreadPool.globalInstance()
    if pool.maxThreadCount() < minimum:
        pool.setMaxThreadCount(minimum)


def labels_hash(data: np.ndarray) -> str:
    """Fingerprint of a label array, to tell an untouched result from a hand-corrected one."""
    arr = np.ascontiguousarray(data)
    return hashlib.blake2b(memoryview(arr).cast("B"), digest_size=16).hexdigest() + str(arr.shape)


def label_colormap(meta):
    """napari colormap with each class's colour (background transparent)."""
    from napari.utils.colormaps import DirectLabelColormap

    colors = {None: "transparent", 0: "transparent"}
    for value, cls in enumerate(meta.classes):
        if value:
            colors[value] = cls.color
    return DirectLabelColormap(color_dict=colors)


def class_features(meta):
    import pandas as pd

    return pd.DataFrame({"index": np.arange(meta.num_classes), "class": meta.class_names})


def segment_to_layers(request: RunRequest, cancel, predict_fn, build: Callable):
    """The segmentation job plus building each domain's layers, all in the worker thread
    (constructing a Labels layer takes a few hundred ms; the GUI thread only inserts it).
    Returns ``{domain: (labels layer, [map layers])}``."""
    prediction = yield from run_segmentation(request, cancel, predict_fn=predict_fn)
    return {d: build(prediction[d]) for d in request.domains}


# How a per-voxel map shows: the uncertainty (0 sure … 1 unsure) in a perceptual colour map over
# the image, so that sure regions stay dark and unsure ones glow.
MAP_STYLE = {"uncertainty": {"colormap": "inferno", "contrast_limits": (0.0, 1.0), "opacity": 0.7}}
# Maps that are only means to an end: the class probabilities give the measurements' expected
# volumes and intervals, and as C image layers they would only crowd the layer list.
HIDDEN_MAPS = ("probabilities",)


def result_layers(image_name: str, geometry: dict, result, meta, volume, model_dir) -> tuple:
    """One domain's :class:`~training.infer.result.DomainResult` as layers on the image's grid: a
    Labels layer (classes, colours, provenance) and an Image layer ``<image> <domain> <map>`` per
    entry of ``result.maps``, so a per-voxel output the core adds shows without a plugin change.
    ``geometry``: :func:`~._geometry.result_geometry` of the image layer (read on the GUI thread)."""
    from napari.layers import Image, Labels

    labels = np.asarray(result.labels)
    base = {
        "domain": result.domain,
        "image": image_name,
        "model": str(model_dir) if model_dir else "",
        "affine": np.asarray(volume.affine).copy(),
        "header": volume.header,
        "source": volume.source,
        # the file's own grid, so the writer restores its array order without the image layer
        **{k: volume.meta[k] for k in ("source_affine", "source_shape", "orientation") if k in volume.meta},
    }
    measurements = [asdict(m) for m in measure_result(result, volume, meta.class_names)]
    metadata = {META_KEY: {**base, "classes": meta.class_names, "shape": tuple(labels.shape),
                           "result_hash": labels_hash(labels), "empty": result.empty,
                           "notes": list(result.notes), "measurements": measurements}}
    name = f"{image_name} {result.domain}"
    labels_layer = Labels(
        labels, name=name, colormap=label_colormap(meta), features=class_features(meta),
        metadata=metadata, opacity=0.5, **geometry,
    )
    maps = [
        Image(np.asarray(data), name=f"{name} {key}", metadata={META_KEY: {**base, "map": key}},
              blending="additive", **MAP_STYLE.get(key, {}), **with_leading_axes(geometry, np.ndim(data) - 3))
        for key, data in result.maps.items()
        if key not in HIDDEN_MAPS
    ]
    return labels_layer, maps


class DomainSelectorWidget(QWidget):
    """Segment an image layer with one or several domains of a U²-Net model.

    ``predict_fn`` replaces :func:`training.infer.pipeline.predict` (same signature, returns a
    :class:`~training.infer.result.Prediction`), for tests and benchmarks; the default is the real
    inference. The model it loads is announced to the viewer's :class:`~._session.ModelSession`,
    where the fine-tune panel finds it and announces the domains it adds.
    """

    def __init__(self, napari_viewer, predict_fn: Callable | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.predict_fn = predict_fn
        self.threads: int | None = None  # torch CPU threads for runs (None: all cores but one)
        self.gui = DomainSelectorGui(self)
        _ensure_worker_threads()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.gui)

        self.model = None  # training.model.modelfile.Model once loaded
        self.model_dir: Path | None = None
        self.worker = None  # the segmentation worker while it runs
        self.model_worker = None
        self.cancel_event: threading.Event | None = None
        self._pbar = None
        self._stage: tuple[str, str] | None = None  # the run's current (domain, stage), for the log
        self._run_backend = ""  # what the run under way (or the last) runs the network on, and why
        self._choices: list[ModelChoice] = []
        self._pending_domains: list[str] | None = None
        self.hint_jobs = 0  # modality guesses running (tests and benchmarks wait for 0)
        self._window_image = None  # the image the CT window presets are enabled for
        self._ticking = False  # the widget itself is ticking domains (not the user)
        self._auto_ticked = True  # the ticked domains are the widget's suggestion, not the user's
        self._user_ticks = 0  # how many times the user changed the ticks (a late guess never undoes them)
        self.prep_worker = None  # the fast path's preparation while it runs (_fastpath.prepare_job)
        self._prep_stop: threading.Event | None = None
        self._prep_pbar = None
        self._prepare_again = False
        self.turns = Turns(self)  # result layers' insertion, a step per event-loop turn
        self._prepare_timer = QTimer(self)
        self._prepare_timer.setSingleShot(True)
        self._prepare_timer.timeout.connect(self._start_prepare)
        self._prepare_poll = QTimer(self)
        self._prepare_poll.timeout.connect(self._poll_prepare)
        self._prep_reports = None
        self.session = session_for(napari_viewer)
        prepare_for_reading(napari_viewer)  # radiological view and R/L, A/P markers, once per viewer
        self.session.domain_added.connect(self._on_domain_added)

        g = self.gui
        g.run_button.clicked.connect(self.run)
        g.cancel_button.clicked.connect(self.cancel)
        g.folder_button.clicked.connect(self._choose_folder)
        g.model_combo.currentIndexChanged.connect(self._on_model_choice)
        g.image_combo.currentIndexChanged.connect(lambda _i: self._on_image_choice())
        g.window_combo.activated.connect(lambda _i: self._apply_window())
        g.domain_list.itemChanged.connect(lambda _item: self._on_ticks_changed())
        g.backend_combo.currentIndexChanged.connect(lambda _i: self._schedule_prepare())
        g.precision_combo.currentIndexChanged.connect(lambda _i: self._schedule_prepare())
        g.device_combo.currentIndexChanged.connect(lambda _i: self._schedule_prepare())
        self.share = DomainShare(self)  # Card… / Export… / Import… (.u2d files)

        follow_layers(self.viewer, self._refresh_images, self.follow_image)
        self._refresh_images()
        self.warmed_up = False
        self._probe_devices()
        self._fill_model_choices()

    # -- layers ----------------------------------------------------------------------------------
    def _image_layers(self) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def follow_image(self, layer) -> bool:
        """Choose ``layer`` in the Image list if it is an image the user opened (not one of our
        per-voxel output layers) and no run is in progress (the run keeps its image). True if chosen."""
        from napari.layers import Image

        if self.worker is not None or not isinstance(layer, Image) or layer not in self.viewer.layers:
            return False
        meta = layer.metadata.get(META_KEY, {}) if isinstance(layer.metadata, dict) else {}
        if isinstance(meta, dict) and "map" in meta:
            return False  # a result's map (e.g. certainty): not an image to segment
        combo = self.gui.image_combo
        index = combo.findText(layer.name)
        if index < 0 or index == combo.currentIndex():
            return index >= 0
        combo.setCurrentIndex(index)  # currentIndexChanged: the ticked domains follow the image
        return True

    def _refresh_images(self, event=None) -> None:
        combo = self.gui.image_combo
        current = combo.currentText()
        combo.blockSignals(True)
        combo.clear()
        names = [layer.name for layer in self._image_layers()]
        combo.addItems(names)
        if current in names:
            combo.setCurrentText(current)
        elif names:
            combo.setCurrentIndex(len(names) - 1)
        combo.blockSignals(False)
        if combo.currentText() != current:
            self._on_image_choice()
        else:
            self._update_run_enabled()

    def _on_image_choice(self) -> None:
        """Another image: if the ticked domains are ours (or none can run on it), tick the one that
        fits it (see :func:`~training.model.domain_match.pick_domain`), first from its metadata and
        shape, then (from a worker reading its values) its modality; or none, saying why."""
        self._update_run_enabled()
        self._show_window()
        if self.model is None:
            return
        hint = self._image_hint()
        self._apply_hint(hint, new_image=True)
        self._guess_modality(hint)

    def _on_ticks_changed(self) -> None:
        if not self._ticking:  # the user's choice: kept while it can run on the image
            self._auto_ticked = False
            self._user_ticks += 1
        self._update_run_enabled()
        self._schedule_prepare()

    def _tick(self, names: list[str]) -> None:
        """Tick ``names`` as the widget's own suggestion (re-picked for the next image)."""
        self._ticking = True
        try:
            self.set_checked_domains(names)
        finally:
            self._ticking = False
        self._auto_ticked = True

    def _apply_hint(self, hint: tuple[str | None, int, str | None], new_image: bool = False) -> None:
        """Tick the domain that fits ``hint`` (or none, with the reason in the status line) unless
        the user ticked domains that can run on the image; an image that names its domain gets it."""
        if not hint[1]:
            return
        ticked = self.checked_domains()
        user_fits = not self._auto_ticked and any(self._fits(d, hint) for d in ticked)
        if user_fits or (self._auto_ticked and not new_image and any(self._fits(d, hint) for d in ticked)):
            return
        pick = self._pick(hint)
        if pick.domain is None and ticked and not self._auto_ticked and hint[2] is not None:
            # the user's own choice does not look right, but nothing better is known: keep it, say so
            why = pick.reason.removeprefix("No domain ticked: ")
            self._say(f"Kept your choice ({', '.join(ticked)}), though it may not fit this image: {why}")
            return
        if pick.domain is None and ticked and not self._auto_ticked:
            return  # values not read yet: wait for them before undoing the user's choice
        self._tick([pick.domain] if pick.domain else [])
        self._say(pick.reason)

    def _say(self, text: str) -> None:
        if text and self.worker is None:
            self.gui.status_label.setText(text)

    def _guess_modality(self, hint: tuple[str | None, int, str | None]) -> None:
        """Read a sample of the image's values in a worker (a lazy array would block the GUI
        otherwise); when the image is still the chosen one and the user has not ticked domains
        meanwhile, tick by what they suggest (CT, MR, blank, unknown)."""
        image = self.image_layer()
        if image is None or not hint[1] or hint[0] in self.model.adapters:
            return  # nothing to guess for, or the image names its domain
        user_ticks = self._user_ticks

        def done(values) -> None:
            if image is not self.image_layer():
                return
            self._show_window(values)
            if self.model is not None and user_ticks == self._user_ticks:
                self._apply_hint((hint[0], hint[1], values))

        def finished() -> None:
            self.hint_jobs -= 1

        self.hint_jobs += 1
        _jobs.start(read_values, image.data, on_done=done, on_finished=finished, owner=self)

    def _image_hint(self) -> tuple[str | None, int, str | None]:
        """(domain named in the image's metadata, its number of volumes, None: values not read yet);
        0 volumes when there is no 3D/4D image. Metadata and shape only: no data is read."""
        image = self.image_layer()
        if image is None or image.data.ndim not in (3, 4):
            return None, 0, None
        meta = image.metadata.get(META_KEY, {}) if isinstance(image.metadata, dict) else {}
        return meta.get("domain"), layer_channels(image.data), None

    def _fits(self, domain: str, hint: tuple[str | None, int, str | None]) -> bool:
        """Whether a ticked ``domain`` can stay for the image: the one it names, else one taking its
        number of volumes and, once its values are read, not of another modality."""
        named, channels, values = hint
        if named in self.model.adapters:
            return domain == named
        meta = self.model.meta(domain)
        return meta.in_channels == channels and values in (None, UNKNOWN, BLANK, meta.modality)

    def _pick(self, hint: tuple[str | None, int, str | None]):
        named, channels, values = hint
        candidates = [(n, m.modality, m.in_channels, trained_on_phantoms(m)) for n, m in self.model.adapters.items()]
        return pick_domain(candidates, channels, values, named)

    def _suggested_domains(self, hint: tuple[str | None, int, str | None] | None = None) -> list[str]:
        """The domain to pre-tick (none when nothing fits for sure): the one the image names (our
        samples do), else the only one taking its number of volumes and, once its values are read,
        its modality (CT: air in HU)."""
        pick = self._pick(hint or self._image_hint())
        return [pick.domain] if pick.domain else []

    # -- CT window ---------------------------------------------------------------------------------
    def _show_window(self, values: str | None = None) -> None:
        """Enable the CT window presets for a CT image (its metadata or, once read, its values say
        so) and show the preset its contrast limits are, if any."""
        from ._reader import CT_WINDOWS, window_limits

        combo = self.gui.window_combo
        image = self.image_layer()
        meta = image.metadata.get(META_KEY, {}) if image is not None and isinstance(image.metadata, dict) else {}
        is_ct = image is not None and image.data.ndim == 3 and (
            values == "CT" or (isinstance(meta, dict) and meta.get("modality") == "CT")
        )
        if values is None and not is_ct and combo.isEnabled() and image is self._window_image:
            return  # already enabled for this image by its values
        self._window_image = image if is_ct else None
        combo.setEnabled(is_ct)
        index = 0
        if is_ct:
            low, high = (float(v) for v in image.contrast_limits)
            for i, name in enumerate(CT_WINDOWS, start=1):
                if np.allclose((low, high), window_limits(name), atol=0.5):
                    index = i
        combo.setCurrentIndex(index)

    def _apply_window(self) -> None:
        """The chosen CT window preset becomes the image's contrast limits (level ± width/2)."""
        from ._reader import window_limits

        name = self.gui.window_combo.currentData()
        image = self.image_layer()
        if name is None or image is None:
            return
        low, high = window_limits(name)
        lo_range, hi_range = image.contrast_limits_range
        image.contrast_limits_range = (min(lo_range, low), max(hi_range, high))
        image.contrast_limits = (low, high)

    def image_layer(self):
        name = self.gui.image_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    # -- devices ---------------------------------------------------------------------------------
    def _probe_devices(self) -> None:
        """Grey out devices this machine lacks and pre-import what a run needs, in a worker (torch
        and SimpleITK are not imported at startup, nor mid-run where they would stall the GUI)."""
        self._device_worker = start_device_probe(self.gui.device_combo, "inference", self._set_devices)

    def _set_devices(self, available: dict) -> None:
        self.warmed_up = True  # devices probed and run-time imports done (benchmarks wait for it)
        try:
            from training.infer.backends import bf16_supported, unavailable_backends

            missing = unavailable_backends()
            for name, reason in missing.items():  # torch is imported by now
                grey_backend(self.gui.backend_combo, name, reason)
            if "openvino" in missing:
                for name in ("bf16", "int8"):
                    grey_backend(self.gui.precision_combo, name, missing["openvino"])
            elif not bf16_supported():
                grey_backend(self.gui.precision_combo, "bf16", "this CPU has no bf16 units")
        except Exception as e:  # noqa: BLE001 - no torch? The run says what is missing
            log.warning("backend probe failed: %s", e)
        self._schedule_prepare()

    # -- the fast path (auto: OpenVINO once prepared; _fastpath) --------------------------------------
    def _schedule_prepare(self, delay_ms: int = PREPARE_DELAY_MS) -> None:
        """Prepare the ticked domains' fast path once the choices settle (a tick, the model, the
        backend or device changed): a few quiet seconds later, or at once when a run starts."""
        self._prepare_timer.start(delay_ms)

    @property
    def prepares_fast_path(self) -> bool:
        """Only for the real inference (a stand-in ``predict_fn`` runs no backend), unless the
        environment says ``U2NET_PREPARE=0`` (e.g. a test suite, which must not convert each model)."""
        return self.predict_fn is None and os.environ.get("U2NET_PREPARE", "1") != "0"

    def _start_prepare(self) -> None:
        if self.prep_worker is not None:  # one at a time; the ticks are looked at again after it
            self._prepare_again = True
            return
        domains = self.checked_domains()
        if (self.model is None or self.model_dir is None or not domains or not self.warmed_up
                or not self.prepares_fast_path):
            return
        try:
            config = self.make_config()
        except InputError:
            return
        self._prepare_again = False
        self._prep_stop = stop = threading.Event()
        self.destroyed.connect(lambda *_: stop.set())  # the viewer closed: end the preparation's process
        self._prep_reports = reports = queue.Queue()
        # A plain daemon thread, not a napari worker: the preparation may outlive this widget (the
        # viewer closed while it stops its process), and a worker would then emit into deleted Qt
        # objects. The GUI polls its reports while it runs (_poll_prepare).
        self.prep_worker = threading.Thread(target=_prepare_thread, name="u2net-prepare", daemon=True,
                                            args=(self.model, self.model_dir, domains, config, stop, reports))
        self.prep_worker.start()
        self._prepare_poll.start(_PREPARE_POLL_MS)

    def _poll_prepare(self) -> None:
        """Hand the preparation thread's reports to the panel, on the GUI thread."""
        while True:
            try:
                kind, value = self._prep_reports.get_nowait()
            except queue.Empty:
                return
            if kind == "report":
                self._on_prepare_report(value)
            elif kind == "done":
                self._on_prepared(value)
            elif kind == "error":
                self._on_prepare_error(value)
            else:  # finished
                self._prepare_poll.stop()
                self._on_prepare_finished()
                return

    def _on_prepare_report(self, report) -> None:
        text = f"Preparing the fast path for {report.domain}, once: {report.stage}… (runs meanwhile use PyTorch)"
        self.gui.fast_label.setText(text)
        if self._prep_pbar is None:
            from napari.utils import progress

            self._prep_pbar = progress(total=100, desc=f"U²-Net: preparing the fast path for {report.domain}, once")
        self._prep_pbar.set_description(f"U²-Net: preparing the fast path for {report.domain}, once")
        value = int(100 * report.fraction)
        if value > self._prep_pbar.n:
            self._prep_pbar.update(value - self._prep_pbar.n)

    def _on_prepared(self, result: tuple) -> None:
        prepared, now = result
        if prepared:
            self.gui.fast_label.setText(f"Fast path ready: {', '.join(prepared)} now run on OpenVINO")
            log.info("fast path prepared for %s", ", ".join(prepared))
        else:
            self.gui.fast_label.setText(f"Runs on {now}" if now else "")

    def _on_prepare_error(self, error: BaseException) -> None:
        _level, text = _jobs.user_message(error, "fast-path preparation", "close other programs")
        self.gui.fast_label.setText(f"Fast path not prepared ({text}); runs use PyTorch")

    def _on_prepare_finished(self) -> None:
        self.prep_worker = None
        if self._prep_pbar is not None:
            self._prep_pbar.close()
            self._prep_pbar = None
        if self._prepare_again:
            self._schedule_prepare()

    def stop_preparing(self) -> None:
        """End a preparation under way (its process; nothing half-written stays on disk)."""
        if self._prep_stop is not None:
            self._prep_stop.set()

    # -- models ------------------------------------------------------------------------------------
    def _fill_model_choices(self) -> None:
        """List the model sources in a worker (a registry may live behind a slow URL)."""
        self.gui.model_info.setText("Looking for models…")
        self._choices_worker = _jobs.start(
            model_choices, on_done=self._set_model_choices, on_error=self._on_model_list_error
        )

    def _on_model_list_error(self, error: BaseException) -> None:
        log.error("listing models failed", exc_info=error)
        self._notify("warning", f"could not list the models ({error}); a local model folder still works")
        self._set_model_choices([])

    def _set_model_choices(self, choices: list[ModelChoice]) -> None:
        combo = self.gui.model_combo
        index = combo.currentIndex()
        current = self._choices[index] if 0 <= index < len(self._choices) else None
        local = [c for c in self._choices if c.kind == "local"]  # folders picked meanwhile stay
        self._choices = list(choices) + local
        combo.blockSignals(True)
        combo.clear()
        for c in self._choices:
            combo.addItem(c.label)
            combo.setItemData(combo.count() - 1, c.description or c.label, Qt.ToolTipRole)
        if current is not None and current in self._choices:  # keep what the user already chose
            combo.setCurrentIndex(self._choices.index(current))
            combo.blockSignals(False)
            return
        combo.blockSignals(False)
        # Start with a model already on disk; a registry model downloads only when the user picks it.
        first = next(
            (i for i, c in enumerate(self._choices) if c.available and c.kind in ("bundled", "cached")), None
        )
        if first is None:
            self.gui.model_info.setText(
                "No bundled model in this installation: pick a registry model or a local model folder (Folder…)."
            )
            self._notify(
                "warning", "the bundled model is missing from this installation; choose a registry model "
                "or a local model folder"
            )
            return
        combo.setCurrentIndex(first)
        self._on_model_choice(first)

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a U²-Net model folder")
        if folder:
            self.set_model_dir(folder)

    def set_model_dir(self, folder: str | Path, domains: list[str] | None = None) -> None:
        """Use a model directory from disk (a picked folder, or a freshly fine-tuned model)."""
        folder = Path(folder)
        choice = ModelChoice(f"{_folder_label(folder)}: {folder.name}", "local", str(folder), True, str(folder), folder)
        combo = self.gui.model_combo
        for i, c in enumerate(self._choices):
            if (c.kind == "local" and Path(c.spec) == folder) or (c.path is not None and Path(c.path) == folder):
                self._pending_domains = domains
                if combo.currentIndex() == i:
                    self._on_model_choice(i)
                else:
                    combo.setCurrentIndex(i)
                return
        self._choices.append(choice)
        combo.addItem(choice.label)
        combo.setItemData(combo.count() - 1, str(folder), Qt.ToolTipRole)
        self._pending_domains = domains
        combo.setCurrentIndex(combo.count() - 1)

    def reload_model(self, check: list[str] | None = None) -> None:
        """Reload the current model (e.g. after an adapter was added) and tick ``check``."""
        self._pending_domains = check
        self._on_model_choice(self.gui.model_combo.currentIndex())

    def _on_model_choice(self, index: int) -> None:
        if index < 0 or index >= len(self._choices):
            return
        choice = self._choices[index]
        self.model = None
        self.gui.domain_list.clear()
        self._update_run_enabled()
        if not choice.available:
            self.gui.model_info.setText(
                "The bundled model is not installed: pick a registry model or a local model folder."
            )
            self._notify("warning", "the bundled model is missing from this installation; choose another model")
            return
        self.gui.model_info.setText("Downloading…" if choice.kind == "registry" else "Loading…")
        self.model_worker = _jobs.start(
            load_model_job,
            choice,
            on_report=self._on_download_progress,
            on_done=lambda result, c=choice: self._is_current(c) and self._on_model_loaded(c, *result),
            on_error=lambda error, c=choice: self._is_current(c) and self._on_model_error(error),
        )

    def _on_download_progress(self, report: tuple[int, int]) -> None:
        done, total = report
        bar = self.gui.progress_bar
        if total:
            bar.setValue(int(1000 * done / total))
            bar.setFormat(f"downloading {done / 1e6:.1f} / {total / 1e6:.1f} MB")
        else:
            bar.setFormat(f"downloading {done / 1e6:.1f} MB")

    def _is_current(self, choice: ModelChoice) -> bool:
        """False once the user picked another model while this one loaded."""
        index = self.gui.model_combo.currentIndex()
        return 0 <= index < len(self._choices) and self._choices[index] is choice

    def _on_model_loaded(self, choice, model_dir: Path, model) -> None:
        self.model, self.model_dir = model, Path(model_dir)
        if choice.kind == "registry":  # now in the cache: no download next time
            choice.kind, choice.path = "cached", self.model_dir
        self.gui.progress_bar.setValue(0)
        self.gui.progress_bar.setFormat("idle")
        arch = model.trunk.arch
        self.gui.model_info.setText(
            f"{len(model.adapters)} domain(s) · trunk {arch.base_channels}→{arch.max_channels} ch, "
            f"{arch.levels} levels · {self.model_dir}"
        )
        pending, self._pending_domains = self._pending_domains, None
        self._fill_domains(pending)
        self.session.set_model(self.model_dir)
        self._schedule_prepare()
        if not pending:  # ticked by the image's metadata and shape: refine by its values
            self._guess_modality(self._image_hint())

    def _on_domain_added(self, folder: Path, name: str) -> None:
        """The fine-tune panel saved a domain: show it (ticked), reloading or switching the model."""
        if self.model_dir is not None and Path(self.model_dir).resolve() == Path(folder).resolve():
            self.reload_model(check=[name])
        else:
            self.set_model_dir(folder, domains=[name])

    def _on_model_error(self, error: BaseException) -> None:
        self.gui.progress_bar.setValue(0)
        self.gui.progress_bar.setFormat("idle")
        level, text = _jobs.user_message(error, "model loading", "close other programs or pick a smaller model")
        self.gui.model_info.setText(f"Cannot use this model: {text}")
        self.gui.status_label.setText("Cannot use this model: pick another one (see the note under Model).")
        self._notify(level, f"cannot use this model: {text}")

    def _fill_domains(self, check: list[str] | None = None) -> None:
        """List the model's domains, ticking ``check`` (a fine-tuned domain) or the one that fits
        the image; none when nothing fits for sure (the status line says why)."""
        lst = self.gui.domain_list
        pick = None if check else self._pick(self._image_hint())
        check = check or ([pick.domain] if pick.domain else [])
        self._ticking = True
        lst.blockSignals(True)
        lst.clear()
        for name, meta in self.model.adapters.items():
            classes = ", ".join(meta.class_names[1:]) or "—"
            item = QListWidgetItem(f"{name}  ·  {meta.modality}, {meta.in_channels} input(s)\n    {classes}")
            item.setData(Qt.UserRole, name)
            item.setToolTip(DomainShare.tooltip(meta))  # the domain's model card
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Checked if name in check else Qt.Unchecked)
            lst.addItem(item)
        lst.blockSignals(False)
        self._ticking = False
        self._auto_ticked = pick is not None  # a domain asked for (fine-tuned) is kept like the user's
        if pick is not None:
            self._say(pick.reason)
        self._update_run_enabled()

    def checked_domains(self) -> list[str]:
        lst = self.gui.domain_list
        return [
            lst.item(i).data(Qt.UserRole) for i in range(lst.count()) if lst.item(i).checkState() == Qt.Checked
        ]

    def set_checked_domains(self, names: list[str]) -> None:
        lst = self.gui.domain_list
        for i in range(lst.count()):
            item = lst.item(i)
            item.setCheckState(Qt.Checked if item.data(Qt.UserRole) in names else Qt.Unchecked)

    def _update_run_enabled(self) -> None:
        if self.worker is None:
            self.gui.run_button.setEnabled(True)  # Run explains what is missing when clicked

    # -- running -----------------------------------------------------------------------------------
    def run(self) -> None:
        """Check the inputs and start the segmentation worker (errors become notifications)."""
        if self.worker is not None:
            return
        try:
            request, image = self._make_request()
        except InputError as e:
            log.info("segmentation not started: %s", e)
            self.gui.status_label.setText(f"Not started: {e}")
            self._notify("error", str(e))
            return
        from napari.utils import progress

        self.cancel_event = threading.Event()
        model, model_dir = self.model, self.model_dir
        geometry, name = result_geometry(image), image.name  # read on the GUI thread, used in the worker

        def build(result):
            return result_layers(name, geometry, result, model.meta(result.domain), request.volume, model_dir)

        self.worker = worker = _jobs.start(
            segment_to_layers, request, self.cancel_event, self.predict_fn, build,
            on_report=self._on_report,
            on_done=lambda layers, img=image: self._on_run_returned(img, layers),
            on_error=self._on_run_error,
            on_finished=self._on_run_finished,
            autostart=False,
        )
        self.gui.set_running(True)
        self.gui.progress_bar.setValue(0)
        self.gui.progress_bar.setFormat("starting…")
        self.gui.status_label.setText(f"Segmenting {image.name!r} with {', '.join(request.domains)}…")
        self._stage = None
        self._run_backend = ""
        log.info("segmenting %r with %s (%s)", image.name, ", ".join(request.domains), request.config)
        self._pbar = progress(total=1000, desc=f"U²-Net: {image.name}")
        # napari holds millions of long-lived objects; a full garbage collection triggered by the
        # worker's allocations scans them all with the GIL held (≈ 0.9 s freeze measured at the
        # first run). Frozen objects are skipped until the run ends (as in the fine-tune panel).
        gc.freeze()
        worker.start()
        self._schedule_prepare(0)  # a domain not prepared yet: this run is eager, the next one fast

    def make_config(self) -> InferenceConfig:
        """The run options as the core's :class:`InferenceConfig` (checked by the core's own rules)."""
        g = self.gui
        config = InferenceConfig(
            device=g.device_combo.currentData(),
            overlap=float(g.overlap_spin.value()),
            batch_size=int(g.batch_spin.value()) or None,
            postprocess=g.postprocess_check.isChecked(),
            backend=g.backend_combo.currentData(),
            precision=g.precision_combo.currentData(),
            amp=g.amp_check.isChecked(),
            # the probabilities give the expected volumes and intervals; only the measurements keep them
            uncertainty=g.uncertainty_check.isChecked(),
            probabilities=g.uncertainty_check.isChecked(),
        )
        validate_config(config)
        return config

    def _make_request(self):
        image = self.image_layer()
        if image is None:
            raise InputError(
                "no image layer to segment: open a NIfTI file or DICOM folder (File ▸ Open), "
                "or a sample (File ▸ Open Sample ▸ U²-Net 3D segmentation)"
            )
        if self.model is None:
            raise InputError("no model is loaded yet: wait for it to load, or pick another model source")
        domains = self.checked_domains()
        if not domains:
            raise InputError("tick at least one domain in the list")
        volume = layer_volume(image)
        check_case(volume.channels, image.name, [self.model.meta(d) for d in domains])
        return RunRequest(self.model, volume, domains, self.make_config(), self.threads), image

    def cancel(self) -> None:
        """Ask the running job to stop; it ends within one tile batch and adds nothing."""
        if self.cancel_event is not None:
            self.cancel_event.set()
            self.gui.progress_bar.setFormat("cancelling…")
            self.gui.cancel_button.setEnabled(False)

    def _on_report(self, report: RunReport) -> None:
        if report.backend:  # the start: say what runs the network (auto's choice and why)
            self._run_backend = report.backend
            self.gui.status_label.setText(f"{self.gui.status_label.text().rstrip('…')} on {report.backend}…")
        value = round(1000 * report.fraction)
        self.gui.progress_bar.setValue(value)
        words = stage_words(report.stage)
        if (report.domain, report.stage) != self._stage:  # the detail goes to the log
            self._stage = (report.domain, report.stage)
            log.info("segmentation %s: stage %s (%d/%d)", report.domain or "-", report.stage, report.done, report.total)
        if report.domain and report.total and words == "segmenting":  # tiles: the only counted stage
            self.gui.progress_bar.setFormat(f"{report.domain}: {words} {100 * report.done // report.total}%")
        elif report.domain:
            self.gui.progress_bar.setFormat(f"{report.domain}: {words}…")
        else:
            self.gui.progress_bar.setFormat(words if words == "done" else f"{words}…")
        if self._pbar is not None and value > self._pbar.n:
            self._pbar.update(value - self._pbar.n)

    def _on_run_returned(self, image, layers: dict) -> None:
        if image not in self.viewer.layers:
            text = f"{image.name!r} was closed during the segmentation, so no result was added. Open it again and run."
            self.gui.status_label.setText(text)
            self._notify("warning", text)
        else:
            self._add_results(image, layers)

    def _on_run_error(self, error: BaseException) -> None:
        level, text = _jobs.user_message(error, "segmentation", OOM_ADVICE)  # logs the details
        self.gui.status_label.setText(text)
        self._notify(level, text)

    def _on_run_finished(self) -> None:
        gc.unfreeze()
        self.worker = None
        self.cancel_event = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.gui.set_running(False)
        self.gui.progress_bar.setValue(0)
        self.gui.progress_bar.setFormat("idle")

    # -- results ------------------------------------------------------------------------------------
    def _add_results(self, image, layers: dict) -> None:
        """Each domain's result goes in on an event-loop turn of its own (hidden: a short turn);
        showing it, selecting it, its tool overlays and its maps follow, one per turn (:mod:`._turns`)."""
        added, empty, notes = [], [], []
        for domain, (labels, maps) in layers.items():
            self.turns.add(lambda d=domain, lab=labels, ms=maps: self._add_result_steps(image, d, lab, ms))
            added += [f"{image.name} {domain}", *(m.name for m in maps)]
            if labels.metadata[META_KEY]["empty"]:
                empty.append(domain)
            notes += [f"{domain}: {note}" for note in labels.metadata[META_KEY].get("notes", [])]
        on = f" (on {self._run_backend})" if self._run_backend else ""
        self.gui.status_label.setText("Done: added " + ", ".join(repr(n) for n in added) + on)
        log.info("segmentation of %r done: added %s", image.name, ", ".join(added))
        for domain in empty:
            meta = self.model.meta(domain)
            looked_for = ", ".join(meta.class_names[1:])
            self._notify(
                "warning",
                f"{domain} found nothing in {image.name!r}: it looks for {looked_for} on {meta.modality} "
                "images. Check the image, or tick another domain.",
            )
        for note in notes:  # what the core says the user should know (an image unlike the training data…)
            self._notify("warning", note)

    def _add_result_steps(self, image, domain: str, labels, maps) -> None:
        """Insert a result now and queue the steps that finish it, then its maps' (under it, not
        selected: the result stays the layer the user edits)."""
        result, later = self._add_result(image, domain, labels)
        self.turns.add(*later)
        for m in maps:
            self.turns.add(*self._map_steps(m, below=result))

    def _map_steps(self, layer, below):
        """The steps inserting a per-voxel map's Image layer under the result ``below`` (replacing
        the map of an earlier run); nothing is inserted if the result has gone by then."""
        layers = self.viewer.layers

        def index() -> int | None:
            if below not in layers:
                return None  # removed, or the viewer closed, before its map came
            if layer.name in layers:
                layers.remove(layers[layer.name])
            return layers.index(below)

        return insert_layer_steps(self.viewer, index, layer, select=False)

    def _add_result(self, image, domain: str, layer):
        """Insert one domain's Labels layer, hidden, and return it with the steps that finish the
        job; an old result is replaced only if nobody edited it."""
        name = f"{image.name} {domain}"
        index = len(self.viewer.layers)
        if name in self.viewer.layers:
            old = self.viewer.layers[name]
            index = self.viewer.layers.index(old)
            old_meta = old.metadata.get(META_KEY, {}) if isinstance(old.metadata, dict) else {}
            if old_meta.get("result_hash") == labels_hash(old.data):
                self.viewer.layers.remove(old)
            else:
                old.name = name + PREVIOUS_SUFFIX
                old.visible = False
                index += 1
                self._notify("info", f"kept the edited layer {name!r} as {old.name!r} (hidden); the new result replaces it")
        layer.name = name
        insert, *later = insert_layer_steps(self.viewer, lambda: index, layer)
        insert()
        return layer, later

    # -- messages -----------------------------------------------------------------------------------
    def _notify(self, level: str, text: str) -> None:
        log.info("notification (%s): %s", level, text)  # the full text, should napari cut it short
        {"error": show_error, "warning": show_warning}.get(level, show_info)(text)
