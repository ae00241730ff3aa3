"""Every error path of SPEC.md's Errors section, for paged_attention_fwd, paged_attention_fwd_fp8
and paged_attention_bwd.

Validation happens before any kernel runs, so the FP8 and backward ops are tested here even where
their kernels do not exist yet (a call that passed validation would reach the kernel instead of
raising the expected error). Every test checks the exception type, that the message names the
argument, and that the failing call left its inputs byte-for-byte unchanged.
"""
import re

import ml_dtypes
import numpy as np
import pytest

import paged_numba as pn
from helpers import assert_unchanged, snapshot
from paged_numba.ops.config import bwd_config, fwd_config, fwd_fp8_config

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E5M2 = np.dtype(ml_dtypes.float8_e5m2)
B, H, HKV, SQ, D, BS, N, M = 2, 4, 2, 3, 16, 4, 40, 5

OPS = {"fwd": pn.paged_attention_fwd, "fp8": pn.paged_attention_fwd_fp8, "bwd": pn.paged_attention_bwd}
CONFIGS = {"fwd": fwd_config, "fp8": fwd_fp8_config, "bwd": bwd_config}
ALL_OPS = pytest.mark.parametrize("op", list(OPS))


def _rand(shape, dtype, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape)
    return x.astype(dtype)


def base(op):
    """A valid call of ``op`` as keyword arguments: q [2, 4, 3, 16], pool [40, 4, 2, 16],
    block_table [2, 5] with -1 in unread entries, seq_lens [6, 14] (sequence 1 reads entries
    0..3)."""
    kv_dtype = E4M3 if op == "fp8" else np.float32
    table = np.full((B, M), -1, np.int32)
    table[0, :2] = [5, 17]
    table[1, :4] = [3, 8, 22, 39]
    args = dict(q=_rand((B, H, SQ, D), np.float32, 1), k_blocks=_rand((N, BS, HKV, D), kv_dtype, 2),
                v_blocks=_rand((N, BS, HKV, D), kv_dtype, 3), block_table=table,
                seq_lens=np.array([6, 14], np.int32))
    if op == "bwd":
        args.update(dout=_rand((B, H, SQ, D), np.float32, 4), output=_rand((B, H, SQ, D), np.float32, 5),
                    lse=_rand((B, H, SQ), np.float32, 6))
    return args


def _data(args):
    return [a for a in args.values() if isinstance(a, (np.ndarray, pn.Tensor))]


def _snap(args):
    return snapshot(*(a.numpy() if isinstance(a, pn.Tensor) else a for a in _data(args)))


def expect(op, exc, pattern, **changes):
    """Call ``op`` on base(op) updated with ``changes``; it must raise ``exc`` matching ``pattern``
    and leave every array argument unchanged."""
    args = base(op)
    args.update(changes)
    before = _snap(args)
    with pytest.raises(exc, match=pattern) as info:
        OPS[op](**args)
    assert_unchanged(before, *(a.numpy() if isinstance(a, pn.Tensor) else a for a in _data(args)))
    return info


@ALL_OPS
def test_base_cases_are_valid(op):
    """The unmodified base case passes validation (so every error below comes from the change)."""
    args = base(op)
    cfg = CONFIGS[op](**args)
    assert (cfg.B, cfg.H, cfg.Hkv, cfg.Sq, cfg.D, cfg.N, cfg.bs, cfg.M) == (B, H, HKV, SQ, D, N, BS, M)
    if op == "fwd":
        out, lse = OPS[op](**args, runtime="cpu")
        assert out.shape == (B, H, SQ, D) and not np.isnan(lse).any()


# ----------------------------------------------------------------------------------- shapes

@ALL_OPS
@pytest.mark.parametrize("shape", [(B, H, D), (B, H, SQ, D, 1), (D,)])
def test_q_wrong_ndim(op, shape):
    info = expect(op, ValueError, r"\bq\b", q=_rand(shape, np.float32))
    assert f"{len(shape)}-D" in str(info.value)


