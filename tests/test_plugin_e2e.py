"""The domain selector with the real inference engine, on the synthetic CT sample."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_u2net._jobs import drain  # noqa: E402
from napari_u2net._segment import RunRequest, run_segmentation  # noqa: E402
from napari_u2net._widget import DomainSelectorWidget  # noqa: E402
from training.io.folders import bundled_model_dir  # noqa: E402

pytestmark = pytest.mark.qt


@pytest.fixture
def ct_model_dir(tmp_path):
    """A tiny random one-domain model at CT-sample spacing (so no large resampling)."""
    from tests.conftest import adapter_meta, small_net
    from training.model.modelfile import save_model

    net = small_net(domains=(("ct", 1, 3),))
    # (the description's length matters only because of a modelfile bug: a safetensors header
    # whose length's low byte is 0x80 is taken for a pickle; reported to the lead)
    meta = adapter_meta(net, "ct", spacing=[5.0, 3.0, 3.0], patch_size=[16, 32, 32], description="tiny random CT")
    save_model(tmp_path / "model", net, {"ct": meta})
    return tmp_path / "model"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def open_sample(viewer):
    layers = viewer.open_sample("napari-u2net", "synthetic_ct")
    image = next(layer for layer in layers if layer._type_string == "image")
    truth = next(layer for layer in layers if layer._type_string == "labels")
    return image, truth


def test_sample_opens_with_geometry_and_class_names(make_napari_viewer):
    viewer = make_napari_viewer()
    image, truth = open_sample(viewer)
    np.testing.assert_array_equal(image.affine.affine_matrix, truth.affine.affine_matrix)
    assert image.data.shape == truth.data.shape and image.data.ndim == 3
    assert list(truth.features["class"])[0] == "background" and len(truth.features) == truth.data.max() + 1
    spacing = np.sqrt((image.affine.affine_matrix[:3, :3] ** 2).sum(axis=0))
    assert spacing[0] > spacing[1] >= 1.0  # thick slices, mm: CT-like geometry, not voxel units


def test_real_inference_through_the_widget(make_napari_viewer, qtbot, ct_model_dir):
    """Real predict (tiny random model): one labels layer on exactly the image's grid."""
    viewer = make_napari_viewer()
    image, _truth = open_sample(viewer)
    widget = DomainSelectorWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.set_model_dir(ct_model_dir, domains=["ct"])
    qtbot.waitUntil(lambda: widget.model is not None, timeout=60000)
    widget.gui.overlap_spin.setValue(0.0)
    shown: list[str] = []  # what the progress bar said, from the core's real stage ids
    report = widget._on_report
    widget._on_report = lambda r: (report(r), shown.append(widget.gui.progress_bar.format()))
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None and not widget.turns.busy, timeout=120000)
    assert any("segmenting" in t for t in shown) and shown[-1] == "done", shown
    assert not [t for t in shown if any(k in t for k in ("sliding-window", "preprocess", "postprocess"))], shown
    assert widget.gui.status_label.text().startswith("Done")
    labels = viewer.layers[f"{image.name} ct"]
    assert labels.data.shape == image.data.shape and labels.data.dtype.kind == "u"
    np.testing.assert_array_equal(labels.affine.affine_matrix, image.affine.affine_matrix)
    np.testing.assert_allclose(labels._data_to_world.affine_matrix, image._data_to_world.affine_matrix)


def test_job_returns_what_predict_returns(ct_model_dir):
    """The widget's job (progress reports, threads, cancel) returns the core's Prediction unchanged."""
    import threading

    from training.data.synth import generate_case
    from training.infer.config import InferenceConfig
    from training.infer.pipeline import predict
    from training.model.modelfile import load_model

    volume, _ = generate_case("liver-ct", 3, size_scale=0.5)
    model = load_model(ct_model_dir)
    config = InferenceConfig(device="cpu", overlap=0.0)
    results = {}
    results[False] = predict(model, volume, ["ct"], config)["ct"].labels
    results[True] = drain(run_segmentation(RunRequest(model, volume, ["ct"], config), threading.Event()))["ct"].labels
    np.testing.assert_array_equal(results[False], results[True])


