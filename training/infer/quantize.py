"""INT8 and BF16 for the OpenVINO backend: post-training quantisation of a domain's graph (NNCF).

Quantising needs no training, only a few dozen *calibration* inputs that look like what
inference feeds the network: tiles of normalised images at the domain's spacing. For the shipped
domains they come from the synthetic generator (:func:`training.data.synth.generate_case`) and the
MNI152 template's case stream, drawn with :data:`CALIBRATION_SEED` (never trained on, never used to
fit the temperatures, never used for held-out Dice); for any other domain from the user's scans.
A domain is only worth quantising when its labels hold and it runs faster: :func:`check_int8`
decides that for ``u2net prepare --precision int8`` (:mod:`training.infer.prepare`), on held-out
synthetic cases against their truth, or on the user's scans against fp32's labels; ``bench/bench_int8.py`` measures the Dice drop against the truth
per shipped domain (figures in the README, "Benchmarks: end to end").

API::

    ov_model = convert_domain(net, domain, patch, batch)   # the fp32 graph
    patches = calibration_patches(model, domain, 64)       # list of (1, C, *patch) float32
    int8 = quantize_openvino(ov_model, patches)            # an ov.Model, INT8 weights and activations
    compiled = compile_for_cpu(int8)                       # or compile_for_cpu(ov_model, "bf16")
    check = check_int8(compile_for_cpu(ov_model), compiled, check_cases(model, domain), meta)
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from training.data.normalization import normalize
from training.errors import InputError
from training.infer.backends import OPENVINO_HINT, DomainNet, openvino_available
from training.infer.sliding_window import padding_for, tile_grid
from training.io.resample import (
    canonical_orientation,
    labels_on,
    needs_resampling,
    reorient_affine,
    reorient_array,
    resample,
    resampled_grid,
)

CALIBRATION_SEED = 3000  # synthetic calibration cases: disjoint from training (0), fitting (2000), held-out (1000)
PRECISIONS = ("f32", "bf16")  # OpenVINO's INFERENCE_PRECISION_HINT values we offer for fp graphs
NNCF_HINT = "pip install napari-u2net[openvino] (it brings NNCF)"


def nncf_available() -> bool:
    try:
        import nncf  # noqa: F401
    except ImportError:
        return False
    return True


# -- calibration data -----------------------------------------------------------------------------
def network_input(volume, meta) -> np.ndarray:
    """What the network sees of ``volume`` for a domain (``meta``: its AdapterMeta): canonical axes,
    the domain's spacing, its normalisation; (C, Z, Y, X) float32, as :func:`~training.infer.pipeline.predict`
    prepares it."""
    return _on_grid(volume, meta)[0]


def _on_grid(volume, meta, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`network_input`, and ``labels`` (on the volume's grid) brought onto the same grid."""
    orient = canonical_orientation(volume.affine)
    affine_c = reorient_affine(volume.affine, volume.shape, orient)
    data_c = reorient_array(volume.data, orient)
    labels_c = None if labels is None else reorient_array(labels[None], orient)[0]
    shape_c = tuple(data_c.shape[1:])
    if needs_resampling(affine_c, meta.spacing):
        grid_affine, grid_shape = resampled_grid(affine_c, shape_c, meta.spacing)
        image = np.stack([resample(c, affine_c, grid_affine, grid_shape) for c in data_c])
        if labels_c is not None:
            labels_c = resample(labels_c, affine_c, grid_affine, grid_shape, linear=False)
    else:
        image = np.ascontiguousarray(data_c, dtype=np.float32)
    return normalize(image, meta.normalization), None if labels_c is None else np.ascontiguousarray(labels_c)


def recipe_of(model) -> dict:
    """The build recipe in a model's provenance (size scales, MNI resolution); {} when none."""
    for meta in model.adapters.values():
        recipe = (meta.provenance or {}).get("recipe")
        if recipe:
            return recipe
    return {}


