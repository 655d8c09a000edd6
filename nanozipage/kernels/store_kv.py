"""Write each new token's key and value into the paged KV cache.

Data flow: the attention layer projects q/k/v for the tokens of this step, calls `store_kv` with
the model runner's `slot_mapping`, and only then runs prefill or decode attention, which read
every key and value (new and cached alike) back through the block table.

Cache layout, per layer: `[num_blocks, num_kv_heads, block_size, head_dim]`; the token in
`slot = block_id * block_size + offset` lives at `cache[block_id, :, offset, :]`.
"""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key, value, k_cache, v_cache, slot_mapping,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_cb, stride_ch,
    num_kv_heads, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    # int64 because block_id * stride_cb overflows int32 in caches over 2**31 elements.
    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot < 0:  # a padding token
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    mask = heads < num_kv_heads
    src_k = key + token * stride_kn + heads * stride_kh + dims
    src_v = value + token * stride_vn + heads * stride_vh + dims
    row = (slot // block_size) * stride_cb + (slot % block_size) * HEAD_DIM
    dst = row + heads * stride_ch + dims
    tl.store(k_cache + dst, tl.load(src_k, mask=mask), mask=mask)
    tl.store(v_cache + dst, tl.load(src_v, mask=mask), mask=mask)


def store_kv_triton(key, value, k_cache, v_cache, slot_mapping) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    _, cache_heads, block_size, cache_dim = k_cache.shape
    assert value.shape == key.shape and v_cache.shape == k_cache.shape
    assert (cache_heads, cache_dim) == (num_kv_heads, head_dim), "key does not match the cache"
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "head_dim must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert key.dtype == k_cache.dtype == value.dtype == v_cache.dtype
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype in (torch.int32, torch.int64)
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        num_kv_heads, block_size,
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
    )  # fmt: skip


def store_kv_ref(key, value, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, :, offsets] = key[keep]
    v_cache[blocks, :, offsets] = value[keep]


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Copy `key`/`value` `[N, num_kv_heads, head_dim]` into the cache at `slot_mapping` `[N]`;
    slots equal to -1 are padding and are skipped."""
    if key.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(key, value, k_cache, v_cache, slot_mapping)
