"""Domain selector in a real napari viewer (under Xvfb): results, geometry, cancel, bad input.

Most tests drive the widget with a stand-in ``predict`` (same signature as the real one) so
the result is known and the run can be slowed down to cancel it; the end-to-end test with the
real inference and a trained model is in ``test_plugin_e2e.py``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_u2net import _turns  # noqa: E402
from napari_u2net._widget import DomainSelectorWidget  # noqa: E402
from training.errors import Cancelled  # noqa: E402
from training.infer.result import DomainResult, Prediction  # noqa: E402

pytestmark = pytest.mark.qt

OBLIQUE = np.array(  # napari-side affine (world S, A, R): a slightly oblique, anisotropic grid
    [[2.5, 0.0, 0.0, -7.5], [0.0, 1.96, -0.21, 20.0], [0.0, 0.2, 1.9, -50.0], [0, 0, 0, 1.0]]
)


@dataclass
class FakeProgress:
    domain: str
    done: int
    total: int
    stage: str = "tiles"


class ThresholdPredict:
    """Labels = 1 where the first channel is above its mean; ``delay`` seconds per fake tile;
    ``maps``: further per-voxel outputs, ``{name: fn(image) -> array}``."""

    def __init__(self, tiles: int = 4, delay: float = 0.0, error: BaseException | None = None, maps=None,
                 notes=()):
        self.tiles, self.delay, self.error, self.maps = tiles, delay, error, maps or {}
        self.notes = list(notes)
        self.calls: list[dict] = []
        self.started = threading.Event()

    def __call__(self, model, volume, domains, config=None, progress=None, cancel=None):
        self.calls.append(
            {"affine": volume.affine.copy(), "shape": volume.data.shape, "domains": list(domains), "config": config}
        )
        self.started.set()
        if self.error is not None:
            raise self.error
        out = {}
        for d in domains:
            for t in range(self.tiles):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled")
                time.sleep(self.delay)
                if progress:
                    progress(FakeProgress(d, t + 1, self.tiles))
            img = volume.data[0]
            maps = {name: fn(img) for name, fn in self.maps.items()}
            out[d] = DomainResult(d, (img > img.mean()).astype(np.uint8), maps, notes=list(self.notes))
        return Prediction(out)


def make_widget(viewer, qtbot, model_dir, predict):
    widget = DomainSelectorWidget(viewer, predict_fn=predict)
    viewer.window.add_dock_widget(widget)
    widget.set_model_dir(model_dir)
    qtbot.waitUntil(lambda: widget.model is not None and widget.gui.domain_list.count() == 2, timeout=30000)
    # Both domains of the test model are CT and blob_image() is MR-like, so since issue #16 none is
    # pre-ticked for it (a wrong domain ticked is worse than none): tick "ct" as the user would.
    widget.set_checked_domains(["ct"])
    return widget


def run_and_wait(widget, qtbot, timeout=30000):
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None and not widget.turns.busy, timeout=timeout)


def blob_image(shape=(12, 16, 20)):
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return (z**2 + y**2 + x**2 < 0.5).astype(np.float32) * 100 + 10


def test_run_adds_labels_with_exact_geometry_classes_and_colours(make_napari_viewer, qtbot, model_dir, messages):
    viewer = make_napari_viewer()
    image = viewer.add_image(
        blob_image(), name="scan", affine=OBLIQUE, scale=(1.5, 1, 0.5), translate=(3, -2, 1), rotate=10
    )
    predict = ThresholdPredict()
    widget = make_widget(viewer, qtbot, model_dir, predict)
    widget.set_checked_domains(["ct"])
    run_and_wait(widget, qtbot)
    assert not [m for m in messages if m[0] == "error"], messages
    labels = viewer.layers["scan ct"]
    np.testing.assert_array_equal(labels.data, blob_image() > blob_image().mean())
    # The result sits exactly where the image is: same full data→world transform and parts.
    np.testing.assert_allclose(labels._data_to_world.affine_matrix, image._data_to_world.affine_matrix, atol=1e-12)
    np.testing.assert_array_equal(labels.affine.affine_matrix, image.affine.affine_matrix)
    np.testing.assert_array_equal(labels.scale, image.scale)
    np.testing.assert_array_equal(labels.translate, image.translate)
    np.testing.assert_allclose(labels.rotate, image.rotate)
    # The engine saw the composed transform, in RAS order, as the volume's affine.
    ras = image._data_to_world.affine_matrix[[2, 1, 0, 3]]
    np.testing.assert_allclose(predict.calls[0]["affine"], ras, atol=1e-12)
    assert list(labels.features["class"]) == ["background", "class1"]
    meta = widget.model.meta("ct")
    np.testing.assert_allclose(labels.colormap.map(np.array([1]))[0][:3], _rgb(meta.classes[1].color), atol=1e-6)
    assert labels.colormap.map(np.array([0]))[0][3] == 0  # background transparent


def test_result_layer_tool_overlays_come_back_after_insertion(make_napari_viewer, qtbot, model_dir, messages):
    """The polygon/brush overlays are hidden while the result is inserted (a shorter GUI freeze)
    and shown again on later event-loop turns: the painting tools work on the result."""
    viewer = make_napari_viewer()
    viewer.add_image(blob_image(), name="scan")
    widget = make_widget(viewer, qtbot, model_dir, ThresholdPredict())
    widget.set_checked_domains(["ct"])
    run_and_wait(widget, qtbot)
    labels = viewer.layers["scan ct"]
    overlays = [labels._overlays[k] for k in _turns.DEFERRED_OVERLAYS]
    qtbot.waitUntil(lambda: all(o.visible for o in overlays), timeout=5000)
    assert viewer.layers.selection.active is labels  # selected on a later turn, as napari would
    visuals = viewer.window._qt_viewer.canvas._layer_overlay_to_visual[labels]
    assert all(o in visuals for o in overlays)  # napari built their vispy visuals
    labels.mode = "polygon"
    assert labels._overlays["polygon"].enabled


def test_turns_let_the_event_loop_tick_between_long_steps(qtbot):
    """Each step starts a full delay after the previous one *returned*: a 10 ms heartbeat (user
    input, painting) ticks between any two steps, however long each one is. With delays fixed up
    front, steps that came due behind a long one ran back to back in one frozen turn."""
    from qtpy.QtCore import QTimer

    events: list[str] = []
    turns = _turns.Turns(delay_ms=5)

    def slow(i):
        def step():
            events.append(f"start{i}")
            time.sleep(0.06)  # longer than the delay and than the heartbeat
            events.append(f"end{i}")
        return step

    heartbeat = QTimer()
    heartbeat.setInterval(10)
    heartbeat.timeout.connect(lambda: events.append("tick"))
    heartbeat.start()
    turns.add(slow(0), slow(1))
    turns.add(slow(2))  # added while busy: queued behind, not run alongside
    assert turns.busy
    qtbot.waitUntil(lambda: not turns.busy, timeout=5000)
    heartbeat.stop()
    order = [e for e in events if e != "tick"]
    assert order == ["start0", "end0", "start1", "end1", "start2", "end2"]
    for i in (0, 1):
        between = events[events.index(f"end{i}"):events.index(f"start{i + 1}")]
        assert "tick" in between, events


def test_a_result_selected_or_removed_before_its_controls_are_built(make_napari_viewer, qtbot):
    """A result goes in without its layer controls (a shorter freeze); a user who selects or
    deletes it before the step that builds them gets them built, not napari's KeyError."""
    viewer = make_napari_viewer(show=True)
    viewer.add_image(blob_image(), name="scan")
    controls = viewer.window._qt_viewer.controls
    for action in ("select", "remove"):
        layer = viewer.add_labels(np.zeros((12, 16, 20), np.uint8), name=f"result {action}", visible=True)
        viewer.layers.remove(layer)
        insert, build, shown, *rest = _turns.insert_layer_steps(viewer, lambda: len(viewer.layers), layer)
        insert()
        assert layer in viewer.layers and not layer.visible
        assert layer not in controls.widgets  # deferred
        if action == "select":  # the user clicks it in the layer list
            viewer.layers.selection.active = layer
            assert controls.currentWidget() is controls.widgets[layer]
        else:  # the user deletes it
            viewer.layers.remove(layer)
            assert layer not in controls.widgets
        for step in (build, shown, *rest):  # the later steps still do no harm
            step()
        assert layer.visible == (action == "select")
    assert set(controls.widgets) == set(viewer.layers)