def synthetic_cases(domain: str, seed: int, count: int, recipe: dict | None = None) -> Iterator[tuple]:
    """``count`` (Volume, labels) of a shipped domain: the synthetic generator at the recipe's size
    scale, or the MNI152 template's case stream (test role) for ``mni152-brain``."""
    from training.data.mni152 import DOMAIN as BRAIN
    from training.data.synth import SYNTH_DOMAINS, case_seed, generate_case
    from training.io.volume import Volume

    recipe = recipe or {}
    if domain == BRAIN:
        from training.data.mni152 import TEST_ROLE, case_rng, load_mni152, make_case

        template, labels = load_mni152(float(recipe.get("mni_resolution_mm", 3.0)), 20.0)
        for i in range(count):
            image, lab = make_case(template, labels, case_rng(seed, TEST_ROLE, i))
            yield Volume(image[None].astype(np.float32), template.affine, source=f"mni152:{seed}:{i}"), lab
        return
    if domain not in SYNTH_DOMAINS:
        raise InputError(f"no synthetic data for domain {domain!r}: calibrate it on patches of your own images")
    scale = float((recipe.get("domain_size_scale") or {}).get(domain, recipe.get("size_scale", 0.75)))
    for i in range(count):
        yield generate_case(domain, case_seed(seed, i), scale)


def tiles_of(image: np.ndarray, patch: Sequence[int], overlap: float = 0.5) -> list[np.ndarray]:
    """Every sliding-window tile (1, C, *patch) of a normalised image, as inference visits them."""
    patch = tuple(int(p) for p in patch)
    pads = padding_for(image.shape[1:], patch)
    image = np.pad(image, [(0, 0), *pads])
    zs, ys, xs = tile_grid(image.shape[1:], patch, overlap)
    pz, py, px = patch
    return [np.ascontiguousarray(image[None, :, z : z + pz, y : y + py, x : x + px])
            for z in zs for y in ys for x in xs]


def calibration_patches(model, domain: str, count: int = 64, cases: int = 8,
                        seed: int = CALIBRATION_SEED, volumes: Sequence | None = None) -> list[np.ndarray]:
    """``count`` tiles (1, C, *patch) float32 of ``domain``'s calibration cases, drawn at random from
    the tiles of ``cases`` cases (inference's own tiling, so the activations' ranges are those it
    meets); fewer when the cases hold fewer tiles. ``volumes``: the user's scans (Volume) instead
    of synthetic cases, for domains that have none."""
    if count < 1 or cases < 1:
        raise InputError(f"calibration needs at least one patch and one case, got {count} and {cases}")
    if domain not in model.adapters:
        raise InputError(f"unknown domain {domain!r}; this model has: {', '.join(model.domains)}")
    meta = model.meta(domain)
    if volumes:
        for v in volumes:
            if v.data.shape[0] != meta.in_channels:
                raise InputError(f"{v.source}: {v.data.shape[0]} channel(s), domain {domain!r} takes "
                                 f"{meta.in_channels}: calibrate on scans of the kind it segments")
        sources = ((v, None) for v in volumes)
    else:
        sources = synthetic_cases(domain, seed, cases, recipe_of(model))
    tiles: list[np.ndarray] = []
    for volume, _ in sources:
        tiles.extend(tiles_of(network_input(volume, meta), meta.patch_size))
    pick = np.random.default_rng(seed).permutation(len(tiles))[:count]
    return [tiles[i] for i in sorted(pick)]


# -- graphs ---------------------------------------------------------------------------------------
def _openvino():
    if not openvino_available():
        raise InputError(f"the OpenVINO backend is not installed; {OPENVINO_HINT}")
    import openvino as ov

    return ov


def convert_domain(net: torch.nn.Module, domain: str, patch_size, batch_size: int = 1):
    """One domain's network as an fp32 OpenVINO ``Model`` for a fixed batch and patch."""
    ov = _openvino()
    in_channels = net.domain_config(domain).in_channels
    module = DomainNet(copy.deepcopy(net).to("cpu").float().eval(), domain).eval()
    example = torch.zeros((batch_size, in_channels, *(int(p) for p in patch_size)), dtype=torch.float32)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace", category=DeprecationWarning)
        return ov.convert_model(module, example_input=example, input=[example.shape])


