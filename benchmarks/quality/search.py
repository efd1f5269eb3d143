"""The lr search of the quality benchmark: pure functions of (exponent -> final loss).

Points are ``centre * factor**k`` rounded to ``digits`` significant digits, k an integer
exponent. The centre is ``GRID_CENTRE[task][contender]`` where present (a hint measured on an
earlier run, used only to save runs), else the contender's untuned lr.

1. Run ``k = -1, 0, 1`` (centre x {1/3, 1, 3}).
2. While the best point is the lowest or the highest lr tried, run the next point beyond that
   edge, until ``max_points`` points have run. While every point tried has diverged, the next
   point goes below the lowest.
3. Best: the lowest final held-out loss; a diverged or non-finite run counts as +inf; ties go
   to the point closest to the centre (then the lower lr). If the best is still the lowest or
   highest point tried when the cap is reached, the search is marked "edge".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

# task -> contender key -> search centre (a measured hint; absent: the untuned lr), used only to
# save runs on the expensive task: the best lrs of tiny_sd_long in the full runs of 2026-12-06
# and 2026-12-07 (benchmarks/results/quality.json at 1ebf037 and 27cfdbb), where each search
# ended interior; a centre at the best lr needs only the three first points. A hint that is no
# longer the best still ends interior: the search extends past an edge as always.
GRID_CENTRE: dict[str, dict[str, float]] = {
    "tiny_sd_long": {
        "Prodigy (prodigyopt)": 3.0,
        "AdaptiveHinaAdamW": 1e-3,
        "HinaAdamWOptimizer": 1e-3 / 9,
        "Automagic_CameAMP": 1e-3 / 9,
    },
}


@dataclass(frozen=True)
class SearchRule:
    factor: float = 3.0
    first: tuple[int, ...] = (-1, 0, 1)
    max_points: int = 8
    digits: int = 3

    def lr(self, centre: float, k: int) -> float:
        return float(f"{centre * self.factor ** k:.{self.digits}g}")

    def describe(self) -> str:
        first = ", ".join(_factor_text(self.factor, k) for k in self.first)
        return (f"centre x {{{first}}}, extended in factor-{self.factor:g} steps beyond the edge holding the best "
                f"point, at most {self.max_points} points")


def _factor_text(factor: float, k: int) -> str:
    return f"{factor ** k:g}" if k >= 0 else f"1/{factor ** -k:g}"


def search_centre(task: str, key: str, untuned_lr: float) -> tuple[float, bool]:
    """(centre, whether it is a hint)."""
    hint = GRID_CENTRE.get(task, {}).get(key)
    return (hint, True) if hint is not None else (untuned_lr, False)


def _loss(x) -> float:
    return x if x is not None and math.isfinite(x) else math.inf


def best_exponent(tried: Mapping[int, float]) -> int:
    """The exponent with the lowest loss (+inf for diverged); ties: closest to the centre, then lower."""
    return min(tried, key=lambda k: (_loss(tried[k]), abs(k), k))


def at_edge(tried: Mapping[int, float]) -> bool:
    best = best_exponent(tried)
    return len(tried) > 1 and best in (min(tried), max(tried))


def next_exponent(tried: Mapping[int, float], rule: SearchRule) -> int | None:
    """The next exponent to run given the finished points, or None when the search is over."""
    for k in rule.first:
        if k not in tried:
            return k
    if len(tried) >= rule.max_points:
        return None
    lo, hi = min(tried), max(tried)
    if all(_loss(v) == math.inf for v in tried.values()):
        return lo - 1
    best = best_exponent(tried)
    if best == lo:
        return lo - 1
    if best == hi:
        return hi + 1
    return None


def run_search(loss_of_lr, centre: float, rule: SearchRule = SearchRule()) -> dict:
    """The whole search against a function lr -> loss (sequential; for tests and tools).
    Returns ``{"points": {lr: loss}, "best_lr", "edge"}``."""
    tried: dict[int, float] = {}
    while (k := next_exponent(tried, rule)) is not None:
        tried[k] = loss_of_lr(rule.lr(centre, k))
    return summarise_search(tried, centre, rule)


def summarise_search(tried: Mapping[int, float], centre: float, rule: SearchRule) -> dict:
    best = best_exponent(tried)
    return {"points": {rule.lr(centre, k): tried[k] for k in sorted(tried)}, "best_lr": rule.lr(centre, best),
            "best_exponent": best, "edge": at_edge(tried)}
