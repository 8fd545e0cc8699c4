"""GreedyWrapper: train any sequence of blocks greedily, stage by stage, with local losses."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from greedywrap import distributed as _dist
from greedywrap import engines
from greedywrap.inversion import InversionError, InvertedStage
from greedywrap.options import (
    build_optimizers,
    build_schedulers,
    check_options,
    per_stage,
    to_device,
)
from greedywrap.stages import (
    DeviceLike,
    Stage,
    StageUnit,
    assign_devices,
    check_balance,
    even_balance,
    find_shared_parameters,
    normalize_device,
    read_blocks,
)

__all__ = ["GreedyWrapper", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A stage's loss was NaN or Inf (raised when ``nonfinite="raise"``)."""

    def __init__(self, stage: int, step: int, value: float, detail: str = "") -> None:
        super().__init__(
            f"stage {stage}: loss is {value} at step {step}; its update was not applied"
            + (f"; {detail}" if detail else "")
        )
        self.stage = stage
        self.step = step
        self.value = value


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerSpec = type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

_STATE_VERSION = 1


class GreedyWrapper(nn.Module):
    """Train a sequence of blocks greedily: M stages, each with its own optimizer and loss.

    Example:
        >>> gw = GreedyWrapper(nn.Sequential(*blocks), splits=4, loss=nn.functional.mse_loss)
        >>> losses = gw.train_step(x0, target)        # one greedy step over all stages
        >>> y = gw(x0, exit_at=2)                      # inference, stopping after stage 2

    Each block is called as ``block(x, *block_args, **block_kwargs)`` and returns the next
    ``x``. A greedy step (GLEAM, Algorithm 1) runs, for each stage m: ``x_m =
    stage_m(x_{m-1}.detach())``, ``loss_m = loss(x_m, target)``, backward, optimizer step. No
    gradient crosses a stage boundary and each stage's graph is freed before the next stage
    runs, so training memory scales with the largest stage instead of the whole network.
    ``splits=1`` is ordinary end-to-end backpropagation.

    Args:
        model: an ``nn.Sequential``, an ``nn.ModuleList`` or any iterable of ``nn.Module``
            blocks. The wrapper takes the blocks over (it moves them to their stage's device).

    Keyword Args:
        splits: the number of stages M (contiguous, sizes as even as possible, earlier stages
            larger) or a list of block counts per stage. Default 1 (end-to-end).
        devices: where the stages live: a list of ints, ``"cuda:i"``, ``"cpu"`` or
            ``torch.device``; stages are placed round-robin over the entries (stage m on entry
            m mod D) unless ``placement="contiguous"``. ``None`` keeps every stage on the device
            of the model's parameters. With more than one entry, each stage's backward and
            update run on its entry's worker thread while later stages' forward goes on
            (P-GLEAM); the numbers are the same as the sequential step. On a CPU with few
            cores, ``devices=["cpu"] * D`` can be slower than one entry (the workers share
            the cores); it pays off with one accelerator per entry.
        placement: ``"round_robin"`` (default) or ``"contiguous"``.
        optimizer: an optimizer class (with ``optimizer_kwargs``), a factory
            ``f(params) -> Optimizer``, or a list of either, one per stage. Default Adam.
        optimizer_kwargs: keyword arguments for an optimizer class, e.g. ``{"lr": 1e-4}``.
        scheduler: optional factory ``f(optimizer) -> LR scheduler`` or a list of one per
            stage (``None`` entries allowed); stepped after every optimizer step.
        loss: ``loss(pred, target) -> scalar tensor`` for all stages, or a list of one per
            stage. Default mean squared error.
        heads: optional auxiliary heads, a list of one ``nn.Module`` (or ``None``) per stage:
            the stage's loss is ``loss(head(x_m), target)``, and inference that exits at that
            stage returns ``head(x_m)``.
        checkpoint: recompute block activations in backward (``torch.utils.checkpoint``,
            non-reentrant) instead of storing them. With ``splits=1`` this is the
            gradient-checkpointing baseline.
        clip_grad_norm: if given, clip each stage's gradient norm to this value.
        precision: ``"fp32"`` (default), ``"bf16"`` (autocast, CPU and CUDA) or ``"fp16"``
            (autocast with one GradScaler per stage, CUDA only).
        grad_accumulation: step each stage's optimizer every this many ``train_step`` calls,
            accumulating gradients (of losses divided by it) in between.
        distributed: data parallelism over processes (one DDP per stage). ``None`` (default)
            turns it on when ``torch.distributed`` is initialised with several processes.
        nonfinite: what to do with a NaN/Inf stage loss: ``None`` (default: nothing, no
            host synchronisation), ``"raise"`` (raise :class:`NonFiniteLossError` naming the
            stage and step, before the update) or ``"skip"`` (skip that stage's update and
            count it in ``skipped_updates``). Checking reads the loss on the host once per stage.
        invertible: train by inversion (MEL) instead of storing activations: every block
            must implement ``inverse(y, *block_args, **block_kwargs)``; each stage keeps only
            its output and ``inversion_checkpoints`` inputs, and recovers the others in
            backward by inversion (see :mod:`greedywrap.inversion`). Combines with ``splits``.
        inversion_checkpoints: block inputs kept per stage besides the stage input, evenly
            spaced, so inversion errors cannot accumulate over long runs of blocks.
        max_inversion_error: raise :class:`~greedywrap.inversion.InversionError` (before the
            update) when a block's relative inversion error exceeds this; the errors of the
            last step are in ``inversion_errors`` either way.
        max_in_flight: with several device entries, at most this many stage updates may be
            pending at once; the forward chain waits for the oldest beyond it. Each pending
            update keeps its stage's graph alive, so this bounds P-GLEAM's extra memory
            (``None``, the default: no bound, the most overlap).
        timeout: seconds any wait on a worker may last before it is reported as hung.

    Raises:
        TypeError: an argument of the wrong kind (the message names it).
        ValueError: an argument with an impossible value (the message says what is valid).
    """

    def __init__(
        self,
        model: nn.Module | Iterable[nn.Module],
        splits: int | Sequence[int] = 1,
        *,
        devices: Sequence[DeviceLike] | None = None,
        placement: str = "round_robin",
        optimizer: OptimizerSpec | Sequence[OptimizerSpec] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        scheduler: SchedulerFactory | Sequence[SchedulerFactory | None] | None = None,
        loss: LossFn | Sequence[LossFn] | None = None,
        heads: Sequence[nn.Module | None] | None = None,
        checkpoint: bool = False,
        clip_grad_norm: float | None = None,
        precision: str = "fp32",
        grad_accumulation: int = 1,
        distributed: bool | None = None,
        nonfinite: str | None = None,
        invertible: bool = False,
        inversion_checkpoints: int = 0,
        max_inversion_error: float | None = None,
        max_in_flight: int | None = None,
        timeout: float = 600.0,
    ) -> None:
        super().__init__()
        blocks = read_blocks(model)
        if isinstance(splits, (list, tuple)):
            balance = check_balance(splits, len(blocks))
        else:
            balance = even_balance(len(blocks), splits)
        num_stages = len(balance)

        groups, start = [], 0
        for size in balance:
            groups.append(blocks[start : start + size])
            start += size
        shared = find_shared_parameters(groups)
        if shared:
            name, first, other = shared[0]
            raise ValueError(
                f"model: parameter '{name}' of stage {first} is also used by stage {other}. "
                "Greedy training gives every stage its own optimizer and detaches stage inputs, "
                "so weights tied across stages would be updated by two optimizers with "
                "conflicting local losses. Put the blocks that share weights in the same stage "
                f"(e.g. splits={[len(g) for g in groups[:first]] + ['...']}) or untie them"
            )

        timeout = check_options(
            blocks=blocks, precision=precision, clip_grad_norm=clip_grad_norm,
            checkpoint=checkpoint, grad_accumulation=grad_accumulation, nonfinite=nonfinite,
            invertible=invertible, inversion_checkpoints=inversion_checkpoints,
            max_inversion_error=max_inversion_error, timeout=timeout, placement=placement,
        )  # fmt: skip
        # Placement: one worker per entry of `devices`; None means "where the model already is".
        self._explicit_devices = devices is not None
        if devices is None:
            first_param = next((p for b in blocks for p in b.parameters()), None)
            device_list = [first_param.device if first_param is not None else torch.device("cpu")]
            stage_entry = [0] * num_stages
        else:
            if isinstance(devices, (str, int, torch.device)):
                raise TypeError(
                    f"devices: got {devices!r}; expected a list of devices, e.g. [{devices!r}]"
                )
            device_list = [normalize_device(d) for d in devices]
            stage_entry = assign_devices(device_list, num_stages, placement)
        if precision == "fp16" and any(device_list[e].type != "cuda" for e in stage_entry):
            raise ValueError(
                "precision: 'fp16' needs every stage on a CUDA device (GradScaler); "
                "use 'bf16' on CPU"
            )

        self.stages = nn.ModuleList(
            Stage(group, m, device_list[stage_entry[m]], checkpoint)
            for m, group in enumerate(groups)
        )
        head_list = (
            [None] * num_stages
            if heads is None
            else per_stage(heads, "heads", num_stages, lambda v: False)
        )
        for m, head in enumerate(head_list):
            if head is not None and not isinstance(head, nn.Module):
                raise TypeError(f"heads: entry {m} is {head!r}; expected an nn.Module or None")
        self.heads = nn.ModuleList(h if h is not None else nn.Identity() for h in head_list)
        self._has_head = [h is not None for h in head_list]
        for m, stage in enumerate(self.stages):
            stage.to(stage.device)
            self.heads[m].to(stage.device)

        self._units = [StageUnit(s, h) for s, h in zip(self.stages, self.heads, strict=True)]
        self.distributed = _dist.use_distributed(distributed)
        if invertible and self.distributed:
            raise ValueError("invertible: MEL is not supported with distributed data parallelism")
        self._runners = (
            _dist.wrap_stage_units(self._units, [s.device for s in self.stages])
            if self.distributed
            else list(self._units)
        )
        self.grad_accumulation = grad_accumulation
        self.devices = device_list
        self.stage_entry = stage_entry
        self.balance = balance
        self.precision = precision
        self.clip_grad_norm = clip_grad_norm
        self.timeout = timeout
        if max_in_flight is not None and (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or max_in_flight < 1
        ):
            raise ValueError(f"max_in_flight: got {max_in_flight!r}; expected an int >= 1 or None")
        self.max_in_flight = max_in_flight
        self.checkpoint = checkpoint

        losses = per_stage(
            loss if loss is not None else nn.functional.mse_loss,
            "loss",
            num_stages,
            callable,
        )
        self.losses = losses

        self.optimizers = build_optimizers(
            optimizer, optimizer_kwargs, [self._stage_parameters(m) for m in range(num_stages)]
        )
        self.schedulers = build_schedulers(scheduler, self.optimizers)
        self.scalers = [
            torch.amp.GradScaler("cuda") if precision == "fp16" and opt is not None else None
            for opt in self.optimizers
        ]
        self.step_count = 0
        self.nonfinite = nonfinite
        self.skipped_updates = [0] * num_stages
        self.invertible = invertible
        self.inversion_checkpoints = inversion_checkpoints
        self.max_inversion_error = max_inversion_error
        self.inversion_errors: list[list[float]] = [[] for _ in range(num_stages)]
        self._inverted: list[InvertedStage | None] = [None] * num_stages
        self._engine = engines.make_engine(self)

    # ------------------------------------------------------------------ construction helpers

    def _stage_parameters(self, m: int) -> list[nn.Parameter]:
        params = list(self.stages[m].parameters())
        seen = {id(p) for p in params}
        params += [p for p in self.heads[m].parameters() if id(p) not in seen]
        return [p for p in params if p.requires_grad]

    # ------------------------------------------------------------------ properties

    @property
    def num_stages(self) -> int:
        """The number of stages M."""
        return len(self.stages)

    @property
    def stage_devices(self) -> list[torch.device]:
        """The device of each stage."""
        return [stage.device for stage in self.stages]

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)

    # ------------------------------------------------------------------ training

    def train_step(
        self, x0: torch.Tensor, target: Any, *block_args: Any, **block_kwargs: Any
    ) -> list[torch.Tensor]:
        """Run one greedy step over all stages (GLEAM, Algorithm 1).

        Args:
            x0: the input of the first block.
            target: what every stage's output (or head output) is compared with.
            *block_args: extra positional arguments passed to every block.
            **block_kwargs: extra keyword arguments passed to every block.

        Returns:
            The loss of each stage, as detached 0-dim tensors on the stage's device (reading
            them with ``float()`` is what synchronises, not this call).

        Raises:
            ValueError: the loss cannot compare a stage's output with ``target``, or does not
                return a scalar.
        """
        if not isinstance(x0, torch.Tensor):
            raise TypeError(f"x0: got {type(x0).__name__}; expected a torch.Tensor")
        if not self.training:
            raise RuntimeError(
                "train_step: the wrapper is in eval mode; call .train() first (eval mode would "
                "train with inference behaviour of dropout/batch-norm)"
            )
        sync = (self.step_count + 1) % self.grad_accumulation == 0
        self.step_count += 1
        losses = self._engine.step(x0, target, block_args, block_kwargs, sync)
        return losses

    def _compute_loss(self, m: int, pred: torch.Tensor, target: Any) -> torch.Tensor:
        try:
            loss = self.losses[m](pred, target)
        except (RuntimeError, ValueError, TypeError) as err:
            tshape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target)
            raise ValueError(
                f"loss: stage {m} could not compare its output of shape {tuple(pred.shape)} "
                f"with the target of shape {tshape}: {err}"
            ) from err
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss: stage {m} returned {got}; the loss must return a scalar (0-dim) tensor"
            )
        return loss

    def _stage_forward(
        self, m: int, x: torch.Tensor, target: Any, args: tuple, kwargs: dict, sync: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward of stage m on a detached input; returns (output, loss) with the graph alive."""
        runner = self._runners[m]
        inp = x.detach()
        if self.invertible:
            device = self.stages[m].device
            ctx = InvertedStage.forward(
                self.stages[m].blocks, inp, args, kwargs, self.inversion_checkpoints,
                lambda: self._autocast(device),
            )  # fmt: skip
            self._inverted[m] = ctx
            with self._autocast(device):
                loss = self._compute_loss(m, self.heads[m](ctx.output), target)
            return ctx.output, loss
        # Under DDP, micro-steps that do not update skip the gradient all-reduce.
        no_sync = getattr(runner, "no_sync", None)
        quiet = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        with quiet, self._autocast(self.stages[m].device):
            out, pred = runner(inp, *args, **kwargs)
            loss = self._compute_loss(m, pred, target)
        return out, loss

    def _stage_update(self, m: int, loss: torch.Tensor, sync: bool = True) -> None:
        """Backward of stage m's loss; on update steps also clipping, optimizer, scheduler."""
        opt = self.optimizers[m]
        if opt is None or not loss.requires_grad:
            return
        if self.nonfinite is not None:
            value = float(loss.detach())
            if not math.isfinite(value):
                if self.nonfinite == "raise":
                    raise NonFiniteLossError(m, self.step_count, value)
                self.skipped_updates[m] += 1
                opt.zero_grad(set_to_none=True)
                return
        scaler = self.scalers[m]
        if self.grad_accumulation > 1:
            loss = loss / self.grad_accumulation
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.invertible:
            self._inverted_backward(m, opt)
        if not sync:
            return
        if self.clip_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self._stage_parameters(m), self.clip_grad_norm)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        sched = self.schedulers[m]
        if sched is not None:
            sched.step()

    def _inverted_backward(self, m: int, opt: torch.optim.Optimizer) -> None:
        ctx, self._inverted[m] = self._inverted[m], None
        device = self.stages[m].device
        errors = ctx.backward(ctx.output.grad, lambda: self._autocast(device))
        self.inversion_errors[m] = errors
        bad = InvertedStage.first_violation(errors, self.max_inversion_error)
        if bad is not None:
            opt.zero_grad(set_to_none=True)
            block = sum(self.balance[:m]) + bad[0]
            raise InversionError(m, block, bad[1], self.max_inversion_error)

    def move_args(self, device: torch.device, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Move block arguments to ``device`` (tensors and objects with ``.to``)."""
        moved_args = tuple(to_device(a, device, f"block_args[{i}]") for i, a in enumerate(args))
        moved_kwargs = {k: to_device(v, device, f"block_kwargs[{k!r}]") for k, v in kwargs.items()}
        return moved_args, moved_kwargs

    # ------------------------------------------------------------------ inference

    def forward(
        self,
        x0: torch.Tensor,
        *block_args: Any,
        exit_at: int | None = None,
        return_all: bool = False,
        **block_kwargs: Any,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Run the network up to stage ``exit_at`` (1-based; default: all stages).

        The output of a stage with an auxiliary head is that head's output. Gradients are
        tracked as for any module; wrap calls in ``torch.no_grad()`` for inference.

        Args:
            x0: the input of the first block.
            *block_args: extra positional arguments passed to every block.
            exit_at: the last stage to run, between 1 and ``num_stages``.
            return_all: return the list of every stage's output up to ``exit_at`` instead.
            **block_kwargs: extra keyword arguments passed to every block.
        """
        last = self.num_stages if exit_at is None else exit_at
        if isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= self.num_stages:
            raise ValueError(
                f"exit_at: got {exit_at!r}; expected an int between 1 and {self.num_stages} "
                "(the number of stages) or None for all"
            )
        self.synchronize()
        moved: dict[torch.device, tuple[tuple, dict]] = {}
        x = x0
        outputs = []
        for m in range(last):
            stage = self.stages[m]
            if stage.device not in moved:
                moved[stage.device] = self.move_args(stage.device, block_args, block_kwargs)
            args, kwargs = moved[stage.device]
            x = to_device(x, stage.device, "x")
            with self._autocast(stage.device):
                x = stage(x, *args, **kwargs)
            if return_all or m == last - 1:
                outputs.append(self.heads[m](x) if self._has_head[m] else x)
        return outputs if return_all else outputs[-1]

    # ------------------------------------------------------------------ state

    def get_extra_state(self) -> dict[str, Any]:
        """Optimizer, scheduler and scaler state of every stage, the step count and balance.

        Saved by ``state_dict()`` under the key ``_extra_state`` next to the parameters, so a
        wrapper nested in a larger module checkpoints and resumes with it.
        """
        self.synchronize()
        return {
            "version": _STATE_VERSION,
            "balance": list(self.balance),
            "step_count": self.step_count,
            "optimizers": [o.state_dict() if o is not None else None for o in self.optimizers],
            "schedulers": [s.state_dict() if s is not None else None for s in self.schedulers],
            "scalers": [s.state_dict() if s is not None else None for s in self.scalers],
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` saved (called by ``load_state_dict``)."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                "state_dict: '_extra_state' is not a greedywrap state of version "
                f"{_STATE_VERSION}; was it saved by GreedyWrapper.state_dict()?"
            )
        if list(state["balance"]) != list(self.balance):
            raise ValueError(
                f"state_dict: saved with splits={state['balance']}, but this wrapper has "
                f"splits={self.balance}; build the wrapper with the same splits to resume"
            )
        for kind, objs in (
            ("optimizers", self.optimizers),
            ("schedulers", self.schedulers),
            ("scalers", self.scalers),
        ):
            saved = state[kind]
            for m, (obj, sd) in enumerate(zip(objs, saved, strict=True)):
                if (obj is None) != (sd is None):
                    raise ValueError(
                        f"state_dict: stage {m} {kind[:-1]} state is "
                        f"{'missing' if sd is None else 'present'} in the checkpoint but the "
                        f"wrapper {'has' if obj is not None else 'has no'} {kind[:-1]}"
                    )
                if obj is not None:
                    obj.load_state_dict(sd)
        self.step_count = int(state["step_count"])

    # ------------------------------------------------------------------ device ownership

    def _apply(self, fn: Callable, recurse: bool = True) -> GreedyWrapper:  # type: ignore[override]
        # Moving the wrapper by hand would desynchronise stages from their workers; the wrapper
        # owns placement. Dtype changes and moves of a single-device wrapper are allowed.
        if hasattr(self, "_engine"):
            self.synchronize()
        before = [p.device for p in self.parameters()]
        result = super()._apply(fn, recurse)
        after = [p.device for p in self.parameters()]
        if before != after:
            if self._explicit_devices or self.distributed:
                raise RuntimeError(
                    "GreedyWrapper owns device placement: it was built with "
                    f"devices={[str(d) for d in self.devices]}; build a new wrapper with other "
                    "devices instead of moving it by hand"
                )
            new = after[0] if after else self.devices[0]
            self.devices = [new]
            for stage in self.stages:
                stage.device = new
            for opt in self.optimizers:
                if opt is not None:
                    for st in opt.state.values():
                        for k, v in st.items():
                            if isinstance(v, torch.Tensor) and v.dim() > 0:
                                st[k] = v.to(new)
            self._engine.close()
            self._engine = engines.make_engine(self)
        return result

    def synchronize(self) -> None:
        """Wait until every stage's pending update has finished (P-GLEAM).

        ``train_step`` may return while the last stages still update on their workers; call this
        before reading parameters directly. Inference, ``state_dict()`` and moves call it.

        Raises:
            StageError: a stage's backward or update failed on its worker.
        """
        self._engine.synchronize()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The parameters of every stage and head, plus the optimizer state (``_extra_state``)."""
        self.synchronize()
        return super().state_dict(*args, **kwargs)

    def close(self) -> None:
        """Wait for pending updates and stop worker threads. Safe to call twice."""
        self._engine.close()

    def __enter__(self) -> GreedyWrapper:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
