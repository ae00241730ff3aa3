"""CPU benchmark of ragged batches, sliding windows, softcap and ALiBi on the ``cpu`` runtime
(block size 16, shuffled block tables), side by side in one run:

- mixed batch: 4 prefills of 512 tokens + 60 decodes at L = 2048, H32/8 D128 BF16, in ONE ragged
  call (``cu_seqlens_q``) vs the two dense calls it replaces (a [4, H, 512, D] causal prefill and a
  [60, H, 1, D] decode). Target <= 1.0x.
- window decode: B4 H32/8 D128 BF16 decode over L = 32768 with ``window_left = 4096`` vs the full
  length. Target <= 0.2x.
- softcap (30) / ALiBi cost at the CPU forward benchmark's shapes (``cpu_forward.py``: decode B4
  H32/8 D128 L2048 and causal prefill B1 H8 D64 L1024, fp32). Target <= 1.1x of plain.

Each row: median wall time of the public call on NumPy inputs; the calls of one comparison are timed
in turn (A, B, A, B, ...), so that the shared machine's slow spells fall on both. Each timed call's result is first
checked: the ragged call against the separate calls, the rest against the float64 reference (on
the first sequence for the long window decode). Results are appended to
``benchmarks/results/cpu_masks.md`` (``--no-save`` to skip).

    python benchmarks/cpu_masks.py [--no-save] [--repeat N]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import paged_numba as pn  # noqa: E402
from common import append_results, markdown_table, median_times_interleaved, paged_case  # noqa: E402
from paged_numba.ops.reference import paged_attention_fwd_ref  # noqa: E402


def _close(got, ref, what, tol):
    err = float(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64)).max())
    if not err < tol:
        raise SystemExit(f"cpu_masks: {what}: result check failed (max err {err:.3g})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    reps = args.repeat
    rows, ratios = [], []

    def measure(named, repeat=None):
        """Median times of [(name, fn), ...], the calls timed in turn (timing.median_times_interleaved)."""
        ts = median_times_interleaved([fn for _, fn in named], repeat=repeat or reps, warmup=1)
        for (name, _), t in zip(named, ts):
            rows.append((name, f"{t * 1e3:.2f}"))
            print(f"{name}: {t * 1e3:.2f} ms", flush=True)
        return ts

    # 1. mixed batch: one ragged call vs the dense calls it replaces.
    H, Hkv, D, L, n_pre, n_dec, Sp = 32, 8, 128, 2048, 4, 60, 512
    _, k, v, table, sl = paged_case(rng, n_pre + n_dec, H, Hkv, 1, D, L, 16, bf16)
    cu = np.concatenate([[0], np.cumsum([Sp] * n_pre + [1] * n_dec)]).astype(np.int32)
    q_rag = rng.standard_normal((int(cu[-1]), H, D), dtype=np.float32).astype(bf16)
    q_pre = np.ascontiguousarray(q_rag[:n_pre * Sp].reshape(n_pre, Sp, H, D).transpose(0, 2, 1, 3))
    q_dec = np.ascontiguousarray(q_rag[n_pre * Sp:].reshape(n_dec, 1, H, D).transpose(0, 2, 1, 3))
    t_pre, t_dec = table[:n_pre], np.ascontiguousarray(table[n_pre:])

    def ragged():
        return pn.paged_attention_fwd(q_rag, k, v, table, causal=True, seq_lens=sl, cu_seqlens_q=cu)

    def separate():
        return (pn.paged_attention_fwd(q_pre, k, v, t_pre, causal=True, seq_lens=sl[:n_pre]),
                pn.paged_attention_fwd(q_dec, k, v, t_dec, causal=True, seq_lens=sl[n_pre:]))

    o_r, _ = ragged()
    (o_p, _), (o_d, _) = separate()
    o_sep = np.concatenate([o_p.transpose(0, 2, 1, 3).reshape(-1, H, D), o_d.transpose(0, 2, 1, 3).reshape(-1, H, D)])
    _close(o_r, o_sep, "ragged vs separate", 1e-2)
    a, b = measure([(f"mixed batch ({n_pre} x {Sp} prefill + {n_dec} decodes, L{L} H{H}/{Hkv} D{D} bf16), "
                     "one ragged call", ragged), ("mixed batch, separate prefill + decode calls", separate)])
    ratios.append(("mixed batch ragged / separate", a / b, 1.0))

    # 2. window decode over a long context.
    B, L, W = 4, 32768, 4096
    q, k, v, table, sl = paged_case(rng, B, H, Hkv, 1, D, L, 16, bf16)
    for kw in ({}, dict(window_left=W)):
        out, lse = pn.paged_attention_fwd(q, k, v, table, causal=True, seq_lens=sl, **kw)
        ref, ref_lse = paged_attention_fwd_ref(q[:1], k, v, table[:1], seq_lens=sl[:1], causal=True, **kw)
        _close(out[:1], ref, f"decode L{L} {kw}", 2e-2)
        _close(lse[:1], ref_lse, f"decode L{L} {kw} lse", 1e-3)
    full, win = measure([
        (f"decode B{B} H{H}/{Hkv} D{D} L{L} bf16",
         lambda: pn.paged_attention_fwd(q, k, v, table, causal=True, seq_lens=sl)),
        (f"decode B{B} L{L} window_left={W}",
         lambda: pn.paged_attention_fwd(q, k, v, table, causal=True, seq_lens=sl, window_left=W))])
    ratios.append((f"window {W} / full at L{L}", win / full, 0.2))
    del q, k, v

    # 3. softcap / ALiBi at the CPU forward benchmark's shapes (cpu_forward.py), fp32.
    for label, (B, H, Hkv, Sq, D, L, causal) in (("decode", (4, 32, 8, 1, 128, 2048, False)),
                                                  ("prefill", (1, 8, 8, 1024, 64, 1024, True))):
        q, k, v, table, sl = paged_case(rng, B, H, Hkv, Sq, D, L, 16)
        slopes = (2.0 ** (-8.0 * np.arange(1, H + 1) / H)).astype(np.float32)
        named = []
        mods = (("plain", {}), ("softcap 30", dict(softcap=30.0)), ("ALiBi", dict(alibi_slopes=slopes)))
        for mod, kwm in mods:
            out, _ = pn.paged_attention_fwd(q, k, v, table, causal=causal, seq_lens=sl, **kwm)
            ref, _ = paged_attention_fwd_ref(q, k, v, table, seq_lens=sl, causal=causal, **kwm)
            _close(out, ref, f"{label} {mod}", 1e-4)
            named.append((f"{label} B{B} H{H}/{Hkv} Sq{Sq} D{D} L{L} fp32 {mod}",
                          lambda kwm=kwm: pn.paged_attention_fwd(q, k, v, table, causal=causal, seq_lens=sl, **kwm)))
        base, *rest = measure(named, repeat=5 * reps)   # calls of a few ms: more samples
        for (mod, _), t in zip(mods[1:], rest):
            ratios.append((f"{label} {mod} / plain", t / base, 1.1))

    lines = [(name, f"{r:.2f}x", f"<= {target}x", "met" if r <= target else "missed")
             for name, r, target in ratios]
    table_md = (markdown_table(("workload", "ms (median)"), rows) + "\n\n"
                + markdown_table(("ratio", "measured", "target", ""), lines))
    print(markdown_table(("ratio", "measured", "target", ""), lines))
    if not args.no_save:
        print("saved to", append_results("cpu_masks", "ragged / window / softcap / ALiBi on the cpu runtime",
                                         table_md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
