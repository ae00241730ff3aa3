"""The ``cpu`` runtime: storage is NumPy arrays; ops run as parallel ``@njit`` kernels."""
from __future__ import annotations

import os

import numpy as np

from ..dtypes import decode_f32, encode_f32
from .base import Client, Device, Runtime

_TQ = 32  # queries per parallel work item (times G query heads)
_TQ_FWD = 128  # forward: rows (GQA heads x queries) per parallel work item


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
                                cfg.seq_lens, qk_scale, out_scale, cfg.causal, _TQ_FWD,
                                cfg.q_dtype.code, cfg.kv_dtype.code, out, lse)
            check_overflow(lse, cfg)
        elif lse.size:
            lse.fill(-np.inf)
        return encode_f32(out, cfg.q_dtype), lse

    def run_bwd(self, cfg, dout, q, k, v, out, lse):
        from ..kernels.cpu.paged_attention import LOG2E
        from ..kernels.cpu.paged_attention_bwd import bwd_delta, bwd_dkdv, bwd_dq

        qd, kd = cfg.q_dtype, cfg.kv_dtype
        qf, dof, outf = (decode_f32(x, qd) for x in (q, dout, out))
        k4, v4 = k.reshape(cfg.kv_shape), v.reshape(cfg.kv_shape)
        delta = np.empty(cfg.q_shape[:3], np.float32)
        dq = np.empty(cfg.q_shape, np.float32)
        dk = np.zeros(cfg.kv_shape, np.float32)
        dv = np.zeros(cfg.kv_shape, np.float32)
        if dq.size:
            lse2 = (lse * np.float32(LOG2E)).astype(np.float32)
            bwd_delta(dof, outf, delta)
            blocks, rd_start, rd_b, rd_lb = block_readers(cfg)
            if blocks.size:
                bwd_dkdv(qf, dof, k4, v4, delta, lse2, cfg.seq_lens, cfg.scale, cfg.causal, kd.code,
                         blocks, rd_start, rd_b, rd_lb, dk, dv)
            bwd_dq(qf, dof, k4, v4, delta, lse2, cfg.block_table, cfg.seq_lens, cfg.scale, cfg.causal,
                   _TQ, kd.code, dq)
        return (encode_f32(dq, qd), encode_f32(dk, kd).reshape(k.shape),
                encode_f32(dv, kd).reshape(v.shape))

    def run_write_kv(self, cfg, k_pool, v_pool, k, v):
        from ..kernels.cpu.write_kv import write_kv_rows

        if cfg.pool_dtype.is_fp8:  # value / scale in float32, then the saturating RNE encoder
            with np.errstate(over="ignore", invalid="ignore"):
                k = encode_f32(decode_f32(k, cfg.src_dtype) / np.float32(cfg.k_scale), cfg.pool_dtype)
                v = encode_f32(decode_f32(v, cfg.src_dtype) / np.float32(cfg.v_scale), cfg.pool_dtype)
        write_kv_rows(k_pool, v_pool, k, v, cfg.slots)


def block_readers(cfg):
    """The inverse of the block table for the backward's dK/dV pass: (blocks, rd_start, rd_b, rd_lb)
    -- the physical blocks in use and, for ``blocks[u]``, the readers (sequence, logical block)
    ``rd_b[x], rd_lb[x]`` for x in ``rd_start[u]:rd_start[u + 1]``. Blocks are ordered heavy, light,
    heavy, ... by their estimated work, so the static halves given to the threads stay balanced."""
    bs, Sq = cfg.bs, cfg.Sq
    lens = cfg.seq_lens.astype(np.int64)
    nblk = (lens + bs - 1) // bs
    total = int(nblk.sum())
    rd_b = np.repeat(np.arange(cfg.B), nblk)
    rd_lb = np.arange(total) - np.repeat(np.cumsum(nblk) - nblk, nblk)
    phys = cfg.block_table[rd_b, rd_lb].astype(np.int64)
    # Query rows that see a reader's block (causal: rows i >= t0 - L + Sq).
    t0 = rd_lb * bs
    work = Sq - (np.clip(t0 - lens[rd_b] + Sq, 0, Sq) if cfg.causal else np.zeros(total, np.int64))
    blocks, inv = np.unique(phys, return_inverse=True)
    per_block = np.bincount(inv, weights=work, minlength=blocks.size)
    heavy = np.argsort(-per_block, kind="stable")
    perm = np.empty_like(heavy)
    perm[0::2] = heavy[: (heavy.size + 1) // 2]
    perm[1::2] = heavy[(heavy.size + 1) // 2:][::-1]
    rank = np.empty_like(perm)
    rank[perm] = np.arange(perm.size)
    order = np.argsort(rank[inv], kind="stable")
    counts = np.bincount(rank[inv], minlength=blocks.size)
    rd_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return (blocks[perm].astype(np.int64), rd_start, rd_b[order].astype(np.int64),
            rd_lb[order].astype(np.int64))


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
