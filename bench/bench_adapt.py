"""Training-step benchmarks (each mode in its own subprocess, so that its peak memory is its own).

* ``adapt_step`` (the Fine-tune panel's bottleneck): one adapter-only step at the panel's CPU
  defaults (batch 1, the whole-scan patch it picks for the real abdominal CT, 64×100×120) on the
  bundled model's trunk shape (base 16, 4 levels), with the network's CPU kernels
  (``training.model.cpu_kernels``) and ``before``: the same step with the plain PyTorch modules.
  The same seed drives both, so their losses show the learning curve is the same.
* ``adapter_vs_full``: adapter-only vs full training step on the paper's network (base 16,
  6 levels, five domains).

Each mode runs in its own subprocess so that peak memory is its own: on CUDA the peak of
``torch.cuda.max_memory_allocated``, on the CPU the growth of the peak RSS (ru_maxrss) over the
process's RSS after building the network. Patch: 64×128×128 on a GPU; 32×64×64 on the CPU
(override with --patch Z Y X). Last line: a JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEACH_PATCH = [64, 100, 120]  # what the panel picks for the real CT (122×101×112 voxels of 3 mm)
PAPER_DOMAINS = [("heart", 1, 2), ("liver", 1, 3), ("hippocampus", 1, 3), ("prostate", 2, 3), ("pancreas", 1, 3)]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def teach_worker(kernels: bool, patch: list[int], steps: int) -> dict:
    """Adapter-only steps as the Fine-tune panel takes them on a CPU; ``kernels`` False = plain modules."""
    import torch

    sys.path.insert(0, str(ROOT))
    from training.model.network import ArchConfig, DomainConfig, U2Net, pool_counts_for_patch
    from training.train.config import TEACH_BATCH, TEACH_LR
    from training.train.losses import make_loss

    torch.manual_seed(0)
    arch = ArchConfig(16, 4)
    net = U2Net(arch, [DomainConfig("abdomen", 1, 5)])
    net.add_domain("new", 1, 2, init_from="abdomen", pool_counts=pool_counts_for_patch(patch, arch.levels))
    net.cpu_kernels = kernels
    net.freeze_shared()
    for name in net.domains:
        for p in net.adapter_parameters(name):
            p.requires_grad_(name == "new")
    opt = torch.optim.AdamW(net.adapter_parameters("new"), lr=TEACH_LR)
    loss_fn = make_loss("dice_ce")
    batch = TEACH_BATCH["cpu"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, *patch, generator=g)
    y = (torch.nn.functional.avg_pool3d(x, 5, 1, 2)[:, 0] > 0.05).long()  # a learnable target
    base_rss = _rss_mb()
    losses, times = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = loss_fn(net(x, "new"), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms the allocator and creates the optimizer state
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    import resource

    return {"step_s": statistics.median(times), "losses": losses, "batch": batch,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss}


def worker(mode: str, patch: list[int], steps: int, device: str) -> dict:
    import resource

    import torch

    sys.path.insert(0, str(ROOT))
    from training.model.network import ArchConfig, DomainConfig, U2Net, pool_counts_for_patch
    from training.train.losses import make_loss

    dev = torch.device(device)
    torch.manual_seed(0)
    arch = ArchConfig()
    net = U2Net(arch, [DomainConfig(n, c, k) for n, c, k in PAPER_DOMAINS])
    net.add_domain("spleen", 1, 2, init_from="liver", pool_counts=pool_counts_for_patch(patch, arch.levels))
    net.to(dev)
    if mode == "adapter":
        for p in net.parameters():
            p.requires_grad_(False)
        params = net.adapter_parameters("spleen")
        for p in params:
            p.requires_grad_(True)
    else:
        params = list(net.trunk.parameters()) + net.adapter_parameters("spleen")
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = make_loss("dice_ce")
    x = torch.randn(2, 1, *patch, device=dev)
    y = (torch.rand(2, *patch, device=dev) > 0.7).long()
    base_rss = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_gpu = torch.cuda.memory_allocated(dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = net(x, "spleen")
        loss = loss_fn(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocator, optimizer state)
    times = []
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - base_gpu) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    trainable = sum(p.numel() for p in params)
    return {"mode": mode, "step_s": statistics.median(times), "peak_mb": peak, "trainable": trainable}


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def teach_case(steps: int) -> dict:
    patch = TEACH_PATCH
    fast = _run(["--worker", "teach", "--steps", str(steps), "--patch", *map(str, patch)])
    plain = _run(["--worker", "teach-plain", "--steps", str(steps), "--patch", *map(str, patch)])
    drift = max(abs(a - b) for a, b in zip(fast["losses"], plain["losses"]))
    print(f"adapter step at the panel's CPU defaults, patch {'x'.join(map(str, patch))}, batch {fast['batch']}, "
          f"median of {steps}: {fast['step_s']:.2f} s with the CPU kernels, {plain['step_s']:.2f} s with plain "
          f"modules ({plain['step_s'] / fast['step_s']:.2f}×); losses {[round(v, 4) for v in fast['losses']]} vs "
          f"{[round(v, 4) for v in plain['losses']]}")
    return {
        "bench": "adapt_step", "seconds_per_iteration": round(fast["step_s"], 3), "before": round(plain["step_s"], 3),
        "ratio": round(fast["step_s"] / plain["step_s"], 3), "patch": patch, "batch": fast["batch"],
        "loss_max_diff": round(drift, 6), "peak_mb": round(fast["peak_mb"]), "before_peak_mb": round(plain["peak_mb"]),
    }


def full_case(device: str, patch: list[int] | None, steps: int) -> dict:
    patch = patch or ([64, 128, 128] if device.startswith("cuda") else [32, 64, 64])
    results = {}
    for mode in ("adapter", "full"):
        results[mode] = _run(["--worker", mode, "--device", device, "--steps", str(steps), "--patch", *map(str, patch)])
    a, f = results["adapter"], results["full"]
    mem = "GPU peak allocated" if device.startswith("cuda") else "peak RSS growth"
    print(f"device {device}, patch {'x'.join(map(str, patch))}, batch 2, median of {steps} steps; memory = {mem}")
    print(f"{'mode':<10}{'trainable':>12}{'step s':>10}{'memory MB':>12}")
    for r in (a, f):
        print(f"{r['mode']:<10}{r['trainable']:>12,}{r['step_s']:>10.3f}{r['peak_mb']:>12.0f}")
    return {
        "bench": "adapter_vs_full",
        "device": device,
        "patch": patch,
        "adapter_s": round(a["step_s"], 4),
        "full_s": round(f["step_s"], 4),
        "speedup": round(f["step_s"] / a["step_s"], 3),
        "adapter_mb": round(a["peak_mb"], 1),
        "full_mb": round(f["peak_mb"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["teach", "full", "all"], default="all")
    ap.add_argument("--device", default="auto", help="for the adapter-vs-full case")
    ap.add_argument("--patch", type=int, nargs=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", choices=["adapter", "full", "teach", "teach-plain"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker in ("teach", "teach-plain"):
        print(json.dumps(teach_worker(args.worker == "teach", args.patch, args.steps)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.patch, args.steps, device)))
        return
    lines = []
    if args.case in ("teach", "all"):
        lines.append(teach_case(args.steps))
    if args.case in ("full", "all"):
        lines.append(full_case(device, args.patch, args.steps))
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
