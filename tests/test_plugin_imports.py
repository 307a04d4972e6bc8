"""Opening the plugin must not import torch (seconds): the widget starts at once, workers import it."""

import subprocess
import sys


def test_plugin_modules_import_without_torch():
    code = (
        "import sys, napari_u2net._widget, napari_u2net._reader, napari_u2net._writer, "
        "napari_u2net._sample_data, napari_u2net.__main__; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_main_without_display_prints_hint_instead_of_aborting():
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    out = subprocess.run([sys.executable, "-m", "napari_u2net"], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert "xvfb-run -a make run" in out.stderr and "Traceback" not in out.stderr


def test_warm_up_imports_what_a_first_run_would_import_mid_run():
    """The panels' background warm-up must do the GIL-holding imports before a run needs them."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from napari_u2net import _warmup\n"
        "lazy = ['SimpleITK', 'nibabel', 'torch._dynamo', 'training.train.adaptation', 'training.infer.pipeline']\n"
        "before = [m for m in lazy if m in sys.modules]\n"
        "_warmup.warm_up('training')\n"
        "after = [m for m in lazy if m not in sys.modules]\n"
        "print(before, after)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []"  # none imported by opening the plugin, all after warm-up
