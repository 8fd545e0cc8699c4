"""Unrolled reconstruction networks (PGD and MoDL) built as plain sequences of blocks.

Every block is called ``block(x, meas)`` with a complex image ``x`` and a
[`Measurement`][mri.physics.Measurement], so `GreedyWrapper` can cut a model into
stages anywhere. Convolutions see the real and imaginary parts as two channels; with
``conv_dim=3`` they run over ``(D, H, W)`` volumes or ``(T, H, W)`` cine series.
"""

from __future__ import annotations

from torch import Tensor, nn

from mri._layers import (
    _check_image,
    _check_num_layers,
    _check_positive_int,
    _conv,
    _edge_padding,
    _plain_layers,
    channels_to_complex,
    complex_to_channels,
)
from mri.dc import ConjugateGradientDC, GradientStepDC, _check_meas
from mri.invertible import FixedPointError, InvertibleResidualCNN  # noqa: F401 (old import path)
from mri.physics import Measurement

__all__ = [
    "complex_to_channels",
    "channels_to_complex",
    "ResidualCNN",
    "PlainCNN",
    "PGDBlock",
    "MoDLBlock",
    "UnrolledPGD",
    "MoDL",
    "complex_l1_loss",
]


class _TimeWrapConv3d(nn.Conv3d):
    """A 3x3x3 'same' convolution padded circularly along the first axis (time) and by
    ``padding_mode`` (replicate or zeros) along the other two.

    Equal, on the frames it returns, to the official 3D GLEAM network, which pads time
    circularly by its receptive field once around the whole network and crops afterwards;
    padding each convolution instead keeps the activations at the series' own length.
    """

    def forward(self, x: Tensor) -> Tensor:
        half = self.kernel_size[0] // 2
        x = nn.functional.pad(x, (0, 0, 0, 0, half, half), mode="circular")
        spatial = (half, half, half, half, 0, 0)
        if self.padding_mode == "zeros":
            x = nn.functional.pad(x, spatial)
        else:
            x = nn.functional.pad(x, spatial, mode=self.padding_mode)
        return nn.functional.conv3d(x, self.weight, self.bias)


class _ResBlock(nn.Module):
    """``body(h) + shortcut(h)`` with two bias-free 3x3 convolutions in ``body``.

    As in the official GLEAM layers: in 2D each convolution follows its ReLU (ReLU, conv,
    ReLU, conv: pre-activation), in 3D each precedes it (conv, ReLU, conv, ReLU). The shortcut
    is the identity when the widths match, else a 1x1 convolution (with bias).
    """

    def __init__(self, cin: int, cout: int, conv_dim: int) -> None:
        super().__init__()
        if conv_dim == 2:
            pad = _edge_padding(conv_dim)
            conv1 = _conv(conv_dim, cin, cout, bias=False, padding_mode=pad)
            conv2 = _conv(conv_dim, cout, cout, bias=False, padding_mode=pad)
            self.body = nn.Sequential(nn.ReLU(), conv1, nn.ReLU(), conv2)
        else:
            conv1 = _TimeWrapConv3d(cin, cout, 3, bias=False, padding_mode="replicate")
            conv2 = _TimeWrapConv3d(cout, cout, 3, bias=False, padding_mode="replicate")
            self.body = nn.Sequential(conv1, nn.ReLU(), conv2, nn.ReLU())
        self.shortcut = nn.Identity() if cin == cout else _conv(conv_dim, cin, cout, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.body(h) + self.shortcut(h)


class ResidualCNN(nn.Module):
    """The proximal network of unrolled PGD: the official GLEAM ResNet on complex images.

    ``x + final(resblock_K(... resblock_1(x)))`` on the two real channels of ``x``:
    ``resblock_1`` maps 2 -> ``features`` channels with a 1x1-convolution shortcut, the
    other ``num_resblocks - 1`` map ``features`` -> ``features`` with an identity shortcut;
    each has two bias-free 3x3 convolutions, after their ReLUs in 2D and before them in 3D;
    ``final`` is a 3x3 conv ``features`` -> 2 with bias. No normalisation. In 3D (2D+time or
    volumes) every convolution pads the first image axis circularly, which equals the official
    3D network (time padded circularly by ``2 num_resblocks + 1`` around the whole network,
    cropped after) without its extra frames: a cardiac cycle wraps around, so the first
    frame's neighbours include the last. With ``features = F`` and 3x3
    kernels (``k = 9`` taps in 2D, 27 in 3D) one prox has
    ``k(2F + F^2) + 3F + (num_resblocks - 1) 2kF^2 + 2kF + 2`` parameters: 273 902 for
    ``F = 100`` in 2D, 208 052 for ``F = 50`` in 3D (see docs/paper-configs.md).

    Args:
        features: channels of the hidden convolutions.
        num_resblocks: residual blocks before the final convolution.
        conv_dim: 2 for slices ``(B, H, W)``, 3 for ``(B, D|T, H, W)``.
    """

    def __init__(self, features: int = 64, num_resblocks: int = 2, conv_dim: int = 2) -> None:
        super().__init__()
        _check_positive_int("features", features)
        _check_positive_int("num_resblocks", num_resblocks)
        self.conv_dim = conv_dim
        final = _conv(2, features, 2) if conv_dim == 2 else _TimeWrapConv3d(features, 2, 3)
        self.net = nn.Sequential(
            _ResBlock(2, features, conv_dim),
            *[_ResBlock(features, features, conv_dim) for _ in range(num_resblocks - 1)],
            final,
        )

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.conv_dim)
        return x + channels_to_complex(self.net(complex_to_channels(x)))


