"""KV blocks and the prefix cache: pure bookkeeping over block ids, no tensors.

Called by the scheduler. Prefix caching: each computed full block gets a hash chained on the
previous block's; a later prompt with the same leading tokens reuses those blocks after
comparing token ids. A freed block keeps its hash and contents until handed out again.
Blocks are handed out never-used first, then freed ones, oldest first.
"""

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import xxhash

from nanozipage.sequence import Sequence


def chained_hash(token_ids: list[int], prefix_hash: int = -1) -> int:
    h = xxhash.xxh64()
    if prefix_hash != -1:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(np.array(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = -1  # -1: not in the prefix cache
    token_ids: list[int] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size, self.num_blocks = block_size, num_blocks
        # A block is made when first handed out: a tiny model on a large GPU has tens of
        # millions of blocks, seconds of Python objects to make at start.
        self.blocks: dict[int, Block] = {}  # ids 0, 1, ... in the order first handed out
        self.hash_to_block_id: dict[int, int] = {}
        self.free_block_ids: deque[int] = deque()  # freed blocks, oldest first

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids) + self.num_blocks - len(self.blocks)

    def _uncache(self, block: Block):
        """Take block out of the prefix cache: its contents are about to be overwritten."""
        if self.hash_to_block_id.get(block.hash) == block.block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids = -1, []

    def _take_free_block(self) -> int:
        if len(self.blocks) < self.num_blocks:
            block = self.blocks[len(self.blocks)] = Block(len(self.blocks))
        else:
            block = self.blocks[self.free_block_ids.popleft()]
        self._uncache(block)
        block.ref_count = 1
        return block.block_id

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the prefix cache that hold seq's leading tokens, confirmed by token ids;
        only those before seq's last token, which is always fed to the model for its logits."""
        hits, prefix_hash = [], -1
        # Resuming at a compression: the block before it is recomputed, for its window queries
        for i in range((len(seq) - 1) // self.block_size - seq.needs_compression):
            token_ids = seq.block(i)
            prefix_hash = chained_hash(token_ids, prefix_hash)
            block_id = self.hash_to_block_id.get(prefix_hash, -1)
            if block_id == -1 or self.blocks[block_id].token_ids != token_ids:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence) -> bool:
        """Give seq blocks for its tokens, reusing prefix-cache hits; False if too few are free."""
        assert not seq.block_table
        hits = self._cached_prefix(seq)
        num_reused_free = sum(self.blocks[b].ref_count == 0 for b in hits)
        if seq.num_blocks - len(hits) + num_reused_free > self.num_free_blocks:
            return False
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free_block_ids.remove(block_id)
            block.ref_count += 1
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_cached_tokens < 0:  # first scheduled: a recompute's hits are its own tokens
            seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        seq.num_hashed_blocks, seq.block_table = len(hits), hits
        self.append_blocks(seq)
        return True

    def _release(self, block_id: int):
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_block_ids.append(block_id)

    def deallocate(self, seq: Sequence):
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_hashed_blocks = 0

    def recount(self, block_tables: list[list[int]]):
        """After a failed step: references counted again from the tables in use, so that a Ctrl-C
        halfway through any bookkeeping here leaks no block and frees none twice."""
        counts = Counter(block_id for table in block_tables for block_id in table)
        for block in self.blocks.values():
            block.ref_count = counts[block.block_id]
        order = dict.fromkeys([*self.free_block_ids, *self.blocks])  # each once
        self.free_block_ids = deque(block_id for block_id in order if not counts[block_id])

    def num_missing_blocks(self, seq: Sequence) -> int:
        """Blocks seq still needs to hold all its tokens (the next decode step writes the last)."""
        return seq.num_blocks - len(seq.block_table)

    def append_blocks(self, seq: Sequence):
        seq.block_table += [self._take_free_block() for _ in range(self.num_missing_blocks(seq))]

    def plan_compression(self, seq: Sequence, compression):
        """Fill the compression's tables (docs/DESIGN.md sections 2, 4): new block i is old block
        i if private, else fresh (a shared one is never written; the caller checks
        `num_fresh_blocks`), so `move_kept` works in place. Each is recorded as taken: cancelled
        at any point, it gives back exactly what it took."""
        filled = (seq.cache_len - 1) // self.block_size
        while len(seq.block_table) > filled:  # a block given for a prompt's last token, unwritten
            self._release(seq.block_table.pop())
        compression.old_table = list(seq.block_table)
        for block_id in self._new_table(seq):
            if block_id == -1:
                block_id = self._take_free_block()
            compression.new_table.append(block_id)
            self._uncache(self.blocks[block_id])  # about to be overwritten

    def finish_compression(self, seq: Sequence, compression):
        """The kept tokens sit in the new blocks: seq switches to them, its other blocks go."""
        old_table, seq.block_table = seq.block_table, compression.new_table
        for block_id in old_table:
            if block_id not in seq.block_table:
                self._release(block_id)

    def cancel_compression(self, seq: Sequence, compression):
        """A planned compression that never ran: give back the fresh blocks it took."""
        for block_id in compression.new_table:
            if block_id not in seq.block_table:
                self._release(block_id)

    def _new_table(self, seq: Sequence) -> list[int]:
        """seq's own private blocks where it can keep them, -1 where a fresh block is needed."""
        private = [b for b in seq.block_table if self.blocks[b].ref_count == 1]
        kept = seq.block_table[: seq.max_blocks - 1]
        spare = next((b for b in private if b not in kept), -1)  # the last, left for new tokens
        return [b if b in private else -1 for b in kept] + [spare]

    def num_fresh_blocks(self, seq: Sequence) -> int:  # free blocks its compression takes
        return self._new_table(seq).count(-1)

    def hash_blocks(self, seq: Sequence):
        """Register seq's newly computed full blocks (not once compressed: no plain prefix then)."""
        if seq.num_compressions or seq.compression:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(seq.num_hashed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            prefix_hash = self.blocks[seq.block_table[i - 1]].hash if i > 0 else -1
            block.token_ids = seq.block(i)
            block.hash = chained_hash(block.token_ids, prefix_hash)
            self.hash_to_block_id[block.hash] = block.block_id
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)
