"""Triton kernels of the attention layer, each with the PyTorch reference that the CPU runs."""

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
from nanozipage.kernels.store_kv import store_kv, store_kv_ref, store_kv_triton

__all__ = [
    "decode_attention",
    "decode_attention_ref",
    "decode_attention_triton",
    "prefill_attention",
    "prefill_attention_ref",
    "prefill_attention_triton",
    "store_kv",
    "store_kv_ref",
    "store_kv_triton",
]
