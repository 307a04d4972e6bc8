"""A domain shared as one .u2d file, its model card, and `u2net info`'s compact table.

Export → import into another model with the same trunk gives the same predictions; a model with
another trunk, a damaged or edited file and an existing name are refused before anything is
installed; the bundled model (read-only) sends the domain into the user's own model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import adapter_meta, small_net
from training.commands.cli import main
from training.errors import InputError, U2NetError
from training.io.folders import bundled_model_dir
from training.model.card import SYNTHETIC_LIMIT, card_from_meta
from training.model.domain_file import export_domain, import_domain, read_domain_file
from training.model.layout import ADAPTER_DIR, TRUNK_FILE, adapter_path, read_header_meta
from training.model.modelfile import load_model, read_weights, save_model, write_weights


def _same_trunk_model(model_dir: Path, dest: Path, keep: tuple[str, ...] = ()) -> Path:
    """A model with ``model_dir``'s trunk and only the adapters in ``keep`` (a colleague's copy)."""
    (dest / ADAPTER_DIR).mkdir(parents=True)
    shutil.copy2(model_dir / TRUNK_FILE, dest / TRUNK_FILE)
    for name in keep:
        shutil.copy2(adapter_path(model_dir, name), adapter_path(dest, name))
    return dest


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_then_import_gives_identical_weights_and_predictions(model_dir, tmp_path):
    shared = export_domain(model_dir, "ct", tmp_path / "ct.u2d")
    assert shared.path.stat().st_size < 64_000 and shared.domain == "ct"
    colleague = _same_trunk_model(model_dir, tmp_path / "colleague", keep=("mr2",))
    done = import_domain(tmp_path / "ct.u2d", colleague)
    assert (done.domain, done.model_dir, done.replaced, done.note) == ("ct", colleague, False, "")
    ours, theirs = load_model(model_dir), load_model(colleague)
    assert theirs.domains == ["ct", "mr2"]
    a, b = ours.net.adapters["ct"].state_dict(), theirs.net.adapters["ct"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.net(x, "ct"), theirs.net(x, "ct"))
    meta = theirs.meta("ct")
    assert meta.provenance["imported"]["exported_from"] == "model" and meta.card["limits"]  # card travels
    assert not [p for p in (colleague / ADAPTER_DIR).iterdir() if p.name.startswith(".")]  # no temporaries


def test_another_trunk_is_refused_with_both_hashes(model_dir, tmp_path):
    export_domain(model_dir, "ct", tmp_path / "ct.u2d")
    other = tmp_path / "other"
    net = small_net(seed=1)
    save_model(other, net, {"mr2": adapter_meta(net, "mr2")})
    before = _files(other)
    with pytest.raises(InputError) as e:
        import_domain(tmp_path / "ct.u2d", other)
    ours = read_header_meta(model_dir / TRUNK_FILE)["trunk_hash"]
    theirs = read_header_meta(other / TRUNK_FILE)["trunk_hash"]
    assert ours != theirs and ours in str(e.value) and theirs in str(e.value)
    assert _files(other) == before


@pytest.mark.parametrize("where", ["tensor data", "last byte", "card", "trunk hash", "envelope date"])
def test_a_flipped_byte_is_refused_and_nothing_is_installed(model_dir, tmp_path, where):
    path = tmp_path / "ct.u2d"
    export_domain(model_dir, "ct", path)
    raw = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    offsets = {
        "tensor data": header_end + 100,
        "last byte": len(raw) - 1,
        "card": raw.index(b"intended_use") + 20,  # inside the card's text
        "trunk hash": raw.index(b"trunk_hash", raw.index(b"u2net_domain_file")) + 20,  # in the file's description
        "envelope date": raw.index(b"exported_at") + 20,
    }
    raw[offsets[where]] ^= 0x01
    path.write_bytes(bytes(raw))
    target = _same_trunk_model(model_dir, tmp_path / "colleague")
    with pytest.raises(U2NetError, match=r"altered or damaged|truncated|corrupt|not a"):
        import_domain(path, target)
    assert list((target / ADAPTER_DIR).iterdir()) == []


def test_a_plain_adapter_file_is_not_a_domain_file(model_dir, tmp_path):
    plain = tmp_path / "ct.u2d"
    shutil.copy2(adapter_path(model_dir, "ct"), plain)
    with pytest.raises(U2NetError, match="not a shared domain file"):
        read_domain_file(plain)


def test_an_existing_name_is_refused_unless_overwritten_or_renamed(model_dir, tmp_path):
    export_domain(model_dir, "ct", tmp_path / "ct.u2d")
    with pytest.raises(InputError, match=r"already has a domain 'ct'.*--as NEWNAME.*--overwrite"):
        import_domain(tmp_path / "ct.u2d", model_dir)
    done = import_domain(tmp_path / "ct.u2d", model_dir, new_name="ct-copy")
    assert done.domain == "ct-copy" and sorted(load_model(model_dir).domains) == ["ct", "ct-copy", "mr2"]
    assert import_domain(tmp_path / "ct.u2d", model_dir, overwrite=True).replaced
    with pytest.raises(InputError, match="already exists"):
        export_domain(model_dir, "ct", tmp_path / "ct.u2d")  # never silently replaced
    with pytest.raises(InputError, match=r"NAME\.u2d"):
        export_domain(model_dir, "ct", tmp_path / "ct.zip")
    with pytest.raises(InputError, match="no domain 'liver'"):
        export_domain(model_dir, "liver", tmp_path / "liver.u2d")


def test_importing_into_the_bundled_model_goes_to_the_users_model(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("U2NET_HOME", str(home))
    bundled = bundled_model_dir()
    before = _files(bundled)
    export_domain(bundled, "spleen-ct", tmp_path / "spleen.u2d")
    done = import_domain(tmp_path / "spleen.u2d", bundled, new_name="spleen-2")
    assert done.model_dir == home / "models" / "user" and "read-only" in done.note
    assert _files(bundled) == before
    assert "spleen-2" in load_model(done.model_dir).domains  # with the bundled domains, same trunk


def test_cli_export_import_show_and_errors(model_dir, tmp_path, capsys):
    out = tmp_path / "ct.u2d"
    assert main(["domain", "export", str(model_dir), "ct", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["domain", "show", str(out)]) == 0
    assert "Limits:" in capsys.readouterr().out
    assert main(["domain", "import", str(out), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--as NEWNAME" in err[0]
    assert main(["domain", "import", str(out), "--model", str(model_dir), "--as", "ct2"]) == 0
    assert "added domain 'ct2'" in capsys.readouterr().out


# -- cards ----------------------------------------------------------------------------------------
def test_bundled_cards_and_the_info_table(capsys):
    assert main(["info", "--model", "default"]) == 0
    table = capsys.readouterr().out
    assert "held-out Dice" in table and "provenance" not in table
    row = next(line for line in table.splitlines() if line.strip().startswith("spleen-ct"))
    assert "CT" in row and "spleen" in row and "0.883" in row
    assert main(["info", "--domain", "spleen-ct"]) == 0
    card = capsys.readouterr().out
    assert SYNTHETIC_LIMIT in card and "0.883 on 20 cases" in card and "synthetic abdominal CT" in card
    assert main(["info", "--domain", "mni152-brain", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["data_kind"] == "one-subject" and "one subject" in doc["limits"] and doc["cases"] == 38
    assert main(["info", "--domain", "liver-ct"]) == 2


def test_card_defaults_come_from_the_provenance(tmp_path):
    net = small_net()
    meta = adapter_meta(net, "ct").to_dict()
    assert "not validated" not in card_from_meta(meta).limits  # nothing known: says so
    assert "does not say what it was trained on" in card_from_meta(meta).limits
    data = tmp_path / "synth"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"name": "spleen", "u2net": {"synth": {"seed": 3}}}))
    synthetic = card_from_meta({**meta, "provenance": {"dataset": str(data), "date": "2026-01-02T03:04:05"}})
    assert synthetic.limits == SYNTHETIC_LIMIT and synthetic.date == "2026-01-02" and "limits" in synthetic.derived
    tuned = card_from_meta({**meta, "provenance": {
        "source": "napari-u2net fine-tune panel", "val_dice_on_own_labels": 0.91,
        "pairs": [{"image": "scan", "labels": "scan liver", "labelled_slices": 5}]}})
    assert tuned.data_kind == "user-labels" and tuned.cases == 1 and "5 labelled slice" in tuned.data
    assert "not validated on other images" in tuned.limits and "0.91" in tuned.text()
    calibrated = card_from_meta({**meta, "calibration": {"temperature": 1.5, "ece_before": 0.1, "ece_after": 0.02}})
    assert "temperature 1.5" in calibrated.text() and "0.100 → 0.020" in calibrated.text()
    written = card_from_meta({**meta, "card": {"limits": "only adults", "author": "Dr. A"}})
    assert written.limits == "only adults" and "Dr. A" in written.text() and "limits" not in written.derived


def test_card_field_is_validated_and_old_files_without_it_load(model_dir):
    path = adapter_path(model_dir, "ct")
    state, meta = read_weights(path, "adapter")
    old = {k: v for k, v in meta.items() if k != "card"}
    write_weights(path, state, old)
    assert load_model(model_dir).meta("ct").card == {}
    write_weights(path, state, {**old, "card": {"limits": {"nested": "no"}}})
    with pytest.raises(U2NetError, match="card must be"):
        load_model(model_dir)


def test_writing_a_card_keeps_the_weights_bit_identical_and_other_fields(tmp_path):
    """scripts/domain_cards.py (make model's last step) changes only ``card`` of a float16 model."""
    from scripts.domain_cards import card_for, write_card

    net = small_net()
    save_model(tmp_path / "m", net, {"ct": adapter_meta(net, "ct")}, dtype="float16")
    path = adapter_path(tmp_path / "m", "ct")
    state, meta = read_weights(path, "adapter")
    write_weights(path, state, {**meta, "calibration": {"temperature": 1.2}}, dtype="float16")  # another step's field
    before = path.read_bytes()
    assert write_card(path, card_for("spleen-ct")) and not write_card(path, card_for("spleen-ct"))
    after_state, after = read_weights(path, "adapter")
    assert all(after_state[k].dtype == torch.float16 and torch.equal(after_state[k], state[k]) for k in state)
    assert after["calibration"] == {"temperature": 1.2} and after["card"]["data_kind"] == "synthetic"
    assert path.read_bytes() != before and card_from_meta(after).limits.startswith(SYNTHETIC_LIMIT)
