"""The functional API: NumPy arrays in -> NumPy arrays out; Tensors in -> Tensors out.

Each op validates once (``ops/config.py``), moves NumPy inputs onto the runtime, calls the
runtime's client, and hands results back in the form the inputs came in. The attention ops are a
plan (``ops/plan.py``, ``pn.plan_attention``) and one run of it. ``block_table`` and
``seq_lens`` are host-side metadata and may be NumPy arrays (or lists) whatever the runtime.
"""
from __future__ import annotations

import numpy as np

from ..dtypes import DType, to_storage
from ..tensor import Tensor
from .config import bwd_config, fwd_config, fwd_fp8_config
from .merge_config import merge_state_config, merge_states_config
from .write_kv_config import write_kv_config
from .io import _pick_runtime, _require_score_mods, _storage, _wrap
from .plan import AttentionPlan, one_shot, plan_attention


def paged_attention_fwd(q, k_blocks, v_blocks, block_table, num_heads=None, num_kv_heads=None,
                        seq_len_q=None, seq_len_k=None, head_dim=None, block_size=None, causal=False,
                        *, seq_lens=None, scale=None, cu_seqlens_q=None, window_left=-1, softcap=0.0,
                        alibi_slopes=None, runtime=None):
    """Paged attention forward -> ``(out [B, H, Sq, D] in q's dtype, lse float32 [B, H, Sq])``.

    ``q`` [B, H, Sq, D]; ``k_blocks``, ``v_blocks`` [N, bs, Hkv, D] (or [N, bs, D]), q's dtype
    (F32 / F16 / BF16); ``block_table`` int [B, M]: token t of sequence b is slot ``t % bs`` of
    block ``block_table[b, t // bs]``; ``seq_lens`` int [B] (default ``seq_len_k``, else M * bs).
    Causal masks are bottom-right aligned.

    Ragged batches: with ``cu_seqlens_q`` (int [B + 1], non-decreasing from 0) q is token-major
    [T, H, D], T = cu_seqlens_q[-1], sequence b owns rows ``cu[b]:cu[b + 1]`` (its last q_len_b
    tokens, q_len_b <= seq_lens[b], which is then required); out is [T, H, D], lse [T, H].
    Score modifiers, applied in this order after the scale: ``softcap`` > 0 gives
    ``softcap * tanh(s / softcap)``; ``alibi_slopes`` (float32 [H]) adds ``-slope_h * |p - j|``;
    then the masks: causal ``j <= p`` and, with ``window_left`` >= 0, ``j >= p - window_left``,
    for a query at absolute position p and key j.
    """
    rt, as_tensor = _pick_runtime({"q": q, "k_blocks": k_blocks, "v_blocks": v_blocks}, runtime)
    cfg = fwd_config(q, k_blocks, v_blocks, block_table, num_heads, num_kv_heads, seq_len_q,
                     seq_len_k, head_dim, block_size, causal, seq_lens=seq_lens, scale=scale,
                     cu_seqlens_q=cu_seqlens_q, window_left=window_left, softcap=softcap,
                     alibi_slopes=alibi_slopes)
    _require_score_mods(rt, cfg)
    plan = one_shot(cfg, rt)
    res = plan._forward("run_fwd", cfg, q, k_blocks, v_blocks, None, None, as_tensor)
    plan.check()
    return res


def paged_attention_fwd_fp8(q, k_blocks, v_blocks, block_table, num_heads=None, num_kv_heads=None,
                            seq_len_q=None, seq_len_k=None, head_dim=None, block_size=None,
                            causal=False, q_scale=1.0, k_scale=1.0, v_scale=1.0, o_scale=1.0,
                            *, seq_lens=None, scale=None, fp8_format=None, cu_seqlens_q=None,
                            window_left=-1, softcap=0.0, alibi_slopes=None, runtime=None):
    """Paged attention forward over an FP8 KV cache -> ``(out, lse)``.

    ``k_blocks``, ``v_blocks``: FP8 (ml_dtypes ``float8_e4m3fn`` / ``float8_e5m2``, or ``uint8`` with
    ``fp8_format``); ``q``: FP8 of the same format or F32 / F16 / BF16. Real value = code x scale for
    q, k, v; the stored output is o / o_scale in q's dtype (FP8 saturating). ``cu_seqlens_q``,
    ``window_left``, ``softcap``, ``alibi_slopes`` as in ``paged_attention_fwd`` (the scale that
    the softcap follows is the whole dequantized one: scale * q_scale * k_scale).
    """
    rt, as_tensor = _pick_runtime({"q": q, "k_blocks": k_blocks, "v_blocks": v_blocks}, runtime)
    cfg = fwd_fp8_config(q, k_blocks, v_blocks, block_table, num_heads, num_kv_heads, seq_len_q,
                         seq_len_k, head_dim, block_size, causal, q_scale, k_scale, v_scale, o_scale,
                         seq_lens=seq_lens, scale=scale, fp8_format=fp8_format, cu_seqlens_q=cu_seqlens_q,
                         window_left=window_left, softcap=softcap, alibi_slopes=alibi_slopes)
    _require_score_mods(rt, cfg)
    plan = one_shot(cfg, rt)
    res = plan._forward("run_fwd_fp8", cfg, q, k_blocks, v_blocks, None, None, as_tensor)
    plan.check()
    return res


