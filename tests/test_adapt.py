import hashlib
import threading

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.training_data import ball_case, ball_domain
from training.commands.cli import main as cli_main
from training.errors import U2NetError
from training.io.volume import Volume, write_nifti
from training.model.modelfile import load_model
from training.model.network import ArchConfig
from training.train.adaptation import adapt_domain, cases_from_arrays, closest_domain
from training.train.metrics import dice_per_class
from training.train.runs import train_model
from training.train.trainer import TrainConfig, consume

ARCH = ArchConfig(base_channels=4, levels=3)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A model trained a little on two ball domains."""
    out = tmp_path_factory.mktemp("base") / "model"
    cfg = TrainConfig(iterations=50, lr=1e-2, device="cpu", checkpoint_every=0)
    consume(train_model([ball_domain("bright", 3, 0), ball_domain("bright2", 3, 0, seed=3)], out, cfg, ARCH))
    return out


def _files(model_dir):
    return {p.relative_to(model_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(model_dir.rglob("*")) if p.is_file() and "training" not in p.parts}


def _predict_cli(model_dir, image_path, domain, out):
    assert cli_main(["predict", str(image_path), "--model", str(model_dir), "--domain", domain,
                     "-o", str(out), "--device", "cpu", "--quiet"]) == 0
    return np.asarray(nib.load(out).dataobj)


def test_adapting_learns_a_new_domain_and_leaves_old_ones_bit_identical(base_model, tmp_path):
    img, _ = ball_case(42)
    image_path = tmp_path / "img.nii.gz"
    write_nifti(image_path, img[0], np.eye(4))
    before_files = _files(base_model)
    before = {d: _predict_cli(base_model, image_path, d, tmp_path / f"before_{d}.nii.gz")
              for d in ("bright", "bright2")}
    net0 = load_model(base_model).net

    # The new domain: dark balls (inverted contrast), taught from in-memory arrays.
    cases = [ball_case(200 + i, contrast=-2.0) for i in range(3)]
    cfg = TrainConfig(iterations=100, lr=1e-2, device="cpu", patch_size=(16, 16, 16))
    reports = list(adapt_domain(base_model, "dark", cases, ["background", "ball"], "CT", config=cfg))
    assert reports[-1].iteration == 100
    assert np.mean([r.loss for r in reports[-10:]]) < 0.6 * np.mean([r.loss for r in reports[:10]])

    after_files = _files(base_model)
    assert set(after_files) == set(before_files) | {"adapters/dark.safetensors"}
    assert all(after_files[k] == before_files[k] for k in before_files)  # trunk, old adapters untouched
    for d in ("bright", "bright2"):
        assert np.array_equal(_predict_cli(base_model, image_path, d, tmp_path / f"after_{d}.nii.gz"), before[d])

    model = load_model(base_model)
    meta = model.meta("dark")
    assert meta.provenance["init_from"] in ("bright", "bright2") and meta.provenance["iterations"] == 100
    assert meta.normalization[0]["scheme"] == "ct" and meta.class_names == ["background", "ball"]
    assert meta.components == [0, 1]  # learned from the dense labels: one ball per case
    for k, v in net0.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v), k
    # The adapter learned: raw image in, labels out (through the full inference path).
    from training.infer.pipeline import InferenceConfig, predict

    test_img, test_lab = ball_case(300, contrast=-2.0)
    pred = predict(model, Volume(test_img, np.eye(4)), ["dark"], InferenceConfig(device="cpu"))["dark"].labels
    assert dice_per_class(pred, test_lab, 2)[0] > 0.7


def test_adapt_refuses_existing_domain_and_bad_labels(base_model):
    cases = [ball_case(1, contrast=-2.0)]
    with pytest.raises(U2NetError, match="already exists"):
        adapt_domain(base_model, "bright", cases, ["background", "ball"])
    img, lab = cases[0]
    with pytest.raises(U2NetError, match="no foreground"):
        adapt_domain(base_model, "new", [(img, np.zeros_like(lab))], ["background", "ball"])
    with pytest.raises(U2NetError, match="class names"):
        adapt_domain(base_model, "new", [(img, lab * 2)], ["background", "ball"])
    with pytest.raises(U2NetError, match="do not match"):
        adapt_domain(base_model, "new", [(img[:, :-1], lab)], ["background", "ball"])


def test_stopping_an_adaptation_writes_the_adapter_so_far(base_model, tmp_path):
    import shutil

    model_dir = tmp_path / "copy"
    shutil.copytree(base_model, model_dir)
    stop = threading.Event()
    cfg = TrainConfig(iterations=50, lr=1e-2, device="cpu", patch_size=(16, 16, 16))
    seen = 0
    for r in adapt_domain(model_dir, "quick", [ball_case(5, contrast=-2.0)], ["background", "ball"],
                          "MR", init_from=None, config=cfg, stop=stop):
        seen = r.iteration
        if r.iteration == 3:
            stop.set()
    assert seen == 3
    meta = load_model(model_dir).meta("quick")
    assert meta.provenance["iterations"] == 3 and meta.provenance["init_from"] is None
    assert meta.normalization[0]["scheme"] == "zscore"


def test_annotated_images_are_resampled_to_their_median_spacing():
    """Three images at 1, 2 and 4 mm (z): the grid is 2 mm (the median), not the first image's."""
    cases = []
    for z in (1.0, 2.0, 4.0):
        img, lab = ball_case(7, (16, 16, 16))
        affine = np.array([[0, 0, 1.5, 0], [0, 1.5, 0, 0], [z, 0, 0, 0], [0, 0, 0, 1]])  # axis 0 = S
        cases.append((Volume(img, affine), lab))
    arrays, spacing, _ = cases_from_arrays(cases, "CT")
    assert spacing == [2.0, 1.5, 1.5]
    assert [a.image.shape[1] for a in arrays] == [8, 16, 32]  # 16 slices of 1, 2, 4 mm on a 2 mm grid


