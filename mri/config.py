"""Experiment configs: typed sections read from YAML, checked before any training starts.

A config names the data, the model, the training method and the evaluation. Files live in
``mri/configs/`` (the paper's experiments and small CPU presets) and are loaded by name or path
with [`load_config`][mri.config.load_config]. Unknown keys, wrong types and impossible values
raise [`ConfigError`][mri.config.ConfigError] naming the key. Numbers are read the way people
write them: ``1e-3`` is a float in a YAML file and in a ``--set`` override alike (plain PyYAML
follows YAML 1.1, which wants ``1.0e-3`` and reads ``1e-3`` as a string).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "EvalConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "list_configs",
    "parse_yaml",
    "CONFIG_DIR",
]

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config key that is unknown, of the wrong type or of an impossible value."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-3``, ``2E5`` and ``.5e1`` are numbers."""


# YAML 1.1 (PyYAML) requires a dot in a float's mantissa and a sign in its exponent, so the
# common ``1e-3`` would be a string. Added after the built-in resolvers, this one only decides
# scalars that none of them claimed.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text as config files and ``--set`` values are read (YAML 1.2 floats).

    Raises:
        yaml.YAMLError: the text is not valid YAML.
    """
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class DataConfig:
    """Where the data comes from and how it is undersampled.

    Attributes:
        kind: ``"2d"`` slices, ``"3d"`` volumes or ``"cine"`` (2D+time).
        shape: the spatial shape of the built-in data (``[H, W]``, ``[D, H, W]`` or
            ``[T, H, W]``); ignored for prepared data on disk.
        num_coils: receive coils of the built-in data.
        num_train: training slices (volumes, series) of the built-in data.
        num_val: validation items of the built-in data.
        num_test: test items of the built-in data.
        noise: complex noise level of the built-in data (relative to the signal).
        seed: seed of the built-in data.
        mask: ``"poisson"``, ``"random1d"``, ``"equispaced1d"`` or ``"kt"`` (cine).
        accel: acceleration R (>= 1).
        calib: fully sampled calibration width (Poisson disc, k-t).
        center_fraction: fully sampled centre fraction (1D masks).
        maps: coil maps the built-in data stores for reconstruction: ``"espirit"`` or
            ``"jsense"`` estimates from the calibration region, or ``"true"`` (the maps the
            data were simulated with: an inverse crime, for comparison only).
        mask_bank: 0 draws a fresh random training mask for every sample (as the paper);
            N > 0 reuses a bank of N seeded masks.
    """

    kind: Literal["2d", "3d", "cine"] = "2d"
    shape: list[int] = field(default_factory=lambda: [96, 96])
    num_coils: int = 8
    num_train: int = 32
    num_val: int = 4
    num_test: int = 8
    noise: float = 0.01
    seed: int = 0
    mask: Literal["poisson", "random1d", "equispaced1d", "kt"] = "poisson"
    accel: float = 6.0
    calib: int = 16
    center_fraction: float = 0.08
    maps: Literal["espirit", "jsense", "true"] = "espirit"
    mask_bank: int = 0


@dataclass
class ModelConfig:
    """The unrolled network.

    Attributes:
        type: ``"pgd"`` (unrolled proximal gradient descent) or ``"modl"``.
        num_unrolls: the number of blocks N.
        features: channels of the hidden convolutions.
        num_resblocks: residual blocks per PGD prox.
        num_layers: convolutions per MoDL denoiser.
        cg_iters: conjugate-gradient iterations per MoDL DC step.
        mu: initial MoDL regularisation weight.
        step_size: the PGD gradient step (negative; its initial value if learnable).
        learnable_step: train the PGD step (meddlr's choice) instead of fixing it at
            ``step_size`` (the official GLEAM code's fixed ``x - 2 * grad``).
        learnable_mu: train the MoDL weight ``mu`` (kept positive) instead of fixing it (the
            official GLEAM MoDL fixes it).
        conv_dim: 2 for slices, 3 for volumes and cine.
    """

    type: Literal["pgd", "modl"] = "pgd"
    num_unrolls: int = 8
    features: int = 32
    num_resblocks: int = 2
    num_layers: int = 5
    cg_iters: int = 10
    mu: float = 0.05
    step_size: float = -2.0
    learnable_step: bool = False
    learnable_mu: bool = True
    conv_dim: Literal[2, 3] = 2


@dataclass
class TrainConfig:
    """How to train.

    Attributes:
        method: ``"e2e"`` (end-to-end), ``"checkpoint"`` (end-to-end with a checkpoint per
            unroll), ``"gleam"`` (greedy, ``splits`` stages), ``"pgleam"`` (greedy with
            stages on ``devices``) or ``"mel"`` (end-to-end, memory-efficient learning by
            inversion).
        splits: the number of stages M for greedy methods (1 <= M <= num_unrolls).
        checkpoint_blocks: also checkpoint the blocks inside each greedy stage.
        devices: devices for ``pgleam`` (e.g. ``[0, 1]`` or ``["cpu", "cpu"]``).
        batch_size: samples per step.
        lr: Adam learning rate (> 0).
        weight_decay: Adam's L2 weight decay (>= 0; the official GLEAM code uses 1e-4).
        lr_schedule: ``"constant"`` (the paper's) or ``"cosine"``: each stage's learning rate
            falls from ``lr`` to 0 along half a cosine over ``iterations`` updates, so a short
            CPU run ends with small steps and a flat loss curve.
        iterations: training steps.
        val_every: validate every this many steps (and at the end).
        log_every: print and log every this many steps.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        clip_grad_norm: clip each stage's gradient norm (``null`` for no clipping).
        invertible: train each greedy stage by inversion (GLEAM + MEL); ``method: mel`` is
            end-to-end by inversion. Needs ``model.type: modl`` (its blocks can be inverted).
        mel_checkpoints: block inputs kept per stage when training by inversion (the paper's
            MEL runs needed 7 for stability).
        mel_max_error: stop when a block's relative inversion error exceeds this
            (``null``: never stop, only report).
        seed: seed of initialisation, mask draws and data order.
        num_workers: data-loader worker processes.
    """

    method: Literal["e2e", "checkpoint", "gleam", "pgleam", "mel"] = "gleam"
    splits: int = 4
    checkpoint_blocks: bool = False
    devices: list[int | str] | None = None
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    iterations: int = 200
    val_every: int = 50
    log_every: int = 10
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    clip_grad_norm: float | None = None
    invertible: bool = False
    mel_checkpoints: int = 7
    mel_max_error: float | None = 0.05
    seed: int = 0
    num_workers: int = 0


@dataclass
class EvalConfig:
    """How to evaluate.

    Attributes:
        cs: the compressed-sensing baseline (`mri.cs`): ``"l1wavelet"``, ``"tv"`` (isotropic
            spatial + temporal TV), ``"l1wavelet_tv"`` (both, the paper's cine CS) or ``"none"``.
        cs_lamda: its main weight, the wavelet weight for ``"l1wavelet_tv"`` (``null`` for the
            module's default).
        cs_iters: its iterations, all of them run (no early stop): choose enough that 4x as
            many change the validation PSNR by less than 0.05 dB (the configs' comments say
            what was measured).
        max_slices: evaluate at most this many test items (``null`` for all).
    """

    cs: Literal["l1wavelet", "tv", "l1wavelet_tv", "none"] = "l1wavelet"
    cs_lamda: float | None = None
    cs_iters: int = 100
    max_slices: int | None = None


@dataclass
class Config:
    """A whole experiment: ``name``, ``description`` and the four sections."""

    name: str = "unnamed"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            (inner,) = typing.get_args(tp)
            return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int or tp is str or tp is bool:
        if type(value) is tp:
            return value
    raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")


def _section(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        # Odd keys (empty, spaced, not strings) are quoted so the message still shows them.
        shown = key if isinstance(key, str) and re.fullmatch(r"[\w-]+", key) else repr(key)
        where = shown if prefix == "config" else f"{prefix}.{shown}"
        raise ConfigError(f"{where}: unknown key; valid keys of '{prefix}' are {', '.join(names)}")
    values = {}
    for name in names:
        if name in raw:
            # Keys are named as an override writes them (``train.lr``), without the root's name.
            sub = name if prefix == "config" else f"{prefix}.{name}"
            if dataclasses.is_dataclass(hints[name]):
                values[name] = _section(hints[name], raw[name], sub)
            else:
                values[name] = _coerce(sub, raw[name], hints[name])
    return cls(**values)


def _check_values(cfg: Config) -> None:
    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.eval

    def need(ok: bool, key: str, value: Any, valid: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: got {value!r}; {valid}")

    rank = {"2d": 2, "3d": 3, "cine": 3}[d.kind]
    need(
        len(d.shape) == rank and min(d.shape[-2:]) >= 8 and min(d.shape) >= 2,
        "data.shape",
        d.shape,
        f"kind {d.kind!r} needs {rank} sizes, H and W >= 8 (and D or T >= 2)",
    )
    for key in ("num_coils", "num_train", "num_val", "num_test"):
        need(getattr(d, key) >= 1, f"data.{key}", getattr(d, key), "must be >= 1")
    need(d.noise >= 0, "data.noise", d.noise, "must be >= 0")
    need(d.accel >= 1, "data.accel", d.accel, "the acceleration must be >= 1")
    need(d.calib >= 0, "data.calib", d.calib, "must be >= 0")
    need(0 < d.center_fraction <= 1, "data.center_fraction", d.center_fraction, "must be in (0, 1]")
    need(d.mask_bank >= 0, "data.mask_bank", d.mask_bank, "must be >= 0 (0: fresh masks)")
    need((d.mask == "kt") == (d.kind == "cine"), "data.mask", d.mask,
         "use 'kt' for cine and 'poisson', 'random1d' or 'equispaced1d' otherwise")  # fmt: skip
    need(m.conv_dim == (2 if d.kind == "2d" else 3), "model.conv_dim", m.conv_dim,
         f"data.kind {d.kind!r} needs conv_dim {2 if d.kind == '2d' else 3}")  # fmt: skip
    for key in ("num_unrolls", "features", "num_resblocks", "cg_iters"):
        need(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be >= 1")
    need(m.num_layers >= 2, "model.num_layers", m.num_layers, "must be >= 2")
    need(m.mu > 0, "model.mu", m.mu, "must be > 0")
    need(m.step_size < 0, "model.step_size", m.step_size, "must be negative (a descent step)")
    if t.method in ("gleam", "pgleam"):
        need(1 <= t.splits <= m.num_unrolls, "train.splits", t.splits,
             f"must be between 1 and model.num_unrolls ({m.num_unrolls})")  # fmt: skip
    need(t.method != "pgleam" or bool(t.devices), "train.devices", t.devices,
         "method 'pgleam' needs a list of devices, e.g. [0, 1] or ['cpu', 'cpu']")  # fmt: skip
    need(
        not (t.method == "mel" or t.invertible) or m.type == "modl",
        "model.type",
        m.type,
        "training by inversion (method 'mel' or train.invertible) needs 'modl', whose blocks "
        "can be inverted",
    )
    need(t.mel_checkpoints >= 0, "train.mel_checkpoints", t.mel_checkpoints, "must be >= 0")
    need(t.mel_max_error is None or t.mel_max_error > 0, "train.mel_max_error",
         t.mel_max_error, "must be > 0 or null")  # fmt: skip
    need(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    need(t.lr > 0, "train.lr", t.lr, "the learning rate must be > 0")
    need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    need(t.iterations >= 1, "train.iterations", t.iterations, "must be >= 1")
    need(t.val_every >= 1, "train.val_every", t.val_every, "must be >= 1")
    need(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    need(t.clip_grad_norm is None or t.clip_grad_norm > 0, "train.clip_grad_norm",
         t.clip_grad_norm, "must be > 0 or null")  # fmt: skip
    need(t.num_workers >= 0, "train.num_workers", t.num_workers, "must be >= 0")
    need(e.cs_iters >= 1, "eval.cs_iters", e.cs_iters, "must be >= 1")
    need(e.cs_lamda is None or e.cs_lamda > 0, "eval.cs_lamda", e.cs_lamda, "must be > 0 or null")
    need(e.max_slices is None or e.max_slices >= 1, "eval.max_slices", e.max_slices,
         "must be >= 1 or null")  # fmt: skip


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and check a [`Config`][mri.config.Config] from a nested dict (as read from YAML).

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or an impossible value.
    """
    cfg = _section(Config, raw, "config")
    _check_values(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a plain nested dict (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def list_configs() -> list[str]:
    """Names of the configs shipped in ``mri/configs/``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Load a shipped config by name (``"cpu-demo"``) or a YAML file by path.

    Args:
        name_or_path: a name from [`list_configs`][mri.config.list_configs] or a path to a
            YAML file.
        overrides: dotted keys to replace, e.g. ``{"train.iterations": 10}``.

    Raises:
        ConfigError: the file does not exist or the config is invalid.
    """
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"config: {str(name_or_path)!r} is neither a file nor a shipped config; shipped "
            f"configs are {', '.join(list_configs())}"
        )
    try:
        raw = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML: {err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config: {path} cannot be read as text: {err}") from err
    if raw is None:  # an empty file means all defaults; a bare 0 or false is not a mapping
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} must hold a mapping, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        *parents, last = dotted.split(".")
        node = raw
        for p in parents:
            # A section left empty in YAML (``train:``) reads as None; it is still a section.
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: '{p}' is not a section")
        if not last:
            raise ConfigError(f"{dotted!r}: empty key; expected e.g. train.lr")
        node[last] = value
    return config_from_dict(raw)
