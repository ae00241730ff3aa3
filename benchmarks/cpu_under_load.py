"""Small CPU calls next to a busy core: the decode, prefill and ``examples/generate.py`` shapes
idle and while another process keeps one core busy (``python -c 'while True: pass'``, started and
killed here), side by side in one run.

    python benchmarks/cpu_under_load.py [--no-save] [--repo PATH] [--label TEXT] [--repeat N]

Each op is timed in a subprocess (median of ``--repeat`` calls after a warm-up); generate reports
its own tokens/s (median of 3 runs). ``--repo`` measures another checkout of the package.

Targets (2-core machine): the small decode next to a busy core <= 3x its idle time;
``examples/generate.py`` >= 0.5x its idle tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_results, markdown_table  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPS = {
    # name: (B, H, Hkv, Sq, D, L, causal)
    "decode B2 H8/2 D64 L256": (2, 8, 2, 1, 64, 256, False),
    "causal prefill B1 H8/2 D64 L128": (1, 8, 2, 128, 64, 128, True),
    "decode B4 H32/8 D128 L2048 (large)": (4, 32, 8, 1, 128, 2048, False),
}
_TIMER = """
import json, sys, time
import numpy as np
sys.path.insert(0, {bench!r})
import paged_numba as pn
from common import paged_case
B, H, Hkv, Sq, D, L, causal = {shape}
q, k, v, table, lens = paged_case(np.random.default_rng(0), B, H, Hkv, Sq, D, L, 16)
f = lambda: pn.paged_attention_fwd(q, k, v, table, causal=causal, seq_lens=lens)
for _ in range(5):
    f()
ts = []
for _ in range({repeat}):
    t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
print(json.dumps(float(np.median(ts))))
"""


def time_op(shape, repeat, env, repo):
    code = _TIMER.format(bench=os.path.join(HERE, "benchmarks"), shape=shape, repeat=repeat)
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def generate_tps(env, repo, runs=3):
    vals = []
    for _ in range(runs):
        res = subprocess.run([sys.executable, os.path.join(repo, "examples", "generate.py"), "--runtime", "cpu"],
                             env=env, cwd=repo, check=True, capture_output=True, text=True)
        vals.append(float(re.search(r"= (\d+) tokens/s", res.stdout).group(1)))
    return sorted(vals)[len(vals) // 2]


class BusyCore:
    """A process spinning on one core for the duration of the ``with`` block."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--repo", default=HERE, help="checkout whose paged_numba is measured")
    ap.add_argument("--label", default="")
    ap.add_argument("--repeat", type=int, default=201)
    args = ap.parse_args(argv)
    repo = os.path.abspath(args.repo)
    env = dict(os.environ, PYTHONPATH=repo, PAGED_NUMBA_RUNTIME="cpu")
    load = open("/proc/loadavg").read().split()[:3]
    generate_tps(env, repo, runs=1)  # fills the numba cache: no compile below
    rows = []
    for name, shape in OPS.items():
        idle = time_op(shape, args.repeat, env, repo)
        with BusyCore():
            busy = time_op(shape, args.repeat, env, repo)
        rows.append([name, f"{idle * 1e3:.3f} ms", f"{busy * 1e3:.3f} ms", f"{busy / idle:.2f}x"])
        print(rows[-1], flush=True)
    idle = generate_tps(env, repo)
    with BusyCore():
        busy = generate_tps(env, repo)
    rows.append(["examples/generate.py (tokens/s)", f"{idle:.0f}", f"{busy:.0f}", f"{busy / idle:.2f}x"])
    print(rows[-1], flush=True)
    table = markdown_table(["workload (f32, bs 16)", "idle", "one core busy", "busy / idle"], rows)
    print(table)
    if not args.no_save:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                text=True).stdout.strip()
        notes = (f"Measured code: {args.label + ' ' if args.label else ''}commit {commit}. Op rows: median of "
                 f"{args.repeat} calls after 5 warm-up calls, one subprocess per cell; generate: median of 3 "
                 f"runs (its own tokens/s, the dense check excluded). 'One core busy': a `python -c 'while "
                 f"True: pass'` process running beside it. Load average before the run: {' '.join(load)} "
                 "(the machine is shared with other developers' jobs).")
        print("appended to", append_results("cpu_under_load", "CPU calls next to a busy core", table, notes))


if __name__ == "__main__":
    main()
