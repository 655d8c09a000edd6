"""The public API: bad input is refused before any work starts, incremental use, seeds."""

import os
import shutil

import pytest
import torch
from helpers import make_tiny_model

from nanozipage import LLM, SamplingParams
from nanozipage.config import Config


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(
        make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3")),
        block_size=16,
        kv_budget=None,
        num_kvcache_blocks=40,
        max_model_len=256,
    )


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_sampling_params_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "empty prompt"),
        ([1, 256], SamplingParams(), r"\[0, 256\)"),
        ([-1], SamplingParams(), r"\[0, 256\)"),
        ([1] * 250, SamplingParams(max_tokens=10), "max_model_len=256"),
        ("text", SamplingParams(), "tokenizer"),
    ],
)
def test_bad_prompts_raise_and_leave_other_requests_alone(llm, prompt, params, message):
    good = llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=5))
    with pytest.raises(ValueError, match=message):
        llm.add_request(prompt, params)
    with pytest.raises(ValueError, match=message):  # generate checks all before queuing any
        llm.generate([[4, 5], prompt], params, use_tqdm=False)
    finished = []
    while not llm.is_finished():
        finished += llm.step()[0]
    assert [(o["request_id"], len(o["token_ids"])) for o in finished] == [(good, 5)]


def test_request_larger_than_the_kv_pool_raises(tmp_path):
    small = LLM(
        make_tiny_model("llama", tmp_path), kv_budget=None, block_size=16, num_kvcache_blocks=2
    )
    with pytest.raises(ValueError, match="KV blocks"):
        small.generate([[1] * 20], SamplingParams(max_tokens=20), use_tqdm=False)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"no_such_knob": 1}, "unknown config keys"),
        ({"block_size": 0}, "block_size"),
        ({"max_num_seqs": True}, "max_num_seqs must be an integer >= 1, got True"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"max_model_len": 10**9}, "max_model_len"),
        ({"dtype": "int8"}, "dtype"),
        ({"load_format": "pt"}, "load_format must be one of safetensors, dummy"),
        ({"block_size": 16, "kv_budget": 32, "first_window": 17}, r"first_window .* \[16, 16\]"),
        ({"block_size": 16, "kv_budget": 32, "window": 4, "first_window": 2}, r"\[4, 16\], got 2"),
        ({"block_size": 16, "kv_budget": 32, "num_sinks": 25}, r"num_sinks=25\) = 41 \(48, 64"),
        *([({"device": "cuda"}, "no GPU")] if not torch.cuda.is_available() else []),
    ],
)
def test_bad_config_raises(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        LLM(make_tiny_model("qwen2", tmp_path), **config)


def test_a_request_budget_only_lowers_the_engines_and_leaves_room_for_the_sinks(tmp_path):
    """A request's kv_budget is checked as the engine's (window 16 + 40 sinks = 56: 64 at
    least, in blocks of 16) and may not raise it; a refused request changes nothing."""
    config = {"block_size": 16, "kv_budget": 64, "num_sinks": 40, "num_kvcache_blocks": 40}
    llm = LLM(make_tiny_model("qwen2", tmp_path), **config)
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    expected = llm.generate([[1, 2, 3]], params, use_tqdm=False)[0]["token_ids"]
    for budget, message in ((48, r"= 56 \(64, 80"), (80, "may only lower the engine's 64")):
        with pytest.raises(ValueError, match=message):
            llm.add_request([1, 2, 3], SamplingParams(temperature=0, kv_budget=budget))
    assert llm.is_finished()
    outputs = llm.generate([[1, 2, 3]], params, use_tqdm=False)
    assert outputs[0]["token_ids"] == expected and outputs[0]["num_compressions"] > 0


def test_a_cpu_engine_takes_one_thread_unless_omp_num_threads_is_set(tmp_path, monkeypatch):
    model, threads = make_tiny_model("llama", tmp_path), torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Config(model, device="cpu")  # the tests' conftest.py sets the variable
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        Config(model, device="cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_missing_or_unsupported_model_dir_raises(tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        LLM(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported"):
        LLM(str(tmp_path))


def test_outputs_in_input_order_with_per_prompt_params(llm):
    prompts = [[1] * 40, [2], [3] * 7]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 9, 5)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o["token_ids"]) for o in outputs] == [3, 9, 5]
    assert "logprobs" not in outputs[0]


