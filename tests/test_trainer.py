import csv
import threading

import numpy as np
import pytest
import torch

from tests.training_data import ball_case, ball_domain
from training.errors import U2NetError
from training.infer.sliding_window import sliding_window
from training.io.volume import IGNORE_INDEX
from training.model.modelfile import load_model
from training.model.network import ArchConfig
from training.train.augment import AugmentConfig
from training.train.checkpoint import STATE_FILE
from training.train.metrics import dice_per_class
from training.train.runs import WORK_SUBDIR, train_model
from training.train.sampling import ArrayCase
from training.train.trainer import TrainConfig, consume, domain_cycle

ARCH = ArchConfig(base_channels=4, levels=3)


def _predict(net, domain, image, patch=(16, 16, 16)):
    probs = sliding_window(net, domain, torch.from_numpy(image), patch, device="cpu")
    return probs.argmax(0).numpy()


def test_training_reduces_loss_and_segments_an_easy_domain(tmp_path):
    data = ball_domain("balls", patch=(24, 24, 24))
    cfg = TrainConfig(iterations=80, lr=1e-2, device="cpu", checkpoint_every=0, val_every=40)
    reports = list(train_model([data], tmp_path / "m", cfg, ARCH))
    assert [r.iteration for r in reports] == list(range(1, 81))
    first, last = np.mean([r.loss for r in reports[:10]]), np.mean([r.loss for r in reports[-10:]])
    assert last < 0.5 * first
    assert reports[39].val_dice is not None and reports[-1].val_dice is not None
    assert reports[-1].val_dice["balls"]["ball"] > 0.7
    assert reports[-1].lr < reports[0].lr  # poly schedule
    # The model directory is complete and usable; the CSV log has one row per iteration.
    model = load_model(tmp_path / "m")
    meta = model.meta("balls")
    assert meta.provenance["iterations"] == 80 and meta.provenance["metrics"]["val_dice"]["ball"] > 0.7
    img, lab = ball_case(555)
    assert dice_per_class(_predict(model.net, "balls", img, (24, 24, 24)), lab, 2)[0] > 0.7
    rows = _log_rows(tmp_path / "m")
    assert len(rows) == 80 and rows[-1]["val_mean"]


