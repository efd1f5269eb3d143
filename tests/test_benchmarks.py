"""The benchmark tools: the per-feature profiler and the quality benchmark's smallest task."""
import json
import math

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_profiler_tiny_adaptive_hina():
    from benchmarks.profiler import format_report, profile

    res = profile("AdaptiveHinaAdamW", shapes="tiny", warmup=1, repeats=2, rounds=1,
                  together=("use_spd", "use_agr", "use_grams"))
    for key in ("optimizer", "class", "optimizer_args", "lr", "shapes", "tensors", "params", "step_ms", "features",
                "together",
                "inactive_features", "errors", "state_bytes_by_key", "bytes_per_param_by_key", "state_bytes_total",
                "bytes_per_param"):
        assert key in res, key
    assert res["tensors"] == 8 and res["params"] > 0 and res["step_ms"] > 0
    # every use_* flag that is on by default is toggled; use_orthogonal_grad and use_grams are off by default
    assert {"use_spd", "use_cautious", "use_adopt_stability", "use_agr", "use_tam",
            "use_dynamic_adaptation", "use_lr_mask"} <= set(res["features"])
    assert {"use_orthogonal_grad", "use_grams"} <= set(res["inactive_features"])
    for d in res["features"].values():
        assert set(d) == {"ms_without", "attributable_ms", "attributable_pct"}
        assert math.isclose(d["attributable_ms"], res["step_ms"] - d["ms_without"])
    assert res["together"]["flags"] == ["use_spd", "use_agr"]  # use_grams is off already: not toggled
    assert math.isclose(res["together"]["attributable_ms"], res["step_ms"] - res["together"]["ms_without"])
    assert "off together" in format_report(res)
    by_key = res["state_bytes_by_key"]
    assert by_key["exp_avg"] == by_key["exp_avg_sq"] == 4 * res["params"]
    assert by_key["lr_mask"] == 2 * res["params"]  # fp16 mask with the defaults
    assert sum(v for k, v in by_key.items() if not k.startswith("group:")) == res["state_bytes_total"]
    assert "use_spd" in format_report(res)