@pytest.mark.skipif(
    not (bundled_model_dir() / "trunk.safetensors").is_file(), reason="no bundled model installed yet"
)
def test_bundled_model_segments_the_sample(make_napari_viewer, qtbot):
    """The default model on its own sample: Dice against the sample's ground truth."""
    viewer = make_napari_viewer()
    image, truth = open_sample(viewer)
    domain = truth.metadata["u2net"].get("domain") or image.metadata["u2net"]["domain"]
    widget = DomainSelectorWidget(viewer)
    qtbot.waitUntil(lambda: widget.model is not None, timeout=60000)
    widget.set_checked_domains([domain])
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None and not widget.turns.busy, timeout=300000)
    labels = viewer.layers[f"{image.name} {domain}"]
    np.testing.assert_array_equal(labels.affine.affine_matrix, image.affine.affine_matrix)
    assert dice(labels.data, truth.data) >= 0.8


def test_mni152_sample_has_tissue_truth_on_its_grid():
    from training.data.mni152 import mni152_available

    if not mni152_available():
        pytest.skip("nilearn (MNI152 files) not installed")
    from napari_u2net._sample_data import mni152_t1

    (img, img_attrs, kind), (lab, lab_attrs, lab_kind) = mni152_t1()
    assert (kind, lab_kind) == ("image", "labels") and img.shape == lab.shape and img.ndim == 3
    np.testing.assert_array_equal(img_attrs["affine"], lab_attrs["affine"])
    assert list(lab_attrs["features"]["class"]) == ["background", "grey matter", "white matter"]
    spacing = np.sqrt((np.asarray(img_attrs["affine"])[:3, :3] ** 2).sum(axis=0))
    np.testing.assert_allclose(spacing, 2.0)
    assert set(np.unique(lab)) == {0, 1, 2}


@pytest.mark.skipif(
    not (bundled_model_dir() / "trunk.safetensors").is_file(), reason="no bundled model installed yet"
)
def test_mni152_sample_pre_ticks_the_brain_domain(make_napari_viewer, qtbot):
    """Opened as a user does (selector docked first, then the sample), the brain T1 gets the brain
    domain ticked: by its values alone it is a 1-volume MR image, like heart-mr and hippocampus-mr."""
    from training.data.mni152 import DOMAIN, mni152_available

    if not mni152_available():
        pytest.skip("nilearn (MNI152 files) not installed")
    viewer = make_napari_viewer()
    widget = DomainSelectorWidget(viewer)
    viewer.window.add_dock_widget(widget)
    viewer.open_sample("napari-u2net", "mni152")
    qtbot.waitUntil(lambda: widget.model is not None, timeout=60000)
    assert widget.image_layer().name == "MNI152 T1"
    assert widget.checked_domains() == [DOMAIN]


@pytest.mark.skipif(
    not (bundled_model_dir() / "trunk.safetensors").is_file(), reason="no bundled model installed yet"
)
def test_a_result_that_cannot_be_what_the_domain_describes_is_reported(make_napari_viewer, qtbot, tmp_path,
                                                                        messages):
    """Issue #16.4: a 2-volume brain series (fMRI-like) run with prostate-mr drew prostate zones in
    the brain and only said "Added …". With the panel's default (uncertainty on) the result is
    still added, but a warning says the scan looks unlike what prostate-mr was trained on."""
    import nibabel as nib

    from training.data.mni152 import mni152_available

    if not mni152_available():
        pytest.skip("nilearn (MNI152 files) not installed")
    from training.data.mni152 import load_mni152

    t1, _ = load_mni152(2.0)
    series = np.stack([t1.data[0], t1.data[0] * 1.02], axis=-1).transpose(2, 1, 0, 3)  # (x, y, z, t)
    nib.save(nib.Nifti1Image(series.astype(np.float32), t1.affine), str(tmp_path / "fmri.nii.gz"))
    viewer = make_napari_viewer()
    widget = DomainSelectorWidget(viewer)
    viewer.window.add_dock_widget(widget)
    viewer.open(str(tmp_path / "fmri.nii.gz"), plugin="napari-u2net")
    qtbot.waitUntil(lambda: widget.model is not None, timeout=60000)
    # once its values are read (MR), the only MR domain for 2 volumes is ticked (domain_match's
    # rule: it cannot know the scan is a brain); before, nothing is. Asserting "not ticked" without
    # waiting raced with that reading and failed in 1 run of 3.
    qtbot.waitUntil(lambda: widget.hint_jobs == 0, timeout=60000)
    assert widget.checked_domains() == ["prostate-mr"]
    widget.set_checked_domains(["prostate-mr"])  # the user keeps it
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None and not widget.turns.busy, timeout=300000)
    assert "fmri prostate-mr" in viewer.layers
    warnings = [text for level, text in messages if level == "warning"]
    assert any("looks unlike what prostate-mr was trained on" in w for w in warnings), messages
