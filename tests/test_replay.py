"""Checkpoint recomputation's random numbers: replayed privately, skipped when none were drawn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import greedywrap.replay as replay
from greedywrap import GreedyWrapper, StageError

from toys import make_blocks, make_data


def _count_replays(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    made = [0]
    original = replay._Replay.__init__

    def counting(self, box):  # noqa: ANN001, ANN202
        made[0] += 1
        original(self, box)

    monkeypatch.setattr(replay._Replay, "__init__", counting)
    return made


def test_checkpoint_of_blocks_without_randomness_recomputes_without_a_dispatch_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = _count_replays(monkeypatch)
    gw = GreedyWrapper(make_blocks(4), splits=2, checkpoint=True)
    x, y = make_data()
    gw.train_step(x, y)
    assert made[0] == 0


@pytest.mark.parametrize("packet", ["randn", "rand", "randint", "randperm", "normal"])
def test_generator_overloads_are_looked_up_by_their_aten_names(packet: str) -> None:
    ops = getattr(torch.ops.aten, packet)
    for name in ops.overloads():
        args = [a.name for a in getattr(ops, name)._schema.arguments]
        if "generator" in args or "generator" in name:
            continue
        alt = replay._generator_overload(name)
        if alt in ops.overloads():
            assert "generator" in [a.name for a in getattr(ops, alt)._schema.arguments]
        elif name in ("default", "out"):
            pytest.fail(f"aten.{packet}.{name}: no overload {alt!r} found")


class DropBlock(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.tanh(self.fc(x)))


def test_checkpoint_with_randomness_replays_the_forward_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = _count_replays(monkeypatch)
    torch.manual_seed(0)
    ref = GreedyWrapper([DropBlock(), DropBlock()], splits=2)
    torch.manual_seed(0)
    ckpt = GreedyWrapper([DropBlock(), DropBlock()], splits=2, checkpoint=True)
    x = torch.randn(8, 16)
    for gw in (ref, ckpt):
        torch.manual_seed(1)
        gw.train_step(x, torch.zeros(8, 16))
    assert made[0] > 0
    for p, q in zip(ref.parameters(), ckpt.parameters(), strict=True):
        assert torch.equal(p, q)


class NativeDropBlock(nn.Module):
    """A random operator with no generator overload (what F.dropout becomes on CUDA)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = torch.ops.aten.native_dropout(torch.tanh(self.fc(x)), 0.5, True)
        return out


def test_generatorless_random_op_in_pgleam_recomputation_is_refused_clearly() -> None:
    gw = GreedyWrapper(
        [NativeDropBlock(), NativeDropBlock()], splits=2, devices=["cpu", "cpu"], checkpoint=True
    )
    with pytest.raises(StageError, match="takes no generator") as info:
        gw.train_step(torch.randn(8, 16), torch.zeros(8, 16))
        gw.synchronize()
    assert "checkpoint=False" in str(info.value)
    gw.close()


def test_generatorless_random_op_replays_exactly_in_the_sequential_engine() -> None:
    torch.manual_seed(0)
    ref = GreedyWrapper([NativeDropBlock(), NativeDropBlock()], splits=2)
    torch.manual_seed(0)
    ckpt = GreedyWrapper([NativeDropBlock(), NativeDropBlock()], splits=2, checkpoint=True)
    x = torch.randn(8, 16)
    for gw in (ref, ckpt):
        torch.manual_seed(3)
        gw.train_step(x, torch.zeros(8, 16))
    for p, q in zip(ref.parameters(), ckpt.parameters(), strict=True):
        assert torch.equal(p, q)
