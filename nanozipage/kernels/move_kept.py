"""Move the tokens a compression keeps into the first blocks of the request's new block table.

Called by the compressor for a group of layers after `policy.select`: K, V and the scores to
store, in one launch. The move is in place. New block i is old block i or a block outside the
old table (`BlockManager.plan_compression`), and the kept tokens are in position order, so slot
j receives old token kept[j] >= j. One program per (K or V, layer, KV head) walks its tokens in
order, a tile at a time, with a barrier between a tile's loads and its stores: a tile reads no
slot that an earlier tile wrote (its tokens are at or past its own slots), and a token read
inside the tile is read before any of the tile's stores.
"""

import triton
import triton.language as tl

from nanozipage.kernels.prefill_attention import gather_tokens, uses_triton


@triton.jit
def _move_kept_kernel(
    kv_cache, score_cache, scores, old_table, new_table, kept, num_kept, block_size,
    stride_kv, stride_cg, stride_cb, stride_ch, stride_sg, stride_sb, stride_sh,
    stride_pg, stride_ph, stride_kg, stride_kh,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    head, layer, which = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # which: K 0, V 1
    # int64: a group of layers of the cache can pass 2**31 elements.
    cache = kv_cache + which.to(tl.int64) * stride_kv + layer.to(tl.int64) * stride_cg
    cache += head * stride_ch
    kept_row = kept + layer * stride_kg + head * stride_kh
    cols = tl.arange(0, HEAD_DIM)[None, :]
    for start in range(0, num_kept, BLOCK_T):
        j = start + tl.arange(0, BLOCK_T)  # new slot = position among the kept tokens
        mask = j < num_kept
        index = tl.load(kept_row + j, mask=mask, other=0)  # its old cache index
        src_block = tl.load(old_table + index // block_size, mask=mask, other=0).to(tl.int64)
        dst_block = tl.load(new_table + j // block_size, mask=mask, other=0).to(tl.int64)
        src = src_block * stride_cb + (index % block_size) * HEAD_DIM
        dst = dst_block * stride_cb + (j % block_size) * HEAD_DIM
        rows = tl.load(cache + src[:, None] + cols, mask=mask[:, None])
        tl.debug_barrier()  # every token of the tile read before any is overwritten
        tl.store(cache + dst[:, None] + cols, rows, mask=mask[:, None])
        if which == 0:  # the scores to store come from a dense tensor: no overlap
            score = tl.load(scores + layer * stride_pg + head * stride_ph + index, mask=mask)
            out = layer.to(tl.int64) * stride_sg + dst_block * stride_sb + head * stride_sh
            out += j % block_size
            tl.store(score_cache + out, score, mask=mask)


def move_kept(kv_cache, score_cache, scores, old_table, new_table, kept, *, block_t=64):
    """In a group of layers' K and V `kv_cache [2, G, num_blocks, kv_heads, block_size, head_dim]`,
    write old token `kept[g, h, j]` (an index into the tokens of `old_table`, increasing in j) to
    slot j of `new_table`, whose block i is old block i or a block outside the old table; and
    write `scores[g, h, kept[g, h, j]]` (dense `[G, kv_heads, T]`) to the same slot of
    `score_cache [G, num_blocks, kv_heads, block_size]`. Other blocks keep their contents."""
    if not uses_triton(kv_cache):
        return move_kept_ref(kv_cache, score_cache, scores, old_table, new_table, kept)
    _, num_layers, _, num_kv_heads, block_size, head_dim = kv_cache.shape
    num_kept = kept.shape[-1]
    assert kv_cache.stride(-1) == 1 and kv_cache.stride(-2) == head_dim
    assert score_cache.stride(-1) == 1 and scores.stride(-1) == 1 and kept.stride(-1) == 1
    assert score_cache.shape == kv_cache.shape[1:-1] and scores.dtype == score_cache.dtype
    assert kept.shape == (num_layers, num_kv_heads, num_kept) and not kept.is_floating_point()
    assert head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    assert num_kept == new_table.numel() * block_size, "the kept tokens fill the new blocks"
    assert old_table.is_contiguous() and new_table.is_contiguous()
    if num_kept == 0:
        return
    _move_kept_kernel[(num_kv_heads, num_layers, 2)](
        kv_cache, score_cache, scores, old_table, new_table, kept, num_kept, block_size,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        *score_cache.stride()[:3], scores.stride(0), scores.stride(1),
        kept.stride(0), kept.stride(1), HEAD_DIM=head_dim, BLOCK_T=block_t,
        num_stages=1,  # no pipelining: an asynchronous copy would not be ordered by the barrier
    )  # fmt: skip


def move_kept_ref(kv_cache, score_cache, scores, old_table, new_table, kept):
    def move(cache, dense):  # dense [G, kvh, T, *rest] -> the kept ones into new_table's blocks
        index = kept.long().view(*kept.shape, *[1] * (dense.dim() - 3))
        kept_values = dense.take_along_dim(index, 2).unflatten(2, (-1, cache.shape[3]))
        cache[:, new_table.long()] = kept_values.transpose(1, 2)

    for cache in kv_cache:  # K, then V
        move(cache, gather_tokens(cache, old_table))
    move(score_cache, scores)