@ALL_OPS
@pytest.mark.parametrize("shape", [(N, BS * HKV * D), (N, BS, HKV, D, 1), (N * BS * HKV * D,)])
def test_k_wrong_ndim(op, shape):
    kd = base(op)["k_blocks"].dtype
    expect(op, ValueError, "k_blocks", k_blocks=_rand(shape, kd), v_blocks=_rand(shape, kd))


@ALL_OPS
@pytest.mark.parametrize("shape", [(N, BS, D), (N, BS, HKV, D, 1), (N, BS, HKV + 2, D), (N + 1, BS, HKV, D),
                                   (N, BS + 1, HKV, D), (N, BS, HKV, D + 1)])
def test_v_shape_differs_from_k(op, shape):
    kd = base(op)["k_blocks"].dtype
    expect(op, ValueError, "v_blocks", v_blocks=_rand(shape, kd))


@ALL_OPS
@pytest.mark.parametrize("kv3d", [False, True])
def test_head_dim_mismatch(op, kv3d):
    kd = base(op)["k_blocks"].dtype
    shape = (N, BS, D // 2) if kv3d else (N, BS, HKV, D // 2)
    info = expect(op, ValueError, "k_blocks", k_blocks=_rand(shape, kd), v_blocks=_rand(shape, kd))
    assert "head_dim" in str(info.value) and str(D // 2) in str(info.value)


@ALL_OPS
@pytest.mark.parametrize("h", [3, 5, 1])
def test_heads_not_multiple_of_kv_heads(op, h):
    changes = dict(q=_rand((B, h, SQ, D), np.float32))
    if op == "bwd":
        changes.update(dout=changes["q"].copy(), output=changes["q"].copy(),
                       lse=np.zeros((B, h, SQ), np.float32))
    info = expect(op, ValueError, "num_kv_heads", **changes)
    assert str(h) in str(info.value) and str(HKV) in str(info.value)


@ALL_OPS
@pytest.mark.parametrize("table", [np.zeros(B * M, np.int32), np.zeros((B, M, 1), np.int32),
                                   np.zeros((B + 1, M), np.int32), np.zeros((1, M), np.int32),
                                   np.int32(3)],
                         ids=["1d", "3d", "B+1", "B-1", "scalar"])
def test_block_table_bad_shape(op, table):
    expect(op, ValueError, "block_table", block_table=table)


@ALL_OPS
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_, E4M3])
def test_block_table_float_dtype(op, dtype):
    table = np.zeros((B, M)).astype(dtype)
    expect(op, TypeError, "block_table", block_table=table)


@ALL_OPS
@pytest.mark.parametrize("lens", [np.array([6, 14, 1]), np.array([6]), np.array([[6, 14]]), np.int32(6)],
                         ids=["B+1", "B-1", "2d", "scalar"])
def test_seq_lens_bad_shape(op, lens):
    expect(op, ValueError, "seq_lens", seq_lens=lens)


@ALL_OPS
@pytest.mark.parametrize("lens,bad", [([6, -1], "-1"), ([-5, 3], "-5"), ([6, M * BS + 1], str(M * BS + 1)),
                                      ([10**6, 3], str(10**6))])
def test_seq_lens_out_of_range(op, lens, bad):
    info = expect(op, ValueError, "seq_lens", seq_lens=np.array(lens, np.int64))
    assert bad in str(info.value) and str(M * BS) in str(info.value)


@ALL_OPS
def test_seq_lens_float_dtype(op):
    expect(op, TypeError, "seq_lens", seq_lens=np.array([6.0, 14.0]))


@ALL_OPS
@pytest.mark.parametrize("value", [-1, M * BS + 1, 10**9])
def test_seq_len_k_out_of_range(op, value):
    expect(op, ValueError, "seq_len_k", seq_lens=None, seq_len_k=value)


@ALL_OPS
def test_seq_lens_beyond_seq_len_k(op):
    """seq_len_k given with seq_lens: a sequence longer than seq_len_k disagrees with it."""
    expect(op, ValueError, "seq_len_k", seq_len_k=10)


# ----------------------------------------------------------------------------- block table

