"""Plots and markdown for the quality benchmark (everything is derived from the results dict)."""
from __future__ import annotations

import math
import os
import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMG_DIR = os.path.join(ROOT, "docs", "img")


_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#aec7e8", "#98df8a", "#ffbb78", "#c5b0d5", "#f7b6d2"]


def _f(x, digits=4):
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "diverged"
    return f"{x:.{digits}g}"


def _lr(x):
    return f"{x:.3g}"


def _mean_train(runs):
    """Bucketed training curve averaged over runs: (steps, values)."""
    if not runs or any(r["diverged"] for r in runs):
        return [], []
    n = min(len(r["train_loss"]) for r in runs)
    steps = [runs[0]["train_loss"][i][0] for i in range(n)]
    return steps, [statistics.fmean(r["train_loss"][i][1] for r in runs) for i in range(n)]


def plot_task(name: str, task: dict, path: str) -> str | None:
    """Held-out (mean over report seeds) and training-loss curves of every contender."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - matplotlib is listed in requirements-bench.txt
        return None
    cs = task["contenders"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), dpi=100)
    log_y = name == "lora_teacher"
    base_steps, base_vals = _mean_train(cs["AdamW (fused)"]["runs"]) if "AdamW (fused)" in cs else ([], [])
    for i, (key, e) in enumerate(cs.items()):
        style = dict(color=_COLORS[i % len(_COLORS)], lw=1.7 if e["ours"] else 1.1, ls="-" if e["ours"] else "--")
        label = f"{key} (lr {_lr(e['best_lr'])})"
        curve = e["summary"]["mean_curve"]
        if curve:
            axes[0].plot(task["eval_steps"][:len(curve)], curve, label=label, **style)
        steps, vals = _mean_train(e["runs"])
        if vals and base_vals and len(vals) == len(base_vals):
            axes[1].plot(steps, [v / b for v, b in zip(vals, base_vals)], **style)
    axes[0].set_title("held-out loss (mean over report seeds)")
    axes[1].set_title("training loss ÷ AdamW (fused)'s, same batches (binned)")
    axes[1].axhline(1.0, color="k", lw=0.6)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    axes[1].set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    axes[1].yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    lo, hi = axes[1].get_ylim()
    if hi / lo < 4:  # a narrow range has few major ticks: label the minor ones too
        axes[1].yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        axes[1].tick_params(axis="y", which="minor", labelsize=7)
    else:
        from matplotlib.ticker import NullFormatter

        axes[1].yaxis.set_minor_formatter(NullFormatter())
    if log_y:
        axes[0].set_yscale("log")
    base = task["setup"].get("base_eval_loss") if isinstance(task.get("setup"), dict) else None
    if base is not None and not log_y:
        finals = [e["summary"]["final_mean"] for e in cs.values() if math.isfinite(e["summary"]["final_mean"])]
        if finals:
            lo, hi = min(finals), base
            axes[0].set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(task["title"], fontsize=11)
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
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


def _pm(mean, std, n):
    if mean is None:
        return "–"
    if not math.isfinite(mean):
        return "diverged"
    return f"{_f(mean)} ± {std:.2g}" if n > 1 else _f(mean)


def _loss_cell(s):
    if not math.isfinite(s["final_mean"]):
        return f"diverged ({s['diverged_runs']} runs)"
    return _pm(s["final_mean"], s["final_std"], s.get("n_runs", 2))


def _reach(s):
    r = s["steps_to_adamw_final"]
    return "never" if r is None else str(r)


def default_vs_grid(results: dict) -> list[dict]:
    """For every (task, our contender): documented lr against the grid's choice."""
    rows = []
    for tname, task in results["tasks"].items():
        for key, e in task["contenders"].items():
            if not e["ours"]:
                continue
            g = {v["lr"]: v["final"] for v in e["grid"].values()}
            d_lr = next((lr for lr in g if math.isclose(lr, e["default_lr"])), None)
            row = {"task": tname, "optimizer": key, "default_lr": e["default_lr"], "best_lr": e["best_lr"],
                   "tuning_default": g.get(d_lr) if d_lr is not None else None, "tuning_best": g[e["best_lr"]],
                   "best_at_grid_edge": e["best_at_grid_edge"], "default_won": d_lr is not None and
                   math.isclose(e["best_lr"], e["default_lr"])}
            row["report_best"] = e["summary"]["final_mean"]
            row["report_best_std"] = e["summary"]["final_std"]
            row["n"] = e["summary"].get("n_runs", 2)
            if "default_summary" in e:
                row["report_default"] = e["default_summary"]["final_mean"]
                row["report_default_std"] = e["default_summary"]["final_std"]
            elif row["default_won"]:
                row["report_default"], row["report_default_std"] = row["report_best"], row["report_best_std"]
            rows.append(row)
    return rows


