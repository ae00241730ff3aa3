"""GPU benchmark of ragged batches, sliding windows, softcap and ALiBi on the ``cuda`` runtime
(block size 16, shuffled block tables, BF16, H32/8 D128), side by side in one run:

- mixed batch: 4 prefills of 512 tokens + 60 decodes at L = 2048 in ONE ragged call
  (``cu_seqlens_q``) vs the two dense calls it replaces (a [4, H, 512, D] prefill call and a
  [60, H, 1, D] decode call). Target <= 1.0x.
- window decode: B4 decode over L = 32768 with ``window_left = 4096`` vs the full length.
  Target <= 0.2x.
- softcap (30) / ALiBi cost at the decode shape (B32 L4096) and a causal prefill (B1 L = Sq =
  2048). Target <= 1.1x of plain.

Each row: public call wall time (Tensors on the device, synchronized, median), and the kernels'
time from the PyTorch profiler's CUPTI trace when torch is installed. Every timed call's result is
first checked against the float64 reference on a slice. Results are appended to
``benchmarks/results/gpu_masks.md`` (``--no-save`` to skip).

    python benchmarks/gpu_masks.py [--no-save] [--repeat N]
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_masks.py --sim-smoke   # a dry run at tiny shapes
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import append_results, markdown_table  # noqa: E402
from timing import kernel_time, time_wall  # noqa: E402

BS = 16


def build(rng, rt, lens, H, Hkv, D, dtype):
    """Pools holding every sequence's tokens in shuffled blocks, and the table -> (k, v Tensors, table,
    seq_lens, k, v host arrays)."""
    need = [-(-int(L) // BS) for L in lens]
    N, M = sum(need), max(need)
    perm = rng.permutation(N)
    table = np.zeros((len(lens), M), np.int32)
    o = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[o:o + n]
        o += n
    k = rng.standard_normal((N, BS, Hkv, D), dtype=np.float32).astype(dtype)
    v = rng.standard_normal((N, BS, Hkv, D), dtype=np.float32).astype(dtype)
    import paged_numba as pn
    return pn.tensor(k, runtime=rt), pn.tensor(v, runtime=rt), table, np.asarray(lens, np.int32), k, v


def check(out, lse, q, k, v, table, lens, kw, rows):
    """Reference check of the first ``rows`` query rows (token-major or [B, H, Sq, D] outputs)."""
    from paged_numba.ops.reference import paged_attention_fwd_ref
    got = out.numpy().astype(np.float64)
    ref, _ = paged_attention_fwd_ref(q, k, v, table, seq_lens=lens, **kw)
    sl = (slice(0, rows),)
    err = float(np.abs(got[sl] - ref[sl]).max())
    if not err < 3e-2:
        raise SystemExit(f"gpu_masks: result check failed (max err {err:.3g})")
    return err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--sim-smoke", action="store_true", help="tiny shapes on the CUDA simulator (a dry run)")
    args = ap.parse_args(argv)
    import ml_dtypes

    import paged_numba as pn

    rt = pn.get_runtime("cuda")
    sim = rt.simulator
    if sim and not args.sim_smoke:
        raise SystemExit("gpu_masks: NUMBA_ENABLE_CUDASIM is set: run on a GPU, or pass --sim-smoke")
    try:
        import torch
        torch = torch if torch.cuda.is_available() and not sim else None
    except ImportError:
        torch = None
    reps = 2 if sim else args.repeat
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    H, Hkv, D = (4, 2, 16) if sim else (32, 8, 128)
    sync = rt.synchronize
    rows = []

    def measure(name, fn, checker):
        checker(*fn())
        wall, _ = time_wall(fn, reps, sync)
        kt = kernel_time(torch, fn, reps, sync) if torch is not None else None
        rows.append((name, f"{wall * 1e3:.3f}", "n/a" if kt is None else f"{kt * 1e3:.3f}"))
        print(f"{name}: call {wall * 1e3:.3f} ms, kernels {'n/a' if kt is None else f'{kt * 1e3:.3f} ms'}",
              flush=True)
        return wall, kt

    # 1. mixed batch: one ragged call vs the dense calls it replaces.
    n_pre, n_dec, Sp, L = (1, 3, 6, 12) if sim else (4, 60, 512, 2048)
    lens = [L] * (n_pre + n_dec)
    k, v, table, sl, kh, vh = build(rng, rt, lens, H, Hkv, D, bf16)
    qlens = [Sp] * n_pre + [1] * n_dec
    cu = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    q_rag_h = rng.standard_normal((int(cu[-1]), H, D), dtype=np.float32).astype(bf16)
    q_rag = pn.tensor(q_rag_h, runtime=rt)
    q_pre_h = np.ascontiguousarray(q_rag_h[:n_pre * Sp].reshape(n_pre, Sp, H, D).transpose(0, 2, 1, 3))
    q_dec_h = np.ascontiguousarray(q_rag_h[n_pre * Sp:].reshape(n_dec, 1, H, D).transpose(0, 2, 1, 3))
    q_pre, q_dec = pn.tensor(q_pre_h, runtime=rt), pn.tensor(q_dec_h, runtime=rt)
    t_pre, t_dec = table[:n_pre], np.ascontiguousarray(table[n_pre:])

    def ragged():
        return pn.paged_attention_fwd(q_rag, k, v, table, causal=True, seq_lens=sl, cu_seqlens_q=cu)

    def separate():
        a = pn.paged_attention_fwd(q_pre, k, v, t_pre, causal=True, seq_lens=sl[:n_pre])
        pn.paged_attention_fwd(q_dec, k, v, t_dec, causal=True, seq_lens=sl[n_pre:])
        return a

    kw = dict(causal=True, cu_seqlens_q=cu)
    r1 = measure("mixed batch, one ragged call", ragged, lambda o, s: check(o, s, q_rag_h, kh, vh, table, sl, kw, 8))
    r2 = measure("mixed batch, separate prefill + decode calls", separate,
                 lambda o, s: check(o, s, q_pre_h, kh, vh, t_pre, sl[:n_pre], dict(causal=True), 1))
    ratios = [("mixed batch ragged / separate", r1, r2, 1.0)]

    # 2. window decode over a long context.
    B, L, W = (1, 70, 20) if sim else (4, 32768, 4096)
    k, v, table, sl, kh, vh = build(rng, rt, [L] * B, H, Hkv, D, bf16)
    qh = rng.standard_normal((B, H, 1, D), dtype=np.float32).astype(bf16)
    q = pn.tensor(qh, runtime=rt)
    full = measure(f"decode B{B} L{L}", lambda: pn.paged_attention_fwd(q, k, v, table, causal=True, seq_lens=sl),
                   lambda o, s: check(o, s, qh, kh, vh, table, sl, dict(causal=True), 1))
    win = measure(f"decode B{B} L{L} window_left={W}",
                  lambda: pn.paged_attention_fwd(q, k, v, table, causal=True, seq_lens=sl, window_left=W),
                  lambda o, s: check(o, s, qh, kh, vh, table, sl, dict(causal=True, window_left=W), 1))
    ratios.append((f"window {W} / full at L{L}", win, full, 0.2))

    # 3. softcap / ALiBi cost at the decode and prefill shapes.
    slopes = (2.0 ** (-8.0 * np.arange(1, H + 1) / H)).astype(np.float32)
    for label, B, Sq, L in (("decode", 2, 1, 40) if sim else ("decode", 32, 1, 4096),
                            ("prefill", 1, 9, 9) if sim else ("prefill", 1, 2048, 2048)):
        k, v, table, sl, kh, vh = build(rng, rt, [L] * B, H, Hkv, D, bf16)
        qh = rng.standard_normal((B, H, Sq, D), dtype=np.float32).astype(bf16)
        q = pn.tensor(qh, runtime=rt)
        base = None
        for mod, kwm in (("plain", {}), ("softcap 30", dict(softcap=30.0)), ("ALiBi", dict(alibi_slopes=slopes))):
            res = measure(f"{label} B{B} Sq{Sq} L{L} {mod}",
                          lambda kwm=kwm: pn.paged_attention_fwd(q, k, v, table, causal=True, seq_lens=sl, **kwm),
                          lambda o, s, kwm=kwm: check(o, s, qh, kh, vh, table, sl, dict(causal=True, **kwm), 1))
            if base is None:
                base = res
            else:
                ratios.append((f"{label} {mod} / plain", res, base, 1.1))

    lines = []
    for name, a, b, target in ratios:
        wall = a[0] / b[0]
        kern = "n/a" if a[1] is None or b[1] is None else f"{a[1] / b[1]:.2f}x"
        lines.append((name, f"{wall:.2f}x", kern, f"<= {target}x"))
    print(markdown_table(("ratio", "calls", "kernels", "target"), lines))
    if not args.no_save and not sim:
        table_md = (markdown_table(("workload", "call ms", "kernels ms"), rows) + "\n\n"
                    + markdown_table(("ratio", "calls", "kernels", "target"), lines))
        print("saved to", append_results("gpu_masks", f"ragged / window / softcap / ALiBi on {rt.device}", table_md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
