"""The CT normalisation rule: nnU-Net's foreground percentiles for a dataset, a soft-tissue window
for one or two scans (whose percentiles say nothing about the next patient's contrast phase)."""

import numpy as np

from training.data.normalization import CT_SOFT_TISSUE_WINDOW, FEW_CT_CASES, ct_spec, normalize_channel
from training.train.adaptation import normalization_for


def _liver_hu(n=20000, centre=46.0, seed=0):
    """A non-contrast liver's HU values (about −20…110)."""
    return np.random.default_rng(seed).normal(centre, 15.0, n)


def test_many_cases_follow_the_foreground_percentiles():
    spec = ct_spec(_liver_hu(), FEW_CT_CASES)
    lo, hi = spec["clip"]
    assert 0 < lo < 20 and 70 < hi < 100  # the liver's own range, as nnU-Net plans it
    assert abs(spec["mean"] - 46) < 1 and 13 < spec["std"] < 16


def test_one_scan_keeps_another_contrast_phase_apart_from_bone():
    spec = ct_spec(_liver_hu(), 1)
    assert spec["clip"][0] <= CT_SOFT_TISSUE_WINDOW[0] and spec["clip"][1] >= CT_SOFT_TISSUE_WINDOW[1]
    # a contrast-enhanced liver (100 HU) and bone (700 HU) stay apart, and apart from the
    # non-contrast liver (46 HU); with the narrow rule both would be clipped to the same value
    out = normalize_channel(np.array([46.0, 100.0, 700.0]), spec)
    assert out[0] < out[1] < out[2]
    narrow = normalize_channel(np.array([100.0, 700.0]), ct_spec(_liver_hu(), FEW_CT_CASES))
    assert narrow[0] == narrow[1]
    # the window maps to [−2, 2]: a 40 HU contrast shift is a small step, not several SDs
    assert abs(out[1] - out[0]) < 0.5


def test_teaching_from_one_scan_uses_the_window():
    img = np.full((1, 8, 8, 8), -1000.0, np.float32)
    lab = np.zeros((8, 8, 8), np.uint8)
    img[0, 2:6, 2:6, 2:6] = _liver_hu(64).reshape(4, 4, 4)
    lab[2:6, 2:6, 2:6] = 1
    (spec,) = normalization_for([img], [lab], "CT")
    assert spec["clip"][1] >= CT_SOFT_TISSUE_WINDOW[1]


def test_values_that_are_not_hounsfield_units_keep_the_percentile_rule():
    """No air in the scan (a phantom, a rescaled export): the window would flatten it."""
    values = np.random.default_rng(1).normal(0.0, 2.0, 5000)
    spec = ct_spec(values, 1, hounsfield=False)
    assert spec == ct_spec(values, FEW_CT_CASES)
    img = np.random.default_rng(2).normal(0.0, 2.0, (1, 8, 8, 8)).astype(np.float32)
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:6, 2:6, 2:6] = 1
    (spec,) = normalization_for([img], [lab], "CT")
    assert spec["clip"][1] < 10  # the data's own range, not the HU window