def test_progress_bar_paints_later_not_inside_set_value(qtbot):
    """QProgressBar.setValue repaints at once (in napari: the whole GL window); ours queues it."""
    from napari_u2net._progress_bar import ProgressBar

    class Counting(ProgressBar):
        paints = 0

        def paintEvent(self, event):  # noqa: N802
            Counting.paints += 1
            super().paintEvent(event)

    bar = Counting()
    bar.setRange(0, 100)
    qtbot.addWidget(bar)
    bar.show()
    qtbot.waitExposed(bar)
    qtbot.wait(50)
    before = Counting.paints
    bar.setValue(60)
    assert bar.value() == 60 and bar.updatesEnabled()
    assert Counting.paints == before  # no synchronous repaint
    qtbot.waitUntil(lambda: Counting.paints > before, timeout=2000)  # ...but it is painted


def _rgb(hex_color: str):
    h = hex_color.lstrip("#")
    return [int(h[i : i + 2], 16) / 255 for i in (0, 2, 4)]


def test_several_domains_give_one_layer_each(make_napari_viewer, qtbot, model_dir, messages):
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([blob_image(), blob_image() * 2]), name="mr")  # 4D: 2 modalities
    widget = make_widget(viewer, qtbot, model_dir, ThresholdPredict())
    widget.set_checked_domains(["mr2"])
    run_and_wait(widget, qtbot)
    assert "mr mr2" in viewer.layers and viewer.layers["mr mr2"].data.shape == blob_image().shape
    assert not messages


