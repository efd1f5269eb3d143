"""Plots and markdown of the quality benchmark. Every number comes from the results dict
(raw runs and the summaries that ``summary.summarise`` derives from them)."""
from __future__ import annotations

import math
import os
import statistics
from collections import Counter

from benchmarks.quality.ablation import ADD_ONE_IN, LEAVE_ONE_OUT
from benchmarks.quality.contenders import BASELINE
from benchmarks.quality.runner import eval_steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMG_DIR = os.path.join(ROOT, "docs", "img")

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#aec7e8", "#98df8a", "#ffbb78", "#c5b0d5", "#f7b6d2"]
_MODE_TITLE = {LEAVE_ONE_OUT: "leave-one-out (defaults minus one technique; reference: the defaults)",
               ADD_ONE_IN: "add-one-in (every technique off plus one; reference: the plain config)"}


# ----------------------------------------------------------------------------- formatting
def _f(x, digits=4):
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "diverged" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def _lr(x):
    return "–" if x is None else f"{x:.3g}"


def _loss(stats) -> str:
    if not stats:
        return "–"
    if not math.isfinite(stats["final_mean"]):
        why = "error" if stats["errors"] else "diverged"
        return f"{why} ({stats['diverged']}/{stats['n']})"
    return f"{_f(stats['final_mean'])} ± {stats['final_std']:.2g}" if stats["n"] > 1 else _f(stats["final_mean"])


def _score(x) -> str:
    if x is None:
        return "–"
    return "diverged" if not math.isfinite(x) else f"{x:.2f}"


def _pct(x) -> str:
    return "–" if x is None else f"{x:+.1f}%"


def _paired(cmp) -> str:
    """A paired comparison (summary.paired) as "Δ% (t)" with ◆ where the t-test is clear."""
    if not cmp or cmp.get("delta_pct") is None:
        return "–"
    t = cmp.get("t")
    t_text = "" if t is None else (f", t {t:+.1f}" if math.isfinite(t) else f", t {'+' if t > 0 else '-'}inf")
    return f"{_pct(cmp['delta_pct'])}{t_text}{' ◆' if cmp.get('clear') else ''}"


# ----------------------------------------------------------------------------- plots
def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - matplotlib is listed in requirements-bench.txt
        return None
    return plt


def _mean_train(runs):
    """Bucketed training curve averaged over runs: (steps, values)."""
    if not runs or any(r["diverged"] for r in runs):
        return [], []
    n = min(len(r["train_loss"]) for r in runs)
    return [runs[0]["train_loss"][i][0] for i in range(n)], [statistics.fmean(r["train_loss"][i][1] for r in runs)
                                                           for i in range(n)]


def _plot_curves(axes, name: str, task: dict) -> None:
    s, cs = task["summary"]["contenders"], task["contenders"]
    axis = eval_steps(task["steps"], task["evals"])
    base = _mean_train([task["runs"][r] for r in cs.get(BASELINE, {}).get("tuned_runs", [])])[1]
    tuned = [k for k in cs if s[k]["tuned"]]
    for i, key in enumerate(tuned):
        color, lw = _COLORS[i % len(_COLORS)], 1.8 if cs[key]["ours"] else 1.1
        curve = s[key]["tuned"]["mean_curve"]
        if curve:
            axes[0].plot(axis[:len(curve)], curve, color=color, lw=lw, label=f"{key} (lr {_lr(s[key]['search']['best_lr'])})")
        untuned = (s[key]["untuned"] or {}).get("mean_curve")
        if cs[key]["ours"] and untuned:
            axes[0].plot(axis[:len(untuned)], untuned, color=color, lw=1.0, ls="--",
                         label=f"{key} untuned (lr {_lr(cs[key]['untuned_lr'])})")
        steps, vals = _mean_train([task["runs"][r] for r in cs[key]["tuned_runs"]])
        if vals and base and len(vals) == len(base):
            axes[1].plot(steps, [v / b for v, b in zip(vals, base)], color=color, lw=lw)
    if name == "lora_teacher":
        axes[0].set_yscale("log")


