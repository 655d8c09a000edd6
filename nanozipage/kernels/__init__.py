"""Triton kernels (attention, RoPE and KV store, compression scoring and compaction), each with the
PyTorch reference that the CPU runs. The engine imports the dispatching functions from here;
tests and benchmarks import a kernel's `_ref` and `_triton` from its module."""

from nanozipage.kernels.compact import compact
from nanozipage.kernels.decode_attention import decode_attention
from nanozipage.kernels.prefill_attention import prefill_attention
from nanozipage.kernels.redundancy import redundancy_sums
from nanozipage.kernels.rope_store_kv import rope_store_kv
from nanozipage.kernels.window_score import window_scores

__all__ = [
    "compact",
    "decode_attention",
    "prefill_attention",
    "redundancy_sums",
    "rope_store_kv",
    "window_scores",
]
