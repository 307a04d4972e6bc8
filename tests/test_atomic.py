"""Atomic writes under real faults: signals sent to a real process, a full and a read-only file
system (small tmpfs mounts, as root), and two processes racing for one output."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from training.errors import InputError
from training.io.atomic import atomic_write_bytes, check_writable, remove_stale_temporaries
from training.io.volume import write_labels

from .conftest import needs_root

ROOT = Path(__file__).resolve().parent.parent


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


WRITER = """
    import sys, time
    from pathlib import Path
    from training.io.atomic import atomic_output, remove_temporaries_on_signals
    if sys.argv[-1] != "no-handler":
        remove_temporaries_on_signals()
    with atomic_output(Path({target!r})) as tmp:
        open(tmp, "wb").write(b"half")
        print("writing", flush=True)
        time.sleep(60)
"""


def _started(child: subprocess.Popen) -> None:
    assert child.stdout.readline().strip() == "writing", child.stderr.read()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_write_leaves_nothing_behind(tmp_path, sig):
    target = tmp_path / "out.bin"
    child = _child(WRITER.format(target=str(target)))
    _started(child)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.bin.")]  # the temporary exists
    child.send_signal(sig)
    assert child.wait(timeout=30) != 0
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    child = _child(WRITER.format(target=str(target)))
    _started(child)
    child.kill()  # SIGKILL cannot be caught
    child.wait(timeout=30)
    left = [p for p in tmp_path.iterdir() if p != target]
    assert len(left) == 1 and str(child.pid) in left[0].name
    assert target.read_bytes() == b"previous"  # the user's file was never touched
    atomic_write_bytes(target, b"new")
    assert sorted(tmp_path.iterdir()) == [target] and target.read_bytes() == b"new"


def test_a_running_writers_temporary_is_left_alone(tmp_path):
    target = tmp_path / "out.bin"
    child = _child(WRITER.format(target=str(target)))
    try:
        _started(child)
        assert remove_stale_temporaries(target) == []
        assert len(list(tmp_path.iterdir())) == 1
    finally:
        child.kill()
        child.wait(timeout=30)


def test_two_processes_racing_for_one_output_never_both_succeed(tmp_path):
    """Both pass the "does it exist" check, then both commit: exactly one wins, the other is told,
    and the file holds the winner's bytes whole."""
    target = tmp_path / "labels.nii.gz"
    go = tmp_path / "go"
    racer = """
        import os, sys, time
        from pathlib import Path
        import numpy as np
        import training.io.atomic as atomic
        from training.errors import InputError
        from training.io.volume import write_labels
        target, go, value = Path({target!r}), Path({go!r}), int(sys.argv[1])
        real_link = os.link
        def link_when_told(src, dst):
            print("ready", flush=True)
            while not go.exists():
                time.sleep(0.01)
            return real_link(src, dst)
        atomic.os.link = link_when_told
        try:
            write_labels(target, np.full((4, 5, 6), value, np.uint8), np.eye(4), overwrite=False)
            print("written", flush=True)
        except InputError as e:
            print("refused:", e, flush=True)
    """.format(target=str(target), go=str(go))
    kids = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(racer), str(v)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for v in (1, 2)
    ]
    for k in kids:
        assert k.stdout.readline().strip() == "ready", k.stderr.read()
    assert not target.exists()  # both are past every check, neither has committed
    go.touch()
    outs = [k.stdout.read().strip() for k in kids]
    for k in kids:
        assert k.wait(timeout=60) == 0
    assert sorted(o.split()[0] for o in outs) == ["refused:", "written"]
    assert "already exists" in next(o for o in outs if o.startswith("refused"))
    import nibabel as nib

    winner = 1 + outs.index("written")
    assert np.all(np.asarray(nib.load(str(target)).dataobj) == winner)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "labels.nii.gz"]


@needs_root
def test_full_disk_is_one_clear_error_and_leaves_nothing(small_mount):
    fs = small_mount("rw")
    (fs / "keep.nii.gz").write_bytes(b"user file")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 64), dtype=np.uint8)  # does not compress
    with pytest.raises(InputError, match="cannot write here \\(the disk is full\\)") as e:
        write_labels(fs / "keep.nii.gz", noise, np.eye(4))
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in fs.iterdir()) == ["keep.nii.gz"]
    assert (fs / "keep.nii.gz").read_bytes() == b"user file"


@needs_root
def test_read_only_file_system_is_refused_before_any_work(small_mount):
    fs = small_mount("ro")
    with pytest.raises(InputError, match="cannot write here \\(the file system is read-only\\)"):
        check_writable(fs / "out.nii.gz")
    with pytest.raises(InputError, match="read-only"):
        atomic_write_bytes(fs / "x.bin", b"data")


def test_unwritable_places_are_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="a part of the path is a file"):
        check_writable(tmp_path / "afile" / "out.nii.gz")
    with pytest.raises(InputError, match="is a folder"):
        check_writable(tmp_path)
    with pytest.raises(InputError, match="file name is too long"):
        check_writable(tmp_path / ("x" * 300 + ".nii.gz"))
    check_writable(tmp_path / "new" / "deeper" / "out.nii.gz")  # missing folders are tried, then removed
    assert not (tmp_path / "new").exists()


def test_overwrite_false_never_replaces_an_existing_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"mine")
    with pytest.raises(InputError, match="already exists"):
        atomic_write_bytes(target, b"theirs", overwrite=False)
    assert target.read_bytes() == b"mine" and sorted(tmp_path.iterdir()) == [target]
