"""Time the attention kernels on a GPU; the figures go to BENCHMARKS.md.

Decode is memory-bound: its figure is the K/V bytes read per second, against the device's copy
bandwidth (bytes read + written by a large device-to-device copy). Prefill is compute-bound: its
figure is its time against PyTorch's flash attention on the same data, and TFLOP/s. With
`--compression`, the compression kernels instead, on the request of `bench.py --task
compress-cost` (28 layers, 8 KV heads, 2,304 tokens kept to 2,048), each against the bytes or
FLOPs it must move. With `--gemv`, the projections of one token of the Qwen3-0.6B shape, cuBLAS
against `gemv`, alone and after the norm or activation that feeds it, each as 28 launches on
distinct weights replayed from a CUDA graph, as in a decode step.

    PYTHONPATH=. python benchmarks/kernels.py           # the wrappers' default tiles
    PYTHONPATH=. python benchmarks/kernels.py --sweep   # also try other tiles, print the best
    PYTHONPATH=. python benchmarks/kernels.py --compression [--sweep]
    PYTHONPATH=. python benchmarks/kernels.py --gemv
    PYTHONPATH=. python benchmarks/kernels.py --splits  # decode attention's splits, graph-timed
"""

import argparse
from functools import partial

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from nanozipage.kernels.decode_attention import decode_attention
from nanozipage.kernels.layer_ops import add_rms_norm, gemv, silu_and_mul
from nanozipage.kernels.move_kept import move_kept
from nanozipage.kernels.prefill_attention import prefill_attention
from nanozipage.kernels.redundancy import redundancy_sums
from nanozipage.kernels.window_score import window_scores

DTYPE, HEAD_DIM, NUM_Q_HEADS, NUM_KV_HEADS, BLOCK_SIZE = torch.bfloat16, 128, 16, 8, 256
DECODE_TILES = [  # block_n, num_warps, num_stages
    (32, 4, 3),
    (32, 4, 5),
    (64, 4, 2),
    (64, 4, 3),
    (64, 4, 5),
    (64, 4, 6),
    (64, 8, 3),
    (64, 8, 5),
    (128, 4, 2),
    (128, 4, 3),
    (128, 4, 5),
    (128, 8, 3),
    (128, 8, 5),
    (64, 2, 3),
    (256, 8, 2),
    (256, 8, 3),
]
PREFILL_TILES = [  # block_m, block_n, num_warps, num_stages
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 64, 8, 4),
    (128, 128, 8, 2),
    (128, 64, 4, 3),
    (64, 64, 4, 3),
    (128, 32, 4, 3),
    (64, 128, 4, 3),
]

COMPRESSION = (28, 8, 9, 8)  # layers, KV heads, blocks cached, blocks kept (of BLOCK_SIZE)
WINDOW_TILES = [(64, 4, 2), (128, 4, 2), (128, 4, 3), (128, 8, 2), (256, 4, 2), (256, 8, 2)]
GEMV_SHAPES = {  # Qwen3-0.6B's projections: (out, in) features
    "qkv_proj": (4096, 1024),
    "o_proj": (1024, 2048),
    "gate_up_proj": (6144, 1024),
    "down_proj": (1024, 3072),
}
REDUNDANCY_TILES = [(16, 4, 1), (32, 4, 1), (32, 8, 1), (32, 4, 2), (64, 8, 1)]  # block_m, ...


