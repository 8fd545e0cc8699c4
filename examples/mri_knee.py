"""The main job: train GLEAM on knee slices and compare it with zero-filled and CS.

    python examples/mri_knee.py                       # built-in simulated data (the demo)
    python examples/mri_knee.py --data DIR            # slices prepared by `python -m mri prepare
                                                      #   mridata ...` (train/ val/ test/)
    python examples/mri_knee.py --config knee-pgd-r16-gleam --data DIR   # the paper's run
    python examples/mri_knee.py --tune-cs             # CS weight tuned on the validation split

Writes into --out: metrics.json ({"zero_filled": {...}, "cs": {...}, "gleam": {...}} with mean
PSNR, SSIM and nRMSE over the test slices), comparison.png, depth.png, best.pt and last.pt.
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
from mri.config import Config, load_config
from mri.evaluate import evaluate, format_table
from mri.pipeline import batch_to_inputs, make_loader, prepare_builtin
from mri.train import load_trained, train


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
    kw = {"max_iter": cfg.eval.cs_iters, "fft_dims": fft_dims}
    best, table = cs.tune_lamda(items, grid, recon, **kw)
    print("CS weight on the validation split: " + ", ".join(
        f"{lam:g}: {p:.2f} dB" for lam, p in table.items()) + f"; using {best:g}")  # fmt: skip
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="prepared knee slices (default: built-in)")
    parser.add_argument("--config", default="cpu-demo", help="config name or YAML path")
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--tune-cs", action="store_true", help="tune the CS weight on val first")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = {"train.method": "gleam"}
    if args.iterations:
        overrides["train.iterations"] = args.iterations
    cfg = load_config(args.config, overrides)
    out = Path(args.out)
    start = time.perf_counter()
    data = Path(args.data) if args.data else prepare_builtin(cfg, out.parent)
    print(f"data: {data} ({'prepared' if args.data else 'built-in simulated'} {cfg.data.kind})")
    print(f"model: {cfg.model.type} N={cfg.model.num_unrolls}, GLEAM in {cfg.train.splits} stages")

    result = train(cfg, out, data, progress=not args.no_progress)
    print(f"trained {result.steps} steps in {time.perf_counter() - start:.0f} s; best validation "
          f"nRMSE {result.best_val_nrmse:.4f} at step {result.best_step}")  # fmt: skip

    gw, cfg = load_trained(out / "best.pt")
    if args.tune_cs and cfg.eval.cs != "none":
        cfg.eval.cs_lamda = tune_cs(cfg, data)
    metrics = evaluate(gw, cfg, data, out, name="gleam", progress=not args.no_progress)
    summary = {k: metrics[k] for k in ("zero_filled", "cs", "gleam") if k in metrics}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "metrics_full.json").write_text(json.dumps(metrics, indent=2))
    print(format_table(metrics))
    print(f"PSNR after each unroll (early exit): {[round(v, 2) for v in metrics['depth_psnr']]}")
    print(f"wrote {out / 'metrics.json'}, comparison.png, depth.png, best.pt "
          f"({time.perf_counter() - start:.0f} s in all)")  # fmt: skip
    beaten = [k for k in ("zero_filled", "cs") if k in summary and
              summary["gleam"]["psnr"] <= summary[k]["psnr"]]  # fmt: skip
    if beaten:
        print(f"warning: GLEAM does not beat {', '.join(beaten)} in PSNR", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
