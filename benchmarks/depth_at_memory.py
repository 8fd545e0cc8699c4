"""How deep a network can each method train within the memory end-to-end training needs at N=8?

The budget is end-to-end's training footprint at N=8 unrolls: the peak of one step measured with
``greedywrap.track_memory`` plus the parameters and optimizer state (which exist between steps,
so the step's peak does not count them, but a GPU would have to hold them). For each method the
number of unrolls N grows along 8, 12, 16, 24, 32, ... until a probe exceeds the budget, then a
bisection finds the deepest N that fits. Each probe builds the network at depth N, runs a
warm-up step (creating the optimizer state) and measures one more step.

    .venv/bin/python benchmarks/depth_at_memory.py [--quick | --smoke] [--json PATH]
        [--model pgd|modl|cine] [--max-depth N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from memory_time import (
    SIZES,
    build_network,
    machine,
    make_data,
    make_measurement,
    make_wrapper,
    state_bytes,
    step_peak,
)

from greedywrap import format_bytes

GRID = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def method_kwargs(key: str, n: int) -> dict[str, Any]:
    """GreedyWrapper keyword arguments of a method at depth n."""
    if key == "e2e":
        return {"splits": 1}
    if key == "ckpt":
        return {"splits": 1, "checkpoint": True}  # a checkpoint per unroll
    if key == "gleam":
        return {"splits": n}  # one block per stage (M = N)
    if key == "gleam_ckpt":
        # Two blocks per stage, each checkpointed: the stage holds two block inputs and one
        # block's activations during its backward.
        return {"splits": (n + 1) // 2, "checkpoint": True}
    raise ValueError(key)


LABELS = {
    "e2e": "end-to-end",
    "ckpt": "checkpointing (per unroll)",
    "gleam": "GLEAM (1 block/stage, M=N)",
    "gleam_ckpt": "GLEAM + ckpt (2 blocks/stage)",
}


def probe(cfg, data, key: str, n: int, device: torch.device) -> dict[str, Any]:
    """Peak of one training step at depth n, and the state that lives between steps."""
    gw = make_wrapper(build_network(cfg, unrolls=n), method_kwargs(key, n), device)
    meas = make_measurement(data, device)
    x0, target = meas.zero_filled(), data["target"].to(device)
    gw.train_step(x0, target, meas)  # creates the optimizer state
    gw.synchronize()
    peak = max(step_peak(gw, x0, target, meas, device).values(), default=0)
    state = state_bytes(gw)
    gw.close()
    return {"n": n, "peak": peak, "state": state, "footprint": peak + state}


def deepest(cfg, data, key, budget, device, max_depth, log) -> dict[str, Any]:
    """Grow N along GRID up to max_depth; bisect between the last fit and the first miss."""
    fits: dict[int, dict[str, Any]] = {}
    miss = None
    for n in [g for g in GRID if g <= max_depth]:
        r = probe(cfg, data, key, n, device)
        log.append({"method": key, **r, "fits": r["footprint"] <= budget})
        if r["footprint"] > budget:
            miss = n
            break
        fits[n] = r
    if not fits:
        return {"method": key, "deepest": None, "capped": False}
    lo = max(fits)
    while miss is not None and miss - lo > 1:
        mid = (lo + miss) // 2
        r = probe(cfg, data, key, mid, device)
        log.append({"method": key, **r, "fits": r["footprint"] <= budget})
        if r["footprint"] <= budget:
            fits[mid], lo = r, mid
        else:
            miss = mid
    best = fits[lo]
    return {
        "method": key,
        "label": LABELS[key],
        "deepest": lo,
        "capped": miss is None,
        "peak": best["peak"],
        "state": best["state"],
        "footprint": best["footprint"],
        "ratio_to_budget": best["footprint"] / budget,
        "first_miss": miss,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (< 90 s)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    p.add_argument("--model", default="pgd", choices=["pgd", "modl", "cine"])
    p.add_argument("--max-depth", type=int, default=None, help="deepest N probed")
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda uses the CUDA allocator's statistics (not tested on this machine)",
    )
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    max_depth = args.max_depth or {"full": 256, "quick": 192, "smoke": 96}[mode]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    torch.set_num_threads(args.threads)  # memory does not depend on it; one thread is steadiest
    cfg = SIZES[mode][args.model]
    data = make_data(cfg)
    info = machine()
    print(
        f"# depth_at_memory ({mode}): {info['date']}, {info['cpus']} CPUs, torch "
        f"{info['torch']}, device {device}"
    )
    start = time.perf_counter()
    log: list[dict[str, Any]] = []
    base = probe(cfg, data, "e2e", cfg.unrolls, device)
    budget = base["footprint"]
    print(
        f"# {cfg.model}: image {cfg.shape}, {cfg.coils} coils, batch {cfg.batch}, features "
        f"{cfg.features}; budget = end-to-end at N={cfg.unrolls}: {format_bytes(budget)} "
        f"(step peak {format_bytes(base['peak'])} + params/Adam state "
        f"{format_bytes(base['state'])}); N probed up to {max_depth}"
    )
    rows = [
        deepest(cfg, data, key, budget, device, max_depth, log)
        for key in ("e2e", "ckpt", "gleam", "gleam_ckpt")
    ]
    base_depth = rows[0]["deepest"] or cfg.unrolls
    for r in rows:
        r["x_deeper"] = r["deepest"] / base_depth if r["deepest"] else None

    head = (
        f"| {'method':<29} | {'deepest N':>9} | {'x deeper':>8} | {'footprint':>10} "
        f"| {'step peak':>10} | {'/ budget':>8} |"
    )
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        if r["deepest"] is None:
            print(f"| {r['method']:<29} | {'< 8':>9} | {'':>8} | {'':>10} | {'':>10} | {'':>8} |")
            continue
        depth = f">= {r['deepest']}" if r["capped"] else str(r["deepest"])
        print(
            f"| {r['label']:<29} | {depth:>9} | {r['x_deeper']:>8.2f} "
            f"| {format_bytes(r['footprint']):>10} | {format_bytes(r['peak']):>10} "
            f"| {r['ratio_to_budget']:>8.2f} |"
        )
    print(
        f"# '>= N': still within budget at the largest depth probed (--max-depth {max_depth}); "
        f"{len(log) + 1} probes in {time.perf_counter() - start:.0f} s"
    )
    if args.json:
        result = {
            "machine": info,
            "mode": mode,
            "device": str(device),
            "config": {**cfg.__dict__},
            "budget": budget,
            "budget_step_peak": base["peak"],
            "budget_state": base["state"],
            "max_depth": max_depth,
            "methods": rows,
            "probes": log,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
