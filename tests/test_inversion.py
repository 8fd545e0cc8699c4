"""MEL inside greedywrap: gradients by inversion match backprop, memory does not grow with depth."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from greedywrap import GreedyWrapper, InversionError, track_memory
from greedywrap.inversion import checkpoint_positions


class Coupling(nn.Module):
    """Additive coupling: y1 = x1, y2 = x2 + f(x1), then the halves swap. Exactly invertible."""

    def __init__(self, width: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.Linear(width // 2, hidden), nn.Tanh(), nn.Linear(hidden, width // 2)
        )

    def forward(self, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x2 + self.f(x1) + shift, x1], dim=-1)

    def inverse(self, y: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        y1, y2 = y.chunk(2, dim=-1)  # y1 = x2 + f(x1) + shift, y2 = x1
        return torch.cat([y2, y1 - self.f(y2) - shift], dim=-1)


class Leaky(Coupling):
    """A deliberately wrong inverse, to provoke inversion errors."""

    def inverse(self, y: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        return super().inverse(y, shift) * 1.5


def _grads_after_one_step(blocks, **kwargs):
    torch.manual_seed(3)
    x0, target = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    gw = GreedyWrapper(blocks, optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.0}, **kwargs)
    grads = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p: grads.append(p.grad.clone()))
             for b in blocks for p in b.parameters()]  # fmt: skip
    gw.train_step(x0, target, 0.1)
    for h in hooks:
        h.remove()
    return gw, grads


@pytest.mark.parametrize(("splits", "checkpoints"), [(1, 0), (1, 2), (2, 0), (3, 1)])
def test_gradients_by_inversion_match_backprop(splits, checkpoints):
    torch.manual_seed(0)
    blocks = [Coupling().double() for _ in range(6)]
    mel_blocks = copy.deepcopy(blocks)
    _, expected = _grads_after_one_step(blocks, splits=splits)
    gw, got = _grads_after_one_step(
        mel_blocks, splits=splits, invertible=True, inversion_checkpoints=checkpoints
    )
    assert len(got) == len(expected)
    # Backprop and MEL visit parameters in different orders; compare by parameter identity.
    by_shape = sorted(expected, key=lambda g: (g.shape, float(g.sum())))
    got_sorted = sorted(got, key=lambda g: (g.shape, float(g.sum())))
    for a, b in zip(got_sorted, by_shape, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)  # float64: tolerance 1e-9
    assert all(e < 1e-12 for errs in gw.inversion_errors for e in errs)


def test_training_by_inversion_follows_backprop_training():
    torch.manual_seed(1)
    blocks = [Coupling() for _ in range(4)]
    mel = copy.deepcopy(blocks)
    x0, target = torch.randn(8, 8), torch.randn(8, 8)
    a = GreedyWrapper(blocks, splits=2, optimizer_kwargs={"lr": 1e-2})
    b = GreedyWrapper(mel, splits=2, optimizer_kwargs={"lr": 1e-2}, invertible=True)
    for _ in range(5):
        la, lb = a.train_step(x0, target), b.train_step(x0, target)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # float32, 5 Adam steps
    assert [round(float(v), 4) for v in la] == [round(float(v), 4) for v in lb]


def _peak(num_blocks: int, invertible: bool) -> int:
    torch.manual_seed(0)
    # A wide batch and narrow blocks: activations dominate, parameter gradients are tiny.
    gw = GreedyWrapper([Coupling(64, 32) for _ in range(num_blocks)], invertible=invertible)
    x0, target = torch.randn(2048, 64), torch.randn(2048, 64)
    gw.train_step(x0, target)
    with track_memory(rss=False) as report:
        gw.train_step(x0, target)
    return report.peak_bytes["cpu"]


def test_peak_memory_by_inversion_does_not_grow_with_depth():
    shallow, deep = _peak(4, True), _peak(16, True)
    assert deep <= shallow * 1.1
    assert _peak(16, False) > 2 * deep  # backprop's peak does grow


def test_inversion_error_is_reported_and_refused_over_the_limit():
    blocks = [Leaky() for _ in range(3)]
    x0, target = torch.randn(4, 8), torch.randn(4, 8)
    gw = GreedyWrapper(blocks, invertible=True)
    gw.train_step(x0, target)
    assert max(gw.inversion_errors[0]) > 0.01
    before = [p.detach().clone() for p in gw.parameters()]
    strict = GreedyWrapper(blocks, invertible=True, max_inversion_error=1e-3)
    with pytest.raises(InversionError, match=r"stage 0, block 1: inversion error .* exceeds"):
        strict.train_step(x0, target)
    assert all(torch.equal(p, q) for p, q in zip(strict.parameters(), before, strict=True))


def test_blocks_without_inverse_are_refused():
    with pytest.raises(TypeError, match=r"block 1 \(Linear\) has no inverse"):
        GreedyWrapper([Coupling(), nn.Linear(8, 8)], invertible=True)
    with pytest.raises(ValueError, match="choose one"):
        GreedyWrapper([Coupling()], invertible=True, checkpoint=True)
    with pytest.raises(ValueError, match="inversion_checkpoints: got -1"):
        GreedyWrapper([Coupling()], invertible=True, inversion_checkpoints=-1)


def test_checkpoint_positions_are_evenly_spread():
    assert checkpoint_positions(8, 0) == set()
    assert checkpoint_positions(8, 1) == {4}
    assert checkpoint_positions(8, 3) == {2, 4, 6}
    assert checkpoint_positions(3, 10) == {1, 2}


def test_mel_refuses_a_block_whose_state_is_not_one_tensor():
    class Pair(torch.nn.Module):
        def forward(self, x):
            return (x, x)

        def inverse(self, y):
            return y[0]

    gw = GreedyWrapper([Pair()], invertible=True, output=0)
    with pytest.raises(TypeError, match="invertible: block 0 of the stage returned a tuple"):
        gw.train_step(torch.randn(2, 3), torch.randn(2, 3))