def _style_axes(axes, task: dict) -> None:
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    axes[0].set_title("held-out loss, mean over report seeds (dashed: ours untuned)")
    axes[1].set_title("training loss ÷ AdamW (fused)'s, tuned, same batches (binned)")
    axes[1].axhline(1.0, color="k", lw=0.6)
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    lo, hi = axes[1].get_ylim()
    axes[1].yaxis.set_minor_formatter(FormatStrFormatter("%.3g") if hi / lo < 4 else NullFormatter())
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    start = task["summary"]["start_loss"]
    finals = [v["tuned"]["final_mean"] for v in task["summary"]["contenders"].values()
              if v["tuned"] and math.isfinite(v["tuned"]["final_mean"])]
    if start is not None and finals and axes[0].get_yscale() == "linear":
        lo = min(finals)
        axes[0].set_ylim(lo - 0.05 * (start - lo), start + 0.05 * (start - lo))


def plot_task(name: str, task: dict, path: str) -> str | None:
    """Held-out curves (tuned; ours untuned dashed) and training loss relative to AdamW (fused)."""
    plt = _plt()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 6), dpi=100)
    _plot_curves(axes, name, task)
    _style_axes(axes, task)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(task["title"], fontsize=11)
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def plot_all(results: dict, img_dir: str = IMG_DIR) -> dict:
    suffix = "_quick" if results.get("mode") == "quick" else ""
    out = {}
    for name, task in results["tasks"].items():
        p = plot_task(name, task, os.path.join(img_dir, f"quality_{name}{suffix}.png"))
        if p:
            out[name] = os.path.relpath(p, os.path.join(ROOT, "docs")).replace(os.sep, "/")
    results["plots"] = out
    return out


# ----------------------------------------------------------------------------- markdown: header
def _schedules_text(results: dict) -> str:
    """The most common schedule, then every contender with another one."""
    sched = {}
    for task in results["tasks"].values():
        for key, e in task["contenders"].items():
            s = e["schedule"]
            sched[key] = "constant" if s["name"] == "constant" else (
                f"{s['name']} with {s['warmup']} warmup" if isinstance(s["warmup"], str) else
                f"{s['name']} with {s['warmup']} warmup steps at {e['reference_steps']} steps, scaled to the run")
    if not sched:
        return ""
    common = Counter(sched.values()).most_common(1)[0][0]
    others = "; ".join(f"{k}: {v}" for k, v in sched.items() if v != common)
    return f"lr schedule (diffusers): {common}" + (f", except {others}" if others else "") + "."


def _protocol_text(results: dict) -> str:
    cfg = results["config"]
    seeds = ", ".join(str(s) for s in cfg["report_seeds"])
    abl = "; ".join(f"{a['contender']} ({', '.join(m.replace('_', '-') for m in a['modes'])}) on "
                    f"{', '.join(a['tasks'])}" for a in cfg["ablations"])
    return (f"Protocol (`benchmarks/quality/`): tuned contenders get an lr search on seed {cfg['tuning_seed']} "
            f"({cfg['search']['text']}; a diverged run counts as +inf; ties go to the lr closest to the centre; "
            "the centre is the untuned lr unless a measured hint is set, marked in the grids below), then run at the "
            f"best lr on seeds {seeds}. Untuned: the contender as shipped (its default or preset lr, arguments and "
            f"schedule) on seeds {seeds}. Warmup/transition lengths (`warmup_steps`, `wd_transition_steps`) "
            "longer than half a run are scaled down to half of it (per task below). Identical runs are run once "
            "and shared. " + _schedules_text(results) + (f" Ablations: {abl}, at the tuned lr of that optimizer "
                                                          f"on that task, seeds {seeds}." if abl else ""))


