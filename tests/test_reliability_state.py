"""Numbers the wrapper keeps and returns: losses, skips, resumes, dtypes, heads, failures."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from greedywrap import GreedyWrapper, StageError, track_memory

from toys import NanOnCalls, assert_bitwise_equal, make_blocks, make_data, params_of


def _linear_blocks(n: int, width: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(n)]


def test_returned_losses_hold_one_number_and_no_stage_keeps_a_loss_buffer():
    x0, target = torch.randn(256, 64), torch.randn(256, 64)
    peaks = {}
    for splits in (1, 8):
        gw = GreedyWrapper(_linear_blocks(8, 64), splits=splits)
        gw.train_step(x0, target)  # optimizer state exists before measuring
        with track_memory(rss=False) as report:
            losses = gw.train_step(x0, target)
        peaks[splits] = report.peak_bytes["cpu"]
        assert all(v.untyped_storage().nbytes() == v.element_size() for v in losses)
    # One stage of eight alive at a time: far below end to end (old code: 8 loss buffers).
    activation = x0.numel() * x0.element_size()
    assert peaks[8] < peaks[1] - 4 * activation


@pytest.mark.parametrize("bad_call", [1, 2])
def test_a_nonfinite_micro_step_skips_its_whole_accumulation_window(bad_call):
    x0, t = make_data(batch=8, seed=2)
    block = NanOnCalls({bad_call})
    gw = GreedyWrapper([block], optimizer=torch.optim.SGD, grad_accumulation=2, nonfinite="skip")
    before = params_of([block])
    gw.train_step(x0[:4], t[:4])
    gw.train_step(x0[4:], t[4:])
    assert_bitwise_equal(params_of([block]), before)
    assert gw.skipped_updates == [1]
    gw.train_step(x0[:4], t[:4])  # the next window is clean and applied
    gw.train_step(x0[4:], t[4:])
    assert not torch.equal(params_of([block])[0], before[0])
    assert gw.skipped_updates == [1]


def _sgd_wrapper(seed: int = 0) -> GreedyWrapper:
    return GreedyWrapper(
        make_blocks(4, seed=seed),
        splits=2,
        optimizer=torch.optim.SGD,
        optimizer_kwargs={"lr": 0.1, "momentum": 0.9},
        grad_accumulation=2,
    )


def _roundtrip(gw: GreedyWrapper) -> dict:
    buf = io.BytesIO()
    torch.save(gw.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resume_in_the_middle_of_an_accumulation_window_is_exact():
    x0, t = make_data(batch=8, seed=4)
    micro = [(x0[:4], t[:4]), (x0[4:], t[4:])] * 3
    straight = _sgd_wrapper()
    for x, y in micro:
        straight.train_step(x, y, 0.5)
    first = _sgd_wrapper()
    first.train_step(*micro[0], 0.5)
    resumed = _sgd_wrapper(seed=77)
    resumed.load_state_dict(_roundtrip(first))
    for x, y in micro[1:]:
        resumed.train_step(x, y, 0.5)
    assert_bitwise_equal(params_of([resumed]), params_of([straight]))


def test_skipped_updates_survive_a_state_dict_roundtrip():
    gw = GreedyWrapper([*make_blocks(1), NanOnCalls({2})], splits=2, nonfinite="skip")
    for _ in range(3):
        gw.train_step(*make_data(), 0.5)
    other = GreedyWrapper([*make_blocks(1), NanOnCalls(set())], splits=2, nonfinite="skip")
    other.load_state_dict(_roundtrip(gw))
    assert other.skipped_updates == gw.skipped_updates == [0, 1]


def test_version_1_states_still_load():
    gw = GreedyWrapper(make_blocks(2), splits=2)
    gw.train_step(*make_data(), 0.5)
    state = gw.state_dict()
    extra = state["_extra_state"]
    state["_extra_state"] = {
        k: extra[k] for k in ("balance", "step_count", "optimizers", "schedulers", "scalers")
    } | {"version": 1}
    other = GreedyWrapper(make_blocks(2, seed=3), splits=2)
    other.load_state_dict(state)
    assert other.step_count == 1 and other.skipped_updates == [0, 0]
    state["_extra_state"]["version"] = 99
    with pytest.raises(ValueError, match="not a greedywrap state of version 1 or 2"):
        other.load_state_dict(state)


def test_double_converts_the_optimizer_state_and_training_goes_on():
    gw = GreedyWrapper(make_blocks(2), splits=2)
    x0, t = make_data()
    gw.train_step(x0, t, 0.5)
    gw.double()
    state = gw.optimizers[0].state[next(gw.stages[0].parameters())]
    assert state["exp_avg"].dtype == torch.float64
    gw.train_step(x0.double(), t.double(), 0.5)
    assert all(p.dtype == torch.float64 for p in gw.parameters())


def test_bf16_heads_run_under_autocast_in_inference_and_early_exit():
    torch.manual_seed(0)
    gw = GreedyWrapper(
        [nn.Linear(16, 16) for _ in range(2)],
        splits=2,
        heads=[nn.Linear(16, 16), None],
        precision="bf16",
    )
    x, t = torch.randn(4, 16), torch.randn(4, 16)
    gw.train_step(x, t)
    with torch.no_grad():
        early = gw(x, exit_at=1)
        every = gw(x, return_all=True)
    assert early.shape == (4, 16)
    assert torch.equal(every[0], early)


def test_one_head_shared_by_two_stages_is_refused():
    head = nn.Linear(8, 8)
    with pytest.raises(ValueError, match=r"'head: weight' of stage 0 is also used by stage 1"):
        GreedyWrapper(make_blocks(2), splits=2, heads=[head, head])


class _FailOnce(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.fail = True

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        y = self.fc(x)
        if y.requires_grad:
            y.register_hook(self._hook)
        return y

    def _hook(self, g: torch.Tensor) -> torch.Tensor:
        if self.fail:
            self.fail = False
            raise RuntimeError("transient failure")
        return g


@pytest.mark.parametrize("devices", [None, ["cpu", "cpu"]])
def test_a_failed_update_leaves_no_partial_gradient(devices):
    torch.manual_seed(0)
    gw = GreedyWrapper([nn.Linear(8, 8), _FailOnce(), nn.Linear(8, 8)], splits=[1, 2],
                       devices=devices)  # fmt: skip
    with pytest.raises((RuntimeError, StageError), match="transient failure"):
        gw.train_step(*make_data())
        gw.synchronize()
    assert [n for n, p in gw.stages[1].named_parameters() if p.grad is not None] == []
    gw.close()
