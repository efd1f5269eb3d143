"""GPU readiness: the optimizer guarantees that matter, checked with CUDA tensors, then bench_step.

    python -m benchmarks.gpu_check [--device cuda|cpu] [--skip-bench] [--full-bench] [--only CHECK ...]

Checks (one function each, every one returns a list of ``Result`` records):
  parity    AdaptiveHinaAdamW with every technique off vs torch.optim.AdamW, 20 steps on identical
            params and gradients: allclose(rtol=1e-6, atol=1e-7); the max abs difference is reported
  resume    every registered optimizer: N steps, state_dict (torch.save/load), fresh optimizer,
            load, N more steps == 2N straight (torch.equal on params and state)
  8bit      8-bit AdaptiveHinaAdamW (defaults) tracks its 32-bit self on a noisy quadratic:
            |p8 - p32| / |p32 - p0| < 5 % per tensor after 100 steps (CPU, 5 seeds: 1.5-2.3 %)
  nonfinite every registered optimizer: a NaN, then an Inf, in one element of one tensor's gradient
            leaves that tensor and its state bit-identical (the other tensor steps)
  bf16      bf16 parameters: every registered optimizer is deterministic (two runs, one resumed
            halfway, are equal); with stochastic rounding AdaptiveHinaAdamW and HinaAdamWOptimizer
            track their fp32 run (mean within 2e-3 after 20 sub-ulp steps) where round-to-nearest stalls
  sync      no host sync inside step() once every phase has begun (warmup_steps=3; steps 1-5,
            which make the state and each phase's layout constants, run unchecked, steps 6-10 are
            checked): CUDA: torch.cuda.set_sync_debug_mode("error"), which also catches a blocking
            host-to-device copy; CPU (a proxy): Tensor.item/bool/float/int/tolist and
            torch.tensor/as_tensor raise. Whether the first step syncs is measured on a throwaway
            copy and shown
  bench     benchmarks.bench_step --quick --device DEV (fused AdamW and bnb AdamW8bit included):
            results/step_cuda_quick.json on CUDA, results/step_quick.json with --device cpu

Without a CUDA GPU (and without ``--device cpu``) it says so and exits 0. Exit code 1 if any
check fails. ``--device cpu`` runs the same checks on CPU (how tests/test_gpu_check.py tests it).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time
import traceback
from dataclasses import dataclass

import torch

NO_GPU = "no CUDA GPU here (torch.cuda.is_available() is False): nothing checked"
HINA = ["AdaptiveHinaAdamW", "HinaAdamWOptimizer"]
ALL_OFF = dict(use_spd=False, use_cautious=False, use_orthogonal_grad=False, use_adopt_stability=False,
               use_grams=False, use_agr=False, use_tam=False, use_dynamic_adaptation=False, use_lr_mask=False, use_hypergrad=False,
               dynamic_weight_decay=False)
# small LoRA-like tensors: linear and conv pairs, a bias; several 8-bit blocks each
SHAPES = [("lora_unet_a.lora_down.weight", (16, 320)), ("lora_unet_a.lora_up.weight", (320, 16)),
          ("lora_unet_b.lora_down.weight", (8, 64, 3, 3)), ("lora_unet_b.lora_up.weight", (64, 8, 1, 1)),
          ("lora_te_c.bias", (96,))]


@dataclass
class Result:
    check: str
    ok: bool
    detail: str = ""
    subject: str = ""

    def line(self) -> str:
        who = f" [{self.subject}]" if self.subject else ""
        return f"{'PASS' if self.ok else 'FAIL'}  {self.check}{who}: {self.detail}"


# ----------------------------------------------------------------------------- plumbing
def names():
    from library.optimizers.registry import list_optimizers

    return [info.name for info in list_optimizers()]


def build(name, params, **extra):
    """A registered optimizer with its registry defaults; ``extra`` keys it does not take are dropped."""
    from library.optimizers.registry import accepted_kwargs
    from library.train_util import resolve_optimizer

    cls, kwargs, _ = resolve_optimizer(name, {})
    accepted, var_kw = accepted_kwargs(cls)
    extra = {k: v for k, v in extra.items() if var_kw or k in accepted}
    lr = 1e-4 if name.startswith(("Automagic", "Refactored")) else 1e-3
    return cls(params, **{"lr": lr, **kwargs, **extra})


def make(device, dtype=torch.float32, seed=0, shapes=None):
    """[(name, Parameter)] of ``SHAPES`` (read at call time: the CPU test shrinks it)."""
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(device=device, dtype=dtype)))
            for n, s in shapes or SHAPES]


def set_grads(named, step, seed=1):
    """The same gradients on every device and for every run: drawn on the CPU from (seed, step)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)


