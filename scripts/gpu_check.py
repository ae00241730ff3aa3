"""The one script to run on the GPU machine: versions, the test suite on the real GPU, the GPU
forward benchmark. Everything it writes lands in ``--out`` (default ``$OUT``, else ``./gpu_out``):

    versions.txt          numpy, numba, numba-cuda, torch, GPU, driver, the cuda runtime's device
    gpu_tests_<i>.log     python -m pytest <group i of the test modules> -q --runxfail -p no:cacheprovider
                          -k "cuda and not compile", --jobs groups in parallel (default 3)
    gpu_forward.log       python benchmarks/gpu_forward.py (streamed here too)
    gpu_forward_table.md  the benchmark's final table (printed last)
    gpu_forward.md        a copy of benchmarks/results/gpu_forward.md after the run
    summary.txt           one line per stage

    python scripts/gpu_check.py [--out DIR] [--skip-tests] [--skip-bench] [--quick] [--budget S] [--jobs N]

Run from anywhere; it works in the repository root and puts it on PYTHONPATH for the children.
When the machine's NumPy is too new for numba-cuda (2.5 breaks 0.30.4 at the first kernel
compile) and ``.whl/`` holds a NumPy wheel (shared/gpu/fetch_wheels.sh; carry ``.whl`` to the
machine), the wheel is installed into /tmp/site and put first on PYTHONPATH.

The whole run stays within ``--budget`` seconds (default 530, under 9 minutes): the tests get what
the benchmark's reserve leaves. Exit status: 1 when the tests failed, timed out or collected
nothing (the benchmark still runs); else 3 when the benchmark failed; else 0.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = time.monotonic()
SITE = "/tmp/site"
# The compile check (test_cuda_compile) runs in CI without a GPU; here only the cuda-runtime cases.
TEST_ARGS = ["-q", "--runxfail", "-p", "no:cacheprovider", "-k", "cuda and not compile"]
# Rough cost of each test module's cuda cases (compiles + runs), for splitting them over processes.
TEST_WEIGHT = {"test_forward.py": 3, "test_backward.py": 3, "test_fp8.py": 3, "test_tiny_grid.py": 2,
               "test_masks.py": 3, "test_masks_grid.py": 3, "test_prefill_mma.py": 2,
               "test_kv_cache.py": 2, "test_write_kv.py": 1, "test_backward_mma.py": 2}
BENCH_RESERVE = {False: 240.0, True: 150.0}   # seconds kept for the benchmark (quick: True)

PROBE = r"""
import importlib.metadata as md, platform, sys
def v(name):
    try:
        return md.version(name)
    except Exception:
        return "not installed"
print("python      ", platform.python_version(), sys.executable)
import numpy
print("numpy       ", numpy.__version__, numpy.__file__)
print("numba       ", v("numba"))
print("numba-cuda  ", v("numba-cuda"))
print("ml_dtypes   ", v("ml_dtypes"))
print("pytest      ", v("pytest"), "/ hypothesis", v("hypothesis"))
try:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device visible to torch"
    print("torch       ", torch.__version__, "CUDA", torch.version.cuda, "|", gpu)
except Exception as exc:
    print("torch        unavailable:", type(exc).__name__, exc)
try:
    from numba import cuda
    drv = cuda.cudadrv.driver.driver.get_version()
    print("CUDA driver  API", ".".join(map(str, drv)))
except Exception as exc:
    print("CUDA driver  unavailable:", type(exc).__name__, " ".join(str(exc).split()))
import paged_numba as pn
try:
    rt = pn.get_runtime("cuda")
    print("paged_numba ", pn.__version__, "cuda runtime:", rt.device)
except Exception as exc:
    print("paged_numba ", pn.__version__, "cuda runtime UNAVAILABLE:", exc)
    sys.exit(1)
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:5.0f}s] {msg}", flush=True)


