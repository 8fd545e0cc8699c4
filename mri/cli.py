"""The command line: ``python -m mri simulate | prepare | train | evaluate | configs``.

Every subcommand has ``--help``. Every failure a user can cause (a bad argument or config, a
missing or broken file, a device this machine lacks, a run folder that already holds a run) is
printed as one line on stderr and exits with status 2; ``--debug`` shows the traceback instead.
Ctrl-C exits with status 130 and one line saying where the last checkpoint is.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, NoReturn

import yaml

__all__ = ["main", "build_parser"]

#: The exit status of every expected failure (argparse's own status for usage errors).
USAGE_ERROR = 2
#: The exit status after Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other CLI error."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _parse_override(text: str) -> tuple[str, Any]:
    from mri.config import parse_yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
    key, value = text.split("=", 1)
    try:
        # Parsed as a value in a config file is, so `1e-3` is a float here too.
        parsed = parse_yaml(value)
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())[:120]
        raise argparse.ArgumentTypeError(
            f"--set {text!r}: the value is not YAML ({first})"
        ) from err
    return key.strip(), parsed


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected a whole number >= 1")
    return value


def _set_threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)


def _load(args: argparse.Namespace):
    from mri.config import load_config

    overrides = dict(args.set or [])
    if getattr(args, "method", None):
        overrides["train.method"] = args.method
    if getattr(args, "iterations", None) is not None:
        overrides["train.iterations"] = args.iterations
    return load_config(args.config, overrides)


def _cmd_configs(args: argparse.Namespace) -> int:
    from mri.config import list_configs, load_config

    for name in list_configs():
        cfg = load_config(name)
        first = " ".join(cfg.description.split()) if cfg.description else ""
        # Shortened at a word boundary: a cut word reads as a different word.
        print(f"{name:<24} {textwrap.shorten(first, width=90, placeholder=' ...')}")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from mri.data.simulate import simulate_dataset

    if args.shape is not None:
        rank = 2 if args.kind == "2d" else 3
        if len(args.shape) != rank or min(args.shape[-2:]) < 8 or min(args.shape) < 2:
            raise _CliError(
                f"--shape: got {' '.join(map(str, args.shape))}; --kind {args.kind} needs {rank} "
                "sizes ("
                + ("H W" if rank == 2 else "D H W" if args.kind == "3d" else "T H W")
                + "), H and W >= 8"
                + ("" if rank == 2 else ", the first >= 2")
            )
    for flag, least in (("coils", 1), ("num_train", 0), ("num_val", 0), ("num_test", 0)):
        if getattr(args, flag) < least:
            name = flag.replace("_", "-")
            raise _CliError(f"--{name}: got {getattr(args, flag)}; must be >= {least}")
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
    _set_threads(args)
    print(f"torch threads: {args.threads}", flush=True)
    out = Path(args.out)
    args.run_folder = out  # for the Ctrl-C message
    result = train(
        cfg, out, args.data, resume=args.resume, overwrite=args.overwrite,
        progress=not args.no_progress, nonfinite=args.nonfinite,
        check_splits=("test",) if args.evaluate else (),
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

    _set_threads(args)
    gw, cfg = load_trained(args.checkpoint)
    metrics = evaluate(
        gw, cfg, args.data, args.out, split=args.split, progress=not args.no_progress,
        figures=not args.no_figures,
    )  # fmt: skip
    print(format_table(metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


class _CliError(Exception):
    """A bad combination of arguments found after parsing."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m mri``."""
    from mri.train import default_threads

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error instead of one line",
    )
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument(
        "--threads",
        type=_threads,
        default=default_threads(),
        help="torch intra-op threads (default: half the cores, here %(default)s; more threads "
        "than idle cores slow every step down several times)",
    )
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = _Parser(
        prog="python -m mri",
        description="MRI reconstruction with unrolled networks trained greedily (greedywrap).",
        parents=[debug],
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("configs", help="list the shipped configs", parents=[debug])
    c.set_defaults(func=_cmd_configs)

    s = sub.add_parser(
        "simulate",
        help="generate the built-in simulated dataset",
        description="Generate simulated multi-coil data in the h5 slice format, with train/, "
        "val/ and test/ folders. The counts are entries: 2d slices (4 per file), 3d volumes or "
        "cine series (1 per file).",
        formatter_class=fmt,
        parents=[debug],
    )
    s.add_argument("--out", required=True, help="dataset folder (train/ val/ test/ inside)")
    s.add_argument("--kind", default="2d", choices=["2d", "3d", "cine"], help="data kind")
    s.add_argument(
        "--shape",
        type=int,
        nargs="+",
        help="spatial shape: H W (2d), D H W (3d) or T H W (cine); default: 128 128, "
        "32 64 64, 12 64 64",
    )
    s.add_argument("--coils", type=int, default=8, help="receive coils")
    s.add_argument(
        "--num-train",
        type=int,
        default=32,
        help="training slices (volumes for 3d, series for cine)",
    )
    s.add_argument("--num-val", type=int, default=8, help="validation slices (volumes, series)")
    s.add_argument("--num-test", type=int, default=8, help="test slices (volumes, series)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the phantoms")
    s.set_defaults(func=_cmd_simulate)

    pr = sub.add_parser(
        "prepare", help="convert real data into the h5 slice format", parents=[debug]
    )
    pr.add_argument("format", choices=["mridata", "fastmri", "nifti"])
    pr.add_argument("src", help="input file or folder")
    pr.add_argument("--out", required=True, help="output folder")
    pr.set_defaults(func=_cmd_prepare)

    t = sub.add_parser(
        "train",
        help="train a config (built-in data unless --data)",
        formatter_class=fmt,
        parents=[debug, threads],
    )
    t.add_argument("--config", required=True, help="a shipped config name or a YAML path")
    t.add_argument(
        "--data", default=None, help="prepared data folder with train/ val/ test/ (default: "
        "built-in simulated data, generated next to --out)"
    )  # fmt: skip
    t.add_argument("--method", choices=["e2e", "checkpoint", "gleam", "pgleam", "mel"],
                   help="override train.method")  # fmt: skip
    t.add_argument("--iterations", type=int, help="override train.iterations")
    t.add_argument(
        "--set",
        action="append",
        type=_parse_override,
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-3 (repeatable); with --resume "
        "only training-schedule keys may change (iterations, lr, val_every, ...)",
    )
    t.add_argument("--out", required=True, help="run folder (checkpoints, logs)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT from last.pt (starts it when there is none yet)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="delete everything in OUT when it holds a run, and start again",
    )
    t.add_argument("--evaluate", action="store_true", help="evaluate best.pt on the test split")
    t.add_argument(
        "--nonfinite",
        default="raise",
        choices=["raise", "skip"],
        help="on a NaN/Inf stage loss: stop, or skip that update",
    )
    t.add_argument(
        "--no-progress", action="store_true", help="print log lines instead of a progress bar"
    )
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint against zero-filled and CS",
        formatter_class=fmt,
        parents=[debug, threads],
    )
    e.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a run")
    e.add_argument("--data", required=True, help="data folder holding the split")
    e.add_argument("--split", default="test", help="subfolder of --data to evaluate")
    e.add_argument("--out", required=True, help="where metrics.json and figures go")
    e.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.set_defaults(func=_cmd_evaluate)
    return p


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _interrupted(args: argparse.Namespace) -> str:
    out = getattr(args, "run_folder", None)
    if out is None:
        return "interrupted"
    last = Path(out) / "last.pt"
    if last.is_file():
        return f"interrupted; the last checkpoint is {last} (continue with --resume)"
    return f"interrupted before the first checkpoint of {out}; --resume will start it again"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = argparse.Namespace()
    try:
        return _main(argv, args)
    except BrokenPipeError:
        # The reader went away (`configs | head`): stop quietly, and keep the interpreter from
        # failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(_interrupted(args), file=sys.stderr)
        return INTERRUPTED


def _main(argv: list[str] | None, args: argparse.Namespace) -> int:
    from greedywrap import InversionError, NonFiniteLossError
    from mri.checkpoint import CheckpointError
    from mri.config import ConfigError
    from mri.data.h5format import DataFormatError
    from mri.invertible import FixedPointError

    # Parsed into the caller's namespace, so a Ctrl-C at any point still finds the run folder.
    build_parser().parse_args(argv, namespace=args)
    expected = (
        ConfigError, DataFormatError, CheckpointError, NonFiniteLossError, InversionError,
        FixedPointError, _CliError, OSError,
    )  # fmt: skip
    try:
        return args.func(args)
    except BrokenPipeError:
        raise
    except expected as err:
        if getattr(args, "debug", False):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
