"""Inference engine: MONAI parity, exact geometry, bad input, cancel/progress, OOM fall-back."""

from __future__ import annotations

import os
import threading

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path
from torch import nn

from tests.conftest import adapter_meta, small_net
from training.errors import Cancelled, InputError
from training.infer import backends
from training.infer import pipeline as inference
from training.infer.pipeline import InferenceConfig, predict, predict_files
from training.infer.postprocess import component_counts, keep_largest_components
from training.infer.sliding_window import (
    InferenceProgress,
    LabelSink,
    OomPolicy,
    ProbabilitySink,
    count_tiles,
    sliding_window,
    sweep_slabs,
    tile_starts,
)
from training.io.resample import canonical_orientation, reorient_affine, reorient_array, undo_reorient_array
from training.io.volume import Volume, read_image, write_labels, write_nifti
from training.model.modelfile import Model, TrunkMeta, make_classes
from training.model.network import ArchConfig, DomainConfig

PATCH = (16, 24, 24)
CPU = InferenceConfig(device="cpu")


# -- helpers ------------------------------------------------------------------------------------
class ThresholdNet(nn.Module):
    """A stand-in network whose answer is known: class 1 where intensity > 0.5, per voxel.

    Every tile gives a voxel the same logits, so blending cannot change them and the labels are
    exactly ``image > 0.5`` on the grid the network saw; what remains to test is the geometry.
    """

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.tensor(8.0))

    def domain_config(self, name: str) -> DomainConfig:
        return DomainConfig(name, 1, self.num_classes)

    def forward(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        fg = self.scale * (x[:, :1] - 0.5)
        rest = [torch.full_like(fg, -1e3)] * (self.num_classes - 2)
        return torch.cat([torch.zeros_like(fg), fg, *rest], dim=1)


def threshold_model(spacing=(1.0, 1.0, 1.0), num_classes: int = 2, domains=("cube",)) -> Model:
    net = ThresholdNet(num_classes)
    names = ["background"] + [f"c{i}" for i in range(1, num_classes)]
    metas = {
        d: inference_meta(d, names, spacing)
        for d in domains
    }
    return Model(net, TrunkMeta(ArchConfig(), "fake"), metas)


def inference_meta(domain, names, spacing):
    from training.model.modelfile import AdapterMeta

    return AdapterMeta(domain=domain, modalities=["CT"], classes=make_classes(names), spacing=list(spacing),
                       patch_size=list(PATCH), normalization=[{"scheme": "none"}])


def small_model(spacing=(2.0, 2.0, 2.0)) -> Model:
    net = small_net().eval()
    metas = {n: adapter_meta(net, n, spacing=list(spacing), patch_size=list(PATCH)) for n in net.domains}
    return Model(net, TrunkMeta(net.arch, "test"), metas)


def rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def cube_volume(shape, affine) -> Volume:
    data = np.zeros(shape, dtype=np.float32)
    lo = [s // 4 for s in shape]
    hi = [s - s // 4 for s in shape]
    data[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1.0
    return Volume(data[None], affine)


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)
    return (affine @ np.append(idx, 1.0))[:3]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# -- sliding window -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 20, 40, 36), (1, 10, 20, 50)])
def test_probabilities_match_monai(shape):
    from monai.inferers import sliding_window_inference

    net = small_net().eval()
    torch.manual_seed(1)
    image = torch.randn(shape)
    ours = sliding_window(net, "ct", image, PATCH, overlap=0.5, device="cpu")
    with torch.no_grad():
        ref = sliding_window_inference(image[None], PATCH, 1, lambda x: net(x, "ct"), overlap=0.5, mode="gaussian",
                                       padding_mode="replicate")
    ref = torch.softmax(ref[0], dim=0)
    assert ours.shape == ref.shape == (2, *shape[1:])
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() < 1e-4


def test_tile_starts_match_monai():
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for size, patch, overlap in [(40, 24, 0.5), (128, 64, 0.5), (37, 16, 0.25), (24, 24, 0.5), (100, 7, 0.9)]:
        interval = _get_scan_interval((size,), (patch,), 1, (overlap,))
        ref = [s[0].start for s in dense_patch_slices((size,), (patch,), interval)]
        assert tile_starts(size, patch, overlap) == ref


def test_batched_tiles_give_the_same_probabilities():
    net = small_net().eval()
    image = torch.randn(1, 20, 40, 36)
    one = sliding_window(net, "ct", image, PATCH, device="cpu", batch_size=1)
    four = sliding_window(net, "ct", image, PATCH, device="cpu", batch_size=4)
    assert (one - four).abs().max().item() < 1e-5


def test_progress_counts_up_to_total_and_cancel_returns_nothing():
    net = small_net().eval()
    image = torch.randn(1, 20, 40, 36)
    seen: list[InferenceProgress] = []
    sliding_window(net, "ct", image, PATCH, device="cpu", progress=seen.append)
    done = [p.done for p in seen]
    total = count_tiles(image.shape[1:], PATCH, 0.5)
    assert done == sorted(done) and done[-1] == total == seen[-1].total
    assert len(set(done)) == len(done)

    stop = threading.Event()
    calls = []

    def progress(p):
        calls.append(p.done)
        if p.done == 2:
            stop.set()

    with pytest.raises(Cancelled):
        sliding_window(net, "ct", image, PATCH, device="cpu", progress=progress, cancel=stop)
    assert calls == [1, 2]  # checked between tiles: nothing ran after the flag was set
    with pytest.raises(Cancelled):
        predict(small_model(), Volume(image.numpy(), np.eye(4)), ["ct"], CPU, cancel=lambda: True)


class MaxProbabilitySink:
    """A sink the engine does not know: the top class probability, and the rows it was given."""

    def __init__(self, shape):
        self.out = np.zeros(shape, dtype=np.float32)
        self.rows = []

    def add(self, slab):
        self.rows.append((slab.z0, slab.z1))
        self.out[slab.z0 : slab.z1] = slab.probabilities().amax(dim=0).numpy()

    def result(self):
        return self.out


@pytest.mark.parametrize("shape", [(1, 20, 40, 36), (1, 10, 20, 50)])  # the second is padded
def test_every_sink_sees_the_same_slabs(shape):
    net = small_net().eval()
    image = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    reference = sliding_window(net, "ct", image, PATCH, device="cpu")
    runner = backends.make_runner(net, "ct", "torch", torch.device("cpu"), patch_size=PATCH)
    labels, top = LabelSink(shape[1:], runner.num_classes), MaxProbabilitySink(shape[1:])
    sweep_slabs(runner, "ct", image, PATCH, [labels, top])
    assert top.rows[0][0] == 0 and top.rows[-1][1] == shape[1]
    assert all(a[1] == b[0] for a, b in zip(top.rows, top.rows[1:]))  # in order, each row once
    assert torch.equal(torch.from_numpy(top.result()), reference.amax(dim=0))
    assert labels.result().dtype == np.uint8
    assert np.array_equal(labels.result(), reference.argmax(dim=0).numpy())


def test_out_of_memory_degrades_instead_of_crashing(monkeypatch):
    net = small_net().eval()
    image = torch.randn(1, 20, 40, 36)
    reference = sliding_window(net, "ct", image, PATCH, device="cpu", batch_size=1)
    real_call = backends.TorchRunner.__call__
    sizes = []

    def flaky(self, tiles):
        sizes.append(tiles.shape[0])
        if tiles.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, tiles)

    monkeypatch.setattr(backends.TorchRunner, "__call__", flaky)
    result = sliding_window(net, "ct", image, PATCH, device="cpu", batch_size=4)
    assert sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}
    assert (result - reference).abs().max().item() < 1e-5


def test_oom_policy_order_on_a_gpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    policy = OomPolicy(batch_size=4)
    assert policy.next_step(cuda, cuda) == "smaller-batch" and policy.batch_size == 2
    assert policy.next_step(cuda, cuda) == "smaller-batch" and policy.batch_size == 1
    assert policy.next_step(cuda, cuda) == "accumulate-on-cpu"
    assert policy.next_step(cuda, cpu) == "run-on-cpu"
    assert policy.next_step(cpu, cpu) == "give-up"


def test_training_network_is_left_as_it_was():
    net = small_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sliding_window(net, "ct", torch.randn(1, 16, 24, 24), PATCH, device="cpu")
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.is_contiguous() for p in net.parameters())


