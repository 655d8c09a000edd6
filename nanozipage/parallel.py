"""Tensor parallelism: the processes, and how each step's plan reaches them.

Rank 0, the caller's process, runs the engine: its model runner and compressor pickle each call
(a `StepPlan`, compressions' plans: flat int lists) and pipe it to ranks 1..N-1 before running it
on their own shard; tensors go through torch.distributed (NCCL; gloo on the CPU). However rank
0's end of a pipe closes (`LLM.close()`, collection, exit or death), the worker's loop ends, with
nothing left to unlink. The runner passes its class, so neither model nor runner is imported."""

import contextlib
import gc
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.util
import os
import pickle
import signal
import sys
import time
import traceback
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from nanozipage.config import Config

# A collective that waits longer than this raises (gloo) or aborts (NCCL) instead of hanging.
# Generous, because ranks compile and capture CUDA graphs at their own pace at start-up.
TIMEOUT = timedelta(minutes=5)
# A worker's exit code when spawn re-ran the caller's script up to `LLM(...)`: no __main__ guard.
MISSING_GUARD = 86


def _init_group(config: Config, rank: int, store: dist.TCPStore):
    ranks, cuda = config.tensor_parallel_size, config.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
    else:  # the ranks share the cores: with more threads than cores, every matmul waits
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    # With device_id, all ranks make NCCL's communicator here at once, not in a later collective.
    backend, device = ("nccl", torch.device("cuda", rank)) if cuda else ("gloo", None)
    dist.init_process_group(
        backend, store=store, world_size=ranks, rank=rank, timeout=TIMEOUT, device_id=device
    )


def _worker(config: Config, target: type, rank: int, port: int, conn):
    """Ranks 1..N-1: run rank 0's calls on `target(config, rank)` until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank: rank 0 handles it
    try:
        conn.send("started")
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=TIMEOUT)
        _init_group(config, rank, store)
        runner = target(config, rank)
        conn.send("ready")
        while True:
            function, args = pickle.loads(conn.recv_bytes())
            function(runner, *args)
    except EOFError:  # rank 0 is done with this LLM
        mp.util._run_finalizers(0)  # unlinks the named semaphores this process made
        os._exit(0)  # skips the interpreter's teardown: seconds with torch loaded, nothing to save
    except BaseException:
        with contextlib.suppress(OSError):  # rank 0 may be gone already: no one to tell
            conn.send(traceback.format_exc())
        raise


class Workers:
    """Rank 0's handle on ranks 1..N-1: starts them, forwards calls, ends them with the LLM."""

    def __init__(self, config: Config, target: type, graphs: dict):
        """`graphs`: rank 0's CUDA graphs, freed first when the workers end (`_shut_down`: why)."""
        if getattr(mp.current_process(), "_inheriting", False):  # a worker re-running the script
            sys.exit(MISSING_GUARD)
        gc.collect()  # an LLM that only a reference cycle holds is closed when collected
        if dist.is_initialized():
            raise RuntimeError("another tensor-parallel LLM is open in this process: close it")
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # a free port
        context = mp.get_context("spawn")  # a forked process cannot use CUDA
        self.conns, self.processes = [], []
        for rank in range(1, config.tensor_parallel_size):
            conn, child_conn = context.Pipe()
            args = (config, target, rank, store.port, child_conn)
            # daemon: also ended by multiprocessing at exit, should all else fail
            self.processes.append(context.Process(target=_worker, args=args, daemon=True))
            self.processes[-1].start()
            child_conn.close()  # so that the worker's death closes the pipe
            self.conns.append(conn)
        self.close = weakref.finalize(self, _shut_down, self.conns, self.processes, graphs)
        self.expect("started")
        _init_group(config, 0, store)

    def expect(self, message: str):
        """Wait for every worker to send `message`; raise as soon as one fails instead."""
        waiting = list(self.conns)
        while waiting:
            ready = mp.connection.wait(waiting, TIMEOUT.total_seconds())
            if not ready:
                self.close()
                raise TimeoutError(f"no {message!r} from a worker in {TIMEOUT}: is the host busy?")
            for conn in ready:
                if (reply := _receive(conn)) != message:
                    raise self._failed(self.conns.index(conn) + 1, reply)
                waiting.remove(conn)

    def _failed(self, rank: int, error: str | None) -> RuntimeError:
        """End the workers; the error that says why worker `rank` stopped."""
        self.processes[rank - 1].join(timeout=5)
        self.close()
        if (code := self.processes[rank - 1].exitcode) == MISSING_GUARD:
            return RuntimeError(
                'the script makes its LLM outside `if __name__ == "__main__":`, and every '
                "tensor-parallel worker re-runs the script: make the LLM under that guard"
            )
        why = f", with this error:\n{error}" if error else ""
        return RuntimeError(f"tensor-parallel worker {rank} exited (code {code}){why}")

    def check_alive(self):
        for rank, (process, conn) in enumerate(zip(self.processes, self.conns), 1):
            if process.exitcode is not None:
                raise self._failed(rank, _receive(conn))

    def call(self, function, *args):
        """Have every worker run `function(its target, *args)`; does not wait for it. The
        function travels by name, so it must be defined at a module's top level."""
        self.check_alive()
        message = pickle.dumps((function, args))
        for rank, conn in enumerate(self.conns, 1):
            try:
                conn.send_bytes(message)
            except OSError:  # it died since check_alive: a broken or reset pipe
                raise self._failed(rank, None) from None

    def wait_on_gpu(self, event: torch.cuda.Event | None = None):
        """Wait for `event` (by default, all work queued so far), checking the workers all the
        while: on NCCL a dead peer leaves a collective spinning rather than failing."""
        event = event or torch.cuda.current_stream().record_event()
        if not _wait(event, self.processes):
            self.check_alive()  # raises, naming the dead worker


def _wait(event: torch.cuda.Event, processes: list, seconds: float = float("inf")) -> bool:
    """Poll `event`: True once it completes, False once a worker exits or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while not event.query():
        if time.monotonic() > deadline or any(p.exitcode is not None for p in processes):
            return False
    return True


def _receive(conn):
    """A worker's next message: "started", "ready" or its error; None if it sent none."""
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):  # also a closed pipe, or a killed worker's, read as reset
        return None


def _shut_down(conns, processes, graphs: dict):
    try:
        # The GPU first (10 s at most, while every worker lives): the last step launched needs
        # the workers, and a graph dropped while it runs is destroyed only when it ends.
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            _wait(torch.cuda.current_stream().record_event(), processes, seconds=10)
    finally:  # also after Ctrl-C: weakref.finalize runs this once, so it must reach the end
        for conn in conns:
            conn.close()  # a worker waiting for its next call sees EOF and exits
        # Then the graphs (NCCL waits forever to free a communicator a live CUDA graph holds), then
        # the communicator, aborted (destroying waits for all ranks; abort ends a hung collective).
        graphs.clear()
        gc.collect()  # also a graph that a reference cycle holds
        if dist.is_initialized():
            dist.distributed_c10d._abort_process_group()
        for process in processes:
            process.join(timeout=5)
            if process.exitcode is None:  # stuck in a collective that rank 0 left: no use waiting
                process.kill()
                process.join()
