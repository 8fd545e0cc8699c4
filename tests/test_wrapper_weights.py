"""Weights independent of splits, and the messages of the tied-weight and optimizer checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from greedywrap import GreedyWrapper

from toys import make_blocks, make_data


def test_model_state_dict_moves_weights_between_wrappers_with_other_splits():
    trained = GreedyWrapper(make_blocks(6), splits=3, devices=["cpu", "cpu"])
    for _ in range(2):
        trained.train_step(*make_data(), 0.5)
    weights = trained.model_state_dict()
    assert list(weights) == list(nn.Sequential(*make_blocks(6)).state_dict())
    other = GreedyWrapper(make_blocks(6, seed=9), splits=[1, 5])
    other.load_model_state_dict(weights)
    x0, _ = make_data()
    with torch.no_grad():
        assert torch.equal(other(x0, 0.5), trained(x0, 0.5))
    plain = nn.Sequential(*make_blocks(6, seed=5))
    plain.load_state_dict(weights)
    trained.close()


def test_tied_weights_hint_gives_splits_that_would_work():
    blocks = make_blocks(4)
    blocks[3] = blocks[1]  # stage 0 = blocks 0-1, stage 1 = blocks 2-3 with splits=2
    with pytest.raises(ValueError, match=r"e\.g\. splits=\[4\]\)") as info:
        GreedyWrapper(blocks, splits=2)
    assert "'...'" not in str(info.value)
    GreedyWrapper(blocks, splits=[4])  # the hint is accepted


def test_an_optimizer_instance_is_refused_with_the_class_to_pass():
    blocks = make_blocks(2)
    opt = torch.optim.SGD([p for b in blocks for p in b.parameters()], lr=0.1)
    with pytest.raises(TypeError, match=r"pass the class, e\.g\. optimizer=torch\.optim\.SGD, "
                       r"optimizer_kwargs=\{\.\.\.\}") as info:  # fmt: skip
        GreedyWrapper(blocks, splits=2, optimizer=opt)
    assert "Parameter Group" not in str(info.value)  # no repr of the optimizer
