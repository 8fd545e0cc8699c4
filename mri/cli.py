"""The command line: ``python -m mri simulate | prepare | train | evaluate | configs``.

Every subcommand has ``--help``. Errors a user can cause (a bad config, a missing file, a
corrupt checkpoint) are printed as one line and exit with status 2, not as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["main", "build_parser"]


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
    key, value = text.split("=", 1)
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):
        # YAML 1.1 reads "1e-3" as a string; users mean a number.
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip(), parsed


def _load(args: argparse.Namespace):
    from mri.config import load_config

    overrides = dict(args.set or [])
    if getattr(args, "method", None):
        overrides["train.method"] = args.method
    if getattr(args, "iterations", None):
        overrides["train.iterations"] = args.iterations
    return load_config(args.config, overrides)


def _cmd_configs(args: argparse.Namespace) -> int:
    from mri.config import list_configs, load_config

    for name in list_configs():
        cfg = load_config(name)
        print(f"{name:<24} {cfg.description.splitlines()[0][:90] if cfg.description else ''}")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from mri.data.simulate import simulate_dataset

    files = simulate_dataset(
        args.out, kind=args.kind, num_train=args.num_train, num_val=args.num_val,
        num_test=args.num_test, shape=tuple(args.shape) if args.shape else None,
        num_coils=args.coils, seed=args.seed,
    )  # fmt: skip
    for split, paths in files.items():
        print(f"{split}: {len(paths)} files in {Path(args.out) / split}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from mri.data import convert

    fn = {"mridata": convert.convert_mridata, "fastmri": convert.convert_fastmri,
          "nifti": convert.convert_nifti}[args.format]  # fmt: skip
    written = fn(args.src, args.out)
    print(f"wrote {len(written)} file(s) to {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mri.evaluate import evaluate, format_table
    from mri.pipeline import prepare_builtin
    from mri.train import load_trained, train

    cfg = _load(args)
    out = Path(args.out)
    result = train(
        cfg, out, args.data, resume=args.resume, progress=not args.no_progress,
        nonfinite=args.nonfinite,
    )  # fmt: skip
    print(
        f"trained {result.steps} steps; best validation nRMSE {result.best_val_nrmse:.4f} at "
        f"step {result.best_step}; checkpoints in {out}"
    )
    if args.evaluate:
        gw, cfg = load_trained(out / "best.pt")
        root = Path(args.data) if args.data else prepare_builtin(cfg, out.parent)
        metrics = evaluate(gw, cfg, root, out, progress=not args.no_progress)
        print(format_table(metrics))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mri.evaluate import evaluate, format_table
    from mri.train import load_trained

    gw, cfg = load_trained(args.checkpoint)
    metrics = evaluate(
        gw, cfg, args.data, args.out, split=args.split, progress=not args.no_progress,
        figures=not args.no_figures,
    )  # fmt: skip
    print(format_table(metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m mri``."""
    p = argparse.ArgumentParser(
        prog="python -m mri",
        description="MRI reconstruction with unrolled networks trained greedily (greedywrap).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("configs", help="list the shipped configs")
    c.set_defaults(func=_cmd_configs)

    s = sub.add_parser("simulate", help="generate the built-in simulated dataset")
    s.add_argument("--out", required=True, help="dataset folder (train/ val/ test/ inside)")
    s.add_argument("--kind", default="2d", choices=["2d", "3d", "cine"])
    s.add_argument("--shape", type=int, nargs="+", help="spatial shape, e.g. 128 128")
    s.add_argument("--coils", type=int, default=8)
    s.add_argument("--num-train", type=int, default=32)
    s.add_argument("--num-val", type=int, default=8)
    s.add_argument("--num-test", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_simulate)

    pr = sub.add_parser("prepare", help="convert real data into the h5 slice format")
    pr.add_argument("format", choices=["mridata", "fastmri", "nifti"])
    pr.add_argument("src", help="input file or folder")
    pr.add_argument("--out", required=True, help="output folder")
    pr.set_defaults(func=_cmd_prepare)

    t = sub.add_parser("train", help="train a config (built-in data unless --data)")
    t.add_argument("--config", required=True, help="a shipped config name or a YAML path")
    t.add_argument("--data", default=None, help="prepared data folder with train/ val/ test/")
    t.add_argument("--method", choices=["e2e", "checkpoint", "gleam", "pgleam", "mel"])
    t.add_argument("--iterations", type=int, help="override train.iterations")
    t.add_argument(
        "--set",
        action="append",
        type=_parse_override,
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-3 (repeatable)",
    )
    t.add_argument("--out", required=True, help="run folder (checkpoints, logs)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--evaluate", action="store_true", help="evaluate best.pt on the test split")
    t.add_argument(
        "--nonfinite",
        default="raise",
        choices=["raise", "skip"],
        help="on a NaN/Inf stage loss: stop (default) or skip that update",
    )
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint against zero-filled and CS")
    e.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a run")
    e.add_argument("--data", required=True, help="data folder holding the split")
    e.add_argument("--split", default="test")
    e.add_argument("--out", required=True, help="where metrics.json and figures go")
    e.add_argument("--no-figures", action="store_true")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from greedywrap import InversionError, NonFiniteLossError
    from mri.checkpoint import CheckpointError
    from mri.config import ConfigError
    from mri.data.h5format import DataFormatError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        ConfigError, DataFormatError, CheckpointError, NonFiniteLossError, InversionError
    ) as err:  # fmt: skip
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
