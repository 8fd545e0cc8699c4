"""Unrolled reconstruction networks (PGD and MoDL) built as plain sequences of blocks.

Every block is called ``block(x, meas)`` with a complex image ``x`` and a
[`Measurement`][mri.physics.Measurement], so `GreedyWrapper` can cut a model into
stages anywhere. Convolutions see the real and imaginary parts as two channels; with
``conv_dim=3`` they run over ``(D, H, W)`` volumes or ``(T, H, W)`` cine series.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    "FixedPointError",
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


def _conv(
    conv_dim: int,
    cin: int,
    cout: int,
    kernel_size: int = 3,
    bias: bool = True,
    padding_mode: str = "zeros",
) -> nn.Conv2d | nn.Conv3d:
    if conv_dim not in (2, 3):
        raise ValueError(f"conv_dim: got {conv_dim!r}; expected 2 (slices) or 3 (volumes, cine)")
    cls = nn.Conv2d if conv_dim == 2 else nn.Conv3d
    return cls(
        cin, cout, kernel_size, padding=kernel_size // 2, bias=bias, padding_mode=padding_mode
    )


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


def _edge_padding(conv_dim: int) -> str:
    # The official GLEAM layers pad the hidden 3x3 convolutions by reflection in 2D and by
    # replication in 3D; the choice changes no parameter count, only the image borders.
    return "reflect" if conv_dim == 2 else "replicate"


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: got {value!r}; expected a positive int")


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


def _plain_layers(
    features: int, num_layers: int, conv_dim: int, conv: Callable[[int, int], nn.Module]
) -> nn.Sequential:
    widths = [2] + [features] * (num_layers - 1) + [2]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        if i:
            layers.append(nn.ReLU())
        layers.append(conv(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


def _check_num_layers(num_layers: object) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
        raise ValueError(f"num_layers: got {num_layers!r}; expected an int >= 2")


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


def _apply_conv(x: Tensor, weight: Tensor, padding_mode: str) -> Tensor:
    """A bias-free 'same' convolution with ``weight`` and the given edge padding."""
    conv = nn.functional.conv2d if weight.dim() == 4 else nn.functional.conv3d
    half = weight.shape[-1] // 2
    if padding_mode == "zeros":
        return conv(x, weight, padding=half)
    return conv(nn.functional.pad(x, [half] * (2 * (weight.dim() - 2)), mode=padding_mode), weight)


def _keep(t: Tensor) -> Tensor:
    return t


class _OperatorNorm(torch.autograd.Function):
    """``sigma = ||W v||`` for a fixed unit vector ``v``, keeping only ``d sigma / d W``.

    Autograd would save ``v`` and ``W v`` for the backward: two input-sized tensors per
    convolution, which made a checkpointed invertible MoDL step a third larger than a plain
    one. The gradient, ``(W v) v^T / sigma`` in operator form, has the weight's shape; it is
    computed here, once, and nothing input-sized outlives the forward.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, v: Tensor, padding_mode: str) -> Tensor:
        # A private graph: under checkpointing the caller's saved-tensor hooks would pack it.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            w = weight.detach().requires_grad_(True)
            sigma = torch.linalg.vector_norm(_apply_conv(v, w, padding_mode))
            (grad,) = torch.autograd.grad(sigma, w)
        ctx.save_for_backward(grad)
        return sigma.detach()

    @staticmethod
    def backward(ctx: Any, grad_sigma: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad_sigma * grad, None, None


class _SpectralConv(nn.Module):
    """A bias-free convolution rescaled so that its operator norm is at most ``bound``.

    The norm is that of the convolution as a linear map on inputs of the shape it is called
    with (padding included), by power iteration on ``W^T W`` (the adjoint through autograd).
    For a new input shape the iteration runs until the estimate changes by less than
    ``power_tol`` relative; after a weight update it takes ``warm_iters`` steps from the
    cached singular vector, which tracks the slowly moving top singular vector as spectral
    normalisation does (running to full convergence after every optimizer step made training
    ten times slower). The vector is recomputed only when the weight changes (its version
    counter moves) or the input shape does, so the same weights always give the same
    function and the forward pass and MEL's re-runs agree. The scale
    ``min(1, bound / ||W||)`` is differentiable in the weight.
    """

    def __init__(
        self,
        conv_dim: int,
        cin: int,
        cout: int,
        bound: float,
        power_tol: float = 1e-4,
        power_iters: int = 500,
        warm_iters: int = 1,
    ) -> None:
        super().__init__()
        self.padding_mode = _edge_padding(conv_dim)
        self.conv = _conv(conv_dim, cin, cout, bias=False, padding_mode=self.padding_mode)
        self.bound = bound
        # Delta-orthogonal start (an orthogonal matrix on the centre tap, zeros elsewhere):
        # every singular value of the operator equals ``bound``, so normalisation removes
        # nothing at initialisation. PyTorch's default start has a spread of singular values
        # and loses most of its strength when the largest is brought down to ``bound``.
        with torch.no_grad():
            w = self.conv.weight
            w.zero_()
            centre = (slice(None), slice(None)) + (w.shape[-1] // 2,) * conv_dim
            w[centre] = nn.init.orthogonal_(torch.empty(cout, cin)) * bound
        self.power_tol = power_tol
        self.power_iters = power_iters
        self.warm_iters = warm_iters
        self._vector: Tensor | None = None
        self._key: tuple | None = None

    @torch.no_grad()
    def top_singular_vector(self, spatial: tuple[int, ...]) -> Tensor:
        """The unit input ``v`` that ``W`` stretches most, for inputs of size ``spatial``."""
        w = self.conv.weight.detach()
        shape = (1, w.shape[1], *spatial)
        key = (w._version, w.data_ptr(), shape, w.device, w.dtype)
        if key == self._key and self._vector is not None:
            return self._vector
        v = self._vector
        iters = self.warm_iters
        if v is None or v.shape != shape:
            gen = torch.Generator().manual_seed(0)  # deterministic cold start
            v = torch.randn(shape, generator=gen, dtype=w.dtype)
            iters = self.power_iters
        v = v.to(w.device, w.dtype)
        v = v / torch.linalg.vector_norm(v)
        previous = 0.0
        for _ in range(iters):
            # The adjoint's graph is private: under gradient checkpointing the caller's
            # saved-tensor hooks would otherwise pack it and recompute the block early.
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                v_in = v.detach().requires_grad_(True)
                u = _apply_conv(v_in, w, self.padding_mode)
                (wtw_v,) = torch.autograd.grad(u, v_in, u)
            sigma = float(torch.linalg.vector_norm(u))
            v = wtw_v / torch.linalg.vector_norm(wtw_v).clamp_min(1e-30)
            if abs(sigma - previous) <= self.power_tol * sigma:
                break
            previous = sigma
        cached = self._vector
        if cached is not None and (cached.shape, cached.device, cached.dtype) == (
            v.shape,
            v.device,
            v.dtype,
        ):
            # Refresh in place: the cache is one input-sized vector per convolution of every
            # block, as large as an activation. A new tensor each step would keep the old and
            # the new alive together and, under MEL, made a step's peak grow with the number
            # of blocks; the values are the same either way. (A forward's graph that saved
            # the old vector and is backpropagated after the weight changed would raise.)
            v = cached.copy_(v)
        self._vector, self._key = v, key
        return v

    def operator_norm(self, spatial: tuple[int, ...]) -> Tensor:
        """``||W||`` on inputs of size ``spatial`` (differentiable in the weight)."""
        v = self.top_singular_vector(spatial)
        weight = self.conv.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return _OperatorNorm.apply(weight, v, self.padding_mode)
        return torch.linalg.vector_norm(_apply_conv(v, weight, self.padding_mode))

    def forward(self, x: Tensor) -> Tensor:
        norm = self.operator_norm(tuple(x.shape[2:]))
        scale = torch.clamp(self.bound / norm.clamp_min(1e-12), max=1.0)
        return _apply_conv(x, self.conv.weight * scale, self.padding_mode)


class FixedPointError(ArithmeticError):
    """The fixed-point iteration of an invertible block did not converge."""


class InvertibleResidualCNN(nn.Module):
    """``x + f(x)`` with ``Lip(f) <= lipschitz < 1``: MEL's invertible denoiser.

    ``f`` has the layer structure of [`PlainCNN`][mri.models.PlainCNN] (the official MEL
    ``RevNet``), with each convolution spectrally normalised to operator norm at most
    ``lipschitz ** (1 / num_layers)`` (measured by power iteration on the convolution
    operator itself, not a bound on it, so the residual branch keeps its strength). ReLU is
    1-Lipschitz, so ``Lip(f) <= lipschitz`` up to the accuracy of the power iteration and
    `inverse` finds ``x`` from ``y`` by the fixed-point iteration ``x <- y - f(x)``.
    The official code runs five such iterations unchecked on an unconstrained network; here
    the iteration runs until the update is below ``inverse_tol`` and raises
    [`FixedPointError`][mri.models.FixedPointError] if it has not converged after
    ``inverse_iters`` iterations. ``last_inverse`` records the iterations used and the final
    relative update.

    Args:
        features: channels of the hidden convolutions.
        num_layers: convolutions in ``f``.
        conv_dim: 2 for slices, 3 for volumes or cine.
        lipschitz: the Lipschitz bound of ``f`` (0 < lipschitz < 1).
        inverse_iters: fixed-point iterations at most.
        inverse_tol: converged when an update is below this fraction of ``|y|``.
    """

    def __init__(
        self,
        features: int = 64,
        num_layers: int = 5,
        conv_dim: int = 2,
        lipschitz: float = 0.9,
        inverse_iters: int = 200,
        inverse_tol: float = 1e-6,
    ) -> None:
        super().__init__()
        _check_positive_int("features", features)
        _check_num_layers(num_layers)
        if isinstance(lipschitz, bool) or not isinstance(lipschitz, (int, float)):
            raise ValueError(f"lipschitz: got {lipschitz!r}; expected 0 < lipschitz < 1")
        if not 0 < lipschitz < 1:
            raise ValueError(f"lipschitz: got {lipschitz!r}; expected 0 < lipschitz < 1")
        _check_positive_int("inverse_iters", inverse_iters)
        if isinstance(inverse_tol, bool) or not isinstance(inverse_tol, (int, float)):
            raise ValueError(f"inverse_tol: got {inverse_tol!r}; expected a number > 0")
        if not inverse_tol > 0:
            raise ValueError(f"inverse_tol: got {inverse_tol!r}; expected a number > 0")
        self.conv_dim = conv_dim
        bound = lipschitz ** (1.0 / num_layers)
        self.net = _plain_layers(
            features,
            num_layers,
            conv_dim,
            lambda cin, cout: _SpectralConv(conv_dim, cin, cout, bound),
        )
        self.lipschitz = lipschitz
        self.inverse_iters = inverse_iters
        self.inverse_tol = inverse_tol
        self.last_inverse: dict[str, float] = {}

    def residual(self, x: Tensor) -> Tensor:
        """``f(x)``."""
        return channels_to_complex(self.net(complex_to_channels(x)))

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.conv_dim)
        return x + self.residual(x)

    def inverse(self, y: Tensor) -> Tensor:
        """The ``x`` with ``x + f(x) = y``, by fixed-point iteration checked for convergence.

        Raises:
            FixedPointError: If the update is still above ``inverse_tol * |y|`` after
                ``inverse_iters`` iterations (or is not finite).
        """
        x = y
        scale = float(torch.linalg.vector_norm(y))
        update = float("inf")
        for it in range(1, self.inverse_iters + 1):
            x_new = y - self.residual(x)
            update = float(torch.linalg.vector_norm(x_new - x)) / max(scale, 1e-30)
            x = x_new
            if update <= self.inverse_tol:
                self.last_inverse = {"iterations": it, "relative_update": update}
                return x
        self.last_inverse = {"iterations": self.inverse_iters, "relative_update": update}
        raise FixedPointError(
            f"InvertibleResidualCNN.inverse: the fixed-point iteration x <- y - f(x) did not "
            f"converge: relative update {update:.3g} after {self.inverse_iters} iterations "
            f"(inverse_tol={self.inverse_tol}); raise inverse_iters or lower lipschitz"
        )


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
