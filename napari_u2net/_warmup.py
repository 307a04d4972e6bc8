"""What both panels do in the background when they open: find the devices, and import now what a
first run would otherwise import mid-run (no Qt here; :mod:`._devices` starts it in a worker)."""

from __future__ import annotations

import logging
import threading

import numpy as np

log = logging.getLogger(__name__)

# Importing torch (and building torch modules) in two threads at once breaks or stalls it: seen as
# "operator _c10d_functional::_wrap_tensor_autograd does not exist" when both panels opened
# together, and as minutes-long stalls when two models loaded at once. Every background job that
# imports torch or builds a network takes this lock first.
TORCH_LOCK = threading.Lock()


def available_devices() -> dict[str, bool]:
    """Which of :data:`training.infer.config.DEVICES` can run here (imports torch: call it from a worker)."""
    import torch

    from training.infer.config import DEVICES
    from training.io.devices import mps_available

    have = {"auto": True, "cpu": True, "cuda": bool(torch.cuda.is_available()), "mps": mps_available()}
    return {d: have.get(d, False) for d in DEVICES}


def warm_up(kind: str = "inference") -> None:
    """Import now, from a background worker, what the first run would otherwise import mid-run.

    Executing a module's code holds the GIL, so an import inside a segmentation or training
    worker freezes napari's event loop. Measured on 2 cores: SimpleITK (first resampling)
    ≈ 330 ms of stalls at the first run; torch._dynamo (pulled in by the optimizer) ≈ 200 ms and
    nibabel + ITK's first filter ≈ 120 ms at the first Train; vispy's dash patterns ≈ 65 ms inside
    the first Labels layer insertion.
    """
    import nibabel  # noqa: F401  (training.io.resample imports both lazily)
    import SimpleITK  # noqa: F401

    import training.infer.pipeline
    import training.infer.postprocess
    from training.infer.backends import openvino_available, openvino_core
    from training.io.resample import canonical_orientation, resample

    if kind == "inference" and openvino_available():  # auto's fast path: OpenVINO's import and Core
        openvino_core()
    # ITK's first filter run sets up its factories and thread pool with the GIL held (≈ 75 ms).
    eye = np.eye(4)
    canonical_orientation(eye)
    resample(np.zeros((4, 4, 4), np.float32), eye, eye, (4, 4, 4))
    resample(np.zeros((4, 4, 4), np.uint8), eye, eye, (4, 4, 4), linear=False)

    if kind == "training":
        import torch

        import training.train.adaptation
        import training.train.runs  # noqa: F401

        # One optimizer step finishes torch's lazy set-up (torch._dynamo, fused kernels' checks).
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.AdamW([p], lr=1e-3)
        p.sum().backward()
        opt.step()
    # vispy's process-wide cache of line dash patterns (pure numpy, ≈ 65 ms): napari builds it for
    # the polygon overlay of the first Labels layer otherwise, on the GUI thread.
    from vispy.visuals.line.dash_atlas import DashAtlas

    DashAtlas()


def probe_and_warm(kind: str = "inference") -> dict[str, bool]:
    """:func:`available_devices`, then :func:`warm_up` (one background job when a panel opens)."""
    with TORCH_LOCK:
        devices = available_devices()
        try:
            warm_up(kind)
        except Exception as e:  # noqa: BLE001 - only a speed-up: the run itself reports real problems
            log.warning("warm-up imports failed: %s", e)
    return devices
