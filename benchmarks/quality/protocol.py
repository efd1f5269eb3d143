"""What the quality benchmark runs, and in which order.

Per task (``TaskProtocol``):

- tuned contenders: the lr search of ``search.py`` on the tuning seed, then the best lr on the
  report seeds;
- untuned contenders: the contender exactly as shipped (untuned lr, its arguments, its
  schedule, warmup/transition lengths scaled by the rule in ``contenders.py``) on the report
  seeds;
- ablations (``ablation.py``) of the configured optimizers on the ablation tasks, at that
  optimizer's tuned lr on that task, on the report seeds.

Run dedupe (``RunStore``): every run is a :class:`~benchmarks.quality.contenders.RunConfig`;
runs with the same key (optimizer class, effective arguments after scaling, lr, schedule, seed,
task) are run once and shared. The first request owns the run; the report says "same runs as
<owner>" where a row uses runs another row asked for first.

Scheduling (``execute``): a pool of ``jobs`` processes (one torch thread each, ``spawn``), each
caching its set-up tasks. Runs are queued by estimated cost, heaviest first; a search point
counts ``SEARCH_PRIORITY`` times its cost, because the runs that need the tuned lr (report runs,
ablations) wait for its search. A search's next point, its report runs and its ablations are
queued as soon as the points they depend on finish, so no process waits for a phase to end.

Cost model (``RUN_SECONDS`` x ``CLASS_COST``, measured on this 2-core machine with one torch
thread per process): used to order the queue and for the time estimate printed at the start
(``estimate``), which assumes ``ESTIMATE_SEARCH_POINTS`` points per search (the first points only
where the centre is a measured hint).
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Mapping

from benchmarks.quality.ablation import ADD_ONE_IN, MODES, TECHNIQUES, ablation_configs, plain_overrides
from benchmarks.quality.contenders import (Contender, RunConfig, effective_kwargs, jsonable, lengths_for,
                                           resolve_run)
from benchmarks.quality.search import SearchRule, at_edge, best_exponent, next_exponent, search_centre
from benchmarks.quality.tasks import make_task

TUNING_SEED = 0
REPORT_SEEDS = (1, 2, 3)
ABLATION_TASKS = ("lora_teacher", "digits", "char_lm")
FULL_RUN_MINUTES = 45

# Cost of one run at full size with torch AdamW, one thread (seconds: the median wall time of the
# AdamW (fused) runs of the second full run of 2026-12-07, evaluations included, two processes on
# the 2-core machine; benchmarks/results/quality.json), and the optimizer's share of the step on
# that task; CLASS_COST is each class's cost relative to AdamW on tiny_sd_long, measured by
# ``python -m benchmarks.quality.class_cost`` (100-step runs in alternating rounds, one process,
# one thread; 2026-12-07, after the per-tensor overhead of small tensors was cut and the tiny-SD
# task began caching its text-encoder outputs). A run costs RUN_SECONDS x (1 + share x
# (CLASS_COST - 1)), scaled by its steps; on the small tasks this is within ~20% of the measured
# times. The VM's speed drifts by ~20% between days (the same AdamW tiny-SD run took 66.8 s in the
# first full run of 2026-12-07 and 74.5 s in the second, with a faster task), so the estimate is
# a guide, not a promise.
RUN_SECONDS = {"lora_teacher": 0.72, "digits": 0.65, "char_lm": 2.95, "tiny_sd_long": 74.5}  # tiny-SD measured with 16 evaluations a run (10 since 46fe85b)
OPTIMIZER_SHARE = {"lora_teacher": 0.55, "digits": 0.6, "char_lm": 0.25, "tiny_sd_long": 1.0}
FULL_STEPS = {"lora_teacher": 300, "digits": 300, "char_lm": 150, "tiny_sd_long": 1500}
CLASS_COST = {
    "AdamW": 1.0, "AdamW8bit": 1.51, "CAME": 1.43, "ADOPT": 1.01, "Prodigy": 1.54, "AdamWScheduleFree": 1.11,
    "AdaptiveHinaAdamW": 1.15, "HinaAdamWOptimizer": 1.4, "Automagic_CameAMP": 1.21, "Automagic_CameAMP8bit": 1.32,
    "Automagic_CameAMP_COptim": 1.14, "Automagic_CameAMP_COptim8bit": 1.44, "RefactoredAutomagicCameAMP": 1.49,
}
EIGHT_BIT_COST = 1.02  # AdaptiveHinaAdamW optim_bits=8 relative to 32-bit
SEARCH_PRIORITY = 4.0
ESTIMATE_SEARCH_POINTS = 4


def run_seconds(cfg: RunConfig) -> float:
    """Estimated seconds of one run (the cost model above)."""
    cls = cfg.class_path.rsplit(".", 1)[-1]
    factor = CLASS_COST.get(cls, 1.5) * (EIGHT_BIT_COST if dict(cfg.kwargs).get("optim_bits") == 8 else 1.0)
    base = RUN_SECONDS.get(cfg.task, 1.0) * cfg.steps / FULL_STEPS.get(cfg.task, cfg.steps)
    return base * (1.0 + OPTIMIZER_SHARE.get(cfg.task, 1.0) * (factor - 1.0))


def run_id(cfg: RunConfig) -> str:
    return hashlib.sha1(cfg.key().encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Ablation:
    """Which ablation modes of which optimizer run on which tasks."""
    contender: str
    modes: tuple[str, ...] = MODES
    tasks: tuple[str, ...] = ABLATION_TASKS


@dataclass(frozen=True)
class ProtocolConfig:
    quick: bool = False
    tasks: tuple[str, ...] = ()
    report_seeds: tuple[int, ...] = REPORT_SEEDS
    tuning_seed: int = TUNING_SEED
    rule: SearchRule = SearchRule()
    ablations: tuple[Ablation, ...] = ()
    left_out: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # task -> contender keys
    task_overrides: Mapping[str, Mapping] = field(default_factory=dict)     # task -> constructor arguments
    jobs: int = 1
    threads: int = 1

    def task_factory(self) -> "TaskFactory":
        return TaskFactory(self.quick, {t: dict(v) for t, v in self.task_overrides.items()})

    def steps(self, task: str) -> int:
        return self.task_factory()(task).steps  # a task object without its set-up: cheap

    def describe(self) -> dict:
        return {"quick": self.quick, "tasks": list(self.tasks), "report_seeds": list(self.report_seeds),
                "tuning_seed": self.tuning_seed, "search": {"factor": self.rule.factor, "first": list(self.rule.first),
                                                            "max_points": self.rule.max_points,
                                                            "digits": self.rule.digits, "text": self.rule.describe()},
                "ablations": [{"contender": a.contender, "modes": list(a.modes), "tasks": list(a.tasks)}
                              for a in self.ablations],
                "left_out": {t: list(v) for t, v in self.left_out.items()},
                "task_overrides": {t: dict(v) for t, v in self.task_overrides.items()},
                "jobs": self.jobs, "threads": self.threads}


@dataclass(frozen=True)
class TaskFactory:
    """Picklable: builds a task object at the configured size in any process."""
    quick: bool
    overrides: Mapping[str, Mapping]

    def __call__(self, name: str):
        return make_task(name, self.quick, **dict(self.overrides.get(name, {})))


# ----------------------------------------------------------------------------- run store
class RunStore:
    """Every requested run once (dedupe by RunConfig key), its owner, its result, its waiters."""

    def __init__(self, log: Callable = print):
        self.configs: dict[str, RunConfig] = {}
        self.owner: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        self._waiting: dict[str, list[Callable]] = {}
        self._queue: list = []
        self._order = itertools.count()
        self._log = log
        self._t0 = time.perf_counter()

    def request(self, cfg: RunConfig, label: str, on_done: Callable | None = None, priority: float = 1.0) -> str:
        rid = run_id(cfg)
        if rid not in self.configs:
            self.configs[rid], self.owner[rid] = cfg, label
            heapq.heappush(self._queue, (-priority * run_seconds(cfg), next(self._order), rid))
        if on_done is not None:
            if rid in self.results:
                on_done(self.results[rid])
            else:
                self._waiting.setdefault(rid, []).append(on_done)
        return rid

    def pop(self) -> tuple[str, RunConfig] | None:
        if not self._queue:
            return None
        rid = heapq.heappop(self._queue)[2]
        return rid, self.configs[rid]

    def complete(self, rid: str, result: dict) -> None:
        result["owner"] = self.owner[rid]
        self.results[rid] = result
        cfg = self.configs[rid]
        self._log(f"  [{len(self.results)}/{len(self.configs)} {(time.perf_counter() - self._t0) / 60:5.1f} min] "
                  f"{cfg.task:13s} {self.owner[rid]:48s} lr {cfg.lr:<9.3g} seed {cfg.seed}: "
                  f"{result['final']:.5g} ({result['seconds']:.1f}s)" + (f" {result['error']}" if result["error"] else ""))
        for callback in self._waiting.pop(rid, []):
            callback(result)


# ----------------------------------------------------------------------------- one task
@dataclass
class _Search:
    contender: Contender
    centre: float
    hint: bool
    tried: dict = field(default_factory=dict)     # exponent -> final loss
    runs: dict = field(default_factory=dict)      # exponent -> run id
    pending: set = field(default_factory=set)


class TaskProtocol:
    """Requests the runs of one task into a RunStore and records, per contender, which runs
    answer which question (the results JSON)."""

    def __init__(self, name: str, contenders: list[Contender], config: ProtocolConfig, store: RunStore):
        self.name, self.config, self.store = name, config, store
        self.steps = config.steps(name)
        left_out = set(config.left_out.get(name, ()))
        self.contenders = [c for c in contenders if c.key not in left_out]
        self.left_out = [c.key for c in contenders if c.key in left_out]
        self.entries: dict[str, dict] = {}
        self.ablations: dict[str, dict] = {}
        self.searches: dict[str, _Search] = {}

    def start(self) -> None:
        for c in self.contenders:
            entry = {**c.describe(), "lengths": lengths_for(c, self.steps).describe()}
            self.entries[c.key] = entry
            if c.untuned:
                entry["untuned_runs"] = self._report_runs(c, c.lr, f"{c.key} (untuned)")
            if c.tune:
                self._start_search(c)

    def _report_runs(self, c: Contender, lr: float, label: str, overrides=None) -> list[str]:
        return [self.store.request(resolve_run(c, self.name, self.steps, lr, s, overrides), label)
                for s in self.config.report_seeds]

    # -- search
    def _start_search(self, c: Contender) -> None:
        centre, hint = search_centre(self.name, c.key, c.lr)
        st = self.searches[c.key] = _Search(c, centre, hint)
        st.pending.update(self.config.rule.first)  # all pending before any callback can fire
        for k in self.config.rule.first:
            self._request_point(st, k)

    def _request_point(self, st: _Search, k: int) -> None:
        st.pending.add(k)
        lr = self.config.rule.lr(st.centre, k)
        cfg = resolve_run(st.contender, self.name, self.steps, lr, self.config.tuning_seed)
        st.runs[k] = self.store.request(cfg, f"{st.contender.key} (search)", lambda r: self._point_done(st, k, r),
                                        priority=SEARCH_PRIORITY)

    def _point_done(self, st: _Search, k: int, result: dict) -> None:
        st.pending.discard(k)
        st.tried[k] = result["final"]
        if st.pending:
            return
        nxt = next_exponent(st.tried, self.config.rule)
        if nxt is None:
            self._finish_search(st)
        else:
            self._request_point(st, nxt)

    def _finish_search(self, st: _Search) -> None:
        c, rule = st.contender, self.config.rule
        best = best_exponent(st.tried)
        lr = rule.lr(st.centre, best)
        self.entries[c.key]["search"] = {
            "centre": st.centre, "hint": st.hint, "best_lr": lr, "edge": at_edge(st.tried),
            "points": [{"exponent": k, "lr": rule.lr(st.centre, k), "run": st.runs[k]} for k in sorted(st.tried)]}
        self.entries[c.key]["tuned_runs"] = self._report_runs(c, lr, f"{c.key} (tuned)")
        for ab in self.config.ablations:
            if ab.contender == c.key and self.name in ab.tasks:
                self._request_ablation(c, ab, lr)

    # -- ablation
    def _request_ablation(self, c: Contender, ab: Ablation, lr: float) -> None:
        defaults = effective_kwargs(c.optimizer_class(), dict(c.kwargs))
        techniques = TECHNIQUES[c.key]
        out = {"lr": lr, "modes": list(ab.modes), "reference": self.entries[c.key]["tuned_runs"], "rows": []}
        if ADD_ONE_IN in ab.modes:
            plain = plain_overrides(techniques, defaults)
            out["plain"] = self._report_runs(c, lr, f"{c.key} ablation plain", plain)
        for conf in ablation_configs(techniques, defaults, ab.modes):
            label = f"{c.key} ablation {conf.mode} {conf.technique}"
            out["rows"].append({"mode": conf.mode, "technique": conf.technique,
                                "overrides": jsonable(conf.overrides),
                                "runs": self._report_runs(c, lr, label, conf.overrides)})
        self.ablations[c.key] = out

    # -- results
    def results(self, task_obj) -> dict:
        runs = {rid: self.store.results[rid] for rid in self._run_ids() if rid in self.store.results}
        return {"title": task_obj.title, "describe": task_obj.describe(), "setup": task_obj.setup(),
                "steps": self.steps, "evals": task_obj.evals, "left_out": self.left_out,
                "contenders": self.entries, "ablations": self.ablations, "runs": runs}

    def _run_ids(self):
        for e in self.entries.values():
            yield from e.get("untuned_runs", [])
            yield from e.get("tuned_runs", [])
            yield from (p["run"] for p in e.get("search", {}).get("points", []))
        for a in self.ablations.values():
            yield from a.get("plain", [])
            for row in a["rows"]:
                yield from row["runs"]


# ----------------------------------------------------------------------------- execution
def execute(store: RunStore, jobs: int, factory: TaskFactory, threads: int, local_tasks: dict) -> None:
    """Run everything the store has queued (and whatever the callbacks queue) on `jobs`
    processes; jobs=1 runs in this process with the already set-up `local_tasks`."""
    from benchmarks.quality.runner import Worker, init_process, run_in_process

    if jobs <= 1:
        worker = Worker(lambda name: local_tasks[name], threads)
        while (item := store.pop()) is not None:
            store.complete(item[0], worker.run(item[1]))
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=init_process,
                             initargs=(factory, threads)) as pool:
        running = set()
        while True:
            while len(running) < jobs and (item := store.pop()) is not None:
                running.add(pool.submit(run_in_process, item))
            if not running:
                return
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                store.complete(*fut.result())


# ----------------------------------------------------------------------------- estimate
def estimate(config: ProtocolConfig, contenders: list[Contender]) -> dict:
    """Seconds of CPU the run will take by the cost model and the wall time on `jobs` processes.
    A search counts ESTIMATE_SEARCH_POINTS points, or only its first points where its centre is
    a measured hint (the best lr of an earlier run); its report runs are counted at the centre
    unless another row already asked for the same runs."""
    per_task = {}
    for task in config.tasks:
        store = RunStore(log=lambda msg: None)
        proto = TaskProtocol(task, contenders, config, store)
        proto.start()  # requests the untuned runs and the first search points (deduped)
        seconds = sum(run_seconds(cfg) for cfg in store.configs.values())
        for key, st in proto.searches.items():
            points = len(config.rule.first) if st.hint else max(ESTIMATE_SEARCH_POINTS, len(config.rule.first))
            cfgs = [resolve_run(st.contender, task, proto.steps, st.centre, s) for s in config.report_seeds]
            seconds += run_seconds(cfgs[0]) * (points - len(config.rule.first))
            seconds += sum(run_seconds(cfg) for cfg in cfgs if run_id(cfg) not in store.configs)
            seconds += _ablation_seconds(config, st.contender, task, proto.steps, st.centre)
        per_task[task] = seconds
    total = sum(per_task.values())
    return {"cpu_seconds": per_task, "total_cpu_seconds": total, "wall_seconds": total / max(1, config.jobs),
            "search_points_assumed": f"{ESTIMATE_SEARCH_POINTS} ({len(config.rule.first)} with a measured centre)"}


def _ablation_seconds(config, c: Contender, task: str, steps: int, lr: float) -> float:
    total = 0.0
    for ab in config.ablations:
        if ab.contender != c.key or task not in ab.tasks:
            continue
        defaults = effective_kwargs(c.optimizer_class(), dict(c.kwargs))
        n = len(ablation_configs(TECHNIQUES[c.key], defaults, ab.modes)) + (ADD_ONE_IN in ab.modes)
        total += n * len(config.report_seeds) * run_seconds(resolve_run(c, task, steps, lr, 0))
    return total

