"""The decoder layer's row-wise chains, one launch each: residual add + RMSNorm, and SiLU(gate) *
up. They read their inputs once and write their outputs once; a hidden row fits in one block."""

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
