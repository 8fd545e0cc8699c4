"""One stage and everything it trains with: the object the engines drive.

A ``StageTrainer`` owns a stage's blocks, head, loss, optimizer, scheduler, scaler, DDP
wrapper and process group, and its counters; it offers ``forward`` (caller
thread), ``update`` (backward and step, on any thread) and
``state``. It holds no reference to the wrapper or to an engine, so a job
handed to a worker keeps only its own stage alive, and dropping the wrapper frees everything.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from greedywrap.inversion import InversionError, InvertedStage
from greedywrap.options import build_optimizers, build_schedulers
from greedywrap.stages import Stage, StageUnit, select_output

__all__ = ["NonFiniteLossError", "StageTrainer", "build_trainers", "select_output"]

LossFn = Callable[[Any, Any], torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """A stage's loss was NaN or Inf (raised when ``nonfinite="raise"``).

    ``stage`` is the 0-based stage, ``step`` the ``train_step`` call (1-based) whose loss it was,
    ``value`` the loss this process saw (finite when only another rank's loss was not).
    """

    def __init__(self, stage: int, step: int, value: float, detail: str = "") -> None:
        super().__init__(
            f"stage {stage}: loss is {value} at step {step}; its update was not applied"
            + (f"; {detail}" if detail else "")
        )
        self.stage = stage
        self.step = step
        self.value = value


class StageTrainer:
    """Stage m's blocks, head, loss, optimizer, scheduler, scaler, DDP wrapper and counters."""

    def __init__(
        self,
        stage: Stage,
        head: nn.Module,
        loss: LossFn,
        *,
        output: Any,
        precision: str,
        grad_accumulation: int,
        clip_grad_norm: float | None,
        nonfinite: str | None,
        invertible: bool,
        inversion_checkpoints: int,
        max_inversion_error: float | None,
        first_block: int,
    ) -> None:
        self.stage, self.head = stage, head  # a stage without a head has nn.Identity
        self.index = stage.index
        self.unit = StageUnit(stage, head, output)
        self.runner: nn.Module = self.unit  # replaced by a DDP wrapper under data parallelism
        self.group: Any = None
        self.loss_fn = loss
        self.output = output
        self.precision = precision
        self.grad_accumulation = grad_accumulation
        self.clip_grad_norm = clip_grad_norm
        self.nonfinite = nonfinite
        self.invertible = invertible
        self.inversion_checkpoints = inversion_checkpoints
        self.max_inversion_error = max_inversion_error
        self.first_block = first_block
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: torch.amp.GradScaler | None = None
        self.skipped_updates = 0
        self.inversion_errors: list[float] = []
        # A nonfinite micro-step poisons its whole accumulation window: nothing of it is applied.
        self.window_bad = False

    # ------------------------------------------------------------------ basics

    @property
    def device(self) -> torch.device:
        """The device of the stage's parameters."""
        return self.stage.device

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the blocks and the head, each once."""
        params = list(self.stage.parameters())
        seen = {id(p) for p in params}
        params += [p for p in self.head.parameters() if id(p) not in seen]
        return [p for p in params if p.requires_grad]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of ``precision`` on the stage's device (a no-op for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        # Autocast's cache of low-precision weight casts is shared between threads: a worker
        # recomputing a checkpointed block could hand the caller's next forward a cast of
        # weights from before their update. Without the cache each cast is made afresh (the
        # same bits, a little more work).
        return torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=False)

    def attach_ddp(self) -> None:
        """Wrap the stage and head in DDP with a process group of their own (collective)."""
        from torch.nn.parallel import DistributedDataParallel

        self.group = dist.new_group(ranks=list(range(dist.get_world_size())))
        if not any(p.requires_grad for p in self.unit.parameters()):
            return  # DDP refuses modules without trainable parameters
        self.runner = DistributedDataParallel(
            self.unit,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            process_group=self.group,
            # A buffer broadcast would be a collective in the caller's forward, racing the
            # workers' all-reduces on other communicators (see greedywrap.distributed). Buffers
            # are still synced once, when DDP is built.
            forward_sync_buffers=False,
        )

    def close(self) -> None:
        """Release the DDP wrapper and destroy the stage's process group (idempotent)."""
        self.runner = self.unit
        group, self.group = self.group, None
        if group is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group(group)

    # ------------------------------------------------------------------ forward / update

    def compute_loss(self, pred: Any, target: Any) -> torch.Tensor:
        """The stage's loss of ``pred`` against ``target``; ValueError naming the stage and the
        shapes if the loss raises or does not return a scalar (out of memory passes through)."""
        try:
            loss = self.loss_fn(pred, target)
        except torch.OutOfMemoryError:
            raise  # not a usage error: out of memory must stay what it is
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(
                f"loss: stage {self.index} raised {type(err).__name__} comparing its output "
                f"of shape {_shape(pred)} with the target of shape {_shape(target)}: {err}"
            ) from err
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss: stage {self.index} returned {got}; the loss must return a scalar "
                "(0-dim) tensor"
            )
        return loss

    def forward(
        self, inp: Any, target: Any, args: tuple, kwargs: dict, sync: bool
    ) -> tuple[Any, torch.Tensor, InvertedStage | None]:
        """Forward on a detached input.

        Returns ``(output state, loss, inverted)`` with the graph alive; ``inverted`` is the
        invertible stage's context (else ``None``), to hand to ``update`` with the loss, so
        nothing of one step is kept on the stage for another thread to read.
        """
        if self.invertible:
            ctx = InvertedStage.forward(
                self.stage.blocks, inp, args, kwargs, self.inversion_checkpoints, self.autocast
            )
            with self.autocast():
                pred = self.head(select_output(ctx.output, self.output))
                return ctx.output, self.compute_loss(pred, target), ctx
        # Under DDP, micro-steps that do not update skip the gradient all-reduce.
        no_sync = getattr(self.runner, "no_sync", None)
        quiet = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        with quiet, self.autocast():
            out, pred = self.runner(inp, *args, **kwargs)
            loss = self.compute_loss(pred, target)
        return out, loss, None

    def prediction(self, out: Any) -> Any:
        """What inference returns for this stage's output: the selection, through the head."""
        return self.head(select_output(out, self.output))

    def _agreed_nonfinite(self, loss: torch.Tensor) -> tuple[bool, float]:
        """Whether this stage's loss is nonfinite on any rank (one all-reduce under DDP)."""
        value = float(loss.detach())
        bad = not math.isfinite(value)
        if self.group is not None:
            dev = self.device if self.device.type == "cuda" else torch.device("cpu")
            flag = torch.tensor([1.0 if bad else 0.0], device=dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            bad = bool(flag.item() > 0)
        return bad, value

    def update(
        self,
        loss: torch.Tensor,
        sync: bool,
        step: int,
        inverted: InvertedStage | None = None,
    ) -> None:
        """Backward of the loss; on update steps also clipping, optimizer and scheduler.

        ``step`` is the ``train_step`` call this loss belongs to (captured when the update was
        submitted, so errors name it even when the update runs later on a worker), ``inverted``
        what ``forward`` returned with it. Whatever fails, no partial gradient is left behind
        and the rest of the accumulation window is dropped.
        """
        opt = self.optimizer
        if opt is None or not loss.requires_grad:
            return
        try:
            self._update(opt, loss, sync, step, inverted)
        except BaseException:
            opt.zero_grad(set_to_none=True)
            # The window lost this micro-step's gradient: none of it may be applied.
            self.window_bad = not sync
            raise

    def _discard(self, opt: torch.optim.Optimizer, loss: torch.Tensor, sync: bool) -> None:
        """Apply nothing of this micro-step (and of its window)."""
        if self.runner is not self.unit and sync:
            # DDP expects the backward its synced forward prepared, on every rank; the
            # gradients it reduces are thrown away just below.
            loss.backward(torch.zeros_like(loss))
        opt.zero_grad(set_to_none=True)

    def _update(
        self,
        opt: torch.optim.Optimizer,
        loss: torch.Tensor,
        sync: bool,
        step: int,
        inverted: InvertedStage | None,
    ) -> None:
        if self.nonfinite is not None:
            bad, value = self._agreed_nonfinite(loss)
            if bad:
                self._discard(opt, loss, sync)
                if self.nonfinite == "raise":
                    detail = "" if not math.isfinite(value) else "another rank's was not finite"
                    raise NonFiniteLossError(self.index, step, value, detail)
                if not self.window_bad:
                    self.skipped_updates += 1
                self.window_bad = not sync
                return
            if self.window_bad:
                # An earlier micro-step of this window was skipped: the window is not applied.
                self._discard(opt, loss, sync)
                self.window_bad = not sync
                return
        scaler = self.scaler
        if self.grad_accumulation > 1:
            loss = loss / self.grad_accumulation
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if inverted is not None:
            self._inverted_backward(inverted)
        if not sync:
            return
        if self.clip_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.clip_grad_norm)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def _inverted_backward(self, ctx: InvertedStage) -> None:
        errors = ctx.backward(ctx.output.grad, self.autocast)
        self.inversion_errors = errors
        bad = InvertedStage.first_violation(errors, self.max_inversion_error)
        if bad is not None:
            raise InversionError(
                self.index, self.first_block + bad[0], bad[1], self.max_inversion_error
            )

    # ------------------------------------------------------------------ state

    def state(self, mid_window: bool) -> dict[str, Any]:
        """Optimizer, scheduler, scaler state and counters; gradients too when mid-window."""
        grads = None
        if mid_window and self.optimizer is not None:
            grads = [None if p.grad is None else p.grad.detach().clone() for p in self.parameters()]
        return {
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "skipped_updates": self.skipped_updates,
            "window_bad": self.window_bad,
            "grads": grads,
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ValueError if ``state`` cannot be loaded into this stage (nothing is changed)."""
        for kind in ("optimizer", "scheduler", "scaler"):
            obj, sd = getattr(self, kind), state.get(kind)
            if (obj is None) != (sd is None):
                raise ValueError(
                    f"state_dict: stage {self.index} {kind} state is "
                    f"{'missing' if sd is None else 'present'} in the checkpoint but the "
                    f"wrapper {'has' if obj is not None else 'has no'} {kind}"
                )
        opt, sd = self.optimizer, state.get("optimizer")
        if opt is not None and sd is not None:
            saved = [len(g["params"]) for g in sd.get("param_groups", [])]
            have = [len(g["params"]) for g in opt.param_groups]
            if saved != have:
                raise ValueError(
                    f"state_dict: stage {self.index} optimizer was saved with parameter groups "
                    f"of sizes {saved}, but this stage's optimizer has {have}"
                )
        grads, n = state.get("grads"), len(self.parameters())
        if grads is not None and len(grads) != n:
            raise ValueError(
                f"state_dict: stage {self.index} saved {len(grads)} gradients for {n} parameters"
            )

    def load_state(self, state: dict[str, Any]) -> None:
        """Load what ``state`` returned (call ``check_state`` on every stage first)."""
        self.check_state(state)
        for kind in ("optimizer", "scheduler", "scaler"):
            obj = getattr(self, kind)
            if obj is not None:
                obj.load_state_dict(state[kind])
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.window_bad = bool(state.get("window_bad", False))
        params = self.parameters()
        grads = state.get("grads")
        for p, g in zip(params, grads or [None] * len(params), strict=True):
            p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)

    def convert_optimizer_state(self) -> None:
        """After a move or a dtype change, bring the optimizer state along with the parameters."""
        if self.optimizer is None:
            return
        for p, st in self.optimizer.state.items():
            for k, v in st.items():
                if not isinstance(v, torch.Tensor) or v.dim() == 0:
                    continue  # step counters stay where the optimizer keeps them
                dtype = p.dtype if (v.is_floating_point() and p.is_floating_point()) else v.dtype
                st[k] = v.to(device=p.device, dtype=dtype)


def _shape(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return tuple(obj.shape)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_shape(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()}
    return type(obj).__name__


def build_trainers(
    stages: Sequence[Stage],
    heads: Sequence[nn.Module],
    losses: Sequence[LossFn],
    *,
    optimizer: Any,
    optimizer_kwargs: dict[str, Any] | None,
    scheduler: Any,
    distributed: bool,
    precision: str,
    **options: Any,
) -> list[StageTrainer]:
    """One ``StageTrainer`` per stage, with its optimizer, scheduler, scaler and DDP wrapper.

    ``options`` are the per-stage settings of ``StageTrainer`` (``output``,
    ``grad_accumulation``, ``clip_grad_norm``, ``nonfinite``, ``invertible``, ...). Under data
    parallelism this is a collective: every rank creates the stages' groups in stage order.
    """
    trainers = [
        StageTrainer(
            stage, head, loss, precision=precision, first_block=stage.first_block, **options
        )
        for stage, head, loss in zip(stages, heads, losses, strict=True)
    ]
    optimizers = build_optimizers(optimizer, optimizer_kwargs, [t.parameters() for t in trainers])
    schedulers = build_schedulers(scheduler, optimizers)
    for t, opt, sched in zip(trainers, optimizers, schedulers, strict=True):
        t.optimizer, t.scheduler = opt, sched
        if precision == "fp16" and opt is not None:
            t.scaler = torch.amp.GradScaler("cuda")
    if distributed:
        for t in trainers:
            t.attach_ddp()
    return trainers