def test_profiler_cli_json(tmp_path, capsys):
    from benchmarks.profiler import main

    out = tmp_path / "p.json"
    main(["--optimizer", "Automagic_CameAMP", "--optimizer_args", "use_tam=False", "lr=1e-4",
          "--shapes", "tiny", "--warmup", "1", "--repeats", "2", "--rounds", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["lr"] == 1e-4 and res["optimizer_args"]["use_tam"] is False
    assert "use_tam" in res["inactive_features"] and "use_tam" not in res["features"]
    assert "use_lr_mask" in res["features"] and "lr_mask" in res["state_bytes_by_key"]
    assert "exp_avg" in res["state_bytes_by_key"]
    assert res["together"] is None
    assert "| state key |" in capsys.readouterr().out


# ----------------------------------------------------------------------------- quality benchmark
def _bowl(optimum, width=1.0):
    """Synthetic final loss as a function of lr: a parabola in log(lr) with its minimum at `optimum`."""
    return lambda lr: (math.log(lr / optimum) / width) ** 2


def test_lr_search_extends_past_the_first_grid_until_interior():
    from benchmarks.quality.search import SearchRule, run_search

    res = run_search(_bowl(0.05), centre=1e-3)  # optimum ~4 factor-3 steps above the centre
    lrs = list(res["points"])
    assert lrs[:3] == sorted(lrs[:3]) and min(lrs) == pytest.approx(3.33e-4, rel=1e-3)
    assert res["best_lr"] == pytest.approx(0.081) and not res["edge"]
    assert max(lrs) > res["best_lr"] > min(lrs)  # interior: one point beyond the best on each side
    assert len(lrs) == 7
    res = run_search(_bowl(3e-6), centre=1e-3)  # below the grid: extends downwards
    assert res["best_lr"] == 4.12e-6 and not res["edge"] and min(res["points"]) == 1.37e-6
    assert all(float(f"{lr:.3g}") == lr for lr in res["points"])  # 3 significant digits
    res = run_search(_bowl(1e-3), centre=1e-3)
    assert list(res["points"]) == [3.33e-4, 1e-3, 3e-3] and res["best_lr"] == 1e-3  # no extension needed
    capped = run_search(_bowl(1e-3), centre=1e-3, rule=SearchRule(max_points=3))
    assert capped["best_lr"] == 1e-3


def test_lr_search_cap_marks_the_edge():
    from benchmarks.quality.search import SearchRule, run_search

    res = run_search(lambda lr: -lr, centre=1.0)  # better and better as the lr grows
    assert len(res["points"]) == 8 and res["edge"] and res["best_lr"] == max(res["points"]) == 729.0
    res = run_search(lambda lr: -lr, centre=1.0, rule=SearchRule(max_points=5))
    assert len(res["points"]) == 5 and res["edge"] and res["best_lr"] == 27.0


def test_lr_search_diverged_points_count_as_inf():
    from benchmarks.quality.search import best_exponent, next_exponent, SearchRule

    rule = SearchRule()
    nan = float("nan")
    # the highest lr diverged: the best finite point is interior, nothing more to run
    assert best_exponent({-1: 0.5, 0: 0.3, 1: float("inf")}) == 0
    assert next_exponent({-1: 0.5, 0: 0.3, 1: nan}, rule) is None
    # the best is the lowest point (the others diverged): extend downwards
    assert next_exponent({-1: 0.4, 0: float("inf"), 1: nan}, rule) == -2
    # everything diverged: go below the lowest until something trains, or the cap
    assert next_exponent({-1: nan, 0: nan, 1: nan}, rule) == -2
    tried = {k: float("inf") for k in range(-6, 2)}  # 8 points, all diverged: the cap ends it
    assert next_exponent(tried, rule) is None


def test_lr_search_ties_go_to_the_centre():
    from benchmarks.quality.search import best_exponent, next_exponent, run_search, SearchRule

    assert best_exponent({-1: 0.2, 0: 0.2, 1: 0.2}) == 0
    assert best_exponent({-2: 0.1, 1: 0.1, 0: 0.5}) == 1  # |1| < |-2|
    assert best_exponent({-1: 0.1, 1: 0.1, 0: 0.5}) == -1  # equal distance: the lower lr
    assert next_exponent({-1: 0.2, 0: 0.2, 1: 0.2}, SearchRule()) is None  # a flat grid stops at the centre
    assert run_search(lambda lr: 1.0, centre=2e-4)["best_lr"] == 2e-4


def test_step_length_scaling_rule():
    from benchmarks.quality.contenders import scale_lengths

    assert scale_lengths({"warmup_steps": 500, "wd_transition_steps": 1000}, 300) == (
        {"warmup_steps": 75, "wd_transition_steps": 150}, 0.15)
    assert scale_lengths({"warmup_steps": 500, "wd_transition_steps": 1000}, 2000) == (
        {"warmup_steps": 500, "wd_transition_steps": 1000}, 1.0)  # steps >= 2 x longest: unchanged
    assert scale_lengths({"warmup_steps": 600, "wd_transition_steps": 300}, 1000) == (
        {"warmup_steps": 500, "wd_transition_steps": 250}, 1000 / 1200)
    assert scale_lengths({"warmup_steps": 1, "wd_transition_steps": 1000}, 10)[0] == {
        "warmup_steps": 1, "wd_transition_steps": 5}  # at least 1
    assert scale_lengths({}, 10) == ({}, 1.0)
    assert scale_lengths({"warmup_steps": 0}, 10) == ({"warmup_steps": 0}, 1.0)


def test_step_length_scaling_uses_the_effective_defaults():
    from benchmarks.quality.contenders import OURS, default_lr, resolve_run, signature_defaults
    from library.optimizers.adaptive_hina import AdaptiveHinaAdamW

    d = signature_defaults(AdaptiveHinaAdamW)
    hina = next(o for o in OURS if o.key == "AdaptiveHinaAdamW").contender()
    assert hina.lr == default_lr("AdaptiveHinaAdamW") == d["lr"]
    steps = max(d["warmup_steps"], d["wd_transition_steps"])  # shorter than twice the longest
    cfg = resolve_run(hina, "lora_teacher", steps, hina.lr, 1)
    kw = dict(cfg.kwargs)
    assert kw["warmup_steps"] == max(1, round(d["warmup_steps"] / 2))
    assert kw["wd_transition_steps"] == max(1, round(d["wd_transition_steps"] / 2))
    cfg = resolve_run(hina, "lora_teacher", 2 * steps, hina.lr, 1)
    assert "warmup_steps" not in dict(cfg.kwargs)  # long enough: the class default, not passed


def _preset_file(tmp_path, name, optimizer_type, lr, args, warmup='"5%"'):
    items = ", ".join(f'"{a}"' for a in args)
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[optimizer]\noptimizer_type = "{optimizer_type}"\nlearning_rate = {lr!r}\n'
                    f'optimizer_args = [{items}]\nlr_scheduler = "cosine"\nlr_warmup_steps = {warmup}\n'
                    f'[training]\nmax_train_steps = 1600\n')
    return path


def test_run_dedupe_key(tmp_path):
    from benchmarks.quality.contenders import OURS, load_preset, preset_contender, resolve_run, signature_defaults
    from benchmarks.quality.protocol import RunStore
    from library.optimizers.hina_adamw import HinaAdamWOptimizer

    hina = next(o for o in OURS if o.key == "HinaAdamWOptimizer").contender()
    d = signature_defaults(HinaAdamWOptimizer)
    same = preset_contender(load_preset(str(_preset_file(
        tmp_path, "same", "HinaAdamW", hina.lr, [f"weight_decay={d['weight_decay']}", f"use_tam={d['use_tam']}"]))))
    other = preset_contender(load_preset(str(_preset_file(
        tmp_path, "other", "HinaAdamW", hina.lr, [f"use_tam={not d['use_tam']}"]))))
    key = lambda c, lr=hina.lr, seed=1: resolve_run(c, "lora_teacher", 300, lr, seed).key()  # noqa: E731
    assert key(same) == key(hina)                     # alias + explicit defaults: the same run
    assert key(other) != key(hina)                    # another argument
    assert key(same, lr=2 * hina.lr) != key(hina)     # another lr
    assert key(same, seed=2) != key(hina)             # another seed
    store = RunStore(log=lambda msg: None)
    a = store.request(resolve_run(hina, "lora_teacher", 300, hina.lr, 1), "HinaAdamWOptimizer (untuned)")
    b = store.request(resolve_run(same, "lora_teacher", 300, hina.lr, 1), "preset same (untuned)")
    c = store.request(resolve_run(other, "lora_teacher", 300, hina.lr, 1), "preset other (untuned)")
    assert a == b != c and len(store.configs) == 2 and store.owner[a] == "HinaAdamWOptimizer (untuned)"


def test_every_preset_is_an_untuned_contender(tmp_path):
    import glob
    import os

    from benchmarks.quality.contenders import CONFIGS, contenders, load_preset, preset_contender, resolve_run

    cs = {c.key: c for c in contenders()}
    stems = [os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONFIGS, "*.toml"))]
    assert stems and all(f"preset {s}" in cs for s in stems)
    for s in stems:
        c = cs[f"preset {s}"]
        assert c.untuned and not c.tune and c.reference_steps
        resolve_run(c, "lora_teacher", 300, c.lr, 1)  # its arguments are accepted
    p = preset_contender(load_preset(str(_preset_file(tmp_path, "w", "AdamW", 1e-3, [], warmup="50"))))
    cfg = resolve_run(p, "lora_teacher", 300, p.lr, 1)
    assert cfg.warmup_steps == round(50 * 300 / 1600) and p.schedule.warmup_steps(1600, 1600) == 50  # steps at 1600
    assert resolve_run(cs["AdamW (fused)"], "lora_teacher", 300, 1e-3, 1).warmup_steps == 15  # 5%