# -- geometry -----------------------------------------------------------------------------------
def test_reorientation_is_exact_and_reversible():
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, 2.0, -3.0])[:, [2, 0, 1]] @ rotation(1, 10)
    affine[:3, 3] = [5, -7, 11]
    data = np.random.default_rng(0).random((2, 5, 6, 7))
    o = canonical_orientation(affine)
    re = reorient_array(data, o)
    re_affine = reorient_affine(affine, data.shape[1:], o)
    # the same voxel keeps its world position
    for idx in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        new_idx = tuple(np.argwhere(re[0] == data[0][idx])[0])
        assert np.allclose(affine @ [*idx, 1], re_affine @ [*new_idx, 1])
    # canonical axes point to S, A, R
    assert np.all(np.argmax(np.abs(re_affine[:3, :3]), axis=0) == [2, 1, 0])
    assert np.all(np.diag(re_affine[:3, :3][[2, 1, 0]]) > 0)
    assert np.array_equal(undo_reorient_array(re, o), data)


def _affines():
    ras = np.diag([1.0, 1.0, 1.0, 1.0])[:, [2, 1, 0, 3]]  # our axes S, A, R
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])[:, [2, 1, 0, 3]]
    aniso = np.diag([0.8, 0.8, 2.5, 1.0])[:, [2, 1, 0, 3]]
    oblique = np.eye(4)
    oblique[:3, :3] = rotation(0, 25) @ rotation(2, -15) @ np.diag([1.1, 0.9, 1.7])[:, [2, 1, 0]]
    for a in (ras, lps, aniso, oblique):
        a[:3, 3] = [-12.5, 30.0, 4.25]
    return {"ras": ras, "lps": lps, "anisotropic": aniso, "oblique": oblique}