def test_several_results_go_in_on_turns_of_their_own(make_napari_viewer, qtbot, tmp_path, messages):
    """Two domains in one run: each result is inserted on an event-loop turn of its own (a 10 ms
    heartbeat ticks in between), both end up shown, and the last one is the selected layer."""
    from qtpy.QtCore import QTimer

    from tests.conftest import adapter_meta, small_net
    from training.model.modelfile import save_model

    net = small_net(domains=(("heart", 1, 2), ("spleen", 1, 2)))
    save_model(tmp_path / "m", net, {n: adapter_meta(net, n, modality="CT") for n in net.domains})
    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.where(blob_image() > 50, 60.0, -1000.0), name="ct")
    widget = DomainSelectorWidget(viewer, predict_fn=ThresholdPredict())
    viewer.window.add_dock_widget(widget)
    widget.set_model_dir(tmp_path / "m")
    qtbot.waitUntil(lambda: widget.model is not None and widget.gui.domain_list.count() == 2, timeout=30000)
    qtbot.waitUntil(lambda: widget.hint_jobs == 0, timeout=10000)
    widget.set_checked_domains(["heart", "spleen"])
    events: list[str] = []
    viewer.layers.events.inserted.connect(lambda e: events.append(e.value.name))
    heartbeat = QTimer()
    heartbeat.setInterval(10)
    heartbeat.timeout.connect(lambda: events.append("tick"))
    heartbeat.start()
    run_and_wait(widget, qtbot)
    heartbeat.stop()
    results = ["ct heart", "ct spleen"]
    assert [e for e in events if e != "tick"] == results
    assert "tick" in events[events.index(results[0]):events.index(results[1])]
    assert all(viewer.layers[n].visible for n in results)
    assert viewer.layers.selection.active is viewer.layers["ct spleen"]
    assert not [m for m in messages if m[0] == "error"]


def test_cancel_mid_run_adds_no_layer(make_napari_viewer, qtbot, model_dir, messages):
    viewer = make_napari_viewer()
    viewer.add_image(blob_image(), name="scan")
    predict = ThresholdPredict(tiles=200, delay=0.02)
    widget = make_widget(viewer, qtbot, model_dir, predict)
    n_layers = len(viewer.layers)
    widget.run()
    qtbot.waitUntil(lambda: widget.gui.progress_bar.value() > 0, timeout=10000)
    assert widget.gui.cancel_button.isEnabled() and not widget.gui.run_button.isEnabled()
    t0 = time.perf_counter()
    widget.gui.cancel_button.click()
    qtbot.waitUntil(lambda: widget.worker is None and not widget.turns.busy, timeout=10000)
    assert time.perf_counter() - t0 < 2.0
    assert len(viewer.layers) == n_layers
    assert messages and messages[-1][0] == "info" and "cancel" in messages[-1][1]
    assert widget.gui.run_button.isEnabled()


def test_rerun_replaces_untouched_result_and_keeps_edited_one(make_napari_viewer, qtbot, model_dir, messages):
    viewer = make_napari_viewer()
    viewer.add_image(blob_image(), name="scan")
    widget = make_widget(viewer, qtbot, model_dir, ThresholdPredict())
    run_and_wait(widget, qtbot)
    first = viewer.layers["scan ct"]
    run_and_wait(widget, qtbot)  # untouched: replaced, no copy kept
    assert [layer.name for layer in viewer.layers if layer.name.startswith("scan ct")] == ["scan ct"]
    assert viewer.layers["scan ct"] is not first
    edited = viewer.layers["scan ct"]
    data = edited.data.copy()
    data[0, 0, :5] = 1  # a hand correction
    edited.data = data
    run_and_wait(widget, qtbot)
    kept = viewer.layers["scan ct (previous)"]
    assert kept is edited and not kept.visible
    np.testing.assert_array_equal(kept.data, data)
    assert viewer.layers["scan ct"].visible
    assert any("kept the edited layer" in m[1] for m in messages)


@pytest.mark.parametrize(
    "setup, expected",
    [
        ("none", "no image layer"),
        ("rgb", "RGB"),
        ("2d", "2D image"),
        ("4d-for-ct", "takes one"),
        ("3d-for-mr2", "needs 2 modalities"),
        ("no-domain", "tick at least one domain"),
    ],
)
def test_bad_input_gives_a_notification_and_no_run(make_napari_viewer, qtbot, model_dir, messages, setup, expected):
    viewer = make_napari_viewer()
    predict = ThresholdPredict()
    if setup == "rgb":
        viewer.add_image(np.zeros((8, 8, 8, 3), np.uint8), rgb=True, name="photo")
    elif setup == "2d":
        viewer.add_image(np.zeros((16, 16), np.float32), name="slice")
    elif setup == "4d-for-ct":
        viewer.add_image(np.zeros((2, 8, 8, 8), np.float32), name="series")
    elif setup in ("3d-for-mr2", "no-domain"):
        viewer.add_image(np.zeros((8, 8, 8), np.float32), name="scan")
    widget = make_widget(viewer, qtbot, model_dir, predict)
    widget.set_checked_domains({"3d-for-mr2": ["mr2"], "no-domain": []}.get(setup, ["ct"]))
    n_layers = len(viewer.layers)
    widget.run()
    assert widget.worker is None and not predict.calls
    assert len(viewer.layers) == n_layers
    assert messages and messages[-1][0] == "error" and expected in messages[-1][1], messages


