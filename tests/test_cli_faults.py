"""Hostile input to the training commands and the cache: one line, exit 2, before any work."""

from __future__ import annotations

import os
import subprocess

import pytest

from training.commands.cli import main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    assert main(["synth", str(root / "spleen"), "--domain", "spleen-ct", "--cases", "3", "--seed", "5",
                 "--size-scale", "0.5"]) == 0
    return root / "spleen"


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"u2net {command}: error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
        (["--lr", "0"], "lr must be a finite number > 0"),
        (["--weight-decay", "-1"], "weight decay must be a finite number ≥ 0"),
        (["--iterations", "0"], "iterations must be ≥ 1"),
    ],
)
def test_absurd_training_settings_are_refused(dataset, tmp_path, capsys, option, words):
    assert main(["train", str(dataset), "-o", str(tmp_path / "m"), "--quiet", *option]) == 2
    assert words in _one_error_line(capsys, "train")
    assert not (tmp_path / "m").exists()


def test_train_output_that_is_a_file_is_refused(dataset, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert main(["train", str(dataset), "-o", str(tmp_path / "afile"), "--iterations", "2", "--quiet"]) == 2
    assert "exists and is not a folder" in _one_error_line(capsys, "train")
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_read_only_output_and_cache(dataset, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], check=True)
    try:
        assert main(["train", str(dataset), "-o", str(ro / "m"), "--iterations", "2", "--quiet"]) == 2
        assert "cannot write here (the file system is read-only)" in _one_error_line(capsys, "train")
        # a preprocessing cache that cannot be written only costs the cache: training goes on
        with pytest.warns(UserWarning, match="preprocessing without a cache"):
            rc = main(["train", str(dataset), "-o", str(tmp_path / "m"), "--iterations", "2", "--quiet",
                       "--cache", str(ro / "cache")])
        assert rc == 0 and (tmp_path / "m" / "trunk.safetensors").is_file()
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_u2net_home_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "home").write_text("not a folder")
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "home"))
    assert main(["info"]) == 2
    assert "U2NET_HOME=" in _one_error_line(capsys, "info")


def test_evaluate_with_other_classes_warns_with_both_lists(tmp_path, capsys, model_dir):
    """A domain whose classes are not the dataset's would score 0.000 without a word."""
    assert main(["synth", str(tmp_path / "hippo"), "--domain", "hippocampus-mr", "--cases", "2", "--seed", "3",
                 "--size-scale", "0.5"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "hippo"), "--domain", "ct", "--model", str(model_dir), "--limit", "1",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "differ from the dataset's" in err
    assert "background, class1" in err and "anterior" in err
