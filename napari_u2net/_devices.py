"""The device picker both panels share: its combo box (the core's device names) and the
background probe that greys out what this machine lacks."""

from __future__ import annotations

import logging
from collections.abc import Callable

from qtpy.QtWidgets import QComboBox

from training.infer.config import DEVICES, InferenceConfig

from . import _jobs
from ._warmup import probe_and_warm

log = logging.getLogger(__name__)

# Display names; a device the core adds later shows under its own name.
DEVICE_LABELS = {"auto": "auto (best available)", "cpu": "CPU", "cuda": "CUDA GPU", "mps": "Apple MPS"}
ALWAYS_AVAILABLE = ("auto", "cpu")


def device_combo() -> QComboBox:
    """Every device of :data:`training.infer.config.DEVICES` (item data: its name), the core's
    default selected; all but auto and CPU stay greyed out until probed."""
    combo = QComboBox()
    for key in DEVICES:
        combo.addItem(DEVICE_LABELS.get(key, key), key)
    combo.setCurrentIndex(max(combo.findData(InferenceConfig.device), 0))
    combo.setToolTip("Devices this machine does not have are greyed out")
    return combo


def start_device_probe(combo: QComboBox, kind: str, on_ready: Callable[[dict], None]):
    """Grey out the GPU entries, then find the available devices and pre-import what a ``kind``
    run needs (:func:`._warmup.probe_and_warm`) in a worker. Enables what exists and calls
    ``on_ready(available)``; a failed probe (no torch?) leaves auto and CPU only. Returns the worker."""

    def enable(available: dict) -> None:
        for i in range(combo.count()):
            combo.model().item(i).setEnabled(bool(available.get(combo.itemData(i), False)))
        on_ready(available)

    def failed(error: BaseException) -> None:
        log.warning("device probe failed: %s", error)
        enable(dict.fromkeys(ALWAYS_AVAILABLE, True))

    enable_only = dict.fromkeys(ALWAYS_AVAILABLE, True)
    for i in range(combo.count()):
        combo.model().item(i).setEnabled(bool(enable_only.get(combo.itemData(i), False)))
    return _jobs.start(probe_and_warm, kind, on_done=enable, on_error=failed)
