"""Bad input is refused with an error that names it: GreedyWrapper arguments, models, masks."""

from __future__ import annotations

import contextlib
import math
import signal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from greedywrap import GreedyWrapper
from mri import masks
from mri.config import ConfigError, load_config
from mri.models import MoDL, UnrolledPGD
from mri.physics import Measurement, SenseOp
from mri.pipeline import make_loader, prepare_builtin

from toys import make_blocks, make_data

NUM_BLOCKS = 4
WIDTH = 8
# A hang is a failure, not a slow test: every example gets a hard wall-clock bound (SIGALRM
# interrupts even a blocked wait), while hypothesis' own deadline is off because the shared
# CPU makes per-example timings too noisy to be a signal.
HANG_SECONDS = 20


class _Hung(Exception):
    pass


@contextlib.contextmanager
def _hard_deadline(seconds: float):
    def on_alarm(signum, frame):
        raise _Hung(f"the example did not finish within {seconds}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _sgd_factory(params):
    return torch.optim.SGD(params, lr=0.01)


def _not_an_optimizer_factory(params):
    return 3


def _raising_factory(params):
    raise RuntimeError("this factory always fails")


def _vector_loss(pred, target):
    return (pred - target).abs()  # not a scalar


def _raising_loss(pred, target):
    raise RuntimeError("this loss always fails")


# Each strategy mixes valid values with wrong kinds and impossible values of one argument.
_numbers = st.one_of(
    st.integers(-3, 6),
    st.integers(10**6, 10**20),
    st.integers(-(10**20), -(10**6)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
_junk = st.sampled_from([None, "", "abc", b"x", object(), {}, (), 1j])

SPLITS = st.one_of(
    st.integers(-3, 6),
    st.integers(10**6, 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.one_of(st.integers(-2, 4), st.floats(-1, 4), st.booleans()), max_size=6),
    st.tuples(st.integers(0, 4), st.integers(0, 4)),
    st.text(max_size=3),
    st.none(),
)
_device = st.one_of(
    st.sampled_from(["cpu", "cpu:0", torch.device("cpu")]),
    st.sampled_from(["gpu7", "", "cuda:99", "cuda:-1", "cpu:x", "mps", "xpu", "meta", "tpu:0"]),
    st.integers(-2, 3),
    st.sampled_from([None, 1.5, True, b"cpu", ["cpu"]]),
)
DEVICES = st.one_of(
    st.none(),
    st.lists(_device, max_size=6),
    st.lists(st.just("cpu"), min_size=1, max_size=6),
    _device,
)
OPTIMIZER = st.one_of(
    st.sampled_from(
        [
            torch.optim.Adam,
            torch.optim.SGD,
            torch.optim.AdamW,
            torch.optim.Optimizer,  # the abstract base: no defaults
            _sgd_factory,
            _not_an_optimizer_factory,
            _raising_factory,
            dict,  # callable, but not an optimizer
            nn.Linear,  # a class, callable, not an optimizer
            "adam",
            3,
            None,
        ]
    ),
    st.lists(st.sampled_from([torch.optim.Adam, _sgd_factory, "sgd", None]), max_size=5),
)
OPTIMIZER_KWARGS = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["lr", "lrr", "momentum", "weight_decay", "betas", "", "params"]),
        st.one_of(_numbers, _junk, st.tuples(_numbers, _numbers)),
        max_size=3,
    ),
    st.sampled_from(["lr=1", [("lr", 1.0)], 0.1]),
)
LOSS = st.one_of(
    st.sampled_from(
        [None, nn.functional.mse_loss, nn.functional.l1_loss, _vector_loss, _raising_loss]
    ),
    st.lists(st.sampled_from([nn.functional.mse_loss, None, "mse", 3]), max_size=5),
    _junk,
)
HEADS = st.one_of(
    st.none(),
    st.lists(
        st.sampled_from(["identity", "linear", "narrow", None, "str", 3]),
        max_size=5,
    ),
    st.just("identity"),
)
PRECISION = st.one_of(
    st.sampled_from(["fp32", "bf16", "fp16", "FP32", "fp8", "", None, 32, ["fp32"]])
)
CLIP = st.one_of(st.none(), _numbers, _junk)
GRAD_ACCUMULATION = st.one_of(_numbers, _junk)
TIMEOUT = st.one_of(
    st.floats(0.5, 1e6), st.floats(allow_nan=True, allow_infinity=True), _numbers, _junk
)
NONFINITE = st.sampled_from([None, "raise", "skip", "ignore", "RAISE", 1, True, [], {}])
PLACEMENT = st.sampled_from(["round_robin", "contiguous", "random", "", None, 3, ["x"]])

