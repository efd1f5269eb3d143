"""The Automagic_CameAMP family (seed 003): CAME with the Automagic lr mask and friends.

Four presets share one update, written once (:class:`Automagic_CameAMP`):

- ``Automagic_CameAMP``            fp32 state;
- ``Automagic_CameAMP8bit``        element-sized state in the blockwise 8-bit store;
- ``Automagic_CameAMP_COptim``     + Cautious mask, multi-scale momentum and the context-aware
                                   lr multiplier (spike / plateau / stagnation detection);
- ``Automagic_CameAMP_COptim8bit`` both.

One step, per tensor (spec/algorithms.md section 17 order; t = this tensor's step, W = warmup_steps):

 0. a tensor whose gradient holds NaN or inf is skipped, it and its state left bit-identical
    (``skip_nonfinite=True``, techniques/nonfinite.py; no host sync).
 1. gradient (fp32 copy, ``p.grad`` is never modified): AGR per tensor (section 7; skipped
    for single elements); OrthoGrad while ``2t <= W`` (section 8, parallel-guarded).
 2. CAME second moment (techniques/came.py): factored row/column EMAs on the matrix view
    ``(out, in*k*k)`` for ndim >= 2, a full EMA for vectors; ``u = g / sqrt(V^)``, RMS clip.
 3. momentum of u: TAM while ``2t <= W`` (scalar cosine damping of the incoming u, section
    6), then momentum decay ("consistency momentum", arXiv 2404.07946):
    ``b_k = max(b1 * beta1_decay^k, beta1_min)``; both are EMAs, so the step scale does not
    jump at the switch. [COptim: a slow EMA mixed in, AdEMAMix style.]
 4. CAME confidence: ``s = m / sqrt(U^)``, U = (u - m)^2 + eps2 factored; vectors use the
    same residual kept elementwise (the AdaBelief residual, techniques/adabelief.py) unless
    ``use_adabelief=False`` (then s = m, as official CAME).
 5. direction: Grams blend ``a sign(g)|s| + (1 - a) s`` with ``a = beta1_decay^t``
    (Grams early, plain CAME later). [COptim: the (1 - a) part is Cautious-masked,
    ``s phi / max(mean(phi), 1e-3)``, phi = 1[s g > 0].]
 6. per-element lr ``group['lr'] * mask``: the Automagic mask is a *scale* relative to the
    lr the group was built with (``base_lr``), starts at exactly 1 (the effective lr at step
    1 is the requested lr: no doubled start) and, while ``t <= W``, moves by
    ``+-lr_bump / base_lr`` where the new gradient agrees / disagrees in sign with the
    previous momentum (0 at step 1: no polarity artefact), clamped to
    ``[min_lr, max_lr] / base_lr``. After warmup it is frozen and, being a scale, follows
    any lr scheduler. ALLoRA row factor ``1 / sqrt(1 + eta^2 ||row||^2)`` from the current
    rows of LoRA factors (found by name, else by shape; off with ``full_finetune``).
    [COptim: times the context multiplier M in ``lr_multiplier_bounds``.]
 7. decoupled adaptive weight decay (AdaDecay, arXiv 1907.08931): ``p <- p (1 - lr_i wd
    theta_i)``, theta = 2 sigmoid(alpha z(|g|)) per element, at every step.
 8. ``p <- p - lr_i s``.

Early CAME steps. Official CAME has no bias correction: its first step moves every matrix
element by about 11.1 lr (8 lr at this family's betas) while vectors move 0.1 lr. With
``came_bias_correction=True`` (default) the second moment and the confidence are bias
corrected (techniques/came.py), so the first move is ``(1 - b1)/b1`` lr on matrices and
``(1 - b1)`` lr on vectors, ramping up as the momentum fills; tests pin both behaviours.

Defaults follow the lineage's last configuration (origin.md 5.1): lr=1e-6, min_lr=1e-7,
max_lr=1e-3, lr_bump=3e-6, betas=(0.8, 0.99, 0.999), eps=(1e-30, 1e-16), eta=2.0,
beta1_decay=0.9995, weight_decay=5e-4, warmup_steps=500. Deviations (see docs): lr must lie
in [min_lr, max_lr] (it is the mask's start, not silently clamped); AGR per tensor, not per
group; ALLoRA from current norms, relative (1 for a zero row), not frozen at init; adaptive
weight decay per element and for the whole run; TAM with a scalar cosine; no step-1
"continue"; no ``torch.cuda.synchronize()``; the unused third eps is dropped.

8-bit presets: ``exp_avg`` (and ``exp_avg_slow``) in the signed blockwise store, the lr mask
in the 8-bit log codec, and for vectors sqrt of the second moment / residual in the unsigned
store (sqrt halves the dynamic range, so nothing is flushed to zero), all with stochastic
rounding seeded by ``quant8.mix_seed(seed, step, param_index)``: resume is bit-exact.
Factored CAME statistics stay fp32. Tensors with fewer than ``min_8bit_size`` elements keep
fp32 state (default 0: every tensor is quantised, so small LoRA/LoKr factors save memory
too; 4096 reproduces bitsandbytes' rule).

All state lives in ``self.state[p]`` (COptim's context, a few scalars and a loss window per
group, lives in the param group); ``step()`` never reads a tensor back to the host, except
``verbose=True`` logging every ``verbose_interval`` steps (off by default).
"""
from __future__ import annotations