def test_out_of_memory_is_a_notification(make_napari_viewer, qtbot, model_dir, messages):
    import torch

    viewer = make_napari_viewer()
    viewer.add_image(blob_image(), name="scan")
    widget = make_widget(viewer, qtbot, model_dir, ThresholdPredict(error=torch.OutOfMemoryError("CUDA out of memory")))
    run_and_wait(widget, qtbot)
    assert messages[-1][0] == "error" and "out of memory" in messages[-1][1] and "CPU" in messages[-1][1]
    assert "scan ct" not in viewer.layers and widget.gui.run_button.isEnabled()


def test_model_adapter_mismatch_is_a_notification(make_napari_viewer, qtbot, model_dir, tmp_path, messages):
    """An adapter from another trunk (ModelFileError) is reported, and the widget stays usable."""
    import shutil

    from tests.conftest import adapter_meta, small_net
    from training.model.modelfile import adapter_path, save_model

    other = small_net(seed=1)
    save_model(tmp_path / "other", other, {"ct": adapter_meta(other, "ct")})
    bad = tmp_path / "mixed"
    shutil.copytree(model_dir, bad)
    shutil.copy(adapter_path(tmp_path / "other", "ct"), adapter_path(bad, "ct"))
    viewer = make_napari_viewer()
    viewer.add_image(blob_image(), name="scan")
    widget = make_widget(viewer, qtbot, model_dir, ThresholdPredict())
    widget.set_model_dir(bad)
    qtbot.waitUntil(lambda: any("another shared trunk" in m[1] for m in messages), timeout=30000)
    assert widget.model is None and widget.gui.domain_list.count() == 0
    widget.run()
    assert "no model is loaded" in messages[-1][1]
    widget.set_model_dir(model_dir)  # a good model again: usable
    qtbot.waitUntil(lambda: widget.model is not None, timeout=30000)
    widget.set_checked_domains(["ct"])  # an MR-like image, CT domains: none pre-ticked (issue #16)
    run_and_wait(widget, qtbot)
    assert "scan ct" in viewer.layers


def test_missing_bundled_model_is_explained(make_napari_viewer, qtbot, monkeypatch, messages, tmp_path):
    """Without a bundled model the widget says so and still offers the other sources."""
    import training.io.folders

    monkeypatch.setattr(training.io.folders, "bundled_model_dir", lambda: tmp_path / "absent")
    import training.model.registry

    monkeypatch.setattr(training.model.registry, "bundled_model_dir", lambda: tmp_path / "absent", raising=False)
    viewer = make_napari_viewer()
    widget = DomainSelectorWidget(viewer, predict_fn=ThresholdPredict())
    qtbot.waitUntil(lambda: widget.gui.model_combo.count() > 0, timeout=30000)
    assert "missing" in widget.gui.model_combo.itemText(0)
    qtbot.waitUntil(lambda: "bundled model" in widget.gui.model_info.text(), timeout=10000)
    assert widget.gui.folder_button.isEnabled()
    assert any(m[0] == "warning" and "bundled model" in m[1] for m in messages)


def test_only_available_devices_are_enabled(make_napari_viewer, qtbot, model_dir):
    import torch

    viewer = make_napari_viewer()
    widget = make_widget(viewer, qtbot, model_dir, ThresholdPredict())
    combo = widget.gui.device_combo
    item = combo.model().item
    qtbot.waitUntil(lambda: item(combo.findData("cuda")).isEnabled() == torch.cuda.is_available(), timeout=20000)
    assert item(combo.findData("cpu")).isEnabled() and item(combo.findData("auto")).isEnabled()


def test_modality_guess_and_domain_suggestion():
    from napari_u2net._segment import layer_channels
    from training.model.domain_match import UNKNOWN, guess_modality, pick_domain

    ct = np.full((4, 8, 8), -1000.0)
    ct[:, 2:6, 2:6] = 60
    assert guess_modality(ct) == "CT" and guess_modality(blob_image()) == "MR"
    assert guess_modality(blob_image() - 50) is None  # negative, but no air: unknown
    assert layer_channels(np.zeros((2, 4, 5, 6))) == 2 and layer_channels(ct) == 1
    cands = [("heart", "MR", 1), ("prostate", "MR", 2), ("spleen", "CT", 1)]
    # only a sure fit is suggested: the single domain of that modality taking that many volumes
    assert pick_domain(cands, 1, "CT").domain == "spleen"
    assert pick_domain(cands, 1, "MR").domain == "heart"
    assert pick_domain(cands, 2, "CT").domain is None  # no CT domain takes 2 volumes
    assert pick_domain(cands, 1, UNKNOWN).domain is None  # unknown modality: none, not the first
    assert pick_domain([], 1, "CT").domain is None


