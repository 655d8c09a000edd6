"""Where one compression's GPU time goes: `PYTHONPATH=. python benchmarks/profile_compression.py
[--policy NAME ...]`.

The setting of `bench.py --task compress-cost` without the decoding batch: random weights of the
Qwen3-0.6B shape, one request of 2,304 cached tokens (9 blocks of 256) compressed to 2,048 by
`Compressor.run`, the same record again and again. Records 20 later and 20 first compressions
with the torch profiler and prints each kernel's count and GPU time per compression, largest
first, and their sum. Needs a GPU: the figures are CUDA kernel times.
"""

import argparse
import random

import torch
from torch.profiler import ProfilerActivity, profile

from bench import config_only_model, planned_compression
from nanozipage import LLM
from nanozipage.compressor import Compression
from nanozipage.config import max_blocks
from nanozipage.policy import POLICIES


def one_compression(policy: str, budget: int = 2048, b: int = 256) -> tuple[LLM, Compression]:
    """An engine with room for one request of N_max blocks, and that request's compression."""
    llm = LLM(
        config_only_model("qwen3-0.6b"),
        load_format="dummy",
        kv_budget=budget,
        block_size=b,
        num_kvcache_blocks=2 * max_blocks(budget, b),
        policy=policy,
    )
    return llm, planned_compression(llm, budget, random.Random(0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", nargs="+", choices=list(POLICIES), default=["spans"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_compression.py needs a GPU: it reports CUDA kernel times")
    for policy in args.policy:
        llm, job = one_compression(policy)
        compressor, repeat = llm.model_runner.compressor, 20
        for first in (False, True):
            job.first = first
            for _ in range(5):  # warm-up
                compressor.run(job)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(repeat):
                    compressor.run(job)
                torch.cuda.synchronize()
            kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
            kernels.sort(key=lambda e: -e.device_time_total)
            total = sum(e.device_time_total for e in kernels) / repeat
            print(
                f"{policy}, {'first' if first else 'later'} compression: {total:.1f} us of kernels"
            )
            for e in kernels:
                print(
                    f"{e.count / repeat:7.1f} {e.device_time_total / repeat:9.1f} us  {e.key[:100]}"
                )
        llm.close()


if __name__ == "__main__":
    main()