@ALL_OPS
@pytest.mark.parametrize("value", [57, N, -1, -(2**31)])
def test_table_entry_outside_pool(op, value):
    table = base(op)["block_table"].copy()
    table[1, 3] = value
    info = expect(op, ValueError, re.escape(f"block_table[1, 3] = {value} is outside the pool [0, {N})"),
                  block_table=table)
    assert "1" in str(info.value)


@ALL_OPS
def test_table_entry_read_only_because_of_length(op):
    """Entry [1, 4] is read once sequence 1 has more than 4 * bs tokens."""
    table = base(op)["block_table"].copy()
    table[1, 4] = 57
    CONFIGS[op](**{**base(op), "block_table": table})             # 14 tokens: entry 4 unread
    CONFIGS[op](**{**base(op), "block_table": table, "seq_lens": np.array([6, 16])})
    expect(op, ValueError, re.escape("block_table[1, 4] = 57"), block_table=table,
           seq_lens=np.array([6, 17]))
    # Default length M * bs: every entry is read, the first bad one (in row-major order) is named.
    expect(op, ValueError, re.escape("block_table[0, 2] = -1"), block_table=table, seq_lens=None)


@ALL_OPS
def test_table_unread_entries_accepted(op):
    table = base(op)["block_table"].copy()
    table[0, 2:] = [-1, 57, 10**6]
    table[1, 4] = -5
    args = {**base(op), "block_table": table}
    before = _snap(args)
    cfg = CONFIGS[op](**args)
    assert_unchanged(before, *_data(args))
    assert cfg.block_table.dtype == np.int32 and (cfg.block_table >= 0).all()
    assert (cfg.block_table < N).all()
    if op == "fwd":
        OPS[op](**args, runtime="cpu")


def test_table_uint_dtype_out_of_range():
    table = base("fwd")["block_table"].astype(np.uint16)
    table[1, 2] = 40000
    expect("fwd", ValueError, re.escape("block_table[1, 2] = 40000 is outside the pool [0, 40)"),
           block_table=table)


# ------------------------------------------------------------------------ redundant params

@ALL_OPS
@pytest.mark.parametrize("name,good", [("num_heads", H), ("num_kv_heads", HKV), ("seq_len_q", SQ),
                                       ("head_dim", D), ("block_size", BS)])
@pytest.mark.parametrize("delta", [1, -1])
def test_redundant_param_disagrees(op, name, good, delta):
    CONFIGS[op](**base(op), **{name: good})                       # the right value passes
    info = expect(op, ValueError, name, **{name: good + delta})
    assert str(good + delta) in str(info.value) and str(good) in str(info.value)


@ALL_OPS
@pytest.mark.parametrize("name,value", [("num_heads", float(H)), ("num_kv_heads", float(HKV)),
                                        ("seq_len_q", float(SQ)), ("seq_len_k", 14.0),
                                        ("head_dim", float(D)), ("block_size", float(BS)),
                                        ("num_heads", np.float32(H)), ("head_dim", "16"),
                                        ("block_size", True)])
def test_int_param_of_wrong_type(op, name, value):
    expect(op, TypeError, name, **{name: value})


@ALL_OPS
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_scale_not_finite(op, scale):
    expect(op, ValueError, r"\bscale\b", scale=scale)


# ------------------------------------------------------------------- non-finite q and lse

_Q_CASES = [(op, dt) for op in OPS for dt in ("f32", "f16", "bf16")] + [("fp8", "e4m3"), ("fp8", "e5m2")]
_NP = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16, "e4m3": E4M3, "e5m2": E5M2}


