"""GUI responsiveness during a segmentation started from the domain selector.

A QTimer fires every 10 ms on napari's event loop and records the gap between its ticks while
the widget's worker segments the synthetic CT sample; a long gap is a frozen viewer. Uses the
bundled model when installed, otherwise a random model of the bundled architecture's size class
(the timing of the GUI, not the quality of the result, is measured). Runs itself under
``xvfb-run`` when there is no display. Last line: one JSON object.

    python bench/bench_ui.py [--screenshot docs/screenshots] [--size-scale 1.0]
    python bench/bench_ui.py --prepare   # the same while the fast path (OpenVINO) is being prepared

Without ``--prepare`` the widget prepares nothing (``U2NET_PREPARE=0``): the figure is the
segmentation's own. With it, the cache starts empty, the run starts once the widget's background
preparation of the domain is under way (so the run is eager) and the heartbeat goes on until both
have finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reexec_under_xvfb() -> None:
    """Run this script again under xvfb-run when there is no display (shared by bench_ui_train)."""
    if os.environ.get("DISPLAY") or os.environ.get("U2NET_UNDER_XVFB"):
        return
    xvfb = shutil.which("xvfb-run")
    if xvfb is None:
        sys.exit(f"{Path(sys.argv[0]).stem}: no DISPLAY and no xvfb-run; install xvfb (apt-get install xvfb)")
    env = {**os.environ, "U2NET_UNDER_XVFB": "1"}
    cmd = [xvfb, "-a", "-s", "-screen 0 1600x1000x24", sys.executable, *sys.argv]
    sys.exit(subprocess.call(cmd, env=env))


def wait_until(app, cond, timeout: float, what: str) -> None:
    """Run Qt's event loop until ``cond()`` holds (shared by bench_ui_train).

    A real ``QEventLoop`` as in napari (not ``processEvents`` + sleep, which would add the sleep to
    every gap and lump each pass's events together); ``cond`` is checked every 5 ms.
    """
    from qtpy.QtCore import QEventLoop, QTimer

    if cond():
        return
    t0 = time.perf_counter()
    loop = QEventLoop()
    timed_out = []

    def check() -> None:
        if cond():
            loop.quit()
        elif time.perf_counter() - t0 > timeout:
            timed_out.append(True)
            loop.quit()

    poll = QTimer()
    poll.setInterval(5)
    poll.timeout.connect(check)
    poll.start()
    loop.exec_()
    poll.stop()
    if timed_out:
        raise TimeoutError(f"{what}: timed out")


def fallback_model(tmp: Path, domain: str, volume) -> Path:
    """A random model with one CT domain (used only when no bundled model is installed)."""
    import torch

    from training.data.synth import domain_info
    from training.model.modelfile import AdapterMeta, make_classes, save_model
    from training.model.network import ArchConfig, DomainConfig, U2Net

    info = domain_info(domain)
    torch.manual_seed(0)
    net = U2Net(ArchConfig(base_channels=8, levels=4, max_channels=64), [DomainConfig(domain, 1, len(info.classes))])
    meta = AdapterMeta(
        domain, list(info.modalities), make_classes(list(info.classes), list(info.colors)),
        spacing=[float(s) for s in volume.spacing], patch_size=[32, 64, 64],
        normalization=[{"scheme": "ct", "clip": [-200.0, 300.0], "mean": 50.0, "std": 100.0}], modality="CT",
        description=info.description,
    )
    save_model(tmp / "model", net, {domain: meta}, provenance={"made_by": "bench_ui (random weights)"})
    return tmp / "model"


def main() -> int:
    if os.environ.get("U2NET_SWITCH"):
        sys.setswitchinterval(float(os.environ["U2NET_SWITCH"]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshot", type=Path, help="folder to save PNG screenshots of the widget and result")
    parser.add_argument("--size-scale", type=float, default=1.0, help="synthetic volume size factor")
    parser.add_argument("--timeout", type=float, default=400.0)
    parser.add_argument("--tail", type=float, default=0.5,
                        help="seconds the heartbeat goes on after the run (the result layer's deferred set-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the run (default: cores - 1)")
    parser.add_argument("--prepare", action="store_true",
                        help="run while the widget prepares the domain's fast path (an empty cache of compiled graphs)")
    args = parser.parse_args()
    reexec_under_xvfb()
    if args.prepare:
        from training.infer.backends import openvino_available

        if not openvino_available():
            print("skipped: --prepare needs openvino")
            return 0
        os.environ["U2NET_HOME"] = tempfile.mkdtemp(prefix="bench_ui_home_")  # the conversion is really done
        os.environ["U2NET_PREPARE"] = "1"
    else:
        os.environ["U2NET_PREPARE"] = "0"  # the segmentation's own figure

    import napari
    from qtpy.QtCore import QElapsedTimer, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_u2net._sample_data import SYNTHETIC_SEED, synthetic_domain
    from napari_u2net._widget import DomainSelectorWidget
    from training.data.synth import generate_case
    from training.io.folders import bundled_model_dir

    domain = synthetic_domain()
    volume, truth = generate_case(domain, SYNTHETIC_SEED, size_scale=args.size_scale)
    import warnings

    warnings.filterwarnings("ignore", message="napari support for the PyQt5")
    viewer = napari.Viewer(title="napari-u2net", show=True)
    viewer.window._qt_window.resize(1500, 950)
    from napari_u2net._geometry import radiological_view

    radiological_view(viewer)
    from napari_u2net._reader import volume_layer_data
    from napari_u2net._sample_data import _domain_classes, _labels_layer

    data, attrs, _ = volume_layer_data(volume, "synthetic CT", colormap="gray")
    image = viewer.add_image(data, **attrs)
    names, colors = _domain_classes(domain)
    tdata, tattrs, _ = _labels_layer(truth, volume, f"synthetic CT {domain} truth", names, colors)
    tattrs["visible"] = False
    viewer.add_labels(tdata, **tattrs)

    tmp = Path(tempfile.mkdtemp(prefix="bench_ui_"))
    bundled = bundled_model_dir()
    model_dir = bundled if (bundled / "trunk.safetensors").is_file() else fallback_model(tmp, domain, volume)
    model_kind = "bundled" if model_dir == bundled else "random (no bundled model installed)"
    widget = DomainSelectorWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Domain selector (napari-u2net)", area="right")
    widget.set_model_dir(model_dir, domains=[domain])
    app = QApplication.instance()

    def wait(cond, timeout):
        wait_until(app, cond, timeout, "bench_ui")

    # the widget is ready: model loaded, devices probed, run-time imports done in the background
    wait(lambda: widget.model is not None and domain in widget.checked_domains() and widget.warmed_up
         and not widget.hint_jobs, 120)
    widget.gui.device_combo.setCurrentIndex(widget.gui.device_combo.findData("cpu"))
    wait(lambda: True, 0)
    if args.prepare:  # the preparation has started (it converts in its own process): run meanwhile
        widget._schedule_prepare(0)
        wait(lambda: widget.prep_worker is not None, 30)
    for _ in range(50):  # let the window settle (first paints are not the worker's fault)
        app.processEvents()
        time.sleep(0.01)

    gaps: list[float] = []
    clock = QElapsedTimer()
    timer = QTimer()
    timer.setInterval(10)

    stamps: list[float] = []

    def tick():
        gaps.append(clock.restart())
        stamps.append(time.perf_counter())

    timer.timeout.connect(tick)
    clock.start()
    timer.start()
    wait(lambda: len(gaps) >= 150, 30)  # idle baseline: the machine's own jitter
    idle_ms = np.array(gaps[1:], dtype=float)
    gaps.clear()
    stamps.clear()
    inserted_at: list[float] = []
    viewer.layers.events.inserting.connect(lambda e: inserted_at.append(time.perf_counter()))
    clock.restart()
    t0 = time.perf_counter()
    widget.threads = args.threads
    widget.run()
    wait(lambda: widget.worker is None and not widget.turns.busy, args.timeout)  # the result is in and shown
    run_s = time.perf_counter() - t0
    backend = widget._run_backend
    if args.prepare:
        wait(lambda: widget.prep_worker is None, args.timeout)
    prepare_s = time.perf_counter() - t0
    # keep the heartbeat going a little: the widget finishes setting up the result layer on later
    # event-loop turns (its tool overlays), and the first paint of the result comes after the run
    t_end = time.perf_counter()
    wait(lambda: time.perf_counter() - t_end > args.tail, 10)
    timer.stop()
    layer_name = f"{image.name} {domain}"
    ok = layer_name in viewer.layers
    dice = None
    if ok:
        pred = viewer.layers[layer_name].data > 0
        gt = truth > 0
        dice = float(2 * (pred & gt).sum() / max(pred.sum() + gt.sum(), 1))
    gaps_ms = np.array(gaps[1:] or [0.0], dtype=float)
    worst = np.argsort(gaps_ms)[::-1][:5]
    at = np.array(stamps[1:] or [t0])[worst] - t0
    print("longest gaps (ms @ s after Run):", ", ".join(f"{g:.0f}@{a:.2f}" for g, a in zip(gaps_ms[worst], at)))
    t_insert = inserted_at[0] if inserted_at else float("inf")
    during = np.array([g for g, t in zip(gaps_ms, stamps[1:]) if t < t_insert] or [0.0])
    stall = {
        "max_stall_ms": float(gaps_ms.max()),
        "p99_stall_ms": float(np.percentile(gaps_ms, 99)),
        "median_tick_ms": float(np.median(gaps_ms)),
        "ticks": int(gaps_ms.size),
    }
    if args.screenshot is not None and ok:
        args.screenshot.mkdir(parents=True, exist_ok=True)
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()
        if model_dir != bundled:  # a random model's output says nothing: show the truth instead
            viewer.layers[layer_name].visible = False
            viewer.layers[f"synthetic CT {domain} truth"].visible = True
        viewer.dims.set_point(0, viewer.dims.range[0].start + 0.55 * (viewer.dims.range[0].stop - viewer.dims.range[0].start))
        for _ in range(20):
            app.processEvents()
            time.sleep(0.02)
        shot = viewer.window._qt_window.grab()
        shot = shot.scaledToWidth(1100)
        shot.save(str(args.screenshot / "domain_selector.png"), "PNG")
    print(f"{'idle max/med':<14}{f'{idle_ms.max():.1f} / {np.median(idle_ms):.1f} ms':>22}   (no run: the machine's jitter)")
    print(f"{'volume':<14}{str(volume.shape):>22}")
    print(f"{'model':<14}{model_kind:>22}")
    print(f"{'run (s)':<14}{run_s:>22.2f}   on {backend}")
    if args.prepare:
        print(f"{'prepared (s)':<14}{prepare_s:>22.2f}   {widget.gui.fast_label.text()}")
    print(f"{'ticks':<14}{stall['ticks']:>22d}")
    print(f"{'median (ms)':<14}{stall['median_tick_ms']:>22.1f}")
    print(f"{'p99 (ms)':<14}{stall['p99_stall_ms']:>22.1f}")
    print(f"{'max (ms)':<14}{stall['max_stall_ms']:>22.1f}   goal < 100")
    print(f"{'max infer(ms)':<14}{during.max():>22.1f}   (before the result layer is inserted)")
    print(f"{'result layer':<14}{str(ok):>22}   Dice vs truth {dice if dice is None else round(dice, 3)}")
    viewer.close()
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({
        "bench": "ui_stall_preparing" if args.prepare else "ui_stall",
        "max_stall_ms": round(stall["max_stall_ms"], 1),
        "p99_stall_ms": round(stall["p99_stall_ms"], 1),
        "run_s": round(run_s, 2),
        "max_stall_inference_ms": round(float(during.max()), 1),
        "idle_max_ms": round(float(idle_ms.max()), 1),
        "threads": args.threads,
        "volume": list(volume.shape),
        "model": model_kind.split()[0],
        "backend": backend,
        **({"prepare_s": round(prepare_s, 2)} if args.prepare else {}),
    }))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
