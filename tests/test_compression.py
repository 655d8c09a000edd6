"""Compressed PagedAttention against a dense reference of the same policy (CPU, float32)."""

import random
from itertools import product

import pytest
import torch
import transformers
from dense_reference import dense_generate
from helpers import ARCHS, make_tiny_model

from nanozipage import LLM, SamplingParams, compressor
from nanozipage.policy import POLICIES

BUDGET = 32  # block size 16: N_max = 3, so a request compresses at 48 cached tokens, then every 16


@pytest.fixture(scope="module", params=list(ARCHS))
def model_dir(request, tmp_path_factory):
    return make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def spy_on_compression(monkeypatch) -> dict:
    """Record the kept cache indices of every compression, per request: [layers, kvh, keep]."""
    kept, current, select = {}, [], compressor.select
    launch = compressor.Compressor.launch

    def launch_spy(self, compressions):
        for compression in compressions:  # one at a time, so that select calls are attributed
            current[:] = [compression.seq.seq_id, []]
            launch(self, [compression])
            kept.setdefault(compression.seq.seq_id, []).append(torch.cat(current[1]))

    def select_spy(*args):  # outside launch: the engine's warm-up compression at start
        kept_indices = select(*args)
        if current:
            current[1].append(kept_indices)
        return kept_indices

    monkeypatch.setattr(compressor.Compressor, "launch", launch_spy)
    monkeypatch.setattr(compressor, "select", select_spy)
    return kept


@pytest.mark.parametrize("batch, policy", [(1, "zipage"), (4, "zipage"), *product([3], POLICIES)])
def test_engine_matches_dense_reference(model_dir, batch, policy, monkeypatch):
    kept = spy_on_compression(monkeypatch)
    llm = LLM(
        model_dir, block_size=16, kv_budget=BUDGET, window=4, num_kvcache_blocks=40, policy=policy
    )
    rng = random.Random(batch)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(5, 70))] for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seq_ids = sorted(kept)
    for prompt, out in zip(prompts, outputs):
        ref_tokens, ref_kept = dense_generate(hf, prompt, 100, llm.config, BUDGET)
        assert out["token_ids"] == ref_tokens
        engine_kept = kept[seq_ids.pop(0)] if len(ref_kept) else []
        assert len(ref_kept) >= 3 and len(engine_kept) == len(ref_kept)
        for ours, ref in zip(engine_kept, ref_kept):
            assert torch.equal(ours.cpu(), ref)
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks


def test_per_request_budget_matches_dense_reference(model_dir):
    llm = LLM(model_dir, block_size=16, kv_budget=64, window=4, num_kvcache_blocks=40)
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0, max_tokens=90, ignore_eos=True, kv_budget=BUDGET)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref_tokens, ref_kept = dense_generate(hf, prompt, 90, llm.config, BUDGET)
    assert len(ref_kept) >= 3 and out["token_ids"] == ref_tokens


@pytest.mark.parametrize("policy", list(POLICIES))
def test_first_compression_with_a_shared_prefix(model_dir, policy):
    """Two requests share cached prefix blocks; compressing one must not write into them."""
    config = {"block_size": 16, "window": 4, "num_kvcache_blocks": 40, "policy": policy}
    llm = LLM(model_dir, kv_budget=BUDGET, **config)
    shared = [(7 * i) % 256 for i in range(40)]
    prompts = [shared + [1, 2, 3], shared + [4, 5]]
    llm.generate([shared + [9]], SamplingParams(max_tokens=1), use_tqdm=False)  # cache the prefix
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (80, 30)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o["num_cached_tokens"] for o in outputs] == [32, 32]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for prompt, out, p in zip(prompts, outputs, params):
        assert out["token_ids"] == dense_generate(hf, prompt, p.max_tokens, llm.config, BUDGET)[0]
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks


@pytest.mark.parametrize("kv_budget", [None, BUDGET])
def test_stress_tiny_pool_every_request_finishes(model_dir, kv_budget):
    """Many requests of mixed lengths on a tiny pool: all finish with their exact lengths, and
    no compressed request ever holds more than N_max blocks (checked at every step)."""
    llm = LLM(
        model_dir,
        block_size=16,
        kv_budget=kv_budget,
        window=4,
        num_kvcache_blocks=24,
        max_num_batched_tokens=64,
    )
    rng = random.Random(0)
    lengths = {}
    for _ in range(150):
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 60))]
        params = SamplingParams(temperature=0.8, max_tokens=rng.randint(1, 100), ignore_eos=True)
        lengths[llm.add_request(prompt, params)] = params.max_tokens
    finished, compressed = {}, set()
    while not llm.is_finished():
        outputs, _ = llm.step()
        finished.update({o["request_id"]: len(o["token_ids"]) for o in outputs})
        for seq in llm.scheduler.running:
            assert not seq.num_compressions or len(seq.block_table) <= seq.max_blocks
            compressed |= {seq.seq_id} if seq.num_compressions else set()
    assert finished == lengths
    assert llm.scheduler.num_preemptions > 0 and (len(compressed) > 10 or kv_budget is None)
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks


