"""Inter-stage states made of several tensors (primal-dual, momentum unrolls) and loss shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from greedywrap import GreedyWrapper

from toys import assert_bitwise_equal, params_of


class PrimalDual(nn.Module):
    """A block whose state is a (primal, dual) pair, or a dict of them."""

    def __init__(self, width: int = 8, as_dict: bool = False) -> None:
        super().__init__()
        self.primal = nn.Linear(width, width)
        self.dual = nn.Linear(width, width)
        self.as_dict = as_dict

    def forward(self, state, scale: float = 1.0):
        x, z = (state["x"], state["z"]) if isinstance(state, dict) else state
        z = z + scale * torch.tanh(self.dual(x))
        x = x - 0.5 * torch.tanh(self.primal(z))
        return {"x": x, "z": z} if self.as_dict else (x, z)


def _blocks(n: int, as_dict: bool = False) -> list[nn.Module]:
    torch.manual_seed(0)
    return [PrimalDual(as_dict=as_dict) for _ in range(n)]


def _data():
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(4, 8, generator=g),
        torch.randn(4, 8, generator=g),
        torch.randn(4, 8, generator=g),
    )


@pytest.mark.parametrize("devices", [None, ["cpu", "cpu"]])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_tuple_state_trains_greedily_like_a_hand_written_loop(devices, checkpoint):
    x, z, target = _data()
    blocks = _blocks(4)
    gw = GreedyWrapper(blocks, splits=2, output=0, devices=devices, checkpoint=checkpoint,
                       optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.1})  # fmt: skip
    ref = _blocks(4)
    opts = [torch.optim.SGD([p for b in ref[i : i + 2] for p in b.parameters()], lr=0.1)
            for i in (0, 2)]  # fmt: skip
    for _ in range(3):
        losses = gw.train_step((x, z), target, 0.5)
        state = (x, z)
        expected = []
        for m, opt in enumerate(opts):
            state = tuple(t.detach() for t in state)  # detached leaf by leaf
            for block in ref[2 * m : 2 * m + 2]:
                state = block(state, 0.5)
            loss = nn.functional.mse_loss(state[0], target)
            loss.backward()
            opt.step()
            opt.zero_grad()
            expected.append(loss.detach())
        assert_bitwise_equal(losses, expected)
    gw.close()
    assert_bitwise_equal(params_of(blocks), params_of(ref))
    with torch.no_grad():
        assert gw((x, z), 0.5).shape == (4, 8)  # inference returns the selected output


def test_dict_state_with_a_callable_selector_and_a_loss_on_the_whole_state():
    x, z, target = _data()
    picked = GreedyWrapper(_blocks(2, as_dict=True), splits=2, output=lambda s: s["x"])
    assert len(picked.train_step({"x": x, "z": z}, target)) == 2
    whole = GreedyWrapper(_blocks(2, as_dict=True), splits=2,
                          loss=lambda s, t: nn.functional.mse_loss(s["x"] + s["z"], t))  # fmt: skip
    assert len(whole.train_step({"x": x, "z": z}, target)) == 2


class _Bad(nn.Module):
    def forward(self, x):
        return (x, 3)


def test_a_block_returning_something_not_carriable_is_named():
    gw = GreedyWrapper([nn.Linear(8, 8), _Bad()], output=0)
    with pytest.raises(
        TypeError, match=r"block 1 returned a leaf of type int; a block must return"
    ):
        gw.train_step(torch.randn(4, 8), torch.randn(4, 8))


def test_default_loss_refuses_shapes_that_only_broadcast_like_mismatched_ones():
    gw = GreedyWrapper([nn.Identity()])
    x = torch.randn(4, 16, 16)
    for bad in (torch.randn(4, 1, 16, 16), torch.randn(4, 16, 15)):
        with pytest.raises(ValueError, match=r"loss: stage 0 raised ValueError comparing its "
                           r"output of shape \(4, 16, 16\) with the target of shape"):  # fmt: skip
            gw.train_step(x, bad)


def test_output_selector_of_the_wrong_kind_is_refused():
    with pytest.raises(TypeError, match="output: got 1.5"):
        GreedyWrapper([nn.Identity()], output=1.5)


def test_to_device_keeps_namedtuples_and_dict_subclasses_and_moves_their_tensors() -> None:
    import collections

    from greedywrap.options import to_device

    Pair = collections.namedtuple("Pair", "a b")
    meta = torch.device("meta")
    moved = to_device(Pair(torch.zeros(2), [torch.ones(1)]), meta, "x")
    assert type(moved) is Pair and moved.a.device == meta and moved.b[0].device == meta
    od = collections.OrderedDict(b=torch.zeros(1), a=torch.zeros(1))
    out = to_device(od, meta, "x")
    assert type(out) is collections.OrderedDict and list(out) == ["b", "a"]
    assert all(v.device == meta for v in out.values())
    dd = collections.defaultdict(list, k=torch.zeros(1))
    out = to_device(dd, meta, "x")
    assert type(out) is collections.defaultdict and out.default_factory is list
    assert out["k"].device == meta