def _header(results: dict) -> list[str]:
    quick = results.get("mode") == "quick"
    m, cfg = results.get("machine", {}), results["config"]
    return [f"## Training quality: LoRA fine-tuning on {len(results['tasks'])} local tasks", "",
            f"`python -m benchmarks.bench_quality{' --quick' if quick else ''} --jobs {cfg['jobs']}` "
            f"({results.get('wall_seconds', 0) / 60:.1f} min wall time, estimated "
            f"{cfg['estimate']['wall_seconds'] / 60:.1f}; torch {m.get('torch', '?')}, {cfg['jobs']} processes x "
            f"{cfg['threads']} thread), raw data `benchmarks/results/{'quality_quick' if quick else 'quality'}.json`.",
            "", _protocol_text(results), "",
            "Columns: *held-out loss* after the last step, mean ± sample std over the report seeds; *no-tune score* = "
            "(start − untuned loss) / (start − tuned AdamW (fused) loss), start = held-out loss before fine-tuning "
            "(1: as good as tuned AdamW, 0: no progress); *(edge)*: the best lr of the search is still its lowest or "
            "highest point after the cap; *ms/step* = median `optimizer.step()` time of a run (lowest over the "
            "seeds; the machine runs other processes) and its ratio to AdamW (fused); *state B/param* = optimizer "
            "state bytes per trainable parameter; *peak MB* = peak RSS during a run minus RSS before the optimizer "
            "was built (includes activations and gradients, so small differences are noise); *tuned vs AdamW "
            "(paired)*: the tuned runs against tuned AdamW (fused) seed by seed (a seed fixes the task instance): the "
            "geometric mean of the per-seed loss ratios as Δ%, the paired t statistic of the log ratios, and ◆ where "
            "a paired t-test rejects equality at 5 % (|t| > 4.30 with three seeds) and |Δ| >= 0.1 %. Bold: this "
            "repository's optimizers and presets.", ""]


def _overview(results: dict) -> list[str]:
    cell = lambda x: "–" if not x else f"{x[0]} {_f(x[1])}"  # noqa: E731
    lines = ["### Overview", "",
             "Tuned: final held-out loss (mean over the report seeds) at the best lr of each search. Clearly below / "
             "above tuned AdamW: ours whose tuned runs the paired t-test separates from tuned AdamW (fused), with the "
             "paired Δ%.",
             "", "| task | best tuned | AdamW (fused) tuned | best of ours tuned | lowest no-tune score of ours | "
             "ours clearly below tuned AdamW | ours clearly above tuned AdamW |",
             "|---|---|---|---|---|---|---|"]
    listed = lambda xs: ", ".join(f"{k} {_pct(d)}" for k, d in xs) or "none"  # noqa: E731
    for row in results["overview"]:
        low = row["lowest_no_tune_ours"]
        lines.append(f"| {row['task']} | {cell(row['best_tuned'])} | {_f(row['adamw_tuned'])} | "
                     f"{cell(row['best_ours_tuned'])} | {f'{low[0]} {_score(low[1])}' if low else '–'} | "
                     f"{listed(row.get('ours_clearly_below', []))} | {listed(row.get('ours_clearly_above', []))} |")
    return lines + [""]


def _targets(results: dict) -> list[str]:
    rows = results.get("targets") or []
    if not rows:
        return []
    tasks = list(results["tasks"])
    lines = ["### Targets", "",
             "Each of ours against the bar it has to clear on every task: the Automagic family as shipped (untuned) "
             "within 10 % of tuned CAME, each 8-bit form within 5 % of its 32-bit twin (both as shipped). Δ% and t "
             "seed by seed as in the task tables (◆: the paired t-test resolves the difference); ✓ where Δ% is at "
             "most the bar. `benchmarks/quality/summary.py` (`TARGETS`) lists the bars.", "",
             "| contender | against | bar | " + " | ".join(tasks) + " |", "|---|---|---|" + "---|" * len(tasks)]
    for row in rows:
        t = row["target"]
        cells = [row["cells"].get(name) for name in tasks]
        text = ["–" if c is None else f"{_paired(c)} {'✓' if c['met'] else '✗'}" for c in cells]
        lines.append(f"| {t['contender']} ({t['role']}) | {t['reference']} ({t['reference_role']}) | "
                     f"+{t['within_pct']:g} % | " + " | ".join(text) + " |")
    return lines + [""]


# ----------------------------------------------------------------------------- markdown: a task
def _row_order(task: dict) -> list[str]:
    s = task["summary"]["contenders"]
    tuned = sorted((k for k in s if s[k]["tuned"]), key=lambda k: s[k]["tuned"]["final_mean"])
    untuned = sorted((k for k in s if not s[k]["tuned"] and s[k]["untuned"]), key=lambda k: s[k]["untuned"]["final_mean"])
    return tuned + untuned