@pytest.mark.parametrize("name", list(_affines()))
@pytest.mark.parametrize("spacing", [None, (1.5, 1.25, 1.5)])
def test_labelled_cube_lands_where_it_was(tmp_path, name, spacing):
    # Through a file first, so that the input's affine is what NIfTI (float32) can hold.
    source = write_nifti(tmp_path / "image.nii.gz", cube_volume((20, 28, 24), _affines()[name]).data,
                         _affines()[name])
    volume = read_image(source)
    affine = volume.affine
    if spacing is None:  # the domain's spacing is the image's: no resampling at all
        spacing = tuple(canonical_spacing(affine))
    model = threshold_model(spacing)
    labels = predict(model, volume, ["cube"], CPU)["cube"].labels
    truth = volume.data[0] > 0.5
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert dice(labels == 1, truth) > 0.9
    if np.allclose(spacing, canonical_spacing(affine)):
        assert np.array_equal(labels == 1, truth)  # no resampling: the result is exact
    # (resampled there and back, the boundary may move by a voxel: the dice and centroid say so)
    step = np.linalg.norm(affine[:3, :3], axis=0).max()
    assert np.linalg.norm(world_centroid(labels == 1, affine) - world_centroid(truth, affine)) < step

    out = write_labels(tmp_path / f"{name}.nii.gz", labels, volume.affine, like=volume)
    back = read_image(out)
    assert back.shape == volume.shape
    assert np.array_equal(back.affine, volume.affine)
    assert np.array_equal(back.data[0], labels)
    assert np.array_equal(nib.load(out).affine, nib.load(source).affine)


def canonical_spacing(affine):
    o = canonical_orientation(affine)
    return np.linalg.norm(reorient_affine(affine, (2, 2, 2), o)[:3, :3], axis=0)


@pytest.mark.parametrize("filename", ["anatomical.nii", "example4d.nii.gz"])
def test_real_nifti_files_round_trip(tmp_path, filename):
    source = os.path.join(data_path, filename)
    volume = read_image(source)
    if volume.channels > 1:  # example4d: an oblique 2-time-point series; take the first volume
        volume = Volume(volume.data[:1], volume.affine, volume.header, source=source)
    data = volume.data[0].astype(np.float32)
    threshold = float(np.percentile(data, 70))
    volume = Volume((data > threshold).astype(np.float32)[None], volume.affine, volume.header, source=source)
    truth = volume.data[0] > 0.5
    labels = predict(threshold_model((3.0, 3.0, 3.0)), volume, ["cube"],
                     InferenceConfig(device="cpu", postprocess=False))["cube"].labels
    assert labels.shape == volume.shape
    assert (labels == 1).mean() == pytest.approx(truth.mean(), abs=0.05)
    assert dice(labels == 1, truth) > 0.7  # coarse 3 mm grid: edges move, the bulk stays
    out = write_labels(tmp_path / "labels.nii.gz", labels, volume.affine, like=volume)
    img, ref = nib.load(out), nib.load(source)
    assert img.shape == ref.shape[:3]
    assert np.array_equal(img.affine, ref.affine)
    assert np.array_equal(img.header.get_qform(), ref.header.get_qform())


