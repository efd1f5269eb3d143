"""HinaAdamWOptimizer: the LoRA / LoKr / LoHa-aware member of the family.

It is AdaptiveHinaAdamW's update (same engine, same technique code) with learning rates and
weight decay chosen per parameter *type*, read from parameter names:

- classification (library/optimizers/params.py): kohya LoRA (``lora_down``/``lora_up``),
  PEFT (``lora_A``/``lora_B``), LyCORIS LoKr (``lokr_w1``, ``lokr_w1_a/_b``, ``lokr_w2``,
  ``lokr_w2_a/_b``, ``lokr_t2``), LoHa (``hada_*``), ``lora_mid``, ``dora_scale``, and norm
  parameters (``w_norm``/``b_norm``); all factors of one module form one group;
- ``use_alora``: a LoRA+-style ratio ``alora_ratio`` on the output-side factor (LoRA B /
  ``lora_up``), and ``0.6 * alora_ratio`` on the LoKr w2 side (seed 002); skipped where
  kohya's LoRA+ group split already gave that factor a different lr; plus ALLoRA-style per-row
  scaling of LoRA factors from their *current* row norms (exactly 1 for a zero row);
- LoKr modules: a Kronecker-aware scale 1 / (1 + 0.3 ||w1|| ||w2||) for all their factors,
  from the current norms, on device (||w2|| is ||w2_a|| ||w2_b|| when w2 is decomposed);
- type-specific dynamic weight decay: LoRA and LoHa factors follow
  max(min_ratio, factor^progress); LoKr factors the gentler max(1.5 min_ratio,
  (factor^0.7)^progress); other parameters keep plain decay. Floors are reachable.

Without names, LoRA factors are found from shapes and order (as AdaptiveHinaAdamW does) and
``get_optimization_info()['detection']`` says so.
"""
from __future__ import annotations

import torch

from .adaptive_hina import AdaptiveHinaAdamW
from .params import classify
from .validation import check_bool, check_real

__all__ = ["HinaAdamWOptimizer", "HinaAdamW"]

