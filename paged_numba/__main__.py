"""``python -m paged_numba``: ``generate`` streams SmolLM2's continuation of a prompt (the main job);
``serve-bench`` runs concurrent prompts through the engine; the demo (the default) -- a
PagedKVCache, a decode step and a prefill on the default runtime, checked against the float64
reference, with timings; ``bench`` times the ops and the cache over a set of workloads.

    python -m paged_numba generate "PROMPT" [--max-tokens N] [--temperature T] [--runtime cpu|cuda] [--chat]
    python -m paged_numba serve-bench [-n N] [--shared-prefix T]
    python -m paged_numba [demo | bench [--quick]] [--runtime NAME]
"""
from __future__ import annotations

import argparse

import numpy as np


def demo(runtime=None) -> int:
    import paged_numba as pn
    from paged_numba.bench import median_time
    from paged_numba.ops.reference import paged_attention_fwd_ref

    rt = pn.get_runtime(runtime)
    print(f"paged_numba {pn.__version__} on runtime {rt.name!r} ({rt.device})")
    rng = np.random.default_rng(0)
    H, Hkv, D, bs = 16, 4, 64, 16
    prompts = [700, 1024, 33]
    N = sum(-(-L // bs) for L in prompts) + 16
    # A paged KV cache: sequences take blocks from the pool as they grow; a fork shares blocks.
    cache = pn.PagedKVCache(N, bs, Hkv, D, runtime=rt)
    ids = []
    for L in prompts:
        s = cache.add_sequence()
        for part in np.array_split(np.arange(L), 2):   # the K/V of a prompt, written in two appends
            cache.append(s, rng.standard_normal((part.size, Hkv, D), dtype=np.float32),
                         rng.standard_normal((part.size, Hkv, D), dtype=np.float32))
        ids.append(s)
    fork = cache.fork(ids[0])                          # shares sequence 0's 700 tokens
    cache.append(fork, rng.standard_normal((12, Hkv, D), dtype=np.float32),
                 rng.standard_normal((12, Hkv, D), dtype=np.float32))
    ids.append(fork)
    table, lens = cache.block_table(ids)
    shared = int((cache.ref_counts > 1).sum())
    print(f"KV cache: {N} blocks x {bs} tokens x {Hkv} kv heads x {D} dims, {N * cache.block_nbytes / 2**20:.1f} MiB; "
          f"lengths {lens.tolist()} (the last a fork of the first: {shared} blocks shared); "
          f"{N - cache.num_free_blocks} blocks in use")
    B = len(ids)
    ok = True
    for name, Sq, causal in (("decode", 1, True), ("prefill", 128, True)):
        q = rng.standard_normal((B, H, Sq, D), dtype=np.float32)
        out, lse = cache.attention(q, ids, causal=causal)
        args = (q, cache.k_blocks.numpy(), cache.v_blocks.numpy(), table)
        ref, ref_lse = paged_attention_fwd_ref(*args, causal=causal, seq_lens=lens)
        err = float(np.abs(out - ref).max())
        t = median_time(lambda: cache.attention(q, ids, causal=causal))
        t_ref = median_time(lambda: paged_attention_fwd_ref(*args, causal=causal, seq_lens=lens), repeat=1)
        good = err < 1e-4 and np.allclose(lse, ref_lse, atol=1e-4)
        ok &= good
        print(f"{name:8s} Sq={Sq:<4d} causal={causal!s:5s} max|out-ref|={err:.2e} "
              f"{'ok' if good else 'MISMATCH'}  {t * 1e3:8.2f} ms  (reference {t_ref * 1e3:.0f} ms)")
    one = [(rng.standard_normal((1, Hkv, D), dtype=np.float32),) * 2 for _ in ids]

    def append_step():
        for s, (k, v) in zip(ids, one):
            cache.append(s, k, v)
    t = median_time(append_step)
    print(f"append   1 token to each of {B} sequences (write_kv)          {t * 1e3:8.2f} ms")
    return 0 if ok else 1


def main(argv=None) -> int:
    from .models.cli import add_generate_parser, add_serve_bench_parser

    parser = argparse.ArgumentParser(prog="python -m paged_numba", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default=None, help="cpu, cuda or auto (default: $PAGED_NUMBA_RUNTIME or auto)")
    sub = parser.add_subparsers(dest="command", metavar="{generate,serve-bench,demo,bench}")
    add_generate_parser(sub)
    add_serve_bench_parser(sub)
    for name, text in (("demo", "the paged-cache demo, checked against the reference (the default)"),
                       ("bench", "time the ops and the cache")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--runtime", default=argparse.SUPPRESS, help="cpu, cuda or auto")
        if name == "bench":
            p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is not None:
        return args.func(args)
    if args.command == "bench":
        from .bench import bench
        return bench(args.runtime, quick=args.quick)
    return demo(args.runtime)


if __name__ == "__main__":
    raise SystemExit(main())
