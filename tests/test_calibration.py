"""Temperature scaling: the fit, its storage in the adapter metadata, and its use in inference
(probability and uncertainty maps, the notes a result carries), in training and in evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import SMALL_ARCH, adapter_meta, small_net
from tests.training_data import ball_case, ball_domain
from training.commands.cli import main
from training.infer.pipeline import InferenceConfig, predict
from training.io.volume import Volume
from training.model.modelfile import ModelFileError, load_model, read_weights, save_model, write_weights
from training.train.calibration import (
    CalibrationSet,
    calibrated,
    conformal_quantile,
    expected_calibration_error,
    fit_temperature,
)
from training.train.config import TrainConfig

CALIBRATION = {"temperature": 2.0, "ece_before": 0.05, "ece_after": 0.01, "cases": 3,
               "mean_uncertainty_fg": 0.2, "volume_interval": {"nominal": 0.9, "scale": [1.5]}}


def _overconfident(n=40_000, k=3, t=2.5, seed=0):
    """Logits whose labels are drawn from softmax(logits / t): the right temperature is ``t``."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, k, generator=g) * 2
    labels = torch.multinomial(torch.softmax(true, 1), 1, generator=g)[:, 0]
    return true * t, labels


@pytest.mark.parametrize("t", [0.6, 2.5])
def test_fit_recovers_a_known_temperature_and_ece_drops(t):
    logits, labels = _overconfident(t=t)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(t, rel=0.03)
    before = expected_calibration_error(torch.softmax(logits, 1), labels)
    after = expected_calibration_error(torch.softmax(logits / fitted, 1), labels)
    assert before > 0.05 and after < 0.01 and after < 0.2 * before
    per_class = fit_temperature(logits, labels, per_class=True)
    assert per_class == pytest.approx([t] * 3, rel=0.05)


def test_calibration_set_fits_volumes_stratified_and_weighted():
    """Whole 3D cases (mostly sure background, a ball of uncertain border): the fit through the
    stratified subsample still finds the temperature the labels were drawn with."""
    g = torch.Generator().manual_seed(1)
    cs = CalibrationSet(2, voxel_ml=0.008)
    for i in range(4):
        _, lab = ball_case(i, shape=(24, 24, 24))
        dist = torch.from_numpy(_distance_to_border(lab))
        true = torch.stack([-dist, dist])  # margin grows with the distance to the border
        draw = torch.bernoulli(torch.softmax(true, 0)[1], generator=g).numpy().astype(np.uint8)
        cs.add(torch.softmax(true * 3.0, 0), draw)  # a network three times too sure
    entry = cs.fit()
    assert entry["temperature"] == pytest.approx(3.0, rel=0.1)
    assert entry["ece_after"] < 0.5 * entry["ece_before"]
    assert entry["cases"] == 4 and entry["voxels"] == 4 * 24**3
    assert 0 < entry["mean_uncertainty_fg"] < 1
    assert len(entry["volume_interval"]["scale"]) == 1 and entry["volume_interval"]["nominal"] == 0.9


def _distance_to_border(lab):
    from scipy import ndimage

    inside = ndimage.distance_transform_edt(lab)
    outside = ndimage.distance_transform_edt(1 - lab)
    return (inside - outside).astype(np.float32) * 0.8


def test_conformal_quantile_and_temperature_transform():
    assert conformal_quantile([0.1 * i for i in range(1, 20)]) == pytest.approx(1.8)  # ⌈20·0.9⌉ = 18th
    assert conformal_quantile([3.0, 1.0]) == 3.0  # few cases: the largest
    logits = torch.randn(3, 4, 5, 6)
    p1, p2 = torch.softmax(logits, 0), torch.softmax(logits / 2.0, 0)
    assert torch.allclose(calibrated(p1, 2.0), p2, atol=1e-5)


# -- metadata ------------------------------------------------------------------------------------
def _model(tmp_path, calibration=None, spacing=(1.0, 1.0, 1.0)):
    net = small_net()
    metas = {n: adapter_meta(net, n, spacing=list(spacing), calibration=calibration if n == "ct" else None)
             for n in net.domains}
    save_model(tmp_path / "model", net, metas)
    return tmp_path / "model"


def test_calibration_round_trips_and_an_absurd_temperature_is_refused(tmp_path):
    model_dir = _model(tmp_path, CALIBRATION)
    meta = load_model(model_dir).meta("ct")
    assert meta.calibration == CALIBRATION and meta.temperature == 2.0
    path = model_dir / "adapters" / "ct.safetensors"
    state, raw = read_weights(path, "adapter")
    for bad in (0.0, -1.0, 1e9, "2", None, float("nan")):
        write_weights(path, state, {**raw, "calibration": {**CALIBRATION, "temperature": bad}})
        with pytest.raises(ModelFileError, match="calibration.temperature must be a number from 0.05 to 20"):
            load_model(model_dir)
    write_weights(path, state, {**raw, "calibration": {**CALIBRATION, "volume_interval": {"scale": [1, 2]}}})
    with pytest.raises(ModelFileError, match="calibration.volume_interval"):
        load_model(model_dir)
    write_weights(path, state, {**raw, "calibration": "hot"})
    with pytest.raises(ModelFileError, match="calibration must be an object"):
        load_model(model_dir)


