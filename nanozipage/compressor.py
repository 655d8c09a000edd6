"""Compression beside the model runner: one `Compression` record each, from plan to done.

- planned: the scheduler chose the request and the block manager gave the record its new
  blocks (`Scheduler._plan_compression`); the request still reads its old blocks.
- running: `launch` queued its work on a side stream while the other requests decode (on the
  CPU: done at once): `run` scores every cached token with the policy, keeps `kv_budget` per
  (layer, KV head) in position order and moves the kept K, V and scores into the new blocks.
- done: `poll` saw its work finish; the request switches to its new blocks and the old ones
  are freed (`Scheduler.finish_compression`).
Synchronous compression is the same path followed by a wait. Under tensor parallelism rank 0
forwards each launch and every rank compresses its own KV heads (a GQA group never spans two).
"""

from dataclasses import dataclass, field, replace

import torch

from nanozipage.config import max_blocks
from nanozipage.context import to_device
from nanozipage.kernels import gather_tokens, move_kept
from nanozipage.policy import CacheState, make_policy, select
from nanozipage.sequence import Sequence

PLANNED, RUNNING, DONE = "planned", "running", "done"


@dataclass(slots=True, eq=False)
class Compression:
    """One request's compression (ranks 1..N-1 get copies without `seq`)."""

    seq: Sequence | None
    old_table: list[int]  # the blocks holding the request's cached tokens before
    first: bool  # the request's first: `first_window` queries, no stored scores yet
    query_slot: int  # its window queries' slot in the query cache
    # Its block table once done: the kept tokens fill all but the last block, left for the next
    new_table: list[int] = field(default_factory=list)
    state: str = PLANNED
    event: torch.cuda.Event | None = None  # fires when its work is done; None after, or on a CPU


def on_worker(runner, method: str, *args):
    """Ranks 1..N-1: run one of rank 0's compressor calls on this rank's compressor."""
    getattr(runner.compressor, method)(*args)


class Compressor:
    def __init__(self, config, kv_cache, score_cache, q_cache, workers=None):
        """The model runner's KV pool, stored scores and window queries (`allocate_kv_cache`)."""
        self.config, self.workers = config, workers
        self.kv_cache, self.score_cache, self.q_cache = kv_cache, score_cache, q_cache
        self.stream = torch.cuda.Stream() if kv_cache.is_cuda else None
        self.running: list[Compression] = []  # launched and not yet done, oldest first
        if config.kv_budget and self.stream:  # pay the GPU's first-use costs now, not mid-run
            table = [0] * max_blocks(config.kv_budget, config.block_size)  # all block 0, unused
            for first in (True, False):
                self.run(Compression(None, table, first, 0, table))
            torch.cuda.synchronize()

    def launch(self, compressions: list[Compression]):
        """Rank 0: start planned compressions; they stay listed in `running` until done."""
        if not compressions:
            return
        if self.workers:  # copies without the request
            copies = [replace(c, seq=None) for c in compressions]
            self.workers.call(on_worker, "launch_copies", copies)
        for compression in compressions:  # running from here: a failure below is waited for
            compression.state = RUNNING
            self.running.append(compression)
        self._queue(compressions)

    def launch_copies(self, compressions: list[Compression]):
        """Ranks 1..N-1: rank 0's launch; listed until rank 0 says they are done (`follow`)."""
        self._queue(compressions)
        self.running += [c for c in compressions if c.event is not None]

    def _queue(self, compressions: list[Compression]):
        """Every rank: run them on the side stream after the main stream's work (their last K/V)."""
        if self.stream:
            self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for compression in compressions:
                self.run(compression)
                compression.event = self.stream and self.stream.record_event()

    def poll(self, wait: bool = False) -> list[Compression]:
        """Rank 0: the running compressions whose work is done (all with `wait`), listed until
        `done`. Their old blocks will be freed: the other ranks order their main stream after."""
        if wait and self.stream:
            self.stream.synchronize()
        fired = [c for c in self.running if c.event is not None]
        num_fired = next((i for i, c in enumerate(fired) if not (wait or c.event.query())), None)
        fired = fired[:num_fired]  # the stream runs them in order
        if self.workers and (fired or wait):  # after a failed launch, all: the ranks may differ
            self.workers.call(on_worker, "follow", None if wait else len(fired))
        for compression in fired:
            compression.event = None
        return [c for c in self.running if c.event is None]

    def done(self, compression: Compression):
        """Rank 0: the request reads its new blocks now (`Scheduler.finish_compression`)."""
        compression.state = DONE
        self.running.remove(compression)

    def follow(self, num_done: int | None):
        """Ranks 1..N-1: later work follows the oldest compressions (None: all), done on rank 0."""
        for compression in self.running[:num_done]:
            torch.cuda.current_stream().wait_event(compression.event)
        self.running = self.running[num_done:] if num_done is not None else []

    @torch.inference_mode()
    def run(self, compression: Compression):
        """Score, select and move the kept tokens, a group of layers at a time (bounds memory)."""
        config, b, w = self.config, self.config.block_size, self.config.window
        policy, device = make_policy(config.policy, config.policy_args), self.kv_cache.device
        keep = (len(compression.new_table) - 1) * b
        old = to_device(compression.old_table, device)
        new = to_device(compression.new_table[:-1], device)
        end = (compression.query_slot + 1) * config.first_window  # its slot's end (`_query_row`)
        window_rows = slice(end - (config.first_window if compression.first else w), end)
        for start in range(0, self.kv_cache.shape[1], config.compress_layers):
            layers = slice(start, start + config.compress_layers)
            kv_cache, score_cache = self.kv_cache[:, layers], self.score_cache[layers]
            prev = gather_tokens(score_cache, old)  # the stored scores: [L, kvh, T]
            prev[..., 0 if compression.first else keep :] = 0  # none stored yet, or newer tokens
            queries = self.q_cache[layers, window_rows]
            absolute = range(start, start + len(prev))  # the group's layer indices
            state = CacheState(kv_cache[0], old, queries, prev, compression.first, absolute, keep)
            score, stored = policy(state)
            kept = select(score, keep, w, config.num_sinks)  # [L, kvh, keep]
            move_kept(kv_cache, score_cache, stored, old, new, kept)
