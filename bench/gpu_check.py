"""GPU readiness in one script (issue 19, item 7): ≤ 8 minutes on one CUDA GPU. Prints JSON lines.

1. ``gpu_inference``: the paper's network (base 16, 6 levels) over a CT-sized volume
   (1×300×512×512, patch 64×128×128, overlap 0.5, 4 tiles a batch) with float16 mixed
   precision: our sweep (labels on the CPU) against MONAI's ``sliding_window_inference`` (the
   same autocast, batch and network; argmax on the GPU, labels to the CPU), voxels/s each.
2. ``gpu_oom_fallback``: a real out-of-memory, not a mock: ``predict`` with the bundled
   ``spleen-ct`` domain and a batch of more tiles than the GPU can hold (sized from a measured
   per-tile peak and the GPU's memory, ×3; the volume is made wide enough that one row of tiles is
   that batch). The sweep must halve the batch until it fits and finish; the labels are checked
   against a run with the default batch, and torch's own count of out-of-memory errors must be > 0.
3. ``gpu_train_step``: a paper-scale training step (6 levels, 128³ patches, batch 2, float16
   autocast with a gradient scaler, Dice + CE): seconds per step and peak GPU memory.
4. ``gpu_torchrun``: ``torchrun --standalone --nproc_per_node=1`` running this script's worker,
   which joins an NCCL process group (an all-reduce checks it) and runs ``u2net train`` for a few
   iterations on a small synthetic dataset on the GPU.

Without CUDA it prints ``skipped: no CUDA device`` and exits 0. ``--dry-run`` runs every step on
the CPU at a tiny size (gloo instead of NCCL, no out-of-memory to provoke), to check the script.

    python bench/gpu_check.py [--dry-run] [--skip STEP,...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = ("inference", "oom", "train", "torchrun")
FULL = {"volume": (1, 300, 512, 512), "patch": (64, 128, 128), "base": 16, "levels": 6, "batch": 4,
        "train_patch": (128, 128, 128), "train_batch": 2, "train_steps": 3, "train_iterations": 6}
DRY = {"volume": (1, 64, 96, 96), "patch": (64, 64, 64), "base": 4, "levels": 6, "batch": 2,
       "train_patch": (64, 64, 64), "train_batch": 1, "train_steps": 1, "train_iterations": 2}
OVERLAP = 0.5
MAX_BATCH_CPU_MB = 32_000  # the huge batch is stacked on the host before it goes to the GPU


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paper_net(base: int, levels: int, device):
    import torch

    from training.model.network import ArchConfig, DomainConfig, U2Net

    torch.manual_seed(0)
    return U2Net(ArchConfig(base, levels), [DomainConfig("bench", 1, 2)]).to(device).eval()


def synth_volume(shape, seed: int = 0):
    """A CT-sized float32 image (C, Z, Y, X): smooth blobs in noise (what the timing sees is the
    size; the content only has to be finite and varied)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    c, z, y, x = shape
    coarse = torch.randn((1, c, max(z // 16, 2), max(y // 16, 2), max(x // 16, 2)), generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(z, y, x), mode="trilinear", align_corners=False)[0]
    return (smooth + 0.1 * torch.randn(shape, generator=g)).float()


# -- 1. inference ---------------------------------------------------------------------------------
def inference_line(cfg: dict, device) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    from training.infer.backends import TorchRunner
    from training.infer.sliding_window import LabelSink, count_tiles, sweep_slabs

    net = paper_net(cfg["base"], cfg["levels"], device)
    image = synth_volume(cfg["volume"])
    patch, batch = cfg["patch"], cfg["batch"]
    voxels = math.prod(image.shape[1:])
    tiles = count_tiles(image.shape[1:], patch, OVERLAP)

    def ours():
        runner = TorchRunner(net, "bench", device, amp=True)
        sink = LabelSink(image.shape[1:], 2)
        sweep_slabs(runner, "bench", image, patch, [sink], overlap=OVERLAP, batch_size=batch)
        return sink.result()

    def monai():
        x = image[None].to(device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            out = sliding_window_inference(x, patch, batch, lambda t: net(t, "bench"), overlap=OVERLAP, mode="gaussian")
        return out[0].argmax(0).to(torch.uint8).cpu().numpy()

    times, labels = {}, {}
    for name, fn in (("ours", ours), ("monai", monai), ("ours", ours), ("monai", monai)):  # 2nd run: warm
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t = time.perf_counter()
        labels[name] = fn()
        _sync(device)
        times[name] = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        times[name + "_peak_mb"] = peak
        _log(f"inference {name}: {times[name]:.2f} s, peak GPU {peak} MB")
    agree = float((labels["ours"] == labels["monai"]).mean())
    return {"bench": "gpu_inference", "device": str(device), "shape": list(image.shape), "patch": list(patch),
            "tiles": tiles, "batch": batch, "amp": "float16" if device.type == "cuda" else "none",
            "ours_s": round(times["ours"], 3), "monai_s": round(times["monai"], 3),
            "ours_voxels_per_s": round(voxels / times["ours"]), "monai_voxels_per_s": round(voxels / times["monai"]),
            "speedup_vs_monai": round(times["monai"] / times["ours"], 2),
            "ours_peak_gpu_mb": times["ours_peak_mb"], "monai_peak_gpu_mb": times["monai_peak_mb"],
            "label_agreement": round(agree, 5)}


# -- 2. out-of-memory fall-back -------------------------------------------------------------------
def oom_line(dry: bool, device) -> dict:
    import torch

    from training.infer.pipeline import InferenceConfig, predict
    from training.io.folders import bundled_model_dir
    from training.io.volume import Volume
    from training.model.modelfile import load_model

    domain = "spleen-ct"
    model = load_model(bundled_model_dir(), domains=[domain])
    meta = model.meta(domain)
    pz, py, px = (int(p) for p in meta.patch_size)
    if dry:
        per_tile_mb, batch = None, 4
    else:  # the marginal cost of one tile at the peak, measured; a batch of 3× the GPU's memory
        net = model.net.to(device).eval()
        peaks = {}
        for b in (8, 24):
            x = torch.zeros((b, meta.in_channels, pz, py, px), device=device)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                net(x, domain)
            peaks[b] = torch.cuda.max_memory_allocated(device)
            del x
        per_tile_mb = max((peaks[24] - peaks[8]) / 16 / 2**20, 1.0)
        model.net.to("cpu")
        torch.cuda.empty_cache()
        total_mb = torch.cuda.get_device_properties(device).total_memory / 2**20
        batch = math.ceil(3 * total_mb / per_tile_mb)
        tile_mb = meta.in_channels * pz * py * px * 4 / 2**20  # a float32 tile, stacked on the CPU first
        batch = min(batch, int(MAX_BATCH_CPU_MB / tile_mb))  # the host's memory bounds the experiment
    # one row of tiles (one z start) holding ``batch`` tiles: n × n in-plane starts
    n = math.ceil(math.sqrt(batch))
    step_y, step_x = int(py * (1 - OVERLAP)), int(px * (1 - OVERLAP))
    shape = (pz, py + step_y * (n - 1), px + step_x * (n - 1))
    rng = np.random.default_rng(0)
    data = rng.normal(40.0, 30.0, (1, *shape)).astype(np.float32)  # HU-like; spacing = the domain's
    data[:, :, shape[1] // 3 : shape[1] // 2, shape[2] // 3 : shape[2] // 2] -= 40.0
    affine = np.diag([*meta.spacing, 1.0])
    volume = Volume(data, affine)
    ooms_before = torch.cuda.memory_stats(device).get("num_ooms", 0) if device.type == "cuda" else 0
    t = time.perf_counter()
    config = InferenceConfig(device=str(device), batch_size=batch, postprocess=False)  # the sweep is the point
    labels = predict(model, volume, [domain], config)[domain].labels
    seconds = time.perf_counter() - t
    ooms = (torch.cuda.memory_stats(device).get("num_ooms", 0) if device.type == "cuda" else 0) - ooms_before
    reference = predict(model, volume, [domain], InferenceConfig(device=str(device), postprocess=False))[domain].labels
    same = float((labels == reference).mean())
    _log(f"oom fall-back: batch {batch} ({per_tile_mb} MB a tile), shape {shape}, {ooms} OOM errors, "
         f"{seconds:.1f} s, agreement with the default batch {same:.6f}")
    return {"bench": "gpu_oom_fallback", "device": str(device), "asked_batch": batch, "shape": list(shape),
            "per_tile_mb": None if per_tile_mb is None else round(per_tile_mb, 1), "oom_errors": int(ooms),
            "finished": True, "seconds": round(seconds, 2), "agreement_with_default_batch": round(same, 6),
            "ok": bool((dry or ooms > 0) and same > 0.999)}


# -- 3. training step -----------------------------------------------------------------------------
def train_line(cfg: dict, device) -> dict:
    import torch

    from training.model.network import ArchConfig, DomainConfig, U2Net
    from training.train.losses import make_loss

    torch.manual_seed(0)
    net = U2Net(ArchConfig(cfg["base"], cfg["levels"]), [DomainConfig("bench", 1, 2)]).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    loss_fn = make_loss("dice_ce")
    shape = (cfg["train_batch"], 1, *cfg["train_patch"])
    x = torch.randn(shape, device=device)
    y = (torch.rand((shape[0], *shape[2:]), device=device) > 0.7).long()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = loss_fn(net(x, "bench"), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach().item()

    step()  # warm-up: cuDNN picks its algorithms
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t = time.perf_counter()
    losses = [step() for _ in range(cfg["train_steps"])]
    _sync(device)
    seconds = (time.perf_counter() - t) / cfg["train_steps"]
    peak = round(torch.cuda.max_memory_allocated(device) / 2**20) if cuda else None
    params = sum(p.numel() for p in net.parameters())
    _log(f"train step: {seconds:.3f} s, peak {peak} MB, losses {losses}")
    return {"bench": "gpu_train_step", "device": str(device), "levels": cfg["levels"], "base": cfg["base"],
            "patch": list(cfg["train_patch"]), "batch": cfg["train_batch"], "amp": "float16" if cuda else "none",
            "seconds_per_step": round(seconds, 3), "peak_gpu_mb": peak, "parameters": params,
            "finite_loss": bool(all(math.isfinite(v) for v in losses))}


# -- 4. torchrun ----------------------------------------------------------------------------------
def torchrun_worker(dataset: str, out: str, iterations: int, dry: bool) -> None:
    """Inside torchrun: join a process group (NCCL on the GPU), all-reduce, then ``u2net train``."""
    import torch
    import torch.distributed as dist

    from training.commands.cli import main as cli_main

    backend = "gloo" if dry else "nccl"
    if not dry:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    t = torch.ones(4, device="cpu" if dry else "cuda") * (dist.get_rank() + 1)
    dist.all_reduce(t)
    ok = bool(t.sum().item() == 4 * sum(range(1, dist.get_world_size() + 1)))
    print(json.dumps({"process_group": backend, "world_size": dist.get_world_size(), "all_reduce_ok": ok}), flush=True)
    args = ["train", dataset, "-o", out, "--iterations", str(iterations), "--device", "cpu" if dry else "cuda",
            "--quiet", "--patch-size", "16", "32", "32", "--batch-size", "2", "--levels", "3", "--base-channels", "8"]
    try:
        rc = cli_main(args)
    finally:
        dist.destroy_process_group()
    sys.exit(rc)


def torchrun_line(cfg: dict, dry: bool) -> dict:
    from training.data.synth import write_dataset

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        dataset = write_dataset(Path(tmp) / "spleen", "spleen-ct", 4, 0, size_scale=0.5)
        out = Path(tmp) / "model"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
               "--torchrun-worker", str(dataset), str(out), str(cfg["train_iterations"])] + (["--dry-run"] if dry else [])
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
        seconds = time.perf_counter() - t
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        group = next((x for x in lines if "process_group" in x), {})
        summary = next((x for x in reversed(lines) if "iterations" in x), {})
        written = (out / "trunk.safetensors").is_file()
    if proc.returncode != 0:
        _log(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {"bench": "gpu_torchrun", "rc": proc.returncode, "process_group": group.get("process_group"),
            "all_reduce_ok": group.get("all_reduce_ok"), "iterations": summary.get("iterations"),
            "loss": summary.get("loss"), "model_written": written, "seconds": round(seconds, 1),
            "ok": bool(proc.returncode == 0 and group.get("all_reduce_ok") and written)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at a tiny size (checks the script)")
    p.add_argument("--skip", default="", help=f"comma-separated steps to leave out ({', '.join(STEPS)})")
    p.add_argument("--torchrun-worker", nargs=3, metavar=("DATASET", "OUT", "ITERATIONS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torchrun_worker:
        dataset, out, iterations = args.torchrun_worker
        torchrun_worker(dataset, out, int(iterations), args.dry_run)
        return 0
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(STEPS)
    if unknown:
        p.error(f"unknown step(s) {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}")

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    cfg = DRY if args.dry_run else FULL
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        _log(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    lines = []
    started = time.perf_counter()
    steps = {"inference": lambda: inference_line(cfg, device), "oom": lambda: oom_line(args.dry_run, device),
             "train": lambda: train_line(cfg, device), "torchrun": lambda: torchrun_line(cfg, args.dry_run)}
    for name in STEPS:
        if name in skip:
            continue
        t = time.perf_counter()
        try:
            line = steps[name]()
        except Exception as e:  # noqa: BLE001 - one failed check must not hide the others' figures
            line = {"bench": f"gpu_{name}", "error": f"{type(e).__name__}: {e}"[:500], "ok": False}
        line["step_s"] = round(time.perf_counter() - t, 1)
        if args.dry_run:
            line["dry_run"] = True
        lines.append(line)
        print(json.dumps(line), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _log(f"all steps in {time.perf_counter() - started:.0f} s")
    return 0 if all(line.get("ok", True) for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
