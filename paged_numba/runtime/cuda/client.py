"""CudaClient: the ops of the ``cuda`` runtime -- config (or plan) -> scratch -> kernel launches.

Launch geometry comes from ``plan.py`` (pure Python), device scratch from ``scratch.py``; this module
only picks kernels, packs their arguments and launches them.
"""
from __future__ import annotations

import numpy as np

from ...dtypes import BF16, F16, F32
from ..base import Client
from . import plan as _plan
from .launch import Graph, Launch, PreparedLaunch, as_stream, device_ptr
from .scratch import PlanState, Scratch, fill_metadata


def _flat(x, tf32: bool):
    """A device array as the tensor-core kernels take it: flat, and for the 3xTF32 kernels (``tf32``)
    its float32 bits as uint32 (their tiles are 32-bit words)."""
    x = x.reshape(x.size)
    return x.view(np.uint32) if tf32 else x


class CudaClient(Client):
    supports_score_mods = True    # cu_seqlens_q, window_left, softcap, alibi_slopes
    #: F16 / BF16 prefill (more than 4 queries, head dims multiple of 16) and F32 (3xTF32, head
    #: dims up to 128) on tensor cores; False: the SIMT tiled kernel (kept for other head dims,
    #: F32 q over FP8 K/V, FP8 q, and for comparisons).
    prefill_mma = True
    #: F16 / BF16 backward (head dims multiples of 16 up to 128, no softcap / ALiBi) on tensor
    #: cores; False: the SIMT kernels.
    backward_mma = True
    #: F16 / BF16 decode (up to 4 queries per sequence; K/V of q's dtype; head dims multiples of 16
    #: up to 128; batches of at least ``plan.mma_decode_wanted`` row blocks) as a split-K walk on
    #: tensor cores (``paged_prefill`` with SPLIT); False: the SIMT decode kernel (kept for F32,
    #: FP8 K/V, other head dims, long single sequences, and for comparisons).
    decode_mma = True
    #: A plan's second and later runs launch through cuLaunchKernel with argument buffers packed
    #: once (``launch.PreparedLaunch``); False: every launch goes through numba's dispatcher.
    prepared_launch = True
    supports_plans = True         # run_* take out= / lse= and a plan's state (prepare_plan)

    def __init__(self, runtime):
        self.runtime = runtime
        self._cuda = runtime._cuda
        self._scratch = Scratch(runtime._cuda)
        self._smem_opt_in = {}     # id(dispatcher) -> its overloads when the last one opted in
        self._prepared_ok = False  # a prepared launch has run once (failures after that are real errors)

    def run_fwd(self, cfg, q, k, v, *, out=None, lse=None, state=None):
        return self._forward(cfg, q, k, v, cfg.scale, 1.0, out, lse, state)

    def run_fwd_fp8(self, cfg, q, k, v, *, out=None, lse=None, state=None):
        return self._forward(cfg, q, k, v, cfg.scale * cfg.q_scale * cfg.k_scale, cfg.v_scale / cfg.o_scale,
                             out, lse, state)

    # ------------------------------------------------------------------------------ plans

    def prepare_plan(self, cfg, *, stream=None, own=True, check_finite=False) -> PlanState:
        """A plan's device state: its stream, its metadata uploaded (own: into buffers of its own,
        asynchronously from pinned memory on the stream; else: the per-thread scratch, synchronously),
        its split-K scratch and prepared launches."""
        cuda = self._cuda
        s = as_stream(cuda, stream, self.runtime.simulator)
        if own:
            B, M = cfg.block_table.shape
            host, meta, dev = self._scratch.new_metadata(B, M, cfg.H)
            fill_metadata(host, cfg)
            dev.copy_to_device(host, stream=s)
            return PlanState(s, meta, host=host, own=True, check_finite=check_finite)
        return PlanState(s, self._metadata(cfg), scratch=self._scratch, check_finite=check_finite)

    def check_plan(self, state, cfg) -> None:
        """Read the plan's non-finite-score flag (waits for its stream); raise and clear it when set."""
        flag = state.meta.flag
        seen = flag.copy_to_host(stream=state.stream)
        state.stream.synchronize()
        if seen[0]:
            flag.copy_to_device(np.zeros(1, np.int32), stream=state.stream)
            raise ValueError(f"scale: some attention scores are not finite: scale * q . k overflows float32 "
                             f"(scale={cfg.scale:g}) or q / k_blocks hold inf or NaN in tokens that are read")

    def synchronize_plan(self, state) -> None:
        state.stream.synchronize()

    def begin_capture(self, state) -> Graph:
        if self.runtime.simulator:
            raise NotImplementedError("plan.capture: the CUDA simulator has no CUDA graphs (run on a GPU)")
        if not state.cu_stream:
            raise RuntimeError("plan.capture: the default stream cannot be captured; plan on a stream of its own "
                               "(pn.plan_attention(..., stream=numba.cuda.stream()))")
        if state.check_finite:
            raise RuntimeError("plan.capture: a plan with check_finite=True waits for the device in every run, "
                               "which a graph cannot hold; capture a plan without it and call plan.check()")
        return Graph(state.stream, state.cu_stream)

    def run_bwd(self, cfg, dout, q, k, v, out, lse, *, state=None):
        from ...kernels.cuda.paged_attention_bwd import (delta_kernel, dkdv_kernel, dq_kernel, encode_kernel,
                                                       fill_kernel)

        cuda = self._cuda
        rt = self.runtime
        dt = cfg.q_dtype            # the backward takes one dtype for q, k, v
        N, bs, Hkv, D = cfg.kv_shape
        B, H = cfg.B, cfg.H
        dq = cuda.device_array(cfg.q_shape, dt.storage)
        n_pool = N * bs * Hkv * D
        dk = cuda.device_array(n_pool, np.float32)
        dv = cuda.device_array(n_pool, np.float32)
        ET = _plan.elementwise_threads(rt.simulator)   # threads of the element-wise, grid-stride kernels
        EB = min(-(-n_pool // ET), 8 * rt.sm_count)
        if n_pool:
            fill_kernel()[EB, ET](dk)
            fill_kernel()[EB, ET](dv)
        n_rows = int(np.prod(cfg.lse_shape))
        if dq.size:
            if state is not None:       # the backward launches on the default stream (not yet the plan's)
                state.stream.synchronize()
            meta = state.meta if state is not None else self._metadata(cfg)
            _, sh, si = cfg.row_layout()
            q2, do2, o2, dq2 = (x.reshape(n_rows, D) for x in (q, dout, out, dq))
            delta = cuda.device_array(n_rows, np.float32)
            lse2 = cuda.device_array(n_rows, np.float32)
            TX = _plan.delta_lanes(rt.simulator)
            delta_kernel(D, dt.code, TX)[-(-n_rows * TX // ET), ET](do2, o2, lse.reshape(n_rows), delta, lse2)
            if self._bwd_mma_ok(cfg, q2, do2, k, v):     # the tensor-core backward
                self._bwd_mma(cfg, meta, q2, do2, k, v, lse2, delta, dk, dv, dq2)
            else:
                BQ, BK, TY = _plan.bwd_tiles(D, rt.simulator)
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

    def _bwd_mma_ok(self, cfg, *arrays) -> bool:
        """The tensor-core backward takes F16 / BF16 / F32 (3xTF32), head dims that are multiples of 16 up to 128
        (at 256 the dK / dV accumulators of a warp's 16 keys take 256 registers), no softcap / ALiBi
        (the SIMT kernels), and 16-byte aligned q / dout / K / V (cp.async copies 16 bytes); ragged
        batches and windows included."""
        if not (self.backward_mma and cfg.q_dtype.code in (F16, BF16, F32) and cfg.D % 16 == 0 and cfg.D <= 128):
            return False
        if cfg.softcap > 0.0 or cfg.alibi_slopes is not None:
            return False
        return self._cp_async_ok(*arrays)

    def _bwd_mma(self, cfg, meta, q2, do2, k, v, lse2, delta, dk, dv, dq2):
        """dK / dV (float32 pools ``dk`` / ``dv``, zeroed) and dQ (float32 atomics into a zeroed
        buffer, then encoded into ``dq2``) in one tensor-core pass over key tiles."""
        from ...kernels.cuda.paged_attention_bwd import encode_kernel, fill_kernel
        from ...kernels.cuda.paged_backward_mma import dkdvq_kernel, smem_bytes

        rt = self.runtime
        _, bs, Hkv, D = cfg.kv_shape
        _, sh, si = cfg.row_layout()
        window = cfg.window_left >= 0
        # sm_90: dQ / dK / dV pairs by one vector reduction (the simulator runs its twin: 2 atomics)
        vred = rt.simulator or self._cuda.get_current_device().compute_capability >= (9, 0)
        tf32 = cfg.q_dtype.code == F32
        NW, BQ, MAXREG = _plan.mma_bwd_tiles(D, rt.simulator, window, vred, tf32=tf32, cc=rt.cc)
        n = q2.size
        dqf = dq2.reshape(n) if tf32 else self._cuda.device_array(n, np.float32)   # F32: the atomics go to dq
        ET = _plan.elementwise_threads(rt.simulator)
        EB = min(-(-n // ET), 8 * rt.sm_count)
        fill_kernel()[EB, ET](dqf)
        if cfg.max_span:
            kern = dkdvq_kernel(D, cfg.q_dtype.code, NW, BQ, WINDOW=window, VRED=vred, MAXREG=MAXREG)
            args = (*(_flat(x, tf32) for x in (q2, do2, k, v)), meta.table, meta.lens,
                    meta.work, cfg.H, sh, si, bs, Hkv, cfg.scale, cfg.causal, cfg.window_left, lse2, delta, dk, dv,
                    dqf)
            self._launch(Launch(kern, (cfg.B * Hkv, -(-cfg.max_span // (16 * NW))), 32 * NW,
                                smem_bytes(D, NW, BQ, tf32), args))
        if not tf32:
            encode_kernel(cfg.q_dtype.code)[EB, ET](dqf, dq2.reshape(n))

    @staticmethod
    def _mods(cfg) -> dict:
        """The kernels' compile-time score-modifier flags."""
        return dict(SOFTCAP=cfg.softcap > 0.0, ALIBI=cfg.alibi_slopes is not None)

    def _forward(self, cfg, q, k, v, qk_scale, out_scale, out=None, lse=None, state=None):
        """The work list routes each sequence: up to ``plan.DECODE_MAX_SQ`` queries to the split-K decode
        kernel, more to the tiled kernel -- a mixed (ragged) batch runs both, each on its own
        sequences, writing disjoint rows of one output. With a plan's ``state`` the metadata is
        the plan's, everything goes to its stream, nothing waits for the device (unless
        ``check_finite``), and from the second run of a kind on the launches are prepared ones."""
        cuda = self._cuda
        st = state if state is not None else self.prepare_plan(cfg, own=False)
        s = st.stream
        if out is None:
            out = cuda.device_array(cfg.q_shape, cfg.q_dtype.storage, stream=s)
        if lse is None:
            lse = cuda.device_array(cfg.lse_shape, np.float32, stream=s)
        if out.size == 0:
            if lse.size:
                lse.copy_to_device(np.full(cfg.lse_shape, -np.inf, np.float32), stream=s)
            return out, lse
        mma = bool(cfg.tiled_seqs.size) and self._mma_prefill_ok(cfg, q, k, v)
        dmma = bool(cfg.decode_seqs.size) and self._mma_decode_ok(cfg, q, k, v)
        key = (cfg.q_dtype.code, cfg.kv_dtype.code, float(qk_scale), float(out_scale), mma, dmma)
        prepared = st.prepared.get(key) if self.prepared_launch else None
        if prepared is not None:
            arrays = {n: (device_ptr(x), x.size * x.dtype.itemsize)
                      for n, x in (("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse))}
            try:
                for launch in prepared:
                    launch(st.cu_stream, arrays)
            except Exception as exc:
                if self._prepared_ok:
                    raise
                self._give_up_prepared(exc)     # the first prepared launch failed: numba's path from now on
                prepared = None
            else:
                self._prepared_ok = True
        if prepared is None:
            launches = self._forward_launches(cfg, st, q, k, v, qk_scale, out_scale, out, lse, mma, dmma)
            for launch in launches:
                self._launch(launch, s)
            if st.own and self.prepared_launch and not self.runtime.simulator:
                try:
                    st.prepared[key] = [PreparedLaunch(launch) for launch in launches]
                except Exception as exc:
                    self._give_up_prepared(exc)
        if state is None or st.check_finite:
            self.check_plan(st, cfg)
        return out, lse

    def _give_up_prepared(self, exc) -> None:
        import warnings

        self.prepared_launch = False
        warnings.warn(f"paged_numba: prepared CUDA launches are unavailable ({type(exc).__name__}: {exc}); "
                      "plans launch through numba's dispatcher", RuntimeWarning, stacklevel=3)

    def _forward_launches(self, cfg, st, q, k, v, qk_scale, out_scale, out, lse, mma, dmma) -> list:
        """The forward's launches (``launch.Launch`` records) for the plan state ``st``."""
        n_rows = lse.size
        out2, lse1 = out.reshape(n_rows, cfg.D), lse.reshape(n_rows)
        q2 = q.reshape(n_rows, cfg.D)
        launches = []
        if cfg.tiled_seqs.size:
            tiled = self._tiled_mma if mma else self._tiled
            launches += tiled(cfg, st, q2, k, v, qk_scale, out_scale, out2, lse1)
        if cfg.decode_seqs.size:
            decode = self._decode_mma if dmma else self._decode
            launches += decode(cfg, st, q2, k, v, qk_scale, out_scale, out2, lse1)
        return launches

    def _tiled(self, cfg, st, q2, k, v, qk_scale, out_scale, out2, lse1):
        """The SIMT tiled (prefill) kernel over ``cfg.tiled_seqs`` (every layout, mask and score
        modifier); ``_tiled_mma`` is its tensor-core twin."""
        from ...kernels.cuda.paged_attention import tiled_kernel

        meta = st.meta
        D, kd = cfg.D, cfg.kv_dtype
        wdt = _plan.word_dtype(D * kd.itemsize)
        _, sh, si = cfg.row_layout()
        sq = int(cfg.q_lens[cfg.tiled_seqs].max())
        BQ, BK, NTT = _plan.tile_shape(D, self.runtime.simulator)
        kw = k.reshape(cfg.kv_shape).view(wdt)
        vw = v.reshape(cfg.kv_shape).view(wdt)
        kern = tiled_kernel(D, cfg.q_dtype.code, kd.code, cfg.q_dtype.code, wdt.itemsize * 8, BQ, BK, NTT,
                            **self._mods(cfg))
        args = (q2, kw, vw, meta.table, meta.lens, meta.work, cfg.H, sh, si, qk_scale, out_scale, cfg.causal,
                cfg.window_left, cfg.softcap, meta.slopes, out2, lse1, meta.flag)
        words = (cfg.bs, cfg.Hkv, D * kd.itemsize // wdt.itemsize)
        roles = {0: ("q", (D,), q2.dtype.itemsize), 1: ("k", words, wdt.itemsize), 2: ("v", words, wdt.itemsize),
                 15: ("out", (D,), out2.dtype.itemsize), 16: ("lse", (), 4)}
        return [Launch(kern, (cfg.tiled_seqs.size * cfg.H, -(-sq // BQ)), NTT, 0, args, roles)]

    def _decode(self, cfg, st, q2, k, v, qk_scale, out_scale, out2, lse1):
        """The split-K decode kernel (and its merge) over ``cfg.decode_seqs``; partitions cover each
        sequence's keys from the first one its window lets a query see."""
        from ...kernels.cuda.paged_decode import decode_kernel

        rt = self.runtime
        meta = st.meta
        D, kd = cfg.D, cfg.kv_dtype
        wdt = _plan.word_dtype(D * kd.itemsize)
        bs, Hkv = cfg.kv_shape[1:3]
        _, sh, si = cfg.row_layout()
        seqs, sq, span = self._decode_batch(cfg)
        rows = cfg.G * sq
        rows_blocks = _plan.decode_row_blocks(seqs.size, Hkv, rows)
        lp = _plan.decode_launch(D, kd.itemsize, rows, span, rows_blocks, self._partition(span, rows_blocks),
                                 rt.simulator)
        n_parts = lp.n_parts
        kern = decode_kernel(D, cfg.q_dtype.code, kd.code, cfg.q_dtype.code, wdt.itemsize * 8, PT=lp.PT,
                             **lp.geometry, **self._mods(cfg), HWCVT=_plan.fp8_hw_convert(rt.cc))
        kr = k.reshape(k.size).view(wdt)    # flat word arrays
        vr = v.reshape(v.size).view(wdt)
        # with one partition the kernel writes out / lse itself; po / pml only carry the shape
        po, pml = self._split_scratch(st, (seqs.size, cfg.H, sq, n_parts), D)
        args = (q2, kr, vr, meta.table, meta.lens, meta.work, bs, Hkv, cfg.H, sh, si, qk_scale, out_scale,
                cfg.causal, cfg.window_left, cfg.softcap, meta.slopes, out2, lse1, po, pml, meta.flag)
        roles = {0: ("q", (D,), q2.dtype.itemsize), 1: ("k", (), wdt.itemsize), 2: ("v", (), wdt.itemsize),
                 17: ("out", (D,), out2.dtype.itemsize), 18: ("lse", (), 4)}
        launches = [Launch(kern, lp.grid, lp.NT, 0, args, roles)]
        if n_parts > 1:
            launches.append(self._merge_launch(cfg, st, seqs.size * cfg.H * sq, po, pml, out_scale, out2, lse1))
        return launches

    @staticmethod
    def _decode_batch(cfg):
        """(sequences of the decode work list, their most queries, their longest key span from the
        first key a window lets a query see)."""
        seqs = cfg.decode_seqs
        sq = int(cfg.q_lens[seqs].max())
        span = int((cfg.seq_lens[seqs].astype(np.int64) - cfg.key_start()[seqs]).max())
        return seqs, sq, span

    def _split_scratch(self, st, shape, D):
        """The split-K partial outputs / (max, sum) of ``shape`` = (sequences, H, SQ, partitions),
        kept in the plan state; with one partition only placeholders that carry SQ."""
        cuda, s = self._cuda, st.stream
        if shape[3] == 1:
            return st.cached(("dummy", shape[2]), lambda: (cuda.device_array((1, 1, shape[2], 1, 1), np.float32,
                                                                              stream=s),) * 2)
        return st.cached(("split", *shape, D), lambda: (cuda.device_array((*shape, D), np.float32, stream=s),
                                                        cuda.device_array((*shape, 2), np.float32, stream=s)))

    def _merge_launch(self, cfg, st, n_rows, po, pml, out_scale, out2, lse1):
        from ...kernels.cuda.paged_decode import merge_kernel

        _, sh, si = cfg.row_layout()
        MT = _plan.merge_threads(cfg.D, self.runtime.simulator)
        return Launch(merge_kernel(cfg.D, cfg.q_dtype.code, MT), n_rows, MT, 0,
                      (po, pml, st.meta.work, sh, si, out_scale, out2, lse1),
                      {6: ("out", (cfg.D,), out2.dtype.itemsize), 7: ("lse", (), 4)})

    def _decode_mma(self, cfg, st, q2, k, v, qk_scale, out_scale, out2, lse1):
        """The split-K decode on tensor cores over ``cfg.decode_seqs``: ``paged_prefill``'s kernel with
        SPLIT, one block per (sequence, KV head, 16 query rows, partition), and the merge."""
        from ...kernels.cuda.paged_prefill import prefill_kernel, smem_bytes

        rt = self.runtime
        meta = st.meta
        D, kd = cfg.D, cfg.kv_dtype
        bs, Hkv = cfg.kv_shape[1:3]
        _, sh, si = cfg.row_layout()
        seqs, sq, span = self._decode_batch(cfg)
        window = cfg.window_left >= 0
        mods = self._mods(cfg)
        NW, MT, BK = _plan.mma_decode_tiles(D, rt.simulator)
        row_tiles = _plan.mma_decode_row_tiles(cfg.G * sq, D, rt.simulator)
        PT = _plan.mma_decode_partition(span, seqs.size * Hkv * row_tiles, rt.sm_count, BK, rt.simulator)
        n_parts = max(1, -(-span // PT))
        kern = prefill_kernel(D, cfg.q_dtype.code, NW, BK, MT, kd.code, WINDOW=window, **mods,
                              HWCVT=_plan.fp8_hw_convert(rt.cc), SPLIT=True)
        po, pml = self._split_scratch(st, (seqs.size, cfg.H, sq, n_parts), D)
        args = (_flat(q2, False), _flat(k, False), _flat(v, False), meta.table, meta.lens, meta.work,
                cfg.H, sh, si, bs, Hkv, qk_scale, out_scale, cfg.causal, cfg.window_left, cfg.softcap,
                meta.slopes, out2.reshape(out2.size).view(np.uint32), lse1, meta.flag, PT, po, pml)
        roles = {0: ("q", (), q2.dtype.itemsize), 1: ("k", (), kd.itemsize), 2: ("v", (), kd.itemsize),
                 17: ("out", (), 4), 18: ("lse", (), 4)}
        launches = [Launch(kern, (seqs.size * Hkv, row_tiles, n_parts), 32 * NW,
                           smem_bytes(D, NW, BK, MT, kd.is_fp8), args, roles)]
        if n_parts > 1:
            launches.append(self._merge_launch(cfg, st, seqs.size * cfg.H * sq, po, pml, out_scale, out2, lse1))
        return launches

    def _tiled_mma(self, cfg, st, q2, k, v, qk_scale, out_scale, out2, lse1):
        from ...kernels.cuda.paged_prefill import prefill_kernel, smem_bytes

        meta = st.meta
        D, kd = cfg.D, cfg.kv_dtype
        bs, Hkv = cfg.kv_shape[1:3]
        _, sh, si = cfg.row_layout()
        sq = int(cfg.q_lens[cfg.tiled_seqs].max())
        window = cfg.window_left >= 0
        mods = self._mods(cfg)
        tf32 = cfg.q_dtype.code == F32
        NW, MT, BK = _plan.mma_tiles(D, self.runtime.simulator, kd.is_fp8, window, any(mods.values()), tf32,
                                     self.runtime.cc)
        kern = prefill_kernel(D, cfg.q_dtype.code, NW, BK, MT, kd.code, WINDOW=window, **mods,
                              HWCVT=_plan.fp8_hw_convert(self.runtime.cc))
        args = (_flat(q2, tf32), _flat(k, tf32), _flat(v, tf32), meta.table, meta.lens, meta.work,
                cfg.H, sh, si, bs, Hkv, qk_scale, out_scale, cfg.causal, cfg.window_left, cfg.softcap,
                meta.slopes, out2.reshape(out2.size).view(np.uint32), lse1, meta.flag,
                0, *self._split_scratch(st, (1, 1, 1, 1), D))     # no partitions: placeholders
        grid = (cfg.tiled_seqs.size * Hkv, -(-cfg.G * sq // (16 * MT * NW)))
        roles = {0: ("q", (), q2.dtype.itemsize), 1: ("k", (), kd.itemsize), 2: ("v", (), kd.itemsize),
                 17: ("out", (), 4), 18: ("lse", (), 4)}
        return [Launch(kern, grid, 32 * NW, smem_bytes(D, NW, BK, MT, kd.is_fp8, tf32), args, roles)]

    def _mma_decode_ok(self, cfg, q, k, v) -> bool:
        """The decode on tensor cores takes F16 / BF16 q with K/V of the same dtype (FP8 K/V keep the
        SIMT decode), head dims that are multiples of 16 up to 128 (at 256 one warp's accumulators
        spill), batches of enough row blocks (``plan.mma_decode_wanted``) and 16-byte aligned
        q / K / V (as the tensor-core prefill)."""
        code = cfg.q_dtype.code
        if not (self.decode_mma and cfg.D % 16 == 0 and cfg.D <= 128 and code in (F16, BF16)
                and cfg.kv_dtype.code == code):
            return False
        sim = self.runtime.simulator
        sq = int(cfg.q_lens[cfg.decode_seqs].max())
        row_blocks = cfg.decode_seqs.size * cfg.Hkv * _plan.mma_decode_row_tiles(cfg.G * sq, cfg.D, sim)
        if not _plan.mma_decode_wanted(row_blocks, self.runtime.sm_count, sim):
            return False
        return self._cp_async_ok(q, k, v)

    def _mma_prefill_ok(self, cfg, q, k, v) -> bool:
        """The tensor-core prefill takes F16 / BF16 q with K/V of the same dtype or FP8 (decoded
        exactly into q's dtype), F32 q with F32 K/V (3xTF32, head dims up to 128: at 256 its registers
        would spill), head dims that are multiples of 16 and
        16-byte aligned q / K / V (cp.async copies 16 bytes); ragged batches, windows, softcap and
        ALiBi."""
        code = cfg.q_dtype.code
        if not (self.prefill_mma and cfg.D % 16 == 0
                and (code in (F16, BF16) and (cfg.kv_dtype.code == code or cfg.kv_dtype.is_fp8)
                     or code == F32 and cfg.kv_dtype.code == F32 and cfg.D <= 128)):
            return False
        return self._cp_async_ok(q, k, v)

    def _cp_async_ok(self, *arrays) -> bool:
        """Whether the tensor-core kernels' 16-byte ``cp.async`` copies may read these device arrays:
        16-byte aligned (always on the simulator, whose copies are element by element)."""
        return self.runtime.simulator or all(x.device_ctypes_pointer.value % 16 == 0 for x in arrays)

    def _launch(self, launch, stream=0):
        """Launch a ``Launch`` record through numba on ``stream``. Above 48 KB of dynamic shared memory
        the compiled kernel must opt in first (numba has no API for the attribute: it is set through
        the driver, once per compiled kernel; the argument types are looked up only while a
        dispatcher has kernels that have not opted in)."""
        kern, smem, args = launch.kern, launch.smem, launch.args
        if smem > _plan.STATIC_SMEM and not self.runtime.simulator and \
                self._smem_opt_in.get(id(kern)) != len(kern.overloads):
            from numba.cuda.cudadrv.driver import binding, driver

            compiled = kern.compile(tuple(kern.typeof_pyval(a) for a in args))
            cufunc = compiled._codelibrary.get_cufunc()
            attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            # the opt-in limit covers static and dynamic shared memory together
            limit = self._cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN - cufunc.attrs.shared
            driver.cuKernelSetAttribute(attr, int(limit), cufunc.handle, cufunc.device.id)
            self._smem_opt_in[id(kern)] = len(kern.overloads)
        launch(stream)

    def _metadata(self, cfg):
        return self._scratch.metadata(cfg)

    def _cached(self, key, make):
        return self._scratch.cached(key, make)

    def _partition(self, max_len: int, row_blocks: int) -> int:
        """Tokens per split-K partition (``plan.partition``)."""
        return _plan.partition(max_len, row_blocks, self.runtime.sm_count, self.runtime.simulator)

    def run_merge_state(self, cfg, v_a, s_a, v_b, s_b):
        from ...kernels.cuda.merge_state import pair_kernel

        cuda = self._cuda
        D = cfg.v_shape[-1]
        R = int(np.prod(cfg.lse_shape))
        out = cuda.device_array(cfg.out_shape, cfg.dtype.storage)
        lse = cuda.device_array(cfg.lse_shape, np.float32)
        if R:
            NT = _plan.merge_threads(D, self.runtime.simulator)
            pair_kernel(D, cfg.dtype.code, NT)[R, NT](v_a.reshape(R, D), s_a.reshape(R), v_b.reshape(R, D),
                                                      s_b.reshape(R), out.reshape(R, D), lse.reshape(R))
        return out, lse

    def run_merge_states(self, cfg, v, s):
        from ...kernels.cuda.merge_state import states_kernel

        cuda = self._cuda
        T, K, H, D = cfg.v_shape
        out = cuda.device_array(cfg.out_shape, cfg.dtype.storage)
        lse = cuda.device_array(cfg.lse_shape, np.float32)
        if T * H:
            NT = _plan.merge_threads(D, self.runtime.simulator)
            states_kernel(D, cfg.dtype.code, NT)[T * H, NT](v, s, out, lse)
        return out, lse

    def run_write_kv(self, cfg, k_pool, v_pool, k, v):
        from ...kernels.cuda.write_kv import write_kv_kernel

        n = cfg.T * cfg.Hkv * cfg.D
        NT = _plan.elementwise_threads(self.runtime.simulator)
        slots = self._cuda.to_device(cfg.slots)
        kern = write_kv_kernel(cfg.pool_dtype.code, cfg.src_dtype.code)
        kern[-(-n // NT), NT](k_pool, v_pool, k, v, slots, np.float32(cfg.k_scale), np.float32(cfg.v_scale))
