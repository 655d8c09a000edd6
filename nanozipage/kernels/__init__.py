"""Triton kernels (attention, RoPE and KV store, compression scoring and compaction), each with the
PyTorch reference that the CPU runs."""

from nanozipage.kernels.compact import compact, compact_ref, compact_triton
from nanozipage.kernels.decode_attention import (
    decode_attention,
    decode_attention_ref,
    decode_attention_triton,
)
from nanozipage.kernels.prefill_attention import (
    prefill_attention,
    prefill_attention_ref,
    prefill_attention_triton,
)
from nanozipage.kernels.redundancy import (
    redundancy_sums,
    redundancy_sums_ref,
    redundancy_sums_triton,
)
from nanozipage.kernels.rope_store_kv import rope_store_kv, rope_store_kv_ref, rope_store_kv_triton
from nanozipage.kernels.window_score import window_scores, window_scores_ref, window_scores_triton

__all__ = [
    "compact",
    "compact_ref",
    "compact_triton",
    "decode_attention",
    "decode_attention_ref",
    "decode_attention_triton",
    "prefill_attention",
    "prefill_attention_ref",
    "prefill_attention_triton",
    "redundancy_sums",
    "redundancy_sums_ref",
    "redundancy_sums_triton",
    "rope_store_kv",
    "rope_store_kv_ref",
    "rope_store_kv_triton",
    "window_scores",
    "window_scores_ref",
    "window_scores_triton",
]
