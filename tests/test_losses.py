import pytest
import torch

from training.io.volume import IGNORE_INDEX
from training.train.losses import cross_entropy, focal, lovasz_softmax, make_loss, soft_dice


def _data(seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, k, 6, 7, 8, generator=g)
    labels = torch.randint(0, k, (2, 6, 7, 8), generator=g)
    return logits, labels


@pytest.mark.parametrize("name", ["dice_ce", "lovasz_focal"])
def test_perfect_prediction_beats_random(name):
    logits, labels = _data()
    loss = make_loss(name)
    perfect = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float() * 20
    assert loss(perfect, labels) < 0.05
    assert loss(logits, labels) > 0.5


@pytest.mark.parametrize("name", ["dice_ce", "lovasz_focal", "dice", "ce", "focal", "lovasz"])
def test_ignored_voxels_count_in_no_term(name):
    logits, labels = _data(1)
    labels[:, :3] = IGNORE_INDEX
    loss = make_loss(name)
    other = logits.clone()
    other[:, :, :3] = torch.randn_like(other[:, :, :3]) * 5  # change only ignored voxels
    a = logits.clone().requires_grad_(True)
    value = loss(a, labels)
    value.backward()
    assert torch.allclose(value, loss(other, labels), atol=1e-6)
    assert a.grad[:, :, :3].abs().max() == 0  # no gradient where labels are ignored
    assert a.grad[:, :, 3:].abs().max() > 0


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, labels = _data(2)
    assert torch.allclose(focal(logits, labels, gamma=0.0), cross_entropy(logits, labels), atol=1e-6)


def test_all_ignored_gives_zero_loss_not_nan():
    logits, labels = _data(3)
    labels[:] = IGNORE_INDEX
    for f in (cross_entropy, focal, lovasz_softmax):
        assert f(logits, labels).item() == 0.0
    assert torch.isfinite(soft_dice(logits, labels))


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("hinge")
