"""The Measurements dock: each result's structures with their volume, the model's expected volume
and its interval, and the image intensity inside; it follows the user's hand edits and exports CSV.

The predicted figures (expected volume, interval) come with the result (computed in the
segmentation worker from the class probabilities, :func:`training.infer.measure.measure_result`,
kept in the layer's metadata). What the user can change — the labels — is measured again after
each edit (:func:`training.infer.measure.measure_labels`), in a napari thread worker so that a
CT-sized volume never stalls painting; the predicted figures then stay as the model gave them
and say so.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from training.errors import InputError
from training.infer.measure import measure_labels, voxel_volume_ml, write_stats

from ._geometry import META_KEY

log = logging.getLogger(__name__)

# Few, short columns: the dock is narrow. Each result is a bold row spanning the table, its
# structures follow; "Model" is the expected volume with its 90 % interval.
COLUMNS = ("Structure", "Volume (mL)", "Model (mL)", "Mean ± SD")
EDIT_DELAY_MS = 300  # one re-measure after a burst of brush strokes, not one per stroke
PREDICTED_TIP = ("The model's expected volume and its 90 % interval, from its probabilities when it segmented "
                 "the image (hand edits do not change it)")


def result_meta(layer) -> dict | None:
    """The result metadata of a Labels layer made by the domain selector, else None."""
    meta = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
    if getattr(layer, "_type_string", "") != "labels" or not meta or "classes" not in meta or "affine" not in meta:
        return None
    return meta


def _measure(labels, voxel_ml: float, names: list[str], image) -> tuple[list, str]:
    """In a worker thread: the labels' measurements and fingerprint (edited or still the result?)."""
    from ._widget import labels_hash

    return measure_labels(labels, voxel_ml, names, image), labels_hash(labels)


