"""The compression kernels against their PyTorch references, which define the policy's math.

Like test_kernels.py: on a GPU the kernels run compiled, in bfloat16 too and on larger shapes;
on CPU they run under Triton's interpreter in a child process, on small shapes with 16-token
tiles. Every buffer a wrapper allocates starts as NaN, so an unwritten output fails.
"""

import pytest
import torch
import torch.nn.functional as F
from interpreter import (
    DEVICE,
    DTYPES,
    HEAD_DIMS,
    ON_GPU,
    cases,
    child_run,
    nan_poisoned_empty,  # noqa: F401 (an autouse fixture)
    runs_kernels,
)

from nanozipage.kernels.move_kept import move_kept, move_kept_ref
from nanozipage.kernels.prefill_attention import gather_tokens
from nanozipage.kernels.redundancy import redundancy_sums, redundancy_sums_ref
from nanozipage.kernels.window_score import window_scores, window_scores_ref

NUM_BLOCKS = 40 if ON_GPU else 3  # cached blocks per request
WINDOW_TILES = {} if ON_GPU else {"block_n": 16}
REDUNDANCY_TILES = {} if ON_GPU else {"block_m": 16}
MOVE_KEPT_TILES = {} if ON_GPU else {"block_t": 16}
# Kernel and reference both sum exact products of the same inputs in float32 (dot_precision keeps
# float32 dots out of tf32): they differ only in the order of the sums.
TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}

test_compression_kernels_under_the_triton_interpreter = child_run(__file__)


def in_pages(keys, block_size):
    """Dense keys `[G, kv_heads, T, head_dim]` scattered over a pool of blocks, in shuffled order
    among spare random blocks: (the pool `[G, num_blocks, kv_heads, block_size, head_dim]`, the
    block table)."""
    num_blocks = keys.shape[2] // block_size
    table = torch.randperm(num_blocks + 3, device=keys.device)[:num_blocks]
    pool = torch.randn(keys.shape[0], num_blocks + 3, *keys.shape[1:2], block_size, keys.shape[3])
    pool = pool.to(keys.device, keys.dtype)
    pool[:, table] = keys.unflatten(2, (-1, block_size)).transpose(1, 2)
    return pool, table.to(torch.int32)


def assert_close(out, ref, dtype):
    assert out.dtype == torch.float32 and not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


@runs_kernels
@pytest.mark.parametrize(
    "dtype, head_dim, block_size, group, window",
    cases(DTYPES, HEAD_DIMS, [8, 16, 32] + ([256] if ON_GPU else []), [1, 2, 3], [1, 4, 16]),
)
def test_window_scores_match_reference(dtype, head_dim, block_size, group, window):
    num_layers, num_kv_heads, num_tokens = 2, 2, NUM_BLOCKS * block_size
    keys = torch.randn(num_layers, num_kv_heads, num_tokens, head_dim, device=DEVICE).to(dtype)
    # The engine reads the window queries out of its query cache: a view strided over the slots.
    q_cache = torch.randn(num_layers, 3 * window, group * num_kv_heads, head_dim, device=DEVICE)
    queries = q_cache.to(dtype)[:, window : 2 * window]
    pool, table = in_pages(keys, block_size)

    out = window_scores(pool, table, queries, **WINDOW_TILES)

    assert_close(out, window_scores_ref(pool, table, queries), dtype)
    assert torch.equal(gather_tokens(pool, table), keys)


def test_references_match_a_loop_over_tokens():
    """The references (the policy's definition) against the rule written out one token at a
    time: window attention (causal inside the window, max over a GQA group, mean over the
    window) and lightning redundancy (sums within a block, newest near-duplicate spared)."""
    torch.manual_seed(0)
    block_size, window, group, head_dim = 4, 3, 2, 8
    keys = torch.randn(1, 2, 3 * block_size, head_dim, dtype=torch.float32)
    keys[0, :, 5:7] = keys[0, :, 4:5] + 0.01  # near-duplicates in block 1: slots 0, 1 and 2
    queries = torch.randn(1, window, 2 * group, head_dim, dtype=torch.float32)
    num_tokens = keys.shape[2]
    attention = torch.zeros(2, num_tokens, dtype=torch.float32)
    sums = torch.zeros(2, num_tokens, dtype=torch.float32)
    for h in range(2):
        for i in range(window):
            visible = num_tokens - window + i + 1
            probs = [
                (keys[0, h, :visible] @ queries[0, i, h * group + g] / head_dim**0.5).softmax(0)
                for g in range(group)
            ]
            attention[h, :visible] += torch.stack(probs).amax(0) / window
        unit = F.normalize(keys[0, h], dim=-1)
        for first in range(0, num_tokens, block_size):
            slots = range(first, first + block_size)
            for n in slots:
                dups = [m for m in slots if m != n and unit[m] @ unit[n] > 0.5]
                for m in slots:
                    if m != n and (not dups or m != max(dups)):
                        sums[h, m] += unit[m] @ unit[n]
    pool, table = in_pages(keys, block_size)
    torch.testing.assert_close(window_scores_ref(pool, table, queries)[0], attention)
    torch.testing.assert_close(redundancy_sums_ref(pool, table)[0], sums)


