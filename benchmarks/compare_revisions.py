"""Step time of the working tree against an earlier commit, on the same machine at the same time.

    python -m benchmarks.compare_revisions --base REV [--optimizers Automagic_CameAMP ...] [--rounds 3]

A VM's speed drifts between runs (docs/benchmarks.md), so a speed change is measured by timing
both versions in alternating rounds: the earlier commit is checked out into a temporary git
worktree, and each round runs one child process per version that builds every optimizer (by
its registry name, with its defaults) next to ``torch.optim.AdamW(foreach=True)`` at SD1.5
rank-16 LoRA shapes (``--shapes locon``: LoCon with 3x3 conv factors; ``--shapes tiny_sd``: the
quality benchmark's rank-8 LoRA on the embedded tiny SD, 168 small tensors) and times them
round-robin (``benchmarks/common.py::time_steps``). Per version: the minimum over rounds of each
optimizer's ms/step, and its ratio to that version's own AdamW reference. Writes
``benchmarks/results/compare_revisions_<shapes>.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OPTIMIZERS = ["AdaptiveHinaAdamW", "HinaAdamWOptimizer", "Automagic_CameAMP", "Automagic_CameAMP8bit",
                      "Automagic_CameAMP_COptim", "Automagic_CameAMP_COptim8bit"]

# runs inside each checkout: prints {name: ms/step} for AdamW(foreach) and the named optimizers
_CHILD = r"""
import json, sys, torch
from benchmarks.common import make_params, time_steps
from benchmarks.shapes import lora_shapes
from library.train_util import resolve_optimizer
names = json.loads(sys.argv[1])
if sys.argv[2] == "locon":
    from benchmarks.bench_automagic import locon_shapes as shapes
elif sys.argv[2] == "list":  # the shapes themselves, worked out by the parent
    shapes = lambda rank, _listed=[(n, tuple(s)) for n, s in json.loads(sys.argv[3])]: _listed
else:
    shapes = lora_shapes
opts = {"AdamW(foreach)": None}
params = {}
for name in ["AdamW(foreach)"] + names:
    ps = make_params(shapes(16))
    if name == "AdamW(foreach)":
        opt = torch.optim.AdamW([p for _, p in ps], lr=1e-3, foreach=True)
    else:
        cls, kwargs, _ = resolve_optimizer(name, {})
        opt = cls(ps, **kwargs)
    opt.step(); opt.step()
    params[name], opts[name] = ps, opt
best = {k: float("inf") for k in opts}
for _ in range(2):
    for k, opt in opts.items():
        best[k] = min(best[k], time_steps(opt, warmup=1, repeats=4))
print(json.dumps(best))
"""


def measure(tree: str, names: list[str], shapes: str, listed=None) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    extra = [] if listed is None else [json.dumps(listed)]
    kind = shapes if listed is None else "list"
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(names), kind] + extra, cwd=tree, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the timing run in {tree} failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--optimizers", nargs="*", default=DEFAULT_OPTIMIZERS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", choices=["lora", "locon", "tiny_sd"], default="lora",
                    help="SD1.5 rank-16 LoRA (528 tensors), LoCon with 3x3 conv factors (44 tensors), or the "
                         "quality benchmark's tiny-SD LoRA (168 small tensors)")
    args = ap.parse_args(argv)
    listed = None
    if args.shapes == "tiny_sd":
        from benchmarks.shapes import tiny_sd_lora_shapes

        listed = tiny_sd_lora_shapes()
    base_sha = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="hina-base-") as tmp:
        tree = os.path.join(tmp, "tree")
        subprocess.run(["git", "worktree", "add", "--detach", tree, base_sha], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            runs = {"base": [], "current": []}
            for i in range(args.rounds):  # the order alternates too: neither version always goes first
                order = [("base", tree), ("current", ROOT)]
                for version, path in order if i % 2 == 0 else order[::-1]:
                    runs[version].append(measure(path, args.optimizers, args.shapes, listed))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, capture_output=True)
    result = {"base": base_sha, "shapes": args.shapes, "rounds": runs, "ms": {}, "ratio_vs_foreach": {}}
    for version, rs in runs.items():
        ms = {k: min(r[k] for r in rs) for k in rs[0]}
        result["ms"][version] = ms
        result["ratio_vs_foreach"][version] = {k: v / ms["AdamW(foreach)"] for k, v in ms.items()}
    print(f"base {base_sha[:10]} vs the working tree, {args.rounds} alternating rounds "
          f"({args.shapes} shapes, each optimizer's defaults)")
    print("| optimizer | base ms | base x AdamW | current ms | current x AdamW | current / base |")
    print("|---|---|---|---|---|---|")
    for k in result["ms"]["current"]:
        b, c = result["ms"]["base"][k], result["ms"]["current"][k]
        print(f"| {k} | {b:.1f} | {result['ratio_vs_foreach']['base'][k]:.2f} | {c:.1f} | "
              f"{result['ratio_vs_foreach']['current'][k]:.2f} | {c / b:.2f} |")
    path = os.path.join(ROOT, "benchmarks", "results", f"compare_revisions_{args.shapes}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
