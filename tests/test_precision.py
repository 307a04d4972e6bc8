"""OpenVINO's precisions: INT8 made by ``u2net prepare --precision int8`` and taken only where its
check accepted it, BF16 on CPUs with bf16 units, and the one-line refusals of what cannot run."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from training.commands.cli import main
from training.errors import InputError
from training.infer import backends
from training.infer.prepare import prepare_domain
from training.infer.quantize import MAX_DICE_DROP, nncf_available
from training.io.volume import read_image
from training.model.modelfile import load_model

from .conftest import SMALL_PATCH as PATCH
from .conftest import needs_root

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not (backends.openvino_available() and nncf_available()),
                                reason="OpenVINO and NNCF are not installed")


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> str:
    """A bright ball in noise, 40³ (27 tiles of 16³)."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 40)] * 3, indexing="ij")
    data = ((x**2 + y**2 + z**2) < 0.4) * 100.0 + rng.normal(0, 20, (40,) * 3)
    path = tmp_path_factory.mktemp("scan") / "ball.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))
    ball = ((x**2 + y**2 + z**2) < 0.4).astype(np.uint8)
    nib.save(nib.Nifti1Image(ball, np.eye(4)), str(path.with_name("ball_labels.nii.gz")))
    nib.save(nib.Nifti1Image(ball * 5, np.eye(4)), str(path.with_name("ball_wrong.nii.gz")))
    return str(path)


def _prepare(model, scan, **kw):
    return prepare_domain(model, "ct", precision="int8", calibration=[read_image(scan)], calibration_tiles=12, **kw)


def _int8_files(model):
    weights = backends._weights_key(model.net, "ct")
    return backends.OpenVINOFiles(model.net, "ct", PATCH, 1, weights, "int8")