def test_ticked_domain_follows_the_image(make_napari_viewer, qtbot, tmp_path):
    """A CT image gets a CT domain ticked, a 2-volume image the 2-input domain, an image naming its
    domain (our samples) that one; a ticked domain that can run on the new image is kept."""
    from napari_u2net._geometry import META_KEY
    from tests.conftest import adapter_meta, small_net
    from training.model.modelfile import save_model

    net = small_net(domains=(("heart", 1, 2), ("prostate", 2, 3), ("spleen", 1, 2)))
    modality = {"heart": "MR", "prostate": "MR", "spleen": "CT"}
    save_model(tmp_path / "m", net, {n: adapter_meta(net, n, modality=modality[n]) for n in net.domains})
    viewer = make_napari_viewer()
    ct = np.where(blob_image() > 50, 60.0, -1000.0)
    viewer.add_image(ct, name="ct")
    widget = DomainSelectorWidget(viewer, predict_fn=ThresholdPredict())
    viewer.window.add_dock_widget(widget)
    widget.set_model_dir(tmp_path / "m")
    qtbot.waitUntil(lambda: widget.model is not None and widget.gui.domain_list.count() == 3, timeout=30000)
    qtbot.waitUntil(lambda: widget.hint_jobs == 0, timeout=10000)  # its values are read in a worker
    assert widget.checked_domains() == ["spleen"]  # not the first in the list (heart, an MR domain)
    viewer.add_image(np.stack([blob_image(), blob_image()]), name="two volumes")
    viewer.add_image(blob_image(), name="mr")
    viewer.add_image(blob_image() * 2, name="mr 2")
    viewer.add_image(blob_image(), name="named", metadata={META_KEY: {"domain": "spleen"}})
    # each opened image became the one to segment (issue #16), the last one names spleen
    assert widget.gui.image_combo.currentText() == "named" and widget.checked_domains() == ["spleen"]

    def choose(name):
        widget.gui.image_combo.setCurrentText(name)
        qtbot.waitUntil(lambda: widget.hint_jobs == 0, timeout=10000)
        return widget.checked_domains()

    assert choose("two volumes") == ["prostate"]
    assert choose("mr") == ["heart"]
    widget.set_checked_domains(["heart", "spleen"])  # the user's choice: heart can run on an MR image
    assert choose("mr 2") == ["heart", "spleen"]
    assert choose("named") == ["heart", "spleen"]  # spleen is the domain it names: kept
    widget.set_checked_domains(["heart"])
    assert choose("named") == ["heart"]  # unchanged image: nothing re-ticked
    assert choose("mr") == ["heart"]
    assert choose("named") == ["spleen"]  # heart is not the domain it names
    widget.set_checked_domains(["heart"])
    assert choose("ct") == ["spleen"]  # chosen by hand: heart cannot take a CT


def test_per_voxel_maps_become_image_layers_on_the_image_grid(make_napari_viewer, qtbot, model_dir, messages):
    """Every entry of a DomainResult's ``maps`` is shown as an Image layer ``<image> <domain> <map>``
    with exactly the image's geometry, as the labels are; a map with a leading (class) axis too."""
    viewer = make_napari_viewer()
    image = viewer.add_image(
        blob_image(), name="scan", affine=OBLIQUE, scale=(1.5, 1, 0.5), translate=(3, -2, 1), rotate=10
    )
    predict = ThresholdPredict(maps={
        "certainty": lambda img: (img / img.max()).astype(np.float32),
        "scores": lambda img: np.stack([1 - img / img.max(), img / img.max()]).astype(np.float32),
    })
    widget = make_widget(viewer, qtbot, model_dir, predict)
    widget.set_checked_domains(["ct"])
    run_and_wait(widget, qtbot)
    assert not [m for m in messages if m[0] == "error"], messages
    # the maps follow their result, each in an event-loop turn of its own
    qtbot.waitUntil(lambda: "scan ct certainty" in viewer.layers and "scan ct scores" in viewer.layers, timeout=5000)
    names = [lay.name for lay in viewer.layers]
    assert names.index("scan ct certainty") < names.index("scan ct")  # under the result
    assert viewer.layers.selection.active.name == "scan ct"  # the result stays the one to edit
    layer = viewer.layers["scan ct certainty"]
    assert layer._type_string == "image" and layer.data.dtype == np.float32
    np.testing.assert_array_equal(layer.data, (blob_image() / blob_image().max()).astype(np.float32))
    labels = viewer.layers["scan ct"]
    for part in ("scale", "translate", "rotate"):
        np.testing.assert_allclose(getattr(layer, part), getattr(image, part))
    np.testing.assert_array_equal(layer.affine.affine_matrix, image.affine.affine_matrix)
    np.testing.assert_allclose(layer._data_to_world.affine_matrix, labels._data_to_world.affine_matrix, atol=1e-12)
    probs = viewer.layers["scan ct scores"]  # a map with a class axis ("probabilities" only feeds the measurements)
    assert probs.data.shape == (2, *blob_image().shape)
    np.testing.assert_allclose(  # the spatial axes sit where the image's are
        probs._data_to_world.affine_matrix[1:, 1:], image._data_to_world.affine_matrix, atol=1e-9
    )
    run_and_wait(widget, qtbot)  # a second run replaces the maps
    qtbot.wait(500)
    assert [lay.name for lay in viewer.layers].count("scan ct certainty") == 1


