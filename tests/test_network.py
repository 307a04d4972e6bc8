import pytest
import torch

from training.commands.info import param_counts
from training.model.network import (
    ArchConfig,
    DomainConfig,
    U2Net,
    pool_counts_for_patch,
    strides_for,
)

from .conftest import SMALL_ARCH, small_net


def test_paper_parameter_counts_match_spec():
    counts = param_counts(16, 6)
    assert abs(counts["shared"] - 5.85e6) / 5.85e6 < 0.02
    # A 1-modality 2-class domain (heart in the paper's set).
    assert abs(counts["per_domain"]["heart"] - 144.6e3) / 144.6e3 < 0.02
    assert abs(counts["independent"] - 33.1e6) / 33.1e6 < 0.02
    assert set(counts["per_domain"]) == {"heart", "liver", "hippocampus", "prostate", "pancreas"}
    # More modalities or classes cost a few more adapter parameters, never shared ones.
    assert counts["per_domain"]["prostate"] > counts["per_domain"]["liver"] > counts["per_domain"]["heart"]


def test_shared_weights_are_only_pointwise_and_strided_convs():
    net = U2Net(ArchConfig(), [DomainConfig("a", 1, 2)])
    for name, p in net.trunk.named_parameters():
        assert p.ndim == 5
        k = tuple(p.shape[2:])
        assert k == (1, 1, 1) or (k == (3, 3, 3) and name.startswith("down.")), name
    depthwise = [m for m in net.adapters["a"].modules() if isinstance(m, torch.nn.Conv3d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms == []


@pytest.mark.parametrize(
    "shape,pools",
    [
        ((16, 16, 16), None),  # isotropic
        ((4, 32, 32), (1, 2, 2)),  # anisotropic: z pooled once only
        ((5, 17, 22), (1, 2, 2)),  # sizes that do not divide evenly still come back whole
    ],
)
def test_output_shape(shape, pools):
    net = U2Net(SMALL_ARCH, [DomainConfig("d", 2, 4, pools)])
    out = net(torch.randn(2, 2, *shape), "d")
    assert out.shape == (2, 4, *shape)
    assert torch.isfinite(out).all()


def test_anisotropic_pooling_keeps_z_resolution():
    net = U2Net(SMALL_ARCH, [DomainConfig("d", 1, 2, (0, 2, 2))])
    strides = strides_for((0, 2, 2), SMALL_ARCH.levels)
    assert strides == [(1, 2, 2), (1, 2, 2)]
    x = torch.randn(1, 1, 3, 16, 16)
    assert net(x, "d").shape == (1, 2, 3, 16, 16)
    assert pool_counts_for_patch((16, 128, 128), 6) == (2, 5, 5)
    assert pool_counts_for_patch((128, 128, 128), 6) == (5, 5, 5)


def test_domain_is_an_explicit_argument_and_domains_differ():
    net = small_net()
    net.add_domain("ct_b", 1, 2)
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        a, b = net(x, "ct"), net(x, "ct_b")
    assert not torch.equal(a, b)
    with pytest.raises(KeyError, match="unknown domain 'nope'.*ct, mr2"):
        net(x, "nope")
    with pytest.raises(ValueError, match=r"expects input \(N, 2"):
        net(x, "mr2")


def test_add_domain_init_from_copies_adapter():
    net = small_net()
    net.add_domain("copy", 1, 2, init_from="ct")
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x, "ct"), net(x, "copy"))
    # Different class count: heads are new, the rest is copied.
    net.add_domain("copy3", 1, 3, init_from="ct")
    src, dst = net.adapters["ct"], net.adapters["copy3"]
    assert torch.equal(src.input_conv.weight, dst.input_conv.weight)
    assert dst.heads["0"].weight.shape[0] == 3
    with pytest.raises(ValueError, match="already exists"):
        net.add_domain("ct", 1, 2)
    with pytest.raises(ValueError, match="invalid domain name"):
        net.add_domain("../evil", 1, 2)


def test_freeze_shared():
    net = small_net()
    net.freeze_shared()
    assert not any(p.requires_grad for p in net.trunk.parameters())
    assert all(p.requires_grad for p in net.adapters.parameters())
    net.freeze_shared(False)
    assert all(p.requires_grad for p in net.trunk.parameters())