class PlainCNN(nn.Module):
    """MoDL's denoiser: ``x + f(x)``, ``f`` = ``num_layers`` bias-free 3x3 convs with ReLUs.

    The layer structure of the official GLEAM MoDL denoiser (its ``RevNet``): convolutions
    2 -> F -> ... -> F -> 2 without bias, reflection padding in 2D and replication in 3D,
    a ReLU between consecutive convolutions, and the input added back.

    Args:
        features: channels of the hidden convolutions.
        num_layers: convolutions in total (MoDL uses 5).
        conv_dim: 2 for slices, 3 for volumes or cine.
    """

    def __init__(self, features: int = 64, num_layers: int = 5, conv_dim: int = 2) -> None:
        super().__init__()
        _check_positive_int("features", features)
        _check_num_layers(num_layers)
        pad = _edge_padding(conv_dim)
        self.conv_dim = conv_dim
        self.net = _plain_layers(
            features,
            num_layers,
            conv_dim,
            lambda cin, cout: _conv(conv_dim, cin, cout, bias=False, padding_mode=pad),
        )

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.conv_dim)
        return x + channels_to_complex(self.net(complex_to_channels(x)))


class PGDBlock(nn.Module):
    """One unroll of proximal gradient descent: a gradient DC step, then the learned prox."""

    def __init__(self, dc: nn.Module, prox: nn.Module) -> None:
        super().__init__()
        self.dc = dc
        self.prox = prox

    def forward(self, x: Tensor, meas: Measurement) -> Tensor:
        return self.prox(self.dc(x, meas))


