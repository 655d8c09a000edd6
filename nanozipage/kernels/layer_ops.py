"""The decoder layer's own kernels: residual add + RMSNorm and SiLU(gate) * up, one launch each
(a hidden row fits in one block), and a GEMV for the projections of a single token."""

import torch
import triton
import triton.language as tl

from nanozipage.kernels.prefill_attention import dependent_launch, dependent_start, uses_triton


@triton.jit
def _add_rms_norm_kernel(
    x, residual, weight, out, new_residual, n, eps, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    dependent_start(PDL)
    offsets = tl.program_id(0).to(tl.int64) * n + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < n
    h = tl.load(x + offsets, mask=mask, other=0.0)
    h += tl.load(residual + offsets, mask=mask, other=0.0)
    tl.store(new_residual + offsets, h, mask=mask)
    y = h.to(tl.float32)
    y = (y * tl.rsqrt(tl.sum(y * y, 0) / n + eps)).to(h.dtype)
    tl.store(out + offsets, tl.load(weight + tl.arange(0, BLOCK), mask=mask) * y, mask=mask)


@triton.jit
def _silu_and_mul_kernel(x, out, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    dependent_start(PDL)
    row, cols = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    gate = tl.load(x + row * 2 * n + cols, mask=cols < n).to(tl.float32)
    up = tl.load(x + row * 2 * n + n + cols, mask=cols < n)
    tl.store(out + row * n + cols, (gate * tl.sigmoid(gate)).to(up.dtype) * up, mask=cols < n)


@triton.jit
def _gemv_kernel(x, w, y, n, k, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows, in_rows = w + rows.to(tl.int64)[:, None] * k, rows[:, None] < n
    cols = tl.arange(0, BLOCK_K)
    w_part = tl.load(w_rows + cols[None, :], mask=in_rows & (cols[None, :] < k), other=0.0)
    dependent_start(PDL)  # after the first weight tile, which no kernel writes: x is written now
    acc = w_part.to(tl.float32) * tl.load(x + cols, mask=cols < k, other=0.0).to(tl.float32)
    for start in range(BLOCK_K, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        w_part = tl.load(w_rows + cols[None, :], mask=in_rows & (cols[None, :] < k), other=0.0)
        acc += w_part.to(tl.float32) * tl.load(x + cols, mask=cols < k, other=0.0).to(tl.float32)
    tl.store(y + rows, tl.sum(acc, 1).to(y.dtype.element_ty), mask=rows < n)


def add_rms_norm_ref(x, residual, weight, eps):
    x = x + residual
    y = x.float()
    return weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), x


def silu_and_mul_ref(x):
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """`[tokens, n]` x + residual -> (RMSNorm of the sum times `weight`, the sum: the next
    residual). The sum is rounded to x's dtype before the norm, as the residual stream is."""
    if not uses_triton(x):
        return add_rms_norm_ref(x, residual, weight, eps)
    assert x.is_contiguous() and residual.is_contiguous() and x.shape == residual.shape
    out, new_residual = torch.empty_like(x), torch.empty_like(x)
    n = x.shape[-1]
    _add_rms_norm_kernel[(x.numel() // n,)](
        x, residual, weight, out, new_residual, n, eps,
        BLOCK=triton.next_power_of_2(n), **dependent_launch(x),
    )  # fmt: skip
    return out, new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`[tokens, 2n]` (gate | up) -> `[tokens, n]` SiLU(gate) * up."""
    if not uses_triton(x):
        return silu_and_mul_ref(x)
    assert x.is_contiguous()
    n = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], n)
    grid = (x.numel() // (2 * n), triton.cdiv(n, 1024))
    _silu_and_mul_kernel[grid](x, out, n, BLOCK=1024, **dependent_launch(x))
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`[1, k]` x `[n, k]` W -> `[1, n]` x W^T, for one token faster than cuBLAS (BENCHMARKS.md).
    On sm_90 and newer it may start before the kernel ahead of it ends and read its first weight
    tile then: that kernel must not write `weight` (only x)."""
    if not uses_triton(x):
        return x @ weight.T
    n, k = weight.shape
    assert x.shape == (1, k) and x.is_contiguous() and weight.is_contiguous()
    y = x.new_empty(1, n)
    block_k, num_warps = min(1024, triton.next_power_of_2(k)), 8 if n <= 2048 else 4
    grid = (triton.cdiv(n, 4),)
    _gemv_kernel[grid](x, weight, y, n, k, 4, block_k, num_warps=num_warps, **dependent_launch(x))
    return y
