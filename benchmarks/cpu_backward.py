"""CPU FP8 decode vs BF16 decode, and the CPU causal backward vs PyTorch SDPA's backward, side by
side in one run.

    python benchmarks/cpu_backward.py [--no-save] [--repeat N]

Targets (2-core development machine): FP8 decode at most 0.6x the time of BF16 decode at the same
shape (B4 H32/8 D128 L2048, bs 16); causal backward B1 H8 D64 L1024 fp32 at most 1.0x torch's.
"""
from __future__ import annotations

import argparse
import os
import sys

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paged_numba as pn  # noqa: E402
from common import append_results, contiguous_kv, markdown_table, median_time, paged_case  # noqa: E402
from paged_numba.ops import reference as ref  # noqa: E402


def decode_rows(rng, repeat):
    B, H, Hkv, D, L, bs = 4, 32, 8, 128, 2048, 16
    q, k, v, table, lens = paged_case(rng, B, H, Hkv, 1, D, L, bs)
    qb = q.astype(ml_dtypes.bfloat16)
    kb, vb = k.astype(ml_dtypes.bfloat16), v.astype(ml_dtypes.bfloat16)
    k8, v8 = ref.quantize_fp8(k, "e4m3"), ref.quantize_fp8(v, "e4m3")
    t_f32 = median_time(lambda: pn.paged_attention_fwd(q, k, v, table, seq_lens=lens), repeat=repeat)
    t_bf16 = median_time(lambda: pn.paged_attention_fwd(qb, kb, vb, table, seq_lens=lens), repeat=repeat)
    t_fp8 = median_time(lambda: pn.paged_attention_fwd_fp8(qb, k8, v8, table, seq_lens=lens), repeat=repeat)
    n = B * L * Hkv * D * 2
    return [
        ["decode f32 K/V", f"{t_f32 * 1e3:.2f}", "", f"{n * 4 / t_f32 / 1e9:.1f} GB/s"],
        ["decode bf16 K/V", f"{t_bf16 * 1e3:.2f}", "1.00x", f"{n * 2 / t_bf16 / 1e9:.1f} GB/s"],
        ["decode fp8 e4m3 K/V (bf16 q)", f"{t_fp8 * 1e3:.2f}", f"{t_fp8 / t_bf16:.2f}x of bf16",
         f"{n / t_fp8 / 1e9:.1f} GB/s"],
    ]


def backward_rows(rng, repeat):
    B, H, D, L, bs = 1, 8, 64, 1024, 16
    q, k, v, table, lens = paged_case(rng, B, H, H, L, D, L, bs)
    dout = rng.standard_normal(q.shape, dtype=np.float32)
    out, lse = pn.paged_attention_fwd(q, k, v, table, causal=True, seq_lens=lens)
    args = (dout, q, k, v, out, lse, table)
    t_pn = median_time(lambda: pn.paged_attention_bwd(*args, causal=True, seq_lens=lens), repeat=repeat)
    flops = 2.5 * 4 * B * H * L * L * D / 2  # 5 matmuls of the backward, causal half
    rows = [["causal backward B1 H8 D64 L1024 fp32 (paged_numba)", f"{t_pn * 1e3:.2f}", "",
             f"{flops / t_pn / 1e9:.1f} GFLOP/s"]]
    try:
        import torch
    except ImportError:
        return rows + [["torch SDPA backward", "n/a", "torch not installed", ""]]
    torch.set_num_threads(os.cpu_count())
    Q = torch.from_numpy(q).requires_grad_()
    K = torch.from_numpy(contiguous_kv(k, table, L)).requires_grad_()
    V = torch.from_numpy(contiguous_kv(v, table, L)).requires_grad_()
    dO = torch.from_numpy(dout)
    O = torch.nn.functional.scaled_dot_product_attention(Q, K, V, is_causal=True)
    dq_t = torch.autograd.grad(O, (Q,), dO, retain_graph=True)[0].numpy()
    dq = pn.paged_attention_bwd(*args, causal=True, seq_lens=lens)[0]
    assert np.abs(dq - dq_t).max() < 1e-3 * max(1.0, np.abs(dq_t).max()), "torch and paged_numba disagree"

    def torch_bwd():
        torch.autograd.grad(O, (Q, K, V), dO, retain_graph=True)
    t_t = median_time(torch_bwd, repeat=repeat)

    def torch_fwd_bwd():
        o = torch.nn.functional.scaled_dot_product_attention(Q, K, V, is_causal=True)
        torch.autograd.grad(o, (Q, K, V), dO)
    t_tf = median_time(torch_fwd_bwd, repeat=repeat)
    rows[0][2] = f"{t_pn / t_t:.2f}x of torch bwd"
    rows.append([f"torch {torch.__version__} SDPA backward only (autograd.grad)", f"{t_t * 1e3:.2f}", "1.00x",
                 f"{flops / t_t / 1e9:.1f} GFLOP/s"])
    rows.append(["torch SDPA forward + backward", f"{t_tf * 1e3:.2f}", f"{t_pn / t_tf:.2f}x (pn bwd / this)", ""])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--repeat", type=int, default=11)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = decode_rows(rng, args.repeat) + backward_rows(rng, args.repeat)
    table = markdown_table(["workload (bs 16, shuffled tables)", "ms (median)", "ratio", "rate"], rows)
    print(table)
    if not args.no_save:
        notes = (f"Medians of {args.repeat} runs; numba threads {__import__('numba').config.NUMBA_NUM_THREADS}. "
                 "Decode rows: B4 H32/8 D128 L2048. torch rows: the same data gathered into contiguous "
                 "[B, H, L, D] (gather not timed).")
        print("appended to", append_results("cpu_backward", "CPU FP8 decode and backward", table, notes))


if __name__ == "__main__":
    main()
