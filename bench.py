"""Benchmarks: `python bench.py [--task throughput|decode-step|compress-cost] [--workload nano|r1]
[--mode full|zipage|both] [--kv-budget N[,N...]] [--sync-compression] [--model DIR] [--plot PNG]`.

throughput (default) runs a workload in full-KV mode, in zipage mode (Compressed
PagedAttention, once for each budget of --kv-budget), or both in one process, and reports for
each: output tok/s (output tokens over wall time, prefill included, after a warm-up), peak and
mean number of requests per decode step, preemptions, compressions and their GPU time as a
share of wall time (overlapped with decoding when asynchronous); and each budget's ratio to
full KV.
Workloads: nano (default): nano-vllm's published benchmark, 256 requests, prompt and output
lengths uniform in [100, 1024]. r1: long reasoning, 32 requests, prompts in [128, 512], outputs
in [8192, 16384], KV pool capped at 256 blocks of 256 tokens in both modes. Both use random
token ids, temperature 0.6, ignore_eos, seed 0.
decode-step: wall time of one engine decode step (scheduling, inputs, forward, sampling) at
batch 1 and 256, with CUDA graphs and eager.
compress-cost: GPU time of one compression of one request against one decode step of --batch
requests, and that step's time after a synchronous or beside an asynchronous compression.
With no --model, the Qwen3-0.6B architecture with random weights is written once to a cache
folder, so that the benchmark needs no download. Prints a table, then one JSON line.
"""

import argparse
import gc
import json
import os
import random
import time
from dataclasses import replace

import torch
from safetensors.torch import save_file

from nanozipage import LLM, SamplingParams
from nanozipage.sequence import Sequence

QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "torch_dtype": "bfloat16",
    "eos_token_id": 151645,
}


def random_qwen3(hf: dict, name: str) -> str:
    """Write a Qwen3 config with random weights (seed 0) once; return its directory."""
    path = os.path.join(os.path.expanduser("~/.cache/nanozipage"), name)
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    h, inter, d = hf["hidden_size"], hf["intermediate_size"], hf["head_dim"]
    q, kv = hf["num_attention_heads"] * d, hf["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (hf["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(hf["num_hidden_layers"]):
        shapes.update(
            {
                f"model.layers.{i}.{name}": shape
                for name, shape in {
                    "self_attn.q_proj.weight": (q, h),
                    "self_attn.k_proj.weight": (kv, h),
                    "self_attn.v_proj.weight": (kv, h),
                    "self_attn.o_proj.weight": (h, q),
                    "self_attn.q_norm.weight": (d,),
                    "self_attn.k_norm.weight": (d,),
                    "mlp.gate_proj.weight": (inter, h),
                    "mlp.up_proj.weight": (inter, h),
                    "mlp.down_proj.weight": (h, inter),
                    "input_layernorm.weight": (h,),
                    "post_attention_layernorm.weight": (h,),
                }.items()
            }
        )
    gen = torch.Generator().manual_seed(0)
    weights = {
        name: (
            torch.randn(shape, generator=gen) * 0.02 if len(shape) == 2 else torch.ones(shape)
        ).bfloat16()
        for name, shape in shapes.items()
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    save_file(weights, os.path.join(path, "model.safetensors"))
    return path


WORKLOADS = {
    # name: (requests, prompt lengths, output lengths, engine config for both modes)
    "nano": (256, (100, 1024), (100, 1024), {}),  # nano-vllm's published benchmark
    "r1": (32, (128, 512), (8192, 16384), {"num_kvcache_blocks": 256, "block_size": 256}),
}


def workload(name: str, seed: int, vocab: int):
    """Random token-id prompts and per-request output lengths (ignore_eos), temperature 0.6."""
    num_seqs, (p_lo, p_hi), (o_lo, o_hi), config = WORKLOADS[name]
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(min(vocab, 10000)) for _ in range(rng.randint(p_lo, p_hi))]
        for _ in range(num_seqs)
    ]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(o_lo, o_hi))
        for _ in range(num_seqs)
    ]
    return prompts, params, config


