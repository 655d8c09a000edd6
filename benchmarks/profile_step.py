"""Where a decode step's GPU time goes: `PYTHONPATH=. python benchmarks/profile_step.py
(--model DIR | --model-shape qwen3-8b) [--batch 28] [--context 2350] [--tensor-parallel-size 2]`.

Fills a batch of requests to about --context cached tokens, then records 20 steady-state engine
steps (CUDA graphs, overlapped loop, full KV) with the torch profiler, and prints each
kernel's count and GPU time per step, largest first, and the GPU kernel time per step. Under
tensor parallelism it profiles rank 0's kernels, where an all-reduce's time includes its wait
for the peer.
"""

import argparse
import random

import torch
from torch.profiler import ProfilerActivity, profile

from bench import MODEL_SHAPES, config_only_model
from nanozipage import LLM, SamplingParams


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="checkpoint directory")
    model.add_argument("--model-shape", choices=list(MODEL_SHAPES), help="random weights")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--batch", type=int, default=28)
    parser.add_argument("--context", type=int, default=2350)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    blocks = args.batch * (-(-(args.context + 200) // 256))
    model, engine = args.model, {"tensor_parallel_size": args.tensor_parallel_size}
    if args.model_shape:
        model, engine["load_format"] = config_only_model(args.model_shape), "dummy"
    llm = LLM(model, kv_budget=None, num_kvcache_blocks=blocks, max_num_seqs=args.batch, **engine)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.6, max_tokens=150, ignore_eos=True)
    for _ in range(args.batch):
        llm.add_request([rng.randrange(10000) for _ in range(args.context)], params)
    while llm.scheduler.waiting or any(s.in_prefill for s in llm.scheduler.running):
        llm.step()
    for _ in range(10):
        llm.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            llm.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in kernels) / args.steps
    print(f"batch {args.batch}, context {args.context}: GPU kernel time {total / 1000:.3f} ms/step")
    for e in kernels[:40]:
        print(
            f"{e.count / args.steps:7.1f}/step {e.device_time_total / args.steps:9.1f} us/step"
            f"  {e.key[:110]}"
        )
    llm.close()


if __name__ == "__main__":
    main()