def near_duplicates(keys, block_size):
    """Make three slots of every block noisy copies of one key, so that the rule drops the
    newest copy's similarities to the other two and the middle one's to the newest."""
    blocks = keys.unflatten(-2, (-1, block_size))  # a view: writes land in keys
    for block in range(blocks.shape[-3]):
        original, *copies = torch.randperm(block_size)[:3].tolist()
        for slot in copies:
            noise = 0.05 * torch.randn_like(blocks[..., block, original, :])
            blocks[..., block, slot, :] = blocks[..., block, original, :] + noise
    return keys


@runs_kernels
@pytest.mark.parametrize(
    "dtype, head_dim, block_size",
    cases(DTYPES, HEAD_DIMS, [8, 16, 32, 12] + ([256] if ON_GPU else [])),
)
def test_redundancy_sums_match_reference_and_spare_the_newest_duplicate(
    dtype, head_dim, block_size
):
    num_layers, num_kv_heads, num_tokens = 2, 3, NUM_BLOCKS * block_size
    keys = torch.randn(num_layers, num_kv_heads, num_tokens, head_dim, device=DEVICE).to(dtype)
    keys = near_duplicates(keys, block_size)
    pool, table = in_pages(keys, block_size)

    out = redundancy_sums(pool, table, **REDUNDANCY_TILES)

    expected = redundancy_sums_ref(pool, table)
    assert_close(out, expected, dtype)
    # The copies trigger the rule: the newest loses two similarities of about 1, the next one
    # (unless a chance similarity over 0.5 with a newer slot takes its place: count half).
    unit = F.normalize(keys.float(), dim=-1).unflatten(-2, (-1, block_size))
    all_pairs = (unit @ unit.transpose(-1, -2)).sum(-1).flatten(-2) - 1  # minus self-similarity
    assert ((all_pairs - out) > 0.9).sum() >= NUM_BLOCKS * num_layers * num_kv_heads


def table_pairs(num_blocks):
    """(old table, new table) over a pool of `num_blocks` ids, as a compression plans them: new
    block i is old block i (the request's own), or a fresh id (where old block i is shared)."""
    ids = torch.randperm(num_blocks, device=DEVICE)
    old, fresh = ids[:5], ids[5:8]
    return {
        "in_place": (old, old[:3]),
        "fresh": (old, fresh),
        "mixed": (old, torch.stack([fresh[0], old[1], fresh[2]])),
    }


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "block_size, tables, table_dtype, kept_rule",
    cases([8, 16, 32], ["in_place", "fresh", "mixed"], [torch.int32, torch.int64], ["top", "runs"]),
)
def test_move_kept_writes_kept_tokens_into_new_blocks_even_over_their_sources(
    dtype, block_size, tables, table_dtype, kept_rule
):
    num_layers, num_kv_heads, num_blocks, head_dim = 2, 3, 10, HEAD_DIMS[-1]
    shape = (2, num_layers, num_blocks, num_kv_heads, block_size, head_dim)
    kv_cache = torch.randn(shape, device=DEVICE).to(dtype)
    score_cache = torch.randn(shape[1:-1], device=DEVICE)
    old_table, new_table = (t.to(table_dtype) for t in table_pairs(num_blocks)[tables])
    num_tokens, keep = old_table.numel() * block_size, new_table.numel() * block_size
    scores = torch.rand(num_layers, num_kv_heads, num_tokens, device=DEVICE)
    if kept_rule == "runs":  # whole runs of tokens one slot ahead of their new place
        scores = (
            torch.arange(num_tokens, device=DEVICE).remainder(5).ne(0).float().expand_as(scores)
        )
    kept = scores.topk(keep).indices.sort(-1).values
    expected = (kv_cache.clone(), score_cache.clone())

    move_kept(kv_cache, score_cache, scores, old_table, new_table, kept, **MOVE_KEPT_TILES)

    move_kept_ref(*expected, scores, old_table, new_table, kept)
    assert torch.equal(kv_cache, expected[0]) and torch.equal(score_cache, expected[1])
    untouched = torch.ones(num_blocks, dtype=torch.bool, device=DEVICE)
    untouched[new_table.long()] = False
    assert torch.equal(kv_cache[:, :, untouched], expected[0][:, :, untouched])


def test_move_kept_reference_keeps_the_kept_tokens_in_order():
    """The reference against the rule written out: slot j of the new table holds old token
    kept[j]."""
    block_size, head_dim = 4, 8
    kv_cache = torch.randn(2, 1, 6, 1, block_size, head_dim)
    score_cache = torch.zeros(1, 6, 1, block_size)
    old_table, new_table = torch.tensor([4, 1, 2]), torch.tensor([4, 5])
    scores = torch.rand(1, 1, 12)
    kept = torch.tensor([[[0, 2, 3, 5, 6, 7, 9, 11]]])
    original = kv_cache.clone()

    move_kept_ref(kv_cache, score_cache, scores, old_table, new_table, kept)

    for j, index in enumerate(kept[0, 0].tolist()):
        old_block, new_block = old_table[index // block_size], new_table[j // block_size]
        for which in range(2):
            moved = kv_cache[which, 0, new_block, 0, j % block_size]
            assert torch.equal(moved, original[which, 0, old_block, 0, index % block_size])
        assert score_cache[0, new_block, 0, j % block_size] == scores[0, 0, index]
