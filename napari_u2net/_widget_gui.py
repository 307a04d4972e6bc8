"""Layout of the domain selector: widgets only, no behaviour (that is in ``_widget.py``).

The choices (image, model, domains, run options) sit in a scroll area (:class:`~._panel.ScrollingPanel`); Run/Cancel,
the progress bar and the status line stay pinned below it, so they remain visible whatever the
dock's height (both panels docked in a 1366×768 window: ``tests/test_plugin_layout.py``).

The run options show the core's own choices and defaults (:mod:`training.infer.config`), so a
default changed or a backend added there appears here without a change in the plugin.
"""

from __future__ import annotations

import importlib.util

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from training.infer.config import BACKENDS, PRECISIONS, InferenceConfig

from ._devices import device_combo
from ._panel import ScrollingPanel

# Backends that need an optional package: greyed out (with the reason) where it is not installed.
BACKEND_PACKAGES = {"openvino": ("openvino", "pip install napari-u2net[openvino]")}
BACKEND_LABELS = {"auto": "auto (fastest ready)", "torch": "PyTorch", "compiled": "compiled (CPU)",
                  "openvino": "OpenVINO (CPU)"}
BACKEND_TIPS = {
    "auto": "The fastest path ready now: PyTorch with mixed precision on a GPU; on a CPU OpenVINO once it is "
            "prepared for the domain (in the background, once per domain), PyTorch until then",
    "torch": "Eager PyTorch: always there, the slowest on a CPU",
    "compiled": "TorchInductor ahead-of-time (CPU, needs a C++ compiler): the first run per domain compiles for minutes",
    "openvino": "OpenVINO (CPU): about 8x faster than PyTorch; the first run per domain converts it",
}


def choice_combo(names, labels: dict, tips: dict, default: str, tooltip: str) -> QComboBox:
    """One item per name (its label shown, its tip on hover, the name as its data), ``default``
    selected."""
    combo = QComboBox()
    for name in names:
        combo.addItem(labels.get(name, name), name)
        combo.setItemData(combo.count() - 1, tips.get(name, name), Qt.ToolTipRole)
    combo.setCurrentIndex(max(combo.findData(default), 0))
    combo.setToolTip(tooltip)
    return combo


def backend_combo() -> QComboBox:
    """Every backend of :data:`training.infer.config.BACKENDS`, the core's default selected."""
    combo = choice_combo(BACKENDS, BACKEND_LABELS, BACKEND_TIPS, InferenceConfig.backend,
                         "What runs the network; greyed out: not available here (hover for why)")
    for name, (package, hint) in BACKEND_PACKAGES.items():
        if importlib.util.find_spec(package) is None:
            grey_backend(combo, name, f"needs {package}: {hint}")
    return combo


PRECISION_LABELS = {"auto": "auto (INT8 where accepted)", "f32": "float32", "bf16": "bfloat16 (CPU)",
                    "int8": "INT8 (CPU, prepared)"}
PRECISION_TIPS = {
    "auto": "float32, or INT8 for a domain where `u2net prepare --precision int8` quantised it and its check "
            "accepted it (at most 0.005 Dice lost, faster)",
    "f32": "float32 throughout: the labels agree with PyTorch's",
    "bf16": "OpenVINO with bfloat16 arithmetic (CPUs with bf16 units): about 1.5x faster, labels may differ "
            "slightly from float32's",
    "int8": "OpenVINO's INT8 graph of the domain: prepare it first with `u2net prepare --precision int8 "
            "--domain NAME` (kept only where its check accepts it)",
}


def precision_combo() -> QComboBox:
    """Every precision of :data:`training.infer.config.PRECISIONS`, the core's default selected."""
    return choice_combo(PRECISIONS, PRECISION_LABELS, PRECISION_TIPS, InferenceConfig.precision,
                        "The number format OpenVINO runs in on a CPU; greyed out: not available here (hover for why)")


def grey_backend(combo: QComboBox, name: str, reason: str) -> None:
    """Disable item ``name`` (a backend, a precision) in ``combo``, its tooltip saying why (what to install)."""
    i = combo.findData(name)
    if i < 0:
        return
    combo.model().item(i).setEnabled(False)
    combo.setItemData(i, f"unavailable: {reason}", Qt.ToolTipRole)
    if combo.currentIndex() == i:
        combo.setCurrentIndex(max(combo.findData("auto"), 0))


def ct_window_combo() -> QComboBox:
    """CT window presets (:data:`~._reader.CT_WINDOWS`) for the chosen image: "—" while its
    contrast is none of them; greyed out for an image that is not a CT."""
    from ._reader import CT_WINDOWS

    combo = QComboBox()
    combo.addItem("—", None)
    for name, (width, level) in CT_WINDOWS.items():
        combo.addItem(f"{name}  (W {width:g} / L {level:g})", name)
    combo.setToolTip("Window of the chosen CT image (width / level in HU)")
    combo.setEnabled(False)
    return combo


