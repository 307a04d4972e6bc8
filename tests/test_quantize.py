"""INT8 post-training quantisation of a domain's OpenVINO graph (training.infer.quantize)."""

from collections import Counter

import numpy as np
import pytest
import torch

from training.errors import InputError
from training.infer import quantize as q
from training.model.network import ArchConfig, DomainConfig, U2Net

pytestmark = pytest.mark.skipif(not (q.openvino_available() and q.nncf_available()),
                                reason="OpenVINO and NNCF are not installed")

PATCH = (16, 16, 16)


def _tiny_net():
    torch.manual_seed(0)
    return U2Net(ArchConfig(4, 3), [DomainConfig("tiny", 1, 2)]).eval()


def _ball_tiles(n: int, seed: int) -> list[np.ndarray]:
    """Inputs with structure (a bright ball in noise), shaped as the graph's input."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(PATCH)
    tiles = []
    for _ in range(n):
        c = rng.uniform(4, 12, 3)
        ball = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < rng.uniform(9, 25)
        tiles.append((rng.normal(0, 1, PATCH) + 2.0 * ball).astype(np.float32)[None, None])
    return tiles


def _run(compiled, tiles):
    request = compiled.create_infer_request()
    return np.stack([request.infer({0: t})[compiled.output(0)].copy() for t in tiles])


def test_int8_graph_is_quantised_and_agrees_with_fp32():
    net = _tiny_net()
    fp32 = q.convert_domain(net, "tiny", PATCH, 1)
    int8 = q.quantize_openvino(fp32, _ball_tiles(8, 0))
    ops = Counter(op.get_type_name() for op in int8.get_ops())
    assert ops["FakeQuantize"] > 0  # INT8 quantisers were inserted...
    assert "FakeQuantize" not in Counter(op.get_type_name() for op in fp32.get_ops())  # ...into a copy
    held_out = _ball_tiles(4, 1)
    ref = _run(q.compile_for_cpu(fp32), held_out)
    torch_ref = net(torch.from_numpy(np.concatenate(held_out)), "tiny").detach().numpy()[:, None]
    np.testing.assert_allclose(ref, torch_ref, atol=1e-4)  # the fp32 graph is the network
    out = _run(q.compile_for_cpu(int8), held_out)
    assert out.shape == ref.shape
    assert not np.array_equal(out, ref)  # it really runs quantised arithmetic
    # an untrained network's logits are near-ties, so compare the logits themselves
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.8
    bf16 = _run(q.compile_for_cpu(fp32, "bf16"), held_out)
    assert not np.array_equal(bf16, ref)
    assert np.corrcoef(bf16.ravel(), ref.ravel())[0, 1] > 0.98


def test_batched_graph_groups_the_patches():
    fp32 = q.convert_domain(_tiny_net(), "tiny", PATCH, 2)
    int8 = q.quantize_openvino(fp32, _ball_tiles(4, 0))
    out = q.compile_for_cpu(int8).create_infer_request().infer({0: np.concatenate(_ball_tiles(2, 1))})
    assert next(iter(out.values())).shape == (2, 2, *PATCH)


def test_bad_requests_are_refused():
    fp32 = q.convert_domain(_tiny_net(), "tiny", PATCH, 1)
    with pytest.raises(InputError, match="calibration patches"):
        q.quantize_openvino(fp32, [])
    with pytest.raises(InputError, match="precision"):
        q.compile_for_cpu(fp32, "int4")


def test_calibration_patches_are_inference_tiles_of_the_domain():
    from training.io.folders import bundled_model_dir
    from training.model.modelfile import load_model

    model = load_model(bundled_model_dir(), domains=["spleen-ct"])
    meta = model.meta("spleen-ct")
    patches = q.calibration_patches(model, "spleen-ct", count=3, cases=1)
    assert len(patches) == 3
    assert all(p.shape == (1, 1, *meta.patch_size) and p.dtype == np.float32 for p in patches)
    # normalised as the domain's CT scheme does: clipped HU window → z-score, so bounded
    lo, hi = meta.normalization[0]["clip"]
    mean, std = meta.normalization[0]["mean"], meta.normalization[0]["std"]
    values = np.concatenate([p.ravel() for p in patches])
    assert values.min() >= (lo - mean) / std - 1e-4 and values.max() <= (hi - mean) / std + 1e-4
    assert values.std() > 0.1  # real image content, not padding
    again = q.calibration_patches(model, "spleen-ct", count=3, cases=1)
    assert all(np.array_equal(a, b) for a, b in zip(patches, again))  # deterministic
    with pytest.raises(InputError, match="unknown domain"):
        q.calibration_patches(model, "my-organ", count=2)
    with pytest.raises(InputError, match="no synthetic data"):
        next(q.synthetic_cases("my-organ", 0, 1))
