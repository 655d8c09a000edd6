"""Attention of one new token per sequence over its paged KV cache (the decode step).

Runs after `rope_store_kv` inside a captured CUDA graph, so the launch may depend only on the
batch and head counts, never on the context lengths.

Split-KV ("flash decoding"): each program attends one (sequence, kv head, split) share of the
context for all query heads of that GQA group at once (one read of K/V serves the whole group),
and writes a partial output with its log-sum-exp; a second kernel merges the splits, if more
than one.
"""

import functools

import torch
import triton
import triton.language as tl

from nanozipage.kernels.prefill_attention import (
    attend_tile,
    check_attention_inputs,
    dependent_launch,
    dependent_start,
    dot_precision,
    prefill_attention_ref,
    uses_triton,
)


@triton.jit
def _decode_split_kernel(
    q, k_cache, v_cache, o_part, lse_part, context_lens, block_tables,
    stride_qb, stride_qh, stride_cb, stride_ch, stride_bt, qk_scale, block_size, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx_len = tl.load(context_lens + seq)
    dependent_start(PDL)  # the length was written before the step; q and the new k, v now are
    # Each split takes an equal share of the context, rounded up to whole tiles; the share is
    # computed here because the grid must not depend on the lengths.
    split_len = tl.cdiv(tl.cdiv(ctx_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx_len)

    # The group's query heads are the rows of one tile, padded to BLOCK_H (tl.dot needs >= 16).
    row = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + row
    dims = tl.arange(0, HEAD_DIM)
    q_ptrs = q + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :]
    q_tile = tl.load(q_ptrs, mask=row[:, None] < GROUP, other=0.0)
    block_table = block_tables + seq * stride_bt
    # Prefill's tile step, its causal mask at the split's last key: it hides the keys past `end`.
    last = tl.zeros([BLOCK_H], tl.int32) + end - 1
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        acc, m_i, l_i = attend_tile(
            acc, m_i, l_i, q_tile, last, k_cache, v_cache, block_table, kv_head * stride_ch,
            tile_start, end, block_size, stride_cb, qk_scale, HEAD_DIM, BLOCK_N, True, PRECISION,
        )  # fmt: skip

    # An empty split (short or zero-length context) has acc = 0, l_i = 0 and m_i = -inf: it
    # stores zeros and lse = -inf, which the merge weighs by exp2(-inf) = 0.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    part = (seq * GROUP * tl.num_programs(1) + heads) * num_splits + split
    o_ptrs = o_part + part[:, None] * HEAD_DIM + dims[None, :]
    tl.store(o_ptrs, acc / l_safe[:, None], mask=row[:, None] < GROUP)
    tl.store(lse_part + part, m_i + tl.log2(l_safe), mask=row < GROUP)


@triton.jit
def _merge_splits_kernel(
    o_part, lse_part, o, num_splits,
    HEAD_DIM: tl.constexpr, SPLITS_POW2: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    dependent_start(PDL)
    row = tl.program_id(0)  # one (sequence, query head)
    splits = tl.arange(0, SPLITS_POW2)
    parts = row * num_splits + splits
    lse = tl.load(lse_part + parts, mask=splits < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # every split empty: write zeros
    weight = tl.exp2(lse - lse_max)
    dims = tl.arange(0, HEAD_DIM)
    o_ptrs = o_part + parts[:, None] * HEAD_DIM + dims[None, :]
    o_split = tl.load(o_ptrs, mask=splits[:, None] < num_splits, other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * o_split, 0) / tl.where(total > 0, total, 1.0)
    tl.store(o + row * HEAD_DIM + dims, out.to(o.dtype.element_ty))


@functools.cache  # called every decode step: look the device up once per batch shape
def default_num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Enough splits for about two programs per SM at any context length (4 off the GPU)."""
    if device.type != "cuda":
        return 4
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * num_sms, batch * num_kv_heads), 64))


def decode_attention(
    q, k_cache, v_cache, context_lens, block_tables, scale, num_splits=None,
    *, block_n=64, num_warps=4, num_stages=3,
):  # fmt: skip
    """Attention of `q` `[B, num_q_heads, head_dim]`, the token at cache index
    `context_lens[b] - 1`, over all `context_lens[b]` cached tokens; rows of length 0 give zeros.
    Returns a new `[B, num_q_heads, head_dim]` tensor. On sm_90 and newer it may start before the
    kernel ahead of it ends and read `context_lens` then: that kernel must not write them."""
    if not uses_triton(q):
        return decode_attention_ref(q, k_cache, v_cache, context_lens, block_tables, scale)
    batch, num_q_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    check_attention_inputs(q, k_cache, v_cache)
    assert context_lens.shape == (batch,) and block_tables.shape[0] == batch
    assert context_lens.dtype == block_tables.dtype == torch.int32
    group = num_q_heads // num_kv_heads
    num_splits = num_splits or default_num_splits(batch, num_kv_heads, q.device)
    o, parts = q.new_empty((batch, num_q_heads, head_dim)), (batch, num_q_heads, num_splits)
    # One split's partial output is the output (rounded as the merge would): no merge launch.
    o_part = o if num_splits == 1 else q.new_empty((*parts, head_dim), dtype=torch.float32)
    lse_part = q.new_empty(parts, dtype=torch.float32)
    if batch == 0:
        return o
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, o_part, lse_part, context_lens, block_tables,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        scale * 1.4426950408889634, block_size, num_splits,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype),
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        num_warps=num_warps, num_stages=num_stages, **dependent_launch(q),
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits_kernel[(batch * num_q_heads,)](
            o_part, lse_part, o, num_splits, **dependent_launch(q),
            HEAD_DIM=head_dim, SPLITS_POW2=triton.next_power_of_2(num_splits),
        )  # fmt: skip
    return o


def decode_attention_ref(q, k_cache, v_cache, context_lens, block_tables, scale):
    """Prefill attention of one query per sequence, its context's last token (length 0: zeros)."""
    cu_seqlens_q = torch.arange(len(q) + 1)
    args = (cu_seqlens_q, context_lens, block_tables, 1, scale)
    return prefill_attention_ref(q, k_cache, v_cache, *args)
