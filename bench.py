"""Benchmarks of the engine: `python bench.py [--task TASK] [--workload W] [options]`.
Tasks (--task):
  throughput (default)  output tok/s of a workload, full KV and zipage, next to the roofline
  decode-step           one decode step of B requests with C cached tokens each, timed in parts
  compress-cost         one compression's time, and the decode step it runs beside
Workloads (--workload, for throughput):
  nano (default)  nano-vllm's benchmark: 256 requests, prompts and outputs of 100-1024 tokens
  r1              long reasoning: 32 requests, prompts of 128-512 tokens, outputs of 8192-16384,
                  the KV pool capped at 256 blocks of 256 tokens
The defaults are sized for a GPU (Qwen3-0.6B's shape, random weights). On a CPU they shrink to
run in minutes: SmolLM2-135M's shape, kv_budget 128, and workloads in blocks of 16 tokens,
nano as 16 requests of 12-128 tokens in and out (so that about half of them pass the budget and
are compressed), r1 as 8 requests with outputs of 256-512 tokens in a pool of 64 blocks
(CPU_WORKLOADS); each option's help gives its CPU default.

throughput (default) runs a workload in full-KV mode, in zipage mode (Compressed
PagedAttention, once for each budget of --kv-budget), or both in one process, and reports for
each: output tok/s (output tokens over wall time, prefill included, after a warm-up), and next
to it the roofline: bound_tok_s, the output tok/s of a perfect engine running the same steps
on this device, and of_bound = tok/s / bound_tok_s; peak and mean number of requests per
decode step, preemptions, compressions and their GPU time as a share of wall time (overlapped
with decoding when asynchronous); and each budget's ratio to full KV.
Both workloads draw lengths uniformly and use random token ids, temperature 0.6 and ignore_eos;
r1 caps the KV pool in both modes.
decode-step: one engine decode step of B requests with C cached tokens each, for each BxC of
--decode-shapes (default 1x512 and 28x2350, R1's steady state at budget 2048), full KV:
wall_ms (median `llm.step()`, CUDA graphs), gpu_ms (cpu_ms on a CPU: the device time of its
work), the host time not hidden behind it, bound_ms and of_bound = bound / wall, and
eager_wall_ms for reference.
compress-cost: GPU time of one compression of one request (--policy NAME: with that policy),
on the GPU also the own time and number of its kernels and copies (profiled), against one
decode step of --batch requests, and that step's time after a synchronous or beside an
asynchronous compression.
Roofline: each step's bound is its bytes (weights, and the K/V of its batch) at the copy
bandwidth or its FLOPs at the matmul rate, whichever takes longer (`step_cost`), both measured
here at start (`device_rates`; times --tensor-parallel-size); off the GPU there is no
roofline, and its columns are left out.
With no --model, --model-shape (default qwen3-0.6b; smollm2-135m on a CPU) writes only the
architecture's config.json to a cache folder and the engine makes random weights on the device
(load_format="dummy"), so that the benchmark needs no download. Prints one table (a column per
mode or shape), and with --json one JSON line after it.
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import random
import time
from dataclasses import replace

import torch
from tqdm import tqdm

from nanozipage import LLM, SamplingParams
from nanozipage.compressor import Compression, on_worker
from nanozipage.config import max_blocks
from nanozipage.model_runner import ModelRunner, step_plan
from nanozipage.parallel import Workers
from nanozipage.policy import POLICIES
from nanozipage.sequence import Sequence

QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "torch_dtype": "bfloat16",
    "eos_token_id": 151645,
}


QWEN3_8B = {
    **QWEN3_0_6B,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "tie_word_embeddings": False,
}
SMOLLM2_135M = {
    **QWEN3_0_6B,
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "eos_token_id": 2,
}
MODEL_SHAPES = {"qwen3-0.6b": QWEN3_0_6B, "qwen3-8b": QWEN3_8B, "smollm2-135m": SMOLLM2_135M}
ON_GPU = torch.cuda.is_available()


def config_only_model(shape: str) -> str:
    """A directory holding only the architecture's config.json, which the engine runs with
    load_format="dummy" (random weights made in place on the GPU): no checkpoint to download
    or write. Rewritten each run (a few hundred bytes), so it never goes stale."""
    root = os.environ.get("NANOZIPAGE_CACHE") or "~/.cache/nanozipage"
    path = os.path.join(os.path.expanduser(root), shape)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(MODEL_SHAPES[shape], f, indent=1)
    return path


def device_rates(num_gpus: int) -> tuple[float, float] | None:
    """(bytes/s, FLOP/s) of `num_gpus` GPUs like this one, as measured here; None off the GPU.

    Bandwidth: a 1 GiB device-to-device copy, counting the bytes read plus the bytes written
    (2 GiB a copy), as benchmarks/kernels.py does. HBM's bandwidth is shared by reads and
    writes, so this is also the rate at which a kernel that only reads can read: the decode
    attention kernel reads K/V at 96% of it (BENCHMARKS.md). Counting only the bytes read
    would halve it, and a good engine would then beat its own bound. Matmul: bf16 8192^3.
    """
    if not torch.cuda.is_available():
        return None
    from triton.testing import do_bench  # median milliseconds, L2 flushed between runs

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / do_bench(lambda: dst.copy_(src), return_mode="median") * 1e3
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    flop_rate = 2 * 8192**3 / do_bench(lambda: a @ a, return_mode="median") * 1e3
    # The buffers are freed on return; the engine empties the allocator's cache before it
    # sizes its KV pool from the free memory.
    return num_gpus * bandwidth, num_gpus * flop_rate


def step_cost(hf: dict, dtype_bytes: int, seqs: list[tuple[int, int, bool]]) -> tuple[int, int]:
    """(bytes, FLOPs) that a perfect engine must read and compute for one forward step of
    `seqs`: per request, (new tokens, context length including them, whether it samples).

    Bytes: every weight matrix once (the input embedding's rows are negligible; a tied
    embedding is the lm_head, read once) plus the K/V of every token of the batch's contexts
    once (a new token's K/V is written once instead). Norm weights and biases (under 0.1%) are
    left out. FLOPs: 2 per matmul weight per token fed, the lm_head only for the rows that
    sample, and attention's two matmuls (q.k and p.v: 4 * head_dim FLOPs per query head,
    layer and (query, key) pair) over the pairs the causal mask keeps: n new tokens at the end
    of a context of c tokens see n * c - n * (n - 1) / 2 keys in all.
    """
    h, layers, q_heads = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads", q_heads)
    d = hf.get("head_dim") or h // q_heads
    layer_params = h * d * (2 * q_heads + 2 * kv_heads) + 3 * h * hf["intermediate_size"]
    head_params = h * hf["vocab_size"]
    kv_bytes_per_token = layers * 2 * kv_heads * d * dtype_bytes
    tokens, rows = sum(n for n, _, _ in seqs), sum(samples for *_, samples in seqs)
    pairs = sum(n * c - n * (n - 1) // 2 for n, c, _ in seqs)
    num_bytes = dtype_bytes * (layers * layer_params + head_params)
    num_bytes += kv_bytes_per_token * sum(c for _, c, _ in seqs)
    flops = 2 * layers * layer_params * tokens + 2 * head_params * rows
    return num_bytes, flops + 4 * layers * q_heads * d * pairs


def bound_seconds(llm: LLM, steps: list, rates: tuple[float, float]) -> list[float]:
    """Each step's least time on this device: its bytes at the copy bandwidth or its FLOPs at
    the matmul rate, whichever takes longer (compressions are our overhead, not the bound's)."""
    hf, dtype_bytes = llm.config.hf_config, llm.model_runner.dtype.itemsize
    costs = (step_cost(hf, dtype_bytes, step) for step in steps)
    return [max(num_bytes / rates[0], flops / rates[1]) for num_bytes, flops in costs]


def record_steps(runner) -> list:
    """Wrap `runner.run` to record each step as it is launched: per request, (new tokens,
    context length, samples). Undo with `del runner.run` (the method shows again)."""
    run_step, steps = runner.run, []

    def recorded_run(seqs: list[Sequence], is_prefill: bool, pending=None):
        if is_prefill:
            ends = [seq.num_computed_tokens + seq.num_new_tokens for seq in seqs]
            steps.append([(s.num_new_tokens, end, end == len(s)) for s, end in zip(seqs, ends)])
        else:
            steps.append([(seq.num_new_tokens, seq.cache_len, True) for seq in seqs])
        return run_step(seqs, is_prefill, pending)

    runner.run = recorded_run
    return steps


WORKLOADS = {
    # name: (requests, prompt lengths, output lengths, engine config for both modes)
    "nano": (256, (100, 1024), (100, 1024), {}),  # nano-vllm's published benchmark
    "r1": (32, (128, 512), (8192, 16384), {"num_kvcache_blocks": 256, "block_size": 256}),
}
# Off the GPU, at 1/16 of kv_budget, in blocks of 16 tokens, with fewer requests. r1 at 1/16 of
# its lengths, its pool still holding kv_budget tokens per request, as on the GPU. nano at 1/8
# of its lengths: at 1/16 no request would pass N_max blocks, and zipage would be timed without
# a compression.
CPU_WORKLOADS = {
    "nano": (16, (12, 128), (12, 128), {"block_size": 16}),
    "r1": (8, (8, 32), (256, 512), {"num_kvcache_blocks": 64, "block_size": 16}),
}


def workload(name: str, seed: int, vocab: int):
    """Random token-id prompts and per-request output lengths (ignore_eos), temperature 0.6."""
    num_seqs, (p_lo, p_hi), (o_lo, o_hi), config = (WORKLOADS if ON_GPU else CPU_WORKLOADS)[name]
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(min(vocab, 10000)) for _ in range(rng.randint(p_lo, p_hi))]
        for _ in range(num_seqs)
    ]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(o_lo, o_hi))
        for _ in range(num_seqs)
    ]
    return prompts, params, config


