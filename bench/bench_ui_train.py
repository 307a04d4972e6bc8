"""GUI responsiveness while the fine-tune panel trains a new domain (same heartbeat as bench_ui).

A QTimer fires every 10 ms on napari's event loop and records the gap between its ticks while
the panel's worker fine-tunes a liver adapter on a synthetic CT (labels painted from the ground
truth); a long gap is a frozen viewer (plot redraws, report handling, the GIL). The base model is
the bundled one when installed, else a small random trunk (the GUI's timing is measured, not the
result's quality). Runs itself under ``xvfb-run`` when there is no display. Optionally saves
screenshots of the panel during training and of the result. Last line: one JSON object.

    python bench/bench_ui_train.py [--iterations 60] [--screenshot docs/screenshots]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_ui import reexec_under_xvfb, wait_until  # noqa: E402


def grab(viewer, app, path: Path, width: int = 1100) -> None:
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    for _ in range(10):
        app.processEvents()
        time.sleep(0.02)
    shot = viewer.window._qt_window.grab().scaledToWidth(width)
    shot.save(str(path), "PNG")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--size-scale", type=float, default=0.5)
    parser.add_argument("--patch", default="16 48 48")
    parser.add_argument("--screenshot", type=Path, help="folder for finetune_training.png / finetune_result.png")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    reexec_under_xvfb()
    os.environ.setdefault("U2NET_HOME", tempfile.mkdtemp(prefix="bench_ui_train_home_"))

    import warnings

    warnings.filterwarnings("ignore", message="napari support for the PyQt5")
    import napari
    from bench_finetune import ORGAN, random_base_model
    from qtpy.QtCore import QElapsedTimer, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_u2net._finetune import FineTuneWidget
    from napari_u2net._geometry import to_napari_affine
    from napari_u2net._reader import volume_layer_data
    from napari_u2net._widget import DomainSelectorWidget
    from training.data.synth import domain_info, generate_case
    from training.io.folders import bundled_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="bench_ui_train_"))
    bundled = bundled_model_dir()
    if (bundled / "trunk.safetensors").is_file():
        base, kind = bundled, "bundled"
    else:
        base, kind = random_base_model(tmp / "base", [int(v) for v in args.patch.split()]), "random trunk"
    volume, truth = generate_case(ORGAN, 1, args.size_scale)
    unseen, unseen_truth = generate_case(ORGAN, 2, args.size_scale)
    info = domain_info(ORGAN)

    viewer = napari.Viewer(title="napari-u2net", show=True)
    viewer.window._qt_window.resize(1500, 950)
    data, attrs, _ = volume_layer_data(volume, "liver CT", colormap="gray")
    viewer.add_image(data, **attrs)
    import pandas as pd

    viewer.add_labels(
        (truth > 0).astype(np.uint8), name="liver CT corrected", affine=to_napari_affine(volume.affine), opacity=0.5,
        features=pd.DataFrame({"index": [0, 1], "class": ["background", "liver"]}),
    )
    selector = DomainSelectorWidget(viewer)
    viewer.window.add_dock_widget(selector, name="Domain selector (napari-u2net)", area="right")
    selector.set_model_dir(base)
    panel = FineTuneWidget(viewer, ask_keep=lambda result: True, confirm_overwrite=lambda n, f: True)
    viewer.window.add_dock_widget(panel, name="Fine-tune (napari-u2net)", area="right")
    app = QApplication.instance()

    def wait(cond, timeout):
        wait_until(app, cond, timeout, "bench_ui_train")

    # both panels ready: model loaded, devices probed, run-time imports done in the background
    wait(lambda: selector.model is not None and selector.warmed_up and panel.warmed_up and not panel.prefill_jobs, 120)
    panel.set_base_model(base)
    g = panel.gui
    g.name_edit.setText("liver")
    g.iterations_spin.setValue(args.iterations)
    g.patch_edit.setText(args.patch)
    g.device_combo.setCurrentIndex(g.device_combo.findData("cpu"))
    viewer.dims.set_point(0, float(np.mean(viewer.dims.range[0][:2])))
    for _ in range(50):  # let the window settle
        app.processEvents()
        time.sleep(0.01)

    gaps: list[float] = []
    clock = QElapsedTimer()
    timer = QTimer()
    timer.setInterval(10)
    stamps: list[tuple[float, int]] = []

    def tick():
        gaps.append(clock.restart())
        stamps.append((time.perf_counter(), len(panel.gui.plot.losses)))

    timer.timeout.connect(tick)
    clock.start()
    timer.start()
    wait(lambda: len(gaps) >= 150, 30)
    idle = np.array(gaps[1:], dtype=float)
    import gc

    gc_log: list[tuple[float, float, int]] = []
    gc_start = [0.0]

    def gc_cb(phase, info):
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gc_log.append((gc_start[0], (time.perf_counter() - gc_start[0]) * 1000, info["generation"]))

    gc.callbacks.append(gc_cb)
    gaps.clear()
    stamps.clear()
    clock.restart()
    t0 = time.perf_counter()
    g.train_button.click()
    shot_at = max(3, int(args.iterations * 0.6))
    shot_taken = [False]

    def done() -> bool:
        """Training finished? (takes the screenshot on the way, outside the measured gaps)"""
        if args.screenshot is not None and not shot_taken[0] and len(g.plot.losses) >= shot_at:
            timer.stop()  # a screenshot is not the worker's fault
            args.screenshot.mkdir(parents=True, exist_ok=True)
            g.plot.flush()
            grab(viewer, app, args.screenshot / "finetune_training.png")
            shot_taken[0] = True
            clock.restart()
            timer.start()
        return panel.worker is None

    wait(done, args.timeout)
    train_s = time.perf_counter() - t0
    gc.callbacks.remove(gc_cb)
    slow_gc = [(round(t - t0, 2), round(ms), gen) for t, ms, gen in gc_log if ms > 30]
    print(f"garbage collections > 30 ms during training (s, ms, generation): {slow_gc}")
    timer.stop()
    gaps_ms = np.array(gaps[1:] or [0.0], dtype=float)
    worst = np.argsort(gaps_ms)[::-1][:6]
    print("longest gaps (ms @ s after Train, reports so far):",
          ", ".join(f"{gaps_ms[i]:.0f}@{stamps[i + 1][0] - t0:.2f}s/{stamps[i + 1][1]}" for i in worst))

    # The result: run the new domain on an unseen CT from the domain selector.
    saved = panel.last_saved is not None
    dice = None
    if saved:
        wait(lambda: "liver" in selector.checked_domains(), 120)
        selector.set_checked_domains(["liver"])
        viewer.layers.clear()
        data, attrs, _ = volume_layer_data(unseen, "unseen CT", colormap="gray")
        viewer.add_image(data, **attrs)
        selector.gui.device_combo.setCurrentIndex(selector.gui.device_combo.findData("cpu"))
        wait(lambda: selector.gui.image_combo.currentText() == "unseen CT", 10)
        selector.run()
        wait(lambda: selector.worker is None and not selector.turns.busy, 300)
        if "unseen CT liver" in viewer.layers:
            pred = viewer.layers["unseen CT liver"].data > 0
            gt = unseen_truth > 0
            dice = float(2 * (pred & gt).sum() / max(pred.sum() + gt.sum(), 1))
        if args.screenshot is not None:
            viewer.dims.set_point(0, float(np.mean(viewer.dims.range[0][:2])))
            grab(viewer, app, args.screenshot / "finetune_result.png")

    stall = {"max_stall_ms": float(gaps_ms.max()), "p99_stall_ms": float(np.percentile(gaps_ms, 99))}
    print(f"{'base model':<16}{kind:>24}")
    print(f"{'volume':<16}{str(volume.shape):>24}")
    print(f"{'iterations':<16}{args.iterations:>24d}")
    print(f"{'training (s)':<16}{train_s:>24.1f}")
    print(f"{'idle max/med':<16}{f'{idle.max():.1f} / {np.median(idle):.1f} ms':>24}")
    print(f"{'ticks':<16}{gaps_ms.size:>24d}")
    print(f"{'median (ms)':<16}{np.median(gaps_ms):>24.1f}")
    print(f"{'p99 (ms)':<16}{stall['p99_stall_ms']:>24.1f}")
    print(f"{'max (ms)':<16}{stall['max_stall_ms']:>24.1f}   goal < 100")
    print(f"{'Dice unseen':<16}{'-' if dice is None else f'{dice:.3f}':>24}   ({info.name}, via the domain selector)")
    viewer.close()
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"bench": "ui_stall_train", **{k: round(v, 1) for k, v in stall.items()},
                      "median_tick_ms": round(float(np.median(gaps_ms)), 1), "iterations": args.iterations,
                      "training_s": round(train_s, 1), "dice_unseen": dice}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
