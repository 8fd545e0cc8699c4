"""Reading the wrapper's options: checks of scalar arguments, per-stage lists, optimizers,
schedulers, and moving block arguments to devices. Every error names the argument."""

from __future__ import annotations

import copy
import inspect
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from greedywrap.inversion import check_invertible

PRECISIONS = ("fp32", "bf16", "fp16")


def per_stage(value: Any, name: str, num_stages: int, is_single: Callable[[Any], bool]) -> list:
    """Expand one value for all stages, or check a list of one per stage."""
    if is_single(value):
        return [value] * num_stages
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ValueError(
                f"{name}: got a list of {len(value)}, but there are {num_stages} stages; give "
                f"one {name} for all stages or a list of exactly {num_stages}"
            )
        return list(value)
    raise TypeError(f"{name}: got {value!r}; expected one {name} or a list of one per stage")


def is_optimizer_class(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)


def to_device(obj: Any, device: torch.device, path: str) -> Any:
    """Move tensors, and objects with ``.to(device)``, inside ``obj`` to ``device``."""
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        # Copies to a GPU may overlap (the GPU's stream orders them before their readers); a
        # copy to the host must be complete before the host reads it, so it blocks.
        return obj.to(device, non_blocking=device.type == "cuda")
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple keeps its type
        return type(obj)(
            *(to_device(v, device, f"{path}.{f}") for f, v in zip(obj._fields, obj, strict=True))
        )
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, f"{path}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, dict):
        moved = {k: to_device(v, device, f"{path}[{k!r}]") for k, v in obj.items()}
        if type(obj) is dict:
            return moved
        # A dict subclass (OrderedDict, defaultdict, a user's) keeps its type and attributes.
        out = copy.copy(obj)
        out.update(moved)
        return out
    to = getattr(obj, "to", None)
    if callable(to) and not isinstance(obj, (str, bytes, type)):
        try:
            return to(device)
        except Exception as err:  # noqa: BLE001 - re-raised with the argument named
            raise TypeError(
                f"{path}: cannot be moved to {device} with .to(device) "
                f"({type(obj).__name__}: {err})"
            ) from err
    return obj


def move_args(device: torch.device, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Move block arguments to ``device`` (tensors and objects with ``.to``)."""
    moved_args = tuple(to_device(a, device, f"block_args[{i}]") for i, a in enumerate(args))
    moved_kwargs = {k: to_device(v, device, f"block_kwargs[{k!r}]") for k, v in kwargs.items()}
    return moved_args, moved_kwargs


def check_options(
    *,
    blocks: Sequence[nn.Module],
    precision: Any,
    clip_grad_norm: Any,
    checkpoint: Any,
    grad_accumulation: Any,
    nonfinite: Any,
    invertible: Any,
    inversion_checkpoints: Any,
    max_inversion_error: Any,
    timeout: Any,
    placement: Any,
) -> float:
    """Check the wrapper's scalar options; return the timeout to use (capped for threading)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: got {precision!r}; expected one of {PRECISIONS}")
    if clip_grad_norm is not None and (
        isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float))
    ):
        raise TypeError(f"clip_grad_norm: got {clip_grad_norm!r}; expected a positive number")
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise ValueError(f"clip_grad_norm: got {clip_grad_norm!r}; expected a positive number")
    if not isinstance(checkpoint, bool):
        raise TypeError(f"checkpoint: got {checkpoint!r}; expected True or False")
    if (
        isinstance(grad_accumulation, bool)
        or not isinstance(grad_accumulation, int)
        or (grad_accumulation < 1)
    ):
        raise ValueError(f"grad_accumulation: got {grad_accumulation!r}; expected an int >= 1")
    if nonfinite not in (None, "raise", "skip"):
        raise ValueError(f"nonfinite: got {nonfinite!r}; expected None, 'raise' or 'skip'")
    if not isinstance(invertible, bool):
        raise TypeError(f"invertible: got {invertible!r}; expected True or False")
    if invertible:
        check_invertible(blocks)
        if checkpoint:
            raise ValueError(
                "checkpoint: True together with invertible=True; inversion already avoids "
                "storing activations, choose one"
            )
        if precision == "fp16":
            raise ValueError("precision: 'fp16' is not supported with invertible=True")
    if (
        isinstance(inversion_checkpoints, bool)
        or not isinstance(inversion_checkpoints, int)
        or inversion_checkpoints < 0
    ):
        raise ValueError(
            f"inversion_checkpoints: got {inversion_checkpoints!r}; expected an int >= 0"
        )
    if max_inversion_error is not None and not (
        isinstance(max_inversion_error, (int, float)) and max_inversion_error > 0
    ):
        raise ValueError(
            f"max_inversion_error: got {max_inversion_error!r}; expected a number > 0 or None"
        )
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout: got {timeout!r}; expected a positive number of seconds")

    if placement not in ("round_robin", "contiguous"):
        raise ValueError(f"placement: got {placement!r}; expected 'round_robin' or 'contiguous'")
    # threading refuses waits beyond TIMEOUT_MAX (OverflowError); longer means "no limit".
    return min(float(timeout), threading.TIMEOUT_MAX)


