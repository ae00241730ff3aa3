"""The runtime registry (get_runtime, available_runtimes, register_runtime, PAGED_NUMBA_RUNTIME,
"auto"), the Runtime interface, pn.tensor / Tensor, and pn.DType."""
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import paged_numba as pn
from helpers import RUNTIMES, cudasim_enabled, make_case
from paged_numba import runtime as registry
from paged_numba.runtime.cpu import CpuRuntime

ROOT = Path(__file__).resolve().parents[1]


def run_python(code, env_changes=None, drop=(), timeout=180):
    """Run ``code`` in a fresh interpreter with the repository importable; -> CompletedProcess."""
    env = dict(os.environ)
    for name in drop:
        env.pop(name, None)
    env.update(env_changes or {})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def real_gpu_present() -> bool:
    if cudasim_enabled():
        return False
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            continue
    return False


@pytest.fixture
def custom_runtime():
    """Registers 'mycpu': a Runtime subclass wrapping the cpu client that counts op calls and
    factory calls; unregistered afterwards."""
    calls = {"factory": 0, "fwd": 0, "sync": 0}

    class CountingClient:
        def __init__(self, runtime, inner):
            self.runtime = runtime
            self._inner = inner

        def run_fwd(self, cfg, q, k, v):
            calls["fwd"] += 1
            return self._inner.run_fwd(cfg, q, k, v)

    class MyRuntime(pn.Runtime):
        name = "mycpu"

        def __init__(self):
            self._cpu = CpuRuntime()
            self.device = self._cpu.device
            self.client = CountingClient(self, self._cpu.client)

        def synchronize(self):
            calls["sync"] += 1

        def from_host(self, arr):
            return self._cpu.from_host(arr)

        def to_host(self, storage):
            return self._cpu.to_host(storage)

    def factory():
        calls["factory"] += 1
        return MyRuntime()

    pn.register_runtime("mycpu", factory)
    try:
        yield calls
    finally:
        for d in (registry._FACTORIES, registry._INSTANCES, registry._FAILURES):
            d.pop("mycpu", None)


# ------------------------------------------------------------------------------- import

def test_import_does_not_import_numba_cuda():
    run_python("import paged_numba, sys; assert 'numba.cuda' not in sys.modules, 'numba.cuda imported'")


def test_import_does_not_import_numba_cuda_under_simulator():
    run_python("import paged_numba, sys; assert 'numba.cuda' not in sys.modules",
               {"NUMBA_ENABLE_CUDASIM": "1"})


def test_cpu_runtime_does_not_import_numba_cuda():
    """Only runtime/cuda/ may import numba.cuda: running the cpu forward must not."""
    # Sq = 0: the cpu client and its kernel module load, nothing compiles (kept cheap; the
    # compiled path is checked by test_cpu_kernel_cache_is_reused).
    run_python(
        "import sys, numpy as np, paged_numba as pn\n"
        "x = np.ones((1, 1, 1, 8), np.float32)\n"
        "out, lse = pn.paged_attention_fwd(x[:, :, :0], x, x, np.zeros((1, 1), np.int32), runtime='cpu')\n"
        "assert out.shape == (1, 1, 0, 8)\n"
        "assert 'paged_numba.kernels.cpu.paged_attention' in sys.modules\n"
        "pn.get_runtime('cpu'); pn.tensor(x, runtime='cpu')\n"
        "assert 'numba.cuda' not in sys.modules, 'numba.cuda imported'\n")


# ------------------------------------------------------------------------------- registry

def test_env_var_selects_runtime(monkeypatch, custom_runtime):
    monkeypatch.setenv("PAGED_NUMBA_RUNTIME", "cpu")
    assert pn.get_runtime().name == "cpu"
    assert pn.get_runtime(None) is pn.get_runtime("cpu")
    monkeypatch.setenv("PAGED_NUMBA_RUNTIME", "mycpu")
    assert pn.get_runtime().name == "mycpu"
    assert pn.get_runtime("cpu").name == "cpu"                     # explicit name beats the env
    monkeypatch.setenv("PAGED_NUMBA_RUNTIME", "no_such_runtime")
    with pytest.raises(ValueError, match="no_such_runtime"):
        pn.get_runtime()
    assert pn.get_runtime("cpu").name == "cpu"
    monkeypatch.setenv("PAGED_NUMBA_RUNTIME", "")
    assert pn.get_runtime() is pn.get_runtime("auto")
    monkeypatch.delenv("PAGED_NUMBA_RUNTIME")
    assert pn.get_runtime() is pn.get_runtime("auto")


