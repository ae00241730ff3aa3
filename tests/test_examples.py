"""The examples run as a user runs them (a subprocess from the repo root) and do what they claim."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_example(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # The first run in a fresh checkout compiles the numba kernels (tens of seconds).
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_train_attention_loss_falls_and_gradients_check():
    steps = 30
    res = _run_example("train_attention.py", "--steps", str(steps), "--seed", "0", "--runtime", "cpu")
    log = f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 0, log

    # Gradient check: every coordinate's analytic gradient matches its finite difference.
    rels = [float(x) for x in re.findall(r"rel err ([0-9.eE+-]+)", res.stdout)]
    assert len(rels) >= 4, log
    assert max(rels) < 1e-2, log
    assert re.search(r"gradient check max rel err \S+: PASS", res.stdout), log
    # Shared prefix block: its dV is the sum of the per-sequence contributions.
    shared = re.search(r"max \|dV - sum of per-sequence dV\| = ([0-9.eE+-]+)", res.stdout)
    assert shared and float(shared.group(1)) < 1e-6, log

    # The loss falls: printed every 10 steps, decreasing overall and by >10x from first to last.
    losses = {int(s): float(v) for s, v in re.findall(r"step\s+(\d+)\s+loss ([0-9.eE+-]+)", res.stdout)}
    assert sorted(losses) == list(range(0, steps + 1, 10)), log
    curve = [losses[s] for s in sorted(losses)]
    assert all(b < a for a, b in zip(curve, curve[1:])), log
    assert curve[0] / curve[-1] > 10, log
    assert re.search(r"\(drop x[0-9.]+\) in %d steps.*: PASS" % steps, res.stdout), log


def test_train_attention_fails_when_loss_does_not_fall():
    # One step cannot drop the loss 10x: the example must say FAIL and exit non-zero.
    res = _run_example("train_attention.py", "--steps", "1", "--runtime", "cpu")
    assert res.returncode != 0, res.stdout + res.stderr
    assert re.search(r"in 1 steps.*: FAIL", res.stdout), res.stdout + res.stderr
