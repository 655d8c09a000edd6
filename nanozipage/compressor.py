"""Compression beside the model runner: plan, launch, poll (or wait).

The scheduler picks who compresses and the block manager gives each a new block table; `launch`
scores every cached token with the policy, keeps `kv_budget` per (layer, KV head) in position
order, and compacts K, V and the kept scores into the new blocks. With `async_compression` that
runs on a side stream while others decode, and `poll` returns the finished ones, whose old blocks
the scheduler then frees. Under tensor parallelism rank 0 forwards each call and every rank
compacts its own KV heads (a GQA group, whose queries score its KV head, never spans two ranks).
"""

from dataclasses import dataclass

import torch

from nanozipage.context import to_device
from nanozipage.kernels import compact
from nanozipage.policy import POLICIES, CacheState, select
from nanozipage.sequence import Sequence


@dataclass(slots=True)
class Compaction:
    """One request's compaction, as every rank needs it (planned by the block manager)."""

    old_table: list[int]  # the blocks holding the request's cached tokens before the compression
    new_table: list[int]  # the blocks its kept tokens go to
    first: bool  # its first compression (pooling, no stored scores)
    query_slot: int  # its window queries' slot in the query cache


def on_worker(runner, method: str, *args):
    """Ranks 1..N-1: run one of rank 0's compressor calls on this rank's compressor."""
    getattr(runner.compressor, method)(*args)


class Compressor:
    def __init__(self, config, kv_cache, score_cache, q_cache, workers=None):
        """The model runner's KV pool, stored scores and window queries (`allocate_kv_cache`)."""
        self.config, self.workers = config, workers
        self.kv_cache, self.score_cache, self.q_cache = kv_cache, score_cache, q_cache
        self.stream = torch.cuda.Stream() if kv_cache.is_cuda else None
        self.under_way = []  # (event or None, jobs) of the compactions launched, in order
        if config.kv_budget and self.stream:  # the GPU's first-use costs at start, not at the
            # first compression mid-run (3.6-4.1 s on an H200): N_max blocks, all block 0, unused
            n = config.kv_budget // config.block_size
            self.run([Compaction([0] * (n + 1), [0] * n, first, 0) for first in (True, False)])

    def plan(self, jobs: list[tuple[Sequence, list[int]]]) -> list[Compaction]:
        """Each job is a request, already given its new block table, with its old table."""
        b = self.config.block_size
        return [  # num_compressions was counted when the compression was planned
            Compaction(old, seq.block_table[: seq.kv_budget // b],
                       first=seq.num_compressions == 1, query_slot=seq.query_slot)
            for seq, old in jobs
        ]  # fmt: skip

    def launch(self, jobs: list[tuple[Sequence, list[int]]]):
        """Rank 0: compact each request from its old block table into its new one."""
        plans = self.plan(jobs)
        if self.workers:
            self.workers.call(on_worker, "compact", plans)
        self.compact(plans, jobs)

    def compact(self, plans: list[Compaction], jobs: list | None = None):
        """Every rank: run the compactions; asynchronous ones go on the side stream after the
        work already queued on the main stream (the requests' last K/V)."""
        if not self.config.async_compression:  # on the main stream, before the step
            self.run(plans)
            return
        if self.stream:
            self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):  # no side stream off the GPU: done at once
            self.run(plans)
        self.under_way.append((self.stream and self.stream.record_event(), jobs))

    def poll(self, wait: bool = False) -> list[tuple[Sequence, list[int]]]:
        """Rank 0: the jobs whose compaction has finished (all with `wait`). Their old blocks will
        be freed, so the other ranks first order their main stream after them (`follow`)."""
        if wait and self.stream:
            self.stream.synchronize()
        done = [wait or event is None or event.query() for event, _ in self.under_way]
        if self.workers and any(done):
            self.workers.call(on_worker, "follow", done)
        finished = [job for (_, jobs), d in zip(self.under_way, done) if d for job in jobs]
        self.under_way = [entry for entry, d in zip(self.under_way, done) if not d]
        return finished

    def follow(self, done: list[bool]):
        """Ranks 1..N-1: later work follows the compactions rank 0 saw finish (same order)."""
        for (event, _), d in zip(self.under_way, done):
            if d and event is not None:
                torch.cuda.current_stream().wait_event(event)
        self.under_way = [entry for entry, d in zip(self.under_way, done) if not d]

    @torch.inference_mode()
    def run(self, plans: list[Compaction]):
        """Score, select and compact, a group of layers at a time (bounds temporary memory)."""
        config, b, w = self.config, self.config.block_size, self.config.window
        policy, device = POLICIES[config.policy], self.kv_cache.device
        for plan in plans:
            keep = len(plan.new_table) * b
            old, new = to_device(plan.old_table, device), to_device(plan.new_table, device)
            window_rows = slice(plan.query_slot * w, (plan.query_slot + 1) * w)
            for start in range(0, self.kv_cache.shape[1], config.compress_layers):
                layers = slice(start, start + config.compress_layers)
                k_cache, v_cache = self.kv_cache[0, layers], self.kv_cache[1, layers]
                score_cache = self.score_cache[layers]
                # The request's keys and stored scores, dense: [layers, kvh, T, ...]
                keys = k_cache[:, old].transpose(1, 2).flatten(2, 3)
                prev = score_cache[:, old].transpose(1, 2).flatten(2)
                prev[..., 0 if plan.first else keep :] = 0  # newer tokens were never scored
                state = CacheState(keys, self.q_cache[layers, window_rows], prev, plan.first, b)
                score, stored = policy(state, config)
                kept = select(score, keep, w, config.num_sinks)  # [L, kvh, keep]
                compact(k_cache, old, new, kept)
                compact(v_cache, old, new, kept)
                # Scores to store are this compression's (dense), not the cache's: gathered.
                kept_scores = stored.gather(2, kept).unflatten(2, (-1, b))
                score_cache[:, new] = kept_scores.transpose(1, 2)
