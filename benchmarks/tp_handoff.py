"""Host cost of handing a decode step's plan to a tensor-parallel worker (no GPU needed).

Rank 0 pickles one `StepPlan` per step and writes it to a pipe per worker, exactly as
`parallel.Workers.call` does; a child process reads and unpickles it, as `parallel._worker`
does. Reported per decode step: rank 0's time in the call (what the engine loop pays), and the
time until the worker holds the plan (how far it starts behind rank 0), as medians over many
steps. The figures go to README.md ("Several GPUs").

    PYTHONPATH=. python benchmarks/tp_handoff.py
"""

import multiprocessing as mp
import pickle
import random
import statistics
import time

from nanozipage.model_runner import StepPlan


def decode_plan(batch: int, blocks: int, block_size: int = 256) -> StepPlan:
    rng = random.Random(0)
    tables = [rng.sample(range(100_000), blocks) for _ in range(batch)]
    lens = [rng.randrange((blocks - 1) * block_size, blocks * block_size) for _ in range(batch)]
    return StepPlan(
        False,
        input_ids=[rng.randrange(150_000) for _ in range(batch)],
        positions=[n + rng.randrange(30_000) for n in lens],
        slot_mapping=[t[-1] * block_size + n % block_size for t, n in zip(tables, lens)],
        context_lens=lens,
        block_tables=tables,
        query_rows=[-1] * batch,
        sample_rows=None,
    )


def worker(conn, acks):
    while True:
        try:
            pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        acks.send(time.perf_counter())  # CLOCK_MONOTONIC: comparable across processes


def main():
    context = mp.get_context("spawn")
    conn, child_conn = context.Pipe()
    acks, child_acks = context.Pipe()
    process = context.Process(target=worker, args=(child_conn, child_acks))
    process.start()
    print("batch  blocks/request  plan bytes  rank 0 call (us)  worker holds it (us)")
    for batch, blocks in [(1, 9), (64, 9), (256, 9), (256, 128)]:
        plan, calls, deliveries = decode_plan(batch, blocks), [], []
        for _ in range(300):
            start = time.perf_counter()
            conn.send_bytes(pickle.dumps(("step", (plan,))))
            calls.append(time.perf_counter() - start)
            deliveries.append(acks.recv() - start)
        size = len(pickle.dumps(("step", (plan,))))
        print(
            f"{batch:5}  {blocks:14}  {size:10}  {1e6 * statistics.median(calls):16.0f}"
            f"  {1e6 * statistics.median(deliveries):20.0f}"
        )
    conn.close()
    process.join()


if __name__ == "__main__":
    main()
