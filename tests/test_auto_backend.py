"""The ``auto`` backend: what it takes on this machine, its OpenVINO cache on disk (damaged entries
rebuilt, never loaded), the CLI's choice and messages, and ``u2net prepare``."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from training.commands.cli import main
from training.errors import InputError
from training.infer import backends
from training.infer.config import BACKENDS, InferenceConfig
from training.infer.prepare import PAYS_OFF_TILES, needs_preparing, prepare_domain
from training.model.modelfile import load_model

from .conftest import SMALL_PATCH, small_net

PATCH = SMALL_PATCH
CPU = torch.device("cpu")
needs_openvino = pytest.mark.skipif(not backends.openvino_available(), reason="openvino is not installed")


@pytest.fixture(scope="module")
def prepared(small_model_dir, tmp_path_factory):
    """``ct`` prepared once for this module (a conversion costs seconds): (its files, what it said)."""
    home = tmp_path_factory.mktemp("prepared_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("U2NET_HOME", str(home))
        backends.OPENVINO_CACHE.clear()
        done = prepare_domain(load_model(small_model_dir), "ct")
        backends.OPENVINO_CACHE.clear()
    return home, done


def copy_prepared(prepared, home) -> None:
    """Put the prepared graph into ``home``, as a preparation elsewhere (another process) would."""
    shutil.copytree(prepared[0], home, dirs_exist_ok=True)


def test_auto_is_the_default_everywhere():
    assert BACKENDS[0] == "auto" and InferenceConfig().backend == "auto"
    from training.commands.cli import build_parser

    args = build_parser().parse_args(["predict", "x.nii.gz", "--domain", "d", "-o", "o.nii.gz"])
    assert args.backend == "auto"


def test_auto_by_device_and_explicit_backends_checked():
    net = small_net()
    assert backends.resolve_backend("auto", torch.device("cuda"), net, "ct", PATCH) == (
        "torch", "auto: CUDA GPU, mixed precision")
    assert backends.resolve_backend("auto", torch.device("cuda"), amp=False)[1] == "auto: CUDA GPU"
    assert backends.resolve_backend("auto", torch.device("mps"))[0] == "torch"
    assert backends.resolve_backend("torch", CPU) == ("torch", "asked for")
    with pytest.raises(InputError, match="runs on the CPU only"):
        backends.resolve_backend("openvino", torch.device("cuda"))
    with pytest.raises(InputError, match="unknown backend"):
        backends.resolve_backend("tensorrt", CPU)


def test_without_openvino_auto_is_eager_and_says_what_to_install(home, monkeypatch):
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    name, reason = backends.resolve_backend("auto", CPU, small_net(), "ct", PATCH)
    assert name == "torch" and "pip install napari-u2net[openvino]" in reason
    with pytest.raises(InputError, match=r"not installed; pip install napari-u2net\[openvino\]"):
        backends.resolve_backend("openvino", CPU)
    assert backends.unavailable_backends()["openvino"].endswith("pip install napari-u2net[openvino]")


@needs_openvino
def test_auto_on_this_cpu_takes_openvino_once_prepared_never_before(home, small_model_dir, prepared):
    """Before the domain is prepared a run is eager (auto never converts by itself); once it is (on
    disk, by another process), OpenVINO, with the same logits."""
    model = load_model(small_model_dir)
    net = model.net
    x = torch.randn(1, 1, *PATCH)
    runner = backends.make_runner(net, "ct", "auto", CPU, patch_size=PATCH)
    assert (runner.backend, type(runner).__name__) == ("torch", "TorchRunner")
    assert "not prepared" in runner.reason
    assert not any(home.rglob("*.xml"))  # nothing was converted by the run
    assert needs_preparing(model, "ct", "cpu")
    eager = runner(x)

    assert not prepared[1].was_ready and prepared[1].backend == "openvino"
    copy_prepared(prepared, home)
    assert not needs_preparing(model, "ct", "cpu") and needs_preparing(model, "mr2", "cpu")
    runner = backends.make_runner(net, "ct", "auto", CPU, patch_size=PATCH)
    assert (runner.backend, runner.reason) == ("openvino", "auto: fastest here")
    assert torch.allclose(runner(x), eager, atol=1e-3)
    assert prepare_domain(model, "ct").was_ready
    # a weight change is another graph: not ready, eager again
    with torch.no_grad():
        next(net.adapters["ct"].parameters()).add_(0.1)
    assert backends.resolve_backend("auto", CPU, net, "ct", PATCH)[0] == "torch"


@needs_openvino
@pytest.mark.parametrize("damage", ["truncated weights", "garbled graph and blob"])
def test_a_damaged_cache_entry_is_discarded_and_rebuilt_never_loaded(home, small_model_dir, prepared, damage,
                                                                    caplog):
    model = load_model(small_model_dir)
    net = model.net
    copy_prepared(prepared, home)
    folder = backends.openvino_dir()
    ir, blob = next(folder.glob("*.xml")), next(folder.glob("*.blob"))
    weights = ir.with_suffix(".bin")
    if damage == "truncated weights":  # the IR's weights cut short, as by a full disk
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        blob.write_bytes(blob.read_bytes()[:100])
    else:  # same sizes, a few bytes changed: only the checksums can tell
        for f in (ir, blob):
            data = bytearray(f.read_bytes())
            data[len(data) // 2 : len(data) // 2 + 8] = b"\x00garbled"
            f.write_bytes(bytes(data))
    backends.OPENVINO_CACHE.clear()
    with caplog.at_level("WARNING", logger="training.infer.backends"):
        assert backends.resolve_backend("auto", CPU, net, "ct", PATCH)[0] == "torch"
    assert "damaged" in caplog.text
    assert not ir.exists() and not blob.exists() and not weights.exists()  # discarded, sidecars too
    assert not list(folder.glob("*.sha256"))
    if damage != "truncated weights":
        return  # rebuilding (seconds) is checked once

    done = prepare_domain(model, "ct")  # rebuilt
    assert not done.was_ready
    for f in (ir, weights, blob):
        assert backends._intact(f)
    backends.OPENVINO_CACHE.clear()
    runner = backends.make_runner(net, "ct", "auto", CPU, patch_size=PATCH)
    x = torch.randn(1, 1, *PATCH)
    assert runner.backend == "openvino"
    assert torch.allclose(runner(x), backends.TorchRunner(net, "ct", CPU)(x), atol=1e-3)


@needs_openvino
def test_a_damaged_blob_alone_is_rebuilt_from_the_intact_graph(home, small_model_dir, prepared):
    model = load_model(small_model_dir)
    copy_prepared(prepared, home)
    blob = next(backends.openvino_dir().glob("*.blob"))
    blob.write_bytes(b"not a compiled model")
    backends.OPENVINO_CACHE.clear()
    assert backends.resolve_backend("auto", CPU, model.net, "ct", PATCH)[0] == "openvino"  # the IR is intact
    runner = backends.make_runner(model.net, "ct", "auto", CPU, patch_size=PATCH)
    assert runner.backend == "openvino" and backends._intact(blob)  # compiled from the IR, blob written again
    assert blob.read_bytes() != b"not a compiled model"


def test_auto_takes_a_compiled_package_on_disk_and_drops_a_damaged_one(home, small_model_dir, monkeypatch, caplog):
    """Without OpenVINO, auto takes the compiled (AOTInductor) package when it is on disk, never
    compiles one (minutes); a package that cannot be loaded is removed and the run is eager."""
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    model = load_model(small_model_dir)
    assert backends.resolve_backend("auto", CPU, model.net, "ct", PATCH)[0] == "torch"
    path = backends.compiled_package(model.net, "ct", PATCH, 1)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage, as a truncated copy would be")
    assert backends.resolve_backend("auto", CPU, model.net, "ct", PATCH) == ("compiled", "auto: compiled graph cached")
    with caplog.at_level("WARNING", logger="training.infer.backends"):
        runner = backends.make_runner(model.net, "ct", "auto", CPU, patch_size=PATCH)
    assert runner.backend == "torch" and "compiled backend failed" in runner.reason
    assert not path.exists() and "running eager PyTorch instead" in caplog.text


# -- the CLI ------------------------------------------------------------------------------------
def write_scan(path, size: int) -> str:
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij")
    data = ((x**2 + y**2 + z**2) < 0.4) * 100.0 + rng.normal(0, 5, (size,) * 3)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))
    return str(path)


@needs_openvino
def test_cli_prints_its_choice_and_converts_only_when_it_pays_off(home, small_model_dir, tmp_path, capsys):
    small = write_scan(tmp_path / "small.nii.gz", 24)  # 8 tiles of 16³
    large = write_scan(tmp_path / "large.nii.gz", 48)  # 125 tiles
    common = ["--domain", "ct", "--model", str(small_model_dir), "--quiet", "--overwrite"]

    assert main(["predict", small, "-o", str(tmp_path / "a.nii.gz"), *common]) == 0
    out = capsys.readouterr().out  # on stdout, with the output paths
    assert out.startswith("backend: torch (auto: the fast path is not prepared for this domain yet")
    assert f"8 tiles < {PAYS_OFF_TILES}" in out and "u2net prepare --domain ct" in out
    assert not any(home.rglob("*.xml"))

    assert main(["predict", large, "-o", str(tmp_path / "b.nii.gz"), *common]) == 0
    captured = capsys.readouterr()
    assert "preparing the fast path for ct, once" in captured.err
    assert captured.out.startswith("backend: openvino (auto: fastest here; prepared in")

    backends.OPENVINO_CACHE.clear()  # the next run, another process: from the disk cache
    assert main(["predict", small, "-o", str(tmp_path / "c.nii.gz"), *common]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "backend: openvino (auto: fastest here)"
    eager = nib.load(tmp_path / "a.nii.gz").get_fdata()
    fast = nib.load(tmp_path / "c.nii.gz").get_fdata()
    assert (eager == fast).mean() > 0.999


@needs_openvino
def test_u2net_prepare_says_what_it_did(home, small_model_dir, prepared, capsys):
    """(Its conversion is the plugin test's: the plugin runs this command in the background.)"""
    copy_prepared(prepared, home)
    assert main(["prepare", "--model", str(small_model_dir), "--domain", "ct"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ct: loading…") and "ct: was ready in" in out
    assert main(["prepare", "--model", str(small_model_dir), "--domain", "liver"]) == 2
    assert "u2net prepare: error:" in capsys.readouterr().err


def test_cli_refuses_a_missing_device_or_backend_before_any_work(tmp_path, capsys, monkeypatch):
    scan = write_scan(tmp_path / "s.nii.gz", 8)
    args = ["predict", scan, "--domain", "ct", "-o", str(tmp_path / "o.nii.gz")]
    if not torch.cuda.is_available():
        assert main([*args, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("u2net predict: error: device 'cuda' asked for, but no CUDA GPU is available")
        assert "devices here: cpu" in err and err.count("\n") == 1
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    assert main([*args, "--backend", "openvino"]) == 2
    err = capsys.readouterr().err
    assert "the OpenVINO backend is not installed; pip install napari-u2net[openvino]" in err
    with pytest.raises(SystemExit) as e:
        main([*args, "--backend", "tensorrt"])
    assert e.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()