def run(llm: LLM, prompts, params, rates: tuple[float, float] | None, label: str) -> dict:
    """Generate step by step. Compressions are timed on the stream they run on, with CUDA events
    read at the end, so that timing them does not make asynchronous compression synchronous.
    Each step's shape is recorded as it is launched, for the roofline (`bound_seconds`)."""
    runner, compressor = llm.model_runner, llm.model_runner.compressor
    compress, spans = compressor.run, []

    def timed_compress(compression):
        spans.append(Timer().start())
        compress(compression)
        spans[-1].stop()

    compressor.run = timed_compress
    steps = record_steps(runner)
    for prompt, p in zip(prompts, params):
        llm.add_request(prompt, p)
    output_tokens = sum(p.max_tokens for p in params)
    progress = tqdm(total=output_tokens, desc=label, unit="tok", mininterval=1, leave=False)
    timeline, start = [], time.perf_counter()
    while not llm.is_finished():
        _, num_tokens = llm.step()
        if num_tokens < 0:  # a decode step: its batch is the number of requests decoding
            timeline.append((time.perf_counter() - start, -num_tokens))
            progress.update(-num_tokens)
    elapsed = time.perf_counter() - start
    progress.close()
    del compressor.run
    del runner.run
    batches = [b for _, b in timeline]
    result = {"output_tokens": output_tokens, "seconds": elapsed}
    result["tok_per_s"] = output_tokens / elapsed
    if rates:  # the roofline, on the GPU
        bound = sum(bound_seconds(llm, steps, rates))
        result |= {"bound_tok_s": output_tokens / bound, "of_bound": bound / elapsed}
    return result | {
        "peak_running": max(batches),
        "mean_running": sum(batches) / len(batches),
        "preemptions": llm.scheduler.num_preemptions,
        "compressions": len(spans),
        "compress_share": sum(span.seconds() for span in spans) / elapsed,
        "timeline": timeline,
    }


