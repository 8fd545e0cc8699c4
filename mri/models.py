"""Unrolled reconstruction networks (PGD and MoDL) built as plain sequences of blocks.

Every block is called ``block(x, meas)`` with a complex image ``x`` and a
:class:`~mri.physics.Measurement`, so :class:`greedywrap.GreedyWrapper` can cut a model into
stages anywhere. Convolutions see the real and imaginary parts as two channels; with
``conv_dim=3`` they run over ``(D, H, W)`` volumes or ``(T, H, W)`` cine series.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mri.dc import ConjugateGradientDC, GradientStepDC, _check_meas
from mri.physics import Measurement

__all__ = [
    "complex_to_channels",
    "channels_to_complex",
    "ResidualCNN",
    "PlainCNN",
    "InvertibleResidualCNN",
    "PGDBlock",
    "MoDLBlock",
    "UnrolledPGD",
    "MoDL",
    "complex_l1_loss",
]


def complex_to_channels(x: Tensor) -> Tensor:
    """``(B, *spatial)`` complex -> ``(B, 2, *spatial)`` real (real and imaginary parts)."""
    if not x.is_complex():
        raise TypeError(f"expected a complex image (B, *spatial), got dtype {x.dtype}")
    return torch.stack((x.real, x.imag), dim=1)


def channels_to_complex(x: Tensor) -> Tensor:
    """``(B, 2, *spatial)`` real -> ``(B, *spatial)`` complex."""
    if x.shape[1] != 2:
        raise ValueError(f"expected 2 channels (real, imaginary) in dim 1, got {tuple(x.shape)}")
    real, imag = x[:, 0], x[:, 1]
    if real.dtype not in (torch.float32, torch.float64):  # e.g. bf16 under autocast
        real, imag = real.float(), imag.float()
    return torch.complex(real, imag)


def _conv(conv_dim: int, cin: int, cout: int) -> nn.Module:
    if conv_dim not in (2, 3):
        raise ValueError(f"conv_dim: got {conv_dim!r}; expected 2 (slices) or 3 (volumes, cine)")
    cls = nn.Conv2d if conv_dim == 2 else nn.Conv3d
    return cls(cin, cout, kernel_size=3, padding=1)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: got {value!r}; expected a positive int")


class _ResBlock(nn.Module):
    def __init__(self, features: int, conv_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), _conv(conv_dim, features, features), nn.ReLU(),
            _conv(conv_dim, features, features),
        )  # fmt: skip

    def forward(self, h: Tensor) -> Tensor:
        return h + self.body(h)


class ResidualCNN(nn.Module):
    """The proximal network of unrolled PGD: a residual CNN on complex images.

    ``x + conv_out(resblocks(conv_in(x)))`` where each residual block is ReLU, conv, ReLU,
    conv plus a skip connection; no normalisation (as in GLEAM's and meddlr's networks).

    Args:
        features: channels of the hidden convolutions.
        num_resblocks: residual blocks between the input and output convolutions.
        conv_dim: 2 for slices ``(B, H, W)``, 3 for ``(B, D|T, H, W)``.
    """

    def __init__(self, features: int = 64, num_resblocks: int = 2, conv_dim: int = 2) -> None:
        super().__init__()
        _check_positive_int("features", features)
        _check_positive_int("num_resblocks", num_resblocks)
        self.conv_dim = conv_dim
        self.net = nn.Sequential(
            _conv(conv_dim, 2, features),
            *[_ResBlock(features, conv_dim) for _ in range(num_resblocks)],
            nn.ReLU(),
            _conv(conv_dim, features, 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.conv_dim)
        return x + channels_to_complex(self.net(complex_to_channels(x)))


class PlainCNN(nn.Module):
    """MoDL's denoiser: ``num_layers`` convolutions with ReLUs in between, plus a skip.

    Args:
        features: channels of the hidden convolutions.
        num_layers: convolutions in total (MoDL uses 5).
        conv_dim: 2 for slices, 3 for volumes or cine.
    """

    def __init__(self, features: int = 64, num_layers: int = 5, conv_dim: int = 2) -> None:
        super().__init__()
        _check_positive_int("features", features)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
            raise ValueError(f"num_layers: got {num_layers!r}; expected an int >= 2")
        self.conv_dim = conv_dim
        layers: list[nn.Module] = [_conv(conv_dim, 2, features)]
        for _ in range(num_layers - 2):
            layers += [nn.ReLU(), _conv(conv_dim, features, features)]
        layers += [nn.ReLU(), _conv(conv_dim, features, 2)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.conv_dim)
        return x + channels_to_complex(self.net(complex_to_channels(x)))


class _BoundedConv(nn.Module):
    """A convolution whose operator norm is provably at most ``bound``.

    The norm of a convolution is at most the sum over kernel taps of each tap's matrix norm,
    itself at most its Frobenius norm; the weight is scaled down whenever that sum exceeds
    ``bound``. Deterministic (no power-iteration state), so forward and the re-run of MEL see
    the same function.
    """

    def __init__(self, conv_dim: int, cin: int, cout: int, bound: float) -> None:
        super().__init__()
        self.conv = _conv(conv_dim, cin, cout)
        self.bound = bound

    def forward(self, x: Tensor) -> Tensor:
        w = self.conv.weight
        taps = w.flatten(2).transpose(0, 2)  # (taps, in, out)
        norm = torch.linalg.matrix_norm(taps).sum()
        scale = torch.clamp(self.bound / norm.clamp_min(1e-12), max=1.0)
        conv = nn.functional.conv2d if w.dim() == 4 else nn.functional.conv3d
        return conv(x, w * scale, self.conv.bias, padding=1)


class InvertibleResidualCNN(nn.Module):
    """``x + f(x)`` with ``Lip(f) <= lipschitz < 1``: a denoiser that can be inverted (MEL).

    ``f`` is a CNN of ``num_layers`` convolutions with ReLUs, each convolution's operator norm
    bounded by ``lipschitz ** (1 / num_layers)``, so ``x -> x + f(x)`` is invertible and
    :meth:`inverse` finds ``x`` from ``y`` by the fixed-point iteration ``x <- y - f(x)``, which
    converges geometrically at rate ``lipschitz`` (the invertible residual blocks of MEL).

    Args:
        features: channels of the hidden convolutions.
        num_layers: convolutions in ``f``.
        conv_dim: 2 for slices, 3 for volumes or cine.
        lipschitz: the Lipschitz bound of ``f`` (0 < lipschitz < 1).
        inverse_iters: fixed-point iterations at most.
        inverse_tol: stop when the update is below this fraction of ``|y|``.
    """

    def __init__(
        self,
        features: int = 64,
        num_layers: int = 5,
        conv_dim: int = 2,
        lipschitz: float = 0.9,
        inverse_iters: int = 50,
        inverse_tol: float = 1e-6,
    ) -> None:
        super().__init__()
        _check_positive_int("features", features)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
            raise ValueError(f"num_layers: got {num_layers!r}; expected an int >= 2")
        if not 0 < lipschitz < 1:
            raise ValueError(f"lipschitz: got {lipschitz!r}; expected 0 < lipschitz < 1")
        _check_positive_int("inverse_iters", inverse_iters)
        self.conv_dim = conv_dim
        bound = lipschitz ** (1.0 / num_layers)
        widths = [2] + [features] * (num_layers - 1) + [2]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            if i:
                layers.append(nn.ReLU())
            layers.append(_BoundedConv(conv_dim, widths[i], widths[i + 1], bound))
        self.net = nn.Sequential(*layers)
        self.lipschitz = lipschitz
        self.inverse_iters = inverse_iters
        self.inverse_tol = inverse_tol

    def residual(self, x: Tensor) -> Tensor:
        """``f(x)``."""
        return channels_to_complex(self.net(complex_to_channels(x)))

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.conv_dim)
        return x + self.residual(x)

    def inverse(self, y: Tensor) -> Tensor:
        """The ``x`` with ``x + f(x) = y``, by fixed-point iteration."""
        x = y
        limit = self.inverse_tol * float(torch.linalg.vector_norm(y))
        for _ in range(self.inverse_iters):
            x_new = y - self.residual(x)
            done = float(torch.linalg.vector_norm(x_new - x)) <= limit
            x = x_new
            if done:
                break
        return x


def _check_image(x: Tensor, conv_dim: int) -> None:
    if not isinstance(x, Tensor) or not x.is_complex():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x: expected a complex image, got {got}")
    if x.dtype != torch.complex64:
        raise TypeError(
            f"x: the networks run in float32 and take complex64 images, got {x.dtype}; "
            "convert with x.to(torch.complex64)"
        )
    if x.dim() != conv_dim + 1:
        layout = "(B, H, W)" if conv_dim == 2 else "(B, D|T, H, W)"
        raise ValueError(
            f"x: a network with conv_dim={conv_dim} takes images {layout}, got shape "
            f"{tuple(x.shape)}"
        )


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

    Each of the ``num_unrolls`` blocks is ``x <- prox(x + t * A^H(A x - y))`` with a learnable
    step ``t`` and a :class:`ResidualCNN` prox; blocks do not share weights.

    Example:
        >>> model = UnrolledPGD(num_unrolls=8, features=32, num_resblocks=2)
        >>> recon = model(meas.zero_filled(), meas)
        >>> gw = GreedyWrapper(model, splits=4, loss=complex_l1_loss)

    Args:
        num_unrolls: the number of blocks N.
        features: channels of the prox's hidden convolutions.
        num_resblocks: residual blocks per prox.
        conv_dim: 2 for 2D slices, 3 for volumes or 2D+time.
        step_size: initial gradient step (negative; see :class:`~mri.dc.GradientStepDC`).
    """

    def __init__(
        self,
        num_unrolls: int = 8,
        features: int = 64,
        num_resblocks: int = 2,
        conv_dim: int = 2,
        step_size: float = -2.0,
    ) -> None:
        _check_positive_int("num_unrolls", num_unrolls)
        super().__init__(
            *[
                PGDBlock(GradientStepDC(step_size), ResidualCNN(features, num_resblocks, conv_dim))
                for _ in range(num_unrolls)
            ]
        )


class MoDL(_Unrolled):
    """MoDL (Aggarwal et al.): a CNN denoiser and conjugate-gradient DC, unrolled.

    Each block is ``x <- (A^H A + mu I)^{-1}(A^H y + mu * D(x))`` with a 5-layer CNN ``D``.
    Blocks do not share weights (so any split is valid for greedy training).

    Args:
        num_unrolls: the number of blocks N.
        features: channels of the denoiser's hidden convolutions.
        num_layers: convolutions per denoiser.
        cg_iters: conjugate-gradient iterations per DC step.
        mu: initial regularisation weight of the DC step (learnable).
        conv_dim: 2 for 2D slices, 3 for volumes or 2D+time.
        cg_tol: relative residual tolerance of CG.
        invertible: use :class:`InvertibleResidualCNN` denoisers, so that every block has an
            ``inverse`` and the network can be trained by inversion (MEL).
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
                    ConjugateGradientDC(mu, max_iter=cg_iters, tol=cg_tol),
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
