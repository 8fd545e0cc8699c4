"""Cutting blocks into stages: even splits, cost balancing, device assignment (properties)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from greedywrap import balance_by_cost, balance_by_time, even_balance
from greedywrap.stages import assign_devices

from toys import make_blocks, make_data


@given(n=st.integers(1, 200), data=st.data())
def test_even_balance_is_a_near_even_partition(n, data):
    m = data.draw(st.integers(1, n))
    sizes = even_balance(n, m)
    assert len(sizes) == m and sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)


@given(costs=st.lists(st.integers(0, 50), min_size=1, max_size=8), data=st.data())
def test_balance_by_cost_is_an_optimal_contiguous_partition(costs, data):
    m = data.draw(st.integers(1, len(costs)))
    sizes = balance_by_cost(costs, m)
    assert len(sizes) == m and sum(sizes) == len(costs) and min(sizes) >= 1

    def worst(split):
        bounds = [0, *itertools.accumulate(split)]
        return max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))

    # Brute force over all cut positions.
    best = min(
        worst([b - a for a, b in itertools.pairwise([0, *cuts, len(costs)])])
        for cuts in itertools.combinations(range(1, len(costs)), m - 1)
    )
    assert worst(sizes) == best


def test_balance_by_cost_refuses_bad_costs():
    with pytest.raises(ValueError, match="non-negative"):
        balance_by_cost([1, -2], 1)
    with pytest.raises(ValueError, match="splits: got 3"):
        balance_by_cost([1, 2], 3)


def test_balance_by_time_returns_a_valid_partition():
    blocks = make_blocks(5)
    x0, _ = make_data()
    sizes = balance_by_time(blocks, x0, 2, 0.5, repeats=1)
    assert sum(sizes) == 5 and len(sizes) == 2
    assert all(p.grad is None for b in blocks for p in b.parameters())


@given(num_stages=st.integers(1, 12), data=st.data())
def test_device_assignment_round_robin_and_contiguous(num_stages, data):
    d = data.draw(st.integers(1, num_stages))
    devices = [torch.device("cpu")] * d
    rr = assign_devices(devices, num_stages, "round_robin")
    assert rr == [m % d for m in range(num_stages)]
    cont = assign_devices(devices, num_stages, "contiguous")
    assert cont == sorted(cont) and set(cont) == set(range(d))