@pytest.mark.parametrize("op, dtype", _Q_CASES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_q_not_finite_names_q(op, dtype, bad):
    """inf / NaN in q is a ValueError naming q and the element, raised by the validation (before any
    kernel), not a "scale:" error about the scores after it."""
    if dtype == "e4m3" and np.isinf(bad):
        bad = float("nan")                 # E4M3 has no infinity: its one non-finite value is NaN
    a = base(op)
    names = ("q", "dout", "output", "k_blocks", "v_blocks") if op == "bwd" else ("q", "k_blocks", "v_blocks")
    if op == "fp8" and dtype in ("f32", "f16", "bf16"):
        names = ("q",)                     # float q over the E4M3 pool
    changes = {n: a[n].astype(np.float32).astype(_NP[dtype]) for n in names}
    q = changes["q"].copy()
    q[1, 2, 1, 5] = bad
    changes["q"] = q
    with pytest.raises(ValueError, match=re.escape("q[1, 2, 1, 5]")) as info:
        CONFIGS[op](**{**a, **changes})
    assert str(info.value).startswith("q:"), info.value
    expect(op, ValueError, r"^q: .*inf or NaN", **changes)


def test_q_not_finite_tensor_and_raw_fp8_codes():
    a = base("fwd")
    q = a["q"].copy()
    q[0, 3, 2, 0] = np.nan
    expect("fwd", ValueError, re.escape("q[0, 3, 2, 0]"), q=pn.tensor(q, runtime="cpu"),
           k_blocks=pn.tensor(a["k_blocks"], runtime="cpu"), v_blocks=pn.tensor(a["v_blocks"], runtime="cpu"))
    f = base("fp8")
    codes = f["q"].astype(E4M3).view(np.uint8).copy()
    codes[1, 0, 0, 7] = 0xFF                       # E4M3's negative NaN
    expect("fp8", ValueError, re.escape("q[1, 0, 0, 7]"), q=codes,
           k_blocks=f["k_blocks"].view(np.uint8), v_blocks=f["v_blocks"].view(np.uint8), fp8_format="e4m3")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_bwd_lse_nan_or_posinf_names_lse(bad):
    lse = base("bwd")["lse"].copy()
    lse[1, 3, 2] = bad
    info = expect("bwd", ValueError, r"^lse: ", lse=lse)
    assert "lse[1, 2, 2]" not in str(info.value) and "lse[1, 3, 2]" in str(info.value)


def test_bwd_lse_rows_of_minus_inf_stay_valid():
    """-inf is the forward's lse of a row that sees no key: accepted, and the row contributes nothing."""
    a = base("bwd")
    out, lse = pn.paged_attention_fwd(a["q"], a["k_blocks"], a["v_blocks"], a["block_table"],
                                      seq_lens=a["seq_lens"], runtime="cpu")
    a.update(output=out, lse=lse)
    ref = pn.paged_attention_bwd(**a, runtime="cpu")
    lse2 = lse.copy()
    lse2[0, 1, :] = -np.inf
    dq, dk, dv = pn.paged_attention_bwd(**{**a, "lse": lse2}, runtime="cpu")
    assert all(np.isfinite(x).all() for x in (dq, dk, dv))
    assert not dq[0, 1].any() and dq[0, 1].shape == (SQ, D)
    np.testing.assert_array_equal(dq[1], ref[0][1])


@ALL_OPS
@pytest.mark.parametrize("scale", ["0.5", [0.5], 1 + 0j])
def test_scale_wrong_type(op, scale):
    expect(op, TypeError, r"\bscale\b", scale=scale)


# ------------------------------------------------------------------------------ dtypes: fwd

@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.complex64])
def test_fwd_q_unsupported_dtype(dtype):
    q = base("fwd")["q"].astype(dtype)
    info = expect("fwd", TypeError, r"\bq\b", q=q)
    given = "i32" if dtype is np.int32 else np.dtype(dtype).name
    assert given in str(info.value)


@pytest.mark.parametrize("qd,kd", [(np.float32, np.float16), (np.float32, ml_dtypes.bfloat16),
                                   (ml_dtypes.bfloat16, np.float16), (np.float16, np.float32)])
def test_fwd_mixed_dtypes_name_k_blocks(qd, kd):
    a = base("fwd")
    info = expect("fwd", TypeError, "k_blocks", q=a["q"].astype(qd), k_blocks=a["k_blocks"].astype(kd),
                  v_blocks=a["v_blocks"].astype(kd))
    assert "mixed" in str(info.value) or "expected" in str(info.value)


def test_fwd_v_dtype_differs():
    a = base("fwd")
    expect("fwd", TypeError, "v_blocks", v_blocks=a["v_blocks"].astype(np.float16))


@pytest.mark.parametrize("kd", [E4M3, E5M2])
def test_fwd_fp8_kv_points_to_fp8_op(kd):
    a = base("fwd")
    info = expect("fwd", TypeError, "paged_attention_fwd_fp8", k_blocks=a["k_blocks"].astype(kd),
                  v_blocks=a["v_blocks"].astype(kd))
    assert "k_blocks" in str(info.value)


def test_fwd_fp8_q_rejected():
    expect("fwd", TypeError, r"\bq\b", q=base("fwd")["q"].astype(E4M3))


def test_fwd_float64_everything():
    a = base("fwd")
    info = expect("fwd", TypeError, r"\bq\b", **{n: a[n].astype(np.float64) for n in ("q", "k_blocks", "v_blocks")})
    assert "float64" in str(info.value)


# ------------------------------------------------------------------------------ dtypes: fp8

@pytest.mark.parametrize("kd", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_fp8_op_rejects_float_kv(kd):
    a = base("fp8")
    info = expect("fp8", TypeError, "k_blocks", k_blocks=a["k_blocks"].astype(np.float32).astype(kd),
                  v_blocks=a["v_blocks"].astype(np.float32).astype(kd))
    assert "paged_attention_fwd" in str(info.value)


def test_fp8_raw_uint8_needs_format():
    a = base("fp8")
    k8, v8 = a["k_blocks"].view(np.uint8), a["v_blocks"].view(np.uint8)
    expect("fp8", TypeError, "fp8_format", k_blocks=k8, v_blocks=v8)
    CONFIGS["fp8"](**{**a, "k_blocks": k8, "v_blocks": v8}, fp8_format="e4m3")   # accepted with it


@pytest.mark.parametrize("fmt", ["e3m4", "fp16", "", "E4M3X", 8])
def test_fp8_bad_format(fmt):
    expect("fp8", ValueError, "fp8_format", fp8_format=fmt)


def test_fp8_format_disagrees_with_kv_dtype():
    expect("fp8", TypeError, "fp8_format", fp8_format="e5m2")


def test_fp8_k_and_v_formats_differ():
    a = base("fp8")
    expect("fp8", TypeError, "v_blocks", v_blocks=a["v_blocks"].astype(np.float32).astype(E5M2))


def test_fp8_q_of_other_format():
    expect("fp8", TypeError, r"\bq\b", q=base("fp8")["q"].astype(E5M2))


@pytest.mark.parametrize("dtype", [np.float64, np.int32])
def test_fp8_q_unsupported_dtype(dtype):
    expect("fp8", TypeError, r"\bq\b", q=base("fp8")["q"].astype(dtype))


@pytest.mark.parametrize("name", ["q_scale", "k_scale", "v_scale", "o_scale"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_fp8_scales_positive_finite(name, value):
    info = expect("fp8", ValueError, name, **{name: value})
    assert str(value) in str(info.value)


@pytest.mark.parametrize("name", ["q_scale", "k_scale", "v_scale", "o_scale"])
def test_fp8_scale_wrong_type(name):
    expect("fp8", TypeError, name, **{name: "1.0"})


def test_fp8_positional_scales_checked():
    a = base("fp8")
    with pytest.raises(ValueError, match="v_scale"):
        pn.paged_attention_fwd_fp8(a["q"], a["k_blocks"], a["v_blocks"], a["block_table"], None, None,
                                   None, None, None, None, False, 1.0, 1.0, 0.0, 1.0,
                                   seq_lens=a["seq_lens"])


# ------------------------------------------------------------------------------ backward

@pytest.mark.parametrize("name", ["dout", "output"])
@pytest.mark.parametrize("shape", [(B, H, SQ, D + 1), (B, H, SQ), (B + 1, H, SQ, D), (B, H, SQ + 1, D)])
def test_bwd_dout_output_shape(name, shape):
    info = expect("bwd", ValueError, name, **{name: _rand(shape, np.float32)})
    assert str((B, H, SQ, D)) in str(info.value)


@pytest.mark.parametrize("name", ["dout", "output"])
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64, E4M3])
def test_bwd_dout_output_dtype(name, dtype):
    expect("bwd", TypeError, name, **{name: base("bwd")[name].astype(dtype)})


def test_bwd_dout_dtype_with_f16_q():
    a = base("bwd")
    h = {n: a[n].astype(np.float16) for n in ("q", "k_blocks", "v_blocks", "dout", "output")}
    CONFIGS["bwd"](**{**a, **h})
    expect("bwd", TypeError, "dout", **{**h, "dout": a["dout"]})


@pytest.mark.parametrize("shape", [(B, H, SQ, 1), (B, H), (B, H, SQ + 1), (H, B, SQ)])
def test_bwd_lse_shape(shape):
    expect("bwd", ValueError, r"\blse\b", lse=_rand(shape, np.float32))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, ml_dtypes.bfloat16, np.int32])
