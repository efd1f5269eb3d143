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

import math

import torch

from . import __version__
from . import quant8
from .engine import HinaOptimizer
from .params import classify, discover_pairs, is_adapter_role
from .techniques import adam, adopt, allora, tam
from .techniques import spd as spd_t
from .techniques.agr import agr
from .techniques.cautious import cautious_
from .techniques.grams import grams_, grams_cautious_
from .techniques.lr_mask import bump_, storage_dtype
from .techniques.orthograd import orthograd_
from .techniques.weight_decay import dynamic_multiplier
from .validation import check_betas, check_bool, check_choice, check_eps, check_int, check_lr, check_real

__all__ = ["AdaptiveHinaAdamW"]

_IMPORTANCE_WEIGHTS = (0.4, 0.3, 0.3)  # gradient, change rate, intrinsic
_FACTOR_MIN, _FACTOR_MAX = 0.5, 2.0
_TINY = 1e-30


def _spd_project_batch(batch, lam: float) -> None:
    """SPD projection with anchor zero for many tensors at once: the per-tensor scalars are
    computed as one vector, so the cost per tensor is one norm and one multiply."""
    params, dots, old_norms = batch
    new_norms = torch.stack(torch._foreach_norm(params)).float()
    old = torch.stack(old_norms).float()
    moving_away = torch.stack(dots) > 0  # -<g, theta - 0> < 0
    r = (1.0 - old / new_norms.clamp_min(spd_t.EPS)).clamp_(0.0, 1.0)
    keep = 1.0 - r * moving_away.to(r.dtype) * lam
    torch._foreach_mul_(params, list(keep.to(params[0].dtype).unbind(0)))


