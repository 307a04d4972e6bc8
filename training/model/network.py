"""The universal 3D U²-Net: one shared trunk, one small adapter per domain.

Every stride-1 convolution is a *universal separable unit*: a per-domain depthwise 3×3×3
convolution (the domain's spatial correlations) followed by a shared pointwise 1×1×1
convolution (cross-channel correlations common to all domains), each followed by a
per-domain InstanceNorm. Only the strided downsampling convolutions and the pointwise
convolutions are shared; everything else lives in a :class:`DomainAdapter`.

The domain is an explicit ``forward`` argument (the original code kept it in a hidden global).
Shared and per-domain weights sit in two separate sub-modules (``trunk`` and ``adapters``), so
their state dicts are the trunk file and the adapter files with no key juggling.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.model import cpu_kernels

NEGATIVE_SLOPE = 0.01
DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ArchConfig:
    """Shape of the shared trunk: ``levels`` resolutions with ``base·2^i`` channels (capped)."""

    base_channels: int = 16
    levels: int = 6
    max_channels: int = 512

    def __post_init__(self) -> None:
        if self.levels < 1:
            raise ValueError(f"levels must be ≥ 1, got {self.levels}")
        if self.base_channels < 1 or self.max_channels < self.base_channels:
            raise ValueError(
                f"need 1 ≤ base_channels ≤ max_channels, got {self.base_channels}, "
                f"{self.max_channels}"
            )

    @property
    def channels(self) -> list[int]:
        return [min(self.base_channels * 2**i, self.max_channels) for i in range(self.levels)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ArchConfig:
        return cls(**{k: int(d[k]) for k in ("base_channels", "levels", "max_channels")})


@dataclass(frozen=True)
class DomainConfig:
    """What the network needs to know about a domain: its input, its outputs, its pooling.

    ``pool_counts`` is the number of 2× downsamplings per axis (z, y, x); an axis whose count is
    used up is no longer downsampled (stride 1), which suits anisotropic patches. ``None`` means
    ``levels - 1`` on every axis.
    """

    name: str
    in_channels: int
    num_classes: int
    pool_counts: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if not DOMAIN_NAME.match(self.name):
            raise ValueError(
                f"invalid domain name {self.name!r}: use 1–64 letters, digits, '_', '-' or '.', "
                "starting with a letter or digit"
            )
        if self.in_channels < 1:
            raise ValueError(f"domain {self.name!r}: in_channels must be ≥ 1")
        if self.num_classes < 2:
            raise ValueError(
                f"domain {self.name!r}: num_classes counts the background and must be ≥ 2"
            )
        if self.pool_counts is not None:
            counts = tuple(int(c) for c in self.pool_counts)
            if len(counts) != 3 or min(counts) < 0:
                raise ValueError(f"domain {self.name!r}: pool_counts must be three counts ≥ 0")
            object.__setattr__(self, "pool_counts", counts)


def strides_for(pool_counts: tuple[int, int, int] | None, levels: int) -> list[tuple[int, int, int]]:
    """Per-downsampling (z, y, x) strides: 2 while an axis still has pooling left, else 1."""
    counts = pool_counts if pool_counts is not None else (levels - 1,) * 3
    return [tuple(2 if step < c else 1 for c in counts) for step in range(levels - 1)]


def pool_counts_for_patch(patch_size, levels: int, min_size: int = 4) -> tuple[int, int, int]:
    """Pooling steps per axis so that no axis shrinks below ``min_size`` voxels (nnU-Net's rule)."""
    counts = []
    for size in patch_size:
        n = 0
        while n < levels - 1 and size / 2 ** (n + 1) >= min_size:
            n += 1
        counts.append(n)
    return tuple(counts)


class UnitAdapter(nn.Module):
    """Per-domain parts of one universal unit: depthwise conv and the two InstanceNorms."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.depthwise = nn.Conv3d(c_in, c_in, 3, padding=1, groups=c_in, bias=True)
        self.norm_in = nn.InstanceNorm3d(c_in, affine=True)
        self.norm_out = nn.InstanceNorm3d(c_out, affine=True)


class DomainAdapter(nn.Module):
    """All domain-specific parameters: ≈ 0.5 % of an independent 3D U-Net of the same shape."""

    def __init__(self, arch: ArchConfig, config: DomainConfig):
        super().__init__()
        ch = arch.channels
        self.config = config
        self.input_conv = nn.Conv3d(config.in_channels, ch[0], 3, padding=1, bias=True)
        self.input_norm = nn.InstanceNorm3d(ch[0], affine=True)
        self.encoder = nn.ModuleList(
            nn.ModuleList([UnitAdapter(c, c), UnitAdapter(c, c)]) for c in ch
        )
        self.down_norms = nn.ModuleList(nn.InstanceNorm3d(c, affine=True) for c in ch[1:])
        self.decoder = nn.ModuleList(
            nn.ModuleList(
                [UnitAdapter(ch[i + 1], ch[i]), UnitAdapter(2 * ch[i], ch[i]), UnitAdapter(ch[i], ch[i])]
            )
            for i in range(arch.levels - 1)
        )
        # Output head at full resolution and deep-supervision heads on the two decoder outputs
        # before it (levels 1 and 2, as in the original code); their logits are upsampled and
        # summed into the final output.
        self.heads = nn.ModuleDict(
            {str(i): nn.Conv3d(ch[i], config.num_classes, 1) for i in supervised_levels(arch.levels)}
        )


def supervised_levels(levels: int) -> list[int]:
    """Decoder levels with an output head, coarsest first."""
    return [i for i in (2, 1, 0) if i < levels]


class SharedTrunk(nn.Module):
    """Weights shared by every domain: strided downsampling convs and pointwise convs."""

    def __init__(self, arch: ArchConfig):
        super().__init__()
        ch = arch.channels
        self.encoder = nn.ModuleList(
            nn.ModuleList([nn.Conv3d(c, c, 1, bias=False), nn.Conv3d(c, c, 1, bias=False)])
            for c in ch
        )
        self.down = nn.ModuleList(
            nn.Conv3d(ch[i], ch[i + 1], 3, padding=1, bias=False) for i in range(arch.levels - 1)
        )
        self.decoder = nn.ModuleList(
            nn.ModuleList(
                [
                    nn.Conv3d(ch[i + 1], ch[i], 1, bias=False),
                    nn.Conv3d(2 * ch[i], ch[i], 1, bias=False),
                    nn.Conv3d(ch[i], ch[i], 1, bias=False),
                ]
            )
            for i in range(arch.levels - 1)
        )


def _act(x: torch.Tensor) -> torch.Tensor:
    # In place only without autograd: in training an in-place op on InstanceNorm's output (a view)
    # costs autograd a copy of the whole tensor (CopySlices), 13 % of an adapter step.
    return F.leaky_relu(x, NEGATIVE_SLOPE, inplace=not (torch.is_grad_enabled() and x.requires_grad))


def _tracing() -> bool:
    """Whether an exporter or compiler is tracing the network: they get the plain modules (the
    CPU kernels' custom backward and layout choices are for eager PyTorch)."""
    compiler = torch.compiler
    return bool(compiler.is_compiling() or getattr(compiler, "is_exporting", lambda: False)()
                or torch.jit.is_tracing())


class _Ops:
    """The network's stride-1 operations: plain modules, or on the CPU :mod:`.cpu_kernels`."""

    def __init__(self, cpu: bool):
        self.cpu = cpu

    def depthwise(self, x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
        return cpu_kernels.depthwise(x, conv) if self.cpu else conv(x)

    def pointwise(self, x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
        return cpu_kernels.pointwise(x, conv) if self.cpu else conv(x)

    def norm(self, x: torch.Tensor, norm: nn.InstanceNorm3d) -> torch.Tensor:
        return cpu_kernels.instance_norm(x, norm) if self.cpu else norm(x)

    def unit(self, x: torch.Tensor, a: UnitAdapter, pointwise: nn.Conv3d, act: bool = True) -> torch.Tensor:
        x = _act(self.norm(self.depthwise(x, a.depthwise), a.norm_in))
        x = self.norm(self.pointwise(x, pointwise), a.norm_out)
        return _act(x) if act else x


class U2Net(nn.Module):
    """3D U²-Net. ``forward(x, domain)`` with ``x`` of shape (N, C_domain, Z, Y, X)."""

    def __init__(self, arch: ArchConfig | None = None, domains: list[DomainConfig] = ()):
        super().__init__()
        self.arch = arch or ArchConfig()
        # On the CPU, run in channels-last with the kernels of cpu_kernels (2× faster training
        # steps); False keeps the plain modules everywhere (the benchmarks' reference).
        self.cpu_kernels = True
        self.trunk = SharedTrunk(self.arch)
        self.adapters = nn.ModuleDict()
        for d in domains:
            self.add_domain(d.name, d.in_channels, d.num_classes, pool_counts=d.pool_counts)

    # -- domains -------------------------------------------------------------------------
    @property
    def domains(self) -> list[str]:
        return list(self.adapters.keys())

    def domain_config(self, name: str) -> DomainConfig:
        return self._adapter(name).config

    def add_domain(
        self,
        name: str,
        in_channels: int,
        num_classes: int,
        init_from: str | None = None,
        pool_counts: tuple[int, int, int] | None = None,
        state: dict[str, torch.Tensor] | None = None,
    ) -> DomainAdapter:
        """Add a new domain's adapter; ``init_from`` copies every shape-compatible tensor from an
        existing domain (the output heads too when the class count matches). With ``state`` (a
        complete state dict, e.g. from a file) the adapter is built without random
        initialisation and takes those tensors."""
        if name in self.adapters:
            raise ValueError(f"domain {name!r} already exists in this model")
        config = DomainConfig(name, in_channels, num_classes, pool_counts)
        if state is not None:
            with torch.device("meta"):  # no wasted random init (it holds the GIL in GUI workers)
                adapter = DomainAdapter(self.arch, config)
            adapter.load_state_dict(state, assign=True)
            ref = next(self.trunk.parameters())
            self.adapters[name] = adapter.to(device=ref.device, dtype=ref.dtype)
            return adapter
        adapter = DomainAdapter(self.arch, config)
        if init_from is not None:
            source = self._adapter(init_from).state_dict()
            own = adapter.state_dict()
            copied = {k: v.clone() for k, v in source.items() if k in own and own[k].shape == v.shape}
            adapter.load_state_dict(copied, strict=False)
        ref = next(self.trunk.parameters())
        self.adapters[name] = adapter.to(device=ref.device, dtype=ref.dtype)
        return adapter

    def remove_domain(self, name: str) -> None:
        self._adapter(name)
        del self.adapters[name]

    def _adapter(self, name: str) -> DomainAdapter:
        if name not in self.adapters:
            known = ", ".join(self.adapters.keys()) or "none"
            raise KeyError(f"unknown domain {name!r}; this model has: {known}")
        return self.adapters[name]

    # -- freezing ------------------------------------------------------------------------
    def freeze_shared(self, frozen: bool = True) -> None:
        """Stop (or restart) gradients for every shared weight; adapters stay trainable."""
        for p in self.trunk.parameters():
            p.requires_grad_(not frozen)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self._adapter(name).parameters())

    # -- counting ------------------------------------------------------------------------
    def count_parameters(self) -> dict:
        shared = sum(p.numel() for p in self.trunk.parameters())
        per_domain = {n: sum(p.numel() for p in a.parameters()) for n, a in self.adapters.items()}
        return {"shared": shared, "per_domain": per_domain}

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        a = self._adapter(domain)
        cfg = a.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"domain {domain!r} expects input (N, {cfg.in_channels}, Z, Y, X), "
                f"got {tuple(x.shape)}"
            )
        t = self.trunk
        strides = strides_for(cfg.pool_counts, self.arch.levels)
        ops = _Ops(self.cpu_kernels and x.device.type == "cpu" and not _tracing())
        x = a.input_conv(x)
        if ops.cpu:
            x = cpu_kernels.to_channels_last(x)
        x = _act(ops.norm(x, a.input_norm))
        skips = []
        for i in range(self.arch.levels):
            if i > 0:
                x = F.conv3d(x, t.down[i - 1].weight, stride=strides[i - 1], padding=1)
                x = _act(ops.norm(x, a.down_norms[i - 1]))
            y = ops.unit(x, a.encoder[i][0], t.encoder[i][0])
            y = ops.unit(y, a.encoder[i][1], t.encoder[i][1], act=False)
            x = _act(x + y)
            skips.append(x)

        logits = None
        heads = supervised_levels(self.arch.levels)
        for i in range(self.arch.levels - 2, -1, -1):
            skip = skips[i]
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = ops.unit(x, a.decoder[i][0], t.decoder[i][0])
            x = torch.cat([x, skip], dim=1)
            x = ops.unit(x, a.decoder[i][1], t.decoder[i][1])
            x = ops.unit(x, a.decoder[i][2], t.decoder[i][2])
            if i in heads:
                out = ops.pointwise(x, a.heads[str(i)])
                if logits is not None:
                    out = out + F.interpolate(logits, size=out.shape[2:], mode="nearest")
                logits = out
        if logits is None:  # a single-level network: the head sits on the encoder output
            logits = ops.pointwise(x, a.heads["0"])
        return logits.contiguous()


class FullConvUNet(nn.Module):
    """A plain residual 3D U-Net of the same shape with full 3×3×3 convolutions.

    Not part of the product: it is the "independent model" the U²-Net is compared against in
    parameter counts and speed benchmarks (what a user would otherwise run, one per domain).
    """

    def __init__(self, arch: ArchConfig, in_channels: int = 1, num_classes: int = 2):
        super().__init__()
        ch = arch.channels
        self.levels = arch.levels

        def block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.InstanceNorm3d(c_out, affine=True),
                nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
            )

        self.input = block(in_channels, ch[0])
        self.encoder = nn.ModuleList(nn.Sequential(block(c, c), block(c, c)) for c in ch)
        self.down = nn.ModuleList(block(ch[i], ch[i + 1], 2) for i in range(arch.levels - 1))
        # Standard 3D U-Net decoder: upsample, concatenate the skip, two convolutions.
        self.decoder = nn.ModuleList(
            nn.Sequential(block(ch[i + 1] + ch[i], ch[i]), block(ch[i], ch[i]))
            for i in range(arch.levels - 1)
        )
        self.head = nn.Conv3d(ch[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input(x)
        skips = []
        for i in range(self.levels):
            if i > 0:
                x = self.down[i - 1](x)
            x = x + self.encoder[i](x)
            skips.append(x)
        for i in range(self.levels - 2, -1, -1):
            x = F.interpolate(x, size=skips[i].shape[2:], mode="nearest")
            x = self.decoder[i](torch.cat([x, skips[i]], dim=1))
        return self.head(x)
