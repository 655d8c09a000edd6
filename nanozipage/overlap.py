"""The engine loop's one trick, whole: step N+1 is launched before step N's tokens are read back.

Planning needs only lengths, and every running request gains one token per step, so the host
plans step N+1 while the GPU runs step N. A sampled token is a `PENDING` placeholder, read on the
device by step N+1 (`pending_rows`) and filled by `InFlight.collect` a step later; everything else
sees plain token ids. With the overlapped loop off, each step is read back as soon as launched."""

from dataclasses import dataclass

import torch

from nanozipage.sequence import PENDING, Sequence


class Samples:
    """One step's sampled tokens: on the device, where the next step reads its input ids, and
    on their way to pinned host memory, where `tolist` waits for that copy only."""

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor | None, workers=None):
        self.tokens, self.workers = tokens, workers
        self._host = [t.to("cpu", non_blocking=True) for t in (tokens, logprobs) if t is not None]
        self._copied = torch.cuda.current_stream().record_event() if tokens.is_cuda else None

    def tolist(self) -> tuple[list[int], list[float | None]]:
        if self.workers:  # a dead worker would leave NCCL waiting: check them while waiting
            self.workers.wait_on_gpu(self._copied)
        elif self._copied:
            self._copied.synchronize()
        tokens, *logprobs = (t.tolist() for t in self._host)
        return tokens, logprobs[0] if logprobs else [None] * len(tokens)


@dataclass(slots=True)
class InFlight:
    """A launched step whose samples have not been read back yet."""

    seqs: list[Sequence]
    sampling: list[tuple[Sequence, int]]  # requests that sample, with their placeholder index
    samples: Samples | None  # None when no request samples (a prefill chunk mid-prompt)

    def collect(self) -> list[tuple[Sequence, int, float | None]]:
        """Fill the placeholders; returns (request, token index, logprob) per request. One that
        finished (or was aborted) since the launch keeps nothing: the token is past its end."""
        token_ids, logprobs = self.samples.tolist() if self.samples else ([], [])
        sampled = []
        for (seq, index), token_id, logprob in zip(self.sampling, token_ids, logprobs):
            if not seq.is_finished:
                seq.token_ids[index] = token_id
                sampled.append((seq, index, logprob))
        return sampled


class Overlap:
    """The step launched last and not yet read back (`overlap_scheduling=True`)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.in_flight: InFlight | None = None

    def pending_tokens(self) -> torch.Tensor | None:
        """The samples that the next step reads its PENDING input ids from, on the device."""
        samples = self.in_flight and self.in_flight.samples
        return samples.tokens if samples else None

    def advance(self, seqs: list[Sequence], samples: Samples | None) -> InFlight | None:
        """Advance the launched step's requests by the tokens fed, with a PENDING place for each
        token being sampled. Returns the step to read back now: if overlapped, the one before."""
        sampling = []
        for seq in seqs:
            if seq.samples_this_step:
                seq.sample_row = len(sampling)
                sampling.append((seq, len(seq)))
                seq.token_ids.append(PENDING)
            seq.num_computed_tokens += seq.num_new_tokens
        launched = InFlight(seqs, sampling, samples) if seqs else None
        if not self.enabled:
            return launched
        previous, self.in_flight = self.in_flight, launched
        return previous

    def take(self) -> InFlight | None:
        """The step in flight, to be read back now (after a failed step)."""
        launched, self.in_flight = self.in_flight, None
        return launched


def pending_rows(seqs: list[Sequence]) -> list[int] | None:
    """`StepPlan.pending_rows`: per request, the row of its PENDING input id in the previous
    step's samples, else -1; None if no input id is PENDING."""
    rows = [seq.sample_row if seq.last_token == PENDING else -1 for seq in seqs]
    return rows if max(rows) >= 0 else None