def test_real_network_on_oblique_file_keeps_geometry():
    volume = read_image(os.path.join(data_path, "example4d.nii.gz"))
    volume = Volume(volume.data[:1], volume.affine, volume.header)
    labels = predict(small_model(spacing=(4.0, 4.0, 4.0)), volume, ["ct"], CPU)["ct"].labels
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1}


@pytest.mark.parametrize("resampled", [False, True])
def test_a_map_goes_back_to_the_input_grid_as_the_labels_do(monkeypatch, resampled):
    affine = _affines()["oblique"]  # permuted, flipped and rotated axes
    volume = cube_volume((20, 28, 24), affine)
    model = threshold_model((1.5, 1.25, 1.5) if resampled else tuple(canonical_spacing(affine)))
    config = InferenceConfig(device="cpu", postprocess=False)
    assert predict(model, volume, ["cube"], config)["cube"].maps == {}  # no map unless asked for

    def probabilities(config, meta, grid_shape):
        return {"probabilities": ProbabilitySink(grid_shape, meta.num_classes, torch.float16)}

    monkeypatch.setattr(inference, "_map_sinks", probabilities)
    result = predict(model, volume, ["cube"], config)["cube"]
    probs = result.maps["probabilities"]
    assert probs.shape == (2, *volume.shape)
    assert np.array_equal(probs.argmax(axis=0), result.labels)
    assert dice(probs[1] > 0.5, volume.data[0] > 0.5) > 0.9


def test_several_domains_share_the_resampling(monkeypatch):
    calls = []
    real = inference.resample

    def counting(array, *args, **kwargs):
        calls.append(array.shape)
        return real(array, *args, **kwargs)

    monkeypatch.setattr(inference, "resample", counting)
    volume = cube_volume((20, 28, 24), _affines()["ras"])  # canonical already: shapes stay put
    model = threshold_model((1.5, 1.5, 1.5), domains=("a", "b"))
    out = predict(model, volume, ["a", "b"], CPU)
    assert np.array_equal(out["a"].labels, out["b"].labels)
    forward = [s for s in calls if s == (20, 28, 24)]
    assert len(forward) == 1  # the image was resampled once; the rest are per-class resamplings back


def test_many_classes_give_uint16_labels():
    volume = cube_volume((8, 10, 12), np.eye(4))
    labels = predict(threshold_model(num_classes=300), volume, ["cube"], CPU)["cube"].labels
    assert labels.dtype == np.uint16 and labels.max() == 1


def test_volumes_smaller_than_the_patch_work():
    model = small_model(spacing=(1.0, 1.0, 1.0))
    tiny = Volume(np.random.default_rng(0).random((1, 5, 7, 9)).astype(np.float32), np.eye(4))
    assert predict(model, tiny, ["ct"], CPU)["ct"].labels.shape == (5, 7, 9)


def test_empty_result_is_flagged():
    volume = cube_volume((8, 10, 12), np.eye(4))
    volume.data[:] = np.where(volume.data > 0, 0.4, 0.0)  # below the threshold model's cut: no cube found
    result = predict(threshold_model(), volume, ["cube"], CPU)["cube"]
    assert result.empty and not result.labels.any()
    assert not predict(threshold_model(), cube_volume((8, 10, 12), np.eye(4)), ["cube"], CPU)["cube"].empty


def test_keep_largest_components_per_class():
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[1:4, 1:4, 1:4] = 1  # 27 voxels: kept
    labels[1:3, 6:9, 6:9] = 1  # 18 voxels: the second largest
    labels[7, 7, 7] = 1  # a stray island
    labels[6:9, 1:3, 1:3] = 2  # class 2, single component: kept
    one = keep_largest_components(labels.copy(), [0, 1, 1])
    assert (one == 1).sum() == 27 and (one == 2).sum() == 12
    two = keep_largest_components(labels.copy(), [0, 2, 1])  # e.g. both kidneys
    assert (two == 1).sum() == 27 + 18 and two[7, 7, 7] == 0
    assert (keep_largest_components(labels.copy(), [0, 0, 0]) == labels).all()  # 0: keep all


def _blobs(*boxes, shape=(12, 12, 12), value=1):
    lab = np.zeros(shape, dtype=np.uint8)
    for box in boxes:
        lab[box] = value
    return lab


