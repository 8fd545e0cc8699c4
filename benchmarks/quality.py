"""Reconstruction quality of end-to-end, checkpointing and GLEAM training, as in the GLEAM paper.

On the built-in simulated 2D data and the small ``cpu-demo`` network, trained on CPU:
(a) equal architecture: end-to-end, gradient checkpointing and GLEAM at the same N and the same
iterations, over several seeds; (b) equal memory: GLEAM with a 3x deeper network, cut into the
fewest stages whose measured training footprint fits end-to-end's; (c) zero-filled and
compressed-sensing baselines on the same test slices; (d) PSNR after every unroll (early exit)
for each trained model, with a count of how often it rises; (f) the training curves: validation
PSNR along training and its gain over the last quarter, to show the budget was long enough for
the curves to flatten (the learning rate follows a cosine to 0). Prints tables, writes a JSON
file, ``depth_curves.png`` and ``training_curves.png``.

    .venv/bin/python benchmarks/quality.py [--quick] [--seeds N] [--iterations N]
        [--json PATH] [--out DIR] [--threads N] [--only-mel] [--reuse]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from greedywrap import format_bytes, track_memory
from mri.checkpoint import CheckpointError, load_checkpoint
from mri.config import Config, load_config
from mri.evaluate import evaluate, plot_depth
from mri.pipeline import batch_to_inputs, make_loader, prepare_builtin
from mri.train import build_model, build_wrapper, load_trained, train

METRICS = ("psnr", "ssim", "nrmse")
DEPTH_FACTOR = 3  # the paper's claim: a 3x deeper network in end-to-end's memory


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
        "date": datetime.date.today().isoformat(),
    }


def base_config(quick: bool, iterations: int | None) -> Config:
    """The demo network (or the tiny one for ``--quick``); validation four times per run."""
    iters = iterations or (6 if quick else 3000)
    # Twelve validations draw the curve (f) and keep the best model (as the paper does) for
    # a few percent of the run's time; the cosine schedule ends every run with small steps, so
    # the last quarter shows whether the budget was long enough.
    overrides: dict[str, Any] = {
        "train.iterations": iters,
        "train.val_every": max(1, iters // 12),
        "train.log_every": max(1, iters // 60),
        "train.lr_schedule": "cosine",
    }
    if quick:
        return load_config("cpu-tiny", overrides)
    # The PGD network of sections (a)-(d), stated here rather than inherited from cpu-demo
    # (which became MoDL): N=4, 24 features, 2 residual blocks, step -1, GLEAM in 2 stages.
    overrides |= {
        "model.type": "pgd", "model.num_unrolls": 4, "model.features": 24,
        "model.num_resblocks": 2, "model.step_size": -1.0, "train.splits": 2,
        "train.lr": 2e-3,
    }  # fmt: skip
    # 64x64 keeps the demo's network, mask and acceleration at less than half the demo's cost
    # per step (~0.05 s for N=4 on one core), so 12 runs of 3000 steps fit about an hour.
    return load_config("cpu-demo", {**overrides, "data.shape": [64, 64]})


def variant(cfg: Config, method: str, n: int, m: int, seed: int) -> Config:
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, num_unrolls=n),
        train=dataclasses.replace(cfg.train, method=method, splits=m, seed=seed),
    )


def modl_config(cfg: Config) -> Config:
    """The same data and budget with MoDL (5-layer denoisers, 10 CG iterations), as MEL needs."""
    model = dataclasses.replace(cfg.model, type="modl", num_layers=5, cg_iters=10, mu=0.05)
    # One kept block input per run of blocks keeps inversion errors small at N=8.
    train_cfg = dataclasses.replace(cfg.train, mel_checkpoints=1, mel_max_error=0.05)
    return dataclasses.replace(cfg, model=model, train=train_cfg)


def mel_section(
    cfg: Config, data: Path, out: Path, seeds: list[int], log, reuse: bool = False
) -> dict[str, Any]:
    """(e) MoDL trained end to end, greedily, and by inversion (MEL), one row each."""
    mcfg = modl_config(cfg)
    n, m = mcfg.model.num_unrolls, mcfg.train.splits
    plan = [
        ("modl_e2e", "MoDL end-to-end", "e2e", n, 1),
        ("modl_gleam", f"MoDL GLEAM M={m}", "gleam", n, m),
        ("modl_mel", "MoDL MEL (inversion)", "mel", n, 1),
    ]
    rows = {}
    for key, label, method, depth, splits in plan:
        runs = []
        for seed in seeds:
            res = run_one(variant(mcfg, method, depth, splits, seed), data,
                          out / f"{key}-s{seed}", with_cs=False, reuse=reuse)  # fmt: skip
            res.pop("baselines", None)
            runs.append(res)
            log(f"  {label:<24} seed {seed}: PSNR {res['psnr']:.2f} SSIM {res['ssim']:.4f} "
                f"nRMSE {res['nrmse']:.4f}, {res['train_seconds']:.0f} s")  # fmt: skip
        rows[key] = {
            "label": label, "method": method, "N": depth, "M": splits,
            **{k: summary([r[k] for r in runs]) for k in METRICS},
            "train_seconds": summary([r["train_seconds"] for r in runs]),
            **curves(runs),
        }  # fmt: skip
    return rows


def curves(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Validation curve (mean over seeds), its last quarter's gain per seed, seed 0's loss."""
    steps = runs[0]["val_steps"]
    return {
        "val_steps": steps,
        "val_psnr": [statistics.fmean(v) for v in zip(*(r["val_psnr"] for r in runs), strict=True)],
        "val_psnr_per_seed": [r["val_psnr"] for r in runs],
        "last_quarter_gain": summary([last_quarter_gain(steps, r["val_psnr"]) for r in runs]),
        "loss_seed0": runs[0]["loss"],
    }


