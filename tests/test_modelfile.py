import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from training.model.modelfile import (
    TRUNK_FILE,
    ModelFileError,
    adapter_path,
    load_model,
    save_adapter,
    save_model,
    weights_hash,
)

from .conftest import adapter_meta, small_net


def _outputs(net, shape=(1, 8, 12, 12)):
    g = torch.Generator().manual_seed(3)
    res = {}
    with torch.no_grad():
        for d in net.domains:
            c = net.domain_config(d).in_channels
            res[d] = net.eval()(torch.randn(shape[0], c, *shape[1:], generator=g), d)
    return res


def test_round_trip_is_exact(tmp_path):
    net = small_net(seed=2)
    metas = {n: adapter_meta(net, n, spacing=[2.5, 0.8, 0.8], patch_size=[16, 32, 32]) for n in net.domains}
    metas["mr2"].components = [0, 2, 1]
    save_model(tmp_path / "m", net, metas, provenance={"seed": 2})
    model = load_model(tmp_path / "m")
    assert model.domains == ["ct", "mr2"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, model.net.state_dict()[k]), k
    before, after = _outputs(net), _outputs(model.net)
    for d in before:
        assert torch.equal(before[d], after[d])
    m = model.meta("mr2")
    assert m.modalities == ["CT0", "CT1"] and m.class_names == ["background", "class1", "class2"]
    assert m.spacing == [2.5, 0.8, 0.8] and m.patch_size == [16, 32, 32]
    assert m.kept_components == [0, 2, 1] and model.meta("ct").components is None
    assert model.meta("ct").kept_components == [0, 1]  # written without counts: one per class
    assert m.trunk_hash == model.trunk.trunk_hash == weights_hash(net.trunk.state_dict())
    assert model.trunk.provenance == {"seed": 2}
    assert all(c.color.startswith("#") for c in m.classes)


def test_half_precision_storage_round_trips_within_fp16(tmp_path):
    net = small_net()
    save_model(tmp_path / "m", net, {n: adapter_meta(net, n) for n in net.domains}, dtype="float16")
    model = load_model(tmp_path / "m")
    w0 = net.trunk.down[0].weight
    w1 = model.net.trunk.down[0].weight
    assert w1.dtype == torch.float32 and torch.equal(w1, w0.half().float())
    fp32 = (tmp_path / "m" / TRUNK_FILE).stat().st_size
    save_model(tmp_path / "m32", net, {n: adapter_meta(net, n) for n in net.domains})
    assert fp32 < 0.6 * (tmp_path / "m32" / TRUNK_FILE).stat().st_size


def test_adapter_for_another_trunk_is_refused(tmp_path, model_dir):
    other = small_net(seed=99)
    save_model(tmp_path / "other", other, {"ct": adapter_meta(other, "ct")})
    stranger = adapter_path(tmp_path / "other", "ct")
    target = adapter_path(model_dir, "ct")
    target.write_bytes(stranger.read_bytes())
    with pytest.raises(ModelFileError, match="trained with another shared trunk"):
        load_model(model_dir)


def test_pickled_file_is_refused(tmp_path, model_dir):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = adapter_path(model_dir, "ct")
    torch.save({"state": Evil()}, path)
    with pytest.raises(ModelFileError, match="pickled PyTorch file, which is refused"):
        load_model(model_dir)


@pytest.mark.parametrize("keep", [0, 5, 100, -50])
def test_truncated_file_gives_clear_error(model_dir, keep):
    path = model_dir / TRUNK_FILE
    raw = path.read_bytes()
    path.write_bytes(raw[:keep] if keep >= 0 else raw[:keep])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(model_dir)


def test_foreign_safetensors_and_wrong_kind(tmp_path, model_dir):
    save_file({"x": torch.zeros(2)}, str(model_dir / TRUNK_FILE))
    with pytest.raises(ModelFileError, match="not a u2net model file"):
        load_model(model_dir)
    with pytest.raises(ModelFileError, match="no trunk.safetensors"):
        load_model(tmp_path)
    with pytest.raises(ModelFileError, match="not a model directory"):
        load_model(tmp_path / "missing")


def test_tampered_weights_are_detected(model_dir):
    path = model_dir / TRUNK_FILE
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n + 10] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="do not match the hash"):
        load_model(model_dir)


def test_newer_format_is_refused(model_dir):
    path = adapter_path(model_dir, "ct")
    from safetensors.torch import load_file, safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["u2net"])
    meta["format_version"] = 99
    save_file(load_file(str(path)), str(path), metadata={"u2net": json.dumps(meta)})
    with pytest.raises(ModelFileError, match="newer than this napari-u2net supports"):
        load_model(model_dir)


def test_write_is_atomic(tmp_path, monkeypatch, model_dir):
    """A failure while writing leaves the previous file intact and no temp file behind."""
    net = small_net(seed=7)
    path = adapter_path(model_dir, "ct")
    original = path.read_bytes()
    import training.io.atomic as atomic

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(path, net, adapter_meta(net, "ct"), "abc")
    assert path.read_bytes() == original
    assert sorted(p.name for p in path.parent.iterdir()) == ["ct.safetensors", "mr2.safetensors"]


def test_load_selected_domains(model_dir):
    model = load_model(model_dir, domains=["mr2"])
    assert model.domains == ["mr2"] and model.net.domains == ["mr2"]
    with pytest.raises(ModelFileError, match="no adapter for domain.*liver; this model has: ct, mr2"):
        load_model(model_dir, domains=["liver"])


def test_header_length_with_pickle_like_low_byte_still_loads(tmp_path):
    """A safetensors header whose length starts with byte 0x80 is not mistaken for a pickle."""
    net = small_net()
    for pad in range(300):
        meta = adapter_meta(net, "ct", description="x" * pad)
        save_model(tmp_path / "m", net, {"ct": meta})
        raw = adapter_path(tmp_path / "m", "ct").read_bytes()
        if raw[0] == 0x80:
            break
    assert raw[0] == 0x80
    assert load_model(tmp_path / "m").meta("ct").description == "x" * pad
