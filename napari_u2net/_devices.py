"""The device picker both panels share: its combo box and the background probe that fills it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from qtpy.QtWidgets import QComboBox

from . import _engine

log = logging.getLogger(__name__)

DEVICE_LABELS = {"auto": "auto (best available)", "cpu": "CPU", "cuda": "CUDA GPU", "mps": "Apple MPS"}


def device_combo() -> QComboBox:
    """auto, CPU, CUDA, MPS (item data: the device name); GPUs stay greyed out until probed."""
    combo = QComboBox()
    for key, label in DEVICE_LABELS.items():
        combo.addItem(label, key)
    combo.setToolTip("Devices this machine does not have are greyed out")
    return combo


def start_device_probe(combo: QComboBox, kind: str, on_ready: Callable[[dict], None]):
    """Grey out the GPU entries, then find the available devices and pre-import what a ``kind``
    run needs (:func:`_engine.probe_and_warm`) in a worker. Enables what exists and calls
    ``on_ready(available)``; a failed probe leaves auto and CPU only. Returns the worker."""
    from napari.qt.threading import create_worker

    for i in range(2, combo.count()):
        combo.model().item(i).setEnabled(False)

    def done(available) -> None:
        if isinstance(available, _engine.Failure):  # no torch?: auto and CPU only
            log.warning("device probe failed: %s", available.error)
            available = {"auto": True, "cpu": True}
        for i in range(combo.count()):
            combo.model().item(i).setEnabled(bool(available.get(combo.itemData(i), False)))
        on_ready(available)

    worker = create_worker(_engine.guarded_call, _engine.probe_and_warm, kind,
                           _connect={"returned": done}, _start_thread=False, _ignore_errors=True)
    worker.start()
    return worker
