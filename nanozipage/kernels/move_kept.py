"""Move the tokens a compression keeps into the first blocks of the request's new block table.

Called by the compressor for the K and V of a group of layers, after `policy.select`. The new
table may reuse old block ids, even at other positions, so a write can overwrite a source still
to be read: two launches keep it correct, one gathering the kept tokens into a dense temporary,
one writing it out.
"""

import math

import torch
import triton
import triton.language as tl

from nanozipage.kernels.prefill_attention import uses_triton


@triton.jit
def _move_kept_kernel(
    cache, dense, block_table, kept, num_kept, num_kv_heads, block_size,
    stride_cg, stride_cb, stride_ch, stride_kg, stride_kh,
    GATHER: tl.constexpr, ROW: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    tile, head, layer = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    j = tile * BLOCK_T + tl.arange(0, BLOCK_T)  # new slot = position among the kept tokens
    mask = j < num_kept
    if GATHER:  # old cache index kept[j] -> dense[j]
        index = tl.load(kept + layer * stride_kg + head * stride_kh + j, mask=mask, other=0)
    else:  # dense[j] -> new cache index j
        index = j
    block = tl.load(block_table + index // block_size, mask=mask, other=0).to(tl.int64)
    # int64: a group of layers of the cache can pass 2**31 elements.
    token = block * stride_cb + head * stride_ch + (index % block_size) * ROW
    in_cache = layer.to(tl.int64) * stride_cg + token
    in_dense = ((layer * num_kv_heads + head) * num_kept + j).to(tl.int64) * ROW
    cols = tl.arange(0, ROW)[None, :]
    if GATHER:
        src, dst = cache + in_cache[:, None] + cols, dense + in_dense[:, None] + cols
    else:
        src, dst = dense + in_dense[:, None] + cols, cache + in_cache[:, None] + cols
    tl.store(dst, tl.load(src, mask=mask[:, None]), mask=mask[:, None])


def move_kept_triton(cache, old_blocks, new_blocks, kept, *, block_t=64):
    num_layers, _, num_kv_heads, block_size = cache.shape[:4]
    row = math.prod(cache.shape[4:])  # head_dim for K/V, 1 for the scores
    num_kept = kept.shape[-1]
    assert cache.is_contiguous() and kept.stride(-1) == 1
    assert kept.shape == (num_layers, num_kv_heads, num_kept)
    assert row & (row - 1) == 0, "a token's entry must be a power of two long"
    assert num_kept == new_blocks.numel() * block_size, "the kept tokens fill the new blocks"
    assert old_blocks.dim() == new_blocks.dim() == 1 and not kept.is_floating_point()
    assert old_blocks.is_contiguous() and new_blocks.is_contiguous()
    if num_kept == 0:
        return
    dense = cache.new_empty((num_layers, num_kv_heads, num_kept, row))
    grid = (triton.cdiv(num_kept, block_t), num_kv_heads, num_layers)
    for gather, block_table in ((True, old_blocks), (False, new_blocks)):
        _move_kept_kernel[grid](
            cache, dense, block_table, kept, num_kept, num_kv_heads, block_size,
            cache.stride(0), cache.stride(1), cache.stride(2), kept.stride(0), kept.stride(1),
            GATHER=gather, ROW=row, BLOCK_T=block_t,
        )  # fmt: skip


def move_kept_ref(cache, old_blocks, new_blocks, kept):
    block_size = cache.shape[3]
    dense = cache[:, old_blocks.long()].transpose(1, 2).flatten(2, 3)  # [G, kvh, T, *rest]
    index = kept.view(*kept.shape, *[1] * (dense.dim() - 3)).expand(*kept.shape, *dense.shape[3:])
    kept_values = dense.gather(2, index.long()).unflatten(2, (-1, block_size))
    cache[:, new_blocks.long()] = kept_values.transpose(1, 2)


def move_kept(
    cache: torch.Tensor, old_blocks: torch.Tensor, new_blocks: torch.Tensor, kept: torch.Tensor
) -> None:
    """In a group of layers' cache `[G, num_blocks, kv_heads, block_size, *rest]` (rest is
    `(head_dim,)` for K and V; the compressor gathers the kept stored scores itself, from its
    dense scores), write old token `kept[g, h, j]` (an index into the tokens of the `old_blocks`
    table) to slot j of the `new_blocks` table, which may reuse old block ids. Blocks outside
    `new_blocks` keep their contents."""
    (move_kept_triton if uses_triton(cache) else move_kept_ref)(cache, old_blocks, new_blocks, kept)
