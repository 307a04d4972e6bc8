"""The fine-tune dock widget: teach the model a new domain from corrected labels, in napari.

The GUI thread only reads layers, checks them, and turns the worker's
:class:`~training.train.trainer.TrainReport` stream into the plot and the progress line. Training runs
in a napari thread worker (``_finetune_worker.finetune_job``) in a staging folder; the adapter
reaches the user's model directory only once training ended (or was stopped and the user chose to
keep the best checkpoint), and is announced through the viewer's :class:`~._session.ModelSession`,
where the domain selector lists it. Layer values (modality, class names) are read in workers.

Dialogs are injectable (``ask_keep``, ``confirm_overwrite``) so tests and benchmarks answer them.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QDockWidget, QFileDialog, QMainWindow, QMessageBox, QVBoxLayout, QWidget

from training.data.labels import check_class_names
from training.errors import InputError
from training.model.domain_match import guess_modality
from training.model.layout import trunk_hash_of
from training.model.user_models import USER_MODEL, user_model_dir
from training.train.config import TEACH_ITERATIONS, TEACH_LR

from . import _finetune_worker as fw
from . import _jobs
from ._devices import start_device_probe
from ._finetune_gui import FineTuneGui, PairRow
from ._geometry import META_KEY, layer_data_to_world, layer_volume, spatial_part
from ._orientation import prepare_for_reading
from ._panel import follow_layers
from ._session import ModelSession, session_for

log = logging.getLogger(__name__)

AUTO_INIT = "auto"
RANDOM_INIT = "<random>"
OOM_ADVICE = "nothing was saved; set a smaller patch size or train on the other device, then train again"


def parse_patch(text: str) -> tuple[int, int, int] | None:
    text = text.replace(",", " ").replace("x", " ").strip()
    if not text or text.lower() == "auto":
        return None
    try:
        values = tuple(int(v) for v in text.split())
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 4:
        raise InputError(f"patch size {text!r}: give three sizes Z Y X of at least 4 voxels (e.g. 32 64 64), or leave it empty")
    return values


class FineTuneWidget(QWidget):
    """Fine-tune a new domain (adapter) of a U²-Net model on the user's labels.

    ``session``: where the base model comes from and the saved domain is announced (default: the
    viewer's, shared with its domain selector). ``ask_keep(result) -> bool`` answers "keep the
    best adapter so far?" after a Stop; ``confirm_overwrite(name, folder) -> bool`` answers "replace the existing domain?".
    ``train_fn`` replaces :func:`training.train.adaptation.adapt_domain` (tests, benchmarks).
    """

    def __init__(
        self,
        napari_viewer,
        *,
        session: ModelSession | None = None,
        ask_keep: Callable | None = None,
        confirm_overwrite: Callable | None = None,
        train_fn: Callable | None = None,
    ) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = session if session is not None else session_for(napari_viewer)
        prepare_for_reading(napari_viewer)  # radiological view and R/L, A/P markers, once per viewer
        self.ask_keep = ask_keep or self._ask_keep_dialog
        self.confirm_overwrite = confirm_overwrite or self._confirm_overwrite_dialog
        self.train_fn = train_fn
        self.gui = FineTuneGui(self)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.gui)

        self.rows: list[PairRow] = []
        self.worker = None
        self.stop_event: threading.Event | None = None
        self.result = None  # the last FineTuneResult (published or discarded)
        self.last_saved: Path | None = None
        self.source_dir: Path | None = None
        self._classes_auto = True
        self.ui_interval_s = 0.5
        self._last_ui = 0.0
        self._target_auto = True
        self.prefill_jobs = 0  # layer reads running (tests and benchmarks wait for 0)
        self._domains: list[dict] = []  # the base model's domains
        self._has_gpu = False  # until the device probe tells
        self._outcome = ""  # how the last training ended, for the progress bar

        g = self.gui
        g.iterations_spin.setValue(TEACH_ITERATIONS["cpu"])
        g.lr_spin.setValue(TEACH_LR)
        g.add_pair_button.clicked.connect(lambda: self.add_pair())
        g.train_button.clicked.connect(self.train)
        g.stop_button.clicked.connect(self.stop)
        g.base_button.clicked.connect(self._choose_base)
        g.target_button.clicked.connect(self._choose_target)
        g.classes_edit.textEdited.connect(lambda _t: setattr(self, "_classes_auto", False))
        g.target_edit.textEdited.connect(lambda _t: setattr(self, "_target_auto", False))
        g.modality_combo.currentTextChanged.connect(lambda _t: self._fill_init_domains())
        g.classes_edit.textChanged.connect(lambda _t: self._fill_init_domains())  # 'auto' follows the classes
        # the plot's axes follow the planned iterations now, not when Train is clicked
        g.iterations_spin.valueChanged.connect(lambda n: self.worker is None and g.plot.clear(int(n)))
        g.device_combo.currentIndexChanged.connect(self._on_device)

        follow_layers(self.viewer, self._refresh_layers, self.follow_layer)
        self.add_pair()
        self.warmed_up = False
        self._probe_devices()
        self._pick_default_base()
        self.session.model_changed.connect(self._on_session_model)

    # -- docking ----------------------------------------------------------------------------------
    def showEvent(self, event) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        if not getattr(self, "_shared_height", False):
            self._shared_height = True
            QTimer.singleShot(0, self.share_dock_height)

    def share_dock_height(self) -> None:
        """Docked below another panel (napari docks a second plugin panel under the first, with
        only its minimum height), take an equal share of the column: room for the live plot."""
        dock = self.parent()
        while dock is not None and not isinstance(dock, QDockWidget):
            dock = dock.parent()
        window = dock.parent() if dock is not None else None
        if not isinstance(window, QMainWindow) or dock.isFloating():
            return
        area = window.dockWidgetArea(dock)
        x = dock.geometry().x()
        column = [d for d in window.findChildren(QDockWidget)
                  if d.isVisible() and not d.isFloating() and window.dockWidgetArea(d) == area
                  and d.geometry().x() == x and d.parent() is window]
        if len(column) > 1:
            total = sum(d.height() for d in column)
            window.resizeDocks(column, [total // len(column)] * len(column), Qt.Vertical)

    # -- layers -----------------------------------------------------------------------------------
    def _layers(self, kind: str) -> list:
        from napari.layers import Image, Labels

        cls = Image if kind == "image" else Labels
        return [layer for layer in self.viewer.layers if isinstance(layer, cls)]

    def follow_layer(self, layer) -> bool:
        """A newly opened or selected layer becomes the training pair's, where that is unambiguous:
        only with a single pair (several pairs are the user's own list) and while not training.
        An image brings along a labels layer made on it (a result ``<image> <domain>``, if any); a
        labels layer brings along the image it was made on. True if the pair changed."""
        from napari.layers import Image, Labels

        if self.worker is not None or len(self.rows) != 1 or layer not in self.viewer.layers:
            return False
        row = self.rows[0]
        meta = layer.metadata.get(META_KEY, {}) if isinstance(layer.metadata, dict) else {}
        meta = meta if isinstance(meta, dict) else {}
        if isinstance(layer, Image) and "map" not in meta:
            image, labels = layer.name, self._labels_made_on(layer.name)
        elif isinstance(layer, Labels):
            image, labels = meta.get("image") or self._image_under(layer.name), layer.name
        else:
            return False
        before = (row.image_combo.currentText(), row.labels_combo.currentText())
        if image and row.image_combo.findText(image) >= 0:
            row.image_combo.setCurrentText(image)
        if labels and row.labels_combo.findText(labels) >= 0:
            row.labels_combo.setCurrentText(labels)
        return (row.image_combo.currentText(), row.labels_combo.currentText()) != before

    def _labels_made_on(self, image: str) -> str | None:
        """The newest labels layer made on ``image`` (its metadata says so, or it is named after it)."""
        for layer in reversed(self._layers("labels")):
            meta = layer.metadata.get(META_KEY, {}) if isinstance(layer.metadata, dict) else {}
            if (isinstance(meta, dict) and meta.get("image") == image) or layer.name.startswith(f"{image} "):
                return layer.name
        return None

    def _image_under(self, labels: str) -> str | None:
        """The image a labels layer is named after (``<image> <domain>``, ``<image> labels``)."""
        names = sorted((layer.name for layer in self._layers("image")), key=len, reverse=True)
        return next((n for n in names if labels.startswith(f"{n} ")), None)

    def add_pair(self, image: str | None = None, labels: str | None = None) -> PairRow:
        row = PairRow(self)
        self.rows.append(row)
        self.gui.pairs_layout.addWidget(row)
        row.remove_button.clicked.connect(lambda _=False, r=row: self.remove_pair(r))
        row.labels_combo.currentIndexChanged.connect(lambda _i: self._prefill_from_labels())
        row.image_combo.currentIndexChanged.connect(lambda _i: self._prefill_modality())
        self._refresh_layers()
        if image is not None:
            row.image_combo.setCurrentText(image)
        if labels is not None:
            row.labels_combo.setCurrentText(labels)
        return row

    def remove_pair(self, row: PairRow) -> None:
        if len(self.rows) == 1:
            return  # one pair always stays
        self.rows.remove(row)
        row.setParent(None)
        row.deleteLater()

    def set_pair(self, index: int, image: str, labels: str) -> None:
        while len(self.rows) <= index:
            self.add_pair()
        self.rows[index].image_combo.setCurrentText(image)
        self.rows[index].labels_combo.setCurrentText(labels)

    def _refresh_layers(self, event=None) -> None:
        images = [layer.name for layer in self._layers("image")]
        labels = [layer.name for layer in self._layers("labels")]
        for row in self.rows:
            for combo, names in ((row.image_combo, images), (row.labels_combo, labels)):
                current = combo.currentText()
                combo.blockSignals(True)
                combo.clear()
                combo.addItems(names)
                if current in names:
                    combo.setCurrentText(current)
                elif names:
                    combo.setCurrentIndex(len(names) - 1)
                combo.blockSignals(False)
        self._prefill_from_labels()
        self._prefill_modality()

    def _layer(self, name: str):
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _prefill(self, job, args: tuple, apply) -> None:
        """Run ``job(*args)`` (it reads layer data: a lazy array would block the GUI) in a worker,
        then ``apply`` its result on the GUI thread."""

        def finished() -> None:
            self.prefill_jobs -= 1

        self.prefill_jobs += 1
        _jobs.start(job, *args, on_done=apply, on_error=lambda e: log.debug("prefill: %s", e), on_finished=finished,
                    owner=self)

    def _prefill_from_labels(self) -> None:
        """Class names from the first labels layer's values and features (unless the user typed some)."""
        if not self._classes_auto or not self.rows:
            return
        layer = self._layer(self.rows[0].labels_combo.currentText())
        if layer is None:
            return

        def apply(names: list[str]) -> None:
            if self._classes_auto and layer is self._layer(self.rows[0].labels_combo.currentText()):
                self.gui.classes_edit.setText(", ".join(names))

        self._prefill(fw.default_class_names, (layer.data, layer.features), apply)

    def _prefill_modality(self) -> None:
        """CT if the image holds Hounsfield-like air values, else MR (the user can change it)."""
        if not self.rows:
            return
        layer = self._layer(self.rows[0].image_combo.currentText())
        if layer is None or layer.multiscale:
            return

        def apply(modality: str | None) -> None:
            if layer is self._layer(self.rows[0].image_combo.currentText()):
                self.gui.modality_combo.setCurrentText("CT" if modality == "CT" else "MR")

        self._prefill(guess_modality, (layer.data,), apply)

    # -- devices and models ---------------------------------------------------------------------------
    def _probe_devices(self) -> None:
        self._device_worker = start_device_probe(self.gui.device_combo, "training", self._set_devices)

    def _set_devices(self, available: dict) -> None:
        self.warmed_up = True  # devices probed and run-time imports done (benchmarks wait for it)
        self._has_gpu = bool(available.get("cuda") or available.get("mps"))
        self._on_device()

    def _on_device(self, _index: int = 0) -> None:
        """Iterations default: short on the CPU, longer on a GPU (only while untouched)."""
        key = self.gui.device_combo.currentData()
        gpu = key in ("cuda", "mps") or (key == "auto" and self._has_gpu)
        spin = self.gui.iterations_spin
        if spin.value() in TEACH_ITERATIONS.values():
            spin.setValue(TEACH_ITERATIONS["gpu" if gpu else "cpu"])

    def _pick_default_base(self) -> None:
        """The domain selector's model (through the session), else the bundled one."""
        from training.io.folders import bundled_model_dir

        folder = self.session.model_dir or bundled_model_dir()
        if (Path(folder) / fw.TRUNK_FILE).exists():
            self.set_base_model(folder)
        else:
            self.gui.base_label.setText("none yet: load a model in the domain selector or pick a folder")

    def _on_session_model(self, folder: Path) -> None:
        """The domain selector loaded a model: it becomes the base while there is none yet."""
        if self.source_dir is None and self.worker is None:
            self._pick_default_base()

    def set_base_model(self, folder: str | Path, target: str | Path | None = None) -> None:
        """The model to start from; the 'Save to' folder follows unless the user chose one."""
        folder = Path(folder)
        try:
            trunk_hash = trunk_hash_of(folder)
            domains = fw.model_domains(folder)
        except Exception as e:  # unreadable: say so, keep the previous choice
            log.info("%s is not a usable model folder: %s: %s", folder, type(e).__name__, e)
            text = f"{folder.name!r} is not a U²-Net model folder. Pick one that holds trunk.safetensors and adapters/."
            self.gui.status_label.setText(text)
            self._notify("error", text)
            return
        self.source_dir = folder
        self._domains = [d for d in domains if "error" not in d]
        self.gui.base_label.setText(f"{folder.name} ({len(self._domains)} domains)")
        self.gui.base_label.setToolTip(str(folder))
        self._fill_init_domains()
        if target is not None:
            self.gui.target_edit.setText(str(target))
            self._target_auto = False
        elif self._target_auto:
            writable = _is_user_folder(folder)
            dest = folder if writable else user_model_dir(trunk_hash)
            self.gui.target_edit.setText(str(dest))

    def _fill_init_domains(self) -> None:
        """'auto' first (selected unless the user picked a domain that still exists)."""
        combo = self.gui.init_combo
        current = combo.currentData()
        combo.blockSignals(True)
        combo.clear()
        modality = self.gui.modality_combo.currentText()
        auto = self._closest(modality)
        combo.addItem(f"auto (closest: {auto})" if auto else "auto", AUTO_INIT)
        for d in self._domains:
            combo.addItem(f"{d['name']} ({d.get('modality', '')})", d["name"])
        combo.addItem("none (random start)", RANDOM_INIT)
        index = combo.findData(current) if current else -1
        combo.setCurrentIndex(max(index, 0))
        combo.blockSignals(False)

    def _closest(self, modality: str, exclude: str | None = None) -> str | None:
        """The domain 'auto' starts from: the trainer's own rule (modality, channels, classes)."""
        from training.model.domain_match import closest_domain_name

        num_classes = len(fw.parse_class_names(self.gui.classes_edit.text()))
        candidates = [
            (d["name"], d.get("modality", ""), max(1, len(d.get("modalities") or [None])), len(d.get("classes") or []))
            for d in self._domains if d["name"] != exclude
        ]
        return closest_domain_name(candidates, modality, self._image_channels(), num_classes)

    def _image_channels(self) -> int:
        """Modalities in the first pair's image layer (a 4D layer holds one volume per modality)."""
        layer = self._layer(self.rows[0].image_combo.currentText()) if self.rows else None
        shape = getattr(getattr(layer, "data", None), "shape", ())
        return int(shape[0]) if len(shape) == 4 else 1

    def _choose_base(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose the U²-Net model to start from")
        if folder:
            self.set_base_model(folder)

    def _choose_target(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose your model folder (for fine-tuned domains)")
        if folder:
            self.gui.target_edit.setText(folder)
            self._target_auto = False

    # -- building the request -------------------------------------------------------------------------
    def _pairs(self, only_labelled: bool) -> list[fw.TrainingPair]:
        pairs, seen = [], set()
        for i, row in enumerate(self.rows):
            image, labels = self._layer(row.image_combo.currentText()), self._layer(row.labels_combo.currentText())
            if image is None or labels is None:
                raise InputError(
                    f"pair {i + 1}: choose an image layer and the labels layer corrected on it "
                    "(open an image, run a domain or add a Labels layer and paint)"
                )
            if (image.name, labels.name) in seen:
                continue
            seen.add((image.name, labels.name))
            volume = layer_volume(image)
            if labels.ndim != 3:
                raise InputError(f"labels layer {labels.name!r} is {labels.ndim}D; a 3D labels layer is needed")
            lab_matrix = layer_data_to_world(labels)
            img_matrix = layer_data_to_world(image)
            if image.ndim == 4:
                img_matrix = spatial_part(img_matrix)
            fw.check_geometry(image.name, volume.shape, img_matrix, labels.name, labels.data.shape, lab_matrix)
            target = fw.prepare_labels(np.asarray(labels.data), labels.name, only_labelled)
            pairs.append(fw.TrainingPair(image.name, np.asarray(volume.data), volume.affine, labels.name, target))
        channels = {p.image.shape[0] for p in pairs}
        if len(channels) > 1:
            raise InputError("the images have different numbers of modalities; every pair must have the same")
        return pairs

    def make_request(self) -> fw.FineTuneRequest:
        """Read and check everything the user set; InputError names what to fix."""
        from training.train.config import teaching_config
        from training.train.runs import domain_name

        g = self.gui
        raw = g.name_edit.text().strip()
        if not raw:
            raise InputError("give the new domain a name (e.g. liver-ct)")
        name = domain_name(raw)
        if self.source_dir is None:
            raise InputError("no base model: load a model in the domain selector, or pick one with Folder…")
        target = Path(g.target_edit.text().strip()).expanduser() if g.target_edit.text().strip() else None
        if target is None:
            raise InputError("choose the folder to save the new domain in ('Save to')")
        only = g.sparse_check.isChecked()
        pairs = self._pairs(only)
        names = fw.parse_class_names(g.classes_edit.text())
        check_class_names(names, [p.labels for p in pairs])
        patch = parse_patch(g.patch_edit.text())
        iterations = int(g.iterations_spin.value())
        device = g.device_combo.currentData() or "auto"
        gpu = device in ("cuda", "mps") or (device == "auto" and self._has_gpu)
        config = teaching_config(gpu, iterations=iterations, lr=float(g.lr_spin.value()), patch_size=patch,
                                 device=device)
        colors = self._colors(pairs, len(names))
        return fw.FineTuneRequest(
            source_dir=self.source_dir, target_dir=target, name=name, pairs=pairs, class_names=names,
            modality=g.modality_combo.currentText(), init_from=self._init_from(), config=config,
            only_labelled_slices=only, colors=colors,
        )

    def _init_from(self) -> str | None:
        value = self.gui.init_combo.currentData()
        return None if value == RANDOM_INIT else (value or AUTO_INIT)

    def _colors(self, pairs, n: int) -> list[str] | None:
        """The first labels layer's colours, so the result looks like what was painted."""
        layer = self._layer(self.rows[0].labels_combo.currentText())
        try:
            from matplotlib.colors import to_hex

            cmap = layer.colormap
            out = ["#000000"]
            for v in range(1, n):
                out.append(to_hex(np.asarray(cmap.map(np.array([v]))).reshape(-1)[:3]))
            return out
        except Exception:  # colours are cosmetic: fall back to the model's defaults
            return None

    def _existing_domains(self, target: Path) -> set[str]:
        names = {p.stem for p in (target / fw.ADAPTER_DIR).glob("*.safetensors")} if target.is_dir() else set()
        if not (target / fw.TRUNK_FILE).exists() and self.source_dir is not None:
            names |= {p.stem for p in (self.source_dir / fw.ADAPTER_DIR).glob("*.safetensors")}
        return names

    # -- running ------------------------------------------------------------------------------------
    def train(self) -> None:
        """Check the inputs and start the training worker (problems become notifications)."""
        if self.worker is not None:
            return
        try:
            request = self.make_request()
        except InputError as e:
            log.info("fine-tuning not started: %s", e)
            self.gui.status_label.setText(f"Not started: {e}")
            self._notify("error", str(e))
            return
        if request.name in self._existing_domains(Path(request.target_dir)):
            if not self.confirm_overwrite(request.name, Path(request.target_dir)):
                log.info("not overwriting domain %r in %s", request.name, request.target_dir)
                text = f"Not started: domain {request.name!r} already exists in your model folder. Choose another name."
                self.gui.status_label.setText(text)
                self._notify("warning", text)
                return
            request.overwrite = True
            if request.init_from in (AUTO_INIT, request.name):  # not from the adapter being replaced
                request.init_from = self._closest(request.modality, exclude=request.name)
        self.stop_event = threading.Event()
        self._outcome = ""
        self.worker = worker = _jobs.start(
            fw.finetune_job, request, self.stop_event, train_fn=self.train_fn,
            on_report=self._on_report, on_done=self._on_done, on_error=self._on_error,
            on_finished=self._on_finished, autostart=False,
        )
        self.request = request
        # napari holds millions of long-lived objects; a full garbage collection triggered by the
        # worker's allocations scans them all with the GIL held (≈ 1 s freeze measured). Frozen
        # objects are skipped until training ends.
        gc.freeze()
        self.gui.set_running(True)
        self.gui.plot.clear(request.config.iterations)
        self.gui.show_plot()  # the settings are locked now: show the live plot instead
        self.gui.progress_bar.setValue(0)
        self.gui.progress_bar.setFormat("starting…")
        n_vox = sum(int((p.labels != fw.IGNORE_INDEX).sum()) for p in request.pairs)
        self.gui.status_label.setText(f"Training {request.name!r} on {len(request.pairs)} image(s)…")
        log.info("fine-tuning %r: %d pair(s), %d labelled voxels, %s, from %s into %s", request.name,
                 len(request.pairs), n_vox, request.config, request.source_dir, request.target_dir)
        worker.start()

    def stop(self) -> None:
        """Ask the worker to stop; it ends within one iteration, then asks what to keep."""
        if self.stop_event is not None:
            self.stop_event.set()
            self.gui.stop_button.setEnabled(False)
            self.gui.progress_bar.setFormat("stopping…")

    def _on_report(self, report) -> None:
        """Record every report; repaint at most every ``ui_interval_s`` (and at validations).

        Under software OpenGL (Xvfb, remote desktops) any repaint inside napari's window costs
        tens of milliseconds of window composition, so the panel does not repaint per iteration.
        """
        self.gui.plot.record(report.iteration, report.loss, report.val_mean)
        now = time.monotonic()
        total = report.iterations or self.request.config.iterations
        if report.val_mean is None and report.iteration < total and now - self._last_ui < self.ui_interval_s:
            return
        self._last_ui = now
        self.gui.progress_bar.setValue(int(1000 * report.iteration / max(total, 1)))
        left = _format_seconds(report.eta_s)
        val = f" · Dice {report.val_mean:.3f}" if report.val_mean is not None else ""
        self.gui.progress_bar.setFormat(f"{report.iteration}/{total} · loss {report.loss:.3f}{val} · {left} left")
        self.gui.plot.flush()

    def _on_done(self, result) -> None:
        self.result = result
        self._outcome = "stopped" if result.stopped else "done"
        self.gui.plot.flush()
        keep = True
        if result.stopped:
            keep = bool(self.ask_keep(result))
        if not keep:
            fw.discard(result)
            text = f"Stopped after {result.iterations_done} iterations; the new domain was discarded."
            self.gui.status_label.setText(text)
            self._notify("info", text)
            return
        try:
            path = fw.publish(result)
        except Exception as e:  # e.g. the folder became read-only meanwhile
            fw.discard(result)
            log.error("saving the adapter into %s failed: %s: %s", result.request.target_dir,
                      type(e).__name__, e, exc_info=e)
            text = "Could not save the new domain into your model folder. Choose another 'Save to' folder and train again."
            self.gui.status_label.setText(text)
            self._notify("error", text)
            return
        self.last_saved = path
        name = result.request.name
        best = f" (agreement with your labels: Dice {result.best_val:.2f})" if result.best_val is not None else ""
        log.info("saved domain %r after %d iterations (best validation Dice %s) as %s", name,
                 result.iterations_done, result.best_val, path)
        text = f"Saved the new domain {name!r}{best}; it is ticked in the domain selector, ready to run."
        if not len(self.session.domain_added):
            text = f"Saved the new domain {name!r}{best} in {path.parent.parent}."
        self.gui.status_label.setText(text)
        self._notify("info", text)
        self._announce(Path(result.request.target_dir), name)

    def _announce(self, folder: Path, name: str) -> None:
        """Make the new domain appear (ticked) in the domain selector at once (through the session)."""
        if not len(self.session.domain_added):
            self._notify("info", f"open the domain selector and choose the folder {folder} to run {name!r}")
            return
        self.session.add_domain(folder, name)

    def _on_error(self, error: BaseException) -> None:
        level, text = _jobs.user_message(error, "fine-tuning", OOM_ADVICE)  # logs the details
        self._outcome = "stopped" if level == "info" else "failed"
        self.gui.status_label.setText(text)
        self._notify(level, text)

    def _on_finished(self) -> None:
        gc.unfreeze()
        self.worker = None
        self.stop_event = None
        self.gui.set_running(False)
        if self._outcome:  # the bar says how it ended; the status line says what to do next
            self.gui.progress_bar.setFormat(self._outcome)

    # -- dialogs --------------------------------------------------------------------------------------
    def _ask_keep_dialog(self, result) -> bool:
        best = (f"the best so far (iteration {result.best_iteration}, Dice {result.best_val:.3f} on your labels)"
                if result.best_val is not None and result.chosen_file == result.best_file
                else f"the adapter as trained so far ({result.iterations_done} iterations)")
        answer = QMessageBox.question(
            self, "Fine-tuning stopped",
            f"Training of {result.request.name!r} stopped after {result.iterations_done} of "
            f"{result.request.config.iterations} iterations.\n\nKeep {best}, or discard it?",
            QMessageBox.Save | QMessageBox.Discard, QMessageBox.Save,
        )
        return answer == QMessageBox.Save

    def _confirm_overwrite_dialog(self, name: str, folder: Path) -> bool:
        answer = QMessageBox.question(
            self, "Domain exists",
            f"The domain {name!r} already exists in {folder}.\nReplace it with the one you are about to train?",
            QMessageBox.Yes | QMessageBox.No, QMessageBox.No,
        )
        return answer == QMessageBox.Yes

    def _notify(self, level: str, text: str) -> None:
        log.info("notification (%s): %s", level, text)  # the full text, should napari cut it short
        {"error": show_error, "warning": show_warning}.get(level, show_info)(text)


def _is_user_folder(folder: Path) -> bool:
    """A user model folder made by this panel (``<cache>/models/user*``): trained into directly.

    Any other base model (bundled, downloaded, a folder picked on disk) is copied first, so
    fine-tuning never writes into a package folder, a checksummed download or someone's model.
    """
    from training.io.folders import cache_dir

    folder = folder.resolve()
    return folder.parent == (cache_dir() / "models").resolve() and folder.name.startswith(USER_MODEL)


def _format_seconds(s: float) -> str:
    s = int(round(max(s, 0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