def test_run_options_are_the_core_inference_config(make_napari_viewer, qtbot, model_dir, messages):
    """The options' defaults are InferenceConfig's; a run gets them as one InferenceConfig, backend,
    batch size and mixed precision included; every core backend is offered (OpenVINO greyed out
    when not installed)."""
    import importlib.util

    from training.infer.config import BACKENDS, InferenceConfig

    viewer = make_napari_viewer()
    viewer.add_image(blob_image(), name="scan")
    predict = ThresholdPredict()
    widget = make_widget(viewer, qtbot, model_dir, predict)
    g = widget.gui
    assert g.overlap_spin.value() == InferenceConfig.overlap
    assert g.backend_combo.currentData() == InferenceConfig.backend
    assert [g.backend_combo.itemData(i) for i in range(g.backend_combo.count())] == list(BACKENDS)
    openvino = g.backend_combo.model().item(g.backend_combo.findData("openvino"))
    assert openvino.isEnabled() == (importlib.util.find_spec("openvino") is not None)
    if not openvino.isEnabled():
        assert "openvino" in openvino.toolTip()
    run_and_wait(widget, qtbot)
    # the panel's one own default: uncertainty (and the probabilities behind the volumes) on
    assert predict.calls[-1]["config"] == InferenceConfig(
        device=g.device_combo.currentData(), uncertainty=True, probabilities=True
    )
    g.backend_combo.setCurrentIndex(g.backend_combo.findData("compiled"))
    g.batch_spin.setValue(3)
    g.amp_check.setChecked(False)
    g.overlap_spin.setValue(0.25)
    run_and_wait(widget, qtbot)
    config = predict.calls[-1]["config"]
    assert (config.backend, config.batch_size, config.amp, config.overlap) == ("compiled", 3, False, 0.25)


def test_an_empty_result_is_reported_not_just_added(make_napari_viewer, qtbot, model_dir, messages):
    """A domain that finds nothing (wrong domain, wrong region) says so in a warning that names
    what it looks for; before, the status line only said "Added …"."""
    viewer = make_napari_viewer()
    viewer.add_image(np.full((12, 16, 20), 5.0, np.float32), name="flat")  # nothing above its mean
    widget = make_widget(viewer, qtbot, model_dir, ThresholdPredict())
    widget.set_checked_domains(["ct"])
    run_and_wait(widget, qtbot)
    assert "flat ct" in viewer.layers and not viewer.layers["flat ct"].data.any()
    warnings = [text for level, text in messages if level == "warning"]
    assert len(warnings) == 1 and "ct found nothing in 'flat'" in warnings[0] and "class1" in warnings[0]
    messages.clear()
    viewer.add_image(blob_image(), name="scan")
    widget.gui.image_combo.setCurrentText("scan")
    run_and_wait(widget, qtbot)
    assert not [m for m in messages if m[0] == "warning"], messages


def test_the_cores_notes_on_a_result_reach_the_user(make_napari_viewer, qtbot, model_dir, messages):
    """What the core says about a result (``DomainResult.notes``: an image unlike the domain's
    training data, say) is shown as a warning naming the domain, not only logged."""
    viewer = make_napari_viewer()
    viewer.add_image(blob_image(), name="scan")
    note = "this scan looks unlike what ct was trained on: check the result"
    widget = make_widget(viewer, qtbot, model_dir, ThresholdPredict(notes=[note]))
    run_and_wait(widget, qtbot)
    assert "scan ct" in viewer.layers
    assert [text for level, text in messages if level == "warning"] == [f"ct: {note}"]