def child_env(extra_path=None) -> dict:
    """Environment of every child: repo root (and /tmp/site) on PYTHONPATH, a real GPU."""
    env = dict(os.environ)
    for var in ("NUMBA_ENABLE_CUDASIM", "PAGED_NUMBA_RUNTIME"):
        env.pop(var, None)
    paths = ([extra_path] if extra_path else []) + [ROOT]
    old = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(cmd, log_path, timeout, env, echo=False):
    """Run ``cmd`` in ROOT with stdout + stderr into ``log_path`` (and echoed when ``echo``);
    kill its process group after ``timeout`` s. -> (returncode or None on timeout, seconds)."""
    start = time.monotonic()
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, errors="replace", bufsize=1)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # the group this script started
            except ProcessLookupError:
                pass

        timer = threading.Timer(max(1.0, timeout), kill)
        timer.start()
        try:
            for line in proc.stdout:
                f.write(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            proc.wait()
        finally:
            timer.cancel()
        if timed_out.is_set():
            f.write(f"\n*** killed after {timeout:.0f} s (time budget) ***\n")
    return (None if timed_out.is_set() else proc.returncode), time.monotonic() - start


def numpy_version(env) -> str:
    r = subprocess.run([sys.executable, "-c", "import numpy; print(numpy.__version__)"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    return r.stdout.strip() or f"unknown ({r.stderr.strip()[-200:]})"


def fix_numpy(args):
    """-> extra PYTHONPATH entry ('/tmp/site') when the NumPy wheel had to be installed, else None."""
    ver = numpy_version(child_env())
    log(f"numpy {ver}")
    m = re.match(r"(\d+)\.(\d+)", ver)
    if args.no_numpy_fix or not m or (int(m.group(1)), int(m.group(2))) < (2, 5):
        return None
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "numpy-*.whl")))
    if not wheels:
        log(f"WARNING: numpy {ver} breaks numba-cuda 0.30.4 (np.row_stack) and .whl/ has no NumPy wheel: "
            "run shared/gpu/fetch_wheels.sh on the development machine and carry .whl")
        return None
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
           "--target", SITE, wheels[-1]]
    log(f"numpy {ver} is too new for numba-cuda: installing {os.path.basename(wheels[-1])} into {SITE}")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        log(f"WARNING: pip failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}")
        return None
    log(f"numpy now {numpy_version(child_env(SITE))} (PYTHONPATH starts with {SITE})")
    return SITE


