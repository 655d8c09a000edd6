"""Per-token redundancy sums of R-KV "lightning": how much each key repeats the keys of its block.

The policy's redundancy score (docs/DESIGN.md section 2, step 4) is softmax(sums / (tau * b)).

One program per (layer, KV head, block), reading the block in place through the request's block
table. The similarity of the block's keys with each other is b x b, computed once, one tile of
rows (m) at a time against all b columns (n). Each column's sum over the rows (the similarity is
symmetric, so that is its row's sum) and its newest near-duplicate (the largest row m != n with
sim(m, n) > 0.5), with its similarity, are kept per row slot of the tile and reduced once at the
end, where the near-duplicates' similarities are subtracted.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nanozipage.kernels.prefill_attention import dot_precision, gather_tokens, uses_triton


@triton.jit
def _redundancy_kernel(
    k_cache, block_table, out, block_size, stride_kg, stride_kb, stride_kh, stride_kt,
    stride_og, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    block, kv_head, layer = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    block_id = tl.load(block_table + block).to(tl.int64)  # int64: a pool passes 2**31 elements
    block_keys = k_cache + layer.to(tl.int64) * stride_kg + block_id * stride_kb
    block_keys += kv_head * stride_kh
    # Padding columns (b < BLOCK_B) and rows load as zero keys: their similarity is 0, which
    # neither adds to a sum nor passes the 0.5 threshold.
    cols = tl.arange(0, BLOCK_B)
    offsets = cols[:, None] * stride_kt + tl.arange(0, HEAD_DIM)[None, :]
    k_cols = tl.load(block_keys + offsets, mask=cols[:, None] < block_size, other=0.0)
    col_norm = tl.sqrt(tl.sum(k_cols.to(tl.float32) * k_cols.to(tl.float32), 1))
    col_inv_norm = 1.0 / tl.maximum(col_norm, 1e-12)

    # Per (row slot, column) of a tile, accumulated over the tiles and reduced once at the end:
    # the similarity sums and, rows growing tile by tile, the newest near-duplicate and its sim.
    sums = tl.zeros([BLOCK_M, BLOCK_B], tl.float32)
    newest = tl.full([BLOCK_M, BLOCK_B], -1, tl.int32)
    newest_sim = tl.zeros([BLOCK_M, BLOCK_B], tl.float32)
    for start in range(0, block_size, BLOCK_M):
        # The cosine similarity of this tile's rows with every column, 0 on the diagonal. Dot
        # the keys as stored and divide by the norms after: normalising first would round the
        # unit vectors to bf16 before the product.
        rows = start + tl.arange(0, BLOCK_M)
        row_offsets = rows[:, None] * stride_kt + tl.arange(0, HEAD_DIM)[None, :]
        k_rows = tl.load(block_keys + row_offsets, mask=rows[:, None] < block_size, other=0.0)
        norm = tl.sqrt(tl.sum(k_rows.to(tl.float32) * k_rows.to(tl.float32), 1))
        row_inv_norm = 1.0 / tl.maximum(norm, 1e-12)
        dots = tl.dot(k_rows, tl.trans(k_cols), input_precision=PRECISION)
        sim = dots * row_inv_norm[:, None] * col_inv_norm[None, :]
        sim = tl.where(rows[:, None] == cols[None, :], 0.0, sim)
        sums += sim  # the similarity is symmetric: column n's sum is row n's
        newest = tl.where(sim > 0.5, rows[:, None], newest)
        newest_sim = tl.where(sim > 0.5, sim, newest_sim)
    col_newest = tl.max(newest, 0)  # -1 (no duplicate) matches no slot and spares nothing
    col_sim = tl.sum(tl.where(newest == col_newest[None, :], newest_sim, 0.0), 0)
    spared = tl.sum(tl.where(cols[:, None] == col_newest[None, :], col_sim[None, :], 0.0), 1)
    out_ptrs = out + layer * stride_og + kv_head * stride_oh + block * block_size  # its tokens
    tl.store(out_ptrs + cols, tl.sum(sums, 0) - spared, mask=cols < block_size)


def redundancy_sums(k_cache, block_table, *, block_m=16, num_warps=4, num_stages=1):
    """For a group of layers' keys `[G, num_blocks, kv_heads, block_size, head_dim]` and a
    request's `block_table` (its T cached tokens, in order): per token m, the sum of its cosine
    similarities with the other keys n of its block, without sim(m, n) where m is n's newest
    near-duplicate (the largest slot with sim > 0.5); float32 `[G, kv_heads, T]`."""
    if not uses_triton(k_cache):
        return redundancy_sums_ref(k_cache, block_table)
    num_layers, _, num_kv_heads, block_size, head_dim = k_cache.shape
    num_tokens = block_table.numel() * block_size
    assert k_cache.stride(-1) == 1, "head_dim must be contiguous"
    assert block_table.dim() == 1 and not block_table.is_floating_point()
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    out = k_cache.new_empty((num_layers, num_kv_heads, num_tokens), dtype=torch.float32)
    block_b = max(16, triton.next_power_of_2(block_size))  # tl.dot needs >= 16 columns
    # 16 rows, 4 warps and 1 stage: the fastest tiles tried (BENCHMARKS.md).
    _redundancy_kernel[(block_table.numel(), num_kv_heads, num_layers)](
        k_cache, block_table, out, block_size, *k_cache.stride()[:4], out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_B=block_b, BLOCK_M=min(block_m, block_b),
        PRECISION=dot_precision(k_cache.dtype), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def redundancy_sums_ref(k_cache, block_table):
    b = k_cache.shape[3]
    keys = F.normalize(gather_tokens(k_cache, block_table).float(), dim=-1)
    keys = keys.unflatten(-2, (-1, b))  # [..., N, b, d]
    sim = keys @ keys.transpose(-1, -2) * (1 - torch.eye(b, device=keys.device))  # [.., m, n]
    slot = torch.arange(b, device=keys.device)
    newest = torch.where(sim > 0.5, slot[:, None], -1).amax(-2)  # per n: largest such m
    spared = slot[:, None] == newest.unsqueeze(-2)
    return sim.masked_fill(spared, 0).sum(-1).flatten(-2)