def run(llm: LLM, prompts, params) -> dict:
    """Generate step by step. Compressions are timed on the stream they run on, with CUDA events
    read at the end, so that timing them does not make asynchronous compression synchronous."""
    runner = llm.model_runner
    compress, spans = runner._compress, []

    def timed_compress(jobs):
        spans.append(Timer().start())
        compress(jobs)
        spans[-1].stop()

    runner._compress = timed_compress
    for prompt, p in zip(prompts, params):
        llm.add_request(prompt, p)
    timeline, start = [], time.perf_counter()
    while not llm.is_finished():
        _, num_tokens = llm.step()
        if num_tokens < 0:  # a decode step: its batch is the number of requests decoding
            timeline.append((time.perf_counter() - start, -num_tokens))
    elapsed = time.perf_counter() - start
    runner._compress = compress
    batches = [b for _, b in timeline]
    output_tokens = sum(p.max_tokens for p in params)
    return {"output_tokens": output_tokens, "seconds": elapsed,
            "tok_per_s": output_tokens / elapsed, "peak_running": max(batches),
            "mean_running": sum(batches) / len(batches),
            "preemptions": llm.scheduler.num_preemptions, "compressions": len(spans),
            "compress_share": sum(span.seconds() for span in spans) / elapsed,
            "timeline": timeline}  # fmt: skip


class Timer:
    """Time GPU work with CUDA events on the current stream (wall time on the CPU)."""

    def start(self):
        if torch.cuda.is_available():
            self.begin, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.begin.record()
        else:
            self.begin = time.perf_counter()
        return self

    def stop(self):
        if torch.cuda.is_available():
            self.end.record()
        else:
            self.end = time.perf_counter()

    def seconds(self) -> float:
        if torch.cuda.is_available():
            self.end.synchronize()
            return self.begin.elapsed_time(self.end) / 1000
        return self.end - self.begin


