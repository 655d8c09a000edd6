"""The per-step tensors of the attention layers, set by the model runner once per step: one
global object keeps every layer's `forward(x)` signature plain."""

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Context:
    is_prefill: bool = False
    slot_mapping: torch.Tensor | None = None  # [num_tokens] cache slot of each new token
    context_lens: torch.Tensor | None = None  # [num_seqs] cached tokens incl. the new ones
    block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks], -1 padded
    cu_seqlens_q: torch.Tensor | None = None  # [num_seqs + 1] prefill only
    max_seqlen_q: int = 0  # prefill only
    query_rows: torch.Tensor | None = None  # [num_tokens] query-cache row or -1 (compression)


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(**fields):
    global _CONTEXT
    _CONTEXT = Context(**fields)


def to_device(data: list, device: torch.device, dtype=torch.int32) -> torch.Tensor:
    """A host list on the device, copied without waiting for the work queued there."""
    pinned = torch.tensor(data, dtype=dtype, pin_memory=device.type == "cuda")
    return pinned.to(device, non_blocking=True)
