"""AdaptiveHinaAdamW: AdamW plus the techniques of the Hina family, each one real.

Per tensor, in this order (spec/algorithms.md section 17):
  gradient transforms (AGR, OrthoGrad) -> second moment (Adam, or ADOPT) -> momentum
  (EMA, TAM damping of the incoming gradient) -> direction rule (Grams and/or Cautious) ->
  per-element lr (lr mask x importance factor x pair-aware scale) -> decay (decoupled,
  dynamic) -> SPD projection -> write-back.

With every extra feature off it is AdamW (tests compare it with torch.optim.AdamW).
All state lives in ``self.state[p]``; ``step()`` never reads a tensor back to the host.
"""
from __future__ import annotations

from functools import partial

import torch

from . import __version__
from . import quant8
from .engine import HinaOptimizer
from .params import classify, discover_pairs, is_adapter_role
from .state_store import Arenas, ChunkState
from .techniques import adam, adopt, allora, constants, hypergrad, lr_mask, nonfinite, ops, tam
from .techniques import agr as agr_t
from .techniques import spd as spd_t
from .techniques.cautious import cautious_list_
from .techniques.grams import grams_cautious_list_, grams_list_
from .techniques.orthograd import orthograd_list_
from .techniques.weight_decay import dynamic_multiplier
from .validation import (check_betas, check_bool, check_choice, check_eps, check_int, check_lr, check_lr_bounds,
                         check_real)

__all__ = ["AdaptiveHinaAdamW"]

_IMPORTANCE_WEIGHTS = (0.4, 0.3, 0.3)  # gradient, change rate, intrinsic
_CHUNK_LAYOUT = 2  # see AdaptiveHinaAdamW._chunk_plan
_FACTOR_MIN, _FACTOR_MAX = 0.5, 2.0
_TINY = 1e-30


def _fold_decay_(us, scales, ps, decays, tmp) -> list[float]:
    """Fold decoupled decay into the direction: afterwards the step is coef * u per tensor.

    Uniform nonzero scales (the usual case): u <- u + (decay / scale) p, coef = scale (one
    pass). Otherwise u <- scale u + decay p, coef = 1.
    """
    s0, c0 = scales[0], decays[0]
    if s0 != 0.0 and all(s == s0 for s in scales) and all(c == c0 for c in decays):
        if c0 != 0.0:
            ops.add_(us, ps, alpha=c0 / s0)
        return scales
    ops.mul_(us, scales)
    if any(c != 0.0 for c in decays):
        ops.copy_(tmp, ps)
        ops.mul_(tmp, decays)
        ops.add_(us, tmp)
    return [1.0] * len(us)


def _axpy_(ys, xs, alphas) -> bool:
    """y <- y + alpha * x per tensor; returns True when ``xs`` was scaled in place."""
    if all(a == alphas[0] for a in alphas):
        ops.add_(ys, xs, alpha=alphas[0])
        return False
    ops.mul_(xs, alphas)
    ops.add_(ys, xs)
    return True


def _real(**bounds):
    return partial(check_real, **bounds)


# every constructor argument that lands in the param groups, with its check, in group-key order
_ARGUMENT_CHECKS = {
    "lr": check_lr,
    "betas": check_betas,
    "eps": check_eps,
    "weight_decay": _real(lo=0.0),
    "use_spd": check_bool,
    "spd_lambda": _real(lo=0.0, hi=1.0),
    "use_cautious": check_bool,
    "use_orthogonal_grad": check_bool,
    "use_adopt_stability": check_bool,
    "use_grams": check_bool,
    "use_agr": check_bool,
    "use_tam": check_bool,
    "tam_beta": _real(lo=0.0, hi=1.0, hi_open=True),
    "use_dynamic_adaptation": check_bool,
    "adaptation_strength": _real(lo=0.0, hi=10.0),
    "relationship_discovery_interval": partial(check_int, lo=1),
    "importance_decay": _real(lo=0.0, hi=1.0, hi_open=True),
    "compatibility_threshold": _real(lo=0.0, hi=1.0),
    "use_lr_mask": check_bool,
    "lr_mask_rate": _real(lo=0.0, hi=1.0),
    "lr_mask_floor": _real(lo=0.0, lo_open=True, hi=1.0),
    "lr_mask_ceiling": _real(lo=1.0, hi=1e4),
    "lr_bump": _real(lo=0.0, allow_none=True),
    "min_lr": None,  # checked as a pair with max_lr
    "max_lr": None,
    "warmup_steps": partial(check_int, lo=0),
    "lr_mask_post_warmup_ratio": _real(lo=0.0, hi=1.0),
    "use_hypergrad": check_bool,
    "hypergrad_rate": _real(lo=0.0, hi=2.0),
    "hypergrad_floor": _real(lo=0.0, lo_open=True, hi=1.0),
    "hypergrad_ceiling": _real(lo=1.0, hi=1e4),
    "dynamic_weight_decay": check_bool,
    "wd_transition_steps": partial(check_int, lo=1),
    "wd_decay_factor": _real(lo=0.0, hi=1.0),
    "wd_min_ratio": _real(lo=0.0, hi=1.0),
    "lora_plus_ratio": _real(lo=0.0, lo_open=True),
    "allora_eta": _real(lo=0.0, lo_open=True, allow_none=True),
    "spd_anchor": lambda name, v: check_choice(name, v, {"auto", "zero", "init"}),
    "optim_bits": lambda name, v: check_choice(name, check_int(name, v), {8, 32}),
    "skip_nonfinite": check_bool,
    "stochastic_rounding": check_bool,
}


