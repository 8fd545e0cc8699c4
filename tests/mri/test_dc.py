"""Data-consistency steps: CG matches a dense direct solve, steps are per sample, and both DC
modules are differentiable (gradcheck in complex128)."""

from __future__ import annotations

import pytest
import torch

from mri import ConjugateGradientDC, GradientStepDC, Measurement, SenseOp
from mri.dc import conjugate_gradient


def randc(*shape: int, dtype: torch.dtype = torch.complex128, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def make_meas(
    b: int = 2, c: int = 3, spatial: tuple[int, ...] = (4, 5), seed: int = 0, **kw
) -> Measurement:
    dtype = kw.pop("dtype", torch.complex128)
    maps = randc(b, c, *spatial, dtype=dtype, seed=seed) / c**0.5
    g = torch.Generator().manual_seed(seed + 1)
    mask = (torch.rand(spatial, generator=g) > 0.5).double()
    op = SenseOp(maps, mask, **kw)
    kspace = op(randc(b, *spatial, dtype=dtype, seed=seed + 2))
    return Measurement(op, kspace)


def dense_normal(op: SenseOp, sample: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """The matrix of A^H A for one sample, column by column."""
    n = int(torch.tensor(spatial).prod())
    basis = torch.eye(n, dtype=op.dtype).reshape(n, *spatial)
    maps = op.maps[sample : sample + 1].expand(n, *op.maps.shape[1:])
    cols = SenseOp(maps, op.mask, fft_dims=op.fft_dims).normal(basis)
    return cols.reshape(n, n).T


@pytest.mark.parametrize("spatial", [(4, 5), (3, 3, 4)])
def test_conjugate_gradient_dc_matches_dense_direct_solve(spatial):
    meas = make_meas(spatial=spatial)
    z = randc(2, *spatial, seed=9)
    mu = 0.05
    dc = ConjugateGradientDC(mu=mu, max_iter=200, tol=1e-12)
    out = dc(z, meas)
    rhs = meas.op.adjoint(meas.kspace) + mu * z
    n = z[0].numel()
    for i in range(2):
        mat = dense_normal(meas.op, i, spatial) + mu * torch.eye(n, dtype=z.dtype)
        want = torch.linalg.solve(mat, rhs[i].flatten()).reshape(spatial)
        torch.testing.assert_close(out[i], want, rtol=1e-8, atol=1e-8)


def test_cg_stops_at_tolerance_before_the_cap():
    meas = make_meas()
    op, mu = meas.op, 0.1
    rhs = randc(2, 4, 5, seed=3)
    calls = []

    def normal(v):
        calls.append(1)
        return op.normal(v) + mu * v

    x = conjugate_gradient(normal, rhs, max_iter=500, tol=1e-6)
    residual = (rhs - (op.normal(x) + mu * x)).flatten(1).norm(dim=1)
    assert torch.all(residual <= 1e-6 * rhs.flatten(1).norm(dim=1))
    assert len(calls) < 500


def test_cg_step_sizes_are_per_sample():
    # Two samples with very different conditioning: a shared step size would spoil both.
    rhs = randc(2, 6, seed=4)
    scales = torch.tensor([[1.0], [100.0]], dtype=torch.float64) * torch.linspace(1, 3, 6)

    def normal(v):
        return scales * v

    batched = conjugate_gradient(normal, rhs, max_iter=50, tol=1e-12)
    torch.testing.assert_close(batched, rhs / scales, rtol=1e-10, atol=1e-12)
    for i in range(2):
        alone = conjugate_gradient(lambda v, i=i: scales[i] * v, rhs[i : i + 1], 50, 1e-12)
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-10, atol=1e-12)


def test_cg_with_zero_rhs_returns_zeros_without_nans():
    rhs = torch.zeros(2, 3, dtype=torch.complex128)
    rhs[1] = 1.0
    x = conjugate_gradient(lambda v: 2 * v, rhs, max_iter=5, tol=1e-9)
    torch.testing.assert_close(x, rhs / 2)


def test_gradient_step_is_gleams_fixed_update_by_default_and_descends():
    meas = make_meas()
    dc = GradientStepDC()
    # The official GLEAM code applies x - 2 * grad with a constant 2: no trainable step.
    assert dc.step_size.item() == -2.0 and list(dc.parameters()) == []
    assert "step_size" in dict(dc.named_buffers())
    x = randc(2, 4, 5, seed=5)
    op = meas.op
    want = x - 2.0 * op.adjoint(op(x) - meas.kspace)
    torch.testing.assert_close(dc(x, meas.to(torch.complex128)), want.to(x.dtype))
    small = GradientStepDC(step_size=-0.5)

    def loss(v):
        return (op(v) - meas.kspace).abs().pow(2).sum()

    assert loss(small(x, meas)) < loss(x)


def test_gradient_step_is_learnable_on_request():
    dc = GradientStepDC(learnable=True)
    assert isinstance(dc.step_size, torch.nn.Parameter) and dc.step_size.item() == -2.0


def test_dc_steps_work_in_complex64_for_2d_plus_time():
    meas = make_meas(b=1, c=2, spatial=(3, 4, 4), fft_dims=2, dtype=torch.complex64)
    z = randc(1, 3, 4, 4, dtype=torch.complex64, seed=6)
    assert GradientStepDC()(z, meas).dtype == torch.complex64
    assert ConjugateGradientDC()(z, meas).dtype == torch.complex64


def test_gradcheck_through_gradient_step():
    meas = make_meas(b=2, c=2, spatial=(3, 4))
    dc = GradientStepDC(step_size=-1.3, learnable=True).double()
    x = randc(2, 3, 4, seed=7).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, t: v + t * meas.op.adjoint(meas.op(v) - meas.kspace), (x, dc.step_size)
    )
    assert torch.autograd.gradcheck(lambda v: dc(v, meas), (x,))