def test_bwd_lse_dtype(dtype):
    info = expect("bwd", TypeError, r"\blse\b", lse=base("bwd")["lse"].astype(dtype))
    assert "f32" in str(info.value)


@pytest.mark.parametrize("name", ["dout", "output", "lse"])
def test_bwd_missing_array(name):
    expect("bwd", TypeError, name, **{name: None})


# ------------------------------------------------------------------- Tensors / runtimes

@ALL_OPS
@pytest.mark.parametrize("as_tensor", ["q", "k_blocks", "v_blocks", "all_but_v"])
def test_mixing_tensors_and_numpy(op, as_tensor):
    a = base(op)
    data = ["q", "k_blocks", "v_blocks"] + (["dout", "output", "lse"] if op == "bwd" else [])
    names = [n for n in data if n != "v_blocks"] if as_tensor == "all_but_v" else [as_tensor]
    changes = {n: pn.tensor(a[n], runtime="cpu") for n in names}
    info = expect(op, ValueError, "Tensor", **changes)
    plain = [n for n in data if n not in names]
    assert any(re.search(rf"\b{p}\b", str(info.value)) for p in plain)


@pytest.fixture
def second_cpu_runtime():
    """A second registered runtime ('cpu_twin') wrapping the cpu client, removed afterwards."""
    from paged_numba import runtime as registry
    from paged_numba.runtime.cpu import CpuRuntime

    pn.register_runtime("cpu_twin", lambda: type("CpuTwin", (CpuRuntime,), {"name": "cpu_twin"})())
    try:
        yield pn.get_runtime("cpu_twin")
    finally:
        registry._FACTORIES.pop("cpu_twin", None)
        registry._INSTANCES.pop("cpu_twin", None)
        registry._FAILURES.pop("cpu_twin", None)


@ALL_OPS
def test_tensors_on_different_runtimes(op, second_cpu_runtime):
    a = base(op)
    data = ["q", "k_blocks", "v_blocks"] + (["dout", "output", "lse"] if op == "bwd" else [])
    changes = {n: pn.tensor(a[n], runtime="cpu") for n in data}
    changes["k_blocks"] = pn.tensor(a["k_blocks"], runtime=second_cpu_runtime)
    info = expect(op, ValueError, "runtime", **changes)
    assert "cpu_twin" in str(info.value) and "k_blocks" in str(info.value)


@ALL_OPS
def test_runtime_argument_disagrees_with_tensors(op, second_cpu_runtime):
    a = base(op)
    data = ["q", "k_blocks", "v_blocks"] + (["dout", "output", "lse"] if op == "bwd" else [])
    changes = {n: pn.tensor(a[n], runtime="cpu") for n in data}
    expect(op, ValueError, r"\bruntime\b", runtime="cpu_twin", **changes)


@ALL_OPS
@pytest.mark.parametrize("name", ["no_such_runtime", "gpu", "CPUX"])
def test_unknown_runtime_name(op, name):
    info = expect(op, ValueError, re.escape(repr(name)), runtime=name)
    msg = str(info.value)
    assert "runtime" in msg
    for registered in ("'cpu'", "'cuda'"):
        assert registered in msg
