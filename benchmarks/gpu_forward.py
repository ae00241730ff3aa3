"""GPU forward benchmark: paged_numba on the ``cuda`` runtime vs PyTorch SDPA, side by side in one
run, on an NVIDIA GPU (the H200 of shared/gpu/README.md). Block size 16, shuffled block tables.

    python benchmarks/gpu_forward.py [--no-save] [--quick] [--repeat N] [--only TEXT]
                                     [--prefill-budget S] [--table-out PATH] [--no-flex]

Exits at once, with a message, when the cuda runtime cannot start (no GPU or driver) or when the
CUDA simulator is switched on (the simulator only runs ``--sim-smoke``, a dry run at tiny shapes).

Rows per workload (symbols: B batch, H query heads, Hkv KV heads, Sq queries, D head_dim, L keys):

- ``paged_numba call``: one public call with Tensors already on the device, as a user makes it
  (validation of the NumPy block table, its upload, the kernels, the finiteness-flag read-back);
  wall clock with synchronize, median of many calls after a warm-up that compiles.
- ``paged_numba kernels``: the GPU kernels of those calls alone (mean per call, from the PyTorch
  profiler's CUPTI trace), when the profiler works.
- ``torch SDPA contiguous``: ``scaled_dot_product_attention`` on the same data already gathered
  into contiguous [B, Hkv, L, D] (``enable_gqa`` for GQA); CUDA events, median.
- ``torch pool[table] + SDPA``: the gather of the paged pool timed inside, then SDPA.
- ``torch flex_attention paged``: torch's paged attention on ``flex_attention`` (its
  ``PagedAttention`` block-mask conversion) over the same pool and block table, compiled; kernel
  time from the CUPTI trace (``flex_paged.py``; where 16-token pages do not compile it runs on the
  same K/V re-paged into 128-token pages and says so; ``--no-flex`` leaves it out).

Columns: time; K/V TB/s = bytes of K and V of all tokens read once / time; % of a device-to-device
copy measured in the same run (bytes read + written); TFLOP/s (prefill: 4 B H Sq L D, half when
causal); the error of the output against a float64 reference on a slice of rows and against
float32 SDPA on the whole output. Every paged_numba result is checked before it is timed.

Targets: decode BF16 >= 3.4 TB/s; FP8 K/V <= 0.6x the BF16 time; long context >= 3.0 TB/s;
causal prefill >= 60 TFLOP/s in F32 (3xTF32 on tensor cores), >= 250 in BF16 and with FP8 K/V.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from common import append_results, contiguous_kv, markdown_table  # noqa: E402
from timing import kernel_time as _kernel_time, time_events, time_wall  # noqa: E402

BS = 16
FP8_K_SCALE, FP8_V_SCALE = 0.02, 0.03   # codes = x / scale: N(0, 1) data uses most of E4M3's range
# name -> shape and kind; Sq = 1 is a decode step, Sq = L a causal prefill.
WORKLOADS = [
    ("decode B32 H32/8 D128 L4096 bf16", dict(B=32, H=32, Hkv=8, Sq=1, D=128, L=4096, kind="bf16")),
    ("decode B32 H32/8 D128 L4096 fp8-e4m3 K/V", dict(B=32, H=32, Hkv=8, Sq=1, D=128, L=4096, kind="fp8")),
    ("long decode B1 H32/8 D128 L65536 bf16", dict(B=1, H=32, Hkv=8, Sq=1, D=128, L=65536, kind="bf16")),
    ("prefill causal B4 H32 D128 L=Sq=4096 fp32", dict(B=4, H=32, Hkv=32, Sq=4096, D=128, L=4096, kind="f32")),
    ("prefill causal B4 H32 D128 L=Sq=4096 bf16", dict(B=4, H=32, Hkv=32, Sq=4096, D=128, L=4096, kind="bf16")),
    ("prefill causal B4 H32/8 D128 L=Sq=4096 fp32", dict(B=4, H=32, Hkv=8, Sq=4096, D=128, L=4096, kind="f32")),
    ("prefill causal B4 H32/8 D128 L=Sq=4096 bf16", dict(B=4, H=32, Hkv=8, Sq=4096, D=128, L=4096, kind="bf16")),
    ("prefill causal B4 H32/8 D128 L=Sq=4096 bf16 q, fp8-e4m3 K/V",
     dict(B=4, H=32, Hkv=8, Sq=4096, D=128, L=4096, kind="fp8")),
]
# (metric, threshold[, workload the ratio is taken against])
TARGETS = {
    WORKLOADS[0][0]: ("TB/s", 3.4),
    WORKLOADS[1][0]: ("ratio", 0.6, WORKLOADS[0][0]),
    WORKLOADS[2][0]: ("TB/s", 3.0),
    WORKLOADS[3][0]: ("TFLOP/s", 60.0),
    WORKLOADS[4][0]: ("TFLOP/s", 250.0),
    WORKLOADS[5][0]: ("TFLOP/s", 60.0),
    WORKLOADS[6][0]: ("TFLOP/s", 250.0),
    WORKLOADS[7][0]: ("TFLOP/s", 250.0),
}
SIM_SHAPE = dict(B=1, H=2, Hkv=1, D=16, L=32)
# Tolerances: relative L2 error of out; absolute error of lse (float32 accumulation in all cases).
OUT_TOL = {"f32": 1e-4, "bf16": 1e-2, "fp8": 1e-2}
TORCH_TOL = {"f32": 5e-3, "bf16": 1e-2, "fp8": 1e-2}   # float32 SDPA may use TF32 on the GPU
LSE_TOL = 1e-3
DEVICE = "cuda"        # torch device of the data


def log(msg: str) -> None:
    print(msg, flush=True)


def fail_fast(msg: str, code: int = 2):
    print(f"gpu_forward: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


# ------------------------------------------------------------------------------------ timing

def kernel_time(torch, fn, calls, sync):
    return _kernel_time(torch, fn, calls, sync, log)


def d2d_copy(torch, rt, reps):
    """(TB/s, description) of a large device-to-device copy, bytes read + written."""
    if torch is not None:
        src = torch.empty(1 << 28, device="cuda", dtype=torch.float32).normal_()
        dst = torch.empty_like(src)
        t, _ = time_events(torch, lambda: dst.copy_(src), reps)
        nbytes = src.numel() * src.element_size()
        del src, dst
        torch.cuda.empty_cache()
        return 2 * nbytes / t / 1e12, f"torch copy_ of {nbytes >> 20} MiB"
    cuda = rt._cuda
    src = cuda.to_device(np.random.default_rng(0).standard_normal(1 << 26, dtype=np.float32))
    dst = cuda.device_array_like(src)
    t, _ = time_wall(lambda: dst.copy_to_device(src), reps, rt.synchronize)
    return 2 * src.nbytes / t / 1e12, f"numba copy_to_device of {src.nbytes >> 20} MiB"


# ------------------------------------------------------------------------------------ cases

class Case:
    """One workload's data: the paged pools and q as pn Tensors on the cuda runtime, the NumPy
    block table, and (with torch) the same data as torch tensors for SDPA and the references.

    ``q`` [B, H, Sq, D] bf16 / f32; pools [N, bs, Hkv, D] with N = B * M, M = L / bs, each
    sequence owning M shuffled blocks; FP8 pools hold E4M3 codes (real value = code x scale).
    """

    def __init__(self, spec, rt, pn, torch, seed):
        self.__dict__.update(spec)
        self.rt, self.pn, self.torch = rt, pn, torch
        self.G = self.H // self.Hkv
        self.causal = self.Sq > 1
        self.M = -(-self.L // BS)
        self.N = self.B * self.M
        rng = np.random.default_rng(seed)
        self.table = rng.permutation(self.N).reshape(self.B, self.M).astype(np.int32)
        self.lens = np.full(self.B, self.L, np.int32)
        self.k_scale, self.v_scale = (FP8_K_SCALE, FP8_V_SCALE) if self.kind == "fp8" else (1.0, 1.0)
        self.kv_itemsize = {"f32": 4, "bf16": 2, "fp8": 1}[self.kind]
        self.upload = "zero-copy"
        if torch is not None:
            self._build_torch(seed)
        else:
            self._build_host(rng)

    # -- construction

    def _build_torch(self, seed):
        torch = self.torch
        g = torch.Generator(device=DEVICE)
        g.manual_seed(seed)

        def randn(shape):
            return torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32)

        qdt = torch.float32 if self.kind == "f32" else torch.bfloat16
        self.tq = randn((self.B, self.H, self.Sq, self.D)).to(qdt)
        shape = (self.N, BS, self.Hkv, self.D)
        if self.kind == "fp8":
            self.tk = (randn(shape) / self.k_scale).clamp_(-448, 448).to(torch.float8_e4m3fn)
            self.tv = (randn(shape) / self.v_scale).clamp_(-448, 448).to(torch.float8_e4m3fn)
        else:
            self.tk, self.tv = randn(shape).to(qdt), randn(shape).to(qdt)
        self.table_t = torch.from_numpy(self.table).to(DEVICE, torch.long)
        if self.kind == "fp8":   # gather the codes as bytes (float8 indexing support varies)
            u8, f8 = torch.uint8, torch.float8_e4m3fn
            self.Kc = self.gather(self.tk.view(u8)).contiguous().view(f8)      # [B, Hkv, L, D]
            self.Vc = self.gather(self.tv.view(u8)).contiguous().view(f8)
        else:
            self.Kc = self.gather(self.tk).contiguous()
            self.Vc = self.gather(self.tv).contiguous()
        kvname = {"f32": "f32", "bf16": "bf16", "fp8": "fp8_e4m3"}[self.kind]
        self.q = self._to_pn(self.tq, "f32" if self.kind == "f32" else "bf16")
        self.k = self._to_pn(self.tk, kvname)
        self.v = self._to_pn(self.tv, kvname)
        torch.cuda.synchronize()

    def _to_pn(self, t, dtype):
        """pn Tensor on the cuda runtime sharing ``t``'s memory (torch exports no bf16 / fp8
        through __cuda_array_interface__, so those go as int16 / uint8 bits); a host round trip
        when pn.tensor refuses that."""
        torch = self.torch
        raw = t if dtype == "f32" else t.view(torch.int16 if dtype == "bf16" else torch.uint8)
        try:
            x = self.pn.tensor(raw, runtime=self.rt, dtype=dtype)
            want = np.dtype({"f32": np.float32, "bf16": np.uint16}.get(dtype, np.uint8))
            if tuple(x.shape) != tuple(t.shape) or np.dtype(x.storage.dtype) != want:
                raise ValueError(f"got storage {x.storage.dtype}{tuple(x.shape)}, expected {want}{tuple(t.shape)}")
            return x
        except (TypeError, ValueError) as exc:
            self.upload = f"host upload (pn.tensor refused the torch view: {exc})"
            host = raw.cpu().numpy()
            if host.dtype == np.int16:
                host = host.view(np.uint16)
            return self.pn.tensor(host, runtime=self.rt, dtype=dtype)

    def _build_host(self, rng):
        import ml_dtypes

        npdt = np.float32 if self.kind == "f32" else ml_dtypes.bfloat16
        self.hq = rng.standard_normal((self.B, self.H, self.Sq, self.D), dtype=np.float32).astype(npdt)
        shape = (self.N, BS, self.Hkv, self.D)
        if self.kind == "fp8":
            f8 = ml_dtypes.float8_e4m3fn
            self.hk = np.clip(rng.standard_normal(shape) / self.k_scale, -448, 448).astype(f8)
            self.hv = np.clip(rng.standard_normal(shape) / self.v_scale, -448, 448).astype(f8)
        else:
            self.hk = rng.standard_normal(shape, dtype=np.float32).astype(npdt)
            self.hv = rng.standard_normal(shape, dtype=np.float32).astype(npdt)
        self.upload = "host upload (no torch)"
        self.q, self.k, self.v = (self.pn.tensor(a, runtime=self.rt) for a in (self.hq, self.hk, self.hv))
        self.Kc_host = contiguous_kv(self.hk, self.table, self.L)
        self.Vc_host = contiguous_kv(self.hv, self.table, self.L)

    def gather(self, pool):
        """[B, Hkv, L, D] view of ``pool[table]`` (a strided view after the gather copy)."""
        g = pool[self.table_t]                                   # [B, M, bs, Hkv, D]
        return g.view(self.B, self.M * BS, self.Hkv, self.D)[:, :self.L].transpose(1, 2)

    # -- the op and the references

    @property
    def kv_bytes(self) -> int:
        return 2 * self.B * self.L * self.Hkv * self.D * self.kv_itemsize

    @property
    def flops(self) -> float:
        return 4.0 * self.B * self.H * self.Sq * self.L * self.D * (0.5 if self.causal and self.Sq == self.L else 1.0)

    def pn_call(self, q=None, table=None, lens=None):
        pn = self.pn
        q = self.q if q is None else q
        table = self.table if table is None else table
        lens = self.lens if lens is None else lens
        if self.kind == "fp8":
            return pn.paged_attention_fwd_fp8(q, self.k, self.v, table, causal=self.causal,
                                              k_scale=self.k_scale, v_scale=self.v_scale, seq_lens=lens)
        return pn.paged_attention_fwd(q, self.k, self.v, table, causal=self.causal, seq_lens=lens)

    def probe_q(self, rows):
        """q of sequence 0's last ``rows`` queries, for a cheap pre-run of a big prefill."""
        if self.torch is not None:
            return self._to_pn(self.tq[:1, :, -rows:].contiguous(), "f32" if self.kind == "f32" else "bf16")
        return self.pn.tensor(np.ascontiguousarray(self.hq[:1, :, -rows:]), runtime=self.rt)

    def q64(self, b, h, rows):
        if self.torch is not None:
            return self.tq[b, h].float().cpu().numpy()[rows].astype(np.float64)
        return self.hq[b, h, rows].astype(np.float64)

    def kv64(self, b, kvh):
        """Dequantized K, V [L, D] float64 of sequence b, KV head kvh (exact upcasts)."""
        if self.torch is not None:
            k = self.Kc[b, kvh].float().cpu().numpy().astype(np.float64)
            v = self.Vc[b, kvh].float().cpu().numpy().astype(np.float64)
        else:
            k, v = self.Kc_host[b, kvh].astype(np.float64), self.Vc_host[b, kvh].astype(np.float64)
        return k * self.k_scale, v * self.v_scale

    def slice_rows(self):
        if self.Sq <= 16:
            return np.arange(self.Sq)
        return np.concatenate([np.arange(8), np.arange(self.Sq - 8, self.Sq)])

    def check_slice(self, out, lse=None):
        """(relative L2 error of out, max |lse error| or None) on a few (b, h, rows) slices
        against float64; ``out``/``lse`` are host arrays [B, H, Sq, D] / [B, H, Sq]."""
        rows = self.slice_rows()
        picks = sorted({(0, 0), (self.B // 2, min(self.H - 1, self.H // 2 + 1)), (self.B - 1, self.H - 1)})
        num = den = 0.0
        lse_err = 0.0
        scale = 1.0 / math.sqrt(self.D)
        for b, h in picks:
            k, v = self.kv64(b, h // self.G)
            s = scale * self.q64(b, h, rows) @ k.T                       # [rows, L]
            if self.causal:
                s = np.where(np.arange(self.L)[None, :] <= (self.L - self.Sq + rows)[:, None], s, -np.inf)
            m = s.max(axis=1, keepdims=True)
            p = np.exp(s - m)
            l_ = p.sum(axis=1, keepdims=True)
            ref = (p @ v) / l_
            got = np.asarray(out[b, h, rows], dtype=np.float64)
            num += float(((got - ref) ** 2).sum())
            den += float((ref ** 2).sum())
            if lse is not None:
                ref_lse = (m + np.log(l_))[:, 0]
                lse_err = max(lse_err, float(np.abs(np.asarray(lse[b, h, rows], np.float64) - ref_lse).max()))
        return math.sqrt(num / den), (lse_err if lse is not None else None)

    def torch_ref_full(self):
        """float32 SDPA on the whole output (upcast inputs, dequantized FP8), as a host array."""
        torch = self.torch
        F = torch.nn.functional
        K = self.Kc.float() * self.k_scale
        V = self.Vc.float() * self.v_scale
        with torch.no_grad():
            o = F.scaled_dot_product_attention(self.tq.float(), K, V, is_causal=self.causal,
                                               enable_gqa=self.G > 1)
        out = o.cpu().numpy()
        del K, V, o
        return out

    def pn_ref_full(self):
        """The package's float64 oracle on the whole output (tiny shapes only)."""
        from paged_numba.ops import reference as R

        if self.kind == "fp8":
            out, _ = R.paged_attention_fwd_fp8_ref(self.hq, self.hk, self.hv, self.table, seq_lens=self.lens,
                                                   causal=self.causal, k_scale=self.k_scale,
                                                   v_scale=self.v_scale)
        else:
            out, _ = R.paged_attention_fwd_ref(self.hq, self.hk, self.hv, self.table, seq_lens=self.lens,
                                               causal=self.causal)
        return out

    def sdpa_fns(self):
        """(contiguous, gather + SDPA) callables in the case's dtype; None for FP8."""
        if self.kind == "fp8":
            return None
        torch = self.torch
        F = torch.nn.functional
        kw = {"is_causal": self.causal, "enable_gqa": self.G > 1}

        def contiguous():
            with torch.no_grad():
                return F.scaled_dot_product_attention(self.tq, self.Kc, self.Vc, **kw)

        def gathered():
            with torch.no_grad():
                return F.scaled_dot_product_attention(self.tq, self.gather(self.tk), self.gather(self.tv), **kw)

        return contiguous, gathered


def rel_l2(got, ref) -> float:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


# ------------------------------------------------------------------------------------ rows

class Bench:
    def __init__(self, args, pn, rt, torch):
        self.args, self.pn, self.rt, self.torch = args, pn, rt, torch
        self.rows = []
        self.pn_times = {}          # (workload, impl) -> seconds, for the FP8 / BF16 ratio
        self.failed = False
        self.d2d = None

    def row(self, name, impl, t=None, spread=None, case=None, err="", target="", note=""):
        cells = [name, impl]
        if t is None:
            cells += ["n/a", "", "", "", ""]
        else:
            tbps = case.kv_bytes / t / 1e12
            pct = f"{100 * tbps / self.d2d:.0f}%" if self.d2d else "n/a"
            tflops = f"{case.flops / t / 1e12:.1f}" if case.Sq > 1 else "-"
            cells += [f"{t * 1e6:.1f}", "" if spread is None else f"{100 * spread:.0f}%", f"{tbps:.2f}", pct, tflops]
        cells += [err, target, note]
        self.rows.append(cells)
        log("  " + " | ".join(str(c) for c in cells[1:]))

    def reps(self, t_one: float) -> int:
        """Timed calls for a row whose single call takes ``t_one`` s: up to --repeat, within
        --row-seconds, at least 3 (2 with --quick / --sim-smoke)."""
        a = self.args
        least = 2 if (a.quick or a.sim_smoke) else 3
        return int(max(least, min(a.repeat, a.row_seconds / max(t_one, 1e-6))))

    def target(self, name, impl, t, case):
        spec = TARGETS.get(name)
        if spec is None or self.args.sim_smoke:
            return ""
        if spec[0] == "TB/s":
            v = case.kv_bytes / t / 1e12
            return f">= {spec[1]} TB/s: {'met' if v >= spec[1] else 'MISSED'}"
        if spec[0] == "TFLOP/s":
            v = case.flops / t / 1e12
            return f">= {spec[1]:.0f} TFLOP/s: {'met' if v >= spec[1] else 'MISSED'}"
        base = self.pn_times.get((spec[2], impl))
        if base is None:
            return f"<= {spec[1]}x BF16: no BF16 time"
        r = t / base
        return f"<= {spec[1]}x BF16 ({r:.2f}x): {'met' if r <= spec[1] else 'MISSED'}"

    def workload(self, name, spec, seed):
        torch = self.torch
        log(f"\n[{time.strftime('%H:%M:%S')}] {name}")
        t0 = time.perf_counter()
        case = Case(spec, self.rt, self.pn, torch, seed)
        log(f"  data ready in {time.perf_counter() - t0:.1f} s ({case.upload}); K/V {case.kv_bytes / 1e6:.0f} MB")
        self.upload = case.upload
        try:
            self.pn_rows(name, case)
        except Exception as exc:   # a launch or compile error: report it, still run torch
            self.failed = True
            traceback.print_exc()
            self.row(name, "paged_numba call", note=f"ERROR: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        self.torch_rows(name, case)
        del case
        gc.collect()
        if torch is not None:
            torch.cuda.empty_cache()

    def pn_rows(self, name, case):
        """paged_numba: pre-run (big prefill), first call (compiles), check, time."""
        a, torch = self.args, self.torch
        sync = self.rt.synchronize
        skip = None
        compiled = False
        if case.causal and case.B * case.Sq >= 1024 and not a.sim_smoke:
            rows = 256
            pq = case.probe_q(rows)
            case.pn_call(pq, case.table[:1], case.lens[:1])
            sync()
            tp = time.perf_counter()
            case.pn_call(pq, case.table[:1], case.lens[:1])
            sync()
            tp = time.perf_counter() - tp
            del pq
            compiled = True
            est = tp * case.B * case.Sq / rows
            log(f"  pre-run B=1 Sq={rows}: {tp * 1e3:.1f} ms -> full call ~{est:.1f} s")
            if est > 1.5 * a.prefill_budget:
                skip = (f"skipped: > {a.prefill_budget:g} s (estimated {est:.0f} s per call from a B=1 "
                        f"Sq={rows} pre-run)")
        if skip is None:
            t1 = time.perf_counter()
            out, lse = case.pn_call()
            sync()
            t1 = time.perf_counter() - t1
            log(f"  first call {t1:.2f} s" + ("" if compiled else " (compiles when new)"))
            out_h, lse_h = out.numpy(), lse.numpy()
            del out, lse
            e_slice, e_lse = case.check_slice(out_h, lse_h)
            ref = case.torch_ref_full() if torch is not None else (case.pn_ref_full() if a.sim_smoke else None)
            e_full = rel_l2(out_h, ref) if ref is not None else None
            nan = bool(np.isnan(out_h.astype(np.float32)).any() or np.isnan(lse_h).any())
            del ref, out_h, lse_h
            err = f"{e_slice:.1e} / " + (f"{e_full:.1e}" if e_full is not None else "n/a")
            bad = nan or not e_slice <= OUT_TOL[case.kind] or not e_lse <= LSE_TOL or (
                e_full is not None and not e_full <= TORCH_TOL[case.kind])
            if bad:
                self.failed = True
                full = "n/a" if e_full is None else f"{e_full:.2e}"
                msg = (f"ERROR: wrong result, not timed (NaN: {nan}; out rel err {e_slice:.2e} vs fp64 slice, "
                       f"tol {OUT_TOL[case.kind]:g}; lse err {e_lse:.2e}, tol {LSE_TOL:g}; vs SDPA fp32 {full}, "
                       f"tol {TORCH_TOL[case.kind]:g})")
                self.row(name, "paged_numba call", err=err, note=msg)
            else:
                if compiled:
                    t_one = t1
                else:
                    t_one = time.perf_counter()
                    case.pn_call()
                    sync()
                    t_one = time.perf_counter() - t_one
                if t_one > a.prefill_budget:
                    skip = f"skipped: > {a.prefill_budget:g} s (one call took {t_one:.1f} s)"
                else:
                    n = self.reps(t_one)
                    t, spread = time_wall(case.pn_call, n, sync, warmup=0 if t_one > 0.5 else 2)
                    self.pn_times[(name, "call")] = t
                    self.row(name, "paged_numba call", t, spread, case, err, self.target(name, "call", t, case),
                             f"median of {n}")
                    if torch is not None:
                        nk = max(1, min(n, 20, int(a.row_seconds / t_one)))
                        tk = kernel_time(torch, case.pn_call, nk, sync)
                        if tk is None:
                            self.row(name, "paged_numba kernels", note="n/a: the profiler saw no kernel")
                        else:
                            self.pn_times[(name, "kernels")] = tk
                            self.row(name, "paged_numba kernels", tk, None, case, err,
                                     self.target(name, "kernels", tk, case), f"mean of {nk}, CUPTI trace")
        if skip is not None:
            self.row(name, "paged_numba call", note=skip)
        elif case.Sq > 4 and case.kind in ("bf16", "f32") and torch is not None:
            # The SIMT tiled kernel on the same data, for the tensor cores' gain (prefill_mma=False).
            self.rt.client.prefill_mma = False
            try:
                tk = kernel_time(torch, case.pn_call, 3, sync)
                self.row(name, "paged_numba SIMT kernels", tk, None, case, "", "",
                         "prefill_mma=False; mean of 3, CUPTI trace")
            finally:
                self.rt.client.prefill_mma = True

    def torch_rows(self, name, case):
        a, torch = self.args, self.torch
        if torch is None:
            self.row(name, "torch SDPA", note="torch with CUDA not available" if not a.sim_smoke else "sim-smoke: skipped")
        elif case.kind == "fp8":
            self.row(name, "torch SDPA", note="n/a: no FP8 SDPA; the BF16 rows are the reference")
        else:
            for impl, fn in zip(("torch SDPA contiguous", "torch pool[table] + SDPA"), case.sdpa_fns()):
                try:
                    o = fn()
                    torch.cuda.synchronize()
                    e_slice, _ = case.check_slice(o.float().cpu().numpy())
                    del o
                    t_one = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    t_one = time.perf_counter() - t_one
                    n = self.reps(t_one)
                    t, spread = time_events(torch, fn, n, warmup=1 if t_one > 0.5 else 3)
                    self.row(name, impl, t, spread, case, f"{e_slice:.1e} / -", "", f"median of {n}, events")
                except Exception as exc:
                    self.row(name, impl, note=f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
            self.flex_row(name, case)

    def flex_row(self, name, case):
        """torch flex_attention's paged path (PagedAttention's converted block mask) on the same pool
        and block table; kernel time from CUPTI like paged_numba's (flex launches several kernels)."""
        torch, impl = self.torch, "torch flex_attention paged"
        if self.args.no_flex:
            return
        try:
            import flex_paged
            errs = []

            def check(o):
                errs.append(case.check_slice(o.float().cpu().numpy())[0])

            fn, how = flex_paged.build(torch, case.tq, case.tk, case.tv, case.table_t, case.lens.tolist(),
                                       case.causal, kc=case.Kc, vc=case.Vc, check=check)
            t_one = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            t_one = time.perf_counter() - t_one
            n = max(1, min(20, self.reps(t_one)))
            tk = kernel_time(torch, fn, n, torch.cuda.synchronize)
            self.row(name, impl, tk, None, case, f"{errs[0]:.1e} / -", "",
                     f"{how}; mean of {n}, CUPTI trace")
        except Exception as exc:
            self.row(name, impl, note=f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}")


# ------------------------------------------------------------------------------------ main

def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/gpu_forward.md")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (20 per row, ~1 s per row)")
    ap.add_argument("--repeat", type=int, default=None, help="most timed calls per row (default 200, quick 20)")
    ap.add_argument("--row-seconds", type=float, default=None,
                    help="time budget per row that caps the repetitions (default 4, quick 1)")
    ap.add_argument("--prefill-budget", type=float, default=10.0,
                    help="skip a paged_numba row whose single call takes longer (seconds)")
    ap.add_argument("--only", default=None, help="run the workloads whose name contains this text")
    ap.add_argument("--table-out", default=None, help="also write the final table to this file")
    ap.add_argument("--mma-tiles", default=None, metavar="NW,MT,BK",
                    help="tensor-core prefill tiles for this run (a sweep; default: the client's table)")
    ap.add_argument("--no-flex", action="store_true", help="no torch flex_attention paged rows")
    ap.add_argument("--sim-smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = 20 if args.quick else 200
    if args.row_seconds is None:
        args.row_seconds = 1.0 if args.quick else 4.0
    if args.sim_smoke:
        args.repeat, args.row_seconds = 2, 0.0
    return args


def main(argv=None) -> int:
    args = parse(argv)
    sim_env = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
    if args.sim_smoke and not sim_env:
        fail_fast("--sim-smoke runs on the CUDA simulator: set NUMBA_ENABLE_CUDASIM=1")
    if sim_env and not args.sim_smoke:
        fail_fast("NUMBA_ENABLE_CUDASIM is set: this benchmark needs a real GPU (unset it), or pass --sim-smoke "
                  "for a dry run at tiny shapes")

    import paged_numba as pn

    try:
        rt = pn.get_runtime("cuda")
    except pn.RuntimeUnavailableError as exc:
        fail_fast(f"the cuda runtime is unavailable, so there is nothing to benchmark here (this benchmark "
                  f"needs an NVIDIA GPU; --sim-smoke is only a dry run on the simulator): {exc}")

    torch = None
    torch_note = "not used (sim-smoke)" if args.sim_smoke else "not installed"
    if not args.sim_smoke:
        try:
            import torch as _torch

            if _torch.cuda.is_available():
                torch = _torch
                torch_note = f"{_torch.__version__} (CUDA {_torch.version.cuda})"
            else:
                torch_note = f"{_torch.__version__} without a usable CUDA device"
        except ImportError:
            pass
    import numba

    try:
        from importlib.metadata import version
        ncuda = version("numba-cuda")
    except Exception:
        ncuda = "?"
    gpu = torch.cuda.get_device_name(0) if torch is not None else str(rt.device.description)
    log(f"paged_numba {pn.__version__}, numpy {np.__version__}, numba {numba.__version__}, numba-cuda {ncuda}, "
        f"torch {torch_note}")
    log(f"GPU: {gpu}; runtime device {rt.device}")

    if args.mma_tiles:
        from paged_numba.runtime import cuda as cuda_rt
        tiles = tuple(int(x) for x in args.mma_tiles.split(","))
        cuda_rt.plan.mma_tiles = lambda D, sim, *a, **kw: tiles
        log(f"tensor-core prefill tiles (NW, MT, BK) = {tiles} for every head dim")
    bench = Bench(args, pn, rt, torch)
    if args.sim_smoke:
        bench.d2d, d2d_how = None, "not measured (simulator)"
    else:
        bench.d2d, d2d_how = d2d_copy(torch, rt, 20 if args.quick else 50)
        log(f"device-to-device copy: {bench.d2d:.2f} TB/s ({d2d_how}, bytes read + written)")
    l2 = 50e6
    if torch is not None:
        l2 = float(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", l2) or l2)

    workloads = [(n, dict(s)) for n, s in WORKLOADS if args.only is None or args.only in n]
    if not workloads:
        fail_fast(f"--only {args.only!r} matches no workload; names: " + "; ".join(n for n, _ in WORKLOADS))
    for i, (name, spec) in enumerate(workloads):
        if args.sim_smoke:
            name += " [sim: B1 H2/1 D16 L32]"
            spec.update(SIM_SHAPE)
            spec["Sq"] = 1 if spec["Sq"] == 1 else SIM_SHAPE["L"]
        kvb = 2 * spec["B"] * spec["L"] * spec["Hkv"] * spec["D"] * {"f32": 4, "bf16": 2, "fp8": 1}[spec["kind"]]
        if kvb < 4 * l2 and not args.sim_smoke:
            log(f"  warning: {name}: K/V {kvb / 1e6:.0f} MB is within 4x of the {l2 / 1e6:.0f} MB L2; "
                "repeated calls partly measure the cache")
        try:
            bench.workload(name, spec, seed=1000 + i)
        except Exception as exc:
            bench.failed = True
            traceback.print_exc()
            bench.row(name, "paged_numba call", note=f"ERROR: {type(exc).__name__}: {str(exc)[:200]}")
            if torch is not None:
                gc.collect()
                torch.cuda.empty_cache()

    header = ["workload (bs 16, shuffled table)", "implementation", "time us", "spread p10-p90",
              "K/V TB/s", "% of D2D copy", "TFLOP/s", "rel err fp64 slice / SDPA fp32", "target", "note"]
    table = markdown_table(header, bench.rows)
    notes = (f"GPU: {gpu}. paged_numba {pn.__version__} (numba {numba.__version__}, numba-cuda {ncuda}, "
             f"numpy {np.__version__}); torch {torch_note}. Device-to-device copy "
             + (f"{bench.d2d:.2f} TB/s ({d2d_how}); " if bench.d2d else f"{d2d_how}; ")
             + "'% of D2D copy' = K/V TB/s over it. 'paged_numba call': wall clock per public call with "
             "synchronize (NumPy block table validated and uploaded each call, finiteness flag read back); "
             "'kernels': GPU kernel time per call from the CUPTI trace; torch rows: CUDA events, SDPA on "
             "contiguous [B, Hkv, L, D] data, or with the pool[table] gather timed inside. K/V TB/s counts the "
             "K and V bytes of every token once; prefill TFLOP/s counts 4 B H Sq L D, halved for causal. "
             f"Inputs exceed the {l2 / 1e6:.0f} MB L2 several times, so one input set per workload. "
             f"pn Tensors: {getattr(bench, 'upload', 'n/a')}.")
    if args.table_out:
        with open(args.table_out, "w") as f:
            f.write(table + "\n\n" + notes + "\n")
    if not args.no_save and not args.sim_smoke:
        path = append_results("gpu_forward", f"GPU forward on {gpu}" + (" (quick)" if args.quick else ""),
                              table, notes)
        log(f"\nappended to {path}")
    log("\n" + table)
    if bench.failed:
        log("\nSOME paged_numba ROWS FAILED (see ERROR above)")
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
