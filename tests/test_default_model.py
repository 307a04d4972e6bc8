"""The default model's recipe runs end to end (tiny settings) and writes a usable float16 model,
and the bundled model still meets the quality bar on freshly written held-out cases."""

import json

import pytest

from scripts.default_model import main
from training.model.modelfile import TRUNK_FILE, load_model


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
    assert "python -m scripts.default_model" in prov["command"]
    assert json.loads((out / "evaluation.json").read_text())["hippocampus-mr"]["mean_dice"] == figures["hippocampus-mr"]
    # float16 on disk: two bytes per weight plus a small header.
    n = sum(p.numel() for p in model.net.trunk.parameters())
    assert (out / TRUNK_FILE).stat().st_size < 2 * n + 4096
    assert not (tmp_path / "default.partial").exists()
    # Re-running reuses the data and replaces the model atomically.
    assert main(argv + ["--evaluate-only"]) == 0
    assert load_model(out).domains == ["hippocampus-mr"]


def test_per_domain_size_scale_and_weight_are_applied_and_recorded(tmp_path, capsys):
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


def test_adapted_domain_is_added_on_the_frozen_trunk_and_withheld_one_left_out(tmp_path, capsys):
    from training.model.modelfile import adapter_path

    out, work = tmp_path / "m", tmp_path / "work"
    argv = [str(out), "--work", str(work), "--domains", "hippocampus-mr", "heart-mr",
            "--cases", "1", "--eval-cases", "1", "--iterations", "2", "--base-channels", "4",
            "--levels", "3", "--size-scale", "0.3", "--device", "cpu"]
    assert main(argv + ["--adapt", "prostate-mr=2", "--withhold", "heart-mr"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(figures) == {"hippocampus-mr", "prostate-mr"}
    model = load_model(out)
    assert model.domains == ["hippocampus-mr", "prostate-mr"]  # heart-mr trained, not shipped
    assert set(json.loads((out / "evaluation.json").read_text())) == {"hippocampus-mr", "prostate-mr"}
    withheld = model.trunk.provenance["withheld"]["heldout_evaluation"]
    assert set(withheld) == {"heart-mr"} and withheld["heart-mr"]["cases"] == 1
    prov = model.meta("prostate-mr").provenance
    assert prov["adapted"] is True and prov["iterations"] == 2 and prov["recipe"]["adapt"] == {"prostate-mr": 2}
    # adapter-only: the trained model's trunk and old adapters are untouched in the adapted copy
    for name in ("trunk.safetensors", "adapters/hippocampus-mr.safetensors", "adapters/heart-mr.safetensors"):
        assert (work / "adapted" / name).read_bytes() == (work / "model" / name).read_bytes()
    assert not (work / "adapted.partial").exists()
    # re-exporting reuses the adapted model made on this trunk instead of training it again
    stamp = adapter_path(work / "adapted", "prostate-mr").stat().st_mtime_ns
    assert main(argv + ["--evaluate-only", "--adapt", "prostate-mr=2", "--withhold", "heart-mr"]) == 0
    assert "reusing" in capsys.readouterr().err
    assert adapter_path(work / "adapted", "prostate-mr").stat().st_mtime_ns == stamp
    # a new trunk stage makes it stale: adapted again on the new trunk
    assert main(argv + ["--resume", "--iterations", "3", "--adapt", "prostate-mr=2"]) == 0
    assert "reusing" not in capsys.readouterr().err
    assert load_model(out).domains == ["heart-mr", "hippocampus-mr", "prostate-mr"]
    for bad, why in (("--adapt=hippocampus-mr=2", "already a domain of this build"),
                     ("--adapt=liver=2", "not a synthetic domain"),
                     ("--adapt=prostate-mr=0", "expected DOMAIN=N"),
                     ("--withhold=spleen-ct", "not trained here")):
        with pytest.raises(SystemExit):
            main(argv + ["--evaluate-only", bad])
        err = capsys.readouterr().err
        assert bad.split("=")[0] in err and why in err


def _bundled_domains() -> list[str]:
    """The shipped domains trained on phantoms, as ``u2net info`` lists them (read from the files'
    headers: no weights); domains taught on real scans have no generator of fresh cases: their
    check is on the real scans (tests/test_real_scans.py)."""
    from training.io.folders import bundled_model_dir
    from training.model.layout import model_dir_domains

    return [d["name"] for d in model_dir_domains(bundled_model_dir())[0]
            if not (d.get("provenance") or {}).get("real_scans")]


@pytest.fixture(scope="module")
def bundled_model():
    from training.io.folders import bundled_model_dir

    return load_model(bundled_model_dir())


HELDOUT_CASES = 3  # enough to catch a broken adapter or pipeline; the full figures use 20


@pytest.mark.slow
@pytest.mark.parametrize("domain", _bundled_domains())
def test_bundled_model_meets_the_quality_bar_on_fresh_held_out_cases(domain, bundled_model, tmp_path):
    """Each shipped domain, re-scored now: held-out cases written with the recipe's evaluation
    settings (seeds never used for training, the domain's size scale; the MNI152 evaluation
    stream), evaluated as ``u2net evaluate`` does; mean foreground Dice ≥ the quality bar."""
    from scripts.default_model import BRAIN_DOMAIN, QUALITY_BAR, Recipe, write_domain_dataset
    from training.data.mni152 import mni152_available
    from training.train.evaluation import evaluate_dataset

    if domain == BRAIN_DOMAIN and not mni152_available():
        pytest.skip("the MNI152 template ships with nilearn, which is not installed here")
    recipe = Recipe.from_dict(bundled_model.meta(domain).provenance["recipe"])
    folder = write_domain_dataset(recipe, domain, "eval", tmp_path / domain, HELDOUT_CASES)
    summary = evaluate_dataset(bundled_model, folder, domain, device="cpu")
    assert summary["cases"] == HELDOUT_CASES
    assert summary["mean_dice"] >= QUALITY_BAR, summary["mean_dice_per_class"]