def test_component_counts_learn_the_usual_number_from_training_labels():
    left, right, speck = np.s_[2:6, 1:5, 2:6], np.s_[2:6, 7:11, 2:6], np.s_[10, 10, 10]
    two_kidneys = _blobs(left, right)
    two_kidneys[speck] = 1  # < 10 % of the largest component: a speck of the labelling, not an organ
    tumour = two_kidneys.copy()
    tumour[3:5, 2:4, 3:5] = 2
    assert component_counts([two_kidneys, _blobs(left)], 2) == [0, 2]  # the most any case has
    assert component_counts([tumour], 3) == [0, 2, 1]
    assert component_counts([two_kidneys], 3) == [0, 2, 0]  # class 2 never seen: keep all
    many = _blobs(*[np.s_[1:3, 1:3, k:k + 2] for k in range(0, 12, 3)] + [np.s_[5:7, 1:3, 1:3]])
    assert component_counts([many], 2) == [0, 0]  # 5 lesions > MAX_KEPT: keep all
    sparse = two_kidneys.copy()
    sparse[7:] = 255  # a few labelled slices: no 3D connectivity to learn from
    assert component_counts([sparse], 2) == [0, 1]  # default: one per class
    assert component_counts([sparse, _blobs(left, right)], 2) == [0, 2]  # dense cases decide


def test_prediction_keeps_the_domains_number_of_components():
    """A domain whose labels have two organs per class (kidneys) keeps both after post-processing;
    a model file written without the counts keeps the largest only."""
    data = _blobs(np.s_[2:8, 2:8, 2:8], np.s_[2:7, 12:17, 2:7], shape=(10, 20, 10)).astype(np.float32)[None]
    volume = Volume(data, np.eye(4))
    model = threshold_model((1.0, 1.0, 1.0))
    assert model.meta("cube").components is None
    assert (predict(model, volume, ["cube"], CPU)["cube"].labels == 1).sum() == 6**3
    model.meta("cube").components = [0, 2]
    assert (predict(model, volume, ["cube"], CPU)["cube"].labels == 1).sum() == 6**3 + 5**3


# -- bad input ----------------------------------------------------------------------------------
def _bad_volumes():
    good = np.random.default_rng(0).random((1, 12, 16, 16)).astype(np.float32)
    nan = good.copy()
    nan[0, 3, 3, 3] = np.nan
    inf = good.copy()
    inf[0, 1, 2, 3] = np.inf
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    return {
        "sheared grid": (Volume(good, sheared), "ct", "sheared"),
        "2D image": (Volume(good[:, :1], np.eye(4)), "ct", "2D"),
        "NaN voxel": (Volume(nan, np.eye(4)), "ct", "NaN"),
        "infinite voxel": (Volume(inf, np.eye(4)), "ct", "infinite"),
        "values beyond float32": (Volume(good.astype(np.float64) * 1e40, np.eye(4)), "ct", "beyond the 32-bit"),
        "blank image": (Volume(np.full((1, 12, 30, 20), 7, dtype=np.int16), np.eye(4)), "ct",
                        "blank \\(every voxel is 7\\); there is nothing to segment"),
        "time series": (Volume(np.concatenate([good, good]), np.eye(4)), "ct", "time series"),
        "wrong modality count": (Volume(good, np.eye(4)), "mr2", "expects 2 modalities"),
        "unknown domain": (Volume(good, np.eye(4)), "liver", "unknown domain"),
    }


@pytest.mark.parametrize("case", list(_bad_volumes()))
def test_bad_input_is_refused_with_a_clear_message(case):
    volume, domain, words = _bad_volumes()[case]
    with pytest.raises(InputError, match=words):
        predict(small_model(), volume, [domain], CPU)


def test_bad_settings_are_refused():
    volume = Volume(np.random.default_rng(0).random((1, 8, 8, 8)).astype(np.float32), np.eye(4))
    for config, words in [
        (InferenceConfig(device="cpu", overlap=1.0), "overlap"),
        (InferenceConfig(device="cpu", backend="tensorrt"), "backend"),
        (InferenceConfig(device="cuda:7"), "cuda"),
    ]:
        if words == "cuda" and torch.cuda.device_count() > 7:
            continue
        with pytest.raises(InputError, match=words):
            predict(small_model(), volume, ["ct"], config)