def _contender_row(task: dict, key: str, has_acc: bool) -> str:
    e, s = task["contenders"][key], task["summary"]["contenders"][key]
    meas = s["tuned"] or s["untuned"]
    search = s.get("search")
    tuned_lr = f"{_lr(search['best_lr'])}{' (edge)' if search['edge'] else ''}" if search else "–"
    untuned_lr = _lr(e["untuned_lr"]) if e["untuned"] else "–"
    acc = f" {_f(meas.get('accuracy_mean'), 3)} |" if has_acc else ""
    return (f"| {'**' + key + '**' if e['ours'] else key} | {untuned_lr} | {_loss(s['untuned'])} | "
            f"{_score(s['no_tune_score'])} | {tuned_lr} | {_loss(s['tuned'])} | {_paired(s.get('vs_reference'))} | "
            f"{_f(meas['step_ms'], 3)} | {_f(meas['x_adamw_fused'], 3)} | {_f(meas['state_bytes_per_param'], 3)} | "
            f"{_f(meas['peak_rss_mb'], 3)} |" + acc)


def _scaling_line(task: dict) -> str:
    groups = {}
    for row in task["summary"]["scaled"]:
        change = ", ".join(f"`{k}` {row['original'][k]}→{row['scaled'][k]}" for k in row["original"])
        groups.setdefault(f"x{row['factor']:.3g}: {change}", []).append(row["contender"])
    if not groups:
        return f"- lengths: no warmup/transition length exceeds half of the {task['steps']} steps; nothing scaled"
    return (f"- lengths scaled to the {task['steps']}-step run: "
            + "; ".join(f"{change} ({', '.join(keys)})" for change, keys in groups.items()))


def _shared_lines(task: dict) -> list[str]:
    out = []
    for key in _row_order(task):
        s = task["summary"]["contenders"][key]
        for role in ("tuned", "untuned"):
            if s[f"{role}_shared_with"]:
                out.append(f"{key} ({role}): same runs as {s[f'{role}_shared_with']}")
    return ["Shared runs (identical configurations): " + "; ".join(out) + ".", ""] if out else []


def _task_head(name: str, task: dict) -> list[str]:
    sm = task["summary"]
    lines = [f"### {task['title']} (`{name}`)", ""] + [f"- {k}: {v}" for k, v in task["describe"].items()]
    lines.append(f"- {task['steps']} steps, held-out evaluation every "
                 f"{eval_steps(task['steps'], task['evals'])[1]} steps; start (held-out loss before fine-tuning): "
                 f"{_f(sm['start_loss'])}; tuned AdamW (fused): {_f(sm['reference_final'])}")
    lines.append(_scaling_line(task))
    if task.get("left_out"):
        lines.append(f"- left out of this task (time budget): {', '.join(task['left_out'])}")
    return lines + [""]


def _task_section(name: str, task: dict, plots: dict) -> list[str]:
    has_acc = any("accuracy" in r for r in task["runs"].values())
    lines = _task_head(name, task)
    lines += ["| optimizer | untuned lr | untuned held-out loss | no-tune score | tuned lr | tuned held-out loss | "
              "tuned vs AdamW (paired) | ms/step | x AdamW (fused) | state B/param | peak MB |"
              + (" accuracy |" if has_acc else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if has_acc else "")]
    lines += [_contender_row(task, key, has_acc) for key in _row_order(task)]
    lines += ["", "ms/step, x AdamW, state and peak memory: from the tuned runs where there are any, else the "
              "untuned runs.", ""]
    lines += _shared_lines(task)
    if name in plots:
        lines += [f"![{name} loss curves]({plots[name]})", ""]
    return lines


# ----------------------------------------------------------------------------- markdown: ablations
def _ablation_cell(row) -> str:
    if row is None:
        return "–"
    stats = row["stats"]
    return f"{_loss(stats)} ({_paired(row)})"


