"""Plan once per batch, run per layer: ``pn.plan_attention`` and ``AttentionPlan``.

A plan validates the block table, the lengths and every keyword once, keeps its own copy of that
metadata (on the device for cuda, uploaded once, asynchronously on the plan's stream) and runs the
forward, FP8 forward and backward over any pools that fit it. ``run`` checks only what can change
per layer: q / k / v shapes and dtypes against the plan, and that the pools hold every block the
plan reads. The module functions (``pn.paged_attention_fwd`` ...) are a plan and one run.

Symbols: B batch, H query heads, Hkv KV heads, Sq queries per sequence (``q_len``), D head_dim,
N physical blocks, bs block_size, M max blocks per sequence, T query tokens of a ragged batch.
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from ..dtypes import DType, to_storage
from ..runtime import get_runtime
from ..tensor import Tensor
from .config import (bwd_arrays, first_block_outside, fp8_dtypes, fp8_scales, fwd_dtypes, max_block_read,
                     plan_config, plan_pools, plan_q)
from .io import _require_score_mods, _storage, _tensors_in, _wrap

_CFG_KEEP = 32      # run configs kept per plan (one per dtype pair, pool size and FP8 scales)


def plan_attention(block_table, seq_lens=None, *, num_heads, num_kv_heads, head_dim, block_size, q_len=1,
                   causal=False, scale=None, cu_seqlens_q=None, window_left=-1, softcap=0.0, alibi_slopes=None,
                   runtime=None, stream=None, check_finite=False) -> "AttentionPlan":
    """A plan of paged attention for one batch, reusable by every layer that shares its block table.

    ``block_table`` int [B, M] and ``seq_lens`` int [B] (default M * bs) as in the ops: token t of
    sequence b is slot ``t % bs`` of block ``block_table[b, t // bs]``; only the entries of tokens
    t < L_b are read, and must not be negative (that they are < N is checked when a run sees the
    pools). ``q_len`` queries per sequence (q [B, H, q_len, D]); or ``cu_seqlens_q`` (int [B + 1]) for
    a ragged batch (q token-major [T, H, D]). ``causal``, ``scale``, ``window_left``, ``softcap``,
    ``alibi_slopes`` as in ``paged_attention_fwd``. The plan copies all of them: changing the
    caller's arrays afterwards changes nothing.

    cuda only: ``stream`` -- the stream every upload and launch of the plan goes to: a numba stream,
    an object with ``cuda_stream`` (torch), ``__cuda_stream__`` (CUDA stream protocol) or ``ptr``
    (CuPy), or a raw ``CUstream`` handle (int); None is the default stream. ``check_finite=True`` makes every run
    read the non-finite-score flag back (a host sync) and raise at once; otherwise ``plan.check()``
    reads it.
    """
    cfg = plan_config(block_table, seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      block_size=block_size, q_len=q_len, causal=causal, scale=scale, cu_seqlens_q=cu_seqlens_q,
                      window_left=window_left, softcap=softcap, alibi_slopes=alibi_slopes)
    if not isinstance(check_finite, (bool, np.bool_)):
        raise TypeError(f"check_finite: expected a bool, got {type(check_finite).__name__}")
    return AttentionPlan(cfg, get_runtime(runtime), stream=stream, check_finite=bool(check_finite))


class AttentionPlan:
    """The validated, device-resident metadata of one batch; ``run`` / ``run_fp8`` / ``run_bwd``
    per layer. Attributes: ``runtime``, ``config`` (the frozen ``PagedAttnConfig``, dtypes not yet
    known), ``q_shape``, ``lse_shape``, ``max_block`` (largest block id read; pools need N > it)."""

    def __init__(self, cfg, runtime, *, stream=None, check_finite=False, _one_shot=False):
        self.runtime = runtime
        self.config = cfg
        self.check_finite = check_finite
        self.max_block = -1 if _one_shot else max_block_read(cfg)
        self._cfgs: dict = {}
        client = runtime.client
        prepare = getattr(client, "prepare_plan", None)
        if prepare is not None:
            self._state = prepare(cfg, stream=stream, own=not _one_shot, check_finite=check_finite)
        else:
            if stream is not None:
                raise ValueError(f"stream: the {runtime.name!r} runtime has no streams (pass stream=None)")
            self._state = None

    @property
    def q_shape(self) -> tuple:
        """Shape of q, out and dout: [B, H, Sq, D], or [T, H, D] for a ragged plan."""
        return self.config.q_shape

    @property
    def lse_shape(self) -> tuple:
        return self.config.lse_shape

    def __repr__(self) -> str:
        c = self.config
        return (f"<AttentionPlan B={c.B} H={c.H}/{c.Hkv} D={c.D} bs={c.bs} q {c.q_shape} causal={c.causal} "
                f"on {self.runtime.name!r}>")

    # ------------------------------------------------------------------------------ runs

    def run(self, q, k_blocks, v_blocks, *, out=None, lse=None):
        """Forward -> ``(out in q's dtype, lse float32)``, as ``paged_attention_fwd`` with the plan's
        metadata. ``out`` / ``lse``: buffers to write into (shape ``q_shape`` / ``lse_shape``, q's
        dtype / float32, on the inputs' runtime); they are returned."""
        as_tensor = self._inputs({"q": q, "k_blocks": k_blocks, "v_blocks": v_blocks})
        qd, kd = fwd_dtypes(q, k_blocks, v_blocks)
        cfg = self._config(q, k_blocks, v_blocks, qd, kd)
        _require_score_mods(self.runtime, cfg)
        return self._forward("run_fwd", cfg, q, k_blocks, v_blocks, out, lse, as_tensor)

    def run_fp8(self, q, k_blocks, v_blocks, *, q_scale=1.0, k_scale=1.0, v_scale=1.0, o_scale=1.0,
                fp8_format=None, out=None, lse=None):
        """Forward over FP8 pools -> ``(out, lse)``, as ``paged_attention_fwd_fp8``."""
        as_tensor = self._inputs({"q": q, "k_blocks": k_blocks, "v_blocks": v_blocks})
        qd, kd = fp8_dtypes(q, k_blocks, v_blocks, fp8_format)
        scales = fp8_scales(q_scale, k_scale, v_scale, o_scale)
        cfg = self._config(q, k_blocks, v_blocks, qd, kd, scales)
        _require_score_mods(self.runtime, cfg)
        return self._forward("run_fwd_fp8", cfg, q, k_blocks, v_blocks, out, lse, as_tensor)

    def run_bwd(self, dout, q, k_blocks, v_blocks, output, lse):
        """Backward -> ``(dq, dk_blocks, dv_blocks)``, as ``paged_attention_bwd``; ``output`` and
        ``lse`` are a forward's of this plan over the same pools."""
        as_tensor = self._inputs({"dout": dout, "q": q, "k_blocks": k_blocks, "v_blocks": v_blocks,
                                  "output": output, "lse": lse})
        qd, kd = fwd_dtypes(q, k_blocks, v_blocks)
        cfg = self._config(q, k_blocks, v_blocks, qd, kd)
        bwd_arrays(cfg, dout, output, lse)
        _require_score_mods(self.runtime, cfg, "bwd")
        return self._backward(cfg, dout, q, k_blocks, v_blocks, output, lse, as_tensor)

    def check(self) -> None:
        """Raise the ValueError of a non-finite score (scale * q . k overflowing float32, or inf / NaN
        in q or in K tokens that are read) if any run since the last check met one, and clear the
        flag. cuda: reads a device flag (waits for the plan's stream); cpu: runs raise themselves."""
        check = getattr(self.runtime.client, "check_plan", None)
        if check is not None:
            check(self._state, self.config)

    def synchronize(self) -> None:
        """Wait for the plan's work (its stream on cuda), then ``check()``."""
        sync = getattr(self.runtime.client, "synchronize_plan", None)
        if sync is not None:
            sync(self._state)
        self.check()

    @contextlib.contextmanager
    def capture(self):
        """``with plan.capture() as graph: <runs>`` records the launches of the runs inside (every
        layer of a step) as one CUDA graph; ``graph.replay()`` launches it again on the plan's stream.
        The runs must not allocate or copy: pass device Tensors and ``out=`` / ``lse=`` buffers, and run
        each kind of call once before capturing (compilation). cuda on a GPU only, on a plan with a
        stream of its own (``stream=``); elsewhere NotImplementedError / RuntimeError."""
        begin = getattr(self.runtime.client, "begin_capture", None)
        if begin is None:
            raise NotImplementedError(f"plan.capture: CUDA graphs need the cuda runtime, this plan is on "
                                      f"{self.runtime.name!r}")
        graph = begin(self._state)
        try:
            yield graph
        except BaseException:
            graph.abort()
            raise
        graph.end()

    # ------------------------------------------------------------------------------ internals

    def _inputs(self, arrays: dict) -> bool:
        """True for Tensors in (all on the plan's runtime), False for NumPy arrays; else ValueError."""
        tensors = _tensors_in(arrays)
        for n, t in tensors.items():
            if t.runtime is not self.runtime:
                raise ValueError(f"{n}: a Tensor on {t.runtime.name!r}, but the plan is on "
                                 f"{self.runtime.name!r}; move it with .to()")
        return bool(tensors)

    def _config(self, q, k_blocks, v_blocks, qd, kd, scales=None):
        """The run's config: the plan's, with the dtypes, the pool size and the FP8 scales."""
        base = self.config
        plan_q(base, q)
        N, kv_3d = plan_pools(base, k_blocks, v_blocks)
        if N <= self.max_block:
            raise ValueError(first_block_outside(base, N))
        key = (qd, kd, N, kv_3d, None if scales is None else tuple(scales.values()))
        cfg = self._cfgs.get(key)
        if cfg is None:
            if len(self._cfgs) >= _CFG_KEEP:
                self._cfgs.clear()
            cfg = self._cfgs[key] = dataclasses.replace(base, N=N, q_dtype=qd, kv_dtype=kd, kv_3d=kv_3d,
                                                        **(scales or {}))
        return cfg

    def _buffer(self, x, name, shape, dt: DType, as_tensor: bool):
        """(native storage the client writes, host array to copy it into or None) for ``out=`` /
        ``lse=``; ValueError / TypeError when it does not fit."""
        rt = self.runtime
        if isinstance(x, Tensor):
            if not as_tensor:
                raise ValueError(f"{name}: a pn.Tensor, but the inputs are NumPy arrays (pass a NumPy array)")
            if x.runtime is not rt:
                raise ValueError(f"{name}: a Tensor on {x.runtime.name!r}, but the plan is on {rt.name!r}")
            if x.shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
            if x.dtype != dt:
                raise TypeError(f"{name}: expected dtype {dt.value}, got {x.dtype.value}")
            return x.storage, None
        if as_tensor:
            raise ValueError(f"{name}: expected a pn.Tensor on {rt.name!r} like the inputs, got {type(x).__name__}")
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name}: expected a NumPy array, got {type(x).__name__}")
        if x.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
        if x.dtype not in (dt.numpy, dt.storage):
            raise TypeError(f"{name}: expected dtype {dt.value} ({np.dtype(dt.numpy)}), got {x.dtype}")
        if not (x.flags.c_contiguous and x.flags.writeable):
            raise ValueError(f"{name}: expected a writable C-contiguous array (written in place)")
        view = to_storage(x, dt)
        dev = rt.from_host(view)
        return dev, (view if dev is not view else None)

    def _forward(self, method, cfg, q, k, v, out, lse, as_tensor):
        rt = self.runtime
        client = rt.client
        qs, ks, vs = _storage(q, cfg.q_dtype, rt), _storage(k, cfg.kv_dtype, rt), _storage(v, cfg.kv_dtype, rt)
        kw, back = {}, []
        if out is not None:
            kw["out"], h = self._buffer(out, "out", cfg.q_shape, cfg.q_dtype, as_tensor)
            back.append((h, 0))
        if lse is not None:
            kw["lse"], h = self._buffer(lse, "lse", cfg.lse_shape, DType.F32, as_tensor)
            back.append((h, 1))
        if getattr(client, "supports_plans", False):
            res = getattr(client, method)(cfg, qs, ks, vs, state=self._state, **kw)
        else:   # a runtime that knows no buffers: results copied in
            res = getattr(client, method)(cfg, qs, ks, vs)
            for i, name in ((0, "out"), (1, "lse")):
                if name in kw:
                    _copy_into(rt, kw[name], res[i])
            res = tuple(kw.get(name, r) for name, r in zip(("out", "lse"), res))
        for host, i in back:
            if host is not None:
                host[...] = rt.to_host(res[i])
        results = []
        for i, (given, dt) in enumerate(((out, cfg.q_dtype), (lse, DType.F32))):
            results.append(given if given is not None else _wrap(res[i], dt, rt, as_tensor))
        return tuple(results)

    def _backward(self, cfg, dout, q, k, v, output, lse, as_tensor):
        rt = self.runtime
        client = rt.client
        qd, kd = cfg.q_dtype, cfg.kv_dtype
        args = (_storage(dout, qd, rt), _storage(q, qd, rt), _storage(k, kd, rt), _storage(v, kd, rt),
                _storage(output, qd, rt), _storage(lse, DType.F32, rt))
        if getattr(client, "supports_plans", False):
            dq, dk, dv = client.run_bwd(cfg, *args, state=self._state)
        else:
            dq, dk, dv = client.run_bwd(cfg, *args)
        return _wrap(dq, qd, rt, as_tensor), _wrap(dk, kd, rt, as_tensor), _wrap(dv, kd, rt, as_tensor)


def one_shot(cfg, runtime) -> AttentionPlan:
    """The plan of one validated call (the module functions): no second validation, and on cuda the
    metadata goes through the per-thread scratch instead of buffers of its own."""
    return AttentionPlan(cfg, runtime, _one_shot=True)


def _copy_into(rt, dst, src):
    if isinstance(dst, np.ndarray):
        dst[...] = rt.to_host(src)
    else:
        dst.copy_to_device(src)
