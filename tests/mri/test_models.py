"""The prox and denoiser networks have the official GLEAM layer structure (D4 of issue 13):
parameter counts by formula, layer order, bias placement, and the forward pass against an
independent functional re-implementation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mri.models import MoDL, PlainCNN, ResidualCNN, UnrolledPGD


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def official_prox_count(features: int, num_resblocks: int, conv_dim: int) -> int:
    """ResBlock(2->F) with a 1x1 shortcut, (K-1) x ResBlock(F->F), final conv F->2 with bias.

    The residual blocks' 3x3 convolutions have no bias; the 1x1 shortcut and the final
    convolution have one (nn.Conv defaults in the official code).
    """
    k = 3**conv_dim
    first = k * 2 * features + k * features**2 + (2 * features + features)
    rest = (num_resblocks - 1) * 2 * k * features**2
    final = k * features * 2 + 2
    return first + rest + final


@pytest.mark.parametrize(
    "features, num_resblocks, conv_dim", [(100, 2, 2), (50, 2, 3), (8, 1, 2), (6, 3, 3)]
)
def test_prox_parameter_count_is_the_official_resnets(features, num_resblocks, conv_dim):
    prox = ResidualCNN(features, num_resblocks, conv_dim)
    assert count(prox) == official_prox_count(features, num_resblocks, conv_dim)


def test_prox_layers_are_bias_free_pre_activation_with_a_1x1_shortcut():
    prox = ResidualCNN(features=6, num_resblocks=2, conv_dim=2)
    first, second, final = prox.net
    for block in (first, second):
        relu1, conv1, relu2, conv2 = block.body
        assert isinstance(relu1, nn.ReLU) and isinstance(relu2, nn.ReLU)  # act, then conv
        assert conv1.bias is None and conv2.bias is None
        assert conv1.kernel_size == (3, 3) and conv1.padding_mode == "reflect"
    assert first.shortcut.kernel_size == (1, 1) and first.shortcut.bias is not None
    assert isinstance(second.shortcut, nn.Identity)
    assert final.kernel_size == (3, 3) and final.bias is not None


def test_prox_forward_matches_a_functional_reimplementation():
    torch.manual_seed(0)
    prox = ResidualCNN(features=5, num_resblocks=2, conv_dim=2)
    for p in prox.parameters():
        nn.init.normal_(p, std=0.3)  # biases non-zero too, so their placement matters
    x = torch.randn(2, 9, 7, dtype=torch.complex64)

    def conv3(h, w, b=None, mode="reflect"):
        if mode == "reflect":
            return F.conv2d(F.pad(h, (1, 1, 1, 1), mode="reflect"), w, b)
        return F.conv2d(h, w, b, padding=1)

    first, second, final = prox.net
    h = torch.stack((x.real, x.imag), dim=1)
    h1 = conv3(F.relu(conv3(F.relu(h), first.body[1].weight)), first.body[3].weight)
    h1 = h1 + F.conv2d(h, first.shortcut.weight, first.shortcut.bias)
    h2 = conv3(F.relu(conv3(F.relu(h1), second.body[1].weight)), second.body[3].weight) + h1
    out = conv3(h2, final.weight, final.bias, mode="zeros")
    want = x + torch.complex(out[:, 0], out[:, 1])
    torch.testing.assert_close(prox(x), want)


def test_modl_denoiser_is_the_official_bias_free_cnn():
    denoiser = PlainCNN(features=7, num_layers=5, conv_dim=3)
    convs = [m for m in denoiser.modules() if isinstance(m, nn.Conv3d)]
    assert len(convs) == 5 and all(c.bias is None for c in convs)
    assert all(c.padding_mode == "replicate" for c in convs)
    assert count(denoiser) == 27 * (2 * 7 + 3 * 7 * 7 + 7 * 2)


def test_unrolled_networks_do_not_share_weights_and_count_per_block():
    pgd = UnrolledPGD(num_unrolls=3, features=4, num_resblocks=2)
    modl = MoDL(num_unrolls=3, features=4, num_layers=3, learnable_mu=False)
    assert count(pgd) == 3 * official_prox_count(4, 2, 2)  # the fixed -2 step adds nothing
    assert len({id(b.prox.net[0].body[1].weight) for b in pgd}) == 3
    assert count(modl) == 3 * count(PlainCNN(4, 3, 2))
    learnable = UnrolledPGD(2, 4, 1, learnable_step=True)
    assert count(learnable) == 2 * (official_prox_count(4, 1, 2) + 1)


def test_spectral_conv_keeps_no_input_sized_tensor_for_its_norm():
    # The norm's gradient used to keep the power-iteration vector v and W v (two input-sized
    # tensors per convolution) until the backward: a checkpointed invertible MoDL step was a
    # third larger than a plain one. Now the forward saves the input and weight-sized tensors.
    from mri.invertible import _apply_conv, _SpectralConv

    torch.manual_seed(0)
    conv = _SpectralConv(2, 8, 8, bound=0.5)
    with torch.no_grad():
        conv.conv.weight.add_(0.3 * torch.randn_like(conv.conv.weight))  # norm above the bound
    x = torch.randn(1, 8, 24, 20)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = conv(x)
    input_sized = [n for n in saved if n >= x.numel()]
    assert len(input_sized) <= 2, saved  # the (padded) input of the convolution itself
    # Same value and gradient as autograd through ||W v|| with the same vector.
    out.square().sum().backward()
    grad = conv.conv.weight.grad.clone()
    conv.conv.weight.grad = None
    v = conv.top_singular_vector((24, 20))
    w = conv.conv.weight
    norm = torch.linalg.vector_norm(_apply_conv(v, w, conv.padding_mode))
    ref = _apply_conv(x, w * torch.clamp(0.5 / norm, max=1.0), conv.padding_mode)
    torch.testing.assert_close(out, ref)
    ref.square().sum().backward()
    torch.testing.assert_close(grad, conv.conv.weight.grad)


@pytest.mark.parametrize("frames", [8, 2])
def test_3d_prox_is_the_official_conv_then_relu_with_time_wrapped_circularly(frames):
    # The official 3D layers put each convolution before its ReLU and pad the first image
    # axis (time) circularly by 2K+1 before the network, cropping back after it; ours pads
    # each convolution circularly in time instead (no extra frames): the same function.
    torch.manual_seed(0)
    prox = ResidualCNN(features=4, num_resblocks=1, conv_dim=3)
    for p in prox.parameters():
        nn.init.normal_(p, std=0.3)
    (block, final) = prox.net
    conv1, relu1, conv2, relu2 = block.body
    assert isinstance(conv1, nn.Conv3d) and isinstance(relu2, nn.ReLU)  # conv, then act
    x = torch.randn(1, frames, 6, 5, dtype=torch.complex64)
    h = torch.stack((x.real, x.imag), dim=1)
    wrap = 3
    idx = torch.arange(-wrap, frames + wrap) % frames  # circular, however short the axis
    hp = h[:, :, idx]

    def conv(t, w, b=None, mode="replicate"):
        if mode == "replicate":
            return F.conv3d(F.pad(t, (1,) * 6, mode="replicate"), w, b)
        return F.conv3d(t, w, b, padding=1)

    body = F.relu(conv(F.relu(conv(hp, conv1.weight)), conv2.weight))
    h1 = body + F.conv3d(hp, block.shortcut.weight, block.shortcut.bias)
    out = conv(h1, final.weight, final.bias, mode="zeros")[:, :, wrap : wrap + frames]
    torch.testing.assert_close(prox(x), x + torch.complex(out[:, 0], out[:, 1]))
    # Rolling the frames rolls the output: no frame is an edge.
    torch.testing.assert_close(prox(x.roll(1, 1)), prox(x).roll(1, 1), rtol=1e-5, atol=1e-5)
