"""The Automagic_CameAMP family (seed 003): CAME with the Automagic lr mask and friends.

Four presets share one update, written once (:class:`Automagic_CameAMP`):

- ``Automagic_CameAMP``            fp32 state;
- ``Automagic_CameAMP8bit``        element-sized state in the blockwise 8-bit store;
- ``Automagic_CameAMP_COptim``     + Cautious mask and the context-aware lr multiplier (spike /
                                   plateau / stagnation detection); a multi-scale (slow) momentum
                                   with ``slow_alpha`` > 0;
- ``Automagic_CameAMP_COptim8bit`` both.

One step, for every tensor (spec/algorithms.md section 17 order; t = this tensor's step, W =
warmup_steps). It runs as the stages of ``_STAGES`` over chunks of tensors with the same step
and state layout, brought together by shape (multi-tensor operations, one batched operation for
each run of same-shaped factored statistics; the per-tensor arithmetic is unchanged, so states
saved by the earlier one-tensor-at-a-time code resume bit-exactly: tests/test_checkpoint_fixtures.py):

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
 6. per-element lr ``group['lr'] * mask``: the Automagic mask is a *scale* of the group's
    scheduled lr (techniques/lr_mask.py), starts at exactly 1 (the effective lr at step 1 is
    the requested lr) and, while ``t <= W``, is multiplied by ``e^r`` / ``e^-r``
    (``r = lr_mask_rate``, or ``lr_bump / base_lr`` where the lineage's absolute bump is
    given) where the new gradient agrees / disagrees in sign with the previous momentum (0 at
    step 1: no polarity artefact), clamped to ``[lr_mask_floor, lr_mask_ceiling]`` (tightened
    by the optional absolute ``min_lr`` / ``max_lr``). After warmup it is frozen and, being a
    scale, follows any lr scheduler. With ``eta`` set, the ALLoRA row factor
    ``1 / sqrt(1 + eta^2 ||row||^2)`` from the current rows of LoRA factors (found by name,
    else by shape; off with ``full_finetune``). With ``use_hypergrad``, times a per-tensor
    scale h adapted every step from cos(m_{t-1}, u_t) (techniques/hypergrad.py, as in
    AdaptiveHinaAdamW). [COptim: times the context multiplier M in ``lr_multiplier_bounds``.]
 7. decoupled adaptive weight decay (AdaDecay, arXiv 1907.08931): ``p <- p (1 - lr_i wd
    theta_i)``, theta = 2 sigmoid(alpha z(|g|)) per element, at every step.
 8. ``p <- p - lr_i s``.

Early CAME steps. Official CAME has no bias correction: its first step moves every matrix
element by about 11.1 lr while vectors move 0.1 lr. ``came_bias_correction=False`` (default)
keeps that; with ``True`` the second moment and the confidence are bias corrected
(techniques/came.py), so the first move is ``(1 - b1)/b1`` lr on matrices and ``(1 - b1)`` lr
on vectors, ramping up as the momentum fills; tests pin both behaviours.

Defaults (``_BASE_DEFAULTS``, chosen on the quality benchmark: docs/automagic.md, "Training
quality, and why the defaults are what they are"): lr=1e-3, official CAME's betas (0.9, 0.999,
0.9999) and steps, the lr mask (rate 0.02 in [0.1, 10] x the scheduled lr during
warmup_steps=500), AGR, the AdaBelief residual for vectors, AdaDecay (weight_decay=5e-4),
OrthoGrad only on non-adapter tensors; TAM, Grams and ALLoRA off. The lineage's settings
(origin.md 5.1: lr=1e-6, an absolute mask between min_lr=1e-7 and max_lr=1e-3, betas=(0.8, 0.99,
0.999), eta=2.0, TAM, Grams and OrthoGrad everywhere) are all still accepted as arguments.
Deviations from the lineage (see docs): AGR per tensor, not per group; ALLoRA from current
norms, relative (1 for a zero row), not frozen at init; adaptive weight decay per element and
for the whole run; TAM with a scalar cosine; no step-1 "continue"; no
``torch.cuda.synchronize()``; the unused third eps is dropped.

8-bit presets: ``exp_avg`` (and ``exp_avg_slow``) in the signed blockwise store, the lr mask
in the 8-bit log codec (its levels exactly the mask's rate apart where they fit, 1 on a level,
the mask clamped to the outermost levels inside [floor, ceiling]: every value the mask takes is
a level, so it is stored without loss; ``lr_mask.lattice``), and for vectors sqrt of the second
moment / residual in the unsigned store (sqrt halves the dynamic range, so nothing is flushed to
zero), all with stochastic rounding seeded by ``quant8.mix_seed(seed, step, param_index)``:
resume is bit-exact. Codes
live in flat arenas and a chunk is decoded and encoded at once (state_store.py), each tensor
still with its own rounding stream; the stages read and write state through ``_Chunk.read`` /
``_Chunk.write`` and never see how it is stored. Element-sized fp32 state sits in arenas too.
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
from .state_store import Arenas, ChunkState
from .techniques import (adaptive_wd, ademamix, allora, came, constants, context, hypergrad, lr_mask, momentum_decay,
                         nonfinite, ops, tam)
from .techniques.agr import agr_list_
from .techniques.cautious import cautious_list_
from .techniques.grams import grams_list_
from .techniques.orthograd import orthograd_list_
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
    use_hypergrad=False,
    hypergrad_rate=0.5,
    hypergrad_floor=0.1,
    hypergrad_ceiling=100.0,
    adaptive_weight_decay=True,
    adadecay_alpha=4.0,
    skip_nonfinite=True,
    stochastic_rounding=True,
    verbose=False,
    verbose_interval=50,
)
_EIGHT_BIT_DEFAULTS = dict(seed=0, min_8bit_size=0)
# slow_alpha 0: the slow momentum cost 6.5 % (digits), 38 % (LoRA-teacher) and 0.4 % (char-LM) of the
# held-out loss over 12 seeds, each resolved, and nothing on tiny-SD (docs/automagic.md section 6.4)
_COPTIM_DEFAULTS = dict(use_cautious=True, slow_beta=0.99, slow_alpha=0.0, **context.DEFAULTS)


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
        "hypergrad_rate": dict(lo=0.0, hi=2.0),
        "hypergrad_floor": dict(lo=0.0, lo_open=True, hi=1.0),
        "hypergrad_ceiling": dict(lo=1.0, hi=1e4),
    }
    ints = {"warmup_steps": 0, "verbose_interval": 1, "seed": 0, "min_8bit_size": 0, "context_window": 4,
            "stagnation_steps": 1}
    bools = ("full_finetune", "came_bias_correction", "use_agr", "use_tam", "use_grams",
             "use_adabelief", "use_lr_mask", "adaptive_weight_decay", "verbose", "use_cautious", "skip_nonfinite",
             "stochastic_rounding", "use_hypergrad")
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


# 8-bit storage of the second moments: their square roots (half the dynamic range, nothing flushes to 0)
_STORED_AS = {"came_v": "came_rms", "came_res": "came_res_rms"}
_EIGHT_BIT_KEYS = ("exp_avg", "exp_avg_slow", "came_rms", "came_res_rms")
# element-sized state in arenas too, TAM's per-tensor scalar (a chunk's scalars: one vector), and
# CAME's factored row/column statistics (a run of same-shape tensors: one (run, n) batch view)
_PLAIN_KEYS = ("exp_avg", "exp_avg_slow", "lr_mask", "came_v", "came_res", "tam_s", "lr_scale",
               "came_row", "came_col", "came_res_row", "came_res_col")

# fp32 state whose update the non-finite gate keeps exact (techniques/nonfinite.py); the rest is
# copied before the step and put back for a skipped tensor
_GATED = ("exp_avg", "exp_avg_slow", "lr_mask", "came_row", "came_col", "came_res_row", "came_res_col")


class Automagic_CameAMP(HinaOptimizer):
    """CAME + Automagic lr mask + AGR, TAM / momentum decay, Grams, OrthoGrad, ALLoRA, AdaDecay.

    See the module docstring for the update. Keyword arguments (defaults): lr=1e-3,
    lr_mask_rate=0.02, lr_mask_floor=0.1, lr_mask_ceiling=10.0, lr_bump=None, min_lr=None,
    max_lr=None, eps=(1e-30, 1e-16), clip_threshold=1.0, betas=(0.9, 0.999, 0.9999),
    eta=None (ALLoRA off; a number turns it on), beta1_decay=0.9995, beta1_min=0.4,
    weight_decay=5e-4, warmup_steps=500, full_finetune=False, came_bias_correction=False,
    use_agr=True, use_orthograd=None (non-adapter tensors only), use_tam=False, tam_beta=0.9,
    use_grams=False, use_adabelief=True, use_lr_mask=True, adaptive_weight_decay=True,
    adadecay_alpha=4.0, skip_nonfinite=True, stochastic_rounding=True, verbose=False,
    verbose_interval=50; ``param_names`` as the engine.
    """

    _DEFAULTS: dict = _BASE_DEFAULTS
    # options added after states were saved, with the value that reproduces the code that saved them
    _options_absent_from_older_states = {"stochastic_rounding": False, "use_hypergrad": False}
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
        self._arenas = Arenas()  # where 8-bit state lives (state_store.py)
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
        lr_mask.prepare((lr_mask.rate(group["lr_mask_rate"], group["lr_bump"], group["base_lr"]),),
                        {p.device for p in group["params"]})

    def _warm_codecs(self, group: dict) -> None:
        """Build quant8's lookup tables now (they are built lazily, with host reads, on first
        use), for every device of this group, so that step() never builds one."""
        for dev in {p.device for p in group["params"]}:
            x = torch.ones(2, device=dev)
            quant8.prepare_float8(dev)
            if group["use_lr_mask"]:
                clo, chi = self._mask_codec(group)
                codes = quant8.quantize_log(x, clo, chi, bits=8, rounding="stochastic", seed=0)
                quant8.dequantize_log(codes, clo, chi)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _on_layout_changed(self) -> None:
        super()._on_layout_changed()
        self._row_scaled = self._adapters = None
        if hasattr(self, "_arenas"):  # a load replaced the state tensors: pack them again
            self._arenas.reset()

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

    def _mask_bounds(self, group: dict) -> tuple[float, float]:
        """Range of the lr-mask scale (techniques/lr_mask.py), always containing 1; in the 8-bit
        forms, where the lattice of :meth:`_mask_lattice` exists, its outermost points inside it."""
        lattice = self._mask_lattice(group)
        return lr_mask.group_bounds(group) if lattice is None else lattice[1]

    def _mask_codec(self, group: dict) -> tuple[float, float]:
        """The 8-bit mask's log-codec range: levels exactly the mask's rate apart where they fit
        (the mask is then stored without loss), else [lo, hi] with 1 on a level."""
        lattice = self._mask_lattice(group)
        return _mask_codec_range(*lr_mask.group_bounds(group), 1.0) if lattice is None else lattice[0]

    def _mask_lattice(self, group: dict, r: float | None = None):
        """``lr_mask.lattice`` of the group's mask bounds at rate ``r`` (default: the mask's rate),
        for the 8-bit forms (None otherwise)."""
        if not self._eight_bit:
            return None
        if r is None:
            r = lr_mask.rate(group["lr_mask_rate"], group["lr_bump"], group["base_lr"])
        return lr_mask.lattice(*lr_mask.group_bounds(group), r)

    @staticmethod
    def _hypergrad_range(group: dict) -> tuple[float, float]:
        """Range of the hypergradient lr scale (techniques/hypergrad.py), always containing 1."""
        return hypergrad.group_bounds(group)

    def _init_state(self, p: torch.Tensor, st: dict, group: dict) -> None:
        st["step"] = 0
        dev = p.device
        eight = self._eight_bit and p.numel() >= group["min_8bit_size"]
        if eight:
            quant8.store_zeros(st, "exp_avg", p.shape, signed=True, device=dev)
        else:
            st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=dev)
        if self._coptim and group["slow_alpha"] > 0:  # the slow momentum only where it is mixed in
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
        if group["use_hypergrad"]:
            st["lr_scale"] = torch.ones((), dtype=torch.float32, device=dev)
        if group["use_lr_mask"]:  # starts at 1: the first steps use exactly the group's lr
            lo, hi = self._mask_bounds(group)
            if eight:
                clo, chi = self._mask_codec(group)
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
    # A step runs the stages below in order, each over a whole chunk (consecutive tensors of a
    # group with the same step count and state layout) with multi-tensor operations. Per-tensor
    # calls are left only where a quantity is per tensor: CAME's factored row/column means, the
    # 8-bit codecs (each tensor has its own seeded rounding stream) and the refactored preset's hooks.
    _STAGES = ("_gradient_stage", "_second_moment_stage", "_momentum_stage", "_confidence_stage",
               "_direction_stage", "_lr_stage", "_decay_stage", "_apply_stage")

    def _layout(self, p):
        """What a chunk's tensors share: step count, dtype, device and state layout."""
        st = self.state[p]
        mask = st.get("lr_mask")
        return (st["step"], p.dtype, p.device, "exp_avg_f8" in st, "came_row" in st, "came_res" in st,
                "came_rms_f8" in st, "came_res_rms_f8" in st, "tam_s" in st, "lr_mask_lq" in st,
                None if mask is None else mask.dtype, "lr_scale" in st)

    def _hooked(self, name: str) -> bool:
        """Does this class override the per-tensor hook ``name`` (the refactored preset does)?"""
        return getattr(type(self), name) is not getattr(Automagic_CameAMP, name)

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        new = self._init_missing(group, params)
        if group["use_hypergrad"]:  # switched on after a load of a state saved without it
            for p in params:
                if "lr_scale" not in self.state[p]:
                    self.state[p]["lr_scale"] = torch.ones((), dtype=torch.float32, device=p.device)
                    new = True
        layouts = {p: self._layout(p) for p in params}  # read once: each tensor's step moves in its chunk
        ordered = self._by_shape(params, layouts)
        self._arenas.ensure(group, self.state, ordered, _EIGHT_BIT_KEYS, new, ("lr_mask",), _PLAIN_KEYS)
        shared = self._group_quantities(group, params)
        position = {p: i for i, p in enumerate(params)}
        saved = None
        if shared.gate is not None:  # states in arena order, so each key's tensors tile one slice
            states = [self.state[p] for p in ordered]
            saved = nonfinite.Guard(states, self._buffer_pool, gated=_GATED, tiled=self._arenas.tiled)
        for ps in self._chunks(ordered, layouts.__getitem__):
            c = _Chunk(self, group, ps, [position[p] for p in ps], shared)
            for stage in self._STAGES:
                getattr(self, stage)(c)
        if saved is not None:
            ok = shared.gate.ok  # in params order
            order = [position[p] for p in ordered]
            if order != list(range(len(order))):
                ok = ok.index_select(0, constants.index_vector(order, ok.device))
            saved.restore(states, ok)
        if shared.agree_sums is not None:
            total = sum(p.numel() for p in params)
            context.observe_consistency(group["context"], torch.stack(shared.agree_sums).sum() / max(total, 1))

    @classmethod
    def _by_shape(cls, params, layouts: dict):
        """``params`` with tensors of the same layout and size brought together, and within a size
        those of the same shape: a chunk's same-shape tensors are computed as one batch (CAME's
        factored statistics) and its same-sized ones as one run (one value per tensor applied
        once per run)."""
        return cls._brought_together(params, lambda p: (layouts[p], p.numel()), lambda p: (layouts[p], tuple(p.shape)))

    def _group_quantities(self, group: dict, params) -> "_Group":
        """What the whole group shares: the non-finite gate, AdaDecay's L2 norms and COptim's
        context multiplier, from per-tensor gradient norms (one multi-tensor call each)."""
        out = _Group()
        grads = [p.grad for p in params]
        guard = group["skip_nonfinite"]
        adadecay = group["adaptive_weight_decay"] and group["weight_decay"] > 0.0 and group["lr"] > 0.0
        l2s = torch._foreach_norm(grads, 2) if adadecay or self._coptim or guard else None
        if guard:  # techniques/nonfinite.py: a bad tensor is skipped, the others see finite sums
            ok = nonfinite.flags(l2s)
            self._count_nonfinite(ok)
            out.gate = nonfinite.Gate(ok)
            l2s = nonfinite.finite_norms(l2s, ok)
        if self._coptim:
            ctx = group["context"]
            context.observe_gradient(ctx, torch.linalg.vector_norm(torch.stack([n.float() for n in l2s])), group)
            out.mult = context.update_multiplier(ctx, group)
            out.agree_sums = [None] * len(params)  # in group order, whatever the chunks' order
        if adadecay and all(p.device == params[0].device for p in params):  # AdaDecay's L2 norms, vectorised
            out.l2 = torch.stack(l2s).float()
        return out

    def _gradient_stage(self, c: "_Chunk") -> None:
        """1. The fp32 gradient in scratch (``p.grad`` is never modified): AGR (tensors of more than
        one element), OrthoGrad while ``2t <= W`` (non-adapter tensors), the preset's transforms."""
        group = c.group
        g = c.buf("g")
        agr_on = [i for i, p in enumerate(c.ps) if p.numel() > 1] if group["use_agr"] else []
        if agr_on and len(agr_on) == len(c.ps) and all(x.dtype == torch.float32 for x in c.grads):
            agr_list_(g, c.grads)  # out of place
        else:
            ops.copy_(g, c.grads)
            if agr_on:
                sel = [g[i] for i in agr_on]
                agr_list_(sel, sel, [c.buf("tmp")[i] for i in agr_on])
        if 2 * c.t <= group["warmup_steps"]:
            sel = [i for i, p in enumerate(c.ps) if p.numel() > 1 and self._orthograd_on(p, group)]
            if sel:
                orthograd_list_([g[i] for i in sel], [c.p32[i] for i in sel])
        if self._hooked("_transform_grad"):
            g = [self._transform_grad(p, x, st, group, c.t) for p, x, st in zip(c.ps, g, c.sts)]
        c.g = g

    def _second_moment_stage(self, c: "_Chunk") -> None:
        """2. CAME: u = g / sqrt(V^) from the second moment of g^2 + eps1 (factored for matrices),
        RMS-clipped; then the preset's transform of u."""
        group = c.group
        b2 = group["betas"][1]
        v = c.stored.read("came_v")  # None for factored tensors
        u = c.buf("u")
        came.normalize_list_(c.g, c.sts, b2, group["eps"][0], u, c.buf("tmp"),
                             bc2=came.correction(b2, c.t, group["came_bias_correction"]), vs=v,
                             keeps=c.keep(b2), oks=c.oks, tiled=c.arenas.tiled)
        c.stored.write("came_v", v)
        came.rms_clip_list_(u, group["clip_threshold"])
        if self._hooked("_momentum_input"):
            u = [self._momentum_input(p, x, st, group, c.t) for p, x, st in zip(c.ps, u, c.sts)]
        c.u = u

    def _momentum_stage(self, c: "_Chunk") -> None:
        """3. Sign agreement with the previous momentum (for the lr mask and COptim's consistency),
        the hypergradient lr scale from cos(m_{t-1}, u_t) (``use_hypergrad``), then the momentum
        of u: TAM while ``2t <= W`` (damped by the same cosine), momentum decay later [COptim: the
        slow EMA mixed in]."""
        group, t, u = c.group, c.t, c.u
        b1 = group["betas"][0]
        warm = group["warmup_steps"]
        m = c.stored.read("exp_avg")
        c.adapting = group["use_lr_mask"] and t <= warm
        if c.adapting or c.shared.agree_sums is not None:
            c.agree = c.buf("agree")
            lr_mask.agreement_list_(c.agree, c.grads, m)
            sums = c.shared.agree_sums
            if sums is not None:
                for i, a in zip(c.idx, ops.sums(c.agree).unbind(0)):
                    sums[i] = a
        tam_now = group["use_tam"] and 2 * t <= warm and t > 1
        hypergrad_now = group["use_hypergrad"] and group["hypergrad_rate"] > 0 and t > 1
        cos = tam.cosines(m, u) if tam_now or hypergrad_now else None  # cos(m_{t-1}, u_t)
        if hypergrad_now:  # the tensor's lr grows while u keeps the momentum's direction
            hypergrad.scale_list_(c.state("lr_scale"), cos, group["hypergrad_rate"], *self._hypergrad_range(group))
        if group["use_hypergrad"]:
            c.lr_scale = ops.values(c.state("lr_scale"))  # read only from here on
        if tam_now:
            d = tam.damping_list(c.state("tam_s"), cos, t - 1, group["tam_beta"])
            tam.momentum_list_(m, u, d, b1, c.keep(b1))
        else:
            beta = b1 if 2 * t <= warm else momentum_decay.beta_at(b1, group["beta1_decay"], group["beta1_min"],
                                                                    t - 1 - warm // 2)
            momentum_decay.momentum_list_(m, u, beta, c.keep(beta))
        c.m = c.mm = m
        slow = c.stored.read("exp_avg_slow") if self._coptim else None  # kept only with slow_alpha > 0
        if slow is not None:
            beta = group["slow_beta"]
            momentum_decay.momentum_list_(slow, u, beta, c.keep(beta))
            c.mm = c.buf("mix")
            ademamix.mix_list_(c.mm, m, slow, ademamix.alpha_at(group["slow_alpha"], t, warm))
            c.stored.write("exp_avg_slow", slow)

    def _confidence_stage(self, c: "_Chunk") -> None:
        """4. CAME confidence s = m / sqrt(U^) (vectors: the AdaBelief residual unless disabled)."""
        group = c.group
        b3 = group["betas"][2]
        res = c.stored.read("came_res")  # None for factored tensors and without the AdaBelief residual
        c.s = c.buf("s")
        came.confidence_list_(c.u, c.mm, c.sts, b3, group["eps"][1], c.s,
                              bc3=came.correction(b3, c.t, group["came_bias_correction"]), ress=res,
                              keeps=c.keep(b3), oks=c.oks, tiled=c.arenas.tiled)
        c.stored.write("came_res", res)
        c.stored.write("exp_avg", c.m)

    def _direction_stage(self, c: "_Chunk") -> None:
        """5. Grams blend ``a sign(g)|s| + (1 - a) s`` with ``a = beta1_decay^t``; Cautious on the
        rest (COptim, the refactored preset's stable phase)."""
        group = c.group
        a = group["beta1_decay"] ** c.t if group["use_grams"] else 0.0
        gr = None
        if a > 0.0:
            gr = c.buf("grams")
            ops.copy_(gr, c.s)
            grams_list_(gr, gr, c.g, c.buf("tmp"))
        if self._use_cautious(group, c.t):
            cautious_list_(c.s, c.s, c.g, c.buf("tmp"))
        if gr is not None:
            ops.lerp_(c.s, gr, a)

    def _lr_stage(self, c: "_Chunk") -> None:
        """6. Per-element lr: the Automagic mask (a scale of the group lr, moving while
        ``t <= W``), ALLoRA's row factor on LoRA factors."""
        group = c.group
        c.mask = None
        if group["use_lr_mask"]:
            c.mask = c.stored.read("lr_mask")
            work = c.mask
            if work[0].dtype != torch.float32:  # compact (fp16) masks: worked on as an fp32 copy,
                work = c.buf("mask32")  # mixed-dtype passes being far slower (same bits:
                ops.copy_(work, c.mask)  # fp16 -> fp32 is exact, each result is rounded once)
            r = self._mask_rate(group, c.t) if c.adapting else 0.0
            if r > 0.0:
                lr_mask.scale_list_(work, c.agree, r, *self._mask_bounds(group))
                if work is not c.mask:
                    ops.copy_(c.mask, work)
                lattice = self._mask_lattice(group, r)  # moved by e^+-r: on these levels where they are its codec's
                c.stored.write("lr_mask", c.mask, on_levels=None if lattice is None else lattice[0])
            ops.mul_(c.s, work)
        eta = group["eta"]
        if eta is not None and not group["full_finetune"]:
            rows = self._row_scaled_set()
            selected = [i for i, p in enumerate(c.ps) if p.ndim >= 2 and p in rows]
            if selected:
                allora.scale_rows_list_(c.s, c.p32, eta, selected)

    def _decay_stage(self, c: "_Chunk") -> None:
        """7. Decoupled (adaptive) weight decay with the same per-element lr: ``p <- p (1 - lr wd
        theta mask [M])``, theta = 2 sigmoid(alpha z(|g|)) (AdaDecay)."""
        group = c.group
        lr, wd = group["lr"], group["weight_decay"]
        if wd > 0.0 and lr > 0.0:
            coef = lr * wd
            dec = None
            if group["adaptive_weight_decay"]:  # theta = 2 sigmoid(.): the 2 goes into coef
                dec = c.buf("decay")
                l2 = None if c.shared.l2 is None else c.shared.l2.index_select(0, c.index)
                adaptive_wd.factor_list_(dec, c.grads, group["adadecay_alpha"], l2)
                coef *= 2.0
            dec = self._decay_scales(c, dec)
            if dec is None:
                keep = c.keep(1.0 - coef)
                ops.mul_(c.p32, 1.0 - coef if keep is None else keep)
            else:
                ops.addcmul_(c.p32, c.p32, dec, value=-coef)
        if self._hooked("_extra_decay"):
            factors = c.oks
            for i, (p, q, st) in enumerate(zip(c.ps, c.p32, c.sts)):
                self._extra_decay(p, q, st, group, c.t, lr, None if factors is None else factors[i])

    @staticmethod
    def _decay_scales(c: "_Chunk", dec):
        """The per-element decay factor: AdaDecay's theta (or None) x mask x COptim's multiplier x
        the hypergradient scale, zeroed for a skipped tensor; None when it is 1 everywhere."""
        mult, mask = c.shared.mult, c.mask
        if mask is not None:
            if dec is None:
                dec = mask
            else:
                ops.mul_(dec, mask)
        if mult is not None:
            if dec is None:
                dec = [mult] * len(c.ps)
            elif dec is mask:  # in the mask's own dtype, as the per-tensor step did
                dec = c.buf("decay")
                ops.copy_(dec, torch._foreach_mul(mask, mult))
            else:
                ops.mul_(dec, mult)
        # one value per tensor: the hypergradient scale (the decay uses the same per-tensor lr), 0
        # for a skipped tensor (x * 1 is exact, so (dec h) ok and dec (h ok) have the same bits)
        per, oks = c.lr_scale, c.oks
        if oks is not None and (dec is not None or per is not None):
            per = oks if per is None else per * oks
        if per is not None:
            if dec is None:
                dec = list(per.unbind(0))
            elif dec[0].dim() == 0:
                dec = torch._foreach_mul(dec, list(per.unbind(0)))
            else:
                if dec is mask:  # the mask is state: scale a copy
                    dec = c.buf("decay")
                    ops.copy_(dec, mask)
                ops.per_tensor_("mul_", dec, per)
        return dec

    def _apply_stage(self, c: "_Chunk") -> None:
        """8. ``p <- p - lr s [M]`` (a skipped tensor's direction is zeroed: s * 1 is exact for the
        others), written back to low-precision parameters."""
        lr = c.group["lr"]
        mult, h, oks = c.shared.mult, c.lr_scale, c.oks
        per = h if mult is None or h is None else h * mult  # one value per tensor, or None
        if per is None and mult is not None:
            per = mult.expand(len(c.ps))
        if per is not None:
            if oks is not None:  # s (h ok) and (s ok) h have the same bits: ok is 0 or 1
                per = per * oks
            ops.addcmul_(c.p32, c.s, per, value=-lr)
        else:
            if oks is not None:
                ops.per_tensor_("mul_", c.s, oks)
            ops.add_(c.p32, c.s, alpha=-lr)
        if c.p32 is not c.ps:
            self._write_back(c.ps, c.p32, c.t, c.group["stochastic_rounding"])

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
            "multi_scale_momentum": self._coptim and d["slow_alpha"] > 0,
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


class _Group:
    """What a group's chunks share within one step (see ``Automagic_CameAMP._group_quantities``)."""

    __slots__ = ("gate", "mult", "agree_sums", "l2")

    def __init__(self):
        self.gate = None  # nonfinite.Gate, when non-finite gradients are skipped
        self.mult = None  # COptim's context multiplier (0-dim)
        self.agree_sums = None  # COptim: per-tensor sums of the sign agreement
        self.l2 = None  # the gradients' L2 norms (AdaDecay's standardisers), one entry per tensor of the group


class _Chunk:
    """One chunk's tensors, their state and scratch, and the values the stages hand on."""

    def __init__(self, opt: Automagic_CameAMP, group: dict, ps: list, idx: list, shared: _Group):
        self.group, self.ps, self.idx, self.shared = group, ps, idx, shared
        self.pool, self.arenas = opt._buffer_pool, opt._arenas
        self.sts = [opt.state[p] for p in ps]
        self.t = self.sts[0]["step"] + 1
        for st in self.sts:
            st["step"] = self.t
        eight = "exp_avg_f8" in self.sts[0]
        seeds = [quant8.mix_seed(group["seed"], self.t, opt.param_index(p)) for p in ps] if eight else None
        # element-sized state, whatever its storage: read into working tensors, written back
        self.stored = ChunkState(opt._arenas, self.pool, ps, self.sts, tag="automagic8", stored_as=_STORED_AS,
                                 seeds=seeds)
        needed = shared.gate is not None or shared.l2 is not None
        self.index = constants.index_vector(idx, ps[0].device) if needed else None  # positions in the group
        # 1 (0 for a skipped tensor) per tensor as one vector, or None without the non-finite gate
        self.oks = None if shared.gate is None else shared.gate.okf.index_select(0, self.index)
        self.grads = self._gradients()
        self.p32 = ps
        if ps[0].dtype != torch.float32:  # fp32 working copy of low-precision weights
            self.p32 = self.buf("p32")
            ops.copy_(self.p32, ps)
        self.g = self.u = self.m = self.mm = self.s = self.agree = self.mask = None
        self.lr_scale = None  # the hypergradient lr scale per tensor (a vector), when on
        self.adapting = False

    def _gradients(self) -> list:
        """``p.grad``, or with the non-finite gate ``ok * nan_to_num(p.grad)`` in fp32 scratch."""
        grads = [p.grad for p in self.ps]
        if self.shared.gate is None:
            return grads
        out = self.buf("grad")
        nonfinite.sanitize_list_(out, grads, self.oks)
        return out

    def buf(self, tag) -> list:
        """One fp32 scratch view per tensor (a flat arena per tag, reused across steps)."""
        return self.pool.views(self.ps, ("automagic", tag))

    def state(self, key) -> list:
        """The chunk's state ``key`` (a FlatList where it lies in an arena)."""
        return self.arenas.tiled([st[key] for st in self.sts])

    def keep(self, value: float):
        """The non-finite gate's ``value`` (1 for a skipped tensor) as one vector over the chunk's
        tensors, or None without the gate."""
        gate = self.shared.gate
        return None if gate is None else gate.keeps(value).index_select(0, self.index)


class Automagic_CameAMP8bit(Automagic_CameAMP):
    """Automagic_CameAMP with 8-bit element-sized state (extra: seed=0, min_8bit_size=0)."""

    _DEFAULTS = {**_BASE_DEFAULTS, **_EIGHT_BIT_DEFAULTS}
    _eight_bit = True


class Automagic_CameAMP_COptim(Automagic_CameAMP):
    """Automagic_CameAMP + Cautious mask and the context-aware lr multiplier (multi-scale momentum
    with slow_alpha > 0).

    Extra arguments: use_cautious=True, slow_beta=0.99, slow_alpha=0.0 (> 0 mixes in a slow
    momentum, kept as one more element-sized state) and the context
    settings of techniques/context.py (context_window=30, adaptation_rate=0.1,
    lr_multiplier_bounds=(1.0, 2.0), spike_threshold=3.0, spike_factor=0.5,
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
