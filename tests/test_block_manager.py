"""Block manager and scheduler bookkeeping: ref counts, prefix hashes, preemption, no leaks."""

import time

from nanozipage.block_manager import BlockManager
from nanozipage.sampling_params import SamplingParams
from nanozipage.sequence import Sequence

BS = 4


def seq_of(tokens: list[int]) -> Sequence:
    return Sequence(tokens, SamplingParams(), BS)


def compute_all(bm: BlockManager, seq: Sequence):
    """What a finished prefill does: every token's K/V is cached, full blocks get hashed."""
    seq.num_computed_tokens = len(seq)
    bm.hash_blocks(seq)


def test_shared_prefix_is_reused_with_ref_counts():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = seq_of(list(range(10)))  # blocks [0..3] [4..7] [8, 9]
    bm.allocate(a)
    compute_all(bm, a)
    b = seq_of(list(range(8)) + [42, 43, 44])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8
    assert b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.deallocate(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    bm.deallocate(b)
    assert bm.num_free_blocks == 10


def test_freed_blocks_keep_their_hash_until_reused():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = seq_of(list(range(9)))
    bm.allocate(a)
    compute_all(bm, a)
    first_two = a.block_table[:2]
    bm.deallocate(a)
    b = seq_of(list(range(9)))
    bm.allocate(b)  # same prompt after its twin finished: still a hit
    assert b.block_table[:2] == first_two and b.num_cached_tokens == 8
    bm.deallocate(b)
    c = seq_of([7] * 12)  # needs all 3 blocks: the cached ones are overwritten
    bm.allocate(c)
    compute_all(bm, c)
    bm.deallocate(c)
    d = seq_of(list(range(9)))
    bm.allocate(d)
    assert d.num_cached_tokens == 0


def test_hit_needs_equal_tokens_not_just_equal_hash():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = seq_of(list(range(9)))
    bm.allocate(a)
    compute_all(bm, a)
    bm.blocks[a.block_table[0]].token_ids = [9, 9, 9, 9]  # as if another prompt hashed the same
    b = seq_of(list(range(9)))
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_last_token_is_never_served_from_the_cache():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = seq_of(list(range(8)))
    bm.allocate(a)
    compute_all(bm, a)
    b = seq_of(list(range(8)))  # both blocks cached, but the last token must be recomputed
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and b.block_table[1] != a.block_table[1]


def test_allocate_counts_free_blocks_that_a_hit_revives_and_gives_none_when_short():
    bm = BlockManager(num_blocks=2, block_size=BS)
    a = seq_of(list(range(5)))
    bm.allocate(a)
    compute_all(bm, a)
    bm.deallocate(a)
    too_long = seq_of(list(range(9)))
    assert not bm.allocate(too_long)
    assert too_long.block_table == [] and bm.num_free_blocks == 2
    assert bm.allocate(seq_of(list(range(5))))


def test_a_huge_pool_starts_at_once_and_hands_out_unused_blocks_then_the_oldest_freed():
    start = time.perf_counter()
    bm = BlockManager(num_blocks=10**7, block_size=BS)  # a tiny model on a large GPU
    assert time.perf_counter() - start < 0.1 and bm.num_free_blocks == 10**7
    a, b = seq_of(list(range(8))), seq_of(list(range(100, 104)))
    bm.allocate(a)
    bm.allocate(b)
    assert a.block_table == [0, 1] and b.block_table == [2]
    bm.deallocate(b)
    bm.deallocate(a)  # freed last to first: 2, then 1, 0
    bm.recount([])
    assert list(bm.free_block_ids) == [2, 1, 0] and bm.num_free_blocks == 10**7
    c = seq_of(list(range(200, 208)))
    bm.allocate(c)
    assert c.block_table == [3, 4]  # never used first, which keeps the freed blocks' prefixes

    small = BlockManager(num_blocks=3, block_size=BS)
    a, b, c = seq_of(list(range(8))), seq_of([7, 7, 7]), seq_of(list(range(300, 308)))
    small.allocate(a)
    small.allocate(b)
    small.deallocate(b)
    small.deallocate(a)
    small.allocate(c)
    assert c.block_table == [2, 1]  # every block used once: the oldest freed first