def run(opt, named, steps, start=0):
    for k in range(start, start + steps):
        set_grads(named, k)
        opt.step()
        if hasattr(opt, "report_loss"):  # the COptim context lr reads the loss
            opt.report_loss(sum(p.detach().float().square().mean() for _, p in named))


def save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def snapshot(opt, p):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}


def crash(e: Exception) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1]
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    return f"crashed: {type(e).__name__}: {msg} ({where.filename.rsplit('/', 1)[-1]}:{where.lineno})"


def each_optimizer(check, device, one):
    """``one(device, name) -> (ok, detail)`` for every registered optimizer; a crash fails only that one."""
    out = []
    for name in names():
        try:
            ok, detail = one(device, name)
        except Exception as e:
            ok, detail = False, crash(e)
        out.append(Result(check, ok, detail, name))
    return out


def diff_keys(a: dict, b: dict, skip=("step",)):
    """State keys whose values differ (tensors: dtype and torch.equal)."""
    bad = []
    for k in sorted(set(a) | set(b), key=str):
        if k in skip:
            continue
        x, y = a.get(k), b.get(k)
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        else:
            same = type(x) is type(y) and not isinstance(x, torch.Tensor) and x == y
        if not same:
            bad.append(str(k))
    return bad


# ----------------------------------------------------------------------------- checks
def check_parity(device, steps=20):
    from library.optimizers.adaptive_hina import AdaptiveHinaAdamW

    a, b = make(device), make(device)
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    ours = AdaptiveHinaAdamW(a, **hp, **ALL_OFF)
    ref = torch.optim.AdamW([p for _, p in b], **hp, foreach=True)
    run(ours, a, steps)
    run(ref, b, steps)
    diff = max(float((x - y).detach().abs().max()) for (_, x), (_, y) in zip(a, b))
    ok = all(torch.allclose(x, y, rtol=1e-6, atol=1e-7) for (_, x), (_, y) in zip(a, b))
    exact = all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))
    return [Result("parity", ok, f"{steps} steps vs torch AdamW(foreach): max |diff| {diff:.3g}"
                   f" ({'bit-exact' if exact else 'not bit-exact'}; tolerance rtol 1e-6, atol 1e-7)",
                   "AdaptiveHinaAdamW all off")]


def resume_one(device, name, n=5):
    extra = dict(warmup_steps=4, relationship_discovery_interval=3, rank_interval=4)  # cross the phase changes
    a = make(device)
    oa = build(name, a, **extra)
    run(oa, a, 2 * n)
    b = make(device)
    ob = build(name, b, **extra)
    run(ob, b, n)
    c = [(k, torch.nn.Parameter(p.detach().clone())) for k, p in b]
    oc = build(name, c, **extra)
    oc.load_state_dict(save_load(ob.state_dict()))
    run(oc, c, n, start=n)
    bad = [k for (k, x), (_, y) in zip(a, c) if not torch.equal(x, y)]
    bad += [f"{k} state {key}" for (k, x), (_, y) in zip(a, c)
            for key in diff_keys(snapshot(oa, x), snapshot(oc, y), skip=())]
    return not bad, (f"differ after resume: {', '.join(bad[:6])}" if bad
                     else f"{n}+{n} steps == {2 * n} straight (params and state)")


def check_8bit(device, steps=100, tol=0.05):
    from library.optimizers.adaptive_hina import AdaptiveHinaAdamW

    def quadratic(bits):
        named = make(device, seed=3)
        p0 = [p.detach().clone() for _, p in named]
        gen = torch.Generator().manual_seed(4)
        targets = [torch.randn(p.shape, generator=gen).to(device) for _, p in named]
        opt = AdaptiveHinaAdamW(named, lr=1e-2, max_lr=1e-2, optim_bits=bits)
        for _ in range(steps):
            for (_, p), t in zip(named, targets):
                p.grad = 2 * (p.detach() - t) + 0.1 * torch.randn(p.shape, generator=gen).to(device)
            opt.step()
        return [p.detach() for _, p in named], p0

    p8, p0 = quadratic(8)
    p32, _ = quadratic(32)
    rel = max(float((x - y).norm() / (y - z).norm()) for x, y, z in zip(p8, p32, p0))
    return [Result("8bit", rel < tol, f"{steps} steps on a quadratic: max |p8 - p32| / |p32 - p0| = {rel:.2%}"
                   f" (tolerance {tol:.0%})", "AdaptiveHinaAdamW optim_bits=8 vs 32")]