def footprint(cfg: Config, data: Path) -> int:
    """Bytes one training step needs: its measured peak plus parameters and Adam state."""
    torch.manual_seed(0)
    gw = build_wrapper(build_model(cfg), cfg)
    batch = next(iter(make_loader(data, "train", cfg, shuffle=False)))
    x0, target, meas = batch_to_inputs(batch)
    gw.train_step(x0, target, meas)  # warm-up: creates Adam's moments, which outlive a step
    gc.collect()
    with track_memory(cpu=True, rss=False) as report:
        gw.train_step(x0, target, meas)
    state = sum(p.numel() * p.element_size() for p in gw.parameters())
    for opt in gw.optimizers:
        for st in opt.state.values():
            state += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    gw.close()
    return report.max_peak + state


def equal_memory_splits(cfg: Config, data: Path, n_deep: int, log) -> tuple[int, dict]:
    """The fewest stages M (largest stages) for which GLEAM at depth ``n_deep`` fits e2e's budget.

    Fewer, larger stages are the least greedy choice, so this gives the deep network the best
    chance the memory budget allows; M = N (one block per stage) always fits.
    """
    n = cfg.model.num_unrolls
    budget = footprint(variant(cfg, "e2e", n, 1, 0), data)
    probes = {}
    for m in [d for d in range(1, n_deep + 1) if n_deep % d == 0]:
        need = footprint(variant(cfg, "gleam", n_deep, m, 0), data)
        probes[m] = need
        log(f"  GLEAM N={n_deep} M={m}: footprint {format_bytes(need)} "
            f"(budget: e2e N={n} {format_bytes(budget)})")  # fmt: skip
        if need <= budget:
            return m, {"budget": budget, "probes": probes}
    return n_deep, {"budget": budget, "probes": probes}


def is_finished(cfg: Config, out: Path) -> bool:
    """Whether ``out`` holds a run of exactly this training config that reached its end."""
    try:
        history = json.loads((out / "history.json").read_text())
        saved = load_checkpoint(out / "best.pt")["config"]
    except (OSError, ValueError, KeyError, CheckpointError):
        return False
    if not history or history[-1]["step"] != cfg.train.iterations:
        return False
    # What shapes the trained model; the evaluation settings and the description may differ.
    return all(
        saved.get(k) == dataclasses.asdict(getattr(cfg, k)) for k in ("data", "model", "train")
    )