def test_schedule_free_runs_at_a_constant_lr_with_its_own_warmup():
    pytest.importorskip("schedulefree")  # requirements-bench.txt, not needed by make test
    from benchmarks.quality.contenders import contenders, resolve_run

    cs = {c.key: c for c in contenders()}
    sf = resolve_run(cs["AdamWScheduleFree"], "lora_teacher", 300, 1e-3, 1)
    assert sf.scheduler == "constant" and dict(sf.kwargs)["warmup_steps"] == 15  # its own warmup: 5% of the run


def test_no_tune_score():
    from benchmarks.quality.summary import no_tune_score

    assert no_tune_score(1.0, 0.5, 0.5) == 1.0
    assert no_tune_score(1.0, 0.75, 0.5) == 0.5
    assert no_tune_score(1.0, 1.0, 0.5) == 0.0
    assert no_tune_score(1.0, 1.25, 0.5) == -0.5
    assert no_tune_score(1.0, float("inf"), 0.5) == -math.inf
    assert no_tune_score(1.0, 0.5, None) is None and no_tune_score(1.0, 0.5, 1.0) is None


def test_paired_comparison_matches_seeds_and_tests_the_log_ratios():
    from benchmarks.quality.summary import paired, t_critical

    run = lambda seed, final: {"seed": seed, "final": final}  # noqa: E731
    ref = [run(1, 1.0), run(2, 10.0), run(3, 100.0)]  # task instances 100x apart
    # 10 % lower on every instance, a little scatter: the unpaired spread (sd ~ 50) hides it, the pairing does not
    out = paired([run(3, 90.5), run(1, 0.9), run(2, 8.95)], ref)
    logs = [math.log(0.9), math.log(0.895), math.log(0.905)]
    assert out["log_ratios"] == pytest.approx(logs)
    mean, sd = sum(logs) / 3, (sum((x - sum(logs) / 3) ** 2 for x in logs) / 2) ** 0.5
    assert out["delta_pct"] == pytest.approx(100 * (math.exp(mean) - 1))
    assert out["t"] == pytest.approx(mean / (sd / 3 ** 0.5)) and out["clear"]
    noisy = paired([run(1, 0.5), run(2, 12.0), run(3, 95.0)], ref)  # signs disagree: not resolved
    assert not noisy["clear"] and abs(noisy["t"]) < t_critical(2) == pytest.approx(4.303)
    rounding = paired([run(1, 1.00001), run(2, 10.0001), run(3, 100.001)], ref)  # consistent but negligible
    assert abs(rounding["t"]) > t_critical(2) and not rounding["clear"]
    assert paired([run(1, 0.9), run(4, 1.0)], ref)["t"] is None  # one common seed: no test
    assert paired([run(1, math.inf), run(2, 9.0)], ref) == {"delta_pct": None, "log_ratios": [], "t": None,
                                                             "clear": False}


