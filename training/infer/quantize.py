"""INT8 and BF16 for the OpenVINO backend: post-training quantisation of a domain's graph (NNCF).

Quantising needs no training, only a few dozen *calibration* inputs that look like what
inference feeds the network: tiles of normalised images at the domain's spacing. For the shipped
domains they come from the synthetic generator (:func:`training.data.synth.generate_case`) and the
MNI152 template's case stream, drawn with :data:`CALIBRATION_SEED` (never trained on, never used to
fit the temperatures, never used for held-out Dice). A domain is only worth quantising when its
Dice holds and it runs faster: ``bench/bench_int8.py`` measures both per domain (figures in the
README, "Benchmarks: end to end").

API (what a backend calls; nothing here is wired into :mod:`training.infer.backends` yet)::

    ov_model = convert_domain(net, domain, patch, batch)   # the fp32 graph
    patches = calibration_patches(model, domain, 64)       # list of (1, C, *patch) float32
    int8 = quantize_openvino(ov_model, patches)            # an ov.Model, INT8 weights and activations
    compiled = compile_for_cpu(int8)                       # or compile_for_cpu(ov_model, "bf16")
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from training.data.normalization import normalize
from training.errors import InputError
from training.infer.backends import OPENVINO_HINT, DomainNet, openvino_available
from training.infer.sliding_window import padding_for, tile_grid
from training.io.resample import (
    canonical_orientation,
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
    orient = canonical_orientation(volume.affine)
    affine_c = reorient_affine(volume.affine, volume.shape, orient)
    data_c = reorient_array(volume.data, orient)
    shape_c = tuple(data_c.shape[1:])
    if needs_resampling(affine_c, meta.spacing):
        grid_affine, grid_shape = resampled_grid(affine_c, shape_c, meta.spacing)
        image = np.stack([resample(c, affine_c, grid_affine, grid_shape) for c in data_c])
    else:
        image = np.ascontiguousarray(data_c, dtype=np.float32)
    return normalize(image, meta.normalization)


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
                        seed: int = CALIBRATION_SEED) -> list[np.ndarray]:
    """``count`` tiles (1, C, *patch) float32 of ``domain``'s calibration cases, drawn at random from
    the tiles of ``cases`` cases (inference's own tiling, so the activations' ranges are those it
    meets); fewer when the cases hold fewer tiles."""
    if count < 1 or cases < 1:
        raise InputError(f"calibration needs at least one patch and one case, got {count} and {cases}")
    if domain not in model.adapters:
        raise InputError(f"unknown domain {domain!r}; this model has: {', '.join(model.domains)}")
    meta = model.meta(domain)
    tiles: list[np.ndarray] = []
    for volume, _ in synthetic_cases(domain, seed, cases, recipe_of(model)):
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