def nonfinite_one(device, name, warm=5):
    named = make(device)
    opt = build(name, named)
    run(opt, named, warm)  # past ADOPT's first step, TAM and the lr mask active
    (_, a), (_, b) = named[0], named[1]
    problems = []
    for i, bad in enumerate([float("nan"), float("inf")]):
        before_a, state_a, before_b = a.detach().clone(), snapshot(opt, a), b.detach().clone()
        set_grads(named, warm + i)
        a.grad[3, 5] = bad
        opt.step()
        if not torch.equal(a, before_a):
            problems.append(f"{bad}: the tensor moved" + ("" if torch.isfinite(a).all() else " to non-finite"))
        changed = diff_keys(state_a, snapshot(opt, a))
        if changed:
            problems.append(f"{bad}: state changed ({', '.join(changed)})")
        if torch.equal(b, before_b) or not torch.isfinite(b).all():
            problems.append(f"{bad}: the finite tensor did not step cleanly")
    return not problems, "; ".join(problems) or "NaN, then Inf: tensor and its state bit-identical, the other tensor stepped"


def bf16_deterministic_one(device, name):
    """Defaults (stochastic rounding where offered): 6 steps == 3 steps, save, load, 3 steps."""
    p1 = make(device, torch.bfloat16)
    run(build(name, p1), p1, 6)
    p2 = make(device, torch.bfloat16)
    o2 = build(name, p2)
    run(o2, p2, 3)
    p3 = [(k, torch.nn.Parameter(p.detach().clone())) for k, p in p2]
    o3 = build(name, p3)
    o3.load_state_dict(save_load(o2.state_dict()))
    run(o3, p3, 3, start=3)
    ok = all(torch.equal(x, y) for (_, x), (_, y) in zip(p1, p3))
    return ok, "two runs (one resumed at step 3) equal after 6 steps" if ok else "two identical bf16 runs differ"


def sub_ulp_run(device, name, dtype, sr):
    """20 steps of Adam direction 1 at lr 1e-3 from 1.0: below half a bf16 ulp (2^-8) per step."""
    p = torch.nn.Parameter(torch.ones(4096, dtype=dtype, device=device))
    extra = dict(use_lr_mask=False, use_dynamic_adaptation=False) if name == "AdaptiveHinaAdamW" else {}
    extra["use_hypergrad"] = False
    opt = build(name, [p], stochastic_rounding=sr, weight_decay=0.0, use_adopt_stability=False, use_spd=False,
                use_grams=False, use_cautious=False, use_agr=False, use_tam=False, **extra)
    for _ in range(20):
        p.grad = torch.ones_like(p)
        opt.step()
    fp32_state = all(v.dtype == torch.float32 for v in opt.state[p].values() if isinstance(v, torch.Tensor))
    return p.detach().float(), fp32_state


def check_bf16(device):
    out = each_optimizer("bf16 deterministic", device, bf16_deterministic_one)
    for name in HINA:
        ref, _ = sub_ulp_run(device, name, torch.float32, False)
        nearest, _ = sub_ulp_run(device, name, torch.bfloat16, False)
        sr, fp32_state = sub_ulp_run(device, name, torch.bfloat16, True)
        gap = abs(float(sr.mean()) - float(ref.mean()))
        stalls = torch.equal(nearest, torch.ones_like(nearest))
        ok = stalls and gap < 2e-3 and sr.unique().numel() > 1 and fp32_state
        out.append(Result("bf16 stochastic rounding", ok, f"20 sub-ulp steps: mean {float(sr.mean()):.5f} vs fp32 "
                          f"{float(ref.mean()):.5f} (|gap| {gap:.1e} < 2e-3), round-to-nearest "
                          f"{'stalls' if stalls else 'moved'}, state {'fp32' if fp32_state else 'NOT fp32'}", name))
    return out


