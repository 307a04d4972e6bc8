"""Layout of the fine-tune panel: widgets only, no behaviour (that is in ``_finetune.py``).

The settings and the live plot sit in a scroll area (``_finetune.py`` scrolls the plot into view
when training starts); Train/Stop, the progress bar and the status line stay pinned below it, so
they remain visible when the panel shares a small screen with the domain selector.
"""

from __future__ import annotations

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ._devices import device_combo
from ._panel import ScrollingPanel
from ._plot import TrainingPlot


class PairRow(QWidget):
    """One (image layer, labels layer) training pair."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Image layer the labels were drawn on")
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("Corrected labels layer (0 background, 1, 2, … structures)")
        for c in (self.image_combo, self.labels_combo):
            c.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
            c.setMinimumContentsLength(8)
        self.remove_button = QToolButton()
        self.remove_button.setText("✕")
        self.remove_button.setToolTip("Remove this pair")
        row.addWidget(self.image_combo)
        row.addWidget(QLabel("+"))
        row.addWidget(self.labels_combo)
        row.addWidget(self.remove_button)


class FineTuneGui(ScrollingPanel):
    """The controls of the fine-tune panel, top to bottom in the order they are used."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        outer = self.body_layout

        data_box = QGroupBox("Training data (image + corrected labels)")
        data_layout = QVBoxLayout(data_box)
        self.pairs_layout = QVBoxLayout()
        data_layout.addLayout(self.pairs_layout)
        self.add_pair_button = QPushButton("Add pair")
        self.add_pair_button.setToolTip(
            "Train on several annotated images at once (resampled to their median voxel spacing)"
        )
        self.sparse_check = QCheckBox("Train only on labelled slices")
        self.sparse_check.setToolTip(
            "Slices (along the first axis) without any label are ignored; inside labelled slices, "
            "0 is background. A few corrected slices are then enough."
        )
        data_layout.addWidget(self.add_pair_button)
        data_layout.addWidget(self.sparse_check)
        outer.addWidget(data_box)

        domain_box = QGroupBox("New domain")
        form = QFormLayout(domain_box)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("e.g. liver-ct")
        form.addRow("Name", self.name_edit)
        self.modality_combo = QComboBox()
        self.modality_combo.addItems(["CT", "MR"])
        self.modality_combo.setToolTip("CT: fixed Hounsfield normalisation; MR: per-image z-score")
        form.addRow("Modality", self.modality_combo)
        self.classes_edit = QLineEdit()
        self.classes_edit.setToolTip("Comma-separated, background first; one name per label value")
        form.addRow("Classes", self.classes_edit)
        base_row = QHBoxLayout()
        self.base_label = QLabel("—")
        self.base_label.setWordWrap(True)
        self.base_label.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        self.base_button = QPushButton("Folder…")
        self.base_button.setToolTip("The model to start from (default: the domain selector's model)")
        base_row.addWidget(self.base_label)
        base_row.addWidget(self.base_button)
        form.addRow("Base model", base_row)
        self.init_combo = QComboBox()
        self.init_combo.setToolTip("The existing domain whose adapter the new one starts from")
        form.addRow("Start from", self.init_combo)
        outer.addWidget(domain_box)

        train_box = QGroupBox("Training")
        tform = QFormLayout(train_box)
        self.iterations_spin = QSpinBox()
        self.iterations_spin.setRange(1, 100000)
        self.iterations_spin.setSingleStep(50)
        tform.addRow("Iterations", self.iterations_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 1.0)
        self.lr_spin.setSingleStep(1e-3)
        tform.addRow("Learning rate", self.lr_spin)
        self.patch_edit = QLineEdit()
        self.patch_edit.setPlaceholderText("auto (Z Y X)")
        self.patch_edit.setToolTip("Patch size Z Y X in voxels, or empty for a size that fits the image")
        tform.addRow("Patch size", self.patch_edit)
        self.device_combo = device_combo()
        tform.addRow("Device", self.device_combo)
        save_row = QHBoxLayout()
        self.target_edit = QLineEdit()
        self.target_edit.setToolTip(
            "Your model folder: a writable copy of the base model's trunk and adapters, plus the new domain"
        )
        self.target_button = QPushButton("…")
        self.target_button.setMaximumWidth(30)
        save_row.addWidget(self.target_edit)
        save_row.addWidget(self.target_button)
        tform.addRow("Save to", save_row)
        outer.addWidget(train_box)
        self.plot = TrainingPlot(self.scroll.widget())
        outer.addWidget(self.plot)
        outer.addStretch(1)

        self.train_button, self.stop_button, self.progress_bar, self.status_label = self.add_footer(
            "Train", "Stop", status_lines=3
        )

    def show_plot(self) -> None:
        """Scroll the live plot into view (training started: the settings above are locked)."""
        self.scroll.ensureWidgetVisible(self.plot, 0, 0)

    def set_running(self, running: bool) -> None:
        self.train_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        for w in (self.add_pair_button, self.sparse_check, self.name_edit, self.modality_combo,
                  self.classes_edit, self.base_button, self.init_combo, self.iterations_spin, self.lr_spin,
                  self.patch_edit, self.device_combo, self.target_edit, self.target_button):
            w.setEnabled(not running)