def throughput(model: str, args) -> dict:
    """Each mode on the same workload, full KV first; zipage once per budget of --kv-budget."""
    modes = {"full": None} if args.mode != "zipage" else {}
    if args.mode != "full":
        modes.update({f"zipage-{budget}": budget for budget in args.kv_budget})
    results = {}
    for mode, kv_budget in modes.items():
        with open(os.path.join(model, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        prompts, params, config = workload(args.workload, args.seed, vocab)
        llm = LLM(model, enforce_eager=args.enforce_eager, kv_budget=kv_budget,
                  async_compression=not args.sync_compression, **config)  # fmt: skip
        # Warm-up: compile the kernels, and with compression run one compression too.
        warm = (kv_budget or 0) + 2 * llm.config.block_size
        llm.generate(prompts[:4], [replace(p, max_tokens=min(p.max_tokens, warm)) for p in params[:4]],
                     use_tqdm=False)  # fmt: skip
        llm.scheduler.num_preemptions = 0
        results[mode] = run(llm, prompts, params)
        results[mode]["kv_blocks"] = llm.model_runner.num_blocks
        results[mode]["query_slots"] = llm.model_runner.num_query_slots
        print(mode, {k: v for k, v in results[mode].items() if k != "timeline"}, flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if "full" in results:
        for mode, kv_budget in modes.items():
            if kv_budget:
                ratio = results[mode]["tok_per_s"] / results["full"]["tok_per_s"]
                results[f"ratio-{kv_budget}"] = ratio
    if args.plot:
        plot(results, list(modes), args.plot)
    return results


def plot(results: dict, modes: list[str], path: str):
    """PNG of running requests over time; without matplotlib, the timelines as JSON instead."""
    try:
        import matplotlib  # optional: pip install -e '.[plot]'
    except ImportError:
        with open(path + ".json", "w") as f:
            json.dump({mode: results[mode]["timeline"] for mode in modes}, f)
        print(f"matplotlib is not installed: timelines written to {path}.json")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for mode in modes:
        t, running = zip(*results[mode]["timeline"])
        ax.plot(t, running, label=f"{mode}: {results[mode]['tok_per_s']:.0f} tok/s")
    ax.set(xlabel="seconds", ylabel="requests decoding", title="Running requests over time")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def decode_step(model: str, args) -> dict:
    results, prompt_len, steps = {}, 512, 32
    for eager in (False, True):
        for batch in (1, 256):
            blocks = batch * -(-(prompt_len + 2 * steps) // 256)
            llm = LLM(model, enforce_eager=eager, max_num_seqs=256, num_kvcache_blocks=blocks,
                      kv_budget=None)  # fmt: skip
            rng, vocab = random.Random(args.seed), llm.config.hf_config["vocab_size"]
            prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(batch)]
            for p in prompts:
                llm.add_request(
                    p, SamplingParams(temperature=0.6, max_tokens=2 * steps, ignore_eos=True)
                )
            while llm.scheduler.waiting or any(s.in_prefill for s in llm.scheduler.running):
                llm.step()
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                llm.step()  # returns sampled ids to the host, so it waits for the GPU
                times.append(time.perf_counter() - start)
            times.sort()
            results[f"{'eager' if eager else 'graph'}_bs{batch}_ms"] = 1000 * times[len(times) // 2]
            del llm
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return results


def compress_cost(model: str, args) -> dict:
    """What one compression costs, next to the decode step it competes with (R1's steady state).

    A batch of `--batch` requests with kv_budget + 192 cached tokens each (2240 at budget 2048:
    between the budget and the 2304 at which a request compresses) decodes, while one more
    request holding N_max full blocks (2304 tokens) is compressed again and again (the first
    of `--kv-budget`). The model runner is driven directly, so that nothing else
    (scheduling, other compressions) lands in the figures. Reports the GPU time of one
    compression (first and later: pooling runs only on the first), and the wall time of one
    decode step alone, after a synchronous compression, and with an asynchronous compression
    launched on the side stream just before it (the engine's default).
    """
    budget, b = args.kv_budget[0], 256
    n_max, length = budget // b + 1, budget + b - 64
    llm = LLM(model, kv_budget=budget, block_size=b, max_num_seqs=args.batch + 1,
              num_kvcache_blocks=(args.batch + 2) * n_max)  # fmt: skip
    runner, blocks = llm.model_runner, llm.scheduler.block_manager
    rng, vocab = random.Random(args.seed), llm.config.hf_config["vocab_size"]
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=b)
    batch = [Sequence([rng.randrange(vocab) for _ in range(length)], params)
             for _ in range(args.batch)]  # fmt: skip
    target = Sequence([rng.randrange(vocab) for _ in range(n_max * b)], params)
    target.query_slot = 0
    for seq in [*batch, target]:
        seq.kv_budget, seq.num_new_tokens = budget, len(seq)
        blocks.allocate(seq)
        runner.run([seq], is_prefill=True)
        seq.num_computed_tokens = len(seq)
    target.token_ids.append(0)  # the token whose decode step triggers the compression
    job = [(target, blocks.compress(target))]

    def median_seconds(fn, repeat=30) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[repeat // 2]

    def compression_gpu_seconds() -> float:
        timers = []
        for _ in range(10):
            timers.append(Timer().start())
            runner._compress(job)
            timers[-1].stop()
        return sorted(t.seconds() for t in timers)[5]

    def decode():
        runner.run(batch, is_prefill=False)  # ends with the sampled ids on the host

    def decode_after_async_compression():
        runner.compress(job)
        decode()

    def decode_after_sync_compression():
        runner._compress(job)
        decode()

    results = {"batch": args.batch, "kv_budget": budget,
               "first_compression_ms": 1000 * compression_gpu_seconds()}  # fmt: skip
    target.num_compressions = 2
    results["compression_ms"] = 1000 * compression_gpu_seconds()
    results["decode_step_ms"] = 1000 * median_seconds(decode)
    results["decode_step_sync_compression_ms"] = 1000 * median_seconds(
        decode_after_sync_compression
    )
    results["decode_step_async_compression_ms"] = 1000 * median_seconds(
        decode_after_async_compression
    )
    runner.wait_for_compressions()
    results["async_slowdown"] = (
        results["decode_step_async_compression_ms"] / results["decode_step_ms"] - 1
    )
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--task", choices=["throughput", "decode-step", "compress-cost"], default="throughput"
    )
    parser.add_argument("--model", help="checkpoint dir (default: Qwen3-0.6B, random weights)")
    parser.add_argument("--workload", choices=list(WORKLOADS), default="nano")
    parser.add_argument("--mode", choices=["full", "zipage", "both"], default="both")
    parser.add_argument(
        "--kv-budget",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[2048],
        help="tokens kept (zipage mode); a list runs each",
    )
    parser.add_argument(
        "--sync-compression",
        action="store_true",
        help="compress before the decode step, on the same stream",
    )
    parser.add_argument("--batch", type=int, default=28, help="compress-cost: requests decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--plot", help="save a PNG of running requests over time (matplotlib)")
    args = parser.parse_args()
    model = args.model or random_qwen3(QWEN3_0_6B, "qwen3-0.6b-random")
    result = {
        "task": args.task,
        "model": args.model or "Qwen3-0.6B (random weights)",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    tasks = {"throughput": throughput, "decode-step": decode_step, "compress-cost": compress_cost}
    result.update(tasks[args.task](model, args))
    for key, value in result.items():
        if isinstance(value, dict):  # one mode's figures
            value = {k: v for k, v in value.items() if k != "timeline"}
            value = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in value.items())  # fmt: skip
        print(f"{key:>12} | {value:.3f}" if isinstance(value, float) else f"{key:>12} | {value}")
    for value in result.values():
        if isinstance(value, dict):
            value.pop("timeline", None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