def test_closest_domain_prefers_modality_then_channels(model_dir):
    from training.model.modelfile import AdapterMeta, make_classes

    model = load_model(model_dir)  # domains "ct" (1 channel) and "mr2" (2 channels), both CT
    model.adapters["mr2"].modality = "MR"
    two_mr = AdapterMeta("x", ["T2", "ADC"], make_classes(["bg", "a", "b"]), modality="MR")
    one_ct = AdapterMeta("y", ["CT"], make_classes(["bg", "a"]), modality="CT")
    assert closest_domain(model, two_mr) == "mr2"
    assert closest_domain(model, one_ct) == "ct"


def test_cli_adapt_writes_only_the_adapter_and_resumes_exactly(base_model, tmp_path, capsys):
    import json
    import shutil

    from tests.training_data import TINY_ARGS, small_synth_dataset

    ds = small_synth_dataset(tmp_path / "hip", cases=2)
    one, two = tmp_path / "one" / "model", tmp_path / "two" / "model"
    shutil.copytree(base_model, one)
    shutil.copytree(base_model, two)
    before = _files(one)
    common = ["--schedule", "constant", "--checkpoint-every", "3", "--from", "bright", *TINY_ARGS]
    assert cli_main(["adapt", str(ds), "--model", str(one), "--iterations", "6", *common]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["iterations"] == 6
    assert cli_main(["adapt", str(ds), "--model", str(two), "--iterations", "3", *common]) == 0
    assert cli_main(["adapt", str(ds), "--model", str(two), "--iterations", "6", "--resume", *common]) == 0
    after = _files(one)
    assert set(after) - set(before) == {"adapters/hippocampus-mr.safetensors"}
    assert all(after[k] == before[k] for k in before)
    assert (tmp_path / "one" / "model.adapt-hippocampus-mr" / "state.pt").is_file()  # beside, not inside
    a, b = load_model(one), load_model(two)
    assert a.meta("hippocampus-mr").provenance["init_from"] == "bright"
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k]), k
    # adapting again under the same name is refused (no silent overwrite)
    capsys.readouterr()
    assert cli_main(["adapt", str(ds), "--model", str(one), "--iterations", "1", *TINY_ARGS]) == 2
    assert "already exists" in capsys.readouterr().err
