"""Randomized differential test: seeded random engine configurations against the references.

Each seed draws a block size, a KV budget (or full KV), a window, a chunk size (often one that
ends a prefill chunk one token before the end of a prompt), a KV pool (sometimes tight enough to
preempt), prompts and output lengths, the overlapped or plain loop, asynchronous or synchronous
compression and a policy. Every greedy output must equal the dense reference of the same policy
(`dense_reference.py`) token for token, and transformers' argmax for full-KV runs and for the
first token of every run; no block may leak. `pytest -m exhaustive` runs many more seeds.
"""

import random

import pytest
import torch
import transformers
from dense_reference import dense_generate
from helpers import ARCHS, check_against_hf, make_tiny_model

from nanozipage import LLM, SamplingParams
from nanozipage.policy import POLICIES

FEW_SEEDS, MANY_SEEDS = range(12), range(12, 212)
# A prefill chunk that ends one token before a prompt's end on a block boundary past N_max blocks
# once compressed the prompt before its last token, so the first token differed from
# transformers'. These seeds draw such a case (all pass with the fix).


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Every tiny architecture, made on first use, with its transformers model."""
    made = {}

    def get(arch: str):
        if arch not in made:
            path = make_tiny_model(arch, tmp_path_factory.mktemp(arch))
            made[arch] = (
                path,
                transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
            )
        return made[arch]

    return get


def peak_blocks(prompt_len: int, max_tokens: int, block_size: int, kv_budget) -> int:
    """The blocks one request holds at its peak (what `LLMEngine.make_sequences` checks)."""
    total_blocks = -(-(prompt_len + max_tokens) // block_size)
    if kv_budget is None:
        return total_blocks
    return min(total_blocks, max(kv_budget // block_size + 1, -(-prompt_len // block_size) + 1))


def random_case(seed: int):
    rng = random.Random(seed)
    b = rng.choice([4, 8, 16])
    window = rng.randint(1, min(b, 4))
    smallest = -(-(window + b) // b)  # blocks in the smallest budget that holds window + a block
    kv_budget = None if rng.random() < 0.25 else b * rng.randint(smallest, smallest + 2)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 4))]
    prompts = [[rng.randrange(256) for _ in range(n)] for n in lengths]
    max_tokens = [rng.randint(1, 50) for _ in prompts]
    # A chunk that ends one token before a prompt's end (the regression above), a block,
    # or anything up to every prompt at once.
    chunk = rng.choice([max(1, rng.choice(lengths) - 1), b, rng.randint(1, 64), 512])
    peaks = [peak_blocks(n, m, b, kv_budget) for n, m in zip(lengths, max_tokens)]
    least = max(peaks + ([kv_budget // b + 1] if kv_budget else []))  # N_max: one query slot
    # From one request at a time (preempting) to room for all of them.
    pool = rng.randint(least, max(least, sum(peaks)) + 2)
    config = {
        "block_size": b,
        "window": window,
        "first_window": rng.randint(window, b),
        "kv_budget": kv_budget,
        "max_num_batched_tokens": chunk,
        "num_kvcache_blocks": pool,
        "overlap_scheduling": rng.random() < 0.5,
        "async_compression": rng.random() < 0.5,
        "policy": rng.choice(list(POLICIES)),
    }
    return rng.choice(list(ARCHS)), config, prompts, max_tokens


def check_case(models, seed: int):
    arch, config, prompts, max_tokens = random_case(seed)
    model_dir, hf = models(arch)
    llm = LLM(model_dir, **config)
    params = [
        SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=True)
        for m in max_tokens
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o["token_ids"]) for o in outputs] == max_tokens, config
    firsts = [
        {**o, "token_ids": o["token_ids"][:1], "logprobs": o["logprobs"][:1]} for o in outputs
    ]
    check_against_hf(model_dir, prompts, firsts)
    if config["kv_budget"] is None:
        check_against_hf(model_dir, prompts, outputs)
    else:
        for prompt, m, out in zip(prompts, max_tokens, outputs):
            ref, _ = dense_generate(hf, prompt, m, llm.config, config["kv_budget"])
            assert out["token_ids"] == ref, (arch, config, len(prompt))
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks


@pytest.mark.parametrize("seed", FEW_SEEDS)
def test_random_configuration_matches_the_references(models, seed):
    check_case(models, seed)


@pytest.mark.exhaustive
@pytest.mark.parametrize("seed", MANY_SEEDS)
def test_many_random_configurations_match_the_references(models, seed):
    check_case(models, seed)


def test_prefill_chunk_ending_one_token_before_the_prompt_end_gives_transformers_first_token(
    models,
):
    """The regression above: a 41-token prompt in 8-token chunks leaves its last token to a decode
    step that lands on a block boundary past N_max blocks; it must still see the whole prompt."""
    model_dir, hf = models("qwen3")
    rng = random.Random(0)
    prompt = [rng.randrange(256) for _ in range(41)]
    llm = LLM(
        model_dir,
        block_size=8,
        kv_budget=24,
        window=2,
        num_kvcache_blocks=19,
        max_num_batched_tokens=8,
    )
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    first = {**out, "token_ids": out["token_ids"][:1], "logprobs": out["logprobs"][:1]}
    check_against_hf(model_dir, [prompt], [first])
    assert out["token_ids"] == dense_generate(hf, prompt, 20, llm.config, 24)[0]
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks
