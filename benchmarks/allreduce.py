"""Latency of one decode step's all-reduces on two GPUs, inside a CUDA graph.

A Qwen3-8B decode step under tensor parallelism all-reduces a [batch, 4096] bf16 activation
twice per layer, 72 times in all (73 with the embedding's). This captures 72 all-reduces of that shape in one graph and
times its replays, per all-reduce, for NCCL (`dist.all_reduce`) and for PyTorch's
symmetric-memory one-shot all-reduce (each GPU reads its peer's buffer over NVLink and sums;
no NVLink multicast). Also checks that both give the exact sum.

    PYTHONPATH=. python benchmarks/allreduce.py
"""

import os
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem
import torch.multiprocessing as mp

HIDDEN, CALLS, BATCHES = 4096, 72, (1, 8, 28, 64, 128, 256, 512)


def timed_graph(fn, repeat: int = 20) -> float:
    """Microseconds per call of `fn` replayed CALLS times in one CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        graph.replay()
    end.record()
    end.synchronize()
    return 1000 * start.elapsed_time(end) / repeat / CALLS


def random_rows(batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=generator)


def main(rank: int, world: int):
    torch.cuda.set_device(rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device(rank))
    group = dist.group.WORLD.group_name
    buffer = symm_mem.empty(max(BATCHES) * HIDDEN, dtype=torch.bfloat16, device="cuda")
    symm_mem.rendezvous(buffer, group)
    for batch in BATCHES:
        # Every rank makes every rank's x, to know the sum: an fp32 sum, rounded once.
        generators = [torch.Generator("cuda").manual_seed(r) for r in range(world)]
        xs = [random_rows(batch, generator) for generator in generators]
        x, expected = xs[rank], sum(each.float() for each in xs).bfloat16()
        y, out = x.clone(), torch.empty_like(x)
        dist.all_reduce(y)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(
            buffer[: x.numel()], x.view(-1), "sum", group, out.view(-1)
        )
        exact = torch.equal(y, expected), torch.equal(out, expected)
        nccl = timed_graph(partial(dist.all_reduce, y))
        one_shot = timed_graph(
            partial(
                torch.ops.symm_mem.one_shot_all_reduce_copy_out,
                *(buffer[: x.numel()], x.view(-1), "sum", group, out.view(-1)),
            )
        )
        if rank == 0:
            print(
                f"batch {batch:4d}: nccl {nccl:6.1f} us, one-shot {one_shot:6.1f} us "
                f"per all-reduce; exact {exact}",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(main, args=(2,), nprocs=2)