def test_a_newly_opened_or_selected_image_becomes_the_one_to_segment(make_napari_viewer, qtbot, model_dir, messages):
    """Issue #16: opening a second image left the Image choice on the first one, so the next run
    segmented (and named its result after) the previous case."""
    viewer = make_napari_viewer(show=True)
    first = viewer.add_image(blob_image(), name="case 1")
    widget = make_widget(viewer, qtbot, model_dir, ThresholdPredict())
    widget.set_checked_domains(["ct"])
    combo = widget.gui.image_combo
    assert combo.currentText() == "case 1"
    viewer.add_image(blob_image() * 2, name="case 2")
    viewer.add_image(blob_image() * 3, name="case 3")
    assert combo.currentText() == "case 3"  # the image just opened
    run_and_wait(widget, qtbot)
    assert "case 3 ct" in viewer.layers and "case 1 ct" not in viewer.layers
    # a result's labels or per-voxel map is not an image to segment
    assert combo.currentText() == "case 3"
    viewer.add_image(blob_image(), name="case 3 ct certainty", metadata={"u2net": {"map": "certainty"}})
    assert combo.currentText() == "case 3"
    # selecting an image in napari's layer list chooses it; selecting a labels layer does not
    viewer.layers.selection.active = first
    assert combo.currentText() == "case 1"
    viewer.layers.selection.active = viewer.layers["case 3 ct"]
    assert combo.currentText() == "case 1"
    run_and_wait(widget, qtbot)
    assert "case 1 ct" in viewer.layers
    # while a run is in progress the choice stays on the image being segmented
    widget.predict_fn = ThresholdPredict(tiles=200, delay=0.02)
    widget.gui.image_combo.setCurrentText("case 2")
    widget.run()
    viewer.add_image(blob_image(), name="case 4")
    viewer.layers.selection.active = viewer.layers["case 3"]
    assert combo.currentText() == "case 2"
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None and not widget.turns.busy, timeout=10000)
    viewer.layers.selection.active = viewer.layers["case 4"]
    assert combo.currentText() == "case 4"


def test_status_line_follows_every_outcome(make_napari_viewer, qtbot, model_dir, messages):
    """Issue #16: after an input error the status line kept the previous run's text."""
    viewer = make_napari_viewer(show=True)
    widget = make_widget(viewer, qtbot, model_dir, ThresholdPredict())
    status = widget.gui.status_label
    widget.run()  # no image yet: an input error
    assert messages[-1][0] == "error" and "no image layer" in messages[-1][1]
    assert status.text().startswith("Not started") and "no image layer" in status.text()
    viewer.add_image(blob_image(), name="scan")
    widget.set_checked_domains(["ct"])
    run_and_wait(widget, qtbot)
    assert "scan ct" in viewer.layers
    assert status.text().startswith("Done") and "'scan ct'" in status.text()
    widget.set_checked_domains([])
    widget.run()  # an input error after a success: the success is not left standing
    assert status.text().startswith("Not started") and "tick at least one domain" in status.text()
    widget.set_checked_domains(["ct"])
    widget.predict_fn = ThresholdPredict(tiles=200, delay=0.02)
    widget.run()
    qtbot.waitUntil(lambda: widget.gui.progress_bar.value() > 0, timeout=10000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None and not widget.turns.busy, timeout=10000)
    assert "cancel" in status.text()
    widget.predict_fn = ThresholdPredict(error=ValueError("boom in tile 3"))
    run_and_wait(widget, qtbot)
    level, text = messages[-1]
    # a failure: plain words and what to do; the exception's type and text are in the log only
    assert level == "error" and "unexpected problem" in text and "log" in text
    assert "ValueError" not in text and "boom" not in text and status.text() == text


def test_progress_bar_shows_plain_stage_words(make_napari_viewer, qtbot, model_dir):
    """The core's stage ids (preprocess, sliding-window, …) become words a radiologist reads."""
    from napari_u2net._progress_bar import STAGE_WORDS
    from napari_u2net._segment import RunReport

    viewer = make_napari_viewer()
    viewer.add_image(blob_image(), name="scan")
    widget = make_widget(viewer, qtbot, model_dir, ThresholdPredict())
    bar = widget.gui.progress_bar
    expected = {"preprocess": "preparing", "sliding-window": "segmenting", "resample": "resampling",
                "postprocess": "cleaning up", "done": "done"}
    assert {k: STAGE_WORDS[k] for k in expected} == expected
    widget._on_report(RunReport("", 0, 0, "starting", 0.0))
    assert bar.format() == "starting…"
    widget._on_report(RunReport("spleen-ct", 0, 12, "preprocess", 0.0))
    assert bar.format() == "spleen-ct: preparing…"
    widget._on_report(RunReport("spleen-ct", 3, 12, "sliding-window", 0.25))
    assert bar.format() == "spleen-ct: segmenting 25%" and bar.value() == 250
    widget._on_report(RunReport("spleen-ct", 12, 12, "resample", 0.9))
    assert bar.format() == "spleen-ct: resampling…"
    widget._on_report(RunReport("spleen-ct", 12, 12, "postprocess", 0.95))
    assert bar.format() == "spleen-ct: cleaning up…"
    widget._on_report(RunReport("", 1, 1, "done", 1.0))
    assert bar.format() == "done"
    # and in a run: what the bar showed never has a core id in it
    shown: list[str] = []
    report = widget._on_report
    widget._on_report = lambda r: (report(r), shown.append(bar.format()))
    run_and_wait(widget, qtbot)
    assert shown and not [t for t in shown if "sliding-window" in t or "preprocess" in t], shown


