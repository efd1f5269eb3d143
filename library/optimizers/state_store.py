"""Where element-sized optimizer state lives, kept apart from the math (torchao's low-bit
optimizers are the model: the update works on plain fp32 tensors, the storage decodes before and
encodes after). :class:`ChunkState` is the interface the optimizers use; :class:`Arenas` the layout.

Layout. The float8 codes and block absmax values of a param group live in flat arenas, one per
state key (and dtype, device), every tensor starting at a multiple of the block size, in the
order the optimizer steps them; ``self.state[p]`` holds views into them, so ``state_dict`` and
every reader still see one plain tensor per key. A chunk of consecutive tensors is then one
arena slice, which the codec decodes from and encodes into in place, with no per-tensor copies.
The fp32 working copies are block-aligned scratch with the same layout. A chunk that is not one
slice (a tensor in between had no gradient this step) goes through scratch copies with the same
bits. Plain element-sized state (fp32 moments, fp16/fp32 lr masks, SPD anchors) is packed the
same way without padding, so multi-tensor updates of a chunk run on one flat slice
(techniques/ops.py). Packing happens on a group's first step and after a load; for that moment
the old tensors and the new arena exist side by side (twice that state's memory, briefly).

Streams. Stochastic rounding is seeded either per chunk (one seed, element i of the chunk's
flat layout uses entry ``offset(seed) + i``) or per tensor (one seed each, the tensor's element j
uses ``offset(seed_i) + j``, exactly as storing that tensor alone would): both replay on resume.
"""
from __future__ import annotations

import operator

import torch

from . import quant8
from .buffer_pool import FlatList, _aligned_offsets
from .quant8._engine import log_segment_noise
from .quant8.float8 import segment_noise

__all__ = ["Arenas", "BLOCK", "same_log_range"]

BLOCK = quant8.DEFAULT_BLOCK_SIZE


