"""GreedyWrapper gives exactly the numbers of hand-written end-to-end and greedy loops."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from greedywrap import GreedyWrapper

from toys import assert_bitwise_equal, make_blocks, make_data, params_of


def hand_written_end_to_end(blocks, x0, target, steps, lr):
    model = nn.Sequential(*blocks)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        x = x0
        for block in model:
            x = block(x, 0.5)
        loss = nn.functional.mse_loss(x, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return params_of(blocks)


def hand_written_greedy(blocks, balance, x0, target, steps, lr):
    """Algorithm 1 of the GLEAM paper, written out."""
    stages, start = [], 0
    for size in balance:
        stages.append(blocks[start : start + size])
        start += size
    opts = [torch.optim.Adam([p for b in stage for p in b.parameters()], lr=lr) for stage in stages]
    for _ in range(steps):
        x = x0
        for stage, opt in zip(stages, opts, strict=True):
            out = x.detach()
            for block in stage:
                out = block(out, 0.5)
            loss = nn.functional.mse_loss(out, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            x = out.detach()
    return params_of(blocks)


def test_splits_1_is_exactly_end_to_end_backprop():
    blocks = make_blocks(5)
    ref = copy.deepcopy(blocks)
    x0, target = make_data()
    gw = GreedyWrapper(nn.Sequential(*blocks), splits=1, optimizer_kwargs={"lr": 1e-2})
    for _ in range(4):
        gw.train_step(x0, target, 0.5)
    assert_bitwise_equal(params_of(blocks), hand_written_end_to_end(ref, x0, target, 4, 1e-2))


@settings(max_examples=12, deadline=None)
@given(
    num_blocks=st.integers(1, 7),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_splits_m_is_exactly_algorithm_1(num_blocks, data, seed):
    splits = data.draw(st.integers(1, num_blocks))
    blocks = make_blocks(num_blocks, seed=seed)
    ref = copy.deepcopy(blocks)
    x0, target = make_data(seed=seed + 1)
    gw = GreedyWrapper(blocks, splits=splits, optimizer_kwargs={"lr": 1e-2})
    for _ in range(3):
        gw.train_step(x0, target, 0.5)
    expected = hand_written_greedy(ref, gw.balance, x0, target, 3, 1e-2)
    assert_bitwise_equal(params_of(blocks), expected)


def test_greedy_differs_from_end_to_end():
    # Guards the two tests above against a wrapper that ignores `splits`.
    a, b = make_blocks(4), make_blocks(4)
    x0, target = make_data()
    GreedyWrapper(a, splits=1).train_step(x0, target, 0.5)
    GreedyWrapper(b, splits=4).train_step(x0, target, 0.5)
    assert any(not torch.equal(p, q) for p, q in zip(params_of(a), params_of(b), strict=True))


@settings(max_examples=6, deadline=None)
@given(splits=st.integers(1, 4), seed=st.integers(0, 1000))
def test_activation_checkpointing_gives_the_same_parameters(splits, seed):
    plain, ckpt = make_blocks(4, seed=seed), make_blocks(4, seed=seed)
    x0, target = make_data(seed=seed)
    gw_plain = GreedyWrapper(plain, splits=splits)
    gw_ckpt = GreedyWrapper(ckpt, splits=splits, checkpoint=True)
    for _ in range(2):
        gw_plain.train_step(x0, target, 0.5)
        gw_ckpt.train_step(x0, target, 0.5)
    assert_bitwise_equal(params_of(plain), params_of(ckpt))


def test_checkpointing_recomputes_block_forward_in_backward():
    calls = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            calls.append(1)
            return torch.tanh(self.fc(x))

    x0, target = torch.randn(2, 4), torch.randn(2, 4)
    GreedyWrapper([Counting(), Counting()], splits=1, checkpoint=True).train_step(x0, target)
    assert len(calls) == 4  # 2 forwards + 2 recomputations during backward
    calls.clear()
    GreedyWrapper([Counting(), Counting()], splits=1).train_step(x0, target)
    assert len(calls) == 2


def test_stage_inputs_are_detached_so_no_gradient_crosses_a_boundary():
    blocks = make_blocks(2)
    x0, target = make_data()
    gw = GreedyWrapper(blocks, splits=2, optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.0})
    seen = []
    # With lr=0 nothing changes; record which parameters received gradients per stage.
    handles = [
        p.register_hook(lambda g, i=i: seen.append(i))
        for i, b in enumerate(blocks)
        for p in b.parameters()
    ]
    gw.train_step(x0, target, 0.5)
    for h in handles:
        h.remove()
    # Stage 2's loss must not reach block 0: each block's params see exactly one backward.
    assert sorted(seen) == [0] * 4 + [1] * 4
