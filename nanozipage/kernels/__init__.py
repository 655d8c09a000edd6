"""Triton kernels, each with the PyTorch reference the CPU runs (`name_ref`), to which its
wrapper hands its inputs off the GPU; their shared helpers are in `prefill_attention.py`. The
engine imports the wrappers here (re-exported `as` themselves); tests, a kernel's `_ref` too."""

from nanozipage.kernels.decode_attention import decode_attention as decode_attention
from nanozipage.kernels.layer_ops import add_rms_norm as add_rms_norm
from nanozipage.kernels.layer_ops import gemv as gemv
from nanozipage.kernels.layer_ops import silu_and_mul as silu_and_mul
from nanozipage.kernels.move_kept import move_kept as move_kept
from nanozipage.kernels.prefill_attention import gather_tokens as gather_tokens
from nanozipage.kernels.prefill_attention import prefill_attention as prefill_attention
from nanozipage.kernels.redundancy import redundancy_sums as redundancy_sums
from nanozipage.kernels.rope_store_kv import rope_store_kv as rope_store_kv
from nanozipage.kernels.window_score import window_scores as window_scores
