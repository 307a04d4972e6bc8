"""MSD dataset validation: every bad dataset gives one clear error line naming the file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from training.data import synth
from training.data.datasets import SPLIT_FILE, load_dataset, load_split, make_splits
from training.data.preprocess import plan_dataset, preprocess_dataset
from training.errors import DatasetError
from training.io.volume import read_image, write_labels, write_nifti


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return synth.write_dataset(
        tmp_path_factory.mktemp("ds") / "hippo", "hippocampus-mr", 5, 0, size_scale=0.3
    )


@pytest.fixture
def ds_dir(template, tmp_path):
    return shutil.copytree(template, tmp_path / "hippo")


def _error(fn, *args) -> str:
    with pytest.raises(DatasetError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _edit_json(root, fn):
    doc = json.loads((root / "dataset.json").read_text())
    fn(doc)
    (root / "dataset.json").write_text(json.dumps(doc))


def test_loads_synthetic_dataset(ds_dir):
    ds = load_dataset(ds_dir)
    assert ds.domain == "hippocampus-mr" and ds.modalities == ["T1"] and ds.modality == "MR"
    assert ds.class_names == ["background", "anterior", "posterior"]
    assert [c.id for c in ds.training] == [f"hippocampus_mr_{i:03d}" for i in range(5)]
    assert load_dataset(ds_dir, domain="my hippo!").domain == "my_hippo"


def test_missing_and_corrupt_dataset_json(ds_dir):
    (ds_dir / "dataset.json").write_text("{ not json")
    assert "dataset.json" in _error(load_dataset, ds_dir)
    (ds_dir / "dataset.json").unlink()
    assert "dataset.json: missing" in _error(load_dataset, ds_dir)


def test_missing_label_file_and_entry(ds_dir):
    (ds_dir / "labelsTr" / "hippocampus_mr_002.nii.gz").unlink()
    assert "labelsTr/hippocampus_mr_002.nii.gz" in _error(load_dataset, ds_dir)

    def drop(doc):
        del doc["training"][1]["label"]

    _edit_json(ds_dir, drop)
    assert "imagesTr/hippocampus_mr_001.nii.gz" in _error(load_dataset, ds_dir)


def test_shape_and_affine_mismatch(ds_dir):
    path = ds_dir / "labelsTr" / "hippocampus_mr_003.nii.gz"
    lab = read_image(path)
    write_labels(path, lab.data[0][:, :-2], lab.affine)
    msg = _error(load_dataset, ds_dir)
    assert "hippocampus_mr_003.nii.gz" in msg and "shape" in msg
    shifted = lab.affine.copy()
    shifted[:3, 3] += 2.0
    write_labels(path, lab.data[0], shifted)
    msg = _error(load_dataset, ds_dir)
    assert "labelsTr/hippocampus_mr_003.nii.gz" in msg and "affine" in msg


def test_channel_count_must_match_modalities(ds_dir):
    _edit_json(ds_dir, lambda d: d.update(modality={"0": "T1", "1": "T2"}))
    assert "imagesTr/hippocampus_mr_000.nii.gz" in _error(load_dataset, ds_dir)


def test_label_values_beyond_classes_name_the_file(ds_dir):
    path = ds_dir / "labelsTr" / "hippocampus_mr_004.nii.gz"
    lab = read_image(path)
    bad = lab.data[0].astype(np.uint8)
    bad[0, 0, 0] = 7
    write_labels(path, bad, lab.affine)
    ds = load_dataset(ds_dir)  # headers are fine
    plan = plan_dataset(ds, cache_dir=False)
    msg = _error(preprocess_dataset, ds, plan, False)
    assert "labelsTr/hippocampus_mr_004.nii.gz" in msg and "[7]" in msg


def test_float_label_that_is_an_image(ds_dir):
    path = ds_dir / "labelsTr" / "hippocampus_mr_000.nii.gz"
    lab = read_image(path)
    write_nifti(path, lab.data[0].astype(np.float32) + 0.5, lab.affine)
    ds = load_dataset(ds_dir)
    msg = _error(preprocess_dataset, ds, plan_dataset(ds, ds.training[1:], cache_dir=False), False)
    assert "hippocampus_mr_000.nii.gz" in msg and "whole numbers" in msg


def test_nnunet_v2_style_keys(ds_dir):
    def v2(doc):
        doc["channel_names"] = doc.pop("modality")
        doc["labels"] = {"background": 0, "anterior": 1, "posterior": 2}

    _edit_json(ds_dir, v2)
    assert load_dataset(ds_dir).class_names == ["background", "anterior", "posterior"]


def test_split_written_once_and_reused(ds_dir):
    ds = load_dataset(ds_dir)
    train, val = load_split(ds, n_folds=5, fold=0, seed=0)
    ids = {c.id for c in ds.training}
    assert set(train) | set(val) == ids and not set(train) & set(val) and len(val) == 1
    text = (ds_dir / SPLIT_FILE).read_text()
    vals = [load_split(ds, fold=f, seed=99)[1] for f in range(5)]  # other seed: the file wins
    assert sorted(v for fold in vals for v in fold) == sorted(ids)
    assert load_split(ds, seed=99) == (train, val)
    assert (ds_dir / SPLIT_FILE).read_text() == text
    assert "fold 7" in _error(load_split, ds, 5, 7)

    _edit_json(ds_dir, lambda d: d.update(training=d["training"][:3], numTraining=3))
    assert SPLIT_FILE in _error(load_split, load_dataset(ds_dir))


def test_few_cases():
    assert make_splits(["a"]) == [{"train": ["a"], "val": ["a"]}]
    # two real scans: both train (holding one back would halve the data), validation sees both
    assert make_splits(["a", "b"], n_folds=5) == [{"train": ["a", "b"], "val": ["a", "b"]}]
    three = make_splits(["a", "b", "c"], n_folds=5)
    assert len(three) == 3 and sorted(s["val"][0] for s in three) == ["a", "b", "c"]
    assert all(len(s["train"]) == 2 for s in three)
