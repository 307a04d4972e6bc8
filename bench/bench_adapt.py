"""Adapter-only vs full training step on the paper's network (base 16, 6 levels, five domains).

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
PAPER_DOMAINS = [("heart", 1, 2), ("liver", 1, 3), ("hippocampus", 1, 3), ("prostate", 2, 3), ("pancreas", 1, 3)]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--patch", type=int, nargs=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", choices=["adapter", "full"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    patch = args.patch or ([64, 128, 128] if device.startswith("cuda") else [32, 64, 64])
    if args.worker:
        print(json.dumps(worker(args.worker, patch, args.steps, device)))
        return
    results = {}
    for mode in ("adapter", "full"):
        cmd = [sys.executable, __file__, "--worker", mode, "--device", device, "--steps", str(args.steps),
               "--patch", *map(str, patch)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    a, f = results["adapter"], results["full"]
    mem = "GPU peak allocated" if device.startswith("cuda") else "peak RSS growth"
    print(f"device {device}, patch {'x'.join(map(str, patch))}, batch 2, median of {args.steps} steps; memory = {mem}")
    print(f"{'mode':<10}{'trainable':>12}{'step s':>10}{'memory MB':>12}")
    for r in (a, f):
        print(f"{r['mode']:<10}{r['trainable']:>12,}{r['step_s']:>10.3f}{r['peak_mb']:>12.0f}")
    print(json.dumps({
        "bench": "adapt_step",
        "device": device,
        "patch": patch,
        "adapter_s": round(a["step_s"], 4),
        "full_s": round(f["step_s"], 4),
        "speedup": round(f["step_s"] / a["step_s"], 3),
        "adapter_mb": round(a["peak_mb"], 1),
        "full_mb": round(f["peak_mb"], 1),
    }))


if __name__ == "__main__":
    main()