def test_targets_compare_ours_with_their_bar_seed_by_seed():
    from benchmarks.quality.summary import CAME, targets

    runs = {f"{who}{seed}": {"seed": seed, "final": final} for who, finals in
            {"a": (1.0, 2.0, 4.0), "c": (1.05, 2.1, 4.2), "e": (1.2, 2.3, 4.9)}.items()
            for seed, final in zip((1, 2, 3), finals)}
    ids = lambda who: [f"{who}{s}" for s in (1, 2, 3)]  # noqa: E731
    task = lambda mine: {"runs": runs, "contenders": {  # noqa: E731
        "Automagic_CameAMP": {"untuned_runs": ids(mine)}, CAME: {"tuned_runs": ids("a")},
        "Automagic_CameAMP8bit": {"untuned_runs": ids("e")}}}
    rows = targets({"tasks": {"near": task("c"), "far": task("e")}})
    by = {(r["target"].contender, r["target"].reference): r["cells"] for r in rows}
    near, far = by[("Automagic_CameAMP", CAME)]["near"], by[("Automagic_CameAMP", CAME)]["far"]
    assert near["delta_pct"] == pytest.approx(5.0) and near["met"]  # +5 % against a 10 % bar
    assert far["delta_pct"] > 10.0 and not far["met"]
    assert by[("Automagic_CameAMP8bit", "Automagic_CameAMP")]["near"]["delta_pct"] > 5.0  # 8-bit against its twin
    assert not by[("Automagic_CameAMP8bit", "Automagic_CameAMP")]["near"]["met"]
    same = by[("Automagic_CameAMP8bit", "Automagic_CameAMP")]["far"]  # the very same runs on both sides
    assert same["delta_pct"] == 0.0 and same["t"] == 0.0 and same["met"] and not same["clear"]
    assert ("Automagic_CameAMP_COptim", CAME) not in by  # no runs on either task: no row


