"""Where an optimizer's step time and state memory go, feature by feature.

    python -m benchmarks.profiler --optimizer NAME [--optimizer_args k=v ...]
                                  [--shapes lora_r16|lora_r4|lokr|tiny] [--json [PATH]]

NAME is anything ``--optimizer_type`` accepts (``library.train_util.resolve_optimizer``: our
registry, kohya's built-in names, a dotted ``module.Class``); ``--optimizer_args`` are parsed as
the trainer parses them. On the chosen shape set (``benchmarks/shapes.py``: SD1.5 LoRA rank 16 /
rank 4, small LoKr; ``tiny`` is 8 small LoRA tensors for tests) it reports:

- the step time with every feature as configured (fastest ``step()`` over round-robin rounds,
  ``benchmarks.common.time_steps``);
- for each boolean ``use_*`` argument that is on: the step time with only that one switched off,
  and the difference (the time attributable to the feature; it can be slightly negative when
  the feature costs less than the timing noise). Features that are off are listed, not timed;
  ``--flags`` times other boolean arguments too (e.g. ``dynamic_weight_decay``);
- with ``--together FLAG ...``: the step time with those flags all switched off at once (what
  a lighter composition saves: the single-flag differences do not add up exactly);
- optimizer-state bytes per state key (``exp_avg``, ``exp_avg_sq``, ``lr_mask``, ...) summed
  over all parameters, plus tensors kept in the param groups (``group:<key>``).

The timed steps are the first few of each optimizer (``--warmup`` + rounds x repeats), so
phase-dependent features (e.g. Automagic's early OrthoGrad/TAM while 2t <= warmup_steps) are
measured in their early phase; pass e.g. ``--optimizer_args warmup_steps=2`` for the later one.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

import torch

from benchmarks.common import RESULTS_DIR, machine, make_params, state_bytes, tensor_bytes, time_steps
from benchmarks.shapes import lokr_shapes, lora_shapes


def tiny_shapes():
    """8 small LoRA tensors (4 modules): for tests and smoke runs."""
    out = []
    for i, (fin, fout) in enumerate(((32, 32), (32, 64), (64, 32), (48, 48))):
        out.append((f"lora_unet_block{i}_attn1_to_q.lora_down.weight", (4, fin)))
        out.append((f"lora_unet_block{i}_attn1_to_q.lora_up.weight", (fout, 4)))
    return out


SHAPE_SETS = {
    "lora_r16": lambda: lora_shapes(16),
    "lora_r4": lambda: lora_shapes(4),
    "lokr": lambda: lokr_shapes(16),
    "tiny": tiny_shapes,
}


_TOGETHER = "<together>"  # a variant name no flag can have


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return repr(v)


def state_bytes_by_key(opt) -> dict:
    """{state key: bytes summed over parameters}, plus ``group:<key>`` for tensors in param groups."""
    out: dict = {}
    for st in opt.state.values():
        for k, v in st.items():
            b = tensor_bytes(v)
            if b:
                out[str(k)] = out.get(str(k), 0) + b
    for g in opt.param_groups:
        for k, v in g.items():
            if k == "params":
                continue
            b = tensor_bytes(v) if isinstance(v, (torch.Tensor, dict, list, tuple)) else 0
            if b:
                out[f"group:{k}"] = out.get(f"group:{k}", 0) + b
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def feature_flags(cls, kwargs: dict, extra=()) -> tuple[list[str], list[str]]:
    """(flags that are on, flags that are off) among the boolean ``use_*`` arguments (+ `extra`)."""
    on, off = [], []
    for name, prm in inspect.signature(cls).parameters.items():
        if not isinstance(prm.default, bool) or not (name.startswith("use_") or name in extra):
            continue
        (on if bool(kwargs.get(name, prm.default)) else off).append(name)
    for name in extra:  # flags given explicitly that the signature does not show (**kwargs classes)
        if name not in on and name not in off and isinstance(kwargs.get(name), bool):
            (on if kwargs[name] else off).append(name)
    return on, off


def _default_lr(cls, kwargs):
    if "lr" in kwargs:
        return float(kwargs.pop("lr"))
    prm = inspect.signature(cls).parameters.get("lr")
    if prm is not None and isinstance(prm.default, (int, float)) and not isinstance(prm.default, bool):
        return float(prm.default)
    return 1e-3


def profile(optimizer: str, optimizer_args=None, shapes: str = "lora_r16", lr: float | None = None, warmup: int = 3,
            repeats: int = 5, rounds: int = 3, flags=(), together=(), log=None) -> dict:
    """Profile one optimizer; returns the result dict (see the module docstring)."""
    from library.train_util import resolve_optimizer

    cls, kwargs, _info = resolve_optimizer(optimizer, optimizer_args or [])
    kwargs = dict(kwargs)
    if lr is None:
        lr = _default_lr(cls, kwargs)
    else:
        kwargs.pop("lr", None)
        lr = float(lr)
    shape_list = SHAPE_SETS[shapes]()
    named = make_params(shape_list)
    n_params = sum(p.numel() for _, p in named)
    groups = [{"params": [p for _, p in named], "named": [n for n, _ in named], "lr": lr}]
    on, off = feature_flags(cls, kwargs, tuple(flags))

    def build(kw):
        opt = cls([{**groups[0], "params": list(groups[0]["params"])}], lr=lr, **kw)
        if hasattr(opt, "set_param_names"):
            opt.set_param_names(named)
        if callable(getattr(opt, "train", None)):
            opt.train()
        return opt

    variants = {"all": dict(kwargs)}
    variants.update({f: {**kwargs, f: False} for f in on})
    together = [f for f in together if f in on]
    if together:
        variants[_TOGETHER] = {**kwargs, **{f: False for f in together}}
    opts, errors = {}, {}
    for name, kw in variants.items():
        try:
            opts[name] = build(kw)
            for _ in range(warmup):
                opts[name].step()
        except Exception as e:  # a combination the optimizer refuses: report it, keep going
            if name == "all":
                raise
            errors[name] = f"{type(e).__name__}: {e}"
            opts.pop(name, None)
    best = {k: float("inf") for k in opts}
    for r in range(rounds):
        for name, opt in opts.items():
            best[name] = min(best[name], time_steps(opt, warmup=0, repeats=repeats))
        if log:
            log(f"  round {r + 1}/{rounds}: all features {best['all']:.3f} ms")
    full = best["all"]
    by_key = state_bytes_by_key(opts["all"])
    features = {f: _without(full, best[f]) for f in on if f in best}
    off_together = None
    if _TOGETHER in best:
        off_together = {"flags": together, **_without(full, best[_TOGETHER])}
    return {
        "optimizer": optimizer, "class": f"{cls.__module__}.{cls.__qualname__}",
        "optimizer_args": {k: _jsonable(v) for k, v in kwargs.items()}, "lr": lr,
        "shapes": shapes, "tensors": len(shape_list), "params": n_params,
        "timing": {"warmup": warmup, "rounds": rounds, "repeats": repeats, "stat": "min",
                   "steps_per_optimizer": warmup + rounds * repeats},
        "step_ms": full, "features": features, "together": off_together, "inactive_features": off, "errors": errors,
        "state_bytes_by_key": by_key, "bytes_per_param_by_key": {k: v / n_params for k, v in by_key.items()},
        "state_bytes_total": state_bytes(opts["all"]), "bytes_per_param": state_bytes(opts["all"]) / n_params,
    }


def _without(full: float, ms: float) -> dict:
    return {"ms_without": ms, "attributable_ms": full - ms, "attributable_pct": 100.0 * (full - ms) / full if full else None}


def format_report(res: dict) -> str:
    lines = [f"{res['optimizer']} ({res['class']}) on {res['shapes']}: {res['tensors']} tensors, "
             f"{res['params'] / 1e6:.3f}M params, lr {res['lr']:g}",
             f"args: {res['optimizer_args'] or '(defaults)'}",
             f"step with every feature as configured: {res['step_ms']:.3f} ms "
             f"(fastest of {res['timing']['rounds']} rounds x {res['timing']['repeats']} steps)", "",
             "| feature (switched off alone) | ms without | attributable ms | % of step |", "|---|---|---|---|"]
    for f, d in sorted(res["features"].items(), key=lambda kv: -kv[1]["attributable_ms"]):
        lines.append(f"| {f} | {d['ms_without']:.3f} | {d['attributable_ms']:+.3f} | {d['attributable_pct']:+.1f} |")
    for f, err in res["errors"].items():
        lines.append(f"| {f} | refused: {err} | | |")
    t = res.get("together")
    if t:
        lines.append(f"| {' + '.join(t['flags'])}, off together | {t['ms_without']:.3f} | "
                     f"{t['attributable_ms']:+.3f} | {t['attributable_pct']:+.1f} |")
    if res["inactive_features"]:
        lines.append(f"\nfeatures already off: {', '.join(res['inactive_features'])}")
    lines += ["", "| state key | bytes | bytes/param |", "|---|---|---|"]
    for k, b in res["state_bytes_by_key"].items():
        lines.append(f"| {k} | {b:,} | {res['bytes_per_param_by_key'][k]:.4f} |")
    lines.append(f"| total (optimizer.state) | {res['state_bytes_total']:,} | {res['bytes_per_param']:.4f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", required=True)
    ap.add_argument("--optimizer_args", nargs="*", default=[])
    ap.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="lora_r16")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flags", nargs="*", default=[], help="other boolean arguments to toggle, e.g. dynamic_weight_decay")
    ap.add_argument("--together", nargs="*", default=[], metavar="FLAG",
                    help="also time the step with these flags all off at once")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", nargs="?", const="", help="save JSON (default path benchmarks/results/profile_<name>_<shapes>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = profile(args.optimizer, args.optimizer_args, args.shapes, args.lr, args.warmup, args.repeats, args.rounds,
                  args.flags, args.together, log=lambda m: print(m, file=sys.stderr, flush=True))
    res["machine"] = machine()
    print(format_report(res))
    if args.json is not None:
        path = args.json or os.path.join(RESULTS_DIR, f"profile_{args.optimizer}_{args.shapes}.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=2)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
