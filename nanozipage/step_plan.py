"""Scheduler -> here -> `ModelRunner.execute`: one step's inputs as flat host lists (`StepPlan`).

Per token fed: its id, position (index in the request), KV slot (block id * block_size + offset
of its cache index, which trails the position once compressed) and, with compression, its
query-cache row if it is a window query; per request: context length and block table.
"""

from dataclasses import dataclass

from nanozipage.overlap import pending_rows
from nanozipage.sequence import Sequence


@dataclass(slots=True)
class StepPlan:
    """One step as flat host lists, each rank's Context built from them; what rank 0 sends."""

    is_prefill: bool
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]  # unpadded
    query_rows: list[int] | None
    sample_rows: list[int] | None = None  # rows whose logits are sampled; None: all (decode)
    # Decode, overlapped loop: per request, its row in the samples of the step launched before
    # when its input id is PENDING there, else -1; None when no input id is PENDING.
    pending_rows: list[int] | None = None
    cu_seqlens_q: list[int] | None = None  # prefill only
    max_seqlen_q: int = 0  # prefill only


def _slot(seq: Sequence, index: int) -> int:
    b = seq.block_size
    return seq.block_table[index // b] * b + index % b


def _query_row(seq: Sequence, index: int, last_block: int, window: int) -> int:
    """Row of the query cache for the token at cache index `index`, or -1: window queries are
    the last `window` tokens of a block, and only those of seq's newest block are kept."""
    b = seq.block_size
    if seq.query_slot < 0 or index % b < b - window or index // b != last_block:
        return -1
    return seq.query_slot * window + index % b - (b - window)


def prefill_plan(seqs: list[Sequence], window: int | None) -> StepPlan:
    """The next chunk of each prompt; `window` None when no window queries are stored."""
    input_ids, positions, slots, context_lens, sample_rows, query_rows = [], [], [], [], [], []
    cu_seqlens_q = [0]
    for seq in seqs:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_new_tokens
        input_ids += seq.token_ids[start:end]
        positions += range(start, end)
        slots += [_slot(seq, i) for i in range(start, end)]
        if window:
            last_block = (end - 1) // seq.block_size
            query_rows += [_query_row(seq, i, last_block, window) for i in range(start, end)]
        cu_seqlens_q.append(cu_seqlens_q[-1] + end - start)
        context_lens.append(end)
        if seq.samples_this_step:
            sample_rows.append(cu_seqlens_q[-1] - 1)
    return StepPlan(
        True,
        input_ids,
        positions,
        slots,
        context_lens,
        block_tables=[seq.block_table for seq in seqs],
        query_rows=query_rows or None,
        sample_rows=sample_rows,
        cu_seqlens_q=cu_seqlens_q,
        max_seqlen_q=max(seq.num_new_tokens for seq in seqs),
    )


def decode_plan(seqs: list[Sequence], window: int | None) -> StepPlan:
    """Each request's last token, at position len - 1 but cache index cache_len - 1; a PENDING
    one is read on the device from the previous step's samples (`overlap.py`)."""
    index = [seq.cache_len - 1 for seq in seqs]
    query_rows = None
    if window:
        query_rows = [_query_row(s, i, i // s.block_size, window) for s, i in zip(seqs, index)]
    return StepPlan(
        False,
        input_ids=[seq.last_token for seq in seqs],
        positions=[len(seq) - 1 for seq in seqs],
        slot_mapping=[_slot(seq, i) for seq, i in zip(seqs, index)],
        context_lens=[i + 1 for i in index],
        block_tables=[seq.block_table for seq in seqs],
        query_rows=query_rows,
        pending_rows=pending_rows(seqs),
    )
