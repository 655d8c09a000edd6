"""Which requests run in the next step (`LLMEngine.step`), and what their tokens do to the queues.

A step is all prefill (prompt chunks, run eagerly) or all decode (one token per running request,
a CUDA graph); mixing would run decodes outside the graph. While prompts wait, prefill and decode
steps alternate, so a request waits at most one prefill step between two tokens. A decode step
short of blocks preempts the running queue's tail, to be recomputed later (prompt and output).
"""

from collections import deque
from collections.abc import Callable

from nanozipage.block_manager import BlockManager
from nanozipage.compressor import DONE, PLANNED, Compression
from nanozipage.config import Config
from nanozipage.sequence import PENDING, Sequence, SequenceStatus
from nanozipage.stop import StopConditions


class Scheduler:
    def __init__(self, config: Config, num_blocks: int, num_query_slots: int, stop: StopConditions):
        self.config, self.stop = config, stop
        self.free_query_slots = list(range(num_query_slots - 1, -1, -1))
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.last_step_was_prefill = False
        self.num_preemptions = 0

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool, list[Compression]]:
        """The next step's requests, whether it prefills, and the compressions to launch first."""
        for seq in self.running:  # hybrid scheduling (docs/DESIGN.md section 3)
            if seq.query_slot < 0 and self.free_query_slots:
                seq.query_slot = self.free_query_slots.pop()
        prefer_decode = self.last_step_was_prefill and any(not s.in_prefill for s in self.running)
        # A decode that preempted every request it could run leaves them waiting: prefill again.
        for is_prefill in (False, True) if prefer_decode else (True, False, True):
            seqs, compressions = self._schedule_prefill() if is_prefill else self._schedule_decode()
            if seqs or compressions:
                self.last_step_was_prefill = is_prefill
                return seqs, is_prefill, compressions
        return [], False, []  # every request that could run waits for a compression or a token

    def _release_query_slot(self, seq: Sequence):
        if seq.query_slot >= 0:
            self.free_query_slots.append(seq.query_slot)
            seq.query_slot = -1

    def _needs_query_slot(self, seq: Sequence) -> bool:
        """A request must hold a slot once its queries may be window queries: from the window of
        its N_max-th block on (a prompt that long needs one to be admitted)."""
        window_start = seq.max_blocks * self.config.block_size - self.config.first_window
        return seq.query_slot < 0 and seq.num_computed_tokens + seq.num_new_tokens > window_start

    def _schedule_prefill(self) -> tuple[list[Sequence], list]:
        """Chunks of prompts already admitted first, then newly admitted prompts."""
        seqs, budget = [], self.config.max_num_batched_tokens
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                seq.num_new_tokens = min(seq.prefill_end - seq.num_computed_tokens, budget)
                budget -= seq.num_new_tokens
                seqs.append(seq)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.last_token == PENDING or self._waits_for_prefix(seq):
                break  # preempted with its last token still on the GPU, or see below
            seq.num_new_tokens = len(seq)  # a prompt reaching its window needs a slot at once
            if self._needs_query_slot(seq):
                if not self.free_query_slots:
                    break
                seq.query_slot = self.free_query_slots.pop()
            if not self.block_manager.allocate(seq):
                self._release_query_slot(seq)
                break
            seq.status = SequenceStatus.RUNNING
            self.running.append(self.waiting.popleft())
            seq.num_new_tokens = min(seq.prefill_end - seq.num_computed_tokens, budget)
            budget -= seq.num_new_tokens
            seqs.append(seq)
        return seqs, []

    def _waits_for_prefix(self, seq: Sequence) -> bool:
        """The samples of one prompt (`SamplingParams.n`) share its blocks through the prefix
        cache: a later sample waits until the first one's prompt blocks are registered."""
        first = seq.first_sample
        if first is None or first.status != SequenceStatus.RUNNING or first.num_compressions:
            return False
        return first.num_hashed_blocks < (first.num_prompt_tokens - 1) // self.config.block_size

    def _schedule_decode(self) -> tuple[list[Sequence], list[Compression]]:
        seqs, compressions = [], []
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING or seq.in_prefill or seq.compression:
                continue  # preempted by an earlier request of this loop, prefilling, compressing
            if seq.num_completion_tokens == seq.sampling_params.max_tokens:
                continue  # its last token is on its way
            seq.num_new_tokens = 1
            if self._needs_query_slot(seq):
                continue  # waits in the running queue until a query slot frees up
            if seq.needs_compression:
                if self._may_compress(seq, seqs):
                    compressions.append(self._plan_compression(seq))
            elif self._free_blocks(self.block_manager.num_missing_blocks, seq, seqs):
                self.block_manager.append_blocks(seq)
                seqs.append(seq)
        return seqs, compressions

    def _may_compress(self, seq: Sequence, scheduled: list[Sequence]) -> bool:
        """Few enough blocks are under compression, and the fresh blocks it takes are free."""
        busy = sum(len(s.block_table) for s in self.running if s.compression)
        if busy and busy + len(seq.block_table) > self.config.max_compress_blocks:
            return False
        return self._free_blocks(self.block_manager.num_fresh_blocks, seq, scheduled)

    def _plan_compression(self, seq: Sequence) -> Compression:
        """Recorded on seq before a block is taken for it: a failure at any point leaves a
        record that gives them back (`cancel_compression`)."""
        first = not seq.num_compressions
        seq.compression = compression = Compression(seq, [], first, seq.query_slot)
        self.block_manager.plan_compression(seq, compression)
        return compression

    def finish_compression(self, compression: Compression):
        """The compression's work is done: seq reads its new blocks from the next step on."""
        seq = compression.seq
        if seq.compression is not compression:  # finished already, then failed before `done`
            return
        self.block_manager.finish_compression(seq, compression)
        num_kept_blocks = len(compression.new_table) - 1
        seq.num_evicted += (len(compression.old_table) - num_kept_blocks) * self.config.block_size
        seq.num_compressions += 1
        seq.peak_kv_blocks = max(seq.peak_kv_blocks, len(compression.old_table))
        seq.compression = None
        if seq.is_finished:  # its last token arrived (or it was aborted) while it was compressed
            self._free(seq)

    def cancel_compression(self, compression: Compression):
        """A failed step planned it and never launched it: nothing was written."""
        if compression.state == PLANNED:
            self.block_manager.cancel_compression(compression.seq, compression)
            compression.seq.compression, compression.state = None, DONE

    def _free_blocks(self, needed: Callable, seq: Sequence, scheduled: list[Sequence]) -> bool:
        """Preempt until `needed(seq)` blocks are free; False if seq must wait (or was preempted).
        Victims: the running queue's tail, slotless first; never a compressed request (its memory
        is bounded and accounted for), nor one already scheduled in this step. `needed` is asked
        again after each preemption: a victim that shared seq's blocks leaves them to seq alone."""
        while self.block_manager.num_free_blocks < needed(seq):
            unscheduled = [s for s in reversed(self.running) if s not in scheduled]
            candidates = [s for s in unscheduled if not s.num_compressions and not s.compression]
            if not candidates:
                return False
            victim = next((s for s in candidates if s.query_slot < 0), candidates[0])
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence):
        self.num_preemptions += 1
        self.running.remove(seq)
        self._free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def postprocess(
        self, seqs: list[Sequence], sampled: list[tuple[Sequence, int, float | None]]
    ) -> list[Sequence]:
        """A launched step's samples reached the host (`InFlight.collect`): register its computed
        blocks in the prefix cache; returns the requests finished by a stop condition."""
        finished = []
        for seq, index, logprob in sampled:
            if seq.sampling_params.logprobs:
                seq.logprobs.append(logprob)
            if self.stop.check(seq, index + 1):
                del seq.token_ids[index + 1 :]  # placeholders of steps launched after its end
                finished.append(seq)
        for seq in seqs:
            self.block_manager.hash_blocks(seq)
        for seq in finished:
            self._finish(seq)
        return finished

    def abort(self, seq: Sequence):
        """Finish seq wherever it is; its blocks are freed (after its compression, if one runs)."""
        if not seq.is_finished:
            seq.finish_reason = "abort"
            while seq.last_token == PENDING:  # places of tokens in flight, which never come
                seq.token_ids.pop()
            self._finish(seq)

    def _finish(self, seq: Sequence):
        for queue in (self.running, self.waiting):  # not by status: an interrupt may fall between
            if seq in queue:
                queue.remove(seq)
        seq.status = SequenceStatus.FINISHED
        if not seq.compression:  # else `finish_compression` frees it once its work is done
            self._free(seq)

    def _free(self, seq: Sequence):
        self.block_manager.deallocate(seq)
        self._release_query_slot(seq)
