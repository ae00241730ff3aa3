"""CPU forward benchmark: paged_numba vs the float64 reference vs PyTorch SDPA (when installed)
on the same data made contiguous, side by side in one run. fp32, block_size 16, shuffled tables.

    python benchmarks/cpu_forward.py [--no-save] [--repeat N]

Targets (2-core development machine): decode at most 0.8x torch SDPA's time (>= 15 GB/s of K/V
read); causal prefill at most 1.0x torch's time.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paged_numba as pn  # noqa: E402
from common import append_results, contiguous_kv, markdown_table, median_time, paged_case  # noqa: E402
from paged_numba.ops.reference import paged_attention_fwd_ref  # noqa: E402

WORKLOADS = {
    # name: (B, H, Hkv, Sq, D, L, causal)
    "decode B4 H32/8 D128 L2048": (4, 32, 8, 1, 128, 2048, False),
    "prefill causal B1 H8 D64 L1024": (1, 8, 8, 1024, 64, 1024, True),
}


def torch_sdpa(q, k, v, table, L, causal, H, Hkv):
    try:
        import torch
    except ImportError:
        return None
    Q = torch.from_numpy(q)
    K = torch.from_numpy(contiguous_kv(k, table, L))
    V = torch.from_numpy(contiguous_kv(v, table, L))
    kw = {"enable_gqa": True} if H != Hkv else {}

    def run():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(Q, K, V, is_causal=causal, **kw)
    ref, _ = paged_attention_fwd_ref(q, k, v, table, causal=causal, seq_len_k=L)
    assert np.abs(run().numpy() - ref).max() < 1e-4, "torch SDPA disagrees with the reference"
    return run


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--repeat", type=int, default=11)
    args = ap.parse_args(argv)
    rt = pn.get_runtime("cpu")
    try:
        import torch
        torch_version = torch.__version__
        torch.set_num_threads(os.cpu_count())
    except ImportError:
        torch_version = None
    rng = np.random.default_rng(0)
    rows = []
    for name, (B, H, Hkv, Sq, D, L, causal) in WORKLOADS.items():
        q, k, v, table, lens = paged_case(rng, B, H, Hkv, Sq, D, L, 16)
        out, _ = pn.paged_attention_fwd(q, k, v, table, causal=causal, seq_lens=lens, runtime=rt)
        ref, _ = paged_attention_fwd_ref(q, k, v, table, causal=causal, seq_lens=lens)
        err = float(np.abs(out - ref).max())
        t_pn = median_time(lambda: pn.paged_attention_fwd(q, k, v, table, causal=causal, seq_lens=lens,
                                                          runtime=rt), repeat=args.repeat)
        t_ref = median_time(lambda: paged_attention_fwd_ref(q, k, v, table, causal=causal, seq_lens=lens),
                            repeat=1, warmup=0)
        torch_run = torch_sdpa(q, k, v, table, L, causal, H, Hkv)
        t_torch = median_time(torch_run, repeat=args.repeat) if torch_run else None
        kv_bytes = 2 * B * L * Hkv * D * 4
        flops = 4 * B * H * Sq * L * D * (0.5 if causal and Sq == L else 1.0)
        rows.append([name, f"{t_pn * 1e3:.2f}", f"{t_torch * 1e3:.2f}" if t_torch else "n/a",
                     f"{t_pn / t_torch:.2f}x" if t_torch else "n/a", f"{t_ref * 1e3:.0f}",
                     f"{kv_bytes / t_pn / 1e9:.1f}", f"{flops / t_pn / 1e9:.1f}", f"{err:.1e}"])
    header = ["workload (fp32, bs 16)", "paged_numba ms", "torch SDPA ms", "ratio pn/torch",
              "reference ms", "pn K/V GB/s", "pn GFLOP/s", "max err"]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_save:
        notes = (f"Medians of {args.repeat} runs; torch {torch_version or 'not installed'} SDPA on the same "
                 "data gathered into contiguous [B, Hkv, L, D] (gather not timed); numba threads "
                 f"{__import__('numba').config.NUMBA_NUM_THREADS}.")
        print("appended to", append_results("cpu_forward", "CPU forward", table, notes))


if __name__ == "__main__":
    main()