def _checked_defaults(args: dict) -> dict:
    """The param-group defaults from the constructor's arguments, each checked (one-line errors)."""
    out = {}
    for name, check in _ARGUMENT_CHECKS.items():
        out[name] = args[name] if check is None else check(name, args[name])
    out["min_lr"], out["max_lr"] = check_lr_bounds(args["min_lr"], args["max_lr"])
    return out


class AdaptiveHinaAdamW(HinaOptimizer):
    """AdamW with AGR, OrthoGrad, ADOPT, TAM, Grams, Cautious, per-element lr masks, SPD,
    dynamic weight decay, importance-based adaptation and adapter-pair discovery.

    See docs/optimizers.md for every argument; defaults follow seed 000's example.
    """

    # added after the first release; a state saved before chunk layouts were versioned keeps layout 1
    _options_absent_from_older_states = {"use_hypergrad": False, "chunk_layout": 1}
    _shaped_state_keys = ("exp_avg", "exp_avg_sq", "lr_mask", "anchor", "exp_avg_f8", "exp_avg_sq_root_f8",
                          "lr_mask_f8", "exp_avg_q8", "exp_avg_sq_root_q8", "lr_mask_lq")

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
        use_tam: bool = True,
        tam_beta: float = 0.999,
        use_dynamic_adaptation: bool = True,
        adaptation_strength: float = 1.0,
        relationship_discovery_interval: int = 100,
        importance_decay: float = 0.95,
        compatibility_threshold: float = 0.3,
        use_lr_mask: bool = True,
        lr_mask_rate: float = 0.05,
        lr_mask_floor: float = 0.1,
        lr_mask_ceiling: float = 10.0,
        lr_bump: float | None = None,
        min_lr: float | None = None,
        max_lr: float | None = None,
        warmup_steps: int = 500,
        lr_mask_post_warmup_ratio: float = 0.1,
        use_hypergrad: bool = True,
        hypergrad_rate: float = 0.5,
        hypergrad_floor: float = 0.1,
        hypergrad_ceiling: float = 100.0,
        dynamic_weight_decay: bool = True,
        wd_transition_steps: int = 1000,
        wd_decay_factor: float = 0.7,
        wd_min_ratio: float = 0.1,
        lora_plus_ratio: float = 1.0,
        allora_eta: float | None = None,
        spd_anchor: str = "auto",
        optim_bits: int = 32,
        skip_nonfinite: bool = True,
        stochastic_rounding: bool = True,
        param_names=None,
    ):
        defaults = _checked_defaults(dict(locals()))
        defaults["chunk_layout"] = _CHUNK_LAYOUT
        self._pairs = None
        self._arenas = Arenas()  # where 8-bit state lives (state_store.py)
        super().__init__(params, defaults, param_names=param_names)
        for group in self.param_groups:
            self._check_group(group)
        self._discover()

    # ------------------------------------------------------------------ setup
    def _check_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        group.setdefault("base_lr", group["lr"])

        check_betas("betas", group["betas"])
        check_eps("eps", group["eps"])
        if group["optim_bits"] == 8:  # the codec's tables, built now rather than inside step()
            for dev in {p.device for p in group["params"]}:
                quant8.prepare_float8(dev)
        self._prepare_mask_rates(group)

    def _prepare_mask_rates(self, group: dict) -> None:
        """The lr mask's step factors for this group's two rates (during and after warmup), now."""
        r = self._mask_rate(group, 1)
        lr_mask.prepare((r, r * group["lr_mask_post_warmup_ratio"]), {p.device for p in group["params"]})

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _after_load(self) -> None:
        super()._after_load()
        for group in self.param_groups:  # a loaded group may carry other rates
            self._prepare_mask_rates(group)
        for st in self.state.values():  # 8-bit lr masks saved with the log codec (before float8)
            if "lr_mask_lq" in st:
                x = quant8.load_log(st, "lr_mask")
                del st["lr_mask_lq"], st["lr_mask_lrange"]
                quant8.store(st, "lr_mask", x, signed=False, rounding="nearest")

    def _on_layout_changed(self) -> None:
        super()._on_layout_changed()
        if hasattr(self, "_arenas"):  # a load replaced the state tensors: pack them again
            self._arenas.reset()
        if getattr(self, "_pairs", None) is not None:
            self._discover()

    def _discover(self) -> None:
        """Relationship discovery: adapter pairs from names, else shapes and order. O(n)."""
        params = self._all_params()
        names = [self._names.get(p) for p in params]
        group_ids = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        pairs, method = discover_pairs(params, names, group_ids)
        thr = self.defaults["compatibility_threshold"]
        self._pairs = [pr for pr in pairs if pr.compatibility >= thr]
        self._pair_method = method
        self._roles = {}
        group_of = {}
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                group_of[p] = gi
        for pr in self._pairs:
            pa, pb = params[pr.a], params[pr.b]
            self._roles[pa] = ("a", pb, pr)
            self._roles[pb] = ("b", pa, pr)
        # LoRA+-style ratio for the output-side factor, unless the groups already differ in lr
        self._ratio = {}
        for pr in self._pairs:
            pa, pb = params[pr.a], params[pr.b]
            ga, gb = self.param_groups[group_of[pa]], self.param_groups[group_of[pb]]
            ratio = gb["lora_plus_ratio"]
            if ratio != 1.0 and ga.get("base_lr") == gb.get("base_lr"):
                self._ratio[pb] = ratio
        self._adapters = set(self._roles)
        self._row_scaled = set(self._roles)
        for p, n in zip(params, names):
            if is_adapter_role(classify(n)[1]):
                self._adapters.add(p)
        for p in params:
            st = self.state.get(p)
            if st:
                self._write_pair_state(p, st)

    def _write_pair_state(self, p, st) -> None:
        role = self._roles.get(p)
        st["partner"] = -1 if role is None else self.param_index(role[1])
        st["pair_compatibility"] = 0.0 if role is None else float(role[2].compatibility)

    def _init_state(self, p: torch.Tensor, st: dict, group: dict) -> None:
        st["step"] = 0
        q8 = group["optim_bits"] == 8
        if q8:  # 8-bit store: m signed, sqrt(v) unsigned (half the dynamic range of v: no flush to 0)
            quant8.store_zeros(st, "exp_avg", p.shape, signed=True, device=p.device)
            quant8.store_zeros(st, "exp_avg_sq_root", p.shape, signed=False, device=p.device)
        else:
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if group["use_lr_mask"] and group["base_lr"] > 0:
            lo, hi = self._mask_range(group)
            if q8 and hi > lo:  # 8-bit codes, clamped to [lo, hi] when decoded
                full = torch.ones(p.shape, dtype=torch.float32, device=p.device)
                quant8.store(st, "lr_mask", full, signed=False, rounding="nearest")
            else:
                dt = lr_mask.storage_dtype(self._mask_rate(group, 0), lo, hi)
                st["lr_mask"] = torch.ones_like(p, dtype=dt, memory_format=torch.preserve_format)
        if group["use_tam"]:
            st["tam_s"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if group["use_hypergrad"]:
            st["lr_scale"] = torch.ones((), dtype=torch.float32, device=p.device)
        if group["use_dynamic_adaptation"]:
            st["importance"] = torch.ones((), dtype=torch.float32, device=p.device)
            st["lr_factor"] = torch.ones((), dtype=torch.float32, device=p.device)
        if group["use_spd"] and self._spd_anchor_needed(p, group):
            st["anchor"] = p.detach().clone()
        self._write_pair_state(p, st)

    @staticmethod
    def _mask_range(group) -> tuple[float, float]:
        """Bounds of the lr-mask scale (techniques/lr_mask.py): [floor, ceiling], tightened by
        the absolute min_lr / max_lr at the group's lr, always containing 1."""
        return lr_mask.group_bounds(group)

    @staticmethod
    def _hypergrad_range(group) -> tuple[float, float]:
        """Bounds of the hypergradient lr scale (techniques/hypergrad.py), always containing 1."""
        return hypergrad.group_bounds(group)

    @staticmethod
    def _mask_rate(group, t: int) -> float:
        """The mask's rate at step t: full during ``warmup_steps``, then times
        ``lr_mask_post_warmup_ratio``."""
        r = lr_mask.rate(group["lr_mask_rate"], group["lr_bump"], group["base_lr"])
        return r * group["lr_mask_post_warmup_ratio"] if t > group["warmup_steps"] else r

    def _spd_anchor_needed(self, p, group) -> bool:
        mode = group["spd_anchor"]
        if mode == "zero":
            return False
        if mode == "init":
            return True
        return p not in self._adapters

    # ------------------------------------------------------------------- step
    def _layout(self, p):
        """What a chunk's tensors share: step count, dtype, device and state layout."""
        st = self.state[p]
        return (st["step"], p.dtype, p.device, "exp_avg_f8" in st, "lr_mask" in st, "lr_mask_f8" in st,
                "anchor" in st, "lr_scale" in st)

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        refresh = group["use_dynamic_adaptation"] and group["step_count"] % group["relationship_discovery_interval"] == 0
        new = self._init_missing(group, params)
        if group["use_hypergrad"]:  # switched on after a load of a state saved without it
            for p in params:
                if "lr_scale" not in self.state[p]:
                    self.state[p]["lr_scale"] = torch.ones((), dtype=torch.float32, device=p.device)
        eight = group["optim_bits"] == 8
        order, elements = self._chunk_plan(group)
        self._arenas.ensure(group, self.state, lambda: order(group["params"]), self._Q8_KEYS if eight else (), new,
                            plain=self._PLAIN_KEYS)  # ordered only when packing, not at every step
        feats = {} if refresh else None
        for chunk in self._chunks(order(params), self._layout, elements):
            self._update_chunk(chunk, group, feats)
        if refresh:
            self._discover()
            self._refresh_importance(group, params, [feats[p] for p in params])

    def _chunk_plan(self, group: dict):
        """``(order, elements)``: how the group's tensors are ordered and cut into chunks. The chunk
        boundaries are part of the arithmetic (8-bit state draws one stochastic-rounding stream
        per chunk, seeded by its first tensor; decay is folded by the uniform or the general
        formula per chunk), so a state keeps the layout it was written with: ``chunk_layout`` 2
        (new optimizers) brings same-sized tensors together and uses the engine's chunk size; a
        state saved before layouts were versioned resumes with layout 1, the parameter order and
        2^18-element chunks on CPU."""
        if group["chunk_layout"] >= 2:
            return self._by_size, None
        return list, {"cpu": 1 << 18}

    # A chunk's step runs these stages in order (spec/algorithms.md section 17), each over the
    # whole chunk with multi-tensor operations; the values one stage hands to the next live on
    # the chunk object (``_AdamChunk``).
    _STAGES = ("_gradient_stage", "_transform_stage", "_moment_stage", "_mask_stage", "_direction_stage",
               "_step_stage", "_spd_stage")

    def _update_chunk(self, ps: list[torch.Tensor], group: dict, feats: dict | None) -> None:
        """One step for tensors with the same step count and state layout, multi-tensor."""
        c = self._open_chunk(ps, group, feats)
        for stage in self._STAGES:
            getattr(self, stage)(c)
            if c.initialising:  # ADOPT's first call only initialises v
                break
        self._close_chunk(c)

    def _open_chunk(self, ps, group, feats) -> "_AdamChunk":
        """Advance the step counters and load the chunk's state (8-bit: decoded into scratch)."""
        c = _AdamChunk(ps, group, feats, self._buffer_pool, [self.state[p] for p in ps])
        sts = c.sts
        c.k = sts[0]["step"]
        c.t = c.k + 1
        for st in sts:
            st["step"] = c.t
        # element-sized state, whatever its storage (8-bit: decoded into scratch, one stochastic
        # rounding stream per chunk seeded by its first parameter index and the step)
        c.stored = ChunkState(self._arenas, c.pool, ps, sts, tag="aha8", stored_as=self._STORED_AS,
                              seed=quant8.mix_seed(self.param_index(ps[0]), c.t))
        c.ms, c.vs = c.stored.read("exp_avg"), c.stored.read("exp_avg_sq")
        c.masks = c.stored.read("lr_mask", clamp=self._mask_range(group))
        c.has_mask = c.masks is not None
        c.anchors = c.stored.read("anchor")
        # compact (fp16) masks are worked on as an fp32 copy; its scratch is taken on the first step
        c.mask32 = c.pool.views(ps, 8) if c.has_mask and c.masks[0].dtype != torch.float32 else None
        c.fp32 = ps[0].dtype == torch.float32
        c.tmp = c.pool.views(ps, 2)
        return c

    def _gradient_stage(self, c: "_AdamChunk") -> None:
        """1. fp32 gradients in flat scratch (transforms write there, never into p.grad), the
        non-finite gate, the weights' fp32 working copy (flat scratch too, written back at the end:
        every pass on the weights is then one operation, every per-tensor reduction one per run)
        and SPD's pre-step quantities. The gate: a tensor whose gradient holds NaN/inf (its sum is
        not finite) gets a zero gradient, moments that decay by 1, lr factor 0 and a mask that does
        not move, so it and its state stay as they were (no host sync)."""
        ps, pool, group = c.ps, c.pool, c.group
        grads = [p.grad for p in ps]
        c.xs = grads
        if group["skip_nonfinite"] or any(g.dtype != torch.float32 for g in grads):
            c.xs = pool.views(ps, 0)
            ops.copy_(c.xs, grads)  # fp32, flat
        if group["skip_nonfinite"]:
            c.ok = ops.sums(c.xs).isfinite()  # a sum is finite iff every element is (or it overflows)
            beta1, beta2 = group["betas"]
            n, dev = len(ps), c.ok.device
            c.okf, c.oks = pool.scalars(n, dev, "ok")
            c.okf.copy_(c.ok)
            k1, c.keep1 = pool.scalars(n, dev, "keep1")
            k1.copy_(c.okf).mul_(beta1 - 1.0).add_(1.0)  # beta where finite, 1 where not
            k2, c.keep2 = pool.scalars(n, dev, "keep2")
            k2.copy_(c.okf).mul_(beta2 - 1.0).add_(1.0)
            self._count_nonfinite(c.ok)
            nonfinite.sanitize_list_(c.xs, c.xs)  # NaN/inf -> 0; the rest of a bad tensor is zeroed by ok
        c.p32 = pool.views(ps, "p32")  # the fp32 working copy (flat: multi-tensor passes run once on it)
        ops.copy_(c.p32, ps)
        c.use_spd = group["use_spd"] and group["spd_lambda"] > 0
        if c.use_spd:  # SPD quantities before the step (pre-step weights; a skipped tensor does not move)
            c.moving_away, c.old_norms = spd_t.pre_step_list(c.p32, c.xs, c.anchors, c.tmp,
                                                             scratch=pool.views(ps, 3))

    def _transform_stage(self, c: "_AdamChunk") -> None:
        """Gradient transforms (AGR, OrthoGrad) into scratch slot 0."""
        ps, pool, group, oks = c.ps, c.pool, c.group, c.oks
        agr_on = [i for i, p in enumerate(ps) if p.numel() > 1] if group["use_agr"] else []
        if agr_on or group["use_orthogonal_grad"]:
            slot0 = pool.views(ps, 0)
            if len(agr_on) == len(ps) and c.xs is not slot0:
                agr_t.agr_list_(slot0, c.xs)  # out of place: p.grad is never modified
            else:
                if c.xs is not slot0:
                    ops.copy_(slot0, c.xs)
                if len(agr_on) == len(ps):  # every tensor: the flat scratch itself (one pass per operation)
                    agr_t.agr_list_(slot0, slot0, c.tmp, oks)
                elif agr_on:
                    sel = [slot0[i] for i in agr_on]
                    agr_t.agr_list_(sel, sel, [c.tmp[i] for i in agr_on], None if oks is None else [oks[i] for i in agr_on])
            c.xs = slot0
        if oks is not None:  # tensors AGR did not scale by ok
            if not agr_on:
                ops.mul_(c.xs, c.okf)
            elif len(agr_on) < len(ps):
                scaled = set(agr_on)
                rest = [i for i in range(len(ps)) if i not in scaled]
                ops.mul_([c.xs[i] for i in rest], [oks[i] for i in rest])
        if group["use_orthogonal_grad"]:
            sel = [i for i, p in enumerate(ps) if p.ndim >= 1 and p.numel() > 1]
            if sel:
                orthograd_list_([c.xs[i] for i in sel], [c.p32[i] for i in sel])

    def _moment_stage(self, c: "_AdamChunk") -> None:
        """2-3. Second moment (Adam, or ADOPT) and momentum (EMA, TAM damping of the incoming
        gradient), the hypergradient lr scale from the same cosine; u = the direction before the lr.
        Before the momentum moves, one product m_{t-1} x_t serves two techniques: its per-tensor sum
        is the dot of TAM's cosine, its sign the lr mask's agreement (x here is the momentum's input:
        with ADOPT the normalised gradient, a positive multiple of g elementwise, so the same sign)."""
        group, k, xs = c.group, c.k, c.xs
        beta1, beta2 = group["betas"]
        c.us = c.pool.views(c.ps, 1)
        if group["use_adopt_stability"]:
            adopt.normalize_list_(c.us, xs, c.vs, k, group["eps"])
            n_cos, inputs = k - 1, c.us  # cosines available: the momentum is non-zero from k = 2 on
        else:
            n_cos, inputs = k, xs
        use_hg = group["use_hypergrad"] and group["hypergrad_rate"] > 0 and n_cos >= 1
        cos_on = n_cos >= 1 and (group["use_tam"] or use_hg)
        prods = None
        if c.has_mask or cos_on:  # m_{t-1} x_t: its sum is TAM's dot, its sign the lr mask's agreement
            prods = c.pool.views(c.ps, 3)
            ops.product_(prods, c.ms, inputs)
        cos = tam.cosines(c.ms, inputs, products=prods) if cos_on else None
        if c.has_mask:
            c.agree = lr_mask.agreement_from_products_(prods)
        if use_hg:  # cos(m_{t-1}, x_t): the tensor's lr grows while its gradient keeps the last direction
            hypergrad.scale_list_(self._arenas.tiled([st["lr_scale"] for st in c.sts]), cos, group["hypergrad_rate"],
                                  *self._hypergrad_range(group), c.ok)
        if group["use_tam"] and n_cos >= 1:
            d = tam.damping_list(self._arenas.tiled([st["tam_s"] for st in c.sts]), cos, n_cos, group["tam_beta"], c.ok)
            tam.momentum_list_(c.ms, inputs, d, beta1, c.keep1)
        elif c.ok is None:
            ops.lerp_(c.ms, inputs, 1.0 - beta1)
        else:
            ops.lerp_(c.ms, inputs, c.okf * (1.0 - beta1))
        if group["use_adopt_stability"]:
            adopt.update_second_moment_list_(c.vs, xs, k, beta2, c.keep2)
            c.initialising = k == 0
            c.step_scale, c.src_dir = 1.0, c.ms  # ADOPT: the direction is the momentum itself
        else:
            adam.update_second_moment_list_(c.vs, xs, beta2, c.keep2)
            adam.denominator_list_(c.tmp, c.vs, c.t, beta2, group["eps"])
            adam.quotient_list_(c.us, c.ms, c.tmp)
            c.step_scale, c.src_dir = 1.0 / (1.0 - beta1**c.t), c.us

    def _mask_stage(self, c: "_AdamChunk") -> None:
        """4. lr mask: x e^r where the gradient agrees with the momentum, x e^-r where it opposes it."""
        if not c.has_mask:
            return
        group = c.group
        stored = c.masks
        r = self._mask_rate(group, c.t)
        if c.mask32 is not None:  # compact storage: work on an fp32 copy
            c.masks = c.mask32
            ops.copy_(c.masks, stored)
        if r > 0:  # a skipped tensor's agreement is 0 (its gradient was zeroed): its mask stays
            lr_mask.scale_list_(c.masks, c.agree, r, *self._mask_range(group))
            if c.masks is not stored:
                ops.copy_(stored, c.masks)

    def _direction_stage(self, c: "_AdamChunk") -> None:
        """5. Direction rule into u (from the momentum for ADOPT, in place for Adam): Grams and/or
        Cautious."""
        grams, cautious = c.group["use_grams"], c.group["use_cautious"]
        us, src = c.us, c.src_dir
        if grams and cautious:
            out = c.pool.views(c.ps, 4) if src is us else us
            grams_cautious_list_(out, src, c.xs, c.tmp)
            c.us = out
        elif grams:
            grams_list_(us, src, c.xs, c.tmp)
        elif cautious:
            cautious_list_(us, src, c.xs, c.tmp)
        elif src is not us:
            ops.copy_(us, src)

    def _step_stage(self, c: "_AdamChunk") -> None:
        """6-8. Per-element lr (lr x step scale x LoRA+ ratio x [mask] x [ALLoRA row scale] x
        [importance x hypergradient factor]), decoupled (dynamic) weight decay with the same lr,
        and the step."""
        ps, group = c.ps, c.group
        lr = group["lr"]
        if group["allora_eta"] is not None:
            rows = [i for i, p in enumerate(ps) if p in self._row_scaled and p.ndim >= 1]
            if rows:
                allora.scale_rows_list_(c.us, c.p32, group["allora_eta"], rows)
        ratios = [self._ratio.get(p, 1.0) for p in ps] if self._ratio else [1.0] * len(ps)
        factors = self._factors(ps, c.sts)
        wd = group["weight_decay"]
        wdm = self._wd_multipliers(ps, c.t, group) if group["dynamic_weight_decay"] else [1.0] * len(ps)
        scales = [lr * c.step_scale * r for r in ratios]
        decays = [lr * r * wd * w for r, w in zip(ratios, wdm)]
        if c.has_mask or factors is not None:
            self._scaled_step(c, scales, decays, factors)
        else:
            self._adamw_step(c, scales, decays)

    def _scaled_step(self, c: "_AdamChunk", scales, decays, factors) -> None:
        """p <- p - ok * factor * coef * mask * (u + decay/scale * p): decay and step in one pass."""
        if c.okf is not None:
            factors = c.okf if factors is None else factors * c.okf
        coef = _fold_decay_(c.us, scales, c.p32, decays, c.tmp)
        if c.has_mask:
            ops.mul_(c.us, c.masks)
        if factors is not None:
            if all(x == coef[0] for x in coef):
                c.step_coef = factors * coef[0]
            else:
                c.step_coef = torch._foreach_mul(list(factors.unbind(0)), coef)
            ops.addcmul_(c.p32, c.us, c.step_coef, value=-1.0)
        else:
            c.step_coef = [1.0] * len(c.ps) if _axpy_(c.p32, c.us, [-x for x in coef]) else coef

    def _adamw_step(self, c: "_AdamChunk", scales, decays) -> None:
        """AdamW's operation order (the all-off configuration matches torch.optim.AdamW)."""
        p32, us, okf = c.p32, c.us, c.okf
        oks = None if okf is None else list(okf.unbind(0))
        if any(x != 0.0 for x in decays):
            if oks is None:
                ops.mul_(p32, [1.0 - x for x in decays])
            else:  # 1 - c where the gradient is finite, 1 where it is not
                keep, keeps = c.pool.scalars(len(c.ps), okf.device, "keep_decay")
                if all(x == decays[0] for x in decays):
                    keep.copy_(okf).mul_(-decays[0]).add_(1.0)
                else:
                    keep.copy_(constants.fill_vector(decays, torch.float32, keep.device)).mul_(okf).neg_().add_(1.0)
                ops.mul_(p32, keeps)
        if oks is None:
            c.step_coef = [1.0] * len(c.ps) if _axpy_(p32, us, [-x for x in scales]) else scales
        elif all(x == scales[0] for x in scales):
            ops.addcmul_(p32, us, oks, value=-scales[0])
            c.step_coef = scales
        else:
            ops.mul_(us, [-x for x in scales])
            ops.addcmul_(p32, us, oks)
            c.step_coef = [1.0] * len(c.ps)

    def _spd_stage(self, c: "_AdamChunk") -> None:
        """9. SPD projection toward the anchor."""
        if c.use_spd:
            spd_t.project_list_(c.p32, c.anchors, c.moving_away, c.old_norms, c.group["spd_lambda"], c.tmp)

    def _close_chunk(self, c: "_AdamChunk") -> None:
        """Write low-precision weights back (bf16: stochastic rounding), store 8-bit state, and
        collect the importance features when they are refreshed this step."""
        ps = c.ps
        if not c.initialising:
            if c.fp32:
                ops.copy_(ps, c.p32)
            else:
                self._write_back(ps, c.p32, c.t, c.group["stochastic_rounding"])
        for key, xs in (("exp_avg", c.ms), ("exp_avg_sq", c.vs), ("lr_mask", c.masks)):
            c.stored.write(key, xs)
        if c.feats is not None:
            self._collect_features(ps, c.ms, None if c.initialising else (c.us, c.step_coef), c.feats)

    def _factors(self, ps, sts):
        """Per-tensor lr factors (importance x hypergradient scale x subclass scale) as one fp32
        vector, or None (a factor a tensor lacks counts as 1: x * 1 keeps x's bits)."""
        out = self._scalar_state(ps, sts, "lr_factor")
        h = self._scalar_state(ps, sts, "lr_scale")
        if h is not None:
            out = h if out is None else out * h
        if self._has_extra_scale:
            extra = [self._extra_scale(p) for p in ps]
            if any(e is not None for e in extra):
                one = torch.ones((), dtype=torch.float32, device=ps[0].device)
                e = torch.stack([one if x is None else x for x in extra])
                out = e if out is None else out * e
        return out

    def _scalar_state(self, ps, sts, key):
        """The chunk's 0-dim state ``key`` as a vector (1 where a tensor lacks it), or None."""
        have = [st.get(key) for st in sts]
        if all(x is not None for x in have):
            return ops.values(self._arenas.tiled(have))
        if all(x is None for x in have):
            return None
        one = torch.ones((), dtype=torch.float32, device=ps[0].device)
        return torch.stack([one if x is None else x for x in have])

    # 8-bit state: codes in flat arenas (state_store.py); v is stored as its square root
    _Q8_KEYS = ("exp_avg", "exp_avg_sq_root", "lr_mask")
    _STORED_AS = {"exp_avg_sq": "exp_avg_sq_root"}
    # element-sized plain state, in arenas too (multi-tensor updates then run on one flat slice)
    # and so are the per-tensor scalars (a chunk's scalars are then one vector, not n 0-dim tensors)
    _PLAIN_KEYS = ("exp_avg", "exp_avg_sq", "lr_mask", "anchor", "tam_s", "lr_scale", "importance", "lr_factor")

    def _collect_features(self, ps, ms, step, feats: dict) -> None:
        """(gradient term, change rate, intrinsic term) per tensor, as vectors on device.

        ``step`` is ``(us, coef)`` with the applied step = coef * us per tensor, or None."""
        dev = ps[0].device
        sq = constants.sqrt_numels(ps, torch.float32, dev)
        pd = [p.detach() for p in ps]
        p_norm = torch.stack(torch._foreach_norm(pd)).float()
        grad_term = torch.stack(torch._foreach_norm(ms)).float() / sq
        if step is None:
            change = torch.zeros_like(p_norm)
        else:
            us, coef = step
            step_norm = torch.stack(torch._foreach_norm(us)).float()
            if isinstance(coef, torch.Tensor):
                step_norm = step_norm * coef.float()
            elif isinstance(coef[0], torch.Tensor):
                step_norm = step_norm * torch.stack(coef).float()
            else:
                step_norm = step_norm * constants.fill_vector([abs(c) for c in coef], torch.float32, dev)
            change = step_norm / (p_norm + 1e-3 * sq)
        zero = torch.zeros((), dtype=torch.float32, device=dev)
        intrinsic = torch.stack([
            (q.float().std() * (q.abs() >= 1e-6).float().mean()).float() if q.numel() > 1 else zero for q in pd
        ])
        rows = torch.stack([grad_term, change, intrinsic], dim=1)
        for p, row in zip(ps, rows.unbind(0)):
            feats[p] = row

    # ------------------------------------------------------------ hooks
    #: subclasses that override _extra_scale set this, so the base class skips the per-tensor calls
    _has_extra_scale = False

    def _extra_scale(self, p):
        """Optional 0-dim tensor multiplied into this parameter's lr (subclasses)."""
        return None

    def _wd_multipliers(self, ps, t: int, group: dict) -> list[float]:
        """Dynamic weight-decay multiplier per tensor (one value for all here; by type in subclasses)."""
        m = dynamic_multiplier(t, group["wd_transition_steps"], group["wd_decay_factor"], group["wd_min_ratio"])
        return [m] * len(ps)

    # ------------------------------------------------------------- importance
    def _refresh_importance(self, group, params, feats) -> None:
        """EMA of the mean-normalised contribution; partners share a score; bounded factor."""
        stats = [self.state[p] for p in params]
        F = torch.stack(feats)  # (n, 3)
        F = F / F.mean(dim=0, keepdim=True).clamp_min(_TINY)
        w = constants.constant(("importance_weights", F.dtype, F.device),
                               lambda: torch.tensor(_IMPORTANCE_WEIGHTS, dtype=F.dtype, device=F.device))
        contrib = F @ w
        imp = torch.stack([st["importance"] for st in stats])
        decay = group["importance_decay"]
        imp = imp * decay + contrib * (1.0 - decay)
        # partners (both refreshed now) share one score
        local = {p: i for i, p in enumerate(params)}
        ia, ib = [], []
        for p in params:
            role = self._roles.get(p)
            if role is not None and role[0] == "a" and role[1] in local:
                ia.append(local[p])
                ib.append(local[role[1]])
        if ia:
            ia_t = constants.index_vector(ia, imp.device)
            ib_t = constants.index_vector(ib, imp.device)
            mean = (imp[ia_t] + imp[ib_t]) * 0.5
            imp = imp.index_copy(0, ia_t, mean).index_copy(0, ib_t, mean)
        factor = (1.0 + group["adaptation_strength"] * (imp - 1.0)).clamp(_FACTOR_MIN, _FACTOR_MAX)
        ops.copy_([st["importance"] for st in stats], list(imp.unbind(0)))
        ops.copy_([st["lr_factor"] for st in stats], list(factor.unbind(0)))

    # ------------------------------------------------------------ diagnostics
    def _feature_flags(self) -> dict:
        d = self.defaults
        return {
            "spd": d["use_spd"],
            "cautious": d["use_cautious"],
            "orthogonal_grad": d["use_orthogonal_grad"],
            "adopt": d["use_adopt_stability"],
            "grams": d["use_grams"],
            "agr": d["use_agr"],
            "tam": d["use_tam"],
            "dynamic_adaptation": d["use_dynamic_adaptation"],
            "lr_mask": d["use_lr_mask"],
            "hypergrad": d["use_hypergrad"],
            "dynamic_weight_decay": d["dynamic_weight_decay"],
            "allora": d["allora_eta"] is not None,
            "lora_plus_ratio": d["lora_plus_ratio"],
        }

    def _global_step(self) -> int:
        return max((g.get("step_count", 0) for g in self.param_groups), default=0)

    def get_relationship_summary(self) -> dict:
        params = self._all_params()
        rels = []
        for pr in self._pairs:
            pa, pb = params[pr.a], params[pr.b]
            rels.append(
                {
                    "param_name": self._names.get(pa),
                    "partner_name": self._names.get(pb),
                    "param_index": pr.a,
                    "partner_index": pr.b,
                    "param_shape": tuple(pa.shape),
                    "partner_shape": tuple(pb.shape),
                    "compatibility": pr.compatibility,
                    "interaction_type": pr.kind,
                }
            )
        return {"total_relationships": len(rels), "method": self._pair_method, "relationships": rels}

    def get_importance_analysis(self) -> dict:
        params = self._all_params()
        scores = torch.tensor(
            [float(self.state[p]["importance"]) if "importance" in self.state.get(p, {}) else 1.0 for p in params]
        )
        mean = float(scores.mean()) if len(scores) else 0.0
        return {
            "total_parameters": len(params),
            "high_importance_params": int((scores > 1.5 * mean).sum()) if len(scores) else 0,
            "low_importance_params": int((scores < 0.5 * mean).sum()) if len(scores) else 0,
            "importance_statistics": {
                "mean": mean,
                "std": float(scores.std()) if len(scores) > 1 else 0.0,
                "max": float(scores.max()) if len(scores) else 0.0,
                "min": float(scores.min()) if len(scores) else 0.0,
            },
        }

    def get_lr_mask_analysis(self) -> dict:
        group_of = {p: g for g in self.param_groups for p in g["params"]}

        def mask_of(p, st):
            if "lr_mask_f8" in st:
                return quant8.load(st, "lr_mask").clamp_(*self._mask_range(group_of[p]))
            mask = st.get("lr_mask")
            return None if mask is None else mask.float()

        return self._lr_mask_statistics(mask_of, any(g["use_lr_mask"] for g in self.param_groups))

    def get_hypergrad_analysis(self) -> dict:
        """Statistics of the per-tensor hypergradient lr scales (computed now, never in step())."""
        scales = [st["lr_scale"] for st in self.state.values() if "lr_scale" in st]
        if not scales:
            return {"tensors": 0, "geometric_mean": 1.0, "min": 1.0, "max": 1.0}
        h = torch.stack([x.float().cpu() for x in scales])
        return {"tensors": len(scales), "geometric_mean": float(h.log().mean().exp()), "min": float(h.min()),
                "max": float(h.max())}

    def get_optimization_info(self) -> dict:
        imp = self.get_importance_analysis()
        lr_mask = self.get_lr_mask_analysis()
        d = self.defaults
        return {
            "optimizer": type(self).__name__,
            "version": __version__,
            "features": self._feature_flags(),
            "adaptation_config": {
                "adaptation_strength": d["adaptation_strength"],
                "relationship_discovery_interval": d["relationship_discovery_interval"],
                "importance_decay": d["importance_decay"],
                "compatibility_threshold": d["compatibility_threshold"],
            },
            "lr_mask_config": {
                "lr_mask_rate": d["lr_mask_rate"],
                "lr_mask_floor": d["lr_mask_floor"],
                "lr_mask_ceiling": d["lr_mask_ceiling"],
                "lr_bump": d["lr_bump"],
                "min_lr": d["min_lr"],
                "max_lr": d["max_lr"],
                "warmup_steps": d["warmup_steps"],
            },
            "hypergrad_config": {
                "use_hypergrad": d["use_hypergrad"],
                "hypergrad_rate": d["hypergrad_rate"],
                "hypergrad_floor": d["hypergrad_floor"],
                "hypergrad_ceiling": d["hypergrad_ceiling"],
            },
            "pairing_method": self._pair_method,
            "training_stats": {
                "global_step": self._global_step(),
                "total_relationships": len(self._pairs),
                "avg_importance_score": imp["importance_statistics"]["mean"],
                "lr_mask_stats": lr_mask["global_statistics"],
                "hypergrad_stats": self.get_hypergrad_analysis(),
                "nonfinite_skipped": self.nonfinite_skipped(),
            },
            "buffer_pool": self.get_buffer_pool_stats(),
        }

    def diagnostics_scalars(self) -> dict:
        """Flat scalars for loggers (TensorBoard): computed on request, never in step()."""
        info = self.get_optimization_info()
        ts = info["training_stats"]
        return {
            "optimizer/lr_mask_mean": ts["lr_mask_stats"]["avg_lr_scale"],
            "optimizer/lr_scale_geomean": ts["hypergrad_stats"]["geometric_mean"],
            "optimizer/importance_mean": ts["avg_importance_score"],
            "optimizer/relationships": float(ts["total_relationships"]),
            "optimizer/nonfinite_skipped": float(ts["nonfinite_skipped"]),
        }


class _AdamChunk:
    """One chunk's tensors, state and scratch, and what each stage of a step hands to the next."""

    def __init__(self, ps, group, feats, pool, sts):
        self.ps, self.group, self.feats, self.pool, self.sts = ps, group, feats, pool, sts
        self.ok = self.okf = self.oks = self.keep1 = self.keep2 = None  # the non-finite gate, when on
        self.agree = self.moving_away = self.old_norms = self.step_coef = None
        self.initialising = False  # ADOPT's first call: v is initialised, nothing moves