# -- inference -----------------------------------------------------------------------------------
def _volume(spacing=(1.0, 1.0, 1.0), shape=(20, 24, 22), seed=0):
    img, _ = ball_case(seed, shape=shape)
    return Volume(img, np.diag([*spacing, 1.0]))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.6, 0.7, 1.3)], ids=["own-grid", "resampled"])
def test_uncertainty_and_probability_maps_on_the_input_grid(tmp_path, spacing):
    model = load_model(_model(tmp_path, CALIBRATION))
    vol = _volume(spacing)
    plain = predict(model, vol, ["ct"], InferenceConfig(device="cpu", postprocess=False))["ct"]
    result = predict(model, vol, ["ct"], InferenceConfig(device="cpu", postprocess=False, uncertainty=True,
                                                         probabilities=True))["ct"]
    u, p = result.maps["uncertainty"], result.maps["probabilities"]
    assert u.shape == vol.shape and u.dtype == np.float16 and 0 <= u.min() and u.max() <= 1 and u.max() > 0
    assert p.shape == (2, *vol.shape) and p.dtype == np.float16
    assert np.allclose(p.sum(0, dtype=np.float32), 1, atol=2e-3)
    assert np.array_equal(result.labels, plain.labels)  # the temperature never changes the labels
    if spacing == (1.0, 1.0, 1.0):  # on its own grid the argmax of the map is the label
        assert (p.argmax(0) == result.labels).mean() > 0.999
    # the temperature is applied: the same maps at temperature 1 are surer
    model.meta("ct").calibration = None
    raw = predict(model, vol, ["ct"], InferenceConfig(device="cpu", postprocess=False, uncertainty=True,
                                                      probabilities=True))["ct"]
    expected = calibrated(torch.from_numpy(raw.maps["probabilities"]), 2.0).numpy()
    if spacing == (1.0, 1.0, 1.0):
        assert np.allclose(expected, p, atol=4e-3)
    else:  # the temperature comes before the interpolation, so the two differ a little, voxel by voxel
        p32 = p.astype(np.float32)
        assert np.abs(expected - p32).mean() < 0.25 * np.abs(raw.maps["probabilities"] - p32).mean()
    assert float(u.astype(np.float32).mean()) > float(raw.maps["uncertainty"].astype(np.float32).mean())
    assert not predict(model, vol, ["ct"], InferenceConfig(device="cpu"))["ct"].maps  # off by default


def test_older_file_uses_temperature_one_and_says_so_once(tmp_path):
    model_dir = _model(tmp_path)
    path = model_dir / "adapters" / "ct.safetensors"
    state, raw = read_weights(path, "adapter")
    raw.pop("calibration")  # as written before calibration existed
    write_weights(path, state, raw)
    model = load_model(model_dir)
    assert model.meta("ct").calibration is None and model.meta("ct").temperature == 1.0
    result = predict(model, _volume(), ["ct"], InferenceConfig(device="cpu", uncertainty=True))["ct"]
    assert len(result.notes) == 1 and "no calibration" in result.notes[0] and "temperature 1" in result.notes[0]
    assert predict(model, _volume(), ["ct"], InferenceConfig(device="cpu"))["ct"].notes == []


def test_a_scan_far_less_certain_than_validation_is_flagged(tmp_path):
    model = load_model(_model(tmp_path, CALIBRATION))
    config = InferenceConfig(device="cpu", uncertainty=True)
    result = predict(model, _volume(), ["ct"], config)["ct"]
    fg = result.labels > 0
    assert fg.any()
    mean = float(result.maps["uncertainty"][fg].astype(np.float32).mean())
    model.meta("ct").calibration = {**CALIBRATION, "mean_uncertainty_fg": mean * 0.3}
    notes = predict(model, _volume(), ["ct"], config)["ct"].notes
    assert len(notes) == 1 and "this scan looks unlike what ct was trained on: check the result" in notes[0]
    model.meta("ct").calibration = {**CALIBRATION, "mean_uncertainty_fg": min(mean * 1.5, 1.0)}
    assert predict(model, _volume(), ["ct"], config)["ct"].notes == []


