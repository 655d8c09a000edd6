"""Benchmarks: `python bench.py [--task throughput|decode-step] [--workload nano|r1]
[--mode full|zipage|both] [--kv-budget N] [--model DIR] [--plot PNG]`.

throughput (default) runs a workload in full-KV mode, in zipage mode (Compressed
PagedAttention at --kv-budget), or both in one process, and reports for each: output tok/s
(output tokens over wall time, prefill included, after a warm-up), peak and mean number of
requests per decode step, preemptions, and the share of time spent compressing; and the ratio.
Workloads: nano (default): nano-vllm's published benchmark, 256 requests, prompt and output
lengths uniform in [100, 1024]. r1: long reasoning, 32 requests, prompts in [128, 512], outputs
in [8192, 16384], KV pool capped at 256 blocks of 256 tokens in both modes. Both use random
token ids, temperature 0.6, ignore_eos, seed 0.
decode-step: wall time of one engine decode step (scheduling, inputs, forward, sampling) at
batch 1 and 256, with CUDA graphs and eager.
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
    """Generate step by step; the model runner's compress is timed from outside (synchronised)."""
    compress, compress_seconds = llm.model_runner.compress, [0.0]

    def timed_compress(jobs):
        sync()
        start = time.perf_counter()
        compress(jobs)
        sync()
        compress_seconds[0] += time.perf_counter() - start

    llm.model_runner.compress = timed_compress
    for prompt, p in zip(prompts, params):
        llm.add_request(prompt, p)
    timeline, start = [], time.perf_counter()
    while not llm.is_finished():
        _, num_tokens = llm.step()
        if num_tokens < 0:  # a decode step: its batch is the number of requests decoding
            timeline.append((time.perf_counter() - start, -num_tokens))
    elapsed = time.perf_counter() - start
    llm.model_runner.compress = compress
    batches = [b for _, b in timeline]
    output_tokens = sum(p.max_tokens for p in params)
    return {"output_tokens": output_tokens, "seconds": elapsed,
            "tok_per_s": output_tokens / elapsed, "peak_running": max(batches),
            "mean_running": sum(batches) / len(batches),
            "preemptions": llm.scheduler.num_preemptions,
            "compress_share": compress_seconds[0] / elapsed, "timeline": timeline}  # fmt: skip


def throughput(model: str, args) -> dict:
    results, modes = {}, ["full", "zipage"] if args.mode == "both" else [args.mode]
    for mode in modes:
        with open(os.path.join(model, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        prompts, params, config = workload(args.workload, args.seed, vocab)
        kv_budget = args.kv_budget if mode == "zipage" else None
        llm = LLM(model, enforce_eager=args.enforce_eager, kv_budget=kv_budget, **config)
        # Warm-up: compile the kernels, and with compression run one compression too.
        warm = (kv_budget or 0) + 2 * llm.config.block_size
        llm.generate(prompts[:4], [replace(p, max_tokens=min(p.max_tokens, warm)) for p in params[:4]],
                     use_tqdm=False)  # fmt: skip
        llm.scheduler.num_preemptions = 0
        results[mode] = run(llm, prompts, params)
        results[mode]["kv_blocks"] = llm.model_runner.num_blocks
        results[mode]["query_slots"] = llm.model_runner.num_query_slots
        del llm
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if len(modes) == 2:
        results["ratio"] = results["zipage"]["tok_per_s"] / results["full"]["tok_per_s"]
    if args.plot:
        plot(results, modes, args.plot)
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


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["throughput", "decode-step"], default="throughput")
    parser.add_argument("--model", help="checkpoint dir (default: Qwen3-0.6B, random weights)")
    parser.add_argument("--workload", choices=list(WORKLOADS), default="nano")
    parser.add_argument("--mode", choices=["full", "zipage", "both"], default="both")
    parser.add_argument("--kv-budget", type=int, default=2048, help="tokens kept (zipage mode)")
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
    result.update(
        throughput(model, args) if args.task == "throughput" else decode_step(model, args)
    )
    for key, value in result.items():
        if isinstance(value, dict):  # one mode's figures
            value = {k: v for k, v in value.items() if k != "timeline"}
            value = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in value.items())  # fmt: skip
        print(f"{key:>12} | {value:.3f}" if isinstance(value, float) else f"{key:>12} | {value}")
    for mode in ("full", "zipage"):
        result.get(mode, {}).pop("timeline", None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
