"""Causal attention for the new tokens of a prefill step, over the paged KV cache.

Runs after `rope_store_kv`. The new queries are the last `q_len` tokens of each context, so a
cached prefix (prefix caching, earlier chunks) is read through the block table like the new
tokens. Flash attention (online softmax) with K/V tiles gathered token by token from blocks.
"""

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def attend_tile(
    acc, m_i, l_i, q, q_pos, k_cache, v_cache, block_table, kv_head_offset, start,
    ctx_len, block_size, stride_cb, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Flash attention's step over keys [start, start + BLOCK_N): the online-softmax update of
    (acc, m_i, l_i). CAUSAL hides the keys after each row's `q_pos` (and so past the context)."""
    k_pos = start + tl.arange(0, BLOCK_N)
    in_ctx = k_pos < ctx_len
    block = tl.load(block_table + k_pos // block_size, mask=in_ctx, other=0).to(tl.int64)
    rows = block * stride_cb + kv_head_offset + (k_pos % block_size) * HEAD_DIM
    offsets = rows[:, None] + tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(k_cache + offsets, mask=in_ctx[:, None], other=0.0)
    # Scores in log2 units: qk_scale folds in log2(e), so exp2 below is the softmax's exp.
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if CAUSAL:
        s = tl.where(k_pos[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    v = tl.load(v_cache + offsets, mask=in_ctx[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _prefill_kernel(
    q, k_cache, v_cache, o, cu_seqlens_q, context_lens, block_tables,
    stride_qn, stride_qh, stride_on, stride_oh, stride_cb, stride_ch, stride_bt,
    qk_scale, block_size,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # Later query tiles see more keys: launch them first so the grid does not end on a long tail.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    head, seq = tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    ctx_len = tl.load(context_lens + seq)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q_ptrs = q + (q_start + rows)[:, None] * stride_qn + head * stride_qh + dims[None, :]
    q_tile = tl.load(q_ptrs, mask=rows[:, None] < q_len, other=0.0)
    q_pos = ctx_len - q_len + rows  # cache index of each query
    first_pos = ctx_len - q_len + tile * BLOCK_M

    block_table = block_tables + seq * stride_bt
    kv_head_offset = (head // GROUP) * stride_ch
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Keys before the tile's first query are visible to all its rows: skip the causal mask there.
    unmasked_end = first_pos // BLOCK_N * BLOCK_N
    for start in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = attend_tile(
            acc, m_i, l_i, q_tile, q_pos, k_cache, v_cache, block_table, kv_head_offset, start,
            ctx_len, block_size, stride_cb, qk_scale, HEAD_DIM, BLOCK_N, False, PRECISION,
        )  # fmt: skip
    for start in range(unmasked_end, tl.minimum(first_pos + BLOCK_M, ctx_len), BLOCK_N):
        acc, m_i, l_i = attend_tile(
            acc, m_i, l_i, q_tile, q_pos, k_cache, v_cache, block_table, kv_head_offset, start,
            ctx_len, block_size, stride_cb, qk_scale, HEAD_DIM, BLOCK_N, True, PRECISION,
        )  # fmt: skip
    out = acc / l_i[:, None]
    o_ptrs = o + (q_start + rows)[:, None] * stride_on + head * stride_oh + dims[None, :]
    tl.store(o_ptrs, out.to(o.dtype.element_ty), mask=rows[:, None] < q_len)


def prefill_attention(
    q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, scale,
    *, block_m=128, block_n=None, num_warps=8, num_stages=2,
):  # fmt: skip
    """Causal attention of `q` `[N, num_q_heads, head_dim]` (sequence i owns rows
    `cu_seqlens_q[i]:cu_seqlens_q[i+1]`, the last of its `context_lens[i]` cached tokens) over the
    paged cache. Returns a new `[N, num_q_heads, head_dim]` tensor."""
    if not uses_triton(q):
        args = (cu_seqlens_q, context_lens, block_tables, max_seqlen_q, scale)
        return prefill_attention_ref(q, k_cache, v_cache, *args)
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    check_attention_inputs(q, k_cache, v_cache)
    assert cu_seqlens_q.dtype == context_lens.dtype == block_tables.dtype == torch.int32
    num_seqs = context_lens.shape[0]
    assert cu_seqlens_q.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs
    o = q.new_empty((num_tokens, num_q_heads, head_dim))
    if num_tokens == 0:
        return o
    # 128 x 128 tiles measured fastest in bf16 (BENCHMARKS.md, `benchmarks/kernels.py --sweep`);
    # float32 tiles need twice the shared memory, so they take fewer keys at a time.
    block_n = block_n or (128 if q.element_size() <= 2 else 32)
    grid = (triton.cdiv(max_seqlen_q, block_m), num_q_heads, num_seqs)
    _prefill_kernel[grid](
        q, k_cache, v_cache, o, cu_seqlens_q, context_lens, block_tables,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1),
        k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        scale * 1.4426950408889634, block_size,
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return o


def check_attention_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    """Shapes, strides and dtypes that both attention kernels assume."""
    num_q_heads, head_dim = q.shape[-2:]
    num_kv_heads = k_cache.shape[1]
    assert k_cache.shape[-1] == head_dim and v_cache.shape == k_cache.shape
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert q.dtype == k_cache.dtype == v_cache.dtype
    assert num_q_heads % num_kv_heads == 0, "query heads must split evenly over kv heads"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"


def uses_triton(x: torch.Tensor) -> bool:
    """Whether the kernels run on `x` in Triton (on the GPU, or in its interpreter) rather than
    as their PyTorch references."""
    return x.is_cuda or interpreting()


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET=1, read at each call)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def dependent_start(PDL: tl.constexpr):
    """Begin a kernel launched while the one before it runs (a programmatic dependent launch):
    wait until that one has finished and its stores are visible, then let the next launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def dependent_launch(x: torch.Tensor) -> dict:
    """The launch arguments of a kernel on x that begins with `dependent_start(PDL)`: a dependent
    launch where one can be (compiled, sm_90 or newer, Triton >= 3.4, which knows `launch_pdl`)."""
    pdl = not interpreting() and x.is_cuda and _has_dependent_launch(x.device)
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


@functools.cache
def _has_dependent_launch(device: torch.device) -> bool:  # a Hopper GPU and a Triton that has it
    return torch.cuda.get_device_capability(device)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")


def dot_precision(dtype: torch.dtype) -> str:
    """A float32 model gets float32 attention; tl.dot would otherwise round inputs to tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def gather_tokens(cache, block_table):
    """A request's entries out of a group of layers' pages `[G, num_blocks, kv_heads,
    block_size, *rest]` (keys, values or stored scores): dense `[G, kv_heads, T, *rest]`, a copy."""
    return cache[:, block_table.long()].transpose(1, 2).flatten(2, 3)


def prefill_attention_ref(
    q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, scale
):
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    group = q.shape[1] // k_cache.shape[1]
    bounds = cu_seqlens_q.tolist()
    for i, (start, end, ctx_len) in enumerate(zip(bounds, bounds[1:], context_lens.tolist())):
        table = block_tables[i, : -(-ctx_len // k_cache.shape[2])]  # its blocks, not the padding
        k, v = (gather_tokens(c[None], table)[0, :, :ctx_len] for c in (k_cache, v_cache))
        k, v = (t.repeat_interleave(group, 0).float() for t in (k, v))
        scores = q[start:end].transpose(0, 1).float() @ k.transpose(1, 2) * scale
        q_pos = torch.arange(ctx_len - (end - start), ctx_len, device=q.device)
        causal = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
        o[start:end] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
    return o
