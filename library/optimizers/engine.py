"""The optimizer engine shared by every optimizer in this package.

Bookkeeping lives here (param groups, parameter names, ``self.state``, state_dict round
trips, the step loop, scratch buffers); the math lives in ``techniques/`` and in the presets.

Contract (tested in tests/test_engine.py):
- every per-parameter quantity lives in ``self.state[p]``; counters that span parameters live
  in the param-group dicts (saved by ``state_dict``);
- ``load_state_dict`` keeps each saved tensor's dtype (torch's default casts uint8/bool/fp32
  state to the parameter dtype), moves it to the parameter's device, and rejects a state saved
  for another parameter layout with a one-line error naming the parameter;
- names come from torch's native named groups (``param_names``), from a group key ``named``
  (a list aligned with ``params``), or from :meth:`set_param_names`; with none, all still works;
- ``step()`` never syncs with the host; parameters without gradients are skipped.
"""
from __future__ import annotations

from collections import defaultdict
from itertools import chain
from typing import Any, Iterable

import torch

from . import quant8
from .buffer_pool import BufferPool
from .techniques import ops
from .techniques.stochastic_round import round_to_bf16_

__all__ = ["HinaOptimizer", "normalize_param_groups"]

_HOOK_ATTRIBUTES = frozenset(
    f"_optimizer_{kind}_hooks"
    for kind in ("step_pre", "step_post", "state_dict_pre", "state_dict_post",
                 "load_state_dict_pre", "load_state_dict_post")
)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def _reject_sharded(owner: str, group: dict) -> None:
    """Sharded (DTensor) parameters, e.g. from FSDP2's ``fully_shard``, fail early with one line:
    the per-tensor reductions of these optimizers would see only a shard (docs/reliability.md)."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return
    for i, item in enumerate(group["params"]):
        name, t = item if isinstance(item, tuple) else (None, item)
        if isinstance(t, dtensor):
            label = repr(name) if name else f"#{i}"
            raise ValueError(
                f"{owner}: parameter {label} is a DTensor (sharded by FSDP2 fully_shard or tensor parallel); "
                "sharded parameters are not supported: train with DDP (accelerate launch --multi_gpu) instead"
            )


def normalize_param_groups(params) -> list[dict]:
    """Turn any accepted ``params`` argument into a list of group dicts torch understands.

    Accepted: an iterable of tensors, of ``(name, tensor)`` pairs, or of group dicts whose
    ``params`` is any iterable (kohya hands ``dict_values``) of tensors or pairs, optionally
    with a ``named`` list aligned with ``params``.
    """
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or dicts, got a single Tensor")
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(items[0], dict):
        items = [{"params": items}]
    groups = []
    for i, g in enumerate(items):
        if not isinstance(g, dict):
            raise TypeError(f"param group {i} must be a dict, got {type(g).__name__}")
        g = dict(g)
        if "params" not in g:
            raise ValueError(f"param group {i} has no 'params' key")
        ps = g["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        named = g.get("named")
        if named is not None:
            named = list(named)
            if len(named) != len(ps):
                raise ValueError(
                    f"param group {i}: 'named' has {len(named)} names for {len(ps)} parameters"
                )
            g["named"] = named
        g["params"] = ps
        groups.append(g)
    return groups


class HinaOptimizer(torch.optim.Optimizer):
    """Base class: names, exact state round trips, the step loop and a scratch buffer pool."""

    #: state keys whose tensors must have the parameter's shape (checked on load)
    _shaped_state_keys: tuple[str, ...] = ()
    #: techniques added after states were saved, with the value that reproduces the older code:
    #: a saved group without the option resumes with it (a run continues as it was trained),
    #: while new optimizers get the current default
    _options_absent_from_older_states: dict = {}

    def __init__(self, params, defaults: dict, *, param_names=None):
        self._nonfinite_skips: dict = {}  # device -> count of (tensor, step) updates skipped, on device
        super().__init__(normalize_param_groups(params), defaults)
        self._names: dict[torch.Tensor, str] = {}
        self._index_cache: dict[torch.Tensor, int] | None = None
        self._buffer_pool = BufferPool()
        self._collect_group_names()
        if param_names is not None:
            self.set_param_names(param_names)

    # ------------------------------------------------------------------ names
    def _collect_group_names(self) -> None:
        for group in self.param_groups:
            names = group.get("param_names") or group.get("named")
            if names:
                for p, n in zip(group["params"], names):
                    if n is not None:
                        self._names[p] = str(n)

    def set_param_names(self, mapping) -> int:
        """Attach names to parameters; returns how many of this optimizer's params got one.

        ``mapping`` may be ``{name: tensor}`` (e.g. ``dict(model.named_parameters())``),
        ``{tensor: name}``, or an iterable of ``(name, tensor)`` pairs.
        """
        if isinstance(mapping, dict):
            pairs = [(k, v) if isinstance(v, torch.Tensor) else (v, k) for k, v in mapping.items()]
        else:
            pairs = list(mapping)
        by_id = {id(t): str(n) for n, t in pairs}
        count = 0
        for p in self._all_params():
            n = by_id.get(id(p))
            if n is not None:
                self._names[p] = n
                count += 1
        self._on_layout_changed()
        return count

    def param_name(self, p: torch.Tensor) -> str | None:
        return self._names.get(p)

    def has_names(self) -> bool:
        return bool(self._names)

    def _label(self, p: torch.Tensor) -> str:
        name = self._names.get(p)
        if name is not None:
            return name
        return f"#{self.param_index(p)} {tuple(p.shape)}"

    # ----------------------------------------------------------------- layout
    def _all_params(self) -> list[torch.Tensor]:
        return list(chain.from_iterable(g["params"] for g in self.param_groups))

    def param_index(self, p: torch.Tensor) -> int:
        if self._index_cache is None:
            self._index_cache = {q: i for i, q in enumerate(self._all_params())}
        return self._index_cache[p]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = normalize_param_groups([param_group])[0]
        _reject_sharded(type(self).__name__, param_group)
        super().add_param_group(param_group)
        if hasattr(self, "_names"):
            self._collect_group_names()
            self._on_layout_changed()

    def _on_layout_changed(self) -> None:
        """Hook: parameters or names changed (subclasses rebuild derived caches)."""
        self._index_cache = None

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._begin_step()
        for group in self.param_groups:
            params = []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"(parameter {self._label(p)})"
                    )
                params.append(p)
            if not params:
                continue
            group["step_count"] = group.get("step_count", 0) + 1
            self._step_group(group, params)
        self._end_step()
        return loss

    # Elements per multi-tensor chunk: on CPU a chunk's working set stays in cache between the
    # passes; on accelerators fewer, larger launches win. Scratch memory is bounded by it.
    # CPU: 2^20 (2^18 before; benchmarks/probe_chunk.py, docs/optimizers.md "Speed").
    chunk_elements = {"cpu": 1 << 20}
    default_chunk_elements = 1 << 25

    def _chunks(self, params, signature, elements=None):
        """Consecutive runs of ``params`` with the same ``signature(p)`` (a state layout), each at
        most a chunk of elements (one tensor larger than that is a chunk of its own);
        ``elements`` overrides ``chunk_elements`` for the device types it names."""
        sizes = self.chunk_elements if elements is None else {**self.chunk_elements, **elements}
        budget = sizes.get(params[0].device.type, self.default_chunk_elements) if params else 0
        out, cur, size, sig0 = [], [], 0, None
        for p in params:
            sig = signature(p)
            n = p.numel()
            if cur and (sig != sig0 or size + n > budget):
                out.append(cur)
                cur, size = [], 0
            cur.append(p)
            size += n
            sig0 = sig
        if cur:
            out.append(cur)
        return out

    @staticmethod
    def _brought_together(params, *keys):
        """``params`` with the tensors of equal ``keys[0](p)`` brought together (each group where its
        first tensor stood), within a group those of equal ``keys[1](p)``, and so on; otherwise in
        their order. Stable, so state arenas packed in this order stay one slice per chunk from
        step to step."""
        first: dict = {}
        order = [tuple(first.setdefault((j, key(p)), i) for j, key in enumerate(keys)) + (i,)
                 for i, p in enumerate(params)]
        return [params[o[-1]] for o in sorted(order)]

    @classmethod
    def _by_size(cls, params):
        """``params`` with same-sized tensors brought together, so a chunk holds long runs of
        same-sized tensors: one value per tensor is then applied, and one value per tensor reduced,
        once per run (techniques/ops.py), not once per short run."""
        return cls._brought_together(params, torch.Tensor.numel)

    def _write_back(self, ps, p32, t: int, stochastic: bool) -> None:
        """Low-precision parameters ``ps`` take their updated fp32 working copy ``p32`` (a
        FlatList): bf16 with stochastic rounding when ``stochastic`` (techniques/stochastic_round.py;
        the stream is seeded by the chunk's first parameter index and the step, so a resumed run
        replays it), else rounded to nearest."""
        if stochastic and ps[0].dtype == torch.bfloat16:
            noise = self._buffer_pool.aligned(ps, "sr_noise", torch.int32, 1)[0]
            round_to_bf16_(p32.flat, noise, quant8.mix_seed(self.param_index(ps[0]), t, "bf16"))
        ops.copy_(ps, p32)

    def _begin_step(self) -> None:
        pass

    def _end_step(self) -> None:
        pass

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _init_missing(self, group: dict, params) -> bool:
        """Create the state of parameters stepping for the first time (``_init_state``); returns
        whether any was created."""
        new = False
        for p in params:
            st = self.state[p]
            if "step" not in st:
                self._init_state(p, st, group)
                new = True
        return new

    # ------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`, keeping every tensor's dtype exactly."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict (expected keys 'state' and 'param_groups')")
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        name = type(self).__name__
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"{name}: the saved state has {len(saved_groups)} param groups, this optimizer has {len(groups)}"
            )
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"{name}: param group {i} has {len(g['params'])} parameters, "
                    f"the saved state has {len(sg['params'])}"
                )
        id_map = dict(
            zip(
                chain.from_iterable(sg["params"] for sg in saved_groups),
                chain.from_iterable(g["params"] for g in groups),
            )
        )
        new_state: defaultdict = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"{name}: the saved state names parameter id {key!r}, which no group holds")
            p = id_map[key]
            if not isinstance(value, dict):
                raise ValueError(
                    f"{name}: the saved state of parameter {self._label(p)} is a {type(value).__name__}, "
                    "not a dict of tensors: this is not a state saved by this optimizer"
                )
            for k in self._shaped_state_keys:
                t = value.get(k)
                if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{name}: saved state '{k}' of parameter {self._label(p)} has shape "
                        f"{tuple(t.shape)}, the parameter has {tuple(p.shape)}"
                    )
            new_state[p] = _copy_to_device(value, p.device)
            quant8.upgrade_dynamic(new_state[p])  # 8-bit state saved before the float8 map
        new_groups = []
        for g, sg in zip(groups, saved_groups):
            ng = {k: v for k, v in sg.items() if k != "params"}
            ng["params"] = g["params"]
            for k in ("param_names", "named"):
                if k in g and k not in ng:
                    ng[k] = g[k]
            for k, v in self._options_absent_from_older_states.items():  # keep resuming as it was trained
                ng.setdefault(k, v)
            for k, v in self.defaults.items():  # other options added after the state was saved
                ng.setdefault(k, v)
            new_groups.append(ng)
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        self._collect_group_names()
        self._on_layout_changed()
        self._after_load()
        for hook in self._optimizer_load_state_dict_post_hooks.values():  # they see the finished load
            hook(self)

    def _after_load(self) -> None:
        """Hook: finish a load (upgrade old state formats, re-check groups) before the post-hooks run."""

    # ------------------------------------------------------------ copies
    def __getstate__(self) -> dict:
        """Everything but the hooks and the scratch, so ``copy.deepcopy(opt)`` and ``torch.save(opt)``
        give an optimizer that steps exactly as this one does (torch's own ``__getstate__`` keeps only
        ``defaults``, ``state`` and ``param_groups``; the rest of this engine would be lost).
        Registered hooks are left out, as torch does: they may not be copyable."""
        kept = {k: v for k, v in self.__dict__.items() if k not in _HOOK_ATTRIBUTES}
        kept["_buffer_pool"] = BufferPool()
        kept["_index_cache"] = None
        return kept

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_names" in state:  # a whole copy (not a load): caches keyed by object ids are stale
            self._on_layout_changed()

    # ------------------------------------------------------------ diagnostics
    def _lr_mask_statistics(self, mask_of, enabled: bool) -> dict:
        """Statistics of per-element lr masks (a scale of each group's base lr); ``mask_of(p, st)``
        returns the fp32 scale tensor or None. Reads state: for diagnostics only, never in step()."""
        total = warm = post = numel = 0
        scale_sum = lr_sum = 0.0
        lo, hi = float("inf"), float("-inf")
        lr_lo, lr_hi = float("inf"), float("-inf")
        for g in self.param_groups:
            for p in g["params"]:
                total += 1
                st = self.state.get(p, {})
                if st.get("step", 0) < g.get("warmup_steps", 0):
                    warm += 1
                else:
                    post += 1
                mask = mask_of(p, st)
                if mask is None:
                    continue
                s, mn, mx = float(mask.sum()), float(mask.min()), float(mask.max())
                scale_sum += s
                lr_sum += s * g["lr"]
                numel += mask.numel()
                lo, hi = min(lo, mn), max(hi, mx)
                lr_lo, lr_hi = min(lr_lo, mn * g["lr"]), max(lr_hi, mx * g["lr"])
        lr0 = self.param_groups[0]["lr"]
        return {
            "lr_mask_enabled": enabled,
            "global_statistics": {
                "total_parameters": total,
                "warmup_parameters": warm,
                "post_warmup_parameters": post,
                "avg_lr_scale": scale_sum / numel if numel else 1.0,
                "min_lr_scale": lo if numel else 1.0,
                "max_lr_scale": hi if numel else 1.0,
                "avg_lr": lr_sum / numel if numel else lr0,
                "min_lr": lr_lo if numel else lr0,
                "max_lr": lr_hi if numel else lr0,
                "masked_elements": numel,
            },
        }

    def _count_nonfinite(self, ok: torch.Tensor) -> None:
        """Add the tensors ``ok`` marks as skipped to the device-side counter (no host sync)."""
        self._nonfinite_skips[ok.device] = self._nonfinite_skips.get(ok.device, 0) + (~ok).sum()

    def nonfinite_skipped(self) -> int:
        """How many (tensor, step) updates were skipped for a non-finite gradient since this
        optimizer was built (reads device counters: call it outside the training step)."""
        return int(sum(int(v) for v in getattr(self, "_nonfinite_skips", {}).values()))

    def get_buffer_pool_stats(self) -> dict:
        return self._buffer_pool.stats()

    def clear_buffer_pool(self) -> None:
        self._buffer_pool.clear()

    def state_bytes(self) -> int:
        """Bytes of memory behind ``self.state`` (for memory benchmarks): see :func:`storage_bytes`."""
        return storage_bytes(list(self.state.values()))


def _copy_to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, copy=True)
    if isinstance(value, dict):
        return {k: _copy_to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_to_device(v, device) for v in value)
    return value


def storage_bytes(value) -> int:
    """Bytes of the storages behind every tensor in ``value`` (nested dicts, lists, tuples),
    each storage counted once: state tensors that are views into one flat arena
    (the 8-bit optimizers' codes) count the arena, block padding included."""
    seen: dict = {}
    for t in _iter_tensors(value):
        st = t.untyped_storage()
        seen[(st.data_ptr(), str(t.device))] = st.nbytes()
    return sum(seen.values())


def _iter_tensors(value) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _iter_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _iter_tensors(v)
