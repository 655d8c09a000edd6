"""Eviction policies, called by the compressor: which cached tokens a request keeps.

A policy scores every cached token of one request per (layer, KV head) from its `CacheState`:
dense tensors (the cache gathered out of the pages) with a leading group-of-layers dimension;
`select` keeps the `kv_budget` best plus the window. The heavy steps are kernels whose PyTorch
references state the math. The engine and the tests' dense reference call the same functions,
so a new policy is one function added to `POLICIES`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanozipage.kernels import redundancy_sums, window_scores


@dataclass
class CacheState:
    keys: torch.Tensor  # [layers, kv_heads, T, head_dim], post-RoPE (T = cached tokens)
    queries: torch.Tensor  # [layers, window, q_heads, head_dim], of the last `window` tokens
    prev_scores: torch.Tensor  # [layers, kv_heads, T] float32; 0 where not scored before
    first: bool  # the request's first compression
    block_size: int


def redundancy(state: CacheState, tau: float) -> torch.Tensor:
    """R-KV "lightning" redundancy: cosine similarity between keys of the same block only; for
    every token n, its most recent near-duplicate m (sim > 0.5) does not count sim(m, n), so the
    newest of a group survives; sum per token, softmax over the request: [layers, kv_heads, T]."""
    return (redundancy_sums(state.keys, state.block_size) / (tau * state.block_size)).softmax(-1)


def zipage(state: CacheState, config) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's recipe (docs/DESIGN.md section 2): returns (score, score to store)."""
    stored = score = window_scores(state.keys, state.queries)  # step 1: window attention
    if state.first:  # pooled, but stored as is
        pad = config.pool_kernel // 2
        score = F.max_pool1d(score.flatten(0, -2).unsqueeze(1), config.pool_kernel, 1, pad)
        score = score.view_as(stored)
    else:
        stored = score = torch.maximum(score, config.decay * state.prev_scores)
    w = config.score_weight
    return w * score - (1 - w) * redundancy(state, config.redundancy_tau), stored


def recency(state: CacheState, config) -> tuple[torch.Tensor, torch.Tensor]:
    """The newest tokens (cache order is position order). StreamingLLM is `policy="recency",
    num_sinks=4`: sinks are `select`'s, for every policy."""
    score = torch.arange(state.keys.shape[-2], device=state.keys.device, dtype=torch.float32)
    return score.expand_as(state.prev_scores), torch.zeros_like(state.prev_scores)


POLICIES = {"zipage": zipage, "recency": recency}


def select(score: torch.Tensor, keep: int, window: int, num_sinks: int) -> torch.Tensor:
    """Indices of the `keep` best tokens per row, window and sinks included, in position order."""
    score = score.clone()
    score[..., score.shape[-1] - window :] = float("inf")
    score[..., :num_sinks] = float("inf")
    return score.topk(keep, dim=-1, sorted=False).indices.sort(-1).values