def test_seed_makes_sampling_reproducible(llm):
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=123)
    alone = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0]["token_ids"]
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batched = llm.generate([[9] * 30, [5, 6, 7], [8] * 3], [others, params, others], use_tqdm=False)
    assert batched[1]["token_ids"] == alone
    unseeded = [llm.generate([[5, 6, 7]], others, use_tqdm=False)[0]["token_ids"] for _ in range(3)]
    assert any(u != alone for u in unseeded)


def test_generation_stops_at_eos_unless_ignored(llm):
    free = llm.generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )[0]["token_ids"]
    eos, saved = free[4], llm.scheduler.stop.eos_token_ids
    llm.scheduler.stop.eos_token_ids = {eos}
    try:
        stopped = llm.generate(
            [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False
        )[0]["token_ids"]
    finally:
        llm.scheduler.stop.eos_token_ids = saved
    assert stopped == free[: free.index(eos) + 1]


def test_dummy_load_format_builds_a_seeded_random_model_from_config_json_alone(tmp_path):
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    shutil.copy(
        os.path.join(make_tiny_model("qwen2", tmp_path / "full"), "config.json"), only_config
    )
    with pytest.raises(ValueError, match="safetensors"):  # the default reads weight files
        LLM(str(only_config), kv_budget=None)
    config = {"load_format": "dummy", "kv_budget": None, "block_size": 16, "num_kvcache_blocks": 40}
    llm = LLM(str(only_config), **config)
    params = dict(llm.model_runner.model.named_parameters())
    assert params["model.layers.0.self_attn.qkv_proj.bias"].eq(0).all()
    assert params["model.layers.1.post_attention_layernorm.weight"].eq(1).all()
    assert 0.019 < params["lm_head.weight"].std().item() < 0.021
    assert params["lm_head.weight"].ne(params["model.embed_tokens.weight"]).any()
    prompt, greedy = [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = llm.generate(prompt, greedy, use_tqdm=False)[0]["token_ids"]
    assert len(tokens) == 8
    again = LLM(str(only_config), **config).generate(prompt, greedy, use_tqdm=False)
    assert again[0]["token_ids"] == tokens  # the seed fixes the weights


def run_to_end(llm: LLM) -> list[dict]:
    outputs = []
    while not llm.is_finished():
        outputs += llm.step()[0]
    return outputs


GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize(
    "prompt, params, error",
    [
        (b"\x01\x02", GREEDY, TypeError),
        (None, GREEDY, TypeError),
        ((1, 2), GREEDY, TypeError),
        ([1, 2], None, TypeError),  # add_request has no default; generate's None is checked below
        ([1, 2], {"max_tokens": 5}, TypeError),
        ([True, False], GREEDY, ValueError),
        ([1, 2.0], GREEDY, ValueError),
        ([1, 2], SamplingParams(stop_token_ids=[256]), ValueError),
    ],
)
def test_wrong_types_raise_at_the_door_and_leave_queued_requests_alone(llm, prompt, params, error):
    expected = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"]
    good = llm.add_request([1, 2, 3], GREEDY)
    with pytest.raises(error):
        llm.add_request(prompt, params)
    with pytest.raises(error):
        llm.generate([[4, 5], prompt], [GREEDY, params], use_tqdm=False)
    outputs = run_to_end(llm)
    assert [(o["request_id"], o["token_ids"]) for o in outputs] == [(good, expected)]
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks


def test_generate_without_sampling_params_uses_the_defaults(llm):
    (output,) = llm.generate([[1, 2, 3]], None, use_tqdm=False)
    assert 1 <= len(output["token_ids"]) <= SamplingParams().max_tokens
    assert "logprobs" not in output  # SamplingParams() asks for none


def test_a_request_failing_inside_a_step_is_aborted_and_poisons_nothing(llm):
    """A SamplingParams changed after it was made slips past the checks (top_k beyond int32):
    its call raises, and the engine still serves the next call as before."""
    expected = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"]
    params = SamplingParams(temperature=0.5, top_k=5, max_tokens=4)
    params.top_k = 2**40
    with pytest.raises((ValueError, RuntimeError)):
        llm.generate([[4, 5]], params, use_tqdm=False)
    assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"] == expected
    assert llm.is_finished()
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks


def test_generate_returns_its_own_results_and_keeps_added_requests_for_step(llm):
    expected = llm.generate([[7, 8, 9], [4, 5]], GREEDY, use_tqdm=False)
    added = llm.add_request([7, 8, 9], GREEDY)
    outputs = llm.generate([[4, 5]], GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == [expected[1]["token_ids"]]
    assert outputs[0]["request_id"] != added
    later = run_to_end(llm)  # the added request finished meanwhile, or finishes now
    assert [(o["request_id"], o["token_ids"]) for o in later] == [(added, expected[0]["token_ids"])]


@pytest.fixture(scope="module")
def compressed_model(tmp_path_factory) -> str:
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("compressed"))


def test_abort_frees_a_request_mid_compression_and_the_others_finish_unchanged(compressed_model):
    """With asynchronous compression in the overlapped loop, a request aborted while its
    compression is under way returns nothing; its blocks are free once the compression ends."""
    config = {"block_size": 8, "kv_budget": 16, "window": 2, "num_kvcache_blocks": 24}
    prompts = [[(5 * i + j) % 256 for i in range(n)] for j, n in enumerate((20, 9, 30))]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = LLM(compressed_model, **config).generate(prompts, params, use_tqdm=False)
    llm = LLM(compressed_model, **config)
    ids = [llm.add_request(p, params) for p in prompts]
    outputs = []
    while not any(s.compression and s.request_id == ids[1] for s in llm.scheduler.running):
        assert not llm.is_finished(), "the request was never compressed"
        outputs += llm.step()[0]
    llm.abort(ids[1])
    llm.abort(ids[1])  # again, and an unknown id: harmless
    llm.abort(-1)
    outputs += run_to_end(llm)
    kept = [(ids[i], expected[i]["token_ids"]) for i in (0, 2)]
    assert sorted((o["request_id"], o["token_ids"]) for o in outputs) == kept
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks


def test_two_engines_with_different_block_sizes_in_one_process(compressed_model):
    """Block size is per engine: two engines made side by side, used in turn, each give what
    it gives alone (with compression, the block size changes the output)."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [[[(3 * i + j) % 256 for i in range(n)]] for j, n in enumerate((30, 17))]
    configs = [
        {"block_size": b, "kv_budget": 2 * b, "window": 2, "num_kvcache_blocks": 16}
        for b in (8, 16)
    ]
    alone = []
    for config in configs:
        llm = LLM(compressed_model, **config)
        alone.append([llm.generate(p, params, use_tqdm=False)[0]["token_ids"] for p in prompts])
    assert alone[0] != alone[1]
    engines = [LLM(compressed_model, **config) for config in configs]
    in_turn = [[], []]
    for prompt in prompts:
        for i, llm in enumerate(engines):
            in_turn[i].append(llm.generate(prompt, params, use_tqdm=False)[0]["token_ids"])
    assert in_turn == alone


def test_prompts_that_are_neither_a_prompt_nor_a_list_raise_a_type_error(llm):
    with pytest.raises(TypeError, match="prompts"):
        llm.generate(None, use_tqdm=False)
