"""Metrics of the quality benchmark, derived from the raw runs of the results JSON only
(``summarise`` recomputes them; ``bench_quality --rerender`` uses it without training).

Per set of runs (a contender's tuned or untuned runs, an ablation row), over the report seeds:

- final held-out loss: mean, sample std, min, max (a diverged run makes the mean +inf);
- step time: the lowest per-run median of ``optimizer.step()`` (other processes only add
  time), and its ratio to AdamW (fused)'s tuned runs on the same task ("x AdamW (fused)");
- state bytes per trainable parameter; peak RSS (MB); accuracy where the task has one.

Per task: the start loss (the held-out loss before fine-tuning: the step-0 value of the curve,
the same for every contender, mean over the report seeds) and the reference (AdamW (fused)'s
tuned final loss). No-tune score of a contender = (start - its untuned final loss) /
(start - reference): 1 means as good as tuned AdamW, 0 means no progress, negative means worse
than not training.

Paired comparisons (:func:`paired`). Every contender and ablation row runs on the same report
seeds, and a seed fixes the task instance (data, initial weights, the teacher), so two sets of
runs are compared seed by seed: r_s = ln(final_s / reference_s), Δ% = 100 (exp(mean r) - 1)
(the geometric mean of the per-seed ratios), and ``clear`` when a paired t-test on the r_s
rejects "no difference" at 5 % two-sided (|mean| > t_{0.975, n-1} sd / sqrt(n); with three seeds
t = 4.30) and |Δ| >= ``MIN_EFFECT_PCT`` (0.1 %: runs that differ only in rounding can agree in
sign on every seed, and such a difference is not an effect). Most of the seed-to-seed spread is
the task instance, which both sides share, so this resolves differences that the unpaired spread
hides, in both directions.

Ablations: each row against its reference (leave-one-out: the default config; add-one-in: the
plain config). Tuned contenders: against tuned AdamW (fused) (``vs_reference``).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from benchmarks.quality.ablation import ADD_ONE_IN, LEAVE_ONE_OUT
from benchmarks.quality.contenders import BASELINE


@dataclass(frozen=True)
class Target:
    """A bar one of our contenders has to clear on every task: its ``role`` runs ("untuned": as
    shipped) at most ``within_pct`` % above the ``reference``'s ``reference_role`` runs, seed by
    seed (:func:`paired`'s Δ%)."""
    contender: str
    reference: str
    within_pct: float
    role: str = "untuned"
    reference_role: str = "tuned"


CAME = "CAME (pytorch_optimizer)"
TARGETS = (  # the Automagic family as shipped against tuned CAME; each 8-bit form against its twin
    *(Target(k, CAME, 10.0) for k in ("Automagic_CameAMP", "Automagic_CameAMP8bit", "Automagic_CameAMP_COptim",
                                      "Automagic_CameAMP_COptim8bit", "RefactoredAutomagicCameAMP")),
    Target("Automagic_CameAMP8bit", "Automagic_CameAMP", 5.0, reference_role="untuned"),
    Target("Automagic_CameAMP_COptim8bit", "Automagic_CameAMP_COptim", 5.0, reference_role="untuned"),
    Target("AdaptiveHinaAdamW (optim_bits=8)", "AdaptiveHinaAdamW", 5.0, reference_role="untuned"),
)


def run_stats(runs: list[dict], base_ms: float | None = None) -> dict | None:
    if not runs:
        return None
    finals = [r["final"] for r in runs]
    ok = [f for f in finals if math.isfinite(f)]
    medians = [r["step_ms_median"] for r in runs if r.get("step_ms_median") is not None]
    ms = min(medians) if medians else None
    peaks = [r["peak_rss_mb"] for r in runs if r.get("peak_rss_mb") is not None]
    out = {
        "n": len(runs), "final_mean": statistics.fmean(finals) if len(ok) == len(finals) else math.inf,
        "final_std": statistics.stdev(ok) if len(ok) > 1 else 0.0, "final_min": min(finals), "final_max": max(finals),
        "diverged": sum(bool(r["diverged"]) for r in runs), "errors": sorted({r["error"] for r in runs if r.get("error")}),
        "mean_curve": _mean_curve(runs), "step_ms": ms, "x_adamw_fused": ms / base_ms if ms and base_ms else None,
        "state_bytes_per_param": runs[0]["state_bytes_per_param"], "peak_rss_mb": max(peaks) if peaks else None,
    }
    accs = [r["accuracy"] for r in runs if "accuracy" in r]
    if accs:
        out["accuracy_mean"] = statistics.fmean(accs)
    return out


def _mean_curve(runs):
    if any(r["diverged"] for r in runs):
        return []
    n = min(len(r["curve"]) for r in runs)
    return [statistics.fmean(r["curve"][i] for r in runs) for i in range(n)]


def no_tune_score(start: float | None, untuned: float | None, reference: float | None) -> float | None:
    """(start - untuned) / (start - reference); None where undefined; -inf for a diverged untuned run."""
    if start is None or untuned is None or reference is None or not math.isfinite(reference) or start - reference <= 0:
        return None
    if not math.isfinite(untuned):
        return -math.inf
    return (start - untuned) / (start - reference)


def start_loss(task: dict, seeds) -> float | None:
    """Mean over the report seeds of the step-0 held-out loss (any run of that seed)."""
    first = {}
    for r in task["runs"].values():
        if r["seed"] in seeds and r["curve"] and r["eval_steps"][0] == 0:
            first.setdefault(r["seed"], r["curve"][0])
    return statistics.fmean(first.values()) if first else None


def shared_with(task: dict, run_ids: list[str], own_label: str) -> str | None:
    """The owner of these runs where another request asked for them first."""
    owners = [task["runs"][rid]["owner"] for rid in run_ids if rid in task["runs"]]
    others = [o for o in owners if o != own_label]
    return others[0] if others else None


def _runs(task: dict, ids) -> list[dict]:
    return [task["runs"][rid] for rid in ids or [] if rid in task["runs"]]


def _contender_summary(task: dict, key: str, entry: dict, start, reference, base_ms, reference_runs) -> dict:
    tuned_runs = _runs(task, entry.get("tuned_runs"))
    tuned = run_stats(tuned_runs, base_ms)
    untuned = run_stats(_runs(task, entry.get("untuned_runs")), base_ms)
    out = {"tuned": tuned, "untuned": untuned,
           "vs_reference": paired(tuned_runs, reference_runs) if tuned_runs and key != BASELINE else None,
           "no_tune_score": no_tune_score(start, untuned["final_mean"] if untuned else None, reference),
           "tuned_shared_with": shared_with(task, entry.get("tuned_runs", []), f"{key} (tuned)"),
           "untuned_shared_with": shared_with(task, entry.get("untuned_runs", []), f"{key} (untuned)")}
    search = entry.get("search")
    if search:
        out["search"] = {"best_lr": search["best_lr"], "edge": search["edge"], "hint": search["hint"],
                         "centre": search["centre"],
                         "points": [[p["lr"], task["runs"][p["run"]]["final"]] for p in search["points"]
                                    if p["run"] in task["runs"]]}
    return out


def _ablation_summary(task: dict, ab: dict, base_ms) -> dict:
    ref_ids = {LEAVE_ONE_OUT: ab["reference"], ADD_ONE_IN: ab.get("plain")}
    ref = {mode: run_stats(_runs(task, ids), base_ms) for mode, ids in ref_ids.items() if ids is not None}
    rows = []
    for row in ab["rows"]:
        runs = _runs(task, row["runs"])
        rows.append({"mode": row["mode"], "technique": row["technique"], "stats": run_stats(runs, base_ms),
                     **paired(runs, _runs(task, ref_ids.get(row["mode"])))})
    return {"lr": ab["lr"], "references": ref, "rows": rows}


# t_{0.975, df}: the two-sided 5 % critical value of Student's t, df = 1 .. 30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


MIN_EFFECT_PCT = 0.1  # smaller paired differences are never "clear" (see the module docstring)


def t_critical(df: int) -> float:
    """Two-sided 5 % critical value of Student's t with ``df`` degrees of freedom (normal beyond 30)."""
    return _T975[df - 1] if df <= len(_T975) else 1.960


def paired(runs: list[dict], ref_runs: list[dict]) -> dict:
    """``runs`` against ``ref_runs``, seed by seed (see the module docstring): ``delta_pct`` (the
    geometric mean of final / reference - 1, in %), ``log_ratios`` (per common seed, in seed
    order), ``t`` and ``clear`` (the paired t-test rejects equality at 5 % and |Δ| >= 0.1 %).
    ``t`` is None with fewer than two common seeds; everything is None / False where no seed is
    common or a run diverged."""
    ref = {r["seed"]: r["final"] for r in ref_runs}
    pairs = [(r["final"], ref[r["seed"]]) for r in sorted(runs, key=lambda r: r["seed"]) if r["seed"] in ref]
    if not pairs or not all(math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0 for a, b in pairs):
        return {"delta_pct": None, "log_ratios": [], "t": None, "clear": False}
    logs = [math.log(a / b) for a, b in pairs]
    mean = statistics.fmean(logs)
    out = {"delta_pct": 100.0 * math.expm1(mean), "log_ratios": logs, "t": None, "clear": False}
    if len(logs) > 1:
        sd = statistics.stdev(logs)
        t = mean / (sd / math.sqrt(len(logs))) if sd > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
        out.update(t=t, clear=abs(t) > t_critical(len(logs) - 1) and abs(out["delta_pct"]) >= MIN_EFFECT_PCT)
    return out


def _scaling(task: dict) -> list[dict]:
    return [{"contender": k, **e["lengths"]} for k, e in task["contenders"].items() if e["lengths"]["factor"] != 1.0]


def summarise_task(task: dict, seeds) -> dict:
    base = task["contenders"].get(BASELINE, {})
    base_runs = _runs(task, base.get("tuned_runs"))
    base_stats = run_stats(base_runs)
    base_ms = base_stats["step_ms"] if base_stats else None
    reference = base_stats["final_mean"] if base_stats else None
    start = start_loss(task, seeds)
    summary = {"start_loss": start, "reference_final": reference, "scaled": _scaling(task),
               "contenders": {k: _contender_summary(task, k, e, start, reference, base_ms, base_runs)
                              for k, e in task["contenders"].items()},
               "ablations": {k: _ablation_summary(task, ab, base_ms) for k, ab in task.get("ablations", {}).items()}}
    task["summary"] = summary
    return summary


def overview(results: dict) -> list[dict]:
    """Per task: best tuned, AdamW (fused) tuned, best of ours tuned, lowest no-tune score of ours, and
    ours whose tuned runs the paired test separates from tuned AdamW (below / above, with Δ%)."""
    rows = []
    for name, task in results["tasks"].items():
        s, cs = task["summary"]["contenders"], task["contenders"]
        tuned = {k: v["tuned"]["final_mean"] for k, v in s.items() if v["tuned"]}
        ours_tuned = {k: m for k, m in tuned.items() if cs[k]["ours"]}
        scores = {k: v["no_tune_score"] for k, v in s.items() if cs[k]["ours"] and v["no_tune_score"] is not None}
        clear = {k: v["vs_reference"]["delta_pct"] for k, v in s.items()
                 if cs[k]["ours"] and v.get("vs_reference") and v["vs_reference"]["clear"]}
        rows.append({"task": name, "best_tuned": _argmin(tuned), "adamw_tuned": tuned.get(BASELINE),
                     "best_ours_tuned": _argmin(ours_tuned), "lowest_no_tune_ours": _argmin(scores),
                     "ours_clearly_below": sorted(((k, d) for k, d in clear.items() if d < 0), key=lambda x: x[1]),
                     "ours_clearly_above": sorted(((k, d) for k, d in clear.items() if d > 0), key=lambda x: x[1])})
    return rows


def targets(results: dict) -> list[dict]:
    """Each :data:`TARGETS` bar on each task that ran both sides: the paired comparison and ``met``
    (Δ% at most the bar)."""
    rows = []
    for target in TARGETS:
        cells = {}
        for name, task in results["tasks"].items():
            mine, ref = task["contenders"].get(target.contender), task["contenders"].get(target.reference)
            ids = mine and mine.get(f"{target.role}_runs")
            ref_ids = ref and ref.get(f"{target.reference_role}_runs")
            if ids and ref_ids:
                cmp = paired(_runs(task, ids), _runs(task, ref_ids))
                met = cmp["delta_pct"] is not None and cmp["delta_pct"] <= target.within_pct
                cells[name] = {**cmp, "met": met}
        if cells:
            rows.append({"target": target, "cells": cells})
    return rows


def _argmin(d: dict):
    return [min(d, key=d.get), d[min(d, key=d.get)]] if d else None


def summarise(results: dict) -> dict:
    seeds = results["config"]["report_seeds"]
    for task in results["tasks"].values():
        summarise_task(task, seeds)
    results["overview"] = overview(results)
    results["targets"] = [{**row, "target": vars(row["target"])} for row in targets(results)]
    return results
