"""The ``cuda`` runtime: storage is numba device arrays; ops run as ``numba.cuda`` kernels.

This is the only module that imports ``numba.cuda``. Under ``NUMBA_ENABLE_CUDASIM=1`` the runtime
runs on numba's CUDA simulator (correctness at tiny shapes, no GPU needed).
"""
from __future__ import annotations

import collections
import threading

import numpy as np

from ..errors import RuntimeUnavailableError
from ..dtypes import BF16, F16, F32
from .base import Client, Device, Runtime

_FIX = ("install the NVIDIA driver and the CUDA toolkit wheels (pip install 'paged-numba[cuda13]' or "
        "'[cuda12]'), or set NUMBA_ENABLE_CUDASIM=1 for the simulator, or use runtime='cpu'")

_DECODE_NT = 128     # threads per decode block on a GPU
_DECODE_R = 4        # most query rows per decode block
_DECODE_EPL = 8      # most elements of a token row per lane (sets the lanes per row)
_DECODE_TILE_BYTES = 8192  # bytes of K (and as many of V) per shared-memory tile of a decode block
_DECODE_TPS = 4      # most tokens of a tile per token slot (R scores each, in registers)
_DECODE_MAX_PT = 2048  # longest split-K partition (its slot list lives in shared memory)
_SCRATCH_KEEP = 8    # scratch buffers kept per thread (metadata per (B, M), split-K partials per shape)
_DECODE_MAX_SQ = 4   # more queries per sequence: the tiled kernel (= ops.config.DECODE_MAX_Q, the work list's cut)
_STATIC_SMEM = 48 * 1024  # dynamic shared memory above this needs the kernel's opt-in attribute


_Meta = collections.namedtuple("_Meta", "table lens work slopes flag")


def _import_cuda():
    try:
        import numba
        from numba import cuda
    except Exception as exc:  # a missing libcudart surfaces as DynamicLibNotFoundError
        raise RuntimeUnavailableError(f"numba.cuda cannot be imported ({exc}); {_FIX}") from None
    return numba, cuda


def _word_dtype(row_bytes: int):
    for dt in (np.uint64, np.uint32, np.uint16, np.uint8):
        if row_bytes % np.dtype(dt).itemsize == 0:
            return np.dtype(dt)


