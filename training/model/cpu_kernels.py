"""The U²-Net's operations, tuned for the CPU: the whole network runs in channels-last layout.

PyTorch's CPU kernels for this network's shapes are far apart in speed (measured on 2 cores,
AVX-512, 1×32×64×128×128): the depthwise 3×3×3 conv is 5× faster forward in channels-last
(0.09 vs 0.43 s), but its backward there is slow (0.33 s for the input gradient, 0.93 s for the
weights) and layout round trips cost 0.08 + 0.20 s per tensor. Here every tensor stays
channels-last, and

* the depthwise input gradient is the forward conv with the flipped kernel (0.09 s);
* the depthwise weight gradient is taken 16 channels at a time (one AVX-512 vector: 0.42 s for
  32 channels, 0.06 instead of 0.26 s for 64 channels at 32×64×64);
* a 1×1×1 convolution is one matrix product over the channels (2.6–4× faster than oneDNN's conv,
  forward and backward);
* InstanceNorm of one sample goes through batch norm's channels-last kernels (``instance_norm``
  converts to contiguous and back).

The results equal the plain modules' up to float rounding (tested); the plain path stays the
reference for benchmarks and is what exporters and compilers trace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CL = torch.channels_last_3d
STATS_CHUNK_BYTES = 4 << 20  # a slab of rows for the variance pass (stays in cache)
WEIGHT_GRAD_CHUNK = 16  # channels per depthwise weight-gradient call (one AVX-512 vector of fp32)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CL)


class _Depthwise(torch.autograd.Function):
    """3×3×3 depthwise conv (stride 1, padding 1) on channels-last tensors with a fast backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=1, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = to_channels_last(grad)
        channels = weight.shape[0]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # The input gradient of a stride-1 "same" correlation is the correlation of the output
            # gradient with the kernel flipped in every spatial axis.
            grad_x = F.conv3d(grad, weight.flip((2, 3, 4)), None, padding=1, groups=channels)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            ws, bs = [], []
            for lo in range(0, channels, WEIGHT_GRAD_CHUNK):
                hi = min(lo + WEIGHT_GRAD_CHUNK, channels)
                g = grad if hi - lo == channels else to_channels_last(grad[:, lo:hi])
                xs = x if hi - lo == channels else to_channels_last(x[:, lo:hi])
                _, gw, gb = torch.ops.aten.convolution_backward(
                    g, xs, weight[lo:hi], [hi - lo] if ctx.has_bias else None, [1, 1, 1], [1, 1, 1],
                    [1, 1, 1], False, [0, 0, 0], hi - lo, [False, True, ctx.has_bias],
                )
                ws.append(gw)
                bs.append(gb)
            grad_w = torch.cat(ws)
            grad_b = torch.cat(bs) if ctx.has_bias else None
        return grad_x, grad_w, grad_b


def depthwise(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    return _Depthwise.apply(x, conv.weight, conv.bias)


def pointwise(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """A 1×1×1 conv as one matrix product: channels-last (N, Z, Y, X, C) @ (C, O)."""
    weight = conv.weight.flatten(1).t()
    rows = x.permute(0, 2, 3, 4, 1)
    if conv.bias is None:
        out = torch.matmul(rows, weight)
    else:
        out = torch.addmm(conv.bias, rows.reshape(-1, rows.shape[-1]), weight).view(*rows.shape[:-1], -1)
    return out.permute(0, 4, 1, 2, 3)


def _statistics(sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of one channels-last sample: two passes, the second
    over slabs of z rows small enough to stay in cache, summed in float64. Exact to 1e-7 and the
    same whatever the thread count (batch norm's training kernel is 7e-4 off on a 1-M-voxel
    channel and changes with the number of threads, so a label could too); 0.03 s for
    32×64×128×128 on 2 threads, where ``var_mean`` takes 0.18 s."""
    dims = (0, 2, 3, 4)
    mean = sample.mean(dim=dims)
    centre = mean.view(1, -1, 1, 1, 1)
    rows = max(1, STATS_CHUNK_BYTES // (sample[:, :, :1].numel() * sample.element_size()))
    acc = torch.zeros(mean.shape, dtype=torch.float64)
    for z0 in range(0, sample.shape[2], rows):
        acc += (sample[:, :, z0:z0 + rows] - centre).square_().sum(dim=dims, dtype=torch.float64)
    return mean, (acc / (sample.numel() // sample.shape[1])).to(sample.dtype)


def instance_norm(x: torch.Tensor, norm: nn.InstanceNorm3d) -> torch.Tensor:
    """InstanceNorm3d (affine, no running statistics) that keeps the channels-last layout: in
    training batch norm's training-mode kernel on one sample (its gradient included), in inference
    :func:`_statistics` and batch norm's elementwise kernel with them."""

    def one(sample: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (sample.requires_grad or norm.weight.requires_grad):
            return F.batch_norm(sample, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
        mean, var = _statistics(sample)
        return F.batch_norm(sample, mean, var, norm.weight, norm.bias, training=False, eps=norm.eps)

    if x.shape[0] == 1:
        return one(x)
    return torch.cat([one(s) for s in x.split(1)])