def render_markdown(results: dict) -> str:
    """Markdown tables and plot links for docs/benchmarks.md (paths relative to docs/)."""
    quick = results.get("mode") == "quick"
    cfg = results.get("config", {})
    plots = results.get("plots", {})
    m = results.get("machine", {})
    lines = ["## Training quality: LoRA fine-tuning on four local tasks", "",
             f"`python -m benchmarks.bench_quality{' --quick' if quick else ''}` "
             f"({results.get('wall_seconds', 0) / 60:.1f} min wall time; torch {m.get('torch', '?')}, "
             f"{m.get('threads', '?')} thread), raw data `benchmarks/results/{'quality_quick' if quick else 'quality'}.json`. "
             "Protocol (`benchmarks/quality/`): each optimizer starts from its documented lr (constructor "
             "default, or the preset's `learning_rate` for `configs/*.toml`), the lr is picked from the grid "
             f"{cfg.get('grid_desc', '')} on tuning seed {cfg.get('tuning_seed', 0)} by final held-out loss, then "
             f"run on seeds {', '.join(str(s) for s in cfg.get('report_seeds', []))}. Everything but the lr keeps its "
             "documented value (lr-mask optimizers also get `max_lr = lr` where the grid lr exceeds their `max_lr`). "
             "Schedule: cosine with 5% warmup (AdamWScheduleFree: constant, its own 5% warmup, evaluated in `eval()` mode).",
             "",
             "Columns: held-out loss after the last step, mean ± sample std over the report seeds; *steps to AdamW* = "
             "first evaluation step at which the mean held-out curve reaches AdamW (fused)'s mean final loss "
             "(resolution: the evaluation interval); *stability* = std/mean of the training loss over the last 20% "
             "of steps (mean over seeds); *ms/step* = median `optimizer.step()` time during a run and its ratio "
             "to AdamW (fused) in the same process (lowest per-run median over the seeds; the machine is shared, "
             "see the notes for the spread between identical configurations); *state B/param* = optimizer state bytes per trainable "
             "parameter; *peak MB* = peak RSS during a run minus RSS before the optimizer was built "
             "(`/proc/self/status` VmHWM, reset per run; includes activations and gradients, so it is noisy "
             "below ~1 MB).", ""]
    # overview
    lines += ["| task | best final held-out loss | runner-up | AdamW (fused) | best of ours |", "|---|---|---|---|---|"]
    for tname, task in results["tasks"].items():
        cs = task["contenders"]
        order = sorted(cs, key=lambda k: cs[k]["summary"]["final_mean"])
        ours = [k for k in order if cs[k]["ours"]]
        cell = lambda k: f"{k} {_loss_cell(cs[k]['summary'])}" if k else "–"  # noqa: E731
        lines.append(f"| {tname} | **{cell(order[0])}** | {cell(order[1]) if len(order) > 1 else '–'} | "
                     f"{cell('AdamW (fused)') if 'AdamW (fused)' in cs else '–'} | {cell(ours[0]) if ours else '–'} |")
    lines.append("")
    for tname, task in results["tasks"].items():
        cs = task["contenders"]
        d = task.get("describe", {})
        base = task.get("setup", {}).get("base_eval_loss")
        lines += [f"### {task['title']} (`{tname}`)", ""]
        lines += [f"- {k}: {v}" for k, v in d.items()]
        lines += [f"- steps: {task['steps']}, held-out evaluations every {task['eval_steps'][1] - task['eval_steps'][0]} steps"
                  + (f"; held-out loss before fine-tuning: {_f(base)}" if base is not None else ""), ""]
        acc = any("accuracy_mean" in e["summary"] for e in cs.values())
        lines += ["| optimizer | lr | held-out loss | steps to AdamW | stability | ms/step | x AdamW (fused) | state B/param | peak MB |"
                  + (" accuracy |" if acc else ""),
                  "|---|---|---|---|---|---|---|---|---|" + ("---|" if acc else "")]
        for key in sorted(cs, key=lambda k: cs[k]["summary"]["final_mean"]):
            e, s = cs[key], cs[key]["summary"]
            mark = "" if e["best_lr"] == e["default_lr"] else " *"
            edge = " (edge)" if e["best_at_grid_edge"] else ""
            row = (f"| {'**' + key + '**' if e['ours'] else key} | {_lr(e['best_lr'])}{mark}{edge} | {_loss_cell(s)} | "
                   f"{_reach(s)} | {_f(s['stability'], 3)} | {_f(s['step_ms'], 3)} | {_f(s['x_adamw_fused'], 3)} | "
                   f"{_f(s['state_bytes_per_param'], 3)} | {_f(s['peak_rss_mb'], 3)} |")
            if acc:
                row += f" {_f(s.get('accuracy_mean'), 3)} |"
            lines.append(row)
        lines += ["", "Bold: this repository's optimizers. \\* the grid chose an lr other than the documented one; "
                  "(edge): at the edge of the grid.", ""]
        if tname in plots:
            lines += [f"![{tname} loss curves]({plots[tname]})", ""]
    # defaults against the grid
    rows = default_vs_grid(results)
    if rows:
        lines += ["### Documented lr of our optimizers against the grid", "",
                  "Tuning-seed losses at the documented lr and at the grid's best lr, and the same two settings on the "
                  "report seeds (mean ± std). Δ = relative change of the held-out loss when moving from the documented "
                  "lr to the grid's best (negative = the documented lr lost).", "",
                  "| task | optimizer | documented lr | grid best lr | tuning seed: documented → best | report seeds: documented | report seeds: grid best | Δ |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["default_won"]:
                lines.append(f"| {r['task']} | {r['optimizer']} | {_lr(r['default_lr'])} | same | {_f(r['tuning_best'])} | "
                             f"{_pm(r['report_best'], r['report_best_std'], r['n'])} | same | 0 |")
                continue
            rd = r.get("report_default")
            delta = ""
            if rd is not None and math.isfinite(rd) and math.isfinite(r["report_best"]) and rd:
                delta = f"{100 * (r['report_best'] - rd) / rd:+.1f}%"
            lines.append(f"| {r['task']} | {r['optimizer']} | {_lr(r['default_lr'])} | {_lr(r['best_lr'])}"
                         f"{' (edge)' if r['best_at_grid_edge'] else ''} | {_f(r['tuning_default'])} → {_f(r['tuning_best'])} | "
                         f"{_pm(rd, r.get('report_default_std'), r['n'])} | "
                         f"{_pm(r['report_best'], r['report_best_std'], r['n'])} | {delta} |")
        lines.append("")
    # the whole grid
    lines += ["<details><summary>Every grid point (tuning seed, final held-out loss)</summary>", ""]
    for tname, task in results["tasks"].items():
        lines += [f"**{tname}**", "", "| optimizer | lr: loss |", "|---|---|"]
        for key, e in task["contenders"].items():
            cells = ", ".join(f"{_lr(g['lr'])}: {_f(g['final'])}" + (" (documented)" if math.isclose(g["lr"], e["default_lr"]) else "")
                              for g in e["grid"].values())
            lines.append(f"| {key} | {cells} |")
        lines.append("")
    lines += ["</details>", ""]
    git = dict(results.get("git") or {})
    git["uncommitted"] = [p for p in git.get("uncommitted", []) if not p.startswith("benchmarks/results")]
    if git.get("head"):
        lines += [f"Code: commit `{git['head']}`" + (f", with uncommitted changes in {', '.join(f'`{p}`' for p in git['uncommitted'])}"
                                                    if git.get("uncommitted") else "") + ".", ""]
    notes = results.get("notes", [])
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)