@pytest.mark.parametrize("policy", list(POLICIES))
def test_smollm2_matches_dense_reference(smollm2_path, policy, monkeypatch):
    kept = spy_on_compression(monkeypatch)
    config = {"block_size": 16, "window": 8, "num_kvcache_blocks": 64, "policy": policy}
    llm = LLM(smollm2_path, kv_budget=48, **config)
    chats = ["Count from one to forty in words.", "Tell me a long story about a cat."]
    prompts = [
        llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": c}], add_generation_prompt=True, return_dict=False
        )
        for c in chats
    ]
    params = SamplingParams(temperature=0, max_tokens=70, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    for prompt, out, seq_id in zip(prompts, outputs, sorted(kept)):
        ref_tokens, ref_kept = dense_generate(hf, prompt, 70, llm.config, 48)
        assert out["token_ids"] == ref_tokens
        assert len(ref_kept) >= 3 and len(kept[seq_id]) == len(ref_kept)
        for ours, ref in zip(kept[seq_id], ref_kept):
            assert torch.equal(ours.cpu(), ref)


@pytest.mark.parametrize(
    "other",
    [
        {"async_compression": False},
        pytest.param(
            {"enforce_eager": True},
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: GPU"),
        ),
    ],
)
def test_async_and_graphs_change_nothing(model_dir, other):
    """Asynchronous compression (a request skips steps while compressed) and CUDA graphs give
    the same greedy tokens as synchronous, eager compression."""
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(5, 70))] for _ in range(5)]
    params = SamplingParams(temperature=0, max_tokens=90, ignore_eos=True)
    outputs = []
    for config in ({}, other):
        llm = LLM(
            model_dir, block_size=16, kv_budget=BUDGET, window=4, num_kvcache_blocks=40, **config
        )
        outputs.append([o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
@pytest.mark.parametrize("async_compression", [False, True], ids=["sync", "async"])
def test_samples_sharing_a_prompt_in_the_smallest_pool_match_dense_reference(
    model_dir, overlap, async_compression
):
    """Two samples of a prompt in a pool of 4 blocks: at the first compression, sample 0 shares
    its prompt blocks with sample 1 and needs fresh ones; preempting sample 1 makes them its own,
    so sample 0 goes on (it once preempted itself too, and the step that followed scheduled
    nothing: "no request can make progress")."""
    prompt = [random.Random(0).randrange(256) for _ in range(20)]
    llm = LLM(
        model_dir,
        block_size=8,
        kv_budget=16,
        window=2,
        num_kvcache_blocks=4,
        max_num_batched_tokens=64,
        overlap_scheduling=overlap,
        async_compression=async_compression,
    )
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, n=2)
    outputs = llm.generate([prompt], params, use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = dense_generate(hf, prompt, 20, llm.config, 16)[0]
    assert [o["token_ids"] for o in outputs] == [reference] * 2
    assert llm.scheduler.num_preemptions == 1  # sample 1 only: sample 0 keeps its place
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks


def test_a_request_preempted_at_its_compression_is_compressed_there_after_recompute(model_dir):
    """A request preempted when its next token starts a compression: its recompute stops one
    token short, so that a decode step compresses before feeding that token, as the dense
    reference does (a recompute that ran past it compressed a block later)."""
    rng = random.Random(0)  # lengths that make such a preemption (a fuzzer found them)
    prompts, lengths = [[rng.randrange(256) for _ in range(n)] for n in (5, 13)], [10, 8]
    llm = LLM(
        model_dir,
        block_size=4,
        kv_budget=8,
        window=1,
        num_kvcache_blocks=6,
        max_num_batched_tokens=64,
        overlap_scheduling=False,
        async_compression=False,
    )
    at_compression, preempt = [], llm.scheduler._preempt

    def spy(seq):
        at_compression.append(seq.needs_compression)
        preempt(seq)

    llm.scheduler._preempt = spy
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for prompt, n, out in zip(prompts, lengths, outputs):
        assert out["token_ids"] == dense_generate(hf, prompt, n, llm.config, 8)[0]
    assert any(at_compression)


def test_samples_preempted_at_a_compression_compute_its_window_queries_again(model_dir):
    """Samples sharing their prompt, preempted at a compression (sizes a fuzzer found): the
    recompute finds the block before it in the prefix cache, but not the window queries it held,
    which its query slot may have lost to another request meanwhile (here: overwritten)."""
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (24, 28)]
    llm = LLM(
        model_dir,
        block_size=8,
        window=3,
        kv_budget=16,
        num_kvcache_blocks=7,
        max_num_batched_tokens=23,
        overlap_scheduling=False,
    )
    release, q_cache = llm.scheduler._release_query_slot, llm.model_runner.q_cache
    rows = llm.config.first_window  # a query slot's rows

    def clobbering_release(seq):
        if seq.query_slot >= 0:
            q_cache[:, seq.query_slot * rows : (seq.query_slot + 1) * rows] = 100.0
        release(seq)

    llm.scheduler._release_query_slot = clobbering_release
    params = [
        SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, n=n)
        for m, n in ((13, 3), (25, 2))
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = [
        dense_generate(hf, p, sp.max_tokens, llm.config, 16)[0]
        for p, sp in zip(prompts, params)
        for _ in range(sp.n)
    ]
    assert [o["token_ids"] for o in outputs] == expected
    assert llm.scheduler.num_preemptions > 0


def test_the_engine_compresses_once_at_start_up(model_dir, monkeypatch):
    """On the GPU, a process's first compression takes seconds (compiling and first uses); mid-run
    every request would wait for it (BENCHMARKS.md). The engine runs one of N_max blocks (first
    and later) as it starts; the dense-reference tests above, on the GPU, show it leaves no
    trace. On the CPU there is nothing to compile, and a real model's warm-up would cost
    seconds and a GB."""
    runs = []
    monkeypatch.setattr(compressor.Compressor, "run", lambda self, c: runs.append(c))
    LLM(model_dir, block_size=16, kv_budget=BUDGET, window=4, num_kvcache_blocks=40)
    LLM(model_dir, block_size=16, kv_budget=None, num_kvcache_blocks=40)  # full KV: none
    blocks = [(len(plan.old_table), len(plan.new_table), plan.first) for plan in runs]
    assert blocks == ([(3, 3, True), (3, 3, False)] if torch.cuda.is_available() else [])
