import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from training.errors import U2NetError
from training.model.modelfile import (
    TRUNK_FILE,
    MetadataError,
    ModelFileError,
    adapter_path,
    load_model,
    read_weights,
    save_adapter,
    save_model,
    weights_hash,
    write_weights,
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
    path.write_bytes(raw[:keep])
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
    with pytest.raises(ModelFileError, match="weights do not match its checksum"):
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
    from training.io import atomic

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises((OSError, U2NetError), match="disk full|cannot write"):
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


# -- integrity: checksums, finite weights, metadata schema (issue #16) -------------------------
DAMAGED = "re-download or re-save it"


def _split(path):
    """(header dict, tensor bytes) of a safetensors file, read by hand."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(path, header, data):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _edit_header(path, edit, keep_checksum=True):
    """Rewrite a file's u2net metadata by hand (new header length), leaving the tensor bytes alone;
    without ``keep_checksum`` the result is an old-format file (written before checksums)."""
    header, data = _split(path)
    meta = json.loads(header["__metadata__"]["u2net"])
    edit(meta)
    if not keep_checksum:
        meta.pop("checksum")
    header["__metadata__"]["u2net"] = json.dumps(meta)
    _join(path, header, data)


def _poke(path, tensor, index, fmt, value):
    """Overwrite element ``index`` of ``tensor`` in the file's data bytes (struct format ``fmt``)."""
    header, data = _split(path)
    start = header[tensor]["data_offsets"][0] + index * struct.calcsize(fmt)
    data = bytearray(data)
    data[start : start + struct.calcsize(fmt)] = struct.pack(fmt, value)
    _join(path, header, bytes(data))


def _one_line_refusal(path, match, load=lambda p: load_model(p.parent.parent)):
    with pytest.raises(ModelFileError) as e:
        load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and match in msg, msg
    return msg


def test_every_written_file_carries_a_checksum(model_dir):
    for path, kind in [(model_dir / TRUNK_FILE, "trunk"), (adapter_path(model_dir, "ct"), "adapter")]:
        _, meta = read_weights(path, kind)
        assert meta["checksum"]["algorithm"] == "sha256"
        assert len(meta["checksum"]["weights"]) == len(meta["checksum"]["metadata"]) == 64


def test_flipped_adapter_weight_is_refused(model_dir):
    path = adapter_path(model_dir, "ct")
    state, _ = read_weights(path, "adapter")
    old = float(state["input_conv.weight"].flatten()[3])
    _poke(path, "input_conv.weight", 3, "<f", old + 0.5)  # still a finite, plausible weight
    msg = _one_line_refusal(path, "the file's weights do not match its checksum")
    assert "altered or damaged" in msg and DAMAGED in msg


def test_flipped_half_precision_byte_is_refused(tmp_path):
    net = small_net()
    save_model(tmp_path / "m", net, {n: adapter_meta(net, n) for n in net.domains}, dtype="float16")
    path = adapter_path(tmp_path / "m", "mr2")
    header, data = _split(path)
    data = bytearray(data)
    data[header["input_conv.weight"]["data_offsets"][0] + 1] ^= 0x01  # one bit of a float16
    _join(path, header, bytes(data))
    _one_line_refusal(path, "weights do not match its checksum")


@pytest.mark.parametrize("dtype,fmt,value", [("float32", "<f", float("nan")), ("float32", "<f", float("inf")),
                                              ("float16", "<e", float("nan"))])
def test_non_finite_weight_refused_without_checksum(tmp_path, dtype, fmt, value):
    net = small_net()
    save_model(tmp_path / "m", net, {n: adapter_meta(net, n) for n in net.domains}, dtype=dtype)
    path = adapter_path(tmp_path / "m", "ct")
    _edit_header(path, lambda m: None, keep_checksum=False)  # an old-format file: nothing to compare with
    load_model(tmp_path / "m")  # loads as it is
    _poke(path, "encoder.0.0.depthwise.weight", 5, fmt, value)
    msg = _one_line_refusal(path, "'encoder.0.0.depthwise.weight' holds NaN or infinite values")
    assert DAMAGED in msg


def test_non_finite_trunk_weight_refused(model_dir):
    path = model_dir / TRUNK_FILE
    header, _ = _split(path)
    name = next(k for k in sorted(header) if k != "__metadata__")
    _edit_header(path, lambda m: None, keep_checksum=False)
    _poke(path, name, 0, "<f", float("nan"))
    _one_line_refusal(path, "holds NaN or infinite values", load=lambda p: load_model(p.parent))


def test_edited_header_is_refused_same_length(model_dir):
    """Spacing 1.0 -> 4.0 by a same-length byte edit of the JSON header: a plausible, wrong value."""
    path = adapter_path(model_dir, "ct")
    raw = path.read_bytes()
    needle = b'\\"spacing\\": [1.0,'
    assert raw.count(needle) == 1
    path.write_bytes(raw.replace(needle, b'\\"spacing\\": [4.0,'))
    _one_line_refusal(path, "the file's metadata do not match its checksum")


@pytest.mark.parametrize("edit", [
    lambda m: m.update(spacing=[-1.0, 1.0, 1.0]),
    lambda m: m.update(description="harmless?"),
    lambda m: m["classes"][1].update(name="tumour"),
    lambda m: m["checksum"].update(weights="0" * 64),
])
def test_edited_header_is_refused(model_dir, edit):
    path = adapter_path(model_dir, "ct")
    _edit_header(path, edit)
    _one_line_refusal(path, "do not match its checksum")


def test_edited_trunk_header_is_refused(model_dir):
    path = model_dir / TRUNK_FILE
    _edit_header(path, lambda m: m["provenance"].update(made_by="someone else"))
    _one_line_refusal(path, "the file's metadata do not match its checksum", load=lambda p: load_model(p.parent))


@pytest.mark.parametrize("checksum", ["abc", {"algorithm": "md5", "weights": "", "metadata": ""}, {}])
def test_malformed_checksum_is_refused(model_dir, checksum):
    path = adapter_path(model_dir, "ct")
    _edit_header(path, lambda m: m.update(checksum=checksum))
    _one_line_refusal(path, "checksum entry is malformed")


def test_old_format_files_without_checksum_still_load(model_dir):
    expected = load_model(model_dir).net.state_dict()
    for path in [model_dir / TRUNK_FILE, *sorted((model_dir / "adapters").iterdir())]:
        _edit_header(path, lambda m: None, keep_checksum=False)
        assert "checksum" not in json.loads(_split(path)[0]["__metadata__"]["u2net"])
    model = load_model(model_dir)
    assert model.domains == ["ct", "mr2"]
    for k, v in expected.items():
        assert torch.equal(v, model.net.state_dict()[k]), k


def test_rewriting_a_file_stamps_a_fresh_checksum(model_dir):
    """read -> edit metadata -> write (as publishing a fine-tuned adapter does) gives a valid file."""
    path = adapter_path(model_dir, "ct")
    state, meta = read_weights(path, "adapter")
    meta["provenance"] = {"fine_tuned": True}
    write_weights(path, state, meta)
    _, again = read_weights(path, "adapter")
    assert again["provenance"] == {"fine_tuned": True} and again["checksum"] != meta["checksum"]
    assert load_model(model_dir).meta("ct").provenance == {"fine_tuned": True}


def _ct_norm(**kw):
    return [{"scheme": "ct", "clip": [-100.0, 200.0], "mean": 40.0, "std": 30.0, **kw}]


BAD_ADAPTER_META = {
    "spacing text": ({"spacing": "a"}, "spacing must be 3 numbers from 0.05 to 50 mm"),
    "spacing element text": ({"spacing": ["a", 1.0, 1.0]}, "spacing must be 3 numbers"),
    "spacing micrometre": ({"spacing": [1e-3, 1e-3, 1e-3]}, "spacing must be 3 numbers"),
    "spacing negative": ({"spacing": [1.0, -1.0, 1.0]}, "spacing must be 3 numbers"),
    "spacing zero": ({"spacing": [0, 1.0, 1.0]}, "spacing must be 3 numbers"),
    "spacing nan": ({"spacing": [float("nan"), 1.0, 1.0]}, "spacing must be 3 numbers"),
    "spacing two axes": ({"spacing": [1.0, 1.0]}, "spacing must be 3 numbers"),
    "spacing huge int": ({"spacing": [10**400, 1, 1]}, "spacing must be 3 numbers"),
    "patch huge": ({"patch_size": [10**9, 64, 64]}, "patch_size must be a list of 3 whole numbers from 1 to 1024"),
    "patch fraction": ({"patch_size": [32.5, 64, 64]}, "patch_size must be"),
    "patch float": ({"patch_size": [32.0, 64, 64]}, "patch_size must be"),
    "patch bool": ({"patch_size": [True, 64, 64]}, "patch_size must be"),
    "patch length": ({"patch_size": [64, 64]}, "patch_size must be"),
    "patch zero": ({"patch_size": [0, 64, 64]}, "patch_size must be"),
    "norm unknown scheme": ({"normalization": [{"scheme": "magic"}]}, "unknown normalisation scheme 'magic'"),
    "norm missing stats": ({"normalization": [{"scheme": "ct", "clip": [0.0, 1.0]}]}, "needs a finite number mean"),
    "norm text stat": ({"normalization": _ct_norm(std="x")}, "needs a finite number std"),
    "norm nan stat": ({"normalization": _ct_norm(mean=float("nan"))}, "needs a finite number mean"),
    "norm negative std": ({"normalization": _ct_norm(std=-1.0)}, "std must be ≥ 0"),
    "norm bad clip": ({"normalization": _ct_norm(clip=[200.0, -100.0])}, "needs clip = [low, high]"),
    "norm clip text": ({"normalization": _ct_norm(clip="wide")}, "needs clip = [low, high]"),
    "norm not a dict": ({"normalization": ["zscore"]}, "normalization[0] must be an object"),
    "norm nonzero": ({"normalization": [{"scheme": "zscore", "nonzero": "yes"}]}, "nonzero must be true or false"),
    "norm count": ({"normalization": [{"scheme": "zscore"}] * 2}, "one spec per modality (1)"),
    "norm not a list": ({"normalization": {"scheme": "zscore"}}, "normalization must be a list"),
    "components text": ({"components": "x"}, "components must be a list of 2 whole numbers"),
    "components length": ({"components": [0, 1, 1]}, "components must be a list of 2 whole numbers"),
    "components negative": ({"components": [0, -1]}, "components must be a list"),
    "components element": ({"components": [0, "x"]}, "components must be a list"),
    "classes text": ({"classes": "background,fg"}, "classes must be a list of 2–256 {name, color} objects"),
    "classes strings": ({"classes": ["background", "fg"]}, "each class must be an object"),
    "classes no color": ({"classes": [{"name": "bg"}, {"name": "fg"}]}, "each class must be an object"),
    "classes one": ({"classes": [{"name": "bg", "color": "#000000"}]}, "classes must be a list of 2–256"),
    "classes number name": ({"classes": [{"name": 0, "color": "#0"}, {"name": 1, "color": "#1"}]},
                            "each class must be an object"),
    "modalities none": ({"modalities": []}, "modalities must be a list of 1–64 names"),
    "modalities text": ({"modalities": "CT"}, "modalities must be a list"),
    "modalities count": ({"modalities": ["CT", "PET"], "normalization": []},
                         "the metadata list 2 modalities but the weights take 1 input channels"),
    "pool counts text": ({"pool_counts": ["a", 1, 1]}, "pool_counts must be a list of 3 whole numbers"),
    "pool counts deep": ({"pool_counts": [9, 9, 9]}, "exceed the trunk's 2 downsamplings"),
    "domain path": ({"domain": "../../etc"}, "domain must be a name"),
    "domain missing": ({"domain": None}, "domain must be a name"),
    "description": ({"description": ["x"]}, "description must be text"),
    "provenance": ({"provenance": "x"}, "provenance must be an object"),
    "metadata list": (None, "metadata must be a JSON object"),
}


@pytest.mark.parametrize("keep_checksum", [True, False], ids=["checksum", "old-format"])
@pytest.mark.parametrize("case", list(BAD_ADAPTER_META))
def test_absurd_adapter_metadata_is_one_line_error(model_dir, case, keep_checksum):
    """Valid checksum (or none) but absurd metadata: refused by the schema, never a traceback."""
    change, match = BAD_ADAPTER_META[case]
    path = adapter_path(model_dir, "ct")
    state, meta = read_weights(path, "adapter")
    if change is None:  # the whole metadata replaced by a list: nothing to validate against
        match = "is not a JSON object"
        _edit_header(path, lambda m: (m.clear(), m.update(checksum=0)), keep_checksum=False)
        header, data = _split(path)
        header["__metadata__"]["u2net"] = json.dumps(["kind", "adapter"])
        _join(path, header, data)
    else:
        meta.update(change)
        write_weights(path, state, meta)  # a fresh, valid checksum over the absurd metadata
        if not keep_checksum:
            _edit_header(path, lambda m: None, keep_checksum=False)
    msg = _one_line_refusal(path, match)
    if change is not None and case != "modalities count" and case != "pool counts deep":
        assert "invalid adapter metadata: " in msg
    assert DAMAGED in msg or "not a u2net model file" in msg


@pytest.mark.parametrize("change", [
    {"spacing": [0.05, 50, 1]},
    {"patch_size": [1, 1024, 64]},
    {"normalization": _ct_norm(mean=10**400)},  # an exact, finite JSON integer
    {"normalization": [{"scheme": "zscore"}]},
    {"normalization": []},
    {"classes": [{"name": "background", "color": "black"}, {"name": "fg", "color": "red", "index": 1}]},
    {"components": None, "pool_counts": None, "future_field": {"x": 1}},
])
def test_unusual_but_valid_metadata_loads(model_dir, change):
    path = adapter_path(model_dir, "ct")
    state, meta = read_weights(path, "adapter")
    meta.update(change)
    write_weights(path, state, meta)
    loaded = load_model(model_dir).meta("ct")
    for key, value in change.items():
        if key == "classes":
            assert [c.color for c in loaded.classes] == ["black", "red"]
        elif key != "future_field":
            assert getattr(loaded, key) == value, key


@pytest.mark.parametrize("arch,match", [
    ("x", "arch must be an object"),
    ({"base_channels": 4, "levels": "x", "max_channels": 16}, "arch.levels must be a whole number from 1 to 12"),
    ({"base_channels": 4, "levels": 100, "max_channels": 16}, "arch.levels must be"),
    ({"base_channels": 0, "levels": 3, "max_channels": 16}, "arch.base_channels must be"),
    ({"base_channels": 4.5, "levels": 3, "max_channels": 16}, "arch.base_channels must be"),
    ({"base_channels": 32, "levels": 3, "max_channels": 16}, "is below base_channels"),
    ({"levels": 3, "max_channels": 16}, "arch.base_channels must be"),
])
def test_absurd_trunk_metadata_is_one_line_error(model_dir, arch, match):
    path = model_dir / TRUNK_FILE
    state, meta = read_weights(path, "trunk")
    meta["arch"] = arch
    write_weights(path, state, meta)
    msg = _one_line_refusal(path, match, load=lambda p: load_model(p.parent))
    assert "invalid trunk metadata: " in msg and DAMAGED in msg


@pytest.mark.parametrize("version", ["1", 0, None, 1.5])
def test_invalid_format_version_is_refused(model_dir, version):
    path = adapter_path(model_dir, "ct")
    state, meta = read_weights(path, "adapter")
    meta["format_version"] = version
    write_weights(path, state, meta)
    _one_line_refusal(path, "invalid model format version")


def test_invalid_metadata_is_not_written(tmp_path):
    net = small_net()
    with pytest.raises(MetadataError, match=r"refusing to write invalid metadata for 'ct': spacing must be"):
        save_adapter(tmp_path / "ct.safetensors", net, adapter_meta(net, "ct", spacing=[1e-3] * 3), "abc")
    with pytest.raises(ValueError, match="patch_size must be"):  # MetadataError is a ValueError too
        save_adapter(tmp_path / "ct.safetensors", net, adapter_meta(net, "ct", patch_size=[0, 1, 1]), "abc")
    assert not (tmp_path / "ct.safetensors").exists()


def test_non_finite_weights_are_not_written(tmp_path):
    net = small_net()
    with torch.no_grad():
        net.adapters["ct"].input_conv.weight[0, 0, 0, 0, 0] = 1e6  # fine in float32, inf in float16
    path = tmp_path / "ct.safetensors"
    with pytest.raises(ModelFileError, match="values do not fit float16: save as float32"):
        save_adapter(path, net, adapter_meta(net, "ct"), "abc", dtype="float16")
    save_adapter(path, net, adapter_meta(net, "ct"), "abc")  # float32 holds it
    with torch.no_grad():
        net.adapters["ct"].input_conv.weight[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ModelFileError, match="NaN or infinite values; the training diverged"):
        save_adapter(path, net, adapter_meta(net, "ct"), "abc")


def test_listing_tolerates_hostile_headers(model_dir):
    from training.model.layout import model_dir_domains

    _edit_header(adapter_path(model_dir, "ct"), lambda m: m.update(classes="x", modalities=5, provenance=[1]))
    header, data = _split(adapter_path(model_dir, "mr2"))
    header["__metadata__"]["u2net"] = json.dumps([1, 2])
    _join(adapter_path(model_dir, "mr2"), header, data)
    domains, prov = model_dir_domains(model_dir)
    assert prov == {"made_by": "test"}
    assert domains[0]["name"] == "ct" and domains[0]["classes"] == [] and domains[0]["modalities"] == []
    assert domains[1] == {"name": "mr2", "error": "unreadable adapter file"}


def test_bundled_model_is_verified():
    from training.io.folders import bundled_model_dir
    from training.model.layout import read_header_meta

    folder = bundled_model_dir()
    if not (folder / TRUNK_FILE).is_file():
        pytest.skip("no bundled model installed")
    model = load_model(folder)
    assert model.domains
    trunk_state, trunk_meta = read_weights(folder / TRUNK_FILE, "trunk")
    assert trunk_meta["checksum"]["algorithm"] == "sha256"
    assert weights_hash(trunk_state) == trunk_meta["trunk_hash"] == model.trunk.trunk_hash
    for domain in model.domains:
        path = adapter_path(folder, domain)
        state, meta = read_weights(path, "adapter")  # verified: it would raise on a mismatch
        assert meta["checksum"]["algorithm"] == "sha256", domain
        assert meta["trunk_hash"] == model.trunk.trunk_hash
        assert all(t.dtype == torch.float16 for t in state.values())
        assert read_header_meta(path)["checksum"] == meta["checksum"]


def test_damaged_copy_of_bundled_adapter_is_refused(tmp_path):
    """The reported fault: one float16 weight of a bundled adapter turned NaN (Dice fell to 0)."""
    import shutil

    from training.io.folders import bundled_model_dir

    if not (bundled_model_dir() / TRUNK_FILE).is_file():
        pytest.skip("no bundled model installed")
    folder = shutil.copytree(bundled_model_dir(), tmp_path / "copy")
    path = next(iter(sorted((folder / "adapters").iterdir())))
    _poke(path, "input_conv.weight", 0, "<e", float("nan"))
    _one_line_refusal(path, "weights do not match its checksum")
    _edit_header(path, lambda m: None, keep_checksum=False)
    _one_line_refusal(path, "holds NaN or infinite values")