class DomainSelectorGui(ScrollingPanel):
    """The controls of the domain selector, laid out top to bottom in the order they are used."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        outer = self.body_layout

        form = QFormLayout()
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The 3D image layer to segment (a 4D layer = several modalities)")
        form.addRow("Image", self.image_combo)
        self.window_combo = ct_window_combo()
        form.addRow("CT window", self.window_combo)

        model_row = QHBoxLayout()
        self.model_combo = QComboBox()
        self.model_combo.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.model_combo.setToolTip("Bundled model, a registry model (downloaded once), or a local folder")
        self.folder_button = QPushButton("Folder…")
        self.folder_button.setToolTip("Use a model directory on disk (trunk.safetensors + adapters/)")
        model_row.addWidget(self.model_combo)
        model_row.addWidget(self.folder_button)
        form.addRow("Model", model_row)
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        self.model_info.setStyleSheet("color: gray")
        form.addRow("", self.model_info)
        outer.addLayout(form)

        domains_box = QGroupBox("Domains (one result layer each)")
        domains_layout = QVBoxLayout(domains_box)
        self.domain_list = QListWidget()
        self.domain_list.setSelectionMode(QAbstractItemView.NoSelection)
        self.domain_list.setWordWrap(True)
        self.domain_list.setMinimumHeight(120)
        domains_layout.addWidget(self.domain_list)
        self._add_share_row(domains_layout)
        outer.addWidget(domains_box, stretch=1)

        options = QFormLayout()
        self.device_combo = device_combo()
        options.addRow("Device", self.device_combo)
        self.backend_combo = backend_combo()
        options.addRow("Backend", self.backend_combo)
        self.precision_combo = precision_combo()
        options.addRow("Precision", self.precision_combo)
        self.fast_label = QLabel("")  # what auto takes, and the fast path's preparation
        self.fast_label.setWordWrap(True)
        self.fast_label.setStyleSheet("color: gray")
        options.addRow("", self.fast_label)
        self.overlap_spin = QDoubleSpinBox()
        self.overlap_spin.setRange(0.0, 0.9)
        self.overlap_spin.setSingleStep(0.05)
        self.overlap_spin.setValue(InferenceConfig.overlap)
        self.overlap_spin.setToolTip("Fraction by which neighbouring tiles overlap (more = smoother, slower)")
        options.addRow("Tile overlap", self.overlap_spin)
        self.postprocess_check = QCheckBox("remove stray islands")
        self.postprocess_check.setToolTip(
            "Keep each class's usual number of connected pieces (from its training labels, e.g. both "
            "kidneys) and drop small islands elsewhere"
        )
        self.postprocess_check.setChecked(InferenceConfig.postprocess)
        options.addRow("Clean-up", self.postprocess_check)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(0, 64)
        self.batch_spin.setSpecialValueText("auto")  # 0 = None: the core picks per device
        self.batch_spin.setValue(InferenceConfig.batch_size or 0)
        self.batch_spin.setToolTip("Tiles per forward pass (auto: several on a GPU, one on the CPU)")
        options.addRow("Batch size", self.batch_spin)
        self.amp_check = QCheckBox("mixed precision (CUDA only)")
        self.amp_check.setChecked(InferenceConfig.amp)
        options.addRow("", self.amp_check)
        self.uncertainty_check = QCheckBox("uncertainty map, volume intervals")
        self.uncertainty_check.setToolTip(
            "Also show where the model is unsure (0 sure … 1 unsure) and give each structure's volume "
            "with an interval (Measurements panel); costs some time and memory"
        )
        # On in the panel (the core's default is off): it is what warns that a scan looks unlike the
        # domain's training data (a 2-volume fMRI run with prostate-mr: 4.2× its validation
        # uncertainty), for +13 % time on a CT-sized scan (bench/bench_calibration.py)
        self.uncertainty_check.setChecked(True)
        options.addRow("Uncertainty", self.uncertainty_check)
        outer.addLayout(options)

        self.run_button, self.cancel_button, self.progress_bar, self.status_label = self.add_footer(
            "Run", "Cancel", status_lines=2
        )

    def _add_share_row(self, layout) -> None:
        """Card… / Export… / Import… under the domain list (sharing a domain as one .u2d file)."""
        row = QHBoxLayout()
        self.card_button = QPushButton("Card…")
        self.card_button.setToolTip("The ticked domain's model card: data, held-out Dice, intended use, limits")
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip("Save the ticked domain as one .u2d file to give to a colleague")
        self.import_button = QPushButton("Import…")
        self.import_button.setToolTip("Add a domain from a .u2d file (it must come from a model with this trunk)")
        self.share_buttons = (self.card_button, self.export_button, self.import_button)
        for b in self.share_buttons:
            row.addWidget(b)
        layout.addLayout(row)

    def set_running(self, running: bool) -> None:
        """Lock the inputs while a job runs; only Cancel stays live."""
        for w in (self.image_combo, self.model_combo, self.folder_button, self.domain_list,
                  self.device_combo, self.backend_combo, self.precision_combo, self.overlap_spin, self.postprocess_check,
                  self.batch_spin, self.amp_check, self.uncertainty_check, self.run_button, *self.share_buttons):
            w.setEnabled(not running)
        self.cancel_button.setEnabled(running)