def test_gradcheck_through_conjugate_gradient_wrt_z_and_mu():
    meas = make_meas(b=2, c=2, spatial=(3, 4))
    z = randc(2, 3, 4, seed=8).requires_grad_()
    mu = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    # tol=0 fixes the iteration count, so finite differences see the same computation.
    dc = ConjugateGradientDC(max_iter=6, tol=0.0).double()

    assert torch.autograd.gradcheck(lambda z_: dc(z_, meas), (z,))

    def solve(z_, mu_):
        op = meas.op
        rhs = op.adjoint(meas.kspace) + mu_ * z_
        return conjugate_gradient(lambda v: op.normal(v) + mu_ * v, rhs, 6, 0.0, x0=z_)

    assert torch.autograd.gradcheck(solve, (z, mu))
    # The module's trained mu (through its log-gain) receives a gradient through the same path.
    dc(z, meas).abs().sum().backward()
    assert dc.log_mu_gain.grad is not None and torch.isfinite(dc.log_mu_gain.grad)
    assert float(dc.log_mu_gain.grad) != 0.0


@pytest.mark.parametrize("mu0", [4.0, 0.05, 1e-3])
def test_learnable_mu_starts_exact_and_stays_positive_under_adversarial_gradients(mu0):
    dc = ConjugateGradientDC(mu=mu0)
    assert dc.mu.dtype == torch.float32 and dc.mu.item() == torch.tensor(mu0).item()
    assert [name for name, _ in dc.named_parameters()] == ["log_mu_gain"]
    opt = torch.optim.SGD(dc.parameters(), lr=1e3)
    for _ in range(5):  # gradients that push mu down as hard as they can
        opt.zero_grad()
        dc.mu.backward()
        opt.step()
        assert dc.mu.item() > 0
    meas = make_meas(dtype=torch.complex64)
    z = randc(2, 4, 5, dtype=torch.complex64, seed=9)
    out = dc(z, meas)  # CG on A^H A + mu I with the smallest mu the gain allows: still finite
    assert torch.isfinite(torch.view_as_real(out)).all()


def test_fixed_mu_is_a_buffer():
    dc = ConjugateGradientDC(mu=0.05, learnable_mu=False)
    assert list(dc.parameters()) == [] and "mu0" in dict(dc.named_buffers())
    assert dc.mu.item() == torch.tensor(0.05).item()


class TestErrors:
    @pytest.mark.parametrize("step", [0.5, 0.0, "a", True])
    def test_gradient_step_needs_a_negative_number(self, step):
        with pytest.raises(ValueError, match="step_size"):
            GradientStepDC(step_size=step)

    @pytest.mark.parametrize(
        "kw, match",
        [
            ({"mu": 0.0}, "mu"),
            ({"mu": -1}, "mu"),
            ({"max_iter": 0}, "max_iter"),
            ({"tol": -1e-3}, "tol"),
            ({"max_iter": 2.5}, "max_iter"),
        ],
    )
    def test_conjugate_gradient_dc_arguments(self, kw, match):
        with pytest.raises(ValueError, match=match):
            ConjugateGradientDC(**kw)

    def test_meas_must_be_a_measurement(self):
        x = randc(2, 4, 5)
        with pytest.raises(TypeError, match="meas must be an mri.Measurement"):
            GradientStepDC()(x, object())
        with pytest.raises(TypeError, match="meas must be an mri.Measurement"):
            ConjugateGradientDC()(x, (None, None))

    def test_cg_x0_shape_and_rhs_type(self):
        with pytest.raises(ValueError, match="x0 must match rhs"):
            conjugate_gradient(lambda v: v, torch.ones(2, 3), x0=torch.ones(2, 4))
        with pytest.raises(TypeError, match="rhs must be a torch.Tensor"):
            conjugate_gradient(lambda v: v, [1.0, 2.0])
