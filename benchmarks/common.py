"""Shared benchmark plumbing: timing medians, case builders, and appending results to
``benchmarks/results/`` with machine, date and commit."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import numpy as np

from timing import median_time, median_times_interleaved  # noqa: F401  (re-exported: the CPU benchmarks time through timing.py too)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def paged_case(rng, B, H, Hkv, Sq, D, L, bs, dtype=np.float32):
    """q, k_blocks, v_blocks, block_table (shuffled: consecutive tokens sit in scattered blocks),
    seq_lens for B sequences of length L."""
    M = (L + bs - 1) // bs
    N = B * M
    q = rng.standard_normal((B, H, Sq, D), dtype=np.float32).astype(dtype)
    k = rng.standard_normal((N, bs, Hkv, D), dtype=np.float32).astype(dtype)
    v = rng.standard_normal((N, bs, Hkv, D), dtype=np.float32).astype(dtype)
    table = rng.permutation(N).reshape(B, M).astype(np.int32)
    return q, k, v, table, np.full(B, L, np.int32)


def contiguous_kv(blocks, table, L):
    """[B, Hkv, L, D] copy of the paged pool, the layout torch SDPA takes."""
    B = table.shape[0]
    g = blocks[table]  # [B, M, bs, Hkv, D]
    g = g.reshape(B, -1, *blocks.shape[2:])[:, :L]
    return np.ascontiguousarray(g.transpose(0, 2, 1, 3))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_results(name: str, title: str, table: str, notes: str = "") -> str:
    """Append a dated section to ``benchmarks/results/<name>.md``; returns its path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.md")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "a") as f:
        f.write(f"\n## {title} -- {now}, commit {commit()}\n\nMachine: {machine()}\n\n{table}\n")
        if notes:
            f.write(f"\n{notes}\n")
    return path


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