def _ablation_table(results: dict, key: str, mode: str) -> list[str]:
    tasks = [t for t, task in results["tasks"].items() if key in task["summary"]["ablations"]]
    abl = {t: results["tasks"][t]["summary"]["ablations"][key] for t in tasks}
    abl = {t: a for t, a in abl.items() if any(r["mode"] == mode for r in a["rows"])}
    if not abl:
        return []
    techniques = list(dict.fromkeys(r["technique"] for a in abl.values() for r in a["rows"] if r["mode"] == mode))
    lines = [f"**{key}: {_MODE_TITLE[mode]}**", "", "| | " + " | ".join(abl) + " |", "|---|" + "---|" * len(abl),
             "| tuned lr | " + " | ".join(_lr(a["lr"]) for a in abl.values()) + " |",
             "| reference | " + " | ".join(_loss(a["references"].get(mode)) for a in abl.values()) + " |"]
    for tech in techniques:
        cells = [next((r for r in a["rows"] if r["mode"] == mode and r["technique"] == tech), None) for a in abl.values()]
        verb = "without" if mode == LEAVE_ONE_OUT else "plain +"
        lines.append(f"| {verb} {tech} | " + " | ".join(_ablation_cell(c) for c in cells) + " |")
    return lines + [""]


def _ablations(results: dict) -> list[str]:
    keys = list(dict.fromkeys(k for t in results["tasks"].values() for k in t["summary"]["ablations"]))
    if not keys:
        return []
    lines = ["### Ablations", "",
             "Held-out loss (mean ± std over the report seeds) and, against the reference seed by seed, the geometric "
             "mean of the per-seed loss ratios as Δ% with the paired t statistic of the log ratios; ◆: a paired "
             "t-test rejects equality at 5 % (|t| > 4.30 with three seeds) and |Δ| >= 0.1 % (runs that differ only in "
             "rounding can agree in sign on every seed). ◆ says the test resolves a difference, Δ% says its size. "
             "The seeds are shared, and a seed fixes the task instance, so the pairing removes the spread between "
             "instances that the ± columns include. "
             "Leave-one-out covers the techniques that are on by default; `benchmarks/quality/ablation.py` lists "
             "the arguments of each technique.", ""]
    for key in keys:
        for mode in (LEAVE_ONE_OUT, ADD_ONE_IN):
            lines += _ablation_table(results, key, mode)
    return lines


# ----------------------------------------------------------------------------- markdown: grids, notes
def _grids(results: dict) -> list[str]:
    lines = ["<details><summary>Every lr search (tuning seed, final held-out loss)</summary>", ""]
    for name, task in results["tasks"].items():
        lines += [f"**{name}**", "", "| optimizer | centre | lr: loss | best |", "|---|---|---|---|"]
        for key, s in task["summary"]["contenders"].items():
            if "search" not in s:
                continue
            sr = s["search"]
            pts = ", ".join(f"{_lr(lr)}: {_f(loss)}" for lr, loss in sr["points"])
            lines.append(f"| {key} | {_lr(sr['centre'])}{' (hint)' if sr['hint'] else ''} | {pts} | "
                         f"{_lr(sr['best_lr'])}{' (edge)' if sr['edge'] else ''} |")
        lines.append("")
    return lines + ["</details>", ""]


def _notes(results: dict) -> list[str]:
    notes = [f"{k} skipped: {why}" for k, why in results.get("contenders_skipped", {}).items()]
    notes += [f"task {t} skipped: {why}" for t, why in results.get("tasks_skipped", {}).items()]
    for name, task in results["tasks"].items():
        errors = sorted({f"{r['owner']}: {r['error']}" for r in task["runs"].values() if r.get("error")})
        notes += [f"{name}: {e}" for e in errors]
        if task["setup"].get("pretrain_cached"):
            notes.append(f"{name}: pretrained weights from `.cache/bench_quality/` (the wall time excludes pretraining)")
    git = results.get("git") or {}
    lines = []
    if git.get("head"):
        dirty = git.get("uncommitted") or []
        lines += [f"Code: commit `{git['head']}`" + (f", with uncommitted changes in {', '.join(f'`{p}`' for p in dirty)}"
                                                    if dirty else "") + ".", ""]
    return lines + (["Notes:", ""] + [f"- {n}" for n in notes] + [""] if notes else [])


def render_markdown(results: dict) -> str:
    """The docs/benchmarks.md section (plot paths relative to docs/)."""
    plots = results.get("plots", {})
    lines = _header(results)
    for name, task in results["tasks"].items():
        lines += _task_section(name, task, plots)
    lines += _overview(results) + _targets(results) + _ablations(results) + _grids(results) + _notes(results)
    return "\n".join(lines)
