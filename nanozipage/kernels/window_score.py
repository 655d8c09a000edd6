"""Attention of the observation window over a request's cache: the attention score of a policy.

Called by the policy on a group of layers (docs/DESIGN.md section 2, step 1), reading the keys
in place through the request's block table. One program per (layer, KV head), two passes over
its keys: pass 1 finds each row's softmax maximum and sum, pass 2 takes probabilities, the max
over the group and the mean over the window, per key. A tile's rows are all window queries of
the GQA group's query heads (padded to >= 16 for tl.dot): row r is window query r // GROUP_P2
of head r % GROUP_P2. A key tile inside one block (ONE_BLOCK) loads that block's id once.
"""

import torch
import triton
import triton.language as tl

from nanozipage.kernels.prefill_attention import dot_precision, gather_tokens, uses_triton


@triton.jit
def _window_logits(
    q, k_ptrs, block_table, start, num_tokens, query_pos, qk_scale, block_size, stride_kb,
    stride_kt, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):  # fmt: skip
    """Scores of every row against keys [start, start + BLOCK_N), in log2 units (qk_scale
    folds in log2(e)); keys past the cache or after a row's window query are -inf."""
    k_pos = start + tl.arange(0, BLOCK_N)
    in_cache = k_pos < num_tokens
    if ONE_BLOCK:
        block = tl.load(block_table + start // block_size).to(tl.int64)
    else:
        block = tl.load(block_table + k_pos // block_size, mask=in_cache, other=0).to(tl.int64)
    rows = block * stride_kb + (k_pos % block_size) * stride_kt  # int64: a pool passes 2**31
    offsets = rows[:, None] + tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(k_ptrs + offsets, mask=in_cache[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    visible = in_cache[None, :] & (k_pos[None, :] <= query_pos[:, None])
    return tl.where(visible, s, float("-inf")), k_pos, in_cache


@triton.jit
def _window_score_kernel(
    queries, k_cache, block_table, out, num_tokens, window, qk_scale, block_size,
    stride_qg, stride_qw, stride_qh, stride_kg, stride_kb, stride_kh, stride_kt,
    stride_og, stride_oh,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, WINDOW_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ONE_BLOCK: tl.constexpr,
):  # fmt: skip
    kv_head, layer = tl.program_id(0), tl.program_id(1)
    row = tl.arange(0, WINDOW_P2 * GROUP_P2)
    query, member = row // GROUP_P2, row % GROUP_P2
    real = (query < window) & (member < GROUP)
    head = kv_head * GROUP + member
    q_ptrs = queries + layer * stride_qg + query[:, None] * stride_qw + head[:, None] * stride_qh
    q = tl.load(q_ptrs + tl.arange(0, HEAD_DIM)[None, :], mask=real[:, None], other=0.0)
    # Window query i is the token at cache index T - window + i. Padding rows (zero queries,
    # later positions) see every key, so their softmax stays finite; pass 2 drops them.
    query_pos = num_tokens - window + query
    k_ptrs = k_cache + layer.to(tl.int64) * stride_kg + kv_head * stride_kh

    m_i = tl.full([WINDOW_P2 * GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([WINDOW_P2 * GROUP_P2], tl.float32)
    for start in range(0, num_tokens, BLOCK_N):
        s, _, _ = _window_logits(
            q, k_ptrs, block_table, start, num_tokens, query_pos, qk_scale, block_size,
            stride_kb, stride_kt, HEAD_DIM, BLOCK_N, PRECISION, ONE_BLOCK,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is in the first tile of every row
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new

    lse = m_i + tl.log2(l_i)
    out_ptrs = out + layer * stride_og + kv_head * stride_oh
    for start in range(0, num_tokens, BLOCK_N):
        s, k_pos, in_cache = _window_logits(
            q, k_ptrs, block_table, start, num_tokens, query_pos, qk_scale, block_size,
            stride_kb, stride_kt, HEAD_DIM, BLOCK_N, PRECISION, ONE_BLOCK,
        )  # fmt: skip
        p = tl.where(real[:, None], tl.exp2(s - lse[:, None]), 0.0)
        p = tl.reshape(p, [WINDOW_P2, GROUP_P2, BLOCK_N])
        score = tl.sum(tl.max(p, 1), 0) / window  # probabilities are >= 0: padding's 0 is neutral
        tl.store(out_ptrs + k_pos, score, mask=in_cache)


def window_scores(k_cache, block_table, queries, *, block_n=128, num_warps=4, num_stages=2):
    """For a group of layers' keys `[G, num_blocks, kv_heads, block_size, head_dim]`, a request's
    `block_table` (its T cached tokens, in order) and its last `window` tokens' queries
    `[G, window, q_heads, head_dim]`: each query's softmax over the request's keys (causal inside
    the window), max over the query heads of each KV head's group, mean over the window.
    Returns a new float32 `[G, kv_heads, T]` tensor."""
    if not uses_triton(k_cache):
        return window_scores_ref(k_cache, block_table, queries)
    num_layers, _, num_kv_heads, block_size, head_dim = k_cache.shape
    _, window, num_q_heads, _ = queries.shape
    num_tokens = block_table.numel() * block_size
    assert queries.shape == (num_layers, window, num_q_heads, head_dim)
    assert k_cache.stride(-1) == 1 and queries.stride(-1) == 1, "head_dim must be contiguous"
    assert k_cache.dtype == queries.dtype and block_table.dim() == 1
    assert block_table.is_contiguous() and not block_table.is_floating_point()
    assert num_q_heads % num_kv_heads == 0, "query heads must split evenly over kv heads"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    assert 1 <= window <= num_tokens, "the window queries are the last cached tokens"
    group = num_q_heads // num_kv_heads
    out = k_cache.new_empty((num_layers, num_kv_heads, num_tokens), dtype=torch.float32)
    group_p2 = triton.next_power_of_2(group)
    # tl.dot needs at least 16 rows: a small window x group tile gets extra (padding) queries.
    window_p2 = max(triton.next_power_of_2(window), 16 // min(group_p2, 16))
    _window_score_kernel[(num_kv_heads, num_layers)](
        queries, k_cache, block_table, out, num_tokens, window, head_dim**-0.5 * 1.4426950408889634,
        block_size, queries.stride(0), queries.stride(1), queries.stride(2),
        *k_cache.stride()[:4], out.stride(0), out.stride(1),
        GROUP=group, GROUP_P2=group_p2, WINDOW_P2=window_p2, HEAD_DIM=head_dim,
        BLOCK_N=block_n, PRECISION=dot_precision(k_cache.dtype),
        ONE_BLOCK=block_size % block_n == 0, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def window_scores_ref(k_cache, block_table, queries):
    keys = gather_tokens(k_cache, block_table)
    num_kv_heads, num_tokens, head_dim = keys.shape[-3:]
    window = queries.shape[-3]
    q = queries.float().transpose(-3, -2).unflatten(-3, (num_kv_heads, -1))  # [..., kvh, g, w, d]
    logits = q @ keys.float().unsqueeze(-3).transpose(-1, -2) * head_dim**-0.5
    query_pos = torch.arange(num_tokens - window, num_tokens, device=keys.device)
    future = torch.arange(num_tokens, device=keys.device) > query_pos[:, None]
    probs = logits.masked_fill(future, float("-inf")).softmax(-1)  # [..., kvh, g, w, T]
    return probs.amax(-3).mean(-2)
