"""Parameter-name classification and adapter pairing (LoRA, LoKr, LoHa, PEFT).

Classification is by the parameter's name suffix; pairing falls back to shapes and order
when names are absent. Everything here is O(n) in the number of tensors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# role names
DOWN, UP, MID = "lora_down", "lora_up", "lora_mid"
ADAPTER_ROLES = {
    DOWN, UP, MID, "dora_scale",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
}
NORM_ROLES = {"w_norm", "b_norm"}

# suffix patterns -> role; the module key is what precedes the suffix
_PATTERNS = [
    (re.compile(r"^(?P<mod>.*?)[._]?lora_down(?:\.weight)?$"), DOWN),
    (re.compile(r"^(?P<mod>.*?)[._]?lora_up(?:\.weight)?$"), UP),
    (re.compile(r"^(?P<mod>.*?)[._]?lora_mid(?:\.weight)?$"), MID),
    (re.compile(r"^(?P<mod>.*?)[._]?lora_A(?:\.[\w-]+)?(?:\.weight)?$"), DOWN),  # PEFT: lora_A.default.weight
    (re.compile(r"^(?P<mod>.*?)[._]?lora_B(?:\.[\w-]+)?(?:\.weight)?$"), UP),
    (re.compile(r"^(?P<mod>.*?)[._]?(?P<role>lokr_w[12](?:_[ab])?|lokr_t[12]|hada_w[12]_[ab]|hada_t[12])(?:\.weight)?$"), None),
    (re.compile(r"^(?P<mod>.*?)[._]?(?P<role>dora_scale|w_norm|b_norm)(?:\.weight)?$"), None),
]


def classify(name: str | None) -> tuple[str | None, str]:
    """``(module_key, role)`` for a parameter name; role ``"other"`` when not an adapter."""
    if not name:
        return None, "other"
    for pat, role in _PATTERNS:
        m = pat.match(name)
        if m:
            return m.group("mod"), role or m.group("role")
    return None, "other"


def is_adapter_role(role: str) -> bool:
    return role in ADAPTER_ROLES


@dataclass(frozen=True)
class Pair:
    a: int          # input-side / first factor (LoRA down, LoKr w1, w2_a)
    b: int          # output-side / second factor (LoRA up, LoKr w2, w2_b)
    kind: str       # "lora", "lokr", "lokr_w2", "loha", "shape"
    compatibility: float


# which roles pair up inside one module, in priority order
_NAMED_PAIRS = [
    (DOWN, UP, "lora"),
    ("hada_w1_a", "hada_w1_b", "loha"),
    ("hada_w2_a", "hada_w2_b", "loha"),
    ("lokr_w2_a", "lokr_w2_b", "lokr_w2"),
    ("lokr_w1_a", "lokr_w1_b", "lokr_w1"),
    ("lokr_w1", "lokr_w2", "lokr"),
]


def pairs_from_names(names: list[str | None]) -> list[Pair]:
    """Pairs of factors inside one module, from names. O(n)."""
    modules: dict[str, dict[str, int]] = {}
    for i, n in enumerate(names):
        mod, role = classify(n)
        if mod is not None:
            modules.setdefault(mod, {})[role] = i
    out = []
    for roles in modules.values():
        used = set()
        for ra, rb, kind in _NAMED_PAIRS:
            if ra in roles and rb in roles and ra not in used and rb not in used:
                out.append(Pair(roles[ra], roles[rb], kind, 1.0))
                used.update((ra, rb))
    return out


def _down_like(shape) -> bool:
    return len(shape) >= 2 and shape[0] < _prod(shape[1:])


def _up_like(shape) -> bool:
    return len(shape) >= 2 and shape[1] < shape[0] and all(s == 1 for s in shape[2:])


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def pairs_from_shapes(shapes: list[tuple[int, ...]], exclude: set[int] | None = None,
                      groups: list[int] | None = None) -> list[Pair]:
    """Pair low-rank factors without names. O(n).

    1. Neighbours in the same param group: a down-like (r, in, ...) tensor directly followed by
       an up-like (out, r[, 1, 1]) one of the same rank (kohya's order), or an up-like one
       directly followed by a down-like one (LyCORIS' ``w2_a``, ``w2_b`` order).
    2. What is left, first-in first-out per rank across groups: LoRA+'s split order (all down
       factors in one group, all up factors in another).
    Compatibility: 0.6 for a rank match, +0.2 when the two are adjacent in order, +0.2 when
    the rank is at most half of both outer dimensions (a genuine low-rank factorisation).
    """
    exclude = set(exclude or ())
    groups = groups or [0] * len(shapes)
    out = []

    def score(d: int, u: int) -> float:
        r = shapes[u][1]
        sc = 0.6 + (0.2 if abs(u - d) == 1 else 0.0)
        if 2 * r <= min(shapes[u][0], _prod(shapes[d][1:])):
            sc += 0.2
        return round(sc, 6)

    used = set(exclude)
    for i in range(len(shapes) - 1):
        j = i + 1
        if i in used or j in used or groups[i] != groups[j]:
            continue
        a, b = shapes[i], shapes[j]
        if _down_like(a) and _up_like(b) and a[0] == b[1]:
            out.append(Pair(i, j, "shape", score(i, j)))
            used.update((i, j))
        elif _up_like(a) and _down_like(b) and b[0] == a[1]:
            out.append(Pair(j, i, "shape", score(j, i)))
            used.update((i, j))

    pending: dict[int, list[int]] = {}
    heads: dict[int, int] = {}
    for i, shape in enumerate(shapes):
        if i in used:
            continue
        if _up_like(shape):
            r = shape[1]
            queue = pending.get(r)
            h = heads.get(r, 0)
            if queue is not None and h < len(queue):
                j = queue[h]
                heads[r] = h + 1
                out.append(Pair(j, i, "shape", score(j, i)))
                continue
        if _down_like(shape):
            pending.setdefault(shape[0], []).append(i)
    return out


def discover_pairs(params: list[torch.Tensor], names: list[str | None],
                   groups: list[int] | None = None) -> tuple[list[Pair], str]:
    """Pairs from names where known, shapes and order for the rest; and the method used."""
    named = pairs_from_names(names)
    covered = {i for p in named for i in (p.a, p.b)}
    # parameters whose name classifies as an adapter but found no partner are not re-paired by shape
    classified = {i for i, n in enumerate(names) if classify(n)[0] is not None}
    shaped = pairs_from_shapes([tuple(p.shape) for p in params], exclude=covered | classified, groups=groups)
    if named and shaped:
        method = "names+shapes"
    elif named:
        method = "names"
    elif shaped:
        method = "shapes"
    else:
        method = "none"
    return named + shaped, method
