"""Inference speed and memory, ours vs MONAI's ``sliding_window_inference`` (docs/inference.md).

Speed: the paper's network (base 16, 6 levels) on a 1×128×256×256 float32 volume already at the
domain's spacing, patch 64×128×128, overlap 0.5. MONAI in its default usage (the network as
plain PyTorch modules, contiguous layout, one tile per batch) on the same network and on a plain full-convolution 3D U-Net of the same
shape; ours with each backend we offer (compiled and OpenVINO: first run incl. conversion +
compilation into an empty cache folder, and warm: a fresh in-memory cache that loads the graph
from disk, as a new napari session would). Memory: a tiny network (one 3×3×3 convolution) on
a CT-sized 1×300×512×512 volume, 2 classes: peak resident memory above the process's baseline
(after imports, model load, one warm-up tile and creating the input volume) while turning the
volume into labels, each measurement in a fresh subprocess.

    python bench/bench_inference.py            # the documented cases (minutes on a small CPU)
    python bench/bench_inference.py --quick    # smaller volumes, for trying things out

Prints a table, then one JSON line per case (speed: one per backend).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATCH = (64, 128, 128)
OVERLAP = 0.5  # the documented case's, for MONAI and us alike
SPEED_SHAPE = (1, 128, 256, 256)
SPEED_SHAPE_QUICK = (1, 64, 160, 160)
MEMORY_SHAPE = (1, 300, 512, 512)
MEMORY_SHAPE_QUICK = (1, 150, 256, 256)


# -- helpers ------------------------------------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Samples resident memory every 2 ms and checks ``ru_maxrss`` for spikes in between."""

    def __enter__(self):
        self.baseline = rss_mb()
        self.maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if maxrss > self.maxrss_before:  # a new lifetime peak happened during the run
            self.peak = max(self.peak, maxrss)
        self.above_baseline = self.peak - self.baseline


def paper_net(arch_base=16, levels=6):
    import torch

    from training.model.network import ArchConfig, DomainConfig, U2Net

    torch.manual_seed(0)
    return U2Net(ArchConfig(arch_base, levels), [DomainConfig("bench", 1, 2)]).eval()


def tiny_net():
    """One 3×3×3 convolution: the memory case measures the engines' buffers, not activations
    (those are the same for both), and a real network would take hours on a small CPU."""
    import torch
    from torch import nn

    from training.model.network import DomainConfig

    class OneConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 3, padding=1)

        def domain_config(self, name):
            return DomainConfig(name, 1, 2)

        def forward(self, x, domain="bench"):
            return self.conv(x)

    torch.manual_seed(0)
    return OneConv().eval()


def monai_run(fn, image, overlap=OVERLAP):
    import torch
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        return sliding_window_inference(image[None], PATCH, 1, fn, overlap=overlap, mode="gaussian")[0]


