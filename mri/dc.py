"""Data-consistency steps for unrolled networks: a gradient step (unrolled PGD) and a
conjugate-gradient proximal step (MoDL), both called as ``dc(x, meas)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mri.physics import Measurement

__all__ = ["GradientStepDC", "ConjugateGradientDC", "conjugate_gradient"]


def _batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample ``Re <a, b>`` over every dim but the first, shape ``(B,)``."""
    return (a.conj() * b).real.flatten(1).sum(dim=1)


def _check_iter_args(where: str, max_iter: object, tol: object) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{where}: max_iter must be an int >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"{where}: tol must be a number >= 0, got {tol!r}")


def _check_meas(where: str, meas: object, x: Tensor | None = None) -> Measurement:
    if not isinstance(meas, Measurement):
        raise TypeError(
            f"{where}: meas must be an mri.Measurement(op, kspace), got {type(meas).__name__}"
        )
    if x is not None:
        check_image_fits(where, x, meas)
    return meas


def check_image_fits(where: str, x: object, meas: Measurement) -> None:
    """Raise unless ``x`` is a complex image of the shape the measurement's k-space implies.

    The image of k-space ``(B, C, *spatial)`` is ``(B, *spatial)``. Checking here, before any
    arithmetic, keeps broadcasting from turning a wrong shape into a confusing later error.
    """
    if not isinstance(x, Tensor) or not x.is_complex():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{where}: x must be a complex image tensor, got {got}")
    k = meas.kspace.shape
    expected = (k[0], *k[2:])
    if tuple(x.shape) != expected:
        raise ValueError(
            f"{where}: x has shape {tuple(x.shape)}, but the measurement's k-space "
            f"{tuple(k)} (B, C, *spatial) needs images of shape {expected}"
        )


def conjugate_gradient(
    normal_fn: Callable[[Tensor], Tensor],
    rhs: Tensor,
    max_iter: int = 10,
    tol: float = 1e-6,
    x0: Tensor | None = None,
) -> Tensor:
    """Solve ``N x = rhs`` for a Hermitian positive-definite ``N``, batched over dim 0.

    Every sample has its own step sizes and its own stopping test
    ``||r_b|| <= tol * ||rhs_b||``; a converged sample is frozen while the others go on, and
    the loop ends when all have converged or after ``max_iter`` iterations. The iterations are
    plain tensor operations, so autograd differentiates through them.

    Args:
        normal_fn: Applies ``N`` to a tensor shaped like ``rhs``; it must act on each sample
            independently.
        rhs: Right-hand side ``(B, ...)``, real or complex.
        max_iter: Iteration cap (>= 1).
        tol: Relative residual tolerance (>= 0); ``0`` always runs ``max_iter`` iterations.
        x0: Initial guess shaped like ``rhs``; zeros if ``None``.

    Returns:
        The approximate solution, shaped like ``rhs``.

    Raises:
        TypeError: If ``rhs`` (or ``x0``) is not a tensor.
        ValueError: If ``max_iter``/``tol`` are invalid, ``rhs`` has no batch dim, or ``x0``
            does not match ``rhs``.
    """
    where = "conjugate_gradient"
    if not isinstance(rhs, Tensor):
        raise TypeError(f"{where}: rhs must be a torch.Tensor, got {type(rhs).__name__}")
    if rhs.ndim < 1:
        raise ValueError(
            f"{where}: rhs must have a batch dim (B, ...), got shape {tuple(rhs.shape)}"
        )
    _check_iter_args(where, max_iter, tol)
    if x0 is None:
        x = torch.zeros_like(rhs)
        r = rhs
    else:
        if not isinstance(x0, Tensor) or x0.shape != rhs.shape:
            got = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
            raise ValueError(f"{where}: x0 must match rhs of shape {tuple(rhs.shape)}, got {got}")
        x = x0
        r = rhs - normal_fn(x0)
    view = (-1,) + (1,) * (rhs.ndim - 1)
    p = r
    rs = _batch_dot(r, r)
    threshold = tol**2 * _batch_dot(rhs, rhs)
    for _ in range(max_iter):
        active = rs > threshold
        if not bool(active.any()):
            break
        ap = normal_fn(p)
        p_ap = _batch_dot(p, ap)
        active = active & (p_ap > 0)
        # Dividing by a guarded denominator keeps 0/0 out of frozen samples, whose NaNs would
        # otherwise leak into the backward pass through torch.where.
        alpha = torch.where(active, rs / torch.where(active, p_ap, torch.ones_like(p_ap)), 0.0)
        x = x + alpha.view(view) * p
        r = r - alpha.view(view) * ap
        rs_new = _batch_dot(r, r)
        beta = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)), 0.0)
        p = r + beta.view(view) * p
        rs = rs_new
    return x