class MoDLBlock(nn.Module):
    """One unroll of MoDL: the learned denoiser, then conjugate-gradient data consistency."""

    def __init__(self, denoiser: nn.Module, dc: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.dc = dc

    def forward(self, x: Tensor, meas: Measurement) -> Tensor:
        # Check against the physics first: the denoiser would accept a wrongly shaped image.
        _check_meas("MoDLBlock", meas, x)
        return self.dc(self.denoiser(x), meas)

    def inverse(self, y: Tensor, meas: Measurement) -> Tensor:
        """Recover the block's input from its output (needs an invertible denoiser)."""
        if not hasattr(self.denoiser, "inverse"):
            raise TypeError(
                f"MoDLBlock.inverse: the denoiser {type(self.denoiser).__name__} is not "
                "invertible; build MoDL(..., invertible=True)"
            )
        return self.denoiser.inverse(self.dc.inverse(y, meas))


class _Unrolled(nn.Sequential):
    """A sequence of ``block(x, meas)`` modules; calling it runs them all."""

    def forward(self, x: Tensor, meas: Measurement) -> Tensor:  # type: ignore[override]
        for block in self:
            x = block(x, meas)
        return x


class UnrolledPGD(_Unrolled):
    """Unrolled proximal gradient descent (the GLEAM paper's main network).

    Each of the ``num_unrolls`` blocks is ``x <- prox(x + t * A^H(A x - y))`` with the step
    ``t = -2`` (fixed, as in the official GLEAM code; learnable with
    ``learnable_step=True``) and a [`ResidualCNN`][mri.models.ResidualCNN] prox; blocks do not
    share weights.

    Example:
        >>> model = UnrolledPGD(num_unrolls=8, features=100, num_resblocks=2)
        >>> recon = model(meas.zero_filled(), meas)
        >>> gw = GreedyWrapper(model, splits=8, loss=complex_l1_loss)

    Args:
        num_unrolls: the number of blocks N.
        features: channels of the prox's hidden convolutions.
        num_resblocks: residual blocks per prox.
        conv_dim: 2 for 2D slices, 3 for volumes or 2D+time.
        step_size: the gradient step (negative; see
            [`GradientStepDC`][mri.dc.GradientStepDC]); its initial value if learnable.
        learnable_step: train the step of each block (meddlr's default) instead of fixing it.
    """

    def __init__(
        self,
        num_unrolls: int = 8,
        features: int = 64,
        num_resblocks: int = 2,
        conv_dim: int = 2,
        step_size: float = -2.0,
        learnable_step: bool = False,
    ) -> None:
        _check_positive_int("num_unrolls", num_unrolls)
        super().__init__(
            *[
                PGDBlock(
                    GradientStepDC(step_size, learnable=learnable_step),
                    ResidualCNN(features, num_resblocks, conv_dim),
                )
                for _ in range(num_unrolls)
            ]
        )


class MoDL(_Unrolled):
    """MoDL (Aggarwal et al.): a CNN denoiser and conjugate-gradient DC, unrolled.

    Each block is ``x <- (A^H A + mu I)^{-1}(A^H y + mu * D(x))`` with a 5-layer CNN ``D``
    ([`PlainCNN`][mri.models.PlainCNN], the official GLEAM MoDL denoiser).
    Blocks do not share weights (so any split is valid for greedy training).

    Args:
        num_unrolls: the number of blocks N.
        features: channels of the denoiser's hidden convolutions.
        num_layers: convolutions per denoiser.
        cg_iters: conjugate-gradient iterations per DC step.
        mu: the regularisation weight of the DC step (its initial value if learnable).
        conv_dim: 2 for 2D slices, 3 for volumes or 2D+time.
        cg_tol: relative residual tolerance of CG.
        invertible: use `InvertibleResidualCNN` denoisers, so that every block has an
            ``inverse`` and the network can be trained by inversion (MEL).
        learnable_mu: train ``mu`` (kept positive; see
            [`ConjugateGradientDC`][mri.dc.ConjugateGradientDC]) instead of fixing it.
    """

    def __init__(
        self,
        num_unrolls: int = 8,
        features: int = 64,
        num_layers: int = 5,
        cg_iters: int = 10,
        mu: float = 0.05,
        conv_dim: int = 2,
        cg_tol: float = 1e-6,
        invertible: bool = False,
        learnable_mu: bool = True,
    ) -> None:
        _check_positive_int("num_unrolls", num_unrolls)

        def denoiser() -> nn.Module:
            if invertible:
                return InvertibleResidualCNN(features, num_layers, conv_dim)
            return PlainCNN(features, num_layers, conv_dim)

        super().__init__(
            *[
                MoDLBlock(
                    denoiser(),
                    ConjugateGradientDC(
                        mu, learnable_mu=learnable_mu, max_iter=cg_iters, tol=cg_tol
                    ),
                )
                for _ in range(num_unrolls)
            ]
        )


def complex_l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean magnitude of the complex error, ``mean |pred - target|`` (the paper's loss)."""
    if pred.shape != target.shape:
        raise ValueError(
            f"complex_l1_loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
            "must have the same shape"
        )
    return (pred - target).abs().mean()
