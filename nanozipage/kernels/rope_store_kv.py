"""Finish this step's q/k/v projections in one pass: q/k RMSNorm (Qwen3), RoPE on q and k, k
and v into the paged KV cache, and window queries into the query cache. Returns q.

Runs before prefill or decode attention; the compressor reads the window queries later. As
torch ops this is six tiny kernels per layer in a decode step; fused it is one launch.

Cache layout, per layer: `[num_blocks, num_kv_heads, block_size, head_dim]`; the token in
`slot = block_id * block_size + offset` lives at `cache[block_id, :, offset, :]`. Query cache,
per layer: `[rows, num_q_heads, head_dim]`, one row per (query slot, window position).
"""

import torch
import triton
import triton.language as tl

from nanozipage.kernels.prefill_attention import dependent_launch, dependent_start, uses_triton


@triton.jit
def _load_norm_rope(ptrs, mask, weight, cos, sin, eps, HEAD_DIM: tl.constexpr, NORM: tl.constexpr):
    """The heads whose first halves are at `ptrs` (rotate-half layout), in float32: RMSNorm
    with `weight` if NORM, then RoPE. Returns the two halves."""
    half = tl.arange(0, HEAD_DIM // 2)[None, :]
    x_lo = tl.load(ptrs, mask=mask).to(tl.float32)
    x_hi = tl.load(ptrs + HEAD_DIM // 2, mask=mask).to(tl.float32)
    if NORM:
        mean_sq = (tl.sum(x_lo * x_lo, 1) + tl.sum(x_hi * x_hi, 1)) / HEAD_DIM
        inv = tl.rsqrt(mean_sq + eps)[:, None]
        x_lo = x_lo * inv * tl.load(weight + half)
        x_hi = x_hi * inv * tl.load(weight + HEAD_DIM // 2 + half)
    return x_lo * cos - x_hi * sin, x_hi * cos + x_lo * sin


@triton.jit
def _rope_store_kv_kernel(
    qkv, q_out, positions, cos_sin, q_weight, k_weight, k_cache, v_cache, slot_mapping,
    q_cache, query_rows, eps,
    stride_qkv, stride_cos, stride_cb, stride_ch, stride_qr,
    num_q_heads, num_kv_heads, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
    NORM: tl.constexpr, STORE_QUERIES: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    dependent_start(PDL)
    token = tl.program_id(0)
    half = tl.arange(0, HEAD_DIM // 2)[None, :]
    pos = tl.load(positions + token)
    cos = tl.load(cos_sin + pos * stride_cos + half)
    sin = tl.load(cos_sin + pos * stride_cos + HEAD_DIM // 2 + half)
    row = qkv + token * stride_qkv  # heads q | k | v, each head_dim long

    q_heads = tl.arange(0, BLOCK_QH)[:, None]
    q_mask = q_heads < num_q_heads
    q_ptrs = row + q_heads * HEAD_DIM + half
    q_lo, q_hi = _load_norm_rope(q_ptrs, q_mask, q_weight, cos, sin, eps, HEAD_DIM, NORM)
    q_lo, q_hi = q_lo.to(q_out.dtype.element_ty), q_hi.to(q_out.dtype.element_ty)
    out = q_out + token * num_q_heads * HEAD_DIM + q_heads * HEAD_DIM + half
    tl.store(out, q_lo, mask=q_mask)
    tl.store(out + HEAD_DIM // 2, q_hi, mask=q_mask)
    if STORE_QUERIES:
        query_row = tl.load(query_rows + token).to(tl.int64)
        if query_row >= 0:  # a window query
            dst = q_cache + query_row * stride_qr + q_heads * HEAD_DIM + half
            tl.store(dst, q_lo, mask=q_mask)
            tl.store(dst + HEAD_DIM // 2, q_hi, mask=q_mask)

    # int64 because block_id * stride_cb overflows int32 in caches over 2**31 elements.
    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot < 0:  # a padding token
        return
    kv_heads = tl.arange(0, BLOCK_KH)[:, None]
    kv_mask = kv_heads < num_kv_heads
    k_ptrs = row + (num_q_heads + kv_heads) * HEAD_DIM + half
    k_lo, k_hi = _load_norm_rope(k_ptrs, kv_mask, k_weight, cos, sin, eps, HEAD_DIM, NORM)
    entry = (slot // block_size) * stride_cb + (slot % block_size) * HEAD_DIM
    dst = entry + kv_heads * stride_ch + half
    tl.store(k_cache + dst, k_lo.to(k_cache.dtype.element_ty), mask=kv_mask)
    tl.store(k_cache + dst + HEAD_DIM // 2, k_hi.to(k_cache.dtype.element_ty), mask=kv_mask)
    dims = tl.arange(0, HEAD_DIM)[None, :]  # v is stored as it is: whole heads
    v = tl.load(row + (num_q_heads + num_kv_heads + kv_heads) * HEAD_DIM + dims, mask=kv_mask)
    tl.store(v_cache + entry + kv_heads * stride_ch + dims, v, mask=kv_mask)


def rope_store_kv(
    qkv, positions, cos_sin, q_weight, k_weight, eps, k_cache, v_cache, slot_mapping,
    q_cache=None, query_rows=None,
) -> torch.Tensor:  # fmt: skip
    """`qkv` `[N, q_heads + 2 * kv_heads, head_dim]` (q heads, then k, then v) at `positions`
    `[N]`; `cos_sin` `[max_positions, head_dim]` float32 (cos | sin of each frequency).
    With `q_weight`/`k_weight` `[head_dim]`, RMSNorm each q and k head first (eps). k and v go
    to `slot_mapping` `[N]` (-1: padding, skipped); with `query_rows` `[N]`, q also goes to
    those rows of `q_cache` `[rows, q_heads, head_dim]` (-1: not a window query). Computes in
    float32 and rounds once. Returns the rotated q `[N, q_heads, head_dim]`."""
    if not uses_triton(qkv):
        args = (cos_sin, q_weight, k_weight, eps, k_cache, v_cache, slot_mapping, q_cache)
        return rope_store_kv_ref(qkv, positions, *args, query_rows)
    num_tokens, num_heads, head_dim = qkv.shape
    _, num_kv_heads, block_size, cache_dim = k_cache.shape
    num_q_heads = num_heads - 2 * num_kv_heads
    assert cache_dim == head_dim and v_cache.shape == k_cache.shape and num_q_heads > 0
    assert qkv.stride(2) == 1 and qkv.stride(1) == head_dim, "heads must be contiguous rows"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert qkv.dtype == k_cache.dtype == v_cache.dtype
    assert cos_sin.shape[1] == head_dim and cos_sin.stride(1) == 1
    assert slot_mapping.shape == positions.shape == (num_tokens,)
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    assert (q_weight is None) == (k_weight is None)
    store_queries = query_rows is not None
    if store_queries:
        assert q_cache.shape[1:] == (num_q_heads, head_dim) and q_cache.dtype == qkv.dtype
        assert q_cache.stride(2) == 1 and q_cache.stride(1) == head_dim
        assert query_rows.shape == (num_tokens,)
    else:  # unused pointers: the kernel does not read them
        q_cache, query_rows = k_cache, slot_mapping
    q = qkv.new_empty(num_tokens, num_q_heads, head_dim)
    if num_tokens == 0:
        return q
    norm = q_weight is not None
    _rope_store_kv_kernel[(num_tokens,)](
        qkv, q, positions, cos_sin, q_weight if norm else cos_sin, k_weight if norm else cos_sin,
        k_cache, v_cache, slot_mapping, q_cache, query_rows, eps,
        qkv.stride(0), cos_sin.stride(0), k_cache.stride(0), k_cache.stride(1), q_cache.stride(0),
        num_q_heads, num_kv_heads, block_size,
        HEAD_DIM=head_dim, BLOCK_QH=triton.next_power_of_2(num_q_heads),
        BLOCK_KH=triton.next_power_of_2(num_kv_heads), NORM=norm, STORE_QUERIES=store_queries,
        **dependent_launch(qkv),
    )  # fmt: skip
    return q


def rope_store_kv_ref(
    qkv, positions, cos_sin, q_weight, k_weight, eps, k_cache, v_cache, slot_mapping,
    q_cache=None, query_rows=None,
) -> torch.Tensor:  # fmt: skip
    num_kv_heads = k_cache.shape[1]
    q, k, v = qkv.split([qkv.shape[1] - 2 * num_kv_heads, num_kv_heads, num_kv_heads], dim=1)
    q, k = q.float(), k.float()
    if q_weight is not None:  # RMSNorm of each head (Qwen3)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps) * q_weight.float()
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * k_weight.float()
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)

    def rotate(x):  # RoPE in the rotate-half layout of HF Llama/Qwen
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(qkv.dtype)

    q, k = rotate(q), rotate(k)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[2]
    k_cache[slots // block_size, :, slots % block_size] = k[keep]
    v_cache[slots // block_size, :, slots % block_size] = v[keep]
    if query_rows is not None:
        window = query_rows >= 0
        q_cache[query_rows[window]] = q[window]
    return q
