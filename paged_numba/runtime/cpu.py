"""The ``cpu`` runtime: storage is NumPy arrays; ops run as parallel ``@njit`` kernels."""
from __future__ import annotations

import os

import numpy as np

from ..dtypes import DType, decode_table, encode_f32
from .base import Client, Device, Runtime

_TQ = 32  # queries per parallel work item (times G query heads)
_NO_TABLE = np.zeros(1, np.float32)


def _table(dt: DType) -> np.ndarray:
    return decode_table(dt) if dt in (DType.F16, DType.FP8_E4M3, DType.FP8_E5M2) else _NO_TABLE


class CpuClient(Client):
    def __init__(self, runtime):
        self.runtime = runtime

    def run_fwd(self, cfg, q, k, v):
        return self._forward(cfg, q, k, v, cfg.scale, 1.0)

    def run_fwd_fp8(self, cfg, q, k, v):
        # Dequantization scales fold into the score scale and the output scale.
        return self._forward(cfg, q, k, v, cfg.scale * cfg.q_scale * cfg.k_scale, cfg.v_scale / cfg.o_scale)

    def _forward(self, cfg, q, k, v, qk_scale, out_scale):
        from ..kernels.cpu.paged_attention import paged_attention_fwd

        out = np.empty(cfg.q_shape, np.float32)
        lse = np.empty(cfg.q_shape[:3], np.float32)
        if out.size:
            paged_attention_fwd(q, k.reshape(cfg.kv_shape), v.reshape(cfg.kv_shape), cfg.block_table,
                                cfg.seq_lens, qk_scale, out_scale, cfg.causal, _TQ,
                                cfg.q_dtype.code, _table(cfg.q_dtype), cfg.kv_dtype.code,
                                _table(cfg.kv_dtype), out, lse)
            check_overflow(lse, cfg)
        elif lse.size:
            lse.fill(-np.inf)
        return encode_f32(out, cfg.q_dtype), lse


def check_overflow(lse, cfg):
    """The kernels flag rows with non-finite scores with lse = +inf."""
    if np.isposinf(lse).any():
        b, h, i = (int(x) for x in np.argwhere(np.isposinf(lse))[0])
        raise ValueError(f"scale: the scores of row (b={b}, h={h}, i={i}) are not finite: scale * q . k "
                         f"overflows float32 (scale={cfg.scale:g}) or q / k_blocks hold inf or NaN "
                         "in tokens that are read")


class CpuRuntime(Runtime):
    name = "cpu"

    def __init__(self):
        import numba

        self.device = Device("cpu", 0, f"{os.cpu_count()} cores, {numba.config.NUMBA_NUM_THREADS} numba threads")
        self.client = CpuClient(self)

    def from_host(self, arr):
        return np.ascontiguousarray(arr)

    def to_host(self, storage):
        return np.array(storage, copy=True)

    def is_native(self, obj):
        return isinstance(obj, np.ndarray)
