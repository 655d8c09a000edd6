"""The overlapped engine loop (plan step N+1 while step N runs) against the plain loop.

Both loops must give the same tokens and logprobs, in full-KV and compressed mode, through
preemption, chunked prefill, prefix hits, seeded sampling and requests that finish at
different steps, by EOS or by max_tokens (CPU, float32, tiny random models).
"""

import json
import os
import random
from collections import Counter
from dataclasses import replace

import pytest
from helpers import make_tiny_model

from nanozipage import LLM, SamplingParams

CONFIG = {
    "block_size": 16,
    "window": 4,
    "num_kvcache_blocks": 9,
    "max_num_batched_tokens": 40,
    "max_num_seqs": 16,
}


def workload(seed: int):
    rng = random.Random(seed)
    shared = [rng.randrange(256) for _ in range(40)]
    prompts = [[rng.randrange(256) for _ in range(rng.randint(3, 70))] for _ in range(6)]
    prompts += [shared + [rng.randrange(256)] for _ in range(3)]  # prefix hits
    greedy = SamplingParams(temperature=0, logprobs=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, logprobs=True)
    params = [
        replace(greedy if i % 2 else seeded, max_tokens=rng.randint(1, 70), seed=i)
        for i in range(len(prompts))
    ]
    return prompts, params


def generate(model_dir: str, overlap: bool, kv_budget, prompts, params):
    llm = LLM(model_dir, kv_budget=kv_budget, overlap_scheduling=overlap, **CONFIG)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    again = llm.generate(prompts[-2:], params[-2:], use_tqdm=False)
    if kv_budget is None:  # whole prompts cached (a compression overwrites its blocks)
        assert all(o["num_cached_tokens"] >= 32 for o in again)
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks
    return outputs + again, llm.scheduler.num_preemptions


@pytest.mark.parametrize("arch, kv_budget", [("qwen3", None), ("llama", 32), ("qwen2", 32)])
def test_overlapped_loop_equals_plain_loop(tmp_path, arch, kv_budget):
    model_dir = make_tiny_model(arch, tmp_path)
    prompts, params = workload(seed=len(arch))
    # EOS: the token the model emits most often, so that several requests stop by EOS.
    plain, _ = generate(model_dir, False, kv_budget, prompts, params)
    eos = Counter(t for o in plain for t in o["token_ids"][1:]).most_common(1)[0][0]
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos}, f)

    plain, plain_preemptions = generate(model_dir, False, kv_budget, prompts, params)
    overlapped, preemptions = generate(model_dir, True, kv_budget, prompts, params)

    stopped_by_eos = [o["token_ids"][-1] == eos for o in plain]
    assert sum(stopped_by_eos) >= 2 and not all(stopped_by_eos)
    assert plain_preemptions > 0 and preemptions > 0
    assert [o["token_ids"] for o in overlapped] == [o["token_ids"] for o in plain]
    for ours, ref in zip(overlapped, plain):
        assert ours["logprobs"] == pytest.approx(ref["logprobs"], abs=1e-5)


def test_request_ending_while_its_compression_runs_is_freed_before_generate_returns(tmp_path):
    """Overlapped, a request's compression is planned while its last token is still on the
    GPU; if that token is EOS, the request finishes during its compression, and its blocks must
    still be free when `generate` returns."""
    model_dir = make_tiny_model("qwen3", tmp_path)
    config = {**CONFIG, "kv_budget": 32, "num_kvcache_blocks": 40}
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    rng = random.Random(0)
    for _ in range(20):  # a prompt whose token at the compression point is new in its output
        prompt = [rng.randrange(256) for _ in range(rng.randint(20, 40))]
        llm = LLM(model_dir, **config)
        tokens = llm.generate([prompt], greedy, use_tqdm=False)[0]["token_ids"]
        trigger = 3 * 16 - len(prompt)  # its last token sits at index 48: N_max * block_size
        if tokens[trigger] not in tokens[:trigger]:
            break
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": tokens[trigger]}, f)
    llm = LLM(model_dir, **config)
    out = llm.generate([prompt], replace(greedy, ignore_eos=False), use_tqdm=False)[0]
    assert out["token_ids"] == tokens[: trigger + 1]
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks
