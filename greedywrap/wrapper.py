"""GreedyWrapper: train any sequence of blocks greedily, stage by stage, with local losses."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from greedywrap import distributed as _dist
from greedywrap import engines
from greedywrap.options import (
    check_options,
    move_args,
    per_stage,
    to_device,
)
from greedywrap.stages import (
    DeviceLike,
    Stage,
    assign_devices,
    check_balance,
    even_balance,
    find_shared_parameters,
    normalize_device,
    read_blocks,
)
from greedywrap.trainer import LossFn, NonFiniteLossError, build_trainers

__all__ = ["GreedyWrapper", "NonFiniteLossError", "default_loss"]


def default_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error that refuses shapes which only broadcast.

    ``mse_loss`` broadcasts ``(4, 16, 16)`` against ``(4, 1, 16, 16)`` with a warning and
    averages over the wrong elements; here any shape difference is an error.
    """
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(
            f"the default loss compares two tensors, got {type(pred).__name__} and "
            f"{type(target).__name__}; pass loss=... (or output=... to choose the prediction)"
        )
    if pred.shape != target.shape:
        raise ValueError(
            f"shapes differ ({tuple(pred.shape)} vs {tuple(target.shape)}); the default loss "
            "(mean squared error) needs equal shapes and does not broadcast"
        )
    # mse_loss may return a 0-dim view of its elementwise buffer; the clone lets that buffer go
    # as soon as the forward is done instead of keeping it until the backward.
    return nn.functional.mse_loss(pred, target).clone()


OptimizerSpec = type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

