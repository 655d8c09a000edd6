"""Penalties, min_p and top_k=-1 end to end, against references written here from the formulas.

The penalty reference is a plain greedy loop over transformers' float32 logits of the whole
sequence at every step: repetition penalty over prompt and output tokens (logit / r where
positive, logit * r otherwise), then minus frequency * count and presence * (count > 0) over
output tokens, then argmax. The engine must pick the same token at every step, whether the
requests share a batch with others, with or without the overlapped loop, and through
preemption (tiny random Qwen3, CPU, float32).
"""

import random
from dataclasses import replace

import pytest
import torch
import transformers
from helpers import make_tiny_model

from nanozipage import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PENALTIES = {
    "repetition": {"repetition_penalty": 1.6},
    "frequency": {"frequency_penalty": 0.8},
    "presence": {"presence_penalty": 1.5},
    "all three": {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": -0.4},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(4, 30))] for _ in range(n)]


@torch.no_grad()
def reference_greedy(
    hf, prompt, max_tokens, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0
) -> list[int]:
    output = []
    for _ in range(max_tokens):
        logits = hf(torch.tensor([prompt + output])).logits[0, -1].float()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[prompt + output] = True
        r = repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=len(logits))
        logits = logits - frequency_penalty * counts - presence_penalty * (counts > 0)
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] > 1e-4, "a near tie: pick another prompt"
        output.append(int(logits.argmax()))
    return output


def engine(model_dir: str, **config) -> LLM:
    return LLM(
        model_dir, **{"kv_budget": None, "block_size": 16, "num_kvcache_blocks": 64, **config}
    )


@pytest.mark.parametrize("overlap", [True, False])
def test_penalties_match_a_reference_loop_token_for_token(model_dir, hf, overlap):
    """Every penalty alone and all three together, in one batch with an unpenalized request."""
    (prompt,) = prompts(1)
    params = [GREEDY] + [replace(GREEDY, **kwargs) for kwargs in PENALTIES.values()]
    llm = engine(model_dir, overlap_scheduling=overlap)
    outputs = llm.generate([prompt] * len(params), params, use_tqdm=False)
    plain = reference_greedy(hf, prompt, GREEDY.max_tokens)
    assert outputs[0]["token_ids"] == plain
    for (name, kwargs), out in zip(PENALTIES.items(), outputs[1:]):
        expected = reference_greedy(hf, prompt, GREEDY.max_tokens, **kwargs)
        assert expected != plain, f"{name}: the penalty must change the greedy output here"
        assert out["token_ids"] == expected, name


def test_penalties_match_the_reference_through_preemption(model_dir, hf):
    """A preempted request is recomputed: its counts must neither be lost nor counted twice."""
    llm = engine(model_dir, block_size=8, num_kvcache_blocks=12)
    batch = prompts(5, seed=1)
    kwargs = PENALTIES["all three"]
    params = replace(GREEDY, max_tokens=32, **kwargs)
    outputs = llm.generate(batch, params, use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    for prompt, out in zip(batch, outputs):
        assert out["token_ids"] == reference_greedy(hf, prompt, 32, **kwargs)
    # Their rows of token counts are handed back (at the next step that uses penalties).
    llm.generate(batch[:1], replace(params, max_tokens=1), use_tqdm=False)
    assert len(llm.model_runner.sampler.count_rows) <= 1


@torch.no_grad()
def probabilities_of_choices(hf, prompt, tokens, temperature) -> torch.Tensor:
    """p(chosen) / max p at each step, under the model's distribution at `temperature`."""
    logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    probs = (logits / temperature).softmax(-1)
    chosen = probs.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    return chosen / probs.max(-1).values


def test_min_p_samples_only_tokens_at_least_min_p_times_as_likely_as_the_top_one(model_dir, hf):
    llm, batch = engine(model_dir), prompts(4, seed=2)
    hot = replace(GREEDY, temperature=1.5, max_tokens=32)
    seeded = [replace(hot, seed=i) for i in range(len(batch))]
    unfiltered = llm.generate(batch, seeded, use_tqdm=False)
    filtered = llm.generate(batch, [replace(p, min_p=0.3) for p in seeded], use_tqdm=False)
    ratios = [
        probabilities_of_choices(hf, prompt, out["token_ids"], 1.5)
        for prompt, out in zip(batch, unfiltered)
    ]
    assert min(r.min() for r in ratios) < 0.3  # without min_p, some choices are that unlikely
    for prompt, out in zip(batch, filtered):
        assert probabilities_of_choices(hf, prompt, out["token_ids"], 1.5).min() >= 0.3 - 1e-5
    # min_p = 1 keeps only the most likely token: greedy.
    greedy = llm.generate(batch, replace(hot, temperature=0), use_tqdm=False)
    top_only = llm.generate(batch, [replace(p, min_p=1.0) for p in seeded], use_tqdm=False)
    assert [o["token_ids"] for o in top_only] == [o["token_ids"] for o in greedy]


def test_top_k_minus_one_is_off_like_zero(model_dir):
    llm, batch = engine(model_dir), prompts(2, seed=3)
    sampled = replace(GREEDY, temperature=1.0, seed=7)

    def tokens(params):
        return [o["token_ids"] for o in llm.generate(batch, params, use_tqdm=False)]

    off = tokens(replace(sampled, top_k=0))
    assert tokens(replace(sampled, top_k=-1)) == off
    assert off != tokens(replace(sampled, top_k=1))  # the seed alone does not make it greedy
    # Beside a request that does filter (the filter then runs for the whole batch) and with top_p.
    top_5 = replace(sampled, top_k=5, seed=8)
    for top_p in (1.0, 0.8):
        minus_one = tokens([replace(sampled, top_k=-1, top_p=top_p), top_5])
        assert minus_one == tokens([replace(sampled, top_k=0, top_p=top_p), top_5])