def quantize_openvino(ov_model, patches: Sequence[np.ndarray], *, fast_bias_correction: bool = True):
    """Post-training INT8 quantisation (NNCF, symmetric "performance" preset) of an fp32 OpenVINO
    model, calibrated on ``patches`` (each shaped as the model's input); returns a new model."""
    if not nncf_available():
        raise InputError(f"INT8 quantisation needs NNCF; {NNCF_HINT}")
    import nncf

    if not patches:
        raise InputError("INT8 quantisation needs calibration patches, got none")
    batch = int(ov_model.inputs[0].get_partial_shape()[0].get_length())
    items = [np.ascontiguousarray(p, dtype=np.float32) for p in patches]
    if batch > 1:  # the graph is static: group the patches into full batches
        items = [np.concatenate(items[i : i + batch]) for i in range(0, len(items) - batch + 1, batch)]
    return nncf.quantize(ov_model, nncf.Dataset(items), preset=nncf.QuantizationPreset.PERFORMANCE,
                         subset_size=len(items), fast_bias_correction=fast_bias_correction)


def compile_for_cpu(ov_model, precision: str = "f32"):
    """Compile for the CPU. ``precision`` is the inference precision of floating-point parts
    ("f32", or "bf16" on CPUs with bf16 units); an INT8 model runs its quantised parts in INT8
    either way."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    ov = _openvino()
    return ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": precision})


# -- the check ------------------------------------------------------------------------------------
MAX_DICE_DROP = 0.005  # INT8 is kept only if it loses at most this much Dice (issue 19)
CHECK_SEED = 1000  # the synthetic held-out cases (README, bench_calibration.py), never calibrated on


@dataclass
class CheckCase:
    """One case of the check on the network's grid: its input (C, Z, Y, X) and, where known, the
    truth (Z, Y, X)."""

    image: np.ndarray
    truth: np.ndarray | None = None


def check_cases(model, domain: str, count: int = 4, volumes: Sequence | None = None,
                truth=None) -> list[CheckCase]:
    """The cases :func:`check_int8` runs: ``volumes`` (the user's scans; ``truth``: a label Volume of
    the last one, in the domain's class numbers), else ``count`` held-out synthetic cases
    (:data:`CHECK_SEED`) with their labels."""
    meta = model.meta(domain)
    if volumes:
        cases = [CheckCase(network_input(v, meta)) for v in volumes[:-1]]
        labels = None if truth is None else _labels_on(truth, volumes[-1], meta.num_classes)
        return [*cases, CheckCase(*_on_grid(volumes[-1], meta, labels))]
    return [CheckCase(*_on_grid(v, meta, lab)) for v, lab in
            synthetic_cases(domain, CHECK_SEED, count, recipe_of(model))]


def _labels_on(truth, volume, num_classes: int) -> np.ndarray:
    """``truth`` (a label Volume) on ``volume``'s grid, its values checked against the classes."""
    data = np.asarray(truth.data[0])
    if data.size and (np.any(data != np.round(data)) or data.min() < 0 or data.max() >= num_classes):
        raise InputError(f"{truth.source}: label values must be whole numbers 0…{num_classes - 1} (the domain's "
                         f"classes), found {data.min():g}…{data.max():g}")
    data = data.astype(np.uint8 if num_classes <= 256 else np.uint16)
    return labels_on(dataclasses.replace(truth, data=data[None]), volume)


@dataclass
class Int8Check:
    """How an INT8 graph did against its fp32 graph on the check's cases (:func:`check_int8`)."""

    drop: float  # Dice lost: against the truth where known, else 1 − agreement with fp32's labels
    reference: str  # "truth" or "f32 labels"
    agreement: float  # mean over cases and classes of the Dice between INT8's and fp32's labels
    cases: int
    speedup: float  # fp32 seconds / INT8 seconds over those cases
    accepted: bool
    why: str  # one line: the figures, and the reason when refused
    dice_f32: float | None = None  # against the truth
    dice_int8: float | None = None


def _dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in either (NaN when none is)."""
    scores = []
    for k in range(1, num_classes):
        p, t = pred == k, truth == k
        total = np.count_nonzero(p) + np.count_nonzero(t)
        if total:
            scores.append(2 * np.count_nonzero(p & t) / total)
    return float(np.mean(scores)) if scores else float("nan")


def case_labels(compiled, image: np.ndarray, meta, batch_size: int = 1) -> tuple[np.ndarray, float]:
    """A graph's labels of one case on the network's grid, as inference makes them (overlapping
    tiles, each class's usual components), and the seconds of the sweep."""
    from training.infer.backends import OpenVINORunner
    from training.infer.postprocess import keep_largest_components
    from training.infer.sliding_window import LabelSink, sweep_slabs

    runner = OpenVINORunner(compiled, batch_size, meta.num_classes)
    sink = LabelSink(image.shape[1:], meta.num_classes)
    start = time.perf_counter()
    sweep_slabs(runner, meta.domain, torch.from_numpy(image), meta.patch_size, [sink], batch_size=batch_size)
    seconds = time.perf_counter() - start
    labels = sink.result()
    keep_largest_components(labels, meta.kept_components)
    return labels, seconds


def check_int8(fp32_compiled, int8_compiled, cases: Sequence[CheckCase], meta, batch_size: int = 1,
               max_drop: float = MAX_DICE_DROP, min_speedup: float = 1.0) -> Int8Check:
    """Accept INT8 when it loses at most ``max_drop`` Dice on ``cases`` and is at least
    ``min_speedup`` times as fast as fp32. Where the truth is known the drop is Dice(fp32) −
    Dice(INT8) against it; without the truth fp32's labels stand in for it (drop = 1 − their
    agreement: where fp32 is right, INT8 loses exactly that)."""
    if not cases:
        raise InputError("the INT8 check needs cases, got none")
    warm = np.zeros((batch_size, cases[0].image.shape[0], *meta.patch_size), np.float32)
    for compiled in (fp32_compiled, int8_compiled):  # the first inference of a graph is slow
        compiled.create_infer_request().infer({0: warm})
    k = meta.num_classes
    ref_s = out_s = 0.0
    agreement, dice_ref, dice_out = [], [], []
    for case in cases:
        ref, s1 = case_labels(fp32_compiled, case.image, meta, batch_size)
        out, s2 = case_labels(int8_compiled, case.image, meta, batch_size)
        ref_s, out_s = ref_s + s1, out_s + s2
        agreement.append(_dice(out, ref, k))
        if case.truth is not None:
            dice_ref.append(_dice(ref, case.truth, k))
            dice_out.append(_dice(out, case.truth, k))
    speedup = ref_s / max(out_s, 1e-9)
    agree = float(np.nanmean(agreement)) if not np.isnan(agreement).all() else float("nan")
    truth = bool(dice_ref) and not np.isnan(dice_ref).all()
    if truth:
        d_ref, d_out = float(np.nanmean(dice_ref)), float(np.nanmean(dice_out))
        drop, reference = d_ref - d_out, "truth"
        figures = f"Dice {d_out:.4f} against f32's {d_ref:.4f} on {len(cases)} case(s)"
    else:
        d_ref = d_out = None
        drop, reference = 1.0 - agree, "f32 labels"
        figures = f"labels agree {agree:.4f} with f32's on {len(cases)} case(s)"
    figures += f", {speedup:.2f}× as fast"

    def result(accepted: bool, why: str) -> Int8Check:
        return Int8Check(drop, reference, agree, len(cases), speedup, accepted, why, d_ref, d_out)

    if np.isnan(drop):
        return result(False, "the check's cases show none of the domain's classes: calibrate on scans that show them")
    if drop > max_drop:
        return result(False, f"{figures}; loses {drop:.4f} Dice, more than {max_drop}")
    if speedup < min_speedup:
        return result(False, f"{figures}: not faster than f32 here" if min_speedup <= 1
                      else f"{figures}; needs {min_speedup}×")
    return result(True, figures)