class AdaptiveHinaAdamW(HinaOptimizer):
    """AdamW with AGR, OrthoGrad, ADOPT, TAM, Grams, Cautious, per-element lr masks, SPD,
    dynamic weight decay, importance-based adaptation and adapter-pair discovery.

    See docs/optimizers.md for every argument; defaults follow seed 000's example.
    """

    _shaped_state_keys = ("exp_avg", "exp_avg_sq", "lr_mask", "anchor", "exp_avg_q8", "exp_avg_sq_root_q8", "lr_mask_lq")

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
        use_grams: bool = True,
        use_agr: bool = True,
        use_tam: bool = True,
        tam_beta: float = 0.999,
        use_dynamic_adaptation: bool = True,
        adaptation_strength: float = 1.0,
        relationship_discovery_interval: int = 100,
        importance_decay: float = 0.95,
        compatibility_threshold: float = 0.3,
        use_lr_mask: bool = True,
        lr_bump: float = 3e-6,
        min_lr: float = 1e-7,
        max_lr: float = 1e-3,
        warmup_steps: int = 500,
        lr_mask_post_warmup_ratio: float = 0.1,
        dynamic_weight_decay: bool = True,
        wd_transition_steps: int = 1000,
        wd_decay_factor: float = 0.7,
        wd_min_ratio: float = 0.1,
        lora_plus_ratio: float = 1.0,
        allora_eta: float | None = None,
        spd_anchor: str = "auto",
        optim_bits: int = 32,
        param_names=None,
    ):
        lr = check_lr("lr", lr)
        betas = check_betas("betas", betas)
        eps = check_eps("eps", eps)
        weight_decay = check_real("weight_decay", weight_decay, lo=0.0)
        min_lr = check_lr("min_lr", min_lr)
        max_lr = check_lr("max_lr", max_lr, allow_zero=False)
        if min_lr > max_lr:
            raise ValueError(f"min_lr ({min_lr}) must be <= max_lr ({max_lr})")
        optim_bits = check_int("optim_bits", optim_bits)
        check_choice("optim_bits", optim_bits, {8, 32})
        allora_eta = check_real("allora_eta", allora_eta, lo=0.0, lo_open=True, allow_none=True)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            use_spd=check_bool("use_spd", use_spd),
            spd_lambda=check_real("spd_lambda", spd_lambda, lo=0.0, hi=1.0),
            use_cautious=check_bool("use_cautious", use_cautious),
            use_orthogonal_grad=check_bool("use_orthogonal_grad", use_orthogonal_grad),
            use_adopt_stability=check_bool("use_adopt_stability", use_adopt_stability),
            use_grams=check_bool("use_grams", use_grams),
            use_agr=check_bool("use_agr", use_agr),
            use_tam=check_bool("use_tam", use_tam),
            tam_beta=check_real("tam_beta", tam_beta, lo=0.0, hi=1.0, hi_open=True),
            use_dynamic_adaptation=check_bool("use_dynamic_adaptation", use_dynamic_adaptation),
            adaptation_strength=check_real("adaptation_strength", adaptation_strength, lo=0.0, hi=10.0),
            relationship_discovery_interval=check_int(
                "relationship_discovery_interval", relationship_discovery_interval, lo=1
            ),
            importance_decay=check_real("importance_decay", importance_decay, lo=0.0, hi=1.0, hi_open=True),
            compatibility_threshold=check_real("compatibility_threshold", compatibility_threshold, lo=0.0, hi=1.0),
            use_lr_mask=check_bool("use_lr_mask", use_lr_mask),
            lr_bump=check_real("lr_bump", lr_bump, lo=0.0),
            min_lr=min_lr,
            max_lr=max_lr,
            warmup_steps=check_int("warmup_steps", warmup_steps, lo=0),
            lr_mask_post_warmup_ratio=check_real("lr_mask_post_warmup_ratio", lr_mask_post_warmup_ratio, lo=0.0, hi=1.0),
            dynamic_weight_decay=check_bool("dynamic_weight_decay", dynamic_weight_decay),
            wd_transition_steps=check_int("wd_transition_steps", wd_transition_steps, lo=1),
            wd_decay_factor=check_real("wd_decay_factor", wd_decay_factor, lo=0.0, hi=1.0),
            wd_min_ratio=check_real("wd_min_ratio", wd_min_ratio, lo=0.0, hi=1.0),
            lora_plus_ratio=check_real("lora_plus_ratio", lora_plus_ratio, lo=0.0, lo_open=True),
            allora_eta=allora_eta,
            spd_anchor=check_choice("spd_anchor", spd_anchor, {"auto", "zero", "init"}),
            optim_bits=optim_bits,
        )
        self._pairs = None
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

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _on_layout_changed(self) -> None:
        super()._on_layout_changed()
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
            base = group["base_lr"]
            lo, hi = group["min_lr"] / base, group["max_lr"] / base
            start = min(max(1.0, lo), hi)
            if q8 and lo > 0 and hi > lo:  # log-domain 8-bit codes: min_lr never flushes to 0
                full = torch.full(p.shape, start, dtype=torch.float32, device=p.device)
                quant8.store_log(st, "lr_mask", full, lo=lo, hi=hi, bits=8, seed=quant8.mix_seed(self.param_index(p), 0))
            else:
                dt = storage_dtype(group["lr_bump"], base, group["min_lr"], group["max_lr"])
                st["lr_mask"] = torch.full_like(p, start, dtype=dt, memory_format=torch.preserve_format)
        if group["use_tam"]:
            st["tam_s"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if group["use_dynamic_adaptation"]:
            st["importance"] = torch.ones((), dtype=torch.float32, device=p.device)
            st["lr_factor"] = torch.ones((), dtype=torch.float32, device=p.device)
        if group["use_spd"] and self._spd_anchor_needed(p, group):
            st["anchor"] = p.detach().clone()
        self._write_pair_state(p, st)
        # reserve this shape's scratch buffers now, so no later step allocates any
        for slot in self._scratch_slots(p, group, "lr_mask" in st or "lr_mask_lq" in st):
            self._buffer_pool.get(p, slot)

    @staticmethod
    def _scratch_slots(p, group, has_mask) -> set:
        fp32 = p.dtype == torch.float32
        slots = {1}
        if group["use_agr"] or group["use_orthogonal_grad"] or not fp32:
            slots.add(0)
        if group["use_agr"] or group["use_spd"] or group["use_cautious"] or group["use_grams"] or has_mask:
            slots.add(2)
        if has_mask:
            slots.add(3)
        if group["use_grams"] and group["use_cautious"]:
            slots.add(4)
        if not fp32:
            slots.add(5)
        if group["optim_bits"] == 8:
            slots.update((6, 7, 8) if has_mask else (6, 7))
        return slots

    def _spd_anchor_needed(self, p, group) -> bool:
        mode = group["spd_anchor"]
        if mode == "zero":
            return False
        if mode == "init":
            return True
        return p not in self._adapters

    # ------------------------------------------------------------------- step
    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        refresh = group["use_dynamic_adaptation"] and group["step_count"] % group["relationship_discovery_interval"] == 0
        feats = [] if refresh else None
        for p in params:
            st = self.state[p]
            if "step" not in st:
                self._init_state(p, st, group)
        # per-tensor reductions that need no earlier result, one multi-tensor call each
        grads = [p.grad for p in params]
        agr_totals = None
        if group["use_agr"]:
            agr_totals = [t.float().clamp_min_(1e-30) for t in torch._foreach_norm(grads, 1)]
        spd_batch = p_norms = None
        if group["use_spd"] and group["spd_lambda"] > 0:
            spd_batch = ([], [], [])  # params, <g, p>, ||p|| before the step
            p_norms = torch._foreach_norm(params)
        m_norms = None
        if group["use_tam"] and group["optim_bits"] == 32:
            m_norms = torch._foreach_norm([self.state[p]["exp_avg"] for p in params])
        for i, p in enumerate(params):
            f = self._update(p, self.state[p], group, want_features=refresh,
                             agr_total=None if agr_totals is None else agr_totals[i], spd_batch=spd_batch,
                             p_norm=None if p_norms is None else p_norms[i],
                             m_norm=None if m_norms is None else m_norms[i])
            if refresh:
                feats.append(f)
        if spd_batch is not None and spd_batch[0]:
            _spd_project_batch(spd_batch, group["spd_lambda"])
        if refresh:
            self._discover()
            self._refresh_importance(group, params, feats)

    def _update(self, p: torch.Tensor, st: dict, group: dict, want_features: bool = False, agr_total=None,
                spd_batch=None, p_norm=None, m_norm=None):
        pool = self._buffer_pool
        k = st["step"]
        t = k + 1
        st["step"] = t
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        lr = group["lr"]
        use_adopt = group["use_adopt_stability"]
        q8 = "exp_avg_q8" in st
        if q8:  # dequantise into pooled fp32 buffers; requantised in _commit
            m = quant8.load(st, "exp_avg", out=pool.get(p, 6))
            v = quant8.load(st, "exp_avg_sq_root", out=pool.get(p, 7)).square_()
            mask = quant8.load_log(st, "lr_mask", out=pool.get(p, 8)) if "lr_mask_lq" in st else st.get("lr_mask")
        else:
            m, v = st["exp_avg"], st["exp_avg_sq"]
            mask = st.get("lr_mask")
        anchor = st.get("anchor")

        # 1. fp32 view of the gradient; transforms write into a pooled buffer, never into p.grad
        grad = p.grad
        g = grad if grad.dtype == torch.float32 else pool.get(p, 0).copy_(grad)
        if group["use_agr"] and p.numel() > 1:
            g = agr(g, out=pool.get(p, 0), tmp=pool.get(p, 2), total=agr_total)  # sum |g| from the group pass
        if group["use_orthogonal_grad"] and p.ndim >= 1 and p.numel() > 1:
            if g is grad:
                g = pool.get(p, 0).copy_(grad)
            orthograd_(g, p)

        # work on an fp32 master view of the parameter
        p32 = p if p.dtype == torch.float32 else pool.get(p, 5).copy_(p)

        # SPD quantities before the step (raw gradient, pre-step weights)
        spd_batched = spd_batch is not None and anchor is None and p32 is p and p_norm is not None
        if spd_batched:
            spd_dot = spd_t.dot_raw(p, grad)
        elif group["use_spd"]:
            moving_away, old_norm = spd_t.pre_step(p32, grad, anchor, pool.get(p, 2))

        # polarity of the previous update direction (= sign of the momentum)
        sign_prev = torch.sign(m, out=pool.get(p, 3)) if mask is not None else None

        # 2-3. second moment and momentum
        u = pool.get(p, 1)
        if use_adopt:
            x = adopt.normalize(g, v, k, eps, out=u)
            n_cos = k - 1  # cosines available: the momentum is non-zero from k = 2 on
        else:
            x = g
            n_cos = k
        if group["use_tam"] and n_cos >= 1:
            cos = tam.cosine(m, x) if m_norm is None else tam.cosine_with_norm(m, x, m_norm)
            d = tam.damping(st["tam_s"], cos, n_cos, group["tam_beta"])
            tam.momentum_(m, x, d, beta1)
        else:
            m.lerp_(x, 1.0 - beta1)
        if use_adopt:
            adopt.update_second_moment_(v, g, k, beta2)
            if k == 0:  # ADOPT's first call only initialises v
                if p32 is not p:
                    p.copy_(p32)
                if q8:
                    self._commit(p, st, m, v, mask, t)
                return self._features(p, st, m, u, 0.0) if want_features else None
            u.copy_(m)
            step_scale = 1.0
        else:
            adam.update_second_moment_(v, g, beta2)
            adam.direction(m, v, t, beta2, eps, out=u)
            step_scale = 1.0 / (1.0 - beta1**t)

        # 4. lr mask: +bump where consecutive directions agree, -bump where they flip
        if mask is not None:
            sign_prev.mul_(m).sign_()
            base = group["base_lr"]
            bump = group["lr_bump"] / base
            if t > group["warmup_steps"]:
                bump *= group["lr_mask_post_warmup_ratio"]
            if bump > 0:
                bump_(mask, sign_prev, bump, group["min_lr"] / base, group["max_lr"] / base)

        # 5. direction rule
        if group["use_grams"] and group["use_cautious"]:
            grams_cautious_(u, g, pool.get(p, 2), pool.get(p, 4))
        elif group["use_grams"]:
            grams_(u, g, pool.get(p, 2))
        elif group["use_cautious"]:
            cautious_(u, g, pool.get(p, 2))

        # 6. per-element learning rate: lr * step_scale * ratio * [mask] * [row scale] * [factor]
        if group["allora_eta"] is not None and p in self._row_scaled and p.ndim >= 1:
            u.mul_(allora.row_scale(p32, group["allora_eta"]))
        ratio = self._ratio.get(p, 1.0)
        factor = st.get("lr_factor")
        extra = self._extra_scale(p)
        if extra is not None:
            factor = extra if factor is None else factor * extra
        scale = lr * step_scale * ratio

        # 7-8. decoupled (dynamic) weight decay with the same per-element lr, then the step
        wd = group["weight_decay"]
        if group["dynamic_weight_decay"]:
            wd *= self._wd_multiplier(p, t, group)
        c = lr * ratio * wd
        if mask is not None:
            # p <- p - mask * factor * (scale * u + c * p): decay and step in one pass
            u.mul_(scale)
            if c > 0:
                u.add_(p32, alpha=c)
            u.mul_(mask)
            if factor is not None:
                p32.addcmul_(u, factor, value=-1.0)
            else:
                p32.sub_(u)
            scale = 1.0  # u now holds the whole per-element step (for the features)
        else:
            if c > 0:
                p32.mul_(1.0 - c * factor) if factor is not None else p32.mul_(1.0 - c)
            if factor is not None:
                p32.addcmul_(u, factor, value=-scale)
            else:
                p32.add_(u, alpha=-scale)

        # 9. SPD projection toward the anchor (batched over the group for fp32 adapter weights)
        if group["use_spd"] and group["spd_lambda"] > 0:
            if spd_batched:
                spd_batch[0].append(p)
                spd_batch[1].append(spd_dot)
                spd_batch[2].append(p_norm)
            else:
                spd_t.project_(p32, anchor, moving_away, old_norm, group["spd_lambda"], pool.get(p, 2))

        if p32 is not p:
            p.copy_(p32)
        if q8:
            self._commit(p, st, m, v, mask, t)
        if want_features:
            return self._features(p, st, m, u, scale)
        return None

    def _commit(self, p, st, m, v, mask, t: int) -> None:
        """Requantise the 8-bit state (stochastic rounding, seeded by parameter index and step)."""
        seed = quant8.mix_seed(self.param_index(p), t)
        quant8.store(st, "exp_avg", m, signed=True, seed=seed)
        quant8.store(st, "exp_avg_sq_root", v.sqrt_(), signed=False, seed=seed)
        if "lr_mask_lq" in st:
            lo, hi = st["lr_mask_lrange"]
            quant8.store_log(st, "lr_mask", mask, lo=lo, hi=hi, bits=8, seed=seed)

    # ------------------------------------------------------------ hooks
    def _extra_scale(self, p):
        """Optional 0-dim tensor multiplied into this parameter's lr (subclasses)."""
        return None

    def _wd_multiplier(self, p, t: int, group: dict) -> float:
        return dynamic_multiplier(t, group["wd_transition_steps"], group["wd_decay_factor"], group["wd_min_ratio"])

    # ------------------------------------------------------------- importance
    @staticmethod
    def _features(p, st, m, u, scale):
        """(gradient term, change rate, intrinsic term) as a 3-vector, on device."""
        n = max(p.numel(), 1)
        pf = p.detach().reshape(-1).float()
        p_norm = torch.linalg.vector_norm(pf)
        grad_term = torch.linalg.vector_norm(m.reshape(-1)) / math.sqrt(n)
        factor = st.get("lr_factor")
        step_norm = torch.linalg.vector_norm(u.reshape(-1)) * abs(scale)
        if factor is not None:
            step_norm = step_norm * factor
        change = step_norm / (p_norm + 1e-3 * math.sqrt(n))
        if n > 1:
            dense = (pf.abs() >= 1e-6).float().mean()
            intrinsic = pf.std() * dense
        else:
            intrinsic = torch.zeros((), device=p.device)
        return torch.stack([grad_term, change, intrinsic.to(grad_term.dtype)])

    def _refresh_importance(self, group, params, feats) -> None:
        """EMA of the mean-normalised contribution; partners share a score; bounded factor."""
        stats = [self.state[p] for p in params]
        F = torch.stack(feats)  # (n, 3)
        F = F / F.mean(dim=0, keepdim=True).clamp_min(_TINY)
        w = torch.tensor(_IMPORTANCE_WEIGHTS, dtype=F.dtype, device=F.device)
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
            ia_t = torch.tensor(ia, device=imp.device)
            ib_t = torch.tensor(ib, device=imp.device)
            mean = (imp[ia_t] + imp[ib_t]) * 0.5
            imp = imp.index_copy(0, ia_t, mean).index_copy(0, ib_t, mean)
        factor = (1.0 + group["adaptation_strength"] * (imp - 1.0)).clamp(_FACTOR_MIN, _FACTOR_MAX)
        torch._foreach_copy_([st["importance"] for st in stats], list(imp.unbind(0)))
        torch._foreach_copy_([st["lr_factor"] for st in stats], list(factor.unbind(0)))

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
        def mask_of(p, st):
            if "lr_mask_lq" in st:
                return quant8.load_log(st, "lr_mask")
            mask = st.get("lr_mask")
            return None if mask is None else mask.float()

        return self._lr_mask_statistics(mask_of, any(g["use_lr_mask"] for g in self.param_groups))

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
                "lr_bump": d["lr_bump"],
                "min_lr": d["min_lr"],
                "max_lr": d["max_lr"],
                "warmup_steps": d["warmup_steps"],
            },
            "pairing_method": self._pair_method,
            "training_stats": {
                "global_step": self._global_step(),
                "total_relationships": len(self._pairs),
                "avg_importance_score": imp["importance_statistics"]["mean"],
                "lr_mask_stats": lr_mask["global_statistics"],
            },
            "buffer_pool": self.get_buffer_pool_stats(),
        }

    def diagnostics_scalars(self) -> dict:
        """Flat scalars for loggers (TensorBoard): computed on request, never in step()."""
        info = self.get_optimization_info()
        ts = info["training_stats"]
        return {
            "optimizer/lr_mask_mean": ts["lr_mask_stats"]["avg_lr_scale"],
            "optimizer/importance_mean": ts["avg_importance_score"],
            "optimizer/relationships": float(ts["total_relationships"]),
        }