def _number(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


class MeasurementsWidget(QWidget):
    """One row per structure of every result layer in the viewer."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        # per layer name: rows (dicts of ClassMeasure fields) and whether they follow an edit
        self.rows: dict[str, list[dict]] = {}
        self.edited: dict[str, bool] = {}
        self._dirty: set[str] = set()
        self._workers: dict = {}
        self._connected: set[int] = set()

        layout = QVBoxLayout(self)
        self.info_label = QLabel("Volume follows your edits; Model: expected volume (90 % interval).")
        self.info_label.setToolTip(
            "Volume: the labels' voxels × the voxel volume. Model: the expected volume and its 90 % interval "
            "from the model's probabilities ('Uncertainty' in the domain selector). Mean ± SD: the image "
            "intensity inside (HU on CT)."
        )
        self.info_label.setWordWrap(True)
        layout.addWidget(self.info_label)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.setMinimumHeight(120)
        layout.addWidget(self.table, stretch=1)
        row = QHBoxLayout()
        self.export_button = QPushButton("Export CSV…")
        self.export_button.setToolTip("Save every row of this table as a CSV file")
        self.export_button.clicked.connect(self._choose_export)
        row.addStretch(1)
        row.addWidget(self.export_button)
        layout.addLayout(row)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(EDIT_DELAY_MS)
        self._timer.timeout.connect(self._measure_dirty)
        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        self._on_layers_changed()

    # -- layers ---------------------------------------------------------------------------------------
    def result_layers(self) -> list:
        return [layer for layer in self.viewer.layers if result_meta(layer) is not None]

    def _on_layers_changed(self, _event=None) -> None:
        names = set()
        for layer in self.result_layers():
            names.add(layer.name)
            if id(layer) not in self._connected:
                self._connected.add(id(layer))
                for event in ("paint", "data", "labels_update"):
                    emitter = getattr(layer.events, event, None)
                    if emitter is not None:
                        emitter.connect(lambda _e, lay=layer: self._on_edit(lay))
            if layer.name not in self.rows:
                measured = result_meta(layer).get("measurements")
                self.rows[layer.name] = [dict(r) for r in measured or []]
                self.edited[layer.name] = False
                if measured is None:  # labels of ours without a result's figures (a reference): measure them
                    self._on_edit(layer)
        for gone in set(self.rows) - names:
            self.rows.pop(gone, None)
            self.edited.pop(gone, None)
        self._fill()

    def _on_edit(self, layer) -> None:
        if layer in self.viewer.layers:
            self._dirty.add(layer.name)
            self._timer.start()

    # -- measuring ------------------------------------------------------------------------------------
    def _measure_dirty(self) -> None:
        from napari.qt.threading import create_worker

        for name in list(self._dirty):
            if name in self._workers or name not in self.viewer.layers:
                continue  # still measuring the previous edit: the next timer tick takes it
            self._dirty.discard(name)
            layer = self.viewer.layers[name]
            meta = result_meta(layer)
            labels = np.asarray(layer.data)
            image = self._image_of(meta, labels.shape)
            worker = create_worker(
                _measure, labels.copy(), voxel_volume_ml(meta["affine"]), list(meta["classes"]), image,
            )
            result_hash = meta.get("result_hash")
            worker.returned.connect(lambda out, n=name, h=result_hash: self._on_measured(n, *out, h))
            worker.errored.connect(lambda e, n=name: log.warning("could not measure %r: %s", n, e))
            worker.finished.connect(lambda n=name: self._on_worker_done(n))
            self._workers[name] = worker
            worker.start()
        if self._dirty:
            self._timer.start()

    def _image_of(self, meta: dict, shape) -> np.ndarray | None:
        """The segmented image's voxels when it is still open and on the labels' grid."""
        name = meta.get("image")
        if name not in self.viewer.layers:
            return None
        data = self.viewer.layers[name].data
        if getattr(data, "shape", None) is None or tuple(data.shape[-3:]) != tuple(shape):
            return None
        return np.asarray(data)

    def _on_measured(self, name: str, measured, labels_hash: str, result_hash: str | None) -> None:
        predicted = {r["label"]: r for r in self.rows.get(name, [])}
        rows = []
        for m in measured:
            row = asdict(m)
            old = predicted.get(m.label, {})
            for key in ("expected_ml", "low_ml", "high_ml"):
                row[key] = old.get(key)
            rows.append(row)
        self.rows[name] = rows
        # an undo back to the result is not an edit; labels that are no result (a reference) are never "edited"
        self.edited[name] = result_hash is not None and labels_hash != result_hash
        self._fill()

    def _on_worker_done(self, name: str) -> None:
        self._workers.pop(name, None)

    # -- showing --------------------------------------------------------------------------------------
    def _fill(self) -> None:
        from qtpy.QtGui import QFont

        lines: list[tuple[str, dict | None]] = []
        for name, rows in self.rows.items():
            lines.append((name, None))
            lines += [(name, row) for row in rows]
        self.table.clearSpans()
        self.table.setRowCount(len(lines))
        bold = QFont()
        bold.setBold(True)
        for i, (name, row) in enumerate(lines):
            if row is None:  # the result's own row
                item = QTableWidgetItem(name + (" (edited)" if self.edited.get(name) else ""))
                item.setFont(bold)
                item.setToolTip(name)
                self.table.setItem(i, 0, item)
                for j in range(1, len(COLUMNS)):
                    self.table.setItem(i, j, QTableWidgetItem(""))
                self.table.setSpan(i, 0, 1, len(COLUMNS))
                continue
            model = "—" if row.get("expected_ml") is None else (
                f"{row['expected_ml']:.1f} ({row['low_ml']:.1f}–{row['high_ml']:.1f})")
            spread = "—" if row.get("mean") is None else f"{row['mean']:.0f} ± {row['std']:.0f}"
            for j, text in enumerate((row["name"], _number(row["volume_ml"]), model, spread)):
                item = QTableWidgetItem(text)
                if j >= 1:
                    item.setTextAlignment(int(Qt.AlignRight | Qt.AlignVCenter))
                if j == 2:
                    item.setToolTip(PREDICTED_TIP)
                self.table.setItem(i, j, item)
        self.export_button.setEnabled(bool(self.rows))

    # -- export ---------------------------------------------------------------------------------------
    def stats_rows(self) -> list[dict]:
        """The table as rows of the core's stats format (case = the segmented image's name)."""
        out = []
        for name, rows in self.rows.items():
            meta = result_meta(self.viewer.layers[name]) if name in self.viewer.layers else {}
            for row in rows:
                out.append({"case": meta.get("image", name), "domain": meta.get("domain", ""), **row})
        return out

    def export_csv(self, path: str | Path) -> Path:
        """Write the table to ``path`` (CSV, atomically; replaces a file the user chose to replace)."""
        return write_stats(Path(path).with_suffix(".csv"), self.stats_rows(), overwrite=True)

    def _choose_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export measurements", "measurements.csv", "CSV (*.csv)")
        if not path:
            return
        try:
            written = self.export_csv(path)
        except (OSError, InputError) as e:  # a full disk, a read-only folder: say it, keep the table
            show_error(f"could not export the measurements: {e}")
            return
        show_info(f"measurements saved to {written}")
