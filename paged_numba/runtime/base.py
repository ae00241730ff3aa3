"""Runtime, Device and Client: the interface every backend implements (numr's Runtime, boostr's
``PagedAttentionOps``).

A ``Runtime`` owns a ``Device`` and a ``Client``. The client implements the ops on storage arrays
and a validated ``PagedAttnConfig`` (``ops/config.py``); it never re-checks arguments.

Symbols: B batch, H query heads, Hkv KV heads, Sq queries per sequence, D head_dim, N physical
blocks, bs block_size, M max blocks per sequence. Storage shapes as the client receives them:
``q`` [B, H, Sq, D]; ``k``, ``v`` [N, bs, Hkv, D] (always 4-D); ``cfg.block_table`` int32 [B, M];
``cfg.seq_lens`` int32 [B]. Token t of sequence b is slot ``t % bs`` of block ``block_table[b, t // bs]``.
"""
from __future__ import annotations

import numpy as np

from ..kernels.cpu.codecs import decode_f32, encode_f32


class Device:
    def __init__(self, kind: str, index: int = 0, description: str = ""):
        self.kind = kind
        self.index = index
        self.description = description

    def __repr__(self) -> str:
        extra = f", {self.description!r}" if self.description else ""
        return f"Device({self.kind}:{self.index}{extra})"


class Client:
    """The ops of one runtime (boostr's ``PagedAttentionOps``).

    The public methods have the signatures of the module-level functions and run on this client's
    runtime. A backend implements the ``run_*`` methods: they receive a validated
    ``PagedAttnConfig`` and storage arrays on this runtime, never re-check, and return new arrays.

    Plans (``pn.plan_attention``): a client with ``supports_plans = True`` takes the keywords
    ``out=`` / ``lse=`` (storage to write into and return) and ``state=`` (what its optional
    ``prepare_plan(cfg, stream=, own=, check_finite=)`` returned) in ``run_fwd`` / ``run_fwd_fp8``
    (``state=`` in ``run_bwd``); optional ``check_plan(state, cfg)``, ``synchronize_plan(state)``
    and ``begin_capture(state)`` back ``plan.check()``, ``plan.synchronize()`` and
    ``plan.capture()``. A client without them still runs plans: results are copied into ``out=``.
    """

    runtime: "Runtime"

    def paged_attention_fwd(self, *args, **kwargs):
        from ..ops import paged_attention_fwd

        return paged_attention_fwd(*args, runtime=self.runtime, **kwargs)

    def paged_attention_fwd_fp8(self, *args, **kwargs):
        from ..ops import paged_attention_fwd_fp8

        return paged_attention_fwd_fp8(*args, runtime=self.runtime, **kwargs)

    def paged_attention_bwd(self, *args, **kwargs):
        from ..ops import paged_attention_bwd

        return paged_attention_bwd(*args, runtime=self.runtime, **kwargs)

    def run_fwd(self, cfg, q, k, v):
        """-> (out [B, H, Sq, D] in q's storage dtype, lse float32 [B, H, Sq])."""
        raise NotImplementedError(f"paged_attention_fwd is not implemented on {self.runtime.name!r}")

    def run_fwd_fp8(self, cfg, q, k, v):
        """FP8 k / v (uint8 storage); -> (out in q's storage dtype, lse float32)."""
        raise NotImplementedError(f"paged_attention_fwd_fp8 is not implemented on {self.runtime.name!r}")

    def run_bwd(self, cfg, dout, q, k, v, out, lse):
        """-> (dq like q, dk like k, dv like v)."""
        raise NotImplementedError(f"paged_attention_bwd is not implemented on {self.runtime.name!r}")

    def write_kv(self, *args, **kwargs):
        from ..ops import write_kv

        return write_kv(*args, runtime=self.runtime, **kwargs)

    def run_write_kv(self, cfg, k_pool, v_pool, k, v):
        """Write rows ``k``, ``v`` [T, Hkv, D] (storage of ``cfg.src_dtype``) into the pools
        [N, bs, Hkv, D] (storage of ``cfg.pool_dtype``) in place at ``cfg.slots`` (negative: skip);
        FP8 pools get ``value / scale``, rounded to nearest even and saturated."""
        raise NotImplementedError(f"write_kv is not implemented on {self.runtime.name!r}")

    def merge_state(self, *args, **kwargs):
        from ..ops import merge_state

        return merge_state(*args, runtime=self.runtime, **kwargs)

    def merge_states(self, *args, **kwargs):
        from ..ops import merge_states

        return merge_states(*args, runtime=self.runtime, **kwargs)

    def run_merge_state(self, cfg, v_a, s_a, v_b, s_b):
        """Storage of v_a, v_b [..., D] (``cfg.dtype``) and float32 s_a, s_b [...] -> (v, s).
        This default merges on the host in float32 NumPy (zero-copy on the cpu runtime); device
        runtimes override it with a kernel."""
        rt = self.runtime
        D = cfg.v_shape[-1]
        va, vb = (decode_f32(rt.to_host(x), cfg.dtype).reshape(-1, 1, D) for x in (v_a, v_b))
        sa, sb = (rt.to_host(x).reshape(-1, 1) for x in (s_a, s_b))
        v, s = merge_host(np.concatenate([va, vb], axis=1), np.concatenate([sa, sb], axis=1))
        return (rt.from_host(encode_f32(v, cfg.dtype).reshape(cfg.out_shape)),
                rt.from_host(s.reshape(cfg.lse_shape)))

    def run_merge_states(self, cfg, v, s):
        """Storage of v [T, K, H, D] and float32 s [T, K, H] -> (v [T, H, D], s [T, H]); host
        NumPy by default, as ``run_merge_state``."""
        rt = self.runtime
        T, K, H, D = cfg.v_shape
        vf = np.moveaxis(decode_f32(rt.to_host(v), cfg.dtype).reshape(T, K, H, D), 1, 2).reshape(T * H, K, D)
        sf = np.moveaxis(rt.to_host(s).reshape(T, K, H), 1, 2).reshape(T * H, K)
        vo, so = merge_host(vf, sf)
        return (rt.from_host(encode_f32(vo, cfg.dtype).reshape(cfg.out_shape)),
                rt.from_host(so.reshape(cfg.lse_shape)))

    def run_copy_block(self, pool, src: int, dst: int):
        """Copy physical block ``src`` of ``pool`` (native storage, blocks on axis 0) onto block
        ``dst``, in place: NumPy assignment, or a device-to-device copy for device arrays."""
        if isinstance(pool, np.ndarray):
            pool[dst] = pool[src]
        else:
            pool[dst].copy_to_device(pool[src])


