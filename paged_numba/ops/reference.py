"""Float64 NumPy oracle of the paged-attention contract (SPEC.md) — tests and debugging only.

Symbols: B batch, H query heads, Hkv KV heads (H % Hkv == 0, G = H / Hkv), Sq queries per
sequence, D head_dim, N physical blocks, bs block_size, M max blocks per sequence (block_table
columns), L_b key length of sequence b.

Shapes per argument:
    q, dout        [B, H, Sq, D]     float32 / float16 / bfloat16 / float64 (fp8 op: also FP8)
    k_blocks,      [N, bs, Hkv, D]   as q (fp8 op: FP8 or raw uint8); a 3-D [N, bs, D] pool
    v_blocks                         means Hkv = 1
    block_table    [B, M]            any integer dtype
    seq_lens       [B]               any integer dtype
    out            [B, H, Sq, D]     float64 here (the library casts to q's dtype)
    lse            [B, H, Sq]        float64 here (the library returns float32)
    dq             [B, H, Sq, D]     float64
    dk/dv_blocks   shape of k_blocks float64, the whole pool
    with cu_seqlens_q (int [B + 1], T = cu[-1]): q, dout, out, dq [T, H, D] token-major,
    lse [T, H]; sequence b owns rows cu[b]:cu[b + 1]
    alibi_slopes   [H]               float

Token -> block rule: token t (0 <= t < L_b) of sequence b is slot ``t % bs`` of physical block
``block_table[b, t // bs]``. Only table entries for t < L_b are read (the rest may be -1), and
only those slots reach a result, so unused slots may hold anything, NaN included.

Score modifications, in this order: scale, softcap (``softcap * tanh(s / softcap)``), ALiBi
(``- slope_h * |p - j|``), then the masks (causal ``j <= p``, window ``j >= p - window_left``),
where query i of a sequence of n queries and L keys sits at p = L - n + i.

Everything is computed in float64 with an explicit visibility mask; masked scores are selected
out (``np.where``), never multiplied by 0, so NaN cannot leak. Input is assumed valid
(validation lives in ``ops/config.py``). Clarity over speed: a Python loop over b, NumPy over
heads, queries and keys.
"""
from __future__ import annotations

import numpy as np
import ml_dtypes

__all__ = [
    "to_float64", "key_lengths", "gather_kv", "paged_attention_fwd_ref",
    "paged_attention_fwd_fp8_ref", "paged_attention_bwd_ref", "quantize_fp8", "merge_state_ref",
    "merge_states_ref",
]

_FP8_TYPES = {"e4m3": np.dtype(ml_dtypes.float8_e4m3fn), "e5m2": np.dtype(ml_dtypes.float8_e5m2)}
_FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}


def _fp8_name(fmt) -> str:
    """Normalize an fp8 format ("e4m3", "e4m3fn", "e5m2" or an ml_dtypes type) to "e4m3"/"e5m2"."""
    if isinstance(fmt, str):
        name = fmt.lower().removeprefix("float8_").removeprefix("fp8_")
        name = {"e4m3fn": "e4m3"}.get(name, name)
        if name in _FP8_TYPES:
            return name
    else:
        for name, dt in _FP8_TYPES.items():
            if np.dtype(fmt) == dt:
                return name
    raise ValueError(f"fp8_format: expected 'e4m3' or 'e5m2', got {fmt!r}")