# Version 2 adds skipped_updates, the accumulation-window flags and mid-window gradients;
# version 1 states load with those at their defaults.
_STATE_VERSION = 2


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
            stage. Default [`default_loss`][greedywrap.wrapper.default_loss]: mean squared
            error that refuses shapes which differ (also those that would only broadcast).
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
            host synchronisation), ``"raise"`` (raise
            [`NonFiniteLossError`][greedywrap.NonFiniteLossError] naming the stage and step,
            before the update) or ``"skip"`` (skip that stage's update and count it in
            ``skipped_updates``). Checking reads the loss on the host once per stage.
            With ``grad_accumulation > 1`` a nonfinite micro-step skips its whole window
            (counted once). Under data parallelism the processes all-reduce one flag, so they
            all skip (or all raise) together.
        invertible: train by inversion (MEL) instead of storing activations: every block
            must implement ``inverse(y, *block_args, **block_kwargs)``; each stage keeps only
            its output and ``inversion_checkpoints`` inputs, and recovers the others in
            backward by inversion (see ``greedywrap.inversion``). Combines with ``splits``.
        inversion_checkpoints: block inputs kept per stage besides the stage input, evenly
            spaced, so inversion errors cannot accumulate over long runs of blocks.
        max_inversion_error: raise ``greedywrap.inversion.InversionError`` (before the
            update) when a block's relative inversion error exceeds this; the errors of the
            last step are in ``inversion_errors`` either way.
        max_in_flight: with several device entries, at most this many stage updates may be
            pending at once; the forward chain waits for the oldest beyond it. Each pending
            update keeps its stage's graph alive, so this bounds P-GLEAM's extra memory
            (``None``, the default: no bound, the most overlap).
        timeout: seconds any wait on a worker may last before it is reported as hung.
        output: what the head and the loss see of a stage's output, for blocks whose state is
            more than one tensor (a block may return any tuple/list/dict of tensors, e.g.
            ``(x, z)`` of a primal-dual unroll; it is detached leaf by leaf between stages):
            ``None`` (default) passes the whole state, an int or str picks ``state[output]``,
            a callable ``f(state)`` computes it. Inference returns the same selection.

    Every read or write of the weights through the wrapper (``forward``, ``state_dict``,
    ``load_state_dict``, ``parameters``, ``to``, ``copy.deepcopy``) first waits for pending
    P-GLEAM updates ([`synchronize`][greedywrap.GreedyWrapper.synchronize]). Call
    [`close`][greedywrap.GreedyWrapper.close] when done: it stops the workers and, under data
    parallelism, releases each stage's DDP wrapper and process group (before
    ``destroy_process_group()``).

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
        output: int | str | Callable[[Any], Any] | None = None,
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
        head_list = (
            [None] * num_stages
            if heads is None
            else per_stage(heads, "heads", num_stages, lambda v: False)
        )
        for m, head in enumerate(head_list):
            if head is not None and not isinstance(head, nn.Module):
                raise TypeError(f"heads: entry {m} is {head!r}; expected an nn.Module or None")
        shared = find_shared_parameters(groups, head_list)
        if shared:
            name, first, other = shared[0]
            merged = balance[:first] + [sum(balance[first : other + 1])] + balance[other + 1 :]
            hint = (
                "give every stage a head of its own"
                if name.startswith("head")
                else f"put the blocks that share weights in the same stage (e.g. "
                f"splits={merged}) or untie them"
            )
            raise ValueError(
                f"model: parameter '{name}' of stage {first} is also used by stage {other}. "
                "Greedy training gives every stage its own optimizer and detaches stage inputs, "
                "so weights tied across stages would be updated by two optimizers with "
                f"conflicting local losses; {hint}"
            )

        timeout = check_options(
            blocks=blocks, precision=precision, clip_grad_norm=clip_grad_norm,
            checkpoint=checkpoint, grad_accumulation=grad_accumulation, nonfinite=nonfinite,
            invertible=invertible, inversion_checkpoints=inversion_checkpoints,
            max_inversion_error=max_inversion_error, timeout=timeout, placement=placement,
        )  # fmt: skip
        if output is not None and not (callable(output) or isinstance(output, (int, str))):
            raise TypeError(
                f"output: got {output!r}; expected None, an int or str key of the blocks' "
                "output, or a callable f(state) -> prediction"
            )
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
            if not isinstance(devices, (list, tuple)):
                raise TypeError(
                    f"devices: got {devices!r} of type {type(devices).__name__}; expected a "
                    "list of devices (ints, 'cpu', 'cuda:i' or torch.device), e.g. [0, 1]"
                )
            device_list = [normalize_device(d) for d in devices]
            stage_entry = assign_devices(device_list, num_stages, placement)
        if precision == "fp16" and any(device_list[e].type != "cuda" for e in stage_entry):
            raise ValueError(
                "precision: 'fp16' needs every stage on a CUDA device (GradScaler); "
                "use 'bf16' on CPU"
            )
        if max_in_flight is not None and (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or max_in_flight < 1
        ):
            raise ValueError(f"max_in_flight: got {max_in_flight!r}; expected an int >= 1 or None")
        loss_list = per_stage(
            loss if loss is not None else default_loss, "loss", num_stages, callable
        )

        firsts = [sum(balance[:m]) for m in range(num_stages)]
        self.stages = nn.ModuleList(
            Stage(group, m, device_list[stage_entry[m]], checkpoint, firsts[m])
            for m, group in enumerate(groups)
        )
        self.heads = nn.ModuleList(h if h is not None else nn.Identity() for h in head_list)
        for m, stage in enumerate(self.stages):
            stage.to(stage.device)
            self.heads[m].to(stage.device)
        self.distributed = _dist.use_distributed(distributed)
        if invertible and self.distributed:
            raise ValueError("invertible: MEL is not supported with distributed data parallelism")

        # Everything a stage trains with lives in its StageTrainer; the engine drives those.
        self._trainers = build_trainers(
            self.stages, self.heads, loss_list, optimizer=optimizer,
            optimizer_kwargs=optimizer_kwargs, scheduler=scheduler, distributed=self.distributed,
            output=output, precision=precision, grad_accumulation=grad_accumulation,
            clip_grad_norm=clip_grad_norm, nonfinite=nonfinite, invertible=invertible,
            inversion_checkpoints=inversion_checkpoints, max_inversion_error=max_inversion_error,
        )  # fmt: skip

        self.grad_accumulation = grad_accumulation
        self.devices = device_list
        self.stage_entry = stage_entry
        self.balance = balance
        self.precision = precision
        self.clip_grad_norm = clip_grad_norm
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.checkpoint = checkpoint
        self.nonfinite = nonfinite
        self.invertible = invertible
        self.inversion_checkpoints = inversion_checkpoints
        self.max_inversion_error = max_inversion_error
        self.output = output
        self.step_count = 0
        self._closed = False
        self._engine = self._make_engine()

    def _make_engine(self) -> engines.SequentialEngine | engines.AsyncEngine:
        return engines.make_engine(
            self._trainers, self.devices, self.stage_entry, self.timeout, self.max_in_flight
        )

    # ------------------------------------------------------------------ per-stage views

    @property
    def num_stages(self) -> int:
        """The number of stages M."""
        return len(self.stages)

    @property
    def stage_devices(self) -> list[torch.device]:
        """The device of each stage."""
        return [stage.device for stage in self.stages]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer | None]:
        """Each stage's optimizer (``None`` for a stage with nothing to train)."""
        self.synchronize()  # workers change it; a read sees every pending update
        return [t.optimizer for t in self._trainers]

    @property
    def schedulers(self) -> list[Any]:
        """Each stage's LR scheduler or ``None``."""
        self.synchronize()  # workers change it; a read sees every pending update
        return [t.scheduler for t in self._trainers]

    @property
    def scalers(self) -> list[torch.amp.GradScaler | None]:
        """Each stage's GradScaler (``precision="fp16"``) or ``None``."""
        self.synchronize()  # workers change it; a read sees every pending update
        return [t.scaler for t in self._trainers]

    @property
    def losses(self) -> list[LossFn]:
        """Each stage's loss function."""
        return [t.loss_fn for t in self._trainers]

    @property
    def skipped_updates(self) -> list[int]:
        """Per stage, the updates skipped for a nonfinite loss (``nonfinite="skip"``).

        With ``grad_accumulation > 1`` a nonfinite micro-step skips its whole window, counted
        once. Saved by ``state_dict()``.
        """
        self.synchronize()  # workers change it; a read sees every pending update
        return [t.skipped_updates for t in self._trainers]

    @property
    def inversion_errors(self) -> list[list[float]]:
        """Per stage, each block's relative inversion error in the last step (MEL)."""
        self.synchronize()  # workers change it; a read sees every pending update
        return [list(t.inversion_errors) for t in self._trainers]

    # ------------------------------------------------------------------ training

    def train_step(
        self, x0: Any, target: Any, *block_args: Any, **block_kwargs: Any
    ) -> list[torch.Tensor]:
        """Run one greedy step over all stages (GLEAM, Algorithm 1).

        Args:
            x0: the input of the first block: a tensor, or a tuple/list/dict of tensors.
            target: what every stage's output (or head output) is compared with.
            *block_args: extra positional arguments passed to every block.
            **block_kwargs: extra keyword arguments passed to every block.

        Returns:
            The loss of each stage, as detached 0-dim tensors of their own (holding one
            number, not the loss's buffers) on the stage's device; reading them with
            ``float()`` is what synchronises, not this call.

        Raises:
            ValueError: the loss cannot compare a stage's output with ``target``, or does not
                return a scalar.
            TypeError: a block returned something that cannot be carried to the next block.
        """
        if not isinstance(x0, torch.Tensor):
            leaves = torch.utils._pytree.tree_leaves(x0)
            if not leaves or not all(isinstance(v, torch.Tensor) for v in leaves):
                raise TypeError(
                    f"x0: got {type(x0).__name__}; expected a torch.Tensor or a "
                    "tuple/list/dict of tensors"
                )
        if not self.training:
            raise RuntimeError(
                "train_step: the wrapper is in eval mode; call .train() first (eval mode would "
                "train with inference behaviour of dropout/batch-norm)"
            )
        if self._closed:
            raise RuntimeError("train_step: the wrapper was closed; build a new one to train")
        step = self.step_count + 1
        sync = step % self.grad_accumulation == 0
        losses = self._engine.step(x0, target, block_args, block_kwargs, sync, step)
        # Counted only once every stage has run its part, so a step that fails (bad shapes,
        # an earlier update's error, Ctrl-C) does not shift accumulation windows and numbers.
        self.step_count = step
        return losses

    # ------------------------------------------------------------------ inference

    def forward(
        self,
        x0: Any,
        *block_args: Any,
        exit_at: int | None = None,
        return_all: bool = False,
        **block_kwargs: Any,
    ) -> Any:
        """Run the network up to stage ``exit_at`` (1-based; default: all stages).

        Waits for pending updates first. The output of a stage is its selected output
        (``output=``), passed through its head if it has one; heads run under the same
        autocast as the blocks. Gradients are tracked as for any module; wrap calls in
        ``torch.no_grad()`` for inference.

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
            t = self._trainers[m]
            if t.device not in moved:
                moved[t.device] = move_args(t.device, block_args, block_kwargs)
            args, kwargs = moved[t.device]
            x = to_device(x, t.device, "x")
            with t.autocast():
                x = t.stage(x, *args, **kwargs)
                if return_all or m == last - 1:
                    outputs.append(t.prediction(x))
        return outputs if return_all else outputs[-1]

    # ------------------------------------------------------------------ state

    def get_extra_state(self) -> dict[str, Any]:
        """Optimizer, scheduler and scaler state of every stage, counters, step count, balance.

        Saved by ``state_dict()`` under the key ``_extra_state`` next to the parameters, so a
        wrapper nested in a larger module checkpoints and resumes with it. In the middle of a
        ``grad_accumulation`` window it also holds the gradients accumulated so far, so the
        resumed run is exactly the uninterrupted one (under data parallelism these are the
        saving process's own, not yet averaged, gradients: save at a window boundary there).
        """
        self.synchronize()
        mid_window = self.step_count % self.grad_accumulation != 0
        states = [t.state(mid_window) for t in self._trainers]
        return {
            "version": _STATE_VERSION,
            "balance": list(self.balance),
            "step_count": self.step_count,
            "optimizers": [s["optimizer"] for s in states],
            "schedulers": [s["scheduler"] for s in states],
            "scalers": [s["scaler"] for s in states],
            "skipped_updates": [s["skipped_updates"] for s in states],
            "window_bad": [s["window_bad"] for s in states],
            "grads": [s["grads"] for s in states],
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore what ``get_extra_state`` saved (called by ``load_state_dict``).

        Accepts states of version 1 (before ``skipped_updates`` and mid-window gradients were
        saved; those start at zero) and 2.
        """
        if not isinstance(state, dict) or state.get("version") not in (1, _STATE_VERSION):
            raise ValueError(
                "state_dict: '_extra_state' is not a greedywrap state of version 1 or "
                f"{_STATE_VERSION}; was it saved by GreedyWrapper.state_dict()?"
            )
        if list(state["balance"]) != list(self.balance):
            raise ValueError(
                f"state_dict: saved with splits={state['balance']}, but this wrapper has "
                f"splits={self.balance}; build the wrapper with the same splits to resume, or "
                "move only the weights with model_state_dict()/load_model_state_dict()"
            )
        self.synchronize()
        n = self.num_stages
        per_stage_states = [
            {
                "optimizer": state["optimizers"][m],
                "scheduler": state["schedulers"][m],
                "scaler": state["scalers"][m],
                "skipped_updates": state.get("skipped_updates", [0] * n)[m],
                "window_bad": state.get("window_bad", [False] * n)[m],
                "grads": state.get("grads", [None] * n)[m],
            }
            for m in range(n)
        ]
        # Every stage is checked before any is loaded: a mismatch at stage k must not leave
        # stages 0..k-1 loaded and the rest not.
        for t, st in zip(self._trainers, per_stage_states, strict=True):
            t.check_state(st)
        for t, st in zip(self._trainers, per_stage_states, strict=True):
            t.load_state(st)
        self.step_count = int(state["step_count"])

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # Runs before the stages' parameters are copied, also when the wrapper is nested in a
        # larger module: no pending update may land on (or read) the loaded weights.
        self.synchronize()
        super()._load_from_state_dict(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The parameters of every stage and head, plus the optimizer state (``_extra_state``).

        Keys are ``stages.<m>.blocks.<j>.*``, ``heads.<m>.*`` and ``_extra_state``: they
        depend on the splits. For weights that do not, see
        [`model_state_dict`][greedywrap.GreedyWrapper.model_state_dict].
        """
        self.synchronize()
        return super().state_dict(*args, **kwargs)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The blocks' weights with the keys of ``nn.Sequential(*blocks).state_dict()``.

        Independent of ``splits`` (and of devices): load them into a wrapper with other splits
        with [`load_model_state_dict`][greedywrap.GreedyWrapper.load_model_state_dict], or
        into the plain model. Heads, optimizer state and counters are not included (use
        ``state_dict()`` to resume training).
        """
        self.synchronize()
        return nn.Sequential(*self._blocks()).state_dict()

    def load_model_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> Any:
        """Load weights saved by ``model_state_dict()`` (or by a plain ``nn.Sequential``).

        Waits for pending updates first; optimizer state is left as it is.
        Returns what ``nn.Module.load_state_dict`` returns (missing and unexpected keys).
        """
        self.synchronize()
        return nn.Sequential(*self._blocks()).load_state_dict(state_dict, strict=strict)

    def _blocks(self) -> list[nn.Module]:
        return [block for stage in self.stages for block in stage.blocks]

    # ------------------------------------------------------------------ reads wait for updates

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        """As ``nn.Module.named_parameters``, after every pending update has landed."""
        if "_engine" in self.__dict__:
            self.synchronize()
        return super().named_parameters(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> GreedyWrapper:
        """A copy with the same weights and state and workers of its own (pending updates land
        first). Refused under data parallelism (process groups cannot be copied)."""
        if self.distributed:
            raise RuntimeError(
                "deepcopy: a distributed wrapper holds per-stage DDP process groups, which "
                "cannot be copied; build a new wrapper and load_state_dict() instead"
            )
        self.synchronize()
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "_engine":
                new.__dict__[key] = copy.deepcopy(value, memo)
        new._engine = new._make_engine()
        return new

    # ------------------------------------------------------------------ device ownership

    def _apply(self, fn: Callable, recurse: bool = True) -> GreedyWrapper:  # type: ignore[override]
        # Moving the wrapper by hand would desynchronise stages from their workers; the wrapper
        # owns placement. Dtype changes and moves of a single-device wrapper are allowed.
        if "_engine" in self.__dict__:
            self.synchronize()
            if self._explicit_devices or self.distributed:
                self._refuse_moves(fn)
        params = list(super().parameters())
        before = [p.device for p in params]
        result = super()._apply(fn, recurse)
        after = [p.device for p in super().parameters()]
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
            self._engine.close()
            self._engine = self._make_engine()
        if "_trainers" in self.__dict__:
            # Optimizer state follows the parameters' device and dtype (e.g. after .double()).
            for t in self._trainers:
                t.convert_optimizer_state()
        return result

    def _refuse_moves(self, fn: Callable) -> None:
        # Probed on an empty tensor per device *before* anything is converted, so a refused
        # move leaves parameters and optimizer state as they were.
        for device in dict.fromkeys(self.devices):
            probe = fn(torch.empty(0, device=device))
            if isinstance(probe, torch.Tensor) and probe.device != device:
                raise RuntimeError(
                    "GreedyWrapper owns device placement: it was built with "
                    f"devices={[str(d) for d in self.devices]}; build a new wrapper with other "
                    f"devices instead of moving it by hand (to {probe.device})"
                )

    def synchronize(self) -> None:
        """Wait until every stage's pending update has finished (P-GLEAM).

        On CUDA this also waits for the kernels the workers queued on their streams.
        ``train_step`` may return while the last stages still update on their workers; every
        read or write of the weights through the wrapper (``forward``, ``state_dict``,
        ``load_state_dict``, ``parameters``, ``to``, ``copy.deepcopy``) calls it first.

        Raises:
            NonFiniteLossError: a stage's loss was not finite (``nonfinite="raise"``).
            InversionError: an invertible stage's reconstruction error was too large.
            StageError: any other failure of a stage's backward or update on its worker.
        """
        self._engine.synchronize()

    def close(self) -> None:
        """Wait for pending updates, stop worker threads, release each stage's DDP wrapper and
        destroy its process group. Call it before ``destroy_process_group()``. Safe to call
        twice; a closed wrapper still runs inference but no longer trains."""
        self._closed = True
        try:
            self._engine.close()
        finally:
            running = set(self._engine.still_running())
            for t in self._trainers:
                if t.index in running and t.group is not None:
                    # Its worker may be inside a collective on this group: destroying the group
                    # under it could crash the process, so it is left to the interpreter's exit.
                    warnings.warn(
                        f"close: stage {t.index}'s update is still running after the timeout; "
                        "its DDP wrapper and process group are kept",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    continue
                t.close()

    def __enter__(self) -> GreedyWrapper:
        """``with GreedyWrapper(...) as gw:`` closes the wrapper when the block ends."""
        return self

    def __exit__(self, *exc: Any) -> None:
        """Close the wrapper (see [`close`][greedywrap.GreedyWrapper.close])."""
        self.close()