def test_an_accepted_int8_graph_is_what_auto_runs(home, small_model_dir, scan, tmp_path, capsys):
    model = load_model(small_model_dir)
    assert backends.choose("auto", CPU, model.net, "ct", PATCH).precision == "f32"  # nothing prepared
    done = _prepare(model, scan, max_drop=1.0, min_speedup=0.0)
    verdict = done.verdict
    assert verdict["accepted"] and verdict["check_cases"] == 1 and verdict["calibration_tiles"] == 12
    assert verdict["calibration"] == [str(read_image(scan).source)] and verdict["reference"] == "f32 labels"
    assert verdict["checked_on"].endswith("(also calibrated on), against f32's labels")
    files = _int8_files(model)
    assert files.ready() and backends.read_verdict(files) == verdict  # on disk, sealed

    backends.OPENVINO_CACHE.clear()  # another process: from the disk
    choice = backends.choose("auto", CPU, model.net, "ct", PATCH)
    assert (choice.backend, choice.precision) == ("openvino", "int8")
    assert backends.choose("auto", CPU, model.net, "ct", PATCH, precision="f32").precision == "f32"
    int8 = backends.make_runner(model.net, "ct", "auto", CPU, patch_size=PATCH)
    f32 = backends.make_runner(model.net, "ct", "openvino", CPU, patch_size=PATCH, precision="f32")
    assert (int8.precision, f32.precision) == ("int8", "f32")
    x = torch.from_numpy(read_image(scan).data[None, :, :16, :16, :16].astype(np.float32) / 50)
    a, b = int8(x), f32(x)
    assert not torch.equal(a, b)  # really another graph
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.9

    out = tmp_path / "labels.nii.gz"
    assert main(["predict", scan, "-o", str(out), "--domain", "ct", "--model", str(small_model_dir), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("backend: openvino (auto: fastest here, INT8 (accepted by its check))")
    assert main(["prepare", "--model", str(small_model_dir), "--domain", "ct", "--precision", "int8"]) == 0
    assert "ct: INT8 accepted (labels agree" in capsys.readouterr().out  # the verdict on disk, reported


def test_a_refused_int8_graph_is_never_run(home, small_model_dir, scan, tmp_path, capsys):
    model = load_model(small_model_dir)
    done = _prepare(model, scan, max_drop=-0.01)  # no graph can do that well
    assert not done.verdict["accepted"] and "more than -0.01" in done.verdict["why"]
    files = _int8_files(model)
    assert not files.ir.exists() and not files.blob.exists() and not files.ready()
    assert backends.read_verdict(files) == done.verdict
    backends.OPENVINO_CACHE.clear()
    assert backends.choose("auto", CPU, model.net, "ct", PATCH).precision == "f32"
    with pytest.raises(InputError, match="INT8 was refused for domain 'ct'"):
        backends.make_runner(model.net, "ct", "auto", CPU, patch_size=PATCH, precision="int8")

    args = [scan, "-o", str(tmp_path / "l.nii.gz"), "--domain", "ct", "--model", str(small_model_dir), "--quiet"]
    capsys.readouterr()  # NNCF's progress bars
    assert main(["predict", *args, "--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "INT8 was refused" in err and "--precision f32" in err
    assert not (tmp_path / "l.nii.gz").exists()
    assert main(["prepare", "--model", str(small_model_dir), "--domain", "ct", "--precision", "int8"]) == 1
    assert "ct: INT8 refused (labels agree" in capsys.readouterr().out
    assert not files.ir.exists()


def test_the_check_scores_against_labels_given_with_the_scan(home, small_model_dir, scan, capsys):
    labels = scan.replace("ball.nii.gz", "ball_labels.nii.gz")
    rc = main(["prepare", "--model", str(small_model_dir), "--domain", "ct", "--precision", "int8",
               "--calibrate", scan, "--check-labels", labels])
    model = load_model(small_model_dir)
    verdict = backends.read_verdict(_int8_files(model))
    assert verdict["reference"] == "truth" and verdict["checked_on"].endswith("against its labels")
    assert verdict["drop"] == pytest.approx(verdict["dice_f32"] - verdict["dice_int8"], abs=2e-5)
    assert rc == (0 if verdict["accepted"] else 1)
    assert f"Dice {verdict['dice_int8']:.4f} against f32's {verdict['dice_f32']:.4f}" in capsys.readouterr().out


def test_a_damaged_verdict_discards_the_int8_graph(home, small_model_dir, scan):
    model = load_model(small_model_dir)
    _prepare(model, scan, max_drop=1.0, min_speedup=0.0)
    files = _int8_files(model)
    text = files.verdict.read_text()
    files.verdict.write_text(text.replace('"accepted": true', '"accepted": true ').replace("agree", "agreed"))
    backends.OPENVINO_CACHE.clear()
    assert backends.choose("auto", CPU, model.net, "ct", PATCH).precision == "f32"
    assert not files.verdict.exists()  # discarded, not trusted
    with pytest.raises(InputError, match="no INT8 graph of domain 'ct' is prepared.*u2net prepare --precision int8"):
        backends.choose("auto", CPU, model.net, "ct", PATCH, precision="int8")

    files.ir.write_text("<not an IR/>")  # damage a fresh accepted graph: rebuilt by prepare, not loaded
    assert not files.ready()


def test_what_cannot_run_is_refused_in_one_line(home, small_model_dir, scan, tmp_path, capsys):
    out = str(tmp_path / "l.nii.gz")
    common = ["--domain", "ct", "--model", str(small_model_dir), "--quiet"]
    cases = [
        (["predict", scan, "-o", out, *common, "--precision", "int8", "--backend", "torch"],
         "precision int8 runs on the OpenVINO backend only"),
        (["predict", scan, "-o", out, *common, "--precision", "int8"], "u2net prepare --precision int8 --domain ct"),
        (["prepare", "--model", str(small_model_dir), "--domain", "ct", "--precision", "int8"],
         "has no synthetic cases to calibrate INT8 on"),
        (["prepare", "--model", str(small_model_dir), "--calibrate", scan], "--calibrate is for --precision int8"),
        (["prepare", "--model", str(small_model_dir), "--domain", "ct", "--precision", "int8",
          "--calibrate", str(tmp_path / "missing.nii.gz")], "missing.nii.gz"),
        (["prepare", "--model", str(small_model_dir), "--domain", "mr2", "--precision", "int8", "--calibrate", scan],
         "1 channel(s), domain 'mr2' takes 2"),
        (["prepare", "--model", str(small_model_dir), "--domain", "ct", "--precision", "int8", "--calibrate", scan,
          "--check-labels", scan.replace("ball.nii.gz", "ball_wrong.nii.gz")], "label values must be whole numbers 0…1"),
        (["prepare", "--model", str(small_model_dir), "--domain", "ct", "--precision", "int8", "--check-labels", scan],
         "--check-labels labels the last --calibrate scan"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    assert not (tmp_path / "l.nii.gz").exists()


def test_int8_for_every_domain_skips_those_without_calibration_data(home, small_model_dir, capsys):
    """`u2net prepare --precision int8` with no --domain does what it can and says, per domain it
    cannot calibrate, the command that would (exit 1); naming such a domain is refused (exit 2)."""
    assert main(["prepare", "--model", str(small_model_dir), "--precision", "int8"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{d}: skipped (no synthetic cases to calibrate INT8 on: `u2net prepare --precision int8 "
                   f"--domain {d} --calibrate SCAN`)" for d in ("ct", "mr2")]


def test_bf16_runs_where_the_cpu_has_bf16_units(home, small_model_dir, scan, tmp_path, capsys):
    out = tmp_path / "bf16.nii.gz"
    argv = ["predict", scan, "-o", str(out), "--domain", "ct", "--model", str(small_model_dir), "--quiet",
            "--precision", "bf16"]
    if not backends.bf16_supported():
        assert main(argv) == 2 and "no bf16 units" in capsys.readouterr().err
        return
    assert main(argv) == 0
    assert main([*argv[:3], str(tmp_path / "f32.nii.gz"), *argv[4:-1], "f32"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("backend: openvino (auto: precision bf16 asked for")
    a, b = nib.load(out).get_fdata(), nib.load(tmp_path / "f32.nii.gz").get_fdata()
    assert (a == b).mean() > 0.95
    model = load_model(small_model_dir)
    runner = backends.make_runner(model.net, "ct", "openvino", CPU, patch_size=PATCH, precision="bf16")
    assert runner.precision == "bf16" and backends.OpenVINOFiles(model.net, "ct", PATCH, 1, None, "bf16").blob.exists()


def test_int8_of_a_shipped_domain_is_judged_on_its_synthetic_cases(home, capsys):
    """The bundled model's spleen-ct, calibrated and checked on synthetic cases as a user's
    ``u2net prepare --precision int8`` does: whatever the verdict, the runs follow it."""
    from training.io.folders import bundled_model_dir

    rc = main(["prepare", "--domain", "spleen-ct", "--precision", "int8"])
    out = capsys.readouterr().out
    model = load_model(bundled_model_dir(), domains=["spleen-ct"])
    meta = model.meta("spleen-ct")
    files = backends.OpenVINOFiles(model.net, "spleen-ct", meta.patch_size, 1, None, "int8")
    verdict = json.loads(files.verdict.read_text())
    assert verdict["calibration_tiles"] >= 32 and verdict["check_cases"] == 4 and verdict["reference"] == "truth"
    assert verdict["drop"] == pytest.approx(verdict["dice_f32"] - verdict["dice_int8"], abs=2e-5)
    assert verdict["dice_f32"] > 0.7  # the domain works, so its drop means something
    assert verdict["accepted"] == (verdict["drop"] <= MAX_DICE_DROP and verdict["speedup"] >= 1)
    assert rc == (0 if verdict["accepted"] else 1)
    assert ("INT8 accepted" if verdict["accepted"] else "INT8 refused") in out
    backends.OPENVINO_CACHE.clear()
    choice = backends.choose("auto", CPU, model.net, "spleen-ct", meta.patch_size)
    assert choice.precision == ("int8" if verdict["accepted"] else "f32")


@needs_root
def test_a_full_cache_keeps_int8_for_this_process_only(small_model_dir, scan, small_mount, monkeypatch, caplog):
    """U2NET_HOME on a full 64 kB file system: INT8 is made and checked; this process runs it from
    memory; nothing half-written is left, and another process (the in-memory cache cleared) finds
    no INT8 to run: a verdict without its graph vouches for nothing."""
    home = small_mount("rw")
    monkeypatch.setenv("U2NET_HOME", str(home))
    backends.OPENVINO_CACHE.clear()
    model = load_model(small_model_dir)
    with caplog.at_level("WARNING"):
        done = _prepare(model, scan, max_drop=1.0, min_speedup=0.0)
    assert done.verdict["accepted"] and "could not cache" in caplog.text
    assert backends.choose("auto", CPU, model.net, "ct", PATCH).precision == "int8"  # from memory
    for f in home.rglob("*"):  # every file there is whole: sealed by its sidecar
        if f.is_file() and not f.name.endswith(".sha256"):
            assert backends._intact(f), f
    backends.OPENVINO_CACHE.clear()
    assert backends.choose("auto", CPU, model.net, "ct", PATCH).precision == "f32"
    with pytest.raises(InputError, match="no INT8 graph of domain 'ct' is prepared"):
        backends.choose("auto", CPU, model.net, "ct", PATCH, precision="int8")
    backends.OPENVINO_CACHE.clear()