def test_pick_domain_ticks_only_a_sure_fit_and_says_why():
    """Issue #16 item 4: a wrong domain pre-ticked is worse than none."""
    from training.model.domain_match import BLANK, UNKNOWN, pick_domain, read_values

    assert read_values(np.zeros((4, 8, 8))) == BLANK and read_values(np.full((4, 8, 8), -1000.0)) == BLANK
    assert read_values(blob_image() - 50) == UNKNOWN and read_values(blob_image()) == "MR"
    cands = [("heart-mr", "MR", 1), ("hippocampus-mr", "MR", 1), ("prostate-mr", "MR", 2), ("spleen-ct", "CT", 1)]
    assert pick_domain(cands, 1, "CT").domain == "spleen-ct"
    assert pick_domain(cands, 2, "MR").domain == "prostate-mr"  # the only fit
    assert pick_domain(cands, 1, "MR", named="heart-mr").domain == "heart-mr"  # the image names it
    tie = pick_domain(cands, 1, "MR")
    assert tie.domain is None and "heart-mr, hippocampus-mr" in tie.reason and "several MR" in tie.reason
    assert "blank" in pick_domain(cands, 1, BLANK).reason and pick_domain(cands, 1, BLANK).domain is None
    assert "CT or MR" in pick_domain(cands, 1, UNKNOWN).reason and pick_domain(cands, 1, UNKNOWN).domain is None
    assert pick_domain(cands, 2, "CT").domain is None and pick_domain(cands, 1, None).domain is None


@pytest.fixture
def four_domain_model(tmp_path):
    """Two 1-volume MR domains, one 2-volume MR domain, one CT domain (like the bundled model)."""
    from tests.conftest import adapter_meta, small_net
    from training.model.modelfile import save_model

    net = small_net(domains=(("heart-mr", 1, 2), ("hippocampus-mr", 1, 2), ("prostate-mr", 2, 3), ("spleen-ct", 1, 2)))
    modality = {"heart-mr": "MR", "hippocampus-mr": "MR", "prostate-mr": "MR", "spleen-ct": "CT"}
    save_model(tmp_path / "m4", net, {n: adapter_meta(net, n, modality=modality[n]) for n in net.domains})
    return tmp_path / "m4"


@pytest.mark.parametrize(
    "name, data, expected, words",
    [
        ("brain MR with negative values", blob_image() - 50, [], "could not tell whether this is CT or MR"),
        ("all zero", np.zeros((12, 16, 20), np.float32), [], "blank"),
        ("noise", np.random.default_rng(0).random((12, 16, 20), np.float32) * 300, [],
         "several MR domains could fit this image (heart-mr, hippocampus-mr)"),
        ("MNI-like", blob_image(), [], "several MR domains"),
        ("two volumes", np.stack([blob_image(), blob_image() * 2]), ["prostate-mr"], "the only MR domain"),
        ("ct", np.where(blob_image() > 50, 60.0, -1000.0), ["spleen-ct"], "the only CT domain"),
    ],
)
def test_nothing_is_ticked_when_no_domain_surely_fits(
    make_napari_viewer, qtbot, four_domain_model, name, data, expected, words
):
    """Issue #16 item 4: a brain MR with negative values got spleen-ct, an all-zero image and noise
    heart-mr. Now nothing is ticked unless one domain surely fits, and the status line says why;
    also when the image is opened after the model (the case a user meets most)."""
    viewer = make_napari_viewer(show=True)
    viewer.add_image(data, name=name)
    widget = DomainSelectorWidget(viewer, predict_fn=ThresholdPredict())
    viewer.window.add_dock_widget(widget)
    widget.set_model_dir(four_domain_model)
    qtbot.waitUntil(lambda: widget.model is not None and widget.gui.domain_list.count() == 4, timeout=30000)
    qtbot.waitUntil(lambda: widget.hint_jobs == 0, timeout=10000)
    assert widget.checked_domains() == expected
    assert words in widget.gui.status_label.text(), widget.gui.status_label.text()
    # the same image opened after a CT (whose domain was ticked): the CT's tick does not stay
    viewer.layers.clear()
    viewer.add_image(np.where(blob_image() > 50, 60.0, -1000.0), name="a ct")
    qtbot.waitUntil(lambda: widget.hint_jobs == 0 and widget.checked_domains() == ["spleen-ct"], timeout=10000)
    viewer.add_image(data, name=name)
    qtbot.waitUntil(lambda: widget.hint_jobs == 0, timeout=10000)
    assert widget.checked_domains() == expected
    assert words in widget.gui.status_label.text(), widget.gui.status_label.text()