def _check_hyperparameter_types(cls: type, kwargs: dict[str, Any]) -> None:
    """Refuse True/False where the optimizer's default is a number.

    Optimizers accept ``weight_decay=True`` at construction and fail later inside ``step()``
    with an error that names nothing; a bool is never a meaningful number here.
    """
    defaults = inspect.signature(cls.__init__).parameters
    for key, value in kwargs.items():
        default = defaults[key].default if key in defaults else None
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and isinstance(value, bool):
            raise TypeError(
                f"optimizer_kwargs: {key}={value!r} for {cls.__name__}; expected a number "
                f"(default {default!r})"
            )


def build_optimizers(
    optimizer: Any, optimizer_kwargs: dict[str, Any] | None, stage_params: list[list[nn.Parameter]]
) -> list[torch.optim.Optimizer | None]:
    """One optimizer per stage (``None`` for a stage with nothing to train)."""
    num_stages = len(stage_params)
    for i, spec in enumerate(optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]):
        if isinstance(spec, torch.optim.Optimizer):
            where = f" (entry {i})" if isinstance(optimizer, (list, tuple)) else ""
            raise TypeError(
                f"optimizer: got an instance of {type(spec).__name__}{where}; every stage needs "
                f"an optimizer of its own, so pass the class, e.g. "
                f"optimizer=torch.optim.{type(spec).__name__}, optimizer_kwargs={{...}} "
                "(or a factory f(params) -> Optimizer)"
            )
    specs = per_stage(
        optimizer,
        "optimizer",
        num_stages,
        lambda v: is_optimizer_class(v) or (callable(v) and not isinstance(v, (list, tuple))),
    )
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
        raise TypeError(f"optimizer_kwargs: got {optimizer_kwargs!r}; expected a dict")
    kwargs = dict(optimizer_kwargs or {})
    if kwargs and not all(is_optimizer_class(s) for s in specs):
        raise ValueError(
            "optimizer_kwargs: only used with an optimizer class; a factory "
            "f(params) -> Optimizer sets its own arguments"
        )
    optimizers: list[torch.optim.Optimizer | None] = []
    for m, spec in enumerate(specs):
        params = stage_params[m]
        if not params:
            # A stage with nothing to train (e.g. fixed physics) only runs forward.
            optimizers.append(None)
            continue
        if is_optimizer_class(spec):
            _check_hyperparameter_types(spec, kwargs)
            try:
                opt = spec(params, **kwargs)
            except TypeError as err:
                valid = [
                    n
                    for n in inspect.signature(spec.__init__).parameters
                    if n not in ("self", "params")
                ]
                raise TypeError(
                    f"optimizer_kwargs: {kwargs} rejected by {spec.__name__} ({err}); "
                    f"valid keys are {valid}"
                ) from err
            except ValueError as err:  # e.g. "Invalid learning rate: -1.0"
                raise ValueError(
                    f"optimizer_kwargs: {kwargs} rejected by {spec.__name__}: {err}"
                ) from err
        elif callable(spec):
            try:
                opt = spec(params)
            except Exception as err:  # noqa: BLE001 - re-raised with the argument named
                kind = type(err) if type(err) in (TypeError, ValueError) else RuntimeError
                raise kind(
                    f"optimizer: the factory for stage {m} failed "
                    f"({type(err).__name__}: {err}); it must be f(params) -> Optimizer"
                ) from err
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(
                    f"optimizer: the factory for stage {m} returned "
                    f"{type(opt).__name__}; it must return a torch.optim.Optimizer"
                )
        else:
            raise TypeError(
                f"optimizer: stage {m} got a {type(spec).__name__}; expected an optimizer "
                "class or a factory f(params) -> Optimizer"
            )
        optimizers.append(opt)
    return optimizers


def build_schedulers(scheduler: Any, optimizers: list[torch.optim.Optimizer | None]) -> list[Any]:
    """One LR scheduler (or ``None``) per stage from a factory or a list of factories."""
    num_stages = len(optimizers)
    sched_list = per_stage(scheduler, "scheduler", num_stages, lambda v: v is None or callable(v))
    schedulers = []
    for m, (factory, opt) in enumerate(zip(sched_list, optimizers, strict=True)):
        if factory is None or opt is None:
            schedulers.append(None)
            continue
        sched = factory(opt)
        if not hasattr(sched, "step") or not hasattr(sched, "state_dict"):
            raise TypeError(
                f"scheduler: the factory for stage {m} returned {type(sched).__name__}, "
                "which has no step()/state_dict(); return a torch.optim.lr_scheduler object"
            )
        schedulers.append(sched)
    return schedulers