def bench(fn) -> float:
    """Median milliseconds of `fn`, L2 flushed between runs."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.randn(2**29, device="cuda", dtype=DTYPE)  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.nbytes / bench(lambda: dst.copy_(src)) * 1e3


def paged_kv(batch, ctx_len):
    """Random caches holding `batch` sequences of `ctx_len` tokens in shuffled blocks."""
    blocks_per_seq = triton.cdiv(ctx_len, BLOCK_SIZE)
    shape = (batch * blocks_per_seq, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    v_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    tables = torch.randperm(shape[0], device="cuda", dtype=torch.int32)
    return k_cache, v_cache, tables.view(batch, blocks_per_seq)


def time_decode(batch, ctx_len, **tiles) -> tuple[float, float]:
    """(ms, K/V bytes read per second)."""
    k_cache, v_cache, tables = paged_kv(batch, ctx_len)
    q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    lens = torch.full((batch,), ctx_len, device="cuda", dtype=torch.int32)
    ms = bench(lambda: decode_attention(q, k_cache, v_cache, lens, tables, 0.1, **tiles))
    kv_bytes = 2 * batch * ctx_len * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()
    return ms, kv_bytes / ms * 1e3


def time_prefill(num_seqs=8, seq_len=2048, **tiles) -> tuple[float, float, float]:
    """(our ms, SDPA flash ms, max |difference|) on the same causal prompts."""
    k_cache, v_cache, tables = paged_kv(num_seqs, seq_len)
    q = torch.randn(num_seqs * seq_len, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    cu_seqlens = torch.arange(0, num_seqs + 1, device="cuda", dtype=torch.int32) * seq_len
    lens = torch.full((num_seqs,), seq_len, device="cuda", dtype=torch.int32)
    scale = HEAD_DIM**-0.5

    def ours():
        return prefill_attention(
            q, k_cache, v_cache, cu_seqlens, lens, tables, seq_len, scale, **tiles
        )

    def as_bhsd(cache):  # [seqs, heads, seq_len, dim], contiguous, as SDPA wants it
        return cache[tables.long()].transpose(1, 2).flatten(2, 3)[:, :, :seq_len].contiguous()

    q4 = q.view(num_seqs, seq_len, NUM_Q_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    k4, v4 = as_bhsd(k_cache), as_bhsd(v_cache)

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)

    diff = (ours().view_as(q) - flash().transpose(1, 2).reshape_as(q)).abs().max().item()
    return bench(ours), bench(flash), diff


def bandwidth(num_bytes: float, us: float, copy: float) -> str:
    """`num_bytes` moved in `us` microseconds: TB/s, and the share of the copy bandwidth."""
    rate = num_bytes / us * 1e6
    return f"{rate / 1e12:.2f} TB/s = {rate / copy:.0%} of copy"


def graph_us(calls: list) -> float:
    """Microseconds per call of `calls` (closures), captured back to back in a CUDA graph and
    replayed: no host time between them, as in a decode step."""
    for call in calls:  # compile and warm up outside the graph
        call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return bench(graph.replay) * 1e3 / len(calls)


def time_splits(copy: float, layers: int = 8):
    """Decode attention per layer for a range of splits: `layers` launches, each on K/V of its
    own so that none is read from L2, graph-timed (`bench` of one call times the host's launch
    at small batches, BENCHMARKS.md)."""
    for batch, ctx_len in ((1, 512), (28, 2350), (8, 8192), (100, 1000), (64, 4096)):
        q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        lens = torch.full((batch,), ctx_len, device="cuda", dtype=torch.int32)
        caches = [paged_kv(batch, ctx_len) for _ in range(layers)]
        kv_bytes = 2 * batch * ctx_len * NUM_KV_HEADS * HEAD_DIM * q.element_size()
        for num_splits in (None, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
            calls = [
                partial(decode_attention, q, k, v, lens, tables, 0.1, num_splits)
                for k, v, tables in caches
            ]
            us = graph_us(calls)
            what = f"decode {batch} x {ctx_len}, splits {num_splits or 'default'}"
            print(f"| {what} | {us:.1f} us | {bandwidth(kv_bytes, us, copy)} |")
        del caches


def prefill_tflops(ms, num_seqs=8, seq_len=2048) -> float:
    return 2 * num_seqs * NUM_Q_HEADS * seq_len**2 * HEAD_DIM / ms / 1e9  # causal: half of 4*S^2*D


def sweep() -> tuple[dict, dict]:
    """The fastest tiles for decode at batch 64 and for prefill; a tile that fails is reported."""
    best_decode, best_prefill = (float("inf"), {}), (float("inf"), {})
    for block_n, num_warps, num_stages in DECODE_TILES:
        tiles = {"block_n": block_n, "num_warps": num_warps, "num_stages": num_stages}
        for num_splits in (None, 1, 2, 4):
            try:
                ms, rate = time_decode(64, 4096, num_splits=num_splits, **tiles)
            except Exception as error:  # noqa: BLE001 - one bad tile must not end the sweep
                print(f"decode {tiles}: {error!r:.200}")
                break
            print(f"decode {tiles} splits={num_splits}: {ms:.3f} ms, {rate / 1e12:.2f} TB/s")
            best_decode = min(best_decode, (ms, tiles), key=lambda pair: pair[0])
    for batch, ctx_len in ((1, 4096), (256, 1024), (64, 4096), (16, 4096)):
        for num_splits in (None, 1, 2, 4, 8, 16, 32):
            ms, rate = time_decode(batch, ctx_len, num_splits=num_splits, **best_decode[1])
            print(f"decode B={batch} ctx={ctx_len} splits={num_splits}: {rate / 1e12:.2f} TB/s")
    for block_m, block_n, num_warps, num_stages in PREFILL_TILES:
        tiles = {"block_m": block_m, "block_n": block_n, "num_warps": num_warps}
        tiles["num_stages"] = num_stages
        try:
            ms, flash_ms, _ = time_prefill(**tiles)
        except Exception as error:  # noqa: BLE001
            print(f"prefill {tiles}: {error!r:.200}")
            continue
        print(f"prefill {tiles}: {ms:.3f} ms ({flash_ms / ms:.2f}x SDPA flash)")
        best_prefill = min(best_prefill, (ms, tiles), key=lambda pair: pair[0])
    return best_decode[1], best_prefill[1]


def time_compression(try_tiles: bool, copy: float):
    """One compression's kernels, as the table's rows: the defaults, and with `try_tiles` each tile.
    Graph-timed, so that no row includes its wrapper's host time. The move runs in place again
    and again: its data turns to garbage, its time does not."""
    layers, kv_heads, blocks, kept_blocks = COMPRESSION
    shape = (2, layers, blocks + 4, kv_heads, BLOCK_SIZE, HEAD_DIM)
    kv_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    score_cache = torch.rand(shape[1:-1], device="cuda")
    old = torch.randperm(blocks + 4, device="cuda", dtype=torch.int32)[:blocks]
    num_tokens, keep = blocks * BLOCK_SIZE, kept_blocks * BLOCK_SIZE
    key_bytes = layers * kv_heads * num_tokens * HEAD_DIM * DTYPE.itemsize

    def row(what: str, tiles: dict, fn, amount: float, unit: str):
        try:
            us = graph_us([fn])
        except Exception as error:  # noqa: BLE001 - one bad tile must not end the sweep
            print(f"| {what}, tiles {tiles} | {error!r:.100} | |")
            return
        rate = bandwidth(amount, us, copy) if unit == "TB/s" else f"{amount / us / 1e6:.2f} {unit}"
        print(f"| {what}, tiles {tiles or 'default'} | {us:.1f} us | {rate} |")

    for window in (16, 32):  # a later compression's queries, a first one's
        q = torch.randn(layers, window, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        for tiles in [{}] + [
            {"block_n": n, "num_warps": w, "num_stages": s}
            for n, w, s in (WINDOW_TILES if try_tiles else [])
        ]:
            fn = partial(window_scores, kv_cache[0], old, q, **tiles)
            row(f"window scores, {window} queries", tiles, fn, 2 * key_bytes, "TB/s")
    flops = 2 * layers * kv_heads * blocks * BLOCK_SIZE**2 * HEAD_DIM
    for tiles in [{}] + [
        {"block_m": m, "num_warps": w, "num_stages": s}
        for m, w, s in (REDUNDANCY_TILES if try_tiles else [])
    ]:
        fn = partial(redundancy_sums, kv_cache[0], old, **tiles)
        row("redundancy sums", tiles, fn, flops, "TFLOP/s")
    scores = torch.rand(layers, kv_heads, num_tokens, device="cuda")
    kept = torch.rand(layers, kv_heads, num_tokens, device="cuda").topk(keep).indices.sort().values
    new = old[:kept_blocks]  # in place, as for a request's private blocks
    fn = partial(move_kept, kv_cache, score_cache, scores, old, new, kept)
    # K and V of the kept tokens, read and written, and their float32 scores
    moved = 4 * key_bytes * keep // num_tokens + 2 * layers * kv_heads * keep * 4
    row("move kept K, V and scores", {}, fn, moved, "TB/s")


def norm_then_gemv(x, residual, norm, weight):
    return gemv(add_rms_norm(x, residual, norm, 1e-6)[0], weight)


def silu_then_gemv(gate_up, weight):
    return gemv(silu_and_mul(gate_up), weight)


def time_gemv(copy: float):
    """Each projection of one token, through cuBLAS and through `gemv`: 28 launches of each, one
    per layer on its own weights (so that none stay in L2), captured in a CUDA graph and
    replayed. Then, as in a decode step, each GEMV after the kernel that feeds it (28 pairs): the
    launch that a dependent GEMV can overlap with that kernel."""
    randn = partial(torch.randn, device="cuda", dtype=DTYPE)
    for name, (n, k) in GEMV_SHAPES.items():
        weights, x = [randn(n, k) for _ in range(28)], randn(1, k)
        ways = {"cuBLAS": partial(torch.nn.functional.linear, x), "gemv": partial(gemv, x)}
        if name in ("qkv_proj", "gate_up_proj"):
            ways["add_rms_norm, then gemv"] = partial(norm_then_gemv, x, randn(1, k), randn(k))
        if name == "down_proj":
            ways["silu_and_mul, then gemv"] = partial(silu_then_gemv, randn(1, 2 * k))
        for what, fn in ways.items():
            us = graph_us([partial(fn, weight) for weight in weights])
            rate = bandwidth(2 * n * k, us, copy)
            print(f"| {name} ({n} x {k}), one token, {what} | {us:.2f} us | {rate} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="try other tiles first")
    parser.add_argument("--compression", action="store_true", help="the compression kernels")
    parser.add_argument("--gemv", action="store_true", help="one token's projections")
    parser.add_argument("--splits", action="store_true", help="decode splits, graph-timed")
    args = parser.parse_args()
    torch.manual_seed(0)
    attention_sweep = args.sweep and not args.compression  # --compression sweeps its own tiles
    decode_tiles, prefill_tiles = sweep() if attention_sweep else ({}, {})
    print(
        f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    )
    print(
        f"bf16, {NUM_Q_HEADS} q / {NUM_KV_HEADS} kv heads, head_dim {HEAD_DIM}, block {BLOCK_SIZE}"
    )
    copy = copy_bandwidth()
    if not args.compression:
        print(f"tiles: decode {decode_tiles or 'defaults'}, prefill {prefill_tiles or 'defaults'}")
    print("| what | time | figure |\n| --- | --- | --- |")
    print(f"| device-to-device copy, 1 GiB | | {copy / 1e12:.2f} TB/s (read + write) |")
    if args.compression:
        return time_compression(args.sweep, copy)
    if args.gemv:
        return time_gemv(copy)
    if args.splits:
        return time_splits(copy)
    for batch, ctx_len in ((64, 4096), (1, 4096), (256, 1024)):
        ms, rate = time_decode(batch, ctx_len, **decode_tiles)
        figure = f"{rate / 1e12:.2f} TB/s of K/V = {rate / copy:.0%} of copy"
        print(f"| decode, batch {batch}, context {ctx_len} | {ms:.3f} ms | {figure} |")
    ms, flash_ms, diff = time_prefill(**prefill_tiles)
    print(f"| prefill, 8 x 2048 causal | {ms:.3f} ms | {prefill_tflops(ms):.0f} TFLOP/s |")
    print(f"| SDPA flash, same data | {flash_ms:.3f} ms | {prefill_tflops(flash_ms):.0f} TFLOP/s |")
    print(f"| prefill speed / SDPA flash | | {flash_ms / ms:.2f} (max abs diff {diff:.2g}) |")


if __name__ == "__main__":
    main()
