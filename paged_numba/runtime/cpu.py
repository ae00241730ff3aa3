"""The ``cpu`` runtime: storage is NumPy arrays; ops run as parallel ``@njit`` kernels."""
from __future__ import annotations

import os

import numba
import numpy as np

from ..kernels.cpu.codecs import decode_f32, encode_f32
from ..kernels.cpu.launch import launch
from .base import Client, Device, Runtime

_TQ = 32  # queries per parallel work item (times G query heads)
_TQ_FWD = 128  # forward: rows (GQA heads x queries) per parallel work item


# Estimated single-thread rates (multiply-adds per microsecond) of the kernels' inner paths on the
# 2-core development machine; ``launch`` runs a call on the calling thread alone below
# ``launch.SERIAL_US`` of estimated work (benchmarks/cpu_under_load.py).
_MACS_PER_US_ROWS = 4e3     # decode path: per-key dot products, decode-bound (4-9e3 measured)
_MACS_PER_US_GEMM = 3e4     # GEMM path (prefill, backward): 512-bit microkernels
_COPY_PER_US = 1e3          # write_kv: elements per microsecond


def visible_pairs(cfg) -> int:
    """(query row, key) pairs that the mask lets through, summed over the batch (per head)."""
    lens = cfg.seq_lens.astype(np.int64)
    Sq = cfg.Sq
    if not cfg.causal:
        return int(lens.sum()) * Sq
    # query i sees min(L, max(0, L - Sq + i + 1)) keys
    full = np.minimum(lens, Sq)                      # rows on the diagonal part
    return int((np.maximum(lens - Sq, 0) * Sq + full * (full + 1) // 2).sum())


def readonly(x: np.ndarray) -> np.ndarray:
    """A read-only view of ``x`` (no copy; ``x`` itself is untouched). Kernels take every input
    as read-only, so writable and read-only arrays share one compiled specialization."""
    if not x.flags.writeable:
        return x
    view = x.view()
    view.flags.writeable = False
    return view


class CpuClient(Client):
    supports_score_mods = True  # ragged / window / softcap / ALiBi: forward, FP8 forward and backward
    supports_plans = True       # run_* take out= / lse= buffers and a plan's state (None here)

    def __init__(self, runtime):
        self.runtime = runtime

    def run_fwd(self, cfg, q, k, v, *, out=None, lse=None, state=None):
        return self._forward(cfg, q, k, v, cfg.scale, 1.0, out, lse)

    def run_fwd_fp8(self, cfg, q, k, v, *, out=None, lse=None, state=None):
        # Dequantization scales fold into the score scale and the output scale.
        return self._forward(cfg, q, k, v, cfg.scale * cfg.q_scale * cfg.k_scale, cfg.v_scale / cfg.o_scale,
                             out, lse)

    @staticmethod
    def _buffers(cfg, out, lse):
        """(float32 out the kernel writes, lse): ``out`` itself when it is float32 storage."""
        o32 = out if out is not None and out.dtype == np.float32 else np.empty(cfg.q_shape, np.float32)
        return o32, (lse if lse is not None else np.empty(cfg.lse_shape, np.float32))

    @staticmethod
    def _result(o32, out, cfg):
        res = encode_f32(o32, cfg.q_dtype)
        if out is None or res is out:
            return res
        out[...] = res
        return out

    def _forward(self, cfg, q, k, v, qk_scale, out_scale, out_buf=None, lse_buf=None):
        from ..kernels.cpu.paged_attention import fwd_kernel, n_items, uses_gemm

        # A window that hides no key (window_left >= L - 1 everywhere) on a dense, unmodified call is
        # the plain one.
        window_only = (not cfg.ragged and cfg.softcap == 0.0 and cfg.alibi_slopes is None
                       and bool((cfg.seq_lens.astype(np.int64) - 1 <= cfg.window_left).all()))
        if not (cfg.plain or window_only):
            return self._forward_mods(cfg, q, k, v, qk_scale, out_scale, out_buf, lse_buf)
        out, lse = self._buffers(cfg, out_buf, lse_buf)
        if out.size:
            B, H, Sq, D = cfg.q_shape
            Hkv = cfg.kv_shape[2]
            gemm = uses_gemm(Sq, H // Hkv, _TQ_FWD)
            est_us = 2 * H * D * visible_pairs(cfg) / (_MACS_PER_US_GEMM if gemm else _MACS_PER_US_ROWS)
            args = (readonly(q), readonly(k.reshape(cfg.kv_shape)), readonly(v.reshape(cfg.kv_shape)),
                    readonly(cfg.block_table), readonly(cfg.seq_lens), float(qk_scale), float(out_scale),
                    bool(cfg.causal), _TQ_FWD, out, lse)
            launch(fwd_kernel(cfg.q_dtype.code, cfg.kv_dtype.code, gemm), args,
                   n_items(B, H, Hkv, Sq, _TQ_FWD), est_us)
            check_overflow(lse, cfg)
        elif lse.size:
            lse.fill(-np.inf)
        return self._result(out, out_buf, cfg), lse

    def _forward_mods(self, cfg, q, k, v, qk_scale, out_scale, out_buf=None, lse_buf=None):
        from ..kernels.cpu.paged_attention import fwd_mods_kernel, mod_items

        out, lse = self._buffers(cfg, out_buf, lse_buf)
        if out.size:
            D = cfg.D
            row0, sh, si = cfg.row_layout()
            slopes = (cfg.alibi_slopes if cfg.alibi_slopes is not None else np.zeros(cfg.H, np.float32))
            out2, lse1 = out.reshape(-1, D), lse.reshape(-1)   # every row is some work item's: no fill
            for gemm, (ib, ik, iq, inq) in mod_items(cfg, _TQ_FWD).items():
                est_us = 2 * D * float(np.sum(inq.astype(np.int64) * cfg.G * np.minimum(
                    cfg.seq_lens[ib], cfg.max_span))) / (_MACS_PER_US_GEMM if gemm else _MACS_PER_US_ROWS)
                args = (readonly(q.reshape(-1, D)), readonly(k.reshape(cfg.kv_shape)),
                        readonly(v.reshape(cfg.kv_shape)), readonly(cfg.block_table), readonly(cfg.seq_lens),
                        readonly(cfg.q_lens), readonly(row0), int(sh), int(si), readonly(ib), readonly(ik),
                        readonly(iq), readonly(inq), float(qk_scale), float(out_scale), bool(cfg.causal),
                        int(cfg.window_left), float(cfg.softcap), readonly(slopes), out2, lse1)
                # a ragged batch without window / softcap / ALiBi runs the plain score loops
                launch(fwd_mods_kernel(cfg.q_dtype.code, cfg.kv_dtype.code, gemm, cfg.score_mods), args, ib.size,
                       est_us)
            if np.isposinf(lse).any():
                idx = tuple(int(x) for x in np.argwhere(np.isposinf(lse))[0])
                raise ValueError(f"scale: the scores of row {idx} (of lse's shape {lse.shape}) are not finite: "
                                 f"scale * q . k overflows float32 (scale={cfg.scale:g}) or q / k_blocks hold "
                                 "inf or NaN in tokens that are read")
        return self._result(out, out_buf, cfg), lse

    def run_bwd(self, cfg, dout, q, k, v, out, lse, *, state=None):
        from ..kernels.cpu.paged_attention import LOG2E
        from ..kernels.cpu.paged_attention_bwd import dkdv_kernel, dq_items, dq_kernel, gemm_ok

        qd, kd = cfg.q_dtype, cfg.kv_dtype
        qf, dof, outf = (decode_f32(x, qd).reshape(-1, cfg.D) for x in (q, dout, out))  # [rows, D]
        dq = np.empty(qf.shape, np.float32)
        dk = np.zeros(cfg.kv_shape, np.float32)
        dv = np.zeros(cfg.kv_shape, np.float32)
        if dq.size:
            H, D, Hkv = cfg.H, cfg.D, cfg.Hkv
            # FlashAttention-2's preprocessing, rowsum(dout * out), accumulated in float32
            delta = readonly(np.einsum("rd,rd->r", dof, outf, dtype=np.float32))
            lse2 = readonly((lse.reshape(-1) * np.float32(LOG2E)).astype(np.float32))
            gemm = gemm_ok(cfg.bs, D)
            # per pass: S and dP recomputed, then dV and dK, or dQ
            est_us = 3 * H * D * visible_pairs(cfg) / (_MACS_PER_US_GEMM if gemm else _MACS_PER_US_ROWS)
            common = (readonly(qf), readonly(dof), readonly(k.reshape(cfg.kv_shape)),
                      readonly(v.reshape(cfg.kv_shape)), delta, lse2)
            row0, sh, si = cfg.row_layout()   # rows of the dense or the ragged layout
            slopes = cfg.alibi_slopes if cfg.alibi_slopes is not None else np.zeros(H, np.float32)
            layout = (readonly(cfg.seq_lens), readonly(cfg.q_lens), readonly(row0), int(sh), int(si))
            mods = (float(cfg.scale), bool(cfg.causal), int(cfg.window_left), float(cfg.softcap),
                    readonly(slopes))
            blocks, rd_start, rd_b, rd_lb = (readonly(x) for x in block_readers(cfg))
            launch(dkdv_kernel(kd.code, gemm), common + layout + mods + (blocks, rd_start, rd_b, rd_lb, dk, dv),
                   Hkv * blocks.size, est_us)
            items = tuple(readonly(x) for x in dq_items(cfg.q_lens, Hkv, _TQ))
            launch(dq_kernel(kd.code, gemm), common + (readonly(cfg.block_table),) + layout + items + mods + (dq,),
                   items[0].size, est_us)
        return (encode_f32(dq, qd).reshape(q.shape), encode_f32(dk, kd).reshape(k.shape),
                encode_f32(dv, kd).reshape(v.shape))

    def run_write_kv(self, cfg, k_pool, v_pool, k, v):
        from ..kernels.cpu.write_kv import write_kv_rows

        if cfg.pool_dtype.is_fp8:  # value / scale in float32, then the saturating RNE encoder
            with np.errstate(over="ignore", invalid="ignore"):
                k = encode_f32(decode_f32(k, cfg.src_dtype) / np.float32(cfg.k_scale), cfg.pool_dtype)
                v = encode_f32(decode_f32(v, cfg.src_dtype) / np.float32(cfg.v_scale), cfg.pool_dtype)
        launch(write_kv_rows, (k_pool, v_pool, readonly(k), readonly(v), readonly(cfg.slots)),
               k.shape[0], 2 * k.size / _COPY_PER_US)


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
        self.device = Device("cpu", 0, f"{os.cpu_count()} cores, {numba.config.NUMBA_NUM_THREADS} numba threads")
        self.client = CpuClient(self)

    def from_host(self, arr):
        return np.ascontiguousarray(arr)

    def to_host(self, storage):
        return np.array(storage, copy=True)

    def is_native(self, obj):
        return isinstance(obj, np.ndarray)