def versions(out, env) -> bool:
    lines = []
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
        lines.append("nvidia-smi   " + (r.stdout.strip() or r.stderr.strip()))
    except (OSError, subprocess.TimeoutExpired) as exc:
        lines.append(f"nvidia-smi   unavailable: {exc}")
    try:
        r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=180)
        lines += r.stdout.strip().splitlines()
        if r.returncode != 0 and r.stderr.strip():
            lines += ["probe stderr:"] + r.stderr.strip().splitlines()[-15:]
        ok = r.returncode == 0
    except subprocess.TimeoutExpired:
        lines.append("probe timed out after 180 s")
        ok = False
    with open(os.path.join(out, "versions.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    for line in lines:
        print("    " + line, flush=True)
    return ok


def test_summary(log_path) -> str:
    """pytest's final summary line ('3 passed, 40 deselected in 12.3s'), or the last line."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if re.search(r"\b(passed|failed|error|errors|no tests ran|deselected|skipped)\b.* in [\d.]+s", ln):
            return ln.strip("= ")
    return lines[-1] if lines else "empty log"


def test_groups(jobs: int) -> list:
    """The test modules split into ``jobs`` groups of about equal weight (heaviest first, each to the
    lightest group)."""
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    files = [f for f in files if os.path.basename(f) != "test_cuda_compile.py"]
    files.sort(key=lambda f: -TEST_WEIGHT.get(os.path.basename(f), 1))
    groups = [[] for _ in range(max(1, min(jobs, len(files))))]
    load = [0] * len(groups)
    for f in files:
        i = load.index(min(load))
        groups[i].append(os.path.relpath(f, ROOT))
        load[i] += TEST_WEIGHT.get(os.path.basename(f), 1)
    return groups


def tail(path, n):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "./gpu_out", help="output folder (default $OUT, else ./gpu_out)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the test suite")
    ap.add_argument("--skip-bench", action="store_true", help="do not run benchmarks/gpu_forward.py")
    ap.add_argument("--quick", action="store_true", help="benchmark with fewer repetitions")
    ap.add_argument("--budget", type=float, default=530.0, help="seconds for the whole run (default 530)")
    ap.add_argument("--jobs", type=int, default=3, help="parallel pytest processes for the tests (default 3)")
    ap.add_argument("--no-numpy-fix", action="store_true", help="never install the NumPy wheel from .whl/")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    deadline = T0 + args.budget
    summary = []
    log(f"gpu_check in {ROOT}, output to {out}, budget {args.budget:.0f} s")

    env = child_env(fix_numpy(args))
    log("versions:")
    runtime_ok = versions(out, env)
    if not runtime_ok:
        log("WARNING: the cuda runtime did not start (see versions.txt): the cuda tests will not be collected")
    summary.append(f"cuda runtime: {'ok' if runtime_ok else 'UNAVAILABLE'}")

    tests_failed = False
    if args.skip_tests:
        summary.append("tests: skipped (--skip-tests)")
    else:
        reserve = 0.0 if args.skip_bench else BENCH_RESERVE[args.quick]
        timeout = max(60.0, deadline - time.monotonic() - reserve)
        groups = test_groups(args.jobs)
        results = [None] * len(groups)

        def run_group(i):
            log_path = os.path.join(out, f"gpu_tests_{i}.log")
            results[i] = run([sys.executable, "-m", "pytest", *groups[i], *TEST_ARGS], log_path, timeout, env)

        log(f"tests: {len(groups)} parallel pytest processes {TEST_ARGS} (timeout {timeout:.0f} s) over "
            + "; ".join(" ".join(os.path.basename(f) for f in g) for g in groups))
        threads = [threading.Thread(target=run_group, args=(i,)) for i in range(len(groups))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = []
        for i, (rc, secs) in enumerate(results):
            log_path = os.path.join(out, f"gpu_tests_{i}.log")
            line = test_summary(log_path)
            if rc is None:
                status = f"TIMED OUT after {secs:.0f} s ({line})"
            elif rc == 5:
                status = f"NO CUDA TESTS COLLECTED (pytest rc 5: the cuda runtime is not in the fixture) ({line})"
            elif rc != 0:
                status = f"FAILED (pytest rc {rc}): {line}"
            else:
                status = f"ok: {line}"
            if rc != 0:
                tests_failed = True
                print(tail(log_path, 60), flush=True)
            log(f"tests [{i}] {status} [{secs:.0f} s]")
            statuses.append(f"tests [{i}] {' '.join(os.path.basename(f) for f in groups[i])}: {status}")
        summary += statuses

    bench_failed = False
    if args.skip_bench:
        summary.append("benchmark: skipped (--skip-bench)")
    else:
        timeout = max(30.0, deadline - time.monotonic() - 5.0)
        log_path = os.path.join(out, "gpu_forward.log")
        table_path = os.path.join(out, "gpu_forward_table.md")
        if os.path.exists(table_path):
            os.remove(table_path)
        cmd = [sys.executable, "benchmarks/gpu_forward.py", "--table-out", table_path] + (["--quick"] if args.quick else [])
        log(f"benchmark: {' '.join(cmd[1:])} (timeout {timeout:.0f} s) -> {log_path}")
        rc, secs = run(cmd, log_path, timeout, env, echo=True)
        bench_failed = rc != 0
        status = "TIMED OUT" if rc is None else ("ok" if rc == 0 else f"FAILED (rc {rc})")
        log(f"benchmark {status} [{secs:.0f} s]")
        results = os.path.join(ROOT, "benchmarks", "results", "gpu_forward.md")
        if os.path.exists(results):
            shutil.copy(results, os.path.join(out, "gpu_forward.md"))
        summary.append(f"benchmark: {status} in {secs:.0f} s")

    summary.append(f"total: {time.monotonic() - T0:.0f} s")
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write("\n".join(summary) + "\n")
    print("\n==== gpu_check summary ====\n" + "\n".join(summary), flush=True)
    table_path = os.path.join(out, "gpu_forward_table.md")
    if not args.skip_bench and os.path.exists(table_path):
        with open(table_path) as f:
            print("\n" + f.read(), flush=True)
    return 1 if tests_failed else (3 if bench_failed else 0)


if __name__ == "__main__":
    sys.exit(main())