def _log_rows(model_dir) -> list[dict]:
    with open(model_dir / WORK_SUBDIR / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _weights(model_dir):
    return load_model(model_dir).net.state_dict()


def test_resume_continues_exactly(tmp_path):
    """Stopped after 4 iterations and resumed to 8 == 8 uninterrupted (augmentation on)."""
    domains = lambda: [ball_domain("a", 2, 0), ball_domain("b", 2, 0, seed=1, contrast=-2.0)]
    cfg = TrainConfig(iterations=8, lr=1e-2, device="cpu", checkpoint_every=3, augment=AugmentConfig(),
                      deterministic=True)
    consume(train_model(domains(), tmp_path / "full", cfg, ARCH))

    stop = threading.Event()
    for r in train_model(domains(), tmp_path / "part", cfg, ARCH, stop=stop):
        if r.iteration == 4:
            stop.set()
    assert torch.load(tmp_path / "part" / WORK_SUBDIR / STATE_FILE, weights_only=True)["iteration"] == 4
    mid = _weights(tmp_path / "part")
    last = consume(train_model(domains(), tmp_path / "part", cfg, resume=True))
    assert last.iteration == 8
    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert any(not torch.equal(mid[k], resumed[k]) for k in full)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    rows = _log_rows(tmp_path / "part")
    assert [int(r["iteration"]) for r in rows] == list(range(1, 9))


def test_round_robin_leaves_other_adapters_alone_each_step(tmp_path):
    """An iteration of domain a changes no weight of domain b's adapter (no decay, no momentum)."""
    cfg = TrainConfig(iterations=3, lr=1e-2, device="cpu", checkpoint_every=1, weight_decay=0.1)
    seen = {}
    gen = train_model([ball_domain("a", 1, 0), ball_domain("b", 1, 0, seed=1)], tmp_path / "m", cfg, ARCH)
    for r in gen:
        seen[r.iteration] = {k: v.clone() for k, v in _weights(tmp_path / "m").items()}
    b_keys = [k for k in seen[1] if k.startswith("adapters.b.")]
    a_keys = [k for k in seen[1] if k.startswith("adapters.a.")]
    # iteration 3 trains domain a (round-robin a, b, a): b untouched, a changed
    assert all(torch.equal(seen[2][k], seen[3][k]) for k in b_keys)
    assert any(not torch.equal(seen[2][k], seen[3][k]) for k in a_keys)


def test_domain_cycle_spreads_a_weighted_domain_evenly():
    assert domain_cycle(["a", "b", "c"], {}) == ["a", "b", "c"]  # unweighted: plain round-robin
    cycle = domain_cycle(["s", "k", "p", "h", "m"], {"k": 3})
    assert sorted(cycle) == sorted(["s", "p", "h", "m"] + ["k"] * 3)
    assert cycle == ["k", "s", "p", "k", "h", "m", "k"]  # never more than two turns in a row
    with pytest.raises(U2NetError, match="'x', which is not trained here"):
        domain_cycle(["a", "b"], {"x": 2})
    with pytest.raises(U2NetError, match="whole number"):
        TrainConfig(domain_weights={"a": 0})


def test_weighted_domain_gets_its_share_of_iterations(tmp_path):
    cfg = TrainConfig(iterations=8, lr=1e-2, device="cpu", checkpoint_every=0, domain_weights={"b": 3})
    reports = list(train_model([ball_domain("a", 1, 0), ball_domain("b", 1, 0, seed=1)], tmp_path / "m",
                               cfg, ARCH))
    assert [r.domain for r in reports] == ["b", "a", "b", "b"] * 2
    rows = _log_rows(tmp_path / "m")
    assert [r["domain"] for r in rows] == ["b", "a", "b", "b"] * 2


def test_sparse_labels_train_on_five_slices(tmp_path):
    """5 labelled slices (the rest 255) are enough to segment the unlabelled slices."""
    img, lab = ball_case(7, (32, 32, 32), contrast=2.0, balls=3)
    sparse = np.full_like(lab, IGNORE_INDEX)
    slices = [6, 11, 16, 21, 26]
    sparse[slices] = lab[slices]
    data = ball_domain("sparse", 0, 0)
    data.train = [ArrayCase("s", img, sparse)]
    cfg = TrainConfig(iterations=120, lr=1e-2, device="cpu", checkpoint_every=0)
    consume(train_model([data], tmp_path / "m", cfg, ARCH))
    pred = _predict(load_model(tmp_path / "m").net, "sparse", img)
    rest = np.ones(32, bool)
    rest[slices] = False
    assert dice_per_class(pred[rest], lab[rest], 2)[0] > 0.7


def test_refuses_to_overwrite_an_existing_output(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "precious.txt").write_text("x")
    with pytest.raises(U2NetError, match="not empty"):
        train_model([ball_domain("a", 1, 0)], tmp_path / "m", TrainConfig(iterations=1), ARCH)
    with pytest.raises(U2NetError, match="no training state"):
        consume(train_model([ball_domain("a", 1, 0)], tmp_path / "m2", TrainConfig(iterations=1),
                            ARCH, resume=True))


# -- command line -------------------------------------------------------------------------------
def test_cli_train_evaluate_predict(tmp_path, capsys):
    import json
    import shutil

    import nibabel as nib

    from tests.training_data import TINY_ARGS, TINY_TRAIN_ARGS, small_synth_dataset
    from training.commands.cli import main
    from training.data.datasets import load_dataset
    from training.infer.pipeline import InferenceConfig, predict
    from training.io.volume import read_image

    ds_dir = small_synth_dataset(tmp_path / "hip")
    out = tmp_path / "model"
    assert main(["train", str(ds_dir), "-o", str(out), "--iterations", "4", "--cache", str(tmp_path / "c"),
                 *TINY_TRAIN_ARGS]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["iterations"] == 4
    model = load_model(out)
    (domain,) = model.domains
    meta = model.meta(domain)
    assert meta.modality == "MR" and meta.patch_size == [16, 16, 16] and len(meta.classes) == 3
    assert meta.provenance["dataset"] == str(ds_dir.resolve()) and meta.provenance["iterations"] == 4

    # predict --model works on a model made by train
    ds = load_dataset(ds_dir)
    case = ds.training[0]
    assert main(["predict", str(case.images[0]), "--model", str(out), "--domain", domain,
                 "-o", str(tmp_path / "pred.nii.gz"), "--device", "cpu", "--quiet"]) == 0
    assert nib.load(tmp_path / "pred.nii.gz").shape == nib.load(case.label).shape
    capsys.readouterr()

    # evaluate: per-case lines then a summary whose numbers are predict()'s Dice
    assert main(["evaluate", str(ds_dir), "--model", str(out), "--domain", domain, "--json",
                 "--limit", "1", "--device", "cpu"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["case"] == case.id and len(lines) == 2
    pred = predict(model, read_image(case.images), [domain], InferenceConfig(device="cpu"))[domain].labels
    truth = read_image(case.label).data[0].astype(int)
    expected = dice_per_class(pred, truth, 3)
    got = list(lines[0]["dice"].values())
    assert np.allclose(np.nan_to_num(got, nan=-1), np.nan_to_num(expected, nan=-1))
    assert np.isfinite(lines[-1]["mean_dice"])
    assert lines[-1]["mean_dice"] == pytest.approx(np.nanmean(got))

    # a bad dataset: one clear line naming the file, exit code 2
    bad = tmp_path / "bad"
    shutil.copytree(ds_dir, bad)
    missing = sorted((bad / "labelsTr").iterdir())[1]
    missing.unlink()
    assert main(["train", str(bad), "-o", str(tmp_path / "m2"), "--iterations", "1", *TINY_TRAIN_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("u2net train: error:") and missing.name in err[0]
    (bad / "dataset.json").write_text("{not json")
    assert main(["adapt", str(bad), "--model", str(out), *TINY_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset.json" in err[0]
    assert not (tmp_path / "m2").exists()

    # a weight for a domain that is not trained: named with the domains there are, nothing written
    assert main(["train", str(ds_dir), "-o", str(tmp_path / "m3"), "--cache", str(tmp_path / "c"),
                 "--domain-weight", "liver=2", *TINY_TRAIN_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'liver', which is not trained here" in err[0] and domain in err[0]
    assert main(["train", str(ds_dir), "-o", str(tmp_path / "m3"), "--domain-weight", f"{domain}=x",
                 *TINY_TRAIN_ARGS]) == 2
    assert "expected DOMAIN=N" in capsys.readouterr().err
    assert not (tmp_path / "m3").exists()


def test_domain_from_dataset_learns_how_many_components_each_class_keeps(tmp_path):
    """Both kidneys carry one label: post-processing must keep two components, not one."""
    from training.data.synth import write_dataset
    from training.train.runs import domain_from_dataset

    ds_dir = write_dataset(tmp_path / "kid", "kidney-ct", 2, 0, size_scale=0.5)
    data = domain_from_dataset(ds_dir, cache_dir=tmp_path / "cache")
    assert data.meta.class_names == ["background", "kidney", "tumour"]
    assert data.meta.components == [0, 2, 1]
