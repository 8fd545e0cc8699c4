"""Peak training memory and time per iteration of every training method on the same network.

For 2D unrolled PGD, 2D MoDL and a 2D+time unrolled PGD (3D convolutions over (T, H, W)), each
method (end-to-end, gradient checkpointing, GLEAM with M=N and M=N/2, GLEAM + checkpointing,
P-GLEAM on two workers) trains the same network (same seed, same batch) in one process: a
warm-up step creates the optimizer state, timed steps give the median s/iter, a hand-written
loop over the wrapper's own stages splits that time into forward+loss and backward+step, and
one more step inside ``greedywrap.track_memory`` gives the peak memory per device. Each number
is cross-checked by the RSS growth of one step in a fresh subprocess per method. For the GLEAM
rows, each stage's blocks are also trained alone (plain PyTorch, same input shape): GLEAM's
peak over the largest of those standalone peaks is greedy training's memory overhead.

    .venv/bin/python benchmarks/memory_time.py [--quick | --smoke] [--json PATH]
        [--models pgd,modl,cine] [--repeats N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from greedywrap import GreedyWrapper, even_balance, format_bytes, track_memory
from mri.models import MoDL, UnrolledPGD, complex_l1_loss
from mri.physics import Measurement, SenseOp

SEED = 0
LR = 1e-4


@dataclass(frozen=True)
class ProblemConfig:
    """One network and one batch: what every method of a table trains."""

    model: str  # "pgd" (2D), "modl" (2D) or "cine" (UnrolledPGD, conv_dim=3, on (T, H, W))
    shape: tuple[int, ...]  # (H, W), or (T, H, W) for cine
    coils: int
    batch: int
    features: int
    unrolls: int = 8
    accel: float = 6.0
    cg_iters: int = 10

    @property
    def conv_dim(self) -> int:
        return 3 if self.model == "cine" else 2


# The paper's structure (N=8 unrolls; residual-CNN prox with 2 resblocks; MoDL with a 5-layer
# CNN and 10 CG steps), with features and image sizes scaled so a 2-core CPU run takes minutes.
SIZES: dict[str, dict[str, ProblemConfig]] = {
    "full": {
        "pgd": ProblemConfig("pgd", (128, 96), coils=8, batch=2, features=32),
        "modl": ProblemConfig("modl", (128, 96), coils=8, batch=2, features=32),
        "cine": ProblemConfig("cine", (8, 48, 48), coils=8, batch=1, features=8, accel=4.0),
    },
    "quick": {
        "pgd": ProblemConfig("pgd", (64, 48), coils=4, batch=1, features=16),
        "modl": ProblemConfig("modl", (64, 48), coils=4, batch=1, features=16, cg_iters=5),
        "cine": ProblemConfig("cine", (6, 32, 32), coils=4, batch=1, features=8, accel=4.0),
    },
    "smoke": {
        "pgd": ProblemConfig("pgd", (32, 32), coils=2, batch=1, features=8),
        "modl": ProblemConfig("modl", (32, 32), coils=2, batch=1, features=8, cg_iters=3),
        "cine": ProblemConfig("cine", (4, 24, 24), coils=2, batch=1, features=4, accel=3.0),
    },
}


# ---------------------------------------------------------------------------- problem


def _phantom(cfg: ProblemConfig, gen: torch.Generator) -> torch.Tensor:
    """Soft ellipses with a smooth phase; in cine their centres move from frame to frame."""
    h, w = cfg.shape[-2:]
    frames = cfg.shape[0] if cfg.model == "cine" else 1
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    t = torch.linspace(0, 2 * torch.pi, frames + 1)[:-1].view(frames, 1, 1)
    images = []
    for _ in range(cfg.batch):
        img = torch.zeros(frames, h, w)
        for _ in range(6):
            cy, cx, ry, rx, amp, swing = (torch.rand(6, generator=gen) * 0.6 + 0.2).tolist()
            cy, cx = cy - 0.5, cx - 0.5
            cy_t = cy + 0.1 * swing * torch.sin(t)
            r2 = ((yy - cy_t) / (ry * 0.6)) ** 2 + ((xx - cx) / (rx * 0.6)) ** 2
            img = img + amp * torch.sigmoid(20 * (1 - r2))
        phase = torch.pi * 0.5 * (yy * torch.rand(1, generator=gen) + xx * xx)
        images.append(img * torch.exp(1j * phase))
    target = torch.stack(images).to(torch.complex64)
    return target if cfg.model == "cine" else target[:, 0]


def make_data(cfg: ProblemConfig) -> dict[str, torch.Tensor]:
    """Coil maps, sampling mask and target image, generated deterministically from the seed."""
    # Imported here: SigPy makes these imports slow, and the RSS subprocesses load saved data.
    from mri.coils import birdcage_maps
    from mri.masks import kt_mask, poisson_disc_mask

    gen = torch.Generator().manual_seed(SEED)
    h, w = cfg.shape[-2:]
    maps = birdcage_maps((h, w), cfg.coils)[None].expand(cfg.batch, -1, -1, -1).contiguous()
    if cfg.model == "cine":
        mask = kt_mask(cfg.shape, cfg.accel, calib=4, seed=SEED)
    else:
        mask = poisson_disc_mask((h, w), cfg.accel, calib=max(4, h // 8), seed=SEED, tol=0.3)
    return {"maps": maps, "mask": mask, "target": _phantom(cfg, gen)}


def make_measurement(data: dict[str, torch.Tensor], device: torch.device) -> Measurement:
    # 4-D maps with a (T, H, W) mask make the operator 2D+time: the FFT runs over (H, W) only.
    op = SenseOp(data["maps"].to(device), data["mask"].to(device))
    return Measurement(op, op(data["target"].to(device)))


def build_network(
    cfg: ProblemConfig, unrolls: int | None = None, invertible: bool = False
) -> nn.Sequential:
    """The network of ``cfg`` (or with ``unrolls`` blocks), identically initialised every call.

    ``invertible`` gives MoDL invertible residual denoisers (same widths and depth), which MEL
    needs; the other methods train the plain network.
    """
    torch.manual_seed(SEED)
    n = cfg.unrolls if unrolls is None else unrolls
    if cfg.model == "modl":
        return MoDL(
            num_unrolls=n, features=cfg.features, cg_iters=cfg.cg_iters, invertible=invertible
        )
    return UnrolledPGD(num_unrolls=n, features=cfg.features, conv_dim=cfg.conv_dim)


# ---------------------------------------------------------------------------- methods


def methods(
    n: int, device: torch.device, model: str = "pgd"
) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, label, GreedyWrapper keyword arguments) of every method compared at N=n.

    MoDL also gets MEL (end-to-end by inversion, one kept block input besides the stage input),
    the paper's memory-efficient-learning baseline; PGD's gradient step is not invertible.
    """
    # Two workers on one CUDA device still overlap through their streams; on CPU they share
    # the cores. Either way this measures the engine, not a 2-device speed-up.
    workers = (
        ["cpu", "cpu"]
        if device.type == "cpu"
        else [f"cuda:{i % torch.cuda.device_count()}" for i in range(2)]
    )
    half = max(1, n // 2)
    return [
        ("e2e", "end-to-end", {"splits": 1}),
        ("ckpt", "checkpointing", {"splits": 1, "checkpoint": True}),
        ("gleam", f"GLEAM M={n}", {"splits": n}),
        ("gleam_half", f"GLEAM M={half}", {"splits": half}),
        ("gleam_ckpt", f"GLEAM M={half} + ckpt", {"splits": half, "checkpoint": True}),
        ("pgleam", f"P-GLEAM M={n}, 2 workers", {"splits": n, "devices": workers}),
    ] + (
        [("mel", "MEL (inversion, 1 ckpt)",
          {"splits": 1, "invertible": True, "inversion_checkpoints": 1})]
        if model == "modl"
        else []
    )  # fmt: skip


def make_wrapper(net: nn.Module, kwargs: dict[str, Any], device: torch.device) -> GreedyWrapper:
    if "devices" not in kwargs:
        net = net.to(device)  # single-device wrappers keep the stages where the blocks are
    return GreedyWrapper(
        net,
        optimizer=torch.optim.Adam,
        optimizer_kwargs={"lr": LR},
        loss=complex_l1_loss,
        **kwargs,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_bytes(gw: GreedyWrapper) -> int:
    """Bytes of memory that outlives a step (not in the peak): parameters, optimizer state and
    the tensors the modules keep between calls (buffers, and caches such as the invertible
    denoiser's power-iteration vectors, one input-sized vector per convolution per block)."""
    total = sum(p.numel() * p.element_size() for p in gw.parameters())
    for m in gw.modules():
        held = list(m.buffers(recurse=False))
        held += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
        total += sum(t.numel() * t.element_size() for t in held)
    for opt in gw.optimizers:
        if opt is None:
            continue
        for st in opt.state.values():
            total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return total


def step_peak(gw: GreedyWrapper, x0, target, meas, device: torch.device) -> dict[str, int]:
    """Per-device peak bytes allocated during one training step (state that existed excluded)."""
    gc.collect()
    with track_memory(
        [device] if device.type == "cuda" else [], cpu=device.type == "cpu", rss=False
    ) as report:
        gw.train_step(x0, target, meas)
        gw.synchronize()
    return dict(report.peak_bytes)


def time_steps(gw: GreedyWrapper, x0, target, meas, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        gw.train_step(x0, target, meas)
        gw.synchronize()  # P-GLEAM's last updates may still run when train_step returns
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_split(gw: GreedyWrapper, x0, target, meas, device: torch.device, repeats: int):
    """Median (forward+loss, backward+step) seconds of one step, summed over stages.

    The wrapper's step runs forward, loss, backward and update inside one call, so this loop
    repeats exactly what its sequential engine does for each stage ``m`` with the wrapper's own
    ``gw.stages[m]`` and ``gw.optimizers[m]`` (detached input, local loss, backward, Adam step,
    ``zero_grad(set_to_none=True)``), with a clock read between forward and backward. With
    checkpointing the recomputation falls in the backward part.
    """
    fwd, bwd = [], []
    for _ in range(repeats):
        f = b = 0.0
        x = x0
        for stage, opt in zip(gw.stages, gw.optimizers, strict=True):
            _sync(device)
            t0 = time.perf_counter()
            out = stage(x.detach(), meas)
            loss = complex_l1_loss(out, target)
            _sync(device)
            t1 = time.perf_counter()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            t2 = time.perf_counter()
            f, b = f + t1 - t0, b + t2 - t1
            x = out.detach()
            del out, loss
        fwd.append(f)
        bwd.append(b)
    return statistics.median(fwd), statistics.median(bwd)


def run_method(cfg, data, key, label, kwargs, device, repeats) -> dict[str, Any]:
    net = build_network(cfg, invertible=bool(kwargs.get("invertible")))
    gw = make_wrapper(net, kwargs, device)
    meas = make_measurement(data, device)
    x0, target = meas.zero_filled(), data["target"].to(device)
    gw.train_step(x0, target, meas)  # warm-up: creates Adam state, primes allocators
    gw.synchronize()
    s_iter = time_steps(gw, x0, target, meas, device, repeats)
    split = (None, None)
    # P-GLEAM overlaps backward with forward and MEL's backward inverts: no clean split.
    if "devices" not in kwargs and not kwargs.get("invertible"):
        split = time_split(gw, x0, target, meas, device, repeats)
    peak = step_peak(gw, x0, target, meas, device)
    row = {
        "method": key,
        "label": label,
        "kwargs": kwargs,
        "peak_bytes": peak,
        "peak": max(peak.values(), default=0),
        "state_bytes": state_bytes(gw),
        "s_per_iter": s_iter,
        "forward_s": split[0],
        "backward_s": split[1],
    }
    gw.close()
    return row


# ---------------------------------------------------------------------------- greedy overhead

# GLEAM rows whose overhead over their largest stage is measured, with their stage count.
OVERHEAD_METHODS = ("gleam", "gleam_half")


def standalone_stage_peak(
    blocks: list[nn.Module], meas: Measurement, x0, target, device: torch.device
) -> int:
    """Step peak of ``blocks`` (one stage's blocks) trained alone, end to end.

    The floor that greedy training approaches: a plain PyTorch step (forward through these
    blocks only, the same loss, backward, Adam step, ``zero_grad(set_to_none=True)``) on an
    input of the network's input shape, with no wrapper, measured like every method (warm-up
    step first, then one step inside ``track_memory``).
    """
    opt = torch.optim.Adam([p for b in blocks for p in b.parameters()], lr=LR)

    def step() -> None:
        x = x0
        for block in blocks:
            x = block(x, meas)
        complex_l1_loss(x, target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    _sync(device)
    # No gc.collect() here (a second each on a big heap): the caller collects once per model,
    # and a step's storages are freed by reference counting, not by the cycle collector.
    with track_memory(
        [device] if device.type == "cuda" else [], cpu=device.type == "cpu", rss=False
    ) as report:
        step()
        _sync(device)
    return report.max_peak


def add_stage_overhead(
    cfg: ProblemConfig,
    data: dict[str, torch.Tensor],
    rows: list[dict[str, Any]],
    device: torch.device,
) -> dict[str, float]:
    """Fill ``largest_stage_peak`` and ``overhead_vs_stage`` of the GLEAM rows.

    ``overhead_vs_stage`` = GLEAM's step peak / the largest standalone stage peak: what greedy
    training costs above the memory of its biggest stage trained on its own (ideal 1.0; the
    goal is <= 1.1). Other rows get ``None``. Returns ``{method: overhead}``.
    """
    overhead: dict[str, float] = {}
    cache: dict[tuple[int, int], int] = {}
    # One copy of the network serves every stage: a step's memory does not depend on the
    # weights' values, and each stage gets its own fresh optimizer.
    gc.collect()
    blocks = [b.to(device) for b in build_network(cfg)]
    meas = make_measurement(data, device)
    x0, target = meas.zero_filled(), data["target"].to(device)
    for row in rows:
        row["largest_stage_peak"] = row["overhead_vs_stage"] = None
        if row["method"] not in OVERHEAD_METHODS:
            continue
        peaks, start = [], 0
        for size in even_balance(cfg.unrolls, row["kwargs"]["splits"]):
            key = (start, start + size)
            if key not in cache:
                cache[key] = standalone_stage_peak(
                    blocks[key[0] : key[1]], meas, x0, target, device
                )
            peaks.append(cache[key])
            start += size
        row["largest_stage_peak"] = max(peaks)
        row["overhead_vs_stage"] = row["peak"] / max(peaks)
        overhead[row["method"]] = row["overhead_vs_stage"]
    return overhead


# ---------------------------------------------------------------------------- RSS cross-check


def rss_worker(spec_path: str) -> None:
    """Subprocess entry: RSS growth of one step after a warm-up, printed as one JSON line."""
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    cfg = ProblemConfig(**{**spec["config"], "shape": tuple(spec["config"]["shape"])})
    data = torch.load(spec["data"])
    device = torch.device("cpu")
    net = build_network(cfg, invertible=bool(spec["kwargs"].get("invertible")))
    gw = make_wrapper(net, spec["kwargs"], device)
    meas = make_measurement(data, device)
    x0, target = meas.zero_filled(), data["target"]
    gw.train_step(x0, target, meas)
    gw.synchronize()
    gc.collect()
    with track_memory([], cpu=False, rss=True, rss_interval=0.001) as report:
        gw.train_step(x0, target, meas)
        gw.synchronize()
    gw.close()
    print(json.dumps({"rss_growth": report.rss_peak_bytes}))


def rss_cross_check(cfg, data, rows, threads: int, workdir: str) -> None:
    """Fill ``rss_subprocess`` of every row, two fresh subprocesses at a time."""
    data_path = os.path.join(workdir, f"{cfg.model}.pt")
    torch.save(data, data_path)
    # A fixed mmap threshold (it is dynamic by default) makes glibc return every large buffer
    # to the OS when it is freed, so RSS follows live memory instead of the allocator's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    pending = list(rows)
    while pending:
        batch, pending = pending[:2], pending[2:]
        procs = []
        for row in batch:
            spec_path = os.path.join(workdir, f"{cfg.model}-{row['method']}.json")
            with open(spec_path, "w") as f:
                json.dump(
                    {
                        "config": asdict(cfg),
                        "data": data_path,
                        "kwargs": row["kwargs"],
                        "threads": threads,
                    },
                    f,
                )
            cmd = [sys.executable, os.path.abspath(__file__), "--rss-worker", spec_path]
            procs.append((row, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)))
        for row, proc in procs:
            out, _ = proc.communicate(timeout=600)
            lines = out.strip().splitlines()
            row["rss_subprocess"] = json.loads(lines[-1])["rss_growth"] if lines else None


# ---------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    base = rows[0]
    for row in rows:
        row["x_less_memory"] = base["peak"] / row["peak"] if row["peak"] else None
        total, base_total = row["peak"] + row["state_bytes"], base["peak"] + base["state_bytes"]
        row["peak_plus_state"] = total
        row["x_less_memory_with_state"] = base_total / total
        row["time_ratio"] = row["s_per_iter"] / base["s_per_iter"]


def _fmt_s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def print_table(cfg: ProblemConfig, rows: list[dict[str, Any]], device: torch.device) -> None:
    print(
        f"\n## {cfg.model}: N={cfg.unrolls}, image {cfg.shape}, {cfg.coils} coils, "
        f"batch {cfg.batch}, features {cfg.features}, device {device}"
    )
    head = (
        f"| {'method':<26} | {'peak':>10} | {'x less':>6} | {'+state':>10} | {'x less':>6} "
        f"| {'s/iter':>7} | {'x e2e':>5} | {'fwd s':>6} | {'bwd s':>6} | {'RSS (fresh)':>11} "
        f"| {'/ stage':>7} |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        rss = "n/a" if r.get("rss_subprocess") is None else format_bytes(r["rss_subprocess"])
        over = r.get("overhead_vs_stage")
        print(
            f"| {r['label']:<26} | {format_bytes(r['peak']):>10} | {r['x_less_memory']:>6.2f} "
            f"| {format_bytes(r['peak_plus_state']):>10} | {r['x_less_memory_with_state']:>6.2f} "
            f"| {r['s_per_iter']:>7.3f} | {r['time_ratio']:>5.2f} | {_fmt_s(r['forward_s']):>6} "
            f"| {_fmt_s(r['backward_s']):>6} | {rss:>11} "
            f"| {'n/a' if over is None else f'{over:.2f}':>7} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (whole run < 2 min)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    p.add_argument("--models", default="pgd,modl,cine", help="comma list of pgd, modl, cine")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per method")
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda uses the CUDA allocator's statistics (not tested on this machine)",
    )
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--no-rss", action="store_true", help="skip the fresh-subprocess RSS check")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_worker:
        rss_worker(args.rss_worker)
        return 0

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    repeats = args.repeats or {"full": 5, "quick": 2, "smoke": 1}[mode]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    # One intra-op thread: a "device" is one core, so P-GLEAM's two workers get a core each, as
    # the paper's get a GPU each. With 2 threads on 2 shared cores OpenMP's barriers made the
    # same step 1x-30x slower from run to run (other work on the machine preempts a thread).
    threads = args.threads
    torch.set_num_threads(threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in SIZES[mode]]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {sorted(SIZES[mode])}")

    info = machine()
    print(
        f"# memory_time ({mode}): {info['date']}, {info['cpus']} CPUs, {threads} threads, "
        f"torch {info['torch']}, python {info['python']}, device {device}"
        + (f" ({info['cuda']})" if device.type == "cuda" else "")
    )
    print(
        "# peak: per-step peak of live tensor storage (CPU) or allocator (CUDA), excluding "
        "parameters and optimizer state; +state adds them. x less = end-to-end / method. "
        "/ stage = GLEAM's peak / its largest stage's peak trained alone (goal <= 1.1)."
    )
    result: dict[str, Any] = {
        "machine": info,
        "mode": mode,
        "repeats": repeats,
        "device": str(device),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            cfg = SIZES[mode][name]
            data = make_data(cfg)
            rows = [
                run_method(cfg, data, key, label, kwargs, device, repeats)
                for key, label, kwargs in methods(cfg.unrolls, device, cfg.model)
            ]
            add_ratios(rows)
            overhead = add_stage_overhead(cfg, data, rows, device)
            if not args.no_rss and device.type == "cpu":
                rss_cross_check(cfg, data, rows, threads, workdir)
            print_table(cfg, rows, device)
            result["models"][name] = {
                "config": asdict(cfg),
                "methods": rows,
                "greedy_overhead": overhead,
            }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
