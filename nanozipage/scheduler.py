"""Which requests run in the next step, and what their results do to the queues.

A step is either a prefill step (prompt chunks, run eagerly through the varlen prefill kernel)
or a decode step (one token for every running request, run through a CUDA graph). We alternate
rather than mix: while prompts wait and requests decode, every prefill step is followed by a
decode step. Mixing would run decodes through the prefill kernel and outside the CUDA graph;
alternating keeps decode on its fast path, and a running request waits at most one prefill
step (at most `max_num_batched_tokens` tokens) between two of its tokens. A prompt longer than
`max_num_batched_tokens` is prefilled in chunks over several prefill steps.

When a decode step finds no free block for a request, the request at the tail of the running
queue is preempted: its blocks are freed and it goes back to the front of the waiting queue, to
be recomputed (prompt and generated tokens alike) when blocks free up.
"""

from collections import deque

from nanozipage.block_manager import BlockManager
from nanozipage.config import Config
from nanozipage.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: Config, num_blocks: int):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.eos = config.eos
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.last_step_was_prefill = False
        self.num_preemptions = 0

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        decodable = [seq for seq in self.running if not seq.in_prefill]
        if not (decodable and self.last_step_was_prefill):
            seqs = self._schedule_prefill()
            if seqs:
                self.last_step_was_prefill = True
                return seqs, True
        self.last_step_was_prefill = False
        return self._schedule_decode(), False

    def _schedule_prefill(self) -> list[Sequence]:
        """Chunks of prompts already admitted first, then newly admitted prompts."""
        seqs, budget = [], self.max_num_batched_tokens
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                seq.num_new_tokens = min(len(seq) - seq.num_computed_tokens, budget)
                budget -= seq.num_new_tokens
                seqs.append(seq)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(self.waiting.popleft())
            seq.num_new_tokens = min(len(seq) - seq.num_computed_tokens, budget)
            budget -= seq.num_new_tokens
            seqs.append(seq)
        return seqs

    def _schedule_decode(self) -> list[Sequence]:
        seqs = []
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING or seq.in_prefill:
                continue  # preempted by an earlier request of this loop, or still prefilling
            while self.block_manager.num_missing_blocks(seq) > self.block_manager.num_free_blocks:
                self._preempt(self.running[-1])
                if seq.status != SequenceStatus.RUNNING:
                    break
            else:
                self.block_manager.append_blocks(seq)
                seq.num_new_tokens = 1
                seqs.append(seq)
        assert seqs, "no request can make progress"
        return seqs

    def _preempt(self, seq: Sequence):
        self.num_preemptions += 1
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int], logprobs: list[float] | None):
        """Advance each request by the tokens it was fed; append the sampled tokens.

        `token_ids` holds one token per request that sampled, in order: every request of a
        decode step, and those prefill requests whose chunk reached their last token.
        """
        sampled = iter(zip(token_ids, logprobs or [None] * len(token_ids)))
        for seq in seqs:
            seq.num_computed_tokens += seq.num_new_tokens
            self.block_manager.hash_blocks(seq)
            if seq.num_computed_tokens < len(seq):
                continue  # a prefill chunk that did not reach the end samples nothing
            token_id, logprob = next(sampled)
            seq.append_token(token_id, logprob if seq.sampling_params.logprobs else None)
            params = seq.sampling_params
            if (
                not params.ignore_eos and token_id == self.eos
            ) or seq.num_completion_tokens == params.max_tokens:
                seq.status = SequenceStatus.FINISHED
                self.block_manager.deallocate(seq)
                self.running.remove(seq)
