"""The GreedyWrapper contract: stages, optimizers, schedulers, heads, inference, state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from greedywrap import GreedyWrapper

from toys import ResBlock, assert_bitwise_equal, make_blocks, make_data, params_of


def test_accepts_sequential_modulelist_and_plain_iterables():
    for wrap in (lambda b: nn.Sequential(*b), nn.ModuleList, list, tuple, iter):
        gw = GreedyWrapper(wrap(make_blocks(5)), splits=2)
        assert gw.balance == [3, 2]
        assert [len(s.blocks) for s in gw.stages] == [3, 2]


def test_splits_as_list_of_block_counts():
    gw = GreedyWrapper(make_blocks(6), splits=[1, 4, 1])
    assert gw.balance == [1, 4, 1]
    assert gw.num_stages == 3


def test_parameters_are_the_blocks_parameters_in_model_order_then_heads():
    blocks = make_blocks(4)
    head = nn.Linear(8, 8)
    gw = GreedyWrapper(blocks, splits=2, heads=[head, None])
    expected = [p for b in blocks for p in b.parameters()] + list(head.parameters())
    got = list(gw.parameters())
    assert len(got) == len(expected)
    assert all(a is b for a, b in zip(got, expected, strict=True))


def test_train_step_returns_one_detached_loss_per_stage():
    gw = GreedyWrapper(make_blocks(6), splits=3)
    losses = gw.train_step(*make_data(), 0.5)
    assert len(losses) == 3
    assert all(loss.dim() == 0 and not loss.requires_grad for loss in losses)
    assert gw.step_count == 1


def test_training_reduces_every_stage_loss():
    gw = GreedyWrapper(make_blocks(4), splits=4, optimizer_kwargs={"lr": 1e-2})
    x0, target = make_data()
    first = [float(v) for v in gw.train_step(x0, target, 0.5)]
    for _ in range(60):
        last = [float(v) for v in gw.train_step(x0, target, 0.5)]
    assert all(b < a for a, b in zip(first, last, strict=True))


def test_early_exit_and_return_all_match_running_the_blocks():
    blocks = make_blocks(6)
    gw = GreedyWrapper(blocks, splits=3)
    x0, _ = make_data()
    with torch.no_grad():
        ref, outs = x0, []
        for i, block in enumerate(blocks):
            ref = block(ref, 0.5)
            if i % 2 == 1:
                outs.append(ref)
        assert torch.equal(gw(x0, 0.5), outs[-1])
        assert torch.equal(gw(x0, 0.5, exit_at=2), outs[1])
        everything = gw(x0, 0.5, return_all=True)
        assert len(everything) == 3
        assert all(torch.equal(a, b) for a, b in zip(everything, outs, strict=True))
        assert len(gw(x0, 0.5, exit_at=2, return_all=True)) == 2


def test_block_kwargs_reach_every_block():
    blocks = make_blocks(2)
    gw = GreedyWrapper(blocks, splits=2)
    x0, _ = make_data()
    with torch.no_grad():
        assert torch.equal(gw(x0, scale=0.0), x0)


def test_heads_give_the_loss_and_the_early_exit_output():
    blocks = make_blocks(4)
    heads = [nn.Linear(8, 3), nn.Linear(8, 3)]
    target = torch.tensor([0, 1, 2, 1])
    gw = GreedyWrapper(blocks, splits=2, heads=heads, loss=nn.functional.cross_entropy)
    x0, _ = make_data()
    before = heads[0].weight.detach().clone()
    gw.train_step(x0, target, 0.5)
    assert not torch.equal(before, heads[0].weight)  # the head is trained with its stage
    with torch.no_grad():
        assert gw(x0, 0.5, exit_at=1).shape == (4, 3)


def test_per_stage_losses_and_optimizers():
    blocks = make_blocks(4)
    calls = {"a": 0, "b": 0}

    def loss_a(p, t):
        calls["a"] += 1
        return nn.functional.mse_loss(p, t)

    def loss_b(p, t):
        calls["b"] += 1
        return nn.functional.l1_loss(p, t)

    gw = GreedyWrapper(
        blocks,
        splits=2,
        loss=[loss_a, loss_b],
        optimizer=[torch.optim.SGD, lambda ps: torch.optim.Adam(ps, lr=1e-3)],
        optimizer_kwargs=None,
    )
    # An optimizer class with no kwargs needs its defaults; SGD has a default lr in torch 2.x.
    gw.train_step(*make_data(), 0.5)
    assert calls == {"a": 1, "b": 1}
    assert isinstance(gw.optimizers[0], torch.optim.SGD)
    assert isinstance(gw.optimizers[1], torch.optim.Adam)


def test_scheduler_steps_after_every_update():
    gw = GreedyWrapper(
        make_blocks(2),
        splits=2,
        optimizer=torch.optim.SGD,
        optimizer_kwargs={"lr": 1.0},
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    for _ in range(3):
        gw.train_step(*make_data(), 0.5)
    assert [o.param_groups[0]["lr"] for o in gw.optimizers] == [0.125, 0.125]


def test_gradient_clipping_bounds_the_update():
    blocks = make_blocks(1)
    gw = GreedyWrapper(
        blocks, optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 1.0}, clip_grad_norm=1e-3
    )
    before = params_of(blocks)
    x0, target = make_data()
    gw.train_step(x0 * 100, target, 0.5)
    delta = torch.cat([(a - b).flatten() for a, b in zip(params_of(blocks), before, strict=True)])
    assert float(delta.norm()) <= 1e-3 * (1 + 1e-5)


def test_stage_without_parameters_runs_forward_only():
    class Double(nn.Module):
        def forward(self, x, scale=1.0):
            return 2 * x

    blocks = [Double(), *make_blocks(1)]
    gw = GreedyWrapper(blocks, splits=2)
    assert gw.optimizers[0] is None
    losses = gw.train_step(*make_data(), 0.5)
    assert len(losses) == 2


def test_bf16_autocast_trains_on_cpu():
    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            self.seen = self.fc(x).dtype
            return self.fc(x)

    blocks = [Lin(), Lin()]
    gw = GreedyWrapper(blocks, splits=2, precision="bf16")
    losses = gw.train_step(*make_data())
    assert blocks[0].seen == torch.bfloat16
    assert all(torch.isfinite(v.float()) for v in losses)
    assert blocks[0].fc.weight.dtype == torch.float32  # master weights stay fp32


def _checkpoint_bytes(gw: GreedyWrapper) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(gw.state_dict(), buf)
    buf.seek(0)
    return buf


def _wrapper(blocks):
    return GreedyWrapper(
        blocks,
        splits=3,
        optimizer_kwargs={"lr": 1e-2},
        scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
    )


def test_resume_from_state_dict_is_bitwise_identical_to_uninterrupted_training():
    x0, target = make_data()
    straight = make_blocks(6)
    gw = _wrapper(straight)
    for _ in range(6):
        gw.train_step(x0, target, 0.5)

    first = make_blocks(6)
    gw_a = _wrapper(first)
    for _ in range(3):
        gw_a.train_step(x0, target, 0.5)
    saved = _checkpoint_bytes(gw_a)

    resumed = make_blocks(6, seed=123)  # different init: everything must come from the file
    gw_b = _wrapper(resumed)
    gw_b.load_state_dict(torch.load(saved, weights_only=True))
    assert gw_b.step_count == 3
    for _ in range(3):
        gw_b.train_step(x0, target, 0.5)
    assert_bitwise_equal(params_of(resumed), params_of(straight))
    assert gw_b.optimizers[0].param_groups[0]["lr"] == gw.optimizers[0].param_groups[0]["lr"]


def test_state_dict_refuses_a_checkpoint_with_other_splits():
    gw = GreedyWrapper(make_blocks(4), splits=2)
    other = GreedyWrapper(make_blocks(4), splits=[1, 3])
    with pytest.raises(ValueError, match=r"splits=\[2, 2\]"):
        other.load_state_dict(gw.state_dict())


def test_wrapper_nested_in_a_module_checkpoints_with_it():
    outer = nn.Module()
    outer.gw = GreedyWrapper(make_blocks(2), splits=2)
    outer.gw.train_step(*make_data(), 0.5)
    state = outer.state_dict()
    assert "gw._extra_state" in state
    outer2 = nn.Module()
    outer2.gw = GreedyWrapper(make_blocks(2, seed=5), splits=2)
    outer2.load_state_dict(state)
    assert outer2.gw.step_count == 1


def test_shared_weights_inside_one_stage_are_fine():
    block = ResBlock(8)
    gw = GreedyWrapper([block, block, *make_blocks(1)], splits=[2, 1])
    gw.train_step(*make_data(), 0.5)


def test_moving_a_single_device_wrapper_moves_stages_and_optimizer_state():
    gw = GreedyWrapper(make_blocks(2), splits=2)
    gw.train_step(*make_data(), 0.5)
    gw.to("cpu")
    assert gw.stage_devices == [torch.device("cpu")] * 2
    gw.double()
    assert all(p.dtype == torch.float64 for p in gw.parameters())


def test_moving_a_placed_wrapper_by_hand_is_refused():
    gw = GreedyWrapper(make_blocks(2), splits=2, devices=["cpu"])
    gw.to("cpu")  # same place: nothing moves, nothing to refuse
    meta = copy.deepcopy(gw)
    with pytest.raises(RuntimeError, match="owns device placement"):
        meta.to("meta")


def test_gradient_accumulation_over_micro_batches_equals_one_full_batch_step():
    x0, target = make_data(batch=8)
    full_blocks, micro_blocks = make_blocks(4), make_blocks(4)
    full = GreedyWrapper(
        full_blocks, splits=2, optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.1}
    )
    micro = GreedyWrapper(
        micro_blocks,
        splits=2,
        optimizer=torch.optim.SGD,
        optimizer_kwargs={"lr": 0.1},
        grad_accumulation=2,
    )
    for _ in range(3):
        full.train_step(x0, target, 0.5)
        micro.train_step(x0[:4], target[:4], 0.5)
        assert micro.step_count % 2 == 1
        micro.train_step(x0[4:], target[4:], 0.5)
    for a, b in zip(params_of(full_blocks), params_of(micro_blocks), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _NanAfter(nn.Module):
    """Produces NaN on the given call numbers."""

    def __init__(self, bad_calls):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.calls = 0
        self.bad_calls = bad_calls

    def forward(self, x, scale=1.0):
        self.calls += 1
        y = self.fc(x)
        return y * float("nan") if self.calls in self.bad_calls else y


def test_nonfinite_raise_names_stage_and_step_and_leaves_parameters_untouched():
    from greedywrap import NonFiniteLossError

    blocks = [*make_blocks(1), _NanAfter({2})]
    gw = GreedyWrapper(blocks, splits=2, nonfinite="raise")
    x0, target = make_data()
    gw.train_step(x0, target, 0.5)
    before = params_of(blocks[1:])
    with pytest.raises(NonFiniteLossError, match=r"stage 1: loss is nan at step 2"):
        gw.train_step(x0, target, 0.5)
    assert_bitwise_equal(params_of(blocks[1:]), before)


def test_nonfinite_skip_counts_and_goes_on():
    blocks = [*make_blocks(1), _NanAfter({2, 3})]
    gw = GreedyWrapper(blocks, splits=2, nonfinite="skip")
    x0, target = make_data()
    for _ in range(4):
        gw.train_step(x0, target, 0.5)
    assert gw.skipped_updates == [0, 2]
    assert all(torch.isfinite(p).all() for p in gw.parameters())


def test_nonfinite_in_a_worker_reaches_the_caller_with_its_own_type_as_sequentially():
    from greedywrap import NonFiniteLossError

    blocks = [*make_blocks(1), _NanAfter({1})]
    gw = GreedyWrapper(blocks, splits=2, devices=["cpu", "cpu"], nonfinite="raise")
    gw.train_step(*make_data(), 0.5)
    with pytest.raises(NonFiniteLossError) as info:
        gw.synchronize()
    assert info.value.stage == 1
    gw.close()
