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

    res = profile("AdaptiveHinaAdamW", shapes="tiny", warmup=1, repeats=2, rounds=1)
    for key in ("optimizer", "class", "optimizer_args", "lr", "shapes", "tensors", "params", "step_ms", "features",
                "inactive_features", "errors", "state_bytes_by_key", "bytes_per_param_by_key", "state_bytes_total",
                "bytes_per_param"):
        assert key in res, key
    assert res["tensors"] == 8 and res["params"] > 0 and res["step_ms"] > 0
    # every use_* flag that is on by default is toggled; use_orthogonal_grad is off by default
    assert {"use_spd", "use_cautious", "use_adopt_stability", "use_grams", "use_agr", "use_tam",
            "use_dynamic_adaptation", "use_lr_mask"} <= set(res["features"])
    assert "use_orthogonal_grad" in res["inactive_features"]
    for d in res["features"].values():
        assert set(d) == {"ms_without", "attributable_ms", "attributable_pct"}
        assert math.isclose(d["attributable_ms"], res["step_ms"] - d["ms_without"])
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
    assert "| state key |" in capsys.readouterr().out


def test_quality_smallest_task_runs(tmp_path):
    from benchmarks.bench_quality import run
    from benchmarks.quality.report import plot_all, render_markdown

    names = ["AdamW (fused)", "AdaptiveHinaAdamW"]
    res = run(quick=True, tasks=["lora_teacher"], contenders=names, seeds=[1, 2],
              overrides={"lora_teacher": {"steps": 12, "evals": 3}})
    assert res["mode"] == "quick" and set(res["tasks"]) == {"lora_teacher"}
    task = res["tasks"]["lora_teacher"]
    assert task["eval_steps"] == [0, 4, 8, 12]
    assert list(task["contenders"]) == names
    for name in names:
        e = task["contenders"][name]
        assert len(e["grid"]) == 2 and e["best_lr"] in [g["lr"] for g in e["grid"].values()]
        assert [r["seed"] for r in e["runs"]] == [1, 2]
        for r in e["runs"]:
            assert len(r["curve"]) == 4 and math.isfinite(r["final"]) and r["final"] == r["curve"][-1]
            assert r["state_bytes"] > 0 and r["n_params"] > 0 and r["step_ms_median"] > 0
        s = e["summary"]
        for key in ("final_mean", "final_std", "steps_to_adamw_final", "stability", "step_ms", "x_adamw_fused",
                    "state_bytes_per_param", "peak_rss_mb", "mean_curve"):
            assert key in s, key
    assert task["contenders"]["AdamW (fused)"]["summary"]["x_adamw_fused"] == 1.0
    assert task["winner"] in names
    plots = plot_all(res, img_dir=str(tmp_path))
    assert (tmp_path / "quality_lora_teacher_quick.png").is_file() and "lora_teacher" in plots
    md = render_markdown(res)
    assert "## Training quality" in md and "| **AdaptiveHinaAdamW** |" in md and "AdamW (fused)" in md
    json.dumps(res)  # the results file is plain JSON (inf allowed)


def test_quant8_ema_tracking_smoke():
    """The EMA-tracking measurement of bench_quant8 runs for both maps and both roundings and
    reports relative errors that are finite and small for stochastic rounding."""
    from benchmarks.bench_quant8 import ema_tracking

    res = ema_tracking(steps=40, n=4096)
    assert set(res) == {"float8 stochastic", "float8 nearest", "dynamic stochastic", "dynamic nearest"}
    for name, r in res.items():
        assert set(r) == {"m", "v", "update"} and all(0.0 <= x < float("inf") for x in r.values()), name
    assert res["float8 stochastic"]["update"] < 0.5