class Arenas:
    """The arenas of an optimizer's element-sized state (8-bit codes, and plain fp32 tensors laid
    out the same way, align 1): pack them, then hand out chunk slices, decode and encode."""

    #: packing pays for itself in speed, but block padding costs memory: groups of many small
    #: tensors (small LoKr factors, say) keep standalone state and take the copying path
    MAX_PADDING = 0.02

    def __init__(self):
        self._packed: set = set()  # ids of the groups whose state sits in arenas
        self._slices: dict = {}  # (id of a chunk's first stored tensor, count) -> (tensors, arena slice)

    def reset(self) -> None:
        """Forget every arena (a load replaced the state tensors: they are packed again)."""
        self._packed.clear()
        self._slices.clear()

    def ensure(self, group: dict, state, params, names, new: bool, log_names=(), plain=()) -> None:
        """Pack ``group``'s float8 state ``names``, log-coded state ``log_names`` and plain tensors
        ``plain`` (in ``params`` order; ``params`` may be a function giving them, called only when
        packing) on its first step, when a tensor's state was just created (``new``), and after a load."""
        if new or id(group) not in self._packed:
            self.pack(state, params() if callable(params) else params, names, log_names, plain)
            self._packed.add(id(group))

    def pack(self, state, params, names=(), log_names=(), plain=()) -> None:
        """Move what is stored under ``names`` (codes and absmax values), ``log_names`` (codes) and
        ``plain`` (the tensors themselves) for ``params`` into fresh flat arenas; 8-bit codes stay
        where they are when block padding would add more than 2 % to them."""
        self._slices.clear()
        n = sum(p.numel() for p in params)
        keys = [(k, 1) for k in plain]
        if _aligned_offsets(params, BLOCK)[1] <= n * (1 + self.MAX_PADDING):
            keys += [(k + quant8.F8_SUFFIX, BLOCK) for k in names] + [(k + quant8.ABSMAX_SUFFIX, 1) for k in names]
            keys += [(k + quant8.LOG_SUFFIX, 1) for k in log_names]
        for key, align in keys:
            runs: dict = {}
            for p in params:
                t = state[p].get(key) if p in state else None
                if isinstance(t, torch.Tensor):
                    runs.setdefault((t.dtype, t.device), []).append(p)
            for (dtype, device), ps in runs.items():
                ts = [state[p][key] for p in ps]
                offsets, total = _aligned_offsets(ts, align)
                arena = torch.zeros(total, dtype=dtype, device=device)
                views = [arena[o:o + t.numel()].view(t.shape) for o, t in zip(offsets, ts)]
                torch._foreach_copy_(views, ts)
                for p, v in zip(ps, views):
                    state[p][key] = v

    def slice(self, tensors, align: int):
        """The arena slice holding ``tensors`` back to back (each at a multiple of ``align``), or None."""
        key = (id(tensors[0]), len(tensors))
        hit = self._slices.get(key)
        if hit is not None and all(map(operator.is_, hit[0], tensors)):
            return hit[1]
        base = tensors[0]._base
        if base is None or base.dim() != 1:
            return None
        b0 = base.storage_offset()
        start = off = tensors[0].storage_offset() - b0
        for t in tensors:
            if t._base is not base or t.storage_offset() - b0 != off:
                return None
            off += -(-t.numel() // align) * align
        flat = base[start:off]
        if len(self._slices) >= 4096:
            self._slices.clear()
        self._slices[key] = (list(tensors), flat)
        return flat

    def tiled(self, tensors) -> list:
        """``tensors`` as a FlatList over their arena slice when they are one (multi-tensor
        operations then run once on it), else as they are. The FlatList is kept with the slice,
        so its runs are worked out once, not at every step."""
        flat = self.slice(tensors, 1)
        if flat is None:
            return tensors
        key = ("tiled", id(tensors[0]), len(tensors))
        hit = self._slices.get(key)
        if hit is not None and hit.flat is flat:
            return hit
        out = self._slices[key] = FlatList(tensors, flat)
        return out

    def _stored(self, pool, sts, key: str, align: int, read: bool):
        """``(flat, back)``: the chunk's stored tensors under ``key`` as one flat tensor: the arena
        slice itself (``back`` None), or a scratch copy (``read``: filled from the state) that
        ``torch._foreach_copy_(*back)`` writes back."""
        ts = [st[key] for st in sts]
        flat = self.slice(ts, align)
        if flat is not None:
            return flat, None
        flat, views = pool.aligned(ts, ("codes", key), ts[0].dtype, align)
        if read:
            torch._foreach_copy_(views, ts)
        return flat, (ts, views)

    def decode(self, pool, ps, sts, name: str, tag) -> tuple[torch.Tensor, list]:
        """``(flat, views)``: the chunk's state ``name`` decoded into block-aligned fp32 scratch
        ``tag`` (the padding between tensors decodes to 0)."""
        flat, views = pool.aligned(ps, tag, torch.float32, BLOCK)
        codes, back = self._stored(pool, sts, name + quant8.F8_SUFFIX, BLOCK, True)
        absmax, _ = self._stored(pool, sts, name + quant8.ABSMAX_SUFFIX, 1, True)
        quant8.dequantize_float8(codes, absmax, signed=codes.dtype == torch.int8, block_size=BLOCK, out=flat)
        if back is not None:  # stale scratch codes in the padding: it must decode to 0
            gaps = pool.gaps(ps, tag, torch.float32, BLOCK)
            if gaps:
                torch._foreach_zero_(gaps)
        return flat, views

    def encode(self, pool, ps, sts, name: str, tag, seed: int | None = None, seeds=None) -> None:
        """Encode scratch ``tag`` (filled by :meth:`decode`) back into the state ``name`` with
        stochastic rounding: one stream for the chunk (``seed``) or one per tensor (``seeds``)."""
        flat, views = pool.aligned(ps, tag, torch.float32, BLOCK)
        codes, back = self._stored(pool, sts, name + quant8.F8_SUFFIX, BLOCK, False)
        absmax, a_back = self._stored(pool, sts, name + quant8.ABSMAX_SUFFIX, 1, False)
        signed = codes.dtype == torch.int8
        noise = None
        if seeds is not None:
            base = flat.storage_offset()
            segments = [(v.storage_offset() - base, v.numel(), quant8.mix_seed(s, name)) for v, s in zip(views, seeds)]
            noise = segment_noise(signed, segments, flat.numel(), flat.device)
        else:
            seed = quant8.mix_seed(seed, name)
        quant8.quantize_float8(flat, signed=signed, block_size=BLOCK, rounding="stochastic", seed=seed,
                               codes_out=codes, absmax_out=absmax, noise=noise)
        for b in (back, a_back):
            if b is not None:
                torch._foreach_copy_(*b)

    def decode_log(self, pool, ps, sts, name: str, tag) -> list:
        """The chunk's log-coded state ``name`` (legacy lr masks; one ``(lo, hi)`` range for the
        chunk) decoded into fp32 scratch ``tag``, one view per tensor."""
        flat, views = pool.aligned(ps, tag, torch.float32, 1)
        codes, _ = self._stored(pool, sts, name + quant8.LOG_SUFFIX, 1, True)
        lo, hi = sts[0][name + quant8.RANGE_SUFFIX]
        quant8.dequantize_log(codes, lo, hi, out=flat)
        return views

    def encode_log(self, pool, ps, sts, name: str, tag, seeds, nearest: bool = False) -> None:
        """Encode scratch ``tag`` back into the log-coded state ``name``, each tensor with its own
        seeded stochastic rounding (the codes of storing each tensor alone); ``nearest``: round
        to the nearest level instead, with no noise drawn (for values that lie on the levels)."""
        flat, views = pool.aligned(ps, tag, torch.float32, 1)
        codes, back = self._stored(pool, sts, name + quant8.LOG_SUFFIX, 1, False)
        lo, hi = sts[0][name + quant8.RANGE_SUFFIX]
        if nearest:
            quant8.quantize_log(flat, lo, hi, bits=8, out=codes, rounding="nearest")
        else:
            base = flat.storage_offset()
            segments = [(v.storage_offset() - base, v.numel(), quant8.mix_seed(s, name)) for v, s in zip(views, seeds)]
            noise = log_segment_noise(segments, flat.numel() + 1, flat.device)
            quant8.quantize_log(flat, lo, hi, bits=8, out=codes, noise=noise)
        if back is not None:
            torch._foreach_copy_(*back)


def same_log_range(sts, name: str) -> bool:
    """Do the chunk's log-coded tensors share one ``(lo, hi)`` range (so they decode as one)?"""
    first = sts[0][name + quant8.RANGE_SUFFIX]
    return all(st[name + quant8.RANGE_SUFFIX] == first for st in sts)


def _has_log_range(st: dict, name: str, levels) -> bool:
    """Is ``st``'s log-coded ``name`` stored with the codec range ``levels`` (a ``(lo, hi)``)?"""
    return levels is not None and tuple(map(float, st[name + quant8.RANGE_SUFFIX])) == tuple(levels)


class ChunkState:
    """A chunk's element-sized state, whatever its storage: :meth:`read` gives working tensors to
    update in place (the state tensors themselves when they are plain, as a FlatList over their
    arena slice when they lie in one; decoded fp32 scratch when they are 8-bit), :meth:`write`
    stores them back (a no-op for plain tensors). The optimizer's math never sees the storage.

    ``stored_as`` maps a key to the name its 8-bit codes are stored under as a square root (half
    the dynamic range, so small second moments are not flushed to zero). Stochastic rounding is
    seeded per chunk (``seed``) or per tensor (``seeds``), see the module docstring.
    """

    def __init__(self, arenas: Arenas, pool, ps, sts, *, tag: str, stored_as=None, seed=None, seeds=None):
        self.arenas, self.pool, self.ps, self.sts = arenas, pool, ps, sts
        self.tag, self.stored_as, self.seed, self.seeds = tag, stored_as or {}, seed, seeds

    def read(self, key: str, clamp=None):
        """The chunk's state ``key``, or None where the state has no such key. ``clamp = (lo, hi)``
        bounds decoded 8-bit values (a value near a bound may decode one level beyond it)."""
        st0 = self.sts[0]
        if key in st0:
            return self.arenas.tiled([st[key] for st in self.sts])
        name = self.stored_as.get(key, key)
        if name + quant8.F8_SUFFIX in st0:
            flat, views = self.arenas.decode(self.pool, self.ps, self.sts, name, (self.tag, name))
            if name != key:
                flat.square_()  # the padding stays 0
            if clamp is not None:
                flat.clamp_(*clamp)
            return views
        if name + quant8.LOG_SUFFIX in st0:  # the 8-bit log codec (the Automagic lr masks)
            if same_log_range(self.sts, name):
                return self.arenas.decode_log(self.pool, self.ps, self.sts, name, (self.tag, name))
            out = self.pool.views(self.ps, (self.tag, name))
            for st, o in zip(self.sts, out):
                quant8.load_log(st, name, out=o)
            return out
        return None

    def write(self, key: str, xs, on_levels=None) -> None:
        """Store ``xs`` (what :meth:`read` gave, updated) back. ``on_levels``: a log-codec range
        ``(lo, hi)`` whose levels ``xs`` lie on (up to fp32 rounding); log-coded tensors stored with
        that range are written by nearest rounding, which gives those levels' codes with no noise
        to draw (stochastic rounding would too, except where fp32 rounding leaves a value a hair
        off its level and the draw happens to cross to the neighbouring one)."""
        st0 = self.sts[0]
        if xs is None or key in st0:
            return
        name = self.stored_as.get(key, key)
        if name + quant8.F8_SUFFIX in st0:
            tag = (self.tag, name)
            if name != key:
                self.pool.aligned(self.ps, tag, torch.float32, BLOCK)[0].sqrt_()
            self.arenas.encode(self.pool, self.ps, self.sts, name, tag, seed=self.seed, seeds=self.seeds)
        elif name + quant8.LOG_SUFFIX in st0:
            if same_log_range(self.sts, name):
                self.arenas.encode_log(self.pool, self.ps, self.sts, name, (self.tag, name), self.seeds,
                                       nearest=_has_log_range(st0, name, on_levels))
                return
            for st, x, seed in zip(self.sts, xs, self.seeds):
                lo, hi = st[name + quant8.RANGE_SUFFIX]
                rounding = "nearest" if _has_log_range(st, name, on_levels) else "stochastic"
                quant8.store_log(st, name, x, lo=lo, hi=hi, bits=8, seed=seed, rounding=rounding)
