"""MEL for MRI: an invertible denoiser, the inverse of CG data consistency, the `mel` method."""

from __future__ import annotations

import copy

import pytest
import torch

from greedywrap import GreedyWrapper
from mri import ConjugateGradientDC, Measurement, SenseOp
from mri.coils import birdcage_maps
from mri.config import ConfigError, load_config
from mri.models import InvertibleResidualCNN, MoDL, complex_l1_loss
from mri.train import train


def _meas(batch: int = 2, coils: int = 4, n: int = 24, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    maps = birdcage_maps((n, n), coils)[None].repeat(batch, 1, 1, 1)
    mask = (torch.rand(n, n, generator=g) < 0.4).float()
    x = torch.randn(batch, n, n, dtype=torch.complex64, generator=g)
    op = SenseOp(maps, mask)
    return x, Measurement(op, op(x))


def test_invertible_denoiser_is_a_contraction_plus_identity_and_inverts():
    torch.manual_seed(0)
    net = InvertibleResidualCNN(features=8, num_layers=4, lipschitz=0.8)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(5)  # large weights: the bound, not the initialisation, must keep Lip(f) < 1
        a, b = (torch.randn(2, 16, 16, dtype=torch.complex64) for _ in range(2))
        ratio = (net.residual(a) - net.residual(b)).abs().norm() / (a - b).abs().norm()
        assert float(ratio) <= 0.8
        x = torch.randn(2, 16, 16, dtype=torch.complex64)
        recovered = net.inverse(net(x))
        assert float((recovered - x).abs().norm() / x.abs().norm()) < 1e-5


def test_cg_data_consistency_inverse_recovers_its_input():
    x, meas = _meas()
    dc = ConjugateGradientDC(mu=0.5, max_iter=60, tol=1e-10)
    z = torch.randn_like(x)
    with torch.no_grad():
        back = dc.inverse(dc(z, meas), meas)
    assert float((back - z).abs().norm() / z.abs().norm()) < 1e-4


def test_modl_trained_by_inversion_matches_backprop_gradients():
    torch.manual_seed(1)
    x, meas = _meas()
    model = MoDL(3, features=8, num_layers=3, cg_iters=40, cg_tol=1e-9, invertible=True)
    mel_model = copy.deepcopy(model)
    sgd = {"optimizer": torch.optim.SGD, "optimizer_kwargs": {"lr": 0.0}}
    plain = GreedyWrapper(model, loss=complex_l1_loss, **sgd)
    mel = GreedyWrapper(mel_model, loss=complex_l1_loss, invertible=True, **sgd)
    x0 = meas.zero_filled()
    plain.train_step(x0, x, meas)
    mel.train_step(x0, x, meas)
    for p, q in zip(model.parameters(), mel_model.parameters(), strict=True):
        assert p.grad is None and q.grad is None  # zeroed after the (lr=0) step
    # Compare gradients directly: one backward each, without stepping.
    grads = []
    for gw in (plain, mel):
        found = []

        def record(p, f=found):
            f.append((id(p), p.grad.clone()))

        hooks = [p.register_post_accumulate_grad_hook(record) for p in gw.parameters()]
        gw.train_step(x0, x, meas)
        for h in hooks:
            h.remove()
        grads.append(dict(found))
    order = [id(p) for p in model.parameters()], [id(p) for p in mel_model.parameters()]
    for a, b in zip(order[0], order[1], strict=True):
        torch.testing.assert_close(grads[1][b], grads[0][a], rtol=2e-3, atol=2e-5)
    assert max(max(e) for e in mel.inversion_errors) < 1e-4


def test_mel_method_trains_and_reports_inversion_error(tmp_path):
    cfg = load_config(
        "cpu-tiny",
        {"model.type": "modl", "model.num_layers": 3, "model.cg_iters": 20, "train.method": "mel",
         "train.iterations": 2, "train.val_every": 2, "train.mel_checkpoints": 1},
    )  # fmt: skip
    result = train(cfg, tmp_path / "mel", progress=False)
    assert result.steps == 2 and result.history


def test_mel_needs_an_invertible_model():
    with pytest.raises(ConfigError, match="model.type.*needs 'modl'"):
        load_config("cpu-tiny", {"train.method": "mel"})
