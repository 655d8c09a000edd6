"""Scheduler -> here -> `ModelRunner.execute`: one step's inputs as flat host lists (`StepPlan`).

Per token fed: its id, position (index in the request), cache slot (block id * block_size +
offset of its cache index, which trails the position once compressed) and, with compression,
its query-cache row if it is a window query; per request: context length and block table.
"""

from nanozipage.context import StepPlan
from nanozipage.overlap import pending_rows
from nanozipage.sequence import Sequence


def _query_row(seq: Sequence, index: int, last_block: int, window: int) -> int:
    """Row of the query cache for the token at cache index `index`, or -1: window queries are
    the last `window` tokens of a block, and only those of seq's newest block are kept."""
    b = seq.block_size
    if seq.query_slot < 0 or index % b < b - window or index // b != last_block:
        return -1
    return seq.query_slot * window + index % b - (b - window)


def step_plan(seqs: list[Sequence], is_prefill: bool, window: int) -> StepPlan:
    """Each request's next `num_new_tokens` tokens: a prompt chunk, or in a decode step its last
    token, whose cache index trails its position once compressed and which, if PENDING, is read
    on the device from the previous step's samples (`overlap.py`). `window` 0: no window queries."""
    input_ids, positions, slots, context_lens, sample_rows, query_rows = [], [], [], [], [], []
    cu_seqlens_q = [0]
    for seq in seqs:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_new_tokens
        input_ids += seq.token_ids[start:end]
        positions += range(start, end)
        cache_indices = range(start - seq.num_evicted, end - seq.num_evicted)
        b = seq.block_size
        slots += [seq.block_table[i // b] * b + i % b for i in cache_indices]
        if window:
            last_block = cache_indices[-1] // b
            query_rows += [_query_row(seq, i, last_block, window) for i in cache_indices]
        cu_seqlens_q.append(cu_seqlens_q[-1] + end - start)
        context_lens.append(cache_indices.stop)
        if end == len(seq):
            sample_rows.append(cu_seqlens_q[-1] - 1)
    return StepPlan(
        is_prefill, input_ids, positions, slots, context_lens,
        block_tables=[seq.block_table for seq in seqs],
        query_rows=query_rows or None,
        sample_rows=sample_rows if is_prefill else None,
        pending_rows=None if is_prefill else pending_rows(seqs),
        cu_seqlens_q=cu_seqlens_q if is_prefill else None,
        max_seqlen_q=max(seq.num_new_tokens for seq in seqs),
    )  # fmt: skip