def paged_attention_bwd(dout, q, k_blocks, v_blocks, output, lse, block_table, num_heads=None,
                        num_kv_heads=None, seq_len_q=None, seq_len_k=None, head_dim=None,
                        block_size=None, causal=False, *, seq_lens=None, scale=None, cu_seqlens_q=None,
                        window_left=-1, softcap=0.0, alibi_slopes=None, runtime=None):
    """Paged attention backward -> ``(dq, dk_blocks, dv_blocks)``; gradients of blocks shared by
    several sequences are summed, slots no valid token reads are zero. The keywords must be
    those of the forward that gave ``output`` and ``lse`` (with ``cu_seqlens_q``: dout, output
    [T, H, D], lse [T, H]); the gradient goes through the softcap's tanh."""
    data = {"dout": dout, "q": q, "k_blocks": k_blocks, "v_blocks": v_blocks, "output": output, "lse": lse}
    rt, as_tensor = _pick_runtime(data, runtime)
    cfg = bwd_config(dout, q, k_blocks, v_blocks, output, lse, block_table, num_heads, num_kv_heads,
                     seq_len_q, seq_len_k, head_dim, block_size, causal, seq_lens=seq_lens, scale=scale,
                     cu_seqlens_q=cu_seqlens_q, window_left=window_left, softcap=softcap,
                     alibi_slopes=alibi_slopes)
    _require_score_mods(rt, cfg, "bwd")
    return one_shot(cfg, rt)._backward(cfg, dout, q, k_blocks, v_blocks, output, lse, as_tensor)


def write_kv(k_blocks, v_blocks, k, v, slot_mapping, *, k_scale=1.0, v_scale=1.0, fp8_format=None,
             runtime=None):
    """Write new K/V rows into the pools, in place (vLLM's ``reshape_and_cache``) -> None.

    ``k``, ``v`` [T, Hkv, D] (or [T, D] for 3-D pools): row t goes to slot ``slot_mapping[t]``,
    i.e. block ``slot // bs``, offset ``slot % bs``, of ``k_blocks`` / ``v_blocks`` [N, bs, Hkv, D];
    negative slots are skipped. Float pools take k / v of their own dtype; FP8 pools take F32 / F16 /
    BF16 values and store ``value / scale`` rounded to nearest even, saturated to +-max. The pools
    are written in place: a Tensor's storage on its runtime, or a NumPy array's own memory (on a
    non-cpu runtime a NumPy pool is uploaded, written and copied back whole). Every check runs
    before anything is written.
    """
    rt, _ = _pick_runtime({"k_blocks": k_blocks, "v_blocks": v_blocks, "k": k, "v": v}, runtime)
    cfg = write_kv_config(k_blocks, v_blocks, k, v, slot_mapping, k_scale=k_scale, v_scale=v_scale,
                          fp8_format=fp8_format)
    if cfg.n_written == 0 or cfg.Hkv * cfg.D == 0:
        return None
    pools, host = [], []
    for p in (k_blocks, v_blocks):
        if isinstance(p, Tensor):
            pools.append(p.storage.reshape(cfg.pool_shape))
            continue
        view = to_storage(p, cfg.pool_dtype).reshape(cfg.pool_shape)   # a view: C-contiguous
        dev = rt.from_host(view)
        pools.append(dev)
        if dev is not view:
            host.append((view, dev))
    src = [_storage(x, cfg.src_dtype, rt).reshape(cfg.src_shape) for x in (k, v)]
    rt.client.run_write_kv(cfg, pools[0], pools[1], src[0], src[1])
    for view, dev in host:
        view[...] = rt.to_host(dev)
    return None


def merge_state(v_a, s_a, v_b, s_b, *, runtime=None):
    """Merge two attention states over disjoint key sets (FlashInfer's cascade merge) -> ``(v, s)``.

    ``v_a``, ``v_b`` [..., D] (F32 / F16 / BF16, one dtype): attention outputs normalized over
    their own keys; ``s_a``, ``s_b`` float32 [...]: their natural-log LSEs (as the forward returns
    them). ``s = ln(e^s_a + e^s_b)``, ``v = (e^s_a v_a + e^s_b v_b) / e^s`` in float32, v in the
    inputs' dtype; a row whose two states are -inf gives v = 0, s = -inf (its v is never read).
    """
    rt, as_tensor = _pick_runtime({"v_a": v_a, "s_a": s_a, "v_b": v_b, "s_b": s_b}, runtime)
    cfg = merge_state_config(v_a, s_a, v_b, s_b)
    dt = cfg.dtype
    v, s = rt.client.run_merge_state(cfg, _storage(v_a, dt, rt), _storage(s_a, DType.F32, rt),
                                     _storage(v_b, dt, rt), _storage(s_b, DType.F32, rt))
    return _wrap(v, dt, rt, as_tensor), _wrap(s, DType.F32, rt, as_tensor)


def merge_states(v, s, *, runtime=None):
    """Merge K states per row -> ``(v [T, H, D], s float32 [T, H])``: ``v`` [T, K, H, D] (F32 /
    F16 / BF16), ``s`` float32 [T, K, H] natural-log LSEs; rows whose states are all -inf (or
    K = 0) give 0 / -inf. See ``merge_state``."""
    rt, as_tensor = _pick_runtime({"v": v, "s": s}, runtime)
    cfg = merge_states_config(v, s)
    vo, so = rt.client.run_merge_states(cfg, _storage(v, cfg.dtype, rt), _storage(s, DType.F32, rt))
    return _wrap(vo, cfg.dtype, rt, as_tensor), _wrap(so, DType.F32, rt, as_tensor)


__all__ = ["AttentionPlan", "plan_attention", "merge_state", "merge_states", "paged_attention_bwd", "paged_attention_fwd",
           "paged_attention_fwd_fp8", "write_kv"]
