"""Blockwise 8-bit storage for optimizer state. Pure torch, device-agnostic, no host syncs, no
global RNG; nothing here imports bitsandbytes.

One module per responsibility:

- ``float8``: the live codec (what every optimizer here stores): codes read off the fp32 bit
  pattern of x / absmax, no table lookups;
- ``dynamic`` and ``log``: legacy codecs (the 8-bit-optimizers paper's dynamic map, and a log
  codec for lr masks), kept to read and upgrade checkpoints written before the float8 store;
- ``state``: quantised tensors inside ``optimizer.state[p]`` dicts (``store`` / ``load``, the key
  suffixes, ``upgrade_dynamic``);
- ``seeds``: deterministic stochastic-rounding seeds (``mix_seed``);
- ``_engine``: what the codecs share (tables built once per device, the table encoder, scratch,
  the noise table, blockwise plumbing).

The blockwise contract: flatten, blocks of ``block_size`` elements (a power of two, default 256,
the last block may be partial), an fp32 absmax per block clamped to >= 1e-38, one uint8/int8 code
per element; cost ``1 + 4 / block_size`` bytes per element (1.016 at 256), for every tensor however
small. Speed and precision against bitsandbytes: ``benchmarks/bench_quant8.py``, docs/benchmarks.md.

Everything public is re-exported here, so ``quant8.store``, ``quant8.load`` etc. keep working.
"""
from ._engine import (ABSMAX_FLOOR, ABSMAX_SUFFIX, DEFAULT_BLOCK_SIZE, F8_SUFFIX, LOG_SUFFIX, Q_SUFFIX,  # noqa: F401
                      RANGE_SUFFIX, infer_block_size)
from .dynamic import _codes_nearest, _codes_stochastic, dequantize_blockwise, dynamic_map, quantize_blockwise  # noqa: F401
from .float8 import dequantize_float8, float8_values, prepare_float8, quantize_float8  # noqa: F401
from .log import dequantize_log, log_levels, quantize_log  # noqa: F401
from .seeds import mix_seed  # noqa: F401
from .state import (_codec, has_quantized, load, load_log, quant_keys, state_nbytes, store, store_log,  # noqa: F401
                    store_zeros, upgrade_dynamic)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "dynamic_map",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_float8",
    "dequantize_float8",
    "float8_values",
    "prepare_float8",
    "upgrade_dynamic",
    "infer_block_size",
    "log_levels",
    "quantize_log",
    "dequantize_log",
    "mix_seed",
    "store",
    "load",
    "store_zeros",
    "store_log",
    "load_log",
    "has_quantized",
    "quant_keys",
    "state_nbytes",
]