# -- speed --------------------------------------------------------------------------------------
def speed_case(quick: bool, backends: list[str]) -> list[dict]:
    import torch

    from training.infer.backends import COMPILED_CACHE, OPENVINO_CACHE, openvino_available
    from training.infer.sliding_window import count_tiles, sliding_window
    from training.model.network import ArchConfig, FullConvUNet

    shape = SPEED_SHAPE_QUICK if quick else SPEED_SHAPE
    net = paper_net()
    image = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    tiles = count_tiles(shape[1:], PATCH, OVERLAP)
    print(f"speed: U2Net base 16 / 6 levels, volume {shape}, patch {PATCH}, overlap {OVERLAP}, "
          f"{tiles} tiles, {torch.get_num_threads()} torch threads", flush=True)

    net.cpu_kernels = False  # a MONAI user's network: the plain PyTorch modules
    t = time.perf_counter()
    ref = torch.softmax(monai_run(lambda x: net(x, "bench"), image), 0)
    monai_s = time.perf_counter() - t
    net.cpu_kernels = True
    print(f"  MONAI default (U2Net)            {monai_s:8.1f} s", flush=True)

    rows = []
    for backend in backends:
        if backend == "openvino" and not openvino_available():
            print("  openvino: not installed, skipped")
            continue
        OPENVINO_CACHE.clear()
        COMPILED_CACHE.clear()
        t = time.perf_counter()
        probs = sliding_window(net, "bench", image, PATCH, overlap=OVERLAP, device="cpu", backend=backend)
        first = time.perf_counter() - t
        warm = first
        if backend in ("openvino", "compiled"):  # the second run loads the compiled graph from disk
            OPENVINO_CACHE.clear()
            COMPILED_CACHE.clear()
            t = time.perf_counter()
            probs = sliding_window(net, "bench", image, PATCH, overlap=OVERLAP, device="cpu", backend=backend)
            warm = time.perf_counter() - t
        diff = (probs - ref).abs().max().item()
        agree = (probs.argmax(0) == ref.argmax(0)).float().mean().item()
        print(f"  ours {backend:<8} first run {first:8.1f} s, warm {warm:8.1f} s  "
              f"(max |Δp| vs MONAI {diff:.1e}, argmax agreement {100 * agree:.3f} %)", flush=True)
        rows.append({"backend": backend, "ours_s": warm, "first_s": first, "agreement": agree})
        del probs

    full = FullConvUNet(ArchConfig(16, 6)).eval()
    t = time.perf_counter()
    monai_run(full, image)
    full_conv_s = time.perf_counter() - t
    print(f"  MONAI default (full-conv U-Net)  {full_conv_s:8.1f} s", flush=True)

    out = []
    for r in rows:
        out.append({
            "bench": "inference_speed",
            "ours_s": round(r["ours_s"], 2),
            "monai_s": round(monai_s, 2),
            "speedup": round(monai_s / r["ours_s"], 2),
            "full_conv_s": round(full_conv_s, 2),
            "backend": r["backend"],
            "first_s": round(r["first_s"], 2),
        })
        if r["backend"] == "torch":  # issue 19's goal for what MPS and compiler-less machines run
            out.append({"bench": "eager", "speedup_vs_monai": round(monai_s / r["ours_s"], 2),
                        "ours_s": round(r["ours_s"], 2), "monai_s": round(monai_s, 2),
                        "argmax_agreement": round(r["agreement"], 6), "threads": torch.get_num_threads()})
        print(f"  {r['backend']}: speedup {monai_s / r['ours_s']:.2f}× over MONAI, "
              f"{full_conv_s / r['ours_s']:.2f}× over the full-conv U-Net "
              f"(first run incl. warm-up {r['first_s']:.1f} s)")
    return out