def test_bad_files_write_nothing(tmp_path):
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really a gzip file")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 1), np.float32), np.eye(4)), flat)
    series = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 12, 3), np.float32), np.eye(4)), series)
    model = small_model()
    for image, words in [(corrupt, "cannot read"), (flat, "2D"), (series, "time series")]:
        out = tmp_path / "out" / "labels.nii.gz"
        with pytest.raises(InputError, match=words):
            predict_files([image], ["ct"], out, model=model, config=CPU)
        assert not out.exists()
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_existing_output_is_not_overwritten(tmp_path):
    image = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 20, 12)).astype(np.float32), np.eye(4)), image)
    out = tmp_path / "labels.nii.gz"
    out.write_bytes(b"user data")
    with pytest.raises(InputError, match="already exists"):
        predict_files([image], ["ct"], out, model=small_model(), config=CPU)
    assert out.read_bytes() == b"user data"
    predict_files([image], ["ct"], out, model=small_model(), config=CPU, overwrite=True)
    assert nib.load(out).shape == (16, 20, 12)


# -- compiled (AOTInductor) ---------------------------------------------------------------------
@pytest.mark.skipif(not backends.compiler_available(), reason="no C++ compiler")
def test_compiled_agrees_with_torch_and_is_reused_from_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    backends.COMPILED_CACHE.clear()
    net = small_net().eval()
    image = torch.randn(1, 20, 40, 36)  # 2 × 2 × 2 tiles of PATCH: the last batch is partial
    ref = sliding_window(net, "ct", image, PATCH, device="cpu")
    out = sliding_window(net, "ct", image, PATCH, device="cpu", backend="compiled", batch_size=3)
    assert (out - ref).abs().max().item() < 1e-4
    packages = list((tmp_path / "compiled").glob("*.pt2"))
    assert len(packages) == 1 and not list((tmp_path / "compiled").glob(".*"))  # no partial file left

    # A new process (empty in-memory cache) loads the package: compiling again would fail here.
    backends.COMPILED_CACHE.clear()
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", _must_not_compile)
    runner = backends.make_runner(net, "ct", "compiled", torch.device("cpu"), patch_size=PATCH, batch_size=3)
    assert isinstance(runner, backends.CompiledRunner)
    again = sliding_window(net, "ct", image, PATCH, device="cpu", backend="compiled", batch_size=3)
    assert torch.equal(again, out)
    # Other weights are another graph: changing one adapter weight means compiling again.
    with torch.no_grad():
        next(net.adapters["ct"].parameters()).add_(1.0)
    backends.COMPILED_CACHE.clear()
    with pytest.raises(AssertionError, match="compiled again"):
        backends.load_compiled(net, "ct", PATCH, 3)


def _must_not_compile(*args, **kwargs):
    raise AssertionError("compiled again")


def test_compiled_falls_back_to_eager_without_a_compiler(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    monkeypatch.setattr(backends, "compiler_available", lambda: False)
    backends.COMPILED_CACHE.clear()
    net = small_net().eval()
    image = torch.randn(1, 16, 24, 24)
    with caplog.at_level("WARNING", logger="training.infer.backends"):
        out = sliding_window(net, "ct", image, PATCH, device="cpu", backend="compiled")
    assert "no C++ compiler" in caplog.text and "eager PyTorch" in caplog.text
    assert torch.allclose(out, sliding_window(net, "ct", image, PATCH, device="cpu"), atol=1e-5)
    assert not (tmp_path / "compiled").exists() or not list((tmp_path / "compiled").iterdir())


# -- OpenVINO -----------------------------------------------------------------------------------
@pytest.mark.skipif(not backends.openvino_available(), reason="openvino extra not installed")
def test_openvino_agrees_with_torch():
    net = small_net().eval()
    image = torch.randn(1, 20, 40, 36)
    ref = sliding_window(net, "ct", image, PATCH, device="cpu")
    ov = sliding_window(net, "ct", image, PATCH, device="cpu", backend="openvino", batch_size=2)
    assert (ov - ref).abs().max().item() < 1e-3
    agreement = (ov.argmax(0) == ref.argmax(0)).float().mean().item()
    assert agreement > 0.999


def test_missing_openvino_names_the_extra(monkeypatch):
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    volume = Volume(np.random.default_rng(0).random((1, 8, 8, 8)).astype(np.float32), np.eye(4))
    with pytest.raises(InputError, match=r"napari-u2net\[openvino\]"):
        predict(small_model(), volume, ["ct"], InferenceConfig(device="cpu", backend="openvino"))
