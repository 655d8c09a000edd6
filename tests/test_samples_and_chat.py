"""n samples per prompt (shared prompt blocks, seeds, order; full and compressed KV), LLM.chat,
and prompts given as a single string or token list (tiny random Qwen3 and SmolLM2, CPU)."""

import random
from dataclasses import replace

import pytest
from helpers import make_tiny_model

from nanozipage import LLM, SamplingParams, model_runner
from nanozipage.block_manager import BlockManager

GOLDEN = 0x9E3779B97F4A7C15  # sample i of a seeded request uses seed + i * GOLDEN mod 2**64
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
FULL_KV = {"kv_budget": None, "block_size": 16, "num_kvcache_blocks": 64}
# N_max = 3 blocks of 16: a 40-token prompt compresses at its 9th token, then every 16.
COMPRESSED = {"kv_budget": 32, "window": 4, "block_size": 16, "num_kvcache_blocks": 40}
PROMPT = list(range(100, 140))  # 40 tokens: two full blocks, then a partial one


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"))


def tokens(outputs: list[dict]) -> list[list[int]]:
    return [o["token_ids"] for o in outputs]


def assert_no_leak(llm: LLM):
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks


@pytest.mark.parametrize(
    "prompt_len, config", [(40, FULL_KV), (32, FULL_KV), (5, FULL_KV), (40, COMPRESSED)]
)
def test_samples_share_the_prompts_full_blocks_which_are_prefilled_once(
    model_dir, monkeypatch, prompt_len, config
):
    allocated, fed = [], []
    allocate, step_plan = BlockManager.allocate, model_runner.step_plan

    def allocate_spy(self, seq):
        if not allocate(self, seq):
            return False
        refs = [self.blocks[b].ref_count for b in seq.block_table]
        allocated.append((seq.sample_index, list(seq.block_table), refs))
        return True

    def step_plan_spy(seqs, rows, is_prefill):
        if is_prefill:
            fed.append(sum(seq.num_new_tokens for seq in seqs))
        return step_plan(seqs, rows, is_prefill)

    llm = LLM(model_dir, **config)  # before the spies: on a GPU, warmup runs a prefill
    monkeypatch.setattr(BlockManager, "allocate", allocate_spy)
    monkeypatch.setattr(model_runner, "step_plan", step_plan_spy)
    prompt, n = PROMPT[:prompt_len], 3
    outputs = llm.generate(prompt, replace(SAMPLED, n=n, seed=1), use_tqdm=False)

    shared = (prompt_len - 1) // 16  # full blocks before the one holding the last prompt token
    assert [o["num_cached_tokens"] for o in outputs] == [0] + [16 * shared] * (n - 1)
    assert sum(fed) == prompt_len + (n - 1) * (prompt_len - 16 * shared)
    assert [index for index, _, _ in allocated] == list(range(n))
    tables = [table for _, table, _ in allocated]
    assert all(table[:shared] == tables[0][:shared] for table in tables)
    assert len({b for table in tables for b in table[shared:]}) == n * (len(tables[0]) - shared)
    assert allocated[-1][2][:shared] == [n] * shared  # one block, n holders
    assert_no_leak(llm)


@pytest.mark.parametrize("config", [FULL_KV, COMPRESSED], ids=["full KV", "compressed"])
def test_greedy_samples_are_equal_and_equal_a_single_request(model_dir, monkeypatch, config):
    compressions, plan = [], BlockManager.plan_compression
    monkeypatch.setattr(
        BlockManager,
        "plan_compression",
        lambda self, seq, compression: compressions.append(seq) or plan(self, seq, compression),
    )
    params = replace(GREEDY, max_tokens=60)
    single = LLM(model_dir, **config).generate(PROMPT, params, use_tqdm=False)
    llm = LLM(model_dir, **config)
    outputs = llm.generate(PROMPT, replace(params, n=2), use_tqdm=False)
    assert tokens(outputs) == tokens(single) * 2
    assert [o["index"] for o in outputs] == [0, 1]
    assert outputs[0]["request_id"] == outputs[1]["request_id"]
    if config is COMPRESSED:  # every sample compresses its own blocks, none of the shared ones
        assert len(set(map(id, compressions))) == 3 and len(compressions) >= 9
    assert_no_leak(llm)