# -- memory -------------------------------------------------------------------------------------
def memory_worker(which: str, quick: bool) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import numpy as np
    import torch

    from training.infer.backends import TorchRunner
    from training.infer.sliding_window import LabelSink, sweep_slabs

    shape = MEMORY_SHAPE_QUICK if quick else MEMORY_SHAPE
    net = tiny_net()
    image = torch.from_numpy(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    runner = TorchRunner(net, "bench", torch.device("cpu"))
    with torch.no_grad():  # warm-up: the math libraries' own buffers are nobody's engine cost
        net(torch.zeros((1, 1, *PATCH)))
        runner(torch.zeros((1, 1, *PATCH)))
    t = time.perf_counter()
    with PeakRSS() as m:
        if which == "ours":
            sink = LabelSink(shape[1:], runner.num_classes)
            sweep_slabs(runner, "bench", image, PATCH, [sink], overlap=OVERLAP)
            labels = sink.result()
        else:
            out = monai_run(lambda x: net(x, "bench"), image)
            labels = np.empty(shape[1:], dtype=np.uint8)
            for z in range(0, shape[1], 16):  # argmax in slabs: don't charge MONAI an int64 volume
                labels[z : z + 16] = out[:, z : z + 16].argmax(0).numpy()
            del out
    print(json.dumps({"which": which, "mb": m.above_baseline, "s": time.perf_counter() - t,
                      "foreground": float((labels == 1).mean())}))


def memory_case(quick: bool) -> dict:
    shape = MEMORY_SHAPE_QUICK if quick else MEMORY_SHAPE
    volume_mb = 4 * int(__import__("math").prod(shape)) / 2**20
    print(f"memory: one-conv network, volume {shape} float32 ({volume_mb:.0f} MB), patch {PATCH}",
          flush=True)
    res = {}
    for which in ("ours", "monai"):
        cmd = [sys.executable, __file__, "--memory-worker", which] + (["--quick"] if quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res[which] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {which:<6} peak above baseline {res[which]['mb']:8.0f} MB  ({res[which]['s']:.1f} s)",
              flush=True)
    return {
        "bench": "inference_memory",
        "ours_mb": round(res["ours"]["mb"], 1),
        "monai_mb": round(res["monai"]["mb"], 1),
        "ratio": round(res["ours"]["mb"] / res["monai"]["mb"], 3),
        "volume_mb": round(volume_mb, 1),
    }


# -- preparing the fast path (training.infer.prepare) ---------------------------------------------
def prepare_case() -> list[dict]:
    """Per shipped domain of the bundled model: converting it to OpenVINO into an empty cache
    (``seconds_first``), getting it again from the disk cache in a fresh in-memory cache
    (``seconds_cached``), and the tiles from which converting before a run pays off
    (conversion / (eager tile − OpenVINO tile)): what ``PAYS_OFF_TILES`` rests on."""
    import math

    import torch

    from training.infer.backends import OPENVINO_CACHE, TorchRunner, make_runner, openvino_available
    from training.infer.prepare import prepare_domain
    from training.model.modelfile import load_model
    from training.model.registry import resolve_model

    if not openvino_available():
        print("skipped: prepare (openvino is not installed)")
        return []
    model = load_model(resolve_model(None))
    lines = []
    print(f"prepare: bundled model, {torch.get_num_threads()} torch threads", flush=True)
    for d in model.domains:
        meta = model.meta(d)
        x = torch.randn(1, meta.in_channels, *meta.patch_size)
        first = prepare_domain(model, d)
        OPENVINO_CACHE.clear()
        cached = prepare_domain(model, d)
        ov = make_runner(model.net, d, "openvino", torch.device("cpu"), patch_size=meta.patch_size)  # in memory now
        eager = TorchRunner(model.net, d, torch.device("cpu"))

        def per_tile(run, n=3, x=x):
            run(x)
            t = time.perf_counter()
            for _ in range(n):
                run(x)
            return (time.perf_counter() - t) / n

        eager_s, ov_s = per_tile(eager), per_tile(ov, 5)
        OPENVINO_CACHE.clear()
        pays = math.ceil(first.seconds / max(eager_s - ov_s, 1e-6))
        print(f"  {d:<16} patch {tuple(meta.patch_size)} first {first.seconds:6.1f} s, cached "
              f"{cached.seconds:5.2f} s; a tile: eager {eager_s:5.2f} s, OpenVINO {ov_s:5.3f} s: pays off from "
              f"{pays} tiles", flush=True)
        lines.append({"bench": "prepare", "domain": d, "seconds_first": round(first.seconds, 2),
                      "seconds_cached": round(cached.seconds, 3), "eager_tile_s": round(eager_s, 3),
                      "openvino_tile_s": round(ov_s, 4), "pays_off_tiles": pays})
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller volumes (not the documented figures)")
    p.add_argument("--case", choices=["speed", "memory", "prepare", "all"], default="all")
    p.add_argument("--backends", default="torch,compiled,openvino",
                   help="comma-separated (default torch,compiled,openvino)")
    p.add_argument("--memory-worker", choices=["ours", "monai"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.quick)
        return
    import tempfile

    # compiled graphs go to an empty cache folder: the first run pays the compilation honestly
    home = tempfile.mkdtemp(prefix="bench_inference_home_")
    os.environ["U2NET_HOME"] = home
    lines = []
    if args.case in ("memory", "all"):
        lines.append(memory_case(args.quick))
    if args.case in ("speed", "all"):
        lines.extend(speed_case(args.quick, args.backends.split(",")))
    if args.case in ("prepare", "all"):
        lines.extend(prepare_case())
    import shutil

    shutil.rmtree(home, ignore_errors=True)
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
