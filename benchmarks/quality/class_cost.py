"""Measure ``protocol.CLASS_COST``: each optimizer class's run time on tiny_sd_long relative to AdamW.

    python -m benchmarks.quality.class_cost [--steps 100] [--rounds 2]

One process, one torch thread (as a benchmark worker runs), every class at its contender's
default arguments and untuned lr, ``--steps`` steps of tiny_sd_long with one held-out evaluation
at the end. The classes run in alternating rounds (this VM's speed drifts between minutes); a
class's cost is the median over rounds of (its seconds / AdamW's seconds in the same round).
Prints the ``CLASS_COST`` dict to paste into ``protocol.py``; measures, changes nothing.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.quality.contenders import contenders, resolve_run
from benchmarks.quality.runner import train_one
from benchmarks.quality.tasks import make_task

TASK = "tiny_sd_long"


def class_contenders(keys=None) -> dict:
    """{class name: its first contender (a peer or ours at constructor defaults)}; 8-bit
    AdaptiveHinaAdamW is priced by EIGHT_BIT_COST, not here."""
    out = {}
    for c in contenders():
        if dict(c.kwargs).get("optim_bits") == 8 or c.key.startswith("preset "):
            continue
        try:
            name = c.optimizer_class().__name__
        except ValueError:  # its package is not installed
            continue
        if keys is None or name in keys:
            out.setdefault(name, c)
    return out


def measure(steps: int, rounds: int, keys=None, log=print) -> dict:
    torch.set_num_threads(1)
    task = make_task(TASK, False)
    task.setup(lambda msg: None)
    chosen = class_contenders(keys)
    if "AdamW" not in chosen:
        raise SystemExit("AdamW is the reference and must be measured")
    ratios = {name: [] for name in chosen}
    for r in range(rounds + 1):  # round 0 warms every class up and is not counted
        seconds = {}
        for name, c in chosen.items():
            cfg = resolve_run(c, TASK, steps, c.lr, seed=1)
            seconds[name] = train_one(task, cfg, evals=1)["seconds"]
        if r:
            for name, s in seconds.items():
                ratios[name].append(s / seconds["AdamW"])
            log(f"round {r}: " + ", ".join(f"{n} {s:.1f}s" for n, s in seconds.items()))
    return {name: round(statistics.median(v), 2) for name, v in ratios.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--classes", nargs="*", help="class names (default: every installed one)")
    args = ap.parse_args(argv)
    cost = measure(args.steps, args.rounds, args.classes)
    print("CLASS_COST = " + repr(cost))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
