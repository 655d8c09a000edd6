"""Each Triton kernel against its PyTorch reference, on fresh random inputs.

On a GPU the kernels run compiled, in bfloat16 too and on larger shapes. On CPU they run under
Triton's interpreter, which is slow: shapes are small and the tiles shrink to 16 tokens so the
lengths still cross tile boundaries. Every buffer a wrapper allocates starts as NaN, and every
cache slot outside a sequence's context holds NaN, so an unwritten output or a stray read fails.
"""

import pytest
import torch
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

from nanozipage.kernels.decode_attention import (
    decode_attention,
    decode_attention_ref,
)
from nanozipage.kernels.layer_ops import (
    add_rms_norm,
    add_rms_norm_ref,
    gemv,
    silu_and_mul,
    silu_and_mul_ref,
)
from nanozipage.kernels.prefill_attention import prefill_attention, prefill_attention_ref
from nanozipage.kernels.rope_store_kv import rope_store_kv, rope_store_kv_ref

# Tiles of 16 tokens on CPU so the short lengths there still span several; the defaults on GPU.
PREFILL_TILES = {} if ON_GPU else {"block_m": 16, "block_n": 16}
DECODE_TILES = {} if ON_GPU else {"block_n": 16}
# float32 runs exactly in the interpreter; on GPU tl.dot takes float32 as tf32.
TOL = {torch.float32: 5e-3 if ON_GPU else 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}

test_kernels_under_the_triton_interpreter = child_run(__file__)


def fused_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype):
    """q, k, v as the strided views of one projection output that the engine hands over."""
    heads = num_q_heads + 2 * num_kv_heads
    qkv = torch.randn(num_tokens, heads * head_dim, device=DEVICE).to(dtype)
    qkv = qkv.view(num_tokens, heads, head_dim)
    return qkv.split([num_q_heads, num_kv_heads, num_kv_heads], dim=1)


