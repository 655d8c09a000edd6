"""Triton kernels (attention, RoPE and KV store, compression scoring and moving the kept tokens), each with the
PyTorch reference that the CPU runs. The engine imports the dispatching functions from here (each
re-exported `as` itself); tests and benchmarks import `_ref` and `_triton` from a kernel's module."""

from nanozipage.kernels.decode_attention import decode_attention as decode_attention
from nanozipage.kernels.move_kept import move_kept as move_kept
from nanozipage.kernels.prefill_attention import prefill_attention as prefill_attention
from nanozipage.kernels.redundancy import redundancy_sums as redundancy_sums
from nanozipage.kernels.rope_store_kv import rope_store_kv as rope_store_kv
from nanozipage.kernels.window_score import gather_tokens as gather_tokens
from nanozipage.kernels.window_score import window_scores as window_scores
