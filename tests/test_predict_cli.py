"""``u2net predict``: outputs, geometry, exit codes on bad input, and the console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from training.commands.cli import main


def _image(path: Path, shape=(20, 24, 18), seed: int = 0) -> Path:
    a = np.radians(6.0)  # a slightly oblique, anisotropic, left-right flipped grid
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-1.2, 0.9, 2.0])
    affine[:3, 3] = [30, -14, 7]
    data = np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_predict_writes_labels_on_the_input_grid(tmp_path, model_dir, capsys):
    image = _image(tmp_path / "case.nii.gz")
    out = tmp_path / "labels.nii.gz"
    rc = main(["predict", str(image), "--domain", "ct", "--model", str(model_dir), "-o", str(out), "--device", "cpu"])
    assert rc == 0
    labels, ref = nib.load(out), nib.load(image)
    assert labels.shape == ref.shape
    assert np.array_equal(labels.affine, ref.affine)
    assert labels.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(labels.dataobj))) <= {0, 1}
    captured = capsys.readouterr()
    assert "ct" in captured.err  # the progress bar
    assert str(out) in captured.out


def test_two_modalities_into_a_folder(tmp_path, model_dir):
    t2 = _image(tmp_path / "case7_0000.nii.gz", seed=1)
    adc = _image(tmp_path / "case7_0001.nii.gz", seed=2)
    out = tmp_path / "results"
    rc = main(["predict", str(t2), str(adc), "--domain", "mr2", "--model", str(model_dir), "-o", str(out),
               "--device", "cpu", "--overlap", "0.25", "--no-postprocess", "--quiet"])
    assert rc == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["case7_0000_mr2.nii.gz"]
    labels = np.asanyarray(nib.load(out / written[0]).dataobj)
    assert labels.shape == (20, 24, 18) and labels.max() <= 2


@pytest.mark.parametrize(
    "problem", ["2D image", "missing file", "wrong modality count", "bad overlap", "several domains, one file"]
)
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, model_dir, capsys, problem):
    image = _image(tmp_path / "case.nii.gz")
    out = tmp_path / "labels.nii.gz"
    args = [str(image), "--domain", "ct"]
    if problem == "2D image":
        flat = tmp_path / "flat.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((30, 30), np.float32), np.eye(4)), flat)
        args = [str(flat), "--domain", "ct"]
    elif problem == "missing file":
        args = [str(tmp_path / "nope.nii.gz"), "--domain", "ct"]
    elif problem == "wrong modality count":
        args = [str(image), "--domain", "mr2"]
    elif problem == "bad overlap":
        args += ["--overlap", "1.5"]
    else:
        args += ["--domain", "mr2"]
    rc = main(["predict", *args, "--model", str(model_dir), "-o", str(out), "--device", "cpu", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("u2net predict: error: ")
    assert not out.exists()


def test_console_script(tmp_path, model_dir):
    script = Path(sys.executable).with_name("u2net")
    if not script.exists():
        pytest.skip("u2net console script not installed in this environment")
    image = _image(tmp_path / "case.nii.gz", shape=(12, 16, 16))
    out = tmp_path / "seg.nii"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(script), "predict", str(image), "--domain", "ct", "--model", str(model_dir), "-o", str(out),
         "--device", "cpu"],
        capture_output=True, text=True, timeout=240, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert nib.load(out).shape == (12, 16, 16)
    again = subprocess.run([str(script), "predict", str(image), "--domain", "ct", "--model", str(model_dir),
                            "-o", str(out), "--device", "cpu"],
                           capture_output=True, text=True, timeout=240, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.parametrize("place", ["a file in the path", "read-only file system"])
def test_unwritable_output_exits_2_before_any_work(tmp_path, model_dir, capsys, place):
    image = _image(tmp_path / "case.nii.gz")
    if place == "a file in the path":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "labels.nii.gz"
    else:
        if os.geteuid() != 0:
            pytest.skip("mounting a read-only file system needs root")
        ro = tmp_path / "ro"
        ro.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], check=True)
        out = ro / "labels.nii.gz"
    try:
        rc = main(["predict", str(image), "--domain", "ct", "--model", str(model_dir), "-o", str(out),
                   "--device", "cpu"])  # no --quiet: a progress bar would show that work had started
        err = capsys.readouterr().err.strip().splitlines()
    finally:
        if place != "a file in the path":
            subprocess.run(["umount", "-l", str(tmp_path / "ro")], check=False)
    assert rc == 2
    assert len(err) == 1 and "cannot write here" in err[0], err


def test_a_file_written_meanwhile_is_not_replaced(tmp_path, model_dir, monkeypatch, capsys):
    """The existence check passes, then another run writes the output before this one finishes:
    without --overwrite this run fails with one line and the other run's file stays."""
    import training.infer.pipeline as pipeline

    image = _image(tmp_path / "case.nii.gz")
    out = tmp_path / "labels.nii.gz"
    real_predict = pipeline.predict

    def predict_then_another_run_writes(*args, **kwargs):
        result = real_predict(*args, **kwargs)
        out.write_bytes(b"the other run's labels")
        return result

    monkeypatch.setattr(pipeline, "predict", predict_then_another_run_writes)
    rc = main(["predict", str(image), "--domain", "ct", "--model", str(model_dir), "-o", str(out),
               "--device", "cpu", "--quiet"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"the other run's labels"
    assert sorted(p.name for p in tmp_path.iterdir() if p != model_dir) == ["case.nii.gz", "labels.nii.gz"]


def test_the_cli_removes_its_temporary_files_on_a_signal(tmp_path, model_dir):
    import signal

    main(["predict", str(_image(tmp_path / "c.nii.gz")), "--domain", "ct", "--model", str(model_dir),
          "-o", str(tmp_path / "o.nii.gz"), "--device", "cpu", "--quiet"])
    for sig in (signal.SIGTERM, signal.SIGHUP):
        assert getattr(signal.getsignal(sig), "removes_temporaries", False)


def test_a_dicom_folder_of_two_series_is_refused_then_segmented_by_series(tmp_path, model_dir, capsys):
    from tests.test_volume import write_dicom_series

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(2):
        arr = (np.random.default_rng(i).random((6, 12, 14)) * 1000).astype(np.int16)
        write_dicom_series(tmp_path / f"s{i}", arr, np.diag([2.0, 0.8, 0.8, 1.0]), f"1.2.826.0.1.3680043.2.1125.4{i}")
        for f in (tmp_path / f"s{i}").iterdir():
            f.rename(mixed / f"{i}{f.name}")
    out = tmp_path / "labels.nii.gz"
    args = ["predict", str(mixed), "--domain", "ct", "--model", str(model_dir), "-o", str(out), "--device", "cpu",
            "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds 2 DICOM series" in err[0] and "1125.41" in err[0] and not out.exists()
    assert main([*args, "--series", "1.2.826.0.1.3680043.2.1125.41"]) == 0
    assert nib.load(out).shape == (14, 12, 6)


def test_an_empty_result_is_written_with_a_warning(tmp_path, model_dir, capsys, monkeypatch):
    import training.infer.pipeline as pipeline

    real = pipeline.predict

    def nothing_found(*args, **kwargs):
        prediction = real(*args, **kwargs)
        for result in prediction:
            result.labels[:] = 0
        return prediction

    monkeypatch.setattr(pipeline, "predict", nothing_found)
    out = tmp_path / "labels.nii.gz"
    assert main(["predict", str(_image(tmp_path / "case.nii.gz")), "--domain", "ct", "--model", str(model_dir),
                 "-o", str(out), "--device", "cpu", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: ct found nothing in" in err and out.exists()