@pytest.mark.skipif(cudasim_enabled() or real_gpu_present(), reason="needs a machine without a GPU")
def test_env_var_cuda_without_gpu_raises(monkeypatch):
    monkeypatch.setenv("PAGED_NUMBA_RUNTIME", "cuda")
    with pytest.raises(pn.RuntimeUnavailableError):
        pn.get_runtime()


def test_ops_default_to_env_runtime(monkeypatch, custom_runtime):
    """NumPy in: the op runs on pn.get_runtime(), i.e. on $PAGED_NUMBA_RUNTIME when set."""
    rng = np.random.default_rng(0)
    q, k, v, bt, sl = make_case(rng, 2, 2, 1, 2, 8, 4, [3, 5], np.float32)
    expected, _ = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime="cpu")
    assert custom_runtime["fwd"] == 0
    monkeypatch.setenv("PAGED_NUMBA_RUNTIME", "mycpu")
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl)
    assert custom_runtime["fwd"] == 1
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, expected)
    monkeypatch.setenv("PAGED_NUMBA_RUNTIME", "cpu")
    pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl)
    assert custom_runtime["fwd"] == 1


def test_auto_here():
    """'auto' is cuda only on a real GPU with a working cuda runtime; never the simulator."""
    rt = pn.get_runtime("auto")
    expected = "cuda" if ("cuda" in RUNTIMES and real_gpu_present()) else "cpu"
    assert rt.name == expected
    assert pn.get_runtime("AUTO") is rt


def test_auto_never_picks_simulator():
    proc = run_python(
        "import paged_numba as pn\n"
        "print(pn.get_runtime('auto').name, pn.get_runtime().name)\n",
        {"NUMBA_ENABLE_CUDASIM": "1"}, drop=("PAGED_NUMBA_RUNTIME",))
    assert proc.stdout.split() == ["cpu", "cpu"]


def test_unknown_name_lists_registered(custom_runtime):
    with pytest.raises(ValueError) as info:
        pn.get_runtime("tpu")
    msg = str(info.value)
    assert "'tpu'" in msg
    for name in ("'cpu'", "'cuda'", "'mycpu'"):
        assert name in msg


def test_bad_name_type():
    with pytest.raises(TypeError, match="runtime"):
        pn.get_runtime(3)


@pytest.mark.skipif(cudasim_enabled(), reason="the simulator makes the cuda runtime start")
@pytest.mark.skipif(real_gpu_present(), reason="a GPU is present")
def test_cuda_unavailable_without_gpu():
    for _ in range(2):                                        # the failure is remembered, same error
        with pytest.raises(pn.RuntimeUnavailableError) as info:
            pn.get_runtime("cuda")
        assert isinstance(info.value, RuntimeError)
        assert "cuda" in str(info.value) and len(str(info.value)) > 20
    assert issubclass(pn.RuntimeUnavailableError, RuntimeError)
    assert "cuda" not in pn.available_runtimes()


def test_available_runtimes_match_what_starts():
    names = pn.available_runtimes()
    assert isinstance(names, list) and "cpu" in names
    assert ("cuda" in names) == ("cuda" in RUNTIMES)
    assert "auto" not in names


def test_register_runtime(custom_runtime):
    assert custom_runtime["factory"] == 0                           # lazy: not created at register
    rt = pn.get_runtime("mycpu")
    assert isinstance(rt, pn.Runtime) and rt.name == "mycpu"
    assert pn.get_runtime("mycpu") is rt and pn.get_runtime(" MyCPU ") is rt
    assert custom_runtime["factory"] == 1                           # created once
    assert "mycpu" in pn.available_runtimes()
    assert pn.get_runtime(rt) is rt                                 # a Runtime is returned as is
    rt.synchronize()
    assert custom_runtime["sync"] == 1
    # An op through it, with NumPy and with Tensors on it.
    rng = np.random.default_rng(1)
    q, k, v, bt, sl = make_case(rng, 2, 4, 2, 3, 16, 4, [5, 9], ml_dtypes.bfloat16)
    expected, expected_lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime="cpu")
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime="mycpu")
    np.testing.assert_array_equal(out, expected)
    tq, tk, tv = (pn.tensor(x, runtime="mycpu") for x in (q, k, v))
    assert tq.runtime is rt
    tout, tlse = pn.paged_attention_fwd(tq, tk, tv, bt, seq_lens=sl)
    assert tout.runtime is rt and tlse.runtime is rt
    np.testing.assert_array_equal(tout.numpy(), expected)
    np.testing.assert_array_equal(tlse.numpy(), expected_lse)
    assert custom_runtime["fwd"] == 2
    # Re-registering replaces the instance.
    pn.register_runtime("mycpu", lambda: CpuRuntime())
    assert pn.get_runtime("mycpu") is not rt


