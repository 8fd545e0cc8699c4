"""Every bad argument gets a clear error naming the argument, the value and what is valid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from greedywrap import GreedyWrapper

from toys import ResBlock, make_blocks, make_data


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"splits": 0}, ValueError, r"splits: got 0.*between 1 and 4"),
        ({"splits": 5}, ValueError, r"splits: got 5.*4 blocks"),
        ({"splits": 2.0}, TypeError, r"splits: got 2.0"),
        ({"splits": [2, 1]}, ValueError, r"sums to 3.*4 blocks"),
        ({"splits": [2, 0, 2]}, ValueError, r"stage 1 has size 0"),
        ({"splits": []}, ValueError, r"splits: got an empty list"),
        ({"loss": [nn.functional.mse_loss]}, ValueError, r"loss: got a list of 1.*2 stages"),
        ({"optimizer_kwargs": {"lrr": 1}}, TypeError, r"optimizer_kwargs: .*lrr.*valid keys"),
        ({"optimizer": "adam"}, TypeError, r"optimizer: got 'adam'"),
        ({"precision": "fp8"}, ValueError, r"precision: got 'fp8'"),
        ({"precision": "fp16"}, ValueError, r"'fp16' needs every stage on a CUDA device"),
        ({"clip_grad_norm": -1.0}, ValueError, r"clip_grad_norm: got -1.0"),
        ({"devices": ["cpu", "cpu", "cpu"]}, ValueError, r"3 devices for 2 stages"),
        ({"devices": "cpu"}, TypeError, r"devices: got 'cpu'; expected a list"),
        ({"devices": 1.5}, TypeError, r"devices: got 1.5 of type float; expected a list"),
        ({"devices": {"cpu": 1}}, TypeError, r"devices: got \{'cpu': 1\} of type dict"),
        ({"devices": ["gpu7"]}, ValueError, r"devices: cannot parse 'gpu7'"),
        ({"devices": ["cuda:3"]}, ValueError, r"cuda:3 does not exist"),
        ({"devices": [0]}, ValueError, r"cuda:0 does not exist"),
        ({"placement": "random", "devices": ["cpu"]}, ValueError, r"placement: got 'random'"),
        ({"placement": "random"}, ValueError, r"placement: got 'random'"),
        ({"heads": [nn.Identity()]}, ValueError, r"heads: got a list of 1"),
        ({"heads": ["x", None]}, TypeError, r"heads: entry 0 is 'x'"),
        ({"timeout": 0}, ValueError, r"timeout: got 0"),
        ({"scheduler": lambda o: 3}, TypeError, r"scheduler: the factory for stage 0 returned int"),
    ],
)
def test_bad_constructor_arguments_are_refused_clearly(kwargs, error, pattern):
    if kwargs.get("devices") and "cuda" in str(kwargs["devices"]) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA devices")
    if kwargs.get("devices") == [0] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA devices")
    kwargs.setdefault("splits", 2)
    with pytest.raises(error, match=pattern):
        GreedyWrapper(make_blocks(4), **kwargs)


def test_empty_model_is_refused():
    with pytest.raises(ValueError, match="empty model"):
        GreedyWrapper(nn.Sequential())


def test_non_module_blocks_are_refused():
    with pytest.raises(TypeError, match="block 1 is a int"):
        GreedyWrapper([ResBlock(8), 3])
    with pytest.raises(TypeError, match="not a sequence of blocks"):
        GreedyWrapper(nn.Linear(2, 2))


def test_weights_tied_across_stages_are_refused_with_the_reason():
    shared = ResBlock(8)
    with pytest.raises(ValueError, match=r"also used by stage 1.*own optimizer"):
        GreedyWrapper([shared, shared], splits=2)


def test_exit_at_out_of_range():
    gw = GreedyWrapper(make_blocks(4), splits=2)
    x0, _ = make_data()
    for bad in (0, 3, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"exit_at: got {bad!r}.*between 1 and 2"):
            gw(x0, exit_at=bad)


@pytest.mark.filterwarnings("ignore:Using a target size")  # mse_loss warns before it fails
def test_target_shape_the_loss_cannot_take():
    gw = GreedyWrapper(make_blocks(2), splits=2)
    x0, _ = make_data()
    with pytest.raises(ValueError, match=r"stage 0 raised .*comparing.*\(4, 8\).*\(3, 5\)"):
        gw.train_step(x0, torch.randn(3, 5), 0.5)


def test_loss_that_is_not_scalar():
    gw = GreedyWrapper(make_blocks(2), splits=2, loss=lambda p, t: (p - t) ** 2)
    with pytest.raises(ValueError, match=r"returned \(4, 8\).*scalar"):
        gw.train_step(*make_data(), 0.5)


def test_train_step_in_eval_mode_is_refused():
    gw = GreedyWrapper(make_blocks(2), splits=2).eval()
    with pytest.raises(RuntimeError, match=r"eval mode"):
        gw.train_step(*make_data(), 0.5)


def test_argument_that_cannot_be_moved_is_named():
    class Stubborn:
        def to(self, device):
            raise RuntimeError("no")

    gw = GreedyWrapper(make_blocks(1))
    x0, target = make_data()
    with pytest.raises(TypeError, match=r"block_kwargs\['meas'\]: cannot be moved"):
        gw.train_step(x0, target, meas=Stubborn())


def test_optimizer_factory_must_return_an_optimizer():
    with pytest.raises(TypeError, match="factory for stage 0 returned list"):
        GreedyWrapper(make_blocks(2), splits=2, optimizer=lambda ps: list(ps))