class GradientStepDC(nn.Module):
    """Gradient step on ``1/2 ||A x - y||^2``, as in unrolled proximal gradient descent.

    ```python
    dc = GradientStepDC()               # step_size = -2.0, fixed
    x = dc(x, meas)                     # x + step_size * A^H(A x - y) = x - 2 A^H(A x - y)
    ```

    The official GLEAM code (``dgl_unrolled.py``) applies the fixed update
    ``x - 2 * A^H(A x - y)``; that is the default here. meddlr's ``GeneralizedUnrolledCNN``,
    which GLEAM builds on, instead makes the same ``-2.0`` a learnable step: pass
    ``learnable=True`` (config key ``model.learnable_step``) for that. With an orthonormal
    FFT and maps normalised to ``sum_c |S_c|^2 <= 1``, ``||A^H A|| <= 1``, so a step of
    length 2 is the edge of the range in which the plain gradient iteration is stable; the
    learned prox after each step is what makes the unrolled iteration converge.

    Args:
        step_size: The step (must be negative: a positive one would ascend); its initial
            value if learnable.
        learnable: Whether the step is an ``nn.Parameter`` (else a buffer).

    Raises:
        ValueError: If ``step_size`` is not a negative number.
    """

    def __init__(self, step_size: float = -2.0, learnable: bool = False) -> None:
        super().__init__()
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
            raise ValueError(f"GradientStepDC: step_size must be a number, got {step_size!r}")
        if not step_size < 0:
            raise ValueError(
                f"GradientStepDC: step_size={step_size} but the update is "
                "x + step_size * A^H(Ax - y), so it must be negative (meddlr/GLEAM use -2.0)"
            )
        value = torch.tensor(float(step_size))
        if learnable:
            self.step_size = nn.Parameter(value)
        else:
            self.register_buffer("step_size", value)

    def forward(self, x: Tensor, meas: Measurement) -> Tensor:
        """Return ``x + step_size * A^H(A x - y)``.

        Args:
            x: Current image ``(B, *spatial)``, complex.
            meas: The measurement (operator and k-space).

        Returns:
            The updated image, shaped like ``x``.
        """
        meas = _check_meas("GradientStepDC", meas, x)
        grad = meas.op.adjoint(meas.op.forward(x) - meas.kspace)
        return x + self.step_size * grad

    def extra_repr(self) -> str:
        return f"step_size={self.step_size.detach().item():.4g}"


class ConjugateGradientDC(nn.Module):
    """MoDL's data-consistency step: ``argmin_x ||A x - y||^2 + mu ||x - z||^2``.

    ```python
    dc = ConjugateGradientDC(mu=0.05)
    x = dc(z, meas)                     # (A^H A + mu I)^{-1} (A^H y + mu z), by batched CG
    ```

    Solved by [`conjugate_gradient`][mri.dc.conjugate_gradient] started at ``z``, with
    per-sample step sizes. Differentiable with respect to ``z`` and ``mu`` by autograd through
    the iterations. ``mu = 0.05`` is MoDL's initial regularisation weight.

    A learnable ``mu`` is parametrised as ``mu = mu0 * exp(g)`` with the trained gain ``g``
    (``log_mu_gain``, initialised to 0 and clamped to ``[-20, 20]`` where used): ``mu`` starts
    at exactly ``mu0`` and stays positive whatever the gradients do, so ``A^H A + mu I`` stays
    positive definite and CG stays valid. The official GLEAM MoDL keeps ``mu`` fixed
    (``learnable_mu=False``).

    Args:
        mu: Initial weight of the proximity term (> 0).
        learnable_mu: Whether ``mu`` is trained (else a fixed buffer).
        max_iter: CG iteration cap (>= 1).
        tol: Relative residual tolerance of CG (>= 0).

    Raises:
        ValueError: If ``mu``, ``max_iter`` or ``tol`` are out of range.
    """

    _GAIN_LIMIT = 20.0  # e^20 ~ 5e8: any trained mu stays a finite, positive multiple of mu0

    def __init__(
        self,
        mu: float = 0.05,
        learnable_mu: bool = True,
        max_iter: int = 10,
        tol: float = 1e-6,
    ) -> None:
        super().__init__()
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not mu > 0:
            raise ValueError(f"ConjugateGradientDC: mu must be a number > 0, got {mu!r}")
        _check_iter_args("ConjugateGradientDC", max_iter, tol)
        self.register_buffer("mu0", torch.tensor(float(mu)))
        self.log_mu_gain = nn.Parameter(torch.zeros(())) if learnable_mu else None
        self.max_iter = max_iter
        self.tol = tol

    @property
    def mu(self) -> Tensor:
        """The current weight ``mu`` (> 0), differentiable in ``log_mu_gain`` when learnable."""
        if self.log_mu_gain is None:
            return self.mu0
        gain = self.log_mu_gain.clamp(-self._GAIN_LIMIT, self._GAIN_LIMIT)
        return self.mu0 * torch.exp(gain)

    def forward(self, z: Tensor, meas: Measurement) -> Tensor:
        """Return ``(A^H A + mu I)^{-1} (A^H y + mu z)``.

        Args:
            z: Output of the learned block ``(B, *spatial)``, complex.
            meas: The measurement (operator and k-space).

        Returns:
            The data-consistent image, shaped like ``z``.
        """
        meas = _check_meas("ConjugateGradientDC", meas, z)
        op, mu = meas.op, self.mu
        rhs = op.adjoint(meas.kspace) + mu * z
        return conjugate_gradient(
            lambda v: op.normal(v) + mu * v, rhs, max_iter=self.max_iter, tol=self.tol, x0=z
        )

    def inverse(self, x: Tensor, meas: Measurement) -> Tensor:
        """Recover ``z`` from ``x = (A^H A + mu I)^{-1}(A^H y + mu z)``.

        ``z = ((A^H A + mu I) x - A^H y) / mu``: exact when the forward solve converged, so
        the error of a capped CG shows up as inversion error (MEL's stability problem).
        """
        meas = _check_meas("ConjugateGradientDC.inverse", meas, x)
        op, mu = meas.op, self.mu
        return (op.normal(x) + mu * x - op.adjoint(meas.kspace)) / mu

    def extra_repr(self) -> str:
        return f"mu={self.mu.detach().item():.4g}, max_iter={self.max_iter}, tol={self.tol}"
