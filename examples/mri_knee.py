"""The main job: train an unrolled network on knee slices; compare it with zero-filled and CS.

    python examples/mri_knee.py                       # built-in simulated data (the demo)
    python examples/mri_knee.py --data DIR            # slices prepared by `python -m mri prepare
                                                      #   mridata ...` (train/ val/ test/)
    python examples/mri_knee.py --config knee-pgd-r16-gleam --data DIR   # the paper's run
    python examples/mri_knee.py --tune-cs             # CS weight tuned on the validation split

The training method is the config's (`train.method`; GLEAM in the demo), or --method. Writes
into --out: metrics.json ({"zero_filled": {...}, "cs": {...}, METHOD: {...}} with mean PSNR,
SSIM and nRMSE over the test slices, METHOD being e.g. "gleam" or "e2e"), comparison.png,
depth.png, best.pt and last.pt. A folder that holds a run is refused unless --resume or
--overwrite says what to do with it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch

from mri import cs
from mri.checkpoint import CheckpointError
from mri.config import Config, ConfigError, load_config
from mri.data.h5format import DataFormatError
from mri.evaluate import evaluate, format_table
from mri.pipeline import batch_to_inputs, make_loader, prepare_builtin
from mri.train import default_threads, load_trained, train


def tune_cs(cfg: Config, data: Path) -> float:
    """The CS weight with the best validation PSNR, on a grid of 1/4x to 4x the default."""
    recon = {"tv": cs.tv_recon, "l1wavelet_tv": cs.wavelet_tv_recon}.get(
        cfg.eval.cs, cs.l1_wavelet_recon
    )
    default = inspect.signature(recon).parameters["lamda"].default
    items, fft_dims = [], None
    for batch in make_loader(data, "val", cfg, shuffle=False, batch_size=1):
        _, target, meas = batch_to_inputs(batch)
        items.append((meas.kspace, meas.op.maps, meas.op.mask, target))
        fft_dims = meas.op.fft_dims
    grid = [default * f for f in (0.25, 0.5, 1, 2, 4)]
    kw = {"max_iter": cfg.eval.cs_iters, "tol": 0.0, "fft_dims": fft_dims}
    best, table = cs.tune_lamda(items, grid, recon, **kw)
    print("CS weight on the validation split: " + ", ".join(
        f"{lam:g}: {p:.2f} dB" for lam, p in table.items()) + f"; using {best:g}")  # fmt: skip
    return best


_METHODS = {
    "e2e": "end-to-end backpropagation",
    "checkpoint": "end-to-end with a checkpoint per unroll",
    "gleam": "GLEAM",
    "pgleam": "P-GLEAM",
    "mel": "end-to-end by inversion (MEL)",
}


def describe_method(cfg: Config) -> str:
    """How the config trains, in words: "GLEAM in 4 stages", "end-to-end backpropagation"."""
    t = cfg.train
    words = _METHODS[t.method]
    if t.method in ("gleam", "pgleam"):
        words += f" in {t.splits} stage{'s' if t.splits != 1 else ''}"
        if t.invertible:
            words += ", each trained by inversion"
    return words


def main(
    argv: list[str] | None = None,
    *,
    description: str | None = None,
    default_config: str = "cpu-demo",
    default_out: str = "runs/demo",
) -> int:
    """Run the job; ``description`` and the defaults let other examples reuse it."""
    parser = argparse.ArgumentParser(
        description=description or __doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", default=None, help="prepared data (default: built-in)")
    parser.add_argument("--config", default=default_config, help="config name or YAML path")
    parser.add_argument(
        "--method",
        choices=sorted(_METHODS),
        default=None,
        help="override train.method (default: the config's)",
    )
    parser.add_argument("--out", default=default_out, help="output folder")
    parser.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="torch intra-op threads (half the cores; more than the idle cores slow it down)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    parser.add_argument("--no-progress", action="store_true", help="print log lines instead")
    parser.add_argument("--tune-cs", action="store_true", help="tune the CS weight on val first")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads: got {args.threads}; expected a whole number >= 1")
    torch.set_num_threads(args.threads)

    overrides: dict[str, object] = {}
    if args.method:
        overrides["train.method"] = args.method
    if args.iterations is not None:
        overrides["train.iterations"] = args.iterations
    cfg = load_config(args.config, overrides)
    name = cfg.train.method
    out = Path(args.out)
    start = time.perf_counter()
    data = Path(args.data) if args.data else prepare_builtin(cfg, out.parent)
    print(f"data: {data} ({'prepared' if args.data else 'built-in simulated'} {cfg.data.kind})")
    print(f"model: {cfg.model.type} N={cfg.model.num_unrolls}, trained by "
          f"{describe_method(cfg)}; {args.threads} thread(s)")  # fmt: skip

    try:
        result = train(
            cfg, out, data, resume=args.resume, overwrite=args.overwrite,
            progress=not args.no_progress, check_splits=("test",),
        )  # fmt: skip
    except (CheckpointError, ConfigError, DataFormatError) as err:
        # A run folder already in use, a config this machine cannot run, a broken data file:
        # one line, as the CLI prints them.
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"trained {result.steps} steps in {time.perf_counter() - start:.0f} s; best validation "
          f"nRMSE {result.best_val_nrmse:.4f} at step {result.best_step}")  # fmt: skip

    gw, cfg = load_trained(out / "best.pt")
    if args.tune_cs and cfg.eval.cs != "none":
        cfg.eval.cs_lamda = tune_cs(cfg, data)
    metrics = evaluate(gw, cfg, data, out, name=name, progress=not args.no_progress)
    summary = {k: metrics[k] for k in ("zero_filled", "cs", name) if k in metrics}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "metrics_full.json").write_text(json.dumps(metrics, indent=2))
    print(format_table(metrics))
    print(f"PSNR after each unroll (early exit): {[round(v, 2) for v in metrics['depth_psnr']]}")
    print(f"wrote {out / 'metrics.json'}, comparison.png, depth.png, best.pt "
          f"({time.perf_counter() - start:.0f} s in all)")  # fmt: skip
    beaten = [k for k in ("zero_filled", "cs") if k in summary and
              summary[name]["psnr"] <= summary[k]["psnr"]]  # fmt: skip
    # Losing to a baseline is a result to report, not a failure of the job: exit 0 either way.
    if beaten:
        print(f"note: {name} does not beat {', '.join(beaten)} in PSNR", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
