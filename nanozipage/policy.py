"""Eviction policies, called by the compressor: which cached tokens a request keeps.

A policy scores every cached token of one request per (layer, KV head) from its `CacheState`,
with a leading group-of-layers dimension: the keys in their pages, read in place by the scoring
kernels (`state.keys` gathers them into a dense copy for plain PyTorch), the window queries and
the stored scores. `select` keeps the best `kv_budget`, the window and the sinks among them. The
heavy steps are kernels whose PyTorch references state the math. A policy is a function
`(state, params) -> (score, score to store)` and a dataclass of its parameters, registered in
`POLICIES`; `LLM(policy=NAME, policy_args={})` picks one. The engine and the tests' dense
reference call the same functions, so a new policy is one function, one dataclass and one
registry entry (docs/DESIGN.md, "Writing a policy").
"""

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cached_property, partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nanozipage.kernels import gather_tokens, redundancy_sums, window_scores


@dataclass
class CacheState:
    k_cache: torch.Tensor  # [layers, num_blocks, kv_heads, block_size, head_dim], post-RoPE
    block_table: torch.Tensor  # [T / block_size]: the request's blocks (T = cached tokens)
    queries: torch.Tensor  # [layers, window, q_heads, head_dim]: the window queries
    prev_scores: torch.Tensor  # [layers, kv_heads, T] float32; 0 where not scored before
    first: bool  # the request's first compression
    layers: range  # the absolute indices of the layers in the leading dimension
    keep: int  # tokens `select` keeps per (layer, KV head), window and sinks included

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[3]

    @cached_property
    def keys(self) -> torch.Tensor:
        """[layers, kv_heads, T, head_dim]: the request's keys, dense; gathered on first use."""
        return gather_tokens(self.k_cache, self.block_table)


def attention(state: CacheState) -> torch.Tensor:
    """The window queries' attention over the cached tokens (`kernels.window_scores`)."""
    return window_scores(state.k_cache, state.block_table, state.queries)


def _check(params, name: str, allowed: str, valid=lambda value: True, kind=int | float):
    """A ValueError unless parameter `name` is a `kind` (never a bool) for which `valid` holds."""
    value = getattr(params, name)
    if not (isinstance(value, kind) and not isinstance(value, bool) and valid(value)):
        raise ValueError(f"policy_args: {name} must be {allowed}, got {value!r}")


def _check_weight(params, name: str):
    _check(params, name, "in [0, 1]", lambda value: 0 <= value <= 1)


def _check_count(params, name: str):
    _check(params, name, "an integer >= 0", lambda value: value >= 0, int)


def _check_kernel(params, name: str = "pool_kernel"):
    _check(params, name, "an odd integer > 0", lambda value: value > 0 and value % 2, int)