def test_training_a_new_adapter_leaves_every_old_domain_bit_identical():
    """The defining invariant of the universal model."""
    net = small_net(seed=1)
    x_ct = torch.randn(1, 1, 12, 16, 16, generator=torch.Generator().manual_seed(5))
    x_mr = torch.randn(1, 2, 12, 16, 16, generator=torch.Generator().manual_seed(6))
    net.eval()
    with torch.no_grad():
        before = {"ct": net(x_ct, "ct").clone(), "mr2": net(x_mr, "mr2").clone()}
    trunk_before = {k: v.clone() for k, v in net.trunk.state_dict().items()}

    net.add_domain("new", 1, 2, init_from="ct")
    net.freeze_shared()
    opt = torch.optim.AdamW(net.adapter_parameters("new"), lr=1e-2, weight_decay=1e-2)
    target = (x_ct[:, 0] > 0).long()
    losses = []
    net.train()
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x_ct, "new"), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the new domain learned something
    assert all(p.grad is None for p in net.trunk.parameters())

    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x_ct, "ct"), before["ct"])
        assert torch.equal(net(x_mr, "mr2"), before["mr2"])
    for k, v in net.trunk.state_dict().items():
        assert torch.equal(v, trunk_before[k])


@pytest.mark.parametrize(
    "arch, patch, batch, in_channels",
    [(ArchConfig(8, 3), (16, 20, 18), 2, 2), (ArchConfig(16, 4), (12, 24, 20), 1, 1), (ArchConfig(4, 1), (6, 8, 8), 1, 1)],
)
def test_cpu_kernels_match_the_plain_modules(arch, patch, batch, in_channels):
    """The channels-last CPU path (custom depthwise backward, matmul pointwise, batch-norm
    statistics) computes what the plain modules compute: outputs and every gradient, in float64."""
    torch.manual_seed(0)
    net = U2Net(arch, [DomainConfig("d", in_channels, 3, pool_counts_for_patch(patch, arch.levels))]).double()
    for p in net.parameters():  # away from the initial values (ones, zeros), so every term counts
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(batch, in_channels, *patch, dtype=torch.float64)
    runs = []
    for fast in (True, False):
        net.cpu_kernels = fast
        net.zero_grad()
        out = net(x, "d")
        assert out.is_contiguous()
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        runs.append((out.detach(), {k: p.grad for k, p in net.named_parameters()}))
    (fast_out, fast_grads), (plain_out, plain_grads) = runs
    torch.testing.assert_close(fast_out, plain_out, rtol=1e-9, atol=1e-9)
    for name, grad in plain_grads.items():
        if grad is None:  # an output head the decoder never reaches at this depth
            assert fast_grads[name] is None
            continue
        if name.endswith(("input_conv.bias", "depthwise.bias")):
            # a bias right before an InstanceNorm has zero gradient: both are rounding noise
            assert fast_grads[name].abs().max() < 1e-9 * max(1.0, grad.abs().max().item()) + 1e-8
            continue
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-7, atol=1e-9, msg=name)


def test_depthwise_backward_is_the_true_gradient_for_any_channel_count():
    """40 channels: two full 16-channel chunks and a remainder of 8 for the weight gradient."""
    from training.model.cpu_kernels import _Depthwise, to_channels_last

    torch.manual_seed(0)
    x = to_channels_last(torch.randn(1, 40, 4, 5, 6, dtype=torch.float64)).requires_grad_()
    w = torch.randn(40, 1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_Depthwise.apply, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: _Depthwise.apply(x, w, None), (x, w))


def test_cpu_inference_is_exact_and_the_same_for_any_thread_count():
    """Inference takes InstanceNorm statistics in two passes: float32 outputs match the plain
    modules closely, and bit for bit whatever the number of threads (the plugin trains and runs
    with other thread counts than the CLI)."""
    torch.manual_seed(0)
    net = U2Net(ArchConfig(16, 3), [DomainConfig("d", 1, 3)]).eval()
    x = torch.randn(1, 1, 32, 96, 96) * 50 + 40
    threads = torch.get_num_threads()
    outs = []
    try:
        with torch.no_grad():
            for n in (1, 2):
                torch.set_num_threads(n)
                outs.append(net(x, "d"))
            net.cpu_kernels = False
            plain = net(x, "d")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], plain, rtol=1e-4, atol=1e-4)