import inspect
import logging
import math

import torch

from . import __version__, quant8
from .engine import HinaOptimizer
from .params import classify, discover_pairs, is_adapter_role
from .techniques import adaptive_wd, ademamix, allora, came, context, lr_mask, momentum_decay, nonfinite, tam
from .techniques.agr import agr
from .techniques.cautious import cautious_
from .techniques.grams import grams_
from .techniques.orthograd import orthograd_
from .validation import check_betas, check_bool, check_int, check_lr, check_lr_bounds, check_real

__all__ = [
    "Automagic_CameAMP",
    "Automagic_CameAMP8bit",
    "Automagic_CameAMP_COptim",
    "Automagic_CameAMP_COptim8bit",
]

logger = logging.getLogger(__name__)

_BASE_DEFAULTS = dict(
    lr=1e-3,
    lr_mask_rate=0.02,
    lr_mask_floor=0.1,
    lr_mask_ceiling=10.0,
    lr_bump=None,
    min_lr=None,
    max_lr=None,
    eps=(1e-30, 1e-16),
    clip_threshold=1.0,
    betas=(0.9, 0.999, 0.9999),
    eta=None,
    beta1_decay=0.9995,
    beta1_min=0.4,
    weight_decay=5e-4,
    warmup_steps=500,
    full_finetune=False,
    came_bias_correction=False,
    use_agr=True,
    use_orthograd=None,
    use_tam=False,
    tam_beta=0.9,
    use_grams=False,
    use_adabelief=True,
    use_lr_mask=True,
    adaptive_weight_decay=True,
    adadecay_alpha=4.0,
    skip_nonfinite=True,
    verbose=False,
    verbose_interval=50,
)
_EIGHT_BIT_DEFAULTS = dict(seed=0, min_8bit_size=0)
_COPTIM_DEFAULTS = dict(use_cautious=True, slow_beta=0.99, slow_alpha=1.0, **context.DEFAULTS)