def test_register_runtime_that_cannot_start():
    def factory():
        raise pn.RuntimeUnavailableError("broken on purpose: install nothing")

    pn.register_runtime("broken_rt", factory)
    try:
        with pytest.raises(pn.RuntimeUnavailableError, match="broken on purpose"):
            pn.get_runtime("broken_rt")
        assert "broken_rt" not in pn.available_runtimes()
        assert pn.get_runtime("auto").name in ("cpu", "cuda")
    finally:
        for d in (registry._FACTORIES, registry._INSTANCES, registry._FAILURES):
            d.pop("broken_rt", None)


@pytest.mark.parametrize("name,factory,exc", [("auto", CpuRuntime, ValueError), ("", CpuRuntime, ValueError),
                                              (None, CpuRuntime, ValueError), ("x_rt", 3, TypeError)])
def test_register_runtime_rejects(name, factory, exc):
    with pytest.raises(exc):
        pn.register_runtime(name, factory)
    assert "x_rt" not in registry._FACTORIES


@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_interface(name):
    rt = pn.get_runtime(name)
    assert isinstance(rt, pn.Runtime)
    assert rt.name == name
    assert rt.device is not None and rt.client is not None
    assert rt.synchronize() is None
    assert callable(rt.client.paged_attention_fwd)
    assert callable(rt.client.paged_attention_fwd_fp8) and callable(rt.client.paged_attention_bwd)
    assert pn.get_runtime(name) is rt                                 # created once


def test_cpu_kernel_cache_is_reused(tmp_path):
    """cache=True: a second process loads the compiled forward kernel from the cache instead of
    compiling (and saving) it again."""
    code = ("import numpy as np, paged_numba as pn\n"
            "x = np.ones((1, 1, 1, 8), np.float32)\n"
            "pn.paged_attention_fwd(x, x, x, np.zeros((1, 1), np.int32), runtime='cpu')\n"
            "import sys; assert 'numba.cuda' not in sys.modules, 'the cpu kernel imported numba.cuda'\n")
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    run_python(code, env)
    first = sorted(p.name for p in tmp_path.rglob("*.nbc"))
    assert first, "nothing was cached"
    run_python(code, env)
    second = sorted(p.name for p in tmp_path.rglob("*.nbc"))
    assert second == first, f"the kernel was compiled again: {first} -> {second}"


# ------------------------------------------------------------------------------- tensors

ARRAYS = {
    "f32": (np.float32, pn.DType.F32),
    "f16": (np.float16, pn.DType.F16),
    "bf16": (ml_dtypes.bfloat16, pn.DType.BF16),
    "e4m3": (ml_dtypes.float8_e4m3fn, pn.DType.FP8_E4M3),
    "e5m2": (ml_dtypes.float8_e5m2, pn.DType.FP8_E5M2),
    "i32": (np.int32, pn.DType.I32),
    "i64": (np.int64, pn.DType.I64),
}


@pytest.mark.parametrize("key", list(ARRAYS))
def test_tensor_from_numpy(runtime_name, key):
    npdt, dt = ARRAYS[key]
    data = (np.random.default_rng(0).standard_normal((2, 3, 5)) * 4).astype(npdt)
    t = pn.tensor(data, runtime=runtime_name)
    assert isinstance(t, pn.Tensor)
    assert t.dtype == dt and t.shape == (2, 3, 5)
    assert t.runtime is pn.get_runtime(runtime_name)
    back = t.numpy()
    assert type(back) is np.ndarray and back.dtype == np.dtype(npdt) and back.shape == data.shape
    assert back.tobytes() == data.tobytes()


@pytest.mark.parametrize("dtype,npdt", [("bf16", ml_dtypes.bfloat16), ("f16", np.float16),
                                        (pn.DType.BF16, ml_dtypes.bfloat16)])
def test_tensor_from_raw_uint16(runtime_name, dtype, npdt):
    vals = np.array([[1.5, -2.25, 0.0], [3.0e4, -0.0078125, 7.0]]).astype(npdt)
    raw = vals.view(np.uint16)
    t = pn.tensor(raw, runtime=runtime_name, dtype=dtype)
    assert t.dtype == pn.tensor(vals, runtime=runtime_name).dtype
    assert t.shape == (2, 3)
    back = t.numpy()
    assert back.dtype == np.dtype(npdt)
    np.testing.assert_array_equal(back.view(np.uint16), raw)


@pytest.mark.parametrize("dtype,npdt", [("fp8_e4m3", ml_dtypes.float8_e4m3fn),
                                        ("fp8_e5m2", ml_dtypes.float8_e5m2)])
def test_tensor_from_raw_uint8(runtime_name, dtype, npdt):
    raw = np.arange(0, 120, 7, dtype=np.uint8).reshape(2, -1)
    t = pn.tensor(raw, runtime=runtime_name, dtype=dtype)
    assert t.numpy().dtype == np.dtype(npdt)
    np.testing.assert_array_equal(t.numpy().view(np.uint8), raw)


