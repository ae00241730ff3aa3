"""``python -m paged_numba``: ``generate`` streams SmolLM2's continuation of a prompt (the main job);
``serve-bench`` runs concurrent prompts through the engine; the demo (the default) -- a
PagedKVCache, a decode step and a prefill on the default runtime, checked against the float64
reference, with timings; ``bench`` times the ops and the cache over a set of workloads.

    python -m paged_numba generate "PROMPT" [--max-tokens N] [--temperature T] [--runtime cpu|cuda] [--chat]
    python -m paged_numba serve-bench [-n N] [--shared-prefix T]
    python -m paged_numba [demo | bench [--quick]] [--runtime NAME]

Every subcommand has its own ``--help``. A usage error (unknown flag, unknown runtime, a runtime
that cannot start here) prints one line naming the fix to stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

PROG = "python -m paged_numba"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``PROG: error: MESSAGE (see 'PROG --help')``, status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def usage_error(message: str, prog: str = PROG) -> int:
    """Print one line ``prog: error: message`` to stderr; return the usage-error status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def resolve_runtime(name, command: str):
    """``(runtime, None)`` or ``(None, status)`` after one printed line: unknown names, runtimes that
    cannot start, and the CUDA simulator for the commands it cannot run in reasonable time."""
    import paged_numba as pn

    prog = f"{PROG} {command}"
    try:
        rt = pn.get_runtime(name)
    except ValueError as exc:            # an unknown name, given or from $PAGED_NUMBA_RUNTIME
        where = "--runtime" if name is not None else "$PAGED_NUMBA_RUNTIME"
        text = str(exc).removeprefix("runtime: ")
        return None, usage_error(f"{where}: {text}; pass --runtime cpu (or cuda on a GPU machine)", prog)
    except pn.RuntimeUnavailableError as exc:
        return None, usage_error(f"runtime {name or 'auto'!r} cannot start here: {exc}", prog)
    if getattr(rt, "simulator", False) and command != "demo":
        return None, usage_error(
            "the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) runs ~1 ms per GPU thread: it is for the tests "
            f"and the demo only; run {command} with --runtime cpu or on a GPU", prog)
    return rt, None


def _demo_shapes(simulator: bool):
    """(H, Hkv, D, bs, prompts, fork tokens, prefill Sq): the simulator gets tiny shapes (and no
    timing) so that the demo finishes in seconds there."""
    if simulator:
        return 4, 2, 16, 8, [20], 3, 5
    return 16, 4, 64, 16, [700, 1024, 33], 12, 128


def demo(runtime=None) -> int:
    import paged_numba as pn
    from paged_numba.bench import median_time
    from paged_numba.ops.reference import paged_attention_fwd_ref

    rt = pn.get_runtime(runtime)
    sim = bool(getattr(rt, "simulator", False))
    print(f"paged_numba {pn.__version__} on runtime {rt.name!r} ({rt.device})"
          f"{' -- tiny shapes on the simulator' if sim else ''}")
    rng = np.random.default_rng(0)
    H, Hkv, D, bs, prompts, n_fork, P = _demo_shapes(sim)

    def timed(fn, repeat=5):
        if sim:            # simulator times mean nothing: one call, no timing
            fn()
            return "   untimed"
        return f"{median_time(fn, repeat) * 1e3:8.2f} ms"
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
    fork = cache.fork(ids[0])                          # shares sequence 0's tokens
    cache.append(fork, rng.standard_normal((n_fork, Hkv, D), dtype=np.float32),
                 rng.standard_normal((n_fork, Hkv, D), dtype=np.float32))
    ids.append(fork)
    table, lens = cache.block_table(ids)
    shared = int((cache.ref_counts > 1).sum())
    print(f"KV cache: {N} blocks x {bs} tokens x {Hkv} kv heads x {D} dims, {N * cache.block_nbytes / 2**20:.1f} MiB; "
          f"lengths {lens.tolist()} (the last a fork of the first: {shared} blocks shared); "
          f"{N - cache.num_free_blocks} blocks in use")
    B = len(ids)
    ok = True
    for name, Sq, causal in (("decode", 1, True), ("prefill", P, True)):
        q = rng.standard_normal((B, H, Sq, D), dtype=np.float32)
        out, lse = cache.attention(q, ids, causal=causal)
        args = (q, cache.k_blocks.numpy(), cache.v_blocks.numpy(), table)
        ref, ref_lse = paged_attention_fwd_ref(*args, causal=causal, seq_lens=lens)
        err = float(np.abs(out - ref).max())
        t = timed(lambda: cache.attention(q, ids, causal=causal))
        t_ref = timed(lambda: paged_attention_fwd_ref(*args, causal=causal, seq_lens=lens), repeat=1)
        good = err < 1e-4 and np.allclose(lse, ref_lse, atol=1e-4)
        ok &= good
        print(f"{name:8s} Sq={Sq:<4d} causal={causal!s:5s} max|out-ref|={err:.2e} "
              f"{'ok' if good else 'MISMATCH'}  {t}  (reference {t_ref.strip()})")
    one = [(rng.standard_normal((1, Hkv, D), dtype=np.float32),) * 2 for _ in ids]

    def append_step():
        for s, (k, v) in zip(ids, one):
            cache.append(s, k, v)
    print(f"append   1 token to each of {B} sequences (write_kv)          {timed(append_step)}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    from .models.cli import add_generate_parser, add_serve_bench_parser

    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default=None, help="cpu, cuda or auto (default: $PAGED_NUMBA_RUNTIME or auto)")
    sub = parser.add_subparsers(dest="command", metavar="{generate,serve-bench,demo,bench}")
    add_generate_parser(sub)
    add_serve_bench_parser(sub)
    for name, text in (("demo", "the paged-cache demo, checked against the reference (the default); "
                                "tiny shapes on the CUDA simulator"),
                       ("bench", "time the ops and the cache")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--runtime", default=argparse.SUPPRESS, help="cpu, cuda or auto")
        if name == "bench":
            p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "demo"
    rt, status = resolve_runtime(args.runtime, command)
    if rt is None:
        return status
    args.runtime = rt
    if getattr(args, "func", None) is not None:
        return args.func(args)
    if command == "bench":
        from .bench import bench
        return bench(rt, quick=args.quick)
    return demo(rt)


if __name__ == "__main__":
    raise SystemExit(main())
