"""The default model's recipe runs end to end (tiny settings) and writes a usable float16 model."""

import json

from training.default_model import main
from training.modelfile import TRUNK_FILE, load_model


def test_recipe_writes_evaluated_half_precision_model(tmp_path, capsys):
    out = tmp_path / "default"
    argv = [str(out), "--work", str(tmp_path / "work"), "--domains", "hippocampus-mr",
            "--cases", "2", "--eval-cases", "1", "--iterations", "3", "--base-channels", "4",
            "--levels", "3", "--size-scale", "0.5", "--device", "cpu"]
    assert main(argv) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(figures) == {"hippocampus-mr"} and 0.0 <= figures["hippocampus-mr"] <= 1.0
    model = load_model(out)
    meta = model.meta("hippocampus-mr")
    prov = meta.provenance
    assert prov["recipe"]["iterations"] == 3 and prov["recipe"]["seed"] == 0
    assert prov["heldout_evaluation"]["cases"] == 1
    assert "python -m training.default_model" in prov["command"]
    assert json.loads((out / "evaluation.json").read_text())["hippocampus-mr"]["mean_dice"] == figures["hippocampus-mr"]
    # float16 on disk: two bytes per weight plus a small header.
    n = sum(p.numel() for p in model.net.trunk.parameters())
    assert (out / TRUNK_FILE).stat().st_size < 2 * n + 4096
    assert not (tmp_path / "default.partial").exists()
    # Re-running reuses the data and replaces the model atomically.
    assert main(argv + ["--evaluate-only"]) == 0
    assert load_model(out).domains == ["hippocampus-mr"]


def test_per_domain_size_scale_and_weight_are_applied_and_recorded(tmp_path, capsys):
    import pytest

    work = tmp_path / "work"
    argv = [str(tmp_path / "m"), "--work", str(work), "--domains", "hippocampus-mr",
            "--cases", "1", "--eval-cases", "1", "--iterations", "1", "--base-channels", "4",
            "--levels", "3", "--size-scale", "0.3", "--device", "cpu"]
    assert main(argv) == 0
    doc = work / "data" / "train" / "hippocampus-mr" / "dataset.json"
    assert json.loads(doc.read_text())["u2net"]["synth"]["size_scale"] == 0.3
    assert main(argv + ["--evaluate-only", "--domain-size-scale", "hippocampus-mr=0.4"]) == 0
    # the cached data were written at another scale: replaced, not silently reused
    assert json.loads(doc.read_text())["u2net"]["synth"]["size_scale"] == 0.4
    prov = load_model(tmp_path / "m").meta("hippocampus-mr").provenance
    assert prov["recipe"]["domain_size_scale"] == {"hippocampus-mr": 0.4}
    capsys.readouterr()
    for bad in ("spleen-ct=2", "hippocampus-mr=big", "hippocampus-mr"):
        with pytest.raises(SystemExit):
            main(argv + ["--domain-size-scale", bad])
        assert "--domain-size-scale" in capsys.readouterr().err
    # a resumed stage with a domain weight: trained on, and the weight is in the provenance
    assert main(argv + ["--resume", "--iterations", "3", "--domain-size-scale", "hippocampus-mr=0.4",
                        "--domain-weight", "hippocampus-mr=2"]) == 0
    prov = load_model(tmp_path / "m").meta("hippocampus-mr").provenance
    assert prov["recipe"]["domain_weights"] == {"hippocampus-mr": 2} and prov["iterations"] == 3
    capsys.readouterr()
    for bad, why in (("spleen-ct=2", "'spleen-ct', which is not trained here"),
                     ("hippocampus-mr=0", "expected DOMAIN=N"), ("hippocampus-mr", "expected DOMAIN=N")):
        with pytest.raises(SystemExit):
            main(argv + ["--domain-weight", bad])
        err = capsys.readouterr().err
        assert "--domain-weight" in err and why in err