def pool(score: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pooling along the tokens (stride 1, padded): a token scores as its best neighbour."""
    pooled = F.max_pool1d(score.flatten(0, -2).unsqueeze(1), kernel, 1, kernel // 2)
    return pooled.view_as(score)


def redundancy(state: CacheState, tau: float) -> torch.Tensor:
    """R-KV "lightning" redundancy: cosine similarity between keys of the same block only; for
    every token n, its most recent near-duplicate m (sim > 0.5) does not count sim(m, n), so the
    newest of a group survives; sum per token, softmax over the request: [layers, kv_heads, T]."""
    sums = redundancy_sums(state.k_cache, state.block_table)
    return (sums / (tau * state.block_size)).softmax(-1)


def protect(score: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """`score` with its first `first` and last `last` tokens set to infinity: kept before any other,
    also before those an earlier `protect` marked (now the largest finite score)."""
    score = score.clamp(max=torch.finfo(score.dtype).max)  # a copy
    score[..., :first] = float("inf")
    score[..., max(score.shape[-1] - last, 0) :] = float("inf")
    return score


def positions(state: CacheState) -> torch.Tensor:
    """Cache indices 0..T-1 as float32 scores, broadcast to [layers, kv_heads, T]."""
    prev = state.prev_scores
    return torch.arange(prev.shape[-1], device=prev.device, dtype=torch.float32).expand_as(prev)


@dataclass(frozen=True)
class ZipageParams:
    decay: float = 0.8  # global score: max(score now, decay * score at the last compression)
    pool_kernel: int = 5  # max-pooling of scores along tokens (first compression only)
    score_weight: float = 0.2  # final score = w * attention - (1 - w) * redundancy
    redundancy_tau: float = 0.4  # redundancy softmax temperature, in units of block_size

    def __post_init__(self):
        _check(self, "decay", "in (0, 1]", lambda value: 0 < value <= 1)
        _check(self, "redundancy_tau", "> 0", lambda value: value > 0)
        _check_weight(self, "score_weight")
        _check_kernel(self)


def zipage(state: CacheState, p: ZipageParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's recipe, exactly (Zipage, Liao et al. 2026; docs/DESIGN.md section 2): window
    attention; global score max(now, decay * stored) from the second compression, max-pooled
    on the first (stored unpooled); minus R-KV lightning redundancy,
    `w * attention - (1 - w) * redundancy`."""
    stored = score = attention(state)
    if state.first:
        score = pool(score, p.pool_kernel)
    else:
        stored = score = torch.maximum(score, p.decay * state.prev_scores)
    w = p.score_weight
    return w * score - (1 - w) * redundancy(state, p.redundancy_tau), stored


@dataclass(frozen=True)
class SpansParams:
    decay: float = 0.9  # memory: max(score now, decay * score at the last compression)
    pool_kernel: int = 11  # max-pooling along tokens: a phrase, not only its most attended token
    sinks: int = 4  # first tokens always kept
    newest: float = 0.25  # share of the kept tokens that are always the newest ones

    def __post_init__(self):
        _check(self, "decay", "in [0, 1]", lambda value: 0 <= value <= 1)
        _check_kernel(self)
        _check_count(self, "sinks")
        _check_weight(self, "newest")


def spans(state: CacheState, p: SpansParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The default: attended spans with a memory, beside sinks and the newest tokens. Window
    attention (SnapKV's), kept with a decayed maximum of the scores stored at earlier
    compressions (G-KV's global score), then max-pooled along the tokens at every compression,
    wide enough that a kept token brings the phrase around it (a key of several tokens lost its
    tail with SnapKV's narrower pooling). StreamingLLM's part of the budget is always kept (as
    far as the window and `num_sinks` leave room): the first `sinks` tokens and the newest
    `newest` share of the kept tokens: the answer's next tokens lean on them, and greedy answers
    stay closer to full KV's (BENCHMARKS.md, "Eviction policies side by side")."""
    stored = attention(state)
    if not state.first:
        stored = torch.maximum(stored, p.decay * state.prev_scores)
    newest = min(int(p.newest * state.keep), state.keep - p.sinks)  # within the budget
    return protect(pool(stored, p.pool_kernel), p.sinks, newest), stored


@dataclass(frozen=True)
class NoParams:
    pass


def recency(state: CacheState, p: NoParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The newest tokens (cache order is position order): a sliding window. The config's
    `num_sinks` adds always-kept first tokens to any policy."""
    return positions(state), torch.zeros_like(state.prev_scores)


@dataclass(frozen=True)
class StreamingParams:
    sinks: int = 4  # first tokens always kept: the "attention sinks"

    def __post_init__(self):
        _check_count(self, "sinks")


def streamingllm(state: CacheState, p: StreamingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """StreamingLLM (Xiao et al., 2023): the first `sinks` tokens, which soak up attention that
    has nowhere else to go, and the newest tokens."""
    return protect(positions(state), p.sinks, 0), torch.zeros_like(state.prev_scores)


@dataclass(frozen=True)
class SnapKVParams:
    pool_kernel: int = 7  # max-pooling along tokens, so a kept token brings its neighbours

    def __post_init__(self):
        _check_kernel(self)


def snapkv(state: CacheState, p: SnapKVParams) -> tuple[torch.Tensor, torch.Tensor]:
    """SnapKV (Li et al., 2024), adapted to decoding: at every compression, the attention of the
    window queries (max over a GQA group, mean over the window), max-pooled along the tokens.
    Nothing is remembered between compressions."""
    score = attention(state)
    return pool(score, p.pool_kernel), torch.zeros_like(score)


def h2o(state: CacheState, p: NoParams) -> tuple[torch.Tensor, torch.Tensor]:
    """H2O (Zhang et al., 2023), "heavy hitters": the attention a token received, accumulated.
    Here each compression adds the window's attention to the stored sum (H2O adds every decode
    step's), so old tokens that were attended often outrank new ones."""
    score = state.prev_scores + attention(state)
    return score, score


@dataclass(frozen=True)
class RKVParams:
    importance_weight: float = 0.1  # lambda: score = lambda * attention - (1 - lambda) * redundancy
    pool_kernel: int = 7
    redundancy_tau: float = 0.4  # redundancy softmax temperature, in units of block_size

    def __post_init__(self):
        _check_weight(self, "importance_weight")
        _check_kernel(self)
        _check(self, "redundancy_tau", "> 0", lambda value: value > 0)


def rkv(state: CacheState, p: RKVParams) -> tuple[torch.Tensor, torch.Tensor]:
    """R-KV (Cai et al., 2025): `lambda * importance - (1 - lambda) * redundancy`, importance the
    window's pooled attention, redundancy a softmax of the keys' cosine similarities (reported:
    lambda 0.1 with 8 observation queries). The similarities are the engine's block-local
    ("lightning") ones; nothing is remembered between compressions."""
    importance = pool(attention(state), p.pool_kernel)
    lam = p.importance_weight
    score = lam * importance - (1 - lam) * redundancy(state, p.redundancy_tau)
    return score, torch.zeros_like(score)


def keydiff(state: CacheState, p: NoParams) -> tuple[torch.Tensor, torch.Tensor]:
    """KeyDiff (Park et al., 2025): keep the keys least like the others, by the cosine similarity
    of each key with the mean of the request's unit keys (per layer and KV head; times the mean's
    length, which is the same for the whole row). It needs no queries, so no attention scores.
    Computed in the keys' own dtype with float32 norms: no float32 copy of the keys."""
    keys = state.keys  # [layers, kv_heads, T, head_dim]
    norm = torch.linalg.vector_norm(keys, dim=-1, keepdim=True, dtype=torch.float32)
    inv_norm = norm.clamp(min=1e-12) ** -1
    anchor = (keys * inv_norm.to(keys.dtype)).mean(-2, keepdim=True)  # length <= 1: no overflow
    score = -(keys @ anchor.mT).float() * inv_norm
    return score.squeeze(-1), torch.zeros_like(state.prev_scores)


@dataclass(frozen=True)
class RandomParams:
    seed: int = 0

    def __post_init__(self):
        _check(self, "seed", "an integer", kind=int)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer hash (splitmix64's finalizer; int64 products wrap around)."""
    x = x ^ ((x >> 31) & 0x1FFFFFFFF)
    x = x * 0x5851F42D4C957F2D
    return x ^ ((x >> 29) & 0x7FFFFFFFF)


def random(state: CacheState, p: RandomParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Random eviction: each token draws a priority once, the first time it is scored, from a
    hash of (seed, layer, KV head, cache index, the stored priorities) and keeps it; the best
    priorities stay, so each KV head keeps a uniform sample of the tokens it has seen (reservoir
    sampling). Hashing, not a global generator, makes it depend on the state alone."""
    kv_heads, num_tokens = state.prev_scores.shape[1:]
    device = state.prev_scores.device
    prev = state.prev_scores.long()  # priorities are integers below 2^24, exact in float32
    salt = prev.sum(-1, keepdim=True)  # exact, so the same in any reduction order
    layer = torch.arange(state.layers.start, state.layers.stop, device=device).view(-1, 1, 1)
    x = layer * 0x9E3779B9 + torch.arange(kv_heads, device=device).view(1, -1, 1) * 0x85EBCA6B
    x = _mix(x + torch.arange(num_tokens, device=device) * 0xC2B2AE35 + p.seed)
    draw = (_mix(x ^ salt) & 0xFFFFFF).clamp(min=1)
    score = torch.where(prev > 0, prev, draw).float()
    return score, score


class Policy(NamedTuple):
    score: Callable[[CacheState, object], tuple[torch.Tensor, torch.Tensor]]
    params: type  # a dataclass: its fields are the keys of `policy_args`


POLICIES = {
    "spans": Policy(spans, SpansParams),
    "zipage": Policy(zipage, ZipageParams),
    "snapkv": Policy(snapkv, SnapKVParams),
    "h2o": Policy(h2o, NoParams),
    "rkv": Policy(rkv, RKVParams),
    "keydiff": Policy(keydiff, NoParams),
    "streamingllm": Policy(streamingllm, StreamingParams),
    "recency": Policy(recency, NoParams),
    "random": Policy(random, RandomParams),
}


def make_policy(name: str, args: dict | None = None) -> Callable[[CacheState], tuple]:
    """The policy `name` with `args` for its parameters (defaults for the rest): a function of the
    state. Unknown names and keys, and values out of range, raise a ValueError."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
    score, params = POLICIES[name]
    allowed = [f.name for f in fields(params)]
    if not isinstance(args, dict | None) or set(args or {}) - set(allowed):
        raise ValueError(
            f"policy_args must be a dict of the {name!r} policy's parameters "
            f"({', '.join(allowed) or 'none'}), got {args!r}"
        )
    return partial(score, p=params(**(args or {})))


def select(score: torch.Tensor, keep: int, window: int, num_sinks: int) -> torch.Tensor:
    """Indices of the `keep` best tokens per row, window and sinks included, in position order.
    A policy's own always-kept tokens (infinite) rank below these: never above the window."""
    score = protect(score, num_sinks, window)
    # A stable sort breaks ties (pooled scores repeat) by position, the same on every device.
    order = score.sort(dim=-1, descending=True, stable=True).indices
    return order[..., :keep].sort(-1).values
