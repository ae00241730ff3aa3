"""torch ``flex_attention``'s paged path as a benchmark anchor (issue 11 item 7, issue 12 item 6).

torch ships paged attention on top of ``flex_attention`` as
``torch.nn.attention.experimental._paged_attention.PagedAttention``: the K/V cache is one
``[1, Hkv, n_pages * page_size, D]`` tensor, a page table maps each sequence's logical pages to
physical ones, and ``convert_logical_block_mask`` turns a logical block mask (whose KV block size
must equal the page size) into one over the physical pages. Here the page table is filled from our
block table directly, so flex reads the same pages in the same shuffled order as paged_numba.

flex's kernels tile keys by at least their own BLOCK_N, so a page of 16 tokens may not compile;
``build`` then re-pages the same K/V into pages of ``fallback_page`` tokens (shuffled likewise) and
says so in its note. Only plain and bottom-right causal attention are built (no FP8).
"""
from __future__ import annotations

_FLEX = {}


def _compiled(torch):
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def pool_to_cache(pool):
    """[N, bs, Hkv, D] pool -> flex's [1, Hkv, N * bs, D] cache (a copy; physical page n = block n)."""
    N, bs, Hkv, D = pool.shape
    return pool.permute(2, 0, 1, 3).reshape(1, Hkv, N * bs, D).contiguous()


def repage(torch, kc, page, seed=0):
    """Contiguous [B, Hkv, L, D] K or V -> (flex cache of ``page``-token pages, page table [B, M]):
    sequence b's logical page m is physical page table[b, m], the pages shuffled."""
    B, Hkv, L, D = kc.shape
    M = -(-L // page)
    pad = M * page - L
    if pad:
        kc = torch.nn.functional.pad(kc, (0, 0, 0, pad))
    g = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(B * M, generator=g).to(kc.device)
    pages = kc.reshape(B, Hkv, M, page, D).permute(1, 0, 2, 3, 4).reshape(Hkv, B * M, page, D)
    cache = torch.empty_like(pages)
    cache[:, perm] = pages
    return cache.reshape(1, Hkv, B * M * page, D).contiguous(), perm.reshape(B, M)


def make_fn(torch, q, k_cache, v_cache, table, seq_lens, page, causal, grad=False):
    """A callable running flex_attention over the paged cache: q [B, H, Sq, D]; table [B, M]
    (physical page of each logical page); seq_lens [B] (python ints); bottom-right causal when
    ``causal``. With ``grad`` the callable returns (out, q, k_cache, v_cache) leaves that require
    grad, for a backward anchor."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask

    dev = q.device
    B, H, Sq, D = q.shape
    Hkv = k_cache.shape[1]
    n_pages = k_cache.shape[2] // page
    M = table.shape[1]
    pa = PagedAttention(n_pages, page, B, device=dev)
    tab = table.to(dev, torch.int64)
    pa.page_table[:, :M] = tab
    rows = torch.arange(B, device=dev)[:, None].expand(B, M)
    pa.physical_to_logical[rows, tab] = torch.arange(M, device=dev)[None, :].expand(B, M)
    lens = torch.as_tensor(list(seq_lens), device=dev, dtype=torch.int64)
    if hasattr(pa, "seq_lens"):   # newer torch bounds the keys by seq_lens, older by capacity
        pa.seq_lens[:B] = lens
        pa.capacity[:B] = M * page
    else:
        pa.capacity[:B] = lens
    L = int(max(seq_lens))
    off = L - Sq          # bottom-right: query i sits at position L - Sq + i (equal lengths)

    def causal_mod(b, h, q_idx, kv_idx):
        return q_idx + off >= kv_idx

    def all_mod(b, h, q_idx, kv_idx):
        return q_idx >= 0

    logical = create_block_mask(causal_mod if causal else all_mod, B, None, Sq, M * page, device=dev,
                                BLOCK_SIZE=(128, page))
    mask = pa.convert_logical_block_mask(logical)
    flex = _compiled(torch)
    gqa = H != Hkv
    if not grad:
        def fn():
            with torch.no_grad():
                return flex(q, k_cache, v_cache, block_mask=mask, enable_gqa=gqa)
        return fn
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k_cache, v_cache))

    def fwd():
        return flex(qr, kr, vr, block_mask=mask, enable_gqa=gqa), qr, kr, vr
    return fwd


def build(torch, q, k_pool, v_pool, table, seq_lens, causal, kc=None, vc=None, fallback_page=128,
          grad=False, check=None):
    """(callable, note) for flex over our pool (pages of the pool's block size) or, if that does not
    compile, over the contiguous kc / vc re-paged into ``fallback_page``-token pages. ``check(out)``
    (optional) is called on the first output. Raises the last error when neither works."""
    bs = k_pool.shape[1]
    tries = [("pool", bs)]
    if kc is not None and fallback_page != bs:
        tries.append(("repaged", fallback_page))
    err = None
    for how, page in tries:
        try:
            if how == "pool":
                kcache, vcache, tab = pool_to_cache(k_pool), pool_to_cache(v_pool), table
            else:
                kcache, tab = repage(torch, kc, page)
                vcache, _ = repage(torch, vc, page)
            fn = make_fn(torch, q, kcache, vcache, tab, seq_lens, page, causal, grad=grad)
            out = fn()
            torch.cuda.synchronize()
            if check is not None:
                check(out[0] if grad else out)
            if how == "pool":
                note = f"flex pages of {page} tokens = our blocks"
            else:
                why = " ".join(str(err).split())
                why = why.rsplit("ValueError: ", 1)[-1].split(". We got")[0][:90]
                note = f"the same K/V re-paged into {page}-token pages (flex rejects {bs}-token ones: {why})"
            return fn, note
        except Exception as exc:   # a compile / lowering error of this page size: try the next
            err = exc
    raise err