def _validate(cfg: dict, keys) -> dict:
    """Check every known key present in ``cfg``; returns a normalised copy (one-line ValueErrors)."""
    out = dict(cfg)
    real = {
        "clip_threshold": dict(lo=0.0, lo_open=True),
        "weight_decay": dict(lo=0.0),
        "adadecay_alpha": dict(lo=0.0),
        "lr_bump": dict(lo=0.0, allow_none=True),
        "lr_mask_rate": dict(lo=0.0, hi=1.0),
        "lr_mask_floor": dict(lo=0.0, lo_open=True, hi=1.0),
        "lr_mask_ceiling": dict(lo=1.0, hi=1e4),
        "beta1_decay": dict(lo=0.0, lo_open=True, hi=1.0),
        "beta1_min": dict(lo=0.0, hi=1.0, hi_open=True),
        "tam_beta": dict(lo=0.0, hi=1.0, hi_open=True),
        "slow_beta": dict(lo=0.0, hi=1.0, hi_open=True),
        "slow_alpha": dict(lo=0.0),
        "adaptation_rate": dict(lo=0.0, lo_open=True, hi=1.0),
        "spike_threshold": dict(lo=0.0, lo_open=True),
        "spike_factor": dict(lo=0.0, lo_open=True, hi=1.0),
        "plateau_threshold": dict(lo=-1.0, hi=1.0),
        "plateau_consistency": dict(lo=-1.0, hi=1.0),
        "stagnation_boost": dict(lo=1.0),
        "consistency_gain": dict(lo=0.0),
        "consistency_ref": dict(lo=-1.0, hi=1.0),
    }
    ints = {"warmup_steps": 0, "verbose_interval": 1, "seed": 0, "min_8bit_size": 0, "context_window": 4,
            "stagnation_steps": 1}
    bools = ("full_finetune", "came_bias_correction", "use_agr", "use_tam", "use_grams",
             "use_adabelief", "use_lr_mask", "adaptive_weight_decay", "verbose", "use_cautious", "skip_nonfinite")
    for k in keys:
        if k not in out:
            continue
        v = out[k]
        if k in real:
            out[k] = check_real(k, v, **real[k])
        elif k in ints:
            out[k] = check_int(k, v, lo=ints[k])
        elif k in bools:
            out[k] = check_bool(k, v)
        elif k == "use_orthograd":  # None: automatic (never on adapter factors)
            out[k] = None if v is None else check_bool(k, v)
        elif k == "eta":
            out[k] = check_real(k, v, lo=0.0, lo_open=True, allow_none=True)
        elif k == "betas":
            out[k] = check_betas(k, v, n=3)
        elif k == "eps":
            # (eps1, eps2); the lineage's 3-tuple is accepted, its unused third value dropped
            if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) not in (2, 3):
                raise ValueError(f"eps must be a pair (eps1, eps2) of positive numbers, got {v!r}")
            out[k] = tuple(check_real(f"eps[{i}]", e, lo=0.0, lo_open=True) for i, e in enumerate(v[:2]))
        elif k == "lr_multiplier_bounds":
            if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != 2:
                raise ValueError(f"lr_multiplier_bounds must be a pair (lo, hi) with 0 < lo <= 1 <= hi, got {v!r}")
            lo = check_real("lr_multiplier_bounds[0]", v[0], lo=0.0, lo_open=True, hi=1.0)
            hi = check_real("lr_multiplier_bounds[1]", v[1], lo=1.0, hi=1e3)
            out[k] = (lo, hi)
        elif k == "lr":
            out[k] = check_lr(k, v)
    if "min_lr" in out or "max_lr" in out:
        out["min_lr"], out["max_lr"] = check_lr_bounds(out.get("min_lr"), out.get("max_lr"))
    return out


def _mask_codec_range(lo: float, hi: float, start: float, bits: int = 8) -> tuple[float, float]:
    """Log-codec range covering [lo, hi] with ``start`` exactly on a level (so the 8-bit mask
    starts at exactly the requested lr): keep lo, widen hi until start is a level."""
    if hi <= lo:
        return lo, lo * 1.0001 + 1e-30
    if start <= lo or start >= hi:
        return lo, hi
    levels = (1 << bits) - 1
    frac = (math.log(start) - math.log(lo)) / (math.log(hi) - math.log(lo))
    c0 = max(1, math.floor(frac * levels))
    step = (math.log(start) - math.log(lo)) / c0
    return lo, math.exp(math.log(lo) + levels * step)


# element-sized fp32 state whose update the non-finite gate keeps exact (techniques/nonfinite.py)
_GATED = ("exp_avg", "exp_avg_slow", "lr_mask")