def _fp8_view(x, fp8_format=None) -> np.ndarray:
    """Raw uint8 codes -> the ml_dtypes fp8 view (needs fp8_format); other arrays unchanged."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        if fp8_format is None:
            raise ValueError("raw uint8 array: pass fp8_format='e4m3' or 'e5m2'")
        return x.view(_FP8_TYPES[_fp8_name(fp8_format)])
    return x


def to_float64(x, fp8_format=None) -> np.ndarray:
    """Any supported array (float64/32/16, bfloat16, float8_e4m3fn, float8_e5m2, or raw uint8 FP8
    codes with ``fp8_format``) -> float64 array of the values it holds."""
    return _fp8_view(x, fp8_format).astype(np.float64)


def key_lengths(B, M, bs, seq_lens=None, seq_len_k=None) -> np.ndarray:
    """int64 [B]: L_b = seq_lens[b] if given, else seq_len_k if given, else M * bs."""
    if seq_lens is not None:
        return np.asarray(seq_lens).astype(np.int64).reshape(B)
    if seq_len_k is not None:
        return np.full(B, int(seq_len_k), dtype=np.int64)
    return np.full(B, int(M) * int(bs), dtype=np.int64)


def _pool4(blocks) -> np.ndarray:
    """[N, bs, D] -> [N, bs, 1, D]; 4-D pools unchanged (a view, no copy)."""
    blocks = np.asarray(blocks)
    return blocks[:, :, None, :] if blocks.ndim == 3 else blocks


def _token_slots(block_table, b, L, bs):
    """(physical block, slot) index arrays of tokens 0..L-1 of sequence b."""
    t = np.arange(int(L), dtype=np.int64)
    phys = np.asarray(block_table)[b, t // bs].astype(np.int64)
    return phys, t % bs


def gather_kv(blocks, block_table, b, L) -> np.ndarray:
    """float64 [L, Hkv, D]: tokens 0..L-1 of sequence b read through the table (3-D pool: Hkv 1).
    Only table entries for t < L are read."""
    pool = _pool4(blocks)
    phys, slot = _token_slots(block_table, b, L, pool.shape[1])
    return pool[phys, slot].astype(np.float64)


def _visible(Sq, L, causal, window_left=-1) -> np.ndarray:
    """bool [Sq, L]: query i (at absolute position p = L - Sq + i) sees key j when j < L, j <= p if
    causal, and j >= p - window_left if window_left >= 0."""
    j = np.arange(L)[None, :]
    p = (L - Sq + np.arange(Sq))[:, None]
    vis = np.ones((Sq, L), dtype=bool)
    if causal:
        vis &= j <= p
    if window_left is not None and window_left >= 0:
        vis &= j >= p - window_left
    return vis


def _expand_heads(kv, H) -> np.ndarray:
    """[L, Hkv, D] -> [H, L, D]: query head h gets KV head h // G."""
    G = H // kv.shape[1]
    return np.transpose(kv[:, np.arange(H) // G, :], (1, 0, 2))


def _scores(q, kh, scale, softcap, alibi_slopes, L):
    """(modified scores [H, Sq, L], d(modified) / d(scale * q.k) [H, Sq, L]).

    Order: scale -> softcap (``softcap * tanh(s / softcap)``) -> ALiBi (``-slope_h * |p - j|``);
    the masks come after (in ``_attend``)."""
    H, Sq, _ = q.shape
    s = scale * np.einsum("hqd,hkd->hqk", q, kh)
    ds = np.ones_like(s)
    if softcap:
        t = np.tanh(s / softcap)
        s = softcap * t
        ds = 1.0 - t * t
    if alibi_slopes is not None:
        p = (L - Sq + np.arange(Sq))[:, None]
        dist = np.abs(p - np.arange(L)[None, :]).astype(np.float64)      # [Sq, L]
        s = s - np.asarray(alibi_slopes, np.float64).reshape(H, 1, 1) * dist[None]
    return s, ds


def _attend(q, k, v, causal, scale, window_left=-1, softcap=0.0, alibi_slopes=None):
    """One sequence. q [H, Sq, D], k/v [L, Hkv, D] float64 ->
    (out [H, Sq, D], lse [H, Sq], p [H, Sq, L], visible [H, Sq, L], kh, vh [H, L, D],
    dmod [H, Sq, L] = d(modified score) / d(scale * q.k))."""
    H, Sq, _ = q.shape
    L = k.shape[0]
    vis = _visible(Sq, L, causal, window_left)[None]                  # [1, Sq, L]
    # Keys no query sees (before a window) are selected out too: they may hold anything.
    seen = vis[0].any(axis=0)[:, None, None]                          # [L, 1, 1]
    k, v = np.where(seen, k, 0.0), np.where(seen, v, 0.0)
    kh, vh = _expand_heads(k, H), _expand_heads(v, H)
    raw, dmod = _scores(q, kh, scale, softcap, alibi_slopes, L)
    s = np.where(vis, raw, -np.inf)
    m = np.max(s, axis=-1, initial=-np.inf)                           # [H, Sq], -inf if none
    m_safe = np.where(np.isfinite(m), m, 0.0)
    e = np.where(vis, np.exp(s - m_safe[..., None]), 0.0)
    denom = e.sum(axis=-1)
    has = denom > 0
    p = np.where(has[..., None], e / np.where(has, denom, 1.0)[..., None], 0.0)
    out = np.einsum("hqk,hkd->hqd", p, vh)
    lse = np.where(has, m_safe + np.log(np.where(has, denom, 1.0)), -np.inf)
    return out, lse, p, np.broadcast_to(vis, p.shape), kh, vh, dmod


def _default_scale(scale, D) -> float:
    return 1.0 / np.sqrt(D) if scale is None else float(scale)


def _sequences(q, cu_seqlens_q):
    """[(b, rows, q_b [H, n, D])]: the queries of each sequence, head-major. Without
    ``cu_seqlens_q`` q is [B, H, Sq, D] and rows = b; with it q is token-major [T, H, D] and
    sequence b owns rows ``cu[b]:cu[b + 1]``."""
    if cu_seqlens_q is None:
        return [(b, b, q[b]) for b in range(q.shape[0])]
    cu = np.asarray(cu_seqlens_q).astype(np.int64)
    return [(b, slice(int(cu[b]), int(cu[b + 1])), np.transpose(q[cu[b]:cu[b + 1]], (1, 0, 2)))
            for b in range(cu.size - 1)]


def _put(dst, rows, val, ragged):
    """Store a head-major per-sequence result [H, n, ...] at ``rows`` of dst (token-major when
    ragged: [n, H, ...])."""
    dst[rows] = np.swapaxes(val, 0, 1) if ragged else val


def paged_attention_fwd_ref(q, k_blocks, v_blocks, block_table, *, seq_lens=None, seq_len_k=None,
                            causal=False, scale=None, cu_seqlens_q=None, window_left=-1, softcap=0.0,
                            alibi_slopes=None):
    """Forward oracle. Returns (out float64 [B, H, Sq, D], lse float64 [B, H, Sq]); with
    ``cu_seqlens_q`` (int [B + 1]) q is token-major [T, H, D] and out / lse are [T, H, D] / [T, H].

    scale defaults to 1/sqrt(D); GQA head h reads KV head h // (H // Hkv); query i of sequence b
    (n_b queries) sits at p = L_b - n_b + i; causal: it sees keys j <= p (bottom-right); a window
    ``window_left >= 0`` also requires j >= p - window_left. Scores: s = scale q.k, then
    ``softcap * tanh(s / softcap)`` when softcap > 0, then ``- alibi_slopes[h] * |p - j|``. A row
    with no visible key gives out 0 and lse -inf."""
    q = to_float64(q)
    ragged = cu_seqlens_q is not None
    H, D = q.shape[-2] if ragged else q.shape[1], q.shape[-1]
    table = np.asarray(block_table)
    B = table.shape[0]
    bs = _pool4(k_blocks).shape[1]
    lens = key_lengths(B, table.shape[1], bs, seq_lens, seq_len_k)
    sc = _default_scale(scale, D)
    out = np.zeros(q.shape)
    lse = np.full(q.shape[:-1], -np.inf)
    for b, rows, qb in _sequences(q, cu_seqlens_q):
        k = gather_kv(k_blocks, table, b, lens[b])
        v = gather_kv(v_blocks, table, b, lens[b])
        ob, lb = _attend(qb, k, v, causal, sc, window_left, softcap, alibi_slopes)[:2]
        _put(out, rows, ob, ragged)
        _put(lse, rows, lb, ragged)
    return out, lse


def paged_attention_fwd_fp8_ref(q, k_blocks, v_blocks, block_table, *, seq_lens=None, seq_len_k=None,
                                causal=False, scale=None, q_scale=1.0, k_scale=1.0, v_scale=1.0,
                                o_scale=1.0, fp8_format=None, cu_seqlens_q=None, window_left=-1,
                                softcap=0.0, alibi_slopes=None):
    """FP8 forward oracle. Returns (out / o_scale float64 — NOT re-quantized, lse float64).

    Every scale dequantizes by multiplication: q_real = q * q_scale (applied whatever q's dtype,
    FP8 or float), k_real = k * k_scale, v_real = v * v_scale. lse comes from the dequantized
    (and modified: softcap, ALiBi) scores. fp8_format None infers the format from k_blocks'
    ml_dtypes dtype; raw uint8 k/v (and q) need "e4m3" or "e5m2"."""
    k_blocks, v_blocks, q = (_fp8_view(x, fp8_format) for x in (k_blocks, v_blocks, q))
    fmt = _fp8_name(k_blocks.dtype)
    if fp8_format is not None and _fp8_name(fp8_format) != fmt:
        raise ValueError(f"fp8_format={fp8_format!r} but k_blocks is {k_blocks.dtype}")
    q64 = to_float64(q) * float(q_scale)
    k64 = to_float64(k_blocks) * float(k_scale)    # unused NaN slots stay NaN and are never read
    v64 = to_float64(v_blocks) * float(v_scale)
    out, lse = paged_attention_fwd_ref(q64, k64, v64, block_table, seq_lens=seq_lens,
                                       seq_len_k=seq_len_k, causal=causal, scale=scale,
                                       cu_seqlens_q=cu_seqlens_q, window_left=window_left,
                                       softcap=softcap, alibi_slopes=alibi_slopes)
    return out / float(o_scale), lse


def paged_attention_bwd_ref(dout, q, k_blocks, v_blocks, block_table, *, seq_lens=None,
                            seq_len_k=None, causal=False, scale=None, cu_seqlens_q=None,
                            window_left=-1, softcap=0.0, alibi_slopes=None):
    """Backward oracle of the scalar sum(out * dout), recomputing the forward.

    Returns float64 (dq shaped like q, dk_blocks, dv_blocks shaped like k_blocks — 3-D stays 3-D).
    With P = softmax(S): dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)) (the gradient
    of the modified score), dR = dS * (1 - tanh^2(r / softcap)) with softcap (ALiBi is additive:
    no factor), dQ = scale dR K, dK = scale dR^T Q, r = scale q.k. KV-head gradients sum over
    their G query heads, and are scatter-ADDED into the pool, so a slot shared by several sequences
    gets the sum; slots no valid token reads stay exactly 0; rows with no visible key contribute
    nothing. ``cu_seqlens_q``: q / dout token-major [T, H, D], as in the forward."""
    q, dout = to_float64(q), to_float64(dout)
    ragged = cu_seqlens_q is not None
    D = q.shape[-1]
    table = np.asarray(block_table)
    B = table.shape[0]
    kpool = _pool4(k_blocks)
    N, bs, Hkv, _ = kpool.shape
    lens = key_lengths(B, table.shape[1], bs, seq_lens, seq_len_k)
    sc = _default_scale(scale, D)
    dq = np.zeros_like(q)
    dk = np.zeros((N, bs, Hkv, D))
    dv = np.zeros((N, bs, Hkv, D))
    douts = dict((b, do) for b, _, do in _sequences(dout, cu_seqlens_q))
    for b, rows, qb in _sequences(q, cu_seqlens_q):
        L = int(lens[b])
        H, n = qb.shape[:2]
        G = H // Hkv
        k = gather_kv(k_blocks, table, b, L)
        v = gather_kv(v_blocks, table, b, L)
        out, _, p, vis, kh, vh, dmod = _attend(qb, k, v, causal, sc, window_left, softcap, alibi_slopes)
        do = douts[b]
        dvh = np.einsum("hqk,hqd->hkd", p, do)                        # [H, L, D]
        dp = np.einsum("hqd,hkd->hqk", do, vh)
        delta = np.sum(do * out, axis=-1)                              # [H, n]
        ds = np.where(vis, p * (dp - delta[..., None]) * dmod, 0.0)
        _put(dq, rows, sc * np.einsum("hqk,hkd->hqd", ds, kh), ragged)
        dkh = sc * np.einsum("hqk,hqd->hkd", ds, qb)
        # [H, L, D] -> [Hkv, G, L, D] -> sum over G -> [L, Hkv, D]
        dk_tok = np.transpose(dkh.reshape(Hkv, G, L, D).sum(axis=1), (1, 0, 2))
        dv_tok = np.transpose(dvh.reshape(Hkv, G, L, D).sum(axis=1), (1, 0, 2))
        phys, slot = _token_slots(table, b, L, bs)
        np.add.at(dk, (phys, slot), dk_tok)
        np.add.at(dv, (phys, slot), dv_tok)
    if np.asarray(k_blocks).ndim == 3:
        dk, dv = dk[:, :, 0, :], dv[:, :, 0, :]
    return dq, dk, dv


def merge_state_ref(v_a, s_a, v_b, s_b):
    """Merge two attention states over disjoint key sets (FlashInfer's cascade merge) -> (v, s)
    float64. v_* [..., D] (normalized outputs), s_* [...] natural-log LSEs:
    s = ln(e^s_a + e^s_b), v = (e^s_a v_a + e^s_b v_b) / e^s. Both -inf: v 0, s -inf."""
    v = np.stack([to_float64(v_a), to_float64(v_b)], axis=-2)          # [..., 2, D]
    s = np.stack([np.asarray(s_a, np.float64), np.asarray(s_b, np.float64)], axis=-1)
    return _merge(v, s)


def merge_states_ref(v, s):
    """Merge K states per row: v [T, K, H, D], s [T, K, H] -> (v [T, H, D], s [T, H]) float64."""
    v = np.moveaxis(to_float64(v), 1, -2)                              # [T, H, K, D]
    s = np.moveaxis(np.asarray(s, np.float64), 1, -1)                  # [T, H, K]
    return _merge(v, s)


def _merge(v, s):
    """v [..., K, D], s [..., K] -> (v [..., D], s [...])."""
    m = np.max(s, axis=-1, initial=-np.inf)
    has = np.isfinite(m)
    m_safe = np.where(has, m, 0.0)
    w = np.where(np.isneginf(s), 0.0, np.exp(s - m_safe[..., None]))
    tot = w.sum(axis=-1)
    ok = tot > 0
    out = np.where(ok[..., None], np.einsum("...k,...kd->...d", w, np.where(w[..., None] > 0, v, 0.0))
                   / np.where(ok, tot, 1.0)[..., None], 0.0)
    lse = np.where(ok, m_safe + np.log(np.where(ok, tot, 1.0)), -np.inf)
    return out, lse


def quantize_fp8(x, fp8_format) -> np.ndarray:
    """float array -> ml_dtypes FP8 array, round-to-nearest-even with saturation to +-max finite
    (448 for e4m3fn, 57344 for e5m2; +-inf saturates too); NaN stays NaN.

    Values are rounded from float32, as the kernels hold them (ml_dtypes converts float64 through
    float32 anyway; saying so makes the double rounding of float64 input explicit)."""
    name = _fp8_name(fp8_format)
    m = _FP8_MAX[name]
    return np.clip(to_float64(x), -m, m).astype(np.float32).astype(_FP8_TYPES[name])
