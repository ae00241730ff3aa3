"""Error paths of the ragged-batch and score-modifier keywords (cu_seqlens_q, window_left, softcap,
alibi_slopes) on all three ops, and of merge_state / merge_states: each a ValueError / TypeError
naming the argument, raised by validation before any kernel, inputs left unchanged."""
import numpy as np
import pytest

import paged_numba as pn
from helpers import assert_unchanged, snapshot
from test_errors import ALL_OPS, B, CONFIGS, D, H, SQ, _rand, base, expect

T = 5
CU = np.array([0, 2, 5], np.int32)        # sequence 0: 2 queries (seq_lens 6), sequence 1: 3 (14)


def ragged(op):
    """base(op) in the token-major layout: q [T, H, D], cu_seqlens_q [0, 2, 5]."""
    args = base(op)
    args.update(q=_rand((T, H, D), np.float32, 1), cu_seqlens_q=CU)
    if op == "bwd":
        args.update(dout=_rand((T, H, D), np.float32, 4), output=_rand((T, H, D), np.float32, 5),
                    lse=_rand((T, H), np.float32, 6))
    return args


def expect_ragged(op, exc, pattern, **changes):
    args = ragged(op)
    args.update(changes)
    return expect(op, exc, pattern, **args)


@ALL_OPS
def test_ragged_base_is_valid(op):
    cfg = CONFIGS[op](**ragged(op))
    assert cfg.ragged and cfg.q_shape == (T, H, D) and cfg.lse_shape == (T, H)
    np.testing.assert_array_equal(cfg.q_lens, [2, 3])
    np.testing.assert_array_equal(cfg.q_start, [0, 2])
    np.testing.assert_array_equal(cfg.decode_seqs, [0, 1])
    assert cfg.tiled_seqs.size == 0 and cfg.Sq == 3


def test_work_list_routes_each_sequence():
    args = ragged("fwd")
    args.update(q=_rand((11, H, D), np.float32, 1), cu_seqlens_q=[0, 0, 11], seq_lens=np.array([6, 14], np.int32))
    cfg = CONFIGS["fwd"](**args)
    np.testing.assert_array_equal(cfg.decode_seqs, [])
    np.testing.assert_array_equal(cfg.tiled_seqs, [1])
    args.update(cu_seqlens_q=[0, 4, 11])
    cfg = CONFIGS["fwd"](**args)
    np.testing.assert_array_equal(cfg.decode_seqs, [0])
    np.testing.assert_array_equal(cfg.tiled_seqs, [1])


@ALL_OPS
@pytest.mark.parametrize("cu,what", [([0, 3, 2], "non-decreasing"), ([0, 5], r"\[B \+ 1\]"),
                                     ([0, 2, 4], "T = 5"), ([1, 2, 5], r"\[0\] = 0"),
                                     ([[0, 2, 5]], "1-D")],
                         ids=["not-monotonic", "wrong-length", "T-mismatch", "not-from-0", "2-D"])
def test_cu_seqlens_bad(op, cu, what):
    q = _rand((2, H, D), np.float32, 1) if what == "non-decreasing" else None
    changes = dict(cu_seqlens_q=np.array(cu, np.int64))
    if q is not None:
        changes["q"] = q
        if op == "bwd":
            changes.update(dout=q.copy(), output=q.copy(), lse=np.zeros((2, H), np.float32))
    info = expect_ragged(op, ValueError, "cu_seqlens_q", **changes)
    assert __import__("re").search(what, str(info.value)), str(info.value)


@ALL_OPS
def test_cu_seqlens_q_len_above_seq_len(op):
    info = expect_ragged(op, ValueError, "cu_seqlens_q", seq_lens=np.array([1, 14], np.int32))
    assert "2 queries" in str(info.value) and "seq_lens[0] = 1" in str(info.value)


@ALL_OPS
def test_cu_seqlens_float_dtype(op):
    expect_ragged(op, TypeError, "cu_seqlens_q", cu_seqlens_q=CU.astype(np.float32))


@ALL_OPS
def test_cu_seqlens_needs_seq_lens(op):
    expect_ragged(op, ValueError, "seq_lens", seq_lens=None)


@ALL_OPS
def test_cu_seqlens_needs_token_major_q(op):
    info = expect_ragged(op, ValueError, r"\bq\b", q=_rand((B, H, SQ, D), np.float32, 1))
    assert "[T, H, D]" in str(info.value)