_LORA_A = {"lora_down"}
_LORA_B = {"lora_up"}
_LOKR_W1 = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_t1"}
_LOKR_W2 = {"lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
_LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
_KRON_COEF = 0.3
_LOKR_RATIO_SCALE = 0.6


class HinaAdamWOptimizer(AdaptiveHinaAdamW):
    """AdamW with name-aware adapter handling (LoRA, LoKr, LoHa); see the module docstring."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        use_spd: bool = True,
        spd_lambda: float = 0.06,
        use_cautious: bool = True,
        use_orthogonal_grad: bool = False,
        use_adopt_stability: bool = True,
        use_grams: bool = False,
        use_agr: bool = True,
        use_tam: bool = False,
        tam_beta: float = 0.999,
        use_alora: bool = True,
        alora_ratio: float = 16.0,
        allora_eta: float | None = 1.0,
        use_hypergrad: bool = True,
        hypergrad_rate: float = 0.5,
        hypergrad_floor: float = 0.1,
        hypergrad_ceiling: float = 100.0,
        dynamic_weight_decay: bool = True,
        wd_transition_steps: int = 1000,
        wd_decay_factor: float = 0.7,
        wd_min_ratio: float = 0.1,
        spd_anchor: str = "auto",
        optim_bits: int = 32,
        skip_nonfinite: bool = True,
        stochastic_rounding: bool = True,
        param_names=None,
    ):
        self.use_alora = check_bool("use_alora", use_alora)
        self.alora_ratio = check_real("alora_ratio", alora_ratio, lo=0.0, lo_open=True, hi=1e4)
        self._kron_scale: dict = {}
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, use_spd=use_spd, spd_lambda=spd_lambda,
            use_cautious=use_cautious, use_orthogonal_grad=use_orthogonal_grad,
            use_adopt_stability=use_adopt_stability, use_grams=use_grams, use_agr=use_agr, use_tam=use_tam,
            tam_beta=tam_beta, use_dynamic_adaptation=False, use_lr_mask=False, use_hypergrad=use_hypergrad,
            hypergrad_rate=hypergrad_rate, hypergrad_floor=hypergrad_floor, hypergrad_ceiling=hypergrad_ceiling,
            dynamic_weight_decay=dynamic_weight_decay, wd_transition_steps=wd_transition_steps,
            wd_decay_factor=wd_decay_factor, wd_min_ratio=wd_min_ratio,
            allora_eta=allora_eta if self.use_alora else None, spd_anchor=spd_anchor, optim_bits=optim_bits,
            skip_nonfinite=skip_nonfinite, stochastic_rounding=stochastic_rounding, param_names=param_names,
        )

    # ------------------------------------------------------------ structure
    def _discover(self) -> None:
        super()._discover()  # pairs (names, then shapes), adapters, ALLoRA set
        params = self._all_params()
        group_of = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        self._types: dict = {}
        self._modules: dict[str, dict[str, torch.Tensor]] = {}
        for p in params:
            mod, role = classify(self._names.get(p))
            if mod is not None:
                self._types[p] = role
                self._modules.setdefault(mod, {})[role] = p
        # without names: shape-discovered pairs are LoRA down/up
        for p, (side, _partner, pair) in self._roles.items():
            if pair.kind == "shape" and p not in self._types:
                self._types[p] = "lora_down" if side == "a" else "lora_up"
        self._detection = self._pair_method if self._names else ("shapes" if self._roles else "none")

        # ALLoRA rows only for LoRA factors; LoRA+-style ratios per type
        self._row_scaled = {p for p, t in self._types.items() if t in _LORA_A | _LORA_B}
        self._ratio = {}
        if self.use_alora:
            for p, t in self._types.items():
                if t in _LORA_B:
                    r = self.alora_ratio
                elif t in _LOKR_W2:
                    r = self.alora_ratio * _LOKR_RATIO_SCALE
                else:
                    continue
                if self._ratio_already_applied(p, group_of):
                    continue
                self._ratio[p] = r
        # LoKr modules for the Kronecker-aware scale
        self._lokr_modules = []
        for mod, roles in self._modules.items():
            w1 = [roles[r] for r in ("lokr_w1", "lokr_w1_a", "lokr_w1_b") if r in roles]
            w2 = [roles[r] for r in ("lokr_w2", "lokr_w2_a", "lokr_w2_b") if r in roles]
            if w1 and w2:
                members = [q for r, q in roles.items() if r in _LOKR_W1 | _LOKR_W2]
                self._lokr_modules.append((w1, w2, members))

    def _ratio_already_applied(self, p, group_of) -> bool:
        """kohya's LoRA+ split puts up factors in their own group at a higher lr: do not stack."""
        mod, _ = classify(self._names.get(p))
        partners = []
        if mod is not None:
            partners = [q for r, q in self._modules.get(mod, {}).items() if q is not p]
        elif p in self._roles:
            partners = [self._roles[p][1]]
        gp = self.param_groups[group_of[p]]
        return any(self.param_groups[group_of[q]].get("base_lr") != gp.get("base_lr") for q in partners)

    def _begin_step(self) -> None:
        """Kronecker-aware scales from the current (pre-step) norms, on device."""
        if not self.use_alora:
            return
        self._kron_scale = {}
        for w1, w2, members in self._lokr_modules:
            n1 = _norm_product(w1)
            n2 = _norm_product(w2)
            scale = 1.0 / (1.0 + _KRON_COEF * n1 * n2)
            for q in members:
                self._kron_scale[q] = scale

    _has_extra_scale = True

    def _extra_scale(self, p):
        return self._kron_scale.get(p)

    def _wd_multipliers(self, ps, t: int, group: dict) -> list[float]:
        return [self._wd_multiplier(p, t, group) for p in ps]

    def _wd_multiplier(self, p, t: int, group: dict) -> float:
        kind = self._types.get(p)
        T, f, floor = group["wd_transition_steps"], group["wd_decay_factor"], group["wd_min_ratio"]
        if kind is None or t <= T:
            return 1.0
        progress = (t - T) / T
        if kind in _LOKR_W1 | _LOKR_W2:
            return max(min(1.0, 1.5 * floor), (f**0.7) ** progress)
        if kind in _LORA_A | _LORA_B | _LOHA | {"lora_mid"}:
            return max(floor, f**progress)
        return 1.0

    # ---------------------------------------------------------- diagnostics
    def _count(self, kinds) -> int:
        return sum(1 for t in self._types.values() if t in kinds)

    def get_optimization_info(self) -> dict:
        info = super().get_optimization_info()
        lora_pairs = sum(1 for roles in self._modules.values() if "lora_down" in roles and "lora_up" in roles)
        if self._detection == "shapes":
            lora_pairs = len(self._roles) // 2
        lokr_groups = sum(1 for roles in self._modules.values() if any(r.startswith("lokr_") for r in roles))
        info.update(
            {
                "total_params": len(self._all_params()),
                "detection": self._detection,
                "features": {**info["features"], "alora": self.use_alora, "alora_ratio": self.alora_ratio},
                "lora_stats": {
                    "lora_a_params": self._count(_LORA_A),
                    "lora_b_params": self._count(_LORA_B),
                    "lora_pairs": lora_pairs,
                },
                "lokr_stats": {
                    "lokr_w1_params": self._count(_LOKR_W1),
                    "lokr_w2_params": self._count(_LOKR_W2),
                    "lokr_pairs": len(self._lokr_modules),
                    "lokr_groups": lokr_groups,
                    "w_norm_params": self._count({"w_norm"}),
                    "b_norm_params": self._count({"b_norm"}),
                    "norm_pairs": sum(1 for r in self._modules.values() if "w_norm" in r and "b_norm" in r),
                },
                "loha_stats": {"loha_params": self._count(_LOHA)},
            }
        )
        return info

    def diagnose_lora_pairing(self) -> dict:
        """Each parameter's type and partner; unpaired adapter factors with names and shapes."""
        params = self._all_params()
        module_of = {}
        for mod, roles in self._modules.items():
            for q in roles.values():
                module_of[q] = mod
        rows, unpaired = [], []
        for i, p in enumerate(params):
            kind = self._types.get(p, "regular")
            role = self._roles.get(p)
            mod = module_of.get(p)
            siblings = [self._names.get(q) for q in self._modules.get(mod, {}).values() if q is not p] if mod else []
            partner = self._names.get(role[1]) if role else (siblings[0] if siblings else None)
            partner_idx = self.param_index(role[1]) if role else None
            is_paired = role is not None or bool(siblings)
            row = {
                "index": i, "name": self._names.get(p), "type": kind, "shape": tuple(p.shape), "module": mod,
                "is_paired": is_paired, "paired_with": partner, "paired_index": partner_idx,
                "group_members": siblings,
            }
            rows.append(row)
            if kind != "regular" and not is_paired and kind not in ("dora_scale", "w_norm", "b_norm"):
                unpaired.append({"name": row["name"], "type": kind, "shape": row["shape"]})
        return {
            "detection": self._detection,
            "total_parameters": len(params),
            "adapter_parameters": sum(1 for r in rows if r["type"] != "regular"),
            "modules": len(self._modules),
            "unpaired": unpaired,
            "unpaired_count": len(unpaired),
            "parameters": rows,
        }


def _norm_product(tensors):
    out = None
    for t in tensors:
        n = torch.linalg.vector_norm(t.detach().reshape(-1).float())
        out = n if out is None else out * n
    return out


HinaAdamW = HinaAdamWOptimizer
