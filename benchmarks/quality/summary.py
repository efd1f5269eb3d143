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

Ablations: Δ% of each row against its reference (leave-one-out: the default config; add-one-in:
the plain config); ``clear`` when |difference| exceeds the sum of the two standard deviations.
"""
from __future__ import annotations

import math
import statistics

from benchmarks.quality.ablation import ADD_ONE_IN, LEAVE_ONE_OUT
from benchmarks.quality.contenders import BASELINE


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


def _contender_summary(task: dict, key: str, entry: dict, start, reference, base_ms) -> dict:
    tuned = run_stats(_runs(task, entry.get("tuned_runs")), base_ms)
    untuned = run_stats(_runs(task, entry.get("untuned_runs")), base_ms)
    out = {"tuned": tuned, "untuned": untuned,
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
    ref = {LEAVE_ONE_OUT: run_stats(_runs(task, ab["reference"]), base_ms)}
    if "plain" in ab:
        ref[ADD_ONE_IN] = run_stats(_runs(task, ab["plain"]), base_ms)
    rows = []
    for row in ab["rows"]:
        stats = run_stats(_runs(task, row["runs"]), base_ms)
        rows.append({"mode": row["mode"], "technique": row["technique"], "stats": stats,
                     **compare(stats, ref.get(row["mode"]))})
    return {"lr": ab["lr"], "references": ref, "rows": rows}


def compare(stats: dict | None, ref: dict | None) -> dict:
    """Δ% of the mean against the reference and whether the gap exceeds the two stds summed."""
    if not stats or not ref or not all(math.isfinite(x) for x in (stats["final_mean"], ref["final_mean"])):
        return {"delta_pct": None, "clear": False}
    diff = stats["final_mean"] - ref["final_mean"]
    delta = 100.0 * diff / ref["final_mean"] if ref["final_mean"] else None
    both = stats["n"] > 1 and ref["n"] > 1
    return {"delta_pct": delta, "clear": both and abs(diff) > stats["final_std"] + ref["final_std"]}


def _scaling(task: dict) -> list[dict]:
    return [{"contender": k, **e["lengths"]} for k, e in task["contenders"].items() if e["lengths"]["factor"] != 1.0]


def summarise_task(task: dict, seeds) -> dict:
    base = task["contenders"].get(BASELINE, {})
    base_stats = run_stats(_runs(task, base.get("tuned_runs")))
    base_ms = base_stats["step_ms"] if base_stats else None
    reference = base_stats["final_mean"] if base_stats else None
    start = start_loss(task, seeds)
    summary = {"start_loss": start, "reference_final": reference, "scaled": _scaling(task),
               "contenders": {k: _contender_summary(task, k, e, start, reference, base_ms)
                              for k, e in task["contenders"].items()},
               "ablations": {k: _ablation_summary(task, ab, base_ms) for k, ab in task.get("ablations", {}).items()}}
    task["summary"] = summary
    return summary


def overview(results: dict) -> list[dict]:
    """Per task: best tuned, AdamW (fused) tuned, best of ours tuned, lowest no-tune score of ours."""
    rows = []
    for name, task in results["tasks"].items():
        s, cs = task["summary"]["contenders"], task["contenders"]
        tuned = {k: v["tuned"]["final_mean"] for k, v in s.items() if v["tuned"]}
        ours_tuned = {k: m for k, m in tuned.items() if cs[k]["ours"]}
        scores = {k: v["no_tune_score"] for k, v in s.items() if cs[k]["ours"] and v["no_tune_score"] is not None}
        rows.append({"task": name, "best_tuned": _argmin(tuned), "adamw_tuned": tuned.get(BASELINE),
                     "best_ours_tuned": _argmin(ours_tuned), "lowest_no_tune_ours": _argmin(scores)})
    return rows


def _argmin(d: dict):
    return [min(d, key=d.get), d[min(d, key=d.get)]] if d else None


def summarise(results: dict) -> dict:
    seeds = results["config"]["report_seeds"]
    for task in results["tasks"].values():
        summarise_task(task, seeds)
    results["overview"] = overview(results)
    return results