ARGUMENTS = {
    "splits": SPLITS,
    "devices": DEVICES,
    "optimizer": OPTIMIZER,
    "optimizer_kwargs": OPTIMIZER_KWARGS,
    "loss": LOSS,
    "heads": HEADS,
    "precision": PRECISION,
    "clip_grad_norm": CLIP,
    "grad_accumulation": GRAD_ACCUMULATION,
    "timeout": TIMEOUT,
    "nonfinite": NONFINITE,
    "placement": PLACEMENT,
}


def _make_head(kind):
    # Heads are built fresh per example: a module may only be owned by one wrapper.
    if kind == "identity":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(WIDTH, WIDTH)
    if kind == "narrow":
        return nn.Linear(WIDTH, 3)  # its output cannot be compared with the target
    return kind


@st.composite
def wrapper_arguments(draw):
    # Most examples change a few arguments at once, so errors are checked both alone and in
    # combination; the message must name one of the arguments that were given.
    names = draw(st.lists(st.sampled_from(sorted(ARGUMENTS)), min_size=1, max_size=4, unique=True))
    kwargs = {name: draw(ARGUMENTS[name]) for name in names}
    if "heads" in kwargs:
        heads = kwargs["heads"]
        kwargs["heads"] = (
            [_make_head(h) for h in heads] if isinstance(heads, list) else _make_head(heads)
        )
    return kwargs


def _names_an_argument(message: str, kwargs: dict) -> bool:
    # The model's own check ("model: ...") cannot fire here (fresh blocks, no tied weights), and
    # a loss that fails during the step is reported as "loss:" whatever made its input wrong.
    return any(f"{name}" in message for name in [*kwargs, "loss"])


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
)
@given(kwargs=wrapper_arguments())
def test_fuzzed_wrapper_arguments_work_or_fail_with_an_error_naming_them(kwargs):
    x0, target = make_data(width=WIDTH)
    gw = None
    with _hard_deadline(HANG_SECONDS):
        try:
            gw = GreedyWrapper(make_blocks(NUM_BLOCKS, width=WIDTH), **kwargs)
            losses = gw.train_step(x0, target)
            gw.synchronize()
        except (TypeError, ValueError, RuntimeError) as err:
            # RuntimeError covers StageError: an update that failed on a worker thread.
            message = f"{err} {err.__cause__ or ''}"
            assert _names_an_argument(message, kwargs), (
                f"{type(err).__name__} does not name an argument of {kwargs}: {err}"
            )
            return
        finally:
            if gw is not None:
                with contextlib.suppress(TypeError, ValueError, RuntimeError):
                    gw.close()
    assert len(losses) == gw.num_stages
    assert all(torch.isfinite(loss) for loss in losses)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        # Each was once a crash with another exception type, or an error that named nothing.
        ({"optimizer_kwargs": {"lr": float("nan")}}, ValueError, r"optimizer_kwargs: .*lr"),
        ({"optimizer_kwargs": {"lr": -1.0}}, ValueError, r"optimizer_kwargs: .*Adam"),
        ({"optimizer": _raising_factory}, RuntimeError, r"optimizer: the factory for stage 0"),
        ({"optimizer": dict}, ValueError, r"optimizer: the factory for stage 0 failed"),
        ({"optimizer": nn.Linear}, TypeError, r"optimizer: the factory for stage 0 failed"),
        ({"clip_grad_norm": "1"}, TypeError, r"clip_grad_norm: got '1'"),
        ({"grad_accumulation": None}, ValueError, r"grad_accumulation: got None"),
        ({"timeout": "10"}, ValueError, r"timeout: got '10'"),
        ({"devices": [-1]}, ValueError, r"devices: got -1; a CUDA device index must be >= 0"),
        ({"devices": ["cpu", -1]}, ValueError, r"devices: got -1"),
        ({"devices": ["meta"]}, ValueError, r"devices: 'meta' holds no data"),
        ({"devices": ["xpu"]}, ValueError, r"devices: xpu is not usable"),
    ],
)
def test_arguments_the_fuzz_found_are_refused_naming_them(kwargs, error, pattern):
    kwargs.setdefault("splits", 2)
    with pytest.raises(error, match=pattern):
        GreedyWrapper(make_blocks(NUM_BLOCKS, width=WIDTH), **kwargs)


