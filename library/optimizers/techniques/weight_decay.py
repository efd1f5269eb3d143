"""Weight decay schedules.

Decoupled decay (AdamW): p <- p * (1 - lr * wd), lr including the schedule.

Dynamic weight decay (the Hina family's schedule, corrected): the decay multiplier is 1 up to
``transition`` steps, then
    mult(t) = max(min_ratio, factor ** ((t - transition) / transition))
Unlike the original, progress is not capped, so ``min_ratio`` is reachable.
"""
from __future__ import annotations


def dynamic_multiplier(step: int, transition: int, factor: float, min_ratio: float) -> float:
    if step <= transition or transition <= 0:
        return 1.0
    progress = (step - transition) / transition
    return max(min_ratio, factor**progress)


def steps_to_floor(transition: int, factor: float, min_ratio: float) -> float:
    """First step at which the multiplier reaches ``min_ratio`` (inf if factor >= 1)."""
    import math

    if factor >= 1.0 or min_ratio <= 0:
        return math.inf
    return transition * (1.0 + math.log(min_ratio) / math.log(factor))
