"""Tensor parallelism: the processes, and how each step's plan reaches them.

With `tensor_parallel_size=N`, rank 0 is the caller's process: it runs the engine (scheduler,
block manager, sampling) and its `ModelRunner` forwards every model call (`step`, `compact`,
`wait_for_compactions`) to ranks 1..N-1 before running it on its own shard. The workers here
only loop over those calls. What travels is small: a `StepPlan` of flat int lists or a few
compaction plans, pickled once and written to one pipe per worker. Tensors never travel by
pipe; the model's own collectives (all-reduce, logits gather, the broadcast of the sampled ids)
go through torch.distributed (NCCL on GPUs, gloo on the CPU).

Pipes rather than shared memory make lifetimes simple: closing rank 0's end (the `LLM` is
deleted, the program exits, or rank 0 dies) ends a worker's loop, and nothing is left to
unlink. A dead worker is seen before every call and while rank 0 waits on the GPU, and an
exception on rank 0 inside a step ends the workers (they could no longer follow it).
"""

import multiprocessing as mp
import os
import pickle
import socket
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from nanozipage.config import Config

# A collective that waits longer than this raises (gloo) or aborts (NCCL) instead of hanging.
# Generous, because ranks compile and capture CUDA graphs at their own pace at start-up.
TIMEOUT = timedelta(minutes=5)


def _init_group(config: Config, rank: int, port: int):
    if config.device.startswith("cuda"):
        torch.cuda.set_device(rank)
    else:  # the ranks share the cores: with more threads than cores, every matmul waits
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    dist.init_process_group(
        "nccl" if config.device.startswith("cuda") else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        world_size=config.tensor_parallel_size,
        rank=rank,
        timeout=TIMEOUT,
    )


def _worker(config: Config, rank: int, port: int, conn):
    """Ranks 1..N-1: build this rank's model runner, then run rank 0's calls until its pipe
    closes. An exception ends the process, which rank 0 reports as an error."""
    from nanozipage.model_runner import ModelRunner  # it imports this module

    _init_group(config, rank, port)
    runner = ModelRunner(config, rank)
    try:
        while True:
            method, args = pickle.loads(conn.recv_bytes())
            getattr(runner, method)(*args)
    except EOFError:  # rank 0 is done with this LLM
        dist.destroy_process_group()
        os._exit(0)  # skips the interpreter's teardown: seconds with torch loaded, nothing to save


class Workers:
    """Rank 0's handle on ranks 1..N-1: starts them, forwards calls, ends them with the LLM."""

    def __init__(self, config: Config):
        with socket.socket() as s:  # a free port for the process group's rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        context = mp.get_context("spawn")  # a forked process cannot use CUDA
        self.conns, self.processes = [], []
        for rank in range(1, config.tensor_parallel_size):
            conn, child_conn = context.Pipe()
            process = context.Process(target=_worker, args=(config, rank, port, child_conn))
            process.daemon = True  # also ended by multiprocessing at exit, should all else fail
            process.start()
            child_conn.close()  # so that the worker's death closes the pipe
            self.conns.append(conn)
            self.processes.append(process)
        self.close = weakref.finalize(self, _shut_down, self.conns, self.processes)
        _init_group(config, 0, port)

    def check_alive(self):
        for rank, process in enumerate(self.processes, 1):
            if process.exitcode is not None:
                self.close()
                raise RuntimeError(
                    f"tensor-parallel worker {rank} exited (code {process.exitcode}); "
                    "this LLM can no longer run"
                )

    def call(self, method: str, *args):
        """Have every worker run `ModelRunner.<method>(*args)`; does not wait for it."""
        self.check_alive()
        message = pickle.dumps((method, args))
        for conn in self.conns:
            conn.send_bytes(message)

    def wait_on_gpu(self, event: torch.cuda.Event):
        """Wait for `event`, checking the workers all the while: on NCCL a dead peer leaves a
        collective spinning rather than failing (gloo raises at once)."""
        while not event.query():
            self.check_alive()


def _shut_down(conns, processes):
    for conn in conns:
        conn.close()  # a worker waiting for its next call sees EOF and exits
    if dist.is_initialized():
        dist.destroy_process_group()
    for process in processes:
        process.join(timeout=5)
        if process.exitcode is None:  # stuck in a collective that rank 0 left: no use waiting
            process.kill()
            process.join()