@pytest.mark.parametrize("config", [FULL_KV, COMPRESSED], ids=["full KV", "compressed"])
def test_seeded_samples_differ_and_each_is_its_own_seeded_request(model_dir, config):
    seed, n = 2**64 - 5, 3  # the seeds of samples 1 and 2 wrap around 2**64
    params = replace(SAMPLED, max_tokens=60, seed=seed)
    llm = LLM(model_dir, **config)
    outputs = llm.generate(PROMPT, replace(params, n=n), use_tqdm=False)
    samples = tokens(outputs)
    assert len({tuple(t) for t in samples}) == n
    again = LLM(model_dir, **config).generate(PROMPT, replace(params, n=n), use_tqdm=False)
    assert tokens(again) == samples
    seeds = [(seed + i * GOLDEN) % 2**64 for i in range(n)]
    alone = llm.generate([PROMPT] * n, [replace(params, seed=s) for s in seeds], use_tqdm=False)
    assert tokens(alone) == samples
    assert_no_leak(llm)


def test_results_come_in_prompt_order_with_a_prompts_samples_side_by_side(model_dir):
    llm = LLM(model_dir, **FULL_KV)
    prompts = [PROMPT[:20], PROMPT[20:], PROMPT[5:30]]
    params = [
        replace(SAMPLED, n=2, max_tokens=12, seed=1),
        replace(SAMPLED, max_tokens=3),
        replace(SAMPLED, n=3, max_tokens=6, seed=2),
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    expected = [(0, 0, 12), (0, 1, 12), (1, 0, 3), (2, 0, 6), (2, 1, 6), (2, 2, 6)]
    got = [(prompts.index(o["prompt_token_ids"]), o["index"], len(o["token_ids"])) for o in outputs]
    assert got == expected
    request_ids = [o["request_id"] for o in outputs]
    assert len(set(request_ids)) == 3 and request_ids[0] == request_ids[1]
    assert request_ids[3] == request_ids[4] == request_ids[5]
    assert_no_leak(llm)


def test_a_token_id_list_is_one_prompt(model_dir):
    outputs = LLM(model_dir, **FULL_KV).generate([7, 8, 9], GREEDY, use_tqdm=False)
    assert len(outputs) == 1 and outputs[0]["prompt_token_ids"] == [7, 8, 9]


# LLM.chat and text prompts, on SmolLM2 and its chat template.

CHAT = SamplingParams(temperature=0, max_tokens=12)
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
]


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> LLM:
    return LLM(
        smollm2_path,
        block_size=16,
        max_model_len=512,
        dtype="float32",
        kv_budget=None,
        num_kvcache_blocks=64,
    )


def template_ids(llm: LLM, conversation: list[dict], **kwargs) -> list[int]:
    text = llm.tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True, **kwargs
    )
    return llm.tokenizer.encode(text, add_special_tokens=False)


def comparable(outputs: list[dict]) -> list[dict]:
    ignored = ("request_id", "num_cached_tokens")  # the second run hits the prefix cache
    return [{k: v for k, v in o.items() if k not in ignored} for o in outputs]


def test_chat_equals_generate_on_the_templates_ids(smollm2):
    one = smollm2.chat(CONVERSATIONS[0], CHAT, use_tqdm=False)
    assert len(one) == 1
    ids = [template_ids(smollm2, c) for c in CONVERSATIONS]
    assert comparable(one) == comparable(smollm2.generate(ids[0], CHAT, use_tqdm=False))
    batch = smollm2.chat(CONVERSATIONS, CHAT, use_tqdm=False)
    assert comparable(batch) == comparable(smollm2.generate(ids, CHAT, use_tqdm=False))
    assert [o["prompt_token_ids"] for o in batch] == ids and one[0]["text"]