def test_bwd_ragged_shapes():
    expect_ragged("bwd", ValueError, "dout", dout=_rand((B, H, SQ, D), np.float32))
    expect_ragged("bwd", ValueError, "output", output=_rand((T + 1, H, D), np.float32))
    info = expect_ragged("bwd", ValueError, "lse", lse=_rand((B, H, SQ), np.float32))
    assert "[T, H]" in str(info.value)


@ALL_OPS
@pytest.mark.parametrize("value", [-2, -100])
def test_window_negative(op, value):
    info = expect(op, ValueError, "window_left", window_left=value)
    assert str(value) in str(info.value)


@ALL_OPS
@pytest.mark.parametrize("value", [1.5, True, "3", None])
def test_window_wrong_type(op, value):
    expect(op, TypeError, "window_left", window_left=value)


@ALL_OPS
@pytest.mark.parametrize("value", [-1.0, -1e-9, np.inf, np.nan])
def test_softcap_bad_value(op, value):
    expect(op, ValueError, "softcap", softcap=value)


@ALL_OPS
@pytest.mark.parametrize("value", ["1", True, None])
def test_softcap_wrong_type(op, value):
    expect(op, TypeError, "softcap", softcap=value)


@ALL_OPS
@pytest.mark.parametrize("shape", [(H + 1,), (1, H), ()])
def test_alibi_wrong_shape(op, shape):
    info = expect(op, ValueError, "alibi_slopes", alibi_slopes=np.ones(shape, np.float32))
    assert f"H={H}" in str(info.value)


@ALL_OPS
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_alibi_wrong_dtype(op, dtype):
    info = expect(op, TypeError, "alibi_slopes", alibi_slopes=np.ones(H, dtype))
    assert "float32" in str(info.value)


@ALL_OPS
def test_alibi_not_finite(op):
    expect(op, ValueError, "alibi_slopes", alibi_slopes=np.array([0.1, np.nan, 0.2, 0.3], np.float32))


@ALL_OPS
def test_alibi_wrong_container(op):
    expect(op, TypeError, "alibi_slopes", alibi_slopes="slopes")
    expect(op, TypeError, "alibi_slopes", alibi_slopes=[0.1, "a", 0.2, 0.3])


def test_modifier_values_reach_the_config():
    cfg = CONFIGS["fwd"](**base("fwd"), window_left=0, softcap=30, alibi_slopes=[0.5, 0.25, 0.125, 0.0625])
    assert cfg.window_left == 0 and cfg.softcap == 30.0 and not cfg.plain
    assert cfg.alibi_slopes.dtype == np.float32 and cfg.alibi_slopes.tolist() == [0.5, 0.25, 0.125, 0.0625]
    assert CONFIGS["fwd"](**base("fwd")).plain


# ----------------------------------------------------------------------------- merge_state(s)

def _merge_args():
    return dict(v_a=_rand((3, 2, 8), np.float32, 1), s_a=_rand((3, 2), np.float32, 2),
                v_b=_rand((3, 2, 8), np.float32, 3), s_b=_rand((3, 2), np.float32, 4))


def _expect_merge(fn, exc, pattern, args):
    before = snapshot(*args.values())
    with pytest.raises(exc, match=pattern):
        fn(**args, runtime="cpu")
    assert_unchanged(before, *args.values())


@pytest.mark.parametrize("name,value,exc", [
    ("v_b", _rand((3, 2, 7), np.float32), ValueError),
    ("v_b", _rand((3, 2, 8), np.float16), TypeError),
    ("v_a", _rand((3, 2, 8), np.float64), TypeError),
    ("s_a", _rand((3, 2), np.float64), TypeError),
    ("s_b", _rand((3, 3), np.float32), ValueError),
    ("s_a", _rand((3, 2, 8), np.float32), ValueError),
    ("v_a", np.float32(1.0), ValueError),
])
def test_merge_state_errors(name, value, exc):
    args = _merge_args()
    args[name] = value
    _expect_merge(pn.merge_state, exc, name, args)


@pytest.mark.parametrize("name,value,exc", [
    ("v", _rand((3, 2, 8), np.float32), ValueError),
    ("v", _rand((3, 2, 2, 8), np.float64), TypeError),
    ("s", _rand((3, 2, 2), np.float16), TypeError),
    ("s", _rand((3, 2, 3), np.float32), ValueError),
])
def test_merge_states_errors(name, value, exc):
    args = dict(v=_rand((3, 2, 2, 8), np.float32, 1), s=_rand((3, 2, 2), np.float32, 2))
    args[name] = value
    _expect_merge(pn.merge_states, exc, rf"\b{name}\b", args)
