"""Host cost of planning one decode step (no GPU needed): `model_runner.step_plan` for a batch of
running requests, the Python work the engine does every step before it launches the GPU. With
the overlapped loop it hides behind the step before; when it is longer than a short step (the
0.6B shape's nano workload), the GPU waits for it. Reports the best of many calls, per batch
size, with and without window queries. The figures go to BENCHMARKS.md.

    PYTHONPATH=. python benchmarks/plan_cost.py
"""

import random
import time

from nanozipage.model_runner import step_plan
from nanozipage.sampling_params import SamplingParams
from nanozipage.sequence import Sequence


def decode_batch(num_requests: int, block_size: int = 256, seed: int = 0) -> list[Sequence]:
    """Requests of 100-2,000 tokens, each decoding its last token, each with a query slot."""
    rng, seqs = random.Random(seed), []
    for i in range(num_requests):
        n = rng.randint(100, 2000)
        seq = Sequence([rng.randrange(1000) for _ in range(n)], SamplingParams(), block_size)
        seq.block_table = list(range(i * 10, i * 10 + -(-n // block_size)))
        seq.num_computed_tokens, seq.num_new_tokens, seq.query_slot = n - 1, 1, i
        seqs.append(seq)
    return seqs


def best_seconds(seqs: list[Sequence], rows: int | None, repeat: int = 300) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        step_plan(seqs, rows, is_prefill=False)
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    for num_requests in (32, 256):
        seqs = decode_batch(num_requests)
        for rows in (None, 16):  # no query slots, or 16 query rows per slot
            us = 1e6 * best_seconds(seqs, rows)
            print(f"{num_requests} requests, query rows {rows}: {us:.0f} us")
