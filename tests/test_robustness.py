"""A failed or interrupted step leaves the engine usable: nothing wrong, nothing lost, nothing hung.

An exception is injected at each stage of a step (schedule, forward pass, sampling, compression
launch, compression finish), in the plain and the overlapped loop, with asynchronous compression
(on the CPU it runs inline, through the same bookkeeping) and once under tensor parallelism. The
call that fails raises; the next call gives what a fresh engine gives and no block leaks.
"""

import functools
import gc
import os
import random
import sys
import threading

import pytest
import torch
from helpers import make_tiny_model

from nanozipage import LLM, SamplingParams

# Block size 8, budget 16: a request compresses at 24 cached tokens, then every 8; 16-token
# chunks split the longer prompts; the pool is tight enough for a few preemptions.
CONFIG = {
    "block_size": 8,
    "kv_budget": 16,
    "window": 2,
    "num_kvcache_blocks": 16,
    "max_num_batched_tokens": 16,
}
rng = random.Random(0)
PROMPTS = [[rng.randrange(256) for _ in range(n)] for n in (5, 21, 30, 12)]
PARAMS = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=True)


class Injected(Exception):
    """The failure the tests inject."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def fresh(model_dir) -> list[list[int]]:
    """What an engine that never failed generates (the loop and compression mode change nothing:
    test_overlap.py and test_compression.py)."""
    outputs = LLM(model_dir, **CONFIG).generate(PROMPTS, PARAMS, use_tqdm=False)
    return [o["token_ids"] for o in outputs]


def fail_on_call(monkeypatch, owner, name: str, k: int, error=Injected, counts=None):
    """Make `owner.name` raise `error` on its k-th call (before doing anything) and behave
    normally otherwise; only calls for which `counts()` is true count."""
    original, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        if counts is None or counts():
            calls.append(args)
            if len(calls) == k:
                raise error(f"{name} fails on call {k}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def called_from(function: str) -> bool:
    frame = sys._getframe()
    while frame and frame.f_code.co_name != function:
        frame = frame.f_back
    return frame is not None


def counts(llm: LLM, stage: str):
    """Which calls of the stage count towards k (None: all)."""
    return functools.partial(COUNTS[stage], llm) if stage in COUNTS else None


def stage_owner(llm: LLM, stage: str):
    return {
        "schedule": llm.scheduler,
        "run": llm.model_runner,
        "__call__": type(llm.model_runner.sampler),  # sampling
        "launch": llm.model_runner.compressor,
        "poll": llm.model_runner.compressor,
        "finish_compression": llm.scheduler,
        "_free_blocks": llm.scheduler,
        "plan_compression": llm.scheduler.block_manager,
        "_uncache": llm.scheduler.block_manager,
        "_release": llm.scheduler.block_manager,
        "done": llm.model_runner.compressor,
    }[stage]


def assert_clean(llm: LLM):
    """Nothing queued, running, compressing or unclaimed, and every block free. (The overlapped
    loop may still hold a launched step of aborted requests: the next step drops its tokens.)"""
    assert llm.scheduler.is_finished() and not llm.unclaimed
    assert not llm.model_runner.compressor.running
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks


# `finish_compression` fails on the second poll with work (a failure there must neither lose the
# compressions polled with it nor free a block twice when retried), `_free_blocks` inside
# `schedule` after it planned a compression that never launches, `plan_compression` and
# `_uncache` while a compression is being planned (after it took a block: its record must give
# back what it took), `_release` while a compression frees the old blocks, `done` after a compression
# switched its table.
STAGES = [
    ("schedule", 6),
    ("run", 6),
    ("__call__", 4),
    ("launch", 2),
    ("poll", 2),
    ("finish_compression", 2),
    ("_free_blocks", 1),
    ("plan_compression", 2),
    ("_uncache", 2),
    ("_release", 1),
    ("done", 1),
]
COUNTS = {  # which calls count towards k: those made while a compression is under way
    "poll": lambda llm: llm.model_runner.compressor.running,
    "_free_blocks": lambda llm: any(seq.compression for seq in llm.scheduler.running),
    "_uncache": lambda llm: called_from("plan_compression"),
    "_release": lambda llm: llm.model_runner.compressor.running,
}


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
@pytest.mark.parametrize("stage, k", STAGES)
def test_a_step_failing_at_any_stage_leaves_the_engine_usable(
    model_dir, fresh, monkeypatch, stage, k, overlap
):
    llm = LLM(model_dir, **CONFIG, overlap_scheduling=overlap, async_compression=True)
    fail_on_call(monkeypatch, stage_owner(llm, stage), stage, k, counts=counts(llm, stage))
    with pytest.raises(Injected):
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert_clean(llm)  # the failed call's own requests are aborted, and return nothing
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == fresh
    assert_clean(llm)
    assert llm.is_finished()


@pytest.mark.parametrize("stage, k", [("run", 6), ("launch", 2)])
def test_synchronous_compression_recovers_too(model_dir, fresh, monkeypatch, stage, k):
    llm = LLM(model_dir, **CONFIG, async_compression=False)
    fail_on_call(monkeypatch, stage_owner(llm, stage), stage, k)
    with pytest.raises(Injected):
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert_clean(llm)
    assert [o["token_ids"] for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)] == fresh


def test_a_failed_step_aborts_an_added_request_it_touched_and_returns_it_from_step(
    model_dir, fresh, monkeypatch
):
    """A request queued with `add_request` that the failing step ran comes back from the next
    `step()` with finish_reason "abort", with the tokens it had; the engine then works."""
    llm = LLM(model_dir, **CONFIG)
    added = llm.add_request(PROMPTS[0], PARAMS)
    fail_on_call(monkeypatch, llm.model_runner, "run", 6)
    with pytest.raises(Injected):
        llm.generate(PROMPTS[1:], PARAMS, use_tqdm=False)
    outputs, _ = llm.step()
    assert [(o["request_id"], o["finish_reason"]) for o in outputs] == [(added, "abort")]
    tokens = outputs[0]["token_ids"]
    assert 0 < len(tokens) < PARAMS.max_tokens and tokens == fresh[0][: len(tokens)]
    assert_clean(llm)
    assert [o["token_ids"] for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)] == fresh


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
def test_ctrl_c_in_generate_aborts_its_own_requests_and_keeps_an_added_one(
    model_dir, fresh, monkeypatch, overlap
):
    """KeyboardInterrupt between two steps of `generate`: its own requests are aborted and
    return nothing; a request added before with `add_request` runs on, and its full result
    comes back from `step()`."""
    llm = LLM(model_dir, **CONFIG, overlap_scheduling=overlap)
    added = llm.add_request(PROMPTS[2], PARAMS)
    fail_on_call(monkeypatch, llm, "step", 5, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([PROMPTS[1], PROMPTS[3]], PARAMS, use_tqdm=False)
    monkeypatch.undo()
    outputs = []
    while not llm.is_finished():
        outputs += llm.step()[0]
    assert [(o["request_id"], o["finish_reason"]) for o in outputs] == [(added, "length")]
    assert outputs[0]["token_ids"] == fresh[2]
    assert_clean(llm)


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs two GPUs"
)
def test_a_step_failing_at_any_stage_under_tensor_parallelism_keeps_the_ranks_in_step(
    model_dir, monkeypatch
):
    """Two ranks (gloo on the CPU), one engine, a failure at each stage in turn: each failed call
    raises, the next one gives the same tokens as before any failure, and the worker lives (a
    failure while rank 0 samples still sends the worker that step's samples)."""
    with LLM(model_dir, **CONFIG, tensor_parallel_size=2) as llm:
        before = [o["token_ids"] for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
        for stage, k in STAGES:
            fail_on_call(monkeypatch, stage_owner(llm, stage), stage, k, counts=counts(llm, stage))
            with pytest.raises(Injected):
                llm.generate(PROMPTS, PARAMS, use_tqdm=False)
            monkeypatch.undo()
            assert_clean(llm)
            assert [o["token_ids"] for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)] == before
            assert_clean(llm)
        assert llm.model_runner.workers.processes[0].is_alive()


def interrupt_at_line(k: int):
    """Trace the engine's own Python lines and raise KeyboardInterrupt at the k-th one, as a
    Ctrl-C landing there would (a trace function that raises is switched off: once only)."""
    lines = [0]

    def local(frame, event, arg):
        if event == "line":
            lines[0] += 1
            if lines[0] == k:
                raise KeyboardInterrupt(f"at {frame.f_code.co_filename}:{frame.f_lineno}")
        return local

    def on_call(frame, event, arg):
        return local if "/nanozipage/" in frame.f_code.co_filename else None

    sys.settrace(on_call)
    return lines


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
def test_a_ctrl_c_at_any_line_of_the_engine_leaves_it_usable(model_dir, fresh, overlap):
    """A Ctrl-C landing on any line the engine runs during a compressing `generate` (sampled
    evenly over all of them): `generate` raises KeyboardInterrupt, no block leaks or is freed
    twice, and the next call gives what a fresh engine gives."""
    llm = LLM(model_dir, **CONFIG, overlap_scheduling=overlap)
    lines = interrupt_at_line(0)
    llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    sys.settrace(None)
    for k in range(1, lines[0], lines[0] // int(os.environ.get("CTRL_C_POINTS", "25"))):
        interrupt_at_line(k)
        try:
            with pytest.raises(KeyboardInterrupt):
                llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        finally:
            sys.settrace(None)
        assert_clean(llm)
        manager = llm.scheduler.block_manager
        assert len(set(manager.free_block_ids)) == len(manager.free_block_ids)
        assert manager.num_free_blocks == llm.model_runner.num_blocks
        assert [o["token_ids"] for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)] == fresh


def test_a_second_thread_gets_a_clear_error_and_the_first_its_tokens(model_dir, fresh):
    """The engine's state is not thread-safe: while one thread is inside `generate`, another
    thread's call raises at once, before it touches anything, and the first call is unharmed."""
    llm = LLM(model_dir, **CONFIG)
    inside, go_on, results = threading.Event(), threading.Event(), {}
    run = llm.model_runner.run

    def slow_run(*args):
        inside.set()
        go_on.wait(timeout=60)
        return run(*args)

    llm.model_runner.run = slow_run
    first = threading.Thread(target=lambda: results.update(a=llm.generate(PROMPTS, PARAMS)))
    first.start()
    assert inside.wait(timeout=60)
    for call in (lambda: llm.generate(PROMPTS, PARAMS), lambda: llm.step()):
        with pytest.raises(RuntimeError, match="another thread is using this LLM"):
            call()
    go_on.set()
    first.join(timeout=120)
    assert [o["token_ids"] for o in results["a"]] == fresh
    assert_clean(llm)


def test_num_cached_tokens_counts_the_prompt_once_also_after_preemptions(model_dir):
    """Set when a request is first scheduled: a recompute after preemption finds its own blocks
    in the prefix cache, which are not the prompt's cache hits."""
    llm = LLM(model_dir, block_size=8, kv_budget=None, num_kvcache_blocks=10)
    prompts = [prompt[:5] for prompt in PROMPTS]  # 35 tokens in all: 5 of the 10 blocks each
    outputs = llm.generate(prompts, PARAMS, use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    assert [o["num_cached_tokens"] for o in outputs] == [0] * len(prompts)


def test_a_finished_request_gives_back_its_penalty_counts_row(model_dir):
    llm = LLM(model_dir, **CONFIG)
    penalized = SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.2)
    llm.generate(PROMPTS, penalized, use_tqdm=False)
    assert not llm.model_runner.sampler.count_rows
    added = llm.add_request(PROMPTS[0], penalized)
    llm.step()
    llm.step()
    llm.abort(added)
    assert not llm.model_runner.sampler.count_rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pool is sized by GPU memory")
def test_an_engine_only_a_reference_cycle_holds_is_gone_before_the_next_one_starts(model_dir):
    """Its pool and CUDA graphs are freed before the next engine sizes its pool and captures
    its graphs: a graph destroyed during another's capture breaks that capture."""
    first = LLM(model_dir)
    blocks, first.itself = first.model_runner.num_blocks, first
    del first  # now only the cycle collector can free it
    gc.disable()  # and it does not run by itself here
    try:
        second = LLM(model_dir)
    finally:
        gc.enable()
    assert second.model_runner.num_blocks > 0.9 * blocks
