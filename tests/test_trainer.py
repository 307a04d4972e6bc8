import csv
import threading

import numpy as np
import pytest
import torch

from training.augment import AugmentConfig
from training.checkpoint import STATE_FILE
from training.errors import U2NetError
from training.losses import IGNORE_INDEX
from training.metrics import dice_per_class
from training.modelfile import load_model
from training.network import ArchConfig
from training.sampling import ArrayCase
from training.sliding_window import sliding_window
from training.trainer import TrainConfig, consume
from training.training_run import WORK_SUBDIR, train_model
from tests.training_data import ball_case, ball_domain

ARCH = ArchConfig(base_channels=4, levels=3)


def _predict(net, domain, image, patch=(24, 24, 24)):
    probs = sliding_window(net, domain, torch.from_numpy(image), patch, device="cpu")
    return probs.argmax(0).numpy()


def test_training_reduces_loss_and_segments_an_easy_domain(tmp_path):
    data = ball_domain("balls")
    cfg = TrainConfig(iterations=120, lr=1e-2, device="cpu", checkpoint_every=0, val_every=60)
    reports = list(train_model([data], tmp_path / "m", cfg, ARCH))
    assert [r.iteration for r in reports] == list(range(1, 121))
    first, last = np.mean([r.loss for r in reports[:10]]), np.mean([r.loss for r in reports[-10:]])
    assert last < 0.5 * first
    assert reports[59].val_dice is not None and reports[-1].val_dice is not None
    assert reports[-1].val_dice["balls"]["ball"] > 0.75
    assert reports[-1].lr < reports[0].lr  # poly schedule
    # The model directory is complete and usable; the CSV log has one row per iteration.
    model = load_model(tmp_path / "m")
    meta = model.meta("balls")
    assert meta.provenance["iterations"] == 120 and meta.provenance["metrics"]["val_dice"]["ball"] > 0.75
    img, lab = ball_case(555)
    assert dice_per_class(_predict(model.net, "balls", img), lab, 2)[0] > 0.75
    rows = list(csv.DictReader(open(tmp_path / "m" / WORK_SUBDIR / "log.csv")))
    assert len(rows) == 120 and rows[-1]["val_mean"]


def _weights(model_dir):
    return load_model(model_dir).net.state_dict()


def test_resume_continues_exactly(tmp_path):
    """Stopped after 4 iterations and resumed to 8 == 8 uninterrupted (augmentation on)."""
    domains = lambda: [ball_domain("a", 2, 0), ball_domain("b", 2, 0, seed=1, contrast=-2.0)]  # noqa: E731
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
    rows = list(csv.DictReader(open(tmp_path / "part" / WORK_SUBDIR / "log.csv")))
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
