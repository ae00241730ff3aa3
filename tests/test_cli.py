"""``python -m paged_numba`` as a user runs it (a subprocess from the repo root): every subcommand
has its own ``--help``; usage errors (unknown flags, unknown runtimes, a runtime that cannot start,
the simulator for commands it cannot run) are one line on stderr naming the fix, exit status 2,
no traceback; the demo runs on the CUDA simulator at tiny shapes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m paged_numba"


from gpu_probe import real_gpu as _real_gpu  # noqa: E402


def _cli(*args: str, sim: bool | None = None, timeout: float = 120, **env_extra) -> subprocess.CompletedProcess:
    """Run ``python -m paged_numba ARGS``; ``sim`` True / False sets / clears NUMBA_ENABLE_CUDASIM
    (the test process may have set it), None leaves the environment as it is."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("PAGED_NUMBA_RUNTIME", None)
    if sim is True:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    elif sim is False:
        env.pop("NUMBA_ENABLE_CUDASIM", None)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "paged_numba", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_usage_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    log = f"rc={res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 2, log
    assert "Traceback" not in res.stderr + res.stdout, log
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, log
    assert lines[0].startswith(PROG) and ": error: " in lines[0], log
    for n in needles:
        assert n in lines[0], log
    return lines[0]


@pytest.mark.parametrize("command, flags", [
    ("generate", ["--max-tokens", "--chat", "--model", "--runtime"]),
    ("serve-bench", ["--num-prompts", "--shared-prefix", "--no-prefix-caching", "--runtime"]),
    ("demo", ["--runtime"]),
    ("bench", ["--quick", "--runtime"]),
])
def test_each_subcommand_has_its_own_help(command, flags):
    res = _cli(command, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: {PROG} {command}"), res.stdout
    for f in flags:
        assert f in res.stdout, res.stdout
    # flags of the other subcommands are not listed
    others = {"generate": "--quick", "serve-bench": "--chat", "demo": "--quick", "bench": "--chat"}
    assert others[command] not in res.stdout, res.stdout


@pytest.mark.parametrize("args, flag", [
    (["--quick"], "--quick"),                 # --quick belongs to bench, not to the demo
    (["bench", "--frobnicate"], "--frobnicate"),
    (["generate"], "prompt"),                 # the required prompt is missing
])
def test_unknown_flags_are_one_line_errors(args, flag):
    line = _assert_usage_error(_cli(*args), flag)
    assert "--help" in line


@pytest.mark.parametrize("args", [["--runtime", "tpu"], ["generate", "hi", "--runtime", "tpu"]])
def test_unknown_runtime_is_a_one_line_error(args):
    _assert_usage_error(_cli(*args), "'tpu'", "'cpu'", "--runtime cpu")


def test_unknown_runtime_from_the_environment_names_the_variable():
    _assert_usage_error(_cli("bench", "--quick", PAGED_NUMBA_RUNTIME="tpu"), "$PAGED_NUMBA_RUNTIME", "'tpu'")


@pytest.mark.skipif(_real_gpu(), reason="a GPU is present: the cuda runtime starts here")
def test_missing_gpu_is_a_one_line_error():
    _assert_usage_error(_cli("generate", "hi", "--runtime", "cuda", sim=False), "'cuda'", "cannot start",
                        "runtime='cpu'")


def test_simulator_refuses_what_it_cannot_run_in_seconds():
    _assert_usage_error(_cli("bench", "--quick", "--runtime", "cuda", sim=True), "simulator", "--runtime cpu")


def test_generate_without_the_model_file_is_a_one_line_error(tmp_path):
    _assert_usage_error(_cli("generate", "hi", "--runtime", "cpu", "--model", str(tmp_path / "none.gguf")),
                        "none.gguf")


def test_demo_runs_on_the_simulator_at_tiny_shapes():
    res = _cli("demo", "--runtime", "cuda", sim=True, timeout=300)
    log = f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 0, log
    assert "simulator" in res.stdout, log
    assert res.stdout.count(" ok ") == 2 and "MISMATCH" not in res.stdout, log