def run_one(
    cfg: Config, data: Path, out: Path, with_cs: bool, reuse: bool = False
) -> dict[str, Any]:
    """Train (or, with ``reuse``, take the finished run in ``out``) and evaluate on test."""
    if not (reuse and is_finished(cfg, out)):
        train(cfg, out, data, progress=False, overwrite=True)  # a re-run redoes it
    gw, _ = load_trained(out / "best.pt")
    # CS depends only on the test slices, not on the model: compute it once, not per run.
    eval_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, cs="none"))
    result = evaluate(gw, cfg if with_cs else eval_cfg, data, out, name="model",
                      progress=False, figures=False)  # fmt: skip
    gw.close()
    history = json.loads((out / "history.json").read_text())
    return {
        "seed": cfg.train.seed,
        "train_seconds": history[-1]["seconds"],  # the training loop, validations included
        **{k: result["model"][k] for k in METRICS},
        "depth_psnr": result["depth_psnr"],
        "val_steps": [h["step"] for h in history],
        "val_psnr": [h["val_psnr"] for h in history],
        "loss": last_stage_loss(out / "log.csv"),
        "baselines": {k: result[k] for k in ("zero_filled", "cs") if k in result},
    }


def last_stage_loss(path: Path) -> list[list[float]]:
    """``[step, loss]`` rows of the last stage's training loss, from the run's ``log.csv``."""
    rows = csv.DictReader(path.read_text().splitlines())
    out = []
    for row in rows:
        stages = sorted(k for k in row if k.startswith("loss_stage"))
        out.append([int(row["step"]), float(row[stages[-1]])])
    return out


def last_quarter_gain(steps: list[int], psnr: list[float]) -> float:
    """Validation PSNR at the end minus at 3/4 of the run (the nearest validation before)."""
    mark = steps[-1] * 3 / 4
    before = [p for s, p in zip(steps, psnr, strict=True) if s <= mark]
    return psnr[-1] - before[-1]


def curve_rows(entries: dict[str, dict[str, Any]]) -> str:
    """Validation PSNR at each quarter of training (mean over seeds) and the last quarter's gain."""
    head = (f"| {'method':<24} | {'25%':>6} | {'50%':>6} | {'75%':>6} | {'100%':>6} "
            f"| {'last quarter':>16} |")  # fmt: skip
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for e in entries.values():
        steps = e["val_steps"]
        cells = []
        for q in (0.25, 0.5, 0.75, 1.0):
            i = max(j for j, s in enumerate(steps) if s <= steps[-1] * q)
            cells.append(f"{e['val_psnr'][i]:.2f}")
        gains = e["last_quarter_gain"]
        gain = f"{gains['mean']:+.2f} ± {gains['std']:.2f}"
        lines.append(f"| {e['label']:<24} | " + " | ".join(f"{c:>6}" for c in cells)
                     + f" | {gain:>16} |")  # fmt: skip
    return "\n".join(lines)