def merge_host(v: np.ndarray, s: np.ndarray):
    """float32 v [R, K, D], s [R, K] (natural-log LSEs) -> merged (v [R, D], s [R]) in float32:
    weights e^(s_k - max s), states at -inf weigh (and are read) nothing, all--inf rows give 0 / -inf."""
    v = np.asarray(v, np.float32)
    s = np.asarray(s, np.float32)
    m = s.max(axis=1, initial=-np.inf)
    live = s > -np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        w = np.where(live, np.exp(s - np.where(m > -np.inf, m, 0)[:, None]), np.float32(0))
        tot = w.sum(axis=1, dtype=np.float32)
        acc = np.einsum("rk,rkd->rd", w, np.where(live[..., None], v, np.float32(0)), dtype=np.float32)
        ok = tot > 0
        out = np.where(ok[:, None], acc / np.where(ok, tot, 1)[:, None], np.float32(0)).astype(np.float32)
        lse = np.where(ok, m + np.log(np.where(ok, tot, 1)), -np.inf).astype(np.float32)
    return out, lse


class Runtime:
    """A backend: ``name``, ``device``, ``client``, and the storage moves the Tensor layer needs."""

    name: str = "?"
    device: Device
    client: Client

    def synchronize(self) -> None:
        """Wait until all work submitted on this runtime has finished."""

    def from_host(self, arr: np.ndarray):
        """Native storage holding a copy of (or, on cpu, the same) C-contiguous host array."""
        raise NotImplementedError

    def to_host(self, storage) -> np.ndarray:
        """A host NumPy copy of native storage."""
        raise NotImplementedError

    def from_external(self, obj):
        """(storage, numpy dtype) from an object with ``__cuda_array_interface__``, zero-copy."""
        raise TypeError(f"runtime {self.name!r} cannot take objects with __cuda_array_interface__; "
                        "use the 'cuda' runtime or pass a NumPy array")

    def is_native(self, obj) -> bool:
        """Whether ``obj`` is this runtime's storage type."""
        return False

    def __repr__(self) -> str:
        return f"<Runtime {self.name!r} on {self.device!r}>"
