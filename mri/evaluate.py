"""Evaluation: per-slice and summary metrics for the model, zero-filled and CS, and figures.

For every test item this computes PSNR, SSIM and nRMSE (``mri.metrics``) of the zero-filled
reconstruction, the compressed-sensing baseline and the trained model, and the model's PSNR
after every unroll (early exit at any depth: the PSNR-versus-depth curve). Results go to
``metrics.json``; figures (reference / zero-filled / CS / model / error, and the depth curve)
are drawn with matplotlib.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from greedywrap import GreedyWrapper
from mri import cs, metrics
from mri.config import Config
from mri.pipeline import batch_to_inputs, make_loader

__all__ = ["evaluate", "cs_reconstruction", "depth_outputs", "plot_comparison", "plot_depth"]

_METRICS = ("psnr", "ssim", "nrmse")


def cs_reconstruction(cfg: Config, meas: Any) -> torch.Tensor:
    """The compressed-sensing baseline of ``cfg.eval`` for one batch of measurements."""
    e = cfg.eval
    op = meas.op
    # Exactly cs_iters iterations: the configs state the count shown to have converged.
    kwargs: dict[str, Any] = {"max_iter": e.cs_iters, "tol": 0.0, "fft_dims": op.fft_dims}
    if e.cs_lamda is not None:
        kwargs["lamda"] = e.cs_lamda
    recon = {"tv": cs.tv_recon, "l1wavelet_tv": cs.wavelet_tv_recon}.get(e.cs, cs.l1_wavelet_recon)
    return recon(meas.kspace, op.maps, op.mask, **kwargs)


@torch.no_grad()
def depth_outputs(gw: GreedyWrapper, x0: torch.Tensor, meas: Any) -> list[torch.Tensor]:
    """The output after every block (unroll), in order: early exit at every depth."""
    outs = []
    x = x0
    for stage in gw.stages:
        x = x.to(stage.device)
        m = meas.to(stage.device)
        for block in stage.blocks:
            x = block(x, m)
            outs.append(x)
    return outs


def _scores(pred: torch.Tensor, ref: torch.Tensor) -> dict[str, list[float]]:
    pred = pred.to(ref.device)
    return {
        "psnr": metrics.psnr(pred, ref).tolist(),
        "ssim": metrics.ssim(pred, ref).tolist(),
        "nrmse": metrics.nrmse(pred, ref).tolist(),
    }


def _frame(x: torch.Tensor) -> np.ndarray:
    """A 2D magnitude image to show: the middle frame/slice of 3D data."""
    x = x.detach().abs().cpu()
    while x.dim() > 2:
        x = x[x.shape[0] // 2]
    return x.numpy()


def plot_comparison(images: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Save a row of magnitude images plus the model's error map (the last entry vs the first).

    Args:
        images: name -> complex image ``(*spatial)``; the first is the reference, the last the
            model.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(images)
    ref = _frame(images[names[0]])
    vmax = float(ref.max()) or 1.0
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(2.6 * (len(names) + 1), 3.3))
    for ax, name in zip(axes, names, strict=False):
        img = _frame(images[name])
        ax.imshow(img, cmap="gray", vmin=0, vmax=vmax)
        title = name
        if name != names[0]:
            p = float(metrics.psnr(images[name][None], images[names[0]][None])[0])
            title += f"\n{p:.2f} dB"
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    err = np.abs(_frame(images[names[-1]]) - ref)
    axes[-1].imshow(err, cmap="magma", vmin=0, vmax=vmax * 0.25)
    axes[-1].set_title(f"|{names[-1]} - ref| (x4)", fontsize=9)
    axes[-1].axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_depth(
    curves: dict[str, list[float]], path: str | os.PathLike, stage_ends: list[int] | None = None
) -> Path:
    """Save PSNR against depth (number of unrolls run) for one or more models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    for end in stage_ends or []:
        ax.axvline(end, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("unrolls run (early exit depth)")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate(
    gw: GreedyWrapper,
    cfg: Config,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    name: str | None = None,
    progress: bool = True,
    figures: bool = True,
) -> dict[str, Any]:
    """Evaluate ``gw`` against zero-filled and CS on ``split``; write ``metrics.json``.

    Args:
        gw: the trained wrapper.
        cfg: its config (data, masks, CS settings).
        data_root: the data folder with a ``split`` subfolder.
        out_dir: where ``metrics.json``, ``comparison.png`` and ``depth.png`` go.
        split: which subfolder to evaluate.
        name: the model's key in ``metrics.json`` (default: ``cfg.train.method``).
        progress: show a progress bar.
        figures: draw the figures.

    Returns:
        The content of ``metrics.json``: mean metrics per method (``zero_filled``, ``cs`` when
        enabled, and the model), per-item values, and the mean PSNR at every depth.
    """
    name = name or cfg.train.method
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loader = make_loader(data_root, split, cfg, shuffle=False, batch_size=1)
    methods = ["zero_filled"] + (["cs"] if cfg.eval.cs != "none" else []) + [name]
    per_item: dict[str, dict[str, list[float]]] = {m: {k: [] for k in _METRICS} for m in methods}
    depth_sum: list[float] = []
    items = 0
    shown: dict[str, torch.Tensor] | None = None
    gw.eval()
    limit = cfg.eval.max_slices
    total = len(loader) if limit is None else min(limit, len(loader))
    for batch in tqdm(loader, total=total, disable=not progress, desc="evaluate"):
        if limit is not None and items >= limit:
            break
        x0, target, meas = batch_to_inputs(batch)
        recons = {"zero_filled": x0}
        if "cs" in methods:
            recons["cs"] = cs_reconstruction(cfg, meas)
        outs = depth_outputs(gw, x0, meas)
        recons[name] = outs[-1].to(target.device)
        for method, recon in recons.items():
            for key, values in _scores(recon, target).items():
                per_item[method][key].extend(values)
        depth = [float(metrics.psnr(o.to(target.device), target).sum()) for o in outs]
        depth_sum = (
            depth if not depth_sum else [a + b for a, b in zip(depth_sum, depth, strict=True)]
        )
        items += target.shape[0]
        if shown is None:
            shown = {"reference": target[0], **{m: r[0] for m, r in recons.items()}}
    if items == 0:
        raise ValueError(f"evaluate: no items in {Path(data_root) / split}")
    result: dict[str, Any] = {
        m: {k: sum(v) / len(v) for k, v in per_item[m].items()} for m in methods
    }
    result["depth_psnr"] = [v / items for v in depth_sum]
    result["per_item"] = per_item
    result["num_items"] = items
    result["stage_ends"] = [sum(gw.balance[: i + 1]) for i in range(len(gw.balance))]
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    if figures and shown is not None:
        plot_comparison(shown, out / "comparison.png")
        plot_depth({name: result["depth_psnr"]}, out / "depth.png", result["stage_ends"])
    return result


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the mean metrics per method."""
    rows = [k for k, v in result.items() if isinstance(v, dict) and "psnr" in v]
    lines = [f"{'method':<14}{'PSNR (dB)':>11}{'SSIM':>9}{'nRMSE':>9}"]
    for m in rows:
        r = result[m]
        lines.append(f"{m:<14}{r['psnr']:>11.2f}{r['ssim']:>9.4f}{r['nrmse']:>9.4f}")
    return "\n".join(lines)
