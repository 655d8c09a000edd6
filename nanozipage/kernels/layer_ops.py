"""The decoder layer's own kernels: residual add + RMSNorm and SiLU(gate) * up, one launch each
(a hidden row fits in one block), and a GEMV for the projections of a single token, which
does the norm or the activation before it in the same launch."""

import torch
import triton
import triton.language as tl

from nanozipage.kernels.prefill_attention import uses_triton


@triton.jit
def _add_rms_norm_kernel(x, residual, weight, out, new_residual, n, eps, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * n + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < n
    h = tl.load(x + offsets, mask=mask, other=0.0)
    h += tl.load(residual + offsets, mask=mask, other=0.0)
    tl.store(new_residual + offsets, h, mask=mask)
    y = h.to(tl.float32)
    y = (y * tl.rsqrt(tl.sum(y * y, 0) / n + eps)).to(h.dtype)
    tl.store(out + offsets, tl.load(weight + tl.arange(0, BLOCK), mask=mask) * y, mask=mask)


@triton.jit
def _silu_and_mul_kernel(x, out, n, BLOCK: tl.constexpr):
    row, cols = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    gate = tl.load(x + row * 2 * n + cols, mask=cols < n).to(tl.float32)
    up = tl.load(x + row * 2 * n + n + cols, mask=cols < n)
    tl.store(out + row * n + cols, (gate * tl.sigmoid(gate)).to(up.dtype) * up, mask=cols < n)


@triton.jit
def _gemv_input(x, residual, cols, k, NORM: tl.constexpr, SILU: tl.constexpr):
    """Columns `cols` of the GEMV's input, before any norm: x, x + residual or SiLU(gate) * up."""
    h = tl.load(x + cols, mask=cols < k, other=0.0)
    if NORM:
        h += tl.load(residual + cols, mask=cols < k, other=0.0)
    if SILU:
        up = tl.load(x + k + cols, mask=cols < k, other=0.0)
        h = (h.to(tl.float32) * tl.sigmoid(h.to(tl.float32))).to(up.dtype) * up
    return h


@triton.jit
def _gemv_kernel(
    x, w, y, n, k, residual, norm, new_residual, eps,
    NORM: tl.constexpr, SILU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if NORM:  # every program sums the squares of the whole input row (k values, from L2)
        sum_sq = tl.zeros([BLOCK_K], tl.float32)
        for start in range(0, k, BLOCK_K):
            h = _gemv_input(x, residual, start + tl.arange(0, BLOCK_K), k, NORM, SILU)
            sum_sq += h.to(tl.float32) * h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(sum_sq, 0) / k + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        h = _gemv_input(x, residual, cols, k, NORM, SILU)
        if NORM:  # `_add_rms_norm_kernel`'s roundings (its sum of squares in another order)
            if tl.program_id(0) == 0:
                tl.store(new_residual + cols, h, mask=cols < k)
            weight = tl.load(norm + cols, mask=cols < k, other=0.0)  # not NaN past k: 0 * NaN
            h = weight * (h.to(tl.float32) * rstd).to(h.dtype)
        mask = (rows[:, None] < n) & (cols[None, :] < k)
        w_part = tl.load(w + rows.to(tl.int64)[:, None] * k + cols[None, :], mask=mask, other=0.0)
        acc += w_part.to(tl.float32) * h.to(tl.float32)
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
    _add_rms_norm_kernel[(x.numel() // n,)](x, residual, weight, out, new_residual, n, eps, BLOCK=triton.next_power_of_2(n))  # fmt: skip
    return out, new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`[tokens, 2n]` (gate | up) -> `[tokens, n]` SiLU(gate) * up."""
    if not uses_triton(x):
        return silu_and_mul_ref(x)
    assert x.is_contiguous()
    n = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], n)
    _silu_and_mul_kernel[(x.numel() // (2 * n), triton.cdiv(n, 1024))](x, out, n, BLOCK=1024)
    return out


def gemv(x, weight, norm=None, residual=None, eps=0.0, silu=False):
    """`[1, k]` x `[n, k]` W -> `[1, n]` x W^T, for one token faster than cuBLAS (BENCHMARKS.md),
    with the layer op before the projection in the same launch. `norm` (weight, `[k]`): the
    input is `add_rms_norm(x, residual, norm, eps)`; returns (y, x + residual). `silu`: x is
    (gate | up) `[1, 2k]` and the input `silu_and_mul(x)`."""
    if not uses_triton(x):
        if norm is not None:
            x, residual = add_rms_norm_ref(x, residual, norm, eps)
        y = (silu_and_mul_ref(x) if silu else x) @ weight.T
        return y if norm is None else (y, residual)
    n, k = weight.shape
    assert x.shape == (1, 2 * k if silu else k) and x.is_contiguous() and weight.is_contiguous()
    if norm is not None:
        assert norm.shape == (k,) and residual.shape == x.shape and residual.is_contiguous()
    y = x.new_empty(1, n)
    new_residual = torch.empty_like(x) if norm is not None else None
    block_k, num_warps = min(1024, triton.next_power_of_2(k)), 8 if n <= 2048 else 4
    _gemv_kernel[(triton.cdiv(n, 4),)](
        x, weight, y, n, k, residual, norm, new_residual, eps, norm is not None, silu, 4, block_k,
        num_warps=num_warps,
    )  # fmt: skip
    return y if norm is None else (y, new_residual)