def _tpg(D: int, W: int, sim: bool, epl: int) -> int:
    """Lanes per token row: the fewest (a power of two dividing the warp, at most W) that leave each
    lane at most ``epl`` elements of a row (more would spill registers), or the most there are."""
    if sim:
        return 1
    E = D // W                      # elements per word
    cap = 1
    while cap * 2 <= min(32, W):
        cap *= 2
    t = 1
    while t < cap and -(-W // t) * E > epl:
        t *= 2
    return t


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _decode_rows(rows: int) -> int:
    """Query rows per decode block: the G * Sq rows of a (sequence, KV head) rounded up to a power of
    two, at most ``_DECODE_R``."""
    return min(_DECODE_R, _pow2_at_most(2 * rows - 1))


def decode_geometry(D: int, kv_bytes: int, word_bytes: int, rows: int, PT: int, sim: bool) -> dict:
    """The decode kernel's geometry for head dim D, K/V elements of ``kv_bytes``, rows read as words
    of ``word_bytes``, ``rows`` = G * Sq query rows per (sequence, KV head) and partitions of PT
    tokens: TX lanes per token row, NT threads, R rows per block (the GQA group, up to
    ``_DECODE_R``), TT tokens per tile (about ``_DECODE_TILE_BYTES`` of K, at most PT and
    ``_DECODE_TPS`` tokens per token slot, a multiple of the NT / TX slots). The figures are the
    fastest of the H200 sweeps in benchmarks/results/gpu_decode_sweep.md."""
    W = D * kv_bytes // word_bytes
    TX = _tpg(D, W, sim, _DECODE_EPL)
    NT = 32 if sim else _DECODE_NT
    R = _decode_rows(rows)
    NZ = NT // TX
    # Static shared memory (48 KiB at most): slot list 8 * PT, K and V tiles, the warps' partial
    # results 4 * (NT / 32) * R * (D + 2).
    room = 48 * 1024 - 8 * PT - 4 * max(1, NT // 32) * R * (D + 2)
    tile = min(_DECODE_TILE_BYTES, room // 2)
    TT = max(NZ, min(PT, _DECODE_TPS * NZ, _pow2_at_most(tile // (D * kv_bytes))))
    return dict(TX=TX, NT=NT, R=R, TT=TT)


def mma_tiles(D: int, sim: bool, fp8: bool = False, window: bool = False, mods: bool = False) -> tuple:
    """(NW warps, MT m-tiles of 16 query rows per warp, BK keys per tile) of the tensor-core prefill
    for head dim D (a multiple of 16); K/V tiles are double buffered in dynamic shared memory
    (``paged_prefill.smem_bytes``). Up to D 128: 4 warps of 32 rows (each K / V fragment read from
    shared memory feeds two mma) over 32-key tiles, 255 registers and no spills at D 128 -- the
    fastest of the H200 sweep in benchmarks/results/gpu_prefill_sweep.md; with FP8 K/V (whose
    decode pass needs registers of its own), a sliding window (per-row lower bounds) or the score
    modifiers (softcap / ALiBi: per-score work; 32-row warps spill) 8 warps of 16 rows over 64-key
    tiles, the fastest spill-free 16-row layout of the sweep; D 256: 16 rows per warp (the O
    accumulators take 128 registers), over 16-key tiles with the modifiers. The simulator runs 1 warp of 2 m-tiles over 16-key tiles
    (tests swap in others)."""
    if sim:
        return 1, 2, 16
    if D > 128:
        return 4, 1, 16 if mods else 32
    return (8, 1, 64) if fp8 or window or mods else (4, 2, 32)


def mma_bwd_tiles(D: int, sim: bool, window: bool = False, vred: bool = True) -> tuple:
    """(NW warps, BQ query rows per step, MAXREG register cap or 0) of the tensor-core backward
    (``paged_backward_mma``) for head dim D (a multiple of 16, at most 128): a block owns 16 * NW
    keys (16 per warp; dK / dV of D floats per thread stay in registers), the step's q / dout rows
    are double buffered in dynamic shared memory (``paged_backward_mma.smem_bytes``). 8 warps over
    128 keys (as FlashAttention-2 at D 64 / 128): each step's dQ atomics (BQ x D per block) and q /
    dout copies serve 128 keys; BQ 64 up to D 64, 32 above. Uncapped, ptxas takes 255 registers
    and spills a few bytes in some of these (D 80, D 64 with a window, D 128 without VRED); the
    caps are ones the sm_90 (``vred``: vector reductions) / sm_80 check compiles without spills
    (scripts/cuda_compile_check.py) -- ptxas is erratic this close to 255 (at D 64 a cap of 224
    spills with VRED and 232 without, not the other way round).
    Not yet tuned on a GPU: benchmarks/gpu_backward.py --bwd-tiles compares layouts. The simulator
    runs 1 warp over 16-row steps (tests swap in others). (issue 11 item 5)"""
    if sim:
        return 1, 16, 0
    if D <= 64:
        return 8, 64, (232 if vred or window else 224)
    return 8, 32, (200 if D <= 80 else 240)


class CudaClient(Client):
    supports_score_mods = True    # cu_seqlens_q, window_left, softcap, alibi_slopes
    #: F16 / BF16 prefill (more than 4 queries, head dims multiple of 16) on tensor cores; False:
    #: the SIMT tiled kernel (kept for F32, other head dims, FP8 q, and for comparisons).
    prefill_mma = True
    #: F16 / BF16 backward (head dims multiples of 16 up to 128, no softcap / ALiBi) on tensor
    #: cores; False: the SIMT kernels (issue 11 item 5).
    backward_mma = True

    def __init__(self, runtime):
        self.runtime = runtime
        self._cuda = runtime._cuda
        self._local = threading.local()
        self._smem_opt_in = {}     # id(dispatcher) -> its overloads when the last one opted in

    def run_fwd(self, cfg, q, k, v):
        return self._forward(cfg, q, k, v, cfg.scale, 1.0)

    def run_fwd_fp8(self, cfg, q, k, v):
        return self._forward(cfg, q, k, v, cfg.scale * cfg.q_scale * cfg.k_scale, cfg.v_scale / cfg.o_scale)

    def run_bwd(self, cfg, dout, q, k, v, out, lse):
        from ..kernels.cuda.paged_attention_bwd import (bwd_tiles, delta_kernel, dkdv_kernel, dq_kernel,
                                                       encode_kernel, fill_kernel)

        cuda = self._cuda
        rt = self.runtime
        dt = cfg.q_dtype            # the backward takes one dtype for q, k, v
        N, bs, Hkv, D = cfg.kv_shape
        B, H = cfg.B, cfg.H
        dq = cuda.device_array(cfg.q_shape, dt.storage)
        n_pool = N * bs * Hkv * D
        dk = cuda.device_array(n_pool, np.float32)
        dv = cuda.device_array(n_pool, np.float32)
        ET = 32 if rt.simulator else 256      # threads of the element-wise, grid-stride kernels
        EB = min(-(-n_pool // ET), 8 * rt.sm_count)
        if n_pool:
            fill_kernel()[EB, ET](dk)
            fill_kernel()[EB, ET](dv)
        n_rows = int(np.prod(cfg.lse_shape))
        if dq.size:
            meta = self._metadata(cfg)
            _, sh, si = cfg.row_layout()
            q2, do2, o2, dq2 = (x.reshape(n_rows, D) for x in (q, dout, out, dq))
            delta = cuda.device_array(n_rows, np.float32)
            lse2 = cuda.device_array(n_rows, np.float32)
            delta_kernel(D, dt.code)[-(-n_rows // ET), ET](do2, o2, lse.reshape(n_rows), delta, lse2)
            if self._bwd_mma_ok(cfg, q2, do2, k, v):   # issue 11 item 5: the tensor-core backward
                self._bwd_mma(cfg, meta, q2, do2, k, v, lse2, delta, dk, dv, dq2)
            else:
                BQ, BK, TY = bwd_tiles(D, rt.simulator)
                k3, v3 = k.reshape(N * bs, Hkv, D), v.reshape(N * bs, Hkv, D)
                dk3, dv3 = dk.reshape(N * bs, Hkv, D), dv.reshape(N * bs, Hkv, D)
                mods = self._mods(cfg)
                args = (q2, do2, k3, v3, meta.table, meta.lens, meta.work, bs, H, sh, si, cfg.scale, cfg.causal,
                        cfg.window_left, cfg.softcap, meta.slopes, delta, lse2)
                if cfg.max_span:
                    dkdv_kernel(D, dt.code, BQ, BK, TY, **mods)[(B * Hkv, -(-cfg.max_span // BK)), 8 * TY](
                        *args, dk3, dv3)
                dq_kernel(D, dt.code, BQ, BK, TY, **mods)[(B * H, -(-cfg.Sq // BQ)), 8 * TY](*args, dq2)
        if dt.code != F32 and n_pool:
            dk16 = cuda.device_array(n_pool, dt.storage)
            dv16 = cuda.device_array(n_pool, dt.storage)
            encode_kernel(dt.code)[EB, ET](dk, dk16)
            encode_kernel(dt.code)[EB, ET](dv, dv16)
            dk, dv = dk16, dv16
        elif dt.code != F32:
            dk, dv = (cuda.device_array(n_pool, dt.storage) for _ in range(2))
        return dq, dk.reshape(k.shape), dv.reshape(v.shape)

    # ---- issue 11 item 5: the tensor-core backward (routing from run_bwd) ----
    def _bwd_mma_ok(self, cfg, *arrays) -> bool:
        """The tensor-core backward takes F16 / BF16, head dims that are multiples of 16 up to 128
        (at 256 the dK / dV accumulators of a warp's 16 keys take 256 registers), no softcap / ALiBi
        (the SIMT kernels), and 16-byte aligned q / dout / K / V (cp.async copies 16 bytes); ragged
        batches and windows included."""
        if not (self.backward_mma and cfg.q_dtype.code in (F16, BF16) and cfg.D % 16 == 0 and cfg.D <= 128):
            return False
        if cfg.softcap > 0.0 or cfg.alibi_slopes is not None:
            return False
        return self.runtime.simulator or all(x.device_ctypes_pointer.value % 16 == 0 for x in arrays)

    def _bwd_mma(self, cfg, meta, q2, do2, k, v, lse2, delta, dk, dv, dq2):
        """dK / dV (float32 pools ``dk`` / ``dv``, zeroed) and dQ (float32 atomics into a zeroed
        buffer, then encoded into ``dq2``) in one tensor-core pass over key tiles."""
        from ..kernels.cuda.paged_attention_bwd import encode_kernel, fill_kernel
        from ..kernels.cuda.paged_backward_mma import dkdvq_kernel, smem_bytes

        rt = self.runtime
        _, bs, Hkv, D = cfg.kv_shape
        _, sh, si = cfg.row_layout()
        window = cfg.window_left >= 0
        # sm_90: dQ / dK / dV pairs by one vector reduction (the simulator runs its twin: 2 atomics)
        vred = rt.simulator or self._cuda.get_current_device().compute_capability >= (9, 0)
        NW, BQ, MAXREG = mma_bwd_tiles(D, rt.simulator, window, vred)
        n = q2.size
        dqf = self._cuda.device_array(n, np.float32)
        ET = 32 if rt.simulator else 256
        EB = min(-(-n // ET), 8 * rt.sm_count)
        fill_kernel()[EB, ET](dqf)
        if cfg.max_span:
            kern = dkdvq_kernel(D, cfg.q_dtype.code, NW, BQ, WINDOW=window, VRED=vred, MAXREG=MAXREG)
            args = (q2.reshape(n), do2.reshape(n), k.reshape(k.size), v.reshape(v.size), meta.table, meta.lens,
                    meta.work, cfg.H, sh, si, bs, Hkv, cfg.scale, cfg.causal, cfg.window_left, lse2, delta, dk, dv,
                    dqf)
            self._launch(kern, (cfg.B * Hkv, -(-cfg.max_span // (16 * NW))), 32 * NW, smem_bytes(D, NW, BQ), args)
        encode_kernel(cfg.q_dtype.code)[EB, ET](dqf, dq2.reshape(n))
    # ---- end of issue 11 item 5 ----

    @staticmethod
    def _mods(cfg) -> dict:
        """The kernels' compile-time score-modifier flags."""
        return dict(SOFTCAP=cfg.softcap > 0.0, ALIBI=cfg.alibi_slopes is not None)

    def _forward(self, cfg, q, k, v, qk_scale, out_scale):
        """The work list routes each sequence: up to ``_DECODE_MAX_SQ`` queries to the split-K decode
        kernel, more to the tiled kernel -- a mixed (ragged) batch runs both, each on its own
        sequences, writing disjoint rows of one output."""
        cuda = self._cuda
        out = cuda.device_array(cfg.q_shape, cfg.q_dtype.storage)
        lse = cuda.device_array(cfg.lse_shape, np.float32)
        if out.size == 0:
            if lse.size:
                lse = cuda.to_device(np.full(cfg.lse_shape, -np.inf, np.float32))
            return out, lse
        meta = self._metadata(cfg)
        n_rows = lse.size
        out2, lse1 = out.reshape(n_rows, cfg.D), lse.reshape(n_rows)
        q2 = q.reshape(n_rows, cfg.D)
        if cfg.tiled_seqs.size:
            self._tiled(cfg, meta, q2, k, v, qk_scale, out_scale, out2, lse1)
        if cfg.decode_seqs.size:
            self._decode(cfg, meta, q2, k, v, qk_scale, out_scale, out2, lse1)
        self._check(meta.flag, cfg)
        return out, lse

    def _tiled(self, cfg, meta, q2, k, v, qk_scale, out_scale, out2, lse1):
        """The tiled (prefill) kernels over ``cfg.tiled_seqs``: on tensor cores when
        ``_mma_prefill_ok``, else the SIMT kernel; both handle every layout, mask and score
        modifier."""
        if self._mma_prefill_ok(cfg, q2, k, v):
            return self._tiled_mma(cfg, meta, q2, k, v, qk_scale, out_scale, out2, lse1)
        from ..kernels.cuda.paged_attention import tile_shape, tiled_kernel

        D, kd = cfg.D, cfg.kv_dtype
        wdt = _word_dtype(D * kd.itemsize)
        _, sh, si = cfg.row_layout()
        sq = int(cfg.q_lens[cfg.tiled_seqs].max())
        BQ, BK, NTT = tile_shape(D, self.runtime.simulator)
        kw = k.reshape(cfg.kv_shape).view(wdt)
        vw = v.reshape(cfg.kv_shape).view(wdt)
        kern = tiled_kernel(D, cfg.q_dtype.code, kd.code, cfg.q_dtype.code, wdt.itemsize * 8, BQ, BK, NTT,
                            **self._mods(cfg))
        kern[(cfg.tiled_seqs.size * cfg.H, -(-sq // BQ)), NTT](
            q2, kw, vw, meta.table, meta.lens, meta.work, cfg.H, sh, si, qk_scale, out_scale, cfg.causal,
            cfg.window_left, cfg.softcap, meta.slopes, out2, lse1, meta.flag)

    def _decode(self, cfg, meta, q2, k, v, qk_scale, out_scale, out2, lse1):
        """The split-K decode kernel (and its merge) over ``cfg.decode_seqs``; partitions cover each
        sequence's keys from the first one its window lets a query see."""
        from ..kernels.cuda.paged_decode import decode_kernel, merge_kernel

        cuda = self._cuda
        rt = self.runtime
        D, kd = cfg.D, cfg.kv_dtype
        wdt = _word_dtype(D * kd.itemsize)
        bs, Hkv = cfg.kv_shape[1:3]
        _, sh, si = cfg.row_layout()
        seqs = cfg.decode_seqs
        sq = int(cfg.q_lens[seqs].max())
        span = int((cfg.seq_lens[seqs].astype(np.int64) - cfg.key_start()[seqs]).max())
        rows = cfg.G * sq
        rows_blocks = seqs.size * Hkv * -(-rows // _decode_rows(rows))
        PT = self._partition(span, rows_blocks)
        n_parts = max(1, -(-span // PT))
        geo = decode_geometry(D, kd.itemsize, wdt.itemsize, rows, PT, rt.simulator)
        NT = geo["NT"]
        kern = decode_kernel(D, cfg.q_dtype.code, kd.code, cfg.q_dtype.code, wdt.itemsize * 8, PT=PT, **geo,
                             **self._mods(cfg))
        kr = k.reshape(k.size).view(wdt)    # flat word arrays
        vr = v.reshape(v.size).view(wdt)
        shape = (seqs.size, cfg.H, sq, n_parts)
        if n_parts == 1:   # the kernel writes out / lse itself; po / pml only carry the shape
            po, pml = self._cached(("dummy", sq), lambda: (cuda.device_array((1, 1, sq, 1, 1), np.float32),) * 2)
        else:
            po, pml = self._cached(("split", *shape, D), lambda: (cuda.device_array((*shape, D), np.float32),
                                                                 cuda.device_array((*shape, 2), np.float32)))
        kern[(rows_blocks, n_parts), NT](q2, kr, vr, meta.table, meta.lens, meta.work, bs, Hkv, cfg.H, sh, si,
                                         qk_scale, out_scale, cfg.causal, cfg.window_left, cfg.softcap,
                                         meta.slopes, out2, lse1, po, pml, meta.flag)
        if n_parts > 1:
            MT = 32 if rt.simulator else min(128, 32 * -(-D // 32))
            merge_kernel(D, cfg.q_dtype.code, MT)[seqs.size * cfg.H * sq, MT](po, pml, meta.work, sh, si,
                                                                               out_scale, out2, lse1)

    def _tiled_mma(self, cfg, meta, q2, k, v, qk_scale, out_scale, out2, lse1):
        from ..kernels.cuda.paged_prefill import prefill_kernel, smem_bytes

        D, kd = cfg.D, cfg.kv_dtype
        bs, Hkv = cfg.kv_shape[1:3]
        _, sh, si = cfg.row_layout()
        sq = int(cfg.q_lens[cfg.tiled_seqs].max())
        window = cfg.window_left >= 0
        mods = self._mods(cfg)
        NW, MT, BK = mma_tiles(D, self.runtime.simulator, kd.is_fp8, window, any(mods.values()))
        kern = prefill_kernel(D, cfg.q_dtype.code, NW, BK, MT, kd.code, WINDOW=window, **mods)
        args = (q2.reshape(q2.size), k.reshape(k.size), v.reshape(v.size), meta.table, meta.lens, meta.work,
                cfg.H, sh, si, bs, Hkv, qk_scale, out_scale, cfg.causal, cfg.window_left, cfg.softcap,
                meta.slopes, out2.reshape(out2.size).view(np.uint32), lse1, meta.flag)
        grid = (cfg.tiled_seqs.size * Hkv, -(-cfg.G * sq // (16 * MT * NW)))
        self._launch(kern, grid, 32 * NW, smem_bytes(D, NW, BK, MT, kd.is_fp8), args)

    def _mma_prefill_ok(self, cfg, q, k, v) -> bool:
        """The tensor-core prefill takes F16 / BF16 q with K/V of the same dtype or FP8 (decoded
        exactly into q's dtype), head dims that are multiples of 16 and 16-byte aligned q / K / V
        (cp.async copies 16 bytes); ragged batches, windows, softcap and ALiBi."""
        code = cfg.q_dtype.code
        if not (self.prefill_mma and code in (F16, BF16) and cfg.D % 16 == 0
                and (cfg.kv_dtype.code == code or cfg.kv_dtype.is_fp8)):
            return False
        if self.runtime.simulator:
            return True
        return all(x.device_ctypes_pointer.value % 16 == 0 for x in (q, k, v))

    def _launch(self, kern, grid, block, smem, args):
        """Launch ``kern`` with ``smem`` bytes of dynamic shared memory. Above 48 KB the compiled
        kernel must opt in first (numba has no API for the attribute: it is set through the
        driver, once per compiled kernel; the argument types are looked up only while a
        dispatcher has kernels that have not opted in)."""
        if smem > _STATIC_SMEM and not self.runtime.simulator and \
                self._smem_opt_in.get(id(kern)) != len(kern.overloads):
            from numba.cuda.cudadrv.driver import binding, driver

            compiled = kern.compile(tuple(kern.typeof_pyval(a) for a in args))
            cufunc = compiled._codelibrary.get_cufunc()
            attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            # the opt-in limit covers static and dynamic shared memory together
            limit = self._cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN - cufunc.attrs.shared
            driver.cuKernelSetAttribute(attr, int(limit), cufunc.handle, cufunc.device.id)
            self._smem_opt_in[id(kern)] = len(kern.overloads)
        kern[grid, block, 0, smem](*args)

    def _metadata(self, cfg):
        """The call's metadata on the device -- table [B, M], seq_lens [B], work [4, B] (first q row,
        q_len, decode list, tiled list), ALiBi slopes [H] (float32) and the finiteness flag [1] --
        uploaded in one synchronous copy from pinned memory into buffers kept per (B, M, H): the copy
        is ordered after any earlier kernel that still reads them, and numba's array slicing and
        allocation cost more host time than the kernels of a decode step."""
        B, M = cfg.block_table.shape
        H = cfg.H
        host, meta, dev = self._cached(("meta", B, M, H), lambda: self._new_metadata(B, M, H))
        host[:B * M] = cfg.block_table.reshape(-1)
        host[B * M:B * M + B] = cfg.seq_lens
        w = host[B * M + B:B * M + 5 * B].reshape(4, B)
        w[0] = cfg.row_layout()[0]
        w[1] = cfg.q_lens
        w[2:] = 0
        w[2, :cfg.decode_seqs.size] = cfg.decode_seqs
        w[3, :cfg.tiled_seqs.size] = cfg.tiled_seqs
        sl = host[B * M + 5 * B:B * M + 5 * B + H].view(np.float32)
        sl[:] = 0.0 if cfg.alibi_slopes is None else cfg.alibi_slopes
        host[-1] = 0
        dev.copy_to_device(host)
        return meta

    def _new_metadata(self, B, M, H):
        cuda = self._cuda
        n = B * M + 5 * B + max(H, 1) + 1
        host = cuda.pinned_array(n, np.int32)
        dev = cuda.device_array(n, np.int32)
        o = B * M
        meta = _Meta(table=dev[:o].reshape(B, M), lens=dev[o:o + B], work=dev[o + B:o + 5 * B].reshape(4, B),
                     slopes=dev[o + 5 * B:o + 5 * B + max(H, 1)].view(np.float32), flag=dev[n - 1:])
        return host, meta, dev

    def _cached(self, key, make):
        """Per-thread scratch kept across calls (the few most recent keys)."""
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = collections.OrderedDict()
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        val = cache[key] = make()
        if len(cache) > _SCRATCH_KEEP:
            cache.popitem(last=False)
        return val

    @staticmethod
    def _check(flag, cfg):
        if flag.copy_to_host()[0]:
            raise ValueError(f"scale: some attention scores are not finite: scale * q . k overflows float32 "
                             f"(scale={cfg.scale:g}) or q / k_blocks hold inf or NaN in tokens that are read")

    def _partition(self, max_len: int, row_blocks: int) -> int:
        """Tokens per split-K partition: the longest (up to ``_DECODE_MAX_PT``, down to 64) that still
        gives every SM a thread block -- long partitions amortize each block's set-up and the merge;
        the simulator uses 16."""
        if self.runtime.simulator:
            return 16
        pt = _DECODE_MAX_PT
        while pt > 64 and row_blocks * -(-max_len // pt) < self.runtime.sm_count:
            pt //= 2
        return pt

    def run_merge_state(self, cfg, v_a, s_a, v_b, s_b):
        from ..kernels.cuda.merge_state import pair_kernel

        cuda = self._cuda
        D = cfg.v_shape[-1]
        R = int(np.prod(cfg.lse_shape))
        out = cuda.device_array(cfg.out_shape, cfg.dtype.storage)
        lse = cuda.device_array(cfg.lse_shape, np.float32)
        if R:
            NT = 32 if self.runtime.simulator else min(128, 32 * -(-D // 32))
            pair_kernel(D, cfg.dtype.code, NT)[R, NT](v_a.reshape(R, D), s_a.reshape(R), v_b.reshape(R, D),
                                                      s_b.reshape(R), out.reshape(R, D), lse.reshape(R))
        return out, lse

    def run_merge_states(self, cfg, v, s):
        from ..kernels.cuda.merge_state import states_kernel

        cuda = self._cuda
        T, K, H, D = cfg.v_shape
        out = cuda.device_array(cfg.out_shape, cfg.dtype.storage)
        lse = cuda.device_array(cfg.lse_shape, np.float32)
        if T * H:
            NT = 32 if self.runtime.simulator else min(128, 32 * -(-D // 32))
            states_kernel(D, cfg.dtype.code, NT)[T * H, NT](v, s, out, lse)
        return out, lse

    def run_write_kv(self, cfg, k_pool, v_pool, k, v):
        from ..kernels.cuda.write_kv import write_kv_kernel

        n = cfg.T * cfg.Hkv * cfg.D
        NT = 32 if self.runtime.simulator else 256
        slots = self._cuda.to_device(cfg.slots)
        kern = write_kv_kernel(cfg.pool_dtype.code, cfg.src_dtype.code)
        kern[-(-n // NT), NT](k_pool, v_pool, k, v, slots, np.float32(cfg.k_scale), np.float32(cfg.v_scale))


class CudaRuntime(Runtime):
    name = "cuda"

    def __init__(self):
        numba, cuda = _import_cuda()
        self._cuda = cuda
        self.simulator = bool(numba.config.ENABLE_CUDASIM)
        if not self.simulator:
            try:
                ok = cuda.is_available()
            except Exception as exc:  # pragma: no cover - driver trouble
                raise RuntimeUnavailableError(f"the CUDA driver failed to start ({exc}); {_FIX}") from None
            if not ok:
                raise RuntimeUnavailableError(f"no usable CUDA GPU or driver was found; {_FIX}")
        if self.simulator:
            self.sm_count = 1
            self.device = Device("cuda", 0, "numba CUDA simulator")
        else:
            dev = cuda.get_current_device()
            name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
            cc = dev.compute_capability
            self.sm_count = int(dev.MULTIPROCESSOR_COUNT)
            self.device = Device("cuda", int(dev.id), f"{name}, sm_{cc[0]}{cc[1]}, {self.sm_count} SMs")
        self.client = CudaClient(self)

    def synchronize(self):
        self._cuda.synchronize()

    def from_host(self, arr):
        arr = np.ascontiguousarray(arr)
        canonical = tuple(int(np.prod(arr.shape[i + 1:])) * arr.itemsize for i in range(arr.ndim))
        if arr.strides != canonical:  # e.g. a size-1 axis with stride 0 from x[:, None]
            arr = arr.copy(order="C")
        return self._cuda.to_device(arr)

    def to_host(self, storage):
        return storage.copy_to_host()

    def from_external(self, obj):
        if self.simulator:
            raise TypeError("data: the CUDA simulator cannot take __cuda_array_interface__ objects; pass a "
                            "NumPy array")
        arr = self._cuda.as_cuda_array(obj)
        if not arr.is_c_contiguous():
            raise ValueError("data: expected a C-contiguous device array (call .contiguous() first)")
        return arr, arr.dtype

    def is_native(self, obj):
        return self._cuda.is_cuda_array(obj) if not self.simulator else hasattr(obj, "copy_to_host")
