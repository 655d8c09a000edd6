"""What a result says about compression: num_compressions, num_evicted_tokens, peak_kv_blocks."""

import pytest
from helpers import make_tiny_model

from nanozipage import LLM, SamplingParams

BLOCK, BUDGET = 16, 64  # N_max = 5 blocks: a request compresses at 80 cached tokens, then every 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def run(model_dir: str, prompt_len: int, max_tokens: int, **config) -> dict:
    llm = LLM(model_dir, block_size=BLOCK, window=4, **config)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)
    return llm.generate([list(range(1, prompt_len + 1))], params, use_tqdm=False)[0]


@pytest.mark.parametrize("async_compression", [True, False])
def test_a_compressed_request_reports_its_compressions_and_never_holds_more_than_n_max(
    model_dir, async_compression
):
    out = run(model_dir, 10, 150, kv_budget=BUDGET, async_compression=async_compression)
    total = 10 + 150
    # The first compression at the token that needs a slot past N_max full blocks (81 tokens),
    # then one every block: each leaves BUDGET of the cached tokens, evicting the rest.
    assert out["num_compressions"] == (total - 1 - (BUDGET + BLOCK)) // BLOCK + 1 == 5
    kept = total - out["num_evicted_tokens"]
    assert BUDGET < kept <= BUDGET + BLOCK
    assert out["peak_kv_blocks"] == BUDGET // BLOCK + 1  # N_max, with no transient extra block


def test_full_kv_reports_no_compression_and_the_blocks_its_tokens_fill(model_dir):
    out = run(model_dir, 10, 150, kv_budget=None)
    assert out["num_compressions"] == out["num_evicted_tokens"] == 0
    # The last token is sampled, never fed: its K/V take no place in the cache.
    assert out["peak_kv_blocks"] == -(-(10 + 150 - 1) // BLOCK)


def test_a_prompt_longer_than_the_budget_is_held_in_full_before_its_first_compression(model_dir):
    out = run(model_dir, 120, 20, kv_budget=BUDGET)
    assert out["num_compressions"] >= 1
    assert out["peak_kv_blocks"] == -(-120 // BLOCK)