def paged_cache(ctx_lens, num_kv_heads, block_size, head_dim, dtype):
    """Caches holding random K/V for each context and NaN everywhere else, with block tables
    over shuffled block ids, padded with -1."""
    counts = [-(-n // block_size) for n in ctx_lens]
    num_blocks = sum(counts) + 2
    ids = torch.randperm(num_blocks).tolist()
    tables = torch.full((len(ctx_lens), max(counts) + 1), -1, dtype=torch.int32)
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    for i, (n, count) in enumerate(zip(ctx_lens, counts)):
        tables[i, :count] = torch.tensor(ids[:count])
        for t in range(0, n, block_size):
            block, size = ids[t // block_size], min(block_size, n - t)
            k_cache[block, :, :size] = torch.randn(num_kv_heads, size, head_dim).to(dtype)
            v_cache[block, :, :size] = torch.randn(num_kv_heads, size, head_dim).to(dtype)
        ids = ids[count:]
    return k_cache, v_cache, tables.to(DEVICE)


def assert_close(out, ref, dtype):
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def upcast(*tensors):
    return [t.float() if t.is_floating_point() else t for t in tensors]


@runs_kernels
@pytest.mark.parametrize(
    "dtype, block_size, slot_dtype, with_queries, qk_norm",
    cases(DTYPES, [8, 16, 12], [torch.int32, torch.int64], [False, True], [True, False]),
)
def test_rope_store_kv_matches_reference_and_skips_padding(
    dtype, block_size, slot_dtype, with_queries, qk_norm
):
    num_tokens, num_q_heads, num_kv_heads, head_dim, num_blocks = 20, 6, 3, HEAD_DIMS[-1], 5
    heads = num_q_heads + 2 * num_kv_heads
    qkv = (
        torch.randn(num_tokens, heads * head_dim, device=DEVICE)
        .to(dtype)
        .view(num_tokens, heads, -1)
    )
    positions = torch.randint(0, 100, (num_tokens,), device=DEVICE)
    angles = torch.rand(100, head_dim // 2, device=DEVICE) * 6.3
    cos_sin = torch.cat([angles.cos(), angles.sin()], -1)
    norms = [torch.rand(head_dim, device=DEVICE).to(dtype) + 0.5 for _ in range(2)]
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_cache = torch.randn(shape, device=DEVICE).to(dtype)
    v_cache = torch.randn(shape, device=DEVICE).to(dtype)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[1, 7, 19]] = -1
    slots = slots.to(slot_dtype).to(DEVICE)
    # The query cache: 30 rows; a few tokens are window queries, the rest -1.
    q_cache = torch.randn(30, num_q_heads, head_dim, device=DEVICE).to(dtype)
    rows = torch.full((num_tokens,), -1, dtype=torch.long)
    rows[[0, 4, 5, 19]] = torch.randperm(30)[:4]
    rows = rows.to(DEVICE)
    args = (qkv, positions, cos_sin, *(norms if qk_norm else (None, None)), 1e-6)
    old_k, old_v, old_q = k_cache.clone(), v_cache.clone(), q_cache.clone()
    expected = [old_k.clone(), old_v.clone(), slots, old_q.clone(), rows]
    ours = [k_cache, v_cache, slots, q_cache, rows]

    q = rope_store_kv(*args, *(ours if with_queries else ours[:3]))

    expected_q = rope_store_kv_ref(*args, *(expected if with_queries else expected[:3]))
    assert_close(q, expected_q, dtype)
    for cache, ref in zip([k_cache, v_cache, q_cache], expected[:2] + expected[3:4]):
        assert_close(cache, ref, dtype)
    written = rows[rows >= 0]
    assert torch.equal(q_cache[written], q[rows >= 0]) == with_queries
    other_rows = torch.ones(len(q_cache), dtype=torch.bool, device=DEVICE)
    other_rows[written] = False
    assert torch.equal(q_cache[other_rows], old_q[other_rows])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots[slots >= 0].long()] = False
    for cache, old in ((k_cache, old_k), (v_cache, old_v)):
        by_slot, old_by_slot = (c.transpose(1, 2).flatten(0, 1) for c in (cache, old))
        assert torch.equal(by_slot[untouched], old_by_slot[untouched])
        assert not torch.equal(by_slot[~untouched], old_by_slot[~untouched])


@runs_kernels
@pytest.mark.parametrize("dtype, hidden", cases(DTYPES, [96, 1024, 1000]))
def test_add_rms_norm_matches_reference(dtype, hidden):
    # Rows of very different scales: the norm must be each row's own.
    scale = torch.logspace(-2, 2, 5, device=DEVICE)[:, None]
    x = (torch.randn(5, hidden, device=DEVICE) * scale).to(dtype)
    residual = (torch.randn(5, hidden, device=DEVICE) * scale).to(dtype)
    weight = (torch.rand(hidden, device=DEVICE) + 0.5).to(dtype)

    out, new_residual = add_rms_norm(x, residual, weight, 1e-6)

    expected, expected_residual = add_rms_norm_ref(x, residual, weight, 1e-6)
    assert torch.equal(new_residual, expected_residual)  # one rounding of the same sum
    assert_close(out, expected, dtype)


@runs_kernels
@pytest.mark.parametrize("dtype, n", cases(DTYPES, [96, 1024, 1500]))
def test_silu_and_mul_matches_reference(dtype, n):
    x = (torch.randn(3, 2 * n, device=DEVICE) * 4).to(dtype)  # gates well into both tails

    out = silu_and_mul(x)

    assert out.shape == (3, n)
    assert_close(out, silu_and_mul_ref(x), dtype)


@runs_kernels
@pytest.mark.parametrize("dtype, n, k", cases(DTYPES, [4, 1001, 2052], [64, 896, 3000]))
def test_gemv_matches_reference(dtype, n, k):
    # x last: from sm_90 on, `gemv` may read a weight tile before the kernel ahead of it ends.
    weight = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)  # outputs of about 1
    x = torch.randn(1, k, device=DEVICE).to(dtype)

    out = gemv(x, weight)

    assert out.shape == (1, n)
    assert_close(out, (x.float() @ weight.float().T).to(dtype), dtype)


PREFILL_SEQS = (  # (new query tokens, context length): fresh prompts, cached prefixes, 1 token
    [(300, 300), (77, 1000), (1, 129), (513, 700)]
    if ON_GPU
    else [(37, 37), (5, 40), (1, 19), (20, 53)]
)


@runs_kernels
@pytest.mark.parametrize(
    "dtype, head_dim, block_size, group", cases(DTYPES, HEAD_DIMS, [16, 8, 32, 12], [1, 2, 3])
)
def test_prefill_matches_reference(dtype, head_dim, block_size, group):
    num_kv_heads = 2
    q_lens, ctx_lens = zip(*PREFILL_SEQS)
    q, _, _ = fused_qkv(sum(q_lens), group * num_kv_heads, num_kv_heads, head_dim, dtype)
    k_cache, v_cache, tables = paged_cache(ctx_lens, num_kv_heads, block_size, head_dim, dtype)
    cu_seqlens = torch.tensor([0, *q_lens], device=DEVICE).cumsum(0).to(torch.int32)
    context_lens = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    args = (cu_seqlens, context_lens, tables, max(q_lens), head_dim**-0.5)

    out = prefill_attention(q, k_cache, v_cache, *args, **PREFILL_TILES)

    assert_close(out, prefill_attention_ref(*upcast(q, k_cache, v_cache), *args), dtype)


DECODE_LENS = [0, 1, 17, 1000, 4097, 256] if ON_GPU else [0, 1, 17, 100, 64]


@runs_kernels
@pytest.mark.parametrize(
    "dtype, head_dim, block_size, group, num_splits",
    cases(DTYPES, HEAD_DIMS, [16, 8, 32, 12], [1, 2, 3], [1, 3, None]),
)
def test_decode_matches_reference_and_zeroes_empty_rows(
    dtype, head_dim, block_size, group, num_splits
):
    num_kv_heads = 2
    q, _, _ = fused_qkv(len(DECODE_LENS), group * num_kv_heads, num_kv_heads, head_dim, dtype)
    k_cache, v_cache, tables = paged_cache(DECODE_LENS, num_kv_heads, block_size, head_dim, dtype)
    context_lens = torch.tensor(DECODE_LENS, dtype=torch.int32, device=DEVICE)
    args = (context_lens, tables, head_dim**-0.5)

    out = decode_attention(q, k_cache, v_cache, *args, num_splits, **DECODE_TILES)

    assert_close(out, decode_attention_ref(*upcast(q, k_cache, v_cache), *args), dtype)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # the length-0 padding row


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_decode_replayed_from_a_cuda_graph_follows_new_lengths():
    dtype, num_kv_heads, head_dim, block_size = torch.bfloat16, 2, 128, 16
    lens_at_capture, lens_at_replay = [5, 300, 0, 1000], [1000, 0, 77, 5]
    q, _, _ = fused_qkv(4, 2 * num_kv_heads, num_kv_heads, head_dim, dtype)
    k_cache, v_cache, tables = paged_cache(
        lens_at_capture + lens_at_replay, num_kv_heads, block_size, head_dim, dtype
    )
    context_lens = torch.tensor(lens_at_capture, dtype=torch.int32, device=DEVICE)
    static_tables = tables[:4].clone()
    decode_attention(q, k_cache, v_cache, context_lens, static_tables, 0.1)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k_cache, v_cache, context_lens, static_tables, 0.1)

    context_lens.copy_(torch.tensor(lens_at_replay, dtype=torch.int32))
    static_tables.copy_(tables[4:])
    graph.replay()

    ref = decode_attention_ref(*upcast(q, k_cache, v_cache), context_lens, static_tables, 0.1)
    assert_close(out, ref, dtype)