class Automagic_CameAMP(HinaOptimizer):
    """CAME + Automagic lr mask + AGR, TAM / momentum decay, Grams, OrthoGrad, ALLoRA, AdaDecay.

    See the module docstring for the update. Keyword arguments (defaults): lr=1e-6, min_lr=1e-7, max_lr=1e-3, lr_bump=3e-6, eps=(1e-30, 1e-16),
    clip_threshold=1.0, betas=(0.8, 0.99, 0.999), eta=2.0 (ALLoRA; None disables),
    beta1_decay=0.9995, beta1_min=0.4, weight_decay=5e-4, warmup_steps=500,
    full_finetune=False, came_bias_correction=True, use_agr, use_orthograd, use_tam,
    tam_beta=0.9, use_grams, use_adabelief, use_lr_mask, adaptive_weight_decay (all True),
    adadecay_alpha=4.0, verbose=False, verbose_interval=50; ``param_names`` as the engine.
    """

    _DEFAULTS: dict = _BASE_DEFAULTS
    _eight_bit = False
    _coptim = False
    _shaped_state_keys = ("exp_avg", "exp_avg_f8", "exp_avg_slow", "exp_avg_slow_f8", "lr_mask", "lr_mask_lq",
                          "came_v", "came_res", "came_rms_f8", "came_res_rms_f8")

    def _construct(self, params, param_names=None, **kwargs):
        name = type(self).__name__
        unknown = [k for k in kwargs if k not in self._DEFAULTS]
        if unknown:
            import difflib

            hint = difflib.get_close_matches(unknown[0], list(self._DEFAULTS), n=1)
            hint = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"unknown argument {unknown[0]!r} for {name}{hint}")
        defaults = _validate({**self._DEFAULTS, **kwargs}, self._DEFAULTS)
        self._row_scaled = self._adapters = None
        super().__init__(params, defaults, param_names=param_names)
        for group in self.param_groups:
            self._check_group(group)

    # ------------------------------------------------------------------ setup
    def _check_group(self, group: dict) -> None:
        checked = _validate(group, self._DEFAULTS)
        for k in self._DEFAULTS:
            if k in checked:
                group[k] = checked[k]
        group.setdefault("base_lr", group["lr"])
        if self._coptim and "context" not in group:
            group["context"] = context.init(group["context_window"], group["params"][0].device)
        if self._eight_bit:
            self._warm_codecs(group)

    def _warm_codecs(self, group: dict) -> None:
        """Build quant8's lookup tables now (they are built lazily, with host reads, on first
        use), for every device of this group, so that step() never builds one."""
        for dev in {p.device for p in group["params"]}:
            x = torch.ones(2, device=dev)
            quant8.prepare_float8(dev)
            if group["use_lr_mask"]:
                clo, chi = _mask_codec_range(*self._mask_bounds(group), 1.0)
                codes = quant8.quantize_log(x, clo, chi, bits=8, rounding="stochastic", seed=0)
                quant8.dequantize_log(codes, clo, chi)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _on_layout_changed(self) -> None:
        super()._on_layout_changed()
        self._row_scaled = self._adapters = None

    def _discover_adapters(self) -> None:
        """Adapter pairs (by name, else by shape and order): the ALLoRA rows; plus every tensor with
        an adapter role in its name (LoRA, LoKr, LoHa factors): the adapter factors."""
        params = self._all_params()
        names = [self._names.get(p) for p in params]
        group_ids = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        pairs, _ = discover_pairs(params, names, group_ids)
        self._row_scaled = {params[i] for pr in pairs for i in (pr.a, pr.b)}
        self._adapters = self._row_scaled | {p for p, n in zip(params, names) if is_adapter_role(classify(n)[1])}

    def _row_scaled_set(self) -> set:
        """LoRA factors (by name, else by shape and order) that get ALLoRA row scaling."""
        if self._row_scaled is None:
            self._discover_adapters()
        return self._row_scaled

    def _orthograd_on(self, p, group) -> bool:
        """OrthoGrad for this tensor? ``use_orthograd=None`` (default): every tensor except adapter
        factors (LoRA, LoKr, LoHa: named, or paired by shape), whose zero-initialised side needs
        exactly the radial component OrthoGrad removes; True: every tensor; False: none."""
        mode = group["use_orthograd"]
        if mode is None:
            if self._adapters is None:
                self._discover_adapters()
            return p not in self._adapters
        return mode

    @staticmethod
    def _mask_bounds(group: dict) -> tuple[float, float]:
        """Range of the lr-mask scale (techniques/lr_mask.py), always containing 1."""
        return lr_mask.group_bounds(group)

    def _init_state(self, p: torch.Tensor, st: dict, group: dict) -> None:
        st["step"] = 0
        dev = p.device
        eight = self._eight_bit and p.numel() >= group["min_8bit_size"]
        if eight:
            quant8.store_zeros(st, "exp_avg", p.shape, signed=True, device=dev)
        else:
            st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=dev)
        if self._coptim:
            if eight:
                quant8.store_zeros(st, "exp_avg_slow", p.shape, signed=True, device=dev)
            else:
                st["exp_avg_slow"] = torch.zeros(p.shape, dtype=torch.float32, device=dev)
        stats = came.init_state(p, confidence_full=group["use_adabelief"])
        if eight and "came_v" in stats:
            del stats["came_v"]
            quant8.store_zeros(st, "came_rms", p.shape, signed=False, device=dev)
            if stats.pop("came_res", None) is not None:
                quant8.store_zeros(st, "came_res_rms", p.shape, signed=False, device=dev)
        st.update(stats)
        if group["use_tam"]:
            st["tam_s"] = torch.zeros((), dtype=torch.float32, device=dev)
        if group["use_lr_mask"]:  # starts at 1: the first steps use exactly the group's lr
            lo, hi = self._mask_bounds(group)
            if eight:
                clo, chi = _mask_codec_range(lo, hi, 1.0)
                quant8.store_log(st, "lr_mask", torch.ones(p.shape, device=dev), lo=clo, hi=chi, bits=8,
                                 rounding="nearest")
            else:
                dt = lr_mask.storage_dtype(self._mask_rate(group, 1), lo, hi)
                st["lr_mask"] = torch.ones(p.shape, dtype=dt, device=dev)

    # ------------------------------------------------------------------ hooks
    def _transform_grad(self, p, g, st, group, t):
        """Gradient regularisers (the refactored preset); returns the gradient to use."""
        return g

    def _momentum_input(self, p, u, st, group, t):
        """Transform of the normalised gradient before it enters the momentum."""
        return u

    def _use_cautious(self, group, t) -> bool:
        return bool(group.get("use_cautious", False))

    def _mask_rate(self, group, t) -> float:
        """The lr mask's rate (log units per step) at step t; 0 after warmup (the mask is frozen)."""
        if t > group["warmup_steps"]:
            return 0.0
        return lr_mask.rate(group["lr_mask_rate"], group["lr_bump"], group["base_lr"])

    def _extra_decay(self, p, p32, st, group, t, lr, factor=None):
        """Additional decoupled decay (the refactored preset's rank-aware decay); ``factor`` (a
        0-dim tensor, 0 for a skipped tensor) multiplies it."""

    # ------------------------------------------------------------------- step
    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        mult = None
        sums = None
        # per-tensor gradient norms for the whole group, one multi-tensor call each
        grads = [p.grad for p in params]
        guard = group["skip_nonfinite"]
        adadecay = group["adaptive_weight_decay"] and group["weight_decay"] > 0.0 and group["lr"] > 0.0
        l1s = torch._foreach_norm(grads, 1) if adadecay else None
        l2s = torch._foreach_norm(grads, 2) if adadecay or self._coptim or guard else None
        ok = None
        if guard:  # techniques/nonfinite.py: a bad tensor is skipped, the others see finite sums
            ok = nonfinite.flags(l2s)
            self._count_nonfinite(ok)
            l2s = nonfinite.finite_norms(l2s, ok)
            l1s = nonfinite.finite_norms(l1s, ok) if l1s is not None else None
            oks = ok.unbind(0)
        if self._coptim:
            ctx = group["context"]
            gnorm = torch.linalg.vector_norm(torch.stack([n.float() for n in l2s]))
            context.observe_gradient(ctx, gnorm, group)
            mult = context.update_multiplier(ctx, group)
            sums = []
        kbs = None
        if adadecay:  # AdaDecay's per-tensor standardisation, vectorised over the group
            dev = params[0].device
            same_dev = all(p.device == dev for p in params)
            if same_dev:
                numel = torch.tensor([float(max(p.numel(), 1)) for p in params], device=dev)
                k, b = adaptive_wd.standardizers(torch.stack(l1s).float(), torch.stack(l2s).float(), numel,
                                                 group["adadecay_alpha"])
                kbs = list(zip(k.unbind(0), b.unbind(0)))
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if "step" not in st:
                self._init_state(p, st, group)
        saved = nonfinite.Guard(states, self._buffer_pool, gated=_GATED) if guard else None
        gate = nonfinite.Gate(ok) if guard else None
        for i, (p, st) in enumerate(zip(params, states)):
            grad = nonfinite.sanitize(p.grad, oks[i], self._buffer_pool.get(p, 13)) if guard else p.grad
            self._update(p, grad, st, group, mult, sums, None if kbs is None else kbs[i], gate and (gate, i))
        if saved is not None:
            saved.restore(states, ok)
        if sums:
            total = sum(p.numel() for p in params)
            context.observe_consistency(group["context"], torch.stack(sums).sum() / max(total, 1))

    def _update(self, p, grad, st, group, mult, agree_sums, adadecay_kb=None, gated=None) -> None:
        """One tensor's step; ``gated = (Gate, index)`` when non-finite gradients are skipped
        (``grad`` is then sanitised, and the gated writes below leave a skipped tensor as it was)."""
        gate, gi = gated or (None, 0)
        pool = self._buffer_pool
        t = st["step"] + 1
        st["step"] = t
        b1, b2, b3 = group["betas"]
        e1, e2 = group["eps"]
        warm = group["warmup_steps"]
        early = 2 * t <= warm
        eight = "exp_avg_f8" in st
        seed = quant8.mix_seed(group["seed"], t, self.param_index(p)) if eight else None
        p32 = p if p.dtype == torch.float32 else pool.get(p, 5).copy_(p)
        tmp = pool.get(p, 2)

        # 1. gradient transforms into a pooled fp32 buffer (p.grad is never modified)
        g = pool.get(p, 0)
        if group["use_agr"]:
            g = agr(grad if grad.dtype == torch.float32 else g.copy_(grad), out=g, tmp=tmp)
        else:
            g.copy_(grad)
        if early and p.numel() > 1 and self._orthograd_on(p, group):
            orthograd_(g, p32)
        g = self._transform_grad(p, g, st, group, t)

        # 2. CAME second moment, RMS clip
        u = pool.get(p, 1)
        v8 = quant8.load(st, "came_rms", out=pool.get(p, 8)).square_() if "came_rms_f8" in st else None
        came.normalize(g, st, b2, e1, out=u, tmp=tmp, bc2=came.correction(b2, t, group["came_bias_correction"]), v=v8)
        if v8 is not None:
            quant8.store(st, "came_rms", v8.sqrt_(), signed=False, seed=seed)
        came.rms_clip_(u, group["clip_threshold"])
        u = self._momentum_input(p, u, st, group, t)

        # 3. momentum: TAM early, momentum decay later; sign agreement with the previous momentum
        m = quant8.load(st, "exp_avg", out=pool.get(p, 6)) if eight else st["exp_avg"]
        adapting = group["use_lr_mask"] and t <= warm
        agree = None
        if adapting or agree_sums is not None:
            agree = torch.mul(grad, m, out=pool.get(p, 4)).sign_()
            if agree_sums is not None:
                agree_sums.append(agree.sum())
        if group["use_tam"] and early and t > 1:
            d = tam.damping(st["tam_s"], tam.cosine(m, u), t - 1, group["tam_beta"])
            tam.momentum_(m, u, d, b1, keep=gate and gate.keep(b1, gi))
        else:
            beta = b1 if early else momentum_decay.beta_at(b1, group["beta1_decay"], group["beta1_min"], t - 1 - warm // 2)
            momentum_decay.momentum_(m, u, beta, keep=gate and gate.keep(beta, gi))
        mm = m
        if self._coptim:
            ms = quant8.load(st, "exp_avg_slow", out=pool.get(p, 7)) if eight else st["exp_avg_slow"]
            ademamix.update_slow_(ms, u, group["slow_beta"], keep=gate and gate.keep(group["slow_beta"], gi))
            mm = ademamix.mix(m, ms, ademamix.alpha_at(group["slow_alpha"], t, warm), out=pool.get(p, 11))
            if eight:
                quant8.store(st, "exp_avg_slow", ms, signed=True, seed=seed)

        # 4. CAME confidence (vectors: AdaBelief residual unless disabled)
        res8 = quant8.load(st, "came_res_rms", out=pool.get(p, 9)).square_() if "came_res_rms_f8" in st else None
        s = came.confidence(u, mm, st, b3, e2, out=pool.get(p, 3),
                            bc3=came.correction(b3, t, group["came_bias_correction"]), res=res8)
        if res8 is not None:
            quant8.store(st, "came_res_rms", res8.sqrt_(), signed=False, seed=seed)
        if eight:
            quant8.store(st, "exp_avg", m, signed=True, seed=seed)

        # 5. direction: Grams blend (a = beta1_decay^t), Cautious on the rest (COptim / phases)
        a = group["beta1_decay"] ** t if group["use_grams"] else 0.0
        gr = None
        if a > 0.0:
            gr = grams_(pool.get(p, 10).copy_(s), g, tmp)
        if self._use_cautious(group, t):
            cautious_(s, g, tmp)
        if gr is not None:
            s.lerp_(gr, a)

        # 6. per-element lr: Automagic mask (scale of base_lr), ALLoRA rows
        mask = None
        if group["use_lr_mask"]:
            lq = "lr_mask_lq" in st
            mask = quant8.load_log(st, "lr_mask", out=pool.get(p, 12)) if lq else st["lr_mask"]
            r = self._mask_rate(group, t) if adapting else 0.0
            if r > 0.0:
                lr_mask.scale_(mask, agree, r, *self._mask_bounds(group))
                if lq:
                    clo, chi = st["lr_mask_lrange"]
                    quant8.store_log(st, "lr_mask", mask, lo=clo, hi=chi, bits=8, seed=seed)
            s.mul_(mask)
        eta = group["eta"]
        if eta is not None and not group["full_finetune"] and p.ndim >= 2 and p in self._row_scaled_set():
            s.mul_(allora.row_scale(p32, eta))

        # 7. decoupled (adaptive) weight decay with the same per-element lr
        lr = group["lr"]
        wd = group["weight_decay"]
        if wd > 0.0 and lr > 0.0:
            coef = lr * wd
            dec = None
            if group["adaptive_weight_decay"]:  # theta = 2 sigmoid(.): the 2 goes into coef
                dec = adaptive_wd.factor(grad, group["adadecay_alpha"], out=pool.get(p, 4), kb=adadecay_kb, scale=1.0)
                coef *= 2.0
            if mask is not None:
                dec = mask if dec is None else dec.mul_(mask)
            if mult is not None:
                dec = mult if dec is None else (dec.mul_(mult) if dec is not mask else torch.mul(mask, mult, out=pool.get(p, 4)))
            if gate is not None and dec is not None:  # a skipped tensor does not decay
                if dec.dim() == 0:
                    dec = dec * gate.factor(gi)
                else:  # the mask is state: multiply a copy (slot 4 is free here)
                    dec = torch.mul(dec, gate.factor(gi), out=pool.get(p, 4)) if dec is mask else dec.mul_(gate.factor(gi))
            if dec is None:
                p32.mul_(1.0 - coef if gate is None else gate.keep(1.0 - coef, gi))
            else:
                p32.addcmul_(p32, dec, value=-coef)
        self._extra_decay(p, p32, st, group, t, lr, gate and gate.factor(gi))

        # 8. the step (a skipped tensor's direction is zeroed: s * 1 is exact for the others)
        if gate is not None:
            s.mul_(gate.factor(gi))
        if mult is not None:
            p32.addcmul_(s, mult, value=-lr)
        else:
            p32.add_(s, alpha=-lr)
        if p32 is not p:
            p.copy_(p32)

    def _end_step(self) -> None:
        if not self.defaults["verbose"]:
            return
        step = self._global_step()
        if step % self.defaults["verbose_interval"] == 0:  # opt-in logging: the only host sync
            stats = self.get_lr_mask_analysis()["global_statistics"]
            logger.info("%s step %d: avg lr %.3e (min %.3e, max %.3e)", type(self).__name__, step, stats["avg_lr"],
                        stats["min_lr"], stats["max_lr"])

    # ------------------------------------------------------------ state dict
    def _after_load(self) -> None:
        super()._after_load()
        for group in self.param_groups:
            if "context" in group:
                group["context"] = context.to_device(group["context"], group["params"][0].device)
            for k, v in self._DEFAULTS.items():  # a state saved by a sibling class lacks some keys
                group.setdefault(k, v)
            self._check_group(group)

    # ------------------------------------------------------------ diagnostics
    def _global_step(self) -> int:
        return max((g.get("step_count", 0) for g in self.param_groups), default=0)

    def _effective_mask(self, p, st):
        if "lr_mask_lq" in st:
            return quant8.load_log(st, "lr_mask")
        mask = st.get("lr_mask")
        return None if mask is None else mask.float()

    def get_lr_mask_analysis(self) -> dict:
        """Per-element lr statistics (scale of base lr, and effective lr = group lr x scale)."""
        return self._lr_mask_statistics(self._effective_mask, any(g["use_lr_mask"] for g in self.param_groups))

    def get_learning_rates(self) -> list[float]:
        """Mean effective lr per param group (the number to log instead of the scheduler's lr)."""
        out = []
        for g in self.param_groups:
            s = n = 0.0
            for p in g["params"]:
                mask = self._effective_mask(p, self.state.get(p, {}))
                if mask is not None:
                    s += float(mask.sum())
                    n += mask.numel()
            out.append(g["lr"] * (s / n if n else 1.0))
        return out

    def get_context_info(self) -> list[dict]:
        """COptim context per group (multiplier, consistency, flags, loss window)."""
        return [context.summary(g["context"]) for g in self.param_groups if "context" in g]

    def _feature_flags(self) -> dict:
        d = self.defaults
        return {
            "came_bias_correction": d["came_bias_correction"],
            "agr": d["use_agr"],
            "orthograd": "non-adapter tensors" if d["use_orthograd"] is None else d["use_orthograd"],
            "tam": d["use_tam"],
            "grams": d["use_grams"],
            "adabelief": d["use_adabelief"],
            "lr_mask": d["use_lr_mask"],
            "allora": d["eta"] is not None and not d["full_finetune"],
            "adaptive_weight_decay": d["adaptive_weight_decay"],
            "cautious": bool(d.get("use_cautious", False)),
            "contextual_lr": self._coptim,
            "multi_scale_momentum": self._coptim,
            "eight_bit": self._eight_bit,
        }

    def get_optimization_info(self) -> dict:
        """Everything worth logging, computed now (never inside step())."""
        n_params = sum(p.numel() for p in self._all_params())
        nbytes = self.state_bytes()
        info = {
            "optimizer": type(self).__name__,
            "version": __version__,
            "features": self._feature_flags(),
            "config": {k: self.defaults[k] for k in self._DEFAULTS},
            "training_stats": {
                "global_step": self._global_step(),
                "lr_mask_stats": self.get_lr_mask_analysis()["global_statistics"],
                "learning_rates": self.get_learning_rates(),
                "nonfinite_skipped": self.nonfinite_skipped(),
            },
            "memory": {"state_bytes": nbytes, "bytes_per_param": nbytes / max(n_params, 1)},
            "buffer_pool": self.get_buffer_pool_stats(),
        }
        if self._coptim:
            info["context"] = self.get_context_info()
        return info

    def diagnostics_scalars(self) -> dict:
        """Flat scalars for loggers (TensorBoard)."""
        stats = self.get_lr_mask_analysis()["global_statistics"]
        out = {
            "optimizer/lr_avg": stats["avg_lr"],
            "optimizer/lr_min": stats["min_lr"],
            "optimizer/lr_max": stats["max_lr"],
            "optimizer/lr_mask_scale": stats["avg_lr_scale"],
            "optimizer/nonfinite_skipped": float(self.nonfinite_skipped()),
        }
        for i, c in enumerate(self.get_context_info()):
            out[f"optimizer/lr_multiplier_{i}"] = c["lr_multiplier"]
            out[f"optimizer/consistency_{i}"] = c["consistency"]
        return out


class Automagic_CameAMP8bit(Automagic_CameAMP):
    """Automagic_CameAMP with 8-bit element-sized state (extra: seed=0, min_8bit_size=0)."""

    _DEFAULTS = {**_BASE_DEFAULTS, **_EIGHT_BIT_DEFAULTS}
    _eight_bit = True


class Automagic_CameAMP_COptim(Automagic_CameAMP):
    """Automagic_CameAMP + Cautious mask, multi-scale momentum and the context-aware lr multiplier.

    Extra arguments: use_cautious=True, slow_beta=0.99, slow_alpha=1.0 and the context
    settings of techniques/context.py (context_window=30, adaptation_rate=0.1,
    lr_multiplier_bounds=(0.5, 2.0), spike_threshold=3.0, spike_factor=0.5,
    plateau_threshold=1e-3, plateau_consistency=0.02, stagnation_steps=30,
    stagnation_boost=1.5, consistency_gain=2.0, consistency_ref=0.1). Feed it losses with
    :meth:`report_loss` (the trainer does after each step); no closure is needed.
    """

    _DEFAULTS = {**_BASE_DEFAULTS, **_COPTIM_DEFAULTS}
    _coptim = True

    def report_loss(self, loss) -> None:
        """Record this step's loss (a tensor, kept on device; a Python number also works)."""
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss))
        for group in self.param_groups:
            context.observe_loss(group["context"], loss, group)


class Automagic_CameAMP_COptim8bit(Automagic_CameAMP_COptim):
    """Automagic_CameAMP_COptim with 8-bit element-sized state (extra: seed=0, min_8bit_size=0)."""

    _DEFAULTS = {**_BASE_DEFAULTS, **_COPTIM_DEFAULTS, **_EIGHT_BIT_DEFAULTS}
    _eight_bit = True


def _signature(cls):
    prms = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("param_names", inspect.Parameter.KEYWORD_ONLY, default=None)]
    prms += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in cls._DEFAULTS.items()]
    return inspect.Signature(prms)


def _make_init(cls):
    def __init__(self, params, param_names=None, **kwargs):
        self._construct(params, param_names=param_names, **kwargs)

    __init__.__signature__ = _signature(cls)
    __init__.__doc__ = cls.__doc__
    __init__.__qualname__ = f"{cls.__name__}.__init__"
    return __init__


# one constructor shared by all four; its signature (for help() and the registry's argument
# check) lists each class's own keywords and defaults
for _cls in (Automagic_CameAMP, Automagic_CameAMP8bit, Automagic_CameAMP_COptim, Automagic_CameAMP_COptim8bit):
    _cls.__init__ = _make_init(_cls)
