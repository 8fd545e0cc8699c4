"""MEL's invertible denoiser: a residual CNN whose residual branch is a contraction.

[`InvertibleResidualCNN`][mri.invertible.InvertibleResidualCNN] divides every convolution by
its exact operator norm (power iteration on the convolution itself), so ``x + f(x)`` can be
inverted by fixed-point iteration; [`FixedPointError`][mri.invertible.FixedPointError] says
when that iteration did not converge. `mri.models.MoDL` uses it with ``invertible=True``.
"""

from __future__ import annotations

from typing import Any

import torch
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

__all__ = ["InvertibleResidualCNN", "FixedPointError"]


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
    [`FixedPointError`][mri.invertible.FixedPointError] if it has not converged after
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