@contextlib.contextmanager
def no_host_sync(device):
    """CUDA: torch's sync debug mode raises on a synchronising call. CPU (a proxy: nothing syncs on
    a CPU): every tensor -> Python conversion and every tensor built from Python data (a
    host-to-device copy on a GPU) raises."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return
    from tests.helpers import forbid_host_copies, forbid_host_sync

    with forbid_host_sync(), forbid_host_copies():
        yield


def sync_error(device, step):
    """None if ``step()`` ran without a host sync, else the first line of what tripped."""
    try:
        with no_host_sync(device):
            step()
    except (RuntimeError, AssertionError) as e:
        return str(e).splitlines()[0][:160]
    return None


def sync_one(device, name, steps=5, warmup_steps=3):
    """Steps 1 to warmup_steps + 2 (state, then each phase's first step: ADOPT's initialising
    call, the end of warmup) run unchecked; the next ``steps`` must not sync."""
    def params():
        return make(device) + make(device, torch.bfloat16, seed=5, shapes=[("lora_te_d.lora_down.weight", (8, 8))])

    probe = params()  # the first (state-initialising) step, on a throwaway copy: reported, not failed
    opt = build(name, probe, warmup_steps=warmup_steps)
    set_grads(probe, 0)
    first = sync_error(device, opt.step)
    note = f"first step: {'syncs (' + first + ')' if first else 'no sync either'}"
    named = params()
    opt = build(name, named, warmup_steps=warmup_steps)
    unchecked = warmup_steps + 2
    for k in range(unchecked + steps):
        set_grads(named, k)
        if k < unchecked:
            opt.step()
        else:
            err = sync_error(device, opt.step)
            if err:
                return False, f"step {k + 1}: {err}; {note}"
        if hasattr(opt, "report_loss"):
            opt.report_loss(torch.rand((), device=device))
    return True, f"steps {unchecked + 1}-{unchecked + steps} clean; {note}"


def check_bench(device, full=False):
    from benchmarks import bench_step

    res = bench_step.main(([] if full else ["--quick"]) + ["--device", str(device)])
    fused = res["ratio_vs_fused"]
    missing = [k for k in ("AdamW(fused)", "bnb AdamW8bit") if k not in res["step_ms"]]
    summary = ", ".join(f"{k} {v:.2f} ms ({fused[k]:.2f}x fused)" for k, v in res["step_ms"].items())
    return [Result("bench_step", not missing, (f"missing contender(s): {', '.join(missing)}; " if missing else "")
                   + summary, str(device))]


CHECKS = {
    "parity": check_parity,
    "resume": lambda device: each_optimizer("resume", device, resume_one),
    "8bit": check_8bit,
    "nonfinite": lambda device: each_optimizer("nonfinite", device, nonfinite_one),
    "bf16": check_bf16,
    "sync": lambda device: each_optimizer("no host sync", device, sync_one),
}


def run_checks(device, only=None, bench=False, full_bench=False):
    device = torch.device(device)
    todo = {k: v for k, v in CHECKS.items() if not only or k in only}
    if bench and (not only or "bench" in only):
        todo["bench"] = lambda d: check_bench(d, full_bench)
    results = []
    for key, check in todo.items():
        t0 = time.perf_counter()
        try:
            got = check(device)
        except Exception as e:  # a crash is a failed check, with where it happened
            got = [Result(key, False, crash(e))]
        for r in got:
            print(r.line(), flush=True)
        print(f"      ({key}: {time.perf_counter() - t0:.1f} s)", flush=True)
        results += got
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--skip-bench", action="store_true", help="the optimizer checks only")
    ap.add_argument("--full-bench", action="store_true", help="bench_step without --quick")
    ap.add_argument("--only", nargs="*", choices=[*CHECKS, "bench"], help="run only these checks")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"gpu-check on {args.device} ({where}), torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    results = run_checks(args.device, args.only, bench=not args.skip_bench, full_bench=args.full_bench)
    failed = [r for r in results if not r.ok]
    print(f"summary: {len(results) - len(failed)} passed, {len(failed)} failed on {where} "
          f"in {time.perf_counter() - t0:.0f} s" + (": " + ", ".join(
              f"{r.check}[{r.subject}]" if r.subject else r.check for r in failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
