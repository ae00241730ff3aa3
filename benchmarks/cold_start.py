"""Cold start on the CPU runtime: the first call of each op in a fresh process with an empty numba
cache (what a user meets right after ``pip install``), and the same in a second process that loads
the cache those runs filled.

    python benchmarks/cold_start.py [--no-save] [--repo PATH] [--label TEXT]

Every case runs in its own subprocess with ``NUMBA_CACHE_DIR`` pointed at a fresh temporary
directory (cold), then again in a new subprocess with the same directory (warm). A case times its
own first call with ``time.perf_counter`` (import and input building excluded); the demo
(``python -m paged_numba``) is timed as the whole process. ``--repo`` runs another checkout of the
package (e.g. an older commit in a temporary ``git worktree``) with this script.

Targets (2-core machine): first forward <= 5 s, first backward <= 5 s, the demo <= 10 s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_results, machine, markdown_table  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each case: the code run in the subprocess; it prints one JSON number (seconds of the timed call).
_SETUP = """
import json, time, sys
import numpy as np, ml_dtypes
import paged_numba as pn
rng = np.random.default_rng(0)
B, H, Hkv, D, bs, L = 2, 8, 2, 64, 16, 256
M = L // bs
table = rng.permutation(B * M).reshape(B, M).astype(np.int32)
def pools(dt):
    return [rng.standard_normal((B * M, bs, Hkv, D), dtype=np.float32).astype(dt) for _ in range(2)]
def timed(fn):
    t = time.perf_counter(); r = fn(); return time.perf_counter() - t, r
"""
CASES = {
    "forward f32 (decode B2 H8/2 D64 L256)": """
k, v = pools(np.float32)
q = rng.standard_normal((B, H, 1, D), dtype=np.float32)
t, _ = timed(lambda: pn.paged_attention_fwd(q, k, v, table))
""",
    "forward f32 (causal prefill Sq 256)": """
k, v = pools(np.float32)
q = rng.standard_normal((B, H, L, D), dtype=np.float32)
t, _ = timed(lambda: pn.paged_attention_fwd(q, k, v, table, causal=True))
""",
    "forward bf16 (decode)": """
k, v = pools(ml_dtypes.bfloat16)
q = rng.standard_normal((B, H, 1, D), dtype=np.float32).astype(ml_dtypes.bfloat16)
t, _ = timed(lambda: pn.paged_attention_fwd(q, k, v, table))
""",
    "forward fp8 e4m3 K/V, bf16 q (decode)": """
k, v = pools(ml_dtypes.float8_e4m3fn)
q = rng.standard_normal((B, H, 1, D), dtype=np.float32).astype(ml_dtypes.bfloat16)
t, _ = timed(lambda: pn.paged_attention_fwd_fp8(q, k, v, table))
""",
    "backward f32 (causal Sq 64), after a forward": """
k, v = pools(np.float32)
q = rng.standard_normal((B, H, 64, D), dtype=np.float32)
out, lse = pn.paged_attention_fwd(q, k, v, table, causal=True)
dout = rng.standard_normal(q.shape, dtype=np.float32)
t, _ = timed(lambda: pn.paged_attention_bwd(dout, q, k, v, out, lse, table, causal=True))
""",
    "write_kv f32": """
kp, vp = (np.zeros((B * M, bs, Hkv, D), np.float32) for _ in range(2))
k, v = (rng.standard_normal((5, Hkv, D), dtype=np.float32) for _ in range(2))
t, _ = timed(lambda: pn.write_kv(kp, vp, k, v, np.arange(5)))
""",
}
DEMO = "demo: python -m paged_numba (whole process)"


def _child_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_case(code, env, repo):
    """(seconds of the timed call -- the whole process for the demo --, CPU seconds of the whole
    subprocess: import, inputs and compile included)."""
    cpu0 = _child_cpu()
    if code is None:  # the demo: wall time of the whole process
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "paged_numba", "--runtime", "cpu"], env=env, cwd=repo,
                       check=True, capture_output=True)
        return time.perf_counter() - t, _child_cpu() - cpu0
    script = _SETUP + code + "\nprint(json.dumps(t))\n"
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=repo, check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1]), _child_cpu() - cpu0


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--repo", default=HERE, help="checkout whose paged_numba is measured")
    ap.add_argument("--label", default="", help="names the measured code in the results (e.g. 'before')")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    args = ap.parse_args(argv)
    repo = os.path.abspath(args.repo)
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    rows = []
    cases = list(CASES.items()) + [(DEMO, None)]
    for name, code in cases:
        if args.only and args.only not in name:
            continue
        cache = tempfile.mkdtemp(prefix="pn_numba_cache_")
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=repo, PAGED_NUMBA_RUNTIME="cpu")
        try:
            (cold, cold_cpu), (warm, warm_cpu) = run_case(code, env, repo), run_case(code, env, repo)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        rows.append([name, f"{cold:.1f}", f"{cold_cpu:.1f}", f"{warm:.2f}", f"{warm_cpu:.1f}"])
        print(f"{name:50s} cold {cold:6.1f} s ({cold_cpu:.1f} s CPU)  warm {warm:6.2f} s", flush=True)
    table = markdown_table(["first call (fresh process)", "cold cache s", "cold process CPU s",
                            "warm cache s", "warm process CPU s"], rows)
    print(table)
    if not args.no_save:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                text=True).stdout.strip()
        notes = (f"Measured code: {args.label + ' ' if args.label else ''}commit {commit} ({repo}). "
                 f"Each case in a fresh process with an empty NUMBA_CACHE_DIR (cold), then a second "
                 f"process on the cache the first filled (warm). 'CPU s': user + system time of the whole "
                 f"subprocess (import, inputs, compile), steadier than wall time on a shared machine; "
                 f"numba threads default "
                 f"({os.cpu_count()}); load average before the run {' '.join(load)} "
                 f"(the machine is shared).")
        print("appended to", append_results("cold_start", "CPU cold start", table, notes))


if __name__ == "__main__":
    main()
