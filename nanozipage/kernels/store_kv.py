"""Write each new token's key and value into the paged KV cache, and its query into the query
cache when it is a window query.

Data flow: the attention layer projects q/k/v for the tokens of this step, calls `store_kv` with
the model runner's `slot_mapping` (and, with compression on, its `query_rows`), and only then
runs prefill or decode attention, which read every key and value (new and cached alike) back
through the block table. The stored window queries are read later by `ModelRunner.compress`.

Cache layout, per layer: `[num_blocks, num_kv_heads, block_size, head_dim]`; the token in
`slot = block_id * block_size + offset` lives at `cache[block_id, :, offset, :]`. Query cache,
per layer: `[rows, num_q_heads, head_dim]`, one row per (query slot, window position).
"""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key, value, k_cache, v_cache, slot_mapping, query, q_cache, query_rows,
    stride_kn, stride_kh, stride_vn, stride_vh, stride_cb, stride_ch,
    stride_qn, stride_qh, stride_qr, stride_qch,
    num_kv_heads, num_q_heads, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_QH: tl.constexpr,
    STORE_QUERIES: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    dims = tl.arange(0, HEAD_DIM)[None, :]
    if STORE_QUERIES:
        row = tl.load(query_rows + token).to(tl.int64)
        if row >= 0:  # a window query
            q_heads = tl.arange(0, BLOCK_QH)[:, None]
            q_mask = q_heads < num_q_heads
            q = tl.load(query + token * stride_qn + q_heads * stride_qh + dims, mask=q_mask)
            tl.store(q_cache + row * stride_qr + q_heads * stride_qch + dims, q, mask=q_mask)
    # int64 because block_id * stride_cb overflows int32 in caches over 2**31 elements.
    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot < 0:  # a padding token
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    mask = heads < num_kv_heads
    src_k = key + token * stride_kn + heads * stride_kh + dims
    src_v = value + token * stride_vn + heads * stride_vh + dims
    entry = (slot // block_size) * stride_cb + (slot % block_size) * HEAD_DIM
    dst = entry + heads * stride_ch + dims
    tl.store(k_cache + dst, tl.load(src_k, mask=mask), mask=mask)
    tl.store(v_cache + dst, tl.load(src_v, mask=mask), mask=mask)


def store_kv_triton(
    key, value, k_cache, v_cache, slot_mapping, query=None, q_cache=None, query_rows=None
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    _, cache_heads, block_size, cache_dim = k_cache.shape
    assert value.shape == key.shape and v_cache.shape == k_cache.shape
    assert (cache_heads, cache_dim) == (num_kv_heads, head_dim), "key does not match the cache"
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "head_dim must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert key.dtype == k_cache.dtype == value.dtype == v_cache.dtype
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype in (torch.int32, torch.int64)
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    store_queries = query_rows is not None
    if store_queries:
        assert query.shape[0] == num_tokens and query.shape[2] == head_dim
        assert q_cache.shape[1:] == query.shape[1:] and q_cache.dtype == query.dtype
        assert query.stride(-1) == 1 and q_cache.stride(-1) == 1
        assert query_rows.shape == (num_tokens,)
    else:  # unused pointers: the kernel does not read them
        query, q_cache, query_rows = key, k_cache, slot_mapping
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, query, q_cache, query_rows,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        query.stride(0), query.stride(1), q_cache.stride(0), q_cache.stride(1),
        num_kv_heads, query.shape[1], block_size,
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_QH=triton.next_power_of_2(query.shape[1]), STORE_QUERIES=store_queries,
    )  # fmt: skip


def store_kv_ref(
    key, value, k_cache, v_cache, slot_mapping, query=None, q_cache=None, query_rows=None
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, :, offsets] = key[keep]
    v_cache[blocks, :, offsets] = value[keep]
    if query_rows is not None:
        window = query_rows >= 0
        q_cache[query_rows[window]] = query[window]


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query: torch.Tensor | None = None,
    q_cache: torch.Tensor | None = None,
    query_rows: torch.Tensor | None = None,
) -> None:
    """Copy `key`/`value` `[N, num_kv_heads, head_dim]` into the cache at `slot_mapping` `[N]`;
    slots equal to -1 are padding and are skipped. With `query_rows` `[N]`, also copy
    `query` `[N, num_q_heads, head_dim]` into rows of `q_cache` `[rows, num_q_heads, head_dim]`;
    rows equal to -1 (tokens that are not window queries) are skipped."""
    if key.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        store_kv_triton(key, value, k_cache, v_cache, slot_mapping, query, q_cache, query_rows)
    else:
        store_kv_ref(key, value, k_cache, v_cache, slot_mapping, query, q_cache, query_rows)