def test_probe_refuses_bad_arguments_in_one_line_before_any_task(capsys):
    from benchmarks import probe_quality

    assert probe_quality.main(["HinaAdamWOptimizer", "--set", "allora_eta=0", "--tasks", "lora_teacher"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allora_eta" in err[0]
    assert probe_quality.configuration_error("HinaAdamWOptimizer", 1e-3, {"allora_eta": 0.5}) is None


def test_class_cost_prices_every_measured_class():
    from benchmarks.quality.class_cost import class_contenders
    from benchmarks.quality.protocol import CLASS_COST

    measured = class_contenders()
    assert set(measured) <= set(CLASS_COST)  # a new class gets a measured cost, not the 1.5 fallback
    assert {"AdamW", "AdaptiveHinaAdamW", "HinaAdamWOptimizer", "Automagic_CameAMP"} <= set(measured)
    assert not any(k.startswith("preset ") for k in (c.key for c in measured.values()))


def test_lr_sensitivity_span_is_the_run_of_good_points_around_the_best():
    import math

    from benchmarks.bench_lr_sensitivity import render, span

    scores = {1e-4: 0.3, 3e-4: 0.92, 1e-3: 0.95, 3e-3: 0.97, 1e-2: 0.5, 3e-2: 0.93}
    assert span(scores) == pytest.approx(10.0)  # 3e-4 .. 3e-3; 3e-2 is not contiguous with the best
    assert span({1e-3: 0.5, 1e-2: -math.inf}) is None
    results = {"wall_seconds": 60.0, "machine": {"torch": "x", "cpu_count": 2}, "seeds": [1],
               "table": {"digits": {"A": {"scores": sorted(scores.items()), "span": span(scores)}}}}
    text = render(results)
    assert "| A | 0.30 | **0.92** |" in text and "| 10× |" in text


def test_ablation_tables_match_the_optimizers():
    from benchmarks.quality.ablation import (ADD_ONE_IN, LEAVE_ONE_OUT, TECHNIQUES, ablation_configs,
                                             on_by_default, plain_overrides)
    from benchmarks.quality.contenders import OURS, effective_kwargs

    for key, techniques in TECHNIQUES.items():
        c = next(o for o in OURS if o.key == key).contender()
        defaults = effective_kwargs(c.optimizer_class(), dict(c.kwargs))
        for t in techniques:  # every argument exists, and off != on
            assert set(t.off) | set(t.on) <= set(defaults), (key, t.name)
            assert plain_overrides([t], defaults) != {**plain_overrides([t], defaults), **t.on}, (key, t.name)
        confs = ablation_configs(techniques, defaults)
        loo = [x.technique for x in confs if x.mode == LEAVE_ONE_OUT]
        assert loo == [t.name for t in techniques if on_by_default(t, defaults)]
        assert [x.technique for x in confs if x.mode == ADD_ONE_IN] == [t.name for t in techniques]
    hina = TECHNIQUES["AdaptiveHinaAdamW"]
    d = effective_kwargs(next(o for o in OURS if o.key == "AdaptiveHinaAdamW").contender().optimizer_class(), {})
    plain = plain_overrides(hina, d)
    assert plain["use_lr_mask"] is False and plain["lora_plus_ratio"] == 1.0 and plain["allora_eta"] is None
    am = TECHNIQUES["Automagic_CameAMP"]
    d = effective_kwargs(next(o for o in OURS if o.key == "Automagic_CameAMP").contender().optimizer_class(), {})
    assert plain_overrides(am, d)["beta1_min"] == d["betas"][0]  # momentum decay off: beta1 never decays


def _check_quality_results(res, names, seeds):
    task = res["tasks"]["lora_teacher"]
    assert task["steps"] == 12 and set(task["contenders"]) == set(names)
    for name in names:
        e, s = task["contenders"][name], task["summary"]["contenders"][name]
        points = e["search"]["points"]
        assert 3 <= len(points) <= 5 and e["search"]["best_lr"] in [p["lr"] for p in points]
        assert [task["runs"][r]["seed"] for r in e["tuned_runs"]] == list(seeds)
        for rid in e["tuned_runs"]:
            r = task["runs"][rid]
            assert len(r["curve"]) == 4 and math.isfinite(r["final"]) and r["final"] == r["curve"][-1]
            assert r["state_bytes"] > 0 and r["n_params"] > 0 and r["step_ms_median"] > 0 and r["error"] is None
        for key in ("final_mean", "final_std", "step_ms", "x_adamw_fused", "state_bytes_per_param", "mean_curve"):
            assert key in s["tuned"], key
    hina = task["summary"]["contenders"]["AdaptiveHinaAdamW"]
    assert hina["untuned"]["n"] == len(seeds) and hina["no_tune_score"] is not None
    assert task["summary"]["contenders"]["AdamW (fused)"]["tuned"]["x_adamw_fused"] == 1.0
    assert task["summary"]["start_loss"] > task["summary"]["reference_final"]
    assert task["contenders"]["AdaptiveHinaAdamW"]["lengths"]["factor"] < 1  # 12 steps: scaled
    rows = task["summary"]["ablations"]["AdaptiveHinaAdamW"]["rows"]
    assert rows and {r["mode"] for r in rows} == {"leave_one_out"}
    assert all(len(task["ablations"]["AdaptiveHinaAdamW"]["rows"][i]["runs"]) == len(seeds) for i in range(len(rows)))


def test_quality_pipeline_smallest_task(tmp_path):
    from benchmarks.bench_quality import rerender, run
    from benchmarks.quality.report import plot_all, render_markdown

    names = ["AdamW (fused)", "AdaptiveHinaAdamW"]
    res = run(quick=True, tasks=["lora_teacher"], contenders=names, seeds=[1, 2], jobs=1,
              overrides={"lora_teacher": {"steps": 12, "evals": 3}}, log=lambda msg: None)
    assert res["mode"] == "quick" and set(res["tasks"]) == {"lora_teacher"}
    _check_quality_results(res, names, (1, 2))
    plots = plot_all(res, img_dir=str(tmp_path))
    assert (tmp_path / "quality_lora_teacher_quick.png").is_file() and "lora_teacher" in plots
    md = render_markdown(res)
    for text in ("## Training quality", "| **AdaptiveHinaAdamW** |", "| AdamW (fused) |", "no-tune score",
                 "leave-one-out", "without ADOPT", "lengths scaled to the 12-step run", "<details>"):
        assert text in md, text
    path = tmp_path / "q.json"
    path.write_text(json.dumps(res))  # plain JSON (inf allowed)
    again = rerender(path=str(path), plots=False)
    assert render_markdown(again) == md


def test_quality_pipeline_shares_runs_across_processes(tmp_path):
    """jobs=2: the process pool runs the queue; a preset equal to a contender's defaults shares
    its untuned runs, and the report says so."""
    from benchmarks.bench_quality import run
    from benchmarks.quality.contenders import OURS, PEERS, load_preset, preset_contender
    from benchmarks.quality.report import render_markdown

    hina = next(o for o in OURS if o.key == "AdaptiveHinaAdamW").contender()
    same = preset_contender(load_preset(str(_preset_file(tmp_path, "same", "AdaptiveHinaAdamW", hina.lr, []))))
    adamw = next(c for c in PEERS if c.key == "AdamW (fused)")
    res = run(quick=True, tasks=["lora_teacher"], contenders=[adamw, hina, same], seeds=[1], jobs=2, max_points=3,
              ablations=(), overrides={"lora_teacher": {"steps": 10, "evals": 2}}, log=lambda msg: None)
    task = res["tasks"]["lora_teacher"]
    e, p = task["contenders"]["AdaptiveHinaAdamW"], task["contenders"]["preset same"]
    assert p["untuned_runs"] == e["untuned_runs"] and "search" not in p
    assert task["summary"]["contenders"]["preset same"]["untuned_shared_with"] == "AdaptiveHinaAdamW (untuned)"
    shared_tuned = e["search"]["best_lr"] == e["untuned_lr"]
    assert len(task["runs"]) == (3 + 1) + (3 + 1 + (not shared_tuned))  # AdamW; AdaptiveHinaAdamW (+ the preset: 0)
    assert all(r["error"] is None and math.isfinite(r["final"]) for r in task["runs"].values())
    assert "preset same (untuned): same runs as AdaptiveHinaAdamW (untuned)" in render_markdown(res)


def test_quant8_ema_tracking_smoke():
    """The EMA-tracking measurement of bench_quant8 runs for both maps and both roundings and
    reports relative errors that are finite and small for stochastic rounding."""
    from benchmarks.bench_quant8 import ema_tracking

    res = ema_tracking(steps=40, n=4096)
    assert set(res) == {"float8 stochastic", "float8 nearest", "dynamic stochastic", "dynamic nearest"}
    for name, r in res.items():
        assert set(r) == {"m", "v", "update"} and all(0.0 <= x < float("inf") for x in r.values()), name
    assert res["float8 stochastic"]["update"] < 0.5


def test_quant8_adamw_tracking_runs_with_both_maps():
    """bench_quant8's AdamW-tracking measurement swaps the dynamic map into the 8-bit store: it
    must keep running as the store's encoder call changes (it broke once on a new keyword)."""
    from benchmarks.bench_quant8 import adamw_tracking

    res = adamw_tracking(steps=3, seeds=(1,))
    assert set(res) == {"float8", "dynamic"}
    for r in res.values():
        assert 0.0 < r["max"] < 0.5


def test_estimate_counts_hinted_searches_at_their_first_points_and_shared_runs_once():
    from benchmarks.quality import search
    from benchmarks.quality.contenders import contenders, resolve_run
    from benchmarks.quality.protocol import ESTIMATE_SEARCH_POINTS, ProtocolConfig, estimate, run_seconds

    cs = {c.key: c for c in contenders()}
    adamw, hina = cs["AdamW (fused)"], cs["AdaptiveHinaAdamW"]
    config = ProtocolConfig(tasks=("lora_teacher",), report_seeds=(1, 2, 3))
    one = run_seconds(resolve_run(adamw, "lora_teacher", 300, adamw.lr, 0))
    # AdamW: no hint, ESTIMATE_SEARCH_POINTS points + 3 report runs
    assert estimate(config, [adamw])["total_cpu_seconds"] == pytest.approx(one * (ESTIMATE_SEARCH_POINTS + 3))
    cost = lambda c, lr, seed: run_seconds(resolve_run(c, "lora_teacher", 300, lr, seed))  # noqa: E731
    untuned = sum(cost(hina, hina.lr, s) for s in (1, 2, 3))
    search.GRID_CENTRE["lora_teacher"] = {hina.key: hina.lr}  # a hint at the untuned lr
    try:
        est = estimate(config, [hina])["total_cpu_seconds"]
    finally:
        del search.GRID_CENTRE["lora_teacher"]
    # three search points, report runs shared with the untuned ones
    first = sum(cost(hina, config.rule.lr(hina.lr, k), 0) for k in config.rule.first)
    assert est == pytest.approx(untuned + first)


def test_bench_step_times_twins_in_turns_and_costs_per_tensor():
    """bench_step's paired 8-bit / 32-bit ratio and its per-tensor cost table, on a few small tensors."""
    from benchmarks import bench_step
    from benchmarks.common import make_params
    from benchmarks.shapes import lora_shapes

    table = bench_step.builders()
    twins = bench_step.twin_ratios(table, make_params(lora_shapes(4)[:6]), rounds=1, steps=1)
    assert set(twins) == {name8 for _, name8 in bench_step.TWINS}
    for name8, row in twins.items():
        assert (name8, row["twin"]) in [(b, a) for a, b in bench_step.TWINS]
        assert row["ms_8"] > 0 and row["ms_32"] > 0 and row["ratio"] == pytest.approx(row["ms_8"] / row["ms_32"])
    cost = bench_step.per_tensor_cost(table["AdamW(foreach)"], [2, 4], torch.device("cpu"), rounds=1, steps=1)
    assert list(cost) == [2, 4] and all(v > 0 for v in cost.values())