class Timer:
    """Time GPU work with CUDA events on the current stream (wall time on the CPU)."""

    def start(self):
        if torch.cuda.is_available():
            self.begin, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.begin.record()
        else:
            self.begin = time.perf_counter()
        return self

    def stop(self):
        if torch.cuda.is_available():
            self.end.record()
        else:
            self.end = time.perf_counter()

    def seconds(self) -> float:
        if torch.cuda.is_available():
            self.end.synchronize()
            return self.begin.elapsed_time(self.end) / 1000
        return self.end - self.begin


def throughput(model: str, args) -> dict:
    """Each mode on the same workload, full KV first; zipage once per budget of --kv-budget."""
    modes = {"full": None} if args.mode != "zipage" else {}
    if args.mode != "full":
        modes.update({f"zipage-{budget}": budget for budget in args.kv_budget})
    results = {}
    for mode, kv_budget in modes.items():
        with open(os.path.join(model, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        prompts, params, config = workload(args.workload, args.seed, vocab)
        llm = LLM(
            model,
            enforce_eager=args.enforce_eager,
            kv_budget=kv_budget,
            async_compression=not args.sync_compression,
            **args.engine,
            **config,
        )
        # Warm-up: compile the kernels, and with compression run one compression too.
        warm = (kv_budget or 0) + 2 * llm.config.block_size
        warm_params = [replace(p, max_tokens=min(p.max_tokens, warm)) for p in params[:4]]
        llm.generate(prompts[:4], warm_params, use_tqdm=False)
        llm.scheduler.num_preemptions = 0
        results[mode] = run(llm, prompts, params, args.rates, mode)
        results[mode]["kv_blocks"] = llm.model_runner.num_blocks
        results[mode]["query_slots"] = llm.model_runner.num_query_slots
        llm.close()  # a tensor-parallel engine's workers end now, not when it is collected
        del llm
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if "full" in results:
        for mode, kv_budget in modes.items():
            if kv_budget:
                ratio = results[mode]["tok_per_s"] / results["full"]["tok_per_s"]
                results[mode]["ratio_to_full"] = ratio
    if args.plot:
        plot(results, list(modes), args.plot)
    return results


def plot(results: dict, modes: list[str], path: str):
    """PNG of running requests over time; without matplotlib, the timelines as JSON instead."""
    try:
        import matplotlib  # optional: pip install -e '.[plot]'
    except ImportError:
        with open(path + ".json", "w") as f:
            json.dump({mode: results[mode]["timeline"] for mode in modes}, f)
        print(f"matplotlib is not installed: timelines written to {path}.json")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for mode in modes:
        t, running = zip(*results[mode]["timeline"])
        ax.plot(t, running, label=f"{mode}: {results[mode]['tok_per_s']:.0f} tok/s")
    ax.set(xlabel="seconds", ylabel="requests decoding", title="Running requests over time")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def median_seconds(fn, repeat: int = 30) -> float:
    """Median wall time of `fn` over `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeat // 2]


def decode_gpu_seconds(llm: LLM, repeat: int = 20) -> float:
    """GPU time of the next decode step's work: its inputs' copies to the device, its forward
    pass (the captured graph) and its sampling, enqueued `repeat` times back to back between two
    CUDA events, after one more that fills the queue, so that the GPU never waits for the host.
    Each repeat feeds the same tokens at the same positions, so it rewrites the same K/V; then
    the step runs as usual."""
    runner, run_step, times = llm.model_runner, llm.model_runner.run, []

    @torch.inference_mode()
    def timed_run(seqs: list[Sequence], is_prefill: bool, pending=None):
        plan = step_plan(seqs, runner.slot_rows, is_prefill=False)

        def step():  # what `runner.run` does on the GPU (with penalties, they count each token)
            if runner.workers:  # every rank's forward pass, or rank 0's collectives wait forever
                runner.workers.call(ModelRunner.execute, plan)
            runner.sampler(seqs, runner.execute(plan, pending))

        step()
        timer = Timer().start()
        for _ in range(repeat):
            step()
        timer.stop()
        times.append(timer.seconds() / repeat)
        return run_step(seqs, is_prefill, pending)

    runner.run = timed_run
    llm.step()
    del runner.run
    return times[0]


@contextlib.contextmanager
def timed_start_phases():
    """Seconds of an engine's start-up as rank 0 sees them, by wrapping its stages: start_s, all
    of it; workers_started_s, spawning the workers until each runs (tensor parallelism);
    warmup_s, the largest prefill step (it compiles the kernels); kv_cache_s; graphs_s,
    capturing the decode graphs; workers_ready_s, waiting for the workers' shards after its
    own. What start_s holds beyond these is building the model and its weights."""
    phases, began = {}, time.perf_counter()

    def timed(cls, name, key, message=None):
        def wrapper(self, *args):
            start = time.perf_counter()
            result = original(self, *args)
            if message is None or args == (message,):
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - start
            return result

        original = getattr(cls, name)
        setattr(cls, name, wrapper)
        return cls, name, original

    patched = [
        timed(Workers, "__init__", "workers_started_s"),
        timed(ModelRunner, "warmup", "warmup_s"),
        timed(ModelRunner, "allocate_kv_cache", "kv_cache_s"),
        timed(ModelRunner, "capture_cudagraphs", "graphs_s"),
        timed(Workers, "expect", "workers_ready_s", "ready"),
    ]
    try:
        yield phases
    finally:
        for cls, name, original in patched:
            setattr(cls, name, original)
        phases["start_s"] = time.perf_counter() - began


def set_eager(runner, eager: bool):
    """Decode without CUDA graphs (eager) or with them again, on every rank: a rank replaying a
    graph padded to 32 requests while another runs 28 eagerly all-reduce different sizes, and
    NCCL waits forever. run_decode replays no graph when it finds none."""
    if runner.workers:  # rank 0 (a worker's runner has none)
        runner.workers.call(set_eager, eager)  # runs as set_eager(worker's runner, eager)
    if eager:
        runner.saved_graphs, runner.graphs = runner.graphs, {}
    else:
        runner.graphs = runner.saved_graphs  # the same dict: the workers' shutdown clears it


def decode_step(model: str, args) -> dict:
    """One engine decode step of `batch` requests with `context` cached tokens each, for each
    BxC of --decode-shapes; full KV, so that no compression interferes.

    wall_ms: median `llm.step()` over consecutive steps, through CUDA graphs (the engine's own
    sync, the sampled tokens coming back to the host, is the only one). gpu_ms: the GPU time
    of that step's work (`decode_gpu_seconds`). host_ms_not_hidden = max(0, wall - gpu): host
    time the GPU waits for. bound_ms: the step's least time on this device (`bound_seconds`:
    the weights and the batch's K/V at the copy bandwidth); of_bound = bound / wall.
    eager_wall_ms: the same step without CUDA graphs. start_s, warmup_s, ...: where `LLM(...)`
    spent its time (`timed_start_phases`). max_tokens covers every step measured, so the batch
    never shrinks, and the contexts grow by under 100 tokens meanwhile.
    """
    results, steps, max_tokens = {}, 32, 96
    for batch, context in args.decode_shapes:
        blocks = batch * -(-(context + max_tokens) // 256)
        with timed_start_phases() as phases:
            llm = LLM(
                model,
                **args.engine,
                max_num_seqs=max(batch, 256),
                num_kvcache_blocks=blocks,
                kv_budget=None,
            )
        rng, vocab = random.Random(args.seed), llm.config.hf_config["vocab_size"]
        params = SamplingParams(
            temperature=0.6,
            max_tokens=max_tokens,
            ignore_eos=True,
            presence_penalty=args.presence_penalty,
        )
        for _ in range(batch):
            llm.add_request([rng.randrange(vocab) for _ in range(context)], params)
        while llm.scheduler.waiting or any(s.in_prefill for s in llm.scheduler.running):
            llm.step()
        for _ in range(3):
            llm.step()
        runner, steps_run = llm.model_runner, record_steps(llm.model_runner)
        wall = median_seconds(llm.step, steps)
        del runner.run
        gpu = decode_gpu_seconds(llm)
        bound = sorted(bound_seconds(llm, steps_run, args.rates))[steps // 2] if args.rates else 0
        set_eager(runner, True)
        for _ in range(3):
            llm.step()
        eager = median_seconds(llm.step, 16)
        set_eager(runner, False)
        assert len(llm.scheduler.running) == batch, "a request finished while being measured"
        name = f"batch{batch}_context{context}"
        results[name] = {
            "wall_ms": 1000 * wall,
            ("gpu_ms" if ON_GPU else "cpu_ms"): 1000 * gpu,
            "host_ms_not_hidden": 1000 * max(0.0, wall - gpu),
        }
        if bound:  # the roofline, on the GPU
            results[name] |= {"bound_ms": 1000 * bound, "of_bound": bound / wall}
        results[name] |= {"eager_wall_ms": 1000 * eager, **phases}
        llm.close()  # a tensor-parallel engine's workers end now, not when it is collected
        del llm
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return results


def prefilled(llm: LLM, seq: Sequence, budget: int) -> Sequence:
    """seq with its prompt cached by a prefill step, decoding its last token next."""
    seq.kv_budget, seq.num_new_tokens = budget, len(seq)
    if not llm.scheduler.block_manager.allocate(seq):
        raise SystemExit("compress-cost: the KV pool has too few blocks for --batch")
    llm.model_runner.run([seq], is_prefill=True)
    seq.num_computed_tokens, seq.num_new_tokens = len(seq) - 1, 1
    return seq


def planned_compression(llm: LLM, budget: int, rng: random.Random) -> Compression:
    """One more request holding N_max full blocks of random tokens, prefilled, with its first
    compression planned (query slot 0): what `Compressor.run` takes, again and again."""
    b, vocab = llm.config.block_size, llm.config.hf_config["vocab_size"]
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=b)
    seq = Sequence([rng.randrange(vocab) for _ in range(max_blocks(budget, b) * b)], params, b)
    seq.query_slot = 0
    prefilled(llm, seq, budget)
    seq.token_ids.append(0)  # the token whose decode step triggers the compression
    job = Compression(seq, [], first=True, query_slot=seq.query_slot)
    llm.scheduler.block_manager.plan_compression(seq, job)
    return job


def compress_cost(model: str, args) -> dict:
    """What one compression costs, next to the decode step it competes with (R1's steady state).

    A batch of `--batch` requests with kv_budget + 3/4 of a block cached tokens each (2240 at
    budget 2048 in blocks of 256, between the budget and the 2304 at which a request
    compresses; blocks of 16 on a CPU) decodes, while one more request holding N_max full
    blocks (2304 tokens) is compressed again and again (the first of `--kv-budget`). The model
    runner is driven directly, so that nothing else (scheduling, other compressions) lands in
    the figures. Reports the GPU time of one
    compression (first and later: pooling runs only on the first), and the wall time of one
    decode step in the engine's overlapped rhythm: alone, with a synchronous compression before
    each step, and with an asynchronous compression launched on the side stream beside each
    step (the engine's default); `async_slowdown` is the last against the first.
    """
    budget, b = args.kv_budget[0], 256 if ON_GPU else 16
    n_max, length = budget // b + 1, budget + 3 * b // 4
    llm = LLM(
        model,
        **args.engine,
        kv_budget=budget,
        block_size=b,
        max_num_seqs=args.batch + 1,
        num_kvcache_blocks=(args.batch + 2) * n_max,
    )
    runner, compressor = llm.model_runner, llm.model_runner.compressor
    rng, vocab = random.Random(args.seed), llm.config.hf_config["vocab_size"]
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=b)
    batch = [
        prefilled(llm, Sequence([rng.randrange(vocab) for _ in range(length)], params, b), budget)
        for _ in range(args.batch)
    ]
    job = planned_compression(llm, budget, rng)

    def compress_now(job):
        """One compression on every rank, before the step (`run` alone would be rank 0's)."""
        if runner.workers:
            runner.workers.call(on_worker, "run", dataclasses.replace(job, seq=None))
        compressor.run(job)

    def compress_async(job):
        compressor.launch([job])

    def compression_gpu_seconds() -> float:
        timers = []
        for _ in range(10):
            timers.append(Timer().start())
            compress_now(job)
            timers[-1].stop()
        return sorted(t.seconds() for t in timers)[5]

    def step_seconds(compress=None, repeat=20) -> float:
        """Mean wall time of a decode step in the engine's overlapped rhythm (launch step N+1,
        then read step N's samples), with `compress(job)` launched before each step."""
        previous = runner.run(batch, is_prefill=False)
        start = time.perf_counter()
        for _ in range(repeat):
            if compress:
                compress(job)
            launched = runner.run(batch, is_prefill=False)
            previous.tolist()
            previous = launched
        previous.tolist()
        compressor.poll(wait=True)
        compressor.running.clear()  # the same record launched again and again: nothing to finish
        return (time.perf_counter() - start) / repeat

    results = {
        "batch": args.batch,
        "kv_budget": budget,
        "policy": llm.config.policy,
        "first_compression_ms": 1000 * compression_gpu_seconds(),
    }
    job.first = False
    results["compression_ms"] = 1000 * compression_gpu_seconds()
    if ON_GPU:  # its GPU work (kernels and copies), time and count: the rest is launch gaps
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profiler:
            for _ in range(10):
                compress_now(job)
            torch.cuda.synchronize()
        ops = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        results["compression_gpu_ops_ms"] = sum(e.time_range.elapsed_us() for e in ops) / 10_000
        results["compression_gpu_ops"] = len(ops) / 10
    step_seconds()  # warm-up
    results["decode_step_ms"] = 1000 * step_seconds()
    results["decode_step_sync_compression_ms"] = 1000 * step_seconds(compress_now)
    results["decode_step_async_compression_ms"] = 1000 * step_seconds(compress_async)
    results["async_slowdown"] = (
        results["decode_step_async_compression_ms"] / results["decode_step_ms"] - 1
    )
    llm.close()
    return results


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    tasks, modes = ["throughput", "decode-step", "compress-cost"], ["full", "zipage", "both"]
    parser.add_argument(
        "--task", choices=tasks, default="throughput", metavar="TASK", help="one of the tasks above"
    )
    parser.add_argument(
        "--workload",
        choices=list(WORKLOADS),
        default="nano",
        metavar="W",
        help="throughput: one of the workloads above",
    )
    parser.add_argument(
        "--mode",
        choices=modes,
        default="both",
        metavar="MODE",
        help="throughput: full (KV), zipage (once per --kv-budget) or both (default)",
    )
    parser.add_argument(
        "--kv-budget",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[2048] if ON_GPU else [128],
        metavar="N[,N...]",
        help="zipage: tokens kept, each in turn (default 2048; 128 on a CPU)",
    )
    parser.add_argument(
        "--sync-compression",
        action="store_true",
        help="compress before the decode step, on the same stream",
    )
    parser.add_argument(
        "--model", metavar="DIR", help="checkpoint directory (default: random weights)"
    )
    parser.add_argument(
        "--model-shape",
        choices=list(MODEL_SHAPES),
        metavar="SHAPE",
        help="random weights of qwen3-0.6b (default), qwen3-8b or smollm2-135m (CPU default)",
    )
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, metavar="N", help="GPUs per model"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=28 if ON_GPU else 4,
        metavar="B",
        help="compress-cost: requests decoding (default 28; 4 on a CPU)",
    )
    parser.add_argument(
        "--policy",
        choices=list(POLICIES),
        metavar="NAME",
        help="compress-cost, throughput: the eviction policy (default: the engine's default)",
    )
    parser.add_argument(
        "--decode-shapes",
        metavar="BxC[,BxC...]",
        type=lambda v: [tuple(int(x) for x in shape.split("x")) for shape in v.split(",")],
        default=[(1, 512), (28, 2350)] if ON_GPU else [(1, 64), (4, 256)],
        help="decode-step: batch x context (default 1x512,28x2350; 1x64,4x256 on a CPU)",
    )
    parser.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        metavar="P",
        help="decode-step: every request's presence penalty (0: the penalty-free path)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="of the random prompts and lengths"
    )
    parser.add_argument(
        "--enforce-eager", action="store_true", help="throughput: decode without CUDA graphs"
    )
    parser.add_argument(
        "--plot", metavar="PNG", help="throughput: plot running requests over time (matplotlib)"
    )
    parser.add_argument("--json", action="store_true", help="after the table, the figures as JSON")
    return parser


def main():
    parser = make_parser()
    args = parser.parse_args()
    if args.model and args.model_shape:
        parser.error("--model and --model-shape exclude each other")
    shape = None if args.model else args.model_shape or ("qwen3-0.6b" if ON_GPU else "smollm2-135m")
    model = args.model or config_only_model(shape)
    # What every task passes to LLM beyond its own keys, and the device's roofline rates.
    args.engine = {"load_format": "dummy"} if shape else {}
    if args.policy:
        args.engine["policy"] = args.policy
    if args.tensor_parallel_size > 1:
        args.engine["tensor_parallel_size"] = args.tensor_parallel_size
    args.rates = device_rates(args.tensor_parallel_size)
    result = {
        "task": args.task,
        "model": args.model or f"{shape} (random weights)",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if args.rates:  # the roofline's rates; off the GPU there is none
        result |= {"copy_TB_s": args.rates[0] / 1e12, "matmul_TFLOP_s": args.rates[1] / 1e12}
    tasks = {"throughput": throughput, "decode-step": decode_step, "compress-cost": compress_cost}
    result.update(tasks[args.task](model, args))
    for value in result.values():
        if isinstance(value, dict):
            value.pop("timeline", None)
    print_table(result)
    if args.json:
        print(json.dumps(result))


def print_table(result: dict):
    """The run's settings on one line, then a table: a row per figure, a column per mode (or
    decode shape); a task without modes (compress-cost) has one column of its figures."""
    settings = {key: value for key, value in result.items() if key in SETTINGS}
    print(", ".join(f"{key}: {show(value)}" for key, value in settings.items()))
    columns = {key: value for key, value in result.items() if isinstance(value, dict)}
    if not columns:
        columns = {"": {k: v for k, v in result.items() if k not in SETTINGS}}
    names = list(dict.fromkeys(name for figures in columns.values() for name in figures))
    rows = [["", *columns]]
    rows += [
        [name, *(show(figures.get(name, "")) for figures in columns.values())] for name in names
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:])))


SETTINGS = ["task", "model", "device", "copy_TB_s", "matmul_TFLOP_s"]


def show(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