def test_tensor_from_tensor(runtime_name):
    data = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    t = pn.tensor(data, runtime=runtime_name)
    t2 = pn.tensor(t)
    assert isinstance(t2, pn.Tensor) and t2.dtype == pn.DType.F32 and t2.runtime is t.runtime
    np.testing.assert_array_equal(t2.numpy(), data)
    t3 = pn.tensor(t, dtype="bf16")
    assert t3.dtype == pn.DType.BF16 and t3.shape == (3, 4)
    np.testing.assert_array_equal(t3.numpy(), data.astype(ml_dtypes.bfloat16))
    t4 = pn.tensor(t, runtime="cpu")
    assert t4.runtime is pn.get_runtime("cpu")
    np.testing.assert_array_equal(t4.numpy(), data)


def test_numpy_returns_a_copy(runtime_name):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = pn.tensor(data, runtime=runtime_name)
    a = t.numpy()
    a[...] = -1.0
    np.testing.assert_array_equal(t.numpy(), np.arange(12, dtype=np.float32).reshape(3, 4))
    assert t.numpy() is not t.numpy()


def test_to(runtime_name):
    data = np.linspace(-1, 1, 10).astype(np.float16).reshape(2, 5)
    t = pn.tensor(data, runtime=runtime_name)
    c = t.to("cpu")
    assert isinstance(c, pn.Tensor) and c.runtime is pn.get_runtime("cpu")
    assert c.dtype == pn.DType.F16 and c.shape == (2, 5)
    np.testing.assert_array_equal(c.numpy(), data)
    c2 = t.to(pn.get_runtime("cpu"))
    np.testing.assert_array_equal(c2.numpy(), data)
    back = c.to(runtime_name)
    assert back.runtime is pn.get_runtime(runtime_name)
    np.testing.assert_array_equal(back.numpy(), data)


def test_tensor_non_contiguous_input(runtime_name):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    view = base.T[::2]
    t = pn.tensor(view, runtime=runtime_name)
    assert t.shape == view.shape
    np.testing.assert_array_equal(t.numpy(), view)


def test_tensor_float64_needs_dtype(runtime_name):
    data = np.random.default_rng(2).standard_normal((2, 3))
    with pytest.raises(TypeError, match="float64"):
        pn.tensor(data, runtime=runtime_name)
    t = pn.tensor(data, runtime=runtime_name, dtype="f32")
    assert t.dtype == pn.DType.F32
    back = t.numpy()
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, data.astype(np.float32))
    t16 = pn.tensor(data, runtime=runtime_name, dtype=pn.DType.F16)
    np.testing.assert_array_equal(t16.numpy(), data.astype(np.float16))


@pytest.mark.parametrize("npdt", [np.uint8, np.uint16, np.complex64, np.bool_])
def test_tensor_ambiguous_or_unsupported_without_dtype(npdt):
    with pytest.raises(TypeError):
        pn.tensor(np.zeros((2, 2), npdt), runtime="cpu")


def test_tensor_bad_dtype_name():
    with pytest.raises(TypeError, match="dtype"):
        pn.tensor(np.zeros(3, np.float32), runtime="cpu", dtype="float128")


def test_tensor_default_runtime(monkeypatch, custom_runtime):
    monkeypatch.setenv("PAGED_NUMBA_RUNTIME", "mycpu")
    t = pn.tensor(np.zeros(3, np.float32))
    assert t.runtime.name == "mycpu"


def test_dtype_members():
    names = {d.name for d in pn.DType}
    assert {"F32", "F16", "BF16", "FP8_E4M3", "FP8_E5M2", "I32", "I64"} <= names
    assert pn.DType.F32.numpy == np.float32 and pn.DType.F16.numpy == np.float16
    assert pn.DType.BF16.numpy == np.dtype(ml_dtypes.bfloat16)
    assert pn.DType.FP8_E4M3.numpy == np.dtype(ml_dtypes.float8_e4m3fn)
    assert pn.DType.FP8_E5M2.numpy == np.dtype(ml_dtypes.float8_e5m2)
    assert pn.DType.I32.numpy == np.int32 and pn.DType.I64.numpy == np.int64
    assert len({d.value for d in pn.DType}) == len(list(pn.DType))


def test_public_api():
    for name in ("DType", "Runtime", "RuntimeUnavailableError", "Tensor", "available_runtimes",
                 "get_runtime", "paged_attention_bwd", "paged_attention_fwd",
                 "paged_attention_fwd_fp8", "register_runtime", "tensor"):
        assert hasattr(pn, name), name