def plot_training(entries: dict[str, dict[str, Any]], path: Path) -> Path:
    """Validation PSNR and the last stage's training loss against step, seed 0 of each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.4))
    for e in entries.values():
        left.plot(e["val_steps"], e["val_psnr"], marker="o", ms=3, label=e["label"])
        loss = e["loss_seed0"]
        width = max(1, len(loss) // 8)  # a running mean over ~1/8 of the run
        smooth = [statistics.fmean(v for _, v in loss[max(0, i - width + 1) : i + 1])
                  for i in range(len(loss))]  # fmt: skip
        right.plot([s for s, _ in loss], smooth, label=e["label"])
    left.set_xlabel("training step")
    left.set_ylabel("validation PSNR (dB), mean over seeds")
    right.set_xlabel("training step")
    right.set_ylabel("last stage's L1 loss, seed 0 (running mean)")
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def increases(curve: list[float]) -> int:
    return sum(b > a for a, b in zip(curve, curve[1:], strict=False))


def stage_end_curve(curve: list[float], splits: int) -> list[float]:
    """The curve at stage boundaries only: the outputs that a greedy local loss trains."""
    size = len(curve) // splits
    return curve[size - 1 :: size]


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"| {'method':<24} | {'N':>3} | {'M':>3} | {'PSNR (dB)':>13} | {'SSIM':>15} "
            f"| {'nRMSE':>15} | {'train s':>7} |")  # fmt: skip
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        cells = []
        for k, digits in (("psnr", 2), ("ssim", 4), ("nrmse", 4)):
            s = r[k]
            cells.append(f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}")
        secs = f"{r['train_seconds']['mean']:.0f}" if r.get("train_seconds") else "-"
        n = str(r["N"]) if r.get("N") else "-"
        m = str(r["M"]) if r.get("M") else "-"
        lines.append(f"| {r['label']:<24} | {n:>3} | {m:>3} | {cells[0]:>13} | {cells[1]:>15} "
                     f"| {cells[2]:>15} | {secs:>7} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny network, 1 seed")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3)")
    parser.add_argument("--iterations", type=int, default=None, help="training steps per run")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--out", default="runs/quality", help="runs and figures")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--mel-seeds", type=int, default=None,
                        help="seeds of the MoDL/MEL section (default 1)")  # fmt: skip
    parser.add_argument("--only-mel", action="store_true", help="run only the MoDL/MEL section")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the finished runs of the same config in --out instead "
                        "of training them again (an interrupted benchmark goes on)")  # fmt: skip
    args = parser.parse_args(argv)
    # One thread by default: on a small shared CPU, OpenMP barriers across busy cores made the
    # same step several times slower from run to run, which would drown the timing column.
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    cfg = base_config(args.quick, args.iterations)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_builtin(cfg, out)
    n, m = cfg.model.num_unrolls, cfg.train.splits
    n_deep = DEPTH_FACTOR * n

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"machine: {machine()}")
    log(f"config {cfg.name}: {cfg.data.shape} {cfg.data.num_coils} coils, R={cfg.data.accel:g}; "
        f"PGD N={n}, {cfg.model.features} features; {cfg.train.iterations} iterations, "
        f"lr {cfg.train.lr:g}, seeds {seeds}")  # fmt: skip
    mel_seeds = list(range(args.mel_seeds or 1))
    if args.only_mel:
        log("\n## (e) MoDL: end-to-end, GLEAM and MEL (inversion); MEL's denoisers are "
            "invertible (Lipschitz-bounded), the others plain")  # fmt: skip
        mel_rows = mel_section(cfg, data, out, mel_seeds, log, args.reuse)
        log(table(list(mel_rows.values())))
        log("\n## (f) validation PSNR (dB) along training; gain over the last quarter")
        log(curve_rows(mel_rows))
        plot_training(mel_rows, out / "training_curves_mel.png")
        log(f"wall time {time.perf_counter() - wall:.0f} s")
        if args.json:
            Path(args.json).write_text(
                json.dumps({"machine": machine(), "mel": mel_rows}, indent=2)
            )
        return 0
    log("equal memory: probing stage sizes for the deep GLEAM network")
    m_deep, probe = equal_memory_splits(cfg, data, n_deep, log)

    plan = [
        ("e2e", "end-to-end", "e2e", n, 1),
        ("checkpoint", "checkpointing", "checkpoint", n, 1),
        ("gleam", f"GLEAM M={m}", "gleam", n, m),
        ("gleam_deep", f"GLEAM {DEPTH_FACTOR}x deeper M={m_deep}", "gleam", n_deep, m_deep),
    ]
    methods: dict[str, dict[str, Any]] = {}
    baselines: dict[str, Any] = {}
    for key, label, method, depth, splits in plan:
        runs = []
        for seed in seeds:
            run_cfg = variant(cfg, method, depth, splits, seed)
            res = run_one(run_cfg, data, out / f"{key}-s{seed}", not baselines, args.reuse)
            baselines = baselines or res.pop("baselines")
            res.pop("baselines", None)
            runs.append(res)
            log(f"  {label:<24} seed {seed}: PSNR {res['psnr']:.2f} SSIM {res['ssim']:.4f} "
                f"nRMSE {res['nrmse']:.4f}, {res['train_seconds']:.0f} s")  # fmt: skip
        curve = [statistics.fmean(c) for c in zip(*(r["depth_psnr"] for r in runs), strict=True)]
        methods[key] = {
            "label": label, "method": method, "N": depth, "M": splits,
            **{k: summary([r[k] for r in runs]) for k in METRICS},
            "train_seconds": summary([r["train_seconds"] for r in runs]),
            "depth_psnr": curve,
            "depth_psnr_per_seed": [r["depth_psnr"] for r in runs],
            "depth_increases": increases(curve),
            "depth_increases_per_seed": [increases(r["depth_psnr"]) for r in runs],
            "stage_end_increases": increases(stage_end_curve(curve, splits)),
            **curves(runs),
        }  # fmt: skip

    base_rows = [
        {"label": "zero-filled", **{k: {"mean": v[k], "std": 0.0} for k in METRICS}}
        for v in [baselines["zero_filled"]]
    ]
    if "cs" in baselines:
        cs_label = f"CS ({cfg.eval.cs}, {cfg.eval.cs_iters} it)"
        cs_means = {k: {"mean": baselines["cs"][k], "std": 0.0} for k in METRICS}
        base_rows.append({"label": cs_label, **cs_means})
    log(f"\n## (a) equal architecture: N={n}, {cfg.train.iterations} iterations, "
        f"{len(seeds)} seed(s), mean ± std over seeds; (c) baselines, same slices")  # fmt: skip
    log(table([methods[k] for k in ("e2e", "checkpoint", "gleam")] + base_rows))
    log(f"\n## (b) equal memory: budget = end-to-end N={n} footprint "
        f"{format_bytes(probe['budget'])}; GLEAM N={n_deep} M={m_deep} needs "
        f"{format_bytes(probe['probes'][m_deep])}")  # fmt: skip
    log(table([methods["e2e"], methods["gleam_deep"]]))

    log("\n## (d) PSNR (dB) after each unroll (early exit), mean over seeds")
    for entry in methods.values():
        curve = entry["depth_psnr"]
        log(f"{entry['label']:<26} {' '.join(f'{v:.2f}' for v in curve)}")
    for key in ("gleam", "gleam_deep", "e2e"):
        e = methods[key]
        steps = len(e["depth_psnr"]) - 1
        log(f"{e['label']}: PSNR rises at {e['depth_increases']} of {steps} unrolls "
            f"({'monotone' if e['depth_increases'] == steps else 'not monotone'}); per seed "
            f"{e['depth_increases_per_seed']}")  # fmt: skip
        if 1 < e["M"] < e["N"]:
            # Inside a stage only the last block has a loss, so the stage ends are the fair test.
            log(f"  at the {e['M']} stage ends only: rises at {e['stage_end_increases']} "
                f"of {e['M'] - 1}")  # fmt: skip
    log("\n## (e) MoDL: end-to-end, GLEAM and MEL (inversion); MEL's denoisers are "
        "invertible (Lipschitz-bounded), the others plain")  # fmt: skip
    mel_rows = mel_section(cfg, data, out, mel_seeds, log, args.reuse)
    log(table(list(mel_rows.values())))
    log(
        "\n## (f) validation PSNR (dB) along training, mean over seeds; gain over the last "
        "quarter (mean ± std over seeds)"
    )
    log(curve_rows({**methods, **mel_rows}))
    curves_figure = plot_training({**methods, **mel_rows}, out / "training_curves.png")
    figure = plot_depth(
        {methods[k]["label"]: methods[k]["depth_psnr"] for k in ("e2e", "gleam", "gleam_deep")},
        out / "depth_curves.png",
    )
    seconds = time.perf_counter() - wall
    log(f"\nwrote {figure} and {curves_figure}; wall time {seconds:.0f} s")

    if args.json:
        result = {
            "machine": machine(),
            "mode": "quick" if args.quick else "full",
            "config": cfg.name,
            "iterations": cfg.train.iterations,
            "seeds": seeds,
            "equal_memory": {
                "budget": probe["budget"],
                "footprints": probe["probes"],
                "N": n_deep,
                "M": m_deep,
            },
            "methods": methods,
            "mel": mel_rows,
            "baselines": baselines,
            "figure": str(figure),
            "training_figure": str(curves_figure),
            "wall_seconds": seconds,
        }
        Path(args.json).write_text(json.dumps(result, indent=2))
    finite = all(math.isfinite(e[k]["mean"]) for e in methods.values() for k in METRICS)
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