# -- training and evaluation ---------------------------------------------------------------------
def test_training_and_adaptation_store_a_fitted_calibration(tmp_path):
    from training.train.adaptation import adapt_domain
    from training.train.runs import train_model
    from training.train.trainer import consume

    cfg = TrainConfig(iterations=3, lr=1e-2, device="cpu", checkpoint_every=0, batch_size=1)
    small = (16, 16, 16)  # one tile per validation case
    consume(train_model([ball_domain("balls", n_train=2, n_val=2, patch=small, shape=small)], tmp_path / "m", cfg,
                        SMALL_ARCH))
    cal = load_model(tmp_path / "m").meta("balls").calibration
    assert cal["cases"] == 2 and 0.05 <= cal["temperature"] <= 20 and cal["ece_before"] >= 0
    cases = [ball_case(200 + i, shape=small, contrast=-2.0) for i in range(2)]
    consume(adapt_domain(tmp_path / "m", "dark", cases, ["background", "ball"], "CT",
                         config=TrainConfig(iterations=2, device="cpu", patch_size=small, batch_size=1),
                         val_cases=[ball_case(300, shape=small, contrast=-2.0)]))
    model = load_model(tmp_path / "m")
    assert model.meta("dark").calibration["cases"] == 1
    assert model.meta("balls").calibration == cal  # the other domain untouched


def test_evaluate_prints_ece_before_and_after(tmp_path, capsys):
    model_dir = _model(tmp_path, CALIBRATION, spacing=(12.0, 9.0, 9.0))  # a coarse grid: a quick sweep
    assert main(["synth", str(tmp_path / "ds"), "--domain", "spleen-ct", "--cases", "2", "--seed", "3",
                 "--size-scale", "0.4"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "ds"), "--domain", "ct", "--model", str(model_dir),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("calibration: ECE ") and "(temperature 2.000)" in line for line in out)
    assert any(line.startswith("volume: mean |error| ") for line in out)
    summary = json.loads(out[-1])
    assert summary["calibrated"] and 0 <= summary["ece_before"] <= 1 and 0 <= summary["ece_after"] <= 1
    assert summary["ece_before"] != summary["ece_after"]
    assert summary["volume"]["nominal"] == 0.9 and "coverage" in summary["volume"]


def test_maps_go_back_with_the_same_interpolation_as_the_labels():
    """The maps' separable resampling gives what SimpleITK's linear resampling gives."""
    from training.infer.pipeline import _axis_map, _resample_separable
    from training.io.resample import resample, resampled_grid

    affine = np.diag([1.3, 0.6, 0.7, 1.0])
    affine[:3, 3] = [5.0, -3.0, 2.0]
    shape = (30, 50, 44)
    grid_affine, grid_shape = resampled_grid(affine, shape, (4.0, 3.1, 2.9))
    channel = np.random.default_rng(0).uniform(0, 1, grid_shape).astype(np.float32)
    out = np.empty(shape, np.float32)
    _resample_separable(channel, *_axis_map(grid_affine, affine), out, rows=7)
    assert np.allclose(out, resample(channel, grid_affine, affine, shape), atol=1e-6)
    rotated = affine.copy()
    rotated[:3, :3] = rotated[:3, :3] @ np.array([[1, 0, 0], [0, 0.8, -0.6], [0, 0.6, 0.8]])
    assert _axis_map(grid_affine, rotated) is None  # not axis-aligned: SimpleITK does it


@pytest.mark.parametrize("rows", [1, 3, 8, 64])
def test_labels_go_back_as_the_argmax_of_each_class_resampled(rows):
    """The labels' separable way back, a slab of input rows at a time, gives the argmax of the
    class maps as the maps go back (:func:`_resample_separable`), and, inside the network's grid,
    exactly what the per-class SimpleITK resampling it replaced gave. (On the outermost input
    voxels, half a network voxel or more past its last centre, SimpleITK switches to the nearest
    voxel in every axis; the separable way clamps only the axis that is out.)"""
    import torch

    from training.infer.pipeline import _argmax, _axis_map, _labels_separable, _resample_separable
    from training.io.resample import resample, resampled_grid

    affine = np.diag([0.8, 0.7, 0.75, 1.0])
    affine[:3, 3] = [2.0, -4.0, 1.0]
    shape = (41, 37, 52)
    grid_affine, grid_shape = resampled_grid(affine, shape, (3.2, 2.1, 2.6))
    rng = np.random.default_rng(1)
    probs = torch.softmax(torch.from_numpy(rng.normal(0, 3, (4, *grid_shape)).astype(np.float32)), 0)
    probs = probs.half().numpy()  # as the sweep keeps them
    scale, offset = _axis_map(grid_affine, affine)
    labels = _labels_separable(probs, scale, offset, shape, np.uint8, None, rows=rows)
    assert labels.dtype == np.uint8 and labels.shape == shape
    assert len(np.unique(labels)) == 4  # every class wins somewhere: the comparison means something

    maps = np.empty((4, *shape), np.float32)
    for p, out in zip(probs, maps):
        _resample_separable(p, scale, offset, out)
    np.testing.assert_array_equal(labels, np.argmax(maps, axis=0))

    itk = _argmax((resample(p.astype(np.float32), grid_affine, affine, shape) for p in probs), shape, np.uint8)
    inside = np.ix_(*[np.nonzero(np.arange(n) * scale[a] + offset[a] < grid_shape[a] - 0.5)[0]
                      for a, n in enumerate(shape)])
    assert labels[inside].size > 0.8 * labels.size
    np.testing.assert_array_equal(labels[inside], itk[inside])