def test_chat_does_not_double_a_bos_that_the_template_writes(smollm2):
    tokenizer, bos = smollm2.tokenizer, smollm2.tokenizer.bos_token_id
    text = tokenizer.apply_chat_template(
        CONVERSATIONS[0], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith(tokenizer.bos_token)  # the template writes its BOS
    tokenizer.add_bos_token = True  # and encoding would add another
    try:
        assert tokenizer.encode(text)[:2] == [bos, bos]
        (out,) = smollm2.chat(CONVERSATIONS[0], replace(CHAT, max_tokens=1), use_tqdm=False)
    finally:
        tokenizer.add_bos_token = False
    assert out["prompt_token_ids"][0] == bos and out["prompt_token_ids"][1] != bos
    assert out["prompt_token_ids"] == template_ids(smollm2, CONVERSATIONS[0])


def test_chat_template_kwargs_reach_the_template(smollm2):
    # SmolLM2's template reads no keyword: give it one, as Qwen3's reads enable_thinking.
    tokenizer, template = smollm2.tokenizer, smollm2.tokenizer.chat_template
    tokenizer.chat_template = template + (
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
        "{% endif %}"
    )
    try:
        params = replace(CHAT, max_tokens=1)
        plain, no_thinking = (
            smollm2.chat(CONVERSATIONS[0], params, use_tqdm=False, chat_template_kwargs=kwargs)[0]
            for kwargs in (None, {"enable_thinking": False})
        )
        with_kwarg = template_ids(smollm2, CONVERSATIONS[0], enable_thinking=False)
    finally:
        tokenizer.chat_template = template
    assert plain["prompt_token_ids"] == template_ids(smollm2, CONVERSATIONS[0])
    assert no_thinking["prompt_token_ids"] == with_kwarg != plain["prompt_token_ids"]


def test_a_string_is_one_prompt_and_ends_by_length_or_stop(smollm2):
    text = "The capital of France is"
    (cut,), (free,) = (
        smollm2.generate(text, SamplingParams(temperature=0, max_tokens=m), use_tqdm=False)
        for m in (3, 32)
    )
    assert cut["prompt_token_ids"] == smollm2.tokenizer.encode(text)
    assert (cut["finish_reason"], len(cut["token_ids"])) == ("length", 3)
    assert free["token_ids"][:3] == cut["token_ids"]
    assert (free["finish_reason"], free["token_ids"][-1]) == ("stop", 2)  # EOS: <|im_end|>


@pytest.mark.parametrize(
    "config",
    [
        {"kv_budget": None, "block_size": 8, "num_kvcache_blocks": 20},
        {**COMPRESSED, "num_kvcache_blocks": 12},
    ],
    ids=["full KV", "compressed"],
)
def test_samples_penalties_and_stops_under_preemption_agree_in_both_loops(model_dir, config):
    """Everything at once in a pool too small for it: the overlapped loop gives the plain
    loop's results, and every block comes back."""
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(10, 40))] for _ in range(5)]
    params = [
        replace(SAMPLED, n=3, seed=1, max_tokens=40, repetition_penalty=1.3),
        replace(GREEDY, n=2, max_tokens=30, frequency_penalty=0.5),
        replace(SAMPLED, seed=2, max_tokens=35, stop_token_ids=[7, 9, 11], min_tokens=5),
        replace(SAMPLED, n=2, seed=3, max_tokens=25, presence_penalty=1.0, top_k=-1, min_p=0.05),
        replace(GREEDY, max_tokens=40),
    ]
    results = {}
    for overlap in (True, False):
        llm = LLM(model_dir, overlap_scheduling=overlap, **config)
        results[overlap] = llm.generate(prompts, params, use_tqdm=False)
        assert llm.scheduler.num_preemptions > 0
        assert_no_leak(llm)
    ignored = ("request_id", "num_cached_tokens")
    overlapped, plain = (
        [{k: v for k, v in o.items() if k not in ignored} for o in results[o]]
        for o in (True, False)
    )
    assert overlapped == plain and len(plain) == 9
