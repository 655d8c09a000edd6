"""A failed or interrupted step leaves the engine usable: nothing wrong, nothing lost, nothing hung.

An exception is injected at each stage of a step (schedule, forward pass, sampling, compaction
launch, compaction finish), in the plain and the overlapped loop, with asynchronous compression
(on the CPU it runs inline, through the same bookkeeping) and once under tensor parallelism. The
call that fails raises; the next call gives what a fresh engine gives and no block leaks.
"""

import os
import random
import sys

import pytest
import torch
from helpers import make_tiny_model

from nanozipage import LLM, SamplingParams

# Block size 8, budget 16: a request compresses at 24 cached tokens, then every 8; 16-token
# chunks split the longer prompts; the pool is tight enough for a few preemptions.
CONFIG = {"block_size": 8, "kv_budget": 16, "window": 2, "num_kvcache_blocks": 16,
          "max_num_batched_tokens": 16}  # fmt: skip
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


def stage_owner(llm: LLM, stage: str):
    return {
        "schedule": llm.scheduler,
        "run": llm.model_runner,
        "sample": llm.model_runner,
        "launch": llm.model_runner.compressor,
        "poll": llm.model_runner.compressor,
        "finish_compression": llm.scheduler,
        "_free_blocks": llm.scheduler,
    }[stage]


def assert_clean(llm: LLM):
    """Nothing queued, running, compacting or unclaimed, and every block free. (The overlapped
    loop may still hold a launched step of aborted requests: the next step drops its tokens.)"""
    assert llm.scheduler.is_finished() and not llm.unclaimed
    assert not llm.model_runner.compressor.running
    assert llm.scheduler.block_manager.num_free_blocks == llm.model_runner.num_blocks


# A failure in `Scheduler.finish_compression` loses the other jobs of that poll: they stay
# "compressing" with their old blocks held for good (the engine never finishes again).
# `_free_blocks` fails inside `schedule`, after it planned a compression that never launches.
STAGES = [("schedule", 6), ("run", 6), ("sample", 4), ("launch", 2), ("poll", 2),
          ("finish_compression", 2), ("_free_blocks", 1)]  # fmt: skip


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
@pytest.mark.parametrize("stage, k", STAGES)
def test_a_step_failing_at_any_stage_leaves_the_engine_usable(
    model_dir, fresh, monkeypatch, stage, k, overlap
):
    llm = LLM(model_dir, **CONFIG, overlap_scheduling=overlap, async_compression=True)
    compressor = llm.model_runner.compressor
    counts = {
        "poll": lambda: compressor.running,  # a poll with work
        "_free_blocks": lambda: any(seq.compression for seq in llm.scheduler.running),
    }.get(stage)
    fail_on_call(monkeypatch, stage_owner(llm, stage), stage, k, counts=counts)
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
        compressor = llm.model_runner.compressor
        for stage, k in STAGES:
            counts = (lambda: compressor.running) if stage == "poll" else None
            fail_on_call(monkeypatch, stage_owner(llm, stage), stage, k, counts=counts)
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
    for k in range(1, lines[0], lines[0] // int(os.environ.get("CTRL_C_POINTS", 25))):
        interrupt_at_line(k)
        try:
            with pytest.raises(KeyboardInterrupt):
                llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        finally:
            sys.settrace(None)
        assert_clean(llm)
        free = llm.scheduler.block_manager.free_block_ids
        assert len(set(free)) == len(free) == llm.model_runner.num_blocks
        assert [o["token_ids"] for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)] == fresh
