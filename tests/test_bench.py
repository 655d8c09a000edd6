"""bench.py's roofline: the bytes and FLOPs a perfect engine needs for a step, by hand; and
every task runs end to end on the CPU."""

import json
import os
import subprocess
import sys

import pytest
from helpers import make_tiny_model

from bench import CPU_WORKLOADS, QWEN3_0_6B, WORKLOADS, make_parser, step_cost

# hidden 4, one layer, 2 query heads of dim 2, 1 KV head, MLP 8, vocab 10. Matmul weights of the
# layer: q 4x4, k 4x2, v 4x2, o 4x4, gate/up/down 4x8 each = 16+8+8+16+96 = 144; lm_head 40.
TINY = {
    "hidden_size": 4,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 2,
    "intermediate_size": 8,
    "vocab_size": 10,
}


def test_decode_step_reads_weights_once_and_every_cached_kv_of_the_batch():
    # Two requests decoding at contexts 5 and 7, bf16 (2 bytes).
    num_bytes, flops = step_cost(TINY, 2, [(1, 5, True), (1, 7, True)])
    weights, kv = 2 * (144 + 40), 12 * (1 * 2 * 1 * 2 * 2)  # 12 tokens of K and V, 1 head of 2
    assert num_bytes == weights + kv == 464
    # 2 tokens through 144 weights and the lm_head; q.k and p.v over 12 (query, key) pairs.
    assert flops == 2 * 144 * 2 + 2 * 40 * 2 + 4 * 1 * 2 * 2 * 12 == 928


def test_prefill_chunk_counts_causal_pairs_and_skips_the_lm_head_when_not_sampling():
    # A 3-token chunk ending a 5-token context: its queries see 3 + 4 + 5 = 12 keys.
    num_bytes, flops = step_cost(TINY, 2, [(3, 5, False)])
    assert num_bytes == 368 + 5 * 8
    assert flops == 2 * 144 * 3 + 4 * 2 * 2 * 12 == 1056


def test_qwen3_0_6b_reads_its_published_kv_bytes_per_token():
    # 28 layers x (K, V) x 8 KV heads x 128 dims x 2 bytes = 114,688 bytes of K/V per token:
    # one more token of context adds them once to a decode step's bytes.
    one, _ = step_cost(QWEN3_0_6B, 2, [(1, 1, True)])
    two, _ = step_cost(QWEN3_0_6B, 2, [(1, 2, True)])
    assert two - one == 114_688


def test_help_names_every_task_and_workload_and_explains_every_option():
    parser = make_parser()
    text = parser.format_help()
    for name in ["throughput", "decode-step", "compress-cost", *WORKLOADS]:
        assert f"\n  {name} " in text  # a line of the description's lists
    assert all(action.help for action in parser._actions)


def test_cpu_workloads_mirror_the_gpu_ones_and_fit_their_pool():
    for name, (_, (_, prompt), (_, output), config) in CPU_WORKLOADS.items():
        assert name in WORKLOADS and config["block_size"] == 16
        pool = config.get("num_kvcache_blocks", 1 << 20) * config["block_size"]
        assert prompt + output <= pool


# decode-step and compress-cost build steps by hand, outside the scheduler: a change to what a
# step plan reads from a request can break them alone. Each task also under two ranks (gloo),
# where every rank must run the same steps, and "both" makes two engines in one process.
# About 90 s, hence exhaustive.
@pytest.mark.exhaustive
@pytest.mark.parametrize("ranks", ["1", "2"])
@pytest.mark.parametrize(
    "args",
    [
        ["--task", "decode-step", "--decode-shapes", "1x16,2x16"],
        ["--task", "compress-cost", "--batch", "1"],
        ["--task", "throughput", "--mode", "both"],
    ],
)
def test_every_task_runs_on_the_cpu(args, ranks, tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if ranks == "2":  # the CPU's default shape has 9 heads: a tiny model that two ranks split
        args = [*args, "--tensor-parallel-size", "2", "--model", make_tiny_model("qwen3", tmp_path)]
    command = [sys.executable, os.path.join(repo, "bench.py"), *args, "--json"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["task"] == args[1] and result["device"] == "cpu"
    assert "None" not in run.stdout  # nothing a CPU cannot measure
    if args[1] == "throughput" and ranks == "1":  # the default workload reaches compression
        assert result["zipage-128"]["compressions"] > 0


def test_the_cpu_nano_workload_passes_the_default_budget():
    _, (_, prompt), (_, output), config = CPU_WORKLOADS["nano"]
    n_max = 128 // config["block_size"] + 1
    assert prompt + output > n_max * config["block_size"]
