import numpy as np
import torch

from tests.training_data import ball_case
from training.io.volume import IGNORE_INDEX
from training.train.augment import AugmentConfig, augment_batch
from training.train.sampling import ArrayCase, PatchSampler


def _batch():
    _, labs = zip(*(ball_case(i, (20, 24, 28), contrast=1.0) for i in range(3)))
    lab = torch.from_numpy(np.stack(labs).astype(np.int64))
    # image = label exactly, so spatial consistency can be read off the output
    return lab.unsqueeze(1).float(), lab


def test_no_augmentation_is_identity():
    img, lab = _batch()
    out_img, out_lab = augment_batch(img, lab, AugmentConfig.none(), torch.Generator().manual_seed(0))
    assert torch.equal(out_img, img) and torch.equal(out_lab, lab)


def test_mirroring_keeps_image_and_label_aligned():
    img, lab = _batch()
    cfg = AugmentConfig.none()
    cfg.p_mirror = 0.5
    out_img, out_lab = augment_batch(img, lab, cfg, torch.Generator().manual_seed(1))
    assert not torch.equal(out_lab, lab)  # something was flipped
    assert torch.equal(out_img[:, 0].long(), out_lab)


def test_spatial_transforms_move_image_and_label_together():
    img, lab = _batch()
    cfg = AugmentConfig.none()
    cfg.p_rotate = cfg.p_scale = cfg.p_elastic = 1.0
    cfg.elastic_magnitude = 0.05
    out_img, out_lab = augment_batch(img, lab, cfg, torch.Generator().manual_seed(2))
    inside = out_lab != IGNORE_INDEX
    assert not torch.equal(out_lab, lab)
    assert (~inside).any()  # corners came from outside the patch: ignored, not background
    agree = ((out_img[:, 0] > 0.5).long() == out_lab)[inside].float().mean()
    assert agree > 0.97  # linear image and nearest label differ only on a thin boundary
    assert out_lab[inside].sum() > 0.5 * lab.sum()  # the structure is still there


def test_intensity_transforms_change_image_only_and_are_reproducible():
    img, lab = _batch()
    img = img + torch.randn(img.shape, generator=torch.Generator().manual_seed(9))
    cfg = AugmentConfig.none()
    cfg.p_gamma = cfg.p_noise = cfg.p_brightness = cfg.p_contrast = 1.0
    a = augment_batch(img, lab, cfg, torch.Generator().manual_seed(3))
    b = augment_batch(img, lab, cfg, torch.Generator().manual_seed(3))
    c = augment_batch(img, lab, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], lab)
    assert not torch.equal(a[0], img) and not torch.equal(a[0], c[0])
    assert torch.isfinite(a[0]).all()


def test_default_augmentation_is_deterministic_per_generator():
    img, lab = _batch()
    a = augment_batch(img, lab, AugmentConfig(), torch.Generator().manual_seed(5))
    b = augment_batch(img, lab, AugmentConfig(), torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_sampler_oversamples_foreground_and_pads_small_cases():
    img, lab = ball_case(0, (10, 40, 40))
    lab[:] = 0
    lab[5, 30:33, 30:33] = 1  # a tiny structure far from the centre
    sampler = PatchSampler([ArrayCase("a", img, lab)], (16, 16, 16), fg_fraction=0.33)
    g = torch.Generator().manual_seed(0)
    hits = 0
    for _ in range(10):
        x, y = sampler.sample(3, g)
        assert x.shape == (3, 1, 16, 16, 16) and y.shape == (3, 16, 16, 16)
        assert (y[2] == 1).any()  # the last third of a batch is centred on foreground
        hits += int((y[:2] == 1).any(dim=(1, 2, 3)).sum())
        assert (y == IGNORE_INDEX).any(dim=(1, 2, 3)).all()  # z axis (10 < 16) was padded
        # padded as inference pads: every padded z row repeats the case's first or last slice
        rows = (y == IGNORE_INDEX).all(dim=(2, 3))
        assert rows.any()
        for xi, ri in zip(x[:, 0], rows):
            kept = torch.nonzero(~ri)[:, 0]
            first, last = int(kept.min()), int(kept.max())
            assert all(torch.equal(xi[z], xi[first if z < first else last]) for z in torch.nonzero(ri)[:, 0])
    assert hits < 20  # random patches rarely see it


def test_intensity_shift_adds_one_offset_per_sample_and_is_off_by_default():
    img, lab = _batch()
    cfg = AugmentConfig.none()
    cfg.p_shift, cfg.shift = 1.0, (0.2, 0.3)
    out, out_lab = augment_batch(img, lab, cfg, torch.Generator().manual_seed(6))
    offsets = (out - img).flatten(1)
    assert torch.allclose(offsets, offsets[:, :1].expand_as(offsets))  # one offset per sample
    assert ((offsets[:, 0] >= 0.2) & (offsets[:, 0] <= 0.3)).all() and torch.equal(out_lab, lab)
    # off (the default): no random number is drawn for it, so older runs keep their stream
    assert AugmentConfig().p_shift == 0
    cfg.p_shift = 0.0
    assert torch.equal(augment_batch(img, lab, cfg, torch.Generator().manual_seed(6))[0], img)


def test_random_patches_of_a_partly_labelled_case_hold_labelled_voxels():
    """Few corrected slices of a long scan: a patch without a labelled voxel teaches nothing."""
    img, lab = ball_case(0, (120, 32, 32))
    lab = lab.astype(np.uint8)
    sparse = np.full_like(lab, IGNORE_INDEX)
    for z in (60, 70):  # two labelled slices of 120
        sparse[z] = lab[z]
    g = torch.Generator().manual_seed(0)
    partly = PatchSampler([ArrayCase("a", img, sparse)], (16, 16, 16), fg_fraction=0.0)
    _, y = partly.sample(8, g)
    assert (y != IGNORE_INDEX).any(dim=(1, 2, 3)).all()
    # a fully labelled case keeps nnU-Net's rule: random patches anywhere (most miss z 60–70)
    full = PatchSampler([ArrayCase("a", img, np.where(sparse == IGNORE_INDEX, 0, sparse).astype(np.uint8))],
                        (16, 16, 16), fg_fraction=0.0)
    _, y = full.sample(8, torch.Generator().manual_seed(0))
    z_hits = [(y[i] == 1).any() for i in range(8)]
    assert not all(z_hits)