def test_an_infinite_timeout_means_wait_without_limit():
    # threading refuses waits longer than TIMEOUT_MAX (OverflowError); "no limit" must still work.
    with GreedyWrapper(
        make_blocks(NUM_BLOCKS, width=WIDTH), splits=2, devices=["cpu", "cpu"], timeout=math.inf
    ) as gw:
        x0, target = make_data(width=WIDTH)
        gw.train_step(x0, target)
        gw.train_step(x0, target)
        gw.synchronize()
        assert all(torch.isfinite(p).all() for p in gw.parameters())


# ---------------------------------------------------------------------------- MRI inputs


@pytest.fixture(scope="module")
def measurement():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(1, 4, 16, 16, dtype=torch.complex64, generator=g)
    op = SenseOp(maps, masks.poisson_disc_mask((16, 16), 2, calib=4, seed=0))
    image = torch.randn(1, 16, 16, dtype=torch.complex64, generator=g)
    return Measurement(op, op(image))


def _models():
    torch.manual_seed(0)
    return [UnrolledPGD(2, 4, 1), MoDL(2, 4, 3, 3)]


@pytest.mark.parametrize("model", _models(), ids=["pgd", "modl"])
def test_unrolled_models_refuse_a_real_image(model, measurement):
    real = measurement.zero_filled().real
    with pytest.raises(TypeError, match=r"complex.*float32"):
        model(real, measurement)


@pytest.mark.parametrize("model", _models(), ids=["pgd", "modl"])
@pytest.mark.parametrize("shape", [(1, 1, 16, 16), (16, 16), (1, 2, 1, 16, 16)])
def test_unrolled_models_refuse_an_image_of_the_wrong_rank(model, measurement, shape):
    x = torch.zeros(shape, dtype=torch.complex64)
    # Either the physics or the network refuses it; both messages are about the image x.
    with pytest.raises(ValueError, match=r"x(:| is a| has shape)"):
        model(x, measurement)


def test_pgd_names_the_shape_of_a_wrong_rank_image(measurement):
    x = torch.zeros(1, 1, 16, 16, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"\(1, 1, 16, 16\)"):
        _models()[0](x, measurement)


@pytest.mark.parametrize("model", _models(), ids=["pgd", "modl"])
@pytest.mark.parametrize("meas", ["kspace", None, "op"])
def test_unrolled_models_refuse_something_that_is_not_a_measurement(model, measurement, meas):
    bad = {"kspace": measurement.kspace, None: None, "op": measurement.op}[meas]
    with pytest.raises(TypeError, match=r"meas must be an mri.Measurement"):
        model(measurement.zero_filled(), bad)


def test_pgd_refuses_an_image_that_does_not_fit_the_coil_maps(measurement):
    x = torch.zeros(1, 16, 8, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"\(1, 16, 8\).*\(1, 16, 16\)"):
        _models()[0](x, measurement)


def test_modl_refuses_an_image_that_does_not_fit_the_coil_maps(measurement):
    x = torch.zeros(1, 16, 8, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"\(1, 16, 8\)"):
        _models()[1](x, measurement)


def test_real_kspace_and_real_maps_are_refused_before_any_model_runs(measurement):
    with pytest.raises(TypeError, match=r"Measurement: kspace must be complex"):
        Measurement(measurement.op, measurement.kspace.real)
    with pytest.raises(TypeError, match=r"SenseOp: maps must be a torch.Tensor|maps must be"):
        SenseOp(measurement.op.maps.real)


def test_an_acceleration_the_data_cannot_meet_is_refused_before_training_naming_it(tmp_path):
    # The calibration block of cpu-tiny (8x8 of 32x32) alone caps the acceleration at 16.
    cfg = load_config("cpu-tiny", {"data.accel": 100.0})
    root = prepare_builtin(cfg, tmp_path)
    with pytest.raises(ConfigError, match=r"data.accel: 100.0 .*cannot be met.*calib"):
        make_loader(root, "train", cfg, shuffle=True)


def test_a_bool_where_an_optimizer_expects_a_number_is_refused_naming_it():
    # Found by the fuzz: Adam accepts weight_decay=True and fails inside step() without a name.
    with pytest.raises(TypeError, match=r"optimizer_kwargs: weight_decay=True for Adam"):
        GreedyWrapper(make_blocks(2, width=WIDTH), optimizer_kwargs={"weight_decay": True})
