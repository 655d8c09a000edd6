"""End to end against transformers on tiny random Qwen3, Qwen2 and Llama models (CPU, float32)."""

import random

import pytest
from helpers import ARCHS, check_against_hf, make_tiny_model

from nanozipage import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module", params=list(ARCHS))
def model_dir(request, tmp_path_factory):
    return make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def random_prompts(n: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(low, high))] for _ in range(n)]


def assert_no_leak(llm: LLM):
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks


@pytest.mark.parametrize("batch", [1, 5])
def test_greedy_matches_hf(model_dir, batch):
    llm = LLM(model_dir, kv_budget=None, block_size=16, num_kvcache_blocks=64)
    prompts = random_prompts(batch, 1, 40)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [len(o["token_ids"]) for o in outputs] == [GREEDY.max_tokens] * batch
    check_against_hf(model_dir, prompts, outputs)
    assert_no_leak(llm)


def test_prefix_cache_hits_match_hf(model_dir):
    llm = LLM(model_dir, kv_budget=None, block_size=16, num_kvcache_blocks=64)
    shared = random_prompts(1, 50, 50, seed=1)[0]
    prompts = [shared + tail for tail in random_prompts(4, 1, 20, seed=2)]
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert all(o["num_cached_tokens"] == 48 for o in rest)  # 3 full blocks of the shared 50
    check_against_hf(model_dir, prompts, first + rest)
    again = llm.generate(prompts, GREEDY, use_tqdm=False)  # whole prompts are cached now
    assert [o["token_ids"] for o in again] == [o["token_ids"] for o in first + rest]
    assert_no_leak(llm)


def test_chunked_prefill_matches_hf(model_dir):
    llm = LLM(
        model_dir, kv_budget=None, block_size=16, num_kvcache_blocks=64, max_num_batched_tokens=24
    )
    prompts = random_prompts(3, 30, 90, seed=3)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    check_against_hf(model_dir, prompts, outputs)
    assert_no_leak(llm)


def test_preemption_matches_hf(model_dir):
    llm = LLM(model_dir, kv_budget=None, block_size=8, num_kvcache_blocks=12)
    prompts = random_prompts(6, 10, 30, seed=4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    assert [len(o["token_ids"]) for o in outputs] == [40] * 6
    check_against_hf(model_dir, prompts, outputs)
    assert_no_leak(llm)
