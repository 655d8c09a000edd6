"""Benchmarks: `python bench.py [--task throughput|decode-step] [--model DIR]`.

throughput (default): nano-vllm's published workload: 256 requests, prompt and output lengths
uniform in [100, 1024], random token ids, temperature 0.6, ignore_eos, seed 0. Throughput is
output tokens over wall time, prefill included, measured after one warm-up run.
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


def workload(num_seqs: int, min_len: int, max_len: int, seed: int, vocab: int):
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(min(vocab, 10000)) for _ in range(rng.randint(min_len, max_len))]
        for _ in range(num_seqs)
    ]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(min_len, max_len))
        for _ in range(num_seqs)
    ]
    return prompts, params


def throughput(model: str, args) -> dict:
    llm = LLM(model, enforce_eager=args.enforce_eager)
    prompts, params = workload(
        args.num_seqs, args.min_len, args.max_len, args.seed, llm.config.hf_config["vocab_size"]
    )
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up: compile kernels
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    output_tokens = sum(p.max_tokens for p in params)
    return {
        "requests": len(prompts),
        "output_tokens": output_tokens,
        "seconds": elapsed,
        "tok_per_s": output_tokens / elapsed,
        "kv_blocks": llm.model_runner.num_blocks,
        "preemptions": llm.scheduler.num_preemptions,
    }


def decode_step(model: str, args) -> dict:
    results, prompt_len, steps = {}, 512, 32
    for eager in (False, True):
        for batch in (1, 256):
            blocks = batch * -(-(prompt_len + 2 * steps) // 256)
            llm = LLM(model, enforce_eager=eager, max_num_seqs=256, num_kvcache_blocks=blocks)
            prompts, _ = workload(
                batch, prompt_len, prompt_len, args.seed, llm.config.hf_config["vocab_size"]
            )
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
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enforce-eager", action="store_true")
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
        print(f"{key:>16} | {value:.2f}" if isinstance(value, float) else f"{key:>16} | {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
